"""Run configuration: a few flat dataclasses, a YAML file that holds only what differs, and
`section.field=value` overrides on the command line.

    cfg = load_config("configs/demo_cpu.yaml", ["train.lr=1e-4", "run.output_dir=runs/x"])

Every value is checked at start-up: an unknown key, a value of the wrong type or an impossible
combination raises `ConfigError` naming the field (`train.mini_batch: ...`). A field with a fixed
set of values is a `Literal`; the loss settings are the kernels' own `GRPOLossConfig` (the `loss`
section), validated there.
"""
from __future__ import annotations

import dataclasses
import json
import sys
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import yaml

from racro_fast.kernels import GRPOLossConfig


# seconds a collective's timeout must exceed the longest wait it covers: the slack for the rank that
# finishes last to reach the collective after its own deadline (a reasoner error waits up to 5 s to
# tell a dying server from a slow one)
COLLECTIVE_MARGIN_S = 10.0


class ConfigError(ValueError):
    """A bad configuration value; the message starts with the field's dotted name."""


def run_main(fn, argv: list[str] | None = None) -> int:
    """Run an entry point; a user's mistake (ConfigError) is one line and exit status 2. An entry
    point that returns ends the process group its run made (dist.shutdown), before the interpreter's
    teardown; one that raised leaves it to the launcher.

    `--debug` anywhere in argv is taken out and lets the traceback through instead."""
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv
    argv = [a for a in argv if a != "--debug"]
    if not sys.stderr.isatty():
        # a progress bar redrawn into a log file is noise: transformers' and the hub's loading and
        # saving bars are drawn on a terminal only (the run's own progress: metrics.MetricsLog)
        from huggingface_hub.utils import disable_progress_bars
        from transformers.utils import logging as hf_logging
        hf_logging.disable_progress_bar()
        disable_progress_bars()
    try:
        code = fn(argv)
    except ConfigError as e:
        if debug:
            raise
        print(f"racro-fast: error: {e}", file=sys.stderr)
        return 2
    dist = sys.modules.get("racro_fast.dist")  # not imported: no process group was made
    if dist is not None:
        dist.shutdown()
    return code


@dataclass
class ModelConfig:
    captioner: str = "Qwen/Qwen2.5-VL-7B-Instruct"  # path or hub id (`racro-fast demo` builds a tiny one)
    reasoner: str = "deepseek-ai/DeepSeek-R1-Distill-Qwen-7B"  # frozen, text only
    dtype: Literal["bfloat16", "float32"] = "bfloat16"  # parameter dtype (fp32 reductions either way)
    attn_impl: Literal["auto", "sdpa", "eager", "flash_attention_2"] = "auto"  # auto: FA2 on GPU when installed
    gradient_checkpointing: bool = True
    liger: bool = True  # Liger-Kernel RMSNorm/SwiGLU/RoPE patches, on GPU when installed
    freeze_vision: bool = False  # train the language model only
    min_pixels: int = 3136  # image resize bounds (Qwen2.5-VL: 28*28*4 .. 28*28*1280)
    max_pixels: int = 1003520


@dataclass
class DataConfig:
    train_files: list[str] = field(default_factory=list)  # parquet / jsonl / folders
    format: Literal["auto", "parquet", "jsonl"] = "auto"
    synth_task: Literal["", "count", "grid", "bars", "arith", "scene"] = ""  # generate rows instead of reading files
    synth_rows: int = 2048
    image_size: int = 56  # synthetic image side in pixels
    max_prompt_len: int = 8192  # longer captioner prompts are skipped and counted
    shuffle: bool = True


