"""The CPU demo: the reasoner's rule, the model cache, and the run itself: the reward rises, the frozen
reasoner's held-out accuracy rises at least 1.5x on every question family over the pre-trained
captioner's, also on the families no pre-training question asked, doubles on their mean, and reaches
0.5 on every asked value (big and small alike: the captions follow the value, not a family habit)."""
import json
from pathlib import Path
from statistics import mean

import pytest

from racro_fast.demo import (PREAMBLE, SCENE_PRETRAIN_FAMILIES, UNKNOWN, _cached, _needed_key, demo_config,
                             family_accuracy, prepare_demo_models, pretrained_accuracy, scene_answer, scene_reasoning,
                             value_accuracy)
from racro_fast.prompts import clean_problem
from racro_fast.synth import FAMILIES, make_rows
from racro_fast.train import train

ROOT = Path(__file__).resolve().parent.parent
STEPS = 150  # the demo's own run (configs/demo_cpu.yaml)
VALUE_FLOOR = 0.5  # greedy accuracy on every asked value after those steps


# ------------------------------------------------------------------ the reasoner's rule (fast)

def test_scene_answer_reads_the_needed_fact():
    q = "What colour is the big shape?"
    assert scene_answer(" 3 shapes. big red blue. small green.", q) == "red"
    assert scene_answer(" small green. big purple.", q) == "purple"
    assert scene_answer(" small green.", q) == UNKNOWN  # a fact, but not the one the question needs
    assert scene_answer(" big", q) == UNKNOWN  # cut by the budget before the colour
    assert scene_answer(" big small green.", q) == UNKNOWN  # the colour must follow the key
    assert scene_answer(" bigger red.", q) == UNKNOWN
    assert scene_answer(" bar red. square blue.", "What colour is the square?") == "blue"
    assert scene_answer(" hollow black. 2 shapes.", "How many shapes are there?") == "2"
    assert scene_answer(" hollow black.", "How many shapes are there?") == UNKNOWN
    assert scene_answer(" big red. 2", "How many shapes are there?") == UNKNOWN  # a digit, not a count fact
    assert scene_answer(" 1 shape.", "How many shapes are there?") == "1"


def test_scene_reasoning_restates_then_boxes():
    assert scene_reasoning(" big red.", "What colour is the big shape?") == "The big red. \\boxed{red}"
    assert scene_reasoning(" bar red.", "What colour is the big shape?") == "The big unknown. \\boxed{unknown}"
    assert scene_reasoning(" 3 shapes.", "How many shapes are there?") == "3 shapes. \\boxed{3}"


def test_the_rule_answers_every_family_from_the_generic_caption():
    for row in make_rows("scene", 40, seed=3):
        question = clean_problem(row["problem"])
        key = _needed_key(question)
        assert (key is None) == (row["family"] == "count"), row["problem"]
        assert scene_answer(" " + row["caption"], question) == row["answer"], row["id"]
        assert scene_answer(" " + row["needs"], question) == row["answer"], row["id"]


def test_cache_builds_once_and_never_leaves_half_a_build(tmp_path, monkeypatch):
    monkeypatch.setenv("RACRO_FAST_CACHE", str(tmp_path))
    built = []

    def build(where):
        built.append(where)
        (where / "model").write_text("weights")

    first = _cached("reasoner", {"v": 1}, build)
    assert _cached("reasoner", {"v": 1}, build) == first and len(built) == 1
    assert (first / "model").read_text() == "weights" and first.parent == tmp_path
    assert _cached("reasoner", {"v": 2}, build) != first and len(built) == 2  # another key, another build

    def broken(where):
        (where / "model").write_text("half")
        raise RuntimeError("killed mid-build")

    with pytest.raises(RuntimeError, match="killed mid-build"):
        _cached("captioner", {"v": 1}, broken)
    assert not [p.name for p in tmp_path.iterdir() if p.name.startswith("demo-captioner")]  # nothing half-built
    assert _cached("captioner", {"v": 1}, build).joinpath("model").read_text() == "weights"
    stale = _cached("scores", {"v": 1}, build)  # a directory left without DONE is built again, not reused
    (stale / "DONE").unlink()
    (stale / "model").write_text("stale")
    assert (_cached("scores", {"v": 1}, build) / "model").read_text() == "weights" and len(built) == 5


def test_demo_refuses_a_task_it_was_not_built_for(tmp_path):
    with pytest.raises(ValueError, match="data.synth_task"):
        demo_config(ROOT / "configs" / "demo_cpu.yaml", ["data.synth_task=count", f"run.output_dir={tmp_path}"])


