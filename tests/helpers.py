"""Shared test helpers: the device the kernels run on and the tolerances of SPEC.md section 6."""

from __future__ import annotations

import contextlib
import os
import socket
from collections.abc import Iterator

import numpy as np
import torch

# On a GPU machine the kernels run compiled on CUDA; elsewhere in Triton's interpreter on CPU.
DEVICE = torch.device(
    "cuda" if torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1" else "cpu"
)

FP32_TOL = 1e-5


def float32_tol(expected: torch.Tensor) -> float:
    """SPEC's 1e-5 plus 4 float32 ulps of the largest expected magnitude.

    The SPEC bound assumes ordinary logit scales; a float32 output of magnitude above ~128
    cannot itself be closer than 1e-5 to the float64 value, so extreme-scale tests add the
    output's own rounding.
    """
    scale = expected.abs().max().item() if expected.numel() else 0.0
    return FP32_TOL + 4 * 2.0**-23 * scale


def max_err(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """Largest absolute difference, computed in float64; NaN/inf anywhere counts as infinite."""
    assert actual.shape == expected.shape, (actual.shape, expected.shape)
    if actual.numel() == 0:
        return 0.0
    diff = (actual.double() - expected.double()).abs()
    if not torch.isfinite(diff).all():
        return float("inf")
    return diff.max().item()


def assert_values_close(actual: torch.Tensor, expected: torch.Tensor, tol: float = FP32_TOL,
                        what: str = "value") -> None:
    err = max_err(actual, expected)
    assert err <= tol, f"{what}: max abs error {err:.3g} > {tol:.3g}"


def assert_grad_close(actual: torch.Tensor, expected: torch.Tensor, eager: torch.Tensor | None = None,
                      what: str = "grad") -> None:
    """SPEC section 6: float32 grads within 1e-5 * max|grad|; half-precision grads within twice
    the error of eager PyTorch on the same input (`eager`), plus 1e-6."""
    err = max_err(actual, expected)
    if actual.dtype in (torch.float32, torch.float64):
        scale = expected.abs().max().item() if expected.numel() else 0.0
        tol = FP32_TOL * max(scale, 1e-30)
    else:
        assert eager is not None, "half-precision gradients are judged against eager PyTorch's error"
        tol = 2 * max_err(eager, expected) + 1e-6
    assert err <= tol, f"{what}: max abs error {err:.3g} > {tol:.3g}"


def free_port() -> int:
    """A TCP port free on this machine now, for a torchrun rendezvous (a random pick could collide
    with another test's, under a seeded `random`, or with a parallel worker's)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def rows_read(x: torch.Tensor) -> Iterator[set[int]]:
    """Under Triton's interpreter: the rows of x (..., V), contiguous, from which the kernels
    launched inside the block load anything, as row indices of x.reshape(-1, V), filled in when
    the block exits. It records every interpreted load (both Triton 3.6's and 3.9's interpreters
    load through their module's `_interpreter.load(pointers, mask, other, dtype)`)."""
    import triton.runtime.interpreter as interpreter

    assert x.is_contiguous(), "rows_read maps addresses to rows of a contiguous tensor"
    real, addresses = interpreter._interpreter, []

    class Recording:
        def __getattr__(self, name: str) -> object:
            return getattr(real, name)

        def load(self, pointers: np.ndarray, mask: np.ndarray, other: np.ndarray, dtype: object) -> np.ndarray:
            addresses.append(np.asarray(pointers)[np.asarray(mask, dtype=bool)].astype(np.int64))
            return real.load(pointers, mask, other, dtype)

    rows: set[int] = set()
    interpreter._interpreter = Recording()
    try:
        yield rows
    finally:
        interpreter._interpreter = real
    start, size = x.data_ptr(), x.numel() * x.element_size()
    loaded = np.concatenate(addresses) if addresses else np.empty(0, dtype=np.int64)
    loaded = loaded[(loaded >= start) & (loaded < start + size)] - start
    rows.update(int(r) for r in np.unique(loaded // (x.shape[-1] * x.element_size())))