@dataclass
class RolloutConfig:
    engine: Literal["vllm", "hf"] = "vllm"  # the captioner's: in-process vLLM, or transformers generate (CPU)
    hf_batch: int = 64  # rows (captions) a call of the "hf" captioner engine decodes together
    # the reasoner's: "server" = vLLM's OpenAI-compatible server, one per node, started by the trainer
    # (or rollout.reasoner_url); "hf" = transformers generate in the trainer process (CPU)
    reasoner_engine: Literal["server", "hf"] = "server"
    reasoner_url: str = ""  # an already-running reasoner service (e.g. http://host:8000); no sleep calls
    reasoner_port: int = 8765  # of the server the trainer starts on each node
    # seconds the reasoner phase of a step may take, all its requests together (one deadline for the
    # phase, not a timeout per socket read); past it the step fails on every rank
    reasoner_timeout: float = 600.0
    reasoner_start_timeout: float = 1800.0  # seconds for the server to load the reasoner (hub download, compile)
    # requests a rank keeps in flight to the reasoner; 0: what the node's server holds in its KV cache
    # (parallel.memory_plan's reasoner_sequences) shared by the node's ranks, or 64 without a GPU
    reasoner_max_inflight: int = 0
    group_size: int = 4  # G captions per question (paper: 4)
    temperature: float = 1.0  # captioner sampling temperature; the loss uses the same one
    top_p: float = 1.0
    max_caption_tokens: int = 8192
    reasoner_samples: int = 1  # k answers per caption; reward = mean correctness (paper: 1)
    reasoner_temperature: float = 1.0
    reasoner_top_p: float = 1.0
    max_reasoner_tokens: int = 8192
    reward: str = "boxed_math"  # key of rewards.REWARD_FUNCS
    reward_timeout: float = 5.0  # seconds per grading call; a timeout scores 0
    # grading processes, each item time-bounded (reward_pool.py); 0: in the trainer's process under a
    # SIGALRM timer (no process memory, but a hang inside one C call is not cut short)
    reward_workers: int = 2
    # vLLM gpu_memory_utilization of each engine while it is awake; the two never are at once (sleep
    # mode), so each only has to fit beside the trainer's resident state (parallel.memory_plan)
    captioner_gpu_fraction: float = 0.3
    reasoner_gpu_fraction: float = 0.3
    reasoner_tp: int = 1  # tensor-parallel size of each reasoner replica (32B: 4)
    reasoner_dp: int = 0  # reasoner replicas per node; 0 = the node's GPUs / reasoner_tp
    max_model_len: int = 16384


@dataclass
class TrainConfig:
    steps: int = 100  # optimizer rollouts (each: questions_per_step questions)
    questions_per_step: int = 256  # paper: 256
    mini_batch: int = 128  # questions per optimizer step (paper: 128 -> 2 updates per rollout)
    micro_batch: int = 8  # captions per forward/backward (packed: whole questions, up to this many captions)
    micro_batch_tokens: int = 0  # packed: fill each micro-batch to this many tokens instead (0: count captions)
    packed: bool = True  # each question's prompt and images computed once for its G captions, no padding
    lr: float = 1e-6
    weight_decay: float = 0.01
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    warmup_steps: int = 0
    lr_schedule: Literal["constant", "cosine"] = "constant"
    grad_clip: float = 1.0
    scale_adv_by_std: bool = True  # False: Dr. GRPO advantages
    min_caption_tokens: int = 0  # captions shorter than this score 0 (a floor against collapse; 0 = off, as in the paper)
    seed: int = 0


@dataclass
class RunConfig:
    output_dir: str = "runs/racro"
    save_every: int = 50  # steps between checkpoints; 0 = only at the end
    keep_checkpoints: int = 2
    resume: str = "auto"  # auto (newest complete checkpoint) | none | a checkpoint path
    export: bool = True  # write the captioner as safetensors + tokenizer at the end
    progress: bool = True  # progress bar
    tensorboard: bool = False
    wandb_project: str = ""  # empty: W&B off
    device: Literal["auto", "cpu", "cuda"] = "auto"
    # on CPU, glibc's malloc keeps freed memory for the next phase's tensors
    # (parallel.keep_freed_host_memory); false: glibc's defaults
    malloc_keep_freed: bool = True


@dataclass
class DistConfig:
    backend: Literal["fsdp2", "deepspeed"] = "fsdp2"  # used under torchrun (any world size); a plain process is unsharded
    deepspeed_config: str = "configs/deepspeed/zero2.json"
    offload_optimizer: bool = True  # optimizer state to pinned CPU memory while engines generate
    weight_bucket_mb: int = 512  # size of the buckets gathered and pushed to the captioner engine
    # seconds a rank may wait in a collective before the run fails (NCCL's watchdog; gloo's timeout);
    # must cover the longest rank skew of a phase: the reasoner phase (rollout.reasoner_timeout). A
    # reasoner server's cold start (rollout.reasoner_start_timeout) is waited for on a group of its own
    timeout_s: float = 1800.0


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    # the paper's loss: clip 0.2/0.2, k3 (low_var_kl) KL to the reference as a loss term with
    # coefficient 0.001 (0 drops the reference model), token-mean; loss.norm_len defaults to
    # rollout.max_caption_tokens; loss.is_mode "auto" is token_tis with vLLM rollouts (other kernels
    # and precision than the trainer's) and off with HF generate (the trainer's own weights and numerics)
    loss: GRPOLossConfig = field(default_factory=lambda: GRPOLossConfig(kl_coef=0.001, is_mode="auto"))
    run: RunConfig = field(default_factory=RunConfig)
    dist: DistConfig = field(default_factory=DistConfig)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def to_plain(self) -> dict:
        """`to_dict` in JSON's types (tuples as lists): what a checkpoint holds and compares with."""
        return json.loads(json.dumps(self.to_dict()))


