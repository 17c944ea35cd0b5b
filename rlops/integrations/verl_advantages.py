"""verl 0.9.1's advantage estimators (verl/trainer/ppo/core_algos.py, ADV_ESTIMATOR_REGISTRY) with
verl's names, signatures and return values, computed by rlops.advantages and rlops.estimators
(rlops.integrations.verl re-exports them; docs/advantages.md has the formulas and sources)."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import Tensor

from .. import estimators
from .._validation import check_mask
from ..advantages import gae, masked_whiten


def _config(config: Any, name: str, default: Any = None) -> Any:
    """A field of verl's ActorConfig / DictConfig, or of a plain dict or object."""
    if config is None:
        return default
    if isinstance(config, Mapping):
        return config.get(name, default)
    getter = getattr(config, "get", None)
    if callable(getter):
        try:
            return getter(name, default)
        except TypeError:
            pass
    return getattr(config, name, default)


def compute_gae_advantage_return(token_level_rewards: Tensor, values: Tensor, response_mask: Tensor,
                                 gamma: float | Tensor, lam: float | Tensor, *,
                                 backend: str = "auto") -> tuple[Tensor, Tensor]:
    """verl's `compute_gae_advantage_return`: (whitened advantages, returns), each (B, T).

    GAE runs as rlops' reverse-scan kernel on CUDA; masked positions (multi-turn observation
    tokens) carry the running values through, as verl's loop does. backend: as `rlops.gae`.
    """
    with torch.no_grad():
        adv, returns = gae(token_level_rewards, values, response_mask, gamma=float(gamma), lam=float(lam),
                           backend=backend)
        return masked_whiten(adv, response_mask), returns


# ---- advantage estimators (verl/trainer/ppo/core_algos.py, ADV_ESTIMATOR_REGISTRY) -------------------------
#
# Each takes verl's arguments and returns verl's (advantages, returns) pair in token_level_rewards' dtype,
# computed by rlops.estimators in float32 over the whole batch at once: verl's `index` (the uid labels,
# any kind) becomes dense group ids once; group statistics are index_add / scatter_reduce; nothing loops
# over groups or time and nothing is read back from a GPU tensor. Arguments verl accepts and ignores
# (epsilon of rloo/opo/rf++-baseline, gpg's epsilon and alpha, config where unused) are accepted and
# ignored here too.


def _group_ids(index: Any, n: int, device: torch.device) -> Tensor:
    """verl's `index` (uids: an np.ndarray or list of labels of any kind, or an integer tensor) as (B,)
    integer group ids on `device`. Labels on the host are ranked by np.unique there (no device
    read-back); a tensor's are ranked on its device by rlops.estimators (a sort)."""
    import numpy as np

    if isinstance(index, Tensor):
        if index.dtype == torch.bool or index.is_floating_point() or index.is_complex():
            raise TypeError(f"index must hold integer group labels when it is a tensor, got {index.dtype}")
        if tuple(index.shape) != (n,):
            raise ValueError(f"index must have shape (B,) = ({n},), one group label per response, "
                             f"got {tuple(index.shape)}")
        return index.to(device)
    labels = np.asarray(index)
    if labels.shape != (n,):
        raise ValueError(f"index must hold one group label per response, shape (B,) = ({n},), got {labels.shape}")
    try:
        inverse = np.unique(labels, return_inverse=True)[1]
    except TypeError:  # labels that do not order among themselves (mixed kinds): by their text, as verl's
        inverse = np.unique(labels.astype(str), return_inverse=True)[1]
    return estimators.host_to_device(torch.as_tensor(inverse.reshape(-1), dtype=torch.long), device)


def _sequence_scores(token_level_rewards: Tensor) -> Tensor:
    if not isinstance(token_level_rewards, Tensor):
        raise TypeError(f"token_level_rewards must be a torch.Tensor, got {type(token_level_rewards).__name__}")
    if not token_level_rewards.is_floating_point() or token_level_rewards.dim() != 2:
        raise ValueError(f"token_level_rewards must be a floating-point (bs, response_length) tensor, got "
                         f"{token_level_rewards.dtype} {tuple(token_level_rewards.shape)}")
    return token_level_rewards.detach().float().sum(-1)


