"""The benchmark cases of `rlops bench` as pytest-benchmark tests, one per op, provider and shape.

    pytest bench/test_cases.py                         # on CUDA: each op's headline shapes
    pytest bench/test_cases.py --bench-shapes all      # every shape of bench/README.md
    pytest bench/test_cases.py --benchmark-disable     # run each case once (the CPU smoke test)

The cases are `rlops bench`'s own (same setup, same closures: rlops.bench.run.case_steps);
pytest-benchmark times forward+backward (forward alone for gae) with its own statistics.
Providers that cannot run here are skipped with the reason.
"""

from __future__ import annotations

import pytest
import torch

from rlops.bench import run
from rlops.bench.common import Skip


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    if "case" not in metafunc.fixturenames:
        return
    shapes = metafunc.config.getoption("--bench-shapes") or ("default" if torch.cuda.is_available() else "quick")
    cases, ids = [], []
    for name, module in run.OPS.items():
        chosen = {"quick": module.QUICK_SHAPES, "default": module.DEFAULT_SHAPES, "all": module.SHAPES}[shapes]
        for shape in chosen:
            for provider in module.PROVIDERS:
                cases.append((name, provider, shape))
                ids.append(f"{name}-{provider}-{'x'.join(map(str, shape))}")
    metafunc.parametrize("case", cases, ids=ids)


def test_case(benchmark, case: tuple[str, str, tuple[int, ...]], request: pytest.FixtureRequest) -> None:
    name, provider, shape = case
    module = run.OPS[name]
    dtype = run.DTYPES[request.config.getoption("--bench-dtype")]
    _, forward, forward_backward = run.case_steps(module, provider, shape, dtype)
    step = forward_backward or forward

    def timed() -> object:
        out = step()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        return out

    try:
        timed()  # compiles and warms up, and finds the providers that cannot run here
    except Skip as reason:
        pytest.skip(str(reason))
    result = benchmark(timed)
    outputs = result if isinstance(result, tuple) else (result,)
    assert all(torch.isfinite(x).all() for x in outputs if isinstance(x, torch.Tensor)), "non-finite result"
    benchmark.extra_info.update(op=name, provider=provider, shape=list(shape))
