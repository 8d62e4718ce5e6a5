"""The benchmark harness, one for the pytest-benchmark suites (bench/test_*.py) and the quick GPU
run (bench/quick.py, bench/kernel_census.py): the table of blocks, networks and inputs; how an
implementation is prepared (eager, fused, fused under a CUDA graph, torch.compile), its launches
counted and its time taken; the one error measure and its tolerances. The FLOPs and bytes model
is the fusion report's (`fused_inception.report.traffic`, `stage_traffic`).
"""

import contextlib
import copy
import importlib
import os
import time

import pytest
import torch

ON_GPU = torch.cuda.is_available()
DEVICE = "cuda" if ON_GPU else "cpu"
# The kernels are decorated for the interpreter or the GPU when fused_inception is first imported:
# a caller that chose (bench/conftest.py, quick.py --device, kernel_census.py) has set this already.
os.environ.setdefault("TRITON_INTERPRET", "0" if ON_GPU else "1")

import torchvision  # noqa: E402

import fused_inception  # noqa: E402
from fused_inception import build_plans, count_launches  # noqa: E402
from fused_inception.kernels import conv as kconv  # noqa: E402
from fused_inception.launches import count_torch_kernels  # noqa: E402
from fused_inception.models.inception_resnet_v2 import Block35  # noqa: E402
from fused_inception.report import informative_init_  # noqa: E402

if kconv.INTERPRETING:  # (CPU: the suites and quick.py check that every case runs and agrees)
    from fused_inception import interpreter  # noqa: E402

    interpreter.configure()  # (cheaper, and bf16 rounded as on a GPU: fused_inception/interpreter.py)

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}

# name: (torchvision class, or "Block35": Inception-ResNet-v2's, fused by fuse(); its constructor
# arguments; input H=W in the network at 224x224 / 299x299). Inception v3: the first block of each
# type (Mixed_5b, 6a, 6b, 7a, 7b).
BLOCKS = {
    "googlenet-3a": ("Inception", (192, 64, 96, 128, 16, 32, 32), 28),
    "googlenet-3b": ("Inception", (256, 128, 128, 192, 32, 96, 64), 28),
    "googlenet-4a": ("Inception", (480, 192, 96, 208, 16, 48, 64), 14),
    "googlenet-4b": ("Inception", (512, 160, 112, 224, 24, 64, 64), 14),
    "googlenet-4c": ("Inception", (512, 128, 128, 256, 24, 64, 64), 14),
    "googlenet-4d": ("Inception", (512, 112, 144, 288, 32, 64, 64), 14),
    "googlenet-4e": ("Inception", (528, 256, 160, 320, 32, 128, 128), 14),
    "googlenet-5a": ("Inception", (832, 256, 160, 320, 32, 128, 128), 7),
    "googlenet-5b": ("Inception", (832, 384, 192, 384, 48, 128, 128), 7),
    "v3-A": ("InceptionA", (192, 32), 35),
    "v3-B": ("InceptionB", (288,), 35),
    "v3-C": ("InceptionC", (768, 128), 17),
    "v3-D": ("InceptionD", (768,), 17),
    "v3-E": ("InceptionE", (1280,), 8),
    "irv2-block35": ("Block35", (), 35),
}
SMOKE = ("googlenet-3a", "v3-A", "v3-B", "v3-C", "v3-D", "v3-E", "irv2-block35")  # one block of each kind
CPU_SIZE = 7  # the interpreter: every block at 7x7 (the smallest map the networks have)
NETWORKS = {"googlenet": 224, "inception_v3": 299}  # input H=W on a GPU
CPU_NETWORKS = {"googlenet": 32, "inception_v3": 75}  # the interpreter: the smallest legal inputs

# Tolerances: max |y - expected| <= tol * max |expected|, against the fp32 model with TF32 off
# (`yardstick`); a result in a narrower dtype may also be twice as far off as eager PyTorch's own
# result in that dtype (`tolerance`: rounding compounds over a network).
TOL = {"fp32": 1e-4, "tf32": 1e-2, "bf16": 2e-2, "fp16": 1e-2}
TOL_TRAIN = 1e-3  # one fp32 training step: output, input and parameter gradients, running stats


# ---------------------------------------------------------------------------------------------
# Models and inputs


