"""Sample from a checkpoint: `python launch/sample.py RUN_DIR_OR_CHECKPOINT [--prompt P ...] [options] [key=value ...]`.

Loads the consolidated weights (the EMA when the run kept one, unless --no-ema) into one process and
runs the recipe's sampler: mp4 files and a PNG grid for video recipes, text for the language model.
Any config key can be overridden, e.g. `sample.sampler=heun`.
`--latents` (video_dit) writes OUT/latents.safetensors instead: the sampled latents of all prompts as one batch
(B, C, T, h, w), normalised as the DiT sees them, from noise drawn with a generator seeded by --seed itself, as
`WanPipeline(prompts, generator=torch.Generator().manual_seed(seed), output_type="latent")` returns them.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import _bootstrap  # noqa: F401
import torch

from framework import checkpoint
from framework import distributed as dist
from framework.config import ConfigError
from framework.recipe import load_run_config
from framework.trained import load_trained


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("checkpoint", help="a run dir (its newest complete checkpoint) or a checkpoint dir")
    parser.add_argument("--prompt", action="append", default=[], help="repeat for several prompts")
    parser.add_argument("--steps", type=int, help="sampling steps")
    parser.add_argument("--cfg", type=float, help="classifier-free guidance scale sample.cfg_scale (1 = off)")
    parser.add_argument("--seed", type=int)
    parser.add_argument("--size", help="HEIGHTxWIDTHxFRAMES of the videos (video recipes)")
    parser.add_argument("--out", help="output folder (default RUN/samples/sample_step_N)")
    parser.add_argument("--no-ema", action="store_true", help="use the live weights even if an EMA exists")
    parser.add_argument("--latents", action="store_true",
                        help="video_dit: write the latents (as WanPipeline's output_type='latent') to "
                             "OUT/latents.safetensors")
    parser.add_argument("overrides", nargs="*", help="key.sub=value overrides of the run's config")
    args = parser.parse_intermixed_args(argv)  # overrides may follow the options
    dist.prepare_env()
    overrides = list(args.overrides)
    for flag, key in ((args.steps, "sample.steps"), (args.cfg, "sample.cfg_scale"), (args.seed, "sample.seed")):
        if flag is not None:
            overrides.append(f"{key}={flag}")
    if args.size:
        overrides += [f"data.buckets=['{args.size}:1']", "sample.bucket=0", "train.micro_batch=1"]
    if args.prompt:
        overrides.append(f"sample.prompts={args.prompt!r}")
    try:
        check_prompts(args.checkpoint, overrides, args.prompt)
        run = load_trained(args.checkpoint, overrides, use_ema=not args.no_ema)
        helpers = run.recipe.build_helpers(run.cfg)  # frozen VAEs, text encoders: missing files are named here
    except (ConfigError, FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    cfg, recipe = run.cfg, run.recipe
    if args.latents and recipe.name != "video_dit":  # video_audio's latents are a pair, with no diffusers twin
        print(f"error: --latents writes video_dit's latents; this run's recipe is '{recipe.name}'", file=sys.stderr)
        return 2
    if args.prompt:
        cfg.eval.samples = len(args.prompt)
    device = dist.device()
    model = run.model.to(device).eval()
    helpers = {k: v.to(device).eval() for k, v in helpers.items()}
    out = args.out or str(Path(cfg.run_dir) / "samples" / f"sample_{run.checkpoint.name}")
    print(f"sampling {run.checkpoint} ({'EMA' if run.ema else 'live'} weights) -> {out}", flush=True)
    with torch.no_grad():
        if args.latents:
            lines = write_latents(cfg, recipe, model, helpers, args.prompt or cfg.sample.prompts[: cfg.eval.samples],
                                  Path(out))
        else:
            lines = recipe.sample(cfg, model, helpers, 0, 1, run.meta["step"], out)
    for line in lines:
        print(line)
    return 0


def check_prompts(path: str, overrides: list[str], prompts: list[str]) -> None:
    """The recipe's prompt checks (LLaDA: prompt + sample.gen_length within model.max_seq_len) from the run's
    config alone, before any model is built or weights read: a ConfigError names the keys and values."""
    ckpt = checkpoint.resolve(path, "")
    cfg, recipe = load_run_config(checkpoint.read_meta(ckpt)["config"], list(overrides), world=1)
    check = getattr(recipe, "check_sample_lengths", None)
    if check is not None:
        check(cfg, prompts or cfg.sample.prompts[: cfg.eval.samples])


def write_latents(cfg, recipe, model, helpers: dict, prompts: list[str], out: Path) -> list[str]:
    """One batch of prompts through the recipe's sampler, seeded by sample.seed unchanged (not per rank and
    step as evaluation is), so a diffusers pipeline given the same seed draws the same initial noise."""
    from safetensors.torch import save_file

    z = recipe.sample_latents(cfg, model, helpers, prompts, cfg.sample.seed)
    out.mkdir(parents=True, exist_ok=True)
    meta = {"prompts": json.dumps(prompts), "seed": str(cfg.sample.seed), "steps": str(cfg.sample.steps),
            "cfg_scale": str(cfg.sample.cfg_scale), "sampler": cfg.sample.sampler}
    save_file({"latents": z.float().cpu().contiguous()}, str(out / "latents.safetensors"), metadata=meta)
    return [f"{out / 'latents.safetensors'}: latents {tuple(z.shape)} of {len(prompts)} prompts, seed "
            f"{cfg.sample.seed}"]


if __name__ == "__main__":
    sys.exit(main())
