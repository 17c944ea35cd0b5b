"""Drop-ins for verl 0.9.1's rollout correction (verl/trainer/ppo/rollout_corr_helper.py).

Same arguments, return structure and metric names as verl's `compute_rollout_correction_weights`,
`compute_rollout_rejection_mask` and `compute_rollout_correction_and_rejection_mask`, computed
by `rlops.rollout_correction` (docs/rollout_correction.md). Differences that do not reach the
loss: weights and masks are 0 off the response mask even where verl's would be NaN (a NaN
log-ratio on a padding token), masked means divide by the token count where verl adds 1e-8 to
it (a relative difference <= 1e-8), and batch normalisation uses this rank's batch only (verl
all-reduces the mean when torch.distributed is initialised).
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass

import torch
from torch import Tensor

from .._rollout_metrics import _is_metrics, _offpolicy_metrics, _rs_metrics, _to_floats, _verl_metrics
from ..rollout_correction import RolloutCorrection, _compute

_NO_TOKEN = "response_mask must contain at least one valid token (1)."


@dataclass
class RolloutISWeights:
    """Stands in for verl's DataProto when verl.protocol cannot be imported: `.batch["rollout_is_weights"]`."""

    batch: dict[str, Tensor]


def _weights_proto(weights: Tensor) -> object:
    # verl.protocol needs tensordict (and ray); without them the weights travel in a plain holder.
    if all(importlib.util.find_spec(name) is not None for name in ("verl", "tensordict")):
        try:
            from verl.protocol import DataProto
        except ImportError:
            pass
        else:
            return DataProto.from_dict(tensors={"rollout_is_weights": weights})
    return RolloutISWeights({"rollout_is_weights": weights})


def _unprefixed(metrics: dict[str, float]) -> dict[str, float]:
    return {k.removeprefix("rollout_corr/"): v for k, v in metrics.items()}


def compute_rollout_correction_weights(log_ratio: Tensor, response_mask: Tensor, rollout_is: str = "token",
                                       rollout_is_threshold: str | float = 2.0,
                                       rollout_is_batch_normalize: bool = False) -> tuple[Tensor, dict[str, float]]:
    """verl's truncated (TIS, a number) or masked (IcePop, "lower_upper") IS weights (B, T) in
    log_ratio's dtype, 0 on padding, and verl's rollout_is_* metrics (unprefixed).

    log_ratio: (B, T) old_log_prob - rollout_log_prob. response_mask: (B, T) 0/1.
    """
    if rollout_is not in ("token", "sequence"):
        raise ValueError(f"Invalid rollout_is: {rollout_is}. Must be one of {{'token', 'sequence'}}.")
    options = RolloutCorrection.from_verl(rollout_is, rollout_is_threshold, rollout_is_batch_normalize)
    state = _compute(log_ratio, torch.zeros_like(log_ratio), response_mask, options)
    if not bool(state.layout.mask.any()):
        raise ValueError(_NO_TOKEN)
    return state.weights.to(log_ratio.dtype), _unprefixed(_to_floats(_verl_metrics(state, (_is_metrics,))))


def compute_rollout_rejection_mask(log_ratio: Tensor, response_mask: Tensor, rollout_rs: str = "token_k1",
                                   rollout_rs_threshold: str | float | None = None) -> tuple[Tensor, dict[str, float]]:
    """verl's rejection: the response mask (its dtype) with the tokens / sequences that fail any of
    the comma separated rollout_rs criteria zeroed, and verl's rollout_rs_* metrics (unprefixed)."""
    options = RolloutCorrection.from_verl(rollout_rs=rollout_rs, rollout_rs_threshold=rollout_rs_threshold)
    if log_ratio.shape[0] == 0:  # verl returns an empty batch unchanged, without metrics
        return response_mask, {}
    state = _compute(log_ratio, torch.zeros_like(log_ratio), response_mask, options)
    if not bool(state.layout.mask.any()):
        raise ValueError(_NO_TOKEN)
    metrics = _unprefixed(_to_floats(_verl_metrics(state, (_rs_metrics,))))
    return state.mask.to(response_mask.dtype), metrics


def compute_rollout_correction_and_rejection_mask(
    old_log_prob: Tensor, rollout_log_prob: Tensor, response_mask: Tensor, rollout_is: str | None = None,
    rollout_is_threshold: str | float | None = 2.0, rollout_is_batch_normalize: bool = False,
    rollout_rs: str | None = None, rollout_rs_threshold: str | float | None = None,
) -> tuple[object | None, Tensor, dict[str, float]]:
    """verl's unified entry: (weights or None, modified response mask, metrics under "rollout_corr/").

    The weights come as verl.protocol.DataProto (key "rollout_is_weights") when verl and
    tensordict are importable, else as a `RolloutISWeights` with the same `.batch[...]` access.
    """
    if not bool(response_mask.any()):
        raise ValueError(_NO_TOKEN)
    for name, other in (("rollout_log_prob", rollout_log_prob), ("response_mask", response_mask)):
        if other.shape != old_log_prob.shape:
            raise ValueError(f"{name} shape {tuple(other.shape)} does not match old_log_prob shape "
                             f"{tuple(old_log_prob.shape)}.")
    if rollout_is is not None and rollout_is not in ("token", "sequence"):
        raise ValueError(f"Invalid rollout_is: {rollout_is}. Must be one of {{'token', 'sequence'}}.")
    if rollout_rs is not None and rollout_rs_threshold is None:
        raise ValueError("rollout_rs_threshold must be explicitly provided when rollout_rs is enabled.")
    options = RolloutCorrection.from_verl(rollout_is, rollout_is_threshold, rollout_is_batch_normalize,
                                          rollout_rs, rollout_rs_threshold)
    state = _compute(old_log_prob, rollout_log_prob, response_mask, options)
    parts = ((_is_metrics,) if state.weights is not None else ()) + ((_rs_metrics,) if rollout_rs else ())
    metrics = _to_floats(_verl_metrics(state, (*parts, _offpolicy_metrics)))
    weights = None if state.weights is None else _weights_proto(state.weights.to(old_log_prob.dtype))
    return weights, state.mask.to(response_mask.dtype), metrics
