"""Autograd-aware token log-probs and entropy (SPEC.md section 1), and the shared backward.

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
def token_stats_op(logits: Tensor, tokens: Tensor, ref_logits: Tensor | None, mask: Tensor | None,
                   temperature: float, inplace_grad: bool, backend: str) -> Tensor:
    """float32 stats (5, ...): logp, entropy, kl, lse, lse_ref (see rlops.kernels.token_stats), from
    the Triton kernel or (backend "cuda") its CUDA twin.

    Differentiable through rows 0-2; with inplace_grad the backward writes the gradient over
    `logits` and bumps its version counter, so any later reader of the logits fails loudly.
    """
    from ..kernels import token_stats_fwd

    return token_stats_fwd(logits, tokens, temperature, ref_logits, mask, backend)


@token_stats_op.register_fake
def _(logits: Tensor, tokens: Tensor, ref_logits: Tensor | None, mask: Tensor | None,
      temperature: float, inplace_grad: bool, backend: str) -> Tensor:
    return logits.new_empty((5, *tokens.shape), dtype=torch.float32)


@torch.library.custom_op("rlops::token_stats_bwd", mutates_args=())
def _token_stats_bwd(logits: Tensor, tokens: Tensor, stats: Tensor, grads: Tensor,
                     ref_logits: Tensor | None, temperature: float, backend: str) -> Tensor:
    from ..kernels import token_stats_bwd

    return token_stats_bwd(logits, tokens, stats, grads, temperature, ref_logits, backend=backend)


@_token_stats_bwd.register_fake
def _(logits: Tensor, tokens: Tensor, stats: Tensor, grads: Tensor,
      ref_logits: Tensor | None, temperature: float, backend: str) -> Tensor:
    return torch.empty(logits.shape, dtype=logits.dtype, device=logits.device)


@torch.library.custom_op("rlops::token_stats_bwd_inplace", mutates_args=("logits",))
def _token_stats_bwd_inplace(logits: Tensor, tokens: Tensor, stats: Tensor, grads: Tensor,
                             ref_logits: Tensor | None, temperature: float, backend: str) -> None:
    from ..kernels import token_stats_bwd

    token_stats_bwd(logits, tokens, stats, grads, temperature, ref_logits, out=logits, backend=backend)


@_token_stats_bwd_inplace.register_fake
def _(logits: Tensor, tokens: Tensor, stats: Tensor, grads: Tensor,
      ref_logits: Tensor | None, temperature: float, backend: str) -> None:
    return None


def grad_to_logits(ctx, grads: Tensor) -> Tensor:
    """d logits from (3, ...) upstream gradients of logp, entropy and the exact KL.

    ctx holds logits, tokens, stats and ref_logits (saved by the forward), temperature,
    inplace_grad and backend. With inplace_grad the gradient overwrites the logits; the custom op declares
    that mutation, which bumps the logits' version counter.
    """
    logits, tokens, stats, ref_logits = ctx.saved_tensors
    if ctx.inplace_grad:
        _token_stats_bwd_inplace(logits, tokens, stats, grads, ref_logits, ctx.temperature, ctx.backend)
        return logits
    return _token_stats_bwd(logits, tokens, stats, grads, ref_logits, ctx.temperature, ctx.backend)


def save_for_grad(ctx, logits: Tensor, tokens: Tensor, stats: Tensor, ref_logits: Tensor | None,
                  temperature: float, inplace_grad: bool, backend: str) -> None:
    """What `grad_to_logits` needs, saved by a forward's setup_context."""
    ctx.save_for_backward(logits, tokens, stats, ref_logits)
    ctx.temperature = temperature
    ctx.inplace_grad = inplace_grad
    ctx.backend = backend


def _setup_context(ctx, inputs, output) -> None:
    logits, tokens, ref_logits, mask, temperature, inplace_grad, backend = inputs
    save_for_grad(ctx, logits, tokens, output, ref_logits, temperature, inplace_grad, backend)
    ctx.row_mask = mask


def _backward(ctx, grad_stats: Tensor):
    grads = grad_stats[:3]
    if ctx.row_mask is not None:
        # The forward never read masked rows, so their saved stats are not a distribution's:
        # their outputs are constant 0, and zero upstream gradients make the kernel skip them.
        grads = torch.where(ctx.row_mask != 0, grads, 0.0)
    return grad_to_logits(ctx, grads), None, None, None, None, None, None


token_stats_op.register_autograd(_backward, setup_context=_setup_context)


def _prepare(logits: Tensor, tokens: Tensor, temperature: float, backend: str) -> tuple[float, str]:
    check_logits(logits)
    check_tokens(tokens, logits)
    return check_positive_float("temperature", temperature), resolve_backend(backend, logits, "token_stats")


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
    stats = token_stats_op(logits, tokens, None, None, temperature, False, backend)
    return stats[0], stats[1]


def token_logprobs(logits: Tensor, tokens: Tensor, temperature: float = 1.0, backend: str = "auto") -> Tensor:
    """log softmax(logits / temperature) at the sampled tokens: float32 of tokens' shape.

    Arguments as `token_logprobs_and_entropy`; the drop-in for `selective_log_softmax`.
    """
    temperature, backend = _prepare(logits, tokens, temperature, backend)
    if backend == "torch":
        return reference.token_logprobs(logits, tokens, temperature).float()
    return token_stats_op(logits, tokens, None, None, temperature, False, backend)[0]
