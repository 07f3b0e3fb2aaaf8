"""DeepSpeed configuration from our config, and engine construction."""

from __future__ import annotations

import contextlib
from typing import Any

import torch

from framework import distributed as dist
from framework.config import RunConfig


def deepspeed_config(cfg: RunConfig, world: int, load_universal: bool = False) -> dict:
    """The DeepSpeed JSON config our typed config implies (one place, so nothing drifts). `world` is the
    data-parallel size (world / train.sequence_parallel): the batch arithmetic counts replicas, not ranks."""
    t, o = cfg.train, cfg.optim
    zero: dict[str, Any] = {"stage": t.zero_stage}
    if t.zero_stage >= 1:
        zero.update(overlap_comm=dist.has_cuda(), contiguous_gradients=True, reduce_bucket_size=5e7)
    if t.zero_stage == 3:
        zero.update(stage3_gather_16bit_weights_on_model_save=False)
        if t.sequence_parallel > 1:
            # DeepSpeed 0.19's ZeRO-3 reduce-scatter path (`__avg_scatter_grads`) averages over all ranks, ignoring
            # the sequence-parallel size: SP=2 gradients came out at half of SP=1's. Its all-reduce path divides by
            # world / N as stages 0-2 do (tests/dist/test_sequence_parallel.py checks every gradient).
            zero.update(reduce_scatter=False)
    if t.offload_optimizer:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": dist.has_cuda()}
    ds: dict[str, Any] = {
        "train_batch_size": t.global_batch,
        "train_micro_batch_size_per_gpu": t.micro_batch,
        "gradient_accumulation_steps": cfg.grad_accum(world),
        "gradient_clipping": t.grad_clip,
        "zero_optimization": zero,
        "bf16": {"enabled": t.precision == "bf16"},
        "optimizer": {
            "type": "AdamW",
            # torch's AdamW everywhere: FusedAdam would be JIT-compiled (minutes, needs nvcc) for little gain
            # at the sizes this runs on CPU; on GPUs torch's foreach AdamW is within a few percent.
            "params": {"lr": o.lr, "betas": list(o.betas), "eps": o.eps, "weight_decay": o.weight_decay,
                       "torch_adam": True, "adam_w_mode": True},
        },
        # ZeRO-Offload normally insists on DeepSpeedCPUAdam (a JIT-built op); torch AdamW works too.
        "zero_force_ds_cpu_optimizer": False,
        "steps_per_print": 2**31 - 1,
        "wall_clock_breakdown": False,
        "checkpoint": {"load_universal": load_universal},
    }
    if t.precision == "bf16":
        # Keep gradient accumulation and reductions in fp32 so bf16 runs stay close to fp32 ones.
        ds["data_types"] = {"grad_accum_dtype": "fp32"}
    return ds


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """Decay matrices only: norms, biases and gains (1-D tensors) get no weight decay. Frozen parameters
    (requires_grad False: a LoRA run's base weights) never reach the optimizer (an empty no-decay group, as
    LoRA's all-matrix adapters give, is fine with DeepSpeed: checked under ZeRO 0-3)."""
    decay, no_decay = [], []
    for p in model.parameters():
        if p.requires_grad:
            (decay if p.dim() >= 2 else no_decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def model_init_context(ds_config: dict, mpu: Any = None) -> contextlib.AbstractContextManager:
    """Under ZeRO-3 build parameters already partitioned, so no rank ever holds the full model. With sequence
    parallelism (`mpu`), over the sequence-data-parallel group (all ranks), as the engine will."""
    if ds_config["zero_optimization"]["stage"] == 3:
        import deepspeed

        group = mpu.get_sequence_data_parallel_group() if mpu is not None else None
        return deepspeed.zero.Init(config_dict_or_path=ds_config, remote_device=None, mpu=mpu,
                                   data_parallel_group=group)
    return contextlib.nullcontext()


def initialize(model: torch.nn.Module, cfg: RunConfig, ds_config: dict, mpu: Any = None) -> Any:
    """Wrap the trainable model in a DeepSpeed engine with AdamW from the config. `mpu`: DeepSpeed's sequence-parallel
    groups (`sequence_parallel.init`), from which it reduces gradients over all ranks divided by world / N and
    shards ZeRO over the sequence-data-parallel group (all ranks)."""
    import deepspeed

    engine, _, _, _ = deepspeed.initialize(model=model, model_parameters=param_groups(model, cfg.optim.weight_decay),
                                           config=ds_config, mpu=mpu)
    return engine


def set_lr(engine: Any, lr: float) -> None:
    for group in engine.optimizer.param_groups:
        group["lr"] = lr
