"""verl 0.9.1's remaining policy losses as drop-ins: gpg, dppo_tv, dppo_kl, geo_mean, dro, clip_cov,
kl_cov, bypass_mode, and compute_policy_loss_reinforce (which bypass_mode dispatches to).

Each keeps verl's signature (verl/trainer/ppo/core_algos.py): (old_log_prob, log_prob,
advantages, response_mask, loss_agg_mode, config, rollout_is_weights), every tensor (bsz,
response_length) padded, and returns (pg_loss scalar, metrics dict of floats) with verl's metric
names and values (masked means with + 1e-8 in the denominator). `config` is verl's ActorConfig,
an OmegaConf DictConfig or a plain dict; missing fields take verl's in-function defaults.

The per-token objectives run through rlops.objectives (the same code as the fused op's PyTorch
epilogue): gpg and reinforce (-A logp), dro, dppo_tv / dppo_kl (`surrogate`), geo_mean (`gmpo`).
clip_cov and kl_cov select tokens over the whole micro-batch (covariance of advantages and
log-probs, a random draw / a top-k), so they stay plain PyTorch here and are not fused ops.
verl.py registers these in POLICY_LOSSES; it imports this module at its end, so the helpers
taken from verl.py are looked up at call time (`_verl`), never at import.

Where these differ from verl: DPPO refuses clip_ratio_c <= 1 (rlops' ratio_cap must exceed 1;
verl would truncate the ratio there); gpg, dro, dppo, geo_mean and reinforce multiply by the IS
weights detached (verl does not detach them: the gradient wrt log_prob is the same, only weights
that themselves require grad would get one from verl); bypass_mode checks loss_type before the
rollout correction (verl after it); the rollout metrics carry the 1e-8-relative differences of
rlops.integrations.verl_rollout. The empty-mask NaN loss of a token mean is verl's.
"""

from __future__ import annotations

from types import ModuleType
from typing import Any

import torch
from torch import Tensor

from .. import objectives
from ..options import PolicyLossConfig
from ..packing import Layout
from .verl_advantages import _config
from .verl_rollout import compute_rollout_correction_and_rejection_mask

DPPO_CLIP_RATIO_C = 20.0  # verl's default truncation of DPPO's detached ratio (config.get("clip_ratio_c", 20.0))
COV_RATIO = 0.0002  # verl's in-function default of policy_loss.clip_cov_ratio and kl_cov_ratio
CLIP_COV_LB, CLIP_COV_UB = 1.0, 5.0  # ... of policy_loss.clip_cov_lb / clip_cov_ub
PPO_KL_COEF = 1.0  # ... of policy_loss.ppo_kl_coef when it is None (verl's dataclass default is 0.1)

Metrics = dict[str, float]


def _verl() -> ModuleType:
    """rlops.integrations.verl, imported on first use: it imports this module at its end."""
    from . import verl

    return verl


def _agg(pg: Tensor, response_mask: Tensor, loss_agg_mode: str, config: Any) -> Tensor:
    """verl's agg_loss with config.global_batch_info, as every verl policy loss calls it."""
    return _verl().agg_loss(pg, response_mask, loss_agg_mode, **(_config(config, "global_batch_info") or {}))


def _mean(x: Tensor, response_mask: Tensor) -> float:
    """A metric: verl's masked_mean (+ 1e-8 in the denominator) as a Python float."""
    return _verl()._masked_mean(x.detach(), response_mask).item()


def _policy_loss_field(config: Any, name: str, default: float) -> Any:
    """config.policy_loss.<name>, or verl's in-function default where it is missing or None."""
    value = _config(_config(config, "policy_loss"), name)
    return default if value is None else value


# ---- REINFORCE: gpg and compute_policy_loss_reinforce ---------------------------------------------------------

def compute_policy_loss_gpg(old_log_prob: Tensor, log_prob: Tensor, advantages: Tensor, response_mask: Tensor,
                            loss_agg_mode: str = "token-mean", config: Any = None,
                            rollout_is_weights: Tensor | None = None) -> tuple[Tensor, Metrics]:
    """verl's GPG loss: -A * log_prob (times the IS weights), aggregated by loss_agg_mode; no metrics."""
    pg, _, _ = _verl()._objective_loss(old_log_prob, log_prob, advantages, response_mask,
                                       PolicyLossConfig(objective="reinforce"), rollout_is_weights)
    return _agg(pg, response_mask, loss_agg_mode, config), {}


