"""Writing generated videos: H.264 mp4 files (PyAV) and PNG grids of frames (Pillow)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch


def to_uint8(video: torch.Tensor) -> np.ndarray:
    """(3, T, H, W) in [-1, 1] -> (T, H, W, 3) uint8."""
    x = ((video.detach().float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return x.permute(1, 2, 3, 0).cpu().numpy()


def write_mp4(frames: np.ndarray, path: str | Path, fps: float, crf: int = 18) -> Path:
    """(T, H, W, 3) uint8 -> an H.264 mp4 (yuv420p needs even sizes: odd edges are padded by one pixel)."""
    import av

    t, h, w, _ = frames.shape
    frames = np.pad(frames, ((0, 0), (0, h % 2), (0, w % 2), (0, 0)), mode="edge")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with av.open(str(path), mode="w") as container:
        stream = container.add_stream("libx264", rate=max(1, round(fps)))
        stream.width, stream.height, stream.pix_fmt = frames.shape[2], frames.shape[1], "yuv420p"
        stream.options = {"crf": str(crf)}
        for frame in frames:
            container.mux(stream.encode(av.VideoFrame.from_ndarray(np.ascontiguousarray(frame), format="rgb24")))
        container.mux(stream.encode())
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
