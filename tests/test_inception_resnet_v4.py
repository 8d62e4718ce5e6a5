"""Inception-ResNet residual blocks and Inception-v4 blocks (timm's architectures), through fuse()."""

import copy

import pytest
import torch
from torch import nn

from conftest import TOL, assert_close_rel, randomize_, split_launches
from fused_inception import FusedGraphBlock, build_plans, count_launches, fuse
from fused_inception.models.inception_resnet_v2 import (BasicConv2d, Block8, Block17, Block35, InceptionResnetV2,
                                                        inception_resnet_v2)


def channels(width):
    return lambda n: max(n // width, 1)


def fused_matches(block, x, launches, device, interpreter_launches, tol=TOL[torch.float32]):
    block = randomize_(block, 5).eval().to(device)
    reference = copy.deepcopy(block)
    model, report = fuse(nn.Sequential(block))
    assert isinstance(model[0], FusedGraphBlock), str(report)
    x = x.to(device)
    with torch.no_grad():
        model[0].plan()
        interpreter_launches.clear()
        with count_launches() as n:
            y = model(x)
        expected = reference.double()(x.double())
    assert n.value == launches + split_launches(model) == len(interpreter_launches), str(report)
    assert_close_rel(y, expected, tol, type(block).__name__)
    return report


# Launches = longest branch chain + 1 (the up-projection with the residual add and ReLU).
@pytest.mark.parametrize("block,size,launches", [
    (lambda c: Block35(c, scale=0.17), 7, 3 + 1),
    (lambda c: Block17(c, scale=0.10), 5, 3 + 1),
    (lambda c: Block8(c, scale=0.20), 3, 3 + 1),
    (lambda c: Block8(c, scale=1.0, no_relu=True), 3, 3 + 1),
], ids=["Block35", "Block17", "Block8", "Block8-no_relu"])
def test_residual_blocks(block, size, launches, device, interpreter_launches):
    c = channels(8)
    b = block(c)
    cin = b.conv2d.out_channels
    fused_matches(b, torch.randn(2, cin, size, size), launches, device, interpreter_launches)


class UserResidual(nn.Module):
    """A user's Inception-ResNet block: scale as a buffer, `x + scale * up`, F.relu on a Sequential."""

    def __init__(self, cin=12):
        super().__init__()
        self.b0 = BasicConv2d(cin, 5, 1)
        self.b1 = nn.Sequential(BasicConv2d(cin, 4, 1), BasicConv2d(4, 6, 3, padding=1))
        self.up = nn.Conv2d(11, cin, 1)
        self.register_buffer("scale", torch.tensor(0.3))

    def forward(self, x):
        return torch.relu(x + self.scale * self.up(torch.cat([self.b0(x), self.b1(x)], 1)))


def test_user_residual_with_buffer_scale(device, interpreter_launches):
    block = UserResidual()
    fused_matches(block, torch.randn(2, 12, 6, 5), 3, device, interpreter_launches)
    # The buffer is state: changing it is seen (through the plan's version tracking).
    model, _ = fuse(nn.Sequential(randomize_(UserResidual(), 1).eval()))
    x = torch.randn(1, 12, 4, 4)
    with torch.no_grad():
        model(x)
        model[0].scale.fill_(-2.0)
        assert_close_rel(model(x), model[0].eager_forward(x), TOL[torch.float32])


# Inception-v4 blocks written as timm writes them (conv -> BN(eps=1e-3) -> ReLU units), at 1/8 width.
def unit(cin, cout, k, s=1, p=0):
    return BasicConv2d(cin, cout, k, s, p)


class Mixed3a(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.maxpool = nn.MaxPool2d(3, stride=2)
        self.conv = unit(c(64), c(96), 3, 2)

    def forward(self, x):
        return torch.cat((self.maxpool(x), self.conv(x)), 1)


class Mixed4a(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.branch0 = nn.Sequential(unit(c(160), c(64), 1), unit(c(64), c(96), 3))
        self.branch1 = nn.Sequential(unit(c(160), c(64), 1), unit(c(64), c(64), (1, 7), 1, (0, 3)),
                                     unit(c(64), c(64), (7, 1), 1, (3, 0)), unit(c(64), c(96), 3))

    def forward(self, x):
        return torch.cat((self.branch0(x), self.branch1(x)), 1)


class Mixed5a(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.conv = unit(c(192), c(192), 3, 2)
        self.maxpool = nn.MaxPool2d(3, stride=2)

    def forward(self, x):
        return torch.cat((self.conv(x), self.maxpool(x)), 1)


class InceptionA4(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.branch0 = unit(c(384), c(96), 1)
        self.branch1 = nn.Sequential(unit(c(384), c(64), 1), unit(c(64), c(96), 3, 1, 1))
        self.branch2 = nn.Sequential(unit(c(384), c(64), 1), unit(c(64), c(96), 3, 1, 1), unit(c(96), c(96), 3, 1, 1))
        self.branch3 = nn.Sequential(nn.AvgPool2d(3, stride=1, padding=1, count_include_pad=False),
                                     unit(c(384), c(96), 1))

    def forward(self, x):
        return torch.cat((self.branch0(x), self.branch1(x), self.branch2(x), self.branch3(x)), 1)


class ReductionA(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.branch0 = unit(c(384), c(384), 3, 2)
        self.branch1 = nn.Sequential(unit(c(384), c(192), 1), unit(c(192), c(224), 3, 1, 1), unit(c(224), c(256), 3, 2))
        self.branch2 = nn.MaxPool2d(3, stride=2)

    def forward(self, x):
        return torch.cat((self.branch0(x), self.branch1(x), self.branch2(x)), 1)


class InceptionB4(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.branch0 = unit(c(1024), c(384), 1)
        self.branch1 = nn.Sequential(unit(c(1024), c(192), 1), unit(c(192), c(224), (1, 7), 1, (0, 3)),
                                     unit(c(224), c(256), (7, 1), 1, (3, 0)))
        self.branch2 = nn.Sequential(unit(c(1024), c(192), 1), unit(c(192), c(192), (7, 1), 1, (3, 0)),
                                     unit(c(192), c(224), (1, 7), 1, (0, 3)), unit(c(224), c(224), (7, 1), 1, (3, 0)),
                                     unit(c(224), c(256), (1, 7), 1, (0, 3)))
        self.branch3 = nn.Sequential(nn.AvgPool2d(3, stride=1, padding=1, count_include_pad=False),
                                     unit(c(1024), c(128), 1))

    def forward(self, x):
        return torch.cat((self.branch0(x), self.branch1(x), self.branch2(x), self.branch3(x)), 1)


class ReductionB(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.branch0 = nn.Sequential(unit(c(1024), c(192), 1), unit(c(192), c(192), 3, 2))
        self.branch1 = nn.Sequential(unit(c(1024), c(256), 1), unit(c(256), c(256), (1, 7), 1, (0, 3)),
                                     unit(c(256), c(320), (7, 1), 1, (3, 0)), unit(c(320), c(320), 3, 2))
        self.branch2 = nn.MaxPool2d(3, stride=2)

    def forward(self, x):
        return torch.cat((self.branch0(x), self.branch1(x), self.branch2(x)), 1)


class InceptionC4(nn.Module):
    """v4-C: split 1x3/3x1 branches, like Inception v3's E."""

    def __init__(self, c):
        super().__init__()
        self.branch0 = unit(c(1536), c(256), 1)
        self.branch1_0 = unit(c(1536), c(384), 1)
        self.branch1_1a = unit(c(384), c(256), (1, 3), 1, (0, 1))
        self.branch1_1b = unit(c(384), c(256), (3, 1), 1, (1, 0))
        self.branch2_0 = unit(c(1536), c(384), 1)
        self.branch2_1 = unit(c(384), c(448), (3, 1), 1, (1, 0))
        self.branch2_2 = unit(c(448), c(512), (1, 3), 1, (0, 1))
        self.branch2_3a = unit(c(512), c(256), (1, 3), 1, (0, 1))
        self.branch2_3b = unit(c(512), c(256), (3, 1), 1, (1, 0))
        self.branch3 = nn.Sequential(nn.AvgPool2d(3, stride=1, padding=1, count_include_pad=False),
                                     unit(c(1536), c(256), 1))

    def forward(self, x):
        x0 = self.branch0(x)
        x1_0 = self.branch1_0(x)
        x1 = torch.cat((self.branch1_1a(x1_0), self.branch1_1b(x1_0)), 1)
        x2_2 = self.branch2_2(self.branch2_1(self.branch2_0(x)))
        x2 = torch.cat((self.branch2_3a(x2_2), self.branch2_3b(x2_2)), 1)
        return torch.cat((x0, x1, x2, self.branch3(x)), 1)


V4_BLOCKS = [(Mixed3a, 64, 9, 1), (Mixed4a, 160, 9, 4), (Mixed5a, 192, 9, 1), (InceptionA4, 384, 7, 3),
             (ReductionA, 384, 9, 3), (InceptionB4, 1024, 5, 5), (ReductionB, 1024, 9, 4), (InceptionC4, 1536, 3, 4)]


@pytest.mark.parametrize("cls,cin,size,launches", V4_BLOCKS, ids=[b[0].__name__ for b in V4_BLOCKS])
def test_inception_v4_blocks(cls, cin, size, launches, device, interpreter_launches):
    c = channels(8)
    fused_matches(cls(c), torch.randn(2, c(cin), size, size), launches, device, interpreter_launches)


def test_inception_resnet_v2_small_width():
    """fuse() on the whole network at 1/8 width: every Mixed and residual block and the stem's conv
    units are swapped and listed with their launches; logits equal the unfused model's."""
    reference = randomize_(InceptionResnetV2(width=8), 0).eval()
    model, report = fuse(copy.deepcopy(reference))
    swapped = {name: (before, after) for name, _, before, after in report.swapped}
    units = {"conv2d_1a", "conv2d_2a", "conv2d_2b", "conv2d_3b", "conv2d_4a", "conv2d_7b"}
    assert report.units == units and all(swapped[name] == (3, 1) for name in units), str(report)
    assert len(swapped) == 1 + 10 + 1 + 20 + 1 + 9 + 1 + 6 and report.left_alone == [], str(report)
    assert swapped["mixed_5b"] == (23, 3) and swapped["mixed_6a"] == (14, 3) and swapped["mixed_7a"] == (23, 3)
    assert swapped["repeat.0"] == (23, 4) and swapped["repeat_1.0"] == (17, 4) and swapped["block8"] == (16, 4)
    assert list(model.state_dict()) == list(reference.state_dict())
    x = torch.randn(1, 3, 75, 75)
    with torch.no_grad():
        build_plans(model, example=x)  # plans (and on a GPU the autotuning) before counting
        with count_launches() as n:
            y = model(x)
        expected = reference.double()(x.double())
    assert n.value == 6 + 3 + 40 * 4 + 3 + 3 + split_launches(model)  # 6 conv units, mixed_5b, 40 residual blocks x 4, mixed_6a, mixed_7a
    assert_close_rel(y, expected, 5 * TOL[torch.float32], "logits")
    assert isinstance(inception_resnet_v2(width=16), InceptionResnetV2)


class InceptionV4Small(nn.Module):
    """timm's Inception-v4 layout (stem, Mixed3a/4a/5a, 4xA, ReductionA, 7xB, ReductionB, 3xC) at 1/8 width."""

    def __init__(self, classes=10):
        super().__init__()
        c = channels(8)
        self.features = nn.Sequential(
            unit(3, c(32), 3, 2), unit(c(32), c(32), 3), unit(c(32), c(64), 3, 1, 1),
            Mixed3a(c), Mixed4a(c), Mixed5a(c), *[InceptionA4(c) for _ in range(4)], ReductionA(c),
            *[InceptionB4(c) for _ in range(7)], ReductionB(c), *[InceptionC4(c) for _ in range(3)])
        self.last_linear = nn.Linear(c(1536), classes)

    def forward(self, x):
        return self.last_linear(torch.flatten(nn.functional.adaptive_avg_pool2d(self.features(x), 1), 1))


def test_inception_v4_whole_network():
    reference = randomize_(InceptionV4Small(), 7).eval()
    model, report = fuse(copy.deepcopy(reference))
    assert report.units == {"features.0", "features.1", "features.2"}, str(report)  # the stem's conv units
    assert len(report.swapped) == 3 + 3 + 4 + 1 + 7 + 1 + 3 and report.left_alone == [], str(report)
    x = torch.randn(1, 3, 75, 75)
    with torch.no_grad():
        with count_launches() as n:
            y = model(x)
        expected = reference.double()(x.double())
    assert n.value == 3 + 1 + 4 + 1 + 4 * 3 + 3 + 7 * 5 + 4 + 3 * 4 + split_launches(model)
    assert_close_rel(y, expected, 5 * TOL[torch.float32], "logits")
