"""LLaDA SFT on the verifiable tasks through the real CLI: masked model (2 ranks, ZeRO-3) and its AR twin,
eval exact match, sampling, and the decode benchmark on both."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from tests.runs import ROOT, env, free_port, metrics

pytestmark = pytest.mark.slow

MASKED = "recipes/llada/configs/tasks_tiny.yaml"
AR = "recipes/llada/configs/tasks_tiny_ar.yaml"
SMALL = ["model.dim=32", "model.n_layers=2", "model.n_heads=2", "model.ffn_hidden=64", "model.max_seq_len=96",
         "data.seq_len=72", "train.steps=6", "train.micro_batch=4", "train.global_batch=8", "optim.warmup_steps=2",
         "log.every=1", "log.wandb=disabled", "log.progress=false", "eval.every=0", "eval.batches=1",
         "eval.micro_batch=4", "eval.samples=4", "checkpoint.every=0", "sample.gen_length=32",
         "sample.block_length=16", "sample.steps=32", "sample.batch_size=3"]


@pytest.fixture(scope="module")
def tasks(tmp_path_factory):
    out = tmp_path_factory.mktemp("tasks")
    subprocess.run([sys.executable, "data/make_tasks.py", "--out", str(out), "--train", "600", "--val", "40"],
                   cwd=ROOT, env=env(), check=True, capture_output=True, text=True, timeout=300)
    return out


def train(preset, tasks, run, *overrides, nproc=1, check=True):
    args = ["launch/train.py", preset, f"data.dir={tasks}", f"run_dir={run}", *SMALL, *overrides]
    if nproc > 1:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc), "--master_port",
               str(free_port()), *args]
    else:
        cmd = [sys.executable, *args]
    out = subprocess.run(cmd, cwd=ROOT, env=env(), capture_output=True, text=True, timeout=600)
    if check:
        assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-4000:]
    return out


def test_masked_sft_two_ranks_zero3_evaluates_exact_match_and_samples(tasks, tmp_path):
    # ZeRO-3 forwards are collective: eval decoding runs in lockstep (fixed steps) so no rank hangs.
    run = tmp_path / "masked"
    out = train(MASKED, tasks, run, "train.zero_stage=3", "sample.threshold=0.9", "sample.cache=dual", nproc=2)
    assert "masked diffusion, sft" in out.stdout + out.stderr
    rows = metrics(run)
    evals = [r for r in rows if "eval/exact_match" in r]
    assert len(evals) == 1 and 0.0 <= evals[0]["eval/exact_match"] <= 1.0
    assert evals[0]["eval/elbo_bits_per_token"] > 0
    samples = (run / "samples" / "step_00000006" / "samples.txt").read_text().splitlines()
    assert [s.split(" ->")[0] for s in samples] == ["add 482 + 97 =", "sort 5 1 9 3 :", "reverse a b c d :",
                                                     "copy 7 2 9 :"]


def test_ar_twin_and_the_decode_benchmark(tasks, tmp_path):
    masked, ar = tmp_path / "masked", tmp_path / "ar"
    train(MASKED, tasks, masked)
    out = train(AR, tasks, ar)
    assert "autoregressive twin, sft" in out.stdout + out.stderr
    assert "eval/nll_bits_per_token" in metrics(ar)[-1] and "eval/exact_match" in metrics(ar)[-1]
    report = tmp_path / "decode.json"
    bench = subprocess.run([sys.executable, "launch/benchmark.py", "decode", "--masked", str(masked), "--ar", str(ar),
                            "--prompts", "6", "--gen-length", "32", "--block-length", "16", "--batch-size", "3",
                            "--refresh-every", "2", "--out", str(report)], cwd=ROOT, env=env(), capture_output=True, text=True, timeout=600)
    assert bench.returncode == 0, bench.stderr[-4000:]
    assert "speed-up" in bench.stdout and "cache refresh every 2 steps" in bench.stdout
    result = json.loads(report.read_text())
    assert set(result) == {"reference", "threshold", "threshold+prefix", "threshold+dual", "ar"}
    assert result["reference"]["speedup_vs_reference"] == 1.0
    # The reference commits one token per step; threshold decoding at least one, so never more forwards.
    assert result["reference"]["forwards"] >= result["threshold"]["forwards"]
    for r in result.values():
        assert r["tokens"] > 0 and r["tokens_per_s"] > 0 and 0.0 <= r["exact_match"] <= 1.0


def test_objective_and_causal_flag_must_agree(tasks, tmp_path):
    out = train(MASKED, tasks, tmp_path / "bad", "objective.name=autoregressive", check=False)
    assert out.returncode == 2 and "model.causal=true" in out.stderr
