"""Packaging promises: a light import, the kernels installed as rlops.kernels, ruff-clean code."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _python(code: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
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
