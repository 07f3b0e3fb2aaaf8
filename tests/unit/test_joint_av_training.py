"""Joint video-audio training pieces: per-modality times, guidance per modality, the joint sampler, mp4 files
with sound, and the ablation: a short training learns audio-video sync with the shared time band and not
without it."""

from __future__ import annotations

import av
import numpy as np
import pytest
import torch

from framework.diffusion import flow
from framework.export.video_io import write_mp4
from framework.recipe import load_run_config
from recipes.video_audio.recipe import TextToVideoAudio, flow_shift, joint_flow_loss
from recipes.video_audio.sampling import JointGuidance, guided_velocity, joint_euler
from recipes.video_audio.sync import beep_onsets, flash_times
from recipes.video_audio.timesteps import joint_times

PRESET = "recipes/video_audio/configs/tiny.yaml"
SMALL = ["model.dim=64", "model.depth=2", "model.heads=2", "model.ffn_hidden=128", "model.text_dim=32",
         "text.layers=1", "text.heads=2"]


def uniform(n: int, g: torch.Generator) -> torch.Tensor:
    return torch.rand(n, generator=g)


def test_times_are_shared_by_default():
    t = joint_times(64, torch.Generator().manual_seed(0), uniform)
    assert torch.equal(t.t_video, t.t_audio) and (t.t_video > 0).all()
    assert t.video_loss.eq(1).all() and t.audio_loss.eq(1).all()


def test_clean_and_independent_rows_follow_their_probabilities():
    n = 20000
    t = joint_times(n, torch.Generator().manual_seed(0), uniform, independent=0.5, clean_video=0.3,
                    clean_audio=0.2)
    video_clean, audio_clean = t.t_video == 0, t.t_audio == 0
    assert not (video_clean & audio_clean).any()
    assert abs(video_clean.float().mean() - 0.3) < 0.015 and abs(audio_clean.float().mean() - 0.2) < 0.015
    assert torch.equal(t.video_loss, (~video_clean).float()) and torch.equal(t.audio_loss, (~audio_clean).float())
    both = ~video_clean & ~audio_clean
    assert abs((t.t_video[both] != t.t_audio[both]).float().mean() - 0.5) < 0.02


def test_probabilities_do_not_reshuffle_the_generator():
    g1, g2 = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
    joint_times(8, g1, uniform)
    joint_times(8, g2, uniform, independent=0.7, clean_video=0.2, clean_audio=0.4)
    assert torch.equal(torch.rand(4, generator=g1), torch.rand(4, generator=g2))


@pytest.mark.parametrize("bad", [{"independent": 1.5}, {"clean_video": -0.1}, {"clean_video": 0.6, "clean_audio": 0.6}])
def test_impossible_probabilities_are_named(bad):
    with pytest.raises(ValueError, match="joint."):
        joint_times(2, torch.Generator(), uniform, **bad)


def _model(*overrides: str) -> tuple[TextToVideoAudio, object]:
    cfg, _ = load_run_config(PRESET, [*SMALL, *overrides], 1)
    torch.manual_seed(0)
    model = TextToVideoAudio(cfg).eval()
    with torch.no_grad():  # wake the zero-initialised gates and heads so every branch matters
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return model, cfg


def _inputs(b: int = 2):
    g = torch.Generator().manual_seed(1)
    return (torch.randn(b, 16, 3, 4, 4, generator=g), torch.randn(b, 8, 9, generator=g), torch.rand(b, generator=g),
            torch.rand(b, generator=g))