# ------------------------------------------------------------------ the run

@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo")
    cfg = demo_config(ROOT / "configs" / "demo_cpu.yaml",
                      [f"run.output_dir={out}", f"train.steps={STEPS}", "run.progress=false", "run.save_every=0"])
    pretrained = cfg.model.captioner
    result = train(cfg)
    return cfg, out, result, pretrained


@pytest.mark.slow  # the demo's training run
def test_demo_reward_rises(demo):
    cfg, out, result, _ = demo
    rewards = [h["reward_mean"] for h in result["history"]]
    assert len(rewards) == STEPS
    first, last = mean(rewards[:20]), mean(rewards[-20:])
    curve = " ".join(f"{r:.2f}" for r in rewards[::5])
    assert last >= 1.6 * first and last >= 0.3, f"reward did not climb: first-20 {first:.3f}, last-20 {last:.3f}; {curve}"
    assert (out / "reward_curve.png").stat().st_size > 0
    logged = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in logged] == list(range(1, STEPS + 1))
    for key in ("reward_std", "accuracy", "zero_var_group_frac", "kl_mean", "clip_frac", "entropy_mean",
                "caption_len_mean", "caption_len_max", "caption_truncated_frac", "reasoner_len_mean",
                "tokens_per_s", "caption_s", "reason_s", "train_s", "peak_mem_gb", "collapse"):
        assert key in logged[-1], f"metric {key} missing from metrics.jsonl"


@pytest.mark.slow  # the demo's training run and scoring
def test_cro_lifts_every_family_also_those_not_in_pretraining(demo, tmp_path):
    cfg, out, _, pretrained = demo
    assert cfg.model.captioner == prepare_demo_models(cfg)[0] == pretrained  # cached: the captioner before CRO
    assert set(FAMILIES) - set(SCENE_PRETRAIN_FAMILIES) == {"count", "colour_of_fill"}
    # the demo's 128 held-out scenes per family, written once for both
    before = pretrained_accuracy(cfg, pretrained, tmp_path / "before", 0.0, tmp_path / "data")
    assert pretrained_accuracy(cfg, pretrained, tmp_path / "again", 0.0, tmp_path / "data") == before  # kept
    assert (tmp_path / "again" / "records.jsonl").read_text() == (tmp_path / "before" / "records.jsonl").read_text()
    # the greedy pre-trained captioner opens (nearly) every caption as generic captions open, which
    # fills the budget: its start does not hang on which fact a CPU's numerics happen to rank first
    records = (tmp_path / "before" / "records.jsonl").read_text().splitlines()
    captions = [json.loads(line)["caption"] for line in records]
    opened = sum(c.strip().startswith(PREAMBLE.rstrip(".")) for c in captions) / len(captions)
    assert opened >= 0.9, f"{opened:.2f} of the pre-trained captions open with {PREAMBLE!r}: {captions[:4]}"
    after = family_accuracy(cfg, out / "export", tmp_path / "after", data_dir=tmp_path / "data")
    # the demo's run: at least 1.5x and +0.1 on every family (greedy), also the two pre-training never asked
    for family in FAMILIES:
        assert after[family] >= 1.5 * before[family] and after[family] >= before[family] + 0.1, \
            f"{family}: {before[family]:.2f} -> {after[family]:.2f}; before {before}, after {after}"
    assert mean(after.values()) >= 2 * mean(before.values()), f"before {before}, after {after}"
    # the per-value table the demo prints and writes (values.json): every asked value, from the same records
    values, samples = value_accuracy(tmp_path / "after", tmp_path / "data")
    assert list(values) == ["count", "big", "small", "square", "bar", "pillar", "solid", "hollow"], values
    assert values["count"] == after["count"] and all(0.0 <= a <= 1.0 for a in values.values()), values
    for family, (a, b) in {"colour_of_size": ("big", "small"), "colour_of_fill": ("solid", "hollow")}.items():
        assert min(values[a], values[b]) <= after[family] <= max(values[a], values[b]), (family, values, after)
    assert all(1 <= len(lines) <= 3 and " -> " in lines[0] for lines in samples.values()), samples
    # the captions follow the asked value, not a habit per family: no value is left behind its twins
    low = {v: round(a, 2) for v, a in values.items() if a < VALUE_FLOOR}
    assert not low, f"values below {VALUE_FLOOR} after {STEPS} steps: {low}; all {values}; samples {samples}"
