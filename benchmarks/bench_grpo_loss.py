"""Benchmark grpo_loss: ours vs the eager torch reference, torch.compile of it, and Liger's GRPO op.

    python benchmarks/bench_grpo_loss.py              # default shapes for this device
    python benchmarks/bench_grpo_loss.py --quick      # tiny smoke run
    python benchmarks/bench_grpo_loss.py --shapes 64x4096 --providers ours,torch --modes full

Providers: ours (kernels.grpo_loss: Triton on CUDA, the C++ kernel on CPU), torch (kernels.reference.grpo_loss_ref, eager), compile
(torch.compile of the reference), liger (liger_kernel.ops.grpo_loss, CUDA only). Liger's op
fuses the log-softmax and so reads logits [B, T+1, V] instead of log-probs; it runs here on fp32
logits of a vocab of --liger-vocab (default 8), built so that their log-probs are ours, so that
its time is mostly its loss work and its loss is ours. Modes: forward (with
autograd recording), backward (of a retained graph), full (both).

The loss is RACRO's setting: fp32 log-probs, clip 0.2/0.2, k3 KL with beta 0.001, token-mean, no
entropy term. GB/s counts the bytes a mode must move (forward reads logp, old, ref, mask, adv;
backward reads them again and writes dlogp) and is set against a device-to-device copy timed in
the same run (copy GB/s = 2 x bytes / time). On CPU every measurement runs in a fresh subprocess
so its peak RSS is its own (see common.py). Rows go to benchmarks/results/grpo_loss.csv.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import append_rows, measure, parse_shapes, print_table, run_spec  # noqa: E402

KERNEL = "grpo_loss"
PROVIDERS = ("ours", "torch", "compile", "liger")
MODES = ("forward", "backward", "full")
GPU_SHAPES = [(64, 4096), (128, 8192)]
CPU_SHAPES = [(16, 2048), (64, 4096)]
QUICK_SHAPES = [(4, 256)]
DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}


def make_inputs(B: int, T: int, dtype: torch.dtype, device: torch.device) -> dict:
    gen = torch.Generator(device="cpu").manual_seed(0)
    logp = -3.0 * torch.rand(B, T, generator=gen)
    old = logp + 0.2 * torch.randn(B, T, generator=gen)
    ref = logp + 0.2 * torch.randn(B, T, generator=gen)
    # Captions of varied length: each row's response covers between half and all of T.
    lengths = torch.randint(T // 2, T + 1, (B,), generator=gen)
    mask = torch.arange(T)[None, :] < lengths[:, None]
    return dict(
        logp=logp.to(device, dtype).requires_grad_(),
        old_logp=old.to(device, dtype),
        ref_logp=ref.to(device, dtype),
        advantages=torch.randn(B, generator=gen).to(device),
        mask=mask.to(device),
    )


def bytes_moved(B: int, T: int, elem: int, mode: str) -> int:
    reads = B * T * (3 * elem + 1) + B * 4            # logp, old, ref, bool mask, adv [B]
    fwd, bwd = reads, reads + B * T * elem            # the backward also writes dlogp
    return {"forward": fwd, "backward": bwd, "full": fwd + bwd}[mode]


def logits_with_logp(logp: torch.Tensor, vocab: int) -> tuple[torch.Tensor, torch.Tensor]:
    """fp32 logits [B, T+1, vocab] and ids [B, T] whose log-softmax at the ids is `logp` [B, T].

    Liger's GRPO op takes logits, ours log-probs: built this way both score the same numbers. The
    id gets logit 0 and the other vocab - 1 entries a u with (vocab - 1) e^u = e^(-logp) - 1.
    """
    B, T = logp.shape
    lp = logp.float().clamp(max=-1e-6)
    u = torch.log(torch.expm1(-lp)) - math.log(vocab - 1)
    ids = torch.randint(0, vocab, (B, T), generator=torch.Generator().manual_seed(1)).to(logp.device)
    logits = torch.zeros(B, T + 1, vocab, device=logp.device)
    logits[:, :T] = u[..., None]
    logits[:, :T].scatter_(-1, ids[..., None], 0.0)
    return logits, ids


def make_provider(name: str, x: dict, cfg, liger_vocab: int, interpreted: bool = False):
    """A zero-argument callable returning the loss, or a string saying why it cannot run here.

    interpreted: let Liger's Triton kernels run on CPU tensors under TRITON_INTERPRET=1 (tests
    check that each provider computes what ours does; never for timing).
    """
    if name == "ours":
        from racro_fast.kernels import grpo_loss

        return lambda: grpo_loss(cfg=cfg, **x)[0]
    if name in ("torch", "compile"):
        from racro_fast.kernels.reference import grpo_loss_ref

        f = grpo_loss_ref if name == "torch" else torch.compile(grpo_loss_ref, dynamic=False)
        return lambda: f(x["logp"], x["old_logp"], x["ref_logp"], x["advantages"], x["mask"], cfg)[0]
    if name == "liger":
        if not (x["logp"].is_cuda or interpreted):
            return "liger runs on CUDA only"
        try:
            from liger_kernel.ops.grpo_loss import GrpoLossFunction
        except ImportError as e:
            return f"liger-kernel not importable ({e})"
        logits, ids = logits_with_logp(x["logp"].detach(), liger_vocab)
        logits.requires_grad_()
        mask = x["mask"].to(torch.int32)
        old, ref = x["old_logp"].float().contiguous(), x["ref_logp"].float().contiguous()
        # logits, old, ref, ids, adv, mask, temperature, beta, eps_low, eps_high, inplace, loss_type;
        # "bnpo" is Liger's token-mean (masked sum / masked count of this call).
        return lambda: GrpoLossFunction.apply(logits, old, ref, ids, x["advantages"], mask, 1.0, cfg.kl_coef,
                                              cfg.clip_low, cfg.clip_high, False, "bnpo")[0]
    raise ValueError(f"unknown provider {name!r}")


def run_one(spec: dict) -> dict:
    """Time, peak memory and bandwidth of one (shape, dtype, provider, mode) in this process."""
    from racro_fast.kernels import GRPOLossConfig

    B, T, mode = spec["B"], spec["T"], spec["mode"]
    dtype = DTYPES[spec["dtype"]]
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    cfg = GRPOLossConfig(clip_low=0.2, clip_high=0.2, kl_coef=0.001, kl_type="k3", loss_agg="token-mean")
    x = make_inputs(B, T, dtype, device)
    out = dict(spec)
    out["io_mb"] = bytes_moved(B, T, x["logp"].element_size(), "forward") / float(1 << 20)

    f = make_provider(spec["provider"], x, cfg, spec["liger_vocab"])
    if isinstance(f, str):
        return dict(out, ms=float("nan"), peak_mb=float("nan"), note=f)

    def backward(loss: torch.Tensor, retain: bool) -> None:
        x["logp"].grad = None
        loss.backward(retain_graph=retain)

    try:
        if mode == "forward":
            fn = f
        elif mode == "backward":
            loss = f()
            fn = lambda: backward(loss, True)  # noqa: E731
        else:
            fn = lambda: backward(f(), False)  # noqa: E731
        if device.type == "cuda":
            fn()  # compile / JIT before the timed warm-up (on CPU the warm-up runs inside `measure`)
        out.update(measure(fn, warmup=spec["warmup"], reps=spec["reps"], device=device))
    except Exception as e:  # a provider that cannot run here is reported, not fatal
        return dict(out, ms=float("nan"), peak_mb=float("nan"), note=f"{type(e).__name__}: {str(e)[:160]}")
    if spec["provider"] == "liger":
        out["note"] = f"input logits [B, T+1, {spec['liger_vocab']}] fp32, not log-probs"
    else:
        moved = bytes_moved(B, T, x["logp"].element_size(), mode)
        out["gbs"] = moved / out["ms"] / 1e6
        # The copy moves as many bytes as the mode (read + write of half of them each).
        src = torch.empty(max(1, moved // 8), dtype=torch.float32, device=device)
        dst = torch.empty_like(src)
        copy = measure(lambda: dst.copy_(src), warmup=spec["warmup"], reps=max(5, spec["reps"]), device=device)
        out["copy_gbs"] = 2 * src.numel() * 4 / copy["ms"] / 1e6
        out["pct_copy"] = 100.0 * out["gbs"] / out["copy_gbs"]
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shapes", default=None, help="BxT[,BxT...] (default: per device)")
    p.add_argument("--dtype", default="fp32", choices=sorted(DTYPES), help="dtype of the log-prob inputs")
    p.add_argument("--providers", default=",".join(PROVIDERS))
    p.add_argument("--modes", default=",".join(MODES))
    p.add_argument("--warmup", type=int, default=None)
    p.add_argument("--reps", type=int, default=None)
    p.add_argument("--liger-vocab", type=int, default=8)
    p.add_argument("--threads", type=int, default=None,
                   help="CPU threads (torch.set_num_threads); 1 avoids OpenMP barrier stalls on a shared machine")
    p.add_argument("--quick", action="store_true", help="tiny shapes, 1 warm-up, 2 reps")
    here = os.path.dirname(os.path.abspath(__file__))
    p.add_argument("--csv", default=os.path.join(here, "results", f"{KERNEL}.csv"))
    p.add_argument("--no-csv", action="store_true")
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        spec = json.loads(args.worker)
        if spec.get("threads"):
            torch.set_num_threads(spec["threads"])
        print(json.dumps(run_one(spec)))
        return
    if args.threads:
        torch.set_num_threads(args.threads)  # also names the thread count in the CSV's device column

    cuda = torch.cuda.is_available()
    if args.shapes:
        shapes = parse_shapes(args.shapes)
    else:
        shapes = QUICK_SHAPES if args.quick else GPU_SHAPES if cuda else CPU_SHAPES
    warmup = args.warmup if args.warmup is not None else 1 if args.quick else 3 if not cuda else 10
    reps = args.reps if args.reps is not None else 2 if args.quick else 5 if not cuda else 50
    rows = []
    for B, T in shapes:
        for provider in args.providers.split(","):
            for mode in args.modes.split(","):
                spec = dict(kernel=KERNEL, provider=provider, mode=mode, B=B, T=T, dtype=args.dtype,
                            warmup=warmup, reps=reps, liger_vocab=args.liger_vocab, threads=args.threads)
                r = run_spec(os.path.abspath(__file__), run_one, spec)
                rows.append(r)
                bw = f", {r['gbs']:.1f} GB/s ({r['pct_copy']:.0f}% of copy)" if "gbs" in r else ""
                print(f"  {provider:8s} {mode:8s} B={B} T={T}: {r['ms']:.3f} ms, peak {r['peak_mb']:.1f} MiB{bw}"
                      + (f"  [{r['note']}]" if r.get("note") else ""), flush=True)
    print()
    print_table(rows, ["provider", "mode", "B", "T", "dtype", "ms", "peak_mb", "gbs", "copy_gbs", "pct_copy", "note"])
    for B, T in shapes:
        for mode in args.modes.split(","):
            sel = {r["provider"]: r for r in rows if (r["B"], r["T"], r["mode"]) == (B, T, mode)}
            if "ours" in sel and "torch" in sel and not math.isnan(sel["torch"]["ms"]):
                o, t = sel["ours"], sel["torch"]
                print(f"ours / torch ({mode}, B={B} T={T}): time {o['ms'] / t['ms']:.2f}x, "
                      f"peak memory {o['peak_mb'] / max(t['peak_mb'], 1e-9):.1%}"
                      + (f", {o['pct_copy']:.0f}% of copy bandwidth" if "pct_copy" in o else ""))
    if not args.no_csv:
        append_rows(args.csv, rows)
        print(f"appended {len(rows)} rows to {args.csv}")


if __name__ == "__main__":
    main()
