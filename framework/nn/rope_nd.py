"""Multi-axis rotary embedding: the head dimension is split into bands, one per axis (t, h, w, ...).

Each band rotates by its own axis' position, so attention between two tokens depends only on their
offsets along every axis. Positions may be fractional (seconds, for the joint audio-video model).
Layout matches `framework.nn.rope.apply_rope` (rotate-half): pair (i, i + D/2) shares angle i, and
angle i belongs to the band that owns it.
"""

from __future__ import annotations

import torch
from torch import Tensor

from framework.nn.rope import rope_angles, rope_cos_sin


def default_bands(head_dim: int, axes: int = 3) -> list[int]:
    """Rotation pairs per axis; like Wan2.1, time gets the remainder and space shares the rest evenly."""
    if head_dim % 2:
        raise ValueError(f"head_dim={head_dim} must be even for RoPE")
    pairs = head_dim // 2
    spatial = pairs // axes
    return [pairs - (axes - 1) * spatial] + [spatial] * (axes - 1)


def rope_nd(positions: Tensor, bands: list[int], theta: float = 10000.0) -> tuple[Tensor, Tensor]:
    """positions: (..., A) per-axis positions -> (cos, sin), each (..., 2 * sum(bands))."""
    if positions.shape[-1] != len(bands):
        raise ValueError(f"positions have {positions.shape[-1]} axes but {len(bands)} bands were given")
    angles = [rope_angles(positions[..., a], 2 * n, theta) for a, n in enumerate(bands) if n > 0]
    return rope_cos_sin(torch.cat(angles, dim=-1))


def grid_positions(t: int, h: int, w: int, device: torch.device | None = None) -> Tensor:
    """(t*h*w, 3) integer positions of a token grid in (t, h, w) raster order, as floats."""
    axes = [torch.arange(n, device=device, dtype=torch.float32) for n in (t, h, w)]
    return torch.stack(torch.meshgrid(*axes, indexing="ij"), dim=-1).reshape(-1, 3)