def _on_tokens(adv: Tensor, response_mask: Tensor, token_level_rewards: Tensor) -> tuple[Tensor, Tensor]:
    """A per-response advantage (B,) on every response token, verl's `scores.unsqueeze(-1) * response_mask`."""
    if not isinstance(response_mask, Tensor) or tuple(response_mask.shape) != tuple(token_level_rewards.shape):
        shape = getattr(response_mask, "shape", type(response_mask).__name__)
        raise ValueError(f"response_mask must be a tensor of token_level_rewards' shape "
                         f"{tuple(token_level_rewards.shape)}, got {shape}")
    mask = check_mask(response_mask, tuple(token_level_rewards.shape), token_level_rewards, "response_mask",
                      "token_level_rewards")
    out = torch.where(mask, adv[:, None], 0.0).to(token_level_rewards.dtype)
    return out, out


def _grouped(token_level_rewards: Tensor, index: Any) -> tuple[Tensor, Tensor]:
    scores = _sequence_scores(token_level_rewards)
    return scores, _group_ids(index, scores.shape[0], scores.device)


def compute_grpo_outcome_advantage(token_level_rewards: Tensor, response_mask: Tensor, index: Any,
                                   epsilon: float = 1e-6, norm_adv_by_std_in_grpo: bool = True,
                                   config: Any = None) -> tuple[Tensor, Tensor]:
    """verl's `compute_grpo_outcome_advantage` ("grpo"): (advantages, returns), both (bs, response_length),
    the group-relative score (R - mean_g) / (std_g + epsilon) (or R - mean_g) on every response token.

    index: (bs,) group labels of any kind (verl's uid array), or an integer tensor. A group of one
    response gets R / (1 + epsilon) (verl's mean 0, std 1)."""
    scores, ids = _grouped(token_level_rewards, index)
    with torch.no_grad():
        adv = estimators.grpo_advantages(scores, group_ids=ids, eps=epsilon, scale_by_std=norm_adv_by_std_in_grpo,
                                         singleton="score")
    return _on_tokens(adv, response_mask, token_level_rewards)


def compute_grpo_vectorized_outcome_advantage(token_level_rewards: Tensor, response_mask: Tensor, index: Any,
                                              epsilon: float = 1e-6, norm_adv_by_std_in_grpo: bool = True,
                                              config: Any = None) -> tuple[Tensor, Tensor]:
    """verl's `compute_grpo_vectorized_outcome_advantage` ("grpo_vectorized"): the same values as "grpo"."""
    return compute_grpo_outcome_advantage(token_level_rewards, response_mask, index, epsilon,
                                          norm_adv_by_std_in_grpo, config)


def compute_gdpo_outcome_advantage(token_level_rewards: Tensor, response_mask: Tensor, index: Any,
                                   epsilon: float = 1e-6, norm_adv_by_std_in_grpo: bool = True, config: Any = None,
                                   non_tensor_batch: Mapping[str, Any] | None = None,
                                   batch: Mapping[str, Any] | None = None, **kwargs: Any) -> tuple[Tensor, Tensor]:
    """verl's `compute_gdpo_outcome_advantage` ("gdpo"): each reward component group-normalised on its own
    (as "grpo"), weighted, summed and whitened over the response tokens.

    With config, non_tensor_batch and batch all given (as verl's trainer calls it), the components are
    non_tensor_batch[key] (bs,) for key in config.gdpo_reward_keys, weighted by
    config.gdpo_reward_weights (or 1); otherwise the one component token_level_rewards.sum(-1). verl
    places each component on the last response token from batch["attention_mask"] before summing it
    back over the tokens: the same score, so `batch` is not read here."""
    import numpy as np

    scores, ids = _grouped(token_level_rewards, index)
    weights = None
    if config is not None and non_tensor_batch is not None and batch is not None:
        keys = _config(config, "gdpo_reward_keys")
        if not keys:
            raise ValueError("GDPO requires 'algorithm.gdpo_reward_keys' listing the individual reward component "
                             "keys returned by compute_score (e.g. ['format_reward', 'accuracy_reward'])")
        missing = [key for key in keys if key not in non_tensor_batch]
        if missing:
            raise ValueError(f"GDPO reward key(s) {missing} not found in non_tensor_batch; available: "
                             f"{list(non_tensor_batch.keys())}")
        components = np.stack([np.asarray(non_tensor_batch[key], dtype=np.float32) for key in keys], -1)
        scores = estimators.host_to_device(torch.from_numpy(components), scores.device)
        weights = _config(config, "gdpo_reward_weights")
        weights = None if weights is None else [float(w) for w in weights]
    with torch.no_grad():
        adv = estimators.gdpo_advantages(scores, response_mask, group_ids=ids, weights=weights, eps=epsilon,
                                         scale_by_std=norm_adv_by_std_in_grpo, singleton="score")
    adv = adv.to(token_level_rewards.dtype)
    return adv, adv


