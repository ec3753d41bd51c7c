"""GRPO training of a RACRO captioner against a frozen text-only reasoner.

    racro-fast train --config configs/qwen25vl_7b_r1_7b.yaml                  # one process
    torchrun --nproc_per_node 8 -m racro_fast.train --config configs/qwen25vl_7b_r1_7b.yaml
    ... train.lr=2e-6 run.output_dir=runs/x                                  # overrides
    racro-fast demo                                                          # the CPU demo (demo.py)

One step: questions -> weights pushed into the captioner engine -> G captions per question ->
k answers per caption (reasoner engine) -> reward = mean verified correctness -> group advantages
-> reference (and, with several updates per rollout, old) log-probs (`fused_linear_logprob`) ->
packed micro-batches, each question's prompt and images computed once (forward.py, packed.py),
through `fused_linear_grpo` (hidden states to loss, gradients in the same pass) -> clip ->
optimizer step. `train()` below names each phase.

Left out on purpose:
- No value model, no reward model: the reward is the reasoner's verified answer (RACRO).
- No KL in the reward and no entropy bonus by default (the paper's settings); both exist as
  loss terms (loss.kl_coef, loss.entropy_coef).
- No callbacks or hooks: edit this loop.
"""
from __future__ import annotations

import argparse
import copy
import json
import logging
import math
import os
import resource
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import torch

from racro_fast import checkpoint, dist, launch, parallel
from racro_fast.config import Config, ConfigError, changes_since, check_paths, check_world, load_config
from racro_fast.data import RowDataset, RowStream
from racro_fast.engines import (MM_LIMITS, Engine, GenOutput, GenRequest, HFEngine, SamplingConfig, VLLMEngine,
                                push_weights)
from racro_fast.forward import (ForwardPlan, Sample, caption_batches, caption_mask, caption_values, computed_tokens,
                                fill_logprobs)
from racro_fast.kernels import fused_linear_grpo, grpo_advantages
from racro_fast.metrics import (MetricsLog, MetricSums, Phases, collapse_signal, combine_updates, peak_tflops,
                                policy_flops, reduce_over_ranks)
from racro_fast.models import load_captioner, load_processors
from racro_fast.prompts import (CaptionerInputs, build_captioner_inputs, captioner_messages, clean_problem,
                                reasoner_messages, text_prompt_ids_batch)
from racro_fast.reasoner import ServerEngine, ServerLaunch, build_reasoner_engine
from racro_fast.reward_pool import RewardScorer
from racro_fast.rewards import caption_rewards, floor_short_captions

log = logging.getLogger("racro_fast.train")


def cut_at_vision_tokens(out, vision_ids: set[int], tokenizer) -> bool:
    """End a caption at its first vision placeholder token (an untrained captioner can sample one).

    A placeholder inside the response would be taken for an image slot in the training forward.
    The caption is cut there for training and for the reasoner alike; returns whether it was cut.
    """
    cut = next((i for i, tok in enumerate(out.token_ids) if tok in vision_ids), None)
    if cut is None:
        return False
    out.token_ids, out.logprobs = list(out.token_ids[:cut]), list(out.logprobs[:cut])
    out.text = tokenizer.decode(out.token_ids, skip_special_tokens=True)
    return True


# ----------------------------------------------------------------------------- update

