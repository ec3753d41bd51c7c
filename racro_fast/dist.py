"""Process group and collectives.

Everything here also works in one plain process (world size 1, no process group), which is how
the CPU demo and most tests run: the collectives then return their input.

    dist.init()                                   # under torchrun: nccl on GPU, gloo on CPU
    n_tokens, n_seqs = dist.all_reduce_sum([n_tokens, n_seqs])
"""
from __future__ import annotations

import os

import torch
import torch.distributed as tdist

from racro_fast.config import ConfigError


def init() -> None:
    """A process group under torchrun (any world size, so `--nproc_per_node 1` runs the sharded path
    too); nothing in a plain process."""
    if "RANK" in os.environ and "WORLD_SIZE" in os.environ and not tdist.is_initialized():
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        if torch.cuda.is_available():
            torch.cuda.set_device(local_rank())
        tdist.init_process_group(backend)


def is_dist() -> bool:
    return tdist.is_available() and tdist.is_initialized()


def rank() -> int:
    return tdist.get_rank() if is_dist() else 0


def local_rank() -> int:
    return int(os.environ.get("LOCAL_RANK", 0))


def world_size() -> int:
    """The world size of the launched job: torchrun's WORLD_SIZE before `init`, the group's after."""
    return tdist.get_world_size() if is_dist() else int(os.environ.get("WORLD_SIZE", 1))


def barrier() -> None:
    if is_dist():
        tdist.barrier()


def device(kind: str = "auto") -> torch.device:
    if kind == "cuda" or (kind == "auto" and torch.cuda.is_available()):
        if not torch.cuda.is_available():
            raise ConfigError("run.device: cuda requested but no GPU is visible")
        return torch.device("cuda", local_rank())
    return torch.device("cpu")


def _reduce(values: list[float], op) -> list[float]:
    if not is_dist():
        return list(values)
    dev = torch.device("cuda", torch.cuda.current_device()) if tdist.get_backend() == "nccl" else torch.device("cpu")
    t = torch.tensor(values, dtype=torch.float64, device=dev)
    tdist.all_reduce(t, op=op)
    return t.tolist()


def all_reduce_sum(values: list[float]) -> list[float]:
    return _reduce(values, tdist.ReduceOp.SUM if is_dist() else None)


def all_reduce_max(value: float) -> float:
    return _reduce([value], tdist.ReduceOp.MAX if is_dist() else None)[0]


def all_reduce_min(value: float) -> float:
    return -all_reduce_max(-value)


def all_gather_object(obj) -> list:
    if not is_dist():
        return [obj]
    out = [None] * world_size()
    tdist.all_gather_object(out, obj)
    return out
