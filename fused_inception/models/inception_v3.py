"""Inception v3 built from fused blocks, state_dict-compatible with torchvision's."""

import warnings
from collections import namedtuple

import torch
from torch import nn

from fused_inception.dropins import (FusedBasicConv2d, FusedInceptionA, FusedInceptionAux, FusedInceptionB,
                                    FusedInceptionC, FusedInceptionD, FusedInceptionE)
from fused_inception.models._transform import TransformInput

InceptionOutputs = namedtuple("InceptionOutputs", ["logits", "aux_logits"])


class Inception3(nn.Module):
    """torchvision's Inception3 with every conv unit and Inception block fused.

    Same constructor arguments, child names, state_dict keys and outputs as
    `torchvision.models.Inception3` (`InceptionOutputs(logits, aux_logits)` in training with the
    aux head, the logits tensor otherwise). In eval: the five stem convs take one launch each,
    blocks A/B/C/D/E take 3/3/5/4/3; the stem's max pools, the global pool and the classifier are
    torch ops: 51 launches in all at 299x299 (torchvision's eager model: 312).

    Example:
        >>> model = Inception3(aux_logits=False, init_weights=True).eval()
        >>> model.load_state_dict(torchvision_model.state_dict())
    """

    def __init__(self, num_classes=1000, aux_logits=True, transform_input=False, inception_blocks=None,
                 init_weights=None, dropout=0.5):
        super().__init__()
        if inception_blocks is None:
            inception_blocks = [FusedBasicConv2d, FusedInceptionA, FusedInceptionB, FusedInceptionC,
                                FusedInceptionD, FusedInceptionE, FusedInceptionAux]
        if init_weights is None:
            warnings.warn("init_weights was not given: using torchvision's truncated-normal init "
                          "(pass init_weights=True to silence this)", FutureWarning)
            init_weights = True
        if len(inception_blocks) != 7:
            raise ValueError(f"length of inception_blocks should be 7 instead of {len(inception_blocks)}")
        conv_block, inception_a, inception_b, inception_c, inception_d, inception_e, inception_aux = inception_blocks
        self.aux_logits = aux_logits
        self.transform_input = transform_input
        self._transform = TransformInput()  # no state_dict keys
        self.Conv2d_1a_3x3 = conv_block(3, 32, kernel_size=3, stride=2)
        self.Conv2d_2a_3x3 = conv_block(32, 32, kernel_size=3)
        self.Conv2d_2b_3x3 = conv_block(32, 64, kernel_size=3, padding=1)
        self.maxpool1 = nn.MaxPool2d(kernel_size=3, stride=2)
        self.Conv2d_3b_1x1 = conv_block(64, 80, kernel_size=1)
        self.Conv2d_4a_3x3 = conv_block(80, 192, kernel_size=3)
        self.maxpool2 = nn.MaxPool2d(kernel_size=3, stride=2)
        self.Mixed_5b = inception_a(192, pool_features=32)
        self.Mixed_5c = inception_a(256, pool_features=64)
        self.Mixed_5d = inception_a(288, pool_features=64)
        self.Mixed_6a = inception_b(288)
        self.Mixed_6b = inception_c(768, channels_7x7=128)
        self.Mixed_6c = inception_c(768, channels_7x7=160)
        self.Mixed_6d = inception_c(768, channels_7x7=160)
        self.Mixed_6e = inception_c(768, channels_7x7=192)
        self.AuxLogits = inception_aux(768, num_classes) if aux_logits else None
        self.Mixed_7a = inception_d(768)
        self.Mixed_7b = inception_e(1280)
        self.Mixed_7c = inception_e(2048)
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.dropout = nn.Dropout(p=dropout)
        self.fc = nn.Linear(2048, num_classes)
        if init_weights:
            for m in self.modules():
                if isinstance(m, (nn.Conv2d, nn.Linear)):
                    stddev = float(m.stddev) if hasattr(m, "stddev") else 0.1
                    torch.nn.init.trunc_normal_(m.weight, mean=0.0, std=stddev, a=-2, b=2)
                elif isinstance(m, nn.BatchNorm2d):
                    nn.init.constant_(m.weight, 1)
                    nn.init.constant_(m.bias, 0)

    def forward(self, x):
        if self.transform_input:
            x = self._transform(x)
        x = self.Conv2d_1a_3x3(x)
        x = self.Conv2d_2a_3x3(x)
        x = self.Conv2d_2b_3x3(x)
        x = self.maxpool1(x)
        x = self.Conv2d_3b_1x1(x)
        x = self.Conv2d_4a_3x3(x)
        x = self.maxpool2(x)
        x = self.Mixed_5b(x)
        x = self.Mixed_5c(x)
        x = self.Mixed_5d(x)
        x = self.Mixed_6a(x)
        x = self.Mixed_6b(x)
        x = self.Mixed_6c(x)
        x = self.Mixed_6d(x)
        x = self.Mixed_6e(x)
        aux = self.AuxLogits(x) if self.AuxLogits is not None and self.training else None
        x = self.Mixed_7a(x)
        x = self.Mixed_7b(x)
        x = self.Mixed_7c(x)
        x = self.avgpool(x)
        x = self.dropout(x)
        x = torch.flatten(x, 1)
        x = self.fc(x)
        if self.training and self.aux_logits:
            return InceptionOutputs(x, aux)
        return x


def inception_v3(*, weights=None, progress=True, **kwargs):
    """Build a fused Inception v3; arguments as `torchvision.models.inception_v3`.

    Weights are not downloaded: build with weights=None and load a torchvision state_dict.
    The smallest legal input is 75x75.
    """
    if weights is not None:
        raise ValueError("fused_inception does not download weights: build with weights=None and "
                         "load_state_dict() from a torchvision model or a checkpoint (same keys)")
    kwargs.setdefault("init_weights", True)
    return Inception3(**kwargs)
