"""The `lora` config section and framework/lora.py on a real LladaModel with real peft layers."""

from __future__ import annotations

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
