"""The benchmarks' Liger-Kernel providers compute what ours computes, on tiny CPU shapes.

Liger's Triton kernels run here under TRITON_INTERPRET=1 (set by conftest.py), so a wrong
argument order or a misread output in a provider fails here instead of skewing a GPU comparison.
"""
from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("liger_kernel")
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

import bench_fused_linear_logprob as bench_fused  # noqa: E402
import bench_grpo_loss as bench_grpo  # noqa: E402
import bench_logprob_from_logits as bench_logits  # noqa: E402

from racro_fast.kernels import GRPOLossConfig, fused_linear_logprob, grpo_loss, logprob_from_logits  # noqa: E402


@pytest.fixture
def lm_head():
    gen = torch.Generator().manual_seed(0)
    N, D, V = 24, 32, 100
    h = torch.randn(N, D, generator=gen).requires_grad_()
    W = (torch.randn(V, D, generator=gen) / D**0.5 * 3).requires_grad_()
    y = torch.randint(0, V, (N,), generator=gen)
    return h, W, y


def test_liger_fused_linear_ce_is_minus_sum_logp(lm_head):
    h, W, y = lm_head
    loss = bench_fused.make_provider("liger", h, W, y, interpreted=True)()
    ours = fused_linear_logprob(h, W, y)[0]
    torch.testing.assert_close(loss, -ours.sum(), rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(torch.autograd.grad(loss, (h, W)), torch.autograd.grad(-ours.sum(), (h, W)),
                               rtol=1e-4, atol=1e-5)


def test_liger_fused_linear_grpo_gradient_is_mean_logp_gradient(lm_head):
    h, W, y = lm_head
    f = bench_fused.make_provider("liger_grpo", h, W, y)
    assert not isinstance(f, str), f
    loss = f()
    # On-policy, beta 0, A = 1, token-mean: loss = -mean(exp(logp - sg(logp))) = -1 with the
    # gradient of -mean(logp).
    torch.testing.assert_close(loss, torch.tensor(-1.0))
    ours = fused_linear_logprob(h, W, y)[0]
    torch.testing.assert_close(torch.autograd.grad(loss, (h, W)), torch.autograd.grad(-ours.mean(), (h, W)),
                               rtol=1e-4, atol=1e-6)


def test_liger_cross_entropy_is_minus_sum_logp():
    gen = torch.Generator().manual_seed(1)
    x = (torch.randn(16, 77, generator=gen) * 3).requires_grad_()
    y = torch.randint(0, 77, (16,), generator=gen)
    ours = logprob_from_logits(x.detach(), y)[0]
    loss = bench_logits.make_provider("liger", x, y, "full", interpreted=True)(x)
    torch.testing.assert_close(loss, -ours.sum(), rtol=1e-5, atol=1e-4)


def test_liger_selective_log_softmax_scores_the_same_rows():
    gen = torch.Generator().manual_seed(2)
    x = torch.randn(16, 77, generator=gen) * 3
    y = torch.randint(0, 77, (16,), generator=gen)
    assert isinstance(bench_logits.make_provider("liger_sls", x, y, "full", interpreted=True), str)
    lp = bench_logits.make_provider("liger_sls", x, y, "nograd", interpreted=True)(x)
    assert lp.shape == (15,)  # N - 1 rows, as its docstring says
    torch.testing.assert_close(lp, logprob_from_logits(x, y)[0][:-1], rtol=1e-5, atol=1e-5)


def test_liger_grpo_loss_matches_ours():
    cfg = GRPOLossConfig(clip_low=0.2, clip_high=0.2, kl_coef=0.001, kl_type="k3", loss_agg="token-mean")
    x = bench_grpo.make_inputs(4, 32, torch.float32, torch.device("cpu"))
    logits, ids = bench_grpo.logits_with_logp(x["logp"].detach(), 8)
    torch.testing.assert_close(torch.log_softmax(logits[:, :-1], -1).gather(-1, ids[..., None]).squeeze(-1),
                               x["logp"].detach().clamp(max=-1e-6), rtol=1e-5, atol=1e-5)
    loss = bench_grpo.make_provider("liger", x, cfg, liger_vocab=8, interpreted=True)()
    torch.testing.assert_close(loss, grpo_loss(cfg=cfg, **x)[0], rtol=1e-5, atol=1e-6)


def test_fused_linear_grpo_providers_compute_one_loss(lm_head):
    """Every provider of bench_fused_linear_grpo gives the same loss (-1: on-policy, ratio 1, A = 1)
    and the same gradients, those of -mean(logp)."""
    import bench_fused_linear_grpo as bench_fg
    h, W, y = lm_head
    want_grads = torch.autograd.grad(-fused_linear_logprob(h, W, y)[0].mean(), (h, W))
    for name in ("ours", "two_ops", "torch", "liger_grpo"):
        loss = bench_fg.make_provider(name, h, W, y)()
        torch.testing.assert_close(loss, torch.tensor(-1.0), rtol=0, atol=1e-6, msg=lambda m: f"{name}: {m}")
        for g, w in zip(torch.autograd.grad(loss, (h, W)), want_grads):
            torch.testing.assert_close(g, w, rtol=1e-4, atol=1e-6, msg=lambda m: f"{name}: {m}")
