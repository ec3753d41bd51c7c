"""Process group and collectives.

Everything here also works in one plain process (world size 1, no process group), which is how
the CPU demo and most tests run: the collectives then return their input.

    dist.init(timeout_s=1800)                     # under torchrun: nccl on GPU, gloo on CPU
    n_tokens, n_seqs = dist.all_reduce_sum([n_tokens, n_seqs])
    answers = dist.fail_together("reasoner phase", engine.generate, requests, sampling)
    dist.shutdown()                               # config.run_main calls it when an entry point returns

Time: a rank waits in a collective at most the group's timeout (dist.timeout_s: NCCL's watchdog,
gloo's own timeout), after which the run fails. A wait known to be longer (a reasoner server's cold
start) goes on `side_group(timeout_s)`, a gloo group of its own timeout, so the main group's timeout
only has to cover the rank skew of one phase. A phase that raises on one rank fails every rank
through `fail_together`, so none is left waiting in the next collective.
"""
from __future__ import annotations

import datetime
import os

import torch
import torch.distributed as tdist

from racro_fast.config import ConfigError


class PhaseError(RuntimeError):
    """A phase failed on another rank; this rank stops with it."""


def init(timeout_s: float | None = None) -> None:
    """A process group under torchrun (any world size, so `--nproc_per_node 1` runs the sharded path
    too); nothing in a plain process. `timeout_s`: how long a rank may wait in a collective (None:
    torch's default, 10 minutes for NCCL)."""
    if "RANK" in os.environ and "WORLD_SIZE" in os.environ and not tdist.is_initialized():
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        if torch.cuda.is_available():
            torch.cuda.set_device(local_rank())
        timeout = datetime.timedelta(seconds=timeout_s) if timeout_s else None
        tdist.init_process_group(backend, timeout=timeout)


def shutdown() -> None:
    """End the process group after a run that finished on every rank: one barrier, so no rank tears
    its connections down while another still sends, then torch's `destroy_process_group`. A process
    that exits with the group alive can abort in gloo's or NCCL's destructors during interpreter
    teardown (SIGABRT, "terminate called without an active exception"). Not for a failed run: the
    barrier would wait for ranks that have stopped. Nothing in a plain process."""
    if is_dist():
        tdist.barrier()
        tdist.destroy_process_group()


def side_group(timeout_s: float):
    """A gloo group of every rank with its own timeout, for a wait longer than the main group's
    (every rank must call it, as for any new group); None in a plain process."""
    if not is_dist():
        return None
    return tdist.new_group(backend="gloo", timeout=datetime.timedelta(seconds=timeout_s))


def fail_together(what: str, fn, *args, **kwargs):
    """`fn(*args, **kwargs)` on every rank; if it raises on any rank, it raises on every rank (this
    rank's own error, or PhaseError naming `what`), after one scalar all-reduce. `fn` itself must not
    run collectives: a rank that raised would leave the others waiting in them."""
    try:
        out, error = fn(*args, **kwargs), None
    except Exception as e:  # noqa: BLE001 - whatever it is, every rank must hear of it
        out, error = None, e
    if all_reduce_sum([0.0 if error is None else 1.0])[0]:
        if error is not None:
            raise error
        raise PhaseError(f"{what} failed on another rank (its own error is in that rank's log)")
    return out


def is_dist() -> bool:
    return tdist.is_available() and tdist.is_initialized()


def rank() -> int:
    return tdist.get_rank() if is_dist() else 0


def local_rank() -> int:
    return int(os.environ.get("LOCAL_RANK", 0))


def local_world_size() -> int:
    """Ranks on this node (torchrun's LOCAL_WORLD_SIZE)."""
    return int(os.environ.get("LOCAL_WORLD_SIZE", 1))


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


def _reduce(values: list[float], op, group=None) -> list[float]:
    if not is_dist():
        return list(values)
    nccl = tdist.get_backend(group) == "nccl"
    dev = torch.device("cuda", torch.cuda.current_device()) if nccl else torch.device("cpu")
    t = torch.tensor(values, dtype=torch.float64, device=dev)
    tdist.all_reduce(t, op=op, group=group)
    return t.tolist()


def all_reduce_sum(values: list[float], group=None) -> list[float]:
    return _reduce(values, tdist.ReduceOp.SUM if is_dist() else None, group)


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
