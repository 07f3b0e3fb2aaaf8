"""Video loader throughput: frames/s delivered by VideoStream (decode, resize, crop, batch) divided by raw decord
decoding of the same clips at the same timestamps, with the same number of worker processes. Target: >= 0.9.

    python launch/bench_video_loader.py --data DIR [--workers 2] [--batches 20] [--fps 8] [--buckets HxWxF:B ...]
    python launch/bench_video_loader.py --generate 64x64 256x256 480x832 [--clips N] [--out DIR] [--frames 16]

--generate writes H.264 clips of each size (3 s at 24 fps, a panning textured scene with a moving box and a
noisy quarter, ~2 Mbit/s at 480x832; 32 clips at 480x832 up to 256 at 64x64 unless --clips; under OUT/HxW,
kept and reused when --out is given) and times each size over one epoch of one bucket at the source size
(HxWxFRAMES:2), printing one ratio row per size at the end.

Runs alternate (raw, loader, raw, loader, ...) so drift on a shared machine hits both sides alike; each side
reports its fastest run. Both sides pay their process start-up, as the loader does every epoch. Beside the
frames/s ratio each side's CPU seconds per frame (its processes and their workers, best run) give a CPU ratio:
the work each side does, which other load on the machine barely moves, where wall time counts waiting for it.
"""

from __future__ import annotations

import argparse
import gc
import io
import resource
import statistics
import sys
import tempfile
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

TARGET = 0.9
GEN_SECONDS, GEN_FPS = 3.0, 24  # generated clips: long enough for a 2 s clip at 8 fps to start anywhere in 1 s


