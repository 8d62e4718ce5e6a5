"""What the quick GPU run will compile, counted without a GPU (and optionally compiled for sm_90).

    python bench/kernel_census.py                      # count, per part of `gpu_run.sh quick`
    python bench/kernel_census.py --compile 4          # + compile 4 of them for sm_90, timed
    python bench/kernel_census.py --compile all --jobs 16 --parts networks   # precompile (cache)

The quick run's workloads (`workloads`: what each part of bench/quick.py runs, with
bench/cases.py's models and inputs) run on the `meta` device with the library's launches
recorded (`fused_inception.kernels.conv.recording`): shapes only, so whole networks at batch
256 cost nothing. Each launch's compilations (one per autotune config) are
specialised by Triton's own JIT binder for an sm_90 target (`fused_inception.codegen`), so:
compiles = distinct specialisations; autotune benchmarks = distinct (kernel, tuning key) pairs.

`--compile N|all` compiles the first N (or all) for sm_90 into TRITON_CACHE_DIR, where the JIT
of a GPU process with the same Triton finds them (`--check-cache-hit` shows it with a fake
sm_90 driver): on the device's 16 cores, before the timed parts.

Not part of CI (tests/test_bench_census.py runs pieces of it). TRITON_INTERPRET is set to 0.
"""

import argparse
import collections
import concurrent.futures
import itertools
import json
import multiprocessing
import os
import sys
import time

os.environ["TRITON_INTERPRET"] = "0"  # the real JITFunction, not the interpreter's
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import torch  # noqa: E402
import triton  # noqa: E402

import cases  # noqa: E402
import quick  # noqa: E402
from fused_inception import codegen  # noqa: E402
from fused_inception.kernels import conv as kconv  # noqa: E402


def _meta_autocast():
    """Autocast has no `meta` device type: asked about it, answer as for a device without autocast."""
    for name in ("is_autocast_enabled", "get_autocast_dtype"):
        original = getattr(torch, name)

        def wrapper(*args, _original=original, _name=name):
            if args and args[0] == "meta":
                return False if _name == "is_autocast_enabled" else torch.float32
            return _original(*args)

        setattr(torch, name, wrapper)


def workloads(part, device="meta"):
    """(description, zero-argument callable) pairs making the fused launches of quick.py's `part`,
    as it makes them (dtypes, pinned configs, TF32 off for fp32); on `meta`: shapes only."""
    bf16 = torch.bfloat16
    if part == "smoke":
        for name in cases.SMOKE:
            for dtype_name, config in (("fp32", kconv.SMALLEST), ("bf16", None)):  # bf16: autotuned, all configs
                def forward(name=name, dtype=cases.DTYPES[dtype_name], config=config):
                    _, fused = cases.block_models(name, device, dtype)
                    with cases.ieee_fp32(), cases.pinned(config):
                        fused(cases.block_input(name, quick.SMOKE_BATCH, device, dtype))
                yield f"{name} eval {dtype_name}", forward

            def train(name=name):
                _, fused = cases.block_models(name, device)
                x = cases.block_input(name, 2, device, torch.float32).requires_grad_()
                with cases.ieee_fp32(), cases.pinned(kconv.SMALLEST):
                    fused.train()(x).sum().backward()
            yield f"train {name}", train
    elif part == "networks":
        for network in cases.NETWORKS:
            _, fused = cases.network_models(network, device, bf16)
            for batch in quick.NETWORK_BATCHES:
                yield f"{network} b{batch}", (lambda f=fused, n=network, b=batch: f(
                    cases.network_input(n, b, device, bf16)))
    elif part == "stages":
        _, fused = cases.network_models("googlenet", device, bf16)
        batch = quick.STAGES_BATCH
        yield f"googlenet b{batch}", lambda: fused(cases.network_input("googlenet", batch, device, bf16))


def record(parts, limit=None):
    """{part: [launch records]} of the quick run's workloads (the first `limit` of each part)."""
    _meta_autocast()
    out = {}
    for part in parts:
        out[part] = []
        for what, run in itertools.islice(workloads(part, device="meta"), limit):
            try:
                with kconv.recording() as launches, (torch.no_grad() if not what.startswith("train")
                                                     else _nullcontext()):
                    run()
                out[part] += launches
            except Exception as e:  # noqa: BLE001 - a workload the meta device can't run is reported
                print(f"  {part}: {what}: not counted ({type(e).__name__}: {str(e)[:120]})", file=sys.stderr)
    return out


class _nullcontext:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def tuning_key(kernel, args, consts):
    """What the autotuner keys a stage launch on (its `key` arguments and the tensors' dtypes);
    None for kernels that aren't autotuned."""
    if kernel is not kconv._stage_kernel:
        return None
    names = [p.name for p in kernel.params if not p.is_constexpr]  # (a launch record's args: Triton's own list)
    values = dict(zip(names, args), **consts)
    return (tuple(str(values[k]) for k in kconv._TUNE_KEY)
            + tuple(str(a.dtype) for a in args if isinstance(a, torch.Tensor)))


def _compile_job(spec):
    """Process-pool worker: compile one job into Triton's cache; seconds (or the error)."""
    try:
        return spec[1], codegen._compile_in_worker(spec)
    except Exception as e:  # noqa: BLE001 - reported, the others go on
        return spec[1], f"failed: {type(e).__name__}: {str(e)[:200]}"


