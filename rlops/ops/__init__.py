"""Autograd functions and backend dispatch over the kernels and the reference."""

from .policy_loss import PolicyLossOutput, policy_loss
from .token_stats import token_logprobs, token_logprobs_and_entropy

__all__ = ["PolicyLossOutput", "policy_loss", "token_logprobs", "token_logprobs_and_entropy"]
