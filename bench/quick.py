"""The parts of `bash bench/gpu_run.sh quick`: a correctness smoke, whole networks, a per-stage profile.

    python3 bench/quick.py smoke    --out DIR            # one block of each kind vs eager
    python3 bench/quick.py networks --out DIR --network googlenet [--batches 1,32,256]
    python3 bench/quick.py stages   --out DIR            # fused GoogLeNet b256: per-stage time, TFLOPS, GB/s
    python3 bench/quick.py ... --device cpu              # tiny shapes through Triton's interpreter (tests)

Every part appends one JSON object per finished case to DIR/<part>.jsonl and flushes it, so a
run cut off at its time limit still leaves what it finished; `--deadline` (Unix time) makes a
part skip (and record as skipped) what it cannot start in time; `--resume` skips cases already
in the file (after a CUDA error, which poisons the process, gpu_run.sh starts the part again).
Compile and autotune time is the first call of each case, recorded and printed on its own line
("compile+autotune: X s") and never part of a timing. `bench/report.py DIR` turns the files into
the README table and the speedup plot.

Records: {"part", "case", "status": "ok" | "FAIL" (wrong numbers) | "error" (an exception) |
"skipped", ...}; a FAIL or error also carries "error" or the measured error and tolerance.
"""

import argparse
import contextlib
import copy
import json
import os
import sys
import time
import traceback

PARTS = ["smoke", "networks", "stages"]
NETWORKS = {"googlenet": 224, "inception_v3": 299}  # input size on a GPU
CPU_NETWORKS = {"googlenet": 32, "inception_v3": 75}  # the interpreter: the smallest legal inputs
IMPLS = ["eager", "fused", "fused-cudagraph", "compile-default"]
CPU_IMPLS = ["eager", "fused"]
# H200 ceilings measured by this workplace (KINDS.md): bf16 dense GEMM and device-to-device copy.
PEAK_TFLOPS = 790.0
PEAK_GBS = 4300.0
EXIT_CUDA_ERROR = 3  # the process's CUDA context is poisoned: run the part again with --resume

# (name, torchvision class name or "irv2-block35", constructor args, input H=W on a GPU)
SMOKE_BLOCKS = [
    ("googlenet-3a", "Inception", (192, 64, 96, 128, 16, 32, 32), 28),
    ("v3-A", "InceptionA", (192, 32), 35),
    ("v3-B", "InceptionB", (288,), 35),
    ("v3-C", "InceptionC", (768, 128), 17),
    ("v3-D", "InceptionD", (768,), 17),
    ("v3-E", "InceptionE", (1280,), 8),
    ("irv2-block35", "Block35", (320,), 35),
]
SMOKE_BATCH = 2  # a GPU smoke: real channels and maps, small batch
TOL_FP32 = 1e-4  # eval fp32 (TF32 off) vs eager fp32: max |d| <= tol * max |ref|
TOL_BF16 = 2e-2  # bf16 vs eager fp32
TOL_TRAIN = 1e-3  # one fp32 training step: output, input and parameter gradients, running stats


