"""GRPO loss: the Triton kernel (interpreted on CPU) against the torch reference, the reference
against an unfused verl-style formula and hand-computed numbers, micro-batch accounting,
grpo_advantages, and input validation."""
import os

os.environ.setdefault("TRITON_INTERPRET", "1")  # must precede the first triton import

import math

import pytest
import torch

from racro_fast.kernels import GRPOLossConfig, grpo_advantages, grpo_loss

AGGS = ["token-mean", "seq-mean-token-mean", "seq-mean-token-sum", "seq-mean-token-sum-norm"]
INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"
needs_triton = pytest.mark.skipif(
    not INTERPRETED and not torch.cuda.is_available(),
    reason="the Triton path needs CUDA or TRITON_INTERPRET=1 set before triton was imported",
)


def assert_close(name, got, want, atol, rtol=0.0):
    got = torch.as_tensor(got).detach().float().cpu()
    want = torch.as_tensor(want).detach().float().cpu()
    assert got.shape == want.shape, f"{name}: shape {tuple(got.shape)} != {tuple(want.shape)}"
    assert torch.isfinite(got).all(), f"{name}: non-finite values at {(~torch.isfinite(got)).nonzero()[:5].tolist()}"
    diff = (got - want).abs()
    bad = diff > atol + rtol * want.abs()
    if bad.any():
        first = bad.nonzero()[0].tolist() if got.dim() else []
        raise AssertionError(
            f"{name}: max abs diff {diff.max().item():.3e}, mean {diff.mean().item():.3e}, "
            f"{int(bad.sum())} of {bad.numel()} over tolerance; first bad index {first}: "
            f"got {got[tuple(first)].item():.6g}, want {want[tuple(first)].item():.6g}"
        )


def make_inputs(B, T, dtype=torch.float32, seed=0, adv_per_token=False, spread=0.3):
    """Random log-probs whose ratios straddle the clip range, one empty row when B > 2."""
    g = torch.Generator().manual_seed(seed)
    logp = -3.0 * torch.rand(B, T, generator=g)
    old = logp + spread * torch.randn(B, T, generator=g)
    ref = logp + 0.5 * torch.randn(B, T, generator=g)
    adv = torch.randn((B, T) if adv_per_token else (B,), generator=g)
    lengths = torch.randint(1, T + 1, (B,), generator=g)
    mask = torch.arange(T)[None, :] < lengths[:, None]
    if B > 2:
        mask[1] = False
    entropy = 2.0 * torch.rand(B, T, generator=g)
    return dict(
        logp=logp.to(dtype).requires_grad_(),
        old_logp=old.to(dtype),
        ref_logp=ref.to(dtype),
        advantages=adv,
        mask=mask,
        entropy=entropy.to(dtype).requires_grad_(),
    )


def run(inputs, cfg, backend, with_entropy=True, **kw):
    """Loss, metrics and the gradients to logp (and entropy) of one call."""
    x = {k: (v.detach().clone().requires_grad_(v.requires_grad) if torch.is_tensor(v) else v)
         for k, v in inputs.items()}
    if not with_entropy:
        x["entropy"] = None
    loss, metrics = grpo_loss(cfg=cfg, backend=backend, **x, **kw)
    wrt = [x["logp"]] + ([x["entropy"]] if with_entropy else [])
    grads = torch.autograd.grad(loss, wrt) if loss.requires_grad else [torch.zeros_like(w) for w in wrt]
    return loss, metrics, grads


def compare(a, b, atol, rtol, grad_atol=None, grad_rtol=None, same_dtype=True):
    (la, ma, ga), (lb, mb, gb) = a, b
    assert_close("loss", la, lb, atol, rtol)
    assert set(ma) == set(mb), f"metric names differ: {sorted(ma)} vs {sorted(mb)}"
    for k in mb:
        assert ma[k].dtype == torch.float32 and ma[k].dim() == 0 and not ma[k].requires_grad, f"metric {k}"
        assert_close(f"metric {k}", ma[k], mb[k], atol, rtol)
    for name, x, y in zip(("dlogp", "dentropy"), ga, gb):
        assert x.dtype == y.dtype or not same_dtype, f"{name}: dtype {x.dtype} != {y.dtype}"
        assert_close(name, x, y, grad_atol or atol, grad_rtol or rtol)


