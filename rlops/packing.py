"""Packed (padding-free) batches: the sequences of a batch concatenated into one row of N tokens.

Sequence boundaries travel as `cu_seqlens`, int32 or int64 (S+1,): 0, then the running sum of
the sequence lengths, ending at N (flash-attention's varlen convention; lengths 0 and 1 are
valid). Every op that couples the tokens of one sequence (the loss aggregations, sequence-level
ratios, GAE, group advantages, KL-shaped rewards) takes `cu_seqlens=`; with it, per-token
tensors are (N,) or (1, N) (Hugging Face's padding-free layout) and per-sequence ones (S,).

`Layout` is what the O(N) epilogues read: which tokens count and which sequence each belongs
to, one object for both layouts (each row of a padded (B, T) batch is a sequence).
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.distributed
from torch import Tensor

from ._validation import check_same_device, check_tensor, value_checks_enabled

INDEX_DTYPES = (torch.int32, torch.int64)


def check_cu_seqlens(cu_seqlens: object, n_tokens: int, like: Tensor, like_name: str = "logits") -> Tensor:
    """Checks cu_seqlens (S+1,) int32/int64 on like's device: 0 first, non-decreasing, n_tokens last.

    Returns it as int64. The dtype and shape are always checked; the values (three numbers read
    back to the host in one transfer) only when `value_checks_enabled` (CPU tensors, or
    RLOPS_CHECK=1 on other devices; never under torch.compile). Unchecked, a bad cu_seqlens gives
    wrong sums but never reads out of bounds (`Layout.of` clamps the sequence ids).
    """
    cu = check_tensor("cu_seqlens", cu_seqlens)
    if cu.dtype not in INDEX_DTYPES:
        raise TypeError(f"cu_seqlens must be an int32 or int64 tensor, got {cu.dtype}")
    if cu.dim() != 1 or cu.numel() < 1:
        raise ValueError(f"cu_seqlens must have shape (S + 1,) with S >= 0 sequences, got {tuple(cu.shape)}")
    check_same_device("cu_seqlens", cu, like, like_name)
    cu = cu.long()
    if not value_checks_enabled(cu):
        return cu
    first, last, step = (int(v) for v in torch.stack([cu[0], cu[-1], cu.diff().amin() if cu.numel() > 1
                                                       else cu.new_zeros(())]).tolist())
    if first != 0:
        raise ValueError(f"cu_seqlens must start at 0, got {first}")
    if step < 0:
        raise ValueError("cu_seqlens must be non-decreasing (sequence lengths >= 0), found a decrease of "
                         f"{-step}")
    if last != n_tokens:
        raise ValueError(f"cu_seqlens must end at the number of packed tokens N = {n_tokens} "
                         f"({like_name}' token dimension), got {last}")
    return cu


def cu_seqlens_from_lengths(lengths: Tensor) -> Tensor:
    """int32 (S+1,) cu_seqlens of sequences of the given lengths (S,) (any integer dtype)."""
    lengths = check_tensor("lengths", lengths)
    if lengths.dim() != 1 or lengths.is_floating_point() or lengths.dtype == torch.bool:
        raise ValueError(f"lengths must be an integer (S,) tensor, got {lengths.dtype} {tuple(lengths.shape)}")
    return torch.cat([lengths.new_zeros(1), lengths.cumsum(0)]).to(torch.int32)


def cu_seqlens_from_position_ids(position_ids: Tensor, num_sequences: int | None = None) -> Tensor:
    """int32 (S+1,) cu_seqlens from position ids (N,) or (1, N) that restart at 0 with every sequence.

    This is Hugging Face's padding-free convention (DataCollatorWithFlattening, TRL's
    padding_free). Finding S reads one number back from a CUDA tensor; give `num_sequences`
    (S, known to the collator) and nothing is read back.
    """
    position_ids = check_tensor("position_ids", position_ids)
    if position_ids.dim() == 2 and position_ids.shape[0] == 1:
        position_ids = position_ids[0]
    if position_ids.dim() != 1 or position_ids.is_floating_point() or position_ids.dtype == torch.bool:
        raise ValueError(f"position_ids must be an integer (N,) or (1, N) tensor, got {position_ids.dtype} "
                         f"{tuple(position_ids.shape)}")
    n = position_ids.numel()
    starts = position_ids == 0
    if n:
        starts[0] = True  # a batch that starts mid-sequence still starts a segment at token 0
    if num_sequences is None:
        first = starts.nonzero().squeeze(1)
    else:
        if isinstance(num_sequences, bool) or not isinstance(num_sequences, int) or num_sequences < 0:
            raise ValueError(f"num_sequences must be an int >= 0, got {num_sequences!r}")
        first = torch.nonzero_static(starts, size=num_sequences, fill_value=n).squeeze(1)
    return torch.cat([first, first.new_full((1,), n)]).to(torch.int32)


def pack(padded: Tensor, lengths: Tensor) -> Tensor:
    """The first lengths[b] entries of each row of a right-padded (B, T, ...) tensor, concatenated: (N, ...)."""
    keep = torch.arange(padded.shape[1], device=padded.device) < lengths.to(padded.device)[:, None]
    return padded[keep]


def unpack(packed: Tensor, cu_seqlens: Tensor, max_len: int, fill: float = 0) -> Tensor:
    """The inverse of `pack`: packed (N, ...) spread to right-padded rows (S, max_len, ...) filled with `fill`."""
    cu = cu_seqlens.long().to(packed.device)
    lengths = cu.diff()
    keep = torch.arange(max_len, device=packed.device) < lengths[:, None]
    out = packed.new_full((lengths.numel(), max_len, *packed.shape[1:]), fill)
    out[keep] = packed
    return out


class Layout(NamedTuple):
    """Which tokens count, and which sequence each belongs to.

    mask: bool, the per-token shape ((B, T), or (1, N) packed). seq_ids: None when each row
    is a sequence (padded), else int64 (N,) the sequence of each packed token. n_seqs: S (B
    when padded), a Python int known without reading the device. seq_group: None, or the
    torch.distributed process group whose ranks hold parts of the same sequences (context
    parallel, rlops.GlobalBatch.seq_group): `seq_totals` then sums each sequence over them.
    """

    mask: Tensor
    seq_ids: Tensor | None
    n_seqs: int
    seq_group: object = None

    @classmethod
    def of(cls, mask: Tensor, cu_seqlens: Tensor | None = None) -> Layout:
        """The layout of a checked bool mask, packed when cu_seqlens (int64 (S+1,)) is given.

        The sequence ids are clamped into [0, S - 1], so that a cu_seqlens whose values were not
        checked (`check_cu_seqlens` on a GPU without RLOPS_CHECK=1, or under torch.compile) gives
        wrong sums but never an out-of-bounds index: tokens past cu_seqlens[-1] join the last
        sequence. With S = 0 (and tokens, only possible with such a cu_seqlens) the tokens belong
        to no sequence: `seq_totals` ignores them and `per_token` gives them 0.
        """
        if cu_seqlens is None:
            return cls(mask, None, mask.shape[0] if mask.dim() else 1)
        n_seqs = cu_seqlens.numel() - 1
        positions = torch.arange(mask.numel(), device=mask.device)
        seq_ids = torch.searchsorted(cu_seqlens[1:], positions, right=True).clamp_(max=max(n_seqs - 1, 0))
        return cls(mask, seq_ids, n_seqs)

    def seq_totals(self, x: Tensor) -> Tensor:
        """Per-sequence sums (B,) or (S,) of x (mask's shape), over every rank of seq_group when it
        is set; differentiable."""
        if self.seq_ids is None:
            totals = x.sum(-1)
        elif self.n_seqs == 0:  # no sequence to add into (see `of`)
            totals = x.new_zeros(0) + 0 * x.sum()
        else:
            totals = x.new_zeros(self.n_seqs).index_add(0, self.seq_ids, x.reshape(-1))
        if self.seq_group is None:
            return totals
        return _SumOverRanks.apply(totals, self.seq_group)


    def per_token(self, per_seq: Tensor) -> Tensor:
        """Each token's value of its sequence from (B,) or (S,) values, broadcastable to mask's shape."""
        if self.seq_ids is None:
            return per_seq[:, None]
        if self.n_seqs == 0:  # tokens of no sequence (see `of`): 0, without indexing the empty per_seq
            return per_seq.new_zeros(self.mask.shape) + 0 * per_seq.sum()
        return per_seq[self.seq_ids].view(self.mask.shape)


class _SumOverRanks(torch.autograd.Function):
    """x summed over the ranks of a process group. A sequence's tokens on several ranks: its sum is
    every rank's part. The backward sums the gradient over the ranks too, so that each rank's
    tokens get the whole batch's gradient when the ranks' losses add up to the batch's
    (rlops.GlobalBatch). (torch.distributed.nn.functional.all_reduce, deprecated in torch 2.13.)"""

    @staticmethod
    def forward(ctx, x: Tensor, group: object) -> Tensor:
        ctx.group = group
        out = x.contiguous().clone()
        torch.distributed.all_reduce(out, group=group)
        return out

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor, None]:
        out = grad.contiguous().clone()
        torch.distributed.all_reduce(out, group=ctx.group)
        return out, None
