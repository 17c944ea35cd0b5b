"""policy_loss: one GRPO/DAPO loss step on bf16 logits, forward and backward.

The setting is the one TRL's GRPOTrainer computes by default with a reference model: old
log-probs (several optimisation epochs per batch), k3 KL to the reference with beta 0.04,
clip 0.2 / 0.28, the token-mean (dapo) aggregation, per-sequence advantages and temperature 1.
Every provider receives the model's (B, T+1, V) logits and slices them as its trainer does.

Minimum traffic: the forward reads the N*V logits once; the backward reads them again and
writes the N*V gradient: 3 passes. (Masked tokens would be skipped; the mask here is full.)
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from rlops import baselines, policy_loss

from .common import Skip, compiled_provider, logits_steps, rlops_cuda

OP = "policy_loss"
SHAPES = [(16384, 32000), (16384, 151936)]
DEFAULT_SHAPES = SHAPES
QUICK_SHAPES = [(64, 1000)]
BATCH = 8
BETA, CLIP_LOW, CLIP_HIGH = 0.04, 0.2, 0.28


def bytes_moved(n: int, v: int, elem: int) -> dict[str, int]:
    return {"fwd": n * v * elem, "bwd": 2 * n * v * elem, "fwd_bwd": 3 * n * v * elem}


def setup(n: int, v: int, dtype: torch.dtype, device: torch.device) -> dict[str, torch.Tensor]:
    batch = BATCH if n % BATCH == 0 else 1
    time = n // batch
    g = torch.Generator(device=device).manual_seed(0)
    logits = (torch.randn(batch, time + 1, v, generator=g, device=device) * 3).to(dtype)
    return {
        "logits": logits,
        "tokens": torch.randint(0, v, (batch, time), generator=g, device=device),
        "advantages": torch.randn(batch, generator=g, device=device),
        "mask": torch.ones(batch, time, dtype=torch.bool, device=device),
        "old_logprobs": -torch.rand(batch, time, generator=g, device=device) * 12,
        "ref_logprobs": -torch.rand(batch, time, generator=g, device=device) * 12,
    }


def _trl(x: torch.Tensor, i: dict[str, torch.Tensor]) -> torch.Tensor:
    return baselines.trl_grpo_loss(x[:, :-1], i["tokens"], i["advantages"], i["mask"],
                                   old_per_token_logps=i["old_logprobs"], ref_per_token_logps=i["ref_logprobs"],
                                   loss_type="dapo", epsilon_low=CLIP_LOW, epsilon_high=CLIP_HIGH, beta=BETA)


def _verl(x: torch.Tensor, i: dict[str, torch.Tensor]) -> torch.Tensor:
    return baselines.verl_actor_loss(x[:, :-1], i["tokens"], i["advantages"][:, None], i["mask"],
                                     old_log_prob=i["old_logprobs"], ref_log_prob=i["ref_logprobs"],
                                     clip_ratio_low=CLIP_LOW, clip_ratio_high=CLIP_HIGH, kl_loss_coef=BETA)


def _liger(x: torch.Tensor, i: dict[str, torch.Tensor]) -> torch.Tensor:
    try:
        from liger_kernel.transformers.grpo_loss import triton_grpo_loss
    except ImportError as e:
        raise Skip(f"liger-kernel is not importable ({e})") from e
    if not x.is_cuda:
        raise Skip("Liger's kernels run on CUDA only")
    loss, _ = triton_grpo_loss(x, i["old_logprobs"], i["ref_logprobs"], i["tokens"], i["advantages"], i["mask"],
                               temperature=1.0, beta=BETA, eps_low=CLIP_LOW, eps_high=CLIP_HIGH, inplace=True,
                               loss_type="dapo", reduce=True)
    return loss


def _rlops(inplace: bool, backend: str = "triton") -> Callable[[torch.Tensor, dict[str, torch.Tensor]], torch.Tensor]:
    def run(x: torch.Tensor, i: dict[str, torch.Tensor]) -> torch.Tensor:
        # The (B, T + 1, V) logits as they are, as Liger's take them (rlops leaves out the last position).
        return policy_loss(x, i["tokens"], i["advantages"], mask=i["mask"], old_logprobs=i["old_logprobs"],
                           ref_logprobs=i["ref_logprobs"], kl_coef=BETA, kl_estimator="k3", clip_low=CLIP_LOW,
                           clip_high=CLIP_HIGH, loss_agg="token-mean", inplace_grad=inplace,
                           backend=backend).loss

    return run


PROVIDERS: dict[str, Callable[[torch.Tensor, dict[str, torch.Tensor]], torch.Tensor]] = {
    "eager-trl": _trl,
    "eager-verl": _verl,
    "torch-compile": compiled_provider(_trl),
    "liger": _liger,
    "rlops-triton": _rlops(inplace=False),
    "rlops-triton-inplace": _rlops(inplace=True),
    "rlops-cuda": rlops_cuda(_rlops(inplace=False, backend="cuda")),
}
# Providers that write the gradient over the logits: no gradient buffer of their own.
INPLACE = {"liger", "rlops-triton-inplace"}


def grad_bytes(provider: str, inputs: dict[str, torch.Tensor]) -> int:
    logits = inputs["logits"]
    return 0 if provider in INPLACE else logits.numel() * logits.element_size()


def make_step(provider: str, inputs: dict[str, torch.Tensor]) -> tuple[Callable, Callable]:
    """(forward, forward+backward) closures; the gradient is taken with respect to the logits
    (common.logits_steps)."""
    return logits_steps(PROVIDERS[provider], inputs)
