"""Rollout correction: importance weights and rejection masks between the rollout engine and the trainer.

The rollout engine (vLLM, SGLang) samples a token with its own log-prob `rollout_logprobs`; the
trainer recomputes the log-prob of the same token, `logprobs` (verl's `old_log_prob`, TRL's
`old_per_token_logps`). Kernels, precision and batching differ, so the two disagree and the
samples are slightly off-policy. With the log-ratio `log_ratio = logprobs - rollout_logprobs`
this module computes, vectorised over a padded (B, T) or packed (N,) batch:

- importance weights pi_train / pi_rollout per token, or per sequence (the product of its
  tokens' ratios), truncated into [lower, upper] (TIS) or zeroed outside it (MIS / IcePop),
  optionally normalised to mean 1 over the batch;
- rejection masks: tokens, or whole sequences, whose divergence estimate (k1, k2 or k3, per
  token, or summed / averaged / maxed over a sequence) leaves its bounds are dropped;
- verl 0.9.1's and TRL 1.16's metrics, computed only when `.metrics` is first read.

`RolloutCorrection.from_verl` and `.from_trl` translate those libraries' options (see
docs/rollout_correction.md for the formulas, sources and the option mapping). The weight and
mask computation reads nothing back to the host; the metrics do (one transfer).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from functools import cached_property
from typing import NamedTuple

import torch
from torch import Tensor

from ._validation import check_choice, check_float_tensor, check_mask, check_tensor
from .packing import Layout, check_cu_seqlens

# verl's SAFETY_BOUND: log-ratios are clamped into [-20, 20] before exp (exp(20) ~ 4.9e8).
SAFETY_BOUND = 20.0
LEVELS = ("token", "sequence")
MODES = ("truncate", "mask")
NAN_POLICIES = ("zero", "propagate")
# verl 0.9.1's SUPPORTED_ROLLOUT_RS_OPTIONS, in a fixed order.
REJECTION_OPTIONS = ("token_k1", "token_k2", "token_k3", "seq_sum_k1", "seq_sum_k2", "seq_sum_k3",
                     "seq_mean_k1", "seq_mean_k2", "seq_mean_k3", "seq_max_k2", "seq_max_k3")
TRL_MODES = ("token_truncate", "token_mask", "sequence_truncate", "sequence_mask")

Rejection = tuple[str, float | None, float]  # (option, lower, upper); lower only for the k1 options


# ---- options ------------------------------------------------------------------------------------------------

def _bound(name: str, value: object, *, allow_zero: bool = False) -> float | None:
    """None, or a finite real number > 0 (>= 0 with allow_zero), as float."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a float or None, got {type(value).__name__}")
    value = float(value)
    if not math.isfinite(value) or value < 0 or (value == 0 and not allow_zero):
        accepted = "a finite number >= 0" if allow_zero else "a finite number > 0"
        raise ValueError(f"{name} must be None or {accepted}, got {value}")
    return value


def _rejection(name: object, threshold: object, upper: object = ...) -> Rejection:
    """One rejection criterion from (option, threshold) or (option, lower, upper), checked.

    threshold: the upper bound (k1 options: the ratio bound u, lower = 1 / u as verl reads a
    single number), or a (lower, upper) pair (k1 options only)."""
    option = check_choice("reject option", name, REJECTION_OPTIONS)
    k1 = option.endswith("k1")
    if upper is not ...:
        lower = threshold
    elif isinstance(threshold, (tuple, list)) and len(threshold) == 2:
        lower, upper = threshold
    else:
        upper = _bound(f"reject[{option!r}]", threshold)
        lower = 1.0 / upper if k1 and upper is not None else None
    upper = _bound(f"reject[{option!r}] upper bound", upper)
    if upper is None:
        raise ValueError(f"reject[{option!r}] needs an upper bound > 0")
    if not k1:
        if lower is not None:
            raise ValueError(f"reject[{option!r}] takes a single upper bound (only the k1 options take a "
                             f"(lower, upper) pair), got lower = {lower}")
        return option, None, upper
    lower = _bound(f"reject[{option!r}] lower bound", lower)
    if lower is None or lower > upper:
        raise ValueError(f"reject[{option!r}] needs bounds 0 < lower <= upper, got ({lower}, {upper})")
    return option, lower, upper


