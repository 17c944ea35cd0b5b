"""How the kernel backends (Triton in kernels/, CUDA in csrc/) address their tensors.

Pure PyTorch, shared by the launchers of both backends so that they read the same memory
in the same way. Rows of a (..., V) tensor are addressed through two strides, so the usual
causal-LM slice `logits[:, :-1]` (rows not evenly spaced) is read in place, not copied.
"""

from __future__ import annotations

import functools
import math
from typing import TYPE_CHECKING, NamedTuple

import torch

from .constants import KL_KINDS, SAMPLED_KL

if TYPE_CHECKING:
    from .options import Epilogue, TokenInputs


class RowLayout(NamedTuple):
    """Row r of the flattened (N, V) view starts at (r // inner) * stride_outer + (r % inner) * stride_inner."""

    tensor: torch.Tensor
    n_rows: int
    inner: int
    stride_outer: int
    stride_inner: int


def row_layout(x: torch.Tensor, shape: tuple[int, ...] | None = None) -> RowLayout:
    """Describes the rows of x (..., V) with at most two strides; copies x only when that is impossible.

    shape: (B, T, V) to describe only the first T positions of x (B, T + 1, V) (a causal LM's
    logits: positions_of), without a view of them. The vocabulary dimension must be unit-stride
    for coalesced loads; other layouts are made contiguous (a copy, which no common caller triggers).
    """
    # Every launch of a forward and a backward asks this for the logits (and for the placeholder
    # reference): the strides are worked out once per (shape, strides), not on every call.
    shape = x.shape if shape is None else shape
    strides = _row_strides(shape, x.stride())
    if strides is None:  # no two strides describe the rows: a contiguous copy
        x = x.contiguous()
        strides = _row_strides(shape, x.stride())
        assert strides is not None  # a contiguous tensor's rows are evenly spaced
    return tuple.__new__(RowLayout, (x, *strides))  # RowLayout(x, *strides) without its Python __new__


@functools.lru_cache(maxsize=256)
def _row_strides(shape: tuple[int, ...], stride: tuple[int, ...]) -> tuple[int, int, int, int] | None:
    """(n_rows, inner, stride_outer, stride_inner) of `row_layout` for a tensor of this shape and
    stride, or None when x must be copied first (the vocabulary not unit-stride, or the rows
    needing more than two strides)."""
    vocab = shape[-1]
    if vocab > 1 and stride[-1] != 1:
        return None
    # Merge leading dimensions that are laid out back to back, dropping size-1 dimensions.
    dims: list[list[int]] = []
    for size, step in zip(shape[:-1], stride[:-1], strict=True):
        if size == 1:
            continue
        if dims and dims[-1][1] == step * size:
            dims[-1] = [dims[-1][0] * size, step]
        else:
            dims.append([size, step])
    if len(dims) > 2:
        return None
    n_rows = math.prod(shape) // vocab if vocab else 0
    if len(dims) == 0:
        return n_rows, 1, vocab, vocab
    if len(dims) == 1:
        return n_rows, n_rows, 0, dims[0][1]
    (_, s_outer), (inner, s_inner) = dims
    return n_rows, inner, s_outer, s_inner


def _strides_for(rows: tuple[int, int, int, int], inner: int) -> tuple[int, int] | None:
    """(stride_outer, stride_inner) of rows (n_rows, inner, stride_outer, stride_inner: a RowLayout
    without its tensor) with `inner` rows per outer step, when expressible."""
    n_rows, rows_inner, stride_outer, stride_inner = rows
    if rows_inner == inner or n_rows <= 1:
        return stride_outer, stride_inner
    if rows_inner >= n_rows:  # evenly spaced rows: row r at r * stride_inner
        return inner * stride_inner, stride_inner
    return None


def same_alignment(a: RowLayout, b: RowLayout) -> bool:
    """Whether every row of b starts as far from a 16-byte boundary as the same row of a (and
    holds elements of the same size), so that both stream in 16-byte vectors from the same
    element: kernels/_common.py, row_head. Exact for the layouts row_layout gives, unless both
    have two strides with different inner counts; False there unless every row of each is."""
    size = a.tensor.element_size()
    if b.tensor.element_size() != size or (a.tensor.data_ptr() - b.tensor.data_ptr()) % 16:
        return False
    return _same_row_offsets(size, a[1:], b[1:])


@functools.lru_cache(maxsize=256)
def _same_row_offsets(size: int, a: tuple[int, int, int, int], b: tuple[int, int, int, int]) -> bool:
    """same_alignment's test of the strides (its pointers start equally aligned): a pure function of
    the layouts' numbers, worked out once per layout pair (every backward launch asks it)."""
    a_rows, a_inner = a[0], a[1]
    inner = a_inner if a_inner < a_rows else b[1]
    strides_a, strides_b = _strides_for(a, inner), _strides_for(b, inner)
    if strides_a is None or strides_b is None:
        return all(all(size * st % 16 == 0 for st in rows[2:]) for rows in (a, b))
    outer_ok = a_rows <= inner or size * (strides_a[0] - strides_b[0]) % 16 == 0
    inner_ok = min(inner, a_rows) <= 1 or size * (strides_a[1] - strides_b[1]) % 16 == 0
    return outer_ok and inner_ok


