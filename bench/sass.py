"""The compile report of every Triton kernel for a CUDA architecture, without a GPU
(`rlops bench --sass`): registers, spills, resident CTAs per SM, 16-byte vector accesses and
SASS instructions per streamed element of each loop, from Triton's bundled ptxas and
cuobjdump. tests/test_compile.py checks its results.

Run in a process without TRITON_INTERPRET (the interpreter replaces @triton.jit functions,
helpers included, with Python it cannot compile). Results, one per case:
{"<kernel>[<switches>]/<dtype>[/V=<vocab>]/sm_<arch>": {"ld_v4": bool, "st_v4": bool,
"loop_ld_v4": bool, "loop_st_v4": bool, "REG": int, "STACK": int, "LOCAL": int, "ctas_per_sm": int,
"loop_instructions": [int, ...], "instr_per_elem": float}}
or {"<...>": {"error": "..."}} for a kernel that does not compile. Without /V= the vocabulary is
Qwen's 151936 (sizes and strides multiples of 16); ODD_VOCABS have rows at any 2-byte offset.
Then, for comparison, Liger's GRPO kernels as "liger:<kernel>/bf16/sm_<arch>" (LIGER_CASES)
where liger-kernel imports.
"""

from __future__ import annotations

import functools
import importlib
import inspect
import multiprocessing
import os
import re
import subprocess
import tempfile
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from rlops.kernels.gae import _gae_kernel
from rlops.kernels.policy_loss import _policy_loss_fwd_kernel
from rlops.kernels.token_stats import _row_states_kernel, _token_stats_bwd_kernel, _token_stats_fwd_kernel

