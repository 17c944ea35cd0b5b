"""Benchmark machinery shared by every op: environment record, timing, memory, result files.

Timing is the median of `triton.testing.do_bench` (CUDA events, L2 flushed between runs).
Bandwidth is an explicit byte count (each op states its minimum traffic) over the median
time, also given as a fraction of a measured device-to-device copy. Memory is the peak of
`torch.cuda.max_memory_allocated` during one forward+backward; "extra" is that peak minus
the inputs and the gradient the op must return. On a CPU (`--quick` smoke runs) times come
from a wall clock and carry no claim.
"""

from __future__ import annotations

import datetime
import json
import math
import re
import statistics
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]


PHASES = ("fwd", "bwd", "fwd_bwd")


class Skip(Exception):
    """A provider that cannot run here (not installed, unsupported shape); the reason is printed."""


@dataclass
class Record:
    op: str
    provider: str
    shape: dict[str, int]
    dtype: str
    ms: dict[str, float | None] = field(default_factory=lambda: dict.fromkeys(PHASES))
    bytes: int = 0
    gbps: float | None = None
    frac_copy_bw: float | None = None
    peak_mem_bytes: int | None = None
    extra_mem_bytes: int | None = None
    tflops: float | None = None  # for ops whose work is matrix products
    error: str | None = None


def compiled_provider(fn: Callable) -> Callable:
    """A provider running torch.compile(fn), compiled on first use (torch recompiles for new
    shapes itself); skipped off CUDA, where compiled CPU code is not what is being compared."""
    compiled: Callable | None = None

    def run(*args: object) -> object:
        nonlocal compiled
        if not torch.cuda.is_available():
            raise Skip("torch.compile is compared on CUDA only")
        if compiled is None:
            compiled = torch.compile(fn)
        return compiled(*args)

    return run


def rlops_cuda(fn: Callable) -> Callable:
    """A provider running rlops' CUDA C++ backend: skipped, with the reason, where it is not built."""
    from rlops.ops._backend import cuda_backend_unavailable

    def run(*args: object) -> object:
        reason = cuda_backend_unavailable()
        if reason is not None:
            raise Skip(reason)
        return fn(*args)

    return run


def device_name() -> str:
    return torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"


def slug(name: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")


def _git(*args: str) -> str:
    try:
        return subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True, timeout=30).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return ""


def environment() -> dict[str, object]:
    import triton

    commit = _git("rev-parse", "--short=12", "HEAD") or "unknown"
    if _git("status", "--porcelain", "--untracked-files=no"):
        commit += "+dirty"
    return {
        "device": device_name(),
        "commit": commit,
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "torch": torch.__version__,
        "triton": triton.__version__,
    }


def time_ms(fn: Callable[[], object]) -> float:
    """Median milliseconds per call."""
    if torch.cuda.is_available():
        from triton.testing import do_bench

        return float(do_bench(fn, warmup=25, rep=200, return_mode="median"))
    fn()
    samples = []
    for _ in range(3):
        start = time.perf_counter()
        fn()
        samples.append((time.perf_counter() - start) * 1e3)
    return statistics.median(samples)


def copy_bandwidth_gbps(nbytes: int = 1 << 31) -> float:
    """Device-to-device copy rate counting bytes read plus bytes written."""
    if not torch.cuda.is_available():
        nbytes = 1 << 24
    src = torch.empty(nbytes, dtype=torch.uint8, device="cuda" if torch.cuda.is_available() else "cpu")
    src.random_(0, 255)
    dst = torch.empty_like(src)
    ms = time_ms(lambda: dst.copy_(src))
    return 2 * nbytes / ms / 1e6


def matmul_tflops(n: int = 8192) -> float:
    """bf16 matrix-product rate on random data (zeros run faster and would flatter it)."""
    if not torch.cuda.is_available():
        n = 256
    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.bfloat16 if torch.cuda.is_available() else torch.float32
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    ms = time_ms(lambda: a @ b)
    return 2 * n**3 / ms / 1e9


def peak_memory(fn: Callable[[], object]) -> int | None:
    """Peak bytes allocated while fn runs (its result is dropped afterwards)."""
    if not torch.cuda.is_available():
        return None
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    result = fn()
    torch.cuda.synchronize()
    del result
    return int(torch.cuda.max_memory_allocated())


