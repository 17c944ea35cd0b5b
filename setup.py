"""Build script: metadata lives in pyproject.toml; this file maps the source layout.

`kernels/` sits at the top of the repository but installs as `rlops.kernels`, because a
top-level `kernels` module would clash with an existing PyPI package. The optional CUDA
extension (`rlops._C`, built from `csrc/`) will be added here.
"""

from setuptools import find_packages, setup

packages = [*find_packages(include=["rlops", "rlops.*"]), "rlops.kernels"]

setup(
    packages=packages,
    package_dir={"rlops": "rlops", "rlops.kernels": "kernels"},
)
