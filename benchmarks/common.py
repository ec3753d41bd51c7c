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


def print_table(rows: list[dict], columns: list[str]) -> None:
    def fmt(v: object) -> str:
        return f"{v:.3f}" if isinstance(v, float) else str(v)

    cells = [[fmt(r.get(c, "")) for c in columns] for r in rows]
    widths = [max(len(c), *(len(row[i]) for row in cells)) for i, c in enumerate(columns)]
    print("  ".join(c.rjust(w) for c, w in zip(columns, widths)))
    for row in cells:
        print("  ".join(v.rjust(w) for v, w in zip(row, widths)))
