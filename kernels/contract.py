"""The GRPO loss's type contract, shared by every path (Triton, C++, torch): the accepted settings,
the clamps the kernels and references apply, and the order of the metrics they return."""
from __future__ import annotations

from typing import Literal, get_args

LossAgg = Literal["token-mean", "seq-mean-token-mean", "seq-mean-token-sum", "seq-mean-token-sum-norm"]
KLType = Literal["k1", "k2", "k3"]
# rollout / trainer mismatch correction; "auto" is resolved by the run config from the rollout engine
ISMode = Literal["auto", "off", "token_tis", "seq_tis", "seq_mask"]
GRPO_LOSS_AGGS = get_args(LossAgg)
GRPO_KL_TYPES = get_args(KLType)
IS_MODES = get_args(ISMode)
# Clamps shared with the Triton kernel: log-ratio and k3 input to +-20, k3 output to +-10.
GRPO_LOG_RATIO_CLAMP = 20.0
GRPO_K3_INPUT_CLAMP = 20.0
GRPO_K3_OUTPUT_CLAMP = 10.0
# Order of the metrics both paths return.
GRPO_METRICS = ("pg_loss", "clip_frac", "kl_mean", "ratio_min", "ratio_mean", "ratio_max",
                "entropy_mean", "num_tokens_local")
