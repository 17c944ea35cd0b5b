"""Backend choice for every op, in one place: "auto" | "triton" | "cuda" | "torch".

`resolve_backend` turns the caller's choice into a concrete backend; `launchers` gives the
kernel launchers of a kernel backend (rlops.kernels for Triton, rlops._cuda for the CUDA
twins: the same functions with the same signatures). The ops send "torch" to
rlops.torch_backend themselves, since it computes whole ops, not kernels.

"auto" runs CPU tensors on the chunked PyTorch reference and CUDA tensors on Triton, or on
the CUDA C++ backend for the ops that auto_backend.json (written from `rlops bench` results)
records as faster on this GPU model. "triton" on CPU tensors runs the same kernels in
Triton's interpreter, which needs TRITON_INTERPRET=1 in the environment before triton is
first imported. "cuda" runs csrc/ through torch.ops.rlops_cuda (see rlops._cuda).
"""

from __future__ import annotations

import functools
import importlib.util
import json
from pathlib import Path
from types import ModuleType

import torch

from .._validation import check_choice
from ..options import BACKENDS

# The ops with a CUDA twin, as named in auto_backend.json and by `rlops bench`.
CUDA_OPS = ("token_stats", "policy_loss", "linear_policy_loss", "gae")

# find_spec locates the package without importing it (importing rlops stays light).
TRITON_AVAILABLE = importlib.util.find_spec("triton") is not None


def cuda_backend_unavailable(x: torch.Tensor | None = None) -> str | None:
    """Why backend="cuda" cannot run here (on tensors like x), or None when it can.

    Loads rlops._C, or builds the extension, on first use.
    """
    if x is not None and not x.is_cuda:
        return (f"backend='cuda' runs on CUDA tensors, got {x.device.type} tensors; "
                "use backend='auto' or 'torch' on the CPU")
    from .. import _cuda

    reason = _cuda.unavailable_reason()
    return None if reason is None else f"backend='cuda' is unavailable: {reason}"


@functools.cache
def auto_table() -> dict[str, dict[str, str]]:
    """{GPU name: {op: "cuda" | "triton"}}: the faster backend per op, from committed benchmark runs."""
    return json.loads((Path(__file__).with_name("auto_backend.json")).read_text())["faster"]


def _auto_cuda(op: str | None, x: torch.Tensor) -> str:
    table = auto_table()
    # Every op call passes here: the device-name query is made only once some GPU has a measured choice.
    if table:
        choice = table.get(torch.cuda.get_device_name(x.device), {}).get(op or "", "triton")
        if choice == "cuda" and cuda_backend_unavailable() is None:
            return "cuda"
    return "triton" if TRITON_AVAILABLE else "torch"


def resolve_backend(backend: str, x: torch.Tensor, op: str | None = None) -> str:
    """The concrete backend ("triton", "cuda" or "torch") that runs `op` on tensors like x."""
    check_choice("backend", backend, BACKENDS)
    if backend == "auto":
        return _auto_cuda(op, x) if x.is_cuda else "torch"
    if backend == "cuda":
        reason = cuda_backend_unavailable(x)
        if reason is not None:
            raise RuntimeError(reason)
    if backend == "triton":
        if not TRITON_AVAILABLE:
            raise RuntimeError("backend='triton' needs the triton package (Linux only): pip install triton")
        if not x.is_cuda:
            kernels = launchers("triton")  # imported once (an import statement per call is host time)
            if x.device.type != "cpu" or not kernels.INTERPRETED:
                raise RuntimeError(
                    f"backend='triton' got {x.device.type} tensors; it runs on CUDA tensors, or on CPU "
                    "tensors in Triton's interpreter when TRITON_INTERPRET=1 is set before triton is imported"
                )
    return backend


def launchers(backend: str) -> ModuleType:
    """The launchers (token_stats_fwd, logits_grad, policy_loss_fwd, gae_fwd) of backend "triton" or "cuda"."""
    module = _LAUNCHERS.get(backend)
    if module is None:  # imported on first use (the CUDA backend's, the kernels'), then kept
        if backend == "cuda":
            from .. import _cuda as module
        else:
            from .. import kernels as module
        _LAUNCHERS[backend] = module
    return module


_LAUNCHERS: dict[str, ModuleType] = {}
