"""Test videos whose frames encode their own index, in several containers and codecs (written with PyAV).

Every frame shows its index on the frame grid (its presentation time x fps) as 24 black/white 8x8 blocks, so a
decoded frame says which frame it is: `read_index(frame)`. Long timelines stay cheap: `grid` lists the grid
indices of the frames actually written, so a video can hold a few frames at t >= 1 hour and still take
milliseconds to write (the frame before a gap is shown until the next one).

    video = make_video("avi", range(40), fps=25, codec="mpeg4", bframes=2)   # AVI, MPEG-4 Part 2, B-frames
    video = make_video("mp4", [0, 1, 90000, 90001], fps=25)                  # frames at 0, 0.04, 3600, 3600.04 s
    read_index(decode_clip(video, [3600.04])[0]) == 90001

Containers (`FORMATS`): mp4, mov, mkv, webm, avi, mpeg-ps ("mpeg"), mpeg-ts ("ts"); each with a default codec.
"""

from __future__ import annotations

import io
import os
import subprocess
import sys
import tempfile
from collections.abc import Iterable
from fractions import Fraction

import av
import numpy as np

BLOCK, COLS, ROWS = 8, 8, 4  # 24 index bits (+ 8 guard blocks) on a 64x32 frame
BITS = 24
HEIGHT, WIDTH = ROWS * BLOCK, COLS * BLOCK
# container -> (PyAV format name, default codec)
FORMATS = {
    "mp4": ("mp4", "libx264"), "mov": ("mov", "libx264"), "m4v": ("mp4", "libx264"),
    "mkv": ("matroska", "libx264"), "webm": ("webm", "libvpx"), "avi": ("avi", "mpeg4"),
    "mpeg": ("mpeg", "mpeg2video"), "mpg": ("mpeg", "mpeg2video"), "vob": ("vob", "mpeg2video"),
    "ts": ("mpegts", "mpeg2video"),
}


def index_frame(index: int) -> np.ndarray:
    """(HEIGHT, WIDTH, 3) uint8 frame showing `index` in binary (bit k = block k, row-major; guard row: grey)."""
    if not 0 <= index < 2 ** BITS:
        raise ValueError(f"index must be in [0, 2**{BITS}), got {index}")
    bits = [(index >> k) & 1 for k in range(BITS)] + [0] * (ROWS * COLS - BITS)
    grid = np.asarray(bits, np.uint8).reshape(ROWS, COLS) * 255
    return np.repeat(np.repeat(grid, BLOCK, 0), BLOCK, 1)[..., None].repeat(3, axis=2)


def read_index(frame: np.ndarray) -> int:
    """The index an `index_frame` frame shows, from a decoded (H, W, 3) frame at any size (block means)."""
    frame = np.asarray(frame, np.float32).mean(axis=-1)
    h, w = frame.shape
    index = 0
    for k in range(BITS):
        r, c = divmod(k, COLS)
        # The centre half of each block: codecs smear block edges, never the middle of a flat block.
        y0, y1 = (4 * r + 1) * h // (4 * ROWS), (4 * r + 3) * h // (4 * ROWS)
        x0, x1 = (4 * c + 1) * w // (4 * COLS), (4 * c + 3) * w // (4 * COLS)
        index |= int(frame[y0:y1, x0:x1].mean() > 127.5) << k
    return index


def make_video(container: str = "mp4", grid: Iterable[int] | int = 10, fps: int | Fraction = 25,
               codec: str | None = None, bframes: int = 0, gop: int = 12, faststart: bool = False) -> bytes:
    """Video bytes: one frame per entry of `grid` (ascending grid indices; an int n means range(n)), shown
    at grid / fps seconds and encoding its grid index. `bframes` > 0 lets the encoder reorder frames (B-frames);
    `gop` is the keyframe interval; `faststart` puts an mp4's index (moov) before the frames, as streaming
    sites do, so a truncated copy still opens and claims the full duration."""
    grid = list(range(grid)) if isinstance(grid, int) else [int(g) for g in grid]
    if not grid or any(b <= a for a, b in zip(grid, grid[1:])) or grid[0] < 0:
        raise ValueError("grid must be a non-empty ascending list of non-negative frame indices")
    fmt, default_codec = FORMATS[container]
    codec = codec or default_codec
    buf = io.BytesIO()
    fps = Fraction(fps)
    if codec.startswith("libvpx") and "decord" in sys.modules:
        # decord's wheel carries an old libvpx that, once loaded, captures the symbols PyAV's VP8/VP9 encoder
        # binds to (avcodec_open2 then fails with EINVAL): encode in a fresh interpreter instead.
        args = repr((container, grid, (fps.numerator, fps.denominator), codec, bframes, gop, faststart))
        code = (f"import sys; sys.path.insert(0, {os.path.dirname(__file__)!r}); from fractions import Fraction; "
                f"from media import make_video; c, g, f, *rest = {args}; "
                f"sys.stdout.buffer.write(make_video(c, g, Fraction(*f), *rest))")
        return subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, timeout=120).stdout
    if faststart:  # the muxer rewrites the file to move its index forward: that needs a real file
        with tempfile.TemporaryDirectory() as tmp:
            path = os.path.join(tmp, f"video.{container}")
            _encode(path, fmt, {"movflags": "faststart"}, grid, fps, codec, bframes, gop)
            with open(path, "rb") as fh:
                return fh.read()
    _encode(buf, fmt, None, grid, fps, codec, bframes, gop)
    return buf.getvalue()


def _encode(target, fmt: str, options: dict | None, grid: list[int], fps: Fraction, codec: str, bframes: int,
            gop: int) -> None:
    with av.open(target, mode="w", format=fmt, options=options) as out:
        stream = out.add_stream(codec, rate=fps)
        stream.width, stream.height, stream.pix_fmt = WIDTH, HEIGHT, "yuv420p"
        stream.time_base = 1 / fps
        ctx = stream.codec_context
        ctx.time_base, ctx.gop_size, ctx.max_b_frames = 1 / fps, gop, bframes
        if codec == "libx264":
            # Lossless-ish and no B-frames unless asked: the index blocks must survive, frames in order.
            stream.options = {"crf": "1", "bf": str(bframes), "tune": "zerolatency" if not bframes else "film"}
        elif codec in ("libvpx", "libvpx-vp9"):
            ctx.bit_rate, ctx.qmin, ctx.qmax = 2_000_000, 0, 4
        else:
            ctx.bit_rate, ctx.qmin, ctx.qmax = 2_000_000, 1, 4
        for g in grid:
            frame = av.VideoFrame.from_ndarray(index_frame(g), format="rgb24")
            frame.pts, frame.time_base = g, 1 / fps
            out.mux(stream.encode(frame))
        out.mux(stream.encode())

