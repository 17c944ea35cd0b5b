"""The benchmark driver (`rlops bench`): every op, provider and shape; one JSON per run, plus a
markdown table and per-op plots generated from it."""

from __future__ import annotations

import argparse
import gc
import json
import sys
from collections.abc import Callable
from pathlib import Path
from types import ModuleType

import torch

from . import common, gae, linear_policy_loss, objectives, packed_policy_loss, policy_loss, token_stats
from .common import Record, Skip

OPS: dict[str, ModuleType] = {
    "token_stats": token_stats,
    "policy_loss": policy_loss,
    "linear_policy_loss": linear_policy_loss,
    "packed_policy_loss": packed_policy_loss,
    "gae": gae,
    "objectives": objectives,
}
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def _shapes(text: str | None, module: ModuleType, quick: bool) -> list[tuple[int, ...]]:
    if quick:
        return module.QUICK_SHAPES
    if text is None:
        return module.DEFAULT_SHAPES
    if text == "all":
        return module.SHAPES
    keys = getattr(module, "SHAPE_KEYS", ("N", "V"))
    try:
        shapes = [tuple(int(x) for x in item.lower().split("x")) for item in text.split(",")]
    except ValueError as e:
        raise SystemExit(f"--shapes takes {'x'.join(keys)}[,...] or 'all', got {text!r}") from e
    if any(len(shape) != len(keys) for shape in shapes):
        raise SystemExit(f"--shapes for {module.OP} takes {'x'.join(keys)}, got {text!r}")
    return shapes


def _free() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def case_dtype(module: ModuleType, dtype: torch.dtype) -> torch.dtype:
    """The op's own input dtype where it has one (gae: float32), else the run's."""
    return getattr(module, "DTYPE", dtype)


def case_steps(module: ModuleType, provider: str, shape: tuple[int, ...], dtype: torch.dtype
               ) -> tuple[dict[str, torch.Tensor], Callable[[], object], Callable[[], object] | None]:
    """(inputs, forward, forward+backward or None) of one case: the setup shared by the speed
    and memory runs and by the pytest-benchmark cases."""
    inputs = module.setup(*shape, case_dtype(module, dtype), device())
    return (inputs, *module.make_step(provider, inputs))


def _time(rec: Record, forward: Callable[[], object], forward_backward: Callable[[], object] | None) -> None:
    """Medians of the forward and of the forward+backward; the backward only where it is meaningful."""
    fwd = common.time_quantiles(forward)
    rec.ms["fwd"] = fwd.median
    if forward_backward is not None:
        fwd_bwd = common.time_quantiles(forward_backward)
        rec.ms["fwd_bwd"] = fwd_bwd.median
        rec.ms["bwd"] = common.backward_ms(fwd, fwd_bwd)


