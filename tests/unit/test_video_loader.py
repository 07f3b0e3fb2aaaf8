"""Video clips: frame-exact decoding (decord == PyAV), resize/crop, and VideoStream: same bucket on every rank,
disjoint keys, exact resume with and without workers, corrupt clips replaced within the batch, captions."""

import json
import re
import subprocess
import sys
import tarfile
import warnings
from fractions import Fraction
from itertools import islice
from pathlib import Path

import av
import numpy as np
import pytest
import torch
import webdataset as wds

from framework.data.buckets import parse_buckets
from framework.data.video import VideoStream, pick_caption
from framework.data.video_decode import (
    DECORD_AVAILABLE,
    CorruptVideoError,
    choose_start,
    clip_times,
    decode_clip,
    resize_crop,
    to_unit_range,
)

REPO = Path(__file__).resolve().parents[2]
FPS = 8.0
BUCKETS = parse_buckets(["64x64x8:2", "64x96x8:2"])  # 1 s clips at 8 fps: square and landscape
META = ("fps", "frames", "width", "height", "duration", "has_audio")


def grey(i: int) -> int:
    """Frame i's grey level: the frame index survives H.264 and yuv420p in the flat centre of the picture."""
    return 8 + 10 * i  # up to 24 frames


def frame_index(pixels: np.ndarray) -> np.ndarray:
    """Frame indices from grey levels (..., ) in 0..255."""
    return np.rint((pixels.astype(np.float64) - 8) / 10).astype(int)


def encode(path: Path, width: int, height: int, frames: int, fps: int, faststart: bool = False) -> bytes:
    """A real H.264 mp4 (libx264, yuv420p, B-frames on) whose frame i is grey(i) with a noisy corner."""
    rng = np.random.default_rng(frames * 1000 + width)
    with av.open(str(path), "w", format="mp4", options={"movflags": "faststart"} if faststart else {}) as out:
        stream = out.add_stream("libx264", rate=fps)
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        stream.time_base = Fraction(1, fps)
        stream.options = {"crf": "12", "preset": "fast"}
        for i in range(frames):
            img = np.full((height, width, 3), grey(i), np.uint8)
            img[:12, :12] = rng.integers(0, 256, (12, 12, 3))  # texture, so decoders have real work to agree on
            frame = av.VideoFrame.from_ndarray(img, format="rgb24")
            frame.pts = i
            for packet in stream.encode(frame):
                out.mux(packet)
        for packet in stream.encode():
            out.mux(packet)
    return path.read_bytes()


def write_shards(out: Path, samples: list[tuple[str, bytes, dict]], shards: int, json_offsets: bool) -> Path:
    """webdataset tars of KEY.mp4/.txt/.json plus a video-v1 index.json, samples dealt round-robin to shards."""
    out.mkdir(parents=True)
    entries = []
    for n in range(shards):
        name, chunk = f"shard-{n:06d}.tar", samples[n::shards]
        writer = wds.TarWriter(str(out / name), encoder=False)
        for key, mp4, meta in chunk:
            writer.write({"__key__": key, "mp4": mp4, "txt": meta["captions"][0].encode(),
                          "json": json.dumps(meta).encode()})
        writer.close()
        with tarfile.open(out / name) as tar:
            spans = {m.name: (m.offset_data, m.size) for m in tar if m.isfile()}
        items = []
        for key, _, meta in chunk:
            item = {"key": key, **{f: meta[f] for f in META}, "offset": spans[f"{key}.mp4"][0],
                    "size": spans[f"{key}.mp4"][1]}
            if json_offsets:
                item["json_offset"], item["json_size"] = spans[f"{key}.json"]
            items.append(item)
        entries.append({"path": name, "samples": len(chunk), "bytes": (out / name).stat().st_size, "items": items})
    (out / "index.json").write_text(json.dumps({"format": "video-v1", "shards": entries}))
    return out


def _meta(w, h, frames, fps, n_captions, key):
    return {"fps": float(fps), "frames": frames, "width": w, "height": h, "duration": frames / fps,
            "has_audio": False, "source": f"{key}.mp4", "license": "test",
            "captions": [f"{key} caption {c}" for c in range(n_captions)]}