# ---------------------------------------------------------------------------------------------
# Triton kernel vs torch reference
# ---------------------------------------------------------------------------------------------


@needs_triton
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("loss_agg", AGGS)
@pytest.mark.parametrize("kl_type", ["k1", "k2", "k3"])
@pytest.mark.parametrize("dual_clip", [None, 3.0], ids=["nodual", "dual"])
@pytest.mark.parametrize("with_entropy", [False, True], ids=["noent", "ent"])
def test_triton_matches_reference(dtype, loss_agg, kl_type, dual_clip, with_entropy):
    cfg = GRPOLossConfig(clip_low=0.2, clip_high=0.28, dual_clip=dual_clip, kl_coef=0.05, kl_type=kl_type,
                         entropy_coef=0.01 if with_entropy else 0.0, loss_agg=loss_agg)
    inputs = make_inputs(3, 37, dtype, seed=10 * AGGS.index(loss_agg) + int(kl_type[1]))
    # Dual clip only bites for A < 0 and large r: widen the spread so some tokens reach r > c.
    if dual_clip is not None:
        inputs["old_logp"] = (inputs["logp"].detach().float() - 1.5 * torch.rand(3, 37)).to(dtype)
    ours = run(inputs, cfg, "triton", with_entropy)
    want = run(inputs, cfg, "torch", with_entropy)
    if dtype == torch.float32:
        compare(ours, want, atol=2e-6, rtol=2e-5)
    else:
        # Both paths upcast the same bf16 inputs, so forward agrees to fp32 accuracy; the gradients
        # are rounded to bf16 at the end.
        compare(ours, want, atol=2e-6, rtol=2e-5, grad_atol=1e-6, grad_rtol=8e-3)
        exact = run({k: (v.detach().float().requires_grad_(v.requires_grad) if torch.is_tensor(v) else v)
                     for k, v in inputs.items()}, cfg, "torch", with_entropy)
        compare(ours, exact, atol=2e-6, rtol=2e-5, grad_atol=1e-6, grad_rtol=8e-3, same_dtype=False)
        compare(want, exact, atol=2e-6, rtol=2e-5, grad_atol=1e-6, grad_rtol=8e-3, same_dtype=False)


@needs_triton
@pytest.mark.parametrize(
    "B,T,adv_per_token",
    [(1, 1, False), (1, 5, False), (4, 2500, False), (3, 19, True), (5, 16, True)],
    ids=["B1T1", "B1T5", "multiblock", "adv2d", "adv2d-pow2"],
)
def test_triton_odd_shapes(B, T, adv_per_token):
    cfg = GRPOLossConfig(kl_coef=0.01, entropy_coef=0.02, loss_agg="seq-mean-token-mean", dual_clip=2.5)
    inputs = make_inputs(B, T, seed=B * 100 + T, adv_per_token=adv_per_token)
    compare(run(inputs, cfg, "triton"), run(inputs, cfg, "torch"), atol=2e-6, rtol=2e-5)


@needs_triton
def test_triton_non_contiguous_and_mask_dtypes():
    cfg = GRPOLossConfig(kl_coef=0.1, loss_agg="token-mean")
    base = make_inputs(4, 22, seed=3)
    want = run(base, cfg, "torch")
    # Every [B, T] input read through a transposed view, and the mask as float and as int.
    strided = dict(base)
    for k in ("logp", "old_logp", "ref_logp", "entropy"):
        v = base[k].detach().t().contiguous().t()
        strided[k] = v.requires_grad_(base[k].requires_grad)
    assert not strided["logp"].is_contiguous()
    for mask in (base["mask"].float(), base["mask"].to(torch.int32), base["mask"].t().contiguous().t()):
        strided["mask"] = mask
        compare(run(strided, cfg, "triton"), want, atol=2e-6, rtol=2e-5)


@needs_triton
@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_all_masked_batch_is_zero_not_nan(backend):
    for agg in AGGS:
        cfg = GRPOLossConfig(kl_coef=0.1, entropy_coef=0.1, loss_agg=agg)
        inputs = make_inputs(3, 7, seed=1)
        inputs["mask"] = torch.zeros(3, 7, dtype=torch.bool)
        loss, metrics, grads = run(inputs, cfg, backend)
        assert loss.requires_grad, f"{agg}: an empty batch must still give a loss with a graph"
        assert_close(f"{agg} loss", loss, torch.tensor(0.0), 0.0)
        for k, v in metrics.items():
            assert_close(f"{agg} metric {k}", v, torch.tensor(0.0), 0.0)
        for g in grads:
            assert_close(f"{agg} grad", g, torch.zeros_like(g), 0.0)


