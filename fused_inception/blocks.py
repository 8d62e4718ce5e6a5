"""Drop-in fused modules: torchvision's constructor arguments, child names and state_dict keys.

`FusedBlock` is the mechanism: a subclass says what its graph is (`graph()`), and `forward`
checks the input, picks a backend and runs the cached plan. Backends:

- Triton: on CUDA tensors, and on CPU tensors when Triton's interpreter is on (TRITON_INTERPRET=1
  set before `fused_inception` is imported). Used in eval mode; one launch per stage.
- eager: the reference math with torch ops (the block's own submodules). Used in train mode
  (batch statistics, running-stat updates, autograd exactly as nn.BatchNorm2d), under autocast,
  for float64, and on CPU without the interpreter.

In eval mode with autograd recording (parameters or input requiring grad and grad enabled), the
fused forward is wrapped in an autograd.Function whose backward recomputes the eager graph.
"""

import torch
from torch import nn
import torch.nn.functional as F

from fused_inception.kernels import conv as kconv
from fused_inception.plan import BlockGraph, ConvNode, UnsupportedBlock, build_plan

_KERNEL_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def check_input(x, in_channels, like, name):
    """Raise a clear error unless x is a 4-D floating tensor with `in_channels` channels, on the
    device and of the dtype of the parameter `like`."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} expects a torch.Tensor, got {type(x).__name__}")
    if x.dim() != 4:
        raise ValueError(f"{name} expects a 4-D input (N, C, H, W), got {x.dim()}-D with shape {tuple(x.shape)}")
    if x.shape[1] != in_channels:
        raise ValueError(f"{name} expects {in_channels} input channels, got {x.shape[1]} (input shape {tuple(x.shape)})")
    if not x.is_floating_point():
        raise TypeError(f"{name} expects a floating-point input (float32, float16 or bfloat16), got {x.dtype}")
    if x.device != like.device:
        raise RuntimeError(f"{name}: input is on {x.device} but the block's parameters are on {like.device}; "
                           f"move one with .to()")
    if x.dtype != like.dtype and not torch.is_autocast_enabled(x.device.type):
        raise TypeError(f"{name}: input dtype {x.dtype} does not match the block's parameters ({like.dtype}); "
                        f"convert the input or the module with .to(dtype)")


def output_memory_format(x):
    """The memory format eager convolutions return for x: channels_last iff x is channels_last."""
    if x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous():
        return torch.channels_last
    return torch.contiguous_format


def triton_available_for(x):
    """True if the stage kernel can run on x's device: CUDA, or CPU under the interpreter."""
    return x.device.type == "cuda" or (kconv.INTERPRETING and x.device.type == "cpu")


class _EvalFunction(torch.autograd.Function):
    """Fused forward; backward recomputes the eager graph (eval BN is affine, nothing is updated)."""

    @staticmethod
    def forward(ctx, block, x, *params):
        ctx.block = block
        ctx.save_for_backward(x, *params)  # saved: autograd refuses a backward after in-place updates
        return block._run_plan(x)

    @staticmethod
    def backward(ctx, grad):
        x, *params = ctx.saved_tensors
        if ctx.block.training:
            raise RuntimeError(f"{type(ctx.block).__name__} was switched to train() between an eval forward and its "
                               "backward; the recomputed graph would use batch statistics")
        with torch.enable_grad():
            xd = x.detach().requires_grad_(ctx.needs_input_grad[1])
            y = ctx.block.graph().eager(xd)
        wanted = [t for t, need in zip([xd] + params, ctx.needs_input_grad[1:]) if need]
        grads = iter(torch.autograd.grad(y, wanted, grad, allow_unused=True))
        return (None,) + tuple(next(grads) if need else None for need in ctx.needs_input_grad[1:])


