"""Per-token statistics of softmax(logits / tau) in one pass over the vocabulary (SPEC.md section 1),
and the one backward kernel every vocabulary-sized op shares.

    z = x / tau,  lse = logsumexp(z),  logp = z[a] - lse,  H = lse - sum_v softmax(z)_v z_v

and, given reference logits y, the exact KL(p || q) of section 3 with q = softmax(y / tau).

Forward: one program per row streams the row's logits once (plus the reference row for the
KL) and writes the N_STATS float32 rows of rlops/constants.py (STATS_ROWS).
Backward: one program per row reads the row again (and the reference row) and writes its
gradient once, from per-row upstream gradients of logp, entropy and kl. Rows that a mask
excludes (forward) or whose upstream gradients are all zero (backward) are not read.
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from rlops._layout import (
    RowLayout,
    byte_mask,
    flat,
    grad_strides,
    leading_rows,
    positions_of,
    row_layouts,
    same_alignment,
    zero_last_position,
)
from rlops.constants import N_GRADS, N_STATS

from ._common import (
    LOG2E,
    N_STATES,
    NUM_WARPS,
    ROW_ENTROPY,
    ROW_KL,
    ROW_LOG_SUM,
    ROW_LOGP,
    ROW_LSE_GAP,
    ROW_MAX,
    block_v,
    merged_row_stats,
    row_body,
    row_edges,
    row_head,
    row_start,
    row_states,
    sampled_logp,
    softmax_row_stats,
    store_row_states,
    store_stats,
    vocab_splits,
)

# block_v calls triton.next_power_of_2, a ConstexprFunction whose call from host code costs
# about as much as the rest of a small launch (an import and two comprehensions per call):
# the launchers ask it once per vocabulary size.
_block_v = functools.cache(block_v)


@triton.jit
def _row_states_kernel(
    # data pointers (ref_ptr: the logits stand in without HAS_REF; live_ptr: rows where it is 0 are
    # not read and get zero states: the token mask or the policy loss's aggregation weights; or None:
    # HAS_LIVE says which), the (N_STATES, SPLITS, N) output
    x_ptr, ref_ptr, live_ptr, part_ptr,
    # sizes: rows, vocabulary, body elements per split
    N, V, chunk,
    # strides (rlops/_layout.py: RowLayout)
    inner, stride_outer, stride_inner, ref_inner, ref_stride_outer, ref_stride_inner,
    # scalars
    inv_tau,
    # switches
    HAS_REF: tl.constexpr, HAS_LIVE: tl.constexpr, SPLITS: tl.constexpr, BLOCK_V: tl.constexpr,
    REF_ALIGNED: tl.constexpr = True,
):
    """Program (row, split): the online-softmax state of one vocabulary split of a row, for a
    forward kernel's merged_row_stats (vocab_splits: when the rows alone leave the GPU idle).
    Reads the split's logits once (twice with HAS_REF); writes N_STATES float32."""
    row = tl.program_id(0)
    split = tl.program_id(1)
    inv_tau = tl.cast(inv_tau, tl.float32)
    live = True
    if HAS_LIVE:
        live = tl.load(live_ptr + row) != 0
    if live:
        x_row = x_ptr + row_start(row, inner, stride_outer, stride_inner)
        ref_row = ref_ptr + row_start(row, ref_inner, ref_stride_outer, ref_stride_inner)
        m, s, t, m_ref, s_ref, c, x_row = row_states(x_row, ref_row, V, inv_tau * LOG2E, split, chunk, HAS_REF,
                                                     REF_ALIGNED, BLOCK_V)
        store_row_states(part_ptr, N, row, split, m, s, t, m_ref, s_ref, c, SPLITS)
    else:  # zeros, for a caller that reads every row's states (rlops/vocab_parallel.py)
        store_row_states(part_ptr, N, row, split, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, SPLITS)