def compute_grpo_passk_outcome_advantage(token_level_rewards: Tensor, response_mask: Tensor, index: Any,
                                         epsilon: float = 1e-6, norm_adv_by_std_in_grpo: bool = True,
                                         config: Any = None, **kwargs: Any) -> tuple[Tensor, Tensor]:
    """verl's `compute_grpo_passk_outcome_advantage` ("grpo_passk"): only each group's best response gets
    (R_max - R_second) / (std_g + epsilon). As in verl, config is required and its
    norm_adv_by_std_in_grpo (default True) is the one used, not the argument; a group of one response
    is refused (ValueError; on CPU tensors, or with RLOPS_CHECK=1)."""
    if config is None:
        raise ValueError("compute_grpo_passk_outcome_advantage needs config (verl's AlgoConfig: it reads "
                         "norm_adv_by_std_in_grpo from it)")
    scores, ids = _grouped(token_level_rewards, index)
    with torch.no_grad():
        adv = estimators.grpo_passk_advantages(scores, group_ids=ids, eps=epsilon,
                                               scale_by_std=bool(_config(config, "norm_adv_by_std_in_grpo", True)))
    return _on_tokens(adv, response_mask, token_level_rewards)


def compute_reinforce_plus_plus_baseline_outcome_advantage(token_level_rewards: Tensor, response_mask: Tensor,
                                                           index: Any, epsilon: float = 1e-6, config: Any = None,
                                                           **kwargs: Any) -> tuple[Tensor, Tensor]:
    """verl's `compute_reinforce_plus_plus_baseline_outcome_advantage` ("reinforce_plus_plus_baseline"):
    R - mean_g on every response token, whitened over the batch's response tokens."""
    scores, ids = _grouped(token_level_rewards, index)
    with torch.no_grad():
        adv = estimators.reinforce_plus_plus_baseline_advantages(scores, response_mask, group_ids=ids,
                                                                 singleton="score")
    adv = adv.to(token_level_rewards.dtype)
    return adv, adv


def compute_rloo_outcome_advantage(token_level_rewards: Tensor, response_mask: Tensor, index: Any,
                                   epsilon: float = 1e-6, config: Any = None, **kwargs: Any) -> tuple[Tensor, Tensor]:
    """verl's `compute_rloo_outcome_advantage` ("rloo"): (n R - sum_g R) / (n - 1); a group of one keeps R."""
    scores, ids = _grouped(token_level_rewards, index)
    with torch.no_grad():
        adv = estimators.rloo_advantages(scores, group_ids=ids, singleton="score")
    return _on_tokens(adv, response_mask, token_level_rewards)


def compute_rloo_vectorized_outcome_advantage(token_level_rewards: Tensor, response_mask: Tensor, index: Any,
                                              epsilon: float = 1e-6, config: Any = None,
                                              **kwargs: Any) -> tuple[Tensor, Tensor]:
    """verl's `compute_rloo_vectorized_outcome_advantage` ("rloo_vectorized"): as "rloo", except that a
    group of one gets 0 (verl's two RLOO functions differ there)."""
    scores, ids = _grouped(token_level_rewards, index)
    with torch.no_grad():
        adv = estimators.rloo_advantages(scores, group_ids=ids, singleton="zero")
    return _on_tokens(adv, response_mask, token_level_rewards)


