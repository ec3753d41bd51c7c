"""The whole CRO step of racro_fast against TRL's GRPOTrainer on the same job, one after the other,
each in its own process (this script's child), on this machine:

    python benchmarks/bench_vs_trl.py                      # the demo job, 20 steps after 2 warm-up, seeds 0 and 1
    python benchmarks/bench_vs_trl.py --steps 5 --seeds 0  # shorter
    python benchmarks/bench_vs_trl.py --wide               # a captioner of the 7B's decoder:vocabulary balance

The job (both sides): the demo's tiny Qwen2.5-VL captioner (`racro-fast demo` builds and caches it)
and its frozen text-only reasoner; the same scene rows; G captions for each of Q questions a step,
one optimizer step per rollout, the same lr, temperature, caption budget and clip range; the reward
of a caption is the reasoner's answer to it, sampled as the demo samples it and graded by the same
grader (`rewards.boxed_math`). TRL's side is its documented VLM path: a conversational "prompt" with
an "image" column, a Qwen2.5-VL processor, HF generate, and a reward function that runs the frozen
reasoner (with racro_fast's HF engine: the same reasoner cost on both sides) and grades.

Unlike the demo config, no KL term on either side (TRL's default beta, 0: no reference model).
What differs, because TRL has no such setting: racro_fast's entropy bonus is off here (TRL has
none); TRL's "dapo" loss (token mean over the batch) is racro_fast's "token-mean"; the row order
(each shuffles with its own sampler). Both grade in their own process (TRL always; racro_fast with
the demo config's rollout.reward_workers: 0).

--wide: the captioner is bench_step.py's model on CPU (8 layers of 512 with the 7B's head_dim,
MLP and GQA proportions, 6400 output rows: the 7B's decoder:vocabulary FLOPs per caption token)
with random weights and the demo's tokenizer: its captions are noise (ids past the tokenizer
decode to nothing), so its rewards say nothing; its time and memory are the point.

The sides run one after the other, seed by seed, who goes first alternating (ours, TRL, TRL,
ours, ...). Reported per side, after the warm-up steps: seconds per step split into generation (captions),
reward (reasoner + grading; the grading alone as grade_s) and the rest (the update: log-probs, loss, backward, optimizer);
peak resident memory of the side's process tree (sampled every 20 ms: reward workers included);
caption tokens per second; the mean reward over the measured steps. Rows go to
benchmarks/results/vs_trl.csv; the run ends with one JSON line:
{step_speedup_vs_trl, memory_vs_trl, reward_ours, reward_trl, ...} (speedup: TRL's seconds per
step over ours; memory: our peak over TRL's; rewards: mean over seeds, with their spread).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from common import append_rows, device_name, print_table  # noqa: E402

SIDES = ("ours", "trl")


# ----------------------------------------------------------------------------- the job, shared

def job_config(args: argparse.Namespace, out_dir: str):
    """The demo run config as both sides run it: the parent's models and rows, no entropy bonus,
    no KL term (no reference model: TRL's default beta), no checkpoints, this seed's sampling."""
    from racro_fast.config import load_config
    from racro_fast.demo import DEMO_CONFIG
    cfg = load_config(DEMO_CONFIG, [
        f"rollout.group_size={args.group}", f"train.questions_per_step={args.questions}",
        f"train.mini_batch={args.questions}", f"train.steps={args.warmup + args.steps}", "loss.entropy_coef=0.0",
        "loss.kl_coef=0.0",
        f"run.output_dir={out_dir}", "run.save_every=0", "run.export=false", f"train.seed={args.seed}"])
    cfg.model.captioner, cfg.model.reasoner = args.captioner, args.reasoner
    cfg.data.synth_task, cfg.data.train_files = None, [args.rows]
    return cfg


def wide_captioner(src: str, dst: str, vocab: int, hidden: int, layers: int) -> str:
    """A random captioner of bench_step.py's 7B proportions (`hidden`, `layers`, `vocab` output
    rows) with the demo captioner's tokenizer, image processor and special tokens; saved to dst.
    Its sampled ids past the tokenizer's decode to nothing."""
    import torch
    from transformers import AutoConfig, AutoImageProcessor, AutoTokenizer, Qwen2_5_VLForConditionalGeneration

    from bench_step import model_config
    small = AutoConfig.from_pretrained(src)
    cfg = model_config(layers, hidden, vocab)
    for name in ("image_token_id", "video_token_id", "vision_start_token_id", "vision_end_token_id",
                 "eos_token_id", "pad_token_id", "bos_token_id"):
        setattr(cfg, name, getattr(small, name, None))
        setattr(cfg.text_config, name, getattr(small.text_config, name, None))
    torch.manual_seed(0)
    Qwen2_5_VLForConditionalGeneration(cfg).to(torch.float32).save_pretrained(dst)
    AutoTokenizer.from_pretrained(src).save_pretrained(dst)
    AutoImageProcessor.from_pretrained(src).save_pretrained(dst)
    return dst


