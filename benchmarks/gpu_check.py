"""The GPU checks in one run of at most ~8 minutes on one H100/H200 (`make gpu-check`).

    python benchmarks/gpu_check.py [--commit SHA]        # needs torch (CUDA), triton, transformers

1. the kernel tests on CUDA (TRITON_INTERPRET=0: the compiled kernels against their references);
2. the kernel benchmarks at the README's target shapes, ours against eager (and Liger-Kernel when
   installed): fused_linear_logprob and fused_linear_grpo fwd+bwd at N=16384 D=3584 V=152064 bf16
   (with their 4- and 3-GEMM floors), logprob_from_logits and grpo_loss at their GPU shapes, and
   one whole update (bench_step.py: the packed forward against the padded one and a TRL-style step,
   Qwen2.5-VL-7B sizes with 4 layers, MFU); rows appended to benchmarks/results/<kernel>.csv;
3. the packed attention's varlen call on CUDA (flash-attn's, else torch's varlen_attn) against the
   exact segment loop in fp32 on the CPU, forward and the gradients of q, k, v;
4. 3 trainer steps on CUDA (the packed update through that varlen call): tiny random Qwen2.5-VL captioner and Qwen2 reasoner, HF engines,
   FSDP2 at world size 1 over nccl (`torchrun --nproc_per_node 1`), with the per-phase seconds and
   memory gauges of every step.
Everything is logged to benchmarks/results/gpu_check.log and summarised as one JSON line appended
to benchmarks/results/gpu_check.jsonl (device, commit, date, each part's status and figures).

Left out: vLLM (not on the check machines), flash-attn, DeepSpeed and multi-GPU runs.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"
BENCH = [
    ("fused_linear_logprob", ["--shapes", "16384x3584x152064", "--modes", "forward,full", "--rounds", "2"]),
    ("fused_linear_grpo", ["--shapes", "16384x3584x152064", "--rounds", "2"]),
    ("logprob_from_logits", []),
    ("grpo_loss", []),
    # one whole update at the 7B's sizes with 4 layers: packed against padded and TRL-style, MFU
    ("step", ["--layers", "4", "--reps", "3"]),
]


def run(cmd: list[str], log, timeout: float, env: dict | None = None) -> tuple[int, str, float]:
    t0 = time.perf_counter()
    log.write(f"\n$ {' '.join(cmd)}\n")
    log.flush()
    try:
        p = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
        rc, out = p.returncode, p.stdout + p.stderr
    except subprocess.TimeoutExpired as e:
        rc, out = 124, f"{e.stdout or ''}{e.stderr or ''}\ntimed out after {timeout:.0f} s"
    log.write(out if isinstance(out, str) else out.decode(errors="replace"))
    log.flush()
    return rc, out if isinstance(out, str) else str(out), time.perf_counter() - t0


def tiny_models(out: Path) -> tuple[str, str]:
    from transformers import AutoTokenizer

    from racro_fast.tiny import build_captioner, build_reasoner, build_tokenizer
    build_tokenizer(out / "tokenizer")
    tok = AutoTokenizer.from_pretrained(str(out / "tokenizer"))
    build_captioner(out / "captioner", tok, seed=0)
    build_reasoner(out / "reasoner", tok, seed=0)
    return str(out / "captioner"), str(out / "reasoner")


def varlen_check(cuda: bool) -> dict:
    """The varlen call the packed forward makes on CUDA, against the SDPA segment loop (fp32, CPU) on
    two prompts of 3 captions each, GQA 8:2 heads of 64, bf16: output and gradients."""
    import torch

    from racro_fast.packed import VarlenLayout, _flash_varlen, varlen_attention

    def layout(prompts: list[int], captions: list[list[int]], dev) -> VarlenLayout:
        cu_q, cu_k, kv, pos = [0], [0], [], 0
        for p, caps in zip(prompts, captions):
            start = pos
            kv += range(start, start + p)
            pos += p
            cu_q.append(pos)
            cu_k.append(len(kv))
            for c in caps:
                kv += list(range(start, start + p)) + list(range(pos, pos + c))
                pos += c
                cu_q.append(pos)
                cu_k.append(len(kv))
        return VarlenLayout(cu_q, cu_k, torch.tensor(kv, dtype=torch.long, device=dev))

    prompts, captions = [37, 50], [[9, 12, 5], [30, 1, 17]]
    T, H, Hkv, d = sum(prompts) + sum(map(sum, captions)), 8, 2, 64
    g = torch.Generator().manual_seed(0)
    base = [torch.randn(1, n, T, d, generator=g) for n in (H, Hkv, Hkv)]
    dev = torch.device("cuda" if cuda else "cpu")
    ref_in = [t.clone().requires_grad_(True) for t in base]
    ref = varlen_attention(*ref_in, layout(prompts, captions, torch.device("cpu")), scale=d ** -0.5)
    dtype = torch.bfloat16 if cuda else torch.float32
    got_in = [t.to(dev, dtype).requires_grad_(True) for t in base]
    got = varlen_attention(*got_in, layout(prompts, captions, dev), scale=d ** -0.5)
    w = torch.randn(ref.shape, generator=g)
    (ref * w).sum().backward()
    (got.float() * w.to(dev)).sum().backward()
    err = {"out": (got.float().cpu() - ref).abs().max().item()}
    for name, a, b in zip("qkv", got_in, ref_in):
        err[f"d{name}"] = (a.grad.float().cpu() - b.grad).abs().max().item()
    tol = 3e-2 if cuda else 1e-5  # bf16 inputs against fp32
    path = ("flash-attn" if _flash_varlen() else "torch varlen_attn") if cuda else "segment loop"
    return {"rc": 0 if max(err.values()) <= tol else 1, "path": path, "max_abs_err": err, "tol": tol}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--commit", default=None, help="the commit checked (when the tree has no .git)")
    p.add_argument("--budget", type=float, default=480.0, help="seconds for the whole check")
    p.add_argument("--allow-cpu", action="store_true", help="run the plumbing on CPU (tiny shapes): for tests")
    args = p.parse_args()
    import torch
    cuda = torch.cuda.is_available()
    if not cuda and not args.allow_cpu:
        print("gpu_check: no CUDA device visible", file=sys.stderr)
        return 2
    sys.path.insert(0, str(ROOT / "benchmarks"))
    from common import device_name, git_commit
    RESULTS.mkdir(parents=True, exist_ok=True)
    summary: dict = {"device": device_name(), "commit": args.commit or git_commit(),
                     "date": datetime.datetime.now().isoformat(timespec="seconds"),
                     "torch": torch.__version__}
    deadline = time.monotonic() + args.budget
    env = dict(os.environ, PYTHONUNBUFFERED="1", TRITON_INTERPRET="0" if cuda else "1")
    with open(RESULTS / "gpu_check.log" if cuda else os.devnull, "a") as log:
        log.write(f"\n==== gpu_check {summary}\n")
        # 1. kernel tests, compiled
        tests = ["tests/test_fused_linear_logprob.py", "tests/test_logprob_from_logits.py", "tests/test_grpo_loss.py"]
        if not cuda:
            tests = [t + "::test_no_tokens" for t in tests[:2]]
        rc, out, s = run([sys.executable, "-P", "-m", "pytest", "-q", "-p", "no:cacheprovider", *tests], log,
                         timeout=max(30.0, min(180.0, deadline - time.monotonic())), env=env)
        summary["kernel_tests"] = {"rc": rc, "seconds": round(s, 1), "result": out.strip().splitlines()[-1] if out.strip() else ""}
        # 2. kernel benchmarks (rows go to benchmarks/results/<kernel>.csv)
        summary["bench"] = {}
        for name, extra in BENCH:
            left = deadline - time.monotonic() - 90  # keep time for the trainer steps
            if left < 20:
                summary["bench"][name] = {"rc": None, "why": "skipped: out of time"}
                continue
            cmd = [sys.executable, str(ROOT / "benchmarks" / f"bench_{name}.py"),
                   *(extra if cuda else ["--quick", "--no-csv"])]
            rc, out, s = run(cmd, log, timeout=left, env=env)
            lines = out.splitlines()
            ratios = [line.strip() for line in lines if line.startswith("ours / ") or " / ours: " in line]
            summary["bench"][name] = {"rc": rc, "seconds": round(s, 1), "ratios": ratios}
            if lines and lines[-1].startswith("{"):  # bench_step's summary line
                summary["bench"][name]["summary"] = json.loads(lines[-1])
        # 3. the packed attention's varlen call
        try:
            summary["varlen"] = varlen_check(cuda)
        except Exception as e:  # noqa: BLE001 - recorded, the other parts still run
            summary["varlen"] = {"rc": 1, "error": f"{type(e).__name__}: {e}"}
        log.write(f"\nvarlen: {summary['varlen']}\n")
        # 4. three trainer steps
        with tempfile.TemporaryDirectory() as tmp:
            cap, rsn = tiny_models(Path(tmp) / "models")
            run_dir = Path(tmp) / "run"
            dtype = "bfloat16" if cuda else "float32"
            cmd = [sys.executable, "-P", "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "1",
                   "-m", "racro_fast.train", "--config", str(ROOT / "configs" / "demo_cpu.yaml"),
                   f"model.captioner={cap}", f"model.reasoner={rsn}", f"model.dtype={dtype}", "train.steps=3",
                   "run.progress=false", "run.save_every=0", "run.export=false", f"run.output_dir={run_dir}",
                   f"run.device={'cuda' if cuda else 'cpu'}"]
            rc, out, s = run(cmd, log, timeout=max(30.0, deadline - time.monotonic()), env=env)
            steps = []
            if (run_dir / "metrics.jsonl").exists():
                for line in (run_dir / "metrics.jsonl").read_text().splitlines():
                    m = json.loads(line)
                    steps.append({k: round(v, 4) if isinstance(v, float) else v for k, v in m.items()
                                  if k == "step" or k.endswith("_s") or k.startswith("mem_") or k in
                                  ("peak_mem_gb", "loss", "reward_mean", "grad_norm", "tokens_per_s")})
            summary["train"] = {"rc": rc, "seconds": round(s, 1), "steps": steps}
    summary["ok"] = summary["kernel_tests"]["rc"] == 0 and summary["train"]["rc"] == 0 and summary["varlen"]["rc"] == 0 and all(
        b.get("rc") == 0 for b in summary["bench"].values())
    if cuda:  # a CPU smoke run checks the plumbing and records nothing
        with open(RESULTS / "gpu_check.jsonl", "a") as f:
            f.write(json.dumps(summary) + "\n")
    print(json.dumps(summary, indent=1))
    return 0 if summary["ok"] else 1


if __name__ == "__main__":
    raise SystemExit(main())
