"""logprob_from_logits: the Triton kernels (interpreted on CPU) and the chunked torch reference
against log_softmax(logits / t) in fp64: forward, entropy, the in-place dlogits, the no-grad path."""
import os

os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton is imported

import pytest
import torch
from conftest import assert_close

from racro_fast.kernels import logprob_from_logits
from racro_fast.kernels.reference import logprob_from_logits_ref

IGNORE = -100
# (logp/entropy atol, dlogits tolerance relative to the largest entry)
TOL = {torch.float32: (2e-5, 2e-5), torch.bfloat16: (2e-5, 1e-2), torch.float64: (1e-10, 1e-10)}


def make_inputs(N, V, dtype, scale=3.0, seed=0, n_ignored=1):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(N, V, generator=gen) * scale
    y = torch.randint(0, V, (N,), generator=gen)
    y[torch.randperm(N, generator=gen)[: min(n_ignored, N - 1)]] = IGNORE
    return x.to(dtype), y, torch.randn(N, generator=gen), torch.randn(N, generator=gen)


def unfused(x, y, t):
    """fp64 logp and entropy from log_softmax; 0 log 0 counts as 0 so -inf logits are allowed."""
    ls = torch.log_softmax(x.double() / t, dim=-1)
    valid = y != IGNORE
    logp = ls.gather(1, y.clamp(min=0)[:, None]).squeeze(1) * valid
    H = -(ls.exp() * ls.masked_fill(torch.isinf(ls), 0.0)).sum(-1) * valid
    return logp, H


def outputs_and_grad(fn, x, y, g, gH, entropy_in_loss, **kw):
    """fn's outputs and d/dx of sum(g logp) (+ sum(gH entropy)); x is a fresh leaf the op may overwrite."""
    leaf = x.detach().clone().requires_grad_()
    logp, H = fn(leaf, y, **kw)
    loss = (logp.double() * g.double()).sum()
    if entropy_in_loss:
        loss = loss + (H.double() * gH.double()).sum()
    loss.backward()
    return logp.detach(), None if H is None else H.detach(), leaf.grad


def expected(x, y, g, gH, t, entropy_in_loss):
    return outputs_and_grad(lambda x, y: unfused(x, y, t), x.double(), y, g, gH, entropy_in_loss)


def check_against(got, want, dtype, with_entropy, label):
    atol, gtol = TOL[dtype]
    logp, H, dx = got
    logp_e, H_e, dx_e = want
    assert_close(logp, logp_e, atol * max(1.0, logp_e.abs().max().item()), f"{label} logp")
    if with_entropy:
        assert_close(H, H_e, atol * max(1.0, H_e.abs().max().item()), f"{label} entropy")
    else:
        assert H is None, f"{label}: entropy returned without with_entropy"
    assert dx.dtype == dtype, f"{label}: dlogits dtype {dx.dtype}"
    assert_close(dx, dx_e, gtol * dx_e.abs().max().item(), f"{label} dlogits")