class Part:
    """Appends records to DIR/<name>.jsonl (flushed), prints a line per record, keeps the deadline."""

    def __init__(self, name, out, deadline=None, resume=False, device="cuda"):
        self.name, self.device = name, device
        self.deadline = deadline
        os.makedirs(out, exist_ok=True)
        self.path = os.path.join(out, f"{name}.jsonl")
        self.done = set()
        if resume and os.path.exists(self.path):
            with open(self.path) as f:
                for line in f:
                    try:
                        self.done.add(json.loads(line)["case"])
                    except (ValueError, KeyError):
                        pass  # a line cut off by a kill
        self.file = open(self.path, "a")
        self.failures = 0

    def record(self, case, status="ok", **fields):
        rec = dict(part=self.name, case=case, status=status, **fields, t=round(time.time(), 1))
        self.file.write(json.dumps(rec, default=_jsonable) + "\n")
        self.file.flush()
        self.failures += status in ("FAIL", "error")
        shown = {k: v for k, v in rec.items() if k not in ("part", "case", "status", "t", "traceback")}
        print(f"[{self.name}] {case}: {status} {json.dumps(shown, default=_jsonable)}", flush=True)
        return rec

    def skip_reason(self, case, reserve_s=0.0):
        """Why `case` is not run now (already done, or the deadline is near), else None."""
        if case in self.done:
            return "done"
        if self.deadline is not None and time.time() + reserve_s > self.deadline:
            self.record(case, "skipped", reason="deadline")
            return "deadline"
        return None

    def compile_time(self, case, seconds):
        """The first call of a case: compilation and autotuning, on its own line."""
        print(f"compile+autotune: {seconds:.1f} s ({self.name} {case})", flush=True)

    @contextlib.contextmanager
    def guard(self, case, **fields):
        """Record an exception inside as an error; a CUDA error ends the process (it is poisoned)."""
        try:
            yield
        except Exception as e:  # noqa: BLE001 - every failure is recorded and the run goes on
            self.record(case, "error", error=f"{type(e).__name__}: {str(e)[:500]}",
                        traceback=traceback.format_exc()[-2000:], **fields)
            if _is_cuda_error(e):
                print(f"[{self.name}] CUDA error: this process stops (gpu_run.sh resumes the part)", flush=True)
                sys.exit(EXIT_CUDA_ERROR)


def _is_cuda_error(e):
    text = f"{type(e).__name__} {e}"
    return any(s in text for s in ("CUDA error", "illegal memory access", "AcceleratorError",
                                   "device-side assert", "unspecified launch failure", "CUDA driver error"))


def _jsonable(v):
    return str(v)


# ---------------------------------------------------------------------------------------------
# Models


def smoke_models(name, device, dtype=None):
    """(reference, fused) for one smoke block, same random weights, eval mode, on `device`."""
    import importlib

    import torch

    import fused_inception as fi
    from fused_inception.models.inception_resnet_v2 import Block35
    from fused_inception.report import informative_init_

    _, cls, args, _ = next(b for b in SMOKE_BLOCKS if b[0] == name)
    torch.manual_seed(0)
    if cls == "Block35":
        ref = informative_init_(Block35(lambda n: n, scale=0.17), 0)
        fused, _ = fi.fuse(copy.deepcopy(ref))
    else:
        module = "googlenet" if cls == "Inception" else "inception"  # torchvision.models.googlenet is a function
        tv_cls = getattr(importlib.import_module(f"torchvision.models.{module}"), cls)
        ref = informative_init_(tv_cls(*args), 0)
        fused = getattr(fi, "Fused" + cls)(*args)
        fused.load_state_dict(ref.state_dict())
    convert = dict(device=device, memory_format=torch.channels_last)
    if dtype is not None:
        convert["dtype"] = dtype
    return ref.eval().to(**convert), fused.eval().to(**convert)


def smoke_input(name, device, dtype, tiny=None):
    """The smoke's input for block `name`: real maps and batch 2 on a GPU; tiny (7x7, batch 1) on
    CPU, where the interpreter runs the kernels (`tiny` overrides)."""
    import torch

    _, _, args, size = next(b for b in SMOKE_BLOCKS if b[0] == name)
    cin = 320 if name == "irv2-block35" else args[0]
    tiny = device == "cpu" if tiny is None else tiny
    size = size if not tiny else 7
    batch = SMOKE_BATCH if not tiny else 1
    g = torch.Generator().manual_seed(1)
    return torch.randn(batch, cin, size, size, generator=g).to(device=device, dtype=dtype,
                                                              memory_format=torch.channels_last)


def network_models(network, device, dtype):
    """(reference torchvision model, fused model) with one random state_dict, eval, channels_last."""
    import torch
    import torchvision

    from fused_inception import models
    from fused_inception.report import informative_init_

    torch.manual_seed(0)
    ref = getattr(torchvision.models, network)(weights=None, aux_logits=False, init_weights=True)
    ref = informative_init_(ref, 0)
    fused = getattr(models, network)(aux_logits=False)
    fused.load_state_dict(ref.state_dict())
    convert = dict(device=device, dtype=dtype, memory_format=torch.channels_last)
    return ref.eval().to(**convert), fused.eval().to(**convert)


