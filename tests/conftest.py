"""Test setup: Triton's interpreter on CPU-only machines, GPU tests skipped without CUDA."""

import os

import pytest
import torch

# The interpreter is chosen when triton is first imported, so this must run before any test
# module imports rlops.kernels.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device (GPU test)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