def policy_update(backend, model, optimizer, samples: list[Sample], cfg: Config, pad_id: int, device,
                  plan: ForwardPlan, phases: Phases | None = None) -> dict:
    """One optimizer step over `samples` (one mini-batch), split into micro-batches.

    Token and sequence counts are the mini-batch's, summed over ranks, so the micro-batch losses add
    up to the loss of the whole global mini-batch. A non-finite loss or gradient norm skips the step.
    Metrics are reduced as `metrics.UPDATE_REDUCTIONS` says. `phases` collects the seconds of the
    policy's forward, loss (the fused op, gradients included) and backward.
    """
    phases = phases or Phases()
    n_tokens = float(sum(len(s.input_ids) - s.prompt_len for s in samples))
    n_seqs = float(sum(1 for s in samples if len(s.input_ids) > s.prompt_len))
    n_tokens, n_seqs = dist.all_reduce_sum([n_tokens, n_seqs])
    # gradients are averaged over ranks by the wrapper; the loss is a global sum, so undo the average
    scale = float(dist.world_size())
    sums = MetricSums()
    finite = True
    backend.zero_grad(model, optimizer)
    batches = iter(caption_batches(model, samples, pad_id, device, plan))
    done = 0
    while True:
        with phases("policy_forward"):
            item = next(batches, None)
        if item is None:
            break
        mb, h, y = item  # h (N, D), y (N,)
        done += len(mb)
        mask = caption_mask(mb, device)  # (B, L)
        per_token = {k: caption_values(mb, k, mask.shape[1], device) for k in ("old_logp", "ref_logp", "rollout_logp")}
        adv = torch.tensor([s.adv for s in mb], dtype=torch.float32, device=device)  # (B,)
        # the loss with dh and dW computed in this call: three GEMMs of the [N, D] x [D, V] size
        with phases("policy_loss"):
            loss, metrics = fused_linear_grpo(h, model.lm_head.weight, y, per_token["old_logp"], per_token["ref_logp"],
                                              adv, mask, cfg.loss, cfg.rollout.temperature, max(n_tokens, 1.0),
                                              max(n_seqs, 1.0), rollout_logp=per_token["rollout_logp"])
        # every rank must take the same branch, or one waits forever in the others' collectives
        if dist.all_reduce_sum([0.0 if torch.isfinite(loss) else 1.0])[0] > 0:
            finite = False
            break
        with phases("policy_backward"):
            backend.backward(model, loss * scale, last=done >= len(samples))
        sums.add({**metrics, "loss": loss.detach()}, float(metrics["num_tokens_local"]))
    out = sums.reduce()
    grad_norm = backend.clip_grad_norm(model, cfg.train.grad_clip) if finite else float("nan")
    out["grad_norm"] = float(grad_norm)
    if not (finite and math.isfinite(out["grad_norm"])):
        warnings.warn(f"non-finite {'loss' if not finite else 'gradient norm'}: optimizer step skipped")
        out["skipped"] = 1.0
    else:
        backend.step(model, optimizer)
        out["skipped"] = 0.0
    backend.zero_grad(model, optimizer)  # set to None: no gradient memory through the next rollouts
    return out


# ----------------------------------------------------------------------------- set-up

@dataclass
class Policy:
    """The trained captioner and what moves with it."""
    backend: parallel.Single  # Single, FSDP2 or DeepSpeed (parallel.py)
    model: torch.nn.Module
    ref: torch.nn.Module | None  # frozen reference for the KL term; None when loss.kl_coef == 0
    tokenizer: object
    image_processor: object
    plan: ForwardPlan  # how captions go through the policy (packed or padded, micro-batch sizes)
    optimizer: torch.optim.Optimizer | None = None
    scheduler: torch.optim.lr_scheduler.LRScheduler | None = None
    pad_id: int = field(init=False)
    vision_ids: set[int] = field(init=False)  # placeholders never allowed inside a caption (cut_at_vision_tokens)

    def __post_init__(self) -> None:
        # once: get_vocab() builds the whole vocabulary as a dict, too slow for every caption
        tok = self.tokenizer
        self.pad_id = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
        vocab = tok.get_vocab()
        self.vision_ids = {vocab[t] for t in ("<|image_pad|>", "<|video_pad|>", "<|vision_start|>", "<|vision_end|>")
                           if t in vocab}


@dataclass
class Engines:
    captioner: Engine
    reasoner: Engine
    reasoner_tokenizer: object
    scorer: RewardScorer

    def close(self) -> None:
        """Stop the reward workers and the reasoner server this process started."""
        self.scorer.close()
        for engine in (self.reasoner, self.captioner):
            engine.close()


