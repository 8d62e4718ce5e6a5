"""Hardening: int64 offsets, determinism, NaN/Inf, too-small inputs, and random block configurations."""

import random

import pytest
import torch
from torch import nn
import triton
import triton.language as tl

from conftest import TOL, assert_close_rel, randomize_
from fused_inception import FusedInception, FusedInceptionB
from fused_inception.kernels import conv as kconv
from fused_inception.activations import RELU
from fused_inception.graph import BlockGraph, ConvNode, PoolSpec
from fused_inception.plan import build_plan


@triton.jit
def _offsets_kernel(out_ptr, img_ptr, s_n, s_h, s_w, INT64: tl.constexpr, BLOCK: tl.constexpr):
    """Pixel offsets as the stage kernel computes them: strides from kconv._view (x's, NCHW-style
    strides so that no channels_last scaling applies), then img * s_n + y * s_h + x * s_w."""
    i = tl.arange(0, BLOCK)
    img = tl.load(img_ptr + i)
    one = s_w // s_w  # (a runtime 1: _view casts its strides)
    buf = (out_ptr, one, one, s_n, s_h, s_w, one)
    _p, _h, _w, sn, sh, sw, _c = kconv._view(0, (buf, buf, buf), tl.constexpr((False, False, False, INT64)))
    tl.store(out_ptr + i, img * sn + (img + 1) * sh + (img + 2) * sw)


def test_pixel_offsets_are_int64_when_asked():
    """With INT64 the offsets of a batch of large maps pass 2**31 without wrapping (the launcher
    asks for INT64 when a buffer is that large: next test)."""
    img = torch.arange(8, dtype=torch.int32)
    out = torch.zeros(8, dtype=torch.int64)
    s_n, s_h, s_w = 2**30 + 7, 2**20 + 3, 2**10 + 1
    _offsets_kernel[(1,)](out, img, s_n, s_h, s_w, INT64=True, BLOCK=8)
    expected = [i * s_n + (i + 1) * s_h + (i + 2) * s_w for i in range(8)]
    assert out.tolist() == expected
    assert max(expected) > 2**31


@pytest.mark.parametrize("big", ["x", "out", "none"])
def test_launcher_asks_for_int64_past_2_31_elements(big):
    """conv_stage compiles the int64 variant exactly when some buffer has 2**31 elements or more
    (recorded on meta tensors: nothing is allocated)."""
    small, large = (2, 16, 8, 8), (2, 16, 2**14, 2**13)  # 2**32 elements
    x = torch.empty(large if big == "x" else small, device="meta")
    out = torch.empty(large if big == "out" else small, device="meta")
    spec = (kconv.problem_spec(),)
    table = torch.zeros(1, len(kconv.TABLE_FIELDS), dtype=torch.int32, device="meta")
    with kconv.recording() as launches:
        kconv.conv_stage(spec, table, (16,), (16,), torch.empty(256, device="meta"), None,
                         torch.empty(16, device="meta"), x, out, out)
    (_, _, consts, _), = launches
    assert consts["LAYOUT"][3] == (big != "none")  # (X_CL, OUT_CL, MID_CL, INT64)


ARGS = (24, 8, 8, 16, 4, 8, 8)


def test_deterministic_bitwise():
    """No atomics in the inference path: the same input gives bit-identical output."""
    block = randomize_(FusedInception(*ARGS), 0).eval()
    x = torch.randn(2, 24, 7, 7)
    with torch.no_grad():
        assert torch.equal(block(x), block(x))


@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")  # NaN in the interpreter's matmul
def test_nan_and_inf_propagate_as_eager():
    block = randomize_(FusedInception(*ARGS), 1).eval()
    x = torch.randn(2, 24, 7, 7)
    x[0, 3, 2, 2] = float("nan")
    x[1, 5, 4, 1] = float("inf")
    x[1, 7, 0, 6] = float("-inf")
    with torch.no_grad():
        y = block(x)
        expected = block.eager_forward(x)
    assert y.isnan().any() and y.isinf().any() == expected.isinf().any()
    assert torch.equal(y.isinf(), expected.isinf())
    assert_close_rel(y, expected, TOL[torch.float32])  # same NaN positions, same values elsewhere


