"""The built-in verifiable task: two-number addition with an R1-style answer, needing no download.

A prompt is "47+38=" and a correct response "<think>7+8=15 4+3+1=8</think><answer>85</answer>"
followed by the end-of-sequence token: the scratchpad adds the units, then the tens with the
carry, and the answer is the tens' sum followed by the units' digit. Everything a run needs
comes from here: a character-level tokenizer (the four tags are single tokens), problems split
into disjoint train and held-out sets, DeepSeek-R1's rule rewards (format and correctness),
synthetic preference pairs for a reward model, and a small Llama-style model config.
"""

from __future__ import annotations

import json
import random
import re
from dataclasses import dataclass
from pathlib import Path

import torch

TAGS = ("<think>", "</think>", "<answer>", "</answer>")
CHARS = "0123456789+-*= "
PAD, BOS, EOS = "<pad>", "<bos>", "<eos>"
MAX_OPERAND = 99
FORMAT = re.compile(r"^<think>([^<>]*)</think><answer>([^<>]*)</answer>$")
FORMAT_REWARD, CORRECT_REWARD = 0.1, 1.0


class CharTokenizer:
    """Characters plus the tags as single tokens, with the subset of a Hugging Face tokenizer's
    interface the trainers use (`encode`, `decode`, the special ids, `save_pretrained`)."""

    def __init__(self) -> None:
        self.tokens = [PAD, BOS, EOS, *TAGS, *CHARS]
        self.ids = {t: i for i, t in enumerate(self.tokens)}
        self.pad_token_id, self.bos_token_id, self.eos_token_id = (self.ids[t] for t in (PAD, BOS, EOS))
        self._split = re.compile("(" + "|".join(re.escape(t) for t in TAGS) + ")")

    @property
    def vocab_size(self) -> int:
        return len(self.tokens)

    def __len__(self) -> int:
        return self.vocab_size

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        """Token ids of text; add_special_tokens puts the BOS id first."""
        ids = [self.ids[BOS]] if add_special_tokens else []
        for part in self._split.split(text):
            if part in self.ids:
                ids.append(self.ids[part])
                continue
            unknown = set(part) - set(CHARS)
            if unknown:
                raise ValueError(f"text has characters outside the task's alphabet {CHARS!r}: {sorted(unknown)}")
            ids += [self.ids[c] for c in part]
        return ids

    def decode(self, ids: list[int] | torch.Tensor, skip_special_tokens: bool = True) -> str:
        if isinstance(ids, torch.Tensor):
            ids = ids.tolist()
        special = {self.pad_token_id, self.bos_token_id, self.eos_token_id}
        return "".join(self.tokens[i] for i in ids if not (skip_special_tokens and i in special))

    def save_pretrained(self, directory: str | Path) -> None:
        Path(directory).mkdir(parents=True, exist_ok=True)
        (Path(directory) / "char_tokenizer.json").write_text(json.dumps({"tokens": self.tokens}))

    @classmethod
    def from_pretrained(cls, directory: str | Path) -> CharTokenizer:
        tok = cls()
        saved = json.loads((Path(directory) / "char_tokenizer.json").read_text())["tokens"]
        if saved != tok.tokens:
            raise ValueError(f"{directory} holds a different character tokenizer")
        return tok


@dataclass(frozen=True)
class Problem:
    a: int
    b: int

    @property
    def prompt(self) -> str:
        return f"{self.a}+{self.b}="

    @property
    def answer(self) -> int:
        return self.a + self.b

    @property
    def solution(self) -> str:
        """The demonstrated response: units, then tens with the carry, then the answer."""
        units = self.a % 10 + self.b % 10
        tens = self.a // 10 + self.b // 10 + units // 10
        think = f"{self.a % 10}+{self.b % 10}={units} {self.a // 10}+{self.b // 10}+{units // 10}={tens}"
        return f"<think>{think}</think><answer>{self.answer}</answer>"


N_PROBLEMS = (MAX_OPERAND + 1) ** 2


def split_problems(n_heldout: int = 500, seed: int = 0) -> tuple[list[Problem], list[Problem]]:
    """All (a, b) in [0, 99]^2, shuffled by seed: (train, held-out) with n_heldout held out."""
    problems = [Problem(a, b) for a in range(MAX_OPERAND + 1) for b in range(MAX_OPERAND + 1)]
    random.Random(seed).shuffle(problems)
    if not 0 < n_heldout < len(problems):
        raise ValueError(f"n_heldout must be in (0, {len(problems)}), got {n_heldout}")
    return problems[n_heldout:], problems[:n_heldout]


def check_split(heldout: int, demos: int) -> None:
    """Raises a ValueError naming heldout or demos unless both leave problems to train on: heldout
    in [1, N_PROBLEMS - 1], demos in [1, N_PROBLEMS - heldout - 1] (the rest are RL prompts)."""
    if not 1 <= heldout < N_PROBLEMS:
        raise ValueError(f"heldout must be in [1, {N_PROBLEMS - 1}], got {heldout}")
    if not 1 <= demos < N_PROBLEMS - heldout:
        raise ValueError(f"demos must be in [1, {N_PROBLEMS - heldout - 1}] (with {heldout} held out), got {demos}")


def parse_answer(response: str) -> int | None:
    """The integer in a well-formed response's <answer>, or None (bad format, not a number)."""
    match = FORMAT.match(response.strip())
    if match is None or not re.fullmatch(r"\d{1,4}", match.group(2).strip()):
        return None
    return int(match.group(2))


def format_reward(response: str) -> float:
    """R1's format reward: the response is <think>...</think><answer>...</answer>."""
    return FORMAT_REWARD if FORMAT.match(response.strip()) else 0.0


def correctness(response: str, problem: Problem) -> float:
    """1.0 when the response is well formed and its answer is right, else 0.0."""
    return float(parse_answer(response) == problem.answer)


def reward(response: str, problem: Problem) -> float:
    """R1's rule reward: format (0.1) plus answer correctness (1.0)."""
    return format_reward(response) + CORRECT_REWARD * correctness(response, problem)


def corrupt(problem: Problem, rng: random.Random) -> str:
    """A wrong response to problem: a wrong answer after a right scratchpad, a wrong scratchpad
    and answer, or a broken format."""
    right = problem.solution
    wrong = problem.answer + rng.choice([d for d in range(-10, 11) if d != 0 and problem.answer + d >= 0])
    kind = rng.randrange(3)
    if kind == 0:
        return right.replace(f"<answer>{problem.answer}</answer>", f"<answer>{wrong}</answer>")
    if kind == 1:
        think = right[len("<think>"):right.index("</think>")]
        digits = [i for i, c in enumerate(think) if c.isdigit()]
        i = rng.choice(digits)
        think = think[:i] + str((int(think[i]) + rng.randrange(1, 10)) % 10) + think[i + 1:]
        return f"<think>{think}</think><answer>{wrong}</answer>"
    return right.replace("</think>", "").replace("<answer>", " ")


def preference_pairs(problems: list[Problem], seed: int = 0) -> list[tuple[str, str, str]]:
    """(prompt, chosen, rejected) per problem: the correct response against a corrupted one."""
    rng = random.Random(seed)
    return [(p.prompt, p.solution, corrupt(p, rng)) for p in problems]


def tiny_model_config(tokenizer: CharTokenizer, hidden_size: int = 128, layers: int = 3):
    """A small Llama-style causal LM config (about 0.6M parameters with the defaults)."""
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=tokenizer.vocab_size, hidden_size=hidden_size, intermediate_size=3 * hidden_size,
        num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
        tie_word_embeddings=True, pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