def build_policy(cfg: Config, device: torch.device) -> Policy:
    """The captioner to train (wrapped by the backend) and its frozen reference."""
    tokenizer, image_processor = load_processors(cfg.model.captioner, cfg.model.min_pixels, cfg.model.max_pixels)
    backend = parallel.make_backend(cfg)
    model = load_captioner(cfg.model.captioner, getattr(torch, cfg.model.dtype), attn_impl=cfg.model.attn_impl,
                           liger=cfg.model.liger and device.type == "cuda")
    if cfg.model.freeze_vision:
        model.model.visual.requires_grad_(False)
    ref = None
    if cfg.loss.kl_coef > 0:
        ref = backend.wrap_frozen(copy.deepcopy(model).eval().requires_grad_(False), device)
    if cfg.model.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model = backend.wrap(model, device)
    model.train()
    return Policy(backend, model, ref, tokenizer, image_processor, ForwardPlan.from_config(cfg))


def build_optimizer(cfg: Config, policy: Policy, device: torch.device) -> None:
    """AdamW (fused on GPU) and the LR schedule; DeepSpeed builds its engine around them here."""
    optimizer = torch.optim.AdamW(
        [p for p in policy.model.parameters() if p.requires_grad], lr=cfg.train.lr,
        betas=(cfg.train.adam_beta1, cfg.train.adam_beta2), weight_decay=cfg.train.weight_decay,
        fused=device.type == "cuda")
    policy.model, policy.optimizer = policy.backend.attach_optimizer(policy.model, optimizer)

    def lr_lambda(step: int) -> float:
        if step < cfg.train.warmup_steps:
            return (step + 1) / cfg.train.warmup_steps
        if cfg.train.lr_schedule == "cosine":
            t = (step - cfg.train.warmup_steps) / max(1, cfg.train.steps - cfg.train.warmup_steps)
            return 0.5 * (1 + math.cos(math.pi * min(t, 1.0)))
        return 1.0

    policy.scheduler = torch.optim.lr_scheduler.LambdaLR(policy.optimizer, lr_lambda)


def build_data(cfg: Config, out_dir: Path) -> tuple[RowDataset, RowStream]:
    """Training rows (files, or synthetic rows written once) and this rank's seeded order over them."""
    files = cfg.data.train_files
    if cfg.data.synth_task:
        from racro_fast.synth import write_synth
        path = out_dir / "data" / f"synth_{cfg.data.synth_task}_{cfg.data.synth_rows}_{cfg.data.image_size}.parquet"
        if dist.rank() == 0 and not path.exists():
            write_synth(str(path), cfg.data.synth_rows, cfg.data.synth_task, cfg.train.seed, cfg.data.image_size)
        dist.barrier()
        files = [str(path)]
    dataset = RowDataset(files, fmt=cfg.data.format, min_pixels=cfg.model.min_pixels, max_pixels=cfg.model.max_pixels)
    if len(dataset) < dist.world_size():
        raise ConfigError(f"data.train_files: {len(dataset)} rows in {files}, fewer than the {dist.world_size()} ranks")
    return dataset, RowStream(len(dataset), cfg.train.seed, cfg.data.shuffle, dist.rank(), dist.world_size())


def build_reasoner(cfg: Config, device: torch.device, out_dir: Path, plan: dict | None) -> tuple[Engine, object]:
    """The frozen reasoner and its tokenizer: vLLM's server (one per node, started by local rank 0; the
    other ranks wait for it), rollout.reasoner_url, or HF generate in this process. Each rank keeps
    at most its share of what the node's server holds in flight (`plan`, the memory plan on a GPU)."""
    r = cfg.rollout
    launch = ServerLaunch(port=r.reasoner_port, dtype=cfg.model.dtype, max_model_len=r.max_model_len,
                          gpu_memory_utilization=r.reasoner_gpu_fraction, tensor_parallel_size=r.reasoner_tp,
                          data_parallel_size=r.reasoner_dp, seed=cfg.train.seed,
                          start_timeout=r.reasoner_start_timeout, timeout=r.reasoner_timeout, log_dir=out_dir)
    inflight = parallel.inflight_per_rank(cfg, plan["reasoner_sequences"] if plan else 0, dist.local_world_size())
    return build_reasoner_engine(cfg.model.reasoner, r.reasoner_engine, url=r.reasoner_url,
                                 dtype=getattr(torch, cfg.model.dtype), device=device, batch_size=inflight,
                                 timeout=r.reasoner_timeout, seed=cfg.train.seed, launch=launch)


