"""The Wan2.1 text-to-video transformer, computing what diffusers' `WanTransformer3DModel` computes.

Written from the published architecture (facts in shared/INTEROP.md), checked against diffusers on tiny
random models to 1e-5 in fp32 (tests/unit/test_wan_transformer.py). What makes it Wan and not our `VideoDiT`:

- one sinusoidal time embedding (cos first) -> MLP -> `time_proj` to 6 x dim, shared by all blocks; each
  block adds its own learned `modulation` (diffusers' `scale_shift_table`, (1, 6, dim)) in fp32;
- RMSNorm of q and k across all heads together (a norm of width dim, not head_dim);
- 3-axis RoPE in the *interleaved* layout (pairs (2i, 2i+1)), time taking the remainder of the head
  dimension, each band with its own frequency base, angles computed in float64 as diffusers does;
- cross-attention to projected text states with an affine LayerNorm before it and no gate;
- the output head modulated by the time embedding itself (not its 6-way projection) plus its own table.

Layer norms, the modulation and residual updates run in fp32 and cast back, as in diffusers, so bf16
training rounds where the reference rounds. Parameter names are ours; `framework/export/diffusers_wan.py`
maps them to and from diffusers' keys.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor, nn

from framework.config import ConfigError
from framework.export import diffusers_wan
from framework.export.diffusers_wan import CONFIG_KEYS
from framework.nn import sequence_parallel
from framework.nn.attention import attention
from framework.nn.checkpointing import CheckpointingMode, normalise_mode, run_block, should_checkpoint
from framework.nn.dit import patchify, timestep_embedding, unpatchify
from framework.nn.init import gathered_for_init, xavier_linears
from framework.nn.layers import RMSNorm
from framework.nn.rope_nd import default_bands, grid_positions

ROPE_THETA = 10000.0  # fixed in diffusers' WanRotaryPosEmbed


@dataclass
class WanConfig:
    """diffusers' `WanTransformer3DModel` config under its own key names, plus two training switches."""

    patch_size: list[int] = field(default_factory=lambda: [1, 2, 2])  # (pt, ph, pw)
    num_attention_heads: int = 12
    attention_head_dim: int = 128
    in_channels: int = 16
    out_channels: int = 16
    text_dim: int = 4096  # UMT5-XXL hidden size
    freq_dim: int = 256  # width of the sinusoidal time features
    ffn_dim: int = 8960
    num_layers: int = 30
    cross_attn_norm: bool = True  # affine LayerNorm before cross-attention
    # Kept for the round trip only: diffusers applies the across-heads RMSNorm whatever this says.
    qk_norm: str | None = "rms_norm_across_heads"
    eps: float = 1e-6
    rope_max_seq_len: int = 1024  # diffusers' RoPE table length: latent grids must stay within it per axis
    # Ours, not diffusers': the recipe passes t in [0, 1]; Wan was trained on timesteps t * 1000.
    timestep_scale: float = 1000.0
    activation_checkpointing: CheckpointingMode = "none"  # none | full | every_k; true/false = full/none
    activation_checkpointing_every: int = 2  # every_k: blocks 0, k, 2k, ... recomputed in backward

    def __post_init__(self) -> None:
        self.activation_checkpointing = normalise_mode(self.activation_checkpointing,
                                                       self.activation_checkpointing_every,
                                                       "model.wan.activation_checkpointing")
        if len(self.patch_size) != 3 or min(self.patch_size) < 1:
            raise ConfigError(f"model.wan.patch_size must be three positive sizes (pt, ph, pw), got {self.patch_size}")
        if self.attention_head_dim % 2:
            raise ConfigError(f"model.wan.attention_head_dim={self.attention_head_dim} must be even for RoPE")
        self.patch_size = [int(p) for p in self.patch_size]

    @property
    def dim(self) -> int:
        return self.num_attention_heads * self.attention_head_dim

    @property
    def patch(self) -> list[int]:
        """Same name as VideoDiTConfig's, so shape helpers take either config."""
        return self.patch_size

    @property
    def patch_volume(self) -> int:
        return math.prod(self.patch_size)

    def diffusers_config(self) -> dict:
        """The config.json fields diffusers reads (our training switches left out)."""
        return {k: (list(v) if k == "patch_size" else v) for k, v in
                ((k, getattr(self, k)) for k in CONFIG_KEYS)}


