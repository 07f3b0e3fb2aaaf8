"""Generate the embedded default video + audio dataset: a coloured shape flashes 1-3 times and a beep starts
at each flash, pitched by the colour, as H.264 + AAC mp4 shards (train/ and val/) captioned "a red circle
flashes twice". The beeps start exactly at the flash frames' start times, so a model's audio-video sync can
be read off its samples (recipes/video_audio/sync.py); --audio-offset-ms writes deliberately shifted files.

Timing of the written files (PyAV 18 / FFmpeg 8, checked by tests/unit/test_flash_beep.py): AAC encoders
prepend 1024 samples of priming delay. The mp4 muxer records them in an edit list, so the demuxer gives the
first audio packet pts -1024 and the decoder drops those samples: decoded audio (PyAV and decord alike)
starts at pts 0 = video pts 0, and the beeps read back where they were written, within 0.5 ms. A reader
that decodes packets without the decoder's skip (or a container without an edit list) would see audio
1024 samples (64 ms at 16 kHz) late. The last AAC frame is padded to 1024 samples: decoding gives up to
1023 samples of near-silence after the audio stream's duration, which is the clip's (cut there).
"""

from __future__ import annotations

import argparse
import io
import itertools
import math
import os
from fractions import Fraction
from pathlib import Path

import av
import numpy as np
from generated_split import write_generated_split
from make_shapes_dataset import COLOURS, SHAPES, _coverage
from video_shards import Sample

# 440-1100 Hz in steps of 220 Hz: far apart for a model and an FFT alike. The palette is the shapes dataset's.
PITCHES = {"red": 440.0, "green": 660.0, "blue": 880.0, "yellow": 1100.0}
COUNTS = {1: "once", 2: "twice", 3: "three times"}
LABELS = list(itertools.product(COLOURS, SHAPES, COUNTS))  # all 36 (colour, shape, number of flashes)
SPLITS = {"train": 0, "val": 1}  # the seed stream of each split

# Video: between flashes the shape glows at DIM of its colour; a flash shows it at full colour on its first
# frame and fades with time constant FADE (at 25 fps: 1, 0.67, 0.45, 0.30 ...): its onset is one sharp
# frame, and a loader sampling only 8 fps still sees every flash at >= 30% (timed to its own frames then).
DIM, FADE = 0.2, 0.1
# Audio: a sine beep of AMPLITUDE, raised-cosine ATTACK and RELEASE, BEEP seconds long in all, over white
# noise at -54 dBFS (so onset detection never sees digital silence). A 2 ms attack is under one period of
# the lowest pitch: the onset reads back to ~0.3 ms (sync.beep_onsets), where 4 ms gave ~0.5-1 ms.
AMPLITUDE, ATTACK, RELEASE, BEEP, NOISE = 0.5, 0.002, 0.04, 0.12, 0.002
# AAC-LC, 16 kHz mono. At 32 and 48 kbit/s FFmpeg's encoder smears pre-echo up to 64 ms ahead of some
# onsets (measured: up to 17% and 40% of the beep's level); at 64 kbit/s it stays under 5%.
AUDIO_BITRATE = 64000
# Flashes are at least MIN_SPACING apart (two max-gap windows of the sync metric: pairs stay unambiguous);
# none in the first or last MAX_OFFSET (plus the beep), so a beep shifted by up to MAX_OFFSET stays whole.
MIN_SPACING, MAX_OFFSET = 0.5, 0.2


def captions(colour: str, shape: str, count: int) -> list[str]:
    """The template caption first, then a paraphrase (so the multi-caption path is exercised)."""
    return [f"a {colour} {shape} flashes {COUNTS[count]}",
            f"a {colour} {shape} lights up {COUNTS[count]} on a dark background, beeping each time"]


def flash_frames(count: int, fps: float, frames: int, rng: np.random.Generator) -> list[int]:
    """count distinct frames, sorted, at least MIN_SPACING apart and MAX_OFFSET (+ BEEP) from the ends."""
    first = max(1, math.ceil(MAX_OFFSET * fps - 1e-9))  # frame 0 has no previous frame to flash against
    last = math.floor((frames / fps - MAX_OFFSET - BEEP) * fps + 1e-9)
    step = max(1, math.ceil(MIN_SPACING * fps - 1e-9))
    choices = last - first - (count - 1) * (step - 1) + 1  # distinct draws, then spread by step - 1 each
    if count < 1 or choices < count:
        raise ValueError(f"{count} flashes {MIN_SPACING}s apart do not fit in {frames} frames at {fps} fps "
                         f"(frames {first}..{last} are usable); use more --frames")
    picks = np.sort(rng.choice(choices, size=count, replace=False))
    return [first + int(p) + i * (step - 1) for i, p in enumerate(picks)]


