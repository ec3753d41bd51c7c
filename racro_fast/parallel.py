"""Data-parallel training: one small object per backend (one process, FSDP2, DeepSpeed ZeRO).

    backend = make_backend(cfg)                   # Single, FSDP2 or DeepSpeed, from dist.backend
    model = backend.wrap(model, device)           # FSDP2 shards here; DeepSpeed waits for the optimizer
    model, optimizer = backend.attach_optimizer(model, optimizer)
    backend.backward(model, loss, last=True); backend.clip_grad_norm(model, 1.0); backend.step(model, optimizer)
    for name, full in backend.full_state_items(model, bucket_mb=512): ...   # collective on every rank

- `Single`: a plain process (no torchrun, no process group); the CPU demo and most tests.
- `FSDP2` (dist.backend=fsdp2, the default under torchrun): `fully_shard` per decoder layer and
  vision block plus the root (embeddings, final norm, lm_head, vision patch embedding and merger);
  fp32 master shards, model.dtype compute on GPU (fp32 on CPU), fp32 gradient reduction.
- `DeepSpeed` (dist.backend=deepspeed): ZeRO stage 2 or 3 from the JSON in dist.deepspeed_config;
  the engine is built around the loop's own AdamW (`attach_optimizer`). On CPU it needs
  DS_ACCELERATOR=cpu (set here when no GPU is visible) and runs over gloo.

Gradient scale: the loop divides each micro-batch loss by the GLOBAL token (or sequence) count and
multiplies it by the world size. FSDP2 (reduce-scatter with a 1/world divide factor) and DeepSpeed
(dp averaging) both average gradients over ranks, so the factor turns the average back into the sum
that the global normalisation expects. DeepSpeed would also divide by gradient_accumulation_steps;
it is forced to 1 here and accumulation boundaries are set per update by `backward`.

Also here: the trainer's memory estimate and start-up check, memory gauges, and moving the optimizer
state to host memory while the rollout engines hold the GPU.
"""
from __future__ import annotations

import ctypes
import functools
import gc
import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import torch

from racro_fast import dist
from racro_fast.config import ConfigError

log = logging.getLogger("racro_fast.parallel")


def cast_params(model: torch.nn.Module, dtype: torch.dtype) -> torch.nn.Module:
    """Cast floating parameters only: buffers such as rotary `inv_freq` keep their fp32 (`.to(dtype)`
    would round them, and the positions of long sequences with them)."""
    for p in model.parameters():
        if p.is_floating_point() and p.dtype != dtype:
            p.data = p.data.to(dtype)
    return model


def _blocks(model) -> list[torch.nn.Module]:
    inner = model.model
    blocks = list(inner.language_model.layers if hasattr(inner, "language_model") else inner.layers)
    if hasattr(inner, "visual"):
        blocks += list(inner.visual.blocks)
    return blocks


def _buffers(module) -> Iterator[tuple[str, torch.Tensor]]:
    for name, b in module.named_buffers():
        if not name.endswith("inv_freq"):  # derived from the config; engines rebuild their own
            yield name, b.detach()