def test_folded_weights_that_overflow_float16_say_so():
    """Inference folds BatchNorm's scale into the weights (plan.build_plan): a scale that takes a
    folded float16 weight past 65504 is an error that says so, not infinities in the output. bf16
    has fp32's range."""
    block = randomize_(FusedInception(*ARGS), 3).eval()
    block.branch1.bn.weight.data.fill_(6e4)  # (representable in float16; the scale, 6e4 / sqrt(2e-3), is not)
    block.branch1.bn.running_var.data.fill_(1e-3)
    x = torch.randn(1, 24, 5, 5)
    with torch.no_grad():
        assert block.bfloat16()(x.bfloat16()).isfinite().all()
        with pytest.raises(OverflowError, match="overflows torch.float16"):
            block.half()(x.half())


def test_input_smaller_than_a_kernel():
    """InceptionB's unpadded 3x3/s2 convs have no output on a 2x2 map: an error, as in eager."""
    block = FusedInceptionB(16).eval()
    with pytest.raises(RuntimeError):
        block.eager_forward(torch.randn(1, 16, 2, 2))
    with pytest.raises(ValueError, match="too small"), torch.no_grad():
        block(torch.randn(1, 16, 2, 2))


def test_requires_grad_input_in_eval_has_gradients():
    block = randomize_(FusedInception(*ARGS), 2).eval()
    x = torch.randn(1, 24, 5, 5, requires_grad=True)
    block(x).sum().backward()
    x2 = x.detach().clone().requires_grad_()
    block.eager_forward(x2).sum().backward()
    assert_close_rel(x.grad, x2.grad, TOL[torch.float32])


# Random block configurations: branch count 1-4, kernel sizes from {1,3,5,1x7,7x1,1x3,3x1},
# stride 1/2, channels 1-70, spatial 1-17, batch 1-3, BN and bias on/off, pools, split branches.
KERNELS = [(1, 1), (3, 3), (5, 5), (1, 7), (7, 1), (1, 3), (3, 1)]


def random_block(rng):
    cin = rng.randint(1, 70)
    stride = rng.choice([1, 2])
    nodes, outputs = [], []

    def conv(src_channels, src, s, kernel=None, pool=None):
        kh, kw = kernel or rng.choice(KERNELS)
        cout = rng.randint(1, 70)
        c = nn.Conv2d(src_channels, cout, (kh, kw), stride=s, padding=(kh // 2, kw // 2), bias=rng.random() < 0.5)
        bn = nn.BatchNorm2d(cout, eps=rng.choice([1e-5, 1e-3])) if rng.random() < 0.7 else None
        nodes.append(ConvNode(c, bn, act=RELU if rng.random() < 0.8 else None, src=src, pool=pool))
        return len(nodes) - 1, cout

    for _ in range(rng.randint(1, 4)):
        kind = rng.choice(["chain", "chain", "split", "pool_conv", "pool"])
        if kind in ("pool_conv", "pool"):
            p = rng.choice(["max", "avg", "avg_excl"])
            pool = PoolSpec.make("max" if p == "max" else "avg", 3, stride, 1, count_include_pad=(p == "avg"))
            if kind == "pool":
                nodes.append(ConvNode(None, None, act=None, src=None, pool=pool))
                outputs.append(len(nodes) - 1)
            else:
                outputs.append(conv(cin, None, 1, (1, 1), pool)[0])
            continue
        src, channels = None, cin
        for _ in range(rng.randint(0, 2)):  # intermediate convs at stride 1
            src, channels = conv(channels, src, 1)
        if kind == "split":  # two convs read one intermediate, as Inception v3 E
            outputs.append(conv(channels, src, stride)[0])
        outputs.append(conv(channels, src, stride)[0])
    return BlockGraph(nodes, outputs, cin)


def test_random_block_configurations(property_case):
    rng = random.Random(1000 + property_case)
    graph = random_block(rng)
    randomize_(nn.ModuleList([m for n in graph.nodes for m in (n.conv, n.bn) if m is not None]), property_case)
    size = rng.randint(1, 17)
    x = torch.randn(rng.randint(1, 3), graph.in_channels, size, rng.randint(1, 17))
    plan = build_plan(graph, x.device, x.dtype)
    with torch.no_grad():
        y = plan.run(x, torch.contiguous_format)
        for n in graph.nodes:
            for m in (n.conv, n.bn):
                if m is not None:
                    m.double().eval()
        expected = graph.eager(x.double())
    assert_close_rel(y, expected, TOL[torch.float32], f"case {property_case}")
