"""Process groups, model wrapping (FSDP2 or DeepSpeed ZeRO), full-weight gathering, offload, checkpoints.

Everything here also works in one plain process (world size 1, no process group), which is how the
CPU demo and most tests run. Under `torchrun` with world size > 1 the policy is sharded:

- dist.backend=fsdp2 (default): `fully_shard` per decoder layer and vision block plus the root (embeddings,
  final norm, lm_head, vision patch embedding and merger); fp32 master shards, model.dtype compute on GPU
  (fp32 on CPU), fp32 gradient reduction.
- dist.backend=deepspeed: ZeRO stage 2 or 3 from the JSON in dist.deepspeed_config; the engine is built
  around the loop's own AdamW (`attach_optimizer`), backward and step go through it. On CPU it needs
  DS_ACCELERATOR=cpu (set here when no GPU is visible) and runs over gloo; optimizer offload is dropped there.

The loop's whole interface: init, wrap / wrap_frozen, attach_optimizer, backward, clip_grad_norm, step,
zero_grad, full_state_items / push_weights, save / load_model_and_optimizer, export, check_memory /
log_memory. Checkpoints are sharded (DCP for FSDP2, the engine's files for DeepSpeed): a resume needs
the same backend and world size; `export` writes the portable full model.

Gradient scale: the loop divides each micro-batch loss by the GLOBAL token (or sequence) count and
multiplies it by the world size. Both FSDP2 (reduce-scatter with a 1/world divide factor) and DeepSpeed
(dp averaging) average gradients over ranks, so the factor turns the average back into the sum that
the global normalisation expects. DeepSpeed would also divide by gradient_accumulation_steps; it is
forced to 1 here and accumulation boundaries are set per update by `backward`, so nothing is divided twice.
"""
from __future__ import annotations

import functools
import json
import logging
import os
import random
import shutil
from pathlib import Path
from typing import Iterator

import numpy as np
import torch
import torch.distributed as tdist

log = logging.getLogger("racro_fast.dist")


# ----------------------------------------------------------------------------- process group

def init() -> None:
    if "WORLD_SIZE" in os.environ and int(os.environ["WORLD_SIZE"]) > 1 and not tdist.is_initialized():
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        if torch.cuda.is_available():
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
        tdist.init_process_group(backend)


def is_dist() -> bool:
    return tdist.is_available() and tdist.is_initialized()


def rank() -> int:
    return tdist.get_rank() if is_dist() else 0


def world_size() -> int:
    return tdist.get_world_size() if is_dist() else 1


def barrier() -> None:
    if is_dist():
        tdist.barrier()


def device(kind: str = "auto") -> torch.device:
    if kind == "cuda" or (kind == "auto" and torch.cuda.is_available()):
        if not torch.cuda.is_available():
            raise ValueError("run.device: cuda requested but no GPU is visible")
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
    return torch.device("cpu")


def _reduce(values: list[float], op) -> list[float]:
    if not is_dist():
        return list(values)
    dev = torch.device("cuda", torch.cuda.current_device()) if tdist.get_backend() == "nccl" else torch.device("cpu")
    t = torch.tensor(values, dtype=torch.float64, device=dev)
    tdist.all_reduce(t, op=op)
    return t.tolist()


def all_reduce_sum(values: list[float]) -> list[float]:
    return _reduce(values, tdist.ReduceOp.SUM if is_dist() else None)


def all_reduce_max(value: float) -> float:
    return _reduce([value], tdist.ReduceOp.MAX if is_dist() else None)[0]


def all_gather_object(obj) -> list:
    if not is_dist():
        return [obj]
    out = [None] * world_size()
    tdist.all_gather_object(out, obj)
    return out


# ----------------------------------------------------------------------------- model

def attn_implementation(name: str, dev: torch.device) -> str:
    if name != "auto":
        return name
    if dev.type == "cuda":
        try:
            import flash_attn  # noqa: F401
            return "flash_attention_2"
        except ImportError:
            pass
    return "sdpa"


