"""What each stage writes: exactly its problems' channel slices of `out` and `mid`, every pixel.

A value check of the block output cannot see a problem that writes one channel too many when a
later program or stage overwrites that channel (on a GPU: a race between the programs of one
launch). Here `out` and `mid` start as NaN and the stages run one at a time: after stage i, the
slices of its problems must hold their nodes' float64 results (so every pixel was written), and
every other channel of both buffers must be bit for bit what it was before the stage.

The layouts put the channel after each merged GEMM's first-destination slice in a later stage's
slice, so a stray column there is still NaN-checked when the GEMM's stage has run. Channel counts
are odd (not multiples of 8) or multiples of 8, maps odd, and the batch sizes make the pixel
tiles straddle their boundary (64 pixels under the interpreter) or not.
"""

import pytest
import torch
from torch import nn

from conftest import TOL, assert_close_rel, conv_node, modules_of, node_results, pool_node, randomize_, reference
from fused_inception.kernels import conv as kconv
from fused_inception.kernels.conv import BUF_MID, BUF_OUT
from fused_inception.graph import BlockGraph, ResidualHead
from fused_inception.interpreter import overflow_checks
from fused_inception.layout import ProblemKind
from fused_inception.plan import build_plan, padded_input


@pytest.fixture(autouse=True)
def _int32_overflow_checked():
    """The interpreter checks every int32 add, subtract and multiply of the kernels for overflow
    here (conftest turns that off elsewhere for speed): this file runs every kernel kind."""
    with overflow_checks():
        yield


def googlenet_like(cin, c1, r2, o2, r3, o3, p):
    """Stage 1: one GEMM for three 1x1s (c1 columns to `out`, r2 + r3 to `mid`) and a 1x1 after a
    3x3 max pool; stage 2: two 3x3s reading `mid` (one at channel r2) and writing `out`."""
    nodes = [conv_node(cin, c1, 1, 1, 0), conv_node(cin, r2, 1, 1, 0), conv_node(cin, r3, 1, 1, 0),
             conv_node(r2, o2, 3, 1, 1, src=1), conv_node(r3, o3, 3, 1, 1, src=2),
             conv_node(cin, p, 1, 1, 0, pool=nn.MaxPool2d(3, 1, 1, ceil_mode=True))]
    return BlockGraph(nodes, [0, 3, 4, 5], in_channels=cin)


def v3e_like(cin, a, r, b, d, e, f, p):
    """Inception v3's E: a 1x3 and a 3x1 both read one `mid` slice (twice: after the reduction and
    after a 3x3), and a 1x1 after an average pool counting the padding."""
    nodes = [conv_node(cin, a, 1, 1, 0), conv_node(cin, r, 1, 1, 0),
             conv_node(r, b, (1, 3), 1, (0, 1), src=1), conv_node(r, b, (3, 1), 1, (1, 0), src=1),
             conv_node(cin, d, 1, 1, 0), conv_node(d, e, 3, 1, 1, src=4),
             conv_node(e, f, (1, 3), 1, (0, 1), src=5), conv_node(e, f, (3, 1), 1, (1, 0), src=5),
             conv_node(cin, p, 1, 1, 0, pool=nn.AvgPool2d(3, 1, 1))]
    return BlockGraph(nodes, [0, 2, 3, 6, 7, 8], in_channels=cin)


def pool_only(cin, a, r, s, t):
    """Inception v3's B: a stride-2 max pool alone (its channels are the result) next to a
    stride-2 3x3 and a 1x1 -> 3x3 -> 3x3/s2 chain."""
    nodes = [conv_node(cin, a, 3, 2, 0), conv_node(cin, r, 1, 1, 0), conv_node(r, s, 3, 1, 1, src=1),
             conv_node(s, t, 3, 2, 0, src=2), pool_node(nn.MaxPool2d(3, 2))]
    return BlockGraph(nodes, [0, 3, 4], in_channels=cin)


def stem(cin, a, b, c):
    """A network's first convolutions, reading an input of fewer than 4 channels: a 7x7/s2, a
    3x3/s2 and a 1x1/s2 of it, as the plan runs them on a copy padded to 4 channels (each its own
    problem, kconv.KIND_GEMM_TAPS)."""
    nodes = [conv_node(cin, a, 7, 2, 3), conv_node(cin, b, 3, 2, 1), conv_node(cin, c, 1, 2, 0)]
    return BlockGraph(nodes, [0, 1, 2], in_channels=cin)


def residual(cin, a, r, b):
    """Inception-ResNet: a 1x1 and a 1x1 -> 3x3 concatenated at the start of `mid` (the merged
    1x1s split between that and the reduction's slice), then relu(x + 0.2 * up(cat))."""
    nodes = [conv_node(cin, a, 1, 1, 0), conv_node(cin, r, 1, 1, 0), conv_node(r, b, 3, 1, 1, src=1)]
    head = ResidualHead(nn.Conv2d(a + b, cin, 1, bias=True), scale=0.2)
    return BlockGraph(nodes, [0, 2], in_channels=cin, head=head)


