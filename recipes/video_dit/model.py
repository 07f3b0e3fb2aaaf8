"""3-D spacetime-patch video DiT: patch embedding, 3-D RoPE, adaLN-Zero, text by cross-attention (default) or
SD3-style joint attention (`model.text_mode: joint`, MMDiT blocks with a text stream of their own).

`VideoDiTConfig` is also the `model:` section of the recipe for `model.arch: wan` (recipes/video_dit/wan.py).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import ClassVar, Literal

import torch
from torch import Tensor, nn

from framework.config import ConfigError
from framework.nn import sequence_parallel
from framework.nn.checkpointing import CheckpointingMode, normalise_mode, run_block, should_checkpoint
from framework.nn.dit import DiTBlock, FinalLayer, JointBlock, TimestepEmbedder, patchify, unpatchify
from framework.nn.init import gathered_for_init, xavier_linears
from framework.nn.rope_nd import default_bands, grid_positions, rope_nd
from recipes.video_dit.wan import WanConfig

# The fields every architecture has (what the recipe, the memory planner and the benchmarks read): with
# arch=wan they take model.wan's values. Our name -> WanConfig's name.
SHARED_WITH_WAN = {"in_channels": "in_channels", "patch": "patch_size", "text_dim": "text_dim"}
# Where a VideoDiT-only setting lives in model.wan (for the error message).
WAN_NAME = {"dim": "num_attention_heads x model.wan.attention_head_dim", "depth": "num_layers",
            "heads": "num_attention_heads", "ffn_hidden": "ffn_dim", "timestep_scale": "timestep_scale",
            "activation_checkpointing": "activation_checkpointing",
            "activation_checkpointing_every": "activation_checkpointing_every"}


@dataclass
class VideoDiTConfig:
    in_channels: int = 16  # latent channels of the VAE
    patch: list[int] = field(default_factory=lambda: [1, 2, 2])  # (pt, ph, pw)
    dim: int = 128
    depth: int = 4
    heads: int = 4
    ffn_hidden: int = 512
    qk_norm: bool = True
    rope_theta: float = 10000.0
    text_dim: int = 128  # width of the text encoder's output
    timestep_scale: float = 1000.0  # diffusion t in [0, 1] is embedded as t * timestep_scale
    # cross: video tokens cross-attend to the text (DiT/Wan). joint: SD3's MMDiT, one attention over text and
    # video tokens with per-stream weights; the text stream is updated in every block but the last.
    text_mode: Literal["cross", "joint"] = "cross"
    # none | full | every_k: blocks recomputed in backward (long clips at 480p and up); true/false = full/none
    activation_checkpointing: CheckpointingMode = "none"
    activation_checkpointing_every: int = 2  # every_k: blocks 0, k, 2k, ...
    # "dit": the fields above (our VideoDiT); "wan": diffusers' WanTransformer3DModel, shaped by `wan` alone.
    arch: Literal["dit", "wan"] = "dit"
    wan: WanConfig = field(default_factory=WanConfig)
    # Keys saved under an older name (framework.config.from_dict reads them as the new one, with a warning).
    RENAMED_KEYS: ClassVar[dict[str, str]] = {"time_scale": "timestep_scale"}

    def __post_init__(self) -> None:
        self.activation_checkpointing = normalise_mode(self.activation_checkpointing,
                                                       self.activation_checkpointing_every)
        if self.text_mode not in ("cross", "joint"):
            raise ConfigError(f"model.text_mode: {self.text_mode!r} is not one of ['cross', 'joint']")
        if self.arch == "wan":
            self._follow_wan()
        if self.dim % self.heads:
            raise ValueError(f"model.dim={self.dim} is not divisible by model.heads={self.heads}")
        if len(self.patch) != 3 or min(self.patch) < 1:
            raise ValueError(f"model.patch must be three positive sizes (pt, ph, pw), got {self.patch}")

    @property
    def head_dim(self) -> int:
        return self.dim // self.heads

    def _follow_wan(self) -> None:
        """arch=wan: refuse VideoDiT-only settings (they would be silently ignored), then copy model.wan's
        latent channels, patch and text width into the shared fields, so code reading `model.in_channels`,
        `model.patch` or `model.text_dim` sees the model that is built. A shared field may stay at its default
        or equal model.wan's value (what a saved config of an arch=wan run holds)."""
        defaults = VideoDiTConfig()
        problems = []
        for f in dataclasses.fields(self):
            if f.name in ("arch", "wan"):
                continue
            value, default = getattr(self, f.name), getattr(defaults, f.name)
            if f.name in SHARED_WITH_WAN:
                wan_name = SHARED_WITH_WAN[f.name]
                if value != default and value != getattr(self.wan, wan_name):
                    problems.append(f"model.{f.name}={value} differs from model.wan.{wan_name}="
                                    f"{getattr(self.wan, wan_name)}")
            elif f.name == "text_mode" and value != default:
                problems.append(f"model.text_mode={value}: Wan2.1 has cross-attention only (text_mode=cross)")
            elif value != default:
                where = f"model.wan.{WAN_NAME[f.name]}" if f.name in WAN_NAME else "no Wan equivalent"
                problems.append(f"model.{f.name}={value} is a model.arch=dit setting (arch=wan: {where})")
        if problems:
            raise ConfigError("model.arch=wan: " + "; ".join(problems))
        for ours, theirs in SHARED_WITH_WAN.items():
            setattr(self, ours, list(getattr(self.wan, theirs)) if ours == "patch" else getattr(self.wan, theirs))


