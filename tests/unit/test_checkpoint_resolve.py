"""resume=auto only ever picks a complete checkpoint; metrics math."""

from __future__ import annotations

import pytest

from framework.checkpoint import COMPLETE, complete_checkpoints, resolve
from framework.metrics import mfu


def _ckpt(root, step, complete=True):
    d = root / "checkpoints" / f"step_{step:08d}"
    d.mkdir(parents=True)
    if complete:
        (d / COMPLETE).write_text("")
    return d


def test_auto_skips_an_interrupted_save(tmp_path):
    _ckpt(tmp_path, 10)
    good = _ckpt(tmp_path, 20)
    _ckpt(tmp_path, 30, complete=False)  # killed mid-save: never resumed from
    assert resolve("auto", str(tmp_path)) == good
    assert resolve(str(tmp_path), "") == good  # a run dir means its newest complete checkpoint
    assert [c.name for c in complete_checkpoints(tmp_path / "checkpoints")] == ["step_00000010", "step_00000020"]


def test_auto_without_checkpoints_starts_fresh_and_explicit_paths_are_checked(tmp_path):
    assert resolve("auto", str(tmp_path)) is None
    assert resolve("", str(tmp_path)) is None
    bad = _ckpt(tmp_path, 5, complete=False)
    with pytest.raises(FileNotFoundError, match="not a complete checkpoint"):
        resolve(str(bad), "")


def test_mfu():
    assert mfu(1e12, peak=10.0, world=2) == pytest.approx(0.05)
    assert mfu(1e12, peak=0.0, world=1) == 0.0


def test_split_work_covers_every_item_once_in_order():
    from framework.distributed import split_work

    items = list(range(7))
    shares = [split_work(items, r, 3) for r in range(3)]
    assert all(len(s) == 3 for s in shares)  # equal work on every rank, padded
    # What gather_work does with the shares of all ranks: interleave, then drop the padding.
    merged = [shares[r][i] for i in range(3) for r in range(3)][: len(items)]
    assert merged == items
