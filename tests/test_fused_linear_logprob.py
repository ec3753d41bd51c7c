"""fused_linear_logprob: the Triton kernels (interpreted on CPU) and the chunked torch reference
against the unfused formula log_softmax(h @ W.T / t) in fp64, forward and both gradients."""
import os

os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton is imported

import pytest
import torch
from conftest import assert_close

from racro_fast.kernels import fused_linear_logprob
from racro_fast.kernels.fused_linear_logprob import _fused_linear_logprob_triton
from racro_fast.kernels.reference import fused_linear_logprob_ref

IGNORE = -100
# (logp/entropy atol, gradient tolerance relative to the largest gradient entry)
TOL = {torch.float32: (2e-5, 2e-5), torch.bfloat16: (2e-5, 2e-2), torch.float64: (1e-10, 1e-10)}


def make_inputs(N, D, V, dtype, scale=3.0, seed=0, n_ignored=1):
    gen = torch.Generator().manual_seed(seed)
    h = torch.randn(N, D, generator=gen)
    W = torch.randn(V, D, generator=gen) * (scale / D**0.5)
    y = torch.randint(0, V, (N,), generator=gen)
    y[torch.randperm(N, generator=gen)[: min(n_ignored, N - 1)]] = IGNORE
    g = torch.randn(N, generator=gen)
    gH = torch.randn(N, generator=gen)
    return h.to(dtype), W.to(dtype), y, g, gH


def unfused(h, W, y, t):
    """fp64 logp and entropy from the full logits; the ground truth."""
    z = (h.double() @ W.double().t()) / t
    ls = torch.log_softmax(z, dim=-1)
    valid = y != IGNORE
    logp = ls.gather(1, y.clamp(min=0)[:, None]).squeeze(1) * valid
    H = -(ls.exp() * ls).sum(-1) * valid
    return logp, H


def outputs_and_grads(fn, h, W, y, g, gH, entropy_in_loss, **kw):
    """fn's outputs and the grads of sum(g logp) (+ sum(gH entropy)) w.r.t. h and W."""
    h = h.detach().clone().requires_grad_()
    W = W.detach().clone().requires_grad_()
    logp, H = fn(h, W, y, **kw)
    loss = (logp.double() * g.double()).sum()
    if entropy_in_loss:
        loss = loss + (H.double() * gH.double()).sum()
    dh, dW = torch.autograd.grad(loss, (h, W))
    return logp.detach(), None if H is None else H.detach(), dh, dW


def expected(h, W, y, g, gH, t, with_entropy):
    return outputs_and_grads(lambda h, W, y: unfused(h, W, y, t), h.double(), W.double(), y, g, gH, with_entropy)


def check_against(got, want, dtype, with_entropy, label):
    atol, gtol = TOL[dtype]
    logp, H, dh, dW = got
    logp_e, H_e, dh_e, dW_e = want
    assert logp.dtype == torch.float32 or dtype == torch.float64, f"{label}: logp dtype {logp.dtype}"
    assert_close(logp, logp_e, atol * max(1.0, logp_e.abs().max().item()), f"{label} logp")
    if with_entropy:
        assert_close(H, H_e, atol * max(1.0, H_e.abs().max().item()), f"{label} entropy")
    else:
        assert H is None, f"{label}: entropy returned without with_entropy"
    assert dh.dtype == dtype and dW.dtype == dtype, f"{label}: grad dtypes {dh.dtype}, {dW.dtype}"
    assert_close(dh, dh_e, gtol * dh_e.abs().max().item(), f"{label} dh")
    assert_close(dW, dW_e, gtol * dW_e.abs().max().item(), f"{label} dW")


