"""Selective activation checkpointing, shared by every model's block loop.

`model.activation_checkpointing` is `none | full | every_k` (k in `model.activation_checkpointing_every`):
none keeps every block's activations, full recomputes every block in backward, every_k recomputes blocks
0, k, 2k, ... (what framework.memory_plan.checkpointed_blocks assumes). Configs saved when the key was a
bool still load: true reads as full, false as none.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.utils.checkpoint

from framework.config import ConfigError

MODES = ("none", "full", "every_k")
# The field's type in every model config: the bool lets old configs and presets (true/false) load; the string
# is checked by normalise_mode in each config's __post_init__, which names the key and the allowed values
# (a Literal in the Union would only say "does not match Union").
CheckpointingMode = bool | str


def normalise_mode(value: Any, every: int, key: str = "model.activation_checkpointing") -> str:
    """The mode as one of MODES (a bool from an old config mapped to full/none); a ConfigError naming the key
    for anything else, or for a k below 1."""
    if isinstance(value, bool):
        value = "full" if value else "none"
    if value not in MODES:
        raise ConfigError(f"{key}: {value!r} is not one of {list(MODES)} (or true/false)")
    if value == "every_k" and (isinstance(every, bool) or not isinstance(every, int) or every < 1):
        raise ConfigError(f"{key}_every must be an integer >= 1 for every_k, got {every!r}")
    return value


def should_checkpoint(mode: Any, every: int, block_index: int) -> bool:
    """Whether block `block_index` is recomputed in backward under `mode` (bools accepted, as set by hand)."""
    mode = normalise_mode(mode, every)
    return mode == "full" or (mode == "every_k" and block_index % every == 0)


def run_block(block: torch.nn.Module, *args: Any, checkpoint: bool) -> Any:
    """block(*args), its activations recomputed in backward when `checkpoint`. Non-reentrant: tuple outputs,
    inputs that need no gradient and ZeRO-3's gathered parameters all work, and the gradients equal the plain
    ones."""
    if checkpoint:
        return torch.utils.checkpoint.checkpoint(block, *args, use_reentrant=False)
    return block(*args)


def drop_checkpointing_keys(tree: Any) -> Any:
    """A config dict without its activation_checkpointing* keys, at any depth (model.wan's too): they shape no
    weight, so init_from must not compare them (and an old checkpoint's false must not clash with none)."""
    if not isinstance(tree, dict):
        return tree
    return {k: drop_checkpointing_keys(v) for k, v in tree.items() if not k.startswith("activation_checkpointing")}
