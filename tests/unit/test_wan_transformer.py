"""WanDiT against diffusers' WanTransformer3DModel: same outputs on tiny random models, folder round trips
(single file and sharded), a model trained by us sampling the same in diffusers, and the released sizes."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml

from framework.config import from_dict
from framework.diffusion import flow
from framework.export import diffusers_wan
from recipes.video_dit.wan import (
    WanConfig,
    WanDiT,
    count_parameters,
    export_diffusers,
    load_diffusers_folder,
    wan_rope,
)

diffusers = pytest.importorskip("diffusers")
from diffusers import WanTransformer3DModel  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
TOL = 1e-5

# Two tiny shapes: Wan's patch with the across-heads norm before cross-attention, and an uneven patch with
# the norm off, more output than input channels and a head_dim whose RoPE bands are uneven (8, 4, 4).
TINY = [
    dict(patch_size=[1, 2, 2], num_attention_heads=2, attention_head_dim=12, in_channels=4, out_channels=4,
         text_dim=24, freq_dim=32, ffn_dim=40, num_layers=2, rope_max_seq_len=64),
    dict(patch_size=[2, 1, 2], num_attention_heads=3, attention_head_dim=16, in_channels=3, out_channels=5,
         text_dim=8, freq_dim=16, ffn_dim=24, num_layers=2, cross_attn_norm=False, rope_max_seq_len=64),
]


def random_reference(config: dict, seed: int = 0) -> WanTransformer3DModel:
    """A diffusers model whose every weight is random, norm gains and tables included (none sits at 0 or 1)."""
    torch.manual_seed(seed)
    model = WanTransformer3DModel(**config).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.2)
    return model


def ours_from(reference: WanTransformer3DModel, config: dict) -> WanDiT:
    model = WanDiT(WanConfig(**config)).eval()
    model.load_state_dict(diffusers_wan.from_diffusers(reference.state_dict()), strict=True)
    return model


def inputs(config: dict, shape: tuple[int, int, int], batch: int = 2, text_len: int = 7, seed: int = 1):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, config["in_channels"], *shape, generator=gen)
    t = torch.rand(batch, generator=gen)  # a different time per row
    text = torch.randn(batch, text_len, config["text_dim"], generator=gen)
    return x, t, text


def diffusers_out(model: WanTransformer3DModel, x, t, text) -> torch.Tensor:
    # The same float32 product our model forms from t in [0, 1]: both see identical timesteps.
    return model(x, t.float() * 1000.0, text, return_dict=False)[0]


@pytest.mark.parametrize("config, shape", [(TINY[0], (3, 6, 10)), (TINY[0], (1, 4, 2)), (TINY[1], (4, 3, 6)),
                                           (TINY[1], (2, 5, 2))],
                         ids=["wan_patch-3x6x10", "wan_patch-1x4x2", "uneven_patch-4x3x6", "uneven_patch-2x5x2"])
def test_matches_diffusers_fp32(config, shape):
    """Non-cubic latents, batch 2 with different timesteps and text: <= 1e-5 in fp32."""
    reference = random_reference(config)
    ours = ours_from(reference, config)
    x, t, text = inputs(config, shape)
    with torch.no_grad():
        expected = diffusers_out(reference, x, t, text)
        got = ours(x, t, text)
    assert got.shape == expected.shape == (2, config["out_channels"], *shape)
    assert (got - expected).abs().max().item() <= TOL
    assert not torch.allclose(got[0], got[1])  # the rows really differ (time and text)


def test_text_mask_is_zero_padding_like_wan_pipeline():
    """A mask zeroes padded text states, which are still attended to (no attention mask in Wan)."""
    config = TINY[0]
    reference = random_reference(config)
    ours = ours_from(reference, config)
    x, t, text = inputs(config, (2, 4, 4))
    mask = torch.tensor([[True] * 3 + [False] * 4, [True] * 7])
    with torch.no_grad():
        expected = diffusers_out(reference, x, t, text * mask[..., None])
        got = ours(x, t, text, mask)
        unmasked = ours(x, t, text)
    assert (got - expected).abs().max().item() <= TOL
    assert not torch.allclose(got[0], unmasked[0])  # padding changed row 0
    assert torch.equal(got[1], unmasked[1])


def test_rope_far_positions_match_diffusers_bit_for_bit():
    """Angles in float64 as diffusers forms them: equal to the last bit at position 1000 too."""
    head_dim, grid = 128, (3, 2, 1000)
    rope = diffusers.models.transformers.transformer_wan.WanRotaryPosEmbed(head_dim, (1, 2, 2), 1024)
    their_cos, their_sin = rope(torch.zeros(1, 1, grid[0], 2 * grid[1], 2 * grid[2]))
    cos, sin = wan_rope(grid, head_dim)
    assert torch.equal(cos.repeat_interleave(2, dim=-1), their_cos[0, :, 0])
    assert torch.equal(sin.repeat_interleave(2, dim=-1), their_sin[0, :, 0])


def test_folder_round_trip_is_exact(tmp_path):
    """diffusers save -> our import -> our export -> diffusers from_pretrained: the same weights and outputs."""
    config = TINY[0]
    reference = random_reference(config)
    reference.save_pretrained(tmp_path / "theirs")
    cfg = from_dict(WanConfig, diffusers_wan.read_config(tmp_path / "theirs"), "model.wan.")
    ours = WanDiT(cfg).eval()
    ours.load_state_dict(load_diffusers_folder(tmp_path / "theirs", cfg), strict=True)
    # As the recipe holds it: the DiT under "dit.", beside weights diffusers has no place for.
    recipe_state = {**{f"dit.{k}": v for k, v in ours.state_dict().items()}, "null_text": torch.zeros(1, 1, 24)}
    export_diffusers(recipe_state, cfg, tmp_path / "ours", prefix="dit.")
    back = WanTransformer3DModel.from_pretrained(tmp_path / "ours").eval()
    expected = reference.state_dict()
    assert set(back.state_dict()) == set(expected)
    assert all(torch.equal(v, expected[k]) for k, v in back.state_dict().items())
    x, t, text = inputs(config, (3, 6, 10))
    with torch.no_grad():
        assert torch.equal(diffusers_out(back, x, t, text), diffusers_out(reference, x, t, text))
        assert (ours(x, t, text) - diffusers_out(back, x, t, text)).abs().max().item() <= TOL


def test_sharded_folders_both_ways(tmp_path):
    """diffusers' sharded save (index.json) reads in; our sharded write loads in diffusers."""
    config = TINY[1]
    reference = random_reference(config)
    reference.save_pretrained(tmp_path / "theirs", max_shard_size="20KB")
    assert (tmp_path / "theirs" / diffusers_wan.INDEX).is_file()
    assert len(diffusers_wan.weight_files(tmp_path / "theirs")) > 1
    state, found = diffusers_wan.read(tmp_path / "theirs")
    ours = WanDiT(WanConfig(**found)).eval()
    ours.load_state_dict(state, strict=True)
    paths = diffusers_wan.write(ours.state_dict(), WanConfig(**found).diffusers_config(), tmp_path / "ours",
                                max_shard_bytes=20_000)
    assert sum(p.endswith(".safetensors") for p in paths) > 1
    back = WanTransformer3DModel.from_pretrained(tmp_path / "ours").eval()
    x, t, text = inputs(config, (4, 4, 2))
    with torch.no_grad():
        assert torch.equal(diffusers_out(back, x, t, text), diffusers_out(reference, x, t, text))


