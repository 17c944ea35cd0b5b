"""Generalised advantage estimation as a reverse scan over time (SPEC.md section 5).

Per row, with m_t the mask (1 = a response token), GAE is two linear recurrences run from
the end of the row, each of the form h_t = b_t + a_t * h_{t+1}:

    E_t = m_{t+1} V_{t+1} + (1 - m_{t+1}) E_{t+1}     the value at the next valid position
    delta_t = r_t + gamma * E_t - V_t
    A_t = m_t (delta_t + gamma * lam * A_{t+1}) + (1 - m_t) A_{t+1}

so masked positions carry both running values through, E starts from the bootstrap value
(or 0) and A from 0. One program per row walks its blocks of BLOCK_T steps from the end;
within a block both recurrences are associative scans of the affine maps x -> a x + b, so
a long row is a few dozen parallel block steps instead of T serial ones.

A packed batch (sequences concatenated into one row of N tokens, `cu_seqlens` (S+1,)) is the
same scan with a restart at every boundary: at the last token t of a sequence the maps become
E_t = bootstrap (a = 0) and A_t = m_t delta_t (a = 0), so nothing flows from one sequence into
the one before it. One program takes seqs_per_prog consecutive sequences (about BLOCK_T tokens
of them on average: short sequences share a program, long ones get one each) and walks their
tokens from the end as one row; the per-token sequence ids (rlops.packing.Layout, one
searchsorted of cu_seqlens) mark the boundaries and index the bootstrap values. Either layout
is one launch of the kernel for the whole batch, with no read-back of the lengths.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from rlops._layout import unit_stride
from rlops.packing import Layout

MAX_BLOCK_T = 1024


@triton.jit
def _compose(a1, b1, a2, b2):
    # Scanning with reverse=True, (a1, b1) is the map accumulated from the right: the result
    # applies (a2, b2) after it, giving h_t = b_t + a_t * h_{t+1}.
    return a1 * a2, b1 * a2 + b2


@triton.jit
def _first(x, lane):
    """The block's first element, as a scalar (the carry into the block on its left)."""
    return tl.sum(tl.where(lane == 0, x, 0.0), 0)


@triton.jit
def _gae_kernel(
    # data pointers: rewards, values, mask, bootstrap values (or None: HAS_BOOT); packed batches
    # only (else None: PACKED): cu_seqlens (S+1,) and the sequence of each token (N,), int64;
    # float32 advantages and returns (B, T) or (N,)
    r_ptr, v_ptr, m_ptr, boot_ptr, cu_ptr, seq_ptr, adv_ptr, ret_ptr,
    # sizes: the row length (N when packed); packed: S and the sequences per program
    T, n_seqs, seqs_per_prog,
    # strides (rows; unit stride over time)
    r_stride, v_stride, m_stride,
    # scalars
    gamma, lam,
    # switches
    HAS_BOOT: tl.constexpr, PACKED: tl.constexpr, BLOCK_T: tl.constexpr,
):
    """Reads rewards, values and mask once (and a packed batch's sequence ids) and writes float32
    advantages and returns once."""
    pid = tl.program_id(0).to(tl.int64)
    gamma = tl.cast(gamma, tl.float32)
    gamma_lam = gamma * tl.cast(lam, tl.float32)
    next_value = tl.zeros([], tl.float32)
    if PACKED:
        # Sequences [first, first + seqs_per_prog): tokens [start, start + length), clamped to [0, N)
        # so that a cu_seqlens left unchecked (under torch.compile) never addresses outside the row.
        first = pid * seqs_per_prog
        start = tl.minimum(tl.maximum(tl.load(cu_ptr + first), 0), T)
        end = tl.load(cu_ptr + tl.minimum(first + seqs_per_prog, n_seqs))
        length = tl.minimum(tl.maximum(end, start), T) - start
        r_row, v_row, m_row, seq_row = r_ptr + start, v_ptr + start, m_ptr + start, seq_ptr + start
        out_row = start
    else:
        length = T
        r_row = r_ptr + pid * r_stride
        v_row = v_ptr + pid * v_stride
        m_row = m_ptr + pid * m_stride
        out_row = pid * T
        if HAS_BOOT:
            next_value += tl.load(boot_ptr + pid).to(tl.float32)
    next_adv = tl.zeros([], tl.float32)
    lane = tl.arange(0, BLOCK_T)
    for block in range(0, tl.cdiv(length, BLOCK_T)):
        offs = length - (block + 1) * BLOCK_T + lane  # the leftmost block may start before 0
        here = offs >= 0
        there = (offs + 1 >= 0) & (offs + 1 < length)
        valid = tl.load(m_row + offs, mask=here, other=0) != 0
        value = tl.load(v_row + offs, mask=here, other=0.0).to(tl.float32)
        reward = tl.load(r_row + offs, mask=here, other=0.0).to(tl.float32)
        valid_next = tl.load(m_row + offs + 1, mask=there, other=0) != 0
        value_next = tl.load(v_row + offs + 1, mask=there, other=0.0).to(tl.float32)

        # tl.where rather than products with the mask: NaN padding must not leak in.
        a = tl.where(valid_next, 0.0, 1.0)
        b = tl.where(valid_next, value_next, 0.0)
        if PACKED:
            # A sequence's last token: the next token starts another sequence (or the range ends).
            seq = tl.load(seq_row + offs, mask=here, other=0)
            last = tl.load(seq_row + offs + 1, mask=there, other=-1) != seq
            boot = 0.0
            if HAS_BOOT:
                boot = tl.load(boot_ptr + tl.minimum(seq, n_seqs - 1), mask=here & last, other=0.0).to(tl.float32)
            a = tl.where(last, 0.0, a)
            b = tl.where(last, boot, b)
        a, b = tl.associative_scan((a, b), 0, _compose, reverse=True)
        upcoming_value = b + a * next_value
        delta = reward + gamma * upcoming_value - value
        a = tl.where(valid, gamma_lam, 1.0)
        if PACKED:
            a = tl.where(last, 0.0, a)
        b = tl.where(valid, delta, 0.0)
        a, b = tl.associative_scan((a, b), 0, _compose, reverse=True)
        adv = b + a * next_adv

        tl.store(adv_ptr + out_row + offs, tl.where(valid, adv, 0.0), mask=here)
        tl.store(ret_ptr + out_row + offs, tl.where(valid, adv + value, 0.0), mask=here)
        next_value = _first(upcoming_value, lane)
        next_adv = _first(adv, lane)


