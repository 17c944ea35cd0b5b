"""The fused-linear policy loss: the lm_head projection and the loss over chunks of rows.

The (N, V) logits never exist. Each chunk of rows is projected (hidden_c @ weight.T + bias,
by cuBLAS), run through the fused vocabulary kernels, and its gradient is pushed back
through the projection at once, so one (chunk, V) buffer serves every chunk:

    token-level ratio (PPO, GRPO, DAPO, Dr. GRPO): one pass. Per chunk, the policy-loss kernel
        gives each token's loss and derivatives, the backward kernel overwrites the chunk's
        logits with their gradient, and two more matmuls give the chunk's hidden gradient and
        add to the weight gradient (float32 accumulator). Three matmuls in all; the backward
        only scales the stored gradients by the upstream gradient.
    sequence-level ratio (GSPO) and the token statistics alone: the forward keeps per-token
        statistics only and the backward recomputes each chunk's logits (four matmuls).

Masked tokens are dropped before the projection, so padding costs no matmul work either.
"""

# No `from __future__ import annotations` here, to match the other ops modules.

import functools
import math

import torch
import torch.nn.functional as F
from torch import Tensor

from .. import reference
from .._validation import check_float_tensor, check_logits, check_positive_float, check_token_ids
from ._backend import resolve_backend
from .policy_loss import (
    SAMPLED_KL,
    PolicyLossOutput,
    aggregation_weights,
    check_options,
    check_per_token_inputs,
    composed_loss,
    entropy_weights,
    resolve_kl,
)

# A chunk's logits (and reference logits), hidden rows and their gradient fit in this.
CHUNK_BYTES = 256 * 2**20
MIN_CHUNK_ROWS = 128  # below this the projection's matmul runs far from peak


