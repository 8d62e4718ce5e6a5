"""Block plans: a block's branches turned into stages of the grouped convolution kernel.

A block is described as a small graph (`BlockGraph`) of nodes, each `pool? -> conv -> BN? ->
ReLU?` (or a pool alone), reading either the block input or another node's result, and a list of
output nodes concatenated along channels in that order. `build_plan` groups the nodes by depth
(one stage per depth: one launch), merges nodes of one stage that read the same source with the
same geometry into one GEMM (weights concatenated along output channels), folds BatchNorm and
conv bias into a per-channel scale and shift, and assigns every node a channel slice: of the
block output if it is an output node, of the `mid` buffer otherwise.

A plan is plain data built outside `forward`; `blocks.FusedBlock` caches it and rebuilds it when
a parameter or buffer changes.
"""

from dataclasses import dataclass, field
from typing import Optional

import torch
from torch import nn
import torch.nn.functional as F

from fused_inception import norms
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
    """`relu?(bn?(conv(pool?(src))))`, or `pool(src)` alone when conv is None.

    `src` is the index of the node whose output this one reads, or None for the block input.
    """

    conv: Optional[nn.Conv2d]
    bn: Optional[nn.BatchNorm2d] = None
    relu: bool = True
    src: Optional[int] = None
    pool: Optional[PoolSpec] = None


@dataclass
class ResidualHead:
    """Inception-ResNet's end of block: relu?(bn?(shortcut(x) + scale * conv(cat))).

    `shortcut` is None for the identity (Inception-ResNet-v1/v2: x itself) or a 1x1 stride-1
    convolution (a projection shortcut, as some write-ups draw the block), `bn` an optional
    BatchNorm after the add. `scale` is a Python number, a one-element tensor, or a function
    returning the tensor a module holds now (a buffer: what `torch.func.functional_call` swaps);
    `current_scale()` reads it when a plan is built.
    """

    conv: nn.Conv2d
    scale: object = 1.0
    relu: bool = True
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
    that turns the concatenation into `relu?(x + scale * conv(cat))`."""

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
            if node.relu:
                y = F.relu(y)
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
            if head.relu:
                y = F.relu(y)
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
        if node.pool is None or bn is not None or node.relu:
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


def folded_scale_shift(node, cout, device):
    """Per-output-channel fp32 (scale, shift) with relu?(bn(conv(x) + bias)) = relu?(conv_nobias(x)*scale + shift).

    The math of torch.nn.utils.fusion.fuse_conv_bn_weights, computed in float64.
    """
    conv, bn = node.conv, node.bn
    bias = torch.zeros(cout, dtype=torch.float64, device=device)
    if conv is not None and conv.bias is not None:
        bias = conv.bias.detach().double()
    if bn is None:
        return torch.ones(cout, dtype=torch.float32, device=device), bias.float()
    gamma = bn.weight.detach().double() if bn.weight is not None else torch.ones_like(bias)
    beta = bn.bias.detach().double() if bn.bias is not None else torch.zeros_like(bias)
    scale = gamma * torch.rsqrt(bn.running_var.detach().double() + bn.eps)
    shift = beta + (bias - bn.running_mean.detach().double()) * scale
    return scale.float(), shift.float()


def head_scale_shift(head, device):
    """((scale, shift) of the up-projection, (scale, shift) of the projection shortcut), fp32,
    such that the head's result is relu?(conv_nobias(cat) * scale + shift + residual) with the
    residual x itself, or conv_nobias(x) * sc_scale + sc_shift for a projection shortcut.

    With a BatchNorm after the add (a = gamma / sqrt(var + eps), b = beta - mean * a):
    bn(s * (up + up_bias) + sc) = (a s) up + (a s up_bias + b) + a sc, and a sc is what the
    shortcut's problem stores. Computed in float64."""
    cout = head.out_channels
    s = float(head.current_scale())

    def bias(conv):
        if conv is not None and conv.bias is not None:
            return conv.bias.detach().double()
        return torch.zeros(cout, dtype=torch.float64, device=device)

    a = torch.ones(cout, dtype=torch.float64, device=device)
    b = torch.zeros(cout, dtype=torch.float64, device=device)
    if head.bn is not None:
        bn = head.bn
        gamma = bn.weight.detach().double() if bn.weight is not None else a
        beta = bn.bias.detach().double() if bn.bias is not None else b
        a = gamma * torch.rsqrt(bn.running_var.detach().double() + bn.eps)
        b = beta - bn.running_mean.detach().double() * a
    up = (a * s).float(), (a * s * bias(head.conv) + b).float()
    return up, (a.float(), (a * bias(head.shortcut)).float())