def network_input(network, batch, device, dtype):
    import torch

    size = (NETWORKS if device != "cpu" else CPU_NETWORKS)[network]
    g = torch.Generator().manual_seed(1)
    return torch.randn(batch, 3, size, size, generator=g).to(device=device, dtype=dtype,
                                                             memory_format=torch.channels_last)


# ---------------------------------------------------------------------------------------------
# Helpers


def rel_err(y, ref):
    """(max |y - ref| / max |ref|, NaN count of y): the check every case makes."""
    y, ref = y.detach().float(), ref.detach().float()
    scale = ref.abs().max().item()
    nans = int(y.isnan().sum().item())
    err = (y - ref).abs().nan_to_num(float("inf")).max().item() / max(scale, 1e-30)
    return err, nans


def conv_module():
    from fused_inception.kernels import conv as kconv

    return kconv


@contextlib.contextmanager
def pinned(index):
    """Every stage launch uses config `index` (kernels.conv.pin_config), if the library has it."""
    pin = getattr(conv_module(), "pin_config", None)
    if pin is None or index is None:
        yield False
        return
    pin(index)
    try:
        yield True
    finally:
        pin(None)


def sync(device):
    import torch

    if device == "cuda":
        torch.cuda.synchronize()


def first_call(fn, device):
    """(result, seconds) of the first call: compilation, autotuning, plan building."""
    start = time.perf_counter()
    y = fn()
    sync(device)
    return y, time.perf_counter() - start


