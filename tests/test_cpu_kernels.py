"""The C++ CPU kernels (kernels/cpu, built by `make test` through CMakeLists.txt) against the torch
references: every aggregation, KL type, dual-clip, entropy bonus and rollout-weight mode of the GRPO
loss; log-probs from logits; the epilogues of the fused linear ops; fp32 and bf16, odd shapes,
fully masked rows, N = 0, -inf and huge logits, every gradient; and the dispatch and its fallback."""
from __future__ import annotations

import itertools
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from racro_fast.kernels import (GRPOLossConfig, cpu_lib, fused_linear_grpo, fused_linear_logprob, grpo_loss,
                                logprob_from_logits)
from racro_fast.kernels.utils import check_backend

ROOT = Path(__file__).resolve().parents[1]
AGGS = ("token-mean", "seq-mean-token-mean", "seq-mean-token-sum", "seq-mean-token-sum-norm")
IS_MODES = ("off", "token_tis", "seq_tis", "seq_mask")
# bf16 inputs are read as fp32 by both paths; what differs is the order of fp32 sums
TOL = {torch.float32: dict(rtol=2e-5, atol=2e-6), torch.bfloat16: dict(rtol=2e-2, atol=2e-3)}


def test_library_is_built():
    """`make test` builds the library (scripts/setup.sh cpu-kernels); the tests below need it."""
    assert cpu_lib.available(), cpu_lib.unavailable_reason()
    assert check_backend("auto", torch.zeros(1, 1), "x") == "cpp"
    assert check_backend("auto", torch.zeros(1, 1, dtype=torch.float64), "x") == "torch"  # fp64: the reference


def _grpo_inputs(B, T, dtype, gen, per_token_adv=False):
    logp = (-2.0 * torch.rand(B, T, generator=gen)).to(dtype)
    old = (logp.float() + 0.3 * torch.randn(B, T, generator=gen)).to(dtype)
    ref = (logp.float() + 0.3 * torch.randn(B, T, generator=gen)).to(dtype)
    rollout = old.float() + 0.1 * torch.randn(B, T, generator=gen)
    adv = torch.randn(B, T, generator=gen) if per_token_adv else torch.randn(B, generator=gen)
    mask = torch.rand(B, T, generator=gen) > 0.3
    mask[1] = False  # a fully masked row
    logp[~mask] = float("nan")  # padding may hold anything
    ent = torch.rand(B, T, generator=gen).to(dtype)
    return logp, old, ref, rollout, adv, mask, ent


def _run_grpo(backend, logp, old, ref, adv, mask, cfg, ent, rollout, num_tokens=None, num_seqs=None):
    x = logp.clone().requires_grad_()
    e = None if ent is None else ent.clone().requires_grad_()
    loss, metrics = grpo_loss(x, old, ref, adv, mask, cfg, entropy=e, num_tokens=num_tokens, num_seqs=num_seqs,
                              backend=backend, rollout_logp=rollout)
    loss.backward()
    return loss.detach(), metrics, x.grad, None if e is None else e.grad


def _assert_same(a, b, tol):
    (la, ma, ga, ea), (lb, mb, gb, eb) = a, b
    torch.testing.assert_close(lb, la, **tol)
    assert set(ma) == set(mb)
    for k in ma:
        torch.testing.assert_close(mb[k], ma[k], **tol, msg=lambda m: f"metric {k}: {m}")
    torch.testing.assert_close(gb.float(), ga.float(), **tol)
    assert torch.isfinite(gb).all()
    if ea is not None:
        torch.testing.assert_close(eb.float(), ea.float(), **tol)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("agg", AGGS)
