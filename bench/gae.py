"""gae: advantages and returns of a (B, T) batch, forward only (no gradient flows through GAE).

Minimum traffic: rewards and values (float32) and the mask (1 byte) read once, advantages
and returns (float32) written once: 17 bytes per token.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from rlops import baselines, gae

from .common import Skip, compiled_provider, rlops_cuda

OP = "gae"
SHAPE_KEYS = ("B", "T")
SHAPES = [(b, t) for b in (8, 512) for t in (1024, 8192, 32768)]
DEFAULT_SHAPES = SHAPES
QUICK_SHAPES = [(4, 64)]
DTYPE = torch.float32  # rewards and values; the --dtype of the vocabulary ops does not apply
GAMMA, LAM = 1.0, 0.95
COMPILE_MAX_T = 1024  # torch.compile unrolls the Python loop: one traced step per position


def bytes_moved(b: int, t: int, elem: int) -> dict[str, int]:
    return {"fwd": b * t * (2 * elem + 1 + 8)}


def setup(b: int, t: int, dtype: torch.dtype, device: torch.device) -> dict[str, torch.Tensor]:
    g = torch.Generator(device=device).manual_seed(0)
    lengths = torch.randint(t // 2, t + 1, (b, 1), generator=g, device=device)
    return {
        "rewards": torch.randn(b, t, generator=g, device=device, dtype=DTYPE),
        "values": torch.randn(b, t, generator=g, device=device, dtype=DTYPE),
        "mask": torch.arange(t, device=device) < lengths,  # right-padded responses
    }


def _loop(i: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    return baselines.verl_gae_loop(i["rewards"], i["values"], i["mask"], GAMMA, LAM)


_compiled_loop = compiled_provider(_loop)


def _torch_compile(i: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    if i["rewards"].shape[1] > COMPILE_MAX_T:
        raise Skip(f"compiling the loop unrolls one step per position; skipped beyond T={COMPILE_MAX_T}")
    return _compiled_loop(i)


PROVIDERS: dict[str, Callable[[dict[str, torch.Tensor]], tuple[torch.Tensor, torch.Tensor]]] = {
    "python-loop": _loop,
    "torch-compile": _torch_compile,
    "rlops-triton": lambda i: gae(i["rewards"], i["values"], i["mask"], gamma=GAMMA, lam=LAM, backend="triton"),
    "rlops-cuda": rlops_cuda(lambda i: gae(i["rewards"], i["values"], i["mask"], gamma=GAMMA, lam=LAM,
                                           backend="cuda")),
}


def grad_bytes(provider: str, inputs: dict[str, torch.Tensor]) -> int:
    return 0


def make_step(provider: str, inputs: dict[str, torch.Tensor]) -> tuple[Callable, None]:
    """(forward, None): GAE has no backward."""
    fn = PROVIDERS[provider]
    return (lambda: fn(inputs)), None
