"""Decode the frames of a clip at given timestamps from video bytes (decord, PyAV fallback); resize and crop."""

from __future__ import annotations

import collections
import heapq
import io
import itertools
import math
import re
from fractions import Fraction

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
_TICK_SLACK = 5e-4  # seconds: half a millisecond, the tick of Matroska/WebM times (see _slack)
_F32_ULPS = 4  # float32 steps of slack for decord's float32 frame times (see _slack)
_WIDE_REORDER = 16  # frames: the widest reordering PyAV's frame times are searched over (H.264 allows 16)
_SEEK_AFTER = 2.0  # seconds: clips starting later seek to their keyframe instead of decoding from the start
_SEEK_BACK = 2.0  # seconds: how much earlier a second seek aims when the first landed after the clip's start


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


def _slack(times: np.ndarray, float32_stamps: bool) -> np.ndarray:
    """Per-time tolerance (seconds) when comparing a requested time with frame start times.

    Containers store times in ticks: Matroska/WebM in whole milliseconds, so frame k of a 30000/1001 fps video
    is up to 0.5 ms off k * 1001 / 30000, the time a clip start snapped to the source's frame grid asks for:
    half a millisecond of slack keeps such starts on their frame. decord's times are float32 on top of that:
    at 3600 s one float32 step is 244 us, so a start rounded up by it handed the time on the frame boundary to
    the frame before (the issue's 80 s AVI lost 31 of 134 frames past 32 s, where a step passes 1 us); four
    steps at that magnitude cover the rounding of pts x time base. Both stay far below a frame interval.
    """
    slack = np.full(times.shape, _EPS + _TICK_SLACK)
    if float32_stamps:
        slack += _F32_ULPS * np.spacing(np.abs(times).astype(np.float32)).astype(np.float64)
    return slack


def _frame_for(times: np.ndarray, starts: np.ndarray, end: float, slack: np.ndarray | float = _EPS) -> np.ndarray:
    """Index of the frame whose [start, next start) interval holds each time; the last one ends at `end`."""
    slack = np.broadcast_to(np.asarray(slack, np.float64), times.shape)
    _check_covered(times, end, slack)
    return np.clip(np.searchsorted(starts, times + slack, side="right") - 1, 0, len(starts) - 1)


def _check_covered(times: np.ndarray, end: float, slack: np.ndarray | float) -> None:
    if times.size and (np.any(times < -slack) or np.any(times >= end - slack)):
        raise CorruptVideoError(f"clip is shorter than requested: frames cover [0, {end:.3f})s, asked for "
                                f"[{times.min():.3f}, {times.max():.3f}]s")


def _container_kind(data: bytes) -> str | None:
    """'MPEG-TS' or 'MPEG-PS' from the first bytes, else None (their magic is fixed: no parsing needed)."""
    head = bytes(data[:400])
    for size, skip in ((188, 0), (192, 4)):  # transport stream packets; M2TS adds a 4-byte time code
        if len(head) > skip and head[skip] == 0x47 and (len(head) <= size + skip or head[size + skip] == 0x47):
            return "MPEG-TS"
    return "MPEG-PS" if head[:4] == b"\x00\x00\x01\xba" else None


def _stamps_problem(stamps: np.ndarray, fps: float) -> str | None:
    """Why decord's (N, 2) [start, end) frame times cannot be trusted, or None.

    decord reports placeholders (-3.7e17, -9.2e18) for frames whose pts it could not work out (AVI with
    B-frames, MPEG-PS) and then out-of-order times: picking frames by them returns wrong frames silently.
    """
    starts, end = stamps[:, 0], float(stamps[-1, 1])
    if not np.all(np.isfinite(stamps)):
        return "frame times are not finite"
    if starts.min() < -_EPS:
        return f"frame {int(np.argmin(starts))} starts at {starts.min():.3g}s (placeholder time)"
    back = np.nonzero(np.diff(starts) <= 0)[0]
    if back.size:
        return f"frame times do not increase at frame {int(back[0]) + 1}"
    if end <= starts[-1]:
        return f"the last frame ends at {end:.3f}s, before it starts"
    nominal = len(starts) / fps if fps > 0 else end
    if not 0.5 * nominal - 1 <= end <= 2 * nominal + 1:  # wide: variable frame rates land inside it
        return f"frames end at {end:.3f}s but {len(starts)} frames at {fps:.3f} fps last {nominal:.3f}s"
    return None


