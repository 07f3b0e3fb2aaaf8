"""Audio from damaged or sloppy real media: a corrupt AC3 packet costs only its span, and MP3 timestamps that
wobble by +-35 samples (as remuxed MP3 tracks do) still give a continuous tone, through VideoStream.

The files are written here with PyAV: H.264 video plus a 440 Hz tone, then one AC3 packet's bytes are zeroed
in place (its offset found by demuxing), or the MP3 packets are muxed with jittered timestamps.
"""

import io
from fractions import Fraction
from itertools import islice

import av
import numpy as np
import pytest
from video_shards import write_samples

from framework.data.audio_decode import decode_audio_window
from framework.data.buckets import parse_buckets
from framework.data.video import VideoStream

FPS, SIZE, SECONDS = 25, 64, 2.0
RATE = 16000  # the loader's audio rate
HZ, AMP = 440.0, 0.5
BUCKETS = parse_buckets(["64x64x40:1"])  # 1.6 s windows starting in [0, 0.4]: all hold 0.4-1.6 s
WOBBLE = 35  # samples of timestamp jitter (the MP3 track)
BAD_AT = 1.0  # seconds: the corrupt AC3 packet / the dropped MP3 frame is the first starting after this


def tone_file(codec: str, rate: int, fmt: str = "mp4", wobble: int = 0, drop_at: float | None = None) -> bytes:
    """SECONDS of H.264 video and a continuous HZ tone in `codec`. wobble > 0 moves each audio packet's
    timestamp by a seeded uniform -wobble..wobble samples; drop_at leaves out the first audio packet from that
    time on (a real gap in the track)."""
    buf, rng, dropped = io.BytesIO(), np.random.default_rng(1), False
    with av.open(buf, "w", format=fmt) as out:
        video = out.add_stream("libx264", rate=FPS)
        video.width, video.height, video.pix_fmt = SIZE, SIZE, "yuv420p"
        sound = out.add_stream(codec, rate=rate, layout="mono")
        for i in range(round(SECONDS * FPS)):
            frame = av.VideoFrame.from_ndarray(np.full((SIZE, SIZE, 3), 90, np.uint8), format="rgb24")
            frame.pts, frame.time_base = i, Fraction(1, FPS)
            out.mux(video.encode(frame))
        out.mux(video.encode())
        n = round(SECONDS * rate)
        x = (AMP * np.sin(2 * np.pi * HZ * np.arange(n) / rate)).astype(np.float32)[None]
        step = sound.frame_size or 1024

        def mux(packets):
            nonlocal dropped
            for p in packets:
                if drop_at is not None and not dropped and p.pts is not None and p.pts >= drop_at * rate:
                    dropped = True
                    continue
                if wobble and p.pts is not None:  # the packets' time base is 1 / rate here
                    p.pts += int(rng.integers(-wobble, wobble + 1))
                    p.dts = p.pts
                out.mux(p)

        for s in range(0, n, step):
            frame = av.AudioFrame.from_ndarray(np.ascontiguousarray(x[:, s:s + step]), format="fltp", layout="mono")
            frame.sample_rate, frame.time_base, frame.pts = rate, Fraction(1, rate), s
            mux(sound.encode(frame))
        mux(sound.encode())
    return buf.getvalue()


def audio_packets(data: bytes) -> list[tuple[int, int, float, float]]:
    """(byte offset, size, start s, duration s) of every audio packet, as PyAV demuxes them."""
    with av.open(io.BytesIO(data)) as c:
        s = c.streams.audio[0]
        return [(p.pos, p.size, float(p.pts * s.time_base), float(p.duration * s.time_base))
                for p in c.demux(s) if p.size]


def refused_packets(data: bytes) -> list[float]:
    """Start times of the audio packets PyAV's decoder refuses."""
    refused = []
    with av.open(io.BytesIO(data)) as c:
        s = c.streams.audio[0]
        for p in c.demux(s):
            try:
                p.decode()
            except av.FFmpegError:
                refused.append(float(p.pts * s.time_base))
    return refused


def corrupt_ac3() -> tuple[bytes, tuple[float, float]]:
    """An mp4 with an AC3 track whose packet at BAD_AT has its bytes zeroed; returns (file, packet span s)."""
    data = tone_file("ac3", 48000)
    pos, size, t, dur = next(p for p in audio_packets(data) if p[2] >= BAD_AT)
    bad = bytearray(data)
    bad[pos:pos + size] = bytes(size)
    return bytes(bad), (t, t + dur)


def holes(valid: np.ndarray) -> list[tuple[int, int]]:
    """[start, end) index runs where valid is False."""
    edges = np.flatnonzero(np.diff(np.concatenate([[1], valid.astype(np.int8), [1]])))
    return list(zip(edges[::2].tolist(), edges[1::2].tolist()))


def tone_error(x: np.ndarray, t0: float, keep: np.ndarray) -> float:
    """Largest deviation of x (N,) at `keep` from the best-fitting HZ sinusoid (sample i at t0 + i / RATE): a
    hole, an overlap or a phase jump shows as ~AMP, codec noise as a few hundredths."""
    t = t0 + np.arange(x.size) / RATE
    basis = np.stack([np.sin(2 * np.pi * HZ * t), np.cos(2 * np.pi * HZ * t)], axis=1)[keep]
    coef, *_ = np.linalg.lstsq(basis, x[keep], rcond=None)
    return float(np.abs(basis @ coef - x[keep]).max())


