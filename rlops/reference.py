"""SPEC.md written out in float64 PyTorch: the test oracle, and a reader's guide to the numbers.

Every function casts its inputs to float64 and transcribes one SPEC section, unchunked,
with gradients from autograd on those formulas. Nothing in rlops runs this: the backends
(Triton kernels, the CUDA twins, the PyTorch backend in rlops/torch_backend.py) are written
separately, and the tests compare each of them with this module.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from .constants import K3_MAX, LOG_RATIO_CLAMP, SEQ_LOG_RATIO_MAX
from .options import KL_ESTIMATORS, LOSS_AGGS, RATIO_LEVELS, PolicyLossConfig

__all__ = ["KL_ESTIMATORS", "LOSS_AGGS", "RATIO_LEVELS", "SEQ_LOG_RATIO_MAX"]

f64 = torch.float64


def _softmax_parts(logits: Tensor, temperature: float) -> tuple[Tensor, Tensor, Tensor]:
    """(z, lse, p) of SPEC section 1: z = x / tau, lse = logsumexp_v z, p = exp(z - lse)."""
    z = logits.to(f64) / temperature
    top = z.max(-1, keepdim=True).values.detach()
    lse = top + (z - top).exp().sum(-1, keepdim=True).log()
    return z, lse, (z - lse).exp()


def _finite_where_p(p: Tensor, x: Tensor) -> Tensor:
    """x where p > 0, else 0: the SPEC's "never 0 * (-inf)" with a finite gradient too."""
    return torch.where(p > 0, x, torch.zeros_like(x))


def token_logprobs(logits: Tensor, tokens: Tensor, temperature: float = 1.0) -> Tensor:
    """logp = z[a] - lse per token: logits (..., V), tokens (...) -> float64 (...)."""
    z, lse, _ = _softmax_parts(logits, temperature)
    return (z.gather(-1, tokens.long()[..., None]) - lse).squeeze(-1)


def _stats(logits: Tensor, tokens: Tensor, temperature: float,
           ref_logits: Tensor | None = None) -> tuple[Tensor, Tensor, Tensor | None]:
    """(logp, H, KL or None) per token: H = lse - sum_v p_v z_v, KL = sum_v p_v (log p_v - log q_v)."""
    z, lse, p = _softmax_parts(logits, temperature)
    logp = (z.gather(-1, tokens.long()[..., None]) - lse).squeeze(-1)
    entropy = lse.squeeze(-1) - (p * _finite_where_p(p, z)).sum(-1)
    if ref_logits is None:
        return logp, entropy, None
    y, lse_ref, _ = _softmax_parts(ref_logits.detach(), temperature)
    return logp, entropy, (p * _finite_where_p(p, (z - lse) - (y - lse_ref))).sum(-1)


def token_logprobs_and_entropy(logits: Tensor, tokens: Tensor, temperature: float = 1.0) -> tuple[Tensor, Tensor]:
    """(logp, H) per token; float64 of tokens' shape."""
    return _stats(logits, tokens, temperature)[:2]


def token_stats_with_kl(logits: Tensor, tokens: Tensor, ref_logits: Tensor,
                        temperature: float = 1.0) -> tuple[Tensor, Tensor, Tensor]:
    """(logp, H, full KL) per token, q = softmax(ref_logits / tau) (no gradient)."""
    return _stats(logits, tokens, temperature, ref_logits)


def log_ratio(logp: Tensor, old_logp: Tensor | None, mask: Tensor, ratio_level: str = "token") -> Tensor:
    """SPEC section 2: log r per token (B, T); old None = on-policy; "sequence" is GSPO's."""
    logp = logp.to(f64)
    old = logp.detach() if old_logp is None else old_logp.to(f64)
    diff = torch.where(mask.bool(), logp - old, torch.zeros_like(logp))
    if ratio_level == "token":
        return diff.clamp(-LOG_RATIO_CLAMP, LOG_RATIO_CLAMP)
    count = mask.to(f64).sum(-1, keepdim=True)
    mean = diff.sum(-1, keepdim=True) / torch.where(count > 0, count, torch.ones_like(count))
    return mean.clamp(max=SEQ_LOG_RATIO_MAX).expand_as(logp)


