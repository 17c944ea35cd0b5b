"""objectives: rlops.policy_loss forward and backward with each objective and option, beside the clip.

Issue 14's GPU check: every objective's fwd+bwd time within 5% of the clipped surrogate's at
N=16384, V=151936, bf16. The per-token objectives run in the fused kernel's epilogue, the
coupled ones (GMPO, VESPO, Clip-Cov, KL-Cov, the off-policy mask, the entropy quantile) as an
O(B*T) epilogue on the fused statistics, the rollout correction before the kernel: each provider
is one of them on bench/policy_loss.py's batch and settings (old log-probs, k3 KL with beta 0.04,
clip 0.2 / 0.28, token mean), with the rollout engine's log-probs beside the old ones. Providers
are rlops' only: the comparison is with rlops-clip.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from rlops import RolloutCorrection, policy_loss

from . import policy_loss as plain
from .common import logits_steps

OP = "objectives"
SHAPES = [(16384, 151936)]
DEFAULT_SHAPES = SHAPES
QUICK_SHAPES = [(8, 64)]
bytes_moved = plain.bytes_moved

BASE = {"kl_coef": plain.BETA, "kl_estimator": "k3", "clip_low": plain.CLIP_LOW, "clip_high": plain.CLIP_HIGH,
        "loss_agg": "token-mean"}
# provider -> the options it adds to BASE (the rollout correction also reads rollout_logprobs).
VARIANTS: dict[str, dict[str, object]] = {
    "rlops-clip": {},
    "rlops-cispo": {"objective": "cispo"},
    "rlops-sapo": {"objective": "sapo"},
    "rlops-reinforce": {"objective": "reinforce"},
    "rlops-dro": {"objective": "dro", "dro_beta": 0.1},
    "rlops-dppo_tv": {"objective": "dppo_tv", "ratio_cap": 20.0},
    "rlops-dppo_kl": {"objective": "dppo_kl", "ratio_cap": 20.0},
    "rlops-gmpo": {"objective": "gmpo"},
    "rlops-vespo": {"objective": "vespo"},
    "rlops-clip_cov": {"objective": "clip_cov"},
    "rlops-kl_cov": {"objective": "kl_cov"},
    "rlops-off_policy_mask": {"off_policy_mask": 0.1},
    "rlops-top_entropy": {"top_entropy_quantile": 0.2},
    "rlops-rollout_correction": {"rollout_correction": RolloutCorrection.from_trl("token_truncate", None, 2.0)},
}


def setup(n: int, v: int, dtype: torch.dtype, device: torch.device) -> dict[str, torch.Tensor]:
    inputs = plain.setup(n, v, dtype, device)
    g = torch.Generator(device=device).manual_seed(1)
    inputs["rollout_logprobs"] = inputs["old_logprobs"] + 0.1 * torch.randn(inputs["old_logprobs"].shape,
                                                                              generator=g, device=device)
    return inputs


def _provider(options: dict[str, object]) -> Callable[[torch.Tensor, dict[str, torch.Tensor]], torch.Tensor]:
    def run(x: torch.Tensor, i: dict[str, torch.Tensor]) -> torch.Tensor:
        # The (B, T + 1, V) logits whole, as bench/policy_loss.py passes them: no slice's copy hides the epilogues.
        return policy_loss(x, i["tokens"], i["advantages"], mask=i["mask"], old_logprobs=i["old_logprobs"],
                           ref_logprobs=i["ref_logprobs"], rollout_logprobs=i["rollout_logprobs"], backend="triton",
                           **BASE, **options).loss

    return run


PROVIDERS: dict[str, Callable[[torch.Tensor, dict[str, torch.Tensor]], torch.Tensor]] = {
    name: _provider(options) for name, options in VARIANTS.items()}


def grad_bytes(provider: str, inputs: dict[str, torch.Tensor]) -> int:
    logits = inputs["logits"]
    return logits.numel() * logits.element_size()


def make_step(provider: str, inputs: dict[str, torch.Tensor]) -> tuple[Callable, Callable]:
    """(forward, forward+backward) closures with respect to the logits (common.logits_steps)."""
    return logits_steps(PROVIDERS[provider], inputs)
