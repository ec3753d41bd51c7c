"""Checkpoints that are durable, verified and safe to load, and one run per output folder (one
process; the resharding and kill drills are in test_dist.py)."""
from __future__ import annotations

import errno
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from racro_fast import checkpoint
from racro_fast.config import ConfigError, load_config
from racro_fast.train import train

ROOT = Path(__file__).resolve().parent.parent


def cfg(out: Path, cap: Path, rsn: Path, steps: int, *extra: str):
    return load_config(ROOT / "configs" / "demo_cpu.yaml", [
        f"model.captioner={cap}", f"model.reasoner={rsn}", f"run.output_dir={out}", f"train.steps={steps}",
        "train.questions_per_step=2", "train.mini_batch=2", "train.micro_batch=4", "rollout.group_size=2",
        "rollout.max_caption_tokens=4", "rollout.max_reasoner_tokens=4", "data.synth_rows=16", "loss.kl_coef=0",
        "run.progress=false", "run.export=false", "run.save_every=1", "run.keep_checkpoints=5", *extra])


@pytest.fixture(scope="module")
def three_steps(tmp_path_factory, tiny_captioner_dir, tiny_reasoner_dir) -> Path:
    """A run of 3 steps with a checkpoint after each; tests copy it before they damage anything."""
    out = tmp_path_factory.mktemp("ckpt") / "run"
    train(cfg(out, tiny_captioner_dir, tiny_reasoner_dir, 3))
    return out


def copy_run(src: Path, dst: Path) -> Path:
    subprocess.run(["cp", "-a", str(src), str(dst)], check=True)
    return dst


def test_every_checkpoint_verifies(three_steps):
    ckpts = sorted((three_steps / "checkpoints").iterdir())
    assert [c.name for c in ckpts] == ["step_000001", "step_000002", "step_000003"]
    for c in ckpts:
        manifest = json.loads((c / "manifest.json").read_text())["files"]
        assert "trainer.pt" in manifest and any(name.startswith("dcp/") for name in manifest), manifest
        assert checkpoint.damage(c) is None
    assert checkpoint.find(three_steps, "auto") == ckpts[-1]