def positions_of(logits: torch.Tensor, tokens: torch.Tensor) -> torch.Size:
    """The shape of the logits' rows a kernel reads: logits' own, except for (B, T + 1, V) logits of
    (B, T) tokens, a causal LM's from the prompt's last position, whose first T positions are read
    ((B, T, V)): the last predicts no token, and `logits_grad` writes zeros there."""
    shape, lshape = tokens.shape, logits.shape
    if len(lshape) == 3 and len(shape) == 2 and lshape[0] == shape[0] and lshape[1] == shape[1] + 1:
        return torch.Size((*shape, lshape[-1]))
    return lshape


def row_layouts(logits: torch.Tensor, ref_logits: torch.Tensor | None,
                shape: torch.Size | None = None) -> tuple[RowLayout, RowLayout]:
    """The rows of logits and of the reference logits (those of `shape`, positions_of), or the
    logits' own again as a placeholder the kernel never reads (no second `row_layout` call)."""
    rows = row_layout(logits, shape)
    if ref_logits is None:
        return rows, rows
    if ref_logits.shape != logits.shape and ref_logits.shape != shape:
        raise ValueError(f"ref_logits must have logits' shape {tuple(logits.shape)}, got {tuple(ref_logits.shape)}")
    return rows, row_layout(ref_logits, shape)


def grad_strides(out: torch.Tensor, logits: torch.Tensor, rows: RowLayout, shape: torch.Size) -> tuple[int, int]:
    """(stride_outer, stride_inner) of the gradient rows (of `shape`, positions_of) written into out,
    expressed with the logits' inner row count: out contiguous, the logits themselves, or any
    tensor whose rows two strides describe."""
    if out.shape != logits.shape or out.dtype != logits.dtype:
        raise ValueError(f"out must have logits' shape {tuple(logits.shape)} and dtype {logits.dtype}")
    out_rows = _row_strides(shape, out.stride())
    strides = None if out_rows is None else _strides_for(out_rows, rows.inner)
    if strides is None or out.stride(-1) != 1:
        raise ValueError("out must be contiguous, the logits themselves, or rows laid out as the logits' are")
    return strides


def zero_last_position(grad: torch.Tensor, shape: torch.Size) -> None:
    """Zeros at the position of a causal LM's logits that predicts no token (positions_of), if any:
    for the CUDA launcher (the Triton backward kernel writes them itself) and an empty T."""
    if grad.shape != shape:
        grad[:, -1].zero_()


def byte_mask(mask: torch.Tensor) -> torch.Tensor:
    """A 0/1 mask of any dtype as uint8 (a free view of a bool mask)."""
    return mask.view(torch.uint8) if mask.dtype == torch.bool else (mask != 0).view(torch.uint8)


def per_token(x: torch.Tensor | None, shape: torch.Size) -> torch.Tensor | None:
    """A per-token input broadcast to `shape`, as the contiguous float32 memory of N values the
    kernels read (their pointer is all they take: a contiguous tensor of `shape` is that vector)."""
    if x is None:
        return None
    if x.dtype == torch.float32 and x.shape == shape and x.is_contiguous():
        return x  # most inputs already are: no op at all
    return (x if x.dtype == torch.float32 else x.to(torch.float32)).expand(shape).contiguous()


def flat(x: torch.Tensor) -> torch.Tensor:
    """x's elements in contiguous memory, as a kernel that takes (N,) reads them: x itself when it is
    contiguous (a pointer is all a kernel takes, so a (B, T) tensor needs no (N,) view: a view per
    launch is host time), else a contiguous copy. (A reshape(-1) can be a strided view, which a
    kernel reading ptr + i would misread.)"""
    return x if x.is_contiguous() else x.contiguous()


def leading_rows(x: torch.Tensor, rows: int, n: int) -> torch.Tensor:
    """The first `rows` rows of x viewed as (R, n), as the contiguous float32 (rows, n) memory a kernel
    reads: x itself when it is contiguous float32 already (the kernel reads its first rows * n
    elements through the pointer), else a copy."""
    if x.dtype == torch.float32 and x.is_contiguous() and x.numel() >= rows * n:
        return x
    return x.reshape(-1, n)[:rows].to(torch.float32).contiguous()


def unit_stride(x: torch.Tensor) -> torch.Tensor:
    """x (B, T) with unit stride over T (a bool mask as uint8), copied only when needed."""
    x = x.view(torch.uint8) if x.dtype == torch.bool else x
    return x if x.stride(-1) == 1 or x.shape[-1] <= 1 else x.contiguous()


def check_policy_launch(logits: torch.Tensor, tokens: torch.Tensor, ref_logits: torch.Tensor | None,
                        inputs: TokenInputs, epilogue: Epilogue) -> torch.Size:
    """The launch contract of the policy-loss kernels (Triton and CUDA), checked before either runs;
    returns the shape of the logits' rows they read (positions_of)."""
    shape, positions = tokens.shape, positions_of(logits, tokens)
    if shape != positions[:-1] or inputs.agg_weights.shape != shape:
        raise ValueError(f"tokens and agg_weights must have shape {tuple(logits.shape[:-1])} (or one position "
                         "fewer)")
    kl_kind = epilogue.kl_kind
    if (kl_kind == _KL_FULL) != (ref_logits is not None):
        raise ValueError("ref_logits is needed exactly when the KL kind is 'full' (the exact KL)")
    if kl_kind in _SAMPLED_KL_KINDS and inputs.ref_logprobs is None:
        raise ValueError(f"the sampled-token KL kinds ({', '.join(SAMPLED_KL)}) need ref_logprobs")
    return positions


_KL_FULL = KL_KINDS["full"]
_SAMPLED_KL_KINDS = tuple(KL_KINDS[name] for name in SAMPLED_KL)
