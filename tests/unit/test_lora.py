"""The `lora` config section and framework/lora.py on a real LladaModel with real peft layers."""

from __future__ import annotations

import re

import pytest
import torch

from framework import lora
from framework.config import ConfigError, RunConfig, check_common, from_dict
from framework.engine import param_groups
from framework.nn.llada import LladaModel, LladaModelConfig
from recipes.llada.recipe import LladaConfig, LladaRecipe

MODEL = {"vocab_size": 64, "dim": 32, "n_layers": 2, "n_heads": 2, "ffn_hidden": 48, "max_seq_len": 16}


def _cfg(precision: str = "fp32", **section) -> LladaConfig:
    return from_dict(LladaConfig, {"recipe": "llada", "model": MODEL, "train": {"precision": precision},
                                   "lora": {"rank": 4, "alpha": 8, "targets": ["wq", "wv"], **section}})


def _model() -> LladaModel:
    torch.manual_seed(0)
    return LladaModel(LladaModelConfig(**MODEL))


@pytest.mark.parametrize("section, key", [({"rank": -1}, "lora.rank"), ({"alpha": 0}, "lora.alpha"),
                                          ({"alpha": float("nan")}, "lora.alpha"), ({"dropout": 1.0}, "lora.dropout"),
                                          ({"dropout": -0.1}, "lora.dropout"), ({"rank": 4, "targets": []},
                                                                                "lora.targets")])
def test_bad_lora_values_name_the_key(section, key):
    cfg = from_dict(RunConfig, {"lora": section})
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        check_common(cfg, 1)


def test_lora_off_by_default_and_rank0_needs_no_targets():
    cfg = from_dict(RunConfig, {"lora": {"rank": 0}})
    check_common(cfg, 1)
    assert RunConfig().lora.rank == 0
    assert lora.apply(_model(), cfg) == ""


def test_targets_resolve_by_suffix_and_glob_and_name_bad_patterns():
    model = _model()
    assert lora.resolve_targets(model, ["wq"]) == ["blocks.0.attn.wq", "blocks.1.attn.wq"]
    assert lora.resolve_targets(model, ["blocks.1.ffn.w?"]) == ["blocks.1.ffn.w1", "blocks.1.ffn.w3",
                                                               "blocks.1.ffn.w2"]
    with pytest.raises(ConfigError, match="lora.targets: 'wz' matches no module"):
        lora.resolve_targets(model, ["wq", "wz"])
    with pytest.raises(ConfigError, match="'embed' matches only non-Linear modules"):
        lora.resolve_targets(model, ["embed"])


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_only_adapters_reach_the_optimizer_and_frozen_base_is_bf16(precision):
    model, cfg = _model(), _cfg(precision)
    line = lora.apply(model, cfg)
    assert "LoRA rank 4 (alpha 8) on 4 Linear layers" in line
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {f"blocks.{i}.attn.{m}.lora_{ab}.default.weight" for i in (0, 1) for m in ("wq", "wv")
                         for ab in "AB"}
    grouped = [p for g in param_groups(model, 0.1) for p in g["params"]]
    assert len(grouped) == 8 and all(p.requires_grad for p in grouped)
    frozen = [p for p in model.parameters() if not p.requires_grad]
    assert {p.dtype for p in frozen} == {torch.bfloat16 if precision == "bf16" else torch.float32}
    assert lora.count(model) == {"trainable": 8 * 4 * 32, "frozen": sum(p.numel() for p in frozen)}


def test_fresh_adapters_leave_the_output_unchanged_and_merge_matches_peft():
    ids = torch.randint(5, 64, (2, 16), generator=torch.Generator().manual_seed(1))
    base, adapted = _model(), _model()
    lora.apply(adapted, _cfg())
    with torch.no_grad():
        before = base(ids)
        torch.testing.assert_close(adapted(ids), before, rtol=0, atol=0)  # B starts at zero
        for name, p in adapted.named_parameters():
            if ".lora_B." in name:
                p.normal_(0, 0.1)
        trained = adapted(ids)
        state, adapters = lora.split_state(adapted.state_dict())
        assert sorted(adapters) == ["blocks.0.attn.wq", "blocks.0.attn.wv", "blocks.1.attn.wq", "blocks.1.attn.wv"]
        base.load_state_dict(state)  # the base keys are the model's own again
        torch.testing.assert_close(base(ids), before, rtol=0, atol=0)  # adapters out, base untouched
        merged = _model()
        merged.load_state_dict(lora.merge(state, adapters, _cfg().lora))
        assert not torch.allclose(before, trained, atol=1e-3)
        torch.testing.assert_close(merged(ids), trained, rtol=0, atol=1e-5)


