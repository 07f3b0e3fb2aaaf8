"""Train any recipe: `python launch/train.py PRESET.yaml [key.sub=value ...]`.

Works unchanged under `torchrun` and `deepspeed` (which add `--local_rank`); `resume=auto` continues
from the newest complete checkpoint of the run directory.
"""

from __future__ import annotations

import argparse
import gc
import os
import sys

import _bootstrap  # noqa: F401

from framework import distributed as dist
from framework.config import ConfigError, RunConfig, check_run_dir
from framework.recipe import load_run_config


def check_before_work(cfg: RunConfig) -> None:
    """What the config alone cannot tell: the resume target exists and is complete, and run_dir is writable.
    Every rank checks for itself (same shared file system), so no rank waits on a rank that gave up."""
    from framework import checkpoint

    try:
        checkpoint.resolve(cfg.resume, cfg.run_dir)
    except FileNotFoundError as e:  # its message already names `resume=`
        raise ConfigError(str(e)) from None
    check_run_dir(cfg.run_dir)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if "--plan" in argv:  # the memory plan (--gpus N, --gpu-memory GiB): launch/plan.py, no run
        import plan

        return plan.main([a for a in argv if a != "--plan"])
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("preset", help="YAML preset, e.g. recipes/llada/configs/tiny.yaml")
    parser.add_argument("overrides", nargs="*", help="key.sub=value overrides")
    parser.add_argument("--describe", action="store_true", help="print the model's size and FLOPs, then exit")
    parser.add_argument("--print-run-dir", action="store_true",
                        help="check the config, print the run directory it resolves to, then exit (launch scripts)")
    parser.add_argument("--plan", action="store_true", help="print the per-rank memory plan (launch/plan.py), then exit")
    parser.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    dist.prepare_env()
    try:
        cfg, recipe = load_run_config(args.preset, args.overrides, dist.env_world_size())
        if not (args.describe or args.print_run_dir):
            check_before_work(cfg)
    except ConfigError as e:
        print(f"config error: {e}", file=sys.stderr)
        return 2
    if args.describe:
        from framework import lora

        print(f"{args.preset}: recipe {recipe.name}, {recipe.describe(cfg)}")
        try:  # trainable vs frozen (LoRA) and what the optimizer holds per rank
            print(f"  {lora.describe(cfg, recipe, dist.env_world_size())}")
        except ConfigError as e:  # e.g. a lora.targets pattern that selects no module
            print(f"config error: {e}", file=sys.stderr)
            return 2
        except Exception as e:  # a model that cannot be built on the meta device: the summary above stands
            print(f"  (trainable/frozen count unavailable: {type(e).__name__}: {e})")
        return 0
    if args.print_run_dir:
        print(cfg.run_dir)
        return 0
    from framework.trainer import TrainingStopped, train

    try:
        result = train(cfg, recipe)
    except ConfigError as e:  # recipe checks that need files (tokenizer, shards) run at build time
        print(f"config error: {e}", file=sys.stderr)
        return 2
    except TrainingStopped as e:  # e.g. a diverged loss: every rank stops at the same step, so all can shut down
        if dist.is_main():
            print(f"error: {e}", file=sys.stderr)
        gc.collect()
        dist.shutdown()
        return 1
    except RuntimeError as e:
        if not dist.is_collective_timeout(e):
            raise
        print(f"error (rank {dist.rank()}): {dist.timeout_message(e, cfg.train.collective_timeout_minutes)}",
              file=sys.stderr, flush=True)
        sys.stdout.flush()
        # Not sys.exit: tearing the process group down would wait on the frozen rank all over again.
        os._exit(3)
    dist.print0(f"done: step {result.step}" + (f", checkpoint {result.checkpoint}" if result.checkpoint else ""))
    # Free the engine (DeepSpeed keeps reference cycles) while the process group still exists: left to the
    # interpreter's exit, ZeRO-3's Gloo work handles were destroyed after it and a rank aborted (twice in CI).
    gc.collect()
    dist.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
