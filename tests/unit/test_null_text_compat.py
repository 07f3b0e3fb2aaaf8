"""Frozen-text-encoder video_dit checkpoints written before the null caption became the encoder's states of "" hold a
learned `null_text` parameter the model no longer has. Resume, launch/sample.py, export and train.init_from load them:
the obsolete key is dropped with a one-line notice and nothing else is (another unexpected key still fails).

The old checkpoint is made by a real ZeRO-2 run of the old module layout: this file, run as a script, trains the
recipe's model with the `null_text` parameter the old `TextConditioned` always registered (first in parameter order,
so ZeRO's flat partitions hold it as an old run's did)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import pytest
import torch

PRESET = "recipes/video_dit/configs/tiny.yaml"
SMALL = ["model.in_channels=4", "model.dim=32", "model.depth=1", "model.heads=2", "model.ffn_hidden=64",
         "model.text_dim=32", "text.max_len=12", "data.buckets=['32x32x9:2']", "train.micro_batch=2",
         "train.global_batch=2", "sample.steps=2", "data.num_workers=1", "log.wandb=disabled", "log.progress=false",
         "eval.every=0", "eval.at_end=false", "checkpoint.every=0", "vae.stats_batches=1", "train.zero_stage=2",
         "ema.decay=0.9", "diffusion.caption_dropout=0.5"]  # the EMA holds null_text too
NOTICE = "obsolete weight 'null_text'"


def old_run(overrides: list[str]) -> None:
    """Train the old layout: the recipe's TextToVideo plus a trainable `null_text` (1, 1, text_dim)."""
    from torch import nn

    from framework import distributed as dist
    from framework.recipe import load_run_config
    from framework.trainer import train

    dist.prepare_env()
    cfg, recipe = load_run_config(PRESET, overrides, world=1)

    class OldLayout(type(recipe)):
        def build_model(self, cfg):
            built = super().build_model(cfg)
            built.model.null_text = nn.Parameter(torch.zeros(1, 1, cfg.model.text_dim))
            built.model.obsolete_keys = {}  # the old module knew nothing of it
            return built

    train(cfg, OldLayout())


def cli(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    from tests.runs import ROOT, env

    out = subprocess.run([sys.executable, *args], cwd=ROOT, env=env(), capture_output=True, text=True, timeout=300)
    if check:
        assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-4000:]
    return out


@pytest.fixture(scope="module")
def old(shapes_data, tmp_path_factory):
    from framework.checkpoint import complete_checkpoints
    from tests.text_encoders import write_umt5
    from tests.vae_exports import write_video_vae

    base = tmp_path_factory.mktemp("null_text")
    write_video_vae(base / "vae", [True, True, False], latent_channels=4)
    common = [*SMALL, f"data.dir={shapes_data}", f"vae.path={base / 'vae'}", f"text.encoder={write_umt5(base / 'umt5')}"]
    cli(__file__, *common, f"run_dir={base / 'old'}", "train.steps=2")
    return base, common, complete_checkpoints(base / "old" / "checkpoints")[-1]


def test_old_checkpoint_resumes_samples_exports_and_initialises(old):
    from framework.checkpoint import complete_checkpoints
    from framework.export.safetensors_io import consolidated_state_dict, read

    base, common, ckpt = old
    weights = consolidated_state_dict(ckpt)
    assert "null_text" in weights  # the old layout, in ZeRO-2's partitions
    del weights["null_text"]

    # resume (lr 0: the step leaves the weights as loaded, so the new checkpoint is the old one without null_text)
    run = base / "resumed"
    cli("-c", f"import shutil; shutil.copytree({str(base / 'old')!r}, {str(run)!r})")
    out = cli("launch/train.py", PRESET, *common, f"run_dir={run}", "train.steps=3", "optim.lr=0", "resume=auto")
    assert (out.stdout + out.stderr).count(NOTICE) == 1 and "done: step 3" in out.stdout
    resumed = consolidated_state_dict(complete_checkpoints(run / "checkpoints")[-1])
    assert resumed.keys() == weights.keys() and all(torch.equal(resumed[k], v) for k, v in weights.items())

    out = cli("launch/sample.py", str(ckpt), "--prompt", "a red circle moves left", "--out", str(base / "samples"))
    assert NOTICE in out.stdout + out.stderr and list((base / "samples").glob("*.mp4"))

    cli("launch/export.py", str(ckpt), "--out", str(base / "export"))
    out = cli("launch/train.py", PRESET, *common, f"run_dir={base / 'init'}", f"train.init_from={base / 'export'}",
              "train.steps=1", "optim.lr=0")
    assert NOTICE in out.stdout + out.stderr and "initialised from" in out.stdout + out.stderr
    started = consolidated_state_dict(complete_checkpoints(base / "init" / "checkpoints")[-1])
    assert started.keys() == weights.keys() and all(torch.equal(started[k], v) for k, v in weights.items())
    assert "null_text" in read(base / "export")[0]  # the export keeps what the run held; loading drops it


def test_old_zero0_checkpoint_resume_is_refused_in_one_line_pointing_to_init_from(old):
    """ZeRO-0 has no universal format to load the optimizer around the obsolete parameter: one line, exit 2."""
    base, common, _ = old
    run = base / "old0"
    cli(__file__, *common, f"run_dir={run}", "train.steps=1", "train.zero_stage=0")
    out = cli("launch/train.py", PRESET, *common, f"run_dir={run}", "train.steps=2", "train.zero_stage=0",
              "resume=auto", check=False)
    assert out.returncode == 2 and "Traceback" not in out.stderr, out.stderr[-3000:]
    line = out.stderr.strip().splitlines()[-1]
    assert "obsolete weight 'null_text'" in line and "train.init_from=" in line


def test_only_the_obsolete_key_is_dropped(old):
    from framework.recipe import load_run_config

    _, common, _ = old
    cfg, recipe = load_run_config(PRESET, common, world=1)
    model = recipe.build_model(cfg).model
    state = {**model.state_dict(), "null_text": torch.zeros(1, 1, 32)}
    model.load_state_dict(dict(state))  # strict: null_text alone is dropped
    with pytest.raises(RuntimeError, match="bogus") as e:
        model.load_state_dict({**state, "bogus": torch.zeros(1)})
    assert "null_text" not in str(e.value)
    missing = dict(state)
    missing.pop("dit.patch_embed.weight")
    with pytest.raises(RuntimeError, match="dit.patch_embed.weight"):
        model.load_state_dict(missing)


if __name__ == "__main__":
    old_run(sys.argv[1:])
