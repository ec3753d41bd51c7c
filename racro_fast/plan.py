"""`racro-fast plan`: the rehearsal of a GPU run, on any machine, before paying for a node.

    racro-fast plan --config configs/qwen25vl_7b_r1_32b_tp4.yaml                     # 1 node of 8 x 80 GB
    racro-fast plan --config CONFIG --gpus 8 --gpu-mem-gib 141 --nodes 2 [section.field=value ...]
    racro-fast plan --config CONFIG --model-configs DIR     # DIR/<model name>/config.json, no hub access

It walks what `train` does on each rank of that cluster, start-up and one step, with the real
model sizes (their config.json alone: models are built on the meta device, no weights), and prints:
- the timeline of every engine start, sleep, wake, weight push and update, with the memory resident
  on each GPU at each point;
- vLLM's own start-up check at each engine start (free memory >= gpu_memory_utilization x total);
- every timeout beside the wait it must cover.
A setting that breaks a rule ends it with `racro-fast: error: <field>: <why>` and exit status 2:
the same checks `train` runs at start-up (config.validate, config.check_world, parallel.check_memory_plan).

Left out: the time each phase takes (it depends on the data and the kernels, not on the config) and
activation memory (micro-batch and sequence dependent; the update's rule keeps 10% for it).
"""
from __future__ import annotations

import argparse
import contextlib
import os
from pathlib import Path

from racro_fast import parallel
from racro_fast.config import COLLECTIVE_MARGIN_S, ConfigError, check_world, load_config

GIB = parallel.GIB


def model_size(path: str, model_configs: str | None) -> parallel.ModelSize:
    """A model's size from its config.json: DIR/<last path component> with --model-configs, else the
    model's own folder or hub id (which then needs the hub or its cache)."""
    where = Path(model_configs) / Path(path.rstrip("/")).name if model_configs else path
    if model_configs and not (Path(where) / "config.json").is_file():
        raise ConfigError(f"--model-configs: no {Path(where) / 'config.json'} for {path}")
    try:
        return parallel.ModelSize.from_config(where)
    except OSError as e:
        raise ConfigError(f"model: cannot read the config of {path} ({str(e).splitlines()[0]}); "
                          "pass --model-configs DIR holding <model name>/config.json") from None


