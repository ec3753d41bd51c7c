"""Synthetic visual-math tasks with known answers, rendered offline with PIL.

Each task draws an image whose answer is determined by what is drawn, and a short true
caption that holds exactly what a reasoner needs: with it the task is solvable from text
alone, without it not. That makes the caption reward learnable by a small model on CPU.
Rows use the geometry3k layout (images as [{"bytes": png, "path": None}], problem with an
"<image>" placeholder, answer) plus `caption` and `id` columns, and load with RowDataset.
The "scene" task is the other kind: a scene holds many facts, its caption states them all, and
each question needs one of them (make_scene_rows; four question families).

    racro-fast synth --out data/count.parquet --n 2048 --task count
    racro-fast synth --out data/scene.parquet --n 2048 --task scene --families count,colour_of_fill
"""
from __future__ import annotations

import argparse
import io
import random
from collections.abc import Callable
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image, ImageDraw

WHITE = (255, 255, 255)
# Saturated colours, far from white and from each other, so shapes and bars stay distinct.
COLORS = {
    "red": (220, 30, 30),
    "green": (30, 160, 50),
    "blue": (30, 60, 220),
    "orange": (240, 140, 0),
    "purple": (140, 40, 180),
    "black": (20, 20, 20),
}
NUMBER_WORDS = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]
MIN_SIZE = 28


