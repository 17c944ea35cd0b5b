"""The fused policy loss at real sizes on CUDA (skipped without a GPU)."""

from __future__ import annotations

import pytest
import torch
from helpers import assert_grad_close, assert_values_close, float32_tol

import rlops
from rlops import baselines, reference

pytestmark = pytest.mark.gpu

QWEN_VOCAB = 151_936
OPTIONS = {
    "k3": {"clip_high": 0.28, "dual_clip": 3.0, "kl_coef": 0.04, "kl_estimator": "k3", "entropy_coef": 0.01},
    "full": {"kl_coef": 0.1, "kl_estimator": "full", "loss_agg": "seq-mean-token-mean", "temperature": 0.9},
    "gspo": {"ratio_level": "sequence", "clip_low": 3e-4, "clip_high": 4e-4, "loss_agg": "seq-mean-token-mean"},
}


def _inputs(rows: int, time: int, vocab: int, dtype: torch.dtype = torch.bfloat16) -> dict[str, torch.Tensor]:
    g = torch.Generator(device="cuda").manual_seed(0)
    logits = (torch.randn(rows, time, vocab, generator=g, device="cuda") * 3).to(dtype)
    tokens = torch.randint(0, vocab, (rows, time), generator=g, device="cuda")
    logp = rlops.token_logprobs(logits, tokens)
    lengths = torch.randint(time // 2, time + 1, (rows, 1), generator=g, device="cuda")
    return {
        "logits": logits,
        "tokens": tokens,
        "advantages": torch.randn(rows, generator=g, device="cuda"),
        "mask": torch.arange(time, device="cuda") < lengths,  # right-padded completions
        "old_logprobs": logp + 0.3 * torch.randn(rows, time, generator=g, device="cuda"),
        "ref_logprobs": logp + 0.3 * torch.randn(rows, time, generator=g, device="cuda"),
        "ref_logits": (logits.float() + 0.5 * torch.randn(logits.shape, generator=g, device="cuda")).to(dtype),
    }


def _loss_and_grad(fn, batch, options, cast=None):
    kw = {k: v for k, v in batch.items() if k not in ("logits", "tokens", "advantages")}
    adv = batch["advantages"]
    if cast is not None:
        kw = {k: v.to(cast) if v.is_floating_point() else v for k, v in kw.items()}
        adv = adv.to(cast)
    x = (batch["logits"] if cast is None else batch["logits"].to(cast)).detach().requires_grad_(True)
    out = fn(x, batch["tokens"], adv, **kw, **options)
    loss = out if isinstance(out, torch.Tensor) else out.loss
    (grad,) = torch.autograd.grad(loss * 0.7, x)
    return out, grad


@pytest.mark.parametrize("case", list(OPTIONS))
def test_qwen_vocabulary_bf16(case: str, gpu_backend: str) -> None:
    batch = _inputs(4, 1024, QWEN_VOCAB)
    out, grad = _loss_and_grad(lambda *a, **k: rlops.policy_loss(*a, backend=gpu_backend, **k), batch, OPTIONS[case])
    ref, ref_grad = _loss_and_grad(reference.policy_loss, batch, OPTIONS[case], cast=torch.float64)
    _, eager = _loss_and_grad(baselines.eager_policy_loss, batch, OPTIONS[case])
    mask = batch["mask"]
    assert_values_close(out.loss, ref.loss, float32_tol(ref.per_token_loss), "loss")
    for name in ("logprobs", "entropy", "kl", "ratio"):
        want = getattr(ref, name)[mask]
        assert_values_close(getattr(out, name)[mask], want, float32_tol(want), name)
    assert_grad_close(grad, ref_grad, eager)


def test_more_than_2_pow_31_logits(gpu_backend: str) -> None:
    # 16384 x 151936 logits. With seq-mean-token-sum every row's loss is its own sum / B, so the
    # first and last rows (past 2**31 elements) can be checked against a reference of those rows.
    batch = _inputs(8, 2048, QWEN_VOCAB)
    assert batch["logits"].numel() > 2**31
    options = {"kl_coef": 0.04, "kl_estimator": "k3", "entropy_coef": 0.01, "loss_agg": "seq-mean-token-sum"}
    out, grad = _loss_and_grad(lambda *a, **k: rlops.policy_loss(*a, backend=gpu_backend, **k), batch, options)
    for row in (0, 7):
        sub = {k: v[row:row + 1] for k, v in batch.items()}
        leaf = sub["logits"].double().requires_grad_(True)
        ref = reference.policy_loss(leaf, sub["tokens"], sub["advantages"].double(), mask=sub["mask"],
                                    old_logprobs=sub["old_logprobs"].double(),
                                    ref_logprobs=sub["ref_logprobs"].double(), **options)
        row_loss = torch.where(sub["mask"], ref.per_token_loss, 0.0).sum() / 8
        (ref_grad,) = torch.autograd.grad(row_loss * 0.7, leaf)
        mask = sub["mask"][0]
        want = ref.logprobs[0][mask]
        assert_values_close(out.logprobs[row][mask], want, float32_tol(want), "logprobs")
        eager_leaf = sub["logits"].detach().requires_grad_(True)
        # seq-mean-token-sum of one row is that row's sum: its share of the batch's loss is / 8.
        eager_loss = baselines.eager_policy_loss(eager_leaf, sub["tokens"], sub["advantages"], mask=sub["mask"],
                                                 old_logprobs=sub["old_logprobs"],
                                                 ref_logprobs=sub["ref_logprobs"], **options) / 8
        (eager_grad,) = torch.autograd.grad(eager_loss * 0.7, eager_leaf)
        assert_grad_close(grad[row:row + 1], ref_grad, eager_grad)


@pytest.mark.parametrize("causal_lm", [False, True])
@pytest.mark.parametrize("inplace", [False, True])
def test_extra_memory_under_one_percent_of_logits(inplace: bool, causal_lm: bool, gpu_backend: str) -> None:
    batch = _inputs(8, 2048, QWEN_VOCAB)
    base = batch.pop("logits")
    if causal_lm:  # a causal LM's (B, T + 1, V) logits, taken whole: no slice copies the gradient
        base = torch.cat([base, base[:, :1]], dim=1)
    base.requires_grad_(True)
    logits = base * 1.0  # an lm_head output: not a leaf
    logits_bytes = logits.numel() * logits.element_size()
    kw = {k: v for k, v in batch.items() if k not in ("tokens", "advantages", "ref_logits")}
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    out = rlops.policy_loss(logits, batch["tokens"], batch["advantages"], kl_coef=0.04, inplace_grad=inplace,
                            backend=gpu_backend, **kw)
    (grad,) = torch.autograd.grad(out.loss, logits)
    torch.cuda.synchronize()
    extra = torch.cuda.max_memory_allocated() - before - (0 if inplace else logits_bytes)
    assert extra <= 0.01 * logits_bytes, f"extra peak {extra / 1e9:.3f} GB > 1% of {logits_bytes / 1e9:.2f} GB"
    if inplace:
        assert grad.data_ptr() == logits.data_ptr()
    if causal_lm:
        assert not grad[:, -1].any()
