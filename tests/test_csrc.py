"""The CUDA C++ backend (csrc/) on a machine without a GPU.

- `nvcc`-marked tests compile every source: the kernels for sm_80 and sm_90 (no register
  spills), the PyTorch binding and the module against the installed torch headers. They
  are skipped only where nvcc is absent.
- The other tests run the public API with backend="cuda" end to end on CPU tensors, with
  torch.ops.rlops_cuda replaced by tests/csrc_emulator.py: the kernels' own arithmetic
  (csrc/rlops_math.h) compiled for the host and driven in the kernels' thread layout, against
  the float64 reference. On a GPU machine the GPU suite runs the real backend instead.
"""

from __future__ import annotations

import ast
import importlib.util
import os
import re
import shutil
import subprocess
import sysconfig
from pathlib import Path

import csrc_emulator
import pytest
import test_linear_policy_loss as linear_tests
import test_policy_loss as policy_tests
import test_policy_loss_rollout as rollout_tests
import test_token_stats as stats_tests
import torch
from test_advantages import (
    GAE_CASES,
    PACKED_LENGTHS,
    _check_packed_gae,
    _close,
    _gae_inputs,
    _packed_gae_inputs,
    verl_style_gae,
)

import rlops
from rlops import _cuda
from rlops.bench.sass import instructions, loop_bodies
from rlops.ops import _backend
from rlops.packing import pack

CSRC = Path(__file__).resolve().parents[1] / "csrc"
KERNEL_SOURCES = ["token_stats.cu", "gae.cu"]


def _nvcc() -> str | None:
    from torch.utils.cpp_extension import CUDA_HOME

    found = shutil.which("nvcc")
    if found is None and CUDA_HOME is not None and (Path(CUDA_HOME) / "bin" / "nvcc").exists():
        found = str(Path(CUDA_HOME) / "bin" / "nvcc")
    return found


NVCC = _nvcc()


def _cuobjdump() -> str | None:
    """cuobjdump from the PATH, beside nvcc, under CUDA_HOME, or the copy Triton bundles."""
    from torch.utils.cpp_extension import CUDA_HOME

    roots = [Path(NVCC).resolve().parents[1] if NVCC else None, CUDA_HOME]
    candidates = [shutil.which("cuobjdump"), *(str(Path(root) / "bin" / "cuobjdump") for root in roots if root)]
    spec = importlib.util.find_spec("triton")
    if spec is not None and spec.origin is not None:
        candidates.append(str(Path(spec.origin).parent / "backends" / "nvidia" / "bin" / "cuobjdump"))
    return next((c for c in candidates if c and Path(c).is_file() and os.access(c, os.X_OK)), None)


CUOBJDUMP = _cuobjdump()


def _compile(cmd: list[str]) -> subprocess.CompletedProcess:
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, f"{' '.join(cmd)}\n{done.stdout}\n{done.stderr}"
    return done


@pytest.fixture(scope="module")
def kernel_build(tmp_path_factory: pytest.TempPathFactory):
    """build(source, arch) -> (object file, ptxas -v report): each kernel source compiled once per
    module, for the spill check and the SASS checks alike."""
    built: dict[tuple[str, str], tuple[Path, str]] = {}
    out_dir = tmp_path_factory.mktemp("csrc_kernels")

    def build(source: str, arch: str) -> tuple[Path, str]:
        if (source, arch) not in built:
            obj = out_dir / f"{source}.sm_{arch}.o"
            done = _compile([NVCC, "-c", "-std=c++17", "-O3", f"-gencode=arch=compute_{arch},code=sm_{arch}",
                             "-Xptxas", "-v", "-Werror", "all-warnings", f"-I{CSRC}", str(CSRC / source), "-o",
                             str(obj)])
            built[source, arch] = obj, done.stderr
        return built[source, arch]

    return build


