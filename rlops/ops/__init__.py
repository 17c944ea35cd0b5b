"""Autograd functions and backend dispatch over the kernels and the reference."""

from .token_stats import token_logprobs, token_logprobs_and_entropy

__all__ = ["token_logprobs", "token_logprobs_and_entropy"]
