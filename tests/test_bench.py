"""The benchmark suite runs end to end on CPU (tiny shapes), so it cannot rot between GPU runs."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def test_quick_benchmark_writes_json_table_and_plot(tmp_path: Path) -> None:
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    out = subprocess.run([sys.executable, "-m", "bench", "--quick", "--out", str(tmp_path)], cwd=ROOT,
                         capture_output=True, text=True, env=env, timeout=600)
    assert out.returncode == 0, out.stdout + out.stderr
    (json_path,) = tmp_path.glob("*.json")
    run = json.loads(json_path.read_text())
    for key in ("device", "commit", "date", "torch", "triton", "copy_bandwidth_gbps", "matmul_tflops"):
        assert key in run, key
    for op in ("token_stats", "policy_loss"):
        providers = {r["provider"] for r in run["records"] if r["op"] == op}
        assert {"eager-trl", "eager-verl", "rlops-triton"} <= providers, op
    assert "rlops-triton-inplace" in {r["provider"] for r in run["records"]}
    assert {r["provider"] for r in run["records"] if r["op"] == "gae"} == {"python-loop", "rlops-triton"}
    assert {"matmuls", "eager-trl", "rlops-triton"} <= {r["provider"] for r in run["records"]
                                                        if r["op"] == "linear_policy_loss"}
    for r in run["records"]:
        assert r["ms"]["fwd"] > 0
        if r["op"] == "gae":
            assert set(r["shape"]) == {"B", "T"} and "fwd_bwd" not in r["ms"]
            assert r["bytes"] == r["shape"]["B"] * r["shape"]["T"] * 17  # float32 in and out, a bool mask
        elif r["op"] == "linear_policy_loss":
            n, v, h = (r["shape"][k] for k in ("N", "V", "H"))
            assert r["tflops"] == pytest.approx(6 * n * v * h / r["ms"]["fwd_bwd"] / 1e9)
        else:
            assert set(r["shape"]) == {"N", "V"} and r["ms"]["fwd_bwd"] > 0
            assert r["bytes"] == 3 * r["shape"]["N"] * r["shape"]["V"] * 2  # three bf16 passes
    table = json_path.with_suffix(".md").read_text()
    ops = ("token_stats", "policy_loss", "linear_policy_loss", "gae")
    assert sum(table.count(f"| {op} |") for op in ops) == len(run["records"])
    assert json_path.with_suffix(".png").stat().st_size > 0
    assert "skipped:" in out.stdout  # providers that cannot run here say why
