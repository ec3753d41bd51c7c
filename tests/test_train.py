"""The GRPO loop end to end on tiny random models: resume, bad input, skipped steps."""
import io
import json
import math
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image

from racro_fast.config import load_config
from racro_fast.data import RowDataset
from racro_fast.synth import make_rows
from racro_fast.parallel import Single
from racro_fast.forward import ForwardPlan
from racro_fast.train import Sample, cut_at_vision_tokens, policy_update, train

CPU = torch.device("cpu")
ROOT = Path(__file__).resolve().parent.parent


def tiny_cfg(out: Path, cap: Path, rsn: Path, steps: int, *extra: str):
    return load_config(ROOT / "configs" / "demo_cpu.yaml", [
        f"model.captioner={cap}", f"model.reasoner={rsn}", f"run.output_dir={out}", f"train.steps={steps}",
        "train.questions_per_step=2", "train.mini_batch=1", "train.micro_batch=4", "rollout.group_size=2",
        "loss.entropy_coef=0.01",  # random models earn no reward: the entropy term makes the step move weights
        "rollout.max_caption_tokens=6", "rollout.max_reasoner_tokens=6", "data.synth_rows=16",
        "run.progress=false", "loss.kl_coef=0.001", "run.export=false", *extra])


def final_weights(out: Path) -> dict:
    from racro_fast.checkpoint import model_weights
    ckpts = sorted((out / "checkpoints").glob("step_*"))
    return model_weights(ckpts[-1])


def test_exact_resume(tmp_path, tiny_captioner_dir, tiny_reasoner_dir, caplog):
    """4 steps straight == 2 steps + resume + 2 steps: same losses, same weights (bit for bit)."""
    a, b = tmp_path / "a", tmp_path / "b"
    hist_a = train(tiny_cfg(a, tiny_captioner_dir, tiny_reasoner_dir, 4))["history"]
    train(tiny_cfg(b, tiny_captioner_dir, tiny_reasoner_dir, 2))
    with caplog.at_level("WARNING", logger="racro_fast.train"):
        hist_b = train(tiny_cfg(b, tiny_captioner_dir, tiny_reasoner_dir, 4))["history"]
    assert [h["step"] for h in hist_b] == [3, 4], "the resumed run must start after the checkpoint"
    assert "differs" not in caplog.text, "only train.steps changed, which a resume may change"
    for ha, hb in zip(hist_a[2:], hist_b):
        for key in ("loss", "reward_mean", "kl_mean", "caption_len_mean", "grad_norm"):
            assert ha[key] == hb[key], f"step {ha['step']} {key}: straight {ha[key]} vs resumed {hb[key]}"
    wa, wb = final_weights(a), final_weights(b)
    assert wa.keys() == wb.keys()
    diffs = {k: (wa[k] - wb[k]).abs().max().item() for k in wa}
    worst = max(diffs, key=diffs.get)
    assert diffs[worst] == 0.0, f"weights differ after resume, worst {worst}: {diffs[worst]}"
    # the weights did move: a resume test over a frozen model would prove nothing
    from safetensors.torch import load_file
    w0 = load_file(str(Path(tiny_captioner_dir) / "model.safetensors"))
    moved = max((wa[k] - w0[k]).abs().max().item() for k in wa if k in w0)
    assert moved > 0, "training did not change any weight"


def test_a_resume_with_another_config_names_what_changed(tmp_path, tiny_captioner_dir, tiny_reasoner_dir, caplog):
    # The checkpoint holds the config that wrote it: resuming with a different loss (not only more
    # steps or another log setting) goes on, and says which fields differ, old -> new
    out = tmp_path / "run"
    train(tiny_cfg(out, tiny_captioner_dir, tiny_reasoner_dir, 1))
    with caplog.at_level("WARNING", logger="racro_fast.train"):
        hist = train(tiny_cfg(out, tiny_captioner_dir, tiny_reasoner_dir, 2, "loss.kl_coef=0.002",
                              "rollout.temperature=0.9", "run.keep_checkpoints=3"))["history"]
    assert [h["step"] for h in hist] == [2]
    line = next(r.getMessage() for r in caplog.records if "differs" in r.getMessage())
    assert "loss.kl_coef: 0.001 -> 0.002" in line and "rollout.temperature: 1.0 -> 0.9" in line, line
    assert "train.steps" not in line and "run." not in line, line


