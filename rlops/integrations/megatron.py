"""Drop-ins for verl's Megatron path (verl 0.9.1, verl/utils/megatron/tensor_parallel.py):
log-probs and entropy of logits split over the vocabulary across the tensor-parallel ranks.

Each rank passes its contiguous shard of the vocabulary, (..., V / tp), shards in rank order;
labels are global ids. rlops streams each shard once and all-gathers 8 floats per token
(rlops/vocab_parallel.py), where verl's functions all-reduce three (N, 1) statistics and keep
float32 copies of the shard (its entropy's softmax, Megatron's cross-entropy's exp-logits). The
group is Megatron's tensor-parallel group when megatron.core is importable, else the `group`
passed in.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .. import vocab_parallel


def tensor_parallel_group(group: object = None) -> object:
    """`group` when given, else Megatron's tensor-model-parallel group."""
    if group is not None:
        return group
    try:
        from megatron.core import parallel_state
    except ImportError as e:
        raise ValueError("pass group=, the tensor-parallel process group: megatron.core is not importable "
                         "here, so its parallel_state cannot provide one") from e
    return parallel_state.get_tensor_model_parallel_group()


def vocab_parallel_log_probs_from_logits(logits: Tensor, labels: Tensor, *, group: object = None,
                                         backend: str = "auto") -> Tensor:
    """verl's vocab_parallel_log_probs_from_logits (-Megatron's vocab_parallel_cross_entropy):
    logits (..., V / tp) this rank's shard, labels (...) global ids; float32 log-probs (...)."""
    logp, _ = vocab_parallel.token_logprobs_and_entropy(logits, labels, 1.0, backend, tensor_parallel_group(group),
                                                        None, tokens_name="labels")
    return logp


def vocab_parallel_entropy(vocab_parallel_logits: Tensor, *, group: object = None, backend: str = "auto") -> Tensor:
    """verl's vocab_parallel_entropy: the entropy (...) of logits (..., V / tp) sharded over the
    tensor-parallel ranks, float32. Unlike verl's, it never modifies the logits."""
    tokens = torch.zeros(vocab_parallel_logits.shape[:-1], dtype=torch.long, device=vocab_parallel_logits.device)
    _, entropy = vocab_parallel.token_logprobs_and_entropy(vocab_parallel_logits, tokens, 1.0, backend,
                                                           tensor_parallel_group(group), None)
    return entropy