def _png(image: Image.Image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


def _a(word: str) -> str:
    return ("an " if word[0] in "aeiou" else "a ") + word


def _join(words: list[str]) -> str:
    return words[0] if len(words) == 1 else ", ".join(words[:-1]) + " and " + words[-1]


def count_task(rng: random.Random, size: int) -> tuple[Image.Image, str, str, str]:
    """1..4 filled circles / squares / triangles, apart from each other; answer: how many."""
    n = rng.randint(1, 4)
    gap = max(2, size // 28)  # shapes never touch, so each is one connected blob
    while True:  # rejection sampling of non-overlapping boxes; retried with a fresh layout
        boxes: list[tuple[int, int, int]] = []
        for _ in range(200 * n):
            if len(boxes) == n:
                break
            s = rng.randint(size // 5, size // 3)
            x, y = rng.randint(1, size - s - 1), rng.randint(1, size - s - 1)
            apart = (x + s + gap <= bx or bx + bs + gap <= x or y + s + gap <= by or by + bs + gap <= y
                     for bx, by, bs in boxes)
            if all(apart):
                boxes.append((x, y, s))
        if len(boxes) == n:
            break
    image = Image.new("RGB", (size, size), WHITE)
    draw = ImageDraw.Draw(image)
    described = []
    for x, y, s in boxes:
        name, rgb = rng.choice(list(COLORS.items()))
        kind = rng.choice(["circle", "square", "triangle"])
        if kind == "circle":
            draw.ellipse([x, y, x + s - 1, y + s - 1], fill=rgb)
        elif kind == "square":
            draw.rectangle([x, y, x + s - 1, y + s - 1], fill=rgb)
        else:
            draw.polygon([(x + (s - 1) / 2, y), (x, y + s - 1), (x + s - 1, y + s - 1)], fill=rgb)
        described.append(_a(f"{name} {kind}"))
    noun = "shape" if n == 1 else "shapes"
    caption = f"There {'is' if n == 1 else 'are'} {n} {noun} in the image: {_join(described)}."
    return image, "<image>How many shapes are in the image?", str(n), caption


def bars_task(rng: random.Random, size: int) -> tuple[Image.Image, str, str, str]:
    """A bar chart of 3 bars with integer heights 1..5 on a grid; answer: the tallest height."""
    heights = [rng.randint(1, 5) for _ in range(3)]
    colors = rng.sample(list(COLORS.items()), 3)
    image = Image.new("RGB", (size, size), WHITE)
    draw = ImageDraw.Draw(image)
    margin = max(3, size // 14)
    unit = (size - 2 * margin) // 5
    base = margin + 5 * unit
    for level in range(1, 6):  # light grid lines: the unit the heights are read against
        draw.line([(margin, base - level * unit), (size - margin, base - level * unit)], fill=(210, 210, 210))
    slot = (size - 2 * margin) // 3
    width = max(2, slot * 2 // 3)
    for k, (h, (_, rgb)) in enumerate(zip(heights, colors)):
        x = margin + k * slot + (slot - width) // 2
        draw.rectangle([x, base - h * unit, x + width - 1, base - 1], fill=rgb)
    draw.line([(margin, base), (size - margin, base)], fill=COLORS["black"])
    names = [name for name, _ in colors]
    caption = (
        "A bar chart with 3 bars; from left to right: "
        + _join([_a(f"{c} bar of height {h}") for c, h in zip(names, heights)])
        + "."
    )
    return image, "<image>What is the height of the tallest bar?", str(max(heights)), caption


# Seven-segment digits: big, crisp and independent of any installed font.
_SEGMENTS = {  # a top, b top-right, c bottom-right, d bottom, e bottom-left, f top-left, g middle
    0: "abcdef", 1: "bc", 2: "abdeg", 3: "abcdg", 4: "bcfg",
    5: "acdfg", 6: "acdefg", 7: "abc", 8: "abcdefg", 9: "abcdfg",
}


def _draw_digit(draw: ImageDraw.ImageDraw, digit: int, x: int, y: int, w: int, h: int, t: int, rgb) -> None:
    mid = y + (h - t) // 2
    rects = {
        "a": (x, y, x + w - 1, y + t - 1),
        "d": (x, y + h - t, x + w - 1, y + h - 1),
        "g": (x, mid, x + w - 1, mid + t - 1),
        "f": (x, y, x + t - 1, mid + t - 1),
        "b": (x + w - t, y, x + w - 1, mid + t - 1),
        "e": (x, mid, x + t - 1, y + h - 1),
        "c": (x + w - t, mid, x + w - 1, y + h - 1),
    }
    for seg in _SEGMENTS[digit]:
        draw.rectangle(rects[seg], fill=rgb)


def arith_task(rng: random.Random, size: int) -> tuple[Image.Image, str, str, str]:
    """Two big digits 1..9 side by side; answer: their sum."""
    a, b = rng.randint(1, 9), rng.randint(1, 9)
    image = Image.new("RGB", (size, size), WHITE)
    draw = ImageDraw.Draw(image)
    w, h = size * 5 // 16, size * 5 // 8
    t = max(2, size // 14)
    y = (size - h) // 2 + rng.randint(-size // 10, size // 10)
    gap = size - 2 * w - 2 * (size // 16)
    (_, rgb_a), (_, rgb_b) = rng.sample(list(COLORS.items()), 2)
    _draw_digit(draw, a, size // 16, y, w, h, t, rgb_a)
    _draw_digit(draw, b, size // 16 + w + gap, y, w, h, t, rgb_b)
    caption = f"The image shows two numbers: {a} on the left and {b} on the right."
    return image, "<image>What is the sum of the two numbers in the image?", str(a + b), caption


def grid_task(rng: random.Random, size: int) -> tuple[Image.Image, str, str, str]:
    """1..4 filled cells of a 2x2 grid; answer: how many.

    Each cell is a quadrant, and at 56 px a quadrant is exactly one merged Qwen2.5-VL image token:
    the smallest counting task a tiny random-init vision tower can learn in minutes (the demo's).
    """
    n = rng.randint(1, 4)
    image = Image.new("RGB", (size, size), WHITE)
    draw = ImageDraw.Draw(image)
    cell = size // 2
    pad = max(1, size // 28)
    for k in sorted(rng.sample(range(4), n)):
        x, y = (k % 2) * cell + pad, (k // 2) * cell + pad
        draw.rectangle([x, y, x + cell - 2 * pad - 1, y + cell - 2 * pad - 1], fill=COLORS["black"])
    noun = "cell is" if n == 1 else "cells are"
    caption = f"{n} {noun} filled."
    return image, "<image>How many cells of the grid are filled?", str(n), caption


# --------------------------------------------------------------------------- scenes: many facts, many questions

# A scene is a 2x2 grid (at 56 px each cell is one merged image token of 2x2 patches) holding 1..4
# shapes of distinct colours; each shape is big or small, a square, a bar or a pillar, solid or
# hollow. Its generic caption states every fact in random order: how many shapes there are, and
# for each attribute value the colours of the shapes that have it ("big red blue.", "bar red."),
# colours in COLORS order, right after the value (a reader finds a colour as the word after "big").
# A question asks how many shapes there are, or picks one shape by one attribute and asks its
# colour: it needs exactly one fact, and a short caption must choose it.
# Facts say what the shapes look like, not where they are: a scene reads as a set of shapes
# (a two-layer captioner learns these facts in a few thousand steps, and positions not at all).
ATTRIBUTES = {"size": ("big", "small"), "kind": ("square", "bar", "pillar"), "fill": ("solid", "hollow")}
# question family -> (question template, the attribute that picks the shape, whose colour is the
# answer; None: the answer is the number of shapes)
FAMILIES = {
    "count": ("How many shapes are there?", None),
    "colour_of_size": ("What colour is the {size} shape?", "size"),
    "colour_of_kind": ("What colour is the {kind}?", "kind"),
    "colour_of_fill": ("What colour is the {fill} shape?", "fill"),
}


def count_fact(n: int) -> str:
    return f"{n} shape{'s' if n > 1 else ''}."


def value_fact(value: str, colours: list[str]) -> str:
    return f"{value} {' '.join(colours)}."


def scene_facts(shapes: list[dict]) -> list[str]:
    """The scene's facts: ["3 shapes.", "big red blue.", "small green.", "square ...", ...];
    attribute values no shape has are left out."""
    n = len(shapes)
    facts = [count_fact(n)]
    for attr, values in ATTRIBUTES.items():
        for v in values:
            colours = [c for c in COLORS if any(s["colour"] == c and s[attr] == v for s in shapes)]
            if colours:
                facts.append(value_fact(v, colours))
    return facts


def _draw_shape(draw: ImageDraw.ImageDraw, s: dict, x0: int, y0: int, cell: int) -> None:
    long = cell - 4 if s["size"] == "big" else cell // 2
    w, h = {"square": (long, long), "bar": (long, long // 2), "pillar": (long // 2, long)}[s["kind"]]
    x, y = x0 + (cell - w) // 2, y0 + (cell - h) // 2
    rgb = COLORS[s["colour"]]
    if s["fill"] == "solid":
        draw.rectangle([x, y, x + w - 1, y + h - 1], fill=rgb)
    else:
        draw.rectangle([x, y, x + w - 1, y + h - 1], outline=rgb, width=max(1, min(w, h) // 4))


def _scene(rng: random.Random, size: int, family: str) -> tuple[Image.Image, list[dict], str, dict]:
    """A scene in which `family`'s question picks exactly one shape; returns image, shapes, question, target."""
    template, attr = FAMILIES[family]
    while True:
        n = rng.randint(1 if attr is None else 2, 4)  # a colour question needs shapes to tell apart
        shapes = [{"cell": c, "colour": col, **{a: rng.choice(v) for a, v in ATTRIBUTES.items()}}
                  for c, col in zip(sorted(rng.sample(range(4), n)), rng.sample(list(COLORS), n))]
        target = rng.choice(shapes)
        if attr is None or sum(s[attr] == target[attr] for s in shapes) == 1:  # "the big shape" is one shape
            break
    image = Image.new("RGB", (size, size), WHITE)
    draw = ImageDraw.Draw(image)
    cell = size // 2
    for s in shapes:
        _draw_shape(draw, s, (s["cell"] % 2) * cell, (s["cell"] // 2) * cell, cell)
    return image, shapes, "<image>" + template.format(**target), target


def make_scene_rows(n: int, families: list[str] | None = None, seed: int = 0, size: int = 56) -> list[dict]:
    """n scene rows, the question families in turn. Besides the row layout: `caption` is the generic
    caption (every fact, in random order), `facts` the facts (the count first), `family` the
    question's family and `needs` the fact that answers it."""
    families = families or list(FAMILIES)
    unknown = sorted(set(families) - set(FAMILIES))
    if unknown:
        raise ValueError(f"families: unknown {unknown}; choose from {sorted(FAMILIES)}")
    rng = random.Random(f"scene:{seed}")
    rows = []
    for i in range(n):
        family = families[i % len(families)]
        image, shapes, problem, target = _scene(rng, size, family)
        facts = scene_facts(shapes)
        attr = FAMILIES[family][1]
        answer, needs = (str(len(shapes)), facts[0]) if attr is None else \
            (target["colour"], value_fact(target[attr], [target["colour"]]))
        rows.append({"images": [{"bytes": _png(image), "path": None}], "problem": problem, "answer": answer,
                     "caption": " ".join(rng.sample(facts, len(facts))), "id": f"scene-{family}-{seed}-{i}",
                     "family": family, "facts": facts, "needs": needs})
    return rows


TASKS: dict[str, Callable[[random.Random, int], tuple[Image.Image, str, str, str]]] = {
    "count": count_task,
    "grid": grid_task,
    "bars": bars_task,
    "arith": arith_task,
}
TASK_NAMES = sorted([*TASKS, "scene"])


def make_rows(task: str, n: int, seed: int = 0, size: int = 56, families: list[str] | None = None) -> list[dict]:
    """n rows of `task` in the geometry3k layout (+ caption, id); the same seed gives the same rows.
    `families` picks the question families of the "scene" task (default: all, in turn)."""
    if task not in TASK_NAMES:
        raise ValueError(f"task: unknown task {task!r}; choose from {TASK_NAMES}")
    if n < 1:
        raise ValueError(f"n: must be >= 1, got {n}")
    if size < MIN_SIZE:
        raise ValueError(f"size: must be >= {MIN_SIZE} pixels, got {size}")
    if families and task != "scene":
        raise ValueError(f"families: only the scene task has question families, not {task!r}")
    if task == "scene":
        return make_scene_rows(n, families, seed=seed, size=size)
    rng = random.Random(f"{task}:{seed}")
    rows = []
    for i in range(n):
        image, problem, answer, caption = TASKS[task](rng, size)
        rows.append(
            {
                "images": [{"bytes": _png(image), "path": None}],
                "problem": problem,
                "answer": answer,
                "caption": caption,
                "id": f"{task}-{seed}-{i}",
            }
        )
    return rows


_SCHEMA = pa.schema(
    [
        ("images", pa.list_(pa.struct([("bytes", pa.binary()), ("path", pa.string())]))),
        ("problem", pa.string()),
        ("answer", pa.string()),
        ("caption", pa.string()),
        ("id", pa.string()),
    ]
)


def write_synth(out_path: str, n: int, task: str = "count", seed: int = 0, size: int = 56,
                families: list[str] | None = None) -> str:
    """Write `make_rows(task, n, seed, size, families)` as parquet to out_path and return the path."""
    rows = make_rows(task, n, seed=seed, size=size, families=families)
    Path(out_path).parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.Table.from_pylist(rows, schema=_SCHEMA), out_path)
    return str(out_path)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="racro-fast synth", description="Write a synthetic visual-math parquet.")
    parser.add_argument("--out", required=True, help="output .parquet path")
    parser.add_argument("--n", type=int, default=1024, help="number of rows")
    parser.add_argument("--task", default="count", choices=TASK_NAMES)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--size", type=int, default=56, help="image side in pixels")
    parser.add_argument("--families", default="", help=f"scene: comma-separated question families "
                        f"(default all: {','.join(FAMILIES)})")
    args = parser.parse_args(argv)
    families = [f for f in args.families.split(",") if f] or None
    try:
        path = write_synth(args.out, args.n, task=args.task, seed=args.seed, size=args.size, families=families)
    except ValueError as e:
        parser.error(str(e))
    print(f"wrote {args.n} {args.task} rows to {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
