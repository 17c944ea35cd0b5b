"""Build script: metadata lives in pyproject.toml; this file maps the source layout.

`kernels/` sits at the top of the repository but installs as `rlops.kernels`, because a
top-level `kernels` module would clash with an existing PyPI package; `bench/` installs as
`rlops.bench` for the same reason, so `rlops bench` works wherever rlops is installed. The optional CUDA
extension (`rlops._C`, built from `csrc/`) will be added here.
"""

from setuptools import find_packages, setup

packages = [*find_packages(include=["rlops", "rlops.*"]), "rlops.kernels", "rlops.bench"]

setup(
    packages=packages,
    package_dir={"rlops": "rlops", "rlops.kernels": "kernels", "rlops.bench": "bench"},
)
