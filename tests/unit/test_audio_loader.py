"""Audio in the video loader: each clip's audio is cut to the time its frames cover, on the video's clock.

Real files built here: H.264 video with one bright frame and AAC (or FLAC / WAV) audio with a chirp at a known
time relative to it. Offsets are measured on what VideoStream delivers: the bright frame found in the loaded
video, the chirp found by cross-correlation in the loaded audio.
"""

import io
import json
import re
import warnings
from fractions import Fraction
from itertools import islice
from pathlib import Path

import av
import numpy as np
import pytest
import torch
from video_shards import write_samples

from framework.data.audio_decode import NoAudioError, decode_audio_window
from framework.data.buckets import parse_buckets
from framework.data.video import VideoStream
from framework.data.video_decode import CorruptVideoError

REPO = Path(__file__).resolve().parents[2]
FPS, SIZE, FRAMES = 25, 64, 50  # 2 s of video
BRIGHT = 15  # the bright frame: shown from 0.6 s
RATE = 16000  # the loader's audio rate
BUCKETS = parse_buckets(["64x64x40:2"])  # 1.6 s clips: starts in [0, 0.4], so every window holds 0.4-1.6 s
SAMPLES = round(40 / FPS * RATE)
CHIRP = 0.05  # seconds
TOL = 1e-3  # the bound on sync error, seconds


def chirp(rate: int) -> np.ndarray:
    """A 300 -> 3000 Hz linear chirp: its cross-correlation peak is sharp (~0.3 ms) and survives AAC."""
    t = np.arange(round(CHIRP * rate)) / rate
    return (0.5 * np.sin(2 * np.pi * (300 * t + 2700 / (2 * CHIRP) * t * t))).astype(np.float32)


def onset(x: np.ndarray, rate: int) -> float:
    """Seconds from the start of x (N,) to where the chirp starts: the peak of their cross-correlation,
    refined by a parabola through its neighbours."""
    c = np.correlate(np.asarray(x, np.float64), chirp(rate).astype(np.float64), mode="valid")
    k = int(np.argmax(c))
    d = 0.5 * (c[k - 1] - c[k + 1]) / (c[k - 1] - 2 * c[k] + c[k + 1]) if 0 < k < c.size - 1 else 0.0
    return (k + d) / rate


def track(seconds: float, rate: int, at: float | None, channels: int = 1) -> np.ndarray:
    """(channels, seconds * rate) float32 silence with the chirp from `at` seconds in the first channel."""
    x = np.zeros((channels, round(seconds * rate)), np.float32)
    if at is not None:
        c = chirp(rate)
        x[0, round(at * rate):round(at * rate) + c.size] = c
    return x


def av_file(fmt: str = "mp4", rate: int = RATE, delay: float = 0.0, audio_pts: float = 0.0,
            video_start: float = 0.0, audio_seconds: float | None = None, audio: bool = True,
            gap: tuple[float, float] | None = None, hum: float = 0.0) -> bytes:
    """H.264 video (frame BRIGHT bright) whose first frame has timestamp video_start, plus AAC audio whose first
    sample has timestamp audio_pts and whose chirp starts at video_start + BRIGHT / FPS + delay seconds of its
    samples (as long as the video unless audio_seconds): so the chirp plays audio_pts + delay after the bright
    frame. AAC frames (1024 samples) starting inside gap (seconds of the track) are left out; hum adds a 150 Hz
    tone of that amplitude throughout."""
    buf = io.BytesIO()
    with av.open(buf, "w", format=fmt) as out:
        video = out.add_stream("libx264", rate=FPS)
        video.width, video.height, video.pix_fmt = SIZE, SIZE, "yuv420p"
        sound = out.add_stream("aac", rate=rate, layout="mono") if audio else None  # before the first packet
        for i in range(FRAMES):
            frame = av.VideoFrame.from_ndarray(np.full((SIZE, SIZE, 3), 240 if i == BRIGHT else 16, np.uint8),
                                               format="rgb24")
            frame.pts, frame.time_base = i + round(video_start * FPS), Fraction(1, FPS)
            out.mux(video.encode(frame))
        out.mux(video.encode())
        if sound is not None:
            x = track(audio_seconds or video_start + FRAMES / FPS, rate, video_start + BRIGHT / FPS + delay)
            x += hum * np.sin(2 * np.pi * 150 * np.arange(x.shape[1]) / rate, dtype=np.float32)
            for s in range(0, x.shape[1], 1024):
                if gap is not None and gap[0] * rate <= s < gap[1] * rate:
                    continue
                frame = av.AudioFrame.from_ndarray(np.ascontiguousarray(x[:, s:s + 1024]), format="fltp",
                                                   layout="mono")
                frame.sample_rate, frame.time_base = rate, Fraction(1, rate)
                frame.pts = s + round(audio_pts * rate)
                out.mux(sound.encode(frame))
            out.mux(sound.encode())
    return buf.getvalue()


