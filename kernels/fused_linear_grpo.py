"""Fused linear GRPO: from hidden states to the GRPO loss, with the gradients ready after the forward.

For each token n (h_n its hidden state, y_n its target, w_n its weight in the aggregated loss):

    z_n   = W h_n / t                       logits, one [chunk, V] tile at a time, never [N, V]
    logp  = z_n[y_n] - lse(z_n),  H_n = lse(z_n) - sum_v softmax(z_n)_v z_nv
    loss  = sum_n w_n l_n,  l_n = pg(logp, old, A) + beta kl(logp, ref) - alpha H_n   (grpo_token_terms)

A token's loss depends on its own logp and H only, and old, ref, A and w are known before the
forward, so dloss/dz is known tile by tile:

    dz_n = [dl_n/dlogp (onehot(y_n) - p_n) - dl_n/dH p_n (z_n - E_p z_n)] w_n / t

Per chunk of rows: one GEMM for the logits, an epilogue that writes dz into the logits' own storage
(on CPU one C++ call, `kernels/cpu/logprob.cpp` grpo_epilogue_; else `logprob_from_logits`, the
Triton kernel on CUDA, whose backward writes dz in place, with the token terms in torch), then
dh = dz W and dW += dz^T h: three [N, D] x [D, V] GEMMs in all, where log-probs + loss through
autograd (`fused_linear_logprob` recomputes the logits in its backward) take four. The backward only
scales the stored dh and dW by the upstream gradient.

The weights w come from the aggregation (`grpo_token_weights`): with the global token and sequence
counts, the chunks' and micro-batches' losses add up to the loss of the whole batch. The rollout
importance weights (cfg.is_mode) are folded into per-token advantages, as in `grpo_loss`.
"""
from __future__ import annotations

import math

import torch
from torch import Tensor

from . import cpu_ops
from .grpo_loss import GRPOLossConfig, apply_rollout_is
from .logprob_from_logits import logprob_from_logits
from .grpo_terms import grpo_row_weights, grpo_token_terms
from .utils import (CPU_INPLACE_TILE_BYTES, check_backend, check_float_matrix, check_temperature, chunk_budget,
                    chunk_rows)

__all__ = ["fused_linear_grpo", "grpo_token_weights"]


def grpo_token_weights(mask: Tensor, cfg: GRPOLossConfig, num_tokens: float | None = None,
                       num_seqs: float | None = None) -> Tensor:
    """w [B, T] fp32: each token's weight in the aggregated loss (`grpo_loss`'s u_b / D), 0 off the mask."""
    m = (mask != 0).float()
    u, inv_denom = grpo_row_weights(m.sum(dim=1), cfg, mask.shape[1], num_tokens, num_seqs)
    return m * u[:, None] * inv_denom


def _epilogue(z: Tensor, y: Tensor, old: Tensor | None, ref: Tensor | None, adv: Tensor, w: Tensor, cfg,
              temperature: float, ignore_index: int, backend: str) -> Tensor:
    """Overwrite the logits chunk z [rows, V] with d(sum_n w_n l_n)/dz and return per-row terms
    [rows, 8]: w l, w pg, clipped, kl, ratio, H, logp, valid (the metrics are sums of them)."""
    if backend == "cpp":
        y = y.to(torch.int64).masked_fill(y == ignore_index, -1)
        return cpu_ops.grpo_epilogue_(z, y, temperature, old, ref, adv, w, cfg)
    valid = y != ignore_index
    with torch.enable_grad():
        z.requires_grad_()
        logp, H = logprob_from_logits(z, y, temperature, with_entropy=True, ignore_index=ignore_index,
                                      backend=backend)
        x = logp.detach().requires_grad_()
        ent = H.detach().requires_grad_()
        token_loss, pg, kl, ratio, clipped = grpo_token_terms(x, x.detach() if old is None else old, ref, adv, ent,
                                                              cfg)
        g_logp, g_ent = torch.autograd.grad((token_loss * w).sum(), (x, ent))
        # the backward of logprob_from_logits writes dz into z's storage (no second [chunk, V])
        torch.autograd.grad((logp, H), (z,), (g_logp, g_ent))
    vf = valid.float()
    terms = [token_loss * w, pg * w, clipped.float(), kl if kl is not None else torch.zeros_like(x), ratio, H, logp,
             vf]
    return torch.stack([t.detach() for t in terms], dim=1) * vf[:, None]


