"""The joint video + audio preset through the real CLI on a generated flash + beep dataset: 2 ranks under
ZeRO-2 with evaluation (sync of sampled clips), exact resume, sampling to mp4 files with an AAC track in every
mode, and clear errors for VAEs that do not fit the config."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import av
import pytest

from framework.distributed import free_port
from tests.runs import ROOT, env

pytestmark = pytest.mark.slow

JOINT = str(ROOT / "recipes/video_audio/configs/tiny.yaml")
VIDEO_VAE = str(ROOT / "recipes/video_audio/configs/video_vae_tiny.yaml")
AUDIO_VAE = str(ROOT / "recipes/audio_vae/configs/tiny.yaml")
QUIET = ["log.every=1", "log.wandb=disabled", "log.progress=false", "eval.every=0", "eval.at_end=false",
         "checkpoint.every=0", "optim.warmup_steps=1", "data.num_workers=1"]
# 9 frames at 25 fps = 0.36 s: 3 video latents and 9 audio latents per clip.
SMALL_JOINT = ["model.dim=32", "model.depth=2", "model.heads=2", "model.ffn_hidden=64", "model.text_dim=32",
               "text.layers=1", "text.heads=2", "data.buckets=['32x32x9:2']", "train.micro_batch=2",
               "train.global_batch=4", "sample.steps=2", "sample.griffin_lim_iters=2", "vae.stats_batches=1"]


def cli(script: str, *args: str, nproc: int = 1) -> subprocess.CompletedProcess:
    launcher = ([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc), "--master_port",
                 str(free_port())] if nproc > 1 else [sys.executable])
    out = subprocess.run([*launcher, script, *args], cwd=ROOT, env=env(), capture_output=True, text=True,
                         timeout=900)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-5000:]
    return out


@pytest.fixture(scope="module")
def vaes(flash_beep, tmp_path_factory) -> dict[str, Path]:
    """Both frozen helpers, trained two steps each on the flash + beep clips and exported."""
    base = tmp_path_factory.mktemp("av_vaes")
    cli("launch/train.py", VIDEO_VAE, f"data.dir={flash_beep}", f"run_dir={base / 'video'}", *QUIET,
        "model.base_channels=8", "data.buckets=['32x32x9:2']", "train.micro_batch=2", "train.global_batch=2",
        "train.steps=2")
    cli("launch/train.py", AUDIO_VAE, f"data.dir={flash_beep}", f"run_dir={base / 'audio'}", *QUIET,
        "model.base_channels=16", "data.fps=25", "data.buckets=['16x16x9:2']", "train.micro_batch=2",
        "train.global_batch=2", "train.steps=2")
    for name in ("video", "audio"):
        cli("launch/export.py", str(base / name), "--out", str(base / f"{name}_export"))
    return {"video": base / "video_export", "audio": base / "audio_export"}


def joint_args(flash_beep: Path, vaes: dict, run_dir: Path, *more: str) -> list[str]:
    return [JOINT, f"data.dir={flash_beep}", f"run_dir={run_dir}", f"vae.path={vaes['video']}",
            f"audio_vae.path={vaes['audio']}", *QUIET, *SMALL_JOINT, *more]


def losses(run_dir: Path) -> dict[int, float]:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in rows if "loss" in r}


def read_mp4(path: Path) -> tuple[int, float, int]:
    """(video frames, audio seconds, audio sample rate) decoded by PyAV."""
    with av.open(str(path)) as c:
        frames = sum(1 for _ in c.decode(video=0))
    with av.open(str(path)) as c:
        rate = c.streams.audio[0].rate
        samples = sum(f.samples for f in c.decode(audio=0))
    return frames, samples / rate, rate


def test_two_ranks_zero2_train_evaluate_sync_and_write_mp4_with_sound(flash_beep, vaes, tmp_path):
    run_dir = tmp_path / "run"
    out = cli("launch/train.py", *joint_args(flash_beep, vaes, run_dir, "train.zero_stage=2", "train.steps=3",
                                             "eval.at_end=true", "eval.batches=1", "eval.samples=3"), nproc=2)
    assert "joint DiT parameters" in out.stdout + out.stderr
    assert len(losses(run_dir)) == 3
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    train_rows = [r for r in rows if "loss_video" in r]
    assert train_rows and all(r["loss_video"] > 0 and r["loss_audio"] > 0 for r in train_rows)
    (ev,) = [r for r in rows if "eval/loss" in r]
    assert ev["eval/sync_events"] + ev["eval/sync_unmatched"] >= 0 and 0.0 <= ev["eval/sync_within_40ms"] <= 1.0
    clips = sorted((run_dir / "samples" / "step_00000003").glob("*.mp4"))
    assert len(clips) == 3
    frames, seconds, rate = read_mp4(clips[0])
    assert frames == 9 and rate == 16000 and seconds >= 0.36  # AAC pads its last frame: never shorter


def test_resume_is_exact_and_samples_every_mode_through_the_cli(flash_beep, vaes, tmp_path):
    common = ["train.zero_stage=2", "train.steps=4", "ema.decay=0.9"]
    cli("launch/train.py", *joint_args(flash_beep, vaes, tmp_path / "a", *common), nproc=2)
    cli("launch/train.py", *joint_args(flash_beep, vaes, tmp_path / "b", *common, "train.stop_after=2"), nproc=2)
    cli("launch/train.py", *joint_args(flash_beep, vaes, tmp_path / "b", *common, "resume=auto"), nproc=2)
    a, b = losses(tmp_path / "a"), losses(tmp_path / "b")
    assert [a[s] for s in range(1, 5)] == [b[s] for s in range(1, 5)]

    for mode in ("joint", "video_to_audio", "audio_to_video"):
        out_dir = tmp_path / mode
        out = cli("launch/sample.py", str(tmp_path / "b"), "--steps", "2", "--seed", "1", "--out", str(out_dir),
                  f"sample.mode={mode}", "eval.samples=2", "sample.cross_cfg_scale=[1.0,2.0]")
        assert f"sync ({mode})" in out.stdout
        clips = sorted(out_dir.glob("*.mp4"))
        assert len(clips) == 2, out.stdout
        frames, seconds, _ = read_mp4(clips[1])
        assert frames == 9 and seconds >= 0.36
        if mode != "joint":  # the prompts are the held-out clips' captions
            assert "flashes" in clips[0].name


def test_vaes_that_do_not_fit_are_config_errors(flash_beep, vaes, tmp_path):
    for bad, message in ((f"audio_vae.path={vaes['video']}", "not an audio_vae"),
                         ("model.audio_channels=4", "model.audio_channels=4"),
                         ("model.audio_latent_rate=50", "model.audio_latent_rate=50"),
                         ("model.temporal_compression=4", "compresses time 1x")):
        args = [*joint_args(flash_beep, vaes, tmp_path / "bad"), "train.steps=1", bad]
        if bad.startswith("model.audio_latent_rate"):
            args.append("data.buckets=['32x32x9:2']")
        out = subprocess.run([sys.executable, "launch/train.py", *args], cwd=ROOT, env=env(), capture_output=True,
                             text=True, timeout=300)
        assert out.returncode == 2 and message in out.stderr, (bad, out.stderr[-2000:])


def test_av_sync_benchmark_compares_the_shared_band_with_its_ablation(flash_beep, vaes, tmp_path):
    for name, shared in (("shared", "true"), ("ablation", "false")):
        cli("launch/train.py", *joint_args(flash_beep, vaes, tmp_path / name, "train.steps=2", "train.global_batch=2",
                                           f"model.shared_time_rope={shared}"))
    out = cli("launch/benchmark.py", "av-sync", "--shared", str(tmp_path / "shared"), "--ablation",
              str(tmp_path / "ablation"), "--samples", "2", "--json", str(tmp_path / "sync.json"),
              "--set", "sample.cross_cfg_scale=[1.0,2.0]")
    assert "joint: ablation / shared median |offset|" in out.stdout
    assert "video_to_audio: ablation / shared median |offset|" in out.stdout
    result = json.loads((tmp_path / "sync.json").read_text())
    for mode in ("joint", "video_to_audio"):
        assert result[f"shared_{mode}"]["shared_time_rope"] and not result[f"ablation_{mode}"]["shared_time_rope"]
        assert result[f"shared_{mode}"]["clips"] == 2 and result[f"shared_{mode}"]["mode"] == mode
        assert result[f"ablation_{mode}"]["cross_cfg_scale"] == [1.0, 2.0]
    assert result["dataset"]["clips"] == 2 and result["vae_round_trip"]["clips"] == 2
    # The held-out files themselves are in sync to the sample (the generator's beeps start on their flashes).
    assert result["dataset"]["median_abs_offset_ms"] < 1.0 and result["dataset"]["within_40ms"] == 1.0
    swapped = subprocess.run([sys.executable, "launch/benchmark.py", "av-sync", "--shared", str(tmp_path / "ablation"),
                              "--ablation", str(tmp_path / "shared")], cwd=ROOT, env=env(), capture_output=True,
                             text=True, timeout=300)
    assert swapped.returncode != 0 and "shared_time_rope" in swapped.stderr


def test_bf16_lora_run_trains_only_the_adapters(flash_beep, vaes, tmp_path):
    """A bf16 joint run casts the frozen VAEs to bf16 (the audio VAE used to get fp32 mels and stop), and LoRA
    adapts both towers and the cross-modal attention by default."""
    from framework.export import safetensors_io

    run_dir = tmp_path / "lora"
    cli("launch/train.py", *joint_args(flash_beep, vaes, run_dir, "train.precision=bf16", "train.steps=2",
                                       "train.global_batch=2", "lora.rank=4", "lora.alpha=4"))
    assert len(losses(run_dir)) == 2 and all(math.isfinite(v) for v in losses(run_dir).values())
    from framework import checkpoint

    state = safetensors_io.consolidated_state_dict(checkpoint.resolve(str(run_dir), ""))
    adapters = [k for k in state if ".lora_" in k]
    assert adapters and any("audio" in k for k in adapters) and any("cross" in k for k in adapters), adapters[:10]
