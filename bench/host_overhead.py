"""Host overhead: the Python/PyTorch time of one `rlops.policy_loss` forward+backward beside Liger's
`triton_grpo_loss`, with both libraries' kernel launches stubbed out at the driver.

At small sizes (a fused-linear chunk, a small batch) the GPU finishes a kernel faster than the
host launches the next, so the host side decides the step time. It is measured on a tiny input
(B=2 sequences of T=4 tokens, V=64, float32). Every Triton kernel the launchers use (those of
rlops.kernels and of liger_kernel.ops.grpo_loss) runs Triton's host launch path, its wrappers
and JITFunction.run's argument binding, specialisation and cache lookup, up to the driver's
launch, which does nothing (`host_path_launches`; without CUDA, for an sm_90 target): what is
timed is each library's argument checks, dispatch, autograd glue, launcher code, Triton's
launch path and small tensor ops, not its kernels. Settings are bench/policy_loss.py's (TRL's
GRPO with a reference model: k3 KL, clip 0.2/0.28, token mean, old log-probs, per-sequence
advantages).

The same tokens reach both, as the logits of an lm_head (non-leaves). Liger's API takes a causal
LM's (B, T+1, V), from the prompt's last position, and drops the last position itself (its
backward zeroes that row). rlops is measured three ways: on (B, T, V) logits (`rlops_us`, the
headline), on the same (B, T+1, V) logits as Liger (`rlops_lm_us`: its backward kernel zeroes
each last position too), and on their slice `x[:, :-1]` (`rlops_sliced_us`: the slice's
autograd node, which on a GPU also copies the gradient into a zeroed (B, T+1, V) buffer).

`measure()` returns microseconds per call (the minimum over rounds of each round's median,
rounds interleaved, so that a noisy machine's slow spells hit every step alike and inflate
none) and the number of ATen ops each call issues; `rlops bench` reports it and
tests/test_host_overhead.py holds rlops to it.
"""

from __future__ import annotations

import contextlib
import importlib
import statistics
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from types import ModuleType

import torch
from torch.utils._python_dispatch import TorchDispatchMode

# The input: B sequences of T tokens over a vocabulary of V (Liger's logits are (B, T+1, V)).
B, T, V = 2, 4, 64
BETA, CLIP_LOW, CLIP_HIGH = 0.04, 0.2, 0.28
# The modules whose Triton kernel objects the launchers call (rlops: forward, split-vocabulary
# states and backward; Liger: its GRPO kernels).
RLOPS_KERNEL_MODULES = ("rlops.kernels.policy_loss", "rlops.kernels.token_stats")
LIGER_KERNEL_MODULE = "liger_kernel.ops.grpo_loss"


class _NoLaunch:
    """A kernel object whose launch `kernel[grid](*args, **kwargs)` does nothing."""

    @staticmethod
    def _launch(*args: object, **kwargs: object) -> None:
        return None

    def __getitem__(self, grid: object) -> Callable[..., None]:
        return self._launch


def _kernel_names(module: ModuleType) -> list[str]:
    """The module's Triton kernel objects (@triton.jit, maybe under heuristics/autotune)."""
    from triton.runtime.jit import KernelInterface

    return [name for name, obj in vars(module).items() if isinstance(obj, KernelInterface)]


@contextlib.contextmanager
def _replaced(slots: list[tuple[object, str, object]], make: Callable[[object], object]) -> Iterator[None]:
    """Each (owner, attribute, object) of slots set to make(object) while the block runs, restored
    afterwards. rlops' Triton backend on CPU tensors needs the interpreter, whose flag
    (rlops.kernels.INTERPRETED) is set for the block too: no kernel runs, so none is interpreted."""
    kernels = importlib.import_module("rlops.kernels")
    interpreted = kernels.INTERPRETED
    try:
        for owner, attr, obj in slots:
            setattr(owner, attr, make(obj))
        kernels.INTERPRETED = True
        yield
    finally:
        kernels.INTERPRETED = interpreted
        for owner, attr, obj in slots:
            setattr(owner, attr, obj)


