"""Export a checkpoint: `python launch/export.py CHECKPOINT --format safetensors|hf|llada --out DIR [--ema]`.

CHECKPOINT is a checkpoint dir (`RUN/checkpoints/step_...`) or a run dir (its newest complete one).
ZeRO shards of any stage are consolidated into one fp32 state dict; the model config and the
tokenizer are written beside the weights. `--format hf` (LLaDA) writes a folder that
`transformers.AutoModelForMaskedLM` / `AutoModelForCausalLM` / `AutoTokenizer.from_pretrained` load after
`import framework`. `--format llada` (LLaDA) writes LLaDA's released layout; `--dtype bf16|fp32`.
A LoRA run (`lora.rank > 0`): `--format peft` writes the adapters alone in peft's layout (for the `--format hf`
model; other recipes: for our own module, the `--format safetensors` keys), `--merge` folds them into the weights
of any format; `--format diffusers` (Wan) writes the base transformer folder plus `pytorch_lora_weights.safetensors`
in diffusers' Wan LoRA layout; otherwise the frozen base weights are written.
`--format diffusers --pipeline` (Wan, a run with train.init_from = a diffusers pipeline folder) writes a whole
pipeline folder that `WanPipeline.from_pretrained` loads: our transformer/ (the base for LoRA, with
`pytorch_lora_weights.safetensors` at the top for `load_lora_weights`), the source folder's vae/, text_encoder/,
tokenizer/ and model_index.json copied, and its scheduler/ at the run's flow shift.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import _bootstrap  # noqa: F401
import torch

from framework import checkpoint, lora
from framework.config import ConfigError
from framework.export import diffusers_pipeline, diffusers_wan, safetensors_io
from framework.recipe import load_run_config


def _lora_split(state: dict, cfg, args) -> tuple[dict, dict]:
    """(weights under the model's own keys, adapters): the base, or with --merge the merged weights."""
    if cfg.lora.rank == 0:
        if args.format == "peft" or args.merge:
            raise ConfigError(f"{'--format peft' if args.format == 'peft' else '--merge'}: the run has no LoRA "
                              "adapters (lora.rank is 0)")
        return state, {}
    base, adapters = lora.split_state(state)
    if args.merge:
        if args.format == "peft":
            raise ConfigError("--merge writes full weights; --format peft writes the adapters alone: choose one")
        return lora.merge(base, adapters, cfg.lora), adapters
    if args.format not in ("peft", "diffusers"):
        print(f"note: a LoRA run: writing the frozen base weights without the adapters ({len(adapters)} layers); "
              "--format peft writes the adapters, --merge folds them in", flush=True)
    return base, adapters


def _wan_lora(adapters: dict, cfg) -> dict:
    """The adapters in diffusers' Wan LoRA layout (alpha / rank folded into B), beside the base transformer."""
    return diffusers_wan.lora_to_diffusers(adapters, cfg.lora.alpha / cfg.lora.rank, prefix="dit.")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("checkpoint")
    parser.add_argument("--format", default="safetensors",
                        help="safetensors (any recipe), peft (a LoRA run's adapters) or a recipe's own: hf, llada "
                             "(llada), diffusers (video_dit, model.arch=wan)")
    parser.add_argument("--out", required=True)
    parser.add_argument("--ema", action="store_true", help="export the EMA weights instead of the live ones")
    parser.add_argument("--dtype", choices=("fp32", "bf16"), default="fp32",
                        help="weights' dtype (safetensors, llada, peft, diffusers; hf is always fp32)")
    parser.add_argument("--merge", action="store_true",
                        help="LoRA run: write W + (alpha/rank) B A instead of the frozen base weights")
    parser.add_argument("--pipeline", action="store_true",
                        help="with --format diffusers (implied): a whole diffusers pipeline folder, the frozen parts "
                             "copied from the pipeline folder the run was initialised from")
    args = parser.parse_args(argv)
    if args.pipeline and args.format not in ("safetensors", "diffusers"):  # safetensors: the default, not chosen
        print(f"error: --pipeline writes a diffusers pipeline folder; it goes with --format diffusers, not "
              f"--format {args.format}", file=sys.stderr)
        return 2
    args.format = "diffusers" if args.pipeline else args.format
    try:
        ckpt = checkpoint.resolve(args.checkpoint, "")
    except FileNotFoundError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    meta = checkpoint.read_meta(ckpt)
    cfg, recipe = load_run_config(meta["config"], [], world=meta["world_size"])
    try:
        state = safetensors_io.consolidated_state_dict(ckpt, use_ema=args.ema)
        if args.ema and cfg.lora.rank > 0:  # the EMA averages trainable weights only: the adapters of a LoRA run
            state = {**safetensors_io.consolidated_state_dict(ckpt), **state}
        state, adapters = _lora_split(state, cfg, args)
        if args.format == "peft":
            dtype = torch.bfloat16 if args.dtype == "bf16" else torch.float32
            paths = lora.write_peft(adapters, cfg.lora, meta["recipe"], args.out, dtype)
            onto = "this run's --format hf export" if meta["recipe"] in lora.HF_PREFIX else \
                f"recipe {meta['recipe']}'s model (keys of its --format safetensors export)"
            print(f"wrote peft adapter to {args.out}: {', '.join(Path(p).name for p in paths)} ({len(adapters)} "
                  f"LoRA layers; load it onto {onto})")
            return 0
        # Converted (and checked) before anything is written: a layout that cannot hold them fails cleanly.
        wan_lora = (_wan_lora(adapters, cfg) if args.format == "diffusers" and adapters and not args.merge
                    and getattr(cfg.model, "arch", "") == "wan" else None)
        if args.dtype == "bf16":  # round-to-nearest from the fp32 master weights
            state = {k: v.to(torch.bfloat16) for k, v in state.items()}
        if args.format == "safetensors":
            config = {"recipe": meta["recipe"], "step": meta["step"], "ema": args.ema,
                      **{k: meta["config"][k] for k in recipe.export_sections if k in meta["config"]}}
            path = safetensors_io.write(state, config, args.out)
            assets = recipe.export_assets(cfg, args.out)
            print(f"wrote {path} ({len(state)} tensors, {sum(t.numel() for t in state.values()) / 1e6:.2f}M "
                  f"parameters)" + (f" and {', '.join(assets)}" if assets else ""))
        else:
            source = {"recipe": meta["recipe"], "step": meta["step"], "ema": args.ema}
            pipeline = diffusers_pipeline.export_source(cfg.train.init_from) if args.pipeline else None
            target = str(Path(args.out) / diffusers_pipeline.TRANSFORMER) if pipeline else args.out
            paths = recipe.export(state, cfg, args.format, target, source)
            if pipeline is not None:  # after the transformer: a run the recipe cannot export writes nothing
                paths = [target] + diffusers_pipeline.copy_frozen_parts(pipeline, args.out, cfg.diffusion.shift,
                                                              cfg.diffusion.num_train_timesteps)
            if wan_lora is not None:
                dtype = torch.bfloat16 if args.dtype == "bf16" else torch.float32
                paths.append(diffusers_wan.save_lora(wan_lora, args.out, dtype))
            print(f"wrote {args.format} export to {args.out}: {', '.join(Path(p).name for p in paths)}")
    except (ConfigError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
