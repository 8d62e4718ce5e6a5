"""Inception-ResNet-v2 as plain PyTorch modules (the unfused reference), with timm's state_dict keys.

`inception_resnet_v2(fused=True)` returns it with `fuse()` applied: every Mixed block, every
residual block (Block35/17/8: branches -> cat -> 1x1 up-projection -> x + scale * up -> ReLU?)
and the stem's conv units run through the stage kernel. (timm's own `inception_resnet_v2`, built
from ConvNormAct, is fused by `fuse()` the same way.) `width` divides every channel count (1: timm's network and keys'
shapes; larger: a small network with the same structure, for tests and CPU reports).
"""

import torch
from torch import nn

from fused_inception.fuse import fuse


class BasicConv2d(nn.Module):
    """conv (no bias) -> BatchNorm2d(eps=0.001) -> ReLU, with child names conv, bn, relu."""

    def __init__(self, cin, cout, kernel_size, stride=1, padding=0):
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, kernel_size, stride=stride, padding=padding, bias=False)
        self.bn = nn.BatchNorm2d(cout, eps=0.001)
        self.relu = nn.ReLU(inplace=False)

    def forward(self, x):
        return self.relu(self.bn(self.conv(x)))


def _chain(*specs):
    """nn.Sequential of BasicConv2d from (cin, cout, kernel, stride, padding) tuples."""
    return nn.Sequential(*[BasicConv2d(*spec) for spec in specs])


