"""Per block: every GoogLeNet Inception block and each Inception v3 block type, inference."""

import pytest
import torch
from torchvision.models.googlenet import Inception
from torchvision.models.inception import InceptionA, InceptionB, InceptionC, InceptionD, InceptionE

from cases import BATCHES, DEVICE, DTYPES, IMPLS, check_and_measure, prepare, skip_reason
from fused_inception import (FusedInception, FusedInceptionA, FusedInceptionB, FusedInceptionC, FusedInceptionD,
                             FusedInceptionE)
from fused_inception.report import informative_init_

# (name, torchvision block, fused block, args, input H=W at 224/299 input; CPU uses 7)
BLOCKS = [
    ("googlenet-3a", Inception, FusedInception, (192, 64, 96, 128, 16, 32, 32), 28),
    ("googlenet-3b", Inception, FusedInception, (256, 128, 128, 192, 32, 96, 64), 28),
    ("googlenet-4a", Inception, FusedInception, (480, 192, 96, 208, 16, 48, 64), 14),
    ("googlenet-4b", Inception, FusedInception, (512, 160, 112, 224, 24, 64, 64), 14),
    ("googlenet-4c", Inception, FusedInception, (512, 128, 128, 256, 24, 64, 64), 14),
    ("googlenet-4d", Inception, FusedInception, (512, 112, 144, 288, 32, 64, 64), 14),
    ("googlenet-4e", Inception, FusedInception, (528, 256, 160, 320, 32, 128, 128), 14),
    ("googlenet-5a", Inception, FusedInception, (832, 256, 160, 320, 32, 128, 128), 7),
    ("googlenet-5b", Inception, FusedInception, (832, 384, 192, 384, 48, 128, 128), 7),
    ("v3-A", InceptionA, FusedInceptionA, (288, 64), 35),
    ("v3-B", InceptionB, FusedInceptionB, (288,), 35),
    ("v3-C", InceptionC, FusedInceptionC, (768, 160), 17),
    ("v3-D", InceptionD, FusedInceptionD, (768,), 17),
    ("v3-E", InceptionE, FusedInceptionE, (1280,), 8),
]
if DEVICE == "cpu":  # the interpreter: one block of each kind
    BLOCKS = [b for b in BLOCKS if b[0] in ("googlenet-3a", "v3-A", "v3-B", "v3-C", "v3-D", "v3-E")]


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("dtype", list(DTYPES))
@pytest.mark.parametrize("batch", BATCHES)
@pytest.mark.parametrize("name,tv_cls,fused_cls,args,size", BLOCKS, ids=[b[0] for b in BLOCKS])
def test_block(benchmark, name, tv_cls, fused_cls, args, size, batch, dtype, impl):
    reason = skip_reason(impl, batch)
    if reason:
        pytest.skip(reason)
    size = size if DEVICE == "cuda" else 7
    torch.manual_seed(0)
    reference = informative_init_(tv_cls(*args), 0).eval()
    fused = fused_cls(*args).eval()
    fused.load_state_dict(reference.state_dict())
    convert = dict(device=DEVICE, dtype=DTYPES[dtype], memory_format=torch.channels_last)
    reference, fused = reference.to(**convert), fused.to(**convert)
    x = torch.randn(batch, args[0], size, size).to(**convert)
    run = prepare(reference, fused, impl, x)
    with torch.no_grad():
        expected = reference(x)
    tolerance = {"fp32": 1e-2, "bf16": 5e-2, "fp16": 2e-2}[dtype]  # TF32 allowed for fp32
    check_and_measure(benchmark, run, impl, expected, tolerance,
                      dict(block=name, batch=batch, dtype=dtype, layout="channels_last", input=list(x.shape)))
