"""One launch per stage: a grouped implicit-GEMM convolution over channel slices.

A *stage* is a group of convolutions ("problems") that can run at the same time because none
reads what another writes. Every problem is an implicit GEMM

    M = batch * OH * OW   (output pixels)      N = ncols (output channels)
    K = KH * KW * cin     (filter taps times input channels, tap-major)

    for each output pixel m and output column n (inference):
        acc = shift[n] + sum over taps (r, s) and channels c of
                  src[img, oh*SH - PH + r, ow*SW - PW + s, src_c + c] * w[(r*KW + s)*cin + c, n]
                                                 # fp32; the plan folds BatchNorm's scale into w,
                                                 # its shift and the conv bias into shift
        y   = acc + x[img, oh, ow, n] if RES     # Inception-ResNet (its scale folded the same way)
        y   = act(y)                             # ACT_*: ReLU, ReLU6, LeakyReLU, SiLU, GELU, Hardswish or none
        dst[img, oh, ow, dst_c + n] = y          # a channel slice of the block output or of `mid`

In training the weights are the parameters: the accumulator starts at shift[n] (the conv bias),
a residual head's epilogue multiplies it by scale[n] (the residual scale; 1 for every other
problem, whose epilogue doesn't read it) and BatchNorm follows (kernels.batchnorm).

A problem may be a pool alone (max, average counting the padding, or average over the taps
inside the image; any window, stride and padding; no GEMM: the pooled channels are the result):
the stride-2 max pool branch of Inception v3's grid-reduction blocks, and the pool of every pool
branch (GoogLeNet's 3x3/s1/p1 max pool, Inception v3's average pools), which the plan runs in the
stage before its 1x1, into `mid` (fused_inception.layout._pool_first), so that the 1x1 is a plain
pipelined GEMM. A 1x1 after a strided pool (whose result would not have `mid`'s size) carries the
pool instead, applied to its input as the tile is loaded (KIND_POOLED_GEMM: not pipelined).

A block input of fewer than TAP_CHANNELS channels (a stem's RGB) is padded to TAP_CHANNELS by the
plan, and its convolutions are KIND_GEMM_TAPS: a K chunk spans several taps of one vector each.

The tensors a stage touches are three buffers: `x` (the stage's block input), `out` (the block
output) and `mid` (the intermediate results of the branches that go on). A problem reads a
channel slice of one buffer and writes its first `split` columns to a slice of one buffer and
the rest to a slice of another: that is how the merged 1x1 reductions of an Inception block send
the `branch1` columns to the output and the reduce columns to `mid` in a single GEMM.

What is compile-time and what is not. Triton only pipelines a K loop whose trip count and
addresses it can reason about, and only issues 16-byte copies where it can prove 16-byte
alignment. So a stage is described twice:

- its *spec*, a tuple of `ProblemSpec` (one per problem; constexpr): the kind of problem, which
  buffers it reads and writes, kernel size, stride, padding, pool, residual, activation, and `align`,
  a power of two that divides every channel count, channel offset and channel-last row pitch
  the problem touches (8 for every Inception network: their channel counts are multiples of 8),
  `tn` and `tk`, the widest N tile and deepest K chunk the problem takes (its programs are
  min(BLOCK_N, tn) columns wide and a convolution's chunks min(BLOCK_K, tk) deep: a 96-channel 3x3
  runs chunks of 32, not of 64 a third of them padding; fused_inception.plan.gemm_tiles picks
  them), and `ks`, its K slices (split K, below).
  The kernel unrolls a branch per problem (`tl.static_range`), each with one flat K loop over
  (tap, channel chunk) whose loads sit directly in the loop body;
- its *table*, an int32 row per problem on the device (`TABLE_FIELDS`): channel counts and
  offsets, weight offsets. They are runtime values, so one compiled kernel serves every block
  with the same geometry and N tiles (GoogLeNet's nine blocks need nine stage kernels between
  them); `align` tells the compiler what it may assume about them.

Weights are packed by the plan as one [ncols, K] matrix per problem, K contiguous and ordered
(tap, input channel) (nn.Conv2d's weight in channels_last order): the K-major operand wgmma
reads natively, fp32 (TF32) included. Loads are masked on pixels (padding), channels
(`c < cin`) and columns.

Split K. A stage launch of few programs (batch 1: GoogLeNet's 7x7 blocks have 4-12) leaves most
SMs idle while each program runs a long K loop. StageLaunch then splits the long convolutions
(split_counts): each runs ks programs per tile over slices of its K loop and stores fp32 partial
sums to a workspace, and a second launch of this kernel, whose problems are KIND_REDUCE (the split
ones) and KIND_SKIP (the others), adds each tile's ks partial sums in slice order and runs the
epilogue. The reduction's order is fixed: results are the same bits run to run (no atomics).

Addresses are int32 unless a buffer has 2**31 elements or more (then int64: `INT64`).
"""

import contextlib
import os

import torch
from torch.utils._python_dispatch import _disable_current_modes
import triton
import triton.language as tl

from fused_inception.kernels import tuning

# Autotuning (CUDA only: the interpreter cannot benchmark). Every config keeps BLOCK_M >= 64 and
# 4 warps or more (a Hopper warp group: wgmma), BLOCK_K >= 16 (fp16/bf16 dots need it). fp32
# operands halve BLOCK_K (BK in _problem) so that the pipelined tiles fit in shared memory.
CONFIGS = [
    # (two programs of 8 warps per SM, as the plain conv fits: 65536 registers / 512 threads = 128
    # each. Triton 3.8 stays within it unasked; 3.6 gave one kernel 135 without the cap, 121 with
    # it, no spill. A kernel that needed more would spill, which the marks check refuses.)
    triton.Config({"BLOCK_M": 128, "BLOCK_N": 128, "BLOCK_K": 64}, num_warps=8, num_stages=3, maxnreg=128),
    triton.Config({"BLOCK_M": 128, "BLOCK_N": 64, "BLOCK_K": 64}, num_warps=4, num_stages=4),
    triton.Config({"BLOCK_M": 64, "BLOCK_N": 128, "BLOCK_K": 64}, num_warps=4, num_stages=4),
    triton.Config({"BLOCK_M": 64, "BLOCK_N": 64, "BLOCK_K": 64}, num_warps=4, num_stages=3),
]
# Under TRITON_INTERPRET=1 the cost is per program and per tl op, so fewer, larger tiles.
INTERPRETER_CONFIG = {"BLOCK_M": 64, "BLOCK_N": 64, "BLOCK_K": 128}

# True when the kernels in this module were decorated for Triton's CPU interpreter.
INTERPRETING = bool(triton.knobs.runtime.interpret)
_INTERPRETING = tl.constexpr(INTERPRETING)  # (what a kernel may read of it)

# Buffers.
BUF_X = 0  # the stage input (the block input)
BUF_OUT = 1  # the block output
BUF_MID = 2  # intermediate results (always channels_last)

# Pool kinds, for a pre-pool on a 1x1 problem's input or a pool-only problem.
POOL_NONE = 0
POOL_MAX = 1
POOL_AVG = 2  # count_include_pad=True: divide by the window size
POOL_AVG_EXCLUDE_PAD = 3  # count_include_pad=False: divide by the taps inside the image

# Problem kinds.
KIND_GEMM = 0  # a convolution
KIND_POOLED_GEMM = 1  # a 1x1 convolution of the pooled input
KIND_POOL = 2  # the pooled input channels are the result (ncols == cin)
KIND_GEMM_FLAT = 3  # a convolution of few input channels (a stem's 3): K flattened over (tap, channel)
KIND_GEMM_TAPS = 4  # a convolution of an input padded to TAP_CHANNELS channels: a K chunk spans several taps
# Split K (split_counts): a KIND_GEMM problem whose spec has ks > 1 runs ks programs per tile, each
# over a slice of the K loop, and stores its fp32 partial sums to a workspace instead of its result;
# a second launch of the same kernel (StageLaunch.finish) sums each tile's ks partials in slice
# order and runs the epilogue: a deterministic reduction, no atomics.
KIND_REDUCE = 5  # the second launch's problem: the sum of the partials of a split problem, then the epilogue
KIND_SKIP = 6  # the second launch's place of a problem that was not split (no programs)

# The channels a few-channel block input (a stem's 3) is padded to (fused_inception.plan does it,
# one copy per forward, as cuDNN pads first layers): a tap's channels are then one 8-byte (16-bit
# dtypes) or 16-byte (fp32) vector that an async copy can fetch, and KIND_GEMM_TAPS's K loop is an
# ordinary pipelined one. 4, not 8: a quarter of the MACs are padding instead of five eighths.
TAP_CHANNELS = 4
_TAP_C = tl.constexpr(TAP_CHANNELS)  # (what a kernel may read of it)

# Residual added in the epilogue (Inception-ResNet's head).
RES_NONE = 0
RES_X = 1  # the block input at the same pixel and channel
RES_MID = 2  # a slice of `mid` at the same pixel, from channel res_c: a projection shortcut's result

# Activations (the `act` of a spec; kernels.batchnorm's too): _activate and _activate_grad.
ACT_NONE = 0
ACT_RELU = 1
ACT_RELU6 = 2  # F.relu6: hardtanh(0, 6)
ACT_LEAKY_RELU = 3  # negative slope: the spec's `slope`
ACT_SILU = 4
ACT_GELU = 5  # the erf form (approximate="none")
ACT_GELU_TANH = 6  # approximate="tanh"
ACT_HARDSWISH = 7

