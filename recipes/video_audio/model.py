"""Joint video-audio DiT: two towers of the video DiT's blocks, bridged in every block by bidirectional
cross-modal attention, with one temporal RoPE band in seconds shared by both (see time_rope.py).

Each joint block runs, per tower: adaLN-Zero self-attention (t/h/w RoPE, t in seconds) -> text
cross-attention -> cross-modal attention (video queries on audio keys and audio queries on video keys, both
from the same pre-exchange states, q/k rotated by the shared t band only) -> adaLN-Zero MLP. Each tower has
its own timestep (t_video, t_audio), text projection and output head, so the modalities can be noised
independently. The cross-modal output projections start at zero: at init the model *is* two independent
towers, each the same function as a `DiTBlock` stack (tests check this), and training grows the bridge.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar, NamedTuple

from einops import rearrange
from torch import Tensor, nn

from framework.nn import sequence_parallel
from framework.nn.checkpointing import CheckpointingMode, normalise_mode, run_block, should_checkpoint
from framework.nn.dit import Attention, DiTBlock, FinalLayer, TimestepEmbedder, modulate, patchify, unpatchify
from framework.nn.init import gathered_for_init, xavier_linears
from framework.nn.rope import apply_rope
from recipes.video_audio.time_rope import audio_positions, rope_tables, time_only_rope, video_positions
from recipes.video_audio.token_times import audio_token_times, video_token_times


@dataclass
class JointAVConfig:
    video_channels: int = 16  # video VAE latent channels
    audio_channels: int = 8  # audio VAE latent channels
    video_patch: list[int] = field(default_factory=lambda: [1, 2, 2])  # (pt, ph, pw)
    audio_patch: int = 1  # audio latents per token
    dim: int = 128
    depth: int = 4
    heads: int = 4
    ffn_hidden: int = 512
    qk_norm: bool = True
    rope_theta: float = 10000.0
    text_dim: int = 128
    timestep_scale: float = 1000.0  # diffusion t in [0, 1] is embedded as t * timestep_scale (as in VideoDiT)
    rope_positions_per_second: float = 25.0  # of the shared t band: 25 = one audio latent per position
    fps: float = 25.0  # video frame rate, when forward is not told otherwise
    temporal_compression: int = 4  # video VAE frames per latent (after the lone first frame)
    audio_latent_rate: float = 25.0  # audio VAE latents per second
    shared_time_rope: bool = True  # False: cross-modal attention without any rotation (the ablation)
    activation_checkpointing: CheckpointingMode = "none"  # none | full | every_k; true/false = full/none
    activation_checkpointing_every: int = 2  # every_k: blocks 0, k, 2k, ... recomputed in backward
    # Keys saved under an older name (framework.config.from_dict reads them as the new one, with a warning).
    RENAMED_KEYS: ClassVar[dict[str, str]] = {"time_scale": "rope_positions_per_second"}

    def __post_init__(self) -> None:
        self.activation_checkpointing = normalise_mode(self.activation_checkpointing,
                                                       self.activation_checkpointing_every)
        if self.dim % self.heads:
            raise ValueError(f"model.dim={self.dim} is not divisible by model.heads={self.heads}")
        if len(self.video_patch) != 3 or min(self.video_patch) < 1 or self.audio_patch < 1:
            raise ValueError(f"bad patch sizes: video {self.video_patch}, audio {self.audio_patch}")

    @property
    def head_dim(self) -> int:
        return self.dim // self.heads


class Stream(NamedTuple):
    """What one tower's blocks need besides its tokens; cross_rope is None without the shared time band."""

    time6: Tensor  # (B, 6, D) shared adaLN projection of this stream's timestep
    rope: tuple[Tensor, Tensor]  # self-attention (cos, sin): (N, head_dim)
    cross_rope: tuple[Tensor, Tensor] | None  # cross-modal (cos, sin): t band only
    text: Tensor | None  # (B, S, D)
    text_mask: Tensor | None  # (B, S) True = real token


