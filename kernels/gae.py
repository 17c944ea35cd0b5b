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
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from rlops._layout import unit_stride

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


@triton.heuristics({"HAS_BOOT": lambda args: args["boot_ptr"] is not None})
@triton.jit
def _gae_kernel(
    # data pointers: rewards, values, mask, bootstrap values (None: HAS_BOOT follows); float32
    # advantages and returns (B, T)
    r_ptr, v_ptr, m_ptr, boot_ptr, adv_ptr, ret_ptr,
    # sizes
    T,
    # strides (rows; unit stride over time)
    r_stride, v_stride, m_stride,
    # scalars
    gamma, lam,
    # switches
    HAS_BOOT: tl.constexpr, BLOCK_T: tl.constexpr,
):
    """Reads rewards, values and mask once and writes float32 advantages and returns once."""
    row = tl.program_id(0).to(tl.int64)
    gamma = tl.cast(gamma, tl.float32)
    gamma_lam = gamma * tl.cast(lam, tl.float32)
    r_row = r_ptr + row * r_stride
    v_row = v_ptr + row * v_stride
    m_row = m_ptr + row * m_stride
    out_row = row * T
    next_value = tl.zeros([], tl.float32)
    if HAS_BOOT:
        next_value += tl.load(boot_ptr + row).to(tl.float32)
    next_adv = tl.zeros([], tl.float32)
    lane = tl.arange(0, BLOCK_T)
    for block in range(0, tl.cdiv(T, BLOCK_T)):
        offs = T - (block + 1) * BLOCK_T + lane  # the leftmost block may start before 0
        here = offs >= 0
        there = (offs + 1 >= 0) & (offs + 1 < T)
        valid = tl.load(m_row + offs, mask=here, other=0) != 0
        value = tl.load(v_row + offs, mask=here, other=0.0).to(tl.float32)
        reward = tl.load(r_row + offs, mask=here, other=0.0).to(tl.float32)
        valid_next = tl.load(m_row + offs + 1, mask=there, other=0) != 0
        value_next = tl.load(v_row + offs + 1, mask=there, other=0.0).to(tl.float32)

        # tl.where rather than products with the mask: NaN padding must not leak in.
        a = tl.where(valid_next, 0.0, 1.0)
        b = tl.where(valid_next, value_next, 0.0)
        a, b = tl.associative_scan((a, b), 0, _compose, reverse=True)
        upcoming_value = b + a * next_value
        delta = reward + gamma * upcoming_value - value
        a = tl.where(valid, gamma_lam, 1.0)
        b = tl.where(valid, delta, 0.0)
        a, b = tl.associative_scan((a, b), 0, _compose, reverse=True)
        adv = b + a * next_adv

        tl.store(adv_ptr + out_row + offs, tl.where(valid, adv, 0.0), mask=here)
        tl.store(ret_ptr + out_row + offs, tl.where(valid, adv + value, 0.0), mask=here)
        next_value = _first(upcoming_value, lane)
        next_adv = _first(adv, lane)


def gae_fwd(rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, bootstrap: torch.Tensor | None,
            gamma: float, lam: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Launches the GAE kernel.

    rewards, values (B, T) float (any float dtype, any row stride); mask (B, T) bool or 0/1;
    bootstrap (B,) float or None. Returns float32 (advantages, returns), each (B, T),
    0 where mask is 0.
    """
    if values.shape != rewards.shape or mask.shape != rewards.shape or rewards.dim() != 2:
        raise ValueError("rewards, values and mask must share one (B, T) shape")
    n_rows, n_time = rewards.shape
    adv = torch.empty((n_rows, n_time), dtype=torch.float32, device=rewards.device)
    ret = torch.empty_like(adv)
    if adv.numel():
        r, v, m = unit_stride(rewards), unit_stride(values), unit_stride(mask)
        _gae_kernel[(n_rows,)](
            # data pointers
            r, v, m, None if bootstrap is None else bootstrap.reshape(-1).contiguous(), adv, ret,
            # sizes, strides, scalars
            n_time, r.stride(0), v.stride(0), m.stride(0), gamma, lam,
            BLOCK_T=min(max(triton.next_power_of_2(n_time), 16), MAX_BLOCK_T), num_warps=4,
        )
    return adv, ret