class Single:
    """One process: nothing sharded, plain autograd and optimizer calls."""

    name = "single"

    def __init__(self, cfg) -> None:
        self.cfg = cfg

    def compute_dtype(self, dev: torch.device) -> torch.dtype:
        # CPU: bf16 matmuls are slow there and would blur the 1-vs-2-process comparisons
        return getattr(torch, self.cfg.model.dtype) if dev.type == "cuda" else torch.float32

    def wrap(self, model, dev: torch.device):
        return model.to(dev)

    def wrap_frozen(self, model, dev: torch.device):
        return model.to(dev)

    def attach_optimizer(self, model, optimizer):
        return model, optimizer

    def module(self, model) -> torch.nn.Module:
        """The HF module itself (DeepSpeed's engine holds it as .module; FSDP2 shards it in place)."""
        return model

    def backward(self, model, loss: torch.Tensor, last: bool) -> None:
        """Accumulate one micro-batch's gradient; `last` marks the mini-batch's final micro-batch."""
        loss.backward()

    def clip_grad_norm(self, model, max_norm: float) -> float:
        """Clip to max_norm and return the global gradient norm before clipping."""
        params = [p for p in model.parameters() if p.grad is not None]
        if not params:
            return 0.0
        norm = torch.nn.utils.clip_grad_norm_(params, max_norm)
        if hasattr(norm, "full_tensor"):  # DTensor under FSDP2
            norm = norm.full_tensor()
        return float(norm)

    def step(self, model, optimizer) -> None:
        optimizer.step()

    def zero_grad(self, model, optimizer) -> None:
        """Drop all gradients (set to None, so they hold no memory through the rollouts)."""
        optimizer.zero_grad(set_to_none=True)

    def reshard(self, model) -> None:
        """Free whatever a no-grad forward left gathered (FSDP2's root)."""

    def offload_optimizer(self, optimizer, dev: torch.device) -> list:
        """Optimizer state to host memory while the engines hold the GPU (dist.offload_optimizer, on a
        GPU); returns what `reload_optimizer` puts back. See `offload_optimizer`."""
        if not (self.cfg.dist.offload_optimizer and dev.type == "cuda"):
            return []
        return offload_optimizer(optimizer)

    def full_state_items(self, model, bucket_mb: int = 512) -> Iterator[tuple[str, torch.Tensor]]:
        """Full (unsharded) parameters and buffers with their HF names, gathered lazily.

        Sharded backends gather with collectives, so every rank must consume the iterator to the
        end, in the same order; only one gathered bucket need be alive at a time.
        """
        module = self.module(model)
        for name, p in module.named_parameters():
            yield name, p.detach()
        yield from _buffers(module)

    def save(self, model, optimizer, path: Path) -> None:
        """Model and optimizer state through DCP (`checkpoint.dcp_save`), keyed by parameter names:
        one process and FSDP2 write the same layout, which loads on any world size (DCP reshards)."""
        from torch.distributed.checkpoint.state_dict import get_state_dict

        from racro_fast.checkpoint import dcp_save
        msd, osd = get_state_dict(model, optimizer)
        dcp_save({"model": msd, "optim": osd}, path / "dcp")

    def load(self, model, optimizer, path: Path) -> None:
        if not (path / "dcp").exists():
            raise ConfigError(f"run.resume: {path} holds no DCP state (model and optimizer); it was written "
                              "by a DeepSpeed run")
        from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

        from racro_fast.checkpoint import dcp_load
        msd, osd = get_state_dict(model, optimizer)
        state = {"model": msd, "optim": osd}
        dcp_load(state, path / "dcp")
        set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"])

    def memory(self, size: ModelSize, with_ref: bool) -> dict[str, float]:
        """Estimated GPU bytes per rank of the trainer's parameters, gradients and AdamW state, of the
        frozen reference, and of the root parameters gathered whole during the update. Activations
        are not counted.

        One process and FSDP2 keep fp32 masters, fp32 gradients and moments (FSDP2 sharded over
        the ranks); the reference is in model.dtype (sharded under FSDP2); FSDP2's root (embeddings,
        lm_head, final norm, vision patch embedding and merger) is unsharded from the forward to
        the backward, in model.dtype."""
        W = dist.world_size()
        e = torch.finfo(getattr(torch, self.cfg.model.dtype)).bits // 8
        return {"params": size.params * 4 / W, "grads": size.trainable * 4 / W, "optimizer": size.trainable * 8 / W,
                "ref": size.params * e / W if with_ref else 0.0, "root_gathered": size.root * e if W > 1 else 0.0}


class FSDP2(Single):
    """`fully_shard` per block and root; fp32 master shards, compute in model.dtype."""

    name = "fsdp2"

    def wrap(self, model, dev: torch.device):
        """fp32 master shards: an AdamW step of lr 1e-6 on bf16 weights would mostly round away."""
        model.to(dev)
        return self._shard(model, dev, master=torch.float32)

    def wrap_frozen(self, model, dev: torch.device):
        """The frozen reference, sharded in the compute dtype (no optimizer, no master copy)."""
        model.to(dev)
        return self._shard(model, dev, master=self.compute_dtype(dev))

    def _shard(self, model, dev: torch.device, master: torch.dtype):
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
        mp = MixedPrecisionPolicy(param_dtype=self.compute_dtype(dev), reduce_dtype=torch.float32)
        cast_params(model, master)  # before sharding: the full copy is transient, each rank keeps 1/world
        for block in _blocks(model):
            fully_shard(block, mp_policy=mp)
        fully_shard(model, mp_policy=mp)
        _forward_inner_through_root(model)
        # transformers' generate() then runs with synced_gpus: ranks that finish sampling early keep
        # joining the other ranks' all-gathers instead of leaving them waiting
        model._is_fsdp_managed_module = True
        return model

    def reshard(self, model) -> None:
        # the root is not resharded after its forward (FSDP2's default), and only a backward would
        # do it: after a no-grad pass the full embeddings and lm_head would stay resident
        model.reshard()

    def full_state_items(self, model, bucket_mb: int = 512) -> Iterator[tuple[str, torch.Tensor]]:
        for name, p in model.named_parameters():
            t = p.detach()
            yield name, t.full_tensor() if hasattr(t, "full_tensor") else t
        yield from _buffers(model)


