"""Loading never runs code from a checkpoint; conversions and abandoned checkpoints stay out of the namespace."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from framework import checkpoint
from framework.checkpoint import COMPLETE, UnsafeCheckpointError, complete_checkpoints, make_head, resolve
from framework.config import ConfigError, to_dict

ROOT = Path(__file__).resolve().parents[2]
TINY = str(ROOT / "recipes/llada/configs/tiny.yaml")
MODEL = ["model.vocab_size=64", "model.dim=16", "model.n_layers=1", "model.n_heads=2", "model.ffn_hidden=32",
         "model.max_seq_len=16", "data.seq_len=16"]


class Planted:
    """Unpickling this creates `marker`: what a planted checkpoint file would do to whoever loads it."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def plant(path: Path, marker: Path) -> None:
    torch.save({"module": {"w": torch.zeros(2)}, "payload": Planted(marker)}, path)


def fake_checkpoint(root: Path, step: int, zero_stage: int = 0, cfg: dict | None = None) -> Path:
    """A complete checkpoint dir with clean files of the names DeepSpeed and the trainer write."""
    ckpt = root / "checkpoints" / checkpoint.tag_for(step)
    ckpt.mkdir(parents=True)
    torch.save({"module": {"w": torch.zeros(2)}}, ckpt / "mp_rank_00_model_states.pt")
    if zero_stage:
        torch.save({"optimizer_state_dict": {"zero_stage": zero_stage}}, ckpt / "zero_pp_rank_0_mp_rank_00_optim_states.pt")
    torch.save({"step": step, "rank": 0, "world": 1, "ema": None}, ckpt / "trainer_rank00000.pt")
    meta = {"step": step, "world_size": 1, "zero_stage": zero_stage, "recipe": "llada", "config": cfg or {}}
    (ckpt / "meta.json").write_text(json.dumps(meta))
    (ckpt / COMPLETE).write_text("")
    return ckpt


@pytest.mark.parametrize("zero_stage,name", [(0, "mp_rank_00_model_states.pt"),
                                             (2, "zero_pp_rank_0_mp_rank_00_optim_states.pt"),
                                             (2, "trainer_rank00000.pt")])
def test_export_refuses_a_planted_pickle_unread(tmp_path, zero_stage, name):
    from framework.export.safetensors_io import consolidated_state_dict

    ckpt = fake_checkpoint(tmp_path, 4, zero_stage)
    marker = tmp_path / "marker"
    plant(ckpt / name, marker)
    for use_ema in (False, True):
        with pytest.raises(UnsafeCheckpointError, match=f"refusing to load {ckpt / name}.*Path.touch|"
                                                        f"refusing to load {ckpt / name}.*pathlib"):
            consolidated_state_dict(ckpt, use_ema=use_ema)
    assert not marker.exists()


def test_safe_loading_forces_weights_only_even_where_a_caller_asks_otherwise(tmp_path):
    """DeepSpeed passes weights_only=False everywhere: inside safe_loading it is True all the same."""
    clean = fake_checkpoint(tmp_path, 2)
    evil, marker = tmp_path / "evil.pt", tmp_path / "marker"
    plant(evil, marker)
    with pytest.raises(UnsafeCheckpointError, match="GLOBAL"), checkpoint.safe_loading(clean):
        torch.load(evil, weights_only=False)
    assert not marker.exists()
    assert "TORCH_FORCE_WEIGHTS_ONLY_LOAD" not in os.environ  # restored on the way out
    # Outside, callers get what they asked for (a clean file loads either way).
    assert torch.load(clean / "trainer_rank00000.pt", weights_only=True)["step"] == 2


def test_trainer_state_and_legacy_pickles_are_refused(tmp_path):
    ckpt = fake_checkpoint(tmp_path, 2)
    marker = tmp_path / "marker"
    plant(ckpt / "trainer_rank00000.pt", marker)
    with pytest.raises(UnsafeCheckpointError, match="trainer_rank00000.pt"):
        checkpoint.trainer_states(ckpt)
    import pickle

    (ckpt / "trainer_rank00000.pt").write_bytes(pickle.dumps(Planted(marker)))  # not even a torch zip file
    with pytest.raises(UnsafeCheckpointError, match="not a torch.save zip file"):
        checkpoint.check_safe(ckpt)
    assert not marker.exists()


def _llada_cfg(tmp_path: Path):
    from framework.recipe import load_run_config

    return load_run_config(TINY, [*MODEL, f"run_dir={tmp_path / 'new'}", f"train.init_from={tmp_path}"], world=1)


def test_init_from_refuses_a_planted_pickle(tmp_path):
    from framework import init_from

    cfg, recipe = _llada_cfg(tmp_path)
    ckpt = fake_checkpoint(tmp_path, 4, 0, cfg=to_dict(cfg))
    marker = tmp_path / "marker"
    plant(ckpt / "mp_rank_00_model_states.pt", marker)
    model = recipe.build_model(cfg).model
    with pytest.raises(ConfigError, match="train.init_from=.*: refusing to load .*mp_rank_00_model_states.pt"):
        init_from.load(recipe, cfg, model)
    assert not marker.exists()


def test_export_cli_refuses_with_one_line(tmp_path):
    cfg, _ = _llada_cfg(tmp_path)
    ckpt = fake_checkpoint(tmp_path, 4, 0, cfg=to_dict(cfg))
    marker = tmp_path / "marker"
    plant(ckpt / "mp_rank_00_model_states.pt", marker)
    out = subprocess.run([sys.executable, "launch/export.py", str(tmp_path), "--out", str(tmp_path / "exp")],
                         cwd=ROOT, capture_output=True, text=True, timeout=120,
                         env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert out.returncode == 2, out.stderr[-2000:]
    assert "error: refusing to load" in out.stderr and "Traceback" not in out.stderr
    assert not marker.exists()


def test_conversions_and_abandoned_dirs_are_not_checkpoints(tmp_path):
    good = fake_checkpoint(tmp_path, 4)
    root = good.parent
    for stray in ("step_00000004_universal", "universal/step_00000004", "abandoned/step_00000008"):
        (root / stray).mkdir(parents=True)
        (root / stray / COMPLETE).write_text("")  # complete, yet never a checkpoint: it has no meta.json
    assert complete_checkpoints(root) == [good]
    assert resolve("auto", str(tmp_path)) == good
    assert checkpoint.universal_dir(good) == root / "universal" / "step_00000004"


def test_rollback_makes_the_older_checkpoint_the_head(tmp_path):
    old, newer = fake_checkpoint(tmp_path, 12), fake_checkpoint(tmp_path, 16)
    partial = fake_checkpoint(tmp_path, 20)
    (partial / COMPLETE).unlink()  # an interrupted save after it goes too
    (checkpoint.universal_dir(newer)).mkdir(parents=True)
    moved = make_head(old, str(tmp_path))
    root = old.parent
    assert moved == [root / "abandoned" / "step_00000016", root / "abandoned" / "step_00000020"]
    assert complete_checkpoints(root) == [old]
    assert (root / "latest").read_text() == "step_00000012"
    assert not checkpoint.universal_dir(newer).exists()
    assert resolve("auto", str(tmp_path)) == old
    # Rolling back past step 16 again keeps both abandoned copies.
    fake_checkpoint(tmp_path, 16)
    assert make_head(old, str(tmp_path))[0].name.startswith("step_00000016.")
    assert len(list((root / "abandoned").iterdir())) == 3
    # A checkpoint of another run, or the newest one, moves nothing.
    assert make_head(old, str(tmp_path / "other")) == []
    assert make_head(old, str(tmp_path)) == []
