"""The tiny LLaDA preset end to end through launch/train.py: learns, evaluates, samples, logs, exports."""

from __future__ import annotations

import re
import subprocess
import sys

import pytest

from framework.checkpoint import complete_checkpoints
from tests.runs import ROOT, TINY, env, metrics

pytestmark = pytest.mark.slow


def test_tiny_preset_trains_evaluates_and_samples(text_data, tmp_path):
    run = tmp_path / "tiny"
    # The preset as shipped (model, batch, optimizer, EMA, wandb offline), shortened to fit CI.
    cmd = [sys.executable, "launch/train.py", TINY, f"data.dir={text_data}", f"run_dir={run}", "train.steps=60",
           "eval.every=30", "eval.micro_batch=4", "checkpoint.every=30", "optim.warmup_steps=5"]
    out = subprocess.run(cmd, cwd=ROOT, env=dict(env(), WANDB_MODE="offline"), capture_output=True, text=True,
                         timeout=900)
    assert out.returncode == 0, out.stderr[-4000:]
    text = out.stdout + out.stderr
    assert "2.56M parameters" in text and "GFLOPs per training token" in text

    rows = metrics(run)
    loss = [r["loss"] for r in rows if "loss" in r]
    assert len(loss) == 6  # log.every=10
    assert loss[-1] < loss[0] - 1.0, loss
    assert all(r["tokens_per_s"] > 0 and 0 <= r["data_wait_pct"] <= 100 for r in rows if "loss" in r)
    evals = [r["eval/elbo_bits_per_token"] for r in rows if "eval/elbo_bits_per_token" in r]
    assert len(evals) == 2 and evals[1] < evals[0]
    # Samples read (issue 10 item 7): printed with their scores, logged as eval/sample_*. The preset's 8 prompts.
    assert text.count("sample @ 60:") == 8
    assert re.search(r"sample @ 60: The government said ->.+  \[known words \d+%, longest repeat \d+\]", text)
    quality = [r for r in rows if "eval/sample_known_words" in r]
    assert [r["step"] for r in quality] == [30, 60], quality
    assert quality[-1]["eval/sample_known_words"] >= 0.6, quality  # the old preset's samples: 0 ("->sssss...")
    assert quality[-1]["eval/sample_longest_repeat"] <= 6, quality  # ... and 32 (one token, the whole answer)
    samples = (run / "samples" / "step_00000060" / "samples.txt").read_text().splitlines()
    assert len(samples) == 8 and samples[0].startswith("The government said ->") and "known words" not in samples[0]

    assert (run / "config.yaml").read_text().startswith("recipe: llada")
    assert list((run / "wandb").glob("offline-run-*")), "wandb offline run missing"
    assert list((run / "wandb").glob("offline-run-*/files/media/**/*samples*")), "samples not logged to wandb"
    assert [c.name for c in complete_checkpoints(run / "checkpoints")] == ["step_00000030", "step_00000060"]
