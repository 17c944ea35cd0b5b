"""The verl and OpenRLHF drop-ins against those projects' own code, on random inputs.

Neither project installs on a CPU machine beside this one (verl 0.9.1 needs ray and
transformers < 5.11; OpenRLHF 0.11.2 needs flash-attn, deepspeed and ray), so the functions
are restated here from their source:

- verl 0.9.1 (git tag v0.9.1; PyPI wheel verl-0.9.1-py3-none-any.whl, sha256 db6e6f2a8d9d5808...):
  verl/trainer/ppo/core_algos.py (agg_loss, kl_penalty, kl_penalty_forward, compute_policy_loss,
  compute_policy_loss_vanilla, compute_policy_loss_gspo,
  compute_gae_advantage_return, compute_grpo_outcome_advantage) and
  verl/utils/torch_functional.py (logprobs_from_logits_v2, entropy_from_logits, masked_mean,
  masked_var, masked_whiten).
- OpenRLHF 0.11.2 (git tag v0.11.2; PyPI wheel openrlhf-0.11.2-cp311-cp311-manylinux1_x86_64.whl,
  sha256 c969d70db03a7072...): openrlhf/models/loss.py (aggregate_loss, PolicyLoss, ValueLoss)
  and openrlhf/models/utils.py (compute_approx_kl, log_probs_from_logits, compute_entropy,
  masked_mean).

Packed layouts, from the same releases: verl's remove-padding path (use_remove_padding) in
verl/workers/engine/fsdp/transformer_impl.py (FSDPEngineWithLMHead.prepare_model_inputs /
prepare_model_outputs) and verl/utils/torch_functional.py (entropy_from_logits_with_chunking);
it pads back (verl/workers/utils/losses.py ppo_loss, no_padding_2_padding) before any policy
loss. OpenRLHF's packing_samples in openrlhf/models/actor.py (Actor.forward) and
openrlhf/models/ring_attn_utils.py (unpad_and_slice_tensor, gather_and_pad_tensor); it pads
back before PolicyLoss.
"""

from __future__ import annotations

from collections import defaultdict

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from helpers import DEVICE, assert_grad_close, assert_values_close

from rlops.integrations import openrlhf as r_openrlhf
from rlops.integrations import verl as r_verl

B, T, V = 5, 9, 40


def _inputs(seed: int = 0, spread: float = 0.6):
    g = torch.Generator().manual_seed(seed)
    log_prob = -torch.rand(B, T, generator=g, dtype=torch.float64) * 3
    mask = (torch.rand(B, T, generator=g) > 0.25).double()
    mask[0] = 1
    mask[3] = 0  # a fully masked sequence
    return {
        "log_prob": log_prob,
        "old_log_prob": log_prob + spread * torch.randn(B, T, generator=g, dtype=torch.float64),
        "ref_log_prob": log_prob + spread * torch.randn(B, T, generator=g, dtype=torch.float64),
        "advantages": torch.randn(B, T, generator=g, dtype=torch.float64),
        "mask": mask,
        "weights": torch.rand(B, T, generator=g, dtype=torch.float64) + 0.5,
    }


def _value_and_grad(fn, x: torch.Tensor, *args, **kwargs):
    leaf = x.detach().clone().requires_grad_(True)
    out = fn(leaf, *args, **kwargs)
    loss = out[0] if isinstance(out, tuple) else out
    (loss * 1.3).sum().backward()
    return out, leaf.grad


# ------------------------------------------------------------------------------------------
# verl 0.9.1, restated
# ------------------------------------------------------------------------------------------


def verl_masked_mean(values, mask, axis=None):  # verl/utils/torch_functional.py: masked_sum, then + 1e-8
    return (torch.where(mask.bool(), values, 0.0) * mask).sum(axis=axis) / (mask.sum(axis=axis) + 1e-8)


def verl_masked_whiten(values, mask):
    mean = verl_masked_mean(values, mask)
    var = verl_masked_mean((values - mean) ** 2, mask) * (mask.sum() / (mask.sum() - 1))
    return (values - mean) * torch.rsqrt(var + 1e-8)


