"""Joint video-audio DiT: token times in seconds, shared time-band RoPE invariants, towers independent at init."""

from __future__ import annotations

import pytest
import torch

from framework.nn.rope_nd import default_bands
from recipes.video_audio.model import JointAVConfig, JointAVDiT
from recipes.video_audio.time_rope import audio_positions, cross_modal_scores, rope_tables, video_positions
from recipes.video_audio.token_times import audio_token_times, video_token_times


def _cfg(**kw) -> JointAVConfig:
    return JointAVConfig(video_channels=4, audio_channels=4, dim=32, depth=2, heads=4, ffn_hidden=64, text_dim=16,
                         **kw)


def _inputs(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(2, 4, 3, 4, 4, generator=g), torch.randn(2, 4, 12, generator=g), torch.rand(2, generator=g),
            torch.rand(2, generator=g), torch.randn(2, 5, 16, generator=g))


def _wake(model: JointAVDiT, bridge: bool) -> None:
    """Randomise the zero-initialised layers (adaLN, heads; the cross-modal outputs only when `bridge`)."""
    torch.manual_seed(1)
    for name, p in model.named_parameters():
        if p.abs().sum() == 0 and (bridge or "_to_" not in name):
            torch.nn.init.normal_(p, std=0.2)


def test_video_token_times_are_causal_vae_midpoints():
    # Latent 0 = frame 0 ([0, 0.04) s), latent k = frames 4k-3..4k ([(4k-3)/25, (4k+1)/25) s).
    torch.testing.assert_close(video_token_times(4, fps=25), torch.tensor([0.02, 0.12, 0.28, 0.44]))
    torch.testing.assert_close(video_token_times(3, fps=25, t0=1.5), torch.tensor([1.52, 1.62, 1.78]))
    k = torch.arange(1, 6, dtype=torch.float32)
    torch.testing.assert_close(video_token_times(6, fps=24)[1:], (4 * k - 1) / 24)
    # patch_t=2: latents {0, 1} cover [0, 5/25) s, latents {2, 3} cover [5/25, 13/25) s.
    torch.testing.assert_close(video_token_times(4, fps=25, patch_t=2), torch.tensor([0.1, 0.36]))
    # Without temporal compression every latent is one frame.
    torch.testing.assert_close(video_token_times(3, fps=10, temporal_compression=1), torch.tensor([0.05, 0.15, 0.25]))
    with pytest.raises(ValueError):
        video_token_times(3, fps=25, patch_t=2)


def test_audio_token_times_are_interval_midpoints():
    torch.testing.assert_close(audio_token_times(4), torch.tensor([0.02, 0.06, 0.10, 0.14]))
    torch.testing.assert_close(audio_token_times(4, patch=2), torch.tensor([0.04, 0.12]))
    torch.testing.assert_close(audio_token_times(2, latent_rate=50.0, t0=-0.5), torch.tensor([-0.49, -0.47]))
    with pytest.raises(ValueError):
        audio_token_times(5, patch=2)


def _random_scores(shift_q: float, shift_k: float, shared: bool) -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    q, k = torch.randn(2, 3, 5, 16, generator=g), torch.randn(2, 3, 12, 16, generator=g)
    q_times, k_times = video_token_times(5, fps=25), audio_token_times(12)
    return cross_modal_scores(q, k, q_times + shift_q, k_times + shift_k, positions_per_second=25.0, shared_time_rope=shared)


@pytest.mark.parametrize("shared", [True, False])
def test_cross_modal_scores_ignore_a_common_time_shift(shared):
    torch.testing.assert_close(_random_scores(1.37, 1.37, shared), _random_scores(0.0, 0.0, shared),
                               atol=1e-4, rtol=1e-4)


def test_cross_modal_scores_see_a_relative_shift_only_with_the_shared_band():
    assert not torch.allclose(_random_scores(0.0, 0.08, True), _random_scores(0.0, 0.0, True), atol=1e-3)
    # The ablation has no notion of time in cross-modal attention at all.
    torch.testing.assert_close(_random_scores(0.0, 0.08, False), _random_scores(0.0, 0.0, False))


