"""Benchmark fused_linear_logprob: ours vs eager torch, torch.compile and Liger's fused linear CE.

    python benchmarks/bench_fused_linear_logprob.py              # default shapes for this device
    python benchmarks/bench_fused_linear_logprob.py --quick      # tiny smoke run
    python benchmarks/bench_fused_linear_logprob.py --shapes 2048x1024x32000 --providers ours,torch --modes full --rounds 5

Providers: ours (kernels.fused_linear_logprob: Triton on CUDA, the chunked reference on CPU),
torch (h @ W.T, log_softmax in fp32, gather), compile (torch.compile of that), liger
(LigerFusedLinearCrossEntropyLoss, sum reduction: the closest peer; CUDA only). Modes: forward
(with autograd recording), backward (of a retained graph), full (both). On CUDA the run also
times one bf16 GEMM of the same shape and reports ours(full) / (4 GEMMs): the forward, the
backward's recompute, dh and dW are the 4 unavoidable [N, D] x [D, V]-sized products.
On CPU every measurement runs in a fresh subprocess so its peak RSS is its own (see common.py).
Rows go to benchmarks/results/fused_linear_logprob.csv; plot with benchmarks/plot.py.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import append_rows, measure, merge_rounds, print_table, round_ratios, run_isolated  # noqa: E402

KERNEL = "fused_linear_logprob"
PROVIDERS = ("ours", "torch", "compile", "liger")
MODES = ("forward", "backward", "full")
GPU_SHAPES = [(4096, 2048, 151936), (16384, 2048, 151936), (4096, 3584, 152064), (16384, 3584, 152064)]
CPU_SHAPES = [(2048, 1024, 32000)]
QUICK_SHAPES = [(256, 128, 1000)]
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def eager_logprob(h: torch.Tensor, W: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    logits = h @ W.t()
    return torch.log_softmax(logits.float(), dim=-1).gather(1, y[:, None]).squeeze(1)


def make_provider(name: str, h, W, y):
    """A zero-argument callable returning the differentiable output, or a reason it cannot run."""
    if name == "ours":
        from racro_fast.kernels import fused_linear_logprob

        return lambda: fused_linear_logprob(h, W, y)[0]
    if name == "torch":
        return lambda: eager_logprob(h, W, y)
    if name == "compile":
        compiled = torch.compile(eager_logprob, dynamic=False)
        return lambda: compiled(h, W, y)
    if name == "liger":
        if not h.is_cuda:
            return "liger runs on CUDA only"
        try:
            from liger_kernel.transformers import LigerFusedLinearCrossEntropyLoss
        except ImportError as e:
            return f"liger-kernel not importable ({e})"
        loss_fn = LigerFusedLinearCrossEntropyLoss(reduction="sum")
        return lambda: loss_fn(W, h, y)
    raise ValueError(f"unknown provider {name!r}")


def run_one(spec: dict) -> dict:
    """Time and peak memory of one (shape, dtype, provider, mode) in this process."""
    torch.set_num_threads(spec["threads"])
    N, D, V = spec["N"], spec["D"], spec["V"]
    dtype = DTYPES[spec["dtype"]]
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    gen = torch.Generator(device="cpu").manual_seed(0)
    # Scales of a real LM head: logits of order 1-10.
    h = torch.randn(N, D, generator=gen).to(device, dtype).requires_grad_()
    W = (torch.randn(V, D, generator=gen) / math.sqrt(D) * 3).to(device, dtype).requires_grad_()
    y = torch.randint(0, V, (N,), generator=gen).to(device)
    g = torch.randn(N, generator=gen).to(device)
    out = dict(spec)
    out["io_mb"] = (N * 4 + (N * D + V * D) * h.element_size() * (spec["mode"] != "forward")) / float(1 << 20)

    f = make_provider(spec["provider"], h, W, y)
    if isinstance(f, str):
        return dict(out, ms=float("nan"), peak_mb=float("nan"), note=f)

    def backward(lp: torch.Tensor) -> None:
        # autograd.grad, not .backward(): the grads are returned, never accumulated into .grad
        # (which would copy a gradient that an op hands back in the input's own storage).
        torch.autograd.grad(lp, (h, W), None if lp.dim() == 0 else g)

    try:
        setup = None
        if spec["mode"] == "forward":
            fn = f
        elif spec["mode"] == "backward":
            setup, fn = f, backward
        else:
            fn = lambda: backward(f())  # noqa: E731
        out.update(measure(fn, warmup=spec["warmup"], reps=spec["reps"], device=device, setup=setup))
    except Exception as e:  # a provider that cannot run here is reported, not fatal
        return dict(out, ms=float("nan"), peak_mb=float("nan"), note=f"{type(e).__name__}: {str(e)[:160]}")
    out["extra_mb"] = out["peak_mb"] - out["io_mb"]
    if device.type == "cuda" and spec["provider"] == "ours" and spec["mode"] == "full":
        del fn, f
        h2, W2 = h.detach(), W.detach()
        gemm = measure(lambda: torch.mm(h2, W2.t()), warmup=spec["warmup"], reps=spec["reps"], device=device)
        out["gemm_ms"] = gemm["ms"]
        out["gemm_tflops"] = 2 * N * D * V / gemm["ms"] / 1e9
        out["vs_4gemm"] = out["ms"] / (4 * gemm["ms"])
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shapes", default=None, help="NxDxV[,NxDxV...] (default: per device)")
    p.add_argument("--dtype", default=None, choices=sorted(DTYPES), help="default: bf16 on CUDA, fp32 on CPU")
    p.add_argument("--providers", default=",".join(PROVIDERS))
    p.add_argument("--modes", default=",".join(MODES))
    p.add_argument("--warmup", type=int, default=None)
    p.add_argument("--reps", type=int, default=None)
    p.add_argument("--quick", action="store_true", help="tiny shapes, 1 warm-up, 2 reps")
    p.add_argument("--rounds", type=int, default=1, help="repeat every measurement, providers interleaved; medians")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--csv", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", f"{KERNEL}.csv"))
    p.add_argument("--no-csv", action="store_true")
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        print(json.dumps(run_one(json.loads(args.worker))))
        return
    if args.threads:
        torch.set_num_threads(args.threads)  # also recorded in the CSV's device column

    cuda = torch.cuda.is_available()
    if args.shapes:
        shapes = [tuple(int(x) for x in s.split("x")) for s in args.shapes.split(",")]
    else:
        shapes = QUICK_SHAPES if args.quick else GPU_SHAPES if cuda else CPU_SHAPES
    dtype = args.dtype or ("bf16" if cuda else "fp32")
    warmup = args.warmup if args.warmup is not None else 1 if (args.quick or not cuda) else 5
    reps = args.reps if args.reps is not None else 2 if args.quick else 3 if not cuda else 20
    rounds = []
    for k in range(args.rounds):
        rows = []
        for N, D, V in shapes:
            for provider in args.providers.split(","):
                for mode in args.modes.split(","):
                    spec = dict(kernel=KERNEL, provider=provider, mode=mode, N=N, D=D, V=V, dtype=dtype,
                                warmup=warmup, reps=reps, threads=args.threads or torch.get_num_threads())
                    r = run_one(spec) if cuda else run_isolated(os.path.abspath(__file__), spec)
                    if cuda:
                        torch.cuda.empty_cache()
                    rows.append(r)
                    print(f"  round {k}: {provider:8s} {mode:8s} N={N} D={D} V={V}: {r['ms']:.2f} ms, "
                          f"peak {r['peak_mb']:.1f} MiB" + (f"  [{r['note']}]" if r.get("note") else ""), flush=True)
        rounds.append(rows)
    rows = merge_rounds(rounds)
    for r in rows:
        r["extra_mb"] = r["peak_mb"] - r["io_mb"]
        if "gemm_ms" in r:
            r["vs_4gemm"] = r["ms"] / (4 * r["gemm_ms"])
    print()
    print_table(rows, ["provider", "mode", "N", "D", "V", "dtype", "ms", "peak_mb", "extra_mb", "ms_rounds", "note"])
    for N, D, V in shapes:
        for mode in args.modes.split(","):
            def match(r: dict) -> bool:
                return (r["N"], r["D"], r["V"], r["mode"]) == (N, D, V, mode)

            sel = {r["provider"]: r for r in rows if match(r)}
            t_ratios = round_ratios(rounds, match, "ours", "torch")
            if t_ratios:
                o, t = sel["ours"], sel["torch"]
                print(f"ours / torch ({mode}, N={N} D={D} V={V}): time {statistics.median(t_ratios):.2f}x "
                      f"(per round: {' '.join(f'{x:.2f}' for x in t_ratios)}), "
                      f"peak memory {o['peak_mb'] / max(t['peak_mb'], 1e-9):.1%} ({o['peak_mb']:.0f} vs {t['peak_mb']:.0f} MiB)")
            if "ours" in sel and "vs_4gemm" in sel["ours"]:
                o = sel["ours"]
                print(f"ours full = {o['vs_4gemm']:.2f}x the 4 GEMMs ({o['gemm_ms']:.2f} ms each, "
                      f"{o['gemm_tflops']:.0f} TFLOP/s), memory beyond inputs/outputs/grads {o['extra_mb']:.0f} MiB")
    if not args.no_csv:
        append_rows(args.csv, rows)
        print(f"appended {len(rows)} rows to {args.csv}")


if __name__ == "__main__":
    main()