@triton.jit
def _token_stats_fwd_kernel(
    # data pointers (ref_ptr: the logits stand in without HAS_REF; mask_ptr: rows where it is 0
    # are skipped, or None (HAS_MASK says which); part_ptr: the rows' split states from
    # _row_states_kernel, or None (HAS_PARTS says which))
    x_ptr, ref_ptr, tokens_ptr, mask_ptr, part_ptr, stats_ptr,
    # sizes
    N, V,
    # strides (rlops/_layout.py: RowLayout)
    inner, stride_outer, stride_inner, ref_inner, ref_stride_outer, ref_stride_inner,
    # scalars
    inv_tau,
    # switches
    HAS_REF: tl.constexpr, HAS_MASK: tl.constexpr, BLOCK_V: tl.constexpr, REF_ALIGNED: tl.constexpr = True,
    HAS_PARTS: tl.constexpr = False, SPLITS: tl.constexpr = 1,
):
    """Reads N*V logits once (2*N*V with HAS_REF; with HAS_PARTS, SPLITS states per row instead)
    plus the token ids; writes N_STATS float32 per row."""
    row = tl.program_id(0)
    # torch.compile may pass Python floats as float64; the contract is float32 arithmetic.
    inv_tau = tl.cast(inv_tau, tl.float32)
    valid = True
    if HAS_MASK:
        valid = tl.load(mask_ptr + row) != 0
    if valid:
        x_row = x_ptr + row_start(row, inner, stride_outer, stride_inner)
        if HAS_PARTS:
            m, log_s, entropy, lse_gap, kl = merged_row_stats(part_ptr, N, row, inv_tau, HAS_REF, SPLITS)
        else:
            ref_row = ref_ptr + row_start(row, ref_inner, ref_stride_outer, ref_stride_inner)
            m, log_s, entropy, lse_gap, kl, x_row = softmax_row_stats(x_row, ref_row, V, inv_tau, HAS_REF,
                                                                      REF_ALIGNED, BLOCK_V)
        logp = sampled_logp(x_row, tokens_ptr, row, V, m, log_s, inv_tau)
        store_stats(stats_ptr, N, row, logp, entropy, kl, m, log_s, lse_gap)
    else:
        store_stats(stats_ptr, N, row, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0)


# log p + H where a probability underflows to 0 at most this low: p * coef stays 0 for a -inf logit
# (not 0 * -inf = NaN), and nothing changes where p > 0, since there log p > -104.
LOG_P_FLOOR = tl.constexpr(-1.0e4)


@triton.jit
def _logits_grad_block(x, y, one_hot, m, h, q, gl, ge, gk, inv_tau, k, log2_s, HAS_REF: tl.constexpr):
    """dx of logits x (reference logits y with HAS_REF): one_hot - p * coef, with the row's upstream
    gradients gl, ge, gk of logp, entropy and kl already times inv_tau, h = H - log_sum and
    q = lse_gap + KL (one_hot: gl at the sampled token, else 0)."""
    xm = x - m
    p = tl.exp2(xm * k - log2_s)  # exp(log p) with the scales folded: two fused multiply-adds
    coef = gl + ge * tl.maximum(xm * inv_tau + h, LOG_P_FLOOR)  # log p + H = (x - max) / tau - log_sum + H
    if HAS_REF:
        # Where a logit is -inf, p = 0: its term is 0, not 0 * (-inf - -inf) = NaN.
        coef -= gk * (tl.where(p > 0, (x - y) * inv_tau, 0.0) - q)
    return one_hot - p * coef


