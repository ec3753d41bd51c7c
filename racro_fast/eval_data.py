"""Benchmark loaders for evaluation: one small function per public layout.

A benchmark file (parquet, jsonl, or json holding a list or an id -> record dict) is read
row by row; its layout is detected from the column names (or forced by name), and each
row becomes a `BenchItem`: the question as every model sees it (choices written in),
the gold answer, the options and gold letter for multiple choice, and the encoded image
files (decoded only when used, so a 1000-item benchmark does not sit in memory as pixels).

Images may be `{"bytes", "path"}` structs (the Hugging Face parquet form), paths relative
to the file (also tried under `images/`), raw bytes, or base64 strings. A row whose image
is missing or undecodable, or whose answer cannot be read, is skipped and counted under
its reason; a file whose layout is unknown raises `LayoutError`.
"""

from __future__ import annotations

import ast
import base64
import binascii
import json
import re
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

from PIL import Image

from racro_fast.data import BAD_IMAGE, MISSING_IMAGE, BadRow, decode_image

LETTERS = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"

# Skip reasons, as counted in the accuracy table's footer (the image ones are data.py's).
BAD_ANSWER = "bad_answer"


@dataclass
class BenchItem:
    id: str
    benchmark: str
    question: str               # as shown to every model, choices included
    answer: str                 # gold answer; the option text for multiple choice when known
    images: list[bytes]         # encoded image files, in the order the question refers to them
    options: list[str] | None = None  # choice texts in letter order; None for free-form
    letter: str | None = None   # gold letter for multiple choice
    extra: dict[str, Any] = field(default_factory=dict)

    def golds(self) -> list[str]:
        """Every string that counts as the right answer: the letter or the option text."""
        out = [g for g in (self.letter, self.answer) if g]
        if self.letter and self.options:
            idx = LETTERS.index(self.letter)
            if idx < len(self.options):
                out.append(self.options[idx])
        return list(dict.fromkeys(out))

    def grading_spec(self) -> str:
        """What `rewards.eval_reward` grades against, as the JSON string it takes."""
        return json.dumps({"golds": self.golds(), "options": self.options,
                           "alternatives": self.extra.get("alternatives", [])})

    def pil_images(self) -> list[Image.Image]:
        return [decode_image(b) for b in self.images]


@dataclass
class BenchFile:
    path: Path
    layout: str
    benchmark: str
    items: list[BenchItem]
    skipped: Counter = field(default_factory=Counter)  # reason -> rows


class LayoutError(ValueError):
    """The file's columns match no known benchmark layout (or the file cannot be read)."""


# ---------------------------------------------------------------------------- images


def _image_bytes(value: Any, base: Path) -> bytes:
    """Encoded bytes of one image reference, validated by a full decode."""
    data = _raw_image_bytes(value, base)
    decode_image(data)
    return data


def _raw_image_bytes(value: Any, base: Path) -> bytes:
    if isinstance(value, dict):
        if value.get("bytes"):
            return _raw_image_bytes(value["bytes"], base)
        if value.get("path"):
            return _read_path(value["path"], base)
        raise BadRow(MISSING_IMAGE)
    if isinstance(value, (bytes, bytearray)):
        return bytes(value)
    if isinstance(value, str) and value.strip():
        s = value.strip()
        try:
            return _read_path(s, base)
        except BadRow:
            pass
        # Base64 strings (some cards ship images that way), optionally as a data URL.
        if s.startswith("data:"):
            s = s.split(",", 1)[-1]
        if len(s) > 64:
            try:
                return base64.b64decode(s, validate=True)
            except (binascii.Error, ValueError) as e:
                raise BadRow(BAD_IMAGE) from e
    raise BadRow(MISSING_IMAGE)


