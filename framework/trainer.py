"""The one training loop every recipe runs. Read it top to bottom: `train()` is the whole story."""

from __future__ import annotations

import math
import signal
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import yaml

from framework import checkpoint, init_from, lora
from framework import distributed as dist
from framework import engine as engine_lib
from framework.config import RunConfig, to_dict
from framework.ema import ShardedEMA
from framework.metrics import Logger, mfu, peak_tflops
from framework.nn import sequence_parallel
from framework.recipe import Recipe
from framework.rng import capture_rng, restore_rng, seed_everything, step_generator
from framework.schedule import lr_at


@dataclass
class TrainResult:
    step: int
    losses: list[float] = field(default_factory=list)  # mean loss of each optimizer step run by this call
    preempted: bool = False
    checkpoint: str | None = None
    eval: dict = field(default_factory=dict)


class TrainingStopped(RuntimeError):
    """The run cannot go on (e.g. the loss stayed non-finite): a one-line message naming the step."""


class PreemptionSignal:
    """SIGTERM / SIGUSR1 set a flag; the loop saves at the next step boundary and exits cleanly."""

    def __init__(self) -> None:
        self.received = False
        for sig in (signal.SIGTERM, signal.SIGUSR1):
            signal.signal(sig, self._handle)

    def _handle(self, signum, frame) -> None:
        self.received = True


def to_device(batch: dict, device: torch.device) -> dict:
    return {k: v.to(device, non_blocking=True) if torch.is_tensor(v) else v for k, v in batch.items()}


def freeze(helpers: dict[str, torch.nn.Module], device: torch.device, dtype: torch.dtype) -> dict:
    """Frozen helpers: eval mode, no grads, compute dtype (or the helper's own `frozen_dtype`, e.g. the Wan VAE's
    fp32), on the device; never in the optimizer."""
    for module in helpers.values():
        module.requires_grad_(False).eval().to(device=device, dtype=getattr(module, "frozen_dtype", None) or dtype)
    return helpers


