"""Checkpoints, RNG state, the run's lock on its folder, and export.

    lock = lock_output_dir(out_dir)                                          # rank 0, for the run's life
    save(out_dir, step, backend, model, optimizer, scheduler, extra, keep)   # every rank calls it
    ckpt = find(out_dir, cfg.run.resume)                                     # newest complete, verified one
    state = load(ckpt, backend, model, optimizer, scheduler)                 # model, optimizer, RNG, step
    export(backend, model, tokenizer, image_processor, out_dir / "export")  # portable safetensors

A checkpoint is written to `step_N.tmp`: the model and optimizer state through torch's distributed
checkpoint (DCP: every backend but DeepSpeed, sharded or not, so that a run saved on N ranks
resumes on M), `trainer.pt` (step, scheduler, the data streams of every rank, the world size) and
each rank's RNG state; then `manifest.json` (every file's name, size and CRC-32), every file and
folder fsynced, and the rename to `step_N` marks it complete. A resume verifies the manifest: a
damaged checkpoint (a file truncated or missing) is passed over with one warning naming the file,
for the previous complete one. A save that fails (a full disk) leaves every earlier checkpoint as it
was and stops the run with one line.

Loading runs no code: `trainer.pt` and the RNG files hold tensors and plain types and are read with
`torch.load(weights_only=True)`; DCP's metadata is unpickled with only its own classes allowed, and
its non-tensor items with weights_only. A checkpoint is data, not a program.

What a resume keeps: on the same world size, everything (each rank's RNG, its place in the data),
so the run continues as if never stopped. On another world size: the model, optimizer and
scheduler state exactly (DCP reshards), the data from the same global position (no row seen twice
or left out: `data.RowStream.resharded`), and RNG re-derived from (seed, step, rank), since one
rank's generator state has no counterpart among M ranks. DeepSpeed checkpoints resume on their own
world size only.
"""
from __future__ import annotations

import contextlib
import datetime
import errno
import fcntl
import io
import json
import logging
import os
import pickle
import random
import re
import shutil
import socket
import zlib
from pathlib import Path

import numpy as np
import torch

from racro_fast import dist
from racro_fast.config import ConfigError

log = logging.getLogger("racro_fast.checkpoint")

MANIFEST = "manifest.json"
LOCK = "run.lock"


class CheckpointError(RuntimeError):
    """A checkpoint could not be written; the earlier ones are untouched."""


# ----------------------------------------------------------------------------- one run per folder

class RunLock:
    """An exclusive OS lock (flock) on `out_dir/run.lock`, held for the run's life: the kernel drops
    it when the process ends, however it ends, so a crashed run leaves nothing to clean up."""

    def __init__(self, out_dir: Path) -> None:
        out_dir.mkdir(parents=True, exist_ok=True)
        self.path = out_dir / LOCK
        self.fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(self.fd, 4096, 0).decode(errors="replace").strip() or "unknown"
            os.close(self.fd)
            raise ConfigError(f"run.output_dir: {out_dir} is in use by another run ({holder}); stop it or "
                              "choose another run.output_dir") from None
        info = (f"host {socket.gethostname()}, pid {os.getpid()}, "
                f"started {datetime.datetime.now().isoformat(timespec='seconds')}")
        os.ftruncate(self.fd, 0)
        os.pwrite(self.fd, info.encode(), 0)

    def release(self) -> None:
        if self.fd >= 0:
            fcntl.flock(self.fd, fcntl.LOCK_UN)
            os.close(self.fd)
            self.fd = -1

    def __enter__(self) -> "RunLock":
        return self

    def __exit__(self, *exc) -> None:
        self.release()


def lock_output_dir(out_dir: Path):
    """Rank 0 locks the run's folder (a context manager on every rank); every rank fails together
    when another run holds it."""
    lock = dist.fail_together("locking run.output_dir", lambda: RunLock(out_dir) if dist.rank() == 0 else None)
    return lock if lock is not None else contextlib.nullcontext()


# ----------------------------------------------------------------------------- RNG, as plain data