def _rejections(spec: object) -> tuple[Rejection, ...]:
    """The `reject` field: a mapping {option: threshold} or a sequence of (option, threshold) or
    (option, lower, upper) tuples, as a tuple of checked (option, lower, upper) triples."""
    if isinstance(spec, Mapping):
        items = [(name, value) for name, value in spec.items()]
    elif isinstance(spec, (tuple, list)):
        items = list(spec)
    else:
        raise TypeError(f"reject must be a mapping or a sequence of (option, threshold) pairs, got "
                        f"{type(spec).__name__}")
    out: list[Rejection] = []
    for item in items:
        if not isinstance(item, (tuple, list)) or len(item) not in (2, 3):
            raise ValueError(f"reject entries must be (option, threshold) or (option, lower, upper), got {item!r}")
        crit = _rejection(*item)
        if crit[0] in [c[0] for c in out]:
            raise ValueError(f"reject lists option {crit[0]!r} twice")
        out.append(crit)
    return tuple(out)


@dataclass(frozen=True)
class RolloutCorrection:
    """Options of `rollout_correction` (frozen, hashable, checked on construction).

    level: None (no importance weights), "token" (w_t = r_t) or "sequence" (w_t = prod_{t' in
        seq(t)} r_t', one weight for every token of a sequence), with r_t = exp(log_ratio_t).
    mode: "truncate" (w clamped into [lower, upper]: TIS) or "mask" (w set to 0 outside
        [lower, upper]: MIS / IcePop; the token stays in `mask`, as in verl and TRL).
    upper, lower: the bounds on the ratio; None = unbounded on that side. lower <= upper.
    batch_normalize: divide the weights by their mean over the counted tokens ("token") or over
        the non-empty sequences ("sequence"), when that mean is > 1e-8 (verl).
    reject: rejection criteria, all of which a token must pass: {option: threshold} with the
        options of verl (token_k1..k3, seq_sum_k1..k3, seq_mean_k1..k3, seq_max_k2/k3) and a
        threshold u (keep stat <= u; for k1 the ratio bounds (1/u, u)) or, for k1 only, a pair
        (lower, upper) (keep log(lower) <= k1 <= log(upper)). Stored as (option, lower, upper).
    nan_log_ratio: what a NaN log-ratio at a counted token (a log-prob the engine could not give)
        becomes. "zero" (TRL): log-ratio 0, ratio 1, the token treated as on-policy everywhere.
        "propagate" (verl): left NaN, so token weights are NaN ("truncate") or 0 ("mask"), its
        sequence's weight likewise, it fails every rejection criterion, and metrics over it are NaN.
    log_ratio_bound: log-ratios (or, at sequence level, their sums) are clamped into [-b, b]
        before exp and in the rejection statistics (verl: 20); None: unclamped (TRL).
    """

    level: str | None = None
    mode: str = "truncate"
    upper: float | None = 2.0
    lower: float | None = None
    batch_normalize: bool = False
    reject: tuple[Rejection, ...] = field(default=())
    nan_log_ratio: str = "zero"
    log_ratio_bound: float | None = SAFETY_BOUND

    def __post_init__(self) -> None:
        check_choice("level", self.level, (None, *LEVELS))
        check_choice("mode", self.mode, MODES)
        upper, lower = _bound("upper", self.upper), _bound("lower", self.lower, allow_zero=True)
        if upper is not None and lower is not None and lower > upper:
            raise ValueError(f"lower must be <= upper, got lower = {lower} > upper = {upper}")
        if not isinstance(self.batch_normalize, bool):
            raise TypeError(f"batch_normalize must be a bool, got {type(self.batch_normalize).__name__}")
        check_choice("nan_log_ratio", self.nan_log_ratio, NAN_POLICIES)
        bound = _bound("log_ratio_bound", self.log_ratio_bound)
        for name, value in (("upper", upper), ("lower", lower), ("log_ratio_bound", bound),
                            ("reject", _rejections(self.reject))):
            object.__setattr__(self, name, value)  # frozen: store the normalised values once

    @classmethod
    def from_verl(cls, rollout_is: str | None = None, rollout_is_threshold: str | float | None = 2.0,
                  rollout_is_batch_normalize: bool = False, rollout_rs: str | None = None,
                  rollout_rs_threshold: str | float | None = None) -> RolloutCorrection:
        """The options of verl 0.9.1's `compute_rollout_correction_and_rejection_mask` (its
        `algorithm.rollout_correction` config), parsed as verl parses them: weights only when
        both rollout_is and rollout_is_threshold are set; a number is TIS (truncate at it), a
        "lower_upper" string IcePop (mask outside). NaN log-ratios propagate, bound 20."""
        level = mode = upper = lower = None
        if rollout_is is not None and rollout_is_threshold is not None:
            level = check_choice("rollout_is", rollout_is, LEVELS)
            upper, lower = _parse_verl_is_threshold(rollout_is_threshold)
            mode = "truncate" if lower is None else "mask"
        reject = () if rollout_rs is None else _parse_verl_rs(rollout_rs, rollout_rs_threshold)
        return cls(level=level, mode=mode or "truncate", upper=upper if level else 2.0, lower=lower,
                   batch_normalize=rollout_is_batch_normalize, reject=reject, nan_log_ratio="propagate",
                   log_ratio_bound=SAFETY_BOUND)

    @classmethod
    def from_trl(cls, vllm_importance_sampling_mode: str = "sequence_mask",
                 vllm_importance_sampling_clip_min: float | None = None,
                 vllm_importance_sampling_clip_max: float | None = 3.0,
                 vllm_importance_sampling_correction: bool = True) -> RolloutCorrection:
        """The options of TRL 1.16's GRPOConfig (defaults as there): "<level>_<mode>" with bounds
        [clip_min, clip_max]; NaN log-ratios count as 0; no clamp before exp."""
        check_choice("vllm_importance_sampling_mode", vllm_importance_sampling_mode, TRL_MODES)
        level, mode = vllm_importance_sampling_mode.split("_")
        return cls(level=level if vllm_importance_sampling_correction else None, mode=mode,
                   upper=vllm_importance_sampling_clip_max, lower=vllm_importance_sampling_clip_min,
                   nan_log_ratio="zero", log_ratio_bound=None)


