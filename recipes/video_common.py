"""What the video recipes share: the data section of their configs and how it becomes a stream."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import torch

from framework.config import ConfigError
from framework.data.buckets import parse_buckets
from framework.data.video import VideoStream
from framework.data.video_decode import to_unit_range


@dataclass
class VideoDataConfig:
    dir: str = "datasets/shapes"  # train/ and val/ shard folders (data/make_shapes_dataset.py, data/video_shards.py)
    fps: float = 8.0  # clips are sampled at this frame rate, by timestamps
    buckets: list[str] = field(default_factory=lambda: ["64x64x17:8"])  # HEIGHTxWIDTHxFRAMES:BATCH per rank
    num_workers: int = 1  # decoding processes per rank
    max_skip_fraction: float = 0.05  # corrupt or unreadable clips tolerated before the run stops
    random_crop: bool = False
    uint8: bool = True  # workers ship uint8 frames (4x less memory traffic); scaled to [-1, 1] on the device
    latents: str = ""  # video_dit: a latent cache from launch/cache_latents.py to train from; "" encodes online
    # Audio of each clip's time window (batch["audio"], ["audio_mask"]): samples per second, 0 = no audio.
    audio_rate: int = 0
    audio_channels: int = 1  # 1 (mono) or 2 (stereo)
    missing_audio: Literal["skip", "silent"] = "silent"  # a clip without audio: replaced, or zeros with mask False


def video_stream(data: VideoDataConfig, split: str, rank: int, world: int, seed: int,
                 batch_multiple: int = 1, num_workers: int | None = None) -> VideoStream:
    """A VideoStream over `data.dir/split`; dataset problems become ConfigErrors naming the keys."""
    path = Path(data.dir) / split
    if not (path / "index.json").is_file():
        raise ConfigError(f"data.dir: no shards at {path} (index.json missing); make the default dataset with "
                          f"`python data/make_shapes_dataset.py --out {data.dir}` or shard your videos with "
                          f"data/video_shards.py")
    try:
        buckets = parse_buckets(data.buckets)
    except ValueError as e:
        raise ConfigError(f"data.buckets: {e}") from e
    try:
        return VideoStream(str(path), buckets, rank=rank, world=world, seed=seed, fps=data.fps,
                           batch_multiple=batch_multiple,
                           num_workers=data.num_workers if num_workers is None else num_workers,
                           max_skip_fraction=data.max_skip_fraction, random_crop=data.random_crop,
                           uint8=data.uint8, audio_rate=data.audio_rate, audio_channels=data.audio_channels,
                           missing_audio=data.missing_audio)
    except ValueError as e:
        raise ConfigError(f"data ({split} split): {e}") from e


def video_tensor(batch: dict) -> torch.Tensor:
    """The batch's clips as float32 (B, 3, T, H, W) in [-1, 1], wherever they are (uint8 or float)."""
    video = batch["video"]
    return to_unit_range(video) if video.dtype == torch.uint8 else video


def check_vae_buckets(buckets: list[str], micro_batch: int, compression: tuple[int, int, int]) -> None:
    """Every bucket must fit the VAE's compression (time, height, width), e.g. 1 + 4k frames and sizes divisible
    by 8 for the 4x8x8 causal VAE, any frame count for a per-frame one: say so before any work starts.

    A bucket's batch size is the micro-batch of a step in that bucket; train.micro_batch must name the
    largest, since gradient accumulation (global_batch / (micro_batch x world)) is derived from it.
    """
    try:
        parsed = parse_buckets(buckets)
    except ValueError as e:
        raise ConfigError(f"data.buckets: {e}") from e
    ct, ch, cw = compression
    for spec, b in zip(buckets, parsed):
        if (b.frames - 1) % ct:
            raise ConfigError(f"data.buckets: {spec!r} has {b.frames} frames; the causal VAE needs 1 + {ct}k")
        if b.height % ch or b.width % cw:
            size = ch if ch == cw else f"{ch}x{cw}"
            raise ConfigError(f"data.buckets: {spec!r} is {b.height}x{b.width}; the VAE needs multiples of {size}")
    largest = max(b.batch_size for b in parsed)
    if micro_batch != largest:
        raise ConfigError(f"train.micro_batch={micro_batch} but the largest bucket batch in data.buckets is "
                          f"{largest}: video recipes take each step's micro-batch from its bucket; set "
                          f"train.micro_batch={largest}")
