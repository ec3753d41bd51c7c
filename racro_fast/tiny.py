"""Tiny random-weight stand-ins for the real models, for the CPU demo and the tests.

There is no model hub here, so the tokenizer, the Qwen2.5-VL captioner and the Qwen2
reasoner are built from configs. They keep the real models' interfaces (special tokens,
chat template, image pads, HF parameter names) so the same trainer and engines run on
them; the sizes are the smallest that vLLM's CPU attention accepts (head_dim 64).

    from racro_fast.tiny import build_tokenizer, build_captioner, build_reasoner
    tok = build_tokenizer("runs/tiny/tok")
    captioner, image_processor = build_captioner("runs/tiny/captioner", tok)
    reasoner = build_reasoner("runs/tiny/reasoner", tok)
"""

from __future__ import annotations

import string
from pathlib import Path

import torch
from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
from transformers import (
    PreTrainedTokenizerFast,
    Qwen2_5_VLConfig,
    Qwen2_5_VLForConditionalGeneration,
    Qwen2Config,
    Qwen2ForCausalLM,
    Qwen2VLImageProcessorPil,
)

from racro_fast.prompts import CAPTIONER_SYSTEM, CAPTIONER_USER, REASONER_TEMPLATE

# Qwen2.5-VL's special tokens, in its order.
PAD_TOKEN = "<|endoftext|>"
EOS_TOKEN = "<|im_end|>"
SPECIAL_TOKENS = [
    PAD_TOKEN,
    "<|im_start|>",
    EOS_TOKEN,
    "<|vision_start|>",
    "<|vision_end|>",
    "<|image_pad|>",
    "<|video_pad|>",
]

