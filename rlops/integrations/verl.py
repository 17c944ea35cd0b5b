"""verl drop-ins: functions with verl's names, signatures and return conventions, backed by rlops.

    from rlops.integrations import verl as rlops_verl
    log_prob = rlops_verl.logprobs_from_logits(logits, labels)       # fused kernel, no float32 copies
    advantages, returns = rlops_verl.compute_gae_advantage_return(rewards, values, mask, gamma, lam)
    advantages, returns = rlops_verl.get_adv_estimator_fn("rloo")(token_level_rewards, response_mask, index=uids)

Every advantage estimator of verl 0.9.1's ADV_ESTIMATOR_REGISTRY is here under its verl name and
signature (get_adv_estimator_fn, ADV_ESTIMATORS), computed by rlops.estimators over the whole batch
(no loop over groups or time, no device-to-host read-back; docs/advantages.md). Policy-loss metrics
use verl's masked_mean (+ 1e-8 in the denominator): an all-zero response_mask gives 0, as in verl.

Semantics are verl's (verl 0.9.1: verl/trainer/ppo/core_algos.py, verl/utils/torch_functional.py),
including where they differ from SPEC.md: agg_loss excludes fully masked sequences from every
sequence mean and takes verl's global-batch arguments; a GRPO group of one response gets
advantage R / (1 + epsilon); GSPO's ratio carries gradient through each token's own log-prob.
Two conventions differ from verl's, both at positions verl never reads: GAE's advantages and
returns are 0 where response_mask is 0 (verl leaves running values there).

Packed (remove-padding) batches: with use_remove_padding, verl 0.9.1's FSDP engine
(verl/workers/engine/fsdp/transformer_impl.py, prepare_model_outputs) computes the log-probs and
entropy on the unpadded layout, `logprobs_from_logits(logits_rmpad (total_nnz, V),
input_ids_rmpad_rolled (total_nnz,), inplace_backward)` and `entropy_from_logits(logits_rmpad)`
(or `entropy_from_logits_with_chunking`), sequence boundaries staying in its nested tensors'
offsets; these drop-ins take exactly those shapes (and any (..., V)), row by row. It then pads
back (verl/workers/utils/losses.py: ppo_loss calls no_padding_2_padding) before the policy
losses, agg_loss and kl_penalty, which verl only ever calls on padded (bsz, response_length)
tensors; their drop-ins take that padded layout only.

verl's Megatron path (logits split over the vocabulary across tensor-parallel ranks):
`vocab_parallel_log_probs_from_logits` and `vocab_parallel_entropy`, from
rlops.integrations.megatron.

The biggest win in verl is to compute the whole actor loss from the logits in one call,
`rlops.policy_loss(logits, responses, advantages, mask=response_mask, ...)`; these drop-ins
keep verl's structure for callers who want to swap one function at a time.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from .. import objectives, torch_backend
from ..constants import ROW, SEQ_LOG_RATIO_MAX
from ..ops.token_stats import token_logprobs_and_entropy, token_stats_op
from ..options import PolicyLossConfig
from ..packing import Layout
from .megatron import vocab_parallel_entropy, vocab_parallel_log_probs_from_logits
from .verl_advantages import (
    ADV_ESTIMATORS,
    _config,
    compute_gae_advantage_return,
    compute_gdpo_outcome_advantage,
    compute_gpg_outcome_advantage,
    compute_grpo_outcome_advantage,
    compute_grpo_passk_outcome_advantage,
    compute_grpo_vectorized_outcome_advantage,
    compute_multi_turn_optimal_token_baseline_advantage,
    compute_opo_outcome_advantage,
    compute_optimal_token_baseline_advantage,
    compute_reinforce_plus_plus_baseline_outcome_advantage,
    compute_reinforce_plus_plus_outcome_advantage,
    compute_remax_outcome_advantage,
    compute_rloo_outcome_advantage,
    compute_rloo_vectorized_outcome_advantage,
    get_adv_estimator_fn,
)

CLIP_RATIO_C = 3.0  # verl's default dual-clip bound


def _masked_mean(x: Tensor, mask: Tensor) -> Tensor:
    """verl's `masked_mean` (verl/utils/torch_functional.py), used for its metrics: values outside the
    mask are dropped (NaN there does not spread) and the denominator gets + 1e-8, so an all-zero
    response_mask gives 0, not NaN."""
    return (torch.where(mask.bool(), x, 0.0) * mask).sum() / (mask.sum() + 1e-8)


def logprobs_from_logits(logits: Tensor, labels: Tensor, inplace_backward: bool = True, *,
                         backend: str = "auto") -> Tensor:
    """verl's `logprobs_from_logits`: log softmax(logits) at labels, one fused pass over the vocabulary.

    logits (..., V), labels (...): padded (bsz, seqlen, V) or verl's remove-padding layout,
    logits_rmpad (total_nnz, V) with the rolled input ids (total_nnz,); float32 of labels'
    shape, each row on its own. With inplace_backward (verl's default, as its flash-attn
    path; verl turns it off when it also computes the entropy from the same logits), the
    backward writes the gradient over logits produced by an operation; autograd sees the
    overwrite, so code that still needs those logits fails loudly instead of reading
    gradients. backend: as `rlops.token_logprobs` (the in-place backward needs the
    kernels: "triton", or "auto" on CUDA).
    """
    from ..ops.token_stats import _prepare

    temperature, backend = _prepare(logits, labels, 1.0, backend, "labels")
    inplace = inplace_backward and logits.requires_grad and not logits.is_leaf
    if backend == "torch":
        return torch_backend.token_logprobs(logits, labels).float()
    return token_stats_op(logits, labels, None, None, temperature, inplace, backend)[ROW["logp"]]


def entropy_from_logits(logits: Tensor, *, backend: str = "auto") -> Tensor:
    """verl's `entropy_from_logits`: the entropy of softmax(logits) per row, from the fused kernel.

    logits (..., V): padded (bsz, seqlen, V) or remove-padding (total_nnz, V); float32
    logits.shape[:-1]."""
    tokens = torch.zeros(logits.shape[:-1], dtype=torch.long, device=logits.device)
    return token_logprobs_and_entropy(logits, tokens, backend=backend)[1]


def entropy_from_logits_with_chunking(logits: Tensor, chunk_size: int = 2048, *, backend: str = "auto") -> Tensor:
    """verl's `entropy_from_logits_with_chunking` (its engine's entropy_from_logits_with_chunking
    option): float32 entropy (total_nnz,) of logits_rmpad (total_nnz, V).

    chunk_size is checked and otherwise unused: the fused kernel reads each row once and never
    holds a float32 copy of the logits, which is what verl's chunking bounds.
    """
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1:
        raise ValueError(f"chunk_size must be an int >= 1, got {chunk_size!r}")
    return entropy_from_logits(logits, backend=backend)


def agg_loss(loss_mat: Tensor, loss_mask: Tensor, loss_agg_mode: str, dp_size: int = 1,
             batch_num_tokens: float | None = None, global_batch_size: float | None = None,
             loss_scale_factor: float | None = None) -> Tensor:
    """verl's `agg_loss`: token-mean, token-sum, seq-mean-token-sum(-norm), seq-mean-token-mean.

    Global-batch arguments as verl: batch_num_tokens / global_batch_size are the totals across
    data-parallel ranks, dp_size undoes the gradient averaging; fully masked sequences are
    excluded from the sequence means.
    """
    mask = loss_mask.to(loss_mat.dtype)
    # verl's masked_sum: a value outside the mask (NaN, inf) must not reach the sum, so it is
    # replaced, not multiplied by 0. (verl's sequence modes multiply; here they replace too.)
    loss_mat = torch.where(loss_mask.bool(), loss_mat, 0.0)
    if loss_agg_mode == "token-mean":
        if batch_num_tokens is None:
            if dp_size > 1:
                raise ValueError("(global) batch_num_tokens is required when dp_size > 1")
            batch_num_tokens = mask.sum()
        return (loss_mat * mask).sum() / batch_num_tokens * dp_size
    if loss_agg_mode == "token-sum":
        return (loss_mat * mask).sum() * dp_size
    if loss_agg_mode not in ("seq-mean-token-sum", "seq-mean-token-sum-norm", "seq-mean-token-mean"):
        raise ValueError(f"Invalid loss_agg_mode: {loss_agg_mode}")
    counts = mask.sum(-1)
    if loss_agg_mode == "seq-mean-token-mean":
        seq_losses = (loss_mat * mask).sum(-1) / (counts + 1e-8)
    else:
        seq_losses = (loss_mat * mask).sum(-1)
    seq_mask = (counts > 0).to(loss_mat.dtype)
    if global_batch_size is None:
        if dp_size > 1:
            raise ValueError("global_batch_size is required when dp_size > 1")
        global_batch_size = seq_mask.sum()
    loss = (seq_losses * seq_mask).sum() / global_batch_size * dp_size
    if loss_agg_mode == "seq-mean-token-sum-norm":
        loss = loss / (loss_mask.shape[-1] if loss_scale_factor is None else loss_scale_factor)
    return loss


# verl's names of the sampled-token estimators, as rlops' kl_estimator names them.
_KL_NAMES = {"kl": "k1", "k1": "k1", "mse": "k2", "k2": "k2", "low_var_kl": "k3", "k3": "k3", "abs": "abs"}


def kl_penalty(logprob: Tensor, ref_logprob: Tensor, kl_penalty: str) -> Tensor:
    """verl's `kl_penalty`: k1 ("kl"), k2 ("mse"), k3 ("low_var_kl"), abs, and their "+" forms (the
    value of the estimator with the gradient of k2, an unbiased KL gradient)."""
    base = kl_penalty.removesuffix("+")
    if base not in _KL_NAMES:
        raise ValueError(f"kl_penalty {kl_penalty!r} is not covered by rlops (k1/kl, k2/mse, k3/low_var_kl, abs "
                         "and their '+' forms are)")
    return torch_backend.kl_penalty(logprob, ref_logprob, _KL_NAMES[base] + kl_penalty[len(base):])


def _clip_ratios(config: Any) -> tuple[float, float]:
    clip_ratio = _config(config, "clip_ratio", 0.2)
    low, high = _config(config, "clip_ratio_low"), _config(config, "clip_ratio_high")
    return (clip_ratio if low is None else low), (clip_ratio if high is None else high)


def _metrics(clipfrac: Tensor, ppo_kl: Tensor, clipfrac_lower: Tensor) -> dict[str, float]:
    return {"actor/pg_clipfrac": clipfrac.detach().item(), "actor/ppo_kl": ppo_kl.detach().item(),
            "actor/pg_clipfrac_lower": clipfrac_lower.detach().item()}


def _dual_clip(old_log_prob: Tensor, log_prob: Tensor, advantages: Tensor, response_mask: Tensor, low: float,
               high: float, clip_ratio_c: float, rollout_is_weights: Tensor | None
               ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Per-token dual-clip PPO losses and verl's (pg_clipfrac, ppo_kl, pg_clipfrac_lower)."""
    if not clip_ratio_c > 1.0:
        raise ValueError(f"clip_ratio_c (dual clip) must be > 1, got {clip_ratio_c}")
    mask = response_mask.to(log_prob.dtype)
    log_r = torch_backend.log_ratio(log_prob, old_log_prob, Layout.of(response_mask.bool()))
    pg, ratio, clipped_low, clipped_high = objectives.clipped_surrogate(log_r, advantages, low, high, clip_ratio_c,
                                                                       rollout_is_weights)
    undual = torch.maximum(-advantages * ratio, -advantages * ratio.clamp(1 - low, 1 + high))
    clipfrac_lower = _masked_mean(((undual > -advantages * clip_ratio_c) & (advantages < 0)).to(mask.dtype), mask)
    clipfrac = _masked_mean((clipped_low | clipped_high).to(mask.dtype), mask)
    return pg, clipfrac, _masked_mean(-log_r.detach(), mask), clipfrac_lower