def compute_opo_outcome_advantage(token_level_rewards: Tensor, response_mask: Tensor, index: Any,
                                  epsilon: float = 1e-6, config: Any = None, **kwargs: Any) -> tuple[Tensor, Tensor]:
    """verl's `compute_opo_outcome_advantage` ("opo"): R minus the length-weighted group mean
    sum_g(L R) / sum_g L, L = response_mask.sum(-1); a group of one keeps R."""
    scores, ids = _grouped(token_level_rewards, index)
    mask = check_mask(response_mask, tuple(token_level_rewards.shape), token_level_rewards, "response_mask",
                      "token_level_rewards")
    with torch.no_grad():
        adv = estimators.opo_advantages(scores, mask.sum(-1), group_ids=ids, singleton="score")
    return _on_tokens(adv, response_mask, token_level_rewards)


def compute_reinforce_plus_plus_outcome_advantage(token_level_rewards: Tensor, response_mask: Tensor,
                                                  config: Any = None, **kwargs: Any) -> tuple[Tensor, Tensor]:
    """verl's `compute_reinforce_plus_plus_outcome_advantage` ("reinforce_plus_plus"): (whitened advantages,
    returns), the discounted returns with gamma = config.gamma, masked positions skipped (they carry the
    running return through). One doubling scan over the tokens, no loop over time."""
    gamma = _config(config, "gamma")
    if gamma is None:
        raise ValueError("compute_reinforce_plus_plus_outcome_advantage needs config with gamma (verl's AlgoConfig)")
    with torch.no_grad():
        adv, returns = estimators.reinforce_plus_plus_advantages(token_level_rewards, response_mask,
                                                                 gamma=float(gamma))
    return adv.to(token_level_rewards.dtype), returns.to(token_level_rewards.dtype)


def compute_remax_outcome_advantage(token_level_rewards: Tensor, reward_baselines: Tensor, response_mask: Tensor,
                                    config: Any = None, **kwargs: Any) -> tuple[Tensor, Tensor]:
    """verl's `compute_remax_outcome_advantage` ("remax"): returns G_t = sum_{s >= t} m_s r_s and advantages
    G_t - b m_t (verl's exactly: at masked positions the advantage is G_t)."""
    with torch.no_grad():
        _, returns = estimators.remax_advantages(token_level_rewards, response_mask, reward_baselines)
        mask = response_mask.to(returns.dtype)
        adv = returns - reward_baselines.detach().float().reshape(-1, 1) * mask
    return adv.to(token_level_rewards.dtype), returns.to(token_level_rewards.dtype)


def compute_gpg_outcome_advantage(token_level_rewards: Tensor, response_mask: Tensor, index: Any,
                                  epsilon: float = 1e-6, f_norm: float = 1.0, alpha: float = 1.0, config: Any = None,
                                  **kwargs: Any) -> tuple[Tensor, Tensor]:
    """verl's `compute_gpg_outcome_advantage` ("gpg"): alpha (R - mean_g) / f_norm on every response token,
    alpha = bs / max(#nonzero R, 1) of this batch (verl overwrites the `alpha` argument with it and
    does not use epsilon); a group of one keeps alpha R / f_norm."""
    scores, ids = _grouped(token_level_rewards, index)
    with torch.no_grad():
        adv = estimators.gpg_advantages(scores, group_ids=ids, f_norm=f_norm, singleton="score")
    return _on_tokens(adv, response_mask, token_level_rewards)


