"""A diffusers Wan pipeline folder in, a diffusers pipeline folder out (issue 12, item 4).

A tiny random pipeline assembled and saved by diffusers (tests/wan_pipeline.py: WanTransformer3DModel,
AutoencoderKLWan, UMT5 + tokenizer, FlowMatchEulerDiscreteScheduler with shift 3) is the one path the Wan presets
take; 2 ranks fine-tune it for 2 steps through the real CLI (full fine-tuning under ZeRO-2, LoRA under ZeRO-3),
`launch/export.py --pipeline` writes a pipeline folder, `WanPipeline.from_pretrained` (+ `load_lora_weights`) loads
it, and its latents for two prompts and a seed equal `launch/sample.py --latents` on the run (same seed, steps,
guidance, scheduler) to 1e-3, and so do the decoded videos. The last tests are fast: what --pipeline refuses and
what it copies, on hand-written folders.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from framework.config import ConfigError
from framework.distributed import free_port
from framework.export import diffusers_pipeline
from framework.trained import load_trained
from tests.runs import ROOT, env
from tests.wan_pipeline import SHIFT, WAN_OVERRIDES, write_wan_pipeline

diffusers = pytest.importorskip("diffusers")
from diffusers import WanPipeline, WanTransformer3DModel  # noqa: E402

PRESETS = ROOT / "recipes/video_dit/configs"
# The presets at the tiny pipeline's size: fp32 (the comparison is at 1e-3), 32x32x9 clips of the shapes data.
TINY_RUN = [*WAN_OVERRIDES, "model.wan.activation_checkpointing=none", "text.max_len=16", "data.fps=8",
            "data.buckets=['32x32x9:2']", "data.num_workers=0", "train.micro_batch=2", "train.global_batch=4",
            "train.steps=2", "train.precision=fp32", "optim.lr=1e-3", "optim.warmup_steps=1", "log.every=1",
            "log.wandb=disabled", "log.progress=false", "eval.every=0", "eval.at_end=false", "checkpoint.every=0"]
RUNS = {"full_zero2": ("wan2_1_t2v_1_3b_full.yaml", ["train.zero_stage=2", "ema.decay=0"]),
        "lora_zero3": ("wan2_1_t2v_1_3b_lora.yaml", ["train.zero_stage=3", "lora.rank=4", "lora.alpha=8",
                                                     "optim.lr=2e-2"])}
PROMPTS = ["a red circle moves left", "a blue square moves up"]
SEED, STEPS, SCALE = 5, 3, 3.0


def cli(*args: str, torchrun: bool = False) -> str:
    launcher = ["-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(free_port())]
    out = subprocess.run([sys.executable, *(launcher if torchrun else []), *args], cwd=ROOT, env=env(),
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-4000:]
    return out.stdout + out.stderr


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory) -> Path:
    return write_wan_pipeline(tmp_path_factory.mktemp("wan") / "Wan2.1-T2V-tiny-Diffusers")


def their_latents(pipe: WanPipeline, output_type: str = "latent") -> torch.Tensor:
    return pipe(PROMPTS, height=32, width=32, num_frames=9, num_inference_steps=STEPS, guidance_scale=SCALE,
                generator=torch.Generator().manual_seed(SEED), output_type=output_type, max_sequence_length=16).frames


def our_videos(run: Path) -> torch.Tensor:
    """The recipe's decoded videos (B, 3, T, H, W) in [-1, 1] for the same prompts, seed, steps and guidance."""
    trained = load_trained(str(run), [f"sample.steps={STEPS}", f"sample.cfg_scale={SCALE}"], use_ema=False)
    helpers = {k: v.eval() for k, v in trained.recipe.build_helpers(trained.cfg).items()}
    return trained.recipe.generate(trained.cfg, trained.model.eval(), helpers, PROMPTS, SEED)


