"""Vocabulary-parallel fused-linear statistics: `linear_policy_loss` and
`linear_token_logprobs_and_entropy` with vocab_group, the lm_head's rows split over the ranks of
a process group (Megatron's tensor-parallel layout).

Each rank passes the whole hidden states (replicated, (n, H)) and its rows of the lm_head, weight
(V_r, H) and bias (V_r,) for global ids [start, start + V_r); tokens are global ids. As in
rlops/ops/linear_policy_loss.py the logits never exist beyond one chunk of rows: the forward
projects each chunk and streams it into its 8 floats of online-softmax state per token
(rlops/vocab_parallel.py), then one all_gather for all rows (32 x world bytes per token, whatever
V) and the merge give the statistics of the whole vocabulary. The backward is the single-device
one on this shard (each chunk's logits recomputed, overwritten with their gradient, pushed
through the head), then one all-reduce of the hidden gradient (N x H).
"""

from __future__ import annotations

import functools

import torch
import torch.distributed as dist
from torch import Tensor

from ._validation import check_token_range
from .constants import ROW
from .ops.linear_policy_loss import _Chunks, _LinearStats, _project
from .options import Head
from .vocab_parallel import (
    N_GATHERED,
    VocabShard,
    _shard_states,
    gathered_stats,
    resolve,
    shard_grad,
    vocab_shard,
)


def local_ids(tokens: Tensor, local_vocab: int, group: object, vocab_start: object, backend: str,
              counted: Tensor | None = None) -> tuple[Tensor, VocabShard, str]:
    """Checks a vocabulary-parallel call and returns (tokens - start, this rank's shard, the backend).

    tokens: integer global ids (their dtype, shape and device checked by the caller), inside the
    whole vocabulary (when the shards are equal) where `counted`, bool of tokens' shape, is True.
    A local id outside [0, local_vocab) is another shard's token: no one-hot term here.
    backend: "auto" (returned as "triton" on CUDA tensors, "torch" on CPU), "triton" or "torch";
    "cuda" raises ValueError (the CUDA twins have no row-state kernel)."""
    shard = vocab_shard(group, local_vocab, vocab_start, backend)
    if shard.vocab is not None:
        check_token_range(tokens, shard.vocab, counted=counted)
    return tokens - shard.start, shard, resolve(backend, tokens)


class LinearShardStats(torch.autograd.Function):
    """Float32 (N_STATS, n) statistics of softmax((hidden @ W.T + b) / tau) over the whole vocabulary,
    from hidden (n, H) and this rank's rows of the head, weight (V_r, H) and bias (V_r,) or None;
    chunks as _LinearStats takes them, with local ids (`local_ids`) and chunks.shard set.

    The gradients then equal the single-device op's: weight's and bias's are this shard's, local;
    hidden's is the sum over the ranks of each shard's part, all-reduced in the backward, since
    hidden feeds every rank's shard (Megatron's copy_to_tensor_model_parallel_region: identity
    forward, all-reduce backward)."""

    @staticmethod
    def forward(ctx, hidden: Tensor, weight: Tensor, bias: Tensor | None, chunks: _Chunks) -> Tensor:
        n, head = hidden.shape[0], Head(weight, bias)
        states = torch.empty((N_GATHERED, n), dtype=torch.float32, device=hidden.device)
        for s in range(0, n, chunks.chunk):
            e = min(s + chunks.chunk, n)
            live = None if chunks.mask is None else chunks.mask[s:e]
            states[:, s:e] = _shard_states(_project(chunks.rows(hidden, s, e), head), chunks.ref_logits(s, e),
                                           chunks.tokens[s:e], live, chunks.temperature, chunks.backend)
        # One collective for all rows, after the loop: O(n) floats whatever the vocabulary.
        stats = gathered_stats(states, chunks.shard, chunks.temperature, chunks.ref is not None, chunks.mask)
        ctx.save_for_backward(hidden, weight, bias, stats)
        ctx.chunks, ctx.logits_grad = chunks, functools.partial(shard_grad, backend=chunks.backend)
        ctx.mark_non_differentiable(stats[ROW["max"]:])
        return stats

    @staticmethod
    def backward(ctx, grad_stats: Tensor) -> tuple:
        grad_hidden, grad_weight, grad_bias, _ = _LinearStats.backward(ctx, grad_stats)
        if grad_hidden is not None:
            dist.all_reduce(grad_hidden, group=ctx.chunks.shard.group)
        return grad_hidden, grad_weight, grad_bias, None
