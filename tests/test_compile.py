"""Every Triton kernel compiles for sm_80 and sm_90 on a machine without a GPU.

The interpreter runs the kernels' Python and misses what only the compiler rejects (a
non-constexpr global, say); this compiles them to PTX and cubin with Triton's own ptxas.
It also guards the memory traffic the benchmarks depend on: 16-byte vector loads and stores
where a kernel's traffic is (VECTOR below), when sizes and strides are multiples of 16 as
the JIT detects at run time, and no spills to local memory.
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
# 16-byte vector accesses each kernel must keep: loads where its traffic is the vocabulary,
# stores where it writes gradients or outputs (GAE's bf16 inputs are read narrower).
VECTOR = {
    "_token_stats_fwd_kernel": ("ld_v4",),
    "_token_stats_bwd_kernel": ("ld_v4", "st_v4"),
    "_policy_loss_fwd_kernel": ("ld_v4",),
    "_gae_kernel": ("st_v4",),
}
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

    modules = (k.token_stats, k.policy_loss, k.gae)
    kernels = {name for mod in modules for name in vars(mod) if name.endswith("_kernel")}
    assert {key.split("[")[0] for key in KEYS} == kernels == set(VECTOR)


@pytest.mark.parametrize("key", KEYS)
def test_compiles_vectorised_without_spills(compiled: dict, key: str) -> None:
    result = compiled[key]
    assert "error" not in result, result.get("error")
    for access in VECTOR[key.split("[")[0]]:
        assert result[access], f"no 16-byte vector {'loads' if access == 'ld_v4' else 'stores'}"
    assert result.get("LOCAL", 0) == 0 and result.get("STACK", 0) == 0, f"spills to local memory: {result}"
