"""What a GPU launch does besides the kernel, checked on the CPU with stand-ins for CUDA.

The first launch of a stage goes through Triton's autotuner (benchmarks with torch ops of its
own, then compiles); later launches call the compiled kernel directly, on the device of the
block's tensors; fp32 follows torch's TF32 settings as eager convolutions do. None of these
paths runs under the interpreter, so each is driven here through kernels.conv.StageLaunch with
fakes where CUDA would be.
"""

import contextlib

import pytest
import torch
import triton

from conftest import split_launches
from fused_inception import FusedInception, count_launches
from fused_inception.kernels import conv as kconv
from fused_inception.launches import count_torch_kernels


def _launch(dtype=torch.float32):
    """A StageLaunch of one 1x1 convolution (16 -> 8 channels) on CPU tensors, and a call of it
    (a function of the input)."""
    x = torch.randn(2, 16, 4, 4, dtype=dtype).to(memory_format=torch.channels_last)
    out = torch.empty(2, 8, 4, 4, dtype=dtype).to(memory_format=torch.channels_last)
    spec = (kconv.problem_spec(align=8),)
    table = torch.tensor([[16, 8, 0, 8, 0, 0, 0, 16, 0, 0]], dtype=torch.int32)
    w, b = torch.randn(8 * 16, dtype=dtype), torch.zeros(8)
    launch = kconv.StageLaunch(spec, table, (8,), (16,), x, out, out)
    return launch, x, lambda x: launch(w, None, b, x, out, out)


class _Kernel:
    """A compiled kernel's stand-in: records the launches (and the device current at each)."""

    def __init__(self, device_of_launch=None):
        self.calls, self.device_of_launch = [], device_of_launch

    def __getitem__(self, grid):
        return self

    def __call__(self, *args):
        self.calls.append(self.device_of_launch() if self.device_of_launch else args)


class _Tuner:
    """Triton's autotuner as the first launch sees it: benchmarking runs torch ops (zeroing
    buffers, flushing L2), then it launches the best config (`best`) and returns the compiled
    kernel. `runs` counts the tunings."""

    def __init__(self, kernel, best=None):
        self.kernel, self.best_config, self.runs = kernel, best or kconv.CONFIGS[0], 0

    def __getitem__(self, grid):
        def run(*args, **kwargs):
            self.runs += 1
            torch.zeros(4).zero_()  # what do_bench's L2 flush and reset_to_zero do
            return self.kernel
        return run


def test_first_launch_hides_autotuning_from_counters(monkeypatch):
    """A launch whose kernel is not tuned yet, inside count_launches/count_torch_kernels: one
    launch, no torch kernels (the autotuner's benchmarking is not the model's work); the next
    launch calls the compiled kernel directly."""
    launch, x, call = _launch()
    kernel = _Kernel()
    monkeypatch.setattr(kconv, "_eval_tuner", _Tuner(kernel))
    monkeypatch.setattr(kconv, "INTERPRETING", False)  # (the GPU path: through the tuner)
    with count_launches() as n, count_torch_kernels() as k:
        call(x)
    assert (n.value, k.value) == (1, 0), k.names
    assert launch.run is kernel and launch.meta[launch.meta_names.index("BLOCK_M")] == 128
    with count_launches() as n:
        call(x)
    assert n.value == 1 and len(kernel.calls) == 1
    unaligned = torch.empty(x.numel() + 1, dtype=x.dtype)[1:].view(x.shape).copy_(x)
    with count_launches() as n:  # an input at another alignment: through Triton again, not kept
        call(unaligned)
    assert n.value == 1 and len(kernel.calls) == 1 and launch.run is kernel


