"""fused_inception.interpreter: what conftest changes in Triton's interpreter for speed keeps the
kernels' results, and overflow_checks() still catches an int32 overflow."""

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


def test_speed_up_is_on_and_helper_calls_still_work():
    assert interpreter.speed_up()  # conftest applied it already: applying it again changes nothing
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
    _times_kernel[(1,)](x, out, 2, N=16)  # unchecked again after the block
    assert torch.equal(out, torch.full_like(x, -2**31))
