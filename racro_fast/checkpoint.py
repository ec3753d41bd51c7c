"""Checkpoints, RNG state and export.

    save(out_dir, step, backend, model, optimizer, scheduler, extra, keep)   # every rank calls it
    ckpt = find(out_dir, cfg.run.resume)                                     # newest complete one
    extra = load(ckpt, backend, model, optimizer, scheduler)                 # model, optimizer, RNG, step
    export(backend, model, tokenizer, image_processor, out_dir / "export")  # portable safetensors

A checkpoint is written to `step_N.tmp` and renamed: a folder `step_N` that exists is complete,
so a run killed while saving resumes from the previous one. Model and optimizer state are the
backend's (sharded for FSDP2 and DeepSpeed: a resume needs the same backend and world size);
`trainer.pt` holds the step, the scheduler and the loop's own state (the data order); each rank
writes its RNG state, so a resumed run draws exactly what the straight run would have.
"""
from __future__ import annotations

import os
import random
import shutil
from pathlib import Path

import numpy as np
import torch

from racro_fast import dist
from racro_fast.config import ConfigError


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


def save(out_dir: Path, step: int, backend, model, optimizer, scheduler, extra: dict, keep: int) -> Path:
    """Write to `step_N.tmp`, then rename; keep the newest `keep` checkpoints."""
    ckpt_root = out_dir / "checkpoints"
    final = ckpt_root / f"step_{step:06d}"
    tmp = ckpt_root / f"step_{step:06d}.tmp"
    if dist.rank() == 0:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    dist.barrier()
    backend.save(model, optimizer, tmp)
    if dist.rank() == 0:
        torch.save({"step": step, "scheduler": scheduler.state_dict(), **extra}, tmp / "trainer.pt")
    torch.save(rng_state(), tmp / f"rng_rank{dist.rank()}.pt")
    dist.barrier()
    if dist.rank() == 0:
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
        done = sorted(p for p in ckpt_root.glob("step_*") if not p.name.endswith(".tmp"))
        for old in done[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
    dist.barrier()
    return final


def find(out_dir: Path, resume: str) -> Path | None:
    """run.resume: "none", "auto" (the newest complete checkpoint under out_dir, if any) or a path."""
    if resume == "none":
        return None
    if resume != "auto":
        path = Path(resume)
        if not (path / "trainer.pt").exists():
            raise ConfigError(f"run.resume: {path} is not a complete checkpoint (no trainer.pt)")
        return path
    done = sorted(p for p in (out_dir / "checkpoints").glob("step_*")
                  if not p.name.endswith(".tmp") and (p / "trainer.pt").exists())
    return done[-1] if done else None


def load(path: Path, backend, model, optimizer, scheduler) -> dict:
    """Restore model, optimizer, scheduler and this rank's RNG; returns trainer.pt (step, loop state)."""
    backend.load(model, optimizer, path)
    state = torch.load(path / "trainer.pt", weights_only=False)
    scheduler.load_state_dict(state["scheduler"])
    rng_file = path / f"rng_rank{dist.rank()}.pt"
    if rng_file.exists():
        set_rng_state(torch.load(rng_file, weights_only=False))
    return state


def export(backend, model, tokenizer, image_processor, out: Path) -> None:
    """The trained captioner as safetensors + tokenizer + image processor (vLLM and transformers load it)."""
    state = {name: t.cpu() for name, t in backend.full_state_items(model)}  # a collective: every rank
    if dist.rank() != 0:
        return
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    backend.module(model).save_pretrained(tmp, state_dict=state, safe_serialization=True)
    tokenizer.save_pretrained(tmp)
    image_processor.save_pretrained(tmp)
    shutil.rmtree(out, ignore_errors=True)
    os.replace(tmp, out)