def check_args(size: int, fps: float, frames: int, rate: int, offset_ms: float) -> None:
    """Raise ValueError unless every clip can hold max(COUNTS) flashes and beeps shifted by offset_ms."""
    if size < 16 or fps <= 0 or frames < 2:
        raise ValueError(f"need size >= 16, fps > 0, frames >= 2; got size={size} fps={fps} frames={frames}")
    rates = av.Codec("aac", "w").audio_rates or ()
    if rate not in rates:
        raise ValueError(f"AAC cannot store {rate} Hz audio: use one of {sorted(rates)}")
    if abs(offset_ms) > MAX_OFFSET * 1000:
        raise ValueError(f"audio offset {offset_ms} ms is beyond +-{MAX_OFFSET * 1000:.0f} ms: beeps would "
                         f"leave the clip")
    flash_frames(max(COUNTS), fps, frames, np.random.default_rng(0))


def render_video(shape: str, colour: str, flashes: list[int], size: int, frames: int, fps: float,
                 rng: np.random.Generator) -> np.ndarray:
    """A clip (T, H, W, 3) uint8: the shape (half-extent size/6) sits still, dim, and flashes on those frames.

    rng draws the place, the backdrop and the fill's jitter; the flash frames are the caller's.
    """
    if colour not in COLOURS:
        raise ValueError(f"unknown colour {colour!r}: expected one of {list(COLOURS)}")
    if size < 16:
        raise ValueError(f"need size >= 16, got {size}")
    r = size / 6
    cx, cy = rng.uniform(r + 1, size - r - 1, size=2)
    cover = _coverage(shape, np.array([cx]), np.array([cy]), r, size)[0][..., None]  # (H, W, 1)
    # Dark backdrop (the flash is a big step up), slightly different per clip, with a faint static texture.
    grey = rng.uniform(15, 35) + rng.uniform(-3, 3, size=3)
    background = grey + rng.normal(0.0, 2.0, size=(size, size, 1))
    fill = np.clip(np.asarray(COLOURS[colour], dtype=np.float64) + rng.uniform(-10, 10, size=3), 0, 255)
    t = np.arange(frames) / fps
    since = t[:, None] - np.asarray(flashes, dtype=np.float64)[None, :] / fps  # (T, flashes)
    glow = np.where(since >= 0, np.exp(-np.maximum(since, 0.0) / FADE), 0.0).max(axis=1)
    level = DIM + (1 - DIM) * glow  # (T,)
    clip = background[None] + level[:, None, None, None] * cover[None] * (fill - background)[None]
    return np.clip(np.rint(clip), 0, 255).astype(np.uint8)


def render_audio(onsets: list[float], pitches: list[float], seconds: float, rate: int,
                 rng: np.random.Generator) -> np.ndarray:
    """Mono float32 (round(seconds * rate),): a beep starting at each onset (seconds, any sub-sample time)."""
    n = round(seconds * rate)
    t = np.arange(n) / rate
    audio = rng.normal(0.0, NOISE, size=n)
    for onset, pitch in zip(onsets, pitches, strict=True):
        tau = t - onset  # the envelope is evaluated in continuous time: onsets need not fall on a sample
        attack = 0.5 - 0.5 * np.cos(np.pi * np.clip(tau / ATTACK, 0.0, 1.0))
        release = 0.5 - 0.5 * np.cos(np.pi * np.clip((BEEP - tau) / RELEASE, 0.0, 1.0))
        env = np.where((tau >= 0) & (tau < BEEP), attack * release, 0.0)
        audio += AMPLITUDE * env * np.sin(2 * np.pi * pitch * tau)
    return np.clip(audio, -1.0, 1.0).astype(np.float32)


def encode_mp4(frames: np.ndarray, fps: float, audio: np.ndarray, rate: int) -> bytes:
    """H.264 (yuv420p) + AAC (mono) mp4 bytes; equal inputs always give equal bytes.

    Both streams start at pts 0: the AAC priming delay goes into the mp4 edit list (see the module doc).
    """
    t, h, w, _ = frames.shape
    buf = io.BytesIO()
    with av.open(buf, mode="w", format="mp4", options={"fflags": "+bitexact"}) as container:
        video = container.add_stream("libx264", rate=Fraction(fps).limit_denominator(1001))
        video.width, video.height, video.pix_fmt = w, h, "yuv420p"
        # As in make_shapes_dataset.py: one thread and no macroblock tree make x264's bytes reproducible.
        video.thread_count = 1
        video.options = {"crf": "20", "g": "8", "preset": "fast", "x264-params": "mbtree=0"}
        # FFmpeg's native AAC encoder is deterministic (same bytes in every process: tested).
        sound = container.add_stream("aac", rate=rate)
        sound.layout, sound.bit_rate = "mono", AUDIO_BITRATE
        for frame in frames:
            image = av.VideoFrame.from_ndarray(np.ascontiguousarray(frame), format="rgb24")
            container.mux(video.encode(image))
        container.mux(video.encode())
        samples = av.AudioFrame.from_ndarray(np.ascontiguousarray(audio[None]), format="fltp", layout="mono")
        samples.sample_rate, samples.pts = rate, 0
        container.mux(sound.encode(samples))  # PyAV cuts it into the encoder's 1024-sample frames
        container.mux(sound.encode())
    return buf.getvalue()


