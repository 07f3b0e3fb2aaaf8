"""RoPE positions of the joint model: one temporal band, in seconds, shared by the video and audio towers.

The head dimension is split into (t, h, w) bands exactly as in the video DiT (`default_bands`). The t band
rotates by positions_per_second * seconds (the model's `rope_positions_per_second`; 25 makes one audio
latent one unit). Video tokens also rotate the h/w bands by their patch index; audio tokens have position 0 there,
i.e. those dims are left unrotated. Because both streams use the same band, frequencies and clock, a
video-audio score depends on their times only through the difference (q R(a))·(k R(b)) = q R(b - a) k.

Cross-modal attention rotates q and k by the t band alone (h/w at 0), so it depends only on time
differences; with `shared` off it uses no rotation at all (the ablation: alignment must be learned).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from framework.nn.rope import apply_rope
from framework.nn.rope_nd import default_bands, grid_positions, rope_nd


def video_positions(times: Tensor, grid: tuple[int, int, int], positions_per_second: float) -> Tensor:
    """times: (T,) seconds of the temporal tokens; grid (T, H, W) -> (T*H*W, 3) positions in raster order."""
    pos = grid_positions(*grid, device=times.device)
    pos[:, 0] = times.float().repeat_interleave(grid[1] * grid[2]) * positions_per_second
    return pos


def audio_positions(times: Tensor, positions_per_second: float) -> Tensor:
    """times: (N,) seconds -> (N, 3): the t axis only, h and w at 0 (unrotated)."""
    zeros = torch.zeros_like(times, dtype=torch.float32)
    return torch.stack([times.float() * positions_per_second, zeros, zeros], dim=-1)


def rope_tables(positions: Tensor, head_dim: int, theta: float = 10000.0) -> tuple[Tensor, Tensor]:
    """(N, 3) positions -> cos, sin (N, head_dim) with the video DiT's (t, h, w) band split."""
    return rope_nd(positions, default_bands(head_dim), theta)


def time_only_rope(times: Tensor, head_dim: int, positions_per_second: float, theta: float = 10000.0) -> tuple[Tensor, Tensor]:
    """cos, sin (N, head_dim) rotating only the shared t band by times (N,) seconds: for cross-modal attention."""
    return rope_tables(audio_positions(times, positions_per_second), head_dim, theta)


def cross_modal_scores(q: Tensor, k: Tensor, q_times: Tensor, k_times: Tensor, *, positions_per_second: float,
                       theta: float = 10000.0, shared_time_rope: bool = True) -> Tensor:
    """Attention logits (B, H, Nq, Nk) of q (B, H, Nq, D) at q_times (Nq,) s against k (B, H, Nk, D) at k_times.

    The same rotation as `CrossModalAttention` applies before its softmax, written out to test its invariants.
    """
    if shared_time_rope:
        q = apply_rope(q, *time_only_rope(q_times, q.shape[-1], positions_per_second, theta))
        k = apply_rope(k, *time_only_rope(k_times, k.shape[-1], positions_per_second, theta))
    return q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])
