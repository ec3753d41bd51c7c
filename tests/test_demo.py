"""The CPU demo, shortened: the reward rises, and the trained captioner beats the untrained one in
`racro-fast eval` caption mode with the same frozen reasoner."""
import json
from pathlib import Path
from statistics import mean

import pytest

from racro_fast.demo import demo_config, prepare_demo_models
from racro_fast.evaluate import evaluate
from racro_fast.synth import write_synth
from racro_fast.train import train

ROOT = Path(__file__).resolve().parent.parent
STEPS = 100


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo")
    cfg = demo_config(ROOT / "configs" / "demo_cpu.yaml",
                      [f"run.output_dir={out}", f"train.steps={STEPS}", "run.progress=false", "run.save_every=0"])
    result = train(cfg)
    return cfg, out, result


def test_demo_reward_rises(demo):
    cfg, out, result = demo
    rewards = [h["reward_mean"] for h in result["history"]]
    assert len(rewards) == STEPS
    first, last = mean(rewards[:20]), mean(rewards[-20:])
    curve = " ".join(f"{r:.2f}" for r in rewards[::5])
    assert last >= 1.6 * first and last >= 0.4, f"reward did not climb: first-20 {first:.3f}, last-20 {last:.3f}; {curve}"
    assert (out / "reward_curve.png").stat().st_size > 0
    logged = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in logged] == list(range(1, STEPS + 1))
    for key in ("reward_std", "accuracy", "zero_var_group_frac", "kl_mean", "clip_frac", "entropy_mean",
                "caption_len_mean", "caption_len_max", "caption_truncated_frac", "reasoner_len_mean",
                "tokens_per_s", "caption_s", "reason_s", "train_s", "peak_mem_gb"):
        assert key in logged[-1], f"metric {key} missing from metrics.jsonl"


def test_trained_captioner_beats_untrained(demo, tmp_path):
    cfg, out, _ = demo
    untrained, reasoner = prepare_demo_models(cfg)  # cached: the captioner before GRPO
    data = write_synth(str(tmp_path / "heldout.parquet"), 48, task=cfg.data.synth_task, seed=4242,
                       size=cfg.data.image_size)
    kw = dict(modes=["caption"], engine="hf", max_caption_tokens=cfg.rollout.max_caption_tokens,
              max_reasoner_tokens=cfg.rollout.max_reasoner_tokens, reasoner_temperature=0.0)
    acc = {}
    for name, captioner in (("trained", out / "export"), ("untrained", untrained)):
        res = evaluate(captioner, [reasoner], [data], out_dir=tmp_path / name, **kw)
        (bench,) = res["accuracy"]
        acc[name] = res["accuracy"][bench][f"{Path(reasoner).name}/caption"]
    assert acc["trained"] >= acc["untrained"] + 0.15, f"caption-mode accuracy {acc}"
