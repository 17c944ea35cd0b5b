"""The benchmark suite runs end to end on CPU (tiny shapes), so it cannot rot between GPU runs."""

from __future__ import annotations

import importlib.metadata
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import matplotlib
import pytest
import torch

from rlops.bench import common, plots, run
from rlops.bench.common import Timing

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "TRITON_INTERPRET": "1"}
RUN_KEYS = {"device": str, "commit": str, "rlops": str, "date": str, "torch": str, "triton": str, "note": str,
            "copy_bandwidth_gbps": type(None), "matmul_tflops": type(None), "records": list}
RECORD_KEYS = {"op", "provider", "shape", "dtype", "ms", "bytes", "gbps", "frac_copy_bw", "peak_mem_bytes",
               "extra_mem_bytes"}


def _rlops(*args: str, timeout: int = 600) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "rlops", *args], cwd=ROOT, capture_output=True, text=True,
                          env=ENV, timeout=timeout)


def _negative_numbers(text: str) -> list[str]:
    """Numbers with a minus sign that stand alone (not a date's or a commit's hyphen)."""
    return re.findall(r"(?:^|[\s|(:])(-\d[\d.e+]*)", text)


def test_quick_benchmark_runs_every_case_untimed_under_the_interpreter(tmp_path: Path) -> None:
    out = _rlops("bench", "--quick", "--out", str(tmp_path))
    assert out.returncode == 0, out.stdout + out.stderr
    (json_path,) = tmp_path.glob("*.json")
    run = json.loads(json_path.read_text())
    for key, kind in RUN_KEYS.items():
        assert isinstance(run[key], kind), key
    # The interpreter's times are meaningless: none is stored, and nothing derived from one.
    assert run["note"] == "interpreter: no timing" and run["copy_bandwidth_gbps"] is None is run["matmul_tflops"]
    # The host time per call is measured with the launches stubbed (no interpreter): on CPU tensors
    # with and without the value checks that CUDA tensors skip.
    host = run["host_overhead"]
    assert host["rlops_us"] > 0 and host["rlops_unchecked_us"] > 0 and host["rlops_aten_ops"] > 0, host
    records = run["records"]
    for r in records:
        assert set(r) >= RECORD_KEYS, set(r) ^ RECORD_KEYS
        assert r["ms"] == {"fwd": None, "bwd": None, "fwd_bwd": None} and r["error"] is None
        assert r["gbps"] is None is r["frac_copy_bw"] is r["tflops"]
        if r["op"] == "gae":
            assert set(r["shape"]) == {"B", "T"}
            assert r["bytes"] == r["shape"]["B"] * r["shape"]["T"] * 17  # float32 in and out, a bool mask
        elif r["op"] == "policy_loss":
            assert r["bytes"] == 3 * r["shape"]["N"] * r["shape"]["V"] * 2  # three bf16 passes
    providers = {op: {r["provider"] for r in records if r["op"] == op} for op in {r["op"] for r in records}}
    assert {"eager-trl", "eager-verl", "rlops-triton"} <= providers["token_stats"]
    assert {"eager-trl", "eager-verl", "rlops-triton", "rlops-triton-inplace"} <= providers["policy_loss"]
    assert providers["gae"] == {"python-loop", "rlops-triton"}
    assert {"matmuls", "eager-trl", "rlops-triton"} <= providers["linear_policy_loss"]
    table = json_path.with_suffix(".md").read_text()
    assert f"rlops {host['rlops_us']:.0f} us ({host['rlops_unchecked_us']:.0f} us without" in table
    rows = [line for line in table.splitlines() if any(line.startswith(f"| {op} |") for op in providers)]
    assert len(rows) == len(records)
    for row in rows:  # times say so; speed-ups of absent times are absent
        assert row.count("| no timing ") == 3 and row.endswith("| - | - |"), row
    assert "interpreter: no timing" in table.splitlines()[0]
    for text in (json_path.read_text(), table, out.stdout):
        assert not _negative_numbers(text), _negative_numbers(text)
    assert not re.search(r"\d ms\b", out.stdout) and "no plots: interpreter: no timing" in out.stdout
    assert not list(tmp_path.glob("*.png"))
    # Providers that cannot run here say why.
    # (the reason: a CPU build of PyTorch, or no visible GPU under a CUDA build)
    assert "rlops-cuda N=64 V=1000: skipped: backend='cuda' is unavailable: " in out.stdout
    assert "torch-compile N=64 V=1000: skipped: torch.compile is compared on CUDA only" in out.stdout


