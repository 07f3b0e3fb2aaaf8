"""Audio-video sync, measured analytically: flash onsets in a video against beep onsets in its audio.

Conventions (data/make_flash_beep_dataset.py follows them):
- A flash is read off the first frame that shows it, and is timed at that frame's *start* t0 + k / fps (the
  frame is on screen during [k / fps, (k + 1) / fps)), so flash times are quantised to the frame grid.
- A beep is timed at the start (foot) of its attack, read off the audio's amplitude envelope to well under
  1 ms (the generator's AAC files: 0.2-0.4 ms).
- offset = beep onset - flash time, in ms: positive when the sound lags the picture. A beep that starts at
  the flash frame's start time is offset 0; at 25 fps a beep one frame late is +40 ms.
Everything here is plain numpy on decoded arrays, so it scores generated samples and files alike.
"""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np

from framework.data.video_decode import as_rgb255

# |offset| counted as in sync: one frame at 25 fps, and inside ITU-R BT.1359's detectability window (sound
# up to 45 ms early or 125 ms late goes unnoticed).
TOLERANCE_MS = 40.0

# flash_times: a frame flashes when its pixels brighten by at least this much on average over the previous
# frame (0-255 levels of max(R, G, B)) and by a good part of the clip's largest jump. Measured on 72 decoded
# clips of the dataset: flash frames rise 7.3-20, every other frame (fades, H.264 noise) at most 1.2.
MIN_RISE, REL_RISE = 2.0, 0.3
# beep_onsets: the envelope must clear the noise floor (its median) SNR times and an absolute floor
# (-60 dBFS); a beep counts when its envelope passes REL_LEVEL of the loudest one, and a new beep needs
# MIN_SILENCE below that level first (AAC ripple and tremolo never split a beep into two).
SNR, MIN_LEVEL, REL_LEVEL, MIN_SILENCE = 4.0, 1e-3, 0.2, 0.05
# The onset is the foot of the attack: the line through the envelope where it passes LOW and HIGH of the
# beep's peak (above the floor), extrapolated down to the floor. See _foot.
LOW, HIGH = 0.2, 0.6
MAX_RISE = 0.01  # seconds: the LOW point is looked for at most this far before the HIGH one
SMOOTH = 0.0005  # seconds: centred moving average on the envelope (a linear ramp passes unchanged)


def brightness_rise(video: np.ndarray, value_range: tuple[float, float] | None = None) -> np.ndarray:
    """(T,) mean brightening of each frame over the previous one (0 for frame 0), in 0-255 levels.

    Brightness is max(R, G, B), not luma: a saturated blue flash barely moves luma (0.11 B) but moves this as
    much as a yellow one. Only increases count, so a flash that fades over several frames rises once.
    """
    value = as_rgb255(video, value_range).max(axis=-1)  # (T, H, W)
    rise = np.zeros(len(value), dtype=np.float64)
    if len(value) > 1:
        rise[1:] = np.maximum(np.diff(value, axis=0), 0.0).mean(axis=(1, 2))
    return rise


def flash_times(video: np.ndarray, fps: float, t0: float = 0.0,
                value_range: tuple[float, float] | None = None) -> list[float]:
    """Start times (seconds, t0 + k / fps) of the frames k where a flash begins, in video (T, H, W, 3).

    A flash frame brightens by at least MIN_RISE levels and REL_RISE of the clip's largest rise, and more than
    its neighbours (a flash spread over two frames counts once, at its bigger step). Frame 0 has no previous
    frame, so a flash there is never seen. value_range: what black and white are, default (0, 255) for
    integer videos and (0, 1) for floats. t0 is the time of frame 0, e.g. a clip's start in its source.
    """
    if fps <= 0:
        raise ValueError(f"fps must be positive, got {fps}")
    rise = brightness_rise(video, value_range)
    if len(rise) < 2:
        return []
    level = max(MIN_RISE, REL_RISE * float(rise.max()))
    before = np.concatenate([[0.0], rise[:-1]])
    after = np.concatenate([rise[1:], [0.0]])
    frames = np.flatnonzero((rise >= level) & (rise >= before) & (rise > after))
    return [t0 + float(k) / fps for k in frames]