def _parse_verl_is_threshold(spec: object) -> tuple[float, float | None]:
    """verl's `_parse_rollout_is_threshold`: (upper, lower), lower None unless "lower_upper"."""
    if isinstance(spec, bool) or not isinstance(spec, (int, float, str)):
        raise TypeError(f"rollout_is_threshold must be a float or a 'lower_upper' string, got {type(spec).__name__}")
    parts = spec.strip().split("_", 1) if isinstance(spec, str) else [spec]
    try:
        values = [float(p) for p in parts]
    except ValueError as exc:
        raise ValueError(f"rollout_is_threshold: invalid threshold {spec!r}") from exc
    upper, lower = values[-1], (values[0] if len(values) == 2 else None)
    if not upper > 0 or (lower is not None and not 0 < lower <= upper):
        raise ValueError(f"rollout_is_threshold must be an upper bound > 0 or 'lower_upper' with "
                         f"0 < lower <= upper, got {spec!r}")
    return upper, lower


def _parse_verl_rs(rollout_rs: object, spec: object) -> tuple[tuple[str, object], ...]:
    """verl's option list (comma separated, duplicates dropped) with `_parse_rollout_rs_thresholds`'
    threshold specs (one shared or one per option; "lower_upper" for the k1 options)."""
    options = list(dict.fromkeys(o.strip() for o in rollout_rs.split(",") if o.strip())) \
        if isinstance(rollout_rs, str) else []
    if not options:
        raise ValueError(f"rollout_rs must be a non-empty comma separated string of options, got {rollout_rs!r}")
    if spec is None:
        raise ValueError("rollout_rs_threshold must be provided when rollout_rs is set")
    if isinstance(spec, bool) or not isinstance(spec, (int, float, str)):
        raise TypeError(f"rollout_rs_threshold must be a string or a number, got {type(spec).__name__}")
    specs = [p.strip() for p in spec.split(",") if p.strip()] if isinstance(spec, str) else [str(spec)]
    if len(specs) not in (1, len(options)):
        raise ValueError(f"rollout_rs_threshold needs one threshold or {len(options)} (one per rollout_rs "
                         f"option), got {len(specs)}")
    specs = specs * len(options) if len(specs) == 1 else specs
    out = []
    for option, text in zip(options, specs, strict=True):
        try:
            values = tuple(float(p) for p in text.split("_", 1))
        except ValueError as exc:
            raise ValueError(f"rollout_rs_threshold: invalid threshold {text!r} for {option!r}") from exc
        out.append((option, values if len(values) == 2 else values[0]))
    return tuple(out)