def _record(op: str, provider: str, shape: dict[str, int], ms: float, extra: int | None) -> dict[str, object]:
    return {"op": op, "provider": provider, "shape": shape, "dtype": "bfloat16",
            "ms": {"fwd": ms / 3, "bwd": 2 * ms / 3, "fwd_bwd": ms}, "bytes": 1, "gbps": 1.0, "frac_copy_bw": 0.5,
            "peak_mem_bytes": None if extra is None else 2 * extra, "extra_mem_bytes": extra}


def test_plots_sweep_each_varying_dimension(tmp_path: Path) -> None:
    records = [_record("token_stats", p, {"N": n, "V": v}, n * v / 1e6 * (1 if p == "rlops-triton" else 4), n * v)
               for p in ("eager-trl", "rlops-triton") for n in (4096, 16384, 65536) for v in (32000, 151936)]
    records += [_record("policy_loss", "rlops-triton", {"N": 16384, "V": 32000}, 1.0, None)]
    sweeps = plots._sweeps([r for r in records if r["op"] == "token_stats"])
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
    # Every case is collected; two ops' run (each case runs in the quick `rlops bench` test above).
    out = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "bench/test_cases.py",
                          "--benchmark-disable", "-k", "gae or packed"], cwd=ROOT, capture_output=True,
                         text=True, env=ENV, timeout=600)
    assert out.returncode == 0, out.stdout + out.stderr
    # 40 cases; off CUDA gae's torch-compile and rlops-cuda skip.
    assert "4 passed, 2 skipped, 34 deselected" in out.stdout, out.stdout


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


@pytest.mark.parametrize("fwd, fwd_bwd, bwd", [
    (Timing(1.0, 1.1, 1.2), Timing(2.0, 2.2, 2.5), 1.1),  # apart: the difference of the medians
    (Timing(1.0, 1.1, 1.3), Timing(1.2, 1.4, 1.6), None),  # overlapping: noise could give either sign
    (Timing(500.0, 1466.0, 2100.0), Timing(900.0, 1020.0, 2400.0), None),  # fwd+bwd median below fwd's
])
def test_backward_is_a_meaningful_difference_or_absent(fwd: Timing, fwd_bwd: Timing, bwd: float | None) -> None:
    assert common.backward_ms(fwd, fwd_bwd) == (None if bwd is None else pytest.approx(bwd))


@pytest.mark.parametrize("op, fwd_bwd, bwd", [
    ("token_stats", Timing(3.0, 3.5, 5.0), None),
    ("linear_policy_loss", Timing(5.0, 6.0, 7.0), 4.0),
])
def test_timed_case_keeps_only_meaningful_times(monkeypatch: pytest.MonkeyPatch, op: str, fwd_bwd: Timing,
                                                bwd: float | None) -> None:
    """The CUDA path with do_bench's quantiles stood in: rates from the fwd+bwd median, no negative time."""
    timings = iter([Timing(1.0, 2.0, 4.0), fwd_bwd])
    monkeypatch.setattr(common, "no_timing_reason", lambda: None)
    monkeypatch.setattr(common, "time_quantiles", lambda fn: next(timings))
    module = run.OPS[op]
    rec = run.run_case(module, "eager-trl", module.QUICK_SHAPES[0], torch.bfloat16, 1000.0)
    assert rec.ms == {"fwd": 2.0, "bwd": bwd, "fwd_bwd": fwd_bwd.median}
    assert rec.gbps == pytest.approx(rec.bytes / fwd_bwd.median / 1e6)
    assert rec.frac_copy_bw == pytest.approx(rec.gbps / 1000.0)
    if op == "linear_policy_loss":
        n, v, h = module.QUICK_SHAPES[0]
        assert rec.tflops == pytest.approx(6 * n * v * h / fwd_bwd.median / 1e9)
    table = common.markdown_table({"device": "NVIDIA H100 80GB HBM3", "commit": "abc", "date": "2026", "torch": "2",
                                   "triton": "3", "note": None, "copy_bandwidth_gbps": 1000.0,
                                   "matmul_tflops": 700.0, "records": [vars(rec)]})
    assert f"| 2 | {'-' if bwd is None else '4'} | {fwd_bwd.median:g} |" in table
    assert not _negative_numbers(table)


