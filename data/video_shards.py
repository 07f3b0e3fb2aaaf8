"""Folder of videos + captions -> webdataset shards of KEY.mp4/.txt/.json plus an index.json with offsets."""

from __future__ import annotations

import argparse
import csv
import json
import os
import re
import sys
import tarfile
from collections.abc import Iterable, Iterator
from multiprocessing import Pool
from pathlib import Path

import webdataset as wds
from tqdm import tqdm
from video_probe import probe_video

FORMAT = "video-v1"
# Files with these suffixes are videos (unreadable ones are reported); any other file is probed too, and kept
# when PyAV finds a video of 2+ frames in it, else reported as "not a video".
VIDEO_SUFFIXES = (".mp4", ".mov", ".mkv", ".webm", ".avi", ".m4v", ".mpg", ".mpeg", ".m2v", ".ts", ".m2ts", ".mts",
                  ".vob", ".3gp", ".flv", ".wmv", ".asf", ".ogv", ".mxf", ".dv", ".y4m")
_NOT_MEDIA = (".txt", ".csv", ".jsonl", ".json")  # caption files: never probed, never reported
META_FIELDS = ("fps", "frames", "width", "height", "duration", "has_audio")
_KEY = re.compile(r"^[^./]+$")  # webdataset splits a member name at its first dot, and "/" makes a folder

Sample = tuple[str, bytes, dict]  # (key, original video bytes, KEY.json contents)
# A sample may carry a 4th element (suffix, bytes): a separate audio track written as KEY.flac or KEY.wav,
# whose first sample plays with the first video frame (framework/data/audio_decode.py).
AUDIO_SUFFIXES = ("flac", "wav")


