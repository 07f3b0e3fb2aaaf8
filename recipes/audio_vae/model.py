"""1-D convolutional VAE over log-mel frames: time downsampled by 2 per down stage (4x with the defaults, so
100 mel frames per second become 25 latent frames per second, a 25 fps video's clock), mel bins folded into
channels. Same posterior as the video VAE (mean, logvar; a sample in training, the mean to reconstruct).

Convolutions are not causal and GroupNorm spans the clip: audio clips are encoded whole, never streamed.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from recipes.video_vae.model import kl_divergence

__all__ = ["AudioVAE", "AudioVAEConfig", "kl_divergence"]


@dataclass
class AudioVAEConfig:
    """Shape of the VAE; `channel_mult` has one entry per level, a down stage between neighbours."""

    latent_channels: int = 8
    base_channels: int = 64
    channel_mult: list[int] = field(default_factory=lambda: [1, 2, 2])
    num_res_blocks: int = 1
    logvar_init: float = 0.0  # initial log-variance of the posterior (bias of the encoder's logvar half)
    # Log-mel in nepers is about -11.5 (the floor) to 1: the model sees (x - mel_shift) / mel_scale.
    mel_shift: float = -5.0
    mel_scale: float = 4.0

    @property
    def time_down(self) -> int:
        """Mel frames per latent frame."""
        return 2 ** (len(self.channel_mult) - 1)


def _norm(ch: int) -> nn.GroupNorm:
    return nn.GroupNorm(min(32, ch) if ch % min(32, ch) == 0 else 1, ch, eps=1e-6)


class ResBlock1d(nn.Module):
    """(norm, SiLU, conv k=3) x 2 plus a 1x1 skip when the width changes."""

    def __init__(self, in_ch: int, out_ch: int) -> None:
        super().__init__()
        self.norm1, self.conv1 = _norm(in_ch), nn.Conv1d(in_ch, out_ch, 3, padding=1)
        self.norm2, self.conv2 = _norm(out_ch), nn.Conv1d(out_ch, out_ch, 3, padding=1)
        self.skip = nn.Conv1d(in_ch, out_ch, 1) if in_ch != out_ch else None

    def forward(self, x: Tensor) -> Tensor:
        h = self.conv2(F.silu(self.norm2(self.conv1(F.silu(self.norm1(x))))))
        return h + (x if self.skip is None else self.skip(x))


def _stack(widths: list[int], blocks: int, between: type[nn.Module]) -> nn.ModuleList:
    layers: list[nn.Module] = []
    for i, w in enumerate(widths):
        prev = widths[max(0, i - 1)]
        if i:
            layers.append(between(prev))
        layers.extend(ResBlock1d(prev if j == 0 else w, w) for j in range(blocks))
    return nn.ModuleList(layers)


class Down(nn.Module):
    """Halve time with a strided conv (k=4, s=2, pad=1: exact for even lengths)."""

    def __init__(self, ch: int) -> None:
        super().__init__()
        self.conv = nn.Conv1d(ch, ch, 4, stride=2, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(x)


class Up(nn.Module):
    """Double time: nearest repeat, then a conv (no checkerboard of transposed convs)."""

    def __init__(self, ch: int) -> None:
        super().__init__()
        self.conv = nn.Conv1d(ch, ch, 3, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class AudioVAE(nn.Module):
    """Log-mel (B, n_mels, T) -> `encode` (mean, logvar) (B, latent, T / time_down) -> `decode` log-mel."""

    kl = staticmethod(kl_divergence)

    def __init__(self, cfg: AudioVAEConfig, n_mels: int) -> None:
        super().__init__()
        self.cfg, self.n_mels = cfg, n_mels
        widths = [cfg.base_channels * m for m in cfg.channel_mult]
        self.enc_in = nn.Conv1d(n_mels, widths[0], 3, padding=1)
        self.enc = _stack(widths, cfg.num_res_blocks, Down)
        self.enc_norm, self.enc_out = _norm(widths[-1]), nn.Conv1d(widths[-1], 2 * cfg.latent_channels, 3, padding=1)
        rev = widths[::-1]
        self.dec_in = nn.Conv1d(cfg.latent_channels, rev[0], 3, padding=1)
        self.dec = _stack(rev, cfg.num_res_blocks, Up)
        self.dec_norm, self.dec_out = _norm(rev[-1]), nn.Conv1d(rev[-1], n_mels, 3, padding=1)
        with torch.no_grad():
            self.enc_out.bias[cfg.latent_channels:].fill_(cfg.logvar_init)

    def encode(self, mel: Tensor) -> tuple[Tensor, Tensor]:
        """mel (B, n_mels, T), T a multiple of time_down -> mean, logvar (B, latent, T / time_down)."""
        if mel.shape[-1] % self.cfg.time_down:
            raise ValueError(f"{mel.shape[-1]} mel frames: need a multiple of {self.cfg.time_down}")
        # Normalise in fp32, then compute in the weights' dtype (bf16 when a bf16 run casts the frozen helper).
        h = self.enc_in(((mel.float() - self.cfg.mel_shift) / self.cfg.mel_scale).to(self.enc_in.weight.dtype))
        for layer in self.enc:
            h = layer(h)
        mean, logvar = self.enc_out(F.silu(self.enc_norm(h))).chunk(2, dim=1)
        return mean, logvar.clamp(-30.0, 20.0)

    def decode(self, z: Tensor) -> Tensor:
        """z (B, latent, t) -> log-mel (B, n_mels, t * time_down)."""
        h = self.dec_in(z.to(self.dec_in.weight.dtype))
        for layer in self.dec:
            h = layer(h)
        return self.dec_out(F.silu(self.dec_norm(h))) * self.cfg.mel_scale + self.cfg.mel_shift

    def forward(self, mel: Tensor, gen: torch.Generator | None = None) -> tuple[Tensor, Tensor, Tensor]:
        """(reconstruction from a posterior sample drawn with gen, mean, logvar)."""
        mean, logvar = self.encode(mel)
        eps = torch.randn(mean.shape, generator=gen, device=mean.device, dtype=mean.dtype)
        z = mean + (0.5 * logvar).exp() * eps
        return self.decode(z), mean, logvar
