"""The tiny LLaDA preset through the CLI: train -> `launch/export.py --format hf` -> transformers loads it with our
logits -> a new run starts from it (`train.init_from`) under ZeRO-2 and under ZeRO-3 on 2 ranks, with exactly
the exported weights; a mismatched model config is a config error naming the key; unknown formats are listed."""

from __future__ import annotations

import subprocess
import sys

import pytest
import sentencepiece as spm
import torch

import framework  # noqa: F401  (registers the Auto classes)
from framework.checkpoint import complete_checkpoints
from framework.config import ConfigError
from framework.export import safetensors_io
from framework.init_from import read_ours
from framework.nn.llada import LladaModel
from framework.recipe import load_run_config
from tests.runs import ROOT, SMALL, TINY, env, train

pytestmark = pytest.mark.dist


def export(source, out, *flags: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "launch/export.py", str(source), "--out", str(out), *flags], cwd=ROOT,
                          env=env(), capture_output=True, text=True, timeout=300)


def weights(run) -> dict[str, torch.Tensor]:
    return safetensors_io.consolidated_state_dict(complete_checkpoints(run / "checkpoints")[-1])


@pytest.fixture(scope="module")
def exported(text_data, tmp_path_factory):
    """A 2-step run, its weights and its `--format hf` export."""
    tmp = tmp_path_factory.mktemp("hf_export")
    run, hf = tmp / "run", tmp / "hf"
    train(text_data, run, "train.steps=2", "optim.lr=3e-3")
    out = export(run, hf, "--format", "hf")
    assert out.returncode == 0, out.stderr[-3000:]
    return run, hf, weights(run)


def test_transformers_loads_the_export_with_our_logits_and_ids(text_data, exported, tmp_path):
    from transformers import AutoModelForMaskedLM, AutoTokenizer

    run, hf, trained = exported
    assert {"config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json", "tokenizer.model"} <= \
        {p.name for p in hf.iterdir()}
    cfg, _ = load_run_config(TINY, [f"data.dir={text_data}", *SMALL], world=1)  # the run's own config
    ours = LladaModel(cfg.model).eval()
    ours.load_state_dict(trained)
    ids = torch.randint(5, 400, (2, 32), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(AutoModelForMaskedLM.from_pretrained(hf)(ids).logits, ours(ids), rtol=0, atol=0)
    text = "The minister said the river <mask> rose"
    sp = spm.SentencePieceProcessor(model_file=str(text_data / "tokenizer.model"))
    assert AutoTokenizer.from_pretrained(hf).encode(text) == sp.encode(text)

    out = export(run, tmp_path / "x", "--format", "onnx")
    assert out.returncode == 2 and "'safetensors' or 'hf'" in out.stderr


def test_init_from_the_export_under_zero2_then_resume_wins(text_data, exported, tmp_path):
    # With lr 0 one step leaves the weights as loaded, so the new run's checkpoint is the export exactly.
    _, hf, trained = exported
    run = tmp_path / "zero2"
    out = train(text_data, run, f"train.init_from={hf}", "optim.lr=0", "train.steps=2", "train.stop_after=1",
                "ema.decay=0", nproc=2)
    assert f"initialised from {hf}" in out.stdout + out.stderr
    assert all(torch.equal(trained[k], v) for k, v in weights(run).items())
    out = train(text_data, run, f"train.init_from={hf}", "optim.lr=0", "train.steps=2", "ema.decay=0",
                "resume=auto", nproc=2)
    assert "ignored: resume wins" in out.stdout + out.stderr


def test_init_from_the_export_under_zero3_and_a_mismatch_is_named(text_data, exported, tmp_path):
    _, hf, trained = exported
    out = train(text_data, tmp_path / "zero3", f"train.init_from={hf}", "optim.lr=0", "train.steps=1",
                "ema.decay=0", "train.zero_stage=3", nproc=2)
    assert all(torch.equal(trained[k], v) for k, v in weights(tmp_path / "zero3").items())

    # The error names the key, the run config's value and the folder's. Under ZeRO-3 only rank 0 reads the
    # folder; the other rank raises the same error instead of waiting in a collective.
    message = f"model.dim: 32 in the run config but 64 in {hf}/config.json"
    out = train(text_data, tmp_path / "bad", f"train.init_from={hf}", "model.dim=32", "train.steps=1", check=False)
    assert out.returncode == 2 and message in out.stderr
    out = train(text_data, tmp_path / "bad3", f"train.init_from={hf}", "model.dim=32", "train.steps=1",
                "train.zero_stage=3", nproc=2, check=False, timeout=300)
    assert out.returncode != 0 and out.stderr.count(message) == 2, out.stderr[-3000:]


def test_init_from_our_run_dir_and_safetensors_export(text_data, exported, tmp_path):
    run, _, trained = exported
    cfg, recipe = load_run_config(TINY, [f"data.dir={text_data}", *SMALL], world=1)
    assert export(run, tmp_path / "st").returncode == 0
    for source in (run, tmp_path / "st"):  # a run dir means its newest complete checkpoint
        state = recipe.initial_weights(cfg, str(source))
        assert state.keys() == trained.keys() and all(torch.equal(trained[k], state[k]) for k in state)
    deeper, _ = load_run_config(TINY, [f"data.dir={text_data}", *SMALL, "model.n_layers=3"], world=1)
    with pytest.raises(ConfigError, match="model.n_layers: 3 in the run config but 2 in"):
        read_ours(str(tmp_path / "st"), deeper)