def test_trained_model_samples_the_same_in_diffusers(tmp_path):
    """Ours from our init, trained a few flow steps, exported: diffusers' transformer in our Euler sampler
    gives the latents our model gives."""
    config = TINY[0]
    torch.manual_seed(0)
    cfg = WanConfig(**config)
    model = WanDiT(cfg)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    gen = torch.Generator().manual_seed(0)
    for _ in range(4):
        x0, t, text = inputs(config, (2, 4, 4), seed=int(torch.randint(0, 1000, (1,), generator=gen)))
        noise = torch.randn(x0.shape, generator=gen)
        loss = flow.flow_loss(lambda x, t, **c: model(x, t, **c), x0, noise, t, {"text": text})
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    assert model.head.weight.abs().max() > 0  # trained away from the zero head of our init
    diffusers_wan.write(model.state_dict(), cfg.diffusers_config(), tmp_path / "export", source={"step": 4})
    theirs = WanTransformer3DModel.from_pretrained(tmp_path / "export").eval()
    noise, _, text = inputs(config, (2, 4, 4), seed=5)
    mask = torch.tensor([[True] * 4 + [False] * 3, [True] * 7])
    sigmas = flow.flow_sigmas(6, shift=3.0)
    ours_z = flow.euler_sample(model, noise, sigmas, cond={"text": text, "text_mask": mask})
    their_z = flow.euler_sample(lambda x, t, text, text_mask: diffusers_out(theirs, x, t, text * text_mask[..., None]),
                                noise, sigmas, cond={"text": text, "text_mask": mask})
    assert ours_z.abs().max() > 0.1
    assert (ours_z - their_z).abs().max().item() <= TOL


