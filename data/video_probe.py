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
    fps, tb = float(rate), stream.time_base
    frame, packets, start, end, keys = _scan_packets(container, stream)
    frames = min(stream.frames, packets) if stream.frames and packets else stream.frames or packets
    if stream.duration and tb:
        duration = float(stream.duration * tb)
    elif start is not None and end is not None and end > start and tb:
        duration = float((end - start) * tb)
    else:
        duration = frames / fps
    if start is not None and keys[1] is not None and tb:
        # From the keyframe before the last: a seek to the last one itself can land past its packet (MPEG-PS).
        decoded = _decoded_end(container, stream, keys[0] if keys[0] is not None else start, fps)
        if decoded is None:
            raise ProbeError("truncated or damaged: no frame of the last keyframe's group decodes")
        decoded = float((decoded - start) * tb)
        # Two frames of slack: MPEG-PS timestamps after a seek can sit 1.5 frames off (see video_decode.py).
        if decoded < duration - 2 / fps - 0.1:
            raise ProbeError(f"truncated or damaged: the header says {duration:.2f}s but frames decode only to "
                             f"{decoded:.2f}s")
        span = float((end - start) * tb) if end is not None and end > start else decoded
        if abs(span - duration) > 1 / fps:  # a header without a true length (MPEG-PS guesses it from bitrate)
            duration, frames = span, packets
    return {"fps": fps, "frames": int(frames), "width": int(frame.width), "height": int(frame.height),
            "duration": duration, "has_audio": bool(container.streams.audio)}


def _scan_packets(container: av.container.InputContainer, stream) -> tuple:
    """(first decoded frame, packet count, first pts, end pts, the last two keyframes' pts) of the stream.

    Decoding one frame proves the stream is real (a header alone can survive corruption) and gives the true
    size. Every video packet is counted and timed (demuxing reads the file but decodes nothing): mkv, webm and
    avi headers may lack the frame count (and the container duration counts audio too), and a truncated file
    keeps the header of the whole one.
    """
    frame, packets, start, end, keys = None, 0, None, None, [None, None]
    for packet in container.demux(stream):
        if frame is None:
            frame = next(iter(packet.decode()), None)  # the final empty packet flushes the decoder's delay
        if packet.size == 0:
            continue  # the demuxer's end-of-stream marker, not a frame
        packets += 1
        if packet.pts is not None:
            start = packet.pts if start is None else min(start, packet.pts)
            end = max(end or packet.pts, packet.pts + (packet.duration or 0))
            if packet.is_keyframe:
                keys = [keys[1], packet.pts]
    if frame is None:
        raise ProbeError("video stream has no decodable frame")
    return frame, packets, start, end, keys


def _decoded_end(container: av.container.InputContainer, stream, key: int, fps: float) -> int | None:
    """End (pts, stream time base) of the last frame that really decodes: decode from keyframe `key` on."""
    container.seek(key, stream=stream, backward=True)
    end = None
    try:
        for frame in container.decode(stream):
            if frame.pts is not None:
                step = frame.duration or round(1 / (fps * stream.time_base))
                end = max(end or frame.pts, frame.pts + step)
    except (av.FFmpegError, OSError, ValueError, EOFError):
        pass  # a cut or damaged last packet: the frames before it count
    return end
