"""Export of a ZeRO-3 checkpoint through the real CLI reloads into our model with identical logits."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from framework.checkpoint import complete_checkpoints
from framework.distributed import free_port
from framework.export.safetensors_io import read
from framework.nn.llada import LladaModel, LladaModelConfig
from tests.runs import ROOT, env, train

pytestmark = pytest.mark.dist


def _load(export_dir):
    state, config = read(export_dir)
    model = LladaModel(LladaModelConfig(**config["model"]))
    model.load_state_dict(state)
    return model.eval(), config


def test_zero3_export_reloads_with_identical_logits(text_data, tmp_path):
    run = tmp_path / "run"
    train(text_data, run, "train.zero_stage=3", "train.steps=5", "optim.lr=3e-3", nproc=2)
    ckpt = complete_checkpoints(run / "checkpoints")[-1]

    ids = torch.randint(5, 400, (2, 32), generator=torch.Generator().manual_seed(0))
    torch.save(ids, tmp_path / "ids.pt")
    subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
                    str(free_port()), "tests/dist/engine_logits.py", str(ckpt), str(tmp_path / "ids.pt"),
                    str(tmp_path / "logits.pt")], cwd=ROOT, env=env(), check=True, capture_output=True, timeout=300)
    engine_logits = torch.load(tmp_path / "logits.pt")

    for flag, name in (([], "live"), (["--ema"], "ema")):
        out = subprocess.run([sys.executable, "launch/export.py", str(run), "--format", "safetensors", "--out",
                              str(tmp_path / name), *flag], cwd=ROOT, env=env(), capture_output=True, text=True,
                             timeout=300)
        assert out.returncode == 0, out.stderr[-3000:]
        assert (tmp_path / name / "tokenizer.model").is_file()
        assert json.loads((tmp_path / name / "tokenizer.json").read_text())["mask_id"] == 4
    live, config = _load(tmp_path / "live")
    assert config["step"] == 5 and config["recipe"] == "llada"
    with torch.no_grad():
        torch.testing.assert_close(live(ids), engine_logits, rtol=0, atol=1e-5)

    ema, config = _load(tmp_path / "ema")
    assert config["ema"] is True
    # The EMA lags the live weights: close to them, but not equal after 5 steps.
    assert any(not torch.equal(a, b) for a, b in zip(ema.state_dict().values(), live.state_dict().values()))


def test_export_errors_are_clear(tmp_path):
    out = subprocess.run([sys.executable, "launch/export.py", str(tmp_path / "nope"), "--out", str(tmp_path / "x")],
                         cwd=ROOT, env=env(), capture_output=True, text=True, timeout=120)
    assert out.returncode == 2 and "not a complete checkpoint" in out.stderr
