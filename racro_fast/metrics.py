"""The step's metrics: how each is reduced, the phases it is timed by, and where it goes.

- `PHASES` and `Phases`: the seconds of each named phase of a step (`caption_s`, ...).
- `UPDATE_REDUCTIONS`: how each update metric is reduced over micro-batches, ranks and a step's
  updates (`MetricSums`, `combine_updates`), in one table.
- `MetricsLog`: metrics.jsonl (one JSON line a step, flushed), TensorBoard and W&B when configured,
  and progress (a bar on a terminal, a line every few steps otherwise); rank 0 only (the metrics
  arrive already reduced over ranks).

    metrics = MetricsLog(cfg, out_dir, start_step); metrics.write(m); metrics.close()
"""
from __future__ import annotations

import contextlib
import json
import logging
import os
import sys
import time
from pathlib import Path

import torch

from racro_fast import dist
from racro_fast.config import Config

log = logging.getLogger("racro_fast.train")

# the step's phases in the order they run; policy_* are the captioner's update inside `train`
PHASES = ("sync", "caption", "reason", "reward", "logprob", "train", "policy_forward", "policy_loss", "policy_backward")


class Phases:
    """Seconds per named phase of one step (`with phases("caption"): ...` -> `caption_s`); on a GPU
    each phase waits for the device at both ends, so its kernels count where they were launched."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}

    @contextlib.contextmanager
    def __call__(self, name: str):
        if name not in PHASES:
            raise ValueError(f"unknown phase {name!r}: one of {PHASES}")
        if torch.cuda.is_available() and torch.cuda.is_initialized():
            torch.cuda.synchronize()
        t = time.perf_counter()
        try:
            yield
        finally:
            if torch.cuda.is_available() and torch.cuda.is_initialized():
                torch.cuda.synchronize()
            key = f"{name}_s"
            self.seconds[key] = self.seconds.get(key, 0.0) + time.perf_counter() - t

    def policy_seconds(self) -> float:
        """The policy's forward, loss and backward: the time the update's throughput is over."""
        return sum(self.seconds.get(f"policy_{k}_s", 0.0) for k in ("forward", "loss", "backward"))


# How each update metric (the loss op's, plus the loss) is reduced. Over micro-batches and ranks:
# "token_mean" weighted by each micro-batch's caption tokens; "sum" for the loss terms, each
# micro-batch's already a share of the global mini-batch's loss; "min" / "max". Over a step's
# updates: min / max stay min / max, everything else is the mean over the updates.
UPDATE_REDUCTIONS = {
    "loss": "sum", "pg_loss": "sum",
    "clip_frac": "token_mean", "kl_mean": "token_mean", "ratio_mean": "token_mean", "entropy_mean": "token_mean",
    "rollout_kl": "token_mean", "is_weight_mean": "token_mean", "is_clipped_frac": "token_mean",
    "ratio_min": "min", "ratio_max": "max", "is_weight_max": "max",
}


def reduce_over_ranks(values: dict[str, float], how: dict[str, str]) -> dict[str, float]:
    """Each value reduced over ranks by `how[key]` ("sum", "min" or "max"; "token_mean" sums):
    the sums in one collective. Every rank must pass the same keys."""
    sums = [k for k in values if how[k] not in ("min", "max")]
    out = dict(zip(sums, dist.all_reduce_sum([values[k] for k in sums])))
    for k in values:
        if how[k] == "max":
            out[k] = dist.all_reduce_max(values[k])
        elif how[k] == "min":
            out[k] = dist.all_reduce_min(values[k])
    return out


class MetricSums:
    """An update's metrics over its micro-batches (`add`), then over ranks (`reduce`)."""

    def __init__(self) -> None:
        self.values: dict[str, float] = {}
        self.tokens = 0.0

    def add(self, metrics: dict, tokens: float) -> None:
        """One micro-batch's metrics (tensors or floats; keys outside UPDATE_REDUCTIONS are ignored)
        over `tokens` caption tokens."""
        self.tokens += tokens
        for k, v in metrics.items():
            how = UPDATE_REDUCTIONS.get(k)
            if how is None:
                continue
            v = float(v) * (tokens if how == "token_mean" else 1.0)
            if k not in self.values:
                self.values[k] = v
            elif how == "min":
                self.values[k] = min(self.values[k], v)
            elif how == "max":
                self.values[k] = max(self.values[k], v)
            else:
                self.values[k] += v

    def reduce(self) -> dict[str, float]:
        """Over ranks: token means divided by the tokens of every rank."""
        how = {**UPDATE_REDUCTIONS, "_tokens": "sum"}
        out = reduce_over_ranks({**self.values, "_tokens": self.tokens}, how)
        tokens = out.pop("_tokens")
        return {k: v / tokens if UPDATE_REDUCTIONS[k] == "token_mean" and tokens else v for k, v in out.items()}


def combine_updates(results: list[dict]) -> dict:
    """A step's update metrics from each update's: min / max over the updates, grad_norm the mean
    over the updates taken (`skipped` counts the others), everything else the mean."""
    out = {}
    for k in results[0]:
        if k in ("grad_norm", "skipped"):
            continue
        vals = [r[k] for r in results]
        how = UPDATE_REDUCTIONS.get(k)
        out[k] = min(vals) if how == "min" else max(vals) if how == "max" else sum(vals) / len(vals)
    taken = [r["grad_norm"] for r in results if not r["skipped"]]
    out["grad_norm"] = sum(taken) / len(taken) if taken else float("nan")
    out["skipped"] = float(sum(r["skipped"] for r in results))
    return out