def _forward_inner_through_root(model) -> None:
    """Make calls into `model.model` (the HF base model) run the root FSDP module's forward hooks.

    The loss path runs the decoder through `model.model(...)` and then reads `model.lm_head.weight`
    directly (no [tokens, vocab] logits); `generate` encodes images through
    `model.model.get_image_features(...)` before its first forward. None of these go through the
    root's `forward`, so without this the root's parameters (embeddings, final norm, lm_head, the
    vision patch embedding and merger) would still be sharded DTensors there. This is what
    `torch.distributed.fsdp.register_fsdp_forward_method` does for a method of the FSDP module
    itself; here it is done for the child's methods (FSDP2's private pre/post-forward pair: check
    it on torch upgrades). Inside the root's own forward the calls are left alone.
    """
    from torch.distributed.fsdp._fully_shard._fsdp_common import TrainingState
    state = model._get_fsdp_state()
    inner = model.model

    def through_root(method):
        @functools.wraps(method)  # generate() reads the signature to pick the encoder's arguments
        def call(*args, **kwargs):
            if state._training_state != TrainingState.IDLE:
                return method(*args, **kwargs)
            args, kwargs = state._pre_forward(model, args, kwargs)
            return state._post_forward(model, args, method(*args, **kwargs))
        return call

    for name in ("forward", "get_image_features", "get_video_features"):
        if hasattr(inner, name):
            setattr(inner, name, through_root(getattr(inner, name)))


def _import_deepspeed():
    if not torch.cuda.is_available():
        os.environ.setdefault("DS_ACCELERATOR", "cpu")  # else DeepSpeed probes for CUDA and refuses to load
    import deepspeed
    return deepspeed


