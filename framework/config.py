"""Typed run configuration: dataclass trees, YAML presets, `key.sub=value` overrides, validation.

A preset is a YAML file that names its recipe (`recipe: llada`); the recipe supplies the dataclass
type of the whole tree (a subclass of `RunConfig` whose `model` and `data` fields are its own), so
every key is checked against a real field before any work starts.
"""

from __future__ import annotations

import dataclasses
import difflib
import os
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml


class ConfigError(ValueError):
    """A config key, value or combination is invalid; the message names the key."""


@dataclass
class TrainConfig:
    steps: int = 100
    global_batch: int = 8  # sequences (or clips) per optimizer step, summed over ranks and micro-steps
    micro_batch: int = 4  # per rank, per forward/backward
    seed: int = 0
    precision: Literal["fp32", "bf16"] = "fp32"
    zero_stage: int = 2
    offload_optimizer: bool = False  # ZeRO-Offload of optimizer states to CPU memory
    grad_clip: float = 1.0  # 0 disables clipping
    stop_after: int = 0  # stop (with a checkpoint) after this many steps of this invocation; 0 = run to the end
    # Start a fresh run from these weights: a checkpoint or run dir, a safetensors export, or what the recipe
    # adds (LLaDA: a Hugging Face folder). Ignored when resuming from the run's own checkpoint: resume wins.
    init_from: str = ""
    # Stop (naming the step) after this many consecutive optimizer steps with a non-finite loss or grad norm;
    # a non-finite model is never saved.
    max_bad_steps: int = 3
    # A collective that waits longer than this (a frozen or dead rank) ends the run with a message.
    collective_timeout_minutes: float = 10.0


@dataclass
class OptimConfig:
    lr: float = 3e-4
    betas: list[float] = field(default_factory=lambda: [0.9, 0.95])
    eps: float = 1e-8
    weight_decay: float = 0.1
    warmup_steps: int = 10
    schedule: Literal["cosine", "constant"] = "cosine"
    min_lr_ratio: float = 0.1  # cosine decays to lr * min_lr_ratio at the last step


@dataclass
class EmaConfig:
    decay: float = 0.0  # 0 disables the EMA of the weights
    start_step: int = 0


@dataclass
class CheckpointConfig:
    every: int = 0  # steps between saves; 0 saves only at the end (and on preemption)
    keep_last: int = 3
    at_end: bool = True  # false: no final save (benchmarks); preemption still saves


@dataclass
class LogConfig:
    every: int = 1
    wandb: Literal["offline", "online", "disabled"] = "offline"
    project: str = "difftrain"
    progress: bool = True
    peak_tflops: float = 0.0  # per device; 0 looks the GPU up in a table (no MFU on CPU)


@dataclass
class EvalConfig:
    every: int = 0  # steps between evaluations; 0 evaluates only at the end
    batches: int = 4  # held-out batches per rank
    samples: int = 2  # samples generated at each evaluation
    micro_batch: int = 0  # per rank; 0 = train.micro_batch (lower it for a small held-out set)
    at_end: bool = True


