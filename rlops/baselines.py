"""Eager PyTorch code as the frameworks write it: the yardstick for tests and benchmarks.

These restate, in plain PyTorch and without the frameworks' own fused fast paths, what TRL
and verl compute: token log-probs and entropy, and the GRPO / PPO actor losses. They are
what rlops replaces, so the benchmarks time them; the drop-in tests show rlops equals them;
and the bf16 tolerance of SPEC.md section 6 ("no more than 2x the error of PyTorch eager on
the same low-precision input") is measured against them.

Sources:
- TRL v1.16.0, trl/trainer/utils.py: `selective_log_softmax` (eager branch: gather minus a
  per-row logsumexp for float32/float64, per-row log_softmax for half types) and
  `entropy_from_logits` (log_softmax over chunks of 128 rows, -sum(exp(logp) * logp)).
- verl, verl/utils/torch_functional.py: `logprobs_from_logits_v2` (same algorithm as TRL's)
  and `entropy_from_logits` (logsumexp(logits) - sum(softmax(logits) * logits)).
- TRL v1.16.0, trl/trainer/grpo_trainer.py: `GRPOTrainer._compute_loss` (`trl_grpo_loss`).
- verl @ 26b5d6b2, verl/trainer/ppo/core_algos.py: `compute_policy_loss_vanilla`, `agg_loss`,
  `kl_penalty_forward` (`verl_actor_loss`).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import Tensor

from .torch_backend import TokenStats

if TYPE_CHECKING:
    from .ops.policy_loss import PolicyLossOutput


def trl_selective_log_softmax(logits: Tensor, index: Tensor) -> Tensor:
    """TRL's eager log-prob of `index` under softmax(logits); logits (B, T, V), index (B, T)."""
    if logits.dtype in (torch.float32, torch.float64):
        picked = logits.gather(-1, index.unsqueeze(-1)).squeeze(-1)
        lse = torch.stack([torch.logsumexp(row, dim=-1) for row in logits])
        return picked - lse
    rows = [F.log_softmax(row, dim=-1).gather(-1, idx.unsqueeze(-1)).squeeze(-1)
            for row, idx in zip(logits, index, strict=True)]
    return torch.stack(rows)


def trl_entropy_from_logits(logits: Tensor, chunk_size: int = 128) -> Tensor:
    """TRL's eager entropy of softmax(logits) per row, in logits' dtype; logits (..., V)."""
    flat = logits.reshape(-1, logits.shape[-1])
    parts = []
    for chunk in flat.split(chunk_size, dim=0):
        logp = F.log_softmax(chunk, dim=-1)
        parts.append(-(logp.exp() * logp).sum(-1))
    return torch.cat(parts).reshape(logits.shape[:-1])


def verl_logprobs_from_logits(logits: Tensor, labels: Tensor) -> Tensor:
    """verl's eager log-probs (`logprobs_from_logits_v2`): the same algorithm as TRL's."""
    return trl_selective_log_softmax(logits, labels)


def verl_entropy_from_logits(logits: Tensor) -> Tensor:
    """verl's eager entropy: logsumexp(logits) - sum(softmax(logits) * logits)."""
    probs = F.softmax(logits, dim=-1)
    return torch.logsumexp(logits, dim=-1) - (probs * logits).sum(-1)


def eager_token_stats(logits: Tensor, tokens: Tensor, temperature: float = 1.0,
                      style: str = "trl") -> tuple[Tensor, Tensor]:
    """(logp, entropy) as a trainer computes them: divide by the temperature, then the two calls."""
    if temperature != 1.0:
        logits = logits / temperature
    if style == "trl":
        return trl_selective_log_softmax(logits, tokens), trl_entropy_from_logits(logits)
    if style == "verl":
        return verl_logprobs_from_logits(logits, tokens), verl_entropy_from_logits(logits)
    raise ValueError(f"style must be 'trl' or 'verl', got {style!r}")


def _eager_stats(logits: Tensor, tokens: Tensor, temperature: float, ref_logits: Tensor | None) -> TokenStats:
    """Token statistics as eager code computes them: in the logits' own dtype."""
    logp, entropy = eager_token_stats(logits, tokens, temperature)
    if ref_logits is None:
        return TokenStats(logp, entropy, None)
    logp_all = F.log_softmax(logits / temperature, dim=-1)
    logq_all = F.log_softmax(ref_logits / temperature, dim=-1)
    return TokenStats(logp, entropy, (logp_all.exp() * (logp_all - logq_all)).sum(-1))


def eager_policy_loss(logits: Tensor, tokens: Tensor, advantages: Tensor, **options: object) -> Tensor:
    """The SPEC policy loss (tensors and options as rlops.policy_loss) with eager low-precision token statistics.

    This is the yardstick of SPEC section 6 for half-precision logits: the vocabulary work in
    the logits' dtype, as TRL and verl do it, then the O(B*T) loss in float32.
    """
    return eager_policy_loss_output(logits, tokens, advantages, **options).loss


