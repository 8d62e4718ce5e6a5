"""fused_inception.interpreter: what conftest changes in Triton's interpreter keeps the kernels'
results, rounds float32 -> bfloat16 as torch (and a GPU) does, and overflow_checks() still
catches an int32 overflow."""

import pytest
import torch
import triton
import triton.language as tl

from fused_inception import interpreter
from fused_inception.kernels import conv as kconv

pytestmark = pytest.mark.skipif(not kconv.INTERPRETING, reason="about Triton's CPU interpreter (TRITON_INTERPRET=1)")


@triton.jit
def _scaled(x, factor):
    return x * factor


@triton.jit
def _times_kernel(x_ptr, out_ptr, factor, N: tl.constexpr):
    offs = tl.arange(0, N)
    acc = tl.zeros((N,), dtype=tl.int32)  # (a helper of triton.language.standard)
    acc += _scaled(tl.load(x_ptr + offs), factor)  # (a helper of this module)
    tl.store(out_ptr + offs, acc)


def test_configured_and_helper_calls_still_work():
    assert interpreter.configure()  # conftest applied it already: applying it again changes nothing
    x = torch.arange(16, dtype=torch.int32)
    for factor in (3, -5):  # two launches: the language is bound again for the second
        out = torch.empty_like(x)
        _times_kernel[(1,)](x, out, factor, N=16)
        assert torch.equal(out, x * factor)


def test_overflow_checks_catch_an_int32_overflow():
    x = torch.full((16,), 2**30, dtype=torch.int32)
    out = torch.empty_like(x)
    _times_kernel[(1,)](x, out, 4, N=16)  # unchecked (conftest): wraps around as on a GPU
    assert torch.equal(out, torch.zeros_like(x))
    with interpreter.overflow_checks(), pytest.raises(Exception, match="overflow"):
        _times_kernel[(1,)](x, out, 4, N=16)
    options = triton.runtime.interpreter.interpreter_builder.options
    assert not options.sanitize_overflow and not options.debug  # both restored
    _times_kernel[(1,)](x, out, 2, N=16)  # unchecked again after the block
    assert torch.equal(out, torch.full_like(x, -2**31))


CORE_ONLY = """
import triton
from triton.language import core as tl  # (the kernel's globals hold triton.language.core only)


@triton.jit
def plus_one(x_ptr, out_ptr, N: tl.constexpr):
    offs = tl.arange(0, N)
    tl.store(out_ptr + offs, tl.load(x_ptr + offs) + 1)
"""


def test_a_kernel_seeing_only_triton_language_core(tmp_path, monkeypatch):
    """After a launch whose helper (tl.zeros) left triton.language.core's builtins bound, a kernel
    whose module imports only `core` still gets its tensor methods bound: the patching is skipped
    only inside a running launch."""
    import importlib

    (tmp_path / "core_only_kernel.py").write_text(CORE_ONLY)
    monkeypatch.syspath_prepend(str(tmp_path))
    module = importlib.import_module("core_only_kernel")
    x = torch.arange(16, dtype=torch.int32)
    out = torch.empty_like(x)
    _times_kernel[(1,)](x, out, 2, N=16)  # (tl.zeros: triton.language.core stays bound)
    module.plus_one[(1,)](x, out, N=16)
    assert torch.equal(out, x + 1)


@triton.jit
def _to_bf16_kernel(x_ptr, out_ptr, N: tl.constexpr):
    offs = tl.arange(0, N)
    tl.store(out_ptr + offs, tl.load(x_ptr + offs).to(tl.bfloat16))


def test_float32_to_bfloat16_rounds_to_nearest_even():
    """Halfway cases, just above and below halfway, carries into the exponent, negatives,
    overflow to infinity, subnormals, NaN: bit for bit torch's conversion."""
    one = 1.0
    ulp = 2.0 ** -7  # of bfloat16 at 1
    x = torch.tensor([one + ulp / 2, one + 1.5 * ulp, one + ulp / 2 + 2 ** -20, one + ulp / 2 - 2 ** -20,
                      2 - ulp / 4, -(one + 0.75 * ulp), 3.4e38, -3.4e38, 1e-40, -1e-39, float("nan"),
                      float("inf"), 0.0, -0.0, 1.0 / 3, 65504.0], dtype=torch.float32)
    out = torch.empty(16, dtype=torch.bfloat16)
    _to_bf16_kernel[(1,)](x, out, N=16)
    assert torch.equal(out.view(torch.int16), x.to(torch.bfloat16).view(torch.int16))
