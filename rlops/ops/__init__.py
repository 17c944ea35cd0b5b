"""Autograd functions and backend dispatch over the kernels and the reference."""

from .linear_policy_loss import linear_policy_loss, linear_token_logprobs_and_entropy
from .policy_loss import PolicyLossOutput, policy_loss
from .token_stats import token_logprobs, token_logprobs_and_entropy

__all__ = [
    "PolicyLossOutput",
    "linear_policy_loss",
    "linear_token_logprobs_and_entropy",
    "policy_loss",
    "token_logprobs",
    "token_logprobs_and_entropy",
]
