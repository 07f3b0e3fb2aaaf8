"""Video loader throughput: frames/s delivered by VideoStream (decode, resize, crop, batch) divided by raw decord
decoding of the same clips at the same timestamps, with the same number of worker processes. Target: >= 0.8.

    python launch/bench_video_loader.py --data DIR [--workers 2] [--batches 20] [--fps 8] [--buckets HxWxF:B ...]

Runs alternate (raw, loader, raw, loader, ...) so drift on a shared machine hits both sides alike; each side
reports its fastest run. Both sides pay their process start-up, as the loader does every epoch.
"""

from __future__ import annotations

import argparse
import io
import statistics
import time
from collections import Counter
from itertools import islice
from multiprocessing import Pool
from pathlib import Path

import _bootstrap  # noqa: F401
import numpy as np
import torch

from framework.data.buckets import parse_buckets, usable_duration
from framework.data.shards import load_index
from framework.data.video import VideoStream


def _raw_decode(clip: tuple[Path, str, int, int, np.ndarray]) -> int:
    """Frames decoded for one clip: read its bytes, then decord with one thread, nothing else."""
    import decord

    path, _, offset, size, times = clip
    with open(path, "rb") as f:
        f.seek(offset)
        data = f.read(size)
    reader = decord.VideoReader(io.BytesIO(data), num_threads=1)
    starts = reader.get_frame_timestamp(range(len(reader)))[:, 0]
    idx = np.clip(np.searchsorted(starts, times + 1e-6, side="right") - 1, 0, len(reader) - 1)
    return len(reader.get_batch(idx.tolist()).asnumpy())


def _time_raw(clips: list, num_workers: int) -> tuple[float, int]:
    t0 = time.perf_counter()
    if num_workers == 0:
        frames = sum(map(_raw_decode, clips))
    else:
        with Pool(num_workers) as pool:
            frames = sum(pool.imap_unordered(_raw_decode, clips, chunksize=max(1, len(clips) // (8 * num_workers))))
    return time.perf_counter() - t0, frames


def _time_loader(make_stream, batches: int, num_workers: int) -> tuple[float, int]:
    threads = torch.get_num_threads()
    if num_workers == 0:
        torch.set_num_threads(1)  # in-process, like the raw side: one process, one thread
    try:
        t0 = time.perf_counter()
        stream = make_stream()
        frames = sum(b["video"].shape[0] * b["video"].shape[2] for b in islice(stream, batches))
        return time.perf_counter() - t0, frames
    finally:
        torch.set_num_threads(threads)


def default_buckets(data_dir: str | Path, fps: float) -> list[str]:
    """One bucket: the most common source size, up to 16 frames the median clip can hold, batch 2."""
    items = [it for s in load_index(data_dir)["shards"] for it in s.get("items", [])]
    (h, w), _ = Counter((it["height"], it["width"]) for it in items).most_common(1)[0]
    frames = max(1, min(16, int(statistics.median(usable_duration(it) for it in items) * fps)))
    return [f"{h}x{w}x{frames}:2"]


def run(data_dir: str | Path, buckets: list[str | dict], fps: float, num_workers: int, batches: int,
        repeats: int = 2, uint8: bool = False) -> dict:
    """Frames/s of the loader and of raw decord over the same clips; prints both and their ratio."""
    parsed = parse_buckets(buckets)

    def make_stream() -> VideoStream:
        return VideoStream(data_dir, parsed, 0, 1, seed=0, fps=fps, num_workers=num_workers,
                           max_skip_fraction=1.0, uint8=uint8)

    probe = make_stream()
    batches = min(batches, len(probe))  # one epoch: the clip list below is that epoch's plan
    clips = probe.planned_clips(0, 0, batches)
    for path in {c[0] for c in clips}:  # warm the page cache so the first timed side is not penalised
        Path(path).read_bytes()
    raw_runs, loader_runs = [], []
    for _ in range(repeats):
        raw_runs.append(_time_raw(clips, num_workers))
        loader_runs.append(_time_loader(make_stream, batches, num_workers))
    raw_s, raw_frames = min(raw_runs)
    loader_s, loader_frames = min(loader_runs)
    out = {"batches": batches, "clips": len(clips), "workers": num_workers, "frames": loader_frames,
           "loader_fps": loader_frames / loader_s, "raw_fps": raw_frames / raw_s,
           "ratio": (loader_frames / loader_s) / (raw_frames / raw_s), "buckets": [str(b) for b in buckets],
           "output": "uint8" if uint8 else "float32"}
    print(f"video loader ({out['output']}): {out['loader_fps']:.1f} frames/s, raw decord: {out['raw_fps']:.1f} frames/s over "
          f"{len(clips)} clips with {num_workers} workers; ratio {out['ratio']:.3f} (target >= 0.8)")
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", required=True, help="folder with video-v1 shards and index.json")
    ap.add_argument("--workers", type=int, default=2, help="decoding processes on both sides")
    ap.add_argument("--batches", type=int, default=20, help="batches to time (at most one epoch)")
    ap.add_argument("--fps", type=float, default=8.0, help="frames sampled per second of video")
    ap.add_argument("--buckets", nargs="+", help="HxWxF:B buckets (default: the most common source size)")
    ap.add_argument("--repeats", type=int, default=2, help="alternating runs per side; the fastest counts")
    ap.add_argument("--uint8", action="store_true", help="time the loader's uint8 output instead of float32")
    args = ap.parse_args()
    run(args.data, args.buckets or default_buckets(args.data, args.fps), args.fps, args.workers, args.batches,
        args.repeats, args.uint8)


if __name__ == "__main__":
    main()
