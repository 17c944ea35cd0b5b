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


def byte_mask(mask: torch.Tensor) -> torch.Tensor:
    """A 0/1 mask of any dtype as uint8 (a free view of a bool mask)."""
    return mask.view(torch.uint8) if mask.dtype == torch.bool else (mask != 0).view(torch.uint8)


def cuda_ops():
    """torch.ops.rlops_cuda, the CUDA C++ twins of these kernels (csrc/), loaded or built on first use."""
    from .. import _cuda

    return _cuda.ops()


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
def softmax_row_stats(x_row, ref_row, V, inv_tau, HAS_REF: tl.constexpr, BLOCK_V: tl.constexpr):
    """One pass over a row of V logits: (lse, entropy, lse_ref, kl) of p = softmax(x * inv_tau).

    Keeps an online max m, sum-exp s and t = sum exp(z-m) * (z-m); t is relative to the running
    max so that the entropy log(s) - t/s has no cancellation between two large numbers (lse and
    E[z]). With HAS_REF it also streams the reference logits y (q = softmax(y * inv_tau)) and
    c = sum exp(z-m) * (z-y), giving KL(p || q) = c/s + lse_ref - lse; otherwise lse_ref = kl = 0.
    """
    m = tl.full([], FLOAT32_LOWEST, tl.float32)
    s = tl.zeros([], tl.float32)
    t = tl.zeros([], tl.float32)
    m_ref = tl.full([], FLOAT32_LOWEST, tl.float32)
    s_ref = tl.zeros([], tl.float32)
    c = tl.zeros([], tl.float32)
    for start in range(0, V, BLOCK_V):
        offs = start + tl.arange(0, BLOCK_V)
        in_row = offs < V
        z = tl.load(x_row + offs, mask=in_row, other=float("-inf")).to(tl.float32) * inv_tau
        m_new = tl.maximum(m, tl.max(z, 0))
        zm = z - m_new
        e = tl.exp(zm)
        shift = m - m_new
        alpha = tl.exp(shift)
        # Masked lanes and -inf logits have e = 0 and zm = -inf: they contribute 0, not NaN.
        t = alpha * (t + shift * s) + tl.sum(e * tl.where(e > 0, zm, 0.0), 0)
        s = alpha * s + tl.sum(e, 0)
        m = m_new
        if HAS_REF:
            y = tl.load(ref_row + offs, mask=in_row, other=float("-inf")).to(tl.float32) * inv_tau
            m_ref_new = tl.maximum(m_ref, tl.max(y, 0))
            s_ref = tl.exp(m_ref - m_ref_new) * s_ref + tl.sum(tl.exp(y - m_ref_new), 0)
            m_ref = m_ref_new
            c = alpha * c + tl.sum(e * tl.where(e > 0, z - y, 0.0), 0)
    log_s = tl.log(s)
    lse = m + log_s
    entropy = log_s - t / s
    lse_ref = 0.0
    kl = 0.0
    if HAS_REF:
        lse_ref = m_ref + tl.log(s_ref)
        kl = c / s + lse_ref - lse
    return lse, entropy, lse_ref, kl


@triton.jit
def softmax_row_grad(x_row, ref_row, dx_row, V, tok, lse, entropy, lse_ref, kl, g_logp, g_entropy, g_kl,
                     inv_tau, HAS_REF: tl.constexpr, BLOCK_V: tl.constexpr):
    """Writes one row of d/dx [g_logp * logp + g_entropy * H + g_kl * KL(p || q)]:

        (g_logp * (1[v == a] - p_v) - g_entropy * p_v * (log p_v + H)
         + g_kl * p_v * (log p_v - log q_v - KL)) * inv_tau

    A row whose three upstream gradients are all 0 (a masked token) is written as zeros without
    reading its logits.
    """
    if (g_logp == 0) & (g_entropy == 0) & (g_kl == 0):
        for start in range(0, V, BLOCK_V):
            offs = start + tl.arange(0, BLOCK_V)
            tl.store(dx_row + offs, tl.zeros([BLOCK_V], dx_row.dtype.element_ty), mask=offs < V)
    else:
        for start in range(0, V, BLOCK_V):
            offs = start + tl.arange(0, BLOCK_V)
            in_row = offs < V
            z = tl.load(x_row + offs, mask=in_row, other=float("-inf")).to(tl.float32) * inv_tau
            log_p = z - lse
            p = tl.exp(log_p)
            # Where a logit is -inf, p = 0 and log p = -inf: its terms are 0, not 0 * -inf = NaN.
            log_p = tl.where(p > 0, log_p, 0.0)
            coef = g_logp + g_entropy * (log_p + entropy)
            if HAS_REF:
                y = tl.load(ref_row + offs, mask=in_row, other=float("-inf")).to(tl.float32) * inv_tau
                coef -= g_kl * (log_p - tl.where(p > 0, y - lse_ref, 0.0) - kl)
            dz = tl.where(offs == tok, g_logp, 0.0) - p * coef
            tl.store(dx_row + offs, (dz * inv_tau).to(dx_row.dtype.element_ty), mask=in_row)