def verl_agg_loss(loss_mat, loss_mask, loss_agg_mode, dp_size=1, batch_num_tokens=None, global_batch_size=None,
                  loss_scale_factor=None):
    if loss_agg_mode == "token-mean":
        if batch_num_tokens is None:
            batch_num_tokens = loss_mask.sum()
        return (loss_mat * loss_mask).sum() / batch_num_tokens * dp_size
    if loss_agg_mode == "token-sum":
        return (loss_mat * loss_mask).sum() * dp_size
    if loss_agg_mode in ["seq-mean-token-sum", "seq-mean-token-sum-norm"]:
        seq_losses = torch.sum(loss_mat * loss_mask, dim=-1)
        seq_mask = (torch.sum(loss_mask, dim=-1) > 0).float()
        if global_batch_size is None:
            global_batch_size = seq_mask.sum()
        loss = (seq_losses * seq_mask).sum() / global_batch_size * dp_size
        if loss_agg_mode == "seq-mean-token-sum-norm":
            loss /= loss_mask.shape[-1] if loss_scale_factor is None else loss_scale_factor
        return loss
    seq_mask = torch.sum(loss_mask, dim=-1)
    seq_losses = torch.sum(loss_mat * loss_mask, dim=-1) / (seq_mask + 1e-8)
    seq_mask = (seq_mask > 0).float()
    if global_batch_size is None:
        global_batch_size = seq_mask.sum()
    return (seq_losses * seq_mask).sum() / global_batch_size * dp_size


def verl_kl_penalty(logprob, ref_logprob, kl_penalty):
    base = kl_penalty[:-1] if kl_penalty.endswith("+") else kl_penalty
    if base in ("kl", "k1"):
        forward = logprob - ref_logprob
    elif base in ("mse", "k2"):
        forward = 0.5 * (logprob - ref_logprob).square()
    else:
        kl = torch.clamp(ref_logprob - logprob, min=-20, max=20)
        forward = torch.clamp(torch.exp(kl) - kl - 1, min=-10, max=10)
    if not kl_penalty.endswith("+") or kl_penalty in ("mse", "k2"):
        return forward
    backward = 0.5 * (logprob - ref_logprob).square()
    return backward - backward.detach() + forward.detach()


def verl_vanilla(old_log_prob, log_prob, advantages, response_mask, loss_agg_mode, config, rollout_is_weights=None):
    clip_low = config["clip_ratio_low"] if config.get("clip_ratio_low") is not None else config["clip_ratio"]
    clip_high = config["clip_ratio_high"] if config.get("clip_ratio_high") is not None else config["clip_ratio"]
    clip_ratio_c = config.get("clip_ratio_c", 3.0)
    negative_approx_kl = torch.clamp(log_prob - old_log_prob, min=-20.0, max=20.0)
    ratio = torch.exp(negative_approx_kl)
    ppo_kl = verl_masked_mean(-negative_approx_kl, response_mask)
    pg_losses1 = -advantages * ratio
    pg_losses2 = -advantages * torch.clamp(ratio, 1 - clip_low, 1 + clip_high)
    clip_pg_losses1 = torch.maximum(pg_losses1, pg_losses2)
    pg_clipfrac = verl_masked_mean(torch.gt(pg_losses2, pg_losses1).float(), response_mask)
    pg_losses3 = -advantages * clip_ratio_c
    clip_pg_losses2 = torch.min(pg_losses3, clip_pg_losses1)
    pg_clipfrac_lower = verl_masked_mean(torch.gt(clip_pg_losses1, pg_losses3) * (advantages < 0).float(),
                                         response_mask)
    pg_losses = torch.where(advantages < 0, clip_pg_losses2, clip_pg_losses1)
    if rollout_is_weights is not None:
        pg_losses = pg_losses * rollout_is_weights
    loss = verl_agg_loss(pg_losses, response_mask, loss_agg_mode, **config.get("global_batch_info", {}))
    return loss, {"actor/pg_clipfrac": pg_clipfrac.item(), "actor/ppo_kl": ppo_kl.item(),
                  "actor/pg_clipfrac_lower": pg_clipfrac_lower.item()}


def verl_gspo(old_log_prob, log_prob, advantages, response_mask, loss_agg_mode, config, rollout_is_weights=None):
    clip_low = config["clip_ratio_low"] if config.get("clip_ratio_low") is not None else config["clip_ratio"]
    clip_high = config["clip_ratio_high"] if config.get("clip_ratio_high") is not None else config["clip_ratio"]
    negative_approx_kl = log_prob - old_log_prob
    seq_lengths = torch.sum(response_mask, dim=-1).clamp(min=1)
    negative_approx_kl_seq = torch.sum(negative_approx_kl * response_mask, dim=-1) / seq_lengths
    log_seq = log_prob - log_prob.detach() + negative_approx_kl_seq.detach().unsqueeze(-1)
    seq_ratio = torch.exp(torch.clamp(log_seq, max=10.0))
    pg_losses1 = -advantages * seq_ratio
    pg_losses2 = -advantages * torch.clamp(seq_ratio, 1 - clip_low, 1 + clip_high)
    pg_losses = torch.maximum(pg_losses1, pg_losses2)
    if rollout_is_weights is not None:
        pg_losses = pg_losses * rollout_is_weights
    loss = verl_agg_loss(pg_losses, response_mask, loss_agg_mode, **config.get("global_batch_info", {}))
    pg_clipfrac = verl_masked_mean(torch.gt(pg_losses2, pg_losses1).float(), response_mask)
    ppo_kl = verl_masked_mean(-negative_approx_kl, response_mask)
    return loss, {"actor/pg_clipfrac": pg_clipfrac.item(), "actor/ppo_kl": ppo_kl.item(),
                  "actor/pg_clipfrac_lower": 0.0}


