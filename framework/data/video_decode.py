"""Decode the frames of a clip at given timestamps from video bytes (decord, PyAV fallback); resize and crop."""

from __future__ import annotations

import io
import math
import re

import numpy as np
import torch
import torch.nn.functional as F

try:
    import decord
    from decord._ffi.base import DECORDError

    DECORD_AVAILABLE = True
except ImportError:  # decord has wheels only for x86-64 Linux and Windows
    decord, DECORDError = None, RuntimeError
    DECORD_AVAILABLE = False

BACKENDS = ("auto", "decord", "pyav")
_DECORD_LOG = re.compile(r"^\[[\d:]+\] \S+:\d+: (Error: )?")
_EPS = 1e-6  # seconds: float slack when comparing a requested time with a frame's interval


class CorruptVideoError(Exception):
    """A video could not be decoded, or is shorter than the times asked of it."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


def clip_times(duration: float, fps_target: float, num_frames: int, start: float) -> np.ndarray:
    """Timestamps (num_frames,) in seconds: num_frames samples at fps_target from start, inside duration."""
    if fps_target <= 0 or num_frames < 1:
        raise ValueError(f"need fps_target > 0 and num_frames >= 1, got {fps_target}, {num_frames}")
    if start < 0 or start + num_frames / fps_target > duration + _EPS:
        raise ValueError(f"a clip of {num_frames} frames at {fps_target} fps from {start:.3f}s does not fit "
                         f"in {duration:.3f}s")
    return start + np.arange(num_frames, dtype=np.float64) / fps_target


def choose_start(duration: float, clip_seconds: float, rng: np.random.Generator, frame_rate: float = 0.0) -> float:
    """Uniform start time in [0, duration - clip_seconds]; raises ValueError when the clip does not fit.

    frame_rate > 0 (the source's) snaps the start down to a source frame's start time, so the clip's first
    frame is shown from exactly its timestamp and an audio window cut at it lines up with the picture: an
    unsnapped start inside a frame would put every event up to one source frame later in the video than in
    the sound (measured on the flash + beep clips: beeps 0-37 ms ahead of their flash frames).
    """
    slack = duration - clip_seconds
    if slack < -_EPS:
        raise ValueError(f"a {clip_seconds:.3f}s clip does not fit in {duration:.3f}s of video")
    start = float(rng.uniform(0.0, slack)) if slack > 0 else 0.0
    if frame_rate > 0:
        start = math.floor(start * frame_rate + _EPS) / frame_rate
    return start


def _frame_for(times: np.ndarray, starts: np.ndarray, end: float) -> np.ndarray:
    """Index of the frame whose [start, next start) interval holds each time; the last one ends at `end`."""
    if times.size and (times.min() < -_EPS or times.max() >= end - _EPS):
        raise CorruptVideoError(f"clip is shorter than requested: frames cover [0, {end:.3f})s, asked for "
                                f"[{times.min():.3f}, {times.max():.3f}]s")
    return np.clip(np.searchsorted(starts, times + _EPS, side="right") - 1, 0, len(starts) - 1)


def _decode_decord(data: bytes, times: np.ndarray, num_threads: int) -> np.ndarray:
    try:
        reader = decord.VideoReader(io.BytesIO(data), num_threads=num_threads)
        if len(reader) == 0:
            raise CorruptVideoError("video has no frames")
        # (N, 2) [start, end) seconds, already relative to the stream's start time.
        stamps = reader.get_frame_timestamp(range(len(reader)))
        idx = _frame_for(times, stamps[:, 0], float(stamps[-1, 1]))
        return reader.get_batch(idx.tolist()).asnumpy()
    except (DECORDError, RuntimeError) as e:  # decord raises plain RuntimeError when it cannot even open
        # decord prefixes its C++ log line ("[12:00:00] /path/video_reader.cc:486: Error: ..."): keep the reason.
        reason = _DECORD_LOG.sub("", str(e).strip().splitlines()[-1] if str(e).strip() else type(e).__name__)
        raise CorruptVideoError(f"decord: {reason[:300]}") from None


def _decode_pyav(data: bytes, times: np.ndarray, num_threads: int) -> np.ndarray:
    import av  # only the fallback path needs PyAV (decord decodes where it is installed)

    kept: dict[int, np.ndarray] = {}  # frame index -> RGB, only for frames some time lands on
    starts: list[float] = []
    end, last = 0.0, float(times.max()) if times.size else -1.0
    try:
        with av.open(io.BytesIO(data), mode="r") as container:
            if not container.streams.video:
                raise CorruptVideoError("no video stream")
            stream = container.streams.video[0]
            stream.thread_count = num_threads
            tb = stream.time_base
            # decord measures from the stream's start time; PyAV's frame.time is absolute: align them.
            origin = float(stream.start_time * tb) if stream.start_time is not None else None
            prev, finished = None, True
            for frame in container.decode(stream):
                if frame.pts is None:
                    raise CorruptVideoError(f"frame {len(starts)} has no timestamp")
                origin = float(frame.pts * tb) if origin is None else origin
                start = float(frame.pts * tb) - origin
                # A frame's interval is only known once the next one arrives: convert it to RGB just then, and
                # only when a requested time falls inside it (the RGB conversion is not free).
                if prev is not None and np.any((times >= starts[-1] - _EPS) & (times < start - _EPS)):
                    kept[len(starts) - 1] = prev.to_ndarray(format="rgb24")
                starts.append(start)
                step = float(frame.duration * tb) if frame.duration else 1 / float(stream.average_rate or 1)
                end, prev = start + step, frame
                if start > last + _EPS:  # every time falls in an earlier frame: stop decoding
                    finished = False
                    break
            if finished and prev is not None and np.any(times >= starts[-1] - _EPS):
                kept[len(starts) - 1] = prev.to_ndarray(format="rgb24")
    except CorruptVideoError:
        raise
    except (av.FFmpegError, OSError, ValueError, EOFError) as e:
        raise CorruptVideoError(f"pyav: {type(e).__name__}: {e}") from None
    if not starts:
        raise CorruptVideoError("video has no frames")
    idx = _frame_for(times, np.asarray(starts), end)
    return np.stack([kept[i] for i in idx.tolist()])


def decode_clip(data: bytes, times: np.ndarray, *, backend: str = "auto", num_threads: int = 1) -> np.ndarray:
    """Frames (T, H, W, 3) uint8 shown at each of times (T,) seconds from the stream start.

    Each time picks the frame whose presentation interval holds it. "auto" uses decord and retries with PyAV
    when decord fails (it knows fewer codecs); raises CorruptVideoError when the bytes cannot be decoded or the
    video ends before the last time.
    """
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    times = np.asarray(times, dtype=np.float64)
    if times.ndim != 1 or times.size == 0:
        raise ValueError(f"times must be a non-empty 1-D array, got shape {times.shape}")
    if backend == "pyav" or (backend == "auto" and not DECORD_AVAILABLE):
        return _decode_pyav(data, times, num_threads)
    if not DECORD_AVAILABLE:
        raise ValueError("backend='decord' but decord is not installed (use 'pyav' or 'auto')")
    try:
        return _decode_decord(data, times, num_threads)
    except CorruptVideoError as e:
        if backend == "decord" or e.reason.startswith("clip is shorter"):
            raise
        try:
            return _decode_pyav(data, times, num_threads)
        except CorruptVideoError as e2:
            raise CorruptVideoError(f"{e.reason}; {e2.reason}") from None


def resize_crop(frames: np.ndarray, height: int, width: int, rng: np.random.Generator | None = None,
                out: torch.Tensor | None = None) -> torch.Tensor:
    """frames (T, H, W, 3) uint8 -> (3, T, height, width) float32 in [-1, 1]: cover the box, then crop.

    The aspect ratio is kept (the shorter side fits the box); the crop is centred, or uniform when rng is given.
    Writes into `out` (3, T, height, width) when given, e.g. a slot of a preallocated batch; a uint8 `out`
    gets the pixels unconverted (0..255).
    """
    t, h, w, _ = frames.shape
    x = torch.from_numpy(np.ascontiguousarray(frames)).permute(0, 3, 1, 2)  # (T, 3, H, W), channels-last
    scale = max(height / h, width / w)
    rh, rw = max(height, round(h * scale)), max(width, round(w * scale))
    if (rh, rw) != (h, w):
        # uint8 in channels-last takes torch's vectorised path, ~20x faster than float32; the result is rounded
        # to uint8, as torchvision's resize of uint8 images is.
        x = F.interpolate(x, size=(rh, rw), mode="bilinear", antialias=True, align_corners=False)
    top, left = (rh - height) // 2, (rw - width) // 2
    if rng is not None:
        top, left = int(rng.integers(0, rh - height + 1)), int(rng.integers(0, rw - width + 1))
    x = x[:, :, top:top + height, left:left + width]
    if out is None:
        out = torch.empty(3, t, height, width)
    out.copy_(x.permute(1, 0, 2, 3))
    # Cropped before converting: only kept pixels become float, and uint8 / 127.5 - 1 never leaves [-1, 1].
    return out if out.dtype == torch.uint8 else out.mul_(1 / 127.5).sub_(1.0)


def to_unit_range(video: torch.Tensor) -> torch.Tensor:
    """uint8 pixels (any shape, any device) -> float32 in [-1, 1], as resize_crop returns them."""
    return video.to(torch.float32).mul_(1 / 127.5).sub_(1.0)


def as_rgb255(video: np.ndarray, value_range: tuple[float, float] | None = None) -> np.ndarray:
    """A (T, H, W, 3) video as float32 in [0, 255], from uint8 or from floats in value_range ((0, 1) when
    None); the detectors of generated videos (prompt adherence, audio-video sync) read pixels this way."""
    video = np.asarray(video)
    if video.ndim != 4 or video.shape[-1] != 3:
        raise ValueError(f"video must be (T, H, W, 3), got shape {video.shape}")
    if value_range is None:
        value_range = (0.0, 255.0) if np.issubdtype(video.dtype, np.integer) else (0.0, 1.0)
    lo, hi = value_range
    return np.clip((video.astype(np.float32) - lo) * (255.0 / (hi - lo)), 0.0, 255.0)
