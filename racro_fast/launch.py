"""Children that die with their parent (Linux), however the parent dies (SIGKILL included).

    python -m racro_fast.launch PROGRAM ARGS...   # exec PROGRAM with the parent-death signal set

The kernel sends a process its parent-death signal (prctl PR_SET_PDEATHSIG) when the thread that
forked it exits; the setting survives exec. `ReasonerServer` starts vLLM's server through this
launcher instead of a `preexec_fn`, which Python documents as unsafe in a parent that has threads
(the trainer has many); `die_with_parent` is also what each training rank calls at start, so that a
killed torchrun leaves no rank behind.
"""
from __future__ import annotations

import ctypes
import os
import signal
import sys

PR_SET_PDEATHSIG = 1
PARENT_ENV = "RACRO_FAST_PARENT_PID"  # the pid the launcher's child must still have as its parent


def die_with_parent(sig: int = signal.SIGKILL) -> bool:
    """Ask the kernel to send `sig` to this process when its parent dies; False where it cannot
    (not Linux). A parent that died before the call leaves this process re-parented: it exits then."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        if libc.prctl(PR_SET_PDEATHSIG, int(sig), 0, 0, 0) != 0:
            return False
    except (OSError, AttributeError):
        return False
    expected = os.environ.get(PARENT_ENV)
    if expected is not None and os.getppid() != int(expected):
        os._exit(1)  # the parent is already gone: nothing would ever signal us
    return True


def command(argv: list[str]) -> list[str]:
    """`argv` run through this launcher, with the same interpreter."""
    return [sys.executable, "-m", "racro_fast.launch", *argv]


def main() -> None:
    if len(sys.argv) < 2:
        print("usage: python -m racro_fast.launch PROGRAM [ARGS...]", file=sys.stderr)
        raise SystemExit(2)
    die_with_parent()
    os.execvp(sys.argv[1], sys.argv[1:])


if __name__ == "__main__":
    main()
