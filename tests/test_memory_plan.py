"""Every shipped GPU config fits 8 x 80 GB in every phase of a step, checked on CPU against the real
models' sizes (the architecture fields of their published config.json, in tests/model_configs)."""
from __future__ import annotations

from pathlib import Path

import pytest

from racro_fast import dist, parallel
from racro_fast.config import ConfigError, load_config

ROOT = Path(__file__).resolve().parent.parent
SIZES = Path(__file__).resolve().parent / "model_configs"
GPU_CONFIGS = sorted(p for p in (ROOT / "configs").glob("*.yaml") if p.name != "demo_cpu.yaml")
H100 = 80 * 10 ** 9  # bytes of an 80 GB H100 (79.6 GiB as torch reports it)


def plan_for(path: Path, world: int, monkeypatch, *overrides: str) -> tuple:
    monkeypatch.setattr(dist, "world_size", lambda: world)
    monkeypatch.setattr(dist, "local_world_size", lambda: min(world, 8))
    cfg = load_config(path, list(overrides))
    size = {name: parallel.ModelSize.from_config(SIZES / Path(getattr(cfg.model, name)).name)
            for name in ("captioner", "reasoner")}
    backend = parallel.FSDP2(cfg)  # what make_backend gives under torchrun with dist.backend=fsdp2
    return cfg, parallel.memory_plan(cfg, backend, size["captioner"], size["reasoner"], H100)


def table_row(path: Path, plan: dict) -> str:
    t = plan["trainer"]
    g = parallel.GIB
    return (f"| `{path.name}` | {(t['params'] + t['ref']) / g:.1f} | {plan['reasoner_start'] / g:.1f} | "
            f"{plan['captioner_start'] / g:.1f} | {plan['captions'] / g:.1f} | {plan['answers'] / g:.1f} | "
            f"{plan['update'] / g:.1f} | {plan['captioner_engine_need'] / g:.1f} | "
            f"{plan['reasoner_engine_need'] / g:.1f} | {plan['reasoner_sequences']} |")


def test_sizes_are_the_published_ones():
    counts = {p.name: parallel.ModelSize.from_config(p).params / 1e9 for p in SIZES.iterdir() if p.is_dir()}
    assert counts == pytest.approx({"Qwen2.5-VL-3B-Instruct": 3.75, "Qwen2.5-VL-7B-Instruct": 8.29,
                                    "DeepSeek-R1-Distill-Qwen-7B": 7.62, "DeepSeek-R1-Distill-Qwen-32B": 32.76},
                                   abs=0.01), counts


@pytest.mark.parametrize("path", GPU_CONFIGS, ids=lambda p: p.stem)
def test_shipped_config_fits_8_h100(path, monkeypatch, capsys):
    assert len(GPU_CONFIGS) == 3
    cfg, plan = plan_for(path, 8, monkeypatch)
    parallel.check_memory_plan(cfg, plan, H100)
    with capsys.disabled():  # the README's memory table
        print("\n" + table_row(path, plan))


def test_a_captioner_fraction_too_small_for_its_weights_is_refused(monkeypatch):
    """0.2 x 80 GB = 16 GB holds the 7B captioner's 16.6 GB of bf16 weights and no KV cache."""
    path = ROOT / "configs" / "qwen25vl_7b_r1_32b_tp4.yaml"
    cfg, plan = plan_for(path, 8, monkeypatch, "rollout.captioner_gpu_fraction=0.2")
    with pytest.raises(ConfigError, match=r"^rollout.captioner_gpu_fraction: 0.2 x 75 GiB"):
        parallel.check_memory_plan(cfg, plan, H100)


def test_one_gpu_cannot_train_a_7b_captioner(monkeypatch):
    path = ROOT / "configs" / "qwen25vl_7b_r1_7b.yaml"
    cfg, plan = plan_for(path, 1, monkeypatch, "dist.offload_optimizer=false")
    with pytest.raises(ConfigError, match=r"^rollout.captioner_gpu_fraction: captions phase|^dist.backend"):
        parallel.check_memory_plan(cfg, plan, H100)


def test_engine_starts_and_sleeping_engines_are_counted(monkeypatch):
    """At each engine start the device already holds the trainer's parameters and reference (and the
    sleeping reasoner, for the captioner); a sleeping engine keeps its context, graphs and buffers in
    every phase."""
    cfg, plan = plan_for(ROOT / "configs" / "qwen25vl_7b_r1_7b.yaml", 8, monkeypatch)
    t = plan["trainer"]
    held = t["params"] + t["ref"] + parallel.CUDA_CONTEXT
    assert plan["reasoner_start"] == pytest.approx(held)
    assert plan["captioner_start"] == pytest.approx(held + parallel.ENGINE_ASLEEP)
    assert plan["update"] == pytest.approx(sum(t.values()) + parallel.CUDA_CONTEXT + 2 * parallel.ENGINE_ASLEEP)


