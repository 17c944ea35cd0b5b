"""Advantages and rewards for PPO and GRPO (SPEC.md section 5): GAE, group advantages, whitening.

All of these produce training targets, not losses: inputs are detached and nothing here
carries a gradient.
"""

from __future__ import annotations

import torch
from torch import Tensor

from . import torch_backend
from ._validation import check_choice, check_float, check_float_tensor, check_mask, check_tensor
from .ops.gae import gae_dispatch


def _unit_interval(name: str, value: object) -> float:
    value = check_float(name, value)
    if not 0.0 <= value <= 1.0:
        raise ValueError(f"{name} must lie in [0, 1], got {value}")
    return value


def gae(
    rewards: Tensor,
    values: Tensor,
    mask: Tensor | None = None,
    *,
    gamma: float = 1.0,
    lam: float = 0.95,
    bootstrap: Tensor | None = None,
    backend: str = "auto",
) -> tuple[Tensor, Tensor]:
    """Generalised advantage estimation with masked positions skipped (SPEC.md section 5).

        delta_t = r_t + gamma * V_next - V_t,   A_t = delta_t + gamma * lam * A_next,   returns = A + V

    V_next and A_next come from the next position whose mask is 1: masked positions
    (multi-turn observation tokens, padding) carry the running values through, as in verl.
    Past the last valid token V_next is `bootstrap` (or 0) and A_next is 0.

    Args:
        rewards: (B, T) float token-level rewards (e.g. from `kl_shaped_rewards`).
        values: (B, T) float critic values.
        mask: (B, T) bool or 0/1, 1 = a response token; None = all.
        gamma, lam: discount and GAE lambda, in [0, 1].
        bootstrap: (B,) float value of the state after the last valid token, or None (0).
        backend: "auto" (the reverse-scan Triton kernel on CUDA, the PyTorch backend's loop on CPU),
            "triton", "cuda" or "torch".

    Returns:
        (advantages, returns): float32 (B, T), 0 where mask is 0. Not whitened: see
        `masked_whiten`.
    """
    rewards = check_tensor("rewards", rewards)
    if rewards.dim() != 2 or not rewards.is_floating_point():
        raise ValueError(f"rewards must be a floating-point (B, T) tensor, got {rewards.dtype} {tuple(rewards.shape)}")
    shape = tuple(rewards.shape)
    values = check_float_tensor("values", values, rewards, [shape], f"rewards' shape (B, T) = {shape}")
    mask = torch.ones(shape, dtype=torch.bool, device=rewards.device) if mask is None \
        else check_mask(mask, shape, rewards)
    if bootstrap is not None:
        bootstrap = check_float_tensor("bootstrap", bootstrap, rewards, [shape[:1]], f"(B,) = {shape[:1]}")
        bootstrap = bootstrap.detach()
    gamma, lam = _unit_interval("gamma", gamma), _unit_interval("lam", lam)
    return gae_dispatch(rewards.detach(), values.detach(), mask, bootstrap, (gamma, lam), backend)


def group_advantages(
    rewards: Tensor,
    group_size: int | None = None,
    group_ids: Tensor | None = None,
    *,
    scale_by_std: bool = True,
    eps: float = 1e-6,
) -> Tensor:
    """GRPO's group-relative advantage of each response: (R_i - mean_g) / (std_g + eps).

    Args:
        rewards: (B,) or (B, 1) float sequence rewards.
        group_size: G, when the batch holds groups of G consecutive responses to one prompt.
        group_ids: (B,) integer group of each response (any order), instead of group_size.
        scale_by_std: False gives R_i - mean_g (Dr. GRPO).
        eps: added to the unbiased group std.

    Returns:
        float32 (B,). A group of one response gets 0.
    """
    rewards = check_tensor("rewards", rewards)
    if not rewards.is_floating_point() or rewards.dim() not in (1, 2) or (rewards.dim() == 2 and rewards.shape[1] != 1):
        raise ValueError(f"rewards must be a floating-point (B,) or (B, 1) tensor, got {rewards.dtype} "
                         f"{tuple(rewards.shape)}")
    r = rewards.detach().reshape(-1).to(torch.float32)
    n = r.shape[0]
    if (group_size is None) == (group_ids is None):
        raise ValueError("give exactly one of group_size (consecutive groups) and group_ids")
    if group_size is not None:
        if isinstance(group_size, bool) or not isinstance(group_size, int) or group_size < 1:
            raise ValueError(f"group_size must be an int >= 1, got {group_size!r}")
        if n % group_size:
            raise ValueError(f"group_size {group_size} does not divide the batch of {n} rewards")
        ids = torch.arange(n, device=r.device) // group_size
    else:
        ids = check_tensor("group_ids", group_ids)
        if ids.dtype == torch.bool or ids.is_floating_point() or ids.is_complex() or ids.shape != (n,):
            raise ValueError(f"group_ids must be an integer (B,) = ({n},) tensor, got {ids.dtype} {tuple(ids.shape)}")
        if ids.device != r.device:
            raise ValueError(f"group_ids is on {ids.device} but rewards is on {r.device}")
        ids = torch.unique(ids, return_inverse=True)[1]
    eps = check_float("eps", eps, ge=0.0)
    n_groups = int(ids.max()) + 1 if n else 0
    count = torch.zeros(n_groups, device=r.device).index_add_(0, ids, torch.ones_like(r))
    mean = torch.zeros(n_groups, device=r.device).index_add_(0, ids, r) / count
    centered = r - mean[ids]
    if not scale_by_std:
        return centered
    sq = torch.zeros(n_groups, device=r.device).index_add_(0, ids, centered * centered)
    std = torch.where(count > 1, sq / (count - 1).clamp(min=1), 0.0).sqrt()
    return centered / (std[ids] + eps)


