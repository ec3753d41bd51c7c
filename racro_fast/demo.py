"""The CPU demo: `racro-fast demo` builds (or reuses) a tiny captioner and reasoner, trains the
captioner with GRPO, then scores it per question family against the captioner it started from.

    racro-fast demo                                   # configs/demo_cpu.yaml: about 2 min on 2 cores
                                                      # (and 5 more the first time, building the models)
    racro-fast demo train.steps=20 run.output_dir=runs/short
    racro-fast demo --no-eval

`demo_config` loads the demo YAML (overrides as for `racro-fast train`), builds the pair and puts
their paths into model.captioner / model.reasoner; `train` then runs on them like on any checkpoint.

There is no model hub on a CPU box, so the demo builds its own pair from configs, on synthetic
scenes (synth.make_scene_rows: up to four shapes, each big or small, a square, a bar or a pillar,
solid or hollow; every question needs one fact of the scene):

- reasoner: a two-layer Qwen2 trained to read a caption and the question, restate the fact the
  question needs and box its colour or count (scene_answer is the rule, scene_reasoning the text).
  When the caption does not state that fact it answers "unknown", which is never right: it does
  not guess, so a caption earns its reward only by stating what the question needs. It never sees
  an image, and is frozen, as in RACRO.
- captioner: a two-layer Qwen2.5-VL (embeddings tied, as in Qwen2.5-VL-3B) pre-trained on generic
  captions, for questions of two families only (SCENE_PRETRAIN_FAMILIES). A generic caption opens by
  saying what the image is (PREAMBLE, "an image in detail.") and then states every fact of the
  scene: first in the canonical order, always with the opening, then in a random order, where half
  of the captions (PREAMBLE_SHARE) open with it, a quarter (ASKED_FIRST) state the fact their
  question asks first, as an instruction-tuned captioner's habit of mentioning what it is asked
  about, and a quarter (COUNT_FIRST) the count. Under the 5-token caption budget of
  configs/demo_cpu.yaml the opening alone fills the caption, and without it one or two facts fit:
  dropping the opening and choosing the facts is what CRO has to teach, from the reasoner's verdicts
  alone, on all four families, two of which (count, colour_of_fill) pre-training never asked. The
  greedy pre-trained captioner opens every caption the same way, so it answers no question whatever
  the machine's numerics; without the opening, which fact a random-order mix ranks first was left to
  chance (the asked one for one family on one CPU, for none on another).

The reasoner (with the tokenizer) and the captioner are cached apart, each under a key that covers
everything that changes it; `RACRO_FAST_CACHE` moves the cache. The pre-trained captioner's held-out
scores are kept beside it (pretrained_accuracy), so a second run scores only the trained one.
"""
from __future__ import annotations

import argparse
import hashlib
import io
import json
import logging
import os
import random
import re
import shutil
import time
from pathlib import Path

import torch
from PIL import Image
from transformers import AutoTokenizer

from racro_fast.config import load_config
from racro_fast.engines import GenRequest, HFEngine, SamplingConfig
from racro_fast.eval_data import load_benchmark
from racro_fast.evaluate import EvalConfig, evaluate
from racro_fast.forward import Sample, collate
from racro_fast.prompts import (build_captioner_inputs, captioner_messages, clean_problem, mm_token_types,
                                reasoner_messages, text_prompt_ids)
from racro_fast.rewards import boxed_math
from racro_fast.synth import ATTRIBUTES, COLORS, FAMILIES, count_fact, make_rows, value_fact, write_synth
from racro_fast.tiny import build_captioner, build_reasoner, build_tokenizer
from racro_fast.train import train

log = logging.getLogger("racro_fast.demo")

REASONER_VERSION = 1  # bump when the tokenizer or reasoner recipe below changes
CAPTIONER_VERSION = 2  # bump when the captioner recipe below changes
# A generic caption opens by saying what the image is; under the 5-token budget nothing else fits
# (and the reasoner reads no count or colour in it). Every canonical pre-training caption opens with
# it, and this share of those in random fact order.
PREAMBLE = "an image in detail."
PREAMBLE_SHARE = 0.5
# the shares of the pre-training captions in random fact order that state the fact their question
# asks first, and that state the count first (as a generic caption often does)
ASKED_FIRST = 0.25
COUNT_FIRST = 0.25
DEMO_CONFIG = Path(__file__).resolve().parent.parent / "configs" / "demo_cpu.yaml"