# A problem's description, as the layout builds it (buffers and channel slices: columns < split
# go to dst0 at channel dst0_c, the rest to dst1 at dst1_c; a pool-only problem has gemm 0).
ROW_DEFAULTS = dict(src=kconv.BUF_X, src_c=0, cin=0, kh=1, kw=1, sh=1, sw=1, ph=0, pw=0, pool=kconv.POOL_NONE,
                    pkh=1, pkw=1, psh=1, psw=1, pph=0, ppw=0, gemm=1, ncols=0, split=0, dst0=kconv.BUF_OUT,
                    dst0_c=0, dst1=kconv.BUF_OUT, dst1_c=0, res=kconv.RES_NONE, res_c=0, relu=0, bn=0)


def power_of_two_dividing(*values, cap=8):
    """The largest power of two <= cap dividing every value (what the kernel may assume about them)."""
    a = cap
    for v in values:
        while v % a:
            a //= 2
    return a


# A convolution with fewer input channels than this runs its K loop over (tap, channel) pairs
# (kconv.KIND_GEMM_FLAT): a stem's 3 channels would fill a 64-wide K chunk per tap to 5%. From 8
# channels on, a tap's channels are 16 bytes: the pipelined per-tap loop with masks serves better.
FLAT_K_BELOW = 8


def problem_spec(row, channels, walign):
    """The kernel's compile-time description of a problem (kconv.problem_spec) from its row.

    channels: total channels of each buffer ({BUF_X: ..., BUF_OUT: ..., BUF_MID: ...}), from which
    the channel-last row pitches follow; walign: what divides the problem's weight offset and pitch."""
    split = row["split"] < row["ncols"]
    written = [row["ncols"], channels[row["dst0"]], row["dst0_c"]]
    if split:
        written += [row["split"], channels[row["dst1"]], row["dst1_c"]]
    touched = [channels[row["src"]], row["src_c"], row["cin"]] + written
    if row["res"] == kconv.RES_X:
        touched.append(channels[kconv.BUF_X])
    elif row["res"] == kconv.RES_MID:
        touched += [channels[kconv.BUF_MID], row["res_c"]]
    if not row["gemm"]:
        kind = kconv.KIND_POOL
    elif row["pool"]:
        kind = kconv.KIND_POOLED_GEMM
    elif row["cin"] < FLAT_K_BELOW and row["kh"] * row["kw"] > 1:
        kind = kconv.KIND_GEMM_FLAT
    else:
        kind = kconv.KIND_GEMM
    return kconv.problem_spec(
        kind=kind, src=row["src"], dst0=row["dst0"], dst1=row["dst1"], split=split, kh=row["kh"], kw=row["kw"],
        sh=row["sh"], sw=row["sw"], ph=row["ph"], pw=row["pw"], pool=row["pool"], pkh=row["pkh"], pkw=row["pkw"],
        psh=row["psh"], psw=row["psw"], pph=row["pph"], ppw=row["ppw"], res=row["res"], relu=row["relu"],
        bn=row["bn"], align=power_of_two_dividing(*touched), walign=walign, dalign=power_of_two_dividing(*written))


def table_row(row, w_off, w_ld, ss_off):
    """The problem's runtime fields (kconv.TABLE_FIELDS)."""
    values = dict(row, w_off=w_off, w_ld=w_ld, ss_off=ss_off)
    return [int(values[f]) for f in kconv.TABLE_FIELDS]


