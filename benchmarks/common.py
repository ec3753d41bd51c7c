"""Timing, peak-memory and CSV helpers shared by the kernel benchmarks.

Peak memory is the growth over what was allocated when `measure` started (inputs already built):
- CUDA: torch.cuda.max_memory_allocated() after reset_peak_memory_stats(), minus the allocated
  bytes at the start; exact for everything the caching allocator hands out.
- CPU: growth of the process's peak resident set (VmHWM, reset at the start by writing 5 to
  /proc/self/clear_refs; where that is not allowed, ru_maxrss, valid only for the first
  `measure` of a process) over the resident set at the start. So that freed memory cannot hide
  in the allocator's cache, the benchmarks run every (provider, mode, shape) in a fresh
  subprocess (`run_isolated`) with glibc's mmap threshold fixed at 4 MiB: every tensor of 4 MiB
  or more is its own mapping, returned to the OS when freed, and the resident set follows the
  live tensors.
"""
from __future__ import annotations

import csv
import datetime
import json
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


def run_isolated(script: str, spec: dict, timeout: float = 1800.0) -> dict:
    """Run `script --worker JSON(spec)` in a fresh interpreter and return the JSON it prints last."""
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_=str(4 << 20))
    proc = subprocess.run([sys.executable, script, "--worker", json.dumps(spec)], capture_output=True,
                          text=True, timeout=timeout, env=env)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
    if proc.returncode != 0 or not lines:
        err = (proc.stderr.strip().splitlines() or ["no output"])[-1]
        return dict(spec, ms=float("nan"), peak_mb=float("nan"), note=f"worker failed: {err[:200]}")
    return json.loads(lines[-1])


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


def print_table(rows: list[dict], columns: list[str]) -> None:
    def fmt(v: object) -> str:
        return f"{v:.3f}" if isinstance(v, float) else str(v)

    cells = [[fmt(r.get(c, "")) for c in columns] for r in rows]
    widths = [max(len(c), *(len(row[i]) for row in cells)) for i, c in enumerate(columns)]
    print("  ".join(c.rjust(w) for c, w in zip(columns, widths)))
    for row in cells:
        print("  ".join(v.rjust(w) for v, w in zip(row, widths)))
