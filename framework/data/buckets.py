"""Video buckets (resolution, frames, batch size): which bucket a clip goes to, and each epoch's bucket order."""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

import numpy as np

_SPEC = re.compile(r"^\s*(\d+)\s*x\s*(\d+)\s*x\s*(\d+)\s*:\s*(\d+)\s*$")
_FIELDS = ("height", "width", "frames", "batch_size")


@dataclass(frozen=True)
class Bucket:
    """Clips of frames x height x width pixels, batch_size of them per micro-batch."""

    height: int
    width: int
    frames: int
    batch_size: int

    def __post_init__(self) -> None:
        for name in _FIELDS:
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"bucket {name} must be a positive int, got {value!r}")

    @property
    def aspect(self) -> float:
        """width / height."""
        return self.width / self.height

    def seconds(self, fps: float) -> float:
        """Video time one clip of this bucket spans when sampled at fps."""
        return self.frames / fps


def parse_buckets(specs: list[dict | str | Bucket]) -> list[Bucket]:
    """Buckets from dicts {height, width, frames, batch_size} or strings "HxWxF:B" (e.g. "256x448x16:2")."""
    if not specs:
        raise ValueError("need at least one bucket")
    out = []
    for spec in specs:
        if isinstance(spec, Bucket):
            out.append(spec)
        elif isinstance(spec, str):
            m = _SPEC.match(spec)
            if m is None:
                raise ValueError(f"bucket {spec!r} is not 'HEIGHTxWIDTHxFRAMES:BATCH', e.g. '256x448x16:2'")
            out.append(Bucket(*map(int, m.groups())))
        elif isinstance(spec, dict):
            if set(spec) != set(_FIELDS):
                raise ValueError(f"bucket {spec!r} needs exactly the keys {_FIELDS}")
            out.append(Bucket(**spec))
        else:
            raise ValueError(f"bucket {spec!r} must be a dict or a 'HxWxF:B' string")
    if len(set(out)) != len(out):
        raise ValueError(f"duplicate buckets in {specs}")
    return out


def usable_duration(meta: dict) -> float:
    """Seconds of video an item surely has: its duration, capped by frames / fps (containers may overstate)."""
    duration = float(meta["duration"])
    if meta.get("frames") and meta.get("fps"):
        duration = min(duration, meta["frames"] / meta["fps"])
    return duration


def assign_bucket(item_meta: dict, buckets: list[Bucket], fps_target: float) -> int | None:
    """Bucket id for a clip {width, height, duration[, frames, fps]}, or None when it is too short for all.

    Among buckets whose frames / fps_target fits in the clip: the closest aspect ratio (compared in log space,
    so 2:1 and 1:2 are equally far from 1:1), then the most frames, then the largest size that needs no
    upscaling (or, when all of them upscale, the least upscaling).
    """
    h, w, duration = item_meta["height"], item_meta["width"], usable_duration(item_meta)
    log_aspect = math.log(w / h)

    def rank(i: int) -> tuple:
        b = buckets[i]
        upscales = b.height > h or b.width > w
        # Rounded so buckets of the same aspect ratio (64x64, 128x128) tie exactly.
        return (round(abs(math.log(b.aspect) - log_aspect), 9), -b.frames, upscales,
                b.height * b.width * (1 if upscales else -1))

    fits = [i for i, b in enumerate(buckets) if b.seconds(fps_target) <= duration + 1e-6]
    return min(fits, key=rank) if fits else None


def epoch_schedule(counts_per_rank: list[dict[int, int]], buckets: list[Bucket], seed: int, epoch: int,
                   batch_multiple: int = 1) -> list[int]:
    """Bucket id of every micro-batch of the epoch, the same list on every rank.

    Bucket b gets n_b = min over ranks of floor(count / batch_size) batches, rounded down to whole blocks of
    batch_multiple; blocks (all micro-batches of one optimizer step) are shuffled from (seed, epoch).
    """
    if batch_multiple < 1:
        raise ValueError(f"batch_multiple must be >= 1, got {batch_multiple}")
    if not counts_per_rank:
        raise ValueError("counts_per_rank needs one dict per rank")
    blocks = []
    for b, bucket in enumerate(buckets):
        n = min(counts.get(b, 0) // bucket.batch_size for counts in counts_per_rank)
        blocks += [b] * (n // batch_multiple)
    order = np.random.default_rng([seed, epoch]).permutation(len(blocks))
    return [blocks[i] for i in order.tolist() for _ in range(batch_multiple)]