def test_grpo_loss_every_setting(agg, dtype):
    gen = torch.Generator().manual_seed(0)
    for kl_type, dual, is_mode, with_ent, per_token in itertools.product(
            ("k1", "k2", "k3"), (None, 3.0), IS_MODES, (False, True), (False, True)):
        logp, old, ref, rollout, adv, mask, ent = _grpo_inputs(5, 37, dtype, gen, per_token)
        cfg = GRPOLossConfig(clip_low=0.2, clip_high=0.28, dual_clip=dual, kl_coef=0.05, kl_type=kl_type,
                             entropy_coef=0.01 if with_ent else 0.0, loss_agg=agg, norm_len=40, is_mode=is_mode,
                             is_cap=1.5)
        args = (logp, old, ref, adv, mask, cfg, ent if with_ent else None, rollout)
        _assert_same(_run_grpo("torch", *args), _run_grpo("cpp", *args), TOL[dtype])


@pytest.mark.parametrize("is_mode", IS_MODES)
def test_grpo_loss_on_policy_no_ref_and_denominators(is_mode):
    """old None (on-policy: old = logp), no reference, and the global counts as numbers and tensors."""
    gen = torch.Generator().manual_seed(1)
    logp, _, _, rollout, adv, mask, _ = _grpo_inputs(4, 19, torch.float32, gen)
    for agg, denom in itertools.product(AGGS, (None, 11.0, torch.tensor(7.0))):
        cfg = GRPOLossConfig(loss_agg=agg, is_mode=is_mode)
        kw = dict(num_tokens=denom, num_seqs=denom)
        a = _run_grpo("torch", logp, None, None, adv, mask, cfg, None, rollout, **kw)
        b = _run_grpo("cpp", logp, None, None, adv, mask, cfg, None, rollout, **kw)
        _assert_same(a, b, TOL[torch.float32])


def test_grpo_loss_empty_and_extreme():
    """An all-masked batch costs 0 with zero gradients; log-ratios past the +-20 clamp match too."""
    cfg = GRPOLossConfig(kl_coef=0.1, dual_clip=2.0, is_mode="seq_tis")
    logp = torch.randn(3, 8)
    mask = torch.zeros(3, 8, dtype=torch.bool)
    b = _run_grpo("cpp", logp, logp + 1, logp, torch.randn(3), mask, cfg, None, logp)
    assert b[0].item() == 0.0 and not b[2].any()
    mask[0, :5] = True
    far = logp.clone()
    far[0, :3] += 30.0  # |log ratio| > 20 and a k3 past its +-10 clamp
    args = (far, logp, logp - 25.0, torch.tensor([-1.0, 2.0, 0.5]), mask, cfg, None, logp)
    _assert_same(_run_grpo("torch", *args), _run_grpo("cpp", *args), TOL[torch.float32])


def _assert_close_rows(actual, expected, logits, t):
    """Within fp32 rounding of each row: z / t and its logsumexp are rounded at the scale of the
    row's largest |z| / t (a 1e3-scaled row carries 1e-4 of rounding), so the bound grows with it."""
    scale = logits.float().abs().nan_to_num(posinf=0.0).amax(dim=1).clamp(min=1.0) / t
    bound = 2e-6 + 4e-7 * scale
    err = (actual.float() - expected.float()).abs()
    assert (err <= (bound if err.dim() == 1 else bound[:, None])).all(), err.max()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("with_entropy", [False, True])