# (kernel, constexpr switches): every feature combination the launchers can ask for.
CASES = (
    [(_token_stats_fwd_kernel, {"HAS_REF": ref, "HAS_MASK": mask}) for ref in (False, True) for mask in (False, True)]
    + [(_token_stats_bwd_kernel, {"HAS_REF": ref}) for ref in (False, True)]
    + [(_policy_loss_fwd_kernel, {"HAS_OLD": True, "HAS_ISW": True, "HAS_ENT": True, "KL_KIND": kind,
                                  "KL_RATIO": kind > 0}) for kind in range(5)]
    # Token-mean's weights from the mask and its count (HAS_COUNT), as the launchers pass them.
    + [(_policy_loss_fwd_kernel, {"HAS_OLD": False, "HAS_ISW": False, "HAS_ENT": False, "KL_KIND": 0,
                                  "KL_RATIO": False, "HAS_COUNT": True})]
    # The other objectives (constants.OBJECTIVES) and sampled-token KL kinds (abs, the + forms).
    + [(_policy_loss_fwd_kernel, {"HAS_OLD": True, "HAS_ISW": True, "HAS_ENT": True, "KL_KIND": kind,
                                  "KL_RATIO": True, "OBJECTIVE": objective})
       for objective, kind in ((1, 5), (2, 7), (0, 8), (4, 1), (6, 6))]
    + [(_gae_kernel, {"HAS_BOOT": boot, "PACKED": packed}) for packed in (False, True) for boot in (False, True)]
    # Small N (vocab_splits): each row's vocabulary split over SPLITS programs, merged in the forward.
    + [(_row_states_kernel, {"HAS_REF": ref, "HAS_LIVE": True, "SPLITS": 8}) for ref in (False, True)]
    + [(_token_stats_fwd_kernel, {"HAS_REF": True, "HAS_MASK": True, "HAS_PARTS": True, "SPLITS": 8}),
       (_policy_loss_fwd_kernel, {"HAS_OLD": True, "HAS_ISW": True, "HAS_ENT": True, "KL_KIND": 4, "KL_RATIO": True,
                                  "HAS_PARTS": True, "SPLITS": 8})]
)
# Vocabulary sizes: the JIT specialises on whether V and the row strides are multiples of 16, so
# DEFAULT_VOCAB stands for every such V, and one compile serves all of ODD_VOCABS (GPT-2's and a
# Llama-style 32000 + 1: neither sizes nor strides are, so each row starts at any 2-byte offset
# from a 16-byte boundary). ODD_CASES run at those in bf16, for every architecture asked; the
# launchers' alignment switches (reference or logits rows aligned otherwise than the rows the
# kernel streams from) for sm_90 only (ODD_ARCH), which keeps the test's compile time down.
DEFAULT_VOCAB = 151936
ODD_VOCABS = (50257, 32001)
ODD_ARCH = 90
_PL = {"HAS_OLD": True, "HAS_ISW": True, "HAS_ENT": True}
ODD_CASES = (
    [(_token_stats_fwd_kernel, {"HAS_REF": ref, "HAS_MASK": False}, None) for ref in (False, True)]
    + [(_token_stats_bwd_kernel, {"HAS_REF": ref}, None) for ref in (False, True)]
    + [(_policy_loss_fwd_kernel, {**_PL, "KL_KIND": 4, "KL_RATIO": True}, None),
       (_policy_loss_fwd_kernel, {**_PL, "KL_KIND": 3, "KL_RATIO": True}, ODD_ARCH),
       (_token_stats_fwd_kernel, {"HAS_REF": True, "HAS_MASK": False, "REF_ALIGNED": False}, ODD_ARCH),
       (_token_stats_bwd_kernel, {"HAS_REF": False, "X_ALIGNED": False}, ODD_ARCH),
       (_token_stats_bwd_kernel, {"HAS_REF": True, "X_ALIGNED": False, "REF_ALIGNED": False, "HAS_SCALE": True},
        ODD_ARCH)]
)
# Per kernel: the constexpr block size the launchers use, and the element type of its
# "logit-like" pointers (GAE's rewards and values take the dtype under test).
BLOCKS = {"_gae_kernel": ("BLOCK_T", 1024)}
LOGIT_PTRS = {"x_ptr", "dx_ptr", "ref_ptr", "r_ptr", "v_ptr"}
INDEX_PTRS = {"tokens_ptr", "cu_ptr", "seq_ptr"}
BYTE_PTRS = {"mask_ptr", "m_ptr"}
I32_ARGS = {"N", "V", "T", "adv_inner", "inner", "ref_inner", "n_seqs", "seqs_per_prog", "chunk"}
STRIDE_ARGS = {"stride_outer", "stride_inner", "ref_stride_outer", "ref_stride_inner", "dx_stride_outer",
               "dx_stride_inner", "r_stride", "v_stride", "m_stride", "last_offset", "last_stride"}
FLOAT_ARGS = {"inv_tau", "clip_low", "clip_high", "dual_clip", "kl_coef", "ratio_cap", "param_pos", "param_neg",
              "entropy_coef", "gamma", "lam"}


# Switches that say whether a pointer is given: off means the launcher passes None for it (GAE's
# PACKED: both of a packed batch's index pointers).
SWITCH_PTRS = {"HAS_MASK": ("mask_ptr",), "HAS_OLD": ("old_ptr",), "HAS_ISW": ("isw_ptr",),
               "HAS_ENT": ("ent_coef_ptr",), "HAS_BOOT": ("boot_ptr",), "PACKED": ("cu_ptr", "seq_ptr"),
               "HAS_PARTS": ("part_ptr",), "HAS_LIVE": ("live_ptr",), "HAS_SCALE": ("grad_scale_ptr",),
               "HAS_COUNT": ("agg_count_ptr",)}

# Pointers whose element type a switch sets: token-mean's mask is the bool mask and its count int64.
SWITCH_TYPES = {"HAS_COUNT": {"agg_w_ptr": "*i1", "agg_count_ptr": "*i64"}}


