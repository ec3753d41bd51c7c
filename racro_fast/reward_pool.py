"""`RewardScorer`: a reward function of `rewards.REWARD_FUNCS` run in worker processes, each item
time-bounded, so that a pathological answer (sympy can take minutes on some expressions) costs at
most `timeout` seconds and a zero reward instead of a stalled training step.

    with RewardScorer("boxed_math", timeout=5.0, workers=2) as scorer:
        rewards = scorer.score(completions, answers)   # 0.0 for an item that raised or hung

With workers=0 the items are graded in the calling process (its main thread), each bounded by a
SIGALRM timer: no process to start or feed, and none of its memory (~60 MB each), but a hang
inside one C call (a huge integer power, say) is only cut short when that call returns, and a
grader that crashes the process takes the trainer with it. For short answers of a known grader.
"""
from __future__ import annotations

import logging
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from multiprocessing.connection import Connection, wait
from pathlib import Path

from racro_fast.rewards import REWARD_FUNCS

logger = logging.getLogger("racro_fast.rewards")

# Worker -> parent messages: ("ready",), ("ok", i, value), ("error", i, text). A worker streams
# one message per item, so when a deadline passes the parent knows which item hung; the item
# index guards against a stale answer left in a pipe by an interrupted call.
_STARTUP_TIMEOUT = 120.0  # seconds for a fresh worker to import math-verify/sympy
# The directory that holds the racro_fast package, so that the worker finds it however the
# trainer was started (an installed package, a checkout on PYTHONPATH, `python -P`).
_PACKAGE_ROOT = str(Path(__file__).resolve().parents[1])


def _watch_parent(parent: int) -> None:
    """Exit when the parent is gone, even in the middle of a hung item (EOF would only be seen
    after it); the worker then leaves no orphan behind a killed trainer."""
    while os.getppid() == parent:
        time.sleep(1.0)
    os._exit(1)


def _reward_func(fn: str | Callable[[str, str], float]) -> Callable[[str, str], float]:
    """The function of a REWARD_FUNCS name (or the callable itself), the grader imported: its import
    belongs to start-up, not to the first item's time."""
    import math_verify  # noqa: F401
    return REWARD_FUNCS[fn] if isinstance(fn, str) else fn


def _worker_main(conn: Connection, parent: int) -> None:
    """A grading process: the trainer's sys.path, then the reward function (a REWARD_FUNCS name,
    or a callable pickled by reference), then jobs until None or EOF."""
    threading.Thread(target=_watch_parent, args=(parent,), daemon=True).start()
    sys.path[:] = conn.recv()  # before the callable is unpickled: it may live beside the trainer
    func = _reward_func(conn.recv())
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
    """One grading process and its pipe; killed and replaced when an item hangs.

    The process is a fresh interpreter running this module, not a multiprocessing child: spawn
    re-imports the trainer's `__main__` (torch, transformers: ~450 MB per worker), and fork would
    copy its CUDA state and threads. This one imports the grader alone."""

    def __init__(self, fn: str | Callable[[str, str], float]):
        ours, theirs = socket.socketpair()
        env = dict(os.environ, PYTHONPATH=os.pathsep.join([_PACKAGE_ROOT, os.environ.get("PYTHONPATH", "")]))
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "racro_fast.reward_pool", str(theirs.fileno()), str(os.getpid())],
            pass_fds=(theirs.fileno(),), stdin=subprocess.DEVNULL, env=env)
        theirs.close()
        self.conn = Connection(ours.detach())
        try:
            self.conn.send(sys.path)
            self.conn.send(fn)
        except OSError:
            pass  # died at once: score() sees the closed pipe and reports the exit code
        self.ready = False
        self.items: list[int] = []  # indices of the current job still to be answered
        self.deadline = time.monotonic() + _STARTUP_TIMEOUT

    @property
    def pid(self) -> int:
        return self.proc.pid

    def kill(self) -> None:
        self.proc.kill()
        self.proc.wait()
        self.conn.close()

    def stop(self, grace: float = 1.0) -> None:
        """Ask the worker to exit; kill it if it has not within `grace` seconds."""
        try:
            self.conn.send(None)
        except OSError:
            pass
        try:
            self.proc.wait(timeout=grace)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self.conn.close()


class _Overrun(BaseException):
    """An in-process item past its time (a BaseException, so that a grader's `except Exception`
    does not swallow it)."""


