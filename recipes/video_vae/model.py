"""Causal video VAE in the style of Wan2.1: causal 3D convolutions, 4x time and 8x8 space by default.

The first frame is encoded alone and every later group of 4 frames becomes one latent frame, so a video of
1 + 4k frames maps to 1 + k latents and an image is a 1-frame video. Nothing mixes frames except causal
convolutions (norms act per position), so `encode`/`decode` can run chunk by chunk through a FeatureCache
with bounded memory and the same result as running the whole clip.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor, nn

from framework.nn.causal_conv import CausalConv3d, FeatureCache
from framework.nn.init import gathered_for_init


class LatentGeometry:
    """How a causal video VAE maps video sizes to latent sizes: the first frame alone, then one latent per
    `compression[0]` frames. Subclasses give `latent_channels` and `compression` (time, height, width); our
    VideoVAEConfig and a diffusers Wan VAE's config (recipes/video_dit/vae_ref.py) share these two methods."""

    def latent_shape(self, frames: int, height: int, width: int) -> tuple[int, int, int, int]:
        """(latent_channels, T, h, w) that a (frames, height, width) video encodes to: the one place latent
        geometry is computed (the first frame alone, then one latent per `compression[0]` frames)."""
        self.check_video(frames, height, width)
        ct, ch, cw = self.compression
        return self.latent_channels, 1 + (frames - 1) // ct, height // ch, width // cw

    def check_video(self, frames: int, height: int, width: int) -> None:
        """ValueError unless the VAE can encode a video of this size (1 + k * compression[0] frames)."""
        ct, ch, cw = self.compression
        if frames < 1 or (frames - 1) % ct:
            raise ValueError(
                f"video has {frames} frames; the VAE needs 1 + {ct}k frames (1, {1 + ct}, {1 + 2 * ct}, ...)"
            )
        if height % ch or width % cw:
            raise ValueError(f"frame size {height}x{width} must be divisible by the spatial compression {ch}x{cw}")


@dataclass
class VideoVAEConfig(LatentGeometry):
    """Shape of the VAE; `channel_mult` has one entry per level, `temporal_down` one per down stage."""

    in_channels: int = 3
    latent_channels: int = 16
    base_channels: int = 32
    channel_mult: list[int] = field(default_factory=lambda: [1, 2, 4, 4])
    temporal_down: list[bool] = field(default_factory=lambda: [False, True, True])
    num_res_blocks: int = 1
    kl_weight: float = 1e-6  # read by the recipe's loss, not by the model
    logvar_init: float = 0.0  # initial log-variance of the posterior (bias of the encoder's logvar half)
    scale_factor: float = 1.0  # latent normalisation for the DiT: (z - shift) * scale_factor
    shift: float = 0.0

    def __post_init__(self) -> None:
        if len(self.temporal_down) != len(self.channel_mult) - 1:
            raise ValueError(
                f"temporal_down={self.temporal_down} needs len(channel_mult) - 1 = "
                f"{len(self.channel_mult) - 1} entries (one per down stage)"
            )

    @classmethod
    def tiny(cls) -> VideoVAEConfig:
        """CPU-test size: same 4x8x8 compression, a few thousand times fewer FLOPs."""
        return cls(base_channels=8, channel_mult=[1, 2, 2, 2])

    @property
    def compression(self) -> tuple[int, int, int]:
        """(time, height, width) downsampling factors."""
        space = 2 ** len(self.temporal_down)
        return 2 ** sum(self.temporal_down), space, space


class FrameGroupNorm(nn.GroupNorm):
    """GroupNorm over channel groups and space, separately for every frame: never mixes frames, so it stays
    causal and chunking cannot change it. (A per-position RMS norm over channels alone trained far slower
    here: one batch of the shapes dataset sat at ~18 dB PSNR after 150 steps, against ~23 dB with this.)"""

    def __init__(self, ch: int, eps: float = 1e-6) -> None:
        super().__init__(min(32, ch) if ch % min(32, ch) == 0 else 1, ch, eps=eps)

    def forward(self, x: Tensor) -> Tensor:
        """x: (B, C, T, H, W) -> same."""
        b, _, t = x.shape[:3]
        frames = rearrange(x, "b c t h w -> (b t) c h w")
        return rearrange(super().forward(frames), "(b t) c h w -> b c t h w", b=b, t=t)