def test_corrupt_rows_are_skipped_and_counted(tmp_path, tiny_captioner_dir, tiny_reasoner_dir):
    rows = make_rows("count", 6, seed=3)
    rows[1]["images"] = [{"bytes": b"not a png at all", "path": None}]
    rows[4]["images"] = [{"bytes": b"\x89PNG\r\n\x1a\n garbage", "path": None}]
    path = tmp_path / "rows.parquet"
    pq.write_table(pa.Table.from_pylist(rows), path)
    cfg = tiny_cfg(tmp_path / "run", tiny_captioner_dir, tiny_reasoner_dir, 3,
                   f"data.train_files={path}", "data.synth_task=", "loss.kl_coef=0")
    result = train(cfg)
    assert result["skipped"].get("bad_image") == 2, result["skipped"]
    assert len(result["history"]) == 3
    last = json.loads((tmp_path / "run" / "metrics.jsonl").read_text().splitlines()[-1])
    assert last["rows_skipped"] == 2


def test_overlong_prompts_are_skipped(tmp_path, tiny_captioner_dir, tiny_reasoner_dir):
    rows = make_rows("count", 4, seed=5)
    rows[0]["problem"] = "<image>" + " many words" * 400 + " How many shapes?"
    path = tmp_path / "rows.parquet"
    pq.write_table(pa.Table.from_pylist(rows), path)
    cfg = tiny_cfg(tmp_path / "run", tiny_captioner_dir, tiny_reasoner_dir, 2,
                   f"data.train_files={path}", "data.synth_task=", "loss.kl_coef=0", "data.max_prompt_len=200")
    result = train(cfg)
    assert result["skipped"].get("too_long", 0) >= 1, result["skipped"]


def test_rows_with_more_images_than_the_engine_takes_are_skipped(tmp_path, tiny_captioner_dir, tiny_reasoner_dir):
    """vLLM rejects a prompt with more images than limit_mm_per_prompt (engines.MM_LIMITS): such a
    row is skipped and counted before generation, not sent."""
    from racro_fast.engines import MM_LIMITS
    rows = make_rows("count", 4, seed=5)
    n = MM_LIMITS["image"] + 1
    rows[0]["images"] = rows[0]["images"] * n
    rows[0]["problem"] = "<image>" * n + " How many shapes are there in the first image?"
    path = tmp_path / "rows.parquet"
    pq.write_table(pa.Table.from_pylist(rows), path)
    cfg = tiny_cfg(tmp_path / "run", tiny_captioner_dir, tiny_reasoner_dir, 2,
                   f"data.train_files={path}", "data.synth_task=", "loss.kl_coef=0")
    result = train(cfg)
    assert result["skipped"].get("too_many_images", 0) >= 1, result["skipped"]


def _model_and_samples(tiny_captioner_dir, adv: list[float], empty_first: bool = False):
    from transformers import AutoTokenizer, Qwen2_5_VLForConditionalGeneration, Qwen2VLImageProcessor
    from racro_fast.prompts import build_captioner_inputs, captioner_messages
    tok = AutoTokenizer.from_pretrained(str(tiny_captioner_dir))
    proc = Qwen2VLImageProcessor.from_pretrained(str(tiny_captioner_dir))
    model = Qwen2_5_VLForConditionalGeneration.from_pretrained(str(tiny_captioner_dir)).train()
    row = make_rows("count", 1, seed=1)[0]
    image = Image.open(io.BytesIO(row["images"][0]["bytes"])).convert("RGB")
    cap = build_captioner_inputs(tok, proc, captioner_messages(row["problem"], 1), [image])
    caption = tok.encode("There are 3 shapes.", add_special_tokens=False)
    samples = []
    for i, a in enumerate(adv):
        resp = [] if (empty_first and i == 0) else caption[: 3 + i]
        samples.append(Sample(cap.prompt_ids + resp, len(cap.prompt_ids), cap.pixel_values, cap.image_grid_thw, a))
    return model, tok, samples


