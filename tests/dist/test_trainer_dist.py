"""Real DeepSpeed engines, 2 processes over gloo: ZeRO-2/3, exact resume, world-size change, preemption."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from framework.checkpoint import complete_checkpoints, read_meta
from framework.distributed import free_port
from framework.export.safetensors_io import consolidated_state_dict
from framework.nn.llada import LladaModelConfig, count_parameters
from tests.runs import ROOT, SMALL, TINY, env, losses, train

pytestmark = pytest.mark.dist


def _numel_under(obj, key: str) -> int:
    """Total elements of the tensors stored under dict keys named `key`, anywhere in a nested state."""
    if isinstance(obj, dict):
        return sum(v.numel() if k == key and torch.is_tensor(v) else _numel_under(v, key) for k, v in obj.items())
    if isinstance(obj, (list, tuple)):
        return sum(_numel_under(v, key) for v in obj)
    return 0


def _small_param_count() -> int:
    kv = dict(o.split("=") for o in SMALL if o.startswith("model."))
    return count_parameters(LladaModelConfig(**{k[6:]: int(v) for k, v in kv.items()}))


@pytest.mark.parametrize("stage", [2, 3])
def test_two_ranks_learn_and_shard_the_optimizer(text_data, tmp_path, stage):
    run = tmp_path / f"z{stage}"
    train(text_data, run, f"train.zero_stage={stage}", "train.steps=16", "optim.lr=3e-3", "checkpoint.every=4",
          "checkpoint.keep_last=2", nproc=2)
    assert [c.name for c in complete_checkpoints(run / "checkpoints")] == ["step_00000012", "step_00000016"]
    assert (run / "checkpoints" / "latest").read_text() == "step_00000016"
    loss = losses(run)
    assert len(loss) == 16
    first, last = sum(loss[s] for s in (1, 2, 3)) / 3, sum(loss[s] for s in (14, 15, 16)) / 3
    assert last < first - 0.3, f"loss did not fall: {first:.3f} -> {last:.3f}"

    ckpt = complete_checkpoints(run / "checkpoints")[-1]
    assert read_meta(ckpt)["world_size"] == 2
    n = _small_param_count()
    for r in (0, 1):
        files = list(ckpt.glob(f"*zero_pp_rank_{r}_*optim_states.pt"))
        assert len(files) == 1, files
        state = torch.load(files[0], map_location="cpu", weights_only=False)
        held = _numel_under(state, "exp_avg")
        # Each rank keeps Adam's moments for about half of the parameters (padding aside).
        assert 0.45 * n <= held <= 0.55 * n, f"rank {r} holds exp_avg for {held} of {n} parameters"


def test_resume_is_exact(text_data, tmp_path):
    """6 steps straight == 4 steps, stop, resume=auto, 2 more: same losses and the same final weights."""
    common = ["train.zero_stage=2", "train.steps=6", "optim.lr=3e-3"]
    straight, split = tmp_path / "straight", tmp_path / "split"
    train(text_data, straight, *common, nproc=2)
    train(text_data, split, *common, "train.stop_after=4", nproc=2)
    assert [c.name for c in complete_checkpoints(split / "checkpoints")] == ["step_00000004"]
    train(text_data, split, *common, "resume=auto", nproc=2)

    a, b = losses(straight), losses(split)
    assert [a[s] for s in range(1, 7)] == [b[s] for s in range(1, 7)]
    wa = consolidated_state_dict(complete_checkpoints(straight / "checkpoints")[-1])
    wb = consolidated_state_dict(complete_checkpoints(split / "checkpoints")[-1])
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
    ea = consolidated_state_dict(complete_checkpoints(straight / "checkpoints")[-1], use_ema=True)
    eb = consolidated_state_dict(complete_checkpoints(split / "checkpoints")[-1], use_ema=True)
    assert all(torch.equal(ea[k], eb[k]) for k in ea)


def test_resume_on_one_rank_from_two(text_data, tmp_path):
    """A ZeRO-2 checkpoint of 2 ranks continues on 1 rank through a universal checkpoint."""
    run = tmp_path / "run"
    common = ["train.zero_stage=2", "train.steps=12", "optim.lr=3e-3", "checkpoint.keep_last=5"]
    train(text_data, run, *common, "train.stop_after=8", nproc=2)
    before = consolidated_state_dict(complete_checkpoints(run / "checkpoints")[-1])
    out = train(text_data, run, *common, "resume=auto", nproc=1)
    assert "world size changed 2 -> 1" in out.stdout + out.stderr
    assert (run / "checkpoints" / "universal" / "step_00000008").is_dir()  # beside the checkpoints, not among them
    loss = losses(run)
    assert sorted(loss) == list(range(1, 13))
    # The weights came back: the first resumed step continues from the trained loss, not from scratch.
    assert loss[9] < loss[1] - 0.3
    after = consolidated_state_dict(complete_checkpoints(run / "checkpoints")[-1])
    assert after.keys() == before.keys()


def _wait_for_steps(run: Path, n: int, proc: subprocess.Popen, timeout: float = 300) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if (run / "metrics.jsonl").exists() and len(losses(run)) >= n:
            return
        if proc.poll() is not None:
            raise AssertionError(f"training exited early:\n{proc.stdout.read()[-3000:]}")
        time.sleep(0.2)
    raise AssertionError("training did not reach step {n} in time")


def test_sigterm_saves_and_resume_auto_completes(text_data, tmp_path):
    run = tmp_path / "run"
    args = [TINY, f"data.dir={text_data}", f"run_dir={run}", *SMALL, "train.zero_stage=1", "train.steps=400"]
    proc = subprocess.Popen([sys.executable, "launch/train.py", *args], cwd=ROOT, env=env(),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    _wait_for_steps(run, 3, proc)
    proc.send_signal(signal.SIGTERM)
    output = proc.communicate(timeout=300)[0]
    assert proc.returncode == 0, output[-3000:]
    assert "preemption signal received" in output
    saved = complete_checkpoints(run / "checkpoints")
    assert len(saved) == 1 and read_meta(saved[0])["step"] < 400
    done = read_meta(saved[0])["step"]

    train(text_data, run, "train.zero_stage=1", "train.steps=400", f"train.stop_after={5}", "resume=auto")
    assert read_meta(complete_checkpoints(run / "checkpoints")[-1])["step"] == done + 5


def test_sigusr1_to_one_rank_stops_both(text_data, tmp_path):
    """A preemption signal seen by one rank only still makes every rank save and exit 0 together."""
    import psutil

    run = tmp_path / "run"
    args = [TINY, f"data.dir={text_data}", f"run_dir={run}", *SMALL, "train.zero_stage=3", "train.steps=400"]
    proc = subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
                             str(free_port()), "launch/train.py", *args], cwd=ROOT, env=env(),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    _wait_for_steps(run, 3, proc)
    workers = [p for p in psutil.Process(proc.pid).children(recursive=True) if "launch/train.py" in " ".join(p.cmdline())]
    rank1 = next(p for p in workers if p.environ().get("RANK") == "1")
    os.kill(rank1.pid, signal.SIGUSR1)
    output = proc.communicate(timeout=300)[0]
    assert proc.returncode == 0, output[-3000:]
    saved = complete_checkpoints(run / "checkpoints")
    assert len(saved) == 1
    assert len(list(saved[0].glob("trainer_rank*.pt"))) == 2


def test_zero3_initialises_like_zero2(text_data, tmp_path):
    """Parameters built partitioned (zero.Init) get the same custom init: the first losses agree."""
    first = {}
    for stage in (2, 3):
        train(text_data, tmp_path / f"z{stage}", f"train.zero_stage={stage}", "train.steps=1", nproc=2)
        first[stage] = losses(tmp_path / f"z{stage}")[1]
    assert first[3] == pytest.approx(first[2], rel=1e-5)