class VideoDiT(nn.Module):
    """forward(x (B, C, T, H, W) latents, t (B,) in [0, 1], text (B, S, text_dim), text_mask (B, S)) -> like x."""

    def __init__(self, cfg: VideoDiTConfig):
        super().__init__()
        self.cfg = cfg
        self.patch = tuple(cfg.patch)
        # A linear map of each flattened patch: the same function as a strided Conv3d, but a plain matmul
        # (bf16 Conv3d kernels with tiny kernels are slow on GPUs).
        self.patch_embed = nn.Linear(cfg.in_channels * self.patch[0] * self.patch[1] * self.patch[2], cfg.dim)
        self.time_embed = TimestepEmbedder(cfg.dim, scale=cfg.timestep_scale)
        self.time_proj = nn.Linear(cfg.dim, 6 * cfg.dim)
        self.text_proj = nn.Sequential(nn.Linear(cfg.text_dim, cfg.dim), nn.GELU(approximate="tanh"),
                                       nn.Linear(cfg.dim, cfg.dim))
        self.joint = cfg.text_mode == "joint"
        if self.joint:
            check_joint_unsharded()
            # The text stream's adaLN, from the same timestep embedding (shared projection, per-block biases).
            self.text_time_proj = nn.Linear(cfg.dim, 6 * cfg.dim)
            self.blocks = nn.ModuleList(JointBlock(cfg.dim, cfg.heads, cfg.ffn_hidden, cfg.qk_norm,
                                                   update_text=i < cfg.depth - 1) for i in range(cfg.depth))
        else:
            self.blocks = nn.ModuleList(DiTBlock(cfg.dim, cfg.heads, cfg.ffn_hidden, cfg.qk_norm)
                                        for _ in range(cfg.depth))
        self.final = FinalLayer(cfg.dim, cfg.in_channels * self.patch[0] * self.patch[1] * self.patch[2])
        with gathered_for_init(self):
            self._init_weights()

    def _init_weights(self) -> None:
        xavier_linears(self)
        nn.init.zeros_(self.time_proj.weight)  # adaLN-Zero: every block starts as the identity
        nn.init.zeros_(self.time_proj.bias)
        if self.joint:
            nn.init.zeros_(self.text_time_proj.weight)
            nn.init.zeros_(self.text_time_proj.bias)
        for layer in (self.final.modulation, self.final.proj):
            nn.init.zeros_(layer.weight)
            nn.init.zeros_(layer.bias)

    def rope(self, grid: tuple[int, int, int], device: torch.device) -> tuple[Tensor, Tensor]:
        positions = grid_positions(*grid, device=device)
        return rope_nd(positions, default_bands(self.cfg.head_dim), self.cfg.rope_theta)

    def forward(self, x: Tensor, t: Tensor, text: Tensor, text_mask: Tensor | None = None) -> Tensor:
        for size, p, axis in zip(x.shape[2:], self.patch, "THW"):
            if size % p:
                raise ValueError(f"latent {axis}={size} is not divisible by patch size {p}")
        grid = tuple(size // p for size, p in zip(x.shape[2:], self.patch))
        tokens = self.patch_embed(patchify(x, self.patch))
        c = self.time_embed(t)
        time6 = self.time_proj(nn.functional.silu(c)).unflatten(1, (6, -1))
        context = self.text_proj(text)
        rope = self.rope(grid, x.device)
        if self.joint:
            check_joint_unsharded()
            out = self._joint_blocks(tokens, context, c, time6, rope, text_mask)
            return unpatchify(self.final(out, c), grid, self.patch, self.cfg.in_channels)
        # Under train.sequence_parallel each rank keeps 1/N of the tokens, with the full grid's RoPE sliced alike.
        tokens, rope = sequence_parallel.shard_tokens(tokens, rope, what=f"the latent grid {grid}")
        for i, block in enumerate(self.blocks):
            # Recompute blocks in backward: activations of long videos dwarf the weights otherwise.
            recompute = self.training and should_checkpoint(
                self.cfg.activation_checkpointing, self.cfg.activation_checkpointing_every, i)
            tokens = run_block(block, tokens, time6, rope, context, text_mask, checkpoint=recompute)
        out = sequence_parallel.gather(self.final(tokens, c), 1)  # the full output on every rank of the group
        return unpatchify(out, grid, self.patch, self.cfg.in_channels)

    def _joint_blocks(self, tokens: Tensor, context: Tensor, c: Tensor, time6: Tensor, rope: tuple[Tensor, Tensor],
                      text_mask: Tensor | None) -> Tensor:
        """text_mode=joint: both streams through the MMDiT blocks -> the video tokens."""
        text_time6 = self.text_time_proj(nn.functional.silu(c)).unflatten(1, (6, -1))
        for i, block in enumerate(self.blocks):
            recompute = self.training and should_checkpoint(
                self.cfg.activation_checkpointing, self.cfg.activation_checkpointing_every, i)
            tokens, context = run_block(block, tokens, context, time6, text_time6, rope, text_mask,
                                        checkpoint=recompute)
        return tokens


def check_joint_unsharded() -> None:
    """Joint attention is not wired through Ulysses' all-to-all (the unsharded text tokens would need their own
    head split and an all-gather of their outputs): refuse it under train.sequence_parallel rather than compute
    attention over the wrong keys."""
    if sequence_parallel.active():
        raise ConfigError(f"model.text_mode=joint does not support train.sequence_parallel="
                          f"{sequence_parallel.size()}; use text_mode=cross or sequence_parallel=1")


def count_parameters(cfg: VideoDiTConfig) -> int:
    """Parameters of the DiT (without the text encoder), from the shapes alone."""
    d, f, p = cfg.dim, cfg.ffn_hidden, cfg.patch[0] * cfg.patch[1] * cfg.patch[2]
    attn = 4 * d * d + 4 * d
    norms = 2 * cfg.head_dim if cfg.qk_norm else 0
    mlp = 2 * d * f + f + d
    if cfg.text_mode == "joint":  # per stream: qkv + qk norms (+ out, MLP, 6 modulation rows unless last text)
        stream = attn + norms + mlp + 6 * d
        last_text = 2 * d * d + 2 * d + norms // 2 + 2 * d  # keys and values only
        blocks = cfg.depth * stream + (cfg.depth - 1) * stream + last_text + (6 * d * d + 6 * d)
    else:
        blocks = cfg.depth * (2 * (attn + norms) + 2 * d + mlp + 6 * d)
    patch_embed = cfg.in_channels * p * d + d
    time = (256 * d + d + d * d + d) + (6 * d * d + 6 * d)
    text = cfg.text_dim * d + d + d * d + d
    final = 2 * d * d + 2 * d + d * cfg.in_channels * p + cfg.in_channels * p
    return blocks + patch_embed + time + text + final


def train_flops_per_sample(cfg: VideoDiTConfig, latent_shape: tuple[int, int, int], text_len: int) -> float:
    """Forward+backward FLOPs of one sample: 6 x params x tokens + attention scores (self and cross)."""
    t, h, w = latent_shape
    n = (t // cfg.patch[0]) * (h // cfg.patch[1]) * (w // cfg.patch[2])
    d, f = cfg.dim, cfg.ffn_hidden
    if cfg.text_mode == "joint":  # both streams' matmuls; attention over n + text_len tokens
        s, k = text_len, cfg.depth
        matmuls = k * n * (4 * d * d + 2 * d * f) + (k - 1) * s * (4 * d * d + 2 * d * f) + s * 2 * d * d
        scores = 2 * 2 * d * (n + s) * ((k - 1) * (n + s) + n)  # the last block has video queries only
        return 3.0 * (2 * matmuls + scores)
    block_matmuls = 4 * d * d + 2 * d * f + 2 * d * d  # self qkv/out, MLP, cross q/out (kv runs on the text)
    cross_kv = 2 * d * d * text_len
    attention = 2 * 2 * n * n * d + 2 * 2 * n * text_len * d  # QK^T and AV, self and cross
    return 3.0 * cfg.depth * (2 * n * block_matmuls + 2 * cross_kv + attention)
