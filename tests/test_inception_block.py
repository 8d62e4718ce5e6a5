"""FusedInception against torchvision's Inception: every GoogLeNet block configuration, eval mode."""

import pytest
import torch
from torchvision.models.googlenet import Inception

from conftest import TOL, Decisions, assert_close_rel, assert_relu_zero_pattern, randomize_, split_launches
from fused_inception import FusedInception, count_launches

# (name, Inception args) exactly as torchvision.models.GoogLeNet builds them.
GOOGLENET_BLOCKS = [
    ("3a", (192, 64, 96, 128, 16, 32, 32)),
    ("3b", (256, 128, 128, 192, 32, 96, 64)),
    ("4a", (480, 192, 96, 208, 16, 48, 64)),
    ("4b", (512, 160, 112, 224, 24, 64, 64)),
    ("4c", (512, 128, 128, 256, 24, 64, 64)),
    ("4d", (512, 112, 144, 288, 32, 64, 64)),
    ("4e", (528, 256, 160, 320, 32, 128, 128)),
    ("5a", (832, 256, 160, 320, 32, 128, 128)),
    ("5b", (832, 384, 192, 384, 48, 128, 128)),
]


def make_pair(args, device, seed=0):
    ref = randomize_(Inception(*args), seed).eval().to(device)
    fused = FusedInception(*args).eval().to(device)
    fused.load_state_dict(ref.state_dict())
    return ref, fused


@pytest.mark.parametrize("name,args", GOOGLENET_BLOCKS, ids=[b[0] for b in GOOGLENET_BLOCKS])
@pytest.mark.parametrize("batch,size", [(1, 8), (3, 7)], ids=["b1-8x8", "b3-7x7"])
def test_block_matches_torchvision(name, args, batch, size, device, interpreter_launches):
    ref, fused = make_pair(args, device)
    x = torch.randn(batch, args[0], size, size, device=device)
    with torch.no_grad():
        with Decisions() as decisions:
            expected = ref.double()(x.double())
        with count_launches() as n:
            y = fused(x)
    assert n.value == 2 + split_launches(fused)  # the longest chain: reduce 1x1 -> 3x3 (+ split K's reductions)
    assert len(interpreter_launches) == n.value
    assert y.dtype == x.dtype and y.is_contiguous()
    assert_close_rel(y, expected, TOL[torch.float32], f"inception{name}")
    # Every channel comes out of a ReLU: the exact zeros of the reference (wherever not within rounding of 0).
    assert_relu_zero_pattern(y, decisions.pre_activation(expected), TOL[torch.float32], f"inception{name}")


@pytest.mark.parametrize("layout", ["channels_last", "nchw_sliced"])
def test_block_memory_formats(layout, device):
    """channels_last in -> channels_last out (as eager); a channel-sliced (non-contiguous) view works."""
    args = GOOGLENET_BLOCKS[0][1]
    ref, fused = make_pair(args, device, seed=1)
    if layout == "channels_last":
        x = torch.randn(2, args[0], 9, 9, device=device).to(memory_format=torch.channels_last)
    else:
        x = torch.randn(2, args[0] + 5, 9, 9, device=device)[:, 3:3 + args[0]]
        assert not x.is_contiguous()
    with torch.no_grad():
        expected = ref(x)
        y = fused(x)
    assert y.is_contiguous(memory_format=torch.channels_last) == expected.is_contiguous(
        memory_format=torch.channels_last)
    assert y.is_contiguous() == expected.is_contiguous()
    assert_close_rel(y, ref.double()(x.double()), TOL[torch.float32], layout)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_block_half_precision(dtype, device):
    args = GOOGLENET_BLOCKS[1][1]
    ref, fused = make_pair(args, device, seed=2)
    fused = fused.to(dtype)
    x = torch.randn(2, args[0], 6, 6, device=device)
    with torch.no_grad():
        expected = ref.double()(x.double())
        with count_launches() as n:
            y = fused(x.to(dtype))
    assert n.value == 2 + split_launches(fused) and y.dtype == dtype
    assert_close_rel(y, expected, TOL[dtype], str(dtype))


def test_state_dict_round_trip():
    """Same keys both ways: torchvision -> fused and fused -> torchvision load strictly."""
    args = GOOGLENET_BLOCKS[2][1]
    ref = randomize_(Inception(*args), 3)
    fused = FusedInception(*args)
    assert list(fused.state_dict()) == list(ref.state_dict())
    fused.load_state_dict(ref.state_dict())
    back = Inception(*args)
    back.load_state_dict(fused.state_dict())
    for k, v in back.state_dict().items():
        assert torch.equal(v, ref.state_dict()[k]), k