def _decord_reason(e: Exception) -> str:
    # decord prefixes its C++ log line ("[12:00:00] /path/video_reader.cc:486: Error: ..."): keep the reason.
    text = str(e).strip()
    return _DECORD_LOG.sub("", text.splitlines()[-1] if text else type(e).__name__)[:300]


def _decode_decord(data: bytes, times: np.ndarray, num_threads: int) -> np.ndarray:
    kind = _container_kind(data)
    if kind is not None:
        # Measured: decord returns frames 8-12 positions late from MPEG-TS and has no usable times for MPEG-PS,
        # while reporting plausible timestamps for TS: only a refusal keeps it from returning wrong frames.
        raise CorruptVideoError(f"decord: {kind} is decoded with PyAV (decord seeks in it to wrong frames)")
    try:
        reader = decord.VideoReader(io.BytesIO(data), num_threads=num_threads)
        if len(reader) == 0:
            raise CorruptVideoError("decord: video has no frames")
        # (N, 2) [start, end) seconds as float32, already relative to the stream's start time.
        stamps = np.asarray(reader.get_frame_timestamp(range(len(reader))), dtype=np.float64)
        problem = _stamps_problem(stamps, float(reader.get_avg_fps()))
        if problem:
            raise CorruptVideoError(f"decord: {problem}")
        idx = _frame_for(times, stamps[:, 0], float(stamps[-1, 1]), _slack(times, float32_stamps=True))
        return _numpy_view(reader.get_batch(idx.tolist()))
    except (DECORDError, RuntimeError) as e:  # decord raises plain RuntimeError when it cannot even open
        raise CorruptVideoError(f"decord: {_decord_reason(e)}") from None


def _numpy_view(batch) -> np.ndarray:
    """A decord NDArray's pixels as numpy without copying them: asnumpy() copies the clip into fresh memory
    (measured 0.4 ms per 480x832 frame, 5% of decoding it); the DLPack view keeps decord's buffer alive for as
    long as the array is."""
    return torch.from_dlpack(batch.to_dlpack()).numpy()


class _Reordered(Exception):
    """Frame times arrived further out of order than the reorder window: decode again with a wider one."""


class _Overshot(Exception):
    """A seek landed after the first requested time: seek further back, or decode from the start."""


def _decode_pyav(data: bytes, times: np.ndarray, num_threads: int) -> np.ndarray:
    import av  # only the fallback path needs PyAV (decord decodes where it is installed)

    # After a seek in an MPEG program stream FFmpeg hands each PES timestamp to a neighbouring frame (measured:
    # every frame half a frame late, or a keyframe 1.5 frames late): those decode from the start. A seek that
    # lands after the first time (AVI with B-frames times keyframes a few frames late) is retried further back.
    reorder = 1
    backs = [0.0, _SEEK_BACK, None] if _container_kind(data) != "MPEG-PS" else [None]  # seek this far before
    for _ in range(len(backs) + 1):  # retries: one with a wider reorder window, then seeks further back
        try:
            with av.open(io.BytesIO(data), mode="r") as container:
                if not container.streams.video:
                    raise CorruptVideoError("pyav: no video stream")
                stream = container.streams.video[0]
                stream.thread_count = num_threads
                return _pick_pyav(container, stream, times, reorder, backs[0])
        except _Reordered as e:
            if reorder == _WIDE_REORDER:
                raise CorruptVideoError(f"pyav: {e}") from None
            reorder = _WIDE_REORDER
        except _Overshot:
            backs.pop(0)
        except CorruptVideoError:
            raise
        except Exception as e:  # noqa: BLE001 - PyAV raises FFmpegError, OSError, ValueError, EOFError,
            # KeyError ... on damaged bytes: each is a property of the file, never a reason to stop a run.
            raise CorruptVideoError(f"pyav: {type(e).__name__}: {e}"[:400]) from None
    raise CorruptVideoError("pyav: frame times out of order and seeks overshot")


