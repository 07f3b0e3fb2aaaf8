"""Faults with real runs: planted pickles, a diverging loss, a kill after a world-size change, a rollback, and
the data streams' skip counters in the metrics."""

from __future__ import annotations

import math
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from framework.checkpoint import complete_checkpoints, resolve
from framework.data.shards import assign_shards, load_index
from framework.export.safetensors_io import consolidated_state_dict
from framework.init_from import read_ours
from framework.recipe import load_run_config
from tests.runs import ROOT, SMALL, TINY, env, metrics, train

pytestmark = pytest.mark.dist


class Planted:
    """Unpickling this creates `marker`."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def _plant(path: Path, marker: Path) -> None:
    """Keep the file's real content and add the payload beside it, as an attacker editing a checkpoint would."""
    state = torch.load(path, map_location="cpu", weights_only=False)
    state["payload"] = Planted(marker)
    torch.save(state, path)


@pytest.mark.parametrize("name,nproc", [("mp_rank_00_model_states.pt", 2),
                                        ("trainer_rank00001.pt", 2),
                                        ("zero_pp_rank_1_mp_rank_00_optim_states.pt", 1)],  # 2 -> 1: conversion
                         ids=["model", "trainer", "optim"])
def test_resume_refuses_a_planted_pickle(text_data, tmp_path_factory, name, nproc):
    base = tmp_path_factory.getbasetemp() / "faults_planted_base"
    common = ["train.zero_stage=2", "train.steps=4", "optim.lr=3e-3"]
    if not (base / "checkpoints").is_dir():  # one real 2-rank ZeRO-2 run, copied for every planted file
        train(text_data, base, *common, "train.stop_after=2", nproc=2)
    run, marker = tmp_path_factory.mktemp("planted") / "run", tmp_path_factory.mktemp("m") / "marker"
    shutil.copytree(base, run)
    ckpt = complete_checkpoints(run / "checkpoints")[-1]
    _plant(ckpt / name, marker)
    out = train(text_data, run, *common, "resume=auto", nproc=nproc, check=False)
    assert out.returncode == (2 if nproc == 1 else 1), out.stderr[-3000:]  # torchrun says 1 for a rank's 2
    assert f"config error: refusing to load {ckpt / name}" in out.stderr
    assert not marker.exists()
    assert complete_checkpoints(run / "checkpoints") == [ckpt]  # nothing was trained or saved


@pytest.mark.parametrize("stage,nproc", [(2, 2), (0, 1)])
def test_a_diverging_loss_stops_and_keeps_the_finite_checkpoint(text_data, tmp_path, stage, nproc):
    run = tmp_path / "run"
    common = [f"train.zero_stage={stage}", "train.steps=12", "checkpoint.every=2", "checkpoint.keep_last=1"]
    train(text_data, run, *common, "optim.lr=3e-3", "train.stop_after=4", nproc=nproc)
    # 1e10, not 1e6: RMS-normed blocks survive a few 1e6-sized updates with a finite loss (and those steps are
    # rightly saved); 1e10-sized weights overflow the attention scores on the first forward after the update.
    out = train(text_data, run, *common, "optim.lr=1e10", "resume=auto", nproc=nproc, check=False)
    assert out.returncode != 0, out.stdout[-3000:]
    stop = next(line for line in out.stderr.splitlines() if line.startswith("error: step "))
    first_bad = min(m["step"] for m in metrics(run) if m["bad_steps"] > 0)
    newest_finite = f"step_{(first_bad - 1) // 2 * 2:08d}"  # checkpoint.every=2
    assert "train.max_bad_steps=3" in stop and newest_finite in stop, stop
    # Never a non-finite checkpoint, so keep_last=1 never rotated the finite one away.
    assert [c.name for c in complete_checkpoints(run / "checkpoints")] == [newest_finite]
    for use_ema in (False, True):
        weights = consolidated_state_dict(resolve("auto", str(run)), use_ema=use_ema)
        assert all(torch.isfinite(w).all() for w in weights.values())
    rows = [m for m in metrics(run) if m["step"] > 4]
    stopped_at = int(stop.split()[2].rstrip(":"))
    assert rows[-1]["step"] == stopped_at and rows[-1]["bad_steps"] == 3
    if stage == 2:  # DeepSpeed's ZeRO optimizer skips overflowing updates: now counted, not silent
        assert rows[-1]["skipped_steps"] >= 1
    else:
        assert not math.isfinite(rows[-1]["loss"])


