"""Compare the newest saved pytest-benchmark run with the one before it, on each benchmark's ratio to
eager (`extra_info["ratio_to_eager"]`), not on absolute times: machines differ, ratios much less.

    python benchmarks/compare_ratios.py [--threshold 0.25] [--storage .benchmarks]

A benchmark of ours whose ratio grew by more than the threshold (relative) fails the comparison
(exit 1); the table lists every benchmark present in both runs.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def saved_runs(storage: Path) -> list[Path]:
    """pytest-benchmark's autosaved runs (NNNN_*.json), oldest first."""
    return sorted(storage.rglob("[0-9][0-9][0-9][0-9]_*.json"), key=lambda p: p.name)


def ratios(path: Path) -> dict[str, float]:
    data = json.loads(path.read_text())
    return {b["name"]: b["extra_info"]["ratio_to_eager"] for b in data["benchmarks"]
            if "ratio_to_eager" in b.get("extra_info", {})}


def compare(old: dict[str, float], new: dict[str, float], threshold: float) -> tuple[list[str], list[str]]:
    """(table lines, regressions): a regression is one of ours whose ratio grew by more than threshold."""
    lines, bad = [f"{'benchmark':48s} {'before':>8s} {'now':>8s} {'change':>8s}"], []
    for name in sorted(set(old) & set(new)):
        change = new[name] / old[name] - 1.0
        flag = ""
        if "-ours]" in name and change > threshold:
            flag = "  REGRESSION"
            bad.append(name)
        lines.append(f"{name:48s} {old[name]:8.3f} {new[name]:8.3f} {change:+8.1%}{flag}")
    return lines, bad


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--storage", default=".benchmarks")
    p.add_argument("--threshold", type=float, default=0.25, help="largest allowed relative growth of a ratio")
    args = p.parse_args(argv)
    runs = saved_runs(Path(args.storage))
    if len(runs) < 2:
        print(f"compare_ratios: {len(runs)} saved run(s) under {args.storage}; `make bench` twice first",
              file=sys.stderr)
        return 2
    lines, bad = compare(ratios(runs[-2]), ratios(runs[-1]), args.threshold)
    print(f"{runs[-2].name} -> {runs[-1].name}, ratios to eager (lower is faster)")
    print("\n".join(lines))
    if bad:
        print(f"{len(bad)} of ours slower against eager by more than {args.threshold:.0%}: {', '.join(bad)}")
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