def verl_gae(token_level_rewards, values, response_mask, gamma, lam):
    nextvalues, lastgaelam, advantages_reversed = 0, 0, []
    for t in reversed(range(token_level_rewards.shape[-1])):
        delta = token_level_rewards[:, t] + gamma * nextvalues - values[:, t]
        lastgaelam_ = delta + gamma * lam * lastgaelam
        nextvalues = values[:, t] * response_mask[:, t] + (1 - response_mask[:, t]) * nextvalues
        lastgaelam = lastgaelam_ * response_mask[:, t] + (1 - response_mask[:, t]) * lastgaelam
        advantages_reversed.append(lastgaelam)
    advantages = torch.stack(advantages_reversed[::-1], dim=1)
    returns = advantages + values
    return verl_masked_whiten(advantages, response_mask), returns


def verl_grpo(token_level_rewards, response_mask, index, epsilon=1e-6, norm_adv_by_std_in_grpo=True):
    scores = token_level_rewards.sum(dim=-1)
    id2score, id2mean, id2std = defaultdict(list), {}, {}
    for i in range(scores.shape[0]):
        id2score[index[i]].append(scores[i])
    for idx, group in id2score.items():
        if len(group) == 1:
            id2mean[idx], id2std[idx] = torch.tensor(0.0), torch.tensor(1.0)
        else:
            id2mean[idx], id2std[idx] = torch.mean(torch.stack(group)), torch.std(torch.stack(group))
    scores = scores.clone()
    for i in range(scores.shape[0]):
        if norm_adv_by_std_in_grpo:
            scores[i] = (scores[i] - id2mean[index[i]]) / (id2std[index[i]] + epsilon)
        else:
            scores[i] = scores[i] - id2mean[index[i]]
    scores = scores.unsqueeze(-1) * response_mask
    return scores, scores


AGGS = ["token-mean", "token-sum", "seq-mean-token-sum", "seq-mean-token-sum-norm", "seq-mean-token-mean"]
GLOBAL = [{}, {"dp_size": 2, "batch_num_tokens": 57.0, "global_batch_size": 9.0}]


@pytest.mark.parametrize("global_info", GLOBAL)
@pytest.mark.parametrize("mode", AGGS)
def test_verl_agg_loss(mode: str, global_info: dict) -> None:
    x = _inputs()
    extra = {"loss_scale_factor": 7.0} if mode == "seq-mean-token-sum-norm" and global_info else {}
    got, g1 = _value_and_grad(r_verl.agg_loss, x["advantages"], x["mask"], mode, **global_info, **extra)
    want, g2 = _value_and_grad(verl_agg_loss, x["advantages"], x["mask"], mode, **global_info, **extra)
    assert_values_close(got, want, 1e-12)
    assert_grad_close(g1, g2)


@pytest.mark.parametrize("name", ["kl", "k1", "mse", "k2", "low_var_kl", "k3", "k1+", "k3+", "low_var_kl+", "k2+"])
def test_verl_kl_penalty(name: str) -> None:
    x = _inputs(spread=8.0)  # reaches the +-20 and 10 clamps
    got, g1 = _value_and_grad(r_verl.kl_penalty, x["log_prob"], x["ref_log_prob"], name)
    want, g2 = _value_and_grad(verl_kl_penalty, x["log_prob"], x["ref_log_prob"], name)
    assert_values_close(got, want, 1e-12)
    assert_grad_close(g1, g2)