@dataclass
class Stage:
    """One launch: the compile-time spec and the table of its problems, and their packed weights."""

    spec: tuple  # kconv.problem_spec per problem (constexpr)
    table: torch.Tensor  # int32 [P, len(kconv.TABLE_FIELDS)] on the device
    ncols: tuple  # output columns per problem (host: the launch grid)
    depth: tuple  # GEMM depth kh*kw*cin per problem (host: the autotune key)
    weight: torch.Tensor
    scale: torch.Tensor
    shift: torch.Tensor
    nodes: tuple  # node indices per problem, for reports

    def run(self, x, out, mid):
        kconv.conv_stage(self.spec, self.table, self.ncols, self.depth, self.weight, self.scale, self.shift,
                         x, out, mid)


@dataclass
class Problem:
    """One GEMM of a stage (or one pool alone): its member nodes in column order and the fields of
    its table row that don't depend on how weights are laid out."""

    members: tuple  # node indices, or ("head",) / ("shortcut",) for the residual head's convolutions
    convs: tuple  # the members' nn.Conv2d (empty for a pool alone)
    bns: tuple  # the members' BatchNorm or None
    couts: tuple  # the members' output channels
    row: dict  # every ROW_DEFAULTS field (buffers, channel slices, geometry, pool, epilogue)
    k: int  # GEMM depth kh*kw*cin (for a pool alone: its taps)
    scale: float = 1.0  # the residual head's scale

    @property
    def ncols(self):
        return self.row["ncols"]

    @property
    def gemm(self):
        return bool(self.row["gemm"])