def _registers(ptxas_report: str) -> dict[str, int]:
    """Registers per thread of each kernel in a ptxas -v report."""
    found = re.findall(r"Compiling entry function '(\S+)' for 'sm_\d+'.*?Used (\d+) registers", ptxas_report, re.S)
    return {name: int(n) for name, n in found}


# Registers per thread at most: 64 keeps 4 blocks of token_stats' 256 threads resident per SM.
MAX_REGISTERS = {"token_stats.cu": 64, "gae.cu": 96}


@pytest.mark.nvcc
@pytest.mark.skipif(NVCC is None, reason="nvcc not found")
@pytest.mark.parametrize("arch", ["80", "90"])
@pytest.mark.parametrize("source", KERNEL_SOURCES)
def test_kernels_compile_without_spills(source: str, arch: str, kernel_build) -> None:
    obj, report = kernel_build(source, arch)
    assert obj.stat().st_size > 0
    spills = [int(n) for n in re.findall(r"(\d+) bytes spill (?:stores|loads)", report)]
    assert spills and not any(spills), f"register spills in {source} for sm_{arch}:\n{report}"
    registers = _registers(report)
    assert registers and max(registers.values()) <= MAX_REGISTERS[source], registers


# ---- the SASS of the sm_90 build: loads in flight, 128-bit accesses ---------------------------

def _constant(source: str, name: str) -> int:
    """The value of `constexpr int <name> = <n>;` in csrc/<source>."""
    return int(re.search(rf"constexpr int {name} = (\d+);", (CSRC / source).read_text()).group(1))


def _sass(obj: Path) -> dict[str, list[tuple[int, str]]]:
    """Each kernel's SASS as (address, instruction) pairs, from cuobjdump -sass."""
    out = subprocess.run([CUOBJDUMP, "-sass", str(obj)], capture_output=True, text=True, timeout=120,
                         check=True).stdout
    return {part.split("\n", 1)[0].strip(): instructions(part) for part in re.split(r"\n\s*Function : ", out)[1:]}


def _count(body: list[str], op: str) -> int:
    """Instructions of body whose opcode (after any predicate) is exactly op."""
    return sum(1 for text in body if re.match(rf"(?:@!?U?P\w+\s+)?{re.escape(op)}\s", text))


def _stores(body: list[str]) -> list[str]:
    return [op for text in body for op in re.findall(r"\bSTG\S*", text)]


STATS_KERNEL = re.compile(r"stats_(fwd|bwd)_kernelI(13__nv_bfloat16|6__half|f|d)Lb([01])E(?:Lb([01])E)?")
DTYPES = {"13__nv_bfloat16": ("bf16", 8), "6__half": ("fp16", 8), "f": ("fp32", 4), "d": ("fp64", 2)}