def audio_file(fmt: str, x: np.ndarray, rate: int) -> bytes:
    """FLAC or WAV (16-bit) bytes of x (channels, N) in [-1, 1]."""
    layout = {1: "mono", 2: "stereo"}[x.shape[0]]
    buf = io.BytesIO()
    with av.open(buf, "w", format=fmt) as out:
        stream = out.add_stream({"flac": "flac", "wav": "pcm_s16le"}[fmt], rate=rate)
        stream.layout = layout
        pcm = np.round(x.T * 32767).astype(np.int16).reshape(1, -1)  # s16 is packed: channels interleaved
        frame = av.AudioFrame.from_ndarray(pcm, format="s16", layout=layout)
        frame.sample_rate, frame.pts = rate, 0
        out.mux(stream.encode(frame))
        out.mux(stream.encode())
    return buf.getvalue()


def meta(key: str, has_audio: bool = True) -> dict:
    return {"fps": float(FPS), "frames": FRAMES, "width": SIZE, "height": SIZE, "duration": FRAMES / FPS,
            "has_audio": has_audio, "source": key, "license": "test", "captions": [f"{key} caption"]}


SYNC = {  # key: (file, expected offset of the chirp after the bright frame, seconds)
    "sync": ({}, 0.0),
    "late_content": ({"delay": 0.12}, 0.12),  # the samples are shifted
    # The stream's timestamps are shifted: in mp4 the AAC priming then sits in the stream before 0.12 s (with
    # pts 0 it goes into the edit list), so only placing samples by their pts gets this right.
    "late_pts": ({"audio_pts": 0.12}, 0.12),
    "late_pts_mkv": ({"fmt": "matroska", "audio_pts": 0.12}, 0.12),
    "video_late": ({"video_start": 0.48}, 0.0),  # the video starts at 0.48 s: that is the clips' time 0
    "hifi": ({"rate": 44100}, 0.0),  # resampled 44.1 -> 16 kHz
}


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("audio")
    sync = [(key, av_file(**kw), meta(key)) for key, (kw, _) in SYNC.items()]
    write_samples(sync, tmp / "sync", shard_bytes=1 << 30, shard_samples=2)
    decoy = av_file(delay=0.3)  # the mp4's own audio is wrong: a sidecar must win
    mute = av_file(audio=False)
    other = [("flac_short", decoy, meta("flac_short"), ("flac", audio_file("flac", track(1.0, RATE, 0.6), RATE))),
             ("wav_stereo", mute, meta("wav_stereo"), ("wav", audio_file("wav", track(2.0, 22050, 0.6, 2), 22050))),
             ("aac_short", av_file(audio_seconds=1.0), meta("aac_short")),
             ("mute", mute, meta("mute", has_audio=False))]
    write_samples(other, tmp / "other", shard_bytes=1 << 30, shard_samples=2)
    return tmp


def take(stream, n):
    return list(islice(stream, n))


def clips(stream, epochs):
    """(key, planned times (T,), loaded video (3, T, H, W), audio (C, S), mask (S,)) of every clip of `epochs`."""
    out = []
    for _ in range(epochs):
        plan = stream.planned_clips(stream.epoch, 0, len(stream))
        for batch in take(stream, len(stream)):
            for k, key in enumerate(batch["key"]):
                times = next(t for _, pkey, _, _, t in plan if pkey == key)
                out.append((key, times, batch["video"][k], batch["audio"][k], batch["audio_mask"][k]))
    return out


def bright_frame_time(times: np.ndarray, video: torch.Tensor) -> float:
    """Start time of the source frame behind the brightest loaded frame (the frame shown at times[i])."""
    i = int(video.mean(dim=(0, 2, 3)).argmax())
    shown = int(np.floor(times[i] * FPS + 1e-9))
    assert shown == BRIGHT, f"loaded frame {i} (t={times[i]:.3f}) is source frame {shown}, not {BRIGHT}"
    return shown / FPS