def test_optimizer_state_bytes_and_describe():
    assert lora.optimizer_state_bytes(1000, 0, 4, "fp32") == 8000
    assert lora.optimizer_state_bytes(1000, 2, 4, "fp32") == 2000
    assert lora.optimizer_state_bytes(1001, 3, 4, "bf16") == 251 * 12
    cfg = _cfg("bf16")
    cfg.train.zero_stage = 2
    line = lora.describe(cfg, LladaRecipe(), world=2)
    frozen = sum(p.numel() for p in _model().parameters())
    assert line.startswith(f"trainable 1,024 / frozen {frozen:,} parameters (LoRA rank 4)")
    assert f"optimizer state {512 * 12 / 2**20:.2f} MiB per rank (AdamW, ZeRO-2, world 2, bf16)" in line
    cfg.lora.targets = ["nothing"]
    with pytest.raises(ConfigError, match="'nothing' matches no module"):
        lora.describe(cfg, LladaRecipe(), world=2)


# ---------------------------------------------------------------------------------------------
# The video recipes: default targets, bf16 frozen base, --describe, exports

DIT = "recipes/video_dit/configs/tiny.yaml"
JOINT = "recipes/video_audio/configs/tiny.yaml"
SMALL_VIDEO = ["model.dim=32", "model.depth=2", "model.heads=2", "model.ffn_hidden=64", "model.text_dim=32",
               "text.layers=1", "text.heads=2"]
WAN = ["model.arch=wan", "model.wan.num_attention_heads=2", "model.wan.attention_head_dim=12",
       "model.wan.text_dim=32", "model.wan.freq_dim=32", "model.wan.ffn_dim=40", "model.wan.num_layers=2",
       "text.layers=1", "text.heads=2"]


def _video(preset: str, *overrides: str):
    from framework.recipe import load_run_config

    cfg, recipe = load_run_config(preset, ["lora.rank=4", "lora.alpha=8", *overrides], world=1)
    torch.manual_seed(0)
    return cfg, recipe, recipe.build_model(cfg).model


@pytest.mark.parametrize("preset, overrides, per_block", [
    (DIT, SMALL_VIDEO, ["attn.q", "attn.kv", "attn.out", "cross.q", "cross.kv", "cross.out", "mlp.0", "mlp.2"]),
    (DIT, WAN, [f"{a}.{m}" for a in ("self_attn", "cross_attn") for m in "qkvo"] + ["ffn.0", "ffn.2"]),
    (JOINT, SMALL_VIDEO, [f"{tower}.{m}" for tower in ("video", "audio") for m in
                          ("attn.q", "attn.kv", "attn.out", "cross.q", "cross.kv", "cross.out", "mlp.0", "mlp.2")]
     + [f"{x}.attn.{m}" for x in ("audio_to_video", "video_to_audio") for m in ("q", "kv", "out")]),
], ids=["dit", "wan", "video_audio"])
def test_video_default_targets_adapt_the_blocks_never_the_text_encoder(preset, overrides, per_block):
    """An empty lora.targets takes the recipe's (and arch's) default: attention and FFN Linears of the DiT
    blocks; the trainable text encoder, embeddings and heads stay frozen. The patterns are written back into
    the config, so the run's config.yaml names them. bf16 run: the frozen base is bf16, adapters fp32."""
    cfg, _, model = _video(preset, *overrides, "train.precision=bf16")
    assert cfg.lora.targets == []
    line = lora.apply(model, cfg)
    expected = sorted(f"dit.blocks.{i}.{m}" for i in range(2) for m in per_block)
    assert sorted(lora.adapted_modules(model)) == expected
    assert f"on {len(expected)} Linear layers" in line
    assert cfg.lora.targets == lora.DEFAULT_TARGETS[cfg.recipe if preset == JOINT else f"video_dit/{cfg.model.arch}"]
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(".lora_" in n and n.startswith("dit.blocks.") for n in trainable)
    assert {p.dtype for p in model.parameters() if not p.requires_grad} == {torch.bfloat16}
    assert {p.dtype for p in model.parameters() if p.requires_grad} == {torch.float32}
    assert [p for g in param_groups(model, 0.1) for p in g["params"]] and all(
        p.requires_grad for g in param_groups(model, 0.1) for p in g["params"])


