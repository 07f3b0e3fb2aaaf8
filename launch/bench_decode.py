"""Decoding speed and exact-match accuracy of a masked diffusion LM's decoders and its AR twin, one run.

    python launch/benchmark.py decode --masked runs/tasks_tiny --ar runs/tasks_tiny_ar [--prompts 200]
    python launch/benchmark.py decode --random-shape recipes/llada/configs/1b.yaml --device cuda
    python launch/benchmark.py decode --block-diffusion runs/tasks_tiny_bd --ar runs/tasks_tiny_ar

Speed-ups are over the reference decoder, or without --masked over the AR twin.

Decoders (generation length 256 by default, blocks of 32):
  reference        LLaDA's sampler, one token per step (steps = gen_length), low-confidence remasking
  threshold        commit every masked token of the block with confidence >= tau (at least one)
  threshold+prefix the same with Fast-dLLM's prefix KV cache, refreshed at each block boundary (and every
                   --refresh-every steps inside a block)
  threshold+dual   the same with the prefix and suffix cached (Fast-dLLM's dual cache)
  ar               the autoregressive twin, greedy with a KV cache
  block_diffusion  a block-diffusion model (--block-diffusion RUN, objective.name=block_diffusion) of the same
                   shape: exact KV cache of committed blocks, threshold commits inside the current block
                   (framework/diffusion/block_decode.py; --block-steps forwards per block at most)
Speed is counted honestly: tokens generated up to and including each row's first EOS (prompt
excluded) over the wall time of the whole decoding call. Every batch of prompts runs through every
decoder before the next batch, so machine drift hits all of them alike.

`tok/fwd` is tokens over forwards; a forward runs the whole working batch, so per row it is this over the
rows still decoding (--batch-size at most). `ms/fwd` is the decoder's wall time over its forwards (the model and
our bookkeeping): with tok/fwd it says whether a decoder wins by committing more per forward or by cheaper ones.

--random-shape builds a model of a preset's shape with random weights (no checkpoint): only speed
means anything then, and a random model is rarely confident, so the threshold decoder commits about one
token per step and the ratios measure the KV cache alone.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from framework import checkpoint
from framework.data.sft import exact_match, left_pad_prompts
from framework.diffusion.block_decode import BlockDecodeConfig, block_decode
from framework.diffusion.masked_decode import DecodeConfig, decode, decode_autoregressive, generated_lengths
from framework.export import safetensors_io
from framework.nn.llada import LladaModel
from framework.recipe import load_run_config
from recipes.llada.decoding import detokenize


def load_trained(path: str, device: torch.device) -> tuple[LladaModel, object]:
    """The model of a run dir or checkpoint dir (consolidated from its ZeRO shards) and its run config."""
    try:
        ckpt = checkpoint.resolve(path, "")
    except FileNotFoundError as e:
        raise SystemExit(f"decode: {e}") from None
    meta = checkpoint.read_meta(ckpt)
    cfg, _ = load_run_config(meta["config"], [], world=meta["world_size"])
    model = LladaModel(cfg.model)
    model.load_state_dict(safetensors_io.consolidated_state_dict(ckpt))
    return model.to(device).eval(), cfg


def random_model(preset: str, device: torch.device, dtype: torch.dtype) -> tuple[LladaModel, object]:
    cfg, _ = load_run_config(preset, [], world=1)
    with torch.device(device):
        model = LladaModel(cfg.model)
    return model.to(dtype).eval(), cfg


def task_prompts(data_dir: str, count: int) -> tuple[list[str], list[str]]:
    rows = [json.loads(line) for line in (Path(data_dir) / "val.jsonl").read_text().splitlines() if line.strip()]
    if len(rows) < count:
        raise SystemExit(f"{data_dir}/val.jsonl has {len(rows)} tasks, fewer than --prompts {count}")
    return [r["prompt"] for r in rows[:count]], [r["response"] for r in rows[:count]]


def run_decoding(cfg) -> dict:
    """How the masked run's own decoders read its logits: objective.shift (a Dream-style model adapted from an AR
    one predicts token i + 1 at position i) and sample.confidence (resolved from "auto" when the run loaded)."""
    if cfg is None:  # --random-shape
        return {}
    out = {"shift": bool(getattr(cfg.objective, "shift", False))}
    if cfg.sample.confidence != "auto":
        out["confidence"] = cfg.sample.confidence
    return out


def variants(args: argparse.Namespace, masked_cfg=None) -> dict[str, DecodeConfig | BlockDecodeConfig | None]:
    """The decoders to run. masked_cfg: the masked run's config, whose logit alignment every masked decoder uses
    (without it a shifted run would be decoded one column off: wrong tokens, silently)."""
    common = dict(gen_length=args.gen_length, block_length=args.block_length, **run_decoding(masked_cfg))
    out: dict[str, DecodeConfig | BlockDecodeConfig | None] = {} if not (args.masked or args.random_shape) else {
        "reference": DecodeConfig(**common, steps=args.gen_length),
        "threshold": DecodeConfig(**common, threshold=args.threshold),
        "threshold+prefix": DecodeConfig(**common, threshold=args.threshold, cache="prefix",
                                         refresh_every=args.refresh_every),
        "threshold+dual": DecodeConfig(**common, threshold=args.threshold, cache="dual",
                                       refresh_every=args.refresh_every),
    }
    if args.ar or args.random_shape:
        out["ar"] = None
    if args.block_diffusion or args.random_shape:
        out["block_diffusion"] = BlockDecodeConfig(gen_length=args.gen_length, block_size=args.block_size,
                                                   steps=args.block_steps or args.block_size, threshold=args.threshold)
    return out


def decode_with(dcfg, models: dict, ids, mask, *, gen_length: int, mask_id: int, eos_id: int):
    """One batch through one decoder: None is the AR twin, a BlockDecodeConfig the block-diffusion model, a
    DecodeConfig the masked model."""
    if dcfg is None:
        return decode_autoregressive(models["ar"], ids, mask, gen_length, eos_id=eos_id)
    if isinstance(dcfg, BlockDecodeConfig):
        return block_decode(models["block_diffusion"], ids, mask, dcfg, mask_id=mask_id, eos_id=eos_id)
    return decode(models["masked"], ids, mask, dcfg, mask_id=mask_id, eos_id=eos_id)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def run(args: argparse.Namespace) -> dict:
    device = torch.device(args.device)
    dtype = torch.bfloat16 if args.bf16 else torch.float32
    if args.random_shape:
        masked, cfg = random_model(args.random_shape, device, dtype)
        causal_cfg = type(cfg.model)(**{**cfg.model.__dict__, "causal": True})
        with torch.device(device):
            ar_model = LladaModel(causal_cfg).to(dtype).eval()
        g = torch.Generator().manual_seed(0)
        prompts_ids = [torch.randint(5, cfg.model.vocab_size, (int(n),), generator=g).tolist()
                       for n in torch.randint(8, 24, (args.prompts,), generator=g)]
        references, eos_id, pad_id, sp = None, 2, 0, None
        with torch.device(device):  # the same shape, block-causal at decoding (random weights: speed only)
            bd_model = LladaModel(cfg.model).to(dtype).eval()
    else:
        import sentencepiece as spm

        masked, cfg = load_trained(args.masked, device) if args.masked else (None, None)
        ar_model = load_trained(args.ar, device)[0] if args.ar else None
        bd_model = None
        if args.block_diffusion:
            bd_model, bd_cfg = load_trained(args.block_diffusion, device)
            if bd_cfg.objective.name != "block_diffusion":
                raise SystemExit(f"--block-diffusion {args.block_diffusion}: objective.name is "
                                 f"{bd_cfg.objective.name}, not block_diffusion")
            args.block_size = bd_cfg.objective.block_size
            cfg = cfg or bd_cfg  # without --masked: the block-diffusion run's data and mask id
        data_dir = args.data or cfg.data.dir
        sp = spm.SentencePieceProcessor(model_file=str(Path(data_dir) / "tokenizer.model"))
        prompts, references = task_prompts(data_dir, args.prompts)
        prompts_ids, eos_id, pad_id = [sp.encode(p) for p in prompts], sp.eos_id(), max(sp.pad_id(), 0)
    mask_id = cfg.model.mask_id
    models = {"masked": masked, "ar": ar_model, "block_diffusion": bd_model}
    names = variants(args, cfg if args.masked else None)
    stats = {name: {"seconds": 0.0, "tokens": 0, "correct": 0, "forwards": 0} for name in names}
    for lo in range(0, len(prompts_ids), args.batch_size):
        ids, mask = left_pad_prompts(prompts_ids[lo:lo + args.batch_size], pad_id)
        ids, mask = ids.to(device), mask.to(device)
        for name, dcfg in names.items():
            _sync(device)
            start = time.perf_counter()
            out = decode_with(dcfg, models, ids, mask, gen_length=args.gen_length, mask_id=mask_id, eos_id=eos_id)
            _sync(device)
            s = stats[name]
            s["seconds"] += time.perf_counter() - start
            s["tokens"] += int(generated_lengths(out.tokens, eos_id).sum())
            s["forwards"] += out.forwards
            if references is not None:
                for row, ref in zip(out.tokens.tolist(), references[lo:lo + args.batch_size]):
                    answer = row[: row.index(eos_id)] if eos_id in row else row
                    s["correct"] += exact_match(detokenize(sp, answer), ref)
    ref = "reference" if "reference" in stats else "ar" if "ar" in stats else next(iter(stats))  # speed-up base
    base = stats[ref]["tokens"] / stats[ref]["seconds"]
    report = {}
    for name, s in stats.items():
        rate = s["tokens"] / s["seconds"]
        report[name] = {"tokens_per_s": rate, "speedup_vs_reference": rate / base, "seconds": s["seconds"],
                        "tokens": s["tokens"], "forwards": s["forwards"],
                        "tokens_per_forward": s["tokens"] / max(s["forwards"], 1),
                        "ms_per_forward": 1000 * s["seconds"] / max(s["forwards"], 1),
                        "exact_match": s["correct"] / len(prompts_ids) if references is not None else None}
    return report


def print_report(report: dict, args: argparse.Namespace) -> None:
    print(f"decode benchmark: {args.prompts} prompts, gen_length {args.gen_length}, block {args.block_length}, "
          f"threshold {args.threshold}, cache refresh every {args.refresh_every or 'block'} steps, "
          f"batch {args.batch_size}, device {args.device}")
    if "block_diffusion" in report:
        print(f"block diffusion: blocks of {args.block_size}, at most {args.block_steps or args.block_size} forwards "
              "each, the same threshold")
    print(f"{'decoder':<18}{'tokens/s':>10}{'speed-up':>10}{'exact match':>13}{'forwards':>10}{'tokens':>8}"
          f"{'tok/fwd':>9}{'ms/fwd':>9}")
    for name, r in report.items():
        acc = "-" if r["exact_match"] is None else f"{100 * r['exact_match']:.1f}%"
        print(f"{name:<18}{r['tokens_per_s']:>10.1f}{r['speedup_vs_reference']:>9.2f}x{acc:>13}"
              f"{r['forwards']:>10}{r['tokens']:>8}{r['tokens_per_forward']:>9.2f}{r['ms_per_forward']:>9.2f}")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--masked", help="run dir or checkpoint of the masked diffusion model")
    p.add_argument("--ar", help="run dir or checkpoint of its autoregressive twin")
    p.add_argument("--block-diffusion", help="run dir or checkpoint of a block-diffusion model of the same shape")
    p.add_argument("--block-size", type=int, default=32,
                   help="random-shape block-diffusion block size (a trained run's is its objective.block_size)")
    p.add_argument("--block-steps", type=int, default=0,
                   help="block diffusion: at most this many forwards per block (0: the block size, so the threshold "
                        "rule commits at least one token a forward)")
    p.add_argument("--random-shape", help="preset whose shape to build with random weights (speed only)")
    p.add_argument("--data", help="task data dir (default: the masked run's data.dir)")
    p.add_argument("--prompts", type=int, default=200)
    p.add_argument("--gen-length", type=int, default=256)
    p.add_argument("--block-length", type=int, default=32)
    p.add_argument("--threshold", type=float, default=0.9)
    p.add_argument("--refresh-every", type=int, default=0,
                   help="cached decoders also refresh the cache every this many steps inside a block (0: never)")
    p.add_argument("--batch-size", type=int, default=50)
    p.add_argument("--device", default="cpu")
    p.add_argument("--bf16", action="store_true", help="random-shape models in bf16 (GPU)")
    p.add_argument("--out", help="also write the report as JSON here")


def main(args: argparse.Namespace) -> None:
    if not (args.masked or args.block_diffusion or args.random_shape):
        raise SystemExit("decode: give --masked RUN (and --ar RUN, --block-diffusion RUN), --block-diffusion RUN "
                         "or --random-shape PRESET")
    report = run(args)
    print_report(report, args)
    if args.out:
        Path(args.out).write_text(json.dumps(report, indent=2) + "\n")
