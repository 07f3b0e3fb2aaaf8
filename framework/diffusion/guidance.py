"""Classifier-free guidance (Ho & Salimans 2022): condition dropout in training, guided model_fn at sampling.

One convention for every recipe (diffusers' `guidance_scale`): guided = uncond + s (cond - uncond), so
s = 1 is guidance off (exactly the conditional output, no unconditional pass) and s = 0 is exactly the
unconditional output. LLaDA's published `cfg_scale = w` (uncond + (w + 1)(cond - uncond)) is s = w + 1.

Conditions are dicts of tensors batched on dim 0, passed as ``model_fn(x, t, **cond)``. Training replaces
the dropped rows by a null condition (a learned or zero embedding) so one model learns both p(x|c) and p(x).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

ModelFn = Callable[..., Any]  # model_fn(x (B, ...), t (B,), **cond) -> tensor, or a tuple / dict of tensors
Scale = float | Mapping[str, float]  # a mapping gives each output key (modality) its own scale


@dataclass(frozen=True, eq=False)
class Guidance:
    """Sampling-time CFG: scale (1 = off: conditional only; 0 = unconditional; or one per output key) and the
    null condition."""

    scale: Scale
    null_cond: Mapping[str, Tensor]


def drop_condition(batch: int, p: float, gen: torch.Generator) -> Tensor:
    """Keep mask (B,) bool on gen's device: each row's condition is dropped with probability p."""
    if not 0.0 <= p <= 1.0:
        raise ValueError(f"condition dropout probability must be in [0, 1], got {p}")
    # Always one draw per row, so the generator advances the same way whatever p is.
    return torch.rand(batch, generator=gen, device=gen.device) >= p


def replace_dropped(cond: Tensor, null: Tensor, keep: Tensor) -> Tensor:
    """Rows of cond (B, ...) where keep (B,) is False become null (1 or B, ...): (B, ...)."""
    keep = keep.to(cond.device).view(-1, *([1] * (cond.ndim - 1)))
    return torch.where(keep, cond, null.to(device=cond.device, dtype=cond.dtype))


def cfg_combine(cond_out: Any, uncond_out: Any, scale: Scale) -> Any:
    """uncond + scale * (cond - uncond), leaf by leaf for tuples and dicts of tensors (one per modality).

    Exact at both ends: scale 1 returns cond itself and 0 uncond itself (the formula would round both)."""
    if isinstance(cond_out, Mapping):
        if isinstance(scale, Mapping) and set(scale) != set(cond_out):
            raise KeyError(f"guidance scales are given for {sorted(scale)}, the model outputs {sorted(cond_out)}")
        return {
            k: cfg_combine(cond_out[k], uncond_out[k], scale[k] if isinstance(scale, Mapping) else scale)
            for k in cond_out
        }
    if isinstance(scale, Mapping):
        raise TypeError(f"per-key guidance scales {dict(scale)} need a model that returns a dict")
    if isinstance(cond_out, tuple | list):
        return type(cond_out)(cfg_combine(c, u, scale) for c, u in zip(cond_out, uncond_out))
    if scale == 1.0:
        return cond_out
    if scale == 0.0:
        return uncond_out
    return uncond_out + scale * (cond_out - uncond_out)


def _split(out: Any, batch: int) -> tuple[Any, Any]:
    """Split a 2B-batched output (tensor, tuple or dict of tensors) into its conditional and null halves."""
    if isinstance(out, Mapping):
        halves = {k: _split(v, batch) for k, v in out.items()}
        return {k: h[0] for k, h in halves.items()}, {k: h[1] for k, h in halves.items()}
    if isinstance(out, tuple | list):
        halves = [_split(v, batch) for v in out]
        return type(out)(h[0] for h in halves), type(out)(h[1] for h in halves)
    return out[:batch], out[batch:]


def _null_rows(key: str, value: Tensor, null: Tensor, batch: int) -> Tensor:
    """The null condition for key broadcast to value's batch; shapes past dim 0 must agree."""
    if null.shape[1:] != value.shape[1:] or null.shape[0] not in (1, batch):
        raise ValueError(
            f"null condition {key!r} has shape {tuple(null.shape)}, expected (1 or {batch}, "
            f"{', '.join(map(str, value.shape[1:]))}) like the condition"
        )
    return null.to(device=value.device, dtype=value.dtype).expand_as(value)


def guided(model_fn: ModelFn, scale: Scale, null_cond: Mapping[str, Tensor]) -> ModelFn:
    """A model_fn giving uncond + scale * (cond - uncond) from ONE forward over the batch 2B.

    Keys of cond missing from null_cond (masks, sizes) are repeated unchanged in the null half.
    scale == 1 (every scale 1, for per-key scales) skips the null pass entirely.
    """
    conditional_only = all(s == 1.0 for s in scale.values()) if isinstance(scale, Mapping) else scale == 1.0

    def fn(x: Tensor, t: Tensor, **cond: Tensor) -> Any:
        if conditional_only:
            return model_fn(x, t, **cond)
        b = x.shape[0]
        unknown = set(null_cond) - set(cond)
        if unknown:
            raise KeyError(f"null_cond keys {sorted(unknown)} are not in the condition keys {sorted(cond)}")
        both = {
            k: torch.cat([v, _null_rows(k, v, null_cond[k], b) if k in null_cond else v]) for k, v in cond.items()
        }
        out = model_fn(torch.cat([x, x]), torch.cat([t, t]), **both)
        cond_out, uncond_out = _split(out, b)
        return cfg_combine(cond_out, uncond_out, scale)

    return fn
