"""The policy forward over training samples (one per caption): the decoder to its last hidden state,
and only the caption positions through the vocabulary projection (the [tokens, vocab] logits are
never built): `kernels.fused_linear_grpo` in the update, `kernels.fused_linear_logprob` in the
no-grad passes.

Two layouts, the same tokens out (in sample order):
- packed (train.packed, the default): a question's prompt and images computed once and its G
  captions attending to them, micro-batches of whole questions filled to a token budget (packed.py);
- padded: one right-padded row per caption, micro-batches of train.micro_batch captions.

    plan = ForwardPlan.from_config(cfg)
    for mb, h, y in caption_batches(model, samples, pad_id, device, plan):   # (N, D), (N,) per micro-batch
        mask = caption_mask(mb, device)                                      # (B, L): sample b's tokens
    fill_logprobs(backend, ref, samples, "ref_logp", 1.0, pad_id, device, plan)   # no-grad passes
"""
from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import torch

from racro_fast import dist
from racro_fast.kernels import fused_linear_logprob
from racro_fast.packed import (group_samples, pack, packed_hidden, packed_tokens, split_batches,
                               token_budget_batches)
from racro_fast.prompts import mm_token_types


@dataclass
class Sample:
    """One caption: the captioner prompt + the sampled caption, with what the loss needs."""
    input_ids: list[int]  # prompt + caption tokens
    prompt_len: int
    pixel_values: torch.Tensor | None  # (patches, C*t*p*p) of this prompt's images
    image_grid_thw: torch.Tensor | None  # (images, 3)
    adv: float = 0.0
    old_logp: torch.Tensor | None = None  # (len(input_ids) - 1,) fp32, set before the update
    ref_logp: torch.Tensor | None = None
    rollout_logp: torch.Tensor | None = None  # the same layout: the engine's log-probs of the caption, 0 before it
    image_embeds: torch.Tensor | None = None  # (image tokens, D): a frozen vision tower's features, once per step


def collate(samples: list[Sample], pad_id: int, device: torch.device) -> dict:
    """Right-pad a micro-batch; `mask[b, t]` marks positions whose next token is a caption token."""
    T = max(len(s.input_ids) for s in samples)
    B = len(samples)
    input_ids = torch.full((B, T), pad_id, dtype=torch.long)  # (B, T)
    attn = torch.zeros((B, T), dtype=torch.long)  # (B, T)
    mask = torch.zeros((B, T - 1), dtype=torch.bool)  # (B, T-1): position t predicts token t+1
    for b, s in enumerate(samples):
        n = len(s.input_ids)
        input_ids[b, :n] = torch.tensor(s.input_ids)
        attn[b, :n] = 1
        mask[b, s.prompt_len - 1:n - 1] = True
    batch = {"input_ids": input_ids.to(device), "attention_mask": attn.to(device), "mask": mask.to(device)}
    pv = [s.pixel_values for s in samples if s.pixel_values is not None]
    if pv:
        batch["pixel_values"] = torch.cat(pv).to(device)
        batch["image_grid_thw"] = torch.cat([s.image_grid_thw for s in samples if s.image_grid_thw is not None]).to(device)
    return batch