def test_launch_runs_on_the_device_of_its_tensors(monkeypatch):
    """Kernels launch on the current CUDA device: a block on cuda:1 while cuda:0 is current must
    switch (without the guard: an illegal memory access)."""
    launch, x, call = _launch(torch.bfloat16)
    current = [0]

    @contextlib.contextmanager
    def device(d):
        before, current[0] = current[0], torch.device(d).index
        try:
            yield
        finally:
            current[0] = before

    monkeypatch.setattr(torch.cuda, "current_device", lambda: current[0])
    monkeypatch.setattr(torch.cuda, "device", device)
    kernel = _Kernel(device_of_launch=lambda: current[0])
    launch.device, launch.cuda_index = torch.device("cuda:1"), 1
    launch.run, launch.meta, launch.tail_meta = kernel, (), launch.tail
    call(x)
    assert kernel.calls == [1] and current[0] == 0  # launched on cuda:1, cuda:0 current again after
    current[0] = 1
    call(x)
    assert kernel.calls == [1, 1]


@pytest.mark.parametrize("settings,expected", [
    ({}, "tf32"),  # PyTorch's default for cuDNN convolutions
    ({"cudnn.allow_tf32": False}, "ieee"),  # the legacy flag
    ({"cudnn.conv.fp32_precision": "ieee"}, "ieee"),  # the new API: reading allow_tf32 would raise
    ({"cudnn.conv.fp32_precision": "ieee", "fp32_precision": "tf32"}, "ieee"),  # the most specific wins
    ({"cudnn.conv.fp32_precision": "none", "cudnn.fp32_precision": "tf32"}, "tf32"),  # "none" defers
], ids=["default", "legacy-off", "new-api-ieee", "specific-wins", "none-defers"])
def test_fp32_precision_follows_torch(settings, expected):
    backends = torch.backends
    saved = (backends.cudnn.allow_tf32, backends.cudnn.conv.fp32_precision, backends.cudnn.fp32_precision,
             backends.fp32_precision)
    try:
        for name, value in settings.items():
            *path, attr = name.split(".")
            obj = backends
            for p in path:
                obj = getattr(obj, p)
            setattr(obj, attr, value)
        assert kconv.fp32_precision() == expected
        launch, x, call = _launch()
        with kconv.recording() as launches:  # what a launch would compile: the dot's precision
            call(x)
        assert launches[0][2]["INPUT_PRECISION"] == expected
    finally:
        backends.cudnn.conv.fp32_precision, backends.cudnn.fp32_precision, backends.fp32_precision = saved[1:]
        backends.cudnn.allow_tf32 = saved[0]


def test_first_forward_under_inference_mode_then_outside():
    """A block first run under torch.inference_mode, then outside it with another input shape
    (a new launch, a new autotuning key on a GPU): nothing made under inference mode is updated
    in place later (there used to be a shared placeholder the autotuner zeroed)."""
    block = FusedInception(24, 8, 8, 16, 4, 8, 8).eval()
    with torch.inference_mode():
        a = block(torch.randn(1, 24, 5, 5))
    with torch.no_grad():
        b = block(torch.randn(2, 24, 6, 6))
    assert a.shape == (1, 40, 5, 5) and b.shape == (2, 40, 6, 6)


def test_pinned_config_is_used_and_picked_again_after_unpinning():
    """pin_config(name): every launch takes the config of that name (recorded: the configs a
    launch may run under); None restores autotuning over the stage's configs; an unknown name
    raises."""
    launch, x, call = _launch()
    try:
        kconv.pin_config("m64n128k64w4s4")
        with kconv.recording() as launches:
            call(x)
        (config,) = launches[0][3]
        assert (config.kwargs["BLOCK_M"], config.kwargs["BLOCK_N"], config.num_warps) == (64, 128, 4)
        with pytest.raises(ValueError, match="no stage config named"):
            kconv.pin_config(2)
    finally:
        kconv.pin_config(None)
    with kconv.recording() as launches:
        call(x)
    assert launches[0][3] == kconv.configs_for(launch.spec, x.dtype)
    assert all(isinstance(c, triton.Config) for c in launches[0][3])


