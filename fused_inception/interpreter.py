"""Triton's CPU interpreter (TRITON_INTERPRET=1), made cheaper for this project's own CPU runs:
the tests, the benchmark suites at tiny shapes, and the report (`python -m fused_inception` on
CPU). The library itself never imports it: a user's own interpreter runs stay as Triton made them.

Profiling the test suite showed two costs of the interpreter that are not the kernels' work
(Triton 3.8, `tests/test_training.py::test_gradcheck_float64`, 154 s under cProfile):

- **The integer-overflow sanitizer, 43 %.** The interpreter redoes every int32 add, subtract and
  multiply in int64 and compares (`InterpreterOptions.sanitize_overflow`), then drops the result:
  the assert it builds is a no-op unless the options' `debug` is on too, which TRITON_DEBUG sets
  and the tests did not. So the cost bought nothing. `overflow_checks()` turns both on, so that the
  check asserts, where a test wants it (tests/test_stage_writes.py, for every kernel kind, and a
  training test).
- **Patching `triton.language` at every device-function call, 21 %.** A call from a kernel to a
  `@triton.jit` helper (`_pixels`, `_initial`, `tl.zeros`, ...) walks `triton.language`'s members
  with `inspect.getmembers` and rebinds its builtins, about 0.3 ms a call, although the launch
  running the helper bound them already. `speed_up()` skips the walk when the helper's language
  modules are bound already; the first call of a launch still patches as before.

Both are Python-level changes to Triton's private interpreter module: `speed_up()` does nothing
(and returns False) on a Triton whose interpreter lacks the names it changes.
"""

import contextlib
import dataclasses

import triton.language as tl

try:
    from triton.runtime import interpreter as _interp
except ImportError:  # (no interpreter in this Triton)
    _interp = None

_NAMES = ("interpreter_builder", "InterpreterOptions", "_patch_lang", "_LangPatchScope")
_original_patch_lang = None
_langs = {}  # a device function -> the triton.language modules its globals hold


def _bound(lang):
    """Whether the interpreter has bound `lang`'s builtins (they are all bound or none: a
    _LangPatchScope binds and restores them together)."""
    return not tl.core.is_builtin(lang.program_id)


def _patch_lang(fn):
    langs = _langs.get(fn)
    if langs is None:
        langs = _langs[fn] = [v for v in fn.__globals__.values() if v is tl or v is tl.core]
    if langs and all(_bound(lang) for lang in langs):
        return _interp._LangPatchScope()  # (nothing to restore)
    return _original_patch_lang(fn)


def _set_options(**options):
    builder = _interp.interpreter_builder
    before = {name: getattr(builder.options, name) for name in options}
    builder.options = dataclasses.replace(builder.options, **options)
    return before


def speed_up():
    """Make the interpreter skip the int32 overflow arithmetic whose result it drops and its
    repeated rebinding of `triton.language` (see the module's docstring). Idempotent; True if
    applied."""
    global _original_patch_lang
    if _interp is None or not all(hasattr(_interp, n) for n in _NAMES) \
            or not any(f.name == "sanitize_overflow" for f in dataclasses.fields(_interp.InterpreterOptions)):
        return False
    _set_options(sanitize_overflow=False)
    if _original_patch_lang is None:
        _original_patch_lang = _interp._patch_lang
        _interp._patch_lang = _patch_lang
    return True


@contextlib.contextmanager
def overflow_checks():
    """Inside the block, the interpreter asserts that no int32 add, subtract or multiply of a
    kernel overflows (its `sanitize_overflow` and `debug` options on: with `debug` off it computes
    the check and drops it). `tl.device_assert`s assert too."""
    if _interp is None or not hasattr(_interp, "interpreter_builder"):
        yield
        return
    before = _set_options(sanitize_overflow=True, debug=True)
    try:
        yield
    finally:
        _set_options(**before)
