"""What the Triton kernels compile to on a GPU, without the GPU: registers, spills, shared memory.

Each op's Python wrapper runs on small CPU tensors while every Triton launch in it is replaced by
a compile for the target (default sm_90a, an H100). A launch is specialised exactly as the JIT
would specialise it on the GPU (the JIT's own binder: dtypes, 16-byte alignment, ints divisible
by 16 or equal to 1, the constexprs) with the launch settings the wrappers pick for that GPU.
Then ptxas (bundled with Triton) builds the cubin, and cuobjdump reads its resources:

    regs      registers per thread (255 is the ceiling)
    spills    local-memory stores in the SASS (STL): register spills, each a round trip to memory
    smem_kb   shared memory per program (H100: at most 227 KB)
    mma       the instruction of a tl.dot: wgmma on Hopper, mma.sync on Ampere, fma without tensor
              cores (fp32 inputs, which keep true fp32 products)
    pipelined whether the loads feeding tl.dot are asynchronous copies (cp.async / TMA)

    TRITON_INTERPRET=0 python benchmarks/compile_report.py [--arch 90] [--sms 132] [--no-csv]

Rows go to benchmarks/results/compile_report.csv with the Triton version and the target. The
kernels must not have been decorated under TRITON_INTERPRET=1 (it is forced to 0 here).
"""
from __future__ import annotations

import os

os.environ["TRITON_INTERPRET"] = "0"

import argparse
import contextlib
import re
import subprocess
import sys
import tempfile
from collections.abc import Callable, Iterator

import torch
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource, make_backend
from triton.runtime.jit import JITFunction, create_function_from_signature

from racro_fast.kernels import GRPOLossConfig, fused_linear_logprob, grpo_loss, logprob_from_logits
from racro_fast.kernels import utils as kernel_utils

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import append_rows, print_table  # noqa: E402

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", "compile_report.csv")
CUOBJDUMP = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
# Shared memory one program may use: 227 KB on H100 (sm_90), 163 KB on A100 (sm_80).
MAX_SMEM = {90: 227 << 10, 80: 163 << 10}


def compile_launch(fn: JITFunction, args: tuple, kwargs: dict, target: GPUTarget):
    """Compile one launch `fn[grid](*args, **kwargs)` for `target`, specialised as JITFunction.run does."""
    kwargs = dict(kwargs, debug=kwargs.get("debug", False))
    backend = make_backend(target)
    binder = create_function_from_signature(fn.signature, fn.params, backend)
    bound_args, specialization, options = binder(*args, **kwargs)
    options, signature, constexprs, attrs = fn._pack_args(backend, kwargs, bound_args, specialization, options)
    return triton.compile(ASTSource(fn, signature, constexprs, attrs), target=target, options=options.__dict__)


def resources(kernel) -> dict:
    """Registers, spill stores, shared memory and the dot's instructions of a compiled kernel."""
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(kernel.asm["cubin"])
        f.flush()
        usage = subprocess.run([CUOBJDUMP, "-res-usage", f.name], capture_output=True, text=True, check=True).stdout
        sass = subprocess.run([CUOBJDUMP, "-sass", f.name], capture_output=True, text=True, check=True).stdout
    ptx = kernel.asm["ptx"]
    has_dot = "tt.dot" in kernel.asm["ttir"]
    mma = re.search(r"\b(wgmma\.mma_async|mma\.sync|tcgen05\.mma)", ptx)
    return dict(
        regs=int(re.search(r"REG:(\d+)", usage).group(1)),
        spills=len(re.findall(r"\bSTL(\.\w+)*\s", sass)),
        stack=int(re.search(r"STACK:(\d+)", usage).group(1)),
        smem_kb=round(kernel.metadata.shared / 1024, 1),
        mma=mma.group(1) if mma else "fma" if has_dot else "",
        pipelined=bool(re.search(r"cp\.async|tensormap", ptx)) if has_dot else "",
    )


