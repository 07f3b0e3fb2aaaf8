"""A frozen rank (SIGSTOP) makes the others exit with a message naming train.collective_timeout_minutes,
within that timeout, instead of blocking for torch's default 30 minutes."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from framework.distributed import free_port
from tests.runs import ROOT, SMALL, TINY, env, losses

pytestmark = pytest.mark.dist

TIMEOUT_MIN = 0.25  # 15 s: long enough for both ranks to start on 2 busy cores, short for the test


def _start_rank(rank: int, port: int, args: list[str], log: Path) -> subprocess.Popen:
    """One rank of a 2-rank job started directly (no torchrun), so the test can stop exactly one process."""
    e = dict(env(), RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="2", LOCAL_WORLD_SIZE="2",
             MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    with open(log, "w") as out:
        return subprocess.Popen([sys.executable, "launch/train.py", *args], cwd=ROOT, env=e, stdout=out,
                                stderr=subprocess.STDOUT)


def test_sigstopped_rank_ends_the_run_within_the_timeout(text_data, tmp_path):
    run = tmp_path / "run"
    args = [TINY, f"data.dir={text_data}", f"run_dir={run}", *SMALL, "train.zero_stage=2", "train.steps=100000",
            f"train.collective_timeout_minutes={TIMEOUT_MIN}"]
    port = free_port()
    procs = [_start_rank(r, port, args, tmp_path / f"rank{r}.log") for r in (0, 1)]
    try:
        deadline = time.time() + 240
        while not ((run / "metrics.jsonl").exists() and len(losses(run)) >= 2):
            assert time.time() < deadline, "training did not reach step 2"
            assert all(p.poll() is None for p in procs), (tmp_path / "rank0.log").read_text()[-3000:]
            time.sleep(0.2)
        os.kill(procs[1].pid, signal.SIGSTOP)
        stopped = time.time()
        try:
            procs[0].wait(timeout=TIMEOUT_MIN * 60 + 40)
        except subprocess.TimeoutExpired:
            pytest.fail(f"rank 0 still waits {TIMEOUT_MIN * 60 + 40:.0f} s after rank 1 froze")
        waited = time.time() - stopped
    finally:
        for p in procs:  # SIGKILL also ends a stopped process; nothing is left behind
            p.kill()
            p.wait()
    log = (tmp_path / "rank0.log").read_text()
    assert procs[0].returncode not in (0, None), log[-3000:]
    assert f"train.collective_timeout_minutes={TIMEOUT_MIN:g}" in log and "frozen" in log, log[-3000:]
    assert "Traceback" not in log and "FutureWarning" not in log, log[-3000:]
    assert TIMEOUT_MIN * 60 * 0.9 <= waited <= TIMEOUT_MIN * 60 + 40, waited


def test_zero_collectives_do_not_warn_every_step(tmp_path):
    """DeepSpeed's ZeRO calls torch collectives that torch deprecates: FutureWarnings, repeated every step under
    ZeRO-3 before they were silenced in dist.init. `-W error::FutureWarning` turns any that remain into a failure."""
    code = ("import torch\nfrom framework import distributed as dist\ndist.init()\n"
            "t, out = torch.ones(2), torch.zeros(2)\n"
            "torch.distributed.all_gather_into_tensor(out, t)\ntorch.distributed.reduce_scatter_tensor(out, t)\n"
            "dist.shutdown()\n")
    out = subprocess.run([sys.executable, "-W", "error::FutureWarning", "-c", code], cwd=ROOT, env=env(),
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-3000:]
