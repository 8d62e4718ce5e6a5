"""The stage kernel against F.conv2d (+ BN + ReLU, + pool) for each geometry it supports.

Channel counts are deliberately not multiples of 16 and spatial sizes odd, so every mask of
the tiles (pixels, input channels, output channels) is exercised. Besides the tolerance, every
result a ReLU made has the float64 reference's exact zero pattern (conftest.assert_matches_reference).
"""

import pytest
import torch
from torch import nn
import torch.nn.functional as F

from conftest import (TOL, Decisions, assert_close_rel, assert_matches_reference, assert_relu_zero_pattern, conv_node,
                      modules_of, pool_node, randomize_, reference, split_launches)
from fused_inception import count_launches
from fused_inception.kernels import conv as kconv
from fused_inception.activations import RELU
from fused_inception.graph import BlockGraph, PoolSpec, ResidualHead
from fused_inception.plan import build_plan

# (kernel, stride, padding): each kernel size an Inception network uses, with strides 1 and 2
# and "same", zero and asymmetric padding.
GEOMETRIES = [
    ((1, 1), 1, (0, 0)),
    ((1, 1), 2, (0, 0)),
    ((3, 3), 1, (1, 1)),
    ((3, 3), 2, (0, 0)),
    ((3, 3), 2, (1, 1)),
    ((5, 5), 1, (2, 2)),
    ((1, 7), 1, (0, 3)),
    ((7, 1), 1, (3, 0)),
    ((1, 3), 1, (0, 1)),
    ((3, 1), 1, (1, 0)),
    ((7, 7), 2, (3, 3)),
]


def run_fused(graph, x):
    plan = build_plan(graph, x.device, x.dtype)
    with torch.no_grad(), count_launches() as n:
        y = plan.run(x, torch.contiguous_format)
    return y, n.value, plan


@pytest.mark.parametrize("kernel,stride,padding", GEOMETRIES, ids=lambda v: str(v).replace(" ", ""))
def test_conv_geometry(kernel, stride, padding, device):
    graph = BlockGraph([conv_node(19, 37, kernel, stride, padding)], [0], in_channels=19)
    randomize_(modules_of(graph), seed=hash((kernel, stride, padding)) % 1000).to(device)
    x = torch.randn(2, 19, 11, 9, device=device)
    y, launches, plan = run_fused(graph, x)
    assert launches == 1 + split_launches(plan)  # (a 5x5 or 7x7 of 19 channels splits K: 25 or 49 iterations)
    assert_matches_reference(y, graph, x, TOL[torch.float32], f"{kernel} s{stride} p{padding}")


@pytest.mark.parametrize("bn,bias,relu", [(False, True, True), (True, True, False), (False, False, False)])
def test_epilogue_variants(bn, bias, relu, device):
    """conv bias with and without BN (bias folded into the shift), and no ReLU."""
    graph = BlockGraph([conv_node(21, 70, (3, 3), 1, (1, 1), bn=bn, bias=bias, act="relu" if relu else None)], [0],
                       in_channels=21)
    randomize_(modules_of(graph), seed=7).to(device)
    x = torch.randn(1, 21, 7, 10, device=device)
    y, _, _ = run_fused(graph, x)
    assert_matches_reference(y, graph, x, TOL[torch.float32])
    assert bool((y < 0).any()) == (not relu)


def test_relu_is_exactly_zero_near_zero(device):
    """Pre-activations of order 1e-3, so that hundreds lie within 1e-4 of zero (asserted): a ReLU
    clamping at a small negative threshold instead of 0 leaves negative values there, and one
    clamping at a small positive one leaves zeros where the reference is positive."""
    graph = BlockGraph([conv_node(21, 70, (3, 3), 1, (1, 1), bn=False, bias=True)], [0], in_channels=21)
    randomize_(modules_of(graph), seed=17).to(device)
    with torch.no_grad():
        graph.nodes[0].conv.weight.mul_(1e-3)
        graph.nodes[0].conv.bias.mul_(1e-3)
    x = torch.randn(2, 21, 7, 10, device=device)
    y, _, _ = run_fused(graph, x)
    with Decisions() as decisions:
        expected = reference(graph, x)
    pre = decisions.pre_activation(expected)
    assert int(((pre < 0) & (pre > -1e-4)).sum()) > 100 and int(((pre > 0) & (pre < 1e-4)).sum()) > 100
    assert_relu_zero_pattern(y, pre, TOL[torch.float32])
    assert_close_rel(y, expected, TOL[torch.float32])


