"""The fused-linear policy loss at real sizes on CUDA (skipped without a GPU)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from helpers import assert_grad_close, assert_values_close, float32_tol

import rlops
from rlops import baselines, reference

pytestmark = pytest.mark.gpu

QWEN_VOCAB, HIDDEN = 151_936, 4096
OPTIONS = {"kl_coef": 0.04, "kl_estimator": "k3", "clip_high": 0.28, "entropy_coef": 0.01}


def _inputs(n_rows: int, time: int, vocab: int = QWEN_VOCAB, hidden: int = HIDDEN) -> dict[str, torch.Tensor]:
    g = torch.Generator(device="cuda").manual_seed(0)
    h = torch.randn(n_rows, time, hidden, generator=g, device="cuda").to(torch.bfloat16)
    w = (torch.randn(vocab, hidden, generator=g, device="cuda") * 2 / hidden**0.5).to(torch.bfloat16)
    tokens = torch.randint(0, vocab, (n_rows, time), generator=g, device="cuda")
    logp = rlops.token_logprobs(F.linear(h, w), tokens)
    return {
        "hidden": h, "weight": w, "tokens": tokens, "advantages": torch.randn(n_rows, generator=g, device="cuda"),
        "mask": torch.rand(n_rows, time, generator=g, device="cuda") > 0.2,
        "old_logprobs": logp + 0.3 * torch.randn(n_rows, time, generator=g, device="cuda"),
        "ref_logprobs": logp + 0.3 * torch.randn(n_rows, time, generator=g, device="cuda"),
    }


def _grads(fn, batch, cast=None):
    kw = {k: batch[k] if cast is None or not batch[k].is_floating_point() else batch[k].to(cast)
          for k in ("mask", "old_logprobs", "ref_logprobs")}
    leaves = [(batch[k] if cast is None else batch[k].to(cast)).detach().requires_grad_(True)
              for k in ("hidden", "weight")]
    adv = batch["advantages"] if cast is None else batch["advantages"].to(cast)
    out = fn(*leaves, batch["tokens"], adv, **kw)
    loss = out if isinstance(out, torch.Tensor) else out.loss
    return out, torch.autograd.grad(loss * 0.7, leaves)


def test_qwen_head_bf16_matches_reference(gpu_backend: str) -> None:
    batch = _inputs(2, 1024)
    out, grads = _grads(lambda h, w, *a, **k: rlops.linear_policy_loss(h, w, *a, **k, **OPTIONS, backend=gpu_backend),
                        batch)
    on_logits, _ = _grads(lambda h, w, *a, **k: rlops.policy_loss(F.linear(h, w), *a, **k, **OPTIONS), batch)
    _, ref_grads = _grads(lambda h, w, *a, **k: reference.policy_loss(F.linear(h, w), *a, **k, **OPTIONS), batch,
                          cast=torch.float64)
    _, eager_grads = _grads(lambda h, w, *a, **k: baselines.eager_policy_loss(F.linear(h, w), *a, **k, **OPTIONS),
                            batch)
    assert_values_close(out.loss, on_logits.loss, float32_tol(on_logits.logprobs), "loss")
    for got, want, eager in zip(grads, ref_grads, eager_grads, strict=True):
        assert_grad_close(got, want, eager)


def test_memory_is_flat_in_tokens(gpu_backend: str) -> None:
    peaks = {}
    for time in (512, 2048):  # N = 4096 and 16384
        batch = _inputs(8, time)
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        _grads(lambda h, w, *a, **k: rlops.linear_policy_loss(h, w, *a, **k, **OPTIONS, backend=gpu_backend), batch)
        torch.cuda.synchronize()
        hidden_bytes = batch["hidden"].numel() * batch["hidden"].element_size()
        # Above the inputs: the hidden gradient (proportional to N, like the hidden states) and
        # everything else, which must not grow with N.
        peaks[time] = torch.cuda.max_memory_allocated() - before - hidden_bytes
        del batch
    logits_bytes_16k = 8 * 2048 * QWEN_VOCAB * 2
    assert peaks[2048] - peaks[512] <= 0.01 * logits_bytes_16k, peaks
