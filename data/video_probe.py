"""Probe a video's metadata (fps, frames, size, duration, audio) with PyAV; shared by the video data tools."""

from __future__ import annotations

import io
from pathlib import Path

import av


class ProbeError(Exception):
    """A video could not be probed: unreadable, corrupt, or without a decodable video stream."""


def probe_video(source: str | Path | bytes) -> dict:
    """{fps, frames, width, height, duration, has_audio} of a video file or its bytes; raises ProbeError."""
    try:
        with av.open(io.BytesIO(source) if isinstance(source, bytes) else str(source), mode="r") as container:
            return _probe_container(container)
    except ProbeError:
        raise
    except av.FFmpegError as e:
        raise ProbeError(e.strerror or str(e)) from None  # the path is the caller's to add
    except (OSError, ValueError, EOFError) as e:
        raise ProbeError(f"{type(e).__name__}: {e}") from None


def _probe_container(container: av.container.InputContainer) -> dict:
    if not container.streams.video:
        raise ProbeError("no video stream")
    stream = container.streams.video[0]
    rate = stream.average_rate or stream.guessed_rate or stream.base_rate
    if not rate or rate <= 0:
        raise ProbeError("video stream has no frame rate")
    fps = float(rate)
    # Decoding one frame proves the stream is real (a header alone can survive corruption) and gives the true
    # size. mkv/webm/avi headers may lack the frame count (and the container duration counts audio too): then
    # the video packets are counted and timed, which reads the file but decodes nothing more.
    count_packets = not stream.frames
    frame, packets, start, end = None, 0, None, None
    for packet in container.demux(stream):
        if frame is None:
            frame = next(iter(packet.decode()), None)  # the final empty packet flushes the decoder's delay
        elif not count_packets:
            break
        if packet.size == 0:
            continue  # the demuxer's end-of-stream marker, not a frame
        packets += 1
        if packet.pts is not None:
            start = packet.pts if start is None else min(start, packet.pts)
            end = max(end or packet.pts, packet.pts + (packet.duration or 0))
    if frame is None:
        raise ProbeError("video stream has no decodable frame")
    frames = stream.frames or packets
    if stream.duration and stream.time_base:
        duration = float(stream.duration * stream.time_base)
    elif start is not None and end is not None and end > start and stream.time_base:
        duration = float((end - start) * stream.time_base)
    else:
        duration = frames / fps
    return {"fps": fps, "frames": int(frames), "width": int(frame.width), "height": int(frame.height),
            "duration": duration, "has_audio": bool(container.streams.audio)}