@needs_triton
@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_padding_values_never_leak(backend):
    """NaN/inf in masked-out positions of any input must not reach the loss or the gradients."""
    cfg = GRPOLossConfig(kl_coef=0.1, entropy_coef=0.1, dual_clip=3.0)
    inputs = make_inputs(3, 11, seed=2, adv_per_token=True)
    want = run(inputs, cfg, backend)
    dirty = dict(inputs)
    pad = ~inputs["mask"]
    for k, fill in (("logp", float("nan")), ("old_logp", float("inf")), ("ref_logp", float("-inf")),
                    ("entropy", float("nan")), ("advantages", float("nan"))):
        dirty[k] = inputs[k].detach().masked_fill(pad, fill).requires_grad_(inputs[k].requires_grad)
    got = run(dirty, cfg, backend)
    compare(got, want, atol=0.0, rtol=0.0)


@needs_triton
@pytest.mark.parametrize("kl_type", ["k1", "k2", "k3"])
@pytest.mark.parametrize("dual_clip", [None, 4.0], ids=["nodual", "dual"])
def test_triton_extreme_log_ratios(kl_type, dual_clip):
    """Log-ratios and KL inputs far past the +-20 clamps (and k3 past its +-10 output clamp), for
    both signs of the advantage, so every clamp boundary is crossed on an active branch."""
    cfg = GRPOLossConfig(kl_coef=0.1, kl_type=kl_type, dual_clip=dual_clip, loss_agg="seq-mean-token-sum")
    d = torch.tensor([-60.0, -20.0, -19.5, -5.0, -0.3, 0.0, 0.3, 5.0, 12.0, 19.5, 20.0, 60.0])
    logp = torch.full((4, 12), -30.0)
    sign = torch.tensor([1.0, 1.0, -1.0, -1.0])[:, None]
    inputs = dict(
        logp=logp.clone().requires_grad_(),
        old_logp=logp - sign * d,                  # logp - old = +-d
        ref_logp=logp - sign.flip(0) * d,          # ref - logp = -+d, paired differently
        advantages=torch.tensor([1.5, -0.7, 1.5, -0.7]),
        mask=torch.ones(4, 12, dtype=torch.bool),
        entropy=torch.rand(4, 12, generator=torch.Generator().manual_seed(0)).requires_grad_(),
    )
    ours, want = run(inputs, cfg, "triton"), run(inputs, cfg, "torch")
    compare(ours, want, atol=1e-5, rtol=2e-5)
    assert float(want[1]["ratio_max"]) == pytest.approx(math.exp(20.0), rel=1e-6)
    assert float(want[1]["ratio_min"]) == pytest.approx(math.exp(-20.0), rel=1e-6)
    # A < 0 with r = e^20 takes the unclipped branch: at log-ratio exactly 20 its gradient
    # -A r / num_seqs ~ 8.5e7 flows, past the clamp (log-ratio 60) only the bounded KL part remains.
    if dual_clip is None:
        dlogp = ours[2][0]
        assert abs(dlogp[1, 11]) < 100.0 < abs(dlogp[1, 10]), dlogp[1]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device: the compiled kernel cannot run")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("loss_agg", AGGS)
def test_cuda_matches_reference(dtype, loss_agg):
    cfg = GRPOLossConfig(kl_coef=0.01, entropy_coef=0.01, dual_clip=3.0, loss_agg=loss_agg)
    inputs = make_inputs(7, 3000, dtype, seed=11)
    gpu = {k: (v.detach().cuda().requires_grad_(v.requires_grad) if torch.is_tensor(v) else v)
           for k, v in inputs.items()}
    ours = run(gpu, cfg, "auto")
    ours = (ours[0].cpu(), {k: v.cpu() for k, v in ours[1].items()}, [g.cpu() for g in ours[2]])
    grad_rtol = 8e-3 if dtype == torch.bfloat16 else 1e-4
    compare(ours, run(inputs, cfg, "torch"), atol=1e-5, rtol=1e-4, grad_atol=1e-6, grad_rtol=grad_rtol)


