"""Every Triton kernel compiles for sm_80 and sm_90 on a machine without a GPU.

The interpreter runs the kernels' Python and misses what only the compiler rejects (a
non-constexpr global, say); this compiles them to PTX and cubin with Triton's own ptxas.
It also guards the memory traffic the benchmarks depend on: 16-byte vector loads and stores
where a kernel's traffic is (VECTOR below), in the vocabulary loop itself (LOOP_VECTOR) for
any vocabulary size: sizes and strides multiples of 16, as the JIT detects at run time for
Qwen's V, or odd (GPT-2's 50257, 32001; bench/sass.py ODD_VOCABS), and no spills to local
memory.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from compile_kernels import report_cases

HERE = Path(__file__).resolve().parent
ARCHS = (80, 90)
# 16-byte vector accesses each kernel must keep: loads where its traffic is the vocabulary,
# stores where it writes gradients or outputs (GAE's bf16 inputs are read narrower).
VECTOR = {
    "_token_stats_fwd_kernel": ("ld_v4",),
    "_token_stats_bwd_kernel": ("ld_v4", "st_v4"),
    "_policy_loss_fwd_kernel": ("ld_v4",),
    "_row_states_kernel": ("ld_v4",),
    "_gae_kernel": ("st_v4",),
}
# A forward that merges its rows' vocabulary splits (small N) streams no vocabulary itself.
MERGING = "HAS_PARTS=1"
# A packed batch's sequences start at any token, so packed GAE's accesses stay scalar.
UNALIGNED = ("_gae_kernel[HAS_BOOT=0,PACKED=1]", "_gae_kernel[HAS_BOOT=1,PACKED=1]")
# The same in the longest loop's SASS (the vocabulary loop), whatever V: the backward streams
# from the gradient row's 16-byte boundary, and reads the logits in scalars when the launcher
# found their rows aligned otherwise (X_ALIGNED=0).
LOOP_VECTOR = {
    "_token_stats_fwd_kernel": ("loop_ld_v4",),
    "_token_stats_bwd_kernel": ("loop_ld_v4", "loop_st_v4"),
    "_policy_loss_fwd_kernel": ("loop_ld_v4",),
    "_row_states_kernel": ("loop_ld_v4",),
}
KEYS = [case[0] for case in report_cases(list(ARCHS))]


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
    kernel = key.split("[")[0]
    wanted = () if key.startswith(UNALIGNED) or MERGING in key else VECTOR[kernel] + LOOP_VECTOR.get(kernel, ())
    if "X_ALIGNED=0" in key:  # logits rows aligned otherwise than the gradient's: read in scalars
        wanted = tuple(a for a in wanted if "ld" not in a)
    for access in wanted:
        what = "loads" if "ld" in access else "stores"
        assert result[access], f"no 16-byte vector {what}" + (" in the loop" if access.startswith("loop") else "")
    assert result.get("LOCAL", 0) == 0 and result.get("STACK", 0) == 0, f"spills to local memory: {result}"


# Issue 16's instruction budget, sm_90, bf16, V=151936, SASS instructions per streamed element
# of the vocabulary loop: 10 forward (no reference logits), 14 backward, 12 per streamed element
# with the exact KL (two logits per row element) and then at least 4 resident CTAs per SM.
FWD, BWD, EXACT_KL_FWD = (
    "_token_stats_fwd_kernel[HAS_REF=0,HAS_MASK=0]/bf16/sm_90",
    "_token_stats_bwd_kernel[HAS_REF=0]/bf16/sm_90",
    "_policy_loss_fwd_kernel[HAS_OLD=1,HAS_ISW=1,HAS_ENT=1,KL_KIND=4,KL_RATIO=1]/bf16/sm_90",
)
BUDGET = {FWD: 10.0, BWD: 14.0, EXACT_KL_FWD: 2 * 12.0}
# Below the budget, as measured (Triton 3.9's ptxas, sm_90, bf16): ceilings that catch a
# regression, per row element. Odd vocabularies run the same loop from the row's first 16-byte
# boundary; a reference row aligned otherwise than the logits streams in scalars.
CEILINGS = {
    FWD: 9.75,
    BWD: 10.75,
    EXACT_KL_FWD: 20.25,
    "_token_stats_fwd_kernel[HAS_REF=1,HAS_MASK=0]/bf16/sm_90": 20.25,
    "_policy_loss_fwd_kernel[HAS_OLD=1,HAS_ISW=1,HAS_ENT=1,KL_KIND=0,KL_RATIO=0]/bf16/sm_90": 9.75,
    "_policy_loss_fwd_kernel[HAS_OLD=1,HAS_ISW=1,HAS_ENT=1,KL_KIND=3,KL_RATIO=1]/bf16/sm_90": 9.75,
    "_token_stats_bwd_kernel[HAS_REF=1]/bf16/sm_90": 19.0,
    "_token_stats_fwd_kernel[HAS_REF=0,HAS_MASK=0]/bf16/V=50257/sm_90": 9.75,
    "_token_stats_bwd_kernel[HAS_REF=0]/bf16/V=50257/sm_90": 10.75,
    "_token_stats_fwd_kernel[HAS_REF=1,HAS_MASK=0]/bf16/V=50257/sm_90": 20.25,
    "_token_stats_fwd_kernel[HAS_REF=1,HAS_MASK=0,REF_ALIGNED=0]/bf16/V=50257/sm_90": 22.5,
    "_policy_loss_fwd_kernel[HAS_OLD=1,HAS_ISW=1,HAS_ENT=1,KL_KIND=3,KL_RATIO=1]/bf16/V=50257/sm_90": 9.75,
}


@pytest.mark.parametrize("key", list(BUDGET))
def test_instruction_budget(compiled: dict, key: str) -> None:
    """Issue 16's budget: below it the loop can keep up with an H200's copy bandwidth (about 15
    thread-instructions per bf16 logit), with room for the epilogue and latency."""
    result = compiled[key]
    assert result["instr_per_elem"] <= BUDGET[key], result
    if key == EXACT_KL_FWD:
        assert result["ctas_per_sm"] >= 4, result


@pytest.mark.parametrize("key", [k for k in KEYS if not k.startswith("_gae") and MERGING not in k])
def test_report_has_loops_and_occupancy(compiled: dict, key: str) -> None:
    """rlops bench --sass reports each vocabulary kernel's loop and how many CTAs fit an SM."""
    result = compiled[key]
    assert result["loop_instructions"] and result["instr_per_elem"] > 0, result
    assert 1 <= result["ctas_per_sm"] <= 8


