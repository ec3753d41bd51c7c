"""Token log-probs (and entropy) straight from hidden states, without the [N, V] logits.

    z = (h @ W.T) / t            h [N, D], W [V, D], t the sampling temperature
    lse = logsumexp(z)           logp[n] = z[n, y_n] - lse[n]
    H[n] = lse[n] - sum_j softmax(z[n])_j z[n, j]

Backward, with g = dL/dlogp and gH = dL/dH (both zero on ignored rows):

    dz[n, j] = g[n] (onehot(y_n)_j - p[n, j]) - gH[n] p[n, j] (log p[n, j] + H[n])
    dh = (dz / t) @ W,   dW = (dz / t).T @ h

Forward (CUDA): one kernel on a (N / BLOCK_N) x splits grid; each program walks its share of the
vocab in BLOCK_V tiles, builds a logits tile with tl.dot in fp32, and keeps an online max, sum
of exp and sum of exp * (z - max) (for the entropy); the splits' partials are merged in torch.
Only lse and H ([N] each) are saved. Backward walks N in chunks: a kernel recomputes the chunk's
logits tiles and writes dz / t ([chunk, V], the input dtype), and two cuBLAS GEMMs give the
chunk's dh and accumulate dW. CPU tensors use the chunked torch reference.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from . import cpu_ops
from .reference import fused_linear_logprob_ref
from .utils import (
    check_backend,
    check_float_matrix,
    check_targets,
    check_temperature,
    chunk_budget,
    chunk_rows as rows_for_budget,
    is_interpreter,
    tile_launch_settings,
)

__all__ = ["fused_linear_logprob"]

# Start of the running max: finite, so exp(m_old - m_new) and (m_old - m_new) * 0 never make NaN
# before the first finite logit; every real logit is far above it.
_M_FLOOR = -3.0e38


@triton.jit
def _logits_tile(H_ptr, W_ptr, rows, cols, row_mask, col_mask, D, stride_hn, stride_hd, stride_wv, stride_wd,
                 temperature, DOT_PRECISION: tl.constexpr, DOT_FP32: tl.constexpr, BLOCK_N: tl.constexpr,
                 BLOCK_V: tl.constexpr, BLOCK_D: tl.constexpr):
    """z = h[rows] @ W[cols].T / t as an fp32 [BLOCK_N, BLOCK_V] tile."""
    acc = tl.zeros([BLOCK_N, BLOCK_V], dtype=tl.float32)
    for d0 in range(0, D, BLOCK_D):
        ds = d0 + tl.arange(0, BLOCK_D)
        d_mask = ds < D
        h = tl.load(H_ptr + rows[:, None] * stride_hn + ds[None, :] * stride_hd,
                    mask=row_mask[:, None] & d_mask[None, :], other=0.0)
        # W is read transposed ([BLOCK_D, BLOCK_V]) through its strides: no copy of W.T.
        w = tl.load(W_ptr + cols[None, :] * stride_wv + ds[:, None] * stride_wd,
                    mask=col_mask[None, :] & d_mask[:, None], other=0.0)
        if DOT_FP32:
            h = h.to(tl.float32)
            w = w.to(tl.float32)
        acc = tl.dot(h, w, acc, input_precision=DOT_PRECISION)
    return acc / temperature


@triton.jit
def _fused_linear_logprob_fwd_kernel(
    H_ptr, W_ptr, Y_ptr, M_ptr, S_ptr, A_ptr, ZY_ptr,
    N, V, D,
    stride_hn, stride_hd, stride_wv, stride_wd,
    temperature, v_per_split,
    WITH_ENTROPY: tl.constexpr, DOT_PRECISION: tl.constexpr, DOT_FP32: tl.constexpr, M_FLOOR: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """Partials of one (row block, vocab split): m = max z, s = sum exp(z - m),
    a = sum exp(z - m) (z - m), zy = z[y] if y falls in this split (else 0)."""
    pid_n = tl.program_id(0)
    pid_s = tl.program_id(1)
    rows = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    row_mask = rows < N
    y = tl.load(Y_ptr + rows, mask=row_mask, other=-1)

    m = tl.full([BLOCK_N], M_FLOOR, dtype=tl.float32)
    s = tl.zeros([BLOCK_N], dtype=tl.float32)
    a = tl.zeros([BLOCK_N], dtype=tl.float32)
    zy = tl.zeros([BLOCK_N], dtype=tl.float32)
    v_start = pid_s * v_per_split
    v_end = tl.minimum(v_start + v_per_split, V)
    for v0 in range(v_start, v_end, BLOCK_V):
        cols = v0 + tl.arange(0, BLOCK_V)
        col_mask = cols < v_end
        z = _logits_tile(H_ptr, W_ptr, rows, cols, row_mask, col_mask, D, stride_hn, stride_hd,
                         stride_wv, stride_wd, temperature, DOT_PRECISION, DOT_FP32, BLOCK_N, BLOCK_V, BLOCK_D)
        z = tl.where(col_mask[None, :], z, float("-inf"))
        m_new = tl.maximum(m, tl.max(z, axis=1))
        alpha = tl.exp(m - m_new)
        zc = z - m_new[:, None]
        e = tl.exp(zc)
        if WITH_ENTROPY:
            # a is kept relative to the running max: rescaling it when the max moves by d = m - m_new
            # gives alpha * (a + d * s). Masked columns have e = 0 and zc = -inf: excluded.
            a = alpha * (a + (m - m_new) * s) + tl.sum(e * tl.where(e > 0, zc, 0.0), axis=1)
        s = s * alpha + tl.sum(e, axis=1)
        m = m_new
        zy += tl.sum(tl.where(cols[None, :] == y[:, None], z, 0.0), axis=1)

    out = pid_s * N + rows
    tl.store(M_ptr + out, m, mask=row_mask)
    tl.store(S_ptr + out, s, mask=row_mask)
    tl.store(ZY_ptr + out, zy, mask=row_mask)
    if WITH_ENTROPY:
        tl.store(A_ptr + out, a, mask=row_mask)


@triton.jit
def _fused_linear_logprob_bwd_kernel(
    H_ptr, W_ptr, Y_ptr, LSE_ptr, ENT_ptr, G_ptr, GH_ptr, DZ_ptr,
    N, V, D,
    stride_hn, stride_hd, stride_wv, stride_wd, stride_dzn, stride_dzv,
    temperature,
    WITH_ENTROPY: tl.constexpr, DOT_PRECISION: tl.constexpr, DOT_FP32: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """DZ tile = dL/d(h W^T) = (g (onehot(y) - p) - gH p (log p + H)) / t, recomputing z."""
    pid_n = tl.program_id(0)
    pid_v = tl.program_id(1)
    rows = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    cols = pid_v * BLOCK_V + tl.arange(0, BLOCK_V)
    row_mask = rows < N
    col_mask = cols < V
    z = _logits_tile(H_ptr, W_ptr, rows, cols, row_mask, col_mask, D, stride_hn, stride_hd,
                     stride_wv, stride_wd, temperature, DOT_PRECISION, DOT_FP32, BLOCK_N, BLOCK_V, BLOCK_D)
    lse = tl.load(LSE_ptr + rows, mask=row_mask, other=0.0)
    g = tl.load(G_ptr + rows, mask=row_mask, other=0.0)
    y = tl.load(Y_ptr + rows, mask=row_mask, other=-1)
    logp = z - lse[:, None]
    p = tl.exp(logp)
    dz = -p * g[:, None]
    if WITH_ENTROPY:
        H = tl.load(ENT_ptr + rows, mask=row_mask, other=0.0)
        gH = tl.load(GH_ptr + rows, mask=row_mask, other=0.0)
        dz -= gH[:, None] * p * (logp + H[:, None])
    dz += tl.where(cols[None, :] == y[:, None], g[:, None], 0.0)
    dz = dz / temperature
    tl.store(DZ_ptr + rows[:, None] * stride_dzn + cols[None, :] * stride_dzv,
             dz.to(DZ_ptr.dtype.element_ty), mask=row_mask[:, None] & col_mask[None, :])


def _dot_settings(dtype: torch.dtype) -> dict:
    """tl.dot options: fp32 inputs get true fp32 products, as torch's default matmul does (no TF32).

    The Triton interpreter multiplies bf16 tiles as their raw uint16 bits; bf16 -> fp32 is exact
    (so are the products), so there the tiles are upcast and the result is what a GPU computes.
    """
    dot_fp32 = dtype == torch.bfloat16 and is_interpreter()
    precision = "ieee" if dtype == torch.float32 or dot_fp32 else "tf32"
    return dict(DOT_PRECISION=precision, DOT_FP32=dot_fp32)


def _forward(hidden: Tensor, weight: Tensor, y: Tensor, temperature: float, with_entropy: bool
             ) -> tuple[Tensor, Tensor, Tensor | None]:
    """zy, lse and entropy (None without with_entropy), fp32 [N]; y is -1 on ignored rows."""
    N, D = hidden.shape
    V = weight.shape[0]
    cfg = tile_launch_settings(N, D, V, hidden.dtype, hidden.device)
    part = torch.empty(4 if with_entropy else 3, cfg.splits, N, dtype=torch.float32, device=hidden.device)
    m, s, zy = part[0], part[1], part[2]
    a = part[3] if with_entropy else s  # unused pointer when WITH_ENTROPY is off
    grid = (triton.cdiv(N, cfg.BLOCK_N), cfg.splits)
    _fused_linear_logprob_fwd_kernel[grid](
        hidden, weight, y, m, s, a, zy,
        N, V, D,
        hidden.stride(0), hidden.stride(1), weight.stride(0), weight.stride(1),
        temperature, cfg.v_per_split,
        WITH_ENTROPY=with_entropy, **_dot_settings(hidden.dtype), M_FLOOR=_M_FLOOR,
        BLOCK_N=cfg.BLOCK_N, BLOCK_V=cfg.BLOCK_V, BLOCK_D=cfg.BLOCK_D,
        num_warps=cfg.num_warps, num_stages=cfg.num_stages,
    )
    # Merge the splits: lse = M + log sum_k s_k e^(m_k - M); the entropy's a_k move to the common
    # max the same way as inside the kernel.
    M = m.amax(dim=0)
    scale = torch.exp(m - M)
    S = (s * scale).sum(dim=0)
    lse = M + S.log()
    H = None
    if with_entropy:
        A = (scale * (a + (m - M) * s)).sum(dim=0)
        H = S.log() - A / S
    return zy.sum(dim=0), lse, H


def _backward(hidden: Tensor, weight: Tensor, y: Tensor, lse: Tensor, H: Tensor | None, g: Tensor,
              gH: Tensor | None, temperature: float, need_h: bool, need_w: bool, rows: int | None
              ) -> tuple[Tensor | None, Tensor | None]:
    N, D = hidden.shape
    V = weight.shape[0]
    cfg = tile_launch_settings(N, D, V, hidden.dtype, hidden.device)
    if rows is None:
        rows = rows_for_budget(N, V, hidden.element_size(), chunk_budget(hidden.device), cfg.BLOCK_N)
    dz = torch.empty(min(rows, N), V, dtype=hidden.dtype, device=hidden.device)
    dh = torch.empty(N, D, dtype=hidden.dtype, device=hidden.device) if need_h else None
    # dW is accumulated chunk by chunk with addmm (fp32 math, one rounding to the weight dtype
    # per chunk): bounded error for bf16 weights without an fp32 [V, D] buffer.
    dw = torch.empty(V, D, dtype=weight.dtype, device=weight.device) if need_w else None
    with_entropy = gH is not None
    for i in range(0, N, rows):
        n = min(rows, N - i)
        h_c, dz_c = hidden[i:i + n], dz[:n]
        grid = (triton.cdiv(n, cfg.BLOCK_N), triton.cdiv(V, cfg.BLOCK_V))
        _fused_linear_logprob_bwd_kernel[grid](
            h_c, weight, y[i:i + n], lse[i:i + n], H[i:i + n] if with_entropy else lse[i:i + n],
            g[i:i + n], gH[i:i + n] if with_entropy else g[i:i + n], dz_c,
            n, V, D,
            h_c.stride(0), h_c.stride(1), weight.stride(0), weight.stride(1), dz_c.stride(0), dz_c.stride(1),
            temperature,
            WITH_ENTROPY=with_entropy, **_dot_settings(hidden.dtype),
            BLOCK_N=cfg.BLOCK_N, BLOCK_V=cfg.BLOCK_V, BLOCK_D=cfg.BLOCK_D,
            num_warps=cfg.num_warps, num_stages=cfg.num_stages,
        )
        if need_h:
            torch.mm(dz_c, weight, out=dh[i:i + n])
        if need_w:
            if i == 0:
                torch.mm(dz_c.t(), h_c, out=dw)
            else:
                dw.addmm_(dz_c.t(), h_c)
    return dh, dw


class _FusedLinearLogprob(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden: Tensor, weight: Tensor, targets: Tensor, temperature: float,
                with_entropy: bool, ignore_index: int, rows: int | None):
        valid = targets != ignore_index
        y = targets.to(torch.int64).masked_fill(~valid, -1)
        zy, lse, H = _forward(hidden, weight, y, temperature, with_entropy)
        logp = (zy - lse).masked_fill_(~valid, 0.0)
        if with_entropy:
            H = H.masked_fill_(~valid, 0.0)
        ctx.save_for_backward(hidden, weight, y, valid, lse, H)
        ctx.temperature, ctx.with_entropy, ctx.rows = temperature, with_entropy, rows
        return logp, H

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, dlogp: Tensor | None, dH: Tensor | None):
        hidden, weight, y, valid, lse, H = ctx.saved_tensors
        need_h, need_w = ctx.needs_input_grad[:2]
        # The kernel divides by t itself; here only zero the ignored rows (their outputs are constants).
        g = torch.zeros_like(lse) if dlogp is None else dlogp.float().masked_fill(~valid, 0.0)
        gH = None
        if ctx.with_entropy and dH is not None:
            gH = dH.float().masked_fill(~valid, 0.0)
        dh, dw = _backward(hidden, weight, y, lse, H, g.contiguous(), None if gH is None else gH.contiguous(),
                           ctx.temperature, need_h, need_w, ctx.rows)
        return dh, dw, None, None, None, None, None


def _fused_linear_logprob_triton(hidden: Tensor, weight: Tensor, targets: Tensor, temperature: float = 1.0,
                                 with_entropy: bool = False, ignore_index: int = -100,
                                 chunk_rows: int | None = None) -> tuple[Tensor, Tensor | None]:
    """The Triton path; `chunk_rows` overrides the backward's chunk (default: a 1 GiB dz tile on GPU)."""
    return _FusedLinearLogprob.apply(hidden, weight, targets, float(temperature),
                                     bool(with_entropy), int(ignore_index), chunk_rows)