def bench_ms(fn, device):
    """Median milliseconds of fn(): do_bench on a GPU (warm-up, L2 flush, CUDA events); a few
    host-timed calls in the interpreter (meaningless, for the CPU tests)."""
    if device == "cuda":
        import triton.testing

        return triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median")
    times = []
    for _ in range(1):
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1e3)
    return sorted(times)[len(times) // 2]


def fast_autotune():
    """Autotuning times each config with do_bench(warmup=5 ms, rep=25 ms) instead of Triton's
    default (25, 100): ~0.04 s a config instead of ~0.15, for ~140 tuning keys x 6 configs in the
    quick run. Still hundreds of repetitions of a kernel that takes microseconds. Triton's own
    class is patched in this process only; the library is unchanged."""
    import functools

    import triton.testing
    from triton.runtime.autotuner import Autotuner

    if not hasattr(Autotuner, "_do_bench") and "do_bench" not in vars(Autotuner):
        return False
    fast = functools.partial(triton.testing.do_bench, warmup=5, rep=25)
    Autotuner.do_bench = property(lambda self: self._do_bench if getattr(self, "_do_bench", None) else fast)
    return True


def tf32(enabled):
    import torch

    torch.backends.cudnn.allow_tf32 = enabled
    torch.backends.cuda.matmul.allow_tf32 = enabled


# ---------------------------------------------------------------------------------------------
# smoke


def run_smoke(part, blocks, device, configs):
    import torch

    kconv = conv_module()
    n_configs = len(getattr(kconv, "CONFIGS", [])) or 1
    if getattr(kconv, "pin_config", None) is None:
        if "pin_config" not in part.done:
            part.record("pin_config", "skipped", reason="pin_config unavailable: each block's NaN check runs once, "
                                                        "autotuned")
        config_list = [None]
    else:
        config_list = list(range(n_configs)) if configs == "all" else [int(c) for c in configs.split(",")]
    # fp32 (numerics without TF32) and the training step run under one pinned config, the smallest
    # (every stage takes it): which tiles a config covers doesn't depend on the dtype, and the bf16
    # NaN checks below run every config; this halves what the smoke compiles.
    one = n_configs - 1 if config_list != [None] else None
    for name in blocks:
        tf32(False)
        ref = fused = None
        case = f"{name} eval-fp32"
        if not part.skip_reason(case, 10):
            with part.guard(case, block=name, check="eval-fp32"), pinned(one):
                ref, fused = smoke_models(name, device, torch.float32)
                x = smoke_input(name, device, torch.float32)
                with torch.no_grad():
                    expected = ref(x)
                    y, seconds = first_call(lambda: fused(x), device)
                err, nans = rel_err(y, expected)
                part.compile_time(case, seconds)
                part.record(case, "ok" if err <= TOL_FP32 and not nans else "FAIL", block=name, check="eval-fp32",
                            dtype="fp32", err=err, nans=nans, tol=TOL_FP32, first_call_s=seconds)
        case = f"{name} eval-bf16"
        if not part.skip_reason(case, 10):
            with part.guard(case, block=name, check="eval-bf16"):
                ref, fused = smoke_models(name, device, torch.float32)
                x = smoke_input(name, device, torch.float32)
                ref16, fused16 = copy.deepcopy(ref).to(torch.bfloat16), copy.deepcopy(fused).to(torch.bfloat16)
                x16 = x.to(torch.bfloat16)
                with torch.no_grad():
                    expected = ref(x)
                    eager_err, _ = rel_err(ref16(x16), expected)
                    y, seconds = first_call(lambda: fused16(x16), device)
                err, nans = rel_err(y, expected)
                tol = max(TOL_BF16, 2 * eager_err)  # or no worse than twice eager's own bf16 error
                part.compile_time(case, seconds)
                part.record(case, "ok" if err <= tol and not nans else "FAIL", block=name, check="eval-bf16",
                            dtype="bf16", err=err, eager_bf16_err=eager_err, nans=nans, tol=tol, first_call_s=seconds)
        for config in config_list:  # (bf16: see `one` above)
            case = f"{name} nan-bf16 config {config if config is not None else 'autotuned'}"
            if part.skip_reason(case, 5):
                continue
            with part.guard(case, block=name, check="nan-bf16", config=config):
                err, nans, seconds, eager_err = nan_check(name, device, torch.bfloat16, config)
                limit = max(TOL_BF16, 2 * eager_err)
                part.record(case, "ok" if err <= limit and not nans else "FAIL", block=name, check="nan-bf16",
                            dtype="bf16", config=config, config_desc=_config_desc(config), err=err, nans=nans,
                            tol=limit, eager_err=eager_err, first_call_s=seconds)
        case = f"{name} train-fp32"
        if not part.skip_reason(case, 15):
            with part.guard(case, block=name, check="train-fp32"), pinned(one):
                errs, seconds = train_check(name, device)
                worst = max(errs.values())
                part.compile_time(case, seconds)
                part.record(case, "ok" if worst <= TOL_TRAIN else "FAIL", block=name, check="train-fp32", dtype="fp32",
                            err=worst, errs=errs, tol=TOL_TRAIN, first_call_s=seconds)


def _config_desc(config):
    if config is None:
        return "autotuned"
    c = conv_module().CONFIGS[config]
    return f"{c.kwargs} warps {c.num_warps} stages {c.num_stages}"


def nan_check(name, device, dtype, config):
    """Run the block stage by stage into NaN-filled buffers (with config `config` pinned) and
    compare with eager fp32: (rel err, NaNs left, seconds of the first run, eager's own error in
    `dtype`)."""
    import torch

    ref, fused = smoke_models(name, device, torch.float32)
    x = smoke_input(name, device, torch.float32)
    with torch.no_grad():
        expected = ref(x)
        fused = fused.to(dtype)
        xd = x.to(dtype)
        eager_err = rel_err(copy.deepcopy(ref).to(dtype)(xd), expected)[0] if dtype != torch.float32 else 0.0
        plan = fused.plan(dtype)
        out, mid = plan.layout.buffers(xd, dtype, torch.channels_last)
        out.fill_(float("nan"))
        mid.fill_(float("nan"))
        with pinned(config):
            start = time.perf_counter()
            for stage in plan.stages:
                stage.run(xd, out, mid)
            sync(device)
            seconds = time.perf_counter() - start
    err, nans = rel_err(out, expected)
    return err, nans, seconds, eager_err


def train_check(name, device):
    """One fp32 training step (forward + backward with a random output gradient) of the fused
    block against the eager block from the same weights: relative errors of output, input
    gradient, parameter gradients (worst) and running statistics (worst), and the fused step's seconds."""
    import torch

    ref, fused = smoke_models(name, device, torch.float32)
    ref.train()
    fused.train()
    x = smoke_input(name, device, torch.float32)
    if device == "cpu":
        x = x[:, :, :5, :5].contiguous(memory_format=torch.channels_last)  # the interpreter: keep it small
        x = torch.cat([x, x.flip(0) + 0.5])  # batch statistics need more than one value per channel
    xr, xf = x.clone().requires_grad_(), x.clone().requires_grad_()
    yr = ref(xr)
    g = torch.randn(yr.shape, generator=torch.Generator().manual_seed(2)).to(device=device).contiguous(
        memory_format=torch.channels_last)
    yr.backward(g)
    start = time.perf_counter()
    yf = fused(xf)
    yf.backward(g)
    sync(device)
    seconds = time.perf_counter() - start
    errs = {"out": rel_err(yf, yr)[0], "grad_x": rel_err(xf.grad, xr.grad)[0]}
    params_r, params_f = dict(ref.named_parameters()), dict(fused.named_parameters())
    errs["grad_params"] = max(rel_err(params_f[k].grad, p.grad)[0] for k, p in params_r.items() if p.grad is not None)
    bufs_r, bufs_f = dict(ref.named_buffers()), dict(fused.named_buffers())
    errs["running_stats"] = max((rel_err(bufs_f[k], b)[0] for k, b in bufs_r.items()
                                 if k.endswith(("running_mean", "running_var"))), default=0.0)
    return errs, seconds


# ---------------------------------------------------------------------------------------------
# networks


def counted_run(run, impl, device):
    """(output, launches, how counted, host ms) of one forward: Triton launches + torch kernels
    (eager, fused); the CUDA profiler's kernel count where those can't see (torch.compile, CUDA
    graph replays)."""
    import torch

    from fused_inception import count_launches
    from fused_inception.launches import count_torch_kernels

    start = time.perf_counter()
    if impl in ("eager", "fused"):
        with torch.no_grad(), count_launches() as n, count_torch_kernels() as k:
            y = run()
        return y, n.value + k.value, "counted", (time.perf_counter() - start) * 1e3
    if device != "cuda":
        with torch.no_grad():
            y = run()
        return y, None, None, (time.perf_counter() - start) * 1e3
    from torch.profiler import ProfilerActivity, profile

    with torch.no_grad(), profile(activities=[ProfilerActivity.CUDA]) as prof:
        y = run()
        torch.cuda.synchronize()
    kernels = sum(1 for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA)
    return y, kernels, "profiler", (time.perf_counter() - start) * 1e3


def prepare(model, x, device, graph=False):
    """A zero-argument forward of `model` (warmed up) and its first call's seconds (plans,
    compilation, autotuning; with `graph`, the CUDA graph capture too): replays of that graph."""
    import torch

    from fused_inception import build_plans

    build_plans(model)
    with torch.no_grad():
        _, seconds = first_call(lambda: model(x), device)
        for _ in range(2 if device == "cuda" else 0):
            model(x)
        sync(device)
    if not graph:
        return (lambda: model(x)), seconds
    start = time.perf_counter()
    g = torch.cuda.CUDAGraph()
    with torch.no_grad(), torch.cuda.graph(g):
        static_y = model(x)
    g.replay()
    torch.cuda.synchronize()
    seconds += time.perf_counter() - start

    def replay():
        g.replay()
        return static_y

    return replay, seconds


def run_networks(part, network, batches, impls, device, dtype_name):
    """Every (batch, impl): first call (compile, autotune) apart, check against eager, launches,
    median time. The cheap implementations run first for every batch, torch.compile last (a
    compile takes a minute or more): a run short of time loses those first."""
    import torch

    dtype = {"bf16": torch.bfloat16, "fp32": torch.float32, "fp16": torch.float16}[dtype_name]
    if device == "cuda":
        torch.backends.cudnn.benchmark = True  # eager as a user would tune it
    ref, fused = network_models(network, device, dtype)
    ref32 = copy.deepcopy(ref).float() if dtype != torch.float32 else ref  # the yardstick for both
    compiled = {}
    order = [(b, i) for i in impls if not i.startswith("compile") for b in batches]
    # torch.compile: the largest batch first with the batch dimension marked dynamic, so that one
    # compilation serves every batch > 1 (batch 1 is specialised by Dynamo and compiles again).
    order += [(b, i) for i in impls if i.startswith("compile") for b in sorted(batches, reverse=True)]
    for batch, impl in order:
        if impl == "fused-cudagraph" and device != "cuda":
            continue
        case = f"{network} b{batch} {dtype_name} {impl}"
        # Start a torch.compile compilation only with the time it takes (batch 1 compiles again).
        compiling = impl.startswith("compile") and (impl not in compiled or batch == 1)
        if part.skip_reason(case, (90 if impl not in compiled else 60) if compiling else 15):
            continue
        x = network_input(network, batch, device, dtype)
        info = dict(network=network, batch=batch, dtype=dtype_name, impl=impl, layout="channels_last",
                    input=list(x.shape))
        with part.guard(case, **info):
            with torch.no_grad():
                expected = ref32(x.float())
                eager_err, _ = rel_err(ref(x), expected)
            if impl.startswith("compile"):
                if impl not in compiled:
                    compiled[impl] = torch.compile(ref, mode=impl[len("compile-"):])
                    if batch > 1:
                        torch._dynamo.mark_dynamic(x, 0)
                    info["dynamic_batch"] = batch > 1
                run, seconds = prepare(compiled[impl], x, device)
            else:
                run, seconds = prepare(ref if impl == "eager" else fused, x, device, graph=impl == "fused-cudagraph")
            part.compile_time(case, seconds)
            y, launches, how, host_ms = counted_run(run, impl, device)
            # Against the fp32 model: fine if within TOL_BF16, or no worse than twice eager's own error
            # in this dtype (rounding compounds over a whole network).
            err, nans = rel_err(y, expected)
            tol = TOL_BF16 if dtype == torch.float32 else max(TOL_BF16, 2 * eager_err)
            ok = err <= tol and not nans
            with torch.no_grad():
                ms = bench_ms(run, device) if device == "cuda" else host_ms  # the interpreter: one call is plenty
                graph_ms = None
                if device == "cuda" and batch == 1 and impl in ("eager", "fused", "compile-default"):
                    try:
                        import triton.testing

                        graph_ms = triton.testing.do_bench_cudagraph(run, rep=100, return_mode="median")
                    except Exception as e:  # noqa: BLE001 - not every path captures
                        info["cudagraph_error"] = f"{type(e).__name__}: {str(e)[:200]}"
            part.record(case, "ok" if ok else "FAIL", **info, ms=ms, cudagraph_ms=graph_ms, launches=launches,
                        launches_by=how, err=err, eager_err=eager_err, nans=nans, tol=tol, first_call_s=seconds)
            del run, y, expected


# ---------------------------------------------------------------------------------------------
# stages


def stage_work(problems, batch, sizes, elem):
    """(FLOPs, bytes) of one stage: 2*M*ncols*K per GEMM (M = output pixels), each source slice
    read once, weights read once, each result written once (report.traffic's fused model)."""
    flops = nbytes = 0
    for p in problems:
        row = p.row
        oh, ow = sizes[row["dst0"]]
        ih, iw = sizes[row["src"]]
        m = batch * oh * ow
        if p.gemm:
            flops += 2 * m * p.ncols * p.k
            nbytes += p.k * p.ncols * elem
        nbytes += (batch * row["cin"] * ih * iw + m * p.ncols) * elem
    return flops, nbytes


def run_stages(part, batch, size, device, only=None):
    import torch

    from fused_inception.kernels import conv as kconv
    from fused_inception.report import fused_blocks

    dtype = torch.bfloat16
    ref, fused = network_models("googlenet", device, dtype)
    x = torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(1)).to(
        device=device, dtype=dtype, memory_format=torch.channels_last)
    inputs = {}
    blocks = [(n, b) for n, b in fused_blocks(fused) if only is None or n in only]
    # Each block's input, from the eager model (same names; cheap in the interpreter too).
    hooks = [ref.get_submodule(name).register_forward_pre_hook(
        lambda m, a, name=name: inputs.__setitem__(name, a[0])) for name, _ in blocks]
    with torch.no_grad():
        ref(x)
    for h in hooks:
        h.remove()
    del ref
    if device == "cuda":  # warm-up: plans, compilation and autotuning of every stage, apart from the timings
        with torch.no_grad():
            _, seconds = first_call(lambda: fused(x), device)
        part.compile_time(f"googlenet b{batch} forward", seconds)
    total_ms = 0.0
    rows = []
    for name, block in blocks:
        xin = inputs[name]
        plan = block.plan(dtype)
        out, mid = plan.layout.buffers(xin, dtype, torch.channels_last)
        (oh, ow), (mh, mw) = plan.sizes(xin.shape[2], xin.shape[3])
        sizes = {kconv.BUF_X: tuple(xin.shape[2:]), kconv.BUF_OUT: (oh, ow), kconv.BUF_MID: (mh, mw)}
        with torch.no_grad():  # once in order, so that a later stage reads real intermediate results
            for stage in plan.stages:
                stage.run(xin, out, mid)
        for i, (stage, problems) in enumerate(zip(plan.stages, plan.layout.stages)):
            case = f"{name} stage {i + 1}"
            if part.skip_reason(case, 3):
                continue
            with part.guard(case, block=name, stage=i + 1):
                with torch.no_grad():
                    ms = bench_ms(lambda: stage.run(xin, out, mid), device)
                flops, nbytes = stage_work(problems, batch, sizes, xin.element_size())
                floor_ms = max(flops / (PEAK_TFLOPS * 1e12), nbytes / (PEAK_GBS * 1e9)) * 1e3
                desc = [f"{p.row['kh']}x{p.row['kw']}{'/s2' if p.row['sh'] == 2 else ''}"
                        f"{' pool' if p.row['pool'] else ''} {p.row['cin']}->{p.ncols}" if p.gemm
                        else f"pool {p.row['pkh']}x{p.row['pkw']} {p.ncols}" for p in problems]
                rec = part.record(case, block=name, stage=i + 1, batch=batch, dtype="bf16", problems=desc, ms=ms,
                                  gflop=flops / 1e9, mb=nbytes / 1e6, tflops=flops / ms / 1e9,
                                  gbs=nbytes / ms / 1e6, floor_ms=floor_ms, of_floor=floor_ms / ms)
                total_ms += ms
                rows.append(rec)
    print(f"\nper-stage profile, fused GoogLeNet {batch}x3x{size}x{size} bf16 channels_last "
          f"(floor: max(FLOPs / {PEAK_TFLOPS:.0f} TFLOP/s, bytes / {PEAK_GBS:.0f} GB/s))")
    print(f"{'block':14s} {'st':>2s} {'ms':>8s} {'TFLOP/s':>8s} {'GB/s':>7s} {'floor ms':>9s} {'of floor':>8s}  problems")
    for r in rows:
        print(f"{r['block']:14s} {r['stage']:2d} {r['ms']:8.3f} {r['tflops']:8.1f} {r['gbs']:7.0f} "
              f"{r['floor_ms']:9.3f} {r['of_floor']:8.1%}  {'; '.join(r['problems'])}")
    print(f"sum of stages: {total_ms:.3f} ms", flush=True)


