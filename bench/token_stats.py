"""token_stats: the log-prob of each sampled token and the entropy, forward and backward.

Minimum traffic, as the kernels' docstrings state: the forward reads the N*V logits once;
the backward reads them again and writes the N*V gradient; per-row scalars are negligible.
fwd+bwd is therefore 3 passes over the logits.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from rlops import baselines, token_logprobs_and_entropy

from .common import Skip, compiled_provider, rlops_cuda

OP = "token_stats"
SHAPES = [(n, v) for n in (4096, 16384, 65536) for v in (32000, 128256, 151936, 248320)]
DEFAULT_SHAPES = [(16384, 151936)]
QUICK_SHAPES = [(64, 1000)]
BATCH = 8  # rows of the (B, T, V) logits; TRL's eager code loops over them


def bytes_moved(n: int, v: int, elem: int) -> dict[str, int]:
    return {"fwd": n * v * elem, "bwd": 2 * n * v * elem, "fwd_bwd": 3 * n * v * elem}


def setup(n: int, v: int, dtype: torch.dtype, device: torch.device) -> dict[str, torch.Tensor]:
    batch = BATCH if n % BATCH == 0 else 1
    g = torch.Generator(device=device).manual_seed(0)
    logits = (torch.randn(batch, n // batch, v, generator=g, device=device) * 3).to(dtype)
    tokens = torch.randint(0, v, (batch, n // batch), generator=g, device=device)
    return {"logits": logits, "tokens": tokens}


def _trl_style(logits: torch.Tensor, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    return baselines.eager_token_stats(logits, tokens, style="trl")


def _trl_triton(logits: torch.Tensor, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    try:
        from trl.kernels.logprob_entropy import selective_log_softmax_and_entropy
    except ImportError as e:
        raise Skip(f"TRL's fused kernel is not importable ({e})") from e
    if not logits.is_cuda:
        raise Skip("TRL's fused kernel runs on CUDA only")
    return selective_log_softmax_and_entropy(logits, tokens)


def _flash_attn(logits: torch.Tensor, tokens: torch.Tensor) -> tuple[torch.Tensor, None]:
    """flash-attn's Triton cross-entropy: log-probs only (it has no entropy), so less work."""
    try:
        from flash_attn.ops.triton.cross_entropy import cross_entropy_loss
    except ImportError as e:
        raise Skip(f"flash-attn's Triton cross-entropy is not importable ({e})") from e
    if not logits.is_cuda:
        raise Skip("flash-attn runs on CUDA only")
    losses, _ = cross_entropy_loss(logits.reshape(-1, logits.shape[-1]), tokens.reshape(-1))
    return -losses.view(tokens.shape), None


PROVIDERS: dict[str, Callable[[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor | None]]] = {
    "eager-trl": _trl_style,
    "eager-verl": lambda x, t: baselines.eager_token_stats(x, t, style="verl"),
    "torch-compile": compiled_provider(_trl_style),
    "trl-triton": _trl_triton,
    "flash-attn": _flash_attn,
    "rlops-triton": lambda x, t: token_logprobs_and_entropy(x, t, backend="triton"),
    "rlops-cuda": rlops_cuda(lambda x, t: token_logprobs_and_entropy(x, t, backend="cuda")),
}


def grad_bytes(provider: str, inputs: dict[str, torch.Tensor]) -> int:
    """The gradient buffer every provider returns (none writes over the logits)."""
    return inputs["logits"].numel() * inputs["logits"].element_size()


def make_step(provider: str, inputs: dict[str, torch.Tensor]) -> tuple[Callable, Callable]:
    """(forward, forward+backward) closures for one provider on one set of inputs."""
    fn = PROVIDERS[provider]
    logits = inputs["logits"].requires_grad_(True)
    tokens = inputs["tokens"]
    g = torch.Generator(device=logits.device).manual_seed(1)
    w_logp = torch.randn(tokens.shape, generator=g, device=logits.device)
    w_ent = torch.randn(tokens.shape, generator=g, device=logits.device)

    def forward() -> torch.Tensor:
        logp, ent = fn(logits, tokens)
        loss = (logp.float() * w_logp).sum()
        return loss if ent is None else loss + (ent.float() * w_ent).sum()

    def forward_backward() -> torch.Tensor:
        return torch.autograd.grad(forward(), logits)[0]

    return forward, forward_backward