def _pick_pyav(container, stream, times: np.ndarray, reorder: int, back: float | None) -> np.ndarray:
    """Frames at `times` from an open container: decode (after a seek to `back` seconds before the first time
    unless None), pick, convert.

    Time 0 is the first frame's start: the smallest of the first frames' times (the stream's start_time can
    sit a frame early, as on AVI with B-frames). Only frames some time lands on are converted to RGB.
    """
    tb = stream.time_base
    frames = container.decode(stream)
    head = list(itertools.islice(frames, reorder + 1))
    if not head or any(f.pts is None for f in head):
        raise CorruptVideoError("pyav: video has no frames" if not head else "pyav: a frame has no timestamp")
    origin = min(f.pts for f in head)
    first = float(times.min())
    if back is not None and first - back > _SEEK_AFTER:
        # Seeking lands on the keyframe at or before the time: a long file costs one GOP, not its whole past.
        container.seek(origin + int(Fraction(first - back) / tb), stream=stream, backward=True)
        head, frames = [], container.decode(stream)
    rate = float(stream.average_rate or stream.guessed_rate or 0)

    def seconds(pts: int) -> float:
        return float((pts - origin) * tb)  # exact integer difference, then one rounding

    def last_step(frame) -> float:  # the final frame has no successor: it lasts its duration
        return float(frame.duration * tb) if frame.duration else (1 / rate if rate > 0 else 0.0)

    slack = _slack(times, float32_stamps=False)
    out: list[np.ndarray | None] = [None] * len(times)
    end = 0.0
    timed = _presentation_times(itertools.chain(head, frames), reorder, seconds, last_step)
    for n, (frame, start, end) in enumerate(timed):
        if n == 0 and start > _EPS and np.any(times < start - slack):
            raise _Overshot()
        if np.all(times < start - slack):
            break  # every time falls in an earlier frame
        hit = np.nonzero((times >= start - slack) & (times < end - slack))[0]
        if hit.size:
            rgb = frame.to_ndarray(format="rgb24")
            for i in hit:
                out[i] = rgb
    missing = [i for i, f in enumerate(out) if f is None]
    if missing:  # past the last frame's end, or before the first frame
        _check_covered(times[missing], end, slack[missing])
        raise CorruptVideoError(f"pyav: no frame holds time {times[missing[0]]:.3f}s")
    return np.stack(out)


def _presentation_times(frames, reorder: int, seconds, last_step):
    """(frame, start, end) seconds for decoded frames, in the order the decoder emits them (presentation order).

    Containers without presentation times (AVI) or with packed B-frames attach the times to the wrong frames
    (PyAV gave 1, 2, 3, 4, 6, 5, 8, 7, ... on an AVI with H.264 B-frames, frames themselves in order): the k-th
    frame out is shown at the k-th smallest time, taken from a heap once `reorder` later frames are in.
    """
    pending: collections.deque = collections.deque()
    heap: list[int] = []
    popped = None
    for frame in frames:
        if frame.pts is None:
            raise CorruptVideoError("pyav: a frame has no timestamp")
        if popped is not None and frame.pts < popped:
            raise _Reordered(f"frame times out of order by more than {reorder} frames")
        heapq.heappush(heap, frame.pts)
        pending.append(frame)
        if len(pending) > reorder + 1:
            popped = heapq.heappop(heap)
            yield pending.popleft(), seconds(popped), seconds(heap[0])
    while pending:  # the stream ended: the frames still waiting are the last ones
        frame, popped = pending.popleft(), heapq.heappop(heap)
        yield frame, seconds(popped), seconds(heap[0]) if heap else seconds(popped) + last_step(frame)


def decode_clip(data: bytes, times: np.ndarray, *, backend: str = "auto", num_threads: int = 1) -> np.ndarray:
    """Frames (T, H, W, 3) uint8 shown at each of times (T,) seconds from the stream start.

    Each time picks the frame whose presentation interval holds it; time 0 is the first frame's start. "auto"
    uses decord and retries with PyAV when decord fails (it knows fewer codecs) or reports frame times that
    cannot be trusted (placeholders, out of order, implausible against its frame count); MPEG-TS/PS go straight
    to PyAV. Raises CorruptVideoError when the bytes cannot be decoded or the video ends before the last time.
    """
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    times = np.asarray(times, dtype=np.float64)
    if times.ndim != 1 or times.size == 0:
        raise ValueError(f"times must be a non-empty 1-D array, got shape {times.shape}")
    if backend == "pyav" or (backend == "auto" and (not DECORD_AVAILABLE or _container_kind(data))):
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
    """uint8 pixels (any shape, any device) -> float32 in [-1, 1], as resize_crop returns them, in the contiguous
    layout whatever the input's (the loader's uint8 batches are a permuted view of frame-interleaved memory)."""
    out = torch.empty(video.shape, dtype=torch.float32, device=video.device)
    return out.copy_(video).mul_(1 / 127.5).sub_(1.0)


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