class Tower(nn.Module):
    """One modality's ends: patch embedding, timestep and text conditioning, output head. Tokens are 3-D
    patches of (B, C, T, H, W); audio (B, C, T) is passed as (B, C, T, 1, 1) with patch (p, 1, 1)."""

    def __init__(self, channels: int, patch: tuple[int, int, int], cfg: JointAVConfig):
        super().__init__()
        self.channels, self.patch = channels, patch
        patch_dim = channels * patch[0] * patch[1] * patch[2]
        self.patch_embed = nn.Linear(patch_dim, cfg.dim)
        self.time_embed = TimestepEmbedder(cfg.dim, scale=cfg.timestep_scale)
        self.time_proj = nn.Linear(cfg.dim, 6 * cfg.dim)
        self.text_proj = nn.Sequential(nn.Linear(cfg.text_dim, cfg.dim), nn.GELU(approximate="tanh"),
                                       nn.Linear(cfg.dim, cfg.dim))
        self.final = FinalLayer(cfg.dim, patch_dim)

    def embed(self, x: Tensor) -> tuple[Tensor, tuple[int, int, int]]:
        for size, p, axis in zip(x.shape[2:], self.patch, "THW"):
            if size % p:
                raise ValueError(f"latent {axis}={size} is not divisible by patch size {p}")
        grid = tuple(size // p for size, p in zip(x.shape[2:], self.patch))
        return self.patch_embed(patchify(x, self.patch)), grid

    def condition(self, t: Tensor) -> tuple[Tensor, Tensor]:
        """t (B,) -> c (B, D) for the head, time6 (B, 6, D) for the blocks."""
        c = self.time_embed(t)
        return c, self.time_proj(nn.functional.silu(c)).unflatten(1, (6, -1))

    def head(self, tokens: Tensor, c: Tensor, grid: tuple[int, int, int]) -> Tensor:
        """Under train.sequence_parallel the shards meet after `final`, so its weights see each token once."""
        return unpatchify(sequence_parallel.gather(self.final(tokens, c), 1), grid, self.patch, self.channels)


class CrossModalAttention(nn.Module):
    """Queries from one stream, keys/values from the other; q and k rotated by their own times (t band only).

    Returns the residual update; `attn.out` is zero-initialised by the model, so the update starts at zero.
    """

    def __init__(self, dim: int, heads: int, qk_norm: bool = True):
        super().__init__()
        self.norm_q = nn.LayerNorm(dim, eps=1e-6)
        self.norm_kv = nn.LayerNorm(dim, eps=1e-6)
        self.attn = Attention(dim, heads, qk_norm=qk_norm)  # its q/kv/out/norms; forward is ours

    def forward(self, x: Tensor, other: Tensor, x_rope: tuple[Tensor, Tensor] | None,
                other_rope: tuple[Tensor, Tensor] | None) -> Tensor:
        a = self.attn
        q = a.q_norm(rearrange(a.q(self.norm_q(x)), "b n (h d) -> b h n d", h=a.heads))
        k, v = rearrange(a.kv(self.norm_kv(other)), "b s (two h d) -> two b h s d", two=2, h=a.heads)
        k = a.k_norm(k)
        if x_rope is not None and other_rope is not None:
            q, k = apply_rope(q, *x_rope), apply_rope(k, *other_rope)
        # Under train.sequence_parallel both streams are shards: DeepSpeed's all-to-all gives each rank all of
        # them for H/N heads, so every video token still attends to every audio token (and back).
        return a.out(rearrange(sequence_parallel.sharded_attention(q, k, v), "b h n d -> b n (h d)"))


def attend(block: DiTBlock, x: Tensor, s: Stream) -> Tensor:
    """First half of `DiTBlock.forward`: adaLN-Zero self-attention, then text cross-attention."""
    shift1, scale1, gate1 = (s.time6 + block.modulation).unbind(dim=1)[:3]
    x = x + gate1[:, None] * block.attn(modulate(block.norm1(x), shift1, scale1), rope=s.rope)
    if block.cross is not None and s.text is not None:
        x = x + block.cross(block.norm_cross(x), context=s.text, key_padding_mask=s.text_mask)
    return x


def feed_forward(block: DiTBlock, x: Tensor, s: Stream) -> Tensor:
    """Second half of `DiTBlock.forward`: the adaLN-Zero MLP."""
    shift2, scale2, gate2 = (s.time6 + block.modulation).unbind(dim=1)[3:]
    return x + gate2[:, None] * block.mlp(modulate(block.norm2(x), shift2, scale2))


class JointBlock(nn.Module):
    """A video and an audio `DiTBlock`, with cross-modal attention both ways between their halves."""

    def __init__(self, cfg: JointAVConfig):
        super().__init__()
        self.video = DiTBlock(cfg.dim, cfg.heads, cfg.ffn_hidden, cfg.qk_norm)
        self.audio = DiTBlock(cfg.dim, cfg.heads, cfg.ffn_hidden, cfg.qk_norm)
        self.audio_to_video = CrossModalAttention(cfg.dim, cfg.heads, cfg.qk_norm)  # video queries
        self.video_to_audio = CrossModalAttention(cfg.dim, cfg.heads, cfg.qk_norm)  # audio queries

    def forward(self, v: Tensor, a: Tensor, sv: Stream, sa: Stream,
                bridge: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """bridge (B, 1, 1) float: 0 cuts both cross-modal updates of a row (modality dropout), None keeps all."""
        v, a = attend(self.video, v, sv), attend(self.audio, a, sa)
        # Both directions read the same pre-exchange states, so neither tower sees the other one step ahead.
        to_v = self.audio_to_video(v, a, sv.cross_rope, sa.cross_rope)
        to_a = self.video_to_audio(a, v, sa.cross_rope, sv.cross_rope)
        if bridge is not None:
            to_v, to_a = to_v * bridge, to_a * bridge
        v, a = v + to_v, a + to_a
        return feed_forward(self.video, v, sv), feed_forward(self.audio, a, sa)


class JointAVDiT(nn.Module):
    """forward(video (B, Cv, T, H, W), audio (B, Ca, Ta), t_video (B,), t_audio (B,), text (B, S, text_dim),
    text_mask (B, S), bridge (B,) bool) -> (video velocity like video, audio velocity like audio).

    bridge False cuts a row's cross-modal attention: each tower then sees only its own modality and the
    text, which is what modality dropout trains and cross-modal guidance samples as its unconditional branch.
    """

    def __init__(self, cfg: JointAVConfig):
        super().__init__()
        self.cfg = cfg
        self.video = Tower(cfg.video_channels, tuple(cfg.video_patch), cfg)
        self.audio = Tower(cfg.audio_channels, (cfg.audio_patch, 1, 1), cfg)
        self.blocks = nn.ModuleList(JointBlock(cfg) for _ in range(cfg.depth))
        with gathered_for_init(self):
            self._init_weights()

    def _init_weights(self) -> None:
        xavier_linears(self)
        zero = [t.time_proj for t in (self.video, self.audio)]  # adaLN-Zero: blocks start as the identity
        zero += [layer for t in (self.video, self.audio) for layer in (t.final.modulation, t.final.proj)]
        zero += [x.attn.out for b in self.blocks for x in (b.audio_to_video, b.video_to_audio)]  # no bridge yet
        for layer in zero:
            nn.init.zeros_(layer.weight)
            nn.init.zeros_(layer.bias)

    def token_times(self, video_latent_frames: int, audio_latent_frames: int, fps: float | None = None,
                    video_t0: float = 0.0, audio_t0: float = 0.0) -> tuple[Tensor, Tensor]:
        """Seconds of the video's temporal tokens and of the audio tokens (see token_times.py)."""
        cfg = self.cfg
        vt = video_token_times(video_latent_frames, fps or cfg.fps, cfg.temporal_compression, cfg.video_patch[0],
                               video_t0)
        at = audio_token_times(audio_latent_frames, cfg.audio_latent_rate, cfg.audio_patch, audio_t0)
        return vt, at

    def forward(self, video: Tensor, audio: Tensor, t_video: Tensor, t_audio: Tensor, text: Tensor,
                text_mask: Tensor | None = None, bridge: Tensor | None = None, fps: float | None = None,
                video_t0: float = 0.0, audio_t0: float = 0.0) -> tuple[Tensor, Tensor]:
        cfg, dev = self.cfg, video.device
        v, grid_v = self.video.embed(video)
        a, grid_a = self.audio.embed(audio[..., None, None])
        vt, at = (x.to(dev) for x in self.token_times(video.shape[2], audio.shape[2], fps, video_t0, audio_t0))
        c_v, time6_v = self.video.condition(t_video)
        c_a, time6_a = self.audio.condition(t_audio)
        rope_v = rope_tables(video_positions(vt, grid_v, cfg.rope_positions_per_second), cfg.head_dim, cfg.rope_theta)
        rope_a = rope_tables(audio_positions(at, cfg.rope_positions_per_second), cfg.head_dim, cfg.rope_theta)
        cross_v = cross_a = None
        if cfg.shared_time_rope:
            per_token_vt = vt.repeat_interleave(grid_v[1] * grid_v[2])
            cross_v = time_only_rope(per_token_vt, cfg.head_dim, cfg.rope_positions_per_second, cfg.rope_theta)
            cross_a = time_only_rope(at, cfg.head_dim, cfg.rope_positions_per_second, cfg.rope_theta)
        # Under train.sequence_parallel each rank keeps 1/N of each tower's tokens; RoPE and the times in seconds
        # are those of the full sequences, sliced alongside.
        v, rope_v, cross_v = sequence_parallel.shard_tokens(v, rope_v, cross_v, what=f"the video latent grid {grid_v}")
        a, rope_a, cross_a = sequence_parallel.shard_tokens(a, rope_a, cross_a, what=f"the audio latents ({grid_a[0]})")
        sv = Stream(time6_v, rope_v, cross_v, self.video.text_proj(text), text_mask)
        sa = Stream(time6_a, rope_a, cross_a, self.audio.text_proj(text), text_mask)
        gate = None if bridge is None else bridge.to(device=dev, dtype=v.dtype).view(-1, 1, 1)
        for i, block in enumerate(self.blocks):
            recompute = self.training and should_checkpoint(cfg.activation_checkpointing,
                                                            cfg.activation_checkpointing_every, i)
            v, a = run_block(block, v, a, sv, sa, gate, checkpoint=recompute)
        return self.video.head(v, c_v, grid_v), self.audio.head(a, c_a, grid_a)[..., 0, 0]