@contextlib.contextmanager
def compiling_for(target: GPUTarget, n_sm: int) -> Iterator[list[tuple[JITFunction, dict, object]]]:
    """Within the block, Triton launches compile for `target` instead of running.

    Yields the list that collects (kernel, constexprs and options of the launch, compiled kernel).
    Outputs of the skipped launches stay uninitialised: the wrappers' results are meaningless.
    """
    compiled: list[tuple[JITFunction, dict, object]] = []

    def run(self, *args, grid, warmup, **kwargs):
        names = [p.name for p in self.params]
        consts = {k: v for k, v in kwargs.items() if k not in names or self.params[names.index(k)].is_constexpr}
        compiled.append((self, consts, compile_launch(self, args, kwargs, target)))

    real_run = JITFunction.run
    JITFunction.run = run
    kernel_utils.compile_only_gpu = (target.arch // 10, n_sm)
    try:
        yield compiled
    finally:
        JITFunction.run = real_run
        kernel_utils.compile_only_gpu = None


# --------------------------------------------------------------------------------------------
# The launches: each op at the settings its GPU shapes get (tile settings depend only on dtype;
# row kernels on the row length, so V and T are the real ones).
# --------------------------------------------------------------------------------------------

def _fused(dtype: torch.dtype, with_entropy: bool) -> None:
    N, D, V = 256, 256, 1024  # all multiples of 16, as 16384, 3584, 152064 are
    h = torch.randn(N, D, dtype=dtype, requires_grad=True)
    w = torch.randn(V, D, dtype=dtype, requires_grad=True)
    logp, H = fused_linear_logprob(h, w, torch.randint(0, V, (N,)), with_entropy=with_entropy, backend="triton")
    (logp.sum() + (H.sum() if with_entropy else 0)).backward()


def _from_logits(dtype: torch.dtype, with_entropy: bool) -> None:
    N, V = 4, 152064
    x = torch.randn(N, V, dtype=dtype, requires_grad=True)
    logp, H = logprob_from_logits(x, torch.randint(0, V, (N,)), with_entropy=with_entropy, backend="triton")
    (logp.sum() + (H.sum() if with_entropy else 0)).backward()


def _grpo(cfg: GRPOLossConfig, with_entropy: bool) -> None:
    B, T = 8, 2048
    logp = torch.randn(B, T, requires_grad=True)
    ent = torch.rand(B, T, requires_grad=True) if with_entropy else None
    loss, _ = grpo_loss(logp, torch.randn(B, T), torch.randn(B, T), torch.randn(B), torch.ones(B, T, dtype=torch.bool),
                        cfg, entropy=ent, backend="triton")
    loss.backward()


CASES: list[tuple[str, str, Callable[[], None]]] = [
    ("fused_linear_logprob", "bf16", lambda: _fused(torch.bfloat16, False)),
    ("fused_linear_logprob", "bf16 +entropy", lambda: _fused(torch.bfloat16, True)),
    ("fused_linear_logprob", "fp16", lambda: _fused(torch.float16, False)),
    ("fused_linear_logprob", "fp32", lambda: _fused(torch.float32, False)),
    ("fused_linear_logprob", "fp32 +entropy", lambda: _fused(torch.float32, True)),
    ("logprob_from_logits", "bf16 +entropy", lambda: _from_logits(torch.bfloat16, True)),
    ("logprob_from_logits", "fp32", lambda: _from_logits(torch.float32, False)),
    ("grpo_loss", "k3 token-mean", lambda: _grpo(GRPOLossConfig(kl_coef=0.001), False)),
    ("grpo_loss", "k1 dual-clip +entropy seq-mean", lambda: _grpo(
        GRPOLossConfig(kl_coef=0.01, kl_type="k1", dual_clip=3.0, entropy_coef=0.01, loss_agg="seq-mean-token-mean"),
        True)),
]


def report(arch: int = 90, n_sm: int = 132, cases=CASES) -> list[dict]:
    """One row per distinct kernel specialisation launched by `cases`, compiled for sm_<arch>."""
    target = GPUTarget("cuda", arch, 32)
    rows, seen = [], set()
    for op, variant, call in cases:
        with compiling_for(target, n_sm) as compiled:
            call()
        for fn, consts, kernel in compiled:
            key = (fn.__name__, kernel.hash)
            if key in seen:
                continue
            seen.add(key)
            blocks = "x".join(str(v) for k, v in consts.items() if k.startswith("BLOCK"))
            rows.append(dict(op=op, variant=variant, kernel=fn.__name__.strip("_").removesuffix("_kernel"),
                             blocks=blocks, warps=consts.get("num_warps", 4), stages=consts.get("num_stages", ""),
                             **resources(kernel), arch=f"sm_{arch}", triton=triton.__version__))
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--arch", type=int, default=90, choices=sorted(MAX_SMEM), help="compute capability x 10")
    ap.add_argument("--sms", type=int, default=132, help="SM count the launch settings assume (H100 SXM: 132)")
    ap.add_argument("--no-csv", action="store_true", help="print only")
    args = ap.parse_args()
    rows = report(args.arch, args.sms)
    print_table(rows, ["op", "variant", "kernel", "blocks", "warps", "stages", "regs", "spills", "stack",
                       "smem_kb", "mma", "pipelined"])
    if not args.no_csv:
        append_rows(RESULTS, rows)
        print(f"appended {len(rows)} rows to {RESULTS}")


if __name__ == "__main__":
    main()
