"""Prompt templates of RACRO and the token ids they turn into.

The captioner and reasoner texts are the paper's, character for character: the reasoner was
trained against exactly these, and a reworded prompt changes the reward. Templates are
`str.format` strings, so the braces of \\boxed{} are doubled in the constants;
`REASONER_TEMPLATE.format(caption=c, question=q)` gives the paper's text, and braces inside
the caption or question are never re-interpreted.

On CPU the full Qwen2_5_VLProcessor cannot be built (its video processor needs torchvision),
so `build_captioner_inputs` does its job from the tokenizer and the image processor: chat
template -> ids, then each <|image_pad|> expanded to the image's number of merged patches.
"""
from __future__ import annotations

import math
import re
from array import array
from collections import OrderedDict
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch import Tensor
from PIL import Image

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase
    from transformers.image_processing_utils import BaseImageProcessor

CAPTIONER_SYSTEM = (
    "You are given an image and a relevant question. Based on the query, please describe the image in detail. "
    "Do not try to answer the question."
)
CAPTIONER_USER = "Question: {problem}\nPlease describe the image. DO NOT try to answer the question!"
REASONER_TEMPLATE = (
    "### The detailed caption of the provided image: {caption}\n\n"
    "### Question: {question} Please think step by step. The final answer MUST BE put in \\boxed{{}}."
)
# Joint inference (evaluation): the reasoner also sees the captioner's own step-by-step answer
# and keeps it unless it finds it wrong, so a strong VLM answer is not thrown away.
JOINT_TEMPLATE = (
    "You are given a detailed caption of an image, a question about the image, and a tentative "
    "response written by a model that saw the image. Use all of them to answer the question.\n\n"
    "### The detailed caption of the provided image: {caption}\n\n"
    "### Note that the caption may contain incorrect solutions; do not be misguided by them.\n\n"
    "### The question: {question}\n\n"
    "### A tentative model response: {tentative}\n\n"
    "### The tentative response may be wrong (calculation errors, faulty logic and so on); if so, "
    "ignore it and solve the problem yourself. If there is no evidence that it is wrong, give the "
    "tentative response's answer.\n\n"
    "### Please think step by step. The final answer MUST BE put in \\boxed{{}}."
)
# The VLM alone: the baseline, and the tentative answer that JOINT_TEMPLATE checks.
DIRECT_TEMPLATE = "{problem}\nPlease think step by step. The final answer MUST BE put in \\boxed{{}}."

IMAGE_PAD = "<|image_pad|>"
# "<image>" (ViRL39K, geometry3k) and "<image 1>" (MMMU) mark where images go in the raw text;
# the chat template places the images itself.
_IMAGE_PLACEHOLDER = re.compile(r"<image\s*\d*>")


def clean_problem(problem: str) -> str:
    """The problem text without image placeholders and surrounding whitespace."""
    return _IMAGE_PLACEHOLDER.sub("", problem).strip()


def _vision_messages(system: str | None, text: str, num_images: int) -> list[dict]:
    if num_images < 0:
        raise ValueError(f"num_images: must be >= 0, got {num_images}")
    content = [{"type": "image"} for _ in range(num_images)] + [{"type": "text", "text": text}]
    messages = [{"role": "system", "content": system}] if system is not None else []
    return messages + [{"role": "user", "content": content}]


def captioner_messages(
    problem: str, num_images: int, system: str = CAPTIONER_SYSTEM, user_template: str = CAPTIONER_USER
) -> list[dict]:
    """Chat messages asking the captioner for a question-conditioned caption (images first)."""
    return _vision_messages(system, user_template.format(problem=clean_problem(problem)), num_images)


def reasoner_messages(caption: str, question: str, template: str = REASONER_TEMPLATE) -> list[dict]:
    """The text-only reasoner's prompt: caption + question + the \\boxed{} instruction."""
    text = template.format(caption=caption.strip(), question=clean_problem(question))
    return [{"role": "user", "content": text}]


def joint_messages(
    caption: str, question: str, tentative_answer: str, template: str = JOINT_TEMPLATE
) -> list[dict]:
    """The reasoner's prompt for joint inference: caption, question and the VLM's own answer."""
    question = clean_problem(question)
    text = template.format(caption=caption.strip(), question=question, tentative=tentative_answer.strip())
    return [{"role": "user", "content": text}]


def direct_messages(problem: str, num_images: int, template: str = DIRECT_TEMPLATE) -> list[dict]:
    """The VLM answering on its own, step by step, with the final answer in \\boxed{}."""
    return _vision_messages(None, template.format(problem=clean_problem(problem)), num_images)


@dataclass
class CaptionerInputs:
    prompt_ids: list[int]  # image pads expanded: what the HF model consumes
    pixel_values: torch.Tensor  # (sum of patches, C * temporal_patch * patch * patch)
    image_grid_thw: torch.Tensor  # (num_images, 3) int64
    vllm_prompt_ids: list[int]  # one pad per image: vLLM expands them itself