def synthetic_clip(height: int, width: int, seed: int, seconds: float = GEN_SECONDS, fps: int = GEN_FPS) -> bytes:
    """H.264 mp4 (libx264 veryfast, crf 23, B-frames, keyframe every 2 s) of a textured scene panning 2 px per
    frame, a moving box and fresh noise in one quarter: motion and texture give the decoder real work (a flat
    or static clip decodes several times faster than camera footage of the same size)."""
    import av

    rng = np.random.default_rng(seed)
    frames, pan = round(seconds * fps), 2
    span = width + pan * frames
    yy, xx = np.mgrid[0:height, 0:span]
    ramp = ((xx * 0.5 + yy * 0.3) % 256).astype(np.uint8)
    grain = rng.integers(0, 24, (height // 4 + 1, span // 4 + 1), dtype=np.uint8).repeat(4, 0).repeat(4, 1)
    canvas = np.stack([ramp + int(c) + grain[:height, :span] for c in rng.integers(0, 256, 3)], axis=-1)
    colour, r = rng.integers(0, 256, 3, dtype=np.uint8), max(2, height // 8)
    buf = io.BytesIO()
    with av.open(buf, "w", format="mp4") as out:
        stream = out.add_stream("libx264", rate=fps)
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        stream.codec_context.gop_size = 2 * fps
        stream.options = {"crf": "23", "preset": "veryfast"}
        for i in range(frames):
            img = canvas[:, pan * i:pan * i + width].copy()
            img[height // 2:, :width // 2] += rng.integers(0, 16, (height - height // 2, width // 2, 1), np.uint8)
            cy, cx = int(height * (0.5 + np.sin(i / 9 + seed) / 3)), int(width * (0.5 + np.cos(i / 7 + seed) / 3))
            img[max(0, cy - r):cy + r, max(0, cx - r):cx + r] = colour
            out.mux(stream.encode(av.VideoFrame.from_ndarray(img, format="rgb24")))
        out.mux(stream.encode())
    return buf.getvalue()


def _sample(args: tuple[int, int, int]) -> tuple:
    height, width, i = args
    key = f"gen{height}x{width}_{i:04d}"
    meta = {"fps": float(GEN_FPS), "frames": round(GEN_SECONDS * GEN_FPS), "width": width, "height": height,
            "duration": GEN_SECONDS, "has_audio": False, "source": f"{key}.mp4", "license": "generated",
            "captions": [f"generated clip {i} at {height}x{width}"]}
    return key, synthetic_clip(height, width, seed=i), meta


def generate(out_dir: str | Path, height: int, width: int, clips: int, workers: int = 2) -> Path:
    """out_dir/index.json + shards of `clips` generated clips (reused when an index of that many is there)."""
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "data"))
    from video_shards import write_samples

    out = Path(out_dir)
    if (out / "index.json").exists() and sum(s["samples"] for s in load_index(out)["shards"]) == clips:
        return out
    jobs = [(height, width, i) for i in range(clips)]
    with Pool(max(1, workers)) as pool:
        samples = pool.map(_sample, jobs)
    # Several shards, as a real data set has: the workers then read from different files.
    write_samples(samples, out, shard_bytes=1 << 40, shard_samples=max(1, -(-clips // 4)))
    return out


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


def _cpu_seconds() -> float:
    """CPU time of this process and of its finished (joined) children: the work done, whatever else shares the
    cores, where wall time also counts waiting for them."""
    own, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + kids.ru_utime + kids.ru_stime


def _time_raw(clips: list, num_workers: int) -> tuple[float, int, float]:
    """(wall seconds, frames, CPU seconds) of raw decord over the clips."""
    t0, c0 = time.perf_counter(), _cpu_seconds()
    if num_workers == 0:
        frames = sum(map(_raw_decode, clips))
    else:
        with Pool(num_workers) as pool:
            frames = sum(pool.imap_unordered(_raw_decode, clips, chunksize=max(1, len(clips) // (8 * num_workers))))
            pool.close()
            pool.join()  # joined, so RUSAGE_CHILDREN holds their CPU time
    return time.perf_counter() - t0, frames, _cpu_seconds() - c0


def _time_loader(make_stream, batches: int, num_workers: int) -> tuple[float, int, float]:
    """(wall seconds, frames, CPU seconds) of the loader's first `batches` batches."""
    threads = torch.get_num_threads()
    if num_workers == 0:
        torch.set_num_threads(1)  # in-process, like the raw side: one process, one thread
    try:
        t0, c0 = time.perf_counter(), _cpu_seconds()
        stream = make_stream()
        frames = sum(b["video"].shape[0] * b["video"].shape[2] for b in islice(stream, batches))
        wall = time.perf_counter() - t0
        del stream  # drops the DataLoader iterator: its workers are joined, their CPU time counted
        gc.collect()
        return wall, frames, _cpu_seconds() - c0
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
    raw_s, raw_frames, _ = min(raw_runs)
    loader_s, loader_frames, _ = min(loader_runs)
    raw_cpu, loader_cpu = min(r[2] for r in raw_runs) / raw_frames, min(r[2] for r in loader_runs) / loader_frames
    out = {"batches": batches, "clips": len(clips), "workers": num_workers, "frames": loader_frames,
           "loader_fps": loader_frames / loader_s, "raw_fps": raw_frames / raw_s,
           "ratio": (loader_frames / loader_s) / (raw_frames / raw_s), "buckets": [str(b) for b in buckets],
           "output": "uint8" if uint8 else "float32", "loader_cpu_ms": 1e3 * loader_cpu, "raw_cpu_ms": 1e3 * raw_cpu,
           "cpu_ratio": raw_cpu / loader_cpu}
    print(f"video loader ({out['output']}): {out['loader_fps']:.1f} frames/s, raw decord: {out['raw_fps']:.1f} frames/s over "
          f"{len(clips)} clips with {num_workers} workers; ratio {out['ratio']:.3f} (target >= {TARGET}); CPU per "
          f"frame {out['loader_cpu_ms']:.2f} vs {out['raw_cpu_ms']:.2f} ms, ratio {out['cpu_ratio']:.3f}")
    return out


def parse_size(text: str) -> tuple[int, int]:
    """'480x832' -> (480, 832): height x width, as buckets spell them."""
    try:
        h, w = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise ValueError(f"size {text!r} must be HEIGHTxWIDTH, e.g. 480x832") from None
    if h < 16 or w < 16 or h % 2 or w % 2:
        raise ValueError(f"size {text!r}: need even sides >= 16 (H.264 yuv420p)")
    return h, w


def default_clips(height: int, width: int) -> int:
    """Clips to generate for a size: 32 at 480x832, more for smaller sizes (up to 256 at 64x64) so each size's
    run decodes for a similar few seconds and per-epoch costs (worker start-up) weigh as little."""
    return max(32, min(256, round(32 * 480 * 832 / (height * width))))


def run_generated(sizes: list[str], clips: int | None, frames: int, fps: float, num_workers: int,
                  batches: int | None, repeats: int = 2, uint8: bool = False,
                  out_dir: str | Path | None = None) -> list[dict]:
    """Generate clips of each size (under out_dir, or a temporary folder), time each over one epoch (or
    `batches`), print a row per size."""
    parsed = [parse_size(s) for s in sizes]
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(out_dir or tmp)
        results = []
        for h, w in parsed:
            t0 = time.perf_counter()
            data = generate(root / f"{h}x{w}", h, w, clips or default_clips(h, w), max(1, num_workers))
            print(f"{h}x{w}: clips ready in {time.perf_counter() - t0:.1f}s", flush=True)
            results.append(run(data, [f"{h}x{w}x{frames}:2"], fps, num_workers, batches or 1 << 30, repeats, uint8))
    print(f"{'size':<9} {'bucket':<14} {'loader f/s':>10} {'raw f/s':>9} {'ratio':>6} {'CPU ratio':>9}")
    for (h, w), r in zip(parsed, results):
        print(f"{f'{h}x{w}':<9} {r['buckets'][0]:<14} {r['loader_fps']:>10.1f} {r['raw_fps']:>9.1f} "
              f"{r['ratio']:>6.3f} {r['cpu_ratio']:>9.3f}")
    return results


def add_generate_arguments(ap: argparse.ArgumentParser) -> None:
    ap.add_argument("--generate", nargs="+", metavar="HxW", help="generate H.264 clips of these sizes and time "
                    "each (instead of --data)")
    ap.add_argument("--clips", type=int, help="generated clips per size (default: 32 at 480x832 to 256 at 64x64)")
    ap.add_argument("--frames", type=int, default=16, help="frames per clip in a generated size's bucket")
    ap.add_argument("--out", help="keep generated clips here (OUT/HxW) and reuse them on the next run")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", help="folder with video-v1 shards and index.json")
    ap.add_argument("--workers", type=int, default=2, help="decoding processes on both sides")
    ap.add_argument("--batches", type=int, help="batches to time (at most one epoch; default 20, or the whole "
                    "epoch with --generate)")
    ap.add_argument("--fps", type=float, default=8.0, help="frames sampled per second of video")
    ap.add_argument("--buckets", nargs="+", help="HxWxF:B buckets (default: the most common source size)")
    ap.add_argument("--repeats", type=int, default=2, help="alternating runs per side; the fastest counts")
    ap.add_argument("--uint8", action="store_true", help="time the loader's uint8 output instead of float32")
    add_generate_arguments(ap)
    args = ap.parse_args()
    if args.generate:
        run_generated(args.generate, args.clips, args.frames, args.fps, args.workers, args.batches, args.repeats,
                      args.uint8, args.out)
        return
    if not args.data:
        ap.error("give --data DIR or --generate HxW ...")
    run(args.data, args.buckets or default_buckets(args.data, args.fps), args.fps, args.workers, args.batches or 20,
        args.repeats, args.uint8)


if __name__ == "__main__":
    main()
