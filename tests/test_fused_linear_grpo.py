"""fused_linear_grpo against fused_linear_logprob + grpo_loss (and an fp64 unfused ground truth): loss,
metrics, both gradients, for every aggregation, KL type, dual-clip, entropy bonus, temperature,
ignored targets, several chunks, bf16, N = 0; and the three GEMMs it promises."""
from __future__ import annotations

import os

import pytest
import torch
from conftest import assert_close

from racro_fast.kernels import GRPOLossConfig, fused_linear_grpo, grpo_loss

IGNORE = -100
BACKENDS = ["torch", pytest.param("triton", marks=pytest.mark.skipif(
    os.environ.get("TRITON_INTERPRET") != "1" and not torch.cuda.is_available(), reason="no Triton backend here"))]


def make_case(B=3, T=9, D=32, V=101, seed=0, dtype=torch.float32, n_ignored=0):
    g = torch.Generator().manual_seed(seed)
    mask = torch.rand(B, T, generator=g) > 0.3
    mask[-1] = False
    mask[-1, 0] = True  # a row of one token
    N = int(mask.sum())
    h = torch.randn(N, D, generator=g, dtype=torch.float64)
    W = torch.randn(V, D, generator=g, dtype=torch.float64) * 0.4
    y = torch.randint(0, V, (N,), generator=g)
    if n_ignored:
        y[torch.randperm(N, generator=g)[:n_ignored]] = IGNORE
    # old and ref near the tokens' log-probs (about -4.6), so ratios cross the clip range both ways
    old = -4.6 + 0.5 * torch.randn(B, T, generator=g)
    ref = -4.6 + 0.5 * torch.randn(B, T, generator=g)
    adv = torch.randn(B, generator=g)
    return mask, h.to(dtype), W.to(dtype), y, old, ref, adv


def unfused(mask, h, W, y, old, ref, adv, cfg, t, num_tokens, num_seqs, rollout=None):
    """Ground truth: full fp64 logits, log-softmax, grpo_loss on the padded layout."""
    h = h.double().detach().requires_grad_()
    W = W.double().detach().requires_grad_()
    z = (h @ W.t()) / t
    ls = torch.log_softmax(z, -1)
    valid = y != IGNORE
    lp = ls.gather(1, y.clamp(min=0)[:, None]).squeeze(1) * valid
    H = -(ls.exp() * ls).sum(-1) * valid
    m = mask.clone()
    m[mask] = valid  # an ignored target is a masked-out token
    L = torch.zeros(mask.shape, dtype=torch.float64).masked_scatter(mask, lp)
    E = torch.zeros(mask.shape, dtype=torch.float64).masked_scatter(mask, H)
    loss, metrics = grpo_loss(L.float(), old, ref if cfg.kl_coef > 0 else None, adv, m, cfg, entropy=E.float(),
                              num_tokens=num_tokens, num_seqs=num_seqs, backend="torch", rollout_logp=rollout)
    gh, gW = torch.autograd.grad(loss, (h, W))
    return loss, metrics, gh, gW, m


def fused(mask, h, W, y, old, ref, adv, cfg, t, num_tokens, num_seqs, backend, chunk=None, scale=1.0,
          rollout=None):
    h = h.detach().requires_grad_()
    W = W.detach().requires_grad_()
    loss, metrics = fused_linear_grpo(h, W, y, old, ref if cfg.kl_coef > 0 else None, adv, mask, cfg, t,
                                      num_tokens, num_seqs, rollout_logp=rollout, backend=backend, chunk=chunk)
    (loss * scale).backward()
    return loss, metrics, h.grad / scale, W.grad / scale


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("agg", ["token-mean", "seq-mean-token-mean", "seq-mean-token-sum", "seq-mean-token-sum-norm"])
@pytest.mark.parametrize("kl_type", ["k1", "k2", "k3"])
def test_matches_unfused_fp32(backend, agg, kl_type):
    cfg = GRPOLossConfig(kl_coef=0.1, kl_type=kl_type, entropy_coef=0.05, loss_agg=agg, dual_clip=3.0, norm_len=12)
    case = make_case(seed=hash((agg, kl_type)) % 1000, n_ignored=2)
    loss_r, m_r, gh_r, gW_r, _ = unfused(*case, cfg, 0.7, 40.0, 5.0)
    loss, m, gh, gW = fused(*case, cfg, 0.7, 40.0, 5.0, backend, chunk=4, scale=3.0)  # several chunks
    assert_close(loss, loss_r, 1e-5, "loss")
    assert_close(gh, gh_r, 1e-5 * gh_r.abs().max().item(), "dhidden")
    assert_close(gW, gW_r, 1e-5 * gW_r.abs().max().item(), "dweight")
    for k, v in m_r.items():
        assert_close(m[k], v, 1e-5 * max(1.0, v.abs().item()), f"metric {k}")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dual_clip, entropy_coef, kl_coef, t", [(None, 0.0, 0.0, 1.0), (1.5, 0.0, 0.001, 1.3)])
