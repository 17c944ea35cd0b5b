"""Outcome advantage estimators of verl 0.9.1's registry, vectorised over the batch (docs/advantages.md).

Every estimator here is one batch-wide computation: groups are dense int64 ids mapped once
(`group_size`, or `group_ids` of any integer labels, ranked by a sort), group statistics are
index_add / scatter_reduce over those ids, and token recurrences are cumulative sums or a
log2(T)-step doubling scan. There is no Python loop over groups, rows or time, and nothing is
read back from a GPU tensor (no device-to-host sync): the value checks (0/1 masks, groups of at
least two for pass@k) run on CPU tensors, and elsewhere only with RLOPS_CHECK=1
(rlops._validation.value_checks_enabled).

Conventions shared by all of them:
- Shapes: B responses, T response tokens. `scores` are per-response rewards (B,) or (B, 1)
  (verl's `token_level_rewards.sum(-1)`); `token_rewards` are (B, T); `response_mask` is a bool
  or 0/1 (B, T) tensor, 1 = a response token (zeros anywhere: padding, multi-turn observations).
- Groups: exactly one of `group_size` (G consecutive responses per prompt) and `group_ids`
  ((B,) integer group of each response, any order).
- `singleton` (the group-relative ones): a group of one response gets advantage 0 ("zero", as
  SPEC.md's GRPO) or, as verl's loops do, a baseline of 0 (and a std of 1): its own score
  ("score").
- Outputs are float32 and carry no gradient. Per-token advantages are 0 where the mask is 0.

Each function names the verl function it reproduces; rlops.integrations.verl exposes them under
verl's names and signatures, and tests/test_estimators.py compares both with verl itself.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from ._estimator_parts import (
    _counts,
    _groups,
    _like,
    _mask,
    _reverse_affine_scan,
    _scores,
    _singleton,
    _token_tensor,
    host_to_device,
    reward_to_go,
    whiten,
)
from ._validation import (
    check_float,
    check_float_tensor,
    check_mask,
    check_tensor,
    value_checks_enabled,
)
from .advantages import _unit_interval, group_scores, group_sum

__all__ = [
    "gdpo_advantages",
    "gpg_advantages",
    "grpo_advantages",
    "grpo_passk_advantages",
    "opo_advantages",
    "optimal_token_baseline_advantages",
    "reinforce_plus_plus_advantages",
    "reinforce_plus_plus_baseline_advantages",
    "remax_advantages",
    "reward_to_go",
    "rloo_advantages",
    "whiten",
]


# ---- per-response (outcome) estimators --------------------------------------------------------------------


def grpo_advantages(scores: Tensor, group_size: int | None = None, group_ids: Tensor | None = None, *,
                    eps: float = 1e-6, scale_by_std: bool = True, singleton: str = "zero") -> Tensor:
    """GRPO (Shao et al. 2024, arXiv:2402.03300): A_i = (R_i - mean_g) / (std_g + eps), std unbiased.

    verl: compute_grpo_outcome_advantage and compute_grpo_vectorized_outcome_advantage (both
    singleton="score"). scale_by_std=False gives R_i - mean_g (Dr. GRPO, arXiv:2503.20783).

    Args:
        scores: (B,) or (B, 1) float response rewards.
        group_size, group_ids: the groups (module docstring).
        eps: >= 0, added to the std.
        scale_by_std: divide by std_g + eps.
        singleton: "zero" or "score" (module docstring).

    Returns:
        float32 (B,).
    """
    r = _scores(scores)
    ids, n_groups = _groups(r.shape[0], group_size, group_ids, r, "scores")
    eps = check_float("eps", eps, ge=0.0)
    return group_scores(r, ids, n_groups, eps=eps, scale_by_std=scale_by_std, singleton=_singleton(singleton))


def grpo_passk_advantages(scores: Tensor, group_size: int | None = None, group_ids: Tensor | None = None, *,
                          eps: float = 1e-6, scale_by_std: bool = True) -> Tensor:
    """Pass@k (Tang et al. 2025, arXiv:2503.19595, as verl cites it): only each group's best response gets an
    advantage, (R_max - R_second) / (std_g + eps) (std unbiased; without scale_by_std, no division).

    verl: compute_grpo_passk_outcome_advantage. Ties at the top give R_max - R_second = 0, so which
    of the tied responses is "best" does not matter.

    Args:
        scores: (B,) or (B, 1) float response rewards.
        group_size, group_ids: the groups; every group needs at least two responses (verl raises
            otherwise). Checked on CPU tensors (and with RLOPS_CHECK=1); unchecked, a group of one
            gets 0.
        eps: >= 0, added to the std.

    Returns:
        float32 (B,): 0 except at each group's best response.
    """
    r = _scores(scores)
    ids, n_groups = _groups(r.shape[0], group_size, group_ids, r, "scores")
    eps = check_float("eps", eps, ge=0.0)
    count = _counts(ids, n_groups)
    if r.numel() and value_checks_enabled(r) and bool((count < 2).any()):
        what = "group_size" if group_size is not None else "group_ids"
        raise ValueError(f"grpo_passk needs at least 2 responses per group; {what} gives a group of 1")
    top = r.new_full((n_groups,), -torch.inf).scatter_reduce(0, ids, r, "amax")[ids]
    is_top = r == top
    n_top = group_sum(is_top.float(), ids, n_groups)[ids]
    second = r.new_full((n_groups,), -torch.inf).scatter_reduce(0, ids, torch.where(is_top, -torch.inf, r),
                                                                "amax")[ids]
    best = is_top & (n_top == 1) & (count >= 2)  # a unique best: the others' top is finite
    adv = top - torch.where(best, second, top)
    if scale_by_std:
        mean = group_sum(r, ids, n_groups)[ids] / count
        sq = group_sum((r - mean) ** 2, ids, n_groups)[ids]
        adv = adv / ((sq / (count - 1).clamp(min=1)).sqrt() + eps)
    return torch.where(best, adv, 0.0)


def rloo_advantages(scores: Tensor, group_size: int | None = None, group_ids: Tensor | None = None, *,
                    singleton: str = "zero") -> Tensor:
    """RLOO (Ahmadian et al. 2024, arXiv:2402.14740): the leave-one-out baseline,
    A_i = R_i - (sum_g R - R_i) / (n_g - 1) = (n_g R_i - sum_g R) / (n_g - 1).

    verl: compute_rloo_outcome_advantage (its loop: a group of one keeps its score, singleton=
    "score") and compute_rloo_vectorized_outcome_advantage (a group of one gets 0, "zero").

    Args:
        scores: (B,) or (B, 1) float response rewards.
        group_size, group_ids, singleton: module docstring.

    Returns:
        float32 (B,).
    """
    r = _scores(scores)
    ids, n_groups = _groups(r.shape[0], group_size, group_ids, r, "scores")
    singleton = _singleton(singleton)
    count = _counts(ids, n_groups)
    adv = (count * r - group_sum(r, ids, n_groups)[ids]) / (count - 1).clamp(min=1)
    return torch.where(count > 1, adv, r if singleton == "score" else 0.0)


def opo_advantages(scores: Tensor, lengths: Tensor, group_size: int | None = None, group_ids: Tensor | None = None,
                   *, singleton: str = "zero") -> Tensor:
    """OPO (Hao et al. 2025, arXiv:2505.23585): the length-weighted group baseline,
    A_i = R_i - sum_g(L_j R_j) / sum_g L_j.

    verl: compute_opo_outcome_advantage (singleton="score"; lengths = response_mask.sum(-1)). A
    group whose lengths are all 0 gets baseline 0 (verl: 0/0 = NaN, on responses with no token).

    Args:
        scores: (B,) or (B, 1) float response rewards.
        lengths: (B,) response lengths (integer or float).
        group_size, group_ids, singleton: module docstring.

    Returns:
        float32 (B,).
    """
    r = _scores(scores)
    lengths = check_tensor("lengths", lengths)
    if lengths.dtype == torch.bool or lengths.is_complex() or lengths.shape != r.shape:
        raise ValueError(f"lengths must be an integer or float (B,) = ({r.shape[0]},) tensor, got {lengths.dtype} "
                         f"{tuple(lengths.shape)}")
    if lengths.device != r.device:
        raise ValueError(f"lengths is on {lengths.device} but scores is on {r.device}")
    ids, n_groups = _groups(r.shape[0], group_size, group_ids, r, "scores")
    singleton = _singleton(singleton)
    length = lengths.detach().to(torch.float32)
    total = group_sum(length, ids, n_groups)
    baseline = (group_sum(length * r, ids, n_groups) / torch.where(total == 0, 1.0, total))[ids]
    count = _counts(ids, n_groups)
    return torch.where(count > 1, r - baseline, r if singleton == "score" else 0.0)


def gpg_advantages(scores: Tensor, group_size: int | None = None, group_ids: Tensor | None = None, *,
                   f_norm: float = 1.0, singleton: str = "zero") -> Tensor:
    """GPG (Chu et al. 2025, arXiv:2504.02546): A_i = alpha (R_i - mean_g) / f_norm, with
    alpha = B / max(#{i : R_i != 0}, 1) over the whole batch.

    verl: compute_gpg_outcome_advantage (singleton="score"; its `alpha` argument is overwritten by
    this batch statistic and its `epsilon` is unused).

    Args:
        scores: (B,) or (B, 1) float response rewards.
        group_size, group_ids, singleton: module docstring.
        f_norm: > 0, the normaliser.

    Returns:
        float32 (B,).
    """
    r = _scores(scores)
    ids, n_groups = _groups(r.shape[0], group_size, group_ids, r, "scores")
    f_norm = check_float("f_norm", f_norm, gt=0.0)
    singleton = _singleton(singleton)
    count = _counts(ids, n_groups)
    mean = group_sum(r, ids, n_groups)[ids] / count.clamp(min=1)
    alpha = r.shape[0] / torch.count_nonzero(r).clamp(min=1)
    centered = torch.where(count > 1, r - mean, r if singleton == "score" else 0.0)
    return alpha * centered / f_norm


# ---- per-token estimators ---------------------------------------------------------------------------------


def reinforce_plus_plus_baseline_advantages(scores: Tensor, response_mask: Tensor, group_size: int | None = None,
                                            group_ids: Tensor | None = None, *,
                                            singleton: str = "zero") -> Tensor:
    """REINFORCE++-baseline (Hu 2025, arXiv:2501.03262): the group-mean baseline R_i - mean_g, on every
    response token, whitened over all response tokens of the batch.

    verl: compute_reinforce_plus_plus_baseline_outcome_advantage (singleton="score").

    Args:
        scores: (B,) or (B, 1) float response rewards.
        response_mask: bool or 0/1 (B, T).
        group_size, group_ids, singleton: module docstring.

    Returns:
        float32 (B, T), 0 where response_mask is 0.
    """
    r = _scores(scores)
    m = check_tensor("response_mask", response_mask)
    if m.dim() != 2 or m.shape[0] != r.shape[0]:
        raise ValueError(f"response_mask must have shape (B, T) with B = {r.shape[0]}, got {tuple(m.shape)}")
    m = check_mask(m, tuple(m.shape), r, "response_mask", "scores")
    ids, n_groups = _groups(r.shape[0], group_size, group_ids, r, "scores")
    singleton = _singleton(singleton)
    count = _counts(ids, n_groups)
    mean = group_sum(r, ids, n_groups)[ids] / count.clamp(min=1)
    centered = torch.where(count > 1, r - mean, r if singleton == "score" else 0.0)
    return whiten(centered[:, None].expand(m.shape), m)


def reinforce_plus_plus_advantages(token_rewards: Tensor, response_mask: Tensor, *,
                                   gamma: float = 1.0) -> tuple[Tensor, Tensor]:
    """REINFORCE++ (Hu 2025, arXiv:2501.03262): discounted returns, whitened over the batch's response tokens.

        G_t = m_t (r_t + gamma G'_{t+1}),  G'_t = r_t + gamma G'_{t+1} where m_t = 1, else G'_{t+1}

    Masked positions (multi-turn observation tokens, padding) are skipped: they add no reward and
    no discount, and carry the running return through. verl:
    compute_reinforce_plus_plus_outcome_advantage (gamma = config.gamma). One doubling scan over T.

    Args:
        token_rewards: float (B, T).
        response_mask: bool or 0/1 (B, T).
        gamma: discount in [0, 1].

    Returns:
        (advantages, returns): float32 (B, T), both 0 where response_mask is 0.
    """
    r = _token_tensor("token_rewards", token_rewards)
    m = _mask(response_mask, r, "token_rewards")
    gamma = _unit_interval("gamma", gamma)
    running = _reverse_affine_scan(torch.where(m, gamma, 1.0).to(r.dtype), torch.where(m, r, 0.0))
    returns = torch.where(m, running, 0.0)
    return whiten(returns, m), returns


def remax_advantages(token_rewards: Tensor, response_mask: Tensor, reward_baselines: Tensor) -> tuple[Tensor, Tensor]:
    """ReMax (Li et al. 2023, arXiv:2310.10505): reward-to-go minus the greedy response's reward,
    A_t = G_t - b, G_t = sum_{s >= t} m_s r_s.

    verl: compute_remax_outcome_advantage (which leaves G_t - 0 at masked positions).

    Args:
        token_rewards: float (B, T).
        response_mask: bool or 0/1 (B, T).
        reward_baselines: (B,) or (B, 1) float reward of each prompt's greedy response.

    Returns:
        (advantages, returns): float32 (B, T); advantages 0 where response_mask is 0, returns the
        reward-to-go at every position (verl's).
    """
    r = _token_tensor("token_rewards", token_rewards)
    m = _mask(response_mask, r, "token_rewards")
    b = check_float_tensor("reward_baselines", reward_baselines, r, [(r.shape[0],), (r.shape[0], 1)],
                           f"(B,) or (B, 1) with B = {r.shape[0]}", "token_rewards")
    returns = torch.where(m, r, 0.0).flip(-1).cumsum(-1).flip(-1)
    return torch.where(m, returns - b.detach().reshape(-1, 1).float(), 0.0), returns


def gdpo_advantages(scores: Tensor, response_mask: Tensor, group_size: int | None = None,
                    group_ids: Tensor | None = None, *, weights: Tensor | Sequence[float] | None = None,
                    eps: float = 1e-6, scale_by_std: bool = True, singleton: str = "zero") -> Tensor:
    """GDPO (arXiv:2601.05242): each reward component normalised within its group (GRPO) on its own,
    then a weighted sum, whitened over the batch's response tokens:

        A_i = whiten( sum_k w_k (R_ik - mean_g R_k) / (std_g R_k + eps) )

    verl: compute_gdpo_outcome_advantage (singleton="score"; the components are the
    `algorithm.gdpo_reward_keys` scores, weights `algorithm.gdpo_reward_weights`; with none, the
    one component token_level_rewards.sum(-1)).

    Args:
        scores: (B, K) float reward components, or (B,) / (B, 1) for one.
        response_mask: bool or 0/1 (B, T).
        group_size, group_ids, singleton: module docstring.
        weights: (K,) float weights (tensor or sequence), or None for all 1.
        eps, scale_by_std: as grpo_advantages, per component.

    Returns:
        float32 (B, T), 0 where response_mask is 0.
    """
    scores = check_tensor("scores", scores)
    if not scores.is_floating_point():
        raise TypeError(f"scores must be a floating-point (B, K) or (B,) tensor, got {scores.dtype}")
    if scores.dim() not in (1, 2):
        raise ValueError(f"scores must have shape (B, K) or (B,), got {tuple(scores.shape)}")
    r = scores.detach().to(torch.float32)
    r = r[:, None] if r.dim() == 1 else r
    n, k = r.shape
    m = check_tensor("response_mask", response_mask)
    if m.dim() != 2 or m.shape[0] != n:
        raise ValueError(f"response_mask must have shape (B, T) with B = {n}, got {tuple(m.shape)}")
    m = check_mask(m, tuple(m.shape), r, "response_mask", "scores")
    if weights is None:
        w = r.new_ones(k)
    else:
        w = host_to_device(torch.as_tensor(weights, dtype=torch.float32), r.device) \
            if not isinstance(weights, Tensor) else weights.detach().to(torch.float32)
        if w.shape != (k,) or w.device != r.device:
            raise ValueError(f"weights must have shape (K,) = ({k},), one per reward component, on {r.device}; got "
                             f"{tuple(w.shape)} on {w.device}")
    ids, n_groups = _groups(n, group_size, group_ids, r, "scores")
    eps = check_float("eps", eps, ge=0.0)
    normalised = group_scores(r, ids, n_groups, eps=eps, scale_by_std=scale_by_std, singleton=_singleton(singleton))
    return whiten((normalised * w).sum(-1)[:, None].expand(m.shape), m)


def optimal_token_baseline_advantages(
    token_rewards: Tensor,
    response_mask: Tensor,
    old_logprobs: Tensor,
    sum_pi_squared: Tensor,
    group_size: int | None = None,
    group_ids: Tensor | None = None,
    *,
    is_weights: Tensor | None = None,
    handle_zero_tail: bool = True,
    eps: float = 1e-8,
    multi_turn: bool = False,
    singleton: str = "zero",
) -> tuple[Tensor, Tensor]:
    """Optimal token baseline (Li et al. 2026, "The Optimal Token Baseline: Variance Reduction for Long-Horizon
    LLM-RL", PMLR 306): a baseline per group and step, weighting each response's reward-to-go by its
    cumulative path variance (the logit-gradient proxy 1 - 2 pi_t + sum pi^2),

        w_t = (1 - 2 pi_t + sum_v pi_v^2) * rho_t^2,   W_t = sum_{j <= t} m_j w_j,   G_t = sum_{s >= t} m_s r_s
        B_t = sum_g(m G_t W_t) / (sum_g(m W_t) + eps),  A_t = m_t (G_t - B_t)

    with pi_t = exp(old_logprobs_t) and rho the rollout importance weights (1 without). "Step" t is
    the column (multi_turn=False, verl's compute_optimal_token_baseline_advantage) or the rank of the
    response token among the response's valid tokens (multi_turn=True,
    compute_multi_turn_optimal_token_baseline_advantage, "tir_optimal_token_baseline": the responses'
    tokens compacted left, so observation spans do not misalign them; responses with no token are
    left out of their group). handle_zero_tail: where a group has one longest response, its baseline
    is 0 from the second-longest length on (the steps no other response reaches).

    Args:
        token_rewards: float (B, T).
        response_mask: bool or 0/1 (B, T).
        old_logprobs: float (B, T) log-probs of the sampled tokens under the rollout-time policy.
        sum_pi_squared: float (B, T) sum over the vocabulary of pi^2 at each position.
        group_size, group_ids, singleton: module docstring (verl: singleton="score", baseline 0).
        is_weights: float (B, T) rollout importance weights rho, or None.
        handle_zero_tail: as above (verl's default True).
        eps: >= 0, added to the denominator.
        multi_turn: step = rank among valid tokens instead of column.

    Returns:
        (advantages, returns): float32 (B, T); advantages 0 where response_mask is 0, returns the
        reward-to-go G_t at every position (verl's).
    """
    r = _token_tensor("token_rewards", token_rewards)
    m = _mask(response_mask, r, "token_rewards")
    old = _like("old_logprobs", old_logprobs, r, "token_rewards")
    spp = _like("sum_pi_squared", sum_pi_squared, r, "token_rewards")
    eps = check_float("eps", eps, ge=0.0)
    singleton = _singleton(singleton)
    n, t = r.shape
    ids, n_groups = _groups(n, group_size, group_ids, r, "token_rewards")
    mf = m.to(r.dtype)
    returns = (r * mf).flip(-1).cumsum(-1).flip(-1)
    w = 1 - 2 * old.exp() + spp
    if is_weights is not None:
        w = w * _like("is_weights", is_weights, r, "token_rewards").square()
    cum_w = (w * mf).cumsum(-1)
    lengths = mf.sum(-1)
    steps = (m.long().cumsum(-1) - 1).clamp(min=0) if multi_turn else torch.arange(t, device=r.device).expand(n, t)
    member = lengths > 0 if multi_turn else torch.ones(n, dtype=torch.bool, device=r.device)
    count = group_sum(member.to(r.dtype), ids, n_groups)[ids]
    # Sums over each group at each step: one index_add into a (groups x T) table.
    cells = (ids[:, None] * t + steps).reshape(-1)
    table = r.new_zeros(n_groups * t, 2).index_add_(0, cells, torch.stack([returns * cum_w * mf, cum_w * mf],
                                                                           -1).reshape(-1, 2))
    baseline = (table[:, 0] / (table[:, 1] + eps))[cells].view(n, t)
    if handle_zero_tail:
        length = torch.where(member, lengths, -1.0)
        longest = length.new_full((n_groups,), -1.0).scatter_reduce(0, ids, length, "amax")[ids]
        is_longest = member & (length == longest)
        n_longest = group_sum(is_longest.to(r.dtype), ids, n_groups)[ids]
        second = length.new_full((n_groups,), -1.0).scatter_reduce(
            0, ids, torch.where(is_longest, -1.0, length), "amax")[ids]
        tail = (is_longest & (n_longest == 1) & (count > 1))[:, None] & (steps >= second[:, None])
        baseline = torch.where(tail, 0.0, baseline)
    alone = (count <= 1)[:, None]
    if singleton == "score":
        baseline = torch.where(alone, 0.0, baseline)
    adv = (returns - baseline) * mf
    return (torch.where(alone, 0.0, adv) if singleton == "zero" else adv), returns
