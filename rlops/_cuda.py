"""The CUDA C++ backend (csrc/): `torch.ops.rlops_cuda`, from the prebuilt `rlops._C` or built on first use.

`setup.py` builds `rlops._C` when it finds a CUDA build of PyTorch and nvcc (see its
docstring). Without it, the first op run with backend="cuda" compiles csrc/ through
`torch.utils.cpp_extension.load` (about a minute, cached under ~/.cache/torch_extensions).
Set RLOPS_CUDA_JIT=0 to forbid that build. Nothing here runs at `import rlops`.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import torch

SOURCES = ("ops.cpp", "token_stats.cu", "gae.cu")
_state: dict[str, str | None] = {}


def source_dir() -> Path:
    """csrc/: installed inside the package as rlops/csrc, or beside it in a source checkout."""
    here = Path(__file__).resolve().parent
    for candidate in (here / "csrc", here.parent / "csrc"):
        if all((candidate / name).is_file() for name in SOURCES):
            return candidate
    raise FileNotFoundError(f"the CUDA sources {', '.join(SOURCES)} are not installed beside {here}")


def _registered() -> bool:
    return hasattr(torch.ops, "rlops_cuda") and hasattr(torch.ops.rlops_cuda, "token_stats_fwd")


def _jit_build() -> None:
    from torch.utils import cpp_extension

    src = source_dir()
    print("rlops: compiling the CUDA backend from csrc/ (first use only, about a minute)...", file=sys.stderr)
    cpp_extension.load(
        name="rlops_cuda",
        sources=[str(src / name) for name in SOURCES],
        extra_include_paths=[str(src)],
        extra_cflags=["-O3"],
        extra_cuda_cflags=["-O3", "-lineinfo"],
        is_python_module=False,
        verbose=os.environ.get("RLOPS_CUDA_VERBOSE") == "1",
    )


def _load() -> str | None:
    if torch.version.cuda is None:
        return f"PyTorch {torch.__version__} here is not a CUDA build"
    if not torch.cuda.is_available():
        return "no CUDA device is visible"
    if _registered():
        return None
    try:
        from . import _C  # noqa: F401  (registers torch.ops.rlops_cuda)

        return None
    except ImportError:
        pass
    if os.environ.get("RLOPS_CUDA_JIT", "1") == "0":
        return "rlops._C was not built and RLOPS_CUDA_JIT=0 forbids building it on first use"
    from torch.utils.cpp_extension import CUDA_HOME

    if CUDA_HOME is None:
        return ("rlops._C was not built and there is no CUDA toolkit (nvcc) to build it on first use; "
                "install one and set CUDA_HOME, or use backend='triton'")
    try:
        _jit_build()
    except Exception as err:  # the compiler's own message is the useful part
        return f"building the CUDA backend from {source_dir()} failed: {err}"
    return None if _registered() else "the CUDA backend built but registered no torch.ops.rlops_cuda ops"


def unavailable_reason() -> str | None:
    """Why backend="cuda" cannot run here, or None when it can (loads or builds it once)."""
    if "reason" not in _state:
        _state["reason"] = _load()
    return _state["reason"]


def can_build() -> bool:
    """True when a missing extension could be built here (a CUDA PyTorch, a device and nvcc)."""
    from torch.utils.cpp_extension import CUDA_HOME

    return torch.version.cuda is not None and torch.cuda.is_available() and CUDA_HOME is not None


def ops():
    """torch.ops.rlops_cuda, loading or building it on first use; RuntimeError with the reason if it cannot."""
    reason = unavailable_reason()
    if reason is not None:
        raise RuntimeError(f"backend='cuda' is unavailable: {reason}")
    return torch.ops.rlops_cuda