# ---------------------------------------------------------------------------------------------
# Reference vs an independent unfused formula and hand-computed cases
# ---------------------------------------------------------------------------------------------


def unfused(logp, old_logp, ref_logp, advantages, mask, cfg, entropy, num_tokens=None, num_seqs=None):
    """verl's compute_policy_loss / kl_penalty / agg_loss written out term by term, per sequence."""
    lp, old, ref = logp.float(), old_logp.float(), ref_logp.float()
    A = advantages.float()[:, None] if advantages.dim() == 1 else advantages.float()
    ratio = torch.exp(torch.clamp(lp - old, -20.0, 20.0))
    pg1 = -A * ratio
    pg2 = -A * torch.clamp(ratio, 1 - cfg.clip_low, 1 + cfg.clip_high)
    pg = torch.maximum(pg1, pg2)
    if cfg.dual_clip is not None:
        pg = torch.where(A < 0, torch.minimum(pg, -A * cfg.dual_clip), pg)
    if cfg.kl_type == "k1":
        kl = lp - ref
    elif cfg.kl_type == "k2":
        kl = 0.5 * (lp - ref).square()
    else:
        kl_in = torch.clamp(ref - lp, min=-20, max=20)
        kl = torch.clamp(torch.exp(kl_in) - kl_in - 1, min=-10, max=10)
    token = pg + cfg.kl_coef * kl - cfg.entropy_coef * entropy.float()
    m = mask.float()
    if cfg.loss_agg == "token-mean":
        return (token * m).sum() / (m.sum() if num_tokens is None else num_tokens)
    per_seq = []
    for b in range(lp.shape[0]):
        n = m[b].sum()
        if n == 0:
            continue
        s = (token[b] * m[b]).sum()
        if cfg.loss_agg == "seq-mean-token-mean":
            per_seq.append(s / n)
        elif cfg.loss_agg == "seq-mean-token-sum":
            per_seq.append(s)
        else:
            per_seq.append(s / (cfg.norm_len or lp.shape[1]))
    return torch.stack(per_seq).sum() / (len(per_seq) if num_seqs is None else num_seqs)


@pytest.mark.parametrize("loss_agg", AGGS)
@pytest.mark.parametrize("kl_type", ["k1", "k2", "k3"])
@pytest.mark.parametrize("dual_clip", [None, 2.0])
def test_reference_matches_unfused(loss_agg, kl_type, dual_clip):
    cfg = GRPOLossConfig(clip_low=0.2, clip_high=0.3, dual_clip=dual_clip, kl_coef=0.2, kl_type=kl_type,
                         entropy_coef=0.05, loss_agg=loss_agg, norm_len=50)
    inputs = make_inputs(5, 33, seed=7, adv_per_token=True, spread=1.0)
    loss, _, (dlogp, dent) = run(inputs, cfg, "torch")
    x = {k: v.detach().clone().requires_grad_(v.requires_grad) for k, v in inputs.items()}
    want = unfused(cfg=cfg, **x)
    want_dlogp, want_dent = torch.autograd.grad(want, [x["logp"], x["entropy"]])
    assert_close("loss", loss, want, 1e-6, 1e-5)
    assert_close("dlogp", dlogp, want_dlogp, 1e-7, 1e-5)
    assert_close("dentropy", dent, want_dent, 1e-7, 1e-5)


BACKENDS = [pytest.param("torch"), pytest.param("triton", marks=needs_triton)]


def one_token(r, A, cfg, backend, ref_minus_logp=None):
    """A single response token with ratio r and advantage A; returns (loss, metrics, dloss/dlogp)."""
    logp = torch.tensor([[-1.0, 0.0]], requires_grad=True)
    old = logp.detach() - torch.tensor([[math.log(r), 0.0]])
    ref = None if ref_minus_logp is None else logp.detach() + torch.tensor([[ref_minus_logp, 0.0]])
    mask = torch.tensor([[True, False]])
    loss, metrics = grpo_loss(logp, old, ref, torch.tensor([A]), mask, cfg, backend=backend)
    (dlogp,) = torch.autograd.grad(loss, [logp])
    return loss.item(), metrics, dlogp[0, 0].item()


