"""The oracle (rlops/reference.py) against SPEC.md written out by hand.

The oracle checks every backend, so it is checked here on its own: section 1 against
PyTorch's log_softmax, and sections 2-4 against numbers worked out by hand from SPEC.md.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from rlops import reference


def _naive_stats(x: torch.Tensor, tokens: torch.Tensor, temperature: float) -> tuple[torch.Tensor, torch.Tensor]:
    logp_all = F.log_softmax(x / temperature, dim=-1)
    logp = logp_all.gather(-1, tokens.unsqueeze(-1)).squeeze(-1)
    return logp, -(logp_all.exp() * logp_all).sum(-1)


def test_minus_inf_logits_give_finite_entropy_and_grads() -> None:
    x = torch.randn(3, 20, dtype=torch.float64)
    x[:, 5:] = float("-inf")
    x.requires_grad_(True)
    tokens = torch.tensor([0, 2, 4])
    logp, ent = reference.token_logprobs_and_entropy(x, tokens)
    (logp.sum() + ent.sum()).backward()
    n_logp, n_ent = _naive_stats(x.detach()[:, :5], tokens, 1.0)
    torch.testing.assert_close(logp.detach(), n_logp, rtol=0, atol=1e-12)
    torch.testing.assert_close(ent.detach(), n_ent, rtol=0, atol=1e-12)
    assert torch.isfinite(x.grad).all() and not x.grad[:, 5:].any()


def test_full_kl() -> None:
    torch.manual_seed(1)
    x = (torch.randn(2, 3, 30, dtype=torch.float64) * 2).requires_grad_(True)
    ref_logits = torch.randn(2, 3, 30, dtype=torch.float64) * 2
    tokens = torch.randint(0, 30, (2, 3))
    _, _, kl = reference.token_stats_with_kl(x, tokens, ref_logits, 0.9)
    p = F.softmax(x / 0.9, -1)
    naive = (p * (F.log_softmax(x / 0.9, -1) - F.log_softmax(ref_logits / 0.9, -1))).sum(-1)
    torch.testing.assert_close(kl, naive, rtol=0, atol=1e-12)
    assert (kl > 0).all()
    (g,) = torch.autograd.grad(kl.sum(), x)
    (g_naive,) = torch.autograd.grad(naive.sum(), x)
    torch.testing.assert_close(g, g_naive, rtol=0, atol=1e-12)
    _, _, self_kl = reference.token_stats_with_kl(x, tokens, x.detach())
    assert self_kl.abs().max() < 1e-12


# ------------------------------------------------------------------------------------------
# Sections 2-4, numbers worked out by hand
# ------------------------------------------------------------------------------------------


def test_clipped_surrogate_by_hand() -> None:
    r = torch.tensor([1.5, 0.5, 1.1, 5.0, 0.7, 1.0], dtype=torch.float64)
    adv = torch.tensor([1.0, -1.0, 1.0, -1.0, 1.0, -1.0], dtype=torch.float64)
    # clip_low 0.2, clip_high 0.3: clamp(r) in [0.8, 1.3]
    pg, ratio, low, high = reference.clipped_surrogate(r.log(), adv, 0.2, 0.3)
    torch.testing.assert_close(pg, torch.tensor([-1.3, 0.8, -1.1, 5.0, -0.7, 1.0], dtype=torch.float64))
    torch.testing.assert_close(ratio, r)
    assert low.tolist() == [False, True, False, False, False, False]
    assert high.tolist() == [True, False, False, False, False, False]
    # Dual clip 3 caps the negative-advantage loss at -A * 3.
    pg, *_ = reference.clipped_surrogate(r.log(), adv, 0.2, 0.3, dual_clip=3.0)
    torch.testing.assert_close(pg, torch.tensor([-1.3, 0.8, -1.1, 3.0, -0.7, 1.0], dtype=torch.float64))
    weights = torch.tensor([1.0, 2.0, 1.0, 0.5, 1.0, 1.0], dtype=torch.float64)
    pg, *_ = reference.clipped_surrogate(r.log(), adv, 0.2, 0.3, dual_clip=3.0, is_weights=weights)
    torch.testing.assert_close(pg, torch.tensor([-1.3, 1.6, -1.1, 1.5, -0.7, 1.0], dtype=torch.float64))


def test_kl_estimators_by_hand() -> None:
    logp = torch.tensor([-1.0, -2.0, -0.5, 0.0, -40.0], dtype=torch.float64)
    ref = torch.tensor([-1.5, -1.0, -0.5, -30.0, -10.0], dtype=torch.float64)  # d = ref - logp
    torch.testing.assert_close(reference.kl_penalty(logp, ref, "k1"),
                               torch.tensor([0.5, -1.0, 0.0, 30.0, -30.0], dtype=torch.float64))
    torch.testing.assert_close(reference.kl_penalty(logp, ref, "k2"),
                               torch.tensor([0.125, 0.5, 0.0, 450.0, 450.0], dtype=torch.float64))
    k3 = [math.exp(-0.5) + 0.5 - 1, math.e - 2, 0.0, 10.0, 10.0]  # |d| = 30 clamps to 20, then to 10
    torch.testing.assert_close(reference.kl_penalty(logp, ref, "k3"), torch.tensor(k3, dtype=torch.float64))
    torch.testing.assert_close(reference.kl_penalty(logp, ref, "abs"),
                               torch.tensor([0.5, 1.0, 0.0, 30.0, 30.0], dtype=torch.float64))
    # Straight through: the base's value, k2's gradient d k2 / d logp = logp - ref.
    for name, value in (("k1+", [0.5, -1.0, 0.0, 30.0, -30.0]), ("k3+", k3), ("abs+", [0.5, 1.0, 0.0, 30.0, 30.0])):
        x = logp.clone().requires_grad_(True)
        kl = reference.kl_penalty(x, ref, name)
        kl.sum().backward()
        torch.testing.assert_close(kl.detach(), torch.tensor(value, dtype=torch.float64))
        torch.testing.assert_close(x.grad, torch.tensor([0.5, -1.0, 0.0, 30.0, -30.0], dtype=torch.float64))
    with pytest.raises(ValueError, match="kl_estimator"):
        reference.kl_penalty(logp, ref, "k4")


def test_aggregation_by_hand() -> None:
    per_token = torch.tensor([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0], [7.0, 8.0, float("inf")]], dtype=torch.float64)
    mask = torch.tensor([[1, 1, 0], [1, 0, 0], [0, 0, 0]], dtype=torch.bool)
    cases = {
        "token-mean": (1 + 2 + 4) / 3,
        "seq-mean-token-mean": ((1 + 2) / 2 + 4 / 1) / 2,  # the fully masked row is excluded
        "seq-mean-token-sum": (3 + 4 + 0) / 3,
        "seq-mean-token-sum-norm": 7 / (3 * 3),
    }
    for agg, expected in cases.items():
        assert reference.aggregate(per_token, mask, agg).item() == pytest.approx(expected, abs=1e-15), agg
    assert reference.aggregate(per_token, mask, "seq-mean-token-sum-norm", norm_len=5).item() == pytest.approx(7 / 15)
    with pytest.raises(ValueError, match="loss_agg"):
        reference.aggregate(per_token, mask, "mean")


@pytest.mark.parametrize("agg", reference.LOSS_AGGS)
def test_empty_mask_gives_zero_loss_and_zero_grad(agg: str) -> None:
    per_token = torch.randn(3, 4, dtype=torch.float64, requires_grad=True)
    loss = reference.aggregate(per_token, torch.zeros(3, 4, dtype=torch.bool), agg)
    loss.backward()
    assert loss.item() == 0.0 and torch.equal(per_token.grad, torch.zeros(3, 4, dtype=torch.float64))


def _inputs(seed: int = 0, batch: int = 3, time: int = 5, vocab: int = 17):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(batch, time, vocab, generator=g, dtype=torch.float64)
    tokens = torch.randint(0, vocab, (batch, time), generator=g)
    adv = torch.randn(batch, time, generator=g, dtype=torch.float64)
    mask = torch.rand(batch, time, generator=g) > 0.3
    return logits, tokens, adv, mask


@pytest.mark.parametrize("agg", reference.LOSS_AGGS)
def test_on_policy_loss_is_the_policy_gradient(agg: str) -> None:
    # old_logprobs=None: r = 1 with d r / d logp = 1, so pg = -A and its gradient is -A * grad logp.
    logits, tokens, adv, mask = _inputs()
    x1, x2 = logits.clone().requires_grad_(True), logits.clone().requires_grad_(True)
    out = reference.policy_loss(x1, tokens, adv, mask=mask, loss_agg=agg)
    logp = reference.token_logprobs(x2, tokens)
    pg_loss = reference.aggregate(-adv * logp, mask, agg)
    assert torch.equal(out.ratio, torch.ones_like(out.ratio))
    torch.testing.assert_close(out.pg, -adv)
    out.loss.backward()
    pg_loss.backward()
    torch.testing.assert_close(x1.grad, x2.grad, rtol=0, atol=1e-12)


def test_sequence_level_ratio_by_hand() -> None:
    logits, tokens, adv, mask = _inputs(seed=3)
    logp = reference.token_logprobs(logits, tokens)
    old = logp + torch.randn_like(logp) * 0.3
    old[0] = logp[0] - 30.0  # a mean log-ratio of 30 clamps to 10
    out = reference.policy_loss(logits, tokens, adv[:, 0], mask=mask, old_logprobs=old, ratio_level="sequence")
    for i in range(logits.shape[0]):
        valid = [t for t in range(logits.shape[1]) if mask[i, t]]
        mean = sum((logp[i, t] - old[i, t]).item() for t in valid) / max(len(valid), 1)
        assert out.ratio[i].tolist() == pytest.approx([math.exp(min(mean, 10.0))] * logits.shape[1])


def test_token_ratio_is_clamped() -> None:
    logp = torch.tensor([[-1.0, -1.0, -1.0]], dtype=torch.float64)
    old = torch.tensor([[-40.0, -1.5, 30.0]], dtype=torch.float64)
    log_r = reference.log_ratio(logp, old, torch.ones(1, 3, dtype=torch.bool))
    torch.testing.assert_close(log_r, torch.tensor([[20.0, 0.5, -20.0]], dtype=torch.float64))


def test_policy_loss_sums_its_terms() -> None:
    logits, tokens, adv, mask = _inputs(seed=5)
    ref_logits = logits + 0.3 * torch.randn_like(logits)
    ref_logp = reference.token_logprobs(ref_logits, tokens)
    old = reference.token_logprobs(logits, tokens) + 0.1
    for est in reference.KL_ESTIMATORS:
        out = reference.policy_loss(logits, tokens, adv, mask=mask, old_logprobs=old, ref_logprobs=ref_logp,
                                    ref_logits=ref_logits, kl_coef=0.05, kl_estimator=est, entropy_coef=0.01)
        kl = (reference.token_stats_with_kl(logits, tokens, ref_logits)[2] if est == "full"
              else reference.kl_penalty(out.logprobs, ref_logp, est))
        torch.testing.assert_close(out.kl, kl)
        torch.testing.assert_close(out.per_token_loss, out.pg + 0.05 * kl - 0.01 * out.entropy)
    off = reference.policy_loss(logits, tokens, adv, mask=mask)
    assert not off.kl.any()  # kl_coef = 0: no KL work, no reference input needed