def _rates(rec: Record, module: ModuleType, shape: tuple[int, ...], dtype: torch.dtype, phase: str,
           copy_bw: float | None) -> None:
    """Bytes of the timed phase, and where it was timed, GB/s, the fraction of copy bandwidth and TFLOP/s."""
    rec.bytes = module.bytes_moved(*shape, torch.finfo(dtype).bits // 8)[phase]
    ms = rec.ms[phase]
    if ms is None:  # no timing: no rate either
        return
    rec.gbps = rec.bytes / ms / 1e6
    rec.frac_copy_bw = None if copy_bw is None else rec.gbps / copy_bw
    if hasattr(module, "flops"):
        rec.tflops = module.flops(*shape)[phase] / ms / 1e9


def run_case(module: ModuleType, provider: str, shape: tuple[int, ...], dtype: torch.dtype,
             copy_bw: float | None) -> Record:
    """Times one provider on one shape (ops without a backward, gae, time the forward alone). Where
    nothing is timed (the interpreter, no CUDA) the case runs once, as a smoke test, and its times stay null."""
    dtype = case_dtype(module, dtype)
    keys = getattr(module, "SHAPE_KEYS", ("N", "V"))
    rec = Record(module.OP, provider, dict(zip(keys, shape, strict=True)), str(dtype).removeprefix("torch."))
    phase = "fwd"
    try:
        inputs, forward, forward_backward = case_steps(module, provider, shape, dtype)
        measured = forward_backward or forward
        phase = "fwd" if forward_backward is None else "fwd_bwd"
        _free()
        base = torch.cuda.memory_allocated() if torch.cuda.is_available() else 0
        rec.peak_mem_bytes = common.peak_memory(measured)
        if rec.peak_mem_bytes is not None:
            rec.extra_mem_bytes = rec.peak_mem_bytes - base - module.grad_bytes(provider, inputs)
        if common.no_timing_reason() is None:
            _time(rec, forward, forward_backward)
        else:
            measured()  # forward+backward calls the forward: one call runs the whole case
    except torch.cuda.OutOfMemoryError:
        rec.error = "out of memory"
    finally:
        inputs = forward = forward_backward = measured = None
        _free()
    if rec.error is None:
        _rates(rec, module, shape, dtype, phase, copy_bw)
    return rec


def build_parser(prog: str = "rlops bench") -> argparse.ArgumentParser:
    """The arguments of `rlops bench`: every option has a help line, with its choices and unit."""
    providers = list(dict.fromkeys(p for module in OPS.values() for p in module.PROVIDERS))
    parser = argparse.ArgumentParser(prog=prog, description=__doc__)
    parser.add_argument("--ops", nargs="+", default=list(OPS), choices=list(OPS), metavar="OP",
                        help=f"ops to run, one or more of: {', '.join(OPS)} (default: all)")
    parser.add_argument("--providers", nargs="+", choices=providers, metavar="PROVIDER",
                        help=f"implementations to run, one or more of: {', '.join(providers)} "
                             "(default: every provider of each op; --list shows which op has which)")
    parser.add_argument("--shapes", help="NxV[,NxV...] in tokens x vocabulary entries (NxVxH for linear_policy_loss, "
                                         "BxT for gae), or 'all' (default: each op's headline shapes)")
    parser.add_argument("--dtype", default="bf16", choices=list(DTYPES),
                        help=f"input dtype, one of: {', '.join(DTYPES)} (default: bf16; gae is always float32)")
    parser.add_argument("--quick", action="store_true",
                        help="tiny shapes: a smoke test with no timing claims (without CUDA: untimed)")
    parser.add_argument("--out", type=Path, metavar="DIR",
                        help="folder for the results (default: bench/results/<gpu-name>/ of this checkout)")
    parser.add_argument("--list", action="store_true", help="print the ops, their providers and shapes, and exit")
    parser.add_argument("--sass", action="store_true",
                        help="no benchmark: compile every kernel for --arch (no GPU needed) and print registers, "
                             "spills, resident CTAs per SM, 16-byte accesses and SASS instructions per streamed "
                             "element; with --out, also write them as JSON")
    parser.add_argument("--arch", nargs="+", type=int, default=[90], choices=[80, 90], metavar="SM",
                        help="CUDA architectures for --sass, one or more of: 80, 90 (default: 90)")
    return parser


def _sass_report(args: argparse.Namespace, prog: str) -> int:
    """`rlops bench --sass`: the kernels' compile report (rlops.bench.sass) as a table, and JSON with --out."""
    if common.interpreter_requested():
        print(f"{prog} --sass compiles the kernels, which Triton's interpreter replaces: unset TRITON_INTERPRET",
              file=sys.stderr)
        return 2
    missing = common.missing_dependency(prog, {"triton": ("the compiler and its bundled ptxas", "pip install triton")})
    if missing:
        print(missing, file=sys.stderr)
        return 2
    from . import sass  # imports the kernels: only here, after the interpreter check

    results = sass.main(args.arch)
    print(sass.table(results))
    if args.out is not None:
        args.out.mkdir(parents=True, exist_ok=True)
        path = args.out / f"sass-{'-'.join(f'sm_{a}' for a in args.arch)}.json"
        path.write_text(json.dumps(results, indent=1) + "\n")
        print(f"wrote {path}")
    # Another library's kernel that does not compile here is a row of the table, not a failure.
    return 1 if any("error" in r for key, r in results.items() if not sass.is_comparison(key)) else 0


def check_dependencies(prog: str) -> str | None:
    """One line naming a module `rlops bench` needs that is not installed (and how to install it), or None."""
    needs = {"triton": ("the Triton kernels and the timer (do_bench); Triton ships Linux wheels only",
                        "pip install triton")}
    if common.interpreter_requested() or not torch.cuda.is_available():
        needs["numpy"] = ("Triton's interpreter, which runs the kernels without CUDA", "pip install numpy")
    return common.missing_dependency(prog, needs)


def _print_list() -> None:
    for name, module in OPS.items():
        keys = "x".join(getattr(module, "SHAPE_KEYS", ("N", "V")))
        shapes = ", ".join("x".join(map(str, s)) for s in module.SHAPES)
        print(f"{name}: providers {', '.join(module.PROVIDERS)}; shapes ({keys}) {shapes}")


def _environment() -> dict[str, object]:
    """The run's environment, with the machine's copy bandwidth and matmul rate where there is timing."""
    env = common.environment()
    print(f"device {env['device']}, torch {env['torch']}, triton {env['triton']}, commit {env['commit']}")
    env["note"] = common.no_timing_reason()
    env["copy_bandwidth_gbps"] = env["matmul_tflops"] = None
    if env["note"] is not None:
        print(f"{env['note']}: every case runs once as a smoke test; times and rates are left out (null)")
        return env
    env["copy_bandwidth_gbps"] = common.copy_bandwidth_gbps()
    env["matmul_tflops"] = common.matmul_tflops()
    print(f"copy bandwidth {env['copy_bandwidth_gbps']:.0f} GB/s, bf16 matmul {env['matmul_tflops']:.0f} TFLOP/s")
    return env


def _plan(args: argparse.Namespace) -> list[tuple[ModuleType, str, tuple[int, ...]]]:
    """(op module, provider, shape) of every case to run."""
    plan = []
    for name in args.ops:
        module = OPS[name]
        providers = args.providers or list(module.PROVIDERS)
        unknown = set(providers) - set(module.PROVIDERS)
        if unknown:
            raise SystemExit(f"unknown provider(s) for {name}: {sorted(unknown)}; known: {list(module.PROVIDERS)}")
        plan += [(module, p, shape) for shape in _shapes(args.shapes, module, args.quick) for p in providers]
    return plan


def _summary(rec: Record) -> str:
    """The case's line of progress: its error, its times and rate, or that it ran untimed."""
    if rec.error:
        return rec.error
    times = ", ".join(f"{k.replace('_', '+')} {v:.3f} ms" for k, v in rec.ms.items() if v is not None)
    if not times:
        return "ran (no timing)"
    rate = f"{rec.tflops:.0f} TFLOP/s" if rec.tflops is not None else f"{rec.gbps:.0f} GB/s"
    return f"{times}, {rate}"


def _host_overhead() -> dict[str, object]:
    """The policy loss's host time per call beside Liger's (bench/host_overhead.py), printed and
    returned for the run's JSON; {"error": why} where it cannot be measured here."""
    from . import host_overhead

    try:
        h = host_overhead.measure(rounds=3, device="cuda" if torch.cuda.is_available() else "cpu")
    except Exception as e:  # reported in the results, never fatal to the benchmark run
        print(f"host overhead: not measured: {e}", flush=True)
        return {"error": f"{type(e).__name__}: {e}"}
    print(host_overhead.summary(h), flush=True)
    return h.as_dict()


def main(argv: list[str] | None = None, prog: str = "rlops bench") -> int:
    """`rlops bench`: runs the plan, prints each case, writes the JSON, table and plots; returns the exit status."""
    args = build_parser(prog).parse_args(argv)
    if args.list:
        _print_list()
        return 0
    if args.sass:
        return _sass_report(args, prog)
    missing = check_dependencies(prog)
    if missing:
        print(missing, file=sys.stderr)
        return 2
    env = _environment()
    plan = _plan(args)
    if any(module.OP == "policy_loss" for module, _, _ in plan):
        env["host_overhead"] = _host_overhead()
    out_dir = args.out or common.default_out_dir(str(env["device"]))
    records = []
    for i, (module, provider, shape) in enumerate(plan, 1):
        keys = getattr(module, "SHAPE_KEYS", ("N", "V"))
        label = f"[{i}/{len(plan)}] {module.OP} {provider} {common.shape_text(dict(zip(keys, shape, strict=True)))}"
        try:
            rec = run_case(module, provider, shape, DTYPES[args.dtype], env["copy_bandwidth_gbps"])
        except Skip as reason:
            print(f"{label}: skipped: {reason}", flush=True)
            continue
        records.append(rec)
        print(f"{label}: {_summary(rec)}", flush=True)
        common.write_json({**env, "records": [vars(r) for r in records]}, out_dir)
    run = {**env, "records": [vars(r) for r in records]}
    for path in common.write_results(run, out_dir):
        print(f"wrote {path}")
    print(common.markdown_table(run))
    return 0
