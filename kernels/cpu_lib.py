"""The C++ CPU kernels (kernels/cpu, built by CMakeLists.txt) behind autograd, and where they are found.

The library registers torch.ops.racro_fast.*: the GRPO loss forward / backward, log-probs from
logits, and the per-tile epilogues of the fused linear ops (the GEMMs stay in ATen, here). It is
looked for at $RACRO_FAST_CPU_LIB, else build/cpu/libracro_fast_cpu.so beside the sources. When it is
missing or fails to load, CPU tensors run the torch references and the first such call warns once,
naming the cause (a failed build leaves its error in build-error.txt beside the library's path).
"""
from __future__ import annotations

import os
import warnings
from pathlib import Path

import torch

LIB_NAME = "libracro_fast_cpu.so"
BUILD_DIR = Path(__file__).resolve().parent.parent / "build" / "cpu"

_state: dict = {"ops": None, "why": None, "warned": False}


def library_path() -> Path:
    return Path(os.environ.get("RACRO_FAST_CPU_LIB") or BUILD_DIR / LIB_NAME)


def _load():
    if _state["ops"] is not None or _state["why"] is not None:
        return _state["ops"]
    path = library_path()
    if not path.is_file():
        error_file = path.parent / "build-error.txt"  # scripts/setup.sh writes it when the build fails
        if error_file.is_file():
            lines = error_file.read_text(errors="replace").strip().splitlines()
            _state["why"] = f"the build failed: {lines[0] if lines else 'no message'} (see {error_file})"
        else:
            _state["why"] = f"{path} is not built (run `make cpu-kernels`)"
        return None
    try:
        torch.ops.load_library(str(path))
        _state["ops"] = torch.ops.racro_fast
    except (OSError, RuntimeError) as e:
        _state["why"] = f"{path} does not load: {str(e).splitlines()[0]}"
    return _state["ops"]


def available() -> bool:
    """Whether the C++ ops are loaded (loading them on the first call)."""
    return _load() is not None


def unavailable_reason() -> str | None:
    _load()
    return _state["why"]


def warn_fallback() -> None:
    """One warning per process that CPU tensors fall back to the torch references, and why."""
    if not _state["warned"]:
        _state["warned"] = True
        warnings.warn(f"racro_fast: C++ CPU kernels not used, CPU tensors run the torch references: "
                      f"{unavailable_reason()}", RuntimeWarning, stacklevel=4)


def ops():
    ops = _load()
    if ops is None:
        raise ValueError(f"backend='cpp' needs the C++ CPU kernels: {_state['why']}")
    return ops
