"""Compile the stage kernel for Hopper (sm_90) with Triton's real backend, no GPU needed.

The interpreter runs NumPy and accepts things the compiler rejects (loop-carried type changes,
pointer selects, dot shapes); this catches those on the CPU machine by compiling every autotune
config for every dtype down to a cubin with the ptxas that ships in Triton's wheel. It runs in a
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
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from fused_inception.kernels import conv as k

assert not k.INTERPRETING
fn = k._conv_stage_kernel
names = list(inspect.signature(fn.fn).parameters)
for dtype in ("fp32", "fp16", "bf16"):
    sig = {}
    for n in names:
        if n == "table_ptr":
            sig[n] = "*i32"
        elif n in ("scale_ptr", "shift_ptr"):
            sig[n] = "*fp32"
        elif n.endswith("_ptr"):
            sig[n] = "*" + dtype
        elif n.isupper() or n in ("BLOCK_M", "BLOCK_N", "BLOCK_K"):
            sig[n] = "constexpr"
        else:
            sig[n] = "i32"
    for cfg in k.CONFIGS:
        const = dict(cfg.kwargs, DOT_IN_FP32=False, INPUT_PRECISION="tf32" if dtype == "fp32" else "ieee")
        src = ASTSource(fn, sig, constexprs={(names.index(n),): v for n, v in const.items()})
        c = triton.compile(src, target=GPUTarget("cuda", 90, 32),
                           options={"num_warps": cfg.num_warps, "num_stages": cfg.num_stages})
        assert c.asm["cubin"], (dtype, cfg)
        print(dtype, cfg.kwargs, cfg.num_warps, cfg.num_stages, "shared", c.metadata.shared, flush=True)
"""


def test_stage_kernel_compiles_for_sm90():
    try:
        import triton.backends.nvidia  # noqa: F401
    except ImportError:
        pytest.skip("this Triton build has no NVIDIA backend to compile with")
    env = dict(os.environ, TRITON_INTERPRET="0")
    r = subprocess.run([sys.executable, "-c", SCRIPT], env=env, capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stdout + r.stderr
    assert r.stdout.count("shared") == 3 * len(kconv.CONFIGS)
