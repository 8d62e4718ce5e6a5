"""Residual blocks with a projection shortcut and BatchNorm after the add, as published
Inception-ResNet write-ups draw them: relu(bn(shortcut_conv1x1(x) + s * conv1x1(cat(branches)))).

The shortcut runs as one more problem of the first stage (it reads the block input, like the
branches' 1x1s) into a slice of `mid`; the last stage's epilogue adds it and applies the BN
(folded at inference, batch statistics in training) and the ReLU: launches = the branches'
longest chain + 1.
"""

import copy

import pytest
import torch
from torch import nn
import torch.nn.functional as F

from conftest import TOL, assert_close_rel, randomize_
from fused_inception import count_launches, fuse
from fused_inception.dropins import BasicConv2d
from test_training import check_training_parity


class ProjectionBlock(nn.Module):
    """Modules all the way: nn.Sequential branches, nn.ReLU, the scale a Python float."""

    def __init__(self, cin=24, cout=40, scale=0.3):
        super().__init__()
        self.b0 = BasicConv2d(cin, 16, kernel_size=1)
        self.b1 = nn.Sequential(BasicConv2d(cin, 8, kernel_size=1), BasicConv2d(8, 16, kernel_size=3, padding=1))
        self.b2 = nn.Sequential(BasicConv2d(cin, 8, kernel_size=1), BasicConv2d(8, 8, kernel_size=3, padding=1),
                                BasicConv2d(8, 16, kernel_size=3, padding=1))
        self.up = nn.Conv2d(48, cout, 1)
        self.shortcut = nn.Conv2d(cin, cout, 1, bias=False)
        self.bn = nn.BatchNorm2d(cout)
        self.relu = nn.ReLU(inplace=True)
        self.scale = scale

    def forward(self, x):
        y = torch.cat([self.b0(x), self.b1(x), self.b2(x)], 1)
        return self.relu(self.bn(self.shortcut(x) + self.scale * self.up(y)))


class FunctionalProjectionBlock(ProjectionBlock):
    """The other way round: up(cat) * scale first, the scale a buffer, F.relu, a biased shortcut."""

    def __init__(self):
        super().__init__()
        self.shortcut = nn.Conv2d(24, 40, 1, bias=True)
        del self.scale
        self.register_buffer("scale", torch.tensor(0.17))

    def forward(self, x):
        y = torch.cat([self.b0(x), self.b1(x), self.b2(x)], dim=1)
        return F.relu(self.bn(self.up(y) * self.scale + self.shortcut(x)))


BLOCKS = [ProjectionBlock, FunctionalProjectionBlock]


@pytest.mark.parametrize("make", BLOCKS, ids=lambda c: c.__name__)
def test_fused_in_four_launches_and_exact_in_eval(make, device):
    ref = randomize_(make(), 3).eval().to(device)
    fused, report = fuse(copy.deepcopy(ref))
    assert len(report.swapped) == 1, str(report)
    assert report.swapped[0][3] == 4  # the 3-deep branch + the head
    x = torch.randn(2, 24, 7, 9, device=device)
    fused(x)  # plan
    with torch.no_grad(), count_launches() as n:
        y = fused(x)
        expected = copy.deepcopy(ref).double()(x.double())
    assert n.value == 4
    assert_close_rel(y, expected, TOL[torch.float32])
    assert bool((y >= 0).all())


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_and_channels_last(dtype, device):
    ref = randomize_(ProjectionBlock(), 4).eval().to(device)
    fused, _ = fuse(copy.deepcopy(ref))
    x = torch.randn(1, 24, 6, 6, device=device).to(memory_format=torch.channels_last)
    with torch.no_grad():
        y = fused.to(dtype)(x.to(dtype))
        expected = copy.deepcopy(ref).double()(x.double())
    assert y.dtype == dtype and y.is_contiguous(memory_format=torch.channels_last)
    assert_close_rel(y, expected, TOL[dtype])


@pytest.mark.parametrize("make", BLOCKS, ids=lambda c: c.__name__)
def test_trains_like_eager(make, device):
    """Outputs, input and parameter gradients (the shortcut's and the BN after the add's among
    them) and running statistics against the unfused block in float64, over two steps."""
    ref = randomize_(make(), 5).to(device)
    fused, _ = fuse(copy.deepcopy(ref))
    probe = copy.deepcopy(fused).train()
    with count_launches() as forward:
        y = probe(torch.randn(2, 24, 5, 5, device=device, requires_grad=True))
    with count_launches() as backward:
        y.sum().backward()
    # forward: the convolutions (the shortcut's with stage 1's), then BatchNorm, per stage;
    # backward: the intermediate results recomputed (3 stages write `mid`), BN reduction and gradient per stage
    assert (forward.value, backward.value) == (2 * 4, 3 + 2 * 4)
    check_training_parity(ref, fused, torch.randn(2, 24, 5, 6, device=device), zero_grads=("up.bias", "shortcut.bias"))  # (conv biases before a BN)


def test_shortcut_of_another_geometry_is_refused():
    """A 3x3 or strided shortcut doesn't read at the output's resolution: left alone, with the reason."""
    block = ProjectionBlock()
    block.shortcut = nn.Conv2d(24, 40, 3, padding=1, bias=False)
    _, report = fuse(block)
    assert [name for name, *_ in report.left_alone] == [""], str(report)  # the block; its conv units fuse
    assert "shortcut must be a 1x1" in report.left_alone[0][2], str(report)
