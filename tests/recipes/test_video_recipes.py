"""The tiny video VAE and DiT presets through the real CLI: 2 ranks under ZeRO-2 and ZeRO-3, exact resume,
export, and sampling to mp4."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from framework.checkpoint import complete_checkpoints
from framework.distributed import free_port
from tests.runs import ROOT, env

pytestmark = pytest.mark.slow

VAE = str(ROOT / "recipes/video_vae/configs/tiny.yaml")
DIT = str(ROOT / "recipes/video_dit/configs/tiny.yaml")
COMMON = ["log.every=1", "log.wandb=disabled", "log.progress=false", "eval.every=0", "eval.at_end=false",
          "checkpoint.every=0", "data.buckets=['32x32x9:2']", "data.num_workers=1", "train.micro_batch=2",
          "train.global_batch=4", "optim.warmup_steps=1"]
SMALL_VAE = ["model.base_channels=8"]
SMALL_DIT = ["model.dim=32", "model.depth=2", "model.heads=2", "model.ffn_hidden=64", "model.text_dim=32",
             "text.layers=1", "text.heads=2", "sample.steps=3", "vae.stats_batches=1"]


def run(preset: str, data: Path, run_dir: Path, *overrides: str, nproc: int = 2) -> subprocess.CompletedProcess:
    args = [preset, f"data.dir={data}", f"run_dir={run_dir}", *COMMON, *overrides]
    launcher = ([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc), "--master_port",
                 str(free_port())] if nproc > 1 else [sys.executable])
    out = subprocess.run([*launcher, "launch/train.py", *args], cwd=ROOT, env=env(), capture_output=True, text=True,
                         timeout=900)
    assert out.returncode == 0, out.stderr[-5000:]
    return out


def losses(run_dir: Path) -> dict[int, float]:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in rows if "loss" in r}


@pytest.fixture(scope="module")
def vae_export(shapes_data, tmp_path_factory) -> Path:
    """A tiny VAE trained a few steps on one rank and exported: the frozen helper of the DiT tests."""
    base = tmp_path_factory.mktemp("vae")
    run(VAE, shapes_data, base / "run", *SMALL_VAE, "train.steps=3", "train.global_batch=2", nproc=1)
    out = subprocess.run([sys.executable, "launch/export.py", str(base / "run"), "--out", str(base / "export")],
                         cwd=ROOT, env=env(), capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    return base / "export"


@pytest.mark.parametrize("stage", [2, 3])
def test_vae_two_ranks_learn(shapes_data, tmp_path, stage):
    run(VAE, shapes_data, tmp_path / "run", *SMALL_VAE, f"train.zero_stage={stage}", "train.steps=8",
        "optim.lr=3e-3")
    loss = losses(tmp_path / "run")
    assert len(loss) == 8 and loss[8] < loss[1]


def test_vae_resume_is_exact(shapes_data, tmp_path):
    common = [*SMALL_VAE, "train.steps=4", "train.zero_stage=2"]
    run(VAE, shapes_data, tmp_path / "a", *common)
    run(VAE, shapes_data, tmp_path / "b", *common, "train.stop_after=2")
    run(VAE, shapes_data, tmp_path / "b", *common, "resume=auto")
    a, b = losses(tmp_path / "a"), losses(tmp_path / "b")
    assert [a[s] for s in range(1, 5)] == [b[s] for s in range(1, 5)]


@pytest.mark.parametrize("stage", [2, 3])
def test_dit_two_ranks_train_evaluate_and_sample(shapes_data, vae_export, tmp_path, stage):
    run_dir = tmp_path / "run"
    out = run(DIT, shapes_data, run_dir, *SMALL_DIT, f"vae.path={vae_export}", f"train.zero_stage={stage}",
              "train.steps=3", "eval.at_end=true", "eval.samples=3", "eval.batches=1")
    assert "prompt adherence:" in out.stdout + out.stderr
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    evals = [r for r in rows if "eval/adherence_all" in r]
    assert len(evals) == 1 and 0.0 <= evals[0]["eval/adherence_colour"] <= 1.0
    videos = sorted((run_dir / "samples" / "step_00000003").glob("*.mp4"))
    assert len(videos) == 3 and (run_dir / "samples" / "step_00000003" / "grid.png").is_file()


def test_dit_resume_is_exact_and_samples_through_the_cli(shapes_data, vae_export, tmp_path):
    import decord

    common = [*SMALL_DIT, f"vae.path={vae_export}", "train.steps=4", "train.zero_stage=2", "ema.decay=0.9"]
    run(DIT, shapes_data, tmp_path / "a", *common)
    run(DIT, shapes_data, tmp_path / "b", *common, "train.stop_after=2")
    run(DIT, shapes_data, tmp_path / "b", *common, "resume=auto")
    a, b = losses(tmp_path / "a"), losses(tmp_path / "b")
    assert [a[s] for s in range(1, 5)] == [b[s] for s in range(1, 5)]
    assert complete_checkpoints(tmp_path / "b" / "checkpoints")[-1].name == "step_00000004"

    out_dir = tmp_path / "samples"
    out = subprocess.run([sys.executable, "launch/sample.py", str(tmp_path / "b"), "--prompt", "a red circle moves left",
                          "--prompt", "a blue square moves up", "--steps", "2", "--cfg", "3.0", "--seed", "1",
                          "--size", "32x64x9", "--out", str(out_dir)], cwd=ROOT, env=env(), capture_output=True,
                         text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "EMA weights" in out.stdout
    videos = sorted(out_dir.glob("*.mp4"))
    assert [v.name for v in videos] == ["000_a_red_circle_moves_left.mp4", "001_a_blue_square_moves_up.mp4"]
    reader = decord.VideoReader(str(videos[0]))
    assert len(reader) == 9 and reader[0].shape == (32, 64, 3)
    assert (out_dir / "grid.png").is_file()


def test_latent_cache_is_keyed_and_trains_the_dit(shapes_data, vae_export, tmp_path):
    """cache_latents.py on 2 ranks writes latent shards the DiT trains from; another fps is refused."""
    cache = tmp_path / "latents"
    args = [DIT, f"data.dir={shapes_data}", f"vae.path={vae_export}", *COMMON, "--out", str(cache)]
    out = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
                          str(free_port()), "launch/cache_latents.py", *args], cwd=ROOT, env=env(),
                         capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    index = json.loads((cache / "train" / "index.json").read_text())
    assert sum(s["samples"] for s in index["shards"]) == 48
    assert index["cache_key"]["bucket"] == "32x32x9" and index["latent_std"] > 0

    run(DIT, shapes_data, tmp_path / "run", *SMALL_DIT, f"vae.path={vae_export}", f"data.latents={cache}",
        "train.steps=3")
    assert sorted(losses(tmp_path / "run")) == [1, 2, 3]
    bad = subprocess.run([sys.executable, "launch/train.py", DIT, f"data.dir={shapes_data}", f"vae.path={vae_export}",
                          f"data.latents={cache}", *COMMON, *SMALL_DIT, "data.fps=4", f"run_dir={tmp_path / 'bad'}"],
                         cwd=ROOT, env=env(), capture_output=True, text=True, timeout=300)
    assert bad.returncode == 2 and "rebuild the cache" in bad.stderr
