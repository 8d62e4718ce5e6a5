"""Block plans: a block's branches turned into stages of the grouped convolution kernel.

A block is described as a small graph (`BlockGraph`): conv nodes, each `conv -> BN? -> ReLU?`,
reading either the block input (optionally through a 3x3 stride-1 pool) or another node's
result, and a list of output nodes concatenated along channels in that order. `build_plan`
groups the nodes by depth (one stage per depth: one launch), merges nodes of one stage that read
the same source with the same geometry into one GEMM (weights concatenated along output
channels), folds BatchNorm and conv bias into a per-channel scale and shift, and assigns every
node a channel slice: of the block output if it is an output node, of the `mid` buffer otherwise.

A plan is plain data built outside `forward`; `blocks.FusedBlock` caches it and rebuilds it when
a parameter or buffer changes.
"""

from dataclasses import dataclass, field
from typing import Optional

import torch
from torch import nn
import torch.nn.functional as F

from fused_inception.kernels import conv as kconv


class UnsupportedBlock(ValueError):
    """The block's graph has something the stage kernel can't compute (the reason says what)."""


@dataclass
class ConvNode:
    """`relu(bn(conv(pool(src))))` with each part optional but the conv.

    `src` is the index of the node whose output this one reads, or None for the block input.
    `pool` is a pooling module applied to the source first (only 3x3, stride 1, padding 1 fuse).
    """

    conv: nn.Conv2d
    bn: Optional[nn.BatchNorm2d] = None
    relu: bool = True
    src: Optional[int] = None
    pool: Optional[nn.Module] = None


@dataclass
class BlockGraph:
    """Nodes plus the output nodes in `torch.cat(..., dim=1)` order."""

    nodes: list
    outputs: list
    in_channels: int

    def eager(self, x):
        """The reference math with torch ops (eval and train), i.e. what the unfused block computes."""
        results = []
        for node in self.nodes:
            y = x if node.src is None else results[node.src]
            if node.pool is not None:
                y = node.pool(y)
            y = node.conv(y)
            if node.bn is not None:
                y = node.bn(y)
            if node.relu:
                y = F.relu(y)
            results.append(y)
        if len(self.outputs) == 1:
            return results[self.outputs[0]]
        return torch.cat([results[i] for i in self.outputs], 1)


def pool_kind(pool):
    """The kernel's pre-pool code for a pooling module, or raise UnsupportedBlock."""
    if pool is None:
        return kconv.POOL_NONE

    def pair(v):
        return tuple(v) if isinstance(v, (tuple, list)) else (v, v)

    if isinstance(pool, (nn.MaxPool2d, nn.AvgPool2d)):
        stride = pair(pool.stride if pool.stride is not None else pool.kernel_size)
        geometry = (pair(pool.kernel_size), stride, pair(pool.padding))
        # ceil_mode changes nothing at stride 1.
        if geometry != ((3, 3), (1, 1), (1, 1)):
            raise UnsupportedBlock(f"pool {pool} is not 3x3/stride 1/padding 1")
        if isinstance(pool, nn.MaxPool2d):
            if pair(pool.dilation) != (1, 1) or pool.return_indices:
                raise UnsupportedBlock(f"pool {pool} has dilation or returns indices")
            return kconv.POOL_MAX
        if pool.divisor_override is not None:
            raise UnsupportedBlock(f"pool {pool} has a divisor_override")
        return kconv.POOL_AVG if pool.count_include_pad else kconv.POOL_AVG_EXCLUDE_PAD
    raise UnsupportedBlock(f"pool {type(pool).__name__} is not a MaxPool2d/AvgPool2d")


def _check_node(i, node, cin):
    conv = node.conv
    if not isinstance(conv, nn.Conv2d) or type(conv).forward is not nn.Conv2d.forward:
        raise UnsupportedBlock(f"node {i}: {type(conv).__name__} is not a plain nn.Conv2d")
    if conv.groups != 1:
        raise UnsupportedBlock(f"node {i}: groups {conv.groups} not supported")
    if tuple(conv.dilation) != (1, 1):
        raise UnsupportedBlock(f"node {i}: dilation {tuple(conv.dilation)} not supported")
    if isinstance(conv.padding, str) or conv.padding_mode != "zeros":
        raise UnsupportedBlock(f"node {i}: padding {conv.padding!r}/{conv.padding_mode} not supported")
    if conv.in_channels != cin:
        raise UnsupportedBlock(f"node {i}: conv expects {conv.in_channels} input channels, its source has {cin}")
    if node.pool is not None and (tuple(conv.kernel_size) != (1, 1) or tuple(conv.stride) != (1, 1)
                                  or tuple(conv.padding) != (0, 0)):
        raise UnsupportedBlock(f"node {i}: a fused pre-pool needs a 1x1/stride 1/padding 0 conv")
    bn = node.bn
    if bn is not None:
        if not isinstance(bn, nn.BatchNorm2d) or type(bn).forward is not nn.BatchNorm2d.forward:
            raise UnsupportedBlock(f"node {i}: {type(bn).__name__} is not a plain nn.BatchNorm2d")
        if not bn.track_running_stats:
            raise UnsupportedBlock(f"node {i}: BatchNorm without running stats normalises with batch statistics")
        if bn.num_features != conv.out_channels:
            raise UnsupportedBlock(f"node {i}: BatchNorm has {bn.num_features} features, conv {conv.out_channels}")


