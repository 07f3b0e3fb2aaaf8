"""Video DiT parts: patchify round trip, 3-D RoPE bands, adaLN-Zero identity at init, parameter count."""

from __future__ import annotations

import pytest
import torch

from framework.nn.dit import patchify, unpatchify
from framework.nn.rope import apply_rope
from framework.nn.rope_nd import default_bands, grid_positions, rope_nd
from recipes.video_dit.model import VideoDiT, VideoDiTConfig, count_parameters, train_flops_per_sample
from recipes.video_dit.text_encoder import ByteTextEncoder, encode_bytes


@pytest.mark.parametrize("patch", [(1, 2, 2), (2, 2, 2), (1, 1, 1)])
def test_patchify_round_trip(patch):
    x = torch.randn(2, 3, 4, 6, 8)
    tokens = patchify(x, patch)
    grid = (4 // patch[0], 6 // patch[1], 8 // patch[2])
    assert tokens.shape == (2, grid[0] * grid[1] * grid[2], 3 * patch[0] * patch[1] * patch[2])
    assert torch.equal(unpatchify(tokens, grid, patch, 3), x)


def test_activation_checkpointing_gives_the_same_gradients():
    cfg = VideoDiTConfig(in_channels=4, dim=32, depth=2, heads=4, ffn_hidden=64, text_dim=16)
    grads = []
    for checkpointing in (False, True):
        torch.manual_seed(0)
        cfg.activation_checkpointing = checkpointing
        model = VideoDiT(cfg)
        torch.nn.init.normal_(model.final.proj.weight)  # let gradients reach the blocks
        torch.nn.init.normal_(model.time_proj.weight)
        out = model(torch.randn(2, 4, 3, 8, 8), torch.rand(2), torch.randn(2, 5, 16))
        out.pow(2).mean().backward()
        grads.append([p.grad.clone() for p in model.parameters()])
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b)


def test_rope_bands_rotate_by_their_own_axis():
    head_dim = 24
    bands = default_bands(head_dim)
    assert sum(bands) == head_dim // 2 and bands[1] == bands[2]
    pos = grid_positions(2, 3, 4)
    cos, sin = rope_nd(pos, bands)
    assert cos.shape == (24, head_dim)
    # Moving along h only changes the angles of the h band.
    a = rope_nd(torch.tensor([[1.0, 2.0, 3.0]]), bands)[0]
    b = rope_nd(torch.tensor([[1.0, 5.0, 3.0]]), bands)[0]
    changed = (a != b)[0, : head_dim // 2].nonzero().flatten().tolist()
    assert changed == list(range(bands[0], bands[0] + bands[1]))


def test_rope_3d_scores_depend_only_on_offsets():
    bands = default_bands(16)
    q, k = torch.randn(1, 1, 1, 16), torch.randn(1, 1, 1, 16)

    def score(pq, pk):
        cq, sq = rope_nd(torch.tensor([pq]), bands)
        ck, sk = rope_nd(torch.tensor([pk]), bands)
        return (apply_rope(q, cq, sq) * apply_rope(k, ck, sk)).sum()

    base = score([1.0, 2.0, 3.0], [4.0, 0.0, 1.0])
    torch.testing.assert_close(score([11.0, 7.0, 5.0], [14.0, 5.0, 3.0]), base)
    assert not torch.allclose(score([1.0, 2.0, 3.0], [4.0, 1.0, 1.0]), base)


def test_dit_forward_shapes_and_zero_init():
    torch.manual_seed(0)
    cfg = VideoDiTConfig(in_channels=4, dim=32, depth=2, heads=4, ffn_hidden=64, text_dim=16)
    model = VideoDiT(cfg)
    x = torch.randn(2, 4, 3, 8, 8)
    text, mask = torch.randn(2, 5, 16), torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]]).bool()
    out = model(x, torch.rand(2), text, mask)
    assert out.shape == x.shape
    assert torch.count_nonzero(out) == 0  # zero-initialised output layer: the DiT starts predicting 0
    assert sum(p.numel() for p in model.parameters()) == count_parameters(cfg)
    with pytest.raises(ValueError, match="latent H=7 is not divisible by patch size 2"):
        model(torch.randn(1, 4, 3, 7, 8), torch.rand(1), text[:1])


@pytest.mark.parametrize("overrides", [dict(qk_norm=False), dict(patch=[2, 2, 2], in_channels=16)])
def test_parameter_count_formula(overrides):
    cfg = VideoDiTConfig(dim=48, depth=2, heads=4, ffn_hidden=96, text_dim=24, **overrides)
    assert sum(p.numel() for p in VideoDiT(cfg).parameters()) == count_parameters(cfg)


def test_preset_shapes_have_their_published_sizes():
    wan13 = VideoDiTConfig(dim=1536, depth=30, heads=12, ffn_hidden=8960, text_dim=4096)
    wan14 = VideoDiTConfig(dim=5120, depth=40, heads=40, ffn_hidden=13824, text_dim=4096)
    assert 1.3e9 < count_parameters(wan13) < 1.5e9
    assert 13.5e9 < count_parameters(wan14) < 15e9
    assert train_flops_per_sample(wan13, (21, 60, 104), 512) > 6 * count_parameters(wan13) * 21 * 30 * 52


def test_byte_encoder_masks_padding():
    ids, mask = encode_bytes(["ab", "abcd"], max_len=8)
    assert ids.tolist() == [[98, 99, 0, 0], [98, 99, 100, 101]] and mask.sum().item() == 6
    enc = ByteTextEncoder(dim=16, layers=1, heads=2)
    h, m = enc(["a red circle moves left", "x"])
    assert h.shape[:2] == m.shape and h.shape[-1] == 16
