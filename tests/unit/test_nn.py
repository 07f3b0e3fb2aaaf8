"""Attention, RoPE and layer numerics against naive references and Hugging Face Llama."""

import math

import pytest
import torch
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

from framework.nn.attention import attention, build_attention_mask
from framework.nn.layers import RMSNorm, SwiGLU
from framework.nn.rope import apply_rope, rope_angles, rope_cos_sin, rope_frequencies


def naive_attention(q, k, v, allowed):
    """softmax(q k^T / sqrt(D)) v with a (B, 1, Lq, Lk) boolean mask, written out."""
    scores = q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])
    scores = scores.masked_fill(~allowed, float("-inf"))
    return scores.softmax(dim=-1) @ v


def qkv(b=2, h=3, length=7, d=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(b, h, length, d, generator=g, dtype=torch.float64) for _ in range(3)]


def test_attention_unmasked_matches_naive():
    q, k, v = qkv()
    allowed = torch.ones(1, 1, 7, 7, dtype=torch.bool)
    torch.testing.assert_close(attention(q, k, v), naive_attention(q, k, v, allowed))


def test_attention_causal_matches_naive():
    q, k, v = qkv()
    allowed = torch.ones(7, 7, dtype=torch.bool).tril()[None, None]
    torch.testing.assert_close(attention(q, k, v, causal=True), naive_attention(q, k, v, allowed))


def test_attention_doc_ids_and_padding_match_naive():
    q, k, v = qkv()
    doc_ids = torch.tensor([[0, 0, 0, 1, 1, 1, 2], [5, 5, 5, 5, 6, 6, 6]])
    keep = torch.tensor([[True] * 6 + [False], [True] * 7])
    allowed = (doc_ids[:, :, None] == doc_ids[:, None, :]) & keep[:, None, :]
    out = attention(q, k, v, key_padding_mask=keep, doc_ids=doc_ids)
    ref = naive_attention(q, k, v, allowed[:, None])
    # Row 0 position 6 is padding whose only same-doc key is padded too; it is allowed to see itself.
    torch.testing.assert_close(out[0, :, :6], ref[0, :, :6])
    torch.testing.assert_close(out[1], ref[1])
    torch.testing.assert_close(out[0, :, 6], v[0, :, 6])


def test_doc_ids_block_diagonal_isolates_documents():
    q, k, v = qkv(b=1)
    doc_ids = torch.tensor([[0, 0, 0, 1, 1, 1, 1]])
    out = attention(q, k, v, doc_ids=doc_ids)
    v2 = v.clone()
    v2[:, :, 3:] += 10.0  # changing doc 1 must not move doc 0's outputs
    out2 = attention(q, k, v2, doc_ids=doc_ids)
    torch.testing.assert_close(out[:, :, :3], out2[:, :, :3])
    assert not torch.allclose(out[:, :, 3:], out2[:, :, 3:])


def test_causal_mask_bottom_right_for_shorter_query():
    mask = build_attention_mask(2, 5, causal=True)
    expected = torch.tensor([[1, 1, 1, 1, 0], [1, 1, 1, 1, 1]], dtype=torch.bool)
    assert torch.equal(mask[0, 0], expected)


def test_fully_padded_causal_row_is_not_nan():
    q, k, v = qkv(b=1)
    keep = torch.tensor([[False, False, True, True, True, True, True]])  # left padding
    out = attention(q, k, v, causal=True, key_padding_mask=keep)
    assert torch.isfinite(out).all()


def test_rope_relative_position_property():
    cos, sin = rope_frequencies(16, 64)
    g = torch.Generator().manual_seed(1)
    q = torch.randn(1, 1, 1, 16, generator=g)
    k = torch.randn(1, 1, 1, 16, generator=g)

    def score(m, n):
        qm = apply_rope(q, cos, sin, positions=torch.tensor([m]))
        kn = apply_rope(k, cos, sin, positions=torch.tensor([n]))
        return (qm * kn).sum()

    torch.testing.assert_close(score(3, 10), score(30, 37), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(score(12, 5), score(50, 43), rtol=1e-5, atol=1e-5)
    assert not torch.allclose(score(3, 10), score(3, 11))


def test_rope_matches_transformers_llama():
    b, h, length, d = 2, 3, 11, 16
    g = torch.Generator().manual_seed(2)
    q = torch.randn(b, h, length, d, generator=g)
    k = torch.randn(b, h, length, d, generator=g)
    cos, sin = rope_frequencies(d, 32, theta=500000.0)
    ids = torch.arange(length).expand(b, length)
    q_ref, k_ref = apply_rotary_pos_emb(q, k, cos[ids], sin[ids])
    torch.testing.assert_close(apply_rope(q, cos, sin), q_ref)
    torch.testing.assert_close(apply_rope(k, cos, sin, positions=ids), k_ref)


def test_rope_fractional_positions_interpolate_integer_table():
    angles = rope_angles(torch.tensor([2.5]), 8)
    cos, _ = rope_cos_sin(angles)
    inv_freq = 10000.0 ** (-torch.arange(0, 8, 2) / 8)
    torch.testing.assert_close(cos[0, :4], torch.cos(2.5 * inv_freq))


def test_rope_rejects_odd_dim():
    with pytest.raises(ValueError, match="even"):
        rope_frequencies(7, 4)


def test_rmsnorm_matches_manual():
    norm = RMSNorm(6, eps=1e-6)
    with torch.no_grad():
        norm.weight.copy_(torch.arange(1.0, 7.0))
    x = torch.tensor([[1.0, -2.0, 3.0, 0.5, 0.0, 4.0]])
    rms = math.sqrt(sum(t * t for t in x[0].tolist()) / 6 + 1e-6)
    expected = x / rms * torch.arange(1.0, 7.0)
    torch.testing.assert_close(norm(x), expected)
    assert norm(x.bfloat16()).dtype == torch.bfloat16


def test_swiglu_formula():
    torch.manual_seed(0)
    mlp = SwiGLU(4, 6)
    x = torch.randn(3, 4)
    expected = mlp.w2.weight @ (torch.nn.functional.silu(mlp.w1.weight @ x.T) * (mlp.w3.weight @ x.T))
    torch.testing.assert_close(mlp(x), expected.T)
    assert all(m.bias is None for m in (mlp.w1, mlp.w2, mlp.w3))
