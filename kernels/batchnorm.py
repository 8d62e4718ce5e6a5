"""Training BatchNorm for a stage: the launches that come after its convolution launch.

In training, `conv.conv_stage(..., stats=...)` writes each convolution's pre-activation `raw` into
shadows of the block's buffers (`raw_out` shaped like `out`, `raw_mid` like `mid`) and, for the
problems whose row has `bn`, adds per column the sum, the sum of squares and the count of `raw`
over the batch into `stats`. The kernels here take it from there, driven by the same problem
table (a problem's columns go to the same channel slices of the shadows as of the buffers):

    bn_apply (forward)      with the sums taken of raw - c (c: the running mean, near the batch mean
                            once training runs, so the sum of squares doesn't cancel):
                            mean = c + sum / count,  var = sumsq / count - (sum / count)^2  (biased)
                            y = relu?(raw * a + b)   with  a = gamma / sqrt(var + eps),  b = beta - mean * a
                            and, once per column, the mean, 1/sqrt(var + eps), the unbiased variance
                            and the count go to `saved` (for backward and the running statistics)
    bn_apply (recompute)    the same y from `saved`, for the columns that go to `mid` (backward needs
                            the intermediate results as convolution inputs; they are not kept)
    bn_backward_reduce      g = dy * [y > 0],  zhat = (raw - mean) / sqrt(var + eps)
                            sums[col] += (sum g, sum g * zhat)   (= d beta, d gamma)
    bn_backward             (the same kernel, REDUCE off)
                            dz = gamma / sqrt(var + eps) * (g - (sum g + zhat * sum g zhat) / count)
                            (without BatchNorm: dz = g), written to shadows of the buffers

`dy` is read from `grad_out` (columns in the block output) or `d_mid` (columns in `mid`). Sums
are accumulated with atomics in the accumulator dtype (fp32; fp64 for float64 tensors), so the
last bits of the statistics can differ from run to run on a GPU.
"""

import triton
import triton.language as tl

from fused_inception.kernels import conv as kconv
from fused_inception.kernels.conv import (F_BN, F_DST0, F_DST0_C, F_DST1, F_DST1_C, F_NCOLS, F_RELU, F_SPLIT,
                                          F_SS_OFF, NUM_FIELDS, _load_center, _locate, _pick)

# Elementwise tiles: [pixels, columns]. Under the interpreter the cost is per program, so the
# same (large) tiles serve both.
BLOCK_M = 64
BLOCK_N = 64


