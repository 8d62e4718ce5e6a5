"""What a fused model's kernels compile to on Hopper (sm_90), without a GPU.

Triton compiles for sm_90 on any machine, with the ptxas in its wheel. This module runs a
forward of a fused model (and in train() its backward) with kernel launches *recorded* instead
of run (`fused_inception.kernels.conv.recording`), compiles every distinct kernel variant under
every autotune config with the specialisation Triton's JIT would give those arguments (pointers
16-byte aligned; the kernels' integer arguments are not specialised), and reads the result:

    wgmma / mma.sync      tensor-core instructions (wgmma: Hopper's warp-group MMA)
    cp.async (bytes)      asynchronous global->shared copies and their widths (16 = 128-bit)
    tma                   bulk tensor copies
    ld.global v4/v2/1     register loads by vector width
    pipelined loops       K loops (loops around an MMA) whose copies are asynchronous with at
                          least one more stage in flight (an async wait leaving copies pending)
    regs, spills          from ptxas -v
    shared                bytes of shared memory per program

    python -m fused_inception.codegen --model googlenet --dtype bf16 --batch 32 [--train]

prints a row per kernel and config, the number of distinct kernels and the compile time;
with --work, each stage launch's programs, K iterations and MACs (fused_inception.work), then
each compiled kernel's K loops read from its SASS (fused_inception.sass: instructions per wgmma,
async copies, synchronous loads, full waits, barriers; registers and programs per SM);
`check_marks` says which kernel misses which mark (see `MARKS`). Run with TRITON_INTERPRET unset
(the CLI restarts itself without it).

Example:
    >>> from fused_inception.codegen import compile_kernels, kernel_stats
    >>> for label, kernel in compile_kernels(model, x):   # model fused, x on the CPU
    ...     print(label, kernel_stats(kernel))
"""

import argparse
import collections
import copy
import os
import re
import subprocess
import sys
import tempfile
import time

import torch

from fused_inception import sass
from fused_inception.kernels import conv as kconv

HOPPER = (90, 32)  # (compute capability, warp size)
MAX_SHARED = 232448  # bytes of shared memory a Hopper program may use (227 KB)

MARKS = """\
stage kernels (convolutions): wgmma (16-bit operands or TF32); every K loop of a convolution
  software-pipelined (async copies, >= 2 stages in flight); every async copy 16 bytes (a padded
  stem's input taps: kernels.conv.TAP_CHANNELS channels, 8 bytes in a 16-bit dtype); 0 bytes
  spilled; shared memory <= 227 KB. A pool branch's pool runs alone in the stage before its 1x1
  (layout._pool_first), so its 1x1 is a plain GEMM; a 1x1 of a strided pool (no network here has
  one) builds its A tile from the window's shifted loads in registers: that loop is not
  pipelined by design, its loads must be 16 bytes wide where the channels allow (align 8).
  Problems whose channels are not multiples of 8 (other than a padded stem): 0 bytes spilled.
Split K's reduction launch (KIND_REDUCE): 0 bytes spilled; 16-byte loads of the partial sums
  where the columns allow (align 8).
BatchNorm kernels: 0 bytes spilled; 16-byte loads where the channels allow."""

_TRITON_DTYPES = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16", torch.float64: "fp64",
                  torch.int32: "i32", torch.int64: "i64"}


def _signature(kernel, args, consts):
    """(signature, constexprs, attrs) as Triton's JIT specialises these arguments: pointers
    16-byte aligned (data_ptr % 16, taken as true for tensors that were never allocated, e.g.
    recorded outputs), integers as i32/i64 (the kernels mark them do_not_specialize)."""
    names = kernel.arg_names
    runtime = [n for n in names if n not in consts]
    if len(runtime) != len(args):
        raise ValueError(f"{kernel.__name__}: {len(args)} arguments for {len(runtime)} runtime parameters")
    values = dict(zip(runtime, args), **consts)
    signature, constexprs, attrs = {}, {}, {}
    for i, name in enumerate(names):
        v = values[name]
        if name in consts:
            signature[name] = "constexpr"
            constexprs[(i,)] = v
        elif isinstance(v, torch.Tensor):
            signature[name] = "*" + _TRITON_DTYPES[v.dtype]
            if v.data_ptr() % 16 == 0:
                attrs[(i,)] = [["tt.divisibility", 16]]
        else:
            signature[name] = "i32" if -2**31 <= int(v) < 2**31 else "i64"
    return signature, constexprs, attrs


