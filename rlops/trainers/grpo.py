"""GRPO (DeepSeekMath; DeepSeek-R1's RL stage): G sampled responses per prompt, rewards made
group-relative, and the clipped surrogate with a KL penalty to a frozen reference.

One step:
1. rollout: `prompts_per_step` prompts, `group_size` samples each, at `temperature`;
2. score: the task's reward per response, then `rlops.group_advantages` per group;
3. old and reference log-probs (no gradient): the policy before this step's updates, and the
   frozen reference (skipped when kl_coef is 0);
4. update: `epochs` passes over `minibatches` shuffled minibatches, each
   `rlops.linear_policy_loss` on the policy's last hidden states and lm_head (the (B, T, V)
   logits are never made), clipped against the old log-probs.

With packing=True the forwards of steps 3 and 4 see each minibatch's sequences in one row without
padding, and the loss their completions with cu_seqlens (rlops.trainers.packed): the same step.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ..advantages import group_advantages
from ..ops.policy_loss import PolicyLossOutput
from ..options import LOSS_AGGS
from .base import PerSample, RLConfig, RLTrainer, check_choice
from .rollout import Rollout, Task, Tokenizer


@dataclass
class GRPOConfig(RLConfig):
    steps: int = 200
    lr: float = 2e-4
    prompts_per_step: int = 16  # per process
    group_size: int = 8  # G samples per prompt
    clip_high: float = 0.28  # DAPO's clip-higher
    kl_coef: float = 0.04  # k3 KL to the frozen reference (DeepSeekMath's beta); 0 skips the reference model
    loss_agg: str = "token-mean"  # SPEC.md's aggregations: token-mean (DAPO), seq-mean-token-mean (GRPO), ...
    scale_by_std: bool = True  # False: Dr. GRPO

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.group_size < 2:
            raise ValueError(f"group_size must be >= 2 (advantages are relative to the group), got {self.group_size}")
        check_choice(self, "loss_agg", LOSS_AGGS)


class GRPOTrainer(RLTrainer):
    """GRPO on a task's items: `train()` runs config.steps steps and returns the last metrics,
    `step()` runs one. The reference is a frozen copy of the initial policy."""

    name = "grpo"

    def __init__(self, model: nn.Module, tokenizer: Tokenizer, task: Task, items: Sequence[Any], config: GRPOConfig,
                 eval_items: Sequence[Any] = ()) -> None:
        super().__init__(model, tokenizer, task, items, config, eval_items)
        self.optimizers = {"optimizer": torch.optim.AdamW(self.model.parameters(), lr=config.lr,
                                                          weight_decay=config.weight_decay)}

    def step(self) -> dict[str, float]:
        cfg = self.config
        items = [x for x in self.prompts(self.step_count) for _ in range(cfg.group_size)]
        rollout = self.rollout(items)
        rewards = torch.tensor([self.task.reward(t, x) for t, x in zip(rollout.texts, items, strict=True)],
                               device=self.procs.device)
        correct = [self.task.correct(t, x) for t, x in zip(rollout.texts, items, strict=True)]
        advantages = group_advantages(rewards, group_size=cfg.group_size, scale_by_std=cfg.scale_by_std)
        old = ref = None
        if cfg.epochs * cfg.minibatches > 1:  # else one step on fresh samples: on-policy, the ratio is 1
            with self.stage("old_logprobs"):
                old = self.logprobs(self.model, rollout)
        if self.reference is not None:
            with self.stage("reference_logprobs"):
                ref = self.logprobs(self.reference, rollout)
        totals = self.optimise(rollout, {"advantages": advantages, "old": old, "ref": ref}, self.minibatch_loss,
                               kl_metric=ref is not None)
        totals.update(reward=rewards.mean().item(), accuracy=sum(correct) / len(correct),
                      response_length=rollout.completion_mask.float().sum(-1).mean().item(),
                      reward_std=rewards.view(-1, cfg.group_size).std(-1).mean().item())
        return totals

    def minibatch_loss(self, batch: Rollout, rows: PerSample) -> PolicyLossOutput:
        """The clipped surrogate (+ k3 KL) on a minibatch of samples."""
        cfg = self.config
        return self.policy_loss(batch, rows["advantages"], old_logprobs=rows["old"], ref_logprobs=rows["ref"],
                                kl_coef=cfg.kl_coef, loss_agg=cfg.loss_agg)
