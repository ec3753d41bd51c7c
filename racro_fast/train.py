"""GRPO training of a RACRO captioner against a frozen text-only reasoner.

    python -m racro_fast.train --config configs/demo_cpu.yaml                 # one process (CPU demo)
    torchrun --nproc_per_node 8 -m racro_fast.train --config configs/qwen25vl_7b_r1_7b.yaml
    ... train.lr=2e-6 run.output_dir=runs/x                                  # overrides

One step: G captions per question (captioner engine) -> k answers per caption (reasoner engine)
-> reward = mean verified correctness -> group advantages -> reference (and, with several updates
per rollout, old) log-probs -> micro-batches through `fused_linear_logprob` and `grpo_loss` ->
clip -> optimizer step -> new weights pushed into the captioner engine.

Left out on purpose:
- No value model, no reward model: the reward is the reasoner's verified answer (RACRO).
- No KL in the reward and no entropy bonus by default (the paper's settings); both exist as
  loss terms (train.kl_coef, train.entropy_coef).
- No sequence packing across prompts for the captioner forward: Qwen2.5-VL's 3-D rotary positions
  are computed per padded row; padding is removed before the vocabulary projection, which is where
  the memory goes (the [tokens, vocab] logits are never built).
- No callbacks or hooks: edit this loop.
"""
from __future__ import annotations

import argparse
import copy
import json
import logging
import math
import random
import resource
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from racro_fast import dist
from racro_fast.config import Config, load_config
from racro_fast.data import RowDataset
from racro_fast.engines import GenRequest, HFEngine, SamplingConfig, VLLMEngine
from racro_fast.kernels import GRPOLossConfig, fused_linear_logprob, grpo_advantages, grpo_loss
from racro_fast.prompts import (build_captioner_inputs, captioner_messages, clean_problem, reasoner_messages,
                                text_prompt_ids)
from racro_fast.rewards import RewardScorer, caption_rewards

log = logging.getLogger("racro_fast.train")


# ----------------------------------------------------------------------------- rollouts

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


def sequence_logprobs(model, batch: dict, temperature: float, with_entropy: bool):
    """Log-probs (and entropy) of every caption token, (B, T-1) each, zero off the mask.

    Runs the decoder to its last hidden state, drops padding and prompt positions, and sends only
    the caption positions through the fused projection + log-softmax (no [tokens, vocab] logits).
    """
    hidden = model.model(
        input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
        pixel_values=batch.get("pixel_values"), image_grid_thw=batch.get("image_grid_thw"),
    ).last_hidden_state  # (B, T, D)
    mask = batch["mask"]  # (B, T-1)
    h = hidden[:, :-1][mask]  # (N, D)
    y = batch["input_ids"][:, 1:][mask]  # (N,)
    logp_n, ent_n = fused_linear_logprob(h, model.lm_head.weight, y, temperature, with_entropy=with_entropy)
    logp = torch.zeros(mask.shape, dtype=torch.float32, device=mask.device).masked_scatter(mask, logp_n)
    ent = None
    if ent_n is not None:
        ent = torch.zeros(mask.shape, dtype=torch.float32, device=mask.device).masked_scatter(mask, ent_n)
    return logp, ent


@torch.no_grad()
def fill_logprobs(model, samples: list[Sample], attr: str, cfg: Config, pad_id: int, device) -> None:
    """Store per-token log-probs of `model` on each sample (old policy or reference)."""
    was_training = model.training
    model.eval()
    for i in range(0, len(samples), cfg.train.micro_batch):
        mb = samples[i:i + cfg.train.micro_batch]
        batch = collate(mb, pad_id, device)
        logp, _ = sequence_logprobs(model, batch, cfg.rollout.temperature, with_entropy=False)
        for b, s in enumerate(mb):
            setattr(s, attr, logp[b, :len(s.input_ids) - 1].float().cpu())
    model.train(was_training)


# ----------------------------------------------------------------------------- update

