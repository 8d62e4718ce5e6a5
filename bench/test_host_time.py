"""Host time of a fused block's eval forward: the Python between the call and the kernel launches.

At batch 1 a GoogLeNet block's kernels take microseconds on a GPU, so the Python around them
decides the speed. Measured as the issue that set the bar did: inception3a, batch 1, 28x28,
channels_last, after a warm-up forward, with each stage's compiled kernel replaced by a no-op,
so that everything else a launch does on a GPU runs (the checks, the plan's staleness stamp,
the output allocation, the launch arguments). 5 runs of 1000 forwards; the best run is kept.
On this project's CPU machine: 19.3-19.4 us per block (2026-12-07; 13.9-16.4 us the same day
before the plan's stamp read every slot's tensor identity, about 6 us of it; 153 us before the
program layer).
"""

import time

import torch

from cases import DEVICE
from fused_inception import FusedInception
from fused_inception.report import informative_init_


class _NoOpKernel:
    """Stands in for a compiled kernel's launcher: takes the arguments, launches nothing."""

    def __call__(self, *args):
        pass


def test_block_forward_host_time(benchmark):
    block = informative_init_(FusedInception(192, 64, 96, 128, 16, 32, 32)).eval().to(DEVICE)
    x = torch.randn(1, 192, 28, 28, device=DEVICE).to(memory_format=torch.channels_last)
    with torch.no_grad():
        block(x)  # plan, launches (and on a GPU the autotuned kernels)
        launches = block.plan().launches()
        assert len(launches) == 2
        for launch in launches:
            launch.run, launch.tail_meta = _NoOpKernel(), launch.tail  # (the same fast path as on a GPU)

        def forwards(n=1000):
            start = time.perf_counter()
            for _ in range(n):
                block(x)
            return (time.perf_counter() - start) / n

        best = min(forwards() for _ in range(5))
        benchmark.extra_info.update(us_per_block=best * 1e6, block="googlenet-3a", batch=1)
        benchmark.pedantic(forwards, rounds=1, iterations=1)
    print(f"host time per block forward: {best * 1e6:.1f} us")
    assert best < 60e-6, f"{best * 1e6:.1f} us per block forward (about 20 expected on a 2-core CI machine)"
