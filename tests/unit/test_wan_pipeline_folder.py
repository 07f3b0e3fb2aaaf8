"""train.init_from = a whole diffusers Wan pipeline folder (model_index.json, transformer/, vae/, text_encoder/,
tokenizer/, scheduler/): the run takes the VAE, text encoder and flow schedule from it (keys left empty or at their
default only), the transformer's weights, trains on the scheduler's shifted grid and samples with its shift. Every
component is a tiny random one built and saved by diffusers / transformers."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

from framework.config import ConfigError
from framework.recipe import load_run_config
from recipes.video_dit.recipe import flow_times
from tests.runs import ROOT

diffusers = pytest.importorskip("diffusers")
from diffusers import (  # noqa: E402
    AutoencoderKLWan,
    DDIMScheduler,
    FlowMatchEulerDiscreteScheduler,
    UniPCMultistepScheduler,
    WanTransformer3DModel,
)

from tests.text_encoders import write_umt5  # noqa: E402

sys.path.insert(0, str(ROOT / "launch"))
import plan as plan_cli  # noqa: E402  launch/plan.py

DIT = str(ROOT / "recipes/video_dit/configs/tiny.yaml")
TINY_WAN = dict(patch_size=[1, 2, 2], num_attention_heads=2, attention_head_dim=12, in_channels=4, out_channels=4,
                text_dim=32, freq_dim=32, ffn_dim=40, num_layers=2, rope_max_seq_len=64)
TINY_VAE = dict(base_dim=8, z_dim=4, dim_mult=[1, 2, 2, 2], num_res_blocks=1, temperal_downsample=[False, True, True],
                latents_mean=[0.1, -0.2, 0.3, 0.0], latents_std=[1.5, 0.5, 2.0, 1.0])
WAN = ["model.arch=wan", *(f"model.wan.{k}={json.dumps(v)}" for k, v in TINY_WAN.items()),
       "vae.path=", "data.buckets=['32x32x9:1']", "train.micro_batch=1", "train.global_batch=1", "sample.steps=5"]


def scheduler(kind: str, shift: float, steps: int):
    """Wan ships UniPC with flow sigmas and a flow_shift; FlowMatchEuler carries `shift`."""
    if kind == "unipc":
        return UniPCMultistepScheduler(prediction_type="flow_prediction", use_flow_sigmas=True, flow_shift=shift,
                                       num_train_timesteps=steps)
    return FlowMatchEulerDiscreteScheduler(shift=shift, num_train_timesteps=steps)


def write_pipeline(root: Path, kind: str = "unipc", shift: float = 7.0, steps: int = 500) -> Path:
    torch.manual_seed(0)
    WanTransformer3DModel(**TINY_WAN).save_pretrained(root / "transformer")
    AutoencoderKLWan(**TINY_VAE).save_pretrained(root / "vae")
    write_umt5(root, pipeline=True)
    scheduler(kind, shift, steps).save_pretrained(root / "scheduler")
    index = {"_class_name": "WanPipeline", "_diffusers_version": diffusers.__version__,
             "scheduler": ["diffusers", type(scheduler(kind, shift, steps)).__name__],
             "text_encoder": ["transformers", "UMT5EncoderModel"], "tokenizer": ["transformers", "T5Tokenizer"],
             "transformer": ["diffusers", "WanTransformer3DModel"], "vae": ["diffusers", "AutoencoderKLWan"]}
    (root / "model_index.json").write_text(json.dumps(index))
    return root


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory) -> Path:
    return write_pipeline(tmp_path_factory.mktemp("wan") / "Wan2.1-T2V-tiny-Diffusers")


@pytest.mark.parametrize("kind", ["unipc", "euler"])
def test_folder_fills_vae_text_encoder_and_schedule_and_logs_each(tmp_path, kind, capsys):
    root = write_pipeline(tmp_path / "pipe", kind, shift=7.0, steps=500)
    cfg, _ = load_run_config(DIT, [*WAN, f"train.init_from={root}"], world=1)
    assert cfg.vae.path == str(root / "vae") and cfg.text.encoder == str(root / "text_encoder")
    assert cfg.diffusion.shift == 7.0 and cfg.diffusion.num_train_timesteps == 500
    out = capsys.readouterr().out
    for line in (f"vae.path <- {root / 'vae'}", f"text.encoder <- {root / 'text_encoder'}", "diffusion.shift <- 7",
                 "diffusion.num_train_timesteps <- 500"):
        assert line in out
    # Keys set explicitly win; only the others are filled.
    cfg, _ = load_run_config(DIT, [*WAN, f"train.init_from={root}", "diffusion.shift=2.5",
                                   f"vae.path={root / 'vae'}"], world=1)
    assert cfg.diffusion.shift == 2.5 and cfg.diffusion.num_train_timesteps == 500
    assert "diffusion.shift <-" not in capsys.readouterr().out


def test_initial_weights_of_the_pipeline_are_its_transformers(pipeline):
    cfg, recipe = load_run_config(DIT, [*WAN, f"train.init_from={pipeline}"], world=1)
    ours = recipe.initial_weights(cfg, str(pipeline))
    direct = recipe.initial_weights(cfg, str(pipeline / "transformer"))
    assert set(ours) == set(direct) and any(k.startswith("dit.") for k in ours)
    assert all(torch.equal(ours[k], direct[k]) for k in ours)
    recipe.build_model(cfg).model.load_state_dict(ours, strict=True)


def test_training_times_lie_on_the_folders_shifted_grid(pipeline):
    """diffusers' flow training scripts: index floor(u * T) into the scheduler's shifted training sigmas."""
    cfg, recipe = load_run_config(DIT, [*WAN, f"train.init_from={pipeline}", "diffusion.timestep_sampling=uniform"],
                                  world=1)
    ref = FlowMatchEulerDiscreteScheduler(shift=7.0, num_train_timesteps=500)  # the folder's UniPC flow_shift
    t = flow_times(cfg.diffusion, 4096, torch.Generator().manual_seed(0), recipe.flow_shift(cfg, (1, 4, 3, 4, 4)))
    u = torch.rand(4096, generator=torch.Generator().manual_seed(0))
    assert torch.equal(t, ref.sigmas[(u * 500).long()])
    assert len(t.unique()) > 450  # uniform over the grid: nearly every one of its 500 points drawn
    # shift 7 spends most of the time near noise: the median t is shift_t(0.5) = 7 / 8
    assert abs(t.median().item() - 7 / 8) < 0.01


@pytest.mark.parametrize("kind", ["unipc", "euler"])
def test_sampling_follows_the_folders_scheduler(tmp_path, kind):
    """Our Euler sampler on the folder's shift equals diffusers' FlowMatchEulerDiscreteScheduler loop with the
    folder's schedule (from_pretrained for FlowMatchEuler, its flow_shift for Wan's UniPC)."""
    root = write_pipeline(tmp_path / "pipe", kind, shift=5.0, steps=1000)
    cfg, recipe = load_run_config(DIT, [*WAN, f"train.init_from={root}", "sample.cfg_scale=1.0"], world=1)
    model = recipe.build_model(cfg).model
    model.load_state_dict(recipe.initial_weights(cfg, str(root)))
    model.eval()
    helpers = recipe.build_helpers(cfg)  # the pipeline's VAE and UMT5 encoder (tokenizer from tokenizer/)
    prompts = ["a red circle moves left"]
    ours = recipe.sample_latents(cfg, model, helpers, prompts, seed=3)

    ref = (FlowMatchEulerDiscreteScheduler.from_pretrained(root / "scheduler") if kind == "euler"
           else FlowMatchEulerDiscreteScheduler(shift=5.0, num_train_timesteps=1000))
    ref.set_timesteps(cfg.sample.steps)
    shape = (1, *recipe.latent_shape(cfg, 0))
    x = torch.randn(shape, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        text, mask = helpers["text_encoder"](prompts)
        for t in ref.timesteps:
            x = ref.step(model(x, (t / 1000).expand(1), text, mask), t, x).prev_sample
    assert ours.shape == shape and (ours - x).abs().max().item() <= 1e-5


def test_bad_folders_are_one_config_error_naming_the_file(tmp_path):
    root = write_pipeline(tmp_path / "pipe")
    (root / "scheduler" / "scheduler_config.json").unlink()
    DDIMScheduler().save_pretrained(root / "scheduler")
    with pytest.raises(ConfigError, match=r"scheduler_config.json: scheduler class 'DDIMScheduler' is not one of"):
        load_run_config(DIT, [*WAN, f"train.init_from={root}"], world=1)

    FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=True).save_pretrained(root / "scheduler")
    with pytest.raises(ConfigError, match=r"scheduler_config.json: use_dynamic_shifting is set"):
        load_run_config(DIT, [*WAN, f"train.init_from={root}"], world=1)

    for sub in ("vae", "text_encoder"):
        (root / sub).rename(root / f"{sub}.away")
        with pytest.raises(ConfigError, match=rf"without a '{sub}/' folder \({root / sub} is missing"):
            load_run_config(DIT, [*WAN, f"train.init_from={root}"], world=1)
        (root / f"{sub}.away").rename(root / sub)

    with pytest.raises(ConfigError, match=r"is a diffusers pipeline, which needs model.arch=wan"):
        load_run_config(DIT, [f"train.init_from={root}"], world=1)
    # A preset of another shape (the 1.3B preset given the 14B folder) is refused before anything loads.
    with pytest.raises(ConfigError, match=r"the pipeline's transformer differs from the model config: "
                                          r"model.wan.num_layers: 3 in the run config but 2 in "):
        load_run_config(DIT, [*WAN, "model.wan.num_layers=3", f"train.init_from={root}"], world=1)


def test_empty_helper_paths_say_how_to_fill_them():
    """The Wan presets leave vae.path and text.encoder empty for a pipeline to fill: --plan needs neither, a run
    without the pipeline is told which key is missing (before any weights are read)."""
    cfg, recipe = load_run_config(DIT, [*WAN, "vae.path=", "text.encoder="], world=1)
    with pytest.raises(ConfigError, match=r"vae.path is empty: pass train.init_from=PIPELINE_FOLDER"):
        recipe.build_helpers(cfg)


def test_plan_counts_the_pipelines_frozen_helpers(pipeline):
    """--plan with the folder: the UMT5 encoder and the VAE every rank holds whole are counted from their configs
    (built on meta), as many parameters as the loaded modules have; without the folder they are named as missing."""
    from transformers import UMT5EncoderModel

    text = sum(p.numel() for p in UMT5EncoderModel.from_pretrained(pipeline / "text_encoder").parameters())
    vae = sum(p.numel() for p in AutoencoderKLWan.from_pretrained(pipeline / "vae").parameters())
    lines = plan_cli.plan(DIT, [*WAN, f"train.init_from={pipeline}"], gpus=1, gpu_memory=80.0)
    assert f"frozen helpers (whole on every rank, fp32): text.encoder {text:,} parameters, vae.path {vae:,} " \
           f"parameters (fp32)" in lines  # the Wan VAE stays fp32 even in bf16 runs (WanVAE.frozen_dtype)
    lines = plan_cli.plan(DIT, [*WAN, "text.encoder="], gpus=1, gpu_memory=80.0)
    assert any("not counted: text.encoder, vae.path (not there yet" in line for line in lines)


def test_cli_fine_tunes_from_the_pipeline_folder_alone(pipeline, shapes_data, tmp_path):
    """launch/train.py with one path: LoRA steps on video shards, clips encoded online by the pipeline's VAE,
    captions by its UMT5 encoder, t on its scheduler's grid; the resolved config.yaml records every filled key."""
    import subprocess

    import yaml

    from tests.runs import env

    run_dir = tmp_path / "run"
    out = subprocess.run([sys.executable, "launch/train.py", DIT, *WAN, f"train.init_from={pipeline}",
                          f"data.dir={shapes_data}", f"run_dir={run_dir}", "data.num_workers=0", "train.steps=2",
                          "diffusion.timestep_sampling=uniform", "lora.rank=4", "lora.targets=[q,k,v,o]",
                          "vae.stats_batches=1", "log.every=1", "log.wandb=disabled", "log.progress=false",
                          "eval.every=0", "eval.at_end=false", "checkpoint.every=0", "optim.warmup_steps=1"],
                         cwd=ROOT, env=env(), capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-3000:]
    assert f"diffusion.shift <- 7 from {pipeline}/scheduler (UniPCMultistepScheduler)" in out.stdout
    resolved = yaml.safe_load((run_dir / "config.yaml").read_text())
    assert resolved["vae"]["path"] == str(pipeline / "vae")
    assert resolved["text"]["encoder"] == str(pipeline / "text_encoder")
    assert resolved["diffusion"]["shift"] == 7.0 and resolved["diffusion"]["num_train_timesteps"] == 500
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in rows if "loss" in r]
    assert len(losses) == 2 and all(0 < x < 100 for x in losses)


def test_extreme_token_count_shift_is_announced(pipeline, capsys):
    """diffusion.shift=0 at 480x832 x 81 frames extrapolates to a shift in the thousands: a Wan preset used without
    its pipeline folder says so; with the folder the scheduler's shift is used and nothing is said."""
    preset = str(ROOT / "recipes/video_dit/configs/wan2_1_t2v_1_3b_lora.yaml")
    cfg, recipe = load_run_config(preset, [], world=1)
    recipe.warn_extreme_shift(cfg)
    assert "warning: diffusion.shift=0 gives a time shift of 10,930 at the largest bucket" in capsys.readouterr().out
    cfg, recipe = load_run_config(DIT, [*WAN, f"train.init_from={pipeline}"], world=1)
    capsys.readouterr()
    recipe.warn_extreme_shift(cfg)
    assert cfg.diffusion.shift == 7.0 and "warning" not in capsys.readouterr().out
