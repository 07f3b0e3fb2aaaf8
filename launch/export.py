"""Export a checkpoint: `python launch/export.py CHECKPOINT --format safetensors|hf --out DIR [--ema]`.

CHECKPOINT is a checkpoint dir (`RUN/checkpoints/step_...`) or a run dir (its newest complete one).
ZeRO shards of any stage are consolidated into one fp32 state dict; the model config and the
tokenizer are written beside the weights. `--format hf` (LLaDA) writes a folder that
`transformers.AutoModelForMaskedLM` / `AutoModelForCausalLM` / `AutoTokenizer.from_pretrained` load after
`import framework`.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import _bootstrap  # noqa: F401

from framework import checkpoint
from framework.config import ConfigError
from framework.export import safetensors_io
from framework.recipe import load_run_config


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("checkpoint")
    parser.add_argument("--format", default="safetensors", help="safetensors (any recipe) or a recipe's own: hf (llada)")
    parser.add_argument("--out", required=True)
    parser.add_argument("--ema", action="store_true", help="export the EMA weights instead of the live ones")
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