def default_out_dir(device: str) -> Path:
    """bench/results/<gpu-name>/ of this checkout; ./bench-results/<gpu-name>/ for an installed rlops."""
    checkout = (ROOT / "setup.py").is_file() and Path(__file__).parent.name == "bench"
    return (ROOT / "bench" / "results" if checkout else Path.cwd() / "bench-results") / slug(device)


def results_stem(env: dict[str, object]) -> str:
    stamp = str(env["date"]).replace(":", "").replace("-", "")[:15]
    return f"{stamp}-{str(env['commit']).replace('+', '-')}"


def write_results(run: dict[str, object], out_dir: Path) -> list[Path]:
    """Writes the run's JSON, then the markdown table and one plot per op generated from that JSON."""
    out_dir.mkdir(parents=True, exist_ok=True)
    stem = results_stem(run)
    json_path, md_path = out_dir / f"{stem}.json", out_dir / f"{stem}.md"
    json_path.write_text(json.dumps(run, indent=1) + "\n")
    md_path.write_text(markdown_table(run))
    written = [json_path, md_path, *plots(run, out_dir, stem)]
    faster = faster_backends(run)
    if faster:
        auto_path = out_dir / f"{stem}-auto-backend.json"
        auto_path.write_text(json.dumps({"faster": {run["device"]: faster}}, indent=1) + "\n")
        written.append(auto_path)
    return written


def faster_backends(run: dict[str, object]) -> dict[str, str]:
    """{op: "cuda" | "triton"}: the faster rlops backend per op, by the geometric mean over the
    op's shapes of the forward+backward time ratio, for the ops where both ran without error.
    This is what rlops/ops/auto_backend.json records per GPU for backend="auto"."""
    times: dict[tuple[str, str], dict[str, float]] = {}
    for r in run["records"]:
        if r["provider"] in ("rlops-triton", "rlops-cuda") and not r.get("error") and _total_ms(r):
            times.setdefault((r["op"], json.dumps(r["shape"], sort_keys=True)), {})[r["provider"]] = _total_ms(r)
    log_ratios: dict[str, list[float]] = {}
    for (op, _), by_provider in times.items():
        if len(by_provider) == 2:
            log_ratios.setdefault(op, []).append(math.log(by_provider["rlops-triton"] / by_provider["rlops-cuda"]))
    return {op: "cuda" if sum(logs) > 0 else "triton" for op, logs in sorted(log_ratios.items())}


# The framework code each op's speed-up is measured against.
BASELINES = ("eager-trl", "python-loop")
# The floor an op is also measured against (the time of its bare matrix products).
FLOORS = ("matmuls",)


def _total_ms(r: dict[str, object]) -> float | None:
    """Forward+backward time, or the forward alone for ops without a backward."""
    return r["ms"].get("fwd_bwd") or r["ms"].get("fwd")


def _fmt(v: float | None, digits: int = 3) -> str:
    return "-" if v is None else f"{v:.{digits}g}"


