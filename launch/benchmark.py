"""Benchmarks that print a ratio against a baseline measured side by side in the same run.

    python launch/benchmark.py trainer-overhead [--preset P] [--nproc N] [--steps S] [--repeats R] [key=value ...]

    python launch/benchmark.py video-loader --data DIR [--workers N] [--batches B] [--uint8]
    python launch/benchmark.py video-loader --generate 64x64 256x256 480x832 [--clips N] [--out DIR] [--uint8]
    python launch/benchmark.py latent-cache --latents DIR [--steps S] [--repeats R] [key=value ...]
    python launch/benchmark.py decode --masked RUN --ar RUN [--prompts N] [--gen-length 256] [--threshold T]
    python launch/benchmark.py av-sync --shared RUN --ablation RUN [--samples N]
    python launch/benchmark.py adapt --ar-steps S --adapt-steps S2 [--anneal-steps A] [--work DIR] [key=value ...]

trainer-overhead: seconds per optimizer step of our trainer (launch/train.py: LR schedule, per-step
generators, metric all-reduce, EMA, JSONL, progress bar) divided by a bare DeepSpeed loop over the same
model, data stream, loss, DeepSpeed config and process count. Runs alternate (ours, bare, ours, bare, ...)
so drift on a shared machine hits both sides alike. Target: <= 1.05.

video-loader: frames/s delivered by the video loader vs raw decord decoding of the same clips with the
same worker count (launch/bench_video_loader.py), on a data set or on generated H.264 clips of each size
given (one ratio row per size). Target: >= 0.9.

latent-cache: seconds per step of the tiny video DiT trained from the latent cache vs encoding every batch
with the VAE online, both through launch/train.py, alternating.

decode: tokens/s and exact-match accuracy of the LLaDA reference decoder (one token per step), threshold
decoding, threshold + KV cache, and the AR twin, on the same task prompts (launch/bench_decode.py).
Target: threshold + cache >= 5x the reference at <= 1 point accuracy loss.

av-sync: audio-video sync of joint video + audio samples, the shared temporal RoPE band against the run
trained without it, beside the dataset and a VAE round trip (launch/bench_av_sync.py). Target: median
|offset| <= 40 ms with the band, clearly worse without.

adapt: the AR twin trained S steps then adapted to masked diffusion for S2 steps (shift, annealing) against
a masked model trained from scratch for S + S2 steps: exact match and ELBO (launch/bench_adapt.py).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import _bootstrap  # noqa: F401

ROOT = Path(__file__).resolve().parent.parent
QUIET = ["log.wandb=disabled", "log.every=1", "eval.every=0", "eval.at_end=false", "checkpoint.every=0",
         "checkpoint.at_end=false"]


def _launch(nproc: int, script: list[str]) -> list[str]:
    if nproc == 1:
        return [sys.executable, *script]
    from framework.distributed import free_port

    return [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc), "--master_port",
            str(free_port()), *script]


def _run(cmd: list[str]) -> None:
    out = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, env=dict(os.environ, PYTHONUNBUFFERED="1"))
    if out.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{out.stderr[-4000:]}")


def ours(preset: str, overrides: list[str], steps: int, warmup: int, nproc: int, workdir: Path) -> float:
    """Seconds per step of launch/train.py, from the timestamps of its metrics.jsonl rows (all overheads in)."""
    run = workdir / f"ours-{time.time_ns()}"
    _run(_launch(nproc, ["launch/train.py", preset, *overrides, *QUIET, f"train.steps={steps}", f"run_dir={run}"]))
    times = {row["step"]: row["time"] for row in map(json.loads, (run / "metrics.jsonl").read_text().splitlines())}
    return (times[steps] - times[warmup]) / (steps - warmup)


def bare(preset: str, overrides: list[str], steps: int, warmup: int, nproc: int, workdir: Path) -> float:
    out = workdir / f"bare-{time.time_ns()}.json"
    _run(_launch(nproc, ["launch/benchmark.py", "_bare-loop", "--preset", preset, "--steps", str(steps),
                         "--warmup", str(warmup), "--out", str(out), *overrides, *QUIET]))
    return json.loads(out.read_text())["seconds_per_step"]


def bare_loop(preset: str, overrides: list[str], steps: int, warmup: int, out: str) -> None:
    """The baseline: the same engine, data and loss with nothing of our trainer around them."""
    import torch

    from framework import distributed as dist
    from framework import engine as engine_lib
    from framework.recipe import load_run_config
    from framework.rng import seed_everything

    dist.prepare_env()
    dist.init()
    cfg, recipe = load_run_config(preset, overrides, dist.world())
    accum = cfg.grad_accum(dist.world())
    data = iter(recipe.build_data(cfg, "train", dist.rank(), dist.world(), batch_multiple=accum))
    seed_everything(cfg.train.seed)
    ds_config = engine_lib.deepspeed_config(cfg, dist.world())
    with engine_lib.model_init_context(ds_config):
        model = recipe.build_model(cfg).model
    engine = engine_lib.initialize(model, cfg, ds_config)
    gen = torch.Generator(device=dist.device()).manual_seed(cfg.train.seed)
    start = 0.0
    for step in range(steps):
        if step == warmup:
            torch.distributed.barrier()
            start = time.perf_counter()
        for _ in range(accum):
            batch = {k: v.to(dist.device()) for k, v in next(data).items()}
            loss, _ = recipe.loss(cfg, engine, {}, batch, gen)
            engine.backward(loss)
            engine.step()
        loss.item()  # the trainer also syncs once per step (to log); keep the comparison fair
    torch.distributed.barrier()
    if dist.is_main():
        Path(out).write_text(json.dumps({"seconds_per_step": (time.perf_counter() - start) / (steps - warmup)}))


def trainer_overhead(args: argparse.Namespace) -> None:
    ratios = []
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(args.repeats):
            a = ours(args.preset, args.overrides, args.steps, args.warmup, args.nproc, Path(tmp))
            b = bare(args.preset, args.overrides, args.steps, args.warmup, args.nproc, Path(tmp))
            ratios.append(a / b)
            print(f"repeat {r + 1}: ours {a * 1e3:.1f} ms/step, bare DeepSpeed {b * 1e3:.1f} ms/step, "
                  f"ratio {a / b:.3f}", flush=True)
    print(f"trainer-overhead: median ratio {statistics.median(ratios):.3f} over {args.repeats} pairs "
          f"(target <= 1.05; preset {args.preset}, {args.nproc} process(es), {args.steps - args.warmup} timed steps)")


def latent_cache(args: argparse.Namespace) -> None:
    preset = "recipes/video_dit/configs/tiny.yaml"
    ratios = []
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(args.repeats):
            online = ours(preset, args.overrides, args.steps, args.warmup, args.nproc, Path(tmp))
            cached = ours(preset, [*args.overrides, f"data.latents={args.latents}"], args.steps, args.warmup,
                          args.nproc, Path(tmp))
            ratios.append(online / cached)
            print(f"repeat {r + 1}: online VAE encoding {online * 1e3:.1f} ms/step, latent cache {cached * 1e3:.1f} "
                  f"ms/step, speed-up {online / cached:.2f}x", flush=True)
    print(f"latent-cache: median speed-up {statistics.median(ratios):.2f}x over {args.repeats} pairs "
          f"({args.steps - args.warmup} timed steps, {args.nproc} process(es))")


def dit_throughput(args: argparse.Namespace) -> None:
    """Training step of a video DiT shape on random latents and text embeddings (no data, no VAE): s/step,
    latent tokens/s and MFU against the bf16 peak of the device (the preset's DeepSpeed config)."""
    import torch

    from framework import distributed as dist
    from framework import engine as engine_lib
    from framework.metrics import mfu, peak_tflops
    from framework.recipe import load_run_config
    from recipes.video_dit.model import train_flops_per_sample

    dist.prepare_env()
    dist.init()
    t, h, w = (int(v) for v in args.latent.split("x"))
    bucket = f"{8 * h}x{8 * w}x{4 * (t - 1) + 1}:1"  # the video the latent encodes, one per micro-batch
    overrides = [*args.overrides, "text.encoder=bytes", "train.micro_batch=1", f"train.global_batch={dist.world()}",
                 f"data.buckets=['{bucket}']"]
    cfg, recipe = load_run_config(args.preset, overrides, dist.world())
    ds_config = engine_lib.deepspeed_config(cfg, dist.world())
    with engine_lib.model_init_context(ds_config):
        model = recipe.build_model(cfg).model
    engine = engine_lib.initialize(model, cfg, ds_config)
    dtype = torch.bfloat16 if cfg.train.precision == "bf16" else torch.float32
    device = dist.device()
    x = torch.randn(1, cfg.model.in_channels, t, h, w, device=device, dtype=dtype)
    text = torch.randn(1, args.text_len, cfg.model.text_dim, device=device, dtype=dtype)
    mask = torch.ones(1, args.text_len, dtype=torch.bool, device=device)
    times = []
    for _step in range(args.steps):
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        start = time.perf_counter()
        out = engine(x, torch.rand(1, device=device), text, mask)
        loss = out.float().pow(2).mean()
        engine.backward(loss)
        engine.step()
        loss.item()
        times.append(time.perf_counter() - start)
    seconds = statistics.median(times[args.warmup:])
    tokens = recipe.tokens(cfg, (t, h, w))
    flops = train_flops_per_sample(cfg.model, (t, h, w), args.text_len)
    peak = peak_tflops(cfg.log.peak_tflops)
    if dist.is_main():
        memory = torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available() else 0.0
        print(f"dit-throughput: {args.preset} latent {t}x{h}x{w} ({tokens} tokens), text {args.text_len}: "
              f"{seconds:.3f} s/step, {tokens / seconds:.0f} latent tokens/s, {flops / seconds / 1e12:.1f} TFLOP/s, "
              f"MFU {mfu(flops / seconds, peak, 1) * 100:.1f}% (peak {peak} TFLOP/s), max memory {memory:.1f} GiB")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="name", required=True)
    p = sub.add_parser("trainer-overhead", help="our trainer vs a bare DeepSpeed loop")
    p.add_argument("--preset", default="recipes/llada/configs/tiny.yaml")
    p.add_argument("--nproc", type=int, default=1)
    p.add_argument("--steps", type=int, default=40)
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("overrides", nargs="*")
    v = sub.add_parser("video-loader", help="video loader vs raw decord, same clips and workers")
    v.add_argument("--data", default="datasets/shapes/train")
    v.add_argument("--workers", type=int, default=2)
    v.add_argument("--batches", type=int, default=None, help="default 20, or the whole epoch with --generate")
    v.add_argument("--fps", type=float, default=8.0)
    v.add_argument("--buckets", nargs="*", default=None)
    v.add_argument("--repeats", type=int, default=2)
    v.add_argument("--uint8", action="store_true", help="ship uint8 frames (the recipes' default)")
    from bench_video_loader import add_generate_arguments

    add_generate_arguments(v)
    c = sub.add_parser("latent-cache", help="video DiT steps from the latent cache vs online VAE encoding")
    c.add_argument("--latents", default="datasets/shapes_latents")
    c.add_argument("--nproc", type=int, default=1)
    c.add_argument("--steps", type=int, default=25)
    c.add_argument("--warmup", type=int, default=5)
    c.add_argument("--repeats", type=int, default=2)
    c.add_argument("overrides", nargs="*")
    d = sub.add_parser("dit-throughput", help="video DiT training step on random latents: s/step and MFU")
    d.add_argument("--preset", default="recipes/video_dit/configs/wan2_1_1_3b.yaml")
    d.add_argument("--latent", default="21x60x104", help="latent TxHxW (21x60x104: 81 frames at 480x832)")
    d.add_argument("--text-len", type=int, default=512)
    d.add_argument("--steps", type=int, default=8)
    d.add_argument("--warmup", type=int, default=3)
    d.add_argument("--local_rank", type=int, default=None, help=argparse.SUPPRESS)
    d.add_argument("overrides", nargs="*")
    from bench_decode import add_arguments as decode_arguments

    decode_arguments(sub.add_parser("decode", help="masked-diffusion decoders and the AR twin: tokens/s, accuracy"))
    from bench_av_sync import add_arguments as av_sync_arguments

    av_sync_arguments(sub.add_parser("av-sync", help="joint video + audio sync: shared time band vs ablation"))
    from bench_adapt import adapt_arguments

    adapt_arguments(sub.add_parser("adapt", help="AR twin adapted to masked diffusion vs masked from scratch"))
    b = sub.add_parser("_bare-loop", help=argparse.SUPPRESS)
    b.add_argument("--preset", required=True)
    b.add_argument("--steps", type=int, required=True)
    b.add_argument("--warmup", type=int, required=True)
    b.add_argument("--out", required=True)
    b.add_argument("--local_rank", type=int, default=None)
    b.add_argument("overrides", nargs="*")
    args = parser.parse_args()
    if args.name == "trainer-overhead":
        trainer_overhead(args)
    elif args.name == "dit-throughput":
        dit_throughput(args)
    elif args.name == "latent-cache":
        latent_cache(args)
    elif args.name == "decode":
        from bench_decode import main as decode_main

        decode_main(args)
    elif args.name == "adapt":
        from bench_adapt import report

        report(args)
    elif args.name == "av-sync":
        from bench_av_sync import main as av_sync_main

        av_sync_main(args)
    elif args.name == "video-loader":
        from bench_video_loader import default_buckets, run, run_generated

        if args.generate:
            run_generated(args.generate, args.clips, args.frames, args.fps, args.workers, args.batches,
                          repeats=args.repeats, uint8=args.uint8, out_dir=args.out)
            return
        buckets = args.buckets or default_buckets(args.data, args.fps)
        run(args.data, buckets, args.fps, args.workers, args.batches or 20, repeats=args.repeats, uint8=args.uint8)
    else:
        bare_loop(args.preset, args.overrides, args.steps, args.warmup, args.out)


if __name__ == "__main__":
    main()
