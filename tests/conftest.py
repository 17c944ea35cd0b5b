"""Test setup: Triton's interpreter on CPU-only machines, GPU tests skipped without CUDA."""

import os

import pytest
import torch

# The interpreter is chosen when triton is first imported, so this must run before any test
# module imports rlops.kernels.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


def _skip_nested_language_patches() -> None:
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


if os.environ.get("TRITON_INTERPRET") == "1":
    _skip_nested_language_patches()


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device (GPU test)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(params=["triton", "cuda"])
def gpu_backend(request: pytest.FixtureRequest) -> str:
    """The kernel backends of the GPU suite: Triton and the CUDA C++ backend. The CUDA one is
    skipped only where it cannot be built (no nvcc, no prebuilt rlops._C); a failed build fails."""
    if request.param == "cuda":
        from rlops import _cuda

        reason = _cuda.unavailable_reason()
        if reason is not None:
            if _cuda.can_build():
                pytest.fail(reason)
            pytest.skip(reason)
    return request.param