def test_audio_rotates_the_video_time_band_and_nothing_else():
    head_dim, n_t = 16, default_bands(16)[0]
    times = torch.tensor([0.02, 0.12, 0.28])
    cos_v, sin_v = rope_tables(video_positions(times, (3, 2, 2), 25.0), head_dim)
    cos_a, sin_a = rope_tables(audio_positions(times, 25.0), head_dim)
    t_cols = list(range(n_t)) + list(range(head_dim // 2, head_dim // 2 + n_t))
    rest = [c for c in range(head_dim) if c not in t_cols]
    torch.testing.assert_close(cos_v[::4, t_cols], cos_a[:, t_cols])  # same time -> same t-band rotation
    torch.testing.assert_close(sin_v[::4, t_cols], sin_a[:, t_cols])
    assert torch.equal(cos_a[:, rest], torch.ones(3, len(rest))) and torch.equal(sin_a[:, rest], torch.zeros(3, len(rest)))


def test_forward_shapes():
    model = JointAVDiT(_cfg())
    video, audio, tv, ta, text = _inputs()
    out_v, out_a = model(video, audio, tv, ta, text, text_mask=torch.ones(2, 5, dtype=torch.bool))
    assert out_v.shape == video.shape and out_a.shape == audio.shape


def test_gradients_reach_both_towers_and_cross_the_bridge():
    model = JointAVDiT(_cfg())
    _wake(model, bridge=True)
    video, audio, tv, ta, text = _inputs()
    out_v, out_a = model(video, audio, tv, ta, text)
    (out_v.pow(2).mean() + out_a.pow(2).mean()).backward()
    silent = [n for n, p in model.named_parameters() if p.grad is None or p.grad.abs().sum() == 0]
    assert not silent, silent
    # A video-only loss reaches the audio tower through cross-modal attention.
    model.zero_grad()
    model(video, audio, tv, ta, text)[0].pow(2).mean().backward()
    assert model.audio.patch_embed.weight.grad.abs().sum() > 0


def _video_tower_alone(model: JointAVDiT, video, tv, text) -> torch.Tensor:
    """The video tower as a plain `DiTBlock` stack, never touching audio."""
    cfg = model.cfg
    tokens, grid = model.video.embed(video)
    c, time6 = model.video.condition(tv)
    vt = model.token_times(video.shape[2], 1)[0]
    rope = rope_tables(video_positions(vt, grid, cfg.rope_positions_per_second), cfg.head_dim, cfg.rope_theta)
    context = model.video.text_proj(text)
    for block in model.blocks:
        tokens = block.video(tokens, time6, rope, context)
    return model.video.head(tokens, c, grid)


def test_zero_cross_gates_make_independent_towers_at_init():
    model = JointAVDiT(_cfg())
    _wake(model, bridge=False)
    video, audio, tv, ta, text = _inputs()
    out_v, out_a = model(video, audio, tv, ta, text)
    torch.testing.assert_close(out_v, _video_tower_alone(model, video, tv, text))
    other_v, other_a = model(video, torch.randn_like(audio), tv, torch.rand(2), text, audio_t0=0.3)
    torch.testing.assert_close(other_v, out_v)  # audio's content, timestep and clock do not reach video
    other_v, other_a = model(torch.randn_like(video), audio, torch.rand(2), ta, text)
    torch.testing.assert_close(other_a, out_a)
    # Once the bridge has weights the towers do see each other (so the checks above can fail).
    _wake(model, bridge=True)
    out_v, _ = model(video, audio, tv, ta, text)
    assert not torch.allclose(model(video, torch.randn_like(audio), tv, ta, text)[0], out_v, atol=1e-4)


@pytest.mark.parametrize("shared", [True, False])
def test_whole_model_depends_on_relative_time_only(shared):
    model = JointAVDiT(_cfg(shared_time_rope=shared))
    _wake(model, bridge=True)
    args = _inputs()
    base = model(*args)
    shifted = model(*args, video_t0=2.0, audio_t0=2.0)
    for a, b in zip(base, shifted):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)
    offset = model(*args, audio_t0=0.1)[0]  # audio 100 ms late: video now sees it at other relative times
    assert torch.allclose(offset, base[0], atol=1e-4) != shared


def test_activation_checkpointing_gives_the_same_gradients():
    grads = []
    for checkpointing in (False, True):
        torch.manual_seed(0)  # the same initial weights in both runs
        model = JointAVDiT(_cfg(activation_checkpointing=checkpointing))
        _wake(model, bridge=True)
        out_v, out_a = model(*_inputs())
        (out_v.pow(2).mean() + out_a.pow(2).mean()).backward()
        grads.append([p.grad.clone() for p in model.parameters()])
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b)