def markdown_table(run: dict[str, object]) -> str:
    records = run["records"]
    lines = [
        f"Device: {run['device']} | commit {run['commit']} | {run['date']} | torch {run['torch']} | "
        f"triton {run['triton']} | copy bandwidth {run['copy_bandwidth_gbps']:.0f} GB/s | "
        f"bf16 matmul {run['matmul_tflops']:.0f} TFLOP/s",
        "",
        "| op | shape | dtype | provider | fwd ms | bwd ms | fwd+bwd ms | GB/s | % copy BW | TFLOP/s | extra mem GB | "
        "speed-up vs eager / loop | time / bare matmuls |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    eager, floor = {}, {}
    for r in records:
        key = (r["op"], json.dumps(r["shape"]), r["dtype"])
        for names, best in ((BASELINES, eager), (FLOORS, floor)):
            if r["provider"] in names and _total_ms(r):
                best[key] = min(best.get(key, float("inf")), _total_ms(r))
    for r in records:
        shape = shape_text(r["shape"])
        ms = r["ms"]
        if r.get("error"):
            lines.append(f"| {r['op']} | {shape} | {r['dtype']} | {r['provider']} | {r['error']} "
                         "| | | | | | | | |")
            continue
        key = (r["op"], json.dumps(r["shape"]), r["dtype"])
        base, bare = eager.get(key), floor.get(key)
        speedup = f"{base / _total_ms(r):.2f}x" if base and _total_ms(r) else "-"
        over_floor = f"{_total_ms(r) / bare:.2f}x" if bare and _total_ms(r) else "-"
        frac = None if r["frac_copy_bw"] is None else 100 * r["frac_copy_bw"]
        extra = None if r["extra_mem_bytes"] is None else r["extra_mem_bytes"] / 1e9
        lines.append(
            f"| {r['op']} | {shape} | {r['dtype']} | {r['provider']} | {_fmt(ms.get('fwd'))} | "
            f"{_fmt(ms.get('bwd'))} | {_fmt(ms.get('fwd_bwd'))} | {_fmt(r['gbps'], 4)} | {_fmt(frac)} | "
            f"{_fmt(r.get('tflops'))} | {_fmt(extra)} | {speedup} | {over_floor} |"
        )
    return "\n".join(lines) + "\n"


def shape_text(shape: dict[str, int]) -> str:
    return " ".join(f"{k}={v}" for k, v in shape.items())


def _extra_gb(r: dict[str, object]) -> float | None:
    return None if r["extra_mem_bytes"] is None else r["extra_mem_bytes"] / 1e9


def _sweeps(records: list[dict[str, object]]) -> list[tuple[str, dict[str, int], list[dict[str, object]]]]:
    """(axis, fixed dims, records) for each shape key that varies with the other dims held fixed:
    the slice with the most points along it, ties to the largest fixed dims."""
    sweeps = []
    for axis in records[0]["shape"]:
        slices: dict[tuple, list[dict[str, object]]] = {}
        for r in records:
            fixed = tuple((k, v) for k, v in r["shape"].items() if k != axis)
            slices.setdefault(fixed, []).append(r)
        fixed, chosen = max(slices.items(), key=lambda kv: (len({r["shape"][axis] for r in kv[1]}), kv[0]))
        if len({r["shape"][axis] for r in chosen}) > 1:
            sweeps.append((axis, dict(fixed), chosen))
    return sweeps


def plots(run: dict[str, object], out_dir: Path, stem: str) -> list[Path]:
    """Per op, time and extra memory against each swept shape dimension (N, V, ...) per provider,
    or per shape as bars where no dimension is swept; written as <stem>-<op>.png."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: no plots written")
        return []
    written = []
    smoke = " - CPU smoke run, no timing claims" if run["device"] == "cpu" else ""
    for op in dict.fromkeys(r["op"] for r in run["records"]):
        records = [r for r in run["records"] if r["op"] == op and not r.get("error")]
        if not records:
            continue
        rows = [("time (ms): fwd+bwd, or fwd alone", _total_ms)]
        if any(_extra_gb(r) is not None for r in records):
            rows.append(("extra peak memory (GB)", _extra_gb))
        panels = _sweeps(records) or [(None, {}, records)]
        fig, axes = plt.subplots(len(rows), len(panels), squeeze=False,
                                 figsize=(5.5 * len(panels), 3.8 * len(rows)))
        for col, (axis, fixed, chosen) in enumerate(panels):
            providers = list(dict.fromkeys(r["provider"] for r in chosen))
            for row, (label, value) in enumerate(rows):
                ax = axes[row, col]
                if axis is None:
                    names = list(dict.fromkeys(shape_text(r["shape"]) for r in chosen))
                    width = 0.8 / len(providers)
                    for k, provider in enumerate(providers):
                        pts = [(names.index(shape_text(r["shape"])), value(r))
                               for r in chosen if r["provider"] == provider and value(r) is not None]
                        offset = (k - (len(providers) - 1) / 2) * width
                        ax.bar([x + offset for x, _ in pts], [y for _, y in pts], width, label=provider)
                    ax.set_xticks(range(len(names)), names, fontsize=8)
                else:
                    for provider in providers:
                        pts = sorted((r["shape"][axis], value(r)) for r in chosen
                                     if r["provider"] == provider and value(r) is not None)
                        ax.plot([x for x, _ in pts], [y for _, y in pts], marker="o", label=provider)
                    ax.set_xscale("log", base=2)
                    ax.set_xlabel(f"{axis}  ({shape_text(fixed)})" if fixed else axis)
                ax.set_ylabel(label)
                if row == 0:  # times span decades; extra memory can be 0 or negative (in-place providers)
                    ax.set_yscale("log")
                ax.legend(fontsize=7)
        fig.suptitle(f"{op} on {run['device']} ({run['commit']}){smoke}")
        fig.tight_layout()
        path = out_dir / f"{stem}-{op}.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        written.append(path)
    return written