def node_depths(graph):
    depths = []
    for node in graph.nodes:
        depths.append(1 if node.src is None else depths[node.src] + 1)
    return depths


def folded_scale_shift(node):
    """Per-output-channel (scale, shift) in fp32 so that relu?(bn(conv(x) + bias)) = relu?(conv_nobias(x)*scale + shift).

    Follows torch.nn.utils.fusion.fuse_conv_bn_weights, computed in float64.
    """
    conv, bn = node.conv, node.bn
    cout = conv.out_channels
    dev = conv.weight.device
    bias = conv.bias.detach().double() if conv.bias is not None else torch.zeros(cout, dtype=torch.float64, device=dev)
    if bn is None:
        return torch.ones(cout, dtype=torch.float32, device=dev), bias.float()
    gamma = bn.weight.detach().double() if bn.weight is not None else torch.ones_like(bias)
    beta = bn.bias.detach().double() if bn.bias is not None else torch.zeros_like(bias)
    scale = gamma * torch.rsqrt(bn.running_var.detach().double() + bn.eps)
    shift = beta + (bias - bn.running_mean.detach().double()) * scale
    return scale.float(), shift.float()


@dataclass
class Stage:
    """One launch: the problem table and the concatenated weights of its convolutions."""

    table: torch.Tensor  # int32 [P, len(kconv.FIELDS)] on the device
    problems: tuple  # ((dst0 buffer, ncols, K), ...) on the host, for the launch grid
    weight: torch.Tensor
    scale: torch.Tensor
    shift: torch.Tensor
    nodes: tuple  # node indices per problem, for reports

    def run(self, x, out, mid):
        kconv.conv_stage(self.table, self.problems, self.weight, self.scale, self.shift, x, out, mid)


@dataclass
class Plan:
    """Everything `forward` needs besides the input: stages, buffer sizes, node geometry."""

    stages: list
    out_channels: int
    mid_channels: int
    geometry: list  # per node: (src, kh, kw, sh, sw, ph, pw)
    outputs: list
    mid_nodes: list
    _sizes: dict = field(default_factory=dict)

    def sizes(self, h, w):
        """((out_h, out_w), (mid_h, mid_w)) for an input of spatial size h x w; raises if they disagree."""
        key = (h, w)
        if key not in self._sizes:
            hw = []
            for src, kh, kw, sh, sw, ph, pw in self.geometry:
                ih, iw = (h, w) if src is None else hw[src]
                oh, ow = (ih + 2 * ph - kh) // sh + 1, (iw + 2 * pw - kw) // sw + 1
                if oh <= 0 or ow <= 0:
                    raise ValueError(f"input of spatial size {h}x{w} is too small for a {kh}x{kw} convolution "
                                     f"(stride {sh}x{sw}, padding {ph}x{pw}) in this block")
                hw.append((oh, ow))
            out_hw = {hw[i] for i in self.outputs}
            if len(out_hw) != 1:
                raise ValueError(f"block outputs have different spatial sizes {sorted(out_hw)} for a {h}x{w} input: "
                                 "torch.cat would fail too")
            mid_hw = {hw[i] for i in self.mid_nodes} or set(out_hw)
            if len(mid_hw) != 1:
                raise ValueError(f"intermediate results have different spatial sizes {sorted(mid_hw)}")
            self._sizes[key] = (out_hw.pop(), mid_hw.pop())
        return self._sizes[key]

    def run(self, x, memory_format):
        """Run every stage on x (logical NCHW, any strides) and return the block output."""
        n = x.shape[0]
        (oh, ow), (mh, mw) = self.sizes(x.shape[2], x.shape[3])
        out = torch.empty((n, self.out_channels, oh, ow), dtype=x.dtype, device=x.device,
                          memory_format=memory_format)
        mid = out
        if self.mid_channels:
            mid = torch.empty((n, self.mid_channels, mh, mw), dtype=x.dtype, device=x.device,
                              memory_format=torch.channels_last)
        for stage in self.stages:
            stage.run(x, out, mid)
        return out


