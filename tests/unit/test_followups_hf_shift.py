"""`--format hf` of a shifted LLaDA run (objective.shift, Dream-style: the output at i predicts token i + 1): the
export's config.json records `shift`, and transformers' `AutoModelForMaskedLM` gives the logits our training and
decoders use (aligned with the tokens they predict), so filling a `<mask>` at j reads logits[:, j] either way."""

from __future__ import annotations

import json
import subprocess
import sys

import torch

import framework  # noqa: F401  (registers the Auto classes)
from framework.checkpoint import complete_checkpoints, read_meta
from framework.export.safetensors_io import consolidated_state_dict
from framework.nn.llada import LladaModel
from framework.recipe import load_run_config
from recipes.llada.objectives import diffusion_logits
from tests.runs import ROOT, env, train


def export_hf(run, out) -> None:
    done = subprocess.run([sys.executable, "launch/export.py", str(run), "--format", "hf", "--out", str(out)],
                          cwd=ROOT, env=env(), capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]


def test_shifted_run_hf_export_records_shift_and_gives_our_aligned_logits(text_data, tmp_path):
    from transformers import AutoModelForMaskedLM

    run, hf = tmp_path / "run", tmp_path / "hf"
    train(text_data, run, "train.steps=2", "optim.lr=3e-3", "objective.shift=true", "ema.decay=0")
    export_hf(run, hf)
    assert json.loads((hf / "config.json").read_text())["shift"] is True
    ckpt = complete_checkpoints(run / "checkpoints")[-1]
    cfg, _ = load_run_config(read_meta(ckpt)["config"], [], world=1)
    assert cfg.objective.shift
    ours = LladaModel(cfg.model).eval()
    ours.load_state_dict(consolidated_state_dict(ckpt))
    ids = torch.randint(5, 400, (2, 24), generator=torch.Generator().manual_seed(0))
    ids[:, 10] = cfg.model.mask_id
    theirs = AutoModelForMaskedLM.from_pretrained(hf).eval()
    assert theirs.config.shift is True
    with torch.no_grad():
        expected = diffusion_logits(cfg, ours, ids)  # what the run's decoders read at each position
        got = theirs(ids).logits
        torch.testing.assert_close(got, expected, rtol=0, atol=0)
        assert not torch.equal(got, ours(ids))  # the raw outputs are one position off
        # the loss of `labels` scores each token with the output that predicts it
        labels = torch.full_like(ids, -100)
        labels[:, 10] = 7
        loss = theirs(ids, labels=labels).loss
        torch.testing.assert_close(loss, torch.nn.functional.cross_entropy(expected[:, 10], labels[:, 10]))

    # an export without the key (written before it existed) reads as unshifted: the raw outputs, as then
    raw = json.loads((hf / "config.json").read_text())
    raw.pop("shift")
    (hf / "config.json").write_text(json.dumps(raw))
    older = AutoModelForMaskedLM.from_pretrained(hf).eval()
    assert older.config.shift is False
    with torch.no_grad():
        torch.testing.assert_close(older(ids).logits, ours(ids), rtol=0, atol=0)
