"""The README's set-up on a machine like a new user's: `make demo` from a fresh clone.

Heavy (a new virtualenv, every package downloaded into an empty cache, the demo models built), so
it runs where RACRO_SETUP_TEST=1 (.ci/run sets it). What it switches off is what a user does not
have: pip's configuration files and their local wheel folder and extra indexes, a HOME with a warm
cache, a Python that allows installing system-wide. PY is the Debian interpreter, which refuses
system-wide installs (PEP 668), so the set-up must make and use its own virtualenv. The PyTorch CPU
wheel index, which this machine cannot reach, is stood in for by a local PEP 503 index holding the
CPU torch wheel: everything else comes from the normal package index.
"""
from __future__ import annotations

import glob
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from racro_fast.demo import cache_root

pytestmark = pytest.mark.slow  # a fresh set-up and demo from a clone

ROOT = Path(__file__).resolve().parent.parent
DEBIAN_PY = "/usr/bin/python3"


def _cpu_torch_wheel() -> str | None:
    import torch
    version = torch.__version__.split("+")[0]
    tag = f"cp{sys.version_info.major}{sys.version_info.minor}"
    dirs = [d for d in os.environ.get("PIP_FIND_LINKS", "").split() if d] + ["/opt/wheels"]
    for d in dirs:
        hits = glob.glob(os.path.join(d, f"torch-{version}+cpu-{tag}-*.whl"))
        if hits:
            return hits[0]
    return None


@pytest.mark.skipif(os.environ.get("RACRO_SETUP_TEST") != "1",
                    reason="the fresh-machine set-up test downloads every package; RACRO_SETUP_TEST=1 runs it (CI does)")
def test_make_demo_from_a_fresh_clone(tmp_path):
    wheel = _cpu_torch_wheel()
    if wheel is None:
        pytest.skip("no CPU torch wheel on this machine to build the stand-in PyTorch index from")
    if not os.access(DEBIAN_PY, os.X_OK):
        pytest.skip(f"{DEBIAN_PY} (a PEP 668 system Python) is not on this machine")
    index = tmp_path / "torch-index" / "torch"
    index.mkdir(parents=True)
    shutil.copy(wheel, index)
    name = Path(wheel).name
    (index / "index.html").write_text(f'<!DOCTYPE html><html><body><a href="{name}">{name}</a></body></html>\n')

    clone = tmp_path / "clone"
    subprocess.run(["git", "clone", "-q", str(ROOT), str(clone)], check=True)
    home = tmp_path / "home"
    home.mkdir()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PIP_", "VIRTUAL_ENV", "PYTHON"))}
    env.update(HOME=str(home), PIP_CONFIG_FILE=os.devnull, PY=DEBIAN_PY,
               TORCH_INDEX_URL=(tmp_path / "torch-index").as_uri(),
               # the demo models are data, not set-up: the ones this test session built (test_demo) are
               # reused, so that a CI run builds them once
               RACRO_FAST_CACHE=str(cache_root()))
    if "PIP_CERT" in os.environ:
        env["PIP_CERT"] = os.environ["PIP_CERT"]
    env["PATH"] = ":".join(p for p in env.get("PATH", "").split(":") if "pyenv" not in p and ".venv" not in p)

    # the system Python refuses a plain install: the set-up must not depend on it allowing one
    refused = subprocess.run([DEBIAN_PY, "-m", "pip", "install", "--dry-run", "six"], env=env, capture_output=True,
                             text=True)
    assert refused.returncode != 0 and "externally-managed" in refused.stdout + refused.stderr, refused

    t0 = time.perf_counter()
    run = subprocess.run(["make", "demo", "ARGS=train.steps=3 run.progress=false run.save_every=0"], cwd=clone,
                         env=env, capture_output=True, text=True, timeout=3000)
    seconds = time.perf_counter() - t0
    log = run.stdout + run.stderr
    print(log[-4000:])
    print(f"make demo from an empty cache: {seconds:.0f} s")
    assert run.returncode == 0, f"make demo failed (exit {run.returncode}):\n{log[-6000:]}"
    assert f"from {env['TORCH_INDEX_URL']}" in log, "torch did not come from TORCH_INDEX_URL:\n" + log[-3000:]
    assert "racro-fast setup: torch 2.13.0+cpu" in log, log[-3000:]
    assert (clone / ".venv" / "bin" / "racro-fast").exists()
    assert len((clone / "runs" / "demo" / "metrics.jsonl").read_text().splitlines()) == 3
