"""Bucket parsing, bucket assignment by aspect and duration, and the per-epoch bucket schedule."""

from collections import Counter

import pytest

from framework.data.buckets import Bucket, assign_bucket, epoch_schedule, parse_buckets

FPS = 8.0


def meta(w, h, seconds, fps=24.0):
    return {"width": w, "height": h, "duration": seconds, "fps": fps, "frames": round(seconds * fps)}


def test_parse_buckets_strings_and_dicts():
    got = parse_buckets(["256x448x16:2", {"height": 64, "width": 64, "frames": 8, "batch_size": 4}])
    assert got == [Bucket(256, 448, 16, 2), Bucket(64, 64, 8, 4)]
    assert got[0].aspect == 448 / 256 and got[0].seconds(8.0) == 2.0
    for bad in (["256x448:2"], ["0x64x8:1"], [{"height": 64}], [], ["64x64x8:1", "64x64x8:1"], [3]):
        with pytest.raises(ValueError):
            parse_buckets(bad)


def test_closest_aspect_wins():
    buckets = parse_buckets(["256x256x8:1", "256x448x8:1", "448x256x8:1"])
    assert assign_bucket(meta(1920, 1080, 5), buckets, FPS) == 1
    assert assign_bucket(meta(1080, 1920, 5), buckets, FPS) == 2
    assert assign_bucket(meta(500, 480, 5), buckets, FPS) == 0
    assert assign_bucket(meta(300, 200, 5), buckets, FPS) == 1  # 1.5 is nearer 1.75 than 1
    # Compared in log space (2:1 and 1:2 are equally far from 1:1): square is nearer 1.9:1 than 1:2.
    wide = parse_buckets(["64x32x8:1", "64x122x8:1"])
    assert assign_bucket(meta(64, 64, 5), wide, FPS) == 1


def test_duration_must_fit_and_too_short_is_none():
    buckets = parse_buckets(["256x448x32:1", "256x448x16:1", "256x256x8:1"])
    assert assign_bucket(meta(1920, 1080, 5.0), buckets, FPS) == 0  # same aspect: most frames wins
    assert assign_bucket(meta(1920, 1080, 3.0), buckets, FPS) == 1  # 32 frames need 4 s
    assert assign_bucket(meta(1920, 1080, 1.5), buckets, FPS) == 2  # only the 1 s bucket fits
    assert assign_bucket(meta(1920, 1080, 0.9), buckets, FPS) is None
    # frames / fps caps an overstated container duration.
    assert assign_bucket({**meta(1920, 1080, 5.0), "frames": 36, "fps": 12.0}, buckets, FPS) == 1


def test_prefers_no_upscaling_then_least_upscaling():
    buckets = parse_buckets(["128x128x8:1", "256x256x8:1", "512x512x8:1"])
    assert assign_bucket(meta(300, 300, 2), buckets, FPS) == 1  # largest that does not upscale
    assert assign_bucket(meta(1000, 1000, 2), buckets, FPS) == 2
    assert assign_bucket(meta(100, 100, 2), buckets, FPS) == 0  # all upscale: the least


def _counts():
    return [{0: 10, 1: 7, 2: 1}, {0: 6, 1: 9, 2: 5}, {0: 8, 1: 8}]


def test_schedule_counts_are_min_over_ranks():
    buckets = parse_buckets(["64x64x8:2", "64x96x8:3", "96x64x8:1"])
    sched = epoch_schedule(_counts(), buckets, seed=0, epoch=0)
    # bucket 0: min(5, 3, 4) = 3; bucket 1: min(2, 3, 2) = 2; bucket 2: rank 2 has none.
    assert Counter(sched) == {0: 3, 1: 2}


def test_schedule_deterministic_changes_with_epoch_and_same_for_all_ranks():
    buckets = parse_buckets(["64x64x8:1", "64x96x8:1", "96x64x8:1"])
    counts = [{0: 40, 1: 40, 2: 40}, {0: 41, 1: 45, 2: 40}]
    a = epoch_schedule(counts, buckets, seed=3, epoch=0)
    # Every rank passes the same all-ranks counts, so every rank builds this very list.
    assert a == epoch_schedule([dict(c) for c in counts], buckets, seed=3, epoch=0)
    assert a != epoch_schedule(counts, buckets, seed=3, epoch=1)
    assert a != epoch_schedule(counts, buckets, seed=4, epoch=0)
    assert sorted(a) == sorted(epoch_schedule(counts, buckets, seed=3, epoch=1))
    assert len(set(a[:10])) > 1  # shuffled, not grouped by bucket


def test_schedule_blocks_of_batch_multiple():
    buckets = parse_buckets(["64x64x8:1", "64x96x8:1", "96x64x8:1"])
    counts = [{0: 13, 1: 9, 2: 2}]
    sched = epoch_schedule(counts, buckets, seed=1, epoch=2, batch_multiple=4)
    assert Counter(sched) == {0: 12, 1: 8}  # whole blocks only; bucket 2 cannot fill one
    blocks = [sched[i:i + 4] for i in range(0, len(sched), 4)]
    assert all(len(set(b)) == 1 for b in blocks)
    with pytest.raises(ValueError):
        epoch_schedule(counts, buckets, seed=1, epoch=2, batch_multiple=0)