def train(cfg: RunConfig, recipe: Recipe) -> TrainResult:
    dist.init(timeout_minutes=cfg.train.collective_timeout_minutes)
    rank, world, device = dist.rank(), dist.world(), dist.device()
    # train.sequence_parallel=N: groups of N consecutive ranks share each sample, so data, batch arithmetic, noise
    # and evaluation go by the data-parallel rank and size; ZeRO still shards over all ranks (DeepSpeed's rule).
    sp = cfg.train.sequence_parallel
    sequence_parallel.check_world(world, sp)
    mpu = sequence_parallel.init(sp)
    dp_rank, dp_world = sequence_parallel.dp_rank(rank, sp), sequence_parallel.dp_world(world, sp)
    accum = cfg.grad_accum(dp_world)

    # Where we resume from decides the DeepSpeed config (universal loading), so find it first.
    ckpt = checkpoint.resolve(cfg.resume, cfg.run_dir)
    if ckpt is not None:
        checkpoint.check_safe(ckpt)  # a file that would run code when loaded: refused now, unread
        if cfg.resume != "auto":
            _roll_back_to(ckpt, cfg.run_dir)
    universal = ckpt is not None and checkpoint.needs_universal(ckpt, world)
    ds_config = engine_lib.deepspeed_config(cfg, dp_world, load_universal=universal)

    # Data first: a missing or empty dataset should fail before minutes of model construction.
    data = recipe.build_data(cfg, "train", dp_rank, dp_world, batch_multiple=accum)
    seed_everything(cfg.train.seed)
    with engine_lib.model_init_context(ds_config, mpu):
        built = recipe.build_model(cfg)
    # train.init_from starts a fresh run from other weights; a run resuming from its own checkpoint ignores it.
    started = init_from.load(recipe, cfg, built.model) if cfg.train.init_from and ckpt is None else ""
    # LoRA goes on the loaded base weights, before DeepSpeed wraps the model: only adapters reach the optimizer.
    adapted = lora.apply(built.model, cfg)
    if ckpt is not None and not universal and checkpoint.holds_obsolete(ckpt, built.model):
        universal = ds_config["checkpoint"]["load_universal"] = True  # an older model's partitions: by name
    compute_dtype = torch.bfloat16 if cfg.train.precision == "bf16" else torch.float32
    helpers = freeze(recipe.build_helpers(cfg), device, compute_dtype)
    engine = engine_lib.initialize(built.model, cfg, ds_config, mpu=mpu)
    ema = ShardedEMA(engine.module, cfg.ema.decay, rank, world) if cfg.ema.decay > 0 else None

    step, bad_total = 0, 0
    if ckpt is not None:
        if universal:
            checkpoint.make_universal(ckpt)
        checkpoint.load_engine(engine, ckpt, universal)
        step, bad_total = _restore_trainer_state(ckpt, data, ema, rank, world, sp)

    config_dict = to_dict(cfg)
    if dist.is_main():
        Path(cfg.run_dir).mkdir(parents=True, exist_ok=True)
        (Path(cfg.run_dir) / "config.yaml").write_text(yaml.safe_dump(config_dict, sort_keys=False))
    logger = Logger(cfg.run_dir, config_dict, main=dist.is_main(), total_steps=cfg.train.steps, start_step=step,
                    wandb_mode=cfg.log.wandb, project=cfg.log.project, progress=cfg.log.progress)
    summary = recipe.describe(cfg)
    logger.write(f"[{recipe.name}] {summary} | world {world}, ZeRO-{cfg.train.zero_stage}, {cfg.train.precision}, "
                 f"micro {cfg.train.micro_batch} x accum {accum} x data-parallel {dp_world} = {cfg.train.global_batch}"
                 + (f" | sequence parallel {sp} (Ulysses)" if sp > 1 else "")
                 + (f" | resumed from {ckpt} at step {step}" if ckpt else "") + (f" | {started}" if started else "")
                 + (f" | {adapted}" if adapted else "")
                 + (f" (train.init_from={cfg.train.init_from} ignored: resume wins)" if ckpt and cfg.train.init_from
                    else ""))

    preempt = PreemptionSignal()
    peak = peak_tflops(cfg.log.peak_tflops)
    result = TrainResult(step=step)
    batches = iter(data)
    saved_at, bad_streak = -1, 0
    stop_at = min(cfg.train.steps, step + cfg.train.stop_after) if cfg.train.stop_after else cfg.train.steps
    while step < stop_at:
        t_start = time.perf_counter()
        lr = lr_at(step, base_lr=cfg.optim.lr, total_steps=cfg.train.steps, warmup_steps=cfg.optim.warmup_steps,
                   schedule=cfg.optim.schedule, min_lr_ratio=cfg.optim.min_lr_ratio)
        engine_lib.set_lr(engine, lr)
        engine.train()
        wait = units = flops = 0.0
        sums: dict[str, torch.Tensor] = {}
        for micro in range(accum):
            t_wait = time.perf_counter()
            batch = next(batches)
            wait += time.perf_counter() - t_wait
            batch = to_device(batch, device)
            gen = step_generator(cfg.train.seed, step, dp_rank, micro, device=device)  # same noise in an SP group
            loss, metrics = recipe.loss(cfg, engine, helpers, batch, gen)
            engine.backward(loss)
            engine.step()
            for k, v in {"loss": loss, **metrics}.items():  # tensors: no device sync per micro-step
                sums[k] = sums.get(k, 0.0) + torch.as_tensor(v).detach().float() / accum
            u, f = recipe.work(cfg, batch)
            units, flops = units + u, flops + f
        step += 1
        grad_norm = engine.get_global_grad_norm()
        grad_norm = float(grad_norm) if grad_norm is not None else None

        # One collective per step: metric means, work sums, whether any rank was told to stop, whether any rank
        # saw a bad step (non-finite grad norm, or DeepSpeed skipped the update), and the data streams' counters.
        keys, counters = sorted(sums), data_counters(data)
        bad_here = not _finite(grad_norm) or not engine.was_step_applied()
        reduced = dist.all_reduce([float(sums[k]) for k in keys] + [units, flops, wait, float(preempt.received),
                                                                   float(bad_here)] + list(counters.values()),
                                  op="sum")
        means = {k: v / world for k, v in zip(keys, reduced)}
        units, flops, wait, stop, bad_ranks = reduced[len(keys):len(keys) + 5]
        # The N ranks of a sequence-parallel group hold the same batch: count its work and data counters once.
        units, flops = units / sp, flops / sp
        data_stats = {f"data/{k}": v / sp for k, v in zip(counters, reduced[len(keys) + 5:])}
        bad = bad_ranks > 0 or not _finite(means["loss"])
        bad_streak, bad_total = (bad_streak + 1, bad_total + 1) if bad else (0, bad_total)
        # The EMA only averages finite, applied updates, so a bad step never reaches it.
        if ema is not None and step > cfg.ema.start_step and not bad:
            ema.update()
        result.losses.append(means["loss"])
        seconds = time.perf_counter() - t_start
        if step % cfg.log.every == 0 or step == cfg.train.steps or bad:
            logger.log(step, {**means, "lr": lr, "grad_norm": grad_norm, f"{recipe.unit}_per_s": units / seconds,
                              "data_wait_pct": 100.0 * wait / world / seconds, "step_s": seconds,
                              "skipped_steps": int(engine.skipped_steps), "bad_steps": bad_total, **data_stats,
                              **({"mfu": mfu(flops / seconds, peak, world)} if peak else {})})
        logger.advance()
        if bad:
            _on_bad_step(step, bad_streak, _bad_reason(means["loss"], grad_norm, engine), cfg, logger)

        if cfg.eval.every and step % cfg.eval.every == 0 and step < cfg.train.steps:
            result.eval = _evaluate(recipe, engine, helpers, cfg, dp_rank, dp_world, step, logger)
        due = cfg.checkpoint.every and step % cfg.checkpoint.every == 0
        if (due or stop > 0 or (step == stop_at and cfg.checkpoint.at_end)) and _can_save(engine, bad, step, logger):
            state = _trainer_state(step, data, ema, rank, world, bad_total, sp)
            result.checkpoint = str(checkpoint.save(engine, cfg.run_dir, step, state, config_dict,
                                                    cfg.checkpoint.keep_last))
            saved_at = step
        if stop > 0:
            logger.write(f"preemption signal received: saved step {step} to {result.checkpoint}, exiting"
                         if saved_at == step else f"preemption signal received: step {step} was bad and is not "
                         f"saved (newest checkpoint: {result.checkpoint}), exiting")
            result.preempted = True
            break

    if not result.preempted and cfg.eval.at_end and step == cfg.train.steps:
        result.eval = _evaluate(recipe, engine, helpers, cfg, dp_rank, dp_world, step, logger)
    result.step = step
    if saved_at != step and not result.preempted:  # e.g. resumed at the end already
        found = checkpoint.complete_checkpoints(Path(cfg.run_dir) / "checkpoints")
        result.checkpoint = str(found[-1]) if found else None
    logger.close()
    return result


