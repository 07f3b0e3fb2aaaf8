"""Launcher environment contract, process-group initialisation and rank helpers.

The same entry point runs under plain `python` (no launcher), `torchrun` and `deepspeed`: all of
them end up with RANK / LOCAL_RANK / WORLD_SIZE / MASTER_ADDR / MASTER_PORT in the environment.
"""

from __future__ import annotations

import os
import socket
import warnings
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


def init(timeout_minutes: float | None = None) -> None:
    """Create the process group: nccl on GPUs, gloo on CPU. A collective that waits longer than
    `timeout_minutes` (default: the config's `train.collective_timeout_minutes`) raises instead of hanging."""
    prepare_env()
    import deepspeed

    _silence_known_warnings()
    if torch.distributed.is_initialized():
        return
    if timeout_minutes is None:
        from framework.config import TrainConfig

        timeout_minutes = TrainConfig.collective_timeout_minutes
    if has_cuda():
        torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
    timeout = timedelta(minutes=timeout_minutes)
    _default_group_timeout(timeout)
    deepspeed.init_distributed(dist_backend="nccl" if has_cuda() else "gloo", timeout=timeout, verbose=False)


def _default_group_timeout(timeout: timedelta) -> None:
    """Give every later process group our timeout too. DeepSpeed runs ZeRO's collectives on groups it makes
    with `new_group(ranks)` and no timeout, which torch fills from these module defaults (30 min for Gloo):
    without this a frozen rank still blocked the others for 30 minutes whatever the world group's timeout."""
    from torch.distributed import distributed_c10d as c10d

    for name in ("default_pg_timeout", "default_pg_nccl_timeout"):
        if isinstance(getattr(c10d, name, None), timedelta):
            setattr(c10d, name, timeout)


def _silence_known_warnings() -> None:
    """DeepSpeed's ZeRO calls torch collectives that torch 2.13 deprecates, and the FutureWarning came back on
    every step under ZeRO-3 (30 of them in 4 steps of 2 ranks): noise we cannot act on, so only these go."""
    for name in ("all_gather_into_tensor", "reduce_scatter_tensor"):
        warnings.filterwarnings("ignore", message=rf"`torch\.distributed\.{name}` is deprecated",
                                category=FutureWarning)


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
    """Every rank's `split_work` results, on every rank, in the original item order (padding dropped).

    `world` may be the data-parallel size world / N under `train.sequence_parallel=N`: the N ranks of a group
    (consecutive ranks) did the same work, so the first rank of each group speaks for it."""
    gathered = [results]
    every = torch.distributed.get_world_size() if torch.distributed.is_initialized() else 1  # all ranks
    if every > 1:
        gathered = [None] * every
        torch.distributed.all_gather_object(gathered, results)
        gathered = gathered[::every // world]
    return [gathered[r][i] for i in range(len(results)) for r in range(world)][:n]


def print0(*args, **kwargs) -> None:
    if is_main():
        print(*args, **kwargs, flush=True)


def is_collective_timeout(error: BaseException) -> bool:
    """Whether `error` is a collective giving up on a peer: Gloo raises "Timed out waiting Nms for recv
    operation"; NCCL's watchdog "... collective operation timeout" (it usually aborts the process itself)."""
    text = str(error)
    return "Timed out waiting" in text or "collective operation timeout" in text


def timeout_message(error: BaseException, timeout_minutes: float) -> str:
    """One line for a collective timeout: which key sets the limit, and what the backend said (first line)."""
    detail = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
    return (f"a collective waited longer than train.collective_timeout_minutes={timeout_minutes:g} "
            f"({timeout_minutes * 60:.0f} s): another rank is frozen, dead or far behind ({detail[:300]})")
