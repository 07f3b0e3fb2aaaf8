"""Helpers that run the real CLI (python / torchrun) on tiny configs and read what it wrote."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from framework.distributed import free_port

ROOT = Path(__file__).resolve().parents[1]
TINY = str(ROOT / "recipes/llada/configs/tiny.yaml")

# A model and batch small enough that 2 ranks on 2 CPU cores take a few seconds per run.
SMALL = ["model.vocab_size=512", "model.dim=64", "model.n_layers=2", "model.n_heads=2", "model.ffn_hidden=128",
         "model.max_seq_len=64", "data.seq_len=32", "train.micro_batch=4", "train.global_batch=16",
         "optim.warmup_steps=2", "log.every=1", "log.wandb=disabled", "log.progress=false", "eval.every=0",
         "eval.at_end=false", "checkpoint.every=0", "ema.decay=0.9"]


def env() -> dict:
    e = dict(os.environ, PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1", WANDB_MODE="disabled")
    e.pop("RANK", None)
    return e


def train(data_dir: Path, run_dir: Path, *overrides: str, nproc: int = 1, timeout: int = 600,
          check: bool = True) -> subprocess.CompletedProcess:
    """Run launch/train.py on the tiny preset, under torchrun when nproc > 1."""
    args = [TINY, f"data.dir={data_dir}", f"run_dir={run_dir}", *SMALL, *overrides]
    if nproc > 1:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc),
               "--master_port", str(free_port()), "launch/train.py", *args]
    else:
        cmd = [sys.executable, "launch/train.py", *args]
    out = subprocess.run(cmd, cwd=ROOT, env=env(), capture_output=True, text=True, timeout=timeout)
    if check and out.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} failed ({out.returncode}):\n{out.stdout[-3000:]}\n{out.stderr[-6000:]}")
    return out


def metrics(run_dir: Path) -> list[dict]:
    path = Path(run_dir) / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()]


def losses(run_dir: Path) -> dict[int, float]:
    """Training loss per step (the last record wins when a resumed run logged a step again)."""
    return {m["step"]: m["loss"] for m in metrics(run_dir) if "loss" in m}