def test_vllm_start_check_refuses_a_fraction_the_held_memory_leaves_no_room_for(monkeypatch):
    """vLLM starts an engine only when free memory >= gpu_memory_utilization x total: 0.95 of the
    device cannot be free while the trainer holds its share."""
    cfg, plan = plan_for(ROOT / "configs" / "qwen25vl_7b_r1_7b.yaml", 8, monkeypatch, "rollout.reasoner_gpu_fraction=0.95")
    with pytest.raises(ConfigError, match=r"^rollout.reasoner_gpu_fraction: the reasoner engine starts with "):
        parallel.check_memory_plan(cfg, plan, H100)


def test_reasoner_requests_in_flight_follow_its_kv_cache(monkeypatch):
    """32B at TP4 x DP2 in 0.45 of 80 GB: each GPU keeps 36 GB - 16.4 GB of weights - overhead for KV
    cache; one request of 8192 + 512 + 8192 tokens, capped at rollout.max_model_len (16384), holds 64
    layers x 8 KV heads x 128 x 2 x 2 bytes a token over 4 GPUs. The cap per rank is the node's count
    over its 8 ranks, or the setting."""
    cfg, plan = plan_for(ROOT / "configs" / "qwen25vl_7b_r1_32b_tp4.yaml", 8, monkeypatch)
    size = parallel.ModelSize.from_config(SIZES / "DeepSeek-R1-Distill-Qwen-32B")
    per_gpu = 0.45 * H100 - size.params * 2 / 4 - parallel.ENGINE_OVERHEAD
    per_request = 64 * 8 * 128 * 2 * 2 * min(16384, 8192 + 512 + 8192) / 4
    assert plan["reasoner_sequences"] == int(per_gpu // per_request) * 2 > 0
    assert parallel.inflight_per_rank(cfg, plan["reasoner_sequences"], 8) == max(1, plan["reasoner_sequences"] // 8)
    cfg, _ = plan_for(ROOT / "configs" / "qwen25vl_7b_r1_32b_tp4.yaml", 8, monkeypatch, "rollout.reasoner_max_inflight=3")
    assert parallel.inflight_per_rank(cfg, plan["reasoner_sequences"], 8) == 3


# A fresh process, with keep_freed_host_memory or glibc's defaults: whether blocks of 4, 16 and 48 MB
# are mapped on their own (glibc flags such a chunk in its header) rather than served from the heap,
# then the resident memory with 48 MB freed in the heap, before and after release_host_memory.
_HOST_MEMORY = """
import ctypes, sys
from racro_fast import parallel
libc = ctypes.CDLL(None)
libc.malloc.restype, libc.malloc.argtypes, libc.free.argtypes = ctypes.c_void_p, [ctypes.c_size_t], [ctypes.c_void_p]
kept = parallel.keep_freed_host_memory() if sys.argv[1] == "keep" else None
def mapped(mb):
    p = libc.malloc(mb << 20)
    flag = bool(ctypes.c_size_t.from_address(p - 8).value & 2)  # IS_MMAPPED
    libc.free(p)
    return flag
placed = [mapped(mb) for mb in (4, 16, 48)]
rss = lambda: int(open("/proc/self/statm").read().split()[1]) * 4096 >> 20
blocks = [libc.malloc(8 << 20) for _ in range(6)]
for p in blocks:
    ctypes.memset(p, 1, 8 << 20)
for p in blocks:
    libc.free(p)
before = rss()
parallel.release_host_memory()
print(kept, *placed, before, rss())
"""


def _host_memory(mode: str, env: dict | None = None) -> list[str]:
    import os
    import subprocess
    import sys
    out = subprocess.run([sys.executable, "-c", _HOST_MEMORY, mode], capture_output=True, text=True, timeout=120,
                         env={**os.environ, **(env or {})})
    assert out.returncode == 0, out.stderr
    return out.stdout.split()


@pytest.mark.skipif(parallel._glibc() is None, reason="glibc's malloc only")
def test_host_memory_is_kept_in_the_heap_and_released_after_training():
    kept, *placed, before, after = _host_memory("keep")
    assert kept == "True"
    assert placed == ["False", "False", "True"], "blocks up to 32 MB from the heap, larger ones mapped"
    assert int(before) - int(after) >= 32, "48 MB freed and kept in the heap, returned by release_host_memory"


@pytest.mark.parametrize("env", [{"MALLOC_TRIM_THRESHOLD_": "1048576"},
                                 {"GLIBC_TUNABLES": "glibc.malloc.mmap_threshold=1048576"}])
def test_the_environments_malloc_thresholds_win(env):
    kept, *placed, _, _ = _host_memory("keep", env)
    assert kept == "False"
    assert placed[0] == "True", "the environment's 1 MB threshold maps a 4 MB block"
