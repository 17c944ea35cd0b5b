"""Build script: metadata lives in pyproject.toml; this file maps the source layout.

`kernels/` sits at the top of the repository but installs as `rlops.kernels`, because a
top-level `kernels` module would clash with an existing PyPI package; `bench/` installs as
`rlops.bench` for the same reason, so `rlops bench` works wherever rlops is installed.
`csrc/` installs as data inside the package (rlops/csrc), so that the CUDA backend can be
built on first use anywhere.

The CUDA extension `rlops._C` is built ahead of time when RLOPS_BUILD_CUDA=1, or when it is
unset and the build environment has a CUDA build of PyTorch and nvcc; RLOPS_BUILD_CUDA=0
skips it. pip builds in an isolated environment without PyTorch, so an ahead-of-time build
needs `RLOPS_BUILD_CUDA=1 pip install --no-build-isolation .`; otherwise the first op run
with backend="cuda" compiles csrc/ just in time (rlops/_cuda.py).
"""

import os
from pathlib import Path

from setuptools import find_packages, setup

HERE = Path(__file__).resolve().parent
CUDA_SOURCES = ["csrc/module.cpp", "csrc/ops.cpp", "csrc/token_stats.cu", "csrc/gae.cu"]


def cuda_build() -> dict:
    """setup() arguments for rlops._C, or none when it is not built here."""
    flag = os.environ.get("RLOPS_BUILD_CUDA", "auto")
    if flag not in ("0", "1", "auto"):
        raise SystemExit(f"RLOPS_BUILD_CUDA must be 0, 1 or unset, got {flag!r}")
    if flag == "0":
        return {}
    try:
        import torch
        from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CUDAExtension
    except ImportError:
        torch = CUDA_HOME = None
    if torch is None or torch.version.cuda is None or CUDA_HOME is None:
        if flag == "1":
            raise SystemExit("RLOPS_BUILD_CUDA=1 needs a CUDA build of PyTorch and nvcc in the build environment "
                             "(pip install --no-build-isolation, CUDA_HOME set)")
        return {}
    extension = CUDAExtension(
        "rlops._C",
        sources=CUDA_SOURCES,
        include_dirs=[str(HERE / "csrc")],
        extra_compile_args={"cxx": ["-O3"], "nvcc": ["-O3", "-lineinfo"]},
    )
    return {"ext_modules": [extension], "cmdclass": {"build_ext": BuildExtension}}


packages = [*find_packages(include=["rlops", "rlops.*"]), "rlops.kernels", "rlops.bench", "rlops.csrc"]

setup(
    packages=packages,
    package_dir={"rlops": "rlops", "rlops.kernels": "kernels", "rlops.bench": "bench", "rlops.csrc": "csrc"},
    package_data={"rlops.csrc": ["*.h", "*.cu", "*.cpp", "*.md"], "rlops.ops": ["auto_backend.json"]},
    **cuda_build(),
)
