"""Compiles every Triton kernel for given CUDA architectures and prints what the tests check.

Run in a process without TRITON_INTERPRET (the interpreter replaces @triton.jit functions,
helpers included, with Python it cannot compile). Prints one JSON object:
{"<kernel>[<switches>]/<dtype>/sm_<arch>": {"ld_v4": bool, "st_v4": bool, "REG": int, "STACK": int, "LOCAL": int}}
or {"<...>": {"error": "..."}} for a kernel that does not compile.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import tempfile

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from rlops.kernels.gae import _gae_kernel
from rlops.kernels.policy_loss import _policy_loss_fwd_kernel
from rlops.kernels.token_stats import _token_stats_bwd_kernel, _token_stats_fwd_kernel

# (kernel, constexpr switches): every feature combination the launchers can ask for.
CASES = (
    [(_token_stats_fwd_kernel, {"HAS_REF": ref, "HAS_MASK": mask}) for ref in (False, True) for mask in (False, True)]
    + [(_token_stats_bwd_kernel, {"HAS_REF": ref}) for ref in (False, True)]
    + [(_policy_loss_fwd_kernel, {"HAS_OLD": True, "HAS_ISW": True, "HAS_ENT": True, "KL_KIND": kind,
                                  "KL_RATIO": kind > 0}) for kind in range(5)]
    + [(_policy_loss_fwd_kernel, {"HAS_OLD": False, "HAS_ISW": False, "HAS_ENT": False, "KL_KIND": 0,
                                  "KL_RATIO": False})]
    + [(_gae_kernel, {"HAS_BOOT": boot}) for boot in (False, True)]
)
# Per kernel: the constexpr block size the launchers use, and the element type of its
# "logit-like" pointers (GAE's rewards and values take the dtype under test).
BLOCKS = {"_gae_kernel": ("BLOCK_T", 1024)}
LOGIT_PTRS = {"x_ptr", "dx_ptr", "ref_ptr", "r_ptr", "v_ptr"}
INDEX_PTRS = {"tokens_ptr"}
BYTE_PTRS = {"mask_ptr", "m_ptr"}
I32_ARGS = {"N", "V", "T", "inner", "ref_inner"}
STRIDE_ARGS = {"stride_outer", "stride_inner", "ref_stride_outer", "ref_stride_inner", "dx_stride_outer",
               "dx_stride_inner", "r_stride", "v_stride", "m_stride"}
FLOAT_ARGS = {"inv_tau", "clip_low", "clip_high", "dual_clip", "kl_coef", "entropy_coef", "gamma", "lam"}


# Switches that triton.heuristics derives from a pointer's None-ness: off means that pointer is None.
SWITCH_PTRS = {"HAS_MASK": "mask_ptr", "HAS_OLD": "old_ptr", "HAS_ISW": "isw_ptr",
               "HAS_ENT": "ent_coef_ptr", "HAS_BOOT": "boot_ptr"}


def jit_function(fn: object) -> object:
    """The @triton.jit function under any wrappers (triton.heuristics, the interpreter's)."""
    while not hasattr(fn, "params") and hasattr(fn, "fn"):
        fn = fn.fn
    return fn


def case_key(fn: object, switches: dict[str, object], dtype: str, arch: int) -> str:
    name = jit_function(fn).__name__
    flags = ",".join(f"{k}={int(v)}" for k, v in switches.items())
    return f"{name}[{flags}]/{dtype}/sm_{arch}"


def signature(fn: triton.JITFunction, dtype: str, switches: dict[str, object]
              ) -> tuple[dict[str, str], dict[str, object], dict[tuple[int, ...], list]]:
    fn = jit_function(fn)
    block_name, block = BLOCKS.get(fn.__name__, ("BLOCK_V", 4096))
    sig, constexprs, attrs = {}, {block_name: block, **switches}, {}
    absent = {SWITCH_PTRS[k] for k, on in switches.items() if k in SWITCH_PTRS and not on}
    for i, param in enumerate(fn.params):
        name = param.name
        if name in absent:
            sig[name], constexprs[name] = "constexpr", None
            continue
        if param.is_constexpr:
            sig[name] = "constexpr"
            continue
        if name in LOGIT_PTRS:
            sig[name] = f"*{dtype}"
        elif name in INDEX_PTRS:
            sig[name] = "*i64"
        elif name in BYTE_PTRS:
            sig[name] = "*u8"
        elif name.endswith("_ptr"):
            sig[name] = "*fp32"
        elif name in I32_ARGS:
            sig[name] = "i32"
        elif name in STRIDE_ARGS:
            sig[name] = "i64"
        elif name in FLOAT_ARGS:
            sig[name] = "fp32"
        else:
            raise KeyError(f"unknown argument {name!r} of {fn.__name__}: give it a type in compile_kernels.py")
        if name.endswith("_ptr") or name in ("N", "V", "T") or name in STRIDE_ARGS:
            attrs[(i,)] = [["tt.divisibility", 16]]  # what the JIT infers for V = 151936
    return sig, constexprs, attrs


def resources(cubin: bytes) -> dict[str, int]:
    cuobjdump = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        out = subprocess.run([cuobjdump, "-res-usage", f.name], capture_output=True, text=True, check=True).stdout
    return {k: int(v) for k, v in re.findall(r"\b(REG|STACK|LOCAL):(\d+)", out)}


def main(archs: list[int]) -> dict[str, dict[str, object]]:
    results: dict[str, dict[str, object]] = {}
    for fn, switches in CASES:
        for dtype in ("bf16", "fp32"):
            for arch in archs:
                key = case_key(fn, switches, dtype, arch)
                try:
                    sig, constexprs, attrs = signature(fn, dtype, switches)
                    src = ASTSource(jit_function(fn), sig, constexprs=constexprs, attrs=attrs)
                    compiled = triton.compile(src, target=GPUTarget("cuda", arch, 32), options={"num_warps": 8})
                except Exception as e:  # reported to the test, which fails with the message
                    results[key] = {"error": f"{type(e).__name__}: {e}"}
                    continue
                ptx = compiled.asm["ptx"]
                results[key] = {
                    "ld_v4": bool(re.search(r"ld\.global(?:\.\w+)*\.v4", ptx)),
                    "st_v4": bool(re.search(r"st\.global(?:\.\w+)*\.v4", ptx)),
                    **resources(compiled.asm["cubin"]),
                }
    return results


if __name__ == "__main__":
    os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    print(json.dumps(main([int(a) for a in sys.argv[1:]] or [80, 90])))