class DeepSpeed(Single):
    """ZeRO-2/3 around the loop's own AdamW; backward, clipping and step go through the engine."""

    name = "deepspeed"

    def __init__(self, cfg) -> None:
        super().__init__(cfg)
        self.config = deepspeed_config(cfg)
        self.stage = self.config["zero_optimization"]["stage"]

    def wrap_frozen(self, model, dev: torch.device):
        """Replicated: DeepSpeed's engine wants an optimizer."""
        return model.to(dev)

    def attach_optimizer(self, model, optimizer):
        """Build the engine; the returned optimizer is the torch one whose param_groups ZeRO steps
        with, so an LR scheduler built on it drives the engine."""
        deepspeed = _import_deepspeed()
        if self.config["zero_optimization"].get("offload_optimizer", {}).get("device") == "cpu":
            from deepspeed.ops.adam import DeepSpeedCPUAdam
            g = optimizer.param_groups[0]
            optimizer = DeepSpeedCPUAdam([p for grp in optimizer.param_groups for p in grp["params"]], lr=g["lr"],
                                         betas=g["betas"], weight_decay=g["weight_decay"], adamw_mode=True)
        engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, config=self.config)
        if self.stage == 3:
            _gather_lm_head_with_decoder(engine)
            # generate() must run with synced_gpus (every forward gathers parameters, and ranks stop
            # at different lengths). transformers' global ZeRO-3 switch (HfDeepSpeedConfig) would give
            # that but also make every later from_pretrained load partitioned; this flag, which
            # transformers reads for FSDP, turns on the synced loop for this model only.
            model._is_fsdp_managed_module = True
        return engine, optimizer

    def module(self, model) -> torch.nn.Module:
        return model.module if hasattr(model, "module") else model

    def backward(self, model, loss: torch.Tensor, last: bool) -> None:
        # The loss path calls the HF module, not the engine's forward, so do what that forward does
        # first: without it ZeRO-3 never advances its micro-step and each micro-batch's gradient
        # overwrites the previous one instead of adding to it.
        model.optimizer.clear_backward_seen_flag()
        model.set_gradient_accumulation_boundary(last)
        model.backward(loss)

    def clip_grad_norm(self, model, max_norm: float) -> float:
        """DeepSpeed clips inside its step (gradient_clipping = train.grad_clip); here the norm is only
        measured, from the reduced gradient partitions, so the loop can skip a non-finite step."""
        from deepspeed.runtime.utils import combine_grad_norm_groups
        zero = model.optimizer
        if hasattr(zero, "scaled_global_norm"):  # ZeRO 1/2
            norm = zero.scaled_global_norm()
        else:  # ZeRO-3
            norm = combine_grad_norm_groups(zero._get_norm_groups())
        norm = float(norm)
        return norm if norm >= 0 else float("nan")  # DeepSpeed reports a non-finite norm as -1

    def step(self, model, optimizer) -> None:
        model.step()

    def offload_optimizer(self, optimizer, dev: torch.device) -> list:
        return []  # ZeRO keeps its optimizer state where its config says (offload_optimizer)

    def zero_grad(self, model, optimizer) -> None:
        """Also DeepSpeed's reduced partitions: a skipped step must not leak into the next."""
        optimizer.zero_grad(set_to_none=True)
        model.optimizer.zero_grad(set_to_none=True)
        avg = getattr(model.optimizer, "averaged_gradients", None)
        if isinstance(avg, dict):
            for k in avg:
                avg[k] = None

    def full_state_items(self, model, bucket_mb: int = 512) -> Iterator[tuple[str, torch.Tensor]]:
        module = self.module(model)
        if self.stage != 3:
            yield from super().full_state_items(model, bucket_mb)
            return
        from deepspeed import zero
        limit = bucket_mb << 20
        bucket: list[tuple[str, torch.nn.Parameter]] = []
        size = 0
        named = list(module.named_parameters())
        for i, (name, p) in enumerate(named):
            bucket.append((name, p))
            size += p.ds_numel * p.element_size()
            if size >= limit or i == len(named) - 1:
                with zero.GatheredParameters([q for _, q in bucket], modifier_rank=None):
                    full = [(n, q.detach().clone()) for n, q in bucket]
                yield from full
                bucket, size = [], 0
        yield from _buffers(module)

    def save(self, model, optimizer, path: Path) -> None:
        model.save_checkpoint(str(path / "deepspeed"), tag="state", save_latest=False)

    def load(self, model, optimizer, path: Path) -> None:
        if not (path / "deepspeed").exists():
            raise ConfigError(f"run.resume: {path} holds no DeepSpeed state (was it written by another backend?)")
        load_path, _ = model.load_checkpoint(str(path / "deepspeed"), tag="state", load_optimizer_states=True,
                                             load_lr_scheduler_states=False)
        if load_path is None:
            raise ConfigError(f"run.resume: DeepSpeed could not load {path / 'deepspeed'}")

    def memory(self, size: ModelSize, with_ref: bool) -> dict[str, float]:
        """ZeRO-2 keeps full 16-bit parameters and partitions gradients and the fp32 master + moments;
        ZeRO-3 partitions all (lm_head stays gathered with the decoder); the reference is replicated."""
        W = dist.world_size()
        e = torch.finfo(getattr(torch, self.cfg.model.dtype)).bits // 8
        offload = "offload_optimizer" in self.config["zero_optimization"]
        return {"params": size.params * e / (W if self.stage == 3 else 1), "grads": size.trainable * e / W,
                "optimizer": 0.0 if offload else size.trainable * (4 + 8 if e < 4 else 8) / W,
                "ref": size.params * e if with_ref else 0.0,
                "root_gathered": size.lm_head * e if self.stage == 3 else 0.0}


