"""Ulysses sequence parallelism (train.sequence_parallel): 2 ranks over gloo against SP=1 on the same samples."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from framework.checkpoint import complete_checkpoints
from framework.config import ConfigError
from framework.distributed import free_port
from framework.export.safetensors_io import consolidated_state_dict
from framework.recipe import load_run_config
from tests.recipes.test_video_recipes import vae_export  # noqa: F401, F811 (a pytest fixture)
from tests.runs import ROOT, TINY, env, losses, metrics

pytestmark = pytest.mark.dist

# video_dit_recompute: blocks recomputed in backward (activation checkpointing) redo their all-to-alls in step.
FAMILIES = ["video_dit", "video_dit_recompute", "wan", "llada", "llada_ar", "joint_av"]


@pytest.mark.parametrize("stage", [2, 3])
def test_sp2_equals_sp1_for_loss_gradients_and_eval(tmp_path, stage):
    """One sample, every model family: SP=2's loss, DeepSpeed's reduced gradient of every parameter and the
    eval-mode loss equal plain SP=1 autograd's (ZeRO-3 needed reduce_scatter off: its default path halved them)."""
    out = tmp_path / "sp.json"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(free_port()),
           "tests/dist/sp_worker.py", str(stage), str(out), *FAMILIES]
    run = subprocess.run(cmd, cwd=ROOT, env=dict(env(), PYTHONPATH=str(ROOT)), capture_output=True, text=True,
                         timeout=300)
    assert run.returncode == 0, run.stderr[-5000:]
    results = json.loads(out.read_text())
    for family in FAMILIES:
        r = results[family]
        assert abs(r["loss"] - r["ref_loss"]) <= 1e-5, (family, r["loss"], r["ref_loss"])
        assert abs(r["eval"] - r["ref_eval"]) <= 1e-5, (family, r["eval"], r["ref_eval"])
        assert r["ref_grad_norm"] > 0.1 and not r["zero_ref_grads"], (family, r["zero_ref_grads"])
        bad = {n: d for n, d in r["grad_diff_and_scale"].items() if d[0] > 1e-4 * d[1] + 1e-7}
        assert not bad, (family, bad)


SMALL_SP = ["model.vocab_size=512", "model.dim=64", "model.n_layers=2", "model.n_heads=2", "model.ffn_hidden=128",
            "model.max_seq_len=64", "data.seq_len=32", "train.micro_batch=2", "train.global_batch=4",
            "optim.warmup_steps=2", "optim.lr=3e-3", "log.every=1", "log.wandb=disabled", "log.progress=false",
            "eval.every=0", "eval.at_end=false", "checkpoint.every=0", "train.steps=4"]


def _cli(data: Path, run_dir: Path, nproc: int, *overrides: str) -> subprocess.CompletedProcess:
    args = [TINY, f"data.dir={data}", f"run_dir={run_dir}", *SMALL_SP, *overrides]
    launcher = ([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc), "--master_port",
                 str(free_port())] if nproc > 1 else [sys.executable])
    out = subprocess.run([*launcher, "launch/train.py", *args], cwd=ROOT, env=env(), capture_output=True, text=True,
                         timeout=600)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-5000:]
    return out


@pytest.mark.slow
def test_training_with_sp_matches_one_rank_resumes_exactly_and_evaluates(text_data, tmp_path):
    """2 ranks at SP=2 are one data-parallel replica: the same batches, noise and updates as 1 rank at SP=1 (loss
    per step within 1e-4), resume mid-run is bit-exact, evaluation (ELBO) plus sampling run under SP and give the
    SP=1 numbers, and a checkpoint of an SP=2 run resumes at SP=1."""
    sp = ["train.sequence_parallel=2", "train.zero_stage=3", "ema.decay=0.9"]
    out = _cli(text_data, tmp_path / "sp", 2, *sp, "eval.at_end=true", "eval.batches=1", "eval.samples=2",
               "sample.gen_length=8", "sample.steps=4", "sample.block_length=8")
    assert "data-parallel 1 = 4 | sequence parallel 2" in out.stdout + out.stderr
    _cli(text_data, tmp_path / "one", 1, "train.zero_stage=3", "ema.decay=0.9", "eval.at_end=true", "eval.batches=1",
         "eval.samples=2", "sample.gen_length=8", "sample.steps=4", "sample.block_length=8")
    a, one = losses(tmp_path / "sp"), losses(tmp_path / "one")
    assert all(abs(a[s] - one[s]) <= 1e-4 for s in range(1, 5)), (a, one)
    evals = [m for m in metrics(tmp_path / "sp") if any(k.startswith("eval/") for k in m)]
    evals_one = [m for m in metrics(tmp_path / "one") if any(k.startswith("eval/") for k in m)]
    assert evals and evals_one
    for key, value in evals[0].items():
        if key.startswith("eval/") and isinstance(value, float):
            assert abs(value - evals_one[0][key]) <= 1e-3 * max(1.0, abs(value)), (key, value, evals_one[0][key])

    _cli(text_data, tmp_path / "split", 2, *sp, "train.stop_after=2")
    _cli(text_data, tmp_path / "split", 2, *sp, "resume=auto")
    b = losses(tmp_path / "split")
    assert [a[s] for s in range(1, 5)] == [b[s] for s in range(1, 5)]
    wa = consolidated_state_dict(complete_checkpoints(tmp_path / "sp" / "checkpoints")[-1])
    wb = consolidated_state_dict(complete_checkpoints(tmp_path / "split" / "checkpoints")[-1])
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
    # Another N on the same ranks: ZeRO's split is over all ranks either way, so weights and optimizer load.
    out = _cli(text_data, tmp_path / "split", 2, "train.zero_stage=3", "ema.decay=0.9", "train.steps=5", "resume=auto")
    assert "train.sequence_parallel changed 2 -> 1: data restarts epoch" in out.stdout + out.stderr
    assert 5 in losses(tmp_path / "split")