def _problem_name(f):
    """A stage problem (its SPEC fields) in a label: "3x3", "7x7/s2 taps", "pool+1x1", "pool";
    a convolution kind other than KIND_GEMM by its KIND_ name in kernels/conv.py ("flat")."""
    if f["kind"] == kconv.KIND_POOLED_GEMM:
        return "pool+1x1"
    if f["kind"] == kconv.KIND_POOL:
        return "pool"
    name = f"{f['kh']}x{f['kw']}" + (f"/s{f['sh']}" if max(f["sh"], f["sw"]) > 1 else "")
    if f["kind"] != kconv.KIND_GEMM:
        kinds = {v: k for k, v in vars(kconv).items() if k.startswith("KIND_")}
        name += " " + kinds.get(f["kind"], f"KIND_{f['kind']}").removeprefix("KIND_").removeprefix("GEMM_").lower()
    return name


def _label(kernel, consts, config):
    """A short name: the kernel, its problems (stage kernel) or parts (BatchNorm), the config."""
    name = kernel.__name__.lstrip("_").replace("_kernel", "")
    if "SPEC" in consts:
        problems = []
        for spec in consts["SPEC"]:
            f = dict(zip(kconv.SPEC_FIELDS, spec))
            tile = f"/n{f['tn']}" if f["tn"] < 128 and f["kind"] != kconv.KIND_POOL else ""  # (its own N tile)
            tile += f"/k{f['ks']}" if f["ks"] > 1 else ""  # (split K: its slices)
            tile += f"/c{f['tk']}" if f["tk"] else ""  # (its K chunk cap)
            problems.append(f"{_problem_name(f)}@{f['align']}{tile}")
        name += "[" + ",".join(problems) + "]" + (" train" if consts.get("TRAIN") else "")
    elif "PARTS" in consts:
        name += f"[{len(consts['PARTS'])} parts]"
        for flag in ("RECOMPUTE", "REDUCE"):
            if consts.get(flag):
                name += " " + flag.lower()
    blocks = "x".join(str(config.kwargs[k]) for k in ("BLOCK_M", "BLOCK_N", "BLOCK_K") if k in config.kwargs)
    return f"{name} {blocks} w{config.num_warps} s{config.num_stages}".replace("  ", " ")


def _dtype_name(consts, args):
    for a in args:
        if isinstance(a, torch.Tensor) and a.is_floating_point() and a.dim() == 4:
            return _TRITON_DTYPES[a.dtype]
    return "?"


def record_launches(model, x):
    """The launches a forward of `model` on `x` makes (and, in train(), its backward): a list of
    (kernel, args, constexprs, configs). `model` and `x` are deep-copied to the CPU first (no
    kernel runs; other ops do, on the CPU)."""
    model = copy.deepcopy(model).cpu()
    x = x.detach().cpu()
    with kconv.recording() as launches:
        if model.training:
            x = x.requires_grad_(x.is_floating_point())
            out = model(x)
            out = out[0] if isinstance(out, tuple) else out
            out.float().sum().backward()
        else:
            with torch.no_grad():
                model(x)
    return launches