class _ShardWriter:
    """Rolls over to a new shard-NNNNNN.tar before a sample would push the current one past shard_bytes."""

    def __init__(self, out_dir: Path, shard_bytes: int) -> None:
        self.out_dir, self.shard_bytes = out_dir, shard_bytes
        self.shards: list[dict] = []
        self.writer: wds.TarWriter | None = None
        self.size = 0

    def write(self, key: str, files: dict[str, bytes]) -> None:
        # Each tar member costs a 512-byte header plus padding to 512 bytes; close enough to the file size.
        nbytes = sum(512 + -(-len(v) // 512) * 512 for v in files.values())
        if self.writer is not None and self.size + nbytes > self.shard_bytes:
            self.close()
        if self.writer is None:
            name = f"shard-{len(self.shards):06d}.tar"
            # mtime=0 and fixed owner make the tar bytes a pure function of the input.
            self.writer = wds.TarWriter(str(self.out_dir / name), mtime=0, user="", group="", encoder=False)
            self.shards.append({"path": name, "samples": 0})
            self.size = 0
        self.writer.write({"__key__": key, **files})
        self.shards[-1]["samples"] += 1
        self.size += nbytes

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
            self.writer = None


def _check_sample(key: str, meta: dict, seen: set[str]) -> None:
    if not _KEY.match(key):
        raise ValueError(f"sample key {key!r} must be non-empty without '.' or '/'")
    if key in seen:
        raise ValueError(f"duplicate sample key {key!r}")
    missing = [f for f in (*META_FIELDS, "source", "license", "captions") if f not in meta]
    if missing:
        raise ValueError(f"sample {key!r}: metadata lacks {missing}")
    caps = meta["captions"]
    if not (isinstance(caps, list) and caps and all(isinstance(c, str) for c in caps)):
        raise ValueError(f"sample {key!r}: 'captions' must be a non-empty list of strings, got {caps!r}")


def _member_spans(tar_path: Path) -> dict[str, tuple[int, int]]:
    """Member name -> (offset of its data, its size), read back from the finished tar."""
    with tarfile.open(tar_path, mode="r:") as tar:
        return {m.name: (m.offset_data, m.size) for m in tar if m.isfile()}


def write_samples(samples: Iterable[Sample], out_dir: str | Path, shard_bytes: int,
                  shard_samples: int | None = None) -> dict:
    """Write (key, mp4 bytes, meta[, (suffix, audio bytes)]) samples as out_dir/shard-*.tar plus
    out_dir/index.json; returns the index.

    A shard closes before it would exceed shard_bytes, or once it holds shard_samples samples.
    """
    if shard_bytes <= 0 or (shard_samples is not None and shard_samples <= 0):
        raise ValueError(f"shard_bytes, shard_samples must be positive, got {shard_bytes}, {shard_samples}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    # index.json marks a complete output: remove it first so an interrupted run is never mistaken for one.
    for stale in [out / "index.json", *out.glob("shard-*.tar")]:
        stale.unlink(missing_ok=True)
    writer, seen, items = _ShardWriter(out, shard_bytes), set(), []  # items: index entries per shard
    for key, video, meta, *audio in samples:
        _check_sample(key, meta, seen)
        seen.add(key)
        files = {"mp4": video, "txt": meta["captions"][0].encode("utf-8"),
                 "json": json.dumps(meta, ensure_ascii=False, sort_keys=True).encode("utf-8")}
        if audio:
            if len(audio) != 1 or audio[0][0] not in AUDIO_SUFFIXES:
                raise ValueError(f"sample {key!r}: a 4th element must be (suffix, bytes) with a suffix in "
                                 f"{AUDIO_SUFFIXES}")
            files[audio[0][0]] = audio[0][1]
        writer.write(key, files)
        if len(items) < len(writer.shards):
            items.append([])
        items[-1].append({"key": key, **{f: meta[f] for f in META_FIELDS}})
        if shard_samples is not None and writer.shards[-1]["samples"] >= shard_samples:
            writer.close()
    writer.close()
    if not writer.shards:
        raise ValueError(f"no samples to write into {out}")
    for shard, shard_items in zip(writer.shards, items):
        path = out / shard["path"]
        spans = _member_spans(path)
        shard["bytes"] = path.stat().st_size
        # json_offset/json_size (beyond the contract's offset/size of the mp4) let a loader read the captions
        # by seek as well.
        shard["items"] = []
        for item in shard_items:
            key = item["key"]
            (offset, size), (json_offset, json_size) = spans[f"{key}.mp4"], spans[f"{key}.json"]
            entry = {**item, "offset": offset, "size": size, "json_offset": json_offset, "json_size": json_size}
            for suffix in AUDIO_SUFFIXES:  # audio_offset/audio_size: the loader reads a separate track by seek
                if f"{key}.{suffix}" in spans:
                    entry["audio_offset"], entry["audio_size"] = spans[f"{key}.{suffix}"]
            shard["items"].append(entry)
    index = {"format": FORMAT, "shards": writer.shards}
    (out / "index.json").write_text(json.dumps(index, indent=1) + "\n", encoding="utf-8")
    return index


def find_videos(root: Path) -> list[Path]:
    """Video files under root (recursive, any suffix case), sorted so the output never depends on the OS."""
    return sorted(p for p in root.rglob("*") if p.is_file() and p.suffix.lower() in VIDEO_SUFFIXES)


def find_other_files(root: Path) -> list[Path]:
    """Files under root that find_videos leaves out, except caption files and hidden ones."""
    return sorted(p for p in root.rglob("*") if p.is_file() and p.suffix.lower() not in VIDEO_SUFFIXES
                  and p.suffix.lower() not in _NOT_MEDIA and not p.name.startswith("."))


def sort_other_files(root: Path, others: list[Path], workers: int = 1) -> tuple[list[Path], dict[str, str]]:
    """(files that are videos after all, {relative path: why not} for the rest), by probing each one."""
    videos, left_out = [], {}
    if not others:
        return videos, left_out
    for path, meta in zip(others, _probe_all(others, workers, progress=False)):
        if isinstance(meta, str):
            left_out[path.relative_to(root).as_posix()] = f"not a video ({meta})"
        elif meta["frames"] < 2:
            left_out[path.relative_to(root).as_posix()] = "a still image, not a video (1 frame)"
        else:
            videos.append(path)
    return videos, left_out


def _sidecar_captions(video: Path) -> list[str]:
    side = video.with_suffix(".txt")
    if not side.is_file():
        return []
    try:
        text = side.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        # One unreadable sidecar leaves its video uncaptioned (reported later) instead of stopping the run.
        print(f"warning: cannot read captions {side}: {e}", file=sys.stderr)
        return []
    return [line.strip() for line in text.splitlines() if line.strip()]


def _caption_rows(path: Path) -> Iterator[tuple[str, list[str]]]:
    """(relative video path, captions) from a CSV (path,caption) or JSONL ({path, caption|captions})."""
    if path.suffix.lower() == ".csv":
        with path.open(encoding="utf-8", newline="") as fh:
            reader = csv.DictReader(fh)
            if not {"path", "caption"} <= set(reader.fieldnames or []):
                raise ValueError(f"{path}: needs columns 'path' and 'caption', found {reader.fieldnames}")
            for row in reader:
                yield row["path"] or "", [row["caption"] or ""]
        return
    with path.open(encoding="utf-8") as fh:
        for n, line in enumerate(fh, 1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{n}: not valid JSON ({e})") from None
            caps = rec.get("captions", [rec.get("caption")]) if isinstance(rec, dict) else None
            if not (isinstance(rec, dict) and isinstance(rec.get("path"), str) and isinstance(caps, list)
                    and all(isinstance(c, str) for c in caps)):
                raise ValueError(f"{path}:{n}: expected {{\"path\": str, \"caption\": str}} or "
                                 f"{{\"path\": str, \"captions\": [str, ...]}}")
            yield rec["path"], caps


def read_captions(root: Path, videos: list[Path],
                  captions_file: str | Path | None = None) -> dict[Path, list[str]]:
    """Captions per video: from captions_file where it lists the video, else the lines of sidecar NAME.txt."""
    table: dict[Path, list[str]] = {}
    if captions_file is not None:
        known = {v.resolve() for v in videos}
        unknown = 0
        for rel, caps in _caption_rows(Path(captions_file)):
            video = (root / rel).resolve()
            if video not in known:
                unknown += 1
                continue
            # Repeated rows add captions, in file order.
            table.setdefault(video, []).extend(c.strip() for c in caps if c.strip())
        if unknown:
            print(f"warning: {unknown} caption rows name no video found under {root}", file=sys.stderr)
    return {v: table.get(v.resolve()) or _sidecar_captions(v) for v in videos}


def make_keys(rel_paths: list[str]) -> list[str]:
    """Sample keys from relative paths ('/' and '.' -> '_'), made unique by a numeric suffix in list order."""
    keys: list[str] = []
    used: set[str] = set()
    for rel in rel_paths:
        key = base = re.sub(r"[/.]", "_", rel)
        n = 1
        while key in used:
            n += 1
            key = f"{base}_{n}"
        used.add(key)
        keys.append(key)
    return keys


def _probe_or_reason(path: Path) -> dict | str:
    """Metadata of one video, or why it cannot be used (runs in a worker process)."""
    try:
        return probe_video(path)
    except Exception as e:  # noqa: BLE001 - any failure on a user's file is a report, never a crash
        return str(e) or type(e).__name__


def _probe_all(paths: list[Path], workers: int, progress: bool) -> Iterator[dict | str]:
    bar = dict(total=len(paths), desc="probe", unit="video", disable=not progress)
    if workers <= 1:
        yield from tqdm(map(_probe_or_reason, paths), **bar)
        return
    with Pool(workers) as pool:
        # imap keeps input order, so the output does not depend on which worker finishes first.
        yield from tqdm(pool.imap(_probe_or_reason, paths, chunksize=4), **bar)


def build_video_shards(inputs: list[tuple[Path, list[str]]], out_dir: str | Path, shard_bytes: int,
                       workers: int = 1, progress: bool = True, *, root: str | Path | None = None,
                       license: str = "unknown", not_videos: dict[str, str] | None = None) -> dict:
    """Probe (video path, captions) pairs and write the usable ones as shards; returns the index.

    Videos without captions or that cannot be probed (unreadable, truncated: see video_probe) are left out,
    each reported on stderr with a reason, as are the files of `not_videos` ({relative path: reason}); the
    summary line counts each kind. Keys and "source" come from paths relative to root (default: the inputs'
    common folder).
    """
    inputs = sorted((Path(p), list(c)) for p, c in inputs)
    if root is None:
        root = os.path.commonpath([p.parent.resolve() for p, _ in inputs]) if inputs else "."
    rels = [Path(os.path.relpath(p.resolve(), Path(root).resolve())).as_posix() for p, _ in inputs]
    keys = make_keys(rels)

    def report(rel: str, reason: str) -> None:
        tqdm.write(f"skipped {rel}: {reason}", file=sys.stderr)

    not_videos = dict(not_videos or {})
    for rel, reason in sorted(not_videos.items()):
        report(rel, reason)

    captioned = []
    for (path, caps), rel, key in zip(inputs, rels, keys):
        caps = [c.strip() for c in caps if c.strip()]
        if caps:
            captioned.append((path, caps, rel, key))
        else:
            report(rel, "no caption")
    bad = 0

    def samples() -> Iterator[Sample]:
        nonlocal bad
        probed = _probe_all([c[0] for c in captioned], workers, progress)
        # The probes go first in zip so that their iterator runs out, which closes the bar and the pool.
        for meta, (path, caps, rel, key) in zip(probed, captioned):
            reason = meta if isinstance(meta, str) else None
            if reason is None:
                try:
                    video = path.read_bytes()
                except OSError as e:  # removed or unreadable since it was probed
                    reason = str(e)
            if reason is not None:
                report(rel, reason)
                bad += 1
                continue
            yield key, video, {**meta, "source": rel, "license": license, "captions": caps}

    index = write_samples(samples(), out_dir, shard_bytes)
    n = sum(s["samples"] for s in index["shards"])
    print(f"{n} videos in {len(index['shards'])} shards; left out {bad} unreadable, "
          f"{len(inputs) - len(captioned)} without captions, {len(not_videos)} not videos", file=sys.stderr)
    return index


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--input", required=True, help="folder searched recursively for videos")
    ap.add_argument("--out", required=True, help="output folder for shards and index.json")
    ap.add_argument("--captions", help="CSV (path,caption) or JSONL ({path, caption|captions}); paths "
                    "relative to --input; videos it does not list fall back to a sidecar NAME.txt")
    ap.add_argument("--shard-size-mb", type=float, default=256, help="roll over to a new shard at ~N MB")
    ap.add_argument("--workers", type=int, default=1, help="processes probing videos in parallel")
    ap.add_argument("--license", default="unknown", help="license string recorded with every sample")
    args = ap.parse_args()
    root = Path(args.input)
    if not root.is_dir():
        raise SystemExit(f"--input {root} is not a folder")
    # A video is what PyAV reads as one, whatever its suffix (.mpg, .ts, no suffix ...).
    found, not_videos = sort_other_files(root, find_other_files(root), args.workers)
    videos = sorted(find_videos(root) + found)
    try:
        captions = read_captions(root, videos, args.captions)
        inputs = [(v, captions.get(v, [])) for v in videos]
        index = build_video_shards(inputs, args.out, int(args.shard_size_mb * 2**20), args.workers, root=root,
                                   license=args.license, not_videos=not_videos)
    except (ValueError, OSError) as e:  # a bad captions file, or no usable video at all
        raise SystemExit(f"error: {e}") from None
    n = sum(s["samples"] for s in index["shards"])
    print(f"wrote {n} of {len(videos)} videos in {len(index['shards'])} shards to {args.out}")


if __name__ == "__main__":
    main()