def _read_path(p: str, base: Path) -> bytes:
    if len(p) > 4096 or "\n" in p:
        raise BadRow(MISSING_IMAGE)
    cands = [Path(p)] if Path(p).is_absolute() else [base / p, base / "images" / p]
    for cand in cands:
        try:
            if cand.is_file():
                return cand.read_bytes()
        except OSError:
            continue
    raise BadRow(MISSING_IMAGE)


def _first_image(row: dict, base: Path, *cols: str) -> list[bytes]:
    """The first column among `cols` holding a usable reference wins; the others are fallbacks."""
    err: BadRow | None = None
    for c in cols:
        if row.get(c) in (None, "", {}):
            continue
        try:
            return [_image_bytes(row[c], base)]
        except BadRow as e:
            err = err or e  # the primary column's failure is the one worth reporting
    raise err or BadRow(MISSING_IMAGE)


# ---------------------------------------------------------------------------- answers


def _text(v: Any) -> str:
    if v is None:
        return ""
    if isinstance(v, float) and v.is_integer():
        v = int(v)
    return str(v).strip()


def _with_choices(question: str, options: list[str]) -> str:
    return question.rstrip() + "\nChoices:\n" + "\n".join(f"({LETTERS[i]}) {o}" for i, o in enumerate(options))


def _mc_gold(answer: str, options: list[str]) -> tuple[str, str]:
    """(letter, option text) for a gold given as either a letter or the option's text."""
    a = answer.strip()
    m = re.fullmatch(r"\(?([A-Z])\)?\.?", a)
    if m and LETTERS.index(m.group(1)) < len(options):
        letter = m.group(1)
        return letter, options[LETTERS.index(letter)]
    for i, o in enumerate(options):
        if o.strip() == a:
            return LETTERS[i], o
    raise BadRow(BAD_ANSWER)


_CHOICE_BLOCK = re.compile(r"(?:Choices|Choice|Options|Option)\s*:?\s*\n?(.*)$", re.S | re.I)
_CHOICE_ITEM = re.compile(r"(?:^|\s)\(?([A-H])\s*[).:：]\s*")


def parse_inline_choices(question: str) -> list[str] | None:
    """Choice texts written into a question ("Choices:\\nA:40°\\nB:50°" or "(A) 3 (B) 4")."""
    m = _CHOICE_BLOCK.search(question)
    if not m:
        return None
    block = m.group(1)
    marks = list(_CHOICE_ITEM.finditer(block))
    # Letters must run A, B, C, ... from the first mark, else this is not a choice list.
    if len(marks) < 2 or any(mk.group(1) != LETTERS[i] for i, mk in enumerate(marks)):
        return None
    ends = [mk.start() for mk in marks[1:]] + [len(block)]
    opts = [block[mk.end():end].strip().rstrip(";,").strip() for mk, end in zip(marks, ends)]
    return opts if all(opts) else None


def _letter_only(answer: str, options: list[str] | None) -> tuple[str, str | None, list[str] | None]:
    """For golds given as a letter: (answer, letter, options) with the text filled in when known."""
    a = answer.strip()
    if re.fullmatch(r"[A-Z]", a):
        if options and LETTERS.index(a) < len(options):
            return options[LETTERS.index(a)], a, options
        return a, a, options
    return a, None, options


# ---------------------------------------------------------------------------- layouts
# Each takes (row, file's folder) and returns a BenchItem with benchmark left blank.


def mathvista(row: dict, base: Path) -> BenchItem:
    # AI4Math/MathVista card (testmini): pid, question, image (path), decoded_image, choices,
    # unit, precision, answer (the option text for multi_choice), question_type, answer_type,
    # query (the official prompt: hint + question + choices).
    images = _first_image(row, base, "decoded_image", "image")
    answer = _text(row.get("answer"))
    if not answer:
        raise BadRow(BAD_ANSWER)
    choices = [str(c) for c in (row.get("choices") or [])]
    options, letter = None, None
    if row.get("question_type") == "multi_choice" or choices:
        if not choices:
            raise BadRow(BAD_ANSWER)
        letter, answer = _mc_gold(answer, choices)
        options = choices
    # The official query carries the unit/precision hint and the lettered choices.
    question = _text(row.get("query")) or (
        _with_choices(_text(row.get("question")), options) if options else _text(row.get("question"))
    )
    return BenchItem(_text(row.get("pid")), "", question, answer, images, options, letter)