def apply_liger(model) -> None:
    """Liger-Kernel's RMSNorm / SwiGLU / RoPE patches for Qwen2.5-VL, when installed."""
    try:
        from liger_kernel.transformers import _apply_liger_kernel_to_instance
    except ImportError:
        log.info("liger-kernel not installed: model patches skipped")
        return
    # the fused linear cross-entropy patch is ours to replace; keep only the elementwise ones
    _apply_liger_kernel_to_instance(model=model, rope=True, rms_norm=True, swiglu=True,
                                    cross_entropy=False, fused_linear_cross_entropy=False)


def _blocks(model) -> list[torch.nn.Module]:
    inner = model.model
    blocks = list(inner.language_model.layers if hasattr(inner, "language_model") else inner.layers)
    if hasattr(inner, "visual"):
        blocks += list(inner.visual.blocks)
    return blocks


def _uses_deepspeed(cfg) -> bool:
    return cfg.dist.backend == "deepspeed" and world_size() > 1


def is_deepspeed(model) -> bool:
    return type(model).__name__ == "DeepSpeedEngine"  # by name: no deepspeed import on the FSDP2 path


def _import_deepspeed():
    if not torch.cuda.is_available():
        os.environ.setdefault("DS_ACCELERATOR", "cpu")  # else DeepSpeed probes for CUDA and refuses to load
    import deepspeed
    return deepspeed


def deepspeed_config(cfg) -> dict:
    """dist.deepspeed_config (the ZeRO settings) completed with what the run config owns.

    Batch sizes, accumulation, clipping and precision come from the run config, whatever the JSON
    says, so the two cannot disagree.
    """
    path = Path(cfg.dist.deepspeed_config)
    if not path.exists():
        raise FileNotFoundError(f"dist.deepspeed_config: {path} does not exist")
    ds = json.loads(path.read_text())
    stage = ds.get("zero_optimization", {}).get("stage", 0)
    if stage not in (2, 3):
        raise ValueError(f"dist.deepspeed_config: {path} sets zero_optimization.stage={stage}; 2 or 3 is supported")
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


def _compute_dtype(cfg, dev: torch.device) -> torch.dtype:
    # CPU: bf16 matmuls are slow there and would blur the 1-vs-2-process comparisons
    return getattr(torch, cfg.model.dtype) if dev.type == "cuda" else torch.float32


