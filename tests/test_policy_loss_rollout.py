"""rollout_correction inside the policy loss: the weights multiply pg and the rejected tokens leave
every count, on the Triton kernels, the PyTorch backend and the fused-linear op, padded and packed.

The expected loss is the float64 oracle (rlops.reference.policy_loss) given is_weights and a mask
computed here from the formulas of docs/rollout_correction.md, written out independently of
rlops.rollout_correction (whose own parity with verl and TRL is tests/test_rollout_correction.py).
"""

from __future__ import annotations

import math

import pytest
import torch
from helpers import DEVICE, assert_grad_close, assert_values_close, float32_tol
from test_policy_loss import _batch

import rlops
from rlops import reference
from rlops.rollout_correction import RolloutCorrection

CORRECTIONS = {
    "token-truncate": RolloutCorrection(level="token", mode="truncate", upper=1.5),
    "token-mask-k1-reject": RolloutCorrection(level="token", mode="mask", lower=0.6, upper=1.6,
                                              reject={"token_k1": 1.8}),
    "sequence-truncate-k3-reject": RolloutCorrection(level="sequence", mode="truncate", upper=3.0,
                                                     reject={"seq_mean_k3": 0.3}),
    "reject-only": RolloutCorrection(reject={"seq_max_k2": 1.0}),
}


def _expected(batch: dict[str, torch.Tensor], name: str) -> tuple[torch.Tensor | None, torch.Tensor]:
    """(is_weights, mask) of the correction, row by row in float64."""
    d = (batch["old_logprobs"].double() - batch["rollout_logprobs"].double()).clamp(-20, 20)
    mask = batch["mask"].clone()
    weights = torch.zeros_like(d)
    for i in range(d.shape[0]):
        m = mask[i].clone()
        if name.startswith("token"):
            r = d[i].exp()
            if name == "token-truncate":
                weights[i] = r.clamp(max=1.5)
            else:
                weights[i] = torch.where((r >= 0.6) & (r <= 1.6), r, torch.zeros_like(r))
                m &= (-d[i] >= -math.log(1.8)) & (-d[i] <= math.log(1.8))
        elif name.startswith("sequence"):
            weights[i] = min(math.exp(min(max(float(d[i][m].sum()), -20), 20)), 3.0)
            k3 = (d[i].exp() - 1 - d[i])[m]
            if k3.numel() and float(k3.mean()) > 0.3:
                m[:] = False
        else:
            k2 = (0.5 * d[i] ** 2)[m]
            if k2.numel() and float(k2.max()) > 1.0:
                m[:] = False
        mask[i] = m
    return (None if name == "reject-only" else torch.where(mask, weights, 0.0)), mask


def _grad(fn, batch: dict[str, torch.Tensor], **kwargs: object) -> tuple[torch.Tensor, torch.Tensor]:
    logits = batch["logits"].detach().clone().requires_grad_(True)
    out = fn(logits, batch["tokens"], batch["advantages"], old_logprobs=batch["old_logprobs"], **kwargs)
    (out.loss * 0.7).backward()
    return out, logits.grad


OPTIONS = {"clip_low": 0.2, "clip_high": 0.28, "kl_coef": 0.05, "entropy_coef": 0.01, "loss_agg": "seq-mean-token-mean"}


@pytest.mark.parametrize("backend", ["triton", "torch"])
@pytest.mark.parametrize("name", list(CORRECTIONS))
def test_correction_equals_its_weights_and_mask(name: str, backend: str) -> None:
    batch = _batch(seed=5)
    weights, mask = _expected(batch, name)
    assert 0 < int(mask.sum()) < int(batch["mask"].sum()) or name == "token-truncate"  # something rejected
    got, grad = _grad(lambda *a, **k: rlops.policy_loss(*a, backend=backend, **k), batch, mask=batch["mask"],
                      rollout_logprobs=batch["rollout_logprobs"], ref_logprobs=batch["ref_logprobs"],
                      rollout_correction=CORRECTIONS[name], **OPTIONS)
    want, want_grad = _grad(reference.policy_loss, {**batch, "logits": batch["logits"].double()}, mask=mask,
                            is_weights=weights, ref_logprobs=batch["ref_logprobs"], **OPTIONS)
    assert torch.equal(got.mask, mask)
    assert_values_close(got.loss, want.loss, float32_tol(want.per_token_loss), "loss")
    assert_grad_close(grad, want_grad)
    if weights is not None:
        assert_values_close(got.rollout.weights[mask], weights[mask].float(), 1e-5, "weights")
    assert math.isfinite(got.rollout.metrics["rollout_corr/kl"])


