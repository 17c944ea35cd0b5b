"""Per-token statistics of softmax(logits / tau) in one pass over the vocabulary (SPEC.md section 1).

    z = x / tau,  lse = logsumexp(z),  logp = z[a] - lse,  H = lse - sum_v softmax(z)_v z_v

and, given reference logits y, the exact KL(p || q) of section 3 with q = softmax(y / tau).

Forward: one program per row streams the row's logits once (plus the reference row for the
KL) and writes five float32 per row into stats (5, N): logp, entropy, kl, lse, lse_ref.
Backward: one program per row reads the row again (and the reference row) and writes its
gradient once, from per-row upstream gradients of logp, entropy and kl. Rows that a mask
excludes (forward) or whose upstream gradients are all zero (backward) are not read.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._common import (
    RowLayout,
    block_v,
    byte_mask,
    cuda_ops,
    row_layout,
    row_start,
    softmax_row_grad,
    softmax_row_stats,
)

N_STATS = 5  # rows of the stats buffer: logp, entropy, kl, lse, lse_ref
N_GRADS = 3  # rows of the upstream gradient buffer: logp, entropy, kl


@triton.jit
def _token_stats_fwd_kernel(
    x_ptr, ref_ptr, tokens_ptr, mask_ptr, stats_ptr,
    N, V, inner, stride_outer, stride_inner, ref_inner, ref_stride_outer, ref_stride_inner, inv_tau,
    HAS_REF: tl.constexpr, HAS_MASK: tl.constexpr, BLOCK_V: tl.constexpr,
):
    """Reads N*V logits once (2*N*V with HAS_REF) plus the token ids; writes 5 float32 per row."""
    row = tl.program_id(0)
    # torch.compile may pass Python floats as float64; the contract is float32 arithmetic.
    inv_tau = tl.cast(inv_tau, tl.float32)
    valid = True
    if HAS_MASK:
        valid = tl.load(mask_ptr + row) != 0
    if valid:
        x_row = x_ptr + row_start(row, inner, stride_outer, stride_inner)
        ref_row = ref_ptr + row_start(row, ref_inner, ref_stride_outer, ref_stride_inner)
        lse, entropy, lse_ref, kl = softmax_row_stats(x_row, ref_row, V, inv_tau, HAS_REF, BLOCK_V)
        # An id outside [0, V) (only possible when the host check is skipped under torch.compile)
        # gives NaN rather than an out-of-bounds read.
        tok = tl.load(tokens_ptr + row).to(tl.int64)
        in_vocab = (tok >= 0) & (tok < V)
        z_tok = tl.load(x_row + tl.where(in_vocab, tok, 0)).to(tl.float32) * inv_tau
        tl.store(stats_ptr + row, tl.where(in_vocab, z_tok - lse, float("nan")))
        tl.store(stats_ptr + N + row, entropy)
        tl.store(stats_ptr + 2 * N + row, kl)
        tl.store(stats_ptr + 3 * N + row, lse)
        tl.store(stats_ptr + 4 * N + row, lse_ref)
    else:
        for k in tl.static_range(5):
            tl.store(stats_ptr + k * N + row, 0.0)


@triton.jit
def _token_stats_bwd_kernel(
    x_ptr, ref_ptr, tokens_ptr, stats_ptr, grads_ptr, dx_ptr,
    N, V, inner, stride_outer, stride_inner, ref_inner, ref_stride_outer, ref_stride_inner,
    dx_stride_outer, dx_stride_inner, inv_tau,
    HAS_REF: tl.constexpr, BLOCK_V: tl.constexpr,
):
    """Reads N*V logits (2*N*V with HAS_REF) and writes N*V gradients, plus 8 scalars per row."""
    row = tl.program_id(0)
    inv_tau = tl.cast(inv_tau, tl.float32)
    x_row = x_ptr + row_start(row, inner, stride_outer, stride_inner)
    ref_row = ref_ptr + row_start(row, ref_inner, ref_stride_outer, ref_stride_inner)
    dx_row = dx_ptr + row_start(row, inner, dx_stride_outer, dx_stride_inner)
    entropy = tl.load(stats_ptr + N + row)
    kl = tl.load(stats_ptr + 2 * N + row)
    lse = tl.load(stats_ptr + 3 * N + row)
    lse_ref = tl.load(stats_ptr + 4 * N + row)
    g_logp = tl.load(grads_ptr + row)
    g_entropy = tl.load(grads_ptr + N + row)
    g_kl = tl.load(grads_ptr + 2 * N + row)
    tok = tl.load(tokens_ptr + row).to(tl.int64)
    softmax_row_grad(x_row, ref_row, dx_row, V, tok, lse, entropy, lse_ref, kl, g_logp, g_entropy, g_kl,
                     inv_tau, HAS_REF, BLOCK_V)


def ref_layout(ref_logits: torch.Tensor | None, logits: torch.Tensor) -> RowLayout:
    """The reference logits' rows, or the logits' own as a placeholder the kernel never reads."""
    if ref_logits is None:
        return row_layout(logits)
    if ref_logits.shape != logits.shape:
        raise ValueError(f"ref_logits must have logits' shape {tuple(logits.shape)}, got {tuple(ref_logits.shape)}")
    return row_layout(ref_logits)


def token_stats_fwd(
    logits: torch.Tensor,
    tokens: torch.Tensor,
    temperature: float = 1.0,
    ref_logits: torch.Tensor | None = None,
    mask: torch.Tensor | None = None,
    backend: str = "triton",
) -> torch.Tensor:
    """Launches the forward kernel (backend "triton", or "cuda" for its twin in csrc/).

    logits (..., V) float16/bfloat16/float32/float64 with any row strides; tokens (...) integer
    ids in [0, V); ref_logits (..., V) optional, for the exact KL; mask (...) optional, rows
    where it is 0 are skipped and get zeros. Returns float32 stats (5, ...): logp, entropy,
    kl (0 without ref_logits), lse, lse_ref.
    """
    if tokens.shape != logits.shape[:-1]:
        raise ValueError(f"tokens must have shape {tuple(logits.shape[:-1])}, got {tuple(tokens.shape)}")
    rows, ref_rows = row_layout(logits), ref_layout(ref_logits, logits)
    stats = torch.empty((N_STATS, *tokens.shape), dtype=torch.float32, device=logits.device)
    if rows.n_rows:
        vocab = logits.shape[-1]
        if mask is not None:
            mask = byte_mask(mask.reshape(-1))
        if backend == "cuda":
            cuda_ops().token_stats_fwd(
                rows.tensor, None if ref_logits is None else ref_rows.tensor, tokens.reshape(-1).to(torch.int64),
                mask, stats, rows.n_rows, vocab, *rows[2:], *ref_rows[2:], 1.0 / temperature)
            return stats
        _token_stats_fwd_kernel[(rows.n_rows,)](
            rows.tensor, ref_rows.tensor, tokens.reshape(-1), mask if mask is not None else tokens, stats,
            rows.n_rows, vocab, rows.inner, rows.stride_outer, rows.stride_inner,
            ref_rows.inner, ref_rows.stride_outer, ref_rows.stride_inner, 1.0 / temperature,
            HAS_REF=ref_logits is not None, HAS_MASK=mask is not None, BLOCK_V=block_v(vocab), num_warps=8,
        )
    return stats


def token_stats_bwd(
    logits: torch.Tensor,
    tokens: torch.Tensor,
    stats: torch.Tensor,
    grads: torch.Tensor,
    temperature: float = 1.0,
    ref_logits: torch.Tensor | None = None,
    out: torch.Tensor | None = None,
    backend: str = "triton",
) -> torch.Tensor:
    """Launches the backward kernel (backend "triton" or "cuda"): d logits from per-row upstream gradients.

    stats: float32 (5, ...) from `token_stats_fwd` (the first five rows of a larger buffer are
    fine); grads: float32 (3, ...) upstream gradients of logp, entropy and kl. Returns a tensor
    of logits' shape and dtype; `out` receives it when given, and may be `logits` itself (each
    row is read before it is written).
    """
    rows, ref_rows = row_layout(logits), ref_layout(ref_logits, logits)
    vocab = logits.shape[-1]
    if out is None:
        out = torch.empty(logits.shape, dtype=logits.dtype, device=logits.device)
    if out.shape != logits.shape or out.dtype != logits.dtype:
        raise ValueError(f"out must have logits' shape {tuple(logits.shape)} and dtype {logits.dtype}")
    if out.is_contiguous():
        dx_stride_outer, dx_stride_inner = rows.inner * vocab, vocab
    elif out is logits and rows.tensor is logits:
        dx_stride_outer, dx_stride_inner = rows.stride_outer, rows.stride_inner
    else:
        raise ValueError("out must be contiguous or be logits itself")
    n = rows.n_rows
    if n:
        stats = stats.reshape(-1, n)[:N_STATS].contiguous()
        grads = grads.reshape(N_GRADS, n).to(torch.float32).contiguous()
        if backend == "cuda":
            cuda_ops().token_stats_bwd(
                rows.tensor, None if ref_logits is None else ref_rows.tensor, tokens.reshape(-1).to(torch.int64),
                stats, grads, out, n, vocab, *rows[2:], *ref_rows[2:], dx_stride_outer, dx_stride_inner,
                1.0 / temperature)
            return out
        _token_stats_bwd_kernel[(n,)](
            rows.tensor, ref_rows.tensor, tokens.reshape(-1), stats, grads, out,
            n, vocab, rows.inner, rows.stride_outer, rows.stride_inner,
            ref_rows.inner, ref_rows.stride_outer, ref_rows.stride_inner,
            dx_stride_outer, dx_stride_inner, 1.0 / temperature,
            HAS_REF=ref_logits is not None, BLOCK_V=block_v(vocab), num_warps=8,
        )
    return out
