"""What the suites run: implementations, shapes and the timing helper."""

import copy
import os

import torch

from fused_inception import build_plans, count_launches
from fused_inception.launches import count_torch_kernels

ON_GPU = torch.cuda.is_available()
DEVICE = "cuda" if ON_GPU else "cpu"

# GPU: the shapes that matter; CPU (interpreter): the smallest that exercise the same code.
BATCHES = [1, 32, 256] if ON_GPU else [1]
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16} if ON_GPU else {"fp32": torch.float32}
IMPLS = (["eager", "compile-default", "compile-max-autotune", "compile-reduce-overhead", "fused", "fused-cudagraph"]
         if ON_GPU else ["eager", "fused"])
# FI_BENCH_DTYPES / FI_BENCH_IMPLS / FI_BENCH_BATCHES (comma-separated) run a subset: how
# `bench/gpu_run.sh full` splits the suites into parts that fit one device command each.
for _var, _all in (("FI_BENCH_DTYPES", "DTYPES"), ("FI_BENCH_IMPLS", "IMPLS"), ("FI_BENCH_BATCHES", "BATCHES")):
    if os.environ.get(_var):
        _wanted = os.environ[_var].split(",")
        _value = globals()[_all]
        if isinstance(_value, dict):
            globals()[_all] = {k: v for k, v in _value.items() if k in _wanted}
        else:
            globals()[_all] = [v for v in _value if str(v) in _wanted]
NETWORK_SIZE = {"googlenet": 224, "inception_v3": 299} if ON_GPU else {"googlenet": 32, "inception_v3": 75}


def skip_reason(impl, batch):
    if impl in ("compile-reduce-overhead", "fused-cudagraph") and batch != 1:
        return "CUDA graphs are measured at batch 1, where launch overhead dominates"
    return None


def prepare(reference, fused, impl, x):
    """A zero-argument callable running one forward of `impl`, warmed up (plans, autotuning, compile)."""
    if impl == "eager":
        model = reference
    elif impl.startswith("compile-"):
        model = torch.compile(copy.deepcopy(reference), mode=impl[len("compile-"):])
    else:
        model = fused
    build_plans(model)  # plans built before counting, as by a first forward
    with torch.no_grad():
        for _ in range(3 if ON_GPU else 0):  # the interpreter needs no warm-up (and is slow)
            model(x)
    if impl == "fused-cudagraph":
        graph = torch.cuda.CUDAGraph()
        with torch.no_grad(), torch.cuda.graph(graph):
            static_y = model(x)

        def replay():
            graph.replay()
            return static_y

        return replay
    return lambda: model(x)


def run_counted(run, impl):
    """(output, kernel launches) of one forward: Triton launches + torch kernels (eager/fused); the
    CUDA profiler's kernel count for compiled code and CUDA graphs on a GPU."""
    if impl in ("eager", "fused"):
        with torch.no_grad(), count_launches() as n, count_torch_kernels() as k:
            y = run()
        return y, n.value + k.value
    if not ON_GPU:
        with torch.no_grad():
            return run(), None
    from torch.profiler import ProfilerActivity, profile

    with torch.no_grad(), profile(activities=[ProfilerActivity.CUDA]) as prof:
        y = run()
        torch.cuda.synchronize()
    return y, sum(1 for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA)


def check_and_measure(benchmark, run, impl, reference_output, tolerance, extra):
    """Check one forward of `run` against the reference output (max abs error <= tolerance * max
    |ref|), then time it with pytest-benchmark (K forwards then one synchronize per round) and
    record launches and do_bench / do_bench_cudagraph numbers in extra_info."""
    y, launches = run_counted(run, impl)
    err = (y.float() - reference_output.float()).abs().max().item()
    scale = reference_output.float().abs().max().item()
    assert err <= tolerance * scale, (impl, err, scale)
    benchmark.extra_info.update(max_abs_err=err, max_abs_ref=scale)
    benchmark.extra_info.update(extra, impl=impl, launches=launches)
    if ON_GPU:
        import triton.testing

        k = 10

        def rounds():
            for _ in range(k):
                run()
            torch.cuda.synchronize()

        with torch.no_grad():
            benchmark.extra_info["do_bench_ms"] = triton.testing.do_bench(run, warmup=25, rep=100)
            if not impl.endswith("cudagraph") and impl != "compile-reduce-overhead":
                try:
                    benchmark.extra_info["do_bench_cudagraph_ms"] = triton.testing.do_bench_cudagraph(run, rep=100)
                except Exception as e:  # noqa: BLE001 - recorded, not fatal: eager paths may not capture
                    benchmark.extra_info["do_bench_cudagraph_error"] = repr(e)[:200]
            benchmark.extra_info["forwards_per_round"] = k
            benchmark.pedantic(rounds, rounds=20, warmup_rounds=3)
    else:
        with torch.no_grad():
            benchmark.pedantic(run, rounds=1, warmup_rounds=0)
