"""SPEC.md sections 1-4 in plain PyTorch: the test oracle and the CPU backend.

Arithmetic is float32 whatever the logits dtype, or float64 when the logits are float64
(which is how the tests run it as the oracle). Vocabulary-sized work runs over chunks of
rows and is recomputed chunk by chunk in the backward pass, so neither pass holds a float32
copy of the whole (N, V) logits. Gradients come from autograd on the SPEC formulas, which
makes them an independent check of the hand-derived gradients in the kernels.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

# Rows per chunk are chosen so that one float32 temporary of a chunk is at most 16 MiB.
CHUNK_ELEMENTS = 1 << 22

LOG_RATIO_CLAMP = 20.0
SEQ_LOG_RATIO_MAX = 10.0
K3_MAX = 10.0

LOSS_AGGS = ("token-mean", "seq-mean-token-mean", "seq-mean-token-sum", "seq-mean-token-sum-norm")
KL_ESTIMATORS = ("k1", "k2", "k3", "full")
RATIO_LEVELS = ("token", "sequence")


def compute_dtype(x: Tensor) -> torch.dtype:
    """float64 for float64 input, float32 for everything else (SPEC: accumulate in float32)."""
    return torch.float64 if x.dtype == torch.float64 else torch.float32


# --------------------------------------------------------------------------------------
# Chunked evaluation over rows
# --------------------------------------------------------------------------------------


def _rows(x: Tensor, start: int, stop: int) -> Tensor:
    """Rows [start, stop) of x (..., V) flattened to (N, V), as a view when the layout allows.

    Layouts that cannot be flattened without a copy (such as logits[:, :-1]) are walked along
    the first dimension, so at most one chunk of rows is ever copied.
    """
    vocab = x.shape[-1]
    if x.dim() <= 2:
        return x.reshape(-1, vocab)[start:stop]
    try:
        return x.view(-1, vocab)[start:stop]
    except RuntimeError:
        pass
    per_item = x[0].numel() // vocab
    stop = min(stop, per_item * x.shape[0])
    if per_item == 0 or start >= stop:
        return x.new_empty(0, vocab)
    first, last = start // per_item, (stop - 1) // per_item
    pieces = [
        _rows(x[i], max(start - i * per_item, 0), min(stop - i * per_item, per_item))
        for i in range(first, last + 1)
    ]
    return pieces[0] if len(pieces) == 1 else torch.cat(pieces)


class _RowChunked(torch.autograd.Function):
    """Applies a row-wise function chunk by chunk; the backward recomputes each chunk.

    `fn(*row_blocks, *shared, *vectors)` maps (n, D) row blocks, whole shared tensors (an
    lm_head's weight, say) and (n,) per-row vectors to a tuple of (n,) outputs. Only one
    chunk's intermediates are alive at a time in either pass; the gradients of the shared
    tensors accumulate over the chunks in float32 (float64 for float64 tensors).
    """

    @staticmethod
    def forward(ctx, fn: Callable[..., tuple[Tensor, ...]], chunk: int, n_blocks: int, n_shared: int,
                *inputs: Tensor):
        ctx.fn, ctx.chunk, ctx.n_blocks, ctx.n_shared = fn, chunk, n_blocks, n_shared
        ctx.save_for_backward(*inputs)
        n_rows = inputs[0].numel() // inputs[0].shape[-1]
        with torch.no_grad():
            outs = [fn(*_chunk_args(inputs, n_blocks, n_shared, s, s + chunk))
                    for s in range(0, max(n_rows, 1), chunk)]
        return tuple(torch.cat(parts) for parts in zip(*outs, strict=True))

    @staticmethod
    def backward(ctx, *grad_outputs: Tensor):
        inputs = ctx.saved_tensors
        needs = ctx.needs_input_grad[4:]
        n_rows = inputs[0].numel() // inputs[0].shape[-1]
        shared = range(ctx.n_blocks, ctx.n_blocks + ctx.n_shared)

        def buffer(i: int, x: Tensor) -> Tensor:
            if i in shared:
                return torch.zeros(x.shape, dtype=compute_dtype(x), device=x.device)
            return torch.empty((n_rows, *x.shape[-1:]) if i < ctx.n_blocks else (n_rows,), dtype=x.dtype,
                               device=x.device)

        grads = [buffer(i, x) if need else None for i, (x, need) in enumerate(zip(inputs, needs, strict=True))]
        for s in range(0, n_rows, ctx.chunk):
            args = [a.detach().requires_grad_(need) for a, need in
                    zip(_chunk_args(inputs, ctx.n_blocks, ctx.n_shared, s, s + ctx.chunk), needs, strict=True)]
            with torch.enable_grad():
                outs = ctx.fn(*args)
            used = [(o, g[s:s + ctx.chunk]) for o, g in zip(outs, grad_outputs, strict=True) if o.requires_grad]
            wanted = [a for a, need in zip(args, needs, strict=True) if need]
            got = iter(torch.autograd.grad([o for o, _ in used], wanted, [g for _, g in used], allow_unused=True)
                       if used else [None] * len(wanted))
            for i, g in enumerate(grads):
                if g is None:
                    continue
                part = next(got)
                if i in shared:
                    if part is not None:
                        g += part
                else:
                    g[s:s + ctx.chunk] = 0 if part is None else part
        shaped = [g if g is None else g.to(x.dtype).view(x.shape) for g, x in zip(grads, inputs, strict=True)]
        return (None, None, None, None, *shaped)


def _chunk_args(inputs: tuple[Tensor, ...], n_blocks: int, n_shared: int, start: int, stop: int) -> list[Tensor]:
    return [_rows(x, start, stop) if i < n_blocks else x if i < n_blocks + n_shared else x.reshape(-1)[start:stop]
            for i, x in enumerate(inputs)]


def _chunk_rows(vocab: int, chunk_size: int | None) -> int:
    if chunk_size is not None:
        if chunk_size < 1:
            raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
        return chunk_size
    return max(1, CHUNK_ELEMENTS // vocab)


def _rowwise(fn: Callable[..., tuple[Tensor, ...]], blocks: list[Tensor], vectors: list[Tensor],
             chunk_size: int | None, shared: tuple[Tensor, ...] = (), vocab: int | None = None) -> tuple[Tensor, ...]:
    lead = blocks[0].shape[:-1]
    chunk = _chunk_rows(vocab or blocks[0].shape[-1], chunk_size)
    outs = _RowChunked.apply(fn, chunk, len(blocks), len(shared), *blocks, *shared, *vectors)
    return tuple(o.view(lead) for o in outs)


# --------------------------------------------------------------------------------------
# Section 1: token statistics (and the exact KL of section 3), one chunk of rows at a time
# --------------------------------------------------------------------------------------


def _log_softmax(x: Tensor, temperature: float) -> Tensor:
    return torch.log_softmax(x.to(compute_dtype(x)) / temperature, dim=-1)


def _logp_rows(x: Tensor, tokens: Tensor, *, temperature: float) -> tuple[Tensor]:
    z = x.to(compute_dtype(x)) / temperature
    return (z.gather(-1, tokens[:, None]).squeeze(-1) - torch.logsumexp(z, dim=-1),)


def _stats_rows(x: Tensor, tokens: Tensor, ref: Tensor | None = None, *, temperature: float) -> tuple[Tensor, ...]:
    logp_all = _log_softmax(x, temperature)
    p = logp_all.exp()
    # Logits of -inf (a masked vocabulary) give p = 0; 0 * log 0 is 0, never 0 * -inf = NaN,
    # and the fill comes before the product so that its gradient is finite too.
    entropy = -(p * logp_all.masked_fill(p == 0, 0.0)).sum(-1)
    logp = logp_all.gather(-1, tokens[:, None]).squeeze(-1)
    if ref is None:
        return logp, entropy
    log_ratio = (logp_all - _log_softmax(ref, temperature)).masked_fill(p == 0, 0.0)
    return logp, entropy, (p * log_ratio).sum(-1)


def _rows_fn(fn: Callable[..., tuple[Tensor, ...]], temperature: float) -> Callable[..., tuple[Tensor, ...]]:
    def apply(*args: Tensor) -> tuple[Tensor, ...]:
        return fn(*args, temperature=temperature)

    return apply


def token_logprobs(logits: Tensor, tokens: Tensor, temperature: float = 1.0, *,
                   chunk_size: int | None = None) -> Tensor:
    """log pi(a | s) per token. logits (..., V) float, tokens (...) int -> float32 (...) (float64 for float64)."""
    (logp,) = _rowwise(_rows_fn(_logp_rows, temperature), [logits], [tokens.long()], chunk_size)
    return logp


def token_logprobs_and_entropy(logits: Tensor, tokens: Tensor, temperature: float = 1.0, *,
                               chunk_size: int | None = None) -> tuple[Tensor, Tensor]:
    """(log pi(a | s), entropy of pi(. | s)) per token; shapes and dtypes as `token_logprobs`."""
    logp, entropy = _rowwise(_rows_fn(_stats_rows, temperature), [logits], [tokens.long()], chunk_size)
    return logp, entropy


def token_stats_with_kl(logits: Tensor, tokens: Tensor, ref_logits: Tensor, temperature: float = 1.0, *,
                        chunk_size: int | None = None) -> tuple[Tensor, Tensor, Tensor]:
    """(logp, entropy, KL(pi || pi_ref) over the vocabulary) per token; ref_logits (..., V) gets no gradient."""
    def fn(x: Tensor, ref: Tensor, tokens: Tensor) -> tuple[Tensor, ...]:
        return _stats_rows(x, tokens, ref, temperature=temperature)

    logp, entropy, kl = _rowwise(fn, [logits, ref_logits.detach()], [tokens.long()], chunk_size)
    return logp, entropy, kl


def linear_token_stats(hidden: Tensor, weight: Tensor, tokens: Tensor, bias: Tensor | None = None,
                       temperature: float = 1.0, ref_hidden: Tensor | None = None, ref_weight: Tensor | None = None,
                       ref_bias: Tensor | None = None, *, chunk_size: int | None = None
                       ) -> tuple[Tensor, Tensor, Tensor | None]:
    """(logp, entropy, exact KL or None) per row of logits = hidden @ weight.T + bias, never all at once.

    hidden (..., H), weight (V, H), bias (V,) or None, tokens (...); with ref_hidden (..., H'),
    ref_weight (V, H') and ref_bias, the KL to softmax(ref_hidden @ ref_weight.T + ref_bias).
    The logits of one chunk of rows exist at a time, in both passes; gradients reach hidden,
    weight and bias (the reference gets none).
    """
    has_ref = ref_hidden is not None
    shared = tuple(t for t in (weight, bias) if t is not None)
    ref_shared = tuple(t.detach() for t in (ref_weight, ref_bias) if t is not None) if has_ref else ()

    def fn(*args: Tensor) -> tuple[Tensor, ...]:
        h, args = args[0], args[1:]
        rh, args = (args[0], args[1:]) if has_ref else (None, args)
        w, b, args = args[0], (args[1] if bias is not None else None), args[len(shared):]
        rw, rb = (args[0], args[1] if ref_bias is not None else None) if has_ref else (None, None)
        toks = args[len(ref_shared)]
        # The projection in the inputs' dtype, as the model's own lm_head computes the logits;
        # the statistics in float32 (float64 for float64) from there.
        logits = torch.nn.functional.linear(h, w, b)
        ref_logits = None if rh is None else torch.nn.functional.linear(rh, rw, rb)
        return _stats_rows(logits, toks, ref_logits, temperature=temperature)

    blocks = [hidden, *([ref_hidden.detach()] if has_ref else [])]
    outs = _rowwise(fn, blocks, [tokens.long()], chunk_size, shared=shared + ref_shared, vocab=weight.shape[0])
    return outs[0], outs[1], outs[2] if has_ref else None


# --------------------------------------------------------------------------------------
# Sections 2-4: ratio, clipped surrogate, KL penalty, aggregation (O(B*T) work)
# --------------------------------------------------------------------------------------


def log_ratio(logp: Tensor, old_logp: Tensor | None, mask: Tensor, ratio_level: str = "token") -> Tensor:
    """log r per token (B, T). old_logp=None is on-policy: old = logp.detach().

    "token": clamp(logp - old, -20, 20). "sequence" (GSPO): clamp(masked mean over t of
    (logp - old), max=10), shared by every token of the row.
    """
    old = logp.detach() if old_logp is None else old_logp.to(logp.dtype)
    if ratio_level == "token":
        return torch.clamp(logp - old, -LOG_RATIO_CLAMP, LOG_RATIO_CLAMP)
    m = mask.to(logp.dtype)
    diff = torch.where(mask, logp - old, 0.0)
    seq = diff.sum(-1, keepdim=True) / m.sum(-1, keepdim=True).clamp(min=1.0)
    return torch.clamp(seq, max=SEQ_LOG_RATIO_MAX).expand_as(logp)


def clipped_surrogate(log_r: Tensor, advantages: Tensor, clip_low: float, clip_high: float,
                      dual_clip: float | None = None, is_weights: Tensor | None = None
                      ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(pg, ratio, clipped_low, clipped_high) per token, SPEC section 2; advantages broadcast to log_r."""
    a = advantages.to(log_r.dtype)
    a = a.expand_as(log_r)
    r = torch.exp(log_r)
    pg = torch.maximum(-a * r, -a * torch.clamp(r, 1.0 - clip_low, 1.0 + clip_high))
    if dual_clip is not None:
        pg = torch.where(a < 0, torch.minimum(pg, -a * dual_clip), pg)
    if is_weights is not None:
        pg = pg * is_weights.to(log_r.dtype).detach()
    clipped_low = (r < 1.0 - clip_low) & (a < 0)
    clipped_high = (r > 1.0 + clip_high) & (a > 0)
    return pg, r.detach(), clipped_low, clipped_high


def kl_penalty(logp: Tensor, ref_logp: Tensor, estimator: str = "k3") -> Tensor:
    """k1, k2 or k3 per token from the sampled tokens' log-probs (SPEC section 3)."""
    d = ref_logp.to(logp.dtype) - logp
    if estimator == "k1":
        return -d
    if estimator == "k2":
        return 0.5 * d * d
    if estimator == "k3":
        dc = torch.clamp(d, -LOG_RATIO_CLAMP, LOG_RATIO_CLAMP)
        return torch.clamp(torch.exp(dc) - dc - 1.0, max=K3_MAX)
    raise ValueError(f"kl_estimator must be one of k1, k2, k3 here (full needs ref_logits), got {estimator!r}")


def aggregate(per_token: Tensor, mask: Tensor, loss_agg: str = "token-mean", norm_len: float | None = None) -> Tensor:
    """Scalar loss from a (B, T) per-token loss and a (B, T) bool mask (SPEC section 4).

    An empty mask gives 0 with zero gradient.
    """
    masked = torch.where(mask, per_token, 0.0)
    m = mask.to(per_token.dtype)
    n_rows = per_token.shape[0]
    if loss_agg == "token-mean":
        return masked.sum() / m.sum().clamp(min=1.0)
    if loss_agg == "seq-mean-token-mean":
        tokens_per_row = m.sum(-1)
        row_means = masked.sum(-1) / tokens_per_row.clamp(min=1.0)
        valid = (tokens_per_row > 0).to(per_token.dtype)
        return (row_means * valid).sum() / valid.sum().clamp(min=1.0)
    if loss_agg == "seq-mean-token-sum":
        return masked.sum() / max(n_rows, 1)
    if loss_agg == "seq-mean-token-sum-norm":
        denominator = n_rows * (per_token.shape[-1] if norm_len is None else norm_len)
        return masked.sum() / denominator if denominator > 0 else masked.sum()  # an empty batch sums to 0
    raise ValueError(f"loss_agg must be one of {', '.join(LOSS_AGGS)}, got {loss_agg!r}")


@dataclass
class ReferencePolicyLoss:
    """Everything the reference computes; per-token fields are (B, T)."""

    loss: Tensor
    per_token_loss: Tensor
    logprobs: Tensor
    entropy: Tensor
    kl: Tensor
    ratio: Tensor
    pg: Tensor
    clipped_low: Tensor
    clipped_high: Tensor


def policy_loss(
    logits: Tensor,
    tokens: Tensor,
    advantages: Tensor,
    *,
    mask: Tensor | None = None,
    old_logprobs: Tensor | None = None,
    ref_logprobs: Tensor | None = None,
    ref_logits: Tensor | None = None,
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
    chunk_size: int | None = None,
    stats_fn: Callable[..., tuple[Tensor, Tensor, Tensor | None]] | None = None,
) -> ReferencePolicyLoss:
    """The clipped policy loss of SPEC sections 2-4 on logits (B, T, V) and tokens (B, T).

    Inputs are assumed valid (rlops.policy_loss checks them before it calls this).
    entropy_agg, when given and not loss_agg, aggregates the entropy term on its own:
    loss = agg(pg + kl_coef * kl, loss_agg) - entropy_coef * agg(H, entropy_agg).
    kl_ratio_weighted multiplies the KL term by the (differentiable) ratio r, DeepSeek-V3.2's
    unbiased KL gradient; the reported kl stays the KL itself.
    `stats_fn(logits, tokens, temperature, ref_logits)` -> (logp, entropy, exact KL or None)
    replaces the chunked token statistics (rlops.baselines uses it for eager low precision).
    """
    full = kl_coef != 0 and kl_estimator == "full"
    if stats_fn is not None:
        logp, entropy, kl = stats_fn(logits, tokens, temperature, ref_logits if full else None)
    elif full:
        logp, entropy, kl = token_stats_with_kl(logits, tokens, ref_logits, temperature, chunk_size=chunk_size)
    else:
        logp, entropy = token_logprobs_and_entropy(logits, tokens, temperature, chunk_size=chunk_size)
    if not full:
        kl = kl_penalty(logp, ref_logprobs, kl_estimator) if kl_coef != 0 else torch.zeros_like(logp)
    mask = torch.ones_like(tokens, dtype=torch.bool) if mask is None else mask.bool()
    adv = advantages[:, None] if advantages.dim() == 1 else advantages  # (B,) and (B, 1) broadcast over T
    log_r = log_ratio(logp, old_logprobs, mask, ratio_level)
    weights = is_weights
    pg, ratio, clipped_low, clipped_high = clipped_surrogate(log_r, adv, clip_low, clip_high, dual_clip, weights)
    kl_term = kl * torch.exp(log_r) if kl_ratio_weighted and kl_coef != 0 else kl
    per_token = pg + kl_coef * kl_term - entropy_coef * entropy
    if entropy_agg is None or entropy_agg == loss_agg:
        loss = aggregate(per_token, mask, loss_agg, norm_len)
    else:
        loss = (aggregate(pg + kl_coef * kl_term, mask, loss_agg, norm_len)
                - entropy_coef * aggregate(entropy, mask, entropy_agg, norm_len))
    return ReferencePolicyLoss(loss, per_token, logp, entropy, kl, ratio, pg, clipped_low, clipped_high)


# --------------------------------------------------------------------------------------
# Section 5: advantages
# --------------------------------------------------------------------------------------


def gae(rewards: Tensor, values: Tensor, mask: Tensor | None = None, gamma: float = 1.0, lam: float = 0.95,
        bootstrap: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """GAE as verl writes it: a reversed loop over time, masked positions carrying values through.

    rewards, values (B, T); mask (B, T) 0/1 or None; bootstrap (B,) or None. Returns
    (advantages, returns) in float32 (float64 for float64 input), 0 where mask is 0.
    """
    dtype = torch.float64 if torch.float64 in (rewards.dtype, values.dtype) else torch.float32
    r, v = rewards.to(dtype), values.to(dtype)
    m = torch.ones_like(r, dtype=torch.bool) if mask is None else mask.bool()
    next_value = torch.zeros(r.shape[0], dtype=dtype, device=r.device) if bootstrap is None else bootstrap.to(dtype)
    next_adv = torch.zeros_like(next_value)
    adv = torch.zeros_like(r)
    for t in reversed(range(r.shape[1])):
        delta = r[:, t] + gamma * next_value - v[:, t]
        next_value = torch.where(m[:, t], v[:, t], next_value)
        next_adv = torch.where(m[:, t], delta + gamma * lam * next_adv, next_adv)
        adv[:, t] = next_adv
    return torch.where(m, adv, 0.0), torch.where(m, adv + v, 0.0)