# ----------------------------------------------------------------------------- racro_fast's side

def run_ours(args: argparse.Namespace) -> dict:
    from racro_fast.train import train
    with tempfile.TemporaryDirectory() as out:
        cfg = job_config(args, out)
        history = train(cfg)["history"][args.warmup:]
    step = [h["step_s"] for h in history]
    gen = [h["caption_s"] for h in history]
    reward = [h["reason_s"] + h["reward_s"] for h in history]
    grade = [h["reward_s"] for h in history]  # the reward workers' grading (and the advantages)
    tokens = [h["caption_len_mean"] * args.questions * args.group for h in history]
    return side_row("ours", args, step, gen, reward, grade, tokens, [h["reward_mean"] for h in history])


# ----------------------------------------------------------------------------- TRL's side

class ReasonerReward:
    """TRL reward function: the frozen reasoner answers each caption (racro_fast's HF engine, the
    demo's sampling) and `rewards.boxed_math` grades the answer."""

    def __init__(self, cfg) -> None:
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        from racro_fast.engines import HFEngine
        from racro_fast.parallel import inflight_per_rank
        self.__name__ = "reasoner"
        self.cfg, self.calls, self.seconds, self.grade_seconds, self.means, self.tokens = cfg, 0, [], [], [], []
        self.tok = AutoTokenizer.from_pretrained(cfg.model.reasoner)
        model = AutoModelForCausalLM.from_pretrained(cfg.model.reasoner, dtype=getattr(torch, cfg.model.dtype)).eval()
        self.engine = HFEngine(model, self.tok, batch_size=inflight_per_rank(cfg, 0, 1))  # our side's batch

    def __call__(self, prompts, completions, completion_ids, problem, answer, **_) -> list[float]:
        from racro_fast.engines import GenRequest, SamplingConfig
        from racro_fast.prompts import clean_problem, reasoner_messages, text_prompt_ids_batch
        from racro_fast.rewards import boxed_math
        t0 = time.perf_counter()
        captions = [c[-1]["content"] if isinstance(c, list) else c for c in completions]
        requests = [GenRequest(prompt_ids=ids) for ids in text_prompt_ids_batch(
            self.tok, [reasoner_messages(c, clean_problem(q)) for c, q in zip(captions, problem)])]
        r = self.cfg.rollout
        outs = self.engine.generate(requests, SamplingConfig(
            n=1, temperature=r.reasoner_temperature, top_p=r.reasoner_top_p, max_tokens=r.max_reasoner_tokens,
            seed=self.cfg.train.seed + 100_003 * self.calls, logprobs=False))
        t1 = time.perf_counter()
        rewards = [boxed_math(o[0].text, a) for o, a in zip(outs, answer)]
        self.grade_seconds.append(time.perf_counter() - t1)
        self.calls += 1
        self.seconds.append(time.perf_counter() - t0)
        self.means.append(sum(rewards) / len(rewards))
        self.tokens.append(sum(len(ids) for ids in completion_ids))
        return rewards