@pytest.mark.nvcc
@pytest.mark.skipif(NVCC is None or CUOBJDUMP is None, reason="nvcc or cuobjdump not found")
def test_token_stats_sass_keeps_loads_in_flight_and_stores_16_bytes(kernel_build) -> None:
    """In every variant (sm_90) the vector loop issues kInFlight 16-byte loads (of x, or of x and the
    reference) before its first exp, and the backward writes the gradient, and the zeros of a
    masked row, with 16-byte stores only."""
    obj, report = kernel_build("token_stats.cu", "90")
    in_flight, registers, seen, table = _constant("token_stats.cu", "kInFlight"), _registers(report), set(), []
    assert in_flight >= 2
    for name, code in _sass(obj).items():
        kind, dtype, has_ref, policy = STATS_KERNEL.search(name).group(1, 2, 3, 4)
        unroll = in_flight // 2 if has_ref == "1" else in_flight
        variant = f"{kind} {DTYPES[dtype][0]} ref={has_ref}" + ("" if policy is None else f" policy={policy}")
        where = f"{variant} ({name})"
        loops = loop_bodies(code)
        streaming = [body for body in loops if _count(body, "LDG.E.128")]
        assert len(streaming) == 1, f"{where}: {len(streaming)} loops with 16-byte loads"
        body = streaming[0]
        first_exp = next(i for i, text in enumerate(body) if text.startswith("MUFU.EX2"))
        loads = (_count(body[:first_exp], "LDG.E.128"), _count(body, "LDG.E.128"))
        assert loads == (in_flight, in_flight), f"{where}: 16-byte loads before the first exp, in the loop: {loads}"
        if kind == "bwd":
            assert _stores(body) == ["STG.E.128"] * unroll, f"{where}: {_stores(body)}"
            zeros = [b for b in loops if not _count(b, "LDG.E.128") and _count(b, "STG.E.128")]
            assert zeros and all(set(_stores(b)) == {"STG.E.128"} for b in zeros), where
        else:
            assert not _stores(body), where
        seen.add((kind, dtype, has_ref, policy))
        elements = unroll * DTYPES[dtype][1]
        table.append(f"{variant}: {registers[name]} registers, loop of {len(body)} "
                     f"instructions for {elements} elements ({len(body) / elements:.1f} per element)")
    assert len(seen) == 3 * 4 * 2, seen  # fwd, fwd with the policy epilogue, bwd; four dtypes; two ref cases
    print("\n".join(sorted(table)))


@pytest.mark.nvcc
@pytest.mark.skipif(NVCC is None or CUOBJDUMP is None, reason="nvcc or cuobjdump not found")
def test_gae_sass_reads_and_writes_vectors(kernel_build) -> None:
    """The tile loop (sm_90) reads a thread's 8 rewards and values as two 16-byte vectors each and its
    mask as 8 bytes, and writes advantages and returns as 16-byte vectors (the element accesses of
    unaligned rows stay beside them)."""
    obj, report = kernel_build("gae.cu", "90")
    (name, code), = _sass(obj).items()
    tiles = [body for body in loop_bodies(code) if _count(body, "LDG.E.128")]
    assert len(tiles) == 1, f"{len(tiles)} loops with 16-byte loads"
    body = tiles[0]
    counts = {op: _count(body, op) for op in ("LDG.E.128", "LDG.E.64", "STG.E.128")}
    assert counts == {"LDG.E.128": 4, "LDG.E.64": 1, "STG.E.128": 4}, counts
    print(f"gae: {_registers(report)[name]} registers, tile loop of {len(body)} instructions (vector and element "
          f"paths), {counts}")


@pytest.mark.nvcc
@pytest.mark.skipif(NVCC is None, reason="nvcc not found")
@pytest.mark.parametrize("source", ["ops.cpp", "module.cpp"])
def test_binding_compiles(source: str, tmp_path: Path) -> None:
    torch_include = Path(torch.__file__).resolve().parent / "include"
    # nvcc hands .cpp files to the host compiler with CUDA's include path added. CPU wheels of
    # PyTorch ship the c10/cuda headers without the generated cuda_cmake_macros.h, which only
    # sets the Windows DLL export switch; the flag stands in for it.
    _compile([NVCC, "-c", "-std=c++17", "-Xcompiler", "-Wall,-Werror=return-type,-Wno-unknown-pragmas",
              "-DC10_CUDA_NO_CMAKE_CONFIGURE_FILE", f"-I{torch_include}",
              f"-I{torch_include / 'torch' / 'csrc' / 'api' / 'include'}", f"-I{sysconfig.get_paths()['include']}",
              f"-I{CSRC}", str(CSRC / source), "-o", str(tmp_path / f"{source}.o")])
    assert (tmp_path / f"{source}.o").stat().st_size > 0