def _jit_compile_args(kernel, args, kwargs, target):
    """(signature, constexprs, attrs, options) exactly as Triton's JIT would compile this launch
    for `target`: its own argument binder and packing (private Triton API, present in 3.6 to
    3.8), so the compiled kernel lands under the cache key the JIT on a GPU looks up. None
    where this Triton lacks them."""
    try:
        from triton import knobs
        from triton.backends.compiler import GPUTarget
        from triton.compiler.compiler import make_backend
        from triton.runtime.jit import create_function_from_signature
    except ImportError:
        return None
    if not hasattr(kernel, "_pack_args"):
        return None
    backend = make_backend(GPUTarget("cuda", *target))
    kwargs = dict(kwargs, debug=kwargs.get("debug", kernel.debug) or knobs.runtime.debug,
                  instrumentation_mode=knobs.compilation.instrumentation_mode)
    binder = create_function_from_signature(kernel.signature, kernel.params, backend)
    bound_args, specialization, options = binder(*args, **kwargs)
    options, signature, constexprs, attrs = kernel._pack_args(backend, kwargs, bound_args, specialization, options)
    return signature, constexprs, attrs, options.__dict__


def jobs_of(launches, target=HOPPER):
    """The distinct compilations of recorded launches: (label, kernel, signature, constexprs,
    attrs, options, metadata); metadata: the launch's constexprs, its dtype name and the
    triton.Config."""
    seen, jobs = set(), []
    for kernel, args, consts, configs in launches:
        for config in configs:
            kwargs = dict(consts, **config.all_kwargs())
            packed = _jit_compile_args(kernel, args, kwargs, target)
            if packed is None:  # (another Triton: the same specialisation, by hand)
                signature, constexprs, attrs = _signature(kernel, args, dict(consts, **config.kwargs))
                options = {"num_warps": config.num_warps, "num_stages": config.num_stages}
                if config.maxnreg is not None:
                    options["maxnreg"] = config.maxnreg
                packed = (signature, constexprs, attrs, options)
            signature, constexprs, attrs, options = packed
            dtype = _dtype_name(consts, args)
            job = (f"{_label(kernel, consts, config)} {dtype}", kernel, signature, constexprs, attrs, options,
                   dict(consts, dtype=dtype, config=config))
            key = job_key(job)
            if key in seen:
                continue
            seen.add(key)
            jobs.append(job)
    return jobs


def job_key(job):
    """What makes a job (from _jobs) a distinct compilation: kernel and specialisation."""
    _, kernel, signature, constexprs, attrs, options, _ = job
    return (kernel.__name__, repr(sorted(signature.items())), repr(sorted(constexprs.items())),
            repr(sorted(attrs.items())), repr(sorted(options.items())))


def worker_spec(job, target=HOPPER):
    """A job as _compile_in_worker takes it in another process (the kernel by module and name)."""
    _, kernel, signature, constexprs, attrs, options, _ = job
    return (kernel.__module__, kernel.__name__, signature, constexprs, attrs, options, target)


def _compile(kernel, signature, constexprs, attrs, options, target=HOPPER):
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    src = ASTSource(kernel, signature, constexprs=constexprs, attrs=attrs)
    return triton.compile(src, target=GPUTarget("cuda", *target), options=options)


def _compile_in_worker(job):
    """(worker process) compile one job into Triton's cache; the kernel is found by name."""
    module, name, *rest = job
    import importlib

    kernel = getattr(importlib.import_module(module), name)
    start = time.perf_counter()
    _compile(kernel, *rest)
    return time.perf_counter() - start


def compile_jobs(jobs, target=HOPPER, workers=1):
    """Compile `jobs` (jobs_of) into Triton's cache, in `workers` processes (1: here). Returns
    how many."""
    if workers > 1 and len(jobs) > 1:
        import multiprocessing
        from concurrent.futures import ProcessPoolExecutor

        specs = [worker_spec(job, target) for job in jobs]
        with ProcessPoolExecutor(min(workers, len(jobs)), mp_context=multiprocessing.get_context("spawn")) as pool:
            list(pool.map(_compile_in_worker, specs))
    else:
        for job in jobs:
            _compile(job[1], *job[2:6], target)
    return len(jobs)