def stubbed_launches(modules: tuple[ModuleType, ...]) -> contextlib.AbstractContextManager[None]:
    """Every Triton kernel object of `modules` replaced by a no-op launch while the block runs:
    not even Triton's launch path runs (tests/test_extra_memory.py counts rlops' own allocations)."""
    return _replaced([(m, name, getattr(m, name)) for m in modules for name in _kernel_names(m)],
                     lambda kernel: _NoLaunch())


class _NoDevice:
    """Triton's driver where no GPU is: device 0, stream 0, an sm_90 target (what the launch path asks)."""

    @staticmethod
    def get_current_device() -> int:
        return 0

    @staticmethod
    def get_current_stream(device: int) -> int:
        return 0

    @staticmethod
    def get_current_target() -> object:
        from triton.backends.compiler import GPUTarget

        return GPUTarget("cuda", 90, 32)


class _CompiledStub:
    """A compiled kernel whose launch does nothing (the last two calls of JITFunction.run)."""

    function = packed_metadata = None

    @staticmethod
    def launch_metadata(*args: object) -> None:
        return None

    @staticmethod
    def run(*args: object) -> None:
        return None


def _jit_slot(module: ModuleType, name: str) -> tuple[object, str, object]:
    """(owner, attribute, function): where the module's kernel `name` holds its @triton.jit function
    under any wrappers (triton.heuristics, triton.autotune): the innermost wrapper's .fn, or the module."""
    owner, attr, fn = module, name, getattr(module, name)
    while hasattr(getattr(fn, "fn", None), "fn"):  # a wrapper of a wrapper of the Python function
        owner, attr, fn = fn, "fn", fn.fn
    return owner, attr, fn


def _host_path_stub(fn: object) -> object:
    """A JITFunction of fn's Python function whose compile step returns a _CompiledStub. A fresh
    one, so that no real kernel cache is touched (and that one exists under TRITON_INTERPRET=1,
    where the kernels are the interpreter's objects)."""
    from triton.runtime.jit import JITFunction

    jit = JITFunction(fn.fn)

    def compile_stub(key: object, signature: object, device: int, *args: object) -> _CompiledStub:
        jit.device_caches[device][0][key] = kernel = _CompiledStub()
        return kernel

    jit._do_compile = compile_stub
    return jit


@contextlib.contextmanager
def host_path_launches(modules: tuple[ModuleType, ...]) -> Iterator[None]:
    """Every Triton kernel of `modules` runs Triton's host launch path and stops at the driver's
    launch: its wrappers (triton.heuristics evaluates its lambdas on every launch), then
    JITFunction.run's argument binding and specialisation, cache lookup and grid: 30-35 us per
    launch on a 2-core CPU VM, which `stubbed_launches` leaves out. Without CUDA, Triton's driver
    is _NoDevice."""
    from triton.runtime import driver

    fake_driver = not torch.cuda.is_available()
    active = driver._active  # None until first asked (asking without a GPU raises): restored as it was
    try:
        if fake_driver:
            driver.set_active(_NoDevice())
        with _replaced([_jit_slot(m, name) for m in modules for name in _kernel_names(m)], _host_path_stub):
            yield
    finally:
        if fake_driver:
            driver.set_active(active)


def inputs(seed: int = 0, device: str = "cpu") -> dict[str, torch.Tensor]:
    """The input of the calls on `device`: "logits" (B, T+1, V) for Liger, "rlops_logits" (B, T, V),
    both non-leaves as an lm_head's output is, and the (B, T) / (B,) tensors both read."""
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(B, T + 1, V, generator=g).to(device).requires_grad_(True)
    cpu = {
        "tokens": torch.randint(0, V, (B, T), generator=g),
        "advantages": torch.randn(B, generator=g),
        "mask": torch.ones(B, T, dtype=torch.bool),
        "old_logprobs": -torch.rand(B, T, generator=g) * 12,
        "ref_logprobs": -torch.rand(B, T, generator=g) * 12,
    }
    own = base.detach()[:, :-1].clone().requires_grad_(True)
    return {"logits": base * 1.0, "rlops_logits": own * 1.0, **{k: v.to(device) for k, v in cpu.items()}}


FORMS = ("own", "lm", "sliced")  # the logits rlops is given: (B, T, V); (B, T+1, V); (B, T+1, V)[:, :-1]