@pytest.mark.parametrize("pool", [
    nn.MaxPool2d(3, stride=1, padding=1, ceil_mode=True),
    nn.AvgPool2d(3, stride=1, padding=1, count_include_pad=True),
    nn.AvgPool2d(3, stride=1, padding=1, count_include_pad=False),
    # Non-square windows with different y and x padding (the map keeps its size, as a block needs):
    nn.MaxPool2d((3, 5), stride=1, padding=(1, 2), ceil_mode=True),
    nn.AvgPool2d((5, 3), stride=1, padding=(2, 1), count_include_pad=True),
    nn.AvgPool2d((5, 3), stride=1, padding=(2, 1), ceil_mode=True, count_include_pad=False),
    nn.MaxPool2d((1, 3), stride=1, padding=(0, 1)),
    # Strided pools (beside a strided 3x3): pooled as the 1x1 loads its tile (KIND_POOLED_GEMM)
    nn.MaxPool2d(3, stride=2, padding=1),
    nn.AvgPool2d(3, stride=2, padding=1, count_include_pad=False),
], ids=["max", "avg_include_pad", "avg_exclude_pad", "max3x5", "avg5x3_include_pad", "avg5x3_exclude_pad_ceil",
        "max1x3", "max_s2", "avg_exclude_pad_s2"])
def test_pre_pool(pool, device):
    """A pool branch (pool, then a 1x1 conv) next to a 3x3 conv of the same input. A pool that
    keeps the map's size runs alone in a first launch, into `mid`, and its 1x1 is a plain GEMM of
    the second (layout._pool_first); a strided one is fused into the 1x1's load (one launch)."""
    stride = pool.stride if isinstance(pool.stride, int) else pool.stride[0]
    graph = BlockGraph([conv_node(23, 33, (1, 1), 1, (0, 0), pool=pool),
                        conv_node(23, 10, (3, 3), stride, (1, 1))], [0, 1], in_channels=23)
    randomize_(modules_of(graph), seed=5).to(device)
    x = torch.randn(2, 23, 7, 5, device=device)
    y, launches, plan = run_fused(graph, x)
    kinds = {kconv.spec_field(s, "kind") for stage in plan.stages for s in stage.spec}
    if stride == 1:
        assert launches == 2 and kinds == {kconv.KIND_POOL, kconv.KIND_GEMM}
    else:
        assert launches == 1 and kinds == {kconv.KIND_POOLED_GEMM, kconv.KIND_GEMM}
    assert_matches_reference(y, graph, x, TOL[torch.float32], str(pool))


def test_slices_at_nonzero_offsets_and_merged_gemm(device):
    """A miniature block: two 1x1 convs merged into one GEMM whose columns go to an output slice
    and a mid slice, a pooled 1x1, and a second stage reading mid at a nonzero channel offset and
    writing the output at a nonzero offset (outputs listed out of node order)."""
    nodes = [
        conv_node(29, 13, (1, 1), 1, (0, 0)),  # 0 -> out
        conv_node(29, 11, (1, 1), 1, (0, 0)),  # 1 -> mid [0, 11)
        conv_node(29, 17, (1, 1), 1, (0, 0)),  # 2 -> mid [11, 28)
        conv_node(11, 19, (3, 3), 1, (1, 1), src=1),  # 3
        conv_node(17, 9, (1, 7), 1, (0, 3), src=2),  # 4 reads mid at channel 11
        conv_node(29, 7, (1, 1), 1, (0, 0), pool=nn.MaxPool2d(3, 1, 1)),  # 5
    ]
    graph = BlockGraph(nodes, outputs=[4, 0, 5, 3], in_channels=29)
    randomize_(modules_of(graph), seed=11).to(device)
    x = torch.randn(3, 29, 6, 7, device=device)
    y, launches, plan = run_fused(graph, x)
    assert launches == 2
    assert plan.stages[0].nodes[0] == (0, 1, 2)  # one GEMM for the three 1x1s on the input
    assert plan.mid_channels == 28 + 29  # (node 5's pool of the 29 input channels too: layout._pool_first)
    assert_matches_reference(y, graph, x, TOL[torch.float32])


