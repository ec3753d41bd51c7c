"""Evaluate a captioner with plug-and-play text reasoners: accuracy per benchmark x (reasoner, mode).

    racro-fast eval --captioner runs/racro/final \\
        --reasoner deepseek-ai/DeepSeek-R1-Distill-Qwen-32B --reasoner Qwen/Qwen3-8B \\
        --data MathVista/testmini.parquet --data MathVerse/testmini.parquet \\
        --mode caption joint direct --out runs/eval

One process, one model in memory at a time: the captioner first (captions and its own
step-by-step answers, each produced once per item and cached), then each reasoner in turn,
the previous one freed. vLLM when it imports and CUDA is present (`--engine auto`), HF
`generate` otherwise. Paper defaults: greedy captions, reasoner temperature 0.6, top-p 0.95.

Modes, each a column per reasoner:
  caption  captioner prompt from training -> caption -> reasoner prompt -> reasoner answer
  joint    the captioner also answers with the direct prompt; the reasoner reads the caption
           beside that tentative answer (JOINT_TEMPLATE) and keeps it unless it sees evidence
           against it
  direct   the captioner answers alone (the baseline; one column, no reasoner)

Everything goes under --out: `captions.jsonl` (the captioner's outputs per item),
`records.jsonl` (one line per item x reasoner x mode with the verdict), and the table as
`accuracy.md`, `.csv`, `.json` and a bar chart `accuracy.png`. Lines are appended and flushed
per generation batch; a rerun reads them back and redoes nothing already there. Resume
matches items by (benchmark, id) only: after changing a sampling setting, use a fresh --out
(`run.json` says what the last run used).

Left out on purpose:
- the paper's LLM judge: answers are graded by boxed extraction, math-verify equivalence and
  choice letters / option text, so numbers are comparable between runs here, not to Table 1;
- data parallelism across GPUs: one vLLM engine (tensor-parallel within it if configured) is
  enough for evaluation-sized benchmarks, and resume makes a long run safe to restart.
"""

from __future__ import annotations

import argparse
import csv
import gc
import json
import logging
import sys
import time
from collections import Counter, defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from racro_fast import models
from racro_fast.engines import MM_LIMITS, Engine, GenRequest, HFEngine, SamplingConfig, standalone_vllm
from racro_fast.eval_data import BenchFile, BenchItem, LayoutError, load_benchmark
from racro_fast.jsonl import JsonlStore
from racro_fast.plots import grouped_bars
from racro_fast.prompts import (
    build_captioner_inputs,
    captioner_messages,
    direct_messages,
    joint_messages,
    reasoner_messages,
    text_prompt_ids,
)
from racro_fast.reasoner import build_reasoner_engine
from racro_fast.reward_pool import RewardScorer
from racro_fast.rewards import extract_boxed

logger = logging.getLogger(__name__)

MODES = ("caption", "joint", "direct")
DIRECT_REASONER = "captioner"  # the direct mode has no reasoner: the captioner answers
DIRECT_COLUMN = f"{DIRECT_REASONER}/direct"
BAD_INPUT = "bad input"  # an item whose prompt could not be built (counted in the footer)


# ---------------------------------------------------------------------------- prompts


def caption_prompt(item: BenchItem) -> list[dict]:
    return captioner_messages(item.question, len(item.images))


def answer_prompt(item: BenchItem) -> list[dict]:
    return direct_messages(item.question, len(item.images))


def reasoner_prompt(item: BenchItem, mode: str, caption: str, captioner_answer: str | None = None) -> list[dict]:
    """The reasoner's chat messages for one item in `caption` or `joint` mode."""
    if mode == "caption":
        return reasoner_messages(caption, item.question)
    if mode == "joint":
        return joint_messages(caption, item.question, tentative_answer(captioner_answer or ""))
    raise ValueError(f"mode: no reasoner prompt in mode {mode!r}")


def tentative_answer(captioner_answer: str) -> str:
    """What joint mode hands the reasoner: the captioner's boxed answer, else its whole reply."""
    boxed = extract_boxed(captioner_answer)
    return boxed.strip() if boxed is not None else captioner_answer.strip()


def column(reasoner: str, mode: str) -> str:
    return f"{reasoner}/{mode}"


# ---------------------------------------------------------------------------- records


def _key(item: BenchItem) -> tuple[str, str]:
    return item.benchmark, item.id


