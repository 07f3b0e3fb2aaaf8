"""The other engine settings from config: ZeRO-0 and ZeRO-1, bf16, ZeRO-Offload of the optimizer to CPU."""

from __future__ import annotations

import pytest

from framework.checkpoint import complete_checkpoints, read_meta
from tests.runs import losses, train

pytestmark = pytest.mark.dist


@pytest.mark.parametrize("settings", [
    ["train.zero_stage=0"],
    ["train.zero_stage=1", "train.precision=bf16"],
    ["train.zero_stage=2", "train.offload_optimizer=true"],
    ["train.zero_stage=3", "train.precision=bf16", "train.offload_optimizer=true"],
], ids=["zero0-fp32", "zero1-bf16", "zero2-offload", "zero3-bf16-offload"])
def test_engine_settings_train(text_data, tmp_path, settings):
    run = tmp_path / "run"
    train(text_data, run, *settings, "train.steps=10", "optim.lr=3e-3", nproc=1)
    loss = losses(run)
    assert sorted(loss) == list(range(1, 11))
    assert loss[10] < loss[1]
    assert read_meta(complete_checkpoints(run / "checkpoints")[-1])["step"] == 10
