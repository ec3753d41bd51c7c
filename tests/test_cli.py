"""A user's mistake is one line naming the field, exit status 2; `--debug` shows the traceback.
Paths and rank counts are checked before any model loads."""
from __future__ import annotations

from pathlib import Path

import pytest

from racro_fast.cli import main
from racro_fast.config import ConfigError, check_world, load_config

ROOT = Path(__file__).resolve().parent.parent
DEMO = str(ROOT / "configs" / "demo_cpu.yaml")


def run(capsys, *argv: str) -> tuple[int, str]:
    rc = main(list(argv))
    return rc, capsys.readouterr().err


def test_bad_value_is_one_line(capsys):
    rc, err = run(capsys, "train", "--config", DEMO, "train.lr=abc")
    assert rc == 2
    assert err == "racro-fast: error: train.lr: expected a number, got 'abc'\n", err


def test_debug_shows_the_traceback():
    with pytest.raises(ConfigError, match="train.lr"):
        main(["train", "--config", DEMO, "train.lr=abc", "--debug"])


def test_missing_data_file_named_by_its_field(capsys, tmp_path):
    missing = tmp_path / "x.parquet"
    rc, err = run(capsys, "train", "--config", DEMO, f"data.train_files={missing}", "data.synth_task=",
                  f"run.output_dir={tmp_path / 'run'}")
    assert rc == 2 and err == f"racro-fast: error: data.train_files: {missing} does not exist\n", err
    assert not (tmp_path / "run").exists(), "nothing may be written before the inputs are checked"


def test_bad_model_path(capsys, tmp_path):
    rc, err = run(capsys, "train", "--config", DEMO, f"model.captioner={tmp_path}", f"model.reasoner={tmp_path}",
                  f"run.output_dir={tmp_path / 'run'}")
    assert rc == 2 and err.startswith(f"racro-fast: error: model.captioner: {tmp_path} is not a checkpoint"), err


def test_world_size_checked_before_models_load():
    cfg = load_config(DEMO, ["train.questions_per_step=6", "train.mini_batch=6"])
    check_world(cfg, 2)
    check_world(cfg, 3)
    with pytest.raises(ConfigError, match=r"^train.questions_per_step: 6 does not divide over 4 ranks"):
        check_world(cfg, 4)
    cfg = load_config(DEMO, ["train.questions_per_step=8", "train.mini_batch=2"])
    with pytest.raises(ConfigError, match=r"^train.mini_batch: 2 questions do not divide over 4 ranks"):
        check_world(cfg, 4)


def test_loss_section_is_the_kernels_config():
    from racro_fast.kernels import GRPOLossConfig
    cfg = load_config(DEMO, ["loss.dual_clip=3", "loss.kl_type=k2", "loss.loss_agg=seq-mean-token-sum-norm",
                             "rollout.max_caption_tokens=7"])
    assert isinstance(cfg.loss, GRPOLossConfig)
    assert (cfg.loss.dual_clip, cfg.loss.kl_type, cfg.loss.norm_len) == (3.0, "k2", 7)
    assert load_config(DEMO, ["loss.dual_clip=none"]).loss.dual_clip is None
