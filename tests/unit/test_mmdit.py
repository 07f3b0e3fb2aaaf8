"""model.text_mode=joint: SD3-style MMDiT blocks in the video DiT (per-stream weights, one attention over text and
video tokens). Shapes, padded-text masking, gradients (finite differences in float64, checkpointing), the
difference from cross-attention, the parameter match of the presets, refusals, and a CLI smoke run."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
import yaml

from framework.config import ConfigError
from framework.nn import sequence_parallel
from recipes.video_dit.model import VideoDiT, VideoDiTConfig, count_parameters
from tests.runs import ROOT, env
from tests.vae_exports import write_video_vae

TINY = dict(in_channels=4, patch=[1, 2, 2], dim=16, depth=2, heads=2, ffn_hidden=24, text_dim=12)


def model(dtype: torch.dtype = torch.float32, seed: int = 0, **overrides) -> VideoDiT:
    """A tiny DiT with every weight random: adaLN-Zero starts as the identity with a zero output, under which
    any input gives the same (zero) output and no test of masking or gradients could fail."""
    torch.manual_seed(seed)
    m = VideoDiT(VideoDiTConfig(**{**TINY, **overrides})).to(dtype)
    with torch.no_grad():
        for p in m.parameters():
            p.normal_(0.0, 0.3)
    return m


def inputs(dtype: torch.dtype = torch.float32, batch: int = 2, text_len: int = 6):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(batch, 4, 2, 4, 4, generator=g, dtype=dtype)
    t = torch.rand(batch, generator=g, dtype=dtype)
    text = torch.randn(batch, text_len, 12, generator=g, dtype=dtype)
    mask = torch.ones(batch, text_len, dtype=torch.bool)
    mask[0, text_len - 2:] = False  # row 0: 2 padded tokens
    mask[1:, 2:] = False  # other rows: 2 real tokens
    return x, t, text, mask


def test_output_shape_and_parameter_count():
    m = model(text_mode="joint", depth=3)
    x, t, text, mask = inputs()
    out = m(x, t, text, mask)
    assert out.shape == x.shape and torch.isfinite(out).all()
    assert m(x, t, text, None).shape == x.shape  # no mask: every text token is a key
    assert sum(p.numel() for p in m.parameters()) == count_parameters(m.cfg)
    # The text stream is updated in every block but the last, which only gives keys and values.
    assert [b.text.update for b in m.blocks] == [True, True, False]
    assert not hasattr(m.blocks[-1].text, "mlp") and m.blocks[-1].text.qkv.out_features == 2 * TINY["dim"]


def test_presets_have_equal_parameters():
    """tiny_joint.yaml is the cross preset's model with joint attention at (within 2%) equal parameters."""
    counts = {}
    for name in ("tiny", "tiny_joint"):
        cfg = yaml.safe_load((ROOT / f"recipes/video_dit/configs/{name}.yaml").read_text())["model"]
        counts[name] = count_parameters(VideoDiTConfig(**cfg))
    print("parameters", counts)
    assert abs(counts["tiny_joint"] / counts["tiny"] - 1) < 0.02


def test_padded_text_states_do_not_change_the_output():
    m = model(torch.float64, text_mode="joint", depth=3).eval()
    x, t, text, mask = inputs(torch.float64)
    ref = m(x, t, text, mask)
    scrambled = torch.where(mask[..., None], text, 100 * torch.randn_like(text))
    torch.testing.assert_close(m(x, t, scrambled, mask), ref, rtol=0, atol=1e-12)
    # ... while a real token does, and so does the padding once it is not masked (the check can fail).
    real_changed = text.clone()
    real_changed[0, 0] += 1.0
    assert (m(x, t, real_changed, mask) - ref)[0].abs().max() > 1e-3
    assert (m(x, t, scrambled, torch.ones_like(mask)) - ref).abs().max() > 1e-3


def test_gradients_reach_both_streams_and_match_finite_differences():
    m = model(torch.float64, text_mode="joint").train()
    x, t, text, mask = inputs(torch.float64, batch=1, text_len=3)
    (m(x, t, text, mask) ** 2).mean().backward()
    for name, p in m.named_parameters():
        assert p.grad is not None and p.grad.abs().max() > 0, f"{name} gets no gradient"

    # Central finite differences along a random direction of weights of each stream. Not gradcheck's per-element
    # check at eps 1e-6: RMSNorm and RoPE compute in float32 even for float64 inputs, which quantises such tiny
    # differences; at eps 1e-3 that rounding costs ~1e-3 of the derivative, and a wrong or missing gradient
    # path (a detached stream) is off by far more.
    params = dict(m.named_parameters())
    g = torch.Generator().manual_seed(2)
    for name in ["blocks.0.text.qkv.weight", "blocks.0.text.mlp.2.weight", "blocks.0.text.modulation",
                 "blocks.1.text.qkv.weight", "blocks.0.video.qkv.weight", "blocks.1.video.out.weight",
                 "text_time_proj.weight", "text_proj.0.weight"]:
        p = params[name]
        u = torch.randn(p.shape, generator=g, dtype=p.dtype)
        analytic = (p.grad * u).sum().item()
        with torch.no_grad():
            p += 1e-3 * u
            up = (m(x, t, text, mask) ** 2).mean().item()
            p -= 2e-3 * u
            down = (m(x, t, text, mask) ** 2).mean().item()
            p += 1e-3 * u
        assert abs((up - down) / 2e-3 - analytic) <= 1e-2 * abs(analytic) + 1e-3, name


