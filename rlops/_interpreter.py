"""Triton's interpreter for processes that run rlops' kernels only to check them: the test suite
(tests/conftest.py, and each process tests/gloo_ranks.py spawns) and the CLI's runs without CUDA
(`rlops bench`'s untimed smoke run, `rlops profile`'s CPU measurement). speed_up_interpreter cuts
the interpreter's own checks and bookkeeping (the results are the same); check_hints, in the
tests, checks the alignment marks that a compiled kernel trusts and the interpreter ignores.
`import rlops` applies nothing: a user's process keeps Triton's interpreter as it is."""

from __future__ import annotations

import dataclasses
import os


def speed_up_interpreter() -> None:
    """Both speed-ups below, when TRITON_INTERPRET=1 (a no-op where Triton's interpreter lacks
    what they change). Measured on a 2-core CPU VM (a policy-loss forward+backward at the tests'
    sizes, best of 5): 1.39 s as Triton interprets it, 0.76-0.83 s with the nested patches
    skipped, 0.44-0.63 s with the overflow checks skipped too. The suite had the first already;
    the second, and both in the CLI's runs, took its pytest time from 897 s to 790 s."""
    if os.environ.get("TRITON_INTERPRET") != "1":
        return
    skip_nested_language_patches()
    skip_overflow_checks()


def skip_overflow_checks() -> None:
    """Cuts about a third of the interpreter's time left after skip_nested_language_patches: it
    checks every int32 add, subtract and multiply for overflow (recomputing it in int64 and
    asserting the range), which compiled kernels do only in Triton's debug mode. At the tests'
    sizes no index comes near 2**31; the kernels' int64 row offsets are checked past 2**31
    elements by the GPU tests (test_token_stats_gpu, test_policy_loss_gpu, test_packing), where
    the checks would not run anyway."""
    try:
        from triton.runtime import interpreter
    except ImportError:
        return
    builder = getattr(interpreter, "interpreter_builder", None)
    options = getattr(builder, "options", None)
    if dataclasses.is_dataclass(options) and hasattr(options, "sanitize_overflow"):  # its other options kept
        builder.options = dataclasses.replace(options, sanitize_overflow=False)


def skip_nested_language_patches() -> None:
    """Halves the interpreter's time on these kernels: it patches triton.language (scanning every
    member of tl, tl.tensor and tl.math) before each program and again at each call of a
    @triton.jit helper inside it, where the enclosing program's patch is already in place and the
    nested one changes nothing (a patched member is no longer a builtin, so it is skipped). The
    kernels call a dozen helpers per vocabulary tile: about half of an interpreted run was spent
    re-patching. Where the language is patched already, the nested patch is skipped; the
    program's own patch and its restore are untouched. Triton versions without this structure
    keep their own behaviour."""
    try:
        import triton.language as tl
        from triton.runtime import interpreter
    except ImportError:
        return
    patch = getattr(interpreter, "_patch_lang", None)
    scope = getattr(interpreter, "_LangPatchScope", None)
    if patch is None or scope is None or getattr(patch, "nested_skipped", False):
        return

    def patch_lang(fn):
        langs = [v for v in fn.__globals__.values() if v is tl or v is tl.core]
        if langs and not any(tl.core.is_builtin(lang.load) for lang in langs):  # patched by the program
            return scope()
        return patch(fn)

    patch_lang.nested_skipped = True
    interpreter._patch_lang = patch_lang


class FalseHintError(AssertionError):
    """A kernel's tl.multiple_of hint that the value it marks does not meet."""


def check_hints() -> None:
    """Makes every tl.multiple_of hint the interpreter meets a checked assertion (FalseHintError
    when the value is not a multiple), when TRITON_INTERPRET=1. The interpreter ignores hints,
    but a compiled kernel trusts them: a pointer marked 16-byte aligned is read in 16-byte
    vectors, which on a GPU faults (misaligned address) or reads the wrong elements where the
    mark is false. The kernels mark only scalars (a row's body pointer, a split's first
    element); any other hint raises, so that a new kind is checked before it is trusted."""
    if os.environ.get("TRITON_INTERPRET") != "1":
        return
    import numpy as np
    from triton.runtime import interpreter

    handle = interpreter.TensorHandle
    if getattr(handle.set_attr, "checks_hints", False):
        return
    set_attr = handle.set_attr

    def checked_set_attr(self, key, value):
        if key != "tt.divisibility" or np.size(self.data) != 1:
            raise NotImplementedError(f"check_hints checks tl.multiple_of on scalars only, got {key} on "
                                      f"shape {np.shape(self.data)}: extend it before relying on this hint")
        divisor, actual = int(value[0]), int(np.asarray(self.data).reshape(()))
        if actual % divisor:
            raise FalseHintError(f"tl.multiple_of(..., {divisor}) marks {actual} ({self.dtype}), which is "
                                 f"{actual % divisor} past a multiple: a compiled kernel would misread it")
        set_attr(self, key, value)

    checked_set_attr.checks_hints = True
    handle.set_attr = checked_set_attr
