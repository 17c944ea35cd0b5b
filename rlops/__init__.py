"""rlops: fused GPU kernels for the RL stage of LLM post-training.

Importing rlops needs no GPU, no CUDA toolkit and not even Triton: the kernels are imported
on first use, and no device is queried at import time.
"""

from importlib.metadata import PackageNotFoundError, version

from . import hf
from .advantages import gae, group_advantages, kl_shaped_rewards, masked_whiten
from .losses import PolicyLoss, PolicyLossConfig
from .ops import (
    PolicyLossOutput,
    linear_policy_loss,
    linear_token_logprobs_and_entropy,
    policy_loss,
    token_logprobs,
    token_logprobs_and_entropy,
)
from .options import GlobalBatch
from .rollout_correction import RolloutCorrection, RolloutCorrectionOutput, rollout_correction

try:
    __version__ = version("rlops")
except PackageNotFoundError:  # running from a source tree that was not installed
    __version__ = "0.0.0+unknown"

__all__ = [
    "GlobalBatch",
    "PolicyLoss",
    "PolicyLossConfig",
    "PolicyLossOutput",
    "RolloutCorrection",
    "RolloutCorrectionOutput",
    "__version__",
    "gae",
    "group_advantages",
    "hf",
    "kl_shaped_rewards",
    "linear_policy_loss",
    "linear_token_logprobs_and_entropy",
    "masked_whiten",
    "policy_loss",
    "rollout_correction",
    "token_logprobs",
    "token_logprobs_and_entropy",
]
