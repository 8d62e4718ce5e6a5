"""Triton's CPU interpreter (TRITON_INTERPRET=1), made cheaper and made to round bfloat16 as a GPU
does, for this project's own CPU runs: the tests, the benchmark suites at tiny shapes, and the
report (`python -m fused_inception` on CPU). The library itself never imports this module: a
user's own interpreter runs stay as Triton made them.

`configure()` changes three things (Triton 3.8; Triton 3.6 has the same code):

- **The integer-overflow sanitizer: 43 % of the time** of a profiled training test
  (`tests/test_training.py::test_gradcheck_float64`, 154 s under cProfile). The interpreter redoes
  every int32 add, subtract and multiply in int64 and compares (`sanitize_overflow`), then drops
  the result: the assert it builds is a no-op unless the options' `debug` is on too, and the
  interpreter builds its options once with `debug` off (TRITON_DEBUG does not reach them). So the
  cost bought nothing. `configure()` turns it off.
  `overflow_checks()` turns both options on, so that the check asserts, where a test wants it
  (tests/test_stage_writes.py for every kernel kind, and a block training test).
- **Patching `triton.language` at every device-function call: 21 %.** A call from a kernel to a
  `@triton.jit` helper (`_pixels`, `_initial`, `tl.zeros`, ...) walks `triton.language`'s members
  with `inspect.getmembers` and rebinds its builtins, about 0.3 ms a call, although the launch
  running the helper bound them already. `configure()` skips the walk when the language modules
  the function's globals hold are bound and so is the tensor class, which only a running launch
  binds (each launch restores it at its end): a launch itself therefore always patches in full.
- **float32 -> bfloat16 conversions truncate.** The interpreter's `cast_impl` drops the low 16
  bits (round toward zero) where a GPU rounds to nearest even. The bias is systematic: over
  GoogLeNet at 32x32 in bf16 the fused network's error grew to 0.044 of the output's maximum,
  5x eager's 0.008 (fp16, which numpy rounds to nearest, stayed at eager's: 0.0012 against
  0.0014). `configure()` converts through torch, which rounds to nearest even as the GPU does
  (a NaN stays a NaN; its bits may differ from a GPU's canonical one).
  (Triton's maintainers say the interpreter does not support bfloat16 yet: triton#11585, where
  `tl.dot` of bfloat16 multiplies bit patterns; kernels/conv.py's DOT_IN_FP32 works around that.)

All three are Python-level changes to Triton's private interpreter module: `configure()` changes
nothing (and returns False) on a Triton whose interpreter lacks the names it changes.
"""

import contextlib
import dataclasses

import numpy as np
import torch
import triton.language as tl

try:
    from triton.runtime import interpreter as _interp
except ImportError:  # (no interpreter in this Triton)
    _interp = None

_NAMES = ("interpreter_builder", "InterpreterOptions", "InterpreterBuilder", "TensorHandle", "_patch_lang",
          "_LangPatchScope")
_original = {}  # what configure() replaced: "patch_lang", "cast_impl"


def _bound(lang):
    """Whether `lang`'s builtins and its tensor class are bound. A scope binds a module's builtins,
    its tensor class and the rest together; a launch's scope undoes them at its end, a helper
    call's scope never (Triton's own behaviour: `tl.core` stays bound after the first `tl.zeros`),
    but the tensor class is bound only while a launch runs."""
    return not tl.core.is_builtin(lang.program_id) and not tl.core.is_builtin(lang.tensor.__add__)


def _patch_lang(fn):
    langs = [v for v in fn.__globals__.values() if v is tl or v is tl.core]  # (as _patch_lang finds them)
    if langs and all(_bound(lang) for lang in langs):
        return _interp._LangPatchScope()  # (nothing to restore)
    return _original["patch_lang"](fn)


def _to_bf16(data):
    """float32 numpy data as bfloat16 bits (uint16), rounded to nearest even."""
    values = torch.from_numpy(np.array(data, dtype=np.float32, copy=True, ndmin=1))
    return values.to(torch.bfloat16).view(torch.int16).numpy().view(np.uint16).reshape(np.shape(data))


def _cast_impl(self, src, dst_type):
    if src.dtype.scalar == tl.float32 and dst_type.scalar == tl.bfloat16:
        return _interp.TensorHandle(_to_bf16(src.data), dst_type.scalar)
    return _original["cast_impl"](self, src, dst_type)


def _set_options(**options):
    builder = _interp.interpreter_builder
    before = {name: getattr(builder.options, name) for name in options}
    builder.options = dataclasses.replace(builder.options, **options)
    return before


def configure():
    """Make the interpreter skip the int32 overflow arithmetic whose result it drops and its
    repeated rebinding of `triton.language`, and round float32 -> bfloat16 to nearest even (see
    the module's docstring). Idempotent; True if applied."""
    if _interp is None or not all(hasattr(_interp, n) for n in _NAMES) \
            or not hasattr(_interp.InterpreterBuilder, "cast_impl") \
            or not any(f.name == "sanitize_overflow" for f in dataclasses.fields(_interp.InterpreterOptions)):
        return False
    _set_options(sanitize_overflow=False)
    if not _original:
        _original["patch_lang"], _interp._patch_lang = _interp._patch_lang, _patch_lang
        _original["cast_impl"] = _interp.InterpreterBuilder.cast_impl
        _interp.InterpreterBuilder.cast_impl = _cast_impl
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