def rlops_step(i: dict[str, torch.Tensor], form: str = "own") -> Callable[[], torch.Tensor]:
    """One rlops forward+backward (backend "triton": the kernels' launchers) on the logits of `form`
    (FORMS): the (B, T, V) logits i["rlops_logits"], Liger's (B, T+1, V) i["logits"], or their
    slice i["logits"][:, :-1]; returns d logits."""
    from rlops import policy_loss

    x = i["rlops_logits"] if form == "own" else i["logits"]
    sliced = form == "sliced"

    def step() -> torch.Tensor:
        loss = policy_loss(x[:, :-1] if sliced else x, i["tokens"], i["advantages"], mask=i["mask"],
                           old_logprobs=i["old_logprobs"], ref_logprobs=i["ref_logprobs"], kl_coef=BETA,
                           kl_estimator="k3", clip_low=CLIP_LOW, clip_high=CLIP_HIGH, loss_agg="token-mean",
                           backend="triton").loss
        return torch.autograd.grad(loss, x)[0]

    return step


def without_value_checks(step: Callable[[], torch.Tensor]) -> Callable[[], torch.Tensor]:
    """step on CPU tensors as it runs on CUDA tensors: without rlops' value checks (the token-id
    range check, rlops._validation), which read values back to the host and so run on CPU tensors
    only (or with RLOPS_CHECK=1)."""
    from rlops import _validation

    def unchecked() -> torch.Tensor:
        checked, _validation.ALWAYS_CHECKED_DEVICES = _validation.ALWAYS_CHECKED_DEVICES, ()
        try:
            return step()
        finally:
            _validation.ALWAYS_CHECKED_DEVICES = checked

    return unchecked


def liger_step(i: dict[str, torch.Tensor]) -> Callable[[], torch.Tensor]:
    """One Liger `triton_grpo_loss` forward+backward with bench/policy_loss.py's settings; returns d logits."""
    from liger_kernel.transformers.grpo_loss import triton_grpo_loss

    x = i["logits"]

    def step() -> torch.Tensor:
        loss, _ = triton_grpo_loss(x, i["old_logprobs"], i["ref_logprobs"], i["tokens"], i["advantages"], i["mask"],
                                   temperature=1.0, beta=BETA, eps_low=CLIP_LOW, eps_high=CLIP_HIGH, inplace=True,
                                   loss_type="dapo", reduce=True)
        return torch.autograd.grad(loss, x)[0]

    return step


class _CountOps(TorchDispatchMode):
    """Counts the ATen ops dispatched while active (views and allocations included)."""

    def __init__(self) -> None:
        super().__init__()
        self.ops: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops.append(str(func))
        return func(*args, **(kwargs or {}))


def aten_ops(step: Callable[[], object]) -> list[str]:
    """The ATen ops one call of step issues, in order (after one call that warms caches up)."""
    step()
    with _CountOps() as counter:
        step()
    return counter.ops


def _median_us(step: Callable[[], object], calls: int) -> float:
    times = []
    for _ in range(calls):
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e6


@dataclass(frozen=True)
class HostOverhead:
    """Host time per forward+backward call (microseconds) and ATen ops per call, kernels stubbed."""

    rlops_us: float  # rlops.policy_loss on (B, T, V) logits
    rlops_lm_us: float  # the same on Liger's (B, T+1, V) logits
    rlops_sliced_us: float  # the same on x[:, :-1] of (B, T+1, V) logits: the slice's node included
    rlops_unchecked_us: float | None  # rlops_us without the value checks CUDA tensors skip; None on CUDA
    liger_us: float | None  # None: liger-kernel is not installed
    rlops_aten_ops: int
    liger_aten_ops: int | None

    @property
    def ratio(self) -> float | None:
        """rlops' time over Liger's (<= 1: rlops' host side is no slower)."""
        return None if self.liger_us is None else self.rlops_us / self.liger_us

    @property
    def lm_ratio(self) -> float | None:
        """rlops' time on Liger's own (B, T+1, V) logits over Liger's."""
        return None if self.liger_us is None else self.rlops_lm_us / self.liger_us

    @property
    def sliced_ratio(self) -> float | None:
        """rlops' time with the caller's slice of (B, T+1, V) logits over Liger's."""
        return None if self.liger_us is None else self.rlops_sliced_us / self.liger_us

    @property
    def unchecked_ratio(self) -> float | None:
        """rlops' time without the CPU-only value checks (as on CUDA tensors) over Liger's."""
        return None if self.liger_us is None or self.rlops_unchecked_us is None else \
            self.rlops_unchecked_us / self.liger_us

    def as_dict(self) -> dict[str, object]:
        """The JSON record (`rlops bench` writes it as the run's "host_overhead")."""
        return {**asdict(self), "ratio": self.ratio, "lm_ratio": self.lm_ratio, "sliced_ratio": self.sliced_ratio,
                "unchecked_ratio": self.unchecked_ratio, "input": {"B": B, "T": T, "V": V, "dtype": "float32"}}