def cache_root() -> Path:
    return Path(os.environ.get("RACRO_FAST_CACHE", Path.home() / ".cache" / "racro_fast"))


def _sft(model, examples: list[tuple], steps: int, batch: int, lr: float, seed: int,
         pad_id: int, what: str) -> float:
    """Teacher-forced cross-entropy on the target tokens only; returns the last loss.
    examples: (prompt dict, target ids, ...) tuples."""
    g = torch.Generator().manual_seed(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    # warm-up + clipping: without them a two-layer model at this lr stalls at chance on the copy;
    # the linear decay to zero leaves the last steps' noise out of the saved model
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / 50) * (1 - s / steps))
    model.train()
    loss_val = float("nan")
    for step in range(steps):
        idx = torch.randint(len(examples), (batch,), generator=g).tolist()
        batch_ = collate([Sample(examples[i][0]["prompt_ids"] + examples[i][1], len(examples[i][0]["prompt_ids"]),
                                 examples[i][0].get("pixel_values"), examples[i][0].get("image_grid_thw"))
                          for i in idx], pad_id, torch.device("cpu"))
        ids = batch_["input_ids"]  # (B, T)
        labels = torch.full_like(ids, -100)  # the model shifts them: position t is scored on token t
        labels[:, 1:][batch_["mask"]] = ids[:, 1:][batch_["mask"]]
        kw = {}
        if "pixel_values" in batch_:
            kw["pixel_values"], kw["image_grid_thw"] = batch_["pixel_values"], batch_["image_grid_thw"]
            kw["mm_token_type_ids"] = mm_token_types(ids, model.config)  # 3-D positions, as in training
        loss = model(input_ids=ids, attention_mask=batch_["attention_mask"], labels=labels, **kw).loss
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


# --------------------------------------------------------------------------- the scene demo

# The captioner's pre-training prompts ask questions of these families only; the other two (count,
# colour_of_fill) are first asked in CRO.
SCENE_PRETRAIN_FAMILIES = ["colour_of_size", "colour_of_kind"]
UNKNOWN = "unknown"  # the reasoner's answer when the caption does not state what the question needs
_VALUES = [v for values in ATTRIBUTES.values() for v in values]


def _needed_key(question: str) -> str | None:
    """The attribute value a scene question picks its shape by ("big"); None for a count question."""
    words = re.findall(r"[a-z]+", question.lower())
    return next((v for v in _VALUES if v in words), None)


def scene_answer(caption: str, question: str) -> str:
    """What a caption says the answer to a scene question is: the rule the demo reasoner learns.

    A count question takes the number of the caption's "3 shapes" fact; "What colour is the big
    shape?" the first colour of its "big" fact, the word right after "big". A caption that does not
    state it gives UNKNOWN, which no answer grades equal to: the reasoner does not guess (and a
    stray digit or colour answers nothing).
    """
    key = _needed_key(question)
    if key is None:
        m = re.search(r"\b(\d+) shapes?\b", caption)
        return m.group(1) if m else UNKNOWN
    m = re.search(rf"\b{key} ({'|'.join(COLORS)})\b", caption)
    return m.group(1) if m else UNKNOWN


def scene_reasoning(caption: str, question: str) -> str:
    """The demo reasoner's completion: the one step it takes (it restates the fact it looked up),
    then the boxed answer: "The big red. \\boxed{red}", "3 shapes. \\boxed{3}",
    "The big unknown. ...". The step writes " big" as the question and the caption do (one token):
    the colour is then the token after the caption's " big", a copy a two-layer model learns."""
    key, answer = _needed_key(question), scene_answer(caption, question)
    step = f"{answer} shapes." if key is None else f"The {key} {answer}."
    return f"{step} \\boxed{{{answer}}}"


def _fact(key: str | None, rng: random.Random) -> str:
    """A fact with random content: the count (key None) or one or two colours of an attribute value."""
    if key is None:
        return count_fact(rng.randint(1, 4))
    picked = rng.sample(list(COLORS), rng.choice((1, 1, 2)))
    return value_fact(key, [c for c in COLORS if c in picked])


