"""Causal video VAE: reconstruction + KL, trained by the shared trainer; validation reports PSNR."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import torch
import torch.nn.functional as F

from framework import distributed as dist
from framework.config import RunConfig
from framework.export.video_io import to_uint8, write_grid_png, write_mp4
from framework.recipe import Built, Recipe
from recipes.video_common import VideoDataConfig, check_vae_buckets, video_stream, video_tensor
from recipes.video_vae.model import VideoVAE, VideoVAEConfig, kl_divergence


@dataclass
class VaeLossConfig:
    recon: Literal["mse", "l1"] = "mse"
    kl_weight: float = 1e-6


@dataclass
class VideoVaeConfig(RunConfig):
    recipe: str = "video_vae"
    model: VideoVAEConfig = field(default_factory=VideoVAEConfig)
    data: VideoDataConfig = field(default_factory=VideoDataConfig)
    loss: VaeLossConfig = field(default_factory=VaeLossConfig)


def psnr(x_hat: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """Per-clip PSNR in dB for videos in [-1, 1] (peak-to-peak 2): (B, 3, T, H, W) -> (B,)."""
    mse = (x_hat.float().clamp(-1, 1) - x.float()).pow(2).flatten(1).mean(1)
    return 10 * torch.log10(4.0 / mse.clamp_min(1e-10))


class VideoVaeRecipe(Recipe):
    name = "video_vae"
    config_class = VideoVaeConfig
    unit = "frames"

    def validate(self, cfg: VideoVaeConfig, world: int) -> None:
        check_vae_buckets(cfg.data.buckets, cfg.train.micro_batch, cfg.model.compression)

    def describe(self, cfg: VideoVaeConfig) -> str:
        n = sum(p.numel() for p in VideoVAE(cfg.model).parameters())
        ct, ch, cw = cfg.model.compression
        return f"{n / 1e6:.2f}M parameters, {ct}x{ch}x{cw} compression to {cfg.model.latent_channels} latent channels"

    def build_model(self, cfg: VideoVaeConfig) -> Built:
        return Built(model=VideoVAE(cfg.model))

    def build_data(self, cfg: VideoVaeConfig, split: str, rank: int, world: int, batch_multiple: int = 1):
        return video_stream(cfg.data, split, rank, world, cfg.train.seed, batch_multiple)

    def loss(self, cfg: VideoVaeConfig, model, helpers, batch, gen):
        x = video_tensor(batch)
        x_hat, mean, logvar = model(x, gen=gen)
        recon = F.mse_loss(x_hat.float(), x.float()) if cfg.loss.recon == "mse" else F.l1_loss(x_hat.float(), x.float())
        kl = kl_divergence(mean, logvar)
        return recon + cfg.loss.kl_weight * kl, {"recon": recon, "kl": kl, "psnr": psnr(x_hat, x).mean()}

    def work(self, cfg: VideoVaeConfig, batch: dict) -> tuple[float, float]:
        v = batch["video"]
        return float(v.shape[0] * v.shape[2]), 0.0

    def _reconstruct(self, model, x):
        vae = model.module if hasattr(model, "module") else model
        mean, _ = vae.encode(x, chunked=x.shape[2] > 33)  # chunks only where memory needs them
        return vae.decode(mean, chunked=x.shape[2] > 33)

    def evaluate(self, cfg: VideoVaeConfig, model, helpers, rank: int, world: int, step: int) -> dict:
        stream = video_stream(cfg.data, "val", rank, world, cfg.train.seed, num_workers=0)
        total, count = 0.0, 0
        for _, batch in zip(range(min(cfg.eval.batches, len(stream))), stream):
            x = video_tensor(batch).to(dist.device())
            total += float(psnr(self._reconstruct(model, x), x).sum())
            count += x.shape[0]
        total, count = dist.all_reduce([total, float(count)], op="sum")
        return {"psnr_db": total / max(1.0, count)}

    def sample(self, cfg: VideoVaeConfig, model, helpers, rank: int, world: int, step: int, out_dir: str) -> list[str]:
        """Side-by-side input | reconstruction mp4s of the first held-out clips (rank 0 writes)."""
        stream = video_stream(cfg.data, "val", rank, world, cfg.train.seed, num_workers=0)
        x = video_tensor(next(iter(stream)))[: cfg.eval.samples].to(dist.device())
        x_hat = self._reconstruct(model, x)
        if rank != 0:
            return []
        paths, grids = [], []
        for i in range(x.shape[0]):
            pair = torch.cat([x[i], x_hat[i].clamp(-1, 1)], dim=-1)
            frames = to_uint8(pair)
            grids.append(frames)
            paths.append(str(write_mp4(frames, Path(out_dir) / f"recon_{i}.mp4", cfg.data.fps)))
        paths.append(str(write_grid_png(grids, Path(out_dir) / "recon_grid.png")))
        values = psnr(x_hat, x).tolist()
        return [f"{p} (PSNR {v:.2f} dB)" if not math.isnan(v) else p for p, v in zip(paths, values + [math.nan])]