class _FakeDriver:
    """Enough of an sm_90 CUDA driver for JITFunction.run(..., warmup=True): compile, never launch."""

    def get_current_device(self):
        return 0

    def get_current_stream(self, device=None):
        return 0

    def get_current_target(self):
        from triton.backends.compiler import GPUTarget

        return GPUTarget("cuda", *codegen.HOPPER)

    def is_active(self):
        return True


def check_cache_hit(part="smoke"):
    """Compile one recorded launch's kernel here (codegen), then ask Triton's own JIT (warmup=True,
    a fake sm_90 driver) for the same launch: it must find it in TRITON_CACHE_DIR instead of
    compiling. Returns (compile seconds, JIT seconds)."""
    import triton.runtime as runtime

    launches = record([part], limit=3)[part]
    # A plain (not autotuned) kernel if there is one: the training BatchNorm kernels compile fastest.
    kernel, args, consts, configs = next((rec for rec in launches if rec[0] is not kconv._stage_kernel),
                                         launches[0])
    config = configs[0]
    (_, k, signature, constexprs, attrs, options, _), = codegen.jobs_of([(kernel, args, consts, [config])])
    start = time.perf_counter()
    codegen._compile(k, signature, constexprs, attrs, options)
    compile_s = time.perf_counter() - start
    saved = runtime.driver._active
    runtime.driver.set_active(_FakeDriver())
    try:
        kernel.device_caches.clear()  # binders made before the fake driver
        start = time.perf_counter()
        compiled = kernel.run(*args, grid=None, warmup=True, **consts, **config.all_kwargs())
        jit_s = time.perf_counter() - start
    finally:
        runtime.driver._active = saved
    assert compiled is not None
    return compile_s, jit_s


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--parts", default=",".join(quick.PARTS), help=f"comma-separated, of {quick.PARTS}")
    p.add_argument("--compile", default=None, help="compile N (or 'all') distinct specialisations for sm_90")
    p.add_argument("--jobs", type=int, default=1, help="compile in this many processes")
    p.add_argument("--json", help="write the counts here")
    p.add_argument("--check-cache-hit", action="store_true",
                   help="compile one kernel, then check that Triton's JIT finds it in TRITON_CACHE_DIR")
    args = p.parse_args(argv)
    if args.check_cache_hit:
        compile_s, jit_s = check_cache_hit()
        hit = jit_s < min(1.0, compile_s / 4)
        print(f"cache hit check: compiled in {compile_s:.1f} s; the JIT then took {jit_s:.3f} s "
              f"({'HIT' if hit else 'MISS: it compiled again'})")
        return 0 if hit else 1
    parts = args.parts.split(",")
    start = time.perf_counter()
    recorded = record(parts)
    print(f"census of {parts} in {time.perf_counter() - start:.1f} s (triton {triton.__version__}, "
          f"torch {torch.__version__})")
    seen, summary, all_jobs, tuning = set(), {}, [], set()
    for part in parts:
        jobs = codegen.jobs_of(recorded[part])
        keys = [codegen.job_key(j) for j in jobs]
        new = [j for j, key in zip(jobs, keys) if key not in seen]
        seen |= set(keys)
        all_jobs += new
        part_tuning = {(rec[0].__name__, key) for rec in recorded[part]
                       for key in [tuning_key(*rec[:3])] if key is not None}
        tuning |= part_tuning
        by_kernel = collections.Counter(j[1].__name__ for j in new)
        summary[part] = dict(specs=len(jobs), new_specs=len(new), tuning_keys=len(part_tuning),
                             new_by_kernel=dict(by_kernel), launches=len(recorded[part]))
        print(f"  {part:10s} specialisations {len(jobs):4d} (new {len(new):4d}: {dict(by_kernel)}), "
              f"autotune keys {len(part_tuning):4d}, launches {len(recorded[part])}")
    print(f"  total distinct specialisations {len(all_jobs)}, autotune keys {len(tuning)}")
    result = dict(parts=summary, total_specs=len(all_jobs), total_tuning_keys=len(tuning),
                  triton=triton.__version__, torch=torch.__version__)
    if args.compile:
        todo = all_jobs if args.compile == "all" else all_jobs[:int(args.compile)]
        specs = [codegen.worker_spec(job) for job in todo]
        start = time.perf_counter()
        if args.jobs > 1:
            # spawn, not fork: forking a process that holds torch's threads can hang the children.
            with concurrent.futures.ProcessPoolExecutor(args.jobs,
                                                        mp_context=multiprocessing.get_context("spawn")) as pool:
                times = list(pool.map(_compile_job, specs))
        else:
            times = [_compile_job(s) for s in specs]
        ok = [t for _, t in times if isinstance(t, float)]
        wall = time.perf_counter() - start
        print(f"  compiled {len(ok)} of {len(times)} in {wall:.1f} s wall; per kernel "
              f"mean {sum(ok) / max(len(ok), 1):.1f} s, max {max(ok, default=0):.1f} s")
        for name, t in times:
            if not isinstance(t, float):
                print(f"  {name}: {t}")
        result["compile"] = dict(n=len(ok), wall_s=wall, mean_s=sum(ok) / max(len(ok), 1), max_s=max(ok, default=0))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)
    return result


if __name__ == "__main__":
    result = main()
    sys.exit(result if isinstance(result, int) else 0)