def test_logprob_from_logits(dtype, with_entropy):
    gen = torch.Generator().manual_seed(2)
    N, V = 7, 1003  # a vocab no vector width divides
    logits = (3.0 * torch.randn(N, V, generator=gen)).to(dtype)
    logits[0, 5] = float("-inf")
    logits[2] *= 1e3  # huge logits
    y = torch.randint(0, V, (N,), generator=gen)
    y[3] = -100
    for t in (1.0, 0.7):
        outs = {}
        for backend in ("torch", "cpp"):
            x = logits.clone().requires_grad_()
            logp, H = logprob_from_logits(x, y, temperature=t, with_entropy=with_entropy, backend=backend)
            (logp.sum() + (0.3 * H.sum() if with_entropy else 0)).backward()
            outs[backend] = (logp, H, x.grad.float())
        for a, b in zip(outs["torch"], outs["cpp"]):
            if a is not None:
                _assert_close_rows(b, a, logits, t)
        assert outs["cpp"][0][3] == 0 and not outs["cpp"][2][3].any()  # the ignored row
    empty, H = logprob_from_logits(torch.zeros(0, V, dtype=dtype), torch.zeros(0, dtype=torch.long),
                                   with_entropy=True, backend="cpp")
    assert empty.shape == (0,) and H.shape == (0,)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fused_linear_logprob(dtype):
    gen = torch.Generator().manual_seed(3)
    N, D, V = 131, 48, 4099
    h = torch.randn(N, D, generator=gen).to(dtype)
    W = (0.2 * torch.randn(V, D, generator=gen)).to(dtype)
    y = torch.randint(0, V, (N,), generator=gen)
    y[5] = -100
    outs = {}
    for backend in ("torch", "cpp"):
        hh, WW = h.clone().requires_grad_(), W.clone().requires_grad_()
        logp, H = fused_linear_logprob(hh, WW, y, temperature=0.9, with_entropy=True, backend=backend)
        (logp.sum() + 0.2 * H.sum()).backward()
        outs[backend] = (logp, H, hh.grad, WW.grad)
    tol = dict(rtol=1e-4, atol=1e-5) if dtype == torch.float32 else dict(rtol=2e-2, atol=2e-3)
    for a, b in zip(outs["torch"], outs["cpp"]):
        torch.testing.assert_close(b.float(), a.float(), **tol)


def test_epilogues_tile_by_tile():
    """lse_tile_update_ over column tiles equals one pass over the row; dlogits_ on a tile equals
    the same columns of the full-row gradient."""
    ops = torch.ops.racro_fast
    gen = torch.Generator().manual_seed(4)
    N, V = 9, 1000
    z = 4.0 * torch.randn(N, V, generator=gen)
    z[1, :300] = float("-inf")
    y = torch.randint(0, V, (N,), generator=gen)
    y[2] = -1
    logp, lse, H = ops.logprob_fwd(z, y, 1.0, True)
    m, s, a, zy = torch.full((N,), -3.0e38), torch.zeros(N), torch.zeros(N), torch.zeros(N)
    for j in range(0, V, 128):
        ops.lse_tile_update_(z[:, j:j + 128].contiguous(), y, j, 1.0, m, s, a, zy)
    torch.testing.assert_close(m + s.log(), lse, rtol=1e-6, atol=1e-5)
    torch.testing.assert_close(torch.where(y >= 0, s.log() - a / s, 0.0), H, rtol=1e-5, atol=1e-5)
    g, gH = torch.randn(N, generator=gen).masked_fill(y < 0, 0), torch.randn(N, generator=gen).masked_fill(y < 0, 0)
    full = z.clone()
    ops.dlogits_(full, y, 0, 1.0, lse, H, g, gH)
    tile = z[:, 256:512].contiguous()
    ops.dlogits_(tile, y, 256, 1.0, lse, H, g, gH)
    torch.testing.assert_close(tile, full[:, 256:512])
    assert torch.isfinite(full).all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("is_mode", ["off", "token_tis", "seq_mask"])
