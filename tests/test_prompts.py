"""Prompt texts (the paper's, exactly) and the captioner's token ids / image features."""
import math

import pytest
from PIL import Image
from transformers import Qwen2VLImageProcessorPil

from racro_fast.prompts import (
    CAPTIONER_SYSTEM,
    CAPTIONER_USER,
    JOINT_TEMPLATE,
    REASONER_TEMPLATE,
    build_captioner_inputs,
    captioner_messages,
    direct_messages,
    joint_messages,
    reasoner_messages,
    text_prompt_ids,
    text_prompt_ids_batch,
)
from racro_fast.tiny import build_tokenizer

PAPER_SYSTEM = (
    "You are given an image and a relevant question. Based on the query, please describe the image in detail. "
    "Do not try to answer the question."
)
PAPER_USER = "Question: {problem}\nPlease describe the image. DO NOT try to answer the question!"
PAPER_REASONER = (
    "### The detailed caption of the provided image: {caption}\n\n### Question: {question} Please think step by step. "
    "The final answer MUST BE put in \\boxed{}."
)


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    return build_tokenizer(tmp_path_factory.mktemp("tok"))


@pytest.fixture(scope="module")
def image_processor():
    return Qwen2VLImageProcessorPil(min_pixels=56 * 56, max_pixels=112 * 112)


def test_templates_are_the_papers():
    assert CAPTIONER_SYSTEM == PAPER_SYSTEM
    assert CAPTIONER_USER.format(problem="P") == PAPER_USER.replace("{problem}", "P")
    expected = PAPER_REASONER.replace("{caption}", "C").replace("{question}", "Q")
    assert REASONER_TEMPLATE.format(caption="C", question="Q") == expected


def test_braces_in_fields_are_kept_verbatim():
    caption = "the set {1, 2} and {question}"
    text = reasoner_messages(caption, "Is x in {3}?")[0]["content"]
    assert text.startswith("### The detailed caption of the provided image: the set {1, 2} and {question}\n\n")
    tail = "### Question: Is x in {3}? Please think step by step. The final answer MUST BE put in \\boxed{}."
    assert text.endswith(tail)


def test_captioner_messages_images_first_and_placeholders_stripped():
    messages = captioner_messages("<image>\nWhat is <image 2> the area?", num_images=2)
    assert messages[0] == {"role": "system", "content": PAPER_SYSTEM}
    content = messages[1]["content"]
    assert [part["type"] for part in content] == ["image", "image", "text"]
    assert content[-1]["text"] == PAPER_USER.replace("{problem}", "What is  the area?")
    assert "<image" not in content[-1]["text"]


def test_joint_and_direct_messages():
    text = joint_messages("a red square", "<image>What colour?", "It is red, \\boxed{red}")[0]["content"]
    for part in ("a red square", "What colour?", "It is red, \\boxed{red}", "MUST BE put in \\boxed{}"):
        assert part in text, f"{part!r} missing from the joint prompt"
    assert "{" not in JOINT_TEMPLATE.format(caption="", question="", tentative="").replace("\\boxed{}", "")
    direct = direct_messages("<image>How many?", num_images=1)
    assert [m["role"] for m in direct] == ["user"]
    assert direct[0]["content"][1]["text"].startswith("How many?\nPlease think step by step.")


def test_text_prompt_ids_chat_structure(tokenizer):
    ids = text_prompt_ids(tokenizer, reasoner_messages("There are 3 shapes.", "How many shapes?"))
    text = tokenizer.decode(ids)
    assert text.startswith("<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n### The")
    assert text.endswith("<|im_end|>\n<|im_start|>assistant\n"), text[-60:]
    im_start = tokenizer.convert_tokens_to_ids("<|im_start|>")
    im_end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    assert ids.count(im_start) == 3 and ids.count(im_end) == 2, "system, user, assistant turns"


def test_text_prompt_ids_repeat_is_the_same_encoding_in_a_new_list(tokenizer):
    # A prompt asked again is served from the memo: the ids the tokenizer gives the template's text,
    # each call its own list (a caller that edits its copy changes nobody else's).
    messages = reasoner_messages("big red. small blue", "What colour is the big shape?")
    text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    first = text_prompt_ids(tokenizer, messages)
    first.append(-1)
    again = text_prompt_ids(tokenizer, messages)
    assert again == tokenizer.encode(text, add_special_tokens=False)
    assert again is not first and again[-1] != -1
    other = text_prompt_ids(tokenizer, reasoner_messages("big red. small blue", "What colour is the small shape?"))
    assert other != again


