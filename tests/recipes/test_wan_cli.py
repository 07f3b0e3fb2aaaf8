"""model.arch=wan through the real CLI: a tiny random diffusers WanTransformer3DModel folder as train.init_from,
a few training steps, `launch/export.py --format diffusers`, and diffusers' model on the export computing what
ours computes, in one forward and in a whole guided Euler sampling run."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from framework import init_from
from framework.config import ConfigError
from framework.diffusion import flow
from framework.export import diffusers_wan
from framework.recipe import load_run_config
from framework.trained import load_trained
from tests.runs import ROOT, env
from tests.vae_exports import write_video_vae

diffusers = pytest.importorskip("diffusers")
from diffusers import WanTransformer3DModel  # noqa: E402

DIT = str(ROOT / "recipes/video_dit/configs/tiny.yaml")
# diffusers' config keys, tiny: 4 latent channels (the VAE below), 32-wide text (our byte encoder's width).
TINY_WAN = dict(patch_size=[1, 2, 2], num_attention_heads=2, attention_head_dim=12, in_channels=4, out_channels=4,
                text_dim=32, freq_dim=32, ffn_dim=40, num_layers=2, rope_max_seq_len=64)
OVERRIDES = ["model.arch=wan", *(f"model.wan.{k}={json.dumps(v)}" for k, v in TINY_WAN.items()),
             "text.layers=1", "text.heads=2", "vae.stats_batches=1", "log.every=1", "log.wandb=disabled",
             "log.progress=false", "eval.every=0", "eval.at_end=false", "checkpoint.every=0",
             "data.buckets=['32x32x9:2']", "data.num_workers=0", "train.micro_batch=2", "train.global_batch=2",
             "optim.warmup_steps=1", "optim.lr=1e-3", "train.steps=3", "sample.steps=4", "sample.cfg_scale=3.0"]
PROMPTS = ["a red circle moves left", "a blue square moves up"]


def cli(*args: str) -> subprocess.CompletedProcess:
    out = subprocess.run([sys.executable, *args], cwd=ROOT, env=env(), capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-4000:]
    return out


def random_diffusers_folder(path: Path) -> dict[str, torch.Tensor]:
    """A diffusers-built tiny Wan whose every weight is random (no zero head, no unit norm gains), saved."""
    torch.manual_seed(0)
    model = WanTransformer3DModel(**TINY_WAN).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.2)
    model.save_pretrained(path)
    return {k: v.clone() for k, v in model.state_dict().items()}


def their_sampling(theirs, model, shape, seed: int, sigmas: torch.Tensor, scale: float) -> torch.Tensor:
    """Guided Euler steps written out by hand around diffusers' module: the text states of our encoder with the
    padding zeroed (as WanPipeline does), the learned null caption as the unconditional text."""
    text, mask = model.text_encoder(PROMPTS)
    cond = text * mask[..., None]
    null, null_mask = model.null_caption(text.shape[1])
    uncond = (null * null_mask[..., None]).expand_as(cond)
    x = torch.randn(shape, generator=torch.Generator().manual_seed(seed))
    for i in range(len(sigmas) - 1):
        t = sigmas[i].expand(shape[0]) * 1000.0  # Wan's timesteps are ours times 1000
        v_cond = theirs(x, t, cond, return_dict=False)[0]
        v_uncond = theirs(x, t, uncond, return_dict=False)[0]
        x = x + (sigmas[i + 1] - sigmas[i]) * (v_uncond + scale * (v_cond - v_uncond))
    return x


def test_wan_init_from_diffusers_train_export_and_sample_the_same(shapes_data, tmp_path):
    vae = tmp_path / "vae"
    write_video_vae(vae, [True, True, False], latent_channels=4)  # 9 frames -> 3 latent frames, 4x4 at 32x32
    original = random_diffusers_folder(tmp_path / "released")
    run_dir = tmp_path / "run"
    out = cli("launch/train.py", DIT, f"data.dir={shapes_data}", f"run_dir={run_dir}", f"vae.path={vae}",
              f"train.init_from={tmp_path / 'released'}", *OVERRIDES)
    assert "initialised from" in out.stdout + out.stderr
    cli("launch/export.py", str(run_dir), "--format", "diffusers", "--out", str(tmp_path / "export"))
    written = json.loads((tmp_path / "export" / "config.json").read_text())
    assert written["_framework_source"] == {"recipe": "video_dit", "step": 3, "ema": False}

    theirs = WanTransformer3DModel.from_pretrained(tmp_path / "export").eval()
    exported = theirs.state_dict()
    assert set(exported) == set(original)
    moved = max((exported[k] - original[k]).abs().max().item() for k in original)
    assert 0 < moved < 0.02  # trained a little, starting from the folder's weights (not from our own init)

    trained = load_trained(str(run_dir), use_ema=False)  # the live weights, as the export wrote them
    cfg, recipe, model = trained.cfg, trained.recipe, trained.model.eval()
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(2, 4, 3, 4, 4, generator=gen)
    t = torch.rand(2, generator=gen)
    text = torch.randn(2, 5, 32, generator=gen)
    mask = torch.tensor([[True] * 3 + [False] * 2, [True] * 5])
    with torch.no_grad():
        ours = model.dit(x, t, text, mask)
        expected = theirs(x, t * 1000.0, text * mask[..., None], return_dict=False)[0]
        assert (ours - expected).abs().max().item() <= 1e-5

        seed, shape = 11, (len(PROMPTS), *recipe.latent_shape(cfg, 0))
        ours_z = recipe.sample_latents(cfg, model, {}, PROMPTS, seed)
        sigmas = flow.flow_sigmas(cfg.sample.steps, flow.resolution_shift(recipe.tokens(cfg, shape)))
        their_z = their_sampling(theirs, model, shape, seed, sigmas, cfg.sample.cfg_scale)
    assert ours_z.shape == (2, 4, 3, 4, 4) and ours_z.abs().max() > 0.1
    assert (ours_z - their_z).abs().max().item() <= 1e-4
    assert not torch.allclose(ours_z[0], ours_z[1], atol=1e-3)  # the prompts steer the samples


def test_wan_folder_and_export_errors_name_the_key(tmp_path):
    """A pipeline folder, a transformer of another shape, a dit run given a diffusers folder, a dit run exported
    as diffusers: one ConfigError naming what to fix (launch/train.py and launch/export.py print it, exit 2)."""
    random_diffusers_folder(tmp_path / "pipeline" / "transformer")
    wan = ["model.arch=wan", *(f"model.wan.{k}={json.dumps(v)}" for k, v in TINY_WAN.items())]
    folder = tmp_path / "pipeline" / "transformer"
    cases = ((wan, tmp_path / "pipeline", "is a diffusers pipeline; give its transformer folder"),
             (wan + ["model.wan.num_layers=3"], folder, "train.init_from: the diffusers transformer differs from the "
                                                        "model config: model.wan.num_layers: 3 in the run config but 2"),
             (["model.text_dim=32", "text.layers=1"], folder, "is a diffusers WanTransformer3DModel folder, which "
                                                              "needs model.arch=wan (this run has model.arch=dit)"))
    for overrides, path, message in cases:
        cfg, recipe = load_run_config(DIT, [*overrides, f"train.init_from={path}"], world=1)
        with pytest.raises(ConfigError, match=re.escape(message)):
            init_from.load(recipe, cfg, recipe.build_model(cfg).model)

    cfg, recipe = load_run_config(DIT, ["text.layers=1", "model.depth=1"], world=1)
    state = recipe.build_model(cfg).model.state_dict()
    with pytest.raises(ConfigError, match=r"--format diffusers writes diffusers' WanTransformer3DModel, but this run "
                                          r"has model.arch=dit; use --format safetensors"):
        recipe.export(state, cfg, "diffusers", str(tmp_path / "out"))
    assert not (tmp_path / "out").exists()


def test_wan_init_from_fills_what_the_folder_lacks(tmp_path):
    """The folder's weights under dit., plus a fresh null caption and byte encoder that are the same on every
    rank (seeded by train.seed): a strict load into a freshly built model."""
    original = random_diffusers_folder(tmp_path / "released")
    overrides = ["model.arch=wan", *(f"model.wan.{k}={json.dumps(v)}" for k, v in TINY_WAN.items()),
                 "text.layers=1", "text.heads=2", f"train.init_from={tmp_path / 'released'}"]
    cfg, recipe = load_run_config(DIT, overrides, world=1)
    model = recipe.build_model(cfg).model
    assert "initialised from" in init_from.load(recipe, cfg, model)
    ours = diffusers_wan.to_diffusers({k[4:]: v for k, v in model.state_dict().items() if k.startswith("dit.")},
                                      TINY_WAN)
    assert set(ours) == set(original) and all(torch.equal(ours[k], original[k]) for k in original)
    again = recipe.initial_weights(cfg, str(tmp_path / "released"))
    assert all(torch.equal(again[k], v) for k, v in model.state_dict().items())
    assert model.null_text.abs().max() == 0 and model.text_encoder.pos.abs().max() > 0
