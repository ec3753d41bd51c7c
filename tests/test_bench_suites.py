"""The pytest-benchmark suites: one op's benchmarks run once each as plain tests (a few seconds), and
the comparison of two saved runs fails on a ratio to eager that grew, not on absolute times."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "benchmarks"))

import compare_ratios  # noqa: E402


def test_suite_runs_once_as_plain_tests():
    out = subprocess.run([sys.executable, "-P", "-m", "pytest", "-q", "-p", "no:cacheprovider", "benchmarks",
                          "--benchmark-disable", "-k", "grpo_loss and (ours or torch)"], cwd=ROOT,
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-2000:]
    assert "2 passed" in out.stdout, out.stdout[-2000:]


def _run(path: Path, ratios: dict[str, float]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"benchmarks": [
        {"name": name, "stats": {"median": 123.0}, "extra_info": {"ratio_to_eager": r}} for name, r in ratios.items()]}))


def test_compare_fails_on_a_ratio_that_grew(tmp_path, capsys):
    ours, compiled = "test_bench[grpo_loss-ours]", "test_bench[grpo_loss-compile]"
    _run(tmp_path / "Linux-CPython" / "0001_a.json", {ours: 0.50, compiled: 0.9})
    # every absolute time may change with the machine; only the ratio counts: 0.50 -> 0.55 is within 25%
    _run(tmp_path / "Linux-CPython" / "0002_b.json", {ours: 0.55, compiled: 2.0})
    assert compare_ratios.main(["--storage", str(tmp_path)]) == 0
    _run(tmp_path / "Linux-CPython" / "0003_c.json", {ours: 0.75, compiled: 0.9})
    assert compare_ratios.main(["--storage", str(tmp_path)]) == 1
    assert "REGRESSION" in capsys.readouterr().out
    assert compare_ratios.main(["--storage", str(tmp_path / "none")]) == 2
