"""torch.autocast (bf16/fp16) in eval: the kernels compute in the autocast dtype, like eager convs."""

import pytest
import torch

from conftest import TOL, assert_close_rel, randomize_
from fused_inception import FusedInception, count_launches

ARGS = (32, 8, 8, 16, 4, 8, 8)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_autocast_inference_matches_eager_autocast(dtype, device):
    block = randomize_(FusedInception(*ARGS), 0).eval().to(device)
    x = torch.randn(2, 32, 6, 6, device=device)
    with torch.no_grad():
        reference = block.double().eager_forward(x.double())  # the exact answer
        block.float()
        with torch.autocast(device.type, dtype=dtype):
            with count_launches() as n:
                y = block(x)
            eager = block.eager_forward(x)
    assert n.value == 2
    assert y.dtype == eager.dtype == dtype
    assert_close_rel(y, reference, TOL[dtype], "fused autocast vs float64")
    assert_close_rel(eager, reference, TOL[dtype], "eager autocast vs float64 (the same tolerance holds)")


def test_autocast_eval_backward(device):
    block = randomize_(FusedInception(*ARGS), 1).eval().to(device)
    x = torch.randn(2, 32, 5, 5, device=device, requires_grad=True)
    with torch.autocast(device.type, dtype=torch.bfloat16):
        y = block(x)
    y.float().sum().backward()
    x2 = x.detach().clone().requires_grad_()
    with torch.autocast(device.type, dtype=torch.bfloat16):
        y2 = block.eager_forward(x2)
    y2.float().sum().backward()
    assert x.grad.dtype == torch.float32
    assert_close_rel(x.grad, x2.grad, TOL[torch.bfloat16])


def test_float64_and_residual_blocks_under_autocast_follow_eager(device):
    """Autocast leaves float64 alone, and a residual block returns fp32 (x + scale * up promotes):
    both take the eager path, so dtypes and values are eager's."""
    from fused_inception import fuse
    from fused_inception.models.inception_resnet_v2 import Block35

    block = randomize_(FusedInception(*ARGS), 2).double().eval().to(device)
    x = torch.randn(1, 32, 4, 4, dtype=torch.float64, device=device)
    with torch.no_grad(), torch.autocast(device.type, dtype=torch.bfloat16):
        assert not block.uses_kernels(x)
        assert block(x).dtype == torch.float64
    model, _ = fuse(torch.nn.Sequential(randomize_(Block35(lambda n: max(n // 16, 1)), 3).eval().to(device)))
    x = torch.randn(1, 20, 4, 4, device=device)
    with torch.no_grad(), torch.autocast(device.type, dtype=torch.bfloat16):
        y, expected = model(x), model[0].eager_forward(x)
    assert y.dtype == expected.dtype == torch.float32
    assert torch.equal(y, expected)
