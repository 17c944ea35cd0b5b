"""What the vocabulary-streaming Triton kernels share: block sizes, row offsets, a row's split into
a scalar head and tail around 16-byte vectors, the online softmax over one row, and one row's
gradient. The row layout itself is rlops/_layout.py (shared with the CUDA launchers)."""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from rlops.constants import ROW

# Lowest finite float32: a running max that starts here (not at -inf) keeps x - m = -inf, not
# -inf - -inf = NaN, for a block of -inf logits (e = 0 then).
FLOAT32_LOWEST = tl.constexpr(-3.4028234663852886e38)
LOG2E = tl.constexpr(1.4426950408889634)
# Two bf16 -inf in one 32-bit word (a masked load's fill in _tile).
BF16_PAIR_NEG_INF = tl.constexpr(0xFF80FF80)
# Logits per tile: at least one 16-byte vector of any dtype (16 one-byte elements), at most 4096.
MIN_BLOCK_V = tl.constexpr(16)
MAX_BLOCK_V = 4096
# Threads of a vocabulary-streaming program: the launchers' num_warps.
NUM_WARPS = 8
THREADS = tl.constexpr(NUM_WARPS * 32)

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
    """Logits per tile: the row rounded up to a power of two, at least MIN_BLOCK_V and at most
    MAX_BLOCK_V."""
    return min(max(triton.next_power_of_2(vocab), MIN_BLOCK_V.value), MAX_BLOCK_V)


# Small N: one program per row leaves a GPU idle when the rows are fewer than the programs it
# holds at once (SMs x CTAS_PER_SM). Then each row's vocabulary is split over several programs
# (at least SPLIT_MIN_LOGITS logits each, at most MAX_SPLITS of them, a power of two so that few
# variants compile); the forward merges their online-softmax states in the epilogue kernel, the
# backward needs no merge.
CTAS_PER_SM = 8  # the forward and backward loops at 32 registers (tests/test_compile.py)
SPLIT_MIN_LOGITS = 4 * MAX_BLOCK_V
MAX_SPLITS = 64
# The online-softmax state rows of a split (row_states): m, s, t, m_ref, s_ref, c.
N_STATES = 6
# Tests set this to split rows on the CPU interpreter, where no GPU says how many programs fit.
FORCED_PROGRAMS: int | None = None