# ---------------------------------------------------------------------------- engines


def resolve_engine(kind: str) -> str:
    if kind == "auto":
        try:
            import vllm  # noqa: F401
        except ImportError:
            return "hf"
        return "vllm" if torch.cuda.is_available() else "hf"
    if kind not in ("vllm", "hf"):
        raise ValueError(f"engine: expected auto, vllm or hf, got {kind!r}")
    return kind


def _device_dtype() -> tuple[torch.device, torch.dtype]:
    if torch.cuda.is_available():
        return torch.device("cuda"), torch.bfloat16
    return torch.device("cpu"), torch.float32


def load_captioner(path: str, engine: str, batch_size: int, max_tokens: int, seed: int) -> tuple[Engine, Any, Any]:
    """(engine, tokenizer, image_processor) for the captioner."""
    tokenizer, image_processor = models.load_processors(path)
    if engine == "vllm" and not torch.cuda.is_available():
        # vLLM's Qwen2.5-VL imports torchvision, which does not load with CPU torch.
        logger.info("no CUDA: the captioner runs on HF generate; vLLM serves the reasoners only")
        engine = "hf"
    if engine == "vllm":
        # Room for the image tokens and question besides the answer.
        return (standalone_vllm(path, max_tokens + 8192, seed, limit_mm_per_prompt=MM_LIMITS), tokenizer,
                image_processor)
    device, dtype = _device_dtype()
    model = models.load_captioner(path, dtype, device).eval()
    return HFEngine(model, tokenizer, batch_size=batch_size), tokenizer, image_processor


def split_reasoner(spec: str) -> tuple[str, str | None]:
    """A reasoner is `PATH`, or `PATH@URL`: a vLLM server already serving it at URL, its chat
    template read from PATH (the training loop's rollout.reasoner_url client)."""
    path, sep, rest = spec.partition("@http")
    return (path, "http" + rest) if sep else (spec, None)


def load_reasoner(spec: str, engine: str, batch_size: int, max_tokens: int, seed: int) -> tuple[Engine, Any]:
    """(engine, tokenizer) for a text reasoner (see `split_reasoner`)."""
    path, url = split_reasoner(spec)
    device, dtype = _device_dtype()
    return build_reasoner_engine(path, engine, url=url or "", dtype=dtype, device=device, batch_size=batch_size,
                                 max_tokens=max_tokens, seed=seed)


def release_memory() -> None:
    """Collect a dropped engine now, so that the next model finds its memory free."""
    gc.collect()
    if "vllm" in sys.modules:
        # vLLM keeps its (single-process) parallel groups alive after the LLM is gone, and
        # the next LLM in this process would refuse to initialise them again.
        from vllm.distributed.parallel_state import destroy_distributed_environment, destroy_model_parallel

        destroy_model_parallel()
        destroy_distributed_environment()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


# ---------------------------------------------------------------------------- the run


@dataclass
class EvalConfig:
    """One evaluation: what is evaluated, on what, and how it samples (`racro-fast eval`'s flags)."""
    captioner: str  # Qwen2.5-VL checkpoint directory or hub id
    reasoners: list[str]  # PATH, or PATH@URL for a vLLM server already serving it; evaluated in turn
    data: list[str]  # benchmark files: parquet / jsonl / json
    modes: list[str] = field(default_factory=lambda: ["caption"])  # of MODES
    out_dir: str = "runs/eval"  # rerunning into it resumes
    engine: str = "auto"  # auto (vLLM when it imports and CUDA is present) | vllm | hf
    limit: int | None = None  # first N rows of each file
    batch_size: int | None = None  # prompts per generation call (None: hf 64, vllm 512)
    caption_temperature: float = 0.0  # the paper's: greedy captions
    reasoner_temperature: float = 0.6
    reasoner_top_p: float = 0.95
    max_caption_tokens: int = 2048  # also bounds the captioner's own answers
    max_reasoner_tokens: int = 8192
    layout: str | None = None  # force a benchmark layout instead of detecting it
    seed: int = 0
    grade_timeout: float = 10.0  # seconds per graded answer

    def __post_init__(self) -> None:
        for m in self.modes:
            if m not in MODES:
                raise ValueError(f"mode: expected one of {MODES}, got {m!r}")
        self.modes = list(dict.fromkeys(self.modes))
        if any(m != "direct" for m in self.modes) and not self.reasoners:
            raise ValueError("reasoners: the caption and joint modes need at least one --reasoner")
        self.captioner = str(self.captioner)
        self.reasoners = [str(r) for r in self.reasoners]
        self.data = [str(d) for d in self.data]
        self.engine = resolve_engine(self.engine)
        self.batch_size = self.batch_size or (512 if self.engine == "vllm" else 64)


