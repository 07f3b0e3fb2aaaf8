"""Consolidated weights from a (possibly ZeRO-sharded) checkpoint, written as safetensors."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from framework import checkpoint
from framework.ema import consolidate


def consolidated_state_dict(ckpt: Path, use_ema: bool = False) -> dict[str, torch.Tensor]:
    """Full fp32 weights of the trainable model: the EMA, or the live weights of any ZeRO stage. Every file is
    loaded with weights_only=True (checkpoint.safe_loading): one that would run code is refused unread."""
    meta = checkpoint.read_meta(ckpt)
    with checkpoint.safe_loading(ckpt):
        if use_ema:
            states = checkpoint.trainer_states(ckpt)
            if states[0]["ema"] is None:
                raise ValueError(f"{ckpt} holds no EMA (train with ema.decay > 0 to export --ema)")
            return {k: v.float().contiguous() for k, v in consolidate([s["ema"] for s in states]).items()}
        if meta["zero_stage"] == 0:
            module = torch.load(ckpt / "mp_rank_00_model_states.pt", map_location="cpu", weights_only=True)["module"]
            return {k: v.float().contiguous() for k, v in module.items()}
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

        # DeepSpeed's reader passes weights_only=False; safe_loading forces it back to True.
        state = get_fp32_state_dict_from_zero_checkpoint(str(ckpt.parent), tag=ckpt.name)
    return {k: v.float().contiguous() for k, v in state.items()}


def untie(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """safetensors refuses tensors that share memory (tied embeddings): give each its own copy."""
    seen: set[int] = set()
    out = {}
    for name, t in state.items():
        ptr = t.untyped_storage().data_ptr()
        out[name] = t.clone() if ptr in seen else t
        seen.add(ptr)
    return out


def write(state: dict[str, torch.Tensor], config: dict, out_dir: str | Path) -> Path:
    """`model.safetensors` + `config.json` (recipe, model config, step) in `out_dir`."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    save_file(untie(state), out / "model.safetensors", metadata={"format": "pt"})
    (out / "config.json").write_text(json.dumps(config, indent=1))
    return out / "model.safetensors"


def read(export_dir: str | Path) -> tuple[dict[str, torch.Tensor], dict]:
    """Inverse of `write`: (state dict, config)."""
    d = Path(export_dir)
    return load_file(d / "model.safetensors"), json.loads((d / "config.json").read_text())