def clipped_surrogate(log_r: Tensor, advantages: Tensor, clip_low: float, clip_high: float,
                      dual_clip: float | None = None, is_weights: Tensor | None = None, ratio_cap: float | None = None
                      ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """SPEC section 2: (pg, r, clipped below, clipped above) per token; advantages broadcast;
    ratio_cap (docs/objectives.md): the unclipped term's ratio capped above."""
    r = log_r.to(f64).exp()
    a = advantages.to(f64).expand_as(r)
    unclipped = r if ratio_cap is None else r.clamp(max=ratio_cap)
    pg = torch.max(-a * unclipped, -a * r.clamp(1 - clip_low, 1 + clip_high))
    if dual_clip is not None:
        pg = torch.where(a < 0, torch.min(pg, -a * dual_clip), pg)
    if is_weights is not None:
        pg = pg * is_weights.detach().to(f64)
    return pg, r.detach(), (r < 1 - clip_low) & (a < 0), (r > 1 + clip_high) & (a > 0)


def objective_pg(log_r: Tensor, logp: Tensor, old_logp: Tensor | None, advantages: Tensor,
                 opt: PolicyLossConfig) -> Tensor:
    """docs/objectives.md: the policy-gradient term per token (float64) of the objectives beyond
    the clipped surrogate: cispo, sapo, reinforce, dro, dppo_tv, dppo_kl. old_logp None: on policy."""
    r = log_r.to(f64).exp()
    a = advantages.to(f64).expand_as(r)
    logp = logp.to(f64)
    old = logp.detach() if old_logp is None else old_logp.to(f64)
    if opt.objective == "cispo":  # the clipped weight carries no gradient; logp does
        weight = r.clamp(1 - opt.clip_low, 1 + opt.clip_high).detach()
        return -(weight * a) * logp
    if opt.objective == "sapo":
        tau = torch.full_like(a, opt.sapo_tau_neg)
        tau[a > 0] = opt.sapo_tau_pos
        gate = 1 / (1 + torch.exp(-tau * (r - 1)))
        return -a * gate * 4 / tau
    if opt.objective == "reinforce":
        return -a * logp
    if opt.objective == "dro":
        return -a * logp + opt.dro_beta / 2 * (logp - old) ** 2
    if opt.objective in ("dppo_tv", "dppo_kl"):
        p, q = logp.detach().exp(), old.exp()  # q: the old policy's probability of the token
        if opt.objective == "dppo_tv":
            inside = torch.where(a > 0, p - q <= opt.clip_high, q - p <= opt.clip_low)
        else:
            bernoulli_kl = q * (old - logp.detach()) + (1 - q) * torch.log((1 - q + 1e-8) / (1 - p + 1e-8))
            inside = torch.where(a > 0, (bernoulli_kl <= opt.clip_high) | (p <= q),
                                 (bernoulli_kl <= opt.clip_low) | (p >= q))
        weight = r.detach() if opt.ratio_cap is None else r.detach().clamp(max=opt.ratio_cap)
        weight = torch.where(inside, weight, torch.zeros_like(weight))
        weight[logp.isnan() | old.isnan()] = float("nan")
        return -(weight * a) * logp
    raise ValueError(f"objective must be a per-token objective other than clip here, got {opt.objective!r}")


def sequence_pg(logp: Tensor, old: Tensor, adv: Tensor, is_weights: Tensor | None, mask: Tensor,
                opt: PolicyLossConfig) -> tuple[Tensor, Tensor]:
    """docs/objectives.md: GMPO's and VESPO's pg per token (each row a sequence), and the ratio
    reported (GMPO's geometric mean per sequence, VESPO's token ratio); float64, row by row."""
    pg_rows, ratio_rows = [], []
    isw = torch.ones_like(logp) if is_weights is None else is_weights.detach().to(f64).expand_as(logp)
    for i in range(logp.shape[0]):
        m = mask[i].bool()
        lp, d, a = logp[i].to(f64), logp[i].to(f64) - old[i], adv[i]
        if opt.objective == "gmpo":
            n = float(m.sum()) + 1e-8
            clipped = torch.where(a > 0, torch.min(d, d.clamp(max=opt.clip_high)),
                                  torch.where(a < 0, torch.max(d, d.clamp(min=-opt.clip_low)), torch.zeros_like(d)))
            ratio = torch.exp(clipped[m].sum() / n)
            geo_isw = torch.exp(torch.log(isw[i][m] + 1e-10).sum() / n)
            pg_rows.append((-a[m].sum() / n * ratio * geo_isw).expand_as(lp))
            ratio_rows.append(ratio.detach().expand_as(lp))
            continue
        log_w = d.detach().clamp(-LOG_RATIO_CLAMP, LOG_RATIO_CLAMP)[m].sum()
        if is_weights is not None:
            log_w = log_w + isw[i][m].log().clamp(math.log(1e-8), LOG_RATIO_CLAMP).sum()
        log_w = log_w.clamp(math.log(1e-8), LOG_RATIO_CLAMP)
        k = torch.where(a >= 0, opt.vespo_k_pos, opt.vespo_k_neg).to(f64)
        lam = torch.where(a >= 0, opt.vespo_lambda_pos, opt.vespo_lambda_neg).to(f64)
        phi = torch.exp(lam + k * log_w - lam * log_w.exp())
        phi = torch.where(phi.isinf(), torch.zeros_like(phi), phi)  # TRL's overflow to 0; NaN in, NaN out
        pg_rows.append(-phi * a * lp)
        ratio_rows.append(d.detach().clamp(-LOG_RATIO_CLAMP, LOG_RATIO_CLAMP).exp())
    return torch.stack(pg_rows), torch.stack(ratio_rows)


def covariance_pg(logp: Tensor, old: Tensor, adv: Tensor, is_weights: Tensor | None, mask: Tensor,
                  opt: PolicyLossConfig) -> tuple[Tensor, Tensor]:
    """docs/objectives.md: Clip-Cov's and KL-Cov's pg per token (float64). Clip-Cov here zeroes
    every candidate, which is its draw when max(int(cov_ratio * n), 1) >= the number of candidates
    (the tests choose cov_ratio so); KL-Cov's selection is deterministic."""
    m = mask.bool()
    lp = logp.to(f64)
    log_r = (lp - old).clamp(-LOG_RATIO_CLAMP, LOG_RATIO_CLAMP)
    r = log_r.exp()
    n = int(m.sum())
    count = n + (1e-8 if opt.objective == "clip_cov" else 0.0)
    cov = ((adv - adv[m].sum() / count) * (lp.detach() - lp.detach()[m].sum() / count)) if n else torch.zeros_like(r)
    selected = torch.zeros_like(m)
    if opt.objective == "kl_cov":
        if n:
            k = max(int(n * opt.cov_ratio), 1)
            flat = [(float(cov[i, j]), i, j) for i, j in m.nonzero().tolist()]
            for _, i, j in sorted(flat, key=lambda e: -e[0])[:k]:
                selected[i, j] = True
        pg = -adv * r + torch.where(selected, opt.cov_kl_coef * log_r.abs(), torch.zeros_like(r))
    else:
        pg, _, _, _ = clipped_surrogate(log_r, adv, opt.clip_low, opt.clip_high)
        clipped_wins = -adv * r.clamp(1 - opt.clip_low, 1 + opt.clip_high) > -adv * r
        selected = (cov > opt.cov_low) & (cov < opt.cov_high) & m & ~clipped_wins.detach()
        pg = pg * (~selected).to(f64)
    if is_weights is not None:
        pg = pg * is_weights.detach().to(f64)
    return pg, r.detach()


def off_policy_keep(logp: Tensor, sampling: Tensor, adv: Tensor, mask: Tensor, threshold: float) -> Tensor:
    """docs/objectives.md: the off-policy sequence mask, 1 or 0 per token (float64), row by row."""
    keep = torch.ones_like(logp, dtype=f64)
    for i in range(logp.shape[0]):
        m = mask[i].bool()
        gap = (sampling[i].to(f64) - logp[i].detach().to(f64))[m].nan_to_num(0.0)
        mean_gap = float(gap.sum()) / max(int(m.sum()), 1)
        keep[i] = torch.where(adv[i] >= 0, 1.0, 1.0 if mean_gap <= threshold else 0.0)
    return keep


def high_entropy(entropy: Tensor, mask: Tensor, quantile: float) -> Tensor:
    """docs/objectives.md: the counted tokens whose entropy is at least the (1 - quantile)
    quantile of the counted tokens' entropies (linear interpolation between order statistics)."""
    values = sorted(float(v) for v in entropy.detach()[mask.bool()].to(f64))
    if not values:
        return torch.zeros_like(mask, dtype=torch.bool)
    pos = (len(values) - 1) * (1 - quantile)
    lo = math.floor(pos)
    hi = min(lo + 1, len(values) - 1)
    threshold = values[lo] + (values[hi] - values[lo]) * (pos - lo)
    return (entropy.detach() >= threshold) & mask.bool()


def kl_penalty(logp: Tensor, ref_logp: Tensor, estimator: str = "k3") -> Tensor:
    """SPEC section 3: k1, k2 or k3 per token, with d = ref_logp - logp; abs = |d| (verl's "abs");
    a "+" form is its base's value carrying k2's gradient (verl's straight-through estimators)."""
    if estimator.endswith("+"):
        k2 = kl_penalty(logp, ref_logp, "k2")
        return k2 + (kl_penalty(logp, ref_logp, estimator[:-1]) - k2).detach()
    d = ref_logp.to(f64) - logp.to(f64)
    if estimator == "k1":
        return -d
    if estimator == "k2":
        return 0.5 * d**2
    if estimator == "k3":
        dc = d.clamp(-LOG_RATIO_CLAMP, LOG_RATIO_CLAMP)
        return (dc.exp() - dc - 1).clamp(max=K3_MAX)
    if estimator == "abs":
        return d.abs()
    raise ValueError(f"kl_estimator must be k1, k2, k3, abs or a + form here, got {estimator!r}")


def aggregate(per_token: Tensor, mask: Tensor, loss_agg: str = "token-mean", norm_len: float | None = None) -> Tensor:
    """SPEC section 4's table, row by row; an empty mask gives 0."""
    m = mask.bool()
    masked = torch.where(m, per_token.to(f64), torch.zeros((), dtype=f64, device=per_token.device))
    n_rows, n_time = m.shape
    row_sums, row_counts = masked.sum(-1), m.sum(-1)
    if loss_agg == "token-mean":
        return masked.sum() / max(int(m.sum()), 1)
    if loss_agg == "seq-mean-token-mean":
        valid = row_counts > 0
        means = row_sums[valid] / row_counts[valid]
        return means.sum() / max(int(valid.sum()), 1)
    if loss_agg == "seq-mean-token-sum":
        return row_sums.sum() / max(n_rows, 1)
    if loss_agg == "seq-mean-token-sum-norm":
        length = n_time if norm_len is None else norm_len
        return row_sums.sum() / (n_rows * length) if n_rows * length > 0 else row_sums.sum()
    raise ValueError(f"loss_agg must be one of {', '.join(LOSS_AGGS)}, got {loss_agg!r}")


@dataclass
class ReferencePolicyLoss:
    """Everything the oracle computes; per-token fields are float64 (B, T)."""

    loss: Tensor
    per_token_loss: Tensor
    logprobs: Tensor
    entropy: Tensor
    kl: Tensor
    ratio: Tensor
    pg: Tensor
    clipped_low: Tensor
    clipped_high: Tensor


def policy_loss(logits: Tensor, tokens: Tensor, advantages: Tensor,
                **inputs_and_options: object) -> ReferencePolicyLoss:
    """SPEC sections 1-4 on logits (B, T, V), tokens (B, T) and advantages (B, T), (B, 1) or (B,).

    Keywords: the tensors mask, old_logprobs, ref_logprobs, ref_logits, is_weights, and the
    options of `rlops.policy_loss` (temperature, clip_low, ..., kl_ratio_weighted); inputs are
    assumed valid. l_t = pg_t + kl_coef * kl_t (times r_t with kl_ratio_weighted) - entropy_coef * H_t,
    aggregated by loss_agg; with entropy_agg the entropy term is aggregated on its own.
    """
    names = ("mask", "old_logprobs", "ref_logprobs", "ref_logits", "is_weights", "rollout_logprobs")
    t = {name: inputs_and_options.pop(name, None) for name in names}
    opt = PolicyLossConfig(**inputs_and_options)
    mask = torch.ones(tokens.shape, dtype=torch.bool, device=tokens.device) if t["mask"] is None else t["mask"].bool()
    full = opt.kl_coef != 0 and opt.kl_estimator == "full"
    if full:
        logp, entropy, kl = token_stats_with_kl(logits, tokens, t["ref_logits"], opt.temperature)
    else:
        logp, entropy = token_logprobs_and_entropy(logits, tokens, opt.temperature)
        kl = kl_penalty(logp, t["ref_logprobs"], opt.kl_estimator) if opt.kl_coef != 0 else torch.zeros_like(logp)
    adv = (advantages[:, None] if advantages.dim() == 1 else advantages).to(f64).expand_as(logp)
    log_r = log_ratio(logp, t["old_logprobs"], mask, opt.ratio_level)
    pg, ratio, low, high = clipped_surrogate(log_r, adv, opt.clip_low, opt.clip_high, opt.dual_clip, t["is_weights"],
                                             opt.ratio_cap)
    old = logp.detach() if t["old_logprobs"] is None else t["old_logprobs"].to(f64)
    if opt.objective in ("gmpo", "vespo"):
        pg, ratio = sequence_pg(logp, old, adv, t["is_weights"], mask, opt)
    elif opt.objective in ("clip_cov", "kl_cov"):
        pg, ratio = covariance_pg(logp, old, adv, t["is_weights"], mask, opt)
    elif opt.objective != "clip":
        pg = objective_pg(log_r, logp, t["old_logprobs"], adv, opt)
        pg = pg if t["is_weights"] is None else pg * t["is_weights"].detach().to(f64)
    if opt.off_policy_mask is not None:
        sampling = old if t["rollout_logprobs"] is None else t["rollout_logprobs"].to(f64)
        pg = pg * off_policy_keep(logp, sampling, adv, mask, opt.off_policy_mask)
    entropy_mask = mask
    if opt.top_entropy_quantile < 1:
        entropy_mask = high_entropy(entropy, mask, opt.top_entropy_quantile)
        pg = pg * entropy_mask
    kl_term = kl * log_r.exp() if opt.kl_ratio_weighted and opt.kl_coef != 0 else kl
    per_token = pg + opt.kl_coef * kl_term - opt.entropy_coef * entropy
    if opt.entropy_agg in (None, opt.loss_agg) and opt.top_entropy_quantile == 1:
        loss = aggregate(per_token, mask, opt.loss_agg, opt.norm_len)
    else:
        loss = (aggregate(pg + opt.kl_coef * kl_term, mask, opt.loss_agg, opt.norm_len)
                - opt.entropy_coef * aggregate(entropy, entropy_mask, opt.entropy_agg or opt.loss_agg, opt.norm_len))
    return ReferencePolicyLoss(loss, per_token, logp, entropy, kl, ratio, pg, low, high)


def gae(rewards: Tensor, values: Tensor, mask: Tensor | None = None, gamma: float = 1.0, lam: float = 0.95,
        bootstrap: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """SPEC section 5's GAE, one row and one step at a time: float64 (advantages, returns), 0 where masked."""
    r, v = rewards.to(f64), values.to(f64)
    m = torch.ones(r.shape, dtype=torch.bool) if mask is None else mask.bool().cpu()
    adv = torch.zeros(r.shape, dtype=f64)
    for i in range(r.shape[0]):
        next_value = 0.0 if bootstrap is None else float(bootstrap[i])
        next_adv = 0.0
        for t in reversed(range(r.shape[1])):
            if not m[i, t]:
                continue  # a masked position carries both running values through
            delta = float(r[i, t]) + gamma * next_value - float(v[i, t])
            next_adv = delta + gamma * lam * next_adv
            next_value = float(v[i, t])
            adv[i, t] = next_adv
    adv = adv.to(r.device)
    return adv, torch.where(m.to(r.device), adv + v, torch.zeros_like(adv))