def build_engines(cfg: Config, policy: Policy, device: torch.device, out_dir: Path) -> Engines:
    """Reasoner, captioner engine and the reward scorer.

    HF: the captioner engine shares the policy's module (nothing to push). vLLM: the captioner is
    the process's one sleep-mode engine, slept at level 2 between rollouts; the reasoner is a
    server process of its own (vLLM allows one sleep-mode engine per process). On a GPU the memory
    plan is checked first, and before each engine starts every rank returns its cached blocks to
    the device and waits for the others: vLLM refuses to start when the device's free memory is
    below its share, and another process's cache counts as used.
    """
    plan = parallel.check_memory(policy.backend, policy.model, cfg, device) if cfg.rollout.engine == "vllm" else None
    parallel.free_cached_memory()
    dist.barrier()
    reasoner, rtok = build_reasoner(cfg, device, out_dir, plan)
    scorer = RewardScorer(cfg.rollout.reward, timeout=cfg.rollout.reward_timeout, workers=cfg.rollout.reward_workers)
    if cfg.rollout.engine == "hf":
        captioner = HFEngine(policy.backend.module(policy.model), policy.tokenizer, batch_size=cfg.rollout.hf_batch)
        return Engines(captioner, reasoner, rtok, scorer)
    launcher = "external_launcher" if dist.is_dist() else None
    mm = {"min_pixels": cfg.model.min_pixels, "max_pixels": cfg.model.max_pixels}  # the trainer's image grids
    parallel.free_cached_memory()
    dist.barrier()
    captioner = VLLMEngine(cfg.model.captioner, name="captioner", dtype=cfg.model.dtype,
                           gpu_memory_utilization=cfg.rollout.captioner_gpu_fraction,
                           max_model_len=cfg.rollout.max_model_len, seed=cfg.train.seed,
                           distributed_executor_backend=launcher, limit_mm_per_prompt=MM_LIMITS,
                           mm_processor_kwargs=mm, enforce_eager=False)
    captioner.sleep(level=2)  # every rollout starts by waking the weights and pushing the trainer's
    return Engines(captioner, reasoner, rtok, scorer)


def resume(cfg: Config, out_dir: Path, policy: Policy, stream: RowStream) -> tuple[int, RowStream]:
    """Restore the newest complete checkpoint (run.resume); returns the step to start from and this
    rank's data stream. On the world size that wrote it, each rank's own stream and RNG; on another,
    the stream from the same global position and the RNG re-derived (checkpoint.py's docstring)."""
    ckpt = checkpoint.find(out_dir, cfg.run.resume)
    if ckpt is None:
        return 0, stream
    state = checkpoint.load(ckpt, policy.backend, policy.model, policy.optimizer, policy.scheduler)
    streams, step = state["data"]["stream"], state["step"]
    changed = changes_since(state["config"], cfg) if "config" in state else []
    if changed and dist.rank() == 0:  # the run goes on, but it is no longer the run that was checkpointed
        log.warning("resuming %s with a config that differs from the one that wrote it: %s", ckpt, "; ".join(changed))
    if state["world"] == dist.world_size():
        stream.load(streams[dist.rank()])
    else:
        stream = RowStream.resharded(streams, stream.n, stream.seed, stream.shuffle, dist.rank(), dist.world_size())
        checkpoint.seed_everything((cfg.train.seed * 1_000_003 + step) * dist.world_size() + dist.rank())
        log.info("checkpoint written by %d ranks resumed on %d: data from the same position, RNG re-derived",
                 state["world"], dist.world_size())
    log.info("resumed from %s at step %d", ckpt, step)
    return step, stream


# ----------------------------------------------------------------------------- one step

def next_questions(cfg: Config, dataset: RowDataset, stream: RowStream, policy: Policy, n: int):
    """This rank's n questions of the step, skipping (and counting) rows that cannot be used."""
    rows, inputs = [], []
    while len(rows) < n:
        row = dataset[stream.next()]
        if row is None:
            continue
        cap = build_captioner_inputs(policy.tokenizer, policy.image_processor,
                                     captioner_messages(row.problem, len(row.images)), row.images)
        if len(cap.prompt_ids) > cfg.data.max_prompt_len:
            dataset.skip("too_long")
            continue
        if len(row.images) > MM_LIMITS["image"]:  # the engine would reject the request
            dataset.skip("too_many_images")
            continue
        rows.append(row)
        inputs.append(cap)
    return rows, inputs