def test_direct_launch_reads_and_writes_slices(device):
    """conv_stage itself: read x[:, 5:5+cin] of an NHWC buffer, write out[:, 7:7+cout] of an NCHW
    buffer, leaving the other channels untouched."""
    cin, cout = 6, 10
    x = torch.randn(2, 20, 5, 5, device=device).to(memory_format=torch.channels_last)
    w = torch.randn(cout, cin, 3, 3, device=device)
    scale = torch.rand(cout, device=device) + 0.5
    shift = torch.randn(cout, device=device)
    out = torch.full((2, 30, 5, 5), float("nan"), device=device)
    spec = (kconv.problem_spec(src=kconv.BUF_X, dst0=kconv.BUF_OUT, kh=3, kw=3, ph=1, pw=1),)
    # cin, ncols, src_c, split, dst0_c, dst1_c, w_off, w_ld, ss_off, res_c (kconv.TABLE_FIELDS)
    table = torch.tensor([[cin, cout, 5, cout, 7, 7, 0, 9 * cin, 0, 0]], dtype=torch.int32, device=device)
    # [cout, K], K = (tap, channel), the scale folded in (inference stages take none)
    weight = (w * scale.view(-1, 1, 1, 1)).permute(0, 2, 3, 1).reshape(-1).contiguous()
    kconv.conv_stage(spec, table, (cout,), (9 * cin,), weight, None, shift, x, out, out)
    expected = F.conv2d(x[:, 5:5 + cin].double(), w.double(), padding=1) * scale.double().view(1, -1, 1, 1) \
        + shift.double().view(1, -1, 1, 1)
    assert_close_rel(out[:, 7:7 + cout], expected, TOL[torch.float32])
    assert out[:, :7].isnan().all() and out[:, 7 + cout:].isnan().all()


@pytest.mark.parametrize("cin,kernel,stride,padding", [(3, 7, 2, 3), (3, 3, 2, 0), (1, 3, 1, 1), (2, (5, 3), 1, (2, 1))],
                         ids=["rgb7x7s2", "rgb3x3s2", "gray3x3", "c2_5x3"])
@pytest.mark.parametrize("dtype,memory_format", [(torch.float32, torch.contiguous_format),
                                                 (torch.bfloat16, torch.channels_last),
                                                 (torch.float16, torch.contiguous_format)], ids=["fp32", "bf16_cl", "fp16"])
def test_padded_stem(cin, kernel, stride, padding, dtype, memory_format, device):
    """A network's first convolution, on fewer than 4 input channels: the plan pads a copy of the
    input to 4 (one more torch kernel) and the kernel runs KIND_GEMM_TAPS, a K chunk of taps of 4
    channels, with weights padded alike; against float64. 7x7 taps span several K chunks (BLOCK_K
    / 4 taps each), 3x3 and 5x3 ones part of one."""
    graph = BlockGraph([conv_node(cin, 24, kernel, stride, padding)], [0], in_channels=cin)
    randomize_(modules_of(graph), seed=cin * 7 + stride).to(device)
    x = torch.randn(2, cin, 13, 11, device=device)
    plan = build_plan(graph, x.device, dtype)
    assert plan.pad_to == kconv.TAP_CHANNELS
    assert [kconv.spec_field(s, "kind") for st in plan.stages for s in st.spec] == [kconv.KIND_GEMM_TAPS]
    with torch.no_grad(), count_launches() as n:
        y = plan.run(x.to(dtype).contiguous(memory_format=memory_format), torch.contiguous_format)
    assert n.value == 1 and y.dtype == dtype
    assert_matches_reference(y, graph, x, TOL[dtype], f"{cin} channels, {kernel} s{stride} p{padding}")


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_geometry(dtype, device):
    graph = BlockGraph([conv_node(18, 24, (3, 3), 1, (1, 1)),
                        conv_node(18, 8, (1, 1), 1, (0, 0), pool=nn.AvgPool2d(3, 1, 1))], [0, 1], in_channels=18)
    randomize_(modules_of(graph), seed=3).to(device)
    x = torch.randn(2, 18, 9, 9, device=device)
    y, _, _ = run_fused(graph, x.to(dtype))
    assert y.dtype == dtype
    assert_matches_reference(y, graph, x, TOL[dtype], str(dtype))


