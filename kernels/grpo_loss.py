"""GRPO policy loss with KL to a reference policy, entropy bonus and aggregation in one pass.

Per token (A advantage, eps_low/eps_high clip range, c dual-clip bound, beta KL coefficient,
alpha entropy coefficient, m the response mask):

    r  = exp(clamp(logp - old_logp, -20, 20))
    pg = max(-A r, -A clip(r, 1 - eps_low, 1 + eps_high));  pg = min(pg, -A c) where A < 0 (dual clip)
    kl = k1: logp - ref  |  k2: (logp - ref)^2 / 2  |  k3: exp(d) - d - 1, d = clamp(ref - logp, +-20),
         result clamped to +-10 (verl's low_var_kl)
    l  = pg + beta kl - alpha entropy

    loss = sum_b u_b sum_t m_bt l_bt / D

    token-mean               u_b = 1          D = num_tokens (default: sum m)
    seq-mean-token-mean      u_b = 1 / len_b  D = num_seqs   (default: rows with a token)
    seq-mean-token-sum       u_b = 1          D = num_seqs
    seq-mean-token-sum-norm  u_b = 1 / L      D = num_seqs   (Dr. GRPO, L = norm_len or T)

Passing the global num_tokens / num_seqs (all micro-batches and ranks) makes the per-micro-batch
losses sum to the big-batch loss. The gradient is elementwise: dl/dlogp_bt = u_b m_bt / D times
(-A r where the unclipped branch is active, else 0) + beta dkl/dlogp; dl/dentropy = -alpha u_b m / D.

On CUDA a forward kernel writes per-(row, block) partial sums of the loss and every metric, a
one-program kernel reduces them to the loss, the metrics and the row weights u_b / D, and the
backward kernel recomputes the token terms from the saved inputs: nothing [B, T] is stored.
CPU tensors use the C++ kernels (kernels/cpu/grpo_loss.cpp) when built, else the plain-torch
`grpo_loss_ref`.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import triton
import triton.language as tl
from torch import Tensor

from . import cpu_ops
from .contract import GRPO_KL_TYPES, GRPO_LOSS_AGGS, GRPO_METRICS, IS_MODES, ISMode, KLType, LossAgg
from .grpo_terms import rollout_is_weights
from .reference import grpo_loss_ref
from .utils import check_backend, row_launch_settings

__all__ = ["GRPOLossConfig", "grpo_loss", "grpo_advantages"]


@dataclass
class GRPOLossConfig:
    """The loss settings, validated here once: the run config holds one as its `loss` section."""
    clip_low: float = 0.2             # eps_low: r is clipped below at 1 - clip_low
    clip_high: float = 0.2            # eps_high: r is clipped above at 1 + clip_high (DAPO raises it)
    dual_clip: float | None = None    # c > 1 bounds the loss of A < 0 tokens at -A c (None: off)
    kl_coef: float = 0.0              # beta; RACRO uses 0.001 with k3
    kl_type: KLType = "k3"            # k3 = low_var_kl
    entropy_coef: float = 0.0         # alpha; the bonus enters the loss as -alpha * entropy
    loss_agg: LossAgg = "token-mean"
    norm_len: int | None = None       # L of seq-mean-token-sum-norm (Dr. GRPO); None: the T of the call
    # rollout / trainer mismatch: truncated importance weights between the trainer's (old) and the
    # rollout engine's log-probs on the policy-gradient term (grpo_terms.rollout_is_weights)
    is_mode: ISMode = "off"           # off | token_tis | seq_tis | seq_mask ("auto": for the run config)
    is_cap: float = 2.0               # the weights' cap C

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """Raise ValueError("<field>: <what is wrong>") for the first bad field."""
        def need(ok: bool, name: str, msg: str) -> None:
            if not ok:
                raise ValueError(f"{name}: {msg}, got {getattr(self, name)!r}")

        need(math.isfinite(self.clip_low) and 0.0 <= self.clip_low < 1.0, "clip_low", "must be in [0, 1)")
        need(math.isfinite(self.clip_high) and self.clip_high >= 0.0, "clip_high", "must be >= 0")
        need(self.dual_clip is None or (math.isfinite(self.dual_clip) and self.dual_clip > 1.0), "dual_clip",
             "must be None (off) or > 1")
        need(math.isfinite(self.kl_coef) and self.kl_coef >= 0.0, "kl_coef", "must be >= 0")
        need(self.kl_type in GRPO_KL_TYPES, "kl_type", f"must be one of {GRPO_KL_TYPES}")
        need(math.isfinite(self.entropy_coef), "entropy_coef", "must be finite")
        need(self.loss_agg in GRPO_LOSS_AGGS, "loss_agg", f"must be one of {GRPO_LOSS_AGGS}")
        need(self.norm_len is None or (isinstance(self.norm_len, int) and self.norm_len > 0), "norm_len",
             "must be None or a positive int")
        need(self.is_mode in IS_MODES, "is_mode", f"must be one of {IS_MODES}")
        need(math.isfinite(self.is_cap) and self.is_cap >= 1.0, "is_cap", "must be >= 1")


# --------------------------------------------------------------------------------------------
# Triton kernels
# --------------------------------------------------------------------------------------------

# Partial sums of the forward kernel, one plane of [B, NB] each, in this order:
# 0 loss, 1 pg, 2 token count, 3 clipped count, 4 kl, 5 ratio sum, 6 ratio min, 7 ratio max, 8 entropy.
_NUM_PARTIALS = 9
# Outputs of the reduce kernel: the metrics in GRPO_METRICS order, then 1/D for the backward.
_NUM_OUT = len(GRPO_METRICS) + 1


@triton.jit
def _ratio_pg(logp, old, adv, clip_lo, clip_hi, dual_c, DUAL_CLIP: tl.constexpr):
    log_ratio = logp - old
    ratio = tl.exp(tl.minimum(tl.maximum(log_ratio, -20.0), 20.0))
    pg_unclipped = -adv * ratio
    pg_clipped = -adv * tl.minimum(tl.maximum(ratio, clip_lo), clip_hi)
    clipped = pg_clipped > pg_unclipped
    pg = tl.where(clipped, pg_clipped, pg_unclipped)
    # Only the unclipped branch depends on logp (the clipped one is strictly clipped, so flat),
    # and dr/dlogp = r inside the log-ratio clamp.
    dpg = tl.where(clipped | (log_ratio < -20.0) | (log_ratio > 20.0), 0.0, pg_unclipped)
    if DUAL_CLIP:
        pg_dual = -adv * dual_c
        dual = (adv < 0.0) & (pg > pg_dual)
        pg = tl.where(dual, pg_dual, pg)
        dpg = tl.where(dual, 0.0, dpg)
    return ratio, pg, clipped, dpg


@triton.jit
def _kl(logp, ref, KL_TYPE: tl.constexpr):
    if KL_TYPE == 1:
        kl = logp - ref
        dkl = tl.zeros_like(logp) + 1.0
    elif KL_TYPE == 2:
        diff = logp - ref
        kl = 0.5 * diff * diff
        dkl = diff
    else:
        d = tl.minimum(tl.maximum(ref - logp, -20.0), 20.0)
        e = tl.exp(d)
        k3 = e - d - 1.0
        kl = tl.minimum(tl.maximum(k3, -10.0), 10.0)
        # d k3 / d logp = 1 - e^d, zero where the output clamp holds the value. The input clamp
        # needs no test of its own: k3(+-20) >= 19, so wherever it binds the output clamp does too.
        dkl = tl.where((k3 < -10.0) | (k3 > 10.0), 0.0, 1.0 - e)
    return kl, dkl


@triton.jit
def _load_tokens(Logp_ptr, Old_ptr, Adv_ptr, Mask_ptr, row, offs, T, stride_logp_b, stride_logp_t,
                 stride_old_b, stride_old_t, stride_adv_b, stride_adv_t, stride_mask_b, stride_mask_t,
                 HAS_OLD: tl.constexpr, ADV_PER_TOKEN: tl.constexpr, BLOCK_SIZE: tl.constexpr):
    """in_row, mask, logp, old and adv (fp32) of one row's block of tokens `offs`.

    Masked tokens are never read (padding may hold anything): they load as 0.
    """
    in_row = offs < T
    m = (tl.load(Mask_ptr + row * stride_mask_b + offs * stride_mask_t, mask=in_row, other=0) != 0) & in_row
    logp = tl.load(Logp_ptr + row * stride_logp_b + offs * stride_logp_t, mask=m, other=0.0).to(tl.float32)
    if HAS_OLD:
        old = tl.load(Old_ptr + row * stride_old_b + offs * stride_old_t, mask=m, other=0.0).to(tl.float32)
    else:
        old = logp
    if ADV_PER_TOKEN:
        adv = tl.load(Adv_ptr + row * stride_adv_b + offs * stride_adv_t, mask=m, other=0.0).to(tl.float32)
    else:
        # One load per row, broadcast in registers.
        adv = tl.zeros([BLOCK_SIZE], dtype=tl.float32) + tl.load(Adv_ptr + row * stride_adv_b).to(tl.float32)
    return in_row, m, logp, old, adv


@triton.jit
def _grpo_loss_fwd_kernel(
    Logp_ptr, Old_ptr, Ref_ptr, Adv_ptr, Mask_ptr, Ent_ptr, Part_ptr,
    B, T, NB,
    stride_logp_b, stride_logp_t, stride_old_b, stride_old_t, stride_ref_b, stride_ref_t,
    stride_adv_b, stride_adv_t, stride_mask_b, stride_mask_t, stride_ent_b, stride_ent_t,
    clip_lo, clip_hi, dual_c, beta, ent_coef,
    HAS_OLD: tl.constexpr, HAS_REF: tl.constexpr, HAS_ENT: tl.constexpr, ADV_PER_TOKEN: tl.constexpr,
    DUAL_CLIP: tl.constexpr, KL_TYPE: tl.constexpr, BLOCK_SIZE: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    blk = tl.program_id(1)
    offs = blk * BLOCK_SIZE + tl.arange(0, BLOCK_SIZE)
    in_row, m, logp, old, adv = _load_tokens(
        Logp_ptr, Old_ptr, Adv_ptr, Mask_ptr, row, offs, T, stride_logp_b, stride_logp_t, stride_old_b, stride_old_t,
        stride_adv_b, stride_adv_t, stride_mask_b, stride_mask_t, HAS_OLD, ADV_PER_TOKEN, BLOCK_SIZE)

    ratio, pg, clipped, _ = _ratio_pg(logp, old, adv, clip_lo, clip_hi, dual_c, DUAL_CLIP)
    token_loss = pg
    kl_sum = 0.0
    if HAS_REF:
        ref = tl.load(Ref_ptr + row * stride_ref_b + offs * stride_ref_t, mask=m, other=0.0).to(tl.float32)
        kl, _ = _kl(logp, ref, KL_TYPE)
        token_loss = token_loss + beta * kl
        kl_sum = tl.sum(tl.where(m, kl, 0.0), axis=0)
    ent_sum = 0.0
    if HAS_ENT:
        ent = tl.load(Ent_ptr + row * stride_ent_b + offs * stride_ent_t, mask=m, other=0.0).to(tl.float32)
        token_loss = token_loss - ent_coef * ent
        ent_sum = tl.sum(tl.where(m, ent, 0.0), axis=0)

    plane = B * NB
    out = Part_ptr + row * NB + blk
    tl.store(out, tl.sum(tl.where(m, token_loss, 0.0), axis=0))
    tl.store(out + plane, tl.sum(tl.where(m, pg, 0.0), axis=0))
    tl.store(out + 2 * plane, tl.sum(m.to(tl.float32), axis=0))
    tl.store(out + 3 * plane, tl.sum((clipped & m).to(tl.float32), axis=0))
    tl.store(out + 4 * plane, kl_sum)
    tl.store(out + 5 * plane, tl.sum(tl.where(m, ratio, 0.0), axis=0))
    tl.store(out + 6 * plane, tl.min(tl.where(m, ratio, float("inf")), axis=0))
    tl.store(out + 7 * plane, tl.max(tl.where(m, ratio, float("-inf")), axis=0))
    tl.store(out + 8 * plane, ent_sum)


@triton.jit
def _grpo_loss_reduce_kernel(
    Part_ptr, Loss_ptr, Out_ptr, U_ptr, Denom_ptr,
    B, NB, denom_value, inv_norm_len,
    LOSS_AGG: tl.constexpr, DENOM_SRC: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_N: tl.constexpr,
):
    # One program: B * NB partials are few (B rows times T / BLOCK_SIZE blocks).
    plane = B * NB
    loss_acc = tl.zeros([BLOCK_B], dtype=tl.float32)
    pg_acc = tl.zeros([BLOCK_B], dtype=tl.float32)
    count_acc = tl.zeros([BLOCK_B], dtype=tl.float32)
    seqs_acc = tl.zeros([BLOCK_B], dtype=tl.float32)
    clip_acc = tl.zeros([BLOCK_B], dtype=tl.float32)
    kl_acc = tl.zeros([BLOCK_B], dtype=tl.float32)
    ratio_acc = tl.zeros([BLOCK_B], dtype=tl.float32)
    ent_acc = tl.zeros([BLOCK_B], dtype=tl.float32)
    rmin_acc = tl.full([BLOCK_B], float("inf"), dtype=tl.float32)
    rmax_acc = tl.full([BLOCK_B], float("-inf"), dtype=tl.float32)
    for b0 in range(0, B, BLOCK_B):
        rows = b0 + tl.arange(0, BLOCK_B)
        row_ok = rows < B
        row_loss = tl.zeros([BLOCK_B], dtype=tl.float32)
        row_pg = tl.zeros([BLOCK_B], dtype=tl.float32)
        row_count = tl.zeros([BLOCK_B], dtype=tl.float32)
        for n0 in range(0, NB, BLOCK_N):
            cols = n0 + tl.arange(0, BLOCK_N)
            ok = row_ok[:, None] & (cols[None, :] < NB)
            p = Part_ptr + rows[:, None] * NB + cols[None, :]
            row_loss += tl.sum(tl.load(p, mask=ok, other=0.0), axis=1)
            row_pg += tl.sum(tl.load(p + plane, mask=ok, other=0.0), axis=1)
            row_count += tl.sum(tl.load(p + 2 * plane, mask=ok, other=0.0), axis=1)
            clip_acc += tl.sum(tl.load(p + 3 * plane, mask=ok, other=0.0), axis=1)
            kl_acc += tl.sum(tl.load(p + 4 * plane, mask=ok, other=0.0), axis=1)
            ratio_acc += tl.sum(tl.load(p + 5 * plane, mask=ok, other=0.0), axis=1)
            rmin_acc = tl.minimum(rmin_acc, tl.min(tl.load(p + 6 * plane, mask=ok, other=float("inf")), axis=1))
            rmax_acc = tl.maximum(rmax_acc, tl.max(tl.load(p + 7 * plane, mask=ok, other=float("-inf")), axis=1))
            ent_acc += tl.sum(tl.load(p + 8 * plane, mask=ok, other=0.0), axis=1)
        if LOSS_AGG == 1:
            u = tl.where(row_count > 0.0, 1.0 / tl.maximum(row_count, 1.0), 0.0)
        elif LOSS_AGG == 3:
            u = tl.zeros([BLOCK_B], dtype=tl.float32) + inv_norm_len
        else:
            u = tl.zeros([BLOCK_B], dtype=tl.float32) + 1.0
        tl.store(U_ptr + rows, u, mask=row_ok)
        loss_acc += row_loss * u
        pg_acc += row_pg * u
        count_acc += row_count
        seqs_acc += (row_count > 0.0).to(tl.float32)

    count = tl.sum(count_acc, axis=0)
    if DENOM_SRC == 0:
        if LOSS_AGG == 0:
            denom = count
        else:
            denom = tl.sum(seqs_acc, axis=0)
    elif DENOM_SRC == 1:
        denom = denom_value
    else:
        denom = tl.load(Denom_ptr).to(tl.float32)
    # A zero denominator (empty batch) gives loss 0 and zero gradients instead of NaN.
    inv_denom = tl.where(denom > 0.0, 1.0 / tl.where(denom > 0.0, denom, 1.0), 0.0)
    inv_count = tl.where(count > 0.0, 1.0 / tl.maximum(count, 1.0), 0.0)
    tl.store(Loss_ptr, tl.sum(loss_acc, axis=0) * inv_denom)
    tl.store(Out_ptr + 0, tl.sum(pg_acc, axis=0) * inv_denom)
    tl.store(Out_ptr + 1, tl.sum(clip_acc, axis=0) * inv_count)
    tl.store(Out_ptr + 2, tl.sum(kl_acc, axis=0) * inv_count)
    tl.store(Out_ptr + 3, tl.where(count > 0.0, tl.min(rmin_acc, axis=0), 0.0))
    tl.store(Out_ptr + 4, tl.sum(ratio_acc, axis=0) * inv_count)
    tl.store(Out_ptr + 5, tl.where(count > 0.0, tl.max(rmax_acc, axis=0), 0.0))
    tl.store(Out_ptr + 6, tl.sum(ent_acc, axis=0) * inv_count)
    tl.store(Out_ptr + 7, count)
    tl.store(Out_ptr + 8, inv_denom)


@triton.jit
def _grpo_loss_bwd_kernel(
    Logp_ptr, Old_ptr, Ref_ptr, Adv_ptr, Mask_ptr, U_ptr, Out_ptr, DLoss_ptr, DLogp_ptr, DEnt_ptr,
    T,
    stride_logp_b, stride_logp_t, stride_old_b, stride_old_t, stride_ref_b, stride_ref_t,
    stride_adv_b, stride_adv_t, stride_mask_b, stride_mask_t,
    stride_dlogp_b, stride_dlogp_t, stride_dent_b, stride_dent_t,
    clip_lo, clip_hi, dual_c, beta, ent_coef,
    HAS_OLD: tl.constexpr, HAS_KL_GRAD: tl.constexpr, HAS_DENT: tl.constexpr, ADV_PER_TOKEN: tl.constexpr,
    DUAL_CLIP: tl.constexpr, KL_TYPE: tl.constexpr, BLOCK_SIZE: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    offs = tl.program_id(1) * BLOCK_SIZE + tl.arange(0, BLOCK_SIZE)
    in_row, m, logp, old, adv = _load_tokens(
        Logp_ptr, Old_ptr, Adv_ptr, Mask_ptr, row, offs, T, stride_logp_b, stride_logp_t, stride_old_b, stride_old_t,
        stride_adv_b, stride_adv_t, stride_mask_b, stride_mask_t, HAS_OLD, ADV_PER_TOKEN, BLOCK_SIZE)
    # d loss / d l_bt = dL * u_b / D for every masked token of the row.
    w = tl.load(DLoss_ptr).to(tl.float32) * tl.load(U_ptr + row) * tl.load(Out_ptr + 8)
    _, _, _, g = _ratio_pg(logp, old, adv, clip_lo, clip_hi, dual_c, DUAL_CLIP)
    if HAS_KL_GRAD:
        ref = tl.load(Ref_ptr + row * stride_ref_b + offs * stride_ref_t, mask=m, other=0.0).to(tl.float32)
        _, dkl = _kl(logp, ref, KL_TYPE)
        g = g + beta * dkl
    dlogp = tl.where(m, w * g, 0.0)
    tl.store(DLogp_ptr + row * stride_dlogp_b + offs * stride_dlogp_t,
             dlogp.to(DLogp_ptr.dtype.element_ty), mask=in_row)
    if HAS_DENT:
        dent = tl.where(m, -ent_coef * w, 0.0)
        tl.store(DEnt_ptr + row * stride_dent_b + offs * stride_dent_t,
                 dent.to(DEnt_ptr.dtype.element_ty), mask=in_row)


# --------------------------------------------------------------------------------------------
# Launchers and autograd
# --------------------------------------------------------------------------------------------

_AGG_ID = {name: i for i, name in enumerate(GRPO_LOSS_AGGS)}
_KL_ID = {name: i + 1 for i, name in enumerate(GRPO_KL_TYPES)}


def _launch_settings(T: int) -> tuple[int, int]:
    # Up to 1024 tokens of a row per program: a [64, 4096] batch is already 256 programs, and
    # every program still streams whole 128-byte lines of each input.
    return row_launch_settings(T, max_block=1024)


def _as_bytes(mask: Tensor) -> Tensor:
    # Triton loads bool pointers as i1; the same bytes as uint8 are unambiguous.
    return mask.view(torch.uint8) if mask.dtype == torch.bool else mask


def _strides(x: Tensor | None) -> tuple[int, int]:
    # A [B] advantage is one value per row: its token stride is unused.
    return (0, 0) if x is None else (x.stride(0), x.stride(1) if x.dim() == 2 else 0)


def _scalar_args(cfg: GRPOLossConfig) -> tuple[float, float, float, float, float]:
    # Python floats, so an int in the config (kl_coef=0) cannot become an i32 kernel argument.
    dual_c = cfg.dual_clip if cfg.dual_clip is not None else 0.0
    return (1.0 - cfg.clip_low, 1.0 + cfg.clip_high, float(dual_c), float(cfg.kl_coef), float(cfg.entropy_coef))


def _grpo_loss_forward(logp, old, ref, adv, mask, entropy, cfg, denom):
    B, T = logp.shape
    BLOCK_SIZE, num_warps = _launch_settings(T)
    NB = triton.cdiv(T, BLOCK_SIZE)
    dev = logp.device
    parts = torch.empty((_NUM_PARTIALS, B, NB), dtype=torch.float32, device=dev)
    scalars = _scalar_args(cfg)
    mask_b = _as_bytes(mask)
    _grpo_loss_fwd_kernel[(B, NB)](
        logp, old if old is not None else logp, ref if ref is not None else logp, adv, mask_b,
        entropy if entropy is not None else logp, parts,
        B, T, NB,
        *_strides(logp), *_strides(old), *_strides(ref), *_strides(adv), *_strides(mask_b), *_strides(entropy),
        *scalars,
        HAS_OLD=old is not None, HAS_REF=ref is not None, HAS_ENT=entropy is not None,
        ADV_PER_TOKEN=adv.dim() == 2,
        DUAL_CLIP=cfg.dual_clip is not None, KL_TYPE=_KL_ID[cfg.kl_type],
        BLOCK_SIZE=BLOCK_SIZE, num_warps=num_warps,
    )
    loss = torch.empty((), dtype=torch.float32, device=dev)
    out = torch.empty((_NUM_OUT,), dtype=torch.float32, device=dev)
    u = torch.empty((B,), dtype=torch.float32, device=dev)
    # Denominator: 0 = local count, 1 = a Python number, 2 = a 1-element tensor read on device (no sync).
    if denom is None:
        denom_src, denom_value, denom_ptr = 0, 0.0, out
    elif isinstance(denom, Tensor):
        denom_src, denom_value, denom_ptr = 2, 0.0, denom
    else:
        denom_src, denom_value, denom_ptr = 1, float(denom), out
    norm_len = T if cfg.norm_len is None else cfg.norm_len
    BLOCK_N = min(64, max(16, triton.next_power_of_2(NB)))
    BLOCK_B = min(max(16, triton.next_power_of_2(B)), max(16, 4096 // BLOCK_N))
    _grpo_loss_reduce_kernel[(1,)](
        parts, loss, out, u, denom_ptr,
        B, NB, denom_value, 1.0 / norm_len,
        LOSS_AGG=_AGG_ID[cfg.loss_agg], DENOM_SRC=denom_src, BLOCK_B=BLOCK_B, BLOCK_N=BLOCK_N, num_warps=4,
    )
    return loss, out, u


def _grpo_loss_backward(dloss, logp, old, ref, adv, mask, entropy, u, out, cfg, need_dent):
    B, T = logp.shape
    BLOCK_SIZE, num_warps = _launch_settings(T)
    NB = triton.cdiv(T, BLOCK_SIZE)
    dlogp = torch.empty_like(logp)
    dent = torch.empty_like(entropy) if need_dent else None
    scalars = _scalar_args(cfg)
    mask_b = _as_bytes(mask)
    has_kl_grad = ref is not None and cfg.kl_coef != 0.0
    _grpo_loss_bwd_kernel[(B, NB)](
        logp, old if old is not None else logp, ref if ref is not None else logp, adv, mask_b,
        u, out, dloss, dlogp, dent if dent is not None else dlogp,
        T,
        *_strides(logp), *_strides(old), *_strides(ref), *_strides(adv), *_strides(mask_b),
        *_strides(dlogp), *_strides(dent),
        *scalars,
        HAS_OLD=old is not None, HAS_KL_GRAD=has_kl_grad, HAS_DENT=need_dent,
        ADV_PER_TOKEN=adv.dim() == 2,
        DUAL_CLIP=cfg.dual_clip is not None, KL_TYPE=_KL_ID[cfg.kl_type],
        BLOCK_SIZE=BLOCK_SIZE, num_warps=num_warps,
    )
    return dlogp, dent


class _GRPOLossFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logp, old, ref, adv, mask, entropy, denom_tensor, cfg, denom_number):
        denom = denom_tensor if denom_tensor is not None else denom_number
        loss, out, u = _grpo_loss_forward(logp, old, ref, adv, mask, entropy, cfg, denom)
        ctx.save_for_backward(logp, old, ref, adv, mask, entropy, u, out)
        ctx.cfg = cfg
        ctx.mark_non_differentiable(out)
        return loss, out

    @staticmethod
    def backward(ctx, dloss, _dout):
        logp, old, ref, adv, mask, entropy, u, out = ctx.saved_tensors
        need_dent = entropy is not None and ctx.needs_input_grad[5]
        dlogp, dent = _grpo_loss_backward(
            dloss.float().contiguous(), logp, old, ref, adv, mask, entropy, u, out, ctx.cfg, need_dent
        )
        return dlogp, None, None, None, None, dent, None, None, None


# --------------------------------------------------------------------------------------------
# Public API
# --------------------------------------------------------------------------------------------


def _check_denominator(name: str, value: float | Tensor | None, device: torch.device) -> None:
    if value is None:
        return
    if isinstance(value, Tensor):
        if value.numel() != 1:
            raise ValueError(f"{name} must be a number or a 1-element tensor, got shape {tuple(value.shape)}")
        if value.device != device:
            raise ValueError(f"{name} is on {value.device} but logp is on {device}")
        return
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
        raise ValueError(f"{name} must be a positive finite number or a 1-element tensor, got {value!r}")


def _check_inputs(logp, old_logp, ref_logp, advantages, mask, cfg, entropy, num_tokens, num_seqs) -> None:
    if not isinstance(cfg, GRPOLossConfig):
        raise ValueError(f"cfg must be a GRPOLossConfig, got {type(cfg).__name__}")
    if not isinstance(logp, Tensor) or logp.dim() != 2 or logp.numel() == 0:
        raise ValueError(f"logp must be a non-empty [B, T] tensor, got {getattr(logp, 'shape', type(logp))}")
    if not logp.is_floating_point():
        raise ValueError(f"logp must be floating point, got {logp.dtype}")
    B, T = logp.shape
    for name, x in (("old_logp", old_logp), ("ref_logp", ref_logp), ("entropy", entropy), ("mask", mask)):
        if x is None:
            continue
        if x.shape != logp.shape:
            raise ValueError(f"{name} must have logp's shape {tuple(logp.shape)}, got {tuple(x.shape)}")
        if x.device != logp.device:
            raise ValueError(f"{name} is on {x.device} but logp is on {logp.device}")
        if name != "mask" and x.dtype != logp.dtype:
            raise ValueError(f"{name} has dtype {x.dtype} but logp has {logp.dtype}")
    if mask is None:
        raise ValueError("mask is required: a [B, T] bool/0-1 tensor marking response tokens")
    if mask.is_complex():
        raise ValueError(f"mask must be bool, integer or real, got {mask.dtype}")
    if advantages.shape not in ((B,), (B, T)):
        raise ValueError(f"advantages must have shape ({B},) or ({B}, {T}), got {tuple(advantages.shape)}")
    if advantages.device != logp.device:
        raise ValueError(f"advantages is on {advantages.device} but logp is on {logp.device}")
    if not advantages.is_floating_point():
        raise ValueError(f"advantages must be floating point, got {advantages.dtype}")
    if cfg.kl_coef > 0.0 and ref_logp is None:
        raise ValueError(f"ref_logp is None but cfg.kl_coef = {cfg.kl_coef} > 0: the KL term needs it")
    _check_denominator("num_tokens", num_tokens, logp.device)
    _check_denominator("num_seqs", num_seqs, logp.device)


def grpo_loss(
    logp: Tensor,
    old_logp: Tensor | None,
    ref_logp: Tensor | None,
    advantages: Tensor,
    mask: Tensor,
    cfg: GRPOLossConfig,
    entropy: Tensor | None = None,
    num_tokens: float | Tensor | None = None,
    num_seqs: float | Tensor | None = None,
    backend: str = "auto",
    rollout_logp: Tensor | None = None,
) -> tuple[Tensor, dict[str, Tensor]]:
    """GRPO loss (fp32 scalar) and detached fp32 metrics from one pass over [B, T] log-probs.

    logp, old_logp, ref_logp, entropy: [B, T], one dtype; mask: [B, T], nonzero = response token;
    advantages: [B] or [B, T]. old_logp None: on-policy (old = logp.detach()); ref_logp None: no
    KL. num_tokens (token-mean) / num_seqs (seq-mean-*) override the local counts so micro-batch
    losses sum to the big-batch loss; the one the mode does not use is ignored. Gradients flow to
    logp and entropy only. backend: "auto" (CUDA -> Triton, CPU -> C++ when built, else torch), "triton",
    "cpp", "torch".

    Metrics: pg_loss (same aggregation as the loss), clip_frac, kl_mean, ratio_min/mean/max and
    entropy_mean (when entropy is given) over the masked tokens of this call, and num_tokens_local.

    cfg.is_mode != "off" needs rollout_logp [B, T], the rollout engine's log-probs of the sampled
    tokens: each token's policy-gradient term is weighted by `rollout_is_weights(old, rollout, ...)`
    (old: old_logp, or logp.detach() on-policy), which adds rollout_kl, is_weight_mean/max and
    is_clipped_frac to the metrics. The weight is folded into a per-token advantage: the term is
    linear in A for a fixed clip branch, and the branch depends on A's sign only.
    """
    _check_inputs(logp, old_logp, ref_logp, advantages, mask, cfg, entropy, num_tokens, num_seqs)
    old = old_logp if old_logp is not None else logp.detach()  # on-policy: the trainer's log-probs are logp
    _check_rollout_is(old, rollout_logp, mask, cfg)
    backend = check_backend(backend, logp, "logp")
    if backend == "cpp":  # the rollout weights are computed in the op
        return cpu_ops.grpo_loss(logp, old_logp, ref_logp, advantages, mask, cfg, entropy, num_tokens, num_seqs,
                                 rollout_logp)
    advantages, is_metrics = apply_rollout_is(old, rollout_logp, advantages, mask, cfg)
    loss, metrics = _grpo_loss(logp, old_logp, ref_logp, advantages, mask, cfg, entropy, num_tokens, num_seqs,
                               backend)
    return loss, {**metrics, **is_metrics}


def apply_rollout_is(old_logp: Tensor | None, rollout_logp: Tensor | None, advantages: Tensor, mask: Tensor,
                     cfg: GRPOLossConfig) -> tuple[Tensor, dict[str, Tensor]]:
    """Advantages [B, T] weighted by the rollout importance weights between the trainer's log-probs
    `old_logp` [B, T] and the engine's, and their metrics; unchanged (and no metrics) with
    cfg.is_mode == "off"."""
    if cfg.is_mode == "off":
        return advantages, {}
    _check_rollout_is(old_logp, rollout_logp, mask, cfg)
    w, metrics = rollout_is_weights(old_logp, rollout_logp, mask, cfg.is_mode, cfg.is_cap)
    adv = advantages.detach().float()
    adv = adv[:, None] * w if adv.dim() == 1 else adv * w
    return adv, metrics


def _check_rollout_is(old_logp: Tensor | None, rollout_logp: Tensor | None, mask: Tensor, cfg: GRPOLossConfig
                      ) -> None:
    if cfg.is_mode == "off":
        return
    if cfg.is_mode == "auto":
        raise ValueError("is_mode: 'auto' must be resolved to a mode before the loss (the run config does)")
    if old_logp is None:
        raise ValueError(f"old_logp: is_mode={cfg.is_mode!r} needs the trainer's log-probs")
    if rollout_logp is None or tuple(rollout_logp.shape) != tuple(mask.shape):
        raise ValueError(f"rollout_logp: is_mode={cfg.is_mode!r} needs the rollout log-probs as [B, T] = "
                         f"{list(mask.shape)}, got {None if rollout_logp is None else list(rollout_logp.shape)}")


def _grpo_loss(logp, old_logp, ref_logp, advantages, mask, cfg, entropy, num_tokens, num_seqs, backend):
    """The Triton or torch path; backend is resolved."""
    if backend == "torch":
        return grpo_loss_ref(logp, old_logp, ref_logp, advantages, mask, cfg, entropy, num_tokens, num_seqs)

    denom = num_tokens if cfg.loss_agg == "token-mean" else num_seqs
    denom_tensor = denom if isinstance(denom, Tensor) else None
    denom_number = None if isinstance(denom, Tensor) else denom
    # old/ref/adv never get a gradient: detaching them keeps autograd from waiting on one.
    old = old_logp.detach() if old_logp is not None else None
    ref = ref_logp.detach() if ref_logp is not None else None
    loss, out = _GRPOLossFunction.apply(
        logp, old, ref, advantages.detach(), mask, entropy, denom_tensor, cfg, denom_number
    )
    names = GRPO_METRICS if entropy is not None else tuple(n for n in GRPO_METRICS if n != "entropy_mean")
    values = out.unbind()
    return loss, {name: values[GRPO_METRICS.index(name)] for name in names}


def grpo_advantages(rewards: Tensor, group_size: int, scale_by_std: bool = True, eps: float = 1e-6) -> Tensor:
    """Group-relative advantages for rewards laid out as consecutive groups of group_size.

    GRPO: (r - mean_g) / (std_g + eps) with the unbiased (Bessel-corrected, n - 1) group std, the
    choice of verl (`torch.std`) and TRL (`Tensor.std`). Dr. GRPO (scale_by_std=False): r - mean_g.
    A group whose rewards are all equal gets zeros. Returns fp32 of the same shape.
    """
    if not isinstance(rewards, Tensor) or rewards.dim() != 1:
        raise ValueError(f"rewards must be a 1-D tensor, got {getattr(rewards, 'shape', type(rewards))}")
    if isinstance(group_size, bool) or not isinstance(group_size, int) or group_size < 2:
        raise ValueError(f"group_size must be an int >= 2 (a group needs a baseline), got {group_size!r}")
    if rewards.numel() % group_size != 0:
        raise ValueError(f"rewards has {rewards.numel()} entries, not a multiple of group_size = {group_size}")
    if scale_by_std and not (math.isfinite(eps) and eps > 0.0):
        raise ValueError(f"eps must be > 0 (it guards zero-variance groups), got {eps}")
    r = rewards.float().view(-1, group_size)
    adv = r - r.mean(dim=1, keepdim=True)
    if scale_by_std:
        adv = adv / (r.std(dim=1, keepdim=True) + eps)
    return adv.view(-1)
