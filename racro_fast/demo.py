"""The CPU demo: `racro-fast demo` builds (or reuses) a tiny captioner and reasoner, then trains.

    racro-fast demo                                   # configs/demo_cpu.yaml, 150 steps, a few minutes on 2 cores
    racro-fast demo train.steps=20 run.output_dir=runs/short

`demo_config` loads the demo YAML (overrides as for `racro-fast train`), builds the pair and puts
their paths into model.captioner / model.reasoner; `train` then runs on them like on any checkpoint.

There is no model hub on a CPU box, so the demo builds its own pair from configs:

- reasoner: a two-layer Qwen2 trained here for a few hundred steps to read a caption and the
  question and answer `\\boxed{...}` from the numbers the caption states (it never sees the image).
  When a caption states no number it can only guess. It is then frozen, as in RACRO.
- captioner: a two-layer Qwen2.5-VL taught only the *form* of a caption ("There are 3 shapes.")
  on captions whose numbers are random, so it starts at chance: it can caption, but what it says
  does not depend on the image. GRPO must teach it to look, and the reward curve shows it.

The cache key covers everything that changes the models; `RACRO_FAST_CACHE` moves the cache.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import random
import re
import shutil
from pathlib import Path

import torch

log = logging.getLogger("racro_fast.demo")

VERSION = 3  # bump when the recipe below changes
DEMO_CONFIG = Path(__file__).resolve().parent.parent / "configs" / "demo_cpu.yaml"
# the number a caption states -> the answer; the reasoner learns exactly this rule
ANSWER_RULES = {"count": lambda ns: ns[0], "grid": lambda ns: ns[0], "bars": max, "arith": sum}
NUMBER_RANGE = {"count": (1, 4), "grid": (1, 4), "bars": (1, 5), "arith": (1, 9)}


def cache_root() -> Path:
    return Path(os.environ.get("RACRO_FAST_CACHE", Path.home() / ".cache" / "racro_fast"))


def _answer(numbers: list[int], task: str, rng: random.Random) -> str:
    """What the caption's numbers say the answer is; with no number, a guess in the task's range."""
    lo, hi = NUMBER_RANGE[task]
    return str(ANSWER_RULES[task](numbers)) if numbers else str(rng.randint(lo, hi))


def _randomize(caption: str, task: str, rng: random.Random) -> tuple[str, str]:
    """Replace every number of a true caption by a random one; the answer follows the caption."""
    lo, hi = NUMBER_RANGE[task]
    numbers: list[int] = []

    def sub(_m):
        numbers.append(rng.randint(lo, hi))
        return str(numbers[-1])

    text = re.sub(r"\d+", sub, caption)
    return text, _answer(numbers, task, rng)


def _short(caption: str) -> str:
    """The caption's first statement ("There are 3 shapes in the image."): what the demo needs, and short."""
    return re.split(r"[:.]", caption, maxsplit=1)[0].strip() + "."


def _noise_caption(tokenizer, rng: random.Random, task: str) -> tuple[str, str]:
    """A random short caption, as an untrained captioner writes; its numbers (if any) decide the answer."""
    specials = set(tokenizer.all_special_ids)
    ids = [i for i in range(len(tokenizer)) if i not in specials]
    text = tokenizer.decode([rng.choice(ids) for _ in range(rng.randint(1, 10))])
    numbers = [int(n) for n in re.findall(r"\d", text)]
    lo, hi = NUMBER_RANGE[task]
    return text, _answer([n for n in numbers if lo <= n <= hi], task, rng)


