"""The GRPO loss's per-token terms, row weights and rollout importance weights in plain torch.

These run in production: the fused linear GRPO op takes its per-tile gradients through them on
every path, `grpo_loss` applies `rollout_is_weights` before its kernels, and `reference.grpo_loss_ref`
is built from them.
"""
from __future__ import annotations

import torch
from torch import Tensor

from .contract import GRPO_K3_INPUT_CLAMP, GRPO_K3_OUTPUT_CLAMP, GRPO_LOG_RATIO_CLAMP


def grpo_kl(logp: Tensor, ref_logp: Tensor, kl_type: str) -> Tensor:
    """Per-token KL estimate to the reference policy (fp32 inputs): k1, k2 or k3 (low_var_kl)."""
    if kl_type == "k1":
        return logp - ref_logp
    if kl_type == "k2":
        return 0.5 * (logp - ref_logp) ** 2
    d = (ref_logp - logp).clamp(-GRPO_K3_INPUT_CLAMP, GRPO_K3_INPUT_CLAMP)
    return (d.exp() - d - 1.0).clamp(-GRPO_K3_OUTPUT_CLAMP, GRPO_K3_OUTPUT_CLAMP)


def grpo_token_terms(x: Tensor, old: Tensor, ref: Tensor | None, adv: Tensor, ent: Tensor | None, cfg):
    """Per-token GRPO terms (fp32, any shape, broadcasting): token loss l = pg + beta kl - alpha H,
    and pg, kl (None without ref), ratio and the clipped-branch flag, from which the metrics follow.
    Each token's loss depends on its own log-prob and entropy only: that is what lets the fused
    linear GRPO op take the logits' gradient chunk by chunk."""
    log_ratio = (x - old).clamp(-GRPO_LOG_RATIO_CLAMP, GRPO_LOG_RATIO_CLAMP)
    ratio = log_ratio.exp()
    pg_unclipped = -adv * ratio
    pg_clipped = -adv * ratio.clamp(1.0 - cfg.clip_low, 1.0 + cfg.clip_high)
    # where() instead of maximum(): ties send the whole gradient to the unclipped branch, as the kernel does.
    clipped = pg_clipped > pg_unclipped
    pg = torch.where(clipped, pg_clipped, pg_unclipped)
    if cfg.dual_clip is not None:
        pg_dual = -adv * cfg.dual_clip
        pg = torch.where((adv < 0) & (pg > pg_dual), pg_dual, pg)
    token_loss = pg
    kl = None
    if ref is not None:
        kl = grpo_kl(x, ref, cfg.kl_type)
        if cfg.kl_coef != 0.0:
            token_loss = token_loss + cfg.kl_coef * kl
    if ent is not None:
        # Kept at coefficient 0 too, so a given entropy always receives a (zero) gradient.
        token_loss = token_loss - cfg.entropy_coef * ent
    return token_loss, pg, kl, ratio, clipped


def grpo_row_weights(
    row_count: Tensor, cfg, T: int, num_tokens: float | Tensor | None, num_seqs: float | Tensor | None
) -> tuple[Tensor, Tensor]:
    """Per-row weights u (B,) and 1/denominator such that loss = sum_b u_b sum_t m l / denominator.

    token-mean: u = 1, denominator = num_tokens; seq-mean-token-mean: u = 1/len_b (0 for an empty
    row); seq-mean-token-sum: u = 1; seq-mean-token-sum-norm: u = 1/norm_len; the seq-mean-* modes
    divide by num_seqs. A zero denominator gives 1/denominator = 0 so an empty batch costs 0, not NaN.
    """
    agg = cfg.loss_agg
    if agg == "token-mean":
        u = torch.ones_like(row_count)
        denom = row_count.sum() if num_tokens is None else num_tokens
    else:
        if agg == "seq-mean-token-mean":
            u = torch.where(row_count > 0, 1.0 / row_count.clamp(min=1.0), 0.0)
        elif agg == "seq-mean-token-sum":
            u = torch.ones_like(row_count)
        else:
            norm_len = T if cfg.norm_len is None else cfg.norm_len
            u = torch.full_like(row_count, 1.0 / norm_len)
        denom = (row_count > 0).float().sum() if num_seqs is None else num_seqs
    denom = torch.as_tensor(denom, dtype=torch.float32, device=row_count.device)
    inv_denom = torch.where(denom > 0, 1.0 / torch.where(denom > 0, denom, 1.0), 0.0)
    return u, inv_denom



# --------------------------------------------------------------------------------------------
# Rollout / trainer mismatch correction
# --------------------------------------------------------------------------------------------


def rollout_is_weights(old_logp: Tensor, rollout_logp: Tensor, mask: Tensor, mode: str, cap: float
                       ) -> tuple[Tensor, dict[str, Tensor]]:
    """Truncated importance weights [B, T] between the trainer's (old) and the rollout engine's
    log-probs of the sampled tokens, and their metrics.

    With delta = old - rollout per token (log pi_trainer / pi_rollout on the rollout's samples):
      token_tis  w_t = min(exp(delta_t), cap)
      seq_tis    w_b = min(exp(sum_t delta_t), cap), one weight per sequence (verl's rollout_is)
      seq_mask   w_b = 1 where exp(sum_t delta_t) <= cap, else 0 (the sequence is dropped)
    The weight multiplies the token's policy-gradient term, which is linear in the advantage for a
    fixed clip branch, so it is applied as a per-token advantage. Metrics: rollout_kl, the k3
    estimate of KL(rollout || trainer) per token; is_weight_mean / is_weight_max over tokens;
    is_clipped_frac, the fraction of tokens (token_tis) or sequences whose weight was capped or masked.
    """
    m = mask != 0
    mf = m.float()
    delta = (old_logp.detach().float() - rollout_logp.detach().float()).masked_fill(~m, 0.0)
    delta = delta.clamp(-GRPO_LOG_RATIO_CLAMP, GRPO_LOG_RATIO_CLAMP)
    n_tok = mf.sum().clamp(min=1.0)
    has = m.any(dim=1)
    if mode == "token_tis":
        raw = delta.exp()
        w = raw.clamp(max=cap)
        clipped = ((raw > cap) & m).float().sum() / n_tok
    else:
        raw_seq = delta.sum(dim=1).clamp(-GRPO_LOG_RATIO_CLAMP, GRPO_LOG_RATIO_CLAMP).exp()  # (B,)
        w_seq = raw_seq.clamp(max=cap) if mode == "seq_tis" else (raw_seq <= cap).float()
        w = w_seq[:, None].expand_as(delta)
        clipped = ((raw_seq > cap) & has).float().sum() / has.float().sum().clamp(min=1.0)
    w = w * mf
    k3 = (delta.exp() - delta - 1.0) * mf
    metrics = {"rollout_kl": k3.sum() / n_tok, "is_weight_mean": w.sum() / n_tok,
               "is_weight_max": w.max() if m.any() else w.new_zeros(()), "is_clipped_frac": clipped}
    return w, {k: v.detach().float() for k, v in metrics.items()}