def default_chunk_rows(n_rows: int, hidden_size: int, vocab: int, elem_size: int, with_ref: bool) -> int:
    """Rows per chunk: CHUNK_BYTES of chunk buffers, at least MIN_CHUNK_ROWS, at most n_rows."""
    per_row = elem_size * (vocab * (2 if with_ref else 1) + 2 * hidden_size)
    return max(1, min(max(MIN_CHUNK_ROWS, CHUNK_BYTES // per_row), n_rows))


@functools.cache
def _accumulate_variant(device_type: str) -> str:
    """How this device adds a bf16/fp16 product into a float32 buffer without rounding it first."""
    a = torch.tensor([[1.0, 2.0**-9]], device=device_type).to(torch.bfloat16)
    b = torch.ones(2, 1, device=device_type, dtype=torch.bfloat16)
    exact = 1.0 + 2.0**-9  # not representable in bf16: a rounded product loses it
    try:
        acc = torch.zeros(1, 1, device=device_type)
        torch.addmm(acc, a, b, out_dtype=torch.float32, out=acc)
        if acc.item() == exact:
            return "addmm-out"
    except (RuntimeError, NotImplementedError, TypeError):
        pass
    try:
        if torch.mm(a, b, out_dtype=torch.float32).item() == exact:
            return "mm-out-dtype"
    except (RuntimeError, NotImplementedError, TypeError):
        pass
    return "rounded"


def _add_matmul(acc: Tensor, a: Tensor, b: Tensor) -> None:
    """acc += a @ b for a float32 accumulator, without rounding the product to a's dtype where possible."""
    if a.dtype == acc.dtype:
        acc.addmm_(a, b)
        return
    variant = _accumulate_variant(a.device.type)
    if variant == "addmm-out":
        torch.addmm(acc, a, b, out_dtype=acc.dtype, out=acc)
    elif variant == "mm-out-dtype":
        acc.add_(torch.mm(a, b, out_dtype=acc.dtype))
    else:
        acc.add_(torch.mm(a, b))


def _push_through_head(dlogits: Tensor, hidden: Tensor, weight: Tensor, grads: list[Tensor | None],
                       start: int, stop: int) -> None:
    """Chain rule through logits = hidden @ weight.T + bias for one chunk: fills grad_hidden's rows
    and adds to the float32 grad_weight and grad_bias."""
    grad_hidden, grad_weight, grad_bias = grads
    if grad_hidden is not None:
        torch.mm(dlogits, weight, out=grad_hidden[start:stop])
    if grad_weight is not None:
        _add_matmul(grad_weight, dlogits.t(), hidden)
    if grad_bias is not None:
        grad_bias += dlogits.sum(0, dtype=grad_bias.dtype)


def _gradient_buffers(ctx, hidden: Tensor, weight: Tensor, bias: Tensor | None) -> list[Tensor | None]:
    want_hidden, want_weight, want_bias = ctx.needs_input_grad[:3]
    acc = reference.compute_dtype(weight)
    return [
        torch.empty_like(hidden) if want_hidden else None,
        torch.zeros(weight.shape, dtype=acc, device=weight.device) if want_weight else None,
        torch.zeros(bias.shape, dtype=acc, device=bias.device) if want_bias and bias is not None else None,
    ]


def _project(hidden: Tensor, weight: Tensor, bias: Tensor | None, start: int, stop: int) -> Tensor:
    return F.linear(hidden[start:stop], weight, bias)


class _LinearStats(torch.autograd.Function):
    """Per-token stats (5, N) of softmax((hidden @ weight.T + bias) / tau); the backward recomputes each chunk."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, tokens, ref_hidden, ref_weight, ref_bias, temperature, chunk, backend):
        from ..kernels import token_stats_fwd

        n = hidden.shape[0]
        stats = torch.empty((5, n), dtype=torch.float32, device=hidden.device)
        for s in range(0, n, chunk):
            e = min(s + chunk, n)
            ref = None if ref_hidden is None else _project(ref_hidden, ref_weight, ref_bias, s, e)
            stats[:, s:e] = token_stats_fwd(_project(hidden, weight, bias, s, e), tokens[s:e], temperature, ref,
                                            backend=backend)
        ctx.save_for_backward(hidden, weight, bias, tokens, ref_hidden, ref_weight, ref_bias, stats)
        ctx.temperature, ctx.chunk, ctx.backend = temperature, chunk, backend
        ctx.mark_non_differentiable(stats[3:])
        return stats

    @staticmethod
    def backward(ctx, grad_stats):
        from ..kernels import token_stats_bwd

        hidden, weight, bias, tokens, ref_hidden, ref_weight, ref_bias, stats = ctx.saved_tensors
        grads = _gradient_buffers(ctx, hidden, weight, bias)
        n = hidden.shape[0]
        for s in range(0, n, ctx.chunk):
            e = min(s + ctx.chunk, n)
            logits = _project(hidden, weight, bias, s, e)
            ref = None if ref_hidden is None else _project(ref_hidden, ref_weight, ref_bias, s, e)
            token_stats_bwd(logits, tokens[s:e], stats[:, s:e], grad_stats[:3, s:e], ctx.temperature, ref, out=logits,
                            backend=ctx.backend)
            _push_through_head(logits, hidden[s:e], weight, grads, s, e)
        grad_hidden, grad_weight, grad_bias = grads
        return (grad_hidden, None if grad_weight is None else grad_weight.to(weight.dtype),
                None if grad_bias is None else grad_bias.to(bias.dtype)) + (None,) * 7


class _LinearPolicyLoss(torch.autograd.Function):
    """The token-level loss in one pass: returns (loss, out (10, N)); the gradient is computed here."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, tokens, weights, entropy_weights, advantages, old_logprobs, ref_logprobs,
                is_weights, ref_hidden, ref_weight, ref_bias, temperature, clip_low, clip_high, dual_clip, kl_coef,
                kl_kind, kl_ratio_weighted, chunk, backend):
        from ..kernels import ROW, policy_loss_fwd, token_stats_bwd

        n = hidden.shape[0]
        grads = _gradient_buffers(ctx, hidden, weight, bias)
        out = torch.empty((10, n), dtype=torch.float32, device=hidden.device)

        def rows(x: Tensor | None, s: int, e: int) -> Tensor | None:
            return None if x is None else x[None, s:e]

        for s in range(0, n, chunk):
            e = min(s + chunk, n)
            logits = _project(hidden, weight, bias, s, e)
            ref = None if ref_hidden is None else _project(ref_hidden, ref_weight, ref_bias, s, e)
            chunk_out = policy_loss_fwd(
                logits[None], tokens[None, s:e], weights[None, s:e], advantages[None, s:e], rows(old_logprobs, s, e),
                rows(ref_logprobs, s, e), None if ref is None else ref[None], rows(is_weights, s, e), temperature,
                clip_low, clip_high, dual_clip, kl_coef, kl_kind, rows(entropy_weights, s, e),
                kl_ratio_weighted, backend)[:, 0]
            out[:, s:e] = chunk_out
            if any(g is not None for g in grads):
                token_stats_bwd(logits, tokens[s:e], chunk_out, chunk_out[ROW["g_logp"]:ROW["g_kl"] + 1],
                                temperature, ref, out=logits, backend=backend)
                _push_through_head(logits, hidden[s:e], weight, grads, s, e)
        ctx.grads = grads
        ctx.dtypes = (hidden.dtype, weight.dtype, None if bias is None else bias.dtype)
        ctx.mark_non_differentiable(out)
        return out[ROW["loss"]].sum(), out

    @staticmethod
    def backward(ctx, grad_loss, _grad_out):
        grads, ctx.grads = ctx.grads, None
        scaled = []
        for g, dtype in zip(grads, ctx.dtypes, strict=True):
            # In place, then one cast: the float32 weight gradient is not copied again (V x H floats).
            scaled.append(None if g is None else g.mul_(grad_loss).to(dtype))
        return (*scaled,) + (None,) * 19


def _check_head(hidden: Tensor, weight: Tensor, bias: Tensor | None, names: tuple[str, str, str]) -> int:
    """Checks hidden (..., H), weight (V, H) and bias (V,) of one dtype and device; returns V."""
    h_name, w_name, b_name = names
    check_logits(hidden, h_name)
    check_logits(weight, w_name)
    if weight.dim() != 2 or weight.shape[1] != hidden.shape[-1]:
        raise ValueError(f"{w_name} must have shape (V, H) with H = {h_name}.shape[-1] = {hidden.shape[-1]}, "
                         f"got {tuple(weight.shape)}")
    if weight.dtype != hidden.dtype:
        raise TypeError(f"{w_name} ({weight.dtype}) and {h_name} ({hidden.dtype}) must have one dtype")
    check_float_tensor(w_name, weight, hidden, [tuple(weight.shape)], "(V, H)", h_name)
    if bias is not None:
        check_float_tensor(b_name, bias, hidden, [(weight.shape[0],)], f"(V,) = ({weight.shape[0]},)", h_name)
        if bias.dtype != hidden.dtype:
            raise TypeError(f"{b_name} ({bias.dtype}) and {h_name} ({hidden.dtype}) must have one dtype")
    return weight.shape[0]


def _check_ref_head(hidden: Tensor, vocab: int, ref_hidden: Tensor | None, ref_weight: Tensor | None,
                    ref_bias: Tensor | None) -> None:
    if ref_hidden is None and ref_weight is None and ref_bias is None:
        return
    if ref_hidden is None or ref_weight is None:
        raise ValueError("the exact KL needs both ref_hidden and ref_weight (and ref_bias if the reference has one)")
    if ref_hidden.shape[:-1] != hidden.shape[:-1]:
        raise ValueError(f"ref_hidden must have hidden's leading shape {tuple(hidden.shape[:-1])}, got "
                         f"{tuple(ref_hidden.shape[:-1])}")
    if _check_head(ref_hidden, ref_weight, ref_bias, ("ref_hidden", "ref_weight", "ref_bias")) != vocab:
        raise ValueError(f"ref_weight must have the policy's vocabulary V = {vocab}, got {ref_weight.shape[0]}")


def _chunk(chunk_size: int | None, n: int, hidden: Tensor, vocab: int, with_ref: bool) -> int:
    if chunk_size is None:
        return default_chunk_rows(n, hidden.shape[-1], vocab, hidden.element_size(), with_ref)
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1:
        raise ValueError(f"chunk_size must be None or an int >= 1, got {chunk_size!r}")
    return chunk_size


def linear_token_logprobs_and_entropy(
    hidden: Tensor,
    weight: Tensor,
    tokens: Tensor,
    *,
    bias: Tensor | None = None,
    temperature: float = 1.0,
    chunk_size: int | None = None,
    backend: str = "auto",
) -> tuple[Tensor, Tensor]:
    """`token_logprobs_and_entropy` of logits = hidden @ weight.T + bias, without materialising them.

    Args:
        hidden: (..., H) float16/bfloat16/float32/float64 last hidden states.
        weight: (V, H) lm_head weight, hidden's dtype. bias: (V,) or None.
        tokens: (...) integer ids in [0, V).
        temperature: > 0.
        chunk_size: rows per chunk (default: ~256 MiB of chunk buffers, at least 128 rows).
        backend: "auto" (Triton kernels on CUDA, the chunked reference on CPU), "triton",
            "cuda" or "torch".

    Returns:
        (logp, entropy), float32 of tokens' shape; gradients reach hidden, weight and bias.
    """
    vocab = _check_head(hidden, weight, bias, ("hidden", "weight", "bias"))
    check_token_ids(tokens, tuple(hidden.shape[:-1]), vocab, hidden, like_name="hidden")
    temperature = check_positive_float("temperature", temperature)
    n = tokens.numel()
    chunk = _chunk(chunk_size, n, hidden, vocab, False)
    backend = resolve_backend(backend, hidden, "linear_policy_loss")
    if backend == "torch":
        logp, entropy, _ = reference.linear_token_stats(hidden, weight, tokens, bias, temperature, chunk_size=chunk)
        return logp.float(), entropy.float()
    stats = _LinearStats.apply(hidden.reshape(n, -1), weight, bias, tokens.reshape(-1), None, None, None,
                               temperature, chunk, backend)
    return stats[0].view(tokens.shape), stats[1].view(tokens.shape)


def linear_policy_loss(
    hidden: Tensor,
    weight: Tensor,
    tokens: Tensor,
    advantages: Tensor,
    *,
    bias: Tensor | None = None,
    ref_hidden: Tensor | None = None,
    ref_weight: Tensor | None = None,
    ref_bias: Tensor | None = None,
    chunk_size: int | None = None,
    mask: Tensor | None = None,
    old_logprobs: Tensor | None = None,
    ref_logprobs: Tensor | None = None,
    is_weights: Tensor | None = None,
    temperature: float = 1.0,
    clip_low: float = 0.2,
    clip_high: float = 0.2,
    dual_clip: float | None = None,
    kl_coef: float = 0.0,
    kl_estimator: str = "k3",
    entropy_coef: float = 0.0,
    loss_agg: str = "token-mean",
    norm_len: float | None = None,
    ratio_level: str = "token",
    entropy_agg: str | None = None,
    kl_ratio_weighted: bool = False,
    backend: str = "auto",
) -> PolicyLossOutput:
    """`rlops.policy_loss` on logits = hidden @ weight.T + bias, without materialising the logits.

    Args:
        hidden: (B, T, H), or (N, H) for packed tokens (then the per-token tensors are (N,)
            and a sequence-level aggregation sees one sequence), float16/bfloat16/float32.
        weight: (V, H) lm_head weight of hidden's dtype (tied or not); bias: (V,) or None.
        tokens, advantages, mask, old_logprobs, ref_logprobs, is_weights: as `policy_loss`,
            shaped like hidden without its last dimension.
        ref_hidden, ref_weight, ref_bias: the reference model's last hidden states (hidden's
            leading shape, its own H) and lm_head, for kl_estimator="full"; no gradient.
        chunk_size: rows per chunk (default: ~256 MiB of chunk buffers, at least 128 rows):
            peak memory above the inputs is one chunk's buffers plus the float32 weight
            gradient, whatever N.
        every other option: as `rlops.policy_loss` (`inplace_grad` does not apply: the chunk
            buffers are always overwritten with their gradient).

    Returns:
        PolicyLossOutput (per-token outputs shaped like tokens); gradients reach hidden,
        weight and bias.
    """
    check_options(temperature, clip_low, clip_high, dual_clip, kl_coef, kl_estimator, entropy_coef, loss_agg,
                  norm_len, ratio_level, False, entropy_agg, kl_ratio_weighted)
    vocab = _check_head(hidden, weight, bias, ("hidden", "weight", "bias"))
    _check_ref_head(hidden, vocab, ref_hidden, ref_weight, ref_bias)
    if hidden.dim() not in (2, 3):
        raise ValueError(f"hidden must have shape (B, T, H) or (N, H), got {tuple(hidden.shape)}")
    packed = hidden.dim() == 2
    check_token_ids(tokens, tuple(hidden.shape[:-1]), vocab, hidden, like_name="hidden")

    def as_rows(x: Tensor | None) -> Tensor | None:
        # Packed (N,) tensors become one (1, N) sequence; anything else is left to the checks.
        return x[None] if packed and x is not None and x.dim() == 1 else x

    tokens_2d = as_rows(tokens)
    advantages, mask = check_per_token_inputs(tokens_2d, as_rows(advantages), as_rows(mask), as_rows(old_logprobs),
                                              as_rows(ref_logprobs), as_rows(is_weights))
    kl_used = resolve_kl(kl_coef, kl_estimator, ref_logprobs, ref_hidden is not None,
                         "ref_hidden and ref_weight, the reference model's last hidden states and lm_head")
    backend = resolve_backend(backend, hidden, "linear_policy_loss")
    old_logprobs, ref_logprobs, is_weights = as_rows(old_logprobs), as_rows(ref_logprobs), as_rows(is_weights)
    ref_logprobs = ref_logprobs if kl_used in SAMPLED_KL else None
    full_kl = kl_used == "full"
    hidden_3d = hidden[None] if packed else hidden
    ref_hidden_3d = None if not full_kl else (ref_hidden[None] if packed else ref_hidden)
    n_rows, n_time = tokens_2d.shape
    # Only the tokens that count go through the projection.
    rows = mask.reshape(-1).nonzero().squeeze(1)
    chunk = _chunk(chunk_size, max(rows.numel(), 1), hidden, vocab, full_kl)
    options = dict(temperature=temperature, clip_low=clip_low, clip_high=clip_high, dual_clip=dual_clip,
                   kl_coef=kl_coef, kl_estimator=kl_estimator, entropy_coef=entropy_coef, loss_agg=loss_agg,
                   norm_len=norm_len, ratio_level=ratio_level, entropy_agg=entropy_agg,
                   kl_ratio_weighted=kl_ratio_weighted)
    ref_head = (ref_weight, ref_bias) if full_kl else (None, None)

    if backend != "torch" and ratio_level == "token":
        from ..kernels import KL_KINDS, ROW

        def gather(x: Tensor | None) -> Tensor | None:
            return None if x is None else x.to(torch.float32).expand(n_rows, n_time).reshape(-1)[rows]

        h = hidden_3d.reshape(n_rows * n_time, -1)[rows]
        rh = None if ref_hidden_3d is None else ref_hidden_3d.reshape(n_rows * n_time, -1)[rows]
        weights = aggregation_weights(mask, loss_agg, norm_len)
        ent_weights = entropy_weights(mask, entropy_coef, entropy_agg or loss_agg, norm_len)
        loss, out = _LinearPolicyLoss.apply(
            h, weight, bias, tokens_2d.reshape(-1)[rows], gather(weights), gather(ent_weights), gather(advantages),
            gather(old_logprobs), gather(ref_logprobs), gather(is_weights), rh, *ref_head, temperature, clip_low,
            clip_high, math.inf if dual_clip is None else float(dual_clip), kl_coef, KL_KINDS[kl_used],
            kl_ratio_weighted, chunk, backend)

        def scatter(name: str) -> Tensor:
            full = torch.zeros(n_rows * n_time, dtype=torch.float32, device=hidden.device)
            return full.index_copy_(0, rows, out[ROW[name]]).view(tokens.shape)

        per_token = [scatter(name) for name in ("logp", "entropy", "kl", "ratio")]
        result = PolicyLossOutput(loss, *per_token, mask=mask, advantages=advantages, clip_low=clip_low,
                                  clip_high=clip_high, dual_clip=dual_clip)
    else:
        stats = (_reference_linear_stats if backend == "torch"
                 else functools.partial(_fused_linear_stats, backend=backend))
        stats_fn = functools.partial(_counted_rows_stats, stats=stats, head=(weight, bias), ref_head=ref_head,
                                     rows=rows, chunk=chunk)
        result = composed_loss(hidden_3d, tokens_2d, advantages, mask, old_logprobs, ref_logprobs, ref_hidden_3d,
                               is_weights, stats_fn, **options)
    if packed:
        for name in ("logprobs", "entropy", "kl", "ratio"):
            setattr(result, name, getattr(result, name).view(tokens.shape))
    return result


def _reference_linear_stats(hidden: Tensor, weight: Tensor, bias: Tensor | None, tokens: Tensor,
                            ref_hidden: Tensor | None, ref_weight: Tensor | None, ref_bias: Tensor | None,
                            temperature: float, chunk: int) -> Tensor:
    """(3, n) logp, entropy, exact KL (0 without a reference) from the chunked reference."""
    logp, entropy, kl = reference.linear_token_stats(hidden, weight, tokens, bias, temperature, ref_hidden,
                                                     ref_weight, ref_bias, chunk_size=chunk)
    return torch.stack([logp, entropy, torch.zeros_like(logp) if kl is None else kl]).to(torch.float32)


def _fused_linear_stats(hidden: Tensor, weight: Tensor, bias: Tensor | None, tokens: Tensor,
                        ref_hidden: Tensor | None, ref_weight: Tensor | None, ref_bias: Tensor | None,
                        temperature: float, chunk: int, *, backend: str) -> Tensor:
    """(5, n) stats from the fused kernels; rows 0-2 are logp, entropy, exact KL."""
    return _LinearStats.apply(hidden, weight, bias, tokens, ref_hidden, ref_weight, ref_bias, temperature, chunk,
                              backend)


def _counted_rows_stats(hidden: Tensor, tokens: Tensor, temperature: float, ref_hidden: Tensor | None, *,
                        stats, head: tuple, ref_head: tuple, rows: Tensor, chunk: int
                        ) -> tuple[Tensor, Tensor, Tensor | None]:
    """The reference's stats_fn: (logp, entropy, exact KL or None) as (B, T), computed on the counted
    rows only (masked rows are never projected) and zero elsewhere."""
    flat = hidden.reshape(-1, hidden.shape[-1])[rows]
    ref = None if ref_hidden is None else ref_hidden.reshape(-1, ref_hidden.shape[-1])[rows]
    out = stats(flat, *head, tokens.reshape(-1)[rows], ref, *ref_head, temperature, chunk)

    def scatter(i: int) -> Tensor:
        return torch.zeros(tokens.numel(), dtype=torch.float32, device=hidden.device).index_copy(
            0, rows, out[i]).view(tokens.shape)

    return scatter(0), scatter(1), None if ref is None else scatter(2)
