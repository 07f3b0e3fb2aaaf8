"""metrics.jsonl after a resume holds every step once; WANDB_MODE is honoured unless log.wandb is set."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from framework.checkpoint import complete_checkpoints
from framework.config import ConfigError
from framework.metrics import Logger, resolve_wandb_mode
from framework.recipe import load_run_config
from tests.runs import TINY, metrics, train


def _logger(run: Path, start_step: int, wandb_mode: str | None = "disabled") -> Logger:
    return Logger(str(run), {}, main=True, total_steps=10, start_step=start_step, wandb_mode=wandb_mode,
                  project="test", progress=False)


def _write_rows(run: Path, rows: list[dict], tail: str = "") -> None:
    run.mkdir(parents=True, exist_ok=True)
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows) + tail)


def test_resume_drops_the_abandoned_timeline(tmp_path):
    run = tmp_path / "run"
    old = [{"step": s, "loss": 10.0 - s} for s in range(1, 7)] + [{"step": 4, "eval/bits": 3.0}]
    _write_rows(run, old, tail='{"step": 7, "lo')  # the crash cut the last line short
    logger = _logger(run, start_step=4)  # resumed from the checkpoint of step 4
    for s in (5, 6):
        logger.log(s, {"loss": 0.5})
    logger.close()
    rows = metrics(run)
    assert [r["step"] for r in rows if "loss" in r] == [1, 2, 3, 4, 5, 6]
    assert [r["loss"] for r in rows if r["step"] in (5, 6)] == [0.5, 0.5]  # the replayed values, not the old
    assert [r["step"] for r in rows if "eval/bits" in r] == [4]


def test_relogging_the_resume_step_replaces_its_record(tmp_path):
    """A finished run resumed at its last step evaluates again at that step: one eval record, not two."""
    run = tmp_path / "run"
    _write_rows(run, [{"step": 1, "loss": 2.0}, {"step": 2, "loss": 1.0}, {"step": 2, "eval/bits": 3.0}])
    logger = _logger(run, start_step=2)
    logger.log(2, {"eval/bits": 2.5})
    logger.close()
    rows = metrics(run)
    assert [(r["step"], r.get("loss"), r.get("eval/bits")) for r in rows] == [(1, 2.0, None), (2, 1.0, None),
                                                                              (2, None, 2.5)]


def test_fresh_run_in_an_old_run_dir_starts_a_new_file(tmp_path):
    run = tmp_path / "run"
    _write_rows(run, [{"step": s, "loss": 1.0} for s in (1, 2, 3)])
    logger = _logger(run, start_step=0)
    logger.log(1, {"loss": 9.0})
    logger.close()
    assert [(r["step"], r["loss"]) for r in metrics(run)] == [(1, 9.0)]


def test_cli_resume_after_a_crash_logs_every_step_once(text_data, tmp_path):
    """A run that got past its last checkpoint (steps 5-6 logged, only step 4 saved) and resumes: before the
    fix steps 5 and 6 appeared twice."""
    run = tmp_path / "run"
    common = ["train.steps=6", "train.zero_stage=0", "checkpoint.every=4"]
    train(text_data, run, *common, "checkpoint.at_end=false")  # as if killed after step 6, before a save
    assert [c.name for c in complete_checkpoints(run / "checkpoints")] == ["step_00000004"]
    train(text_data, run, *common, "resume=auto")
    assert [r["step"] for r in metrics(run) if "loss" in r] == [1, 2, 3, 4, 5, 6]


def test_wandb_mode_env_is_honoured_unless_the_config_sets_it():
    assert resolve_wandb_mode(None, {}) == "offline"
    assert resolve_wandb_mode(None, {"WANDB_MODE": "disabled"}) == "disabled"
    assert resolve_wandb_mode("online", {"WANDB_MODE": "disabled"}) == "online"
    cfg, _ = load_run_config(TINY, [], world=1)
    assert cfg.log.wandb is None  # the preset leaves it to the environment
    cfg, _ = load_run_config(TINY, ["log.wandb=offline"], world=1)
    assert cfg.log.wandb == "offline"
    with pytest.raises(ConfigError, match=r"log.wandb: 'nope' is not one of \['offline', 'online', 'disabled'\]"):
        load_run_config(TINY, ["log.wandb=nope"], world=1)  # Optional[Literal]: still the list of choices


def test_logger_with_wandb_mode_disabled_in_the_env_starts_no_wandb(tmp_path, monkeypatch):
    """Before: the config default `offline` won over WANDB_MODE=disabled and wandb wrote an offline run."""
    monkeypatch.setenv("WANDB_MODE", "disabled")
    cfg, _ = load_run_config(TINY, [], world=1)
    logger = _logger(tmp_path / "run", start_step=0, wandb_mode=cfg.log.wandb)
    logger.log(1, {"loss": 1.0})
    logger.close()
    assert logger.wandb is None and not (tmp_path / "run" / "wandb").exists()