def rope_band_dims(head_dim: int) -> list[int]:
    """Channels per axis (t, h, w): h and w get 2 * (head_dim // 6) each, t the rest (44, 42, 42 for 128)."""
    return [2 * n for n in default_bands(head_dim, 3)]


def wan_rope(grid: tuple[int, int, int], head_dim: int, device: torch.device | None = None) -> tuple[Tensor, Tensor]:
    """cos, sin of the interleaved 3-axis RoPE: 2 x (t*h*w, head_dim // 2) float32, tokens in raster order.

    Each band's inverse frequencies are theta^(-2i/band) over its own width; angles are formed in float64
    and rounded once, as diffusers does, so far positions agree to the last bit.
    """
    positions = grid_positions(*grid, device=device).double()
    angles = []
    for axis, band in enumerate(rope_band_dims(head_dim)):
        inv_freq = 1.0 / (ROPE_THETA ** (torch.arange(0, band, 2, dtype=torch.float64, device=device) / band))
        angles.append(positions[:, axis, None] * inv_freq)
    angles = torch.cat(angles, dim=-1)
    return angles.cos().float(), angles.sin().float()


def apply_interleaved_rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotate pairs (x[2i], x[2i+1]) by angle i: x (B, H, N, D), cos/sin (N, D/2) -> (B, H, N, D) in x.dtype."""
    xf = x.float()
    x1, x2 = xf[..., 0::2], xf[..., 1::2]
    out = torch.stack((x1 * cos - x2 * sin, x1 * sin + x2 * cos), dim=-1).flatten(-2)
    return out.to(x.dtype)


def layer_norm32(x: Tensor, norm: nn.LayerNorm | None, eps: float) -> Tensor:
    """LayerNorm in fp32 (affine when `norm` is given), result in fp32: (..., D) -> (..., D)."""
    weight = norm.weight.float() if norm is not None else None
    bias = norm.bias.float() if norm is not None else None
    return F.layer_norm(x.float(), (x.shape[-1],), weight, bias, eps)


class WanAttention(nn.Module):
    """Multi-head attention with biases and RMSNorm over all heads' q (and k) at once."""

    def __init__(self, dim: int, heads: int, eps: float):
        super().__init__()
        self.heads = heads
        self.q, self.k, self.v, self.o = (nn.Linear(dim, dim) for _ in range(4))
        self.norm_q = RMSNorm(dim, eps)
        self.norm_k = RMSNorm(dim, eps)

    def forward(self, x: Tensor, context: Tensor | None = None, rope: tuple[Tensor, Tensor] | None = None) -> Tensor:
        """x: (B, N, D); context: (B, S, D) or None (self-attention); rope: cos, sin (N, head_dim / 2). Under
        train.sequence_parallel x is this rank's token shard: self-attention goes through DeepSpeed's all-to-all,
        cross-attention reads the whole text."""
        source = x if context is None else context
        q = rearrange(self.norm_q(self.q(x)), "b n (h d) -> b h n d", h=self.heads)
        k = rearrange(self.norm_k(self.k(source)), "b n (h d) -> b h n d", h=self.heads)
        v = rearrange(self.v(source), "b n (h d) -> b h n d", h=self.heads)
        if rope is not None:
            q, k = apply_interleaved_rope(q, *rope), apply_interleaved_rope(k, *rope)
        out = sequence_parallel.sharded_attention(q, k, v) if context is None else attention(q, k, v)
        return self.o(rearrange(out, "b h n d -> b n (h d)").to(q.dtype))


class WanBlock(nn.Module):
    """Modulated self-attention (RoPE) -> cross-attention to text -> modulated GELU-tanh FFN."""

    def __init__(self, cfg: WanConfig):
        super().__init__()
        dim, self.eps = cfg.dim, cfg.eps
        self.self_attn = WanAttention(dim, cfg.num_attention_heads, cfg.eps)
        self.cross_attn = WanAttention(dim, cfg.num_attention_heads, cfg.eps)
        self.norm_cross = nn.LayerNorm(dim, eps=cfg.eps) if cfg.cross_attn_norm else None
        self.ffn = nn.Sequential(nn.Linear(dim, cfg.ffn_dim), nn.GELU(approximate="tanh"), nn.Linear(cfg.ffn_dim, dim))
        self.modulation = nn.Parameter(torch.randn(1, 6, dim) / dim**0.5)  # per-block bias on the shared time6

    def forward(self, x: Tensor, time6: Tensor, text: Tensor, rope: tuple[Tensor, Tensor]) -> Tensor:
        """x: (B, N, D); time6: (B, 6, D) shared time modulation; text: (B, S, D) projected states."""
        shift, scale, gate, ffn_shift, ffn_scale, ffn_gate = (self.modulation + time6.float()).chunk(6, dim=1)
        h = (layer_norm32(x, None, self.eps) * (1 + scale) + shift).to(x.dtype)
        x = (x.float() + self.self_attn(h, rope=rope) * gate).to(x.dtype)
        h = layer_norm32(x, self.norm_cross, self.eps).to(x.dtype) if self.norm_cross is not None else x
        x = x + self.cross_attn(h, context=text)
        h = (layer_norm32(x, None, self.eps) * (1 + ffn_scale) + ffn_shift).to(x.dtype)
        return (x.float() + self.ffn(h).float() * ffn_gate).to(x.dtype)