# ---- the computation ----------------------------------------------------------------------------------------

class _Rejected(NamedTuple):
    option: str
    lower: float | None
    upper: float
    token_stat: Tensor  # the per-token divergence (mask's shape)
    seq_stat: Tensor | None  # (S,) the sequence statistic, None for token_* options
    keep: Tensor  # bool, mask's shape


class _State(NamedTuple):
    """Everything the metrics read (tensors in the compute dtype, mask's shape unless noted)."""

    options: RolloutCorrection
    layout: Layout
    logprobs: Tensor
    rollout_logprobs: Tensor  # with "zero", the trainer's log-prob where the log-ratio was NaN
    diff: Tensor  # logprobs - rollout_logprobs as given (NaN kept): TRL's logp-difference metric
    log_ratio: Tensor  # diff after the NaN policy
    seq_log_ratio: Tensor | None  # (S,) unclamped per-sequence sums, "sequence" level only
    raw: Tensor | None  # exp(clamped log-ratio), 0 off the mask, before truncation / masking
    bounded: Tensor | None  # truncated / masked, before batch normalisation (verl's metrics)
    weights: Tensor | None  # the final weights, 0 off the mask
    seq_weights: Tensor | None  # (S,) the final weight of each sequence, "sequence" level only
    norm: Tensor | None  # the batch-normalisation divisor, 1 when it was not applied
    rejected: tuple[_Rejected, ...]
    mask: Tensor  # bool, the input mask less the rejected tokens


def _seq_sum(layout: Layout, x: Tensor) -> Tensor:
    # torch.where, not a product: a NaN / inf off the mask must not reach the sum (verl's masked_sum).
    return layout.seq_totals(torch.where(layout.mask, x, 0))


def _seq_mean(layout: Layout, x: Tensor) -> Tensor:
    """(S,) masked mean of each sequence, 0 for an empty one (verl's masked_mean up to its +1e-8)."""
    return _seq_sum(layout, x) / layout.seq_totals(layout.mask.to(x.dtype)).clamp_min(1)


def _seq_max(layout: Layout, x: Tensor) -> Tensor:
    """(S,) masked max of each sequence, 0 for an empty one (verl's `_sequence_max`); NaN propagates."""
    x = x.masked_fill(~layout.mask, -math.inf)
    if layout.seq_ids is not None:
        out = x.new_full((layout.n_seqs,), -math.inf).scatter_reduce(0, layout.seq_ids, x.reshape(-1), "amax")
    else:
        out = x.amax(-1) if x.shape[-1] else x.new_full((layout.n_seqs,), -math.inf)
    return out.masked_fill(out == -math.inf, 0)


def _clamp(x: Tensor, bound: float | None) -> Tensor:
    return x if bound is None else x.clamp(-bound, bound)


def _bounded(ratio: Tensor, o: RolloutCorrection) -> Tensor:
    """Truncation (clamp into [lower, upper]) or masking (0 outside; NaN fails the test and becomes 0)."""
    if o.mode == "truncate":
        return ratio.clamp(min=o.lower, max=o.upper)
    lo = -math.inf if o.lower is None else o.lower
    hi = math.inf if o.upper is None else o.upper
    return torch.where((ratio >= lo) & (ratio <= hi), ratio, 0)


