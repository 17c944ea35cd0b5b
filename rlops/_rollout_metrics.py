"""The metrics of rlops.rollout_correction: verl 0.9.1's (rollout_corr_helper.py: compute_is_metrics,
compute_rs_metrics, compute_offpolicy_metrics) and TRL 1.16's sampling/* (grpo_trainer.py), from the
state `rollout_correction` keeps. Formulas and names: docs/rollout_correction.md."""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import Tensor

from .rollout_correction import SAFETY_BOUND, _Rejected, _seq_mean, _seq_sum, _State


def _mmean(x: Tensor, m: Tensor) -> Tensor:
    return torch.where(m, x, 0).sum() / m.sum().clamp_min(1)


def _mmax(x: Tensor, m: Tensor) -> Tensor:
    return x.masked_fill(~m, -math.inf).max()


def _mmin(x: Tensor, m: Tensor) -> Tensor:
    return x.masked_fill(~m, math.inf).min()


def _std(x: Tensor) -> Tensor:
    """Unbiased std of a 1-D tensor; 0 for fewer than two values (verl's guard)."""
    return x.std() if x.numel() > 1 else x.new_zeros(())


def _clamped_std(x: Tensor, m: Tensor, lo: float, hi: float) -> Tensor:
    """verl's std: sqrt(E[c^2] - E[c]^2) of c = clamp(x, lo, hi) over the mask; 0 for <= 1 token."""
    if int(m.sum()) <= 1:
        return x.new_zeros(())
    c = x.clamp(min=lo, max=hi)
    return (_mmean(c.square(), m) - _mmean(c, m).square()).clamp_min(0).sqrt()


def _seq_summary(prefix: str, v: Tensor, ideal: float) -> dict[str, Tensor]:
    """verl's per-sequence summary: mean, unbiased std, max, min and the largest |v - ideal|."""
    return {f"{prefix}_seq_mean": v.mean(), f"{prefix}_seq_std": _std(v), f"{prefix}_seq_max": v.max(),
           f"{prefix}_seq_min": v.min(), f"{prefix}_seq_max_deviation": (v - ideal).abs().max()}


def _is_metrics(s: _State) -> dict[str, Tensor]:
    """verl's compute_is_metrics (+ IcePop's oob_ratio and the batch-norm factor), before normalisation."""
    o, m, w, raw = s.options, s.layout.mask, s.bounded, s.raw
    hi = math.inf if o.upper is None else o.upper
    lo = o.lower if o.lower is not None else 1.0 / hi  # verl: 1 / upper unless IcePop gives a lower
    out = {"rollout_is_mean": _mmean(w, m)}
    if o.level == "sequence":  # in log space, over every sequence (empty ones have log-ratio 0)
        lr = s.seq_log_ratio
        out |= {"rollout_is_max": torch.exp(lr.max().clamp(max=SAFETY_BOUND)), "rollout_is_min": torch.exp(lr.min()),
                "rollout_is_ratio_fraction_high": (lr > math.log(hi)).double().mean(),
                "rollout_is_ratio_fraction_low": (lr < _log(lo)).double().mean()}
    else:
        out |= {"rollout_is_ratio_fraction_high": _mmean((raw > hi).to(w.dtype), m),
                "rollout_is_ratio_fraction_low": _mmean((raw < lo).to(w.dtype), m),
                "rollout_is_max": _mmax(w, m), "rollout_is_min": _mmin(w, m)}
    out["rollout_is_std"] = _clamped_std(w, m, 0.0, hi)
    c = w.clamp(min=0.0, max=hi)
    out["rollout_is_eff_sample_size"] = 1.0 / _mmean((c / (_mmean(c, m) + 1e-8)).square(), m)
    seq_mean = _seq_mean(s.layout, w)  # every sequence, an empty one as 0 (verl)
    out |= _seq_summary("rollout_is", seq_mean, 1.0)
    raw_seq_mean = _seq_mean(s.layout, raw)
    out["rollout_is_seq_fraction_high"] = (raw_seq_mean > hi).double().mean()
    out["rollout_is_seq_fraction_low"] = (raw_seq_mean < lo).double().mean()
    if o.mode == "mask":
        oob = (raw < (o.lower or 0.0)) | (raw > hi)
        out["rollout_is_oob_ratio"] = _mmean(oob.to(w.dtype), m)
    if s.norm is not None:
        out["rollout_is_batch_norm_factor"] = s.norm
    return out


def _log(x: float) -> float:
    return math.log(x) if x > 0 else -math.inf