def _gather_lm_head_with_decoder(engine) -> None:
    """ZeRO-3: gather lm_head.weight whenever the decoder (`model.model`) runs, and keep it gathered.

    The loss path reads `lm_head.weight` after `model.model(...)` returns, outside any module's
    forward, where ZeRO-3 would hand it an empty partition. `register_external_parameter` is
    DeepSpeed's hook for a tensor used outside its owner: it is fetched with the decoder and not
    released at the decoder's end (the step re-partitions it).
    """
    from deepspeed.runtime.zero.partition_parameters import register_external_parameter
    module = engine.module
    register_external_parameter(module.model, module.lm_head.weight)
    # what DeepSpeed's own dangling-parameter detection also sets: do not release it after a module's forward
    module.lm_head.weight.is_external_param = True


def deepspeed_config(cfg) -> dict:
    """dist.deepspeed_config (the ZeRO settings) completed with what the run config owns.

    Batch sizes, accumulation, clipping and precision come from the run config, whatever the JSON
    says, so the two cannot disagree.
    """
    path = Path(cfg.dist.deepspeed_config)
    if not path.exists():
        raise ConfigError(f"dist.deepspeed_config: {path} does not exist")
    ds = json.loads(path.read_text())
    stage = ds.get("zero_optimization", {}).get("stage", 0)
    if stage not in (2, 3):
        raise ConfigError(f"dist.deepspeed_config: {path} sets zero_optimization.stage={stage}; 2 or 3 is supported")
    # the loop forms its own micro-batches; DeepSpeed never sees a batch and must not rescale the loss
    ds["train_micro_batch_size_per_gpu"] = 1
    ds["gradient_accumulation_steps"] = 1
    ds.pop("train_batch_size", None)
    ds["gradient_clipping"] = cfg.train.grad_clip
    ds["bf16"] = {"enabled": cfg.model.dtype == "bfloat16"}
    ds.pop("fp16", None)
    ds["zero_allow_untested_optimizer"] = True  # torch AdamW, built by the loop
    ds.setdefault("steps_per_print", 1 << 30)
    zero = ds["zero_optimization"]
    if not torch.cuda.is_available():
        # nothing to offload to on a CPU run; ZeRO-Offload also wants DeepSpeed's compiled CPU Adam
        zero.pop("offload_optimizer", None)
        zero.pop("offload_param", None)
    return ds


def make_backend(cfg) -> Single:
    """dist.backend under torchrun (a process group, any world size); one process otherwise."""
    if not dist.is_dist():
        return Single(cfg)
    return DeepSpeed(cfg) if cfg.dist.backend == "deepspeed" else FSDP2(cfg)


# ----------------------------------------------------------------------------- GPU memory

GIB = 2 ** 30
ENGINE_OVERHEAD = 2 * GIB  # activations of one forward, CUDA graphs and allocator slack of a vLLM engine
# What a sleeping vLLM engine still holds on each of its GPUs: sleep frees only the memory it tagged
# (weights, kv_cache); its CUDA context, CUDA-graph pool (unless enforce_eager), NCCL and custom
# all-reduce buffers stay. Counted as an awake engine's whole overhead, an upper bound.
ENGINE_ASLEEP = ENGINE_OVERHEAD
CUDA_CONTEXT = GIB // 2  # a process's CUDA context on a GPU, outside every allocator
# tokens a reasoner request holds in the KV cache besides its answer: the reasoner prompt's question
# and instructions (its caption counts rollout.max_caption_tokens)
REASONER_PROMPT_TOKENS = 512


@dataclass
class ModelSize:
    """What sets a model's memory: parameter counts and the KV-cache bytes of one token."""
    params: int  # all parameters
    trainable: int  # with requires_grad
    root: int  # outside the decoder layers and vision blocks: FSDP2's root unit
    lm_head: int
    kv_bytes_per_token: int  # K and V of every layer, at 2 bytes an element

    @classmethod
    def of(cls, model: torch.nn.Module) -> ModelSize:
        """From a model (real, meta or sharded: DeepSpeed's partitioned parameters count whole)."""
        def n(params) -> int:
            return sum(getattr(p, "ds_numel", p.numel()) for p in params)
        in_blocks = {id(p) for block in _blocks(model) for p in block.parameters()}
        text = getattr(model.config, "text_config", None) or model.config
        head_dim = getattr(text, "head_dim", None) or text.hidden_size // text.num_attention_heads
        return cls(params=n(model.parameters()), trainable=n(p for p in model.parameters() if p.requires_grad),
                   root=n(p for p in model.parameters() if id(p) not in in_blocks),
                   lm_head=n(model.lm_head.parameters()) if hasattr(model, "lm_head") else 0,
                   kv_bytes_per_token=2 * text.num_hidden_layers * text.num_key_value_heads * head_dim * 2)

    @classmethod
    def from_config(cls, path: str | os.PathLike) -> ModelSize:
        """From a checkpoint's config.json alone (the model is built on the meta device)."""
        from transformers import AutoConfig, AutoModelForCausalLM, Qwen2_5_VLForConditionalGeneration
        config = AutoConfig.from_pretrained(str(path))
        with torch.device("meta"):
            if config.model_type == "qwen2_5_vl":
                model = Qwen2_5_VLForConditionalGeneration._from_config(config)
            else:
                model = AutoModelForCausalLM.from_config(config)
        return cls.of(model)