def _importance_weights(log_ratio: Tensor, layout: Layout, o: RolloutCorrection) -> dict[str, Tensor | None]:
    m = layout.mask
    seq_log = _seq_sum(layout, log_ratio) if o.level == "sequence" else None
    # Sequence level: the sum of the unclamped log-ratios is what verl clamps (and TRL does not).
    log_w = log_ratio if seq_log is None else layout.per_token(seq_log)
    raw = torch.where(m, torch.exp(_clamp(log_w, o.log_ratio_bound)), 0)
    bounded = torch.where(m, _bounded(raw, o), 0)
    seq_w = None if seq_log is None else _bounded(torch.exp(_clamp(seq_log, o.log_ratio_bound)), o)
    weights, norm = bounded, None
    if o.batch_normalize:
        if seq_w is None:
            mean = bounded.sum() / m.sum().clamp_min(1)
        else:
            valid = layout.seq_totals(m.to(seq_w.dtype)) > 0
            mean = torch.where(valid, seq_w, 0).sum() / valid.sum().clamp_min(1)
        ok = mean > 1e-8  # verl leaves all-zero weights as they are (and then reports a factor of 1)
        norm = torch.where(ok, mean, 1.0)
        weights, seq_w = bounded / norm, None if seq_w is None else seq_w / norm
    return {"seq_log_ratio": seq_log, "raw": raw, "bounded": bounded, "weights": weights,
            "seq_weights": seq_w, "norm": norm}


def _divergence(log_ratio: Tensor, k: str) -> Tensor:
    """Per-token k1 = -log r (= log pi_rollout / pi_train), k2 = (log r)^2 / 2, k3 = r - 1 - log r."""
    if k == "k1":
        return -log_ratio
    if k == "k2":
        return 0.5 * log_ratio**2
    return torch.exp(log_ratio) - 1.0 - log_ratio


def _reject(log_ratio: Tensor, layout: Layout, crit: Rejection) -> _Rejected:
    option, lower, upper = crit
    scope, k = option.rsplit("_", 1)
    token_stat = _divergence(log_ratio, k)
    seq_stat = None
    if scope != "token":
        reduce = {"seq_sum": _seq_sum, "seq_mean": _seq_mean, "seq_max": _seq_max}[scope]
        seq_stat = reduce(layout, token_stat)
    stat = token_stat if seq_stat is None else seq_stat
    # k1 bounds are ratio bounds, compared in log space; NaN fails every comparison (rejected).
    keep = (stat >= math.log(lower)) & (stat <= math.log(upper)) if k == "k1" else stat <= upper
    keep = keep if seq_stat is None else layout.per_token(keep)
    return _Rejected(option, lower, upper, token_stat, seq_stat, torch.broadcast_to(keep, layout.mask.shape))


def _checked(logprobs: object, rollout_logprobs: object, mask: object, options: object,
             cu_seqlens: object) -> tuple[Tensor, Tensor, Layout]:
    if not isinstance(options, RolloutCorrection):
        raise TypeError(f"options must be a RolloutCorrection, got {type(options).__name__}")
    lp = check_tensor("logprobs", logprobs)
    n = lp.shape[-1] if lp.dim() else 0
    shapes, described = ([(n,), (1, n)], "(N,) or (1, N)") if cu_seqlens is not None else \
        ([tuple(lp.shape)] if lp.dim() == 2 else [], "(B, T)")
    lp = check_float_tensor("logprobs", lp, lp, shapes, described, "logprobs")
    rlp = check_float_tensor("rollout_logprobs", rollout_logprobs, lp, [tuple(lp.shape)],
                             f"{tuple(lp.shape)} (logprobs' shape)", "logprobs")
    m = check_mask(mask, tuple(lp.shape), lp, "mask", "logprobs")
    cu = None if cu_seqlens is None else check_cu_seqlens(cu_seqlens, n, lp, "logprobs")
    return lp, rlp, Layout.of(m, cu)