def image_processor_only(image_processor, tokenizer):
    """Qwen2.5-VL's processor for images alone (its video processor needs torchvision, which the CPU
    set-up has not); on the demo's rows it gives racro_fast's prompt ids and pixels exactly."""
    from transformers import Qwen2_5_VLProcessor
    from transformers.processing_utils import ProcessorMixin

    class ImageQwen2_5_VLProcessor(Qwen2_5_VLProcessor):
        def __init__(self, image_processor=None, tokenizer=None, chat_template=None, **kwargs):
            self.image_token, self.video_token = "<|image_pad|>", "<|video_pad|>"
            self.image_token_id = tokenizer.convert_tokens_to_ids(self.image_token)
            self.video_token_id = tokenizer.convert_tokens_to_ids(self.video_token)
            ProcessorMixin.__init__(self, image_processor, tokenizer, chat_template=chat_template)
            self.video_processor = None

    return ImageQwen2_5_VLProcessor(image_processor=image_processor, tokenizer=tokenizer,
                                    chat_template=tokenizer.chat_template)


def trl_dataset(rows_path: str, min_pixels: int, max_pixels: int):
    """The rows as TRL's VLM path takes them: a conversational prompt (racro_fast's captioner
    messages, without the image part: TRL inserts it) and the image."""
    from datasets import Dataset

    from racro_fast.data import RowDataset
    from racro_fast.prompts import captioner_messages
    rows = RowDataset([rows_path], fmt="auto", min_pixels=min_pixels, max_pixels=max_pixels)
    records = []
    for i in range(len(rows)):
        row = rows[i]
        messages = captioner_messages(row.problem, 0)
        records.append({"prompt": [{"role": m["role"], "content": m["content"] if isinstance(m["content"], str)
                                    else "".join(p.get("text", "") for p in m["content"])} for m in messages],
                        "image": row.images[0], "problem": row.problem, "answer": row.answer})
    return Dataset.from_list(records)


def run_trl(args: argparse.Namespace) -> dict:
    import torch
    from transformers import AutoImageProcessor, AutoTokenizer, Qwen2_5_VLForConditionalGeneration, TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    with tempfile.TemporaryDirectory() as out:
        cfg = job_config(args, out)
        tok = AutoTokenizer.from_pretrained(cfg.model.captioner)
        image_processor = AutoImageProcessor.from_pretrained(cfg.model.captioner)
        image_processor.min_pixels, image_processor.max_pixels = cfg.model.min_pixels, cfg.model.max_pixels
        processor = image_processor_only(image_processor, tok)
        model = Qwen2_5_VLForConditionalGeneration.from_pretrained(cfg.model.captioner,
                                                                   dtype=getattr(torch, cfg.model.dtype))
        t, r = cfg.train, cfg.rollout
        targs = GRPOConfig(
            output_dir=out, max_steps=t.steps, per_device_train_batch_size=t.questions_per_step * r.group_size,
            gradient_accumulation_steps=1, num_generations=r.group_size, max_completion_length=r.max_caption_tokens,
            temperature=r.temperature, top_p=r.top_p, top_k=0, learning_rate=t.lr, weight_decay=t.weight_decay,
            adam_beta1=t.adam_beta1, adam_beta2=t.adam_beta2, lr_scheduler_type="constant", warmup_steps=0,
            max_grad_norm=t.grad_clip, beta=cfg.loss.kl_coef, epsilon=cfg.loss.clip_low,
            epsilon_high=cfg.loss.clip_high, loss_type="dapo", scale_rewards="group" if t.scale_adv_by_std else "none",
            num_iterations=1, seed=t.seed, data_seed=t.seed, use_cpu=True, bf16=False, fp16=False,
            logging_steps=1, report_to="none", save_strategy="no", disable_tqdm=True,
            dataloader_num_workers=0, gradient_checkpointing=cfg.model.gradient_checkpointing,
        )
        reward = ReasonerReward(cfg)
        steps: list[float] = []

        class StepClock(TrainerCallback):
            def on_step_begin(self, *_, **__):
                self.t0 = time.perf_counter()

            def on_step_end(self, *_, **__):
                steps.append(time.perf_counter() - self.t0)

        class TimedGRPOTrainer(GRPOTrainer):
            """GRPOTrainer with its caption generation timed (the rest of a step is the update)."""
            gen_seconds: list[float] = []

            def _generate_single_turn(self, *a, **kw):
                t0 = time.perf_counter()
                try:
                    return super()._generate_single_turn(*a, **kw)
                finally:
                    self.gen_seconds.append(time.perf_counter() - t0)

        trainer = TimedGRPOTrainer(model=model, reward_funcs=[reward], args=targs, processing_class=processor,
                                   train_dataset=trl_dataset(args.rows, cfg.model.min_pixels, cfg.model.max_pixels),
                                   callbacks=[StepClock()])
        trainer.train()
    w = args.warmup
    return side_row("trl", args, steps[w:], trainer.gen_seconds[w:], reward.seconds[w:], reward.grade_seconds[w:],
                    reward.tokens[w:], reward.means[w:])