def compute_policy_loss_reinforce(rollout_log_prob: Tensor, log_prob: Tensor, advantages: Tensor,
                                  response_mask: Tensor, loss_agg_mode: str = "seq-mean-token-sum",
                                  config: Any = None, rollout_is_weights: Tensor | None = None
                                  ) -> tuple[Tensor, Metrics]:
    """verl's `compute_policy_loss_reinforce` (bypass mode's "reinforce"): -A * log_prob times the
    (detached) IS weights, and actor/ppo_kl = masked_mean(rollout_log_prob - log_prob), unclamped."""
    loss, _ = compute_policy_loss_gpg(rollout_log_prob, log_prob, advantages, response_mask, loss_agg_mode, config,
                                      rollout_is_weights)
    return loss, {"actor/ppo_kl": _mean(rollout_log_prob - log_prob, response_mask)}


# ---- DRO -------------------------------------------------------------------------------------------------------

def compute_policy_loss_dro(old_log_prob: Tensor, log_prob: Tensor, advantages: Tensor, response_mask: Tensor,
                            loss_agg_mode: str = "token-mean", config: Any = None,
                            rollout_is_weights: Tensor | None = None) -> tuple[Tensor, Metrics]:
    """verl's DRO loss: -(A log_prob - beta / 2 (log_prob - old_log_prob)^2), beta =
    config.policy_loss.dro_beta (required, > 0); actor/ppo_kl unclamped."""
    beta = _config(_config(config, "policy_loss"), "dro_beta")
    if beta is None or beta <= 0:
        raise ValueError("policy_loss.dro_beta must be a positive value when using DRO")
    pg, _, _ = _verl()._objective_loss(old_log_prob, log_prob, advantages, response_mask,
                                       PolicyLossConfig(objective="dro", dro_beta=float(beta)), rollout_is_weights)
    loss = _agg(pg, response_mask, loss_agg_mode, config)
    return loss, {"actor/ppo_kl": _mean(old_log_prob - log_prob, response_mask)}


# ---- DPPO (binary TV / binary KL trust region) -----------------------------------------------------------------

def _dppo(objective: str, old_log_prob: Tensor, log_prob: Tensor, advantages: Tensor, response_mask: Tensor,
          loss_agg_mode: str, config: Any, rollout_is_weights: Tensor | None) -> tuple[Tensor, Metrics]:
    """DPPO's loss -A sg(min(r, clip_ratio_c)) log_prob inside the trust region, and its metrics:
    pg_clipfrac the share outside it, pg_clipfrac_lower the share inside it truncated by clip_ratio_c."""
    low, high = _verl()._clip_ratios(config)  # the divergence bounds, not ratio bounds
    cap = _config(config, "clip_ratio_c", DPPO_CLIP_RATIO_C)
    if not cap > 1.0:  # rlops' ratio_cap; verl would accept a truncation at or below 1
        raise ValueError(f"clip_ratio_c (DPPO's ratio truncation) must be > 1, got {cap}")
    options = PolicyLossConfig(objective=objective, clip_low=low, clip_high=high, ratio_cap=float(cap))
    # ppo_kl: the masked mean of the clamped -log r, as verl's dppo losses clamp it.
    pg, ratio, ppo_kl = _verl()._objective_loss(old_log_prob, log_prob, advantages, response_mask, options,
                                                rollout_is_weights)
    loss = _agg(pg, response_mask, loss_agg_mode, config)
    valid = objectives.dppo_valid(log_prob.detach(), old_log_prob.to(log_prob.dtype), advantages.expand_as(log_prob),
                                  options)
    return loss, {"actor/pg_clipfrac": _mean(1.0 - valid, response_mask),
                  "actor/ppo_kl": ppo_kl.item(),
                  "actor/pg_clipfrac_lower": _mean((ratio > cap).to(valid.dtype) * valid, response_mask)}