def compute_optimal_token_baseline_advantage(token_level_rewards: Tensor, response_mask: Tensor, index: Any,
                                             old_log_probs: Tensor, sum_pi_squared: Tensor,
                                             rollout_is_weights: Tensor | None = None, handle_zero_tail: bool = True,
                                             epsilon: float = 1e-8, **kwargs: Any) -> tuple[Tensor, Tensor]:
    """verl's `compute_optimal_token_baseline_advantage` ("optimal_token_baseline"): (advantages, returns),
    a baseline per group and column weighting each reward-to-go by its cumulative path variance
    (rlops.estimators.optimal_token_baseline_advantages). sum_pi_squared (bs, response_length): sum_v
    pi_v^2 at each position (verl's actor.calculate_sum_pi_squared)."""
    return _otb(token_level_rewards, response_mask, index, old_log_probs, sum_pi_squared,
                is_weights=rollout_is_weights, handle_zero_tail=handle_zero_tail, eps=epsilon, multi_turn=False)


def compute_multi_turn_optimal_token_baseline_advantage(token_level_rewards: Tensor, response_mask: Tensor,
                                                        index: Any, old_log_probs: Tensor, sum_pi_squared: Tensor,
                                                        rollout_is_weights: Tensor | None = None,
                                                        handle_zero_tail: bool = True, epsilon: float = 1e-8,
                                                        **kwargs: Any) -> tuple[Tensor, Tensor]:
    """verl's `compute_multi_turn_optimal_token_baseline_advantage` ("tir_optimal_token_baseline"): as
    "optimal_token_baseline" with each response's tokens compacted left (the step is the rank among its
    valid tokens, so observation spans do not misalign the group), responses with no token left out."""
    return _otb(token_level_rewards, response_mask, index, old_log_probs, sum_pi_squared,
                is_weights=rollout_is_weights, handle_zero_tail=handle_zero_tail, eps=epsilon, multi_turn=True)


def _otb(token_level_rewards: Tensor, response_mask: Tensor, index: Any, old_log_probs: Tensor,
         sum_pi_squared: Tensor, **options: Any) -> tuple[Tensor, Tensor]:
    """Both optimal-token-baseline drop-ins; options: those of estimators.optimal_token_baseline_advantages."""
    if not isinstance(token_level_rewards, Tensor) or token_level_rewards.dim() != 2:
        raise ValueError("token_level_rewards must be a (bs, response_length) tensor")
    ids = _group_ids(index, token_level_rewards.shape[0], token_level_rewards.device)
    with torch.no_grad():
        adv, returns = estimators.optimal_token_baseline_advantages(
            token_level_rewards, response_mask, old_log_probs, sum_pi_squared, group_ids=ids, singleton="score",
            **options)
    return adv.to(token_level_rewards.dtype), returns.to(token_level_rewards.dtype)


ADV_ESTIMATORS: dict[str, Callable[..., tuple[Tensor, Tensor]]] = {
    "gae": compute_gae_advantage_return,
    "grpo": compute_grpo_outcome_advantage,
    "grpo_vectorized": compute_grpo_vectorized_outcome_advantage,
    "gdpo": compute_gdpo_outcome_advantage,
    "grpo_passk": compute_grpo_passk_outcome_advantage,
    "reinforce_plus_plus_baseline": compute_reinforce_plus_plus_baseline_outcome_advantage,
    "rloo": compute_rloo_outcome_advantage,
    "opo": compute_opo_outcome_advantage,
    "reinforce_plus_plus": compute_reinforce_plus_plus_outcome_advantage,
    "remax": compute_remax_outcome_advantage,
    "gpg": compute_gpg_outcome_advantage,
    "rloo_vectorized": compute_rloo_vectorized_outcome_advantage,
    "optimal_token_baseline": compute_optimal_token_baseline_advantage,
    "tir_optimal_token_baseline": compute_multi_turn_optimal_token_baseline_advantage,
}


def get_adv_estimator_fn(name_or_enum: Any) -> Callable[..., tuple[Tensor, Tensor]]:
    """verl's `get_adv_estimator_fn`: the estimator registered under a name (or verl's AdvantageEstimator
    enum member), with verl's signature. Every name of verl 0.9.1's ADV_ESTIMATOR_REGISTRY is covered."""
    name = getattr(name_or_enum, "value", name_or_enum)
    if name not in ADV_ESTIMATORS:
        raise ValueError(f"Unknown advantage estimator {name!r}; rlops covers verl's: {', '.join(ADV_ESTIMATORS)}")
    return ADV_ESTIMATORS[name]