@pytest.mark.parametrize("weights", [False, True])
@pytest.mark.parametrize("mode", AGGS)
@pytest.mark.parametrize("loss", ["vanilla", "gspo"])
def test_verl_policy_losses(loss: str, mode: str, weights: bool) -> None:
    x = _inputs(spread=1.0)
    config = {"clip_ratio": 0.2, "clip_ratio_low": None, "clip_ratio_high": 0.28, "clip_ratio_c": 2.0,
              "global_batch_info": {}}
    is_w = x["weights"] if weights else None
    ours, theirs = r_verl.get_policy_loss_fn(loss), {"vanilla": verl_vanilla, "gspo": verl_gspo}[loss]
    (got, got_metrics), g1 = _value_and_grad(lambda lp: ours(x["old_log_prob"], lp, x["advantages"], x["mask"],
                                                            mode, config, is_w), x["log_prob"])
    (want, want_metrics), g2 = _value_and_grad(lambda lp: theirs(x["old_log_prob"], lp, x["advantages"],
                                                                 x["mask"], mode, config, is_w), x["log_prob"])
    assert_values_close(got, want, 1e-12)
    assert_grad_close(g1, g2)
    assert got_metrics.keys() == want_metrics.keys()
    for key, value in want_metrics.items():
        assert got_metrics[key] == pytest.approx(value, abs=1e-12), key
    with pytest.raises(ValueError, match="not covered"):
        r_verl.get_policy_loss_fn("no_such_loss")


@pytest.mark.parametrize("mode", AGGS)
@pytest.mark.parametrize("ranges", [(0.2, None, None, 3.0), (0.2, 0.1, 0.3, 2.0), (None, 0.15, 0.25, 3.0)])
def test_verl_legacy_compute_policy_loss(mode: str, ranges: tuple) -> None:
    # verl's compute_policy_loss (core_algos.py) is compute_policy_loss_vanilla's arithmetic with
    # explicit clip ranges, no rollout weights, and the metrics returned as tensors.
    cliprange, low, high, c = ranges
    x = _inputs(seed=5, spread=1.0)
    config = {"clip_ratio": cliprange, "clip_ratio_low": low, "clip_ratio_high": high, "clip_ratio_c": c}
    got, g1 = _value_and_grad(lambda lp: r_verl.compute_policy_loss(x["old_log_prob"], lp, x["advantages"], x["mask"],
                                                                     cliprange, low, high, c, mode), x["log_prob"])
    (want, want_metrics), g2 = _value_and_grad(lambda lp: verl_vanilla(x["old_log_prob"], lp, x["advantages"],
                                                                       x["mask"], mode, config), x["log_prob"])
    assert_values_close(got[0], want, 1e-12)
    assert_grad_close(g1, g2)
    for value, key in zip(got[1:], ("actor/pg_clipfrac", "actor/ppo_kl", "actor/pg_clipfrac_lower"), strict=True):
        assert isinstance(value, torch.Tensor) and value.item() == pytest.approx(want_metrics[key], abs=1e-12), key
    with pytest.raises(ValueError, match="cliprange"):
        r_verl.compute_policy_loss(x["old_log_prob"], x["log_prob"], x["advantages"], x["mask"])


def test_verl_gae_and_grpo_advantages() -> None:
    x = _inputs(seed=4)
    rewards, values = x["advantages"].to(DEVICE), x["weights"].to(DEVICE)
    mask = x["mask"].clone()
    mask[3, :4] = 1  # GAE needs valid tokens in every whitened batch
    got_adv, got_ret = r_verl.compute_gae_advantage_return(rewards, values, mask.to(DEVICE), 0.99, 0.95,
                                                               backend="triton")
    want_adv, want_ret = verl_gae(rewards.cpu(), values.cpu(), mask, 0.99, 0.95)
    valid = mask.bool()
    assert_values_close(got_adv.cpu()[valid], want_adv[valid])
    assert_values_close(got_ret.cpu()[valid], want_ret[valid])
    index = np.array(["p0", "p1", "p0", "p2", "p1"], dtype=object)  # p2 is a group of one
    for norm, eps in ((True, 1e-6), (True, 0.25), (False, 1e-6)):
        got, _ = r_verl.compute_grpo_outcome_advantage(rewards, mask.to(DEVICE), index, epsilon=eps,
                                                       norm_adv_by_std_in_grpo=norm)
        want, _ = verl_grpo(rewards.cpu(), mask, index, epsilon=eps, norm_adv_by_std_in_grpo=norm)
        assert_values_close(got.cpu(), want)