def test_setup_builds_the_sources_that_exist() -> None:
    tree = ast.parse((CSRC.parent / "setup.py").read_text())
    assigned = {node.targets[0].id: node.value for node in tree.body
                if isinstance(node, ast.Assign) and isinstance(node.targets[0], ast.Name)}
    sources = ast.literal_eval(assigned["CUDA_SOURCES"])
    assert set(sources) == {f"csrc/{name}" for name in ("module.cpp", *_cuda.SOURCES)}
    assert all((CSRC.parent / path).is_file() for path in sources)


# ---- the arithmetic, end to end through the public API with backend="cuda" -------------------

@pytest.fixture(scope="module")
def host_lib(tmp_path_factory: pytest.TempPathFactory):
    if torch.cuda.is_available():
        pytest.skip("a CUDA device is present: the GPU suite runs the real CUDA backend")
    lib = csrc_emulator.build(tmp_path_factory.mktemp("csrc_host"))
    if isinstance(lib, str):
        pytest.skip(lib)
    return lib


@pytest.fixture
def emulated(monkeypatch: pytest.MonkeyPatch, host_lib) -> csrc_emulator.HostOps:
    ops = csrc_emulator.HostOps(host_lib)
    monkeypatch.setattr(_cuda, "ops", lambda: ops)
    monkeypatch.setattr(_backend, "cuda_backend_unavailable", lambda x=None: None)
    return ops


def test_emulator_follows_the_kernels_constants() -> None:
    assert _constant("token_stats.cu", "kThreads") == 32 * csrc_emulator.KERNEL_WARPS
    assert _constant("token_stats.cu", "kInFlight") == csrc_emulator.KERNEL_IN_FLIGHT
    assert _constant("gae.cu", "kThreads") == csrc_emulator.GAE_THREADS
    assert _constant("gae.cu", "kItems") == csrc_emulator.GAE_ITEMS
    host = (Path(__file__).parent / "csrc_host.cpp").read_text()
    assert re.search(rf"constexpr int K = {csrc_emulator.GAE_ITEMS};", host)


@pytest.mark.parametrize("with_ref", [False, True])
def test_emulated_loads_in_flight_change_no_bit(host_lib, with_ref: bool) -> None:
    # token_stats.cu's vector loop fetches kInFlight 16-byte vectors per trip, but each thread adds
    # them in the order of a plain strided loop: the same bits. Rows of 20011 bf16 logits at odd
    # alignments give each thread several trips, the last one partial, between a head and a tail.
    n, vocab = 3, 20011
    storage = stats_tests._logits((2, n * vocab + 5), torch.bfloat16)
    x, ref = storage[0, 1:1 + n * vocab], storage[1, 3:3 + n * vocab]
    layout = (n, vocab, 1, vocab, 0)
    heads = csrc_emulator.HostOps._heads(x, *layout)
    assert torch.equal(heads, csrc_emulator.HostOps._heads(ref, *layout)) and 0 < heads.max() < 8
    tokens = stats_tests._tokens((n,), vocab)
    runs = [csrc_emulator.HostOps(host_lib, in_flight=k)._stats(x, layout, ref if with_ref else None, layout, tokens,
                                                                 0.7) for k in (1, csrc_emulator.KERNEL_IN_FLIGHT)]
    assert torch.isfinite(runs[0]).all() and torch.equal(runs[0], runs[1])


def _cuda_stats(x, t, tau):
    return rlops.token_logprobs_and_entropy(x, t, tau, backend="cuda")


@pytest.mark.usefixtures("emulated")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("vocab", [1, 7, 1000, 4097])
def test_token_stats(vocab: int, dtype: torch.dtype) -> None:
    base = stats_tests._logits((2, 3, vocab), dtype)
    stats_tests._check(base, stats_tests._tokens((2, 3), vocab), 0.8, fn=_cuda_stats)


