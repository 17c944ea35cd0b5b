"""The chunks of the fused-linear loss (rlops/ops/linear_policy_loss.py): how many rows it projects at
once, and how a chunk's product is added into a float32 gradient accumulator."""

from __future__ import annotations

import functools

import torch
from torch import Tensor

from ._backend import TRITON_AVAILABLE

# A chunk's logits (and reference logits), hidden rows and their gradient fit in this.
CHUNK_BYTES = 256 * 2**20
MIN_CHUNK_ROWS = 128  # below this the projection's matmul runs far from peak


def default_chunk_rows(n_rows: int, hidden_size: int, vocab: int, elem_size: int, with_ref: bool,
                       wave: int = 0) -> int:
    """Rows per chunk: CHUNK_BYTES of chunk buffers, at least MIN_CHUNK_ROWS, at most n_rows; with
    `wave` (the programs the GPU holds at once, one per row: kernels/_common.py, resident_programs)
    whole waves of it: rounded down to whole waves, or up to one wave where that at most doubles
    the buffers (a chunk of less than a wave leaves the GPU idle in the vocabulary kernels)."""
    per_row = elem_size * (vocab * (2 if with_ref else 1) + 2 * hidden_size)
    rows = max(MIN_CHUNK_ROWS, CHUNK_BYTES // per_row)
    if wave and rows < n_rows:
        rows = rows // wave * wave if rows >= wave else (wave if wave * per_row <= 2 * CHUNK_BYTES else rows)
    return max(1, min(rows, n_rows))


def gpu_wave(x: Tensor) -> int:
    """The vocabulary kernels' wave on x's GPU (0 on a CPU, or without Triton)."""
    if not x.is_cuda or not TRITON_AVAILABLE:
        return 0
    from ..kernels._common import resident_programs

    return resident_programs(x.device)


@functools.cache
def _accumulate_variant(device_type: str) -> str:
    """How this device adds a bf16/fp16 product into a float32 buffer without rounding it first."""
    a = torch.tensor([[1.0, 2.0**-9]], device=device_type).to(torch.bfloat16)
    b = torch.ones(2, 1, device=device_type, dtype=torch.bfloat16)
    exact = 1.0 + 2.0**-9  # not representable in bf16: a rounded product loses it
    try:
        acc = torch.zeros(1, 1, device=device_type)
        torch.addmm(acc, a, b, out_dtype=torch.float32, out=acc)
        if acc.item() == exact:
            return "addmm-out"
    except (RuntimeError, NotImplementedError, TypeError):
        pass
    try:
        if torch.mm(a, b, out_dtype=torch.float32).item() == exact:
            return "mm-out-dtype"
    except (RuntimeError, NotImplementedError, TypeError):
        pass
    return "rounded"


def add_matmul(acc: Tensor, a: Tensor, b: Tensor) -> None:
    """acc += a @ b for a float32 accumulator, without rounding the product to a's dtype where possible."""
    if a.dtype == acc.dtype:
        acc.addmm_(a, b)
        return
    variant = _accumulate_variant(a.device.type)
    if variant == "addmm-out":
        torch.addmm(acc, a, b, out_dtype=acc.dtype, out=acc)
    elif variant == "mm-out-dtype":
        acc.add_(torch.mm(a, b, out_dtype=acc.dtype))
    else:
        acc.add_(torch.mm(a, b))