def test_verl_logprobs_and_entropy_from_logits() -> None:
    g = torch.Generator().manual_seed(2)
    logits = (torch.randn(B, T, V, generator=g) * 3).to(DEVICE)
    labels = torch.randint(0, V, (B, T), generator=g).to(DEVICE)
    w = torch.randn(B, T, generator=g).to(DEVICE)

    def theirs(x, y):  # verl's logprobs_from_logits_v2 (float32 path) and entropy_from_logits
        logp = torch.gather(x, -1, y.unsqueeze(-1)).squeeze(-1) - torch.stack([torch.logsumexp(r, -1) for r in x])
        pd = torch.softmax(x, dim=-1)
        return logp, torch.logsumexp(x, dim=-1) - torch.sum(pd * x, dim=-1)

    x1, x2 = logits.clone().requires_grad_(True), logits.clone().requires_grad_(True)
    ours = (r_verl.logprobs_from_logits(x1, labels, backend="triton"), r_verl.entropy_from_logits(x1, backend="triton"))
    want = theirs(x2, labels)
    for a, b in zip(ours, want, strict=True):
        assert_values_close(a, b)
    ((ours[0] * w).sum() + (ours[1] * w).sum()).backward()
    ((want[0] * w).sum() + (want[1] * w).sum()).backward()
    assert_grad_close(x1.grad, x2.grad)
    # inplace_backward (verl's default) writes the gradient over logits an operation produced.
    base = logits.clone().requires_grad_(True)
    produced = base * 1.0
    (r_verl.logprobs_from_logits(produced, labels, backend="triton") * w).sum().backward()
    x3 = logits.clone().requires_grad_(True)
    (theirs(x3, labels)[0] * w).sum().backward()
    assert_grad_close(base.grad, x3.grad)
    assert_values_close(produced.detach(), x3.grad)


def _packed_sequences(seed: int):
    """Four sequences of lengths 5, 1, 7, 3 as a right-padded (B, T) batch: (input_ids, attention_mask)."""
    g = torch.Generator().manual_seed(seed)
    lengths = torch.tensor([5, 1, 7, 3])
    attention_mask = (torch.arange(7) < lengths[:, None]).long()
    input_ids = torch.randint(1, V, (4, 7), generator=g) * attention_mask
    return input_ids, attention_mask


def verl_entropy_from_logits_with_chunking(logits, chunk_size=2048):
    entropy = torch.zeros(logits.shape[0], device=logits.device)
    for i in range(0, logits.shape[0], chunk_size):
        logits_chunk = logits[i: i + chunk_size].float()
        pd_chunk = torch.nn.functional.softmax(logits_chunk, dim=-1)
        entropy_chunk = torch.logsumexp(logits_chunk, dim=-1) - torch.sum(pd_chunk * logits_chunk, dim=-1)
        entropy[i: i + chunk_size] = entropy_chunk
    return entropy


@pytest.mark.parametrize("calculate_entropy", [True, False])
def test_verl_remove_padding_logprobs_and_entropy(calculate_entropy: bool) -> None:
    """verl's use_remove_padding path: log-probs and entropy of logits_rmpad (total_nnz, V)."""
    input_ids, attention_mask = _packed_sequences(seed=8)
    nested = torch.nested.nested_tensor([r[m.bool()] for r, m in zip(input_ids, attention_mask, strict=True)],
                                        layout=torch.jagged)
    input_ids_rmpad = nested.values().unsqueeze(0)  # (1, total_nnz)
    rolled = torch.roll(input_ids_rmpad, shifts=-1, dims=1).squeeze(0).to(DEVICE)  # (total_nnz,)
    n = rolled.numel()
    g = torch.Generator().manual_seed(9)
    base = (torch.randn(n, V, generator=g) * 3).to(DEVICE)
    temperature_rmpad = (torch.rand(n, 1, generator=g) + 0.5).to(DEVICE)  # per token, as verl expands it
    w = torch.randn(n, generator=g).to(DEVICE)

    def theirs(x):  # logprobs_from_logits_v2 (float32) and entropy_from_logits on logits_rmpad
        logits_rmpad = x / temperature_rmpad
        logp = logits_rmpad.gather(-1, rolled[:, None]).squeeze(-1) - torch.logsumexp(logits_rmpad, -1)
        return logp, r_verl_entropy(logits_rmpad)

    def ours(x):  # verl's calls: entropy first, then the log-probs, in place only without entropy
        logits_rmpad = x / temperature_rmpad
        entropy = r_verl.entropy_from_logits(logits_rmpad, backend="triton") if calculate_entropy else None
        logp = r_verl.logprobs_from_logits(logits_rmpad, rolled, inplace_backward=not calculate_entropy,
                                           backend="triton")
        return logp, entropy

    x1, x2 = base.clone().requires_grad_(True), base.clone().requires_grad_(True)
    (got_logp, got_entropy), (want_logp, want_entropy) = ours(x1), theirs(x2)
    assert got_logp.shape == (n,) and got_logp.dtype == torch.float32
    assert_values_close(got_logp, want_logp)
    loss_ours, loss_theirs = (got_logp * w).sum(), (want_logp * w).sum()
    if calculate_entropy:
        assert_values_close(got_entropy, want_entropy)
        assert_values_close(r_verl.entropy_from_logits_with_chunking(base / temperature_rmpad, 4, backend="triton"),
                            verl_entropy_from_logits_with_chunking(base / temperature_rmpad, 4))
        loss_ours, loss_theirs = loss_ours + (got_entropy * w).sum(), loss_theirs + (want_entropy * w).sum()
    loss_ours.backward()
    loss_theirs.backward()
    assert_grad_close(x1.grad, x2.grad)
    with pytest.raises(ValueError, match="chunk_size must be an int >= 1"):
        r_verl.entropy_from_logits_with_chunking(base, 0)