@triton.jit
def _token_stats_bwd_kernel(
    # data pointers: inputs (the logits stand in for ref_ptr without HAS_REF), the forward's stats
    # (N_STATS, N), upstream gradients (N_GRADS, N), one number scaling all of them (a summed
    # loss's upstream gradient; None without HAS_SCALE), output
    x_ptr, ref_ptr, tokens_ptr, stats_ptr, grads_ptr, grad_scale_ptr, dx_ptr,
    # sizes: rows, vocabulary, body elements per program (vocab_splits; the grid is (N, splits))
    N, V, chunk,
    # strides (rlops/_layout.py: RowLayout; dx rows share x's inner count); programs past the N
    # rows (one per sequence of a causal LM's (B, T + 1, V) logits: rlops/_layout.py, positions_of)
    # write zeros at dx_ptr + last_offset + (row - N) * last_stride, the sequence's last position
    inner, stride_outer, stride_inner, ref_inner, ref_stride_outer, ref_stride_inner,
    dx_stride_outer, dx_stride_inner, last_offset, last_stride,
    # scalars
    inv_tau,
    # switches
    HAS_REF: tl.constexpr, BLOCK_V: tl.constexpr, X_ALIGNED: tl.constexpr = True, REF_ALIGNED: tl.constexpr = True,
    HAS_SCALE: tl.constexpr = False,
):
    """Reads N*V logits (2*N*V with HAS_REF), writes N*V gradients, plus 9 scalars per row:

        dx_v = (g_logp * (1[v == a] - p_v) - g_entropy * p_v * (log p_v + H)
                + g_kl * p_v * (log p_v - log q_v - KL)) * inv_tau

    with log p_v = (x_v - max) * inv_tau - log_sum and log p_v - log q_v = (x_v - y_v) * inv_tau
    - lse_gap, so that no term carries the rounding of x / tau or of a log-sum-exp at the
    logits' magnitude.

    A row whose three upstream gradients are all 0 (a masked token) is written as zeros without
    reading its logits. Whatever V and the row strides, the gradient row is written in 16-byte
    vectors from its first 16-byte boundary (row_head), after one block holding the scalar head
    and tail (row_edges). The logits and reference rows are read in vectors too when X_ALIGNED
    and REF_ALIGNED (the host found each of their rows as far from a 16-byte boundary as the
    gradient row: rlops/_layout.py, same_alignment), else in scalars: in place, or into a fresh
    gradient of contiguous logits, everything streams in vectors. The sampled token's one-hot
    term is left out of the loop (a compare and a select per element) and its element written
    once more after it.

    Program (row, split) writes the body elements [split * chunk, (split + 1) * chunk) from the
    row's 16-byte boundary, split 0 the head and tail too, and the program holding the sampled
    token its one-hot term (vocab_splits: when the rows alone leave the GPU idle).
    """
    row = tl.program_id(0)
    split = tl.program_id(1)
    inv_tau = tl.cast(inv_tau, tl.float32)
    x_row = x_ptr + row_start(row, inner, stride_outer, stride_inner)
    ref_row = ref_ptr + row_start(row, ref_inner, ref_stride_outer, ref_stride_inner)
    # A program past the N rows reads nothing: its zero upstream gradients write zeros (below).
    counted = row < N
    dx_row = dx_ptr + tl.where(counted, row_start(row, inner, dx_stride_outer, dx_stride_inner),
                               last_offset + (row - N).to(tl.int64) * last_stride)
    entropy = tl.load(stats_ptr + ROW_ENTROPY * N + row, mask=counted, other=0.0)
    kl = tl.load(stats_ptr + ROW_KL * N + row, mask=counted, other=0.0)
    m = tl.load(stats_ptr + ROW_MAX * N + row, mask=counted, other=0.0)
    log_s = tl.load(stats_ptr + ROW_LOG_SUM * N + row, mask=counted, other=0.0)
    lse_gap = tl.load(stats_ptr + ROW_LSE_GAP * N + row, mask=counted, other=0.0)
    # Upstream gradient row k is that of statistics row k (logp, entropy, kl: constants.STAT_GRADS).
    g_logp = tl.load(grads_ptr + ROW_LOGP * N + row, mask=counted, other=0.0)
    g_entropy = tl.load(grads_ptr + ROW_ENTROPY * N + row, mask=counted, other=0.0)
    g_kl = tl.load(grads_ptr + ROW_KL * N + row, mask=counted, other=0.0)
    if HAS_SCALE:  # three multiplies per row here instead of a (N_GRADS, N) product on the host
        scale = tl.load(grad_scale_ptr).to(tl.float32)
        g_logp *= scale
        g_entropy *= scale
        g_kl *= scale
    tok = tl.load(tokens_ptr + row, mask=counted, other=-1)
    has_tok = (tok >= 0) & (tok < V)  # an id outside [0, V) (host check skipped) adds no one-hot term
    tok = tl.where(has_tok, tok, 0)
    k = inv_tau * LOG2E
    log2_s = log_s * LOG2E
    # Per row: the upstream gradients times inv_tau, and the row's constants of _logits_grad_block.
    gl, ge, gk = g_logp * inv_tau, g_entropy * inv_tau, g_kl * inv_tau
    h, q = entropy - log_s, lse_gap + kl
    DX_TY: tl.constexpr = dx_row.dtype.element_ty
    VEC: tl.constexpr = 128 // DX_TY.primitive_bitwidth  # elements per 16 bytes
    head = row_head(dx_row, V)
    n_body = (V - head) // VEC * VEC
    edge, in_edge = row_edges(head, n_body, tl.where(split == 0, V - n_body, 0), VEC)
    # This program's part of the body: 16-byte aligned from its start and a multiple of VEC long,
    # hints the compiler cannot derive (the row's alignment is known only at run time).
    dx_body = row_body(dx_row, head, True, BLOCK_V)
    lo = tl.multiple_of(split * chunk, VEC)
    hi = tl.multiple_of(tl.minimum(n_body, lo + chunk), VEC)
    # The sampled token's element is this program's to finish when it lies in its part.
    body_tok = tok - head
    owns_tok = has_tok & tl.where((body_tok >= 0) & (body_tok < n_body), (body_tok >= lo) & (body_tok < hi),
                                  split == 0)
    if (g_logp == 0) & (g_entropy == 0) & (g_kl == 0):
        tl.store(dx_row + edge, tl.zeros([2 * VEC], DX_TY), mask=in_edge)
        for start in range(lo, hi, BLOCK_V):
            offs = start + tl.arange(0, BLOCK_V)
            tl.store(dx_body + offs, tl.zeros([BLOCK_V], DX_TY), mask=offs < hi)
    else:
        # The sampled token's logits, read before the loop (in place, the loop overwrites them): its
        # element is written again after the loop with the one-hot term, which the loop leaves out.
        x_tok = tl.load(x_row + tok, mask=owns_tok).to(tl.float32)
        y_tok = x_tok
        if HAS_REF:
            y_tok = tl.load(ref_row + tok, mask=owns_tok).to(tl.float32)
        x_edge = tl.load(x_row + edge, mask=in_edge, other=float("-inf")).to(tl.float32)
        y_edge = x_edge
        if HAS_REF:
            y_edge = tl.load(ref_row + edge, mask=in_edge, other=float("-inf")).to(tl.float32)
        dx_edge = _logits_grad_block(x_edge, y_edge, 0.0, m, h, q, gl, ge, gk, inv_tau, k, log2_s, HAS_REF)
        tl.store(dx_row + edge, dx_edge.to(DX_TY), mask=in_edge)
        x_body = row_body(x_row, head, X_ALIGNED, BLOCK_V)
        ref_body = row_body(ref_row, head, HAS_REF and REF_ALIGNED, BLOCK_V)  # no reference: a stand-in never read
        for start in range(lo, hi, BLOCK_V):
            offs = start + tl.arange(0, BLOCK_V)
            in_row = offs < hi
            x = tl.load(x_body + offs, mask=in_row, other=float("-inf")).to(tl.float32)
            y = x
            if HAS_REF:
                y = tl.load(ref_body + offs, mask=in_row, other=float("-inf")).to(tl.float32)
            dx = _logits_grad_block(x, y, 0.0, m, h, q, gl, ge, gk, inv_tau, k, log2_s, HAS_REF)
            # In place (dx_row = x_row) is safe: these elements were read above.
            tl.store(dx_body + offs, dx.to(DX_TY), mask=in_row)
        # The barrier orders this store after the loop's store of the same element (by another thread).
        tl.debug_barrier()
        dx_tok = _logits_grad_block(x_tok, y_tok, gl, m, h, q, gl, ge, gk, inv_tau, k, log2_s, HAS_REF)
        tl.store(dx_row + tok, dx_tok.to(DX_TY), mask=owns_tok)