@pytest.mark.parametrize("backend", BACKENDS)
def test_hand_computed_clipping(backend):
    cfg = GRPOLossConfig(clip_low=0.2, clip_high=0.2)
    # r = 1.5, A = +1: max(-1.5, -1.2) = -1.2, the clipped term is active and flat in logp.
    loss, m, g = one_token(1.5, 1.0, cfg, backend)
    assert loss == pytest.approx(-1.2, abs=1e-6) and m["clip_frac"].item() == 1.0 and g == 0.0, (loss, m, g)
    # r = 0.5, A = -1: max(0.5, 0.8) = 0.8, clipped below.
    loss, m, g = one_token(0.5, -1.0, cfg, backend)
    assert loss == pytest.approx(0.8, abs=1e-6) and m["clip_frac"].item() == 1.0 and g == 0.0, (loss, m, g)
    # r = 1.5, A = -1: max(1.5, 1.2) = 1.5, unclipped; d(-A r)/dlogp = -A r = 1.5.
    loss, m, g = one_token(1.5, -1.0, cfg, backend)
    assert loss == pytest.approx(1.5, abs=1e-6) and m["clip_frac"].item() == 0.0 and g == pytest.approx(1.5, abs=1e-6)
    assert m["ratio_min"].item() == pytest.approx(1.5, abs=1e-6) == m["ratio_max"].item()
    # r = 1.1, A = +2 inside the range: -2.2, gradient -A r = -2.2.
    loss, m, g = one_token(1.1, 2.0, cfg, backend)
    assert loss == pytest.approx(-2.2, abs=1e-6) and g == pytest.approx(-2.2, abs=1e-6), (loss, g)


@pytest.mark.parametrize("backend", BACKENDS)
def test_hand_computed_dual_clip(backend):
    cfg = GRPOLossConfig(dual_clip=3.0)
    # A = -1, r = 5: pg = max(5, 1.2) = 5, then min(5, -A c = 3) = 3 with no gradient.
    loss, _, g = one_token(5.0, -1.0, cfg, backend)
    assert loss == pytest.approx(3.0, abs=1e-6) and g == 0.0, (loss, g)
    # A = -1, r = 2: below the bound, pg = 2 and gradient 2.
    loss, _, g = one_token(2.0, -1.0, cfg, backend)
    assert loss == pytest.approx(2.0, abs=1e-6) and g == pytest.approx(2.0, abs=1e-6), (loss, g)
    # A = +1, r = 5: dual clip does not apply to positive advantages: max(-5, -1.2) = -1.2.
    loss, _, g = one_token(5.0, 1.0, cfg, backend)
    assert loss == pytest.approx(-1.2, abs=1e-6) and g == 0.0, (loss, g)


@pytest.mark.parametrize("backend", BACKENDS)
def test_hand_computed_kl(backend):
    # ref - logp = ln 2, r = 1, A = 0 so the loss is beta * kl.
    d = math.log(2.0)
    cases = {"k1": -d, "k2": d * d / 2, "k3": 2.0 - d - 1.0}        # -0.693147, 0.240227, 0.306853
    grads = {"k1": 1.0, "k2": -d, "k3": 1.0 - 2.0}                   # d kl / d logp
    for kl_type, kl in cases.items():
        cfg = GRPOLossConfig(kl_coef=0.5, kl_type=kl_type)
        loss, m, g = one_token(1.0, 0.0, cfg, backend, ref_minus_logp=d)
        assert loss == pytest.approx(0.5 * kl, abs=1e-6), (kl_type, loss)
        assert m["kl_mean"].item() == pytest.approx(kl, abs=1e-6), (kl_type, m["kl_mean"])
        assert g == pytest.approx(0.5 * grads[kl_type], abs=1e-6), (kl_type, g)
    # k3 at ref - logp = 30: input clamped to 20, output exp(20) - 21 clamped to 10, no gradient.
    loss, m, g = one_token(1.0, 0.0, GRPOLossConfig(kl_coef=1.0), backend, ref_minus_logp=30.0)
    assert loss == pytest.approx(10.0) and g == 0.0, (loss, g)


