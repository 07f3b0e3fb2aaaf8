"""Frozen helpers for the video recipes' tests, without training: randomly initialised tiny VAEs written as
the safetensors exports `launch/export.py` makes (model.safetensors + config.json), so the recipes load them
through their real `build_helpers`."""

from __future__ import annotations

from pathlib import Path

import torch

from framework.config import to_dict
from framework.export import safetensors_io
from recipes.audio_vae.model import AudioVAE, AudioVAEConfig
from recipes.audio_vae.recipe import MelConfig
from recipes.video_vae.model import VideoVAE, VideoVAEConfig


def write_video_vae(out: Path, temporal_down: list[bool], latent_channels: int = 16) -> VideoVAE:
    """A tiny random causal video VAE (8x8 in space, 2 ** sum(temporal_down) in time) exported to `out`."""
    torch.manual_seed(0)
    cfg = VideoVAEConfig(latent_channels=latent_channels, base_channels=8, channel_mult=[1, 2, 2, 2],
                         temporal_down=temporal_down)
    vae = VideoVAE(cfg).eval()
    safetensors_io.write(vae.state_dict(), {"recipe": "video_vae", "model": to_dict(cfg)}, out)
    return vae


def write_audio_vae(out: Path) -> None:
    """A tiny random audio VAE at the joint preset's 16 kHz, 25 latents per second, 8 channels."""
    torch.manual_seed(0)
    cfg, mel = AudioVAEConfig(base_channels=16), MelConfig()
    vae = AudioVAE(cfg, mel.n_mels)
    safetensors_io.write(vae.state_dict(), {"recipe": "audio_vae", "model": to_dict(cfg), "mel": to_dict(mel)}, out)


def joint_exports(base: Path, temporal_down: list[bool] = (False, False, False)) -> list[str]:
    """vae.path / audio_vae.path overrides of the joint preset pointing at fresh random exports under `base`."""
    write_video_vae(base / "video_vae", list(temporal_down))
    write_audio_vae(base / "audio_vae")
    return [f"vae.path={base / 'video_vae'}", f"audio_vae.path={base / 'audio_vae'}"]


JOINT_PRESET = "recipes/video_audio/configs/tiny.yaml"
JOINT_SMALL = ["model.dim=32", "model.depth=2", "model.heads=2", "model.ffn_hidden=64", "model.text_dim=32",
               "text.layers=1", "text.heads=2", "data.buckets=['32x32x9:2']", "train.micro_batch=2",
               "train.global_batch=2", "sample.steps=2", "sample.griffin_lim_iters=2", "vae.stats_batches=1",
               "eval.batches=1", "eval.samples=1", "data.num_workers=0"]


def joint_evaluation(data_dir: Path, base: Path, device: str) -> tuple[dict, list[str]]:
    """The joint recipe's evaluate hook, then its video-to-audio sample hook (held-out clips' latents as the
    given modality), with the model and frozen VAEs on `device` and the loader's batches as it yields them
    (CPU tensors): the metrics and the sample lines."""
    from framework.recipe import load_run_config

    cfg, recipe = load_run_config(JOINT_PRESET, [*JOINT_SMALL, f"data.dir={data_dir}", *joint_exports(base)], world=1)
    torch.manual_seed(0)
    model = recipe.build_model(cfg).model.to(device).eval()
    helpers = {k: v.to(device).eval() for k, v in recipe.build_helpers(cfg).items()}
    with torch.no_grad():
        values = recipe.evaluate(cfg, model, helpers, 0, 1, 0)
        cfg.sample.mode = "video_to_audio"
        lines = recipe.sample(cfg, model, helpers, 0, 1, 0, str(base / "samples"))
    return values, lines
