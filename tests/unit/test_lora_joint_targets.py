"""LoRA's default targets on the video DiT with `model.text_mode=joint` (tiny_joint.yaml, SD3-style MMDiT blocks):
both streams' q/k/v, out and MLP Linears of every joint block, never the trainable byte text encoder; and a 2-step
LoRA run of that preset trains (the default patterns of the cross-attention DiT used to select nothing there)."""

from __future__ import annotations

import subprocess
import sys

import torch
import yaml

from framework import lora
from framework.checkpoint import complete_checkpoints
from framework.config import to_dict
from framework.export import safetensors_io
from framework.export.safetensors_io import consolidated_state_dict
from framework.recipe import load_run_config
from tests.runs import ROOT, env
from tests.vae_exports import write_video_vae

JOINT = str(ROOT / "recipes/video_dit/configs/tiny_joint.yaml")
SMALL = ["model.dim=32", "model.depth=2", "model.heads=2", "model.ffn_hidden=64", "model.text_dim=32",
         "text.layers=1", "text.heads=2", "sample.steps=3", "vae.stats_batches=1", "lora.rank=4", "lora.alpha=8"]


def expected_targets(depth: int) -> set[str]:
    """Every Linear of both streams of each JointBlock; the last block's text stream has only k/v (its qkv Linear)."""
    names = set()
    for i in range(depth):
        names |= {f"dit.blocks.{i}.video.{m}" for m in ("qkv", "out", "mlp.0", "mlp.2")}
        names |= {f"dit.blocks.{i}.text.{m}" for m in (("qkv",) if i == depth - 1 else ("qkv", "out", "mlp.0", "mlp.2"))}
    return names


def test_default_targets_cover_both_streams_of_the_joint_blocks_and_not_the_text_encoder():
    cfg, recipe = load_run_config(JOINT, SMALL, world=1)
    assert cfg.model.text_mode == "joint" and not cfg.lora.targets
    model = recipe.build_model(cfg).model
    lora.apply(model, cfg)
    adapted = set(lora.adapted_modules(model))
    assert adapted == expected_targets(cfg.model.depth)
    assert not any(n.startswith("text_encoder") for n in adapted)
    assert cfg.lora.targets == lora.DEFAULT_TARGETS["video_dit/dit/joint"]  # written back for config.yaml
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(".lora_" in n for n in trainable)
    # the cross-attention DiT keeps its own default
    cross, _ = load_run_config(str(ROOT / "recipes/video_dit/configs/tiny.yaml"), SMALL, world=1)
    assert lora.targets(cross) == lora.DEFAULT_TARGETS["video_dit/dit"]


def random_base(out) -> None:
    """A safetensors export of the tiny joint DiT with every weight random: adaLN-Zero's zero gates and head would
    keep every gradient of a frozen fresh base's adapters at zero."""
    cfg, recipe = load_run_config(JOINT, SMALL, world=1)
    torch.manual_seed(0)
    model = recipe.build_model(cfg).model
    state = {k: v + 0.2 * torch.randn_like(v) for k, v in model.state_dict().items()}
    safetensors_io.write(state, {"recipe": "video_dit", "model": to_dict(cfg.model)}, out)


def test_two_step_lora_run_of_tiny_joint_trains(shapes_data, tmp_path):
    write_video_vae(tmp_path / "vae", [True, True, False], latent_channels=16)
    random_base(tmp_path / "base")
    run = tmp_path / "run"
    cmd = [sys.executable, "launch/train.py", JOINT, f"data.dir={shapes_data}", f"run_dir={run}",
           f"vae.path={tmp_path / 'vae'}", f"train.init_from={tmp_path / 'base'}", *SMALL, "optim.lr=2e-2", "train.steps=2", "log.every=1",
           "log.wandb=disabled", "log.progress=false", "eval.every=0", "eval.at_end=false", "checkpoint.every=0",
           "data.buckets=['32x32x9:2']", "data.num_workers=1", "train.micro_batch=2", "train.global_batch=2",
           "optim.warmup_steps=1", "ema.decay=0"]
    out = subprocess.run(cmd, cwd=ROOT, env=env(), capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-4000:]
    layers = len(expected_targets(2))
    assert f"LoRA rank 4 (alpha 8) on {layers} Linear layers" in out.stdout + out.stderr
    assert yaml.safe_load((run / "config.yaml").read_text())["lora"]["targets"] == \
        lora.DEFAULT_TARGETS["video_dit/dit/joint"]
    state = consolidated_state_dict(complete_checkpoints(run / "checkpoints")[-1])
    moved = {k.split(".lora_B")[0] for k, v in state.items() if ".lora_B." in k and v.abs().max() > 0}
    assert moved == expected_targets(2)  # every adapter trained (B starts at zero)
    assert torch.isfinite(torch.tensor([v.float().sum() for v in state.values()])).all()
