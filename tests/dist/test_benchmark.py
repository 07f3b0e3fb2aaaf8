"""launch/benchmark.py trainer-overhead runs both sides through the real CLI and prints their ratio."""

from __future__ import annotations

import re
import subprocess
import sys

import pytest

from tests.runs import ROOT, SMALL, env

pytestmark = pytest.mark.dist


def test_trainer_overhead_prints_a_ratio(text_data):
    overrides = [o for o in SMALL if not o.startswith(("log.", "eval.", "checkpoint."))]
    cmd = [sys.executable, "launch/benchmark.py", "trainer-overhead", "--steps", "8", "--warmup", "2", "--repeats",
           "1", f"data.dir={text_data}", *overrides]
    out = subprocess.run(cmd, cwd=ROOT, env=env(), capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    ours, bare, ratio = map(float, re.search(r"ours ([\d.]+) ms/step, bare DeepSpeed ([\d.]+) ms/step, ratio ([\d.]+)",
                                             out.stdout).groups())
    assert ours > 0 and bare > 0 and ratio == pytest.approx(ours / bare, rel=0.01)
    assert "median ratio" in out.stdout


def test_dit_throughput_runs_a_preset_at_any_latent_shape():
    # The preset's buckets (batch 8) are replaced by one bucket matching --latent at batch 1.
    cmd = [sys.executable, "launch/benchmark.py", "dit-throughput", "--preset", "recipes/video_dit/configs/tiny.yaml",
           "--latent", "3x4x4", "--text-len", "8", "--steps", "2", "--warmup", "1"]
    out = subprocess.run(cmd, cwd=ROOT, env=env(), capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    seconds, tokens = re.search(r"\((\d+) tokens\).*?([\d.]+) s/step", out.stdout).group(1, 2)[::-1]
    assert float(seconds) > 0 and int(tokens) == 3 * 2 * 2  # patch (1, 2, 2)
