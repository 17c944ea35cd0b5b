"""The policy loss's extra memory beside the logits' bytes, on a CPU machine.

Issue 16's target: a fused forward+backward allocates at most 1% of the logits' bytes besides
the gradient (nothing at all in place of it with inplace_grad). tests/test_policy_loss_gpu.py
measures it with CUDA's counters on a GPU. Here it is held in CI: Triton kernels allocate
nothing, so with their launches stubbed (rlops.bench.host_overhead.stubbed_launches) every
allocation a GPU call makes is made by rlops' own host code, on the tensors' device, which
rlops.profile.AllocationTracker counts. Qwen's vocabulary (151,936), bf16, 2 x 48 tokens with
padding: per token, the logits are 304 KB and the per-token outputs 36 bytes.

The tracker sees vocabulary-sized temporaries: the PyTorch backend, which builds float32
(N, V) copies, is measured on the same input and must exceed the bound.
"""

from __future__ import annotations

import importlib

import pytest
import torch

import rlops
from rlops.bench.host_overhead import RLOPS_KERNEL_MODULES, stubbed_launches
from rlops.profile import AllocationTracker

B, T, V = 2, 48, 151936


def _batch(causal_lm: bool, exact_kl: bool) -> tuple[torch.Tensor, dict[str, torch.Tensor | float | str]]:
    """(logits, the other arguments): logits an lm_head's output (not a leaf), (B, T + 1, V) for a
    causal LM's; the exact KL reads ref_logits (B, T, V), the sampled-token k3 ref_logprobs."""
    g = torch.Generator().manual_seed(0)
    base = torch.randn(B, T + causal_lm, V, generator=g).to(torch.bfloat16).requires_grad_(True)
    tokens = torch.randint(0, V, (B, T), generator=g)
    old = -torch.rand(B, T, generator=g) * 12
    kwargs = {"mask": torch.arange(T) < torch.tensor([[T], [T // 2]]), "old_logprobs": old, "kl_coef": 0.04,
              "clip_high": 0.28, "tokens": tokens, "advantages": torch.randn(B, generator=g)}
    if exact_kl:
        kwargs.update(kl_estimator="full", ref_logits=torch.randn(B, T, V, generator=g).to(torch.bfloat16))
    else:
        kwargs.update(kl_estimator="k3", ref_logprobs=old - 0.1)
    return base * 1.0, kwargs


def _extra_bytes(backend: str, inplace: bool, causal_lm: bool, exact_kl: bool) -> tuple[int, int]:
    """(peak bytes allocated by one forward+backward beyond the gradient's, the logits' bytes)."""
    logits, kwargs = _batch(causal_lm, exact_kl)
    logits_bytes = logits.numel() * logits.element_size()
    tokens, advantages = kwargs.pop("tokens"), kwargs.pop("advantages")
    modules = tuple(importlib.import_module(m) for m in RLOPS_KERNEL_MODULES)
    with stubbed_launches(modules), AllocationTracker() as tracker:
        out = rlops.policy_loss(logits, tokens, advantages, inplace_grad=inplace, backend=backend, **kwargs)
        (grad,) = torch.autograd.grad(out.loss, logits)
    assert grad.shape == logits.shape and (grad.data_ptr() == logits.data_ptr()) == inplace
    return tracker.peak - (0 if inplace else logits_bytes), logits_bytes


@pytest.mark.parametrize("exact_kl", [False, True], ids=["k3", "exact-kl"])
@pytest.mark.parametrize("causal_lm", [False, True], ids=["bt", "causal-lm"])
@pytest.mark.parametrize("inplace", [False, True], ids=["grad", "inplace"])
def test_extra_memory_under_one_percent_of_logits(inplace: bool, causal_lm: bool, exact_kl: bool) -> None:
    extra, logits_bytes = _extra_bytes("triton", inplace, causal_lm, exact_kl)
    assert 0 < extra <= 0.01 * logits_bytes, f"extra peak {extra} bytes > 1% of the logits' {logits_bytes}"


def test_the_tracker_sees_vocabulary_sized_temporaries() -> None:
    extra, logits_bytes = _extra_bytes("torch", False, False, False)
    assert extra > logits_bytes, (extra, logits_bytes)  # at least one float32 (N, V) copy
