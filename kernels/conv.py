"""One launch per stage: a grouped implicit-GEMM convolution over channel slices.

A *stage* is a group of convolutions ("problems") that can run at the same time because none
reads what another writes. Every problem is an implicit GEMM

    M = batch * OH * OW   (output pixels)      N = Cout   (output channels)
    K = KH * KW * Cin     (filter taps times input channels, tap-major)

    for each output pixel m and output channel n:
        acc = sum over taps (r, s) and channels c of  src[img, oh*SH - PH + r, ow*SW - PW + s, src_c + c] * w[(r*KW + s)*Cin + c, n]
        y   = acc * scale[n] + shift[n]          # folded BatchNorm and conv bias, in fp32
        y  += x[img, oh, ow, n] if RES           # Inception-ResNet: scale folded into scale/shift
        y   = max(y, 0) if RELU                  # NaN stays NaN, as in torch.relu
        dst[img, oh, ow, dst_c + n] = y          # a channel slice of the block output or of `mid`

A 1x1 problem may carry a pre-pool (max, average counting the padding, or average over the
taps inside the image; any window, stride and padding) applied to its input as the tile is
loaded: GoogLeNet's 3x3/s1/p1 max pool branch, Inception v3's average pool branches. A problem
may also be the pool alone (no GEMM: the pooled channels are the result), as in the stride-2 max
pool branch of Inception v3's grid-reduction blocks.

The tensors a stage touches are three buffers addressed by strides, so NCHW and NHWC are both
just a stride choice: `x` (the stage's block input), `out` (the block output) and `mid` (the
intermediate results of the branches that go on). A problem reads a channel slice of one buffer
and writes its first `split` columns to a slice of one buffer and the rest to a slice of another:
that is how the merged 1x1 reductions of an Inception block send the `branch1` columns to the
output and the reduce columns to `mid` in a single GEMM.

Problems are described by rows of a small int32 table on the device (built once per plan, see
`fused_inception.plan`); the programs of one launch are split between the problems by their
tile counts, so a stage is one launch however many convolutions it holds.
"""

import contextlib

import torch
from torch.utils._python_dispatch import _disable_current_modes
import triton
import triton.language as tl

# Autotuning (CUDA only: the interpreter cannot benchmark). Every config is tested on its own by
# the GPU test run; keep BLOCK_K >= 16 (fp16/bf16 dots need it on the GPU).
CONFIGS = [
    triton.Config({"BLOCK_M": 128, "BLOCK_N": 128, "BLOCK_K": 32}, num_warps=4, num_stages=3),
    triton.Config({"BLOCK_M": 128, "BLOCK_N": 64, "BLOCK_K": 32}, num_warps=4, num_stages=4),
    triton.Config({"BLOCK_M": 64, "BLOCK_N": 128, "BLOCK_K": 32}, num_warps=4, num_stages=4),
    triton.Config({"BLOCK_M": 64, "BLOCK_N": 64, "BLOCK_K": 32}, num_warps=4, num_stages=4),
    triton.Config({"BLOCK_M": 64, "BLOCK_N": 32, "BLOCK_K": 64}, num_warps=4, num_stages=3),
    triton.Config({"BLOCK_M": 32, "BLOCK_N": 64, "BLOCK_K": 32}, num_warps=2, num_stages=4),
]
# Under TRITON_INTERPRET=1 the cost is per program and per tl op, so fewer, larger tiles.
INTERPRETER_CONFIG = {"BLOCK_M": 64, "BLOCK_N": 64, "BLOCK_K": 128}

# True when the kernels in this module were decorated for Triton's CPU interpreter.
INTERPRETING = bool(triton.knobs.runtime.interpret)

# Buffer selectors used in the problem table.
BUF_X = 0  # the stage input (the block input)
BUF_OUT = 1  # the block output
BUF_MID = 2  # intermediate results

# Pool kinds, for a pre-pool on a 1x1 problem's input or a pool-only problem.
POOL_NONE = 0
POOL_MAX = 1
POOL_AVG = 2  # count_include_pad=True: divide by the window size
POOL_AVG_EXCLUDE_PAD = 3  # count_include_pad=False: divide by the taps inside the image

