"""Generate the embedded default video dataset: one coloured shape moving across a dark background, as H.264
mp4 shards (train/ and val/) with captions "a {colour} {shape} moves {direction}"."""

from __future__ import annotations

import argparse
import io
import itertools
import math
import os
from fractions import Fraction
from pathlib import Path

import av
import numpy as np
from generated_split import write_generated_split
from video_shards import Sample

# Saturated and far apart in RGB: a decoded clip's colour stays unambiguous after 4:2:0 chroma subsampling.
# recipes/video_dit/adherence.py holds the same palette (a test checks they agree).
COLOURS = {"red": (230, 30, 30), "green": (30, 200, 40), "blue": (40, 60, 235), "yellow": (235, 220, 30)}
SHAPES = ("circle", "square", "triangle")
DIRECTIONS = {"left": (-1, 0), "right": (1, 0), "up": (0, -1), "down": (0, 1)}  # (dx, dy); y points down
PHRASES = {"left": "to the left", "right": "to the right", "up": "up", "down": "down"}
LABELS = list(itertools.product(COLOURS, SHAPES, DIRECTIONS))  # all 48 (colour, shape, direction)
SPLITS = {"train": 0, "val": 1}  # the seed stream of each split


def captions(colour: str, shape: str, direction: str) -> list[str]:
    """The template caption first, then a paraphrase (so the multi-caption path is exercised)."""
    return [f"a {colour} {shape} moves {direction}",
            f"a {colour} {shape} moving {PHRASES[direction]} across a grey background"]


def _coverage(shape: str, cx: np.ndarray, cy: np.ndarray, r: float, size: int) -> np.ndarray:
    """Anti-aliased coverage (T, H, W) in [0, 1] of a shape of half-extent r centred at cx, cy: (T,) each."""
    cx, cy = cx[:, None, None], cy[:, None, None]
    x = np.arange(size)[None, None, :] + 0.5 - cx  # pixel centres relative to the shape centre
    y = np.arange(size)[None, :, None] + 0.5 - cy
    if shape == "circle":
        inside = r - np.sqrt(x * x + y * y)
    elif shape == "square":
        inside = r - np.maximum(np.abs(x), np.abs(y))
    elif shape == "triangle":  # apex up, base 2r, height 2r: fills half its bounding box
        slant = (y + r - 2 * np.abs(x)) / math.sqrt(5)  # distance inside the two slanted sides
        inside = np.minimum(r - y, slant)
    else:
        raise ValueError(f"unknown shape {shape!r}: expected one of {SHAPES}")
    # Signed distance to the edge -> a one-pixel ramp: smooth sub-pixel motion instead of jagged jumps.
    return np.clip(inside + 0.5, 0.0, 1.0)


def render_clip(shape: str, colour: str, direction: str, size: int, frames: int,
                rng: np.random.Generator) -> np.ndarray:
    """A clip (T, H, W, 3) uint8: the shape (half-extent size/6) crosses half the frame at constant speed."""
    if colour not in COLOURS or direction not in DIRECTIONS:
        raise ValueError(f"unknown colour {colour!r} or direction {direction!r}: expected one of "
                         f"{list(COLOURS)} and {list(DIRECTIONS)}")
    if frames < 2 or size < 16:
        raise ValueError(f"need frames >= 2 and size >= 16, got frames={frames} size={size}")
    r, travel, margin = size / 6, size / 2, 1.0
    lo, hi = r + margin, size - r - margin  # centre positions that keep the whole shape inside the frame
    dx, dy = DIRECTIONS[direction]
    # Along the motion the start leaves room for the whole travel; across it any position inside is fine.
    start = rng.uniform(lo, hi - travel) if dx + dy > 0 else rng.uniform(lo + travel, hi)
    across = rng.uniform(lo, hi)
    path = start + (dx + dy) * travel * np.linspace(0.0, 1.0, frames)
    cx, cy = (path, np.full(frames, across)) if dx else (np.full(frames, across), path)
    # Dark grey backdrop, slightly different per clip, with a faint static texture.
    grey = rng.uniform(45, 75) + rng.uniform(-4, 4, size=3)
    background = grey + rng.normal(0.0, 2.0, size=(size, size, 1))
    fill = np.clip(np.asarray(COLOURS[colour], dtype=np.float64) + rng.uniform(-10, 10, size=3), 0, 255)
    cover = _coverage(shape, cx, cy, r, size)[..., None]
    clip = background[None] * (1 - cover) + fill * cover
    return np.clip(np.rint(clip), 0, 255).astype(np.uint8)


