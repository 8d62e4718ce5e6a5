"""torch.compile: a fused block is one custom op (fused_inception::block_forward), no graph breaks."""

import copy

import torch
import torch._dynamo

from conftest import TOL, assert_close_rel, randomize_
from fused_inception import FusedInception, FusedInceptionE, count_launches

ARGS = (32, 8, 8, 16, 4, 8, 8)


def test_fullgraph_no_graph_breaks_and_launches():
    block = randomize_(FusedInception(*ARGS), 0).eval()
    x = torch.randn(2, 32, 6, 6)
    compiled = torch.compile(block, fullgraph=True, backend="aot_eager")
    with torch.no_grad():
        with count_launches() as n:
            y = compiled(x)
        assert torch._dynamo.explain(block)(x).graph_break_count == 0
        expected = block.eager_forward(x)
    assert n.value == 2
    assert_close_rel(y, expected, TOL[torch.float32])


def test_inductor_tree_block_and_channels_last():
    block = randomize_(FusedInceptionE(40), 1).eval()
    x = torch.randn(1, 40, 5, 5).to(memory_format=torch.channels_last)
    compiled = torch.compile(block, fullgraph=True)  # Inductor
    with torch.no_grad():
        y = compiled(x)
        expected = block.eager_forward(x)
    assert y.is_contiguous(memory_format=torch.channels_last)
    assert_close_rel(y, expected, TOL[torch.float32])


def test_weights_changed_after_compile_are_seen_and_copies_are_separate():
    block = randomize_(FusedInception(*ARGS), 2).eval()
    twin = copy.deepcopy(block)
    x = torch.randn(1, 32, 4, 4)
    compiled = torch.compile(block, fullgraph=True, backend="aot_eager")
    compiled_twin = torch.compile(twin, fullgraph=True, backend="aot_eager")
    with torch.no_grad():
        compiled(x)
        block.load_state_dict(randomize_(FusedInception(*ARGS), 3).state_dict())
        assert_close_rel(compiled(x), block.eager_forward(x), TOL[torch.float32], "after load_state_dict")
        assert_close_rel(compiled_twin(x), twin.eager_forward(x), TOL[torch.float32], "the copy, own weights")


def test_gradients_under_compile_use_the_eager_graph():
    block = randomize_(FusedInception(*ARGS), 4).eval()
    x = torch.randn(2, 32, 5, 5, requires_grad=True)
    torch.compile(block, fullgraph=True, backend="aot_eager")(x).square().sum().backward()
    x2 = x.detach().clone().requires_grad_()
    block.eager_forward(x2).square().sum().backward()
    assert_close_rel(x.grad, x2.grad, TOL[torch.float32])
