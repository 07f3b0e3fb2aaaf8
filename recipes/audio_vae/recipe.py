"""Audio VAE on log-mel frames: reconstruction + KL, trained by the shared trainer on the audio of the video
shards (the video loader's data.audio_rate); validation reports the log-mel reconstruction error in dB;
samples are Griffin-Lim wavs and a PNG of input | reconstruction mels."""

from __future__ import annotations

import wave
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np
import torch

from framework import distributed as dist
from framework.config import ConfigError, RunConfig
from framework.data.buckets import parse_buckets
from framework.nn.audio_features import DB_PER_NEPER, griffin_lim, log_mel, mel_filterbank
from framework.recipe import Built, Recipe
from recipes.audio_vae.model import AudioVAE, AudioVAEConfig, kl_divergence
from recipes.video_common import VideoDataConfig, video_stream

LOUD_DB = 30.0


@dataclass
class MelConfig:
    """Log-mel features (framework/nn/audio_features.py); rate / hop mel frames per second."""

    rate: int = 16000  # must equal data.audio_rate
    n_fft: int = 1024
    win_length: int = 400  # 25 ms: onsets stay sharp; zero-padded to n_fft for finer low-frequency bins
    hop: int = 160  # 100 frames per second at 16 kHz
    n_mels: int = 64
    fmin: float = 0.0
    fmax: float = 0.0  # 0 = rate / 2
    griffin_lim_iters: int = 32  # samples only


@dataclass
class AudioLossConfig:
    recon: Literal["l1", "mse"] = "l1"  # on log-mel (nepers), over frames with audio
    kl_weight: float = 1e-4


def _audio_data() -> VideoDataConfig:
    return VideoDataConfig(dir="datasets/flash_beep", fps=4.0, buckets=["16x16x8:4"], audio_rate=16000)


@dataclass
class AudioVaeConfig(RunConfig):
    recipe: str = "audio_vae"
    model: AudioVAEConfig = field(default_factory=AudioVAEConfig)
    mel: MelConfig = field(default_factory=MelConfig)
    data: VideoDataConfig = field(default_factory=_audio_data)
    loss: AudioLossConfig = field(default_factory=AudioLossConfig)