# The compile-time fields of a problem, in the order of a ProblemSpec tuple. Kernels index specs
# with the I_* constants below (Triton 3.6 has no attribute access on constexpr tuples).
SPEC_FIELDS = (
    "kind", "src", "dst0", "dst1", "split",  # split: 1 if columns >= table's split go to dst1
    "kh", "kw", "sh", "sw", "ph", "pw",  # convolution
    "pool", "pkh", "pkw", "psh", "psw", "pph", "ppw",  # pre-pool or pool alone
    "res",  # residual (RES_*)
    "act", "slope",  # activation (ACT_*) and LeakyReLU's negative slope (a float)
    "bn",  # training: BatchNorm follows (kernels.batchnorm)
    "align",  # power of two (<= 8) dividing every channel count, offset and row pitch it touches
    "walign",  # power of two (<= 8) dividing the problem's weight offset and row pitch
    "dalign",  # power of two (<= 8) dividing its columns, split and destination channels and pitches
    "tn",  # the widest N tile the problem takes (a power of two, 16-128): its programs are
    # min(BLOCK_N, tn) columns wide, so that a 32-column conv doesn't compute a 128-wide tile
    "ks",  # split K: the K slices (programs per tile) of a KIND_GEMM or KIND_REDUCE problem, 1: not split
    "tk",  # KIND_GEMM: the deepest K chunk the problem takes (32 or 16; 0: the config's), so that a
    # 96-channel conv runs 3 chunks of 32 rather than 2 of 64 (a third of them padding)
)
I_KIND, I_SRC, I_DST0, I_DST1, I_SPLIT = (tl.constexpr(i) for i in range(5))
I_KH, I_KW, I_SH, I_SW, I_PH, I_PW = (tl.constexpr(i) for i in range(5, 11))
I_POOL, I_PKH, I_PKW, I_PSH, I_PSW, I_PPH, I_PPW = (tl.constexpr(i) for i in range(11, 18))
I_RES, I_ACT, I_SLOPE, I_BN, I_ALIGN, I_WALIGN, I_DALIGN, I_TN, I_KS, I_TK = (tl.constexpr(i) for i in range(18, 28))

# The runtime fields of a problem: one int32 row of the stage's table.
TABLE_FIELDS = ("cin", "ncols", "src_c", "split", "dst0_c", "dst1_c", "w_off", "w_ld", "ss_off", "res_c")
T_CIN, T_NCOLS, T_SRC_C, T_SPLIT, T_DST0_C, T_DST1_C, T_W_OFF, T_W_LD, T_SS_OFF, T_RES_C = (
    tl.constexpr(i) for i in range(10))
ROW = tl.constexpr(len(TABLE_FIELDS))

# Inference plans round weight offsets and row pitches up to a multiple of this (16 bytes of bf16).
W_ALIGN = 8


def problem_spec(kind=KIND_GEMM, src=BUF_X, dst0=BUF_OUT, dst1=None, split=0, kh=1, kw=1, sh=1, sw=1, ph=0, pw=0,
                 pool=POOL_NONE, pkh=1, pkw=1, psh=1, psw=1, pph=0, ppw=0, res=0, act=ACT_NONE, slope=0.0, bn=0,
                 align=1, walign=1, dalign=None, tn=128, ks=1, tk=0):
    """A ProblemSpec: the tuple of SPEC_FIELDS (ints; `slope` a float), hashable and passed as a
    constexpr."""
    return (int(kind), int(src), int(dst0), int(dst0 if dst1 is None else dst1), int(split), int(kh), int(kw),
            int(sh), int(sw), int(ph), int(pw), int(pool), int(pkh), int(pkw), int(psh), int(psw), int(pph),
            int(ppw), int(res), int(act), float(slope), int(bn), int(align), int(walign),
            int(align if dalign is None else dalign), int(tn), int(ks), int(tk))


def spec_field(spec, name):
    return spec[SPEC_FIELDS.index(name)]


def with_field(spec, name, value):
    """ProblemSpec `spec` with field `name` set to `value`."""
    i = SPEC_FIELDS.index(name)
    return spec[:i] + (value,) + spec[i + 1:]


# ----------------------------------------------------------------------------------------------
# Device code


@triton.jit
def _view(SEL: tl.constexpr, bufs, LAYOUT: tl.constexpr):
    """(pointer, H, W, stride N, stride H, stride W, stride C) of buffer SEL (BUF_X, BUF_OUT,
    BUF_MID) of `bufs`, the three buffers as such tuples. LAYOUT: (X_UNIT, OUT_UNIT, MID_UNIT,
    INT64). A channels_last buffer (channel stride 1, row pitches multiples of its UNIT, 8 or 4;
    0: any strides) has its pitches passed in units of UNIT and its channel stride is the
    constant 1, so the compiler sees contiguous channels, 16-byte (UNIT 8) or 8-byte (UNIT 4,
    16-bit dtypes) aligned. int64 strides when INT64 (some buffer has 2**31 elements or more)."""
    ptr, h, w, s_n, s_h, s_w, s_c = bufs[SEL]
    if LAYOUT[3]:
        s_n = s_n.to(tl.int64)
        s_h = s_h.to(tl.int64)
        s_w = s_w.to(tl.int64)
        s_c = s_c.to(tl.int64)
    if LAYOUT[SEL]:
        UNIT: tl.constexpr = LAYOUT[SEL]
        return ptr, h, w, s_n * UNIT, s_h * UNIT, s_w * UNIT, 1
    else:
        return ptr, h, w, s_n, s_h, s_w, s_c


@triton.jit
def _load_center(center_ptr, col, mask, ACC: tl.constexpr):
    """The training statistics' centre of each column (the running mean), 0 where it is not
    finite: a running mean that a bad batch made NaN or Inf (eager's becomes so too) must not
    spoil the next batches' statistics, which eager computes without it."""
    c = tl.load(center_ptr + col, mask=mask, other=0.0).to(ACC)
    return tl.where((c == c) & (tl.abs(c) != float("inf")), c, 0.0)


@triton.jit
def _activate(y, ACT: tl.constexpr, SLOPE: tl.constexpr):
    """act(y) as PyTorch computes it in fp32 (ATen's formulas; NaN stays NaN). ReLU, ReLU6 and
    no activation also serve y of the storage dtype (they only select: exact in any dtype)."""
    if ACT == 1:  # relu
        y = tl.where(y < 0.0, 0.0, y)
    elif ACT == 2:  # relu6 = hardtanh(0, 6)
        y = tl.where(y < 0.0, 0.0, tl.where(y > 6.0, 6.0, y))
    elif ACT == 3:  # leaky_relu
        y = tl.where(y > 0.0, y, y * SLOPE)
    elif ACT == 4:  # silu
        y = y / (1.0 + tl.exp(-y))
    elif ACT == 5:  # gelu
        y = 0.5 * y * (1.0 + tl.erf(y * 0.7071067811865476))
    elif ACT == 6:  # gelu, approximate="tanh": tanh(u) = 1 - 2 / (exp(2u) + 1)
        u = 0.7978845608028654 * (y + 0.044715 * y * y * y)
        y = 0.5 * y * (2.0 - 2.0 / (tl.exp(2.0 * u) + 1.0))
    elif ACT == 7:  # hardswish
        y = y * tl.minimum(tl.maximum(y + 3.0, 0.0), 6.0) / 6.0
    return y


@triton.jit
def _activate_grad(g, y, ACT: tl.constexpr, SLOPE: tl.constexpr):
    """g * act'(y), fp32, as ATen's backward computes it, at the kinks too: relu 0 at y <= 0
    (threshold_backward), relu6 0 at y <= 0 and y >= 6 (hardtanh_backward), leaky_relu the
    slope at y <= 0, hardswish 0 at y <= -3, y / 3 + 0.5 between, 1 at y >= 3."""
    if ACT == 1:
        g = tl.where(y <= 0.0, 0.0, g)
    elif ACT == 2:
        g = tl.where((y <= 0.0) | (y >= 6.0), 0.0, g)
    elif ACT == 3:
        g = tl.where(y > 0.0, g, g * SLOPE)
    elif ACT == 4:
        sig = 1.0 / (1.0 + tl.exp(-y))
        g = g * sig * (1.0 + y * (1.0 - sig))
    elif ACT == 5:
        cdf = 0.5 * (1.0 + tl.erf(y * 0.7071067811865476))
        pdf = tl.exp(-0.5 * y * y) * 0.3989422804014327
        g = g * (cdf + y * pdf)
    elif ACT == 6:
        u = 0.7978845608028654 * (y + 0.044715 * y * y * y)
        t = 1.0 - 2.0 / (tl.exp(2.0 * u) + 1.0)
        g = g * (0.5 * (1.0 + t) + 0.5 * y * (1.0 - t * t) * 0.7978845608028654 * (1.0 + 3.0 * 0.044715 * y * y))
    elif ACT == 7:
        g = tl.where(y <= -3.0, 0.0, tl.where(y < 3.0, g * (y / 3.0 + 0.5), g))
    return g