def _evaluate(recipe: Recipe, engine: Any, helpers: dict, cfg: RunConfig, rank: int, world: int, step: int,
              logger: Logger) -> dict:
    """Evaluation and sampling run on every rank (each does its share) so nobody idles into a timeout. rank and
    world are the data-parallel ones: the ranks of a sequence-parallel group run the same forwards together."""
    engine.eval()
    with torch.no_grad():
        values = recipe.evaluate(cfg, engine, helpers, rank, world, step)
        out_dir = str(Path(cfg.run_dir) / "samples" / checkpoint.tag_for(step))
        lines = recipe.sample(cfg, engine, helpers, rank, world, step, out_dir) if cfg.eval.samples else []
    engine.train()
    if values:
        logger.log(step, {f"eval/{k}": v for k, v in values.items()})
        logger.write(f"eval @ {step}: " + ", ".join(f"{k} {v:.4g}" for k, v in values.items()))
    for line in lines:
        logger.write(f"sample @ {step}: {line}")
    logger.log_media(step, out_dir)
    return values


def data_counters(data: Any) -> dict[str, float]:
    """The stream's counters (corrupt shards or clips skipped, too-long samples, ...), duck-typed: any `stats`
    dict of numbers, in a fixed order so every rank's all-reduce lines up; {} for a stream without one."""
    stats = getattr(data, "stats", None)
    if not isinstance(stats, dict):
        return {}
    return {k: float(v) for k, v in sorted(stats.items()) if isinstance(v, (int, float)) and not isinstance(v, bool)}


