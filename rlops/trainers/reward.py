"""Reward model: a scalar head on a causal LM's decoder, trained on preference pairs with the
Bradley-Terry loss -log sigmoid(R(p, r_chosen) - R(p, r_rejected))."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from .base import TrainConfig, Trainer, check_nonnegative, check_positive, clip_and_step
from .checkpoint import save_model
from .rollout import Tokenizer, encode_pairs
from .value_head import ValueModel

Pair = tuple[str, str, str]  # (prompt, chosen, rejected)


@dataclass
class RewardConfig(TrainConfig):
    steps: int = 300
    lr: float = 5e-4
    batch_size: int = 64  # pairs per step and process
    eval_every: int = 50

    def __post_init__(self) -> None:
        super().__post_init__()
        check_positive(self, "batch_size")
        check_nonnegative(self, "eval_every")


class RewardTrainer(Trainer):
    """Trains model (a ValueModel) on pairs; reports pairwise accuracy on them and on eval_pairs."""

    name = "reward"

    def __init__(self, model: ValueModel, tokenizer: Tokenizer, pairs: Sequence[Pair], config: RewardConfig,
                 eval_pairs: Sequence[Pair] = ()) -> None:
        if not pairs:
            raise ValueError("pairs must hold at least one (prompt, chosen, rejected) triple")
        super().__init__(config)
        self.tokenizer, self.pairs, self.eval_pairs = tokenizer, list(pairs), list(eval_pairs)
        self.model = model.to(self.procs.device)
        self.ddp = self.procs.wrap(self.model)
        self.optimizers = {"optimizer": torch.optim.AdamW(self.model.parameters(), lr=config.lr,
                                                          weight_decay=config.weight_decay)}

    def margins(self, batch: Sequence[Pair], model: nn.Module) -> torch.Tensor:
        """R(p, chosen) - R(p, rejected) per pair, one forward over both halves."""
        prompts = [p for p, _, _ in batch] * 2
        responses = [c for _, c, _ in batch] + [r for _, _, r in batch]
        enc = encode_pairs(self.tokenizer, prompts, responses, self.procs.device)
        values = model(enc.input_ids, enc.attention_mask)
        scores = values.gather(1, ValueModel.last_positions(enc.attention_mask)[:, None]).squeeze(1)
        return scores[: len(batch)] - scores[len(batch):]

    @torch.no_grad()
    def pairwise_accuracy(self, pairs: Sequence[Pair], batch_size: int = 256) -> float:
        """Fraction of pairs whose chosen response scores higher."""
        self.model.eval()
        wins = sum(float((self.margins(pairs[i:i + batch_size], self.model) > 0).sum())
                   for i in range(0, len(pairs), batch_size))
        self.model.train()
        return wins / max(len(pairs), 1)

    def step(self) -> dict[str, float]:
        rng = self.batch_rng(self.step_count)
        margin = self.margins([self.pairs[rng.randrange(len(self.pairs))] for _ in range(self.config.batch_size)],
                              self.ddp)
        loss = -F.logsigmoid(margin).mean()
        loss.backward()
        norm = clip_and_step(list(self.model.parameters()), self.optimizers["optimizer"], self.config.max_grad_norm)
        margin = margin.detach()
        return {"loss": loss.item(), "pairwise_accuracy": float((margin > 0).float().mean()),
                "margin": float(margin.mean()), "grad_norm": norm}

    def evaluate(self) -> dict[str, float]:
        return {"eval_pairwise_accuracy": self.pairwise_accuracy(self.eval_pairs)} if self.eval_pairs else {}

    def models(self) -> dict[str, nn.Module]:
        return {"model": self.model}

    def save_final(self, directory: Path) -> None:
        save_model(self.model, self.tokenizer, directory / "model")
