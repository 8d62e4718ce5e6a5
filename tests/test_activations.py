"""One activation table: identity, ReLU, ReLU6, LeakyReLU (any slope), SiLU, GELU (erf and tanh) and
Hardswish in the stage kernels' epilogue (inference), in the training forward (BatchNorm applied
by kernels.batchnorm) and in its backward (kernels.conv._activate_grad), recognised as modules,
functions and inside timm's BatchNormAct2d (its `act_layer=` names). Every case runs the kernels
(through the interpreter on CPU) against the block's own eager graph in float64.
"""

import copy

import pytest
import torch
from torch import nn
import torch.nn.functional as F

from conftest import TOL, assert_close_rel, randomize_
from fused_inception import FusedGraphBlock, Route, fuse
from fused_inception.activations import Activation, activation_of_module
from fused_inception.kernels import conv as kconv
from test_training import check_training_parity

MODULES = {
    "relu": lambda: nn.ReLU(inplace=True),
    "relu6": nn.ReLU6,
    "leaky_relu": lambda: nn.LeakyReLU(0.3),
    "silu": nn.SiLU,
    "gelu": nn.GELU,
    "gelu_tanh": lambda: nn.GELU(approximate="tanh"),
    "hardswish": nn.Hardswish,
    "none": nn.Identity,
}