@pytest.mark.usefixtures("emulated")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape, view", [
    ((3, 6, 203), lambda x: x[:, :-1]),  # odd V: rows start at every alignment
    ((5, 3, 200), lambda x: x.transpose(0, 1)),
    ((4, 5, 256), lambda x: x[..., 3:203]),
    ((3, 4, 400), lambda x: x[..., ::2]),
])
def test_token_stats_layouts(shape: tuple[int, ...], view, dtype: torch.dtype) -> None:
    probe = view(stats_tests._logits(shape, dtype))
    stats_tests._check(stats_tests._logits(shape, dtype), stats_tests._tokens(probe.shape[:-1], probe.shape[-1]),
                       1.3, view=view, fn=_cuda_stats)


@pytest.mark.usefixtures("emulated")
@pytest.mark.parametrize("grads", ["logp", "entropy"])
def test_token_stats_gradient_paths(grads: str) -> None:
    base = stats_tests._logits((3, 4, 333), torch.float32)
    stats_tests._check(base, stats_tests._tokens((3, 4), 333), grads=grads, fn=_cuda_stats)


@pytest.mark.usefixtures("emulated")
@pytest.mark.parametrize("scale", [1e-4, 3000.0])
def test_token_stats_extreme_scales_and_minus_inf(scale: float) -> None:
    base = stats_tests._logits((3, 4, 300), torch.float32, scale=scale)
    base[..., 250:] = float("-inf")
    base[0, 0, :128] = float("-inf")
    tokens = 128 + stats_tests._tokens((3, 4), 250 - 128)
    stats_tests._check(base, tokens, extreme=True, fn=_cuda_stats)


@pytest.mark.usefixtures("emulated")
@pytest.mark.parametrize("which", ["stats", "logp"])
@pytest.mark.parametrize("case", list(stats_tests.MAGNIFIED))
def test_token_stats_large_logits_and_small_temperature(case: str, which: str) -> None:
    stats_tests.check_magnified(case, which, "cuda")


def _cuda_policy(logits, tokens, advantages, **kw):
    return rlops.policy_loss(logits, tokens, advantages, backend="cuda", **kw)


@pytest.mark.usefixtures("emulated")
@pytest.mark.parametrize("case", list(policy_tests.CASES))
def test_policy_loss(case: str) -> None:
    policy_tests._check(case, torch.float32, fn=_cuda_policy, vocab=203)


@pytest.mark.usefixtures("emulated")
@pytest.mark.parametrize("case", [c for c, (_, options) in policy_tests.CASES.items()
                                  if options.get("ratio_level") != "sequence"])
def test_policy_loss_nan_in_a_counted_input_gives_nan(case: str) -> None:
    policy_tests.check_nan_propagates(case, fn=_cuda_policy)


@pytest.mark.usefixtures("emulated")
@pytest.mark.parametrize("case", ["off-policy", "dual-clip", "k3", "full-kl", "everything-k3", "everything-full",
                                  "gspo-full-kl", "dro", "dppo-kl", "gmpo", "vespo"])
def test_policy_loss_bf16(case: str) -> None:
    policy_tests._check(case, torch.bfloat16, fn=_cuda_policy, vocab=203)


@pytest.mark.usefixtures("emulated")
@pytest.mark.parametrize("name", list(rollout_tests.CORRECTIONS))
def test_policy_loss_rollout_correction(name: str) -> None:
    rollout_tests.test_correction_equals_its_weights_and_mask(name, "cuda")


@pytest.mark.usefixtures("emulated")
@pytest.mark.parametrize("kl", ["k3", "full"])
def test_policy_loss_inplace_grad(kl: str) -> None:
    batch = policy_tests._batch(vocab=203)
    options = {"kl_coef": 0.1, "kl_estimator": kl, "old_logprobs": batch["old_logprobs"], "mask": batch["mask"],
               "ref_logprobs": batch["ref_logprobs"], "ref_logits": batch["ref_logits"]}
    grads = []
    for inplace in (False, True):
        leaf = batch["logits"].clone().requires_grad_(True)
        logits = leaf * 1.0  # produced by an op, as an lm_head output is
        out = rlops.policy_loss(logits, batch["tokens"], batch["advantages"], inplace_grad=inplace, backend="cuda",
                                **options)
        out.loss.backward()
        grads.append(leaf.grad)
    assert torch.equal(grads[0], grads[1])