# Columns of the problem table, one int32 row per problem.
FIELDS = (
    "src", "src_c", "cin",  # source buffer, first channel of the slice, channels read
    "kh", "kw", "sh", "sw", "ph", "pw",  # filter size, stride, zero padding
    "pool", "pkh", "pkw", "psh", "psw", "pph", "ppw",  # pool kind, window, stride, padding
    "gemm",  # 1: convolution; 0: the pooled input channels are the result (ncols == cin)
    "ncols", "w_off", "ss_off",  # output channels, offsets into the stage's weight and scale/shift
    "w_sn", "w_sc", "w_st",  # weight strides along output channel, input channel and filter tap
    "split", "dst0", "dst0_c", "dst1", "dst1_c",  # columns < split -> dst0 slice, others -> dst1
    "res",  # 1: add x[img, oy, ox, col] before the ReLU (Inception-ResNet's residual)
    "relu",
    "bn",  # 1: training BatchNorm follows (see TRAIN in _conv_stage_kernel and kernels.batchnorm)
)
# Defaults of a row: a 1x1/stride-1 GEMM problem without pool or ReLU.
ROW_DEFAULTS = dict(src=BUF_X, src_c=0, kh=1, kw=1, sh=1, sw=1, ph=0, pw=0, pool=POOL_NONE, pkh=1, pkw=1,
                     psh=1, psw=1, pph=0, ppw=0, gemm=1, w_off=0, ss_off=0, w_sn=0, w_sc=0, w_st=0, res=0, relu=0,
                     bn=0)


def problem_row(**fields):
    """One table row (a list in FIELDS order); cin, ncols, split, dst0, dst0_c, dst1, dst1_c are
    required, and the weight strides w_sn, w_sc, w_st for a convolution."""
    row = dict(ROW_DEFAULTS, **fields)
    unknown = set(row) - set(FIELDS)
    missing = [f for f in FIELDS if f not in row]
    if unknown or missing:
        raise ValueError(f"problem row: unknown fields {sorted(unknown)}, missing {missing}")
    if row["gemm"] and not (row["w_sn"] and row["w_sc"] and row["w_st"]):
        raise ValueError("problem row: a convolution needs its weight strides w_sn, w_sc, w_st")
    return [int(row[f]) for f in FIELDS]


F_SRC = tl.constexpr(0)
F_SRC_C = tl.constexpr(1)
F_CIN = tl.constexpr(2)
F_KH = tl.constexpr(3)
F_KW = tl.constexpr(4)
F_SH = tl.constexpr(5)
F_SW = tl.constexpr(6)
F_PH = tl.constexpr(7)
F_PW = tl.constexpr(8)
F_POOL = tl.constexpr(9)
F_PKH = tl.constexpr(10)
F_PKW = tl.constexpr(11)
F_PSH = tl.constexpr(12)
F_PSW = tl.constexpr(13)
F_PPH = tl.constexpr(14)
F_PPW = tl.constexpr(15)
F_GEMM = tl.constexpr(16)
F_NCOLS = tl.constexpr(17)
F_W_OFF = tl.constexpr(18)
F_SS_OFF = tl.constexpr(19)
F_W_SN = tl.constexpr(20)
F_W_SC = tl.constexpr(21)
F_W_ST = tl.constexpr(22)
F_SPLIT = tl.constexpr(23)
F_DST0 = tl.constexpr(24)
F_DST0_C = tl.constexpr(25)
F_DST1 = tl.constexpr(26)
F_DST1_C = tl.constexpr(27)
F_RES = tl.constexpr(28)
F_RELU = tl.constexpr(29)
F_BN = tl.constexpr(30)
NUM_FIELDS = tl.constexpr(len(FIELDS))


@triton.jit
def _pick(sel, a, b, c):
    """The value of buffer `sel` (BUF_X, BUF_OUT, BUF_MID) among three."""
    return tl.where(sel == 0, a, tl.where(sel == 1, b, c))


