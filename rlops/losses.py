"""nn.Module front ends of the fused losses, holding their hyper-parameters in frozen configs."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from torch import Tensor, nn

from .ops.policy_loss import PolicyLossOutput, check_options, policy_loss


@dataclass(frozen=True)
class PolicyLossConfig:
    """Hyper-parameters of `rlops.policy_loss` (see its docstring), checked when built.

    The class methods give the published settings of common algorithms; override any field
    with `dataclasses.replace` or keyword arguments to `PolicyLoss`.
    """

    temperature: float = 1.0
    clip_low: float = 0.2
    clip_high: float = 0.2
    dual_clip: float | None = None
    kl_coef: float = 0.0
    kl_estimator: str = "k3"
    entropy_coef: float = 0.0
    loss_agg: str = "token-mean"
    norm_len: float | None = None
    ratio_level: str = "token"
    entropy_agg: str | None = None
    kl_ratio_weighted: bool = False
    inplace_grad: bool = False
    backend: str = "auto"

    def __post_init__(self) -> None:
        check_options(self.temperature, self.clip_low, self.clip_high, self.dual_clip, self.kl_coef,
                      self.kl_estimator, self.entropy_coef, self.loss_agg, self.norm_len, self.ratio_level,
                      self.inplace_grad, self.entropy_agg, self.kl_ratio_weighted)

    @classmethod
    def ppo(cls, **overrides: object) -> PolicyLossConfig:
        """PPO (Schulman et al. 2017): symmetric clip 0.2, token mean."""
        return cls(**overrides)

    @classmethod
    def grpo(cls, **overrides: object) -> PolicyLossConfig:
        """GRPO (DeepSeekMath): per-sequence token mean, k3 KL to the reference with beta 0.04."""
        return cls(**{"loss_agg": "seq-mean-token-mean", "kl_coef": 0.04, "kl_estimator": "k3", **overrides})

    @classmethod
    def dapo(cls, **overrides: object) -> PolicyLossConfig:
        """DAPO: clip-higher (0.2 / 0.28), token mean over the batch, no KL."""
        return cls(**{"clip_low": 0.2, "clip_high": 0.28, "loss_agg": "token-mean", **overrides})

    @classmethod
    def dr_grpo(cls, **overrides: object) -> PolicyLossConfig:
        """Dr. GRPO: sum over tokens divided by a constant length (norm_len, default T), no KL."""
        return cls(**{"loss_agg": "seq-mean-token-sum-norm", **overrides})

    @classmethod
    def gspo(cls, **overrides: object) -> PolicyLossConfig:
        """GSPO: sequence-level ratio with clip 3e-4 / 4e-4, per-sequence token mean."""
        return cls(**{"ratio_level": "sequence", "clip_low": 3e-4, "clip_high": 4e-4,
                      "loss_agg": "seq-mean-token-mean", **overrides})


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
    ) -> PolicyLossOutput:
        """Shapes as `rlops.policy_loss`: logits (B, T, V), tokens (B, T), advantages (B, T) / (B,) / (B, 1)."""
        return policy_loss(logits, tokens, advantages, mask=mask, old_logprobs=old_logprobs,
                           ref_logprobs=ref_logprobs, ref_logits=ref_logits, is_weights=is_weights,
                           **dataclasses.asdict(self.config))

    def extra_repr(self) -> str:
        return ", ".join(f"{f.name}={getattr(self.config, f.name)!r}" for f in dataclasses.fields(self.config))
