"""The policy forward over training samples: one sample per caption, right-padded micro-batches,
the decoder to its last hidden state, and only the caption positions through the vocabulary
projection (the [tokens, vocab] logits are never built): `kernels.fused_linear_grpo` in the update,
`kernels.fused_linear_logprob` in the no-grad passes.

    batch = collate(samples, pad_id, device)                         # input_ids (B, T), mask (B, T-1)
    h, y = caption_hidden(model, batch)                              # (N, D), (N,)
    logp, ent = sequence_logprobs(model, batch, temperature, True)   # (B, T-1) each
    fill_logprobs(backend, ref, samples, "ref_logp", 8, 1.0, pad_id, device)   # no-grad passes
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from racro_fast.kernels import fused_linear_logprob


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


def pad_per_token(values: list[torch.Tensor], T1: int, device: torch.device) -> torch.Tensor:
    out = torch.zeros((len(values), T1), dtype=torch.float32)  # (B, T-1)
    for b, v in enumerate(values):
        out[b, :v.numel()] = v
    return out.to(device)


def caption_hidden(model, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """The decoder's last hidden state at the positions that predict caption tokens, h (N, D), and
    those tokens, y (N,): padding and prompt positions never reach the vocabulary projection."""
    hidden = model.model(
        input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
        pixel_values=batch.get("pixel_values"), image_grid_thw=batch.get("image_grid_thw"),
        use_cache=False,  # one full-sequence pass: a KV cache would only cost memory
    ).last_hidden_state  # (B, T, D)
    mask = batch["mask"]  # (B, T-1)
    return hidden[:, :-1][mask], batch["input_ids"][:, 1:][mask]  # (N, D), (N,)


def sequence_logprobs(model, batch: dict, temperature: float, with_entropy: bool):
    """Log-probs (and entropy) of every caption token, (B, T-1) each, zero off the mask, through the
    fused projection + log-softmax (no [tokens, vocab] logits)."""
    h, y = caption_hidden(model, batch)
    mask = batch["mask"]
    logp_n, ent_n = fused_linear_logprob(h, model.lm_head.weight, y, temperature, with_entropy=with_entropy)
    logp = torch.zeros(mask.shape, dtype=torch.float32, device=mask.device).masked_scatter(mask, logp_n)
    ent = None
    if ent_n is not None:
        ent = torch.zeros(mask.shape, dtype=torch.float32, device=mask.device).masked_scatter(mask, ent_n)
    return logp, ent


@torch.no_grad()
def fill_logprobs(backend, model, samples: list[Sample], attr: str, micro_batch: int, temperature: float,
                  pad_id: int, device) -> None:
    """Store per-token log-probs of `model` on each sample (old policy or reference)."""
    was_training = model.training
    model.eval()
    for i in range(0, len(samples), micro_batch):
        mb = samples[i:i + micro_batch]
        batch = collate(mb, pad_id, device)
        logp, _ = sequence_logprobs(model, batch, temperature, with_entropy=False)
        for b, s in enumerate(mb):
            setattr(s, attr, logp[b, :len(s.input_ids) - 1].float().cpu())
    backend.reshard(model)
    model.train(was_training)