def compute_policy_loss_dppo_tv(old_log_prob: Tensor, log_prob: Tensor, advantages: Tensor, response_mask: Tensor,
                                loss_agg_mode: str = "token-mean", config: Any = None,
                                rollout_is_weights: Tensor | None = None) -> tuple[Tensor, Metrics]:
    """verl's DPPO-Binary-TV loss (arXiv 2602.04879): a token counts while p - p_old <= clip_ratio_high
    (A > 0) or >= -clip_ratio_low (A <= 0); clip_ratio_c (default 20) truncates the detached ratio."""
    return _dppo("dppo_tv", old_log_prob, log_prob, advantages, response_mask, loss_agg_mode, config,
                 rollout_is_weights)


def compute_policy_loss_dppo_kl(old_log_prob: Tensor, log_prob: Tensor, advantages: Tensor, response_mask: Tensor,
                                loss_agg_mode: str = "token-mean", config: Any = None,
                                rollout_is_weights: Tensor | None = None) -> tuple[Tensor, Metrics]:
    """verl's DPPO-Binary-KL loss: as dppo_tv with the binary KL between the token's old and new
    probabilities (+ 1e-8 inside its log) bounded by clip_ratio_high / clip_ratio_low."""
    return _dppo("dppo_kl", old_log_prob, log_prob, advantages, response_mask, loss_agg_mode, config,
                 rollout_is_weights)


# ---- GMPO (geo_mean) -------------------------------------------------------------------------------------------

def compute_policy_loss_geo_mean(old_log_prob: Tensor, log_prob: Tensor, advantages: Tensor, response_mask: Tensor,
                                 loss_agg_mode: str = "token-mean", config: Any = None,
                                 rollout_is_weights: Tensor | None = None) -> tuple[Tensor, Metrics]:
    """verl's GMPO loss (arXiv 2507.20673): per sequence -mean(A) * exp(mean of the sign-clipped
    log-ratios, unclamped), times the geometric mean of its IS weights, then torch.mean over all
    bsz rows: a fully masked row counts as 0, and loss_agg_mode and global_batch_info are unused,
    as in verl. Advantages are meant to be sequence-level (verl's assumption)."""
    low, high = _verl()._clip_ratios(config)
    mask = response_mask.bool()
    layout = Layout.of(mask)
    old = old_log_prob.to(log_prob.dtype)
    adv = advantages.to(log_prob.dtype).expand_as(log_prob)
    pg, _ = objectives.gmpo(log_prob, old, adv, rollout_is_weights, layout,
                            PolicyLossConfig(objective="gmpo", clip_low=low, clip_high=high))
    # Every counted token of a row holds the row's value: its token mean is that value.
    counts = layout.seq_totals(mask.to(pg.dtype)).clamp(min=1.0)
    loss = (layout.seq_totals(torch.where(mask, pg, 0.0)) / counts).sum() / mask.shape[0]
    d = (log_prob - old).detach()
    clipped = (d != d.clamp(-low, high)).to(d.dtype)
    return loss, {"actor/pg_clipfrac": _mean(clipped * (adv > 0), response_mask),
                  "actor/ppo_kl": _mean(-d, response_mask),
                  "actor/pg_clipfrac_lower": _mean(clipped * (adv < 0), response_mask)}


# ---- Clip-Cov and KL-Cov (batch-global token selection, plain PyTorch) ----------------------------------------

def _clip_cov_kept(candidates: Tensor, response_mask: Tensor, clip_cov_ratio: float, dtype: torch.dtype) -> Tensor:
    """verl's Clip-Cov draw (candidates: bool (B, T)): 0 at max(int(clip_cov_ratio * n_tokens), 1)
    tokens drawn uniformly among the candidates, 1 elsewhere, (B, T) in dtype. One
    torch.randperm(n_candidates) from the default (CPU) generator, made only when there is a
    candidate, as verl's: the same global RNG state draws the same tokens (numbered in row-major
    order, torch.nonzero's, as verl numbers them)."""
    clip_num = max(int(clip_cov_ratio * response_mask.sum().item()), 1)
    flat = torch.nonzero(candidates.reshape(-1), as_tuple=True)[0]
    kept = torch.ones(candidates.numel(), dtype=dtype, device=candidates.device)
    if flat.numel() > 0:
        perm = torch.randperm(flat.numel())
        kept[flat[perm[:min(clip_num, flat.numel())].to(flat.device)]] = 0
    return kept.view(candidates.shape)


