"""What the vocabulary-streaming Triton kernels share: block sizes, row offsets, the online softmax
over one row, and one row's gradient. The row layout itself is rlops/_layout.py (shared with
the CUDA launchers)."""

from __future__ import annotations

import triton
import triton.language as tl

from rlops.constants import ROW

# Lowest finite float32: a running max that starts here (not at -inf) makes the rescale
# factor exp(m_old - m_new) = exp(0) for a block of -inf logits instead of exp(nan).
FLOAT32_LOWEST = tl.constexpr(-3.4028234663852886e38)
MAX_BLOCK_V = 4096

# Rows of the per-token output buffers (rlops/constants.py), as compile-time constants.
ROW_LOGP = tl.constexpr(ROW["logp"])
ROW_ENTROPY = tl.constexpr(ROW["entropy"])
ROW_KL = tl.constexpr(ROW["kl"])
ROW_LSE = tl.constexpr(ROW["lse"])
ROW_LSE_REF = tl.constexpr(ROW["lse_ref"])
# The statistics rows logp, entropy, kl, lse, lse_ref follow each other from here (store_rows).
STATS_FIRST = tl.constexpr(ROW["logp"])


def block_v(vocab: int) -> int:
    return min(triton.next_power_of_2(vocab), MAX_BLOCK_V)


def is_interpreted(kernel: object) -> bool:
    """True when `kernel` was built by Triton's CPU interpreter (TRITON_INTERPRET=1 at import)."""
    while type(kernel).__name__ in ("Heuristics", "Autotuner"):  # decorators keep the kernel in .fn
        kernel = kernel.fn
    return type(kernel).__name__ == "InterpretedFunction"


@triton.jit
def row_start(row, inner, stride_outer, stride_inner):
    """Element offset of a row, in int64 since N * V exceeds 2**31 for real vocabularies."""
    row = row.to(tl.int64)
    return (row // inner) * stride_outer + (row % inner) * stride_inner


@triton.jit
def store_rows(out_ptr, N, row, FIRST: tl.constexpr, v0, v1, v2, v3, v4):
    """One token's values of five consecutive output rows FIRST.. FIRST+4 (constants.POLICY_ROWS order)."""
    tl.store(out_ptr + FIRST * N + row, v0)
    tl.store(out_ptr + (FIRST + 1) * N + row, v1)
    tl.store(out_ptr + (FIRST + 2) * N + row, v2)
    tl.store(out_ptr + (FIRST + 3) * N + row, v3)
    tl.store(out_ptr + (FIRST + 4) * N + row, v4)


@triton.jit
def sampled_logp(x_row, tokens_ptr, row, V, lse, inv_tau):
    """log p of the row's sampled token. An id outside [0, V) (possible only when the host check
    is skipped, as under torch.compile) gives NaN rather than an out-of-bounds read."""
    tok = tl.load(tokens_ptr + row).to(tl.int64)
    in_vocab = (tok >= 0) & (tok < V)
    z_tok = tl.load(x_row + tl.where(in_vocab, tok, 0)).to(tl.float32) * inv_tau
    return tl.where(in_vocab, z_tok - lse, float("nan"))


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
