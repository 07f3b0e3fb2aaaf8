"""A bad clip never stops a run: when every clip of a batch fails (batch size 1: one bad file), VideoStream
draws replacement clips deterministically, counts the skips, and stops only when the skip fraction exceeds
max_skip_fraction, or with a clear error when no readable clip is left. Real H.264 files and real corrupt
bytes, written here."""

import io
import json
import warnings
from fractions import Fraction
from itertools import islice

import av
import numpy as np
import pytest
import torch
from video_shards import write_samples

from framework.data.buckets import parse_buckets
from framework.data.video import VideoStream, max_draws

FPS, SIZE, FRAMES = 8, 64, 8  # 1 s clips
ONE, TWO = parse_buckets(["64x64x8:1"]), parse_buckets(["64x64x8:2"])


def grey(i: int) -> int:
    return 16 + 9 * i  # clip i's grey level: names the clip in its loaded pixels (up to 24 clips)


def clip_bytes(i: int) -> bytes:
    """A real 1 s H.264 mp4 whose every frame is grey(i)."""
    buf = io.BytesIO()
    with av.open(buf, "w", format="mp4") as out:
        stream = out.add_stream("libx264", rate=FPS)
        stream.width, stream.height, stream.pix_fmt = SIZE, SIZE, "yuv420p"
        for f in range(FRAMES):
            frame = av.VideoFrame.from_ndarray(np.full((SIZE, SIZE, 3), grey(i), np.uint8), format="rgb24")
            frame.pts, frame.time_base = f, Fraction(1, FPS)
            out.mux(stream.encode(frame))
        out.mux(stream.encode())
    return buf.getvalue()


def meta(key: str) -> dict:
    return {"fps": float(FPS), "frames": FRAMES, "width": SIZE, "height": SIZE, "duration": FRAMES / FPS,
            "has_audio": False, "source": key, "license": "test", "captions": [f"{key} caption"]}


def dataset(out, good: list[int], bad: list[int], per_shard: int = 3):
    """Shards of clips "goodI" (real, grey(I)) and "badI" (noise: the index promises a video, the bytes are not
    one), interleaved in key order."""
    noise = np.random.default_rng(0).integers(0, 256, 4000, dtype=np.uint8).tobytes()
    samples = sorted([(f"good{i:02d}", clip_bytes(i), meta(f"good{i:02d}")) for i in good]
                     + [(f"bad{i:02d}", noise[i:], meta(f"bad{i:02d}")) for i in bad], key=lambda s: s[0][-2:])
    write_samples(samples, out, shard_bytes=1 << 30, shard_samples=per_shard)
    return out


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("faults")
    return {"some": dataset(tmp / "some", good=list(range(0, 12, 3)) + [1, 4], bad=[2, 5, 7, 8, 10, 11]),
            "most": dataset(tmp / "most", good=[0, 9], bad=[i for i in range(12) if i not in (0, 9)]),
            "none": dataset(tmp / "none", good=[], bad=list(range(6))),
            "wide": dataset(tmp / "wide", good=[], bad=list(range(24)), per_shard=6)}


def visit(stream, epochs: int) -> tuple[list[dict], list[str]]:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        batches = list(islice(stream, sum(stream.batches_in_epoch(stream.epoch + e) for e in range(epochs))))
    return batches, [str(w.message) for w in caught]


