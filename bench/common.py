"""Benchmark machinery shared by every op: environment record, timing, memory, result files.

Timing is the median of `triton.testing.do_bench` (CUDA events, L2 flushed between runs).
The backward's time is the difference of the fwd+bwd and fwd medians, recorded only when the
two distributions do not overlap (otherwise noise decides its sign, and it is null).
Bandwidth is an explicit byte count (each op states its minimum traffic) over the median
time, also given as a fraction of a measured device-to-device copy. Memory is the peak of
`torch.cuda.max_memory_allocated` during one forward+backward; "extra" is that peak minus
the inputs and the gradient the op must return. Without CUDA, or under Triton's interpreter
(`--quick` smoke runs), nothing is timed: each case runs once and its times are null.
"""

from __future__ import annotations

import datetime
import importlib.util
import json
import math
import os
import re
import subprocess
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

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


def in_checkout() -> bool:
    """True when this file is bench/ of an rlops source checkout (not an installed rlops.bench)."""
    return (ROOT / "setup.py").is_file() and Path(__file__).parent.name == "bench"


def _git(*args: str) -> str:
    """git's output in the checkout, or "" (no git, or not a checkout: an installed rlops may sit
    inside someone else's repository, whose commit is not rlops')."""
    if not in_checkout():
        return ""
    try:
        return subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True, timeout=30).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return ""


def rlops_version() -> str:
    """The installed rlops' version ("0.0.0+unknown" for a source tree that was never installed)."""
    from rlops import __version__

    return __version__


def _triton_version() -> str:
    try:
        import triton
    except ImportError:
        return "not installed"
    return triton.__version__


def environment() -> dict[str, object]:
    """Device, commit, date and versions of a run. Outside a git checkout the commit is the installed
    version ("v0.1.0"), so result files are still told apart by what produced them."""
    # A copy without .git (the GPU machine's) names its commit in RLOPS_COMMIT.
    commit = os.environ.get("RLOPS_COMMIT") or _git("rev-parse", "--short=12", "HEAD") or f"v{rlops_version()}"
    if "RLOPS_COMMIT" not in os.environ and _git("status", "--porcelain", "--untracked-files=no"):
        commit += "+dirty"
    return {
        "device": device_name(),
        "commit": commit,
        "rlops": rlops_version(),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "torch": torch.__version__,
        "triton": _triton_version(),
    }


def importable(name: str) -> bool:
    """Whether the module can be found, without importing it (a None in sys.modules counts as missing)."""
    try:
        return importlib.util.find_spec(name) is not None
    except (ImportError, ValueError):
        return False


def missing_dependency(prog: str, needs: dict[str, tuple[str, str]]) -> str | None:
    """One line naming the first module of needs ({module: (what it is for, how to install it)})
    that is not installed, or None when all are."""
    for name, (purpose, install) in needs.items():
        if not importable(name):
            return f"{prog}: {name} is not installed; it is needed for {purpose}. Install it with: {install}"
    return None


def interpreter_requested() -> bool:
    """TRITON_INTERPRET as Triton reads it: the kernels will run in the interpreter (which needs NumPy)."""
    return os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "yes", "on", "y")


def no_timing_reason() -> str | None:
    """Why this run times nothing, or None. Only compiled kernels on CUDA give times worth a claim:
    the interpreter's are seconds of NumPy, and CPU wall clocks of tiny shapes are noise."""
    if interpreter_requested():
        return "interpreter: no timing"
    if not torch.cuda.is_available():
        return "no CUDA: no timing"
    return None


class Timing(NamedTuple):
    """Quantiles (ms) of one closure's times under do_bench."""

    low: float  # 20th percentile
    median: float
    high: float  # 80th percentile


def time_quantiles(fn: Callable[[], object]) -> Timing:
    """The 20th, 50th and 80th percentiles of fn's time per call, in ms (CUDA only)."""
    from triton.testing import do_bench

    low, median, high = do_bench(fn, warmup=25, rep=200, quantiles=[0.2, 0.5, 0.8])
    return Timing(float(low), float(median), float(high))