def memory_plan(cfg, backend: Single, captioner: ModelSize, reasoner: ModelSize | None, total: float) -> dict:
    """GPU bytes per device at each engine start and in each phase of a step, what each vLLM engine
    needs of its fraction, and how many reasoner requests the node's server holds at once.

    Start-up, in train's order: the reasoner server starts beside the trainer's parameters and
    reference (the caching allocator emptied first, on every rank), then sleeps; the captioner engine
    starts beside those and the sleeping server. vLLM refuses to start an engine when the device's
    free memory is below its gpu_memory_utilization x total: `*_start` is what the device holds then,
    besides the engine. The engines are never awake together (sleep mode), so each phase holds the
    trainer's resident state next to one awake engine and the other asleep (ENGINE_ASLEEP): captions
    (captioner awake), answers (the node's reasoner server awake, counted on every GPU it spans),
    update (gradients and optimizer state back, both engines asleep). `reasoner` is None when it
    does not share these GPUs (rollout.reasoner_url, or the HF engine).
    """
    r = cfg.rollout
    trainer = backend.memory(captioner, with_ref=cfg.loss.kl_coef > 0)
    at_start = trainer["params"] + trainer["ref"] + CUDA_CONTEXT  # no optimizer state before the first step
    resident = trainer["params"] + trainer["ref"] + (0.0 if cfg.dist.offload_optimizer else trainer["optimizer"])
    resident += CUDA_CONTEXT
    reasoner_asleep = ENGINE_ASLEEP if reasoner is not None else 0.0
    plan = {
        "trainer": trainer,
        "reasoner_start": at_start if reasoner is not None else 0.0,
        "captioner_start": at_start + reasoner_asleep,
        "captions": resident + r.captioner_gpu_fraction * total + reasoner_asleep,
        "answers": resident + (r.reasoner_gpu_fraction * total if reasoner is not None else 0.0) + ENGINE_ASLEEP,
        "update": sum(trainer.values()) + CUDA_CONTEXT + ENGINE_ASLEEP + reasoner_asleep,
        # the captioner engine holds a full bf16 copy per rank, the reasoner 1/tp of one per GPU
        "captioner_engine_need": captioner.params * 2 + captioner.kv_bytes_per_token * r.max_model_len + ENGINE_OVERHEAD,
        "reasoner_engine_need": (reasoner.params * 2 + reasoner.kv_bytes_per_token * r.max_model_len) / r.reasoner_tp
        + ENGINE_OVERHEAD if reasoner is not None else 0.0,
        "reasoner_sequences": 0,
    }
    if reasoner is not None:
        plan["reasoner_sequences"] = reasoner_sequences(cfg, reasoner, total, dist.local_world_size())
    return plan


