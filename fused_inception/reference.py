"""The yardstick of the SASS reading: a plain implicit-GEMM convolution, compiled with a stage
kernel's tile.

Issue 20's bar for a K loop is "at most 1.3x the instructions per 64x128x16 wgmma of a plain
implicit-GEMM conv compiled with the same tile" (fused_inception.sass reads both). This is that
conv: one 3x3/s1/p1 convolution of a channels_last input (channel count and row pitches hinted
multiples of 8 and 16, as the stage kernel's channels_last buffers are), weights [N, K] with K
contiguous, one flat pipelined loop over taps x channel chunks of BLOCK_K (half of it for fp32,
as the stage kernel), tl.dot into an fp32 accumulator, no epilogue beyond the store. Nothing
of it runs: it is compiled for sm_90 to be read.

`per_mma(config, dtype)` compiles it under a stage config (kernels.conv.CONFIGS) for a dtype
("bf16", "fp16", "fp32": TF32) and returns its K loop's instructions per 64x128x16-equivalent
wgmma. For bf16 it reproduces sass.REFERENCE_PER_MMA (measured with the shared tool on the same
kind of kernel) within a few percent (tests/test_codegen.py); it also gives fp16 and fp32 their
own reference, which that table has not.
"""

import functools

import triton
import triton.language as tl

from fused_inception import sass


@triton.jit
def plain_conv(x_ptr, w_ptr, y_ptr, M, H, W, C, N, s_n, s_h, s_w, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
               BLOCK_K: tl.constexpr, INPUT_PRECISION: tl.constexpr):
    """y[m, n] = sum over the 3x3 taps and C channels of x[img, oy + r - 1, ox + s - 1, c] * w[n, tap, c];
    x, y channels_last with pitches s_* in units of 8 elements; M = images x H x W."""
    pid = tl.program_id(0)
    tiles_m = tl.cdiv(M, BLOCK_M)
    offs_m = (pid % tiles_m) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = (pid // tiles_m) * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    c = C  # (its divisibility by 16 is in the compiled signature, as the JIT specialises it)
    m_ok = offs_m < M
    img = offs_m // (H * W)
    oy = offs_m % (H * W) // W
    ox = offs_m % W
    w_row = tl.minimum(offs_n, N - 1) * (9 * c)
    chunks = tl.cdiv(c, BLOCK_K)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for kk in range(9 * chunks):
        tap = kk // chunks
        ch = (kk - tap * chunks) * BLOCK_K + offs_k
        y = oy + tap // 3 - 1
        x = ox + tap % 3 - 1
        ok = m_ok & (y >= 0) & (y < H) & (x >= 0) & (x < W)
        a = tl.load(x_ptr + (img * s_n * 8 + y * s_h * 8 + x * s_w * 8)[:, None] + ch[None, :],
                    mask=ok[:, None] & (ch < c)[None, :], other=0.0)
        b = tl.load(w_ptr + ch[:, None] + (w_row + tap * c)[None, :], mask=(ch < c)[:, None], other=0.0)
        acc = tl.dot(a, b, acc, input_precision=INPUT_PRECISION)
    tl.store(y_ptr + (offs_m * N)[:, None] + offs_n[None, :], acc, mask=m_ok[:, None] & (offs_n < N)[None, :])


_SCALARS = ("M", "H", "W", "C", "N", "s_n", "s_h", "s_w")


def compile_plain_conv(config, dtype, target=(90, 32)):
    """plain_conv compiled for `target` under a triton.Config of the stage kernel (BLOCK_K halved
    for fp32, as the stage kernel does) with operands of `dtype` ("bf16", "fp16" or "fp32")."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    k = config.kwargs
    block_k = k["BLOCK_K"] // 2 if dtype == "fp32" else k["BLOCK_K"]
    consts = {"BLOCK_M": k["BLOCK_M"], "BLOCK_N": k["BLOCK_N"], "BLOCK_K": block_k,
              "INPUT_PRECISION": "tf32" if dtype == "fp32" else "ieee"}
    signature = {"x_ptr": f"*{dtype}", "w_ptr": f"*{dtype}", "y_ptr": "*fp32", **{s: "i32" for s in _SCALARS}}
    signature.update({name: "constexpr" for name in consts})
    params = list(signature)
    src = ASTSource(plain_conv, signature, constexprs={(params.index(n),): v for n, v in consts.items()},
                    attrs={(params.index(n),): [["tt.divisibility", 16]] for n in ("x_ptr", "w_ptr", "y_ptr", "C")})
    return triton.compile(src, target=GPUTarget("cuda", *target),
                          options={"num_warps": config.num_warps, "num_stages": config.num_stages})


@functools.lru_cache(maxsize=None)
def _per_mma(config_key, dtype):
    config = triton.Config(dict(config_key[0]), num_warps=config_key[1], num_stages=config_key[2])
    loops = sass.kernel_loops(compile_plain_conv(config, dtype))
    if len(loops) != 1:
        raise RuntimeError(f"the reference conv compiled to {len(loops)} wgmma loops, not 1")
    return loops[0].per_mma


def per_mma(config, dtype):
    """Instructions per 64x128x16-equivalent wgmma of plain_conv's K loop under `config` (a
    triton.Config with BLOCK_M/N/K) for `dtype` ("bf16", "fp16", "fp32"); compiled once per
    process and config."""
    key = (tuple(sorted(config.kwargs.items())), config.num_warps, config.num_stages)
    return _per_mma(key, dtype)
