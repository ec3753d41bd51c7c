"""Plot benchmark CSVs: one PNG per kernel, time and peak memory per provider, mode and shape.

    python benchmarks/plot.py                                    # every CSV in benchmarks/results
    python benchmarks/plot.py benchmarks/results/fused_linear_logprob.csv --device H100

For each (device, provider, mode, shape) the newest row is drawn; rows without a time (a provider
that could not run) are left out. The PNG goes next to the CSV, named after the kernel (and the
device when several are present).
"""
from __future__ import annotations

import argparse
import csv
import glob
import math
import os
import re

from racro_fast.plots import grouped_bars

# the shape of a row: a kernel's N x D x V, or bench_step's layers x hidden x vocab x prefix x caption x group
SHAPE_KEYS = ("N", "D", "V", "layers", "hidden", "vocab", "P", "C", "G")


def _float(x: str) -> float:
    try:
        return float(x)
    except (TypeError, ValueError):
        return float("nan")


def load_latest(csv_path: str) -> list[dict]:
    with open(csv_path, newline="") as f:
        rows = list(csv.DictReader(f))
    latest: dict[tuple, dict] = {}
    for r in rows:  # later rows win
        shape = "x".join(r[k] for k in SHAPE_KEYS if r.get(k))
        key = (r.get("device", ""), r["provider"], r["mode"], shape, r.get("dtype", ""))
        latest[key] = dict(r, shape=shape)
    return [r for r in latest.values() if not math.isnan(_float(r.get("ms")))]


def plot_kernel(rows: list[dict], title: str, out_png: str) -> None:
    providers = list(dict.fromkeys(r["provider"] for r in rows))
    groups = list(dict.fromkeys((r["shape"], r["mode"], r.get("dtype", "")) for r in rows))
    by_key = {(r["shape"], r["mode"], r.get("dtype", ""), r["provider"]): r for r in rows}

    def series(metric: str) -> dict[str, list[float]]:
        return {p: [_float(by_key[(*g, p)].get(metric)) if (*g, p) in by_key else float("nan") for g in groups]
                for p in providers}

    grouped_bars(out_png, [f"{s}\n{m} {d}" for s, m, d in groups],
                 [("time (ms)", series("ms")), ("peak memory (MiB)", series("peak_mb"))], title=title)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    default_dir = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")
    p.add_argument("csv", nargs="*", help="results CSVs (default: benchmarks/results/*.csv)")
    p.add_argument("--device", default=None, help="only rows whose device contains this text")
    args = p.parse_args()
    for path in args.csv or sorted(glob.glob(os.path.join(default_dir, "*.csv"))):
        rows = load_latest(path)
        if args.device:
            rows = [r for r in rows if args.device.lower() in r.get("device", "").lower()]
        kernel = os.path.splitext(os.path.basename(path))[0]
        devices = list(dict.fromkeys(r.get("device", "") for r in rows))
        for device in devices:
            sel = [r for r in rows if r.get("device", "") == device]
            suffix = "" if len(devices) == 1 else "_" + re.sub(r"[^A-Za-z0-9]+", "_", device).strip("_")
            out = os.path.join(os.path.dirname(os.path.abspath(path)), f"{kernel}{suffix}.png")
            plot_kernel(sel, f"{kernel} on {device}", out)
            print(f"wrote {out} ({len(sel)} rows)")


if __name__ == "__main__":
    main()