def reasoner_replicas(cfg, gpus_per_node: int) -> int:
    return cfg.rollout.reasoner_dp or max(1, gpus_per_node // cfg.rollout.reasoner_tp)


def reasoner_sequences(cfg, reasoner: ModelSize, total: float, gpus_per_node: int) -> int:
    """Requests of a step's longest shape (a caption of rollout.max_caption_tokens, the prompt, an
    answer of rollout.max_reasoner_tokens, at most rollout.max_model_len) that the node's reasoner
    server holds in its KV caches at once: more only wait in its queue. At least one per replica once
    the engine-need rule of `check_memory_plan` holds (it counts one request of max_model_len). Per replica: its fraction of tp GPUs, less the weights and the
    overhead, over the KV bytes of one such request (its layers split over the tp GPUs)."""
    r = cfg.rollout
    per_gpu = r.reasoner_gpu_fraction * total - reasoner.params * 2 / r.reasoner_tp - ENGINE_OVERHEAD
    tokens = min(r.max_model_len, r.max_caption_tokens + REASONER_PROMPT_TOKENS + r.max_reasoner_tokens)
    per_request = reasoner.kv_bytes_per_token * tokens / r.reasoner_tp
    return max(0, int(per_gpu // per_request)) * reasoner_replicas(cfg, gpus_per_node)


# requests a rank keeps in flight when no memory plan sizes it (no GPU, or a reasoner not on these GPUs)
DEFAULT_INFLIGHT = 64


def inflight_per_rank(cfg, sequences: int, ranks_per_node: int) -> int:
    """rollout.reasoner_max_inflight, or the node server's sequences (from the memory plan) shared by
    the node's ranks, or DEFAULT_INFLIGHT without a plan (sequences 0)."""
    if cfg.rollout.reasoner_max_inflight:
        return cfg.rollout.reasoner_max_inflight
    if not sequences:
        return DEFAULT_INFLIGHT
    return max(1, sequences // max(1, ranks_per_node))


def check_memory_plan(cfg, plan: dict, total: float) -> None:
    """Refuse at start-up, naming the setting, a plan that cannot run on a device of `total` bytes."""
    r = cfg.rollout
    detail = ", ".join(f"{k} {v / GIB:.1f}" for k, v in plan["trainer"].items())

    def need(ok: bool, field: str, msg: str) -> None:
        if not ok:
            raise ConfigError(f"{field}: {msg} (trainer per rank: {detail} GiB; device {total / GIB:.0f} GiB)")

    engines = ("reasoner", "captioner") if plan["reasoner_engine_need"] else ("captioner",)
    for engine in engines:
        want, frac = plan[f"{engine}_engine_need"], getattr(r, f"{engine}_gpu_fraction")
        need(want <= frac * total, f"rollout.{engine}_gpu_fraction",
             f"{frac} x {total / GIB:.0f} GiB = {frac * total / GIB:.1f} GiB; the {engine} engine needs about "
             f"{want / GIB:.1f} GiB (weights, KV cache for rollout.max_model_len={r.max_model_len}, overhead)")
        # vLLM's own start-up check: free device memory >= gpu_memory_utilization x total
        held = plan[f"{engine}_start"]
        need(held + frac * total <= total, f"rollout.{engine}_gpu_fraction",
             f"the {engine} engine starts with {held / GIB:.1f} GiB of the device held (trainer, sleeping "
             f"engines); vLLM needs {frac} x {total / GIB:.0f} GiB free then, {(total - held) / GIB:.1f} GiB are")
    need(plan["captions"] <= 0.95 * total, "rollout.captioner_gpu_fraction",
         f"captions phase: trainer and sleeping reasoner {(plan['captions'] - r.captioner_gpu_fraction * total) / GIB:.1f}"
         f" GiB + captioner {r.captioner_gpu_fraction * total / GIB:.1f} GiB > 95% of the device")
    need(plan["answers"] <= 0.95 * total, "rollout.reasoner_gpu_fraction",
         f"answers phase needs {plan['answers'] / GIB:.1f} GiB > 95% of the device")
    need(plan["update"] <= 0.9 * total, "dist.backend",
         f"the update needs about {plan['update'] / GIB:.1f} GiB before activations; use more ranks, ZeRO-3 or "
         "optimizer offload")


def check_memory(backend: Single, model, cfg, dev: torch.device) -> dict | None:
    """The memory plan of this run on this GPU (real model sizes), checked at start-up; None on CPU."""
    if dev.type != "cuda":
        return None
    total = torch.cuda.get_device_properties(dev).total_memory
    shares = cfg.rollout.reasoner_engine == "server" and not cfg.rollout.reasoner_url
    reasoner = ModelSize.from_config(cfg.model.reasoner) if shares else None
    plan = memory_plan(cfg, backend, ModelSize.of(backend.module(model)), reasoner, total)
    check_memory_plan(cfg, plan, total)
    log.info("memory plan per GPU (GiB): reasoner start %.1f, captioner start %.1f, captions %.1f, answers %.1f, "
             "update %.1f of %.1f; the node's reasoner holds %d requests", plan["reasoner_start"] / GIB,
             plan["captioner_start"] / GIB, plan["captions"] / GIB, plan["answers"] / GIB, plan["update"] / GIB,
             total / GIB, plan["reasoner_sequences"])
    return plan


def memory_gauge(tag: str, gauges: dict) -> None:
    """Allocated / reserved GPU memory after a sleep, wake or step, into `gauges` (no-op without a GPU)."""
    if not torch.cuda.is_available():
        return
    gauges[f"mem_{tag}_alloc_gb"] = torch.cuda.memory_allocated() / 2 ** 30
    gauges[f"mem_{tag}_reserved_gb"] = torch.cuda.memory_reserved() / 2 ** 30


def free_cached_memory() -> None:
    """Return the blocks PyTorch keeps cached to the device, before an engine wakes: vLLM's own
    allocator cannot use memory that PyTorch's caching allocator still holds. (A no-op without a
    GPU: the collection alone costs a fifth of a second a call.)"""
    if torch.cuda.is_available():
        gc.collect()
        torch.cuda.empty_cache()


# glibc's malloc: how it keeps the memory a CPU process frees (mallopt's parameters, malloc.h)
M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3
MALLOC_ENV = ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_")


def _glibc() -> ctypes.CDLL | None:
    try:
        libc = ctypes.CDLL(None)
        libc.gnu_get_libc_version  # glibc's: musl and others have a mallopt that does nothing
    except (OSError, AttributeError):
        return None
    return libc


def keep_freed_host_memory(mmap_mb: int = 32, trim_mb: int = 64) -> bool:
    """Have glibc's malloc serve blocks up to `mmap_mb` from its heap and keep up to `trim_mb` free
    at the heap's top, for the process's life. A CPU step allocates and frees tensors of the same
    megabytes layer after layer and phase after phase; by default glibc maps each block above an
    adaptive threshold afresh and returns freed memory at the heap's top to the kernel, and every
    page of it then comes back as a page fault (tens of thousands a step in the CPU demo). 32 MB
    is where glibc's own adaptive threshold stops (64-bit); this fixes it there from the start.

    False where it does not apply: not glibc, or the environment sets malloc's thresholds
    (MALLOC_MMAP_THRESHOLD_, MALLOC_TRIM_THRESHOLD_, glibc.malloc tunables), which win."""
    tunables = os.environ.get("GLIBC_TUNABLES", "")
    if any(k in os.environ for k in MALLOC_ENV) or any(
            f"glibc.malloc.{k}" in tunables for k in ("mmap_threshold", "trim_threshold")):
        return False
    libc = _glibc()
    return libc is not None and libc.mallopt(M_MMAP_THRESHOLD, mmap_mb << 20) == 1 \
        and libc.mallopt(M_TRIM_THRESHOLD, trim_mb << 20) == 1


def release_host_memory() -> None:
    """Return the free memory glibc's heap holds to the system (malloc_trim): after training, so
    that what follows (the plot, the export) starts from what is in use, not from the peak."""
    libc = _glibc()
    if libc is not None:
        libc.malloc_trim(0)


# ----------------------------------------------------------------------------- optimizer offload

def offload_optimizer(optimizer, host: torch.device = torch.device("cpu")) -> list:
    """Move every optimizer state tensor (moments and AdamW's `step`) to host memory; returns what
    moved as (state, key, device) so `reload_optimizer` puts each back exactly where it was.

    Fused and capturable AdamW keep `step` on the parameter's device and dereference it there: a
    `step` left on the host would be a host pointer in a device kernel.
    """
    moved = []
    pin = host.type == "cpu" and torch.cuda.is_available()
    for state in optimizer.state.values():
        for k, v in state.items():
            if torch.is_tensor(v) and v.device != host:
                moved.append((state, k, v.device))
                t = v.to(host, non_blocking=pin)
                state[k] = t.pin_memory() if pin else t
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return moved


def reload_optimizer(moved: list) -> None:
    for state, k, dev in moved:
        state[k] = state[k].to(dev, non_blocking=True)
    moved.clear()
