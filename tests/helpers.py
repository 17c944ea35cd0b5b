"""Shared test helpers: the device the kernels run on and the tolerances of SPEC.md section 6."""

from __future__ import annotations

import contextlib
import os
import socket
from collections.abc import Iterator
from typing import NamedTuple

import numpy as np
import torch

# On a GPU machine the kernels run compiled on CUDA; elsewhere in Triton's interpreter on CPU.
DEVICE = torch.device(
    "cuda" if torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1" else "cpu"
)

FP32_TOL = 1e-5


def float32_tol(expected: torch.Tensor) -> float:
    """SPEC's 1e-5 plus 4 float32 ulps of the largest expected magnitude.

    The SPEC bound assumes ordinary logit scales; a float32 output of magnitude above ~128
    cannot itself be closer than 1e-5 to the float64 value, so extreme-scale tests add the
    output's own rounding.
    """
    scale = expected.abs().max().item() if expected.numel() else 0.0
    return FP32_TOL + 4 * 2.0**-23 * scale


def max_err(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """Largest absolute difference, computed in float64; NaN/inf anywhere counts as infinite."""
    assert actual.shape == expected.shape, (actual.shape, expected.shape)
    if actual.numel() == 0:
        return 0.0
    diff = (actual.double() - expected.double()).abs()
    if not torch.isfinite(diff).all():
        return float("inf")
    return diff.max().item()


def assert_values_close(actual: torch.Tensor, expected: torch.Tensor, tol: float = FP32_TOL,
                        what: str = "value") -> None:
    err = max_err(actual, expected)
    assert err <= tol, f"{what}: max abs error {err:.3g} > {tol:.3g}"


def assert_grad_close(actual: torch.Tensor, expected: torch.Tensor, eager: torch.Tensor | None = None,
                      what: str = "grad") -> None:
    """SPEC section 6: float32 grads within 1e-5 * max|grad|; half-precision grads within twice
    the error of eager PyTorch on the same input (`eager`), plus 1e-6."""
    err = max_err(actual, expected)
    if actual.dtype in (torch.float32, torch.float64):
        scale = expected.abs().max().item() if expected.numel() else 0.0
        tol = FP32_TOL * max(scale, 1e-30)
    else:
        assert eager is not None, "half-precision gradients are judged against eager PyTorch's error"
        tol = 2 * max_err(eager, expected) + 1e-6
    assert err <= tol, f"{what}: max abs error {err:.3g} > {tol:.3g}"


def free_port() -> int:
    """A TCP port free on this machine now, for a torchrun rendezvous (a random pick could collide
    with another test's, under a seeded `random`, or with a parallel worker's)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Access(NamedTuple):
    """One interpreted load or store: the launch (index into Accesses.kernels) and program
    (grid index) that made it, and the addresses of its unmasked lanes, `size` bytes each."""
    launch: int
    program: tuple[int, int, int]
    store: bool
    addresses: np.ndarray
    size: int


class Accesses:
    """The memory accesses of the kernels Triton's interpreter ran inside `recorded_accesses()`: one
    (addresses, bytes each) pair per interpreted load or store, masked-off lanes left out; and
    each as an Access, with its launch and program, for races() and outside()."""

    def __init__(self) -> None:
        self.loads: list[tuple[np.ndarray, int]] = []
        self.stores: list[tuple[np.ndarray, int]] = []
        self.kernels: list[str] = []  # one name per launch
        self.by_program: list[Access] = []
        self.arguments: list[dict[str, tuple[int, int]]] = []  # per launch: its tensors' [start, end) bytes

    def outside(self) -> list[str]:
        """One line per launch that loads or stores a byte outside every tensor passed to it: on a
        GPU an illegal memory access, or another tensor's data read or overwritten (the interpreter
        reads and writes host memory wherever a pointer points)."""
        found = []
        for launch, label, touched in self._launches():
            if not touched:
                continue
            first = np.concatenate([a.addresses for a in touched])
            last = np.concatenate([a.addresses + a.size - 1 for a in touched])
            inside = np.zeros(first.size, dtype=bool)
            for start, end in self.arguments[launch].values():
                inside |= (first >= start) & (last < end)
            if not inside.all():
                found.append(f"{label}: {int((~inside).sum())} accesses outside its tensors "
                             f"{sorted(self.arguments[launch])}, e.g. at byte {int(first[~inside][0])}")
        return found

    def races(self) -> list[str]:
        """One line per launch in which a byte that one program stores is loaded or stored by another
        program. On a GPU a launch's programs run at once and in any order, so that is a race (or
        an order the kernel cannot rely on); the interpreter runs them one after another and shows
        neither. rlops' kernels use no atomics and no signals between programs: any such byte is a bug."""
        found = []
        for _, label, touched in self._launches():
            problem = _race(_bytes_of([a for a in touched if a.store]), _bytes_of([a for a in touched if not a.store]))
            if problem:
                found.append(f"{label}: {problem}")
        return found

    def _launches(self) -> Iterator[tuple[int, str, list[Access]]]:
        """Each launch's index, its label for a message ("kernel (launch i)") and its accesses."""
        by_launch: dict[int, list[Access]] = {}
        for a in self.by_program:
            by_launch.setdefault(a.launch, []).append(a)
        for launch, kernel in enumerate(self.kernels):
            yield launch, f"{kernel} (launch {launch})", by_launch.get(launch, [])

    @staticmethod
    def _within(records: list[tuple[np.ndarray, int]], x: torch.Tensor) -> tuple[np.ndarray, int]:
        """Byte offsets into x's memory of the accesses that fall in it, and the bytes they moved."""
        start, end = extent(x)
        offsets, moved = [], 0
        for addresses, size in records:
            inside = addresses[(addresses >= start) & (addresses < end)] - start
            offsets.append(inside)
            moved += inside.size * size
        return (np.concatenate(offsets) if offsets else np.empty(0, dtype=np.int64)), moved

    def loaded(self, x: torch.Tensor) -> int:
        """Bytes loaded from x's memory (an element read twice counts twice)."""
        return self._within(self.loads, x)[1]

    def stored(self, x: torch.Tensor) -> int:
        """Bytes stored into x's memory (an element written twice counts twice)."""
        return self._within(self.stores, x)[1]

    def stored_anywhere(self) -> int:
        """Bytes stored into any memory."""
        return sum(addresses.size * size for addresses, size in self.stores)

    def loaded_anywhere(self) -> int:
        """Bytes loaded from any memory."""
        return sum(addresses.size * size for addresses, size in self.loads)

    def loads_per_element(self, x: torch.Tensor) -> np.ndarray:
        """How many times each element of x, contiguous, was loaded (x.numel(),)."""
        assert x.is_contiguous(), "elements are found from addresses in a contiguous tensor"
        offsets = self._within(self.loads, x)[0]
        return np.bincount(offsets // x.element_size(), minlength=x.numel())

    def rows_loaded(self, x: torch.Tensor) -> set[int]:
        """The rows of x (..., V), contiguous, loaded from: indices of x.reshape(-1, V)."""
        assert x.is_contiguous(), "rows are found from addresses in a contiguous tensor"
        offsets = self._within(self.loads, x)[0]
        return {int(r) for r in np.unique(offsets // (x.shape[-1] * x.element_size()))}


def extent(x: torch.Tensor) -> tuple[int, int]:
    """The bytes [start, end) that x's elements span (non-negative strides; empty for no element)."""
    start = x.data_ptr()
    if not x.numel():
        return start, start
    return start, start + (1 + sum((n - 1) * s for n, s in zip(x.shape, x.stride(), strict=True))) * x.element_size()


def _race(stores: np.ndarray, loads: np.ndarray) -> str | None:
    """Accesses.races' test of one launch, from its (byte, program) pairs (_bytes_of)."""
    stored, writers = np.unique(stores[:, 0], return_counts=True)
    if (writers > 1).any():
        return f"{int((writers > 1).sum())} bytes stored by several programs, e.g. byte {int(stored[writers > 1][0])}"
    if not len(stored):
        return None
    # stores now holds one pair per byte, sorted by byte: its row `at` is the writer of a stored byte.
    at = np.minimum(np.searchsorted(stored, loads[:, 0]), len(stored) - 1)
    crossed = (stored[at] == loads[:, 0]) & (stores[at, 1] != loads[:, 1])
    if crossed.any():
        byte = int(loads[crossed][0, 0])
        return f"{int(crossed.sum())} bytes that one program stores are loaded by another, e.g. byte {byte}"
    return None


def _bytes_of(accesses: list[Access]) -> np.ndarray:
    """The distinct (byte address, program number) pairs the accesses touch, as an (n, 2) int64 array."""
    if not accesses:
        return np.empty((0, 2), dtype=np.int64)
    numbers: dict[tuple[int, int, int], int] = {}
    pairs = []
    for a in accesses:
        touched = (a.addresses[:, None] + np.arange(a.size)).ravel()
        pairs.append(np.stack([touched, np.full(touched.size, numbers.setdefault(a.program, len(numbers)))], 1))
    return np.unique(np.concatenate(pairs), axis=0)


@contextlib.contextmanager
def recorded_accesses() -> Iterator[Accesses]:
    """Records the loads and stores of the kernels Triton's interpreter runs inside the block (both
    Triton 3.6's and 3.9's interpreters access memory through their module's
    `_interpreter.load(pointers, mask, other, dtype)` and `_interpreter.store(pointers, value, mask)`)."""
    import triton.runtime.interpreter as interpreter

    real, accesses = interpreter._interpreter, Accesses()

    def lanes(pointers: np.ndarray, mask: np.ndarray) -> np.ndarray:
        return np.asarray(pointers)[np.broadcast_to(np.asarray(mask, dtype=bool), np.shape(pointers))].astype(np.int64)

    class Recording:
        def __getattr__(self, name: str) -> object:
            return getattr(real, name)

        def load(self, pointers: np.ndarray, mask: np.ndarray, other: np.ndarray, dtype: object) -> np.ndarray:
            record(False, lanes(pointers, mask), np.dtype(dtype).itemsize)
            return real.load(pointers, mask, other, dtype)

        def store(self, pointers: np.ndarray, value: np.ndarray, mask: np.ndarray) -> None:
            record(True, lanes(pointers, mask), np.asarray(value).dtype.itemsize)
            return real.store(pointers, value, mask)

    def record(store: bool, addresses: np.ndarray, size: int) -> None:
        (accesses.stores if store else accesses.loads).append((addresses, size))
        program = tuple(interpreter.interpreter_builder.grid_idx)
        accesses.by_program.append(Access(len(accesses.kernels) - 1, program, store, addresses, size))

    launch = interpreter.GridExecutor.__call__

    def launch_recorded(executor, *args, **kwargs):
        accesses.kernels.append(executor.fn.__name__)
        named = {**dict(zip(executor.arg_names, args, strict=False)), **kwargs}
        accesses.arguments.append({name: extent(x) for name, x in named.items() if isinstance(x, torch.Tensor)})
        return launch(executor, *args, **kwargs)

    interpreter._interpreter, interpreter.GridExecutor.__call__ = Recording(), launch_recorded
    try:
        yield accesses
    finally:
        interpreter._interpreter, interpreter.GridExecutor.__call__ = real, launch


@contextlib.contextmanager
def rows_read(x: torch.Tensor) -> Iterator[set[int]]:
    """The rows of x (..., V), contiguous, that the kernels the interpreter runs inside the block
    load from (Accesses.rows_loaded), filled in when the block exits."""
    rows: set[int] = set()
    with recorded_accesses() as accesses:
        yield rows
    rows.update(accesses.rows_loaded(x))
