"""What the vocabulary-streaming Triton kernels share: block sizes, row offsets, a row's split into
a scalar head and tail around 16-byte vectors, the online softmax over one row, and one row's
gradient. The row layout itself is rlops/_layout.py (shared with the CUDA launchers)."""

from __future__ import annotations

import triton
import triton.language as tl

from rlops.constants import ROW

# Lowest finite float32: a running max that starts here (not at -inf) keeps x - m = -inf, not
# -inf - -inf = NaN, for a block of -inf logits (e = 0 then).
FLOAT32_LOWEST = tl.constexpr(-3.4028234663852886e38)
LOG2E = tl.constexpr(1.4426950408889634)
MAX_BLOCK_V = 4096

# Rows of the per-token output buffers (rlops/constants.py), as compile-time constants.
ROW_LOGP = tl.constexpr(ROW["logp"])
ROW_ENTROPY = tl.constexpr(ROW["entropy"])
ROW_KL = tl.constexpr(ROW["kl"])
ROW_MAX = tl.constexpr(ROW["max"])
ROW_LOG_SUM = tl.constexpr(ROW["log_sum"])
ROW_LSE_GAP = tl.constexpr(ROW["lse_gap"])
# The statistics rows (constants.STATS_ROWS) follow each other from here (store_stats).
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
def store_stats(out_ptr, N, row, logp, entropy, kl, m, log_s, lse_gap):
    """One token's statistics rows (constants.STATS_ROWS, consecutive from STATS_FIRST)."""
    store_rows(out_ptr, N, row, STATS_FIRST, logp, entropy, kl, m, log_s)
    tl.store(out_ptr + (STATS_FIRST + 5) * N + row, lse_gap)


@triton.jit
def sampled_logp(x_row, tokens_ptr, row, V, m, log_s, inv_tau):
    """log p of the row's sampled token, (x - m) * inv_tau - log_s with m the row's largest
    logit: x - m is exact near the max, so the result carries neither the rounding of x / tau
    nor that of lse = m / tau + log_s at the logits' magnitude. An id outside [0, V) (possible
    only when the host check is skipped, as under torch.compile) gives NaN rather than an
    out-of-bounds read."""
    tok = tl.load(tokens_ptr + row).to(tl.int64)
    in_vocab = (tok >= 0) & (tok < V)
    x_tok = tl.load(x_row + tl.where(in_vocab, tok, 0)).to(tl.float32)
    return tl.where(in_vocab, (x_tok - m) * inv_tau - log_s, float("nan"))