@dataclass
class RunConfig:
    """The parts every recipe shares; a recipe subclasses it to type `model` and `data`."""

    recipe: str = ""
    run_dir: str = "runs/default"
    resume: str = ""  # "" (fresh), "auto" (newest complete checkpoint, fresh if none) or a checkpoint path
    train: TrainConfig = field(default_factory=TrainConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    ema: EmaConfig = field(default_factory=EmaConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    log: LogConfig = field(default_factory=LogConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)

    def grad_accum(self, world: int) -> int:
        """Micro-steps per optimizer step on each rank."""
        return self.train.global_batch // (self.train.micro_batch * world)


# ---------------------------------------------------------------------------------------------
# dict -> dataclass with type checks


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Check (and gently convert) one value against a type hint; raise ConfigError naming the key."""
    origin = typing.get_origin(tp)
    if tp is Any:
        return value
    if origin is Literal:
        allowed = typing.get_args(tp)
        if value not in allowed:
            raise ConfigError(f"{key}: {value!r} is not one of {list(allowed)}")
        return value
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, key)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(f"{key}: {value!r} does not match {_type_name(tp)}")
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key}: expected a list, got {value!r}")
        (item_tp, *_) = typing.get_args(tp) or (Any,)
        return [_coerce(v, item_tp, f"{key}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping, got {value!r}")
        return dict(value)
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping of {sorted(f.name for f in dataclasses.fields(tp))}")
        return from_dict(tp, value, prefix=f"{key}.")
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false", "1", "0", "yes", "no"):
            return value.lower() in ("true", "1", "yes")
        raise ConfigError(f"{key}: expected true/false, got {value!r}")
    if tp is int:
        if isinstance(value, bool):
            raise ConfigError(f"{key}: expected an integer, got {value!r}")
        if isinstance(value, int):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        if isinstance(value, str):
            try:
                return int(value)
            except ValueError:
                pass
        raise ConfigError(f"{key}: expected an integer, got {value!r}")
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):
            try:  # YAML 1.1 reads "1e-3" as a string
                return float(value)
            except ValueError:
                pass
        raise ConfigError(f"{key}: expected a number, got {value!r}")
    if tp is str:
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            return str(value)
        raise ConfigError(f"{key}: expected a string, got {value!r}")
    return value


def _unknown_key_error(key: str, name: str, valid: list[str]) -> ConfigError:
    close = difflib.get_close_matches(name, valid, n=1)
    hint = f"; did you mean '{key[: len(key) - len(name)]}{close[0]}'?" if close else ""
    return ConfigError(f"unknown config key '{key}'{hint} (valid here: {', '.join(sorted(valid))})")


def from_dict(cls: type, data: dict, prefix: str = "") -> Any:
    """Build dataclass `cls` from a nested dict, rejecting unknown keys and wrong types."""
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    kwargs = {}
    for name, value in data.items():
        if name not in names:
            raise _unknown_key_error(prefix + name, name, names)
        kwargs[name] = _coerce(value, hints[name], prefix + name)
    return cls(**kwargs)


def to_dict(cfg: Any) -> dict:
    """Plain nested dict of a config (for YAML, JSON and checkpoints)."""
    return dataclasses.asdict(cfg)


# ---------------------------------------------------------------------------------------------
# YAML presets and command-line overrides


def parse_override(text: str) -> tuple[list[str], Any]:
    """`train.steps=10` -> (["train", "steps"], 10); values are read as YAML scalars or lists."""
    if "=" not in text:
        raise ConfigError(f"override {text!r} is not of the form key.sub=value")
    key, raw = text.split("=", 1)
    if not key or any(not part for part in key.split(".")):
        raise ConfigError(f"override {text!r} has an empty key part")
    return key.split("."), yaml.safe_load(raw) if raw != "" else ""


def apply_overrides(tree: dict, overrides: list[str]) -> dict:
    """Set each `a.b.c=value` in a nested dict (creating mappings as needed; types are checked later)."""
    for text in overrides:
        path, value = parse_override(text)
        node = tree
        for part in path[:-1]:
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                raise ConfigError(f"override {text!r}: '{part}' is a value, not a section")
            node = child
        node[path[-1]] = value
    return tree


def read_preset(path: str | os.PathLike) -> dict:
    """Load a YAML preset; a missing file or a non-mapping is a ConfigError naming the file."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"preset file not found: {p}")
    data = yaml.safe_load(p.read_text()) or {}
    if not isinstance(data, dict):
        raise ConfigError(f"{p}: a preset must be a mapping of config keys")
    return data


def check_common(cfg: RunConfig, world: int) -> None:
    """Impossible combinations shared by all recipes; each error names the key to change."""
    t = cfg.train
    for key, value in (("train.steps", t.steps), ("train.micro_batch", t.micro_batch),
                       ("train.global_batch", t.global_batch)):
        if value <= 0:
            raise ConfigError(f"{key} must be positive, got {value}")
    if t.global_batch % (t.micro_batch * world) != 0:
        raise ConfigError(
            f"train.global_batch={t.global_batch} is not divisible by train.micro_batch ({t.micro_batch}) x "
            f"world size ({world}) = {t.micro_batch * world}; valid global batches are multiples of "
            f"{t.micro_batch * world}")
    if t.zero_stage not in (0, 1, 2, 3):
        raise ConfigError(f"train.zero_stage must be 0, 1, 2 or 3, got {t.zero_stage}")
    if t.init_from and not Path(t.init_from).exists():
        raise ConfigError(f"train.init_from: {t.init_from} does not exist")
    if t.offload_optimizer and t.zero_stage == 0:
        raise ConfigError("train.offload_optimizer needs train.zero_stage >= 1")
    if not 0.0 <= cfg.ema.decay < 1.0:
        raise ConfigError(f"ema.decay must be in [0, 1), got {cfg.ema.decay}")
    if cfg.checkpoint.keep_last < 1:
        raise ConfigError(f"checkpoint.keep_last must be >= 1, got {cfg.checkpoint.keep_last}")
    if cfg.optim.warmup_steps < 0:
        raise ConfigError(f"optim.warmup_steps must be >= 0, got {cfg.optim.warmup_steps}")
    if len(cfg.optim.betas) != 2:
        raise ConfigError(f"optim.betas must have two values, got {cfg.optim.betas}")