def block_models(name, device, dtype=torch.float32):
    """(reference, fused) of table block `name`: the same random weights (informative_init_),
    eval mode, channels_last, on `device` in `dtype`."""
    cls, args, _ = BLOCKS[name]
    torch.manual_seed(0)
    if cls == "Block35":
        ref = informative_init_(Block35(lambda n: n, scale=0.17), 0)
        fused, _ = fused_inception.fuse(copy.deepcopy(ref))
    else:
        module = "googlenet" if cls == "Inception" else "inception"  # torchvision.models.googlenet is a function
        ref = informative_init_(getattr(importlib.import_module(f"torchvision.models.{module}"), cls)(*args), 0)
        fused = getattr(fused_inception, "Fused" + cls)(*args)
        fused.load_state_dict(ref.state_dict())
    convert = dict(device=device, dtype=dtype, memory_format=torch.channels_last)
    return ref.eval().to(**convert), fused.eval().to(**convert)


def block_input(name, batch, device, dtype, size=None):
    """A random channels_last input of block `name`: its map in the network (CPU_SIZE on the CPU)."""
    cls, args, full = BLOCKS[name]
    cin = 320 if cls == "Block35" else args[0]
    size = size or (CPU_SIZE if device == "cpu" else full)
    return _randn((batch, cin, size, size), device, dtype)


def network_models(network, device, dtype=torch.float32):
    """(torchvision's model, ours) of `network` without aux heads, one random state_dict, eval,
    channels_last, on `device` in `dtype`."""
    torch.manual_seed(0)
    ref = getattr(torchvision.models, network)(weights=None, aux_logits=False, init_weights=True)
    ref = informative_init_(ref, 0)
    fused = getattr(fused_inception.models, network)(aux_logits=False)
    fused.load_state_dict(ref.state_dict())
    convert = dict(device=device, dtype=dtype, memory_format=torch.channels_last)
    return ref.eval().to(**convert), fused.eval().to(**convert)


def network_input(network, batch, device, dtype, size=None):
    """A random channels_last input of `network`: its size on a GPU, the smallest on the CPU."""
    size = size or (CPU_NETWORKS if device == "cpu" else NETWORKS)[network]
    return _randn((batch, 3, size, size), device, dtype)


def _randn(shape, device, dtype):
    if device == "meta":  # shapes only (bench/kernel_census.py)
        return torch.empty(shape, device=device, dtype=dtype, memory_format=torch.channels_last)
    return torch.randn(shape, generator=torch.Generator().manual_seed(1)).to(
        device=device, dtype=dtype, memory_format=torch.channels_last)


def in_dtype(model, dtype):
    """`model` in `dtype` (a copy, unless it is in it already)."""
    return model if next(model.parameters()).dtype == dtype else copy.deepcopy(model).to(dtype)


# ---------------------------------------------------------------------------------------------
# The error measure


@contextlib.contextmanager
def ieee_fp32():
    """fp32 without TF32 inside: cuDNN, matmuls, and the fused kernels (which read cuDNN's flag)."""
    flags = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = flags


def rel_err(y, ref):
    """(max |y - ref| / max |ref|, NaN count of y); a NaN counts as an infinite error."""
    y, ref = y.detach().float(), ref.detach().float()
    scale = ref.abs().max().item()
    err = (y - ref).abs().nan_to_num(float("inf")).max().item() / max(scale, 1e-30)
    return err, int(y.isnan().sum().item())


def yardstick(reference, eager, x):
    """(expected, eager_err): what a forward on x is checked against, the fp32 `reference` model
    on x in fp32 with TF32 off; and the error of `eager` (the reference in x's dtype) against it."""
    with torch.no_grad():
        with ieee_fp32():
            expected = reference(x.float())
        return expected, rel_err(eager(x), expected)[0]


def tolerance(dtype, eager_err=0.0):
    """The largest error allowed a result in `dtype` (fp32: as TF32 when torch's flags allow it)."""
    key = {torch.bfloat16: "bf16", torch.float16: "fp16"}.get(dtype)
    key = key or ("tf32" if kconv.fp32_precision() == "tf32" else "fp32")
    return max(TOL[key], 2 * eager_err)


def check(y, expected, tol):
    """The check every case makes: {err, nans, tol, ok}."""
    err, nans = rel_err(y, expected)
    return dict(err=err, nans=nans, tol=tol, ok=err <= tol and not nans)


