"""Small models and tasks shared by the trainer tests and their torchrun worker."""

from __future__ import annotations

import torch
from transformers import LlamaForCausalLM

from rlops.trainers import Task, arithmetic

# A task whose rewards vary even for an untrained model: the share of sevens in the response.
SEVENS: Task[int] = Task(prompt=lambda i: f"{i}+{i}=", reward=lambda text, i: text.count("7") / max(len(text), 1),
                         correct=lambda text, i: float("7" in text))


def small_model(tokenizer: arithmetic.CharTokenizer, seed: int = 0) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    return LlamaForCausalLM(arithmetic.tiny_model_config(tokenizer, hidden_size=32, layers=1))


def sft_examples() -> list[tuple[str, str]]:
    train, _ = arithmetic.split_problems(100, seed=0)
    return [(p.prompt, p.solution) for p in train[:40]]
