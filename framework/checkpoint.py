"""Checkpoints: atomic save, keep-last-K, resume (also on another world size), consolidation.

Layout of `RUN/checkpoints/`:
    step_00000040/            DeepSpeed's files (model + optimizer shards) and ours:
        trainer_rank00000.pt  step, data cursor, RNG states, EMA shard (plain types + tensors)
        meta.json             step, world size, ZeRO stage, the resolved config
        COMPLETE              written last, after every rank finished: only such dirs count
    latest                    name of the newest COMPLETE dir, replaced atomically
A save interrupted at any point leaves no COMPLETE file, so it is never resumed from.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import torch

from framework import distributed as dist

COMPLETE = "COMPLETE"


def tag_for(step: int) -> str:
    return f"step_{step:08d}"


def _atomic_write(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    tmp.write_text(text)
    os.replace(tmp, path)


def complete_checkpoints(root: Path) -> list[Path]:
    """Complete checkpoint dirs under `root`, oldest first."""
    if not root.is_dir():
        return []
    dirs = [d for d in root.iterdir() if d.is_dir() and d.name.startswith("step_") and (d / COMPLETE).exists()]
    return sorted(dirs, key=lambda d: d.name)


def resolve(resume: str, run_dir: str) -> Path | None:
    """The checkpoint dir `resume` means: "" -> none, "auto" -> newest complete (or none), else a path."""
    if not resume:
        return None
    if resume == "auto":
        root = Path(run_dir) / "checkpoints"
        found = complete_checkpoints(root)
        return found[-1] if found else None
    path = Path(resume)
    if path.is_dir() and (path / "checkpoints").is_dir():  # a run dir
        found = complete_checkpoints(path / "checkpoints")
        if not found:
            raise FileNotFoundError(f"resume={resume}: no complete checkpoint under {path / 'checkpoints'}")
        return found[-1]
    if not (path / COMPLETE).exists():
        raise FileNotFoundError(f"resume={resume}: not a complete checkpoint (no {COMPLETE} file in {path})")
    return path


def read_meta(ckpt: Path) -> dict:
    return json.loads((ckpt / "meta.json").read_text())


def save(engine: Any, run_dir: str, step: int, trainer_state: dict, config: dict, keep_last: int) -> Path:
    """Collective: every rank writes its shards; rank 0 then marks the dir complete and moves `latest`."""
    root = Path(run_dir) / "checkpoints"
    tag = tag_for(step)
    ckpt = root / tag
    if dist.is_main() and ckpt.exists():  # a leftover of an interrupted save of the same step
        shutil.rmtree(ckpt)
    dist.barrier()
    engine.save_checkpoint(str(root), tag=tag, save_latest=False)
    torch.save(trainer_state, ckpt / f"trainer_rank{dist.rank():05d}.pt")
    dist.barrier()
    if dist.is_main():
        meta = {"step": step, "world_size": dist.world(), "zero_stage": config["train"]["zero_stage"],
                "recipe": config["recipe"], "config": config}
        _atomic_write(ckpt / "meta.json", json.dumps(meta, indent=1))
        _fsync_dir(ckpt)
        _atomic_write(ckpt / COMPLETE, "")
        _atomic_write(root / "latest", tag)
        for old in complete_checkpoints(root)[:-keep_last]:
            shutil.rmtree(old, ignore_errors=True)
            shutil.rmtree(old.with_name(old.name + "_universal"), ignore_errors=True)
    dist.barrier()
    return ckpt


def _fsync_dir(path: Path) -> None:
    for f in path.iterdir():
        if f.is_file():
            with open(f, "rb") as fh:
                os.fsync(fh.fileno())


def trainer_states(ckpt: Path) -> list[dict]:
    """Every rank's trainer state of a checkpoint (plain types and tensors only)."""
    files = sorted(ckpt.glob("trainer_rank*.pt"))
    if not files:
        raise FileNotFoundError(f"{ckpt}: no trainer_rank*.pt files")
    return [torch.load(f, map_location="cpu", weights_only=True) for f in files]


def needs_universal(ckpt: Path, world: int) -> bool:
    """ZeRO 1-3 shard the optimizer by rank: another world size must go through a universal checkpoint."""
    meta = read_meta(ckpt)
    return meta["world_size"] != world and meta["zero_stage"] >= 1


def make_universal(ckpt: Path) -> Path:
    """Convert (once, on rank 0; others wait) to DeepSpeed's universal format next to the checkpoint."""
    out = ckpt.with_name(ckpt.name + "_universal")
    if dist.is_main() and not (out / COMPLETE).exists():
        shutil.rmtree(out, ignore_errors=True)
        cmd = [sys.executable, "-m", "deepspeed.checkpoint.ds_to_universal", "--input_folder", str(ckpt),
               "--output_folder", str(out), "--inject_missing_state", "--num_extract_workers", "1",
               "--num_merge_workers", "1"]
        result = subprocess.run(cmd, capture_output=True, text=True)
        if result.returncode != 0:
            raise RuntimeError(f"converting {ckpt} to a universal checkpoint failed:\n{result.stderr[-4000:]}")
        (out / COMPLETE).write_text("")
    dist.barrier()
    return out


def load_engine(engine: Any, ckpt: Path, universal: bool) -> None:
    """Load model + optimizer (DeepSpeed files) from a checkpoint dir (or its universal twin)."""
    src = ckpt.with_name(ckpt.name + "_universal") if universal else ckpt
    path, _ = engine.load_checkpoint(str(src.parent), tag=src.name, load_optimizer_states=True,
                                     load_lr_scheduler_states=False, load_module_strict=True)
    if path is None:
        raise RuntimeError(f"DeepSpeed could not load the checkpoint in {src}")