# ---------------------------------------------------------------------------------------------
# What each part launches, for bench/kernel_census.py (meta tensors: shapes only)


def workloads(part, device="meta"):
    """(description, zero-argument callable) pairs making the fused launches of `part`."""
    import torch

    if part == "smoke":
        one = len(conv_module().CONFIGS) - 1  # fp32 and training run pinned to it (see run_smoke)
        for name, *_ in SMOKE_BLOCKS:
            for dtype in (torch.float32, torch.bfloat16):
                def fwd(name=name, dtype=dtype):
                    tf32(False)  # as the smoke runs: fp32 without TF32 (another specialisation)
                    _, fused = smoke_models(name, "cpu", dtype)
                    with pinned(one if dtype == torch.float32 else None):
                        fused.to(device)(smoke_input(name, "cpu", dtype, tiny=False).to(device))
                yield f"{name} eval {dtype}", fwd

            def train(name=name):
                tf32(False)
                _, fused = smoke_models(name, "cpu", torch.float32)
                fused = fused.to(device).train()
                x = smoke_input(name, "cpu", torch.float32, tiny=False).to(device).requires_grad_()
                with pinned(one):
                    fused(x).sum().backward()
            yield f"train {name}", train
    elif part == "networks":
        for network in NETWORKS:
            _, fused = network_models(network, "cpu", torch.bfloat16)
            fused = fused.to(device)
            for batch in (1, 32, 256):
                size = NETWORKS[network]
                yield f"{network} b{batch}", (lambda f=fused, b=batch, s=size: f(
                    torch.empty(b, 3, s, s, device=device, dtype=torch.bfloat16,
                                memory_format=torch.channels_last)))
    elif part == "stages":
        _, fused = network_models("googlenet", "cpu", torch.bfloat16)
        fused = fused.to(device)
        yield "googlenet b256", lambda: fused(torch.empty(256, 3, 224, 224, device=device, dtype=torch.bfloat16,
                                                          memory_format=torch.channels_last))