@dataclass
class Layout:
    """A block's stages, channel slices and geometry: everything about the plan but tensors."""

    stages: list  # per stage, a list of Problem
    out_channels: int
    mid_channels: int
    geometry: list  # per node: (src, pool spec or None, conv (kh, kw, sh, sw, ph, pw) or None)
    outputs: list
    mid_nodes: list
    head: Optional[tuple] = None  # residual head conv (kh, kw, sh, sw, ph, pw)
    _sizes: dict = field(default_factory=dict)

    def buffer_channels(self, in_channels):
        """Channels of each of the stage kernel's buffers (kconv.BUF_*) for a block input of
        `in_channels`."""
        return {kconv.BUF_X: in_channels, kconv.BUF_OUT: self.out_channels, kconv.BUF_MID: self.mid_channels}

    def node_sizes(self, h, w):
        """Spatial size of every node's result for an h x w input."""
        return node_sizes(self.geometry, h, w)

    def sizes(self, h, w):
        """((out_h, out_w), (mid_h, mid_w)) for an input of spatial size h x w; raises if they disagree."""
        key = (h, w)
        if key not in self._sizes:
            hw = self.node_sizes(h, w)
            out_hw = {hw[i] for i in self.outputs}
            if len(out_hw) != 1:
                raise ValueError(f"block outputs have different spatial sizes {sorted(out_hw)} for a {h}x{w} input: "
                                 "torch.cat would fail too")
            mid_hw = {hw[i] for i in self.mid_nodes} or set(out_hw)
            if len(mid_hw) != 1:
                raise ValueError(f"intermediate results have different spatial sizes {sorted(mid_hw)}")
            out_hw = out_hw.pop()
            if self.head is not None:
                kh, kw, sh, sw, ph, pw = self.head
                out_hw = ((out_hw[0] + 2 * ph - kh) // sh + 1, (out_hw[1] + 2 * pw - kw) // sw + 1)
                if out_hw != (h, w):
                    raise ValueError(f"residual block: the branch result is {out_hw[0]}x{out_hw[1]}, "
                                     f"the input {h}x{w}: x + scale * up would fail too")
            self._sizes[key] = (out_hw, mid_hw.pop())
        return self._sizes[key]

    def buffers(self, x, dtype, memory_format):
        """Empty (out, mid) for input x: the block output in `memory_format`, the intermediate
        results channels_last (`mid` is `out` when the block has none)."""
        n = x.shape[0]
        (oh, ow), (mh, mw) = self.sizes(x.shape[2], x.shape[3])
        out = torch.empty((n, self.out_channels, oh, ow), dtype=dtype, device=x.device, memory_format=memory_format)
        mid = out
        if self.mid_channels:
            mid = torch.empty((n, self.mid_channels, mh, mw), dtype=dtype, device=x.device,
                              memory_format=torch.channels_last)
        return out, mid


@dataclass
class Plan:
    """Everything an inference `forward` needs besides the input: the layout and the stages with
    their weights in kernel layout and BatchNorm folded; per input shape and layout, the stages'
    launches (kconv.StageLaunch), worked out on the first call with that input."""

    layout: Layout
    stages: list
    _by_input: dict = field(default_factory=dict)

    @property
    def out_channels(self):
        return self.layout.out_channels

    @property
    def mid_channels(self):
        return self.layout.mid_channels

    def node_sizes(self, h, w):
        return self.layout.node_sizes(h, w)

    def sizes(self, h, w):
        return self.layout.sizes(h, w)

    def run(self, x, memory_format=None):
        """Run every stage on x (logical NCHW, any strides) and return the block output, in
        `memory_format` (default: the one eager convolutions would return for x)."""
        entry = self._by_input.get((x.shape, x.stride(), memory_format))
        if entry is None:
            entry = self._prepare(x, memory_format)
        out_alloc, mid_alloc, launches = entry
        out = torch.empty(out_alloc[0], **out_alloc[1])
        mid = out if mid_alloc is None else torch.empty(mid_alloc[0], **mid_alloc[1])
        for launch in launches:
            launch(x, out, mid)
        return out

    def _prepare(self, x, requested):
        memory_format = output_memory_format(x) if requested is None else requested
        out, mid = self.layout.buffers(x, x.dtype, memory_format)
        if x.shape[0] == 0:
            launches = ()
        else:
            launches = tuple(kconv.StageLaunch(s.spec, s.table, s.ncols, s.depth, s.weight, s.scale, s.shift, x, out,
                                               mid) for s in self.stages)
        def alloc(t, fmt):  # torch.empty's arguments
            return (t.shape, dict(memory_format=fmt, dtype=x.dtype, device=x.device))

        entry = (alloc(out, memory_format), None if mid is out else alloc(mid, torch.channels_last), launches)
        if len(self._by_input) >= 16:  # inputs of many shapes: keep the latest
            self._by_input.clear()
        self._by_input[(x.shape, x.stride(), requested)] = entry
        return entry

    def launches(self):
        """The StageLaunches prepared so far (all input shapes)."""
        return [launch for entry in self._by_input.values() for launch in entry[2]]


def output_memory_format(x):
    """The memory format eager convolutions return for x: channels_last when x's strides are
    ordered as channels_last's (ATen's suggest_memory_format: a channel slice of a channels_last
    tensor too), unless x is also plain contiguous (an N x C x 1 x 1 map is both)."""
    if x.is_contiguous():
        return torch.contiguous_format
    sizes, strides = x.shape, x.stride()
    least = 0
    for d in (1, 3, 2, 0):  # (ATen's is_channels_last_strides_2d_s4)
        if sizes[d] == 0 or strides[d] < least or (d == 0 and least == strides[1]) or strides[1] == 0:
            return torch.contiguous_format
        least = strides[d] * max(sizes[d], 1)
    return torch.channels_last


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


def _merge_key(i, node):
    """Nodes of one stage with equal keys become one GEMM."""
    if node.conv is None:
        return ("pool only", i)
    c = node.conv
    return (node.src, node.pool, tuple(c.kernel_size), tuple(c.stride), tuple(c.padding), node.relu,
            node.bn is not None)


def _problems_of_group(group, out_c, couts):
    """Split a group of mergeable nodes into problems of at most two destinations: the output-bound
    nodes of a problem must be one contiguous run of output channels (dst0); the mid-bound nodes,
    allocated by the caller right after, ride along with the first run (dst1)."""
    to_out = sorted((i for i in group if i in out_c), key=lambda i: out_c[i])
    to_mid = [i for i in group if i not in out_c]
    runs = []
    for i in to_out:
        if runs and out_c[runs[-1][-1]] + couts[runs[-1][-1]] == out_c[i]:
            runs[-1].append(i)
        else:
            runs.append([i])
    if not runs:
        return [([], to_mid)]
    return [(runs[0], to_mid)] + [(run, []) for run in runs[1:]]


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
        _check_node("head", ConvNode(head.conv, head.bn, head.relu), sum(couts[i] for i in graph.outputs))
        if head.shortcut is not None:
            _check_node("shortcut", ConvNode(head.shortcut, None, False), graph.in_channels)
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


def build_layout(graph):
    """Group `graph`'s nodes into stages of problems and give every node its channel slice.

    Raises UnsupportedBlock if some node can't go through the stage kernel.
    """
    check_graph(graph)
    nodes = graph.nodes
    couts = graph.channels()

    # Channel slices: output nodes in cat order (in the block output, or at the start of `mid`
    # when a residual head reads the concatenation), the rest in `mid`, allocated stage by stage
    # and group by group so that merged mid-bound nodes are contiguous.
    cat_buf = kconv.BUF_OUT if graph.head is None else kconv.BUF_MID
    out_c, c = {}, 0
    for i in graph.outputs:
        out_c[i] = c
        c += couts[i]
    cat_channels = c
    depths = graph.depths()
    mid_c, mid_channels = {}, (0 if graph.head is None else cat_channels)
    stages = []
    for depth in range(1, max(depths) + 1):
        groups = {}
        for i, node in enumerate(nodes):
            if depths[i] == depth:
                groups.setdefault(_merge_key(i, node), []).append(i)
        problems = []
        for group in groups.values():
            for to_out, to_mid in _problems_of_group(group, out_c, couts):
                for i in to_mid:
                    mid_c[i] = mid_channels
                    mid_channels += couts[i]
                members = tuple(to_out + to_mid)
                first = nodes[members[0]]
                if first.src is None:
                    src_buf, src_c, cin = kconv.BUF_X, 0, graph.in_channels
                else:
                    src = first.src
                    src_buf, src_c = ((cat_buf, out_c[src]) if src in out_c else (kconv.BUF_MID, mid_c[src]))
                    cin = couts[src]
                ncols = sum(couts[i] for i in members)
                dst0 = (cat_buf, out_c[to_out[0]]) if to_out else (kconv.BUF_MID, mid_c[to_mid[0]])
                dst1 = (kconv.BUF_MID, mid_c[to_mid[0]]) if (to_out and to_mid) else dst0
                split = sum(couts[i] for i in to_out) if to_out else ncols
                row = dict(src=src_buf, src_c=src_c, cin=cin, gemm=int(first.conv is not None), ncols=ncols,
                           split=split, dst0=dst0[0], dst0_c=dst0[1], dst1=dst1[0], dst1_c=dst1[1],
                           relu=int(first.relu), bn=int(first.bn is not None))
                pool = first.pool
                if pool is not None:
                    row.update(pool=pool.code(), pkh=pool.kernel[0], pkw=pool.kernel[1], psh=pool.stride[0],
                               psw=pool.stride[1], pph=pool.padding[0], ppw=pool.padding[1])
                k = pool.kernel[0] * pool.kernel[1] if pool is not None else 1
                if first.conv is not None:
                    conv = first.conv
                    row.update(kh=conv.kernel_size[0], kw=conv.kernel_size[1], sh=conv.stride[0], sw=conv.stride[1],
                               ph=conv.padding[0], pw=conv.padding[1])
                    k = conv.kernel_size[0] * conv.kernel_size[1] * cin
                convs = tuple(nodes[i].conv for i in members) if first.conv is not None else ()
                problems.append(Problem(members, convs, tuple(nodes[i].bn for i in members),
                                        tuple(couts[i] for i in members), dict(ROW_DEFAULTS, **row), k))
        stages.append(problems)
    head = None
    if graph.head is not None:
        conv, cout = graph.head.conv, graph.head.out_channels
        head = (*conv.kernel_size, *conv.stride, *conv.padding)
        kh, kw = conv.kernel_size
        res, res_c = kconv.RES_X, 0
        if graph.head.shortcut is not None:
            # The projection shortcut reads the block input like the branches' first convs: one
            # more problem of the first stage, into a slice of `mid` that the head's epilogue adds.
            res, res_c = kconv.RES_MID, mid_channels
            mid_channels += cout
            row = dict(src=kconv.BUF_X, src_c=0, cin=graph.in_channels, gemm=1, ncols=cout, split=cout,
                       dst0=kconv.BUF_MID, dst0_c=res_c, dst1=kconv.BUF_MID, dst1_c=res_c, relu=0, bn=0)
            stages[0].append(Problem(("shortcut",), (graph.head.shortcut,), (None,), (cout,),
                                     dict(ROW_DEFAULTS, **row), graph.in_channels))
        row = dict(src=kconv.BUF_MID, src_c=0, cin=cat_channels, kh=kh, kw=kw, sh=conv.stride[0], sw=conv.stride[1],
                   ph=conv.padding[0], pw=conv.padding[1], gemm=1, ncols=cout, split=cout, dst0=kconv.BUF_OUT,
                   dst0_c=0, dst1=kconv.BUF_OUT, dst1_c=0, res=res, res_c=res_c, relu=int(graph.head.relu),
                   bn=int(graph.head.bn is not None))
        # A buffer scale is read here, when the layout is built, not per forward.
        stages.append([Problem(("head",), (conv,), (graph.head.bn,), (cout,), dict(ROW_DEFAULTS, **row),
                               kh * kw * cat_channels, float(graph.head.current_scale()))])
    return Layout(stages=stages, out_channels=cat_channels if head is None else graph.head.out_channels,
                  mid_channels=mid_channels, geometry=geometry_of(graph), outputs=list(graph.outputs),
                  mid_nodes=sorted(mid_c) + (list(graph.outputs) if head else []), head=head)


def build_plan(graph, device, dtype):
    """Build the inference stages for `graph` with weights on `device` in `dtype` (fp32, fp16 or
    bf16): BatchNorm and conv bias folded into a per-column scale and shift, each problem's
    weights one [ncols, K] matrix (K ordered (tap, input channel), rows padded to a multiple of
    kconv.W_ALIGN elements) with its convolutions' output channels stacked.

    Raises UnsupportedBlock if some node can't go through the stage kernel.
    """
    layout = build_layout(graph)
    channels = layout.buffer_channels(graph.in_channels)
    stages = []
    for problems in layout.stages:
        rows, specs, weights, scales, shifts = [], [], [], [], []
        w_off = ss_off = 0
        for prob in problems:
            w_ld = 0
            if prob.gemm:
                # [Cout, Cin, KH, KW] -> [Cout, KH, KW, Cin] -> [Cout, K], stacked along Cout, rows padded.
                w = torch.cat([conv.weight.detach().permute(0, 2, 3, 1).reshape(cout, prob.k)
                               for conv, cout in zip(prob.convs, prob.couts)], 0)
                w_ld = -(-prob.k // kconv.W_ALIGN) * kconv.W_ALIGN
                weights.append(F.pad(w, (0, w_ld - prob.k)).to(device=device, dtype=dtype).reshape(-1))
            if prob.members in (("head",), ("shortcut",)):
                up, shortcut = head_scale_shift(graph.head, device)
                s, b = up if prob.members == ("head",) else shortcut
                scales.append(s)
                shifts.append(b)
            else:
                convs = prob.convs or (None,) * len(prob.members)
                for conv, bn, cout in zip(convs, prob.bns, prob.couts):
                    s, b = folded_scale_shift(ConvNode(conv, bn), cout, device)
                    scales.append(s)
                    shifts.append(b)
            rows.append(table_row(prob.row, w_off, w_ld, ss_off))
            specs.append(problem_spec(dict(prob.row, bn=0), channels, kconv.W_ALIGN))
            w_off += prob.ncols * w_ld
            ss_off += prob.ncols
        stages.append(Stage(
            spec=tuple(specs),
            table=torch.tensor(rows, dtype=torch.int32, device=device),
            ncols=tuple(p.ncols for p in problems),
            depth=tuple(p.k for p in problems),
            weight=torch.cat(weights) if weights else torch.zeros(1, dtype=dtype, device=device),
            scale=torch.cat(scales).to(device=device, dtype=torch.float32),
            shift=torch.cat(shifts).to(device=device, dtype=torch.float32),
            nodes=tuple(p.members for p in problems),
        ))
    return Plan(layout=layout, stages=stages)
