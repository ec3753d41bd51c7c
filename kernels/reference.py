"""Plain-torch references for the fused kernels.

Each function computes in fp32 whatever the input dtype, is the CPU fallback of its op, and is
the ground truth the Triton kernels are tested against.
"""
from __future__ import annotations

import torch
from torch import Tensor

from .grpo_terms import grpo_row_weights, grpo_token_terms
from .utils import lines_within_budget


# --------------------------------------------------------------------------------------------
# Token log-probs: fused linear + log-softmax, and log-softmax of given logits
# --------------------------------------------------------------------------------------------
#
# z = x / t (x = hidden @ weight.T, or the given logits); lse = logsumexp(z)
# logp = z[y] - lse;  entropy H = lse - sum_j p_j z_j
# dlogp/dz_j = onehot(y)_j - p_j;  dH/dz_j = p_j (E_p[z] - z_j) = -p_j (log p_j + H)
# Only one tile of logits exists at a time (full-vocab row chunks for logprob_from_logits,
# [rows, cols] tiles for the fused op) and backward recomputes tiles from the saved lse (and H):
# that is what keeps them memory-lean on CPU.


def _acc_dtype(x: Tensor) -> torch.dtype:
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def _tile_lse(z: Tensor) -> tuple[Tensor, Tensor]:
    """Row logsumexp of a [C, V'] logits tile, and the tile's log_softmax.

    log_softmax is one fused pass over memory (max, sub, exp, sum would be four). The lse is read
    back at each row's max, where log_softmax is ~0 and so carries no rounding error even when
    the logits are ~1e4.
    """
    z_max, arg = z.max(dim=1)
    ls = torch.log_softmax(z, dim=1)
    return z_max - ls.gather(1, arg[:, None]).squeeze(1), ls


def _sum_plogp_(ls: Tensor) -> Tensor:
    """sum_j p_j log p_j per row from log_softmax `ls` (overwritten); 0 log 0 = 0 at -inf logits."""
    p = ls.exp_()
    return p.xlogy_(p).sum(dim=1)


def _dlogits_(logp: Tensor, g: Tensor, gH: Tensor | None, H: Tensor | None) -> Tensor:
    """Overwrite logp = z - lse ([C, V']) with -g p - gH p (log p + H) and return it.

    The caller adds g at the target column (the onehot term). g and gH are the upstream grads
    already divided by t (so the result is d/dx, not d/dz) and already zero on ignored rows.
    """
    if gH is None:
        return logp.exp_().mul_(-g[:, None])
    p = logp.exp()
    # p log p is 0 where p = 0 (a -inf logit), not 0 * -inf = NaN.
    plogp = logp.mul_(p).nan_to_num_(nan=0.0)
    return plogp.mul_(-gH[:, None]).sub_(p.mul_((g + gH * H)[:, None]))


def _upstream_grads(dlogp: Tensor | None, dH: Tensor | None, valid: Tensor, with_entropy: bool,
                    temperature: float, acc: torch.dtype) -> tuple[Tensor, Tensor | None]:
    """Upstream grads scaled by 1/t, zero on ignored rows (their outputs are constants)."""
    g = torch.zeros(valid.shape, dtype=acc, device=valid.device) if dlogp is None else dlogp.to(acc)
    g = g.masked_fill(~valid, 0.0) / temperature
    gH = None
    if with_entropy and dH is not None:
        gH = dH.to(acc).masked_fill(~valid, 0.0) / temperature
    return g, gH


def _merge_lse(m: Tensor, s: Tensor, a: Tensor | None, m2: Tensor, s2: Tensor, a2: Tensor | None
               ) -> tuple[Tensor, Tensor, Tensor | None]:
    """Merge two partial (m, s = sum e^(z - m), a = sum e^(z - m) (z - m)) over disjoint columns."""
    M = torch.maximum(m, m2)
    c, c2 = (m - M).exp(), (m2 - M).exp()
    a_new = None
    if a is not None:
        a_new = c * (a + (m - M) * s) + c2 * (a2 + (m2 - M) * s2)
    return M, c * s + c2 * s2, a_new


