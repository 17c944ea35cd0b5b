"""Test setup: Triton's interpreter on CPU-only machines, GPU tests skipped without CUDA."""

import os

import pytest
import torch

# The interpreter is chosen when triton is first imported, so this must run before any test
# module imports rlops.kernels.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


# After the variable is set: rlops' import may import triton.
from rlops._interpreter import check_hints, speed_up_interpreter

speed_up_interpreter()
check_hints()

# Under pytest-xdist (`-n auto`) the workers share the cores: torch's intra-op threads are split
# among them instead of each worker taking every core.
_workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
if _workers > 1:
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // _workers))


# The longest files first (worker seconds of a 2-core CI run: 483, 229, 142, 127, 70). `--dist
# loadfile` hands each worker whole files in collection order, one more as one finishes; by
# default xdist orders files by their number of tests, which started the trainers (few, long
# tests) last, to run alone at the end of the suite.
LONGEST_FILES = ("test_trainers.py", "test_policy_loss.py", "test_profile.py", "test_compile.py", "test_bench.py")


def pytest_configure(config: pytest.Config) -> None:
    if hasattr(config.option, "loadscopereorder"):  # pytest-xdist's option: keep the order below
        config.option.loadscopereorder = False


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    rank = {name: i for i, name in enumerate(LONGEST_FILES)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: each file's order kept
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device (GPU test)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(params=["triton", "cuda"])
def gpu_backend(request: pytest.FixtureRequest) -> str:
    """The kernel backends of the GPU suite: Triton and the CUDA C++ backend. The CUDA one is
    skipped only where it cannot be built (no nvcc, no prebuilt rlops._C); a failed build fails."""
    if request.param == "cuda":
        from rlops import _cuda

        reason = _cuda.unavailable_reason()
        if reason is not None:
            if _cuda.can_build():
                pytest.fail(reason)
            pytest.skip(reason)
    return request.param
