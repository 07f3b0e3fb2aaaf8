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