def fused_linear_logprob(
    hidden: Tensor,
    weight: Tensor,
    targets: Tensor,
    temperature: float = 1.0,
    with_entropy: bool = False,
    ignore_index: int = -100,
    backend: str = "auto",
) -> tuple[Tensor, Tensor | None]:
    """Per-token log-prob of `targets` under softmax(hidden @ weight.T / temperature), fp32 [N].

    hidden [N, D] and weight [V, D] of one dtype (bf16, fp16 or fp32) on one device, targets [N]
    integer in [0, V) or ignore_index (those rows give logp 0, entropy 0 and no gradient).
    Returns (logp, entropy or None); both are differentiable w.r.t. hidden and weight.
    backend: "auto" (CUDA -> Triton, CPU -> C++ epilogues when built, else the chunked torch
    reference), "triton", "cpp" or "torch".
    """
    check_float_matrix(hidden, "hidden")
    check_float_matrix(weight, "weight")
    if weight.shape[1] != hidden.shape[1]:
        raise ValueError(f"weight must be [V, {hidden.shape[1]}] to match hidden [N, D], got {list(weight.shape)}")
    if weight.dtype != hidden.dtype:
        raise ValueError(f"weight dtype {weight.dtype} differs from hidden dtype {hidden.dtype}")
    if weight.device != hidden.device:
        raise ValueError(f"weight is on {weight.device} but hidden is on {hidden.device}")
    check_temperature(temperature)
    check_targets(targets, hidden, "hidden", weight.shape[0], ignore_index)
    backend = check_backend(backend, hidden, "hidden")
    if hidden.shape[0] == 0:
        # No token (a rank whose micro-batch holds only empty captions): empty outputs that still
        # join hidden and weight to the graph, so this rank's backward reaches the same parameters as
        # every other rank's (a sharded backward waits for all of them), with zero gradients.
        empty = (hidden.sum(-1) + weight.sum()).float()  # [0]
        return empty, (empty.clone() if with_entropy else None)
    if backend == "torch":
        return fused_linear_logprob_ref(hidden, weight, targets, temperature, with_entropy, ignore_index)
    if backend == "cpp":
        y = targets.to(torch.int64).masked_fill(targets == ignore_index, -1)
        return cpu_ops.fused_linear_logprob(hidden, weight, y, temperature, with_entropy)
    return _fused_linear_logprob_triton(hidden, weight, targets, temperature, with_entropy, ignore_index)