@pytest.mark.parametrize("backend", BACKENDS)
def test_hand_computed_aggregations(backend):
    # On-policy (r = 1), no KL: every token's loss is -A. Row 0: A = 1 on 3 tokens, row 1: A = -2
    # on 1 token, row 2 empty. T = 4.
    logp = torch.zeros(3, 4, requires_grad=True)
    mask = torch.tensor([[1, 1, 1, 0], [1, 0, 0, 0], [0, 0, 0, 0]], dtype=torch.bool)
    adv = torch.tensor([1.0, -2.0, 5.0])
    expected = {
        "token-mean": (-3 + 2) / 4,                       # -0.25, weight 1/4 per token
        "seq-mean-token-mean": (-3 / 3 + 2 / 1) / 2,      # 0.5, weights 1/6 (row 0), 1/2 (row 1)
        "seq-mean-token-sum": (-3 + 2) / 2,               # -0.5, weight 1/2
        "seq-mean-token-sum-norm": (-3 + 2) / 4 / 2,      # -0.125, weight 1/8
    }
    weights = {"token-mean": (1 / 4, 1 / 4), "seq-mean-token-mean": (1 / 6, 1 / 2),
               "seq-mean-token-sum": (1 / 2, 1 / 2), "seq-mean-token-sum-norm": (1 / 8, 1 / 8)}
    for agg, want in expected.items():
        loss, metrics = grpo_loss(logp, None, None, adv, mask, GRPOLossConfig(loss_agg=agg), backend=backend)
        (dlogp,) = torch.autograd.grad(loss, [logp])
        assert loss.item() == pytest.approx(want, abs=1e-6), (agg, loss.item())
        assert metrics["pg_loss"].item() == pytest.approx(want, abs=1e-6), (agg, metrics["pg_loss"])
        w0, w1 = weights[agg]
        # d(-A r)/dlogp = -A on unclipped tokens, times the token's aggregation weight.
        want_grad = torch.tensor([[-w0] * 3 + [0.0], [2 * w1, 0, 0, 0], [0.0] * 4])
        assert_close(f"{agg} dlogp", dlogp, want_grad, 1e-7)
        assert metrics["num_tokens_local"].item() == 4.0
        assert metrics["ratio_mean"].item() == 1.0 and metrics["clip_frac"].item() == 0.0


# ---------------------------------------------------------------------------------------------
# Micro-batches with global counts
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("loss_agg", AGGS)
@pytest.mark.parametrize("count_as_tensor", [False, True], ids=["number", "tensor"])
def test_micro_batches_sum_to_big_batch(backend, loss_agg, count_as_tensor):
    cfg = GRPOLossConfig(kl_coef=0.05, entropy_coef=0.01, loss_agg=loss_agg, norm_len=12)
    inputs = make_inputs(6, 9, seed=13)
    inputs["mask"][4] = False                      # an empty row inside one micro-batch
    big_loss, _, (big_dlogp, big_dent) = run(inputs, cfg, backend)
    m = inputs["mask"]
    n_tok, n_seq = float(m.sum()), float((m.sum(1) > 0).sum())
    if count_as_tensor:
        n_tok, n_seq = torch.tensor(n_tok), torch.tensor(int(n_seq))
    total, dlogps, dents = 0.0, [], []
    for rows in (slice(0, 2), slice(2, 5), slice(5, 6)):
        part = {k: v[rows] for k, v in inputs.items()}
        loss, metrics, (dlogp, dent) = run(part, cfg, backend, num_tokens=n_tok, num_seqs=n_seq)
        assert metrics["num_tokens_local"].item() == float(m[rows].sum())
        total = total + loss
        dlogps.append(dlogp)
        dents.append(dent)
    assert_close("summed loss", total, big_loss, 1e-6, 1e-5)
    assert_close("dlogp", torch.cat(dlogps), big_dlogp, 1e-8, 1e-5)
    assert_close("dentropy", torch.cat(dents), big_dent, 1e-8, 1e-5)


# ---------------------------------------------------------------------------------------------
# Advantages
# ---------------------------------------------------------------------------------------------