@triton.jit
def _pooled(src, img_off, y0, x0, ih, iw, s_h, s_w, col, row_ok, col_ok,
            POOL: tl.constexpr, PKH: tl.constexpr, PKW: tl.constexpr, MAX_DTYPE: tl.constexpr):
    """[rows, cols] tile of the pool whose windows start at (y0, x0), in the source dtype (max:
    exact, taken in MAX_DTYPE; average: summed in fp32, rounded once, as ATen does). img_off is
    each row's image offset (img * stride N). Taps outside the image never count (max) or count
    as zeros (average including padding); rows or columns outside the problem are 0."""
    if POOL == 1:
        r = tl.full((y0.shape[0], col.shape[0]), float("-inf"), MAX_DTYPE)
    else:
        r = tl.zeros((y0.shape[0], col.shape[0]), tl.float32)
        taps = tl.zeros((y0.shape[0],), tl.float32)
    for dy in tl.static_range(PKH):
        for dx in tl.static_range(PKW):
            y = y0 + dy
            x = x0 + dx
            ok = row_ok & (y >= 0) & (y < ih) & (x >= 0) & (x < iw)
            mask = ok[:, None] & col_ok[None, :]
            p = src + (img_off + y * s_h + x * s_w)[:, None] + col[None, :]
            if POOL == 1:
                v = tl.load(p, mask=mask, other=float("-inf")).to(MAX_DTYPE)
                r = tl.maximum(r, v, propagate_nan=tl.PropagateNan.ALL)  # max_pool2d propagates NaN
            else:
                r += tl.load(p, mask=mask, other=0.0).to(tl.float32)
                taps += ok.to(tl.float32)
    if POOL == 2:
        r = r / (PKH * PKW)
    elif POOL == 3:
        r = r / tl.maximum(taps, 1.0)[:, None]  # (rows outside the problem: any nonzero divisor)
    r = tl.where(row_ok[:, None] & col_ok[None, :], r, 0.0)
    return r.to(src.dtype.element_ty)


@triton.jit
def _dot(a, b, acc, DOT_IN_FP32: tl.constexpr, INPUT_PRECISION: tl.constexpr, ACC: tl.constexpr):
    """acc + a @ b, with b rounded to a's dtype (training keeps fp32 weights under autocast: round
    as eager does) and both in fp32 under the interpreter for bf16 (triton#11584)."""
    if b.dtype != a.dtype:
        b = b.to(a.dtype)
    if DOT_IN_FP32:
        a = a.to(tl.float32)
        b = b.to(tl.float32)
    return tl.dot(a, b, acc, input_precision=INPUT_PRECISION, out_dtype=ACC)


@triton.jit
def _pixels(pid_m, m_total, oh, ow, BLOCK_M: tl.constexpr):
    """(offs_m, m_ok, img, oy, ox): the output pixels of row tile pid_m of a batch of oh x ow
    maps, m_total pixels in all."""
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    pix = offs_m % (oh * ow)
    return offs_m, offs_m < m_total, offs_m // (oh * ow), pix // ow, pix % ow


