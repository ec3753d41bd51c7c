"""Benchmark one policy update (forward, log-probs, GRPO loss, backward) of a Qwen2.5-VL captioner
built from a config, three ways in one run:

    python benchmarks/bench_step.py                                   # this device's default shape
    python benchmarks/bench_step.py --layers 8 --hidden 512 --vocab 6400 --prefix-tokens 1024 \
        --caption-tokens 256 --group 4 --rounds 3
    python benchmarks/bench_step.py --quick --no-csv                  # seconds, for a smoke run

Providers (the same questions, captions and loss):
- ours: the packed forward (forward.py / packed.py): each question's image through the vision tower
  once, its prompt through the decoder once, its G captions attending to it, no padding; then
  kernels.fused_linear_grpo from the caption hidden states (no [tokens, vocab] logits).
- ours_padded: one right-padded row per caption (prompt and image G times), then the same fused op.
- trl: what TRL's GRPOTrainer does per micro-batch: padded rows through the HF model to the logits
  of the caption positions (logits_to_keep), log_softmax + gather, the GRPO loss in torch.

Each provider runs one micro-batch per question (its G captions). Shape: questions of
--prefix-tokens prompt tokens (about 3/4 of them one image's merged tokens) and G captions of
between half and all of --caption-tokens tokens. The model keeps Qwen2.5-VL-7B's proportions
(intermediate 5.3x hidden, head_dim 128, 4 query heads per KV head; on the defaults 4 query and 1
KV head): at 7B, 12x more decoder than vocabulary FLOPs per caption token, so the projection
(the same in every provider) does not hide the decoder.

On CPU each measurement runs in fresh subprocesses (time, then peak memory: common.run_isolated).
Rows go to benchmarks/results/step.csv; the run ends with one JSON line: speedup_vs_padded and
speedup_vs_trl (the other's time over ours), memory_vs_padded (our peak over the padded path's),
grads_match (ours and ours_padded give the same gradients on these inputs, checked in this process),
tokens/s and, on a GPU, MFU.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from common import (add_run_args, append_rows, measure, merge_rounds, print_table, round_ratios, run_isolated,  # noqa: E402
                    serve_worker)

PROVIDERS = ("ours", "ours_padded", "trl")
DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}


def model_config(layers: int, hidden: int, vocab: int):
    """Qwen2.5-VL with the 7B's proportions at `hidden`; a small vision tower of the same kind."""
    from transformers import Qwen2_5_VLConfig
    heads = max(1, hidden // 128)
    inter = int(round(hidden * 18944 / 3584 / 64)) * 64
    return Qwen2_5_VLConfig(
        vision_config=dict(depth=2, hidden_size=256, intermediate_size=1024, num_heads=2, in_channels=3,
                           out_hidden_size=hidden, patch_size=14, spatial_merge_size=2, temporal_patch_size=2,
                           window_size=112, fullatt_block_indexes=[1]),
        text_config=dict(vocab_size=vocab, hidden_size=hidden, intermediate_size=inter, num_hidden_layers=layers,
                         num_attention_heads=heads, num_key_value_heads=max(1, heads // 4),
                         max_position_embeddings=32768, bos_token_id=0, eos_token_id=1,
                         rope_parameters={"rope_type": "default", "rope_theta": 1e6, "mrope_section": [16, 24, 24]}),
        image_token_id=vocab - 1, video_token_id=vocab - 2, vision_start_token_id=vocab - 3,
        vision_end_token_id=vocab - 4, bos_token_id=0, eos_token_id=1, tie_word_embeddings=False)


def build(spec: dict, device: torch.device):
    """(model, samples): questions of one image each, G captions each, random advantages."""
    from transformers import Qwen2_5_VLForConditionalGeneration

    from racro_fast.forward import Sample
    torch.manual_seed(0)
    V = spec["vocab"]
    with device:  # initialised where it runs: a 7B-wide model's random init on the host takes a minute
        model = Qwen2_5_VLForConditionalGeneration(model_config(spec["layers"], spec["hidden"], V))
    model = model.to(device, DTYPES[spec["dtype"]]).train()
    g = torch.Generator().manual_seed(1)
    P, C, G = spec["P"], spec["C"], spec["G"]
    side = 2 * max(1, round(math.sqrt(0.75 * P)))  # patches per side; merged tokens = (side / 2) ** 2
    n_img = (side // 2) ** 2
    if n_img + 4 > P:
        raise SystemExit(f"--prefix-tokens {P} is too short for an image")
    patch_dim = 3 * 2 * 14 * 14
    samples = []
    for q in range(spec["questions"]):
        text = torch.randint(0, V - 4, (P - n_img - 2,), generator=g).tolist()
        half = len(text) // 2
        prompt = text[:half] + [V - 3] + [V - 1] * n_img + [V - 4] + text[half:]
        pixels = torch.randn(side * side, patch_dim, generator=g)
        grid = torch.tensor([[1, side, side]])
        for _ in range(G):
            L = int(torch.randint(C // 2, C + 1, (), generator=g))
            caption = torch.randint(0, V - 4, (L,), generator=g).tolist()
            samples.append(Sample(prompt + caption, P, pixels, grid, adv=float(torch.randn((), generator=g))))
    return model, samples


def update_fn(provider: str, model, samples, device: torch.device, G: int):
    """One update's forward and backward over micro-batches of one question, as a callable."""
    from racro_fast.forward import ForwardPlan, caption_batches, caption_mask, collate
    from racro_fast.kernels import GRPOLossConfig, fused_linear_grpo, grpo_loss
    from racro_fast.prompts import mm_token_types
    cfg = GRPOLossConfig()  # token-mean, clip 0.2, no KL: on-policy, ratio 1
    n_tokens = float(sum(len(s.input_ids) - s.prompt_len for s in samples))

    def ours(packed: bool):
        def run():
            model.zero_grad(set_to_none=True)
            for mb, h, y in caption_batches(model, samples, 0, device, ForwardPlan(packed=packed, micro_batch=G)):
                mask = caption_mask(mb, device)
                adv = torch.tensor([s.adv for s in mb], device=device)
                loss, _ = fused_linear_grpo(h, model.lm_head.weight, y, None, None, adv, mask, cfg, 1.0, n_tokens)
                loss.backward()
        return run

    def trl():
        model.zero_grad(set_to_none=True)
        for i in range(0, len(samples), G):
            mb = samples[i:i + G]
            batch = collate(mb, 0, device)
            P = mb[0].prompt_len
            K = batch["input_ids"].shape[1] - P  # the caption positions (prompts share one length here)
            logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                           pixel_values=batch["pixel_values"], image_grid_thw=batch["image_grid_thw"],
                           mm_token_type_ids=mm_token_types(batch["input_ids"], model.config),
                           logits_to_keep=K + 1, use_cache=False).logits[:, :-1]  # (B, K, V)
            target = batch["input_ids"][:, P:]  # (B, K)
            logp = torch.log_softmax(logits.float(), dim=-1).gather(-1, target[..., None])[..., 0]  # (B, K)
            mask = batch["mask"][:, P - 1:]
            adv = torch.tensor([s.adv for s in mb], device=device)
            loss, _ = grpo_loss(logp, None, None, adv, mask, cfg, num_tokens=n_tokens, backend="torch")
            loss.backward()

    return {"ours": ours(True), "ours_padded": ours(False), "trl": trl}[provider]


def run_one(spec: dict) -> dict:
    from racro_fast.forward import ForwardPlan, computed_tokens
    from racro_fast.metrics import peak_tflops, policy_flops
    torch.set_num_threads(spec["threads"])
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model, samples = build(spec, device)
    out = dict(spec)
    fn = update_fn(spec["provider"], model, samples, device, spec["G"])
    try:
        out.update(measure(fn, warmup=spec["warmup"], reps=spec["reps"], device=device))
    except Exception as e:  # a provider that cannot run here (out of memory) is reported, not fatal
        return dict(out, ms=float("nan"), peak_mb=float("nan"), note=f"{type(e).__name__}: {str(e)[:160]}")
    captions = sum(len(s.input_ids) - s.prompt_len for s in samples)
    out["caption_tokens_per_s"] = captions / (out["ms"] / 1e3)
    peak = peak_tflops(torch.cuda.get_device_name()) if device.type == "cuda" else None
    if peak:  # matmul FLOPs of the tokens this provider computes (metrics.policy_flops: a lower bound)
        computed = computed_tokens(samples, ForwardPlan(packed=spec["provider"] == "ours"))
        flops = policy_flops(model.config.text_config, computed, captions)
        out["mfu"] = flops / (out["ms"] / 1e3) / (peak * 1e12)
    return out


def grads_match(spec: dict) -> tuple[bool, float]:
    """ours and ours_padded on the same model and inputs: the largest gradient difference, relative
    to each parameter's largest gradient entry."""
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model, samples = build(dict(spec, dtype="fp32"), device)
    grads = {}
    for provider in ("ours", "ours_padded"):
        update_fn(provider, model, samples, device, spec["G"])()
        grads[provider] = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}
    a, b = grads["ours"], grads["ours_padded"]
    if a.keys() != b.keys():
        return False, float("inf")
    worst = max(float((a[k] - b[k]).abs().max() / b[k].abs().max().clamp_min(1e-12)) for k in a)
    return worst < 1e-3, worst


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    cuda = torch.cuda.is_available()
    p.add_argument("--layers", type=int, default=4 if cuda else 8)
    p.add_argument("--hidden", type=int, default=3584 if cuda else 512)
    p.add_argument("--vocab", type=int, default=152064 if cuda else 6400)
    p.add_argument("--prefix-tokens", type=int, default=1024)
    p.add_argument("--caption-tokens", type=int, default=256)
    p.add_argument("--group", type=int, default=4)
    p.add_argument("--questions", type=int, default=2)
    p.add_argument("--dtype", default=None, choices=sorted(DTYPES), help="default: bf16 on CUDA, fp32 on CPU")
    p.add_argument("--providers", default=",".join(PROVIDERS))
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--reps", type=int, default=None, help="default: 2 on CPU, 5 on CUDA")
    p.add_argument("--quick", action="store_true", help="a tiny model, for a smoke run")
    p.add_argument("--no-check", action="store_true", help="skip the gradient comparison")
    add_run_args(p, os.path.abspath(__file__), "step")
    args = p.parse_args()
    if serve_worker(args, run_one):
        return
    if args.quick:
        args.layers, args.hidden, args.vocab, args.prefix_tokens, args.caption_tokens = 2, 128, 512, 96, 24
    spec0 = dict(kernel="step", layers=args.layers, hidden=args.hidden, vocab=args.vocab, P=args.prefix_tokens,
                 C=args.caption_tokens, G=args.group, questions=args.questions,
                 dtype=args.dtype or ("bf16" if cuda else "fp32"), warmup=args.warmup,
                 reps=args.reps or (5 if cuda else 2), threads=args.threads or torch.get_num_threads())
    providers = args.providers.split(",")
    rounds = []
    for k in range(args.rounds):
        rows = []
        for provider in providers:
            spec = dict(spec0, provider=provider, mode="full")
            r = run_isolated(os.path.abspath(__file__), spec) if not cuda else run_one(spec)
            if cuda:
                torch.cuda.empty_cache()
            rows.append(r)
            print(f"  round {k}: {provider:12s} {r['ms']:.1f} ms, peak {r['peak_mb']:.1f} MiB"
                  + (f"  [{r['note']}]" if r.get("note") else ""), flush=True)
        rounds.append(rows)
    rows = merge_rounds(rounds)
    print()
    print_table(rows, ["provider", "layers", "hidden", "vocab", "P", "C", "G", "dtype", "ms", "peak_mb",
                       "caption_tokens_per_s", *(["mfu"] if cuda else []), "ms_rounds", "note"])
    sel = {r["provider"]: r for r in rows}
    summary = {"layers": args.layers, "hidden": args.hidden, "vocab": args.vocab, "prefix": args.prefix_tokens,
               "caption": args.caption_tokens, "group": args.group, "dtype": spec0["dtype"]}
    for other, key in (("ours_padded", "speedup_vs_padded"), ("trl", "speedup_vs_trl")):
        ratios = round_ratios(rounds, lambda r: True, other, "ours")
        if ratios:
            summary[key] = statistics.median(ratios)
            print(f"{other} / ours: time {summary[key]:.2f}x (per round: {' '.join(f'{x:.2f}' for x in ratios)}), "
                  f"our peak memory {sel['ours']['peak_mb'] / max(sel[other]['peak_mb'], 1e-9):.1%} of {other}'s")
    if "ours" in sel and "ours_padded" in sel:
        summary["memory_vs_padded"] = sel["ours"]["peak_mb"] / max(sel["ours_padded"]["peak_mb"], 1e-9)
    if "ours" in sel:
        summary["tokens_per_s"] = sel["ours"].get("caption_tokens_per_s")
        if "mfu" in sel["ours"]:
            summary["mfu"] = sel["ours"]["mfu"]
    if not args.no_check:
        ok, worst = grads_match(spec0)
        summary["grads_match"], summary["grad_max_rel_diff"] = ok, worst
    if not args.no_csv:
        append_rows(args.csv, rows)
        print(f"appended {len(rows)} rows to {args.csv}")
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