class Grader:
    """Verdicts of predicted answers against items, through reward workers started on first use."""

    def __init__(self, timeout: float) -> None:
        self.timeout = timeout
        self.scorer: RewardScorer | None = None

    def __call__(self, preds: list[str | None], items: list[BenchItem]) -> list[bool]:
        if self.scorer is None:
            self.scorer = RewardScorer("eval_reward", timeout=self.timeout, workers=2)
        return [s > 0 for s in self.scorer.score([p or "" for p in preds], [it.grading_spec() for it in items])]

    def close(self) -> None:
        if self.scorer is not None:
            self.scorer.close()


@dataclass
class EvalRun:
    """What an evaluation has so far: the items, the captioner's outputs and the verdicts (both
    appended to their JSONL files as they come, and read back from them on a rerun)."""
    cfg: EvalConfig
    out: Path
    names: list[str]  # the reasoners' column names
    files: list[BenchFile]
    files_skipped: dict[str, str]  # path -> why the file was not evaluated
    items: list[BenchItem]
    skipped: dict[str, Counter]  # benchmark -> reason -> items
    captions: JsonlStore
    records: JsonlStore
    grade: Grader
    on_record: Callable[[dict], None] | None = None
    cached: dict[tuple[str, str, str], str] = field(default_factory=dict)  # (benchmark, id, kind) -> text
    done: set[tuple[str, str, str, str]] = field(default_factory=set)  # (benchmark, id, mode, reasoner)

    def write(self, store: JsonlStore, rec: dict) -> None:
        store.append(rec)
        if self.on_record is not None:
            self.on_record(rec)

    def close(self) -> None:
        self.captions.close()
        self.records.close()
        self.grade.close()


def evaluate(cfg: EvalConfig, on_record: Callable[[dict], None] | None = None) -> dict:
    """Run the evaluation and write the tables; returns

        {"accuracy": {benchmark: {"<reasoner>/<mode>": acc in [0, 1]}},
         "n": {benchmark: {column: items graded}},
         "skipped": {benchmark: {reason: items}}, "files_skipped": {path: reason},
         "columns": [...], "out_dir": str}

    Reasoners are named by their last path component; the direct mode's column is
    "captioner/direct". `on_record` is called with every record just written (the tests
    use it to interrupt a run).
    """
    run = start(cfg, on_record)
    try:
        captioner_pass(run)
        if "direct" in cfg.modes:
            direct_pass(run)
        for name, path in zip(run.names, cfg.reasoners):
            reasoner_pass(run, name, path)
    finally:
        run.close()
    result = tables(run)
    write_tables(result, run.out)
    return result


def load_data(cfg: EvalConfig) -> tuple[list[BenchFile], dict[str, str]]:
    """The benchmark files, each its own row (two files of one layout stay two rows), and the files
    that could not be read, with why."""
    files: list[BenchFile] = []
    files_skipped: dict[str, str] = {}
    for path in cfg.data:
        try:
            bf = load_benchmark(path, layout=cfg.layout, limit=cfg.limit)
        except LayoutError as e:
            files_skipped[path] = str(e)
            logger.warning("skipping %s: %s", path, e)
            continue
        if bf.benchmark in {f.benchmark for f in files}:
            bf.benchmark = f"{bf.benchmark}:{Path(path).stem}"
            for it in bf.items:
                it.benchmark = bf.benchmark
        files.append(bf)
    return files, files_skipped


