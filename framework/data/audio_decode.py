"""Decode the audio of a clip's time window with PyAV: resampled, placed by presentation time on the video's
clock, cut to exactly the window and padded with a validity mask.

Time 0 is what decode_clip calls 0: the video stream's start time (decord and the PyAV path both measure
frames from it). An audio sample decoded with timestamp pts plays at pts * time_base - that start, whatever
the audio stream's own start time, so a track that starts late, or a container that shifts every stream
(Matroska, MPEG-TS), stays in sync. A file without a video stream (a KEY.flac / KEY.wav sidecar) starts at
its own start time: its first sample plays with the video's first frame.

Damaged input costs only what is damaged: a packet the decoder refuses (a corrupt frame of an AC3 track) is left
out and the window's mask cleared over its span, instead of failing the whole clip.

PyAV only: decord's AVReader leaks memory.
"""

from __future__ import annotations

import io
import math
from fractions import Fraction

import av
import numpy as np

from framework.data.video_decode import CorruptVideoError

LAYOUTS = {1: "mono", 2: "stereo"}
MISSING_AUDIO = ("skip", "silent")
# After a seek the decoder needs earlier packets (AAC's MDCT overlaps the previous frame): decode from this long
# before the window. Windows starting earlier than this decode from the beginning.
_PREROLL = 0.5
_TAIL = 0.05  # seconds decoded past the window: the resampler's filter looks a few samples ahead
# Frame timestamps off by less than this from where the previous frame ended are muxer/codec jitter (MP3 in mp4 or
# mkv wobbles by +-35 samples, ~0.8 ms at 44.1 kHz), not gaps: the audio is appended contiguously. Re-placing by
# each jittered timestamp restarted the resampler every frame and left ~12-sample holes of zeros. At most this
# much real offset can be absorbed: a tenth of a frame at 25 fps.
_JITTER = 0.004


class NoAudioError(CorruptVideoError):
    """The file has no audio stream, or one without a single decodable frame."""


def window_samples(duration: float, rate: int) -> int:
    """Samples a window of `duration` seconds holds at `rate`: round(duration * rate)."""
    return round(duration * rate)


def _clip_origin(data: bytes, container: av.container.InputContainer) -> float | None:
    """Seconds on the container's clock that are time 0 of the clip (None: the first audio frame's time)."""
    if not container.streams.video:
        audio = container.streams.audio[0]
        return None if audio.start_time is None else float(audio.start_time * audio.time_base)
    video = container.streams.video[0]
    if video.start_time is not None:
        return float(video.start_time * video.time_base)
    # No start time in the header: decode_clip's PyAV path then counts from the first decoded frame; so do we.
    with av.open(io.BytesIO(data), mode="r") as probe:
        stream = probe.streams.video[0]
        for frame in probe.decode(stream):
            if frame.pts is not None:
                return float(frame.pts * stream.time_base)
    raise CorruptVideoError("video stream has no frame with a timestamp")


def tolerance(time_base: float, sample_rate: int) -> float:
    """Seconds a frame's timestamp may be off from the previous frame's end and still count as contiguous:
    jitter (_JITTER), or one tick of the time base plus one sample where the time base is coarser."""
    return max(_JITTER, time_base + 1 / sample_rate)


class _Placer:
    """Writes resampled audio into the window. Each run of contiguous input frames (a segment) gets its own
    resampler, anchored at its first frame's time: libswresample adds no delay (its output sample k is the
    input time first_pts + k / rate, checked in tests/unit/test_audio_loader.py), so sample k of a segment
    lands at window index round((anchor - start) * rate) + k: the nearest sample, within half a sample (31 us
    at 16 kHz; a window decoded after a seek may differ from one decoded from the beginning by that much phase
    when the rates differ). A gap, an overlap or a format change in the input (frames whose time is off from
    the previous frame's end by more than `tolerance`) flushes the resampler and starts a new segment, so both
    sides keep their own times; smaller deviations are timestamp jitter and the frame is appended."""

    def __init__(self, samples: np.ndarray, valid: np.ndarray, start: float, rate: int) -> None:
        self.samples, self.valid, self.start, self.rate = samples, valid, start, rate
        self.resampler: av.AudioResampler | None = None
        self.key: tuple | None = None
        self.base = self.done = 0
        self.expected = 0.0  # clip time right after the previous frame

    def add(self, frame: av.AudioFrame, t: float, slack: float) -> None:
        key = (frame.format.name, frame.layout.name, frame.sample_rate)
        if self.resampler is None or key != self.key or abs(t - self.expected) > slack:
            self.flush()
            layout = LAYOUTS[self.samples.shape[0]]
            self.resampler = av.AudioResampler(format="fltp", layout=layout, rate=self.rate)
            self.key, self.base, self.done = key, round((t - self.start) * self.rate), 0
            self.expected = t
        self.expected += frame.samples / frame.sample_rate
        for out in self.resampler.resample(frame):
            self._put(out)

    def skip(self, until: float) -> None:
        """A refused packet covered clip time up to `until`: end the segment there (the audio after it is not
        contiguous with the audio before); a frame without a timestamp after it is placed at `until`."""
        self.flush()
        self.expected = max(self.expected, until)

    def flush(self) -> None:
        if self.resampler is not None:
            for out in self.resampler.resample(None):
                self._put(out)
            self.resampler = None

    def _put(self, out: av.AudioFrame) -> None:
        chunk = out.to_ndarray()  # (channels, k) float32: fltp is planar
        lo = self.base + self.done
        self.done += chunk.shape[1]
        a, b = max(lo, 0), min(lo + chunk.shape[1], self.valid.size)
        if a < b:
            self.samples[:, a:b] = chunk[:, a - lo:b - lo]
            self.valid[a:b] = True