# Qwen2's pre-tokenizer regex: digits (\p{N}) come out one by one.
_QWEN2_SPLIT = (
    r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"""
    r"""|\s*[\r\n]+|\s+(?!\S)|\s+"""
)

# Qwen2.5-VL-Instruct's chat template, verbatim.
CHAT_TEMPLATE = (
    "{% set image_count = namespace(value=0) %}{% set video_count = namespace(value=0) %}"
    "{% for message in messages %}{% if loop.first and message['role'] != 'system' %}"
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n{% endif %}"
    "<|im_start|>{{ message['role'] }}\n{% if message['content'] is string %}"
    "{{ message['content'] }}<|im_end|>\n{% else %}{% for content in message['content'] %}"
    "{% if content['type'] == 'image' or 'image' in content or 'image_url' in content %}"
    "{% set image_count.value = image_count.value + 1 %}"
    "{% if add_vision_id %}Picture {{ image_count.value }}: {% endif %}"
    "<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif content['type'] == 'video' or 'video' in content %}"
    "{% set video_count.value = video_count.value + 1 %}"
    "{% if add_vision_id %}Video {{ video_count.value }}: {% endif %}"
    "<|vision_start|><|video_pad|><|vision_end|>"
    "{% elif 'text' in content %}{{ content['text'] }}{% endif %}{% endfor %}<|im_end|>\n"
    "{% endif %}{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

# Characters whose bytes are in the base vocabulary: printable ASCII, whitespace and the math
# symbols synthetic tasks tend to print. Text made of these round-trips exactly; other
# characters lose the bytes that have no token (Qwen2's BPE has no <unk>).
_ALPHABET_TEXT = string.printable.replace("\r\x0b\x0c", "") + "°×÷π√≈≤≥≠±·²³½∠△−"

_PROBLEMS = [
    "How many shapes are in the image?",
    "What is the height of the tallest bar?",
    "What is the sum of the numbers shown?",
    "Which color is the largest circle?",
    "How many red squares are there?",
    "What is the value of x in the figure?",
    "What is the area of the triangle?",
    "How many more blue dots than green dots are there?",
]
_CAPTIONS = [
    "There are 3 shapes.",
    "The tallest bar is 4.",
    "The image shows a bar chart with 5 bars.",
    "There is a red circle and a blue square.",
    "The numbers are 2, 7 and 9.",
    "A triangle with base 6 and height 8.",
    "There are 4 green dots and 6 blue dots.",
    "The angle is 45 degrees.",
]
_WORDS = (
    "the a an of in on and is are there with image shows bar chart circle square triangle "
    "red blue green yellow black white left right top bottom number value sum total count "
    "how many what which answer caption question step think final so we have equals"
).split()


def _corpus() -> list[str]:
    """Texts the BPE merges are learnt from: the prompts dominate so sampling hits them."""
    texts: list[str] = []
    for problem, caption in zip(_PROBLEMS, _CAPTIONS):
        texts += [CAPTIONER_SYSTEM, CAPTIONER_USER.format(problem=problem)]
        texts.append(REASONER_TEMPLATE.format(caption=caption, question=problem))
        texts.append(caption)
    texts += ["You are a helpful assistant.", "system", "user", "assistant"]
    texts += [f"\\boxed{{{i}}}" for i in range(10)] + [f"The answer is \\boxed{{{i}}}." for i in range(10)]
    texts += [" ".join(_WORDS)] * 4
    texts += ["0 1 2 3 4 5 6 7 8 9", "3.5 + 4 = 7.5", "12 - 5 = 7", "2 * 3 = 6"]
    return texts


def build_tokenizer(
    out_dir: str | Path, corpus: list[str] | None = None, vocab_size: int = 256,
    extra: tuple[str, ...] | list[str] = (),
) -> PreTrainedTokenizerFast:
    """Train a small byte-level BPE with Qwen2's pre-tokenizer and save it with the chat template.

    The vocabulary is kept tiny on purpose: a random-init captioner must hit useful tokens
    by sampling; `extra` texts join the default corpus, so a task's own words get tokens of their
    own. Normaliser, pre-tokenizer and decoder are exactly those `Qwen2Tokenizer`
    builds, because `AutoTokenizer` (and so vLLM) loads a qwen2 model directory with that
    class whatever tokenizer_config.json names; the two then encode and decode alike.
    `decode(encode(s)) == s` for NFC text over the alphabet above.
    """
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    alphabet = sorted(set(byte_level.pre_tokenize_str(_ALPHABET_TEXT)[0][0]))
    if vocab_size < len(SPECIAL_TOKENS) + len(alphabet):
        raise ValueError(
            f"vocab_size={vocab_size} is smaller than the special tokens plus the byte alphabet "
            f"({len(SPECIAL_TOKENS) + len(alphabet)})"
        )
    bpe = Tokenizer(models.BPE(unk_token=None, fuse_unk=False, byte_fallback=False))
    bpe.normalizer = normalizers.NFC()
    bpe.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Split(Regex(_QWEN2_SPLIT), behavior="isolated", invert=False), byte_level]
    )
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS, initial_alphabet=alphabet, show_progress=False
    )
    bpe.train_from_iterator((_corpus() if corpus is None else corpus) + list(extra), trainer=trainer)
    tok = PreTrainedTokenizerFast(
        tokenizer_object=bpe,
        eos_token=EOS_TOKEN,
        pad_token=PAD_TOKEN,
        additional_special_tokens=[t for t in SPECIAL_TOKENS if t not in (EOS_TOKEN, PAD_TOKEN)],
        clean_up_tokenization_spaces=False,
        padding_side="left",
        model_max_length=4096,
    )
    tok.chat_template = CHAT_TEMPLATE
    tok.save_pretrained(str(out_dir))
    return tok


def _vocab_size(tokenizer: PreTrainedTokenizerFast) -> int:
    return (len(tokenizer) + 7) // 8 * 8


def _token_ids(tokenizer: PreTrainedTokenizerFast) -> dict[str, int]:
    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in SPECIAL_TOKENS}
    missing = [t for t, i in ids.items() if i is None]
    if missing:
        raise ValueError(f"tokenizer lacks the special tokens {missing}; build it with build_tokenizer")
    return ids


def build_captioner(
    out_dir: str | Path, tokenizer: PreTrainedTokenizerFast, seed: int = 0, kv_heads: int = 1, tied: bool = False
) -> tuple[Qwen2_5_VLForConditionalGeneration, Qwen2VLImageProcessorPil]:
    """A two-layer Qwen2.5-VL with random weights; model, image processor and tokenizer saved to out_dir.
    kv_heads as in build_reasoner; tied=True shares the input embedding with the output head (as
    Qwen2.5-VL-3B does; the 7B unties them).

    The image processor is the PIL one (no torchvision on CPU); 56x56 images give
    16 patches, merged 2x2 into 4 image tokens; at most 112x112 pixels (16 tokens).
    """
    ids = _token_ids(tokenizer)
    text_hidden = 128
    config = Qwen2_5_VLConfig(
        vision_config=dict(
            depth=2,
            hidden_size=64,
            intermediate_size=128,
            num_heads=1,
            out_hidden_size=text_hidden,
            patch_size=14,
            spatial_merge_size=2,
            temporal_patch_size=2,
            window_size=56,
            fullatt_block_indexes=[1],
        ),
        text_config=dict(
            vocab_size=_vocab_size(tokenizer),
            hidden_size=text_hidden,
            intermediate_size=256,
            num_hidden_layers=2,
            num_attention_heads=2,
            num_key_value_heads=kv_heads,
            max_position_embeddings=4096,
            # mrope splits head_dim / 2 = 32 rotary pairs over (time, height, width).
            rope_parameters={"rope_type": "default", "rope_theta": 1e6, "mrope_section": [8, 12, 12]},
            eos_token_id=ids[EOS_TOKEN],
            pad_token_id=ids[PAD_TOKEN],
            bos_token_id=ids[PAD_TOKEN],
        ),
        image_token_id=ids["<|image_pad|>"],
        video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"],
        vision_end_token_id=ids["<|vision_end|>"],
        eos_token_id=ids[EOS_TOKEN],
        pad_token_id=ids[PAD_TOKEN],
        tie_word_embeddings=tied,
    )
    torch.manual_seed(seed)
    model = Qwen2_5_VLForConditionalGeneration(config).to(torch.float32).eval()
    _set_generation_ids(model, ids)
    image_processor = Qwen2VLImageProcessorPil(min_pixels=56 * 56, max_pixels=112 * 112)
    model.save_pretrained(str(out_dir))
    image_processor.save_pretrained(str(out_dir))
    tokenizer.save_pretrained(str(out_dir))
    return model, image_processor


def build_reasoner(out_dir: str | Path, tokenizer: PreTrainedTokenizerFast, seed: int = 0,
                   kv_heads: int = 1) -> Qwen2ForCausalLM:
    """A two-layer Qwen2 with random weights, saved with the tokenizer.

    head_dim is 64 because vLLM's CPU attention needs it (16 fails); embeddings are untied
    like the 7B reasoner's. kv_heads=1 shares one key/value head between the two query heads
    (grouped-query attention, as in the real reasoners); 2 gives each head its own.
    """
    ids = _token_ids(tokenizer)
    config = Qwen2Config(
        vocab_size=_vocab_size(tokenizer),
        hidden_size=128,
        intermediate_size=256,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=kv_heads,
        max_position_embeddings=4096,
        rope_parameters={"rope_type": "default", "rope_theta": 1e6},
        tie_word_embeddings=False,
        eos_token_id=ids[EOS_TOKEN],
        pad_token_id=ids[PAD_TOKEN],
        bos_token_id=ids[PAD_TOKEN],
        dtype="float32",
    )
    torch.manual_seed(seed)
    model = Qwen2ForCausalLM(config).to(torch.float32).eval()
    _set_generation_ids(model, ids)
    model.save_pretrained(str(out_dir))
    tokenizer.save_pretrained(str(out_dir))
    return model


def _set_generation_ids(model: torch.nn.Module, ids: dict[str, int]) -> None:
    # generate() reads its stop and pad ids from the generation config, not the model config.
    model.generation_config.eos_token_id = ids[EOS_TOKEN]
    model.generation_config.pad_token_id = ids[PAD_TOKEN]
    model.generation_config.bos_token_id = ids[PAD_TOKEN]