def compute_policy_loss_clip_cov(old_log_prob: Tensor, log_prob: Tensor, advantages: Tensor, response_mask: Tensor,
                                 loss_agg_mode: str = "token-mean", config: Any = None,
                                 rollout_is_weights: Tensor | None = None) -> tuple[Tensor, Metrics]:
    """verl's Clip-Cov loss (arXiv 2505.22617): PPO's clipped loss (ratio unclamped, no dual clip),
    with the gradient of a random clip_cov_ratio share of the unclipped tokens whose covariance
    (A - mean A)(log_prob - mean log_prob) lies in (clip_cov_lb, clip_cov_ub) cut (their loss zeroed).
    Draws from torch's global RNG exactly as verl does; pg_clipfrac is the share cut."""
    low, high = _verl()._clip_ratios(config)
    ratio_cc = _policy_loss_field(config, "clip_cov_ratio", COV_RATIO)
    lb = _policy_loss_field(config, "clip_cov_lb", CLIP_COV_LB)
    ub = _policy_loss_field(config, "clip_cov_ub", CLIP_COV_UB)
    if not ratio_cc > 0:
        raise ValueError(f"policy_loss.clip_cov_ratio must be > 0, got {ratio_cc}")
    d = log_prob - old_log_prob
    ratio = torch.exp(d)
    pg1, pg2 = -advantages * ratio, -advantages * torch.clamp(ratio, 1 - low, 1 + high)
    counted = response_mask > 0
    lp, adv = log_prob.detach(), advantages.detach()
    cov = (adv - _verl()._masked_mean(adv, response_mask)) * (lp - _verl()._masked_mean(lp, response_mask))
    # Padding, and the tokens PPO's clip already cuts, are never drawn.
    cov = cov.masked_fill((response_mask == 0) | ((pg2 > pg1) & counted), -torch.inf)
    kept = _clip_cov_kept((cov < ub) & (cov > lb) & counted, response_mask, ratio_cc, advantages.dtype)
    pg = torch.maximum(pg1, pg2) * kept
    if rollout_is_weights is not None:
        pg = pg * rollout_is_weights
    loss = _agg(pg, response_mask, loss_agg_mode, config)
    return loss, {"actor/pg_clipfrac": _mean((kept == 0).to(kept.dtype), response_mask),
                  "actor/ppo_kl": _mean(-d, response_mask)}


def _kl_cov_selected(log_prob: Tensor, advantages: Tensor, response_mask: Tensor, kl_cov_ratio: float) -> Tensor:
    """verl's KL-Cov selection (bool, mask's shape): the max(1, int(n * kl_cov_ratio)) counted tokens
    of largest covariance (A - mean A)(log_prob - mean log_prob), means over the n counted tokens.
    Computed on the CPU as verl's is, so that the means' rounding and topk's order of ties are verl's
    on every device (the top-k size is a host number anyway)."""
    counted = response_mask > 0
    flat = torch.nonzero(counted.reshape(-1), as_tuple=True)[0]
    adv = advantages[counted].detach().reshape(-1).cpu()
    lp = log_prob[counted].detach().reshape(-1).cpu()
    selected = torch.zeros(counted.numel(), dtype=torch.bool, device=counted.device)
    if adv.numel() > 0:
        cov = (adv - adv.mean()) * (lp - lp.mean())
        top = torch.topk(cov, max(1, int(len(cov) * kl_cov_ratio)), largest=True).indices
        selected[flat[top.to(flat.device)]] = True
    return selected.view(counted.shape)


