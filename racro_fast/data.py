"""Dataset rows {images, problem, answer} from parquet, jsonl or folders of them.

Two layouts are recognised from their columns, so no per-dataset code is needed:
  ViRL39K          question (with "<image>" placeholders), answer ("\\boxed{...}"), image: list of
                   paths relative to the data root (the folder holding the parquet/jsonl)
  geometry3k / HF  images: list of {"bytes", "path"} structs, problem, answer
Images may also be bytes, PIL images or absolute paths. Other columns ("caption", "category",
...) are kept in `Row.extra`.

Rows are decoded on access, so 39K rows index in well under a second. A row that cannot be
used (undecodable image, empty answer, ...) is never fatal: `ds[i]` returns None, the reason
is counted in `ds.skipped` and logged once per reason. `BadRow` and `decode_image` serve the
evaluation loaders (eval_data.py) too. `RowStream` is a rank's endless, seeded, resumable order
over the rows.
"""
from __future__ import annotations

import io
import json
import logging
import math
import os
import random
from bisect import bisect_right
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image

from racro_fast.rewards import extract_boxed

logger = logging.getLogger(__name__)

IMAGE_KEYS = ("images", "image", "image_paths", "image_path")
PROBLEM_KEYS = ("problem", "question", "query", "prompt")
ANSWER_KEYS = ("answer", "ground_truth", "solution")
OPTION_KEYS = ("options", "choices")
ID_KEYS = ("id", "qid", "pid", "uid", "question_id")
# Qwen2-VL's resize refuses more extreme aspect ratios; such a row would crash the step later.
MAX_ASPECT = 200.0


@dataclass
class Row:
    images: list[Image.Image]  # decoded, RGB, resized into [min_pixels, max_pixels]
    problem: str  # as stored, "<image>" placeholders included
    answer: str  # without any \boxed{} wrapper
    options: list[str] | None
    id: str
    extra: dict = field(default_factory=dict)


# Skip reasons, shared with the evaluation loaders (eval_data.py): what `skipped` counts rows under.
BAD_IMAGE = "bad_image"
MISSING_IMAGE = "missing_image"
MISSING_FIELD = "missing_field"


class BadRow(Exception):
    """A row that cannot be used: counted under `reason`; the message says why."""

    def __init__(self, reason: str, detail: str = ""):
        super().__init__(detail or reason)
        self.reason = reason


def decode_image(value, root: Path | None = None) -> Image.Image:
    """One image as RGB, fully decoded (so a truncated file fails here, not in a step later).

    `value`: encoded bytes, a PIL image, a path (relative to `root`), or a {"bytes", "path"}
    struct (Hugging Face datasets; bytes win). Raises BadRow(BAD_IMAGE or MISSING_IMAGE).
    """
    if isinstance(value, dict):
        value = value.get("bytes") or value.get("path")
    try:
        if isinstance(value, Image.Image):
            image = value
        elif isinstance(value, (bytes, bytearray)):
            image = Image.open(io.BytesIO(value))
        elif isinstance(value, str) and value:
            path = Path(value) if os.path.isabs(value) or root is None else root / value
            if not path.is_file():
                raise BadRow(MISSING_IMAGE, f"no image file {path}")
            image = Image.open(path)
        else:
            raise BadRow(BAD_IMAGE, f"unusable image value of type {type(value).__name__}")
        return image.convert("RGB")
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as e:
        raise BadRow(BAD_IMAGE, f"{type(e).__name__}: {e}") from None


@dataclass
class _Source:
    path: Path
    root: Path  # relative image paths resolve against this
    table: pa.Table | None  # parquet
    records: list[dict] | None  # jsonl
    keys: dict[str, str | None]  # role -> column

    def __len__(self) -> int:
        return self.table.num_rows if self.table is not None else len(self.records)

    def record(self, i: int) -> dict:
        if self.table is not None:
            return self.table.slice(i, 1).to_pylist()[0]
        return self.records[i]