@pytest.mark.parametrize("preset, released", [("wan2_1_t2v_1_3b", 1_418_996_800), ("wan2_1_t2v_14b", 14_288_491_584)])
def test_released_presets_have_diffusers_parameter_count(preset, released):
    """Built on the meta device: our preset's model, diffusers' model of the released config and our shape
    formula all hold the same number of parameters."""
    model_section = yaml.safe_load((ROOT / f"recipes/video_dit/configs/{preset}.yaml").read_text())["model"]
    assert model_section["arch"] == "wan"
    cfg = from_dict(WanConfig, model_section["wan"], "model.wan.")
    with torch.device("meta"):
        ours = sum(p.numel() for p in WanDiT(cfg).parameters())
        theirs = sum(p.numel() for p in WanTransformer3DModel(**cfg.diffusers_config()).parameters())
    assert ours == theirs == count_parameters(cfg) == released


def test_bad_folders_fail_with_one_line_naming_the_file(tmp_path):
    reference = random_reference(TINY[0])
    reference.save_pretrained(tmp_path / "m")
    config = json.loads((tmp_path / "m" / "config.json").read_text())
    (tmp_path / "m" / "config.json").write_text(json.dumps({**config, "image_dim": 1280}))
    with pytest.raises(ValueError, match=r"config.json: image_dim=1280: image-conditioned Wan is not supported"):
        diffusers_wan.read(tmp_path / "m")
    (tmp_path / "m" / "config.json").write_text(json.dumps({**config, "_class_name": "FluxTransformer2DModel"}))
    with pytest.raises(ValueError, match=r"_class_name is 'FluxTransformer2DModel'"):
        diffusers_wan.read(tmp_path / "m")
    (tmp_path / "m" / "config.json").write_text(json.dumps(config))
    (tmp_path / "m" / diffusers_wan.WEIGHTS).unlink()
    with pytest.raises(FileNotFoundError, match=r"no diffusion_pytorch_model.safetensors"):
        diffusers_wan.read(tmp_path / "m")
    with pytest.raises(ValueError, match=r"model.wan.num_layers: 3 in the run config but 2 in .*; "
                                         r"model.wan.cross_attn_norm: False in the run config but True"):
        load_diffusers_folder(tmp_path / "m", WanConfig(**{**TINY[0], "num_layers": 3, "cross_attn_norm": False}))
    with pytest.raises(ValueError, match=r"keys WanDiT does not have .*add_k_proj"):
        diffusers_wan.from_diffusers({"blocks.0.attn2.add_k_proj.weight": torch.zeros(1)})
