"""Config mistakes that used to give tracebacks or late failures: each is now one line naming the key, exit
status 2, before any work (no run directory content, no model built)."""

from __future__ import annotations

import os
import resource
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from framework.config import ConfigError, check_run_dir
from framework.recipe import load_run_config

ROOT = Path(__file__).resolve().parents[2]
TINY = str(ROOT / "recipes/llada/configs/tiny.yaml")


@pytest.mark.parametrize("override, message", [
    ("optim.lr=-1", r"optim.lr must be >= 0, got -1"),
    ("log.every=0", r"log.every must be >= 1, got 0"),
    ("train.seed=-1", r"train.seed must be in \[0, "),
    ("checkpoint.every=-1", r"checkpoint.every must be >= 0 \(0 saves at the end only\), got -1"),
    ("optim.weight_decay=-0.1", r"optim.weight_decay must be >= 0, got -0.1"),
    ("optim.betas=[0.9,1.0]", r"optim.betas\[1\] must be in \[0, 1\), got 1.0"),
    ("optim.eps=-1e-8", r"optim.eps must be >= 0"),
    ("optim.min_lr_ratio=1.5", r"optim.min_lr_ratio must be in \[0, 1\]"),
    ("train.grad_clip=-1", r"train.grad_clip must be >= 0 \(0 disables clipping\)"),
    ("train.grad_clip=.nan", r"train.grad_clip must be >= 0 .*got nan"),
    ("train.stop_after=-2", r"train.stop_after must be >= 0"),
    ("train.max_bad_steps=0", r"train.max_bad_steps must be >= 1, got 0"),
    ("train.collective_timeout_minutes=0", r"train.collective_timeout_minutes must be positive, got 0"),
    ("train.collective_timeout_minutes=-5", r"train.collective_timeout_minutes must be positive"),
    ("ema.start_step=-1", r"ema.start_step must be >= 0"),
    ("eval.every=-1", r"eval.every must be >= 0"),
    ("eval.batches=0", r"eval.batches must be >= 1"),
    ("optim.betas=[0.9,", r"optim.betas: '\[0.9,' is not a valid YAML value"),
])
def test_bad_value_names_the_key(override, message):
    with pytest.raises(ConfigError, match=message):
        load_run_config(TINY, [override], world=1)


def test_good_edge_values_pass():
    cfg, _ = load_run_config(TINY, ["optim.lr=0", "train.grad_clip=0", "checkpoint.every=0", "train.seed=0",
                                    "optim.weight_decay=0", "optim.betas=[0,0.999]", "train.max_bad_steps=1",
                                    "train.collective_timeout_minutes=0.01", "log.wandb=null"], world=1)
    assert cfg.train.collective_timeout_minutes == pytest.approx(0.01) and cfg.log.wandb is None


def test_yaml_tab_names_file_and_line(tmp_path):
    preset = tmp_path / "tabbed.yaml"
    preset.write_text("recipe: llada\ntrain:\n  steps: 3\n\tseed: 1\n")
    with pytest.raises(ConfigError, match=rf"{preset}:4: invalid YAML: .*tabs are not allowed.*'seed: 1'") as e:
        load_run_config(str(preset), [], world=1)
    assert "\n" not in str(e.value)


def _cli(*args: str, **kw) -> subprocess.CompletedProcess:
    e = dict(os.environ, OMP_NUM_THREADS="1")
    e.pop("RANK", None)
    return subprocess.run([sys.executable, "launch/train.py", *args], cwd=ROOT, env=e, capture_output=True,
                          text=True, timeout=120, **kw)


def _assert_one_line_error(out: subprocess.CompletedProcess, *needles: str) -> None:
    assert out.returncode == 2, out.stderr[-3000:]
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("config error: "), out.stderr[-3000:]
    assert all(n in lines[0] for n in needles), lines[0]


def test_cli_bad_values_exit_2_before_any_work(tmp_path):
    """Before: lr=-1 raised inside torch's AdamW after the model was built (a traceback, exit 1)."""
    run = tmp_path / "run"
    _assert_one_line_error(_cli(TINY, "optim.lr=-1", f"run_dir={run}", f"data.dir={tmp_path / 'no_data'}"), "optim.lr")
    assert not run.exists()  # nothing was created


def test_cli_resume_of_a_partial_checkpoint_is_a_config_error(tmp_path):
    partial = tmp_path / "run" / "checkpoints" / "step_00000004"
    partial.mkdir(parents=True)  # an interrupted save: no COMPLETE marker
    (partial / "meta.json").write_text("{}")
    out = _cli(TINY, f"resume={partial}", f"run_dir={tmp_path / 'run'}", f"data.dir={tmp_path / 'no_data'}")
    _assert_one_line_error(out, f"resume={partial}", "COMPLETE")


def test_cli_yaml_tab_is_one_line(tmp_path):
    preset = tmp_path / "tabbed.yaml"
    preset.write_text("recipe: llada\n\trun_dir: x\n")
    _assert_one_line_error(_cli(str(preset)), f"{preset}:2", "tabs")


def test_run_dir_that_cannot_be_created_names_the_disk(tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    with pytest.raises(ConfigError, match=rf"run_dir={blocker}/run: cannot write there: .*\(ENOTDIR\); the disk "
                                          rf"mounted at /.* has .* free of "):
        check_run_dir(str(blocker / "run"))
    check_run_dir(str(tmp_path / "fine" / "run"))  # creates it, leaves no probe behind
    assert list((tmp_path / "fine" / "run").iterdir()) == []


def _no_file_writes() -> None:
    """In the child: any write to a regular file fails (EFBIG) instead of killing the process with SIGXFSZ."""
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (0, 0))


def test_cli_unwritable_run_dir_exits_2_before_any_work(tmp_path):
    """Before: found only when the first checkpoint was written (torch.save: `basic_ios::clear: iostream error`)."""
    run = tmp_path / "run"
    out = _cli(TINY, f"run_dir={run}", f"data.dir={tmp_path / 'no_data'}", preexec_fn=_no_file_writes)
    _assert_one_line_error(out, f"run_dir={run}: cannot write there", "EFBIG", "the disk mounted at")
    assert list(run.iterdir()) == []  # the probe is gone


def test_full_disk_is_named(tmp_path):
    """A real full file system (a 64 KiB tmpfs filled up): ENOSPC with the mount point and its free space."""
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(mnt)], capture_output=True).returncode:
        pytest.skip("mounting a tmpfs needs root (CAP_SYS_ADMIN)")
    try:
        fd = os.open(mnt / "fill", os.O_WRONLY | os.O_CREAT)
        try:
            while os.write(fd, b"\0" * 4096):
                pass
        except OSError:  # ENOSPC: the disk is full
            pass
        finally:
            os.close(fd)
        with pytest.raises(ConfigError, match=rf"run_dir={mnt}/run: cannot write there: No space left on device "
                                              rf"\(ENOSPC\); the disk mounted at {mnt} has 0 B free of 64.0 KiB"):
            check_run_dir(str(mnt / "run"))
    finally:
        subprocess.run(["umount", str(mnt)], check=True)