def _pad_token_id(tokenizer: PreTrainedTokenizerBase) -> int:
    pad_id = tokenizer.convert_tokens_to_ids(IMAGE_PAD)
    if pad_id is None or (pad_id == tokenizer.unk_token_id and IMAGE_PAD != tokenizer.unk_token):
        raise ValueError(f"tokenizer: has no {IMAGE_PAD} token")
    return pad_id


def text_prompt_ids(tokenizer: PreTrainedTokenizerBase, messages: list[dict]) -> list[int]:
    """Token ids of `messages` under the tokenizer's chat template, ready for generation (a new list)."""
    return text_prompt_ids_batch(tokenizer, [messages])[0]


# The encodings of the MEMO_SIZE texts rendered last, (tokenizer, text) -> ids, the newest last. A
# reasoner prompt comes back often (a group's captions that came out the same, a caption and question
# of an earlier step: 40% of the demo's first 22 steps' prompts), and the encoding is most of a
# prompt's cost. Held as 4-byte ids: a full memo of 100-token prompts is ~2 MB.
MEMO_SIZE = 4096
_ENCODED: OrderedDict[tuple[PreTrainedTokenizerBase, str], array] = OrderedDict()


def text_prompt_ids_batch(tokenizer: PreTrainedTokenizerBase, conversations: list[list[dict]]) -> list[list[int]]:
    """`text_prompt_ids` of each conversation, the texts not in the memo encoded in one call (the
    tokenizer's batch encoding: half the time of one call per text for the reasoner's prompts)."""
    texts = [tokenizer.apply_chat_template(m, add_generation_prompt=True, tokenize=False) for m in conversations]
    new = list(dict.fromkeys(t for t in texts if (tokenizer, t) not in _ENCODED))
    if new:  # the chat template wrote every special token: a BOS added here would be a second one
        for text, ids in zip(new, tokenizer(new, add_special_tokens=False)["input_ids"]):
            _ENCODED[(tokenizer, text)] = array("i", ids)
    out = []
    for text in texts:
        _ENCODED.move_to_end((tokenizer, text))
        out.append(_ENCODED[(tokenizer, text)].tolist())
    while len(_ENCODED) > MEMO_SIZE:
        _ENCODED.popitem(last=False)
    return out


def build_captioner_inputs(
    tokenizer: PreTrainedTokenizerBase,
    image_processor: BaseImageProcessor,
    messages: list[dict],
    images: list[Image.Image],
) -> CaptionerInputs:
    """Prompt ids, pixel values and image grids for a Qwen2.5-VL captioner.

    Each image's <|image_pad|> becomes prod(grid_thw) // merge_size**2 pads, the number of
    vision tokens the model's merger emits for it, exactly as Qwen2_5_VLProcessor does.
    """
    n_slots = sum(
        1
        for m in messages
        if not isinstance(m["content"], str)
        for part in m["content"]
        if part.get("type") == "image"
    )
    if n_slots != len(images):
        raise ValueError(f"images: {len(images)} images for {n_slots} image entries in messages")
    ids = text_prompt_ids(tokenizer, messages)
    pad_id = _pad_token_id(tokenizer)
    positions = [i for i, t in enumerate(ids) if t == pad_id]
    if len(positions) != len(images):
        raise ValueError(
            f"tokenizer: its chat template wrote {len(positions)} {IMAGE_PAD} tokens for {len(images)} images"
        )
    if not images:
        patch_dim = 3 * image_processor.temporal_patch_size * image_processor.patch_size**2
        return CaptionerInputs(
            prompt_ids=ids,
            pixel_values=torch.zeros(0, patch_dim),
            image_grid_thw=torch.zeros(0, 3, dtype=torch.long),
            vllm_prompt_ids=list(ids),
        )
    features = image_processor(images=images, return_tensors="pt")
    grid = features["image_grid_thw"].long()
    merge = image_processor.merge_size**2
    counts = [math.prod(g) // merge for g in grid.tolist()]
    expanded: list[int] = []
    start = 0
    for pos, count in zip(positions, counts):
        expanded += ids[start:pos] + [pad_id] * count
        start = pos + 1
    expanded += ids[start:]
    return CaptionerInputs(
        prompt_ids=expanded,
        pixel_values=features["pixel_values"],
        image_grid_thw=grid,
        vllm_prompt_ids=ids,
    )


def mm_token_types(input_ids: Tensor, config) -> Tensor:
    """transformers' modality of each token: 0 text, 1 image, 2 video (the input of get_rope_index)."""
    return ((input_ids == config.image_token_id).int()
            + 2 * (input_ids == config.video_token_id).int())