def encode_mp4(frames: np.ndarray, fps: float) -> bytes:
    """H.264 (yuv420p) mp4 bytes of frames (T, H, W, 3) uint8 RGB; equal frames always give equal bytes."""
    t, h, w, _ = frames.shape
    buf = io.BytesIO()
    with av.open(buf, mode="w", format="mp4", options={"fflags": "+bitexact"}) as container:
        stream = container.add_stream("libx264", rate=Fraction(fps).limit_denominator(1001))
        stream.width, stream.height, stream.pix_fmt = w, h, "yuv420p"
        # One thread: x264's output is then independent of the machine; processes give the parallelism.
        stream.thread_count = 1
        # x264's macroblock tree made the bytes vary from run to run on small frames (measured: 48x48 gave
        # up to 6 different files for one clip in 30 encodes, as if it read uninitialised memory); without
        # it every size we tried encodes identically every time.
        stream.options = {"crf": "20", "g": "8", "preset": "fast", "x264-params": "mbtree=0"}
        for frame in frames:
            image = av.VideoFrame.from_ndarray(np.ascontiguousarray(frame), format="rgb24")
            container.mux(stream.encode(image))
        container.mux(stream.encode())
    return buf.getvalue()


def make_sample(index: int, split: str, label: tuple[str, str, str], seed: int, size: int, frames: int,
                fps: float) -> Sample:
    """Sample number index of a split: (key, mp4 bytes, meta), a pure function of its arguments."""
    colour, shape, direction = label
    rng = np.random.default_rng([seed, SPLITS[split], index])
    video = encode_mp4(render_clip(shape, colour, direction, size, frames, rng), fps)
    meta = {"fps": float(fps), "frames": frames, "width": size, "height": size, "duration": frames / fps,
            "has_audio": False, "source": "generated", "license": "CC0-1.0",
            "captions": captions(colour, shape, direction)}
    return f"{split}_{index:06d}", video, meta


def generate_split(out_dir: str | Path, split: str, num: int, seed: int = 0, size: int = 64, frames: int = 17,
                   fps: float = 8, workers: int = 1, shard_samples: int = 64, progress: bool = True) -> dict:
    """Write num clips of a split as shards in out_dir; labels cycle through all 48 combinations, shuffled."""
    return write_generated_split(make_sample, LABELS, out_dir, split, SPLITS[split], num, seed, workers,
                                 shard_samples, progress, size=size, frames=frames, fps=fps)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--out", required=True, help="output folder; gets train/ and val/ shards with index.json")
    ap.add_argument("--num", type=int, default=2000, help="training clips")
    ap.add_argument("--val", type=int, default=96, help="validation clips (a different seed stream)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--size", type=int, default=64, help="width and height in pixels")
    ap.add_argument("--frames", type=int, default=17)
    ap.add_argument("--fps", type=float, default=8)
    ap.add_argument("--shard-samples", type=int, default=64, help="clips per shard (at most)")
    ap.add_argument("--workers", type=int, default=os.cpu_count() or 1, help="processes rendering, encoding")
    args = ap.parse_args()
    for split, num in (("train", args.num), ("val", args.val)):
        if num > 0:
            index = generate_split(Path(args.out) / split, split, num, args.seed, args.size, args.frames,
                                   args.fps, args.workers, args.shard_samples)
            print(f"wrote {num} {split} clips in {len(index['shards'])} shards to {Path(args.out) / split}")


if __name__ == "__main__":
    main()