def envelope(audio: np.ndarray, rate: float) -> np.ndarray:
    """Amplitude envelope (N,) of a mono signal: |analytic signal| (FFT Hilbert), smoothed over SMOOTH.

    For a tone of amplitude a the envelope is a flat a (no ripple at the tone's period, unlike a windowed
    RMS), so an attack ramp is seen at sample resolution at any pitch.
    """
    x = np.asarray(audio, dtype=np.float64)
    n = len(x)
    size = 1 << max(1, int(2 * n - 1).bit_length())  # zero padding >= n: no wrap-around between the ends
    spectrum = np.fft.rfft(x, size)
    spectrum[1:-1] *= 2.0  # one-sided spectrum of the analytic signal (DC and Nyquist once)
    analytic = np.fft.ifft(np.concatenate([spectrum, np.zeros(size - len(spectrum))]))[:n]
    env = np.abs(analytic)
    width = max(1, int(round(SMOOTH * rate))) | 1  # odd: centred, no delay
    if width > 1 and n >= width:
        env = np.convolve(np.pad(env, width // 2, mode="edge"), np.ones(width) / width, mode="valid")
    return env


def _foot(env: np.ndarray, lo: int, hi: int, rate: float, noise: float) -> float:
    """Onset (fractional sample index) of the beep whose loud stretch is env[lo:hi].

    HIGH point: the first sample at HIGH of the stretch's peak; LOW point: walking back from it while the
    envelope keeps falling, where it passes LOW (or where it stops falling: AAC pre-echo can sit above LOW
    just before the attack), at most MAX_RISE back. The line through both points meets the floor at the
    onset: for a linear attack that is its exact start, for the generator's 2 ms raised-cosine attack 0.16 of
    it (0.3 ms) late. A single threshold would instead move with the attack time, and a low one would fire
    on the pre-echo that AAC's long windows spread up to 64 ms ahead of a loud onset (measured: up to 40% of
    the beep's level at 48 kbit/s).
    """
    top = float(env[lo:hi].max()) - noise
    high_level, low_level = noise + HIGH * top, noise + LOW * top
    i = lo + int(np.argmax(env[lo:hi] >= high_level))
    if i > 0 and env[i - 1] < high_level:  # sub-sample crossing of the HIGH level
        t_high = i - 1 + (high_level - env[i - 1]) / (env[i] - env[i - 1])
    else:
        t_high = float(i)
    j, stop = i, max(1, i - int(round(MAX_RISE * rate)))
    while j > stop and low_level <= env[j - 1] <= env[j]:
        j -= 1
    if j > 0 and env[j - 1] < low_level <= env[j]:
        t_low, e_low = j - 1 + (low_level - env[j - 1]) / (env[j] - env[j - 1]), low_level
    else:
        t_low, e_low = float(j), float(env[j])
    if high_level <= e_low or t_high <= t_low:  # no rise to speak of (a beep already sounding at the start)
        return t_low
    return t_low - (t_high - t_low) * (e_low - noise) / (high_level - e_low)


def beep_onsets(audio: np.ndarray, rate: float, t0: float = 0.0) -> list[float]:
    """Onset times (seconds, t0 + sample / rate) of the beeps in mono audio (N,) float, sorted.

    A beep is a stretch where the envelope passes REL_LEVEL of the loudest one (quieter sounds are not
    beeps); stretches less than MIN_SILENCE apart are one beep, timed by _foot. The floor is the envelope's
    median, so steady low noise neither triggers onsets nor moves them much (white noise at -40 dBFS, 32 dB
    under the beeps: ~0.1 ms late); silence or noise alone gives []. A linear attack's foot is found to a few
    microseconds; the generator's files read back 0.2-0.4 ms late (its attack's shape, then AAC).
    """
    x = np.asarray(audio, dtype=np.float64)
    if x.ndim != 1:
        raise ValueError(f"audio must be mono (N,), got shape {x.shape}")
    if rate <= 0:
        raise ValueError(f"rate must be positive, got {rate}")
    if len(x) < 2:
        return []
    env = envelope(x, rate)
    noise, peak = float(np.median(env)), float(env.max())
    if peak < max(MIN_LEVEL, SNR * noise):
        return []
    active = np.concatenate([[False], env >= noise + REL_LEVEL * (peak - noise), [False]])
    edges = np.flatnonzero(active[1:] != active[:-1])  # stretch k is env[edges[2k]:edges[2k + 1]]
    starts, ends = edges[0::2], edges[1::2]
    gap = max(1, int(round(MIN_SILENCE * rate)))
    beeps = [[int(starts[0]), int(ends[0])]]
    for lo, hi in zip(starts[1:].tolist(), ends[1:].tolist()):
        if lo - beeps[-1][1] < gap:
            beeps[-1][1] = hi  # too short a pause: the same beep
        else:
            beeps.append([lo, hi])
    return [t0 + _foot(env, lo, hi, rate, noise) / rate for lo, hi in beeps]


def match_events(flashes: Iterable[float], onsets: Iterable[float], max_gap: float = 0.25) -> list[float]:
    """Offsets (ms, onset - flash) of flash/beep pairs, one-to-one, ordered by flash time.

    Pairs are taken nearest first among those at most max_gap seconds apart, so each flash keeps its own
    beep even when offsets are large; the rest are unmatched (len(flashes) + len(onsets) - 2 * len(result)).
    """
    flashes, onsets = sorted(float(f) for f in flashes), sorted(float(o) for o in onsets)
    candidates = sorted((abs(o - f), i, j) for i, f in enumerate(flashes) for j, o in enumerate(onsets)
                        if abs(o - f) <= max_gap)
    used_f, used_o, pairs = set(), set(), []
    for _, i, j in candidates:
        if i not in used_f and j not in used_o:
            used_f.add(i)
            used_o.add(j)
            pairs.append((flashes[i], onsets[j]))
    return [1000.0 * (o - f) for f, o in sorted(pairs)]


def sync_report(pairs: Iterable[tuple[np.ndarray, np.ndarray]], fps: float, rate: float,
                max_gap: float = 0.25) -> dict[str, float]:
    """Sync of (video (T, H, W, 3), audio (N,)) clips that start together, with fps and audio rate shared.

    Returns median_offset_ms (signed: + means audio late), median_abs_offset_ms (NaN when nothing matched),
    within_40ms (pairs with |offset| <= 40 ms over all events, unmatched flashes and beeps counting as
    failures: a model that drops or invents beeps cannot score 1), events (matched pairs), unmatched, clips.
    """
    offsets: list[float] = []
    unmatched = clips = 0
    for video, audio in pairs:
        flashes, onsets = flash_times(video, fps), beep_onsets(audio, rate)
        matched = match_events(flashes, onsets, max_gap)
        offsets += matched
        unmatched += len(flashes) + len(onsets) - 2 * len(matched)
        clips += 1
    if clips == 0:
        raise ValueError("sync_report needs at least one (video, audio) pair")
    off = np.asarray(offsets, dtype=np.float64)
    total = len(off) + unmatched
    return {"median_offset_ms": float(np.median(off)) if len(off) else float("nan"),
            "median_abs_offset_ms": float(np.median(np.abs(off))) if len(off) else float("nan"),
            "within_40ms": float(np.sum(np.abs(off) <= TOLERANCE_MS)) / total if total else 0.0,
            "events": len(off), "unmatched": unmatched, "clips": clips}