def test_audio_follows_the_video_clock(shards):
    s = VideoStream(shards / "sync", BUCKETS, 0, 1, seed=0, fps=FPS, audio_rate=RATE)
    measured = {}
    for key, times, video, audio, mask in clips(s, 3):
        assert bool(mask.all()), key
        offset = times[0] + onset(audio[0].numpy(), RATE) - bright_frame_time(times, video)
        measured.setdefault(key, []).append(offset)
    assert set(measured) == set(SYNC)
    for key, offsets in measured.items():
        err = np.abs(np.asarray(offsets) - SYNC[key][1])
        assert err.max() < TOL, f"{key}: offsets {np.round(np.asarray(offsets) * 1000, 3)} ms"


def test_batches_shapes_dtypes_and_workers(shards):
    kw = dict(seed=4, fps=FPS, audio_rate=RATE, audio_channels=2, random_crop=True)
    a, b = (VideoStream(shards / "sync", BUCKETS, 0, 1, num_workers=w, **kw) for w in (0, 2))
    for x, y in zip(take(a, 3), take(b, 3)):  # workers ship audio through shared memory
        assert x["audio"].shape == (2, 2, SAMPLES) and x["audio"].dtype == torch.float32
        assert x["audio_mask"].shape == (2, SAMPLES) and x["audio_mask"].dtype == torch.bool
        assert x["audio_rate"] == RATE and x["key"] == y["key"]
        assert torch.equal(x["audio"], y["audio"]) and torch.equal(x["audio_mask"], y["audio_mask"])
        assert torch.equal(x["video"], y["video"])
        assert torch.allclose(x["audio"][:, 0], x["audio"][:, 1])  # a mono source fills both channels
    off = VideoStream(shards / "sync", BUCKETS, 0, 1, seed=4, fps=FPS)  # audio off: batches as before
    assert not {"audio", "audio_mask", "audio_rate"} & set(next(off)) and "no_audio" not in off.stats
    assert a.stats == {"seen": 6, "skipped": 0, "too_short": 0, "no_audio": 0}


def test_resume_is_exact_with_audio(shards):
    kw = dict(seed=5, fps=FPS, audio_rate=RATE, random_crop=True)
    a = VideoStream(shards / "sync", BUCKETS, 0, 1, **kw)
    take(a, len(a) - 1)  # the next batches cross into epoch 1
    state = json.loads(json.dumps(a.state_dict()))
    expected = take(a, 3)
    b = VideoStream(shards / "sync", BUCKETS, 0, 1, **kw)
    b.load_state_dict(state)
    for x, y in zip(expected, take(b, 3)):
        assert x["key"] == y["key"] and torch.equal(x["video"], y["video"])
        assert torch.equal(x["audio"], y["audio"]) and torch.equal(x["audio_mask"], y["audio_mask"])
    assert b.state_dict() == a.state_dict()


def test_sidecars_short_audio_and_silent_clips(shards):
    s = VideoStream(shards / "other", BUCKETS, 0, 1, seed=0, fps=FPS, audio_rate=RATE, audio_channels=2)
    seen = {}
    for key, times, video, audio, mask in clips(s, 2):
        seen[key] = True
        t0, mask = float(times[0]), mask.numpy()
        if key == "mute":  # kept silent
            assert not mask.any() and not audio.any()
            continue
        # Valid from the window start to where the audio ends, then zeros.
        end = {"flac_short": 1.0, "wav_stereo": 2.0, "aac_short": 1.0}[key]
        n = int(mask.sum())
        assert mask[:n].all() and not audio[:, n:].any()
        if key == "aac_short":  # the last AAC frame is decoded whole: up to 1024 samples of encoder padding
            assert (end - t0) * RATE - 1 <= n <= (end - t0) * RATE + 1024
        else:
            assert abs(n - min(SAMPLES, (end - t0) * RATE)) <= 1
        # The sidecar, not the mp4's own (decoy) track, and its first sample is the first frame's time.
        offset = t0 + onset(audio[0].numpy(), RATE) - bright_frame_time(times, video)
        assert abs(offset) < TOL, (key, offset)
        if key == "wav_stereo":  # channel order kept: the chirp is on the left only
            assert audio[1].abs().max() < 1e-3 < audio[0].abs().max()
    assert set(seen) == {"flac_short", "wav_stereo", "aac_short", "mute"}
    assert s.stats["no_audio"] == 2 and s.stats["skipped"] == 0