@triton.jit
def _problem(local, P: tl.constexpr, S: tl.constexpr, table_ptr, w_ptr, scale_ptr, shift_ptr, bufs, raws, stats_ptr,
             center_ptr, part_ptr, part_off, batch, LAYOUT: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
             BLOCK_K: tl.constexpr, DOT_IN_FP32: tl.constexpr, INPUT_PRECISION: tl.constexpr, ACC: tl.constexpr,
             TRAIN: tl.constexpr):
    """Tile `local` of problem P (spec S): a [BLOCK_M pixels, BLOCK_N columns] block of its
    result (split K: of one K slice's partial sums, or their reduction). bufs: (x, out, mid),
    each (pointer, H, W, stride N, H, W, C); raws: the training shadows (raw_out, raw_mid);
    part_ptr + part_off: a split problem's partial sums, [ks, M, ncols] in ACC; LAYOUT: see
    _view."""
    KIND: tl.constexpr = S[I_KIND]
    SRC: tl.constexpr = S[I_SRC]
    DST0: tl.constexpr = S[I_DST0]
    KH: tl.constexpr = S[I_KH]
    KW: tl.constexpr = S[I_KW]
    SH: tl.constexpr = S[I_SH]
    SW: tl.constexpr = S[I_SW]
    PH: tl.constexpr = S[I_PH]
    PW: tl.constexpr = S[I_PW]
    POOL: tl.constexpr = S[I_POOL]
    PKH: tl.constexpr = S[I_PKH]
    PKW: tl.constexpr = S[I_PKW]
    PSH: tl.constexpr = S[I_PSH]
    PSW: tl.constexpr = S[I_PSW]
    PPH: tl.constexpr = S[I_PPH]
    PPW: tl.constexpr = S[I_PPW]
    ALIGN: tl.constexpr = S[I_ALIGN]
    WALIGN: tl.constexpr = S[I_WALIGN]
    DALIGN: tl.constexpr = S[I_DALIGN]
    KS: tl.constexpr = S[I_KS]
    row = table_ptr + P * ROW
    cin = tl.multiple_of(tl.load(row + T_CIN), ALIGN)
    ncols = tl.multiple_of(tl.load(row + T_NCOLS), ALIGN)
    src_c = tl.multiple_of(tl.load(row + T_SRC_C), ALIGN)
    src, ih, iw, s_n, s_h, s_w, s_c = _view(SRC, bufs, LAYOUT)
    dtype = src.dtype.element_ty
    # (the interpreter has no bf16 constants: max pools of bf16 are taken in fp32 there)
    MAX_DTYPE: tl.constexpr = tl.float32 if DOT_IN_FP32 else dtype

    # Pixels: the output size is that of the destination (dst0 and dst1 agree: the plan checks).
    _d, oh, ow, _n, _h, _w, _c = bufs[DST0]
    m_total = batch * oh * ow
    tiles_m = tl.cdiv(m_total, BLOCK_M)
    kslice = 0
    if KS > 1 and KIND == 0:  # split K: ks programs per tile, slice-major
        tiles_mn = tiles_m * tl.cdiv(ncols, BLOCK_N)
        kslice = local // tiles_mn
        local = local % tiles_mn
    pid_m = local % tiles_m  # M fastest: neighbouring programs share a weight tile
    pid_n = local // tiles_m
    offs_m, m_ok, img, oy, ox = _pixels(pid_m, m_total, oh, ow, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = offs_n < ncols
    img_off = img * s_n  # (int64 when INT64: the strides are)

    if KIND == 2:
        # A pool alone: the result's columns are the pooled source channels, written as they
        # come, 32 bytes of columns at a time (16 in 16-bit dtypes, 8 in fp32): the window's
        # loads stay in registers (a 3x3 window is 9 16-byte loads a thread at 128 rows on 8
        # warps; 64 bytes took the registers of a second program on the SM beside a 128x128 GEMM).
        # (Under the interpreter, whose cost is per op, 32 columns: two chunks of its 64-wide tiles.)
        PN: tl.constexpr = min(BLOCK_N, 32 if _INTERPRETING else 256 // dtype.primitive_bitwidth)
        dst0_c = tl.multiple_of(tl.load(row + T_DST0_C), DALIGN)
        for j in tl.static_range(BLOCK_N // PN):
            offs_c = pid_n * BLOCK_N + j * PN + tl.arange(0, PN)
            c_ok = offs_c < ncols
            pooled = _pooled(src, img_off, oy * PSH - PPH, ox * PSW - PPW, ih, iw, s_h, s_w, (src_c + offs_c) * s_c,
                             m_ok, c_ok, POOL, PKH, PKW, MAX_DTYPE)
            _store(DST0, dst0_c, c_ok, pooled, pooled, img, oy, ox, m_ok, offs_c, bufs, raws, KIND, 0, DALIGN, LAYOUT,
                   TRAIN)
    elif KIND == 5:
        # Split K's second launch: the partial sums of the tile's ks slices, added in slice
        # order (deterministic), then the epilogue.
        part = part_ptr + tl.multiple_of(part_off, ALIGN) + offs_m[:, None] * ncols + offs_n[None, :]
        pmask = m_ok[:, None] & n_ok[None, :]
        acc = _initial(row, shift_ptr, offs_n, n_ok, BLOCK_M, ACC)
        for j in tl.static_range(KS):
            acc += tl.load(part + j * m_total * ncols, mask=pmask, other=0.0)
        _epilogue(acc, row, S, scale_ptr, shift_ptr, bufs, raws, stats_ptr, center_ptr, pid_m, pid_n, m_total, oh, ow,
                  LAYOUT, BLOCK_M, BLOCK_N, ACC, TRAIN)
    else:
        # The K chunk: BLOCK_K for 16-bit operands, half of it for fp32 (same bytes per tile).
        # (Inline: Triton 3.6 returns a tensor, not a constexpr, from a jit helper.)
        # A KIND_GEMM problem may cap it (spec field tk: a 96-channel conv takes chunks of 32).
        BK0: tl.constexpr = BLOCK_K // 2 if dtype.primitive_bitwidth > 16 else BLOCK_K
        BK: tl.constexpr = min(BK0, S[I_TK]) if KIND == 0 and S[I_TK] > 0 else BK0
        offs_k = tl.arange(0, BK)
        w_off = tl.multiple_of(tl.load(row + T_W_OFF), WALIGN)
        w_ld = tl.multiple_of(tl.load(row + T_W_LD), WALIGN)
        # [N, K] rows, K contiguous. Columns past ncols re-read the last row (in bounds; never
        # stored) instead of a column mask: a 2-D mask or offset tile that doesn't change in the
        # K loop would be hoisted out of it and held in registers for the whole loop.
        w_row = w_off + tl.minimum(offs_n, ncols - 1) * w_ld
        if KS > 1 and KIND == 0:  # a K slice: partial sums (the reduction starts from the shift)
            acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=ACC)
        else:
            acc = _initial(row, shift_ptr, offs_n, n_ok, BLOCK_M, ACC)
        chunks = tl.cdiv(cin, BK)
        if KIND == 1:
            # A 1x1 convolution of the pooled input: each K chunk of A is the max/average of
            # PKH x PKW shifted 16-byte loads, computed in registers. Not software-pipelined:
            # async copies of every tap would need PKH x PKW tiles per pipeline stage in shared
            # memory (over 300 KB for a 3x3 window at 128x128). A quarter of the K chunk keeps the
            # window's loads in flight within the register budget.
            PBK: tl.constexpr = BK // 4
            offs_pk = tl.arange(0, PBK)
            for c0 in tl.range(0, cin, PBK, num_stages=1):
                ch = c0 + offs_pk
                k_ok = ch < cin
                a = _pooled(src, img_off, oy * PSH - PPH, ox * PSW - PPW, ih, iw, s_h, s_w, (src_c + ch) * s_c,
                            m_ok, k_ok, POOL, PKH, PKW, MAX_DTYPE)
                b = tl.load(w_ptr + ch[:, None] + w_row[None, :], mask=k_ok[:, None], other=0.0)
                acc = _dot(a, b, acc, DOT_IN_FP32, INPUT_PRECISION, ACC)
        elif KIND == 3:
            # Few input channels: a K chunk per tap would be mostly padding, so K runs over
            # (tap, channel) pairs and each A element is gathered from its own tap.
            FBK: tl.constexpr = BK // 4
            offs_fk = tl.arange(0, FBK)
            k_total = KH * KW * cin
            for k0 in tl.range(0, k_total, FBK, num_stages=1):
                k = k0 + offs_fk
                k_ok = k < k_total
                tap = k // cin
                c = k - tap * cin
                r = tap // KW
                y = (oy * SH - PH)[:, None] + r[None, :]
                x = (ox * SW - PW)[:, None] + (tap - r * KW)[None, :]
                ok = m_ok[:, None] & k_ok[None, :] & (y >= 0) & (y < ih) & (x >= 0) & (x < iw)
                a = tl.load(src + img_off[:, None] + y * s_h + x * s_w + ((src_c + c) * s_c)[None, :], mask=ok,
                            other=0.0)
                b = tl.load(w_ptr + k[:, None] + w_row[None, :], mask=k_ok[:, None], other=0.0)
                acc = _dot(a, b, acc, DOT_IN_FP32, INPUT_PRECISION, ACC)
        elif KIND == 4:
            # The input padded to TAP_CHANNELS channels (the plan's copy; the weights' too): a tap's
            # channels are one vector, a K chunk spans BK // TAP_CHANNELS taps, and the loop is
            # an ordinary pipelined one (loads in its body). Taps past KH * KW: masked.
            TC: tl.constexpr = _TAP_C
            k_total: tl.constexpr = KH * KW * TC
            y0 = oy * SH - PH
            x0 = ox * SW - PW
            base = img_off + y0 * s_h + x0 * s_w  # the window's corner, per row
            chan = (src_c + offs_k % TC) * s_c
            ih_u = ih.to(tl.uint32)
            iw_u = iw.to(tl.uint32)
            for k0 in range(0, k_total, BK):
                k = k0 + offs_k
                tap = k // TC
                r = tap // KW
                s = tap - r * KW
                # inside the image: 0 <= y < ih as one unsigned comparison
                ok = (((y0[:, None] + r[None, :]).to(tl.uint32) < ih_u) & ((x0[:, None] + s[None, :]).to(tl.uint32) < iw_u)
                      & m_ok[:, None] & (k < k_total)[None, :])
                a = tl.load(src + base[:, None] + (r * s_h + s * s_w + chan)[None, :], mask=ok, other=0.0)
                b = tl.load(w_ptr + k[:, None] + w_row[None, :], mask=(k < k_total)[:, None], other=0.0)
                acc = _dot(a, b, acc, DOT_IN_FP32, INPUT_PRECISION, ACC)
        else:
            # One flat loop over (tap, channel chunk), loads in its body: what Triton pipelines.
            # Split K: slice `kslice` of ks runs its share of the iterations.
            k_lo = 0
            k_hi = KH * KW * chunks
            if KS > 1:
                per = tl.cdiv(k_hi, KS)
                k_lo = kslice * per
                k_hi = tl.minimum(k_lo + per, k_hi)
            for kk in range(k_lo, k_hi):
                tap = kk // chunks
                c0 = (kk - tap * chunks) * BK
                ch = c0 + offs_k
                k_ok = ch < cin
                y = oy * SH - PH + tap // KW
                x = ox * SW - PW + tap % KW
                pix_ok = m_ok & (y >= 0) & (y < ih) & (x >= 0) & (x < iw)
                a = tl.load(src + (img_off + y * s_h + x * s_w)[:, None] + ((src_c + ch) * s_c)[None, :],
                            mask=pix_ok[:, None] & k_ok[None, :], other=0.0)
                b = tl.load(w_ptr + ch[:, None] + (w_row + tap * cin)[None, :], mask=k_ok[:, None], other=0.0)
                acc = _dot(a, b, acc, DOT_IN_FP32, INPUT_PRECISION, ACC)

        # The tile's coordinates once more, for the stores: (pid_m, pid_n) made opaque to the
        # compiler by a value loaded after the K loop (ncols, positive). Else it would compute
        # the store's coordinates from the loads' ones before the loop, and hold them in
        # registers through it: 20 to 30 registers at 128x128, one program per SM instead of two.
        ncols = tl.load(row + T_NCOLS)
        pid_m = tl.where(ncols > 0, pid_m, 0)
        pid_n = tl.where(ncols > 0, pid_n, 0)
        if KS > 1 and KIND == 0:  # a K slice: its partial sums, for the second launch
            offs_m, m_ok, _i, _y, _x = _pixels(pid_m, m_total, oh, ow, BLOCK_M)
            offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
            # (offsets multiples of ALIGN: every split problem's ncols is)
            # (one pointer add of an int32 offset tile to a scalar base: with the slice's row in
            # the tile's offsets, Triton 3.6 held 64-bit pointers for the tile, 216-254 registers)
            base = part_ptr + tl.multiple_of(part_off, ALIGN) + kslice * m_total * ncols
            tl.store(base + (offs_m[:, None] * ncols + offs_n[None, :]), acc,
                     mask=m_ok[:, None] & (offs_n < ncols)[None, :])
        else:
            _epilogue(acc, row, S, scale_ptr, shift_ptr, bufs, raws, stats_ptr, center_ptr, pid_m, pid_n, m_total, oh,
                      ow, LAYOUT, BLOCK_M, BLOCK_N, ACC, TRAIN)


@triton.jit
def _initial(row, shift_ptr, offs_n, n_ok, BLOCK_M: tl.constexpr, ACC: tl.constexpr):
    """A tile's accumulator before its K loop: each column's shift (inference: BatchNorm's shift
    and the conv bias, its scale being in the weights; training: the conv bias), so that the
    epilogue holds no per-column values (64 registers a thread at 128x128; training's residual
    head still loads its scale)."""
    shift = tl.load(shift_ptr + tl.load(row + T_SS_OFF) + offs_n, mask=n_ok, other=0.0).to(ACC)
    return tl.zeros((BLOCK_M, offs_n.shape[0]), dtype=ACC) + shift[None, :]


@triton.jit
def _epilogue(acc, row, S: tl.constexpr, scale_ptr, shift_ptr, bufs, raws, stats_ptr, center_ptr, pid_m, pid_n, m_total,
              oh, ow, LAYOUT: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, ACC: tl.constexpr,
              TRAIN: tl.constexpr):
    """The end of tile (pid_m, pid_n) of an oh x ow map of m_total pixels (its accumulator
    started at the shift: _initial): the residual scale (training), residual, statistics
    (training), activation, stores (see _problem: `row` is the problem's table row, S its spec)."""
    dtype = bufs[0][0].dtype.element_ty  # (the buffers' one dtype)
    KIND: tl.constexpr = S[I_KIND]
    DST0: tl.constexpr = S[I_DST0]
    DST1: tl.constexpr = S[I_DST1]
    SPLIT: tl.constexpr = S[I_SPLIT]
    RES: tl.constexpr = S[I_RES]
    ACT: tl.constexpr = S[I_ACT]
    SLOPE: tl.constexpr = S[I_SLOPE]
    BN: tl.constexpr = S[I_BN]
    ALIGN: tl.constexpr = S[I_ALIGN]
    DALIGN: tl.constexpr = S[I_DALIGN]
    offs_m, m_ok, img, oy, ox = _pixels(pid_m, m_total, oh, ow, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = offs_n < tl.load(row + T_NCOLS)
    ss_off = tl.load(row + T_SS_OFF)
    # Epilogue while the accumulator is still wide. Inference: BatchNorm and bias are already in
    # (the plan folds the scale into the weights, _initial starts from the shift). Training: the
    # accumulator holds conv + bias; a residual head's (the only problem whose scale is not 1)
    # is scaled, (acc + shift) * scale, and BatchNorm comes after (kernels.batchnorm).
    if TRAIN and RES != 0:
        acc = acc * tl.load(scale_ptr + ss_off + offs_n, mask=n_ok, other=0.0).to(ACC)[None, :]
    if RES != 0:  # residual: the block input at the same pixel and channel, or a slice of `mid`
        # (a projection shortcut's result); both have the output's H and W
        RES_BUF: tl.constexpr = 0 if RES == 1 else 2
        res_c = 0
        if RES == 2:
            res_c = tl.multiple_of(tl.load(row + T_RES_C), ALIGN)
        xp, _xh, _xw, xs_n, xs_h, xs_w, xs_c = _view(RES_BUF, bufs, LAYOUT)
        if not TRAIN:
            # Inference rounds the scaled up-projection to the storage dtype first, as eager
            # does (`up * scale` is a tensor of its own there): the accumulator becomes 32
            # registers a thread at 128x128 before the residual tile's 32 arrive, and the
            # kernel fits two programs per SM (143 registers when added to the fp32 sum).
            acc = acc.to(dtype).to(ACC)
        acc += tl.load(xp + (img * xs_n + oy * xs_h + ox * xs_w)[:, None] + ((res_c + offs_n) * xs_c)[None, :],
                       mask=m_ok[:, None] & n_ok[None, :], other=0.0).to(ACC)
    pre = acc.to(dtype)  # the pre-activation as stored (and as eager rounds it)
    # The activation reads the pre-activation rounded to the storage dtype, as eager's reads
    # its input tensor. ReLU, ReLU6 and none only select values: rounding commutes with them
    # and they run on the wider value (inference: `acc`, dead after) or, in training, on the
    # stored `pre` itself (so that the accumulator is dead here: `pre` stays alive for its
    # own store). The others compute in fp32 from the rounded value.
    if ACT <= 2:
        if TRAIN:
            y = _activate(pre, ACT, SLOPE)
        else:
            y = _activate(acc, ACT, SLOPE).to(dtype)
    else:
        y = _activate(pre.to(ACC), ACT, SLOPE).to(dtype)

    if SPLIT:  # columns < split to dst0, the rest to dst1
        split = tl.multiple_of(tl.load(row + T_SPLIT), DALIGN)
        _store(DST0, tl.multiple_of(tl.load(row + T_DST0_C), DALIGN), n_ok & (offs_n < split), y, pre, img, oy, ox,
               m_ok, offs_n, bufs, raws, KIND, BN, DALIGN, LAYOUT, TRAIN)
        _store(DST1, tl.multiple_of(tl.load(row + T_DST1_C) - split, DALIGN), n_ok & (offs_n >= split), y, pre,
               img, oy, ox, m_ok, offs_n, bufs, raws, KIND, BN, DALIGN, LAYOUT, TRAIN)
    else:
        _store(DST0, tl.multiple_of(tl.load(row + T_DST0_C), DALIGN), n_ok, y, pre, img, oy, ox, m_ok, offs_n, bufs,
               raws, KIND, BN, DALIGN, LAYOUT, TRAIN)
    if TRAIN and BN:
        _statistics(row, S, stats_ptr, center_ptr, ss_off, pid_n, m_ok, img, oy, ox, bufs, raws, LAYOUT, BLOCK_N, ACC)


@triton.jit
def _statistics(row, S: tl.constexpr, stats_ptr, center_ptr, ss_off, pid_n, m_ok, img, oy, ox, bufs, raws,
                LAYOUT: tl.constexpr, BLOCK_N: tl.constexpr, ACC: tl.constexpr):
    """Training: add the batch statistics of the pre-activations the tile (pixels img, oy, ox,
    of which m_ok are inside; column block pid_n) has just stored to its shadows (per column:
    the sum and the sum of squares of value - centre, and the count, over the tile's pixels) to
    stats. They are read back 16 columns at a time: summed from
    the accumulator's layout, where a thread holds 32 of the 128 columns, the centres and the
    two sums took 64 registers a thread more than the rest of the kernel at 128x128 (one program
    per SM instead of two). The barrier makes the tile's stores visible to all its threads."""
    DST0: tl.constexpr = S[I_DST0]
    DST1: tl.constexpr = S[I_DST1]
    SPLIT: tl.constexpr = S[I_SPLIT]
    DALIGN: tl.constexpr = S[I_DALIGN]
    tl.debug_barrier()
    CN: tl.constexpr = min(BLOCK_N, 32 if _INTERPRETING else 16)  # (the interpreter's cost is per op)
    ncols = tl.load(row + T_NCOLS)
    split = ncols
    if SPLIT:
        split = tl.multiple_of(tl.load(row + T_SPLIT), DALIGN)
    _d, _h, _w, d_n, d_h, d_w, d_c = _view(DST0, bufs, LAYOUT)
    rows0 = raws[DST0 - 1] + (img * d_n + oy * d_h + ox * d_w)
    c0 = tl.multiple_of(tl.load(row + T_DST0_C), DALIGN)
    _d, _h, _w, e_n, e_h, e_w, e_c = _view(DST1, bufs, LAYOUT)
    rows1 = raws[DST1 - 1] + (img * e_n + oy * e_h + ox * e_w)
    c1 = tl.multiple_of(tl.load(row + T_DST1_C) - split, DALIGN)
    count = tl.sum(m_ok.to(ACC), 0)
    for j in tl.static_range(BLOCK_N // CN):
        offs_n = pid_n * BLOCK_N + j * CN + tl.arange(0, CN)
        n_ok = offs_n < ncols
        mask = m_ok[:, None] & n_ok[None, :]
        # (columns < split were stored to dst0's shadow, the others to dst1's: disjoint masks)
        v = tl.load(rows0[:, None] + ((c0 + offs_n) * d_c)[None, :], mask=mask & (offs_n < split)[None, :],
                    other=0.0).to(ACC)
        if SPLIT:
            v += tl.load(rows1[:, None] + ((c1 + offs_n) * e_c)[None, :], mask=mask & (offs_n >= split)[None, :],
                         other=0.0).to(ACC)
        ss_col = ss_off + offs_n
        center = _load_center(center_ptr, ss_col, n_ok, ACC)
        v = tl.where(mask, v - center[None, :], 0.0)
        tl.atomic_add(stats_ptr + ss_col * 3, tl.sum(v, 0), mask=n_ok)
        tl.atomic_add(stats_ptr + ss_col * 3 + 1, tl.sum(v * v, 0), mask=n_ok)
        tl.atomic_add(stats_ptr + ss_col * 3 + 2, tl.zeros((CN,), ACC) + count, mask=n_ok)


@triton.jit
def _store(DST: tl.constexpr, c_base, col_ok, y, pre, img, oy, ox, m_ok, offs_n, bufs, raws, KIND: tl.constexpr,
           BN: tl.constexpr, ALIGN: tl.constexpr, LAYOUT: tl.constexpr, TRAIN: tl.constexpr):
    """Write the columns `col_ok` of a tile to buffer DST at channel c_base + column (training:
    the pre-activations to DST's shadow, raws[0] for the output, raws[1] for `mid`, too)."""
    dst, _h, _w, d_n, d_h, d_w, d_c = _view(DST, bufs, LAYOUT)
    col = c_base + offs_n  # (c_base carries its alignment hint: hints on a parameter are lost)
    offset = (img * d_n + oy * d_h + ox * d_w)[:, None] + (col * d_c)[None, :]
    mask = m_ok[:, None] & col_ok[None, :]
    if TRAIN:
        if KIND != 2:  # what the backward pass needs: the pre-activation (shadows: DST's strides)
            tl.store(raws[DST - 1] + offset, pre, mask=mask)
        if not BN:  # with BatchNorm the result is written by bn_apply once the statistics are complete
            tl.store(dst + offset, y, mask=mask)
    else:
        tl.store(dst + offset, y, mask=mask)


@triton.jit
def _tiles(P: tl.constexpr, S: tl.constexpr, table_ptr, batch, bufs, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """(programs, partial sums) of problem P (spec S): ceil(M / BLOCK_M) * ceil(ncols / BLOCK_N)
    programs, ks times that for a split K slice's; ks * M * ncols partial sums for a split
    problem (K slices or their reduction), else 0. KIND_SKIP: none."""
    KIND: tl.constexpr = S[I_KIND]
    KS: tl.constexpr = S[I_KS]
    _d, h, w, _n, _h, _w, _c = bufs[S[I_DST0]]
    m = batch * h * w
    ncols = tl.load(table_ptr + P * ROW + T_NCOLS)
    tiles = tl.cdiv(m, BLOCK_M) * tl.cdiv(ncols, BLOCK_N)
    if KIND == 6:
        tiles = 0
    elif KIND == 0 and KS > 1:
        tiles = tiles * KS
    parts = 0
    if KS > 1:
        parts = KS * m * ncols
    return tiles, parts


@triton.jit(do_not_specialize=["batch", "x_h", "x_w", "x_sn", "x_sh", "x_sw", "x_sc", "o_h", "o_w", "o_sn", "o_sh",
                               "o_sw", "o_sc", "m_h", "m_w", "m_sn", "m_sh", "m_sw", "m_sc", "tune_m", "tune_n",
                               "tune_k"])
def _stage_kernel(
    # problem table: int32 [len(SPEC), len(TABLE_FIELDS)]
    table_ptr,
    # the stage's packed weight matrices, and per output column a scale (training) and a shift
    w_ptr, scale_ptr, shift_ptr,
    # the three buffers, logical NCHW addressed through strides (a channels_last buffer's row
    # pitches in units of 8: see _view)
    x_ptr, out_ptr, mid_ptr,
    # TRAIN only: shadows of `out` and `mid` (same strides) receiving the pre-activations; fp32
    # [columns, 3] accumulators of (sum, sum of squares, count) of the pre-activations minus a
    # per-column centre (the running mean: it keeps the sum of squares free of cancellation)
    raw_out_ptr, raw_mid_ptr, stats_ptr, center_ptr,
    # split K: the partial sums of the split problems, one [ks, M, ncols] block each in problem
    # order, ACC (written by the K slices' launch, read by the reduction's)
    part_ptr,
    batch,
    x_h, x_w, x_sn, x_sh, x_sw, x_sc,
    o_h, o_w, o_sn, o_sh, o_sw, o_sc,
    m_h, m_w, m_sn, m_sh, m_sw, m_sc,
    # autotune keys only (bucketed sizes of the stage), unused in the body
    tune_m, tune_n, tune_k,
    # meta-parameters
    SPEC: tl.constexpr,  # tuple of problem specs (see SPEC_FIELDS)
    LAYOUT: tl.constexpr,  # (X_UNIT, OUT_UNIT, MID_UNIT: channels_last with pitches multiples of 8
    # or 4, else 0; INT64: some buffer has 2**31 elements or more)
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    DOT_IN_FP32: tl.constexpr,  # cast tiles to fp32 before tl.dot (interpreter with bf16)
    INPUT_PRECISION: tl.constexpr,  # "ieee" or "tf32" for fp32 operands
    ACC: tl.constexpr,  # accumulator dtype: fp32 (fp64 for float64 tensors)
    TRAIN: tl.constexpr,  # training epilogue (see _problem)
):
    bufs = ((x_ptr, x_h, x_w, x_sn, x_sh, x_sw, x_sc), (out_ptr, o_h, o_w, o_sn, o_sh, o_sw, o_sc),
            (mid_ptr, m_h, m_w, m_sn, m_sh, m_sw, m_sc))
    raws = (raw_out_ptr, raw_mid_ptr)
    pid = tl.program_id(0)
    start = 0
    part_off = 0
    for p in tl.static_range(len(SPEC)):
        # the problem's N tile: min(BLOCK_N, its tn) (a constexpr per problem, passed wrapped)
        # (tuples of constants passed on wrapped in tl.constexpr: Triton 3.6 takes a bare one for
        # a tuple of runtime values and fails)
        tiles, parts = _tiles(p, tl.constexpr(SPEC[p]), table_ptr, batch, bufs, BLOCK_M,
                              tl.constexpr(min(BLOCK_N, SPEC[p][I_TN])))
        if SPEC[p][I_KIND] != 6:
            if (pid >= start) & (pid < start + tiles):
                _problem(pid - start, p, tl.constexpr(SPEC[p]), table_ptr, w_ptr, scale_ptr, shift_ptr, bufs, raws,
                         stats_ptr, center_ptr, part_ptr, part_off, batch, tl.constexpr(LAYOUT), BLOCK_M,
                         tl.constexpr(min(BLOCK_N, SPEC[p][I_TN])), BLOCK_K, DOT_IN_FP32,
                         INPUT_PRECISION, ACC, TRAIN)
        start += tiles
        part_off += parts


# ----------------------------------------------------------------------------------------------
# Host side: autotuning, launches, the launch counter


def _bucket(n):
    """Autotune key for a size: the next power of two, so batch changes don't re-tune each time."""
    return triton.next_power_of_2(max(int(n), 1))


def configs_for(spec, dtype=None, training=False):
    """The configs a stage of `spec` with inputs of `dtype` (in `training`: the training variant,
    whose weights stay fp32 under autocast) is tuned over: all of CONFIGS, but
    - the smallest tile for a stage with a few-channel convolution (KIND_GEMM_FLAT: its gathered
      A tile needs the registers that larger tiles give to the accumulator);
    - 64-wide N tiles for a stage with a padded-input convolution (KIND_GEMM_TAPS: a stem, whose
      32 or 64 output channels would leave a 128-wide tile half padding);
    - in fp32 or training, not 128x64 on 4 warps for a stage with a pool (pooled 1x1 or pool
      alone): its pooled tiles beside the accumulator spill (4-184 bytes in Inception v3's,
      compiled for sm_90: fused_inception.codegen);
    - in fp32, not BLOCK_N 128 for a stage with a residual (Inception-ResNet's up-projection):
      the fp32 residual tile beside the accumulator spills (8-16 bytes);
    - 4 warps only for a stage with a convolution whose weight tile (N tile x K chunk, spec
      fields tn and tk) has fewer than 2048 elements (64 x 16, 32 x 32, 16 x 64): 8 warps' copies
      of it would be narrower than 16 bytes."""
    kinds = {spec_field(p, "kind") for p in spec}
    configs = CONFIGS
    if any(spec_field(p, "kind") == KIND_GEMM and min(128, spec_field(p, "tn")) * k_chunk(p) < 2048 for p in spec):
        configs = [c for c in configs if c.num_warps == 4]
    if KIND_GEMM_FLAT in kinds:
        return [c for c in configs if c.kwargs["BLOCK_M"] * c.kwargs["BLOCK_N"] <= 64 * 64]
    if KIND_GEMM_TAPS in kinds:  # (a stem: 32 or 64 output channels, a 128-wide tile half padding)
        return [c for c in configs if c.kwargs["BLOCK_N"] <= 64]
    if (dtype == torch.float32 or training) and kinds & {KIND_POOLED_GEMM, KIND_POOL}:
        configs = [c for c in configs if not (c.kwargs["BLOCK_M"] == 128 and c.kwargs["BLOCK_N"] == 64
                                              and c.num_warps == 4)]
    if dtype == torch.float32 and any(spec_field(p, "res") for p in spec):
        configs = [c for c in configs if c.kwargs["BLOCK_N"] < 128]
    return configs


def _prune(configs, named_args, **kwargs):
    allowed = configs_for(kwargs["SPEC"], named_args["x_ptr"].dtype, kwargs["TRAIN"])
    return [c for c in configs if c in allowed]


_TUNE_KEY = ["tune_m", "tune_n", "tune_k", "SPEC", "LAYOUT", "INPUT_PRECISION", "TRAIN"]
if INTERPRETING:
    _eval_tuner = _train_tuner = None
else:
    _eval_tuner = triton.autotune(configs=CONFIGS, key=_TUNE_KEY, prune_configs_by={"early_config_prune": _prune})(
        _stage_kernel)
    # Benchmarking runs the kernel once per config: the training statistics are accumulated with
    # atomics, so they are zeroed before each trial (and before the real launch).
    _train_tuner = triton.autotune(configs=CONFIGS, key=_TUNE_KEY, reset_to_zero=["stats_ptr"],
                                   prune_configs_by={"early_config_prune": _prune})(_stage_kernel)

_pinned = None  # a triton.Config every launch uses instead of autotuning (pin_config)
_pin_generation = 0  # changed by every pin_config: kernels picked before are picked again


def config_name(config):
    """A config's name, e.g. "m128n64k64w4s4": BLOCK_M, BLOCK_N, BLOCK_K, warps, pipeline stages."""
    k = config.kwargs
    return f"m{k['BLOCK_M']}n{k['BLOCK_N']}k{k['BLOCK_K']}w{config.num_warps}s{config.num_stages}"


CONFIG_NAMES = tuple(config_name(c) for c in CONFIGS)
# The config of the fewest registers and shared memory, which every stage may run under
# (configs_for keeps it): what runs pinned when one config is enough (bench/quick.py).
SMALLEST = "m64n64k64w4s3"


def pin_config(name):
    """Make every stage launch use the config named `name` (one of CONFIG_NAMES; no autotuning);
    None restores autotuning.

    For checking each config on its own (e.g. with outputs pre-filled with NaN), and for results
    that don't depend on which config a process's autotuning picked (the K chunk decides the fp32
    summation order). Also set by the environment variable FUSED_INCEPTION_CONFIG=<name>.

    Example:
        >>> pin_config(SMALLEST); ...; pin_config(None)
    """
    global _pinned, _pin_generation
    if name is not None and name not in CONFIG_NAMES:
        raise ValueError(f"no stage config named {name!r}: one of {', '.join(CONFIG_NAMES)}")
    _pinned = None if name is None else CONFIGS[CONFIG_NAMES.index(name)]
    _pin_generation += 1


if os.environ.get("FUSED_INCEPTION_CONFIG", "") != "":
    pin_config(os.environ["FUSED_INCEPTION_CONFIG"])

_launches = 0
_recorder = None  # a list while recording (see recording())


@contextlib.contextmanager
def recording():
    """Record the launches made inside the block instead of running them: yields a list that
    receives (kernel, args, constexprs, configs) per launch (configs: the triton.Configs the
    launch may run under). Kernels see CPU tensors as launchable while recording (nothing is
    computed: outputs are left as allocated). For fused_inception.codegen."""
    global _recorder
    previous, _recorder = _recorder, []
    try:
        yield _recorder
    finally:
        _recorder = previous


def is_recording():
    return _recorder is not None


def launch_count():
    """Number of kernel launches made by this package's kernels since import (read by count_launches)."""
    return _launches


def count_launch():
    """Called once per kernel launch by every launcher in fused_inception.kernels."""
    global _launches
    _launches += 1


def hidden_from_dispatch():
    """Hide the torch ops a launch may run on the host from dispatch modes (launch counters,
    tracers), as a GPU launch is hidden: the interpreter emulates launches with torch ops, and
    the autotuner's benchmarking zeroes buffers and flushes the L2 cache with them."""
    return _disable_current_modes()


def accumulator(dtype):
    """The Triton accumulator dtype for tensors of `dtype`: fp32, or fp64 for float64."""
    return tl.float64 if dtype == torch.float64 else tl.float32


def _precision_getters():
    """Readers of torch's fp32 precision settings, most specific first: cuDNN conv, cuDNN, global
    (the API of torch 2.9 and later), or None on older torch."""
    getter = getattr(torch._C, "_get_fp32_precision_getter", None)
    if getter is None:
        return None
    try:
        getter("cuda", "conv")
    except Exception:  # noqa: BLE001 - an older spelling of the API
        return None
    return (lambda: getter("cuda", "conv"), lambda: getter("cuda", "all"), lambda: getter("generic", "all"))


_PRECISION_GETTERS = _precision_getters()


def fp32_precision():
    """"tf32" if eager fp32 convolutions may use TF32 now, else "ieee": the most specific of
    torch's precision settings that says either (torch.backends.cudnn.conv.fp32_precision, then
    torch.backends.cudnn.fp32_precision, then torch.backends.fp32_precision; "none" defers to the
    next, and to "ieee" at the end), else (older torch) torch.backends.cudnn.allow_tf32. Reading
    allow_tf32 itself raises once the new API set different values for cuDNN conv and RNN."""
    if _PRECISION_GETTERS is None:
        return "tf32" if torch.backends.cudnn.allow_tf32 else "ieee"
    for get in _PRECISION_GETTERS:
        value = get()
        if value in ("tf32", "ieee"):
            return value
    return "ieee"


def kernel_geometry(t, channels_last, unit=8):
    """(H, W, stride N, stride H, stride W, stride C) as the kernels take them: a channels_last
    buffer's row pitches in units of `unit` (see _view in the kernel)."""
    s_n, s_c, s_h, s_w = t.stride()
    if channels_last:
        return (t.shape[2], t.shape[3], s_n // unit, s_h // unit, s_w // unit, 1)
    return (t.shape[2], t.shape[3], s_n, s_h, s_w, s_c)


def _channels_last(t, unit=8):
    """True if t's channels are contiguous and its row pitches multiples of `unit`: what the
    kernels' alignment hints for a channels_last buffer assume (else they read it through its
    strides). The stride of a dimension of size 1 is never used: a [N, C, 1, 1] map is
    channels_last in either memory format."""
    n, c, h, w = t.shape
    s_n, s_c, s_h, s_w = t.stride()
    return ((s_c == 1 or c == 1) and s_n % unit == 0 and (s_h % unit == 0 or h == 1)
            and (s_w % unit == 0 or w == 1))


def _pitch_unit(t):
    """The stage kernel's LAYOUT entry for t: 8 or 4 if channels_last with row pitches multiples
    of that (4: an input padded to TAP_CHANNELS), else 0."""
    return next((unit for unit in (8, 4) if _channels_last(t, unit)), 0)


def conv_stage(spec, table, ncols, depth, weight, scale, shift, x, out, mid, raw_out=None, raw_mid=None, stats=None,
               center=None):
    """Run one stage: every problem of `spec` in a single launch.

    Args:
        spec: tuple of ProblemSpec (see problem_spec and SPEC_FIELDS), one per problem.
        table: int32 tensor [len(spec), len(TABLE_FIELDS)] on x's device (see TABLE_FIELDS).
        ncols, depth: host copies, per problem: output columns (the launch grid) and GEMM depth
            kh*kw*cin (the autotune key).
        weight: 1-D tensor of packed weight matrices: problem p's element (k, n) at
            w_off + n * w_ld + k of its row (an [ncols, K] matrix with row pitch w_ld, K ordered
            (tap, input channel): nn.Conv2d's weight in channels_last order). Loaded in its
            dtype, rounded to x's.
        scale, shift: 1-D tensors; problem p's columns start at its row's ss_off. Inference:
            scale is None (the plan folds BatchNorm's scale into the weights; the accumulator
            starts at shift). Training: (acc + shift) * scale, scale read only by a residual
            head (problems with `res`; 1 elsewhere).
        x, out, mid: 4-D logical NCHW tensors of one floating dtype (fp32, fp16 or bf16; float64
            is accepted for tests), any strides (channels_last is the fast path); `mid` may be
            `out` when unused. `out`/`mid` slices named by the table are overwritten.
        raw_out, raw_mid, stats, center: training only (all or none): tensors shaped like `out`
            and `mid` (same strides) that receive the pre-activations of the convolutions; a
            zero-initialised [columns, 3] tensor of the accumulator dtype that receives, per
            column of the problems whose spec has `bn`, the sum and the sum of squares of
            (pre-activation - center[column]) and the count over the batch; and the 1-D
            centres (any float dtype; the running means). Those problems' results are not
            written to `out`/`mid` (kernels.batchnorm.bn_apply does it).

    Example (one 1x1 convolution of x's 16 channels into out's first 32):
        >>> spec = (problem_spec(),)
        >>> table = torch.tensor([[16, 32, 0, 32, 0, 0, 0, 16, 0, 0]], dtype=torch.int32, device="cuda")
        >>> conv_stage(spec, table, (32,), (16,), w, None, shift, x, out, out)  # w: [32, 16] flattened
    """
    if x.shape[0] == 0:
        return
    StageLaunch(spec, table, ncols, depth, x, out, mid, training=stats is not None)(
        weight, scale, shift, x, out, mid, raw_out, raw_mid, stats, center)


class CachedLaunch:
    """A kernel's launch for arguments of one shape and layout, the same every call: constexprs,
    scalar arguments (`tail`), grid and, on a GPU, the compiled kernel Triton picked, worked out
    once. The first call goes through Triton (autotuning when the kernel has a tuner: the
    configs benchmarked, hidden from dispatch modes such as launch counters; then compiling);
    later calls go straight to the compiled kernel's launcher, a few microseconds of host time.
    Under the interpreter, or while recording (fused_inception.codegen), every call goes through
    Triton.

    Every launcher of this package is one (kernels.conv.StageLaunch, kernels.batchnorm's), and
    every caller keeps them: fused_inception.plan.Plan and training.TrainPlan per input shape.
    Subclasses set `kernel`, `tuner` (or None), `meta_names` (the kernel's constexpr parameters
    after the runtime ones, signature order) and call `_init` then `launch(tensors)`.

    The compiled kernel assumes what Triton saw of the first call's pointers (16-byte alignment
    or not). The tensors in `checked` (indices into `tensors`) are the caller's (the block input,
    the gradient autograd passes): the kernel is kept only if they were aligned at the first
    call, and used only while they are. The others are this package's: fresh allocations, or
    views at offsets a plan fixes, aligned the same way every call."""

    __slots__ = ("consts", "tail", "device", "cuda_index", "checked", "precision", "pin", "run", "meta",
                 "tail_meta", "config", "_grid_of")
    kernel = None
    tuner = None
    meta_names = ()
    interpreter_meta = {}  # meta-parameters under the interpreter (where nothing is tuned)

    def _init(self, consts, tail, device, grid_of, checked=(), config=None, fp32=False):
        """grid_of(meta) -> the grid for a config's meta-parameters; config: the triton.Config
        the launch always runs under (None: autotuned or pinned, see pin_config); fp32: the
        kernel takes fp32 operands (constexpr INPUT_PRECISION follows torch's TF32 settings)."""
        self.consts, self.tail, self.device, self._grid_of = consts, tuple(tail), device, grid_of
        self.cuda_index = device.index if device.type == "cuda" else None
        self.checked, self.config = checked, config
        self.precision = consts["INPUT_PRECISION"] if fp32 else None
        self.pin = _pin_generation
        self.run = self.meta = self.tail_meta = None

    def launch(self, tensors):
        run = self.run
        if (run is not None and self.pin == _pin_generation
                and (self.precision is None or fp32_precision() == self.precision)):
            for i in self.checked:
                if tensors[i].data_ptr() % 16:
                    break
            else:
                if self.cuda_index is None or self.cuda_index == torch.cuda.current_device():
                    run(*tensors, *self.tail_meta)
                else:
                    with torch.cuda.device(self.device):  # the kernel runs on the current device
                        run(*tensors, *self.tail_meta)
                global _launches
                _launches += 1
                return
        self._first_launch(tensors)
        count_launch()

    def _configs(self):
        """The configs this launch may run under (a launch with a tuner defines tuned_configs and
        tuning_key: the configs it is tuned over, and what its pick depends on)."""
        if self.config is not None:
            return [self.config]
        return [_pinned] if _pinned is not None else self.tuned_configs()

    def _config_named(self, name):
        """The config of that name if this launch may run under it, else None."""
        return next((c for c in self.tuned_configs() if config_name(c) == name), None) if name else None

    def _first_launch(self, tensors):
        args = (*tensors, *self.tail)
        if self.precision is not None:  # TF32 or not, as eager convolutions now
            self.consts["INPUT_PRECISION"] = self.precision = fp32_precision()
        self.pin = _pin_generation
        consts = self.consts
        if _recorder is not None:
            _recorder.append((self.kernel, args, dict(consts), self._configs()))
            return
        if INTERPRETING:
            meta = dict(consts, **self.interpreter_meta)
            with hidden_from_dispatch():
                self.kernel[self._grid_of(meta)](*args, **meta)
            return
        guard = (torch.cuda.device(self.device)
                 if self.cuda_index is not None and self.cuda_index != torch.cuda.current_device()
                 else contextlib.nullcontext())
        config = self.config if self.config is not None else _pinned
        key = None
        if config is None:  # a pick an earlier process made (kernels.tuning), else autotuning
            key = self.tuning_key()
            config = self._config_named(tuning.lookup(self.device, self.kernel, key))
        with guard, hidden_from_dispatch():
            if config is None:
                compiled = self.tuner[self._grid_of](*args, **consts)
                config = self.tuner.best_config
                tuning.remember(self.device, self.kernel, key, config_name(config))
            else:
                compiled = self.kernel[self._grid_of](*args, **consts, **config.all_kwargs())
        if all(tensors[i].data_ptr() % 16 == 0 for i in self.checked):
            meta = dict(consts, **config.kwargs)
            self.run = compiled[self._grid_of(meta)]  # (Triton's launcher for this grid)
            self.meta = tuple(meta[name] for name in self.meta_names)
            self.tail_meta = self.tail + self.meta


# Split K (issue 20, batch 1): a stage launch that gives an H100 fewer programs than half its 132
# SMs under the largest tile splits the K loop of each convolution that runs more than
# SPLIT_ITERATIONS iterations into a power of two of slices of at most SPLIT_SLICE (their partial
# sums reduced in order by a second launch: KIND_REDUCE). Larger launches fill the GPU with tiles
# alone.
SPLIT_PROGRAMS = 66
SPLIT_ITERATIONS = 16
SPLIT_SLICE = 8
# The largest tile of CONFIGS, under which a launch has the fewest programs.
_LARGEST_M = max(c.kwargs["BLOCK_M"] for c in CONFIGS)
_LARGEST_N = max(c.kwargs["BLOCK_N"] for c in CONFIGS)
# The second launch's config: no GEMM, a [64, 64] tile of ks loads, the epilogue.
REDUCE_CONFIG = triton.Config({"BLOCK_M": 64, "BLOCK_N": 64, "BLOCK_K": 64}, num_warps=4, num_stages=1)


def k_chunk(spec, fp32=False, block_k=64):
    """The K chunk of a KIND_GEMM problem (spec) under a config's BLOCK_K: half of it for fp32
    operands, capped by the problem's tk."""
    bk = block_k // 2 if fp32 else block_k
    tk = spec_field(spec, "tk")
    return min(bk, tk) if tk else bk


def k_iterations(spec, cin, fp32=False, block_k=64):
    """The K loop's iterations of a KIND_GEMM problem (spec) of `cin` input channels (a tap's
    channels in chunks of k_chunk)."""
    return spec_field(spec, "kh") * spec_field(spec, "kw") * -(-cin // k_chunk(spec, fp32, block_k))


def split_counts(spec, sizes, ncols, cins, fp32=False):
    """Per problem of a stage, its K slices (spec field ks): 1 unless the launch has fewer than
    SPLIT_PROGRAMS programs under the largest config (_LARGEST_M x _LARGEST_N, 128x128: every
    config gives at least as many) and the problem is a convolution (KIND_GEMM) of more than
    SPLIT_ITERATIONS K iterations; then ceil(iterations / SPLIT_SLICE) rounded up to a power of
    two (the count is a compile-time constant of both launches: fewer distinct kernels). sizes:
    output pixels (batch x H x W) per problem; cins: its input channels."""
    programs = sum(-(-m // _LARGEST_M) * -(-n // min(_LARGEST_N, spec_field(p, "tn")))
                   for p, m, n in zip(spec, sizes, ncols))
    if programs >= SPLIT_PROGRAMS:
        return (1,) * len(spec)
    counts = []
    for p, cin in zip(spec, cins):
        iters = k_iterations(p, cin, fp32) if spec_field(p, "kind") == KIND_GEMM else 0
        counts.append(1 << (-(-iters // SPLIT_SLICE) - 1).bit_length() if iters > SPLIT_ITERATIONS else 1)
    return tuple(counts)


_SKIP = problem_spec(kind=KIND_SKIP)  # (a KIND_SKIP problem's other fields are never read)


def _reduction(spec):
    """The KIND_REDUCE problem that finishes split problem `spec`: its epilogue's fields (outputs,
    residual, activation, statistics, alignments, slices) kept, its convolution's and its N tile
    dropped (the reduction's tiles are REDUCE_CONFIG's), so that split problems of one epilogue
    share the reduction kernel."""
    f = dict(zip(SPEC_FIELDS, spec))
    return problem_spec(kind=KIND_REDUCE, dst0=f["dst0"], dst1=f["dst1"], split=f["split"], res=f["res"],
                        act=f["act"], slope=f["slope"], bn=f["bn"], align=f["align"], dalign=f["dalign"], ks=f["ks"])


class StageLaunch(CachedLaunch):
    """The launch of one stage (see conv_stage for the arguments) for buffers of one shape and
    layout, inference or training (`training`: the pre-activations and statistics variant).
    Build it with buffers of the shape and strides the calls will pass; call it with the
    stage's weights and the buffers: `launch(weight, None, shift, x, out, mid)` (training: a
    scale, and raw_out, raw_mid, stats, center). x may come at another 16-byte alignment later (it is
    checked per call).

    A stage of few programs (split_counts) is two launches: its split problems' K slices write
    partial sums to a workspace allocated per call, and `finish`, a launch of the same kernel
    whose problems are KIND_REDUCE (the split ones) and KIND_SKIP (the others), adds them in
    slice order and runs the epilogue."""

    __slots__ = ("spec", "table", "ncols", "sizes", "tns", "training", "dtype", "finish", "part_numel", "acc_dtype")
    kernel = _stage_kernel
    interpreter_meta = INTERPRETER_CONFIG
    meta_names = ("SPEC", "LAYOUT", "BLOCK_M", "BLOCK_N", "BLOCK_K", "DOT_IN_FP32", "INPUT_PRECISION", "ACC", "TRAIN")

    def __init__(self, spec, table, ncols, depth, x, out, mid, training=False, config=None, split=True):
        batch = x.shape[0]
        o_hw = out.shape[2] * out.shape[3]
        m_hw = mid.shape[2] * mid.shape[3]
        dtype = x.dtype
        units = x_unit, out_unit, mid_unit = _pitch_unit(x), _pitch_unit(out), _pitch_unit(mid)
        sizes = tuple(batch * (o_hw if spec_field(p, "dst0") == BUF_OUT else m_hw) for p in spec)
        self.finish, self.part_numel = None, 0
        self.acc_dtype = torch.float64 if dtype == torch.float64 else torch.float32
        if split:
            cins = tuple(d // (spec_field(p, "kh") * spec_field(p, "kw")) for p, d in zip(spec, depth))
            ks = split_counts(spec, sizes, ncols, cins, fp32=dtype.itemsize > 2)
            if max(ks) > 1:
                spec = tuple(with_field(p, "ks", k) for p, k in zip(spec, ks))
                self.part_numel = sum(k * m * n for k, m, n in zip(ks, sizes, ncols) if k > 1)
                assert self.part_numel < 2**31  # (int32 offsets: splits only happen for small M)
                finish = tuple(_reduction(p) if k > 1 else _SKIP for p, k in zip(spec, ks))
                self.finish = StageLaunch(finish, table, ncols, depth, x, out, mid, training, REDUCE_CONFIG, False)
        self.spec, self.table, self.ncols, self.training = spec, table, tuple(ncols), training
        tail = (batch, *(g for t, unit in zip((x, out, mid), units) for g in kernel_geometry(t, unit > 0, unit or 8)),
                _bucket(batch * max(x.shape[2] * x.shape[3], o_hw, m_hw)), _bucket(sum(ncols)), _bucket(max(depth)))
        consts = dict(
            SPEC=spec, LAYOUT=(x_unit, out_unit, mid_unit, max(x.numel(), out.numel(), mid.numel()) >= 2**31),
            DOT_IN_FP32=INTERPRETING and dtype == torch.bfloat16,  # triton#11584: bf16 dot is wrong there
            INPUT_PRECISION=fp32_precision() if dtype == torch.float32 else "ieee",
            ACC=accumulator(dtype), TRAIN=training)
        self.sizes = sizes
        self.tns = tuple(spec_field(p, "tn") for p in spec)
        self.dtype = dtype
        self._init(consts, tail, x.device, self._grid, checked=(4,), config=config, fp32=dtype == torch.float32)

    @property
    def tuner(self):
        return _train_tuner if self.training else _eval_tuner

    def tuned_configs(self):
        return configs_for(self.spec, self.dtype, self.training)

    def tuning_key(self):
        # (the autotuner's key: bucketed sizes, spec, layout, precision, training; and the dtype)
        consts = self.consts
        return repr((self.tail[-3:], consts["SPEC"], consts["LAYOUT"], consts["INPUT_PRECISION"], self.training,
                     str(self.dtype)))

    def _grid(self, meta):
        programs = 0
        for p, m, n, tn in zip(self.spec, self.sizes, self.ncols, self.tns):
            kind = spec_field(p, "kind")
            if kind != KIND_SKIP:
                programs += (triton.cdiv(m, meta["BLOCK_M"]) * triton.cdiv(n, min(meta["BLOCK_N"], tn))
                             * (spec_field(p, "ks") if kind == KIND_GEMM else 1))
        return (programs,)

    def __call__(self, weight, scale, shift, x, out, mid, raw_out=None, raw_mid=None, stats=None, center=None):
        if not self.training:  # (inference: the scale and training pointers are unused, any tensor does)
            if scale is not None:
                raise ValueError("inference stages take no scale: fold it into the weights (fused_inception.plan)")
            scale, raw_out, raw_mid, stats, center = shift, out, mid, shift, shift
        # (split K: the partial sums, from the caching allocator; else unused, any tensor does)
        part = torch.empty(self.part_numel, dtype=self.acc_dtype, device=x.device) if self.finish else scale
        tensors = (self.table, weight, scale, shift, x, out, mid, raw_out, raw_mid, stats, center, part)
        self.launch(tensors)
        if self.finish is not None:
            self.finish.launch(tensors)
