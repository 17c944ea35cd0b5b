"""OpenRLHF drop-ins: `PolicyLoss`, `ValueLoss`, `compute_approx_kl`, `log_probs_from_logits`,
`compute_entropy`.

    from rlops.integrations.openrlhf import PolicyLoss, log_probs_from_logits

Same constructor and call signatures and return values as OpenRLHF 0.11.2
(openrlhf/models/loss.py, openrlhf/models/utils.py), with OpenRLHF's own semantics where they
differ from SPEC.md: every KL estimator is clamped to +-10 and k3's log-ratio below at -10;
GSPO's sequence ratio is not clamped. One deliberate difference: `log_probs_from_logits`
does not divide the caller's logits by the temperature in place, as OpenRLHF does.

Packed samples (--ds.packing_samples): since v0.7.0, OpenRLHF packs inside Actor.forward only
(openrlhf/models/actor.py with ring_attn_utils.unpad_and_slice_tensor): the model runs on the
sequences unpadded into one row, and `log_probs_from_logits(logits (1, total_nnz, V) float32,
rolled_sequences (1, total_nnz))` and `compute_entropy(logits)` take that packed row (each
ring-attention rank its padded slice); gather_and_pad_tensor then pads the results back to
(B, T). PolicyLoss, ValueLoss, compute_approx_kl and aggregate_loss therefore always receive
padded (B, A) tensors with action_mask (B, A), sequence boundaries being the rows; their
drop-ins take that layout. The row-wise drop-ins take the packed (1, total_nnz) row as it comes.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from .. import objectives, torch_backend
from ..ops.token_stats import named_token_logprobs, token_logprobs_and_entropy
from ..packing import Layout

KL_IS_WEIGHT_CLIP = 10.0  # OpenRLHF's bound on the importance weight of its unbiased KL gradient


def log_probs_from_logits(logits: Tensor, labels: Tensor, temperature: float = 1.0, *,
                          backend: str = "auto") -> Tensor:
    """OpenRLHF's `log_probs_from_logits`: log softmax(logits / temperature) at labels, fused.

    logits (..., V), labels (...): padded (B, T, V) or the packed row of packing_samples,
    (1, total_nnz, V) with the rolled sequences (1, total_nnz). Float32 of labels' shape
    (OpenRLHF returns the logits' dtype for half-precision logits). backend: as
    `rlops.token_logprobs`.
    """
    return named_token_logprobs(logits, labels, temperature, backend, "labels")


def compute_entropy(logits: Tensor, *, backend: str = "auto") -> Tensor:
    """OpenRLHF's `compute_entropy`: the entropy of softmax(logits) per row, fused.

    logits (..., V), padded (B, T, V) or packed (1, total_nnz, V); float32 logits.shape[:-1]
    (OpenRLHF's actor hands it float32 logits already divided by the temperature).
    backend: as `rlops.token_logprobs_and_entropy`.
    """
    tokens = torch.zeros(logits.shape[:-1], dtype=torch.long, device=logits.device)
    return token_logprobs_and_entropy(logits, tokens, backend=backend)[1]


def compute_approx_kl(log_probs: Tensor, log_probs_base: Tensor, log_probs_old: Tensor | None = None,
                      kl_estimator: str = "k1", unbiased_gradient: bool = False) -> Tensor:
    """OpenRLHF's `compute_approx_kl`: k1, k2 or k3 of log_probs against log_probs_base, clamped to
    +-10; with unbiased_gradient, the value of the estimator with the gradient of w * k2 (w the
    clamped, detached importance weight against log_probs_old)."""
    if kl_estimator not in ("k1", "k2", "k3"):
        raise ValueError(f"Unknown kl_estimator: {kl_estimator}")
    log_ratio = log_probs.float() - log_probs_base.float()
    # OpenRLHF bounds k3's log-ratio below at -10 before the exponential, the reference at
    # +-20 (SPEC); past either bound k3 exceeds the +-10 cap, so values and gradients agree.
    value = torch_backend.kl_penalty(log_ratio, torch.zeros_like(log_ratio), kl_estimator).clamp(min=-10, max=10)
    if not unbiased_gradient:
        return value
    weight = 1.0 if log_probs_old is None else \
        (log_probs.float() - log_probs_old.float()).exp().clamp(max=KL_IS_WEIGHT_CLIP).detach()
    surrogate = weight * (log_ratio**2 / 2.0)
    return value.detach() + surrogate - surrogate.detach()


def aggregate_loss(loss: Tensor, loss_mask: Tensor, token_level_loss: bool = True, dp_size: int = 1,
                   batch_num_tokens: float | None = None, global_batch_size: float | None = None) -> Tensor:
    """OpenRLHF's `aggregate_loss`: per-token or per-sequence mean, with its global-batch arguments."""
    mask = loss_mask.to(loss.dtype)
    if token_level_loss:
        if batch_num_tokens is None:
            return (loss * mask).sum() / mask.sum()
        return (loss * mask).sum() / batch_num_tokens * dp_size
    counts = mask.sum(-1)
    seq_loss = (loss * mask).sum(-1) / (counts + 1e-8)
    seq_mask = (counts > 0).to(loss.dtype)
    if global_batch_size is None:
        return (seq_loss * seq_mask).sum() / seq_mask.sum()
    return (seq_loss * seq_mask).sum() / global_batch_size * dp_size


def _masked_mean(x: Tensor, mask: Tensor, dim: int | None = None) -> Tensor:
    return (x * mask).sum(dim=dim) / mask.sum(dim=dim)


class PolicyLoss(nn.Module):
    """OpenRLHF's PPO / GSPO policy loss; forward returns (loss, clip_ratio, ppo_kl, vllm_kl, is_filter_ratio).

    log_probs, old_log_probs, advantages, action_mask, rollout_log_probs: (B, A), one response
    per row, as OpenRLHF 0.11.2 passes them with or without packing_samples (its actor pads the
    packed log-probs back before the loss).
    """

    def __init__(self, clip_eps_low: float = 0.2, clip_eps_high: float = 0.2, dual_clip: float | None = None,
                 token_level_loss: bool = True, policy_loss_type: str = "ppo", is_correction_level: str = "off",
                 is_correction_mode: str = "mask", is_correction_gating: str = "ratio",
                 is_correction_threshold: tuple[float, float] = (0.5, 5.0)) -> None:
        super().__init__()
        if policy_loss_type not in ("ppo", "gspo"):
            raise ValueError(f"Invalid policy loss type: {policy_loss_type}")
        if dual_clip is not None and not dual_clip > 1.0:
            raise ValueError(f"dual_clip must be > 1.0, got {dual_clip}")
        if is_correction_level not in {"off", "token", "seq"}:
            raise ValueError(f"is_correction_level must be off/token/seq, got {is_correction_level}")
        if is_correction_mode not in {"mask", "clip"}:
            raise ValueError(f"is_correction_mode must be mask/clip, got {is_correction_mode}")
        if is_correction_gating not in {"ratio", "binary_kl", "tv"}:
            raise ValueError(f"is_correction_gating must be ratio/binary_kl/tv, got {is_correction_gating}")
        if is_correction_mode == "clip" and (is_correction_level == "seq" or is_correction_gating != "ratio"):
            raise ValueError("is_correction_mode=clip requires is_correction_level=token and "
                             "is_correction_gating=ratio")
        if is_correction_gating != "ratio" and is_correction_level != "off" and is_correction_threshold[0] > 0:
            raise ValueError(f"is_correction_gating={is_correction_gating} takes an upper bound only (a single delta)")
        self.clip_eps_low, self.clip_eps_high, self.dual_clip = clip_eps_low, clip_eps_high, dual_clip
        self.policy_loss_type = policy_loss_type
        self.token_level_loss = token_level_loss and policy_loss_type != "gspo"  # GSPO: per-sequence mean
        self.is_correction_level, self.is_correction_mode = is_correction_level, is_correction_mode
        self.is_correction_gating, self.is_correction_threshold = is_correction_gating, is_correction_threshold

    def forward(self, log_probs: Tensor, old_log_probs: Tensor, advantages: Tensor,
                action_mask: Tensor | None = None, rollout_log_probs: Tensor | None = None, dp_size: int = 1,
                batch_num_tokens: float | None = None, global_batch_size: float | None = None):
        mask = torch.ones_like(log_probs) if action_mask is None else action_mask.to(log_probs.dtype)
        raw_log_ratio = log_probs - old_log_probs
        if self.policy_loss_type == "ppo":
            log_r = torch_backend.log_ratio(log_probs, old_log_probs, Layout.of(mask.bool()))
        else:
            diff = log_probs - rollout_log_probs if self.is_correction_level != "off" else raw_log_ratio
            log_r = ((diff * mask).sum(-1) / mask.sum(-1).clamp(min=1)).unsqueeze(-1).expand_as(diff)
        coef, vllm_kl, filter_ratio = self._is_correction(old_log_probs, rollout_log_probs, mask)
        loss, _, clipped_low, clipped_high = objectives.clipped_surrogate(
            log_r, advantages, self.clip_eps_low, self.clip_eps_high, self.dual_clip, coef)
        loss = aggregate_loss(loss, mask, self.token_level_loss, dp_size, batch_num_tokens, global_batch_size)
        clip_ratio = _masked_mean((clipped_low | clipped_high).to(mask.dtype), mask)
        return loss, clip_ratio, _masked_mean(-raw_log_ratio.detach(), mask), vllm_kl, filter_ratio

    def _is_correction(self, old_log_probs: Tensor, rollout_log_probs: Tensor | None, mask: Tensor):
        """OpenRLHF's train/rollout importance-sampling correction: (coefficient or None, vllm_kl, filter ratio)."""
        if self.is_correction_level == "off" or self.policy_loss_type != "ppo":
            return None, None, None
        low, high = self.is_correction_threshold
        seq_level = self.is_correction_level == "seq"
        is_log_ratio = (old_log_probs - rollout_log_probs).detach()
        token_is = is_log_ratio.exp()
        if self.is_correction_gating == "ratio":
            stat = _masked_mean(is_log_ratio, mask, dim=-1).unsqueeze(-1) if seq_level else is_log_ratio
            stat = stat.exp()
        else:
            p = rollout_log_probs.exp().clamp(1e-6, 1 - 1e-6)
            q = old_log_probs.exp().clamp(1e-6, 1 - 1e-6)
            if self.is_correction_gating == "binary_kl":
                stat = p * (p / q).log() + (1 - p) * ((1 - p) / (1 - q)).log()
            else:
                stat = (p - q).abs()
            if seq_level:
                stat = _masked_mean(stat, mask, dim=-1).unsqueeze(-1)
        if self.is_correction_mode == "clip":
            coef, filtered = stat.clamp(min=low, max=high), (stat < low) | (stat > high)
        else:
            keep = (stat >= low) & (stat <= high)
            coef, filtered = torch.where(keep, token_is, 0.0), ~keep
        filter_ratio = filtered.float().mean() if seq_level else _masked_mean(filtered.float(), mask)
        return coef.expand_as(mask), _masked_mean(rollout_log_probs - old_log_probs, mask), filter_ratio


class ValueLoss(nn.Module):
    """OpenRLHF's clipped value loss: 0.5 * mean of max((clip(v) - R)^2, (v - R)^2)."""

    def __init__(self, clip_eps: float | None = None, token_level_loss: bool = True) -> None:
        super().__init__()
        self.clip_eps, self.token_level_loss = clip_eps, token_level_loss

    def forward(self, values: Tensor, old_values: Tensor, returns: Tensor, action_mask: Tensor | None = None,
                dp_size: int = 1, batch_num_tokens: float | None = None,
                global_batch_size: float | None = None) -> Tensor:
        loss = (values - returns) ** 2
        if self.clip_eps is not None:
            clipped = old_values + (values - old_values).clamp(-self.clip_eps, self.clip_eps)
            loss = torch.max((clipped - returns) ** 2, loss)
        mask = torch.ones_like(values) if action_mask is None else action_mask
        return 0.5 * aggregate_loss(loss, mask, self.token_level_loss, dp_size, batch_num_tokens, global_batch_size)


__all__ = ["PolicyLoss", "ValueLoss", "aggregate_loss", "compute_approx_kl", "compute_entropy", "log_probs_from_logits"]
