"""Diffusion-transformer parts shared by the video DiT and (later) the audio tower.

adaLN-Zero as in DiT (Peebles & Xie): each block gets (shift, scale, gate) x 2 from the timestep
embedding; the modulation is zero-initialised so every block starts as the identity. As in Wan2.1 the
timestep projection to 6*dim is computed once and shared, each block adds its own learned bias.

Two ways to condition on text: `DiTBlock` cross-attends from the video tokens to the text, `JointBlock` is
SD3's MMDiT block (Esser et al. 2024): text and video are two streams with their own weights, attending
jointly over the concatenation of both streams' tokens.
"""

from __future__ import annotations

import math

import torch
from einops import rearrange
from torch import Tensor, nn

from framework.nn import sequence_parallel
from framework.nn.attention import attention
from framework.nn.layers import RMSNorm
from framework.nn.rope import apply_rope


def patchify(x: Tensor, patch: tuple[int, int, int]) -> Tensor:
    """(B, C, T, H, W) -> (B, T/pt * H/ph * W/pw, pt*ph*pw*C) in (t, h, w) raster order."""
    pt, ph, pw = patch
    return rearrange(x, "b c (t pt) (h ph) (w pw) -> b (t h w) (pt ph pw c)", pt=pt, ph=ph, pw=pw)


def unpatchify(tokens: Tensor, grid: tuple[int, int, int], patch: tuple[int, int, int], channels: int) -> Tensor:
    """Inverse of `patchify`: (B, N, pt*ph*pw*C) -> (B, C, T, H, W)."""
    (t, h, w), (pt, ph, pw) = grid, patch
    return rearrange(tokens, "b (t h w) (pt ph pw c) -> b c (t pt) (h ph) (w pw)", t=t, h=h, w=w, pt=pt, ph=ph,
                     pw=pw, c=channels)