def test_non_finite_loss_skips_the_step(tiny_captioner_dir):
    cfg = load_config(ROOT / "configs" / "demo_cpu.yaml", ["train.micro_batch=2", "loss.kl_coef=0"])
    model, tok, samples = _model_and_samples(tiny_captioner_dir, [1.0, float("nan"), -1.0])
    before = {k: v.clone() for k, v in model.state_dict().items()}
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    with pytest.warns(UserWarning, match="non-finite"):
        out = policy_update(Single(cfg), model, opt, samples, cfg, tok.pad_token_id, CPU, ForwardPlan.from_config(cfg))
    assert out["skipped"] == 1.0
    changed = [k for k, v in model.state_dict().items() if not torch.equal(v, before[k])]
    assert not changed, f"a skipped step changed weights: {changed[:3]}"


def test_update_with_an_empty_caption(tiny_captioner_dir):
    """A caption of zero tokens (EOS cut, or cut at a vision token) trains without NaN."""
    cfg = load_config(ROOT / "configs" / "demo_cpu.yaml", ["train.micro_batch=4", "loss.kl_coef=0"])
    model, tok, samples = _model_and_samples(tiny_captioner_dir, [1.0, -1.0, 0.5], empty_first=True)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    out = policy_update(Single(cfg), model, opt, samples, cfg, tok.pad_token_id, CPU, ForwardPlan.from_config(cfg))
    assert out["skipped"] == 0.0 and math.isfinite(out["loss"]), out
    assert any(not torch.equal(v, before[k]) for k, v in model.state_dict().items())


def test_update_with_only_empty_captions(tiny_captioner_dir):
    """No caption token at all in the update (N = 0 through the fused op): a finite zero loss, the
    step taken, nothing moved by the policy gradient."""
    cfg = load_config(ROOT / "configs" / "demo_cpu.yaml", ["train.micro_batch=4", "loss.kl_coef=0"])
    model, tok, samples = _model_and_samples(tiny_captioner_dir, [1.0, -1.0], empty_first=True)
    samples[1].input_ids = samples[1].input_ids[:samples[1].prompt_len]
    opt = torch.optim.SGD(model.parameters(), lr=1e-2)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    out = policy_update(Single(cfg), model, opt, samples, cfg, tok.pad_token_id, CPU, ForwardPlan.from_config(cfg))
    assert out["skipped"] == 0.0 and out["loss"] == 0.0 and out["grad_norm"] == 0.0, out
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


def test_caption_cut_at_vision_token(tiny_tokenizer_dir):
    from transformers import AutoTokenizer
    from racro_fast.engines import GenOutput
    tok = AutoTokenizer.from_pretrained(str(tiny_tokenizer_dir))
    pad = tok.convert_tokens_to_ids("<|image_pad|>")
    ids = tok.encode("There are", add_special_tokens=False)
    out = GenOutput(token_ids=ids + [pad, 5, 6], logprobs=[-0.1] * (len(ids) + 3), text="x", truncated=True)
    assert cut_at_vision_tokens(out, {pad}, tok)
    assert out.token_ids == ids and len(out.logprobs) == len(ids) and out.text == "There are"
    assert not cut_at_vision_tokens(out, {pad}, tok)


