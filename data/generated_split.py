"""Write one split of a generated video dataset: labels in a seeded cycle, clips made on worker processes."""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Iterator, Sequence
from multiprocessing import Pool
from pathlib import Path

import numpy as np
from tqdm import tqdm
from video_shards import Sample, write_samples

MIN_SHARDS = 8  # each split gets at least this many shards (when it has the samples), to feed ranks x workers


def _make_indexed(make_sample: Callable[..., Sample], job: tuple[int, object], **kw: object) -> Sample:
    return make_sample(job[0], label=job[1], **kw)


def write_generated_split(make_sample: Callable[..., Sample], labels: Sequence, out_dir: str | Path, split: str,
                          split_stream: int, num: int, seed: int, workers: int = 1, shard_samples: int = 64,
                          progress: bool = True, **sample_kwargs: object) -> dict:
    """Make num clips with make_sample(index, label=..., split=, seed=, **sample_kwargs) and shard them.

    Labels cycle through every combination in a (seed, split_stream)-shuffled order, so each split is
    balanced; make_sample must be a module-level function (it is pickled to the workers). Returns the
    shard index.
    """
    order = np.random.default_rng([seed, split_stream]).permutation(num) % len(labels)
    jobs = [(i, labels[k]) for i, k in enumerate(order)]
    make = functools.partial(_make_indexed, make_sample, split=split, seed=seed, **sample_kwargs)
    per_shard = min(shard_samples, max(1, math.ceil(num / MIN_SHARDS)))

    def samples() -> Iterator[Sample]:
        bar = dict(total=num, desc=split, unit="clip", disable=not progress)
        if workers <= 1:
            yield from tqdm(map(make, jobs), **bar)
            return
        with Pool(workers) as pool:
            yield from tqdm(pool.imap(make, jobs, chunksize=8), **bar)

    return write_samples(samples(), out_dir, shard_bytes=1 << 40, shard_samples=per_shard)