def _scene_reasoner_examples(tok, rows: list[dict], rng: random.Random, n: int, budget: int) -> list:
    """(prompt, target ids, answer) triples on captions as a captioner under a budget writes them:
    one to three facts with random content, half of them stating the key the question needs (first,
    half of the time), mostly cut after 1..2*budget tokens. The content is random so the reasoner
    reads it: it never sees a scene."""
    keys = [None, *_VALUES]
    examples = []
    for i in range(n):
        question = clean_problem(rows[i % len(rows)]["problem"])
        need = _needed_key(question)
        chosen = rng.sample([k for k in keys if k != need], rng.randint(1, 3))
        if rng.random() < 0.5:
            chosen.insert(0 if rng.random() < 0.5 else rng.randint(0, len(chosen)), need)
            chosen = chosen[:3]
        ids = tok.encode(" " + " ".join(_fact(k, rng) for k in chosen), add_special_tokens=False)
        if rng.random() < 0.7:
            ids = ids[:rng.randint(1, 2 * budget)]
        caption = tok.decode(ids)
        prompt = text_prompt_ids(tok, reasoner_messages(caption, question))
        target = tok.encode(scene_reasoning(caption, question), add_special_tokens=False)
        examples.append(({"prompt_ids": prompt}, target + [tok.eos_token_id], scene_answer(caption, question)))
    return examples


def _scene_captioner_examples(tok, image_processor, rows: list[dict], rng: random.Random,
                              asked_first: float, count_first: float, preamble: float) -> tuple[list, list]:
    """Generic captions of every fact: in the canonical order after PREAMBLE, and in a random order,
    where a share `asked_first` of them puts the fact the row's question asks first, `count_first`
    the count, and a share `preamble` opens with PREAMBLE. A caption starts with a space, so its first
    fact's key is the token the question has (" big", not "big")."""
    fixed, shuffled = [], []
    eos = [tok.eos_token_id]
    for row in rows:
        images = [Image.open(io.BytesIO(im["bytes"])).convert("RGB") for im in row["images"]]
        inputs = build_captioner_inputs(tok, image_processor, captioner_messages(row["problem"], len(images)), images)
        prompt = {"prompt_ids": inputs.prompt_ids, "pixel_values": inputs.pixel_values,
                  "image_grid_thw": inputs.image_grid_thw}
        fixed.append((prompt, tok.encode(" " + " ".join([PREAMBLE, *row["facts"]]), add_special_tokens=False)
                      + eos))
        order = rng.sample(row["facts"], len(row["facts"]))
        first = rng.random()
        if first < asked_first + count_first:  # the asked fact, or the count, first
            lead = row["needs"] if first < asked_first else row["facts"][0]
            order.remove(lead)
            order.insert(0, lead)
        if rng.random() < preamble:
            order.insert(0, PREAMBLE)
        shuffled.append((prompt, tok.encode(" " + " ".join(order), add_special_tokens=False) + eos))
    return fixed, shuffled


@torch.no_grad()
def _reasoner_agreement(reasoner, tok, rows: list[dict], rng: random.Random, budget: int,
                        n: int = 128) -> tuple[float, float]:
    """Greedy answers on held-out captions of the training form: how often the boxed answer is
    scene_answer's, on captions that state what the question needs and on those that do not
    (where the answer is UNKNOWN)."""
    examples = _scene_reasoner_examples(tok, rows, rng, n, budget)
    reqs = [GenRequest(prompt_ids=prompt["prompt_ids"]) for prompt, *_ in examples]
    outs = HFEngine(reasoner, tok).generate(reqs, SamplingConfig(n=1, temperature=0.0, max_tokens=16))
    hits = {True: [], False: []}
    for o, (_, _, answer) in zip(outs, examples):
        hits[answer != UNKNOWN].append(boxed_math(o[0].text, answer))
    return tuple(sum(h) / max(1, len(h)) for h in (hits[True], hits[False]))


def demo_config(path: str | Path | None = None, overrides: list[str] | None = None):
    """The demo run config with the tiny models built (or taken from the cache) and their paths set."""
    cfg = load_config(path or DEMO_CONFIG, overrides)
    cfg.model.captioner, cfg.model.reasoner = prepare_demo_models(cfg)
    return cfg


def _held_out(cfg, data_dir: Path, n: int) -> list[Path]:
    """The held-out scenes, a file per family, written to data_dir unless there already."""
    files = []
    for family in FAMILIES:
        files.append(data_dir / f"{family}_{n}.parquet")
        if not files[-1].exists():
            write_synth(str(files[-1]), n, task="scene", seed=cfg.train.seed + 4242, size=cfg.data.image_size,
                        families=[family])
    return files


