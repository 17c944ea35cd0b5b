"""PPO for language models (Ziegler et al.; InstructGPT): a policy, a critic with a value head,
GAE, the clipped surrogate and the clipped value loss.

One step:
1. rollout: `prompts_per_step` prompts, one sample each, at `temperature`;
2. score: a reward model's score (ValueModel.score) or the task's rule reward;
3. old and reference log-probs and the critic's values (no gradient);
4. token rewards: `rlops.kl_shaped_rewards` (the score on the last token, -kl_coef * KL on
   every token; kl_mode="reward"), or the score alone with the KL as a loss term
   (kl_mode="loss"); then `rlops.gae` and `rlops.masked_whiten` for the advantages;
5. update: `epochs` passes over `minibatches` minibatches: `rlops.linear_policy_loss` for the
   policy (no (B, T, V) logits) and the clipped value loss for the critic.

With packing=True the policy's, the reference's and the critic's forwards (steps 3 and 5) see each
minibatch's sequences in one row without padding (rlops.trainers.packed), the losses read the
completions' tokens packed; the reward model and GAE stay on the padded (B, T) layout.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from ..advantages import gae, kl_shaped_rewards, masked_whiten
from ..ops.policy_loss import PolicyLossOutput
from .base import PerSample, RLConfig, RLTrainer, check_choice, check_positive
from .checkpoint import save_model
from .packed import PackedRollout, check_packing
from .rollout import Rollout, Task, Tokenizer, enable_checkpointing
from .value_head import ValueModel

KL_MODES = ("reward", "loss")


@dataclass
class PPOConfig(RLConfig):
    steps: int = 200
    lr: float = 2e-4
    critic_lr: float = 5e-4
    prompts_per_step: int = 64  # per process, one sample each
    epochs: int = 2
    value_clip: float = 0.2  # the critic's new values stay within this of the old ones in the loss
    gamma: float = 1.0
    lam: float = 0.95
    kl_coef: float = 0.02  # 0 skips the reference model
    kl_mode: str = "reward"  # "reward": -kl_coef * k1 in the token rewards; "loss": kl_coef * k3 in the loss
    whiten_advantages: bool = True

    def __post_init__(self) -> None:
        super().__post_init__()
        check_positive(self, "critic_lr", "value_clip")
        for name in ("gamma", "lam"):
            if not 0 <= getattr(self, name) <= 1:
                raise ValueError(f"{name} must be in [0, 1], got {getattr(self, name)!r}")
        check_choice(self, "kl_mode", KL_MODES)


def critic_values(critic: nn.Module, rollout: Rollout | PackedRollout) -> Tensor:
    """(B, T) values of the states before each completion token; (1, R) on a packed rollout."""
    if isinstance(rollout, PackedRollout):
        return critic(rollout.input_ids, None, rollout.positions)[:, rollout.scored]
    t = rollout.completion_ids.shape[1]
    return critic(rollout.input_ids, rollout.attention_mask)[:, -t - 1:-1]


class PPOTrainer(RLTrainer):
    """PPO on a task's items; the reward is reward_model's score when given, else the task's
    rule reward. The critic starts as a value head on a copy of the policy's decoder (or is
    given), the reference as a frozen copy of the policy."""

    name = "ppo"

    def __init__(self, model: nn.Module, tokenizer: Tokenizer, task: Task, items: Sequence[Any], config: PPOConfig,
                 eval_items: Sequence[Any] = (), reward_model: ValueModel | None = None,
                 critic: ValueModel | None = None) -> None:
        # The critic's decoder is copied before RLTrainer shards the policy in place (fsdp); its head is
        # made below, after the seeding, as ValueModel.from_causal_lm would.
        decoder = None if critic is not None else copy.deepcopy(model.get_decoder())
        super().__init__(model, tokenizer, task, items, config, eval_items)
        device = self.procs.device
        self.critic = (critic or ValueModel(decoder.to(device))).to(device)
        if config.packing:
            check_packing(self.critic, "critic")
        if config.gradient_checkpointing:
            enable_checkpointing(self.critic.decoder)
        self.reward_model = None if reward_model is None else \
            self.procs.shard(reward_model.to(device).eval().requires_grad_(False))
        self.critic_ddp = self.procs.wrap(self.critic)
        self.optimizers = {
            "policy": torch.optim.AdamW(self.model.parameters(), lr=config.lr, weight_decay=config.weight_decay),
            "critic": torch.optim.AdamW(self.critic.parameters(), lr=config.critic_lr,
                                        weight_decay=config.weight_decay),
        }

    @torch.no_grad()
    def scores(self, rollout: Rollout, items: Sequence[Any]) -> Tensor:
        """(B,) the reward model's scores, or the task's rule rewards."""
        if self.reward_model is None:
            return torch.tensor([self.task.reward(t, x) for t, x in zip(rollout.texts, items, strict=True)],
                                device=self.procs.device)
        scores = self.reward_model.score(rollout.input_ids, rollout.attention_mask)
        self.procs.release(self.reward_model)  # frozen: with FSDP, nothing of it stays gathered
        return scores

    def step(self) -> dict[str, float]:
        cfg = self.config
        items = self.prompts(self.step_count)
        rollout = self.rollout(items)
        with self.stage("reward"):
            scores = self.scores(rollout, items)
        correct = [self.task.correct(t, x) for t, x in zip(rollout.texts, items, strict=True)]
        mask = rollout.completion_mask.bool()
        with self.stage("old_logprobs"):
            old = self.logprobs(self.model, rollout)
        with self.stage("reference_logprobs"):
            ref = old if self.reference is None else self.logprobs(self.reference, rollout)
        with self.stage("values"), torch.no_grad():
            old_values = self.packed_pass(rollout, lambda p: critic_values(self.critic, p)) if cfg.packing \
                else critic_values(self.critic, rollout)
        with self.stage("advantages"):
            shaped = cfg.kl_mode == "reward" and self.reference is not None
            rewards = kl_shaped_rewards(scores, old, ref, mask, cfg.kl_coef if shaped else 0.0)
            advantages, returns = gae(rewards, old_values, mask, gamma=cfg.gamma, lam=cfg.lam, backend=cfg.backend)
            if cfg.whiten_advantages:
                advantages = masked_whiten(advantages, mask)
        loss_ref = ref if cfg.kl_mode == "loss" and self.reference is not None else None
        per_sample = {"advantages": advantages, "returns": returns, "old": old, "old_values": old_values,
                      "ref": loss_ref}
        totals = self.optimise(rollout, per_sample, self.minibatch_loss, after_backward=self.critic_update)
        n = mask.sum().clamp(min=1)
        totals.update(reward=scores.mean().item(), accuracy=sum(correct) / len(correct),
                      response_length=mask.float().sum(-1).mean().item(),
                      kl=float(torch.where(mask, old - ref, 0.0).sum() / n),
                      value_mean=float(torch.where(mask, old_values, 0.0).sum() / n))
        return totals

    def minibatch_loss(self, batch: Rollout, rows: PerSample) -> PolicyLossOutput:
        """The clipped surrogate (+ k3 KL when kl_mode is "loss") on a minibatch of samples."""
        kl_coef = self.config.kl_coef if rows["ref"] is not None else 0.0
        return self.policy_loss(batch, rows["advantages"], old_logprobs=rows["old"], ref_logprobs=rows["ref"],
                                kl_coef=kl_coef)

    def critic_update(self, batch: Rollout, rows: PerSample) -> dict[str, float]:
        """The critic's clipped value loss on a minibatch, backpropagated (its optimizer steps with the policy's)."""
        cfg, mask = self.config, batch.completion_mask.bool()
        old_values, returns = rows["old_values"], rows["returns"]
        with self.stage("critic"):
            if cfg.packing:  # the completions' tokens only, in one row: every one counts
                packed = PackedRollout.of(batch)
                values = critic_values(self.critic_ddp, packed)
                old_values, returns = packed.pack(old_values), packed.pack(returns)
                mask = torch.ones_like(values, dtype=torch.bool)
            else:
                values = critic_values(self.critic_ddp, batch)
            clipped = old_values + (values - old_values).clamp(-cfg.value_clip, cfg.value_clip)
            per_token = torch.maximum((values - returns) ** 2, (clipped - returns) ** 2)
            value_loss = 0.5 * torch.where(mask, per_token, 0.0).sum() / mask.sum().clamp(min=1)
            value_loss.backward()
        return {"value_loss": value_loss.item()}

    def models(self) -> dict[str, nn.Module]:
        return {**super().models(), "critic": self.critic}

    def save_final(self, directory: Path) -> None:
        super().save_final(directory)
        save_model(self.critic, None, directory / "critic")
