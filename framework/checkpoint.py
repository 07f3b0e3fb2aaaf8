"""Checkpoints: atomic save, keep-last-K, resume (also on another world size), consolidation.

Layout of `RUN/checkpoints/`:
    step_00000040/            DeepSpeed's files (model + optimizer shards) and ours:
        trainer_rank00000.pt  step, data cursor, RNG states, EMA shard (plain types + tensors)
        meta.json             step, world size, ZeRO stage, the resolved config
        COMPLETE              written last, after every rank finished: only such dirs count
    latest                    name of the newest COMPLETE dir, replaced atomically
    universal/step_00000040/  DeepSpeed's universal conversion (world-size change): derived, never a checkpoint
    abandoned/step_00000080/  checkpoints newer than an explicit `resume=` rollback, moved aside
A save interrupted at any point leaves no COMPLETE file, so it is never resumed from. Only `step_<digits>`
dirs directly under `checkpoints/` are checkpoints. Every `.pt` is loaded with weights_only=True (tensors,
plain types and the few DeepSpeed classes below): a file that pickles anything else is refused unread.
"""

from __future__ import annotations

import contextlib
import json
import os
import pickle
import re
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from framework import distributed as dist
from framework.config import ConfigError

COMPLETE = "COMPLETE"
UNIVERSAL = "universal"  # conversions for another world size, beside the checkpoints, never among them
ABANDONED = "abandoned"  # checkpoints newer than an explicit rollback
_TAG = re.compile(r"step_\d+")
# torch.load honours this even over an explicit weights_only=False, which DeepSpeed passes everywhere.
_FORCE_SAFE = "TORCH_FORCE_WEIGHTS_ONLY_LOAD"
# The only non-tensor objects DeepSpeed 0.19 pickles into the files of the stages and precisions we run
# (found with torch.serialization.get_unsafe_globals_in_checkpoint on real ZeRO 0-3 / bf16 / offload saves).
_DEEPSPEED_TYPES = ("deepspeed.runtime.fp16.loss_scaler.LossScaler",
                    "deepspeed.runtime.fp16.loss_scaler.DynamicLossScaler",
                    "deepspeed.runtime.zero.config.ZeroStageEnum",
                    "deepspeed.utils.tensor_fragment.fragment_address")


class UnsafeCheckpointError(ConfigError):
    """A checkpoint file that would run code (or is not a torch zip file) when loaded: refused unread."""


def tag_for(step: int) -> str:
    return f"step_{step:08d}"