def mathverse(row: dict, base: Path) -> BenchItem:
    # AI4Math/MathVerse card (testmini): sample_index, problem_index, problem_version,
    # question (choices written in as "Choices:\nA:...\nB:..."), image, answer (the letter
    # for multi-choice), question_type, metadata, query_wo, query_cot.
    images = _first_image(row, base, "image")
    answer = _text(row.get("answer"))
    if not answer:
        raise BadRow(BAD_ANSWER)
    question = _text(row.get("question"))
    options, letter = None, None
    if row.get("question_type") == "multi-choice":
        options = parse_inline_choices(question)
        answer, letter, options = _letter_only(answer, options)
        if letter is None:
            raise BadRow(BAD_ANSWER)
    item_id = _text(row.get("sample_index")) or f"{row.get('problem_index')}-{row.get('problem_version')}"
    return BenchItem(item_id, "", question, answer, images, options, letter,
                     {"version": _text(row.get("problem_version"))})


def mathvision(row: dict, base: Path) -> BenchItem:
    # MathLLMs/MathVision card: id, question ("<image1>" placeholders), options (list,
    # empty for free-form), image (path), decoded_image, answer (the letter when options
    # exist), solution, level, subject.
    images = _first_image(row, base, "decoded_image", "image")
    answer = _text(row.get("answer"))
    if not answer:
        raise BadRow(BAD_ANSWER)
    question = re.sub(r"\s*<image\d*>\s*", " ", _text(row.get("question"))).strip()
    raw_opts = [str(o) for o in (row.get("options") or [])]
    options, letter = None, None
    if raw_opts:
        letter, answer = _mc_gold(answer, raw_opts)
        options = raw_opts
        question = _with_choices(question, options)
    return BenchItem(_text(row.get("id")), "", question, answer, images, options, letter,
                     {"level": row.get("level"), "subject": row.get("subject")})


def wemath(row: dict, base: Path) -> BenchItem:
    # We-Math testmini (card / repo README): ID, split, "knowledge concept", question,
    # option ("A. 200.96;B. 3215.36;C. 6280;D. 32; E. No correct answer"), answer (letter),
    # key, "question number", image_path.
    images = _first_image(row, base, "image_path", "image")
    answer = _text(row.get("answer"))
    opt_str = _text(row.get("option"))
    parts = [p.strip() for p in opt_str.split(";") if p.strip()]
    options = [re.sub(r"^[A-Z]\s*[.:)]\s*", "", p) for p in parts] or None
    answer, letter, options = _letter_only(answer, options)
    if letter is None:
        raise BadRow(BAD_ANSWER)
    question = _text(row.get("question"))
    if options:
        question = _with_choices(question, options)
    return BenchItem(_text(row.get("ID")), "", question, answer, images, options, letter,
                     {"key": row.get("key"), "concept": row.get("knowledge concept")})


def dynamath(row: dict, base: Path) -> BenchItem:
    # DynaMath/DynaMath_Sample card: id, question (choices written in for multiple choice),
    # image (path), decoded_image, ground_truth, answer_type ("multiple choice", "float",
    # "free form"), subject, knowledge_level.
    images = _first_image(row, base, "decoded_image", "image")
    answer = _text(row.get("ground_truth"))
    if not answer:
        raise BadRow(BAD_ANSWER)
    question = _text(row.get("question"))
    options, letter = None, None
    if row.get("answer_type") == "multiple choice":
        options = parse_inline_choices(question)
        answer, letter, options = _letter_only(answer, options)
        if letter is None:
            raise BadRow(BAD_ANSWER)
    return BenchItem(_text(row.get("id")), "", question, answer, images, options, letter,
                     {"answer_type": row.get("answer_type")})


