"""GoogLeNet (Inception v1) built from fused blocks, state_dict-compatible with torchvision's."""

import warnings
from collections import namedtuple

import torch
from torch import nn

from fused_inception.dropins import FusedBasicConv2d, FusedInception, InceptionAux
from fused_inception.models._transform import TransformInput

GoogLeNetOutputs = namedtuple("GoogLeNetOutputs", ["logits", "aux_logits2", "aux_logits1"])


class GoogLeNet(nn.Module):
    """torchvision's GoogLeNet with every conv unit and Inception block fused.

    Same constructor arguments, child names, state_dict keys and outputs as
    `torchvision.models.GoogLeNet` (`GoogLeNetOutputs(logits, aux_logits2, aux_logits1)` in
    training with aux heads, the logits tensor otherwise). In eval the stem convs take one launch
    each and each Inception block two; pooling, the classifier and `transform_input` are torch ops
    (29 launches in all with transform_input, 27 without; torchvision's eager model takes 195).

    Example:
        >>> model = GoogLeNet(aux_logits=False, init_weights=True).eval()
        >>> model.load_state_dict(torchvision_model.state_dict(), strict=False)  # aux keys if absent
        >>> with torch.no_grad():
        ...     logits = model(images)
    """

    def __init__(self, num_classes=1000, aux_logits=True, transform_input=False, init_weights=None, blocks=None,
                 dropout=0.2, dropout_aux=0.7):
        super().__init__()
        if blocks is None:
            blocks = [FusedBasicConv2d, FusedInception, InceptionAux]
        if init_weights is None:
            warnings.warn("init_weights was not given: using torchvision's truncated-normal init "
                          "(pass init_weights=True to silence this)", FutureWarning)
            init_weights = True
        if len(blocks) != 3:
            raise ValueError(f"blocks length should be 3 instead of {len(blocks)}")
        conv_block, inception_block, inception_aux_block = blocks

        self.aux_logits = aux_logits
        self.transform_input = transform_input
        self._transform = TransformInput()  # no state_dict keys

        self.conv1 = conv_block(3, 64, kernel_size=7, stride=2, padding=3)
        self.maxpool1 = nn.MaxPool2d(3, stride=2, ceil_mode=True)
        self.conv2 = conv_block(64, 64, kernel_size=1)
        self.conv3 = conv_block(64, 192, kernel_size=3, padding=1)
        self.maxpool2 = nn.MaxPool2d(3, stride=2, ceil_mode=True)

        self.inception3a = inception_block(192, 64, 96, 128, 16, 32, 32)
        self.inception3b = inception_block(256, 128, 128, 192, 32, 96, 64)
        self.maxpool3 = nn.MaxPool2d(3, stride=2, ceil_mode=True)

        self.inception4a = inception_block(480, 192, 96, 208, 16, 48, 64)
        self.inception4b = inception_block(512, 160, 112, 224, 24, 64, 64)
        self.inception4c = inception_block(512, 128, 128, 256, 24, 64, 64)
        self.inception4d = inception_block(512, 112, 144, 288, 32, 64, 64)
        self.inception4e = inception_block(528, 256, 160, 320, 32, 128, 128)
        self.maxpool4 = nn.MaxPool2d(2, stride=2, ceil_mode=True)

        self.inception5a = inception_block(832, 256, 160, 320, 32, 128, 128)
        self.inception5b = inception_block(832, 384, 192, 384, 48, 128, 128)

        if aux_logits:
            self.aux1 = inception_aux_block(512, num_classes, dropout=dropout_aux)
            self.aux2 = inception_aux_block(528, num_classes, dropout=dropout_aux)
        else:
            self.aux1 = None
            self.aux2 = None

        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.dropout = nn.Dropout(p=dropout)
        self.fc = nn.Linear(1024, num_classes)

        if init_weights:
            for m in self.modules():
                if isinstance(m, (nn.Conv2d, nn.Linear)):
                    torch.nn.init.trunc_normal_(m.weight, mean=0.0, std=0.01, a=-2, b=2)
                elif isinstance(m, nn.BatchNorm2d):
                    nn.init.constant_(m.weight, 1)
                    nn.init.constant_(m.bias, 0)

    def forward(self, x):
        if self.transform_input:
            x = self._transform(x)
        x = self.conv1(x)
        x = self.maxpool1(x)
        x = self.conv2(x)
        x = self.conv3(x)
        x = self.maxpool2(x)

        x = self.inception3a(x)
        x = self.inception3b(x)
        x = self.maxpool3(x)
        x = self.inception4a(x)
        aux1 = self.aux1(x) if self.aux1 is not None and self.training else None

        x = self.inception4b(x)
        x = self.inception4c(x)
        x = self.inception4d(x)
        aux2 = self.aux2(x) if self.aux2 is not None and self.training else None

        x = self.inception4e(x)
        x = self.maxpool4(x)
        x = self.inception5a(x)
        x = self.inception5b(x)

        x = self.avgpool(x)
        x = torch.flatten(x, 1)
        x = self.dropout(x)
        x = self.fc(x)
        if self.training and self.aux_logits:
            return GoogLeNetOutputs(x, aux2, aux1)
        return x


def googlenet(*, weights=None, progress=True, **kwargs):
    """Build a fused GoogLeNet; arguments as `torchvision.models.googlenet`.

    Pretrained weights are not downloaded here: pass `weights=None` and load a torchvision
    state_dict (`model.load_state_dict(tv_model.state_dict())`), which has the same keys.
    """
    if weights is not None:
        raise ValueError("fused_inception does not download weights: build with weights=None and "
                         "load_state_dict() from a torchvision model or a checkpoint (same keys)")
    kwargs.setdefault("init_weights", True)
    return GoogLeNet(**kwargs)
