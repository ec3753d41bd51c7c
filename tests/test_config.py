"""Config loading: YAML + overrides, types, and start-up rejection naming the field."""
from pathlib import Path

import pytest

from racro_fast.config import ConfigError, load_config

ROOT = Path(__file__).resolve().parent.parent


def test_every_shipped_config_loads():
    configs = sorted((ROOT / "configs").glob("*.yaml"))
    assert len(configs) >= 4, configs
    for path in configs:
        cfg = load_config(path)
        assert cfg.rollout.group_size >= 2, path


def test_paper_hyperparameters_in_the_7b_config():
    cfg = load_config(ROOT / "configs" / "qwen25vl_7b_r1_7b.yaml")
    t, r, loss = cfg.train, cfg.rollout, cfg.loss
    assert (r.group_size, t.questions_per_step, t.mini_batch) == (4, 256, 128)
    assert (t.lr, t.weight_decay, loss.clip_low, loss.clip_high) == (1e-6, 0.01, 0.2, 0.2)
    assert (loss.kl_type, loss.kl_coef, loss.entropy_coef, loss.loss_agg) == ("k3", 0.001, 0.0, "token-mean")
    assert loss.dual_clip is None
    assert (r.reasoner_samples, r.reasoner_temperature, r.max_caption_tokens) == (1, 1.0, 8192)


def test_overrides_are_typed():
    cfg = load_config(ROOT / "configs" / "demo_cpu.yaml",
                      ["train.lr=1e-3", "train.steps=7", "run.progress=false", "data.train_files=a.parquet,b.jsonl",
                       "data.synth_task="])
    assert cfg.train.lr == 1e-3 and isinstance(cfg.train.lr, float)
    assert cfg.train.steps == 7 and cfg.run.progress is False
    assert cfg.data.train_files == ["a.parquet", "b.jsonl"]


@pytest.mark.parametrize("override, field", [
    ("train.lr=fast", "train.lr"),
    ("train.steps=1.5", "train.steps"),
    ("rollout.group_size=1", "rollout.group_size"),
    ("train.mini_batch=5", "train.mini_batch"),
    ("loss.loss_agg=mean", "loss.loss_agg"),
    ("loss.kl_coef=-1", "loss.kl_coef"),
    ("rollout.reward=nope", "rollout.reward"),
    ("model.dtype=float16", "model.dtype"),
    ("train.nope=1", "train.nope"),
    ("nosection.x=1", "nosection.x"),
    ("run.progress=maybe", "run.progress"),
    ("loss.dual_clip=0.5", "loss.dual_clip"),
    ("rollout.captioner_gpu_fraction=1.2", "rollout.captioner_gpu_fraction"),
    ("rollout.reasoner_url=localhost:8000", "rollout.reasoner_url"),
    ("rollout.reasoner_max_inflight=-1", "rollout.reasoner_max_inflight"),
    ("rollout.hf_batch=0", "rollout.hf_batch"),
    ("dist.timeout_s=0", "dist.timeout_s"),
])
def test_bad_values_name_the_field(override, field):
    with pytest.raises(ConfigError) as err:
        load_config(ROOT / "configs" / "demo_cpu.yaml", [override])
    assert str(err.value).startswith(field), str(err.value)


def test_unknown_key_in_yaml(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("train:\n  lrr: 1.0\n")
    with pytest.raises(ConfigError, match=r"^train\.lrr"):
        load_config(path)


def test_collective_timeout_must_cover_the_reasoner_phase():
    """A rank that finishes its reasoner requests first waits in a collective for the others, up to
    the phase's deadline: a collective timeout shorter than that would kill a healthy run."""
    with pytest.raises(ConfigError, match=r"^dist.timeout_s: 600 s does not cover .*rollout.reasoner_timeout=600 s"):
        load_config(ROOT / "configs" / "demo_cpu.yaml", ["dist.timeout_s=600", "rollout.reasoner_timeout=600"])
    cfg = load_config(ROOT / "configs" / "demo_cpu.yaml", ["dist.timeout_s=610", "rollout.reasoner_timeout=600"])
    assert cfg.dist.timeout_s == 610
    for path in sorted((ROOT / "configs").glob("*.yaml")):  # every shipped config passes the rule with its defaults
        load_config(path)


def test_changes_since_a_checkpoint_name_each_field_but_the_ones_a_resume_may_change():
    from racro_fast.config import changes_since
    saved = load_config(ROOT / "configs" / "demo_cpu.yaml").to_plain()  # what a checkpoint holds
    same = load_config(ROOT / "configs" / "demo_cpu.yaml", ["train.steps=300", "run.output_dir=/elsewhere",
                                                             "run.progress=false", "dist.timeout_s=900"])
    assert changes_since(saved, same) == []
    other = load_config(ROOT / "configs" / "demo_cpu.yaml", ["loss.kl_coef=0.0", "train.lr=1e-4",
                                                              "data.train_files=[a.parquet, b.parquet]",
                                                              "data.synth_task="])
    changed = changes_since(saved, other)
    assert changed == ["data.synth_task: 'scene' -> ''", "data.train_files: [] -> ['a.parquet', 'b.parquet']",
                       "loss.kl_coef: 0.1 -> 0.0",
                       "train.lr: 0.0002 -> 0.0001"], changed
    del saved["rollout"]["hf_batch"]  # a checkpoint of a version without the field
    assert changes_since(saved, same) == ["rollout.hf_batch: '(absent)' -> 128"]