def resize_to_bounds(image: Image.Image, min_pixels: int, max_pixels: int) -> Image.Image:
    """Scale `image` (aspect ratio kept) so that min_pixels <= w*h <= max_pixels."""
    w, h = image.size
    if w * h > max_pixels:
        s = math.sqrt(max_pixels / (w * h))
        size = (max(1, math.floor(w * s)), max(1, math.floor(h * s)))
        # floor can still overshoot by rounding when one side is clamped to 1.
        while size[0] * size[1] > max_pixels:
            size = (max(1, size[0] - 1), size[1]) if size[0] >= size[1] else (size[0], max(1, size[1] - 1))
        return image.resize(size, Image.Resampling.BICUBIC)
    if w * h < min_pixels:
        s = math.sqrt(min_pixels / (w * h))
        return image.resize((math.ceil(w * s), math.ceil(h * s)), Image.Resampling.BICUBIC)
    return image


class RowDataset:
    """Indexable rows from parquet / jsonl files or folders; `ds[i]` is a Row or None (skipped).

    `len(ds)` counts stored rows, bad ones included (they are only found on access);
    iterating yields the valid rows. `image_key` / `problem_key` / `answer_key` override the
    column detection.
    """

    def __init__(
        self,
        paths: list[str] | str,
        fmt: str = "auto",
        image_key: str | None = None,
        problem_key: str | None = None,
        answer_key: str | None = None,
        min_pixels: int = 3136,
        max_pixels: int = 1003520,
    ):
        if fmt not in ("auto", "parquet", "jsonl"):
            raise ValueError(f"fmt: expected auto | parquet | jsonl, got {fmt!r}")
        if not 0 < min_pixels <= max_pixels:
            raise ValueError(f"min_pixels: need 0 < min_pixels <= max_pixels, got {min_pixels}, {max_pixels}")
        paths = [paths] if isinstance(paths, (str, os.PathLike)) else list(paths)
        if not paths:
            raise ValueError("paths: no data files given")
        self.min_pixels, self.max_pixels = min_pixels, max_pixels
        self.skipped: Counter = Counter()
        self._bad: dict[int, str] = {}
        self._sources: list[_Source] = []
        for p in paths:
            for file, root in _data_files(Path(p), fmt):
                self._sources.append(_load(file, root, fmt, image_key, problem_key, answer_key))
        self._offsets = [0]
        for s in self._sources:
            self._offsets.append(self._offsets[-1] + len(s))

    def __len__(self) -> int:
        return self._offsets[-1]

    def __getitem__(self, i: int) -> Row | None:
        if not -len(self) <= i < len(self):
            raise IndexError(f"row {i} out of range for {len(self)} rows")
        i %= len(self)
        if i in self._bad:
            return None
        k = bisect_right(self._offsets, i) - 1
        source, local = self._sources[k], i - self._offsets[k]
        try:
            return self._row(source, local)
        except BadRow as e:
            self._bad[i] = e.reason
            self.skip(e.reason, f"{source.path}:{local}: {e}")
            return None

    def __iter__(self) -> Iterator[Row]:
        for i in range(len(self)):
            row = self[i]
            if row is not None:
                yield row
        if self.skipped:
            self.log_skipped()

    def skip(self, reason: str, detail: str = "") -> None:
        """Count a dropped row; the first one per reason is logged, the rest only counted."""
        self.skipped[reason] += 1
        if self.skipped[reason] == 1:
            logger.warning(
                "skipping a row (%s)%s; later rows skipped for this reason are only counted in .skipped",
                reason,
                f": {detail}" if detail else "",
            )

    def log_skipped(self) -> None:
        """Log the counts of skipped rows by reason."""
        summary = ", ".join(f"{r}={n}" for r, n in sorted(self.skipped.items()))
        logger.warning("skipped %d of %d rows: %s", sum(self.skipped.values()), len(self), summary or "none")

    def _row(self, source: _Source, local: int) -> Row:
        rec = source.record(local)
        keys = source.keys
        problem = rec.get(keys["problem"])
        if not isinstance(problem, str) or not problem.strip():
            raise BadRow(MISSING_FIELD, f"no {keys['problem']!r} text")
        answer = _clean_answer(rec.get(keys["answer"]))
        if not answer:
            raise BadRow(MISSING_FIELD, f"no {keys['answer']!r}")
        options = rec.get(keys["options"]) if keys["options"] else None
        if options is not None:
            options = [str(o) for o in options] if isinstance(options, (list, tuple)) else None
        images = [self._image(v, source.root) for v in _as_list(rec.get(keys["image"]) if keys["image"] else None)]
        row_id = rec.get(keys["id"]) if keys["id"] else None
        used = {c for c in keys.values() if c}
        return Row(
            images=images,
            problem=problem,
            answer=answer,
            options=options,
            id=str(row_id) if row_id is not None else f"{source.path.name}:{local}",
            extra={k: v for k, v in rec.items() if k not in used},
        )

    def _image(self, value, root: Path) -> Image.Image:
        image = decode_image(value, root)
        w, h = image.size
        if max(w, h) / max(1, min(w, h)) > MAX_ASPECT:
            raise BadRow("aspect_ratio", f"image of {w}x{h}")
        return resize_to_bounds(image, self.min_pixels, self.max_pixels)


