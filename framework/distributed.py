"""Launcher environment contract, process-group initialisation and rank helpers.

The same entry point runs under plain `python` (no launcher), `torchrun` and `deepspeed`: all of
them end up with RANK / LOCAL_RANK / WORLD_SIZE / MASTER_ADDR / MASTER_PORT in the environment.
"""

from __future__ import annotations

import os
import socket
from datetime import timedelta

import torch


def has_cuda() -> bool:
    return torch.cuda.is_available()


def prepare_env() -> None:
    """Fill the launcher variables for a single-process run and pick DeepSpeed's accelerator.

    Must run before `import deepspeed`: without RANK etc. DeepSpeed goes looking for MPI, and without
    CUDA it must be told to use its CPU accelerator.
    """
    if not has_cuda():
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    if "RANK" not in os.environ:
        os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", LOCAL_WORLD_SIZE="1")
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(free_port()))
    os.environ.setdefault("LOCAL_RANK", "0")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def env_world_size() -> int:
    """World size promised by the launcher (known before the process group exists)."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def init(timeout_minutes: float = 30.0) -> None:
    """Create the process group: nccl on GPUs, gloo on CPU."""
    prepare_env()
    import deepspeed

    if torch.distributed.is_initialized():
        return
    if has_cuda():
        torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
    deepspeed.init_distributed(dist_backend="nccl" if has_cuda() else "gloo",
                               timeout=timedelta(minutes=timeout_minutes), verbose=False)


def shutdown() -> None:
    """Tear the process group down (NCCL warns about leaked resources otherwise). The barrier first lets every
    rank finish its last collectives: a rank that destroyed its group while another still had Gloo work in
    flight aborted once at exit ("terminate called without an active exception", CI under load)."""
    if torch.distributed.is_initialized():
        if world() > 1:
            torch.distributed.barrier()
        torch.distributed.destroy_process_group()


def rank() -> int:
    return torch.distributed.get_rank() if torch.distributed.is_initialized() else 0


def world() -> int:
    return torch.distributed.get_world_size() if torch.distributed.is_initialized() else 1


def is_main() -> bool:
    return rank() == 0


def device() -> torch.device:
    return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0))) if has_cuda() else torch.device("cpu")


def barrier() -> None:
    if torch.distributed.is_initialized():
        torch.distributed.barrier()


def all_reduce(values: list[float], op: str = "mean") -> list[float]:
    """Reduce a few Python floats across ranks (one collective, float64 for exact sums)."""
    if not torch.distributed.is_initialized() or world() == 1:
        return list(values)
    t = torch.tensor(values, dtype=torch.float64, device=device() if has_cuda() else "cpu")
    reduce_op = torch.distributed.ReduceOp.MAX if op == "max" else torch.distributed.ReduceOp.SUM
    torch.distributed.all_reduce(t, op=reduce_op)
    if op == "mean":
        t /= world()
    return t.tolist()


def split_work(items: list, rank: int, world: int) -> list:
    """This rank's share of `items`, padded to ceil(n / world) so every rank runs the same number of
    forwards (ZeRO-3 forwards are collective); `gather_work` puts the results back in item order."""
    per_rank = -(-len(items) // world)
    return (items[rank::world] + items[:per_rank])[:per_rank]


def gather_work(results: list, n: int, world: int) -> list:
    """Every rank's `split_work` results, on every rank, in the original item order (padding dropped)."""
    gathered = [results]
    if world > 1:
        gathered = [None] * world
        torch.distributed.all_gather_object(gathered, results)
    return [gathered[r][i] for i in range(len(results)) for r in range(world)][:n]


def print0(*args, **kwargs) -> None:
    if is_main():
        print(*args, **kwargs, flush=True)