def test_results_are_named_by_the_installed_version_outside_git(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(common, "_git", lambda *args: "")
    env = common.environment()
    version = importlib.metadata.version("rlops")
    assert env["commit"] == f"v{version}" and env["rlops"] == version
    assert common.results_stem(env).endswith(f"-v{version}") and "unknown" not in common.results_stem(env)


@pytest.mark.parametrize("shapes", [
    [{"N": 64, "V": 1000, "H": 32}],  # one shape: a single panel of bars, the narrowest figure
    [{"N": n, "V": 151936, "H": 4096} for n in (4096, 16384, 65536)],  # one sweep: a panel of lines
])
def test_plot_titles_fit_their_figure(shapes: list[dict[str, int]]) -> None:
    matplotlib.use("Agg")
    # The longest op name, a long device name (torch.cuda.get_device_name) and a dirty commit.
    run_ = {"device": "NVIDIA RTX PRO 6000 Blackwell Max-Q Workstation Edition", "commit": "0123456789ab+dirty"}
    records = [_record("linear_policy_loss", p, shape, 1.0, 10**9) for p in ("matmuls", "rlops-triton")
               for shape in shapes]
    fig = plots.figure("linear_policy_loss", run_, records)
    fig.canvas.draw()
    (title,) = fig.texts  # the suptitle
    box, page = title.get_window_extent(fig.canvas.get_renderer()), fig.bbox
    assert page.x0 <= box.x0 and box.x1 <= page.x1 and page.y0 <= box.y0 and box.y1 <= page.y1, (box, page)
    assert "0123456789ab+dirty" in title.get_text().replace("\n", " ")


@pytest.mark.parametrize("module, install", [("triton", "pip install triton"), ("numpy", "pip install numpy")])
def test_bench_names_a_missing_module_and_how_to_install_it(monkeypatch: pytest.MonkeyPatch,
                                                            capsys: pytest.CaptureFixture, tmp_path: Path,
                                                            module: str, install: str) -> None:
    monkeypatch.setenv("TRITON_INTERPRET", "1")  # the interpreter is what needs NumPy
    monkeypatch.setitem(sys.modules, module, None)  # as if not installed
    assert run.main(["--quick", "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"{module} is not installed" in err and install in err, err
    assert not any(tmp_path.iterdir())  # refused before any work


def test_sass_report_refuses_the_interpreter_and_writes_json(monkeypatch: pytest.MonkeyPatch, tmp_path: Path,
                                                            capsys: pytest.CaptureFixture[str]) -> None:
    """`rlops bench --sass`: compiled code only (one line and exit 2 under the interpreter); the
    report as a table and, with --out, JSON (the compile itself is tests/test_compile.py's)."""
    from rlops.bench import run, sass

    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert run.main(["--sass"]) == 2
    assert "unset TRITON_INTERPRET" in capsys.readouterr().err
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    report = {"_k[X=1]/bf16/sm_80": {"ld_v4": True, "st_v4": False, "REG": 40, "ctas_per_sm": 6,
                                     "loop_instructions": [246], "instr_per_elem": 15.38}}
    monkeypatch.setattr(sass, "main", lambda archs: report if archs == [80] else {})
    assert run.main(["--sass", "--arch", "80", "--out", str(tmp_path)]) == 0
    assert "| _k[X=1]/bf16/sm_80 | 40 | 0 | 6 | yes | no | 15.38 |" in capsys.readouterr().out
    assert json.loads((tmp_path / "sass-sm_80.json").read_text()) == report
    # Another library's kernel that does not compile is a row, not a failure; one of rlops' is.
    report = {**report, "liger:_k/bf16/sm_80": {"error": "arguments without a type here: X (LIGER_CASES)"}}
    assert run.main(["--sass", "--arch", "80"]) == 0
    assert "| liger:_k/bf16/sm_80 | error: arguments without a type here" in capsys.readouterr().out
    report["_k[X=1]/bf16/sm_80"] = {"error": "CompilationError: ..."}
    assert run.main(["--sass", "--arch", "80"]) == 1