def _rs_option_metrics(s: _State, r: _Rejected) -> dict[str, Tensor]:
    """verl's compute_rs_metrics for one option, and its masked fractions."""
    m, layout = s.layout.mask, s.layout
    k1 = r.option.endswith("k1")
    hi = math.log(r.upper) if k1 else r.upper
    lo = math.log(r.lower) if k1 else 0.0
    seq_level = r.seq_stat is not None
    stat = r.token_stat if not seq_level else torch.broadcast_to(layout.per_token(r.seq_stat), m.shape)
    valid = layout.seq_totals(m.to(stat.dtype)) > 0
    seq_v = (r.seq_stat if seq_level else _seq_mean(layout, r.token_stat))[valid]
    p = f"rollout_rs_{r.option}"
    out = {f"{p}_mean": _mmean(stat, m)}
    if seq_level:
        out |= {f"{p}_max": seq_v.max(), f"{p}_min": seq_v.min(), f"{p}_fraction_high": (seq_v > hi).double().mean(),
                f"{p}_fraction_low": (seq_v < lo).double().mean() if k1 else stat.new_zeros(())}
    else:
        out |= {f"{p}_max": _mmax(stat, m), f"{p}_min": _mmin(stat, m),
                f"{p}_fraction_high": _mmean((stat > hi).to(stat.dtype), m),
                f"{p}_fraction_low": _mmean((stat < lo).to(stat.dtype), m) if k1 else stat.new_zeros(())}
    out[f"{p}_std"] = _clamped_std(stat, m, lo, hi)
    out |= _seq_summary(p, seq_v, 0.0)
    out[f"{p}_seq_fraction_high"] = (seq_v > hi).double().mean()
    if k1:
        out[f"{p}_seq_fraction_low"] = (seq_v < lo).double().mean()
    dropped = ~r.keep & m
    out[f"{p}_masked_fraction"] = _mmean(dropped.to(stat.dtype), m)
    seq_dropped = layout.seq_totals(dropped.to(stat.dtype)) > 0
    out[f"{p}_seq_masked_fraction"] = (seq_dropped & valid).double().sum() / valid.double().sum().clamp_min(1)
    return out


def _rs_metrics(s: _State) -> dict[str, Tensor]:
    out: dict[str, Tensor] = {}
    for r in s.rejected:
        out |= _rs_option_metrics(s, r)
    m = s.layout.mask
    dropped = m & ~s.mask
    out["rollout_rs_masked_fraction"] = _mmean(dropped.to(s.log_ratio.dtype), m)
    # verl divides by every sequence here, empty ones included (its per-option fraction does not)
    out["rollout_rs_seq_masked_fraction"] = (s.layout.seq_totals(dropped.to(s.log_ratio.dtype)) > 0).double().mean()
    return out


def _offpolicy_metrics(s: _State) -> dict[str, Tensor]:
    """verl's compute_offpolicy_metrics: perplexities, KL and chi^2 between the two policies."""
    layout, m, lr = s.layout, s.layout.mask, s.log_ratio
    train, roll = _seq_mean(layout, s.logprobs), _seq_mean(layout, s.rollout_logprobs)
    log_ppl_diff = roll - train
    seq_lr = torch.exp(2.0 * _seq_sum(layout, lr).clamp(-SAFETY_BOUND, SAFETY_BOUND))
    return {"training_ppl": torch.exp(-train).mean(), "training_log_ppl": (-train).mean(),
            "kl": _mmean(-lr, m), "k3_kl": _mmean(torch.exp(lr) - lr - 1, m),
            "rollout_ppl": torch.exp(-roll).mean(), "rollout_log_ppl": (-roll).mean(),
            "log_ppl_diff": log_ppl_diff.mean(), "log_ppl_abs_diff": log_ppl_diff.abs().mean(),
            "log_ppl_diff_max": log_ppl_diff.max(), "log_ppl_diff_min": log_ppl_diff.min(),
            "ppl_ratio": torch.exp(log_ppl_diff).mean(),
            "chi2_token": _mmean(torch.exp(lr.clamp(-SAFETY_BOUND, SAFETY_BOUND)).square(), m) - 1.0,
            "chi2_seq": seq_lr.mean() - 1.0}


def _trl_metrics(s: _State) -> dict[str, Tensor]:
    """TRL 1.16 GRPOTrainer's sampling/* metrics (one process: its gathers are identities)."""
    m = s.layout.mask
    delta = s.diff.abs()
    delta = delta[m & ~delta.isnan()]  # TRL leaves the tokens vLLM could not score out
    zero = s.diff.new_zeros(())
    out = {"sampling/sampling_logp_difference/mean": delta.mean() if delta.numel() else zero,
           "sampling/sampling_logp_difference/max": delta.max() if delta.numel() else zero}
    if s.weights is not None:
        # per sequence: every sequence, an empty one included (TRL flattens its (B, 1) ratios)
        flat = s.weights[m] if s.seq_weights is None else s.seq_weights
        out |= {"sampling/importance_sampling_ratio/min": flat.min() if flat.numel() else zero,
                "sampling/importance_sampling_ratio/mean": flat.mean() if flat.numel() else zero,
                "sampling/importance_sampling_ratio/max": flat.max() if flat.numel() else zero}
    return out


def _verl_metrics(s: _State, parts: tuple[Callable[[_State], dict[str, Tensor]], ...]) -> dict[str, Tensor]:
    """verl's metric groups under "rollout_corr/"; none when no token counts (verl raises there)."""
    if not bool(s.layout.mask.any()):
        return {}
    out: dict[str, Tensor] = {}
    for part in parts:
        out |= part(s)
    return {f"rollout_corr/{k}": v for k, v in out.items()}


def _to_floats(metrics: dict[str, Tensor]) -> dict[str, float]:
    """Python floats, read back in one transfer."""
    if not metrics:
        return {}
    values = torch.stack([v.detach().to(torch.float64).reshape(()) for v in metrics.values()])
    return dict(zip(metrics, values.tolist(), strict=True))


def metrics(s: _State) -> dict[str, float]:
    """Every metric of one call, as Python floats (one read-back)."""
    parts = ((_is_metrics,) if s.weights is not None else ()) + ((_rs_metrics,) if s.rejected else ())
    return _to_floats(_verl_metrics(s, (*parts, _offpolicy_metrics)) | _trl_metrics(s))