def time_ms(fn: Callable[[], object]) -> float:
    """Median milliseconds per call (CUDA only)."""
    return time_quantiles(fn).median


def backward_ms(fwd: Timing, fwd_bwd: Timing) -> float | None:
    """The backward alone as the difference of the medians, or None when that difference is not
    meaningful: when fwd+bwd's 20th percentile is not above the forward's 80th percentile, noise
    could give either sign. (Timing the backward on a retained graph would change what is
    measured: torch.compile's donated buffers forbid it, and memory stays held.)"""
    if fwd_bwd.low <= fwd.high:
        return None
    return fwd_bwd.median - fwd.median


def copy_bandwidth_gbps(nbytes: int = 1 << 31) -> float:
    """Device-to-device copy rate counting bytes read plus bytes written (CUDA only)."""
    src = torch.empty(nbytes, dtype=torch.uint8, device="cuda")
    src.random_(0, 255)
    dst = torch.empty_like(src)
    ms = time_ms(lambda: dst.copy_(src))
    return 2 * nbytes / ms / 1e6


def matmul_tflops(n: int = 8192) -> float:
    """bf16 matrix-product rate on random data (zeros run faster and would flatter it); CUDA only."""
    a = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
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
    return (ROOT / "bench" / "results" if in_checkout() else Path.cwd() / "bench-results") / slug(device)


def results_stem(env: dict[str, object]) -> str:
    stamp = str(env["date"]).replace(":", "").replace("-", "")[:15]
    return f"{stamp}-{str(env['commit']).replace('+', '-')}"


def write_json(run: dict[str, object], out_dir: Path) -> Path:
    """Writes (or rewrites) the run's JSON, renamed into place: `rlops bench` calls it after every
    case, so a run cut short (a time limit, a crash) keeps the cases it finished."""
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"{results_stem(run)}.json"
    partial = path.with_suffix(".json.partial")
    partial.write_text(json.dumps(run, indent=1) + "\n")
    partial.replace(path)
    return path


def write_results(run: dict[str, object], out_dir: Path) -> list[Path]:
    """Writes the run's JSON, then the markdown table and one plot per op generated from that JSON."""
    json_path = write_json(run, out_dir)
    stem = results_stem(run)
    md_path = out_dir / f"{stem}.md"
    md_path.write_text(markdown_table(run))
    from .plots import plots  # matplotlib's module is imported only when results are written

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
        if r["provider"] in ("rlops-triton", "rlops-cuda") and not r.get("error") and total_ms(r):
            times.setdefault((r["op"], json.dumps(r["shape"], sort_keys=True)), {})[r["provider"]] = total_ms(r)
    log_ratios: dict[str, list[float]] = {}
    for (op, _), by_provider in times.items():
        if len(by_provider) == 2:
            log_ratios.setdefault(op, []).append(math.log(by_provider["rlops-triton"] / by_provider["rlops-cuda"]))
    return {op: "cuda" if sum(logs) > 0 else "triton" for op, logs in sorted(log_ratios.items())}


# The framework code each op's speed-up is measured against.
BASELINES = ("eager-trl", "python-loop")
# The floor an op is also measured against (the time of its bare matrix products).
FLOORS = ("matmuls",)


def total_ms(r: dict[str, object]) -> float | None:
    """Forward+backward time, or the forward alone for ops without a backward."""
    return r["ms"].get("fwd_bwd") or r["ms"].get("fwd")


def _fmt(v: float | None, digits: int = 3) -> str:
    return "-" if v is None else f"{v:.{digits}g}"