@pytest.mark.parametrize("overrides, world, message", [
    (["train.sequence_parallel=2"], 3, "train.sequence_parallel=2 does not divide the world size 3"),
    (["train.sequence_parallel=2", "model.n_heads=3", "model.dim=48"], 2, "model.n_heads=3"),
    (["train.sequence_parallel=2", "model.n_heads=4", "model.n_kv_heads=1"], 2, "model.n_kv_heads=1"),
    (["train.sequence_parallel=2", "data.seq_len=33"], 2, "data.seq_len has 33 tokens"),
    (["train.sequence_parallel=2", "train.global_batch=4", "train.micro_batch=4"], 4,
     "train.global_batch=4 is not divisible by train.micro_batch (4) x world size (2)"),
])
def test_impossible_sequence_parallel_configs_are_config_errors(overrides, world, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
        load_run_config(TINY, overrides, world)


def test_a_video_bucket_the_group_cannot_split_is_a_config_error_at_load():
    """A bucket's latent grid is known from the VAE's compression: an odd token count is refused when the config
    loads, naming the bucket, not at that bucket's first forward (possibly hours into a run)."""
    video = str(Path(TINY).parents[2] / "video_dit" / "configs" / "tiny.yaml")
    # 32x32x9 frames -> latent (3, 4, 4) with the tiny VAE's 4x/8x compression and (1, 2, 2) patches: 12 tokens
    odd = ["train.sequence_parallel=8", "model.heads=8", "model.dim=128", "data.buckets=['32x32x9:2']",
           "train.global_batch=2", "train.micro_batch=2"]
    with pytest.raises(ConfigError, match=r"data.buckets '32x32x9:2' has 12 tokens, not divisible by 8"):
        load_run_config(video, odd, 8)
    assert load_run_config(video, odd, 1)[0].train.sequence_parallel == 8  # one process: whole sequences


def test_sequence_parallel_plus_data_parallel_batch_arithmetic():
    """world 4 at SP=2 is 2 data-parallel replicas: global 8 = micro 2 x accum 2 x 2. A single process (sampling
    or exporting an SP run, --describe, the planner) loads an SP config without splitting anything."""
    sp = ["train.sequence_parallel=2", "train.global_batch=8", "train.micro_batch=2"]
    cfg, _ = load_run_config(TINY, sp, 4)
    assert cfg.grad_accum(2) == 2
    with pytest.raises(ConfigError, match=r"world size \(4\)"):
        load_run_config(TINY, [*sp, "train.micro_batch=4"], 8)
    assert load_run_config(TINY, sp, 1)[0].train.sequence_parallel == 2


@pytest.mark.slow
def test_video_dit_trains_evaluates_and_samples_under_sp(shapes_data, vae_export, tmp_path):  # noqa: F811
    """The video recipe end to end at SP=2 on 2 ranks (one replica): same losses as 1 rank, and the held-out
    loss of the evaluation too; sampling renders its videos."""
    from tests.recipes.test_video_recipes import DIT, SMALL_DIT
    from tests.recipes.test_video_recipes import run as run_video

    common = [*SMALL_DIT, f"vae.path={vae_export}", "train.steps=2", "train.zero_stage=2", "eval.at_end=true",
              "eval.samples=2", "eval.batches=1", "train.global_batch=2"]
    run_video(DIT, shapes_data, tmp_path / "sp", *common, "train.sequence_parallel=2")
    run_video(DIT, shapes_data, tmp_path / "one", *common, nproc=1)
    a, one = metrics(tmp_path / "sp"), metrics(tmp_path / "one")
    for step in (1, 2):
        la = next(m["loss"] for m in a if m["step"] == step and "loss" in m)
        lo = next(m["loss"] for m in one if m["step"] == step and "loss" in m)
        assert abs(la - lo) <= 1e-4, (step, la, lo)
    ea, eo = (next(m for m in rows if "eval/loss" in m) for rows in (a, one))
    assert all(abs(ea[k] - eo[k]) <= 1e-4 for k in eo if k.startswith("eval/")), (ea, eo)  # loss, adherence
    assert len(sorted((tmp_path / "sp" / "samples" / "step_00000002").glob("*.mp4"))) == 2