def masked_whiten(x: Tensor, mask: Tensor | None = None, *, shift_mean: bool = True) -> Tensor:
    """(x - mean) / sqrt(var + 1e-8) over the masked entries, variance unbiased (SPEC.md section 5).

    x: (...) float; mask: x's shape, bool or 0/1 (None = all). shift_mean=False adds the
    mean back (TRL's option for rewards). Returns float32 of x's shape, 0 where mask is 0;
    with fewer than two masked entries the variance is taken as 0.
    """
    x = check_tensor("x", x)
    if not x.is_floating_point():
        raise TypeError(f"x must be a floating-point tensor, got {x.dtype}")
    m = torch.ones(x.shape, dtype=torch.bool, device=x.device) if mask is None \
        else check_mask(mask, tuple(x.shape), x)
    v = torch.where(m, x.detach().to(torch.float32), 0.0)
    n = m.sum()
    mean = v.sum() / n.clamp(min=1)
    centered = torch.where(m, v - mean, 0.0)
    var = (centered * centered).sum() / (n - 1).clamp(min=1)
    whitened = centered * torch.rsqrt(var + 1e-8)
    if not shift_mean:
        whitened = whitened + mean
    return torch.where(m, whitened, 0.0)


def kl_shaped_rewards(
    scores: Tensor,
    logprobs: Tensor,
    ref_logprobs: Tensor,
    mask: Tensor,
    kl_coef: float,
    estimator: str = "k1",
) -> Tensor:
    """The PPO-RLHF token reward: -kl_coef * KL per token, plus the sequence score on its last valid token.

    Args:
        scores: (B,) or (B, 1) float reward-model scores.
        logprobs, ref_logprobs: (B, T) float log-probs of the sampled tokens under the policy
            and the reference model.
        mask: (B, T) bool or 0/1 response mask.
        kl_coef: >= 0.
        estimator: "k1" (TRL's and OpenRLHF's default), "k2" or "k3" (SPEC.md section 3).

    Returns:
        float32 (B, T) rewards, 0 where mask is 0. A row with no valid token gets no score.
    """
    logprobs = check_tensor("logprobs", logprobs)
    if logprobs.dim() != 2 or not logprobs.is_floating_point():
        raise ValueError(f"logprobs must be a floating-point (B, T) tensor, got {logprobs.dtype} "
                         f"{tuple(logprobs.shape)}")
    shape = tuple(logprobs.shape)
    ref_logprobs = check_float_tensor("ref_logprobs", ref_logprobs, logprobs, [shape], f"(B, T) = {shape}")
    scores = check_float_tensor("scores", scores, logprobs, [shape[:1], (shape[0], 1)], "(B,) or (B, 1)")
    m = check_mask(mask, shape, logprobs)
    kl_coef = check_float("kl_coef", kl_coef, ge=0.0)
    check_choice("estimator", estimator, ("k1", "k2", "k3"))
    lp = torch.where(m, logprobs.detach().to(torch.float32), 0.0)
    ref = torch.where(m, ref_logprobs.detach().to(torch.float32), 0.0)
    rewards = torch.where(m, -kl_coef * torch_backend.kl_penalty(lp, ref, estimator), 0.0)
    positions = torch.arange(shape[1], device=m.device).expand(shape)
    last = torch.where(m, positions, -1).amax(-1)  # -1: no valid token
    has_token = last >= 0
    rows = torch.arange(shape[0], device=m.device)[has_token]
    rewards[rows, last[has_token]] += scores.detach().reshape(-1).to(torch.float32)[has_token]
    return rewards