def rollout_seed(cfg: Config, step: int, span: int) -> int:
    """The first sampling seed of this rank's step; its requests use [seed, seed + span).

    Spans of different ranks and steps never overlap (vLLM seeds request i's k-th sample with
    seed + i * n + k), so no two captions or answers of a run share a seed."""
    return ((cfg.train.seed * 1_000_003 + step) * dist.world_size() + dist.rank()) * span % (1 << 62)


def sync_weights(cfg: Config, policy: Policy, engines: Engines, gauges: dict) -> None:
    """The trainer's weights into the captioner engine, asleep at level 2 since its last rollout:
    wake the weights' memory, push in buckets (gathered from the shards), reset the prefix,
    encoder and multimodal caches (inside the push)."""
    if isinstance(engines.captioner, VLLMEngine):
        parallel.free_cached_memory()
        engines.captioner.wake_up(tags=["weights"])
    t = time.perf_counter()
    pushed = push_weights(engines.captioner, policy.backend.full_state_items(policy.model, cfg.dist.weight_bucket_mb),
                          cfg.dist.weight_bucket_mb)
    gauges["push_bytes"], gauges["push_s"] = float(pushed.bytes), time.perf_counter() - t
    parallel.memory_gauge("captioner_weights", gauges)


@dataclass
class Rollout:
    """One step's rollouts on this rank; Q questions, G captions each, k answers per caption."""
    captions: list[list[GenOutput]]  # [Q][G]
    answers: list[list[GenOutput]]  # [Q*G][k]
    correct: list[float]  # (Q*G*k,) verified correctness of each answer
    rewards: torch.Tensor  # (Q*G,) mean correctness over a caption's k answers
    adv: torch.Tensor  # (Q*G,) group-normalised advantages
    n_cut: int  # captions cut at a sampled vision token