def policy_update(model, optimizer, samples: list[Sample], cfg: Config, loss_cfg: GRPOLossConfig,
                  pad_id: int, device) -> dict:
    """One optimizer step over `samples` (one mini-batch), split into micro-batches.

    Token and sequence counts are the mini-batch's, summed over ranks, so the micro-batch losses add
    up to the loss of the whole global mini-batch. A non-finite loss or gradient norm skips the step.
    """
    n_tokens = float(sum(len(s.input_ids) - s.prompt_len for s in samples))
    n_seqs = float(sum(1 for s in samples if len(s.input_ids) > s.prompt_len))
    n_tokens, n_seqs = dist.all_reduce_sum([n_tokens, n_seqs])
    # gradients are averaged over ranks by the wrapper; the loss is a global sum, so undo the average
    scale = float(dist.world_size())
    sums: dict[str, float] = {}
    weight = 0.0
    finite = True
    dist.zero_grad(model, optimizer)
    for i in range(0, len(samples), cfg.train.micro_batch):
        mb = samples[i:i + cfg.train.micro_batch]
        batch = collate(mb, pad_id, device)
        T1 = batch["mask"].shape[1]
        logp, ent = sequence_logprobs(model, batch, cfg.rollout.temperature, with_entropy=True)
        old = pad_per_token([s.old_logp for s in mb], T1, device) if mb[0].old_logp is not None else None
        ref = pad_per_token([s.ref_logp for s in mb], T1, device) if mb[0].ref_logp is not None else None
        adv = torch.tensor([s.adv for s in mb], dtype=torch.float32, device=device)
        loss, metrics = grpo_loss(logp, old, ref, adv, batch["mask"], loss_cfg, entropy=ent,
                                  num_tokens=max(n_tokens, 1.0), num_seqs=max(n_seqs, 1.0))
        # every rank must take the same branch, or one waits forever in the others' collectives
        if dist.all_reduce_sum([0.0 if torch.isfinite(loss) else 1.0])[0] > 0:
            finite = False
            break
        dist.backward(model, loss * scale, last=i + cfg.train.micro_batch >= len(samples))
        w = float(metrics["num_tokens_local"])
        weight += w
        sums["loss"] = sums.get("loss", 0.0) + float(loss.detach())
        for k in ("clip_frac", "kl_mean", "ratio_mean", "entropy_mean", "pg_loss"):
            if k in metrics:
                sums[k] = sums.get(k, 0.0) + float(metrics[k]) * (w if k != "pg_loss" else 1.0)
        sums["ratio_min"] = min(sums.get("ratio_min", math.inf), float(metrics["ratio_min"]))
        sums["ratio_max"] = max(sums.get("ratio_max", -math.inf), float(metrics["ratio_max"]))
    # token-weighted means over all ranks; the loss is already a share of the global loss, so it sums
    keys = [k for k in sums if k not in ("ratio_min", "ratio_max")]
    reduced = dict(zip(keys + ["_weight"], dist.all_reduce_sum([sums[k] for k in keys] + [weight])))
    weight = reduced.pop("_weight")
    out = {k: v / weight if k in ("clip_frac", "kl_mean", "ratio_mean", "entropy_mean") and weight else v
           for k, v in reduced.items()}
    if "ratio_max" in sums:
        out["ratio_max"] = dist.all_reduce_max(sums["ratio_max"])
        out["ratio_min"] = -dist.all_reduce_max(-sums["ratio_min"])
    grad_norm = dist.clip_grad_norm(model, cfg.train.grad_clip) if finite else float("nan")
    out["grad_norm"] = float(grad_norm)
    if not (finite and math.isfinite(out["grad_norm"])):
        dist.zero_grad(model, optimizer)
        warnings.warn(f"non-finite {'loss' if not finite else 'gradient norm'}: optimizer step skipped")
        out["skipped"] = 1.0
        return out
    dist.step(model, optimizer)
    out["skipped"] = 0.0
    return out


# ----------------------------------------------------------------------------- data order