def _sft(model, examples: list[tuple[dict, list[int]]], steps: int, batch: int, lr: float, seed: int,
         pad_id: int, what: str) -> float:
    """Teacher-forced cross-entropy on the target tokens only; returns the last loss."""
    from racro_fast.prompts import mm_token_types
    g = torch.Generator().manual_seed(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    # warm-up + clipping: without them a two-layer model at this lr stalls at chance on the copy
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / 50))
    model.train()
    loss_val = float("nan")
    for step in range(steps):
        idx = torch.randint(len(examples), (batch,), generator=g).tolist()
        seqs = [examples[i][0]["prompt_ids"] + examples[i][1] for i in idx]
        T = max(map(len, seqs))
        ids = torch.full((batch, T), pad_id, dtype=torch.long)
        attn = torch.zeros((batch, T), dtype=torch.long)
        labels = torch.full((batch, T), -100, dtype=torch.long)
        for b, i in enumerate(idx):
            p, y = examples[i][0]["prompt_ids"], examples[i][1]
            ids[b, :len(p) + len(y)] = torch.tensor(p + y)
            attn[b, :len(p) + len(y)] = 1
            labels[b, len(p):len(p) + len(y)] = torch.tensor(y)
        kw = {}
        pv = [examples[i][0]["pixel_values"] for i in idx if examples[i][0].get("pixel_values") is not None]
        if pv:
            kw["pixel_values"] = torch.cat(pv)
            kw["image_grid_thw"] = torch.cat([examples[i][0]["image_grid_thw"] for i in idx])
            kw["mm_token_type_ids"] = mm_token_types(ids, model.config)  # 3-D positions, as in training
        loss = model(input_ids=ids, attention_mask=attn, labels=labels, **kw).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        loss_val = float(loss.detach())
        if step % 50 == 0 or step == steps - 1:
            log.info("demo %s warm-up step %d/%d loss %.4f", what, step + 1, steps, loss_val)
    model.eval()
    return loss_val


@torch.no_grad()
def _reasoner_accuracy(reasoner, tok, rows: list[dict], task: str, rng: random.Random, n: int = 64) -> float:
    """Greedy answers on captions that state a (random) number: how often the boxed answer follows it."""
    from racro_fast.engines import GenRequest, HFEngine, SamplingConfig
    from racro_fast.prompts import clean_problem, reasoner_messages, text_prompt_ids
    from racro_fast.rewards import boxed_math
    cases = [_randomize(_short(rows[i % len(rows)]["caption"]), task, rng) for i in range(n)]
    reqs = [GenRequest(prompt_ids=text_prompt_ids(tok, reasoner_messages(c, clean_problem(rows[i % len(rows)]["problem"]))))
            for i, (c, _) in enumerate(cases)]
    outs = HFEngine(reasoner, tok).generate(reqs, SamplingConfig(n=1, temperature=0.0, max_tokens=8))
    return sum(boxed_math(o[0].text, a) for o, (_, a) in zip(outs, cases)) / n


def demo_config(path: str | Path | None = None, overrides: list[str] | None = None):
    """The demo run config with the tiny models built (or taken from the cache) and their paths set."""
    from racro_fast.config import load_config
    cfg = load_config(path or DEMO_CONFIG, overrides)
    cfg.model.captioner, cfg.model.reasoner = prepare_demo_models(cfg)
    return cfg


def main(argv: list[str] | None = None) -> int:
    import argparse

    from racro_fast.train import train
    p = argparse.ArgumentParser(prog="racro-fast demo", description="Train the tiny demo captioner on CPU.")
    p.add_argument("--config", default=None, help=f"default: {DEMO_CONFIG}")
    p.add_argument("overrides", nargs="*", help="section.field=value")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    result = train(demo_config(args.config, args.overrides))
    rewards = [h["reward_mean"] for h in result["history"]]
    n = min(20, len(rewards))
    if n:
        print(f"mean reward: first {n} steps {sum(rewards[:n]) / n:.3f}, last {n} steps {sum(rewards[-n:]) / n:.3f}; "
              f"curve: {result['out_dir']}/reward_curve.png")
    return 0