class _FusedLinearGRPO(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, targets, old_logp, ref_logp, adv, token_weight, cfg, temperature,
                ignore_index, chunk, backend, metrics_out):
        N, D = hidden.shape
        dh = torch.empty_like(hidden)
        dW = torch.zeros(weight.shape, dtype=torch.float32 if weight.dtype == torch.float32 else weight.dtype,
                         device=weight.device)
        sums = torch.zeros(8, dtype=torch.float64, device=hidden.device)
        r_min = torch.full((), math.inf, device=hidden.device)
        r_max = torch.full((), -math.inf, device=hidden.device)
        for s in range(0, N, chunk):
            e = min(N, s + chunk)
            h_c, y_c = hidden[s:e], targets[s:e]
            w = torch.where(y_c != ignore_index, token_weight[s:e].float(), 0.0)
            z = h_c @ weight.t()  # GEMM 1: [chunk, V] (forward runs without a graph: z is a leaf)
            terms = _epilogue(z, y_c, None if old_logp is None else old_logp[s:e].float(),
                              None if ref_logp is None else ref_logp[s:e].float(), adv[s:e].float(), w, cfg,
                              temperature, ignore_index, backend)
            dz = z  # the epilogue wrote the gradient over the logits
            dh[s:e] = dz @ weight  # GEMM 2
            torch.addmm(dW, dz.t().to(dW.dtype), h_c.to(dW.dtype), out=dW)  # GEMM 3, accumulated in place
            del z, dz
            sums += terms.sum(dim=0, dtype=torch.float64)
            valid = terms[:, 7] > 0
            if valid.any():
                r_min = torch.minimum(r_min, terms[valid, 4].min())
                r_max = torch.maximum(r_max, terms[valid, 4].max())
        ctx.save_for_backward(dh, dW.to(weight.dtype))
        count = float(sums[7])
        inv = 1.0 / count if count else 0.0
        metrics = {"pg_loss": sums[1], "clip_frac": sums[2] * inv, "kl_mean": sums[3] * inv,
                   "ratio_min": r_min if count else r_min.new_zeros(()), "ratio_mean": sums[4] * inv,
                   "ratio_max": r_max if count else r_max.new_zeros(()), "entropy_mean": sums[5] * inv,
                   "num_tokens_local": torch.tensor(count)}
        metrics_out.update({k: v.detach().float().cpu() for k, v in metrics.items()})
        return sums[0].float()

    @staticmethod
    def backward(ctx, g):
        dh, dW = ctx.saved_tensors
        if torch.equal(g, torch.ones_like(g)):
            return dh, dW, *([None] * 11)  # the gradients as computed: no scaled copy
        return dh * g.to(dh.dtype), dW * g.to(dW.dtype), *([None] * 11)


