"""Host time of a fused block's eval forward: the Python between the call and the kernel launches.

At batch 1 a GoogLeNet block's kernels take microseconds on a GPU, so the Python around them
decides the speed. Measured as the issue that set the bar did: inception3a, batch 1, 28x28,
channels_last, after a warm-up forward, with each stage's compiled kernel replaced by a no-op,
so that everything else a launch does on a GPU runs (the checks, the plan's staleness stamp,
the output allocation, the launch arguments). 5 runs of 1000 forwards; the best run is kept.
On this project's CPU machine: 19.3-19.4 us per block (2026-12-07; 13.9-16.4 us the same day
before the plan's stamp read every slot's tensor identity, about 6 us of it; 153 us before the
program layer). Later the same day stage 2 splits K at this size (kconv.split_counts: its 96-channel
3x3 runs 27 K iterations in fp32 chunks of 32), one more launch and a workspace per forward:
29.2 us per block with it and 25.4 us with kconv.SPLIT_PROGRAMS = 0, measured side by side (one
run each; the machine gave 19 us for the latter earlier that day).
"""

import time

import torch

import cases


class _NoOpKernel:
    """Stands in for a compiled kernel's launcher: takes the arguments, launches nothing."""

    def __call__(self, *args):
        pass


def _no_op(launch):
    """Make a cached launch take the fast path to a no-op kernel (the same path as on a GPU), its
    split K reduction launch (kconv.StageLaunch.finish) too."""
    launch.run, launch.tail_meta = _NoOpKernel(), launch.tail
    if getattr(launch, "finish", None) is not None:
        _no_op(launch.finish)


def test_block_forward_host_time(benchmark):
    _, block = cases.block_models("googlenet-3a", cases.DEVICE)
    x = cases.block_input("googlenet-3a", 1, cases.DEVICE, torch.float32, size=28)
    with torch.no_grad():
        block(x)  # plan, launches (and on a GPU the autotuned kernels)
        launches = block.plan().launches()
        assert len(launches) == 2
        for launch in launches:
            _no_op(launch)

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


def test_training_step_host_time(benchmark):
    """Host time of a training step of inception3a (forward, backward to the input and the
    parameters, running statistics): batch 1, channels_last, after a first step, with every
    compiled kernel (2 stage launches, 7 BatchNorm launches) replaced by a no-op, as above. The
    map is 4x4: the step's ATen ops (4 convolution backwards, a pool backward, the packing cat)
    compute on this CPU, where on a GPU they are launches; at 28x28 their arithmetic would be all
    there is to see. On this project's CPU machine (2026-12-07, 3 runs each, side by side):
    1.33-1.37 ms per step (~0.1 ms of it each ATen convolution backward) with the training
    launches cached; 1.57-1.59 ms before, when each step built its launches anew, measured with
    the Triton kernel objects as no-ops (so not counting Triton's own dispatch and autotuner,
    which every training launch then went through on a GPU). With stage 2 splitting K (its
    reduction launch a no-op too): 1.93 ms, against 1.71 ms with kconv.SPLIT_PROGRAMS = 0, side by
    side later that day."""
    if cases.DEVICE != "cpu":
        import pytest

        pytest.skip("a CPU measure of the host side (on a GPU the kernels would not be no-ops)")
    from fused_inception import FusedInception

    block = FusedInception(192, 64, 96, 128, 16, 32, 32).train()
    x = torch.randn(1, 192, 4, 4).to(memory_format=torch.channels_last).requires_grad_()

    def step():
        out = block(x)
        out.backward(torch.ones_like(out))

    step()  # the training plan and its launches (through the interpreter)
    launches = block._program.train_plan(x.dtype, x.device).all_launches()
    assert len(launches) == 10  # per stage: the conv, apply, recompute (empty in stage 2) and 2 backward
    for launch in launches:
        _no_op(launch)

    def steps(n=200):
        start = time.perf_counter()
        for _ in range(n):
            step()
        return (time.perf_counter() - start) / n

    # (the no-op kernels leave the buffers the ATen ops read uninitialised: denormals there would
    # make the CPU's arithmetic, not the host code, the measure)
    torch.set_flush_denormal(True)
    try:
        best = min(steps() for _ in range(5))
        benchmark.extra_info.update(us_per_step=best * 1e6, block="googlenet-3a", batch=1, size=4, mode="train")
        benchmark.pedantic(steps, rounds=1, iterations=1)
    finally:
        torch.set_flush_denormal(False)  # (PyTorch's default)
    print(f"host time per training step: {best * 1e6:.0f} us")
    assert best < 10e-3, f"{best * 1e6:.0f} us per training step"
