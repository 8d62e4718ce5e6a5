"""Training BatchNorm for a stage: the launches that come after its convolution launch.

In training, `conv.conv_stage(..., stats=...)` writes each convolution's pre-activation `raw` into
shadows of the block's buffers (`raw_out` shaped like `out`, `raw_mid` like `mid`) and, for the
problems whose spec has `bn`, adds per column the sum, the sum of squares and the count of `raw`
over the batch into `stats`. The kernels here take it from there, driven by the same problem
table (a problem's columns go to the same channel slices of the shadows as of the buffers):

    bn_apply (forward)      with the sums taken of raw - c (c: the running mean, near the batch mean
                            once training runs, so the sum of squares doesn't cancel):
                            mean = c + sum / count,  var = sumsq / count - (sum / count)^2  (biased)
                            y = act(raw * a + b)     with  a = gamma / sqrt(var + eps),  b = beta - mean * a
                            and, once per column, the mean, 1/sqrt(var + eps), the unbiased variance
                            and the count go to `saved` (for backward and the running statistics)
    bn_apply (recompute)    the same y from `saved`, for the columns that go to `mid` (backward needs
                            the intermediate results as convolution inputs; they are not kept)
    bn_backward_reduce      g = dy * act'(z),  z = raw * a + b,  zhat = (raw - mean) / sqrt(var + eps)
                            sums[col] += (sum g, sum g * zhat)   (= d beta, d gamma)
    bn_backward             (the same kernel, REDUCE off)
                            dz = gamma / sqrt(var + eps) * (g - (sum g + zhat * sum g zhat) / count)
                            (without BatchNorm: dz = g), written to shadows of the buffers

`dy` is read from `grad_out` (columns in the block output) or `d_mid` (columns in `mid`). Sums
are accumulated with atomics in the accumulator dtype (fp32; fp64 for float64 tensors), so the
last bits of the statistics can differ from run to run on a GPU.

A launch covers *parts*: the columns of one problem that go to one destination (a merged GEMM
whose first columns go to the block output and the rest to `mid` has two parts). Which parts,
and what is known about them at compile time (buffer, activation, BatchNorm, channel alignment), is
the launch's constexpr `PARTS`; the channel offsets come from the stage's problem table.
"""

import triton
import triton.language as tl

from fused_inception.kernels import conv as kconv
from fused_inception.kernels.conv import ROW, T_DST0_C, T_DST1_C, T_NCOLS, T_SPLIT, T_SS_OFF

# Elementwise tiles: [pixels, columns]. Under the interpreter the cost is per program, so the
# same (large) tiles serve both.
BLOCK_M = 64
BLOCK_N = 64
NUM_WARPS = 4

# A part: (problem index in the table, destination buffer, which columns (0: [0, split) or all
# when the problem has one destination; 1: [split, ncols)), one destination?, activation
# (kconv.ACT_*) and its slope, BatchNorm, alignment of its channels).
I_P, I_DST, I_SECOND, I_WHOLE, I_ACT, I_SLOPE, I_BN, I_ALIGN = (tl.constexpr(i) for i in range(8))


def parts(spec, select):
    """The PARTS of a launch over a stage's problems (kconv.problem_spec tuples) for which
    select(problem spec, destination buffer) is true."""
    out = []
    for p, s in enumerate(spec):
        split = kconv.spec_field(s, "split")
        dsts = (kconv.spec_field(s, "dst0"), kconv.spec_field(s, "dst1")) if split else (kconv.spec_field(s, "dst0"),)
        for second, dst in enumerate(dsts):
            if select(s, dst):
                out.append((p, dst, second, int(not split), kconv.spec_field(s, "act"), kconv.spec_field(s, "slope"),
                            kconv.spec_field(s, "bn"), kconv.spec_field(s, "dalign")))
    return tuple(out)


@triton.jit
def _part_columns(row, SECOND: tl.constexpr, WHOLE: tl.constexpr, ALIGN: tl.constexpr):
    """(first column of the part within its problem, its columns, its first channel in the
    buffer), with what the spec promises about their alignment."""
    ncols = tl.multiple_of(tl.load(row + T_NCOLS), ALIGN)
    if WHOLE:
        return 0, ncols, tl.multiple_of(tl.load(row + T_DST0_C), ALIGN)
    else:
        split = tl.multiple_of(tl.load(row + T_SPLIT), ALIGN)
        if SECOND:
            return split, ncols - split, tl.multiple_of(tl.load(row + T_DST1_C), ALIGN)
        else:
            return 0, split, tl.multiple_of(tl.load(row + T_DST0_C), ALIGN)