def jit_function(fn: object) -> object:
    """The @triton.jit function of a kernel object: the JITFunction itself, or the Python function
    under the interpreter's object (or under a wrapper such as triton.autotune, in another library)."""
    while not hasattr(fn, "params") and hasattr(fn, "fn"):
        fn = fn.fn
    return fn


def case_key(fn: object, switches: dict[str, object], dtype: str, arch: int, vocab: int = DEFAULT_VOCAB) -> str:
    name = jit_function(fn).__name__
    flags = ",".join(f"{k}={int(v)}" for k, v in switches.items())
    size = "" if vocab == DEFAULT_VOCAB else f"/V={vocab}"
    return f"{name}[{flags}]/{dtype}{size}/sm_{arch}"


def report_cases(archs: list[int], dtypes: tuple[str, ...] = ("bf16", "fp32")
                 ) -> list[tuple[str, object, dict[str, object], str, int, int]]:
    """(key, kernel, switches, dtype, arch, vocab) of every case of the report: CASES in each dtype
    at DEFAULT_VOCAB, then ODD_CASES in bf16 at each of ODD_VOCABS (their architecture, if any)."""
    cases = [(fn, switches, dtype, arch, DEFAULT_VOCAB) for fn, switches in CASES for dtype in dtypes
             for arch in archs]
    cases += [(fn, switches, "bf16", arch, vocab) for fn, switches, only in ODD_CASES for vocab in ODD_VOCABS
              for arch in archs if only in (None, arch)]
    return [(case_key(fn, sw, dtype, arch, vocab), fn, sw, dtype, arch, vocab) for fn, sw, dtype, arch, vocab in cases]


def signature(fn: triton.JITFunction, dtype: str, switches: dict[str, object], vocab: int = DEFAULT_VOCAB
              ) -> tuple[dict[str, str], dict[str, object], dict[tuple[int, ...], list]]:
    """Argument types, constexprs and the divisibility the JIT would find: pointers and N always
    (fresh allocations, a row count), V and the strides when vocab is a multiple of 16."""
    fn = jit_function(fn)
    block_name, block = BLOCKS.get(fn.__name__, ("BLOCK_V", 4096))
    sig, constexprs, attrs = {}, {block_name: block, **switches}, {}
    # A switch the case leaves out takes the kernel's default (HAS_PARTS=False: part_ptr is None).
    given = {**{p.name: p.default for p in fn.params if p.is_constexpr and p.has_default}, **switches}
    absent = {ptr for k, on in given.items() if k in SWITCH_PTRS and not on for ptr in SWITCH_PTRS[k]}
    typed = {ptr: ty for k, on in given.items() if on for ptr, ty in SWITCH_TYPES.get(k, {}).items()}
    for i, param in enumerate(fn.params):
        name = param.name
        if name in absent:
            sig[name], constexprs[name] = "constexpr", None
            continue
        if param.is_constexpr:
            sig[name] = "constexpr"
            if name not in constexprs and param.has_default:
                constexprs[name] = param.default  # a switch the case leaves at the kernel's default
            continue
        if name in typed:
            sig[name] = typed[name]
        elif name in LOGIT_PTRS:
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
        sized_by_vocab = name == "V" or name in STRIDE_ARGS
        if name.endswith("_ptr") or name in ("N", "T") or (sized_by_vocab and vocab % 16 == 0):
            attrs[(i,)] = [["tt.divisibility", 16]]  # what the JIT infers (for V = 151936: V and strides too)
    return sig, constexprs, attrs


NUM_WARPS = 8  # every launcher's num_warps
THREADS = NUM_WARPS * 32


def _cuobjdump(cubin: bytes, flag: str) -> str:
    cuobjdump = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        return subprocess.run([cuobjdump, flag, f.name], capture_output=True, text=True, check=True).stdout


def resources(cubin: bytes) -> dict[str, int]:
    """Registers per thread and stack / local bytes (spills) of the kernel."""
    out = _cuobjdump(cubin, "-res-usage")
    return {k: int(v) for k, v in re.findall(r"\b(REG|STACK|LOCAL):(\d+)", out)}