@functools.cache
def _resident_programs(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count * CTAS_PER_SM


def resident_programs(device: torch.device) -> int:
    """Vocabulary-streaming programs the GPU of `device` holds at once (SMs x CTAS_PER_SM): one
    wave. 0 on a CPU (unless FORCED_PROGRAMS)."""
    if FORCED_PROGRAMS is not None:
        return FORCED_PROGRAMS
    return _resident_programs(device.index or 0) if device.type == "cuda" else 0


def vocab_splits(n_rows: int, vocab: int, device: torch.device) -> tuple[int, int]:
    """(splits, chunk): programs per row and the body elements each streams (a multiple of 16;
    MAX_BLOCK_V once that large). (1, vocab) when the rows alone fill the GPU, on a CPU, or when
    the vocabulary is too small to split."""
    programs = resident_programs(device)
    splits = 1
    while (splits < MAX_SPLITS and n_rows * splits * 2 <= programs
           and vocab >= 2 * splits * SPLIT_MIN_LOGITS):
        splits *= 2
    if splits == 1 or n_rows == 0:
        return 1, vocab
    chunk = -(-vocab // splits)
    granule = MAX_BLOCK_V if chunk >= MAX_BLOCK_V else 16
    return splits, -(-chunk // granule) * granule


def is_interpreted(kernel: object) -> bool:
    """True when the @triton.jit `kernel` (no wrapper: the launchers pass their switches) was built
    by Triton's CPU interpreter (TRITON_INTERPRET=1 at import)."""
    return type(kernel).__name__ == "InterpretedFunction"


def _major_minor(version: str) -> tuple[int, ...]:
    return tuple(int(part) for part in version.split(".")[:2])


def interpreter_problem(triton_version: str, numpy_version: str) -> str | None:
    """Why Triton's interpreter of this version cannot run the kernels with this NumPy, or None.
    Before Triton 3.7 it converts a loop bound to int with int() of a 1-element array, which NumPy
    2.4 refuses ("only 0-dimensional arrays can be converted to Python scalars")."""
    if _major_minor(triton_version) < (3, 7) and _major_minor(numpy_version) >= (2, 4):
        return (f"Triton {triton_version}'s interpreter (TRITON_INTERPRET=1) cannot run rlops' kernels with "
                f"NumPy {numpy_version}: it needs NumPy < 2.4 (pip install 'numpy<2.4') or Triton >= 3.7")
    return None


def prepare_interpreter() -> None:
    """Readies Triton's interpreter (TRITON_INTERPRET=1) for the kernels: raises ImportError where it
    cannot run them (interpreter_problem), then gives it the compiled kernels' tl.maximum and
    tl.minimum, which return the operand that is not NaN (PTX max.f32). Triton before 3.8
    interprets them with np.maximum / np.minimum, which return the NaN (fixed upstream in
    triton-lang/triton#10333). The kernels rely on it: the exact KL's guard max(x - y, lowest)
    turns the NaN of two masked -inf lanes into a 0 term; with the NaN kept, every exact KL the
    interpreter computed would be NaN. Only these two float ops change, only in the interpreter,
    and only before Triton 3.8 (later interpreters are left as they are)."""
    import numpy as np
    from triton.runtime.interpreter import InterpreterBuilder

    if (problem := interpreter_problem(triton.__version__, np.__version__)) is not None:
        raise ImportError(problem)
    if _major_minor(triton.__version__) >= (3, 8):
        return
    InterpreterBuilder.create_maxnumf = lambda self, lhs, rhs: self.binary_op(lhs, rhs, np.fmax)
    InterpreterBuilder.create_minnumf = lambda self, lhs, rhs: self.binary_op(lhs, rhs, np.fmin)


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
def row_body(row_ptr, head, ALIGNED: tl.constexpr, BLOCK_V: tl.constexpr):
    """row_ptr + head (row_head): where the row's 16-byte vectors start, marked 16-byte aligned
    when ALIGNED (the caller knows row_ptr + head is). The mark is left off for rows of at most
    MIN_BLOCK_V elements (BLOCK_V == MIN_BLOCK_V): there row_head stops at the row's end when the
    row ends before its first boundary, and a mark on the address would be false
    (rlops._interpreter.check_hints). Longer rows always reach the boundary (fewer than 16
    elements away), so their code is unchanged."""
    body = row_ptr + head
    if ALIGNED and BLOCK_V > MIN_BLOCK_V:
        body = tl.multiple_of(body, 16)
    return body


@triton.jit
def row_edges(head, n_body, n_edges, VEC: tl.constexpr):
    """The elements of a row outside its vector body [head, head + n_body): the head [0, head)
    and the tail [head + n_body, V), fewer than VEC each, as one block of 2 * VEC lanes
    (element indices and which lanes hold one). n_edges: V - n_body, or 0 for none of them
    (a vocabulary split other than the first)."""
    lane = tl.arange(0, 2 * VEC)
    return lane + tl.where(lane < head, 0, n_body), lane < n_edges


@triton.jit
def _update_groups(m, s, t, m_ref, s_ref, c, x, y, k, HAS_REF: tl.constexpr):
    """The online-softmax states of softmax_row_stats, one per group (axis 0 of the (groups, W,
    P, 2) tiles x and y: what one thread streams of a tile), after one more tile; masked lanes
    hold -inf.

    Each group's max, sums and rescaling stay within its thread: no shuffles or barriers in
    the loop. Per element: x - m exact, one exp2, and t's -inf guard as a max (NaN still reaches
    s through e)."""
    m_new = tl.maximum(m, _group_max(x))
    # Before a group's first finite logit (s = 0) nothing is held to rescale: shift 0 rather than
    # (lowest float - m_new) * k, which overflows to -inf (and 0 * -inf = NaN below).
    shift = tl.where(s > 0, m - m_new, 0.0)
    alpha = tl.exp2(shift * k)
    xm = x - m_new[:, None, None, None]
    e = tl.exp2(xm * k)
    # An -inf logit has e = 0 and xm = -inf: the max makes its term 0 * lowest = 0, not NaN.
    t = alpha * (t + shift * s) + _group_sum(e * tl.maximum(xm, FLOAT32_LOWEST))
    s = alpha * s + _group_sum(e)
    if HAS_REF:
        m_ref_new = tl.maximum(m_ref, _group_max(y))
        shift_ref = tl.where(s_ref > 0, m_ref - m_ref_new, 0.0)
        e_ref = tl.exp2((y - m_ref_new[:, None, None, None]) * k)
        s_ref = tl.exp2(shift_ref * k) * s_ref + _group_sum(e_ref)
        m_ref = m_ref_new
        c = alpha * c + _group_sum(e * tl.maximum(x - y, FLOAT32_LOWEST))
    return m_new, s, t, m_ref, s_ref, c


@triton.jit
def _group_max(x):
    return tl.max(tl.max(tl.max(x, 3), 2), 1)


@triton.jit
def _group_sum(x):
    return tl.sum(tl.sum(tl.sum(x, 3), 2), 1)


@triton.jit
def _merge_groups(m, s, t, m_ref, s_ref, c, k, HAS_REF: tl.constexpr):
    """One state from the groups' states (_update_groups): once per row."""
    m_row = tl.max(m, 0)
    shift = tl.where(s > 0, m - m_row, 0.0)
    alpha = tl.exp2(shift * k)
    t_row = tl.sum(alpha * (t + shift * s), 0)
    s_row = tl.sum(alpha * s, 0)
    m_ref_row = tl.max(m_ref, 0)
    s_ref_row = tl.zeros([], tl.float32)
    c_row = tl.zeros([], tl.float32)
    if HAS_REF:
        shift_ref = tl.where(s_ref > 0, m_ref - m_ref_row, 0.0)
        s_ref_row = tl.sum(tl.exp2(shift_ref * k) * s_ref, 0)
        c_row = tl.sum(alpha * c, 0)
    return m_row, s_row, t_row, m_ref_row, s_ref_row, c_row


@triton.jit
def _vectors(row_ptr, start, n, ALIGNED: tl.constexpr, PAIRS: tl.constexpr, MASKED: tl.constexpr,
             G: tl.constexpr):
    """G 16-byte vectors of the row from element start, one per group, as a (G, W, P) float32
    tile (-inf at n and past with MASKED): element start + (g * W + w) * P + p, so that a warp
    reads 32 consecutive vectors (with ALIGNED: a 16-byte aligned row_ptr + start).

    With PAIRS, bf16 pairs (P = 2) load as 32-bit words where aligned: the low and high halves
    shifted and masked into float32, one integer instruction per element where a bf16-to-float
    conversion takes 1.5."""
    ELEM_TY: tl.constexpr = row_ptr.dtype.element_ty
    P: tl.constexpr = 2 if PAIRS and tl.bfloat16 == ELEM_TY else 1
    W: tl.constexpr = 128 // ELEM_TY.primitive_bitwidth // P
    pair = tl.arange(0, G)[:, None] * W + tl.arange(0, W)[None, :]
    if P == 2 and ALIGNED:
        words = tl.multiple_of(row_ptr + start, 16).to(tl.pointer_type(tl.uint32))
        if MASKED:
            w = tl.load(words + pair, mask=2 * pair < n - start, other=BF16_PAIR_NEG_INF)
        else:
            w = tl.load(words + pair)
        lo = (w << 16).to(tl.float32, bitcast=True)
        hi = (w & 0xFFFF0000).to(tl.float32, bitcast=True)
        return tl.join(lo, hi)
    offs = start + pair[:, :, None] * P + tl.arange(0, P)[None, None, :]
    x = tl.load(row_ptr + offs, mask=offs < n, other=float("-inf")) if MASKED else tl.load(row_ptr + offs)
    return x.to(tl.float32)


@triton.jit
def _tile(row_ptr, start, n, ALIGNED: tl.constexpr, PAIRS: tl.constexpr, MASKED: tl.constexpr, G: tl.constexpr):
    """The (G, W, P, 2) float32 tile of 2 * G vectors from element start: each group's two
    vectors joined in its own registers (a tile laid out with a vector axis of its own, Triton
    3.6 may spread that axis over two threads, and the group sums would need shuffles)."""
    VEC: tl.constexpr = 128 // row_ptr.dtype.element_ty.primitive_bitwidth
    return tl.join(_vectors(row_ptr, start, n, ALIGNED, PAIRS, MASKED, G),
                   _vectors(row_ptr, start + G * VEC, n, ALIGNED, PAIRS, MASKED, G))


@triton.jit
def _stream_tile(m, s, t, m_ref, s_ref, c, x_body, ref_body, start, n, k, HAS_REF: tl.constexpr,
                 REF_ALIGNED: tl.constexpr, MASKED: tl.constexpr, G: tl.constexpr):
    """The groups' states after the body's tile of logits (and reference logits) from start.
    Reference rows read in scalars (not REF_ALIGNED) take the logits' tile in their element order
    (no bf16 pairs): the two then share one register layout, with no shuffle between them."""
    x = _tile(x_body, start, n, True, REF_ALIGNED, MASKED, G)
    y = x
    if HAS_REF:
        y = _tile(ref_body, start, n, REF_ALIGNED, REF_ALIGNED, MASKED, G)
    return _update_groups(m, s, t, m_ref, s_ref, c, x, y, k, HAS_REF)


@triton.jit
def _empty_groups(G: tl.constexpr):
    lowest = tl.full([G], FLOAT32_LOWEST, tl.float32)
    zero = tl.zeros([G], tl.float32)
    return lowest, zero, zero, lowest, zero, zero


@triton.jit
def _edge_tile(row_ptr, edge, in_edge):
    """The row's head and tail (row_edges) as a (2, VEC, 1, 1) float32 tile, -inf where not in_edge."""
    x = tl.load(row_ptr + edge, mask=in_edge, other=float("-inf")).to(tl.float32)
    return tl.reshape(x, [2, edge.shape[0] // 2, 1, 1])


@triton.jit
def softmax_row_stats(x_row, ref_row, V, inv_tau, HAS_REF: tl.constexpr, REF_ALIGNED: tl.constexpr,
                      BLOCK_V: tl.constexpr):
    """One pass over a row of V logits x: (m, log_s, entropy, lse_gap, kl) of p = softmax(x * inv_tau), and x_row.

    Works in the logits' own units, scaling only differences from the max: an online max m of
    x, s = sum exp((x-m) * inv_tau) and t = sum exp((x-m) * inv_tau) * (x-m). x - m is exact
    near the max, so none of these carry the rounding of x / tau at the logits' magnitude. Then
    log Z = m * inv_tau + log s, and entropy = log Z - sum p * x * inv_tau = log s - inv_tau * t/s.

    With HAS_REF it also streams the reference logits y (q = softmax(y * inv_tau)): m_ref, s_ref
    as above and c = sum exp((x-m) * inv_tau) * (x-y), giving lse_gap = lse - lse_ref =
    (m - m_ref) * inv_tau + (log s - log s_ref) and KL(p || q) = inv_tau * c/s - lse_gap;
    otherwise lse_gap = kl = 0.

    Each thread keeps these states for its own group of logits (two 16-byte vectors per tile) and
    the groups merge once after the loop, as csrc/token_stats.cu does per thread: the loop holds
    no block-wide reduction, and its whole tiles no masks. Whatever V and the row strides, the
    row streams in 16-byte vectors from its first 16-byte boundary (row_head), after one small
    tile holding the scalar head and tail (row_edges). The reference row streams in vectors too
    when REF_ALIGNED (the host found each of its rows as far from a 16-byte boundary as the
    logits row: rlops/_layout.py, same_alignment), else in scalars.

    Also returns x_row again, derived from the body's pointer: a caller that reads the row after
    the pass (sampled_logp) then keeps one pointer to it live through the loop, not two (a
    register pair that costs the policy-loss forward a CTA per SM on Triton 3.6).

    The pass is row_states over the whole row, then finish_row_stats; a row split over several
    programs (vocab_splits) merges their row_states with merged_row_stats instead.
    """
    k = inv_tau * LOG2E
    m, s, t, m_ref, s_ref, c, x_row = row_states(x_row, ref_row, V, k, 0, V, HAS_REF, REF_ALIGNED, BLOCK_V)
    m, log_s, entropy, lse_gap, kl = finish_row_stats(m, s, t, m_ref, s_ref, c, inv_tau, HAS_REF)
    return m, log_s, entropy, lse_gap, kl, x_row


@triton.jit
def row_states(x_row, ref_row, V, k, split, chunk, HAS_REF: tl.constexpr, REF_ALIGNED: tl.constexpr,
               BLOCK_V: tl.constexpr):
    """The online-softmax state (m, s, t, m_ref, s_ref, c: softmax_row_stats) of one vocabulary
    split of the row, and x_row: the body's elements [split * chunk, (split + 1) * chunk) from
    the row's first 16-byte boundary (chunk a multiple of 16), and with split 0 the head and tail
    too. k = inv_tau * log2(e)."""
    VEC: tl.constexpr = 128 // x_row.dtype.element_ty.primitive_bitwidth  # elements per 16 bytes
    G: tl.constexpr = min(BLOCK_V // (2 * VEC), THREADS)  # groups: one per thread, fewer for a small V
    TILE: tl.constexpr = 2 * G * VEC  # two 16-byte vectors per group

    # The head and tail first (split 0), as two groups (fewer than VEC elements each), merged
    # into one state that group 0 holds while the body streams.
    head = row_head(x_row, V)
    n_body = (V - head) // VEC * VEC
    edge, in_edge = row_edges(head, n_body, tl.where(split == 0, V - n_body, 0), VEC)
    x = _edge_tile(x_row, edge, in_edge)
    y = x
    if HAS_REF:
        y = _edge_tile(ref_row, edge, in_edge)
    m, s, t, m_ref, s_ref, c = _empty_groups(2)
    m, s, t, m_ref, s_ref, c = _update_groups(m, s, t, m_ref, s_ref, c, x, y, k, HAS_REF)
    m, s, t, m_ref, s_ref, c = _merge_groups(m, s, t, m_ref, s_ref, c, k, HAS_REF)
    first = tl.arange(0, G) == 0
    lowest = tl.full([G], FLOAT32_LOWEST, tl.float32)
    m, s, t = tl.where(first, m, lowest), tl.where(first, s, 0.0), tl.where(first, t, 0.0)
    m_ref, s_ref, c = tl.where(first, m_ref, lowest), tl.where(first, s_ref, 0.0), tl.where(first, c, 0.0)

    # The body: 16-byte aligned from its start and a multiple of VEC long, hints the compiler
    # cannot derive (the row's alignment is known only at run time); whole tiles, then the rest.
    x_body = row_body(x_row, head, True, BLOCK_V)
    ref_body = row_body(ref_row, head, HAS_REF and REF_ALIGNED, BLOCK_V)  # no reference: a stand-in never read
    lo = tl.multiple_of(split * chunk, 16)
    hi = tl.minimum(n_body, lo + chunk)
    n_whole = lo + tl.maximum(hi - lo, 0) // TILE * TILE
    for start in range(lo, n_whole, TILE):
        m, s, t, m_ref, s_ref, c = _stream_tile(m, s, t, m_ref, s_ref, c, x_body, ref_body, start, hi, k,
                                                HAS_REF, REF_ALIGNED, False, G)
    if n_whole < hi:
        m, s, t, m_ref, s_ref, c = _stream_tile(m, s, t, m_ref, s_ref, c, x_body, ref_body, n_whole, hi, k,
                                                HAS_REF, REF_ALIGNED, True, G)
    m, s, t, m_ref, s_ref, c = _merge_groups(m, s, t, m_ref, s_ref, c, k, HAS_REF)
    return m, s, t, m_ref, s_ref, c, x_body - head


@triton.jit
def finish_row_stats(m, s, t, m_ref, s_ref, c, inv_tau, HAS_REF: tl.constexpr):
    """(m, log_s, entropy, lse_gap, kl) of a row from its online-softmax state (softmax_row_stats)."""
    log_s = tl.log(s)
    entropy = log_s - inv_tau * t / s
    lse_gap = 0.0
    kl = 0.0
    if HAS_REF:
        lse_gap = (m - m_ref) * inv_tau + (log_s - tl.log(s_ref))
        kl = inv_tau * c / s - lse_gap
    return m, log_s, entropy, lse_gap, kl


@triton.jit
def store_row_states(part_ptr, N, row, split, m, s, t, m_ref, s_ref, c, SPLITS: tl.constexpr):
    """One split's state of a row into the (N_STATES, SPLITS, N) float32 buffer part_ptr."""
    at = part_ptr + split * N + row
    tl.store(at, m)
    tl.store(at + SPLITS * N, s)
    tl.store(at + 2 * SPLITS * N, t)
    tl.store(at + 3 * SPLITS * N, m_ref)
    tl.store(at + 4 * SPLITS * N, s_ref)
    tl.store(at + 5 * SPLITS * N, c)


@triton.jit
def merged_row_stats(part_ptr, N, row, inv_tau, HAS_REF: tl.constexpr, SPLITS: tl.constexpr):
    """(m, log_s, entropy, lse_gap, kl) of a row whose vocabulary splits stored their states
    (store_row_states): merged as softmax_row_stats merges its threads' states."""
    at = part_ptr + tl.arange(0, SPLITS) * N + row
    m, s, t = tl.load(at), tl.load(at + SPLITS * N), tl.load(at + 2 * SPLITS * N)
    m_ref, s_ref, c = tl.load(at + 3 * SPLITS * N), tl.load(at + 4 * SPLITS * N), tl.load(at + 5 * SPLITS * N)
    k = inv_tau * LOG2E
    m, s, t, m_ref, s_ref, c = _merge_groups(m, s, t, m_ref, s_ref, c, k, HAS_REF)
    return finish_row_stats(m, s, t, m_ref, s_ref, c, inv_tau, HAS_REF)