@triton.jit
def _load_center(center_ptr, col, mask, ACC: tl.constexpr):
    """The training statistics' centre of each column (the running mean), 0 where it is not
    finite: a running mean that a bad batch made NaN or Inf (eager's becomes so too) must not
    spoil the next batches' statistics, which eager computes without it."""
    c = tl.load(center_ptr + col, mask=mask, other=0.0).to(ACC)
    return tl.where((c == c) & (tl.abs(c) != float("inf")), c, 0.0)


@triton.jit
def _row_offset(img, y, x, s_n, s_h, s_w):
    """Element offset of pixel (img, y, x) in int64: a batch of large maps passes 2**31 elements."""
    return img.to(tl.int64) * s_n + y.to(tl.int64) * s_h + x.to(tl.int64) * s_w


@triton.jit
def _pooled_tile(src, img, y0, x0, h, w, s_n, s_h, s_w, col_off, m_ok, k_ok, pool, pkh, pkw, ACC: tl.constexpr):
    """[rows, cols] tile (dtype ACC) of the pool whose windows start at (y0, x0): rows are output
    pixels, cols the channels at offsets col_off. Taps outside the image never count (max) or
    count as zeros (average including padding)."""
    mx = tl.full((img.shape[0], col_off.shape[0]), float("-inf"), ACC)
    total = tl.zeros((img.shape[0], col_off.shape[0]), ACC)
    taps = tl.zeros((img.shape[0],), ACC)
    for dy in range(pkh):
        for dx in range(pkw):
            y = y0 + dy
            x = x0 + dx
            ok = m_ok & (y >= 0) & (y < h) & (x >= 0) & (x < w)
            row = _row_offset(img, y, x, s_n, s_h, s_w)
            mask = ok[:, None] & k_ok[None, :]
            v = tl.load(src + row[:, None] + col_off[None, :], mask=mask, other=0.0).to(ACC)
            # max_pool2d propagates NaN.
            mx = tl.where(mask, tl.maximum(mx, v, propagate_nan=tl.PropagateNan.ALL), mx)
            total += v
            taps += ok.to(ACC)
    taps = tl.maximum(taps, 1.0)  # rows outside the problem: any nonzero divisor
    avg = total / tl.where(pool == 2, (pkh * pkw).to(ACC), taps)[:, None]
    res = tl.where(pool == 1, mx, avg)
    return tl.where(m_ok[:, None] & k_ok[None, :], res, 0.0)


# Which problems a launch covers (see _locate).
SELECT_ALL = 0  # every problem: the convolution stage
SELECT_BN = 1  # problems with training BatchNorm (forward apply, backward reduction)
SELECT_GEMM = 2  # convolutions (backward: the gradient of the pre-activation)
SELECT_GEMM_MID = 3  # convolutions with columns in `mid` (backward: recompute the intermediate results)


@triton.jit
def _selected(row, SELECT: tl.constexpr):
    """1 if the problem at `row` (a table row pointer) belongs to launches of kind SELECT, else 0."""
    if SELECT == 1:
        chosen = tl.load(row + F_BN)
    elif SELECT == 2:
        chosen = tl.load(row + F_GEMM)
    elif SELECT == 3:
        to_mid = (tl.load(row + F_DST0) == 2) | ((tl.load(row + F_DST1) == 2)
                                                 & (tl.load(row + F_SPLIT) < tl.load(row + F_NCOLS)))
        chosen = tl.load(row + F_GEMM) * to_mid.to(tl.int32)
    else:
        chosen = 1
    return chosen


