"""Packaging promises: a light import, the kernels installed as rlops.kernels, ruff-clean code."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]


def _python(code: str, **env: str) -> subprocess.CompletedProcess:
    """code run in a fresh Python, without TRITON_INTERPRET unless env sets it."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"} | env
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)


def test_import_touches_no_device_and_no_triton() -> None:
    out = _python(
        "import sys, torch, rlops\n"
        "assert 'triton' not in sys.modules, 'triton imported'\n"
        "assert not torch.cuda.is_initialized(), 'CUDA initialised'\n"
        "print(rlops.__version__)\n"
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() and out.stdout.strip() != "0.0.0+unknown"


def test_kernels_install_as_rlops_kernels() -> None:
    out = _python("import rlops.kernels as k; print(k.__name__, k.__file__)")
    assert out.returncode == 0, out.stderr
    name, path = out.stdout.split()
    assert name == "rlops.kernels"
    assert Path(path).resolve() == ROOT / "kernels" / "__init__.py"


def test_ruff_clean() -> None:
    ruff = shutil.which("ruff") or str(Path(sys.executable).with_name("ruff"))
    if not Path(ruff).exists():
        pytest.fail("ruff is not installed; it comes with the test extras: pip install -e '.[test]'")
    out = subprocess.run([ruff, "check", "."], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stdout + out.stderr


@pytest.mark.parametrize("triton_version, numpy_version, refused", [
    ("3.6.0", "2.4.6", True), ("3.6.0", "2.3.5", False), ("3.7.0", "2.4.6", False), ("3.9.0", "2.5.2", False),
    ("3.10.1", "3.0.0", False)])
def test_interpreter_problem_names_what_to_install(triton_version: str, numpy_version: str, refused: bool) -> None:
    from rlops.kernels._common import interpreter_problem

    problem = interpreter_problem(triton_version, numpy_version)
    assert (problem is not None) == refused
    if refused:
        assert triton_version in problem and numpy_version in problem and "numpy<2.4" in problem


def test_interpreter_max_and_min_skip_nan_as_compiled_kernels_do() -> None:
    # The kernels' exact-KL guard relies on PTX max.f32 semantics (rlops.kernels._common.prepare_interpreter).
    import triton
    import triton.language as tl

    from rlops import kernels

    @triton.jit
    def max_min(x_ptr, out_ptr):
        x = tl.load(x_ptr + tl.arange(0, 4))
        tl.store(out_ptr + tl.arange(0, 4), tl.maximum(x, 1.0))
        tl.store(out_ptr + 4 + tl.arange(0, 4), tl.minimum(x, 1.0))

    assert kernels.INTERPRETED
    x = torch.tensor([float("nan"), 0.0, 2.0, float("-inf")])
    out = torch.empty(8)
    max_min[(1,)](x, out)
    assert out.tolist() == [1.0, 1.0, 2.0, 1.0, 1.0, 0.0, 1.0, float("-inf")]


@pytest.mark.parametrize("interpret", ["1", None])
def test_interpreter_speed_ups_only_where_asked(interpret: str | None) -> None:
    # rlops._interpreter: `import rlops` leaves a user's interpreter as it is; speed_up_interpreter
    # (the test suite, the CLI's runs without CUDA) cuts its checks only under TRITON_INTERPRET=1.
    state = "(I.interpreter_builder.options.sanitize_overflow, hasattr(I._patch_lang, 'nested_skipped'))"
    code = ("import rlops, rlops.kernels\n"
            "from triton.runtime import interpreter as I\n"
            f"before = {state}\n"
            "from rlops._interpreter import speed_up_interpreter\n"
            "speed_up_interpreter()\n"
            f"print(before, {state})\n")
    out = _python(code, **({"TRITON_INTERPRET": interpret} if interpret else {}))
    assert out.returncode == 0, out.stderr
    after = "(False, True)" if interpret else "(True, False)"
    assert out.stdout.strip() == f"(True, False) {after}"


def test_interpreter_checks_alignment_hints() -> None:
    # rlops._interpreter.check_hints (installed by conftest): a compiled kernel reads a pointer
    # marked 16-byte aligned in 16-byte vectors, so every mark the interpreter meets must hold.
    import triton
    import triton.language as tl

    from rlops import kernels
    from rlops._interpreter import FalseHintError

    @triton.jit
    def copy4(x_ptr, out_ptr, shift):
        body = tl.multiple_of(x_ptr + shift, 16)
        tl.store(out_ptr + tl.arange(0, 4), tl.load(body + tl.arange(0, 4)))

    @triton.jit
    def hint_block(x_ptr, out_ptr):
        offs = tl.multiple_of(tl.arange(0, 4) * 4, 4)
        tl.store(out_ptr + tl.arange(0, 4), tl.load(x_ptr + offs))

    assert kernels.INTERPRETED
    x, out = torch.arange(16, dtype=torch.float32), torch.empty(4)
    assert x.data_ptr() % 16 == 0  # torch's CPU allocations are 64-byte aligned
    copy4[(1,)](x, out, 4)  # 16 bytes on: still aligned
    assert out.tolist() == [4.0, 5.0, 6.0, 7.0]
    with pytest.raises(Exception, match=r"FalseHintError|marks \d+ \(pointer<fp32>\), which is 4 past") as err:
        copy4[(1,)](x, out, 1)
    assert "multiple_of(..., 16)" in str(err.value) and issubclass(FalseHintError, AssertionError)
    with pytest.raises(Exception, match=r"checks tl\.multiple_of on scalars only"):
        hint_block[(1,)](x, out)