def side_row(side: str, args: argparse.Namespace, step, gen, reward, grade, tokens, rewards) -> dict:
    if not step:
        raise RuntimeError(f"{side}: no measured steps (steps={args.steps}, warm-up={args.warmup})")
    mean = statistics.fmean
    return {"side": side, "model": "wide" if args.wide else "demo", "seed": args.seed, "steps": len(step),
            "step_s": mean(step), "gen_s": mean(gen), "reward_s": mean(reward), "grade_s": mean(grade),
            "update_s": mean(step) - mean(gen) - mean(reward), "caption_tok_s": sum(tokens) / sum(step),
            "reward_mean": mean(rewards)}


# ----------------------------------------------------------------------------- the parent

def run_side(side: str, args: argparse.Namespace, seed: int, rows: str, captioner: str) -> dict:
    """One side in a child process; its process tree's peak resident set sampled every 20 ms."""
    import psutil
    cmd = [sys.executable, os.path.abspath(__file__), "--side", side, "--seed", str(seed), "--rows", rows,
           "--steps", str(args.steps), "--warmup", str(args.warmup), "--group", str(args.group),
           "--questions", str(args.questions)]
    cmd += ["--captioner", captioner, "--reasoner", args.reasoner_path]
    if args.wide:
        cmd += ["--wide"]
    with tempfile.NamedTemporaryFile("w+", suffix=".json") as result:
        proc = subprocess.Popen(cmd + ["--result", result.name], stdout=sys.stderr if args.verbose else
                                subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        peak, stop = [0], threading.Event()

        def sample() -> None:
            p = psutil.Process(proc.pid)
            while not stop.is_set():
                try:
                    tree = [p, *p.children(recursive=True)]
                    peak[0] = max(peak[0], sum(q.memory_info().rss for q in tree if q.is_running()))
                except psutil.Error:
                    pass
                stop.wait(0.02)

        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        _, err = proc.communicate(timeout=args.timeout)
        stop.set()
        sampler.join()
        if proc.returncode != 0:
            raise RuntimeError(f"the {side} side (seed {seed}) failed with exit {proc.returncode}:\n{err[-4000:]}")
        row = json.loads(Path(result.name).read_text())
    row["peak_rss_mb"] = peak[0] / 2**20
    return row


def summary(rows: list[dict]) -> dict:
    def of(side: str, key: str) -> list[float]:
        return [r[key] for r in rows if r["side"] == side]

    mean = statistics.fmean

    def spread(xs: list[float]) -> float:
        return (max(xs) - min(xs)) / 2 if len(xs) > 1 else float("nan")

    return {"step_speedup_vs_trl": mean(of("trl", "step_s")) / mean(of("ours", "step_s")),
            "memory_vs_trl": mean(of("ours", "peak_rss_mb")) / mean(of("trl", "peak_rss_mb")),
            "reward_ours": mean(of("ours", "reward_mean")), "reward_trl": mean(of("trl", "reward_mean")),
            "reward_ours_spread": spread(of("ours", "reward_mean")), "reward_trl_spread": spread(of("trl", "reward_mean")),
            "gen_speedup_vs_trl": mean(of("trl", "gen_s")) / mean(of("ours", "gen_s")),
            "reward_speedup_vs_trl": mean(of("trl", "reward_s")) / mean(of("ours", "reward_s")),
            "grade_speedup_vs_trl": mean(of("trl", "grade_s")) / mean(of("ours", "grade_s")),
            "update_speedup_vs_trl": mean(of("trl", "update_s")) / mean(of("ours", "update_s")),
            "seeds": sorted({r["seed"] for r in rows}), "model": rows[0]["model"], "device": device_name()}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=20, help="measured steps per side (default 20)")
    p.add_argument("--warmup", type=int, default=2, help="steps before the measured ones (default 2)")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    p.add_argument("--group", type=int, default=8, help="G, captions per question (default 8)")
    p.add_argument("--questions", type=int, default=16, help="questions per step (default 16)")
    p.add_argument("--rows-n", type=int, default=2048, help="scene rows (the demo's 2048)")
    p.add_argument("--wide", action="store_true", help="a captioner of the 7B's decoder:vocabulary balance")
    p.add_argument("--hidden", type=int, default=512, help="--wide: decoder width (bench_step.py's CPU default)")
    p.add_argument("--layers", type=int, default=8, help="--wide: decoder layers (bench_step.py's CPU default)")
    p.add_argument("--vocab", type=int, default=6400, help="--wide: output rows (bench_step.py's CPU default)")
    p.add_argument("--captioner", help="a captioner directory instead of the demo's (with --reasoner)")
    p.add_argument("--reasoner", dest="reasoner_path", help="the reasoner directory of --captioner")
    p.add_argument("--csv", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", "vs_trl.csv"))
    p.add_argument("--no-csv", action="store_true")
    p.add_argument("--timeout", type=float, default=3600.0, help="seconds per side and seed")
    p.add_argument("--verbose", action="store_true", help="the children's logs on stderr")
    # the child's arguments
    p.add_argument("--side", choices=SIDES, help=argparse.SUPPRESS)
    p.add_argument("--seed", type=int, default=0, help=argparse.SUPPRESS)
    p.add_argument("--rows", help=argparse.SUPPRESS)
    p.add_argument("--result", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.side:  # a child: one side, one seed, the parent's models and rows
        args.reasoner = args.reasoner_path
        row = (run_ours if args.side == "ours" else run_trl)(args)
        Path(args.result).write_text(json.dumps(row))
        return 0
    if bool(args.captioner) != bool(args.reasoner_path):
        p.error("--captioner and --reasoner go together")

    from racro_fast.synth import write_synth
    rows_out = []
    with tempfile.TemporaryDirectory() as tmp:
        rows = write_synth(os.path.join(tmp, "rows.parquet"), args.rows_n, task="scene", seed=0, size=56)
        captioner = args.captioner
        if not captioner:  # the demo's models (built once and cached by racro-fast demo)
            from racro_fast.demo import demo_config
            cfg = demo_config()
            captioner, args.reasoner_path = cfg.model.captioner, cfg.model.reasoner
        if args.wide:
            captioner = wide_captioner(captioner, os.path.join(tmp, "wide"), args.vocab, args.hidden, args.layers)
        for k, seed in enumerate(args.seeds):
            # who goes first alternates (ours, TRL, TRL, ours): a host that speeds up or slows down
            # over the run weighs on both sides alike
            for side in SIDES if k % 2 == 0 else SIDES[::-1]:
                row = run_side(side, args, seed, rows, captioner)
                print(f"{side} seed {seed}: {row['step_s']:.2f} s/step, peak {row['peak_rss_mb']:.0f} MB, "
                      f"reward {row['reward_mean']:.3f}", file=sys.stderr)
                rows_out.append(row)
    print_table(rows_out, ["side", "model", "seed", "steps", "step_s", "gen_s", "reward_s", "grade_s", "update_s",
                           "peak_rss_mb", "caption_tok_s", "reward_mean"])
    if not args.no_csv:
        append_rows(args.csv, rows_out)
    print(json.dumps(summary(rows_out)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