def test_video_describe_counts_adapters_and_optimizer_state():
    cfg, recipe, model = _video(DIT, *SMALL_VIDEO, "train.precision=bf16", "train.zero_stage=2")
    lora.apply(model, cfg)
    # per block: attn q, out and cross q, out (32 -> 32), attn kv and cross kv (32 -> 64), mlp 32 -> 64 -> 32
    adapters = 2 * 4 * (4 * (32 + 32) + 2 * (32 + 64) + 2 * (32 + 64))
    frozen = sum(p.numel() for p in model.parameters() if not p.requires_grad)
    cfg.lora.targets = []  # --describe on a fresh config: the defaults again
    line = lora.describe(cfg, recipe, world=2)
    assert line.startswith(f"trainable {adapters:,} / frozen {frozen:,} parameters (LoRA rank 4)")
    assert f"optimizer state {adapters // 2 * 12 / 2**20:.2f} MiB per rank (AdamW, ZeRO-2, world 2, bf16)" in line
    from framework.recipe import load_run_config

    with pytest.raises(ConfigError, match=r"lora\.targets must name at least one module pattern"):
        load_run_config("recipes/video_vae/configs/tiny.yaml", ["lora.rank=4"], world=1)  # no default: convolutions


def test_video_peft_export_loads_onto_our_module_with_our_output(tmp_path):
    """--format peft on a video recipe: peft's folder keyed on our module names, which PeftModel loads onto the
    model built from the --format safetensors weights (the base), giving the LoRA model's output."""
    from peft import PeftModel

    cfg, recipe, model = _video(DIT, *SMALL_VIDEO)
    with torch.no_grad():
        for p in model.parameters():  # a "pretrained" base: a fresh DiT's zero head and gates hide every adapter
            p.add_(0.2 * torch.randn_like(p))
        lora.apply(model, cfg)
        for name, p in model.named_parameters():
            if ".lora_B." in name:
                p.normal_(0, 0.1)
    gen = torch.Generator().manual_seed(0)
    x, t = torch.randn(2, 16, 3, 4, 4, generator=gen), torch.rand(2, generator=gen)
    text, mask = torch.randn(2, 5, 32, generator=gen), torch.ones(2, 5, dtype=torch.bool)
    base, adapters = lora.split_state(model.state_dict())
    lora.write_peft(adapters, cfg.lora, "video_dit", str(tmp_path))
    plain = recipe.build_model(cfg).model.eval()
    plain.load_state_dict(base)
    with torch.no_grad():
        expected = model.eval()(x, t, text, mask)
        before = plain(x, t, text, mask)
        got = PeftModel.from_pretrained(plain, str(tmp_path)).eval()(x, t, text, mask)
    assert (before - expected).abs().max() > 1e-3
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-6)


def test_wan_lora_layout_folds_the_scale_and_refuses_what_diffusers_cannot_hold():
    from framework.export import diffusers_wan

    a, b = torch.randn(4, 24), torch.randn(24, 4)
    out = diffusers_wan.lora_to_diffusers({"dit.blocks.1.self_attn.o": (a, b), "dit.head": (a, b)}, 2.0, "dit.")
    assert sorted(out) == ["transformer.blocks.1.attn1.to_out.0.lora_A.weight",
                           "transformer.blocks.1.attn1.to_out.0.lora_B.weight",
                           "transformer.proj_out.lora_A.weight", "transformer.proj_out.lora_B.weight"]
    assert torch.equal(out["transformer.proj_out.lora_A.weight"], a)
    assert torch.equal(out["transformer.proj_out.lora_B.weight"], 2.0 * b)
    for module in ("text_encoder.layers.0.attn.q", "dit.patch_embed"):
        with pytest.raises(ValueError, match=re.escape(f"no place in diffusers' WanTransformer3DModel LoRA layout: "
                                                       f"{module}")):
            diffusers_wan.lora_to_diffusers({module: (a, b)}, 1.0, "dit.")
