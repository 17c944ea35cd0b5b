"""The benchmark driver (`rlops bench`): every op, provider and shape; one JSON per run, plus a
markdown table and per-op plots generated from it."""

from __future__ import annotations

import argparse
import gc
from collections.abc import Callable
from pathlib import Path
from types import ModuleType

import torch

from . import common, gae, linear_policy_loss, policy_loss, token_stats
from .common import Record, Skip

OPS: dict[str, ModuleType] = {
    "token_stats": token_stats,
    "policy_loss": policy_loss,
    "linear_policy_loss": linear_policy_loss,
    "gae": gae,
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


def run_case(module: ModuleType, provider: str, shape: tuple[int, ...], dtype: torch.dtype, copy_bw: float) -> Record:
    """Times one provider on one shape; ops without a backward (gae) time the forward alone."""
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
        rec.ms["fwd"] = common.time_ms(forward)
        if forward_backward is not None:
            rec.ms["fwd_bwd"] = common.time_ms(forward_backward)
            # The backward alone is the difference: timing it on a retained graph would change what
            # is measured (torch.compile's donated buffers forbid it, and memory stays held).
            rec.ms["bwd"] = rec.ms["fwd_bwd"] - rec.ms["fwd"]
    except torch.cuda.OutOfMemoryError:
        rec.error = "out of memory"
    finally:
        inputs = forward = forward_backward = measured = None
        _free()
    if rec.error is None:
        rec.bytes = module.bytes_moved(*shape, torch.finfo(dtype).bits // 8)[phase]
        rec.gbps = rec.bytes / rec.ms[phase] / 1e6
        rec.frac_copy_bw = rec.gbps / copy_bw
        if hasattr(module, "flops"):
            rec.tflops = module.flops(*shape)[phase] / rec.ms[phase] / 1e9
    return rec


def main(argv: list[str] | None = None, prog: str = "rlops bench") -> int:
    parser = argparse.ArgumentParser(prog=prog, description=__doc__)
    parser.add_argument("--ops", nargs="+", default=list(OPS), choices=list(OPS))
    parser.add_argument("--providers", nargs="+", help="default: every provider of each op")
    parser.add_argument("--shapes", help="NxV[,NxV...] or 'all' (default: each op's headline shape)")
    parser.add_argument("--dtype", default="bf16", choices=list(DTYPES))
    parser.add_argument("--quick", action="store_true", help="tiny shapes: a smoke test, no timing claims")
    parser.add_argument("--out", type=Path, help="default: bench/results/<gpu-name>/ of this checkout")
    parser.add_argument("--list", action="store_true", help="print the ops, their providers and shapes, and exit")
    args = parser.parse_args(argv)
    if args.list:
        for name, module in OPS.items():
            keys = "x".join(getattr(module, "SHAPE_KEYS", ("N", "V")))
            shapes = ", ".join("x".join(map(str, s)) for s in module.SHAPES)
            print(f"{name}: providers {', '.join(module.PROVIDERS)}; shapes ({keys}) {shapes}")
        return 0

    env = common.environment()
    print(f"device {env['device']}, torch {env['torch']}, triton {env['triton']}, commit {env['commit']}")
    env["copy_bandwidth_gbps"] = common.copy_bandwidth_gbps()
    env["matmul_tflops"] = common.matmul_tflops()
    print(f"copy bandwidth {env['copy_bandwidth_gbps']:.0f} GB/s, bf16 matmul {env['matmul_tflops']:.0f} TFLOP/s")

    plan = []
    for name in args.ops:
        module = OPS[name]
        providers = args.providers or list(module.PROVIDERS)
        unknown = set(providers) - set(module.PROVIDERS)
        if unknown:
            raise SystemExit(f"unknown provider(s) for {name}: {sorted(unknown)}; known: {list(module.PROVIDERS)}")
        plan += [(module, p, shape) for shape in _shapes(args.shapes, module, args.quick) for p in providers]

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
        if rec.error:
            print(f"{label}: {rec.error}", flush=True)
        else:
            times = ", ".join(f"{k.replace('_', '+')} {v:.3f} ms" for k, v in rec.ms.items() if v is not None)
            rate = f"{rec.tflops:.0f} TFLOP/s" if rec.tflops is not None else f"{rec.gbps:.0f} GB/s"
            print(f"{label}: {times}, {rate}", flush=True)

    run = {**env, "records": [vars(r) for r in records]}
    out_dir = args.out or common.default_out_dir(str(env["device"]))
    for path in common.write_results(run, out_dir):
        print(f"wrote {path}")
    print(common.markdown_table(run))
    return 0
