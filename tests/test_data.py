"""RowDataset: each layout from tiny generated files, bad rows skipped and counted, resize bounds."""
import io
import json
import logging

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from racro_fast.data import RowDataset, resize_to_bounds


def png(size=(64, 48), color=(200, 30, 30)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, color).save(buf, format="PNG")
    return buf.getvalue()


def write_parquet(path, rows):
    pq.write_table(pa.Table.from_pylist(rows), path)
    return str(path)


def geometry3k_rows():
    return [
        {"images": [{"bytes": png(), "path": None}], "problem": "<image>Find x.", "answer": "3", "caption": "c0"},
        {"images": [{"bytes": png((40, 40)), "path": "b.png"}], "problem": "<image>Find y.",
         "answer": "\\boxed{\\frac{1}{2}}", "caption": "c1"},
    ]


def test_geometry3k_parquet(tmp_path):
    ds = RowDataset(write_parquet(tmp_path / "g.parquet", geometry3k_rows()), min_pixels=16, max_pixels=10**6)
    assert len(ds) == 2
    row = ds[0]
    assert row.problem == "<image>Find x." and row.answer == "3"
    assert len(row.images) == 1 and row.images[0].mode == "RGB" and row.images[0].size == (64, 48)
    assert row.images[0].getpixel((5, 5)) == (200, 30, 30)
    assert row.extra == {"caption": "c0"}, "extra columns are kept, used ones are not"
    assert ds[1].answer == "\\frac{1}{2}", "answers lose their \\boxed{} wrapper"
    assert row.id == "g.parquet:0", "rows without an id column get file:row"
    assert [r.answer for r in ds] == ["3", "\\frac{1}{2}"]
    assert not ds.skipped


def test_virl39k_layout_in_a_folder(tmp_path):
    (tmp_path / "images").mkdir()
    Image.new("RGB", (80, 60), (0, 0, 255)).save(tmp_path / "images" / "q1.png")
    Image.new("RGB", (30, 30), (0, 255, 0)).save(tmp_path / "images" / "q2.jpg")
    rows = [
        {"qid": "q1", "question": "<image>What is shown?", "answer": "\\boxed{A}", "image": ["images/q1.png"],
         "category": "geo", "PassRate_7BTrained": 0.5},
        {"qid": "q2", "question": "<image><image>Compare.", "answer": "\\boxed{2}",
         "image": ["images/q1.png", "images/q2.jpg"], "category": "chart", "PassRate_7BTrained": 0.25},
    ]
    write_parquet(tmp_path / "39Krelease.parquet", rows)
    ds = RowDataset(str(tmp_path), min_pixels=16, max_pixels=10**6)
    assert len(ds) == 2
    first, second = ds[0], ds[1]
    assert (first.id, first.answer, first.problem) == ("q1", "A", "<image>What is shown?")
    assert first.images[0].getpixel((0, 0)) == (0, 0, 255)
    assert [im.size for im in second.images] == [(80, 60), (30, 30)]
    assert second.extra == {"category": "chart", "PassRate_7BTrained": 0.25}


def test_jsonl_with_images_dir_and_options(tmp_path):
    (tmp_path / "images").mkdir()
    Image.new("RGB", (50, 50), (9, 9, 9)).save(tmp_path / "images" / "a.png")
    lines = [
        {"id": 7, "problem": "<image>Which?", "answer": "B", "images": ["images/a.png"], "options": ["1", "2"]},
        {"id": 8, "problem": "No image at all: 1+1?", "answer": 2},
    ]
    (tmp_path / "train.jsonl").write_text("\n".join(json.dumps(r) for r in lines) + "\n")
    ds = RowDataset(str(tmp_path / "train.jsonl"), min_pixels=16, max_pixels=10**6)
    rows = list(ds)
    assert [r.id for r in rows] == ["7", "8"]
    assert rows[0].options == ["1", "2"] and rows[0].images[0].size == (50, 50)
    assert rows[1].images == [] and rows[1].answer == "2", "numeric answers become strings"


def test_several_paths_concatenate(tmp_path):
    a = write_parquet(tmp_path / "a.parquet", geometry3k_rows())
    b = write_parquet(tmp_path / "b.parquet", geometry3k_rows()[:1])
    ds = RowDataset([a, b], min_pixels=16)
    assert len(ds) == 3 and ds[2].id == "b.parquet:0" and ds[-1].id == "b.parquet:0"
    with pytest.raises(IndexError):
        ds[3]