def family_accuracy(cfg, captioner: str | Path, out_dir: str | Path, n: int = 128,
                    temperature: float = 0.0, data_dir: str | Path | None = None) -> dict[str, float]:
    """The frozen demo reasoner's accuracy per question family on n held-out scenes each (rows no
    model saw: another seed), reading `captioner`'s captions under the run's caption budget: one
    evaluation over a file per family (benchmark "<family>_<n>"). The scenes are written to data_dir
    (default out_dir/data) once and reused by later calls."""
    files = _held_out(cfg, Path(data_dir) if data_dir is not None else Path(out_dir) / "data", n)
    res = evaluate(EvalConfig(captioner, [cfg.model.reasoner], files, modes=["caption"], out_dir=str(out_dir),
                              engine="hf", caption_temperature=temperature, reasoner_temperature=0.0,
                              max_caption_tokens=cfg.rollout.max_caption_tokens,
                              max_reasoner_tokens=cfg.rollout.max_reasoner_tokens, seed=cfg.train.seed))
    column = f"{Path(cfg.model.reasoner).name}/caption"
    return {family: res["accuracy"][f"{family}_{n}"][column] for family in FAMILIES}


def value_accuracy(eval_dir: str | Path, data_dir: str | Path, n: int = 128) -> tuple[dict[str, float], dict]:
    """Accuracy per asked value (big, small, square, bar, pillar, solid, hollow; "count" for the count
    questions) from the records `family_accuracy` wrote to eval_dir, and up to 3 sample captions
    per value. A habit per family shows here as one value high and its twin near zero."""
    questions = {(f"{family}_{n}", it.id): it.question for family in FAMILIES
                 for it in load_benchmark(Path(data_dir) / f"{family}_{n}.parquet").items}
    hits: dict[str, list[bool]] = {}
    samples: dict[str, list[str]] = {}
    for line in (Path(eval_dir) / "records.jsonl").read_text().splitlines():
        rec = json.loads(line)
        question = questions[rec["benchmark"], rec["id"]]
        value = _needed_key(question) or "count"
        hits.setdefault(value, []).append(bool(rec["verdict"]))
        if len(samples.setdefault(value, [])) < 3:
            samples[value].append(f"{clean_problem(question)} -> {rec['caption']!r} -> {rec['extracted']}")
    order = ["count", *_VALUES]
    return ({v: sum(hits[v]) / len(hits[v]) for v in order if v in hits},
            {v: samples[v] for v in order if v in samples})


