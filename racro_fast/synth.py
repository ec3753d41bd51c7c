"""Synthetic visual-math tasks with known answers, rendered offline with PIL.

Each task draws an image whose answer is determined by what is drawn, and a short true
caption that holds exactly what a reasoner needs: with it the task is solvable from text
alone, without it not. That makes the caption reward learnable by a small model on CPU.
Rows use the geometry3k layout (images as [{"bytes": png, "path": None}], problem with an
"<image>" placeholder, answer) plus `caption` and `id` columns, and load with RowDataset.

    racro-fast synth --out data/count.parquet --n 2048 --task count
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


TASKS: dict[str, Callable[[random.Random, int], tuple[Image.Image, str, str, str]]] = {
    "count": count_task,
    "grid": grid_task,
    "bars": bars_task,
    "arith": arith_task,
}


def make_rows(task: str, n: int, seed: int = 0, size: int = 56) -> list[dict]:
    """n rows of `task` in the geometry3k layout (+ caption, id); the same seed gives the same rows."""
    if task not in TASKS:
        raise ValueError(f"task: unknown task {task!r}; choose from {sorted(TASKS)}")
    if n < 1:
        raise ValueError(f"n: must be >= 1, got {n}")
    if size < MIN_SIZE:
        raise ValueError(f"size: must be >= {MIN_SIZE} pixels, got {size}")
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


def write_synth(out_path: str, n: int, task: str = "count", seed: int = 0, size: int = 56) -> str:
    """Write `make_rows(task, n, seed, size)` as parquet to out_path and return the path."""
    rows = make_rows(task, n, seed=seed, size=size)
    Path(out_path).parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.Table.from_pylist(rows, schema=_SCHEMA), out_path)
    return str(out_path)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="racro-fast synth", description="Write a synthetic visual-math parquet.")
    parser.add_argument("--out", required=True, help="output .parquet path")
    parser.add_argument("--n", type=int, default=1024, help="number of rows")
    parser.add_argument("--task", default="count", choices=sorted(TASKS))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--size", type=int, default=56, help="image side in pixels")
    args = parser.parse_args(argv)
    path = write_synth(args.out, args.n, task=args.task, seed=args.seed, size=args.size)
    print(f"wrote {args.n} {args.task} rows to {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
