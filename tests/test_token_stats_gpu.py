"""Token statistics at real sizes on CUDA (skipped without a GPU).

The float64 oracle runs on the GPU too, unchunked: at these sizes it fits an 80 GB device.
"""

from __future__ import annotations

import pytest
import torch
from helpers import FP32_TOL, assert_grad_close, assert_values_close

import rlops
from rlops import baselines, reference

pytestmark = pytest.mark.gpu

QWEN_VOCAB = 151_936


def _inputs(shape: tuple[int, ...], dtype: torch.dtype, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator(device="cuda").manual_seed(seed)
    logits = (torch.randn(shape, generator=g, device="cuda") * 4).to(dtype)
    tokens = torch.randint(0, shape[-1], shape[:-1], generator=g, device="cuda")
    return logits, tokens


def _value_and_grad(fn, logits: torch.Tensor, tokens: torch.Tensor, w: torch.Tensor, cast=None):
    """w (2, ...) weighs logp and entropy in the loss whose gradient is taken."""
    x = (logits if cast is None else logits.to(cast)).detach().requires_grad_(True)
    logp, ent = fn(x, tokens)
    # The loss is formed in float32 (float64 for the oracle) whatever the outputs' dtype, so that
    # rounding the weights does not inflate eager's error, the yardstick of half precision.
    acc = torch.promote_types(logp.dtype, torch.float32)
    w = w.to(acc)
    (grad,) = torch.autograd.grad((logp.to(acc) * w[0]).sum() + (ent.to(acc) * w[1]).sum(), x)
    return logp.detach(), ent.detach(), grad


def _compare(logits: torch.Tensor, tokens: torch.Tensor, gpu_backend: str) -> None:
    w = torch.randn((2, *tokens.shape), device="cuda")
    logp, ent, grad = _value_and_grad(
        lambda x, t: rlops.token_logprobs_and_entropy(x, t, backend=gpu_backend), logits, tokens, w)
    r_logp, r_ent, r_grad = _value_and_grad(
        reference.token_logprobs_and_entropy, logits, tokens, w, cast=torch.float64)
    assert_values_close(logp, r_logp, FP32_TOL, "logp")
    assert_values_close(ent, r_ent, FP32_TOL, "entropy")
    eager = None
    if logits.dtype in (torch.bfloat16, torch.float16):
        _, _, eager = _value_and_grad(lambda x, t: baselines.eager_token_stats(x, t), logits, tokens, w)
    assert_grad_close(grad, r_grad, eager)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_qwen_vocabulary(dtype: torch.dtype, gpu_backend: str) -> None:
    _compare(*_inputs((4, 512, QWEN_VOCAB), dtype), gpu_backend)


def test_vocabulary_beyond_grid_limit(gpu_backend: str) -> None:
    _compare(*_inputs((64, 2 * 65_536 + 17), torch.float32), gpu_backend)


def test_causal_shift_view_at_real_size(gpu_backend: str) -> None:
    logits, tokens = _inputs((2, 1025, QWEN_VOCAB), torch.bfloat16)
    _compare(logits[:, :-1], tokens[:, 1:], gpu_backend)


def test_more_than_2_pow_31_elements(gpu_backend: str) -> None:
    # 16384 x 151936 = 2.49e9 elements: row offsets past 2**31 must not wrap around.
    logits, tokens = _inputs((8, 2048, QWEN_VOCAB), torch.bfloat16)
    assert logits.numel() > 2**31
    w = torch.randn((2, *tokens.shape), device="cuda")
    logp, ent, grad = _value_and_grad(
        lambda x, t: rlops.token_logprobs_and_entropy(x, t, backend=gpu_backend), logits, tokens, w)
    # Rows are independent: compare the first and the last rows (past 2**31) with the reference.
    for rows in (slice(0, 1), slice(-1, None)):
        sub_logits, sub_tokens, sub_w = logits[rows, -64:], tokens[rows, -64:], w[:, rows, -64:]
        r_logp, r_ent, r_grad = _value_and_grad(
            reference.token_logprobs_and_entropy, sub_logits, sub_tokens, sub_w, cast=torch.float64)
        _, _, eager = _value_and_grad(lambda x, t: baselines.eager_token_stats(x, t), sub_logits, sub_tokens, sub_w)
        assert_values_close(logp[rows, -64:], r_logp, FP32_TOL, "logp")
        assert_values_close(ent[rows, -64:], r_ent, FP32_TOL, "entropy")
        assert_grad_close(grad[rows, -64:], r_grad, eager)


def test_auto_picks_triton_on_cuda() -> None:
    logits, tokens = _inputs((2, 8, 1000), torch.float32)
    logp, _ = rlops.token_logprobs_and_entropy(logits.requires_grad_(True), tokens)
    assert "rlops_token_stats_fwd" in type(logp.grad_fn).__name__