def eager_policy_loss_output(logits: Tensor, tokens: Tensor, advantages: Tensor, *, ref_logits: Tensor | None = None,
                             **tensors_and_options: object) -> PolicyLossOutput:
    """`eager_policy_loss` with rlops.policy_loss's outputs (per-token values, metrics): the eager
    baseline a trainer can run in place of the fused loss (rlops.trainers' loss_impl="eager").
    Keywords: rlops.policy_loss's tensors (mask, old_logprobs, ref_logprobs, is_weights) and options."""
    from . import torch_backend
    from .ops.policy_batch import check_batch, check_kl_inputs, check_packed_options
    from .ops.policy_loss import PolicyLossOutput
    from .options import PolicyBatch, PolicyLossConfig, TokenInputs

    tensors = {name: tensors_and_options.pop(name, None)
               for name in ("mask", "old_logprobs", "ref_logprobs", "is_weights", "cu_seqlens")}
    config = PolicyLossConfig(**tensors_and_options)
    shape = tokens.shape
    logits, ref_logits, batch, layout = check_batch(logits, ref_logits, PolicyBatch(tokens, advantages, **tensors))
    check_kl_inputs(config, batch.ref_logprobs, ref_logits is not None, "ref_logits")
    check_packed_options(config, layout)
    tokens = torch.where(batch.mask, batch.tokens, 0)  # eager code reads every row: no padding ids there
    stats = _eager_stats(logits, tokens, config.temperature, ref_logits if config.kl_used == "full" else None)
    inputs = TokenInputs.of(batch, layout, config)
    return PolicyLossOutput.of(torch_backend.policy_loss(stats, layout, inputs, config), batch, config, layout, shape)


def trl_grpo_loss(
    logits: Tensor,
    completion_ids: Tensor,
    advantages: Tensor,
    completion_mask: Tensor,
    *,
    old_per_token_logps: Tensor | None = None,
    ref_per_token_logps: Tensor | None = None,
    loss_type: str = "dapo",
    epsilon_low: float = 0.2,
    epsilon_high: float = 0.2,
    beta: float = 0.0,
    temperature: float = 1.0,
    max_completion_length: int | None = None,
    entropy_coef: float = 0.0,
    importance_sampling_ratio: Tensor | None = None,
) -> Tensor:
    """TRL's GRPO loss for loss_type grpo, bnpo, dr_grpo and dapo, in eager PyTorch.

    Restates TRL v1.16.0 trl/trainer/grpo_trainer.py, GRPOTrainer._compute_loss, for
    token-level importance sampling on one process with one accumulation window (then dapo's
    num_items_in_batch is the mask's sum), without the off-policy or top-entropy masks: the
    ratio exp(logp - old) is clipped to [1 - epsilon_low, 1 + epsilon_high], multiplied by
    vLLM's importance_sampling_ratio, plus beta times k3 (unclamped), aggregated per
    loss_type; the entropy bonus is a token mean over the mask.
    """
    logp, entropy = eager_token_stats(logits, completion_ids, temperature)
    adv = advantages.unsqueeze(1) if advantages.dim() == 1 else advantages
    old = logp.detach() if old_per_token_logps is None else old_per_token_logps
    coef_1 = torch.exp(logp - old)
    coef_2 = torch.clamp(coef_1, 1 - epsilon_low, 1 + epsilon_high)
    per_token = -torch.min(coef_1 * adv, coef_2 * adv)
    if importance_sampling_ratio is not None:
        per_token = per_token * importance_sampling_ratio
    if beta != 0.0:
        d = ref_per_token_logps - logp
        per_token = per_token + beta * (torch.exp(d) - d - 1)
    mask = completion_mask.to(per_token.dtype)
    if loss_type == "grpo":
        loss = ((per_token * mask).sum(-1) / mask.sum(-1).clamp(min=1.0)).mean()
    elif loss_type in ("bnpo", "dapo"):
        loss = (per_token * mask).sum() / mask.sum().clamp(min=1.0)
    elif loss_type == "dr_grpo":
        length = mask.shape[-1] if max_completion_length is None else max_completion_length
        loss = (per_token * mask).sum() / (per_token.size(0) * length)
    else:
        raise ValueError(f"loss_type {loss_type!r} is not restated here")
    if entropy_coef:
        loss = loss - entropy_coef * (entropy * mask).sum() / mask.sum().clamp(min=1.0)
    return loss


def _verl_agg_loss(loss_mat: Tensor, loss_mask: Tensor, loss_agg_mode: str) -> Tensor:
    mask = loss_mask.to(loss_mat.dtype)
    if loss_agg_mode == "token-mean":
        return (loss_mat * mask).sum() / mask.sum()
    seq_valid = (mask.sum(-1) > 0).to(loss_mat.dtype)
    if loss_agg_mode == "seq-mean-token-mean":
        seq = (loss_mat * mask).sum(-1) / (mask.sum(-1) + 1e-8)
        return (seq * seq_valid).sum() / seq_valid.sum()
    seq = (loss_mat * mask).sum(-1)
    loss = (seq * seq_valid).sum() / seq_valid.sum()
    if loss_agg_mode == "seq-mean-token-sum-norm":
        loss = loss / mask.shape[-1]
    return loss