def compile_kernels(model, x, target=HOPPER, workers=1, launches=None):
    """Every kernel variant a forward of `model` on `x` would launch on an sm_90 GPU (eval; or in
    train() the training forward and backward), under every autotune config, compiled as the
    JIT would: a list of (label, triton CompiledKernel), one per distinct variant and config.

    `model` is a fused model (fused blocks, `fuse()`, `fused_inception.models`); `x` any input it
    takes (its device and values don't matter; its dtype, layout and size do: channels_last
    inputs give the channels_last variants). Autocast (CPU) applies as usual. `workers` > 1
    compiles in that many processes first (they fill Triton's cache; the kernels are then read
    from it). The kernels land in Triton's cache (TRITON_CACHE_DIR), where the JIT of a GPU
    process with the same Triton finds them: this is also a parallel warm-up. `launches`: the
    forward's launches if the caller recorded them already (record_launches(model, x)), so that
    they are not recorded again."""
    if kconv.INTERPRETING:
        raise RuntimeError("fused_inception.codegen needs Triton's compiler: unset TRITON_INTERPRET before "
                           "importing fused_inception")
    jobs = jobs_of(record_launches(model, x) if launches is None else launches, target)
    if workers > 1:
        compile_jobs(jobs, target, workers)
    out = []
    for label, kernel, signature, constexprs, attrs, options, meta in jobs:
        compiled = _compile(kernel, signature, constexprs, attrs, options, target)
        compiled.fused_inception_meta = meta
        out.append((label, compiled))
    return out


def _ptxas_usage(ptx, arch="sm_90a"):
    """(registers, spill store bytes) from ptxas -v."""
    from triton.backends.nvidia.compiler import get_ptxas

    ptxas = get_ptxas(90).path
    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "k.ptx")
        with open(path, "w") as f:
            f.write(ptx)
        log = subprocess.run([ptxas, "-v", f"--gpu-name={arch}", path, "-o", os.path.join(d, "k.cubin")],
                             capture_output=True, text=True).stderr
    regs = re.findall(r"Used (\d+) registers", log)
    spills = re.findall(r"(\d+) bytes spill stores", log)
    return (int(regs[-1]) if regs else None), (int(spills[-1]) if spills else 0)


def _loops(ttgir):
    """Per scf.for that contains an MMA (a K loop): (async copies in it, smallest async_wait
    count in it, MMA ops in it)."""
    lines = ttgir.splitlines()
    found = []
    for i, line in enumerate(lines):
        if "scf.for" not in line or "=" not in line:
            continue
        depth, body = 0, []
        for other in lines[i:]:
            depth += other.count("{") - other.count("}")
            body.append(other)
            if depth <= 0 and len(body) > 1:
                break
        text = "\n".join(body[1:])
        mmas = len(re.findall(r"warp_group_dot |tt\.dot |ttng\.warp_group_dot\b", text))
        if not mmas:
            continue
        waits = [int(n) for n in re.findall(r"async_wait[^{]*\{num = (\d+)", text)]
        copies = len(re.findall(r"async_copy_global_to_local|async_tma_copy", text))
        inner = text.count("scf.for")
        if inner:  # an outer loop: its inner loops are counted on their own
            continue
        found.append((copies, min(waits) if waits else None, mmas))
    return found