def _merge_key(node):
    c = node.conv
    return (node.src, id(node.pool) if node.pool is not None else None, pool_kind(node.pool),
            tuple(c.kernel_size), tuple(c.stride), tuple(c.padding), node.relu)


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


def build_plan(graph, device, dtype):
    """Build the stages for `graph` with weights on `device` in `dtype` (fp32, fp16 or bf16).

    Raises UnsupportedBlock if some node can't go through the stage kernel.
    """
    nodes = graph.nodes
    couts = [n.conv.out_channels for n in nodes]
    for i, node in enumerate(nodes):
        if node.src is not None and not 0 <= node.src < i:
            raise UnsupportedBlock(f"node {i}: reads node {node.src}, which does not come before it")
        if node.src is not None and node.pool is not None:
            raise UnsupportedBlock(f"node {i}: a pre-pool is only fused on the block input")
        _check_node(i, node, graph.in_channels if node.src is None else couts[node.src])
        pool_kind(node.pool)
    if len(set(graph.outputs)) != len(graph.outputs):
        raise UnsupportedBlock("a node appears twice in the output")

    # Channel slices: output nodes in cat order, the rest in `mid`, allocated stage by stage
    # and group by group so that merged mid-bound nodes are contiguous.
    out_c, c = {}, 0
    for i in graph.outputs:
        out_c[i] = c
        c += couts[i]
    out_channels = c
    depths = node_depths(graph)
    mid_c, mid_channels = {}, 0

    stages = []
    for depth in range(1, max(depths) + 1):
        groups = {}
        for i, node in enumerate(nodes):
            if depths[i] == depth:
                groups.setdefault(_merge_key(node), []).append(i)
        rows, problems, weights, scales, shifts, members = [], [], [], [], [], []
        w_off = ss_off = 0
        for group in groups.values():
            for to_out, to_mid in _problems_of_group(group, out_c, couts):
                for i in to_mid:
                    mid_c[i] = mid_channels
                    mid_channels += couts[i]
                members_p = to_out + to_mid
                first = nodes[members_p[0]]
                conv = first.conv
                kh, kw = conv.kernel_size
                src = first.src
                if src is None:
                    src_buf, src_c, cin = kconv.BUF_X, 0, graph.in_channels
                else:
                    src_buf, src_c = ((kconv.BUF_OUT, out_c[src]) if src in out_c else (kconv.BUF_MID, mid_c[src]))
                    cin = couts[src]
                ncols = sum(couts[i] for i in members_p)
                split = sum(couts[i] for i in to_out)
                dst0 = (kconv.BUF_OUT, out_c[to_out[0]]) if to_out else (kconv.BUF_MID, mid_c[to_mid[0]])
                dst1 = (kconv.BUF_MID, mid_c[to_mid[0]]) if (to_out and to_mid) else dst0
                if not to_out:
                    split = ncols
                row = dict(src=src_buf, src_c=src_c, cin=cin, kh=kh, kw=kw, sh=conv.stride[0], sw=conv.stride[1],
                           ph=conv.padding[0], pw=conv.padding[1], pool=pool_kind(first.pool), ncols=ncols,
                           w_off=w_off, ss_off=ss_off, split=split, dst0=dst0[0], dst0_c=dst0[1], dst1=dst1[0],
                           dst1_c=dst1[1], relu=int(first.relu))
                rows.append([row[f] for f in kconv.FIELDS])
                problems.append((dst0[0], ncols, kh * kw * cin))
                # [Cout, Cin, KH, KW] -> [KH, KW, Cin, Cout] -> [K, Cout], concatenated along Cout.
                w = torch.cat([nodes[i].conv.weight.detach().permute(2, 3, 1, 0).reshape(kh * kw * cin, couts[i])
                               for i in members_p], 1)
                weights.append(w.to(device=device, dtype=dtype).reshape(-1))
                for i in members_p:
                    s, b = folded_scale_shift(nodes[i])
                    scales.append(s)
                    shifts.append(b)
                members.append(tuple(members_p))
                w_off += w.numel()
                ss_off += ncols
        stages.append(Stage(
            table=torch.tensor(rows, dtype=torch.int32, device=device),
            problems=tuple(problems),
            weight=torch.cat(weights).contiguous(),
            scale=torch.cat(scales).to(device=device, dtype=torch.float32),
            shift=torch.cat(shifts).to(device=device, dtype=torch.float32),
            nodes=tuple(members),
        ))
    geometry = [(n.src, *n.conv.kernel_size, *n.conv.stride, *n.conv.padding) for n in nodes]
    return Plan(stages=stages, out_channels=out_channels, mid_channels=mid_channels, geometry=geometry,
                outputs=list(graph.outputs), mid_nodes=sorted(mid_c))