def compute_policy_loss_vanilla(old_log_prob: Tensor, log_prob: Tensor, advantages: Tensor, response_mask: Tensor,
                                loss_agg_mode: str = "token-mean", config: Any = None,
                                rollout_is_weights: Tensor | None = None) -> tuple[Tensor, dict[str, float]]:
    """verl's PPO policy loss with dual clip (clip_ratio_c): returns (pg_loss, metrics).

    config: verl's ActorConfig, or anything with clip_ratio, clip_ratio_low/high, clip_ratio_c
    and global_batch_info (the agg_loss keywords).
    """
    low, high = _clip_ratios(config)
    pg, clipfrac, ppo_kl, clipfrac_lower = _dual_clip(old_log_prob, log_prob, advantages, response_mask, low, high,
                                                      _config(config, "clip_ratio_c", CLIP_RATIO_C),
                                                      rollout_is_weights)
    loss = agg_loss(pg, response_mask, loss_agg_mode, **(_config(config, "global_batch_info") or {}))
    return loss, _metrics(clipfrac, ppo_kl, clipfrac_lower)


def compute_policy_loss(old_log_prob: Tensor, log_prob: Tensor, advantages: Tensor, response_mask: Tensor,
                        cliprange: float | None = None, cliprange_low: float | None = None,
                        cliprange_high: float | None = None, clip_ratio_c: float = CLIP_RATIO_C,
                        loss_agg_mode: str = "token-mean") -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """verl's older `compute_policy_loss` (dual-clip PPO with explicit clip ranges): returns the
    tensors (pg_loss, pg_clipfrac, ppo_kl, pg_clipfrac_lower)."""
    low = cliprange if cliprange_low is None else cliprange_low
    high = cliprange if cliprange_high is None else cliprange_high
    if low is None or high is None:
        raise ValueError("cliprange (or both cliprange_low and cliprange_high) is required")
    pg, clipfrac, ppo_kl, clipfrac_lower = _dual_clip(old_log_prob, log_prob, advantages, response_mask, low, high,
                                                      clip_ratio_c, None)
    return agg_loss(pg, response_mask, loss_agg_mode), clipfrac, ppo_kl, clipfrac_lower


