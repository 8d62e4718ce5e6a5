"""A block's layout: its graph's nodes grouped into stages of problems, and every node's channel slice.

`build_layout` groups the nodes by depth (one stage per depth: one launch), merges nodes of one
stage that read the same source with the same geometry into one GEMM (`Problem`: weights
concatenated along output channels), and assigns every node a channel slice: of the block
output if it is an output node, of the `mid` buffer otherwise (a residual head reads the
concatenation from `mid`). A pool branch's pool (3x3/s1/p1 before a 1x1) is a problem of its
own in the stage before its 1x1, into `mid`: GoogLeNet's blocks keep their two launches, and
the 1x1 is a plain GEMM. Plain data without tensors: plan.build_stages turns it into the
kernels' stages for inference or training.
"""

import enum
from dataclasses import dataclass, field
from typing import Optional

import torch

from fused_inception.graph import check_graph, geometry_of, node_sizes
from fused_inception.kernels import conv as kconv


# A problem's description, as the layout builds it (buffers and channel slices: columns < split
# go to dst0 at channel dst0_c, the rest to dst1 at dst1_c; a pool-only problem has gemm 0).
ROW_DEFAULTS = dict(src=kconv.BUF_X, src_c=0, cin=0, kh=1, kw=1, sh=1, sw=1, ph=0, pw=0, pool=kconv.POOL_NONE,
                    pkh=1, pkw=1, psh=1, psw=1, pph=0, ppw=0, gemm=1, ncols=0, split=0, dst0=kconv.BUF_OUT,
                    dst0_c=0, dst1=kconv.BUF_OUT, dst1_c=0, res=kconv.RES_NONE, res_c=0, act=kconv.ACT_NONE,
                    slope=0.0, bn=0)


class ProblemKind(enum.Enum):
    """What a problem of a stage computes."""

    BRANCH = "branch"  # branch nodes: one convolution, several merged into one GEMM, or a pool alone
    SHORTCUT = "shortcut"  # the residual head's projection shortcut (into `mid`)
    HEAD = "head"  # the residual head's up-projection of the concatenation, plus the residual


@dataclass
class Problem:
    """One GEMM of a stage (or one pool alone): its member convolutions in column order and the
    fields of its table row that don't depend on how weights are laid out."""

    kind: ProblemKind
    members: tuple  # BRANCH: the node indices, in column order; () for the head's convolutions
    convs: tuple  # the members' nn.Conv2d (empty for a pool alone)
    bns: tuple  # the members' BatchNorm or None
    couts: tuple  # the members' output channels
    row: dict  # every ROW_DEFAULTS field (buffers, channel slices, geometry, pool, epilogue)
    k: int  # GEMM depth kh*kw*cin (for a pool alone: its taps)
    scale: float = 1.0  # the residual head's scale
    pool: object = None  # graph.PoolSpec of a pooled 1x1 or a pool alone

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


def _merge_key(i, node):
    """Nodes of one stage with equal keys become one GEMM."""
    if node.conv is None or _pool_first(node):  # (a pool alone; a 1x1 of its own pool's slice of `mid`)
        return ("alone", i)
    c = node.conv
    return (node.src, node.pool, tuple(c.kernel_size), tuple(c.stride), tuple(c.padding), node.act,
            node.bn is not None)


def _pool_first(node):
    """True for a 1x1 of a pooled input whose pool keeps the spatial size (GoogLeNet's and the
    Inception networks' pool branches: 3x3/s1/p1): the pool runs alone in the stage before, into
    `mid`, and the 1x1 is a plain GEMM of it, a pipelined K loop. Other pooled 1x1s (a strided
    pool: its result would not have `mid`'s size) pool as they load (kconv.KIND_POOLED_GEMM)."""
    pool = node.pool
    return (node.conv is not None and pool is not None and pool.stride == (1, 1)
            and all(k == 2 * p + 1 for k, p in zip(pool.kernel, pool.padding)))


def stages_of(nodes):
    """Stage (1-based) of each node: one more than its source's (1 for the block input's
    readers), and one more for a 1x1 whose pool runs in the stage before (_pool_first)."""
    stages = []
    for node in nodes:
        stages.append((1 if node.src is None else stages[node.src] + 1) + _pool_first(node))
    return stages


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


