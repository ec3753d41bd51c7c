"""`racro-fast eval` end to end with the tiny random models on CPU (HF engine).

The models are random, so verdicts are mostly wrong; what is checked is the pipeline: the
prompts evaluate builds (against the paper's text), captions made once and shared by every
reasoner, one model loaded at a time, the output files, skip accounting, and resume.
"""

from __future__ import annotations

import io
import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from racro_fast import engines, evaluate as ev
from racro_fast.eval_data import BenchItem, load_benchmark
from racro_fast.rewards import eval_reward

# The paper's texts (the prompts of RACRO's released code; the joint template is this project's),
# written out here rather than imported, so that a change to the templates shows up as a failure.
CAPTIONER_SYSTEM = ("You are given an image and a relevant question. Based on the query, please describe the image "
                    "in detail. Do not try to answer the question.")
CAPTIONER_USER = "Question: {problem}\nPlease describe the image. DO NOT try to answer the question!"
REASONER = ("### The detailed caption of the provided image: {caption}\n\n### Question: {question} Please think "
            "step by step. The final answer MUST BE put in \\boxed{{}}.")
JOINT = (
    "You are given a detailed caption of an image, a question about the image, and a tentative "
    "response written by a model that saw the image. Use all of them to answer the question.\n\n"
    "### The detailed caption of the provided image: {caption}\n\n"
    "### Note that the caption may contain incorrect solutions; do not be misguided by them.\n\n"
    "### The question: {question}\n\n"
    "### A tentative model response: {tentative}\n\n"
    "### The tentative response may be wrong (calculation errors, faulty logic and so on); if so, "
    "ignore it and solve the problem yourself. If there is no evidence that it is wrong, give the "
    "tentative response's answer.\n\n"
    "### Please think step by step. The final answer MUST BE put in \\boxed{{}}."
)
DIRECT = "{problem}\nPlease think step by step. The final answer MUST BE put in \\boxed{{}}."

GEN = dict(engine="hf", batch_size=4, max_caption_tokens=6, max_reasoner_tokens=6, grade_timeout=60.0)


def png(color: str = "red", size: int = 56) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (size, size), color).save(buf, format="PNG")
    return buf.getvalue()


def write_benchmarks(root: Path) -> list[Path]:
    """A MathVista parquet (3 good rows, 1 bad image, 1 bad answer), a DynaMath jsonl (2 rows)
    and a file of no known layout."""
    root.mkdir(parents=True, exist_ok=True)
    base = {"image": None, "unit": None, "precision": None, "answer_type": "text", "metadata": None, "query": None}
    rows = [
        {**base, "pid": "1", "question": "How many red squares are there?", "decoded_image": {"bytes": png(), "path": None},
         "choices": None, "answer": "1", "question_type": "free_form"},
        {**base, "pid": "2", "question": "Which color is the largest circle?",
         "decoded_image": {"bytes": png("blue"), "path": None}, "choices": ["red", "blue"], "answer": "blue",
         "question_type": "multi_choice"},
        {**base, "pid": "3", "question": "What is the sum of the numbers shown?",
         "decoded_image": {"bytes": png("green", 80), "path": None}, "choices": None, "answer": "7",
         "question_type": "free_form"},
        {**base, "pid": "4", "question": "Broken image", "decoded_image": {"bytes": b"\x89PNG garbage", "path": None},
         "choices": None, "answer": "2", "question_type": "free_form"},
        {**base, "pid": "5", "question": "Gold not among the choices", "decoded_image": {"bytes": png(), "path": None},
         "choices": ["a", "b"], "answer": "c", "question_type": "multi_choice"},
    ]
    vista = root / "mathvista.parquet"
    pq.write_table(pa.Table.from_pylist(rows), vista)
    import base64

    dyn = root / "dynamath.jsonl"
    dyn.write_text("".join(json.dumps(r) + "\n" for r in [
        {"id": "d1", "question": "What is the height of the tallest bar?", "image": "",
         "decoded_image": base64.b64encode(png("yellow")).decode(), "ground_truth": "4", "answer_type": "float",
         "subject": "x", "knowledge_level": "x"},
        {"id": "d2", "question": "Which is larger? Choices: (A) 3 (B) 5", "image": "",
         "decoded_image": base64.b64encode(png("white")).decode(), "ground_truth": "B",
         "answer_type": "multiple choice", "subject": "x", "knowledge_level": "x"},
    ]))
    other = root / "other.jsonl"
    other.write_text(json.dumps({"foo": 1}) + "\n")
    return [vista, dyn, other]


