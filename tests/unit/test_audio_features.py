"""Log-mel features and Griffin-Lim (framework/nn/audio_features.py), and the audio VAE's shapes: tones must
land on their mel bin and come back at their pitch."""

import math

import pytest
import torch

from framework.nn.audio_features import griffin_lim, hz_to_mel, log_mel, mel_filterbank, mel_to_hz
from recipes.audio_vae.model import AudioVAE, AudioVAEConfig

RATE, N_FFT, HOP, MELS = 16000, 1024, 160, 64


def tone(freq: float, seconds: float = 1.0, amplitude: float = 0.5) -> torch.Tensor:
    t = torch.arange(round(seconds * RATE), dtype=torch.float64) / RATE
    return (amplitude * torch.sin(2 * math.pi * freq * t)).float()


def centres() -> torch.Tensor:
    """Centre frequency (Hz) of each of the MELS filters."""
    return mel_to_hz(torch.linspace(0.0, float(hz_to_mel(RATE / 2)), MELS + 2, dtype=torch.float64))[1:-1]


def test_filterbank_shape_peaks_and_partition_of_unity():
    fb = mel_filterbank(N_FFT, MELS, RATE)
    assert fb.shape == (MELS, N_FFT // 2 + 1) and fb.dtype == torch.float32
    assert fb.min() >= 0 and fb.max() <= 1  # peak 1 at the centre; narrow low filters may miss it by half a bin
    assert (fb.max(1).values > 0.5).all()
    bins = torch.linspace(0, RATE / 2, N_FFT // 2 + 1)
    c = centres()
    inside = (bins >= c[0]) & (bins <= c[-1])  # between the first and last centre the triangles sum to 1
    assert torch.allclose(fb.sum(0)[inside], torch.ones(int(inside.sum())), atol=1e-5)


def test_filterbank_refuses_empty_filters_and_bad_bands():
    with pytest.raises(ValueError, match="catch no FFT bin"):
        mel_filterbank(64, 128, RATE)
    with pytest.raises(ValueError, match="fmin < fmax"):
        mel_filterbank(N_FFT, MELS, RATE, fmin=4000, fmax=2000)


@pytest.mark.parametrize("freq", [440.0, 1100.0, 3000.0])
def test_log_mel_of_a_tone_peaks_at_its_bin(freq):
    mel = log_mel(tone(freq)[None].repeat(2, 1), RATE, N_FFT, HOP, MELS)
    assert mel.shape == (2, MELS, RATE // HOP)  # S // hop frames: 100 per second
    nearest = int((centres() - freq).abs().argmin())
    assert int(mel[0, :, 50].argmax()) == nearest
    assert torch.equal(log_mel(tone(freq), RATE, N_FFT, HOP, MELS), mel[0])  # 1-D input: same features


@pytest.mark.parametrize("freq", [440.0, 880.0])
def test_griffin_lim_recovers_the_pitch(freq):
    mel = log_mel(tone(freq), RATE, N_FFT, HOP, MELS, win_length=400)
    wave = griffin_lim(mel, RATE, N_FFT, HOP, win_length=400, iters=16, gen=torch.Generator().manual_seed(0))
    assert wave.shape == (RATE,)
    spectrum = torch.fft.rfft(wave * torch.hann_window(wave.numel())).abs()
    assert abs(float(spectrum.argmax()) * RATE / wave.numel() - freq) <= RATE / N_FFT  # within one FFT bin


def test_vae_gives_25_latent_frames_per_second():
    cfg = AudioVAEConfig(base_channels=16, latent_channels=8)
    vae = AudioVAE(cfg, MELS)
    mel = log_mel(torch.randn(2, 2 * RATE) * 0.1, RATE, N_FFT, HOP, MELS)  # 2 s: 200 mel frames
    recon, mean, logvar = vae(mel, gen=torch.Generator().manual_seed(0))
    assert mean.shape == logvar.shape == (2, 8, 50) and recon.shape == mel.shape
    assert cfg.time_down == 4
    with pytest.raises(ValueError, match="multiple of 4"):
        vae.encode(mel[..., :198])