class Block(nn.Module):
    """A small Inception block whose units end with the activation `act` (a module factory): a
    1x1, a 1x1 -> 3x3 chain and a 3x3 max pool -> 1x1, concatenated."""

    def __init__(self, act, cin=12):
        super().__init__()

        def unit(i, o, k=1):
            return nn.Sequential(nn.Conv2d(i, o, k, padding=k // 2, bias=False), nn.BatchNorm2d(o, eps=1e-3), act())

        self.b1 = unit(cin, 8)
        self.b2 = nn.Sequential(unit(cin, 8), unit(8, 16, 3))
        self.b3 = nn.Sequential(nn.MaxPool2d(3, 1, 1), unit(cin, 8))

    def forward(self, x):
        return torch.cat([self.b1(x), self.b2(x), self.b3(x)], 1)


def fused_one(module):
    """fuse() on module inside an nn.Sequential: the fused block (the Sequential itself when its
    whole result is the module's chain)."""
    model, report = fuse(nn.Sequential(module))
    block = model if isinstance(model, FusedGraphBlock) else model[0]
    assert isinstance(block, FusedGraphBlock) and report.left_alone == [], str(report)
    return block


def fused_block(act, seed=0):
    reference = randomize_(Block(MODULES[act]), seed)
    model, report = fuse(nn.Sequential(copy.deepcopy(reference)))
    assert isinstance(model[0], FusedGraphBlock) and report.left_alone == [], str(report)
    return reference, model


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=["fp32", "bf16", "fp16"])
@pytest.mark.parametrize("act", sorted(MODULES))
def test_eval_matches_float64(act, dtype, device):
    """Inference: the stage kernels' epilogue computes the block's activation, within the
    dtype's tolerance of the unfused block in float64 (as eager's own error is)."""
    reference, model = fused_block(act)
    model, reference = model.eval().to(device, dtype), reference.eval().to(device)
    x = torch.randn(2, 12, 7, 6, device=device)
    with torch.no_grad():
        assert model[0].route(x.to(dtype)) is Route.EVAL
        y = model(x.to(dtype))
        expected = copy.deepcopy(reference).double()(x.double())
        eager = reference.to(dtype)(x.to(dtype))
    assert y.dtype == dtype
    assert_close_rel(y, expected, TOL[dtype], f"{act} {dtype}")
    assert_close_rel(eager, expected, TOL[dtype], f"eager {act} {dtype}")  # (the tolerance eager meets too)


@pytest.mark.parametrize("act", sorted(MODULES))
def test_train_step_matches_float64(act, device):
    """Training: batch statistics in the kernels, the activation applied after the fused
    BatchNorm, its derivative in the fused backward: outputs, input and parameter gradients and
    running statistics of two steps against the unfused block in float64."""
    reference, model = fused_block(act, seed=1)
    x = torch.randn(2, 12, 7, 6, device=device)
    assert model.train()[0].route(x) is Route.TRAIN
    check_training_parity(nn.Sequential(reference).to(device), model.to(device), x)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("act", ["silu", "gelu", "gelu_tanh"])
def test_train_step_low_precision(act, dtype, device):
    """A bf16/fp16 training step of an activation that does not commute with rounding: the
    kernels round the BatchNorm output to the dtype before the activation reads it, as eager
    does; output and input gradient within the dtype's tolerance of float64, as eager's. (Smooth
    activations: where a derivative jumps, as Hardswish's at +-3, the rounding of an input near
    the jump decides between two gradients in eager as in the kernels.)"""
    reference, model = fused_block(act, seed=2)
    model, reference = model.train().to(device, dtype), reference.train().to(device)
    x = torch.randn(2, 12, 7, 6, device=device)
    xf, xr, xe = x.to(dtype).requires_grad_(), x.double().requires_grad_(), x.to(dtype).requires_grad_()
    eager = copy.deepcopy(reference).to(dtype)
    yf, yr, ye = model(xf), copy.deepcopy(reference).double()(xr), eager(xe)
    g = torch.randn_like(yr)
    for y, inp in ((yf, xf), (yr, xr), (ye, xe)):
        y.backward(g.to(y.dtype))
    tol = 2 * TOL[dtype]  # (a training step: BN statistics of rounded values, then the backward)
    for what, a, e, ref in (("output", yf, ye, yr), ("input grad", xf.grad, xe.grad, xr.grad)):
        assert_close_rel(e, ref, tol, f"eager {what}")
        assert_close_rel(a, ref, tol, f"fused {what} {act} {dtype}")


KINKS = {"relu": (0.0,), "relu6": (0.0, 6.0), "leaky_relu": (0.0,), "hardswish": (-3.0, 3.0)}


@pytest.mark.parametrize("act", sorted(KINKS))
def test_derivative_at_the_kinks_is_eagers(act, device):
    """Pre-activations exactly at an activation's kinks (integer weights and inputs: exact in
    fp32): the fused forward and backward give exactly eager's values there (ReLU's gradient is 0
    at 0, ReLU6's 0 at 0 and 6, LeakyReLU's the slope at 0, Hardswish's 0 at -3 and 1 at 3).
    A `y < 0` for `y <= 0` in the ReLU backward fails here."""
    g = torch.Generator().manual_seed(5)
    conv = nn.Conv2d(8, 16, 1, bias=True)
    with torch.no_grad():
        conv.weight.copy_(torch.randint(-1, 2, conv.weight.shape, generator=g).float())
        conv.bias.copy_(torch.randint(-3, 4, conv.bias.shape, generator=g).float())
    reference = nn.Sequential(conv, MODULES[act]()).to(device).train()
    block = fused_one(copy.deepcopy(reference))
    x = torch.randint(-3, 4, (2, 8, 5, 5), generator=g).float().to(device).to(memory_format=torch.channels_last)
    with torch.no_grad():
        z = conv(x)
    at_kinks = sum(int((z == k).sum()) for k in KINKS[act])
    assert at_kinks > 20, at_kinks  # (the case this test is about)
    assert block.route(x) is Route.TRAIN
    xf, xe = x.clone().requires_grad_(), x.clone().requires_grad_()
    grad = torch.randint(1, 4, (2, 16, 5, 5), generator=g).float().to(device)
    yf, ye = block(xf), reference(xe)
    yf.backward(grad)
    ye.backward(grad)
    assert torch.equal(yf, ye), act
    assert torch.equal(xf.grad, xe.grad), f"{act}: input gradient"
    fused_conv = next(m for m in block.modules() if isinstance(m, nn.Conv2d))
    assert torch.allclose(fused_conv.weight.grad, reference[0].weight.grad, rtol=1e-6, atol=0), f"{act}: weight grad"
    assert torch.allclose(fused_conv.bias.grad, reference[0].bias.grad, rtol=1e-6, atol=0), f"{act}: bias grad"


def _unit_forward(form):
    """A module whose forward is conv -> BN -> the activation written as `form`."""
    calls = {
        "F.relu": lambda y: F.relu(y), "torch.relu": torch.relu, "relu_": lambda y: y.relu_(),
        "F.relu6": F.relu6, "F.leaky_relu": lambda y: F.leaky_relu(y, 0.2, inplace=True), "F.silu": F.silu,
        "F.gelu": F.gelu, "F.gelu_tanh": lambda y: F.gelu(y, approximate="tanh"), "F.hardswish": F.hardswish,
    }

    class Unit(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv, self.bn = nn.Conv2d(8, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8)

        def forward(self, x):
            return calls[form](self.bn(self.conv(x)))

    return Unit()


FORMS = {"F.relu": kconv.ACT_RELU, "torch.relu": kconv.ACT_RELU, "relu_": kconv.ACT_RELU, "F.relu6": kconv.ACT_RELU6,
         "F.leaky_relu": kconv.ACT_LEAKY_RELU, "F.silu": kconv.ACT_SILU, "F.gelu": kconv.ACT_GELU,
         "F.gelu_tanh": kconv.ACT_GELU_TANH, "F.hardswish": kconv.ACT_HARDSWISH}


@pytest.mark.parametrize("form", sorted(FORMS))
def test_functional_forms_are_recognised(form, device):
    """Each activation written as a function (in place or not) is recognised: the unit is
    swapped, its node has that activation, and its eval output is the unit's."""
    unit = randomize_(_unit_forward(form), 3).eval().to(device)
    model = fused_one(copy.deepcopy(unit))
    (node,) = model.graph().nodes
    assert node.act.kind == FORMS[form] and node.act.slope == (0.2 if form == "F.leaky_relu" else 0.0)
    x = torch.randn(2, 8, 5, 6, device=device)
    with torch.no_grad():
        assert_close_rel(model(x), copy.deepcopy(unit).double()(x.double()), TOL[torch.float32], form)


def test_changed_slope_is_seen(device):
    """A LeakyReLU's slope changed after fuse(): the next forward computes with the new slope."""
    reference, model = fused_block("leaky_relu", seed=4)
    model, reference = model.eval().to(device), reference.eval().to(device)
    x = torch.randn(2, 12, 6, 6, device=device)
    with torch.no_grad():
        model(x)
        for m in list(model.modules()) + list(reference.modules()):
            if isinstance(m, nn.LeakyReLU):
                m.negative_slope = 0.05
        assert_close_rel(model(x), copy.deepcopy(reference).double()(x.double()), TOL[torch.float32], "new slope")


def test_unknown_and_double_activations_are_left_alone():
    """An activation the kernels don't compute (ELU), or two in a row that are not one (SiLU after
    a BatchNormAct2d's ReLU is not): the block is left alone, the reason named."""
    model, report = fuse(nn.Sequential(Block(nn.ELU)))
    assert not isinstance(model[0], FusedGraphBlock) and "ELU" in str(report.left_alone), str(report)
    assert activation_of_module(nn.ELU()) is None and activation_of_module(nn.SiLU()) == Activation(kconv.ACT_SILU)
    timm = pytest.importorskip("timm")

    class Twice(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv, self.bn = nn.Conv2d(4, 4, 1), timm.layers.BatchNormAct2d(4)

        def forward(self, x):
            return torch.cat([F.silu(self.bn(self.conv(x))), x], 1)

    model, report = fuse(nn.Sequential(Twice()))
    assert not isinstance(model[0], FusedGraphBlock) and "two activations" in str(report.left_alone), str(report)
