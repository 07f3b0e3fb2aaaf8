"""The video-loader benchmark on generated clips (one ratio row per size), and the loader's zero-copy decord path:
the same pixels as decord's own copy, batch for batch, with and without a resize."""

import io
import re
import subprocess
import sys
from itertools import islice
from pathlib import Path

import numpy as np
import pytest
import torch

from framework.data.buckets import parse_buckets
from framework.data.video import VideoStream
from framework.data.video_decode import DECORD_AVAILABLE, _frame_for, _slack, decode_clip, resize_crop

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "launch"))
from bench_video_loader import generate, parse_size  # noqa: E402

pytestmark = pytest.mark.skipif(not DECORD_AVAILABLE, reason="the raw baseline and the zero-copy path are decord's")


@pytest.fixture(scope="module")
def clips(tmp_path_factory):
    """8 generated H.264 clips of 48x64 (3 s at 24 fps) in 4 shards."""
    return generate(tmp_path_factory.mktemp("gen") / "48x64", 48, 64, clips=8, workers=1)


def test_benchmark_generates_clips_and_prints_a_ratio_row_per_size(tmp_path):
    out = subprocess.run([sys.executable, str(REPO / "launch" / "benchmark.py"), "video-loader", "--generate",
                          "32x64", "48x96", "--clips", "4", "--frames", "4", "--workers", "1", "--repeats", "1",
                          "--uint8", "--out", str(tmp_path)], capture_output=True, text=True, timeout=180, cwd=REPO)
    assert out.returncode == 0, out.stderr[-2000:]
    for size in ("32x64", "48x96"):
        assert (tmp_path / size / "index.json").exists()
        row = re.search(rf"^{size}\s+{size}x4:2\s+([\d.]+)\s+([\d.]+)\s+([\d.]+)\s+([\d.]+)$", out.stdout, re.M)
        assert row, out.stdout
        loader_fps, raw_fps, ratio, _ = map(float, row.groups())
        assert loader_fps > 0 and raw_fps > 0 and ratio == pytest.approx(loader_fps / raw_fps, rel=0.01)
    with pytest.raises(ValueError, match="HEIGHTxWIDTH"):
        parse_size("480")


def _decord_copy(data: bytes, times: np.ndarray) -> np.ndarray:
    """Frames as decord's asnumpy() copies them, at the frames decode_clip picks (the path before the view)."""
    import decord

    reader = decord.VideoReader(io.BytesIO(data), num_threads=1)
    stamps = np.asarray(reader.get_frame_timestamp(range(len(reader))), np.float64)
    idx = _frame_for(times, stamps[:, 0], float(stamps[-1, 1]), _slack(times, float32_stamps=True))
    return reader.get_batch(idx.tolist()).asnumpy()


def _clip_bytes(clip) -> bytes:
    path, _, offset, size, _ = clip
    with open(path, "rb") as f:
        f.seek(offset)
        return f.read(size)


def test_decode_clip_views_decords_buffer_and_it_stays_valid(clips):
    stream = VideoStream(clips, parse_buckets(["48x64x16:2"]), 0, 1, seed=0, fps=8)
    planned = stream.planned_clips(0, 0, 2)
    views = [decode_clip(_clip_bytes(c), c[4]) for c in planned]
    assert all(not v.flags.owndata for v in views)  # no copy of the clip (asnumpy() made one)
    # Decoded later than every view, after their readers are gone: the buffers must still be theirs.
    for view, clip in zip(views, planned):
        assert np.array_equal(view, _decord_copy(_clip_bytes(clip), clip[4]))


@pytest.mark.parametrize("bucket", ["48x64x16:2", "24x24x8:2"])  # the source size, and resized + cropped
def test_loader_batches_equal_decords_copied_frames(clips, bucket):
    buckets = parse_buckets([bucket])
    b = buckets[0]
    stream = VideoStream(clips, buckets, 0, 1, seed=0, fps=8, num_workers=1, uint8=True)
    planned = stream.planned_clips(0, 0, len(stream))
    batches = list(islice(stream, len(planned) // b.batch_size))
    assert [k for batch in batches for k in batch["key"]] == [c[1] for c in planned]
    for n, batch in enumerate(batches):
        for k in range(b.batch_size):
            clip = planned[n * b.batch_size + k]
            want = resize_crop(_decord_copy(_clip_bytes(clip), clip[4]), b.height, b.width,
                               out=torch.empty(3, b.frames, b.height, b.width, dtype=torch.uint8))
            assert torch.equal(batch["video"][k], want), (bucket, clip[1])