def verl_kl_penalty(logprob: Tensor, ref_logprob: Tensor, kl_penalty: str) -> Tensor:
    """verl's kl_penalty_forward for k1 ("kl"), k2 ("mse") and k3 ("low_var_kl")."""
    if kl_penalty in ("kl", "k1"):
        return logprob - ref_logprob
    if kl_penalty in ("mse", "k2"):
        return 0.5 * (logprob - ref_logprob).square()
    if kl_penalty in ("low_var_kl", "k3"):
        d = torch.clamp(ref_logprob - logprob, -20, 20)
        return torch.clamp(torch.exp(d) - d - 1, min=-10, max=10)
    raise ValueError(f"kl_penalty {kl_penalty!r} is not restated here")


def verl_actor_loss(
    logits: Tensor,
    responses: Tensor,
    advantages: Tensor,
    response_mask: Tensor,
    *,
    old_log_prob: Tensor | None = None,
    ref_log_prob: Tensor | None = None,
    loss_agg_mode: str = "token-mean",
    clip_ratio_low: float = 0.2,
    clip_ratio_high: float = 0.2,
    clip_ratio_c: float = 3.0,
    entropy_coeff: float = 0.0,
    kl_loss_coef: float = 0.0,
    kl_loss_type: str = "low_var_kl",
    temperature: float = 1.0,
    rollout_is_weights: Tensor | None = None,
) -> Tensor:
    """verl's actor loss with the vanilla policy loss, in eager PyTorch.

    Restates verl (volcengine/verl @ 26b5d6b2) verl/trainer/ppo/core_algos.py:
    compute_policy_loss_vanilla (ratio from the log-ratio clamped to +-20, clip to
    [1 - low, 1 + high], dual clip at clip_ratio_c for negative advantages, rollout IS
    weights), agg_loss (fully masked sequences excluded from sequence means, on one data
    parallel rank) and kl_penalty_forward; composed as verl's dp_actor does:
    pg_loss - entropy_coeff * agg(entropy) + kl_loss_coef * agg(kl).
    """
    logp, entropy = eager_token_stats(logits, responses, temperature, style="verl")
    old = logp.detach() if old_log_prob is None else old_log_prob
    ratio = torch.exp(torch.clamp(logp - old, -20.0, 20.0))
    pg_1 = -advantages * ratio
    pg_2 = -advantages * torch.clamp(ratio, 1 - clip_ratio_low, 1 + clip_ratio_high)
    clipped = torch.maximum(pg_1, pg_2)
    pg = torch.where(advantages < 0, torch.min(-advantages * clip_ratio_c, clipped), clipped)
    if rollout_is_weights is not None:
        pg = pg * rollout_is_weights
    loss = _verl_agg_loss(pg, response_mask, loss_agg_mode)
    if entropy_coeff:
        loss = loss - entropy_coeff * _verl_agg_loss(entropy, response_mask, loss_agg_mode)
    if kl_loss_coef:
        kl = verl_kl_penalty(logp, ref_log_prob, kl_loss_type)
        loss = loss + kl_loss_coef * _verl_agg_loss(kl, response_mask, loss_agg_mode)
    return loss


def verl_gae_loop(token_level_rewards: Tensor, values: Tensor, response_mask: Tensor, gamma: float, lam: float,
                  bootstrap: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """verl's GAE loop (volcengine/verl @ 012be9d9, verl/trainer/ppo/core_algos.py,
    compute_gae_advantage_return), without its final whitening: one step per time position,
    masked positions carrying the running values through by arithmetic masking.

    `bootstrap` (B,) is SPEC.md's one addition: the running next value starts there instead
    of at 0. Returns (advantages, returns), both (B, T); at masked positions advantages carry
    the running value, as verl's do.
    """
    mask = response_mask.to(values.dtype)
    nextvalues = 0 if bootstrap is None else bootstrap
    lastgaelam = 0
    advantages_reversed = []
    for t in reversed(range(token_level_rewards.shape[-1])):
        delta = token_level_rewards[:, t] + gamma * nextvalues - values[:, t]
        lastgaelam_ = delta + gamma * lam * lastgaelam
        nextvalues = values[:, t] * mask[:, t] + (1 - mask[:, t]) * nextvalues
        lastgaelam = lastgaelam_ * mask[:, t] + (1 - mask[:, t]) * lastgaelam
        advantages_reversed.append(lastgaelam)
    if not advantages_reversed:
        return torch.zeros_like(values), values.clone()
    advantages = torch.stack(advantages_reversed[::-1], dim=1)
    return advantages, advantages + values