class RowStream:
    """Endless, seeded, resumable order over the dataset's rows: (epoch, index) is its whole state."""

    def __init__(self, n: int, seed: int, shuffle: bool, shard: int = 0, num_shards: int = 1):
        self.n, self.seed, self.shuffle = n, seed, shuffle
        self.shard, self.num_shards = shard, num_shards
        self.epoch, self.index = 0, 0
        self._order = self._make_order()

    def _make_order(self) -> list[int]:
        order = list(range(self.n))
        if self.shuffle:
            random.Random(self.seed * 1000 + self.epoch).shuffle(order)
        return order[self.shard::self.num_shards]

    def next(self) -> int:
        if self.index >= len(self._order):
            self.epoch, self.index = self.epoch + 1, 0
            self._order = self._make_order()
        i = self._order[self.index]
        self.index += 1
        return i

    def state(self) -> dict:
        return {"epoch": self.epoch, "index": self.index}

    def load(self, state: dict) -> None:
        self.epoch, self.index = state["epoch"], state["index"]
        self._order = self._make_order()


# ----------------------------------------------------------------------------- the loop

def resolve_models(cfg: Config) -> tuple[str, str]:
    """The captioner and reasoner paths; "tiny" builds (once, cached) the CPU demo models."""
    if cfg.model.captioner == "tiny":
        from racro_fast.demo import prepare_demo_models
        return prepare_demo_models(cfg)
    return cfg.model.captioner, cfg.model.reasoner


def build_engines(cfg: Config, policy, tokenizer, reasoner_tokenizer, captioner_path: str, reasoner_path: str,
                  device: torch.device):
    """Captioner and reasoner engines. HF: the captioner engine shares the policy's weights (no push
    needed). vLLM: both engines live in this process and take turns on the GPU through sleep/wake."""
    if cfg.rollout.engine == "hf":
        from transformers import AutoModelForCausalLM
        reasoner = AutoModelForCausalLM.from_pretrained(reasoner_path, dtype=getattr(torch, cfg.model.dtype))
        reasoner = reasoner.to(device).eval().requires_grad_(False)
        return HFEngine(dist.unwrap(policy), tokenizer), HFEngine(reasoner, reasoner_tokenizer)
    dist.check_memory(policy, cfg, device, with_ref=cfg.train.kl_coef > 0)
    launcher = "external_launcher" if dist.world_size() > 1 else None
    captioner = VLLMEngine(captioner_path, dtype=cfg.model.dtype, gpu_memory_utilization=cfg.rollout.captioner_gpu_fraction,
                           max_model_len=cfg.rollout.max_model_len, seed=cfg.train.seed + dist.rank(),
                           distributed_executor_backend=launcher, limit_mm_per_prompt={"image": 8})
    reasoner = VLLMEngine(reasoner_path, dtype=cfg.model.dtype, gpu_memory_utilization=cfg.rollout.reasoner_gpu_fraction,
                          max_model_len=cfg.rollout.max_model_len, seed=cfg.train.seed + dist.rank(),
                          tensor_parallel_size=cfg.rollout.reasoner_tp, distributed_executor_backend=launcher)
    return captioner, reasoner


def make_writer(cfg: Config, out_dir: Path):
    """TensorBoard and/or W&B sinks for the per-step metrics, when configured and installed."""
    sinks = []
    if cfg.run.tensorboard:
        from torch.utils.tensorboard import SummaryWriter
        tb = SummaryWriter(str(out_dir / "tb"))
        sinks.append(lambda m: [tb.add_scalar(k, v, m["step"]) for k, v in m.items() if k != "step"])
    if cfg.run.wandb_project:
        import wandb
        run = wandb.init(project=cfg.run.wandb_project, config=cfg.to_dict(), dir=str(out_dir))
        sinks.append(lambda m: run.log(m, step=m["step"]))
    if not sinks:
        return None
    return lambda m: [sink(m) for sink in sinks]


