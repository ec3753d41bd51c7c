"""Timing, peak-memory and CSV helpers shared by the kernel benchmarks.

Peak memory is the growth over what was allocated when `measure` started (inputs already built):
- CUDA: torch.cuda.max_memory_allocated() after reset_peak_memory_stats(), minus the allocated
  bytes at the start; exact for everything the caching allocator hands out.
- CPU: growth of the process's peak resident set (VmHWM, reset before each run by writing 5
  to /proc/self/clear_refs; where that is not allowed, ru_maxrss, valid only for the first
  `measure` of a process) over the resident set at the start of the run. So that freed memory
  cannot hide in the allocator's cache, the benchmarks measure the peak of every (provider,
  mode, shape) in a fresh subprocess with glibc's mmap threshold fixed at 4 MiB (every tensor
  of 4 MiB or more is its own mapping, returned to the OS when freed, so the resident set
  follows the live tensors), and its time in another fresh subprocess with the default
  allocator (`run_isolated`).
"""
from __future__ import annotations

import argparse
import csv
import datetime
import json
import math
import os
import resource
import statistics
import subprocess
import sys
import time
from collections.abc import Callable

import torch

MB = float(1 << 20)


def device_name() -> str:
    if torch.cuda.is_available():
        return torch.cuda.get_device_name()
    cpu = "cpu"
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), cpu)
    except OSError:
        pass
    return f"{cpu} ({torch.get_num_threads()} threads)"


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _reset_peak_rss() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _peak_rss_bytes(reset_ok: bool) -> int:
    if reset_ok:
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmHWM"))
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


def measure(fn: Callable[..., object], *, warmup: int, reps: int, device: str | torch.device = "cuda",
            setup: Callable[[], object] | None = None) -> dict[str, float]:
    """Median wall time of `fn` in ms over `reps` runs after `warmup`, and its peak memory in MiB.

    With `setup`, each run calls fn(setup()) and only fn is timed and measured: e.g. setup runs
    the forward and fn the backward of that fresh graph.
    """
    device = torch.device(device)
    cuda = device.type == "cuda"
    reset_ok = cuda or _reset_peak_rss()
    times, peak = [], 0
    for rep in range(warmup + reps):
        arg = (setup(),) if setup is not None else ()
        if cuda:
            torch.cuda.synchronize()
            base = torch.cuda.memory_allocated()
            torch.cuda.reset_peak_memory_stats()
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn(*arg)
            end.record()
            torch.cuda.synchronize()
            ms = start.elapsed_time(end)
            rep_peak = torch.cuda.max_memory_allocated() - base
        else:
            if reset_ok:
                _reset_peak_rss()
            if rep == 0 or reset_ok:
                base = _rss_bytes()
            t0 = time.perf_counter()
            fn(*arg)
            ms = (time.perf_counter() - t0) * 1e3
            rep_peak = _peak_rss_bytes(reset_ok) - base
        del arg
        if rep >= warmup:  # warm-up runs may compile or autotune: not part of the op's cost
            times.append(ms)
            peak = max(peak, rep_peak)
    return dict(ms=statistics.median(times), peak_mb=max(0, peak) / MB)


def _run_worker(script: str, spec: dict, env: dict, timeout: float) -> dict:
    proc = subprocess.run([sys.executable, script, "--worker", json.dumps(spec)], capture_output=True,
                          text=True, timeout=timeout, env=env)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
    if proc.returncode != 0 or not lines:
        err = (proc.stderr.strip().splitlines() or ["no output"])[-1]
        return dict(spec, ms=float("nan"), peak_mb=float("nan"), note=f"worker failed: {err[:200]}")
    return json.loads(lines[-1])


