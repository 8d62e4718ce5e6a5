"""What the kernels are promised and the interpreter cannot check (issue 20, item 6).

The specs tell the compiler what divides each offset and pitch (`align`, `dalign`, `walign`): it
then issues 16-byte loads that a GPU would fault on, or read wrong, if a table row broke the
promise; under the interpreter every load is element-wise and nothing shows. And the output-size
rule of a ceil-mode pool at the boundary where its last window would start in the padding.
"""

import pytest
import torch
from torch import nn

from conftest import TOL, assert_matches_reference, conv_node, pool_node, randomize_, modules_of
from fused_inception import fuse
from fused_inception.graph import BlockGraph
from fused_inception.kernels import conv as kconv
from fused_inception.models import googlenet, inception_v3
from fused_inception.models.inception_resnet_v2 import Block35, Block17, Block8
from fused_inception.plan import build_plan
from fused_inception.training import build_train_plan


def _graphs():
    """Every block of GoogLeNet and Inception v3, Inception-ResNet's three, and a block of odd
    channel counts (7, 13, 5: no alignment but 1 may be promised)."""
    out = []
    for model in (googlenet(init_weights=True), inception_v3(init_weights=True, aux_logits=False)):
        out += [(name, m.graph()) for name, m in model.named_modules() if hasattr(m, "graph") and "Conv" not in
                type(m).__name__]
    for cls in (Block35, Block17, Block8):  # (plain modules: recognised by fuse(), at full width)
        model, _ = fuse(nn.Sequential(cls(lambda n: n)))
        out.append((cls.__name__, model[0].graph()))
    odd = BlockGraph([conv_node(7, 13, (1, 1), 1, (0, 0)), conv_node(7, 5, (1, 1), 1, (0, 0)),
                      conv_node(5, 9, (3, 3), 1, (1, 1), src=1)], [0, 2], in_channels=7)
    return out + [("odd", odd)]


GRAPHS = _graphs()


def _check_rows(stages, channels):
    """Every table row against its spec: channel counts, offsets and pitches divisible by what
    the spec promises the kernel."""
    field = {name: i for i, name in enumerate(kconv.TABLE_FIELDS)}
    for stage in stages:
        for spec, row in zip(stage.spec, stage.table.tolist()):
            def get(name):
                return row[field[name]]
            align, dalign, walign = (kconv.spec_field(spec, k) for k in ("align", "dalign", "walign"))
            assert get("cin") % align == 0 and get("src_c") % align == 0, (spec, row)
            assert channels[kconv.spec_field(spec, "src")] % align == 0, (spec, channels)
            assert get("ncols") % dalign == 0 and get("dst0_c") % dalign == 0, (spec, row)
            assert channels[kconv.spec_field(spec, "dst0")] % dalign == 0, (spec, channels)
            if kconv.spec_field(spec, "split"):
                assert get("split") % dalign == 0 and get("dst1_c") % dalign == 0, (spec, row)
                assert channels[kconv.spec_field(spec, "dst1")] % dalign == 0, (spec, channels)
            if kconv.spec_field(spec, "res") == kconv.RES_MID:
                assert get("res_c") % align == 0, (spec, row)
            if kconv.spec_field(spec, "kind") != kconv.KIND_POOL:
                assert get("w_off") % walign == 0 and get("w_ld") % walign == 0, (spec, row)


@pytest.mark.parametrize("name,graph", GRAPHS, ids=[g[0] for g in GRAPHS])
def test_table_rows_keep_the_specs_alignment_promises(name, graph):
    """Inference and training plans: every row divisible by its spec's alignments; and the
    inference packing pads weight rows so that every problem gets 16-byte weight loads
    (walign 8): without the padding a 7-channel block's rows would be promised nothing."""
    plan = build_plan(graph, torch.device("cpu"), torch.bfloat16)
    channels = plan.layout.buffer_channels(graph.in_channels)
    _check_rows(plan.stages, channels)
    assert {kconv.spec_field(s, "walign") for stage in plan.stages for s in stage.spec} == {kconv.W_ALIGN}, name
    if name != "odd":  # (Inception's channel counts are multiples of 8: 16-byte activations too)
        assert {kconv.spec_field(s, "align") for stage in plan.stages for s in stage.spec} == {8}, name
    train = build_train_plan(graph, torch.device("cpu"), torch.float32, torch.float32)
    _check_rows(train.stages, channels)


@pytest.mark.parametrize("branch", ["pool alone", "pool then 1x1"])
def test_ceil_mode_pool_whose_last_window_would_start_in_the_padding(branch, device):
    """A 2x2/s2/p1 max pool with ceil_mode on an 11x10 map: along H ceil((11 + 2 - 2) / 2) + 1 = 7
    windows, but the 7th would start at row 12, in the padding, so ATen drops it (6); along W
    the 6th starts at 10, inside: kept. The block output must have eager's shape and values."""
    pool = nn.MaxPool2d(2, 2, padding=1, ceil_mode=True)
    if branch == "pool alone":
        nodes = [pool_node(pool), conv_node(6, 8, (2, 2), 2, (1, 1))]
    else:
        nodes = [conv_node(6, 8, (1, 1), 1, (0, 0), pool=pool), conv_node(6, 8, (2, 2), 2, (1, 1))]
    graph = BlockGraph(nodes, [0, 1], in_channels=6)
    randomize_(modules_of(graph), seed=3).to(device)
    x = torch.randn(2, 6, 11, 10, device=device)
    plan = build_plan(graph, x.device, x.dtype)
    with torch.no_grad():
        y = plan.run(x)
    assert y.shape == pool(x).shape[:1] + (y.shape[1],) + (6, 6)
    assert_matches_reference(y, graph, x, TOL[torch.float32], branch)