def kernel_stats(compiled):
    """The counts described in the module docstring, as a dict, for one compiled kernel."""
    ptx, ttgir = compiled.asm["ptx"], compiled.asm["ttgir"]
    cp_bytes = collections.Counter(
        int(b, 16) for b in re.findall(r"cp\.async\.\w+\.shared\.global[^,]*,[^,]*,\s*(0x[0-9a-f]+)", ptx))
    regs, spills = _ptxas_usage(ptx)
    loops = _loops(ttgir)
    return {
        "wgmma": len(re.findall(r"wgmma\.mma_async", ptx)),
        "mma.sync": len(re.findall(r"mma\.sync", ptx)),
        "cp.async": sum(cp_bytes.values()),
        "cp.async bytes": dict(sorted(cp_bytes.items())),
        "tma": len(re.findall(r"cp\.async\.bulk\.tensor", ptx)),
        "ld.global v4/v2/1": (len(re.findall(r"ld\.global[\w.]*\.v4", ptx)), len(re.findall(r"ld\.global[\w.]*\.v2", ptx)),
                              len(re.findall(r"ld\.global(?![\w.]*\.v[248])[\w.]*\s", ptx))),
        "k loops": len(loops),
        "pipelined": sum(1 for copies, wait, _ in loops if copies and wait is not None and wait >= 1),
        "regs": regs,
        "spills": spills,
        "shared": compiled.metadata.shared,
    }


def _expects_wgmma(meta):
    """Whether a kernel (its fused_inception_meta) has a convolution on tensor-core operands."""
    if "SPEC" not in meta:
        return False
    kinds = {dict(zip(kconv.SPEC_FIELDS, s))["kind"] for s in meta["SPEC"]}
    tensor_cores = meta["dtype"] in ("bf16", "fp16") or meta.get("INPUT_PRECISION") == "tf32"
    return tensor_cores and bool(kinds & {kconv.KIND_GEMM, kconv.KIND_POOLED_GEMM, kconv.KIND_GEMM_TAPS})


def check_marks(label, compiled, stats):
    """The marks (MARKS) this kernel misses: a list of strings, empty when it meets them all."""
    meta = compiled.fused_inception_meta
    misses = []
    if stats["spills"]:
        misses.append(f"{stats['spills']} bytes spilled")
    if stats["shared"] > MAX_SHARED:
        misses.append(f"{stats['shared']} bytes of shared memory")
    fields = [dict(zip(kconv.SPEC_FIELDS, s)) for s in meta.get("SPEC", ())]
    # (a padded stem's tap is TAP_CHANNELS channels: 8 bytes in a 16-bit dtype)
    tap_bytes = {kconv.TAP_CHANNELS * 2} if (meta.get("dtype") in ("bf16", "fp16")
                                             and any(f["kind"] == kconv.KIND_GEMM_TAPS for f in fields)) else set()
    if any(width != 16 and width not in tap_bytes for width in stats["cp.async bytes"]):
        misses.append(f"async copies of {sorted(stats['cp.async bytes'])} bytes")
    if "SPEC" in meta:
        gemms = [f for f in fields if f["kind"] in (kconv.KIND_GEMM, kconv.KIND_GEMM_TAPS)]
        pooled = [f for f in fields if f["kind"] == kconv.KIND_POOLED_GEMM]
        if _expects_wgmma(meta) and not stats["wgmma"]:
            misses.append("no wgmma")
        config = meta.get("config")
        if config is not None and "BLOCK_K" in config.kwargs:  # (a padded stem whose K fits one chunk: no loop)
            bk = config.kwargs["BLOCK_K"] // (2 if meta["dtype"] == "fp32" else 1)
            gemms = [f for f in gemms if not (f["kind"] == kconv.KIND_GEMM_TAPS
                                              and f["kh"] * f["kw"] * kconv.TAP_CHANNELS <= bk)]
        aligned = [f for f in gemms if f["align"] >= 8 or f["kind"] == kconv.KIND_GEMM_TAPS]
        if aligned and stats["pipelined"] < len(gemms):
            misses.append(f"{len(gemms) - stats['pipelined']} of {len(gemms)} convolution K loops not pipelined")
        if any(f["align"] >= 8 for f in pooled) and not stats["ld.global v4/v2/1"][0]:
            misses.append("pooled loads not 16 bytes wide")
        if any(f["kind"] == kconv.KIND_REDUCE and f["align"] >= 8 for f in fields) and not stats["ld.global v4/v2/1"][0]:
            misses.append("partial sums not loaded 16 bytes wide")
    elif "PARTS" in meta:
        if any(part[-1] >= 8 for part in meta["PARTS"]) and not (stats["ld.global v4/v2/1"][0] or
                                                                   stats["ld.global v4/v2/1"][1]):
            misses.append("no vector loads")
    return misses


