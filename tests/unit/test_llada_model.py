"""LLaDA model: shapes, bidirectional vs causal attention, parameter count and FLOPs formula."""

import dataclasses

import pytest
import torch

from framework.nn.llada import LladaModel, LladaModelConfig, count_parameters, train_flops_per_token

TINY = LladaModelConfig(vocab_size=64, dim=32, n_layers=2, n_heads=4, ffn_hidden=48, max_seq_len=16)


def build(cfg: LladaModelConfig = TINY, seed: int = 0) -> LladaModel:
    torch.manual_seed(seed)
    return LladaModel(cfg).eval()


def test_forward_shape_and_deterministic_init():
    ids = torch.randint(0, 64, (2, 10))
    a, b = build()(ids), build()(ids)
    assert a.shape == (2, 10, 64)
    torch.testing.assert_close(a, b)
    assert not torch.allclose(a, build(seed=1)(ids))


@pytest.mark.parametrize("causal", [False, True])
def test_bidirectional_vs_causal(causal):
    model = build(dataclasses.replace(TINY, causal=causal))
    ids = torch.randint(0, 64, (1, 12), generator=torch.Generator().manual_seed(0))
    changed = ids.clone()
    changed[0, 9] = (ids[0, 9] + 1) % 64
    with torch.no_grad():
        before, after = model(ids), model(changed)
    earlier_moved = not torch.allclose(before[0, :9], after[0, :9])
    assert earlier_moved is not causal
    assert not torch.allclose(before[0, 9:], after[0, 9:])


def test_doc_ids_isolate_packed_documents():
    model = build()
    ids = torch.randint(0, 64, (1, 12), generator=torch.Generator().manual_seed(1))
    doc_ids = torch.tensor([[0] * 6 + [1] * 6])
    changed = ids.clone()
    changed[0, 8] = (ids[0, 8] + 1) % 64
    with torch.no_grad():
        before, after = model(ids, doc_ids=doc_ids), model(changed, doc_ids=doc_ids)
    torch.testing.assert_close(before[0, :6], after[0, :6])


def test_key_padding_hides_padded_tokens():
    model = build()
    ids = torch.randint(0, 64, (1, 12), generator=torch.Generator().manual_seed(2))
    keep = torch.tensor([[True] * 8 + [False] * 4])
    changed = ids.clone()
    changed[0, 10] = (ids[0, 10] + 1) % 64
    with torch.no_grad():
        torch.testing.assert_close(
            model(ids, key_padding_mask=keep)[0, :8], model(changed, key_padding_mask=keep)[0, :8]
        )


@pytest.mark.parametrize(
    "overrides", [{}, {"qk_norm": True}, {"tie_embeddings": True}, {"qk_norm": True, "tie_embeddings": True}]
)
def test_count_parameters_matches_built_model(overrides):
    cfg = dataclasses.replace(TINY, **overrides)
    model = build(cfg)
    assert count_parameters(cfg) == sum(p.numel() for p in model.parameters())
    if cfg.tie_embeddings:
        assert model.lm_head.weight is model.embed.weight


def test_default_config_count_matches_model():
    cfg = LladaModelConfig()
    assert count_parameters(cfg) == sum(p.numel() for p in build(cfg).parameters())


def test_8b_shape_has_8b_parameters():
    cfg = LladaModelConfig(
        n_layers=32,
        dim=4096,
        n_heads=32,
        ffn_hidden=12288,
        vocab_size=126464,
        max_seq_len=4096,
        mask_id=126336,
    )
    assert count_parameters(cfg) == pytest.approx(8.0e9, rel=0.03)


def test_train_flops_per_token_formula():
    cfg = TINY
    n_nonembed = count_parameters(cfg) - cfg.vocab_size * cfg.dim
    expected = 6 * n_nonembed + 12 * cfg.n_layers * cfg.dim * 16
    assert train_flops_per_token(cfg, 16) == expected
    tied = dataclasses.replace(cfg, tie_embeddings=True)
    # tying removes a parameter matrix but not the lm_head matmul
    assert train_flops_per_token(tied, 16) == expected


def test_rope_tables_survive_bf16_cast():
    model = build().to(torch.bfloat16)
    ids = torch.randint(0, 64, (1, 16))
    assert torch.isfinite(model(ids).float()).all()
    cos, _ = model._rope_tables()
    assert cos.dtype == torch.float32


def test_config_validation_and_length_error():
    with pytest.raises(ValueError, match="n_heads"):
        LladaModelConfig(dim=30, n_heads=4)
    with pytest.raises(ValueError, match="mask_id"):
        LladaModelConfig(vocab_size=4, mask_id=4)
    with pytest.raises(ValueError, match="max_seq_len"):
        build()(torch.zeros(1, 17, dtype=torch.long))