@pytest.mark.parametrize("mode", ["full", "every_k"])
def test_activation_checkpointing_gives_the_same_gradients(mode):
    grads = {}
    for ckpt in ("none", mode):
        m = model(text_mode="joint", depth=3, activation_checkpointing=ckpt, activation_checkpointing_every=2).train()
        x, t, text, mask = inputs()
        (m(x, t, text, mask) ** 2).mean().backward()
        grads[ckpt] = {n: p.grad.clone() for n, p in m.named_parameters()}
    for name, g in grads["none"].items():
        torch.testing.assert_close(grads[mode][name], g, rtol=1e-5, atol=1e-6, msg=name)


def test_joint_differs_from_cross():
    """Same width, depth and seed: cross has cross-attention modules and no text stream, joint the reverse, and
    their outputs differ; the joint text stream really is carried (block 0 changes the text states)."""
    cross, joint = model(text_mode="cross"), model(text_mode="joint")
    assert hasattr(cross.blocks[0], "cross") and not hasattr(joint.blocks[0], "cross")
    x, t, text, mask = inputs()
    assert (cross(x, t, text, mask) - joint(x, t, text, mask)).abs().max() > 1e-3
    context = joint.text_proj(text)
    c = joint.time_embed(t)
    time6 = joint.time_proj(torch.nn.functional.silu(c)).unflatten(1, (6, -1))
    text6 = joint.text_time_proj(torch.nn.functional.silu(c)).unflatten(1, (6, -1))
    tokens = joint.patch_embed(torch.randn(2, 8, 16))  # a (2, 2, 2) grid of 1x2x2 patches of 4 channels
    _, updated = joint.blocks[0](tokens, context, time6, text6, joint.rope((2, 2, 2), x.device), mask)
    assert (updated - context).abs().max() > 1e-3
    _, last = joint.blocks[1](tokens, context, time6, text6, joint.rope((2, 2, 2), x.device), mask)
    assert last is context  # the last block leaves the text stream alone


def test_refusals():
    with pytest.raises(ConfigError, match="text_mode=joint: Wan2.1 has cross-attention only"):
        VideoDiTConfig(arch="wan", text_mode="joint")
    with pytest.raises(ConfigError, match="model.text_mode: 'both'"):
        VideoDiTConfig(text_mode="both")
    # What sequence_parallel.init(2) leaves behind in a process of a 2-rank group (the size is module state).
    saved, sequence_parallel._SIZE = sequence_parallel._SIZE, 2
    try:
        with pytest.raises(ConfigError, match="text_mode=joint does not support train.sequence_parallel=2"):
            VideoDiT(VideoDiTConfig(**TINY, text_mode="joint"))
    finally:
        sequence_parallel._SIZE = saved


def test_two_training_steps_through_the_cli(shapes_data, tmp_path):
    write_video_vae(tmp_path / "vae", [False, True, True], latent_channels=4)
    run_dir = tmp_path / "run"
    cmd = [sys.executable, "launch/train.py", str(ROOT / "recipes/video_dit/configs/tiny_joint.yaml"),
           f"data.dir={shapes_data}", f"run_dir={run_dir}", f"vae.path={tmp_path / 'vae'}", "model.in_channels=4",
           "model.dim=32", "model.depth=2", "model.heads=2", "model.ffn_hidden=64", "model.text_dim=32",
           "model.activation_checkpointing=full", "text.layers=1", "text.heads=2", "vae.stats_batches=1",
           "data.buckets=['32x32x9:2']", "data.num_workers=0", "train.micro_batch=2", "train.global_batch=2",
           "train.steps=2", "optim.warmup_steps=1", "log.every=1", "log.wandb=disabled", "log.progress=false",
           "eval.every=0", "eval.at_end=false", "checkpoint.every=0"]
    out = subprocess.run(cmd, cwd=ROOT, env=env(), capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-4000:]
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in rows if "loss" in r]
    assert len(losses) == 2 and all(v == v and v > 0 for v in losses)
    assert yaml.safe_load((run_dir / "config.yaml").read_text())["model"]["text_mode"] == "joint"