def _coerce(name: str, value, typ):
    """Turn a YAML value or a command-line string into `typ`, or raise naming the field."""
    origin = typing.get_origin(typ)
    if origin is Literal:
        choices = typing.get_args(typ)
        if value not in choices:
            raise ConfigError(f"{name}: {value!r} is not one of {choices}")
        return value
    if origin in (typing.Union, types.UnionType) and type(None) in typing.get_args(typ):
        if value is None or (isinstance(value, str) and value.lower() in ("none", "null", "")):
            return None
        (inner,) = [t for t in typing.get_args(typ) if t is not type(None)]
        return _coerce(name, value, inner)
    if origin is list:
        (item,) = typing.get_args(typ)
        if isinstance(value, str):
            value = [v for v in value.split(",") if v] if not value.startswith("[") else yaml.safe_load(value)
        if not isinstance(value, list):
            raise ConfigError(f"{name}: expected a list, got {value!r}")
        return [_coerce(f"{name}[{i}]", v, item) for i, v in enumerate(value)]
    if typ is bool:
        if isinstance(value, str) and value.lower() in ("true", "false", "1", "0", "yes", "no"):
            return value.lower() in ("true", "1", "yes")
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{name}: expected true/false, got {value!r}")
    if typ is int:
        if isinstance(value, str):
            try:
                value = int(value)
            except ValueError:
                raise ConfigError(f"{name}: expected an integer, got {value!r}") from None
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{name}: expected an integer, got {value!r}")
        return value
    if typ is float:
        if isinstance(value, str):
            try:
                value = float(value)
            except ValueError:
                raise ConfigError(f"{name}: expected a number, got {value!r}") from None
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{name}: expected a number, got {value!r}")
        return float(value)
    if typ is str:
        if not isinstance(value, (str, int, float)) or isinstance(value, bool):
            raise ConfigError(f"{name}: expected a string, got {value!r}")
        return str(value)
    raise ConfigError(f"{name}: unsupported field type {typ}")


def _section_types(section) -> dict:
    return typing.get_type_hints(type(section))


def _set(cfg: Config, dotted: str, value) -> None:
    parts = dotted.split(".")
    if len(parts) != 2:
        raise ConfigError(f"{dotted}: expected section.field (e.g. train.lr)")
    sec_name, key = parts
    if sec_name not in {f.name for f in dataclasses.fields(cfg)}:
        raise ConfigError(f"{dotted}: unknown section {sec_name!r}")
    section = getattr(cfg, sec_name)
    types = _section_types(section)
    if key not in types:
        raise ConfigError(f"{dotted}: unknown field (known: {', '.join(types)})")
    setattr(section, key, _coerce(dotted, value, types[key]))