class _FusedLinearLogprobRef(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden: Tensor, weight: Tensor, targets: Tensor, temperature: float,
                with_entropy: bool, ignore_index: int, rows: int, cols: int):
        N, V = hidden.shape[0], weight.shape[0]
        acc = _acc_dtype(hidden)
        h, w = hidden.to(acc), weight.to(acc)  # no copy for fp32; bf16/fp16 GEMMs then accumulate in fp32
        valid = targets != ignore_index
        y = targets.long().masked_fill(~valid, 0)
        lse = torch.empty(N, dtype=acc, device=hidden.device)
        zy = torch.zeros_like(lse)
        H = torch.empty_like(lse) if with_entropy else None
        # [rows, cols] tiles merged with an online logsumexp, as the Triton kernel does: a few-row
        # chunk of full-vocab logits would stream all of W once per chunk instead.
        for i in range(0, N, rows):
            h_i, y_i = h[i:i + rows], y[i:i + rows]
            for j in range(0, V, cols):
                z = torch.mm(h_i, w[j:j + cols].t())
                if temperature != 1.0:
                    z.div_(temperature)
                col = y_i - j
                hit = (col >= 0) & (col < z.shape[1])
                zy[i:i + rows] += z.gather(1, col.clamp(0, z.shape[1] - 1)[:, None]).squeeze(1) * hit
                lse_t, ls = _tile_lse(z)
                del z  # else the next tile is allocated while this one is still alive
                # Relative to lse_t the tile's sum of exp is 1 and its sum e (z - lse_t) is sum p log p.
                a_t = _sum_plogp_(ls) if with_entropy else None
                del ls
                if j == 0:
                    m, s, a = lse_t, torch.ones_like(lse_t), a_t
                else:
                    m, s, a = _merge_lse(m, s, a, lse_t, torch.ones_like(lse_t), a_t)
            log_s = s.log()
            lse[i:i + rows] = m + log_s
            if with_entropy:
                H[i:i + rows] = log_s - a / s
        logp = (zy - lse).masked_fill_(~valid, 0.0)
        if with_entropy:
            H.masked_fill_(~valid, 0.0)
        ctx.save_for_backward(hidden, weight, y, valid, lse, H)
        ctx.temperature, ctx.with_entropy, ctx.tile = temperature, with_entropy, (rows, cols)
        return logp, H

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, dlogp: Tensor | None, dH: Tensor | None):
        hidden, weight, y, valid, lse, H = ctx.saved_tensors
        t, (rows, cols) = ctx.temperature, ctx.tile
        need_h, need_w = ctx.needs_input_grad[:2]
        N, D = hidden.shape
        V = weight.shape[0]
        acc = _acc_dtype(hidden)
        h, w = hidden.to(acc), weight.to(acc)
        g, gH = _upstream_grads(dlogp, dH, valid, ctx.with_entropy, t, acc)
        # Without an entropy grad dz = g (onehot(y) - P): the row scale -g moves onto h (for dW)
        # and onto dh after the loop, and the onehot part is a gather / index_add of N rows, so a
        # tile needs only P = exp(z - lse): two elementwise passes instead of four.
        rows_scaled = gH is None
        hg = h * (-g)[:, None] if rows_scaled and need_w else h
        dh = torch.zeros(N, D, dtype=acc, device=hidden.device) if need_h else None
        dw = torch.empty(V, D, dtype=acc, device=weight.device) if need_w else None
        # rows defaults to all of N (up to 2048): dW[cols] is then written by one GEMM with K = N
        # instead of being re-read and re-written once per row chunk.
        for i in range(0, N, rows):
            h_i, hg_i, y_i, lse_i, g_i = h[i:i + rows], hg[i:i + rows], y[i:i + rows], lse[i:i + rows, None], g[i:i + rows]
            for j in range(0, V, cols):
                w_j = w[j:j + cols]
                z = torch.mm(h_i, w_j.t())
                if t != 1.0:
                    z.div_(t)
                z.sub_(lse_i)
                if rows_scaled:
                    dz = z.exp_()
                else:
                    dz = _dlogits_(z, g_i, gH[i:i + rows], H[i:i + rows])
                    # onehot term: rows whose target is outside this column block add 0 at a clamped index.
                    col = y_i - j
                    hit = (col >= 0) & (col < dz.shape[1])
                    dz.scatter_add_(1, col.clamp(0, dz.shape[1] - 1)[:, None], (g_i * hit)[:, None])
                if need_h:
                    dh[i:i + rows].addmm_(dz, w_j)
                if need_w:
                    if i == 0:
                        torch.mm(dz.t(), hg_i, out=dw[j:j + cols])
                    else:
                        dw[j:j + cols].addmm_(dz.t(), hg_i)
                del z, dz
        if rows_scaled:
            del hg
            if need_h:  # dh = -g (P @ W) + g W[y]
                dh.mul_(-g[:, None]).addcmul_(w[y], g[:, None])
            if need_w:  # dW = P^T (-g h) + onehot(y)^T (g h); ignored rows have g = 0
                dw.index_add_(0, y, h * g[:, None])
        dh = dh.to(hidden.dtype) if need_h else None
        dw = dw.to(weight.dtype) if need_w else None
        return dh, dw, None, None, None, None, None, None


