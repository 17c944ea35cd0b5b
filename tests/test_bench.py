"""The benchmark suite runs end to end on CPU (tiny shapes), so it cannot rot between GPU runs."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from rlops.bench import common

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "TRITON_INTERPRET": "1"}
RUN_KEYS = {"device": str, "commit": str, "date": str, "torch": str, "triton": str,
            "copy_bandwidth_gbps": float, "matmul_tflops": float, "records": list}
RECORD_KEYS = {"op", "provider", "shape", "dtype", "ms", "bytes", "gbps", "frac_copy_bw", "peak_mem_bytes",
               "extra_mem_bytes"}


def _rlops(*args: str, timeout: int = 600) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "rlops", *args], cwd=ROOT, capture_output=True, text=True,
                          env=ENV, timeout=timeout)


def test_quick_benchmark_writes_json_table_and_plots(tmp_path: Path) -> None:
    out = _rlops("bench", "--quick", "--out", str(tmp_path))
    assert out.returncode == 0, out.stdout + out.stderr
    (json_path,) = tmp_path.glob("*.json")
    run = json.loads(json_path.read_text())
    for key, kind in RUN_KEYS.items():
        assert isinstance(run[key], kind), key
    records = run["records"]
    for r in records:
        assert set(r) >= RECORD_KEYS, set(r) ^ RECORD_KEYS
        assert set(r["ms"]) == {"fwd", "bwd", "fwd_bwd"} and r["ms"]["fwd"] > 0
        assert r["gbps"] == pytest.approx(r["bytes"] / (r["ms"]["fwd_bwd"] or r["ms"]["fwd"]) / 1e6)
        assert r["frac_copy_bw"] == pytest.approx(r["gbps"] / run["copy_bandwidth_gbps"])
        if r["op"] == "gae":
            assert set(r["shape"]) == {"B", "T"} and r["ms"]["fwd_bwd"] is None and r["ms"]["bwd"] is None
            assert r["bytes"] == r["shape"]["B"] * r["shape"]["T"] * 17  # float32 in and out, a bool mask
        elif r["op"] == "linear_policy_loss":
            n, v, h = (r["shape"][k] for k in ("N", "V", "H"))
            assert r["tflops"] == pytest.approx(6 * n * v * h / r["ms"]["fwd_bwd"] / 1e9)
        else:
            assert set(r["shape"]) == {"N", "V"} and r["ms"]["fwd_bwd"] > 0
            assert r["ms"]["bwd"] == pytest.approx(r["ms"]["fwd_bwd"] - r["ms"]["fwd"])
            assert r["bytes"] == 3 * r["shape"]["N"] * r["shape"]["V"] * 2  # three bf16 passes
    providers = {op: {r["provider"] for r in records if r["op"] == op} for op in {r["op"] for r in records}}
    assert {"eager-trl", "eager-verl", "rlops-triton"} <= providers["token_stats"]
    assert {"eager-trl", "eager-verl", "rlops-triton", "rlops-triton-inplace"} <= providers["policy_loss"]
    assert providers["gae"] == {"python-loop", "rlops-triton"}
    assert {"matmuls", "eager-trl", "rlops-triton"} <= providers["linear_policy_loss"]
    table = json_path.with_suffix(".md").read_text()
    assert sum(table.count(f"| {op} |") for op in providers) == len(records)
    for op in providers:
        assert (tmp_path / f"{json_path.stem}-{op}.png").stat().st_size > 0
    # Providers that cannot run here say why.
    assert "rlops-cuda N=64 V=1000: skipped: backend='cuda' is unavailable: PyTorch" in out.stdout
    assert "torch-compile N=64 V=1000: skipped: torch.compile is compared on CUDA only" in out.stdout


def _record(op: str, provider: str, shape: dict[str, int], ms: float, extra: int | None) -> dict[str, object]:
    return {"op": op, "provider": provider, "shape": shape, "dtype": "bfloat16",
            "ms": {"fwd": ms / 3, "bwd": 2 * ms / 3, "fwd_bwd": ms}, "bytes": 1, "gbps": 1.0, "frac_copy_bw": 0.5,
            "peak_mem_bytes": None if extra is None else 2 * extra, "extra_mem_bytes": extra}


def test_plots_sweep_each_varying_dimension(tmp_path: Path) -> None:
    records = [_record("token_stats", p, {"N": n, "V": v}, n * v / 1e6 * (1 if p == "rlops-triton" else 4), n * v)
               for p in ("eager-trl", "rlops-triton") for n in (4096, 16384, 65536) for v in (32000, 151936)]
    records += [_record("policy_loss", "rlops-triton", {"N": 16384, "V": 32000}, 1.0, None)]
    sweeps = common._sweeps([r for r in records if r["op"] == "token_stats"])
    assert [(axis, fixed, len(chosen)) for axis, fixed, chosen in sweeps] == [
        ("N", {"V": 151936}, 6), ("V", {"N": 65536}, 4)]  # ties go to the largest fixed dimension
    run = {"device": "NVIDIA H100 80GB HBM3", "commit": "abc", "date": "2026-11-21T00:00:00+00:00", "torch": "2",
           "triton": "3", "copy_bandwidth_gbps": 3000.0, "matmul_tflops": 700.0, "records": records}
    written = common.write_results(run, tmp_path)
    assert sorted(p.name for p in written) == sorted(
        ["20261121T000000-abc.json", "20261121T000000-abc.md", "20261121T000000-abc-token_stats.png",
         "20261121T000000-abc-policy_loss.png"])
    table = (tmp_path / "20261121T000000-abc.md").read_text()
    # Speed-up against the eager baseline of the same case: the fixture makes eager 4x slower.
    assert table.count("| 4.00x |") == 6 and table.count("| 1.00x |") == 6


def test_faster_backend_per_op_for_auto(tmp_path: Path) -> None:
    records = [
        # token_stats: CUDA 2x faster on one shape, 1.5x slower on the other: geometric mean favours CUDA.
        _record("token_stats", "rlops-triton", {"N": 4096, "V": 32000}, 2.0, None),
        _record("token_stats", "rlops-cuda", {"N": 4096, "V": 32000}, 1.0, None),
        _record("token_stats", "rlops-triton", {"N": 16384, "V": 32000}, 2.0, None),
        _record("token_stats", "rlops-cuda", {"N": 16384, "V": 32000}, 3.0, None),
        _record("gae", "rlops-triton", {"B": 8, "T": 4096}, 1.0, None),
        _record("gae", "rlops-cuda", {"B": 8, "T": 4096}, 1.1, None),
        # Only one backend ran: no choice is recorded.
        _record("policy_loss", "rlops-triton", {"N": 16384, "V": 32000}, 1.0, None),
    ]
    assert common.faster_backends({"records": records}) == {"gae": "triton", "token_stats": "cuda"}
    run = {"device": "NVIDIA H100 80GB HBM3", "commit": "abc", "date": "2026-11-21T00:00:00+00:00", "torch": "2",
           "triton": "3", "copy_bandwidth_gbps": 3000.0, "matmul_tflops": 700.0, "records": records}
    common.write_results(run, tmp_path)
    written = json.loads((tmp_path / "20261121T000000-abc-auto-backend.json").read_text())
    assert written == {"faster": {"NVIDIA H100 80GB HBM3": {"gae": "triton", "token_stats": "cuda"}}}


def test_benchmark_cases_run_under_pytest_benchmark() -> None:
    out = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "bench/test_cases.py",
                          "--benchmark-disable"], cwd=ROOT, capture_output=True,
                         text=True, env=ENV, timeout=600)
    assert out.returncode == 0, out.stdout + out.stderr
    # Off CUDA, torch-compile (3 ops), rlops-cuda (4), liger (2), trl-triton, flash-attn and cce skip.
    assert "12 passed, 12 skipped" in out.stdout, out.stdout


def test_cli_help_list_and_errors(tmp_path: Path) -> None:
    out = _rlops("--help")
    assert out.returncode == 0 and "bench" in out.stdout
    out = _rlops("bench", "--list")
    assert out.returncode == 0 and "policy_loss: providers eager-trl, eager-verl" in out.stdout
    out = _rlops("fly")
    assert out.returncode == 2 and "unknown command 'fly'" in out.stderr
    out = _rlops("bench", "--ops", "policy_loss", "--shapes", "16384", "--out", str(tmp_path))
    assert out.returncode != 0 and "--shapes for policy_loss takes NxV" in out.stderr + out.stdout


def test_default_results_folder_is_the_checkouts() -> None:
    assert common.default_out_dir("NVIDIA H100 80GB HBM3") == ROOT / "bench" / "results" / "nvidia-h100-80gb-hbm3"
