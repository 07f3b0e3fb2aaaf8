"""The tiny audio VAE preset through the real CLI: 2 ranks under ZeRO-2 on a generated flash + beep dataset,
loss falls, validation reports the mel reconstruction error, samples are wavs and a mel PNG."""

from __future__ import annotations

import json
import subprocess
import sys
import wave

import pytest

from framework.distributed import free_port
from tests.runs import ROOT, env

pytestmark = pytest.mark.slow

PRESET = str(ROOT / "recipes/audio_vae/configs/tiny.yaml")
COMMON = ["log.every=1", "log.wandb=disabled", "log.progress=false", "eval.every=0", "checkpoint.every=0",
          "data.buckets=['16x16x8:2']", "train.micro_batch=2", "train.global_batch=4", "optim.warmup_steps=1",
          "model.base_channels=32"]


def test_two_ranks_learn_evaluate_and_sample(flash_beep, tmp_path):
    run_dir = tmp_path / "run"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(free_port()),
           "launch/train.py", PRESET, f"data.dir={flash_beep}", f"run_dir={run_dir}", *COMMON, "train.zero_stage=2",
           "train.steps=8", "optim.lr=3e-3", "eval.at_end=true", "eval.batches=1", "eval.samples=1",
           "mel.griffin_lim_iters=4"]
    out = subprocess.run(cmd, cwd=ROOT, env=env(), capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-5000:]
    assert "latent channels at 25 frames/s" in out.stdout + out.stderr
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    loss = {r["step"]: r["loss"] for r in rows if "loss" in r}
    assert sorted(loss) == list(range(1, 9)) and loss[8] < loss[1]
    evals = [r for r in rows if "eval/mel_l1_db" in r]
    assert len(evals) == 1 and 0 < evals[0]["eval/mel_l1_db"] < 100 and evals[0]["eval/mel_mse"] > 0
    assert 0 < evals[0]["eval/mel_l1_db_loud"] < 200
    samples = run_dir / "samples" / "step_00000008"
    assert (samples / "mels.png").is_file()
    with wave.open(str(samples / "recon_0.wav")) as f:
        assert f.getframerate() == 16000 and f.getnframes() == 2 * 16000  # 8 frames at 4 fps: 2 s


def test_mismatched_audio_rate_is_a_config_error(flash_beep, tmp_path):
    out = subprocess.run([sys.executable, "launch/train.py", PRESET, f"data.dir={flash_beep}",
                          f"run_dir={tmp_path / 'bad'}", *COMMON, "data.audio_rate=8000"],
                         cwd=ROOT, env=env(), capture_output=True, text=True, timeout=300)
    assert out.returncode == 2 and "mel.rate=16000" in out.stderr
