"""`RewardScorer`: a reward function of `rewards.REWARD_FUNCS` run in worker processes, each item
time-bounded, so that a pathological answer (sympy can take minutes on some expressions) costs at
most `timeout` seconds and a zero reward instead of a stalled training step.

    with RewardScorer("boxed_math", timeout=5.0, workers=2) as scorer:
        rewards = scorer.score(completions, answers)   # 0.0 for an item that raised or hung
"""
from __future__ import annotations

import logging
import multiprocessing as mp
import time
from collections.abc import Callable
from multiprocessing.connection import Connection, wait

from racro_fast.rewards import REWARD_FUNCS

logger = logging.getLogger("racro_fast.rewards")

# Worker -> parent messages: ("ready",), ("ok", i, value), ("error", i, text). A worker streams
# one message per item, so when a deadline passes the parent knows which item hung; the item
# index guards against a stale answer left in a pipe by an interrupted call.
_STARTUP_TIMEOUT = 120.0  # seconds for a fresh worker to import math-verify/sympy


def _worker_main(fn: str | Callable[[str, str], float], conn: Connection) -> None:
    func = REWARD_FUNCS[fn] if isinstance(fn, str) else fn
    conn.send(("ready",))
    while True:
        try:
            job = conn.recv()
        except EOFError:
            return
        if job is None:
            return
        for i, completion, answer in job:
            try:
                conn.send(("ok", i, float(func(completion, answer))))
            except Exception as e:  # noqa: BLE001 - any failure of one item scores 0
                conn.send(("error", i, f"{type(e).__name__}: {e}"))


class _Worker:
    """One grading process and its pipe; killed and replaced when an item hangs."""

    def __init__(self, ctx: mp.context.BaseContext, fn: str | Callable[[str, str], float]):
        self.conn, child = ctx.Pipe()
        self.proc = ctx.Process(target=_worker_main, args=(fn, child), daemon=True)
        self.proc.start()
        child.close()
        self.ready = False
        self.items: list[int] = []  # indices of the current job still to be answered
        self.deadline = time.monotonic() + _STARTUP_TIMEOUT

    def kill(self) -> None:
        self.proc.kill()
        self.proc.join()
        self.conn.close()


