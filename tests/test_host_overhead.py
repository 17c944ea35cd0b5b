"""The host side of one policy-loss forward+backward beside Liger's (bench/host_overhead.py).

Both libraries' kernel launches are stubbed, so what is timed is Python and PyTorch glue. Issue
16 asks for rlops at or below Liger's time; measured on this 2-core machine today (interpreter
mode, CPU tensors) it is about 1.5x: these ceilings catch a regression until that is reached.
"""

from __future__ import annotations

import importlib

import pytest

from rlops.bench import host_overhead

RATIO_CEILING = 2.0  # rlops over Liger, measured 1.5-1.7x
ATEN_OPS_CEILING = 30  # ATen ops per rlops call, measured 27 (Liger: 31)


def test_aten_ops_per_call() -> None:
    modules = tuple(importlib.import_module(m) for m in host_overhead.RLOPS_KERNEL_MODULES)
    with host_overhead.stubbed_launches(modules):
        ops = host_overhead.aten_ops(host_overhead.rlops_step(host_overhead.inputs()))
    assert len(ops) <= ATEN_OPS_CEILING, ops


def test_host_time_beside_liger() -> None:
    if not host_overhead.liger_available():
        pytest.skip("liger-kernel is not installed")
    h = host_overhead.measure(rounds=3, calls=30, warmup=10)
    assert h.ratio is not None and h.ratio <= RATIO_CEILING, host_overhead.summary(h)