def _header(run: dict[str, Any]) -> str:
    """The table's first line: where and what ran, and the machine's measured rates (or why there are none)."""
    where = (f"Device: {run['device']} | commit {run['commit']} | {run['date']} | torch {run['torch']} | "
             f"triton {run['triton']}")
    host = run.get("host_overhead") or {}
    if host.get("rlops_us") is not None:  # bench/host_overhead.py: the policy loss's host time per call
        liger = "" if host.get("liger_us") is None else f", Liger {host['liger_us']:.0f} us"
        unchecked = "" if host.get("rlops_unchecked_us") is None else \
            f" ({host['rlops_unchecked_us']:.0f} us without the CPU-only token-id check)"
        where += f" | host time per policy-loss fwd+bwd: rlops {host['rlops_us']:.0f} us{unchecked}{liger}"
    if run.get("note"):
        return f"{where} | {run['note']}"
    return (f"{where} | copy bandwidth {run['copy_bandwidth_gbps']:.0f} GB/s | "
            f"bf16 matmul {run['matmul_tflops']:.0f} TFLOP/s")


def _fastest(records: list[dict[str, Any]], names: tuple[str, ...]) -> dict[tuple, float]:
    """{(op, shape, dtype): the fastest total time among the providers names}, timed records only."""
    best: dict[tuple, float] = {}
    for r in records:
        if r["provider"] in names and total_ms(r):
            key = (r["op"], json.dumps(r["shape"]), r["dtype"])
            best[key] = min(best.get(key, float("inf")), total_ms(r))
    return best


def _ratio(num: float | None, den: float | None) -> str:
    """num / den as "1.23x", or "-" when either time is absent (a speed-up of absent times is absent)."""
    return f"{num / den:.2f}x" if num and den else "-"


def _row(r: dict[str, Any], eager: float | None, bare: float | None, note: str | None) -> str:
    """One record's table row; with a note (no timing) its time cells say so instead of a number."""
    ms, total = r["ms"], total_ms(r)
    times = ["no timing"] * 3 if note else [_fmt(ms.get(k)) for k in ("fwd", "bwd", "fwd_bwd")]
    frac = None if r["frac_copy_bw"] is None else 100 * r["frac_copy_bw"]
    cells = [r["op"], shape_text(r["shape"]), r["dtype"], r["provider"], *times, _fmt(r["gbps"], 4), _fmt(frac),
             _fmt(r.get("tflops")), _fmt(extra_gb(r)), _ratio(eager, total), _ratio(total, bare)]
    return "| " + " | ".join(cells) + " |"


def markdown_table(run: dict[str, Any]) -> str:
    """The run as markdown: a header line, then one row per record (an error fills the row)."""
    records = run["records"]
    lines = [
        _header(run),
        "",
        "| op | shape | dtype | provider | fwd ms | bwd ms | fwd+bwd ms | GB/s | % copy BW | TFLOP/s | extra mem GB | "
        "speed-up vs eager / loop | time / bare matmuls |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    eager, floor = _fastest(records, BASELINES), _fastest(records, FLOORS)
    for r in records:
        if r.get("error"):
            lines.append(f"| {r['op']} | {shape_text(r['shape'])} | {r['dtype']} | {r['provider']} | {r['error']} "
                         "| | | | | | | | |")
            continue
        key = (r["op"], json.dumps(r["shape"]), r["dtype"])
        lines.append(_row(r, eager.get(key), floor.get(key), run.get("note")))
    return "\n".join(lines) + "\n"


def shape_text(shape: dict[str, int]) -> str:
    return " ".join(f"{k}={v}" for k, v in shape.items())


def extra_gb(r: dict[str, object]) -> float | None:
    return None if r["extra_mem_bytes"] is None else r["extra_mem_bytes"] / 1e9


def logits_steps(fn: Callable[[torch.Tensor, dict[str, torch.Tensor]], torch.Tensor],
                 inputs: dict[str, torch.Tensor]) -> tuple[Callable, Callable]:
    """(forward, forward+backward) closures of fn(logits, inputs), the gradient with respect to
    inputs["logits"] made a non-leaf once, outside the timed region, as an lm_head's output is (so
    in-place providers may overwrite it; its values then drift between repetitions, which changes
    no work done)."""
    logits = inputs["logits"].requires_grad_(True) * 1.0

    def forward() -> torch.Tensor:
        return fn(logits, inputs)

    def forward_backward() -> torch.Tensor:
        return torch.autograd.grad(forward(), logits)[0]

    return forward, forward_backward
