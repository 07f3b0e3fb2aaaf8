"""`train.init_from=PATH`: start a fresh run from weights made elsewhere (a checkpoint, a run, an export).

Only a fresh run is initialised this way. When the run resumes from a checkpoint of its own (`resume=auto`
after a preemption), the checkpoint wins, so a requeued job never falls back to the initial weights.

The weights go into the freshly built model before DeepSpeed wraps it, so the optimizer's fp32 master copy
starts from them (under bf16 from their bf16 rounding, as for any bf16 engine). Under ZeRO-3 the model is
already partitioned: rank 0 alone reads the file and each parameter is gathered, overwritten on rank 0 and
re-partitioned (`GatheredParameters(modifier_rank=0)`), so no rank ever holds two full copies.

A LoRA run (or one of its checkpoints) as the source: a run without LoRA starts from the merged weights
(base + alpha/rank B A, what the source computes); a run whose `lora` section equals the source's (targets
compared after the recipe's defaults) starts from the same base and the same adapters, injected before loading;
any other LoRA run is a ConfigError naming the differing `lora.*` keys.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import torch

from framework import checkpoint, lora
from framework import distributed as dist
from framework.config import ConfigError, LoraConfig, RunConfig, from_dict, to_dict
from framework.nn.checkpointing import drop_checkpointing_keys


def check_model_config(run: dict, found: dict, source: str | Path, ignore: tuple[str, ...] = ()) -> None:
    """ConfigError naming every `model.*` key whose value differs between the run and the source.

    Keys missing on either side are not compared (strict key and shape checks of the weights follow)."""
    run, found = drop_checkpointing_keys(run), drop_checkpointing_keys(found)
    diffs = [f"model.{k}: {run[k]} in the run config but {found[k]} in {source}"
             for k in run if k in found and k not in ignore and found[k] != run[k]]
    if diffs:
        raise ConfigError("train.init_from: the model config differs: " + "; ".join(diffs))


def read_ours(path: str, cfg: RunConfig, ignore: tuple[str, ...] = ()) -> dict[str, torch.Tensor]:
    """Weights of a checkpoint dir, a run dir (its newest complete checkpoint) or a safetensors export folder,
    after checking the recipe and the model config (keys in `ignore` may differ)."""
    from framework.export import safetensors_io

    p = Path(path)
    export = (p / "model.safetensors").is_file() and (p / "config.json").is_file()
    if export:
        state, config = safetensors_io.read(p)
        source, recipe, model = p / "config.json", config.get("recipe"), config.get("model")
    else:
        try:
            ckpt = checkpoint.resolve(str(p), "")
        except FileNotFoundError as e:
            raise ConfigError(f"train.init_from: {path} is not a checkpoint, a run directory or an export folder "
                              f"({e})") from None
        meta = checkpoint.read_meta(ckpt)
        source, recipe, model = ckpt / "meta.json", meta.get("recipe"), meta["config"].get("model")
    if recipe != cfg.recipe:
        raise ConfigError(f"train.init_from: {source} holds a {recipe or 'non-framework'} model, not one of recipe "
                          f"'{cfg.recipe}'")
    # `causal` (the LLaDA recipe's AR twin) shapes no weight: an AR run starts a masked diffusion model (the
    # DiffuLLaMA / Dream adaptation) and a masked run may start an AR twin.
    check_model_config(to_dict(cfg).get("model") or {}, model or {}, source, (*ignore, "causal"))
    if export:
        return state
    state = safetensors_io.consolidated_state_dict(ckpt)
    found = meta["config"].get("lora") or {}
    return _from_lora_run(state, cfg, found, source) if found.get("rank", 0) > 0 else state


def lora_section(path: str) -> dict | None:
    """The `lora` section of the run or checkpoint at `path` when it trained adapters; None for anything else
    (read_ours reports what is wrong with a path that is no source at all)."""
    try:
        found = checkpoint.read_meta(checkpoint.resolve(str(path), ""))["config"].get("lora") or {}
    except (OSError, ValueError, KeyError, AttributeError):
        return None
    return found if found.get("rank", 0) > 0 else None


def _from_lora_run(state: dict[str, torch.Tensor], cfg: RunConfig, found: dict, source) -> dict[str, torch.Tensor]:
    """A LoRA run's weights for this run: merged when it has no LoRA, as they are when its lora section is the
    source's (the model already holds the adapters: `load` injects them)."""
    if cfg.lora.rank == 0:
        return lora.merge(*lora.split_state(state), from_dict(LoraConfig, found))
    _check_same_lora(cfg, found, source)
    return state


