"""The named constants of rlops/constants.py (Python and Triton) equal their C++ twins in csrc/rlops_math.h."""

from __future__ import annotations

import re
from pathlib import Path

from rlops import constants

HEADER = (Path(__file__).resolve().parents[1] / "csrc" / "rlops_math.h").read_text()


def _cpp_float(name: str) -> float:
    match = re.search(rf"constexpr float {name} = ([-0-9.e]+)f;", HEADER)
    assert match, f"{name} is not defined in csrc/rlops_math.h"
    return float(match.group(1))


def _cpp_enum(name: str) -> dict[str, int]:
    match = re.search(rf"enum {name} : int \{{([^}}]*)\}};", HEADER)
    assert match, f"enum {name} is not defined in csrc/rlops_math.h"
    pairs = re.findall(r"(k\w+) = (\d+)", match.group(1))
    return {key: int(value) for key, value in pairs}


def test_clamps() -> None:
    assert _cpp_float("kLogRatioClamp") == constants.LOG_RATIO_CLAMP == 20.0
    assert _cpp_float("kK3Max") == constants.K3_MAX == 10.0


def test_kl_kinds() -> None:
    names = {"kKlNone": "none", "kK1": "k1", "kK2": "k2", "kK3": "k3", "kKlFull": "full", "kKAbs": "abs",
             "kK1St": "k1+", "kK3St": "k3+", "kKAbsSt": "abs+"}
    cpp = _cpp_enum("KlKind")
    assert {names[k]: v for k, v in cpp.items()} == constants.KL_KINDS


def test_objectives() -> None:
    cpp = _cpp_enum("Objective")
    assert {name: cpp["k" + name.title().replace("_", "")] for name in constants.OBJECTIVES} == constants.OBJECTIVES


def test_output_rows() -> None:
    cpp = _cpp_enum("OutRow")
    rows = {name: cpp["kRow" + "".join(part.title() for part in name.split("_"))] for name in constants.POLICY_ROWS}
    assert rows == constants.ROW
    assert cpp["kStatsRows"] == constants.N_STATS
    assert cpp["kPolicyRows"] == constants.N_POLICY_ROWS
    assert cpp["kGradRows"] == constants.N_GRADS
    assert constants.POLICY_ROWS[constants.GRADS] == ("g_logp", "g_entropy", "g_kl")
    assert constants.POLICY_ROWS[constants.STAT_GRADS] == ("logp", "entropy", "kl")


def test_kernel_row_runs_are_consecutive() -> None:
    """kernels/_common.py's store_stats writes the statistics rows from STATS_FIRST, store_rows five
    consecutive rows from EPILOGUE_FIRST."""
    rows = constants.POLICY_ROWS
    assert rows[constants.ROW["logp"]:constants.ROW["logp"] + 6] == constants.STATS_ROWS
    assert rows[constants.ROW["ratio"]:constants.ROW["ratio"] + 5] == ("ratio", "loss", "g_logp", "g_entropy", "g_kl")
