"""Fused kernels for GRPO on a captioner: token log-probs, entropy, the GRPO loss and KL, and the
fused op from hidden states to the GRPO loss (`fused_linear_grpo`).

Each op dispatches on the device of its inputs: CUDA tensors run the Triton kernels, CPU
tensors run the chunked plain-torch references in `reference.py` (memory-lean too).
"""
from .fused_linear_grpo import fused_linear_grpo, grpo_token_weights
from .fused_linear_logprob import fused_linear_logprob
from .grpo_loss import GRPOLossConfig, grpo_advantages, grpo_loss
from .logprob_from_logits import logprob_from_logits

__all__ = [
    "fused_linear_logprob",
    "fused_linear_grpo",
    "grpo_token_weights",
    "logprob_from_logits",
    "grpo_loss",
    "grpo_advantages",
    "GRPOLossConfig",
]
