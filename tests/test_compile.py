"""Every Triton kernel compiles for sm_80 and sm_90 on a machine without a GPU.

The interpreter runs the kernels' Python and misses what only the compiler rejects (a
non-constexpr global, say); this compiles them to PTX and cubin with Triton's own ptxas.
It also guards the memory traffic the benchmarks depend on: the vocabulary loop must use
16-byte vector loads (and stores for gradients) when V and the row strides are multiples
of 16, which the JIT detects at run time, and nothing may spill to local memory.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from compile_kernels import CASES, case_key

HERE = Path(__file__).resolve().parent
ARCHS = (80, 90)
KEYS = [case_key(fn, switches, dtype, arch) for fn, switches in CASES for dtype in ("bf16", "fp32") for arch in ARCHS]


@pytest.fixture(scope="module")
def compiled() -> dict[str, dict[str, object]]:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    out = subprocess.run([sys.executable, str(HERE / "compile_kernels.py"), *map(str, ARCHS)],
                         capture_output=True, text=True, env=env, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_every_kernel_is_covered() -> None:
    import rlops.kernels as k

    kernels = {name for mod in (k.token_stats, k.policy_loss) for name in vars(mod) if name.endswith("_kernel")}
    assert {key.split("[")[0] for key in KEYS} == kernels


@pytest.mark.parametrize("key", KEYS)
def test_compiles_vectorised_without_spills(compiled: dict, key: str) -> None:
    result = compiled[key]
    assert "error" not in result, result.get("error")
    assert result["ld_v4"], "logits are not read with 16-byte vector loads"
    if result["stores_logits"]:
        assert result["st_v4"], "gradients are not written with 16-byte vector stores"
    assert result.get("LOCAL", 0) == 0 and result.get("STACK", 0) == 0, f"spills to local memory: {result}"
