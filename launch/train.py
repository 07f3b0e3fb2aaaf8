"""Train any recipe: `python launch/train.py PRESET.yaml [key.sub=value ...]`.

Works unchanged under `torchrun` and `deepspeed` (which add `--local_rank`); `resume=auto` continues
from the newest complete checkpoint of the run directory.
"""

from __future__ import annotations

import argparse
import gc
import sys

import _bootstrap  # noqa: F401

from framework import distributed as dist
from framework.config import ConfigError
from framework.recipe import load_run_config


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("preset", help="YAML preset, e.g. recipes/llada/configs/tiny.yaml")
    parser.add_argument("overrides", nargs="*", help="key.sub=value overrides")
    parser.add_argument("--describe", action="store_true", help="print the model's size and FLOPs, then exit")
    parser.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    dist.prepare_env()
    try:
        cfg, recipe = load_run_config(args.preset, args.overrides, dist.env_world_size())
    except ConfigError as e:
        print(f"config error: {e}", file=sys.stderr)
        return 2
    if args.describe:
        print(f"{args.preset}: recipe {recipe.name}, {recipe.describe(cfg)}")
        return 0
    from framework.trainer import train

    try:
        result = train(cfg, recipe)
    except ConfigError as e:  # recipe checks that need files (tokenizer, shards) run at build time
        print(f"config error: {e}", file=sys.stderr)
        return 2
    dist.print0(f"done: step {result.step}" + (f", checkpoint {result.checkpoint}" if result.checkpoint else ""))
    # Free the engine (DeepSpeed keeps reference cycles) while the process group still exists: left to the
    # interpreter's exit, ZeRO-3's Gloo work handles were destroyed after it and a rank aborted (twice in CI).
    gc.collect()
    dist.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
