"""The same entry point runs under the deepspeed launcher and under launch/slurm.sbatch (torchrun rendezvous)."""

from __future__ import annotations

import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from framework.checkpoint import complete_checkpoints, read_meta
from framework.distributed import free_port
from tests.runs import ROOT, SMALL, TINY, env, losses

pytestmark = pytest.mark.dist


def test_deepspeed_launcher_two_ranks(text_data, tmp_path):
    run = tmp_path / "run"
    deepspeed = Path(sys.executable).with_name("deepspeed")
    launcher = [str(deepspeed)] if deepspeed.exists() else [sys.executable, "-m", "deepspeed.launcher.runner"]
    cmd = [*launcher, "--num_gpus", "2", "--master_port", str(free_port()), "launch/train.py", TINY,
           f"data.dir={text_data}", f"run_dir={run}", *SMALL, "train.steps=3"]
    out = subprocess.run(cmd, cwd=ROOT, env=env(), capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    assert sorted(losses(run)) == [1, 2, 3]
    assert read_meta(complete_checkpoints(run / "checkpoints")[-1])["world_size"] == 2


def _stub(path: Path, body: str) -> None:
    path.write_text("#!/bin/bash\n" + body)
    path.chmod(path.stat().st_mode | stat.S_IEXEC)


def test_slurm_script_runs_its_torchrun_line(text_data, tmp_path):
    """launch/slurm.sbatch run as a plain script with stand-ins for scontrol and srun on one node."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    _stub(bin_dir / "scontrol", 'echo 127.0.0.1\n')
    _stub(bin_dir / "srun", 'while [[ "$1" == --* ]]; do shift; done\nexec "$@"\n')
    run = tmp_path / "run"
    e = dict(env(), PATH=f"{bin_dir}:{Path(sys.executable).parent}:{os.environ['PATH']}", SLURM_JOB_NODELIST="node1",
             SLURM_NNODES="1", SLURM_JOB_ID="42", SLURM_SUBMIT_DIR=str(ROOT), GPUS_PER_NODE="2",
             MASTER_PORT=str(free_port()))
    cmd = ["bash", "launch/slurm.sbatch", TINY, f"data.dir={text_data}", f"run_dir={run}", *SMALL, "train.steps=4",
           "train.stop_after=2"]
    for _ in range(2):  # a requeued job starts the same script again and resumes
        out = subprocess.run(cmd, cwd=ROOT, env=e, capture_output=True, text=True, timeout=600)
        assert out.returncode == 0, out.stderr[-3000:]
    assert sorted(losses(run)) == [1, 2, 3, 4]
    assert read_meta(complete_checkpoints(run / "checkpoints")[-1])["step"] == 4