@triton.jit
def _tile(pid, table_ptr, num_problems, batch, o_h, o_w, m_h, m_w, SELECT: tl.constexpr,
          BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """This program's problem row, pixel coordinates and columns.

    Returns (row, img, oy, ox, m_ok, offs_n, n_ok, sel, ch, pid_m): `sel` is the buffer of each
    column (1 = out, 2 = mid) and `ch` its channel there."""
    prob, first = _locate(pid, table_ptr, num_problems, batch, 1, 1, o_h, o_w, m_h, m_w, BLOCK_M, BLOCK_N, SELECT)
    row = table_ptr + prob * NUM_FIELDS
    ncols = tl.load(row + F_NCOLS)
    split = tl.load(row + F_SPLIT)
    dst0 = tl.load(row + F_DST0)
    dst0_c = tl.load(row + F_DST0_C)
    dst1 = tl.load(row + F_DST1)
    dst1_c = tl.load(row + F_DST1_C)
    oh = _pick(dst0, 1, o_h, m_h)
    ow = _pick(dst0, 1, o_w, m_w)
    m_total = batch * oh * ow
    tiles_m = tl.cdiv(m_total, BLOCK_M)
    local = pid - first
    pid_m = local % tiles_m
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = (local // tiles_m) * BLOCK_N + tl.arange(0, BLOCK_N)
    m_ok = offs_m < m_total
    n_ok = offs_n < ncols
    img = offs_m // (oh * ow)
    pix = offs_m % (oh * ow)
    first_dst = offs_n < split
    sel = tl.where(first_dst, dst0, dst1)
    ch = tl.where(first_dst, dst0_c + offs_n, dst1_c + offs_n - split)
    return row, img, pix // ow, pix % ow, m_ok, offs_n, n_ok, sel, ch, pid_m


@triton.jit
def _offsets(img, oy, ox, sel, ch, o_sn, o_sh, o_sw, o_sc, m_sn, m_sh, m_sw, m_sc):
    """[pixels, columns] int64 element offsets, each column in an out-like (sel 1) or mid-like
    (sel 2) tensor with the given strides."""
    is_out = sel == 1
    s_n = tl.where(is_out, o_sn, m_sn).to(tl.int64)
    s_h = tl.where(is_out, o_sh, m_sh).to(tl.int64)
    s_w = tl.where(is_out, o_sw, m_sw).to(tl.int64)
    s_c = tl.where(is_out, o_sc, m_sc).to(tl.int64)
    return (img.to(tl.int64)[:, None] * s_n[None, :] + oy.to(tl.int64)[:, None] * s_h[None, :]
            + ox.to(tl.int64)[:, None] * s_w[None, :] + (ch.to(tl.int64) * s_c)[None, :])


@triton.jit
def _affine(row, n_ok, col, gamma_ptr, beta_ptr, mean, invstd, ACC: tl.constexpr):
    """Per column (bn?, gamma, a, b) with y = raw * a + b; a = 1, b = 0 for problems without BN."""
    bn_ok = n_ok & (tl.load(row + F_BN) != 0)
    gamma = tl.load(gamma_ptr + col, mask=bn_ok, other=1.0).to(ACC)
    beta = tl.load(beta_ptr + col, mask=bn_ok, other=0.0).to(ACC)
    a = tl.where(bn_ok, gamma * invstd, 1.0)
    b = tl.where(bn_ok, beta - mean * a, 0.0)
    return bn_ok, gamma, a, b


@triton.jit(do_not_specialize=["batch", "cols"])
def _bn_apply_kernel(
    table_ptr, num_problems,
    # per column: gamma, beta, centre (any float dtype), eps (ACC); accumulators [cols, 3]; saved [4, cols]
    gamma_ptr, beta_ptr, center_ptr, eps_ptr, stats_ptr, saved_ptr, cols,
    # shadows (read) and buffers (written); a shadow has its buffer's strides
    raw_out_ptr, raw_mid_ptr, out_ptr, mid_ptr,
    batch,
    o_h, o_w, o_sn, o_sh, o_sw, o_sc,
    m_h, m_w, m_sn, m_sh, m_sw, m_sc,
    SELECT: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, ACC: tl.constexpr,
    RECOMPUTE: tl.constexpr,  # backward: y of the mid-bound columns from `saved`, nothing else written
):
    pid = tl.program_id(0)
    row, img, oy, ox, m_ok, offs_n, n_ok, sel, ch, pid_m = _tile(
        pid, table_ptr, num_problems, batch, o_h, o_w, m_h, m_w, SELECT, BLOCK_M, BLOCK_N)
    col = tl.load(row + F_SS_OFF) + offs_n
    ok = n_ok
    if RECOMPUTE:
        ok = ok & (sel == 2)
    mask = m_ok[:, None] & ok[None, :]
    off = _offsets(img, oy, ox, sel, ch, o_sn, o_sh, o_sw, o_sc, m_sn, m_sh, m_sw, m_sc)
    raw = tl.load(tl.where(sel == 1, raw_out_ptr, raw_mid_ptr)[None, :] + off, mask=mask, other=0.0).to(ACC)

    if RECOMPUTE:
        bn_ok = n_ok & (tl.load(row + F_BN) != 0)
        mean = tl.load(saved_ptr + col, mask=bn_ok, other=0.0)
        invstd = tl.load(saved_ptr + cols + col, mask=bn_ok, other=1.0)
    else:
        total = tl.load(stats_ptr + col * 3, mask=n_ok, other=0.0)
        total_sq = tl.load(stats_ptr + col * 3 + 1, mask=n_ok, other=0.0)
        count = tl.load(stats_ptr + col * 3 + 2, mask=n_ok, other=2.0)
        shifted_mean = total / count  # the sums are of (raw - centre)
        var = tl.maximum(total_sq / count - shifted_mean * shifted_mean, 0.0)
        mean = shifted_mean + _load_center(center_ptr, col, n_ok, ACC)
        invstd = 1.0 / tl.sqrt(var + tl.load(eps_ptr + col, mask=n_ok, other=1.0))
        if pid_m == 0:  # one program per column block records the statistics
            tl.store(saved_ptr + col, mean, mask=n_ok)
            tl.store(saved_ptr + cols + col, invstd, mask=n_ok)
            tl.store(saved_ptr + 2 * cols + col, var * count / (count - 1.0), mask=n_ok)
            tl.store(saved_ptr + 3 * cols + col, count, mask=n_ok)
    bn_ok, gamma, a, b = _affine(row, n_ok, col, gamma_ptr, beta_ptr, mean, invstd, ACC)
    y = raw * a[None, :] + b[None, :]
    y = tl.where((tl.load(row + F_RELU) != 0) & (y < 0.0), 0.0, y)
    tl.store(tl.where(sel == 1, out_ptr, mid_ptr)[None, :] + off, y.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit(do_not_specialize=["batch", "cols"])
def _bn_backward_kernel(
    table_ptr, num_problems,
    gamma_ptr, beta_ptr, saved_ptr, sums_ptr, cols,  # sums: [2, cols], sum g and sum g * zhat per column
    raw_out_ptr, raw_mid_ptr, gout_ptr, dmid_ptr, dz_out_ptr, dz_mid_ptr,  # dz_*: the raw_* strides
    batch,
    o_h, o_w, o_sn, o_sh, o_sw, o_sc,
    m_h, m_w, m_sn, m_sh, m_sw, m_sc,
    g_sn, g_sh, g_sw, g_sc,  # grad_out strides
    d_sn, d_sh, d_sw, d_sc,  # d_mid strides
    SELECT: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, ACC: tl.constexpr,
    REDUCE: tl.constexpr,  # True: add into `sums`; False: read the reduced `sums`, write dz
):
    pid = tl.program_id(0)
    row, img, oy, ox, m_ok, offs_n, n_ok, sel, ch, pid_m = _tile(
        pid, table_ptr, num_problems, batch, o_h, o_w, m_h, m_w, SELECT, BLOCK_M, BLOCK_N)
    col = tl.load(row + F_SS_OFF) + offs_n
    mask = m_ok[:, None] & n_ok[None, :]
    bn_ok = n_ok & (tl.load(row + F_BN) != 0)
    mean = tl.load(saved_ptr + col, mask=bn_ok, other=0.0)
    invstd = tl.load(saved_ptr + cols + col, mask=bn_ok, other=1.0)
    bn_ok, gamma, a, b = _affine(row, n_ok, col, gamma_ptr, beta_ptr, mean, invstd, ACC)
    off = _offsets(img, oy, ox, sel, ch, o_sn, o_sh, o_sw, o_sc, m_sn, m_sh, m_sw, m_sc)
    raw = tl.load(tl.where(sel == 1, raw_out_ptr, raw_mid_ptr)[None, :] + off, mask=mask, other=0.0).to(ACC)
    g_off = _offsets(img, oy, ox, sel, ch, g_sn, g_sh, g_sw, g_sc, d_sn, d_sh, d_sw, d_sc)
    dy = tl.load(tl.where(sel == 1, gout_ptr, dmid_ptr)[None, :] + g_off, mask=mask, other=0.0).to(ACC)
    y = raw * a[None, :] + b[None, :]  # as the forward computed it, so the ReLU mask agrees
    g = tl.where(((tl.load(row + F_RELU) != 0) & (y <= 0.0)) | ~mask, 0.0, dy)
    zhat = (raw - mean[None, :]) * invstd[None, :]
    if REDUCE:
        tl.atomic_add(sums_ptr + col, tl.sum(g, 0), mask=n_ok)
        tl.atomic_add(sums_ptr + cols + col, tl.sum(g * zhat, 0), mask=n_ok)
    else:
        sum_g = tl.load(sums_ptr + col, mask=bn_ok, other=0.0)
        sum_gz = tl.load(sums_ptr + cols + col, mask=bn_ok, other=0.0)
        count = tl.load(saved_ptr + 3 * cols + col, mask=bn_ok, other=1.0)
        dz = (gamma * invstd)[None, :] * (g - (sum_g[None, :] + zhat * sum_gz[None, :]) / count[None, :])
        dz = tl.where(bn_ok[None, :], dz, g)
        tl.store(tl.where(sel == 1, dz_out_ptr, dz_mid_ptr)[None, :] + off, dz.to(dz_out_ptr.dtype.element_ty),
                 mask=mask)


def _grid(batch, problems, hw):
    """Programs for `problems` ((dst0 buffer, ncols) of the selected problems, in table order)."""
    return (sum(triton.cdiv(batch * hw[dst], BLOCK_M) * triton.cdiv(ncols, BLOCK_N) for dst, ncols in problems),)


def _strides(t):
    return kconv.geometry(t)[2:]


def bn_apply(table, problems, gamma, beta, center, eps, stats, saved, raw_out, raw_mid, out, mid, recompute=False):
    """Normalise, scale, shift and ReLU the pre-activations of a stage's BatchNorm problems.

    Args:
        table: the stage's problem table (as for conv.conv_stage).
        problems: (dst0 buffer, ncols) of the problems the launch covers, in table order: those
            with `bn` (forward), or the convolutions with columns in `mid` (recompute).
        gamma, beta, center: per column (1-D, indexed by ss_off + column), any float dtype.
        eps: per column, the accumulator dtype.
        stats: [columns, 3] sums and sums of squares of (raw - center), and counts, from
            conv_stage (forward only).
        saved: [4, columns] of the accumulator dtype: written in forward (mean, 1/sqrt(var + eps),
            unbiased variance, count), read when recomputing.
        raw_out, raw_mid: the shadows conv_stage wrote; out, mid: the buffers (same strides).
        recompute: write only the columns that go to `mid`, from `saved` (backward).
    """
    _launch(_bn_apply_kernel, problems, out, mid,
            (table, table.shape[0], gamma, beta, center, eps, stats, saved, saved.shape[1],
             raw_out, raw_mid, out, mid, out.shape[0], *kconv.geometry(out), *kconv.geometry(mid)),
            SELECT=kconv.SELECT_GEMM_MID if recompute else kconv.SELECT_BN, RECOMPUTE=recompute)


def bn_backward_reduce(table, problems, gamma, beta, saved, sums, raw_out, raw_mid, grad_out, d_mid):
    """Add, per column of the stage's BatchNorm problems, sum(g) and sum(g * zhat) into sums[0]
    and sums[1] ([2, columns], zero-initialised, accumulator dtype), g being the gradient after
    the ReLU.

    `problems`: (dst0 buffer, ncols) of the problems with `bn`; grad_out is the gradient of the
    block output (any strides), d_mid that of `mid` (any strides)."""
    _backward(True, table, problems, gamma, beta, saved, sums, raw_out, raw_mid, grad_out, d_mid, raw_out, raw_mid)


def bn_backward(table, problems, gamma, beta, saved, sums, raw_out, raw_mid, grad_out, d_mid, dz_out, dz_mid):
    """Write the gradient of every convolution's pre-activation (through ReLU and BatchNorm) into
    dz_out / dz_mid (the strides of raw_out / raw_mid), for a stage.

    `problems`: (dst0 buffer, ncols) of the stage's convolutions; sums: [2, columns] from
    bn_backward_reduce, summed over every process of a synchronised BatchNorm."""
    _backward(False, table, problems, gamma, beta, saved, sums, raw_out, raw_mid, grad_out, d_mid, dz_out, dz_mid)


def _backward(reduce, table, problems, gamma, beta, saved, sums, raw_out, raw_mid, grad_out, d_mid, dz_out, dz_mid):
    _launch(_bn_backward_kernel, problems, raw_out, raw_mid,
            (table, table.shape[0], gamma, beta, saved, sums, saved.shape[1],
             raw_out, raw_mid, grad_out, d_mid, dz_out, dz_mid, raw_out.shape[0],
             *kconv.geometry(raw_out), *kconv.geometry(raw_mid), *_strides(grad_out), *_strides(d_mid)),
            SELECT=kconv.SELECT_BN if reduce else kconv.SELECT_GEMM, REDUCE=reduce)


def _launch(kernel, problems, out, mid, args, **meta):
    """One launch of `kernel` over the programs of `problems` (none if they have no programs):
    `out`/`mid` (or their shadows) give the pixel counts and the accumulator dtype."""
    hw = {kconv.BUF_OUT: out.shape[2] * out.shape[3], kconv.BUF_MID: mid.shape[2] * mid.shape[3]}
    grid = _grid(out.shape[0], problems, hw)
    if grid[0] == 0:
        return
    with kconv.hidden_from_dispatch():
        kernel[grid](*args, BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N, ACC=kconv.accumulator(out.dtype), **meta)
    kconv.count_launch()