def pretrained_accuracy(cfg, captioner: str, out_dir: Path, temperature: float, data_dir: Path,
                        n: int = 128) -> dict[str, float]:
    """family_accuracy of the cached pre-trained `captioner`, itself cached beside it: its evaluation
    directory is kept under <captioner cache>/scores and copied to out_dir, this run and later ones."""
    key = json.dumps({"n": n, "temperature": temperature, "budget": cfg.rollout.max_caption_tokens,
                      "reasoner_tokens": cfg.rollout.max_reasoner_tokens, "seed": cfg.train.seed,
                      "size": cfg.data.image_size}, sort_keys=True)
    store = Path(captioner).parent / "scores" / hashlib.sha1(key.encode()).hexdigest()[:12]

    def score(tmp: Path) -> None:
        acc = family_accuracy(cfg, captioner, tmp, n=n, temperature=temperature, data_dir=data_dir)
        (tmp / "families.json").write_text(json.dumps(acc))  # beside evaluate()'s own accuracy.json

    _build_once(store, key, score)
    shutil.copytree(store, out_dir, dirs_exist_ok=True)
    _held_out(cfg, data_dir, n)  # the scenes value_accuracy reads the questions from
    return json.loads((store / "families.json").read_text())


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="racro-fast demo", description="Train the tiny demo captioner on CPU.")
    p.add_argument("--config", default=None, help=f"default: {DEMO_CONFIG}")
    p.add_argument("--no-eval", action="store_true", help="skip the per-family evaluation before and after")
    p.add_argument("overrides", nargs="*", help="section.field=value")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    cfg = demo_config(args.config, args.overrides)
    pretrained = cfg.model.captioner
    result = train(cfg)
    rewards = [h["reward_mean"] for h in result["history"]]
    n = min(20, len(rewards))
    if n:
        print(f"mean reward: first {n} steps {sum(rewards[:n]) / n:.3f}, last {n} steps {sum(rewards[-n:]) / n:.3f}; "
              f"curve: {result['out_dir']}/reward_curve.png")
    if args.no_eval or not cfg.run.export:
        return 0
    out = Path(result["out_dir"])
    table, values, samples, families = {}, {}, {}, out / "families"
    shutil.rmtree(families, ignore_errors=True)  # evaluate() resumes: start from nothing
    for name, temperature in (("greedy", 0.0), ("sampled", cfg.rollout.temperature)):
        for who in ("pretrained", "after_cro"):
            key, where, data = f"{who}/{name}", families / f"{who}-{name}", families / "data"
            table[key] = (pretrained_accuracy(cfg, pretrained, where, temperature, data) if who == "pretrained"
                          else family_accuracy(cfg, out / "export", where, temperature=temperature, data_dir=data))
            values[key], samples[key] = value_accuracy(where, data)
    (out / "families.json").write_text(json.dumps(table, indent=1))
    (out / "values.json").write_text(json.dumps({"accuracy": values, "samples": samples}, indent=1))
    print(f"held-out accuracy of the frozen reasoner per question family, captions of <= "
          f"{cfg.rollout.max_caption_tokens} tokens (greedy | sampled at T={cfg.rollout.temperature}):")
    print(f"{'family':<16}{'pre-trained':>22}{'after CRO':>22}")
    for family in table["pretrained/greedy"]:
        cells = [" | ".join(f"{table[f'{who}/{name}'][family]:.2f}" for name in ("greedy", "sampled"))
                 for who in ("pretrained", "after_cro")]
        seen = "" if family in SCENE_PRETRAIN_FAMILIES else "  (not asked in pre-training)"
        print(f"{family:<16}{cells[0]:>22}{cells[1]:>22}{seen}")
    print("per asked value:")
    for value in values["pretrained/greedy"]:
        cells = [" | ".join(f"{values[f'{who}/{name}'].get(value, float('nan')):.2f}" for name in ("greedy", "sampled"))
                 for who in ("pretrained", "after_cro")]
        print(f"{value:<16}{cells[0]:>22}{cells[1]:>22}")
    print("greedy captions after CRO (question -> caption -> the reasoner's answer):")
    for value, lines in samples["after_cro/greedy"].items():
        for line in lines:
            print(f"  {value:<8} {line}")
    print(f"written: {out / 'families.json'}, {out / 'values.json'}")
    return 0


