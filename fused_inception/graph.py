"""A block as the kernels see it: a small graph of `pool? -> conv -> BN? -> activation?` nodes.

A block is described as a `BlockGraph` of nodes (`ConvNode`: `pool? -> conv -> BN? -> act?`,
the activation one of `Activation`'s), each reading either the block
input or another node's result, and a list of output nodes concatenated along channels in that
order, with an optional residual head (Inception-ResNet). `pattern.py` recognises one from a
module's traced forward; `check_graph` says whether the stage kernel can compute it; plan.py
turns it into stages.
"""

from dataclasses import dataclass
from typing import Optional

import torch
from torch import nn
import torch.nn.functional as F

from fused_inception import norms
from fused_inception.activations import RELU, Activation
from fused_inception.kernels import conv as kconv


class UnsupportedBlock(ValueError):
    """The block's graph has something the stage kernel can't compute (the reason says what)."""



def _pair(v):
    return tuple(v) if isinstance(v, (tuple, list)) else (v, v)


@dataclass(frozen=True)
class PoolSpec:
    """A 2-D max or average pool, as F.max_pool2d / F.avg_pool2d take it."""

    kind: str  # "max" or "avg"
    kernel: tuple
    stride: tuple
    padding: tuple = (0, 0)
    ceil_mode: bool = False
    count_include_pad: bool = True

    @staticmethod
    def make(kind, kernel_size, stride=None, padding=0, dilation=1, ceil_mode=False, return_indices=False,
             count_include_pad=True, divisor_override=None):
        """Validate F.max_pool2d/F.avg_pool2d arguments (raise UnsupportedBlock) and build the spec."""
        kernel = _pair(kernel_size)
        stride = _pair(stride) if stride not in (None, [], ()) else kernel
        if _pair(dilation) != (1, 1) or return_indices or divisor_override is not None:
            raise UnsupportedBlock(f"{kind} pool with dilation, return_indices or divisor_override")
        if kind == "avg" and ceil_mode and stride != (1, 1):
            raise UnsupportedBlock("average pool with ceil_mode and stride > 1")
        if any(p > k // 2 for p, k in zip(_pair(padding), kernel)):
            raise UnsupportedBlock(f"{kind} pool padding {padding} is more than half its kernel {kernel} "
                                   "(PyTorch refuses it too)")
        return PoolSpec(kind, kernel, stride, _pair(padding), bool(ceil_mode), bool(count_include_pad))

    @staticmethod
    def from_module(m):
        if type(m) is nn.MaxPool2d:
            return PoolSpec.make("max", m.kernel_size, m.stride, m.padding, m.dilation, m.ceil_mode,
                                 m.return_indices)
        if type(m) is nn.AvgPool2d:
            return PoolSpec.make("avg", m.kernel_size, m.stride, m.padding, 1, m.ceil_mode, False,
                                 m.count_include_pad, m.divisor_override)
        raise UnsupportedBlock(f"{type(m).__name__} is not a MaxPool2d/AvgPool2d")

    def apply(self, x):
        if self.kind == "max":
            return F.max_pool2d(x, self.kernel, self.stride, self.padding, 1, self.ceil_mode)
        return F.avg_pool2d(x, self.kernel, self.stride, self.padding, self.ceil_mode, self.count_include_pad)

    def code(self):
        if self.kind == "max":
            return kconv.POOL_MAX
        return kconv.POOL_AVG if self.count_include_pad else kconv.POOL_AVG_EXCLUDE_PAD

    def out_size(self, h, w):
        return tuple(_pool_out(n, k, s, p, self.ceil_mode)
                     for n, k, s, p in zip((h, w), self.kernel, self.stride, self.padding))


def _pool_out(n, k, s, p, ceil_mode):
    """Output length of a pool, as ATen computes it (a last window must start inside the input)."""
    out = (n + 2 * p - k + ((s - 1) if ceil_mode else 0)) // s + 1
    if ceil_mode and (out - 1) * s >= n + p:
        out -= 1
    return out


@dataclass
class ConvNode:
    """`act?(bn?(conv(pool?(src))))`, or `pool(src)` alone when conv is None.

    `src` is the index of the node whose output this one reads, or None for the block input.
    """

    conv: Optional[nn.Conv2d]
    bn: Optional[nn.BatchNorm2d] = None
    act: Optional[Activation] = RELU
    src: Optional[int] = None
    pool: Optional[PoolSpec] = None


@dataclass
class ResidualHead:
    """Inception-ResNet's end of block: act?(bn?(shortcut(x) + scale * conv(cat))).

    `shortcut` is None for the identity (Inception-ResNet-v1/v2: x itself) or a 1x1 stride-1
    convolution (a projection shortcut, as some write-ups draw the block), `bn` an optional
    BatchNorm after the add. `scale` is a Python number, a one-element tensor, or a function
    returning the tensor a module holds now (a buffer: what `torch.func.functional_call` swaps);
    `current_scale()` reads it when a plan is built.
    """

    conv: nn.Conv2d
    scale: object = 1.0
    act: Optional[Activation] = RELU
    shortcut: Optional[nn.Conv2d] = None
    bn: Optional[nn.Module] = None

    @property
    def out_channels(self):
        return self.conv.out_channels

    def current_scale(self):
        return self.scale() if callable(self.scale) else self.scale


@dataclass
class BlockGraph:
    """Nodes plus the output nodes in `torch.cat(..., dim=1)` order, and an optional residual head
    that turns the concatenation into `act?(x + scale * conv(cat))`."""

    nodes: list
    outputs: list
    in_channels: int
    head: Optional[ResidualHead] = None

    def node_results(self, x):
        """Every node's result for the block input x, with torch ops (eval and train)."""
        results = []
        for node in self.nodes:
            y = x if node.src is None else results[node.src]
            if node.pool is not None:
                y = node.pool.apply(y)
            if node.conv is not None:
                y = node.conv(y)
            if node.bn is not None:
                y = node.bn(y)
            if node.act is not None and not norms.applies_act(node.bn):
                y = node.act(y)
            results.append(y)
        return results

    def eager(self, x):
        """The graph's math with torch ops (eval and train): what the unfused block computes."""
        results = self.node_results(x)
        y = results[self.outputs[0]] if len(self.outputs) == 1 else torch.cat([results[i] for i in self.outputs], 1)
        if self.head is not None:
            head = self.head
            y = head.conv(y) * head.current_scale() + (x if head.shortcut is None else head.shortcut(x))
            if head.bn is not None:
                y = head.bn(y)
            if head.act is not None and not norms.applies_act(head.bn):
                y = head.act(y)
        return y

    def channels(self):
        """Output channels of every node."""
        out = []
        for node in self.nodes:
            cin = self.in_channels if node.src is None else out[node.src]
            out.append(node.conv.out_channels if node.conv is not None else cin)
        return out

    def depths(self):
        return depths_of(self.nodes)


def depths_of(nodes):
    """Stage (1-based) of each node: one more than its source's, 1 for nodes reading the input.
    Works on anything with a `src` index (ConvNode, pattern.NodeRecipe)."""
    depths = []
    for node in nodes:
        depths.append(1 if node.src is None else depths[node.src] + 1)
    return depths


def _check_node(i, node, cin):
    conv, bn = node.conv, node.bn
    if conv is None:
        if node.pool is None or bn is not None or node.act is not None:
            raise UnsupportedBlock(f"node {i}: a node without conv must be a pool alone")
        return
    if type(conv) is not nn.Conv2d:
        raise UnsupportedBlock(f"node {i}: {type(conv).__name__} is not a plain nn.Conv2d")
    if conv.groups != 1:
        raise UnsupportedBlock(f"node {i}: groups {conv.groups} not supported")
    if tuple(conv.dilation) != (1, 1):
        raise UnsupportedBlock(f"node {i}: dilation {max(conv.dilation)} not supported")
    if isinstance(conv.padding, str) or conv.padding_mode != "zeros":
        raise UnsupportedBlock(f"node {i}: padding {conv.padding!r}/{conv.padding_mode} not supported")
    if conv.in_channels != cin:
        raise UnsupportedBlock(f"node {i}: conv expects {conv.in_channels} input channels, its source has {cin}")
    if node.pool is not None and (tuple(conv.kernel_size) != (1, 1) or tuple(conv.stride) != (1, 1)
                                  or tuple(conv.padding) != (0, 0)):
        raise UnsupportedBlock(f"node {i}: a fused pre-pool needs a 1x1/stride 1/padding 0 conv")
    if bn is not None:
        reason = norms.unsupported_reason(bn)  # plain, timm's norm + act, frozen (see norms)
        if reason is not None:
            raise UnsupportedBlock(f"node {i}: {reason}")
        if norms.num_features(bn) != conv.out_channels:
            raise UnsupportedBlock(f"node {i}: BatchNorm has {norms.num_features(bn)} features, "
                                   f"conv {conv.out_channels}")


def geometry_of(graph):
    """Per node: (src, pool spec or None, conv (kh, kw, sh, sw, ph, pw) or None)."""
    return [(n.src, n.pool, None if n.conv is None else (*n.conv.kernel_size, *n.conv.stride, *n.conv.padding))
            for n in graph.nodes]


def node_sizes(geometry, h, w):
    """Spatial size of every node's result for an h x w input."""
    hw = []
    for src, pool, conv in geometry:
        ih, iw = (h, w) if src is None else hw[src]
        if pool is not None:
            ih, iw = pool.out_size(ih, iw)
        if conv is not None:
            kh, kw, sh, sw, ph, pw = conv
            ih, iw = (ih + 2 * ph - kh) // sh + 1, (iw + 2 * pw - kw) // sw + 1
        if ih <= 0 or iw <= 0:
            raise ValueError(f"input of spatial size {h}x{w} is too small for this block "
                             f"(a pool or convolution has no output)")
        hw.append((ih, iw))
    return hw


def output_shape(graph, n, h, w):
    """(N, C, H, W) of the block's output for an n x C x h x w input, without building a plan."""
    channels = graph.channels()
    c = graph.head.out_channels if graph.head is not None else sum(channels[i] for i in graph.outputs)
    oh, ow = node_sizes(geometry_of(graph), h, w)[graph.outputs[0]]
    if graph.head is not None:
        (kh, kw), (sh, sw), (ph, pw) = graph.head.conv.kernel_size, graph.head.conv.stride, graph.head.conv.padding
        oh, ow = (oh + 2 * ph - kh) // sh + 1, (ow + 2 * pw - kw) // sw + 1
    return (n, c, oh, ow)


def check_graph(graph):
    """Raise UnsupportedBlock (with the reason) if some node can't go through the stage kernel."""
    nodes = graph.nodes
    if not graph.outputs:
        raise UnsupportedBlock("the block has no output")
    for i, node in enumerate(nodes):
        if node.src is not None and not 0 <= node.src < i:
            raise UnsupportedBlock(f"node {i}: reads node {node.src}, which does not come before it")
        if node.src is not None and node.pool is not None:
            raise UnsupportedBlock(f"node {i}: a pool is only fused on the block input")
    couts = graph.channels()
    for i, node in enumerate(nodes):
        _check_node(i, node, graph.in_channels if node.src is None else couts[node.src])
    if len(set(graph.outputs)) != len(graph.outputs):
        raise UnsupportedBlock("a branch output appears twice in the concatenation")
    head = graph.head
    if head is not None:
        _check_node("head", ConvNode(head.conv, head.bn, head.act), sum(couts[i] for i in graph.outputs))
        if head.shortcut is not None:
            _check_node("shortcut", ConvNode(head.shortcut, None, None), graph.in_channels)
            sc = head.shortcut
            if (tuple(sc.kernel_size), tuple(sc.stride), tuple(sc.padding)) != ((1, 1), (1, 1), (0, 0)):
                raise UnsupportedBlock("residual head: a projection shortcut must be a 1x1/stride 1/padding 0 conv")
            if sc.out_channels != head.conv.out_channels:
                raise UnsupportedBlock(f"residual head: the shortcut gives {sc.out_channels} channels, "
                                       f"the up-projection {head.conv.out_channels}")
        elif head.conv.out_channels != graph.in_channels:
            raise UnsupportedBlock(f"residual head: conv gives {head.conv.out_channels} channels, "
                                   f"the block input has {graph.in_channels}")
        if isinstance(head.current_scale(), torch.Tensor) and head.current_scale().numel() != 1:
            raise UnsupportedBlock("residual head: the scale is a tensor of more than one element")
