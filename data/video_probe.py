"""Probe a video's metadata (fps, frames, size, duration, audio) with PyAV; shared by the video data tools."""

from __future__ import annotations

import io
from pathlib import Path

import av


class ProbeError(Exception):
    """A video could not be probed: unreadable, corrupt, or without a decodable video stream."""


def probe_video(source: str | Path | bytes) -> dict:
    """Metadata of a video file or its bytes: {fps, frames, width, height, duration, has_audio}; raises ProbeError."""
    try:
        with av.open(io.BytesIO(source) if isinstance(source, bytes) else str(source), mode="r") as container:
            return _probe_container(container)
    except ProbeError:
        raise
    except (av.FFmpegError, OSError, ValueError, EOFError, StopIteration) as e:
        raise ProbeError(f"{type(e).__name__}: {e}") from None


def _probe_container(container: av.container.InputContainer) -> dict:
    if not container.streams.video:
        raise ProbeError("no video stream")
    stream = container.streams.video[0]
    rate = stream.average_rate or stream.guessed_rate or stream.base_rate
    if not rate or rate <= 0:
        raise ProbeError("video stream has no frame rate")
    fps = float(rate)
    if stream.duration is not None and stream.time_base is not None:
        duration = float(stream.duration * stream.time_base)
    elif container.duration is not None:
        duration = container.duration / av.time_base
    else:
        duration = 0.0
    # Decoding one frame proves the stream is real (a header alone can survive corruption) and gives the true
    # size where the codec parameters leave it out.
    frame = next(container.decode(video=0), None)
    if frame is None:
        raise ProbeError("video stream has no decodable frame")
    # mkv/webm record no frame count in the header: derive it from the duration then.
    frames = stream.frames or round(duration * fps)
    if duration <= 0:
        duration = frames / fps
    if frames <= 0:
        raise ProbeError("video stream has no frames")
    return {"fps": fps, "frames": int(frames), "width": int(frame.width), "height": int(frame.height),
            "duration": float(duration), "has_audio": bool(container.streams.audio)}