def test_configs_pruned_where_the_compiled_code_spills():
    """configs_for: a few-channel (flat) stem stage gets the 64x64 tile only; an fp32 stage with a
    pool drops 128x64 on 4 warps, one with a residual the 128-column tiles (their fp32 tiles
    spill there, fused_inception.codegen); every other stage, and any 16-bit one, is tuned over
    all CONFIGS."""
    def spec(*kinds):
        return tuple(kconv.problem_spec(kind=k) for k in kinds)

    big = [c for c in kconv.CONFIGS if c.kwargs["BLOCK_M"] == 128 and c.kwargs["BLOCK_N"] == 64 and c.num_warps == 4]
    assert len(big) == 1
    pooled = spec(kconv.KIND_GEMM, kconv.KIND_POOLED_GEMM)
    assert kconv.configs_for(pooled, torch.bfloat16) == kconv.CONFIGS
    assert kconv.configs_for(pooled, torch.float32) == [c for c in kconv.CONFIGS if c is not big[0]]
    assert kconv.configs_for(spec(kconv.KIND_POOL), torch.float32) == [c for c in kconv.CONFIGS if c is not big[0]]
    assert kconv.configs_for(pooled, torch.bfloat16, training=True) == [c for c in kconv.CONFIGS if c is not big[0]]
    assert kconv.configs_for(spec(kconv.KIND_GEMM, kconv.KIND_GEMM), torch.float32) == kconv.CONFIGS
    residual = (kconv.problem_spec(res=kconv.RES_X),)
    assert kconv.configs_for(residual, torch.bfloat16) == kconv.CONFIGS
    assert kconv.configs_for(residual, torch.float32) == [c for c in kconv.CONFIGS if c.kwargs["BLOCK_N"] < 128]
    flat = kconv.configs_for(spec(kconv.KIND_GEMM_FLAT), torch.bfloat16)
    assert [(c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"]) for c in flat] == [(64, 64)]


class _Jit:
    """A @triton.jit kernel as a first launch under a known config sees it: compiles, recording
    the config's (BLOCK_M, BLOCK_N, num_warps), and returns the kernel."""

    cache_key = "kernel source"  # (kernels.tuning keys its picks by it)

    def __init__(self, kernel):
        self.kernel, self.configs = kernel, []

    @property
    def compiles(self):
        return len(self.configs)

    def __getitem__(self, grid):
        def run(*args, **kwargs):
            self.configs.append((kwargs.get("BLOCK_M"), kwargs.get("BLOCK_N"), kwargs.get("num_warps")))
            return self.kernel
        return run


def test_training_launches_go_straight_to_the_compiled_kernels(monkeypatch):
    """A training step's launches (GoogLeNet's inception3a: 2 stage launches, 2 BatchNorm
    applies, 1 recompute of `mid`, 2 x 2 backward launches) go through Triton on the first step
    only; from the second step on each calls its compiled kernel directly, as an eval launch
    does (before, training built a new launch per stage and step: the autotuner every time)."""
    from fused_inception import program
    from fused_inception.kernels import batchnorm as kbn

    kernel = _Kernel()
    tuner, jit = _Tuner(kernel), _Jit(kernel)
    monkeypatch.setattr(kconv, "INTERPRETING", False)  # (the GPU path: through the tuner, on CPU tensors)
    monkeypatch.setattr(program, "triton_available_for", lambda x: True)
    monkeypatch.setattr(kconv, "_train_tuner", tuner)
    monkeypatch.setattr(kbn.ApplyLaunch, "kernel", jit)
    monkeypatch.setattr(kbn.BackwardLaunch, "kernel", jit)
    monkeypatch.setattr(kconv.StageLaunch, "kernel", jit)  # (split K's reduction: a fixed config, no tuner)
    block = FusedInception(192, 64, 96, 128, 16, 32, 32).train()
    x = torch.randn(2, 192, 6, 6).to(memory_format=torch.channels_last).requires_grad_()
    for step in range(3):
        before = (tuner.runs, jit.compiles, len(kernel.calls))
        with count_launches() as n:
            block(x).sum().backward()
        split = split_launches(block)  # (stage 2's 3x3 of 96 channels splits K at this size)
        assert split == 1 and n.value == 9 + split
        assert (tuner.runs - before[0], jit.compiles - before[1]) == ((2, 7 + split) if step == 0 else (0, 0))
        assert len(kernel.calls) - before[2] == (0 if step == 0 else 9 + split)