def test_missing_audio_skip_replaces_the_clip(shards):
    s = VideoStream(shards / "other", BUCKETS, 0, 1, seed=0, fps=FPS, audio_rate=RATE, missing_audio="skip",
                    max_skip_fraction=0.5)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        batches = take(s, 2 * len(s))
    assert s.stats["skipped"] == 2 and s.stats["no_audio"] == 0
    assert "mute" not in {k for b in batches for k in b["key"]}
    messages = [str(w.message) for w in caught if "skipping" in str(w.message)]
    assert len(messages) == 2 and all("'mute'" in m and "no audio stream" in m for m in messages)
    assert all(b["audio_mask"].any(dim=1).all() for b in batches)  # the replacement brought its audio along


def test_bad_audio_options_are_refused(shards):
    for kw in ({"audio_rate": -1}, {"audio_rate": 16000.5}, {"audio_channels": 3}, {"missing_audio": "drop"}):
        with pytest.raises(ValueError, match="missing_audio"):
            VideoStream(shards / "sync", BUCKETS, 0, 1, seed=0, fps=FPS, **kw)


# ---- decode_audio_window on its own ----

@pytest.mark.parametrize("source,target", [(44100, 16000), (16000, 44100), (48000, 16000), (22050, 22050)])
def test_resampler_adds_no_delay(source, target):
    """Lossless input, so the bound is tight: a resampler delay of even 2 output samples would show."""
    wav = audio_file("wav", track(2.0, source, 0.7), source)
    for start in (0.2, 0.2 + 1 / 3000):  # a window start between samples of both grids
        samples, valid = decode_audio_window(wav, start, 1.0, target)
        assert samples.shape == (1, target) and valid.all()
        assert abs(start + onset(samples[0], target) - 0.7) < max(0.6 / target, 1e-4)


def test_seeking_matches_decoding_from_the_start():
    """Windows from 1 s on seek instead of decoding everything before them; a pre-roll hides the first AAC frame
    after the seek, which lacks its overlap with the one before (the hum makes that visible)."""
    data = av_file(audio_seconds=2.0, delay=1.0, hum=0.1)  # chirp at 1.6 s
    whole, valid = decode_audio_window(data, 0.0, 1.9, RATE)
    part, part_valid = decode_audio_window(data, 1.25, 0.6, RATE)
    assert np.array_equal(part, whole[:, 20000:29600]) and part_valid.all() and valid.all()
    assert abs(1.25 + onset(part[0], RATE) - 1.6) < TOL


def test_a_gap_in_the_timestamps_is_masked_and_later_audio_keeps_its_time():
    data = av_file(fmt="matroska", delay=0.9, gap=(0.3, 1.0))  # chirp at 1.5 s; frames 5 to 15 left out
    samples, valid = decode_audio_window(data, 0.1, 1.8, 8000)  # resampled across the hole
    hole = np.flatnonzero(~valid)
    assert np.all(np.diff(hole) == 1)  # one hole: [5 * 1024, 16 * 1024) samples of 16 kHz
    assert abs(0.1 + hole[0] / 8000 - 0.32) < TOL and abs(0.1 + (hole[-1] + 1) / 8000 - 1.024) < TOL
    assert not samples[:, ~valid].any()
    assert abs(0.1 + onset(samples[0], 8000) - 1.5) < TOL


def test_errors_are_specific():
    with pytest.raises(NoAudioError, match="no audio stream"):
        decode_audio_window(av_file(audio=False), 0.0, 1.0, RATE)
    noise = np.random.default_rng(0).integers(0, 256, 20000, dtype=np.uint8).tobytes()
    with pytest.raises(CorruptVideoError) as e:
        decode_audio_window(noise, 0.0, 1.0, RATE)
    assert not isinstance(e.value, NoAudioError)
    with pytest.raises(ValueError):
        decode_audio_window(noise, 0.0, 1.0, RATE, channels=6)


def test_decord_avreader_is_not_used():
    """decord's AVReader leaks memory: audio goes through PyAV only."""
    use = re.compile(r"AVReader\s*\(|\.AVReader\b|import[^\n]*\bAVReader\b")
    sources = [p for d in ("framework", "recipes", "launch", "data") for p in (REPO / d).rglob("*.py")]
    assert [p for p in sources if use.search(p.read_text(encoding="utf-8"))] == []
    assert use.search("reader = decord.AVReader(io.BytesIO(data))")  # the pattern does find a use
