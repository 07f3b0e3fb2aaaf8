"""Writing generated videos: H.264 mp4 files (PyAV) and PNG grids of frames (Pillow)."""

from __future__ import annotations

from fractions import Fraction
from pathlib import Path

import numpy as np
import torch


def to_uint8(video: torch.Tensor) -> np.ndarray:
    """(3, T, H, W) in [-1, 1] -> (T, H, W, 3) uint8."""
    x = ((video.detach().float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return x.permute(1, 2, 3, 0).cpu().numpy()


def write_mp4(frames: np.ndarray, path: str | Path, fps: float, crf: int = 18, audio: np.ndarray | None = None,
              audio_rate: int = 16000, audio_bitrate: int = 64000) -> Path:
    """(T, H, W, 3) uint8 -> an H.264 mp4 (yuv420p needs even sizes: odd edges are padded by one pixel).

    audio (N,) or (channels, N) float in [-1, 1] adds an AAC track starting with the first frame (the
    encoder's priming delay goes into the mp4 edit list, so players and PyAV decode it at pts 0).
    """
    import av

    t, h, w, _ = frames.shape
    frames = np.pad(frames, ((0, 0), (0, h % 2), (0, w % 2), (0, 0)), mode="edge")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with av.open(str(path), mode="w") as container:
        stream = container.add_stream("libx264", rate=Fraction(fps).limit_denominator(1001))
        stream.width, stream.height, stream.pix_fmt = frames.shape[2], frames.shape[1], "yuv420p"
        stream.options = {"crf": str(crf)}
        sound = None
        if audio is not None:
            audio = np.atleast_2d(np.asarray(audio, dtype=np.float32)).clip(-1.0, 1.0)
            if audio.shape[0] not in (1, 2):
                raise ValueError(f"audio must be (N,) or (channels <= 2, N), got shape {audio.shape}")
            sound = container.add_stream("aac", rate=audio_rate)
            sound.layout, sound.bit_rate = ("mono" if audio.shape[0] == 1 else "stereo"), audio_bitrate
        for frame in frames:
            container.mux(stream.encode(av.VideoFrame.from_ndarray(np.ascontiguousarray(frame), format="rgb24")))
        container.mux(stream.encode())
        if sound is not None:
            samples = av.AudioFrame.from_ndarray(np.ascontiguousarray(audio), format="fltp", layout=sound.layout.name)
            samples.sample_rate, samples.pts = audio_rate, 0
            container.mux(sound.encode(samples))  # PyAV cuts it into the encoder's 1024-sample frames
            container.mux(sound.encode())
    return path


def write_grid_png(videos: list[np.ndarray], path: str | Path, max_frames: int = 8) -> Path:
    """One row per video, `max_frames` evenly spaced frames per row, as a PNG."""
    from PIL import Image

    rows = []
    for v in videos:
        idx = np.linspace(0, len(v) - 1, min(max_frames, len(v))).round().astype(int)
        rows.append(np.concatenate([v[i] for i in idx], axis=1))
    width = max(r.shape[1] for r in rows)
    grid = np.concatenate([np.pad(r, ((0, 0), (0, width - r.shape[1]), (0, 0))) for r in rows], axis=0)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(grid).save(path)
    return path
