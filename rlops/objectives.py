"""The policy-gradient terms of the PyTorch epilogue (docs/objectives.md), per token, with autograd.

The per-token objectives (`surrogate`: clip, cispo, sapo, reinforce, dro, dppo), which the fused
kernels compute too; and what couples tokens beyond their own statistics, which only this
epilogue computes, after the fused kernel's per-token statistics (the vocabulary is streamed
once, as for every other option): the sequence objectives GMPO (verl's geo_mean) and VESPO
(TRL's vespo), the off-policy sequence mask (DeepSeek-V3.2; TRL's off_policy_mask_threshold) and
the top-entropy token selection (TRL's top_entropy_quantile). rlops.torch_backend.policy_loss
composes them. Inputs are per-token tensors of the layout's mask shape, already zero (one for
weights) where the mask is 0.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from .constants import LOG_RATIO_CLAMP
from .options import PolicyLossConfig
from .packing import Layout

# TRL clamps VESPO's log-weights below at log(1e-8), "for matching truthfully the original implementation".
_VESPO_LOG_MIN = math.log(1e-8)


def clipped_surrogate(log_r: Tensor, advantages: Tensor, clip_low: float, clip_high: float,
                      dual_clip: float | None = None, is_weights: Tensor | None = None, *,
                      ratio_cap: float | None = None) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(pg, ratio, clipped_low, clipped_high) per token, SPEC section 2; advantages broadcast to log_r.
    ratio_cap: the unclipped branch's ratio capped above (TRL's delta, two-sided clipping)."""
    a = advantages.to(log_r.dtype).expand_as(log_r)
    r = torch.exp(log_r)
    unclipped = r if ratio_cap is None else torch.clamp(r, max=ratio_cap)
    pg = torch.maximum(-a * unclipped, -a * torch.clamp(r, 1.0 - clip_low, 1.0 + clip_high))
    if dual_clip is not None:
        pg = torch.where(a < 0, torch.minimum(pg, -a * dual_clip), pg)
    if is_weights is not None:
        pg = pg * is_weights.to(log_r.dtype).detach()
    clipped_low = (r < 1.0 - clip_low) & (a < 0)
    clipped_high = (r > 1.0 + clip_high) & (a > 0)
    return pg, r.detach(), clipped_low, clipped_high


