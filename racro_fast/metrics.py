"""Where the per-step metrics go: metrics.jsonl (one JSON line a step, flushed), TensorBoard and
W&B when configured, and a progress bar; rank 0 only (the metrics arrive already reduced over ranks).

    metrics = MetricsLog(cfg, out_dir, start_step); metrics.write(m); metrics.close()
"""
from __future__ import annotations

import json
from pathlib import Path

from racro_fast import dist
from racro_fast.config import Config


class MetricsLog:
    """metrics.jsonl (flushed per step), TensorBoard / W&B when configured, a progress bar; rank 0 only."""

    def __init__(self, cfg: Config, out_dir: Path, start_step: int) -> None:
        self.on = dist.rank() == 0
        self.sinks, self.pbar, self.file = [], None, None
        if not self.on:
            return
        self.file = open(out_dir / "metrics.jsonl", "a")
        if cfg.run.tensorboard:
            from torch.utils.tensorboard import SummaryWriter
            tb = SummaryWriter(str(out_dir / "tb"))
            self.sinks.append(lambda m: [tb.add_scalar(k, v, m["step"]) for k, v in m.items() if k != "step"])
        if cfg.run.wandb_project:
            import wandb
            run = wandb.init(project=cfg.run.wandb_project, config=cfg.to_dict(), dir=str(out_dir))
            self.sinks.append(lambda m: run.log(m, step=m["step"]))
        if cfg.run.progress:
            from tqdm.auto import tqdm
            self.pbar = tqdm(total=cfg.train.steps, initial=start_step, desc="grpo", dynamic_ncols=True)

    def write(self, m: dict) -> None:
        if not self.on:
            return
        self.file.write(json.dumps(m) + "\n")
        self.file.flush()
        for sink in self.sinks:
            sink(m)
        if self.pbar is not None:
            self.pbar.update(1)
            self.pbar.set_postfix(reward=f"{m['reward_mean']:.3f}", kl=f"{m.get('kl_mean', 0):.4f}",
                                  len=f"{m['caption_len_mean']:.1f}")

    def close(self) -> None:
        if self.pbar is not None:
            self.pbar.close()
        if self.file is not None:
            self.file.close()


def collapse_signal(history: list[dict], window: int = 10) -> str:
    """Why the policy looks like it is collapsing, or "": over the last `window` steps the mean caption
    length or the entropy fell below a quarter of what it was over the first `window` steps, while
    the reward did not rise (by more than 0.05) above its level there."""
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
