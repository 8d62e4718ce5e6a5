"""fused-inception: Triton kernels that run Inception blocks in one launch per stage.

Public API:
    FusedInception, FusedInceptionA..E, FusedBasicConv2d -- drop-in modules (torchvision's arguments and keys)
    fuse(model) -- find Inception-style blocks in any model by their dataflow and swap fused ones in
    models.googlenet, models.inception_v3 -- whole networks built from them
    count_launches -- context manager counting fused kernel launches
    Route -- what FusedBlock.route(x) returns: how a forward computes (EAGER, EVAL, EVAL_GRAD, TRAIN)

Set TRITON_INTERPRET=1 before importing to run the kernels on CPU tensors through Triton's
interpreter (slow; for tests). Without it, CPU tensors take the eager fallback.
"""

from fused_inception import models
from fused_inception.blocks import FusedBlock, FusedGraphBlock, build_plans
from fused_inception.dropins import (BasicConv2d, FusedBasicConv2d, FusedInception, FusedInceptionA, FusedInceptionAux,
                                     FusedInceptionB, FusedInceptionC, FusedInceptionD, FusedInceptionE, InceptionAux)
from fused_inception.fuse import FuseReport, fuse
from fused_inception.launches import LaunchCount, count_launches
from fused_inception.graph import UnsupportedBlock
from fused_inception.program import Route

__all__ = ["BasicConv2d", "FuseReport", "FusedBasicConv2d", "FusedBlock", "FusedGraphBlock", "FusedInception",
           "FusedInceptionA", "FusedInceptionAux", "FusedInceptionB", "FusedInceptionC", "FusedInceptionD",
           "FusedInceptionE", "InceptionAux", "LaunchCount", "Route", "UnsupportedBlock", "build_plans",
           "count_launches", "fuse", "models", "warmup"]
__version__ = "0.1.0"


def warmup(model, example_input, workers=None, target=None):
    """Compile every kernel variant `model`'s first forward on inputs like `example_input` (in
    train(): its first training step) will launch, in `workers` processes (default: the CPU
    count), then autotune (the picks kept on disk for the next process) and build the plans:
    the first real call then compiles and benchmarks nothing. Returns a
    fused_inception.precompile.WarmupReport. `target=(90, 32)` compiles for sm_90 without a GPU.
    Under the interpreter it only builds the plans. (Imported on first use: the compiler
    machinery stays out of `import fused_inception`.)

    Example:
        >>> fused_inception.warmup(model, torch.randn(32, 3, 299, 299, device="cuda"))
    """
    from fused_inception import precompile

    return precompile.warmup(model, example_input, workers, target)