def test_world_size_change_then_kill_before_the_first_save(text_data, tmp_path):
    """2 ranks save step 4; 1 rank converts it and is killed (-9) before saving: the conversion must not pose as
    a checkpoint for resume=auto, export or init_from, and the next resume and rotation work."""
    run = tmp_path / "run"
    common = ["train.zero_stage=2", "optim.lr=3e-3", "checkpoint.keep_last=1"]
    train(text_data, run, *common, "train.steps=400", "train.stop_after=4", nproc=2)
    args = [TINY, f"data.dir={text_data}", f"run_dir={run}", *SMALL, *common, "train.steps=400", "resume=auto"]
    proc = subprocess.Popen([sys.executable, "launch/train.py", *args], cwd=ROOT, env=env(),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        from tests.dist.test_trainer_dist import _wait_for_steps

        _wait_for_steps(run, 6, proc)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.communicate(timeout=60)
    ckpts = run / "checkpoints"
    assert complete_checkpoints(ckpts) == [ckpts / "step_00000004"]
    assert resolve("auto", str(run)) == ckpts / "step_00000004"
    exported = consolidated_state_dict(resolve(str(run), ""))  # what launch/export.py reads
    cfg, _ = load_run_config(TINY, [f"data.dir={text_data}", f"run_dir={tmp_path / 'fresh'}", *SMALL,
                                    f"train.init_from={run}"], world=1)
    assert read_ours(str(run), cfg).keys() == exported.keys()  # what train.init_from reads
    assert (ckpts / "universal" / "step_00000004").is_dir()  # the conversion was made, and kept for reuse

    out = train(text_data, run, *common, "train.steps=400", "train.stop_after=2", "resume=auto")
    assert "resumed from" in out.stdout and "step_00000004 at step 4" in out.stdout
    # keep_last=1 rotated step 4 and its conversion away; the new checkpoint (world 1) needs none.
    assert [c.name for c in complete_checkpoints(ckpts)] == ["step_00000006"]
    assert not (ckpts / "universal" / "step_00000004").exists()


def test_explicit_resume_of_an_older_checkpoint_rolls_back(text_data, tmp_path):
    run = tmp_path / "run"
    common = ["train.zero_stage=1", "train.steps=8", "checkpoint.every=2", "checkpoint.keep_last=2"]
    train(text_data, run, *common, "train.stop_after=6")
    ckpts = run / "checkpoints"
    assert [c.name for c in complete_checkpoints(ckpts)] == ["step_00000004", "step_00000006"]
    out = train(text_data, run, *common, f"resume={ckpts / 'step_00000004'}", "train.stop_after=1")
    # The rolled-back line is the head: rotation kept step 4, and resume=auto continues from step 5, not 6.
    assert [c.name for c in complete_checkpoints(ckpts)] == ["step_00000004", "step_00000005"]
    assert f"rolled back; the newer step_00000006 moved to {ckpts / 'abandoned' / 'step_00000006'}" in out.stdout
    assert (ckpts / "latest").read_text() == "step_00000005"
    assert (ckpts / "abandoned" / "step_00000006" / "COMPLETE").exists()
    assert resolve("auto", str(run)) == ckpts / "step_00000005"


def test_skipped_shards_reach_the_metrics_summed_over_ranks(text_data, tmp_path):
    data = tmp_path / "data"
    shutil.copytree(text_data, data)
    index = load_index(data / "train")
    for rank in (0, 1):  # each rank's first shard of epoch 0 (train.seed=0), so both certainly read one
        bad = data / "train" / index["shards"][assign_shards(len(index["shards"]), rank, 2, 0, 0)[0]]["path"]
        bad.write_bytes(b"not a tar file\n" * 64)
    run = tmp_path / "run"
    train(data, run, "train.zero_stage=2", "train.steps=2", "data.max_skip_fraction=0.5", nproc=2)
    rows = metrics(run)
    assert rows[-1]["data/skipped_shards"] == 2
    assert rows[-1]["skipped_steps"] == 0 and rows[-1]["bad_steps"] == 0