class Spy:
    """Records every generate call (passing it through) and the order models are loaded and freed."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch):
        self.captioner_prompts: list[list[int]] = []
        self.reasoner_prompts: list[list[int]] = []
        self.events: list[str] = []
        real_generate = engines.HFEngine.generate
        spy = self

        def generate(self, requests, sampling):
            for r in requests:
                (spy.captioner_prompts if r.pixel_values is not None else spy.reasoner_prompts).append(r.prompt_ids)
            return real_generate(self, requests, sampling)

        monkeypatch.setattr(engines.HFEngine, "generate", generate)
        for name in ("load_captioner", "load_reasoner", "release_memory"):
            real = getattr(ev, name)

            def wrapped(*a, _real=real, _name=name, **kw):
                spy.events.append(f"{_name}:{Path(a[0]).name}" if a else _name)
                return _real(*a, **kw)

            monkeypatch.setattr(ev, name, wrapped)


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.fixture(scope="module")
def second_reasoner(tmp_path_factory, tiny_tokenizer_dir) -> Path:
    from transformers import AutoTokenizer

    from racro_fast.tiny import build_reasoner

    out = tmp_path_factory.mktemp("models") / "reasoner-b"
    build_reasoner(out, AutoTokenizer.from_pretrained(str(tiny_tokenizer_dir)), seed=1)
    return out


def test_prompts_match_paper_text() -> None:
    item = BenchItem("1", "B", "What is the area of the triangle?\nChoices:\n(A) 12\n(B) 24", "24", [png()],
                     ["12", "24"], "B")
    system, user = ev.caption_prompt(item)
    assert system == {"role": "system", "content": CAPTIONER_SYSTEM}
    assert user["content"] == [{"type": "image"}, {"type": "text", "text": CAPTIONER_USER.format(problem=item.question)}]
    assert ev.answer_prompt(item)[0]["content"][-1]["text"] == DIRECT.format(problem=item.question)

    (msg,) = ev.reasoner_prompt(item, "caption", "  A triangle with base 6 and height 8. ")
    assert msg == {"role": "user", "content": REASONER.format(caption="A triangle with base 6 and height 8.",
                                                             question=item.question)}
    # Joint mode hands over the captioner's boxed answer, or its whole reply when it has none.
    reply = "Area = 6 * 8 / 2 = 24, so the answer is \\boxed{B}."
    (msg,) = ev.reasoner_prompt(item, "joint", "A triangle.", reply)
    assert msg["content"] == JOINT.format(caption="A triangle.", question=item.question, tentative="B")
    (msg,) = ev.reasoner_prompt(item, "joint", "A triangle.", "I think it is 24")
    assert msg["content"] == JOINT.format(caption="A triangle.", question=item.question, tentative="I think it is 24")
    with pytest.raises(ValueError):
        ev.reasoner_prompt(item, "direct", "x")


def test_three_modes_two_reasoners(tmp_path, monkeypatch, tiny_captioner_dir, tiny_reasoner_dir,
                                   second_reasoner) -> None:
    from transformers import AutoTokenizer

    data = write_benchmarks(tmp_path / "data")
    spy = Spy(monkeypatch)
    out = tmp_path / "eval"
    result = ev.evaluate(ev.EvalConfig(tiny_captioner_dir, [tiny_reasoner_dir, second_reasoner], data,
                                       ["caption", "joint", "direct"], out, **GEN))
    ra, rb = Path(tiny_reasoner_dir).name, second_reasoner.name
    cols = [f"{ra}/caption", f"{ra}/joint", f"{rb}/caption", f"{rb}/joint", "captioner/direct"]
    assert result["columns"] == cols
    assert set(result["accuracy"]) == {"MathVista", "DynaMath"}
    assert result["n"] == {"MathVista": {c: 3 for c in cols}, "DynaMath": {c: 2 for c in cols}}
    assert result["skipped"] == {"MathVista": {"bad_image": 1, "bad_answer": 1}, "DynaMath": {}}
    assert list(result["files_skipped"]) == [str(data[2])]

    # One captioner pass (a caption and an answer per item), then the reasoners one at a time,
    # each freed before the next is loaded.
    assert spy.events == ["load_captioner:" + Path(tiny_captioner_dir).name, "release_memory",
                          f"load_reasoner:{ra}", "release_memory", f"load_reasoner:{rb}", "release_memory"]
    assert len(spy.captioner_prompts) == 5 * 2, "caption + own answer, once per item"
    assert len(spy.reasoner_prompts) == 5 * 2 * 2, "caption + joint, per item, per reasoner"

    captions = read_jsonl(out / "captions.jsonl")
    assert sorted((c["benchmark"], c["id"], c["kind"]) for c in captions) == sorted(
        (b, i, k) for b, ids in [("MathVista", "123"), ("DynaMath", ["d1", "d2"])] for i in ids
        for k in ("caption", "answer"))
    cache = {(c["benchmark"], c["id"], c["kind"]): c["text"] for c in captions}

    records = read_jsonl(out / "records.jsonl")
    assert len(records) == 5 * 5
    items = {(it.benchmark, it.id): it for f in data[:2] for it in load_benchmark(f).items}
    fields = {"benchmark", "id", "mode", "reasoner", "caption", "captioner_answer", "reasoner_output",
              "extracted", "gold", "verdict"}
    tok = AutoTokenizer.from_pretrained(str(tiny_reasoner_dir))
    decoded = [tok.decode(p) for p in spy.reasoner_prompts]
    questions = {("MathVista", "1"): "How many red squares are there?",
                 ("DynaMath", "d1"): "What is the height of the tallest bar?"}
    for r in records:
        assert fields <= set(r), f"record lacks {fields - set(r)}"
        key = (r["benchmark"], r["id"])
        if r["mode"] == "direct":
            assert r["reasoner"] == "captioner"
            assert r["captioner_answer"] == cache[(*key, "answer")] and r["reasoner_output"] is None
        else:
            # Both reasoners read the same cached caption.
            assert r["caption"] == cache[(*key, "caption")]
            assert (r["captioner_answer"] is not None) == (r["mode"] == "joint")
        text = r["captioner_answer"] if r["mode"] == "direct" else r["reasoner_output"]
        assert r["extracted"] == ev.extract_boxed(text)
        it = items[key]
        assert r["gold"] == (it.letter or it.answer)
        assert r["verdict"] == (eval_reward(r["extracted"] or "", it.grading_spec()) == 1.0)
        # The prompt the reasoner was given is the paper's text around this item's caption.
        if r["mode"] == "caption" and key in questions:
            want = REASONER.format(caption=r["caption"].strip(), question=questions[key])
            assert any(want in d for d in decoded), f"no reasoner prompt contains {want!r}"

    # Accuracy is the mean verdict of each column's records.
    for b in ("MathVista", "DynaMath"):
        for c in cols:
            vs = [r["verdict"] for r in records if r["benchmark"] == b and ev.column(r["reasoner"], r["mode"]) == c]
            assert result["accuracy"][b][c] == pytest.approx(sum(vs) / len(vs))

    md = (out / "accuracy.md").read_text()
    assert md.splitlines()[0] == "| Benchmark | items | " + " | ".join(cols) + " |"
    assert "MathVista: 2 skipped (bad_answer: 1, bad_image: 1)" in md
    assert "other.jsonl: file not evaluated" in md
    assert "| Average |" in md
    csv_rows = (out / "accuracy.csv").read_text().splitlines()
    assert csv_rows[0] == "Benchmark,items," + ",".join(cols)
    assert csv_rows[1].startswith("MathVista,3,") and csv_rows[2].startswith("DynaMath,2,")
    assert json.loads((out / "accuracy.json").read_text())["accuracy"] == result["accuracy"]
    with Image.open(out / "accuracy.png") as im:
        assert im.format == "PNG" and im.size[0] > 200 and im.size[1] > 200


class Interrupted(Exception):
    pass


def test_resume_after_interruption(tmp_path, monkeypatch, capsys, tiny_captioner_dir, tiny_reasoner_dir) -> None:
    data = write_benchmarks(tmp_path / "data")[:2]
    out = tmp_path / "eval"
    seen: list[dict] = []

    def stop_after_four(rec: dict) -> None:
        if "mode" in rec:
            seen.append(rec)
            if len(seen) == 4:
                raise Interrupted

    with pytest.raises(Interrupted):
        ev.evaluate(ev.EvalConfig(tiny_captioner_dir, [tiny_reasoner_dir], data, ["caption", "direct"], out, **GEN),
                    on_record=stop_after_four)
    first = (out / "records.jsonl").read_text()
    first_captions = (out / "captions.jsonl").read_text()
    assert len(first.splitlines()) == 4 and len(first_captions.splitlines()) == 10
    # A kill in the middle of a write leaves a torn last line; it must be dropped, not crash.
    with open(out / "records.jsonl", "a") as f:
        f.write('{"benchmark": "MathVi')

    spy = Spy(monkeypatch)
    result = ev.evaluate(ev.EvalConfig(tiny_captioner_dir, [tiny_reasoner_dir], data, ["caption", "direct"], out, **GEN))
    records = read_jsonl(out / "records.jsonl")
    assert (out / "records.jsonl").read_text().startswith(first), "earlier records were rewritten"
    assert (out / "captions.jsonl").read_text() == first_captions, "captions were recomputed"
    assert spy.captioner_prompts == [], "every caption and answer was cached"
    assert "load_captioner:" + Path(tiny_captioner_dir).name not in spy.events
    keys = [(r["benchmark"], r["id"], r["mode"], r["reasoner"]) for r in records]
    assert len(keys) == len(set(keys)) == 5 * 2, "each item x column exactly once"
    # The 4 records of the first run were direct-mode ones (graded before any reasoner), so
    # the second run generated only the 5 caption-mode answers.
    assert {r["mode"] for r in seen} == {"direct"} and len(spy.reasoner_prompts) == 5
    assert result["n"]["MathVista"] == {f"{Path(tiny_reasoner_dir).name}/caption": 3, "captioner/direct": 3}

    # A third run, through the command line, finds everything done and loads no model.
    spy.events.clear()
    rc = ev.main(["--captioner", str(tiny_captioner_dir), "--reasoner", str(tiny_reasoner_dir),
                  "--data", *map(str, data), "--mode", "caption", "direct", "--out", str(out), "--engine", "hf"])
    assert rc == 0 and spy.events == []
    printed = capsys.readouterr().out
    assert printed.startswith("| Benchmark | items |") and "DynaMath" in printed
    assert len(read_jsonl(out / "records.jsonl")) == 10


class AlwaysOne:
    """A reasoner `Engine` that answers \\boxed{1} to everything. The models here are random, so this
    is how a correct verdict is produced; only evaluate's grading and tallying are under test."""

    def generate(self, requests, sampling):
        return [[engines.GenOutput(token_ids=[], logprobs=[], text="so the answer is \\boxed{1}.", truncated=False)]
                for _ in requests]

    def sleep(self, level: int = 1) -> None:
        pass

    def wake_up(self, tags: list[str] | None = None) -> None:
        pass

    def close(self) -> None:
        pass


