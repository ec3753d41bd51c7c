"""Token log-probs (and entropy) from given logits, one streaming pass per row.

    z = logits / t,  lse = logsumexp(z),  logp[n] = z[n, y_n] - lse[n]
    H[n] = lse[n] - sum_j softmax(z[n])_j z[n, j]
    dlogits[n, j] = (g[n] (onehot(y_n)_j - p[n, j]) - gH[n] p[n, j] (log p[n, j] + H[n])) / t

with g = dL/dlogp and gH = dL/dH (zero on rows whose target is ignore_index).

The forward kernel walks each row once with an online max / sum of exp / sum of exp * (z - max)
and saves only lse and H ([N] each). Without grad (old and reference log-probs) that is all there
is. With grad, the backward kernel recomputes p from the logits and writes dlogits over them in
place: the [N, V] gradient costs no memory, and the caller must not use the logits after backward.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from . import cpu_ops
from .reference import logprob_from_logits_ref
from .utils import check_backend, check_float_matrix, check_targets, check_temperature, row_launch_settings

__all__ = ["logprob_from_logits"]

# Start of the running max: finite, so a block of only -inf logits gives exp(-inf) = 0, never
# exp(-inf - -inf) = NaN; every real logit is far above it.
_M_FLOOR = -3.0e38


@triton.jit
def _logprob_from_logits_fwd_kernel(
    X_ptr, Y_ptr, LOGP_ptr, LSE_ptr, ENT_ptr,
    V, stride_xn, stride_xv, temperature,
    WITH_ENTROPY: tl.constexpr, M_FLOOR: tl.constexpr, BLOCK_SIZE: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)  # row * stride passes 2^31 at N = 16k, V = 152k
    X_row = X_ptr + row * stride_xn
    y = tl.load(Y_ptr + row)
    m = M_FLOOR
    s = 0.0
    a = 0.0  # sum exp(z - m) (z - m), kept relative to the running max m
    zy = 0.0
    for v0 in range(0, V, BLOCK_SIZE):
        cols = v0 + tl.arange(0, BLOCK_SIZE)
        mask = cols < V
        z = tl.load(X_row + cols * stride_xv, mask=mask, other=float("-inf")).to(tl.float32) / temperature
        m_new = tl.maximum(m, tl.max(z, axis=0))
        alpha = tl.exp(m - m_new)
        zc = z - m_new
        e = tl.exp(zc)
        if WITH_ENTROPY:
            # -inf logits (and padding) have e = 0 and zc = -inf: excluded, not 0 * -inf.
            a = alpha * (a + (m - m_new) * s) + tl.sum(e * tl.where(e > 0, zc, 0.0), axis=0)
        s = s * alpha + tl.sum(e, axis=0)
        m = m_new
        zy += tl.sum(tl.where(cols == y, z, 0.0), axis=0)
    log_s = tl.log(s)
    lse = m + log_s
    valid = y >= 0
    tl.store(LOGP_ptr + row, tl.where(valid, zy - lse, 0.0))
    tl.store(LSE_ptr + row, lse)
    if WITH_ENTROPY:
        tl.store(ENT_ptr + row, tl.where(valid, log_s - a / s, 0.0))


@triton.jit
def _logprob_from_logits_bwd_kernel(
    X_ptr, Y_ptr, LSE_ptr, ENT_ptr, G_ptr, GH_ptr,
    V, stride_xn, stride_xv, temperature,
    WITH_ENTROPY: tl.constexpr, BLOCK_SIZE: tl.constexpr,
):
    """Overwrite row n of X (the logits) with dL/dlogits; ignored rows become 0."""
    row = tl.program_id(0).to(tl.int64)
    X_row = X_ptr + row * stride_xn
    y = tl.load(Y_ptr + row)
    valid = y >= 0
    lse = tl.load(LSE_ptr + row)
    g = tl.where(valid, tl.load(G_ptr + row), 0.0)
    if WITH_ENTROPY:
        H = tl.load(ENT_ptr + row)
        gH = tl.where(valid, tl.load(GH_ptr + row), 0.0)
    for v0 in range(0, V, BLOCK_SIZE):
        cols = v0 + tl.arange(0, BLOCK_SIZE)
        mask = cols < V
        x = tl.load(X_row + cols * stride_xv, mask=mask, other=float("-inf"))
        logp = x.to(tl.float32) / temperature - lse
        p = tl.exp(logp)
        dz = -p * g
        if WITH_ENTROPY:
            dz -= gH * p * tl.where(p > 0, logp + H, 0.0)
        dz += tl.where(cols == y, g, 0.0)
        tl.store(X_row + cols * stride_xv, (dz / temperature).to(x.dtype), mask=mask)


def _forward_triton(logits: Tensor, y: Tensor, temperature: float, with_entropy: bool
                    ) -> tuple[Tensor, Tensor, Tensor | None]:
    """logp, lse and entropy (None without with_entropy), fp32 [N]; y is -1 on ignored rows."""
    N, V = logits.shape
    BLOCK_SIZE, num_warps = row_launch_settings(V)
    logp = torch.empty(N, dtype=torch.float32, device=logits.device)
    lse = torch.empty_like(logp)
    H = torch.empty_like(logp) if with_entropy else None
    _logprob_from_logits_fwd_kernel[(N,)](
        logits, y, logp, lse, H if with_entropy else lse,
        V, logits.stride(0), logits.stride(1), temperature,
        WITH_ENTROPY=with_entropy, M_FLOOR=_M_FLOOR, BLOCK_SIZE=BLOCK_SIZE, num_warps=num_warps,
    )
    return logp, lse, H


def _backward_triton_(logits: Tensor, y: Tensor, lse: Tensor, H: Tensor | None, dlogp: Tensor | None,
                      dH: Tensor | None, temperature: float, with_entropy: bool) -> None:
    """Write dL/dlogits over the logits (the kernel zeroes ignored rows itself)."""
    N, V = logits.shape
    g = torch.zeros_like(lse) if dlogp is None else dlogp.float().contiguous()
    with_entropy = with_entropy and dH is not None
    gH = dH.float().contiguous() if with_entropy else g
    BLOCK_SIZE, num_warps = row_launch_settings(V)
    _logprob_from_logits_bwd_kernel[(N,)](
        logits, y, lse, H if with_entropy else lse, g, gH,
        V, logits.stride(0), logits.stride(1), temperature,
        WITH_ENTROPY=with_entropy, BLOCK_SIZE=BLOCK_SIZE, num_warps=num_warps,
    )


# (forward, in-place backward) of each kernel backend: same arguments, same outputs
_IMPL = {"triton": (_forward_triton, _backward_triton_), "cpp": (cpu_ops.logprob_fwd, cpu_ops.logprob_bwd_)}


class _LogprobFromLogits(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits: Tensor, y: Tensor, temperature: float, with_entropy: bool, backend: str):
        logp, lse, H = _IMPL[backend][0](logits, y, temperature, with_entropy)
        ctx.save_for_backward(logits, y, lse, H)
        ctx.temperature, ctx.with_entropy, ctx.backend = temperature, with_entropy, backend
        return logp, H

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, dlogp: Tensor | None, dH: Tensor | None):
        logits, y, lse, H = ctx.saved_tensors
        _IMPL[ctx.backend][1](logits, y, lse, H, dlogp, dH, ctx.temperature, ctx.with_entropy)
        # The kernel wrote behind autograd's back: bump the version so any other user of these
        # logits that saved them for its own backward fails loudly instead of reading gradients.
        torch.autograd.graph.increment_version(logits)
        return logits, None, None, None, None


def logprob_from_logits(
    logits: Tensor,
    targets: Tensor,
    temperature: float = 1.0,
    with_entropy: bool = False,
    ignore_index: int = -100,
    backend: str = "auto",
) -> tuple[Tensor, Tensor | None]:
    """Per-token log-prob of `targets` under softmax(logits / temperature), fp32 [N].

    logits [N, V] (bf16, fp16 or fp32), targets [N] integer in [0, V) or ignore_index (those rows
    give logp 0, entropy 0 and zero gradient). Returns (logp, entropy or None).

    When logits require grad, backward writes dlogits into the logits' own storage (a
    non-contiguous input is first copied) and hands that tensor back as the gradient: after
    backward the logits hold gradients, so the caller must not reuse them.
    backend: "auto" (CUDA -> Triton, CPU -> C++ when built, else the chunked torch reference),
    "triton", "cpp" or "torch".
    """
    check_float_matrix(logits, "logits")
    check_temperature(temperature)
    check_targets(targets, logits, "logits", logits.shape[1], ignore_index)
    backend = check_backend(backend, logits, "logits")
    if backend == "torch":
        return logprob_from_logits_ref(logits, targets, temperature, with_entropy, ignore_index)
    y = targets.to(torch.int64).masked_fill(targets == ignore_index, -1)
    temperature, with_entropy = float(temperature), bool(with_entropy)
    if logits.requires_grad and torch.is_grad_enabled():
        if not logits.is_contiguous():
            logits = logits.contiguous()
        return _LogprobFromLogits.apply(logits, y, temperature, with_entropy, backend)
    if backend == "cpp" and logits.stride(1) != 1:  # the C++ kernel reads rows of unit stride
        logits = logits.contiguous()
    logp, _, H = _IMPL[backend][0](logits, y, temperature, with_entropy)
    return logp, H
