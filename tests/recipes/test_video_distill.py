"""Few-step video distillation (recipes/video_distill): the student's target is the teacher's guided ODE
solution, and a 2-step student trains from a tiny video_dit teacher through the real CLI on 2 ranks, resumes
exactly, exports, and samples mp4s in its 2 steps."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from framework.config import from_dict
from framework.diffusion import flow
from framework.distributed import free_port
from recipes.video_distill.distill import segment_grid, segment_velocity, student_sigmas
from recipes.video_distill.recipe import VideoDistillRecipe, VideoDistillRunConfig
from recipes.video_dit.recipe import TextToVideo
from tests.recipes.test_video_recipes import COMMON, DIT, SMALL_DIT, losses, run, vae_export  # noqa: F401
from tests.runs import ROOT, env

DISTILL = str(ROOT / "recipes/video_distill/configs/tiny.yaml")
TINY_MODEL = {"model": {"in_channels": 4, "patch": [1, 2, 2], "dim": 32, "depth": 2, "heads": 2, "ffn_hidden": 64,
                        "text_dim": 32}, "text": {"layers": 1, "heads": 2, "max_len": 16}}


def tiny_teacher(seed: int) -> TextToVideo:
    """A tiny teacher with every weight perturbed: the DiT's zero-initialised output layers (adaLN-zero) would
    otherwise predict 0 everywhere, and a null caption of zeros would make guidance change nothing."""
    torch.manual_seed(seed)
    cfg = from_dict(VideoDistillRunConfig, {**TINY_MODEL, "distill": {"teacher": "unused"}})
    model = TextToVideo(cfg).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.3 * torch.randn_like(p))
    return model


def reference_cfg_euler(model, x, times, prompts, scale):
    """The teacher's guided Euler steps written out: v = u + s (c - u), x += (t_next - t) v."""
    text, mask = model.text_encoder(prompts)
    null = model.null_condition(text.shape[1])
    for t, t_next in zip(times[:-1], times[1:]):
        tt = torch.full((x.shape[0],), float(t))
        c = model(x, tt, text, mask)
        u = model(x, tt, null["text"].expand_as(text), null["text_mask"].expand_as(mask))
        x = x + (float(t_next) - float(t)) * (u + scale * (c - u))
    return x


def test_segment_grids_tile_the_teachers_grid():
    student, teacher = student_sigmas(2, 3.0), student_sigmas(8, 3.0)
    tiles = [segment_grid(student, teacher, k) for k in range(2)]
    assert torch.equal(tiles[0][[0, -1]], student[:2]) and torch.equal(tiles[1][[0, -1]], student[1:])
    assert torch.allclose(torch.cat([tiles[0], tiles[1][1:]]), teacher)  # 4 teacher steps per segment
    odd = segment_grid(student_sigmas(4, 1.0), student_sigmas(6, 1.0), 1)  # [0.75, 0.5]: one teacher time inside
    assert torch.allclose(odd, torch.tensor([0.75, 4 / 6, 0.5]))


@torch.no_grad()
def test_loss_target_is_the_teachers_guided_solution():
    """teacher_targets (what the loss regresses to) = the velocity of one Euler step onto the teacher's CFG Euler
    solution over the sample's segment, row by row, and chaining the segments reproduces the teacher's sampler."""
    teacher = tiny_teacher(0)
    cfg = from_dict(VideoDistillRunConfig, {**TINY_MODEL, "distill": {"teacher": "unused", "student_steps": 2,
                                                                       "teacher_steps": 4, "cfg_scale": 3.0}})
    prompts = ["a red circle moves left", "a blue square moves up", "a green triangle moves down"]
    x = torch.randn(3, 4, 2, 4, 4, generator=torch.Generator().manual_seed(1))
    student, full = student_sigmas(2, 2.0), student_sigmas(4, 2.0)
    segment = torch.tensor([0, 1, 1])
    target = VideoDistillRecipe().teacher_targets(cfg, teacher, {}, {"caption": prompts}, x, segment, student, full)
    for i, k in enumerate(segment.tolist()):
        times = full[2 * k: 2 * k + 3]
        end = reference_cfg_euler(teacher, x[i:i + 1], times, prompts[i:i + 1], 3.0)
        step = x[i] + (float(student[k + 1]) - float(student[k])) * target[i]  # the student's single Euler step
        assert torch.allclose(step, end[0], atol=1e-5), (i, (step - end[0]).abs().max())
    # Guidance matters here: the same targets at scale 1 differ (so the test would catch a dropped scale).
    cfg.distill.cfg_scale = 1.0
    plain = VideoDistillRecipe().teacher_targets(cfg, teacher, {}, {"caption": prompts}, x, segment, student, full)
    assert (plain - target).abs().max() > 1e-3
    # Segment 0 then segment 1 from noise = the teacher's own 4-step guided Euler sampler.
    x_mid = x[:1] + (float(student[1]) - 1.0) * target[:1]
    cfg.distill.cfg_scale = 3.0
    seg1 = VideoDistillRecipe().teacher_targets(cfg, teacher, {}, {"caption": prompts[:1]}, x_mid,
                                                torch.tensor([1]), student, full)
    chained = x_mid + (0.0 - float(student[1])) * seg1
    assert torch.allclose(chained, reference_cfg_euler(teacher, x[:1], full, prompts[:1], 3.0), atol=1e-5)


