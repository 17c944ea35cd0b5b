"""Autograd-aware token log-probs and entropy (SPEC.md section 1), and the backward every op shares.

The kernel launchers are registered as torch.library custom ops, so torch.compile graphs
can hold them; backend="torch" (and "auto" on CPU tensors) runs rlops.torch_backend.
"""

# No `from __future__ import annotations`: torch.library.custom_op reads real annotations.

import functools
import inspect

import torch
from torch import Tensor

from .. import torch_backend, vocab_parallel
from .._validation import check_logits, check_positive_float, check_tokens
from ..constants import N_STATS, ROW, STAT_GRADS
from ._backend import launchers, resolve_backend
from ._fast import FastOp


def _token_stats(logits: Tensor, tokens: Tensor, ref_logits: Tensor | None, mask: Tensor | None,
                   temperature: float, inplace_grad: bool, backend: str) -> Tensor:
    """float32 stats (N_STATS, ...) in the rows of constants.STATS_ROWS (logp, entropy, kl, ...), from the
    kernel of `backend` ("triton" or "cuda").

    Differentiable through the logp, entropy and kl rows; with inplace_grad the backward writes
    the gradient over `logits` and bumps its version counter, so any later reader of the logits
    fails loudly.
    """
    return launchers(backend).token_stats_fwd(logits, tokens, temperature, ref_logits, mask)


_token_stats_op = torch.library.custom_op("rlops::token_stats", mutates_args=())(_token_stats)


@_token_stats_op.register_fake
def _(logits, tokens, ref_logits, mask, temperature, inplace_grad, backend) -> Tensor:
    return logits.new_empty((N_STATS, *tokens.shape), dtype=torch.float32)


@torch.library.custom_op("rlops::logits_grad", mutates_args=())
def _logits_grad(logits: Tensor, tokens: Tensor, stats: Tensor, grads: Tensor, ref_logits: Tensor | None,
                 temperature: float, backend: str) -> Tensor:
    return launchers(backend).logits_grad(logits, tokens, stats, grads, temperature, ref_logits)


@_logits_grad.register_fake
def _(logits, tokens, stats, grads, ref_logits, temperature, backend) -> Tensor:
    return torch.empty(logits.shape, dtype=logits.dtype, device=logits.device)


@torch.library.custom_op("rlops::logits_grad_", mutates_args=("logits",))
def _logits_grad_inplace(logits: Tensor, tokens: Tensor, stats: Tensor, grads: Tensor, ref_logits: Tensor | None,
                         temperature: float, backend: str) -> None:
    launchers(backend).logits_grad(logits, tokens, stats, grads, temperature, ref_logits, out=logits)


@_logits_grad_inplace.register_fake
def _(logits, tokens, stats, grads, ref_logits, temperature, backend) -> None:
    return None


def save_for_grad(ctx, inputs: dict, stats: Tensor, temperature: float) -> None:
    """What `grad_to_logits` needs, saved by a forward's setup_context from its named inputs."""
    ctx.save_for_backward(inputs["logits"], inputs["tokens"], stats, inputs["ref_logits"])
    ctx.temperature = temperature
    ctx.inplace_grad = inputs["inplace_grad"]
    ctx.backend = inputs["backend"]
    # The backward returns a gradient for the logits and None for every other input, in the
    # structure torch.library sees: a list of tensors only (no None in it) gets a list of Nones.
    ctx.no_grads = tuple([None] * len(v) if isinstance(v, list) and v and all(isinstance(t, Tensor) for t in v)
                         else None for v in list(inputs.values())[1:])


def grad_to_logits(ctx, grads: Tensor, saved: tuple[Tensor, ...] | None = None,
                   grad_scale: Tensor | None = None) -> tuple:
    """The backward's return value: d logits from (N_GRADS, ...) upstream gradients of logp, entropy
    and the exact KL (times grad_scale, a 0-d tensor, when given: the eager kernel takes the
    product, three multiplies per row), then None for every other input of the op. `saved`:
    ctx.saved_tensors when the caller has unpacked them already (each unpacking checks every
    tensor's version again).

    With inplace_grad the gradient overwrites the logits; the custom op declares that
    mutation, which bumps the logits' version counter.
    """
    logits, tokens, stats, ref_logits = ctx.saved_tensors if saved is None else saved
    # Eager autograd.Functions (rlops.ops._fast) mark ctx.eager and get the launcher itself. The custom
    # op's own backward, which a compiled graph traces (where torch.compiler.is_compiling() is False
    # before PyTorch 2.13: AOTAutograd, not Dynamo, traces it), holds the backward custom op.
    if getattr(ctx, "eager", False):
        grad = launchers(ctx.backend).logits_grad(logits, tokens, stats, grads, ctx.temperature, ref_logits,
                                                  out=logits if ctx.inplace_grad else None, grad_scale=grad_scale)
        if ctx.inplace_grad:
            torch.autograd.graph.increment_version(logits)  # what the custom op's declared mutation does
        return (grad, *ctx.no_grads)
    # A compiled graph holds the custom ops.
    args = (logits, tokens, stats, grads if grad_scale is None else grads * grad_scale, ref_logits,
            ctx.temperature, ctx.backend)
    if ctx.inplace_grad:
        _logits_grad_inplace(*args)
        grad = logits
    else:
        grad = _logits_grad(*args)
    return (grad, *ctx.no_grads)