@pytest.mark.dist
@pytest.mark.slow
@pytest.mark.parametrize("name", list(RUNS))
def test_finetune_export_pipeline_and_wanpipeline_samples_as_we_do(name, pipeline, shapes_data, tmp_path):
    preset, extra = RUNS[name]
    run, out = tmp_path / "run", tmp_path / "export"
    log = cli("launch/train.py", str(PRESETS / preset), f"train.init_from={pipeline}", f"data.dir={shapes_data}",
              f"run_dir={run}", *TINY_RUN, *extra, torchrun=True)
    assert f"diffusion.shift <- {SHIFT:g} from {pipeline}/scheduler" in log and "initialised from" in log
    log = cli("launch/export.py", str(run), "--format", "diffusers", "--pipeline", "--out", str(out))
    assert "wrote diffusers export" in log
    log = cli("launch/sample.py", str(run), "--latents", *(a for p in PROMPTS for a in ("--prompt", p)),
              "--seed", str(SEED), "--steps", str(STEPS), "--cfg", str(SCALE), "--out", str(tmp_path / "ours"))
    ours = load_file(tmp_path / "ours" / "latents.safetensors")["latents"]

    # The frozen parts are the source's, byte for byte; the scheduler keeps its class and the run's shift.
    for part in ("vae", "text_encoder", "tokenizer"):
        files = sorted(p.relative_to(pipeline) for p in (pipeline / part).rglob("*") if p.is_file())
        assert files and files == sorted(p.relative_to(out) for p in (out / part).rglob("*") if p.is_file())
        assert all((pipeline / f).read_bytes() == (out / f).read_bytes() for f in files), part
    scheduler = json.loads((out / "scheduler" / "scheduler_config.json").read_text())
    assert scheduler["_class_name"] == "FlowMatchEulerDiscreteScheduler" and scheduler["shift"] == SHIFT

    source = WanTransformer3DModel.from_pretrained(pipeline / "transformer").state_dict()
    exported = WanTransformer3DModel.from_pretrained(out / "transformer").state_dict()
    moved = max((exported[k] - source[k]).abs().max().item() for k in source)
    pipe = WanPipeline.from_pretrained(out)
    pipe.set_progress_bar_config(disable=True)
    lora = out / diffusers_pipeline.LORA_WEIGHTS
    with torch.no_grad():
        if name.startswith("lora"):
            assert moved == 0  # the frozen base, untouched: the training lives in the adapters
            base_only = their_latents(pipe)
            pipe.load_lora_weights(str(out))
            theirs = their_latents(pipe)
            assert (base_only - ours).abs().max().item() > 1e-2  # the adapters matter at this tolerance
        else:
            assert 0 < moved < 0.05 and not lora.exists()
            theirs = their_latents(pipe)
    assert ours.shape == (2, 4, 3, 4, 4) and ours.abs().max() > 0.5
    assert (theirs - ours).abs().max().item() <= 1e-3
    assert (ours[0] - ours[1]).abs().max().item() > 1e-2  # the prompts steer the samples

    # Decoded too: the VAE's per-channel denormalisation and [-1, 1] -> [0, 1] agree with WanPipeline's.
    with torch.no_grad():
        videos = their_latents(pipe, output_type="pt")  # (B, T, 3, H, W) in [0, 1]
        mine = our_videos(run)
    assert videos.shape == (2, 9, 3, 32, 32)
    assert (videos.permute(0, 2, 1, 3, 4) * 2 - 1 - mine).abs().max().item() <= 1e-3


def write_layout(root: Path, components: dict, scheduler: dict) -> Path:
    """A pipeline folder by hand: model_index.json listing `components` ([library, class] or [None, None]), a
    non-empty folder for each listed one but text_encoder, and scheduler/scheduler_config.json."""
    root.mkdir(parents=True)
    (root / "model_index.json").write_text(json.dumps({"_class_name": "WanPipeline", **components}))
    for name, (library, _) in components.items():
        if library and name != "text_encoder":
            (root / name).mkdir()
            (root / name / "config.json").write_text(json.dumps({"name": name}))
    (root / "scheduler" / "scheduler_config.json").write_text(json.dumps(scheduler))
    return root


def test_pipeline_export_copies_the_frozen_parts_at_the_runs_shift(tmp_path):
    unipc = {"_class_name": "UniPCMultistepScheduler", "flow_shift": 3.0, "use_flow_sigmas": True,
             "prediction_type": "flow_prediction", "num_train_timesteps": 1000}
    parts = {"transformer": ["diffusers", "WanTransformer3DModel"], "transformer_2": [None, None],
             "vae": ["diffusers", "AutoencoderKLWan"], "scheduler": ["diffusers", "UniPCMultistepScheduler"]}
    root = write_layout(tmp_path / "pipe", parts, unipc)
    assert diffusers_pipeline.export_source(str(root)) == root
    written = diffusers_pipeline.copy_frozen_parts(root, tmp_path / "out", shift=5.0, num_train_timesteps=500)
    assert written == ["model_index.json", "scheduler", "vae"]
    assert not (tmp_path / "out" / "transformer").exists() and not (tmp_path / "out" / "transformer_2").exists()
    assert (tmp_path / "out" / "vae" / "config.json").read_text() == (root / "vae" / "config.json").read_text()
    scheduler = json.loads((tmp_path / "out" / "scheduler" / "scheduler_config.json").read_text())
    assert scheduler == {**unipc, "flow_shift": 5.0, "num_train_timesteps": 500}
    with pytest.raises(ConfigError, match="is the source pipeline folder itself"):
        diffusers_pipeline.copy_frozen_parts(root, root, 5.0, 500)


def test_pipeline_export_refuses_what_it_cannot_write(tmp_path):
    """No pipeline behind the run, a listed component missing, --pipeline with another format: one line each,
    naming the key, file or flag, and nothing written."""
    with pytest.raises(ConfigError, match="--pipeline: this run has no train.init_from"):
        diffusers_pipeline.export_source("")
    (tmp_path / "transformer").mkdir()
    with pytest.raises(ConfigError, match=f"train.init_from={tmp_path / 'transformer'} is not a diffusers pipeline"):
        diffusers_pipeline.export_source(str(tmp_path / "transformer"))
    parts = {"transformer": ["diffusers", "WanTransformer3DModel"],
             "text_encoder": ["transformers", "UMT5EncoderModel"],
             "scheduler": ["diffusers", "FlowMatchEulerDiscreteScheduler"]}
    root = write_layout(tmp_path / "pipe", parts, {"_class_name": "FlowMatchEulerDiscreteScheduler", "shift": 3.0})
    with pytest.raises(ConfigError, match="without a 'text_encoder/' folder"):
        diffusers_pipeline.copy_frozen_parts(root, tmp_path / "out", 3.0, 1000)
    assert not (tmp_path / "out").exists()
    out = subprocess.run([sys.executable, "launch/export.py", str(tmp_path / "no_run"), "--format", "hf",
                          "--pipeline", "--out", str(tmp_path / "x")], cwd=ROOT, env=env(), capture_output=True,
                         text=True, timeout=120)
    assert out.returncode == 2 and "--pipeline writes a diffusers pipeline folder; it goes with --format " \
        "diffusers, not --format hf" in out.stderr