class ResBlock(nn.Module):
    """(norm, SiLU, causal conv) x 2 plus a 1x1x1 skip when the width changes."""

    def __init__(self, in_ch: int, out_ch: int) -> None:
        super().__init__()
        self.norm1, self.conv1 = FrameGroupNorm(in_ch), CausalConv3d(in_ch, out_ch)
        self.norm2, self.conv2 = FrameGroupNorm(out_ch), CausalConv3d(out_ch, out_ch)
        self.skip = CausalConv3d(in_ch, out_ch, (1, 1, 1)) if in_ch != out_ch else None

    def forward(self, x: Tensor, fc: FeatureCache) -> Tensor:
        """x: (B, in_ch, T, H, W) -> (B, out_ch, T, H, W)."""
        h = fc(self.conv1, F.silu(self.norm1(x)))
        h = fc(self.conv2, F.silu(self.norm2(h)))
        return h + (x if self.skip is None else fc(self.skip, x))


class Downsample(nn.Module):
    """Halve H and W, and time too when `time`: a strided causal conv maps 1 + 2m frames to 1 + m.

    With two zero frames of past padding, output 0 sees only frame 0 and output i >= 1 sees frames
    2i-2..2i, so the first frame stays alone and later frames pair up.
    """

    def __init__(self, ch: int, time: bool) -> None:
        super().__init__()
        self.conv = CausalConv3d(ch, ch, (3 if time else 1, 3, 3), (2 if time else 1, 2, 2))

    def forward(self, x: Tensor, fc: FeatureCache) -> Tensor:
        """x: (B, C, T, H, W) -> (B, C, T', H/2, W/2), T' = 1 + (T - 1) / 2 when time else T."""
        return fc(self.conv, x)


class Upsample(nn.Module):
    """Double H and W, and time too when `time`: 1 + m frames -> 1 + 2m, the mirror of Downsample.

    Time: a causal conv makes 2C channels that unfold into two frames per input frame (depth-to-space);
    the video's first frame keeps only the second of its pair, so it decodes to one frame.
    """

    def __init__(self, ch: int, time: bool) -> None:
        super().__init__()
        self.time_conv = CausalConv3d(ch, 2 * ch, (3, 1, 1)) if time else None
        self.conv = CausalConv3d(ch, ch, (1, 3, 3))

    def forward(self, x: Tensor, fc: FeatureCache) -> Tensor:
        """x: (B, C, T, H, W) -> (B, C, T', 2H, 2W), T' = 2T - 1 on the first chunk, 2T after, else T."""
        if self.time_conv is not None:
            first = not fc.started(self.time_conv)
            x = rearrange(fc(self.time_conv, x), "b (two c) t h w -> b c (t two) h w", two=2)
            if first:
                x = x[:, :, 1:]
        x = F.interpolate(x, scale_factor=(1.0, 2.0, 2.0), mode="nearest")
        return fc(self.conv, x)


def _widths(cfg: VideoVAEConfig) -> list[int]:
    return [cfg.base_channels * m for m in cfg.channel_mult]


class Encoder(nn.Module):
    """Video (B, in_ch, 1 + 4k, H, W) -> moments (B, 2 * latent, 1 + k, H/8, W/8) with the defaults."""

    def __init__(self, cfg: VideoVAEConfig) -> None:
        super().__init__()
        widths = _widths(cfg)
        self.conv_in = CausalConv3d(cfg.in_channels, widths[0])
        blocks: list[nn.Module] = []
        ch = widths[0]
        for level, width in enumerate(widths):
            for _ in range(cfg.num_res_blocks):
                blocks.append(ResBlock(ch, width))
                ch = width
            if level < len(cfg.temporal_down):
                blocks.append(Downsample(ch, cfg.temporal_down[level]))
        blocks.append(ResBlock(ch, ch))  # middle
        self.blocks = nn.ModuleList(blocks)
        self.norm_out = FrameGroupNorm(ch)
        self.conv_out = CausalConv3d(ch, 2 * cfg.latent_channels)

    def forward(self, x: Tensor, fc: FeatureCache) -> Tensor:
        """x: one chunk (B, in_ch, T, H, W) of a video whose earlier chunks went through fc."""
        h = fc(self.conv_in, x)
        for block in self.blocks:
            h = block(h, fc)
        return fc(self.conv_out, F.silu(self.norm_out(h)))