def test_fused_linear_grpo_epilogue(dtype, is_mode):
    gen = torch.Generator().manual_seed(5)
    B, T, D, V = 4, 23, 32, 2051
    mask = torch.rand(B, T, generator=gen) > 0.3
    mask[2] = False
    N = int(mask.sum())
    h = torch.randn(N, D, generator=gen).to(dtype)
    W = (0.2 * torch.randn(V, D, generator=gen)).to(dtype)
    y = torch.randint(0, V, (N,), generator=gen)
    y[4] = -100
    old = torch.randn(B, T, generator=gen) - 8.0
    ref, rollout = old + 0.1 * torch.randn(B, T, generator=gen), old + 0.05 * torch.randn(B, T, generator=gen)
    adv = torch.randn(B, generator=gen)
    for kl_type, dual, agg in (("k3", None, "token-mean"), ("k1", 3.0, "seq-mean-token-mean"),
                               ("k2", None, "seq-mean-token-sum-norm")):
        cfg = GRPOLossConfig(kl_coef=0.1, kl_type=kl_type, dual_clip=dual, entropy_coef=0.02, loss_agg=agg,
                             is_mode=is_mode)
        outs = {}
        for backend in ("torch", "cpp"):
            hh, WW = h.clone().requires_grad_(), W.clone().requires_grad_()
            loss, metrics = fused_linear_grpo(hh, WW, y, old, ref, adv, mask, cfg, temperature=0.8,
                                              rollout_logp=rollout, backend=backend, chunk=17)
            loss.backward()
            outs[backend] = (loss.detach(), metrics, hh.grad, WW.grad)
        tol = dict(rtol=1e-4, atol=1e-6) if dtype == torch.float32 else dict(rtol=2e-2, atol=1e-4)
        a, b = outs["torch"], outs["cpp"]
        torch.testing.assert_close(b[0], a[0], **tol)
        assert set(a[1]) == set(b[1])
        for k in a[1]:
            torch.testing.assert_close(b[1][k], a[1][k], **tol, msg=lambda m: f"metric {k}: {m}")
        torch.testing.assert_close(b[2].float(), a[2].float(), **tol)
        torch.testing.assert_close(b[3].float(), a[3].float(), **tol)
    hh, WW = h[:0].clone().requires_grad_(), W.clone().requires_grad_()
    loss, _ = fused_linear_grpo(hh, WW, y[:0], None, None, torch.ones(1), torch.zeros(1, 3, dtype=torch.bool),
                                GRPOLossConfig(), backend="cpp")
    loss.backward()
    assert loss.item() == 0.0 and not WW.grad.any()


def _fallback_run(tmp_path: Path, lib: Path) -> subprocess.CompletedProcess:
    code = ("import warnings, torch\n"
            "from racro_fast.kernels import grpo_loss, GRPOLossConfig, utils\n"
            "with warnings.catch_warnings(record=True) as w:\n"
            "    warnings.simplefilter('always')\n"
            "    for _ in range(3):\n"
            "        grpo_loss(torch.randn(2, 3), None, None, torch.randn(2), torch.ones(2, 3), GRPOLossConfig())\n"
            "print(utils.check_backend('auto', torch.zeros(1, 1), 'x'))\n"
            "print(len(w)); print(w[0].message if w else '')\n"
            "try:\n"
            "    grpo_loss(torch.randn(2, 3), None, None, torch.randn(2), torch.ones(2, 3), GRPOLossConfig(),"
            " backend='cpp')\n"
            "except ValueError as e:\n"
            "    print('refused:', e)\n")
    env = dict(os.environ, RACRO_FAST_CPU_LIB=str(lib), PYTHONPATH=str(ROOT.parent))
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300,
                          cwd=tmp_path)


def test_fallback_warns_once_naming_the_cause(tmp_path):
    """A failed build (its error left beside the library's path) or a library that does not load:
    CPU tensors run the references, with one warning that names the cause; backend='cpp' refuses."""
    failed = tmp_path / "failed"
    failed.mkdir()
    (failed / "build-error.txt").write_text("CMake Error: Could not find compiler set in environment variable CXX\n")
    out = _fallback_run(tmp_path, failed / cpu_lib.LIB_NAME)
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert lines[0] == "torch" and lines[1] == "1", out.stdout
    assert "the build failed: CMake Error: Could not find compiler" in lines[2]
    assert lines[3].startswith("refused: backend='cpp' needs the C++ CPU kernels: the build failed")

    broken = tmp_path / cpu_lib.LIB_NAME
    broken.write_text("not a shared library")
    out = _fallback_run(tmp_path, broken)
    lines = out.stdout.splitlines()
    assert out.returncode == 0 and lines[:2] == ["torch", "1"], out.stdout + out.stderr
    assert "does not load" in lines[2]