@triton.jit
def _locate(pid, table_ptr, num_problems, batch, x_h, x_w, o_h, o_w, m_h, m_w,
            BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, SELECT: tl.constexpr):
    """(problem, its first program) for program `pid`: the selected problems own consecutive
    ranges of programs, ceil(M / BLOCK_M) * ceil(ncols / BLOCK_N) each, in table order."""
    prob = pid * 0
    first = pid * 0
    seen = pid * 0
    for p in range(num_problems):
        row = table_ptr + p * NUM_FIELDS
        dst = tl.load(row + F_DST0)
        m_p = batch * _pick(dst, x_h, o_h, m_h) * _pick(dst, x_w, o_w, m_w)
        tiles = tl.cdiv(m_p, BLOCK_M) * tl.cdiv(tl.load(row + F_NCOLS), BLOCK_N)
        if SELECT != 0:
            tiles *= _selected(row, SELECT)
        seen += tiles
        done = seen <= pid
        prob += done.to(tl.int32)
        first = tl.where(done, seen, first)
    return prob, first


@triton.jit(do_not_specialize=["batch", "stats_cols", "tune_m", "tune_n", "tune_k"])
def _conv_stage_kernel(
    # problem table: int32 [num_problems, NUM_FIELDS]
    table_ptr, num_problems,
    # the stage's weights (problem p's element (n, c, tap) at w_off + n*w_sn + c*w_sc + tap*w_st),
    # and per output column a scale and a shift (see the epilogue)
    w_ptr, scale_ptr, shift_ptr,
    # the three buffers, logical NCHW addressed through strides (n, h, w, c order below)
    x_ptr, out_ptr, mid_ptr,
    # TRAIN only: shadows of `out` and `mid` (same strides) receiving the pre-activations, fp32
    # [columns, 3] accumulators of (sum, sum of squares, count) of the pre-activations minus a
    # per-column centre (the running mean: it keeps the sum of squares free of cancellation)
    raw_out_ptr, raw_mid_ptr, stats_ptr, center_ptr, stats_cols,
    batch,
    x_h, x_w, x_sn, x_sh, x_sw, x_sc,
    o_h, o_w, o_sn, o_sh, o_sw, o_sc,
    m_h, m_w, m_sn, m_sh, m_sw, m_sc,
    # autotune keys only (bucketed sizes of the stage), unused in the body
    tune_m, tune_n, tune_k,
    # meta-parameters
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    DOT_IN_FP32: tl.constexpr,  # cast tiles to fp32 before tl.dot (interpreter with bf16)
    INPUT_PRECISION: tl.constexpr,  # "ieee" or "tf32" for fp32 operands
    ACC: tl.constexpr,  # accumulator dtype: fp32 (fp64 for float64 tensors)
    TRAIN: tl.constexpr,  # training epilogue (see below)
):
    tl.static_assert(BLOCK_K >= 16)
    pid = tl.program_id(0)
    prob, first = _locate(pid, table_ptr, num_problems, batch, x_h, x_w, o_h, o_w, m_h, m_w, BLOCK_M, BLOCK_N, 0)

    row = table_ptr + prob * NUM_FIELDS
    src_sel = tl.load(row + F_SRC)
    src_c = tl.load(row + F_SRC_C)
    cin = tl.load(row + F_CIN)
    kh = tl.load(row + F_KH)
    kw = tl.load(row + F_KW)
    sh = tl.load(row + F_SH)
    sw = tl.load(row + F_SW)
    ph = tl.load(row + F_PH)
    pw = tl.load(row + F_PW)
    pool = tl.load(row + F_POOL)
    pkh = tl.load(row + F_PKH)
    pkw = tl.load(row + F_PKW)
    psh = tl.load(row + F_PSH)
    psw = tl.load(row + F_PSW)
    pph = tl.load(row + F_PPH)
    ppw = tl.load(row + F_PPW)
    gemm = tl.load(row + F_GEMM)
    ncols = tl.load(row + F_NCOLS)
    w_off = tl.load(row + F_W_OFF)
    ss_off = tl.load(row + F_SS_OFF)
    w_sn = tl.load(row + F_W_SN)
    w_sc = tl.load(row + F_W_SC)
    w_st = tl.load(row + F_W_ST)
    split = tl.load(row + F_SPLIT)
    dst0 = tl.load(row + F_DST0)
    dst0_c = tl.load(row + F_DST0_C)
    dst1 = tl.load(row + F_DST1)
    dst1_c = tl.load(row + F_DST1_C)
    res = tl.load(row + F_RES)
    relu = tl.load(row + F_RELU)
    bn = tl.load(row + F_BN) if TRAIN else 0

    # Output geometry (dst0 and dst1 have the same spatial size: the plan guarantees it).
    oh = _pick(dst0, x_h, o_h, m_h)
    ow = _pick(dst0, x_w, o_w, m_w)
    m_total = batch * oh * ow
    tiles_m = tl.cdiv(m_total, BLOCK_M)
    local = pid - first
    pid_m = local % tiles_m  # M fastest: neighbouring programs share a weight tile
    pid_n = local // tiles_m

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    m_ok = offs_m < m_total
    n_ok = offs_n < ncols
    img = offs_m // (oh * ow)
    pix = offs_m % (oh * ow)
    oy = pix // ow
    ox = pix % ow

    # Source buffer of this problem.
    src = _pick(src_sel, x_ptr, out_ptr, mid_ptr)
    ih = _pick(src_sel, x_h, o_h, m_h)
    iw = _pick(src_sel, x_w, o_w, m_w)
    s_n = _pick(src_sel, x_sn, o_sn, m_sn).to(tl.int64)
    s_h = _pick(src_sel, x_sh, o_sh, m_sh).to(tl.int64)
    s_w = _pick(src_sel, x_sw, o_sw, m_sw).to(tl.int64)
    s_c = _pick(src_sel, x_sc, o_sc, m_sc).to(tl.int64)

    # Where each output pixel's pool window starts (a pooled problem's conv is 1x1/s1/p0).
    py0 = oy * psh - pph
    px0 = ox * psw - ppw
    if gemm == 0:
        # Pool-only problem: the result's columns are the pooled source channels.
        acc = _pooled_tile(src, img, py0, px0, ih, iw, s_n, s_h, s_w, (src_c + offs_n).to(tl.int64) * s_c,
                           m_ok, n_ok, pool, pkh, pkw, ACC)
    else:
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=ACC)
        w_tile = offs_k[:, None] * w_sc + offs_n[None, :] * w_sn  # weight offsets of the first K chunk
        for tap in range(kh * kw):
            r = tap // kw
            s = tap % kw
            y = oy * sh - ph + r
            x = ox * sw - pw + s
            pix_ok = m_ok & (y >= 0) & (y < ih) & (x >= 0) & (x < iw)
            a_row = _row_offset(img, y, x, s_n, s_h, s_w)
            w_tap = w_ptr + w_off + tap * w_st
            for c0 in range(0, cin, BLOCK_K):
                ch = c0 + offs_k
                k_ok = ch < cin
                a_col = (src_c + ch).to(tl.int64) * s_c
                if pool == 0:
                    a = tl.load(src + a_row[:, None] + a_col[None, :],
                                mask=pix_ok[:, None] & k_ok[None, :], other=0.0)
                else:
                    a = _pooled_tile(src, img, py0, px0, ih, iw, s_n, s_h, s_w, a_col, m_ok, k_ok,
                                     pool, pkh, pkw, ACC).to(src.dtype.element_ty)
                b = tl.load(w_tap + c0 * w_sc + w_tile, mask=k_ok[:, None] & n_ok[None, :], other=0.0)
                if b.dtype != a.dtype:  # training keeps fp32 weights under autocast: round as eager does
                    b = b.to(a.dtype)
                if DOT_IN_FP32:
                    a = a.to(tl.float32)
                    b = b.to(tl.float32)
                acc = tl.dot(a, b, acc, input_precision=INPUT_PRECISION, out_dtype=ACC)

    # Epilogue while the accumulator is still wide. Inference: BN and bias folded into
    # acc * scale + shift. Training: shift is the conv bias and scale the residual scale (1
    # elsewhere), (acc + shift) * scale, and BatchNorm comes after (kernels.batchnorm).
    scale = tl.load(scale_ptr + ss_off + offs_n, mask=n_ok, other=0.0).to(ACC)
    shift = tl.load(shift_ptr + ss_off + offs_n, mask=n_ok, other=0.0).to(ACC)
    if TRAIN:
        out = (acc + shift[None, :]) * scale[None, :]
    else:
        out = acc * scale[None, :] + shift[None, :]
    if res != 0:  # residual from the block input, same pixel and channel (x and out share H, W)
        r_row = _row_offset(img, oy, ox, x_sn, x_sh, x_sw)
        out += tl.load(x_ptr + r_row[:, None] + (offs_n.to(tl.int64) * x_sc)[None, :],
                       mask=m_ok[:, None] & n_ok[None, :], other=0.0).to(ACC)
    if TRAIN:
        pre = out.to(x_ptr.dtype.element_ty)  # the pre-activation as stored (and as eager rounds it)
        if bn != 0:  # batch statistics of the stored values, summed over this tile's pixels
            center = _load_center(center_ptr, ss_off + offs_n, n_ok, ACC)
            v = tl.where(m_ok[:, None] & n_ok[None, :], pre.to(ACC) - center[None, :], 0.0)
            stat = stats_ptr + (ss_off + offs_n) * 3
            tl.atomic_add(stat, tl.sum(v, 0), mask=n_ok)
            tl.atomic_add(stat + 1, tl.sum(v * v, 0), mask=n_ok)
            tl.atomic_add(stat + 2, tl.zeros((BLOCK_N,), ACC) + tl.sum(m_ok.to(ACC), 0), mask=n_ok)
    out = tl.where((relu != 0) & (out < 0.0), 0.0, out)
    out = out.to(x_ptr.dtype.element_ty)

    for d in tl.static_range(2):
        if d == 0:
            sel = dst0
            col = dst0_c + offs_n
            col_ok = n_ok & (offs_n < split)
        else:
            sel = dst1
            col = dst1_c + offs_n - split
            col_ok = n_ok & (offs_n >= split)
        dst = _pick(sel, x_ptr, out_ptr, mid_ptr)
        d_n = _pick(sel, x_sn, o_sn, m_sn).to(tl.int64)
        d_h = _pick(sel, x_sh, o_sh, m_sh).to(tl.int64)
        d_w = _pick(sel, x_sw, o_sw, m_sw).to(tl.int64)
        d_c = _pick(sel, x_sc, o_sc, m_sc).to(tl.int64)
        offset = _row_offset(img, oy, ox, d_n, d_h, d_w)[:, None] + (col.to(tl.int64) * d_c)[None, :]
        mask = m_ok[:, None] & col_ok[None, :]
        if TRAIN:
            if gemm != 0:  # what the backward pass needs: the pre-activation
                tl.store(_pick(sel, x_ptr, raw_out_ptr, raw_mid_ptr) + offset, pre, mask=mask)
            # With BatchNorm the result is written by the apply kernel once the statistics are complete.
            tl.store(dst + offset, out, mask=mask & (bn == 0))
        else:
            tl.store(dst + offset, out, mask=mask)