def r_verl_entropy(logits):  # verl's entropy_from_logits
    pd = torch.softmax(logits, dim=-1)
    return torch.logsumexp(logits, dim=-1) - torch.sum(pd * logits, dim=-1)


# ------------------------------------------------------------------------------------------
# OpenRLHF 0.11.2, restated
# ------------------------------------------------------------------------------------------


def orl_masked_mean(tensor, mask, dim=None):
    return (tensor * mask).sum(dim=dim) / mask.sum(dim=dim)


def orl_aggregate(loss, loss_mask, token_level_loss=True, dp_size=1, batch_num_tokens=None, global_batch_size=None):
    if token_level_loss:
        if batch_num_tokens is None:
            return orl_masked_mean(loss, loss_mask)
        return (loss * loss_mask).sum() / batch_num_tokens * dp_size
    token_counts = loss_mask.sum(dim=-1)
    seq_loss = (loss * loss_mask).sum(dim=-1) / (token_counts + 1e-8)
    seq_mask = (token_counts > 0).float()
    if global_batch_size is None:
        return orl_masked_mean(seq_loss, seq_mask)
    return (seq_loss * seq_mask).sum() / global_batch_size * dp_size


def orl_approx_kl(log_probs, log_probs_base, log_probs_old=None, kl_estimator="k1", unbiased_gradient=False):
    log_ratio = log_probs.float() - log_probs_base.float()
    if kl_estimator == "k1":
        value = log_ratio
    elif kl_estimator == "k2":
        value = log_ratio**2 / 2.0
    else:
        k3_log_ratio = log_ratio.clamp(min=-10)
        value = (-k3_log_ratio).exp() - 1 + k3_log_ratio
    value = value.clamp(min=-10, max=10)
    if not unbiased_gradient:
        return value
    w = 1.0 if log_probs_old is None else (log_probs.float() - log_probs_old.float()).exp().clamp(max=10.0).detach()
    grad_surrogate = w * (log_ratio**2 / 2.0)
    return value.detach() + grad_surrogate - grad_surrogate.detach()


def orl_policy_loss(log_probs, old_log_probs, advantages, action_mask, rollout_log_probs, clip_eps_low,
                    clip_eps_high, dual_clip, token_level_loss, policy_loss_type, is_level, is_mode, is_gating,
                    is_threshold, **global_info):
    if policy_loss_type == "gspo":
        token_level_loss = False
    raw = log_probs - old_log_probs
    if policy_loss_type == "ppo":
        ratio = raw.clamp(min=-20.0, max=20.0).exp()
    else:
        log_ratio = log_probs - rollout_log_probs if is_level != "off" else raw
        ratio = (log_ratio * action_mask).sum(dim=-1) / action_mask.sum(dim=-1).clamp(min=1)
        ratio = ratio.exp().unsqueeze(-1) * action_mask
    surr1 = ratio * advantages
    surr2 = ratio.clamp(1 - clip_eps_low, 1 + clip_eps_high) * advantages
    if dual_clip is None:
        loss = -torch.min(surr1, surr2)
    else:
        clip1 = torch.min(surr1, surr2)
        clip2 = torch.max(clip1, dual_clip * advantages)
        loss = -torch.where(advantages < 0, clip2, clip1)
    vllm_kl = is_filter_ratio = None
    if is_level != "off" and policy_loss_type == "ppo":
        low, high = is_threshold
        seq_level = is_level == "seq"
        is_log_ratio = (old_log_probs - rollout_log_probs).detach()
        token_is = is_log_ratio.exp()
        if is_gating == "ratio":
            stat = orl_masked_mean(is_log_ratio, action_mask, dim=-1).unsqueeze(-1) if seq_level else is_log_ratio
            stat = stat.exp()
        else:
            p = rollout_log_probs.exp().clamp(1e-6, 1 - 1e-6)
            q = old_log_probs.exp().clamp(1e-6, 1 - 1e-6)
            if is_gating == "binary_kl":
                stat = p * (p / q).log() + (1 - p) * ((1 - p) / (1 - q)).log()
            else:
                stat = (p - q).abs()
            if seq_level:
                stat = orl_masked_mean(stat, action_mask, dim=-1).unsqueeze(-1)
        if is_mode == "clip":
            coef, filtered = stat.clamp(min=low, max=high), (stat < low) | (stat > high)
        else:
            keep = (stat >= low) & (stat <= high)
            coef, filtered = torch.where(keep, token_is, 0.0), ~keep
        loss = coef * loss
        is_filter_ratio = filtered.float().mean() if seq_level else orl_masked_mean(filtered.float(), action_mask)
        vllm_kl = orl_masked_mean(rollout_log_probs - old_log_probs, action_mask)
    loss = orl_aggregate(loss, action_mask, token_level_loss, **global_info)
    clip_ratio = orl_masked_mean(torch.lt(surr2, surr1).float(), action_mask)
    ppo_kl = orl_masked_mean(-raw.detach(), action_mask)
    return loss, clip_ratio, ppo_kl, vllm_kl, is_filter_ratio


