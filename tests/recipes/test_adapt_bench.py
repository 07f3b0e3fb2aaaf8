"""`launch/benchmark.py adapt` at toy size: the AR twin, its adaptation to masked diffusion (train.init_from the AR
run with model.causal=false, objective.shift, objective.anneal_steps) and the masked model from scratch all train
and evaluate, and the table has their rows."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import yaml

from tests.runs import ROOT, env

pytestmark = pytest.mark.slow

TOY = ["model.dim=32", "model.n_layers=2", "model.n_heads=2", "model.ffn_hidden=64", "train.micro_batch=4",
       "train.global_batch=4", "optim.warmup_steps=1", "eval.batches=1", "eval.micro_batch=4", "eval.samples=4",
       "sample.gen_length=16", "sample.block_length=16"]


def test_adapt_benchmark_rows(tmp_path):
    data = tmp_path / "tasks"
    subprocess.run([sys.executable, "data/make_tasks.py", "--out", str(data), "--train", "300", "--val", "20",
                    "--min-items", "5", "--max-items", "5", "--fixed-width"],
                   cwd=ROOT, env=env(), check=True, capture_output=True, text=True, timeout=300)
    cmd = [sys.executable, "launch/benchmark.py", "adapt", "--ar-steps", "3", "--adapt-steps", "2", "--anneal-steps",
           "2", "--data", str(data), "--work", str(tmp_path / "work"), "--json", *TOY]
    out = subprocess.run(cmd, cwd=ROOT, env=env(), capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-4000:]
    rows = json.loads(out.stdout.strip().splitlines()[-1])
    assert [r["run"] for r in rows] == ["AR twin", "AR -> masked (shift, anneal 2)", "masked from scratch"]
    assert [r["steps"] for r in rows] == ["3", "3 + 2", "5"]
    assert [r["bound"] for r in rows] == ["NLL", "ELBO", "ELBO"]
    assert all(0.0 <= r["exact_match"] <= 1.0 and r["bits_per_token"] > 0 for r in rows)
    assert "| AR -> masked (shift, anneal 2) | 3 + 2 |" in out.stdout
    adapted = yaml.safe_load((tmp_path / "work" / "adapted" / "config.yaml").read_text())
    assert adapted["model"]["causal"] is False and adapted["objective"]["shift"] is True
    assert adapted["objective"]["anneal_steps"] == 2
    assert adapted["train"]["init_from"] == str(tmp_path / "work" / "ar")
    # a safetensors export records the objective, so its user knows the logits are shifted
    export = subprocess.run([sys.executable, "launch/export.py", str(tmp_path / "work" / "adapted"), "--out",
                             str(tmp_path / "export")], cwd=ROOT, env=env(), capture_output=True, text=True,
                            timeout=300)
    assert export.returncode == 0, export.stdout[-2000:] + export.stderr[-2000:]
    config = json.loads((tmp_path / "export" / "config.json").read_text())
    assert config["objective"]["shift"] is True and config["model"]["causal"] is False