def test_options(backend, dual_clip, entropy_coef, kl_coef, t):
    cfg = GRPOLossConfig(kl_coef=kl_coef, entropy_coef=entropy_coef, dual_clip=dual_clip)
    case = make_case(seed=7)
    loss_r, m_r, gh_r, gW_r, _ = unfused(*case, cfg, t, None, None)
    loss, m, gh, gW = fused(*case, cfg, t, None, None, backend)
    assert_close(loss, loss_r, 1e-5, "loss")
    assert_close(gh, gh_r, 1e-5 * gh_r.abs().max().item(), "dhidden")
    assert_close(gW, gW_r, 1e-5 * gW_r.abs().max().item(), "dweight")


def test_bf16_against_fp64():
    """bf16 inputs: within bf16's reach of the fp64 ground truth (the fp32 path is checked above)."""
    cfg = GRPOLossConfig(kl_coef=0.01, entropy_coef=0.01)
    mask, h, W, y, old, ref, adv = make_case(seed=3, V=257)
    loss_r, _, gh_r, gW_r, _ = unfused(mask, h, W, y, old, ref, adv, cfg, 1.0, None, None)
    loss, _, gh, gW = fused(mask, h.bfloat16(), W.bfloat16(), y, old, ref, adv, cfg, 1.0, None, None, "torch")
    assert_close(loss, loss_r, 2e-2 * max(1.0, loss_r.abs().item()), "loss")
    assert_close(gh.float(), gh_r, 3e-2 * gh_r.abs().max().item(), "dhidden")
    assert_close(gW.float(), gW_r, 3e-2 * gW_r.abs().max().item(), "dweight")


def test_three_gemms():
    """Forward + backward cost 3 x 2NDV matmul FLOPs (log-probs + loss through autograd cost 4: the
    log-prob op's backward recomputes the logits)."""
    from torch.utils.flop_counter import FlopCounterMode
    mask, h, W, y, old, ref, adv = make_case(B=4, T=16, D=64, V=300, seed=5)
    N, D, V = h.shape[0], h.shape[1], W.shape[0]
    with FlopCounterMode(display=False) as fc:
        fused(mask, h, W, y, old, ref, adv, GRPOLossConfig(), 1.0, None, None, "torch", chunk=16)
    assert fc.get_total_flops() == 3 * 2 * N * D * V, (fc.get_total_flops(), 2 * N * D * V)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("is_mode", ["token_tis", "seq_tis", "seq_mask"])
def test_rollout_is_matches_grpo_loss(backend, is_mode):
    """The rollout importance weights give the fused op what they give grpo_loss, metrics included."""
    cfg = GRPOLossConfig(kl_coef=0.01, entropy_coef=0.01, is_mode=is_mode, is_cap=1.5)
    mask, h, W, y, old, ref, adv = make_case(seed=11)
    rollout = old + 0.3 * torch.randn(mask.shape, generator=torch.Generator().manual_seed(2))
    loss_r, m_r, gh_r, gW_r, _ = unfused(mask, h, W, y, old, ref, adv, cfg, 1.0, None, None, rollout)
    loss, m, gh, gW = fused(mask, h, W, y, old, ref, adv, cfg, 1.0, None, None, backend, chunk=5, rollout=rollout)
    assert_close(loss, loss_r, 1e-5, "loss")
    assert_close(gh, gh_r, 1e-5 * gh_r.abs().max().item(), "dhidden")
    assert_close(gW, gW_r, 1e-5 * gW_r.abs().max().item(), "dweight")
    assert {"rollout_kl", "is_weight_mean", "is_weight_max", "is_clipped_frac"} <= set(m)
    for k, v in m_r.items():
        assert_close(m[k], v, 1e-5 * max(1.0, v.abs().item()), f"metric {k}")


@pytest.mark.parametrize("backend", BACKENDS)
def test_no_tokens(backend):
    h = torch.zeros(0, 16, requires_grad=True)
    W = torch.randn(30, 16, requires_grad=True)
    mask = torch.zeros(2, 3, dtype=torch.bool)
    loss, metrics = fused_linear_grpo(h, W, torch.zeros(0, dtype=torch.long), None, None, torch.zeros(2), mask,
                                      GRPOLossConfig(), backend=backend)
    loss.backward()
    assert loss.item() == 0.0 and metrics["num_tokens_local"].item() == 0
    assert h.grad.shape == (0, 16) and W.grad.abs().max().item() == 0.0


@pytest.mark.parametrize("change, match", [
    (dict(targets=torch.zeros(3, dtype=torch.long)), "targets"),
    (dict(ref_logp=torch.zeros(4)), "ref_logp"),
    (dict(ref_logp=None), "ref_logp"),
    (dict(weight=torch.zeros(30, 8)), "weight"),
    (dict(advantages=torch.zeros(3)), "advantages"),
    (dict(cfg=GRPOLossConfig(is_mode="seq_tis")), "old_logp"),
    (dict(cfg=GRPOLossConfig(is_mode="token_tis"), old_logp=torch.zeros(2, 2)), "rollout_logp"),
])
def test_rejects(change, match):
    mask = torch.ones(2, 2, dtype=torch.bool)
    args = dict(hidden=torch.zeros(4, 16), weight=torch.zeros(30, 16), targets=torch.zeros(4, dtype=torch.long),
                old_logp=None, ref_logp=torch.zeros(2, 2), advantages=torch.zeros(2), mask=mask,
                cfg=GRPOLossConfig(kl_coef=0.1))
    args.update(change)
    with pytest.raises(ValueError, match=match):
        fused_linear_grpo(**args)