@triton.jit
def row_head(row_ptr, V):
    """Elements of the row at row_ptr in front of its first 16-byte boundary (at most V): the
    scalar head before the row's 16-byte vectors (csrc/token_stats.cu: head_len). Rows are
    element-aligned, as every torch tensor is."""
    ELEM: tl.constexpr = row_ptr.dtype.element_ty.primitive_bitwidth // 8
    misaligned = (row_ptr.to(tl.int64) & 15).to(tl.int32)
    return tl.minimum(((16 - misaligned) & 15) // ELEM, V)


@triton.jit
def row_edges(head, n_body, V, VEC: tl.constexpr):
    """The elements of a row outside its vector body [head, head + n_body): the head [0, head)
    and the tail [head + n_body, V), fewer than VEC each, as one block of 2 * VEC lanes
    (element indices and which lanes hold one)."""
    lane = tl.arange(0, 2 * VEC)
    return lane + tl.where(lane < head, 0, n_body), lane < V - n_body


@triton.jit
def _online_block(m, s, t, m_ref, s_ref, c, x, y, k, HAS_REF: tl.constexpr):
    """The online-softmax state of softmax_row_stats after one more block of logits x (and
    reference logits y with HAS_REF); masked lanes hold -inf."""
    m_new = tl.maximum(m, tl.max(x, 0))
    xm = x - m_new
    e = tl.exp2(xm * k)
    # Before the first finite logit (s = 0) nothing is held to rescale: shift 0 rather than
    # (lowest float - m_new) * k, which overflows to -inf (a NumPy warning in the interpreter).
    shift = tl.where(s > 0, m - m_new, 0.0)
    alpha = tl.exp2(shift * k)
    # Masked lanes and -inf logits have e = 0 and xm = -inf: they contribute 0, not NaN.
    t = alpha * (t + shift * s) + tl.sum(e * tl.where(e > 0, xm, 0.0), 0)
    s = alpha * s + tl.sum(e, 0)
    if HAS_REF:
        m_ref_new = tl.maximum(m_ref, tl.max(y, 0))
        shift_ref = tl.where(s_ref > 0, m_ref - m_ref_new, 0.0)
        s_ref = tl.exp2(shift_ref * k) * s_ref + tl.sum(tl.exp2((y - m_ref_new) * k), 0)
        m_ref = m_ref_new
        c = alpha * c + tl.sum(e * tl.where(e > 0, x - y, 0.0), 0)
    return m_new, s, t, m_ref, s_ref, c


@triton.jit
def softmax_row_stats(x_row, ref_row, V, inv_tau, HAS_REF: tl.constexpr, REF_ALIGNED: tl.constexpr,
                      BLOCK_V: tl.constexpr):
    """One pass over a row of V logits x: (m, log_s, entropy, lse_gap, kl) of p = softmax(x * inv_tau), and x_row.

    Works in the logits' own units, scaling only differences from the max: an online max m of
    x, s = sum exp((x-m) * inv_tau) and t = sum exp((x-m) * inv_tau) * (x-m). x - m is exact
    near the max, so nothing carries the rounding of x / tau at |x / tau| ~ 1e3 (small
    temperatures), and t relative to the running max keeps the entropy log(s) - inv_tau * t/s
    free of cancellation between two large numbers (lse and E[z]). lse = m * inv_tau + log s
    is returned as its two parts (constants.STATS_ROWS). With HAS_REF it also streams the
    reference logits y (q = softmax(y * inv_tau)) and c = sum exp((x-m) * inv_tau) * (x-y),
    giving lse_gap = lse - lse_ref = (m - m_ref) * inv_tau + (log s - log s_ref) and
    KL(p || q) = inv_tau * c/s - lse_gap; otherwise lse_gap = kl = 0.

    Whatever V and the row strides, the row streams in 16-byte vectors from its first 16-byte
    boundary (row_head), after one block holding the scalar head and tail (row_edges). The
    reference row streams in vectors too when REF_ALIGNED (the host found each of its rows as
    far from a 16-byte boundary as the logits row: rlops/_layout.py, same_alignment), else
    in scalars.

    Also returns x_row again, derived from the body's pointer: a caller that reads the row after
    the pass (sampled_logp) then keeps one pointer to it live through the loop, not two (a
    register pair that costs the policy-loss forward a CTA per SM on Triton 3.6).
    """
    k = inv_tau * LOG2E  # exp((x - m) * inv_tau) = exp2((x - m) * k): one multiply per logit
    m = tl.full([], FLOAT32_LOWEST, tl.float32)
    s = tl.zeros([], tl.float32)
    t = tl.zeros([], tl.float32)
    m_ref = tl.full([], FLOAT32_LOWEST, tl.float32)
    s_ref = tl.zeros([], tl.float32)
    c = tl.zeros([], tl.float32)
    VEC: tl.constexpr = 128 // x_row.dtype.element_ty.primitive_bitwidth  # elements per 16 bytes
    head = row_head(x_row, V)
    n_body = (V - head) // VEC * VEC
    edge, in_edge = row_edges(head, n_body, V, VEC)
    x_edge = tl.load(x_row + edge, mask=in_edge, other=float("-inf")).to(tl.float32)
    y_edge = x_edge
    if HAS_REF:
        y_edge = tl.load(ref_row + edge, mask=in_edge, other=float("-inf")).to(tl.float32)
    m, s, t, m_ref, s_ref, c = _online_block(m, s, t, m_ref, s_ref, c, x_edge, y_edge, k, HAS_REF)
    # The body: 16-byte aligned from its start and a multiple of VEC long, hints the compiler
    # cannot derive (the row's alignment is known only at run time).
    x_body = tl.multiple_of(x_row + head, 16)
    ref_body = ref_row + head
    if REF_ALIGNED:
        ref_body = tl.multiple_of(ref_body, 16)
    n_body = tl.multiple_of(n_body, VEC)
    for start in range(0, n_body, BLOCK_V):
        offs = start + tl.arange(0, BLOCK_V)
        in_row = offs < n_body
        x = tl.load(x_body + offs, mask=in_row, other=float("-inf")).to(tl.float32)
        y = x
        if HAS_REF:
            y = tl.load(ref_body + offs, mask=in_row, other=float("-inf")).to(tl.float32)
        m, s, t, m_ref, s_ref, c = _online_block(m, s, t, m_ref, s_ref, c, x, y, k, HAS_REF)
    log_s = tl.log(s)
    entropy = log_s - inv_tau * t / s
    lse_gap = 0.0
    kl = 0.0
    if HAS_REF:
        lse_gap = (m - m_ref) * inv_tau + (log_s - tl.log(s_ref))
        kl = inv_tau * c / s - lse_gap
    return m, log_s, entropy, lse_gap, kl, x_body - head
