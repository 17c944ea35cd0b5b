"""packed_policy_loss: the policy loss on a batch with 50% padding, padded (B, T, V) vs packed (N, V).

A padding-free trainer hands rlops its completions concatenated (cu_seqlens); a padded one
hands (B, T, V) logits and a mask. Both computations read only the counted tokens' logits
(masked rows are skipped by the kernel), so the traffic is the same: the difference is the
padded logits' own memory (and their gradient buffer), and the programs launched for the
padding rows. The shape (N, V) is the padded batch: B = 16 rows of T = N / 16 tokens whose
lengths spread evenly from T/2 - T/4 to T/2 + T/4, so that half of the N tokens are padding;
the packed call gets the same sequences as N / 2 rows. The default's largest case has packed
N * V above 2**31 (int64 offsets).

Options as the policy_loss case (TRL's dapo with k3 KL); bf16 logits.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from rlops import packing, policy_loss

from .common import logits_steps

OP = "packed_policy_loss"
SHAPES = [(16384, 151936), (32768, 151936)]
DEFAULT_SHAPES = SHAPES
QUICK_SHAPES = [(64, 1000)]
ROWS = 16
BETA, CLIP_LOW, CLIP_HIGH = 0.04, 0.2, 0.28


def lengths(n: int) -> torch.Tensor:
    """ROWS lengths from T/4 to 3T/4 (T = n / ROWS) summing to n / 2."""
    time = n // ROWS
    spread = torch.linspace(time / 4, 3 * time / 4, ROWS).round().long()
    spread[-1] += n // 2 - int(spread.sum())
    return spread


def bytes_moved(n: int, v: int, elem: int) -> dict[str, int]:
    """The counted half of the tokens: read once forward, read and written once backward."""
    counted = n // 2
    return {"fwd": counted * v * elem, "bwd": 2 * counted * v * elem, "fwd_bwd": 3 * counted * v * elem}


def setup(n: int, v: int, dtype: torch.dtype, device: torch.device) -> dict[str, torch.Tensor]:
    time = n // ROWS
    g = torch.Generator(device=device).manual_seed(0)
    lens = lengths(n).to(device)
    return {
        "logits": (torch.randn(ROWS, time, v, generator=g, device=device) * 3).to(dtype),
        "lengths": lens,
        "tokens": torch.randint(0, v, (ROWS, time), generator=g, device=device),
        "advantages": torch.randn(ROWS, generator=g, device=device),
        "mask": torch.arange(time, device=device) < lens[:, None],
        "old_logprobs": -torch.rand(ROWS, time, generator=g, device=device) * 12,
        "ref_logprobs": -torch.rand(ROWS, time, generator=g, device=device) * 12,
    }


OPTIONS = {"kl_coef": BETA, "kl_estimator": "k3", "clip_low": CLIP_LOW, "clip_high": CLIP_HIGH,
           "loss_agg": "token-mean", "backend": "triton"}


def _padded(x: torch.Tensor, i: dict[str, torch.Tensor]) -> torch.Tensor:
    return policy_loss(x, i["tokens"], i["advantages"], mask=i["mask"], old_logprobs=i["old_logprobs"],
                       ref_logprobs=i["ref_logprobs"], **OPTIONS).loss


def _packed(x: torch.Tensor, i: dict[str, torch.Tensor]) -> torch.Tensor:
    return policy_loss(x, i["tokens"], i["advantages"], old_logprobs=i["old_logprobs"],
                       ref_logprobs=i["ref_logprobs"], cu_seqlens=i["cu_seqlens"], **OPTIONS).loss


PROVIDERS: dict[str, Callable[[torch.Tensor, dict[str, torch.Tensor]], torch.Tensor]] = {
    "rlops-padded": _padded,
    "rlops-packed": _packed,
}


def grad_bytes(provider: str, inputs: dict[str, torch.Tensor]) -> int:
    logits = inputs["logits"]
    return logits.numel() * logits.element_size()


def _pack_inputs(inputs: dict[str, torch.Tensor]) -> None:
    """Replaces the padded tensors by the packed ones in place (the padded logits are freed)."""
    lens = inputs["lengths"]
    for name in ("logits", "tokens", "old_logprobs", "ref_logprobs"):
        inputs[name] = packing.pack(inputs[name], lens)
    inputs["cu_seqlens"] = packing.cu_seqlens_from_lengths(lens)
    del inputs["mask"]


def make_step(provider: str, inputs: dict[str, torch.Tensor]) -> tuple[Callable, Callable]:
    """(forward, forward+backward) closures with respect to the provider's own logits (packed for
    rlops-packed), made a non-leaf once outside the timed region, as an lm_head's output is."""
    if provider == "rlops-packed":
        _pack_inputs(inputs)
    return logits_steps(PROVIDERS[provider], inputs)