def _compute(logprobs: Tensor, rollout_logprobs: Tensor, mask: Tensor, options: RolloutCorrection,
             cu_seqlens: Tensor | None = None) -> _State:
    return _compute_on(*_checked(logprobs, rollout_logprobs, mask, options, cu_seqlens), options)


def _compute_on(lp: Tensor, rlp: Tensor, layout: Layout, options: RolloutCorrection) -> _State:
    """The correction's state from checked inputs and their layout (mask and sequences)."""
    dtype = torch.promote_types(torch.promote_types(lp.dtype, rlp.dtype), torch.float32)
    lp, rlp = lp.detach().to(dtype), rlp.detach().to(dtype)  # the weights are constants of the loss
    diff = lp - rlp
    log_ratio = diff
    if options.nan_log_ratio == "zero":  # TRL: nan_to_num(diff, nan=0.0); only NaN (TRL also maps +-inf)
        nan = diff.isnan()
        log_ratio, rlp = diff.masked_fill(nan, 0.0), torch.where(nan, lp, rlp)
    parts = dict.fromkeys(("seq_log_ratio", "raw", "bounded", "weights", "seq_weights", "norm"))
    if options.level is not None:
        parts = _importance_weights(log_ratio, layout, options)
    clamped = _clamp(log_ratio, options.log_ratio_bound)
    rejected = tuple(_reject(clamped, layout, crit) for crit in options.reject)
    keep = layout.mask
    for r in rejected:
        keep = keep & r.keep
    return _State(options, layout, lp, rlp, diff, log_ratio, rejected=rejected, mask=keep, **parts)


@dataclass(frozen=True)
class RolloutCorrectionOutput:
    """What `rollout_correction` returns.

    weights: float32 (mask's shape), detached: multiply the per-token loss by them (0 off the
        mask; with a "sequence" level every token of a sequence has its sequence's weight);
        None when options.level is None.
    mask: bool (mask's shape): the input mask less the rejected tokens and sequences.
    metrics: dict[str, float], computed (one device-to-host transfer) on first access: verl's
        names under "rollout_corr/" and TRL's under "sampling/" (docs/rollout_correction.md).
    """

    weights: Tensor | None
    mask: Tensor
    _state: _State = field(repr=False, compare=False)

    @cached_property
    def metrics(self) -> dict[str, float]:
        from ._rollout_metrics import metrics  # imported here: that module builds on this one

        return metrics(self._state)


def rollout_correction(logprobs: Tensor, rollout_logprobs: Tensor, mask: Tensor, options: RolloutCorrection,
                       cu_seqlens: Tensor | None = None) -> RolloutCorrectionOutput:
    """Importance weights and rejection mask from the trainer's and the rollout engine's log-probs.

    logprobs: float (B, T), or (N,) / (1, N) packed: the trainer's log-probs of the sampled
        tokens (verl's old_log_prob, TRL's old_per_token_logps). Read detached.
    rollout_logprobs: float, logprobs' shape: the engine's log-probs of the same tokens.
    mask: bool or 0/1 numbers, logprobs' shape: the tokens that count.
    options: a RolloutCorrection.
    cu_seqlens: int32/int64 (S+1,) sequence boundaries of a packed batch (docs/packed.md); each
        segment is then a sequence as each row is in a padded batch.

    Computed in float32 (float64 if an input is float64); no host sync on the weights and mask.
    """
    return _output(_compute(logprobs, rollout_logprobs, mask, options, cu_seqlens))


def corrected_in_layout(logprobs: Tensor, rollout_logprobs: Tensor, layout: Layout,
                        options: RolloutCorrection) -> RolloutCorrectionOutput:
    """`rollout_correction` on inputs a caller has checked already, in their Layout (rlops.policy_loss:
    its batch's tensors of the layout's mask shape, padded rows or packed segments): nothing is
    checked or rebuilt again. Each sequence's sums stay this call's (layout.seq_group is not read)."""
    return _output(_compute_on(logprobs, rollout_logprobs, layout._replace(seq_group=None), options))


def _output(state: _State) -> RolloutCorrectionOutput:
    weights = None if state.weights is None else state.weights.float()
    return RolloutCorrectionOutput(weights, state.mask, state)