def _check_same_lora(cfg: RunConfig, found: dict, source) -> None:
    """ConfigError naming every `lora.*` key that differs (targets after each side's defaults)."""
    theirs_cfg = dataclasses.replace(cfg, lora=from_dict(LoraConfig, found))
    ours = {**to_dict(cfg.lora), "targets": lora.targets(cfg)}
    theirs = {**to_dict(theirs_cfg.lora), "targets": lora.targets(theirs_cfg)}
    diffs = [f"lora.{k}: {ours[k]} in the run config but {theirs[k]} in {source}" for k in ours if ours[k] != theirs[k]]
    if diffs:
        raise ConfigError("train.init_from: a LoRA run continues only with the same lora section (or none, which "
                          "starts from its merged weights): " + "; ".join(diffs))


def load(recipe: Any, cfg: RunConfig, model: torch.nn.Module) -> str:
    """Collective, on every rank: copy `recipe.initial_weights(cfg, cfg.train.init_from)` into the freshly
    built `model`. A failure on any rank is raised on every rank (as ConfigError, so the launcher exits 2).
    Returns a line for the log."""
    path, zero3 = cfg.train.init_from, cfg.train.zero_stage == 3
    found = lora_section(path) if cfg.lora.rank > 0 else None
    if found is not None:  # the same adapters continue: inject them now (every rank) so their weights load
        _check_same_lora(cfg, found, path)
        lora.apply(model, cfg)
    state, error = None, None
    if not zero3 or dist.is_main():
        try:
            state = _fill_tied(model, recipe.initial_weights(cfg, path))
            checkpoint.drop_obsolete(state, checkpoint.obsolete_keys(model), f"train.init_from={path}")
            _check_keys(model, state, path)
        except ConfigError as e:  # an unsafe checkpoint file too (checkpoint.UnsafeCheckpointError)
            error = str(e) if str(e).startswith("train.init_from") else f"train.init_from={path}: {e}"
        except Exception as e:  # unreadable files: the value of train.init_from is still what to fix
            error = f"train.init_from: reading {path} failed: {type(e).__name__}: {e}"
    errors = [error]
    if dist.world() > 1:
        errors = [None] * dist.world()
        torch.distributed.all_gather_object(errors, error)
    first = next((e for e in errors if e), None)
    if first:
        raise ConfigError(first)

    if zero3:
        import deepspeed

        for name, param in model.named_parameters():  # one gathered parameter at a time
            with deepspeed.zero.GatheredParameters([param], modifier_rank=0):
                if dist.is_main():
                    param.data.copy_(state[name])
            # LoRA adapters are not partitioned yet, so only rank 0 copied them; DeepSpeed broadcasts rank 0's
            # values when it partitions them in `initialize` (tested: tests/dist/test_video_lora_dist.py).
    else:
        model.load_state_dict(state, strict=True)
    if state is None:
        return ""
    params = dict(model.named_parameters())  # tied weights once
    n = sum(t.numel() for name, t in state.items() if name in params)
    return f"initialised from {path} ({len(params)} tensors, {n / 1e6:.2f}M parameters)"


def _fill_tied(model: torch.nn.Module, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A tied weight stored once (EMA exports, HF folders) also goes under the model's other names for it."""
    first: dict[int, str] = {}
    for name, t in model.state_dict(keep_vars=True).items():
        source = first.setdefault(id(t), name)
        if name not in state and source in state:
            state[name] = state[source]
    return state


def _check_keys(model: torch.nn.Module, state: dict[str, torch.Tensor], path: str) -> None:
    """Same names and shapes as the model's state dict (ZeRO-3 partitions report their full `ds_shape`)."""
    expected = {name: tuple(getattr(t, "ds_shape", t.shape)) for name, t in model.state_dict(keep_vars=True).items()}
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    shapes = [f"{k} {tuple(state[k].shape)} vs {expected[k]}" for k in expected
              if k in state and tuple(state[k].shape) != expected[k]]
    problems = [f"{what}: {', '.join(items[:5])}{' ...' if len(items) > 5 else ''}"
                for what, items in (("missing", missing), ("unexpected", unexpected),
                                    ("shape (file vs model)", shapes)) if items]
    if problems:
        raise ConfigError(f"train.init_from: the weights in {path} do not fit the model: " + "; ".join(problems))
