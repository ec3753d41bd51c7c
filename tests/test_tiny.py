"""The tiny tokenizer, captioner and reasoner keep the interfaces of the real Qwen models."""

from __future__ import annotations

import pytest
import torch
from PIL import Image
from transformers import AutoImageProcessor, AutoTokenizer, Qwen2_5_VLForConditionalGeneration, Qwen2ForCausalLM

from racro_fast.prompts import (
    CAPTIONER_SYSTEM,
    CAPTIONER_USER,
    REASONER_TEMPLATE,
    build_captioner_inputs,
    captioner_messages,
)
from racro_fast.tiny import SPECIAL_TOKENS, build_reasoner, build_tokenizer

ROUND_TRIP = [
    CAPTIONER_SYSTEM,
    CAPTIONER_USER.format(problem="How many shapes are there?"),
    REASONER_TEMPLATE.format(caption="There are 3 shapes.", question="What is  the sum?\n(A) 12 (B) 7"),
    "\\boxed{3}",
    "The answer is \\boxed{\\frac{1}{2}}.",
    " leading and trailing spaces  ",
    "tabs\tand\n\nnewlines",
    "angle ∠ABC = 45°, 3 × 4 ≠ 11, π ≈ 3.14",
]


@pytest.mark.parametrize("where", ["tokenizer", "reasoner", "captioner"])
def test_round_trip_and_digits(where, tiny_tokenizer_dir, tiny_reasoner_dir, tiny_captioner_dir) -> None:
    # A qwen2 model directory loads as Qwen2Tokenizer, which rebuilds its own pre-tokenizer:
    # it must encode and decode exactly like the trained tokenizer.
    path = {"tokenizer": tiny_tokenizer_dir, "reasoner": tiny_reasoner_dir, "captioner": tiny_captioner_dir}[where]
    tok = AutoTokenizer.from_pretrained(str(path))
    ref = AutoTokenizer.from_pretrained(str(tiny_tokenizer_dir))
    for s in ROUND_TRIP:
        ids = tok.encode(s, add_special_tokens=False)
        assert tok.decode(ids) == s, f"{type(tok).__name__} from {where}: {s!r} decodes to {tok.decode(ids)!r}"
        expected = ref.encode(s, add_special_tokens=False)
        assert ids == expected, f"{where} encodes {s!r} as {ids}, the trained tokenizer as {expected}"
    digits = tok.convert_ids_to_tokens(tok.encode("x=1234567890", add_special_tokens=False))
    assert digits[-10:] == list("1234567890"), f"digits must be split one by one, got {digits}"


def test_vocab_and_special_tokens(tiny_tokenizer_dir) -> None:
    tok = AutoTokenizer.from_pretrained(str(tiny_tokenizer_dir))
    assert len(tok) == 256, f"vocab of {len(tok)}, expected 256 (small on purpose)"
    for t in SPECIAL_TOKENS:
        assert tok.convert_ids_to_tokens(tok.convert_tokens_to_ids(t)) == t, f"{t} is not a single token"
    assert tok.eos_token == "<|im_end|>" and tok.pad_token == "<|endoftext|>"
    assert tok.padding_side == "left"
    # Special tokens in text are atomic, not split into characters.
    assert tok.encode("<|im_start|>user", add_special_tokens=False)[0] == tok.convert_tokens_to_ids("<|im_start|>")


def test_chat_template(tiny_tokenizer_dir) -> None:
    tok = AutoTokenizer.from_pretrained(str(tiny_tokenizer_dir))
    messages = [
        {"role": "system", "content": "sys"},
        {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Question: q"}]},
    ]
    text = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    assert text == (
        "<|im_start|>system\nsys<|im_end|>\n<|im_start|>user\n<|vision_start|><|image_pad|><|vision_end|>"
        "Question: q<|im_end|>\n<|im_start|>assistant\n"
    ), f"unexpected rendering {text!r}"
    default_system = tok.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False)
    assert default_system.startswith("<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n")
    assert tok.decode(tok.encode(text, add_special_tokens=False)) == text


def test_tokenizer_is_deterministic(tmp_path) -> None:
    a = build_tokenizer(tmp_path / "a")
    b = build_tokenizer(tmp_path / "b")
    assert a.get_vocab() == b.get_vocab()
    with pytest.raises(ValueError, match="vocab_size"):
        build_tokenizer(tmp_path / "c", vocab_size=32)


def test_captioner_forward_and_generate(tiny_captioner_dir) -> None:
    tok = AutoTokenizer.from_pretrained(str(tiny_captioner_dir))
    processor = AutoImageProcessor.from_pretrained(str(tiny_captioner_dir))
    model = Qwen2_5_VLForConditionalGeneration.from_pretrained(str(tiny_captioner_dir)).eval()
    cfg = model.config
    assert cfg.text_config.vocab_size % 8 == 0 and cfg.text_config.vocab_size >= len(tok)
    assert cfg.image_token_id == tok.convert_tokens_to_ids("<|image_pad|>")
    assert cfg.vision_start_token_id == tok.convert_tokens_to_ids("<|vision_start|>")
    assert model.generation_config.eos_token_id == tok.eos_token_id
    assert model.generation_config.pad_token_id == tok.pad_token_id

    image = Image.new("RGB", (56, 56), (200, 30, 30))
    inputs = build_captioner_inputs(tok, processor, captioner_messages("How many shapes?", 1), [image])
    pads = inputs.prompt_ids.count(cfg.image_token_id)
    assert inputs.image_grid_thw.tolist() == [[1, 4, 4]], "56x56 must give 4x4 patches"
    assert pads == 4, f"16 patches merged 2x2 must give 4 image tokens, got {pads}"

    ids = torch.tensor([inputs.prompt_ids])
    with torch.no_grad():
        images = {"pixel_values": inputs.pixel_values, "image_grid_thw": inputs.image_grid_thw}
        logits = model(input_ids=ids, **images).logits
    assert logits.shape == (1, ids.shape[1], cfg.text_config.vocab_size)
    assert torch.isfinite(logits).all()
    out = model.generate(
        input_ids=ids,
        attention_mask=torch.ones_like(ids),
        pixel_values=inputs.pixel_values,
        image_grid_thw=inputs.image_grid_thw,
        do_sample=False,
        max_new_tokens=5,
    )
    assert out.shape[1] > ids.shape[1], "generate produced no tokens"


def test_reasoner_shape_and_seed(tiny_tokenizer_dir, tiny_reasoner_dir, tmp_path) -> None:
    model = Qwen2ForCausalLM.from_pretrained(str(tiny_reasoner_dir))
    cfg = model.config
    head_dim = cfg.hidden_size // cfg.num_attention_heads
    assert head_dim == 64, f"vLLM's CPU attention needs head_dim 64, got {head_dim}"
    assert not cfg.tie_word_embeddings
    assert model.lm_head.weight.data_ptr() != model.model.embed_tokens.weight.data_ptr()

    tok = AutoTokenizer.from_pretrained(str(tiny_tokenizer_dir))
    again = build_reasoner(tmp_path / "same", tok, seed=0)
    other = build_reasoner(tmp_path / "other", tok, seed=1)
    for (name, p), q, r in zip(model.named_parameters(), again.parameters(), other.parameters()):
        assert torch.equal(p, q), f"{name} differs between two builds with seed 0"
    assert not torch.equal(model.lm_head.weight, other.lm_head.weight), "seed 1 gave the same weights as seed 0"
