"""Eager PyTorch code as the frameworks write it: the yardstick for tests and benchmarks.

These restate, in plain PyTorch and without the frameworks' own fused fast paths, what TRL
and verl compute. They are what rlops replaces, so the benchmarks time them, and the bf16
tolerance of SPEC.md section 6 ("no more than 2x the error of PyTorch eager on the same
low-precision input") is measured against them.

Sources:
- TRL v1.16.0, trl/trainer/utils.py: `selective_log_softmax` (eager branch: gather minus a
  per-row logsumexp for float32/float64, per-row log_softmax for half types) and
  `entropy_from_logits` (log_softmax over chunks of 128 rows, -sum(exp(logp) * logp)).
- verl, verl/utils/torch_functional.py: `logprobs_from_logits_v2` (same algorithm as TRL's)
  and `entropy_from_logits` (logsumexp(logits) - sum(softmax(logits) * logits)).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def trl_selective_log_softmax(logits: Tensor, index: Tensor) -> Tensor:
    """TRL's eager log-prob of `index` under softmax(logits); logits (B, T, V), index (B, T)."""
    if logits.dtype in (torch.float32, torch.float64):
        picked = logits.gather(-1, index.unsqueeze(-1)).squeeze(-1)
        lse = torch.stack([torch.logsumexp(row, dim=-1) for row in logits])
        return picked - lse
    rows = [F.log_softmax(row, dim=-1).gather(-1, idx.unsqueeze(-1)).squeeze(-1)
            for row, idx in zip(logits, index, strict=True)]
    return torch.stack(rows)


def trl_entropy_from_logits(logits: Tensor, chunk_size: int = 128) -> Tensor:
    """TRL's eager entropy of softmax(logits) per row, in logits' dtype; logits (..., V)."""
    flat = logits.reshape(-1, logits.shape[-1])
    parts = []
    for chunk in flat.split(chunk_size, dim=0):
        logp = F.log_softmax(chunk, dim=-1)
        parts.append(-(logp.exp() * logp).sum(-1))
    return torch.cat(parts).reshape(logits.shape[:-1])


def verl_logprobs_from_logits(logits: Tensor, labels: Tensor) -> Tensor:
    """verl's eager log-probs (`logprobs_from_logits_v2`): the same algorithm as TRL's."""
    return trl_selective_log_softmax(logits, labels)


def verl_entropy_from_logits(logits: Tensor) -> Tensor:
    """verl's eager entropy: logsumexp(logits) - sum(softmax(logits) * logits)."""
    probs = F.softmax(logits, dim=-1)
    return torch.logsumexp(logits, dim=-1) - (probs * logits).sum(-1)


def eager_token_stats(logits: Tensor, tokens: Tensor, temperature: float = 1.0,
                      style: str = "trl") -> tuple[Tensor, Tensor]:
    """(logp, entropy) as a trainer computes them: divide by the temperature, then the two calls."""
    if temperature != 1.0:
        logits = logits / temperature
    if style == "trl":
        return trl_selective_log_softmax(logits, tokens), trl_entropy_from_logits(logits)
    if style == "verl":
        return verl_logprobs_from_logits(logits, tokens), verl_entropy_from_logits(logits)
    raise ValueError(f"style must be 'trl' or 'verl', got {style!r}")
