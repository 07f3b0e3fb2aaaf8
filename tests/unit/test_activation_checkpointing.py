"""Selective activation checkpointing (`model.activation_checkpointing: none | full | every_k`): the same
gradients in every mode for all four models, exactly the chosen blocks recomputed, old true/false configs
still loading, and a bad value refused with the key named."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

from framework.config import ConfigError, from_dict, read_preset
from framework.nn.checkpointing import should_checkpoint
from framework.nn.llada import LladaModel, LladaModelConfig
from framework.recipe import load_run_config
from recipes.video_audio.model import JointAVConfig, JointAVDiT
from recipes.video_dit.model import VideoDiT, VideoDiTConfig
from recipes.video_dit.wan import WanConfig, WanDiT

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "launch"))
from plan import checkpointing_every, checkpointing_mode  # noqa: E402  launch/plan.py

DEPTH = 4  # every_2 then recomputes blocks 0 and 2, not 1 and 3


def _gen() -> torch.Generator:
    return torch.Generator().manual_seed(1)


def _llada(mode: str):
    model = LladaModel(LladaModelConfig(vocab_size=64, dim=32, n_layers=DEPTH, n_heads=4, n_kv_heads=2,
                                        ffn_hidden=48, activation_checkpointing=mode))
    return model, lambda: model(torch.randint(0, 64, (2, 16), generator=_gen())).square().mean()


def _video_dit(mode: str):
    model = VideoDiT(VideoDiTConfig(in_channels=4, dim=32, depth=DEPTH, heads=4, ffn_hidden=64, text_dim=16,
                                    activation_checkpointing=mode))
    g = _gen()
    x, t, text = torch.randn(2, 4, 3, 8, 8, generator=g), torch.rand(2, generator=g), torch.randn(2, 5, 16, generator=g)
    return model, lambda: model(x, t, text).square().mean()


def _wan(mode: str):
    model = WanDiT(WanConfig(patch_size=[1, 2, 2], num_attention_heads=2, attention_head_dim=12, in_channels=4,
                             out_channels=4, text_dim=24, freq_dim=32, ffn_dim=40, num_layers=DEPTH,
                             rope_max_seq_len=64, activation_checkpointing=mode))
    g = _gen()
    x, t, text = torch.randn(2, 4, 2, 4, 4, generator=g), torch.rand(2, generator=g), torch.randn(2, 7, 24, generator=g)
    return model, lambda: model(x, t, text).square().mean()


def _joint_av(mode: str):
    model = JointAVDiT(JointAVConfig(video_channels=4, audio_channels=4, dim=32, depth=DEPTH, heads=4,
                                     ffn_hidden=64, text_dim=16, activation_checkpointing=mode))
    g = _gen()
    args = (torch.randn(2, 4, 3, 4, 4, generator=g), torch.randn(2, 4, 12, generator=g), torch.rand(2, generator=g),
            torch.rand(2, generator=g), torch.randn(2, 5, 16, generator=g))

    def loss():
        v, a = model(*args)
        return v.square().mean() + a.square().mean()
    return model, loss


def _run(build, mode: str, monkeypatch) -> tuple[dict, list[int]]:
    """Gradients of one training step under `mode`, and how often each block ran forward (a recompute in
    backward is a second call of the block's forward; module hooks would not see it, so forward is wrapped)."""
    torch.manual_seed(0)
    model, loss = build(mode)
    with torch.no_grad():  # wake the zero-initialised layers (adaLN, heads) so every block gets a gradient
        for p in model.parameters():
            if p.abs().sum() == 0:
                p.normal_(std=0.2)
    model.train()
    index = {id(b): i for i, b in enumerate(model.blocks)}
    calls = [0] * len(model.blocks)
    cls = type(model.blocks[0])
    forward = cls.forward

    def counted(self, *args, **kwargs):
        calls[index[id(self)]] += 1
        return forward(self, *args, **kwargs)
    monkeypatch.setattr(cls, "forward", counted)
    loss().backward()
    monkeypatch.setattr(cls, "forward", forward)
    return {k: p.grad for k, p in model.named_parameters()}, calls


@pytest.mark.parametrize("build", [_llada, _video_dit, _wan, _joint_av], ids=["llada", "video_dit", "wan", "joint_av"])
def test_every_mode_gives_the_same_gradients_and_recomputes_the_chosen_blocks(build, monkeypatch):
    plain, plain_calls = _run(build, "none", monkeypatch)
    assert plain_calls == [1] * DEPTH
    assert all(g is not None and g.abs().sum() > 0 for g in plain.values())
    for mode, recomputed in (("full", [2, 2, 2, 2]), ("every_k", [2, 1, 2, 1])):
        grads, calls = _run(build, mode, monkeypatch)
        assert calls == recomputed, mode
        for name, g in plain.items():
            assert (grads[name] - g).abs().max() <= 1e-6, (mode, name)


def test_should_checkpoint_picks_one_block_in_every_k():
    assert [i for i in range(7) if should_checkpoint("every_k", 3, i)] == [0, 3, 6]
    assert [i for i in range(3) if should_checkpoint("full", 3, i)] == [0, 1, 2]
    assert not any(should_checkpoint("none", 2, i) for i in range(3))
    assert should_checkpoint(True, 2, 1) and not should_checkpoint(False, 2, 0)  # bools set by hand


@pytest.mark.parametrize("cls", [LladaModelConfig, VideoDiTConfig, WanConfig, JointAVConfig])
def test_old_true_false_configs_load_as_full_and_none(cls):
    for old, new in ((True, "full"), (False, "none"), ("true", "full"), ("full", "full"), ("every_k", "every_k")):
        assert from_dict(cls, {"activation_checkpointing": old}).activation_checkpointing == new


def test_an_old_bool_preset_loads_and_the_planner_reads_the_mode():
    tree = read_preset("recipes/video_dit/configs/wan2_1_1_3b.yaml")
    assert tree["model"]["activation_checkpointing"] == "full"
    tree["model"]["activation_checkpointing"] = True  # as the preset read before the modes existed
    cfg, _ = load_run_config(tree, [], 1)
    assert cfg.model.activation_checkpointing == "full" and checkpointing_mode(cfg) == "full"
    cfg, _ = load_run_config("recipes/llada/configs/tiny.yaml", ["model.activation_checkpointing=every_k",
                                                                 "model.activation_checkpointing_every=3"], 1)
    assert (checkpointing_mode(cfg), checkpointing_every(cfg)) == ("every_k", 3)


@pytest.mark.parametrize("overrides, key", [
    (["model.activation_checkpointing=every_2"], "model.activation_checkpointing"),
    (["model.activation_checkpointing=3"], "model.activation_checkpointing"),
    (["model.activation_checkpointing=every_k", "model.activation_checkpointing_every=0"],
     "model.activation_checkpointing_every")])
def test_a_bad_value_is_a_config_error_naming_the_key(overrides, key):
    with pytest.raises(ConfigError, match=key):
        load_run_config("recipes/llada/configs/tiny.yaml", overrides, 1)


def test_init_from_ignores_checkpointing_but_not_shapes():
    """A checkpoint saved with the old bool (or another mode) initialises a run in any mode: checkpointing
    shapes no weight. model.wan's nested keys count too."""
    from framework.config import to_dict
    from framework.init_from import check_model_config

    run = to_dict(from_dict(VideoDiTConfig, {"arch": "wan", "wan": {"activation_checkpointing": True}}))
    old = {**run, "wan": {**run["wan"], "activation_checkpointing": False}}
    old["wan"].pop("activation_checkpointing_every", None)  # not in configs saved before the modes
    check_model_config(run, old, "meta.json")
    with pytest.raises(ConfigError, match="model.wan"):
        check_model_config(run, {**old, "wan": {**old["wan"], "ffn_dim": 1}}, "meta.json")
