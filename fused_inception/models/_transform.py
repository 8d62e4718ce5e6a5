"""`transform_input` of torchvision's GoogLeNet and Inception v3, with torchvision's rounding."""

import torch
from torch import nn

# Maps ImageNet-normalised input to the (x - 0.5) / 0.5 scaling the original weights were trained
# on, per channel: x * std / 0.5 + (mean - 0.5) / 0.5.
_MEAN = (0.485, 0.456, 0.406)
_STD = (0.229, 0.224, 0.225)


class TransformInput(nn.Module):
    """Two launches (mul, add) instead of torchvision's seven; bit-identical to torchvision.

    The constants are computed in double and rounded once, as torchvision's Python-float scalars
    are, and applied as a multiply then an add (an addcmul rounds differently, which train-mode
    BN on small maps amplifies). Buffers are not persistent: no state_dict keys.
    """

    def __init__(self):
        super().__init__()
        self.register_buffer("scale", torch.tensor([s / 0.5 for s in _STD]).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("shift", torch.tensor([(m - 0.5) / 0.5 for m in _MEAN]).view(1, 3, 1, 1),
                             persistent=False)

    def forward(self, x):
        return x * self.scale.to(x.dtype) + self.shift.to(x.dtype)
