"""Samples and what the trainers compute on them: the tokenizer protocol, verifiable tasks,
rollouts (prompts with their completions), the policy's forward for a loss, sampling, minibatch
indices and greedy evaluation."""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import MethodType
from typing import Any, Generic, Protocol, TypeVar

import torch
from torch import Tensor, nn

from .. import hf
from .processes import is_sharded

Item = TypeVar("Item")


class Tokenizer(Protocol):
    """The part of a Hugging Face tokenizer the trainers use (CharTokenizer implements it too)."""

    pad_token_id: int | None
    eos_token_id: int | None
    bos_token_id: int | None

    def encode(self, text: str, add_special_tokens: bool = ...) -> list[int]: ...

    def decode(self, ids: Any, skip_special_tokens: bool = ...) -> str: ...

    def save_pretrained(self, directory: str | Path) -> Any: ...


@dataclass(frozen=True)
class Task(Generic[Item]):
    """A verifiable task: the prompt of an item, the reward of a response to it, and whether the
    response is correct (the accuracy that evaluation reports)."""

    prompt: Callable[[Item], str]
    reward: Callable[[str, Item], float]
    correct: Callable[[str, Item], float]


class PolicyForward(nn.Module):
    """A causal LM whose forward returns what a policy loss reads for the completion: (hidden,
    weight, bias) for rlops' fused-linear ops, or (logits,). This is what DDP wraps, so the
    decoder's and the head's gradients are averaged across processes; with FSDP the model inside
    is sharded instead and this module stays plain (Processes.wrap)."""

    def __init__(self, model: nn.Module, logits: bool = False) -> None:
        super().__init__()
        self.model, self.logits = model, logits

    def forward(self, input_ids: Tensor, attention_mask: Tensor | None, completion_len: int | Tensor,
                positions: Tensor | None = None) -> tuple[Tensor | None, ...]:
        """Padded: input_ids and attention_mask (B, L), completion_len T: (B, T, ...) for the last T tokens.
        Packed (rlops.trainers.packed): input_ids and positions (1, N), attention_mask None (so that
        transformers finds the packed sequences in the positions), completion_len the (R,) indices of the
        states that predict the completion tokens: (1, R, ...)."""
        if attention_mask is None:
            if self.logits:
                return (self.model(input_ids=input_ids, position_ids=positions, logits_to_keep=completion_len,
                                   use_cache=False).logits,)
            inputs = lm_head_inputs(self.model, input_ids, None, position_ids=positions, use_cache=False)
            return inputs.hidden[:, completion_len], inputs.weight, inputs.bias
        positions = position_ids(attention_mask)
        if self.logits:
            # Without the last token no logits need slicing off (whose backward would copy all of them).
            out = self.model(input_ids=input_ids[:, :-1], attention_mask=attention_mask[:, :-1],
                             position_ids=positions[:, :-1], logits_to_keep=completion_len, use_cache=False)
            return (out.logits,)
        inputs = lm_head_inputs(self.model, input_ids, attention_mask, logits_to_keep=completion_len,
                                position_ids=positions, use_cache=False)
        return inputs.hidden, inputs.weight, inputs.bias


# The forward method registered on a causal LM sharded by FSDP2 (see lm_head_inputs).
HEAD_STATES = "rlops_head_states"


def lm_head_inputs(model: nn.Module, input_ids: Tensor, attention_mask: Tensor | None, *,
                   logits_to_keep: int | None = None, **kwargs: Any) -> hf.LMHeadInputs:
    """hf.lm_head_inputs(model, ...), also for a model sharded by FSDP2 (Processes.shard). FSDP gathers
    the parameters outside the decoder layers (embeddings, final norm, the lm_head weight the fused
    loss reads) only around a forward of the model itself, and calling the decoder alone is not one:
    for a sharded model the decoder and the head are reached through a method registered as a
    forward of the model (once, on first use; every rank makes the same calls)."""
    if not is_sharded(model):
        return hf.lm_head_inputs(model, input_ids, attention_mask, logits_to_keep=logits_to_keep, **kwargs)
    if HEAD_STATES not in vars(model):
        from torch.distributed.fsdp import register_fsdp_forward_method

        setattr(model, HEAD_STATES, MethodType(_head_states, model))
        register_fsdp_forward_method(model, HEAD_STATES)
    hidden, weight, bias = getattr(model, HEAD_STATES)(input_ids, attention_mask, **kwargs)
    hidden = hidden[:, :-1] if logits_to_keep is None else hidden[:, -logits_to_keep - 1:-1]
    return hf.LMHeadInputs(hidden, weight, bias)


def _head_states(model: nn.Module, input_ids: Tensor, attention_mask: Tensor | None,
                 **kwargs: Any) -> tuple[Tensor, Tensor, Tensor | None]:
    """The decoder's last hidden states (B, L, H), whole, and the lm_head's weight and bias: what
    hf.lm_head_inputs reads, before its slicing (FSDP warns of a forward's outputs that are views)."""
    head = hf.lm_head(model)
    out = model.get_decoder()(input_ids=input_ids, attention_mask=attention_mask, **kwargs)
    return out.last_hidden_state, head.weight, head.bias


def enable_checkpointing(model: nn.Module) -> None:
    """Hugging Face gradient checkpointing of each decoder layer (non-reentrant)."""
    kwargs = {"use_reentrant": False}
    if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5.x; the old name is deprecated
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)


def position_ids(attention_mask: Tensor) -> Tensor:
    """Positions counted over the attended tokens, as generate() numbers left-padded prompts."""
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)