def make_sample(index: int, split: str, label: tuple[str, str, int], seed: int, size: int, frames: int,
                fps: float, rate: int, offset_ms: float = 0.0) -> Sample:
    """Sample number index of a split: (key, mp4 bytes, meta), a pure function of its arguments.

    The audio is shifted by offset_ms (positive: the sound lags) without touching any random draw, so the
    video is the same for every offset.
    """
    check_args(size, fps, frames, rate, offset_ms)
    colour, shape, count = label
    rng = np.random.default_rng([seed, SPLITS[split], index])
    flashes = flash_frames(count, fps, frames, rng)
    video = render_video(shape, colour, flashes, size, frames, fps, rng)
    times = [k / fps for k in flashes]
    beeps = [t + offset_ms / 1000 for t in times]
    audio = render_audio(beeps, [PITCHES[colour]] * count, frames / fps, rate, rng)
    events = [{"time": t, "frame": k, "beep_time": b, "colour": colour, "pitch_hz": PITCHES[colour]}
              for t, k, b in zip(times, flashes, beeps)]
    meta = {"fps": float(fps), "frames": frames, "width": size, "height": size, "duration": frames / fps,
            "has_audio": True, "audio_rate": rate, "audio_channels": 1, "audio_offset_ms": float(offset_ms),
            "events": events, "source": "generated", "license": "CC0-1.0",
            "captions": captions(colour, shape, count)}
    return f"{split}_{index:06d}", encode_mp4(video, fps, audio, rate), meta


def generate_split(out_dir: str | Path, split: str, num: int, seed: int = 0, size: int = 64, frames: int = 50,
                   fps: float = 25, rate: int = 16000, offset_ms: float = 0.0, workers: int = 1,
                   shard_samples: int = 64, progress: bool = True) -> dict:
    """Write num clips of a split as shards in out_dir; labels cycle through all 36 combinations, shuffled."""
    check_args(size, fps, frames, rate, offset_ms)  # impossible arguments fail before any work
    return write_generated_split(make_sample, LABELS, out_dir, split, SPLITS[split], num, seed, workers,
                                 shard_samples, progress, size=size, frames=frames, fps=fps, rate=rate,
                                 offset_ms=offset_ms)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True, help="output folder; gets train/ and val/ shards with index.json")
    ap.add_argument("--train", type=int, default=1000, help="training clips")
    ap.add_argument("--val", type=int, default=64, help="validation clips (a different seed stream)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--size", type=int, default=64, help="width and height in pixels")
    # 25 fps: a frame lasts 40 ms, the sync tolerance, so a flash is timed as finely as sync is judged (at
    # 8 fps a frame lasts 125 ms and a flash could not be placed to +-40 ms at all).
    ap.add_argument("--fps", type=float, default=25)
    ap.add_argument("--frames", type=int, default=50, help="frames per clip (50 at 25 fps: 2 s)")
    ap.add_argument("--audio-rate", type=int, default=16000, help="audio sample rate (Hz), mono")
    ap.add_argument("--audio-offset-ms", type=float, default=0.0,
                    help=f"shift every beep by this much (+ = sound late), at most {MAX_OFFSET * 1000:.0f}")
    ap.add_argument("--shard-samples", type=int, default=64, help="clips per shard (at most)")
    ap.add_argument("--workers", type=int, default=os.cpu_count() or 1, help="processes rendering, encoding")
    args = ap.parse_args()
    try:
        check_args(args.size, args.fps, args.frames, args.audio_rate, args.audio_offset_ms)
    except ValueError as e:  # arguments that cannot make a clip: say why, no traceback
        raise SystemExit(f"error: {e}") from None
    for split, num in (("train", args.train), ("val", args.val)):
        if num > 0:
            index = generate_split(Path(args.out) / split, split, num, args.seed, args.size, args.frames,
                                   args.fps, args.audio_rate, args.audio_offset_ms, args.workers,
                                   args.shard_samples)
            print(f"wrote {num} {split} clips in {len(index['shards'])} shards to {Path(args.out) / split}")


if __name__ == "__main__":
    main()