class FusedBlock(nn.Module):
    """Base class: subclasses implement `graph()` (a `plan.BlockGraph` over their submodules)."""

    def graph(self):  # pragma: no cover - abstract
        raise NotImplementedError

    def _tracked_params(self):
        return [p for p in self.parameters()]

    def _plan_key(self, like):
        # Everything a plan is derived from: any in-place update bumps _version (optimizer steps,
        # load_state_dict, running stats), .to()/.half() change dtype, device and data_ptr, and a
        # replaced submodule changes the ids. Writes through `.data` bypass _version: call
        # `invalidate_plan()` after those.
        return (like.device, like.dtype, tuple((id(t), t._version, t.data_ptr()) for t in self._state_tensors()))

    def _state_tensors(self):
        return list(self.parameters()) + list(self.buffers())

    def invalidate_plan(self):
        """Drop the cached plan (it is rebuilt on the next fused forward)."""
        self._fused_plan = None
        self._fused_plan_key = None

    def train(self, mode=True):
        self.invalidate_plan()
        return super().train(mode)

    def plan(self):
        """The current plan for this block's parameters (built, or taken from the cache)."""
        like = next(self.parameters())
        key = self._plan_key(like)
        if getattr(self, "_fused_plan_key", None) != key:
            self._fused_plan = build_plan(self.graph(), like.device, like.dtype)
            self._fused_plan_key = key
        return self._fused_plan

    def _run_plan(self, x):
        return self.plan().run(x, output_memory_format(x))

    def uses_kernels(self, x):
        """True if forward(x) would run the Triton stage kernel (not the eager fallback)."""
        return (not self.training and x.dtype in _KERNEL_DTYPES and triton_available_for(x)
                and not torch.is_autocast_enabled(x.device.type))

    def forward(self, x):
        like = next(self.parameters())
        check_input(x, self.graph_in_channels(), like, type(self).__name__)
        if not self.uses_kernels(x):
            return self.graph().eager(x)
        if torch.is_grad_enabled() and (x.requires_grad or any(p.requires_grad for p in self._tracked_params())):
            return _EvalFunction.apply(self, x, *self._tracked_params())
        return self._run_plan(x)

    def graph_in_channels(self):
        raise NotImplementedError


def _conv_unit(module):
    """(conv, bn) of a BasicConv2d-style unit whose forward is relu(bn(conv(x))), or raise."""
    if isinstance(module, BasicConv2d) or (type(module).__name__ == "BasicConv2d"
                                           and type(module).__module__.startswith("torchvision.models")):
        return module.conv, module.bn
    raise UnsupportedBlock(f"conv_block {type(module).__module__}.{type(module).__name__} is not a "
                           "BasicConv2d (conv -> BatchNorm2d -> ReLU); fused blocks can't know what it computes")


class BasicConv2d(nn.Module):
    """conv (no bias) -> BatchNorm2d(eps=0.001) -> ReLU, with torchvision's child names `conv`, `bn`."""

    def __init__(self, in_channels, out_channels, **kwargs):
        super().__init__()
        self.conv = nn.Conv2d(in_channels, out_channels, bias=False, **kwargs)
        self.bn = nn.BatchNorm2d(out_channels, eps=0.001)

    def forward(self, x):
        return F.relu(self.bn(self.conv(x)), inplace=True)


class FusedBasicConv2d(FusedBlock):
    """`BasicConv2d` (conv -> BN -> ReLU) computed by one launch of the stage kernel in eval mode.

    Same constructor and state_dict keys (`conv.weight`, `bn.*`) as torchvision's BasicConv2d.

    Example:
        >>> m = FusedBasicConv2d(3, 64, kernel_size=7, stride=2, padding=3).eval()
        >>> m(torch.randn(1, 3, 32, 32)).shape
        torch.Size([1, 64, 16, 16])
    """

    def __init__(self, in_channels, out_channels, **kwargs):
        super().__init__()
        self.conv = nn.Conv2d(in_channels, out_channels, bias=False, **kwargs)
        self.bn = nn.BatchNorm2d(out_channels, eps=0.001)

    def graph_in_channels(self):
        return self.conv.in_channels

    def graph(self):
        return BlockGraph([ConvNode(self.conv, self.bn)], [0], self.conv.in_channels)