@pytest.mark.parametrize("unbiased", [False, True])
@pytest.mark.parametrize("estimator", ["k1", "k2", "k3"])
def test_openrlhf_compute_approx_kl(estimator: str, unbiased: bool) -> None:
    x = _inputs(spread=8.0)  # reaches the -10 and +-10 clamps
    x["log_prob"][1, :3] += torch.tensor([150.0, -150.0, -95.0], dtype=torch.float64)  # exp overflows float32
    args = (x["ref_log_prob"], x["old_log_prob"])
    got, g1 = _value_and_grad(r_openrlhf.compute_approx_kl, x["log_prob"], *args, kl_estimator=estimator,
                              unbiased_gradient=unbiased)
    want, g2 = _value_and_grad(orl_approx_kl, x["log_prob"], *args, kl_estimator=estimator, unbiased_gradient=unbiased)
    assert_values_close(got, want, 1e-6)
    assert_grad_close(g1, g2)


IS_CORRECTIONS = [
    ("off", "mask", "ratio", (0.5, 5.0)),
    ("token", "mask", "ratio", (0.5, 1.5)),
    ("token", "clip", "ratio", (0.7, 1.3)),
    ("seq", "mask", "ratio", (0.8, 1.2)),
    ("token", "mask", "binary_kl", (0.0, 0.05)),
    ("seq", "mask", "tv", (0.0, 0.1)),
]


@pytest.mark.parametrize("correction", IS_CORRECTIONS)
@pytest.mark.parametrize("policy_loss_type, dual_clip, token_level_loss, global_info", [
    ("ppo", None, True, {}),
    ("ppo", 3.0, False, {}),
    ("ppo", 2.0, True, {"dp_size": 2, "batch_num_tokens": 40.0}),
    ("gspo", None, True, {"dp_size": 2, "global_batch_size": 8.0}),
])
def test_openrlhf_policy_loss(policy_loss_type, dual_clip, token_level_loss, global_info, correction) -> None:
    x = _inputs(spread=1.0)
    rollout = x["old_log_prob"] + 0.2 * torch.randn(B, T, generator=torch.Generator().manual_seed(7),
                                                    dtype=torch.float64)
    level, mode, gating, threshold = correction
    module = r_openrlhf.PolicyLoss(0.2, 0.28, dual_clip, token_level_loss, policy_loss_type, level, mode, gating,
                                   threshold)
    got, g1 = _value_and_grad(lambda lp: module(lp, x["old_log_prob"], x["advantages"], x["mask"], rollout,
                                                **global_info), x["log_prob"])
    want, g2 = _value_and_grad(lambda lp: orl_policy_loss(lp, x["old_log_prob"], x["advantages"], x["mask"], rollout,
                                                          0.2, 0.28, dual_clip, token_level_loss, policy_loss_type,
                                                          level, mode, gating, threshold, **global_info),
                               x["log_prob"])
    assert len(got) == len(want) == 5
    for a, b in zip(got, want, strict=True):
        assert (a is None) == (b is None)
        if a is not None:
            assert_values_close(a, b, 1e-12)
    assert_grad_close(g1, g2)


@pytest.mark.parametrize("clip_eps", [None, 0.2])
@pytest.mark.parametrize("token_level_loss, global_info", [(True, {}), (False, {}),
                                                           (True, {"dp_size": 2, "batch_num_tokens": 40.0})])