def logicvista(row: dict, base: Path) -> BenchItem:
    # Yijia-Xiao/LogicVista data/dataset.json: id -> {imagename, question, answer (a letter,
    # a letter list like "A, C", or a number), reasoning, skill, capability}; images under
    # data/images/. Choices are drawn in the image, so options stay None.
    images = _first_image(row, base, "image", "imagename")
    answer = _text(row.get("answer"))
    if not answer:
        raise BadRow(BAD_ANSWER)
    item_id = _text(row.get("id")) or Path(_text(row.get("imagename"))).stem
    letter = answer if re.fullmatch(r"[A-Z]", answer) else None
    return BenchItem(item_id, "", _text(row.get("question")), answer, images, None, letter,
                     {"skill": row.get("skill")})


def mmmu(row: dict, base: Path) -> BenchItem:
    # MMMU/MMMU card (validation): id, question ("<image 1>" placeholders), options (a string
    # repr of a list), explanation, image_1..image_7, img_type, answer (the letter for
    # multiple-choice; open answers may be a list repr), question_type, subfield.
    images = []
    for k in range(1, 8):
        v = row.get(f"image_{k}")
        if v not in (None, "", {}):
            images.append(_image_bytes(v, base))
    if not images:
        raise BadRow(MISSING_IMAGE)
    try:
        raw_opts = row.get("options") or "[]"
        options = [str(o) for o in (ast.literal_eval(raw_opts) if isinstance(raw_opts, str) else raw_opts)]
    except (ValueError, SyntaxError) as e:
        raise BadRow(BAD_ANSWER) from e
    # The reasoner never sees the images, so "<image 2>" becomes a plain reference.
    ref = lambda s: re.sub(r"<image (\d+)>", r"image \1", s)  # noqa: E731
    question = ref(_text(row.get("question")))
    options = [ref(o) for o in options]
    answer = _text(row.get("answer"))
    letter = None
    extra: dict[str, Any] = {"subfield": row.get("subfield")}
    if row.get("question_type") == "multiple-choice" and options:
        answer, letter, _ = _letter_only(answer, options)
        if letter is None:
            raise BadRow(BAD_ANSWER)
        question = _with_choices(question, options)
    else:
        options = None
        if answer.startswith("["):
            try:
                alts = [str(a) for a in ast.literal_eval(answer)]
            except (ValueError, SyntaxError) as e:
                raise BadRow(BAD_ANSWER) from e
            answer, extra["alternatives"] = (alts[0] if alts else ""), alts[1:]
    if not answer:
        raise BadRow(BAD_ANSWER)
    return BenchItem(_text(row.get("id")), "", question, answer, images, options, letter, extra)


def generic(row: dict, base: Path) -> BenchItem:
    # The training-data forms (data.py / synth.py): problem or question ("<image>"
    # placeholders), answer (possibly \boxed{...}), images (a list) or image, optional
    # options and id.
    refs = row.get("images")
    if refs is None or isinstance(refs, (str, dict, bytes)):
        refs = [refs] if refs not in (None, "", {}) else []
    if not refs and row.get("image") not in (None, "", {}):
        refs = [row["image"]]
    if not refs:
        raise BadRow(MISSING_IMAGE)
    images = [_image_bytes(r, base) for r in refs]
    answer = _text(row.get("answer"))
    m = re.fullmatch(r"\s*\\boxed\{(.*)\}\s*", answer, re.S)
    answer = m.group(1).strip() if m else answer
    if not answer:
        raise BadRow(BAD_ANSWER)
    question = re.sub(r"<image>\s*", "", _text(row.get("problem") or row.get("question")))
    options = [str(o) for o in row["options"]] if row.get("options") else None
    letter = None
    if options:
        letter, answer = _mc_gold(answer, options)
    return BenchItem(_text(row.get("id")), "", question, answer, images, options, letter)


