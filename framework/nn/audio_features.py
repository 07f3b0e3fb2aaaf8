"""Log-mel features of a waveform and their inversion by Griffin-Lim: pure functions of torch.stft/istft, so
no audio library (torchaudio, librosa) is needed and the features are the same on every device.

Conventions (chosen for audio at a video's clock): a clip of S samples gives exactly S // hop frames, frame i
centred on sample i * hop, so 16 kHz audio with hop 160 is 100 frames per second and a 2 s window is 200
frames; the mel scale is HTK's (2595 log10(1 + f / 700)); filters are triangles of peak 1 (they sum to 1
across the band, so a tone keeps its magnitude); features are the natural log of the mel magnitude,
floored at `floor` (1e-5: -100 dB).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

LOG_FLOOR = 1e-5
DB_PER_NEPER = 20.0 / math.log(10.0)  # a log-magnitude error of 1 is 8.69 dB


def hz_to_mel(f: Tensor | float) -> Tensor:
    return 2595.0 * torch.log10(1.0 + torch.as_tensor(f, dtype=torch.float64) / 700.0)


def mel_to_hz(m: Tensor) -> Tensor:
    return 700.0 * (10.0 ** (m / 2595.0) - 1.0)


def mel_filterbank(n_fft: int, n_mels: int, rate: int, fmin: float = 0.0, fmax: float | None = None) -> Tensor:
    """Triangular mel filters (n_mels, n_fft // 2 + 1), float32: filter m rises from centre m - 1 to 1 at its
    centre m and falls to 0 at centre m + 1, centres evenly spaced in mel between fmin and fmax.

    Raises ValueError when a filter would catch no FFT bin (too many mels for n_fft): its band would be lost.
    """
    fmax = rate / 2 if fmax is None else fmax
    if not 0 <= fmin < fmax <= rate / 2 or n_mels < 1 or n_fft < 2:
        raise ValueError(f"need 0 <= fmin < fmax <= rate / 2, n_mels >= 1, n_fft >= 2; got fmin={fmin} "
                         f"fmax={fmax} rate={rate} n_mels={n_mels} n_fft={n_fft}")
    bins = torch.linspace(0, rate / 2, n_fft // 2 + 1, dtype=torch.float64)
    centres = mel_to_hz(torch.linspace(float(hz_to_mel(fmin)), float(hz_to_mel(fmax)), n_mels + 2,
                                       dtype=torch.float64))
    lo, mid, hi = centres[:-2, None], centres[1:-1, None], centres[2:, None]
    rise = (bins - lo) / (mid - lo)
    fall = (hi - bins) / (hi - mid)
    fb = torch.minimum(rise, fall).clamp_min(0.0)
    empty = (fb.sum(1) == 0).nonzero().flatten().tolist()
    if empty:
        raise ValueError(f"mel filters {empty} catch no FFT bin: with n_fft={n_fft} at {rate} Hz use fewer than "
                         f"{n_mels} mels, a larger n_fft or a higher fmin")
    return fb.float()


def _window(win_length: int, device: torch.device) -> Tensor:
    return torch.hann_window(win_length, periodic=True, device=device)


def stft_magnitude(wave: Tensor, n_fft: int, hop: int, win_length: int | None = None) -> Tensor:
    """|STFT| (B, n_fft // 2 + 1, S // hop) of wave (B, S): centred frames, reflect padding."""
    win_length = win_length or n_fft
    spec = torch.stft(wave.float(), n_fft, hop, win_length, _window(win_length, wave.device), center=True,
                      pad_mode="reflect", return_complex=True)
    return spec.abs()[..., : wave.shape[-1] // hop]


def log_mel(wave: Tensor, rate: int, n_fft: int = 1024, hop: int = 160, n_mels: int = 64,
            win_length: int | None = None, fmin: float = 0.0, fmax: float | None = None,
            floor: float = LOG_FLOOR) -> Tensor:
    """Log-mel magnitude (B, n_mels, S // hop) of wave (B, S) (or (S,) -> (n_mels, S // hop))."""
    single = wave.dim() == 1
    mag = stft_magnitude(wave[None] if single else wave, n_fft, hop, win_length)
    fb = mel_filterbank(n_fft, n_mels, rate, fmin, fmax).to(mag.device)
    out = torch.log(torch.einsum("mf,bft->bmt", fb, mag).clamp_min(floor))
    return out[0] if single else out


def mel_to_linear(mel: Tensor, fb: Tensor) -> Tensor:
    """Least-squares linear magnitude (B, F, T) of a mel magnitude (B, n_mels, T): the filterbank's
    pseudo-inverse, clamped at 0 (a magnitude is never negative)."""
    return torch.einsum("fm,bmt->bft", torch.linalg.pinv(fb.double()).float().to(mel.device), mel).clamp_min(0.0)


def griffin_lim(logmel: Tensor, rate: int, n_fft: int = 1024, hop: int = 160, win_length: int | None = None,
                fmin: float = 0.0, fmax: float | None = None, iters: int = 32, momentum: float = 0.99,
                gen: torch.Generator | None = None) -> Tensor:
    """A waveform (B, T * hop) whose log-mel approximates logmel (B, n_mels, T).

    The magnitude comes from the filterbank's pseudo-inverse; the phase from `iters` rounds of fast
    Griffin-Lim (Perraudin et al. 2013: momentum 0.99), starting from random phases drawn from `gen`. Good
    enough to hear pitch and timing, not to ship: a trained vocoder sounds far better.
    """
    win_length = win_length or n_fft
    single = logmel.dim() == 2
    logmel = logmel[None] if single else logmel
    frames = logmel.shape[-1]
    fb = mel_filterbank(n_fft, logmel.shape[1], rate, fmin, fmax)
    mag = mel_to_linear(logmel.float().exp(), fb)
    # One more frame, a copy of the last, so overlap-add covers the end of the frames * hop samples.
    mag = torch.cat([mag, mag[..., -1:]], dim=-1)
    window, length = _window(win_length, mag.device), frames * hop
    noise = torch.rand(mag.shape, generator=gen, device="cpu").to(mag.device)
    angles = torch.polar(torch.ones_like(mag), 2 * math.pi * noise)
    previous = torch.zeros_like(angles)
    for _ in range(iters):
        wave = torch.istft(mag * angles, n_fft, hop, win_length, window, center=True, length=length)
        rebuilt = torch.stft(wave, n_fft, hop, win_length, window, center=True, pad_mode="reflect",
                             return_complex=True)[..., : mag.shape[-1]]
        angles = rebuilt - (momentum / (1 + momentum)) * previous
        angles = angles / angles.abs().clamp_min(1e-8)
        previous = rebuilt
    wave = torch.istft(mag * angles, n_fft, hop, win_length, window, center=True, length=length)
    return wave[0] if single else wave
