"""rlops: fused GPU kernels for the RL stage of LLM post-training.

Importing rlops needs no GPU, no CUDA toolkit and not even Triton: the kernels are imported
on first use, and no device is queried at import time.
"""

from importlib.metadata import PackageNotFoundError, version

from .advantages import gae, group_advantages, kl_shaped_rewards, masked_whiten
from .losses import PolicyLoss, PolicyLossConfig
from .ops import PolicyLossOutput, policy_loss, token_logprobs, token_logprobs_and_entropy

try:
    __version__ = version("rlops")
except PackageNotFoundError:  # running from a source tree that was not installed
    __version__ = "0.0.0+unknown"

__all__ = [
    "PolicyLoss",
    "PolicyLossConfig",
    "PolicyLossOutput",
    "__version__",
    "gae",
    "group_advantages",
    "kl_shaped_rewards",
    "masked_whiten",
    "policy_loss",
    "token_logprobs",
    "token_logprobs_and_entropy",
]