@pytest.mark.parametrize("harm", ["truncate", "remove"])
def test_a_damaged_newest_checkpoint_is_passed_over(harm, three_steps, tmp_path, caplog, tiny_captioner_dir,
                                                    tiny_reasoner_dir):
    out = copy_run(three_steps, tmp_path / "run")
    newest = out / "checkpoints" / "step_000003"
    victim = next(p for p in sorted((newest / "dcp").iterdir()) if p.suffix == ".distcp")
    if harm == "truncate":
        with open(victim, "r+b") as f:
            f.truncate(victim.stat().st_size // 2)
    else:
        victim.unlink()
    with caplog.at_level("WARNING", logger="racro_fast.checkpoint"):
        assert checkpoint.find(out, "auto") == out / "checkpoints" / "step_000002"
    warnings = [r.getMessage() for r in caplog.records if "damaged" in r.getMessage()]
    assert len(warnings) == 1 and str(victim) in warnings[0], warnings
    # the run resumes from step 2 and redoes step 3; the metrics hold each step once
    hist = train(cfg(out, tiny_captioner_dir, tiny_reasoner_dir, 4))["history"]
    assert [h["step"] for h in hist] == [3, 4]
    steps = [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3, 4], steps


def test_a_checkpoint_holding_code_is_refused(three_steps, tmp_path, tiny_captioner_dir, tiny_reasoner_dir):
    """A checkpoint from someone else is data: trainer.pt carrying a pickled callable (os.system) is
    refused with one line, even with a manifest that matches it, and nothing runs."""
    out = copy_run(three_steps, tmp_path / "run")
    newest = out / "checkpoints" / "step_000003"
    state = torch.load(newest / "trainer.pt", weights_only=True)
    marker = tmp_path / "ran"
    state["data"]["hook"] = os.system  # unpickling it would hand back the callable
    torch.save(state, newest / "trainer.pt")
    checkpoint.write_manifest(newest)  # as a tamperer would: the files verify
    assert checkpoint.damage(newest) is None
    rc = subprocess.run([sys.executable, "-P", "-m", "racro_fast.cli", "train", "--config",
                         str(ROOT / "configs" / "demo_cpu.yaml"),
                         *[a for a in _overrides(out, tiny_captioner_dir, tiny_reasoner_dir, 4)]],
                        capture_output=True, text=True, timeout=600)
    assert rc.returncode == 2, rc.stderr[-2000:]
    last = rc.stderr.strip().splitlines()[-1]
    assert last.startswith(f"racro-fast: error: run.resume: {newest / 'trainer.pt'} holds ") and "system" in last, last
    assert "refusing to load it" in last and not marker.exists()


def test_dcp_metadata_holding_code_is_refused(three_steps, tmp_path):
    import pickle
    out = copy_run(three_steps, tmp_path / "run")
    meta = out / "checkpoints" / "step_000003" / "dcp" / ".metadata"
    meta.write_bytes(pickle.dumps(os.system))
    with pytest.raises(ConfigError, match=r"^run.resume: checkpoint metadata refers to posix.system"):
        checkpoint.model_weights(out / "checkpoints" / "step_000003")


def _overrides(out: Path, cap: Path, rsn: Path, steps: int) -> list[str]:
    return [f"model.captioner={cap}", f"model.reasoner={rsn}", f"run.output_dir={out}", f"train.steps={steps}",
            "train.questions_per_step=2", "train.mini_batch=2", "train.micro_batch=4", "rollout.group_size=2",
            "rollout.max_caption_tokens=4", "rollout.max_reasoner_tokens=4", "data.synth_rows=16", "loss.kl_coef=0",
            "run.progress=false", "run.export=false", "run.save_every=1"]


def test_a_failed_save_leaves_the_earlier_checkpoints(three_steps, tmp_path, monkeypatch, tiny_captioner_dir,
                                                      tiny_reasoner_dir):
    """The disk fills while step 4's checkpoint is written: the run stops with one line, the partial
    folder is gone and steps 1-3 still verify."""
    out = copy_run(three_steps, tmp_path / "run")
    real_save = torch.save

    def full_disk(obj, f, *a, **kw):
        if str(f).endswith("trainer.pt"):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(f))
        return real_save(obj, f, *a, **kw)

    monkeypatch.setattr(checkpoint.torch, "save", full_disk)
    with pytest.raises(checkpoint.CheckpointError, match=r"checkpoint of step 4 could not be written .*No space left "
                       r"on device \(the disk is full\); the earlier checkpoints are untouched"):
        train(cfg(out, tiny_captioner_dir, tiny_reasoner_dir, 4))
    names = sorted(p.name for p in (out / "checkpoints").iterdir())
    assert names == ["step_000001", "step_000002", "step_000003"], names
    assert all(checkpoint.damage(out / "checkpoints" / n) is None for n in names)


def test_one_run_per_output_folder(tmp_path, tiny_captioner_dir, tiny_reasoner_dir):
    """While a run holds its folder, a second run on it stops at start-up naming the holder; once the
    holder dies (SIGKILL: nothing runs to clean up), the folder is free again."""
    out = tmp_path / "run"
    holder = subprocess.Popen([sys.executable, "-c", "import sys, time; from pathlib import Path; "
                               "from racro_fast.checkpoint import RunLock; RunLock(Path(sys.argv[1])); "
                               "print('held', flush=True); time.sleep(600)", str(out)],
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        from racro_fast.cli import main
        t0 = time.monotonic()
        rc = subprocess.run([sys.executable, "-P", "-m", "racro_fast.cli", "train", "--config",
                             str(ROOT / "configs" / "demo_cpu.yaml"), *_overrides(out, tiny_captioner_dir,
                                                                                   tiny_reasoner_dir, 1)],
                            capture_output=True, text=True, timeout=300)
        assert rc.returncode == 2, rc.stderr[-2000:]
        last = rc.stderr.strip().splitlines()[-1]
        assert last.startswith(f"racro-fast: error: run.output_dir: {out} is in use by another run (host ") \
            and f"pid {holder.pid}, started " in last, last
        assert time.monotonic() - t0 < 120 and not (out / "checkpoints").exists()
        del main
    finally:
        holder.kill()
        holder.wait()
    with checkpoint.RunLock(out):  # the kernel released the dead holder's lock
        pass
