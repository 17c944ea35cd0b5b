"""Backend choice for every op: "auto" | "triton" | "cuda" | "torch".

"auto" runs the Triton kernels on CUDA tensors and the chunked PyTorch reference on CPU
tensors. "triton" on CPU tensors runs the same kernels in Triton's interpreter, which needs
TRITON_INTERPRET=1 in the environment before triton is first imported.
"""

from __future__ import annotations

import importlib.util

import torch

from .._validation import check_choice

BACKENDS = ("auto", "triton", "cuda", "torch")


# find_spec locates the package without importing it (importing rlops stays light).
TRITON_AVAILABLE = importlib.util.find_spec("triton") is not None


def cuda_backend_unavailable() -> str | None:
    """Why backend="cuda" cannot run here, or None when it can."""
    return ("backend='cuda' needs the rlops._C extension built from csrc/, which this version "
            "does not provide yet; use backend='triton' (or 'auto')")


def resolve_backend(backend: str, x: torch.Tensor) -> str:
    """The concrete backend ("triton" or "torch") that runs an op on tensors like x."""
    check_choice("backend", backend, BACKENDS)
    if backend == "auto":
        return "triton" if x.is_cuda and TRITON_AVAILABLE else "torch"
    if backend == "cuda":
        reason = cuda_backend_unavailable()
        if reason is not None:
            raise NotImplementedError(reason)
    if backend == "triton":
        if not TRITON_AVAILABLE:
            raise RuntimeError("backend='triton' needs the triton package (Linux only): pip install triton")
        if not x.is_cuda:
            from .. import kernels

            if x.device.type != "cpu" or not kernels.INTERPRETED:
                raise RuntimeError(
                    f"backend='triton' got {x.device.type} tensors; it runs on CUDA tensors, or on CPU "
                    "tensors in Triton's interpreter when TRITON_INTERPRET=1 is set before triton is imported"
                )
    return backend
