"""Loading the captioner, its processors and a text reasoner, with the attention and Liger options.

    tokenizer, image_processor = load_processors(path, min_pixels, max_pixels)
    captioner = load_captioner(path, torch.bfloat16, device, attn_impl="auto", liger=True)
    reasoner = load_reasoner(path, torch.bfloat16, device)        # frozen, eval mode

The trainer (train.py) and `racro-fast eval` (evaluate.py) both load through here.
"""
from __future__ import annotations

import logging

import torch

log = logging.getLogger("racro_fast.models")


def attn_implementation(name: str, dev: torch.device) -> str:
    """model.attn_impl: "auto" is flash_attention_2 on a GPU when flash-attn imports, else sdpa."""
    if name != "auto":
        return name
    if dev.type == "cuda":
        try:
            import flash_attn  # noqa: F401
            return "flash_attention_2"
        except ImportError:
            pass
    return "sdpa"


def apply_liger(model) -> None:
    """Liger-Kernel's RMSNorm / SwiGLU / RoPE patches, when installed (GPU only)."""
    try:
        from liger_kernel.transformers import _apply_liger_kernel_to_instance
    except ImportError:
        log.info("liger-kernel not installed: model patches skipped")
        return
    # the fused linear cross-entropy patch is ours to replace; keep only the elementwise ones
    _apply_liger_kernel_to_instance(model=model, rope=True, rms_norm=True, swiglu=True,
                                    cross_entropy=False, fused_linear_cross_entropy=False)


def load_processors(path: str, min_pixels: int | None = None, max_pixels: int | None = None):
    """(tokenizer, image processor) of a Qwen2.5-VL checkpoint; the resize bounds override its own.

    The image processor stands alone: the full Qwen2_5_VLProcessor needs torchvision for its video
    half, which does not load beside CPU torch. Without torchvision it is the PIL backend, asked for
    by name (transformers would otherwise fall back to it with a warning)."""
    from transformers import AutoTokenizer
    bounds = {k: v for k, v in (("min_pixels", min_pixels), ("max_pixels", max_pixels)) if v is not None}
    return AutoTokenizer.from_pretrained(path), image_processor_class().from_pretrained(path, **bounds)


def image_processor_class():
    """Qwen2-VL's image processor: the torchvision backend where torchvision loads, else PIL's."""
    from transformers.utils import is_torchvision_available
    if is_torchvision_available():
        from transformers import Qwen2VLImageProcessor
        return Qwen2VLImageProcessor
    from transformers import Qwen2VLImageProcessorPil
    return Qwen2VLImageProcessorPil


def load_captioner(path: str, dtype: torch.dtype, device: torch.device | None = None, attn_impl: str = "auto",
                   liger: bool = False):
    """The Qwen2.5-VL captioner; on `device` when given (a sharded trainer places it itself)."""
    from transformers import Qwen2_5_VLForConditionalGeneration
    dev = device if device is not None else torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model = Qwen2_5_VLForConditionalGeneration.from_pretrained(
        path, dtype=dtype, attn_implementation=attn_implementation(attn_impl, dev))
    if liger and dev.type == "cuda":
        apply_liger(model)
    return model.to(device) if device is not None else model


def load_reasoner(path: str, dtype: torch.dtype, device: torch.device):
    """A frozen text reasoner for HF generate, in eval mode."""
    from transformers import AutoModelForCausalLM
    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype)
    return model.to(device).eval().requires_grad_(False)