def start(cfg: EvalConfig, on_record: Callable[[dict], None] | None = None) -> EvalRun:
    """The benchmarks loaded, run.json written and the earlier outputs under cfg.out_dir read back."""
    out = Path(cfg.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    names = reasoner_names(cfg.reasoners)
    files, files_skipped = load_data(cfg)
    (out / "run.json").write_text(json.dumps({
        "captioner": cfg.captioner, "reasoners": dict(zip(names, cfg.reasoners)), "modes": cfg.modes,
        "data": cfg.data, "engine": cfg.engine, "limit": cfg.limit,
        "caption_temperature": cfg.caption_temperature, "reasoner_temperature": cfg.reasoner_temperature,
        "reasoner_top_p": cfg.reasoner_top_p, "max_caption_tokens": cfg.max_caption_tokens,
        "max_reasoner_tokens": cfg.max_reasoner_tokens, "seed": cfg.seed}, indent=2))
    run = EvalRun(cfg, out, names, files, files_skipped, [it for bf in files for it in bf.items],
                  {bf.benchmark: Counter(bf.skipped) for bf in files}, JsonlStore(out / "captions.jsonl"),
                  JsonlStore(out / "records.jsonl"), Grader(cfg.grade_timeout), on_record)
    run.cached = {(r["benchmark"], r["id"], r["kind"]): r["text"] for r in run.captions.records}
    run.done = {(r["benchmark"], r["id"], r["mode"], r["reasoner"]) for r in run.records.records}
    return run


def captioner_pass(run: EvalRun) -> None:
    """The captioner's captions (caption, joint modes) and its own answers (joint, direct), once per
    item; an item whose prompt cannot be built is skipped and counted. The engine is loaded only
    when something is missing, and freed before this returns."""
    cfg = run.cfg
    need = (["caption"] if {"caption", "joint"} & set(cfg.modes) else []) + \
           (["answer"] if {"joint", "direct"} & set(cfg.modes) else [])
    todo = [(it, k) for it in run.items for k in need if (*_key(it), k) not in run.cached]
    if not todo:
        return
    bad: set[tuple[str, str]] = set()
    engine, tok, improc = load_captioner(cfg.captioner, cfg.engine, cfg.batch_size, cfg.max_caption_tokens, cfg.seed)
    sampling = SamplingConfig(n=1, temperature=cfg.caption_temperature, top_p=1.0,
                              max_tokens=cfg.max_caption_tokens, seed=cfg.seed)
    for start_i in range(0, len(todo), cfg.batch_size):
        chunk, requests = [], []
        for it, k in todo[start_i:start_i + cfg.batch_size]:
            if _key(it) in bad:
                continue
            try:
                images = it.pil_images()
                msgs = caption_prompt(it) if k == "caption" else answer_prompt(it)
                inp = build_captioner_inputs(tok, improc, msgs, images)
            except Exception as e:  # a bad item must not stop the run
                logger.warning("%s %s: cannot build the captioner prompt: %s", it.benchmark, it.id, e)
                bad.add(_key(it))
                run.skipped[it.benchmark][BAD_INPUT] += 1
                continue
            chunk.append((it, k))
            requests.append(GenRequest(prompt_ids=inp.prompt_ids, pixel_values=inp.pixel_values,
                                       image_grid_thw=inp.image_grid_thw, images=images,
                                       vllm_prompt_ids=inp.vllm_prompt_ids))
        if not requests:
            continue
        outs = engine.generate(requests, sampling)  # [chunk][1]
        for (it, k), (o,) in zip(chunk, outs):
            run.cached[(*_key(it), k)] = o.text
            run.write(run.captions, {"benchmark": it.benchmark, "id": it.id, "kind": k, "text": o.text,
                                     "truncated": o.truncated})
        _progress("captioner", min(start_i + cfg.batch_size, len(todo)), len(todo))
    engine.close()
    del engine
    release_memory()
    run.items = [it for it in run.items if _key(it) not in bad]


def direct_pass(run: EvalRun) -> None:
    """The direct mode: the captioner's own answers, graded."""
    batch = [it for it in run.items if (*_key(it), "direct", DIRECT_REASONER) not in run.done
             and (*_key(it), "answer") in run.cached]
    for start_i in range(0, len(batch), run.cfg.batch_size):
        chunk = batch[start_i:start_i + run.cfg.batch_size]
        texts = [run.cached[(*_key(it), "answer")] for it in chunk]
        preds = [extract_boxed(t) for t in texts]
        for it, text, pred, ok in zip(chunk, texts, preds, run.grade(preds, chunk)):
            run.write(run.records, _record(it, "direct", DIRECT_REASONER, None, text, None, pred, ok))


def reasoner_pass(run: EvalRun, name: str, path: str) -> None:
    """One reasoner over every item and mode it has not answered yet; loaded only when something is
    missing, and freed before this returns."""
    cfg = run.cfg
    r_modes = [m for m in cfg.modes if m != "direct"]
    todo = [(it, m) for it in run.items for m in r_modes
            if (*_key(it), m, name) not in run.done and (*_key(it), "caption") in run.cached
            and (m == "caption" or (*_key(it), "answer") in run.cached)]
    if not todo:
        return
    engine, tok = load_reasoner(path, cfg.engine, cfg.batch_size, cfg.max_reasoner_tokens, cfg.seed)
    sampling = SamplingConfig(n=1, temperature=cfg.reasoner_temperature, top_p=cfg.reasoner_top_p,
                              max_tokens=cfg.max_reasoner_tokens, seed=cfg.seed)
    for start_i in range(0, len(todo), cfg.batch_size):
        chunk = todo[start_i:start_i + cfg.batch_size]
        requests = []
        for it, m in chunk:
            msgs = reasoner_prompt(it, m, run.cached[(*_key(it), "caption")], run.cached.get((*_key(it), "answer")))
            requests.append(GenRequest(prompt_ids=text_prompt_ids(tok, msgs)))
        outs = engine.generate(requests, sampling)  # [chunk][1]
        preds = [extract_boxed(o.text) for (o,) in outs]
        verdicts = run.grade(preds, [it for it, _ in chunk])
        for (it, m), (o,), pred, ok in zip(chunk, outs, preds, verdicts):
            rec = _record(it, m, name, run.cached[(*_key(it), "caption")],
                          run.cached.get((*_key(it), "answer")) if m == "joint" else None, o.text, pred, ok)
            rec["truncated"] = o.truncated
            run.write(run.records, rec)
        _progress(name, min(start_i + cfg.batch_size, len(todo)), len(todo))
    engine.close()
    del engine
    release_memory()


def tables(run: EvalRun) -> dict:
    """The accuracy table from every record of the current items (this run's and earlier ones)."""
    columns = [column(n, m) for n in run.names for m in run.cfg.modes if m != "direct"]
    if "direct" in run.cfg.modes:
        columns.append(DIRECT_COLUMN)
    current = {_key(it) for it in run.items}
    hits: dict[str, dict[str, list[bool]]] = defaultdict(lambda: defaultdict(list))
    seen: set[tuple[str, str, str]] = set()
    for r in run.records.records:
        col = column(r["reasoner"], r["mode"])
        key = (r["benchmark"], r["id"], col)
        if (r["benchmark"], r["id"]) in current and col in columns and key not in seen:
            seen.add(key)
            hits[r["benchmark"]][col].append(bool(r["verdict"]))
    benches = [bf.benchmark for bf in run.files]
    return {
        "accuracy": {b: {c: sum(hits[b][c]) / len(hits[b][c]) for c in columns if hits[b][c]} for b in benches},
        "n": {b: {c: len(hits[b][c]) for c in columns} for b in benches},
        "skipped": {b: dict(run.skipped[b]) for b in benches},
        "files_skipped": run.files_skipped,
        "columns": columns,
        "out_dir": str(run.out),
    }


def _record(item: BenchItem, mode: str, reasoner: str, caption: str | None, captioner_answer: str | None,
            output: str | None, extracted: str | None, verdict: bool) -> dict:
    return {"benchmark": item.benchmark, "id": item.id, "mode": mode, "reasoner": reasoner,
            "caption": caption, "captioner_answer": captioner_answer, "reasoner_output": output,
            "extracted": extracted, "gold": item.letter or item.answer, "verdict": bool(verdict)}


def reasoner_names(paths: list[str]) -> list[str]:
    """Last path component, widened with parents where two reasoners would share a name."""
    paths = [split_reasoner(p)[0] for p in paths]
    names = [Path(p.rstrip("/")).name or p for p in paths]
    for i, p in enumerate(paths):
        if names.count(names[i]) > 1:
            names[i] = "/".join(Path(p.rstrip("/")).parts[-2:])
    if len(set(names)) < len(names):
        names = [f"{n}#{i}" for i, n in enumerate(names)]
    return names


def _progress(what: str, done: int, total: int) -> None:
    print(f"[eval {time.strftime('%H:%M:%S')}] {what}: {done}/{total}", file=sys.stderr, flush=True)


# ---------------------------------------------------------------------------- tables


def table_rows(result: dict) -> tuple[list[str], list[list[str]], list[str]]:
    """(header, rows, footer lines) of the accuracy table, accuracies in percent."""
    cols = result["columns"]
    header = ["Benchmark", "items", *cols]
    rows = []
    for b, accs in result["accuracy"].items():
        n = max(result["n"][b].values(), default=0)
        rows.append([b, str(n), *(f"{100 * accs[c]:.1f}" if c in accs else "-" for c in cols)])
    if len(rows) > 1:
        avg = []
        for c in cols:
            vals = [a[c] for a in result["accuracy"].values() if c in a]
            avg.append(f"{100 * sum(vals) / len(vals):.1f}" if vals else "-")
        rows.append(["Average", "", *avg])
    footer = []
    for b, reasons in result["skipped"].items():
        if reasons:
            detail = ", ".join(f"{r}: {k}" for r, k in sorted(reasons.items()))
            footer.append(f"{b}: {sum(reasons.values())} skipped ({detail})")
    for path, why in result["files_skipped"].items():
        footer.append(f"{path}: file not evaluated ({why})")
    return header, rows, footer


def markdown_table(result: dict) -> str:
    header, rows, footer = table_rows(result)
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    if footer:
        lines += ["", "Skipped:"] + [f"- {f}" for f in footer]
    return "\n".join(lines) + "\n"


def write_tables(result: dict, out: Path) -> None:
    header, rows, footer = table_rows(result)
    (out / "accuracy.md").write_text(markdown_table(result), encoding="utf-8")
    with open(out / "accuracy.csv", "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(header)
        w.writerows(rows)
        for line in footer:
            w.writerow([f"# skipped: {line}"])
    (out / "accuracy.json").write_text(json.dumps(result, indent=2), encoding="utf-8")
    plot(result, out / "accuracy.png")


def plot(result: dict, path: Path) -> None:
    benches = list(result["accuracy"])
    series = {c: [100 * result["accuracy"][b].get(c, 0.0) for b in benches] for c in result["columns"]}
    grouped_bars(path, benches, [("accuracy (%)", series)], title="Accuracy by benchmark", value_labels="%.1f",
                 ylim=(0, 100))


# ---------------------------------------------------------------------------- CLI


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="racro-fast eval", description=__doc__.split("\n\n")[0])
    p.add_argument("--captioner", required=True, help="captioner checkpoint (Qwen2.5-VL) directory or hub id")
    p.add_argument("--reasoner", action="extend", nargs="+", default=[],
                   help="text reasoner(s), evaluated in turn: PATH, or PATH@URL for a vLLM server already serving it")
    p.add_argument("--data", action="extend", nargs="+", required=True, help="benchmark file(s): parquet/jsonl/json")
    p.add_argument("--mode", action="extend", nargs="+", choices=MODES, help="caption | joint | direct (default caption)")
    p.add_argument("--engine", default="auto", choices=("auto", "vllm", "hf"))
    p.add_argument("--out", default="runs/eval", help="output folder; rerunning into it resumes")
    p.add_argument("--limit", type=int, default=None, help="first N rows of each file")
    p.add_argument("--batch-size", type=int, default=None, help="prompts per generation call (hf 64, vllm 512)")
    p.add_argument("--caption-temperature", type=float, default=0.0)
    p.add_argument("--reasoner-temperature", type=float, default=0.6)
    p.add_argument("--reasoner-top-p", type=float, default=0.95)
    p.add_argument("--max-caption-tokens", type=int, default=2048, help="also bounds the captioner's own answers")
    p.add_argument("--max-reasoner-tokens", type=int, default=8192)
    p.add_argument("--layout", default=None, help="force a benchmark layout instead of detecting it")
    p.add_argument("--seed", type=int, default=0)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    result = evaluate(EvalConfig(
        args.captioner, args.reasoner, args.data, args.mode or ["caption"], args.out,
        engine=args.engine, limit=args.limit, batch_size=args.batch_size,
        caption_temperature=args.caption_temperature, reasoner_temperature=args.reasoner_temperature,
        reasoner_top_p=args.reasoner_top_p, max_caption_tokens=args.max_caption_tokens,
        max_reasoner_tokens=args.max_reasoner_tokens, layout=args.layout, seed=args.seed))
    print(markdown_table(result))
    print(f"written to {result['out_dir']}", file=sys.stderr)
    return 0 if result["accuracy"] else 1


if __name__ == "__main__":
    raise SystemExit(main())
