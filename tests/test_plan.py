"""`racro-fast plan`: the shipped GPU configs pass the rehearsal on one node of 8 x 80 GB, and a
config that breaks a rule is refused in one line naming the setting (exit 2)."""
from __future__ import annotations

import os
from pathlib import Path

import pytest

from racro_fast.cli import main

ROOT = Path(__file__).resolve().parent.parent
SIZES = str(Path(__file__).resolve().parent / "model_configs")
GPU_CONFIGS = sorted(p for p in (ROOT / "configs").glob("*.yaml") if p.name != "demo_cpu.yaml")


def plan(capsys, *args: str) -> tuple[int, str, str]:
    before = {k: os.environ.get(k) for k in ("WORLD_SIZE", "LOCAL_WORLD_SIZE")}
    rc = main(["plan", "--model-configs", SIZES, *args])
    out = capsys.readouterr()
    assert {k: os.environ.get(k) for k in before} == before, "the plan left the launched job's sizes in this process"
    return rc, out.out, out.err


@pytest.mark.parametrize("path", GPU_CONFIGS, ids=lambda p: p.stem)
def test_shipped_configs_pass_on_8_h100(path, capsys):
    rc, out, err = plan(capsys, "--config", str(path))
    assert rc == 0 and err == "", err
    assert out.rstrip().endswith("every check passed"), out
    for line in ("start reasoner", "start captioner", "vLLM's check", "sleep    reasoner  level 1",
                 "push", "captions", "answers", "update", "dist.timeout_s 1800 s", "rollout.reasoner_timeout"):
        assert line in out, f"{line!r} missing from the plan:\n{out}"
    assert "REFUSED" not in out


@pytest.mark.parametrize("args, field", [
    # vLLM's start-up check: 95% of the device cannot be free beside the trainer's parameters
    (["rollout.reasoner_gpu_fraction=0.95"], "rollout.reasoner_gpu_fraction: the reasoner engine starts with"),
    # the fraction does not hold the engine's weights and KV cache
    (["rollout.captioner_gpu_fraction=0.2"], "rollout.captioner_gpu_fraction: 0.2 x 75 GiB"),
    # a collective timeout shorter than the reasoner phase another rank may wait for
    (["dist.timeout_s=300"], "dist.timeout_s: 300 s does not cover"),
    # a rank count the step's questions do not divide over
    (["--nodes", "3"], "train.questions_per_step: 256 does not divide over 24 ranks"),
    # one GPU cannot hold a 7B captioner's update
    (["--gpus", "1", "dist.offload_optimizer=false"], "rollout.captioner_gpu_fraction: captions phase"),
])
def test_a_config_that_breaks_a_rule_is_refused(args, field, capsys):
    options = [a for a in args if a.startswith("--") or a.isdigit()]
    overrides = [a for a in args if a not in options]
    rc, out, err = plan(capsys, "--config", str(ROOT / "configs" / "qwen25vl_7b_r1_7b.yaml"), *options, *overrides)
    assert rc == 2, (rc, out, err)
    assert err.startswith(f"racro-fast: error: {field}") and err.count("\n") == 1, err


def test_a_model_without_its_config_is_named(capsys, tmp_path):
    rc, _, err = plan(capsys, "--config", str(ROOT / "configs" / "qwen25vl_7b_r1_7b.yaml"), "--model-configs",
                      str(tmp_path))
    assert rc == 2 and err.startswith("racro-fast: error: --model-configs: no ") and "Qwen2.5-VL-7B-Instruct" in err, err