def mel_of(m: MelConfig, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """(log-mel (B, n_mels, T), frame mask (B, T)) of the batch's audio, channels mixed to mono; a frame counts
    when every sample of its hop had audio (clips without audio are silent with mask False)."""
    audio = batch["audio"].float().mean(1)
    mel = log_mel(audio, m.rate, m.n_fft, m.hop, m.n_mels, m.win_length, m.fmin, m.fmax or None)
    frames = mel.shape[-1]
    mask = batch["audio_mask"][:, : frames * m.hop].reshape(audio.shape[0], frames, m.hop).all(-1)
    return mel, mask


def frame_error(x_hat: torch.Tensor, x: torch.Tensor, mask: torch.Tensor, kind: str = "l1") -> torch.Tensor:
    """Mean |x_hat - x| (or squared) over the masked entries: (B, M, T) x 2 and a mask (B, T) of frames or
    (B, M, T) of entries -> ()."""
    diff = x_hat.float() - x.float()
    err = diff.abs() if kind == "l1" else diff.pow(2)
    w = (mask[:, None, :] if mask.dim() == 2 else mask).expand_as(err).to(err.dtype)
    return (err * w).sum() / w.sum().clamp_min(1.0)


def loud(x: torch.Tensor, mask: torch.Tensor, within_db: float = LOUD_DB) -> torch.Tensor:
    """(B, M, T) bool: entries of frames with audio within `within_db` of their clip's loudest entry; on the
    flash + beep data, the beeps, not the noise floor (whose random texture no autoencoder can reproduce)."""
    top = x.masked_fill(~mask[:, None, :], float("-inf")).flatten(1).amax(1)
    return (x >= top[:, None, None] - within_db / DB_PER_NEPER) & mask[:, None, :]


class AudioVaeRecipe(Recipe):
    name = "audio_vae"
    config_class = AudioVaeConfig
    unit = "mel_frames"
    export_sections = ("model", "mel")  # a user of the export needs the features the VAE was trained on

    def validate(self, cfg: AudioVaeConfig, world: int) -> None:
        m, d = cfg.mel, cfg.data
        if d.audio_rate != m.rate:
            raise ConfigError(f"data.audio_rate={d.audio_rate} must equal mel.rate={m.rate}: the loader resamples "
                              f"the audio to data.audio_rate and the features assume mel.rate")
        if m.hop < 1 or m.win_length > m.n_fft or m.win_length < m.hop:
            raise ConfigError(f"mel: need 1 <= mel.hop <= mel.win_length <= mel.n_fft; got hop={m.hop} "
                              f"win_length={m.win_length} n_fft={m.n_fft}")
        try:
            mel_filterbank(m.n_fft, m.n_mels, m.rate, m.fmin, m.fmax or None)
        except ValueError as e:
            raise ConfigError(f"mel (n_fft, n_mels, rate, fmin, fmax): {e}") from e
        try:
            buckets = parse_buckets(d.buckets)
        except ValueError as e:
            raise ConfigError(f"data.buckets: {e}") from e
        down = cfg.model.time_down
        for spec, b in zip(d.buckets, buckets):
            samples = round(b.seconds(d.fps) * m.rate)
            if (samples // m.hop) % down:
                raise ConfigError(f"data.buckets: {spec!r} at data.fps={d.fps} spans {samples} samples = "
                                  f"{samples // m.hop} mel frames of mel.hop={m.hop}; the VAE needs a multiple of "
                                  f"{down} (model.channel_mult has {len(cfg.model.channel_mult)} levels)")
        if cfg.train.micro_batch != max(b.batch_size for b in buckets):
            raise ConfigError(f"train.micro_batch={cfg.train.micro_batch} must equal the largest bucket batch in "
                              f"data.buckets ({max(b.batch_size for b in buckets)})")

    def describe(self, cfg: AudioVaeConfig) -> str:
        n = sum(p.numel() for p in AudioVAE(cfg.model, cfg.mel.n_mels).parameters())
        mel_fps = cfg.mel.rate / cfg.mel.hop
        return (f"{n / 1e6:.2f}M parameters, {cfg.mel.n_mels} mels at {mel_fps:g} frames/s -> "
                f"{cfg.model.latent_channels} latent channels at {mel_fps / cfg.model.time_down:g} frames/s")

    def build_model(self, cfg: AudioVaeConfig) -> Built:
        return Built(model=AudioVAE(cfg.model, cfg.mel.n_mels))

    def build_data(self, cfg: AudioVaeConfig, split: str, rank: int, world: int, batch_multiple: int = 1):
        return video_stream(cfg.data, split, rank, world, cfg.train.seed, batch_multiple)

    def loss(self, cfg: AudioVaeConfig, model, helpers, batch, gen):
        x, mask = mel_of(cfg.mel, batch)
        x_hat, mean, logvar = model(x, gen=gen)
        recon = frame_error(x_hat, x, mask, cfg.loss.recon)
        kl = kl_divergence(mean, logvar)
        l1_db = frame_error(x_hat.detach(), x, mask) * DB_PER_NEPER
        return recon + cfg.loss.kl_weight * kl, {"recon": recon, "kl": kl, "mel_l1_db": l1_db}

    def work(self, cfg: AudioVaeConfig, batch: dict) -> tuple[float, float]:
        a = batch["audio"]
        return float(a.shape[0] * (a.shape[-1] // cfg.mel.hop)), 0.0

    @staticmethod
    def _reconstruct(model, x: torch.Tensor) -> torch.Tensor:
        vae = model.module if hasattr(model, "module") else model
        mean, _ = vae.encode(x)
        return vae.decode(mean)

    def _val_batches(self, cfg: AudioVaeConfig, rank: int, world: int):
        return video_stream(cfg.data, "val", rank, world, cfg.train.seed, num_workers=0)

    def evaluate(self, cfg: AudioVaeConfig, model, helpers, rank: int, world: int, step: int) -> dict:
        """Held-out log-mel L1 (dB) and MSE (nepers^2) of the posterior mean's reconstruction over frames with
        audio, and the L1 over the loud entries alone (`loud`: within LOUD_DB of each clip's peak)."""
        stream = self._val_batches(cfg, rank, world)
        l1 = mse = n = l1_loud = n_loud = 0.0
        for _, batch in zip(range(min(cfg.eval.batches, len(stream))), stream):
            x, mask = mel_of(cfg.mel, {k: batch[k].to(dist.device()) for k in ("audio", "audio_mask")})
            x_hat = self._reconstruct(model, x)
            hot = loud(x, mask)
            count, count_loud = float(mask.sum()) * x.shape[1], float(hot.sum())
            l1 += float(frame_error(x_hat, x, mask)) * count
            mse += float(frame_error(x_hat, x, mask, "mse")) * count
            l1_loud += float(frame_error(x_hat, x, hot)) * count_loud
            n, n_loud = n + count, n_loud + count_loud
        l1, mse, n, l1_loud, n_loud = dist.all_reduce([l1, mse, n, l1_loud, n_loud], op="sum")
        return {"mel_l1_db": l1 / max(1.0, n) * DB_PER_NEPER, "mel_mse": mse / max(1.0, n),
                "mel_l1_db_loud": l1_loud / max(1.0, n_loud) * DB_PER_NEPER}

    def sample(self, cfg: AudioVaeConfig, model, helpers, rank: int, world: int, step: int, out_dir: str) -> list[str]:
        """Griffin-Lim wavs of input and reconstruction mels of the first held-out clips, and a PNG with a row
        per clip, input | reconstruction (rank 0 writes; every rank runs the forward)."""
        batch = next(iter(self._val_batches(cfg, rank, world)))
        x, mask = mel_of(cfg.mel, {k: batch[k][: cfg.eval.samples].to(dist.device()) for k in ("audio", "audio_mask")})
        x_hat = self._reconstruct(model, x).float()
        if rank != 0:
            return []
        m, out, paths = cfg.mel, Path(out_dir), []
        out.mkdir(parents=True, exist_ok=True)
        gen = torch.Generator().manual_seed(cfg.train.seed)
        for i in range(x.shape[0]):
            err = float(frame_error(x_hat[i:i + 1], x[i:i + 1], mask[i:i + 1])) * DB_PER_NEPER
            for tag, mel in (("input", x[i]), ("recon", x_hat[i])):
                wav = griffin_lim(mel.cpu(), m.rate, m.n_fft, m.hop, m.win_length, m.fmin, m.fmax or None,
                                  m.griffin_lim_iters, gen=gen)
                path = write_wav(wav, m.rate, out / f"{tag}_{i}.wav")
                paths.append(f"{path} (mel L1 {err:.2f} dB)" if tag == "recon" else str(path))
        paths.append(str(write_mel_png(x.cpu(), x_hat.cpu(), out / "mels.png")))
        return paths


def write_wav(wave_: torch.Tensor, rate: int, path: Path) -> Path:
    """Mono 16-bit PCM wav, peak-normalised to -1 dBFS when it would clip (Griffin-Lim gains are loose)."""
    x = wave_.detach().float().cpu().numpy()
    peak = float(np.abs(x).max()) if x.size else 0.0
    if peak > 0.89:
        x = x * (0.89 / peak)
    with wave.open(str(path), "wb") as f:
        f.setnchannels(1)
        f.setsampwidth(2)
        f.setframerate(rate)
        f.writeframes((x * 32767).round().astype("<i2").tobytes())
    return path


def write_mel_png(x: torch.Tensor, x_hat: torch.Tensor, path: Path) -> Path:
    """(B, M, T) x 2 -> a PNG, one row per clip, input | reconstruction, low frequencies at the bottom."""
    from PIL import Image

    lo, hi = float(x.min()), float(x.max())
    rows = [torch.cat([x[i], torch.full_like(x[i][:, :2], hi), x_hat[i]], dim=1).flip(0) for i in range(x.shape[0])]
    grid = ((torch.cat(rows, dim=0).clamp(lo, hi) - lo) / max(hi - lo, 1e-6) * 255).round().to(torch.uint8)
    Image.fromarray(grid.numpy()).resize((grid.shape[1] * 2, grid.shape[0] * 2), Image.NEAREST).save(path)
    return path