CASES = [  # N, D, V, temperature, with_entropy
    (37, 32, 131, 1.0, False),
    (37, 32, 131, 0.7, True),
    (1, 16, 1000, 1.3, True),
    (20, 48, 257, 1.0, True),
    (24, 64, 1000, 0.7, False),
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("N,D,V,t,with_entropy", CASES)
def test_triton_and_reference_match_unfused(dtype, N, D, V, t, with_entropy):
    """Both paths at `dtype` against the fp64 result of the same (dtype-rounded) inputs."""
    h, W, y, g, gH = make_inputs(N, D, V, dtype)
    want = expected(h, W, y, g, gH, t, with_entropy)
    # chunk_rows=16 (one BLOCK_N) so the backward accumulates dW over several chunks.
    tri = outputs_and_grads(_fused_linear_logprob_triton, h, W, y, g, gH, with_entropy,
                            temperature=t, with_entropy=with_entropy, chunk_rows=16)
    check_against(tri, want, dtype, with_entropy, f"triton {dtype}")
    ref = outputs_and_grads(fused_linear_logprob_ref, h, W, y, g, gH, with_entropy,
                            temperature=t, with_entropy=with_entropy, chunk_rows=7, chunk_cols=50)
    check_against(ref, want, dtype, with_entropy, f"reference {dtype}")


def test_public_backends_agree_with_each_other():
    h, W, y, g, gH = make_inputs(19, 32, 200, torch.float32, seed=3)
    tri = outputs_and_grads(fused_linear_logprob, h, W, y, g, gH, True, with_entropy=True, temperature=0.9,
                            backend="triton")
    ref = outputs_and_grads(fused_linear_logprob, h, W, y, g, gH, True, with_entropy=True, temperature=0.9,
                            backend="torch")
    cpp = outputs_and_grads(fused_linear_logprob, h, W, y, g, gH, True, with_entropy=True, temperature=0.9,
                            backend="cpp")
    auto = outputs_and_grads(fused_linear_logprob, h, W, y, g, gH, True, with_entropy=True, temperature=0.9)
    for name, a, b, c, d in zip(("logp", "entropy", "dh", "dW"), tri, ref, cpp, auto):
        assert_close(a, b, 1e-5 * max(1.0, b.abs().max().item()), f"triton vs torch {name}")
        assert_close(c, b, 1e-5 * max(1.0, b.abs().max().item()), f"cpp vs torch {name}")
        assert torch.equal(c, d), f"auto on CPU must be the C++ path ({name} differs)"


@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_all_targets_ignored_gives_zeros(backend):
    h, W, _, g, gH = make_inputs(17, 32, 131, torch.float32)
    y = torch.full((17,), IGNORE)
    logp, H, dh, dW = outputs_and_grads(fused_linear_logprob, h, W, y, g, gH, True, with_entropy=True,
                                        backend=backend)
    for name, x in (("logp", logp), ("entropy", H), ("dh", dh), ("dW", dW)):
        assert torch.count_nonzero(x) == 0, f"{backend}: {name} has {torch.count_nonzero(x)} non-zeros"


def test_custom_ignore_index_and_int32_targets():
    h, W, y, g, gH = make_inputs(16, 32, 100, torch.float32)
    y = y.clamp(min=0)
    y[[2, 5]] = 7  # token 7 plays the padding id
    want_logp, want_H = unfused(h, W, torch.where(y == 7, IGNORE, y), 1.0)
    for backend in ("triton", "torch"):
        logp, H = fused_linear_logprob(h, W, y.int(), with_entropy=True, ignore_index=7, backend=backend)
        assert_close(logp, want_logp, 2e-5, f"{backend} logp")
        assert_close(H, want_H, 2e-5, f"{backend} entropy")


@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_huge_logits_stay_finite_and_exact(backend):
    """Logits ~1e4: the online logsumexp must not overflow; fp32 rounding of z is ~1e-3 there."""
    h, W, y, g, gH = make_inputs(20, 32, 131, torch.float32, scale=3.0)
    h = h * 3000.0
    logp_e, H_e, dh_e, dW_e = expected(h, W, y, g, gH, 1.0, True)
    assert (h.double() @ W.double().t()).abs().max() > 5e3, "test needs logits ~1e4"
    logp, H, dh, dW = outputs_and_grads(fused_linear_logprob, h, W, y, g, gH, True, with_entropy=True,
                                        backend=backend)
    assert_close(logp, logp_e, 2e-2, f"{backend} logp")
    assert_close(H, H_e, 2e-2, f"{backend} entropy")
    assert_close(dh, dh_e, 1e-2 * dh_e.abs().max().item(), f"{backend} dh")
    assert_close(dW, dW_e, 1e-2 * dW_e.abs().max().item(), f"{backend} dW")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["fp32", "fp64"])
@pytest.mark.parametrize("chunk_rows,chunk_cols", [(1, 10), (5, 97), (64, 13), (None, None)])
def test_reference_matches_log_softmax(dtype, chunk_rows, chunk_cols):
    """Row chunks in forward, [rows, cols] tiles in backward: every tiling gives the same result."""
    h, W, y, g, gH = make_inputs(23, 24, 97, dtype, seed=1, n_ignored=3)
    want = expected(h, W, y, g, gH, 1.3, True)
    got = outputs_and_grads(fused_linear_logprob_ref, h, W, y, g, gH, True, temperature=1.3,
                            with_entropy=True, chunk_rows=chunk_rows, chunk_cols=chunk_cols)
    assert got[0].dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    check_against(got, want, dtype, True, f"reference {dtype} tiles {chunk_rows}x{chunk_cols}")


