"""Benchmarks that print a ratio against a baseline measured side by side in the same run.

    python launch/benchmark.py trainer-overhead [--preset P] [--nproc N] [--steps S] [--repeats R] [key=value ...]

trainer-overhead: seconds per optimizer step of our trainer (launch/train.py: LR schedule, per-step
generators, metric all-reduce, EMA, JSONL, progress bar) divided by a bare DeepSpeed loop over the same
model, data stream, loss, DeepSpeed config and process count. Runs alternate (ours, bare, ours, bare, ...)
so drift on a shared machine hits both sides alike. Target: <= 1.05.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import _bootstrap  # noqa: F401

ROOT = Path(__file__).resolve().parent.parent
QUIET = ["log.wandb=disabled", "log.every=1", "eval.every=0", "eval.at_end=false", "checkpoint.every=0",
         "checkpoint.at_end=false"]


def _launch(nproc: int, script: list[str]) -> list[str]:
    if nproc == 1:
        return [sys.executable, *script]
    from framework.distributed import free_port

    return [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc), "--master_port",
            str(free_port()), *script]


def _run(cmd: list[str]) -> None:
    out = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, env=dict(os.environ, PYTHONUNBUFFERED="1"))
    if out.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{out.stderr[-4000:]}")


def ours(preset: str, overrides: list[str], steps: int, warmup: int, nproc: int, workdir: Path) -> float:
    """Seconds per step of launch/train.py, from the timestamps of its metrics.jsonl rows (all overheads in)."""
    run = workdir / f"ours-{time.time_ns()}"
    _run(_launch(nproc, ["launch/train.py", preset, *overrides, *QUIET, f"train.steps={steps}", f"run_dir={run}"]))
    times = {row["step"]: row["time"] for row in map(json.loads, (run / "metrics.jsonl").read_text().splitlines())}
    return (times[steps] - times[warmup]) / (steps - warmup)


def bare(preset: str, overrides: list[str], steps: int, warmup: int, nproc: int, workdir: Path) -> float:
    out = workdir / f"bare-{time.time_ns()}.json"
    _run(_launch(nproc, ["launch/benchmark.py", "_bare-loop", "--preset", preset, "--steps", str(steps),
                         "--warmup", str(warmup), "--out", str(out), *overrides, *QUIET]))
    return json.loads(out.read_text())["seconds_per_step"]


def bare_loop(preset: str, overrides: list[str], steps: int, warmup: int, out: str) -> None:
    """The baseline: the same engine, data and loss with nothing of our trainer around them."""
    import torch

    from framework import distributed as dist
    from framework import engine as engine_lib
    from framework.recipe import load_run_config
    from framework.rng import seed_everything

    dist.prepare_env()
    dist.init()
    cfg, recipe = load_run_config(preset, overrides, dist.world())
    accum = cfg.grad_accum(dist.world())
    data = iter(recipe.build_data(cfg, "train", dist.rank(), dist.world(), batch_multiple=accum))
    seed_everything(cfg.train.seed)
    ds_config = engine_lib.deepspeed_config(cfg, dist.world())
    with engine_lib.model_init_context(ds_config):
        model = recipe.build_model(cfg).model
    engine = engine_lib.initialize(model, cfg, ds_config)
    gen = torch.Generator(device=dist.device()).manual_seed(cfg.train.seed)
    start = 0.0
    for step in range(steps):
        if step == warmup:
            torch.distributed.barrier()
            start = time.perf_counter()
        for _ in range(accum):
            batch = {k: v.to(dist.device()) for k, v in next(data).items()}
            loss, _ = recipe.loss(cfg, engine, {}, batch, gen)
            engine.backward(loss)
            engine.step()
        loss.item()  # the trainer also syncs once per step (to log); keep the comparison fair
    torch.distributed.barrier()
    if dist.is_main():
        Path(out).write_text(json.dumps({"seconds_per_step": (time.perf_counter() - start) / (steps - warmup)}))


def trainer_overhead(args: argparse.Namespace) -> None:
    ratios = []
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(args.repeats):
            a = ours(args.preset, args.overrides, args.steps, args.warmup, args.nproc, Path(tmp))
            b = bare(args.preset, args.overrides, args.steps, args.warmup, args.nproc, Path(tmp))
            ratios.append(a / b)
            print(f"repeat {r + 1}: ours {a * 1e3:.1f} ms/step, bare DeepSpeed {b * 1e3:.1f} ms/step, "
                  f"ratio {a / b:.3f}", flush=True)
    print(f"trainer-overhead: median ratio {statistics.median(ratios):.3f} over {args.repeats} pairs "
          f"(target <= 1.05; preset {args.preset}, {args.nproc} process(es), {args.steps - args.warmup} timed steps)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="name", required=True)
    p = sub.add_parser("trainer-overhead", help="our trainer vs a bare DeepSpeed loop")
    p.add_argument("--preset", default="recipes/llada/configs/tiny.yaml")
    p.add_argument("--nproc", type=int, default=1)
    p.add_argument("--steps", type=int, default=40)
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("overrides", nargs="*")
    b = sub.add_parser("_bare-loop", help=argparse.SUPPRESS)
    b.add_argument("--preset", required=True)
    b.add_argument("--steps", type=int, required=True)
    b.add_argument("--warmup", type=int, required=True)
    b.add_argument("--out", required=True)
    b.add_argument("--local_rank", type=int, default=None)
    b.add_argument("overrides", nargs="*")
    args = parser.parse_args()
    if args.name == "trainer-overhead":
        trainer_overhead(args)
    else:
        bare_loop(args.preset, args.overrides, args.steps, args.warmup, args.out)


if __name__ == "__main__":
    main()