# ---------------------------------------------------------------------------------------------


def parser():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("part", choices=PARTS)
    p.add_argument("--out", required=True, help="folder for <part>.jsonl")
    p.add_argument("--device", choices=["cuda", "cpu"], default="cuda",
                   help="cpu: Triton's interpreter at tiny shapes (tests; times mean nothing)")
    p.add_argument("--deadline", type=float, default=float(os.environ.get("PART_DEADLINE", 0)) or None,
                   help="Unix time: skip what cannot start before it (default: $PART_DEADLINE, set by gpu_run.sh)")
    p.add_argument("--resume", action="store_true", help="skip cases already recorded in <part>.jsonl")
    p.add_argument("--blocks", default=",".join(b[0] for b in SMOKE_BLOCKS), help="smoke: which blocks")
    p.add_argument("--configs", default="all", help="smoke: config indices for the NaN check, or 'all'")
    p.add_argument("--network", choices=sorted(NETWORKS), default="googlenet", help="networks: which")
    p.add_argument("--batches", default=None, help="networks: comma-separated (GPU default 1,32,256; CPU 1)")
    p.add_argument("--impls", default=None, help=f"networks: comma-separated of {IMPLS}")
    p.add_argument("--dtype", default="bf16", choices=["bf16", "fp16", "fp32"], help="networks: dtype")
    p.add_argument("--batch", type=int, default=None, help="stages: batch (GPU default 256, CPU 1)")
    p.add_argument("--size", type=int, default=None, help="stages: input size (GPU default 224, CPU 32)")
    p.add_argument("--stage-blocks", default=None, help="stages: only these blocks (comma-separated, e.g. inception3a)")
    return p