def test_bad_rows_are_skipped_counted_and_logged_once(tmp_path, caplog):
    def row(image: bytes, problem="<image>Q", answer="1"):
        return {"images": [{"bytes": image, "path": None}], "problem": problem, "answer": answer, "caption": ""}

    rows = geometry3k_rows() + [
        row(b"\x89PNG garbage, not an image"),
        row(png()[:60]),  # truncated file
        row(png(), answer=None),
        row(png(), problem=""),
        row(png((1000, 2))),  # aspect ratio 500
    ]
    ds = RowDataset(write_parquet(tmp_path / "mixed.parquet", rows), min_pixels=16)
    assert len(ds) == 7 and not ds.skipped, "images are decoded on access, not when loading"
    with caplog.at_level(logging.WARNING, logger="racro_fast.data"):
        valid = list(ds)
    assert [r.answer for r in valid] == ["3", "\\frac{1}{2}"]
    assert ds.skipped == {"bad_image": 2, "missing_field": 2, "aspect_ratio": 1}
    messages = [r.getMessage() for r in caplog.records]
    first_logs = [m for m in messages if m.startswith("skipping a row")]
    assert len(first_logs) == 3, f"one warning per reason, got {first_logs}"
    assert any("skipped 5 of 7 rows" in m for m in messages), messages
    assert ds[2] is None and ds.skipped["bad_image"] == 2, "re-reading a bad row does not count it twice"
    ds.skip("too_long")
    assert ds.skipped["too_long"] == 1


def test_missing_image_file_is_skipped(tmp_path):
    (tmp_path / "d.jsonl").write_text(json.dumps({"problem": "<image>Q", "answer": "1", "images": ["nope.png"]}) + "\n")
    ds = RowDataset(str(tmp_path / "d.jsonl"))
    assert ds[0] is None and ds.skipped == {"missing_image": 1}


def test_column_overrides_and_config_errors(tmp_path):
    rows = [{"pic": [{"bytes": png(), "path": None}], "q": "<image>Q", "gt": "\\boxed{5}"}]
    path = write_parquet(tmp_path / "custom.parquet", rows)
    with pytest.raises(ValueError, match="problem_key"):
        RowDataset(path)
    row = RowDataset(path, image_key="pic", problem_key="q", answer_key="gt", min_pixels=16)[0]
    assert (row.problem, row.answer, len(row.images)) == ("<image>Q", "5", 1)
    with pytest.raises(ValueError, match="answer_key"):
        RowDataset(path, image_key="pic", problem_key="q", answer_key="missing")
    with pytest.raises(ValueError, match="fmt"):
        RowDataset(path, fmt="csv")
    with pytest.raises(ValueError, match="paths"):
        RowDataset(str(tmp_path / "absent.parquet"))
    with pytest.raises(ValueError, match="min_pixels"):
        RowDataset(path, min_pixels=100, max_pixels=10)


@pytest.mark.parametrize("size", [(10, 10), (7, 40), (3000, 2000), (4000, 30), (100, 100)])
def test_resize_bounds_keep_aspect(size):
    lo, hi = 3136, 200_000
    out = resize_to_bounds(Image.new("RGB", size), lo, hi).size
    assert lo <= out[0] * out[1] <= hi, f"{size} -> {out}"
    ratio_in, ratio_out = size[0] / size[1], out[0] / out[1]
    assert abs(ratio_out / ratio_in - 1) < 0.15, f"aspect {ratio_in:.3f} -> {ratio_out:.3f}"


def test_dataset_applies_resize_bounds(tmp_path):
    rows = [{"images": [{"bytes": png((400, 300)), "path": None}], "problem": "Q", "answer": "1"},
            {"images": [{"bytes": png((20, 10)), "path": None}], "problem": "Q", "answer": "1"}]
    ds = RowDataset(write_parquet(tmp_path / "r.parquet", rows), min_pixels=3136, max_pixels=28 * 28 * 16)
    big, small = ds[0].images[0].size, ds[1].images[0].size
    assert big[0] * big[1] <= 28 * 28 * 16 and small[0] * small[1] >= 3136, (big, small)
