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
the README table and the speedup plot. Models, inputs, tolerances and the measuring are
bench/cases.py's (shared with the pytest-benchmark suites); FLOPs and bytes are
fused_inception.report.stage_traffic's.

Records: {"part", "case", "status": "ok" | "FAIL" (wrong numbers) | "error" (an exception) |
"skipped", ...}; a FAIL or error also carries "error" or the measured error and tolerance.
"""

import argparse
import contextlib
import json
import os
import sys
import time
import traceback

PARTS = ["smoke", "networks", "stages"]
IMPLS = ["eager", "fused", "fused-cudagraph", "compile-default"]
CPU_IMPLS = ["eager", "fused"]
SMOKE_BATCH = 2  # a GPU smoke: real channels and maps, small batch
NETWORK_BATCHES = [1, 32, 256]  # on a GPU (the interpreter: 1)
STAGES_BATCH = 256  # the stage profile's GoogLeNet batch on a GPU (the interpreter: 1)
# H200 ceilings measured by this workplace (KINDS.md): bf16 dense GEMM and device-to-device copy.
PEAK_TFLOPS = 790.0
PEAK_GBS = 4300.0
EXIT_CUDA_ERROR = 3  # the process's CUDA context is poisoned: run the part again with --resume


def parser():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("part", choices=PARTS)
    p.add_argument("--out", required=True, help="folder for <part>.jsonl")
    p.add_argument("--device", choices=["cuda", "cpu"], default="cuda",
                   help="cpu: Triton's interpreter at tiny shapes (tests; times mean nothing)")
    p.add_argument("--deadline", type=float, default=float(os.environ.get("PART_DEADLINE", 0)) or None,
                   help="Unix time: skip what cannot start before it (default: $PART_DEADLINE, set by gpu_run.sh)")
    p.add_argument("--resume", action="store_true", help="skip cases already recorded in <part>.jsonl")
    p.add_argument("--blocks", default=None, help="smoke: which blocks (default: bench/cases.py SMOKE)")
    p.add_argument("--configs", default="all", help="smoke: 'all', or tile config names (kernels.conv.CONFIG_NAMES, "
                                                    "comma-separated) for the NaN check")
    p.add_argument("--network", choices=["googlenet", "inception_v3"], default="googlenet", help="networks: which")
    p.add_argument("--batches", default=None, help="networks: comma-separated (GPU default 1,32,256; CPU 1)")
    p.add_argument("--impls", default=None, help=f"networks: comma-separated of {IMPLS}")
    p.add_argument("--dtype", default="bf16", choices=["bf16", "fp16", "fp32"], help="networks: dtype")
    p.add_argument("--batch", type=int, default=None, help="stages: batch (GPU default 256, CPU 1)")
    p.add_argument("--size", type=int, default=None, help="stages: input size (GPU default 224, CPU 32)")
    p.add_argument("--stage-blocks", default=None, help="stages: only these blocks (comma-separated, e.g. inception3a)")
    return p


if __name__ == "__main__":  # the kernels are decorated for the interpreter or the GPU when cases imports them
    os.environ["TRITON_INTERPRET"] = ("1" if parser().parse_args().device == "cpu"
                                      else os.environ.get("TRITON_INTERPRET", "0"))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import torch  # noqa: E402

import cases  # noqa: E402
from fused_inception.kernels import conv as kconv  # noqa: E402
from fused_inception.report import fused_blocks, stage_traffic  # noqa: E402


class Part:
    """Appends records to DIR/<name>.jsonl (flushed), prints a line per record, keeps the deadline."""

    def __init__(self, name, out, deadline=None, resume=False):
        self.name, self.deadline = name, deadline
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
        self.file.write(json.dumps(rec, default=str) + "\n")
        self.file.flush()
        self.failures += status in ("FAIL", "error")
        shown = {k: v for k, v in rec.items() if k not in ("part", "case", "status", "t", "traceback")}
        print(f"[{self.name}] {case}: {status} {json.dumps(shown, default=str)}", flush=True)
        return rec

    def compile_time(self, case, seconds):
        """The first call of a case: compilation and autotuning, on its own line."""
        print(f"compile+autotune: {seconds:.1f} s ({self.name} {case})", flush=True)

    def verdict(self, case, result, **fields):
        """Record a cases.check result and fields: ok or FAIL; a first call's seconds printed apart."""
        if "first_call_s" in fields:
            self.compile_time(case, fields["first_call_s"])
        result = dict(result)
        return self.record(case, "ok" if result.pop("ok") else "FAIL", **result, **fields)

    def skip_reason(self, case, reserve_s=0.0):
        """Why `case` is not run now (already done, or the deadline is near), else None."""
        if case in self.done:
            return "done"
        if self.deadline is not None and time.time() + reserve_s > self.deadline:
            self.record(case, "skipped", reason="deadline")
            return "deadline"
        return None

    @contextlib.contextmanager
    def guard(self, case, **fields):
        """Record an exception inside as an error; a CUDA error ends the process (it is poisoned)."""
        try:
            yield
        except Exception as e:  # noqa: BLE001 - every failure is recorded and the run goes on
            self.record(case, "error", error=f"{type(e).__name__}: {str(e)[:500]}",
                        traceback=traceback.format_exc()[-2000:], **fields)
            text = f"{type(e).__name__} {e}"
            if any(s in text for s in ("CUDA error", "illegal memory access", "AcceleratorError",
                                       "device-side assert", "unspecified launch failure", "CUDA driver error")):
                print(f"[{self.name}] CUDA error: this process stops (gpu_run.sh resumes the part)", flush=True)
                sys.exit(EXIT_CUDA_ERROR)


