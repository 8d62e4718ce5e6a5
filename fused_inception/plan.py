"""Block plans: a block's layout (layout.py) turned into stages of the grouped convolution kernel.

`build_stages` turns a layout into the kernels' stages (specs, problem tables, weight offsets) for a `Packing`: inference (weights padded, BN
folded into the weights and a per-column shift: `build_plan`) or training (the parameters' own
layout, statistics in the kernel: training.build_train_plan). One builder, one launcher
(kconv.StageLaunch, cached per input shape) for both.

A plan is plain data built outside `forward`; program.BlockProgram caches it and rebuilds it
when a tensor it folded changes.
"""

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from fused_inception.graph import ConvNode
from fused_inception.kernels import batchnorm as kbn
from fused_inception.kernels import conv as kconv
from fused_inception.layout import Layout, ProblemKind, build_layout


def folded_scale_shift(node, cout, device):
    """Per-output-channel float64 (scale, shift) with act?(bn(conv(x) + bias)) = act?(conv_nobias(x)*scale + shift).

    The math of torch.nn.utils.fusion.fuse_conv_bn_weights, in float64.
    """
    conv, bn = node.conv, node.bn
    bias = torch.zeros(cout, dtype=torch.float64, device=device)
    if conv is not None and conv.bias is not None:
        bias = conv.bias.detach().double()
    if bn is None:
        return torch.ones(cout, dtype=torch.float64, device=device), bias
    gamma = bn.weight.detach().double() if bn.weight is not None else torch.ones_like(bias)
    beta = bn.bias.detach().double() if bn.bias is not None else torch.zeros_like(bias)
    scale = gamma * torch.rsqrt(bn.running_var.detach().double() + bn.eps)
    shift = beta + (bias - bn.running_mean.detach().double()) * scale
    return scale, shift


