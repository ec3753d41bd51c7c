"""The C++ CPU kernels (kernels/cpu, built by CMakeLists.txt) behind autograd: the GRPO loss forward /
backward, log-probs from logits, and the per-tile epilogues of the fused linear ops (the GEMMs stay
in ATen, here). Where the library is found and loaded: cpu_lib.py.
"""
from __future__ import annotations

import torch
from torch import Tensor

from .contract import GRPO_KL_TYPES, GRPO_LOSS_AGGS, GRPO_METRICS, IS_MODES
from .cpu_lib import ops as _ops
from .utils import lines_within_budget


# --------------------------------------------------------------------------------------------
# logprob_from_logits
# --------------------------------------------------------------------------------------------


def _upstream(d: Tensor | None, y: Tensor, like: Tensor) -> Tensor:
    """An upstream gradient as contiguous fp32, zero on ignored rows (their outputs are constants)."""
    g = torch.zeros_like(like) if d is None else d.float()
    return g.masked_fill(y < 0, 0.0).contiguous()


def logprob_fwd(logits: Tensor, y: Tensor, temperature: float, with_entropy: bool
                ) -> tuple[Tensor, Tensor, Tensor | None]:
    """logp, lse and entropy (None without with_entropy), fp32 [N]; y int64, -1 on ignored rows."""
    return _ops().logprob_fwd(logits, y, temperature, with_entropy)


def logprob_bwd_(logits: Tensor, y: Tensor, lse: Tensor, H: Tensor | None, dlogp: Tensor | None, dH: Tensor | None,
                 temperature: float, with_entropy: bool) -> None:
    """Write dL/dlogits over the (contiguous) logits."""
    ent = with_entropy and dH is not None
    _ops().dlogits_(logits, y, 0, temperature, lse, H if ent else None, _upstream(dlogp, y, lse),
                    _upstream(dH, y, lse) if ent else None)


# --------------------------------------------------------------------------------------------
# fused_linear_logprob: ATen GEMMs on [rows, cols] tiles, the C++ epilogue between them
# --------------------------------------------------------------------------------------------


class _FusedLinearLogprob(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden: Tensor, weight: Tensor, y: Tensor, temperature: float, with_entropy: bool,
                rows: int, cols: int):
        ops = _ops()
        N, V = hidden.shape[0], weight.shape[0]
        m = torch.full((N,), -3.0e38)  # kMaxFloor of kernels/cpu/common.h: a finite start for the running max
        s, zy = torch.zeros(N), torch.zeros(N)
        a = torch.zeros(N) if with_entropy else None
        # bf16 / fp16 tiles are multiplied in fp32 (one [cols, D] cast per tile, not a copy of W)
        h32 = hidden.float()
        for i in range(0, N, rows):
            h_i = h32[i:i + rows]
            for j in range(0, V, cols):
                z = torch.mm(h_i, weight[j:j + cols].float().t())
                ops.lse_tile_update_(z, y[i:i + rows], j, temperature, m[i:i + rows], s[i:i + rows],
                                     None if a is None else a[i:i + rows], zy[i:i + rows])
                del z
        log_s = s.log()
        lse = m + log_s
        valid = y >= 0
        logp = (zy - lse).masked_fill_(~valid, 0.0)
        H = (log_s - a / s).masked_fill_(~valid, 0.0) if with_entropy else None
        ctx.save_for_backward(hidden, weight, y, lse, H)
        ctx.temperature, ctx.with_entropy, ctx.tile = temperature, with_entropy, (rows, cols)
        return logp, H

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, dlogp: Tensor | None, dH: Tensor | None):
        ops = _ops()
        hidden, weight, y, lse, H = ctx.saved_tensors
        (rows, cols), t = ctx.tile, ctx.temperature
        need_h, need_w = ctx.needs_input_grad[:2]
        N, D = hidden.shape
        V = weight.shape[0]
        ent = ctx.with_entropy and dH is not None
        g, gH = _upstream(dlogp, y, lse), (_upstream(dH, y, lse) if ent else None)
        h32 = hidden.float()
        dh = torch.zeros(N, D) if need_h else None
        dw = torch.empty(V, D) if need_w else None
        for i in range(0, N, rows):
            h_i, sl = h32[i:i + rows], slice(i, i + rows)
            for j in range(0, V, cols):
                w_j = weight[j:j + cols].float()
                dz = torch.mm(h_i, w_j.t())
                ops.dlogits_(dz, y[sl], j, t, lse[sl], H[sl] if ent else None, g[sl], gH[sl] if ent else None)
                if need_h:
                    dh[sl].addmm_(dz, w_j)
                if need_w:
                    if i == 0:
                        torch.mm(dz.t(), h_i, out=dw[j:j + cols])
                    else:
                        dw[j:j + cols].addmm_(dz.t(), h_i)
                del dz
        dh = dh.to(hidden.dtype) if need_h else None
        dw = dw.to(weight.dtype) if need_w else None
        return dh, dw, None, None, None, None, None