def fast_autotune():
    """Autotuning times each config with do_bench(warmup=5 ms, rep=25 ms) instead of Triton's
    default (25, 100): ~0.04 s a config instead of ~0.15, for ~140 tuning keys x 4 configs in the
    quick run. Triton's own class is patched in this process only; the library is unchanged."""
    import functools

    import triton.testing
    from triton.runtime.autotuner import Autotuner

    if not hasattr(Autotuner, "_do_bench") and "do_bench" not in vars(Autotuner):
        return False
    fast = functools.partial(triton.testing.do_bench, warmup=5, rep=25)
    Autotuner.do_bench = property(lambda self: self._do_bench if getattr(self, "_do_bench", None) else fast)
    return True


# ---------------------------------------------------------------------------------------------
# smoke: per block, fp32 (TF32 off) and bf16 eval against the fp32 model, bf16 into a NaN-filled
# output under each tile config, one fp32 training step. fp32 and the training step run pinned to
# the smallest config (every stage takes it): which tiles a config covers doesn't depend on the
# dtype, and the bf16 NaN checks run every config; this halves what the smoke compiles.


def run_smoke(part, blocks, device, configs):
    batch = SMOKE_BATCH if device == "cuda" else 1
    # (check, dtype, the config pinned, recorded for the NaN checks)
    evals = [("eval-fp32", "fp32", kconv.SMALLEST), ("eval-bf16", "bf16", None)]
    evals += [("nan-bf16", "bf16", config) for config in configs]
    for name in blocks:
        for check, dtype, config in evals:
            nan = check == "nan-bf16"
            case = f"{name} {check}" + (f" config {config}" if nan else "")
            fields = dict(block=name, check=check, dtype=dtype, **(dict(config=config) if nan else {}))
            if not part.skip_reason(case, 5 if nan else 10):
                with part.guard(case, **fields), cases.ieee_fp32(), cases.pinned(config):
                    part.verdict(case, **eval_check(name, device, batch, cases.DTYPES[dtype], nan), **fields)
        case = f"{name} train-fp32"
        if not part.skip_reason(case, 15):
            with part.guard(case, block=name, check="train-fp32"), cases.ieee_fp32(), cases.pinned(kconv.SMALLEST):
                # (the interpreter: 5x5 maps; a batch of 2 for the batch statistics)
                x = cases.block_input(name, 2, device, torch.float32, size=5 if device == "cpu" else None)
                errs, seconds = cases.train_step_errors(*cases.block_models(name, device), x)
                worst = max(errs.values())
                part.verdict(case, dict(err=worst, tol=cases.TOL_TRAIN, ok=worst <= cases.TOL_TRAIN), block=name,
                             check="train-fp32", dtype="fp32", errs=errs, first_call_s=seconds)


