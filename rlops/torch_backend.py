"""The PyTorch backend (backend="torch", and backend="auto" on CPU tensors) of SPEC.md 1-5.

Arithmetic is float32 whatever the logits dtype, or float64 when the logits are float64.
Vocabulary-sized work runs over chunks of rows and is recomputed chunk by chunk in the
backward pass, so neither pass holds a float32 copy of the whole (N, V) logits; gradients
come from autograd. The O(B*T) epilogue has the kernels' structure: per-token loss terms
weighted by each token's share of the aggregate (`options.aggregation_weights`), so the sequence-level
(GSPO) path on the kernel backends composes from here with the fused token statistics.

The test oracle is rlops/reference.py, a separate float64 transcription of SPEC.md that
shares no code with this module.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import torch
from torch import Tensor

from . import objectives
from .constants import K3_MAX, LOG_RATIO_CLAMP, SEQ_LOG_RATIO_MAX
from .objectives import surrogate
from .options import Head, PolicyLossConfig, TokenInputs, aggregation_weights
from .packing import Layout

# Rows per chunk are chosen so that one float32 temporary of a chunk is at most 16 MiB.
CHUNK_ELEMENTS = 1 << 22


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


class TokenStats(NamedTuple):
    """Per-token statistics (B, T): log-prob, entropy and the exact KL (None unless computed)."""

    logp: Tensor
    entropy: Tensor
    full_kl: Tensor | None


class LossTerms(NamedTuple):
    """The composed loss: a scalar, and the detached float32 (B, T) values it reports."""

    loss: Tensor
    logprobs: Tensor
    entropy: Tensor
    kl: Tensor
    ratio: Tensor


# --------------------------------------------------------------------------------------
# Section 1: token statistics (and the exact KL of section 3), one chunk of rows at a time
# --------------------------------------------------------------------------------------


def _log_softmax(x: Tensor, temperature: float) -> Tensor:
    # Shifting by the row max before dividing keeps (x - max) exact near the max: x / tau itself
    # would round by ~3e-5 at |x / tau| ~ 1e3 (small temperatures). The shift cancels in the
    # gradient, so it is taken without one.
    x = x.to(compute_dtype(x))
    return torch.log_softmax((x - x.detach().amax(-1, keepdim=True)) / temperature, dim=-1)


def _sampled(logp_all: Tensor, tokens: Tensor) -> Tensor:
    """logp_all (n, V) at each row's token (n,). An id outside [0, V) (possible when the value checks
    are off: a GPU without RLOPS_CHECK=1, or torch.compile) gives NaN, as in the kernels, and is
    never used as an index: gather with an out-of-range index would fail (a device-side assert on
    a GPU)."""
    vocab = logp_all.shape[-1]
    in_vocab = (tokens >= 0) & (tokens < vocab)
    picked = logp_all.gather(-1, tokens.clamp(0, vocab - 1)[:, None]).squeeze(-1)
    return torch.where(in_vocab, picked, float("nan"))


def _logp_rows(x: Tensor, tokens: Tensor, *, temperature: float) -> tuple[Tensor]:
    # log_softmax forms (z - max) - log sum exp(z - max); z[a] - logsumexp(z) would carry the
    # rounding of the log-sum-exp at the logits' magnitude (3e-5 at |z| = 1e3), and its
    # gradient exp(z - lse) that rounding relative to p.
    return (_sampled(_log_softmax(x, temperature), tokens),)


def _stats_rows(x: Tensor, tokens: Tensor, ref: Tensor | None = None, *, temperature: float) -> tuple[Tensor, ...]:
    logp_all = _log_softmax(x, temperature)
    p = logp_all.exp()
    # Logits of -inf (a masked vocabulary) give p = 0; 0 * log 0 is 0, never 0 * -inf = NaN,
    # and the fill comes before the product so that its gradient is finite too.
    entropy = -(p * logp_all.masked_fill(p == 0, 0.0)).sum(-1)
    logp = _sampled(logp_all, tokens)
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
    """log pi(a | s) per token. logits (..., V) float, tokens (...) int -> float32 (...) (float64 for float64).

    An id outside [0, V) gives NaN, as in the kernels (it is never used as an index)."""
    (logp,) = _rowwise(_rows_fn(_logp_rows, temperature), [logits], [tokens.long()], chunk_size)
    return logp


def token_stats(logits: Tensor, tokens: Tensor, temperature: float = 1.0, ref_logits: Tensor | None = None, *,
                chunk_size: int | None = None) -> TokenStats:
    """(log pi(a | s), entropy of pi(. | s), KL(pi || pi_ref) over the vocabulary or None) per token.

    Shapes and dtypes as `token_logprobs`; ref_logits (..., V) or None, no gradient.
    """
    def fn(x: Tensor, *rest: Tensor) -> tuple[Tensor, ...]:
        return _stats_rows(x, rest[-1], rest[0] if len(rest) == 2 else None, temperature=temperature)

    blocks = [logits] if ref_logits is None else [logits, ref_logits.detach()]
    outs = _rowwise(fn, blocks, [tokens.long()], chunk_size)
    return TokenStats(outs[0], outs[1], outs[2] if ref_logits is not None else None)


def linear_token_stats(hidden: Tensor, head: Head, tokens: Tensor, temperature: float = 1.0,
                       ref: tuple[Tensor, Head] | None = None, *, chunk_size: int | None = None) -> TokenStats:
    """(logp, entropy, exact KL or None) per row of logits = hidden @ weight.T + bias, never all at once.

    hidden (..., H), head = (weight (V, H), bias (V,) or None), tokens (...); with
    ref = (ref_hidden (..., H'), ref_head), the KL to softmax of the reference's logits.
    The logits of one chunk of rows exist at a time, in both passes; gradients reach hidden,
    weight and bias (the reference gets none).
    """
    shared = tuple(t for t in head if t is not None)
    ref_shared = () if ref is None else tuple(t.detach() for t in ref[1] if t is not None)

    def split(args: tuple[Tensor, ...], bias: Tensor | None) -> tuple[Tensor, Tensor | None, tuple[Tensor, ...]]:
        return args[0], (args[1] if bias is not None else None), args[1 + (bias is not None):]

    def fn(*args: Tensor) -> tuple[Tensor, ...]:
        h, args = args[0], args[1:]
        ref_h, args = (args[0], args[1:]) if ref is not None else (None, args)
        weight, bias, args = split(args, head.bias)
        # The projection in the inputs' dtype, as the model's own lm_head computes the logits;
        # the statistics in float32 (float64 for float64) from there.
        logits = torch.nn.functional.linear(h, weight, bias)
        ref_logits = None
        if ref_h is not None:
            ref_weight, ref_bias, args = split(args, ref[1].bias)
            ref_logits = torch.nn.functional.linear(ref_h, ref_weight, ref_bias)
        return _stats_rows(logits, args[0], ref_logits, temperature=temperature)

    blocks = [hidden, *([] if ref is None else [ref[0].detach()])]
    outs = _rowwise(fn, blocks, [tokens.long()], chunk_size, shared=shared + ref_shared, vocab=head.weight.shape[0])
    return TokenStats(outs[0], outs[1], outs[2] if ref is not None else None)


# --------------------------------------------------------------------------------------
# Sections 2-4: ratio, clipped surrogate, KL penalty, aggregation (O(B*T) work)
# --------------------------------------------------------------------------------------


def log_ratio(logp: Tensor, old_logp: Tensor | None, layout: Layout, ratio_level: str = "token") -> Tensor:
    """log r per token (layout.mask's shape). old_logp=None is on-policy: old = logp.detach().

    "token": clamp(logp - old, -20, 20). "sequence" (GSPO): clamp(masked mean over the
    sequence's tokens of (logp - old), max=10), shared by every token of the sequence (a row
    of (B, T), or a packed segment).
    """
    old = logp.detach() if old_logp is None else old_logp.to(logp.dtype)
    if ratio_level == "token":
        return torch.clamp(logp - old, -LOG_RATIO_CLAMP, LOG_RATIO_CLAMP)
    mask = layout.mask
    diff = layout.seq_totals(torch.where(mask, logp - old, 0.0))
    seq = diff / layout.seq_totals(mask.to(logp.dtype)).clamp(min=1)
    return torch.clamp(layout.per_token(seq), max=SEQ_LOG_RATIO_MAX).expand_as(logp)


def kl_penalty(logp: Tensor, ref_logp: Tensor, estimator: str = "k3") -> Tensor:
    """k1, k2, k3 or abs per token from the sampled tokens' log-probs (SPEC section 3,
    docs/objectives.md); "k1+", "k3+", "abs+": the base's value with k2's gradient (straight through)."""
    d = ref_logp.to(logp.dtype) - logp
    base = estimator.removesuffix("+")
    if base == "k1":
        kl = -d
    elif base == "k2":
        kl = 0.5 * d * d
    elif base == "k3":
        dc = torch.clamp(d, -LOG_RATIO_CLAMP, LOG_RATIO_CLAMP)
        kl = torch.clamp(torch.exp(dc) - dc - 1.0, max=K3_MAX)
    elif base == "abs":
        kl = d.abs()
    else:
        raise ValueError(f"kl_estimator must be a sampled-token estimator here (full needs ref_logits), got "
                         f"{estimator!r}")
    if estimator.endswith("+") and base != "k2":
        k2 = 0.5 * d * d
        kl = k2 - k2.detach() + kl.detach()
    return kl


def policy_loss(stats: TokenStats, layout: Layout, inputs: TokenInputs, config: PolicyLossConfig,
                sampling_logprobs: Tensor | None = None) -> LossTerms:
    """The policy loss of SPEC sections 2-4 from per-token statistics (layout.mask's shape) with autograd.

    loss = sum_t w_t (pg_t + kl_coef * kl_t [* r_t]) - sum_t e_t H_t with w = inputs.weights
    and e = inputs.entropy_coefs, as the fused kernels compute it; pg_t is the objective's,
    times the off-policy sequence mask and the top-entropy token mask when configured
    (rlops.objectives). Per-token inputs are read only where the mask is 1, so no padding value,
    however non-finite, reaches the loss or a gradient. The layout's sequences are those of the
    sequence-level ratio and objectives. sampling_logprobs: the rollout engine's log-probs for
    the off-policy mask (default: the old log-probs).
    """
    dtype, mask = stats.logp.dtype, layout.mask

    def counted(x: Tensor | None, fill: float = 0.0) -> Tensor | None:
        return None if x is None else torch.where(mask, x.to(dtype).expand(mask.shape), fill)

    logp, entropy, old = counted(stats.logp), counted(stats.entropy), counted(inputs.old_logprobs)
    log_r = log_ratio(logp, old, layout, config.ratio_level)
    adv, isw = counted(inputs.advantages), counted(inputs.is_weights, 1.0)
    if config.objective in objectives.COUPLED:
        pg, ratio = objectives.COUPLED[config.objective](logp, logp.detach() if old is None else old, adv, isw,
                                                         layout, config)
    else:
        pg, ratio = surrogate(log_r, logp, old, adv, config, isw)
    sampling = old if sampling_logprobs is None else counted(sampling_logprobs)
    if config.off_policy_mask is not None and sampling is not None:  # on policy nothing is masked
        pg = pg * objectives.off_policy_keep(logp, sampling, adv, layout, config.off_policy_mask)
    entropy_coefs = inputs.entropy_coefs
    if config.top_entropy_quantile < 1.0:
        selected = objectives.high_entropy_mask(entropy, mask, config.top_entropy_quantile)
        pg = pg * selected
        if entropy_coefs is not None:  # TRL's bonus averages over the same tokens
            entropy_coefs = config.entropy_coef * aggregation_weights(layout._replace(mask=selected),
                                                                      config.entropy_agg_used, config.norm_len)
    kl = torch.zeros_like(logp)
    if config.kl_used == "full":
        kl = counted(stats.full_kl)
    elif config.kl_used != "none":
        kl = kl_penalty(logp, counted(inputs.ref_logprobs), config.kl_estimator)
    kl_term = kl * torch.exp(log_r) if config.kl_ratio_weighted else kl
    per_token = torch.where(mask, pg + config.kl_coef * kl_term, 0.0)
    loss = (inputs.weights.to(dtype) * per_token).sum()
    if entropy_coefs is not None:
        loss = loss - (entropy_coefs.to(dtype) * entropy).sum()
    reported = (torch.where(mask, v.detach(), 0.0).to(torch.float32) for v in (logp, entropy, kl, ratio))
    return LossTerms(loss.to(torch.float32), *reported)


# --------------------------------------------------------------------------------------
# Section 5: GAE
# --------------------------------------------------------------------------------------


def gae(rewards: Tensor, values: Tensor, mask: Tensor, gamma: float, lam: float, bootstrap: Tensor | None = None,
        cu_seqlens: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """GAE as verl writes it: a reversed loop over time, masked positions carrying values through.

    rewards, values (B, T); mask (B, T) bool; bootstrap (B,) or None. Returns float32
    (advantages, returns) (float64 for float64 input), 0 where mask is 0.

    Packed (cu_seqlens int64 (S+1,), checked): rewards, values and mask (N,) or (1, N), bootstrap
    (S,) or None; outputs of rewards' shape. The same recurrences, restarted at every sequence
    boundary, run as a segmented reverse scan over the N tokens: ceil(log2 N) vectorised doubling
    steps of the affine maps h_t = b_t + a_t h_{t+1}, with no loop over time or sequences.
    """
    dtype = torch.float64 if torch.float64 in (rewards.dtype, values.dtype) else torch.float32
    r, v = rewards.to(dtype), values.to(dtype)
    if cu_seqlens is not None:
        shape = r.shape
        r, v, m = r.reshape(-1), v.reshape(-1), mask.reshape(-1)
        layout = Layout.of(m, cu_seqlens)
        # At the last token of a sequence the maps restart: E = bootstrap (or 0), A = m * delta.
        last = torch.ones_like(m)
        last[:-1] = layout.seq_ids[1:] != layout.seq_ids[:-1]
        boot = 0.0 if bootstrap is None else layout.per_token(bootstrap.to(dtype))
        pad = min(m.numel(), 1)  # the token after the last one: never read, as the last token is a `last`
        m_next, v_next = torch.cat([m[1:], m.new_zeros(pad)]), torch.cat([v[1:], v.new_zeros(pad)])
        a = torch.where(last | m_next, 0.0, 1.0).to(dtype)
        b = torch.where(last, boot, torch.where(m_next, v_next, 0.0))

        def reverse_scan(a: Tensor, b: Tensor) -> Tensor:
            # Doubling: after the step of size s, (a_t, b_t) is the composed map of steps t..t+2s-1.
            step = 1
            while step < a.numel():
                b[:-step] += a[:-step] * b[step:]
                a[:-step] = a[:-step] * a[step:]
                step *= 2
            return b

        delta = r + gamma * reverse_scan(a, b) - v
        adv = reverse_scan(torch.where(last, 0.0, torch.where(m, r.new_full((), gamma * lam), 1.0)),
                           torch.where(m, delta, 0.0))
        return torch.where(m, adv, 0.0).view(shape), torch.where(m, adv + v, 0.0).view(shape)
    next_value = torch.zeros(r.shape[0], dtype=dtype, device=r.device) if bootstrap is None else bootstrap.to(dtype)
    next_adv = torch.zeros_like(next_value)
    adv = torch.zeros_like(r)
    for t in reversed(range(r.shape[1])):
        delta = r[:, t] + gamma * next_value - v[:, t]
        next_value = torch.where(mask[:, t], v[:, t], next_value)
        next_adv = torch.where(mask[:, t], delta + gamma * lam * next_adv, next_adv)
        adv[:, t] = next_adv
    return torch.where(mask, adv, 0.0), torch.where(mask, adv + v, 0.0)