class FusedInception(FusedBlock):
    """GoogLeNet's Inception block in 2 launches (eval): drop-in for torchvision.models.googlenet.Inception.

    Stage 1 is one GEMM over the block input for the three 1x1 convs that read it (branch1,
    branch2's and branch3's reductions) plus the pool branch's 1x1 with its 3x3 max pool fused
    into the load; stage 2 runs both 3x3 convs. Every result is written into its channel slice
    of the output, so there is no torch.cat.

    Args: as torchvision's `Inception(in_channels, ch1x1, ch3x3red, ch3x3, ch5x5red, ch5x5,
    pool_proj, conv_block=None)`; `conv_block` must build BasicConv2d-style units.

    Example:
        >>> block = FusedInception(192, 64, 96, 128, 16, 32, 32).eval()
        >>> block.load_state_dict(torchvision_block.state_dict())   # same keys
        >>> with torch.no_grad():
        ...     y = block(x)   # x: (N, 192, H, W), NCHW or channels_last
    """

    def __init__(self, in_channels, ch1x1, ch3x3red, ch3x3, ch5x5red, ch5x5, pool_proj, conv_block=None):
        super().__init__()
        if conv_block is None:
            conv_block = BasicConv2d
        self.in_channels = in_channels
        self.branch1 = conv_block(in_channels, ch1x1, kernel_size=1)
        self.branch2 = nn.Sequential(
            conv_block(in_channels, ch3x3red, kernel_size=1), conv_block(ch3x3red, ch3x3, kernel_size=3, padding=1)
        )
        self.branch3 = nn.Sequential(
            conv_block(in_channels, ch5x5red, kernel_size=1),
            # torchvision's "5x5" branch is a 3x3 conv (a known quirk kept for weight compatibility).
            conv_block(ch5x5red, ch5x5, kernel_size=3, padding=1),
        )
        self.branch4 = nn.Sequential(
            nn.MaxPool2d(kernel_size=3, stride=1, padding=1, ceil_mode=True),
            conv_block(in_channels, pool_proj, kernel_size=1),
        )
        self.graph()  # fail at construction, not at the first forward, if conv_block is unknown

    def graph_in_channels(self):
        return self.in_channels

    def graph(self):
        def node(unit, src=None, pool=None):
            conv, bn = _conv_unit(unit)
            return ConvNode(conv, bn, relu=True, src=src, pool=pool)

        nodes = [
            node(self.branch1),  # 0
            node(self.branch2[0]),  # 1
            node(self.branch2[1], src=1),  # 2
            node(self.branch3[0]),  # 3
            node(self.branch3[1], src=3),  # 4
            node(self.branch4[1], pool=self.branch4[0]),  # 5
        ]
        return BlockGraph(nodes, outputs=[0, 2, 4, 5], in_channels=self.in_channels)


class InceptionAux(nn.Module):
    """GoogLeNet's auxiliary classifier (training only), as torchvision's: same keys."""

    def __init__(self, in_channels, num_classes, conv_block=None, dropout=0.7):
        super().__init__()
        if conv_block is None:
            conv_block = BasicConv2d
        self.conv = conv_block(in_channels, 128, kernel_size=1)
        self.fc1 = nn.Linear(2048, 1024)
        self.fc2 = nn.Linear(1024, num_classes)
        self.dropout = nn.Dropout(p=dropout)

    def forward(self, x):
        x = F.adaptive_avg_pool2d(x, (4, 4))
        x = self.conv(x)
        x = torch.flatten(x, 1)
        x = F.relu(self.fc1(x), inplace=True)
        x = self.dropout(x)
        return self.fc2(x)
