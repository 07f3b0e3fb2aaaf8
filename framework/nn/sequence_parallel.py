"""Ulysses sequence parallelism (`train.sequence_parallel=N`) on DeepSpeed's own pieces.

Ranks form groups of N consecutive ranks (DeepSpeed's `parallel_state_sp` layout: group g is ranks
[g*N, (g+1)*N)). Every rank of a group gets the same sample; each keeps 1/N of the token sequence
(`shard`) from the embedding on. Self-attention goes through `deepspeed.sequence.layer.DistributedAttention`,
whose all-to-all trades the sequence split for a head split, so our attention kernel sees the whole
sequence for H/N heads. Everything else in a block (norms, MLPs, cross-attention to text) is per token and
runs on the shard. Before the head the shards are put back together (`gather`), and every rank of the
group computes the same loss on the full output.

Gradient scaling: `gather`'s backward keeps only this rank's slice of the (identical) upstream gradient,
so a parameter's gradient on rank r is the part of the full gradient that flows through shard r; the
group's ranks sum to the full gradient. DeepSpeed reduces gradients over the sequence-data-parallel group
(all ranks) and divides by world / N, i.e. sums the shards and averages over the data-parallel replicas:
exactly the SP=1 gradient of the same samples. Hence nothing may consume the gathered output with
parameters (it would count them N times), and the loss must be the full-sequence loss, the same on all
ranks of a group.

The group state is process-wide (DeepSpeed keeps it module-level too): `init(n)` once after the process
group exists; `size() == 1` (the default) turns every helper here into the identity.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch
from torch import Tensor

from framework.config import ConfigError

_SIZE = 1
_ATTENTION: dict[int, Any] = {}  # one DistributedAttention per process (it only holds the group)


def dp_rank(rank: int, sp: int) -> int:
    """This rank's data-parallel index: the ranks of one sequence-parallel group read the same sample."""
    return rank // sp


def dp_world(world: int, sp: int) -> int:
    """Data-parallel replicas: world / N."""
    return world // sp


def sp_rank(rank: int, sp: int) -> int:
    """This rank's place in its group, i.e. which 1/N of the sequence it keeps."""
    return rank % sp


def check_divisible(length: int, sp: int, what: str) -> None:
    """A sequence the group cannot split evenly is a config error (DeepSpeed's all-to-all needs equal shards)."""
    if sp > 1 and length % sp:
        raise ConfigError(f"train.sequence_parallel={sp}: {what} has {length} tokens, not divisible by {sp}")


def check_heads(heads: int, sp: int, key: str) -> None:
    """Heads are what the all-to-all scatters: each rank must get a whole number of them."""
    if sp > 1 and heads % sp:
        raise ConfigError(f"train.sequence_parallel={sp} does not divide {key}={heads} (attention heads are split "
                          f"over the group)")


def check_world(world: int, sp: int) -> None:
    if sp < 1:
        raise ConfigError(f"train.sequence_parallel must be >= 1, got {sp}")
    if world % sp:
        raise ConfigError(f"train.sequence_parallel={sp} does not divide the world size {world}")


def init(sp: int) -> Any:
    """Create the sequence-parallel groups (once per process) and return DeepSpeed's mpu for them, to hand to
    `deepspeed.initialize(mpu=...)`; None when sp == 1 (DeepSpeed then uses plain data parallelism)."""
    global _SIZE
    if sp <= 1:
        _SIZE = 1
        return None
    from deepspeed.runtime.sequence_parallel import parallel_state_sp as mpu

    if mpu._SEQUENCE_PARALLEL_GROUP is None:
        mpu.initialize_sequence_parallel(sp)
    elif mpu.get_sequence_parallel_world_size() != sp:
        raise ConfigError(f"train.sequence_parallel={sp}: this process already has groups of "
                          f"{mpu.get_sequence_parallel_world_size()}")
    _SIZE = sp
    return mpu


def size() -> int:
    return _SIZE


def active() -> bool:
    return _SIZE > 1


@contextlib.contextmanager
def unsharded() -> Iterator[None]:
    """Models run whole sequences on every rank inside (what SP=1 computes): the reference that SP is checked
    against, and decoding steps whose shapes the group cannot split (a KV-cache step of a few tokens)."""
    global _SIZE
    saved, _SIZE = _SIZE, 1
    try:
        yield
    finally:
        _SIZE = saved


