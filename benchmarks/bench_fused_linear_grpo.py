"""Benchmark fused_linear_grpo (hidden states -> GRPO loss, gradients in the forward) against the
unfused paths, forward + backward.

    python benchmarks/bench_fused_linear_grpo.py                 # default shapes for this device
    python benchmarks/bench_fused_linear_grpo.py --quick
    python benchmarks/bench_fused_linear_grpo.py --shapes 2048x1024x32000 --providers ours,torch,liger_grpo --rounds 3

Every provider computes the same loss: on-policy GRPO (ratio 1), token-mean, no KL, advantages 1
(Liger's "bnpo" with beta 0), so its gradient is that of -mean(logp). Providers: ours
(kernels.fused_linear_grpo: 3 GEMMs, one [chunk, V] logits tile; on CPU its epilogue is one C++
call per chunk), ours_torch (the same op with the torch epilogue, the CPU path without the C++
kernels), two_ops (our previous update
path: fused_linear_logprob + grpo_loss, 4 GEMMs), torch (eager: full logits, log_softmax in fp32,
gather, the torch loss), compile (torch.compile of that), liger_grpo (LigerFusedLinearGRPOLoss, a
chunked torch loop; runs on CPU too). Only the full mode (forward + backward) is measured: ours and
Liger compute their gradients in the forward. On CUDA the run also times one GEMM of the shape and
reports ours / (3 GEMMs). On CPU each measurement runs in a fresh subprocess (see common.py).
Rows go to benchmarks/results/fused_linear_grpo.csv.
"""
from __future__ import annotations

import math
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import derive_gemm_floor, gemm_floor, gemm_floor_lines, measure, peak_text, run_benchmark  # noqa: E402

KERNEL = "fused_linear_grpo"
PROVIDERS = ("ours", "ours_torch", "two_ops", "torch", "compile", "liger_grpo")
N_GEMMS = 3  # [N, D] x [D, V] products the op cannot avoid: logits, dh, dW
MODES = ("full",)
GPU_SHAPES = [(4096, 3584, 152064), (16384, 3584, 152064)]
CPU_SHAPES = [(2048, 1024, 32000)]
QUICK_SHAPES = [(256, 128, 1000)]
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def make_provider(name: str, h, W, y):
    """A zero-argument callable returning the scalar loss, or the reason it cannot run here."""
    from racro_fast.kernels import GRPOLossConfig, fused_linear_grpo, fused_linear_logprob, grpo_loss
    N = h.shape[0]
    cfg = GRPOLossConfig()  # token-mean, clip 0.2, no KL
    mask = torch.ones(1, N, dtype=torch.bool, device=h.device)
    adv1 = torch.ones(1, device=h.device)
    if name == "ours":
        return lambda: fused_linear_grpo(h, W, y, None, None, adv1, mask, cfg)[0]
    if name == "ours_torch":
        return lambda: fused_linear_grpo(h, W, y, None, None, adv1, mask, cfg, backend="torch")[0]
    if name == "two_ops":
        return lambda: grpo_loss(fused_linear_logprob(h, W, y)[0][None], None, None, adv1, mask, cfg)[0]

    def eager():
        lp = torch.log_softmax((h @ W.t()).float(), dim=-1).gather(1, y[:, None]).squeeze(1)
        return grpo_loss(lp[None], None, None, adv1, mask, cfg, backend="torch")[0]

    if name == "torch":
        return eager
    if name == "compile":
        return torch.compile(eager, dynamic=False)
    if name == "liger_grpo":
        try:
            from liger_kernel.chunked_loss import LigerFusedLinearGRPOLoss
        except ImportError as e:
            return f"liger-kernel not importable ({e})"
        loss_fn = LigerFusedLinearGRPOLoss(beta=0.0, use_ref_model=False, loss_type="bnpo", compiled=h.is_cuda)
        return lambda: loss_fn(h[None], W, y[None], mask.float(), adv1)[0]
    raise ValueError(f"unknown provider {name!r}")


def run_one(spec: dict) -> dict:
    torch.set_num_threads(spec["threads"])
    N, D, V = spec["N"], spec["D"], spec["V"]
    dtype = DTYPES[spec["dtype"]]
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    gen = torch.Generator(device="cpu").manual_seed(0)
    h = torch.randn(N, D, generator=gen).to(device, dtype).requires_grad_()
    W = (torch.randn(V, D, generator=gen) / math.sqrt(D) * 3).to(device, dtype).requires_grad_()
    y = torch.randint(0, V, (N,), generator=gen).to(device)
    out = dict(spec)
    out["io_mb"] = (N * 4 + (N * D + V * D) * h.element_size()) / float(1 << 20)  # targets + both grads
    f = make_provider(spec["provider"], h, W, y)
    if isinstance(f, str):
        return dict(out, ms=float("nan"), peak_mb=float("nan"), note=f)
    try:
        out.update(measure(lambda: torch.autograd.grad(f(), (h, W)), warmup=spec["warmup"], reps=spec["reps"],
                           device=device))
    except Exception as e:  # a provider that cannot run here is reported, not fatal
        return dict(out, ms=float("nan"), peak_mb=float("nan"), note=f"{type(e).__name__}: {str(e)[:160]}")
    out["extra_mb"] = out["peak_mb"] - out["io_mb"]
    if device.type == "cuda" and spec["provider"] == "ours":
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
