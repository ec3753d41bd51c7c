"""Benchmark fused_linear_logprob: ours vs eager torch, torch.compile and Liger's fused linear paths.

    python benchmarks/bench_fused_linear_logprob.py              # default shapes for this device
    python benchmarks/bench_fused_linear_logprob.py --quick      # tiny smoke run
    python benchmarks/bench_fused_linear_logprob.py --shapes 2048x1024x32000 --providers ours,torch --modes full --rounds 5

Providers: ours (kernels.fused_linear_logprob: Triton on CUDA; on CPU ATen GEMMs on tiles with
the C++ epilogues between them), ours_torch (the same op on its chunked torch reference), torch
(h @ W.T, log_softmax in fp32, gather), compile (torch.compile of that), liger
(LigerFusedLinearCrossEntropyLoss, sum reduction: the closest peer, it too never keeps the
logits; CUDA only), liger_grpo (LigerFusedLinearGRPOLoss: Liger's fused linear GRPO loss, whose
log-probs come from a sequence x vocab chunked torch loop; on-policy, no KL, so beyond the
log-probs it adds only elementwise loss math on [N]; runs on CPU too). Both Liger providers
compute their gradients during the forward, so against them only the full mode compares. Modes: forward
(with autograd recording), backward (of a retained graph), full (both). On CUDA the run also
times one bf16 GEMM of the same shape and reports ours(full) / (4 GEMMs): the forward, the
backward's recompute, dh and dW are the 4 unavoidable [N, D] x [D, V]-sized products.
On CPU every measurement runs in a fresh subprocess so its peak RSS is its own (see common.py).
Rows go to benchmarks/results/fused_linear_logprob.csv; plot with benchmarks/plot.py.
"""
from __future__ import annotations

import math
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import derive_gemm_floor, gemm_floor, gemm_floor_lines, measure, peak_text, run_benchmark  # noqa: E402

KERNEL = "fused_linear_logprob"
PROVIDERS = ("ours", "ours_torch", "torch", "compile", "liger", "liger_grpo")
N_GEMMS = 4  # [N, D] x [D, V] products the op cannot avoid: forward, recompute, dh, dW
MODES = ("forward", "backward", "full")
GPU_SHAPES = [(4096, 2048, 151936), (16384, 2048, 151936), (4096, 3584, 152064), (16384, 3584, 152064)]
CPU_SHAPES = [(2048, 1024, 32000)]
QUICK_SHAPES = [(256, 128, 1000)]
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def eager_logprob(h: torch.Tensor, W: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    logits = h @ W.t()
    return torch.log_softmax(logits.float(), dim=-1).gather(1, y[:, None]).squeeze(1)


def make_provider(name: str, h, W, y, interpreted: bool = False):
    """A zero-argument callable returning the differentiable output, or a reason it cannot run.

    interpreted: let Liger's Triton kernels run on CPU tensors under TRITON_INTERPRET=1 (tests
    check that each provider computes what ours does; never for timing).
    """
    if name == "ours":
        from racro_fast.kernels import fused_linear_logprob

        return lambda: fused_linear_logprob(h, W, y)[0]
    if name == "ours_torch":
        from racro_fast.kernels import fused_linear_logprob

        return lambda: fused_linear_logprob(h, W, y, backend="torch")[0]
    if name == "torch":
        return lambda: eager_logprob(h, W, y)
    if name == "compile":
        compiled = torch.compile(eager_logprob, dynamic=False)
        return lambda: compiled(h, W, y)
    if name == "liger":
        if not (h.is_cuda or interpreted):
            return "liger runs on CUDA only"
        try:
            from liger_kernel.transformers import LigerFusedLinearCrossEntropyLoss
        except ImportError as e:
            return f"liger-kernel not importable ({e})"
        loss_fn = LigerFusedLinearCrossEntropyLoss(reduction="sum")
        return lambda: loss_fn(W, h, y)
    if name == "liger_grpo":
        try:
            from liger_kernel.chunked_loss import LigerFusedLinearGRPOLoss
        except ImportError as e:
            return f"liger-kernel not importable ({e})"
        # Token-mean ("bnpo"), beta 0 and no old log-probs: the loss is -mean(A exp(logp - sg(logp))),
        # whose gradient is -A/N times that of sum(logp). Loss math compiled on CUDA (Liger's default).
        loss_fn = LigerFusedLinearGRPOLoss(beta=0.0, use_ref_model=False, loss_type="bnpo", compiled=h.is_cuda)
        mask = torch.ones(1, h.shape[0], device=h.device)
        adv = torch.ones(1, device=h.device)
        return lambda: loss_fn(h[None], W, y[None], mask, adv)[0]
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
        gemm_floor(out, h, W, spec, N_GEMMS)
    return out


def derive(r: dict) -> None:
    derive_gemm_floor(r, N_GEMMS)


def gemm_lines(sel: dict[str, dict]) -> list[str]:
    return gemm_floor_lines(sel, N_GEMMS)


def main() -> None:
    run_benchmark(os.path.abspath(__file__), __doc__, run_one, kernel=KERNEL, dims="NDV", dtypes=DTYPES,
                  providers=PROVIDERS, modes=MODES, gpu_shapes=GPU_SHAPES, cpu_shapes=CPU_SHAPES,
                  quick_shapes=QUICK_SHAPES, cpu_reps=3, derive=derive, columns=["extra_mb"],
                  peak_text=peak_text, extra_lines=gemm_lines)


if __name__ == "__main__":
    main()