def eval_check(name, device, batch, dtype, nan_filled=False):
    """Block `name` in `dtype` against the fp32 model: {result: cases.check's, eager_err,
    first_call_s}. nan_filled: stage by stage, the launches a forward makes (Plan.stage_calls),
    into output and intermediate buffers filled with NaN first (a tile no launch writes stays
    NaN, or makes the later stages that read it NaN)."""
    ref, fused = cases.block_models(name, device)
    x = cases.block_input(name, batch, device, dtype)
    expected, eager_err = cases.yardstick(ref, cases.in_dtype(ref, dtype), x)
    fused = fused.to(dtype)
    with torch.no_grad():
        if nan_filled:
            calls, y, mid = fused.plan().stage_calls(x)
            y.fill_(float("nan"))
            mid.fill_(float("nan"))
            seconds = cases.first_call(lambda: [call() for call in calls], device)[1]
        else:
            y, seconds = cases.first_call(lambda: fused(x), device)
    return dict(result=cases.check(y, expected, cases.tolerance(dtype, eager_err)), eager_err=eager_err,
                first_call_s=seconds)


# ---------------------------------------------------------------------------------------------
# networks


def run_networks(part, network, batches, impls, device, dtype_name):
    """Every (batch, impl): first call (compile, autotune) apart, check against the fp32 model,
    launches, median time. The cheap implementations run first for every batch, torch.compile
    last (a compile takes a minute or more): a run short of time loses those first."""
    dtype = cases.DTYPES[dtype_name]
    if device == "cuda":
        torch.backends.cudnn.benchmark = True  # eager as a user would tune it
    ref32, fused = cases.network_models(network, device)
    ref, fused = cases.in_dtype(ref32, dtype), fused.to(dtype)
    compiled, yardsticks = {}, {}
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
        x = cases.network_input(network, batch, device, dtype)
        info = dict(network=network, batch=batch, dtype=dtype_name, impl=impl, layout="channels_last",
                    input=list(x.shape))
        with part.guard(case, **info):
            if batch not in yardsticks:
                yardsticks[batch] = cases.yardstick(ref32, ref, x)
            expected, eager_err = yardsticks[batch]
            if impl.startswith("compile") and impl not in compiled:
                compiled[impl] = cases.model_of(impl, ref, fused)
                if batch > 1:
                    torch._dynamo.mark_dynamic(x, 0)
                info["dynamic_batch"] = batch > 1
            model = compiled[impl] if impl in compiled else cases.model_of(impl, ref, fused)
            run, seconds = cases.prepare(model, x, graph=impl == "fused-cudagraph")
            with torch.no_grad():
                y, launches, how, host_ms = cases.counted_run(run, impl, device)
                ms = cases.bench_ms(run, device) if device == "cuda" else host_ms  # the interpreter: one call
                if device == "cuda" and batch == 1 and impl in ("eager", "fused", "compile-default"):
                    info.update(cases.cudagraph_ms(run))
            part.verdict(case, cases.check(y, expected, cases.tolerance(dtype, eager_err)), **info, ms=ms,
                         launches=launches, launches_by=how, eager_err=eager_err, first_call_s=seconds)
            del run, y


# ---------------------------------------------------------------------------------------------
# stages