@pytest.fixture(scope="module")
def videos(tmp_path_factory):
    """Dirs "clean" (22 good clips, 1 too short), "dirty" (+ corrupt, truncated, too short at decode), "bad" (2 corrupt)."""
    tmp = tmp_path_factory.mktemp("videos")
    sizes = [(64, 64), (96, 64), (64, 96)]  # (width, height): square, landscape, portrait
    good = []
    for i in range(22):
        (w, h), fps = sizes[i % 3], (8, 10, 12)[(i + i // 3) % 3]  # every size at every rate
        frames = int(fps * (1.0 + (i % 5) / 4))  # 1 to 2 s
        key = f"clip{i:02d}"
        good.append((key, encode(tmp / f"{key}.mp4", w, h, frames, fps), _meta(w, h, frames, fps, 1 + i % 3, key)))
    short = ("short", encode(tmp / "short.mp4", 64, 64, 6, 10), _meta(64, 64, 6, 10, 1, "short"))
    noise = np.random.default_rng(0).integers(0, 256, 20000, dtype=np.uint8).tobytes()
    corrupt = ("corrupt", noise, _meta(64, 64, 15, 10, 1, "corrupt"))
    whole = encode(tmp / "trunc.mp4", 64, 64, 20, 10, faststart=True)  # index up front: the frames are cut
    truncated = ("truncated", whole[:len(whole) // 2], _meta(64, 64, 20, 10, 1, "truncated"))
    # Metadata says 2 s of landscape (another bucket than the broken square ones); the video has 0.6 s.
    liar = ("liar", short[1], _meta(96, 64, 20, 10, 1, "liar"))
    return {"good": good,
            "clean": write_shards(tmp / "clean", good[:11] + [short] + good[11:], 4, json_offsets=True),
            "dirty": write_shards(tmp / "dirty", good[:5] + [corrupt] + good[5:17] + [truncated] + good[17:]
                                  + [short, liar], 4, json_offsets=False),
            "bad": write_shards(tmp / "bad", [corrupt, ("corrupt2", noise[::-1], corrupt[2])], 1, json_offsets=False)}


def take(stream, n):
    return list(islice(stream, n))


def same(a, b):
    return (torch.equal(a["video"], b["video"]) and a["key"] == b["key"] and a["caption"] == b["caption"]
            and a["bucket"] == b["bucket"])


# ---- decoding ----

@pytest.mark.parametrize("backend", ["pyav"] + (["decord"] if DECORD_AVAILABLE else []))
def test_decode_picks_the_frame_shown_at_each_time(videos, backend):
    for _, data, meta in videos["good"][:9]:
        fps, n = meta["fps"], meta["frames"]
        times = np.sort(np.random.default_rng(n).uniform(0, n / fps - 1e-3, 7))
        times = np.concatenate([[0.0, 0.5 / fps, 1 / fps], times, [(n - 0.5) / fps]])
        frames = decode_clip(data, times, backend=backend)
        assert frames.shape == (len(times), meta["height"], meta["width"], 3) and frames.dtype == np.uint8
        assert np.array_equal(frame_index(frames[:, -8, -8, 0]), np.floor(times * fps + 1e-9).astype(int))


@pytest.mark.skipif(not DECORD_AVAILABLE, reason="decord not installed")
def test_decord_and_pyav_agree_exactly(videos):
    for _, data, meta in videos["good"]:
        times = np.arange(meta["frames"]) / meta["fps"]
        assert np.array_equal(decode_clip(data, times, backend="decord"), decode_clip(data, times, backend="pyav"))


@pytest.mark.parametrize("backend", ["auto", "pyav"] + (["decord"] if DECORD_AVAILABLE else []))
def test_corrupt_truncated_and_too_short_raise(videos, backend):
    _, data, meta = videos["good"][0]
    with pytest.raises(CorruptVideoError, match="shorter"):
        decode_clip(data, np.array([0.0, meta["duration"] + 0.01]), backend=backend)
    ds = VideoStream(videos["dirty"], BUCKETS, 0, 1, seed=0, fps=FPS)
    for shard in ds.shards:
        for item in shard["items"]:
            if item["key"] in ("corrupt", "truncated"):
                with open(ds.root / shard["path"], "rb") as f:
                    f.seek(item["offset"])
                    with pytest.raises(CorruptVideoError):
                        decode_clip(f.read(item["size"]), np.array([0.0, 0.5, 1.0]), backend=backend)


def test_clip_times_and_choose_start():
    assert np.allclose(clip_times(2.0, 8.0, 4, 0.25), [0.25, 0.375, 0.5, 0.625])
    with pytest.raises(ValueError):
        clip_times(1.0, 8.0, 8, 0.1)
    starts = [choose_start(3.0, 1.0, np.random.default_rng(s)) for s in range(50)]
    assert 0 <= min(starts) < 0.2 and 1.8 < max(starts) <= 2.0
    assert choose_start(1.0, 1.0, np.random.default_rng(0)) == 0.0
    with pytest.raises(ValueError):
        choose_start(0.5, 1.0, np.random.default_rng(0))
    # Snapped to the source's frame grid (25 fps): every start is a frame's start time, all of them reachable.
    snapped = [choose_start(2.0, 1.96, np.random.default_rng(s), frame_rate=25.0) for s in range(50)]
    assert set(snapped) <= {0.0, 0.04}
    frames = [choose_start(3.0, 1.0, np.random.default_rng(s), frame_rate=25.0) * 25 for s in range(200)]
    assert np.allclose(frames, np.round(frames)) and len(set(np.round(frames))) > 30


def test_resize_crop_covers_and_crops():
    frames = np.random.default_rng(0).integers(0, 256, (3, 64, 96, 3), dtype=np.uint8)  # (T, H, W, 3)
    out = resize_crop(frames, 64, 64)
    assert out.shape == (3, 3, 64, 64) and out.dtype == torch.float32
    assert torch.allclose(out, torch.from_numpy(frames[:, :, 16:80]).permute(3, 0, 1, 2) / 127.5 - 1, atol=1e-6)
    small = resize_crop(frames, 32, 32)  # halve, then crop the middle 32 of 48 columns
    assert small.shape == (3, 3, 32, 32) and -1 <= small.min() and small.max() <= 1
    up = resize_crop(frames[:, :32, :48], 64, 64)  # upscales when it must
    assert up.shape == (3, 3, 64, 64)
    crops = {tuple(resize_crop(frames, 64, 64, np.random.default_rng(s))[0, 0, 0, :4].tolist()) for s in range(8)}
    assert len(crops) > 1


# ---- the stream ----

def test_batches_shapes_frames_and_buckets(videos):
    s = VideoStream(videos["clean"], BUCKETS, 0, 1, seed=0, fps=FPS)
    assert s.stats["too_short"] == 1 and s.too_short_keys == ["short"]
    n = len(s)
    plan = s.planned_clips(0, 0, n)
    good = {key: meta for key, _, meta in videos["good"]}
    batches = take(s, n)
    assert s.epoch == 1 and n == s.batches_in_epoch(0)
    clips = 0
    for batch in batches:
        bucket = BUCKETS[batch["bucket"]]
        assert batch["video"].shape == (2, 3, 8, bucket.height, bucket.width)
        assert batch["video"].dtype == torch.float32 and batch["fps"] == FPS
        for video, key, caption in zip(batch["video"], batch["key"], batch["caption"]):
            meta = good[key]
            assert (meta["width"] > meta["height"]) == (bucket.width > bucket.height)  # aspect chose it
            assert caption in meta["captions"]
            _, pkey, _, _, times = plan[clips]
            clips += 1
            assert pkey == key
            centre = ((video[0, :, bucket.height // 2, bucket.width // 2] + 1) * 127.5).numpy()
            assert np.array_equal(frame_index(centre), np.floor(times * meta["fps"] + 1e-9).astype(int))
    assert "short" not in {k for b in batches for k in b["key"]}
    assert s.stats == {"seen": 2 * n, "skipped": 0, "too_short": 1}


def test_two_ranks_share_buckets_and_split_keys(videos):
    ranks = [VideoStream(videos["clean"], BUCKETS, r, 2, seed=3, fps=FPS, batch_multiple=2) for r in range(2)]
    for epoch in range(2):
        n = len(ranks[0])
        assert n > 0 and n % 2 == 0 and all(len(s) == n for s in ranks)
        a, b = take(ranks[0], n), take(ranks[1], n)
        assert [x["bucket"] for x in a] == [x["bucket"] for x in b]
        assert all(a[i]["bucket"] == a[i + 1]["bucket"] for i in range(0, n, 2))  # one bucket per step
        keys = [[k for x in batches for k in x["key"]] for batches in (a, b)]
        assert len(set(keys[0])) == len(keys[0]) and not set(keys[0]) & set(keys[1])
        assert all(s.epoch == epoch + 1 for s in ranks)


def test_captions_are_sampled_per_visit(videos):
    caps = ["a", "b", "c"]
    picks = [pick_caption(caps, 0, e, "k") for e in range(6)]
    assert sorted(picks[:3]) == caps and sorted(picks[3:]) == caps  # every caption once per 3 epochs
    assert picks == [pick_caption(caps, 0, e, "k") for e in range(6)]
    assert len({tuple(pick_caption(caps, 0, e, key) for e in range(3)) for key in "abcdefgh"}) > 1  # per key
    good = {key: meta["captions"] for key, _, meta in videos["good"]}
    s = VideoStream(videos["clean"], BUCKETS, 0, 1, seed=7, fps=FPS)
    for epoch in range(2):
        for batch in take(s, len(s)):
            for key, caption in zip(batch["key"], batch["caption"]):
                assert caption == pick_caption(good[key], 7, epoch, key)


@pytest.mark.parametrize("workers", [0, 2])
def test_resume_is_exact(videos, workers):
    a = VideoStream(videos["clean"], BUCKETS, 1, 2, seed=5, fps=FPS, num_workers=workers, random_crop=True)
    n = len(a)
    take(a, n - 1)  # the next batches cross into epoch 1
    state = json.loads(json.dumps(a.state_dict()))  # plain Python: survives JSON
    expected = take(a, 4)
    b = VideoStream(videos["clean"], BUCKETS, 1, 2, seed=5, fps=FPS, num_workers=workers, random_crop=True)
    b.load_state_dict(state)
    got = take(b, 4)
    assert all(same(x, y) for x, y in zip(expected, got))
    if workers:  # the same batches in the same order whether decoded in workers or in-process
        c = VideoStream(videos["clean"], BUCKETS, 1, 2, seed=5, fps=FPS, num_workers=0, random_crop=True)
        c.load_state_dict(state)
        assert all(same(x, y) for x, y in zip(expected, take(c, 4)))
    assert b.state_dict() == a.state_dict()


def test_uint8_output_is_the_same_pixels(videos):
    f, u = (VideoStream(videos["clean"], BUCKETS, 0, 1, seed=2, fps=FPS, num_workers=w, uint8=q)
            for w, q in ((0, False), (2, True)))
    for x, y in zip(take(f, 3), take(u, 3)):
        assert y["video"].dtype == torch.uint8 and x["key"] == y["key"]
        assert torch.equal(to_unit_range(y["video"]), x["video"])
        # uint8 clips cross the worker boundary frame-interleaved, as decoded (one straight copy per clip), and
        # leave to_unit_range in the contiguous layout the float path has.
        assert y["video"].permute(0, 2, 3, 4, 1).is_contiguous() and not y["video"].is_contiguous()
        assert to_unit_range(y["video"]).is_contiguous() and x["video"].is_contiguous()


def test_load_state_rejects_another_run(videos):
    s = VideoStream(videos["clean"], BUCKETS, 0, 1, seed=0, fps=FPS)
    state = s.state_dict()
    for key, value in (("world", 2), ("seed", 1)):
        with pytest.raises(ValueError, match=key):
            s.load_state_dict({**state, key: value})
    s.start_epoch(3)
    assert s.epoch == 3 and s.state_dict()["batch"] == 0


def _visit(stream, epochs):
    """Iterate whole epochs; returns (batches, warning messages)."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        batches = [b for _ in range(epochs) for b in take(stream, len(stream))]
    return batches, [str(w.message) for w in caught]


BROKEN = ("corrupt", "truncated", "liar")


def test_corrupt_clips_are_replaced_in_their_batch(videos):
    s = VideoStream(videos["dirty"], BUCKETS, 0, 1, seed=0, fps=FPS, max_skip_fraction=0.5)
    planned = [k for e in range(3) for _, k, *_ in s.planned_clips(e, 0, s.batches_in_epoch(e))]
    bad = [k for k in planned if k in BROKEN]
    assert set(bad) == set(BROKEN)  # the fixture puts each in some epoch's plan
    batches, messages = _visit(s, 3)
    assert s.stats["skipped"] == len(bad) and s.stats["seen"] == len(planned)
    for key in set(bad):
        assert any(f"{key!r}" in m and "shard-" in m for m in messages)
    assert all(b["video"].shape[0] == 2 and len(b["key"]) == 2 for b in batches)
    assert not {k for b in batches for k in b["key"]} & {*BROKEN, "short"}


def test_too_many_corrupt_clips_stop_the_run(videos):
    s = VideoStream(videos["dirty"], BUCKETS, 0, 1, seed=0, fps=FPS, max_skip_fraction=0.0)
    with pytest.raises(RuntimeError, match="max_skip_fraction"):
        _visit(s, 3)
    assert s.stats["seen"] >= 20


def test_a_batch_with_no_good_clip_raises(videos):
    s = VideoStream(videos["bad"], parse_buckets(["64x64x8:2"]), 0, 1, seed=0, fps=FPS)
    with pytest.raises(RuntimeError, match="every clip"):
        next(s)


@pytest.mark.skipif(not DECORD_AVAILABLE, reason="the raw baseline is decord")
def test_loader_benchmark_cli(videos):
    out = subprocess.run([sys.executable, str(REPO / "launch" / "bench_video_loader.py"), "--data",
                          str(videos["clean"]), "--workers", "0", "--batches", "2", "--repeats", "1",
                          "--buckets", "64x64x8:2", "64x96x8:2"], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert re.search(r"raw decord: [\d.]+ frames/s .* ratio [\d.]+ \(target >= 0.9\)", out.stdout)