def _atomic_write(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    tmp.write_text(text)
    os.replace(tmp, path)


def complete_checkpoints(root: Path) -> list[Path]:
    """Complete checkpoint dirs under `root`, oldest first (older layouts' `step_N_universal` are not)."""
    if not root.is_dir():
        return []
    dirs = [d for d in root.iterdir() if d.is_dir() and _TAG.fullmatch(d.name) and (d / COMPLETE).exists()]
    return sorted(dirs, key=lambda d: d.name)


def universal_dir(ckpt: Path) -> Path:
    return ckpt.parent / UNIVERSAL / ckpt.name


def _safe_types() -> list:
    import importlib

    found = []
    for name in _DEEPSPEED_TYPES:
        module, _, attr = name.rpartition(".")
        with contextlib.suppress(ImportError, AttributeError):
            found.append(getattr(importlib.import_module(module), attr))
    return found


def _unpickling_reason(e: Exception) -> str:
    """The one informative line of torch's long weights_only error (which global it refused)."""
    lines = [line.strip() for line in str(e).splitlines() if line.strip()]
    return next((line for line in lines if "GLOBAL" in line or "Unsupported" in line), lines[0] if lines else
                type(e).__name__)


def check_safe(folder: Path) -> None:
    """Refuse (UnsafeCheckpointError naming the file) any `.pt` under `folder` whose pickle names a global
    beyond tensors, plain types and _DEEPSPEED_TYPES. Reads only the pickles' opcodes, never runs them."""
    allowed = set(_DEEPSPEED_TYPES)
    for f in sorted(folder.rglob("*.pt")):
        try:
            unsafe = sorted(set(torch.serialization.get_unsafe_globals_in_checkpoint(f)) - allowed)
        except Exception as e:  # not a torch zip file: the old pickle format cannot be checked unread
            raise UnsafeCheckpointError(f"refusing to load {f}: not a torch.save zip file ({e})") from None
        if unsafe:
            raise UnsafeCheckpointError(f"refusing to load {f}: it pickles {', '.join(unsafe[:5])}, which could run "
                                        f"code (checkpoints hold only tensors and plain types)")


@contextlib.contextmanager
def safe_loading(folder: Path) -> Iterator[None]:
    """Check `folder`'s files, then make every torch.load inside (DeepSpeed's too) weights_only=True, with
    DeepSpeed's few classes allowed; an unpickling error becomes UnsafeCheckpointError naming the folder."""
    check_safe(folder)
    old = os.environ.get(_FORCE_SAFE)
    os.environ[_FORCE_SAFE] = "1"
    try:
        with torch.serialization.safe_globals(_safe_types()):
            yield
    except pickle.UnpicklingError as e:
        raise UnsafeCheckpointError(f"refusing to load a file of {folder}: {_unpickling_reason(e)}") from None
    finally:
        if old is None:
            os.environ.pop(_FORCE_SAFE, None)
        else:
            os.environ[_FORCE_SAFE] = old


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
            shutil.rmtree(universal_dir(old), ignore_errors=True)
            shutil.rmtree(old.with_name(old.name + "_universal"), ignore_errors=True)  # older runs' layout
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
    out = []
    for f in files:
        try:
            out.append(torch.load(f, map_location="cpu", weights_only=True))
        except pickle.UnpicklingError as e:
            raise UnsafeCheckpointError(f"refusing to load {f}: {_unpickling_reason(e)}") from None
    return out


def needs_universal(ckpt: Path, world: int) -> bool:
    """ZeRO 1-3 shard the optimizer by rank: another world size must go through a universal checkpoint."""
    meta = read_meta(ckpt)
    return meta["world_size"] != world and meta["zero_stage"] >= 1


def holds_obsolete(ckpt: Path, model: torch.nn.Module) -> bool:
    """A ZeRO 1-3 checkpoint whose optimizer holds a parameter the model now declares obsolete (`obsolete_keys`): its
    flat partitions no longer fit the model, so it loads through the universal format (one folder per named
    parameter), where the obsolete one is simply not read. A ZeRO-0 one is refused in one line (ConfigError).
    Reads only the names (the file is memory-mapped)."""
    obsolete = obsolete_keys(model)
    if not obsolete:
        return False
    with safe_loading(ckpt):
        states = torch.load(ckpt / "mp_rank_00_model_states.pt", map_location="cpu", weights_only=True, mmap=True)
    if read_meta(ckpt)["zero_stage"] == 0:  # no universal format: the optimizer's state is one list by position
        found = [name for name in obsolete if name in (states.get("module") or {})]
        if found:
            raise ConfigError(f"resume={ckpt}: its ZeRO-0 optimizer state holds the obsolete weight '{found[0]}' "
                              f"({obsolete[found[0]]}) and cannot be loaded around it; start from its weights "
                              f"with train.init_from={ckpt} (a fresh optimizer) instead")
        return False
    found = [name for name in obsolete if any(name in group for group in states.get("param_shapes") or [])]
    for name in found if dist.is_main() else []:
        print(f"notice: resume from {ckpt}: the obsolete weight '{name}' is not loaded ({obsolete[name]}); "
              "loading through the universal format", flush=True)
    return bool(found)


def make_universal(ckpt: Path) -> Path:
    """Convert (once, on rank 0; others wait) to DeepSpeed's universal format in `checkpoints/universal/`,
    outside the checkpoint namespace: a crash before the next save leaves only the real checkpoint to resume.
    The converter runs in a child process with every torch.load forced to weights_only=True."""
    out = universal_dir(ckpt)
    error = ""
    if dist.is_main() and not (out / COMPLETE).exists():
        try:
            _convert(ckpt, out)
        except Exception as e:  # any failure is every rank's: the others would wait for rank 0 forever
            error = str(e) if isinstance(e, (RuntimeError, ConfigError)) else f"{type(e).__name__}: {e}"
    errors = [error]
    if dist.world() > 1:
        errors = [""] * dist.world()
        torch.distributed.all_gather_object(errors, error)
    first = next((e for e in errors if e), "")
    if first:  # raised on every rank, so nobody waits in a collective for rank 0
        raise UnsafeCheckpointError(first) if "refusing to load" in first else RuntimeError(first)
    return out


def _convert(ckpt: Path, out: Path) -> None:
    check_safe(ckpt)
    tmp = out.with_name(f".{out.name}.tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.rmtree(out, ignore_errors=True)
    # The converter's torch.load calls pass weights_only=False: the environment forces them safe, and the
    # allow-list is installed before the converter's module runs (its worker processes fork from this one).
    code = ("import runpy, sys, torch; from framework.checkpoint import _safe_types; "
            "torch.serialization.add_safe_globals(_safe_types()); sys.argv[0] = 'ds_to_universal'; "
            "runpy.run_module('deepspeed.checkpoint.ds_to_universal', run_name='__main__', alter_sys=True)")
    cmd = [sys.executable, "-c", code, "--input_folder", str(ckpt), "--output_folder", str(tmp),
           "--inject_missing_state", "--num_extract_workers", "1", "--num_merge_workers", "1"]
    root = str(Path(__file__).resolve().parents[1])
    env = {**os.environ, _FORCE_SAFE: "1", "PYTHONPATH": os.pathsep.join(filter(None, [root, os.environ.get(
        "PYTHONPATH")]))}
    result = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if result.returncode != 0:
        shutil.rmtree(tmp, ignore_errors=True)
        if "Weights only load failed" in result.stderr:
            raise UnsafeCheckpointError(f"refusing to load a file of {ckpt}: {_unpickling_reason(result.stderr)}")
        raise RuntimeError(f"converting {ckpt} to a universal checkpoint failed:\n{result.stderr[-4000:]}")
    (tmp / COMPLETE).write_text("")
    out.parent.mkdir(parents=True, exist_ok=True)
    os.replace(tmp, out)


def load_engine(engine: Any, ckpt: Path, universal: bool) -> None:
    """Load model + optimizer (DeepSpeed files) from a checkpoint dir (or its universal conversion), every
    torch.load in DeepSpeed forced to weights_only=True."""
    src = universal_dir(ckpt) if universal else ckpt
    with safe_loading(src):
        path, _ = engine.load_checkpoint(str(src.parent), tag=src.name, load_optimizer_states=True,
                                         load_lr_scheduler_states=False, load_module_strict=True)
    if path is None:
        raise RuntimeError(f"DeepSpeed could not load the checkpoint in {src}")
    if universal:
        restore_frozen(engine.module, ckpt)


def restore_frozen(module: torch.nn.Module, ckpt: Path) -> None:
    """A universal checkpoint holds only the optimizer's parameters, so DeepSpeed leaves frozen ones (a LoRA run's
    base) at the fresh model's init: copy them from the checkpoint's consolidated weights (ZeRO-3: rank 0 reads and
    writes each gathered parameter, as train.init_from does)."""
    frozen = [(name, p) for name, p in module.named_parameters() if not p.requires_grad]
    if not frozen:
        return
    from framework.export.safetensors_io import consolidated_state_dict  # it imports this module

    zero3 = hasattr(frozen[0][1], "ds_id")
    state = consolidated_state_dict(ckpt) if dist.is_main() or not zero3 else {}
    for name, p in frozen:
        if zero3:
            import deepspeed

            with deepspeed.zero.GatheredParameters([p], modifier_rank=0):
                if dist.is_main():
                    p.data.copy_(state[name])
        else:
            p.data.copy_(state[name])


def obsolete_keys(model: torch.nn.Module) -> dict[str, str]:
    """{full key: why} of the keys older versions of the model held and this one drops: each module's
    `obsolete_keys` ({local key: why}; e.g. recipes/t2v_core.TextConditioned's `null_text`), under its prefix."""
    found = {}
    for prefix, module in model.named_modules():
        for key, why in getattr(module, "obsolete_keys", {}).items():
            found[f"{prefix}.{key}" if prefix else key] = why
    return found


def drop_obsolete(state: dict, obsolete: dict[str, str], source: str) -> dict:
    """Remove (in place) the `obsolete` keys that `state` holds, with a one-line notice each (rank 0); every other
    key is left for the caller's strict checks, so nothing else is ever dropped silently."""
    for key in [k for k in obsolete if k in state]:
        del state[key]
        if dist.is_main():
            print(f"notice: {source}: dropped the obsolete weight '{key}' ({obsolete[key]})", flush=True)
    return state


def make_head(ckpt: Path, run_dir: str) -> list[Path]:
    """An explicit `resume=` of an older checkpoint of this run makes it the newest: newer complete (and
    interrupted) checkpoints move to `checkpoints/abandoned/`, so rotation and the next `resume=auto` keep the
    rolled-back line. Rank 0 only; returns where the moved dirs went."""
    root = Path(run_dir) / "checkpoints"
    if not root.is_dir() or ckpt.resolve().parent != root.resolve():
        return []
    newer = [d for d in root.iterdir() if d.is_dir() and _TAG.fullmatch(d.name) and d.name > ckpt.name]
    moved = []
    for d in sorted(newer):
        dest = root / ABANDONED / d.name
        if dest.exists():  # rolled back past this step before: keep both
            dest = dest.with_name(f"{d.name}.{time.strftime('%Y%m%d-%H%M%S')}")
        dest.parent.mkdir(exist_ok=True)
        os.replace(d, dest)
        shutil.rmtree(universal_dir(d), ignore_errors=True)
        moved.append(dest)
    if moved:
        _atomic_write(root / "latest", ckpt.name)
    return moved
