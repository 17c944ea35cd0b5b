"""verl 0.9.1 imported for the parity tests, on a machine without its heavy dependencies.

verl's import-time dependencies ray, tensordict and orjson, which the compared functions do not
use, are replaced by tests/verl_standins only where they are missing and only while verl is
imported (tests/verl_standins/README.md). Without verl installed the calling test skips.
"""

from __future__ import annotations

import importlib
import importlib.util
import sys
from pathlib import Path
from types import ModuleType

import pytest

STANDINS = Path(__file__).resolve().parent / "verl_standins"
STANDIN_MODULES = ("ray", "tensordict", "orjson")
VERL_VERSION = "0.9.1"


def import_verl(*modules: str) -> list[ModuleType]:
    """The verl modules named (e.g. "verl.trainer.ppo.core_algos"), imported with the stand-ins;
    skips the test where verl is not installed, fails where its version is not 0.9.1."""
    if importlib.util.find_spec("verl") is None:
        pytest.skip("verl is not installed: bash install.sh installs verl 0.9.1 (no dependencies)")
    missing = [name for name in STANDIN_MODULES if importlib.util.find_spec(name) is None]
    if missing:
        sys.path.append(str(STANDINS))
    try:
        imported = [importlib.import_module(name) for name in modules]
        version = importlib.import_module("verl").__version__
    finally:
        if missing:
            sys.path.remove(str(STANDINS))
            for name in [*missing, "_verl_standin"]:  # verl keeps its references; nothing else sees them
                for key in [k for k in sys.modules if k == name or k.startswith(name + ".")]:
                    del sys.modules[key]
    assert version == VERL_VERSION, f"the parity tests are written against verl {VERL_VERSION}, found {version}"
    return imported
