"""Get a fused model ready before its first forward: every kernel variant compiled in parallel.

On a GPU the first forward of a fused model would compile each kernel variant it launches (under
every config the autotuner tries) one after the other, and autotune. `warmup(model, x)` records
the launches a forward on inputs like x makes (and in train() a training step's), compiles them
all in a pool of processes with the JIT's own specialisation (fused_inception.codegen), so the
JIT then finds each in Triton's cache, and then runs one forward (eval) or one training step on a
copy of the model (train(): the model's parameters and statistics are left as they were) so that
the autotuner's picks are made and kept (kernels.tuning: the next process benchmarks nothing),
and builds the plans. Under the interpreter, or without a GPU and without a `target`, nothing is
compiled: it builds the plans.

    python -m fused_inception.precompile --model inception_v3 --dtype bf16 --batch 32

Example:
    >>> report = fused_inception.warmup(model, torch.randn(32, 3, 299, 299, device="cuda"))
    >>> print(report)   # warmup: 69 kernel variants compiled in 38.2 s with 16 workers for sm_90
"""

import argparse
import copy
import dataclasses
import json
import os
import time

import torch

from fused_inception import codegen
from fused_inception.blocks import build_plans
from fused_inception.kernels import conv as kconv


@dataclasses.dataclass
class WarmupReport:
    compiled: int  # distinct kernel variants compiled ahead (variant x autotune config)
    seconds: float  # wall time of the compiling
    workers: int
    target: tuple  # (compute capability as 90 for sm_90, warp size), or None: nothing compiled

    def __str__(self):
        if self.target is None:
            return "warmup: plans built, nothing to compile (interpreter, or no GPU and no target)"
        return (f"warmup: {self.compiled} kernel variants compiled in {self.seconds:.1f} s with {self.workers} "
                f"workers for sm_{self.target[0]}")


def _target_of(x):
    major, minor = torch.cuda.get_device_capability(x.device)
    return (major * 10 + minor, 32)


def warmup(model, example_input, workers=None, target=None):
    """Compile every kernel variant `model`'s forward on inputs like `example_input` will launch
    (in train(): a training step's), in `workers` processes (default: the CPU count), then tune
    and build the plans. Returns a WarmupReport.

    example_input: its device, dtype, shape and memory format decide the variants (values don't
    matter). Under torch.autocast the autocast dtype's. target: (capability, warp size) to
    compile for without a GPU (e.g. (90, 32) for sm_90: a build machine filling
    TRITON_CACHE_DIR for GPU hosts); by default the GPU of example_input.
    """
    x = example_input
    if kconv.INTERPRETING or (target is None and not x.is_cuda):
        build_plans(model, example=x)
        return WarmupReport(0, 0.0, 0, None)
    target = target or _target_of(x)
    workers = workers or os.cpu_count() or 1
    start = time.perf_counter()
    autocast = x.is_cuda and torch.is_autocast_enabled("cuda")
    if autocast:  # (the launches are recorded on the CPU: the same autocast there)
        with torch.autocast("cpu", dtype=torch.get_autocast_dtype("cuda")):
            launches = codegen.record_launches(model, x)
    else:
        launches = codegen.record_launches(model, x)
    jobs = codegen.compile_jobs(codegen.jobs_of(launches, target), target, workers)
    seconds = time.perf_counter() - start
    if x.is_cuda:  # the autotuner's picks (kept on disk) and the launches, on the GPU
        if model.training:
            step = copy.deepcopy(model)
            out = step(x.detach().requires_grad_())
            (out[0] if isinstance(out, tuple) else out).float().sum().backward()
        build_plans(model, example=x)
    return WarmupReport(jobs, seconds, workers, target)


def parser():
    p = argparse.ArgumentParser(prog="python -m fused_inception.precompile", description=__doc__.split("\n\n")[0])
    p.add_argument("--model", choices=["googlenet", "inception_v3", "inception_resnet_v2"], default="googlenet")
    p.add_argument("--dtype", choices=["bf16", "fp16", "fp32"], default="bf16")
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--size", type=int, help="input height and width (default: the model's)")
    p.add_argument("--train", action="store_true", help="a training step's kernels (autocast to --dtype if 16-bit)")
    p.add_argument("--workers", type=int, help="compile in this many processes (default: the CPU count)")
    p.add_argument("--arch", type=int, help="compile for this compute capability without a GPU (90: sm_90)")
    p.add_argument("--json", help="append a JSON line with the timings to this file (and, on a GPU, the time "
                                  "of the forward after warmup)")
    p.add_argument("--label", default="", help="a label for the JSON line (e.g. cold, warm)")
    return p


def main(argv=None):
    args = parser().parse_args(argv)
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[args.dtype]
    device = "cuda" if torch.cuda.is_available() and args.arch is None else "cpu"
    model = codegen.model_named(args.model, args.train).to(device).to(memory_format=torch.channels_last)
    size = args.size or codegen.default_size(args.model, args.train)
    x = torch.randn(args.batch, 3, size, size, device=device).to(memory_format=torch.channels_last)
    target = (args.arch, 32) if args.arch else None
    autocast = torch.autocast(device, dtype=dtype, enabled=args.train and dtype != torch.float32)
    if not args.train:
        model, x = model.to(dtype), x.to(dtype)
    start = time.perf_counter()
    with autocast:
        report = warmup(model, x, args.workers, target)
    warmup_s = time.perf_counter() - start
    print(report)
    if args.json:
        record = dict(label=args.label, model=args.model, dtype=args.dtype, batch=args.batch, train=args.train,
                      compiled=report.compiled, compile_s=report.seconds, workers=report.workers,
                      warmup_s=warmup_s, device=torch.cuda.get_device_name() if device == "cuda" else "cpu")
        if device == "cuda" and not args.train:  # the forward a user's first call now is
            torch.cuda.synchronize()
            start = time.perf_counter()
            with torch.no_grad():
                model(x)
            torch.cuda.synchronize()
            record["next_forward_s"] = time.perf_counter() - start
        with open(args.json, "a") as f:
            f.write(json.dumps(record) + "\n")
    return report


if __name__ == "__main__":
    codegen.restart_without_interpreter("fused_inception.precompile")
    main()