def _block_t(n_time: int) -> int:
    return min(max(triton.next_power_of_2(n_time), 16), MAX_BLOCK_T)


def gae_fwd(rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, bootstrap: torch.Tensor | None,
            gamma: float, lam: float, cu_seqlens: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Launches the GAE kernel, once for the whole batch.

    Padded (cu_seqlens None): rewards, values (B, T) float (any float dtype, any row stride); mask
    (B, T) bool or 0/1; bootstrap (B,) float or None. Packed: rewards, values and mask (N,) or
    (1, N), cu_seqlens int64 (S+1,) (checked: rlops.packing.check_cu_seqlens), bootstrap (S,) or
    None. Returns float32 (advantages, returns) of rewards' shape, 0 where mask is 0.
    """
    if values.shape != rewards.shape or mask.shape != rewards.shape:
        raise ValueError("rewards, values and mask must share one shape")
    # Packed: zeros, so that tokens an unchecked bad cu_seqlens leaves out of every sequence read 0.
    alloc = torch.empty if cu_seqlens is None else torch.zeros
    adv = alloc(rewards.shape, dtype=torch.float32, device=rewards.device)
    ret = torch.zeros_like(adv) if cu_seqlens is not None else torch.empty_like(adv)
    boot = None if bootstrap is None else bootstrap.reshape(-1).contiguous()
    if cu_seqlens is not None:
        if rewards.dim() != 1 and (rewards.dim() != 2 or rewards.shape[0] != 1):
            raise ValueError("packed rewards, values and mask must be (N,) or (1, N)")
        n_tokens, n_seqs = rewards.numel(), cu_seqlens.numel() - 1
        if n_tokens and n_seqs:
            r, v, m = (unit_stride(x.reshape(-1)) for x in (rewards, values, mask))
            cu = cu_seqlens.to(torch.int64).contiguous()
            seq_ids = Layout.of(m, cu).seq_ids  # int64 (N,): one searchsorted, read by the kernel
            block = _block_t(n_tokens)
            # About BLOCK_T tokens per program: short sequences share one, long ones get one each.
            per_prog = max(1, block * n_seqs // n_tokens)
            _gae_kernel[(triton.cdiv(n_seqs, per_prog),)](
                r, v, m, boot, cu, seq_ids, adv, ret,
                n_tokens, n_seqs, per_prog, 1, 1, 1, gamma, lam,
                HAS_BOOT=boot is not None, PACKED=True, BLOCK_T=block, num_warps=4,
            )
        return adv, ret
    if rewards.dim() != 2:
        raise ValueError("rewards, values and mask must share one (B, T) shape")
    n_rows, n_time = rewards.shape
    if adv.numel():
        r, v, m = unit_stride(rewards), unit_stride(values), unit_stride(mask)
        _gae_kernel[(n_rows,)](
            # data pointers
            r, v, m, boot, None, None, adv, ret,
            # sizes, strides, scalars
            n_time, n_rows, 1, r.stride(0), v.stride(0), m.stride(0), gamma, lam,
            # switches
            HAS_BOOT=boot is not None, PACKED=False, BLOCK_T=_block_t(n_time), num_warps=4,
        )
    return adv, ret
