"""The kernels as pytest-benchmark suites: each op's forward + backward on every provider that runs
here (ours, torch eager, torch.compile, Liger-Kernel where it runs), at shapes small enough for the
whole suite to take a few minutes on 2 cores.

    make bench            # pytest benchmarks --benchmark-only --benchmark-autosave (.benchmarks/)
    make bench-compare    # this run against the last saved one, on the ratios to eager (compare_ratios.py)

The providers are the benchmark scripts' own (`bench_<op>.make_provider`, which also make the
README's large-shape tables and CSV rows): one definition of each. Every benchmark records, in its
`extra_info`, its median over eager's median of the same op and shape in this run
(`ratio_to_eager`): machines differ in speed, the ratios much less, so runs are compared on them.
"""
from __future__ import annotations

import math
import statistics
import time

import pytest
import torch

import bench_fused_linear_grpo
import bench_fused_linear_logprob
import bench_grpo_loss
import bench_logprob_from_logits

PROVIDERS = ("torch", "ours", "compile", "liger")  # eager first: the others' ratios are to it
ROUNDS = 15
_eager_ms: dict[str, float] = {}


def _fused_inputs(N: int, D: int, V: int):
    gen = torch.Generator().manual_seed(0)
    h = torch.randn(N, D, generator=gen).requires_grad_()
    W = (torch.randn(V, D, generator=gen) / math.sqrt(D) * 3).requires_grad_()
    y = torch.randint(0, V, (N,), generator=gen)
    return h, W, y


def _backward(out: torch.Tensor, g: torch.Tensor) -> None:
    """Backward of a per-token output against fixed weights, or of a scalar loss (Liger's providers)."""
    (out * g).sum().backward() if out.dim() else out.backward()


def fused_linear_logprob(provider: str):
    h, W, y = _fused_inputs(512, 256, 8000)
    g = torch.randn(512, generator=torch.Generator().manual_seed(1))
    f = bench_fused_linear_logprob.make_provider("liger_grpo" if provider == "liger" else provider, h, W, y)
    return f if isinstance(f, str) else (lambda: _backward(f(), g))


def fused_linear_grpo(provider: str):
    h, W, y = _fused_inputs(512, 256, 8000)
    f = bench_fused_linear_grpo.make_provider("liger_grpo" if provider == "liger" else provider, h, W, y)
    return f if isinstance(f, str) else (lambda: f().backward())


def logprob_from_logits(provider: str):
    gen = torch.Generator().manual_seed(0)
    x = (torch.randn(1024, 8000, generator=gen) * 3).requires_grad_()
    y = torch.randint(0, 8000, (1024,), generator=gen)
    g = torch.randn(1024, generator=gen)
    f = bench_logprob_from_logits.make_provider(provider, x, y, "full")
    return f if isinstance(f, str) else (lambda: _backward(f(x), g))


def grpo_loss(provider: str):
    from racro_fast.kernels import GRPOLossConfig
    cfg = GRPOLossConfig(clip_low=0.2, clip_high=0.2, kl_coef=0.001, kl_type="k3", loss_agg="token-mean")
    x = bench_grpo_loss.make_inputs(64, 2048, torch.float32, torch.device("cpu"))
    f = bench_grpo_loss.make_provider(provider, x, cfg, liger_vocab=64)
    return f if isinstance(f, str) else (lambda: f().backward())


def _draw(V: int):
    """A decode step's draw of one token from each of 128 rows of V probabilities: ours (`engines.draw`,
    one uniform a row) against eager's, generate's torch.multinomial (an exponential an entry)."""
    def make(provider: str):
        if provider not in ("torch", "ours"):
            return "no such draw"
        from racro_fast.engines import draw
        p = torch.softmax(torch.randn(128, V, generator=torch.Generator().manual_seed(0)) * 3, dim=-1)
        return (lambda: draw(p)) if provider == "ours" else (lambda: torch.multinomial(p, num_samples=1))
    return make


OPS = {"fused_linear_logprob": fused_linear_logprob, "fused_linear_grpo": fused_linear_grpo,
       "logprob_from_logits": logprob_from_logits, "grpo_loss": grpo_loss,
       "draw_6400": _draw(6400), "draw_151936": _draw(151936)}


def _median_ms(fn, reps: int = ROUNDS) -> float:
    fn()
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times) * 1e3


@pytest.mark.parametrize("provider", PROVIDERS)
@pytest.mark.parametrize("op", list(OPS))
def test_bench(benchmark, op: str, provider: str) -> None:
    fn = OPS[op](provider)
    if isinstance(fn, str):
        pytest.skip(f"{provider}: {fn}")
    fn()  # compile, load, allocate before the timed rounds
    benchmark.group = op
    benchmark.extra_info.update(op=op, provider=provider, device=str(torch.get_num_threads()) + " threads")
    benchmark.pedantic(fn, rounds=ROUNDS, iterations=1, warmup_rounds=2)
    if not benchmark.enabled:  # --benchmark-disable: ran once as a plain test
        return
    median_ms = benchmark.stats.stats.median * 1e3
    if provider == "torch":
        _eager_ms[op] = median_ms
    eager = _eager_ms.get(op) or _median_ms(OPS[op]("torch"))
    benchmark.extra_info["ratio_to_eager"] = median_ms / eager