def token_stats_fwd(logits: torch.Tensor, tokens: torch.Tensor, temperature: float,
                    ref_logits: torch.Tensor | None = None, mask: torch.Tensor | None = None) -> torch.Tensor:
    """Launches the forward kernel.

    logits (..., V) float16/bfloat16/float32/float64 with any row strides; tokens (...) integer
    ids in [0, V); ref_logits (..., V) optional, for the exact KL; mask (...) optional, rows
    where it is 0 are skipped and get zeros. Returns float32 stats (N_STATS, ...) in the rows of
    constants.STATS_ROWS: logp, entropy, kl (0 without ref_logits), max, log_sum, lse_gap.
    """
    shape = positions_of(logits, tokens)
    if tokens.shape != shape[:-1]:
        raise ValueError(f"tokens must have shape {tuple(logits.shape[:-1])}, got {tuple(tokens.shape)}")
    rows, ref_rows = row_layouts(logits, ref_logits, shape)
    stats = torch.empty((N_STATS, *tokens.shape), dtype=torch.float32, device=logits.device)
    if rows.n_rows:
        mask = None if mask is None else byte_mask(mask.reshape(-1))
        ref_aligned = ref_logits is None or same_alignment(rows, ref_rows)
        parts = split_row_states(rows, ref_rows, mask, temperature, ref_logits is not None, ref_aligned)
        _token_stats_fwd_kernel[(rows.n_rows,)](
            # data pointers
            rows.tensor, ref_rows.tensor, tokens.reshape(-1), mask, parts, stats,
            # sizes, strides, scalars
            rows.n_rows, logits.shape[-1], *rows[2:], *ref_rows[2:], 1.0 / temperature,
            # switches (REF_ALIGNED: reference rows that stream in 16-byte vectors too)
            HAS_REF=ref_logits is not None, HAS_MASK=mask is not None, BLOCK_V=_block_v(logits.shape[-1]),
            REF_ALIGNED=ref_aligned, HAS_PARTS=parts is not None, SPLITS=1 if parts is None else parts.shape[1],
            num_warps=NUM_WARPS,
        )
    return stats