class Mixed5b(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.branch0 = BasicConv2d(c(192), c(96), 1)
        self.branch1 = _chain((c(192), c(48), 1), (c(48), c(64), 5, 1, 2))
        self.branch2 = _chain((c(192), c(64), 1), (c(64), c(96), 3, 1, 1), (c(96), c(96), 3, 1, 1))
        self.branch3 = nn.Sequential(nn.AvgPool2d(3, stride=1, padding=1, count_include_pad=False),
                                     BasicConv2d(c(192), c(64), 1))

    def forward(self, x):
        return torch.cat((self.branch0(x), self.branch1(x), self.branch2(x), self.branch3(x)), 1)


class Block35(nn.Module):
    def __init__(self, c, scale=1.0):
        super().__init__()
        self.scale = scale
        self.branch0 = BasicConv2d(c(320), c(32), 1)
        self.branch1 = _chain((c(320), c(32), 1), (c(32), c(32), 3, 1, 1))
        self.branch2 = _chain((c(320), c(32), 1), (c(32), c(48), 3, 1, 1), (c(48), c(64), 3, 1, 1))
        self.conv2d = nn.Conv2d(c(32) * 2 + c(64), c(320), 1)
        self.relu = nn.ReLU(inplace=False)

    def forward(self, x):
        out = torch.cat((self.branch0(x), self.branch1(x), self.branch2(x)), 1)
        out = self.conv2d(out)
        return self.relu(out * self.scale + x)


class Mixed6a(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.branch0 = BasicConv2d(c(320), c(384), 3, stride=2)
        self.branch1 = _chain((c(320), c(256), 1), (c(256), c(256), 3, 1, 1), (c(256), c(384), 3, 2))
        self.branch2 = nn.MaxPool2d(3, stride=2)

    def forward(self, x):
        return torch.cat((self.branch0(x), self.branch1(x), self.branch2(x)), 1)


class Block17(nn.Module):
    def __init__(self, c, scale=1.0):
        super().__init__()
        self.scale = scale
        self.branch0 = BasicConv2d(c(1088), c(192), 1)
        self.branch1 = _chain((c(1088), c(128), 1), (c(128), c(160), (1, 7), 1, (0, 3)),
                              (c(160), c(192), (7, 1), 1, (3, 0)))
        self.conv2d = nn.Conv2d(c(192) * 2, c(1088), 1)
        self.relu = nn.ReLU(inplace=False)

    def forward(self, x):
        out = self.conv2d(torch.cat((self.branch0(x), self.branch1(x)), 1))
        return self.relu(out * self.scale + x)


class Mixed7a(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.branch0 = _chain((c(1088), c(256), 1), (c(256), c(384), 3, 2))
        self.branch1 = _chain((c(1088), c(256), 1), (c(256), c(288), 3, 2))
        self.branch2 = _chain((c(1088), c(256), 1), (c(256), c(288), 3, 1, 1), (c(288), c(320), 3, 2))
        self.branch3 = nn.MaxPool2d(3, stride=2)

    def forward(self, x):
        return torch.cat((self.branch0(x), self.branch1(x), self.branch2(x), self.branch3(x)), 1)


class Block8(nn.Module):
    def __init__(self, c, scale=1.0, no_relu=False):
        super().__init__()
        self.scale = scale
        self.branch0 = BasicConv2d(c(2080), c(192), 1)
        self.branch1 = _chain((c(2080), c(192), 1), (c(192), c(224), (1, 3), 1, (0, 1)),
                              (c(224), c(256), (3, 1), 1, (1, 0)))
        self.conv2d = nn.Conv2d(c(192) + c(256), c(2080), 1)
        self.relu = None if no_relu else nn.ReLU(inplace=False)

    def forward(self, x):
        out = self.conv2d(torch.cat((self.branch0(x), self.branch1(x)), 1))
        out = out * self.scale + x
        if self.relu is not None:
            out = self.relu(out)
        return out


class InceptionResnetV2(nn.Module):
    """Inception-ResNet-v2 (Szegedy et al. 2016) with timm's module names; `width` divides channels."""

    def __init__(self, num_classes=1000, in_chans=3, width=1):
        super().__init__()

        def c(n):
            return max(n // width, 1)

        # Mixed5b's output and Mixed6a's/Mixed7a's concatenations must match the residual widths.
        assert c(96) + c(64) + c(96) + c(64) == c(320) and c(384) * 2 + c(320) == c(1088) \
            and c(384) + c(288) + c(320) + c(1088) == c(2080), f"width {width} breaks the channel arithmetic"
        self.conv2d_1a = BasicConv2d(in_chans, c(32), 3, stride=2)
        self.conv2d_2a = BasicConv2d(c(32), c(32), 3)
        self.conv2d_2b = BasicConv2d(c(32), c(64), 3, padding=1)
        self.maxpool_3a = nn.MaxPool2d(3, stride=2)
        self.conv2d_3b = BasicConv2d(c(64), c(80), 1)
        self.conv2d_4a = BasicConv2d(c(80), c(192), 3)
        self.maxpool_5a = nn.MaxPool2d(3, stride=2)
        self.mixed_5b = Mixed5b(c)
        self.repeat = nn.Sequential(*[Block35(c, scale=0.17) for _ in range(10)])
        self.mixed_6a = Mixed6a(c)
        self.repeat_1 = nn.Sequential(*[Block17(c, scale=0.10) for _ in range(20)])
        self.mixed_7a = Mixed7a(c)
        self.repeat_2 = nn.Sequential(*[Block8(c, scale=0.20) for _ in range(9)])
        self.block8 = Block8(c, no_relu=True)
        self.conv2d_7b = BasicConv2d(c(2080), c(1536), 1)
        self.global_pool = nn.AdaptiveAvgPool2d(1)
        self.classif = nn.Linear(c(1536), num_classes)

    def forward(self, x):
        for name in ("conv2d_1a", "conv2d_2a", "conv2d_2b", "maxpool_3a", "conv2d_3b", "conv2d_4a", "maxpool_5a",
                     "mixed_5b", "repeat", "mixed_6a", "repeat_1", "mixed_7a", "repeat_2", "block8", "conv2d_7b"):
            x = getattr(self, name)(x)
        return self.classif(torch.flatten(self.global_pool(x), 1))


def inception_resnet_v2(num_classes=1000, width=1, fused=True):
    """Build Inception-ResNet-v2 (timm's keys at width=1), with fuse() applied when `fused`.

    Example:
        >>> model = inception_resnet_v2(width=8).eval()   # 43 fused blocks and 6 fused stem conv units
    """
    model = InceptionResnetV2(num_classes=num_classes, width=width)
    if fused:
        model, _ = fuse(model)
    return model
