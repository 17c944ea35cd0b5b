"""nn.Module front end of the fused policy loss, holding its options (`PolicyLossConfig`)."""

from __future__ import annotations

import dataclasses

from torch import Tensor, nn

from .ops.policy_loss import PolicyLossOutput, run_policy_loss
from .options import PolicyBatch, PolicyLossConfig

__all__ = ["PolicyLoss", "PolicyLossConfig"]


class PolicyLoss(nn.Module):
    """The fused clipped policy loss as a module: `PolicyLoss(PolicyLossConfig.dapo())(logits, tokens, adv)`."""

    def __init__(self, config: PolicyLossConfig | None = None, **overrides: object) -> None:
        super().__init__()
        self.config = dataclasses.replace(config or PolicyLossConfig(), **overrides)

    def forward(
        self,
        logits: Tensor,
        tokens: Tensor,
        advantages: Tensor,
        *,
        mask: Tensor | None = None,
        old_logprobs: Tensor | None = None,
        ref_logprobs: Tensor | None = None,
        ref_logits: Tensor | None = None,
        is_weights: Tensor | None = None,
        rollout_logprobs: Tensor | None = None,
        cu_seqlens: Tensor | None = None,
    ) -> PolicyLossOutput:
        """Shapes as `rlops.policy_loss`: logits (B, T, V) or a causal LM's (B, T + 1, V), tokens (B, T),
        advantages (B, T) / (B,) / (B, 1); with cu_seqlens (S + 1,) a packed batch: logits (N, V),
        per-token tensors (N,), advantages (N,) or (S,)."""
        batch = PolicyBatch(tokens, advantages, mask, old_logprobs, ref_logprobs, is_weights, cu_seqlens,
                            rollout_logprobs)
        return run_policy_loss(logits, ref_logits, batch, self.config)

    def extra_repr(self) -> str:
        return ", ".join(f"{f.name}={getattr(self.config, f.name)!r}" for f in dataclasses.fields(self.config))