def run_isolated(script: str, spec: dict, timeout: float = 1800.0) -> dict:
    """Time and peak memory of `script --worker JSON(spec)`, each from its own fresh interpreter.

    The time comes from a process with the default allocator. The peak comes from a second
    process (1 warm-up, 1 run) with glibc's mmap threshold fixed at 4 MiB, so that no freed
    tensor can be reused from the allocator's cache unseen; that setting makes every large
    allocation a fresh mapping, which would add page faults to the time.
    """
    timed = _run_worker(script, spec, dict(os.environ), timeout)
    mem = _run_worker(script, dict(spec, warmup=1, reps=1), dict(os.environ, MALLOC_MMAP_THRESHOLD_=str(4 << 20)),
                      timeout)
    timed["peak_mb"] = mem.get("peak_mb", float("nan"))
    return timed


def merge_rounds(rounds: list[list[dict]]) -> list[dict]:
    """One row per measurement from several rounds of the same measurements in the same order.

    Rounds run every provider in turn, so a shared machine's drifting load hits all providers
    alike; a row keeps the median of its numeric fields over the rounds (the max for peak_mb)
    and the per-round times in `ms_rounds`.
    """
    merged = []
    for group in zip(*rounds):
        row = dict(group[0])
        for key, value in group[0].items():
            vals = [g.get(key) for g in group]
            if isinstance(value, float) and all(isinstance(v, (int, float)) for v in vals):
                finite = [v for v in vals if not math.isnan(v)]
                row[key] = (max if key == "peak_mb" else statistics.median)(finite) if finite else float("nan")
        row["rounds"] = len(group)
        row["ms_rounds"] = " ".join(f"{g['ms']:.1f}" for g in group)
        merged.append(row)
    return merged


def round_ratios(rounds: list[list[dict]], match: Callable[[dict], bool], a: str, b: str, key: str = "ms"
                 ) -> list[float]:
    """Per-round ratio row(provider a)[key] / row(provider b)[key] among the rows that `match`."""
    out = []
    for rows in rounds:
        sel = {r["provider"]: r for r in rows if match(r)}
        if a in sel and b in sel and sel[b].get(key) and not math.isnan(sel[a][key]) and not math.isnan(sel[b][key]):
            out.append(sel[a][key] / sel[b][key])
    return out


def git_commit() -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                             cwd=os.path.dirname(os.path.abspath(__file__)), timeout=10)
        return out.stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def append_rows(csv_path: str, rows: list[dict]) -> None:
    """Append rows to a CSV with device, commit and date columns; widens the header if needed."""
    if not rows:
        return
    stamp = dict(device=device_name(), commit=git_commit(), date=datetime.datetime.now().isoformat(timespec="seconds"))
    rows = [{**r, **stamp} for r in rows]
    os.makedirs(os.path.dirname(os.path.abspath(csv_path)), exist_ok=True)
    old_rows: list[dict] = []
    header: list[str] = []
    if os.path.exists(csv_path):
        with open(csv_path, newline="") as f:
            reader = csv.DictReader(f)
            header = list(reader.fieldnames or [])
            old_rows = list(reader)
    new_keys = [k for r in rows for k in r if k not in header]
    header += list(dict.fromkeys(new_keys))
    rewrite = bool(new_keys) and bool(old_rows)
    with open(csv_path, "w" if rewrite or not old_rows else "a", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=header, restval="")
        if rewrite or not old_rows:
            writer.writeheader()
            writer.writerows(old_rows)
        writer.writerows(rows)


def peak_text(ours: dict, other: dict) -> str:
    """Our peak memory as a share of another provider's, for the ratio lines."""
    return f"{ours['peak_mb'] / max(other['peak_mb'], 1e-9):.1%} ({ours['peak_mb']:.0f} vs {other['peak_mb']:.0f} MiB)"


def gemm_floor(out: dict, h: torch.Tensor, W: torch.Tensor, spec: dict, n_gemms: int) -> None:
    """On CUDA: time one [N, D] x [D, V] GEMM of the shape and add gemm_ms, gemm_tflops and
    vs_<n>gemm (the op's time over the n GEMMs it cannot avoid) to `out`."""
    h, W = h.detach(), W.detach()
    gemm = measure(lambda: torch.mm(h, W.t()), warmup=spec["warmup"], reps=spec["reps"], device=h.device)
    out["gemm_ms"] = gemm["ms"]
    out["gemm_tflops"] = 2 * h.shape[0] * h.shape[1] * W.shape[0] / gemm["ms"] / 1e9
    derive_gemm_floor(out, n_gemms)


