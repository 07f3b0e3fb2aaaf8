"""data/video_shards.py on real media: other containers and suffixes are kept, truncated files are rejected,
and the summary names and counts everything left out."""

import json
import subprocess
import sys
from pathlib import Path

import av
import numpy as np
from video_probe import ProbeError, probe_video

from tests.media import make_video

REPO = Path(__file__).resolve().parents[2]


def test_probe_rejects_a_truncated_file_that_keeps_its_full_header():
    # moov first (as streaming sites write mp4): the first 30% still opens and claims all 16 s.
    video = make_video("mp4", 400, fps=25, faststart=True)
    assert probe_video(video)["duration"] == 16.0
    for cut in (0.3, 0.9):
        try:
            meta = probe_video(video[: int(len(video) * cut)])
        except ProbeError as e:
            assert str(e).startswith("truncated or damaged: the header says 16.00s but frames decode only to")
        else:
            raise AssertionError(f"accepted the first {cut:.0%} of the file as {meta}")


def test_probe_measures_headerless_containers_by_their_frames():
    # MPEG-PS has no length in its header (FFmpeg guesses one from the bitrate); the frames say 16 s.
    meta = probe_video(make_video("mpeg", 400, fps=25, bframes=2))
    assert meta["frames"] == 400 and abs(meta["duration"] - 16.0) <= 0.04 + 1e-9


def _png() -> bytes:
    """An 8x8 PNG: FFmpeg opens it as a one-frame video stream."""
    ctx = av.CodecContext.create("png", "w")
    ctx.width, ctx.height, ctx.pix_fmt = 8, 8, "rgb24"
    frame = av.VideoFrame.from_ndarray(np.zeros((8, 8, 3), np.uint8), format="rgb24")
    return b"".join(bytes(p) for p in [*ctx.encode(frame), *ctx.encode(None)])


def test_cli_keeps_every_container_and_reports_every_file_left_out(tmp_path):
    root = tmp_path / "in"
    root.mkdir()
    good = {"a.mpg": make_video("mpeg", 30), "b.ts": make_video("ts", 30), "c.m4v": make_video("m4v", 30),
            "d.vob": make_video("vob", 30), "e.mkv": make_video("mkv", 30, bframes=2),
            "f.avi": make_video("avi", 30, bframes=2), "g.video": make_video("mp4", 30)}
    for name, data in good.items():
        (root / name).write_bytes(data)
    cut = make_video("mp4", 400, fps=25, faststart=True)
    bad = {"cut.mp4": cut[: len(cut) * 3 // 10], "still.png": _png(), "notes.pdf": b"%PDF-1.4 not a video"}
    for name, data in bad.items():
        (root / name).write_bytes(data)
    for name in [*good, *bad]:
        (root / name).with_suffix(".txt").write_text(f"caption of {name}\n")
    out = tmp_path / "out"
    run = subprocess.run([sys.executable, "data/video_shards.py", "--input", str(root), "--out", str(out)],
                         cwd=REPO, capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    skipped = sorted(line for line in run.stderr.splitlines() if line.startswith("skipped "))
    assert len(skipped) == 3, run.stderr
    assert skipped[0].startswith("skipped cut.mp4: truncated or damaged: the header says 16.00s but frames")
    assert skipped[1].startswith("skipped notes.pdf: not a video (")
    assert skipped[2] == "skipped still.png: a still image, not a video (1 frame)"
    assert "7 videos in 1 shards; left out 1 unreadable, 0 without captions, 2 not videos" in run.stderr
    assert "wrote 7 of 8 videos" in run.stdout  # cut.mp4 is a video, if a broken one
    items = json.loads((out / "index.json").read_text())["shards"][0]["items"]
    assert [i["key"] for i in items] == ["a_mpg", "b_ts", "c_m4v", "d_vob", "e_mkv", "f_avi", "g_video"]
    assert all(i["frames"] == 30 and abs(i["duration"] - 30 / 25) <= 0.04 + 1e-9 for i in items), items