def check_pixels(batch: dict) -> None:
    """Every slot holds real frames of the clip its key names (not a failed clip's leftovers)."""
    for video, key in zip(batch["video"], batch["key"]):
        assert key.startswith("good"), key
        level = float((video[:, :, SIZE // 2, SIZE // 2].mean() + 1) * 127.5)
        assert abs(level - grey(int(key[-2:]))) < 3, (key, level)


@pytest.mark.parametrize("name,buckets", [("some", ONE), ("some", TWO), ("most", ONE), ("most", TWO)])
def test_failed_batches_draw_replacements_and_count_them(data, name, buckets):
    s = VideoStream(data[name], buckets, 0, 1, seed=1, fps=FPS, max_skip_fraction=0.95)
    plans = [s.planned_clips(e, 0, s.batches_in_epoch(e)) for e in range(3)]
    size = buckets[0].batch_size
    planned = [[key for _, key, *_ in p[b:b + size]] for p in plans for b in range(0, len(p), size)]
    assert any(all(k.startswith("bad") for k in keys) for keys in planned)  # some batch has no good clip
    batches, messages = visit(s, 3)
    assert len(batches) == len(planned) and all(b["video"].shape[0] == size for b in batches)
    for b in batches:
        check_pixels(b)
    bad_planned = sum(k.startswith("bad") for keys in planned for k in keys)
    hopeless = sum(all(k.startswith("bad") for k in keys) for keys in planned)  # batches that had to draw
    drawn = s.stats["seen"] - sum(len(keys) for keys in planned)  # seen: the planned clips and the draws
    assert drawn >= hopeless
    assert s.stats["skipped"] == bad_planned + drawn - hopeless  # every draw failed but each batch's last
    assert len([m for m in messages if "skipping video 'bad" in m]) == s.stats["skipped"]


def test_draws_resume_exactly_with_and_without_workers(data):
    kw = dict(seed=2, fps=FPS, max_skip_fraction=0.95, random_crop=True)
    a = VideoStream(data["most"], ONE, 0, 1, **kw)
    visit(a, 1)
    next(a)
    state = json.loads(json.dumps(a.state_dict()))
    expected, _ = visit(a, 1)
    for workers in (0, 2):
        b = VideoStream(data["most"], ONE, 0, 1, num_workers=workers, **kw)
        b.load_state_dict(state)
        got, _ = visit(b, 1)
        assert [x["key"] for x in got] == [x["key"] for x in expected]
        assert all(torch.equal(x["video"], y["video"]) for x, y in zip(got, expected))
        assert b.state_dict() == a.state_dict()


def test_two_ranks_stay_in_step_and_draw_their_own_clips(data):
    ranks = [VideoStream(data["some"], ONE, r, 2, seed=3, fps=FPS, max_skip_fraction=0.95) for r in range(2)]
    for epoch in range(2):
        n = len(ranks[0])
        assert all(len(s) == n for s in ranks)
        mine = [{k for _, k, *_ in s.planned_clips(epoch, 0, n)} for s in ranks]
        got = [visit(s, 1)[0] for s in ranks]
        assert [len(g) for g in got] == [n, n]
        for r in range(2):
            keys = {k for b in got[r] for k in b["key"]}
            assert keys <= mine[r] and all(k.startswith("good") for k in keys)  # drawn from this rank's clips
        assert all(s.epoch == epoch + 1 for s in ranks)


def test_too_many_failures_stop_the_run_by_the_fraction(data):
    s = VideoStream(data["most"], ONE, 0, 1, seed=1, fps=FPS, max_skip_fraction=0.3)
    with pytest.raises(RuntimeError, match=r"clips failed to load, more than max_skip_fraction=0.3"):
        visit(s, 10)
    assert s.stats["seen"] >= 20


def test_no_readable_clip_is_a_clear_error(data):
    s = VideoStream(data["none"], ONE, 0, 1, seed=0, fps=FPS, max_skip_fraction=1.0)
    with pytest.raises(RuntimeError, match=r"bucket 64x64x8:1 failed to load.*all 5 other clips.*none is readable"):
        visit(s, 1)
    assert s.stats["skipped"] == s.stats["seen"] == 6
    # 23 candidates: the draws stop after max_draws(0.05) = 16, without trying them all.
    s = VideoStream(data["wide"], ONE, 0, 1, seed=0, fps=FPS, max_skip_fraction=0.05)
    with pytest.raises(RuntimeError, match=r"the 16 clips drawn to replace them: that many failures in a row"):
        visit(s, 1)
    assert s.stats["seen"] == s.stats["skipped"] == 17
    assert max_draws(0.05) == 16 and max_draws(0.5) == 30 and max_draws(1.0) is None