def fused_linear_grpo(
    hidden: Tensor,
    weight: Tensor,
    targets: Tensor,
    old_logp: Tensor | None,
    ref_logp: Tensor | None,
    advantages: Tensor,
    mask: Tensor,
    cfg: GRPOLossConfig,
    temperature: float = 1.0,
    num_tokens: float | Tensor | None = None,
    num_seqs: float | Tensor | None = None,
    rollout_logp: Tensor | None = None,
    ignore_index: int = -100,
    backend: str = "auto",
    chunk: int | None = None,
) -> tuple[Tensor, dict[str, Tensor]]:
    """`grpo_loss` of the tokens whose hidden states are `hidden` [N, D] under the LM head `weight`
    [V, D], with both gradients computed in this call.

    The tokens are the mask's, in row-major order: hidden [N, D] and targets [N] with N = mask.sum();
    old_logp, ref_logp and rollout_logp are [B, T] like the mask, advantages [B] or [B, T]; the rest
    is as in `grpo_loss` (an ignored target counts as a masked-out token). Returns (loss, metrics);
    the loss is differentiable w.r.t. hidden and weight. N = 0 gives a zero loss with zero
    gradients. backend: of the per-chunk epilogue: "cpp" (one C++ call: log-prob, entropy, token
    terms and the logits' gradient), or `logprob_from_logits`'s "triton" / "torch" with the token
    terms in torch; "auto" picks "cpp" for CPU tensors when it is built. chunk: rows per logits tile
    (default: from the device's memory budget).
    """
    check_float_matrix(hidden, "hidden")
    check_float_matrix(weight, "weight")
    if weight.shape[1] != hidden.shape[1] or weight.dtype != hidden.dtype or weight.device != hidden.device:
        raise ValueError(f"weight {list(weight.shape)} {weight.dtype} on {weight.device} does not match hidden "
                         f"{list(hidden.shape)} {hidden.dtype} on {hidden.device}")
    check_temperature(temperature)
    backend = check_backend(backend, hidden, "hidden")
    if mask.dim() != 2:
        raise ValueError(f"mask must be [B, T], got {list(mask.shape)}")
    m = mask != 0
    N = hidden.shape[0]
    if int(m.sum()) != N or tuple(targets.shape) != (N,):
        raise ValueError(f"hidden [N, D] and targets [N] must hold the mask's {int(m.sum())} tokens, got "
                         f"hidden {list(hidden.shape)} and targets {list(targets.shape)}")
    for name, t in (("old_logp", old_logp), ("ref_logp", ref_logp), ("rollout_logp", rollout_logp)):
        if t is not None and tuple(t.shape) != tuple(mask.shape):
            raise ValueError(f"{name} must be [B, T] = {list(mask.shape)}, got {list(t.shape)}")
    if tuple(advantages.shape) not in ((mask.shape[0],), tuple(mask.shape)):
        raise ValueError(f"advantages must be [B] or [B, T], got {list(advantages.shape)}")
    if cfg.kl_coef > 0 and ref_logp is None:
        raise ValueError("ref_logp is None but cfg.kl_coef > 0")
    valid = m.clone()
    valid[m] = targets != ignore_index
    # no on-policy fallback to logp here (grpo_loss has one): a sequence's weight needs all its
    # log-probs, and a chunk holds only some of its tokens; apply_rollout_is refuses old_logp None
    adv, is_metrics = apply_rollout_is(old_logp, rollout_logp, advantages, valid, cfg)
    adv = adv.float()
    adv = (adv[:, None] if adv.dim() == 1 else adv).expand(mask.shape)[m]
    w = grpo_token_weights(valid, cfg, num_tokens, num_seqs)[m]
    if N == 0:
        zero = (hidden.sum() + weight.sum()).float() * 0.0  # joins both to the graph: zero gradients
        return zero, {k: torch.zeros(()) for k in ("pg_loss", "clip_frac", "kl_mean", "ratio_min", "ratio_mean",
                                                    "ratio_max", "entropy_mean", "num_tokens_local")} | is_metrics
    old = old_logp[m] if old_logp is not None else None
    ref = ref_logp[m] if ref_logp is not None else None
    # rows of one [chunk, V] logits tile. The C++ epilogue rewrites the tile in place: a 48 MiB fp32
    # tile (393 rows at V = 32000) gives GEMMs of eager speed, since dW = sum dz^T h re-reads the
    # [V, D] accumulator once per chunk. The torch epilogue's fp32 temporaries take about 11 bytes
    # an element (measured): 8 bytes an element against the device's budget keeps it near that.
    if chunk is None:
        if backend == "cpp":
            chunk = chunk_rows(N, weight.shape[0], 4, CPU_INPLACE_TILE_BYTES)
        else:
            chunk = chunk_rows(N, weight.shape[0], 8, chunk_budget(hidden.device))
    metrics: dict[str, Tensor] = {}
    loss = _FusedLinearGRPO.apply(hidden, weight, targets, old, ref, adv, w, cfg, temperature, ignore_index,
                                  max(1, chunk), backend, metrics)
    return loss, {**metrics, **is_metrics}