def liger_available() -> bool:
    try:
        importlib.import_module(LIGER_KERNEL_MODULE)
        importlib.import_module("liger_kernel.transformers.grpo_loss")
    except Exception:  # not installed, or its import fails here: measured without it
        return False
    return True


def measure(rounds: int = 7, calls: int = 60, warmup: int = 30, device: str = "cpu") -> HostOverhead:
    """Host microseconds per forward+backward of rlops (on each form of logits of FORMS) and
    Liger (None where it is missing): each the minimum over `rounds` interleaved rounds of the
    median of `calls` calls, after `warmup` calls of each. About 0.1 s per round on a 2-core VM,
    after Liger's import (about 2 s: it imports transformers). On "cuda" the stubbed calls take
    the GPU path (no kernel runs; the small tensor ops are queued, not waited for); on "cpu"
    rlops' Triton path runs without the interpreter (no kernel runs)."""
    from rlops import kernels  # noqa: F401  (the launcher modules below are its submodules)

    with_liger = liger_available()
    modules = tuple(importlib.import_module(m) for m in RLOPS_KERNEL_MODULES)
    if with_liger:
        modules += (importlib.import_module(LIGER_KERNEL_MODULE),)
    with host_path_launches(modules):
        data = inputs(device=device)
        steps = {"rlops" if form == "own" else f"rlops_{form}": rlops_step(data, form) for form in FORMS}
        if device == "cpu":
            steps["rlops_unchecked"] = without_value_checks(rlops_step(data))
        if with_liger:
            steps["liger"] = liger_step(inputs(device=device))
        for step in steps.values():
            for _ in range(warmup):
                step()
        best = dict.fromkeys(steps, float("inf"))
        for _ in range(rounds):
            for name, step in steps.items():
                best[name] = min(best[name], _median_us(step, calls))
        counts = {name: len(aten_ops(steps[name])) for name in ("rlops", "liger") if name in steps}
    return HostOverhead(best["rlops"], best["rlops_lm"], best["rlops_sliced"], best.get("rlops_unchecked"),
                        best.get("liger"), counts["rlops"], counts.get("liger"))


def summary(h: HostOverhead) -> str:
    """One line: the times, their ratios and the ATen op counts."""
    head = (f"host time per policy-loss fwd+bwd (B={B} T={T} V={V} float32, launches stubbed at the driver): "
            f"rlops {h.rlops_us:.0f} us")
    if h.liger_us is None:
        return f"{head} ({h.rlops_sliced_us:.0f} us on a slice of (B, T+1, V) logits), {h.rlops_aten_ops} ATen ops " \
               "(liger-kernel not installed)"
    unchecked = "" if h.unchecked_ratio is None else \
        f"; {h.unchecked_ratio:.2f}x without the token-id check that CUDA tensors skip"
    return (f"{head}, Liger {h.liger_us:.0f} us ({h.ratio:.2f}x; {h.lm_ratio:.2f}x on Liger's (B, T+1, V) logits, "
            f"{h.sliced_ratio:.2f}x on a slice of their first T positions{unchecked}); ATen ops {h.rlops_aten_ops} "
            f"vs {h.liger_aten_ops}")


if __name__ == "__main__":
    print(summary(measure()))