def split_row_states(rows: RowLayout, ref_rows: RowLayout, live: torch.Tensor | None, temperature: float,
                     has_ref: bool, ref_aligned: bool) -> torch.Tensor | None:
    """When the rows alone leave the GPU idle (vocab_splits), launches _row_states_kernel and
    returns its float32 (N_STATES, splits, N) states for a forward kernel's part_ptr; else None.
    live: (N,) rows that are computed where nonzero (None: all)."""
    vocab = rows.tensor.shape[-1]
    splits, chunk = vocab_splits(rows.n_rows, vocab, rows.tensor.device)
    if splits == 1:
        return None
    return _row_states(rows, ref_rows, live, temperature, has_ref, ref_aligned, splits, chunk)


def row_states_fwd(logits: torch.Tensor, ref_logits: torch.Tensor | None, temperature: float,
                   live: torch.Tensor | None = None) -> torch.Tensor:
    """Float32 (N_STATES, N) online-softmax states of each row of logits (..., V) (and of
    ref_logits, for the exact KL): kernels/_common.py, row_states, of the whole row. Rows of a
    vocabulary shard merge with other shards' states (rlops/vocab_parallel.py). live: (...)
    bool or integer, rows where it is 0 are not read and their states are zeros (None: all)."""
    rows, ref_rows = row_layouts(logits, ref_logits)
    if not rows.n_rows:
        return torch.empty((N_STATES, 0), dtype=torch.float32, device=logits.device)
    ref_aligned = ref_logits is None or same_alignment(rows, ref_rows)
    live = None if live is None else byte_mask(live.reshape(-1))
    parts = _row_states(rows, ref_rows, live, temperature, ref_logits is not None, ref_aligned, 1, logits.shape[-1])
    return parts[:, 0]


