"""Hugging Face helpers: a causal LM's last hidden states and lm_head, for the fused-linear loss.

Needs no import of transformers: any `PreTrainedModel` for causal language modelling works
(duck-typed through `get_decoder` and `get_output_embeddings`).
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor, nn

# Config fields that make the logits something other than hidden @ weight.T + bias.
_NONLINEAR_HEADS = {
    "final_logit_softcapping": None,  # Gemma 2 / 3: tanh soft-capping
    "logit_scale": 1.0,  # Cohere: logits * logit_scale
    "logits_scaling": 1.0,  # Granite: logits / logits_scaling
}


@dataclass
class LMHeadInputs:
    """What `rlops.linear_policy_loss` takes from a model: hidden (B, T, H), weight (V, H), bias (V,) or None."""

    hidden: Tensor
    weight: Tensor
    bias: Tensor | None


def lm_head(model: nn.Module) -> nn.Linear:
    """The model's lm_head as a Linear (its weight is the input embedding matrix when tied)."""
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if not isinstance(head, nn.Linear):
        raise TypeError(f"model must be a causal LM whose get_output_embeddings() is an nn.Linear lm_head, got "
                        f"{type(head).__name__}")
    config = getattr(model, "config", None)
    for field, neutral in _NONLINEAR_HEADS.items():
        value = getattr(config, field, neutral)
        if value is not None and value != neutral:
            raise ValueError(f"model config sets {field}={value!r}: its logits are not hidden @ weight.T + bias, "
                             "so the fused-linear loss cannot reproduce them; use rlops.policy_loss on the logits")
    return head


def lm_head_inputs(model: nn.Module, input_ids: Tensor, attention_mask: Tensor | None = None, *,
                   logits_to_keep: int | None = None, **model_kwargs: object) -> LMHeadInputs:
    """Runs the model without its lm_head and returns the hidden states that predict the next tokens.

    Args:
        model: an `AutoModelForCausalLM` model (tied or untied embeddings, lm_head with or
            without bias).
        input_ids, attention_mask: (B, L) as for `model(...)`; extra keyword arguments are
            passed to the decoder.
        logits_to_keep: with k, the hidden states predicting the last k tokens
            (`input_ids[:, -k:]`, a completion), as TRL's `logits_to_keep`; without, those
            predicting `input_ids[:, 1:]`.

    Returns:
        LMHeadInputs(hidden (B, k or L-1, H), weight (V, H), bias (V,) or None), such that
        `hidden @ weight.T + bias` equals the model's logits for those positions.
    """
    head = lm_head(model)
    decoder = model.get_decoder() if hasattr(model, "get_decoder") else getattr(model, model.base_model_prefix)
    outputs = decoder(input_ids=input_ids, attention_mask=attention_mask, **model_kwargs)
    hidden = outputs.last_hidden_state if hasattr(outputs, "last_hidden_state") else outputs[0]
    if logits_to_keep is None:
        hidden = hidden[:, :-1]
    else:
        if isinstance(logits_to_keep, bool) or not isinstance(logits_to_keep, int) or logits_to_keep < 1:
            raise ValueError(f"logits_to_keep must be None or an int >= 1, got {logits_to_keep!r}")
        hidden = hidden[:, -logits_to_keep - 1:-1]
    return LMHeadInputs(hidden, head.weight, head.bias)


__all__ = ["LMHeadInputs", "lm_head", "lm_head_inputs"]


def packs_sequences_apart(model: nn.Module) -> bool:
    """Whether transformers keeps the sequences of a packed row apart in model's attention.

    Given position ids that restart at 0 and no attention mask, transformers (>= 4.54) finds
    the packed sequences (`masking_utils.find_packed_sequence_indices`) and builds a
    block-diagonal causal mask for sdpa, eager and flex_attention, or flash attention's varlen
    boundaries: for the implementations with a mask function in
    `masking_utils.ALL_MASK_ATTENTION_FUNCTIONS`. Any other would attend across sequences.
    """
    attention = getattr(getattr(model, "config", None), "_attn_implementation", None)
    try:
        from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, find_packed_sequence_indices  # noqa: F401
    except ImportError:  # transformers before 4.54 finds no packed sequences in position ids
        return False
    return attention is not None and attention in ALL_MASK_ATTENTION_FUNCTIONS