def test_grpo_advantages_hand_computed():
    rewards = torch.tensor([1.0, 0.0, 0.0, 0.0, 1.0, 1.0, 1.0, 1.0, 0.0, 1.0, 1.0, 0.0], dtype=torch.float64)
    adv = grpo_advantages(rewards, group_size=4)
    # Group 0: mean 0.25, unbiased std sqrt((0.75^2 + 3 * 0.25^2) / 3) = 0.5 -> (1.5, -0.5, -0.5, -0.5).
    # Group 1: all equal -> zeros. Group 2: mean 0.5, std sqrt(4 * 0.25 / 3) = 0.57735 -> +-0.866025.
    s = 0.5 / math.sqrt(1 / 3)
    want = torch.tensor([1.5, -0.5, -0.5, -0.5, 0, 0, 0, 0, -s, s, s, -s])
    assert adv.dtype == torch.float32 and adv.shape == rewards.shape
    assert_close("advantages", adv, want, 1e-5)
    # Dr. GRPO: the centred rewards only.
    dr = grpo_advantages(rewards, group_size=4, scale_by_std=False)
    assert_close("dr-grpo advantages", dr, torch.tensor([0.75, -0.25, -0.25, -0.25, 0, 0, 0, 0,
                                                         -0.5, 0.5, 0.5, -0.5]), 1e-7)
    # Pairs: (1, 0) -> mean 0.5, unbiased std 0.70711 -> +-0.70711.
    pair = grpo_advantages(torch.tensor([1.0, 0.0, 3.0, 3.0]), group_size=2)
    assert_close("pair advantages", pair, torch.tensor([0.5 / math.sqrt(0.5), -0.5 / math.sqrt(0.5), 0, 0]), 1e-5)


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(rewards=torch.ones(7), group_size=4), "group_size"),
        (dict(rewards=torch.ones(8), group_size=1), "group_size"),
        (dict(rewards=torch.ones(2, 4), group_size=4), "rewards"),
        (dict(rewards=torch.ones(8), group_size=4, eps=0.0), "eps"),
    ],
)
def test_grpo_advantages_rejects(kwargs, match):
    with pytest.raises(ValueError, match=match):
        grpo_advantages(**kwargs)


# ---------------------------------------------------------------------------------------------
# Validation
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "field,value",
    [("clip_low", -0.1), ("clip_low", 1.0), ("clip_high", -0.2), ("dual_clip", 1.0), ("kl_coef", -1e-3),
     ("kl_type", "k4"), ("entropy_coef", float("nan")), ("loss_agg", "mean"), ("norm_len", 0)],
)
def test_config_rejects(field, value):
    with pytest.raises(ValueError, match=field):
        GRPOLossConfig(**{field: value})


@pytest.mark.parametrize(
    "change,match",
    [
        (dict(logp=torch.zeros(6)), "logp"),
        (dict(logp=torch.zeros(2, 3, dtype=torch.int64)), "logp"),
        (dict(old_logp=torch.zeros(2, 4)), "old_logp"),
        (dict(ref_logp=torch.zeros(2, 3, dtype=torch.float64)), "ref_logp"),
        (dict(mask=torch.ones(3, 3, dtype=torch.bool)), "mask"),
        (dict(advantages=torch.zeros(3)), "advantages"),
        (dict(advantages=torch.zeros(2, dtype=torch.int64)), "advantages"),
        (dict(entropy=torch.zeros(2, 2)), "entropy"),
        (dict(ref_logp=None), "ref_logp"),
        (dict(num_tokens=0), "num_tokens"),
        (dict(num_tokens=torch.ones(2)), "num_tokens"),
        (dict(num_seqs=float("inf")), "num_seqs"),
        (dict(cfg="token-mean"), "cfg"),
        (dict(backend="cuda"), "backend"),
    ],
)
def test_grpo_loss_rejects(change, match):
    args = dict(logp=torch.zeros(2, 3), old_logp=torch.zeros(2, 3), ref_logp=torch.zeros(2, 3),
                advantages=torch.zeros(2), mask=torch.ones(2, 3, dtype=torch.bool),
                cfg=GRPOLossConfig(kl_coef=0.1), entropy=None)
    args.update(change)
    with pytest.raises(ValueError, match=match):
        grpo_loss(**args)


@pytest.mark.parametrize("backend", BACKENDS)
def test_no_gradient_to_old_ref_adv(backend):
    inputs = make_inputs(2, 6, seed=4)
    for k in ("old_logp", "ref_logp", "advantages"):
        inputs[k] = inputs[k].detach().requires_grad_()
    loss, _ = grpo_loss(cfg=GRPOLossConfig(kl_coef=0.1), backend=backend, **inputs)
    grads = torch.autograd.grad(loss, [inputs["logp"], inputs["old_logp"], inputs["ref_logp"], inputs["advantages"]],
                                allow_unused=True)
    assert grads[0] is not None and grads[0].abs().sum() > 0
    for name, g in zip(("old_logp", "ref_logp", "advantages"), grads[1:]):
        assert g is None or g.abs().sum() == 0, f"{name} got a gradient: {g}"