def rng_state() -> dict:
    """This process's generators as tensors and plain types (loadable with weights_only=True)."""
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    version, internal, gauss_next = random.getstate()
    state = {"torch": torch.get_rng_state(),
             "numpy": {"kind": kind, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                       "has_gauss": int(has_gauss), "gauss": float(gauss)},
             "python": {"version": version, "internal": list(internal), "gauss_next": gauss_next}}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    n = state["numpy"]
    np.random.set_state((n["kind"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["gauss"]))
    p = state["python"]
    random.setstate((p["version"], tuple(p["internal"]), p["gauss_next"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def seed_everything(seed: int) -> None:
    for seed_fn in (torch.manual_seed, np.random.seed, random.seed):
        seed_fn(seed % (1 << 32))


# ----------------------------------------------------------------------------- DCP that runs no code

class _MetadataUnpickler(pickle.Unpickler):
    """DCP's `.metadata` is a pickle: only DCP's own metadata classes, torch sizes, dtypes and layouts
    and paths may appear in it. Anything else (a callable that would run on load) is refused."""

    OWN = ("torch.distributed.checkpoint.metadata", "torch.distributed.checkpoint.filesystem")
    ALLOWED = {("torch", "Size"), ("torch.serialization", "_get_layout"), ("pathlib", "PosixPath"),
               ("pathlib", "PurePosixPath"), ("collections", "OrderedDict")}

    def find_class(self, module: str, name: str):
        obj = super().find_class(module, name)
        if (module, name) in self.ALLOWED or (module == "torch" and isinstance(obj, torch.dtype)):
            return obj
        if module in self.OWN and isinstance(obj, type):
            return obj
        raise ConfigError(f"run.resume: checkpoint metadata refers to {module}.{name}, which a checkpoint "
                          "may not hold: refusing to load it (a checkpoint is data, not a program)")


def _reader(path: Path):
    from torch.distributed.checkpoint import FileSystemReader

    class SafeReader(FileSystemReader):
        def read_metadata(self, *args, **kwargs):
            with open(Path(self.path) / ".metadata", "rb") as f:
                metadata = _MetadataUnpickler(f).load()
            from torch.distributed.checkpoint.metadata import StorageMeta
            if getattr(metadata, "storage_meta", None) is None:
                metadata.storage_meta = StorageMeta()
            metadata.storage_meta.load_id = self.load_id
            return metadata
    return SafeReader(str(path))


def _planner():
    from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner

    class SafePlanner(DefaultLoadPlanner):
        """DCP's default, with its non-tensor items (optimizer hyper-parameters) read weights_only."""
        def load_bytes(self, read_item, value: io.BytesIO) -> None:
            data = torch.load(value, weights_only=True)
            if self.flatten_state_dict:
                from torch.distributed.checkpoint._traverse import set_element  # what DCP's own planner uses
                set_element(self.original_state_dict, self.mappings[read_item.dest_index.fqn], data)
            else:
                self.state_dict[read_item.dest_index.fqn] = data
    return SafePlanner()


def dcp_save(state: dict, path: Path) -> None:
    import torch.distributed.checkpoint as dcp
    with _single_process_quiet():
        dcp.save(state, checkpoint_id=str(path))


def dcp_load(state: dict, path: Path) -> None:
    """Load `state` in place from a DCP folder: any world size, no code run."""
    import torch.distributed.checkpoint as dcp
    with _single_process_quiet():
        dcp.load(state, storage_reader=_reader(path), planner=_planner())


def stored_tensors(ckpt: Path, prefix: str) -> dict[str, torch.Tensor]:
    """Every tensor of a checkpoint's DCP state whose key starts with `prefix` ("model.": the weights by
    parameter name; "optim.state.": the optimizer's moments), whole, in this process, prefix dropped."""
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata
    md = _reader(ckpt / "dcp").read_metadata()
    state = {k: torch.empty(tuple(m.size), dtype=m.properties.dtype) for k, m in md.state_dict_metadata.items()
             if k.startswith(prefix) and isinstance(m, TensorStorageMetadata)}
    dcp_load(state, ckpt / "dcp")
    return {k[len(prefix):]: v for k, v in state.items()}


def model_weights(ckpt: Path) -> dict[str, torch.Tensor]:
    """The full model weights of a checkpoint, in this process, by parameter name."""
    return stored_tensors(ckpt, "model.")


@contextlib.contextmanager
def _single_process_quiet():
    """DCP warns, on every call without a process group, that it assumes one process: it is meant."""
    import warnings
    with warnings.catch_warnings():
        if not dist.is_dist():
            warnings.filterwarnings("ignore", message="torch.distributed is disabled, unavailable or uninitialized")
        yield


# ----------------------------------------------------------------------------- manifest

def _crc32(path: Path) -> int:
    crc = 0
    with open(path, "rb") as f:
        while chunk := f.read(16 << 20):
            crc = zlib.crc32(chunk, crc)
    return crc


def _files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.is_file() and p.name != MANIFEST)


def _mine(items: list) -> list:
    """This rank's share of a list (the work of checksumming is split over the ranks)."""
    return items[dist.rank()::dist.world_size()]


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_manifest(folder: Path) -> None:
    """Every file's size and CRC-32 (each rank checksums its share), fsynced, then manifest.json
    written and fsynced last, by rank 0."""
    files = _files(folder)
    mine = {}
    for p in _mine(files):
        _fsync(p)
        mine[str(p.relative_to(folder))] = {"bytes": p.stat().st_size, "crc32": _crc32(p)}
    entries = {k: v for part in dist.all_gather_object(mine) for k, v in part.items()}
    if dist.rank() == 0:
        for d in {p.parent for p in files} | {folder}:
            _fsync(d)
        tmp = folder / (MANIFEST + ".tmp")
        tmp.write_text(json.dumps({"files": dict(sorted(entries.items()))}, indent=1))
        _fsync(tmp)
        os.replace(tmp, folder / MANIFEST)
        _fsync(folder)


def damage(folder: Path) -> str | None:
    """Why a checkpoint folder cannot be used (its manifest missing, a file missing, truncated or
    changed), or None; each rank checks its share of the files, every rank gets the answer."""
    why = None
    manifest = folder / MANIFEST
    if not manifest.is_file():
        why = f"{manifest} is missing (the checkpoint was never completed)"
        entries = {}
    else:
        try:
            entries = json.loads(manifest.read_text())["files"]
        except (ValueError, KeyError) as e:
            why, entries = f"{manifest} is unreadable ({e})", {}
    for name in _mine(sorted(entries)):
        p, want = folder / name, entries[name]
        if why is not None:
            break
        if not p.is_file():
            why = f"{p} is missing"
        elif p.stat().st_size != want["bytes"]:
            why = f"{p} has {p.stat().st_size} bytes, the manifest says {want['bytes']}"
        elif _crc32(p) != want["crc32"]:
            why = f"{p} does not match its checksum"
    found = [w for w in dist.all_gather_object(why) if w]
    return found[0] if found else None


# ----------------------------------------------------------------------------- save, find, load

def save(out_dir: Path, step: int, backend, model, optimizer, scheduler, extra: dict, keep: int) -> Path:
    """Write `step_N.tmp`, its manifest last, then rename; keep the newest `keep` checkpoints. A
    failed write removes the partial folder and raises CheckpointError on every rank."""
    ckpt_root = out_dir / "checkpoints"
    final = ckpt_root / f"step_{step:06d}"
    tmp = ckpt_root / f"step_{step:06d}.tmp"
    if dist.rank() == 0:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    dist.barrier()

    def write_own() -> None:
        if dist.rank() == 0:
            torch.save({"step": step, "world": dist.world_size(), "backend": backend.name,
                        "scheduler": scheduler.state_dict(), **extra}, tmp / "trainer.pt")
        torch.save(rng_state(), tmp / f"rng_rank{dist.rank()}.pt")

    try:
        backend.save(model, optimizer, tmp)  # DCP and DeepSpeed tell every rank of a rank's failure
        dist.fail_together(f"writing checkpoint {tmp}", write_own)
        dist.fail_together(f"writing the manifest of {tmp}", write_manifest, tmp)
    except (OSError, RuntimeError) as e:
        if dist.rank() == 0:
            shutil.rmtree(tmp, ignore_errors=True)
        why = os.strerror(e.errno) if isinstance(e, OSError) and e.errno else str(e).splitlines()[0]
        hint = " (the disk is full)" if isinstance(e, OSError) and e.errno == errno.ENOSPC else ""
        raise CheckpointError(f"checkpoint of step {step} could not be written to {tmp}: {why}{hint}; "
                              "the earlier checkpoints are untouched") from e
    dist.barrier()
    if dist.rank() == 0:
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
        _fsync(ckpt_root)
        done = sorted(p for p in ckpt_root.glob("step_*") if not p.name.endswith(".tmp"))
        for old in done[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
    dist.barrier()
    return final


def find(out_dir: Path, resume: str) -> Path | None:
    """run.resume: "none", "auto" (the newest complete and verified checkpoint under out_dir, if
    any; a damaged one is passed over with a warning) or a path (which must verify)."""
    if resume == "none":
        return None
    if resume != "auto":
        path = Path(resume)
        why = damage(path) if path.is_dir() else f"{path} is not a folder"
        if why:
            raise ConfigError(f"run.resume: {path} is not a complete checkpoint: {why}")
        return path
    done = sorted((p for p in (out_dir / "checkpoints").glob("step_*") if not p.name.endswith(".tmp")), reverse=True)
    for path in done:
        why = damage(path)
        if why is None:
            return path
        if dist.rank() == 0:
            log.warning("checkpoint %s is damaged and skipped: %s", path, why)
    return None


def _load_data(file: Path):
    """torch.load with weights_only: tensors and plain types; anything else is refused in one line."""
    try:
        return torch.load(file, weights_only=True)
    except pickle.UnpicklingError as e:
        found = re.search(r"(?:GLOBAL|global:?) ([\w.]+)", str(e))
        what = found.group(1) if found else "a pickled object"
        raise ConfigError(f"run.resume: {file} holds {what}, not only tensors and plain data: refusing to load it "
                          "(a checkpoint is data, not a program)") from None


def load(path: Path, backend, model, optimizer, scheduler) -> dict:
    """Restore model, optimizer, scheduler and the RNG; returns trainer.pt (step, world, loop state).
    On another world size the RNG is re-derived from (seed, step, rank) by the caller."""
    state = _load_data(path / "trainer.pt")
    if state.get("backend") == "deepspeed" and state["world"] != dist.world_size():
        raise ConfigError(f"run.resume: {path} was written by DeepSpeed on {state['world']} ranks; it resumes "
                          f"on {state['world']} ranks only, not {dist.world_size()} (dist.backend=fsdp2 "
                          "checkpoints reshard)")
    backend.load(model, optimizer, path)
    scheduler.load_state_dict(state["scheduler"])
    rng_file = path / f"rng_rank{dist.rank()}.pt"
    if state["world"] == dist.world_size() and rng_file.exists():
        set_rng_state(_load_data(rng_file))
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
