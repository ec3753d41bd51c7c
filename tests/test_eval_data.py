"""Each benchmark loader on a tiny file of its layout, written here with pyarrow / json."""

from __future__ import annotations

import base64
import io
import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from racro_fast.eval_data import (
    BAD_ANSWER,
    BAD_IMAGE,
    MISSING_IMAGE,
    LayoutError,
    detect_layout,
    load_benchmark,
    parse_inline_choices,
)
from racro_fast.rewards import eval_reward


def png(color: str = "red", size: int = 20) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (size, size), color).save(buf, format="PNG")
    return buf.getvalue()


def write_parquet(path: Path, rows: list[dict]) -> Path:
    pq.write_table(pa.Table.from_pylist(rows), path)
    return path


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def by_id(bf) -> dict:
    return {it.id: it for it in bf.items}


def test_mathvista_parquet_structs(tmp_path: Path) -> None:
    base = {"image": "images/x.jpg", "unit": None, "precision": None, "answer_type": "text", "metadata": None}
    rows = [
        {**base, "pid": "1", "question": "Which is biggest?", "decoded_image": {"bytes": png(), "path": "1.png"},
         "choices": ["cat", "dog", "cow"], "answer": "dog", "question_type": "multi_choice",
         "query": "Hint: pick.\nQuestion: Which is biggest?\nChoices:\n(A) cat\n(B) dog\n(C) cow"},
        {**base, "pid": "2", "question": "How many?", "decoded_image": {"bytes": png("blue"), "path": None},
         "choices": None, "answer": "3", "question_type": "free_form", "query": "Hint: int.\nQuestion: How many?"},
        {**base, "pid": "3", "question": "Broken", "decoded_image": {"bytes": b"not a png", "path": None},
         "choices": None, "answer": "1", "question_type": "free_form", "query": "q"},
        {**base, "pid": "4", "question": "Bad gold", "decoded_image": {"bytes": png(), "path": None},
         "choices": ["a", "b"], "answer": "zebra", "question_type": "multi_choice", "query": "q"},
    ]
    bf = load_benchmark(write_parquet(tmp_path / "testmini.parquet", rows))
    assert (bf.layout, bf.benchmark) == ("mathvista", "MathVista")
    items = by_id(bf)
    assert sorted(items) == ["1", "2"], f"loaded {sorted(items)}, skipped {dict(bf.skipped)}"
    assert dict(bf.skipped) == {BAD_IMAGE: 1, BAD_ANSWER: 1}
    mc = items["1"]
    assert (mc.letter, mc.answer, mc.options) == ("B", "dog", ["cat", "dog", "cow"])
    assert mc.golds() == ["B", "dog"]
    assert mc.question.endswith("(C) cow"), "the official query (with choices) is the question"
    assert mc.pil_images()[0].size == (20, 20)
    ff = items["2"]
    assert (ff.letter, ff.options, ff.answer, ff.golds()) == (None, None, "3", ["3"])
    assert ff.benchmark == "MathVista"


def test_mathverse_jsonl_relative_paths(tmp_path: Path) -> None:
    (tmp_path / "images").mkdir()
    (tmp_path / "images" / "a.png").write_bytes(png())
    rows = [
        {"sample_index": "1", "problem_index": "1", "problem_version": "Text Lite", "image": "a.png",
         "question": "Find angle CED.\nChoices:\nA:40°\nB:60°\nC:120°\nD:140°", "answer": "B",
         "question_type": "multi-choice", "query_wo": "...", "query_cot": "..."},
        {"sample_index": "2", "problem_index": "1", "problem_version": "Vision Only", "image": "images/a.png",
         "question": "", "answer": "12", "question_type": "free-form", "query_wo": "...", "query_cot": "..."},
        {"sample_index": "3", "problem_index": "2", "problem_version": "Text Lite", "image": "gone.png",
         "question": "q", "answer": "1", "question_type": "free-form", "query_wo": "", "query_cot": ""},
    ]
    bf = load_benchmark(write_jsonl(tmp_path / "mathverse.jsonl", rows))
    assert bf.layout == "mathverse"
    items = by_id(bf)
    assert dict(bf.skipped) == {MISSING_IMAGE: 1}
    assert items["1"].options == ["40°", "60°", "120°", "140°"]
    assert items["1"].golds() == ["B", "60°"]
    assert items["2"].answer == "12" and items["2"].extra["version"] == "Vision Only"


