"""A child started through racro_fast.launch dies with its parent, however the parent dies."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time

import psutil

PARENT = textwrap.dedent("""
    import os, subprocess, sys, time
    from racro_fast import launch
    env = dict(os.environ, **{launch.PARENT_ENV: str(os.getpid())})
    child = subprocess.Popen(launch.command([sys.executable, "-c", "import time; time.sleep(120)"]), env=env,
                             start_new_session=True)
    print(child.pid, flush=True)
    time.sleep(120)
""")


def _gone(pid: int, within: float) -> bool:
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        try:
            if psutil.Process(pid).status() == psutil.STATUS_ZOMBIE:
                return True
        except psutil.NoSuchProcess:
            return True
        time.sleep(0.1)
    return False


def test_child_dies_with_a_killed_parent():
    parent = subprocess.Popen([sys.executable, "-c", PARENT], stdout=subprocess.PIPE, text=True)
    child = int(parent.stdout.readline())
    try:
        time.sleep(1.0)  # the launcher has exec'd into the child program by now
        assert psutil.Process(child).cmdline()[-1].endswith("time.sleep(120)"), psutil.Process(child).cmdline()
        os.kill(parent.pid, signal.SIGKILL)  # no atexit, no finally: only the kernel can end the child now
        parent.wait()
        assert _gone(child, within=5.0), "the child outlived its SIGKILLed parent"
    finally:
        for pid in (child, parent.pid):
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass


def test_launcher_refuses_an_empty_command():
    out = subprocess.run([sys.executable, "-m", "racro_fast.launch"], capture_output=True, text=True)
    assert out.returncode == 2 and "usage" in out.stderr
