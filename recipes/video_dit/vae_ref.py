"""The frozen VAE a DiT trains in: our video_vae's safetensors export, or a diffusers AutoencoderKLWan folder
(Wan2.1's VAE, wrapped in WanVAE), plus the latent normalisation the DiT sees."""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor, nn

from framework.config import ConfigError
from framework.data.latents import vae_digest
from framework.export import diffusers_wan
from framework.export.safetensors_io import read
from recipes.video_common import video_tensor
from recipes.video_vae.model import LatentGeometry, VideoVAE, VideoVAEConfig

WAN_CLASS = "AutoencoderKLWan"


@dataclass
class VaeRefConfig:
    # `launch/export.py RUN --format safetensors --out PATH` of a video_vae run, or a diffusers AutoencoderKLWan
    # folder (Wan2.1's `vae/`: config.json + diffusion_pytorch_model*.safetensors)
    path: str = "exports/video_vae"
    scale: float = 0.0  # latents are (z - shift) * scale; 0 estimates both from held-out clips at start
    shift: float = 0.0  # (a Wan VAE normalises by its own latents_mean / latents_std: leave both 0)
    stats_batches: int = 2

    def __post_init__(self) -> None:
        if is_wan_folder(self.path):
            check_wan_normalisation(self, self.path)


def is_wan_folder(path: str | Path) -> bool:
    """A folder whose config.json names diffusers' AutoencoderKLWan."""
    try:
        return json.loads((Path(path) / "config.json").read_text()).get("_class_name") == WAN_CLASS
    except (OSError, ValueError, AttributeError):
        return False


def check_wan_normalisation(cfg: VaeRefConfig, path: str) -> None:
    """A Wan VAE's latents come out normalised by its own latents_mean / latents_std (WanPipeline's
    convention, which a released Wan transformer was trained on); another vae.scale / vae.shift on top would
    silently train in a different latent space, so anything but the default (0, 0) or identity (1, 0) is an error."""
    if (cfg.scale, cfg.shift) not in ((0.0, 0.0), (1.0, 0.0)):
        raise ConfigError(f"vae.scale={cfg.scale:g} / vae.shift={cfg.shift:g}: the Wan VAE at {path} normalises its "
                          f"latents by its own latents_mean / latents_std (config.json); leave vae.scale and "
                          f"vae.shift at 0")


def load_vae(path: str) -> VideoVAE | WanVAE:
    """A VideoVAE from an export folder (model.safetensors + config.json naming recipe video_vae), or diffusers'
    AutoencoderKLWan from its folder wrapped as WanVAE; frozen, eval mode."""
    if is_wan_folder(path):
        return load_wan_vae(path)
    if not (Path(path) / "model.safetensors").is_file():
        raise ConfigError(f"vae.path: no model.safetensors in {path}; train the VAE preset and export it with "
                          f"`python launch/export.py runs/vae_tiny --format safetensors --out {path}`, or give a "
                          f"diffusers AutoencoderKLWan folder")
    state, config = read(path)
    if config.get("recipe") != "video_vae":
        raise ConfigError(f"vae.path: {path} holds a '{config.get('recipe')}' export, not a video_vae")
    vae = VideoVAE(VideoVAEConfig(**config["model"]))
    vae.load_state_dict(state)
    return vae.eval().requires_grad_(False)


def vae_config(path: str) -> VideoVAEConfig | WanVAEConfig | None:
    """The VAE config of an export or Wan folder (its config.json only, no weights read); None where there is
    none yet.

    Latent geometry comes from this config's `compression` / `latent_shape` and nowhere else, so validate,
    describe and work know the shapes before the weights are loaded.
    """
    config_file = Path(path) / "config.json"
    if not config_file.is_file():
        return None
    if is_wan_folder(path):
        return wan_vae_config(path)
    try:
        config = json.loads(config_file.read_text())
        if config.get("recipe") != "video_vae":
            raise ConfigError(f"vae.path: {path} holds a '{config.get('recipe')}' export, not a video_vae")
        return VideoVAEConfig(**config["model"])
    except (ValueError, TypeError, KeyError) as e:
        raise ConfigError(f"vae.path: {config_file} is not a video_vae export config: {e}") from e


