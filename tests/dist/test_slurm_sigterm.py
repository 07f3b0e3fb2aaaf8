"""launch/slurm.sbatch at the time limit: SLURM's SIGTERM makes every rank save, and the job ends with status 0
although torchrun itself exits 1 (SignalException) after forwarding the signal."""

from __future__ import annotations

import os
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest

from framework.checkpoint import complete_checkpoints, read_meta
from framework.distributed import free_port
from tests.runs import ROOT, SMALL, TINY, env, losses

pytestmark = pytest.mark.dist


def _stub(path: Path, body: str) -> None:
    path.write_text("#!/bin/bash\n" + body)
    path.chmod(path.stat().st_mode | stat.S_IEXEC)


def _kill_everything_of(proc: subprocess.Popen, run: Path) -> None:
    """SIGKILL the script's session and every rank of this run: torchrun starts each rank in a session of its own,
    and ranks outlive a script that died early, so they are found by this test's unique run directory."""
    import psutil

    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait()
    for p in psutil.process_iter(["pid", "cmdline"]):
        if f"run_dir={run}" in (p.info["cmdline"] or []):
            p.kill()


def test_sigterm_to_the_batch_script_saves_and_exits_0(text_data, tmp_path):
    """Stand-ins: srun runs its command in place and records its pid; scancel signals that job step."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    _stub(bin_dir / "scontrol", "echo 127.0.0.1\n")
    _stub(bin_dir / "srun", f'echo $$ > {bin_dir}/step.pid\nwhile [[ "$1" == --* ]]; do shift; done\nexec "$@"\n')
    _stub(bin_dir / "scancel", f'kill -TERM "$(cat {bin_dir}/step.pid)"\n')
    run = tmp_path / "run"
    e = dict(env(), PATH=f"{bin_dir}:{Path(sys.executable).parent}:{os.environ['PATH']}", SLURM_JOB_NODELIST="node1",
             SLURM_NNODES="1", SLURM_JOB_ID="42", SLURM_SUBMIT_DIR=str(ROOT), GPUS_PER_NODE="2",
             MASTER_PORT=str(free_port()), SHUTDOWN_TIMEOUT="120")
    cmd = ["bash", "launch/slurm.sbatch", TINY, f"data.dir={text_data}", f"run_dir={run}", *SMALL,
           "train.zero_stage=2", "train.steps=100000"]
    # Its own session, so the cleanup can end the script, srun and torchrun at once.
    proc = subprocess.Popen(cmd, cwd=ROOT, env=e, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    try:
        deadline = time.time() + 300
        while not ((run / "metrics.jsonl").exists() and len(losses(run)) >= 3):
            assert time.time() < deadline and proc.poll() is None, "training did not reach step 3"
            time.sleep(0.2)
        proc.send_signal(signal.SIGTERM)  # what SLURM does 300 s before the time limit (B:TERM@300)
        output = proc.communicate(timeout=240)[0]
    finally:
        _kill_everything_of(proc, run)
    assert proc.returncode == 0, output[-4000:]
    assert "SignalException" in output  # torchrun's own exit 1 happened, and was recognised
    assert "slurm.sbatch: stopped by SIGTERM after saving" in output, output[-4000:]
    saved = complete_checkpoints(run / "checkpoints")
    assert len(saved) == 1 and 3 <= read_meta(saved[0])["step"] < 100000
    assert len(list(saved[0].glob("trainer_rank*.pt"))) == 2
