"""pytest setup for the benchmark cases: Triton's interpreter without CUDA, and --bench-shapes."""

import os

import pytest
import torch

# Before triton is first imported (by the cases' providers).
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

# After the variable is set (rlops' import may import triton): the cases' smoke runs, not timed there.
from rlops._interpreter import speed_up_interpreter

speed_up_interpreter()


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption("--bench-shapes", choices=("quick", "default", "all"), default=None,
                     help="the ops' shape sets (default: 'default' on CUDA, 'quick' otherwise)")
    parser.addoption("--bench-dtype", choices=("bf16", "fp16", "fp32"), default="bf16")