def _clip_time(pts: int, tb: Fraction, origin: float | None) -> tuple[float, float]:
    """(clip time of a timestamp, origin): with no origin yet, the first timestamp read is time 0."""
    origin = float(pts * tb) if origin is None else origin
    return float(pts * tb) - origin, origin


def _decode_packet(packet: av.Packet) -> list[av.AudioFrame] | None:
    """The packet's frames; None when the decoder refuses the packet (corrupt data): it is left out and the
    decoder goes on with the next one, as players do (a refused end-of-stream flush only loses the tail)."""
    try:
        return packet.decode()
    except av.FFmpegError:
        return None


def _clear(samples: np.ndarray, valid: np.ndarray, spans: list[tuple[float, float]], start: float,
           rate: int) -> None:
    """Zero the samples and the mask over each (t0, t1) clip-time span."""
    for t0, t1 in spans:
        a, b = max(round((t0 - start) * rate), 0), min(round((t1 - start) * rate), valid.size)
        if a < b:
            samples[:, a:b] = 0.0
            valid[a:b] = False


def _decode(data: bytes, start: float, n: int, rate: int, channels: int, seek: float | None) -> tuple:
    """(samples, valid, clip time of the first decoded frame: None when there was none, packets refused)."""
    samples, valid = np.zeros((channels, n), np.float32), np.zeros(n, bool)
    end = start + n / rate
    with av.open(io.BytesIO(data), mode="r") as container:
        if not container.streams.audio:
            raise NoAudioError("no audio stream")
        stream = container.streams.audio[0]
        origin = _clip_origin(data, container)
        tb = stream.time_base
        if seek is not None and origin is not None:
            try:
                container.seek(math.floor((seek + origin) / tb), stream=stream)
            except av.FFmpegError:
                pass  # decode from the beginning: slower, never wrong
        placer, first, bad, done = _Placer(samples, valid, start, rate), None, [], False
        for packet in container.demux(stream):
            frames = _decode_packet(packet)
            if frames is None:
                t = placer.expected
                if packet.pts is not None:
                    t, origin = _clip_time(packet.pts, tb, origin)
                bad.append((t, t + float((packet.duration or 0) * tb)))
                placer.skip(bad[-1][1])
                done = t >= end + _TAIL
            for frame in frames or ():
                t = placer.expected  # a raw stream without timestamps: continue where the last frame ended
                if frame.pts is not None:
                    t, origin = _clip_time(frame.pts, tb, origin)
                first = t if first is None else first
                placer.add(frame, t, tolerance(float(tb), frame.sample_rate))
                done = t >= end + _TAIL
                if done:
                    break
            if done:
                break
        placer.flush()
    # A demuxer's parser may merge a corrupt frame into its neighbour: then both spans end up masked.
    _clear(samples, valid, bad, start, rate)
    return samples, valid, first, len(bad)


def decode_audio_window(data: bytes, start: float, duration: float, rate: int,
                        channels: int = 1) -> tuple[np.ndarray, np.ndarray]:
    """Audio of [start, start + duration) seconds of the clip clock, from a video's (or audio file's) bytes.

    Returns samples (channels, round(duration * rate)) float32 and valid (round(duration * rate),) bool:
    sample i is the audio at start + i / rate; where the file has no audio (before the track starts, after it
    ends, in gaps, over a corrupt packet the decoder refused) samples are 0 and valid is False. Mono and
    stereo are mixed by libswresample. Raises NoAudioError when the file has no audio stream or no audio frame,
    CorruptVideoError when it cannot be decoded (also when the decoder refused every packet it was given).
    """
    if rate <= 0 or channels not in LAYOUTS or duration <= 0 or start < 0:
        raise ValueError(f"need rate > 0, channels in {tuple(LAYOUTS)}, duration > 0 and start >= 0; got rate "
                         f"{rate}, channels {channels}, duration {duration}, start {start}")
    n = window_samples(duration, rate)
    try:
        # Seeking saves decoding the audio before the window (AAC decodes at ~1000x real time: it matters for
        # minutes-long files only). A demuxer may land after the target: then decode from the beginning.
        seek = start - _PREROLL if start > 2 * _PREROLL else None
        samples, valid, first, refused = _decode(data, start, n, rate, channels, seek)
        if seek is not None and (first is None or first > seek + 1e-6):
            samples, valid, first, refused = _decode(data, start, n, rate, channels, None)
    except CorruptVideoError:
        raise
    except (av.FFmpegError, OSError, ValueError, EOFError) as e:
        raise CorruptVideoError(f"pyav audio: {type(e).__name__}: {e}") from None
    if first is None and refused:
        raise CorruptVideoError(f"pyav audio: the decoder refused all {refused} audio packets it was given")
    if first is None:
        raise NoAudioError("audio stream has no decodable frame")
    return samples, valid