@pytest.mark.parametrize("key", list(CEILINGS))
def test_instructions_per_streamed_logit_do_not_grow(compiled: dict, key: str) -> None:
    assert compiled[key]["instr_per_elem"] <= CEILINGS[key], compiled[key]


def test_sass_report_table(compiled: dict) -> None:
    from rlops.bench.sass import table

    rows = table(compiled).splitlines()[2:]
    assert [row.split(" | ")[0].lstrip("| ") for row in rows] == list(compiled)


def test_ctas_per_sm_follows_the_register_file() -> None:
    from rlops.bench.sass import ctas_per_sm

    # 256 threads: 40 registers -> 1280 per warp -> 10240 per CTA -> 6 of 64K; 32 -> 8 (thread limit).
    assert (ctas_per_sm(32), ctas_per_sm(40), ctas_per_sm(48), ctas_per_sm(88), ctas_per_sm(255)) == (8, 6, 5, 2, 1)
    # Liger's launches: 1 warp at 88 registers -> 2816 per warp -> 23 of 64K; 16 warps -> 4 (thread limit).
    assert (ctas_per_sm(88, num_warps=1), ctas_per_sm(32, num_warps=1), ctas_per_sm(32, num_warps=16)) == (23, 32, 4)


def test_comparison_kernels_are_reported(compiled: dict) -> None:
    """rlops bench --sass also compiles Liger's GRPO forward and backward kernels as its launcher
    does, for the same measures beside rlops' own (here at sm_80 and sm_90, with the suite's
    liger-kernel)."""
    from rlops.bench.sass import LIGER_CASES, LIGER_MODULE, is_comparison

    pytest.importorskip(LIGER_MODULE)
    keys = [key for key in compiled if is_comparison(key)]
    assert keys == [f"liger:{case[0]}/bf16/sm_{arch}" for case in LIGER_CASES for arch in ARCHS]
    for key in keys:
        result = compiled[key]
        assert "error" not in result, result
        assert result["loop_instructions"] and result["instr_per_elem"] > 0 and result["ctas_per_sm"] >= 1, result
    assert not any(is_comparison(key) for key in KEYS)


