"""`racro-fast train | demo | eval | bench | profile | synth | plan`

    racro-fast train --config configs/qwen25vl_7b_r1_7b.yaml [section.field=value ...]
    racro-fast demo [section.field=value ...]        # tiny models built on CPU, then train (demo.py)
    racro-fast eval --captioner runs/demo/export --reasoner PATH --data FILE ...
    racro-fast bench [fused_linear_logprob|fused_linear_grpo|logprob_from_logits|grpo_loss] [-- script args]
    racro-fast profile --config configs/qwen25vl_7b_r1_7b.yaml --steps 3   # torch.profiler trace of a few steps
    racro-fast synth --out data/count.parquet --n 1000 --task count
    racro-fast plan --config configs/qwen25vl_7b_r1_32b_tp4.yaml [--gpus 8 --gpu-mem-gib 80 --nodes 1]
                                                     # a GPU run's start-up and step rehearsed on any machine

A mistake in the input (a config value, a missing data file or model path) is one line,
`racro-fast: error: <field>: <what is wrong>`, and exit status 2; `--debug` anywhere on the
command line shows the traceback instead.
"""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from racro_fast.config import run_main
from racro_fast.metrics import PHASES

BENCHES = ("fused_linear_logprob", "fused_linear_grpo", "logprob_from_logits", "grpo_loss")


def _bench(argv: list[str]) -> int:
    root = Path(__file__).resolve().parent.parent / "benchmarks"
    if not root.is_dir():
        print("racro-fast bench: the benchmarks/ folder ships with the source tree; run it from a checkout",
              file=sys.stderr)
        return 2
    names = [a for a in argv if a in BENCHES] or list(BENCHES)
    rest = [a for a in argv if a not in BENCHES and a != "--"]
    rc = 0
    for name in names:
        rc |= subprocess.call([sys.executable, str(root / f"bench_{name}.py"), *rest])
    return rc


def _profile(argv: list[str]) -> int:
    import argparse

    import torch

    from racro_fast.config import load_config
    from racro_fast.demo import demo_config
    from racro_fast.train import train

    p = argparse.ArgumentParser(prog="racro-fast profile")
    p.add_argument("--config", help="run config; without it, the CPU demo")
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("overrides", nargs="*")
    args = p.parse_args(argv)
    overrides = [*args.overrides, f"train.steps={args.steps}", "run.save_every=0", "run.export=false",
                 "run.resume=none"]
    cfg = load_config(args.config, overrides) if args.config else demo_config(None, overrides)
    activities = [torch.profiler.ProfilerActivity.CPU]
    if torch.cuda.is_available():
        activities.append(torch.profiler.ProfilerActivity.CUDA)
    out = Path(cfg.run.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    with torch.profiler.profile(activities=activities, record_shapes=True, profile_memory=True) as prof:
        result = train(cfg)
    trace = out / "profile_trace.json"
    prof.export_chrome_trace(str(trace))
    sort = "cuda_time_total" if torch.cuda.is_available() else "cpu_time_total"
    print(prof.key_averages().table(sort_by=sort, row_limit=25))
    print(phase_summary(result["history"]))
    print(f"trace: {trace} (open in chrome://tracing or Perfetto)")
    return 0


def phase_summary(history: list[dict]) -> str:
    """Mean seconds per phase over the steps (the first left out when there are more: it warms up),
    with the step's tokens/s and the policy update's caption tokens/s and (GPU) MFU."""
    rows = history[1:] if len(history) > 1 else history
    if not rows:
        return "no step ran"

    def mean(key: str) -> float:
        return sum(r.get(key, 0.0) for r in rows) / len(rows)

    lines = [f"per step, mean over {len(rows)} step(s):"]
    lines += [f"  {name + '_s':22s} {mean(name + '_s'):9.3f}" for name in PHASES if name + "_s" in rows[0]]
    lines.append(f"  {'step_s':22s} {mean('step_s'):9.3f}")
    lines.append(f"  {'tokens_per_s':22s} {mean('tokens_per_s'):9.1f}  (captions and answers generated)")
    if "policy_tokens_per_s" in rows[0]:
        lines.append(f"  {'policy_tokens_per_s':22s} {mean('policy_tokens_per_s'):9.1f}  (caption tokens through "
                     "the update's forward, loss and backward)")
    if "policy_mfu" in rows[0]:
        lines.append(f"  {'policy_mfu':22s} {mean('policy_mfu'):9.3f}  (matmul FLOPs of the update, a lower bound)")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    return run_main(_dispatch, argv)


def _dispatch(argv: list[str]) -> int:
    if not argv or argv[0] in ("-h", "--help"):
        print(__doc__)
        return 0 if argv else 2
    cmd, rest = argv[0], argv[1:]
    if cmd == "train":
        from racro_fast.train import main as train_main
        return train_main(rest)
    if cmd == "demo":
        from racro_fast.demo import main as demo_main
        return demo_main(rest)
    if cmd == "eval":
        from racro_fast.evaluate import main as eval_main
        return eval_main(rest)
    if cmd == "synth":
        from racro_fast.synth import main as synth_main
        return synth_main(rest)
    if cmd == "plan":
        from racro_fast.plan import main as plan_main
        return plan_main(rest)
    if cmd == "bench":
        return _bench(rest)
    if cmd == "profile":
        return _profile(rest)
    print(f"racro-fast: unknown command {cmd!r}\n{__doc__}", file=sys.stderr)
    return 2


if __name__ == "__main__":
    raise SystemExit(main())