def fused_linear_logprob_ref(
    hidden: Tensor,
    weight: Tensor,
    targets: Tensor,
    temperature: float = 1.0,
    with_entropy: bool = False,
    ignore_index: int = -100,
    chunk_rows: int | None = None,
    chunk_cols: int | None = None,
) -> tuple[Tensor, Tensor | None]:
    """logp[n] = z[n, y] - logsumexp(z[n]) with z = hidden @ weight.T / t, and the entropy of softmax(z).

    Forward and backward walk [chunk_rows, chunk_cols] tiles of the logits (default: up to 2048
    rows, and columns to fill one `utils.chunk_budget`, 32 MiB on CPU); backward recomputes each
    tile from the saved lse. Peak extra memory is one tile (two with entropy), plus fp32 copies
    of weight and dW when the inputs are bf16/fp16.
    Returns fp32 (fp64 for fp64 inputs); rows whose target is ignore_index give 0 and no gradient.
    Inputs are assumed validated (`fused_linear_logprob` does it).
    """
    N, V = hidden.shape[0], weight.shape[0]
    rows = max(1, int(chunk_rows)) if chunk_rows is not None else min(N, 2048)
    cols = max(1, int(chunk_cols)) if chunk_cols is not None else lines_within_budget(V, rows, hidden.device, None)
    return _FusedLinearLogprobRef.apply(hidden, weight, targets, float(temperature), bool(with_entropy),
                                        int(ignore_index), rows, cols)


class _LogprobFromLogitsRef(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits: Tensor, targets: Tensor, temperature: float, with_entropy: bool,
                ignore_index: int, rows: int):
        N = logits.shape[0]
        acc = _acc_dtype(logits)
        valid = targets != ignore_index
        y = targets.long().masked_fill(~valid, 0)
        lse = torch.empty(N, dtype=acc, device=logits.device)
        zy = torch.empty_like(lse)
        H = torch.empty_like(lse) if with_entropy else None
        for i in range(0, N, rows):
            z = logits[i:i + rows].to(acc)  # no copy for fp32; nothing below writes z
            if temperature != 1.0:
                z = z / temperature
            zy[i:i + rows] = z.gather(1, y[i:i + rows, None]).squeeze(1)
            lse[i:i + rows], ls = _tile_lse(z)
            del z
            if with_entropy:
                H[i:i + rows] = -_sum_plogp_(ls)
            del ls
        logp = (zy - lse).masked_fill_(~valid, 0.0)
        if with_entropy:
            H.masked_fill_(~valid, 0.0)
        ctx.save_for_backward(logits, y, valid, lse, H)
        ctx.temperature, ctx.with_entropy, ctx.rows = temperature, with_entropy, rows
        return logp, H

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, dlogp: Tensor | None, dH: Tensor | None):
        logits, y, valid, lse, H = ctx.saved_tensors
        t, rows = ctx.temperature, ctx.rows
        acc = _acc_dtype(logits)
        g, gH = _upstream_grads(dlogp, dH, valid, ctx.with_entropy, t, acc)
        for i in range(0, logits.shape[0], rows):
            x = logits[i:i + rows]
            # fp32/fp64 logits are rewritten in place chunk by chunk; bf16/fp16 via one fp32 tile.
            z = x if x.dtype == acc else x.to(acc)
            if t != 1.0:
                z.div_(t)
            z.sub_(lse[i:i + rows, None])
            dz = _dlogits_(z, g[i:i + rows], None if gH is None else gH[i:i + rows],
                           None if gH is None else H[i:i + rows])
            dz.scatter_add_(1, y[i:i + rows, None], g[i:i + rows, None])
            if dz.data_ptr() != x.data_ptr():
                x.copy_(dz)
            del z, dz
        return logits, None, None, None, None, None


