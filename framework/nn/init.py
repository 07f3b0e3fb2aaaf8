"""Weight initialisation that also works when ZeRO-3 has already partitioned the parameters."""

from __future__ import annotations

import contextlib

import torch


def gathered_for_init(module: torch.nn.Module) -> contextlib.AbstractContextManager:
    """Under deepspeed.zero.Init a module's children are partitioned as soon as they are built, so a parent's
    custom init would see empty tensors; gather them (rank 0 initialises, the others receive it)."""
    params = [p for p in module.parameters() if hasattr(p, "ds_id")]
    if not params:
        return contextlib.nullcontext()
    import deepspeed

    return deepspeed.zero.GatheredParameters(params, modifier_rank=0)


def xavier_linears(module: torch.nn.Module) -> None:
    """Xavier-uniform weights and zero biases for every nn.Linear below module (the DiT convention; the
    callers zero their adaLN and output projections afterwards)."""
    for m in module.modules():
        if isinstance(m, torch.nn.Linear):
            torch.nn.init.xavier_uniform_(m.weight)
            if m.bias is not None:
                torch.nn.init.zeros_(m.bias)