def compute_policy_loss_gspo(old_log_prob: Tensor, log_prob: Tensor, advantages: Tensor, response_mask: Tensor,
                             loss_agg_mode: str = "seq-mean-token-mean", config: Any = None,
                             rollout_is_weights: Tensor | None = None) -> tuple[Tensor, dict[str, float]]:
    """verl's GSPO policy loss: the sequence ratio's value, each token's gradient through its own
    log-prob (s_i,t = sg[s_i] * pi / sg[pi]), clipped and aggregated by loss_agg_mode."""
    low, high = _clip_ratios(config)
    mask = response_mask.to(log_prob.dtype)
    diff = log_prob - old_log_prob
    seq = (diff * mask).sum(-1) / mask.sum(-1).clamp(min=1)
    log_r = torch.clamp(log_prob - log_prob.detach() + seq.detach().unsqueeze(-1), max=SEQ_LOG_RATIO_MAX)
    pg, _, clipped_low, clipped_high = objectives.clipped_surrogate(log_r, advantages, low, high, None,
                                                                   rollout_is_weights)
    loss = agg_loss(pg, response_mask, loss_agg_mode, **(_config(config, "global_batch_info") or {}))
    clipfrac = _masked_mean((clipped_low | clipped_high).to(mask.dtype), mask)
    return loss, _metrics(clipfrac, _masked_mean(-diff.detach(), mask), torch.zeros((), device=loss.device))