def _finite(value: float | None) -> bool:
    """None (no norm computed this step) is no evidence of a bad step."""
    return value is None or math.isfinite(value)


def _bad_reason(loss: float, grad_norm: float | None, engine: Any) -> str:
    if not _finite(loss):
        return f"loss {loss}"
    if not _finite(grad_norm):
        return f"grad norm {grad_norm}"
    return "an update was skipped (gradient overflow)" if not engine.was_step_applied() else "another rank's grad norm"


def _on_bad_step(step: int, streak: int, reason: str, cfg: RunConfig, logger: Logger) -> None:
    """Say so; after train.max_bad_steps in a row, stop (every rank decides alike: the inputs were all-reduced)."""
    limit = cfg.train.max_bad_steps
    logger.write(f"step {step}: bad step ({reason}), {streak} in a row of train.max_bad_steps={limit}")
    if streak >= limit:
        logger.close()
        found = checkpoint.complete_checkpoints(Path(cfg.run_dir) / "checkpoints")
        raise TrainingStopped(f"step {step}: the loss or gradient norm was non-finite (or the update skipped) for "
                              f"{streak} steps in a row (train.max_bad_steps={limit}); nothing saved since. Newest "
                              f"finite checkpoint: {found[-1] if found else 'none'}. Lower optim.lr or check the data.")


def _can_save(engine: Any, bad: bool, step: int, logger: Logger) -> bool:
    """Collective: never save after a bad step or a model with a non-finite weight on any rank (each rank checks
    what it holds: its ZeRO-3 partition, else every parameter), so rotation never drops the last finite one."""
    local = all(bool(torch.isfinite(getattr(p, "ds_tensor", p)).all()) for p in engine.module.parameters())
    finite = dist.all_reduce([float(not local)], op="sum")[0] == 0
    if bad or not finite:
        logger.write(f"step {step}: not saving a checkpoint: "
                     + ("the last step was bad" if bad else "the model has non-finite weights"))
    return finite and not bad


def _roll_back_to(ckpt: Path, run_dir: str) -> None:
    """An explicit resume of an older checkpoint of this run makes it the head (newer ones set aside)."""
    if dist.is_main():
        for moved in checkpoint.make_head(ckpt, run_dir):
            dist.print0(f"resume={ckpt}: rolled back; the newer {moved.name} moved to {moved}")
    dist.barrier()


def _trainer_state(step: int, data: Any, ema: ShardedEMA | None, rank: int, world: int, bad_total: int = 0,
                   sp: int = 1) -> dict:
    """Everything of ours a resume needs, as plain types and tensors (loadable with weights_only=True)."""
    return {"step": step, "rank": rank, "world": world, "data": data.state_dict(), "rng": capture_rng(),
            "ema": ema.state_dict() if ema is not None else None, "bad_steps": bad_total, "sequence_parallel": sp}


def _restore_trainer_state(ckpt: Path, data: Any, ema: ShardedEMA | None, rank: int, world: int,
                           sp: int = 1) -> tuple[int, int]:
    states = checkpoint.trainer_states(ckpt)
    # ZeRO shards over all ranks whatever train.sequence_parallel is, so weights and optimizer load across an SP
    # change; the data cursors do not (another data-parallel split), so that is handled like a world-size change.
    old_sp = int(states[0].get("sequence_parallel", 1))
    same_world = len(states) == world and old_sp == sp
    if ema is not None:
        if states[0]["ema"] is None:
            warnings.warn(f"{ckpt} has no EMA: starting the EMA from the loaded weights", stacklevel=2)
        else:
            ema.load_state_dict([s["ema"] for s in states])
    if same_world:
        own = states[rank]
        data.load_state_dict(own["data"])
        restore_rng(own["rng"])
    else:
        # Another world size splits shards differently, so the old cursors do not apply: restart the epoch
        # the checkpoint was in under the new split (samples already seen in that epoch may repeat).
        epoch = int(states[0]["data"].get("epoch", 0))
        data.start_epoch(epoch)
        change = (f"world size changed {len(states)} -> {world}" if old_sp == sp
                  else f"train.sequence_parallel changed {old_sp} -> {sp}")
        dist.print0(f"{change}: data restarts epoch {epoch} under the new split")
    return int(states[0]["step"]), int(states[0].get("bad_steps", 0))