def test_reference_gradcheck_logp_and_entropy():
    """Finite differences of both outputs, so the entropy-gradient derivation is checked independently."""
    h, W, y, _, _ = make_inputs(5, 6, 11, torch.float64, seed=2)
    h.requires_grad_()
    W.requires_grad_()
    assert torch.autograd.gradcheck(
        lambda h, W: fused_linear_logprob_ref(h, W, y, 0.8, True, IGNORE, chunk_rows=2, chunk_cols=4), (h, W)
    ), "gradcheck failed"


def test_only_hidden_requires_grad():
    h, W, y, g, _ = make_inputs(16, 32, 131, torch.float32)
    hh = h.clone().requires_grad_()
    for backend in ("triton", "torch"):
        hh.grad = None
        logp, _ = fused_linear_logprob(hh, W, y, backend=backend)
        (logp * g).sum().backward()
        dh_e = expected(h, W, y, g, g, 1.0, False)[2]
        assert_close(hh.grad, dh_e, 2e-5 * dh_e.abs().max().item(), f"{backend} dh with frozen weight")


def test_no_grad_forward():
    h, W, y, _, _ = make_inputs(16, 32, 131, torch.float32)
    with torch.no_grad():
        logp, H = fused_linear_logprob(h.requires_grad_(), W, y, with_entropy=True, backend="triton")
    assert not logp.requires_grad and not H.requires_grad
    assert_close(logp, unfused(h.detach(), W, y, 1.0)[0], 2e-5, "no-grad logp")


def _bad(**over):
    h, W, y, _, _ = make_inputs(8, 16, 50, torch.float32)
    kw = dict(hidden=h, weight=W, targets=y, temperature=1.0)
    kw.update(over)
    return kw


@pytest.mark.parametrize("kwargs,match", [
    (_bad(hidden=torch.randn(2, 8, 16)), "hidden"),
    (_bad(weight=torch.randn(50, 17)), "weight"),
    (_bad(weight=torch.randn(50, 16, dtype=torch.float64)), "weight dtype"),
    (_bad(hidden=torch.randint(0, 3, (8, 16))), "hidden"),
    (_bad(targets=torch.zeros(8)), "targets"),
    (_bad(targets=torch.zeros(7, dtype=torch.long)), "targets"),
    (_bad(targets=torch.full((8,), 50)), "targets"),
    (_bad(targets=torch.full((8,), -1)), "targets"),
    (_bad(temperature=0.0), "temperature"),
    (_bad(temperature=-1.0), "temperature"),
    (_bad(backend="cuda"), "backend"),
])
def test_bad_inputs_raise_value_error_naming_them(kwargs, match):
    with pytest.raises(ValueError, match=match):
        fused_linear_logprob(**kwargs)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.skipif(os.environ["TRITON_INTERPRET"] == "1", reason="set TRITON_INTERPRET=0 to compile the kernels")
def test_cuda_triton_matches_reference():
    h, W, y, g, gH = make_inputs(300, 256, 5000, torch.bfloat16)
    h, W, y, g, gH = h.cuda(), W.cuda(), y.cuda(), g.cuda(), gH.cuda()
    want = expected(h, W, y, g, gH, 0.7, True)
    got = outputs_and_grads(fused_linear_logprob, h, W, y, g, gH, True, temperature=0.7, with_entropy=True)
    check_against(got, want, torch.bfloat16, True, "cuda triton bf16")


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("with_entropy", [False, True])
def test_no_tokens(backend, with_entropy):
    """N = 0 (a rank whose micro-batch holds only empty captions): empty outputs, zero gradients for
    hidden and weight (so every rank's backward reaches the weight), no error in the launch settings."""
    h = torch.zeros(0, 32, requires_grad=True)
    W = torch.randn(70, 32, requires_grad=True)
    logp, H = fused_linear_logprob(h, W, torch.zeros(0, dtype=torch.long), 0.7, with_entropy, backend=backend)
    assert logp.shape == (0,) and logp.dtype == torch.float32
    assert (H is not None) == with_entropy and (H is None or H.shape == (0,))
    (logp.sum() + (H.sum() if H is not None else 0)).backward()
    assert h.grad.shape == (0, 32)
    assert W.grad is not None and W.grad.abs().max().item() == 0.0
