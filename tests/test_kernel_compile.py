"""The Triton kernels compiled for real GPUs (sm_90 H100, sm_80 A100) with the bundled ptxas.

No GPU is needed: benchmarks/compile_report.py compiles every launch of the ops' wrappers for the
target, with the launch settings and specialisation the GPU would get. These tests catch what the
interpreter cannot: kernels that do not compile for a real target, register spills, shared memory
over the limit, and a GEMM kernel that lost its tensor cores or its pipelined loads.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow  # compile reports

ROOT = Path(__file__).resolve().parents[1]
KERNELS = {
    "fused_linear_logprob_fwd", "fused_linear_logprob_bwd", "logprob_from_logits_fwd", "logprob_from_logits_bwd",
    "grpo_loss_fwd", "grpo_loss_reduce", "grpo_loss_bwd",
}
# (arch, SM count, tensor-core instruction of a bf16 tl.dot, shared memory per program)
TARGETS = {90: (132, "wgmma.mma_async", 227 << 10), 80: (108, "mma.sync", 163 << 10)}


@pytest.fixture(scope="module", params=sorted(TARGETS), ids=lambda a: f"sm_{a}")
def rows(request) -> tuple[int, list[dict]]:
    arch = request.param
    code = ("import json, sys; sys.path.insert(0, 'benchmarks'); import compile_report as c; "
            f"print(json.dumps(c.report({arch}, {TARGETS[arch][0]})))")
    # The kernels must be decorated with the interpreter off, so this runs in its own process.
    env = dict(os.environ, TRITON_INTERPRET="0")
    out = subprocess.run([sys.executable, "-P", "-W", "ignore", "-c", code], cwd=ROOT, env=env,
                         capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-4000:]
    return arch, json.loads(out.stdout.strip().splitlines()[-1])


def test_every_kernel_compiles(rows):
    arch, rows = rows
    assert {r["kernel"] for r in rows} == KERNELS
    assert all(r["arch"] == f"sm_{arch}" for r in rows)


def test_no_register_spills(rows):
    _, rows = rows
    spilled = [(r["kernel"], r["variant"], r["spills"]) for r in rows if r["spills"] or r["stack"]]
    assert not spilled, f"kernels that spill registers (kernel, variant, spill stores): {spilled}"


def test_shared_memory_fits(rows):
    arch, rows = rows
    limit_kb = TARGETS[arch][2] / 1024
    over = [(r["kernel"], r["variant"], r["smem_kb"]) for r in rows if r["smem_kb"] > limit_kb]
    assert not over, f"over {limit_kb} KB of shared memory: {over}"


def test_fused_gemm_uses_tensor_cores_and_pipelined_loads(rows):
    arch, rows = rows
    fused = [r for r in rows if r["op"] == "fused_linear_logprob"]
    assert fused
    for r in fused:
        # fp32 keeps true fp32 products (as torch's default matmul does), so no tensor cores.
        expected = "fma" if r["variant"].startswith("fp32") else TARGETS[arch][1]
        assert r["mma"] == expected, r
        assert r["pipelined"] is True, r