def test_mathvision_options_and_placeholders(tmp_path: Path) -> None:
    (tmp_path / "images").mkdir()
    (tmp_path / "images" / "1.jpg").write_bytes(png())
    rows = [
        {"id": "1", "question": "<image1>\nWhich shape is next?", "options": ["A", "B", "C", "D", "E"],
         "image": "images/1.jpg", "decoded_image": None, "answer": "C", "solution": None, "level": 2,
         "subject": "logic"},
        {"id": "2", "question": "How long is the side?<image1>", "options": [], "image": "images/1.jpg",
         "decoded_image": None, "answer": "7", "solution": None, "level": 1, "subject": "metric"},
    ]
    bf = load_benchmark(write_parquet(tmp_path / "mathvision.parquet", rows))
    assert bf.layout == "mathvision"
    items = by_id(bf)
    assert "<image" not in items["1"].question and items["1"].question.startswith("Which shape is next?")
    assert items["1"].letter == "C" and items["1"].options == ["A", "B", "C", "D", "E"]
    assert items["2"].options is None and items["2"].answer == "7"
    assert items["2"].question == "How long is the side?"


def test_wemath_option_string(tmp_path: Path) -> None:
    rows = [
        {"ID": "2steps_1", "split": "testmini", "knowledge concept": "Area", "question": "Area of the bed?",
         "option": "A. 200.96;B. 3215.36;C. 6280;D. 32; E. No correct answer", "answer": "B",
         "key": "2steps_1", "question number": 1, "image_path": {"bytes": png(), "path": "x.png"}},
        {"ID": "2steps_2", "split": "testmini", "knowledge concept": "Area", "question": "q",
         "option": "A. 1;B. 2", "answer": "", "key": "2steps_1", "question number": 2,
         "image_path": {"bytes": png(), "path": "x.png"}},
    ]
    path = tmp_path / "testmini.json"
    path.write_text(json.dumps([{**r, "image_path": {"bytes": base64.b64encode(r["image_path"]["bytes"]).decode(),
                                                     "path": None}} for r in rows]))
    bf = load_benchmark(path)
    assert bf.layout == "wemath"
    assert dict(bf.skipped) == {BAD_ANSWER: 1}
    (it,) = bf.items
    assert it.options == ["200.96", "3215.36", "6280", "32", "No correct answer"]
    assert (it.letter, it.answer) == ("B", "3215.36")
    assert "(E) No correct answer" in it.question


def test_dynamath_base64_and_inline_choices(tmp_path: Path) -> None:
    b64 = base64.b64encode(png()).decode()
    rows = [
        {"id": "7", "question": "Which value is largest? Choices: (A) 3 (B) 4.5 (C) 5 (D) 6", "image": "x.png",
         "decoded_image": "data:image/png;base64," + b64, "ground_truth": "D", "answer_type": "multiple choice",
         "subject": "algebra", "knowledge_level": "high school"},
        {"id": "8", "question": "Slope?", "image": "x.png", "decoded_image": b64, "ground_truth": "-0.5",
         "answer_type": "float", "subject": "algebra", "knowledge_level": "high school"},
    ]
    bf = load_benchmark(write_jsonl(tmp_path / "dynamath.jsonl", rows))
    assert bf.layout == "dynamath"
    items = by_id(bf)
    assert items["7"].options == ["3", "4.5", "5", "6"] and items["7"].golds() == ["D", "6"]
    assert items["8"].answer == "-0.5" and items["8"].letter is None


def test_logicvista_id_dict(tmp_path: Path) -> None:
    (tmp_path / "images").mkdir()
    (tmp_path / "images" / "v1_0.png").write_bytes(png())
    (tmp_path / "images" / "v1_1.png").write_bytes(png("green"))
    data = {
        "v1_0": {"imagename": "v1_0.png", "question": "Which completes the pattern?", "answer": "C",
                 "reasoning": "...", "skill": ["inductive"], "capability": ["diagram"]},
        "v1_1": {"imagename": "v1_1.png", "question": "Which belong to green?", "answer": "A, C",
                 "reasoning": "...", "skill": ["inductive"], "capability": ["diagram"]},
    }
    (tmp_path / "dataset.json").write_text(json.dumps(data))
    bf = load_benchmark(tmp_path / "dataset.json")
    assert bf.layout == "logicvista"
    items = by_id(bf)
    assert sorted(items) == ["v1_0", "v1_1"]
    assert items["v1_0"].letter == "C" and items["v1_1"].answer == "A, C" and items["v1_1"].letter is None