def _bucket(n):
    """Autotune key for a size: the next power of two, so batch changes don't re-tune each time."""
    return triton.next_power_of_2(max(int(n), 1))


if INTERPRETING:
    _stage_kernel = _conv_stage_kernel
else:
    # Benchmarking runs the kernel once per config: the training statistics are atomically
    # accumulated, so they are zeroed before each trial (and before the real launch).
    _stage_kernel = triton.autotune(configs=CONFIGS, key=["tune_m", "tune_n", "tune_k", "TRAIN", "ACC"],
                                    reset_to_zero=["stats_ptr"])(_conv_stage_kernel)

_launches = 0


def launch_count():
    """Number of kernel launches made by this package's kernels since import (read by count_launches)."""
    return _launches


def count_launch():
    """Called once per kernel launch by every launcher in fused_inception.kernels."""
    global _launches
    _launches += 1


def geometry(t):
    """(H, W, stride_n, stride_h, stride_w, stride_c) of a logical NCHW tensor."""
    s_n, s_c, s_h, s_w = t.stride()
    return (t.shape[2], t.shape[3], s_n, s_h, s_w, s_c)


def hidden_from_dispatch():
    """The interpreter emulates a launch with torch ops on the host; hide them from dispatch modes
    (launch counters, tracers) as a GPU launch would be."""
    return _disable_current_modes() if INTERPRETING else contextlib.nullcontext()