def caption_hidden(model, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """The decoder's last hidden state at the positions that predict caption tokens, h (N, D), and
    those tokens, y (N,): padding and prompt positions never reach the vocabulary projection."""
    hidden = model.model(
        input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
        pixel_values=batch.get("pixel_values"), image_grid_thw=batch.get("image_grid_thw"),
        # the modality of each token: without it transformers falls back to 1-D positions
        mm_token_type_ids=mm_token_types(batch["input_ids"], model.model.config),
        use_cache=False,  # one full-sequence pass: a KV cache would only cost memory
    ).last_hidden_state  # (B, T, D)
    mask = batch["mask"]  # (B, T-1)
    return hidden[:, :-1][mask], batch["input_ids"][:, 1:][mask]  # (N, D), (N,)


@dataclass(frozen=True)
class ForwardPlan:
    """How samples go through the policy: packed or padded, and the micro-batch sizes."""
    packed: bool = True
    micro_batch: int = 8  # captions per micro-batch (packed: whole questions, up to this many captions)
    micro_batch_tokens: int = 0  # packed: tokens per micro-batch instead (0: count captions)
    cache_vision: bool = False  # the vision tower is frozen: its features once per step

    @classmethod
    def from_config(cls, cfg) -> "ForwardPlan":
        return cls(cfg.train.packed, cfg.train.micro_batch, cfg.train.micro_batch_tokens, cfg.model.freeze_vision)


def micro_batches(samples: list[Sample], plan: ForwardPlan) -> list[list[list[int]]]:
    """Each micro-batch as groups of sample indices (padded: one sample per group), as many on
    every rank: where a token budget gives this rank fewer than another, its own are cut further
    (`packed.split_batches`), so that sharded models run the same number of forwards everywhere."""
    if plan.packed:
        limit = 0 if plan.micro_batch_tokens else plan.micro_batch
        batches = token_budget_batches(samples, group_samples(samples), plan.micro_batch_tokens, limit)
    else:
        batches = [[[i] for i in range(start, min(start + plan.micro_batch, len(samples)))]
                   for start in range(0, len(samples), plan.micro_batch)]
    n = int(dist.all_reduce_max(len(batches)))
    fewest = int(dist.all_reduce_min(len(samples)))  # every rank raises, or none does
    if fewest < n:
        raise ValueError(f"a rank has {fewest} captions, fewer than the {n} micro-batches another rank's "
                         "token budget needs: give every rank as many captions")
    return split_batches(samples, batches, n)


def caption_batches(model, samples: list[Sample], pad_id: int, device, plan: ForwardPlan
                    ) -> Iterator[tuple[list[Sample], torch.Tensor, torch.Tensor]]:
    """(micro-batch, h (N, D), y (N,)) per micro-batch: the hidden states that predict its caption
    tokens and those tokens, sample by sample (the row-major order of `caption_mask`). As many
    micro-batches on every rank (`micro_batches`)."""
    for groups in micro_batches(samples, plan):
        if plan.packed:
            batch = pack(model, samples, groups, device, plan.cache_vision)
            h, y = packed_hidden(model, batch)
            yield [samples[i] for i in batch.order], h, y
        else:
            mb = [samples[i] for g in groups for i in g]
            yield (mb, *caption_hidden(model, collate(mb, pad_id, device)))


def computed_tokens(samples: list[Sample], plan: ForwardPlan) -> int:
    """Tokens the decoder computes for `samples`: packed, each question's prompt once and every
    caption; padded, every row's prompt and caption (padding not counted)."""
    if not plan.packed:
        return sum(len(s.input_ids) for s in samples)
    return sum(packed_tokens(samples, g) for g in group_samples(samples))


def caption_mask(mb: list[Sample], device) -> torch.Tensor:
    """(B, L) bool: sample b's caption tokens in its first len(caption) columns."""
    lengths = torch.tensor([len(s.input_ids) - s.prompt_len for s in mb])
    L = max(int(lengths.max()) if len(mb) else 0, 1)
    return (torch.arange(L)[None] < lengths[:, None]).to(device)


def caption_values(mb: list[Sample], attr: str, L: int, device) -> torch.Tensor | None:
    """(B, L) of a per-token attribute (old_logp, ref_logp, rollout_logp) at the caption tokens."""
    if getattr(mb[0], attr) is None:
        return None
    out = torch.zeros((len(mb), L), dtype=torch.float32)
    for b, s in enumerate(mb):
        v = getattr(s, attr)[s.prompt_len - 1:]
        out[b, :v.numel()] = v
    return out.to(device)


@torch.no_grad()
def fill_logprobs(backend, model, samples: list[Sample], attr: str, temperature: float, pad_id: int, device,
                  plan: ForwardPlan) -> None:
    """Store per-token log-probs of `model` on each sample (old policy or reference), in the layout
    of input_ids[1:] with zeros over the prompt."""
    was_training = model.training
    model.eval()
    for mb, h, y in caption_batches(model, samples, pad_id, device, plan):
        logp, _ = fused_linear_logprob(h, model.lm_head.weight, y, temperature, with_entropy=False)  # (N,)
        logp = logp.float().cpu()
        n = 0
        for s in mb:
            L = len(s.input_ids) - s.prompt_len
            setattr(s, attr, torch.cat([torch.zeros(s.prompt_len - 1), logp[n:n + L]]))
            n += L
    backend.reshard(model)
    model.train(was_training)