def instructions(listing: str) -> list[tuple[int, str]]:
    """(address, instruction) of each instruction of a `cuobjdump -sass` listing, or of one
    function of it."""
    return [(int(a, 16), text.strip()) for a, text in re.findall(r"/\*([0-9a-f]{4,})\*/\s+([^;]*);", listing)]


def loop_bodies(code: list[tuple[int, str]]) -> list[list[str]]:
    """The instructions of each loop of `code` (instructions()): from a backward branch's target
    up to the branch itself."""
    loops = []
    for addr, text in code:
        branch = re.search(r"\bBRA\b.*?0x([0-9a-f]+)", text)
        if branch and int(branch.group(1), 16) < addr:
            loops.append([t for a, t in code if int(branch.group(1), 16) <= a <= addr])
    return loops


def ctas_per_sm(regs: int, num_warps: int = NUM_WARPS) -> int:
    """Resident CTAs of num_warps warps on an sm_80/sm_90 SM: 64K registers allocated per warp
    in units of 256, at most 2048 threads and 32 CTAs (the kernels use no shared memory that binds)."""
    per_warp = -(-regs * 32 // 256) * 256
    return min(65536 // (per_warp * num_warps), 2048 // (32 * num_warps), 32)


# Kernels whose vocabulary loop streams two 16-byte vectors per thread per iteration
# (kernels/_common.py, softmax_row_stats), not a block of BLOCK_V elements.
TWO_VECTOR_LOOPS = {"_token_stats_fwd_kernel", "_policy_loss_fwd_kernel", "_row_states_kernel"}
ELEMENT_BYTES = {"bf16": 2, "fp16": 2, "fp32": 4}


def elements_per_thread(fn: object, dtype: str) -> float:
    """Elements one thread streams per iteration of the kernel's main loop."""
    name = jit_function(fn).__name__
    if name in TWO_VECTOR_LOOPS:
        return 2 * 16 / ELEMENT_BYTES[dtype]
    return BLOCKS.get(name, ("BLOCK_V", 4096))[1] / THREADS


def measure(cubin: bytes, per_thread: float, num_warps: int = NUM_WARPS) -> dict[str, object]:
    """resources, CTAs per SM, each loop's instruction count, the longest loop's instructions per
    element it streams (per_thread: the elements one thread streams per iteration) and whether
    that loop loads and stores 16-byte vectors (LDG/STG .128)."""
    res = resources(cubin)
    bodies = loop_bodies(instructions(_cuobjdump(cubin, "-sass")))
    loops = [len(body) for body in bodies]
    hot = max(bodies, key=len) if bodies else []
    return {**res, "ctas_per_sm": ctas_per_sm(res.get("REG", 255), num_warps), "loop_instructions": loops,
            "instr_per_elem": round(max(loops) / per_thread, 2) if loops else None,
            "loop_ld_v4": any(re.search(r"\bLDG(?:\.\w+)*\.128\b", t) for t in hot),
            "loop_st_v4": any(re.search(r"\bSTG(?:\.\w+)*\.128\b", t) for t in hot)}


def _compiled_report(fn: object, sig: dict[str, str], constexprs: dict[str, object], attrs: dict, arch: int,
                     options: dict[str, int], per_thread: float) -> dict[str, object]:
    """Compiles fn for sm_<arch> and measures it (or {"error": ...} when it does not compile)."""
    try:
        src = ASTSource(fn, sig, constexprs=constexprs, attrs=attrs)
        compiled = triton.compile(src, target=GPUTarget("cuda", arch, 32), options=options)
    except Exception as e:  # reported to the caller, which says which kernel and why
        return {"error": f"{type(e).__name__}: {e}"}
    ptx = compiled.asm["ptx"]
    return {
        "ld_v4": bool(re.search(r"ld\.global(?:\.\w+)*\.v4", ptx)),
        "st_v4": bool(re.search(r"st\.global(?:\.\w+)*\.v4", ptx)),
        **measure(compiled.asm["cubin"], per_thread, options["num_warps"]),
    }


def compile_case(fn: object, switches: dict[str, object], dtype: str, arch: int,
                 vocab: int = DEFAULT_VOCAB) -> dict[str, object]:
    """One case's report (or {"error": ...} when it does not compile)."""
    sig, constexprs, attrs = signature(fn, dtype, switches, vocab)
    return _compiled_report(jit_function(fn), sig, constexprs, attrs, arch, {"num_warps": NUM_WARPS},
                            elements_per_thread(fn, dtype))


# ---- comparison kernels ---------------------------------------------------------------------
# Liger's token-level GRPO loss (liger_kernel.ops.grpo_loss, the "liger" provider of the policy-loss
# benchmark), compiled as its launcher compiles it for bench/policy_loss.py's settings (TRL's GRPO:
# k3 KL 0.04, clip 0.2/0.28, temperature 1, a completion mask), bf16 logits of (B, L + 1, V) at
# DEFAULT_VOCAB: its temperature, coefficients, L and V are constexprs.
LIGER_MODULE = "liger_kernel.ops.grpo_loss"
LIGER_CONSTEXPRS = {"TEMPERATURE": 1.0, "BETA": 0.04, "EPS_LOW": 0.2, "EPS_HIGH": 0.28, "LOSS_TYPE": 0,
                    "SAPO_TEMP_POS": 1.0, "SAPO_TEMP_NEG": 1.05, "DELTA": 0.0, "USE_BIAS_CORRECTION_KL": False,
                    "L": 1024, "N": DEFAULT_VOCAB, "VLLM_IS_RATIO": None, "PHI_SEQ": None}
_LIGER_ROW = {"OLD_LOGP": "*fp32", "REF_LOGP": "*fp32", "INPUT_IDS": "*i64", "COMPLETION_MASK": "*i32",
              "ADVANTAGES": "*fp32", "LSE": "*fp32", "VLLM_IS_RATIO_STRIDE": "i32"}
# (kernel, its launcher's options, its BLOCK_N, the type of each argument that is not a constexpr)
LIGER_CASES = (
    ("_grpo_loss_fwd_kernel", {"num_warps": 1, "num_stages": 2}, 2048,
     {"LOGITS": "*bf16", **_LIGER_ROW, "LOSS": "*fp32", "KL": "*fp32", "IS_CLIPPED": "*fp32"}),
    ("_grpo_loss_bwd_kernel", {"num_warps": 16, "num_stages": 1}, 4096,
     {"DLOSS": "*fp32", "DLOGITS": "*bf16", "LOGITS": "*bf16", **_LIGER_ROW, "loss_stride0": "i32",
      "loss_stride1": "i32"}),
)


def comparison_cases(archs: list[int]) -> list[tuple[str, tuple]]:
    """(key, compile_comparison's arguments) of each comparison kernel for each architecture, keyed
    "liger:<kernel>/bf16/sm_<arch>"; none where liger-kernel does not import."""
    try:
        importlib.import_module(LIGER_MODULE)
    except Exception:  # not installed, or its import fails here: reported without it
        return []
    return [(f"liger:{name}/bf16/sm_{arch}", (name, arch, options, block, types))
            for name, options, block, types in LIGER_CASES for arch in archs]


def compile_comparison(name: str, arch: int, options: dict[str, int], block: int,
                       types: dict[str, str]) -> dict[str, object]:
    """The report of LIGER_MODULE's kernel `name`: each argument typed (types) or a constexpr
    (LIGER_CONSTEXPRS, BLOCK_N), pointers 16-byte aligned as fresh allocations are."""
    kernel = getattr(importlib.import_module(LIGER_MODULE), name, None)
    if kernel is None:  # another release of the package
        return {"error": f"{LIGER_MODULE} has no {name} (LIGER_CASES)"}
    fn = jit_function(kernel)
    args = list(inspect.signature(getattr(fn, "fn", fn)).parameters)  # the Python function's, as the JIT's
    constexprs = {**{k: v for k, v in LIGER_CONSTEXPRS.items() if k in args}, "BLOCK_N": block}
    untyped = [arg for arg in args if arg not in constexprs and arg not in types]
    if untyped:  # another release of the package, with other arguments
        return {"error": f"arguments without a type here: {', '.join(untyped)} (LIGER_CASES)"}
    sig = {arg: "constexpr" if arg in constexprs else types[arg] for arg in args}
    attrs = {(i,): [["tt.divisibility", 16]] for i, arg in enumerate(args) if sig[arg].startswith("*")}
    return _compiled_report(fn, sig, constexprs, attrs, arch, options, block / (32 * options["num_warps"]))


def main(archs: list[int], dtypes: tuple[str, ...] = ("bf16", "fp32"), compare: bool = True
         ) -> dict[str, dict[str, object]]:
    """The report of every case of CASES for each architecture and dtype, then (compare) that of
    each comparison kernel (comparison_cases)."""
    # Triton 3.9 warns that its FP-fusion default will change; the launchers compile with fusion
    # on (the counts assume fused multiply-adds), so the report says so explicitly.
    os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    cases = report_cases(archs, dtypes)
    # Vocabularies with the same divisibility compile to the same code: once.
    codes = [(case_key(fn, switches, dtype, arch), vocab % 16 == 0) for _, fn, switches, dtype, arch, vocab in cases]
    first = {code: i for i, code in reversed(list(enumerate(codes)))}
    others = comparison_cases(archs) if compare else []
    _PENDING[:] = ([functools.partial(compile_case, *cases[i][1:]) for i in first.values()]
                   + [functools.partial(compile_comparison, *args) for _, args in others])
    # Each compile is single-threaded Python plus ptxas: one process per core (forked: the
    # children find the jobs in _PENDING) takes a 2-core machine's report from 2 to 1 minute.
    workers = min(len(_PENDING), os.cpu_count() or 1)
    if workers > 1 and "fork" in multiprocessing.get_all_start_methods():
        with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("fork")) as pool:
            reports = list(pool.map(_compile_pending, range(len(_PENDING))))
    else:
        reports = [_compile_pending(i) for i in range(len(_PENDING))]
    compiled = dict(zip(first, reports, strict=False))
    ours = {case[0]: compiled[code] for case, code in zip(cases, codes, strict=True)}
    return {**ours, **{key: report for (key, _), report in zip(others, reports[len(first):], strict=True)}}


def is_comparison(key: str) -> bool:
    """Whether a report key is another library's kernel (comparison_cases), not rlops'."""
    return ":" in key.split("/", 1)[0]


# The compiles of a report being made (main), each a call without arguments.
_PENDING: list[Callable[[], dict[str, object]]] = []


def _compile_pending(index: int) -> dict[str, object]:
    return _PENDING[index]()


def table(results: dict[str, dict[str, object]]) -> str:
    """The report as a markdown table, one row per case."""
    lines = ["| kernel | regs | spills (B) | CTAs/SM | 16-B loads | 16-B stores | instructions / element |",
             "|---|---|---|---|---|---|---|"]
    for key, r in results.items():
        if "error" in r:
            lines.append(f"| {key} | error: {r['error']} | | | | | |")
            continue
        spills = r.get("LOCAL", 0) + r.get("STACK", 0)
        per_elem = "-" if r["instr_per_elem"] is None else f"{r['instr_per_elem']:.2f}"
        lines.append(f"| {key} | {r.get('REG')} | {spills} | {r['ctas_per_sm']} | {'yes' if r['ld_v4'] else 'no'} "
                     f"| {'yes' if r['st_v4'] else 'no'} | {per_elem} |")
    return "\n".join(lines)