class MetricsLog:
    """metrics.jsonl (flushed per step), TensorBoard / W&B when configured, progress; rank 0 only.

    Progress (run.progress) is a bar on a terminal; in a log file (no terminal) it is one line every
    `every` steps and at the last, so a redrawn bar never fills a non-terminal log."""

    def __init__(self, cfg: Config, out_dir: Path, start_step: int) -> None:
        self.on = dist.rank() == 0
        self.sinks, self.pbar, self.file = [], None, None
        self.steps = cfg.train.steps
        self.every = 0  # log a progress line every this many steps (0: none, or the bar)
        if not self.on:
            return
        path = out_dir / "metrics.jsonl"
        if path.exists():  # a run killed after logging steps its last checkpoint does not hold: they run again
            kept = [line for line in path.read_text().splitlines() if _step_of(line) <= start_step]
            tmp = path.with_suffix(".tmp")
            tmp.write_text("".join(line + "\n" for line in kept))
            os.replace(tmp, path)
        self.file = open(path, "a")
        if cfg.run.tensorboard:
            from torch.utils.tensorboard import SummaryWriter
            tb = SummaryWriter(str(out_dir / "tb"))
            self.sinks.append(lambda m: [tb.add_scalar(k, v, m["step"]) for k, v in m.items() if k != "step"])
        if cfg.run.wandb_project:
            import wandb
            run = wandb.init(project=cfg.run.wandb_project, config=cfg.to_dict(), dir=str(out_dir))
            self.sinks.append(lambda m: run.log(m, step=m["step"]))
        if cfg.run.progress and sys.stderr.isatty():
            from tqdm.auto import tqdm
            self.pbar = tqdm(total=cfg.train.steps, initial=start_step, desc="grpo", dynamic_ncols=True)
        elif cfg.run.progress:
            self.every = max(1, cfg.train.steps // 20)

    @staticmethod
    def summary(m: dict) -> dict[str, str]:
        return {"reward": f"{m['reward_mean']:.3f}", "kl": f"{m.get('kl_mean', 0):.4f}",
                "len": f"{m['caption_len_mean']:.1f}"}

    def write(self, m: dict) -> None:
        if not self.on:
            return
        self.file.write(json.dumps(m) + "\n")
        self.file.flush()
        for sink in self.sinks:
            sink(m)
        if self.pbar is not None:
            self.pbar.update(1)
            self.pbar.set_postfix(**self.summary(m))
        elif self.every and (m["step"] % self.every == 0 or m["step"] == self.steps):
            log.info("step %d/%d %s %.1f s", m["step"], self.steps,
                     " ".join(f"{k} {v}" for k, v in self.summary(m).items()), m["step_s"])

    def close(self) -> None:
        if self.pbar is not None:
            self.pbar.close()
        if self.file is not None:
            self.file.close()


def _step_of(line: str) -> float:
    """A metrics line's step; a torn line (a kill mid-write) counts as past every step."""
    try:
        return json.loads(line)["step"]
    except (ValueError, KeyError, TypeError):
        return float("inf")


def collapse_signal(history: list[dict], window: int = 10) -> str:
    """Why the policy looks like it is collapsing, or "": over the last `window` steps the mean caption
    length or the entropy fell below a quarter of what it was over the first `window` steps, or the
    entropy rose above 4 times it (the captions dissolving into noise: an entropy bonus too strong),
    while the reward did not rise (by more than 0.05) above its level there."""
    if len(history) < 2 * window:
        return ""
    first, last = history[:window], history[-window:]

    def mean(rows: list[dict], key: str) -> float:
        return sum(r.get(key, 0.0) for r in rows) / len(rows)

    if mean(last, "reward_mean") > mean(first, "reward_mean") + 0.05:
        return ""
    for key, label in (("caption_len_mean", "the mean caption length"), ("entropy_mean", "the entropy")):
        before, now = mean(first, key), mean(last, key)
        if before > 0 and now < 0.25 * before:
            return (f"{label} fell from {before:.3g} to {now:.3g} while the reward stayed at "
                    f"{mean(last, 'reward_mean'):.3f} (train.min_caption_tokens sets a floor)")
    before, now = mean(first, "entropy_mean"), mean(last, "entropy_mean")
    if before > 0 and now > 4.0 * before:
        return (f"the entropy rose from {before:.3g} to {now:.3g} while the reward stayed at "
                f"{mean(last, 'reward_mean'):.3f} (loss.entropy_coef may be too large)")
    return ""


# dense bf16 peak of the GPUs the MFU is reported for, TFLOP/s
PEAK_BF16_TFLOPS = {"H100": 989.0, "H200": 989.0, "H800": 989.0, "A100": 312.0, "B200": 2250.0}


def decoder_params_per_token(text_config) -> int:
    """Matmul parameters each token goes through in the decoder layers (attention projections and
    the gated MLP), from the config: the same under every sharding."""
    c = text_config
    hd = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
    attn = c.hidden_size * hd * (2 * c.num_attention_heads + 2 * c.num_key_value_heads)
    return c.num_hidden_layers * (attn + 3 * c.hidden_size * c.intermediate_size)


def policy_flops(text_config, computed_tokens: float, caption_tokens: float) -> float:
    """Matmul FLOPs of a forward + backward (6 per parameter per token): the decoder over the tokens
    the forward computes, the vocabulary projection over the caption tokens. Attention scores and the
    vision tower are left out, so an MFU from this is a lower bound."""
    head = text_config.hidden_size * text_config.vocab_size
    return 6.0 * (decoder_params_per_token(text_config) * computed_tokens + head * caption_tokens)


def peak_tflops(device_name: str) -> float | None:
    return next((v for k, v in PEAK_BF16_TFLOPS.items() if k in device_name), None)
