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

from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import Tensor

from .. import estimators, torch_backend
from .._validation import check_mask
from ..advantages import gae, masked_whiten
from ..constants import ROW, SEQ_LOG_RATIO_MAX
from ..ops.token_stats import token_logprobs_and_entropy, token_stats_op
from ..packing import Layout
from .megatron import vocab_parallel_entropy, vocab_parallel_log_probs_from_logits

CLIP_RATIO_C = 3.0  # verl's default dual-clip bound


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


_KL_NAMES = {"kl": "k1", "k1": "k1", "mse": "k2", "k2": "k2", "low_var_kl": "k3", "k3": "k3"}


def kl_penalty(logprob: Tensor, ref_logprob: Tensor, kl_penalty: str) -> Tensor:
    """verl's `kl_penalty`: k1 ("kl"), k2 ("mse"), k3 ("low_var_kl"), and their "+" forms (the
    value of the estimator with the gradient of k2, an unbiased KL gradient)."""
    base = kl_penalty[:-1] if kl_penalty.endswith("+") else kl_penalty
    if base not in _KL_NAMES:
        raise ValueError(f"kl_penalty {kl_penalty!r} is not covered by rlops (k1/kl, k2/mse, k3/low_var_kl and "
                         "their '+' forms are)")
    value = torch_backend.kl_penalty(logprob, ref_logprob, _KL_NAMES[base])
    if not kl_penalty.endswith("+") or base in ("mse", "k2"):
        return value
    backward = 0.5 * (logprob - ref_logprob).square()
    return backward - backward.detach() + value.detach()


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
    pg, ratio, clipped_low, clipped_high = torch_backend.clipped_surrogate(log_r, advantages, low, high, clip_ratio_c,
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
    pg, _, clipped_low, clipped_high = torch_backend.clipped_surrogate(log_r, advantages, low, high, None,
                                                                   rollout_is_weights)
    loss = agg_loss(pg, response_mask, loss_agg_mode, **(_config(config, "global_batch_info") or {}))
    clipfrac = _masked_mean((clipped_low | clipped_high).to(mask.dtype), mask)
    return loss, _metrics(clipfrac, _masked_mean(-diff.detach(), mask), torch.zeros((), device=loss.device))


POLICY_LOSSES: dict[str, Callable[..., tuple[Tensor, dict[str, float]]]] = {
    "vanilla": compute_policy_loss_vanilla,
    "gspo": compute_policy_loss_gspo,
}


def get_policy_loss_fn(name: str) -> Callable[..., tuple[Tensor, dict[str, float]]]:
    """verl's `get_policy_loss_fn` for the losses rlops covers ("vanilla", "gspo")."""
    if name not in POLICY_LOSSES:
        raise ValueError(f"policy loss {name!r} is not covered by rlops; covered: {', '.join(POLICY_LOSSES)}")
    return POLICY_LOSSES[name]


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
    return _otb(token_level_rewards, response_mask, index, old_log_probs, sum_pi_squared, rollout_is_weights,
                handle_zero_tail, epsilon, multi_turn=False)


def compute_multi_turn_optimal_token_baseline_advantage(token_level_rewards: Tensor, response_mask: Tensor,
                                                        index: Any, old_log_probs: Tensor, sum_pi_squared: Tensor,
                                                        rollout_is_weights: Tensor | None = None,
                                                        handle_zero_tail: bool = True, epsilon: float = 1e-8,
                                                        **kwargs: Any) -> tuple[Tensor, Tensor]:
    """verl's `compute_multi_turn_optimal_token_baseline_advantage` ("tir_optimal_token_baseline"): as
    "optimal_token_baseline" with each response's tokens compacted left (the step is the rank among its
    valid tokens, so observation spans do not misalign the group), responses with no token left out."""
    return _otb(token_level_rewards, response_mask, index, old_log_probs, sum_pi_squared, rollout_is_weights,
                handle_zero_tail, epsilon, multi_turn=True)


def _otb(token_level_rewards: Tensor, response_mask: Tensor, index: Any, old_log_probs: Tensor,
         sum_pi_squared: Tensor, rollout_is_weights: Tensor | None, handle_zero_tail: bool, epsilon: float,
         multi_turn: bool) -> tuple[Tensor, Tensor]:
    if not isinstance(token_level_rewards, Tensor) or token_level_rewards.dim() != 2:
        raise ValueError("token_level_rewards must be a (bs, response_length) tensor")
    ids = _group_ids(index, token_level_rewards.shape[0], token_level_rewards.device)
    with torch.no_grad():
        adv, returns = estimators.optimal_token_baseline_advantages(
            token_level_rewards, response_mask, old_log_probs, sum_pi_squared, group_ids=ids,
            is_weights=rollout_is_weights, handle_zero_tail=handle_zero_tail, eps=epsilon, multi_turn=multi_turn,
            singleton="score")
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
    "compute_policy_loss_gspo",
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
