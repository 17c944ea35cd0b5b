"""Pieces shared by the vocabulary-sized kernels: row layout, block sizes, the online softmax.

Rows of a (..., V) logits tensor are addressed through two strides, so the usual causal-LM
slice `logits[:, :-1]` (rows not evenly spaced) is read in place instead of being copied.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import triton
import triton.language as tl

# Lowest finite float32: a running max that starts here (not at -inf) makes the rescale
# factor exp(m_old - m_new) = exp(0) for a block of -inf logits instead of exp(nan).
FLOAT32_LOWEST = tl.constexpr(-3.4028234663852886e38)

MAX_BLOCK_V = 4096


class RowLayout(NamedTuple):
    """Row r of the flattened (N, V) view starts at (r // inner) * stride_outer + (r % inner) * stride_inner."""

    tensor: torch.Tensor
    n_rows: int
    inner: int
    stride_outer: int
    stride_inner: int


def row_layout(x: torch.Tensor) -> RowLayout:
    """Describes the rows of x (..., V) with at most two strides; copies x only when that is impossible.

    The vocabulary dimension must be unit-stride for coalesced loads; other layouts are made
    contiguous (a copy, which no common caller triggers).
    """
    vocab = x.shape[-1]
    if vocab > 1 and x.stride(-1) != 1:
        x = x.contiguous()
    # Merge leading dimensions that are laid out back to back, dropping size-1 dimensions.
    dims: list[list[int]] = []
    for size, stride in zip(x.shape[:-1], x.stride()[:-1], strict=True):
        if size == 1:
            continue
        if dims and dims[-1][1] == stride * size:
            dims[-1] = [dims[-1][0] * size, stride]
        else:
            dims.append([size, stride])
    if len(dims) > 2:
        x = x.contiguous()
        return row_layout(x)
    n_rows = x.numel() // vocab if vocab else 0
    if len(dims) == 0:
        return RowLayout(x, n_rows, 1, vocab, vocab)
    if len(dims) == 1:
        return RowLayout(x, n_rows, n_rows, 0, dims[0][1])
    (_, s_outer), (inner, s_inner) = dims
    return RowLayout(x, n_rows, inner, s_outer, s_inner)


def block_v(vocab: int) -> int:
    return min(triton.next_power_of_2(vocab), MAX_BLOCK_V)


def is_interpreted(kernel: object) -> bool:
    """True when `kernel` was built by Triton's CPU interpreter (TRITON_INTERPRET=1 at import)."""
    return type(kernel).__name__ == "InterpretedFunction"


@triton.jit
def row_start(row, inner, stride_outer, stride_inner):
    """Element offset of a row, in int64 since N * V exceeds 2**31 for real vocabularies."""
    row = row.to(tl.int64)
    return (row // inner) * stride_outer + (row % inner) * stride_inner


@triton.jit
def online_softmax_update(z, m, s, t):
    """Folds one block of scaled logits z into the running (max m, sum-exp s, sum exp*(z-m) t).

    t is kept relative to the running max so that the entropy log(s) - t/s has no
    cancellation between two large numbers (lse and E[z]).
    """
    m_new = tl.maximum(m, tl.max(z, 0))
    zm = z - m_new
    e = tl.exp(zm)
    shift = m - m_new
    alpha = tl.exp(shift)
    # Masked lanes and -inf logits have e = 0 and zm = -inf; their true contribution is 0, not NaN.
    t = alpha * (t + shift * s) + tl.sum(e * tl.where(e > 0, zm, 0.0), 0)
    s = alpha * s + tl.sum(e, 0)
    return m_new, s, t