def compute_policy_loss_kl_cov(old_log_prob: Tensor, log_prob: Tensor, advantages: Tensor, response_mask: Tensor,
                               loss_agg_mode: str = "token-mean", config: Any = None,
                               rollout_is_weights: Tensor | None = None) -> tuple[Tensor, Metrics]:
    """verl's KL-Cov loss (arXiv 2505.22617): -A r (ratio unclamped, unclipped), plus ppo_kl_coef *
    |log r| at the kl_cov_ratio share of counted tokens of largest covariance; actor/ppo_kl is the
    masked mean of |log r|."""
    kl_cov_ratio = _policy_loss_field(config, "kl_cov_ratio", COV_RATIO)
    coef = _policy_loss_field(config, "ppo_kl_coef", PPO_KL_COEF)
    if not kl_cov_ratio > 0:
        raise ValueError(f"policy_loss.kl_cov_ratio must be > 0, got {kl_cov_ratio}")
    d = log_prob - old_log_prob
    abs_kl = d.abs()
    ratio = torch.exp(d)
    pg = -advantages * ratio
    pg = torch.where(_kl_cov_selected(log_prob, advantages, response_mask, kl_cov_ratio),
                     -advantages * ratio + coef * abs_kl, pg)
    if rollout_is_weights is not None:
        pg = pg * rollout_is_weights
    loss = _agg(pg, response_mask, loss_agg_mode, config)
    return loss, {"actor/ppo_kl": _mean(abs_kl, response_mask)}


# ---- bypass mode -----------------------------------------------------------------------------------------------

def compute_policy_loss_bypass_mode(old_log_prob: Tensor, log_prob: Tensor, advantages: Tensor,
                                    response_mask: Tensor, loss_agg_mode: str = "token-mean", config: Any = None,
                                    rollout_is_weights: Tensor | None = None) -> tuple[Tensor, Metrics]:
    """verl's bypass-mode loss: old_log_prob is the rollout engine's log-prob. The rollout correction
    (config.policy_loss.rollout_correction: rollout_is, rollout_is_threshold (2.0),
    rollout_is_batch_normalize, rollout_rs, rollout_rs_threshold) gives IS weights of
    pi_current / pi_rollout and a rejection mask (rlops.integrations.verl_rollout); loss_type
    "ppo_clip" (default) is compute_policy_loss_vanilla on the rejection mask without weights (the
    clipped ratio is the correction), "reinforce" is compute_policy_loss_reinforce with the weights.
    The metrics are the loss's and the correction's (rollout_corr/...). rollout_is_weights is
    ignored, as in verl: bypass mode computes its own."""
    correction = _config(_config(config, "policy_loss"), "rollout_correction")
    if correction is None:
        raise ValueError("rollout_correction config not found in policy_loss. "
                         "When using loss_mode='bypass_mode', ensure rollout_correction config is passed.")
    loss_type = _config(correction, "loss_type", "ppo_clip")
    if loss_type not in ("reinforce", "ppo_clip"):
        raise ValueError(f"Invalid loss_type: {loss_type}. Must be 'reinforce' or 'ppo_clip'.")
    with torch.no_grad():  # the weights and the mask carry no gradient
        weights, mask, rollout_metrics = compute_rollout_correction_and_rejection_mask(
            log_prob, old_log_prob, response_mask, _config(correction, "rollout_is"),
            _config(correction, "rollout_is_threshold", 2.0), _config(correction, "rollout_is_batch_normalize", False),
            _config(correction, "rollout_rs"), _config(correction, "rollout_rs_threshold"))
    if loss_type == "reinforce":
        weights = None if weights is None else weights.batch["rollout_is_weights"]
        loss, metrics = compute_policy_loss_reinforce(old_log_prob, log_prob, advantages, mask, loss_agg_mode,
                                                      config, weights)
    else:
        loss, metrics = _verl().compute_policy_loss_vanilla(old_log_prob, log_prob, advantages, mask,
                                                            loss_agg_mode, config, None)
    metrics.update(rollout_metrics)
    return loss, metrics


__all__ = [
    "compute_policy_loss_bypass_mode",
    "compute_policy_loss_clip_cov",
    "compute_policy_loss_dppo_kl",
    "compute_policy_loss_dppo_tv",
    "compute_policy_loss_dro",
    "compute_policy_loss_geo_mean",
    "compute_policy_loss_gpg",
    "compute_policy_loss_kl_cov",
    "compute_policy_loss_reinforce",
]