def meta(key: str) -> dict:
    return {"fps": float(FPS), "frames": round(SECONDS * FPS), "width": SIZE, "height": SIZE,
            "duration": SECONDS, "has_audio": True, "source": key, "license": "test", "captions": [key]}


@pytest.fixture(scope="module")
def media(tmp_path_factory):
    ac3, span = corrupt_ac3()
    files = {"ac3_corrupt": ac3,
             "mp3_mp4": tone_file("mp3", 44100, "mp4", WOBBLE),
             "mp3_mkv": tone_file("mp3", 44100, "matroska", WOBBLE),
             "mp3_gap": tone_file("mp3", 44100, "mp4", WOBBLE, drop_at=BAD_AT)}
    out = tmp_path_factory.mktemp("real_media")
    for name, keys in (("ac3", ["ac3_corrupt"]), ("mp3", ["mp3_mp4", "mp3_mkv", "mp3_gap"])):
        write_samples([(k, files[k], meta(k)) for k in keys], out / name, shard_bytes=1 << 30, shard_samples=2)
    return {"files": files, "ac3_span": span, "shards": out}


def loaded_clips(shards, epochs: int) -> dict[str, list[tuple[float, np.ndarray, np.ndarray]]]:
    """key -> [(window start s, audio (S,), mask (S,))] of every clip VideoStream gives in `epochs`."""
    s = VideoStream(shards, BUCKETS, 0, 1, seed=0, fps=FPS, audio_rate=RATE, max_skip_fraction=0.0)
    out = {}
    for _ in range(epochs):
        plan = {key: times for _, key, _, _, times in s.planned_clips(s.epoch, 0, len(s))}
        for batch in islice(s, len(s)):
            key = batch["key"][0]
            out.setdefault(key, []).append((float(plan[key][0]), batch["audio"][0, 0].numpy(),
                                            batch["audio_mask"][0].numpy()))
    assert s.stats["skipped"] == 0 and s.stats["no_audio"] == 0
    return out


def test_a_corrupt_packet_masks_its_span_and_keeps_the_clip(media):
    bad0, bad1 = media["ac3_span"]
    # The file really is damaged: the mp4 demuxer's AC3 parser merges the zeroed frame into the one before it,
    # which the decoder then refuses.
    refused = refused_packets(media["files"]["ac3_corrupt"])
    assert len(refused) == 1 and bad0 - 0.04 < refused[0] <= bad0
    assert refused_packets(tone_file("ac3", 48000)) == []
    for start, seconds in ((0.0, 1.6), (0.4, 1.6), (1.005, 0.9)):  # the last one is decoded after a seek
        x, valid = decode_audio_window(media["files"]["ac3_corrupt"], start, seconds, RATE)
        (a, b), = holes(valid)  # one hole, over the corrupt packet (and the one its data was merged into)
        assert start + a / RATE <= bad0 + 1e-3 and start + b / RATE >= bad1 - 1e-3
        assert (b - a) / RATE <= 2 * (bad1 - bad0) + 1e-3
        assert not x[:, a:b].any()
        keep = valid.copy()
        keep[max(a - 800, 0):b + 800] = False  # the decoder's overlap with the lost frame: 50 ms each side
        assert tone_error(x[0], start, keep) < 0.05
    for start, x, valid in loaded_clips(media["shards"] / "ac3", 2)["ac3_corrupt"]:  # kept, never skipped
        (a, b), = holes(valid)
        assert start + a / RATE <= bad0 + 1e-3 and start + b / RATE >= bad1 - 1e-3 and not x[a:b].any()


def test_jittery_mp3_timestamps_leave_no_holes(media):
    for key in ("mp3_mp4", "mp3_mkv"):
        times = [t for _, _, t, _ in audio_packets(media["files"][key])]
        jitter = np.diff(times) - np.median(np.diff(times))
        assert np.abs(jitter).max() > 0.0009, key  # the file really wobbles (mkv: by whole milliseconds)
    clips = loaded_clips(media["shards"] / "mp3", 2)
    for key in ("mp3_mp4", "mp3_mkv"):
        for start, x, valid in clips[key]:
            assert valid.all(), (key, start, holes(valid))
            assert not ((x[1:] == 0) & (x[:-1] == 0)).any(), key  # no run of zeros
            keep = np.ones(x.size, bool)
            keep[:max(0, round((0.1 - start) * RATE))] = False  # the encoder's fade-in at the file's start
            assert tone_error(x, start, keep) < 0.05, key
    # A frame really missing (26 ms) is still a gap, masked where it was, not closed up by the jitter tolerance.
    frame = 1152 / 44100
    for start, x, valid in clips["mp3_gap"]:
        (a, b), = holes(valid)
        assert abs(start + a / RATE - BAD_AT) < frame and abs((b - a) / RATE - frame) < 0.003
        # Each side on its own: the audio after the gap is placed by its packet's timestamp, jitter included
        # (0.8 ms is a third of a 440 Hz period), and MP3's bit reservoir (frames whose data began in the lost
        # one) spoils ~4 frames after it: measured up to 95 ms.
        before, after = np.zeros(x.size, bool), np.zeros(x.size, bool)
        before[max(0, round((0.1 - start) * RATE)):a - 800] = True
        after[b + round(0.15 * RATE):] = True
        assert tone_error(x, start, before) < 0.05 and tone_error(x, start, after) < 0.05
