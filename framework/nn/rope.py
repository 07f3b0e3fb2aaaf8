"""Rotary position embedding (RoPE), rotate-half convention as in Hugging Face Llama.

The angle function takes float positions so the 3-D (t/h/w bands) and seconds-based variants reuse it:
they call `rope_angles` per band with their own positions and concatenate.
"""

from __future__ import annotations

import torch
from torch import Tensor


def rope_inverse_frequencies(dim: int, theta: float = 10000.0, device: torch.device | None = None) -> Tensor:
    """Inverse frequencies theta^(-2i/dim) for i < dim/2: (dim/2,) float32."""
    if dim % 2:
        raise ValueError(f"rotary dim must be even, got dim={dim}")
    exponents = torch.arange(0, dim, 2, dtype=torch.float32, device=device) / dim
    return 1.0 / (theta**exponents)


def rope_angles(positions: Tensor, dim: int, theta: float = 10000.0) -> Tensor:
    """Rotation angles position * inv_freq for any (fractional) positions: (...,) -> (..., dim/2) float32."""
    inv_freq = rope_inverse_frequencies(dim, theta, device=positions.device)
    return positions.to(torch.float32)[..., None] * inv_freq


def rope_cos_sin(angles: Tensor) -> tuple[Tensor, Tensor]:
    """cos, sin tables in the rotate-half layout (each half repeated): (..., dim/2) -> 2 x (..., dim)."""
    emb = torch.cat((angles, angles), dim=-1)
    return emb.cos(), emb.sin()


def rope_frequencies(
    head_dim: int, max_len: int, theta: float = 10000.0, device: torch.device | None = None
) -> tuple[Tensor, Tensor]:
    """cos, sin for integer positions 0..max_len-1: 2 x (max_len, head_dim) float32."""
    positions = torch.arange(max_len, dtype=torch.float32, device=device)
    return rope_cos_sin(rope_angles(positions, head_dim, theta))


def rotate_half(x: Tensor) -> Tensor:
    """(x1, x2) -> (-x2, x1) on the last dim: (..., D) -> (..., D)."""
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rope(x: Tensor, cos: Tensor, sin: Tensor, positions: Tensor | None = None) -> Tensor:
    """Rotate x: (B, H, L, D) by cos, sin: (max_len, D); positions: None (0..L-1), (L,) or (B, L) long.

    Computed in float32 and cast back: in bf16 the rotation of far positions loses most of its precision.
    """
    if positions is None:
        cos, sin = cos[: x.shape[-2]], sin[: x.shape[-2]]
    else:
        cos, sin = cos[positions], sin[positions]
    if cos.dim() == 3:  # per-row positions (B, L, D) broadcast over heads
        cos, sin = cos[:, None], sin[:, None]
    xf = x.float()
    out = xf * cos.float() + rotate_half(xf) * sin.float()
    return out.to(x.dtype)