def test_mmmu_string_options_and_image_columns(tmp_path: Path) -> None:
    rows = [
        {"id": "validation_Math_1", "question": "Compare <image 1> and <image 2>. Which is larger?",
         "options": "['<image 1>', '<image 2>', 'equal']", "explanation": "", "image_1": {"bytes": png(), "path": None},
         "image_2": {"bytes": png("blue"), "path": None}, "image_3": None, "image_4": None, "image_5": None,
         "image_6": None, "image_7": None, "img_type": "['Diagrams']", "answer": "B", "topic_difficulty": "Easy",
         "question_type": "multiple-choice", "subfield": "Geometry"},
        {"id": "validation_Math_2", "question": "Value of x in <image 1>?", "options": "[]", "explanation": "",
         "image_1": {"bytes": png(), "path": None}, "image_2": None, "image_3": None, "image_4": None,
         "image_5": None, "image_6": None, "image_7": None, "img_type": "[]", "answer": "['1.5', '3/2']",
         "topic_difficulty": "Easy", "question_type": "open", "subfield": "Algebra"},
        {"id": "validation_Math_3", "question": "No image", "options": "['a', 'b']", "explanation": "",
         "image_1": None, "image_2": None, "image_3": None, "image_4": None, "image_5": None, "image_6": None,
         "image_7": None, "img_type": "[]", "answer": "A", "topic_difficulty": "Easy",
         "question_type": "multiple-choice", "subfield": "Algebra"},
    ]
    bf = load_benchmark(write_parquet(tmp_path / "validation.parquet", rows))
    assert bf.layout == "mmmu"
    assert dict(bf.skipped) == {MISSING_IMAGE: 1}
    items = by_id(bf)
    mc = items["validation_Math_1"]
    assert len(mc.images) == 2 and "<image" not in mc.question
    assert mc.options == ["image 1", "image 2", "equal"] and mc.golds() == ["B", "image 2"]
    op = items["validation_Math_2"]
    assert op.answer == "1.5" and op.extra["alternatives"] == ["3/2"] and op.options is None


def test_unknown_layout_limit_and_override(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "other.jsonl", [{"foo": 1, "bar": 2}])
    with pytest.raises(LayoutError):
        load_benchmark(path)
    with pytest.raises(LayoutError):
        load_benchmark(path, layout="nope")
    rows = [{"problem": f"<image>What is {i}+1?", "answer": f"\\boxed{{{i + 1}}}", "images": [base64.b64encode(png()).decode()]}
            for i in range(5)]
    path = write_jsonl(tmp_path / "synth.jsonl", rows)
    bf = load_benchmark(path, limit=3)
    assert bf.layout == "generic" and bf.benchmark == "synth"
    assert [it.answer for it in bf.items] == ["1", "2", "3"]
    assert [it.id for it in bf.items] == ["row0", "row1", "row2"], "missing ids fall back to the row index"
    assert bf.items[0].question == "What is 0+1?"
    # Forcing a layout that does not fit the rows skips them rather than crashing.
    forced = load_benchmark(path, layout="mathvista")
    assert not forced.items and sum(forced.skipped.values()) == 5


def test_detect_layout_signatures() -> None:
    assert detect_layout({"pid", "question", "choices", "decoded_image"}) == "mathvista"
    assert detect_layout({"id", "question", "options", "level", "subject", "decoded_image"}) == "mathvision"
    assert detect_layout({"id", "question", "options", "image_1", "answer"}) == "mmmu"
    assert detect_layout({"sample_index", "problem_version", "question", "image"}) == "mathverse"


def test_parse_inline_choices() -> None:
    assert parse_inline_choices("x?\nChoices:\nA:40°\nB:60°") == ["40°", "60°"]
    assert parse_inline_choices("x? Choices: (A) 3 (B) 4") == ["3", "4"]
    assert parse_inline_choices("no choices here") is None
    assert parse_inline_choices("Choices: (B) 3 (C) 4") is None, "letters must start at A"


def spec(golds: list[str], options: list[str] | None = None, alternatives: list[str] | None = None) -> str:
    return json.dumps({"golds": golds, "options": options, "alternatives": alternatives or []})


@pytest.mark.parametrize("pred, golds, options, alternatives, want", [
    ("B", ["B", "dog"], ["cat", "dog"], None, 1.0),      # the letter
    ("dog", ["B", "dog"], ["cat", "dog"], None, 1.0),    # the option text
    ("(b)", ["B", "dog"], ["cat", "dog"], None, 1.0),
    ("cat", ["B", "dog"], ["cat", "dog"], None, 0.0),
    ("A", ["B", "dog"], ["cat", "dog"], None, 0.0),
    ("C, A", ["A, C"], None, None, 1.0),                  # LogicVista letter sets, any order
    ("A", ["A, C"], None, None, 0.0),
    ("0.5", ["1/2"], None, None, 1.0),                    # math equivalence
    ("3/2", ["1.5"], None, ["3/2"], 1.0),
    ("", ["1"], None, None, 0.0),
])
def test_eval_reward(pred, golds, options, alternatives, want) -> None:
    got = eval_reward(pred, spec(golds, options, alternatives))
    assert got == want, f"pred {pred!r} against golds {golds} (options {options}): got {got}, want {want}"
