"""Supervised fine-tuning on (prompt, response) pairs: the cold start, and the fine-tuning on
rejection-sampled responses. The loss is the mean negative log-likelihood of the response
tokens (and the end-of-sequence token), computed by rlops' fused-linear log-probs, so the
(B, T, V) logits are never made."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..ops.linear_policy_loss import linear_token_logprobs_and_entropy
from .base import TrainConfig, Trainer, check_nonnegative, check_positive, clip_and_step
from .checkpoint import save_model
from .rollout import PolicyForward, Task, Tokenizer, encode_pairs, evaluate


@dataclass
class SFTConfig(TrainConfig):
    steps: int = 300
    lr: float = 1e-3
    batch_size: int = 64  # examples per step and process
    eval_every: int = 0  # steps between held-out evaluations (and at the end, when eval items are given)
    max_new_tokens: int = 32  # for evaluation

    def __post_init__(self) -> None:
        super().__post_init__()
        check_positive(self, "batch_size", "max_new_tokens")
        check_nonnegative(self, "eval_every")


class SFTTrainer(Trainer):
    """Trains model on examples [(prompt, response)]; with a task and eval items it also reports
    held-out accuracy (greedy decoding)."""

    name = "sft"

    def __init__(self, model: nn.Module, tokenizer: Tokenizer, examples: Sequence[tuple[str, str]],
                 config: SFTConfig, task: Task | None = None, eval_items: Sequence[Any] = ()) -> None:
        if not examples:
            raise ValueError("examples must hold at least one (prompt, response) pair")
        super().__init__(config)
        self.tokenizer, self.examples, self.task, self.eval_items = tokenizer, list(examples), task, list(eval_items)
        self.model = model.to(self.procs.device)
        self.policy = self.procs.wrap(PolicyForward(self.model), root=self.model)
        self.optimizers = {"optimizer": torch.optim.AdamW(self.model.parameters(), lr=config.lr,
                                                          weight_decay=config.weight_decay)}

    def loss(self, batch: Sequence[tuple[str, str]]) -> tuple[torch.Tensor, dict[str, float]]:
        """Mean NLL of the responses (and their EOS) given the prompts."""
        pairs = encode_pairs(self.tokenizer, [p for p, _ in batch], [r for _, r in batch], self.procs.device)
        hidden, weight, bias = self.policy(pairs.input_ids, pairs.attention_mask, pairs.completion_ids.shape[1])
        logp, entropy = linear_token_logprobs_and_entropy(hidden, weight, pairs.completion_ids, bias=bias)
        mask = pairs.completion_mask.float()
        nll = -(logp * mask).sum() / mask.sum()
        return nll, {"loss": nll.item(), "entropy": float((entropy.detach() * mask).sum() / mask.sum())}

    def step(self) -> dict[str, float]:
        rng = self.batch_rng(self.step_count)
        loss, metrics = self.loss([self.examples[rng.randrange(len(self.examples))]
                                   for _ in range(self.config.batch_size)])
        with self.stage("backward"):
            loss.backward()
        metrics["grad_norm"] = clip_and_step(list(self.model.parameters()), self.optimizers["optimizer"],
                                             self.config.max_grad_norm)
        return metrics

    def evaluate(self) -> dict[str, float]:
        if self.task is None or not self.eval_items:
            return {}
        return evaluate(self.model, self.tokenizer, self.task, self.eval_items,
                        max_new_tokens=self.config.max_new_tokens)

    def models(self) -> dict[str, nn.Module]:
        return {"model": self.model}

    def save_final(self, directory: Path) -> None:
        save_model(self.model, self.tokenizer, directory / "model")