# ---- Wan2.1's VAE in diffusers format ------------------------------------------------------------------------
@dataclass(frozen=True)
class WanVAEConfig(LatentGeometry):
    """What a diffusers AutoencoderKLWan config.json says about latents: channels (z_dim), compression
    (2 ** sum(temperal_downsample) in time; 2 per level after the first, times patch_size, in space) and the
    per-channel normalisation (latents_mean, latents_std)."""

    latent_channels: int
    compression: tuple[int, int, int]
    latents_mean: tuple[float, ...] = field(repr=False)
    latents_std: tuple[float, ...] = field(repr=False)


def wan_vae_config(path: str) -> WanVAEConfig:
    """WanVAEConfig of a folder's config.json (diffusers' defaults where an architecture key is absent, as
    from_pretrained does); a ConfigError naming the file for what our wrapper cannot use."""
    config_file = Path(path) / "config.json"
    try:
        raw = json.loads(config_file.read_text())
        z = int(raw.get("z_dim", 16))
        levels = len(raw.get("dim_mult", [1, 2, 4, 4]))
        down = raw.get("temperal_downsample", [False, True, True])[: levels - 1]
        space = 2 ** (levels - 1) * int(raw.get("patch_size") or 1)
        # save_pretrained writes every key, the statistics too; without them the latent space is unknown
        mean, std = raw["latents_mean"], raw["latents_std"]
        cfg = WanVAEConfig(z, (2 ** sum(bool(d) for d in down), space, space),
                           tuple(float(v) for v in mean), tuple(float(v) for v in std))
    except KeyError as e:
        raise ConfigError(f"vae.path: {config_file} has no {e} (AutoencoderKLWan's latent statistics)") from None
    except (OSError, ValueError, TypeError) as e:
        raise ConfigError(f"vae.path: {config_file} is not a readable AutoencoderKLWan config: {e}") from None
    if cfg.compression[0] != 4:  # diffusers' encoder steps through 4 frames at a time, whatever the config says
        raise ConfigError(f"vae.path: {config_file} compresses time {cfg.compression[0]}x; diffusers' Wan VAE "
                          f"encodes 1 + 4k frames, so only 4x temporal compression is supported")
    if len(cfg.latents_mean) != z or len(cfg.latents_std) != z or min(cfg.latents_std) <= 0:
        raise ConfigError(f"vae.path: {config_file} needs latents_mean and latents_std of z_dim={z} values each "
                          f"(std > 0); got {len(cfg.latents_mean)} and {len(cfg.latents_std)}")
    return cfg


