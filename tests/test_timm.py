"""fuse() on timm's Inception networks (timm 1.0: ConvNormAct units whose norm is BatchNormAct2d).

Whole networks at timm's real widths: what fuse() swaps, launches per block, state_dict keys and
parameter objects kept, a timm checkpoint loaded after fuse(). Numerics per block type on timm's
own block classes at 1/8 width (a conv_block that divides every channel count, as timm's
networks pass theirs): eval outputs and launches, and a train step against the unfused block in
float64. The whole timm/inception_v3 network's logits are checked by the report test
(tests/test_report.py).
"""

import copy
import importlib

import pytest
import torch
from torch import nn
import torchvision

from conftest import TOL, assert_close_rel, randomize_
from fused_inception import FusedGraphBlock, build_plans, count_launches, fuse
from test_training import check_training_parity

timm = pytest.importorskip("timm")
from timm.layers import BatchNormAct2d, ConvNormAct  # noqa: E402
# (timm.models.inception_v3 is the model function: the modules by their full names)
v3, v4, irv2 = (importlib.import_module(f"timm.models.{m}") for m in ("inception_v3", "inception_v4",
                                                                       "inception_resnet_v2"))

WIDTH = 8


def c(n):
    return max(n // WIDTH, 1)


def narrow_conv_block(cin, cout, **kwargs):
    """timm's networks' conv_block (ConvNormAct, padding 0, BN eps 1e-3, in-place ReLU) at 1/8 width."""
    kwargs.setdefault("padding", 0)
    return ConvNormAct(c(cin), c(cout), norm_kwargs=dict(eps=1e-3), act_kwargs=dict(inplace=True), **kwargs)


def residual(cls, cin, cout, **kwargs):
    """A timm Inception-ResNet block at 1/8 width: its up-projection (an nn.Conv2d made directly,
    not by conv_block) replaced by a narrow one."""
    block = cls(conv_block=narrow_conv_block, **kwargs)
    block.conv2d = nn.Conv2d(c(cin), c(cout), 1)
    return block


# (name, builder, input channels, input size (h, w), launches = longest chain (+1 residual head))
BLOCKS = [
    ("v3.InceptionA", lambda: v3.InceptionA(192, 32, conv_block=narrow_conv_block), 192, (5, 4), 3),
    ("v3.InceptionB", lambda: v3.InceptionB(288, conv_block=narrow_conv_block), 288, (7, 8), 3),
    ("v3.InceptionC", lambda: v3.InceptionC(768, 128, conv_block=narrow_conv_block), 768, (4, 5), 5),
    ("v3.InceptionD", lambda: v3.InceptionD(768, conv_block=narrow_conv_block), 768, (7, 7), 4),
    ("v3.InceptionE", lambda: v3.InceptionE(1280, conv_block=narrow_conv_block), 1280, (3, 2), 3),
    ("v4.Mixed3a", lambda: v4.Mixed3a(narrow_conv_block), 64, (7, 8), 1),
    ("v4.Mixed4a", lambda: v4.Mixed4a(narrow_conv_block), 160, (5, 5), 4),
    ("v4.Mixed5a", lambda: v4.Mixed5a(narrow_conv_block), 192, (7, 7), 1),
    ("v4.InceptionA", lambda: v4.InceptionA(narrow_conv_block), 384, (4, 5), 3),
    ("v4.ReductionA", lambda: v4.ReductionA(narrow_conv_block), 384, (7, 7), 3),
    ("v4.InceptionB", lambda: v4.InceptionB(narrow_conv_block), 1024, (4, 3), 5),
    ("v4.ReductionB", lambda: v4.ReductionB(narrow_conv_block), 1024, (7, 7), 4),
    ("v4.InceptionC", lambda: v4.InceptionC(narrow_conv_block), 1536, (2, 3), 4),
    ("irv2.Mixed_5b", lambda: irv2.Mixed_5b(narrow_conv_block), 192, (4, 5), 3),
    ("irv2.Block35", lambda: residual(irv2.Block35, 128, 320, scale=0.17), 320, (5, 4), 3 + 1),
    ("irv2.Mixed_6a", lambda: irv2.Mixed_6a(narrow_conv_block), 320, (7, 7), 3),
    ("irv2.Block17", lambda: residual(irv2.Block17, 384, 1088, scale=0.10), 1088, (3, 4), 3 + 1),
    ("irv2.Mixed_7a", lambda: irv2.Mixed_7a(narrow_conv_block), 1088, (7, 7), 3),
    ("irv2.Block8", lambda: residual(irv2.Block8, 448, 2080, scale=0.20), 2080, (3, 2), 3 + 1),
    ("irv2.Block8-no_relu", lambda: residual(irv2.Block8, 448, 2080, no_relu=True), 2080, (2, 3), 3 + 1),
]


@pytest.mark.parametrize("name,build,cin,hw,launches", BLOCKS, ids=[b[0] for b in BLOCKS])
def test_timm_block_eval(name, build, cin, hw, launches, device, interpreter_launches):
    """Each timm block type is swapped whole (its ConvNormAct/BatchNormAct2d units recognised) and
    runs in as many launches as its longest chain, matching the unfused block in float64."""
    block = randomize_(build(), 3).eval().to(device)
    assert any(isinstance(m, BatchNormAct2d) for m in block.modules())
    reference = copy.deepcopy(block).double()
    model, report = fuse(nn.Sequential(block))
    assert isinstance(model[0], FusedGraphBlock) and report.left_alone == [], str(report)
    assert report.swapped[0][3] == launches and report.units == set()
    x = torch.randn(2, c(cin), *hw, device=device)
    with torch.no_grad():
        model[0].plan()
        interpreter_launches.clear()
        with count_launches() as n:
            y = model(x)
        expected = reference(x.double())
    assert n.value == launches == len(interpreter_launches)
    assert_close_rel(y, expected, TOL[torch.float32], name)
