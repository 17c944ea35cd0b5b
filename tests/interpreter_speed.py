"""A faster Triton interpreter for the tests (conftest.py applies it; the tests that spawn
processes apply it in each worker, where conftest is not loaded)."""

from __future__ import annotations


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