def logprob_from_logits_ref(
    logits: Tensor,
    targets: Tensor,
    temperature: float = 1.0,
    with_entropy: bool = False,
    ignore_index: int = -100,
    chunk_rows: int | None = None,
) -> tuple[Tensor, Tensor | None]:
    """logp[n] = z[n, y] - logsumexp(z[n]) with z = logits / t, and the entropy of softmax(z).

    Forward reads `logits` chunk by chunk into an fp32 tile and never writes it. Backward writes
    dlogits into the storage of the (contiguous) logits it saved and returns that tensor as the
    gradient: after backward the caller's logits hold gradients, not logits.
    """
    rows = lines_within_budget(logits.shape[0], logits.shape[1], logits.device, chunk_rows)
    if logits.requires_grad and not logits.is_contiguous():
        logits = logits.contiguous()
    return _LogprobFromLogitsRef.apply(logits, targets, float(temperature), bool(with_entropy),
                                       int(ignore_index), rows)


# --------------------------------------------------------------------------------------------
# GRPO loss
# --------------------------------------------------------------------------------------------


def grpo_loss_ref(
    logp: Tensor,
    old_logp: Tensor | None,
    ref_logp: Tensor | None,
    advantages: Tensor,
    mask: Tensor,
    cfg,
    entropy: Tensor | None = None,
    num_tokens: float | Tensor | None = None,
    num_seqs: float | Tensor | None = None,
) -> tuple[Tensor, dict[str, Tensor]]:
    """GRPO loss and metrics in plain torch; same contract as `kernels.grpo_loss.grpo_loss`.

    Inputs are assumed validated. Not chunked: every temporary is one [B, T] fp32 tensor, the
    size of an input, so there is nothing large to tile (unlike the vocab-sized log-prob ops).
    """
    B, T = logp.shape
    m = mask != 0
    mf = m.float()
    # Padding may hold anything (even NaN); zero it so it reaches neither the sums nor the grads.
    x = logp.float().masked_fill(~m, 0.0)
    # old, ref and the advantages are constants of the loss: no gradient reaches them.
    old = x.detach() if old_logp is None else old_logp.detach().float().masked_fill(~m, 0.0)
    adv = advantages.detach().float()
    adv = adv[:, None] if adv.dim() == 1 else adv.masked_fill(~m, 0.0)

    ref = None if ref_logp is None else ref_logp.detach().float().masked_fill(~m, 0.0)
    ent = None if entropy is None else entropy.float().masked_fill(~m, 0.0)
    token_loss, pg, kl, ratio, clipped = grpo_token_terms(x, old, ref, adv, ent, cfg)

    row_count = mf.sum(dim=1)                                   # (B,)
    u, inv_denom = grpo_row_weights(row_count, cfg, T, num_tokens, num_seqs)
    loss = ((token_loss * mf).sum(dim=1) * u).sum() * inv_denom

    with torch.no_grad():
        count = row_count.sum()
        inv_count = torch.where(count > 0, 1.0 / count.clamp(min=1.0), 0.0)
        any_token = count > 0
        zero = torch.zeros((), dtype=torch.float32, device=logp.device)
        metrics = {
            "pg_loss": ((pg * mf).sum(dim=1) * u).sum() * inv_denom,
            "clip_frac": (clipped & m).float().sum() * inv_count,
            "kl_mean": (kl * mf).sum() * inv_count if kl is not None else zero,
            "ratio_min": torch.where(any_token, ratio.masked_fill(~m, float("inf")).min(), 0.0),
            "ratio_mean": (ratio * mf).sum() * inv_count,
            "ratio_max": torch.where(any_token, ratio.masked_fill(~m, float("-inf")).max(), 0.0),
        }
        if ent is not None:
            metrics["entropy_mean"] = (ent * mf).sum() * inv_count
        metrics["num_tokens_local"] = count
    return loss, {k: v.detach().float() for k, v in metrics.items()}