def derive_gemm_floor(r: dict, n_gemms: int) -> None:
    """extra_mb, and vs_<n>gemm recomputed from the medians where a GEMM was timed."""
    r["extra_mb"] = r["peak_mb"] - r["io_mb"]
    if "gemm_ms" in r:
        r[f"vs_{n_gemms}gemm"] = r["ms"] / (n_gemms * r["gemm_ms"])


def gemm_floor_lines(sel: dict[str, dict], n_gemms: int) -> list[str]:
    """ours against its n GEMMs, when they were timed (CUDA)."""
    key = f"vs_{n_gemms}gemm"
    if "ours" not in sel or key not in sel["ours"]:
        return []
    o = sel["ours"]
    return [f"ours = {o[key]:.2f}x the {n_gemms} GEMMs ({o['gemm_ms']:.2f} ms each, {o['gemm_tflops']:.0f} TFLOP/s), "
            f"memory beyond inputs, outputs and gradients {o['extra_mb']:.0f} MiB"]


def print_table(rows: list[dict], columns: list[str], float_format: str = ".3f") -> None:
    def fmt(v: object) -> str:
        return format(v, float_format) if isinstance(v, float) else str(v)

    cells = [[fmt(r.get(c, "")) for c in columns] for r in rows]
    widths = [max(len(c), *(len(row[i]) for row in cells)) for i, c in enumerate(columns)]
    print("  ".join(c.rjust(w) for c, w in zip(columns, widths)))
    for row in cells:
        print("  ".join(v.rjust(w) for v, w in zip(row, widths)))


def parse_shapes(text: str) -> list[tuple[int, ...]]:
    """"NxV,NxV" (any number of dims per shape) -> [(N, V), (N, V)]."""
    return [tuple(int(v) for v in s.split("x")) for s in text.split(",")]


def run_spec(script: str, run_one: Callable[[dict], dict], spec: dict) -> dict:
    """One measurement: in this process on CUDA, where the allocator's peak counters are exact,
    and in fresh subprocesses of `script` on CPU, where the peak RSS must be the run's own."""
    if not torch.cuda.is_available():
        return run_isolated(script, spec)
    r = run_one(spec)
    torch.cuda.empty_cache()  # the next shape's peak must not depend on what this one left cached
    return r


def add_run_args(p: argparse.ArgumentParser, script: str, kernel: str) -> None:
    """--rounds, --threads, --csv (results/<kernel>.csv beside the script), --no-csv and the hidden
    --worker of a CPU measurement's subprocess."""
    p.add_argument("--rounds", type=int, default=1, help="repeat every measurement, providers interleaved; medians")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--csv", default=os.path.join(os.path.dirname(script), "results", f"{kernel}.csv"))
    p.add_argument("--no-csv", action="store_true")
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)


def serve_worker(args: argparse.Namespace, run_one: Callable[[dict], dict]) -> bool:
    """In a --worker subprocess: run the one measurement, print its JSON row, and return True."""
    if not args.worker:
        return False
    print(json.dumps(run_one(json.loads(args.worker))))
    return True