def _objective_loss(old_log_prob: Tensor, log_prob: Tensor, advantages: Tensor, response_mask: Tensor,
                    options: PolicyLossConfig, rollout_is_weights: Tensor | None) -> tuple[Tensor, Tensor, Tensor]:
    """Per-token losses of a non-clip objective (docs/objectives.md), its ratio and verl's ppo_kl."""
    log_r = torch_backend.log_ratio(log_prob, old_log_prob, Layout.of(response_mask.bool()))
    pg, ratio = objectives.surrogate(log_r, log_prob, old_log_prob, advantages, options, rollout_is_weights)
    return pg, ratio, _masked_mean(-log_r.detach(), response_mask.to(log_prob.dtype))


def compute_policy_loss_cispo(old_log_prob: Tensor, log_prob: Tensor, advantages: Tensor, response_mask: Tensor,
                              loss_agg_mode: str = "token-mean", config: Any = None,
                              rollout_is_weights: Tensor | None = None) -> tuple[Tensor, dict[str, float]]:
    """verl's CISPO loss (MiniMax-M1): -sg(clamp(r, 1 - clip_ratio_low, 1 + clip_ratio_high)) * A * log_prob."""
    low, high = _clip_ratios(config)
    pg, ratio, ppo_kl = _objective_loss(old_log_prob, log_prob, advantages, response_mask,
                                        PolicyLossConfig(objective="cispo", clip_low=low, clip_high=high),
                                        rollout_is_weights)
    loss = agg_loss(pg, response_mask, loss_agg_mode, **(_config(config, "global_batch_info") or {}))
    clipped = (ratio != ratio.clamp(1 - low, 1 + high)).to(log_prob.dtype)
    return loss, _metrics(_masked_mean(clipped, response_mask.to(log_prob.dtype)), ppo_kl,
                          torch.zeros((), device=loss.device))


