"""Compile the kernels for Hopper (sm_90) with Triton's real backend, no GPU needed.

The interpreter runs NumPy and accepts things the compiler rejects (loop-carried type changes,
pointer selects, dot shapes); this catches those on the CPU machine by compiling the stage kernel
(every autotune config, inference in every dtype, training in fp32 and bf16) and the BatchNorm
kernels down to a cubin with the ptxas that ships in Triton's wheel. It runs in a
subprocess because this test session has TRITON_INTERPRET=1.
"""

import os
import subprocess
import sys

import pytest

from fused_inception.kernels import conv as kconv

SCRIPT = r"""
import inspect, sys
import triton
import triton.language as tl
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from fused_inception.kernels import batchnorm as kb
from fused_inception.kernels import conv as k

assert not k.INTERPRETING
TARGET = GPUTarget("cuda", 90, 32)


def compile_kernel(fn, tensor_types, const, num_warps=4, num_stages=3):
    names = list(inspect.signature(fn.fn).parameters)
    sig = {n: "constexpr" if n in const else tensor_types.get(n, "i32" if not n.endswith("_ptr") else None)
           for n in names}
    missing = [n for n, t in sig.items() if t is None]
    assert not missing, missing
    src = ASTSource(fn, sig, constexprs={(names.index(n),): v for n, v in const.items()})
    c = triton.compile(src, target=TARGET, options={"num_warps": num_warps, "num_stages": num_stages})
    assert c.asm["cubin"]
    return c


def conv_types(dtype, train):
    # Training keeps fp32 weights, biases and running means under autocast (bf16 activations).
    weights = "fp32" if train else dtype
    return dict(table_ptr="*i32", w_ptr="*" + weights, scale_ptr="*fp32", shift_ptr="*" + weights,
                x_ptr="*" + dtype, out_ptr="*" + dtype, mid_ptr="*" + dtype, raw_out_ptr="*" + dtype,
                raw_mid_ptr="*" + dtype, stats_ptr="*fp32", center_ptr="*" + weights)


PART = int(sys.argv[1])  # two halves, compiled in parallel processes

# The stage kernel: inference in every dtype (part 0), training in fp32 and bf16 (autocast, part
# 1), every config.
for train, dtypes in ((False, ("fp32", "fp16", "bf16")) if PART == 0 else (True, ("fp32", "bf16")),):
    for dtype in dtypes:
        for cfg in k.CONFIGS:
            const = dict(cfg.kwargs, DOT_IN_FP32=False, INPUT_PRECISION="tf32" if dtype == "fp32" else "ieee",
                         ACC=tl.float32, TRAIN=train)
            c = compile_kernel(k._conv_stage_kernel, conv_types(dtype, train), const, cfg.num_warps, cfg.num_stages)
            print("conv", "train" if train else "eval", dtype, cfg.kwargs, cfg.num_warps, cfg.num_stages,
                  "shared", c.metadata.shared, flush=True)

# The BatchNorm kernels (forward apply and recompute, backward reduction and gradient), part 1.
blocks = dict(BLOCK_M=kb.BLOCK_M, BLOCK_N=kb.BLOCK_N, ACC=tl.float32)
for dtype in ("fp32", "bf16") if PART == 1 else ():
    act = "*" + dtype
    common = dict(table_ptr="*i32", gamma_ptr="*fp32", beta_ptr="*fp32", saved_ptr="*fp32", raw_out_ptr=act,
                  raw_mid_ptr=act)
    for recompute in (False, True):
        types = dict(common, center_ptr="*fp32", eps_ptr="*fp32", stats_ptr="*fp32", out_ptr=act, mid_ptr=act)
        select = k.SELECT_GEMM_MID if recompute else k.SELECT_BN
        compile_kernel(kb._bn_apply_kernel, types, dict(blocks, SELECT=select, RECOMPUTE=recompute))
        print("bn_apply", dtype, "recompute" if recompute else "forward", "shared", flush=True)
    types = dict(common, sums_ptr="*fp32", gout_ptr=act, dmid_ptr=act, dz_out_ptr=act, dz_mid_ptr=act)
    for reduce in (True, False):
        select = k.SELECT_BN if reduce else k.SELECT_GEMM
        compile_kernel(kb._bn_backward_kernel, types, dict(blocks, SELECT=select, REDUCE=reduce))
        print("bn_backward", dtype, "reduce" if reduce else "dz", "shared", flush=True)
"""


def test_kernels_compile_for_sm90():
    try:
        import triton.backends.nvidia  # noqa: F401
    except ImportError:
        pytest.skip("this Triton build has no NVIDIA backend to compile with")
    env = dict(os.environ, TRITON_INTERPRET="0")
    parts = [subprocess.Popen([sys.executable, "-c", SCRIPT, str(part)], env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for part in (0, 1)]
    outputs = [p.communicate(timeout=900) for p in parts]
    for p, (stdout, stderr) in zip(parts, outputs):
        assert p.returncode == 0, stdout + stderr
    assert "".join(out for out, _ in outputs).count("shared") == 5 * len(kconv.CONFIGS) + 8, outputs