@pytest.mark.usefixtures("emulated")
@pytest.mark.parametrize("case", ["off-policy", "everything-k3", "everything-full", "gspo-with-kl-entropy-is"])
def test_linear_policy_loss(case: str) -> None:
    linear_tests._check(case, backend="cuda", chunk_size=5)


@pytest.mark.usefixtures("emulated")
def test_linear_policy_loss_bf16() -> None:
    linear_tests._check("everything-full", torch.bfloat16, backend="cuda")


@pytest.mark.usefixtures("emulated")
@pytest.mark.parametrize("rows, time, gamma, lam, with_bootstrap", GAE_CASES)
def test_gae(rows, time, gamma, lam, with_bootstrap) -> None:
    rewards, values, mask, bootstrap = _gae_inputs(rows, time)
    bootstrap = bootstrap if with_bootstrap else None
    adv, ret = rlops.gae(rewards, values, mask, gamma=gamma, lam=lam, bootstrap=bootstrap, backend="cuda")
    want_adv, want_ret = verl_style_gae(rewards, values, mask, gamma, lam, bootstrap)
    _close(adv, want_adv, "advantages")
    _close(ret, want_ret, "returns")
    assert not adv[~mask].any() and not ret[~mask].any()


@pytest.mark.usefixtures("emulated")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float64])
def test_gae_strided_dtypes_and_padding(dtype: torch.dtype) -> None:
    rewards, values, mask, bootstrap = _gae_inputs(6, 40, dtype=dtype)
    r, v, m = rewards[::2, 3:], values[::2, 3:], mask[::2, 3:]
    adv, ret = rlops.gae(r.masked_fill(~m, float("nan")), v.masked_fill(~m, float("inf")), m.float(), gamma=0.9,
                         bootstrap=bootstrap[::2], backend="cuda")
    want_adv, want_ret = verl_style_gae(r, v, m, 0.9, 0.95, bootstrap[::2])
    _close(adv, want_adv, "advantages")
    _close(ret, want_ret, "returns")


@pytest.mark.parametrize("threads", [1, 2, 3])
@pytest.mark.parametrize("time", [1, 8, 9, 23, 70])
def test_gae_tiles(host_lib, threads: int, time: int) -> None:
    # Tiles of 8, 16 and 24 steps, so that rows span many tiles and a partial leftmost one.
    ops = csrc_emulator.HostOps(host_lib, gae_threads=threads)
    rewards, values, mask, bootstrap = _gae_inputs(4, time, seed=time)
    adv, ret = torch.empty(4, time), torch.empty(4, time)
    ops.gae(rewards, values, mask.to(torch.uint8), bootstrap, None, adv, ret, 0.97, 0.9)
    want_adv, want_ret = verl_style_gae(rewards, values, mask, 0.97, 0.9, bootstrap)
    _close(adv, want_adv, "advantages")
    _close(ret, want_ret, "returns")


@pytest.mark.usefixtures("emulated")
@pytest.mark.parametrize("with_bootstrap, row", [(True, False), (False, True)])
def test_gae_packed(with_bootstrap: bool, row: bool) -> None:
    # One block per sequence, in one launch: equal to the padded launch and to the float64 loop.
    _check_packed_gae("cuda", PACKED_LENGTHS, with_bootstrap=with_bootstrap, row=row)
    _check_packed_gae("cuda", torch.randint(0, 3, (300,), generator=torch.Generator().manual_seed(1)).tolist())