def accumulator(dtype):
    """The Triton accumulator dtype for tensors of `dtype`: fp32, or fp64 for float64."""
    return tl.float64 if dtype == torch.float64 else tl.float32


_placeholders = {}


def _placeholder(device):
    """A one-element tensor passed for unused pointer arguments (never read or written)."""
    if device not in _placeholders:
        _placeholders[device] = torch.empty(1, device=device)
    return _placeholders[device]


def conv_stage(table, problems, weight, scale, shift, x, out, mid, raw_out=None, raw_mid=None, stats=None,
               center=None):
    """Run one stage: every convolution in `table` in a single launch.

    Args:
        table: int32 tensor [P, len(FIELDS)] on x's device, one row per problem (see FIELDS).
        problems: host copy of what the grid needs, one (dst0 buffer, ncols, K) tuple per row.
        weight: 1-D tensor; problem p's element (n, c, tap) is at w_off + n*w_sn + c*w_sc + tap*w_st
            of its row (inference: [K, ncols] row-major with K ordered (tap, input channel); training:
            nn.Conv2d's own [ncols, cin, kh, kw] layout). Loaded in its dtype, rounded to x's.
        scale, shift: 1-D tensors; problem p's columns start at its row's ss_off.
        x, out, mid: 4-D logical NCHW tensors of one floating dtype (fp32, fp16 or bf16; float64
            is accepted for tests) with any strides (NHWC, i.e. channels_last, coalesces); `mid`
            may be `out` when unused. `out`/`mid` slices named by the table are overwritten.
        raw_out, raw_mid, stats, center: training only (all or none): tensors shaped like `out`
            and `mid` (same strides) that receive the pre-activations of the convolutions; a
            zero-initialised [columns, 3] tensor of the accumulator dtype that receives, per
            column of the problems whose row has `bn`, the sum and the sum of squares of
            (pre-activation - center[column]) and the count over the batch; and the 1-D
            centres (any float dtype; the running means). Those problems' results are not
            written to `out`/`mid` (kernels.batchnorm.bn_apply does it).
    """
    batch = x.shape[0]
    hw = {BUF_X: x.shape[2] * x.shape[3], BUF_OUT: out.shape[2] * out.shape[3],
          BUF_MID: mid.shape[2] * mid.shape[3]}
    if batch == 0:
        return
    train = stats is not None
    if not train:
        raw_out, raw_mid, stats, center = out, mid, _placeholder(x.device), _placeholder(x.device)

    def grid(meta):
        return (sum(triton.cdiv(batch * hw[dst], meta["BLOCK_M"]) * triton.cdiv(ncols, meta["BLOCK_N"])
                    for dst, ncols, _ in problems),)

    dot_in_fp32 = INTERPRETING and x.dtype == torch.bfloat16  # triton#11584: bf16 dot is wrong there
    precision = "tf32" if (x.dtype == torch.float32 and torch.backends.cudnn.allow_tf32) else "ieee"
    meta = {} if not INTERPRETING else dict(INTERPRETER_CONFIG)
    with hidden_from_dispatch():
        _stage_kernel[grid](
            table, table.shape[0],
            weight, scale, shift,
            x, out, mid,
            raw_out, raw_mid, stats, center, stats.shape[0],
            batch,
            *geometry(x), *geometry(out), *geometry(mid),
            _bucket(batch * max(hw.values())), _bucket(sum(p[1] for p in problems)),
            _bucket(max(p[2] for p in problems)),
            DOT_IN_FP32=dot_in_fp32, INPUT_PRECISION=precision, ACC=accumulator(x.dtype), TRAIN=train,
            **meta,
        )
    count_launch()