@pytest.mark.parametrize("pool", [
    nn.MaxPool2d(3, stride=2),  # Inception v3 B/D pool branch
    nn.MaxPool2d(3, stride=2, ceil_mode=True),  # partial last windows
    nn.MaxPool2d(2, stride=2, padding=1),
    nn.AvgPool2d(3, stride=2, padding=1, count_include_pad=False),
    nn.AvgPool2d(5, stride=3),  # Inception v3 aux head
    # Non-square windows, strides and paddings (y and x each differ):
    nn.MaxPool2d((3, 2), stride=(2, 1), padding=(1, 0), ceil_mode=True),
    nn.MaxPool2d((2, 3), stride=(1, 3), padding=(0, 1), ceil_mode=True),  # a partial last column
    nn.MaxPool2d((3, 1), stride=(2, 2), padding=(1, 0)),
    nn.AvgPool2d((3, 2), stride=(2, 1), padding=(1, 0), count_include_pad=True),
    nn.AvgPool2d((3, 2), stride=(2, 1), padding=(1, 0), count_include_pad=False),
    nn.AvgPool2d((2, 5), stride=(3, 2), padding=(1, 2), count_include_pad=False),
], ids=["max3s2", "max3s2ceil", "max2s2p1", "avg3s2p1_excl", "avg5s3", "max3x2s2x1p1x0ceil", "max2x3s1x3p0x1ceil",
        "max3x1s2p1x0", "avg3x2s2x1p1x0_incl", "avg3x2s2x1p1x0_excl", "avg2x5s3x2p1x2_excl"])
def test_pool_only_problem_and_strided_pre_pool(pool, device):
    """A pool alone (no GEMM) written to an output slice next to a conv, and the same pool fused
    in front of a 1x1 conv, for strided windows."""
    nodes = [pool_node(pool),  # 0: channels 0..22 of the output
             conv_node(23, 9, (1, 1), 1, (0, 0), pool=pool)]  # 1: pooled 1x1 conv
    graph = BlockGraph(nodes, [0, 1], in_channels=23)
    randomize_(modules_of(graph), seed=13).to(device)
    x = torch.randn(2, 23, 11, 10, device=device)
    y, launches, plan = run_fused(graph, x)
    assert launches == 1 and len(plan.stages[0].nodes) == 2
    assert_matches_reference(y, graph, x, TOL[torch.float32], str(pool))


@pytest.mark.parametrize("relu", [True, False], ids=["relu", "no_relu"])
def test_residual_head(relu, device):
    """Inception-ResNet's last stage on its own: relu?(x + 0.3 * (up(cat) + bias)), where output
    channel n adds the block input's channel n. 70 channels: two column tiles (64 wide under the
    interpreter), so channel n is not the column within its tile; x is NHWC and the output NCHW,
    so their channel strides differ; every channel of x is different, so reading the residual
    from any other channel changes the result."""
    cin = 70
    nodes = [conv_node(cin, 12, (1, 1), 1, (0, 0)),  # cat channels 0..11
             conv_node(cin, 9, (1, 1), 1, (0, 0)),  # reduction, mid after the cat
             conv_node(9, 13, (3, 3), 1, (1, 1), src=1)]  # cat channels 12..24
    head = ResidualHead(nn.Conv2d(25, cin, 1, bias=True), scale=0.3, act=RELU if relu else None)
    graph = BlockGraph(nodes, [0, 2], in_channels=cin, head=head)
    randomize_(modules_of(graph), seed=19).to(device)
    x = (torch.randn(2, cin, 5, 7, device=device) + torch.arange(cin, device=device).view(1, -1, 1, 1) / cin
         ).to(memory_format=torch.channels_last)
    y, launches, plan = run_fused(graph, x)
    assert launches == 3 and plan.layout.stages[-1][0].row["res"] == 1
    assert y.is_contiguous()
    expected = assert_matches_reference(y, graph, x, TOL[torch.float32], "residual")
    assert bool((expected < 0).any()) == (not relu)


def test_max_pool_propagates_nan(device):
    graph = BlockGraph([pool_node(nn.MaxPool2d(3, 2))], [0], in_channels=4)
    x = torch.randn(1, 4, 7, 7, device=device)
    x[0, 1, 2, 2] = float("nan")
    y, _, _ = run_fused(graph, x)
    assert_matches_reference(y, graph, x, TOL[torch.float32])
    assert y[0, 1].isnan().sum() == 4  # every window that covers (2, 2)


def test_pool_padding_beyond_half_the_kernel_is_refused():
    from fused_inception import UnsupportedBlock

    with pytest.raises(UnsupportedBlock, match="more than half its kernel"):
        PoolSpec.make("max", 3, 1, 2)
