"""Packed (padding-free) rollouts for GRPO and PPO (`packing=True`): the prompt + completion rows
of a minibatch concatenated into one row of N tokens, with position ids that restart at 0 with
every sequence, and the check that a model's attention keeps those sequences apart.

Why a packed forward equals the padded one: given position_ids and no attention_mask (an all-ones
mask turns the detection off), Hugging Face models (transformers >= 4.54; checked on 5.24) find
the packed sequences themselves (`masking_utils.find_packed_sequence_indices`: a sequence starts
wherever the position does not grow by 1) and build a block-diagonal causal mask for sdpa, eager
and flex_attention, while flash_attention_2/3 turn the same position ids into the cu_seqlens of
its varlen kernel. An attention implementation with no mask function registered in transformers
gets no mask at all and would attend across sequences: `check_packing` refuses it when the
trainer is built, and runs a two-sequence probe to catch anything else that mixes them (a
recurrent layer, an older transformers).

What it saves: the padding's tokens in every layer's linear work and activations, and in the
loss. What it costs with sdpa and eager: their mask is a dense (N, N) tensor (sdpa makes an
additive copy in the model's dtype per layer and keeps it for the backward), so attention work
and that memory grow with N^2 rather than sum(L_b^2); flash attention has no such term. The
trainers therefore pack at most one minibatch's rows at a time, the no-gradient passes included.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from .. import hf
from ..packing import cu_seqlens_from_lengths, pack, unpack
from .rollout import Rollout, position_ids


@dataclass(frozen=True)
class PackedRollout:
    """A rollout's sequences packed into one row (model layout) and its completions (loss layout).

    input_ids, positions: (1, N), N = sum of the sequences' prompt + completion lengths, positions
    0 .. L_b - 1 per sequence (what the padded layout's position ids are at the real tokens).
    scored: int64 (R,), the index in N of the state that predicts each completion token, R = sum
    of the completion lengths. completion_ids: (1, R). cu_seqlens: int32 (S + 1,), the completions'
    boundaries in R (the loss's sequences). lengths: (S,) completion lengths. width: T, the padded
    completion width (`unpack`'s, and the length seq-mean-token-sum-norm divides by).
    """

    input_ids: Tensor
    positions: Tensor
    scored: Tensor
    completion_ids: Tensor
    cu_seqlens: Tensor
    lengths: Tensor
    width: int

    @classmethod
    def of(cls, rollout: Rollout) -> PackedRollout:
        """The packed layout of rollout (one host sync, to check it).

        Raises a ValueError where a completion token is predicted from a padding position: a
        sequence without prompt tokens, or a completion mask that is not a prefix (sample and
        encode_pairs make prefixes); packing would change what such a token is conditioned on.
        """
        real = rollout.attention_mask.bool()
        completion = rollout.completion_mask.bool()
        p = rollout.prompt_ids.shape[1]
        # In the padded (B, P + T) layout the state at column P - 1 + t predicts completion token t.
        if p == 0 or bool((completion & ~real[:, p - 1:-1]).any()):
            raise ValueError("packing needs every sequence to have a prompt token (such as BOS) and each completion "
                             "mask to be a prefix (1s then 0s): a completion token here follows a padding position")
        # The packed index of each real token of the padded layout: they keep their order, row after row.
        index = real.reshape(-1).long().cumsum(0).view(real.shape) - 1
        lengths = completion.sum(-1)
        return cls(input_ids=rollout.input_ids[real][None], positions=position_ids(rollout.attention_mask)[real][None],
                   scored=index[:, p - 1:-1][completion], completion_ids=rollout.completion_ids[completion][None],
                   cu_seqlens=cu_seqlens_from_lengths(lengths), lengths=lengths,
                   width=rollout.completion_ids.shape[1])

    def pack(self, x: Tensor) -> Tensor:
        """A per-token (B, T) tensor of the padded layout as (1, R), the completions' entries only."""
        return pack(x, self.lengths)[None]

    def unpack(self, x: Tensor, fill: float = 0.0) -> Tensor:
        """The inverse of `pack`: (1, R) or (R,) back to (B, T), fill at the padding."""
        return unpack(x.reshape(-1), self.cu_seqlens, self.width, fill)


def row_chunks(n: int, count: int) -> list[slice]:
    """count contiguous slices covering range(n), of the sizes `rollout.minibatches` gives (the last smaller)."""
    size = -(-n // count)
    return [slice(start, min(start + size, n)) for start in range(0, n, size)]


# Exact in float32/float64 up to summation order; bfloat16/float16 round each layer's output.
PROBE_TOLERANCE = {torch.float32: 1e-3, torch.float64: 1e-6}
HALF_PROBE_TOLERANCE = 5e-2


@torch.no_grad()
def check_packing(model: nn.Module, role: str) -> None:
    """Raises a ValueError naming packing and model's attention implementation unless a packed
    row's sequences stay apart in model (a Hugging Face causal LM, or a ValueModel).

    Two checks: transformers builds a packed mask (or flash attention's varlen call) from
    position ids only for the implementations with a mask function registered in
    `masking_utils.ALL_MASK_ATTENTION_FUNCTIONS` (sdpa, eager, flex_attention, flash_attention_*);
    then a probe: a 3-token sequence packed after a 6-token one must give the hidden states it
    gives alone. The probe's token ids are fixed, so that no random generator is drawn from.
    """
    config = getattr(model, "config", None)
    impl = getattr(config, "_attn_implementation", None)
    fix = "load the model with attn_implementation='sdpa' (or a flash attention one), or set packing=False"
    if not hf.packs_sequences_apart(model):
        raise ValueError(f"packing=True needs attention that keeps packed sequences apart, but the {role}'s attention "
                         f"implementation {impl!r} gets no block-diagonal mask from transformers (only sdpa, eager, "
                         f"flex_attention and flash_attention_2/3 do, from the restarting position ids); {fix}")
    decoder = model.get_decoder() if hasattr(model, "get_decoder") else model.decoder
    weight = next(decoder.parameters())
    ids = (torch.arange(9, device=weight.device) * 5 + 3) % config.vocab_size
    positions = torch.cat([torch.arange(6), torch.arange(3)]).to(weight.device)
    was_training = decoder.training
    decoder.eval()  # no dropout in the comparison
    try:
        packed = decoder(input_ids=ids[None], position_ids=positions[None], use_cache=False)[0][0, 6:]
        alone = decoder(input_ids=ids[None, 6:], position_ids=positions[None, 6:], use_cache=False)[0][0]
    finally:
        decoder.train(was_training)
    error = float((packed.float() - alone.float()).abs().max())
    scale = float(alone.float().abs().max())
    if not error <= PROBE_TOLERANCE.get(weight.dtype, HALF_PROBE_TOLERANCE) * max(scale, 1e-6):
        raise ValueError(f"packing=True: in the {role} (attention implementation {impl!r}) a sequence packed after "
                         f"another does not give the hidden states it gives alone (largest difference {error:.3g} of "
                         f"{scale:.3g}): its layers mix packed sequences; set packing=False")
