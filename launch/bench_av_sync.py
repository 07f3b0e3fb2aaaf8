"""Audio-video sync of generated samples: a joint run with the shared temporal RoPE band against its ablation.

    python launch/benchmark.py av-sync --shared RUN --ablation RUN [--samples 48] [--seed 0] [--json OUT]
        [--set sample.KEY=VALUE ...]

Both runs sample the same prompts (their sample.prompts, cycled) from the same seeds in joint mode, and
in video_to_audio mode give sound to the same held-out videos; `recipes/video_audio/sync.py` scores every
clip: median |offset| between each flash and its beep, the share
of events within 40 ms (unmatched flashes and beeps count as misses), unmatched events. For reference it
also scores the held-out clips as they are (the dataset) and after a round trip through both VAEs (the
best any model in these latent spaces can do). Prints the ablation's median |offset| over the shared one's, per mode.
"""

from __future__ import annotations

import argparse
import json
import math
import time

import torch
from tqdm import tqdm

from framework import checkpoint
from framework.export.video_io import to_uint8
from framework.trained import load_trained
from recipes.video_audio.sync import sync_report
from recipes.video_common import video_stream, video_tensor


def generated_sync(path: str, samples: int, seed: int, batch: int, mode: str,
                   overrides: list[str]) -> tuple[dict, dict]:
    """(sync report of `samples` clips the run generates in `mode`, its config summary). joint: from the
    preset's prompts, cycled; video_to_audio: sound for the first held-out clips' videos (their captions)."""
    run = load_trained(path, [*overrides, f"sample.mode={mode}"])
    cfg, recipe = run.cfg, run.recipe
    model = run.model.eval()
    helpers = {k: v.eval() for k, v in recipe.build_helpers(cfg).items()}
    if mode == "joint":
        prompts, given = [cfg.sample.prompts[i % len(cfg.sample.prompts)] for i in range(samples)], None
    else:
        prompts, given = recipe.given_latents(cfg, helpers, samples)
    clips = []
    with torch.no_grad():
        for lo in tqdm(range(0, len(prompts), batch), desc=f"{path} {mode}", unit="batch"):
            part = None if given is None else {k: v[lo:lo + batch] for k, v in given.items()}
            videos, waves = recipe.generate(cfg, model, helpers, prompts[lo:lo + batch], seed + lo, part)
            clips += [(to_uint8(v), w.numpy()) for v, w in zip(videos, waves)]
    s = cfg.sample
    info = {"run": path, "step": run.meta["step"], "ema": run.ema, "shared_time_rope": cfg.model.shared_time_rope,
            "mode": mode, "sample_steps": s.steps, "cfg_scale": s.cfg_scale, "audio_cfg_scale": s.audio_cfg_scale,
            "cross_cfg_scale": s.cross_cfg_scale}
    return sync_report(clips, cfg.data.fps, cfg.data.audio_rate), info


def reference_sync(path: str, samples: int) -> tuple[dict, dict]:
    """Sync of held-out clips as decoded, and after encoding and decoding them with the run's two VAEs."""
    run = load_trained(path)
    cfg, recipe = run.cfg, run.recipe
    helpers = recipe.build_helpers(cfg)
    stats = recipe.latent_stats(cfg, helpers)
    raw, round_trip = [], []
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for batch in video_stream(cfg.data, "val", 0, 1, cfg.train.seed, num_workers=0):
            video = video_tensor(batch)
            raw += [(to_uint8(v), a.mean(0).numpy()) for v, a in zip(video, batch["audio"])]
            zv, za, _ = recipe.latents(cfg, helpers, batch)
            frames = helpers["vae"].decode(zv / stats["video"][1] + stats["video"][0]).float().clamp(-1, 1)
            waves = helpers["audio_vae"].decode(za / stats["audio"][1] + stats["audio"][0], gen=gen)
            round_trip += [(to_uint8(v), w.numpy()) for v, w in zip(frames, waves)]
            if len(raw) >= samples:
                break
    fps, rate = cfg.data.fps, cfg.data.audio_rate
    return sync_report(raw[:samples], fps, rate), sync_report(round_trip[:samples], fps, rate)


def describe(name: str, r: dict) -> str:
    return (f"{name:<24} median |offset| {r['median_abs_offset_ms']:6.1f} ms (signed {r['median_offset_ms']:+6.1f}), "
            f"within 40 ms {r['within_40ms']:.2f}, matched {r['events']}, unmatched {r['unmatched']}, "
            f"clips {r['clips']}")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--shared", required=True, help="joint run (dir or checkpoint) with model.shared_time_rope=true")
    p.add_argument("--ablation", required=True, help="the same preset trained with model.shared_time_rope=false")
    p.add_argument("--samples", type=int, default=48)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--modes", default="joint,video_to_audio",
                   help="comma-separated: joint (text -> both), video_to_audio (held-out videos -> sound)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="sampling override for both runs, e.g. sample.cross_cfg_scale=[1.0,2.0] (repeatable)")
    p.add_argument("--json", help="also write the results here")


def main(args: argparse.Namespace) -> None:
    torch.set_grad_enabled(False)
    for path, want in ((args.shared, True), (args.ablation, False)):
        meta = checkpoint.read_meta(checkpoint.resolve(path, ""))
        if meta["config"]["model"].get("shared_time_rope", True) != want:
            raise SystemExit(f"error: {path} has model.shared_time_rope={not want}: --shared needs a run with the "
                             f"shared time band and --ablation one without")
    start = time.time()
    results = {}
    results["dataset"], results["vae_round_trip"] = reference_sync(args.shared, args.samples)
    for mode in args.modes.split(","):
        for name, path in (("shared", args.shared), ("ablation", args.ablation)):
            report, info = generated_sync(path, args.samples, args.seed, args.batch, mode, args.set)
            results[f"{name}_{mode}"] = {**report, **info}
    print(f"av-sync: {args.samples} samples per run and mode, seeds from {args.seed}, {time.time() - start:.0f} s")
    for name, r in results.items():
        print(describe(name, r))
    for mode in args.modes.split(","):
        a, s = (results[f"{n}_{mode}"]["median_abs_offset_ms"] for n in ("ablation", "shared"))
        ratio = a / s if s > 0 and not math.isnan(a) else float("nan")
        results[f"ratio_{mode}"] = ratio
        print(f"{mode}: ablation / shared median |offset| {ratio:.2f}x; target: shared <= 40 ms "
              f"({'met' if s <= 40 else 'NOT met'})")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)
