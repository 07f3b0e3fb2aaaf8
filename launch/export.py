"""Export a checkpoint: `python launch/export.py CHECKPOINT --format safetensors|hf|llada --out DIR [--ema]`.

CHECKPOINT is a checkpoint dir (`RUN/checkpoints/step_...`) or a run dir (its newest complete one).
ZeRO shards of any stage are consolidated into one fp32 state dict; the model config and the
tokenizer are written beside the weights. `--format hf` (LLaDA) writes a folder that
`transformers.AutoModelForMaskedLM` / `AutoModelForCausalLM` / `AutoTokenizer.from_pretrained` load after
`import framework`. `--format llada` (LLaDA) writes LLaDA's released layout; `--dtype bf16|fp32`.
A LoRA run (`lora.rank > 0`): `--format peft` writes the adapters alone in peft's layout (for the `--format hf`
model), `--merge` folds them into the weights of any format; otherwise the frozen base weights are written.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import _bootstrap  # noqa: F401
import torch

from framework import checkpoint, lora
from framework.config import ConfigError
from framework.export import safetensors_io
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
    if args.format != "peft":
        print(f"note: a LoRA run: writing the frozen base weights without the adapters ({len(adapters)} layers); "
              "--format peft writes the adapters, --merge folds them in", flush=True)
    return base, adapters


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("checkpoint")
    parser.add_argument("--format", default="safetensors",
                        help="safetensors (any recipe), peft (a LoRA run's adapters) or a recipe's own: hf, llada "
                             "(llada), diffusers (video_dit, model.arch=wan)")
    parser.add_argument("--out", required=True)
    parser.add_argument("--ema", action="store_true", help="export the EMA weights instead of the live ones")
    parser.add_argument("--dtype", choices=("fp32", "bf16"), default="fp32",
                        help="weights' dtype (safetensors, llada, peft; hf is always fp32)")
    parser.add_argument("--merge", action="store_true",
                        help="LoRA run: write W + (alpha/rank) B A instead of the frozen base weights")
    args = parser.parse_args(argv)
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
            print(f"wrote peft adapter to {args.out}: {', '.join(Path(p).name for p in paths)} ({len(adapters)} "
                  f"LoRA layers; load it onto this run's --format hf export)")
            return 0
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
            paths = recipe.export(state, cfg, args.format, args.out, source)
            print(f"wrote {args.format} export to {args.out}: {', '.join(Path(p).name for p in paths)}")
    except (ConfigError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