def head_scale_shift(head, device):
    """((scale, shift) of the up-projection, (scale, shift) of the projection shortcut), float64,
    such that the head's result is act?(conv_nobias(cat) * scale + shift + residual) with the
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
    return (a * s, a * s * bias(head.conv) + b), (a, a * bias(head.shortcut))


def power_of_two_dividing(*values, cap=8):
    """The largest power of two <= cap dividing every value (what the kernel may assume about them)."""
    a = cap
    for v in values:
        while v % a:
            a //= 2
    return a


# A convolution with fewer input channels than this runs its K loop over (tap, channel) pairs
# (kconv.KIND_GEMM_FLAT): a 4-channel conv would fill a 64-wide K chunk per tap to 6%. From 8
# channels on, a tap's channels are 16 bytes: the pipelined per-tap loop with masks serves better.
# A block input of fewer than kconv.TAP_CHANNELS channels (a stem's 3) is padded instead (below).
FLAT_K_BELOW = 8


def _convolves_input(p):
    """Whether problem p is a convolution of the block input (not of a pool of it)."""
    return p.gemm and not p.row["pool"] and p.row["src"] == kconv.BUF_X


def input_padding(layout, in_channels):
    """The channels the block input is padded to for the kernels: kconv.TAP_CHANNELS when it has
    fewer and a convolution reads it (`padded_input`: each tap one vector, a pipelined K loop,
    kconv.KIND_GEMM_TAPS), else 0 (read as it is)."""
    if in_channels < kconv.TAP_CHANNELS and any(map(_convolves_input, (p for ps in layout.stages for p in ps))):
        return kconv.TAP_CHANNELS
    return 0


def padded_input(x, channels, zero):
    """x with its channels zero-padded to `channels`, channels_last (one launch; zero: a 0-d zero
    of x's dtype and device); x itself when `channels` is 0 (input_padding)."""
    if not channels:
        return x
    n, c, h, w = x.shape
    out = torch.empty((n, channels, h, w), dtype=x.dtype, device=x.device, memory_format=torch.channels_last)
    return torch.cat([x, zero.expand(n, channels - c, h, w)], 1, out=out)


def kernel_weight(weight, tap_channels=None):
    """A conv weight [cout, cin, kh, kw] as the kernel's [cout, kh * kw * cin] matrix, K ordered
    (tap, input channel) (nn.Conv2d's weight in channels_last order: a view for 1x1 convs and
    channels_last weights), its channels zero-padded to tap_channels if given (a copy)."""
    w = weight.permute(0, 2, 3, 1)
    if tap_channels:
        w = F.pad(w, (0, tap_channels - w.shape[3]))
    return w.reshape(w.shape[0], -1)


# A problem's N tile: the widest power of two (32 to 128) whose tiles pad its columns by at most
# this much; the launch config's BLOCK_N caps it (kconv spec field `tn`).
N_TILE_SLACK = 1.15


def n_tile(ncols):
    """The widest N tile (128, 64 or 32) covering `ncols` columns with at most N_TILE_SLACK x
    their work, else 32: 128 for 256 columns, 64 for 192 (two 128-wide tiles would be 75 %
    useful), 32 for 96 and for 48 (a narrower one never pads more). Not 16: a 16-column weight
    tile is too small for 8 warps' 16-byte copies (they become 8-byte ones)."""
    for tile in (128, 64):
        if -(-ncols // tile) * tile <= N_TILE_SLACK * ncols:
            return tile
    return 32


# The smallest weight tile (N tile x K chunk, elements) of a convolution: 4 warps copy it in 16-byte
# pieces, one per thread, when it has 128 x 8 elements of 16 bits (fp32 chunks are half as deep
# and twice as wide in bytes); 8 warps need twice that (kconv.configs_for keeps a stage with a
# smaller tile on 4 warps).
MIN_WEIGHT_TILE = 1024


def gemm_tiles(cin, ncols):
    """(tn, tk) of a convolution (KIND_GEMM) of `cin` input channels and `ncols` columns: the
    widest N tile (128, 64, 32, 16) and K chunk cap (0: the config's 64; 32, 16), of at least
    MIN_WEIGHT_TILE elements, whose padding of columns times channels is at most N_TILE_SLACK
    (tile area first, then the N tile that pads less, then the wider), else the least padding: 128 x 32 for a 3x3 96->128
    (exact), 64 x 64 for a 1x1 528->448 (1.09x; 128-wide tiles would pad the columns by 1.14x on
    top), 64 x 16 for a 3x3 144->288, 16 x 64 for a 1x1 64->80. Config tiles narrower or
    shallower than these only pad less (powers of two)."""
    best = None
    for tn in (128, 64, 32, 16):
        for tk, chunk in ((0, 64), (32, 32), (16, 16)):
            if tn * chunk < MIN_WEIGHT_TILE:
                continue
            pad_n = -(-ncols // tn) * tn / ncols
            pad = pad_n * (-(-cin // chunk) * chunk / cin)
            over = pad > N_TILE_SLACK + 1e-9
            key = (over, pad if over else 0.0, -tn * chunk, pad_n, -tn)
            if best is None or key < best[0]:
                best = (key, tn, tk)
    return best[1], best[2]


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
    elif row.get("tap_channels"):
        kind = kconv.KIND_GEMM_TAPS
    elif row["cin"] < FLAT_K_BELOW and row["kh"] * row["kw"] > 1:
        kind = kconv.KIND_GEMM_FLAT
    else:
        kind = kconv.KIND_GEMM
    tn, tk = gemm_tiles(row["cin"], row["ncols"]) if kind == kconv.KIND_GEMM else (n_tile(row["ncols"]), 0)
    return kconv.problem_spec(
        kind=kind, src=row["src"], dst0=row["dst0"], dst1=row["dst1"], split=split, kh=row["kh"], kw=row["kw"],
        sh=row["sh"], sw=row["sw"], ph=row["ph"], pw=row["pw"], pool=row["pool"], pkh=row["pkh"], pkw=row["pkw"],
        psh=row["psh"], psw=row["psw"], pph=row["pph"], ppw=row["ppw"], res=row["res"], act=row["act"],
        slope=row["slope"], bn=row["bn"], align=power_of_two_dividing(*touched), walign=walign,
        dalign=power_of_two_dividing(*written), tn=tn, tk=tk)


@dataclass(frozen=True)
class Packing:
    """How a plan lays out a block's weights (one vector per block; a problem's weights one
    [ncols, K] matrix with row pitch w_ld, K ordered (tap, input channel)) and what its stages
    compute. Inference pads rows to a multiple of `row_pad` elements (16 bytes of bf16) and
    folds BatchNorm into the weights and a shift; training takes the parameters' own layout (rows
    of K: what a 1x1 convolution's weight is, viewed) and has the stage kernel sum the batch
    statistics of the problems with BatchNorm (`bn` in their spec: kernels.batchnorm applies
    them)."""

    row_pad: int
    train: bool


INFERENCE = Packing(row_pad=kconv.W_ALIGN, train=False)
TRAINING = Packing(row_pad=1, train=True)


@dataclass
class Stage:
    """One launch of the stage kernel: its problems, their compile-time specs and runtime table.
    Offsets are the block's: weights into its one weight vector, columns (scale, shift,
    statistics) from the block's first."""

    problems: tuple  # Problem, in table order
    first_problem: int  # index of problems[0] among the block's problems
    spec: tuple  # kconv.problem_spec per problem (constexpr)
    table: torch.Tensor  # int32 [P, len(kconv.TABLE_FIELDS)] on the device
    columns: tuple  # [first, last) of the block's columns
    ncols: tuple  # output columns per problem (host: the launch grid)
    depth: tuple  # GEMM depth kh*kw*cin per problem as packed (host: the autotune key)
    tap_channels: tuple  # per problem: the channels its weights are padded to (padded input), or None
    splits: tuple  # per problem (ncols, split): the BatchNorm launches' grids
    bn_parts: tuple  # kbn.parts of the problems with BatchNorm (training)
    gemm_parts: tuple  # kbn.parts of the convolutions (training backward)
    mid_parts: tuple  # kbn.parts of the convolutions that go to `mid` (training backward)

    @property
    def nodes(self):
        """Node indices per problem, for reports."""
        return tuple(p.members for p in self.problems)


def build_stages(layout, in_channels, device, packing):
    """The stages of `layout` for blocks of `in_channels` input channels, packed as `packing`
    says. Returns (stages, offsets): offsets per problem of the block, (w_off, w_ld)."""
    pad = input_padding(layout, in_channels)
    channels = layout.buffer_channels(pad or in_channels)
    offsets, w_off, col = [], 0, 0
    rows, depths = [], []
    for problems in layout.stages:
        rows.append([])
        depths.append([])
        for p in problems:
            row = dict(p.row)
            k = p.k
            if pad and _convolves_input(p):
                row.update(cin=pad, tap_channels=pad)
                k = row["kh"] * row["kw"] * pad
            w_ld = -(-k // packing.row_pad) * packing.row_pad if p.gemm else 0
            offsets.append((w_off, w_ld))
            rows[-1].append(dict(row, w_off=w_off, w_ld=w_ld, ss_off=col))
            depths[-1].append(k)
            w_off += p.ncols * w_ld
            col += p.ncols
    # What divides every weight offset and row pitch (8 in Inception blocks, and for inference).
    walign = power_of_two_dividing(*(v for pair in offsets for v in pair))
    stages, first, col = [], 0, 0
    for problems, stage_rows, depth in zip(layout.stages, rows, depths):
        spec = tuple(problem_spec(dict(r, bn=r["bn"] if packing.train else 0), channels, walign) for r in stage_rows)
        ncols = tuple(p.ncols for p in problems)
        stages.append(Stage(
            problems=tuple(problems), first_problem=first, spec=spec,
            table=torch.tensor([[int(r[f]) for f in kconv.TABLE_FIELDS] for r in stage_rows], dtype=torch.int32,
                               device=device),
            columns=(col, col + sum(ncols)), ncols=ncols, depth=tuple(depth),
            tap_channels=tuple(r.get("tap_channels") for r in stage_rows),
            splits=tuple((p.ncols, p.row["split"]) for p in problems),
            bn_parts=kbn.parts(spec, lambda s, dst: kconv.spec_field(s, "bn")),
            gemm_parts=kbn.parts(spec, lambda s, dst: kconv.spec_field(s, "kind") != kconv.KIND_POOL),
            mid_parts=kbn.parts(spec, lambda s, dst: kconv.spec_field(s, "kind") != kconv.KIND_POOL
                                and dst == kconv.BUF_MID)))
        first += len(problems)
        col += sum(ncols)
    return stages, offsets


@dataclass
class Plan:
    """Everything an inference `forward` needs besides the input: the layout, the stages and the
    block's weights in kernel layout with BatchNorm folded in (its scale into the weights, its
    shift with the conv bias into `shift`, per column);
    per input shape and layout, the stages' launches (kconv.StageLaunch), worked out on the
    first call with that input."""

    layout: Layout
    stages: list
    weight: torch.Tensor
    shift: torch.Tensor
    pad_to: int = 0  # the channels the input is padded to before the launches (input_padding), or 0
    zero: torch.Tensor = None  # 0-d zero (padded_input)
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
        weight, shift = self.weight, self.shift
        x = padded_input(x, self.pad_to, self.zero)
        for launch in launches:
            launch(weight, None, shift, x, out, mid)
        return out

    def _prepare(self, x, requested):
        memory_format = output_memory_format(x) if requested is None else requested
        out, mid = self.layout.buffers(x, x.dtype, memory_format)
        if x.shape[0] == 0:
            launches = ()
        else:
            xk = x  # (the padded input run() will pass: its shape and strides, nothing computed)
            if self.pad_to:
                xk = torch.empty((x.shape[0], self.pad_to, *x.shape[2:]), dtype=x.dtype, device=x.device,
                                 memory_format=torch.channels_last)
            launches = tuple(kconv.StageLaunch(s.spec, s.table, s.ncols, s.depth, xk, out, mid) for s in self.stages)

        def alloc(t, fmt):  # torch.empty's arguments
            return (t.shape, dict(memory_format=fmt, dtype=x.dtype, device=x.device))

        entry = (alloc(out, memory_format), None if mid is out else alloc(mid, torch.channels_last), launches)
        if len(self._by_input) >= 16:  # inputs of many shapes: keep the latest
            self._by_input.clear()
        self._by_input[(x.shape, x.stride(), requested)] = entry
        return entry

    def stage_calls(self, x, memory_format=None):
        """Per stage, a zero-argument callable making that stage's launch exactly as `run(x)`
        does (the same cached launch), on buffers allocated once here; calling them in order
        computes the block (the last stage's result: `out`). Returns (calls, out, mid) (`mid`,
        the intermediate results, is `out` when the block has none): for profiling one stage at a
        time, and for checking that the launches write every element (buffers pre-filled with
        NaN: bench/quick.py)."""
        out_alloc, mid_alloc, launches = self._by_input.get((x.shape, x.stride(), memory_format)) or self._prepare(
            x, memory_format)
        out = torch.empty(out_alloc[0], **out_alloc[1])
        mid = out if mid_alloc is None else torch.empty(mid_alloc[0], **mid_alloc[1])
        x = padded_input(x, self.pad_to, self.zero)
        return [lambda launch=launch: launch(self.weight, None, self.shift, x, out, mid)
                for launch in launches], out, mid

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


def build_plan(graph, device, dtype):
    """Build the inference plan for `graph` with weights on `device` in `dtype` (fp32, fp16 or
    bf16): BatchNorm folded into the weights (each output channel's scaled, in float64, then
    rounded to `dtype`, as torch.nn.utils.fusion.fuse_conv_bn_eval does) and into a per-column
    fp32 shift with the conv bias (the kernel's accumulator starts from it), each problem's
    weights one [ncols, K] matrix (K ordered (tap, input channel), rows padded to a multiple of
    kconv.W_ALIGN elements) with its convolutions' output channels stacked (INFERENCE packing).
    The epilogue then holds no per-column scale and shift: 64 registers a thread fewer at
    128x128 tiles (issue 20's item 4).

    Raises UnsupportedBlock if some node can't go through the stage kernel, and OverflowError
    if a folded weight overflows `dtype` (float16: a BatchNorm scale above 65504 / |weight|).
    """
    layout = build_layout(graph)
    stages, offsets = build_stages(layout, graph.in_channels, device, INFERENCE)
    weights, shifts = [], []
    problems = [p for stage in stages for p in stage.problems]
    tap_channels = [c for stage in stages for c in stage.tap_channels]
    for p, (_, w_ld), tc in zip(problems, offsets, tap_channels):
        if p.kind is ProblemKind.BRANCH:
            pieces = [folded_scale_shift(ConvNode(conv, bn), cout, device)
                      for conv, bn, cout in zip(p.convs or (None,) * len(p.couts), p.bns, p.couts)]
        else:
            up, shortcut = head_scale_shift(graph.head, device)
            pieces = [up if p.kind is ProblemKind.HEAD else shortcut]
        if p.gemm:
            # [Cout, Cin, KH, KW] -> [Cout, KH, KW, Cin] -> [Cout, K], each row times its channel's
            # scale, stacked along Cout, rows padded.
            scale = torch.cat([s for s, _ in pieces]).to(device)
            w = torch.cat([kernel_weight(conv.weight.detach(), tc) for conv in p.convs], 0).to(device).double()
            w = w * scale[:, None]
            folded = w.to(dtype)
            if not w.is_meta and torch.isfinite(w).all() and not torch.isfinite(folded).all():
                raise OverflowError(f"a BatchNorm folded into the weights overflows {dtype} (largest scale "
                                    f"{scale.abs().max().item():.3g}): run the block in another dtype")
            weights.append(F.pad(folded, (0, w_ld - folded.shape[1])).reshape(-1))
        shifts += [b for _, b in pieces]
    return Plan(layout=layout, stages=stages, pad_to=input_padding(layout, graph.in_channels),
                zero=torch.zeros((), dtype=dtype, device=device),
                weight=torch.cat(weights) if weights else torch.zeros(1, dtype=dtype, device=device),
                shift=torch.cat(shifts).to(device=device, dtype=torch.float32))