def rollout(cfg: Config, step: int, rows, inputs: list[CaptionerInputs], engines: Engines, policy: Policy,
            phases: Phases, gauges: dict) -> Rollout:
    """Captions, answers and rewards of the step's questions on this rank. A phase that raises on
    one rank raises on every rank (`dist.fail_together`), within seconds: no rank is left in the next
    collective. (A phase whose engine runs collectives itself, HF generate on a sharded captioner,
    can only end a rank that never joined them through dist.timeout_s.)"""
    G, k = cfg.rollout.group_size, cfg.rollout.reasoner_samples
    Q = len(rows)
    seed = rollout_seed(cfg, step, span=Q * G * (1 + k))
    with phases("caption"):
        captions, n_cut = dist.fail_together("the caption phase", caption, cfg, rows, inputs, engines, policy, seed)
        parallel.memory_gauge("captioner_sleep", gauges)
    with phases("reason"):
        questions = [clean_problem(r.problem) for r in rows]
        r_requests = [GenRequest(prompt_ids=ids) for ids in text_prompt_ids_batch(
            engines.reasoner_tokenizer, [reasoner_messages(c.text, questions[q]) for q in range(Q) for c in captions[q]])]
        answers = reason(engines.reasoner, r_requests, SamplingConfig(
            n=k, temperature=cfg.rollout.reasoner_temperature, top_p=cfg.rollout.reasoner_top_p,
            max_tokens=cfg.rollout.max_reasoner_tokens, seed=seed + Q * G, logprobs=False))  # [Q*G][k]
    with phases("reward"):
        correct = dist.fail_together("the reward phase", engines.scorer.score, [a.text for outs in answers for a in outs],
                                     [rows[i // (G * k)].answer for i in range(Q * G * k)])
        rewards = floor_short_captions(caption_rewards(correct, k), [len(c.token_ids) for qs in captions for c in qs],
                                       cfg.train.min_caption_tokens)
        rewards = torch.tensor(rewards, dtype=torch.float32)  # (Q*G,)
        adv = grpo_advantages(rewards, G, scale_by_std=cfg.train.scale_adv_by_std)  # (Q*G,)
    return Rollout(captions, answers, correct, rewards, adv, n_cut)


def caption(cfg: Config, rows, inputs: list[CaptionerInputs], engines: Engines, policy: Policy,
            seed: int) -> tuple[list[list[GenOutput]], int]:
    """G captions per question ([Q][G]) from the captioner engine, woken for them and slept after;
    and how many were cut at a sampled vision token."""
    if isinstance(engines.captioner, VLLMEngine):
        engines.captioner.wake_up(tags=["kv_cache"])
    requests = [GenRequest(prompt_ids=c.prompt_ids, pixel_values=c.pixel_values, image_grid_thw=c.image_grid_thw,
                           images=r.images, vllm_prompt_ids=c.vllm_prompt_ids) for r, c in zip(rows, inputs)]
    captions = engines.captioner.generate(requests, SamplingConfig(
        n=cfg.rollout.group_size, temperature=cfg.rollout.temperature, top_p=cfg.rollout.top_p,
        max_tokens=cfg.rollout.max_caption_tokens, seed=seed))  # [Q][G]
    if isinstance(engines.captioner, VLLMEngine):
        engines.captioner.sleep(level=2)
    n_cut = sum(cut_at_vision_tokens(c, policy.vision_ids, policy.tokenizer) for qs in captions for c in qs)
    return captions, n_cut


def reason(engine: Engine, requests: list[GenRequest], sampling: SamplingConfig) -> list[list[GenOutput]]:
    """The reasoner's phase: its server woken (once per node), every rank's requests within the
    phase's deadline (rollout.reasoner_timeout), slept again. Waking and sleeping return on every
    rank once the server has done it; a failure on any rank (a dead, silent or erring server) fails
    the step on every rank."""
    if isinstance(engine, ServerEngine):
        parallel.free_cached_memory()  # the server's wake-up needs the blocks this rank keeps cached
    engine.wake_up()
    answers = dist.fail_together("the reasoner phase", engine.generate, requests, sampling)
    engine.sleep(level=1)
    return answers


def make_samples(cfg: Config, policy: Policy, inputs: list[CaptionerInputs], ro: Rollout, device: torch.device,
                 updates_per_step: int) -> list[Sample]:
    """One training sample per caption, with reference (and, for several updates, old) log-probs."""
    G = cfg.rollout.group_size
    samples = [Sample(cap.prompt_ids + list(c.token_ids), len(cap.prompt_ids), cap.pixel_values, cap.image_grid_thw,
                      float(ro.adv[q * G + g]), rollout_logp=None if cfg.loss.is_mode == "off"
                      else torch.cat([torch.zeros(len(cap.prompt_ids) - 1), torch.tensor(c.logprobs)]))
               for q, cap in enumerate(inputs) for g, c in enumerate(ro.captions[q])]
    # the importance weights compare the trainer's log-probs before the update with the engine's
    if updates_per_step > 1 or cfg.loss.is_mode != "off":
        fill_logprobs(policy.backend, policy.model, samples, "old_logp", cfg.rollout.temperature, policy.pad_id,
                      device, policy.plan)
    if policy.ref is not None:
        fill_logprobs(policy.backend, policy.ref, samples, "ref_logp", cfg.rollout.temperature, policy.pad_id,
                      device, policy.plan)
    return samples


def update(cfg: Config, policy: Policy, samples: list[Sample], device: torch.device, updates_per_step: int,
           phases: Phases) -> dict:
    """The step's optimizer updates, each over a mini-batch of whole groups; metrics over them all
    (`metrics.combine_updates`). This rank's policy throughput: caption tokens per second of forward
    + loss + backward, and on a GPU the MFU of that time (`metrics.policy_flops`: a lower bound)."""
    per_update = len(samples) // updates_per_step
    results = [policy_update(policy.backend, policy.model, policy.optimizer,
                             samples[u * per_update:(u + 1) * per_update], cfg, policy.pad_id, device, policy.plan,
                             phases)
               for u in range(updates_per_step)]
    policy.scheduler.step()
    out = combine_updates(results)
    policy_s = phases.policy_seconds()
    captions = float(sum(len(s.input_ids) - s.prompt_len for s in samples))
    if policy_s > 0:
        out["policy_tokens_per_s"] = captions / policy_s
        peak = peak_tflops(torch.cuda.get_device_name(device)) if device.type == "cuda" else None
        if peak:
            flops = policy_flops(policy.model.model.config.text_config, computed_tokens(samples, policy.plan), captions)
            out["policy_mfu"] = flops / policy_s / (peak * 1e12)
    return out


@dataclass
class StepRecord:
    """What one step produced, for its metrics line."""
    step: int  # 0-based
    t0: float  # perf_counter at the step's start
    phases: Phases
    gauges: dict  # memory gauges (parallel.memory_gauge)
    rollout: Rollout | None = None
    update: dict = field(default_factory=dict)


def log_step(rec: StepRecord, policy: Policy, dataset: RowDataset, scorer: RewardScorer, device: torch.device) -> dict:
    """The step's metrics, reduced over ranks."""
    ro = rec.rollout
    G = len(ro.captions[0])
    cap_lens = [len(c.token_ids) for qs in ro.captions for c in qs]
    rsn_lens = [len(a.token_ids) for outs in ro.answers for a in outs]
    group_std = ro.rewards.view(-1, G).std(dim=1, unbiased=False)
    local = {
        "reward_sum": float(ro.rewards.sum()), "reward_sq": float((ro.rewards ** 2).sum()),
        "n_captions": float(len(ro.rewards)), "correct_sum": float(sum(ro.correct)), "n_answers": float(len(ro.correct)),
        "zero_var_groups": float((group_std == 0).sum()), "n_groups": float(len(group_std)),
        "cap_len_sum": float(sum(cap_lens)), "cap_truncated": float(sum(c.truncated for qs in ro.captions for c in qs)),
        "rsn_len_sum": float(sum(rsn_lens)), "cap_cut": float(ro.n_cut), "tokens": float(sum(cap_lens) + sum(rsn_lens)),
        "cap_max": float(max(cap_lens)),
    }
    red = reduce_over_ranks(local, {k: "max" if k == "cap_max" else "sum" for k in local})
    step_s = time.perf_counter() - rec.t0
    mean_r = red["reward_sum"] / red["n_captions"]
    peak = (torch.cuda.max_memory_allocated() if device.type == "cuda"
            else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)
    return {
        "step": rec.step + 1,
        "reward_mean": mean_r,
        "reward_std": math.sqrt(max(red["reward_sq"] / red["n_captions"] - mean_r ** 2, 0.0)),
        "accuracy": red["correct_sum"] / red["n_answers"],
        "zero_var_group_frac": red["zero_var_groups"] / red["n_groups"],
        "caption_len_mean": red["cap_len_sum"] / red["n_captions"], "caption_len_max": red["cap_max"],
        "caption_truncated_frac": red["cap_truncated"] / red["n_captions"],
        "caption_vision_token_cut": red["cap_cut"],
        "reasoner_len_mean": red["rsn_len_sum"] / red["n_answers"],
        "tokens_per_s": red["tokens"] / step_s, "step_s": step_s, "lr": policy.scheduler.get_last_lr()[0],
        **rec.update, **rec.phases.seconds, **rec.gauges,
        "reward_errors": scorer.n_error, "reward_timeouts": scorer.n_timeout,
        "rows_skipped": sum(dataset.skipped.values()), "peak_mem_gb": peak / 2 ** 30,
    }


def save(cfg: Config, out_dir: Path, step: int, policy: Policy, stream: RowStream) -> None:
    """A checkpoint every run.save_every steps and at the last step."""
    if (cfg.run.save_every and (step + 1) % cfg.run.save_every == 0) or step + 1 == cfg.train.steps:
        checkpoint.save(out_dir, step + 1, policy.backend, policy.model, policy.optimizer, policy.scheduler,
                        {"data": {"stream": dist.all_gather_object(stream.state())},
                         "config": cfg.to_plain()}, cfg.run.keep_checkpoints)


def finish(cfg: Config, out_dir: Path, policy: Policy, dataset: RowDataset, engines: Engines) -> None:
    """Reward curve, skipped-row counts and the exported captioner."""
    if dataset.skipped:
        log.warning("rows skipped: %s", dict(dataset.skipped))
    if dist.rank() == 0:
        from racro_fast.plots import reward_curve
        rows = [json.loads(line) for line in (out_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
        by_step = {r["step"]: r["reward_mean"] for r in rows}  # one row a step: a resume drops what it reruns
        reward_curve(out_dir / "reward_curve.png", sorted(by_step), [by_step[s] for s in sorted(by_step)])
    if cfg.run.export:
        checkpoint.export(policy.backend, policy.model, policy.tokenizer, policy.image_processor, out_dir / "export")


# ----------------------------------------------------------------------------- the loop

def train(cfg: Config) -> dict:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    check_world(cfg, dist.world_size())
    check_paths(cfg)
    if "LOCAL_RANK" in os.environ:
        launch.die_with_parent()  # a killed torchrun (its elastic agent) takes its ranks with it
    dist.init(cfg.dist.timeout_s)
    device = dist.device(cfg.run.device)
    if device.type == "cpu" and cfg.run.malloc_keep_freed:
        parallel.keep_freed_host_memory()
    checkpoint.seed_everything(cfg.train.seed + dist.rank())
    out_dir = Path(cfg.run.output_dir)
    with checkpoint.lock_output_dir(out_dir):  # one run per folder, for the run's life
        if dist.rank() == 0:
            (out_dir / "config.json").write_text(json.dumps(cfg.to_dict(), indent=2))
        dataset, stream = build_data(cfg, out_dir)
        policy = build_policy(cfg, device)
        build_optimizer(cfg, policy, device)
        engines = build_engines(cfg, policy, device, out_dir)
        try:  # the reasoner server and reward workers stop on every exit: normal, error or Ctrl-C
            start_step, stream = resume(cfg, out_dir, policy, stream)
            q_local = cfg.train.questions_per_step // dist.world_size()
            updates_per_step = cfg.train.questions_per_step // cfg.train.mini_batch
            metrics, history = MetricsLog(cfg, out_dir, start_step), []
            for step in range(start_step, cfg.train.steps):
                rec = StepRecord(step, time.perf_counter(), Phases(), {})
                phases, gauges = rec.phases, rec.gauges
                if device.type == "cuda":
                    torch.cuda.reset_peak_memory_stats()
                rows, inputs = next_questions(cfg, dataset, stream, policy, q_local)
                moved = policy.backend.offload_optimizer(policy.optimizer, device)
                with phases("sync"):
                    sync_weights(cfg, policy, engines, gauges)
                rec.rollout = ro = rollout(cfg, step, rows, inputs, engines, policy, phases, gauges)
                parallel.reload_optimizer(moved)
                with phases("logprob"):
                    samples = make_samples(cfg, policy, inputs, ro, device, updates_per_step)
                with phases("train"):
                    rec.update = update(cfg, policy, samples, device, updates_per_step, phases)
                parallel.memory_gauge("step", gauges)
                m = log_step(rec, policy, dataset, engines.scorer, device)
                why = collapse_signal(history + [m])
                if why and not (history and history[-1]["collapse"]):
                    log.warning("step %d: the policy looks like it is collapsing: %s", step + 1, why)
                m["collapse"] = float(bool(why))
                history.append(m)
                metrics.write(m)
                save(cfg, out_dir, step, policy, stream)
            metrics.close()
            parallel.release_host_memory()
            finish(cfg, out_dir, policy, dataset, engines)
        finally:
            engines.close()
    return {"history": history, "out_dir": str(out_dir), "skipped": dict(dataset.skipped)}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="racro-fast train", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", help="YAML run config (configs/*.yaml)")
    p.add_argument("overrides", nargs="*", help="section.field=value")
    args = p.parse_args(argv)
    train(load_config(args.config, args.overrides))
    return 0


if __name__ == "__main__":
    from racro_fast.config import run_main
    raise SystemExit(run_main(main))
