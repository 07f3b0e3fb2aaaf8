"""Loading a trained run for sampling or evaluation in one process: config, recipe and consolidated weights."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from framework import checkpoint, lora
from framework.config import RunConfig
from framework.export.safetensors_io import consolidated_state_dict
from framework.recipe import Recipe, load_run_config


@dataclass
class Trained:
    cfg: RunConfig
    recipe: Recipe
    model: Any  # the recipe's module, weights loaded, on the CPU
    checkpoint: Path
    meta: dict
    ema: bool  # the weights are the run's EMA


def load_trained(path: str, overrides: list[str] | None = None, use_ema: bool = True) -> Trained:
    """A run dir (its newest complete checkpoint) or checkpoint dir -> Trained; the EMA weights when the run
    kept an EMA and use_ema. Raises ConfigError / FileNotFoundError / ValueError with the reason."""
    ckpt = checkpoint.resolve(path, "")
    meta = checkpoint.read_meta(ckpt)
    cfg, recipe = load_run_config(meta["config"], list(overrides or []), world=1)
    ema = use_ema and checkpoint.trainer_states(ckpt)[0].get("ema") is not None
    model = recipe.build_model(cfg).model
    lora.apply(model, cfg, cast_frozen=False)  # a LoRA run's checkpoint holds peft's module names
    state = consolidated_state_dict(ckpt, use_ema=ema)
    if ema and cfg.lora.rank > 0:  # its EMA averages the trainable weights only: the adapters
        state = {**consolidated_state_dict(ckpt), **state}
    model.load_state_dict(state)
    return Trained(cfg, recipe, model, ckpt, meta, ema)