@dataclass
class Rollout:
    """Sampled completions: prompt (B, P) left-padded, completion (B, T) right-padded; masks 1 on
    real tokens (a completion's mask covers its end-of-sequence token)."""

    prompt_ids: Tensor
    prompt_mask: Tensor
    completion_ids: Tensor
    completion_mask: Tensor
    texts: list[str]

    @property
    def input_ids(self) -> Tensor:
        return torch.cat([self.prompt_ids, self.completion_ids], dim=1)

    @property
    def attention_mask(self) -> Tensor:
        return torch.cat([self.prompt_mask, self.completion_mask], dim=1)

    def select(self, rows: Tensor) -> Rollout:
        return Rollout(self.prompt_ids[rows], self.prompt_mask[rows], self.completion_ids[rows],
                       self.completion_mask[rows], [self.texts[i] for i in rows.tolist()])


def encode_left_padded(tokenizer: Tokenizer, texts: Sequence[str], device: torch.device) -> tuple[Tensor, Tensor]:
    """(ids, mask) of texts, each after a BOS token where the tokenizer has one, left-padded."""
    bos = [] if tokenizer.bos_token_id is None else [tokenizer.bos_token_id]
    rows = [bos + tokenizer.encode(t, add_special_tokens=False) for t in texts]
    width = max(len(r) for r in rows)
    pad = pad_id(tokenizer)
    ids = torch.tensor([[pad] * (width - len(r)) + r for r in rows], device=device)
    mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows], device=device)
    return ids, mask


def pad_id(tokenizer: Tokenizer) -> int:
    """The padding token: the tokenizer's pad token, else its end-of-sequence token."""
    if tokenizer.pad_token_id is not None:
        return tokenizer.pad_token_id
    if tokenizer.eos_token_id is None:
        raise ValueError("the tokenizer needs a pad or an end-of-sequence token")
    return tokenizer.eos_token_id


def completion_mask(ids: Tensor, eos_id: int | None) -> Tensor:
    """1 up to and including each row's first end-of-sequence token (all of a row without one)."""
    if eos_id is None:
        return torch.ones_like(ids)
    is_eos = ids == eos_id
    after = (is_eos.cumsum(-1) - is_eos.long()) > 0  # strictly after the first EOS
    return (~after).long()


@torch.no_grad()
def sample(model: nn.Module, tokenizer: Tokenizer, prompts: Sequence[str], *, max_new_tokens: int,
           temperature: float = 1.0, greedy: bool = False) -> Rollout:
    """Completions of prompts by model.generate (sampling at temperature, or greedy).

    A model sharded by FSDP2 gathers its layers in every forward, collectively: each rank then
    keeps taking (discarded) forwards until every rank's sequences have ended (synced_gpus), rather
    than stop early and leave the others waiting; the samples are the ones it would draw alone."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    prompt_ids, prompt_mask = encode_left_padded(tokenizer, prompts, device)
    kwargs = {"do_sample": False} if greedy else {"do_sample": True, "temperature": temperature, "top_k": 0,
                                                  "top_p": 1.0}
    out = model.generate(input_ids=prompt_ids, attention_mask=prompt_mask, max_new_tokens=max_new_tokens,
                         pad_token_id=pad_id(tokenizer), eos_token_id=tokenizer.eos_token_id,
                         synced_gpus=is_sharded(model), **kwargs)
    model.train(was_training)
    completion = out[:, prompt_ids.shape[1]:]
    if completion.shape[1] == 0:
        completion = torch.full((len(prompts), 1), pad_id(tokenizer), device=device)
    mask = completion_mask(completion, tokenizer.eos_token_id)
    completion = completion.masked_fill(mask == 0, pad_id(tokenizer))
    texts = [tokenizer.decode(row[m.bool()], skip_special_tokens=True) for row, m in zip(completion, mask,
                                                                                          strict=True)]
    return Rollout(prompt_ids, prompt_mask, completion, mask, texts)


def minibatches(n: int, count: int, generator: torch.Generator) -> Iterator[Tensor]:
    """count shuffled index sets covering range(n)."""
    order = torch.randperm(n, generator=generator)
    size = math.ceil(n / count)
    for start in range(0, n, size):
        yield order[start:start + size]


def encode_pairs(tokenizer: Tokenizer, prompts: Sequence[str], responses: Sequence[str],
                 device: torch.device) -> Rollout:
    """Prompts (left-padded, after BOS) with given responses (each ending in EOS, right-padded)."""
    prompt_ids, prompt_mask = encode_left_padded(tokenizer, prompts, device)
    eos = [] if tokenizer.eos_token_id is None else [tokenizer.eos_token_id]
    rows = [tokenizer.encode(r, add_special_tokens=False) + eos for r in responses]
    width = max(len(r) for r in rows)
    pad = pad_id(tokenizer)
    ids = torch.tensor([r + [pad] * (width - len(r)) for r in rows], device=device)
    mask = torch.tensor([[1] * len(r) + [0] * (width - len(r)) for r in rows], device=device)
    return Rollout(prompt_ids, prompt_mask, ids, mask, list(responses))


@torch.no_grad()
def evaluate(model: nn.Module, tokenizer: Tokenizer, task: Task, items: Sequence[Any], *, max_new_tokens: int,
             batch_size: int = 256) -> dict[str, float]:
    """Greedy responses to items: eval_accuracy, eval_reward and eval_response_length (tokens)."""
    correct = rewards = length = 0.0
    for start in range(0, len(items), batch_size):
        chunk = items[start:start + batch_size]
        rollout = sample(model, tokenizer, [task.prompt(x) for x in chunk], max_new_tokens=max_new_tokens,
                         greedy=True)
        for text, item in zip(rollout.texts, chunk, strict=True):
            correct += task.correct(text, item)
            rewards += task.reward(text, item)
        length += float(rollout.completion_mask.sum())
    n = max(len(items), 1)
    return {"eval_accuracy": correct / n, "eval_reward": rewards / n, "eval_response_length": length / n}