def validate(cfg: Config) -> Config:
    """Reject impossible values and combinations at start-up, naming the field."""
    t, r, d, m = cfg.train, cfg.rollout, cfg.data, cfg.model

    def need(ok: bool, name: str, msg: str) -> None:
        if not ok:
            raise ConfigError(f"{name}: {msg}")

    need(r.group_size >= 2, "rollout.group_size", "GRPO needs at least 2 captions per question")
    need(r.reasoner_samples >= 1, "rollout.reasoner_samples", "must be >= 1")
    need(r.temperature > 0, "rollout.temperature", "training rollouts must sample (temperature > 0)")
    need(r.reasoner_temperature >= 0, "rollout.reasoner_temperature", "must be >= 0")
    need(0 < r.top_p <= 1, "rollout.top_p", "must be in (0, 1]")
    need(0 < r.reasoner_top_p <= 1, "rollout.reasoner_top_p", "must be in (0, 1]")
    need(r.max_caption_tokens >= 1, "rollout.max_caption_tokens", "must be >= 1")
    need(r.max_reasoner_tokens >= 1, "rollout.max_reasoner_tokens", "must be >= 1")
    need(r.reward_timeout > 0, "rollout.reward_timeout", "must be > 0")
    need(r.reward_workers >= 0, "rollout.reward_workers", "must be >= 0 (0: grade in the trainer's process)")
    need(r.reasoner_timeout > 0, "rollout.reasoner_timeout", "must be > 0")
    need(r.reasoner_start_timeout > 0, "rollout.reasoner_start_timeout", "must be > 0")
    need(r.hf_batch >= 1, "rollout.hf_batch", "must be >= 1")
    need(r.reasoner_max_inflight >= 0, "rollout.reasoner_max_inflight", "must be >= 0 (0: derived)")
    need(cfg.dist.timeout_s > 0, "dist.timeout_s", "must be > 0")
    # the other ranks wait in a collective while one finishes its reasoner requests, up to the phase's deadline
    need(cfg.dist.timeout_s >= r.reasoner_timeout + COLLECTIVE_MARGIN_S, "dist.timeout_s",
         f"{cfg.dist.timeout_s:g} s does not cover the reasoner phase a rank may wait for in a collective: "
         f"rollout.reasoner_timeout={r.reasoner_timeout:g} s + {COLLECTIVE_MARGIN_S:g} s")
    need(r.reasoner_tp >= 1, "rollout.reasoner_tp", "must be >= 1")
    need(r.reasoner_dp >= 0, "rollout.reasoner_dp", "must be >= 0 (0: the node's GPUs / rollout.reasoner_tp)")
    need(0 < r.reasoner_port < 65536, "rollout.reasoner_port", "must be a TCP port")
    need(not r.reasoner_url or r.reasoner_url.startswith(("http://", "https://")), "rollout.reasoner_url",
         f"expected http://host:port, got {r.reasoner_url!r}")
    for name in ("captioner_gpu_fraction", "reasoner_gpu_fraction"):
        need(0 < getattr(r, name) < 1, f"rollout.{name}", "must be in (0, 1)")
    need(t.steps >= 1, "train.steps", "must be >= 1")
    need(t.questions_per_step >= 1, "train.questions_per_step", "must be >= 1")
    need(1 <= t.mini_batch <= t.questions_per_step, "train.mini_batch", "must be in [1, questions_per_step]")
    need(t.questions_per_step % t.mini_batch == 0, "train.mini_batch",
         f"must divide train.questions_per_step ({t.questions_per_step})")
    need(t.micro_batch >= 1, "train.micro_batch", "must be >= 1")
    need(t.micro_batch_tokens >= 0, "train.micro_batch_tokens", "must be >= 0 (0: micro-batches of train.micro_batch captions)")
    need(t.packed or not t.micro_batch_tokens, "train.micro_batch_tokens", "needs train.packed: the padded layout counts captions")
    need(t.lr > 0, "train.lr", "must be > 0")
    need(t.weight_decay >= 0, "train.weight_decay", "must be >= 0")
    need(0 <= t.adam_beta1 < 1, "train.adam_beta1", "must be in [0, 1)")
    need(0 <= t.adam_beta2 < 1, "train.adam_beta2", "must be in [0, 1)")
    need(t.warmup_steps >= 0, "train.warmup_steps", "must be >= 0")
    need(t.grad_clip > 0, "train.grad_clip", "must be > 0")
    need(t.min_caption_tokens >= 0, "train.min_caption_tokens", "must be >= 0 (0: off)")
    if cfg.loss.norm_len is None:
        cfg.loss.norm_len = r.max_caption_tokens
    if cfg.loss.is_mode == "auto":
        cfg.loss.is_mode = "off" if r.engine == "hf" else "token_tis"
    try:
        cfg.loss.validate()
    except ValueError as e:
        raise ConfigError(f"loss.{e}") from None
    need(cfg.loss.entropy_coef >= 0, "loss.entropy_coef", "must be >= 0")
    from racro_fast.rewards import REWARD_FUNCS
    need(r.reward in REWARD_FUNCS, "rollout.reward", f"{r.reward!r} is not one of {sorted(REWARD_FUNCS)}")
    need(bool(d.train_files) != bool(d.synth_task), "data.train_files",
         "give either data.train_files or data.synth_task (exactly one)")
    need(d.synth_rows >= 1, "data.synth_rows", "must be >= 1")
    need(d.image_size >= 28, "data.image_size", "must be >= 28 (one merged 28x28 patch)")
    need(d.max_prompt_len >= 1, "data.max_prompt_len", "must be >= 1")
    need(0 < m.min_pixels <= m.max_pixels, "model.min_pixels", "must be > 0 and <= model.max_pixels")
    need(cfg.run.save_every >= 0, "run.save_every", "must be >= 0")
    need(cfg.run.keep_checkpoints >= 1, "run.keep_checkpoints", "must be >= 1")
    need(cfg.dist.weight_bucket_mb >= 1, "dist.weight_bucket_mb", "must be >= 1")
    return cfg


