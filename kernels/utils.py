"""Launch settings and input checks shared by the Triton kernels.

All block sizes, warp counts and chunk sizes are chosen here, so tuning for a new GPU touches one
file. Under `TRITON_INTERPRET=1` (kernels run on CPU tensors) smaller tiles keep the interpreter
quick while still exercising every masked edge.
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import triton
from torch import Tensor

from . import cpu_lib

BACKENDS = ("auto", "triton", "cpp", "torch")
# tl.dot needs every tile dimension >= 16; these are the dtypes the kernels accept.
KERNEL_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
# The references also take fp64, so they can be checked against an fp64 ground truth.
REFERENCE_DTYPES = KERNEL_DTYPES + (torch.float64,)


def is_interpreter() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


# Set while benchmarks/compile_report.py compiles the kernels for a GPU it does not have, to that
# GPU's (compute capability major, SM count): launches on CPU tensors then get its launch settings
# and are compiled, not run.
compile_only_gpu: tuple[int, int] | None = None


def launch_gpu(device: torch.device) -> tuple[int, int] | None:
    """(compute capability major, SM count) of the GPU a launch targets; None under the interpreter."""
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        return props.major, props.multi_processor_count
    return compile_only_gpu


def row_launch_settings(n_cols: int, max_block: int = 4096) -> tuple[int, int]:
    """BLOCK_SIZE and num_warps of a kernel that streams one row of `n_cols` per program.

    Blocks are capped so that a row longer than `max_block` is walked in several blocks with an
    online reduction instead of one huge register tile; the warp count grows with the block so
    each thread keeps ~16 fp32 values live.
    """
    BLOCK_SIZE = min(triton.next_power_of_2(max(n_cols, 16)), max_block)
    num_warps = 4 if BLOCK_SIZE <= 1024 else 8 if BLOCK_SIZE <= 4096 else 16
    return BLOCK_SIZE, num_warps


@dataclass(frozen=True)
class TileSettings:
    """Tiles of a [N, D] x [D, V] kernel: logits are built BLOCK_N x BLOCK_V, summed over BLOCK_D."""

    BLOCK_N: int
    BLOCK_V: int
    BLOCK_D: int
    num_warps: int
    num_stages: int
    splits: int            # programs along V in the forward; partial logsumexps are merged after
    v_per_split: int       # vocab columns of one split, a multiple of BLOCK_V


def tile_launch_settings(N: int, D: int, V: int, dtype: torch.dtype, device: torch.device) -> TileSettings:
    """Tiles for the fused linear + log-softmax kernels.

    On a GPU the tiles are those of a good bf16 GEMM (128 x 128 x 64 on Hopper, 3 stages); fp32
    uses 64 x 128 x 32. The forward grid is (N / BLOCK_N) x splits, with splits chosen so there
    are ~4 programs per SM even when N is small.
    """
    gpu = launch_gpu(device)
    if gpu is not None:
        major, n_sm = gpu
        # Chosen so that no variant spills registers (benchmarks/compile_report.py): fp32 (true fp32
        # products, no tensor cores) needs 64 rows; before Hopper, bf16 with entropy needs BLOCK_D 32.
        if dtype == torch.float32:
            BLOCK_N, BLOCK_V, BLOCK_D = 64, 128, 32
        else:
            BLOCK_N, BLOCK_V, BLOCK_D = 128, 128, 64 if major >= 9 else 32
        num_warps, num_stages = 8, 3
    else:
        # Interpreter: small tiles (16 is tl.dot's minimum) and a pretend 2-SM device so that
        # tiny test shapes still get several V-splits and several row blocks.
        BLOCK_N, BLOCK_V = 16, 64
        BLOCK_D = min(64, max(16, triton.next_power_of_2(D)))
        num_warps, num_stages = 4, 1
        n_sm = 2
    n_row_blocks = triton.cdiv(N, BLOCK_N)
    n_col_blocks = triton.cdiv(V, BLOCK_V)
    splits = max(1, min(n_col_blocks, triton.cdiv(4 * n_sm, n_row_blocks)))
    v_per_split = triton.cdiv(n_col_blocks, splits) * BLOCK_V
    splits = triton.cdiv(V, v_per_split)
    return TileSettings(BLOCK_N, BLOCK_V, BLOCK_D, num_warps, num_stages, splits, v_per_split)


def chunk_rows(n_rows: int, n_cols: int, elem_bytes: int, budget_bytes: int, multiple: int = 1) -> int:
    """Rows per chunk so that one [rows, n_cols] temporary stays within `budget_bytes`.

    Never fewer than `multiple` rows (a kernel's row block) and never more than needed for n_rows.
    """
    rows = budget_bytes // max(1, n_cols * elem_bytes)
    rows = max(multiple, rows // multiple * multiple)
    return max(1, min(rows, triton.cdiv(n_rows, multiple) * multiple))


# Temporaries of the chunked paths. On CPU a 32 MiB logits tile (2048 x 4096 fp32) runs its GEMMs
# at the rate of the full product, is few enough calls that a busy machine's OpenMP barriers do
# not dominate, and keeps the op's peak near the size of its grads. On GPU the budget is large
# enough that the dW GEMM's K dimension (the chunk) keeps cuBLAS compute-bound.
CPU_CHUNK_BYTES = 32 << 20
GPU_CHUNK_BYTES = 1 << 30
# A CPU logits tile that a C++ epilogue rewrites in place (no temporaries beside it).
CPU_INPLACE_TILE_BYTES = 48 << 20


def chunk_budget(device: torch.device) -> int:
    return GPU_CHUNK_BYTES if device.type == "cuda" else CPU_CHUNK_BYTES


def check_backend(backend: str, x: Tensor, name: str) -> str:
    """Resolve "auto" and make sure the chosen backend can run on `x`'s device.

    "auto": CUDA tensors -> "triton"; CPU tensors -> "cpp" (the C++ kernels) when they are built
    and take x's dtype, else "torch" (the references), with one warning per process when it is
    the library that is missing.
    """
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "auto":
        if x.is_cuda:
            return "triton"
        if x.device.type != "cpu" or x.dtype not in KERNEL_DTYPES:
            return "torch"
        if cpu_lib.available():
            return "cpp"
        cpu_lib.warn_fallback()
        return "torch"
    if backend == "triton":
        if not (x.is_cuda or is_interpreter() or compile_only_gpu is not None):
            raise ValueError(
                f"backend='triton' needs {name} on a CUDA device (or TRITON_INTERPRET=1), "
                f"got {name} on {x.device}"
            )
        if x.dtype not in KERNEL_DTYPES:
            raise ValueError(f"backend='triton' supports {name} in {KERNEL_DTYPES}, got {x.dtype}")
    if backend == "cpp":
        if x.device.type != "cpu":
            raise ValueError(f"backend='cpp' needs {name} on the CPU, got {name} on {x.device}")
        if x.dtype not in KERNEL_DTYPES:
            raise ValueError(f"backend='cpp' supports {name} in {KERNEL_DTYPES}, got {x.dtype}")
        if not cpu_lib.available():
            raise ValueError(f"backend='cpp' needs the C++ CPU kernels: {cpu_lib.unavailable_reason()}")
    return backend


def check_temperature(temperature: float) -> None:
    if not (isinstance(temperature, (int, float)) and temperature > 0 and temperature != float("inf")):
        raise ValueError(f"temperature must be a finite number > 0, got {temperature!r}")


def check_targets(targets: Tensor, x: Tensor, x_name: str, vocab: int, ignore_index: int) -> None:
    """targets [N] integer on x's device, each in [0, vocab) or equal to ignore_index."""
    if not isinstance(targets, Tensor):
        raise ValueError(f"targets must be a tensor, got {type(targets).__name__}")
    if targets.dtype.is_floating_point or targets.dtype.is_complex or targets.dtype == torch.bool:
        raise ValueError(f"targets must be an integer tensor, got {targets.dtype}")
    if targets.dim() != 1 or targets.shape[0] != x.shape[0]:
        raise ValueError(
            f"targets must have shape [{x.shape[0]}] (rows of {x_name}), got {list(targets.shape)}"
        )
    if targets.device != x.device:
        raise ValueError(f"targets is on {targets.device} but {x_name} is on {x.device}")
    # One host sync: cheaper than a silent out-of-bounds read in the kernel.
    bad = (targets != ignore_index) & ((targets < 0) | (targets >= vocab))
    if bool(bad.any()):
        i = int(bad.nonzero()[0, 0])
        raise ValueError(
            f"targets[{i}] = {int(targets[i])} is outside [0, {vocab}) and is not "
            f"ignore_index={ignore_index} ({int(bad.sum())} such values)"
        )


def check_float_matrix(x: Tensor, name: str) -> None:
    if not isinstance(x, Tensor):
        raise ValueError(f"{name} must be a tensor, got {type(x).__name__}")
    if x.dim() != 2:
        raise ValueError(f"{name} must be 2-D, got shape {list(x.shape)}")
    if x.dtype not in REFERENCE_DTYPES:
        raise ValueError(f"{name} must be one of {REFERENCE_DTYPES}, got {x.dtype}")


def lines_within_budget(n: int, width: int, device: torch.device, override: int | None) -> int:
    """How many of n lines of `width` fp32 values make one tile (`override` if given)."""
    if override is not None:
        return max(1, int(override))
    return chunk_rows(n, width, 4, chunk_budget(device))
