"""benchmarks/bench_step.py runs end to end on a tiny model and ends with its JSON summary line,
in which the packed and padded updates give the same gradients."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow  # a benchmark smoke run

ROOT = Path(__file__).resolve().parent.parent


def test_bench_step_quick():
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "bench_step.py"), "--quick", "--no-csv",
                           "--reps", "1", "--warmup", "0"], capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads(proc.stdout.strip().splitlines()[-1])
    assert summary["grads_match"] is True, summary
    for key in ("speedup_vs_padded", "speedup_vs_trl", "memory_vs_padded", "tokens_per_s"):
        assert key in summary and summary[key] == summary[key], (key, summary)  # present and not NaN
