"""The video data tools: the shapes generator, video probing, and folder-of-videos -> shards."""

import io
import json
import re
import subprocess
import sys
import tarfile
from pathlib import Path

import av
import decord
import numpy as np
import pytest
from make_shapes_dataset import LABELS, encode_mp4, generate_split, make_sample, render_clip
from video_probe import ProbeError, probe_video
from video_shards import build_video_shards, find_videos, make_keys, read_captions, write_samples

REPO = Path(__file__).resolve().parents[2]
TEMPLATE = re.compile(r"^a (red|green|blue|yellow) (circle|square|triangle) moves (left|right|up|down)$")


def _clip(seed: int, frames: int = 9, label: tuple[str, str, str] = ("red", "circle", "left")) -> bytes:
    colour, shape, direction = label
    return encode_mp4(render_clip(shape, colour, direction, 32, frames, np.random.default_rng(seed)), fps=8)


def _read_span(shard: Path, offset: int, size: int) -> bytes:
    with shard.open("rb") as fh:
        fh.seek(offset)
        return fh.read(size)


def _mkv_with_audio(frames: np.ndarray, fps: int) -> bytes:
    """A Matroska file (no frame count in its header) with an AAC track, to exercise the other probe paths."""
    buf = io.BytesIO()
    with av.open(buf, mode="w", format="matroska") as c:
        video, audio = c.add_stream("libx264", rate=fps), c.add_stream("aac", rate=16000)
        video.width, video.height, video.pix_fmt = frames.shape[2], frames.shape[1], "yuv420p"
        for f in frames:
            c.mux(video.encode(av.VideoFrame.from_ndarray(f, format="rgb24")))
        c.mux(video.encode())
        silence = np.zeros((1, 16000 * len(frames) // fps), np.float32)
        samples = av.AudioFrame.from_ndarray(silence, format="fltp", layout="mono")
        samples.sample_rate, samples.pts = 16000, 0
        c.mux(audio.encode(samples))
        c.mux(audio.encode())
    return buf.getvalue()


def test_render_clip_moves_the_shape_inside_the_frame():
    clip = render_clip("square", "green", "down", 48, 5, np.random.default_rng(0))
    assert clip.shape == (5, 48, 48, 3) and clip.dtype == np.uint8
    green = (clip[..., 1] > 150) & (clip[..., 0] < 100)
    rows = [np.nonzero(g.any(axis=1))[0] for g in green]
    assert all(len(r) > 0 and r.min() > 0 and r.max() < 47 for r in rows)  # never touches the border
    centres = [r.mean() for r in rows]
    assert np.all(np.diff(centres) > 0) and 20 <= centres[-1] - centres[0] <= 28  # ~half the frame, downwards
    with pytest.raises(ValueError, match="hexagon"):
        render_clip("hexagon", "red", "left", 32, 5, np.random.default_rng(0))


def test_generated_clip_is_deterministic_and_decodes_with_pyav_and_decord():
    key, video, meta = make_sample(3, "train", ("blue", "triangle", "up"), seed=5, size=64, frames=17, fps=8)
    assert make_sample(3, "train", ("blue", "triangle", "up"), seed=5, size=64, frames=17, fps=8)[1] == video
    assert make_sample(3, "train", ("blue", "triangle", "up"), seed=6, size=64, frames=17, fps=8)[1] != video
    assert key == "train_000003" and meta["captions"][0] == "a blue triangle moves up"
    assert meta["captions"][1] == "a blue triangle moving up across a grey background"
    with av.open(io.BytesIO(video)) as c:
        stream = c.streams.video[0]
        assert stream.codec_context.name == "h264" and stream.average_rate == 8
        frames = [f.to_ndarray(format="rgb24") for f in c.decode(video=0)]
    assert len(frames) == 17 and frames[0].shape == (64, 64, 3)
    vr = decord.VideoReader(io.BytesIO(video))
    assert len(vr) == 17 and vr[0].shape == (64, 64, 3) and vr.get_avg_fps() == pytest.approx(8)
    fields = ("fps", "frames", "width", "height", "duration", "has_audio")
    assert probe_video(video) == {k: meta[k] for k in fields}


def test_generate_split_writes_indexed_shards_independent_of_workers(tmp_path):
    index = generate_split(tmp_path / "a", "val", 20, seed=1, size=32, frames=9, workers=2, progress=False)
    generate_split(tmp_path / "b", "val", 20, seed=1, size=32, frames=9, workers=1, progress=False)
    assert index == json.loads((tmp_path / "a" / "index.json").read_text())
    # ceil(20 / 8) = 3 clips a shard: at least 8 shards unless there are too few clips.
    assert index["format"] == "video-v1" and len(index["shards"]) == 7
    seen_labels = set()
    for shard in index["shards"]:
        path = tmp_path / "a" / shard["path"]
        assert path.read_bytes() == (tmp_path / "b" / shard["path"]).read_bytes()
        assert shard["bytes"] == path.stat().st_size and shard["samples"] == len(shard["items"])
        with tarfile.open(path) as tar:
            files = {m.name: tar.extractfile(m).read() for m in tar}
        for item in shard["items"]:
            key = item["key"]
            assert _read_span(path, item["offset"], item["size"]) == files[f"{key}.mp4"]
            assert _read_span(path, item["json_offset"], item["json_size"]) == files[f"{key}.json"]
            meta = json.loads(files[f"{key}.json"])
            caption = files[f"{key}.txt"].decode()
            assert TEMPLATE.match(caption) and meta["captions"][0] == caption
            assert len(meta["captions"]) == 2 and meta["source"] == "generated" and meta["has_audio"] is False
            assert {k: item[k] for k in ("fps", "frames", "width", "height", "duration")} == {
                "fps": 8.0, "frames": 9, "width": 32, "height": 32, "duration": 9 / 8}
            seen_labels.add(TEMPLATE.match(meta["captions"][0]).groups())
    assert len(seen_labels) == 20  # labels cycle through the 48 combinations before repeating
    assert {tuple(lab) for lab in seen_labels} <= {(c, s, d) for c, s, d in LABELS}


def test_make_shapes_dataset_cli(tmp_path):
    out = tmp_path / "shapes"
    args = ["--out", str(out), "--num", "10", "--val", "3", "--size", "32", "--frames", "5", "--workers", "1"]
    subprocess.run([sys.executable, "data/make_shapes_dataset.py", *args], cwd=REPO, check=True,
                   capture_output=True, timeout=120)
    train, val = (json.loads((out / s / "index.json").read_text()) for s in ("train", "val"))
    keys = [i["key"] for s in train["shards"] for i in s["items"]]
    assert keys == [f"train_{i:06d}" for i in range(10)]
    assert [i["key"] for s in val["shards"] for i in s["items"]] == ["val_000000", "val_000001", "val_000002"]


def test_probe_reports_bad_files_and_reads_other_containers(tmp_path):
    frames = render_clip("circle", "yellow", "right", 32, 10, np.random.default_rng(0))
    assert probe_video(_mkv_with_audio(frames, fps=10)) == {
        "fps": 10.0, "frames": 10, "width": 32, "height": 32, "duration": 1.0, "has_audio": True}
    with pytest.raises(ProbeError, match="Invalid data"):
        probe_video(np.random.default_rng(0).bytes(4000))
    with pytest.raises(ProbeError):
        probe_video(tmp_path / "missing.mp4")


def test_make_keys_are_unique_and_dot_free():
    keys = make_keys(["a/b.mp4", "a_b.mp4", "a/b_mp4", "c.d.mov"])
    assert keys == ["a_b_mp4", "a_b_mp4_2", "a_b_mp4_3", "c_d_mov"]


def _audio_only_mp4() -> bytes:
    buf = io.BytesIO()
    with av.open(buf, mode="w", format="mp4") as c:
        audio = c.add_stream("aac", rate=16000)
        samples = av.AudioFrame.from_ndarray(np.zeros((1, 16000), np.float32), format="fltp", layout="mono")
        samples.sample_rate, samples.pts = 16000, 0
        c.mux(audio.encode(samples))
        c.mux(audio.encode())
    return buf.getvalue()


def _folder(tmp_path: Path) -> Path:
    """3 good captioned videos; a corrupt, a truncated and an audio-only one; one without captions."""
    root = tmp_path / "videos"
    (root / "sub").mkdir(parents=True)
    good = {"a.mp4": ["first caption", "second caption"], "sub/b.mov": ["b caption"],
            "sub/c.mp4": ["c caption"]}
    for i, (name, caps) in enumerate(good.items()):
        (root / name).write_bytes(_clip(i))
        (root / name).with_suffix(".txt").write_text("\n".join(caps) + "\n\n")
    (root / "corrupt.mp4").write_bytes(np.random.default_rng(0).bytes(3000))
    (root / "corrupt.txt").write_text("never used\n")
    clip = _clip(9)
    (root / "truncated.mp4").write_bytes(clip[: len(clip) // 2])
    (root / "truncated.txt").write_text("cut in half\n")
    (root / "sub" / "sound.mp4").write_bytes(_audio_only_mp4())
    (root / "sub" / "sound.txt").write_text("only sound\n")
    (root / "uncaptioned.webm").write_bytes(_clip(10))
    (root / "notes.md").write_text("not a video")
    return root


def test_video_shards_cli_keeps_good_videos_and_reports_bad_ones(tmp_path):
    root = _folder(tmp_path)
    out = tmp_path / "shards"
    args = ["--input", str(root), "--out", str(out), "--workers", "2", "--license", "CC-BY-4.0"]
    run = subprocess.run([sys.executable, "data/video_shards.py", *args], cwd=REPO, capture_output=True,
                         text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    # x264 writes the moov atom last, so a file cut in half has no header left: PyAV cannot open it.
    assert "skipped corrupt.mp4: Invalid data" in run.stderr and "skipped truncated.mp4:" in run.stderr
    assert "skipped sub/sound.mp4: no video stream" in run.stderr
    assert "skipped uncaptioned.webm: no caption" in run.stderr
    assert "skipped notes.md: not a video (Invalid data" in run.stderr  # other suffixes are probed, then reported
    assert "3 videos in 1 shards; left out 3 unreadable, 1 without captions, 1 not videos" in run.stderr
    assert "wrote 3 of 7 videos" in run.stdout
    index = json.loads((out / "index.json").read_text())
    items = index["shards"][0]["items"]
    assert [i["key"] for i in items] == ["a_mp4", "sub_b_mov", "sub_c_mp4"]
    shard = out / index["shards"][0]["path"]
    with tarfile.open(shard) as tar:
        files = {m.name: tar.extractfile(m).read() for m in tar}
    keys = ("a_mp4", "sub_b_mov", "sub_c_mp4")
    assert sorted(files) == [f"{k}.{e}" for k in keys for e in ("json", "mp4", "txt")]
    for item, name in zip(items, ["a.mp4", "sub/b.mov", "sub/c.mp4"]):
        original = (root / name).read_bytes()
        assert files[f"{item['key']}.mp4"] == original == _read_span(shard, item["offset"], item["size"])
        meta = json.loads(files[f"{item['key']}.json"])
        assert meta["source"] == name and meta["license"] == "CC-BY-4.0"
        assert meta["frames"] == item["frames"] == 9
        assert files[f"{item['key']}.txt"].decode() == meta["captions"][0]
    assert json.loads(files["a_mp4.json"])["captions"] == ["first caption", "second caption"]


def test_caption_files_csv_and_jsonl(tmp_path):
    root = _folder(tmp_path)
    videos = find_videos(root)
    assert [v.relative_to(root).as_posix() for v in videos] == [
        "a.mp4", "corrupt.mp4", "sub/b.mov", "sub/c.mp4", "sub/sound.mp4", "truncated.mp4",
        "uncaptioned.webm"]
    csv = tmp_path / "caps.csv"
    csv.write_text('path,caption\nuncaptioned.webm,"one, with comma"\n./uncaptioned.webm,two\na.mp4,csv a\n'
                   "missing.mp4,nobody\n")
    caps = read_captions(root, videos, csv)
    assert caps[root / "uncaptioned.webm"] == ["one, with comma", "two"]  # repeated rows -> several captions
    assert caps[root / "a.mp4"] == ["csv a"]  # the captions file wins over the sidecar
    assert caps[root / "sub" / "b.mov"] == ["b caption"]  # not listed: the sidecar fills in
    jsonl = tmp_path / "caps.jsonl"
    jsonl.write_text('{"path": "uncaptioned.webm", "captions": ["x", " ", "y"]}\n\n{"path": "sub/c.mp4", '
                     '"caption": "json c"}\n')
    caps = read_captions(root, videos, jsonl)
    assert caps[root / "uncaptioned.webm"] == ["x", "y"] and caps[root / "sub" / "c.mp4"] == ["json c"]
    index = build_video_shards([(v, caps[v]) for v in videos], tmp_path / "out", shard_bytes=1,
                               progress=False, root=root)
    # shard_bytes=1: every sample opens its own shard; the formerly uncaptioned video now lands.
    keys = [s["items"][0]["key"] for s in index["shards"]]
    assert keys == ["a_mp4", "sub_b_mov", "sub_c_mp4", "uncaptioned_webm"]
    (tmp_path / "bad.csv").write_text("file,text\na.mp4,x\n")
    with pytest.raises(ValueError, match="'path' and 'caption'"):
        read_captions(root, videos, tmp_path / "bad.csv")
    (tmp_path / "bad.jsonl").write_text('{"path": "a.mp4", "caption": 3}\n')
    with pytest.raises(ValueError, match=r"bad.jsonl:1"):
        read_captions(root, videos, tmp_path / "bad.jsonl")


def test_write_samples_rolls_over_and_rejects_bad_samples(tmp_path):
    meta = {"fps": 8.0, "frames": 9, "width": 32, "height": 32, "duration": 1.125, "has_audio": False,
            "source": "generated", "license": "CC0-1.0", "captions": ["c"]}
    videos = [_clip(i) for i in range(5)]
    # Each sample costs its bytes plus ~2.5 KB of tar headers and padding: two fit, three do not.
    shard_bytes = 2 * (max(map(len, videos)) + 4096)
    index = write_samples([(f"k{i}", v, meta) for i, v in enumerate(videos)], tmp_path, shard_bytes)
    assert [s["samples"] for s in index["shards"]] == [2, 2, 1]
    for shard in index["shards"]:
        for item in shard["items"]:
            data = _read_span(tmp_path / shard["path"], item["offset"], item["size"])
            assert data == videos[int(item["key"][1:])]
    with pytest.raises(ValueError, match="'a.b'"):
        write_samples([("a.b", videos[0], meta)], tmp_path, 1 << 20)
    with pytest.raises(ValueError, match="duplicate sample key 'k'"):
        write_samples([("k", videos[0], meta), ("k", videos[1], meta)], tmp_path, 1 << 20)
    with pytest.raises(ValueError, match="captions"):
        write_samples([("k", videos[0], {**meta, "captions": []})], tmp_path, 1 << 20)
    assert not (tmp_path / "index.json").exists()  # a failed write leaves no index behind
