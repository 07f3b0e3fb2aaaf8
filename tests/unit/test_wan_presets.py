"""The Wan2.1 fine-tuning presets plan as fitting through the real CLI (`launch/train.py PRESET --plan`), with no
pipeline folder (the model's shape comes from the preset): the 1.3B LoRA preset on one 80 GB GPU, the 1.3B full
preset and the 14B long-video presets (sequence parallel 8, ZeRO-3) on 8 x 80 GB."""

from __future__ import annotations

import re
import subprocess
import sys

import pytest

from tests.runs import ROOT, env

CONFIGS = ROOT / "recipes/video_dit/configs"
GIB = 1024**3
ROW = re.compile(r"^(\d+x\d+x\d+:\d+)\s+" + r"\s+".join([r"([\d.]+)"] * 8) + r"\s+(fits|does not fit)$")


def plan(preset: str, gpus: int, *overrides: str) -> tuple[str, list[tuple]]:
    """The plan's first line and its bucket rows (label, weights, grads, optim, gather, helpers, activ, overhd,
    total, verdict)."""
    out = subprocess.run([sys.executable, "launch/train.py", str(CONFIGS / preset), "--plan", "--gpus", str(gpus),
                          "--gpu-memory", "80", *overrides], cwd=ROOT, env=env(), capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    lines = out.stdout.splitlines()
    rows = [m.groups() for m in map(ROW.match, lines) if m]
    assert rows, out.stdout
    return next(line for line in lines if line.startswith(str(CONFIGS / preset))), rows


def params(head: str) -> tuple[int, int]:
    m = re.search(r"([\d,]+) trainable(?: \+ ([\d,]+) frozen)? parameters", head)
    return int(m.group(1).replace(",", "")), int((m.group(2) or "0").replace(",", ""))


@pytest.mark.parametrize("preset,frames", [("wan2_1_t2v_14b_480p_sp.yaml", "480x832x81"),
                                           ("wan2_1_t2v_14b_720p_sp.yaml", "720x1280x81")])
def test_14b_long_video_presets_fit_8_gpus_of_80gb(preset, frames):
    head, rows = plan(preset, 8)
    assert "8 GPU(s) of 80.0 GiB, ZeRO 3, bf16, activation checkpointing full, sequence parallel 8" in head
    trainable, _ = params(head)
    assert trainable == 14_288_491_584  # the released Wan2.1-T2V-14B transformer
    assert [r[0].split(":")[0] for r in rows][0] == frames and all(r[-1] == "fits" for r in rows)
    for row in rows:
        weights, optim, total = (float(row[i]) for i in (1, 3, 8))
        # ZeRO-3 partitions over all 8 ranks (DeepSpeed's seq_data_parallel_group), not over world / SP = 1.
        assert optim == pytest.approx(trainable * 12 / 8 / GIB, abs=0.01)
        assert weights == pytest.approx(trainable * 2 / 8 / GIB, abs=0.01)
        assert total <= 80


def test_1_3b_lora_preset_fits_one_80gb_gpu_and_full_preset_8():
    head, rows = plan("wan2_1_t2v_1_3b_lora.yaml", 1)
    trainable, frozen = params(head)
    assert frozen >= 1_418_996_800 and 0 < trainable < frozen / 20  # LoRA: the released base frozen
    assert "1 GPU(s) of 80.0 GiB" in head and "activation checkpointing full" in head and ", bf16," in head
    (label, weights, *_, total, verdict), = rows
    assert label == "480x832x81:1" and verdict == "fits" and float(total) <= 80
    assert float(weights) == pytest.approx((trainable + frozen) * 2 / GIB, abs=0.01)  # bf16 base + adapters

    head, rows = plan("wan2_1_t2v_1_3b_full.yaml", 8)
    assert params(head)[0] == 1_418_996_800 and "ZeRO 3" in head and all(r[-1] == "fits" for r in rows)