def _row_misalignments(rows) -> list[int]:
    """Each row's start modulo 16 bytes, computed row by row."""
    import torch

    r = torch.arange(rows.n_rows)
    starts = (r // rows.inner) * rows.stride_outer + (r % rows.inner) * rows.stride_inner
    return [(rows.tensor.data_ptr() + rows.tensor.element_size() * int(s)) % 16 for s in starts.tolist()]


def test_same_alignment_is_every_rows_alignment() -> None:
    """The launchers' alignment switches (X_ALIGNED, REF_ALIGNED: the vectorised code assumes
    them, and a wrong True misaligns 16-byte accesses) against the rows' addresses themselves."""
    import itertools

    import torch

    from rlops._layout import RowLayout, grad_strides, row_layout, same_alignment

    views = [lambda x: x, lambda x: x[:, :-1], lambda x: x[:, 1:], lambda x: x.transpose(0, 1),
             lambda x: x[::2], lambda x: x[..., :-3], lambda x: x[1:], lambda x: x[:, ::2]]
    checked = {True: 0, False: 0}
    for dtype, vocab in itertools.product((torch.bfloat16, torch.float32), (7, 8, 19)):
        for view_a, view_b in itertools.product(views, views):
            a, b = view_a(torch.empty(4, 3, vocab, dtype=dtype)), view_b(torch.empty(4, 3, vocab + 3, dtype=dtype))
            b = b[..., :vocab] if b.shape[-1] > vocab else b
            if a.shape != b.shape:
                continue
            rows_a, rows_b = row_layout(a), row_layout(b)
            out = torch.empty(a.shape, dtype=dtype)
            rows_dx = RowLayout(out, rows_a.n_rows, rows_a.inner, *grad_strides(out, a, rows_a, a.shape))
            for x, y in ((rows_a, rows_b), (rows_dx, rows_a)):
                same = _row_misalignments(x) == _row_misalignments(y)
                assert same_alignment(x, y) == same, (a.shape, a.stride(), b.stride(), x[1:], y[1:])
                checked[same] += 1
    assert min(checked.values()) > 20, checked  # both answers are exercised
    fp32 = row_layout(torch.empty(3, 8, dtype=torch.float32))
    assert not same_alignment(row_layout(torch.empty(3, 8, dtype=torch.bfloat16)), fp32)  # element sizes differ


def test_comparison_kernel_of_another_release_is_an_error_row() -> None:
    """A liger-kernel without the kernel, or with arguments LIGER_CASES does not type, gives the
    row an error naming it (rlops bench --sass goes on), before any compile."""
    from rlops.bench.sass import LIGER_MODULE, compile_comparison

    pytest.importorskip(LIGER_MODULE)
    missing = compile_comparison("_no_such_kernel", 90, {"num_warps": 1}, 2048, {})
    assert missing == {"error": f"{LIGER_MODULE} has no _no_such_kernel (LIGER_CASES)"}
    untyped = compile_comparison("_grpo_loss_fwd_kernel", 90, {"num_warps": 1}, 2048, {"LOGITS": "*bf16"})
    assert untyped["error"].startswith("arguments without a type here: OLD_LOGP, REF_LOGP"), untyped