def run_stages(part, batch, size, device, only=None):
    """Fused GoogLeNet in bf16: each block's stages timed one at a time (the forward's own
    launches, Plan.stage_calls) on the input the block gets in the network, against the floor
    of its FLOPs and bytes (fused_inception.report.stage_traffic)."""
    dtype = torch.bfloat16
    ref, fused = cases.network_models("googlenet", device, dtype)
    x = cases.network_input("googlenet", batch, device, dtype, size=size)
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
            part.compile_time(f"googlenet b{batch} forward", cases.first_call(lambda: fused(x), device)[1])
    total_ms = floor_ms = 0.0
    for name, block in blocks:
        xin = inputs[name]
        plan = block.plan(dtype)
        calls, _, _ = plan.stage_calls(xin)
        with torch.no_grad():  # once in order, so that a later stage reads real intermediate results
            for call in calls:
                call()
        work = stage_traffic(plan.layout, xin.shape, xin.element_size())
        for i, (call, problems, (flops, nbytes)) in enumerate(zip(calls, plan.layout.stages, work)):
            case = f"{name} stage {i + 1}"
            if part.skip_reason(case, 3):
                continue
            with part.guard(case, block=name, stage=i + 1), torch.no_grad():
                ms = cases.bench_ms(call, device)
                floor = max(flops / (PEAK_TFLOPS * 1e12), nbytes / (PEAK_GBS * 1e9)) * 1e3
                desc = [f"{p.row['kh']}x{p.row['kw']}{'/s2' if p.row['sh'] == 2 else ''}"
                        f"{' pool' if p.row['pool'] else ''} {p.row['cin']}->{p.ncols}" if p.gemm
                        else f"pool {p.row['pkh']}x{p.row['pkw']} {p.ncols}" for p in problems]
                part.record(case, block=name, stage=i + 1, batch=batch, dtype="bf16", problems=desc, ms=ms,
                            gflop=flops / 1e9, mb=nbytes / 1e6, tflops=flops / ms / 1e9, gbs=nbytes / ms / 1e6,
                            floor_ms=floor, of_floor=floor / ms)
                total_ms, floor_ms = total_ms + ms, floor_ms + floor
    # (the table: bench/report.py, from stages.jsonl)
    print(f"sum of stages: {total_ms:.3f} ms; floor {floor_ms:.3f} ms (FLOPs at {PEAK_TFLOPS:.0f} TFLOP/s or "
          f"bytes at {PEAK_GBS:.0f} GB/s, whichever is longer)", flush=True)


# ---------------------------------------------------------------------------------------------


def main(argv=None):
    p = parser()
    args = p.parse_args(argv)
    configs = list(kconv.CONFIG_NAMES) if args.configs == "all" else args.configs.split(",")
    if set(configs) - set(kconv.CONFIG_NAMES):
        p.error(f"--configs: unknown {sorted(set(configs) - set(kconv.CONFIG_NAMES))}; the tile configs are "
                f"{', '.join(kconv.CONFIG_NAMES)}")
    start = time.time()
    part = Part(args.part, args.out, args.deadline, args.resume)
    if args.device == "cuda" and not torch.cuda.is_available():
        part.record("device", "error", error="no CUDA device visible to torch")
        return 1
    cpu = args.device == "cpu"
    if not cpu and os.environ.get("QUICK_FAST_AUTOTUNE", "1") == "1":
        print(f"[{args.part}] autotuning with do_bench(warmup=5, rep=25): {fast_autotune()}", flush=True)
    with part.guard("part", what=args.part):
        if args.part == "smoke":
            run_smoke(part, args.blocks.split(",") if args.blocks else cases.SMOKE, args.device, configs)
        elif args.part == "networks":
            batches = [int(b) for b in args.batches.split(",")] if args.batches else [1] if cpu else NETWORK_BATCHES
            impls = args.impls.split(",") if args.impls else CPU_IMPLS if cpu else IMPLS
            run_networks(part, args.network, batches, impls, args.device, args.dtype)
        else:
            run_stages(part, args.batch or (1 if cpu else STAGES_BATCH), args.size or (32 if cpu else 224),
                       args.device, args.stage_blocks.split(",") if args.stage_blocks else None)
    print(f"[{args.part}] finished in {time.time() - start:.1f} s, {part.failures} failure(s)", flush=True)
    return 1 if part.failures else 0


if __name__ == "__main__":
    sys.exit(main())
