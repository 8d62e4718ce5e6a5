"""Bad input gets a clear error naming what was expected and what came; never a silent answer."""

import pytest
import torch

from conftest import TOL, assert_close_rel, randomize_
from fused_inception import FusedInception, UnsupportedBlock
from fused_inception.models import googlenet

ARGS = (32, 8, 8, 16, 4, 8, 8)


@pytest.fixture
def block():
    return randomize_(FusedInception(*ARGS), 0).eval()


def test_wrong_channel_count(block):
    with pytest.raises(ValueError, match="expects 32 input channels, got 31"):
        block(torch.randn(1, 31, 5, 5))


@pytest.mark.parametrize("shape", [(32, 5, 5), (1, 1, 32, 5, 5)])
def test_wrong_rank(block, shape):
    with pytest.raises(ValueError, match=f"expects a 4-D input .* got {len(shape)}-D"):
        block(torch.randn(*shape))


@pytest.mark.parametrize("dtype", [torch.int64, torch.uint8, torch.bool, torch.complex64])
def test_non_float_dtype(block, dtype):
    with pytest.raises(TypeError, match=f"floating-point input .* got {dtype}"):
        block(torch.zeros(1, 32, 5, 5, dtype=dtype))


def test_dtype_mismatch_with_parameters(block):
    with pytest.raises(TypeError, match="input dtype torch.float16 does not match the block's parameters"):
        block(torch.randn(1, 32, 5, 5, dtype=torch.float16))


def test_not_a_tensor(block):
    with pytest.raises(TypeError, match="expects a torch.Tensor, got list"):
        block([1.0, 2.0])


def test_mixed_devices(block):
    x = torch.randn(1, 32, 5, 5, device="meta")
    with pytest.raises(RuntimeError, match="input is on meta but the block's parameters are on cpu"):
        block(x)


def test_empty_batch_like_eager(block):
    with torch.no_grad():
        y = block(torch.randn(0, 32, 5, 5))
    assert y.shape == (0, 8 + 16 + 8 + 8, 5, 5)


def test_float64_takes_the_eager_path(block):
    """float64 is computed by the eager fallback (the kernels take fp32/fp16/bf16)."""
    block64 = FusedInception(*ARGS).double().eval()
    block64.load_state_dict(block.state_dict())
    x = torch.randn(2, 32, 5, 5, dtype=torch.float64)
    assert not block64.uses_kernels(x)
    with torch.no_grad():
        assert_close_rel(block64(x), block(x.float()), TOL[torch.float32])


def test_spatial_size_too_small_for_the_network():
    model = googlenet(aux_logits=False).eval()
    with pytest.raises(RuntimeError):  # the stem's max pools reject it, as in torchvision
        with torch.no_grad():
            model(torch.randn(1, 3, 4, 4))


def test_unknown_conv_block_is_refused_at_construction():
    class MyConv(torch.nn.Module):
        def __init__(self, cin, cout, **kw):
            super().__init__()
            self.conv = torch.nn.Conv2d(cin, cout, **kw)

        def forward(self, x):
            return torch.tanh(self.conv(x))

    with pytest.raises(UnsupportedBlock, match="computed by call_function tanh"):
        FusedInception(*ARGS, conv_block=MyConv)


def test_torchvision_conv_block_is_accepted():
    from torchvision.models.googlenet import BasicConv2d

    block = FusedInception(*ARGS, conv_block=BasicConv2d)
    assert block.graph().nodes[0].bn is block.branch1.bn