def test_openrlhf_value_loss(clip_eps, token_level_loss, global_info) -> None:
    x = _inputs()
    old_values, returns = x["ref_log_prob"], x["advantages"]

    def theirs(values):
        if clip_eps is not None:
            clipped = old_values + (values - old_values).clamp(-clip_eps, clip_eps)
            loss = torch.max((clipped - returns) ** 2, (values - returns) ** 2)
        else:
            loss = (values - returns) ** 2
        return 0.5 * orl_aggregate(loss, x["mask"], token_level_loss, **global_info)

    module = r_openrlhf.ValueLoss(clip_eps, token_level_loss)
    got, g1 = _value_and_grad(lambda v: module(v, old_values, returns, x["mask"], **global_info), x["log_prob"])
    want, g2 = _value_and_grad(theirs, x["log_prob"])
    assert_values_close(got, want, 1e-12)
    assert_grad_close(g1, g2)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_openrlhf_log_probs_from_logits(dtype: torch.dtype) -> None:
    g = torch.Generator().manual_seed(3)
    logits = (torch.randn(B, T, V, generator=g) * 3).to(dtype).to(DEVICE)
    labels = torch.randint(0, V, (B, T), generator=g).to(DEVICE)

    def theirs(x, y, temperature):  # OpenRLHF's path without flash-attn; it divides x in place
        x = x / temperature
        if x.dtype in (torch.float32, torch.float64):
            return torch.gather(x, -1, y.unsqueeze(-1)).squeeze(-1) - torch.logsumexp(x, dim=-1)
        rows = zip(x, y, strict=True)
        return torch.stack([F.log_softmax(r, -1).gather(-1, lab.unsqueeze(-1)).squeeze(-1) for r, lab in rows])

    for temperature in (1.0, 0.7):
        kept = logits.clone()
        got = r_openrlhf.log_probs_from_logits(kept, labels, temperature, backend="triton")
        want = theirs(logits.double(), labels, temperature)
        assert torch.equal(kept, logits), "the caller's logits are left untouched"
        assert_values_close(got, want)  # float32 arithmetic on the (rounded) input


@pytest.mark.parametrize("fn", [lambda x, y: r_verl.logprobs_from_logits(x, y, backend="triton"),
                                lambda x, y: r_openrlhf.log_probs_from_logits(x, y, backend="triton")])
def test_log_prob_drop_ins_name_labels(fn) -> None:
    """The drop-ins' errors name their own argument, labels, not rlops's tokens."""
    logits = torch.randn(2, 3, 10, device=DEVICE)
    with pytest.raises(ValueError, match=r"labels must lie in \[0, V\) = \[0, 10\)"):
        fn(logits, torch.full((2, 3), 10, device=DEVICE))
    with pytest.raises(ValueError, match="labels must have the shape of logits"):
        fn(logits, torch.zeros(2, 4, dtype=torch.long, device=DEVICE))


@pytest.mark.parametrize("ring_pad", [0, 2])
def test_openrlhf_packing_samples_logprobs_and_entropy(ring_pad: int) -> None:
    """OpenRLHF's packing_samples: Actor.forward scores the packed row (1, total_nnz) (a ring-attention
    rank's slice is padded to a multiple of the ring size), then pads back with gather_and_pad_tensor
    before any loss."""
    sequences, attention_mask = _packed_sequences(seed=10)
    # unpad_and_slice_tensor without a ring group: the sequences and their roll, unpadded into one row
    rolled_sequences = torch.roll(sequences, shifts=-1, dims=1)
    keep = attention_mask.bool()
    packed, rolled = sequences[keep][None], rolled_sequences[keep][None]
    if ring_pad:  # get_tensor_in_current_ring_attn_rank pads the row with token 0
        packed, rolled = F.pad(packed, (0, ring_pad)), F.pad(rolled, (0, ring_pad))
    n = packed.shape[1]
    g = torch.Generator().manual_seed(11)
    base = (torch.randn(1, n, V, generator=g) * 3).to(DEVICE)
    rolled = rolled.to(DEVICE)
    w = torch.randn(1, n, generator=g).to(DEVICE)

    def theirs(x):  # float32 logits, already divided by the temperature: log_probs_from_logits, compute_entropy
        logp = torch.gather(x, -1, rolled.unsqueeze(-1)).squeeze(-1) - torch.logsumexp(x, dim=-1)
        pd = torch.softmax(x, dim=-1)
        return logp, torch.logsumexp(x, dim=-1) - torch.sum(pd * x, dim=-1)

    x1, x2 = base.clone().requires_grad_(True), base.clone().requires_grad_(True)
    got = (r_openrlhf.log_probs_from_logits(x1, rolled, backend="triton"),
           r_openrlhf.compute_entropy(x1, backend="triton"))
    want = theirs(x2)
    for a, b in zip(got, want, strict=True):
        assert a.shape == (1, n) and a.dtype == torch.float32
        assert_values_close(a, b)
    ((got[0] * w).sum() + (got[1] * w).sum()).backward()
    ((want[0] * w).sum() + (want[1] * w).sum()).backward()
    assert_grad_close(x1.grad, x2.grad)