def test_verdicts_and_accuracy(tmp_path, monkeypatch, tiny_captioner_dir, tiny_reasoner_dir) -> None:
    from transformers import AutoTokenizer

    data = write_benchmarks(tmp_path / "data")[:1]  # MathVista golds: "1", "B"/"blue", "7"
    monkeypatch.setattr(ev, "load_reasoner", lambda path, *a, **kw: (AlwaysOne(), AutoTokenizer.from_pretrained(path)))
    result = ev.evaluate(ev.EvalConfig(tiny_captioner_dir, [tiny_reasoner_dir], data, ["caption"], tmp_path / "eval",
                                       **GEN))
    col = f"{Path(tiny_reasoner_dir).name}/caption"
    verdicts = {r["id"]: (r["extracted"], r["verdict"]) for r in read_jsonl(tmp_path / "eval" / "records.jsonl")}
    assert verdicts == {"1": ("1", True), "2": ("1", False), "3": ("1", False)}
    assert result["accuracy"] == {"MathVista": {col: pytest.approx(1 / 3)}}
    assert "| MathVista | 3 | 33.3 |" in (tmp_path / "eval" / "accuracy.md").read_text()


@pytest.mark.requires_vllm
def test_vllm_reasoners_in_turn(tmp_path, tiny_captioner_dir, tiny_reasoner_dir, second_reasoner) -> None:
    # Without CUDA the captioner stays on HF (vLLM's Qwen2.5-VL needs torchvision) while vLLM
    # serves the reasoners; the second LLM can only start if the first one was released.
    data = write_benchmarks(tmp_path / "data")[1:2]  # DynaMath, 2 items
    result = ev.evaluate(ev.EvalConfig(tiny_captioner_dir, [tiny_reasoner_dir, second_reasoner], data, ["caption"],
                                       tmp_path / "eval", engine="vllm", batch_size=4, max_caption_tokens=6,
                                       max_reasoner_tokens=6))
    ra, rb = Path(tiny_reasoner_dir).name, second_reasoner.name
    assert result["n"] == {"DynaMath": {f"{ra}/caption": 2, f"{rb}/caption": 2}}
    records = read_jsonl(tmp_path / "eval" / "records.jsonl")
    assert sorted((r["reasoner"], r["id"]) for r in records) == [(ra, "d1"), (ra, "d2"), (rb, "d1"), (rb, "d2")]
    assert all(isinstance(r["reasoner_output"], str) and r["reasoner_output"] for r in records)


@pytest.mark.requires_vllm
def test_reasoner_behind_a_running_server(tmp_path, tiny_captioner_dir, tiny_reasoner_dir, reasoner_server) -> None:
    """`--reasoner PATH@URL`: the reasoner answers from a vLLM server already running (the trainer's
    rollout.reasoner_url client); the column is named after PATH."""
    data = write_benchmarks(tmp_path / "data")[1:2]  # DynaMath, 2 items
    spec = f"{tiny_reasoner_dir}@{reasoner_server.url}"
    result = ev.evaluate(ev.EvalConfig(tiny_captioner_dir, [spec], data, ["caption"], tmp_path / "eval", engine="hf",
                                       batch_size=4, max_caption_tokens=6, max_reasoner_tokens=6))
    name = Path(tiny_reasoner_dir).name
    assert result["n"] == {"DynaMath": {f"{name}/caption": 2}}
    records = read_jsonl(tmp_path / "eval" / "records.jsonl")
    assert all(r["reasoner"] == name and isinstance(r["reasoner_output"], str) for r in records), records
    assert reasoner_server.proc.poll() is None, "evaluation must not stop a server it did not start"
