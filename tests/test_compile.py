"""torch.compile: a fused block is one custom op (inference: fused_inception::block_forward;
training: block_train_forward / block_train_backward with registered autograd), no graph breaks."""

import copy

import pytest
import torch
import torch._dynamo
from torch import nn

from conftest import TOL, assert_close_rel, randomize_
from fused_inception import FusedBasicConv2d, FusedInception, FusedInceptionE, count_launches

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


def test_gradients_under_compile_fused_forward_eager_backward():
    """Eval mode with autograd recording under compile: the fused forward (block_eval_forward,
    two launches) and the eager graph's gradients of the input and every parameter."""
    block = randomize_(FusedInception(*ARGS), 4).eval()
    twin = copy.deepcopy(block)
    x = torch.randn(2, 32, 5, 5, requires_grad=True)
    compiled = torch.compile(block, fullgraph=True, backend="aot_eager")
    compiled(x)  # (compiles)
    with count_launches() as n:
        y = compiled(x)
    assert n.value == 2
    y.square().sum().backward()
    x2 = x.detach().clone().requires_grad_()
    twin.eager_forward(x2).square().sum().backward()
    assert_close_rel(x.grad, x2.grad, TOL[torch.float32])
    for (name, p), q in zip(block.named_parameters(), twin.parameters()):
        assert_close_rel(p.grad, q.grad, TOL[torch.float32], name)


def train_steps(model, x, steps=2, run=None):
    """Outputs, gradients (of the last step) and buffers of `steps` forward/backward passes of
    `run` (default: model) on x, read from `model`."""
    outputs = []
    for _ in range(steps):
        model.zero_grad()
        y = (run or model)(x)
        y.square().mean().backward()
        outputs.append(y.detach())
    return (outputs, {n: p.grad.clone() for n, p in model.named_parameters()},
            {n: b.clone() for n, b in model.named_buffers()})


@pytest.mark.parametrize("backend", ["aot_eager", "inductor"])
def test_training_fullgraph_no_graph_breaks(backend):
    """A training step of a fused model under torch.compile(fullgraph=True): the fused forward and
    backward ops (6 launches forward: a conv unit and a GoogLeNet block), equal to the eager
    fused model, running statistics included."""
    model = randomize_(nn.Sequential(FusedBasicConv2d(3, 16, kernel_size=3, padding=1), FusedInception(16, *ARGS[1:])),
                       5).train()
    twin = copy.deepcopy(model)
    x = torch.randn(2, 3, 6, 6)
    assert torch._dynamo.explain(copy.deepcopy(model))(x).graph_break_count == 0
    compiled = torch.compile(twin, fullgraph=True, backend=backend)
    expected_out, expected_grads, expected_buffers = train_steps(model, x)
    outputs, grads, buffers = train_steps(twin, x, run=compiled)
    with count_launches() as n:
        compiled(x)
    assert n.value == 2 + 4
    tol = TOL[torch.float32]  # Inductor computes the loss's gradient with its own rounding
    for y, expected in zip(outputs, expected_out):
        assert_close_rel(y, expected, tol, "output")
    for name, g in expected_grads.items():
        assert_close_rel(grads[name], g, tol, name)
    for name, b in expected_buffers.items():
        assert_close_rel(buffers[name], b, tol, name)
