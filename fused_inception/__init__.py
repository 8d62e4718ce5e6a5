"""fused-inception: Triton kernels that run Inception blocks in one launch per stage.

Public API:
    FusedInception, FusedBasicConv2d, BasicConv2d -- drop-in modules (torchvision's arguments and keys)
    models.googlenet -- GoogLeNet built from them
    count_launches -- context manager counting fused kernel launches

Set TRITON_INTERPRET=1 before importing to run the kernels on CPU tensors through Triton's
interpreter (slow; for tests). Without it, CPU tensors take the eager fallback.
"""

from fused_inception import models
from fused_inception.blocks import BasicConv2d, FusedBasicConv2d, FusedBlock, FusedInception, InceptionAux
from fused_inception.launches import LaunchCount, count_launches
from fused_inception.plan import UnsupportedBlock

__all__ = ["BasicConv2d", "FusedBasicConv2d", "FusedBlock", "FusedInception", "InceptionAux", "LaunchCount",
           "UnsupportedBlock", "count_launches", "models"]
__version__ = "0.1.0"
