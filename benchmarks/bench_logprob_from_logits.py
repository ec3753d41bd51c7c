"""Benchmark logprob_from_logits: ours vs eager torch, torch.compile and Liger's cross entropy.

    python benchmarks/bench_logprob_from_logits.py               # default shapes for this device
    python benchmarks/bench_logprob_from_logits.py --quick       # tiny smoke run
    python benchmarks/bench_logprob_from_logits.py --shapes 4096x151936 --providers ours,torch --modes nograd,full

Providers: ours (kernels.logprob_from_logits: Triton on CUDA, the C++ kernel on CPU), ours_torch
(the same op on its chunked torch reference, the CPU path without the C++ kernels), torch
(log_softmax(logits.float()) + gather), compile (torch.compile of that), liger
(LigerCrossEntropyLoss, sum reduction, which also writes dlogits in place; CUDA only), liger_sls
(liger_kernel.ops.grpo_loss.fused_selective_log_softmax, Liger's no-grad log-probs for old and
reference policies; nograd mode only, CUDA only; it reads logits [B, L+1, V] and scores the
next token, so it gets the N rows as [1, N, V] and computes N - 1 of them).
Modes: nograd (old / reference log-probs), forward (with autograd recording), backward (of a
retained graph), full. The logits tensor is the input: its memory is not counted, the gradient
that ours writes over it costs nothing. On CUDA the run also times a device-to-device copy of the
logits and reports each provider's GB/s (logits bytes read, plus written in backward) against it.
On CPU every measurement runs in a fresh subprocess so its peak RSS is its own (see common.py).
Rows go to benchmarks/results/logprob_from_logits.csv; plot with benchmarks/plot.py.
"""
from __future__ import annotations

import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import measure, run_benchmark  # noqa: E402

KERNEL = "logprob_from_logits"
PROVIDERS = ("ours", "ours_torch", "torch", "compile", "liger", "liger_sls")
MODES = ("nograd", "forward", "backward", "full")
GPU_SHAPES = [(4096, 151936), (16384, 151936), (4096, 152064), (16384, 152064)]
CPU_SHAPES = [(2048, 32000)]
QUICK_SHAPES = [(256, 1000)]
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def eager_logprob(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return torch.log_softmax(logits.float(), dim=-1).gather(1, y[:, None]).squeeze(1)


def make_provider(name: str, x, y, mode: str, interpreted: bool = False):
    """A one-argument callable (the logits) returning the output, or a reason it cannot run.

    interpreted: let Liger's Triton kernels run on CPU tensors under TRITON_INTERPRET=1 (tests
    check that each provider computes what ours does; never for timing).
    """
    if name == "ours":
        from racro_fast.kernels import logprob_from_logits

        return lambda x: logprob_from_logits(x, y)[0]
    if name == "ours_torch":
        from racro_fast.kernels import logprob_from_logits

        return lambda x: logprob_from_logits(x, y, backend="torch")[0]
    if name == "torch":
        return lambda x: eager_logprob(x, y)
    if name == "compile":
        compiled = torch.compile(eager_logprob, dynamic=False)
        return lambda x: compiled(x, y)
    if name in ("liger", "liger_sls"):
        if not (x.is_cuda or interpreted):
            return "liger runs on CUDA only"
        if name == "liger_sls" and mode != "nograd":
            return "liger_sls has no gradient: nograd mode only"
        try:
            from liger_kernel.ops.grpo_loss import fused_selective_log_softmax
            from liger_kernel.transformers import LigerCrossEntropyLoss
        except ImportError as e:
            return f"liger-kernel not importable ({e})"
        if name == "liger_sls":
            # Row t scores ids[t + 1]: rolling the targets by one makes row t score y[t].
            ids = torch.roll(y, 1)[None]
            return lambda x: fused_selective_log_softmax(x[None], ids, temperature=1.0)[0]
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

    f = make_provider(spec["provider"], x, y, mode)
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


def derive(r: dict) -> None:
    """Columns that follow from the median of ms."""
    r["gb_s"] = r["bytes"] / r["ms"] / 1e6
    if "copy_gb_s" in r:
        r["vs_copy"] = r["gb_s"] / r["copy_gb_s"]


def main() -> None:
    columns = ["gb_s"] + (["vs_copy"] if torch.cuda.is_available() else [])
    run_benchmark(os.path.abspath(__file__), __doc__, run_one, kernel=KERNEL, dims="NV", dtypes=DTYPES,
                  providers=PROVIDERS, modes=MODES, gpu_shapes=GPU_SHAPES, cpu_shapes=CPU_SHAPES,
                  quick_shapes=QUICK_SHAPES, cpu_reps=5, derive=derive, columns=columns,
                  peak_text=lambda o, t: f"{o['peak_mb']:.0f} vs {t['peak_mb']:.0f} MiB")


if __name__ == "__main__":
    main()