@functools.cache
def _parameter_names(fn) -> tuple[str, ...]:
    return tuple(inspect.signature(fn).parameters)


def named_inputs(fn, inputs: tuple) -> dict:
    """A custom op's inputs by the parameter names of its function `fn` (setup_context receives a
    tuple); the names are read once per function, not on every forward."""
    return dict(zip(_parameter_names(fn), inputs, strict=True))


def _setup_context(ctx, inputs, output) -> None:
    named = named_inputs(_token_stats, inputs)
    save_for_grad(ctx, named, output, named["temperature"])
    ctx.row_mask = named["mask"]


def _backward(ctx, grad_stats: Tensor):
    grads = grad_stats[STAT_GRADS]
    if ctx.row_mask is not None:
        # The forward never read masked rows, so their saved stats are not a distribution's:
        # their outputs are constant 0, and zero upstream gradients make the kernel skip them.
        grads = torch.where(ctx.row_mask != 0, grads, 0.0)
    return grad_to_logits(ctx, grads)


_token_stats_op.register_autograd(_backward, setup_context=_setup_context)
token_stats_op = FastOp(_token_stats_op, _token_stats, _setup_context, _backward)


def _prepare(logits: Tensor, tokens: Tensor, temperature: float, backend: str,
             tokens_name: str = "tokens") -> tuple[float, str]:
    """Checked (temperature, concrete backend); tokens_name is the caller's name for the ids (a
    drop-in's `labels` or `index`), so that an error names the argument the caller passed."""
    check_logits(logits)
    check_tokens(tokens, logits, tokens_name)
    return check_positive_float("temperature", temperature), resolve_backend(backend, logits, "token_stats")


def token_logprobs_and_entropy(
    logits: Tensor, tokens: Tensor, temperature: float = 1.0, backend: str = "auto", *,
    vocab_group: object = None, vocab_start: int | None = None,
) -> tuple[Tensor, Tensor]:
    """Log-probability of each sampled token and the entropy of its distribution.

    Args:
        logits: (..., V) float16, bfloat16, float32 or float64; any row strides (such as
            `logits[:, :-1]`) are read in place.
        tokens: (...) integer ids in [0, V), the shape of logits without its last dimension.
        temperature: > 0; the distribution is softmax(logits / temperature).
        backend: "auto" (Triton on CUDA tensors, the PyTorch backend on CPU), "triton",
            "cuda" or "torch".
        vocab_group: a torch.distributed process group over which the vocabulary is split
            (rlops.vocab_parallel): logits is then this rank's shard (..., V_shard), shards in
            rank order, of equal size unless `vocab_start` (this rank's first global id) is
            given; tokens are global ids. One all_gather of 8 floats per token; the backward
            writes this shard's gradient with no communication. Backends auto/triton/torch.

    Returns:
        (logp, entropy), float32 tensors of tokens' shape. Both are differentiable; the
        gradient reaches logits in logits' dtype.
    """
    if vocab_group is not None or vocab_start is not None:  # vocab_start alone: refused there
        return vocab_parallel.token_logprobs_and_entropy(logits, tokens, check_positive_float("temperature",
                                                         temperature), backend, vocab_group, vocab_start)
    temperature, backend = _prepare(logits, tokens, temperature, backend)
    if backend == "torch":
        stats = torch_backend.token_stats(logits, tokens, temperature)
        return stats.logp.float(), stats.entropy.float()
    stats = token_stats_op(logits, tokens, None, None, temperature, False, backend)
    return stats[ROW["logp"]], stats[ROW["entropy"]]


def token_logprobs(logits: Tensor, tokens: Tensor, temperature: float = 1.0, backend: str = "auto", *,
                   vocab_group: object = None, vocab_start: int | None = None) -> Tensor:
    """log softmax(logits / temperature) at the sampled tokens: float32 of tokens' shape.

    Arguments as `token_logprobs_and_entropy`; the drop-in for `selective_log_softmax`.
    """
    if vocab_group is not None or vocab_start is not None:
        return token_logprobs_and_entropy(logits, tokens, temperature, backend, vocab_group=vocab_group,
                                          vocab_start=vocab_start)[0]
    return named_token_logprobs(logits, tokens, temperature, backend, "tokens")


def named_token_logprobs(logits: Tensor, tokens: Tensor, temperature: float, backend: str,
                         tokens_name: str) -> Tensor:
    """`token_logprobs`, its errors naming the ids `tokens_name` (the drop-ins' `labels`)."""
    temperature, backend = _prepare(logits, tokens, temperature, backend, tokens_name)
    if backend == "torch":
        return torch_backend.token_logprobs(logits, tokens, temperature).float()
    return token_stats_op(logits, tokens, None, None, temperature, False, backend)[ROW["logp"]]