def plot_rewards(metrics_path: Path, png: Path) -> None:
    """Reward (and its 20-step running mean) per step, from the whole metrics log."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    rows = [json.loads(line) for line in metrics_path.read_text().splitlines() if line.strip()]
    by_step = {r["step"]: r["reward_mean"] for r in rows}  # a resumed run may repeat steps: keep the last
    steps = sorted(by_step)
    rewards = [by_step[s] for s in steps]
    running = [float(np.mean(rewards[max(0, i - 19):i + 1])) for i in range(len(rewards))]
    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.plot(steps, rewards, alpha=0.35, label="reward (mean over captions)")
    ax.plot(steps, running, label="running mean (20 steps)")
    ax.set_xlabel("step")
    ax.set_ylabel("reward")
    ax.set_ylim(-0.02, 1.02)
    ax.legend(loc="lower right")
    fig.tight_layout()
    fig.savefig(png, dpi=120)
    plt.close(fig)


def train(cfg: Config) -> dict:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    dist.init()
    device = dist.device(cfg.run.device)
    torch.manual_seed(cfg.train.seed + dist.rank())
    np.random.seed(cfg.train.seed + dist.rank())
    random.seed(cfg.train.seed + dist.rank())
    out_dir = Path(cfg.run.output_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    if dist.rank() == 0:
        (out_dir / "config.json").write_text(json.dumps(cfg.to_dict(), indent=2))

    # --- models, tokenizer, image processor
    from transformers import AutoTokenizer, Qwen2_5_VLForConditionalGeneration, Qwen2VLImageProcessor
    captioner_path, reasoner_path = resolve_models(cfg)
    tokenizer = AutoTokenizer.from_pretrained(captioner_path)
    image_processor = Qwen2VLImageProcessor.from_pretrained(
        captioner_path, min_pixels=cfg.model.min_pixels, max_pixels=cfg.model.max_pixels)
    dtype = getattr(torch, cfg.model.dtype)
    attn = dist.attn_implementation(cfg.model.attn_impl, device)
    policy = Qwen2_5_VLForConditionalGeneration.from_pretrained(captioner_path, dtype=dtype, attn_implementation=attn)
    if cfg.model.liger and device.type == "cuda":
        dist.apply_liger(policy)
    if cfg.model.freeze_vision:
        policy.model.visual.requires_grad_(False)
    ref = None
    if cfg.train.kl_coef > 0:
        ref = copy.deepcopy(policy).eval().requires_grad_(False)
        ref = dist.wrap_frozen(ref, device, cfg)
    if cfg.model.gradient_checkpointing:
        policy.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    policy = dist.wrap(policy, device, cfg)
    policy.train()
    optimizer = torch.optim.AdamW(
        [p for p in policy.parameters() if p.requires_grad], lr=cfg.train.lr,
        betas=(cfg.train.adam_beta1, cfg.train.adam_beta2), weight_decay=cfg.train.weight_decay,
        fused=device.type == "cuda")
    policy, optimizer = dist.attach_optimizer(policy, optimizer, cfg)  # DeepSpeed: the engine; else unchanged

    def lr_lambda(step: int) -> float:
        if step < cfg.train.warmup_steps:
            return (step + 1) / cfg.train.warmup_steps
        if cfg.train.lr_schedule == "cosine":
            t = (step - cfg.train.warmup_steps) / max(1, cfg.train.steps - cfg.train.warmup_steps)
            return 0.5 * (1 + math.cos(math.pi * min(t, 1.0)))
        return 1.0

    updates_per_step = cfg.train.questions_per_step // cfg.train.mini_batch
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda)
    loss_cfg = GRPOLossConfig(
        clip_low=cfg.train.clip_low, clip_high=cfg.train.clip_high, dual_clip=cfg.train.dual_clip or None,
        kl_coef=cfg.train.kl_coef if ref is not None else 0.0, kl_type=cfg.train.kl_type,
        entropy_coef=cfg.train.entropy_coef, loss_agg=cfg.train.loss_agg,
        norm_len=cfg.rollout.max_caption_tokens)

    # --- data
    if cfg.data.synth_task:
        from racro_fast.synth import write_synth
        data_path = out_dir / "data" / f"synth_{cfg.data.synth_task}_{cfg.data.synth_rows}_{cfg.data.image_size}.parquet"
        if dist.rank() == 0 and not data_path.exists():
            data_path.parent.mkdir(parents=True, exist_ok=True)
            write_synth(str(data_path), cfg.data.synth_rows, cfg.data.synth_task, cfg.train.seed, cfg.data.image_size)
        dist.barrier()
        files = [str(data_path)]
    else:
        files = cfg.data.train_files
    dataset = RowDataset(files, fmt=cfg.data.format, min_pixels=cfg.model.min_pixels, max_pixels=cfg.model.max_pixels)
    stream = RowStream(len(dataset), cfg.train.seed, cfg.data.shuffle, dist.rank(), dist.world_size())
    if len(dataset) == 0:
        raise ValueError(f"data.train_files: no rows in {files}")
    if cfg.train.questions_per_step % dist.world_size():
        raise ValueError(f"train.questions_per_step: {cfg.train.questions_per_step} does not divide over "
                         f"{dist.world_size()} ranks")
    if cfg.train.mini_batch % dist.world_size():
        raise ValueError(f"train.mini_batch: {cfg.train.mini_batch} questions do not divide over "
                         f"{dist.world_size()} ranks (a group of captions never spans ranks)")
    q_local = cfg.train.questions_per_step // dist.world_size()
    mb_local = cfg.train.mini_batch // dist.world_size()

    # --- engines and reward
    reasoner_tokenizer = AutoTokenizer.from_pretrained(reasoner_path)
    captioner_engine, reasoner_engine = build_engines(cfg, policy, tokenizer, reasoner_tokenizer,
                                                      captioner_path, reasoner_path, device)
    scorer = RewardScorer(cfg.rollout.reward, timeout=cfg.rollout.reward_timeout, workers=cfg.rollout.reward_workers)

    # --- resume
    start_step = 0
    ckpt = dist.find_checkpoint(out_dir, cfg.run.resume)
    if ckpt is not None:
        dist.load_model_and_optimizer(policy, optimizer, ckpt)
        state = torch.load(ckpt / "trainer.pt", weights_only=False)
        scheduler.load_state_dict(state["scheduler"])
        stream.load(state["data"]["stream"][dist.rank()])
        rng_file = ckpt / f"rng_rank{dist.rank()}.pt"
        if rng_file.exists():
            dist.set_rng_state(torch.load(rng_file, weights_only=False))
        start_step = state["step"]
        dist.push_weights(captioner_engine, policy, cfg.dist.weight_bucket_mb)
        log.info("resumed from %s at step %d", ckpt, start_step)

    metrics_file = open(out_dir / "metrics.jsonl", "a") if dist.rank() == 0 else None
    writer = make_writer(cfg, out_dir) if dist.rank() == 0 else None
    pbar = None
    if cfg.run.progress and dist.rank() == 0:
        from tqdm.auto import tqdm
        pbar = tqdm(total=cfg.train.steps, initial=start_step, desc="grpo", dynamic_ncols=True)
    vision_ids = {tokenizer.convert_tokens_to_ids(t) for t in ("<|image_pad|>", "<|video_pad|>", "<|vision_start|>",
                                                               "<|vision_end|>") if t in tokenizer.get_vocab()}
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    G, k = cfg.rollout.group_size, cfg.rollout.reasoner_samples
    history: list[dict] = []

    for step in range(start_step, cfg.train.steps):
        t0 = time.perf_counter()
        phase: dict[str, float] = {}
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats()

        # --- questions for this step (skipping rows that cannot be used, counted by the dataset)
        rows, inputs = [], []
        while len(rows) < q_local:
            row = dataset[stream.next()]
            if row is None:
                continue
            cap = build_captioner_inputs(tokenizer, image_processor,
                                         captioner_messages(row.problem, len(row.images)), row.images)
            if len(cap.prompt_ids) > cfg.data.max_prompt_len:
                dataset.skip("too_long")
                continue
            rows.append(row)
            inputs.append(cap)

        # --- captions: G per question
        t = time.perf_counter()
        dist.offload_optimizer(optimizer, cfg)
        reasoner_engine.sleep(level=1)
        captioner_engine.wake_up()
        dist.log_memory("captioner_wake", phase)
        requests = [GenRequest(prompt_ids=c.prompt_ids, pixel_values=c.pixel_values, image_grid_thw=c.image_grid_thw,
                               images=r.images, vllm_prompt_ids=c.vllm_prompt_ids) for r, c in zip(rows, inputs)]
        seed = cfg.train.seed * 1_000_003 + step * 7919 + dist.rank()
        captions = captioner_engine.generate(requests, SamplingConfig(
            n=G, temperature=cfg.rollout.temperature, top_p=cfg.rollout.top_p,
            max_tokens=cfg.rollout.max_caption_tokens, seed=seed))  # [Q][G]
        captioner_engine.sleep(level=2)
        dist.log_memory("captioner_sleep", phase)
        n_cut = sum(cut_at_vision_tokens(c, vision_ids, tokenizer) for qs in captions for c in qs)
        phase["caption_s"] = time.perf_counter() - t

        # --- reasoner: k answers per caption, then verified rewards
        t = time.perf_counter()
        reasoner_engine.wake_up()
        dist.log_memory("reasoner_wake", phase)
        question_text = [clean_problem(r.problem) for r in rows]
        r_requests = [GenRequest(prompt_ids=text_prompt_ids(reasoner_tokenizer, reasoner_messages(c.text, question_text[q])))
                      for q in range(len(rows)) for c in captions[q]]
        answers = reasoner_engine.generate(r_requests, SamplingConfig(
            n=k, temperature=cfg.rollout.reasoner_temperature, top_p=cfg.rollout.reasoner_top_p,
            max_tokens=cfg.rollout.max_reasoner_tokens, seed=seed + 1))  # [Q*G][k]
        reasoner_engine.sleep(level=1)
        dist.log_memory("reasoner_sleep", phase)
        phase["reason_s"] = time.perf_counter() - t
        t = time.perf_counter()
        correct = scorer.score([a.text for outs in answers for a in outs],
                               [rows[i // (G * k)].answer for i in range(len(rows) * G * k)])
        rewards = torch.tensor(caption_rewards(correct, k), dtype=torch.float32)  # (Q*G,)
        adv = grpo_advantages(rewards, G, scale_by_std=cfg.train.scale_adv_by_std)  # (Q*G,)
        phase["reward_s"] = time.perf_counter() - t

        # --- training samples, old and reference log-probs
        t = time.perf_counter()
        dist.reload_optimizer(optimizer, cfg)
        samples = []
        for q, (row, cap) in enumerate(zip(rows, inputs)):
            for g, c in enumerate(captions[q]):
                samples.append(Sample(cap.prompt_ids + list(c.token_ids), len(cap.prompt_ids),
                                      cap.pixel_values, cap.image_grid_thw, float(adv[q * G + g])))
        if updates_per_step > 1:
            fill_logprobs(policy, samples, "old_logp", cfg, pad_id, device)
        if ref is not None:
            fill_logprobs(ref, samples, "ref_logp", cfg, pad_id, device)
        phase["logprob_s"] = time.perf_counter() - t

        # --- updates: mini-batches of whole groups
        t = time.perf_counter()
        upd: dict[str, float] = {}
        per_update = mb_local * G
        for u in range(updates_per_step):
            res = policy_update(policy, optimizer, samples[u * per_update:(u + 1) * per_update], cfg, loss_cfg,
                                pad_id, device)
            for key, v in res.items():
                upd[key] = upd.get(key, 0.0) + v / updates_per_step
        scheduler.step()
        phase["train_s"] = time.perf_counter() - t
        t = time.perf_counter()
        dist.push_weights(captioner_engine, policy, cfg.dist.weight_bucket_mb)
        dist.log_memory("step", phase)
        phase["sync_s"] = time.perf_counter() - t

        # --- metrics (reduced over ranks)
        cap_lens = [len(c.token_ids) for qs in captions for c in qs]
        rsn_lens = [len(a.token_ids) for outs in answers for a in outs]
        group_std = rewards.view(-1, G).std(dim=1, unbiased=False)
        local = {
            "reward_sum": float(rewards.sum()), "reward_sq": float((rewards ** 2).sum()), "n_captions": float(len(rewards)),
            "correct_sum": float(sum(correct)), "n_answers": float(len(correct)),
            "zero_var_groups": float((group_std == 0).sum()), "n_groups": float(len(group_std)),
            "cap_len_sum": float(sum(cap_lens)), "cap_truncated": float(sum(c.truncated for qs in captions for c in qs)),
            "rsn_len_sum": float(sum(rsn_lens)), "cap_cut": float(n_cut), "tokens": float(sum(cap_lens) + sum(rsn_lens)),
        }
        keys = list(local)
        red = dict(zip(keys, dist.all_reduce_sum([local[x] for x in keys])))
        cap_max = dist.all_reduce_max(float(max(cap_lens)))
        step_s = time.perf_counter() - t0
        mean_r = red["reward_sum"] / red["n_captions"]
        m = {
            "step": step + 1,
            "reward_mean": mean_r,
            "reward_std": math.sqrt(max(red["reward_sq"] / red["n_captions"] - mean_r ** 2, 0.0)),
            "accuracy": red["correct_sum"] / red["n_answers"],
            "zero_var_group_frac": red["zero_var_groups"] / red["n_groups"],
            "caption_len_mean": red["cap_len_sum"] / red["n_captions"], "caption_len_max": cap_max,
            "caption_truncated_frac": red["cap_truncated"] / red["n_captions"],
            "caption_vision_token_cut": red["cap_cut"],
            "reasoner_len_mean": red["rsn_len_sum"] / red["n_answers"],
            "tokens_per_s": red["tokens"] / step_s, "step_s": step_s, "lr": scheduler.get_last_lr()[0],
            **{k_: v for k_, v in upd.items()}, **phase,
            "reward_errors": scorer.n_error, "reward_timeouts": scorer.n_timeout,
            "rows_skipped": sum(dataset.skipped.values()),
            "peak_mem_gb": (torch.cuda.max_memory_allocated() if device.type == "cuda"
                            else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024) / 2**30,
        }
        history.append(m)
        if metrics_file is not None:
            metrics_file.write(json.dumps(m) + "\n")
            metrics_file.flush()
            if writer is not None:
                writer(m)
        if pbar is not None:
            pbar.update(1)
            pbar.set_postfix(reward=f"{m['reward_mean']:.3f}", kl=f"{m.get('kl_mean', 0):.4f}",
                             len=f"{m['caption_len_mean']:.1f}")

        # --- checkpoint
        last = step + 1 == cfg.train.steps
        if (cfg.run.save_every and (step + 1) % cfg.run.save_every == 0) or last:
            dist.save_checkpoint(out_dir, step + 1, policy, optimizer, scheduler,
                            {"stream": dist.all_gather_object(stream.state())}, cfg.run.keep_checkpoints)

    if pbar is not None:
        pbar.close()
    if metrics_file is not None:
        metrics_file.close()
    if dataset.skipped:
        log.warning("rows skipped: %s", dict(dataset.skipped))
    if dist.rank() == 0:
        plot_rewards(out_dir / "metrics.jsonl", out_dir / "reward_curve.png")
    if cfg.run.export:
        dist.export(policy, tokenizer, image_processor, out_dir / "export")
    scorer.close()
    return {"history": history, "out_dir": str(out_dir), "skipped": dict(dataset.skipped)}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", help="YAML run config (configs/*.yaml)")
    p.add_argument("overrides", nargs="*", help="section.field=value")
    args = p.parse_args(argv)
    cfg = load_config(args.config, args.overrides)
    train(cfg)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
