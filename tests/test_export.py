"""torch.export of a fused model keeps one fused custom op per block, with or without autograd
recording (fused_inception/ops.py), and the exported program runs and matches."""

import collections
import copy

import torch

from conftest import TOL, assert_close_rel, randomize_
from fused_inception import FusedInception, count_launches
from fused_inception.models import googlenet

ARGS = (32, 8, 8, 16, 4, 8, 8)


def call_targets(ep):
    return collections.Counter(str(n.target) for n in ep.graph.nodes if n.op == "call_function")


def test_exported_googlenet_keeps_its_fused_ops():
    """The usual `torch.export.export(model.eval(), (x,))` (grad enabled) and the same under
    no_grad: 3 stem convs + 9 blocks as 12 fused ops of the 20 calls (without them it traces
    to ~200 aten calls); the exported program matches the float64 eager reference."""
    model = randomize_(googlenet(), 0).eval()
    x = torch.randn(1, 3, 64, 64)
    exported = {}
    for grad in (True, False):
        with torch.set_grad_enabled(grad):
            exported[grad] = ep = torch.export.export(model, (x,))
        targets = call_targets(ep)
        op = "fused_inception.block_eval_forward.default" if grad else "fused_inception.block_forward.default"
        assert targets[op] == 12 and sum(targets.values()) == 20, (grad, targets)
    with torch.no_grad():
        reference = copy.deepcopy(model).double()(x.double())  # (float64: the eager graph)
        y = exported[True].module()(x)
    assert_close_rel(y, reference, TOL[torch.float32], "exported (grad enabled)")


def test_exported_block_gradients_and_the_model_after_export():
    """Backward through an exported eval block (the fused forward's autograd formula: the eager
    graph recomputed) gives the eager gradients of the input and every parameter; the model
    exported from still runs its fused forward as before."""
    block = randomize_(FusedInception(*ARGS), 1).eval()
    x = torch.randn(2, 32, 5, 5)
    ep = torch.export.export(block, (x,))
    assert call_targets(ep)["fused_inception.block_eval_forward.default"] == 1
    module = ep.module()
    xe = x.clone().requires_grad_()
    with count_launches() as n:
        y = module(xe)
    assert n.value == 2  # the fused forward (two stages)
    y.square().sum().backward()

    xr = x.clone().requires_grad_()
    reference = block.eager_forward(xr)
    reference.square().sum().backward()
    assert_close_rel(y, reference, TOL[torch.float32], "output")
    assert_close_rel(xe.grad, xr.grad, TOL[torch.float32], "input gradient")
    exported_params = dict(module.named_parameters())
    assert exported_params.keys() == dict(block.named_parameters()).keys()
    for name, p in block.named_parameters():
        assert_close_rel(exported_params[name].grad, p.grad, TOL[torch.float32], name)

    with torch.no_grad():
        with count_launches() as n:
            again = block(x)
    assert n.value == 2
    assert_close_rel(again, reference, TOL[torch.float32], "the block after export")
