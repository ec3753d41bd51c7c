"""Process groups, model wrapping (FSDP2), full-weight gathering, offload and checkpoints.

Everything here also works in one plain process (world size 1, no process group), which is how the
CPU demo and most tests run. Under `torchrun` the policy is sharded with FSDP2 (`fully_shard` per
decoder layer and vision block, bf16 compute with fp32 gradient reduction).
"""
from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Iterator

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
    blocks = list(inner.language_model.layers)
    if hasattr(inner, "visual"):
        blocks += list(inner.visual.blocks)
    return blocks


def wrap(model, dev: torch.device, cfg) -> torch.nn.Module:
    """Move to the device; under torchrun with world size > 1 shard with FSDP2 (or DeepSpeed)."""
    model.to(dev)
    if world_size() == 1:
        return model
    if cfg.dist.backend == "deepspeed":
        raise NotImplementedError("dist.backend: deepspeed wrapping is not available in this build; use fsdp2")
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
    mp = MixedPrecisionPolicy(param_dtype=getattr(torch, cfg.model.dtype), reduce_dtype=torch.float32)
    for block in _blocks(model):
        fully_shard(block, mp_policy=mp)
    fully_shard(model, mp_policy=mp)
    return model


def wrap_frozen(model, dev: torch.device, cfg) -> torch.nn.Module:
    return wrap(model, dev, cfg)


def unwrap(model) -> torch.nn.Module:
    return model


def clip_grad_norm(model, max_norm: float) -> float:
    params = [p for p in model.parameters() if p.grad is not None]
    if not params:
        return 0.0
    norm = torch.nn.utils.clip_grad_norm_(params, max_norm)
    if hasattr(norm, "full_tensor"):  # DTensor under FSDP2
        norm = norm.full_tensor()
    return float(norm)


def full_state_items(model, bucket_mb: int = 512) -> Iterator[tuple[str, torch.Tensor]]:
    """Full (unsharded) parameters with their HF names, gathered lazily one tensor at a time."""
    for name, p in model.named_parameters():
        t = p.detach()
        if hasattr(t, "full_tensor"):
            t = t.full_tensor()
        yield name, t
    for name, b in model.named_buffers():
        if name.endswith("inv_freq"):
            continue
        yield name, b.detach()


# ----------------------------------------------------------------------------- offload

def offload_optimizer(optimizer, cfg) -> None:
    """Move Adam moments to CPU while the engines hold the GPU (no-op on CPU)."""
    if not cfg.dist.offload_optimizer or not torch.cuda.is_available():
        return
    for state in optimizer.state.values():
        for k, v in state.items():
            if torch.is_tensor(v) and v.is_cuda:
                state[k] = v.to("cpu", non_blocking=True).pin_memory() if v.dim() else v.cpu()
    torch.cuda.synchronize()


def reload_optimizer(optimizer, cfg) -> None:
    if not cfg.dist.offload_optimizer or not torch.cuda.is_available():
        return
    dev = torch.device("cuda", torch.cuda.current_device())
    for group in optimizer.param_groups:
        for p in group["params"]:
            state = optimizer.state.get(p, {})
            for k, v in state.items():
                if torch.is_tensor(v) and not v.is_cuda and k != "step":
                    state[k] = v.to(dev, non_blocking=True)


# ----------------------------------------------------------------------------- checkpoints

def save_model_and_optimizer(model, optimizer, path: Path) -> None:
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
    if is_dist():
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
    import shutil
    shutil.rmtree(tmp, ignore_errors=True)
    unwrap(model).save_pretrained(tmp, state_dict=state, safe_serialization=True)
    tokenizer.save_pretrained(tmp)
    image_processor.save_pretrained(tmp)
    shutil.rmtree(out, ignore_errors=True)
    os.replace(tmp, out)
