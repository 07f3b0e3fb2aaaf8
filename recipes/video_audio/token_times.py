"""The time in seconds that each video and audio token stands for: the midpoint of the interval it covers.

The joint model rotates one shared temporal RoPE band by these times in both towers, so a video token and
an audio token that describe the same instant get the same rotation, whatever the two streams' rates.

Video (causal VAE, temporal compression c, 4 by default): frame i is on screen during [i/fps, (i+1)/fps).
Latent 0 encodes frame 0 alone: [0, 1/fps), midpoint 0.5/fps. Latent k >= 1 encodes frames
c(k-1)+1 .. ck: [(c(k-1)+1)/fps, (ck+1)/fps), midpoint (ck - c/2 + 1)/fps, i.e. (4k-1)/fps for c = 4.
At 25 fps latents 0, 1, 2 sit at 0.02, 0.12, 0.28 s. Latent 0 is thus only a quarter as long as the
others, so times are not evenly spaced: they must be computed, not taken as k * c / fps.
A token that patches pt latents covers the union of their intervals and sits at its midpoint.

Audio (latent_rate latents per second, 25 for the audio VAE): latent j covers [j/rate, (j+1)/rate), and a
token of `patch` latents covers [j*patch/rate, (j+1)*patch/rate), midpoint (j + 1/2) * patch / rate.

Both take t0, the time of the clip's first frame / sample (e.g. its start in the source, or an offset).
"""

from __future__ import annotations

import torch
from torch import Tensor


def video_latent_intervals(latent_frames: int, fps: float, temporal_compression: int = 4) -> Tensor:
    """(latent_frames, 2) [start, end) seconds of each causal-VAE latent, from t0 = 0."""
    if fps <= 0 or temporal_compression < 1:
        raise ValueError(f"need fps > 0 and temporal_compression >= 1, got {fps}, {temporal_compression}")
    c = temporal_compression
    k = torch.arange(latent_frames, dtype=torch.float64)
    start = torch.where(k == 0, 0.0, c * (k - 1) + 1)  # first input frame of latent k
    end = c * k + 1  # one past its last input frame
    return torch.stack([start, end], dim=-1) / fps


def video_token_times(latent_frames: int, fps: float, temporal_compression: int = 4, patch_t: int = 1,
                      t0: float = 0.0) -> Tensor:
    """(latent_frames // patch_t,) float32 seconds: midpoint of the frames each temporal token covers."""
    if patch_t < 1 or latent_frames % patch_t:
        raise ValueError(f"latent_frames={latent_frames} is not a multiple of patch_t={patch_t}")
    iv = video_latent_intervals(latent_frames, fps, temporal_compression).view(-1, patch_t, 2)
    start, end = iv[:, 0, 0], iv[:, -1, 1]  # union of the token's consecutive latents
    return (t0 + (start + end) / 2).float()


def audio_token_times(latent_frames: int, latent_rate: float = 25.0, patch: int = 1, t0: float = 0.0) -> Tensor:
    """(latent_frames // patch,) float32 seconds: (j + 1/2) * patch / latent_rate + t0."""
    if latent_rate <= 0:
        raise ValueError(f"latent_rate must be positive, got {latent_rate}")
    if patch < 1 or latent_frames % patch:
        raise ValueError(f"latent_frames={latent_frames} is not a multiple of patch={patch}")
    j = torch.arange(latent_frames // patch, dtype=torch.float64)
    return (t0 + (j + 0.5) * patch / latent_rate).float()