def fused_linear_logprob(hidden: Tensor, weight: Tensor, y: Tensor, temperature: float, with_entropy: bool
                         ) -> tuple[Tensor, Tensor | None]:
    """The C++ path of `fused_linear_logprob` (tiles as in the reference); y int64 with -1 on ignored rows."""
    N, V = hidden.shape[0], weight.shape[0]
    rows = min(N, 2048)
    cols = lines_within_budget(V, rows, hidden.device, None)
    return _FusedLinearLogprob.apply(hidden, weight, y, float(temperature), bool(with_entropy), rows, cols)


# --------------------------------------------------------------------------------------------
# grpo_loss
# --------------------------------------------------------------------------------------------

_AGG_ID = {name: i for i, name in enumerate(GRPO_LOSS_AGGS)}
_KL_ID = {name: i + 1 for i, name in enumerate(GRPO_KL_TYPES)}
_IS_ID = {"off": 0, "token_tis": 1, "seq_tis": 2, "seq_mask": 3}
assert set(_IS_ID) == set(IS_MODES) - {"auto"}
IS_METRICS = ("rollout_kl", "is_weight_mean", "is_weight_max", "is_clipped_frac")


def _cfg_args(cfg) -> tuple:
    """The loss settings as the ops' clip_low, clip_high, dual_clip (0 = off), kl_coef, kl_type, entropy_coef."""
    return (float(cfg.clip_low), float(cfg.clip_high), float(cfg.dual_clip or 0.0), float(cfg.kl_coef),
            _KL_ID[cfg.kl_type], float(cfg.entropy_coef))


class _GRPOLoss(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logp, old, ref, adv, mask, entropy, rollout, cfg, denom):
        T = logp.shape[1]
        inv_norm_len = 1.0 / (T if cfg.norm_len is None else cfg.norm_len)
        loss, out, u = _ops().grpo_loss_fwd(logp, old, ref, adv, mask, entropy, rollout, *_cfg_args(cfg),
                                            _AGG_ID[cfg.loss_agg], inv_norm_len, _IS_ID[cfg.is_mode],
                                            float(cfg.is_cap), denom)
        ctx.save_for_backward(logp, old, ref, adv, mask, rollout, u, out)
        ctx.cfg = cfg
        ctx.mark_non_differentiable(out)
        return loss, out

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, dloss, _dout):
        logp, old, ref, adv, mask, rollout, u, out = ctx.saved_tensors
        cfg = ctx.cfg
        need_dent = ctx.needs_input_grad[5]
        dlogp, dent = _ops().grpo_loss_bwd(dloss, logp, old, ref, adv, mask, rollout, u, out, *_cfg_args(cfg),
                                           _IS_ID[cfg.is_mode], float(cfg.is_cap), need_dent)
        return dlogp, None, None, None, None, dent if need_dent else None, None, None, None


def grpo_loss(logp, old_logp, ref_logp, advantages, mask, cfg, entropy, num_tokens, num_seqs, rollout_logp
              ) -> tuple[Tensor, dict[str, Tensor]]:
    """The C++ path of `grpo_loss` (inputs validated by it), the rollout weights computed in the op."""
    denom = num_tokens if cfg.loss_agg == "token-mean" else num_seqs
    denom = -1.0 if denom is None else float(denom)  # a CPU tensor: no device sync to speak of
    detach = (lambda x: None if x is None else x.detach())
    is_on = cfg.is_mode != "off"
    loss, out = _GRPOLoss.apply(logp, detach(old_logp), detach(ref_logp), advantages.detach(), mask, entropy,
                                detach(rollout_logp) if is_on else None, cfg, denom)
    values = out.unbind()
    names = GRPO_METRICS if entropy is not None else tuple(n for n in GRPO_METRICS if n != "entropy_mean")
    metrics = {name: values[GRPO_METRICS.index(name)] for name in names}
    if is_on:
        metrics.update({name: values[len(GRPO_METRICS) + 1 + k] for k, name in enumerate(IS_METRICS)})
    return loss, metrics


# --------------------------------------------------------------------------------------------
# fused_linear_grpo's per-chunk epilogue
# --------------------------------------------------------------------------------------------


def grpo_epilogue_(z: Tensor, y: Tensor, temperature: float, old: Tensor | None, ref: Tensor | None, adv: Tensor,
                   w: Tensor, cfg) -> Tensor:
    """Write d(sum_n w_n l_n)/dz over the logits chunk z [rows, V] (h W^T) and return the per-row
    terms [rows, 8]: w l, w pg, clipped, kl, ratio, H, logp, valid (see kernels/cpu/logprob.cpp)."""
    return _ops().grpo_epilogue_(z, y, temperature, old, ref, adv, w, *_cfg_args(cfg))