class WanDiT(nn.Module):
    """forward(x (B, C, T, H, W) latents, t (B,) in [0, 1], text (B, L, text_dim), text_mask (B, L)) -> (B, C', T, H, W)."""

    def __init__(self, cfg: WanConfig):
        super().__init__()
        self.cfg = cfg
        dim, patch_values = cfg.dim, cfg.in_channels * cfg.patch_volume
        # diffusers' strided Conv3d as a matmul over flattened patches (same function; the importer
        # reorders the kernel): tiny-kernel bf16 Conv3d is slow on GPUs.
        self.patch_embed = nn.Linear(patch_values, dim)
        self.time_embed = nn.Sequential(nn.Linear(cfg.freq_dim, dim), nn.SiLU(), nn.Linear(dim, dim))
        self.time_proj = nn.Linear(dim, 6 * dim)
        self.text_proj = nn.Sequential(nn.Linear(cfg.text_dim, dim), nn.GELU(approximate="tanh"), nn.Linear(dim, dim))
        self.blocks = nn.ModuleList(WanBlock(cfg) for _ in range(cfg.num_layers))
        self.head_modulation = nn.Parameter(torch.randn(1, 2, dim) / dim**0.5)
        self.head = nn.Linear(dim, cfg.out_channels * cfg.patch_volume)
        with gathered_for_init(self):
            self._init_weights()

    def _init_weights(self) -> None:
        """Wan's own scheme: xavier linears with zero biases, N(0, 0.02) time and text MLPs, zero head (a fresh
        model predicts 0 everywhere), modulation tables N(0, 1 / dim)."""
        xavier_linears(self)
        for layer in (*self.time_embed, *self.text_proj):
            if isinstance(layer, nn.Linear):
                nn.init.normal_(layer.weight, std=0.02)
        nn.init.zeros_(self.head.weight)
        # Drawn again here, where ZeRO-3 lets rank 0 alone write, so every rank starts from the same tables.
        for table in (self.head_modulation, *(block.modulation for block in self.blocks)):
            nn.init.normal_(table, std=self.cfg.dim**-0.5)

    def forward(self, x: Tensor, t: Tensor, text: Tensor, text_mask: Tensor | None = None) -> Tensor:
        """text_mask (B, L) True = real token: padding becomes zero states, which every token still attends
        to, as in Wan's training and diffusers' WanPipeline (there is no attention mask in Wan)."""
        grid = self._grid(x)
        if text_mask is not None:
            text = text * text_mask[..., None].to(text.dtype)
        tokens = self.patch_embed(patchify(x, self.cfg.patch_size))
        features = timestep_embedding(t.float() * self.cfg.timestep_scale, self.cfg.freq_dim)
        temb = self.time_embed(features.to(self.time_embed[0].weight.dtype)).to(text.dtype)
        time6 = self.time_proj(F.silu(temb)).unflatten(1, (6, -1))
        context = self.text_proj(text)
        rope = wan_rope(grid, self.cfg.attention_head_dim, x.device)
        # Under train.sequence_parallel: 1/N of the tokens per rank, the full grid's 3-axis RoPE sliced alike.
        tokens, rope = sequence_parallel.shard_tokens(tokens, rope, what=f"the latent grid {grid}")
        for i, block in enumerate(self.blocks):
            recompute = self.training and should_checkpoint(
                self.cfg.activation_checkpointing, self.cfg.activation_checkpointing_every, i)
            tokens = run_block(block, tokens, time6, context, rope, checkpoint=recompute)
        shift, scale = (self.head_modulation + temb[:, None].float()).chunk(2, dim=1)
        tokens = (layer_norm32(tokens, None, self.cfg.eps) * (1 + scale) + shift).to(tokens.dtype)
        out = sequence_parallel.gather(self.head(tokens), 1)  # after the head: its weights see each token once
        return unpatchify(out, grid, tuple(self.cfg.patch_size), self.cfg.out_channels)

    def _grid(self, x: Tensor) -> tuple[int, int, int]:
        """Token grid (t, h, w) of latents x (B, C, T, H, W), refusing shapes diffusers would crop or reject."""
        if x.ndim != 5 or x.shape[1] != self.cfg.in_channels:
            raise ValueError(f"WanDiT expects latents (B, {self.cfg.in_channels}, T, H, W), got {tuple(x.shape)}")
        grid = []
        for size, p, axis in zip(x.shape[2:], self.cfg.patch_size, "THW"):
            if size % p:
                raise ValueError(f"latent {axis}={size} is not divisible by patch size {p}")
            if size // p > self.cfg.rope_max_seq_len:
                raise ValueError(f"latent {axis}={size} gives {size // p} positions, more than "
                                 f"rope_max_seq_len={self.cfg.rope_max_seq_len}")
            grid.append(size // p)
        return tuple(grid)


def count_parameters(cfg: WanConfig) -> int:
    """Parameters of the transformer from the shapes alone (what diffusers' model holds)."""
    d, f, p = cfg.dim, cfg.ffn_dim, cfg.patch_volume
    attn = 4 * (d * d + d) + 2 * d  # q, k, v, o with biases; RMSNorm gains of q and k
    block = 2 * attn + (2 * d if cfg.cross_attn_norm else 0) + (2 * d * f + f + d) + 6 * d
    embed = cfg.in_channels * p * d + d
    time = (cfg.freq_dim * d + d) + (d * d + d) + (6 * d * d + 6 * d)
    text = (cfg.text_dim * d + d) + (d * d + d)
    head = 2 * d + d * cfg.out_channels * p + cfg.out_channels * p
    return cfg.num_layers * block + embed + time + text + head


def train_flops_per_sample(cfg: WanConfig, latent_shape: tuple[int, int, int], text_len: int) -> float:
    """Forward+backward FLOPs of one sample: 3 x (block matmuls on the tokens + text K/V + attention scores)."""
    t, h, w = latent_shape
    pt, ph, pw = cfg.patch_size
    n = (t // pt) * (h // ph) * (w // pw)
    d, f = cfg.dim, cfg.ffn_dim
    block_matmuls = 4 * d * d + 2 * d * f + 2 * d * d  # self qkv/out, FFN, cross q/out
    cross_kv = 2 * d * d * text_len
    attention_flops = 2 * 2 * n * n * d + 2 * 2 * n * text_len * d
    return 3.0 * cfg.num_layers * (2 * n * block_matmuls + 2 * cross_kv + attention_flops)


def load_diffusers_folder(path: str | Path, cfg: WanConfig) -> dict[str, Tensor]:
    """Our state dict from a diffusers WanTransformer3DModel folder (sharded or not), after checking that its
    config.json describes the model `cfg` builds: ValueError naming every differing `model.wan.*` key."""
    found = diffusers_wan.read_config(path)
    ours = cfg.diffusers_config()
    diffs = [f"model.wan.{k}: {ours[k]} in the run config but {found[k]} in {path}"
             for k in CONFIG_KEYS if k in found and _differs(ours[k], found[k])]
    if diffs:
        raise ValueError("the diffusers transformer differs from the model config: " + "; ".join(diffs))
    state, _ = diffusers_wan.read(path)
    return state


def _differs(ours, theirs) -> bool:
    if isinstance(ours, list):
        return list(theirs) != ours
    if isinstance(ours, float):
        return not math.isclose(ours, float(theirs), rel_tol=1e-9)
    return ours != theirs


def export_diffusers(state: dict[str, Tensor], cfg: WanConfig, out_dir: str | Path, prefix: str = "",
                     source: dict | None = None, max_shard_bytes: int = 5 * 2**30) -> list[str]:
    """Write the WanDiT weights found under `prefix` in `state` (e.g. "dit." in the recipe's module, whose
    null caption and text encoder diffusers has no place for) as a diffusers transformer folder."""
    weights = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
    if not weights:
        raise ValueError(f"no weights under {prefix!r} to export (keys start with {sorted(state)[:3]})")
    return diffusers_wan.write(weights, cfg.diffusers_config(), out_dir, source=source, max_shard_bytes=max_shard_bytes)
