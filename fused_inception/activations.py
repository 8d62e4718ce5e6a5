"""The activations the stage kernels apply in their epilogue, recognised once, here.

Inference and training, forward and backward, in fp32/fp16/bf16: the kernels' table is
kernels.conv._activate / _activate_grad (a constexpr `ACT_*` picks the function). Recognised as
modules (`nn.ReLU`, `nn.ReLU6`, `nn.LeakyReLU` of any slope, `nn.SiLU`, `nn.GELU` (erf or tanh),
`nn.Hardswish`, timm's `GELU`/`GELUTanh`: what timm's `act_layer=` names make), as functional
calls (`F.relu`/`torch.relu`/`.relu()` in place or not, `F.relu6`, `F.leaky_relu`, `F.silu`,
`F.gelu`, `F.hardswish`) and inside timm's norm + act layers (norms.activation_of).

Example:
    >>> activation_of_module(nn.LeakyReLU(0.2))
    Activation(kind=3, slope=0.2)
"""

from dataclasses import dataclass

import torch
from torch import nn
import torch.nn.functional as F

from fused_inception.kernels import conv as kconv


@dataclass(frozen=True)
class Activation:
    """An elementwise activation the stage kernels apply in their epilogue (and differentiate in
    the training backward): `kind` one of kconv.ACT_* (ReLU, ReLU6, LeakyReLU, SiLU, GELU (erf
    or tanh), Hardswish), `slope` LeakyReLU's negative slope. Calling it computes it with torch
    ops (the eager reference)."""

    kind: int
    slope: float = 0.0

    def __call__(self, y):
        k = self.kind
        if k == kconv.ACT_RELU:
            return F.relu(y)
        if k == kconv.ACT_RELU6:
            return F.relu6(y)
        if k == kconv.ACT_LEAKY_RELU:
            return F.leaky_relu(y, self.slope)
        if k == kconv.ACT_SILU:
            return F.silu(y)
        if k in (kconv.ACT_GELU, kconv.ACT_GELU_TANH):
            return F.gelu(y, approximate="tanh" if k == kconv.ACT_GELU_TANH else "none")
        return F.hardswish(y)

    def __str__(self):
        names = {kconv.ACT_RELU: "ReLU", kconv.ACT_RELU6: "ReLU6", kconv.ACT_LEAKY_RELU: f"LeakyReLU({self.slope})",
                 kconv.ACT_SILU: "SiLU", kconv.ACT_GELU: "GELU", kconv.ACT_GELU_TANH: "GELU(tanh)",
                 kconv.ACT_HARDSWISH: "Hardswish"}
        return names[self.kind]


RELU = Activation(kconv.ACT_RELU)
# Modules that are one activation (timm's own GELU classes, which its `act_layer="gelu"` makes,
# are recognised by name: timm is not a dependency).
_ACTIVATION_MODULES = {nn.ReLU: RELU, nn.ReLU6: Activation(kconv.ACT_RELU6), nn.SiLU: Activation(kconv.ACT_SILU),
                       nn.Hardswish: Activation(kconv.ACT_HARDSWISH)}
_TIMM_GELU = {("timm.layers.activations", "GELU"): Activation(kconv.ACT_GELU),
              ("timm.layers.activations", "GELUTanh"): Activation(kconv.ACT_GELU_TANH)}


def activation_of_module(m):
    """The Activation that module m computes, or None if it is not one the kernels compute."""
    t = type(m)
    if t in _ACTIVATION_MODULES:
        return _ACTIVATION_MODULES[t]
    if t is nn.LeakyReLU:
        return Activation(kconv.ACT_LEAKY_RELU, float(m.negative_slope))
    if t is nn.GELU:
        return Activation(kconv.ACT_GELU_TANH if m.approximate == "tanh" else kconv.ACT_GELU)
    return _TIMM_GELU.get((t.__module__, t.__name__))


def activation_of_call(fn, args, kwargs):
    """(Activation, in place?) of a call fn(x, *args, **kwargs) of a torch function, or None if
    fn is not one the kernels compute (with these arguments)."""
    def arg(i, name, default):
        return args[i] if len(args) > i else kwargs.get(name, default)

    if fn in (F.relu, torch.relu):
        return RELU, bool(arg(0, "inplace", False))
    if fn in (F.relu_, torch.relu_):
        return RELU, True
    if fn is F.relu6:
        return Activation(kconv.ACT_RELU6), bool(arg(0, "inplace", False))
    if fn is F.leaky_relu:
        return Activation(kconv.ACT_LEAKY_RELU, float(arg(0, "negative_slope", 0.01))), bool(arg(1, "inplace", False))
    if fn is F.silu:
        return Activation(kconv.ACT_SILU), bool(arg(0, "inplace", False))
    if fn is F.hardswish:
        return Activation(kconv.ACT_HARDSWISH), bool(arg(0, "inplace", False))
    if fn is F.gelu:
        approximate = arg(0, "approximate", "none")
        return Activation(kconv.ACT_GELU_TANH if approximate == "tanh" else kconv.ACT_GELU), False
    return None


def combined(first, second):
    """The one activation that applying `first` then `second` is (None: none; False: not one the
    kernels apply, which apply one). Only ReLU after ReLU is one (timm's norm + act layer with a
    ReLU, then another ReLU)."""
    if first is None or second is None:
        return second if first is None else first
    return RELU if first == second == RELU else False