def model_named(name, train):
    """A fused model of `name` (random weights) in eval or train mode."""
    from fused_inception import models

    if name == "googlenet":
        m = models.googlenet(aux_logits=train, init_weights=True)
    elif name == "inception_v3":
        m = models.inception_v3(aux_logits=False, init_weights=True)  # (its aux head needs 299x299 in train)
    elif name == "inception_resnet_v2":
        from fused_inception.models.inception_resnet_v2 import inception_resnet_v2

        m = inception_resnet_v2()  # (fused by fuse())
    else:
        raise SystemExit(f"unknown model {name!r}")
    return m.train(train)


_SIZES = {"googlenet": 224, "inception_v3": 299, "inception_resnet_v2": 299}
# Training inputs: small (the kernels don't depend on the size) but large enough for every
# block (Inception v3 trains here without its aux head, which needs 299x299).
_TRAIN_SIZES = {"googlenet": 64, "inception_v3": 107, "inception_resnet_v2": 75}
_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def default_size(name, train=False):
    """The input size codegen (and warmup's CLI) take for a model: its own, small in training."""
    return _TRAIN_SIZES[name] if train else _SIZES[name]


def parser():
    p = argparse.ArgumentParser(prog="python -m fused_inception.codegen", description=__doc__.splitlines()[0])
    p.add_argument("--model", default="googlenet", choices=sorted(_SIZES))
    p.add_argument("--dtype", default="bf16", choices=sorted(_DTYPES))
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--size", type=int, default=None, help="input height and width (default: the model's)")
    p.add_argument("--train", action="store_true",
                   help="training forward and backward (autocast to --dtype when it is 16-bit; fp32 parameters)")
    p.add_argument("--nchw", action="store_true", help="NCHW input (default: channels_last)")
    p.add_argument("--work", action="store_true", help="print each stage launch's programs, K iterations and "
                   "useful/issued MACs per config (fused_inception.work), then each compiled kernel's K loops "
                   "read from its SASS (fused_inception.sass)")
    p.add_argument("--workers", type=int, default=os.cpu_count() or 1, help="compile in this many processes")
    return p


def _compile_model(args, model, x, dtype):
    """compile_kernels as the CLI's arguments ask: (kernels, seconds)."""
    start = time.perf_counter()
    if args.train and dtype != torch.float32:
        with torch.autocast("cpu", dtype=dtype):
            kernels = compile_kernels(model, x, workers=args.workers)
    else:
        kernels = compile_kernels(model.to(dtype), x.to(dtype), workers=args.workers)
    return kernels, time.perf_counter() - start


SASS_HEAD = ["kernel", "regs", "programs/SM", "K loop", "instrs/wgmma (ref)", "ldgsts", "ldg", "full waits", "bar",
             "verdict"]


def references(compiled, loops):
    """Per K loop of a compiled stage kernel (sass.Loop, in code order), the reference instructions
    per wgmma: a plain implicit-GEMM conv compiled with that loop's tile and dtype
    (fused_inception.reference); None for other kernels. A problem's tile is its own (kconv spec
    fields tn, tk: an N tile and K chunk within the config's), and problems and their loops come in
    the same order: each loop takes the next problem whose wgmma work per iteration is the loop's
    (a padded stem that fits one K chunk has no loop), else the config's tile."""
    import triton

    from fused_inception import reference

    meta = compiled.fused_inception_meta
    config = meta.get("config")
    if meta["dtype"] not in ("bf16", "fp16", "fp32") or config is None or "BLOCK_M" not in config.kwargs:
        return [None] * len(loops)
    k = config.kwargs
    fp32 = meta["dtype"] == "fp32"
    block_k = k["BLOCK_K"] // 2 if fp32 else k["BLOCK_K"]
    tiles = []  # (N tile, K chunk) of each problem with a wgmma loop, in order
    for spec in meta.get("SPEC", ()):
        kind = kconv.spec_field(spec, "kind")
        n = min(k["BLOCK_N"], kconv.spec_field(spec, "tn"))
        if kind == kconv.KIND_GEMM:
            tiles.append((n, kconv.k_chunk(spec, fp32, k["BLOCK_K"])))
        elif kind == kconv.KIND_GEMM_TAPS:
            tiles.append((n, block_k))
        elif kind == kconv.KIND_POOLED_GEMM:
            tiles.append((n, block_k // 4))

    def per_mma(n, chunk):  # (the reference halves BLOCK_K for fp32, as the stage kernel does)
        kw = dict(k, BLOCK_N=n, BLOCK_K=chunk * 2 if fp32 else chunk)
        return reference.per_mma(triton.Config(kw, num_warps=config.num_warps, num_stages=config.num_stages),
                                 meta["dtype"])

    groups = config.num_warps // 4  # (a loop's wgmma work is one warp group's share of the tile)
    out, j = [], 0
    for loop in loops:
        if not loop.mma:
            out.append(per_mma(k["BLOCK_N"], block_k))
            continue
        work = loop.mma * 64 * 128 * 16 * groups
        match = next((i for i in range(j, len(tiles)) if abs(k["BLOCK_M"] * tiles[i][0] * tiles[i][1] - work) < 512),
                     None)
        if match is None:
            out.append(per_mma(min(k["BLOCK_N"], max(16, round(work / (k["BLOCK_M"] * block_k)))), block_k))
        else:
            out.append(per_mma(*tiles[match]))
            j = match + 1
    return out


def _sass_kernel_rows(label, compiled, code):
    """Markdown rows of one compiled kernel: one per K loop (one row when it has none)."""
    limits = sass.occupancy(compiled, code)
    programs = min(limits.values())
    head = (f"| {label} | {code.registers} | {programs} "
            f"({', '.join(k for k, v in limits.items() if v == programs)}) |")
    if not code.loops:
        verdict = "no wgmma K loop" if _expects_wgmma(compiled.fused_inception_meta) else "ok (no K loop)"
        return [head + f" - | - | - | - | - | - | {verdict} |"]
    rows = []
    for loop, ref in zip(code.loops, references(compiled, code.loops)):
        defects = [d.split(": ", 1)[1] for d in sass.loop_defects([loop], ref)]
        narrow = f" ({loop.ldgsts - loop.ldgsts_16} narrower than 16 B)" if loop.ldgsts_16 < loop.ldgsts else ""
        rows.append(head + f" {loop.start:#x} | {loop.per_mma}{f' ({ref})' if ref else ''} | {loop.ldgsts}{narrow} | "
                    f"{loop.ldg} | {loop.full_wait} | {loop.bar} | {'; '.join(defects) or 'ok'} |")
    return rows


def sass_table(kernels, workers=1):
    """Markdown rows: per compiled kernel (compile_kernels) its registers and programs per SM
    (and what limits them), per K loop in its SASS the instructions per 64x128x16 wgmma (with
    the tile's reference), async copies (and how many are narrower than 16 bytes), synchronous
    loads, full wgmma waits, barriers and the loop's defects (fused_inception.sass)."""
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(workers) as pool:  # (cuobjdump runs in a subprocess)
        codes = list(pool.map(sass.kernel_code, [c for _, c in kernels]))
    rows = ["| " + " | ".join(SASS_HEAD) + " |", "|" + "---|" * len(SASS_HEAD)]
    for (label, compiled), code in zip(kernels, codes):
        rows += _sass_kernel_rows(label, compiled, code)
    return rows


def _print_work(args, model, x, dtype):
    """--work: the stage launches' work (fused_inception.work), then the compiled kernels' K
    loops (sass_table)."""
    from fused_inception import work

    with torch.autocast("cpu", dtype=dtype, enabled=args.train and dtype != torch.float32):
        launches = record_launches(model if args.train else model.to(dtype), x[:1] if args.train else x[:1].to(dtype))
    print("\n".join(work.work_table(launches, in_channels=x.shape[1])))
    kernels, compile_s = _compile_model(args, model, x, dtype)
    start = time.perf_counter()
    rows = sass_table(kernels, args.workers)
    print(f"\nK loops in the SASS of the {len(kernels)} compiled kernels (sm_90, Triton "
          f"{__import__('triton').__version__}; instructions per 64x128x16 wgmma against the reference "
          f"implicit-GEMM conv of the tile, limit {sass.PER_MMA_SLACK}x):")
    print("\n".join(rows))
    flagged = sum(not r.rsplit("|", 2)[-2].strip().startswith("ok") for r in rows[2:])
    print(f"{len(rows) - 2} rows, {flagged} with a defect; compile {compile_s:.1f} s, "
          f"SASS read in {time.perf_counter() - start:.1f} s")
    return kernels


def main(argv=None):
    args = parser().parse_args(argv)
    dtype = _DTYPES[args.dtype]
    model = model_named(args.model, args.train)
    size = args.size or _SIZES[args.model]
    if args.train:  # autocast keeps fp32 parameters; spatial size doesn't change the kernels: keep the CPU work small
        size = min(size, _TRAIN_SIZES[args.model])
    x = torch.empty(args.batch if not args.train else 2, 3, size, size)
    fmt = torch.contiguous_format if args.nchw else torch.channels_last
    x = x.to(memory_format=fmt)
    model = model.to(memory_format=fmt)
    if args.work:
        return _print_work(args, model, x, dtype)
    kernels, compile_s = _compile_model(args, model, x, dtype)
    head = ["kernel", "wgmma", "mma.sync", "cp.async (bytes)", "tma", "ld.global v4/v2/1", "pipelined", "regs",
            "spills", "shared", "misses"]
    print(f"{args.model} {'train' if args.train else 'eval'} {args.dtype}, input {tuple(x.shape)}"
          f"{' NCHW' if args.nchw else ' channels_last'}: kernels compiled for sm_90 by Triton "
          f"{__import__('triton').__version__}")
    print("| " + " | ".join(head) + " |")
    print("|" + "---|" * len(head))
    variants, missed = set(), 0
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(args.workers) as pool:  # (ptxas runs in a subprocess)
        all_stats = list(pool.map(kernel_stats, [c for _, c in kernels]))
    for (label, compiled), s in zip(kernels, all_stats):
        misses = check_marks(label, compiled, s)
        missed += bool(misses)
        variants.add(label.rsplit(" ", 4)[0])
        cp = f"{s['cp.async']} ({','.join(map(str, s['cp.async bytes']))})" if s["cp.async"] else "0"
        print(f"| {label} | {s['wgmma']} | {s['mma.sync']} | {cp} | {s['tma']} | "
              f"{'/'.join(map(str, s['ld.global v4/v2/1']))} | {s['pipelined']}/{s['k loops']} | {s['regs']} | "
              f"{s['spills']} | {s['shared']} | {'; '.join(misses) or 'ok'} |")
    print(f"{len(kernels)} compiled kernels ({len(variants)} distinct kernels x their configs), "
          f"{missed} missing a mark; compile time {compile_s:.1f} s")
    return kernels


def restart_without_interpreter(module):
    """In a process whose kernels were decorated for the interpreter (TRITON_INTERPRET=1 when
    they were imported), start `python -m module` with the same arguments again without it."""
    if kconv.INTERPRETING:
        os.execve(sys.executable, [sys.executable, "-m", module, *sys.argv[1:]],
                  {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"})


if __name__ == "__main__":
    restart_without_interpreter("fused_inception.codegen")
    main()
