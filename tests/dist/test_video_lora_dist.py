"""LoRA on the tiny video DiT, 2 ranks over gloo, with the recipe's default targets, on a random "pretrained" base
(adaLN gates of a fresh DiT are zero, and a frozen zero gate would block every adapter's gradient): exact resume
under ZeRO-2 bf16 (frozen base held in bf16, only adapter moments in the optimizer, text encoder untouched) and
under ZeRO-3, where `train.init_from=` that LoRA run (same lora section) starts every rank from its adapters."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

from framework.checkpoint import complete_checkpoints
from framework.config import to_dict
from framework.distributed import free_port
from framework.export import safetensors_io
from framework.export.safetensors_io import consolidated_state_dict
from framework.lora import split_state
from framework.recipe import load_run_config
from tests.runs import ROOT, env, losses
from tests.vae_exports import write_video_vae

pytestmark = pytest.mark.dist

DIT = str(ROOT / "recipes/video_dit/configs/tiny.yaml")
COMMON = ["log.every=1", "log.wandb=disabled", "log.progress=false", "eval.every=0", "eval.at_end=false",
          "checkpoint.every=2", "data.buckets=['32x32x9:2']", "data.num_workers=0", "train.micro_batch=2",
          "train.global_batch=4", "optim.warmup_steps=1", "optim.lr=1e-2", "model.dim=32", "model.depth=2",
          "model.heads=2", "model.ffn_hidden=64", "model.text_dim=32", "text.layers=1", "text.heads=2",
          "vae.stats_batches=1", "ema.decay=0", "lora.rank=4", "lora.alpha=8", "model.in_channels=4"]
# Default targets of the dit arch: per block attn q, kv, out; cross q, kv, out; mlp.0, mlp.2 (dim 32, ffn 64).
RANK, D, FFN = 4, 32, 64
PER_BLOCK = RANK * ((D + D) + (D + 2 * D) + (D + D)) * 2 + RANK * (D + FFN) * 2
ADAPTER_PARAMS = 2 * PER_BLOCK


@pytest.fixture(scope="module")
def vae(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("vae") / "vae"
    write_video_vae(out, [True, True, False], latent_channels=4)
    return out


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> Path:
    """A safetensors export of the tiny DiT with every weight random (no zero gate or head)."""
    cfg, recipe = load_run_config(DIT, COMMON, world=1)
    torch.manual_seed(0)
    model = recipe.build_model(cfg).model
    state = {k: v + 0.2 * torch.randn_like(v) for k, v in model.state_dict().items()}
    out = tmp_path_factory.mktemp("base")
    safetensors_io.write(state, {"recipe": "video_dit", "model": to_dict(cfg.model)}, out)
    return out


def train(data: Path, vae: Path, run_dir: Path, *overrides: str) -> str:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
           str(free_port()), "launch/train.py", DIT, f"data.dir={data}", f"run_dir={run_dir}", f"vae.path={vae}",
           *COMMON, *overrides]
    out = subprocess.run(cmd, cwd=ROOT, env=env(), capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-5000:]
    return out.stdout + out.stderr


def _moments(obj) -> int:
    """Elements of every AdamW `exp_avg` in a DeepSpeed optimizer file."""
    if isinstance(obj, dict):
        return sum(v.numel() if k == "exp_avg" and torch.is_tensor(v) else _moments(v) for k, v in obj.items())
    if isinstance(obj, (list, tuple)):
        return sum(_moments(v) for v in obj)
    return 0


def _resume_is_exact(data: Path, vae: Path, tmp: Path, steps: int, *common: str) -> list[Path]:
    """`steps` straight == steps/2 + resume=auto + the rest, in losses and weights; the straight run's
    checkpoints."""
    straight, split = tmp / "straight", tmp / "split"
    out = train(data, vae, straight, f"train.steps={steps}", *common)
    assert f"LoRA rank 4 (alpha 8) on 16 Linear layers: {ADAPTER_PARAMS / 1e6:.3f}M trainable" in out
    train(data, vae, split, f"train.steps={steps}", f"train.stop_after={steps // 2}", *common)
    train(data, vae, split, f"train.steps={steps}", "resume=auto", *common)
    a, b = losses(straight), losses(split)
    assert [a[s] for s in range(1, steps + 1)] == [b[s] for s in range(1, steps + 1)]
    wa, wb = (consolidated_state_dict(complete_checkpoints(r / "checkpoints")[-1]) for r in (straight, split))
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)
    return complete_checkpoints(straight / "checkpoints")


@pytest.fixture(scope="module")
def zero2_run(shapes_data, vae, base, tmp_path_factory) -> list[Path]:
    """A ZeRO-2 bf16 LoRA run from the random base, checked for exact resume; its checkpoints (steps 2, 4)."""
    return _resume_is_exact(shapes_data, vae, tmp_path_factory.mktemp("zero2"), 4, "train.zero_stage=2",
                            "train.precision=bf16", f"train.init_from={base}", "checkpoint.every=2")


def test_video_lora_zero2_bf16_resume_is_exact_base_frozen_in_bf16(zero2_run):
    step2, step4 = zero2_run
    base2, ad2 = split_state(consolidated_state_dict(step2))
    base4, ad4 = split_state(consolidated_state_dict(step4))
    assert sorted(ad4) == sorted(f"dit.blocks.{i}.{m}" for i in range(2) for m in
                                 ("attn.q", "attn.kv", "attn.out", "cross.q", "cross.kv", "cross.out", "mlp.0", "mlp.2"))
    assert all(torch.equal(base2[k], base4[k]) for k in base4)  # the base (text encoder too) never moves
    assert all(not torch.equal(ad2[k][1], ad4[k][1]) for k in ad4)  # every adapter's B does
    module = torch.load(step4 / "mp_rank_00_model_states.pt", map_location="cpu", weights_only=False)["module"]
    assert {v.dtype for k, v in module.items() if ".lora_" not in k} == {torch.bfloat16}
    held = sum(_moments(torch.load(f, map_location="cpu", weights_only=False)) for f in step4.glob("*optim_states.pt"))
    assert ADAPTER_PARAMS <= held <= ADAPTER_PARAMS + 64, f"optimizer moments for {held} parameters"


def test_video_lora_zero3_init_from_a_lora_run_and_resume_exactly(shapes_data, vae, zero2_run, tmp_path):
    """ZeRO-3 runs continuing the ZeRO-2 LoRA run (same lora section): exact resume, and the first step starts
    from the source's weights on every rank. AdamW's first update moves each element by at most lr, so the step-1
    adapters lie within lr of the source's; rank 1 keeping peft's fresh adapters (B = 0) would be far off."""
    source = consolidated_state_dict(zero2_run[-1])
    lr = 1e-3
    step1, _ = _resume_is_exact(shapes_data, vae, tmp_path, 2, "train.zero_stage=3", f"optim.lr={lr}",
                                f"train.init_from={zero2_run[-1]}", "checkpoint.every=1")
    started = consolidated_state_dict(step1)
    assert started.keys() == source.keys()
    base_s, ad_s = split_state(source)
    base_1, ad_1 = split_state(started)
    assert all(torch.equal(base_1[k], base_s[k]) for k in base_s)
    drift = max((ad_1[k][i] - ad_s[k][i]).abs().max().item() for k in ad_s for i in (0, 1))
    assert 0 < drift <= lr * 1.001, drift
    assert min(ad_s[k][1].abs().max().item() for k in ad_s) > 10 * lr  # B far from peft's fresh zeros