def test_text_prompt_ids_batch_encodes_what_the_memo_lacks_once(tokenizer, monkeypatch):
    # A step's prompts in one call: each the tokenizer's ids for its text, in order, repeats and
    # prompts already memoised included; only the texts not memoised go to the tokenizer, once
    # each; the memo keeps the MEMO_SIZE texts used last (here 2).
    from racro_fast import prompts
    monkeypatch.setattr(prompts, "_ENCODED", type(prompts._ENCODED)())
    monkeypatch.setattr(prompts, "MEMO_SIZE", 2)
    convs = [reasoner_messages(c, "What colour is the big shape?") for c in ("big red", "small blue", "big red", "2")]
    texts = [tokenizer.apply_chat_template(m, add_generation_prompt=True, tokenize=False) for m in convs]
    expected = [tokenizer.encode(t, add_special_tokens=False) for t in texts]
    text_prompt_ids(tokenizer, convs[3])  # memoised before
    encoded = []
    call = type(tokenizer).__call__

    def recording(self, text, *args, **kwargs):
        encoded.append(list(text))
        return call(self, text, *args, **kwargs)
    monkeypatch.setattr(type(tokenizer), "__call__", recording)
    assert text_prompt_ids_batch(tokenizer, convs) == expected
    assert encoded == [texts[:2]], f"the tokenizer encoded {encoded}"
    assert [t for _, t in prompts._ENCODED] == [texts[2], texts[3]], "not the 2 used last, newest last"
    assert text_prompt_ids_batch(tokenizer, convs[:3]) == expected[:3]
    assert encoded[1:] == [[texts[1]]], "the one text the memo dropped is encoded again, alone"


@pytest.mark.parametrize("sizes", [[(56, 56)], [(112, 56), (70, 90)]])
def test_image_pads_expand_to_the_processors_grid(tokenizer, image_processor, sizes):
    images = [Image.new("RGB", s, (200, 30, 30)) for s in sizes]
    messages = captioner_messages("<image>How many shapes?", num_images=len(images))
    inputs = build_captioner_inputs(tokenizer, image_processor, messages, images)
    features = image_processor(images=images, return_tensors="pt")
    pad = tokenizer.convert_tokens_to_ids("<|image_pad|>")
    expected = [math.prod(g) // image_processor.merge_size**2 for g in features["image_grid_thw"].tolist()]
    assert inputs.image_grid_thw.tolist() == features["image_grid_thw"].tolist()
    assert inputs.pixel_values.shape == features["pixel_values"].shape
    assert inputs.pixel_values.shape[0] == sum(math.prod(g) for g in features["image_grid_thw"].tolist())
    assert inputs.prompt_ids.count(pad) == sum(expected), f"pads per image should be {expected}"
    assert inputs.vllm_prompt_ids.count(pad) == len(images), "vLLM gets one pad per image"
    # Each image's pads sit in one run between its vision_start and vision_end.
    start = tokenizer.convert_tokens_to_ids("<|vision_start|>")
    runs, i = [], 0
    ids = inputs.prompt_ids
    while i < len(ids):
        if ids[i] == start:
            j = i + 1
            while ids[j] == pad:
                j += 1
            assert ids[j] == tokenizer.convert_tokens_to_ids("<|vision_end|>")
            runs.append(j - i - 1)
            i = j
        i += 1
    assert runs == expected
    # Outside the pads, the expanded and the vLLM ids are the same sequence.
    assert [t for t in ids if t != pad] == [t for t in inputs.vllm_prompt_ids if t != pad]


def test_text_only_captioner_inputs(tokenizer, image_processor):
    inputs = build_captioner_inputs(tokenizer, image_processor, captioner_messages("What is 2+2?", 0), [])
    assert inputs.pixel_values.shape == (0, 3 * 2 * 14 * 14)
    assert inputs.image_grid_thw.shape == (0, 3)
    assert inputs.prompt_ids == inputs.vllm_prompt_ids
    assert tokenizer.convert_tokens_to_ids("<|image_pad|>") not in inputs.prompt_ids


def test_image_count_mismatch_is_rejected(tokenizer, image_processor):
    with pytest.raises(ValueError, match="images"):
        build_captioner_inputs(tokenizer, image_processor, captioner_messages("Q", 2), [Image.new("RGB", (56, 56))])
