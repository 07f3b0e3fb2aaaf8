"""The text-to-video core (recipes/t2v_core.py): latent geometry comes from the VAE alone, a sampler that does
not fit the objective is a config error before any work, and joint-AV evaluation runs through the same
held-out loss path (batches moved to the device) as the video recipe."""

from __future__ import annotations

import math

import pytest
import torch

from framework.config import ConfigError
from framework.recipe import load_run_config
from recipes.t2v_core import to_device
from recipes.video_vae.model import VideoVAE, VideoVAEConfig
from tests.vae_exports import JOINT_SMALL, joint_evaluation, write_video_vae

VIDEO_DIT = "recipes/video_dit/configs/tiny.yaml"
JOINT = "recipes/video_audio/configs/tiny.yaml"
PER_FRAME, TWO_X, CAUSAL_4X = [False, False, False], [False, False, True], [False, True, True]


# ---- geometry ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("temporal_down", [PER_FRAME, TWO_X, CAUSAL_4X], ids=["1x", "2x", "4x"])
@pytest.mark.parametrize("frames, h, w", [(1, 16, 16), (5, 16, 24), (9, 32, 16), (17, 16, 32)])
def test_vae_latent_shape_is_what_encoding_produces(temporal_down, frames, h, w):
    cfg = VideoVAEConfig(latent_channels=4, base_channels=4, channel_mult=[1, 1, 1, 1], temporal_down=temporal_down)
    if (frames - 1) % cfg.compression[0]:
        with pytest.raises(ValueError, match=f"1 \\+ {cfg.compression[0]}k frames"):
            cfg.latent_shape(frames, h, w)
        return
    torch.manual_seed(0)
    with torch.no_grad():
        mean, _ = VideoVAE(cfg).eval().encode(torch.randn(1, 3, frames, h, w), chunked=False)
    assert tuple(mean.shape[1:]) == cfg.latent_shape(frames, h, w)


@pytest.mark.parametrize("temporal_down", [PER_FRAME, CAUSAL_4X], ids=["per-frame", "causal-4x"])
def test_recipes_take_latent_shapes_from_the_vae_export(temporal_down, tmp_path):
    """The DiT's sampling shape, its work() and the joint model's shapes follow the VAE at vae.path, whatever
    its time compression (before, both recipes assumed 4x in time and 8x in space wherever a shape was needed)."""
    vae = write_video_vae(tmp_path / "vae", temporal_down)
    with torch.no_grad():
        encoded = tuple(vae.encode(torch.zeros(1, 3, 9, 32, 32))[0].shape[1:])
    cfg, recipe = load_run_config(VIDEO_DIT, [f"vae.path={tmp_path / 'vae'}", "data.buckets=['32x32x9:2']",
                                              "train.micro_batch=2", "train.global_batch=2"], world=1)
    assert recipe.latent_shape(cfg, 0) == encoded
    tokens, _ = recipe.work(cfg, {"video": torch.zeros(2, 3, 9, 32, 32)})
    assert tokens == 2 * recipe.tokens(cfg, encoded)
    compression = 2 ** sum(temporal_down)
    cfg, recipe = load_run_config(JOINT, [*JOINT_SMALL, f"vae.path={tmp_path / 'vae'}",
                                          f"model.temporal_compression={compression}"], world=1)
    assert recipe.latent_shapes(cfg, 0)[0] == encoded


def test_a_vae_export_that_does_not_fit_the_model_is_named_before_any_work(tmp_path):
    write_video_vae(tmp_path / "vae", CAUSAL_4X)
    with pytest.raises(ConfigError, match="model.temporal_compression=1 but the video VAE .* compresses time 4x"):
        load_run_config(JOINT, [*JOINT_SMALL, f"vae.path={tmp_path / 'vae'}"], world=1)
    with pytest.raises(ConfigError, match="model.in_channels=8 but the VAE .* has 16 latent channels"):
        load_run_config(VIDEO_DIT, [f"vae.path={tmp_path / 'vae'}", "model.in_channels=8"], world=1)
    # A per-frame VAE takes any frame count; the 4x one needs 1 + 4k.
    write_video_vae(tmp_path / "per_frame", PER_FRAME)
    load_run_config(VIDEO_DIT, [f"vae.path={tmp_path / 'per_frame'}", "data.buckets=['32x32x6:8']"], world=1)
    with pytest.raises(ConfigError, match="'32x32x6:8' has 6 frames; the causal VAE needs 1 \\+ 4k"):
        load_run_config(VIDEO_DIT, [f"vae.path={tmp_path / 'vae'}", "data.buckets=['32x32x6:8']"], world=1)


# ---- samplers ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("objective, sampler", [("flow", "ddpm"), ("flow", "ddim"), ("gaussian", "euler"),
                                                ("gaussian", "heun")])
def test_a_sampler_that_does_not_fit_the_objective_is_a_config_error(objective, sampler):
    with pytest.raises(ConfigError, match=f"sample.sampler={sampler} does not fit diffusion.objective={objective}"):
        load_run_config(VIDEO_DIT, [f"diffusion.objective={objective}", f"sample.sampler={sampler}"], world=1)


@pytest.mark.parametrize("objective, sampler", [("flow", "euler"), ("flow", "heun"), ("gaussian", "ddim"),
                                                ("gaussian", "ddpm")])
def test_samplers_that_fit_load(objective, sampler):
    load_run_config(VIDEO_DIT, [f"diffusion.objective={objective}", f"sample.sampler={sampler}"], world=1)


# ---- joint-AV evaluation ------------------------------------------------------------------------------------
def test_to_device_moves_tensors_and_keeps_the_rest():
    batch = {"video": torch.zeros(1, 3, 1, 8, 8, dtype=torch.uint8), "caption": ["a"], "fps": 8.0}
    moved = to_device(batch, "meta")
    assert moved["video"].device.type == "meta" and moved["video"].dtype == torch.uint8
    assert moved["caption"] == ["a"] and moved["fps"] == 8.0


def test_joint_evaluation_runs_the_shared_held_out_path_on_cpu_batches(flash_beep, tmp_path):
    """The whole joint evaluation (held-out loss through t2v_core.held_out_loss, which moves every loader batch
    to dist.device(), rendering, the sync report) and video-to-audio sampling from held-out clips, with real
    frozen VAEs. On CPU the batch and the model share a device, so this proves the path runs, not the move;
    tests/gpu/test_cuda.py runs the same function with everything but the batches on CUDA."""
    values, lines = joint_evaluation(flash_beep, tmp_path, "cpu")
    assert math.isfinite(values["loss"]) and values["loss"] > 0
    assert {"sync_median_abs_offset_ms", "sync_within_40ms"} <= set(values)
    assert ".mp4: " in lines[0]
    assert lines[-1].startswith("sync (video_to_audio)")