def _as_list(value) -> list:
    if value is None:
        return []
    return list(value) if isinstance(value, (list, tuple)) else [value]


def _clean_answer(value) -> str:
    if value is None:
        return ""
    if isinstance(value, (list, tuple)):  # some sets store one answer in a list
        value = value[0] if len(value) == 1 else None
        if value is None:
            return ""
    text = str(value).strip()
    boxed = extract_boxed(text)
    return (boxed if boxed is not None else text).strip()


def _data_files(path: Path, fmt: str) -> list[tuple[Path, Path]]:
    """(file, image root) pairs; a folder's files resolve relative image paths against the folder."""
    if path.is_dir():
        exts = {"auto": (".parquet", ".jsonl"), "parquet": (".parquet",), "jsonl": (".jsonl",)}[fmt]
        files = sorted(f for f in path.rglob("*") if f.is_file() and f.suffix in exts)
        if not files:
            raise ValueError(f"paths: no {' or '.join(exts)} files under {path}")
        return [(f, path) for f in files]
    if not path.is_file():
        raise ValueError(f"paths: {path} does not exist")
    return [(path, path.parent)]


def _load(
    path: Path, root: Path, fmt: str, image_key: str | None, problem_key: str | None, answer_key: str | None
) -> _Source:
    kind = fmt if fmt != "auto" else {".parquet": "parquet", ".jsonl": "jsonl", ".json": "jsonl"}.get(path.suffix)
    if kind is None:
        raise ValueError(f"paths: cannot tell the format of {path}; pass fmt='parquet' or fmt='jsonl'")
    table, records = None, None
    if kind == "parquet":
        # one file's reader: read_table goes through pyarrow.dataset, whose first use imports pandas (~50 MB)
        table = pq.ParquetFile(path, memory_map=True).read()
        columns = list(table.column_names)
    else:
        records = []
        with open(path, encoding="utf-8") as f:
            for n, line in enumerate(f, 1):
                if line.strip():
                    try:
                        records.append(json.loads(line))
                    except json.JSONDecodeError as e:
                        raise ValueError(f"paths: {path}:{n} is not valid JSON: {e}") from None
        columns = list(dict.fromkeys(k for r in records for k in r))
    keys = {
        "image": _pick(columns, image_key, IMAGE_KEYS, "image_key", path, required=False),
        "problem": _pick(columns, problem_key, PROBLEM_KEYS, "problem_key", path),
        "answer": _pick(columns, answer_key, ANSWER_KEYS, "answer_key", path),
        "options": _pick(columns, None, OPTION_KEYS, "", path, required=False),
        "id": _pick(columns, None, ID_KEYS, "", path, required=False),
    }
    return _Source(path=path, root=root, table=table, records=records, keys=keys)