class WanVAE(nn.Module):
    """diffusers' AutoencoderKLWan behind our VAE helper's interface, frozen.

    `encode` returns latents already normalised as WanPipeline does, (z - latents_mean) * (1 / latents_std) per
    channel, so the DiT trains in the released Wan transformer's latent space; `decode` takes such latents
    back (z / (1 / latents_std) + latents_mean, WanPipeline's order). diffusers encodes causally 4 frames at a
    time through its feature cache (the first frame alone) and decodes one latent frame at a time, whatever
    `chunked` says, so memory is bounded for long clips either way. `identity` is the cache key's digest.
    """

    # The trainer keeps this helper in fp32 in bf16 runs: WanPipeline and Wan's own code run this VAE in fp32, and
    # the latents a fine-tune trains on (and the latent cache) should be the ones the released model saw. 127M
    # parameters: 0.5 GB in fp32, counted so by the planner.
    frozen_dtype = torch.float32

    def __init__(self, module: nn.Module, cfg: WanVAEConfig, identity: str):
        super().__init__()
        self.module = module.eval().requires_grad_(False)
        self.cfg = cfg
        self.compression = cfg.compression
        self.identity = identity

    def latent_shape(self, video_shape: tuple[int, ...] | torch.Size) -> tuple[int, ...]:
        """(..., C, T, H, W) -> (..., z_dim, 1 + (T - 1) / 4, H / s, W / s)."""
        *lead, _, t, h, w = video_shape
        return (*lead, *self.cfg.latent_shape(t, h, w))

    def _stats(self, device: torch.device) -> tuple[Tensor, Tensor]:
        """(latents_mean, 1 / latents_std) as float32 (1, C, 1, 1, 1): built per call in float32, so a helper
        cast to bf16 keeps exact statistics (tensors of C values, nothing to cache)."""
        shape = (1, self.cfg.latent_channels, 1, 1, 1)
        mean = torch.tensor(self.cfg.latents_mean, dtype=torch.float32, device=device).view(shape)
        inv_std = 1.0 / torch.tensor(self.cfg.latents_std, dtype=torch.float32, device=device).view(shape)
        return mean, inv_std

    @torch.no_grad()
    def encode(self, x: Tensor, chunked: bool = True) -> tuple[Tensor, Tensor]:
        """x: (B, 3, 1 + 4k, H, W) in [-1, 1] -> normalised posterior mean and its logvar (float32, same
        normalisation: logvar - 2 log latents_std), (B, z_dim, 1 + k, H / s, W / s)."""
        self.cfg.check_video(*x.shape[2:])
        posterior = self.module.encode(x.to(next(self.module.parameters()).dtype)).latent_dist
        mean, inv_std = self._stats(x.device)
        return (posterior.mean.float() - mean) * inv_std, posterior.logvar.float() + 2.0 * inv_std.log()

    @torch.no_grad()
    def decode(self, z: Tensor, chunked: bool = True) -> Tensor:
        """z: normalised latents (B, z_dim, 1 + k, h, w) -> video (B, 3, 1 + 4k, H, W) in [-1, 1]."""
        mean, inv_std = self._stats(z.device)
        raw = z.float() / inv_std + mean
        return self.module.decode(raw.to(next(self.module.parameters()).dtype)).sample


def load_wan_vae(path: str) -> WanVAE:
    """diffusers' own AutoencoderKLWan from a local folder (no hub), wrapped; clear errors for what is missing."""
    cfg = wan_vae_config(path)
    try:
        diffusers_wan.weight_files(path)
    except (OSError, ValueError) as e:
        raise ConfigError(f"vae.path: {e}") from None
    try:
        from diffusers import AutoencoderKLWan
    except ImportError as e:
        raise ConfigError(f"vae.path: {path} is a diffusers AutoencoderKLWan folder, which needs diffusers "
                          f"(`pip install diffusers`): {e}") from None
    try:
        module = AutoencoderKLWan.from_pretrained(path, local_files_only=True)
    except (OSError, ValueError, RuntimeError) as e:
        raise ConfigError(f"vae.path: diffusers could not load the AutoencoderKLWan at {path}: "
                          f"{str(e).splitlines()[0]}") from None
    return WanVAE(module, cfg, vae_digest(path))


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


def own_normalisation(vae: nn.Module) -> tuple[float, float] | None:
    """(shift, scale) = (0, 1) for a VAE whose encode already normalises (WanVAE), else None."""
    return (0.0, 1.0) if isinstance(vae, WanVAE) else None


@torch.no_grad()
def latent_stats(cfg: VaeRefConfig, vae: VideoVAE | WanVAE, stream_fn: Callable) -> tuple[float, float]:
    """(shift, scale) so normalised latents have zero mean and unit variance; deterministic (held-out clips).
    A Wan VAE's latents are normalised already: (0, 1), and explicit other values are refused."""
    if own_normalisation(vae) is not None:
        check_wan_normalisation(cfg, cfg.path)
        return own_normalisation(vae)
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