def group() -> Any:
    from deepspeed.runtime.sequence_parallel import parallel_state_sp as mpu

    return mpu.get_sequence_parallel_group()


def rank_in_group() -> int:
    return torch.distributed.get_rank(group()) if active() else 0


def shard(x: Tensor, dim: int) -> Tensor:
    """This rank's contiguous 1/N of `x` along `dim` (identity without SP). Plain slicing, so the gradient of
    the full tensor is this shard's gradient in place and zeros elsewhere, as it should be."""
    if not active():
        return x
    return x.chunk(_SIZE, dim=dim)[rank_in_group()]


def shard_rope(rope: tuple[Tensor, Tensor] | None, dim: int = 0) -> tuple[Tensor, Tensor] | None:
    """Slice RoPE tables of the FULL sequence alongside the tokens (never recomputed for the shard)."""
    return None if rope is None else (shard(rope[0], dim), shard(rope[1], dim))


def shard_tokens(tokens: Tensor, *tables: tuple[Tensor, Tensor] | Tensor | None,
                 what: str = "the token sequence") -> tuple:
    """(this rank's tokens (B, N/sp, D), each table of the FULL sequence sliced alike along its dim 0): what a
    model does right after embedding. A length the group cannot split is a ConfigError naming the key."""
    check_divisible(tokens.shape[1], _SIZE, what)
    sliced = tuple(shard_rope(t) if isinstance(t, tuple) or t is None else shard(t, 0) for t in tables)
    return (shard(tokens, 1), *sliced)


class _Gather(torch.autograd.Function):
    """All-gather along `dim`; backward keeps this rank's slice of the gradient. Correct because every rank of
    the group computes the same function of the gathered tensor (the same loss), so the upstream gradients
    are identical and rank r owns exactly the part of it that belongs to its shard."""

    @staticmethod
    def forward(ctx: Any, x: Tensor, dim: int, grp: Any, n: int, index: int) -> Tensor:
        ctx.dim, ctx.n, ctx.index = dim, n, index
        parts = [torch.empty_like(x) for _ in range(n)]
        torch.distributed.all_gather(parts, x.contiguous(), group=grp)
        return torch.cat(parts, dim=dim)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple:
        return grad.chunk(ctx.n, dim=ctx.dim)[ctx.index].contiguous(), None, None, None, None


def gather(x: Tensor, dim: int) -> Tensor:
    """The full sequence from every rank's shard (identity without SP); see `_Gather` for the gradient."""
    if not active():
        return x
    return _Gather.apply(x, dim, group(), _SIZE, rank_in_group())


def _local_attention(fn: Any) -> Any:
    """DeepSpeed hands the local attention (B, L, H/N, D); our kernels take (B, H, L, D)."""

    def local(q: Tensor, k: Tensor, v: Tensor, **kwargs: Any) -> Tensor:
        return fn(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), **kwargs).transpose(1, 2)

    return local


def sharded_attention(q: Tensor, k: Tensor, v: Tensor, fn: Any = None, **kwargs: Any) -> Tensor:
    """Attention between sequence shards: q (B, H, Lq/N, D), k, v (B, H, Lk/N, D) -> (B, H, Lq/N, D), computed
    as attention of the full query sequence over the full key sequence (self-attention, or the joint model's
    cross-modal attention between two sharded towers); masks in `kwargs` are over the full sequences.
    Without SP this is `fn(q, k, v, **kwargs)`.

    DeepSpeed's DistributedAttention with batch-first layout (B, L/N, H, D): scatter_idx=2 (heads),
    gather_idx=1 (sequence), batch_dim_idx=0."""
    if fn is None:
        from framework.nn.attention import attention as fn
    if not active():
        return fn(q, k, v, **kwargs)
    from deepspeed.sequence.layer import DistributedAttention

    key = id(fn)
    if key not in _ATTENTION:
        _ATTENTION[key] = DistributedAttention(_local_attention(fn), group(), scatter_idx=2, gather_idx=1)
    out = _ATTENTION[key](q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), 0, None, **kwargs)
    return out.transpose(1, 2)