def test_rollout_importance_weights_in_the_loop(tmp_path, tiny_captioner_dir, tiny_reasoner_dir):
    """With HF rollouts the engine's sampled-token log-probs are the trainer's own (same weights and
    numerics), so the correction must find nothing to correct: KL(rollout || trainer) ~ 0 and
    weights ~ 1. This is what ties the engine's log-prob convention to the loss's."""
    cfg = tiny_cfg(tmp_path / "run", tiny_captioner_dir, tiny_reasoner_dir, 2, "loss.is_mode=seq_tis",
                   "run.save_every=0")
    assert load_config(ROOT / "configs" / "demo_cpu.yaml").loss.is_mode == "off", "auto: off with HF rollouts"
    assert load_config(ROOT / "configs" / "qwen25vl_7b_r1_7b.yaml").loss.is_mode == "token_tis", "auto: on with vLLM"
    history = train(cfg)["history"]
    for m in history:
        assert m["rollout_kl"] < 1e-4, m
        assert abs(m["is_weight_mean"] - 1.0) < 1e-3 and m["is_weight_max"] < 1.01, m
        assert m["is_clipped_frac"] == 0.0, m


def test_min_caption_tokens_floor(tmp_path, monkeypatch, tiny_captioner_dir, tiny_reasoner_dir):
    """Captions shorter than train.min_caption_tokens score 0 whatever their answers. Every answer is
    graded correct here (the grader is not what is tested), so the reward is 1 without the floor and
    0 with a floor above the caption budget (6 tokens); the collapse metric is logged every step."""
    from racro_fast.reward_pool import RewardScorer
    monkeypatch.setattr(RewardScorer, "score", lambda self, completions, answers: [1.0] * len(completions))
    rewards = {}
    for floor in (0, 7):
        cfg = tiny_cfg(tmp_path / f"run{floor}", tiny_captioner_dir, tiny_reasoner_dir, 2,
                       f"train.min_caption_tokens={floor}", "run.save_every=0")
        history = train(cfg)["history"]
        rewards[floor] = [m["reward_mean"] for m in history]
        assert all(m["collapse"] == 0.0 for m in history)
    assert rewards == {0: [1.0, 1.0], 7: [0.0, 0.0]}, rewards


def test_profile_reports_phases_and_writes_the_trace(tmp_path, tiny_captioner_dir, tiny_reasoner_dir, capsys):
    from racro_fast.cli import main
    out = tmp_path / "prof"
    overrides = [f"model.captioner={tiny_captioner_dir}", f"model.reasoner={tiny_reasoner_dir}",
                 f"run.output_dir={out}", "train.questions_per_step=2", "train.mini_batch=2", "rollout.group_size=2",
                 "rollout.max_caption_tokens=4", "rollout.max_reasoner_tokens=4", "data.synth_rows=8",
                 "run.progress=false", "loss.kl_coef=0"]
    assert main(["profile", "--config", str(ROOT / "configs" / "demo_cpu.yaml"), "--steps", "2", *overrides]) == 0
    text = capsys.readouterr().out
    summary = text[text.index("per step, mean over 1 step(s):"):]
    for name in ("caption_s", "policy_forward_s", "policy_loss_s", "policy_backward_s", "policy_tokens_per_s"):
        line = next(line for line in summary.splitlines() if line.split()[:1] == [name])
        assert float(line.split()[1]) > 0, line
    assert (out / "profile_trace.json").stat().st_size > 0
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert all(r["policy_forward_s"] + r["policy_backward_s"] <= r["train_s"] for r in rows)
    # the weight push is in every step's metrics (nothing moves into the HF engine: it shares the module)
    assert all(r["push_bytes"] == 0.0 and 0.0 <= r["push_s"] <= r["sync_s"] for r in rows), rows


def test_trains_on_synthetic_scenes(tmp_path, tiny_captioner_dir, tiny_reasoner_dir):
    """`data.synth_task: scene` writes the scene rows once and trains on them like on any rows."""
    out = tmp_path / "scene"
    result = train(tiny_cfg(out, tiny_captioner_dir, tiny_reasoner_dir, 1, "data.synth_task=scene",
                            "run.save_every=0"))
    assert [h["step"] for h in result["history"]] == [1]
    (data,) = (out / "data").glob("synth_scene_*.parquet")
    problems = [r.problem for r in RowDataset(str(data))]
    assert len(problems) == 16 and any("How many shapes" in p for p in problems)
    assert any(p.startswith("<image>What colour is the") for p in problems)