# name -> (loader, display name, columns that identify it); checked in this order, so the
# more specific signatures come first.
LAYOUTS: dict[str, tuple[Callable[[dict, Path], BenchItem], str, tuple[set[str], ...]]] = {
    "mmmu": (mmmu, "MMMU", ({"image_1", "options", "question"},)),
    "mathverse": (mathverse, "MathVerse", ({"problem_version", "question"}, {"query_wo", "question"})),
    "mathvista": (mathvista, "MathVista", ({"pid", "question", "choices"}, {"pid", "query"})),
    "wemath": (wemath, "WeMath", ({"ID", "option", "answer"}, {"knowledge concept", "question"})),
    "dynamath": (dynamath, "DynaMath", ({"ground_truth", "question"},)),
    "mathvision": (mathvision, "MathVision", ({"options", "level", "subject"}, {"options", "solution", "question"})),
    "logicvista": (logicvista, "LogicVista", ({"imagename", "question"}, {"skill", "capability", "question"})),
    "generic": (generic, "", ({"problem", "answer"}, {"question", "answer", "image"}, {"question", "answer", "images"})),
}


def detect_layout(columns: set[str]) -> str:
    for name, (_, _, signatures) in LAYOUTS.items():
        if any(sig <= columns for sig in signatures):
            return name
    raise LayoutError(f"no known benchmark layout has columns {sorted(columns)[:12]}")


# ---------------------------------------------------------------------------- files


def iter_rows(path: Path) -> Iterator[dict]:
    suffix = path.suffix.lower()
    if suffix == ".parquet":
        import pyarrow.parquet as pq

        for batch in pq.ParquetFile(path).iter_batches(batch_size=64):
            yield from batch.to_pylist()
    elif suffix == ".jsonl":
        with open(path, encoding="utf-8") as f:
            for line in f:
                if line.strip():
                    yield json.loads(line)
    elif suffix == ".json":
        obj = json.loads(path.read_text(encoding="utf-8"))
        if isinstance(obj, dict):  # id -> record (LogicVista's dataset.json)
            for k, v in obj.items():
                yield {"id": k, **v} if isinstance(v, dict) and "id" not in v else v
        else:
            yield from obj
    else:
        raise LayoutError(f"unsupported file type {suffix!r} (parquet, jsonl or json)")


def load_benchmark(path: str | Path, layout: str | None = None, limit: int | None = None,
                   benchmark: str | None = None) -> BenchFile:
    """Items of one benchmark file; `limit` counts rows read, skipped ones included."""
    path = Path(path)
    if layout is not None and layout not in LAYOUTS:
        raise LayoutError(f"unknown layout {layout!r}; known: {', '.join(LAYOUTS)}")
    try:
        rows = iter_rows(path)
        first = next(rows, None)
    except (OSError, ValueError) as e:
        raise LayoutError(f"cannot read {path}: {e}") from e
    if first is None:
        raise LayoutError(f"{path} has no rows")
    name = layout or detect_layout(set(first))
    loader, display, _ = LAYOUTS[name]
    bench = benchmark or display or path.stem
    out = BenchFile(path, name, bench, [])
    seen: set[str] = set()

    def all_rows() -> Iterator[dict]:
        yield first
        yield from rows

    for i, row in enumerate(all_rows()):
        if limit is not None and i >= limit:
            break
        try:
            item = loader(row, path.parent)
        except BadRow as e:
            out.skipped[e.reason] += 1
            continue
        # Resume keys on the id, so a missing or repeated one is replaced by the row index.
        if not item.id or item.id in seen:
            item.id = f"row{i}"
        seen.add(item.id)
        item.benchmark = bench
        out.items.append(item)
    return out
