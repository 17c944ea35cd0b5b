"""linear_policy_loss: the GRPO loss from last hidden states and the lm_head, forward and backward.

The setting of bench/policy_loss.py (old log-probs, k3 KL with beta 0.04, clip 0.2 / 0.28,
token mean, per-sequence advantages), on hidden (N, H) and weight (V, H) in bf16 instead of
logits. The work is three matmuls (logits, grad of hidden, grad of weight: 6 N V H flops), so
the yardstick is the "matmuls" provider, which runs just those three on the same shapes.

rlops computes the gradient during the forward when one is needed (the chunk's logits are
not kept), so its "fwd" holds nearly all the work and its "bwd" (fwd+bwd minus fwd) only
the scaling by the upstream gradient: near zero, and within timing noise of it.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

from rlops import baselines, linear_policy_loss

from .common import Skip, rlops_cuda

OP = "linear_policy_loss"
SHAPE_KEYS = ("N", "V", "H")
SHAPES = [(n, 151936, 4096) for n in (4096, 16384, 65536)]
DEFAULT_SHAPES = SHAPES
QUICK_SHAPES = [(64, 1000, 32)]
BATCH = 8
BETA, CLIP_LOW, CLIP_HIGH = 0.04, 0.2, 0.28


def bytes_moved(n: int, v: int, h: int, elem: int) -> dict[str, int]:
    """Hidden and weight read, their gradients written: tiny next to the flops, for reference."""
    return {"fwd": (n + v) * h * elem, "bwd": 2 * (n + v) * h * elem, "fwd_bwd": 2 * (n + v) * h * elem}


def flops(n: int, v: int, h: int) -> dict[str, int]:
    return {"fwd": 2 * n * v * h, "bwd": 4 * n * v * h, "fwd_bwd": 6 * n * v * h}


def setup(n: int, v: int, h: int, dtype: torch.dtype, device: torch.device) -> dict[str, torch.Tensor]:
    batch = BATCH if n % BATCH == 0 else 1
    time = n // batch
    g = torch.Generator(device=device).manual_seed(0)
    return {
        "hidden": torch.randn(batch, time, h, generator=g, device=device).to(dtype),
        "weight": (torch.randn(v, h, generator=g, device=device) / h**0.5).to(dtype),
        "tokens": torch.randint(0, v, (batch, time), generator=g, device=device),
        "advantages": torch.randn(batch, generator=g, device=device),
        "mask": torch.ones(batch, time, dtype=torch.bool, device=device),
        "old_logprobs": -torch.rand(batch, time, generator=g, device=device) * 12,
        "ref_logprobs": -torch.rand(batch, time, generator=g, device=device) * 12,
    }


def _matmuls(h: torch.Tensor, w: torch.Tensor, i: dict[str, torch.Tensor]) -> torch.Tensor:
    # The floor: logits, then (via autograd) the gradients of hidden and weight.
    return F.linear(h, w).float().sum()


def _eager(h: torch.Tensor, w: torch.Tensor, i: dict[str, torch.Tensor]) -> torch.Tensor:
    return baselines.trl_grpo_loss(F.linear(h, w), i["tokens"], i["advantages"], i["mask"],
                                   old_per_token_logps=i["old_logprobs"], ref_per_token_logps=i["ref_logprobs"],
                                   loss_type="dapo", epsilon_low=CLIP_LOW, epsilon_high=CLIP_HIGH, beta=BETA)


_liger_loss = None


def _liger(h: torch.Tensor, w: torch.Tensor, i: dict[str, torch.Tensor]) -> torch.Tensor:
    global _liger_loss
    try:
        from liger_kernel.chunked_loss import LigerFusedLinearGRPOLoss
    except ImportError as e:
        raise Skip(f"liger-kernel is not importable ({e})") from e
    if not h.is_cuda:
        raise Skip("Liger is compared on CUDA only")
    if _liger_loss is None:
        _liger_loss = LigerFusedLinearGRPOLoss(beta=BETA, use_ref_model=True, epsilon_low=CLIP_LOW,
                                               epsilon_high=CLIP_HIGH, loss_type="dapo", temperature=1.0)
    return _liger_loss(h, w, i["tokens"], i["mask"].float(), i["advantages"], ref_per_token_logps=i["ref_logprobs"],
                       old_per_token_logps=i["old_logprobs"])[0]


def _cce(h: torch.Tensor, w: torch.Tensor, i: dict[str, torch.Tensor]) -> torch.Tensor:
    """Cut Cross-Entropy's log-probs (no entropy), then TRL's loss on them in eager PyTorch."""
    try:
        from cut_cross_entropy import linear_cross_entropy
    except ImportError as e:
        raise Skip(f"cut-cross-entropy is not importable ({e})") from e
    if not h.is_cuda:
        raise Skip("Cut Cross-Entropy runs on CUDA only")
    logp = -linear_cross_entropy(h, w, i["tokens"], reduction="none")
    coef_1 = torch.exp(logp - i["old_logprobs"])
    adv = i["advantages"][:, None]
    per_token = -torch.min(coef_1 * adv, torch.clamp(coef_1, 1 - CLIP_LOW, 1 + CLIP_HIGH) * adv)
    d = i["ref_logprobs"] - logp
    per_token = per_token + BETA * (torch.exp(d) - d - 1)
    mask = i["mask"].float()
    return (per_token * mask).sum() / mask.sum()


def _rlops(backend: str) -> Callable[..., torch.Tensor]:
    def run(h: torch.Tensor, w: torch.Tensor, i: dict[str, torch.Tensor]) -> torch.Tensor:
        return linear_policy_loss(h, w, i["tokens"], i["advantages"], mask=i["mask"], old_logprobs=i["old_logprobs"],
                                  ref_logprobs=i["ref_logprobs"], kl_coef=BETA, clip_low=CLIP_LOW,
                                  clip_high=CLIP_HIGH, backend=backend).loss

    return run


PROVIDERS: dict[str, Callable[..., torch.Tensor]] = {
    "matmuls": _matmuls,
    "eager-trl": _eager,
    "liger": _liger,
    "cce": _cce,
    "rlops-triton": _rlops("triton"),
    "rlops-cuda": rlops_cuda(_rlops("cuda")),
}


def grad_bytes(provider: str, inputs: dict[str, torch.Tensor]) -> int:
    """The gradients every provider returns: of hidden and of weight."""
    return sum(inputs[k].numel() * inputs[k].element_size() for k in ("hidden", "weight"))


def make_step(provider: str, inputs: dict[str, torch.Tensor]) -> tuple[Callable, Callable]:
    fn = PROVIDERS[provider]
    hidden = inputs["hidden"].requires_grad_(True)
    weight = inputs["weight"].requires_grad_(True)

    def forward() -> torch.Tensor:
        return fn(hidden, weight, inputs)

    def forward_backward() -> tuple[torch.Tensor, ...]:
        return torch.autograd.grad(forward(), (hidden, weight))

    return forward, forward_backward