class RewardScorer:
    """Scores completions with a reward function in worker processes, each item time-bounded.

    Items are split into one batch per worker; a worker answers item by item, and each
    answer must arrive within `timeout` seconds of the previous one. A late item scores 0,
    its worker is killed and replaced, and the rest of its batch goes on in the new worker.
    An exception or a crashed worker also scores 0. Failures are counted in `n_timeout` /
    `n_error` and logged. `fn` is a REWARD_FUNCS key or a callable picklable by reference (a
    module-level function).

    A REWARD_FUNCS function is a pure function of (completion, answer): its scores are kept
    (up to `memo_size` pairs), so that a pair seen before, in this call or an earlier one (a
    group's reasoner answers repeat), costs no worker time. A failed item is not kept. A
    callable of the caller's is run on every item (it may sample).

    workers=0: in this process, each item under a SIGALRM timer of `timeout` seconds (the module
    docstring says what that does not cover); the scorer must be made and used in the main thread.
    """

    memo_size = 1 << 16

    def __init__(
        self, fn_name: str | Callable[[str, str], float] = "boxed_math", timeout: float = 5.0, workers: int = 2
    ):
        if isinstance(fn_name, str) and fn_name not in REWARD_FUNCS:
            raise ValueError(f"fn_name: unknown reward {fn_name!r}; choose from {sorted(REWARD_FUNCS)}")
        if not isinstance(fn_name, str) and not callable(fn_name):
            raise ValueError(f"fn_name: expected a reward name or a callable, got {fn_name!r}")
        if not timeout > 0:
            raise ValueError(f"timeout: must be > 0 seconds, got {timeout}")
        if workers < 0:
            raise ValueError(f"workers: must be >= 0 (0: in this process), got {workers}")
        if workers == 0 and threading.current_thread() is not threading.main_thread():
            raise ValueError("workers: 0 grades in this process under SIGALRM, which only the main thread can "
                             "set; use workers >= 1 here")
        self.fn = fn_name
        self.timeout = float(timeout)
        self.n_timeout = 0
        self.n_error = 0
        self._memo: dict[tuple[str, str], float] | None = {} if isinstance(fn_name, str) else None
        self._failed: set[int] = set()  # items of the current call that scored 0 by failure
        # Started now so that the imports overlap with whatever the caller does next.
        self._workers = [_Worker(self.fn) for _ in range(workers)]
        self._func = _reward_func(fn_name) if workers == 0 else None
        self._running = False  # an in-process item is being graded (the timer may end it)

    def score(self, completions: list[str], answers: list[str]) -> list[float]:
        if len(completions) != len(answers):
            raise ValueError(f"answers: {len(answers)} answers for {len(completions)} completions")
        if self._workers is None:
            raise ValueError("scorer: already closed")
        if self._memo is None:
            return self._score(completions, answers)
        pairs = list(zip(completions, answers))
        new = [p for p in dict.fromkeys(pairs) if p not in self._memo]
        fresh = dict(zip(new, self._score([c for c, _ in new], [a for _, a in new])))
        out = [fresh[p] if p in fresh else self._memo[p] for p in pairs]
        if len(self._memo) + len(new) > self.memo_size:
            self._memo.clear()
        self._memo.update((p, fresh[p]) for k, p in enumerate(new) if k not in self._failed)
        return out

    def _score(self, completions: list[str], answers: list[str]) -> list[float]:
        """Each item in the workers, time-bounded; the items that failed are left in `_failed`."""
        self._failed = set()
        if self._func is not None:
            return self._score_here(completions, answers)
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
                        try:
                            code = w.proc.wait(timeout=5.0)
                        except subprocess.TimeoutExpired:
                            code = None
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

    def _score_here(self, completions: list[str], answers: list[str]) -> list[float]:
        """Each item in this process under a SIGALRM timer; the previous handler is put back after."""
        def overrun(signum, frame) -> None:
            if self._running:  # not once the item has returned and the timer is being stopped
                raise _Overrun

        out = [0.0] * len(completions)
        previous = signal.signal(signal.SIGALRM, overrun)
        try:
            for i, (completion, answer) in enumerate(zip(completions, answers)):
                try:
                    self._running = True
                    signal.setitimer(signal.ITIMER_REAL, self.timeout)
                    try:
                        out[i] = float(self._func(completion, answer))
                    finally:  # from here on the timer cannot raise: the handlers below run unbothered
                        self._running = False
                        signal.setitimer(signal.ITIMER_REAL, 0)
                except _Overrun:
                    self._fail(i, "timeout", f"no answer within {self.timeout:g}s", completions)
                except Exception as e:  # noqa: BLE001 - any failure of one item scores 0
                    self._fail(i, "error", f"{type(e).__name__}: {e}", completions)
        finally:
            signal.signal(signal.SIGALRM, previous)
        return out

    def _send(self, w: _Worker, completions: list[str], answers: list[str]) -> None:
        try:
            w.conn.send([(i, completions[i], answers[i]) for i in w.items])
        except OSError:  # died while idle (OOM killer, say): nothing was lost, start another
            logger.warning("reward worker %d had exited; starting a new one", w.pid)
            self._respawn(w, w.items)
            return
        w.deadline = time.monotonic() + self.timeout

    def _fail(self, i: int, kind: str, why: str, completions: list[str]) -> None:
        self._failed.add(i)
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
        fresh = _Worker(self.fn)
        fresh.items, w.items = items, []
        self._workers[self._workers.index(w)] = fresh

    def close(self) -> None:
        """Stop the worker processes; the scorer cannot be used afterwards."""
        for w in self._workers or []:
            w.stop()
        self._workers = None

    def __enter__(self) -> RewardScorer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __del__(self) -> None:
        if getattr(self, "_workers", None):
            try:
                self.close()
            except Exception:  # noqa: BLE001 - interpreter shutdown may have torn down modules already
                pass


if __name__ == "__main__":
    _worker_main(Connection(int(sys.argv[1])), int(sys.argv[2]))