@contextlib.contextmanager
def launched_as(world: int, gpus: int):
    """The sizes per rank of a `torchrun --nnodes world/gpus --nproc_per_node gpus` job: what torchrun
    tells each rank (WORLD_SIZE, LOCAL_WORLD_SIZE), for the duration of the block."""
    saved = {k: os.environ.get(k) for k in ("WORLD_SIZE", "LOCAL_WORLD_SIZE")}
    os.environ["WORLD_SIZE"], os.environ["LOCAL_WORLD_SIZE"] = str(world), str(gpus)
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def rehearse(cfg, gpus: int, gpu_mem: float, nodes: int, model_configs: str | None) -> tuple[list[str], dict]:
    """The plan's lines and the memory plan they come from (not yet checked)."""
    world = gpus * nodes
    check_world(cfg, world)
    backend = parallel.DeepSpeed(cfg) if cfg.dist.backend == "deepspeed" else parallel.FSDP2(cfg)
    r = cfg.rollout
    captioner = model_size(cfg.model.captioner, model_configs)
    shares = r.reasoner_engine == "server" and not r.reasoner_url
    reasoner = model_size(cfg.model.reasoner, model_configs) if shares else None
    with launched_as(world, gpus):
        plan = parallel.memory_plan(cfg, backend, captioner, reasoner, gpu_mem)
    t = plan["trainer"]
    g = lambda b: f"{b / GIB:6.1f} GiB"  # noqa: E731
    lines = [f"{nodes} node(s) x {gpus} GPUs of {gpu_mem / GIB:.1f} GiB; {world} ranks, dist.backend={cfg.dist.backend}",
             f"captioner {cfg.model.captioner}: {captioner.params / 1e9:.2f} B parameters; "
             + (f"reasoner {cfg.model.reasoner}: {reasoner.params / 1e9:.2f} B, TP {r.reasoner_tp} x DP "
                f"{parallel.reasoner_replicas(cfg, gpus)} per node" if reasoner else "reasoner: not on these GPUs"),
             "trainer per rank: " + ", ".join(f"{k} {v / GIB:.1f}" for k, v in t.items()) + " GiB",
             "", "timeline (GPU memory held on each device at that point)"]

    def engine_start(name: str, held: float, frac: float) -> str:
        free = gpu_mem - held
        ok = "ok" if free >= frac * gpu_mem else "REFUSED"
        return (f"  start {name:9s} held {g(held)}; vLLM's check: free {free / GIB:.1f} GiB >= "
                f"{frac} x {gpu_mem / GIB:.1f} = {frac * gpu_mem / GIB:.1f} GiB: {ok}")

    if reasoner is not None:
        lines.append(engine_start("reasoner", plan["reasoner_start"], r.reasoner_gpu_fraction)
                     + "  (local rank 0 starts it; every rank waits up to rollout.reasoner_start_timeout)")
        lines.append(f"  sleep    reasoner  level 1: weights to host memory; it keeps {g(parallel.ENGINE_ASLEEP)}")
    if r.engine == "vllm":
        lines.append(engine_start("captioner", plan["captioner_start"], r.captioner_gpu_fraction))
        lines.append(f"  sleep    captioner level 2: weights and KV cache dropped; it keeps {g(parallel.ENGINE_ASLEEP)}")
    push = captioner.params * 2
    requests = cfg.train.questions_per_step // world * r.group_size
    inflight = parallel.inflight_per_rank(cfg, plan["reasoner_sequences"], gpus) if reasoner is not None else 0
    lines += ["  -- one step --",
              "  offload  optimizer state to host memory" if cfg.dist.offload_optimizer else "  (optimizer state stays)",
              f"  wake     captioner weights; push {push / GIB:.1f} GiB in bf16, buckets of "
              f"{cfg.dist.weight_bucket_mb} MiB gathered from the shards",
              f"  captions {g(plan['captions'])}  captioner awake (its fraction), reasoner asleep",
              "  sleep    captioner level 2"]
    if reasoner is not None:
        lines += [f"  answers  {g(plan['answers'])}  reasoner awake, captioner asleep; at most "
                  f"{inflight} requests in flight per rank "
                  f"({plan['reasoner_sequences']} fit the node's KV caches)",
                  "  sleep    reasoner level 1"]
    lines += ["  reload   optimizer state" if cfg.dist.offload_optimizer else "  (no optimizer reload)",
              f"  update   {g(plan['update'])}  parameters, gradients, optimizer state, both engines asleep",
              "", "timeouts (each beside the wait it must cover)",
              f"  dist.timeout_s {cfg.dist.timeout_s:g} s >= the longest rank skew in a collective: the reasoner "
              f"phase's deadline rollout.reasoner_timeout {r.reasoner_timeout:g} s + {COLLECTIVE_MARGIN_S:g} s",
              f"  rollout.reasoner_timeout {r.reasoner_timeout:g} s: one deadline for a step's reasoner requests "
              f"({requests} per rank, up to {r.max_reasoner_tokens} tokens each"
              + (f"; {inflight} in flight: {-(-requests // inflight)} rounds if every answer is as long as "
                 "the longest" if reasoner is not None else "") + ")",
              f"  rollout.reasoner_start_timeout {r.reasoner_start_timeout:g} s: the server's cold start (download, "
              f"load, compile, graphs), waited for on a side group of its own timeout",
              f"  rollout.reward_timeout {r.reward_timeout:g} s: one answer's grading; a late one scores 0"]
    return lines, plan


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="racro-fast plan", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", required=True, help="the run config (configs/*.yaml)")
    p.add_argument("--gpus", type=int, default=8, help="GPUs per node (default 8)")
    p.add_argument("--gpu-mem-gib", type=float, default=80e9 / GIB, help="memory of one GPU in GiB (default 80 GB)")
    p.add_argument("--nodes", type=int, default=1)
    p.add_argument("--model-configs", default=None, help="folder of <model name>/config.json (no hub access)")
    p.add_argument("overrides", nargs="*", help="section.field=value")
    args = p.parse_args(argv)
    if args.gpus < 1 or args.nodes < 1 or args.gpu_mem_gib <= 0:
        raise ConfigError("--gpus, --nodes and --gpu-mem-gib must be positive")
    cfg = load_config(args.config, args.overrides)
    lines, plan = rehearse(cfg, args.gpus, args.gpu_mem_gib * GIB, args.nodes, args.model_configs)
    print("\n".join(lines), flush=True)
    parallel.check_memory_plan(cfg, plan, args.gpu_mem_gib * GIB)  # what train checks at start-up
    print("every check passed")
    return 0


if __name__ == "__main__":
    from racro_fast.config import run_main
    raise SystemExit(run_main(main))