def _row_states(rows: RowLayout, ref_rows: RowLayout, live: torch.Tensor | None, temperature: float,
                has_ref: bool, ref_aligned: bool, splits: int, chunk: int) -> torch.Tensor:
    vocab = rows.tensor.shape[-1]
    parts = torch.empty((N_STATES, splits, rows.n_rows), dtype=torch.float32, device=rows.tensor.device)
    _row_states_kernel[(rows.n_rows, splits)](
        # data pointers
        rows.tensor, ref_rows.tensor, live, parts,
        # sizes, strides, scalars
        rows.n_rows, vocab, chunk, *rows[2:], *ref_rows[2:], 1.0 / temperature,
        # switches
        HAS_REF=has_ref, HAS_LIVE=live is not None, SPLITS=splits, BLOCK_V=_block_v(vocab), REF_ALIGNED=ref_aligned,
        num_warps=NUM_WARPS,
    )
    return parts


def logits_grad(logits: torch.Tensor, tokens: torch.Tensor, stats: torch.Tensor, grads: torch.Tensor,
                temperature: float, ref_logits: torch.Tensor | None = None,
                out: torch.Tensor | None = None, grad_scale: torch.Tensor | None = None) -> torch.Tensor:
    """Launches the backward kernel: d logits from per-row upstream gradients.

    stats: float32 (N_STATS, ...) from `token_stats_fwd` (the first rows of the policy-loss
    output are fine); grads: float32 (N_GRADS, ...) upstream gradients of logp, entropy and kl,
    times grad_scale (a 0-d float tensor, e.g. a summed loss's upstream gradient) when given.
    Returns a tensor of logits' shape and dtype; `out` receives it when given, and may be
    `logits` itself (each row is read before it is written). Logits (B, T + 1, V) of (B, T) tokens
    (rlops._layout.positions_of) get zeros at their last position.
    """
    shape = positions_of(logits, tokens)
    rows, ref_rows = row_layouts(logits, ref_logits, shape)
    out = torch.empty(logits.shape, dtype=logits.dtype, device=logits.device) if out is None else out
    dx_strides = grad_strides(out, logits, rows, shape)
    n = rows.n_rows
    if not n:
        zero_last_position(out, shape)  # no rows to read: only the last positions, if any, to write
    else:
        dx_rows = RowLayout(out, n, rows.inner, *dx_strides)
        stats, grads = leading_rows(stats, N_STATS, n), leading_rows(grads, N_GRADS, n)
        splits, chunk = vocab_splits(n, logits.shape[-1], logits.device)
        # A causal LM's (B, T + 1, V) logits: one program more per sequence zeroes its last position.
        n_last = out.shape[0] if shape != out.shape else 0
        last = ((out.shape[1] - 1) * out.stride(1), out.stride(0)) if n_last else (0, 0)  # offset, stride
        _token_stats_bwd_kernel[(n + n_last, splits)](
            # data pointers
            rows.tensor, ref_rows.tensor, flat(tokens), stats, grads, grad_scale, out,
            # sizes, strides, scalars
            n, logits.shape[-1], chunk, *rows[2:], *ref_rows[2:], *dx_strides, *last, 1.0 / temperature,
            # switches (the alignment ones: rows that stream in 16-byte vectors with the gradient's)
            HAS_REF=ref_logits is not None, BLOCK_V=_block_v(logits.shape[-1]), X_ALIGNED=same_alignment(dx_rows, rows),
            REF_ALIGNED=ref_logits is None or same_alignment(dx_rows, ref_rows), HAS_SCALE=grad_scale is not None,
            num_warps=NUM_WARPS,
        )
    return out