def run_benchmark(script: str, doc: str, run_one: Callable[[dict], dict], *, kernel: str, dims: str,
                  dtypes: dict, providers: tuple[str, ...], modes: tuple[str, ...],
                  gpu_shapes: list[tuple[int, ...]], cpu_shapes: list[tuple[int, ...]],
                  quick_shapes: list[tuple[int, ...]], cpu_reps: int,
                  derive: Callable[[dict], None], columns: list[str],
                  peak_text: Callable[[dict, dict], str],
                  extra_lines: Callable[[dict[str, dict]], list[str]] | None = None) -> None:
    """Command line, rounds of measurements, table, ours/other ratios and CSV of one kernel's benchmark.

    `script` is the benchmark's own path: CPU workers re-run it with --worker, which calls
    `run_one(spec)`. `dims` names the shape's dimensions, one letter each ("NDV": shapes
    NxDxV, spec keys N, D, V). Rounds interleave the providers and merge into medians; columns
    derived from medians (ratios, bandwidths) are recomputed from them by `derive(row)`.
    The table shows the spec, ms and peak_mb, then `columns`; each (shape, mode) gets, for every
    other provider that ran, a time ratio line ending in `peak_text(ours_row, other_row)`, then
    the lines of `extra_lines({provider: row})`.
    """
    p = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    shape = "x".join(dims)
    p.add_argument("--shapes", default=None, help=f"{shape}[,{shape}...] (default: per device)")
    p.add_argument("--dtype", default=None, choices=sorted(dtypes), help="default: bf16 on CUDA, fp32 on CPU")
    p.add_argument("--providers", default=",".join(providers))
    p.add_argument("--modes", default=",".join(modes))
    p.add_argument("--warmup", type=int, default=None)
    p.add_argument("--reps", type=int, default=None)
    p.add_argument("--quick", action="store_true", help="tiny shapes, 1 warm-up, 2 reps")
    add_run_args(p, script, kernel)
    args = p.parse_args()
    if serve_worker(args, run_one):
        return
    if args.threads:
        torch.set_num_threads(args.threads)  # also recorded in the CSV's device column

    cuda = torch.cuda.is_available()
    if args.shapes:
        shapes = parse_shapes(args.shapes)
    else:
        shapes = quick_shapes if args.quick else gpu_shapes if cuda else cpu_shapes
    dtype = args.dtype or ("bf16" if cuda else "fp32")
    warmup = args.warmup if args.warmup is not None else 1 if (args.quick or not cuda) else 5
    reps = args.reps if args.reps is not None else 2 if args.quick else cpu_reps if not cuda else 20

    def label(r: dict) -> str:
        return " ".join(f"{d}={r[d]}" for d in dims)

    rounds = []
    for k in range(args.rounds):
        rows = []
        for dim_values in shapes:
            for provider in args.providers.split(","):
                for mode in args.modes.split(","):
                    # Key order is the CSV's column order.
                    spec = dict(kernel=kernel, provider=provider, mode=mode, **dict(zip(dims, dim_values)),
                                dtype=dtype, warmup=warmup, reps=reps, threads=args.threads or torch.get_num_threads())
                    r = run_spec(script, run_one, spec)
                    rows.append(r)
                    print(f"  round {k}: {provider:8s} {mode:8s} {label(spec)}: {r['ms']:.2f} ms, "
                          f"peak {r['peak_mb']:.1f} MiB" + (f"  [{r['note']}]" if r.get("note") else ""), flush=True)
        rounds.append(rows)
    rows = merge_rounds(rounds)
    for r in rows:
        derive(r)
    print()
    print_table(rows, ["provider", "mode", *dims, "dtype", "ms", "peak_mb", *columns, "ms_rounds", "note"])
    for dim_values in shapes:
        for mode in args.modes.split(","):
            def match(r: dict) -> bool:
                return tuple(r[d] for d in dims) + (r["mode"],) == tuple(dim_values) + (mode,)

            sel = {r["provider"]: r for r in rows if match(r)}
            for other in sel:
                t_ratios = round_ratios(rounds, match, "ours", other) if other != "ours" else []
                if t_ratios:
                    o, t = sel["ours"], sel[other]
                    print(f"ours / {other} ({mode}, {label(o)}): time {statistics.median(t_ratios):.2f}x "
                          f"(per round: {' '.join(f'{x:.2f}' for x in t_ratios)}), peak memory {peak_text(o, t)}")
            for line in extra_lines(sel) if extra_lines else ():
                print(line)
    if not args.no_csv:
        append_rows(args.csv, rows)
        print(f"appended {len(rows)} rows to {args.csv}")