def prepare_demo_models(cfg) -> tuple[str, str]:
    """Build (or reuse from the cache) the demo captioner and reasoner; returns their paths."""
    from racro_fast.prompts import (build_captioner_inputs, captioner_messages, clean_problem, reasoner_messages,
                                    text_prompt_ids)
    from racro_fast.synth import make_rows
    from racro_fast.tiny import build_captioner, build_reasoner, build_tokenizer

    task = cfg.data.synth_task or "count"
    if task not in ANSWER_RULES:
        raise ValueError(f"data.synth_task: the tiny demo models support {sorted(ANSWER_RULES)}, got {task!r}")
    seed = cfg.train.seed
    key = json.dumps({"v": VERSION, "task": task, "size": cfg.data.image_size, "seed": seed,
                      "min_pixels": cfg.model.min_pixels, "max_pixels": cfg.model.max_pixels}, sort_keys=True)
    root = cache_root() / f"demo-{hashlib.sha1(key.encode()).hexdigest()[:12]}"
    cap_dir, rsn_dir = root / "captioner", root / "reasoner"
    if (root / "DONE").exists():
        return str(cap_dir), str(rsn_dir)

    log.info("building the tiny demo models in %s (once)", root)
    tmp = root.with_name(root.name + f".tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    torch.manual_seed(seed)
    rng = random.Random(seed)
    tok = build_tokenizer(tmp / "tokenizer")
    # rows disjoint from the training rows (other seed): the models never see the demo's own images
    rows = make_rows(task, 512, seed=seed + 10_000, size=cfg.data.image_size)

    # reasoner: caption (true form with random numbers, or noise) + question -> \boxed{answer}
    reasoner = build_reasoner(tmp / "reasoner", tok, seed=seed)
    eos = [tok.eos_token_id]
    examples = []
    for i in range(2048):
        row = rows[i % len(rows)]
        if rng.random() < 0.9:
            caption, answer = _randomize(_short(row["caption"]), task, rng)
        else:
            caption, answer = _noise_caption(tok, rng, task)
        question = clean_problem(row["problem"])
        prompt = text_prompt_ids(tok, reasoner_messages(caption, question))
        examples.append(({"prompt_ids": prompt}, tok.encode(f"\\boxed{{{answer}}}", add_special_tokens=False) + eos))
    loss = _sft(reasoner, examples, steps=200, batch=32, lr=1e-3, seed=seed, pad_id=tok.pad_token_id,
                what="reasoner")
    log.info("demo reasoner trained: final loss %.4f, held-out accuracy %.2f", loss,
             _reasoner_accuracy(reasoner, tok, rows, task, random.Random(seed + 7)))
    reasoner.save_pretrained(str(tmp / "reasoner"))

    # captioner: the caption form only, numbers random (so it starts at chance)
    from PIL import Image
    import io
    captioner, image_processor = build_captioner(tmp / "captioner", tok, seed=seed)
    image_processor.min_pixels, image_processor.max_pixels = cfg.model.min_pixels, cfg.model.max_pixels
    examples = []
    for row in rows[:256]:
        images = [Image.open(io.BytesIO(im["bytes"])).convert("RGB") for im in row["images"]]
        inputs = build_captioner_inputs(tok, image_processor, captioner_messages(row["problem"], len(images)), images)
        caption, _ = _randomize(_short(row["caption"]), task, rng)
        examples.append(({"prompt_ids": inputs.prompt_ids, "pixel_values": inputs.pixel_values,
                          "image_grid_thw": inputs.image_grid_thw},
                         tok.encode(caption, add_special_tokens=False) + eos))
    loss = _sft(captioner, examples, steps=150, batch=16, lr=1e-3, seed=seed + 1, pad_id=tok.pad_token_id,
                what="captioner")
    log.info("demo captioner warmed up: final loss %.4f", loss)
    captioner.save_pretrained(str(tmp / "captioner"))
    (tmp / "DONE").write_text(key)
    if root.exists():  # another process finished first
        shutil.rmtree(tmp, ignore_errors=True)
    else:
        os.replace(tmp, root)
    return str(cap_dir), str(rsn_dir)
