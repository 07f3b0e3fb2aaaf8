"""Typed run configuration: dataclass trees, YAML presets, `key.sub=value` overrides, validation.

A preset is a YAML file that names its recipe (`recipe: llada`); the recipe supplies the dataclass
type of the whole tree (a subclass of `RunConfig` whose `model` and `data` fields are its own), so
every key is checked against a real field before any work starts.
"""

from __future__ import annotations

import dataclasses
import difflib
import errno
import math
import os
import shutil
import socket
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
    # Ulysses sequence parallelism: each sequence split this many ways inside groups of as many ranks
    # (data parallel = world / sequence_parallel). 1 = off.
    sequence_parallel: int = 1


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
    # Unset (null): the WANDB_MODE environment variable if set, else offline. A value here wins over the env.
    wandb: Literal["offline", "online", "disabled"] | None = None
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
class LoraConfig:
    """LoRA adapters through peft (framework/lora.py): rank 0 trains the whole model as before."""

    rank: int = 0  # 0 = off
    alpha: float = 16.0  # the adapter's update is scaled by alpha / rank
    dropout: float = 0.0  # on the adapter's input
    # Linear modules to adapt: a full module name, a name's last parts (`wq`, `attn.wq`, peft's rule) or a shell
    # glob over full names (`blocks.*.ffn.w?`); a pattern matching no module is a config error.
    targets: list[str] = field(default_factory=list)


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
    lora: LoraConfig = field(default_factory=LoraConfig)

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
        if len(rest := [a for a in args if a is not type(None)]) == 1:  # Optional[X]: X's own message
            return _coerce(value, rest[0], key)
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


def _renamed_key(cls: type, data: dict, name: str, prefix: str) -> str:
    """The current name of a key `cls.RENAMED_KEYS` lists under an old one (configs saved before a rename load,
    with a warning); a ConfigError when the old and the new name are both given."""
    new = cls.RENAMED_KEYS[name]
    if new in data:
        raise ConfigError(f"'{prefix}{name}' is the old name of '{prefix}{new}'; give only '{prefix}{new}'")
    print(f"warning: config key '{prefix}{name}' is now '{prefix}{new}'; read as such", flush=True)
    return new


def from_dict(cls: type, data: dict, prefix: str = "") -> Any:
    """Build dataclass `cls` from a nested dict, rejecting unknown keys and wrong types."""
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    kwargs = {}
    for name, value in data.items():
        if name not in names and name in getattr(cls, "RENAMED_KEYS", {}):
            name = _renamed_key(cls, data, name, prefix)
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
    try:
        return key.split("."), yaml.safe_load(raw) if raw != "" else ""
    except yaml.YAMLError as e:
        raise ConfigError(f"{key}: {raw!r} is not a valid YAML value ({_yaml_problem(e)})") from None


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


def _yaml_problem(e: yaml.YAMLError) -> str:
    """PyYAML's complaint in one line (its str() spans four, with a caret)."""
    problem = getattr(e, "problem", None) or str(e).splitlines()[0]
    return problem + (" (YAML indents with spaces; tabs are not allowed)" if "'\\t'" in problem else "")