def train_step_errors(reference, fused, x):
    """One training step (forward, then backward of a random output gradient) of `fused` against
    `reference` from the same weights, both put in train mode: ({out, grad_x, grad_params (the
    worst), running_stats (the worst)}: rel_err of each), the fused step's seconds)."""
    xr, xf = x.clone().requires_grad_(), x.clone().requires_grad_()
    yr = reference.train()(xr)
    g = torch.randn(yr.shape, generator=torch.Generator().manual_seed(2)).to(yr.device).contiguous(
        memory_format=torch.channels_last)
    yr.backward(g)
    yf, seconds = first_call(lambda: fused.train()(xf), x.device)
    yf.backward(g)
    errs = {"out": rel_err(yf, yr)[0], "grad_x": rel_err(xf.grad, xr.grad)[0]}
    params, buffers = dict(fused.named_parameters()), dict(fused.named_buffers())
    errs["grad_params"] = max(rel_err(params[k].grad, p.grad)[0] for k, p in reference.named_parameters()
                              if p.grad is not None)
    errs["running_stats"] = max((rel_err(buffers[k], b)[0] for k, b in reference.named_buffers()
                                 if k.endswith(("running_mean", "running_var"))), default=0.0)
    return errs, seconds


# ---------------------------------------------------------------------------------------------
# Preparing, counting, timing


@contextlib.contextmanager
def pinned(name):
    """Every stage launch inside uses the tile config named `name` (kernels.conv.CONFIG_NAMES);
    None: autotuned, as outside."""
    if name is None:
        yield
        return
    kconv.pin_config(name)
    try:
        yield
    finally:
        kconv.pin_config(None)


def sync(device):
    if str(device).startswith("cuda"):
        torch.cuda.synchronize()


def first_call(fn, device):
    """(result, seconds) of the first call: compilation, autotuning, plan building."""
    start = time.perf_counter()
    y = fn()
    sync(device)
    return y, time.perf_counter() - start


def model_of(impl, reference, fused):
    """The module that runs `impl`: "eager" the reference, "fused" and "fused-cudagraph" the fused
    model, "compile-<mode>" torch.compile of the reference in that mode."""
    if impl.startswith("compile-"):
        return torch.compile(reference, mode=impl[len("compile-"):])
    return reference if impl == "eager" else fused


def prepare(model, x, graph=False):
    """(run, seconds): a zero-argument forward of `model` on x, warmed up, and its first call's
    seconds (plans, compilation, autotuning; with `graph`, the CUDA graph capture too): with
    `graph`, replays of a CUDA graph of one forward."""
    build_plans(model)
    with torch.no_grad():
        _, seconds = first_call(lambda: model(x), x.device)
        for _ in range(2 if x.is_cuda else 0):  # the interpreter needs no warm-up (and is slow)
            model(x)
        sync(x.device)
    if not graph:
        return (lambda: model(x)), seconds
    start = time.perf_counter()
    g = torch.cuda.CUDAGraph()
    with torch.no_grad(), torch.cuda.graph(g):
        static_y = model(x)
    g.replay()
    torch.cuda.synchronize()

    def replay():
        g.replay()
        return static_y

    return replay, seconds + time.perf_counter() - start


def counted_run(run, impl, device):
    """(output, launches, how counted, host ms) of one call of `run`: Triton launches + torch
    kernels ("counted": eager, fused); the CUDA profiler's kernel count ("profiler") where those
    can't see (torch.compile, CUDA graph replays); None off the GPU."""
    start = time.perf_counter()
    if impl in ("eager", "fused"):
        with count_launches() as n, count_torch_kernels() as k:
            y = run()
        return y, n.value + k.value, "counted", (time.perf_counter() - start) * 1e3
    if device != "cuda":
        y = run()
        return y, None, None, (time.perf_counter() - start) * 1e3
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        y = run()
        torch.cuda.synchronize()
    kernels = sum(1 for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA)
    return y, kernels, "profiler", (time.perf_counter() - start) * 1e3


def bench_ms(fn, device):
    """Median milliseconds of fn(): do_bench on a GPU (warm-up, L2 flush, CUDA events); one
    host-timed call in the interpreter (meaningless, for the CPU tests)."""
    if device == "cuda":
        import triton.testing

        return triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median")
    start = time.perf_counter()
    fn()
    return (time.perf_counter() - start) * 1e3


