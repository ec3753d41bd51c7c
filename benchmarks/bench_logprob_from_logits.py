"""Benchmark logprob_from_logits: ours vs eager torch, torch.compile and Liger's cross entropy.

    python benchmarks/bench_logprob_from_logits.py               # default shapes for this device
    python benchmarks/bench_logprob_from_logits.py --quick       # tiny smoke run
    python benchmarks/bench_logprob_from_logits.py --shapes 4096x151936 --providers ours,torch --modes nograd,full

Providers: ours (kernels.logprob_from_logits: Triton on CUDA, the chunked reference on CPU),
torch (log_softmax(logits.float()) + gather), compile (torch.compile of that), liger
(LigerCrossEntropyLoss, sum reduction, which also writes dlogits in place; CUDA only).
Modes: nograd (old / reference log-probs), forward (with autograd recording), backward (of a
retained graph), full. The logits tensor is the input: its memory is not counted, the gradient
that ours writes over it costs nothing. On CUDA the run also times a device-to-device copy of the
logits and reports each provider's GB/s (logits bytes read, plus written in backward) against it.
On CPU every measurement runs in a fresh subprocess so its peak RSS is its own (see common.py).
Rows go to benchmarks/results/logprob_from_logits.csv; plot with benchmarks/plot.py.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import append_rows, measure, merge_rounds, print_table, round_ratios, run_isolated  # noqa: E402

KERNEL = "logprob_from_logits"
PROVIDERS = ("ours", "torch", "compile", "liger")
MODES = ("nograd", "forward", "backward", "full")
GPU_SHAPES = [(4096, 151936), (16384, 151936), (4096, 152064), (16384, 152064)]
CPU_SHAPES = [(2048, 32000)]
QUICK_SHAPES = [(256, 1000)]
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def eager_logprob(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return torch.log_softmax(logits.float(), dim=-1).gather(1, y[:, None]).squeeze(1)


def make_provider(name: str, x, y):
    """A one-argument callable (the logits) returning the output, or a reason it cannot run."""
    if name == "ours":
        from racro_fast.kernels import logprob_from_logits

        return lambda x: logprob_from_logits(x, y)[0]
    if name == "torch":
        return lambda x: eager_logprob(x, y)
    if name == "compile":
        compiled = torch.compile(eager_logprob, dynamic=False)
        return lambda x: compiled(x, y)
    if name == "liger":
        if not x.is_cuda:
            return "liger runs on CUDA only"
        try:
            from liger_kernel.transformers import LigerCrossEntropyLoss
        except ImportError as e:
            return f"liger-kernel not importable ({e})"
        loss_fn = LigerCrossEntropyLoss(reduction="sum")
        return lambda x: loss_fn(x, y)
    raise ValueError(f"unknown provider {name!r}")


def run_one(spec: dict) -> dict:
    torch.set_num_threads(spec["threads"])
    N, V = spec["N"], spec["V"]
    dtype = DTYPES[spec["dtype"]]
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    gen = torch.Generator(device="cpu").manual_seed(0)
    base = (torch.randn(N, V, generator=gen) * 3).to(device, dtype)
    y = torch.randint(0, V, (N,), generator=gen).to(device)
    g = torch.randn(N, generator=gen).to(device)
    mode = spec["mode"]
    # A leaf that shares base's storage: ours overwrites it with dlogits, whose values (|.| <= 1)
    # are fine logits for the next repetition, so no per-repetition copy is timed.
    x = base.detach().requires_grad_(mode != "nograd")
    out = dict(spec)
    elt = base.element_size()
    read_bytes = N * V * elt
    out["bytes"] = {"nograd": read_bytes, "forward": read_bytes, "backward": 2 * read_bytes,
                    "full": 3 * read_bytes}[mode]

    f = make_provider(spec["provider"], x, y)
    if isinstance(f, str):
        return dict(out, ms=float("nan"), peak_mb=float("nan"), note=f)

    def backward(lp: torch.Tensor) -> None:
        # autograd.grad, not .backward(): the grads are returned, never accumulated into .grad
        # (which would copy a gradient that an op hands back in the input's own storage).
        torch.autograd.grad(lp, (x,), None if lp.dim() == 0 else g)

    try:
        setup = None
        if mode == "nograd":
            def fn():
                with torch.no_grad():
                    return f(x)
        elif mode == "forward":
            fn = lambda: f(x)  # noqa: E731
        elif mode == "backward":
            setup, fn = (lambda: f(x)), backward
        else:
            fn = lambda: backward(f(x))  # noqa: E731
        out.update(measure(fn, warmup=spec["warmup"], reps=spec["reps"], device=device, setup=setup))
    except Exception as e:  # a provider that cannot run here is reported, not fatal
        return dict(out, ms=float("nan"), peak_mb=float("nan"), note=f"{type(e).__name__}: {str(e)[:160]}")
    out["gb_s"] = out["bytes"] / out["ms"] / 1e6
    if device.type == "cuda":
        dst = torch.empty_like(base)
        copy = measure(lambda: dst.copy_(base), warmup=spec["warmup"], reps=spec["reps"], device=device)
        out["copy_gb_s"] = 2 * read_bytes / copy["ms"] / 1e6
        out["vs_copy"] = out["gb_s"] / out["copy_gb_s"]
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shapes", default=None, help="NxV[,NxV...] (default: per device)")
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
    reps = args.reps if args.reps is not None else 2 if args.quick else 5 if not cuda else 20
    rounds = []
    for k in range(args.rounds):
        rows = []
        for N, V in shapes:
            for provider in args.providers.split(","):
                for mode in args.modes.split(","):
                    spec = dict(kernel=KERNEL, provider=provider, mode=mode, N=N, V=V, dtype=dtype,
                                warmup=warmup, reps=reps, threads=args.threads or torch.get_num_threads())
                    r = run_one(spec) if cuda else run_isolated(os.path.abspath(__file__), spec)
                    if cuda:
                        torch.cuda.empty_cache()
                    rows.append(r)
                    print(f"  round {k}: {provider:8s} {mode:8s} N={N} V={V}: {r['ms']:.2f} ms, "
                          f"peak {r['peak_mb']:.1f} MiB" + (f"  [{r['note']}]" if r.get("note") else ""), flush=True)
        rounds.append(rows)
    rows = merge_rounds(rounds)
    for r in rows:
        r["gb_s"] = r["bytes"] / r["ms"] / 1e6
        if "copy_gb_s" in r:
            r["vs_copy"] = r["gb_s"] / r["copy_gb_s"]
    print()
    cols = ["provider", "mode", "N", "V", "dtype", "ms", "peak_mb", "gb_s"] + (["vs_copy"] if cuda else [])
    print_table(rows, cols + ["ms_rounds", "note"])
    for N, V in shapes:
        for mode in args.modes.split(","):
            def match(r: dict) -> bool:
                return (r["N"], r["V"], r["mode"]) == (N, V, mode)

            sel = {r["provider"]: r for r in rows if match(r)}
            t_ratios = round_ratios(rounds, match, "ours", "torch")
            if t_ratios:
                o, t = sel["ours"], sel["torch"]
                print(f"ours / torch ({mode}, N={N} V={V}): time {statistics.median(t_ratios):.2f}x "
                      f"(per round: {' '.join(f'{x:.2f}' for x in t_ratios)}), "
                      f"peak memory {o['peak_mb']:.0f} vs {t['peak_mb']:.0f} MiB")
    if not args.no_csv:
        append_rows(args.csv, rows)
        print(f"appended {len(rows)} rows to {args.csv}")


if __name__ == "__main__":
    main()
