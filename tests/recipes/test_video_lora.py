"""LoRA on model.arch=wan through the real CLI: a tiny random diffusers WanTransformer3DModel as train.init_from,
a few LoRA steps with the recipe's default targets, then (1) `launch/export.py --format diffusers` without and with
`--merge`, loaded by diffusers' own model and LoRA loaders, computing what our LoRA model computes, and (2)
`train.init_from=` that LoRA run: merged weights for a run without LoRA, the same adapters for the same lora
section, a ConfigError naming the difference otherwise."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from framework import init_from, lora
from framework.config import ConfigError
from framework.export.safetensors_io import consolidated_state_dict
from framework.recipe import load_run_config
from framework.trained import load_trained
from tests.recipes.test_wan_cli import DIT, OVERRIDES, cli, random_diffusers_folder
from tests.vae_exports import write_video_vae

diffusers = pytest.importorskip("diffusers")
from diffusers import WanPipeline, WanTransformer3DModel  # noqa: E402

LORA = ["lora.rank=4", "lora.alpha=8", "optim.lr=2e-2"]  # default targets; a large lr so B moves far from 0


@pytest.fixture(scope="module")
def wan_lora_run(shapes_data, tmp_path_factory) -> tuple[Path, Path]:
    """(run dir, the diffusers folder it started from): 3 LoRA steps on a random tiny Wan."""
    base = tmp_path_factory.mktemp("wan_lora")
    write_video_vae(base / "vae", [True, True, False], latent_channels=4)
    random_diffusers_folder(base / "released")
    out = cli("launch/train.py", DIT, f"data.dir={shapes_data}", f"run_dir={base / 'run'}", f"vae.path={base / 'vae'}",
              f"train.init_from={base / 'released'}", *OVERRIDES, *LORA)
    # 2 blocks x (self q k v o, cross q k v o, ffn.0, ffn.2): the default targets, never the text encoder
    assert "LoRA rank 4 (alpha 8) on 20 Linear layers" in out.stdout + out.stderr
    # the default patterns are written into the run's config, so exports and later runs see what was adapted
    assert yaml.safe_load((base / "run" / "config.yaml").read_text())["lora"]["targets"] == \
        lora.DEFAULT_TARGETS["video_dit/wan"]
    return base / "run", base / "released"


def _inputs():
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(2, 4, 3, 4, 4, generator=gen)
    t = torch.rand(2, generator=gen)
    text = torch.randn(2, 5, 32, generator=gen)
    mask = torch.tensor([[True] * 3 + [False] * 2, [True] * 5])
    return x, t, text, mask


def _theirs(model, x, t, text, mask) -> torch.Tensor:
    with torch.no_grad():
        return model.eval()(x, t * 1000.0, text * mask[..., None], return_dict=False)[0]


def test_wan_lora_exports_load_in_diffusers_with_our_output(wan_lora_run, tmp_path):
    run, released = wan_lora_run
    cli("launch/export.py", str(run), "--format", "diffusers", "--out", str(tmp_path / "lora"))
    cli("launch/export.py", str(run), "--format", "diffusers", "--merge", "--out", str(tmp_path / "merged"))

    written = load_file(tmp_path / "lora" / "pytorch_lora_weights.safetensors")
    assert "transformer.blocks.0.attn1.to_q.lora_A.weight" in written
    assert "transformer.blocks.1.ffn.net.0.proj.lora_B.weight" in written
    assert "transformer.blocks.0.attn2.to_out.0.lora_B.weight" in written and len(written) == 40
    # The folder's transformer is the frozen base: the weights the run started from, untouched.
    released_state = WanTransformer3DModel.from_pretrained(released).state_dict()
    exported_base = WanTransformer3DModel.from_pretrained(tmp_path / "lora").state_dict()
    assert all(torch.equal(exported_base[k], v) for k, v in released_state.items())

    x, t, text, mask = _inputs()
    ours_model = load_trained(str(run), use_ema=False).model.eval()
    with torch.no_grad():
        ours = ours_model.dit(x, t, text, mask)
    plain = _theirs(WanTransformer3DModel.from_pretrained(released), x, t, text, mask)
    assert (plain - ours).abs().max().item() > 1e-3  # the adapters changed the model

    # The pipeline mixin's own reader and loader (what WanPipeline.load_lora_weights runs), on the base folder.
    transformer = WanTransformer3DModel.from_pretrained(released)
    state = WanPipeline.lora_state_dict(str(tmp_path / "lora"))
    WanPipeline.load_lora_into_transformer(state, transformer=transformer)
    assert (_theirs(transformer, x, t, text, mask) - ours).abs().max().item() <= 1e-5
    # The model's own loader on the export folder (without use_safetensors it looks for a .bin by default).
    transformer = WanTransformer3DModel.from_pretrained(tmp_path / "lora")
    transformer.load_lora_adapter(str(tmp_path / "lora"), weight_name="pytorch_lora_weights.safetensors")
    assert (_theirs(transformer, x, t, text, mask) - ours).abs().max().item() <= 1e-5
    merged = _theirs(WanTransformer3DModel.from_pretrained(tmp_path / "merged"), x, t, text, mask)
    assert (merged - ours).abs().max().item() <= 1e-5
    assert not (tmp_path / "merged" / "pytorch_lora_weights.safetensors").exists()


def test_init_from_a_lora_run_merges_or_continues_the_same_adapters(wan_lora_run):
    run, _ = wan_lora_run
    wan = [o for o in OVERRIDES if o.startswith(("model.", "text."))]
    x, t, text, mask = _inputs()
    source = load_trained(str(run), use_ema=False).model.eval()
    with torch.no_grad():
        expected = source.dit(x, t, text, mask)

    def start(*overrides: str):
        cfg, recipe = load_run_config(DIT, [*wan, f"train.init_from={run}", *overrides], world=1)
        model = recipe.build_model(cfg).model
        line = init_from.load(recipe, cfg, model)
        lora.apply(model, cfg)  # as the trainer does next
        return line, model.eval()

    line, merged = start()  # no LoRA: the merged weights, no adapter modules
    assert "initialised from" in line and not lora.adapted_modules(merged)
    with torch.no_grad():
        assert (merged.dit(x, t, text, mask) - expected).abs().max().item() <= 1e-5

    _, same = start(*LORA[:2])  # the same section (default targets on both sides): base + the same adapters
    assert len(lora.adapted_modules(same)) == 20
    ours, theirs = same.state_dict(), consolidated_state_dict(load_trained(str(run)).checkpoint)
    assert ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in theirs)
    with torch.no_grad():
        assert (same.dit(x, t, text, mask) - expected).abs().max().item() <= 1e-6

    message = (r"a LoRA run continues only with the same lora section .*lora\.alpha: 16\.0 in the run config but "
               r"8\.0 in .*; lora\.targets: \['dit\.blocks\.\*\.ffn\.\[02\]'\] in the run config but ")
    with pytest.raises(ConfigError, match=message):
        start("lora.rank=4", "lora.alpha=16", "lora.targets=['dit.blocks.*.ffn.[02]']")
    with pytest.raises(ConfigError, match=re.escape("lora.rank: 8 in the run config but 4")):
        start("lora.rank=8", "lora.alpha=8")