def check_world(cfg: Config, world_size: int) -> None:
    """What depends on the number of ranks, checked before any model loads: a group of captions
    never spans ranks, so questions per step and per mini-batch must divide over them."""
    t = cfg.train
    if t.questions_per_step % world_size:
        raise ConfigError(f"train.questions_per_step: {t.questions_per_step} does not divide over {world_size} ranks")
    if t.mini_batch % world_size:
        raise ConfigError(f"train.mini_batch: {t.mini_batch} questions do not divide over {world_size} ranks "
                          "(a group of captions never spans ranks)")


# What a resumed run may change without a word: how long it runs, where and how it writes and logs,
# and the launcher's timeouts. Any other field changed since the checkpoint is a different run.
RESUME_MAY_CHANGE = ("train.steps", "run.", "dist.")


def changes_since(saved: dict, cfg: Config) -> list[str]:
    """The fields of `cfg` that differ from `saved` (a checkpoint's `Config.to_plain()`), as
    "section.field: old -> new", leaving out RESUME_MAY_CHANGE; a field one side lacks (another
    version of racro_fast) counts as changed."""
    now = cfg.to_plain()
    out = []
    for section in sorted(set(saved) | set(now)):
        old, new = saved.get(section, {}), now.get(section, {})
        for name in sorted(set(old) | set(new)):
            key = f"{section}.{name}"
            if key.startswith(RESUME_MAY_CHANGE):
                continue
            a, b = old.get(name, "(absent)"), new.get(name, "(absent)")
            if a != b:
                out.append(f"{key}: {a!r} -> {b!r}")
    return out


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> Config:
    """Defaults <- YAML file <- `section.field=value` overrides, then `validate`."""
    cfg = Config()
    if path is not None:
        data = yaml.safe_load(Path(path).read_text()) or {}
        if not isinstance(data, dict):
            raise ConfigError(f"{path}: expected a mapping of sections")
        for sec_name, values in data.items():
            if not isinstance(values, dict):
                raise ConfigError(f"{sec_name}: expected a mapping of fields, got {values!r}")
            for key, value in values.items():
                _set(cfg, f"{sec_name}.{key}", value)
    for item in overrides or []:
        if "=" not in item:
            raise ConfigError(f"{item}: overrides are section.field=value")
        key, value = item.split("=", 1)
        _set(cfg, key.strip(), value.strip())
    return validate(cfg)


def check_paths(cfg: Config) -> None:
    """Files the run reads, checked before any model loads, each named by its field."""
    for f in cfg.data.train_files:
        if not Path(f).exists():
            raise ConfigError(f"data.train_files: {f} does not exist")
    for name in ("captioner", "reasoner"):
        path = getattr(cfg.model, name)
        # a hub id is "org/name"; anything else must be a local checkpoint folder
        looks_like_hub_id = path.count("/") == 1 and not path.startswith((".", "/")) and not Path(path).exists()
        if not looks_like_hub_id and not (Path(path) / "config.json").is_file():
            raise ConfigError(f"model.{name}: {path} is not a checkpoint folder (no config.json) nor a hub id")
    r = cfg.rollout
    if r.reasoner_engine == "server" and not r.reasoner_url:
        import importlib.util
        if importlib.util.find_spec("vllm") is None:
            raise ConfigError("rollout.reasoner_engine: 'server' starts vLLM's server, and vllm is not installed "
                              "(pip install -e '.[gpu]'); or set rollout.reasoner_url, or rollout.reasoner_engine=hf")
    if cfg.dist.backend == "deepspeed" and not Path(cfg.dist.deepspeed_config).is_file():
        raise ConfigError(f"dist.deepspeed_config: {cfg.dist.deepspeed_config} does not exist")