def compute_policy_loss_sapo(old_log_prob: Tensor, log_prob: Tensor, advantages: Tensor, response_mask: Tensor,
                             loss_agg_mode: str = "seq-mean-token-mean", config: Any = None,
                             rollout_is_weights: Tensor | None = None) -> tuple[Tensor, dict[str, float]]:
    """verl's SAPO loss: -A * 4/tau * sigmoid(tau (r - 1)), tau = config.tau_pos where A > 0, else
    tau_neg; aggregated by seq-mean-token-mean whatever loss_agg_mode says, as verl does."""
    options = PolicyLossConfig(objective="sapo", sapo_tau_pos=float(_config(config, "tau_pos", 1.0)),
                               sapo_tau_neg=float(_config(config, "tau_neg", 1.05)))
    pg, _, ppo_kl = _objective_loss(old_log_prob, log_prob, advantages, response_mask, options, rollout_is_weights)
    loss = agg_loss(pg, response_mask, "seq-mean-token-mean", **(_config(config, "global_batch_info") or {}))
    zero = torch.zeros((), device=loss.device)
    return loss, _metrics(zero, ppo_kl, zero)


# The rest of verl's registry; imported here, at the end, because that module takes agg_loss and
# the helpers above from this one (at call time).
from .verl_policy_losses import (  # noqa: E402
    compute_policy_loss_bypass_mode,
    compute_policy_loss_clip_cov,
    compute_policy_loss_dppo_kl,
    compute_policy_loss_dppo_tv,
    compute_policy_loss_dro,
    compute_policy_loss_geo_mean,
    compute_policy_loss_gpg,
    compute_policy_loss_kl_cov,
    compute_policy_loss_reinforce,
)

POLICY_LOSSES: dict[str, Callable[..., tuple[Tensor, dict[str, float]]]] = {
    "vanilla": compute_policy_loss_vanilla,
    "dppo_tv": compute_policy_loss_dppo_tv,
    "dppo_kl": compute_policy_loss_dppo_kl,
    "gspo": compute_policy_loss_gspo,
    "sapo": compute_policy_loss_sapo,
    "gpg": compute_policy_loss_gpg,
    "clip_cov": compute_policy_loss_clip_cov,
    "kl_cov": compute_policy_loss_kl_cov,
    "geo_mean": compute_policy_loss_geo_mean,
    "dro": compute_policy_loss_dro,
    "cispo": compute_policy_loss_cispo,
    "bypass_mode": compute_policy_loss_bypass_mode,
}


def get_policy_loss_fn(name: str) -> Callable[..., tuple[Tensor, dict[str, float]]]:
    """verl's `get_policy_loss_fn`: every loss of verl 0.9.1's POLICY_LOSS_REGISTRY (vanilla, dppo_tv,
    dppo_kl, gspo, sapo, gpg, clip_cov, kl_cov, geo_mean, dro, cispo, bypass_mode) by its name."""
    if name not in POLICY_LOSSES:
        raise ValueError(f"policy loss {name!r} is not covered by rlops; covered: {', '.join(POLICY_LOSSES)}")
    return POLICY_LOSSES[name]


__all__ = [
    "ADV_ESTIMATORS",
    "agg_loss",
    "compute_gae_advantage_return",
    "compute_gdpo_outcome_advantage",
    "compute_gpg_outcome_advantage",
    "compute_grpo_outcome_advantage",
    "compute_grpo_passk_outcome_advantage",
    "compute_grpo_vectorized_outcome_advantage",
    "compute_multi_turn_optimal_token_baseline_advantage",
    "compute_opo_outcome_advantage",
    "compute_optimal_token_baseline_advantage",
    "compute_policy_loss",
    "compute_policy_loss_bypass_mode",
    "compute_policy_loss_cispo",
    "compute_policy_loss_clip_cov",
    "compute_policy_loss_dppo_kl",
    "compute_policy_loss_dppo_tv",
    "compute_policy_loss_dro",
    "compute_policy_loss_geo_mean",
    "compute_policy_loss_gpg",
    "compute_policy_loss_gspo",
    "compute_policy_loss_kl_cov",
    "compute_policy_loss_reinforce",
    "compute_policy_loss_sapo",
    "compute_policy_loss_vanilla",
    "compute_reinforce_plus_plus_baseline_outcome_advantage",
    "compute_reinforce_plus_plus_outcome_advantage",
    "compute_remax_outcome_advantage",
    "compute_rloo_outcome_advantage",
    "compute_rloo_vectorized_outcome_advantage",
    "entropy_from_logits",
    "entropy_from_logits_with_chunking",
    "get_adv_estimator_fn",
    "get_policy_loss_fn",
    "kl_penalty",
    "logprobs_from_logits",
    "vocab_parallel_entropy",
    "vocab_parallel_log_probs_from_logits",
]