def test_segment_velocity_lands_on_the_end():
    x, end = torch.randn(2, 3), torch.randn(2, 3)
    v = segment_velocity(x, end, 0.8, 0.3)
    assert torch.allclose(flow.euler_step(v, x, 0.8, 0.3), end, atol=1e-6)


# ---- through the CLI -----------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def teacher_run(shapes_data, vae_export, tmp_path_factory) -> Path:  # noqa: F811
    """A tiny video_dit teacher trained 2 steps with an EMA."""
    run_dir = tmp_path_factory.mktemp("teacher") / "run"
    run(DIT, shapes_data, run_dir, *SMALL_DIT, f"vae.path={vae_export}", "train.steps=2", "ema.decay=0.9",
        "checkpoint.every=2")
    return run_dir


def distill(data: Path, teacher: Path, run_dir: Path, *overrides: str, nproc: int = 2) -> subprocess.CompletedProcess:
    """launch/train.py on the distill preset; model, text and vae come from the teacher (no SMALL_DIT needed)."""
    args = [DISTILL, f"data.dir={data}", "data.latents=", f"run_dir={run_dir}", f"distill.teacher={teacher}", *COMMON,
            "distill.student_steps=2", "distill.teacher_steps=4", "vae.stats_batches=1", "train.steps=4",
            "ema.decay=0.9", *overrides]
    launcher = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc), "--master_port",
                str(free_port())] if nproc > 1 else [sys.executable]
    return subprocess.run([*launcher, "launch/train.py", *args], cwd=ROOT, env=env(), capture_output=True, text=True,
                          timeout=900)


@pytest.mark.slow
def test_student_trains_resumes_exports_and_samples_in_its_steps(shapes_data, teacher_run, tmp_path):
    import decord

    a = distill(shapes_data, teacher_run, tmp_path / "a")
    assert a.returncode == 0, a.stderr[-5000:]
    assert f"initialised from {teacher_run}" in a.stdout  # the student starts as the teacher (train.init_from)
    saved = yaml.safe_load((tmp_path / "a" / "config.yaml").read_text())
    assert saved["sample"]["steps"] == 2 and saved["model"]["dim"] == 32 and saved["train"]["init_from"] == str(
        teacher_run)
    for args in (["train.stop_after=2"], ["resume=auto"]):
        b = distill(shapes_data, teacher_run, tmp_path / "b", *args)
        assert b.returncode == 0, b.stderr[-5000:]
    la, lb = losses(tmp_path / "a"), losses(tmp_path / "b")
    assert sorted(la) == [1, 2, 3, 4] and [la[s] for s in la] == [lb[s] for s in la]

    out = subprocess.run([sys.executable, "launch/export.py", str(tmp_path / "b"), "--out", str(tmp_path / "export")],
                         cwd=ROOT, env=env(), capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    assert json.loads((tmp_path / "export" / "config.json").read_text())["recipe"] == "video_distill"

    samples = tmp_path / "samples"
    out = subprocess.run([sys.executable, "launch/sample.py", str(tmp_path / "b"), "--prompt", "a red circle moves left",
                          "--prompt", "a blue square moves up", "--seed", "1", "--out", str(samples)], cwd=ROOT,
                         env=env(), capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    videos = sorted(samples.glob("*.mp4"))
    assert [v.name for v in videos] == ["000_a_red_circle_moves_left.mp4", "001_a_blue_square_moves_up.mp4"]
    assert len(decord.VideoReader(str(videos[0]))) == 9


def test_missing_teacher_is_a_one_line_config_error(shapes_data, tmp_path):
    out = distill(shapes_data, tmp_path / "nowhere", tmp_path / "run", nproc=1)
    assert out.returncode == 2 and "distill.teacher" in out.stderr and "Traceback" not in out.stderr, out.stderr