def surrogate(log_r: Tensor, logp: Tensor, old_logp: Tensor | None, advantages: Tensor, config: PolicyLossConfig,
              is_weights: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """(pg, ratio detached) per token of a per-token config.objective (docs/objectives.md): "clip",
    SPEC section 2 (with config.ratio_cap); "cispo", -sg(clamp(r, 1 - clip_low, 1 + clip_high)) A logp;
    "sapo", -A (4 / tau) sigmoid(tau (r - 1)), tau = sapo_tau_pos where A > 0 else sapo_tau_neg;
    "reinforce", -A logp; "dro", -(A logp - dro_beta / 2 (logp - old)^2); "dppo_tv" / "dppo_kl",
    -A sg(min(r, ratio_cap)) logp inside DPPO's trust region. old_logp None: on policy."""
    if config.objective == "clip":
        pg, ratio, _, _ = clipped_surrogate(log_r, advantages, config.clip_low, config.clip_high, config.dual_clip,
                                            is_weights, ratio_cap=config.ratio_cap)
        return pg, ratio
    a = advantages.to(log_r.dtype).expand_as(log_r)
    r = torch.exp(log_r)
    old = logp.detach() if old_logp is None else old_logp.to(logp.dtype)
    if config.objective == "cispo":
        pg = -torch.clamp(r, 1.0 - config.clip_low, 1.0 + config.clip_high).detach() * a * logp
    elif config.objective == "sapo":
        # Both temperatures in log_r's dtype (a where() of two Python floats would be float32).
        tau = torch.where(a > 0, config.sapo_tau_pos, torch.full_like(a, config.sapo_tau_neg))
        pg = -torch.sigmoid(tau * (r - 1.0)) * (4.0 / tau) * a
    elif config.objective == "reinforce":
        pg = -a * logp
    elif config.objective == "dro":
        pg = -(a * logp - 0.5 * config.dro_beta * (logp - old).square())
    else:
        cap = math.inf if config.ratio_cap is None else config.ratio_cap
        weight = torch.clamp(r, max=cap) * dppo_valid(logp.detach(), old, a, config)
        pg = -a * weight.detach() * logp
    if is_weights is not None:
        pg = pg * is_weights.to(log_r.dtype).detach()
    return pg, r.detach()


def dppo_valid(logp: Tensor, old_logp: Tensor, advantages: Tensor, config: PolicyLossConfig) -> Tensor:
    """DPPO's trust region (verl 0.9.1 compute_policy_loss_dppo_tv / _kl): 1.0 where the token's
    probability moved less than clip_high (A > 0) or clip_low (A <= 0), by total variation or by
    the binary KL, else 0.0; NaN where an input is NaN (NaN in, NaN out)."""
    p, p_old = torch.exp(logp), torch.exp(old_logp)
    if config.objective == "dppo_kl":
        kl = p_old * (old_logp - logp) + (1 - p_old) * torch.log((1.0 - p_old + 1e-8) / (1.0 - p + 1e-8))
        valid = torch.where(advantages > 0, (kl <= config.clip_high) | (p <= p_old),
                            (kl <= config.clip_low) | (p >= p_old))
    else:
        valid = torch.where(advantages > 0, p - p_old <= config.clip_high, p - p_old >= -config.clip_low)
    return torch.where(logp.isnan() | old_logp.isnan(), logp + old_logp, valid.to(logp.dtype))


def _seq_mean(x: Tensor, layout: Layout, eps: float = 0.0) -> Tensor:
    """Each sequence's mean of x over its counted tokens, per token; eps: verl's + 1e-8 in the
    denominator (0: a count of 0 clamped to 1, as TRL)."""
    counts = layout.seq_totals(layout.mask.to(x.dtype))
    counts = counts + eps if eps else counts.clamp(min=1.0)
    return layout.per_token(layout.seq_totals(torch.where(layout.mask, x, 0.0)) / counts).expand_as(x)


def gmpo(logp: Tensor, old: Tensor, adv: Tensor, isw: Tensor | None, layout: Layout,
         config: PolicyLossConfig) -> tuple[Tensor, Tensor]:
    """(pg, ratio) per token of GMPO (arXiv 2507.20673; verl 0.9.1 compute_policy_loss_geo_mean):
    every token of a sequence holds -mean(A) * exp(mean_t(sgn(A) min(sgn(A) d_t, sgn(A) clamp(d_t,
    -clip_low, clip_high)))), d = logp - old, times the geometric mean of its is_weights; its
    seq-mean-token-mean is verl's per-sequence loss. The ratio is that geometric-mean ratio."""
    d = logp - old
    sign = torch.sign(adv)
    clipped = sign * torch.minimum(sign * d, sign * torch.clamp(d, -config.clip_low, config.clip_high))
    ratio = torch.exp(_seq_mean(clipped, layout, 1e-8))
    pg = -_seq_mean(adv, layout, 1e-8) * ratio
    if isw is not None:
        pg = pg * torch.exp(_seq_mean(torch.log(isw.detach() + 1e-10), layout, 1e-8))
    return pg, ratio.detach()


def vespo_weights(log_r: Tensor, isw: Tensor | None, adv: Tensor, layout: Layout, config: PolicyLossConfig,
                  per_sequence: bool = False) -> Tensor:
    """VESPO's gamma weight phi(w) = exp(lambda + k log w - lambda w) (TRL 1.16
    GRPOTrainer.get_gamma_weights), per token, or per sequence (S,) with per_sequence (adv then
    (S,)). log w: the sequence's sum of its counted tokens' log_r clamped to +-20, plus that of
    clamp(log is_weights, log 1e-8, 20), clamped to [log 1e-8, 20]; k, lambda = vespo_k_pos,
    vespo_lambda_pos where A >= 0, else the _neg pair. An overflow (large k) gives 0 as TRL's
    nan_to_num; a NaN input stays NaN, where TRL's gives 0 (docs/objectives.md)."""
    log_w = layout.seq_totals(torch.where(layout.mask, torch.clamp(log_r, -LOG_RATIO_CLAMP, LOG_RATIO_CLAMP), 0.0))
    if isw is not None:
        log_isw = torch.clamp(torch.log(isw.to(log_r.dtype).expand_as(log_r)), _VESPO_LOG_MIN, LOG_RATIO_CLAMP)
        log_w = log_w + layout.seq_totals(torch.where(layout.mask, log_isw, 0.0))
    log_w = torch.clamp(log_w, _VESPO_LOG_MIN, LOG_RATIO_CLAMP)
    if not per_sequence:
        log_w = layout.per_token(log_w).expand_as(log_r)
    nonneg = adv >= 0
    k = torch.where(nonneg, config.vespo_k_pos, torch.full_like(log_w, config.vespo_k_neg))
    lam = torch.where(nonneg, config.vespo_lambda_pos, torch.full_like(log_w, config.vespo_lambda_neg))
    phi = torch.exp(lam + k * log_w - lam * torch.exp(log_w))
    return torch.where(torch.isinf(phi), 0.0, phi)


def vespo(logp: Tensor, old: Tensor, adv: Tensor, isw: Tensor | None, layout: Layout,
          config: PolicyLossConfig) -> tuple[Tensor, Tensor]:
    """(pg, ratio) per token of VESPO (TRL 1.16 loss_type "vespo"): -phi(w) A logp, phi the
    detached `vespo_weights` of the sequence ratio w (is_weights folded into w instead of
    multiplying the loss). The ratio reported is the token ratio."""
    log_r = (logp - old).detach()
    phi = vespo_weights(log_r, None if isw is None else isw.detach(), adv, layout, config)
    return -phi * adv * logp, torch.exp(torch.clamp(log_r, -LOG_RATIO_CLAMP, LOG_RATIO_CLAMP))


def _top_ranked(score: Tensor, eligible: Tensor, k: Tensor) -> Tensor:
    """bool, score's shape: the k (a 0-d tensor) highest scores among the eligible entries (ties
    to the earlier position), found by a sort instead of topk(k) so that k is never read back."""
    key = torch.where(eligible, score, -math.inf).reshape(-1)
    order = torch.sort(key, descending=True, stable=True).indices
    rank = torch.empty_like(order).scatter_(0, order, torch.arange(order.numel(), device=order.device))
    return (rank < k).view(score.shape) & eligible


def _covariance(logp: Tensor, adv: Tensor, mask: Tensor, eps: float) -> Tensor:
    """(A - mean A) (logp - mean logp) per token, the means over the counted tokens (+ eps in the
    count, as verl's masked_mean for clip_cov; 0 for kl_cov's plain mean); detached."""
    count = mask.sum() + eps
    mean_adv = torch.where(mask, adv, 0.0).sum() / count
    mean_logp = torch.where(mask, logp.detach(), 0.0).sum() / count
    return ((adv - mean_adv) * (logp.detach() - mean_logp)).detach()


def _cov_count(mask: Tensor, ratio: float) -> Tensor:
    """max(int(ratio * counted tokens), 1), verl's count of selected tokens, as a 0-d tensor (float64,
    as Python computes it)."""
    return torch.floor(mask.sum().to(torch.float64) * ratio).clamp(min=1.0)


def clip_cov(logp: Tensor, old: Tensor, adv: Tensor, isw: Tensor | None, layout: Layout,
             config: PolicyLossConfig) -> tuple[Tensor, Tensor]:
    """(pg, ratio) per token of Clip-Cov (arXiv 2505.22617; verl 0.9.1 compute_policy_loss_clip_cov):
    the clipped surrogate (no dual clip), with max(int(cov_ratio * counted), 1) tokens drawn at
    random (torch's RNG on logp's device) among those whose covariance of A and logp lies in
    (cov_low, cov_high) and which the clip does not already bind, given pg = 0. verl draws with
    torch.randperm, so its choice among the candidates differs, not its distribution; its ratio is
    unclamped where this one's log is clamped at +-20."""
    log_r = torch.clamp(logp - old, -LOG_RATIO_CLAMP, LOG_RATIO_CLAMP)
    pg, ratio, _, _ = clipped_surrogate(log_r, adv, config.clip_low, config.clip_high)
    clipped_wins = -adv * torch.clamp(ratio, 1.0 - config.clip_low, 1.0 + config.clip_high) > -adv * ratio
    cov = _covariance(logp, adv, layout.mask, 1e-8)
    candidates = (cov > config.cov_low) & (cov < config.cov_high) & layout.mask & ~clipped_wins
    drawn = _top_ranked(torch.rand(cov.shape, device=cov.device), candidates, _cov_count(layout.mask, config.cov_ratio))
    pg = pg * (~drawn).to(pg.dtype)  # a product, not where(): a drawn NaN token stays NaN (NaN in, NaN out)
    return (pg if isw is None else pg * isw.detach()), ratio


def kl_cov(logp: Tensor, old: Tensor, adv: Tensor, isw: Tensor | None, layout: Layout,
           config: PolicyLossConfig) -> tuple[Tensor, Tensor]:
    """(pg, ratio) per token of KL-Cov (arXiv 2505.22617; verl 0.9.1 compute_policy_loss_kl_cov):
    -A r, plus cov_kl_coef |log r| on the max(int(cov_ratio * counted), 1) counted tokens of largest
    covariance of A and logp; no clipping. The ratio's log is clamped at +-20 (verl's is not)."""
    log_r = torch.clamp(logp - old, -LOG_RATIO_CLAMP, LOG_RATIO_CLAMP)
    r = torch.exp(log_r)
    cov = _covariance(logp, adv, layout.mask, 0.0)
    top = _top_ranked(cov, layout.mask, _cov_count(layout.mask, config.cov_ratio))
    pg = -adv * r + torch.where(top, config.cov_kl_coef * log_r.abs(), 0.0)
    return (pg if isw is None else pg * isw.detach()), r.detach()


# The objectives that couple tokens, by name: (logp, old, adv, is_weights, layout, config) -> (pg, ratio).
COUPLED = {"gmpo": gmpo, "vespo": vespo, "clip_cov": clip_cov, "kl_cov": kl_cov}


def off_policy_keep(logp: Tensor, sampling: Tensor, adv: Tensor, layout: Layout, threshold: float) -> Tensor:
    """DeepSeek-V3.2's off-policy sequence mask (TRL 1.16 GRPOTrainer.get_off_policy_mask), per
    token: 1.0 unless A < 0 and the sequence's mean of (sampling - logp) over its counted tokens
    exceeds threshold, a NaN sampling log-prob counting as 0 there (as TRL's)."""
    kl = torch.nan_to_num(sampling - logp.detach(), nan=0.0)
    keep = (adv >= 0) | (_seq_mean(kl, layout) <= threshold)
    return keep.to(logp.dtype)


def counted_quantile(x: Tensor, mask: Tensor, q: float) -> Tensor:
    """torch.quantile(x[mask], q) (linear interpolation) without reading the count back to the
    host: the counted values sorted first, the rest after them as +inf. An empty mask gives +inf."""
    values = torch.sort(torch.where(mask, x, math.inf).reshape(-1)).values
    n = mask.sum()
    pos = (n - 1).clamp(min=0).to(x.dtype) * q
    lo = pos.floor().long()
    hi = torch.minimum(lo + 1, (n - 1).clamp(min=0))
    # gather, not values[lo]: indexing with a 0-d tensor reads it back to the host.
    low_value, high_value = values.gather(0, lo.view(1))[0], values.gather(0, hi.view(1))[0]
    # torch.lerp, as torch.quantile: an exact hit keeps its value even next to +inf.
    value = torch.where(pos == lo, low_value, torch.lerp(low_value, high_value, pos - lo))
    return torch.where(n > 0, value, math.inf)


def high_entropy_mask(entropy: Tensor, mask: Tensor, quantile: float) -> Tensor:
    """TRL 1.16 GRPOTrainer.get_high_entropy_mask in one process: the counted tokens whose
    entropy is at least the (1 - quantile) quantile of the counted tokens' entropies (bool)."""
    threshold = counted_quantile(entropy.detach(), mask, 1.0 - quantile)
    return (entropy.detach() >= threshold) & mask