def _build_once(root: Path, key: str, build) -> Path:
    """root, built once by build(tmp_dir) into a temporary directory that then replaces it whole: a
    process that finds root/DONE reuses it, two builders race harmlessly, a failed build leaves nothing."""
    if (root / "DONE").exists():
        return root
    tmp = root.with_name(root.name + f".tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        build(tmp)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    (tmp / "DONE").write_text(key)
    if (root / "DONE").exists():  # another process finished first
        shutil.rmtree(tmp, ignore_errors=True)
    else:  # an unfinished root (no DONE) is replaced
        shutil.rmtree(root, ignore_errors=True)
        os.replace(tmp, root)
    return root


def _cached(kind: str, key: dict, build) -> Path:
    """The demo cache directory of `kind` for `key` (demo-<kind>-<hash>), built once by build(tmp_dir)."""
    text = json.dumps(key, sort_keys=True)
    root = cache_root() / f"demo-{kind}-{hashlib.sha1(text.encode()).hexdigest()[:12]}"
    if not (root / "DONE").exists():
        log.info("building the tiny demo %s in %s (once)", kind, root)
        start = time.monotonic()
        _build_once(root, text, build)
        log.info("demo %s built in %.0f s", kind, time.monotonic() - start)
    return root


def _scene_rows(cfg, pretraining: bool = False) -> list[dict]:
    """Scenes of other seeds than the training rows' (the models never see the demo's own images):
    1024 rows of every family, or the captioner's pre-training rows, of SCENE_PRETRAIN_FAMILIES."""
    seed, size = cfg.train.seed, cfg.data.image_size
    if pretraining:
        return make_rows("scene", 1024, seed=seed + 20_000, size=size, families=SCENE_PRETRAIN_FAMILIES)
    return make_rows("scene", 1024, seed=seed + 10_000, size=size)


def _build_reasoner(tmp: Path, cfg) -> None:
    """The scene tokenizer and the frozen reasoner, trained on captions of the budget's form."""
    seed, budget = cfg.train.seed, cfg.rollout.max_caption_tokens
    rows = _scene_rows(cfg)
    torch.manual_seed(seed)
    rng = random.Random(seed)
    # the scene words get tokens of their own ("unknown" among them: one token for the abstention)
    questions = sorted({clean_problem(r["problem"]) for r in rows})
    extra = [r["caption"] for r in rows[:300]] + questions * 4
    extra += [scene_reasoning(r["caption"], q) for r in rows[:100] for q in questions[:8]]
    extra += [f"The {v} {UNKNOWN}. \\boxed{{{UNKNOWN}}}" for v in _VALUES] * 4
    tok = build_tokenizer(tmp / "tokenizer", vocab_size=320, extra=extra)
    # reasoner: caption + question -> one restating step and \boxed{answer}, from the caption's facts
    # (a key/value head per query head: with one shared, the look-up takes twice the steps to form)
    reasoner = build_reasoner(tmp / "reasoner", tok, seed=seed, kv_heads=2)
    examples = _scene_reasoner_examples(tok, rows, rng, 8192, budget)
    loss = _sft(reasoner, examples, steps=1200, batch=32, lr=1e-3, seed=seed, pad_id=tok.pad_token_id,
                what="reasoner")
    log.info("demo reasoner trained: final loss %.4f; held-out answers as the rule gives them: %.2f "
             "where the caption states what the question needs, %.2f where not", loss,
             *_reasoner_agreement(reasoner, tok, rows, random.Random(seed + 7), budget))
    reasoner.save_pretrained(str(tmp / "reasoner"))


def _build_captioner(tmp: Path, cfg, tokenizer_dir: Path) -> None:
    """The captioner before CRO: generic captions (PREAMBLE, then every fact of a scene), for
    questions of SCENE_PRETRAIN_FAMILIES only."""
    seed = cfg.train.seed
    pretrain_rows = _scene_rows(cfg, pretraining=True)
    tok = AutoTokenizer.from_pretrained(str(tokenizer_dir))
    torch.manual_seed(seed)
    rng = random.Random(seed + 1)
    captioner, image_processor = build_captioner(tmp / "captioner", tok, seed=seed, kv_heads=2, tied=True)
    image_processor.min_pixels, image_processor.max_pixels = cfg.model.min_pixels, cfg.model.max_pixels
    image_processor.save_pretrained(str(tmp / "captioner"))
    fixed, shuffled = _scene_captioner_examples(tok, image_processor, pretrain_rows, rng, ASKED_FIRST,
                                                COUNT_FIRST, PREAMBLE_SHARE)
    loss = _sft(captioner, fixed, steps=1500, batch=16, lr=1e-3, seed=seed + 1, pad_id=tok.pad_token_id,
                what="captioner")
    loss = _sft(captioner, shuffled, steps=300, batch=16, lr=1e-3, seed=seed + 2, pad_id=tok.pad_token_id,
                what="captioner (facts in random order)")
    log.info("demo captioner pre-trained: final loss %.4f", loss)
    captioner.save_pretrained(str(tmp / "captioner"))


def prepare_demo_models(cfg) -> tuple[str, str]:
    """Build (or reuse from the cache) the demo captioner and reasoner; returns their paths. They are
    cached apart: a change to the captioner's recipe keeps the reasoner (and its tokenizer)."""
    if cfg.data.synth_task != "scene":
        raise ValueError(f"data.synth_task: the tiny demo models are built for 'scene', got {cfg.data.synth_task!r}")
    reasoner_key = {"v": REASONER_VERSION, "size": cfg.data.image_size, "seed": cfg.train.seed,
                    "budget": cfg.rollout.max_caption_tokens}
    rsn = _cached("reasoner", reasoner_key, lambda tmp: _build_reasoner(tmp, cfg))
    captioner_key = {"v": CAPTIONER_VERSION, "reasoner": reasoner_key, "asked_first": ASKED_FIRST,
                     "preamble": PREAMBLE, "preamble_share": PREAMBLE_SHARE, "count_first": COUNT_FIRST,
                     "min_pixels": cfg.model.min_pixels, "max_pixels": cfg.model.max_pixels}
    cap = _cached("captioner", captioner_key, lambda tmp: _build_captioner(tmp, cfg, rsn / "tokenizer"))
    return str(cap / "captioner"), str(rsn / "reasoner")
