"""Autograd-aware token log-probs and entropy (SPEC.md section 1).

The Triton launchers are registered as torch.library custom ops, so torch.compile graphs
can hold them; the PyTorch reference serves CPU tensors under backend="auto".
"""

# No `from __future__ import annotations`: torch.library.custom_op reads real annotations.

import torch
from torch import Tensor

from .. import reference
from .._validation import check_logits, check_positive_float, check_tokens
from ._backend import resolve_backend


@torch.library.custom_op("rlops::token_stats_fwd", mutates_args=())
def _token_stats_fwd(logits: Tensor, tokens: Tensor, temperature: float) -> tuple[Tensor, Tensor, Tensor]:
    from ..kernels import token_stats_fwd

    return token_stats_fwd(logits, tokens, temperature)


@_token_stats_fwd.register_fake
def _(logits: Tensor, tokens: Tensor, temperature: float) -> tuple[Tensor, Tensor, Tensor]:
    return tuple(logits.new_empty(tokens.shape, dtype=torch.float32) for _ in range(3))


@torch.library.custom_op("rlops::token_stats_bwd", mutates_args=())
def _token_stats_bwd(
    logits: Tensor, tokens: Tensor, lse: Tensor, entropy: Tensor,
    grad_logp: Tensor, grad_entropy: Tensor, temperature: float,
) -> Tensor:
    from ..kernels import token_stats_bwd

    return token_stats_bwd(logits, tokens, lse, entropy, grad_logp, grad_entropy, temperature)


@_token_stats_bwd.register_fake
def _(logits: Tensor, tokens: Tensor, lse: Tensor, entropy: Tensor,
      grad_logp: Tensor, grad_entropy: Tensor, temperature: float) -> Tensor:
    return torch.empty(logits.shape, dtype=logits.dtype, device=logits.device)


def _setup_context(ctx, inputs, output) -> None:
    logits, tokens, temperature = inputs
    _, entropy, lse = output
    ctx.save_for_backward(logits, tokens, lse, entropy)
    ctx.temperature = temperature


def _backward(ctx, grad_logp: Tensor | None, grad_entropy: Tensor | None, _grad_lse: Tensor | None):
    logits, tokens, lse, entropy = ctx.saved_tensors
    grad_logp = torch.zeros_like(lse) if grad_logp is None else grad_logp
    grad_entropy = torch.zeros_like(lse) if grad_entropy is None else grad_entropy
    grad = _token_stats_bwd(logits, tokens, lse, entropy, grad_logp, grad_entropy, ctx.temperature)
    return grad, None, None


_token_stats_fwd.register_autograd(_backward, setup_context=_setup_context)


def _prepare(logits: Tensor, tokens: Tensor, temperature: float, backend: str) -> tuple[float, str]:
    check_logits(logits)
    check_tokens(tokens, logits)
    return check_positive_float("temperature", temperature), resolve_backend(backend, logits)


def token_logprobs_and_entropy(
    logits: Tensor, tokens: Tensor, temperature: float = 1.0, backend: str = "auto"
) -> tuple[Tensor, Tensor]:
    """Log-probability of each sampled token and the entropy of its distribution.

    Args:
        logits: (..., V) float16, bfloat16, float32 or float64; any row strides (such as
            `logits[:, :-1]`) are read in place.
        tokens: (...) integer ids in [0, V), the shape of logits without its last dimension.
        temperature: > 0; the distribution is softmax(logits / temperature).
        backend: "auto" (Triton on CUDA tensors, the PyTorch reference on CPU), "triton",
            "cuda" or "torch".

    Returns:
        (logp, entropy), float32 tensors of tokens' shape. Both are differentiable; the
        gradient reaches logits in logits' dtype.
    """
    temperature, backend = _prepare(logits, tokens, temperature, backend)
    if backend == "torch":
        logp, entropy = reference.token_logprobs_and_entropy(logits, tokens, temperature)
        return logp.float(), entropy.float()
    logp, entropy, _ = _token_stats_fwd(logits, tokens, temperature)
    return logp, entropy


def token_logprobs(logits: Tensor, tokens: Tensor, temperature: float = 1.0, backend: str = "auto") -> Tensor:
    """log softmax(logits / temperature) at the sampled tokens: float32 of tokens' shape.

    Arguments as `token_logprobs_and_entropy`; the drop-in for `selective_log_softmax`.
    """
    temperature, backend = _prepare(logits, tokens, temperature, backend)
    if backend == "torch":
        return reference.token_logprobs(logits, tokens, temperature).float()
    return _token_stats_fwd(logits, tokens, temperature)[0]