def _pick(
    columns: list[str], given: str | None, candidates: tuple[str, ...], name: str, path: Path, required: bool = True
) -> str | None:
    if given is not None:
        if given not in columns:
            raise ValueError(f"{name}: column {given!r} not in {path} (columns: {columns})")
        return given
    found = next((c for c in candidates if c in columns), None)
    if found is None and required:
        raise ValueError(f"{name}: none of {list(candidates)} in {path} (columns: {columns}); pass {name}=")
    return found


class RowStream:
    """Endless, seeded, resumable order over the dataset's rows, split over ranks.

    Each epoch has one order of the rows (seeded by the run's seed and the epoch, the same on every
    rank); rank r of W takes its positions r, r + W, r + 2W, ... of it. Its state is (epoch, index)
    and, after a change of world size, the positions of the epochs in progress that the earlier
    ranks had already taken (`skip`), so that no row is seen twice or left out across the change
    (`resharded`)."""

    def __init__(self, n: int, seed: int, shuffle: bool, shard: int = 0, num_shards: int = 1,
                 skip: dict[int, list[int]] | None = None):
        self.n, self.seed, self.shuffle = n, seed, shuffle
        self.shard, self.num_shards = shard, num_shards
        self.skip = {int(e): set(v) for e, v in (skip or {}).items()}  # epoch -> positions taken before
        self.epoch, self.index = 0, 0
        self._order = self._make_order()

    def epoch_order(self, epoch: int) -> list[int]:
        """The rows of an epoch in order (every rank's)."""
        order = list(range(self.n))
        if self.shuffle:
            random.Random(self.seed * 1000 + epoch).shuffle(order)
        return order

    def positions(self, epoch: int) -> list[int]:
        """This rank's positions in an epoch's order, less those taken before a change of world size."""
        taken = self.skip.get(epoch, set())
        return [p for p in range(self.shard, self.n, self.num_shards) if p not in taken]

    def _make_order(self) -> list[int]:
        order = self.epoch_order(self.epoch)
        return [order[p] for p in self.positions(self.epoch)]

    def next(self) -> int:
        while self.index >= len(self._order):
            self.epoch, self.index = self.epoch + 1, 0
            self.skip = {e: v for e, v in self.skip.items() if e >= self.epoch}
            self._order = self._make_order()
        i = self._order[self.index]
        self.index += 1
        return i

    def state(self) -> dict:
        """Plain types only: a checkpoint loads it without unpickling code."""
        return {"epoch": self.epoch, "index": self.index,
                "skip": {str(e): sorted(v) for e, v in self.skip.items()}}

    def load(self, state: dict) -> None:
        self.skip = {int(e): set(v) for e, v in state.get("skip", {}).items()}
        self.epoch, self.index = state["epoch"], state["index"]
        self._order = self._make_order()

    def taken(self, state: dict, since: int) -> dict[int, set[int]]:
        """Positions of the epochs from `since` on that this rank, in `state`, has taken (with those
        its own skip sets say were taken before it)."""
        self.load(state)
        out = {e: set(v) for e, v in self.skip.items() if e >= since}
        for e in range(since, state["epoch"] + 1):
            mine = self.positions(e)
            out.setdefault(e, set()).update(mine if e < state["epoch"] else mine[:state["index"]])
        return out

    @classmethod
    def resharded(cls, states: list[dict], n: int, seed: int, shuffle: bool, shard: int,
                  num_shards: int) -> "RowStream":
        """This rank's stream in a world of `num_shards`, continuing the streams of an earlier world
        whose ranks' states are `states`: every position an earlier rank took is skipped, every other
        one is taken by exactly one new rank, from the earliest epoch any earlier rank had not finished."""
        start = min(st["epoch"] for st in states)
        taken: dict[int, set[int]] = {}
        for r, st in enumerate(states):
            for e, pos in cls(n, seed, shuffle, r, len(states)).taken(st, start).items():
                taken.setdefault(e, set()).update(pos)
        full = {e for e, pos in taken.items() if len(pos) == n}  # epochs every earlier rank finished
        while start in full:
            start += 1
        stream = cls(n, seed, shuffle, shard, num_shards, {e: sorted(p) for e, p in taken.items() if e >= start})
        stream.epoch, stream.index = start, 0
        stream._order = stream._make_order()
        return stream