@triton.jit
def _part_tiles(P: tl.constexpr, DST: tl.constexpr, SECOND: tl.constexpr, WHOLE: tl.constexpr, table_ptr, batch,
                o_h, o_w, m_h, m_w, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    if DST == 1:
        m = batch * o_h * o_w
    else:
        m = batch * m_h * m_w
    _first, cols, _c = _part_columns(table_ptr + P * ROW, SECOND, WHOLE, 1)
    return tl.cdiv(m, BLOCK_M) * tl.cdiv(cols, BLOCK_N)


@triton.jit
def _tile(local, P: tl.constexpr, DST: tl.constexpr, SECOND: tl.constexpr, WHOLE: tl.constexpr, ALIGN: tl.constexpr,
          table_ptr, batch, o_h, o_w, o_sn, o_sh, o_sw, o_sc, m_h, m_w, m_sn, m_sh, m_sw, m_sc, OUT_CL: tl.constexpr,
          MID_CL: tl.constexpr, INT64: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """Program `local` of a part: (pixel mask, column mask, statistics column, [pixels, columns]
    element offsets into DST (and its shadows), pid_m). Strides as kconv.kernel_geometry gives
    them (channels_last pitches in units of 8; OUT_CL, MID_CL: 8 or 0)."""
    row = table_ptr + P * ROW
    first, cols, c0 = _part_columns(row, SECOND, WHOLE, ALIGN)
    # (the buffer's strides as the stage kernel reads them; there is no x here: out stands in)
    bufs = ((table_ptr, o_h, o_w, o_sn, o_sh, o_sw, o_sc), (table_ptr, o_h, o_w, o_sn, o_sh, o_sw, o_sc),
            (table_ptr, m_h, m_w, m_sn, m_sh, m_sw, m_sc))
    _p, h, w, s_n, s_h, s_w, s_c = kconv._view(DST, bufs, tl.constexpr((OUT_CL, OUT_CL, MID_CL, INT64)))
    m_total = batch * h * w
    tiles_m = tl.cdiv(m_total, BLOCK_M)
    pid_m = local % tiles_m
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = (local // tiles_m) * BLOCK_N + tl.arange(0, BLOCK_N)
    m_ok = offs_m < m_total
    n_ok = offs_n < cols
    img = offs_m // (h * w)
    pix = offs_m % (h * w)
    off = (img * s_n + (pix // w) * s_h + (pix % w) * s_w)[:, None] + ((c0 + offs_n) * s_c)[None, :]
    col = tl.load(row + T_SS_OFF) + first + offs_n
    return m_ok, n_ok, col, off, pid_m


@triton.jit
def _apply_part(local, P: tl.constexpr, DST: tl.constexpr, SECOND: tl.constexpr, WHOLE: tl.constexpr,
                ACT: tl.constexpr, SLOPE: tl.constexpr, BN: tl.constexpr, ALIGN: tl.constexpr, table_ptr, gamma_ptr,
                beta_ptr,
                center_ptr, eps_ptr, stats_ptr, saved_ptr, cols, raw_out_ptr, raw_mid_ptr, out_ptr, mid_ptr, batch,
                o_h, o_w, o_sn, o_sh, o_sw, o_sc, m_h, m_w, m_sn, m_sh, m_sw, m_sc, OUT_CL: tl.constexpr,
                MID_CL: tl.constexpr, INT64: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, ACC: tl.constexpr, RECOMPUTE: tl.constexpr):
    m_ok, n_ok, col, off, pid_m = _tile(local, P, DST, SECOND, WHOLE, ALIGN, table_ptr, batch, o_h, o_w, o_sn, o_sh,
                                        o_sw, o_sc, m_h, m_w, m_sn, m_sh, m_sw, m_sc, OUT_CL, MID_CL, INT64, BLOCK_M, BLOCK_N)
    mask = m_ok[:, None] & n_ok[None, :]
    if DST == 1:
        raw_ptr = raw_out_ptr
        dst_ptr = out_ptr
    else:
        raw_ptr = raw_mid_ptr
        dst_ptr = mid_ptr
    raw = tl.load(raw_ptr + off, mask=mask, other=0.0).to(ACC)
    if BN:
        if RECOMPUTE:
            mean = tl.load(saved_ptr + col, mask=n_ok, other=0.0)
            invstd = tl.load(saved_ptr + cols + col, mask=n_ok, other=1.0)
        else:
            total = tl.load(stats_ptr + col * 3, mask=n_ok, other=0.0)
            total_sq = tl.load(stats_ptr + col * 3 + 1, mask=n_ok, other=0.0)
            count = tl.load(stats_ptr + col * 3 + 2, mask=n_ok, other=2.0)
            shifted_mean = total / count  # the sums are of (raw - centre)
            var = tl.maximum(total_sq / count - shifted_mean * shifted_mean, 0.0)
            mean = shifted_mean + kconv._load_center(center_ptr, col, n_ok, ACC)
            invstd = 1.0 / tl.sqrt(var + tl.load(eps_ptr + col, mask=n_ok, other=1.0))
            if pid_m == 0:  # one program per column block records the statistics
                tl.store(saved_ptr + col, mean, mask=n_ok)
                tl.store(saved_ptr + cols + col, invstd, mask=n_ok)
                tl.store(saved_ptr + 2 * cols + col, var * count / (count - 1.0), mask=n_ok)
                tl.store(saved_ptr + 3 * cols + col, count, mask=n_ok)
        a = tl.load(gamma_ptr + col, mask=n_ok, other=1.0).to(ACC) * invstd
        b = tl.load(beta_ptr + col, mask=n_ok, other=0.0).to(ACC) - mean * a
        # (rounded to the storage dtype: eager's BatchNorm output, which its activation reads)
        y = (raw * a[None, :] + b[None, :]).to(dst_ptr.dtype.element_ty).to(ACC)
    else:
        y = raw
    y = kconv._activate(y, ACT, SLOPE)
    tl.store(dst_ptr + off, y.to(dst_ptr.dtype.element_ty), mask=mask)


@triton.jit(do_not_specialize=["cols", "batch", "o_h", "o_w", "o_sn", "o_sh", "o_sw", "o_sc", "m_h", "m_w", "m_sn",
                               "m_sh", "m_sw", "m_sc"])
def _bn_apply_kernel(
    table_ptr,
    # per column: gamma, beta, centre (any float dtype), eps (ACC); accumulators [cols, 3]; saved [4, cols]
    gamma_ptr, beta_ptr, center_ptr, eps_ptr, stats_ptr, saved_ptr,
    # shadows (read) and buffers (written); a shadow has its buffer's strides
    raw_out_ptr, raw_mid_ptr, out_ptr, mid_ptr,
    cols, batch,
    o_h, o_w, o_sn, o_sh, o_sw, o_sc,
    m_h, m_w, m_sn, m_sh, m_sw, m_sc,  # (strides as kconv.kernel_geometry gives them)
    PARTS: tl.constexpr, OUT_CL: tl.constexpr, MID_CL: tl.constexpr, INT64: tl.constexpr, BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr, ACC: tl.constexpr,
    RECOMPUTE: tl.constexpr,  # backward: y of the mid-bound columns from `saved`
):
    pid = tl.program_id(0)
    start = 0
    for i in tl.static_range(len(PARTS)):
        tiles = _part_tiles(PARTS[i][I_P], PARTS[i][I_DST], PARTS[i][I_SECOND], PARTS[i][I_WHOLE], table_ptr, batch,
                            o_h, o_w, m_h, m_w, BLOCK_M, BLOCK_N)
        if (pid >= start) & (pid < start + tiles):
            _apply_part(pid - start, PARTS[i][I_P], PARTS[i][I_DST], PARTS[i][I_SECOND], PARTS[i][I_WHOLE],
                        PARTS[i][I_ACT], PARTS[i][I_SLOPE], PARTS[i][I_BN], PARTS[i][I_ALIGN], table_ptr, gamma_ptr,
                        beta_ptr,
                        center_ptr, eps_ptr, stats_ptr, saved_ptr, cols, raw_out_ptr, raw_mid_ptr, out_ptr, mid_ptr,
                        batch, o_h, o_w, o_sn, o_sh, o_sw, o_sc, m_h, m_w, m_sn, m_sh, m_sw, m_sc, OUT_CL, MID_CL,
                        INT64, BLOCK_M, BLOCK_N, ACC, RECOMPUTE)
        start += tiles


@triton.jit
def _backward_part(local, P: tl.constexpr, DST: tl.constexpr, SECOND: tl.constexpr, WHOLE: tl.constexpr,
                   ACT: tl.constexpr, SLOPE: tl.constexpr, BN: tl.constexpr, ALIGN: tl.constexpr, table_ptr,
                   gamma_ptr, beta_ptr,
                   saved_ptr, sums_ptr, cols, raw_out_ptr, raw_mid_ptr, gout_ptr, dmid_ptr, dz_out_ptr, dz_mid_ptr,
                   batch, o_h, o_w, o_sn, o_sh, o_sw, o_sc, m_h, m_w, m_sn, m_sh, m_sw, m_sc, g_sn, g_sh, g_sw, g_sc,
                   OUT_CL: tl.constexpr, MID_CL: tl.constexpr, G_CL: tl.constexpr, INT64: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                   ACC: tl.constexpr, REDUCE: tl.constexpr):
    m_ok, n_ok, col, off, pid_m = _tile(local, P, DST, SECOND, WHOLE, ALIGN, table_ptr, batch, o_h, o_w, o_sn, o_sh,
                                        o_sw, o_sc, m_h, m_w, m_sn, m_sh, m_sw, m_sc, OUT_CL, MID_CL, INT64, BLOCK_M, BLOCK_N)
    mask = m_ok[:, None] & n_ok[None, :]
    if DST == 1:  # grad_out has its own strides
        _m, _n, _c, g_off, _p = _tile(local, P, DST, SECOND, WHOLE, ALIGN, table_ptr, batch, o_h, o_w, g_sn, g_sh,
                                      g_sw, g_sc, m_h, m_w, m_sn, m_sh, m_sw, m_sc, G_CL, MID_CL, INT64, BLOCK_M, BLOCK_N)
        raw_ptr = raw_out_ptr
        dy_ptr = gout_ptr
        dz_ptr = dz_out_ptr
    else:  # d_mid is like mid
        g_off = off
        raw_ptr = raw_mid_ptr
        dy_ptr = dmid_ptr
        dz_ptr = dz_mid_ptr
    raw = tl.load(raw_ptr + off, mask=mask, other=0.0).to(ACC)
    dy = tl.load(dy_ptr + g_off, mask=mask, other=0.0).to(ACC)
    if BN:
        mean = tl.load(saved_ptr + col, mask=n_ok, other=0.0)
        invstd = tl.load(saved_ptr + cols + col, mask=n_ok, other=1.0)
        gamma = tl.load(gamma_ptr + col, mask=n_ok, other=1.0).to(ACC)
        a = gamma * invstd
        y = raw * a[None, :] + (tl.load(beta_ptr + col, mask=n_ok, other=0.0).to(ACC) - mean * a)[None, :]
    else:
        y = raw
    # The activation's derivative at its input as the forward rounded it (eager's saved tensor).
    g = tl.where(mask, kconv._activate_grad(dy, y.to(raw_ptr.dtype.element_ty).to(ACC), ACT, SLOPE), 0.0)
    if BN:
        zhat = (raw - mean[None, :]) * invstd[None, :]
        if REDUCE:
            tl.atomic_add(sums_ptr + col, tl.sum(g, 0), mask=n_ok)
            tl.atomic_add(sums_ptr + cols + col, tl.sum(g * zhat, 0), mask=n_ok)
        else:
            sum_g = tl.load(sums_ptr + col, mask=n_ok, other=0.0)
            sum_gz = tl.load(sums_ptr + cols + col, mask=n_ok, other=0.0)
            count = tl.load(saved_ptr + 3 * cols + col, mask=n_ok, other=1.0)
            dz = a[None, :] * (g - (sum_g[None, :] + zhat * sum_gz[None, :]) / count[None, :])
            tl.store(dz_ptr + off, dz.to(dz_ptr.dtype.element_ty), mask=mask)
    else:
        if not REDUCE:
            tl.store(dz_ptr + off, g.to(dz_ptr.dtype.element_ty), mask=mask)


@triton.jit(do_not_specialize=["cols", "batch", "o_h", "o_w", "o_sn", "o_sh", "o_sw", "o_sc", "m_h", "m_w", "m_sn",
                               "m_sh", "m_sw", "m_sc", "g_sn", "g_sh", "g_sw", "g_sc"])
def _bn_backward_kernel(
    table_ptr,
    gamma_ptr, beta_ptr, saved_ptr, sums_ptr,  # sums: [2, cols], sum g and sum g * zhat per column
    raw_out_ptr, raw_mid_ptr, gout_ptr, dmid_ptr, dz_out_ptr, dz_mid_ptr,  # dz_*: the raw_* strides
    cols, batch,
    o_h, o_w, o_sn, o_sh, o_sw, o_sc,
    m_h, m_w, m_sn, m_sh, m_sw, m_sc,
    g_sn, g_sh, g_sw, g_sc,  # grad_out strides (d_mid has mid's)
    PARTS: tl.constexpr, OUT_CL: tl.constexpr, MID_CL: tl.constexpr, G_CL: tl.constexpr, INT64: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, ACC: tl.constexpr,
    REDUCE: tl.constexpr,  # True: add into `sums`; False: read the reduced `sums`, write dz
):
    pid = tl.program_id(0)
    start = 0
    for i in tl.static_range(len(PARTS)):
        tiles = _part_tiles(PARTS[i][I_P], PARTS[i][I_DST], PARTS[i][I_SECOND], PARTS[i][I_WHOLE], table_ptr, batch,
                            o_h, o_w, m_h, m_w, BLOCK_M, BLOCK_N)
        if (pid >= start) & (pid < start + tiles):
            _backward_part(pid - start, PARTS[i][I_P], PARTS[i][I_DST], PARTS[i][I_SECOND], PARTS[i][I_WHOLE],
                           PARTS[i][I_ACT], PARTS[i][I_SLOPE], PARTS[i][I_BN], PARTS[i][I_ALIGN], table_ptr, gamma_ptr,
                           beta_ptr,
                           saved_ptr, sums_ptr, cols, raw_out_ptr, raw_mid_ptr, gout_ptr, dmid_ptr, dz_out_ptr,
                           dz_mid_ptr, batch, o_h, o_w, o_sn, o_sh, o_sw, o_sc, m_h, m_w, m_sn, m_sh, m_sw, m_sc,
                           g_sn, g_sh, g_sw, g_sc, OUT_CL, MID_CL, G_CL, INT64, BLOCK_M, BLOCK_N, ACC, REDUCE)
        start += tiles


def _programs(parts_, columns, out, mid):
    """Programs for `parts_` (columns: host copies, per problem (ncols, split))."""
    batch = out.shape[0]
    total = 0
    for p, dst, second, whole, *_ in parts_:
        ncols, split = columns[p]
        cols = ncols if whole else (ncols - split if second else split)
        t = mid if dst == kconv.BUF_MID else out
        total += triton.cdiv(batch * t.shape[2] * t.shape[3], BLOCK_M) * triton.cdiv(cols, BLOCK_N)
    return total


class _PartsLaunch(kconv.CachedLaunch):
    """A launch over `parts_` of a stage (see kconv.CachedLaunch): `out`/`mid` (or their shadows)
    give the pixel counts, layouts and the accumulator dtype, `cols` the block's columns."""

    __slots__ = ("table", "programs")

    def _setup(self, table, columns, parts_, cols, out, mid, extra_tail=(), checked=(), **consts):
        # (pitch units as the stage kernel's LAYOUT has them: 8 for channels_last, else 0; see kconv._view)
        out_cl, mid_cl = 8 * kconv._channels_last(out), 8 * kconv._channels_last(mid)
        self.table = table
        self.programs = _programs(parts_, columns, out, mid)
        consts = dict(PARTS=parts_, OUT_CL=out_cl, MID_CL=mid_cl, INT64=max(out.numel(), mid.numel()) >= 2**31,
                      BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N, ACC=kconv.accumulator(out.dtype), **consts)
        tail = (cols, out.shape[0], *kconv.kernel_geometry(out, out_cl), *kconv.kernel_geometry(mid, mid_cl),
                *extra_tail)
        self._init(consts, tail, out.device, lambda meta: (self.programs,), checked=checked,
                   config=triton.Config({}, num_warps=NUM_WARPS))

    def launch(self, tensors):
        if self.programs:  # (no parts, or no pixels: nothing to launch)
            super().launch(tensors)


class ApplyLaunch(_PartsLaunch):
    """Normalise, scale, shift and activate the pre-activations of a stage's BatchNorm problems.

    Built with: table (the stage's problem table, as for conv.conv_stage); columns (host copy,
    per problem of the table: (ncols, split)); parts_ (the launch's PARTS, see `parts`: the
    BatchNorm problems' parts (forward), or the parts in `mid` of the convolutions
    (recompute)); cols (the block's columns); out, mid (the buffers, `mid` channels_last);
    recompute (write the parts from `saved`: backward).

    Called with: gamma, beta, center (per column, 1-D, indexed by ss_off + column, any float
    dtype); eps (per column, the accumulator dtype); stats ([cols, 3] sums and sums of squares
    of (raw - center), and counts, from conv_stage: forward only); saved ([4, cols] of the
    accumulator dtype: written in forward (mean, 1/sqrt(var + eps), unbiased variance, count),
    read when recomputing); raw_out, raw_mid (the shadows conv_stage wrote) and out, mid (same
    strides as when built)."""

    __slots__ = ()
    kernel = _bn_apply_kernel
    meta_names = ("PARTS", "OUT_CL", "MID_CL", "INT64", "BLOCK_M", "BLOCK_N", "ACC", "RECOMPUTE")

    def __init__(self, table, columns, parts_, cols, out, mid, recompute=False):
        self._setup(table, columns, parts_, cols, out, mid, RECOMPUTE=recompute)

    def __call__(self, gamma, beta, center, eps, stats, saved, raw_out, raw_mid, out, mid):
        self.launch((self.table, gamma, beta, center, eps, stats, saved, raw_out, raw_mid, out, mid))


class BackwardLaunch(_PartsLaunch):
    """The BatchNorm + activation backward of a stage's parts, in one of two launches.

    reduce=True: add, per column of the stage's BatchNorm problems (`parts_`), sum(g) and
    sum(g * zhat) into sums[0] and sums[1] ([2, cols], zero-initialised, accumulator dtype), g
    being the gradient at the activation's input. reduce=False: write the gradient of every convolution's
    pre-activation (through the activation and BatchNorm) into dz_out / dz_mid (the strides of raw_out /
    raw_mid), for the parts of a stage's convolutions; sums from the reduce launch, summed over
    every process of a synchronised BatchNorm.

    Built with the table, columns, parts_ and cols as ApplyLaunch, raw_out and raw_mid (the
    shadows), and grad_out (the gradient of the block output, any strides: the launch is for
    its strides). Called with gamma, beta, saved, sums, raw_out, raw_mid, grad_out, d_mid (the
    gradient of `mid`, mid's strides), dz_out, dz_mid."""

    __slots__ = ()
    kernel = _bn_backward_kernel
    meta_names = ("PARTS", "OUT_CL", "MID_CL", "G_CL", "INT64", "BLOCK_M", "BLOCK_N", "ACC", "REDUCE")

    def __init__(self, table, columns, parts_, cols, raw_out, raw_mid, grad_out, reduce):
        g_cl = 8 * kconv._channels_last(grad_out)
        self._setup(table, columns, parts_, cols, raw_out, raw_mid,
                    extra_tail=kconv.kernel_geometry(grad_out, g_cl)[2:], checked=(7,), G_CL=g_cl, REDUCE=reduce)

    def __call__(self, gamma, beta, saved, sums, raw_out, raw_mid, grad_out, d_mid, dz_out, dz_mid):
        self.launch((self.table, gamma, beta, saved, sums, raw_out, raw_mid, grad_out, d_mid, dz_out, dz_mid))
