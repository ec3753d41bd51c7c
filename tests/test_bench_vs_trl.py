"""bench_vs_trl.py end to end on the tiny test models: both sides train, each in its own process,
and the run ends with the JSON line the README reads (a smoke run: one step each)."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow  # a benchmark smoke run

ROOT = Path(__file__).resolve().parent.parent


def test_bench_vs_trl_smoke(tiny_captioner_dir, tiny_reasoner_dir):
    pytest.importorskip("trl")
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "bench_vs_trl.py"), "--captioner",
                           str(tiny_captioner_dir), "--reasoner", str(tiny_reasoner_dir), "--steps", "1", "--warmup",
                           "0", "--seeds", "0", "--group", "2", "--questions", "2", "--rows-n", "8", "--no-csv"],
                          capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads(proc.stdout.strip().splitlines()[-1])
    for key in ("step_speedup_vs_trl", "memory_vs_trl", "reward_ours", "reward_trl", "grade_speedup_vs_trl"):
        assert key in summary and summary[key] == summary[key], (key, summary)  # present and not NaN
    assert summary["step_speedup_vs_trl"] > 0 and summary["memory_vs_trl"] > 0
    assert 0.0 <= summary["reward_ours"] <= 1.0 and 0.0 <= summary["reward_trl"] <= 1.0