@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_packed_and_fused_linear_equal_padded(backend: str) -> None:
    """The same correction on the batch packed (cu_seqlens) and through linear_policy_loss."""
    batch = _batch(seed=5, vocab=64)
    correction = CORRECTIONS["sequence-truncate-k3-reject"]
    kwargs = {"rollout_logprobs": batch["rollout_logprobs"], "rollout_correction": correction, "backend": backend}
    padded = rlops.policy_loss(batch["logits"], batch["tokens"], batch["advantages"], mask=batch["mask"],
                               old_logprobs=batch["old_logprobs"], **kwargs)
    n, v = batch["tokens"].numel(), batch["logits"].shape[-1]
    cu = torch.arange(0, n + 1, batch["tokens"].shape[1], device=DEVICE)
    packed = rlops.policy_loss(batch["logits"].reshape(n, v), batch["tokens"].reshape(-1),
                               batch["advantages"].reshape(-1), mask=batch["mask"].reshape(-1),
                               old_logprobs=batch["old_logprobs"].reshape(-1), cu_seqlens=cu,
                               **{**kwargs, "rollout_logprobs": batch["rollout_logprobs"].reshape(-1)})
    linear = rlops.linear_policy_loss(batch["logits"], torch.eye(v, device=DEVICE), batch["tokens"],
                                      batch["advantages"], mask=batch["mask"], old_logprobs=batch["old_logprobs"],
                                      **kwargs)
    for other in (packed, linear):
        assert_values_close(other.loss, padded.loss, 1e-6, "loss")
        assert torch.equal(other.mask.reshape(batch["mask"].shape), padded.mask)


def test_bad_rollout_correction_calls_are_refused() -> None:
    batch = _batch()
    args = (batch["logits"], batch["tokens"], batch["advantages"])
    correction = CORRECTIONS["token-truncate"]
    with pytest.raises(ValueError, match="rollout_correction needs rollout_logprobs"):
        rlops.policy_loss(*args, old_logprobs=batch["old_logprobs"], rollout_correction=correction)
    with pytest.raises(ValueError, match="either is_weights"):
        rlops.policy_loss(*args, old_logprobs=batch["old_logprobs"], rollout_logprobs=batch["rollout_logprobs"],
                          is_weights=batch["is_weights"], rollout_correction=correction)
    with pytest.raises(TypeError, match=r"rollout_correction must be an rlops\.RolloutCorrection"):
        rlops.policy_loss(*args, rollout_correction={"level": "token"})
    with pytest.raises(ValueError, match="rollout_logprobs must have shape"):
        rlops.policy_loss(*args, old_logprobs=batch["old_logprobs"], rollout_logprobs=batch["rollout_logprobs"][:, :2],
                          rollout_correction=correction)


@pytest.mark.parametrize("objective", ["gmpo", "kl_cov"])
def test_compiled_whole_graph_with_coupled_objective_and_correction(objective: str) -> None:
    """torch.compile(fullgraph=True) holds the coupled epilogue and the rollout correction: the same
    loss and gradient as eager."""
    batch = _batch(seed=5, vocab=64)
    correction = CORRECTIONS["sequence-truncate-k3-reject"]

    def loss_fn(logits: torch.Tensor) -> torch.Tensor:
        return rlops.policy_loss(logits, batch["tokens"], batch["advantages"], mask=batch["mask"],
                                 old_logprobs=batch["old_logprobs"], rollout_logprobs=batch["rollout_logprobs"],
                                 rollout_correction=correction, objective=objective, off_policy_mask=0.1,
                                 cov_ratio=0.3, backend="triton").loss

    x = batch["logits"].clone().requires_grad_(True)
    got = torch.compile(loss_fn, backend="aot_eager", fullgraph=True)(x)
    (g,) = torch.autograd.grad(got, x)
    want = loss_fn(x)
    (w,) = torch.autograd.grad(want, x)
    assert torch.equal(got.detach(), want.detach()) and torch.equal(g, w)
