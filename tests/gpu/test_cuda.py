"""The GPU path: CUDA generators, bf16 model math, flash-attn vs SDPA, the trainer on NCCL and the joint-AV
recipe's evaluation on CUDA (skipped on CPU)."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from framework.diffusion.masked import forward_mask, masked_diffusion_loss, sample_mask_ratio
from framework.nn import attention as attn
from framework.nn.llada import LladaModel, LladaModelConfig
from tests.runs import ROOT, SMALL, TINY, env, losses

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]


def test_bf16_llada_step_on_cuda_with_cuda_generator():
    torch.manual_seed(0)
    cfg = LladaModelConfig(vocab_size=512, dim=128, n_layers=2, n_heads=4, ffn_hidden=256, max_seq_len=64)
    model = LladaModel(cfg).cuda().to(torch.bfloat16)
    gen = torch.Generator(device="cuda").manual_seed(0)
    ids = torch.randint(5, 512, (4, 64), device="cuda", generator=gen)
    doc_ids = torch.arange(64, device="cuda").div(16, rounding_mode="floor").expand(4, 64)
    p_mask = sample_mask_ratio(4, gen)
    noisy, masked = forward_mask(ids, p_mask, cfg.mask_id, gen)
    loss = masked_diffusion_loss(model(noisy, doc_ids=doc_ids), ids, masked, p_mask)
    loss.backward()
    assert torch.isfinite(loss) and 4.0 < loss.item() < 12.0
    assert all(torch.isfinite(p.grad).all() for p in model.parameters())


@pytest.mark.skipif(not attn.FLASH_ATTN_AVAILABLE, reason="flash-attn not installed")
def test_flash_attn_matches_sdpa():
    q, k, v = (torch.randn(2, 8, 256, 64, device="cuda", dtype=torch.bfloat16) for _ in range(3))
    fast = attn.attention(q, k, v)
    ref = torch.nn.functional.scaled_dot_product_attention(q, k, v)
    torch.testing.assert_close(fast, ref, atol=2e-2, rtol=2e-2)


def test_trainer_on_one_gpu_bf16(text_data, tmp_path):
    run = tmp_path / "run"
    cmd = [sys.executable, "launch/train.py", TINY, f"data.dir={text_data}", f"run_dir={run}", *SMALL,
           "train.steps=12", "train.precision=bf16", "train.zero_stage=2", "optim.lr=3e-3"]
    out = subprocess.run(cmd, cwd=ROOT, env=env(), capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-4000:]
    loss = losses(run)
    assert len(loss) == 12 and loss[12] < loss[1]


def test_video_dit_bf16_step_on_cuda():
    from recipes.video_dit.model import VideoDiT, VideoDiTConfig

    torch.manual_seed(0)
    model = VideoDiT(VideoDiTConfig(in_channels=4, dim=64, depth=2, heads=4, ffn_hidden=128, text_dim=32))
    model = model.cuda().to(torch.bfloat16)
    x = torch.randn(2, 4, 3, 8, 8, device="cuda", dtype=torch.bfloat16)
    text = torch.randn(2, 5, 32, device="cuda", dtype=torch.bfloat16)
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]], device="cuda").bool()
    out = model(x, torch.rand(2, device="cuda"), text, mask)
    out.float().pow(2).mean().backward()
    assert out.shape == x.shape and all(torch.isfinite(p.grad).all() for p in model.parameters())


def test_joint_av_evaluation_and_sampling_move_cpu_batches_to_the_gpu(flash_beep, tmp_path):
    """The joint recipe's evaluate (held-out loss, rendering, sync) and video-to-audio sample hooks with the
    model and VAEs on CUDA and the loader's CPU batches: every batch goes through t2v_core.to_device, as in
    the video recipe (before, the joint evaluation fed CPU frames to the CUDA VAE)."""
    import math

    from tests.vae_exports import joint_evaluation

    values, lines = joint_evaluation(flash_beep, tmp_path, "cuda")
    assert math.isfinite(values["loss"]) and values["loss"] > 0
    assert "sync_within_40ms" in values and lines[-1].startswith("sync (video_to_audio)")
