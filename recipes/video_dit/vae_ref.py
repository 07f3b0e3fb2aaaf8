"""The frozen VAE a DiT trains in: loaded from a safetensors export, plus its latent normalisation."""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from framework.config import ConfigError
from framework.export.safetensors_io import read
from recipes.video_common import video_tensor
from recipes.video_vae.model import VideoVAE, VideoVAEConfig


@dataclass
class VaeRefConfig:
    path: str = "exports/video_vae"  # `launch/export.py RUN --format safetensors --out PATH` of a video_vae run
    scale: float = 0.0  # latents are (z - shift) * scale; 0 estimates both from held-out clips at start
    shift: float = 0.0
    stats_batches: int = 2


def load_vae(path: str) -> VideoVAE:
    """A VideoVAE from an export folder (model.safetensors + config.json naming recipe video_vae)."""
    if not (Path(path) / "model.safetensors").is_file():
        raise ConfigError(f"vae.path: no model.safetensors in {path}; train the VAE preset and export it with "
                          f"`python launch/export.py runs/vae_tiny --format safetensors --out {path}`")
    state, config = read(path)
    if config.get("recipe") != "video_vae":
        raise ConfigError(f"vae.path: {path} holds a '{config.get('recipe')}' export, not a video_vae")
    vae = VideoVAE(VideoVAEConfig(**config["model"]))
    vae.load_state_dict(state)
    return vae.eval().requires_grad_(False)


def vae_config(path: str) -> VideoVAEConfig | None:
    """The VAE config of an export (its config.json only, no weights read); None where there is no export yet.

    Latent geometry comes from this config's `compression` / `latent_shape` and nowhere else, so validate,
    describe and work know the shapes before the weights are loaded.
    """
    config_file = Path(path) / "config.json"
    if not config_file.is_file():
        return None
    try:
        config = json.loads(config_file.read_text())
        if config.get("recipe") != "video_vae":
            raise ConfigError(f"vae.path: {path} holds a '{config.get('recipe')}' export, not a video_vae")
        return VideoVAEConfig(**config["model"])
    except (ValueError, TypeError, KeyError) as e:
        raise ConfigError(f"vae.path: {config_file} is not a video_vae export config: {e}") from e


def assumed_vae(latent_channels: int, time_compression: int = 4) -> VideoVAEConfig:
    """The default VAE architecture at this time compression (1, 2, 4 or 8): the geometry a run without its
    VAE export yet (`--describe`, a unit test) works with; the export's own config replaces it once it exists."""
    down = VideoVAEConfig().temporal_down
    if time_compression < 1 or 2 ** round(math.log2(time_compression)) != time_compression \
            or time_compression > 2 ** len(down):
        raise ConfigError(f"temporal compression {time_compression} is not a power of two up to {2 ** len(down)}")
    steps = round(math.log2(time_compression))
    return VideoVAEConfig(latent_channels=latent_channels,
                          temporal_down=[i >= len(down) - steps for i in range(len(down))])


@torch.no_grad()
def latent_stats(cfg: VaeRefConfig, vae: VideoVAE, stream_fn: Callable) -> tuple[float, float]:
    """(shift, scale) so normalised latents have zero mean and unit variance; deterministic (held-out clips)."""
    if cfg.scale > 0:
        return cfg.shift, cfg.scale
    values = []
    for _, batch in zip(range(cfg.stats_batches), stream_fn()):
        device = next(vae.parameters()).device
        video = video_tensor(batch).to(device=device, dtype=next(vae.parameters()).dtype)
        mean, _ = vae.encode(video, chunked=video.shape[2] > 33)
        values.append(mean.float().flatten())
    z = torch.cat(values)
    return float(z.mean()), float(1.0 / z.std().clamp_min(1e-6))
