"""The kernels as a Hopper GPU would run them, read from their sm_90 code (no GPU needed).

fused_inception.codegen records the launches of a fused model's forward (and backward), compiles
every kernel variant under every autotune config with Triton's own compiler and ptxas, and
checks the marks (codegen.MARKS): wgmma, pipelined K loops, 16-byte async copies, no spills,
shared memory that fits. The interpreter accepts code the compiler rejects or makes slow, so
this is the test that the kernels are fit for a GPU. It runs in a subprocess: this test session
has TRITON_INTERPRET=1, and the compiler needs it unset.
"""

import os
import subprocess
import sys

import pytest

SCRIPT = r"""
import os, sys
import torch
from fused_inception import codegen

model_name, dtype_name, train, max_kernels = sys.argv[1], sys.argv[2], sys.argv[3] == "train", int(sys.argv[4])
model = codegen.model_named(model_name, train)
size = codegen.default_size(model_name, train)
x = torch.empty(32 if not train else 2, 3, size, size).to(memory_format=torch.channels_last)
model = model.to(memory_format=torch.channels_last)
dtype = codegen._DTYPES[dtype_name]
workers = os.cpu_count() or 1
if train:
    with torch.autocast("cpu", dtype=dtype):
        kernels = codegen.compile_kernels(model, x, workers=workers)
else:
    kernels = codegen.compile_kernels(model.to(dtype), x.to(dtype), workers=workers)
from concurrent.futures import ThreadPoolExecutor
with ThreadPoolExecutor(workers) as pool:
    stats = list(pool.map(codegen.kernel_stats, [c for _, c in kernels]))
distinct = {label.rsplit(" ", 4)[0] for label, _ in kernels}
misses = [(label, codegen.check_marks(label, c, s)) for (label, c), s in zip(kernels, stats)]
misses = [(label, m) for label, m in misses if m]
print("compiled", len(kernels), "distinct", len(distinct))
for label, m in misses:
    print("MISS", label, m)
assert not misses
assert len(distinct) <= max_kernels, sorted(distinct)
print("stage kernels with a wgmma:", sum(1 for (l, _), s in zip(kernels, stats) if l.startswith("stage") and s["wgmma"]))
"""


@pytest.mark.parametrize("model,dtype,mode,max_kernels", [
    ("googlenet", "bf16", "eval", 5),  # stem conv1, conv2, conv3; the blocks' two stage kernels
    ("inception_v3", "bf16", "eval", 15),
    ("googlenet", "bf16", "train", 15),  # stage kernels with statistics, BatchNorm apply and backward
], ids=lambda v: str(v))
def test_kernels_meet_the_hopper_marks(model, dtype, mode, max_kernels):
    try:
        import triton.backends.nvidia  # noqa: F401
    except ImportError:
        pytest.skip("this Triton build has no NVIDIA backend to compile with")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    r = subprocess.run([sys.executable, "-c", SCRIPT, model, dtype, mode, str(max_kernels)], env=env,
                       capture_output=True, text=True, timeout=1500)
    assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-4000:]
    assert "compiled" in r.stdout