def test_guidance_per_modality_combines_the_branches_it_names():
    model, _ = _model()
    v, a, tv, ta = _inputs()
    with torch.no_grad():
        text, mask = model.text_encoder(["a red circle flashes once", "a blue square flashes twice"])
        null, null_mask = model.null_condition(text.shape[1])
        on, off = torch.ones(2, dtype=torch.bool), torch.zeros(2, dtype=torch.bool)
        c = model(v, a, tv, ta, text, mask, on)
        no_text = model(v, a, tv, ta, null.expand_as(text), null_mask.expand_as(mask), on)
        no_bridge = model(v, a, tv, ta, text, mask, off)
        plain = guided_velocity(model, v, a, tv, ta, text, mask, null, null_mask, JointGuidance())
        g = JointGuidance(text=(3.0, 1.5), cross=(1.0, 2.5))
        out = guided_velocity(model, v, a, tv, ta, text, mask, null, null_mask, g)
    for m in range(2):
        torch.testing.assert_close(plain[m], c[m])
        expected = c[m] + (g.text[m] - 1) * (c[m] - no_text[m]) + (g.cross[m] - 1) * (c[m] - no_bridge[m])
        torch.testing.assert_close(out[m], expected, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(no_bridge[1], c[1], atol=1e-4)  # the bridge does change the audio


def test_a_clean_modality_stays_as_given():
    model, _ = _model()
    v, a, _, _ = _inputs()
    with torch.no_grad():
        text, mask = model.text_encoder(["x", "y"])
        null, null_mask = model.null_condition(text.shape[1])
        sigmas = flow.flow_sigmas(3)
        v_out, a_out = joint_euler(model, v, a, sigmas, text, mask, null, null_mask, clean="video")
        assert torch.equal(v_out, v) and not torch.allclose(a_out, a)
        v_out, a_out = joint_euler(model, v, a, sigmas, text, mask, null, null_mask, clean="audio")
        assert torch.equal(a_out, a) and not torch.allclose(v_out, v)
    with pytest.raises(ValueError, match="clean"):
        joint_euler(model, v, a, sigmas, text, mask, null, null_mask, clean="both")


def test_mp4_with_sound_keeps_the_beep_on_its_flash(tmp_path):
    fps, rate = 25, 16000
    frames = np.full((25, 32, 32, 3), 20, np.uint8)
    frames[10:] = 200  # a flash starting on frame 10: 0.4 s
    t = np.arange(rate) / rate
    audio = np.where((t >= 0.4) & (t < 0.5), 0.5 * np.sin(2 * np.pi * 440 * t), 0.0).astype(np.float32)
    path = write_mp4(frames, tmp_path / "clip.mp4", fps, audio=audio, audio_rate=rate)
    with av.open(str(path)) as c:
        video = np.stack([f.to_ndarray(format="rgb24") for f in c.decode(video=0)])
    with av.open(str(path)) as c:
        assert c.streams.audio[0].rate == rate
        sound = np.concatenate([f.to_ndarray()[0] for f in c.decode(audio=0)])
    assert flash_times(video, fps) == [0.4]
    (onset,) = beep_onsets(sound, rate)
    assert abs(onset - 0.4) < 0.001


# ---- the ablation ---------------------------------------------------------------------------------------
def _events(b: int, g: torch.Generator):
    """Latent-space flash + beep clips: video latent group k (frames 4k-3..4k at 25 fps) lights channel 0 and
    says which of its 4 frames flashed in channel 1; the audio latents (25 per second, one per frame) beep in
    channel 0 from that frame on, for 3 latents. Returns video, audio, audio mask and the flash frames."""
    k = torch.randint(1, 13, (b,), generator=g)
    sub = torch.randint(0, 4, (b,), generator=g)
    frame = 4 * k - 3 + sub
    video, audio = torch.zeros(b, 16, 13, 4, 4), torch.zeros(b, 8, 49)
    for i in range(b):
        video[i, 0, k[i]] = 2.0
        video[i, 1, k[i]] = sub[i] - 1.5
        audio[i, 0, frame[i]:frame[i] + 3] = 2.0
    return video, audio, torch.ones(b, 49, dtype=torch.bool), frame


def _video_to_audio_offsets_ms(shared: bool, steps: int = 300) -> torch.Tensor:
    """Train a small joint model on _events, then generate audio from held-out videos: |onset error| in ms."""
    # The causal 4x-in-time VAE's layout (latent k = frames 4k-3..4k), as in the big presets.
    cfg, _ = load_run_config(PRESET, [*SMALL, "model.temporal_compression=4", "model.video_patch=[1,2,2]",
                                      f"model.shared_time_rope={str(shared).lower()}", "joint.clean_video=0.5",
                                      "joint.clean_audio=0", "joint.independent=0", "joint.modality_dropout=0",
                                      "diffusion.caption_dropout=0"], 1)
    torch.manual_seed(0)
    model = TextToVideoAudio(cfg)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    g = torch.Generator().manual_seed(0)
    for _ in range(steps):
        video, audio, mask, _ = _events(16, g)
        text, text_mask = model.text_encoder(["a flash and a beep"] * 16)
        loss, _ = joint_flow_loss(cfg, model, video, audio, mask, text, text_mask, g)
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    video, audio, _, frame = _events(32, torch.Generator().manual_seed(123))
    with torch.no_grad():
        text, text_mask = model.text_encoder(["a flash and a beep"] * 32)
        null, null_mask = model.null_condition(text.shape[1])
        noise = torch.randn(audio.shape, generator=torch.Generator().manual_seed(1))
        _, generated = joint_euler(model, video, noise, flow.flow_sigmas(10, flow_shift(cfg, 52)), text, text_mask,
                                   null, null_mask, clean="video")
    onset = (generated[:, 0] > 1.0).float().argmax(1)  # first latent of the generated beep
    return (onset - frame).abs().float() * 40.0  # one audio latent = 40 ms


@pytest.mark.slow
def test_shared_time_band_learns_sync_that_the_ablation_does_not():
    with_band, without = _video_to_audio_offsets_ms(True), _video_to_audio_offsets_ms(False)
    # Measured (300 steps, 32 clips): with the band every beep lands on its frame (median 0 ms); without it
    # the median error is hundreds of ms (the audio tower cannot tell where in time its tokens are).
    assert with_band.median() <= 40.0 and (with_band <= 40.0).float().mean() >= 0.8
    assert without.median() >= 120.0 and (without <= 40.0).float().mean() <= 0.4
