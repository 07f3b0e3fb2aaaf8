"""kill -9 at an arbitrary step, and a save cut short, still resume bit-exactly (2 ranks, ZeRO-3)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from framework.checkpoint import COMPLETE, complete_checkpoints
from framework.distributed import free_port
from framework.export.safetensors_io import consolidated_state_dict
from tests.runs import ROOT, SMALL, TINY, env, losses, train

pytestmark = pytest.mark.dist

COMMON = ["train.zero_stage=3", "train.steps=8", "optim.lr=3e-3", "checkpoint.every=2", "checkpoint.keep_last=4"]


def _kill_at_step(data_dir, run, step: int, timeout: float = 300) -> None:
    """Start a 2-rank run and SIGKILL torchrun and its workers (one process group) once `step` is logged."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(free_port()),
           "launch/train.py", TINY, f"data.dir={data_dir}", f"run_dir={run}", *SMALL, *COMMON]
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    try:
        deadline = time.time() + timeout
        while not ((run / "metrics.jsonl").exists() and len(losses(run)) >= step):
            if proc.poll() is not None:
                raise AssertionError(f"training exited before step {step}:\n{proc.stdout.read()[-3000:]}")
            if time.time() > deadline:
                raise AssertionError(f"training did not reach step {step} in {timeout}s")
            time.sleep(0.05)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)  # no handler runs: nothing is flushed or saved
        proc.wait(timeout=60)


def test_kill9_and_a_cut_save_resume_bit_exactly(text_data, tmp_path):
    straight, killed = tmp_path / "straight", tmp_path / "killed"
    train(text_data, straight, *COMMON, nproc=2)
    _kill_at_step(text_data, killed, 5)
    found = complete_checkpoints(killed / "checkpoints")
    assert found, "no checkpoint completed before the kill"
    # A save cut short leaves shards without COMPLETE: make the newest look like that; resume must skip it.
    (found[-1] / COMPLETE).unlink()
    resumed_from = complete_checkpoints(killed / "checkpoints")[-1] if len(found) > 1 else None
    train(text_data, killed, *COMMON, "resume=auto", nproc=2)

    a, b = losses(straight), losses(killed)
    assert sorted(b) == list(range(1, 9))
    assert [a[s] for s in range(1, 9)] == [b[s] for s in range(1, 9)], (a, b, resumed_from)
    wa = consolidated_state_dict(complete_checkpoints(straight / "checkpoints")[-1])
    wb = consolidated_state_dict(complete_checkpoints(killed / "checkpoints")[-1])
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)