class Decoder(nn.Module):
    """Latents (B, latent, 1 + k, h, w) -> video (B, in_ch, 1 + 4k, 8h, 8w) with the defaults."""

    def __init__(self, cfg: VideoVAEConfig) -> None:
        super().__init__()
        widths = _widths(cfg)
        ch = widths[-1]
        self.conv_in = CausalConv3d(cfg.latent_channels, ch)
        blocks: list[nn.Module] = [ResBlock(ch, ch)]  # middle
        for level in reversed(range(len(widths))):
            for _ in range(cfg.num_res_blocks + 1):
                blocks.append(ResBlock(ch, widths[level]))
                ch = widths[level]
            if level > 0:
                blocks.append(Upsample(ch, cfg.temporal_down[level - 1]))
        self.blocks = nn.ModuleList(blocks)
        self.norm_out = FrameGroupNorm(ch)
        self.conv_out = CausalConv3d(ch, cfg.in_channels)

    def forward(self, z: Tensor, fc: FeatureCache) -> Tensor:
        """z: one chunk (B, latent, T, h, w) of latents whose earlier chunks went through fc."""
        h = fc(self.conv_in, z)
        for block in self.blocks:
            h = block(h, fc)
        return fc(self.conv_out, F.silu(self.norm_out(h)))


def kl_divergence(mean: Tensor, logvar: Tensor) -> Tensor:
    """KL(N(mean, exp(logvar)) || N(0, 1)) averaged over all elements: (B, C, T, h, w) x 2 -> ()."""
    return 0.5 * (mean.pow(2) + logvar.exp() - 1.0 - logvar).mean()


class VideoVAE(nn.Module):
    """Causal video VAE: `encode` -> (mean, logvar), `decode` -> video, `forward` samples in between."""

    kl = staticmethod(kl_divergence)

    def __init__(self, cfg: VideoVAEConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.compression = cfg.compression
        self.scale_factor, self.shift = cfg.scale_factor, cfg.shift
        self.encoder, self.decoder = Encoder(cfg), Decoder(cfg)
        with gathered_for_init(self):
            # Configurable start of the posterior noise (0 = unit variance, the usual VAE start).
            nn.init.constant_(self.encoder.conv_out.bias[cfg.latent_channels:], cfg.logvar_init)

    def latent_shape(self, video_shape: tuple[int, ...] | torch.Size) -> tuple[int, ...]:
        """(..., C, T, H, W) -> (..., latent_channels, 1 + (T - 1) / 4, H / 8, W / 8) with the defaults."""
        *lead, _, t, h, w = video_shape
        return (*lead, *self.cfg.latent_shape(t, h, w))

    def _check_video(self, t: int, h: int, w: int) -> None:
        self.cfg.check_video(t, h, w)

    def encode(self, x: Tensor, chunked: bool = True) -> tuple[Tensor, Tensor]:
        """x: (B, C, 1 + 4k, H, W) -> mean, logvar: (B, latent, 1 + k, H/8, W/8).

        chunked runs the first frame, then 4 frames at a time, so memory does not grow with length.
        """
        self._check_video(*x.shape[2:])
        fc, ct = FeatureCache(), self.compression[0]
        if chunked:
            chunks = [x[:, :, :1]] + [x[:, :, i : i + ct] for i in range(1, x.shape[2], ct)]
            moments = torch.cat([self.encoder(c, fc) for c in chunks], dim=2)
        else:
            moments = self.encoder(x, fc)
        mean, logvar = moments.chunk(2, dim=1)
        return mean, logvar.clamp(-30.0, 20.0)  # keeps exp(logvar) finite early in training

    def decode(self, z: Tensor, chunked: bool = True) -> Tensor:
        """z: (B, latent, 1 + k, h, w) -> (B, C, 1 + 4k, 8h, 8w); chunked decodes one latent at a time."""
        fc = FeatureCache()
        if chunked:
            return torch.cat([self.decoder(z[:, :, i : i + 1], fc) for i in range(z.shape[2])], dim=2)
        return self.decoder(z, fc)

    def forward(
        self, x: Tensor, gen: torch.Generator | None = None, chunked: bool = False
    ) -> tuple[Tensor, Tensor, Tensor]:
        """x: (B, C, 1 + 4k, H, W) -> (x_hat like x, mean, logvar), decoding z = mean + std * eps(gen)."""
        mean, logvar = self.encode(x, chunked)
        eps = torch.randn(mean.shape, generator=gen, device=mean.device, dtype=mean.dtype)
        x_hat = self.decode(mean + (0.5 * logvar).exp() * eps, chunked)
        return x_hat, mean, logvar

    def normalize_latent(self, z: Tensor) -> Tensor:
        """VAE latent -> the unit-scale latent the DiT sees: (z - shift) * scale_factor."""
        return (z - self.shift) * self.scale_factor

    def denormalize_latent(self, z: Tensor) -> Tensor:
        """Inverse of normalize_latent."""
        return z / self.scale_factor + self.shift