def main(argv=None):
    args = parser().parse_args(argv)
    if args.device == "cpu":
        os.environ["TRITON_INTERPRET"] = "1"  # before fused_inception decorates its kernels
    else:
        os.environ.setdefault("TRITON_INTERPRET", "0")
    start = time.time()
    part = Part(args.part, args.out, args.deadline, args.resume, args.device)
    import torch

    if args.device == "cuda" and not torch.cuda.is_available():
        part.record("device", "error", error="no CUDA device visible to torch")
        return 1
    cpu = args.device == "cpu"
    if not cpu and os.environ.get("QUICK_FAST_AUTOTUNE", "1") == "1":
        print(f"[{args.part}] autotuning with do_bench(warmup=5, rep=25): {fast_autotune()}", flush=True)
    with part.guard("part", what=args.part):
        if args.part == "smoke":
            run_smoke(part, args.blocks.split(","), args.device, args.configs)
        elif args.part == "networks":
            batches = [int(b) for b in (args.batches or ("1" if cpu else "1,32,256")).split(",")]
            impls = (args.impls or ",".join(CPU_IMPLS if cpu else IMPLS)).split(",")
            run_networks(part, args.network, batches, impls, args.device, args.dtype)
        else:
            run_stages(part, args.batch or (1 if cpu else 256), args.size or (32 if cpu else 224), args.device,
                       args.stage_blocks.split(",") if args.stage_blocks else None)
    print(f"[{args.part}] finished in {time.time() - start:.1f} s, {part.failures} failure(s)", flush=True)
    return 1 if part.failures else 0


if __name__ == "__main__":
    sys.exit(main())