def _pool_fields(pool):
    """The row fields of a graph.PoolSpec."""
    return dict(pool=pool.code(), pkh=pool.kernel[0], pkw=pool.kernel[1], psh=pool.stride[0], psw=pool.stride[1],
                pph=pool.padding[0], ppw=pool.padding[1])


def _act_fields(act):
    """The row fields of an activations.Activation (None: none)."""
    return dict(act=kconv.ACT_NONE, slope=0.0) if act is None else dict(act=act.kind, slope=act.slope)


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
    depths = stages_of(nodes)
    mid_c, mid_channels = {}, (0 if graph.head is None else cat_channels)
    pool_c = {}  # pool of the input -> its slice of `mid`, for the 1x1 convolutions that read it
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
                pooled = _pool_first(first)
                if pooled:
                    src_buf, src_c, cin = kconv.BUF_MID, pool_c[first.pool], graph.in_channels
                elif first.src is None:
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
                           bn=int(first.bn is not None), **_act_fields(first.act))
                pool = None if pooled else first.pool
                if pool is not None:
                    row.update(_pool_fields(pool))
                k = pool.kernel[0] * pool.kernel[1] if pool is not None else 1
                if first.conv is not None:
                    conv = first.conv
                    row.update(kh=conv.kernel_size[0], kw=conv.kernel_size[1], sh=conv.stride[0], sw=conv.stride[1],
                               ph=conv.padding[0], pw=conv.padding[1])
                    k = conv.kernel_size[0] * conv.kernel_size[1] * cin
                convs = tuple(nodes[i].conv for i in members) if first.conv is not None else ()
                problems.append(Problem(ProblemKind.BRANCH, members, convs, tuple(nodes[i].bn for i in members),
                                        tuple(couts[i] for i in members), dict(ROW_DEFAULTS, **row), k, pool=pool))
        for i, node in enumerate(nodes):
            if depths[i] == depth + 1 and _pool_first(node) and node.pool not in pool_c:
                # the pool of a pooled 1x1, alone into `mid` (the 1x1 reads it in the next stage)
                pool, cin = node.pool, graph.in_channels
                pool_c[pool] = mid_channels
                row = dict(src=kconv.BUF_X, cin=cin, gemm=0, ncols=cin, split=cin, dst0=kconv.BUF_MID,
                           dst0_c=mid_channels, dst1=kconv.BUF_MID, dst1_c=mid_channels, **_pool_fields(pool))
                problems.append(Problem(ProblemKind.BRANCH, (), (), (None,), (cin,), dict(ROW_DEFAULTS, **row),
                                        pool.kernel[0] * pool.kernel[1], pool=pool))
                mid_channels += cin
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
                       dst0=kconv.BUF_MID, dst0_c=res_c, dst1=kconv.BUF_MID, dst1_c=res_c, bn=0)
            stages[0].append(Problem(ProblemKind.SHORTCUT, (), (graph.head.shortcut,), (None,), (cout,),
                                     dict(ROW_DEFAULTS, **row), graph.in_channels))
        row = dict(src=kconv.BUF_MID, src_c=0, cin=cat_channels, kh=kh, kw=kw, sh=conv.stride[0], sw=conv.stride[1],
                   ph=conv.padding[0], pw=conv.padding[1], gemm=1, ncols=cout, split=cout, dst0=kconv.BUF_OUT,
                   dst0_c=0, dst1=kconv.BUF_OUT, dst1_c=0, res=res, res_c=res_c,
                   **_act_fields(graph.head.act),
                   bn=int(graph.head.bn is not None))
        # A buffer scale is read here, when the layout is built, not per forward.
        stages.append([Problem(ProblemKind.HEAD, (), (conv,), (graph.head.bn,), (cout,), dict(ROW_DEFAULTS, **row),
                               kh * kw * cat_channels, float(graph.head.current_scale()))])
    # (the pools in `mid` have the size of the 1x1s that read them: the size checks count those)
    pooled_nodes = [i for i, node in enumerate(nodes) if _pool_first(node)]
    return Layout(stages=stages, out_channels=cat_channels if head is None else graph.head.out_channels,
                  mid_channels=mid_channels, geometry=geometry_of(graph), outputs=list(graph.outputs),
                  mid_nodes=sorted(set(mid_c) | set(pooled_nodes)) + (list(graph.outputs) if head else []), head=head)