@pytest.mark.usefixtures("emulated")
def test_gae_packed_padding_values_never_leak() -> None:
    _, (rewards, values, mask), bootstrap, cu, _ = _packed_gae_inputs(PACKED_LENGTHS, seed=3)
    rewards = rewards.bfloat16()  # and a float mask: the launcher's casts
    clean = rlops.gae(rewards, values, mask, gamma=0.99, bootstrap=bootstrap, cu_seqlens=cu, backend="cuda")
    dirty = rlops.gae(rewards.masked_fill(~mask, float("nan")), values.masked_fill(~mask, float("inf")),
                      mask.float(), gamma=0.99, bootstrap=bootstrap, cu_seqlens=cu, backend="cuda")
    assert torch.equal(clean[0], dirty[0]) and torch.equal(clean[1], dirty[1])


@pytest.mark.parametrize("threads", [1, 2, 3])
def test_gae_packed_tiles(host_lib, threads: int) -> None:
    # Tiles of 8, 16 and 24 steps: sequences of up to 40 tokens span several, with a partial leftmost one.
    ops = csrc_emulator.HostOps(host_lib, gae_threads=threads)
    padded, (rewards, values, mask), bootstrap, cu, lengths = _packed_gae_inputs(PACKED_LENGTHS, seed=threads)
    adv, ret = torch.empty_like(rewards), torch.empty_like(rewards)
    ops.gae(rewards, values, mask.to(torch.uint8), bootstrap, cu.long(), adv, ret, 0.97, 0.9)
    want_adv, want_ret = verl_style_gae(*padded, 0.97, 0.9, bootstrap)
    _close(adv, pack(want_adv, lengths), "advantages")
    _close(ret, pack(want_ret, lengths), "returns")


# ---- dispatch ------------------------------------------------------------------------------

def test_cuda_backend_says_why_it_cannot_run() -> None:
    x = torch.zeros(2, 5)
    with pytest.raises(RuntimeError, match="backend='cuda' runs on CUDA tensors"):
        rlops.token_logprobs(x, torch.zeros(2, dtype=torch.long), backend="cuda")
    if torch.version.cuda is None:
        assert "not a CUDA build" in _backend.cuda_backend_unavailable()


def test_auto_follows_the_benchmark_table(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "Some GPU")
    monkeypatch.setattr(_backend, "auto_table", lambda: {"Some GPU": {"gae": "cuda", "token_stats": "triton"}})
    monkeypatch.setattr(_backend, "cuda_backend_unavailable", lambda x=None: None)
    x = torch.zeros(1)
    assert _backend._auto_cuda("gae", x) == "cuda"
    assert _backend._auto_cuda("token_stats", x) == "triton"
    assert _backend._auto_cuda("policy_loss", x) == "triton"  # not measured: Triton
    monkeypatch.setattr(_backend, "cuda_backend_unavailable", lambda x=None: "no nvcc")
    assert _backend._auto_cuda("gae", x) == "triton"  # measured faster but not buildable here


def test_auto_table_is_well_formed() -> None:
    table = _backend.auto_table.__wrapped__()
    for gpu, ops in table.items():
        assert isinstance(gpu, str) and set(ops) <= set(_backend.CUDA_OPS), gpu
        assert set(ops.values()) <= {"cuda", "triton"}, gpu


@pytest.mark.usefixtures("emulated")
@pytest.mark.parametrize("inplace", [False, True])
@pytest.mark.parametrize("options", list(policy_tests.NEXT_TOKEN_OPTIONS))
def test_causal_lm_logits_with_one_position_more(options: str, inplace: bool) -> None:
    policy_tests.check_causal_lm_logits("cuda", options, inplace)


@pytest.mark.usefixtures("emulated")
@pytest.mark.parametrize("offset, temperature", policy_tests.MAGNIFIED)
@pytest.mark.parametrize("case", ["everything-k3", "everything-full"])
def test_policy_loss_large_logits_and_small_temperature(case: str, offset: float, temperature: float) -> None:
    policy_tests.check_magnified(case, offset, temperature, _cuda_policy)