def timestep_embedding(t: Tensor, dim: int, max_period: float = 10000.0) -> Tensor:
    """Sinusoidal features of (B,) float timesteps -> (B, dim), computed in float32."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, device=t.device, dtype=torch.float32) / half)
    args = t.float()[:, None] * freqs[None]
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    return torch.nn.functional.pad(emb, (0, dim % 2))


class TimestepEmbedder(nn.Module):
    """t in [0, 1] (flow) or a step index (Gaussian) -> (B, dim); `scale` maps t to ~[0, 1000]."""

    def __init__(self, dim: int, freq_dim: int = 256, scale: float = 1000.0):
        super().__init__()
        self.freq_dim, self.scale = freq_dim, scale
        self.mlp = nn.Sequential(nn.Linear(freq_dim, dim), nn.SiLU(), nn.Linear(dim, dim))

    def forward(self, t: Tensor) -> Tensor:
        return self.mlp(timestep_embedding(t * self.scale, self.freq_dim).to(self.mlp[0].weight.dtype))


def modulate(x: Tensor, shift: Tensor, scale: Tensor) -> Tensor:
    """x: (B, N, D); shift, scale: (B, D)."""
    return x * (1 + scale[:, None]) + shift[:, None]


class Attention(nn.Module):
    """Multi-head attention (self or cross) with optional qk RMSNorm and RoPE on the queries/keys.

    sharded: x (and context) are sequence shards under `train.sequence_parallel` (a DiT's token self-attention),
    attended through DeepSpeed's all-to-all; False for attention over whole sequences (a text encoder) and for
    cross-attention of token shards to the whole text."""

    def __init__(self, dim: int, heads: int, kv_dim: int | None = None, qk_norm: bool = True, sharded: bool = False):
        super().__init__()
        self.heads, self.head_dim, self.sharded = heads, dim // heads, sharded
        self.q = nn.Linear(dim, dim)
        self.kv = nn.Linear(kv_dim or dim, 2 * dim)
        self.out = nn.Linear(dim, dim)
        self.q_norm = RMSNorm(self.head_dim) if qk_norm else nn.Identity()
        self.k_norm = RMSNorm(self.head_dim) if qk_norm else nn.Identity()

    def forward(self, x: Tensor, context: Tensor | None = None, rope: tuple[Tensor, Tensor] | None = None,
                key_padding_mask: Tensor | None = None) -> Tensor:
        """x: (B, N, D); context: (B, S, kv_dim) or None (self-attention); rope: (cos, sin) of (N, head_dim)."""
        q = rearrange(self.q(x), "b n (h d) -> b h n d", h=self.heads)
        k, v = rearrange(self.kv(x if context is None else context), "b s (two h d) -> two b h s d", two=2,
                         h=self.heads)
        q, k = self.q_norm(q), self.k_norm(k)
        if rope is not None:
            q, k = apply_rope(q, *rope), apply_rope(k, *rope)
        if self.sharded:
            out = sequence_parallel.sharded_attention(q, k, v, key_padding_mask=key_padding_mask)
        else:
            out = attention(q, k, v, key_padding_mask=key_padding_mask)
        return self.out(rearrange(out, "b h n d -> b n (h d)"))


class DiTBlock(nn.Module):
    """adaLN-Zero self-attention (3-D RoPE) -> cross-attention to text -> MLP."""

    def __init__(self, dim: int, heads: int, mlp_hidden: int, qk_norm: bool = True, cross_attention: bool = True):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.attn = Attention(dim, heads, qk_norm=qk_norm, sharded=True)  # over the token sequence
        self.cross = Attention(dim, heads, qk_norm=qk_norm) if cross_attention else None
        self.norm_cross = nn.LayerNorm(dim, eps=1e-6) if cross_attention else None
        self.norm2 = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.mlp = nn.Sequential(nn.Linear(dim, mlp_hidden), nn.GELU(approximate="tanh"), nn.Linear(mlp_hidden, dim))
        self.modulation = nn.Parameter(torch.zeros(6, dim))  # per-block bias on the shared time projection

    def forward(self, x: Tensor, time6: Tensor, rope: tuple[Tensor, Tensor], text: Tensor | None = None,
                text_mask: Tensor | None = None) -> Tensor:
        """x: (B, N, D) (N / sequence_parallel tokens under SP, rope sliced alike); time6: (B, 6, D) shared
        timestep modulation; text: (B, S, D), whole on every rank."""
        shift1, scale1, gate1, shift2, scale2, gate2 = (time6 + self.modulation).unbind(dim=1)
        x = x + gate1[:, None] * self.attn(modulate(self.norm1(x), shift1, scale1), rope=rope)
        if self.cross is not None and text is not None:
            x = x + self.cross(self.norm_cross(x), context=text, key_padding_mask=text_mask)
        return x + gate2[:, None] * self.mlp(modulate(self.norm2(x), shift2, scale2))


class _Stream(nn.Module):
    """One stream's half of a `JointBlock`: adaLN norms, q/k/v (qk RMSNorm per head) and, when `update`, the
    attention output projection and MLP. Without `update` (the text stream of the last block: nothing reads
    its result, as SD3's `context_pre_only`) the stream only gives keys and values: norm, (shift, scale), k, v."""

    def __init__(self, dim: int, heads: int, mlp_hidden: int, qk_norm: bool, update: bool = True):
        super().__init__()
        self.heads, self.update = heads, update
        self.norm1 = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.qkv = nn.Linear(dim, (3 if update else 2) * dim)  # no queries when nothing reads their output
        self.q_norm = RMSNorm(dim // heads) if qk_norm and update else nn.Identity()
        self.k_norm = RMSNorm(dim // heads) if qk_norm else nn.Identity()
        # Per-block bias on the shared time projection: (shift, scale, gate) x 2, or (shift, scale) alone.
        self.modulation = nn.Parameter(torch.zeros(6 if update else 2, dim))
        if update:
            self.out = nn.Linear(dim, dim)
            self.norm2 = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
            self.mlp = nn.Sequential(nn.Linear(dim, mlp_hidden), nn.GELU(approximate="tanh"),
                                     nn.Linear(mlp_hidden, dim))

    def mods(self, time6: Tensor) -> tuple[Tensor, ...]:
        """time6 (B, 6, D) -> this stream's modulation vectors, each (B, D)."""
        return (time6[:, : self.modulation.shape[0]] + self.modulation).unbind(dim=1)

    def qkv_heads(self, x: Tensor, shift: Tensor, scale: Tensor) -> tuple[Tensor | None, Tensor, Tensor]:
        """x (B, N, D) -> q, k, v (B, H, N, head_dim), q and k normalised; q is None without `update`."""
        parts = rearrange(self.qkv(modulate(self.norm1(x), shift, scale)), "b n (m h d) -> m b h n d",
                          m=3 if self.update else 2, h=self.heads)
        q = self.q_norm(parts[0]) if self.update else None
        return q, self.k_norm(parts[-2]), parts[-1]

    def finish(self, x: Tensor, attended: Tensor, mods: tuple[Tensor, ...]) -> Tensor:
        """Residual updates after attention: x + gate1 * out(attended), then the modulated MLP."""
        _, _, gate1, shift2, scale2, gate2 = mods
        x = x + gate1[:, None] * self.out(rearrange(attended, "b h n d -> b n (h d)"))
        return x + gate2[:, None] * self.mlp(modulate(self.norm2(x), shift2, scale2))


class JointBlock(nn.Module):
    """MMDiT block: per-stream adaLN-Zero, q/k/v/out and MLP; one attention over [text; video] tokens.

    RoPE rotates the video tokens only: text tokens carry their order in their own states (the encoder's
    positions) and have no place on the video grid, so they stay unrotated, as in SD3 (no positional
    encoding on the text stream). Padded text tokens are masked as keys; as queries they only update their
    own (padded) states, which no real token ever reads, so they cannot change the video output.
    `update_text=False` (the last block) leaves the text stream as it is."""

    def __init__(self, dim: int, heads: int, mlp_hidden: int, qk_norm: bool = True, update_text: bool = True):
        super().__init__()
        self.video = _Stream(dim, heads, mlp_hidden, qk_norm)
        self.text = _Stream(dim, heads, mlp_hidden, qk_norm, update=update_text)

    def forward(self, x: Tensor, text: Tensor, time6: Tensor, text_time6: Tensor, rope: tuple[Tensor, Tensor],
                text_mask: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """x (B, N, D) video tokens, text (B, S, D), time6 / text_time6 (B, 6, D) each stream's shared timestep
        modulation, rope (cos, sin) of (N, head_dim), text_mask (B, S) True = real token -> (x, text)."""
        video_mods, text_mods = self.video.mods(time6), self.text.mods(text_time6)
        qx, kx, vx = self.video.qkv_heads(x, *video_mods[:2])
        qt, kt, vt = self.text.qkv_heads(text, *text_mods[:2])
        qx, kx = apply_rope(qx, *rope), apply_rope(kx, *rope)
        k, v = torch.cat([kt, kx], dim=2), torch.cat([vt, vx], dim=2)
        keep = None
        if text_mask is not None:
            keep = torch.cat([text_mask.to(torch.bool), text_mask.new_ones(x.shape[:2], dtype=torch.bool)], dim=1)
        # Without a text update nothing reads the text queries' output: only the video tokens query.
        q = torch.cat([qt, qx], dim=2) if self.text.update else qx
        out = attention(q, k, v, key_padding_mask=keep)
        if self.text.update:
            text = self.text.finish(text, out[:, :, : text.shape[1]], text_mods)
        return self.video.finish(x, out[:, :, -x.shape[1]:], video_mods), text


class FinalLayer(nn.Module):
    """adaLN (shift, scale) then a zero-initialised projection to patch values."""

    def __init__(self, dim: int, out_dim: int):
        super().__init__()
        self.norm = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.modulation = nn.Linear(dim, 2 * dim)
        self.proj = nn.Linear(dim, out_dim)
        for layer in (self.modulation, self.proj):
            nn.init.zeros_(layer.weight)
            nn.init.zeros_(layer.bias)

    def forward(self, x: Tensor, c: Tensor) -> Tensor:
        shift, scale = self.modulation(nn.functional.silu(c)).chunk(2, dim=-1)
        return self.proj(modulate(self.norm(x), shift, scale))