def read_preset(path: str | os.PathLike) -> dict:
    """Load a YAML preset; a missing, unreadable or malformed file or a non-mapping is a ConfigError naming it."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"preset file not found: {p}")
    try:
        text = p.read_text()
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"{p}: cannot read the preset: {e}") from None
    try:
        data = yaml.safe_load(text) or {}
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        lines = text.splitlines()
        at = f":{mark.line + 1}" if mark is not None else ""
        shown = f": {lines[mark.line].strip()!r}" if mark is not None and mark.line < len(lines) else ""
        raise ConfigError(f"{p}{at}: invalid YAML: {_yaml_problem(e)}{shown}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{p}: a preset must be a mapping of config keys")
    return data


def _at_least(key: str, value: float, low: float, note: str = "") -> None:
    """`value` must be a finite number >= low (NaN fails every comparison, so test finiteness first)."""
    if not math.isfinite(value) or value < low:
        raise ConfigError(f"{key} must be >= {low:g}{note}, got {value}")


def _in_range(key: str, value: float, low: float, high: float, high_open: bool = False) -> None:
    ok = math.isfinite(value) and low <= value and (value < high if high_open else value <= high)
    if not ok:
        raise ConfigError(f"{key} must be in [{low:g}, {high:g}{')' if high_open else ']'}, got {value}")


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
    _check_ranges(cfg)


def _check_ranges(cfg: RunConfig) -> None:
    """Values torch, DeepSpeed or the loop would reject late (after the model is built) or misread silently."""
    t, o = cfg.train, cfg.optim
    # numpy's seeding (data order, SeedSequence) rejects negative seeds; torch's takes at most 64 bits.
    _in_range("train.seed", t.seed, 0, 2**63 - 1)
    _at_least("train.grad_clip", t.grad_clip, 0, " (0 disables clipping)")
    _at_least("train.stop_after", t.stop_after, 0, " (0 runs to train.steps)")
    _at_least("train.max_bad_steps", t.max_bad_steps, 1)
    if not math.isfinite(t.collective_timeout_minutes) or t.collective_timeout_minutes <= 0:
        raise ConfigError(f"train.collective_timeout_minutes must be positive, got {t.collective_timeout_minutes}")
    _at_least("optim.lr", o.lr, 0)
    _at_least("optim.eps", o.eps, 0)
    _at_least("optim.weight_decay", o.weight_decay, 0)
    if len(o.betas) != 2:
        raise ConfigError(f"optim.betas must have two values, got {o.betas}")
    for i, beta in enumerate(o.betas):
        _in_range(f"optim.betas[{i}]", beta, 0, 1, high_open=True)
    _at_least("optim.warmup_steps", o.warmup_steps, 0)
    _in_range("optim.min_lr_ratio", o.min_lr_ratio, 0, 1)
    _in_range("ema.decay", cfg.ema.decay, 0, 1, high_open=True)
    _at_least("ema.start_step", cfg.ema.start_step, 0)
    _at_least("checkpoint.every", cfg.checkpoint.every, 0, " (0 saves at the end only)")
    _at_least("checkpoint.keep_last", cfg.checkpoint.keep_last, 1)
    _at_least("log.every", cfg.log.every, 1)
    _at_least("log.peak_tflops", cfg.log.peak_tflops, 0, " (0 looks the GPU up)")
    _at_least("eval.every", cfg.eval.every, 0, " (0 evaluates at the end only)")
    _at_least("eval.batches", cfg.eval.batches, 1)
    _at_least("eval.samples", cfg.eval.samples, 0)
    _at_least("eval.micro_batch", cfg.eval.micro_batch, 0, " (0 uses train.micro_batch)")
    _check_lora(cfg.lora, cfg.recipe)


def _check_lora(lora: LoraConfig, recipe: str = "") -> None:
    """Ranges peft would accept silently or fail on late (alpha 0 trains nothing; dropout 1 drops every input)."""
    _at_least("lora.rank", lora.rank, 0, " (0 disables LoRA)")
    if not math.isfinite(lora.alpha) or lora.alpha <= 0:
        raise ConfigError(f"lora.alpha must be positive, got {lora.alpha}")
    _in_range("lora.dropout", lora.dropout, 0, 1, high_open=True)
    if lora.rank > 0 and not [t for t in lora.targets if t.strip()]:
        from framework.lora import has_default_targets  # lazily: framework.lora imports this module

        if not has_default_targets(recipe):  # the transformer recipes adapt their blocks by default
            raise ConfigError("lora.targets must name at least one module pattern when lora.rank > 0, "
                              "e.g. lora.targets=[wq,wk,wv,wo]")


# ---------------------------------------------------------------------------------------------
# Checks that touch the file system: launch/train.py runs them on every rank before any work.


def check_run_dir(run_dir: str) -> None:
    """Create `run_dir`, then write, fsync and delete a probe file in it (one per process), so a read-only,
    full or missing disk is named now rather than at the first checkpoint (where a full disk surfaces as
    `basic_ios::clear: iostream error` from torch.save)."""
    path = Path(run_dir)
    probe = path / f".write_probe.{socket.gethostname()}.{os.getpid()}"
    try:
        path.mkdir(parents=True, exist_ok=True)
        fd = os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            os.write(fd, b"\0" * 4096)  # a whole block: an empty file needs no free space
            os.fsync(fd)  # delayed allocation reports ENOSPC only here on some file systems
        finally:
            os.close(fd)
    except OSError as e:
        code = errno.errorcode.get(e.errno, str(e.errno))
        raise ConfigError(f"run_dir={run_dir}: cannot write there: {e.strerror} ({code}); {disk_note(path)}") from None
    finally:
        try:
            probe.unlink()
        except OSError:
            pass


def disk_note(path: Path) -> str:
    """'the disk mounted at M has F free of T' for the file system that holds `path` (or would)."""
    existing = path.absolute()
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    while existing.is_file():
        existing = existing.parent
    mount = existing
    while not os.path.ismount(mount) and mount != mount.parent:
        mount = mount.parent
    try:
        usage = shutil.disk_usage(existing)
    except OSError:
        return f"the disk mounted at {mount}"
    return f"the disk mounted at {mount} has {_bytes(usage.free)} free of {_bytes(usage.total)}"


def _bytes(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n} B"
