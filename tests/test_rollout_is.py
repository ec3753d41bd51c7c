"""Rollout / trainer mismatch correction: the weights against a direct formula for every mode, the
verl-style and TRL-style sequence corrections reproduced on the same inputs, and grpo_loss with the
weights equal to grpo_loss with the weighted advantages, on both backends, gradients included."""
from __future__ import annotations

import math
import os

import pytest
import torch
from conftest import assert_close

from racro_fast.kernels import GRPOLossConfig, grpo_loss
from racro_fast.kernels.grpo_terms import rollout_is_weights

BACKENDS = ["torch", pytest.param("triton", marks=pytest.mark.skipif(
    os.environ.get("TRITON_INTERPRET") != "1" and not torch.cuda.is_available(), reason="no Triton backend here"))]


def inputs(B=4, T=6, seed=0, spread=0.4):
    g = torch.Generator().manual_seed(seed)
    mask = torch.rand(B, T, generator=g) > 0.25
    mask[0] = True
    mask[-1] = False  # an empty row: weight 0, counted nowhere
    old = -2.0 + torch.randn(B, T, generator=g)
    rollout = old + spread * torch.randn(B, T, generator=g)
    return mask, old, rollout


def direct(mask, old, rollout, mode, cap):
    """The formulas, one token and one sequence at a time."""
    B, T = mask.shape
    w = torch.zeros(B, T)
    for b in range(B):
        toks = [t for t in range(T) if mask[b, t]]
        seq = math.exp(sum(float(old[b, t] - rollout[b, t]) for t in toks))
        for t in toks:
            if mode == "token_tis":
                w[b, t] = min(math.exp(float(old[b, t] - rollout[b, t])), cap)
            elif mode == "seq_tis":
                w[b, t] = min(seq, cap)
            else:
                w[b, t] = 1.0 if seq <= cap else 0.0
    return w


@pytest.mark.parametrize("mode", ["token_tis", "seq_tis", "seq_mask"])
@pytest.mark.parametrize("cap", [1.0, 2.0, 5.0])
def test_weights_match_the_formula(mode, cap):
    mask, old, rollout = inputs(seed=3)
    w, metrics = rollout_is_weights(old, rollout, mask, mode, cap)
    assert_close(w, direct(mask, old, rollout, mode, cap), 1e-5, f"{mode} weights")
    d = (old - rollout)[mask]
    assert_close(metrics["rollout_kl"], (d.exp() - d - 1).mean(), 1e-6, "rollout_kl (k3)")
    assert_close(metrics["is_weight_mean"], w[mask].mean(), 1e-6, "is_weight_mean")
    assert_close(metrics["is_weight_max"], w[mask].max(), 1e-6, "is_weight_max")


def test_verl_and_trl_sequence_corrections():
    """verl's sequence-level rollout_is (truncate at 2.0) and TRL's sequence truncate / mask at the same
    cap, written out from their definitions: the sequence ratio is exp of the summed per-token log
    ratio trainer - rollout; truncate caps it, mask zeroes the sequences above the cap."""
    mask, old, rollout = inputs(seed=5, spread=0.6)
    seq_ratio = ((old - rollout) * mask).sum(dim=1).exp()  # (B,)
    verl = torch.clamp(seq_ratio, max=2.0)[:, None] * mask
    trl_truncate = torch.clamp(seq_ratio, max=3.0)[:, None] * mask
    trl_mask = seq_ratio.masked_fill(seq_ratio > 3.0, 0.0)[:, None].gt(0).float() * mask
    assert_close(rollout_is_weights(old, rollout, mask, "seq_tis", 2.0)[0], verl, 1e-5, "verl rollout_is")
    assert_close(rollout_is_weights(old, rollout, mask, "seq_tis", 3.0)[0], trl_truncate, 1e-5, "TRL truncate")
    w, metrics = rollout_is_weights(old, rollout, mask, "seq_mask", 3.0)
    assert_close(w, trl_mask, 0, "TRL sequence_mask")
    rows = mask.any(dim=1)
    assert_close(metrics["is_clipped_frac"], (seq_ratio[rows] > 3.0).float().mean(), 1e-6, "masked fraction")


def test_long_sequences_compound():
    """A per-token gap of one sign (1% in log-prob) compounds over a 300-token caption into a
    sequence ratio far from 1, which seq_mask drops and seq_tis caps, while the token weights stay
    near 1. (The gap bench_rollout_is.py measures has no steady sign; its sequence log-ratio grows
    about as sqrt(length), which the sequence weights still pay for at long captions.)"""
    T = 300
    mask = torch.ones(2, T, dtype=torch.bool)
    old = torch.full((2, T), -1.0)
    rollout = old - torch.tensor([[0.01], [-0.01]])  # trainer 1% more / less likely, every token
    tok = rollout_is_weights(old, rollout, mask, "token_tis", 2.0)[0]
    seq = rollout_is_weights(old, rollout, mask, "seq_mask", 2.0)[0]
    assert tok.min() > 0.98 and tok.max() < 1.02
    assert seq[0].max() == 0.0, "exp(3) > 2: the whole caption is dropped"
    assert_close(rollout_is_weights(old, rollout, mask, "seq_tis", 2.0)[0][1], torch.full((T,), math.exp(-3.0)),
                 1e-6, "seq_tis of the other caption: exp(-3)")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("mode", ["token_tis", "seq_tis", "seq_mask"])
def test_grpo_loss_applies_the_weights(backend, mode):
    mask, old, rollout = inputs(seed=7)
    g = torch.Generator().manual_seed(1)
    logp = (old + 0.1 * torch.randn(mask.shape, generator=g)).requires_grad_()
    adv = torch.randn(mask.shape[0], generator=g)
    cfg = GRPOLossConfig(is_mode=mode, is_cap=1.5, dual_clip=3.0)
    loss, metrics = grpo_loss(logp, old, None, adv, mask, cfg, backend=backend, rollout_logp=rollout)
    (grad,) = torch.autograd.grad(loss, logp)
    w = direct(mask, old, rollout, mode, 1.5)
    x = logp.detach().requires_grad_()
    loss_d, _ = grpo_loss(x, old, None, adv[:, None] * w, mask, GRPOLossConfig(dual_clip=3.0), backend="torch")
    (grad_d,) = torch.autograd.grad(loss_d, x)
    assert_close(loss, loss_d, 1e-6, "loss")
    assert_close(grad, grad_d, 1e-6, "dlogp")
    assert set(metrics) >= {"rollout_kl", "is_weight_mean", "is_weight_max", "is_clipped_frac"}


def test_off_and_auto():
    mask, old, rollout = inputs()
    logp = old.clone().requires_grad_()
    adv = torch.ones(mask.shape[0])
    loss_off, m_off = grpo_loss(logp, old, None, adv, mask, GRPOLossConfig(), rollout_logp=rollout)
    assert "rollout_kl" not in m_off, "off: the rollout log-probs are not used"
    with pytest.raises(ValueError, match="is_mode: 'auto'"):
        grpo_loss(logp, old, None, adv, mask, GRPOLossConfig(is_mode="auto"), rollout_logp=rollout)
    with pytest.raises(ValueError, match="rollout_logp"):
        grpo_loss(logp, old, None, adv, mask, GRPOLossConfig(is_mode="token_tis"))
    with pytest.raises(ValueError, match="is_cap"):
        GRPOLossConfig(is_cap=0.5)
