"""Prompt adherence and sampling speed of a teacher and its few-step students, on the same prompts and seeds.

    python -m recipes.video_distill.measure --teacher runs/dit_tiny --student runs/dit_tiny_distill4 \
        [--student RUN ...] [--seeds 4] [--out FILE.json]

Every model samples the 12 shapes prompts once per seed (seeds 0..S-1: 48 videos for S = 4) from the same
initial noise (sample_latents seeds its generator with the seed alone, and all share one latent shape): the
teacher with its own sample.steps / sample.cfg_scale (30 Euler steps, CFG 4 in the tiny preset), each student
with its own (its distill.student_steps, CFG 1). Reports the analytic adherence and the wall time of the DiT
sampling alone and with the VAE decode, and each student's speed-up over the teacher, in one process.
"""

from __future__ import annotations

import argparse
import json
import sys
import time

import torch

from framework.trained import load_trained
from recipes.video_dit.adherence import adherence
from recipes.video_dit.recipe import SHAPES_PROMPTS


def sample_timed(run, helpers: dict, prompts: list[str], seeds: list[int]) -> dict:
    """Videos of every (seed, prompt), the adherence dict, and seconds spent in the DiT and in total."""
    from framework.export.video_io import to_uint8

    cfg, recipe, model = run.cfg, run.recipe, run.model
    videos, dit_s, total_s = [], 0.0, 0.0
    vae = helpers["vae"]
    shift, scale = recipe.latent_stats(cfg, helpers)  # computed once, outside the timings
    for seed in seeds:
        start = time.perf_counter()
        z = recipe.sample_latents(cfg, model, helpers, prompts, seed)
        dit_s += time.perf_counter() - start
        z = (z / scale + shift).to(next(vae.parameters()).dtype)
        video = vae.decode(z, chunked=z.shape[2] > 9).float().clamp(-1, 1)
        total_s += time.perf_counter() - start
        videos += [to_uint8(v) for v in video]
    scores = adherence(videos, prompts * len(seeds))
    return {"steps": cfg.sample.steps, "cfg_scale": cfg.sample.cfg_scale, "videos": len(videos),
            **{k: round(v, 4) for k, v in scores.items()}, "dit_s": round(dit_s, 3), "total_s": round(total_s, 3)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--teacher", required=True, help="the video_dit run the students were distilled from")
    parser.add_argument("--student", action="append", default=[], help="a video_distill run (repeatable)")
    parser.add_argument("--seeds", type=int, default=4)
    parser.add_argument("--out", help="also write the rows as JSON here")
    args = parser.parse_args(argv)
    torch.set_grad_enabled(False)
    seeds, rows = list(range(args.seeds)), []
    teacher_row = None
    for path in [args.teacher, *args.student]:
        run = load_trained(path)
        run.model.eval()
        helpers = {k: v.eval() for k, v in run.recipe.build_helpers(run.cfg).items()}
        row = {"run": path, "recipe": run.recipe.name, "ema": run.ema, "step": run.meta["step"],
               **sample_timed(run, helpers, list(SHAPES_PROMPTS), seeds)}
        if teacher_row is None:
            teacher_row = row
        else:
            row["speedup_dit"] = round(teacher_row["dit_s"] / row["dit_s"], 2)
            row["speedup_total"] = round(teacher_row["total_s"] / row["total_s"], 2)
            row["all_gap"] = round(teacher_row["all"] - row["all"], 4)
        rows.append(row)
        print(json.dumps(row), flush=True)
    if args.out:
        with open(args.out, "w") as f:
            json.dump(rows, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
