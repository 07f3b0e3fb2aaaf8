"""The frozen audio VAE the joint model trains in: loaded from a safetensors export of an audio_vae run, with
the log-mel features it was trained on; audio <-> normalised latents (waveforms back by Griffin-Lim)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

from framework.config import ConfigError, from_dict
from framework.export.safetensors_io import read
from framework.nn.audio_features import griffin_lim
from recipes.audio_vae.model import AudioVAE, AudioVAEConfig
from recipes.audio_vae.recipe import MelConfig, mel_of


@dataclass
class AudioVaeRefConfig:
    path: str = "exports/audio_vae_tiny"  # `launch/export.py RUN --out PATH` of an audio_vae run
    scale: float = 0.0  # latents are (z - shift) * scale; 0 estimates both from held-out clips at start
    shift: float = 0.0


class FrozenAudioVAE(torch.nn.Module):
    """An AudioVAE and its MelConfig: `encode` a batch's audio to latents (B, C, T) and a per-latent mask of
    frames that had audio; `decode` latents to waveforms (B, N)."""

    def __init__(self, vae: AudioVAE, mel: MelConfig):
        super().__init__()
        self.vae, self.mel = vae.eval().requires_grad_(False), mel

    @property
    def latent_rate(self) -> float:
        return self.mel.rate / self.mel.hop / self.vae.cfg.time_down

    @torch.no_grad()
    def encode(self, audio: Tensor, audio_mask: Tensor) -> tuple[Tensor, Tensor]:
        """audio (B, channels, N) float, audio_mask (B, N) -> (posterior mean (B, C, T), mask (B, T)); the mel
        frames beyond the last whole latent are dropped (a clip of T / rate seconds gives T latents)."""
        mel, frame_mask = mel_of(self.mel, {"audio": audio, "audio_mask": audio_mask})
        down = self.vae.cfg.time_down
        usable = mel.shape[-1] // down * down
        mean, _ = self.vae.encode(mel[..., :usable])
        mask = frame_mask[:, :usable].reshape(mel.shape[0], -1, down).all(-1)
        return mean.float(), mask

    @torch.no_grad()
    def decode(self, z: Tensor, iters: int | None = None, gen: torch.Generator | None = None) -> Tensor:
        """Latents (B, C, T) -> mono waveforms (B, T * time_down * hop) by Griffin-Lim on the decoded log-mels."""
        m = self.mel
        mels = self.vae.decode(z.float()).cpu()
        return griffin_lim(mels, m.rate, m.n_fft, m.hop, m.win_length, m.fmin, m.fmax or None,
                           iters or m.griffin_lim_iters, gen=gen)


def load_audio_vae(path: str) -> FrozenAudioVAE:
    """A FrozenAudioVAE from an export folder (model.safetensors + config.json naming recipe audio_vae)."""
    if not (Path(path) / "model.safetensors").is_file():
        raise ConfigError(f"audio_vae.path: no model.safetensors in {path}; train the audio VAE preset and export "
                          f"it with `python launch/export.py runs/audio_vae_tiny --out {path}`")
    state, config = read(path)
    if config.get("recipe") != "audio_vae":
        raise ConfigError(f"audio_vae.path: {path} holds a '{config.get('recipe')}' export, not an audio_vae")
    if "mel" not in config:
        raise ConfigError(f"audio_vae.path: {path}/config.json has no 'mel' section (exported by an older "
                          f"launch/export.py); export the run again")
    mel = from_dict(MelConfig, config["mel"])
    vae = AudioVAE(from_dict(AudioVAEConfig, config["model"]), mel.n_mels)
    vae.load_state_dict(state)
    return FrozenAudioVAE(vae, mel)