def cudagraph_ms(run):
    """{"cudagraph_ms": median ms of `run` replayed from a CUDA graph (do_bench_cudagraph)}, or
    {"cudagraph_error": why it could not be captured} (not every path captures)."""
    import triton.testing

    try:
        return dict(cudagraph_ms=triton.testing.do_bench_cudagraph(run, rep=100, return_mode="median"))
    except Exception as e:  # noqa: BLE001 - recorded, not fatal
        return dict(cudagraph_error=f"{type(e).__name__}: {str(e)[:200]}")


# ---------------------------------------------------------------------------------------------
# The pytest-benchmark suites


# GPU: the shapes that matter; CPU (interpreter): the smallest that exercise the same code.
BATCHES = [1, 32, 256] if ON_GPU else [1]
SUITE_DTYPES = dict(DTYPES) if ON_GPU else {"fp32": torch.float32}
IMPLS = (["eager", "compile-default", "compile-max-autotune", "compile-reduce-overhead", "fused", "fused-cudagraph"]
         if ON_GPU else ["eager", "fused"])
SUITE_BLOCKS = list(BLOCKS) if ON_GPU else list(SMOKE)  # the interpreter: one block of each kind
# FI_BENCH_DTYPES / FI_BENCH_IMPLS / FI_BENCH_BATCHES (comma-separated) run a subset: how
# `bench/gpu_run.sh full` splits the suites into parts that fit one device command each.
if os.environ.get("FI_BENCH_DTYPES"):
    SUITE_DTYPES = {k: v for k, v in SUITE_DTYPES.items() if k in os.environ["FI_BENCH_DTYPES"].split(",")}
if os.environ.get("FI_BENCH_IMPLS"):
    IMPLS = [i for i in IMPLS if i in os.environ["FI_BENCH_IMPLS"].split(",")]
if os.environ.get("FI_BENCH_BATCHES"):
    BATCHES = [b for b in BATCHES if str(b) in os.environ["FI_BENCH_BATCHES"].split(",")]


def check_and_measure(benchmark, what, name, batch, dtype, impl):
    """One suite case: `what` ("block" or "network") `name` at `batch` in `dtype`, run by `impl`,
    prepared; one counted forward checked against the yardstick (an assertion); then timed with
    pytest-benchmark (K forwards then one synchronize per round), do_bench and
    do_bench_cudagraph beside it in extra_info. In the interpreter the counted forward is the
    (meaningless) timed one. CUDA graphs are measured at batch 1 only."""
    if impl in ("compile-reduce-overhead", "fused-cudagraph") and batch != 1:
        pytest.skip("CUDA graphs are measured at batch 1, where launch overhead dominates")
    models, make_input = (block_models, block_input) if what == "block" else (network_models, network_input)
    reference, fused = models(name, DEVICE)
    x = make_input(name, batch, DEVICE, DTYPES[dtype])
    info = {what: name, "batch": batch, "dtype": dtype, "layout": "channels_last", "input": list(x.shape)}
    eager = in_dtype(reference, x.dtype)
    expected, eager_err = yardstick(reference, eager, x)
    run, first_s = prepare(model_of(impl, eager, fused.to(x.dtype)), x, graph=impl == "fused-cudagraph")
    with torch.no_grad():
        if ON_GPU:
            y, launches, how, _ = counted_run(run, impl, DEVICE)
        else:
            y, launches, how, _ = benchmark.pedantic(counted_run, args=(run, impl, DEVICE), rounds=1)
    result = check(y, expected, tolerance(x.dtype, eager_err))
    assert result["ok"], (impl, result)
    benchmark.extra_info.update(info, impl=impl, launches=launches, launches_by=how, eager_err=eager_err,
                                first_call_s=first_s, **result)
    if not ON_GPU:
        return
    import triton.testing

    k = 10

    def rounds():
        for _ in range(k):
            run()
        torch.cuda.synchronize()

    with torch.no_grad():
        benchmark.extra_info["do_bench_ms"] = triton.testing.do_bench(run, warmup=25, rep=100)
        if not impl.endswith("cudagraph") and impl != "compile-reduce-overhead":
            benchmark.extra_info.update({f"do_bench_{key}": v for key, v in cudagraph_ms(run).items()})
        benchmark.extra_info["forwards_per_round"] = k
        benchmark.pedantic(rounds, rounds=20, warmup_rounds=3)
