"""Exponential moving average of the weights, sharded across ranks.

Every rank keeps the EMA of the same contiguous slice of each flattened parameter that ZeRO-3 gives
it (`ceil(numel / world)` elements starting at `rank * that`). Under ZeRO-3 that slice is exactly the
rank's parameter partition (`param.ds_tensor`), so no rank ever materialises a full copy; under ZeRO
0-2 the full parameter is local and we cut the same slice from it, so memory per rank is 1/world of a
full EMA either way and the saved shards have one format for every stage.
"""

from __future__ import annotations

import math

import torch


def slice_bounds(numel: int, rank: int, world: int) -> tuple[int, int]:
    """[start, end) of the flattened parameter this rank owns (ZeRO-3's partitioning)."""
    size = math.ceil(numel / world)
    start = min(numel, rank * size)
    return start, min(numel, start + size)


def _local_values(param: torch.nn.Parameter, rank: int, world: int) -> torch.Tensor:
    """This rank's slice of a parameter, flattened, fp32."""
    if hasattr(param, "ds_tensor"):  # ZeRO-3 partition (padded at the end of the last rank)
        start, end = slice_bounds(param.ds_numel, rank, world)
        return param.ds_tensor.detach().flatten()[: end - start].float()
    start, end = slice_bounds(param.numel(), rank, world)
    return param.detach().flatten()[start:end].float()


class ShardedEMA:
    """EMA of the trainable parameters; `update()` after every optimizer step."""

    def __init__(self, module: torch.nn.Module, decay: float, rank: int, world: int):
        self.decay, self.rank, self.world = decay, rank, world
        self.params = {n: p for n, p in module.named_parameters() if p.requires_grad}
        self.shapes = {n: list(getattr(p, "ds_shape", p.shape)) for n, p in self.params.items()}
        self.shards = {n: _local_values(p, rank, world).clone() for n, p in self.params.items()}

    @torch.no_grad()
    def update(self, decay: float | None = None) -> None:
        d = self.decay if decay is None else decay
        for name, p in self.params.items():
            self.shards[name].lerp_(_local_values(p, self.rank, self.world), 1.0 - d)

    def state_dict(self) -> dict:
        return {"decay": self.decay, "rank": self.rank, "world": self.world, "shapes": self.shapes,
                "shards": self.shards}

    def load_state_dict(self, states: list[dict]) -> None:
        """Load from the shards of every rank of a checkpoint (any world size)."""
        full = consolidate(states)
        for name in self.shards:
            if name not in full:
                raise KeyError(f"EMA state has no parameter '{name}'")
            start, end = slice_bounds(full[name].numel(), self.rank, self.world)
            self.shards[name] = full[name].flatten()[start:end].clone()


def consolidate(states: list[dict]) -> dict[str, torch.Tensor]:
    """Full EMA tensors from the per-rank shards (ordered or not) of one checkpoint."""
    states = sorted(states, key=lambda s: s["rank"])
    world = states[0]["world"]
    if [s["rank"] for s in states] != list(range(world)):
        raise ValueError(f"EMA shards incomplete: have ranks {[s['rank'] for s in states]} of {world}")
    out = {}
    for name, shape in states[0]["shapes"].items():
        flat = torch.cat([s["shards"][name] for s in states])
        if flat.numel() != math.prod(shape):
            raise ValueError(f"EMA shards of '{name}' hold {flat.numel()} values, shape {shape} needs "
                             f"{math.prod(shape)}")
        out[name] = flat.view(shape)
    return out