# (layout, channels, input map): channel counts not multiples of 8, then multiples of 8.
LAYOUTS = [
    (googlenet_like, (13, 7, 5, 11, 3, 9, 6), (7, 5)),
    (googlenet_like, (16, 8, 8, 24, 16, 8, 8), (7, 5)),
    (v3e_like, (11, 5, 7, 3, 6, 9, 5, 4), (5, 7)),
    (v3e_like, (16, 8, 8, 16, 8, 24, 8, 8), (5, 7)),
    (pool_only, (13, 9, 5, 7, 11), (9, 7)),
    (pool_only, (16, 24, 8, 16, 8), (9, 7)),
    (residual, (13, 7, 5, 9), (7, 5)),
    (residual, (16, 8, 16, 24), (7, 5)),
    (stem, (3, 13, 7, 5), (11, 9)),
    (stem, (1, 16, 8, 24), (11, 9)),
    # Split K (few programs; kconv.split_counts): the merged 1x1s of 523 or 520 channels (17
    # iterations of fp32 chunks) and the 3x3s of 37 or 40 (18): K slices, then a reduction launch
    # writing `out` and `mid` (the 1x1s' columns split between them), the residual's 3x3 too.
    (googlenet_like, (523, 7, 37, 11, 3, 9, 6), (7, 5)),
    (googlenet_like, (520, 8, 40, 24, 16, 8, 8), (7, 5)),
    (residual, (16, 8, 40, 24), (7, 5)),
]
SPLITTING = {(523, 7, 37, 11, 3, 9, 6): 2, (520, 8, 40, 24, 16, 8, 8): 2, (16, 8, 40, 24): 1}  # stages that split
# (batch, out's memory format; `mid` is always NHWC): 1 image (one pixel tile), 2 images NHWC and 3
# images (tiles straddling images); the multiples of 8 with 2 images only.
CASES = [(layout, channels, size, batch, memory_format)
         for layout, channels, size in LAYOUTS
         for batch, memory_format in ([(1, torch.contiguous_format), (2, torch.channels_last),
                                       (3, torch.contiguous_format)] if channels[0] % 8 else
                                      [(2, torch.channels_last)])]


def slices(problem, results, block_output, x):
    """(buffer, first channel, float64 expected contents) of each member of a problem, in column
    order: columns < split go to dst0 from dst0_c, the others to dst1 from dst1_c. A pool branch's
    pool alone (no member: layout._pool_first) writes the pooled input."""
    row, col = problem.row, 0
    if problem.kind is ProblemKind.BRANCH and not problem.members:
        yield row["dst0"], row["dst0_c"], problem.pool.apply(x.double())
        return
    members = problem.members if problem.kind is ProblemKind.BRANCH else (None,)
    for member, cout in zip(members, problem.couts):
        expected = block_output if problem.kind is ProblemKind.HEAD else results[member]
        if col < row["split"]:
            yield row["dst0"], row["dst0_c"] + col, expected
        else:
            yield row["dst1"], row["dst1_c"] + col - row["split"], expected
        col += cout


def bits(t):
    return t.contiguous().view(torch.int32)


@pytest.mark.parametrize("layout,channels,size,batch,memory_format", CASES, ids=[
    f"{f.__name__}-{'x8' if c[0] % 8 == 0 else 'odd'}-b{b}{'_cl' if m == torch.channels_last else ''}"
    for f, c, _, b, m in CASES])
def test_each_stage_writes_exactly_its_slices(layout, channels, size, batch, memory_format, device):
    graph = layout(*channels)
    randomize_(modules_of(graph), seed=sum(channels)).to(device)
    x = torch.randn(batch, channels[0], *size, device=device)
    plan = build_plan(graph, x.device, x.dtype)
    results, block_output = node_results(graph, x), reference(graph, x)
    out, mid = plan.layout.buffers(x, x.dtype, memory_format)
    buffers = {BUF_OUT: out.fill_(float("nan"))}
    if mid is not out:
        buffers[BUF_MID] = mid.fill_(float("nan"))
    xk = padded_input(x, plan.pad_to, plan.zero)  # (a stem's input, as Plan.run pads it)
    launches = [kconv.StageLaunch(s.spec, s.table, s.ncols, s.depth, xk, out, mid) for s in plan.stages]
    assert sum(launch.finish is not None for launch in launches) == SPLITTING.get(channels, 0)
    for i, (launch, problems) in enumerate(zip(launches, plan.layout.stages)):
        before = {buf: t.clone() for buf, t in buffers.items()}
        with torch.no_grad():
            launch(plan.weight, None, plan.shift, xk, out, mid)
        written = {buf: set() for buf in buffers}
        for problem in problems:
            for buf, c0, expected in slices(problem, results, block_output, x):
                channels_of = range(c0, c0 + expected.shape[1])
                what = f"stage {i}, nodes {problem.members}, {'out' if buf == BUF_OUT else 'mid'}[{c0}:]"
                assert before[buf][:, channels_of].isnan().all(), f"{what}: written before its stage"
                assert_close_rel(buffers[buf][:, channels_of], expected, TOL[torch.float32], what)
                written[buf].update(channels_of)
        for buf, t in buffers.items():
            others = [c for c in range(t.shape[1]) if c not in written[buf]]
            changed = [c for c in others if not torch.equal(bits(t[:, c]), bits(before[buf][:, c]))]
            assert not changed, f"stage {i} wrote {'out' if buf == BUF_OUT else 'mid'} channels {changed}"