class RewardScorer:
    """Scores completions with a reward function in worker processes, each item time-bounded.

    Items are split into one batch per worker; a worker answers item by item, and each
    answer must arrive within `timeout` seconds of the previous one. A late item scores 0,
    its worker is killed and replaced, and the rest of its batch goes on in the new worker.
    An exception or a crashed worker also scores 0. Failures are counted in `n_timeout` /
    `n_error` and logged. `fn` is a REWARD_FUNCS key or a picklable callable.
    """

    def __init__(
        self, fn_name: str | Callable[[str, str], float] = "boxed_math", timeout: float = 5.0, workers: int = 2
    ):
        if isinstance(fn_name, str) and fn_name not in REWARD_FUNCS:
            raise ValueError(f"fn_name: unknown reward {fn_name!r}; choose from {sorted(REWARD_FUNCS)}")
        if not isinstance(fn_name, str) and not callable(fn_name):
            raise ValueError(f"fn_name: expected a reward name or a callable, got {fn_name!r}")
        if not timeout > 0:
            raise ValueError(f"timeout: must be > 0 seconds, got {timeout}")
        if workers < 1:
            raise ValueError(f"workers: must be >= 1, got {workers}")
        self.fn = fn_name
        self.timeout = float(timeout)
        self.n_timeout = 0
        self.n_error = 0
        # Fork would copy the trainer's torch/CUDA state and threads; spawn starts clean.
        self._ctx = mp.get_context("spawn")
        # Started now so that the imports overlap with whatever the caller does next.
        self._workers = [_Worker(self._ctx, self.fn) for _ in range(workers)]

    def score(self, completions: list[str], answers: list[str]) -> list[float]:
        if len(completions) != len(answers):
            raise ValueError(f"answers: {len(answers)} answers for {len(completions)} completions")
        if self._workers is None:
            raise ValueError("scorer: already closed")
        n = len(completions)
        out = [0.0] * n
        per = -(-n // len(self._workers)) if n else 0
        for w, start in zip(self._workers, range(0, n, per or 1)):
            w.items = list(range(start, min(start + per, n)))
            if w.ready:
                self._send(w, completions, answers)
        while busy := [w for w in self._workers if w.items]:
            left = min(w.deadline for w in busy) - time.monotonic()
            for conn in wait([w.conn for w in busy], timeout=max(left, 0.0)):
                w = next(w for w in busy if w.conn is conn)
                try:
                    msg = conn.recv()
                except (EOFError, OSError):
                    if not w.ready:
                        # Dying before the first item is an environment problem (an unimportable
                        # reward function, say); scoring everything 0 would hide it.
                        code = w.proc.exitcode
                        self.close()
                        raise RuntimeError(
                            f"reward worker exited with code {code} before it was ready; see its traceback above"
                        ) from None
                    self._replace(w, completions, answers, out, "error", "the worker process died")
                    continue
                if msg[0] == "ready":
                    w.ready = True
                    self._send(w, completions, answers)
                    continue
                kind, i, value = msg
                if i != w.items[0]:
                    continue
                w.items.pop(0)
                if kind == "ok":
                    out[i] = value
                else:
                    self._fail(i, "error", value, completions)
                w.deadline = time.monotonic() + self.timeout
            now = time.monotonic()
            for w in busy:
                if w.items and now >= w.deadline and not w.conn.poll():
                    if not w.ready:
                        self.close()
                        raise RuntimeError(f"reward worker did not start within {_STARTUP_TIMEOUT:g}s")
                    self._replace(w, completions, answers, out, "timeout", f"no answer within {self.timeout:g}s")
        return out

    def _send(self, w: _Worker, completions: list[str], answers: list[str]) -> None:
        try:
            w.conn.send([(i, completions[i], answers[i]) for i in w.items])
        except OSError:  # died while idle (OOM killer, say): nothing was lost, start another
            logger.warning("reward worker %d had exited; starting a new one", w.proc.pid)
            self._respawn(w, w.items)
            return
        w.deadline = time.monotonic() + self.timeout

    def _fail(self, i: int, kind: str, why: str, completions: list[str]) -> None:
        if kind == "timeout":
            self.n_timeout += 1
        else:
            self.n_error += 1
        logger.warning("reward %s on item %d (scored 0): %s; completion starts %r", kind, i, why, completions[i][:80])

    def _replace(
        self, w: _Worker, completions: list[str], answers: list[str], out: list[float], kind: str, why: str
    ) -> None:
        """Score w's current item 0, kill w and hand the rest of its batch to a fresh worker."""
        i = w.items[0]
        out[i] = 0.0
        self._fail(i, kind, why, completions)
        self._respawn(w, w.items[1:])

    def _respawn(self, w: _Worker, items: list[int]) -> None:
        """Kill w and put a fresh worker in its place, to take `items` once it is ready."""
        w.kill()
        fresh = _Worker(self._ctx, self.fn)
        fresh.items, w.items = items, []
        self._workers[self._workers.index(w)] = fresh

    def close(self) -> None:
        """Stop the worker processes; the scorer cannot be used afterwards."""
        for w in self._workers or []:
            try:
                w.conn.send(None)
            except OSError:
                pass
            w.proc.join(timeout=1.0)
            if w.proc.is_alive():
                w.proc.kill()
                w.proc.join()
            w.conn.close()
        self._workers = None

    def __enter__(self) -> RewardScorer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __del__(self) -> None:
        if getattr(self, "_workers", None):
            try:
                self.close()
            except Exception:  # noqa: BLE001 - interpreter shutdown may have torn down mp already
                pass