def _forward_inner_through_root(model) -> None:
    """Make calls into `model.model` (the HF base model) run the root FSDP module's forward hooks.

    The loss path runs the decoder through `model.model(...)` and then reads `model.lm_head.weight`
    directly (no [tokens, vocab] logits); `generate` encodes images through
    `model.model.get_image_features(...)` before its first forward. None of these go through the
    root's `forward`, so without this the root's parameters (embeddings, final norm, lm_head, the
    vision patch embedding and merger) would still be sharded DTensors there. This is what
    `torch.distributed.fsdp.register_fsdp_forward_method` does for a method of the FSDP module
    itself; here it is done for the child's methods. The root keeps its parameters unsharded after
    forward (FSDP2's default for the root), so `lm_head.weight` is the full tensor until backward
    reduce-scatters its gradient. Inside the root's own forward the calls are left alone.
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


def wrap(model, dev: torch.device, cfg) -> torch.nn.Module:
    """Move to the device; under torchrun with world size > 1 shard with FSDP2.

    FSDP2 keeps fp32 master shards and computes in model.dtype (the all-gathered copy is cast):
    an AdamW step of lr 1e-6 on bf16 weights would mostly round away. With DeepSpeed the model is
    only moved here (its bf16 config keeps fp32 masters itself): the engine needs the optimizer, so
    it is built by `attach_optimizer` once the loop has made one.
    """
    model.to(dev)
    if world_size() == 1 or _uses_deepspeed(cfg):
        return model
    return _fully_shard(model, dev, cfg, master=torch.float32)


def wrap_frozen(model, dev: torch.device, cfg) -> torch.nn.Module:
    """The frozen reference: FSDP2-sharded in model.dtype (no optimizer, no master copy); replicated
    under DeepSpeed, whose engine wants an optimizer."""
    model.to(dev)
    if world_size() == 1 or _uses_deepspeed(cfg):
        return model
    return _fully_shard(model, dev, cfg, master=_compute_dtype(cfg, dev))


def _fully_shard(model, dev: torch.device, cfg, master: torch.dtype) -> torch.nn.Module:
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
    mp = MixedPrecisionPolicy(param_dtype=_compute_dtype(cfg, dev), reduce_dtype=torch.float32)
    model.to(master)  # before sharding: the full copy is transient, each rank keeps 1/world of it
    for block in _blocks(model):
        fully_shard(block, mp_policy=mp)
    fully_shard(model, mp_policy=mp)
    _forward_inner_through_root(model)
    # transformers' generate() then runs with synced_gpus: ranks that finish sampling early keep
    # joining the other ranks' all-gathers instead of leaving them waiting
    model._is_fsdp_managed_module = True
    return model


def attach_optimizer(model, optimizer: torch.optim.Optimizer, cfg):
    """DeepSpeed: build the engine around the model and the loop's optimizer. Returns (model, optimizer).

    The returned optimizer is the plain torch one whose param_groups ZeRO steps with, so an LR
    scheduler built on it drives the engine. FSDP2 and one process: returned unchanged.
    """
    if not _uses_deepspeed(cfg):
        return model, optimizer
    deepspeed = _import_deepspeed()
    ds = deepspeed_config(cfg)
    if ds["zero_optimization"].get("offload_optimizer", {}).get("device") == "cpu":
        from deepspeed.ops.adam import DeepSpeedCPUAdam
        g = optimizer.param_groups[0]
        optimizer = DeepSpeedCPUAdam([p for grp in optimizer.param_groups for p in grp["params"]], lr=g["lr"],
                                     betas=g["betas"], weight_decay=g["weight_decay"], adamw_mode=True)
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, config=ds)
    if ds["zero_optimization"]["stage"] == 3:
        _gather_lm_head_with_decoder(engine)
        # generate() must run with synced_gpus (every forward gathers parameters, and ranks stop at
        # different lengths). transformers' global ZeRO-3 switch (HfDeepSpeedConfig) would give that
        # but also make every later from_pretrained (the HF reasoner) load partitioned; this flag,
        # which transformers reads for FSDP, turns on the synced loop for this model only.
        model._is_fsdp_managed_module = True
    return engine, optimizer


def _gather_lm_head_with_decoder(engine) -> None:
    """ZeRO-3: gather lm_head.weight whenever the decoder (`model.model`) runs, and keep it gathered.

    The loss path reads `lm_head.weight` after `model.model(...)` returns, outside any module's
    forward, where ZeRO-3 would hand it an empty partition. `register_external_parameter` is
    DeepSpeed's hook for a tensor used outside its owner: it is fetched with the decoder and not
    released at the decoder's end (the step re-partitions it), its gradient and Adam state stay
    partitioned.
    """
    from deepspeed.runtime.zero.partition_parameters import register_external_parameter
    module = engine.module
    register_external_parameter(module.model, module.lm_head.weight)
    # what DeepSpeed's own dangling-parameter detection also sets: do not release it after a module's forward
    module.lm_head.weight.is_external_param = True


def unwrap(model) -> torch.nn.Module:
    """The HF module itself (DeepSpeed's engine holds it as .module; FSDP2 shards it in place)."""
    return model.module if is_deepspeed(model) else model


def backward(model, loss: torch.Tensor, last: bool) -> None:
    """Accumulate one micro-batch's gradient; `last` marks the mini-batch's final micro-batch."""
    if is_deepspeed(model):
        # The loss path calls the HF module, not the engine's forward, so do what that forward does
        # first: without it ZeRO-3 never advances its micro-step and each micro-batch's gradient
        # overwrites the previous one instead of adding to it.
        model.optimizer.clear_backward_seen_flag()
        model.set_gradient_accumulation_boundary(last)
        model.backward(loss)
        return
    loss.backward()


def clip_grad_norm(model, max_norm: float) -> float:
    """Clip to max_norm and return the global gradient norm before clipping.

    DeepSpeed clips inside its step (gradient_clipping = train.grad_clip); here its norm is only
    measured, from the reduced gradient partitions, so the loop can skip a non-finite step.
    """
    if is_deepspeed(model):
        from deepspeed.runtime.utils import combine_grad_norm_groups
        zero = model.optimizer
        if hasattr(zero, "scaled_global_norm"):  # ZeRO 1/2
            norm = zero.scaled_global_norm()
        else:  # ZeRO-3
            norm = combine_grad_norm_groups(zero._get_norm_groups())
        norm = float(norm)
        return norm if norm >= 0 else float("nan")  # DeepSpeed reports a non-finite norm as -1
    params = [p for p in model.parameters() if p.grad is not None]
    if not params:
        return 0.0
    norm = torch.nn.utils.clip_grad_norm_(params, max_norm)
    if hasattr(norm, "full_tensor"):  # DTensor under FSDP2
        norm = norm.full_tensor()
    return float(norm)


def step(model, optimizer: torch.optim.Optimizer) -> None:
    if is_deepspeed(model):
        model.step()
        return
    optimizer.step()


def zero_grad(model, optimizer: torch.optim.Optimizer) -> None:
    """Drop all gradients, including DeepSpeed's reduced partitions (a skipped step must not leak into the next)."""
    optimizer.zero_grad(set_to_none=True)
    if is_deepspeed(model):
        model.optimizer.zero_grad(set_to_none=True)
        avg = getattr(model.optimizer, "averaged_gradients", None)
        if isinstance(avg, dict):
            for k in avg:
                avg[k] = None


def _zero3(model) -> bool:
    return is_deepspeed(model) and model.zero_optimization_stage() == 3


def full_state_items(model, bucket_mb: int = 512) -> Iterator[tuple[str, torch.Tensor]]:
    """Full (unsharded) parameters and buffers with their HF names, gathered lazily.

    A collective on every rank under FSDP2 (one all-gather per tensor) and ZeRO-3 (one per ~bucket_mb
    of parameters), so every rank must consume the iterator to the end, in the same order. Only one
    gathered bucket need be alive at a time: a consumer that pushes as it goes holds at most that.
    """
    module = unwrap(model)
    if _zero3(model):
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
    else:
        for name, p in module.named_parameters():
            t = p.detach()
            if hasattr(t, "full_tensor"):
                t = t.full_tensor()
            yield name, t
    for name, b in module.named_buffers():
        if name.endswith("inv_freq"):
            continue
        yield name, b.detach()


def push_weights(engine, model, bucket_mb: int) -> int:
    """Gathered full weights into the captioner engine, in buckets of whole layers when the engine
    takes them (vLLM), so a rank holds one gathered bucket at a time; returns the bucket count."""
    items = full_state_items(model, bucket_mb)
    if hasattr(engine, "push_weights_bucketed"):
        return engine.push_weights_bucketed(items, bucket_mb)
    engine.push_weights(items)  # HF engine: shares the trainer's module, nothing is consumed
    return 0


# ----------------------------------------------------------------------------- GPU memory

def trainer_bytes_per_rank(model, cfg, with_ref: bool) -> dict[str, float]:
    """Estimated GPU bytes per rank of the trainer's parameters, gradients and AdamW state.

    FSDP2 shards all three in fp32 (`wrap` keeps fp32 masters); ZeRO-2 keeps full 16-bit
    parameters and partitions gradients and the fp32 master + moments; ZeRO-3 partitions all.
    The frozen reference is FSDP2-sharded, or replicated under DeepSpeed. Activations are not counted.
    """
    W = world_size()
    n_train = sum(getattr(p, "ds_numel", p.numel()) for p in model.parameters() if p.requires_grad)
    n_all = sum(getattr(p, "ds_numel", p.numel()) for p in model.parameters())  # DTensor.numel() is global
    e = torch.finfo(getattr(torch, cfg.model.dtype)).bits // 8
    if _uses_deepspeed(cfg):
        stage = deepspeed_config(cfg)["zero_optimization"]["stage"]
        offload = "offload_optimizer" in deepspeed_config(cfg)["zero_optimization"]
        params = n_all * e / (W if stage == 3 else 1)
        grads = n_train * e / W
        optim = 0.0 if offload else n_train * (4 + 8 if e < 4 else 8) / W
        ref = n_all * e if with_ref else 0.0
    else:  # fp32 master shards, fp32 gradients and moments (see `wrap`)
        params = n_all * 4 / W
        grads = n_train * 4 / W
        optim = n_train * 8 / W
        ref = n_all * e / W if with_ref else 0.0
    return {"params": params, "grads": grads, "optimizer": optim, "ref": ref}


def check_memory(model, cfg, dev: torch.device, with_ref: bool) -> None:
    """Fail at start-up, naming the settings, when engines + trainer cannot fit on one GPU.

    Two moments must fit: the engines awake (their gpu_memory_utilization fractions, which vLLM
    reserves of the whole device) next to the trainer's resident parameters (and optimizer state
    unless dist.offload_optimizer moves it out), and the training step with everything on the device.
    """
    if dev.type != "cuda":
        return
    total = torch.cuda.get_device_properties(dev).total_memory
    need = trainer_bytes_per_rank(model, cfg, with_ref)
    engines = (cfg.rollout.captioner_gpu_fraction + cfg.rollout.reasoner_gpu_fraction) * total
    resident = need["params"] + need["ref"] + (0.0 if cfg.dist.offload_optimizer else need["optimizer"])
    step_need = sum(need.values())
    gib = 2 ** 30
    detail = ", ".join(f"{k} {v / gib:.1f}" for k, v in need.items())
    if engines + resident > 0.95 * total:
        raise ValueError(
            f"rollout.captioner_gpu_fraction + rollout.reasoner_gpu_fraction: engines {engines / gib:.1f} GiB + "
            f"trainer resident {resident / gib:.1f} GiB ({detail} GiB per rank) > 95% of the "
            f"{total / gib:.1f} GiB device; lower the fractions, enable dist.offload_optimizer or use more ranks")
    if step_need > 0.9 * total:
        raise ValueError(
            f"dist.backend: the training step needs about {step_need / gib:.1f} GiB per rank ({detail}) of "
            f"{total / gib:.1f} GiB before activations; use more ranks or ZeRO-3 / optimizer offload")
    log.info("memory estimate per rank: engines %.1f GiB, trainer %s GiB, device %.1f GiB",
             engines / gib, detail, total / gib)


def log_memory(tag: str, metrics: dict | None = None) -> None:
    """Allocated / reserved GPU memory after a sleep, wake or step (rank 0; no-op without a GPU)."""
    if not torch.cuda.is_available() or rank() != 0:
        return
    alloc, reserved = torch.cuda.memory_allocated() / 2 ** 30, torch.cuda.memory_reserved() / 2 ** 30
    log.info("memory after %s: allocated %.2f GiB, reserved %.2f GiB", tag, alloc, reserved)
    if metrics is not None:
        metrics[f"mem_{tag}_alloc_gb"] = alloc
        metrics[f"mem_{tag}_reserved_gb"] = reserved


# ----------------------------------------------------------------------------- offload

def offload_optimizer(optimizer, cfg) -> None:
    """Move Adam moments to CPU while the engines hold the GPU (no-op on CPU).

    Under DeepSpeed the optimizer state lives where its config puts it (offload_optimizer), so this
    does nothing there.
    """
    if not cfg.dist.offload_optimizer or not torch.cuda.is_available() or _uses_deepspeed(cfg):
        return
    for state in optimizer.state.values():
        for k, v in state.items():
            if torch.is_tensor(v) and v.is_cuda:
                state[k] = v.to("cpu", non_blocking=True).pin_memory() if v.dim() else v.cpu()
    torch.cuda.synchronize()


def reload_optimizer(optimizer, cfg) -> None:
    if not cfg.dist.offload_optimizer or not torch.cuda.is_available() or _uses_deepspeed(cfg):
        return
    dev = torch.device("cuda", torch.cuda.current_device())
    for group in optimizer.param_groups:
        for p in group["params"]:
            state = optimizer.state.get(p, {})
            for k, v in state.items():
                if torch.is_tensor(v) and not v.is_cuda and k != "step":
                    state[k] = v.to(dev, non_blocking=True)


# ----------------------------------------------------------------------------- checkpoints

def rng_state() -> dict:
    state = {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(out_dir: Path, step: int, model, optimizer, scheduler, data_state: dict, keep: int) -> Path:
    """Write to `step_N.tmp`, then rename: a checkpoint folder that exists is complete."""
    ckpt_root = out_dir / "checkpoints"
    final = ckpt_root / f"step_{step:06d}"
    tmp = ckpt_root / f"step_{step:06d}.tmp"
    if rank() == 0:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    barrier()
    save_model_and_optimizer(model, optimizer, tmp)
    if rank() == 0:
        torch.save({"step": step, "scheduler": scheduler.state_dict(), "data": data_state}, tmp / "trainer.pt")
    torch.save(rng_state(), tmp / f"rng_rank{rank()}.pt")
    barrier()
    if rank() == 0:
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
        done = sorted(p for p in ckpt_root.glob("step_*") if not p.name.endswith(".tmp"))
        for old in done[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
    barrier()
    return final


def find_checkpoint(out_dir: Path, resume: str) -> Path | None:
    if resume == "none":
        return None
    if resume != "auto":
        path = Path(resume)
        if not (path / "trainer.pt").exists():
            raise FileNotFoundError(f"run.resume: {path} is not a complete checkpoint (no trainer.pt)")
        return path
    done = sorted(p for p in (out_dir / "checkpoints").glob("step_*")
                  if not p.name.endswith(".tmp") and (p / "trainer.pt").exists())
    return done[-1] if done else None


def save_model_and_optimizer(model, optimizer, path: Path) -> None:
    """Every rank calls this. Sharded runs write sharded state (DCP for FSDP2, the engine's own for
    DeepSpeed), so a resume needs the same world size; `export` writes the portable full model."""
    if is_deepspeed(model):
        model.save_checkpoint(str(path / "deepspeed"), tag="state", save_latest=False)
        return
    if is_dist():
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import get_state_dict
        msd, osd = get_state_dict(model, optimizer)
        dcp.save({"model": msd, "optim": osd}, checkpoint_id=str(path / "dcp"))
        return
    from safetensors.torch import save_file
    state = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    save_file(_dedup_shared(state), str(path / "model.safetensors"))
    torch.save(optimizer.state_dict(), path / "optimizer.pt")


def load_model_and_optimizer(model, optimizer, path: Path) -> None:
    if is_deepspeed(model):
        if not (path / "deepspeed").exists():
            raise FileNotFoundError(f"run.resume: {path} holds no DeepSpeed state (was it written by another backend?)")
        load_path, _ = model.load_checkpoint(str(path / "deepspeed"), tag="state", load_optimizer_states=True,
                                             load_lr_scheduler_states=False)
        if load_path is None:
            raise ValueError(f"run.resume: DeepSpeed could not load {path / 'deepspeed'}")
        return
    if is_dist():
        if not (path / "dcp").exists():
            raise FileNotFoundError(f"run.resume: {path} holds no sharded (dcp) state; it was written by a "
                                    "single-process or DeepSpeed run")
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict
        msd, osd = get_state_dict(model, optimizer)
        state = {"model": msd, "optim": osd}
        dcp.load(state, checkpoint_id=str(path / "dcp"))
        set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"])
        return
    from safetensors.torch import load_file
    missing, unexpected = model.load_state_dict(load_file(str(path / "model.safetensors")), strict=False)
    bad = [k for k in missing if k not in _tied_names(model)]
    if bad or unexpected:
        raise ValueError(f"checkpoint {path}: missing {bad[:5]}, unexpected {unexpected[:5]}")
    optimizer.load_state_dict(torch.load(path / "optimizer.pt", weights_only=False))


def _tied_names(model) -> set[str]:
    seen, tied = {}, set()
    for name, t in model.state_dict(keep_vars=True).items():
        key = t.data_ptr()
        if key in seen:
            tied.add(name)
        seen.setdefault(key, name)
    return tied


def _dedup_shared(state: dict) -> dict:
    seen, out = set(), {}
    for k, v in state.items():
        if v.data_ptr() in seen:
            continue
        seen.add(v.data_ptr())
        out[k] = v
    return out


def export(model, tokenizer, image_processor, out: Path) -> None:
    """The trained captioner as safetensors + tokenizer + image processor (vLLM/transformers load it)."""
    state = {name: t.cpu() for name, t in full_state_items(model)}
    if rank() != 0:
        return
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    unwrap(model).save_pretrained(tmp, state_dict=state, safe_serialization=True)
    tokenizer.save_pretrained(tmp)
    image_processor.save_pretrained(tmp)
    shutil.rmtree(out, ignore_errors=True)
    os.replace(tmp, out)