CASES = [  # N, V, temperature, with_entropy
    (13, 131, 1.0, False),
    (13, 131, 0.7, True),
    (1, 1000, 1.3, True),
    (9, 5000, 1.0, True),  # several row blocks of the interpreter's 4096
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("N,V,t,with_entropy", CASES)
def test_triton_and_reference_match_unfused(dtype, N, V, t, with_entropy):
    """Both paths at `dtype` against the fp64 result of the same (dtype-rounded) logits."""
    x, y, g, gH = make_inputs(N, V, dtype)
    want = expected(x, y, g, gH, t, with_entropy)
    tri = outputs_and_grad(logprob_from_logits, x, y, g, gH, with_entropy, temperature=t,
                           with_entropy=with_entropy, backend="triton")
    check_against(tri, want, dtype, with_entropy, f"triton {dtype}")
    ref = outputs_and_grad(logprob_from_logits_ref, x, y, g, gH, with_entropy, temperature=t,
                           with_entropy=with_entropy, chunk_rows=4)
    check_against(ref, want, dtype, with_entropy, f"reference {dtype}")


@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_backward_writes_dlogits_into_the_logits_storage(backend):
    x, y, g, _ = make_inputs(6, 131, torch.float32)
    base = x.clone().requires_grad_()
    logits = base * 1.0  # a non-leaf, like an lm_head output
    logp, _ = logprob_from_logits(logits, y, backend=backend)
    assert torch.equal(logits.detach(), x), "forward must not touch the logits"
    (logp * g).sum().backward()
    dx_e = expected(x, y, g, g, 1.0, False)[2]
    assert_close(base.grad, dx_e, 2e-5 * dx_e.abs().max().item(), f"{backend}: dlogits")
    assert_close(logits.detach(), dx_e, 2e-5 * dx_e.abs().max().item(), f"{backend}: logits after backward")


@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_neg_inf_logits(backend):
    """Masked vocab entries (-inf) carry zero probability, zero entropy share and zero gradient."""
    x, y, g, gH = make_inputs(8, 131, torch.float32)
    x[:, 5:40] = float("-inf")
    x[0, :64] = float("-inf")       # a whole first block of the interpreter's tile is -inf
    x[1, :] = float("-inf")
    x[1, 70] = 2.0                  # a single finite logit: logp 0, entropy 0
    y = torch.where((y >= 5) & (y < 64), 100, y)
    y[1] = 70
    want = expected(x, y, g, gH, 0.7, True)
    got = outputs_and_grad(logprob_from_logits, x, y, g, gH, True, temperature=0.7, with_entropy=True,
                           backend=backend)
    check_against(got, want, torch.float32, True, f"{backend} -inf logits")
    assert got[0][1] == 0 and got[1][1] == 0, f"{backend}: one finite logit must give logp 0, entropy 0"
    assert torch.count_nonzero(got[2][:, 5:40]) == 0, f"{backend}: gradient reached -inf logits"


@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_huge_logits(backend):
    x, y, g, gH = make_inputs(8, 257, torch.float32, scale=1e4)
    want = expected(x, y, g, gH, 1.0, True)
    got = outputs_and_grad(logprob_from_logits, x, y, g, gH, True, with_entropy=True, backend=backend)
    logp, H, dx = got
    # Inputs are exact; the only error is fp32 rounding of z - lse at |z| ~ 1e4 (ulp ~1e-3).
    assert_close(logp, want[0], 4e-3, f"{backend} logp")
    assert_close(H, want[1], 1e-3, f"{backend} entropy")
    assert_close(dx, want[2], 1e-3 * want[2].abs().max().item(), f"{backend} dlogits")


@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_all_targets_ignored(backend):
    x, _, g, gH = make_inputs(5, 131, torch.float32)
    y = torch.full((5,), IGNORE)
    logp, H, dx = outputs_and_grad(logprob_from_logits, x, y, g, gH, True, with_entropy=True, backend=backend)
    for name, v in (("logp", logp), ("entropy", H), ("dlogits", dx)):
        assert torch.count_nonzero(v) == 0, f"{backend}: {name} has {torch.count_nonzero(v)} non-zeros"


@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_no_grad_path_matches_and_keeps_logits(backend):
    x, y, _, _ = make_inputs(7, 300, torch.bfloat16)
    big = torch.zeros(7, 320, dtype=torch.bfloat16)
    big[:, :300] = x
    view = big[:, :300]  # strided rows: the kernel reads through the strides, no copy
    logp, H = logprob_from_logits(view, y, temperature=1.3, with_entropy=True, backend=backend)
    logp_e, H_e = unfused(x, y, 1.3)
    assert_close(logp, logp_e, 2e-5 * logp_e.abs().max().item(), f"{backend} no-grad logp")
    assert_close(H, H_e, 2e-5 * H_e.abs().max().item(), f"{backend} no-grad entropy")
    assert torch.equal(view, x), "the no-grad path must not write the logits"


def test_non_contiguous_logits_with_grad():
    x, y, g, _ = make_inputs(6, 150, torch.float32)
    xt = x.t().contiguous().requires_grad_()  # [V, N] leaf; its transpose is a non-contiguous [N, V]
    logp, _ = logprob_from_logits(xt.t(), y, backend="triton")
    (logp * g).sum().backward()
    dx_e = expected(x, y, g, g, 1.0, False)[2]
    assert_close(xt.grad.t(), dx_e, 2e-5 * dx_e.abs().max().item(), "dlogits through a transposed view")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["fp32", "fp64"])
@pytest.mark.parametrize("chunk_rows", [1, 3, 64])
def test_reference_matches_log_softmax(dtype, chunk_rows):
    x, y, g, gH = make_inputs(11, 97, dtype, seed=1, n_ignored=3)
    want = expected(x, y, g, gH, 0.8, True)
    got = outputs_and_grad(logprob_from_logits_ref, x, y, g, gH, True, temperature=0.8, with_entropy=True,
                           chunk_rows=chunk_rows)
    assert got[0].dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    check_against(got, want, dtype, True, f"reference {dtype} chunk_rows={chunk_rows}")


def _bad(**over):
    x, y, _, _ = make_inputs(4, 50, torch.float32)
    kw = dict(logits=x, targets=y)
    kw.update(over)
    return kw


@pytest.mark.parametrize("kwargs,match", [
    (_bad(logits=torch.randn(2, 4, 50)), "logits"),
    (_bad(logits=torch.randint(0, 3, (4, 50))), "logits"),
    (_bad(targets=torch.zeros(4)), "targets"),
    (_bad(targets=torch.zeros(4, 1, dtype=torch.long)), "targets"),
    (_bad(targets=torch.full((4,), 50)), "targets"),
    (_bad(temperature=0.0), "temperature"),
    (_bad(temperature=float("nan")), "temperature"),
    (_bad(backend="triton", logits=torch.randn(4, 50, dtype=torch.float64)), "logits"),
    (_bad(backend="fast"), "backend"),
])
def test_bad_inputs_raise_value_error_naming_them(kwargs, match):
    with pytest.raises(ValueError, match=match):
        logprob_from_logits(**kwargs)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.skipif(os.environ["TRITON_INTERPRET"] == "1", reason="set TRITON_INTERPRET=0 to compile the kernels")
def test_cuda_triton_matches_reference():
    x, y, g, gH = make_inputs(300, 33000, torch.bfloat16)
    x, y, g, gH = x.cuda(), y.cuda(), g.cuda(), gH.cuda()
    want = expected(x, y, g, gH, 0.7, True)
    got = outputs_and_grad(logprob_from_logits, x, y, g, gH, True, temperature=0.7, with_entropy=True)
    check_against(got, want, torch.bfloat16, True, "cuda triton bf16")


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_no_tokens(backend):
    """N = 0: empty log-prob and entropy, and an empty gradient."""
    from racro_fast.kernels import logprob_from_logits as op
    z = torch.zeros(0, 70, requires_grad=True)
    logp, H = op(z, torch.zeros(0, dtype=torch.long), 0.7, with_entropy=True, backend=backend)
    assert logp.shape == (0,) and H.shape == (0,)
    logp.sum().backward()
    assert z.grad.shape == (0, 70)
