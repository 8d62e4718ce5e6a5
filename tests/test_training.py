"""Train mode (eager fallback, exact nn.BatchNorm2d semantics) and gradients through eval-mode fused blocks."""

import pytest
import torch
from torchvision.models.googlenet import Inception

from conftest import TOL, assert_close_rel, randomize_
from fused_inception import FusedInception, count_launches

ARGS = (64, 16, 24, 32, 8, 16, 12)  # a small block: the train path is the same for every size


def pair(seed=0):
    ref = randomize_(Inception(*ARGS), seed)
    fused = FusedInception(*ARGS)
    fused.load_state_dict(ref.state_dict())
    return ref, fused


def grads(module):
    return {name: p.grad.clone() for name, p in module.named_parameters()}


def test_train_forward_backward_and_running_stats():
    ref, fused = pair()
    ref.train()
    fused.train()
    x = torch.randn(3, ARGS[0], 7, 7)
    xr, xf = x.clone().requires_grad_(), x.clone().requires_grad_()
    for step in range(2):  # twice: running stats and num_batches_tracked keep agreeing
        yr, yf = ref(xr), fused(xf)
        g = torch.randn_like(yr)
        yr.backward(g)
        yf.backward(g)
        assert_close_rel(yf, yr, TOL[torch.float32], f"output step {step}")
    assert_close_rel(xf.grad, xr.grad, TOL[torch.float32], "input grad")
    gr, gf = grads(ref), grads(fused)
    assert gr.keys() == gf.keys()
    for name in gr:
        assert_close_rel(gf[name], gr[name], TOL[torch.float32], name)
    for (name, br), bf in zip(ref.named_buffers(), fused.buffers()):
        assert torch.equal(br, bf), name  # running_mean / running_var / num_batches_tracked
    assert int(fused.branch1.bn.num_batches_tracked) == 2


def test_eval_backward_through_fused_forward():
    """eval() without no_grad: the forward is the fused kernels (2 launches), the backward
    recomputes the eager graph; gradients equal torchvision's."""
    ref, fused = pair(1)
    ref.eval()
    fused.eval()
    x = torch.randn(2, ARGS[0], 6, 6)
    xr, xf = x.clone().requires_grad_(), x.clone().requires_grad_()
    yr = ref(xr)
    with count_launches() as n:
        yf = fused(xf)
    assert n.value == 2
    assert yf.grad_fn is not None
    g = torch.randn_like(yr)
    yr.backward(g)
    yf.backward(g)
    assert_close_rel(yf, yr, TOL[torch.float32], "output")
    assert_close_rel(xf.grad, xr.grad, TOL[torch.float32], "input grad")
    gr, gf = grads(ref), grads(fused)
    for name in gr:
        assert_close_rel(gf[name], gr[name], TOL[torch.float32], name)


def test_eval_backward_refuses_after_in_place_update():
    """A parameter changed between the fused forward and its backward would give wrong gradients:
    autograd's saved-tensor check refuses instead."""
    _, fused = pair(2)
    fused.eval()
    y = fused(torch.randn(1, ARGS[0], 5, 5))
    with torch.no_grad():
        fused.branch1.conv.weight.add_(1.0)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        y.sum().backward()
