"""What the quick GPU run will compile, counted without a GPU (and optionally compiled for sm_90).

    python bench/kernel_census.py                      # count, per part of `gpu_run.sh quick`
    python bench/kernel_census.py --compile 4          # + compile 4 of them for sm_90, timed
    python bench/kernel_census.py --compile all --jobs 16 --parts networks   # precompile (cache)

Every Triton launch the library makes goes through `JITFunction.run` (plain kernels) or
`Autotuner.run` (autotuned ones). Both are replaced here by recorders that compute the JIT's own
specialisation key (argument types, 16-byte alignment, integers equal to 1 or divisible by 16,
constexprs, num_warps/num_stages) for a Hopper target, as the JIT would on an H200, and launch
nothing; an autotuned launch records its tuning key and one specialisation per config (what the
autotuner compiles and benchmarks). The models run on the `meta` device: shapes only, so whole
networks at batch 256 cost nothing.

So: compiles = distinct specialisations; autotune benchmarks = distinct (kernel, tuning key)
pairs, each timing every config (~0.1-0.2 s a config with do_bench's defaults).

`--compile N|all` compiles the first N (or all) distinct specialisations with `triton.compile`
exactly as `JITFunction._do_compile` does (same source, signature, constexprs, attributes and
options; target sm_90), timing each: on this CPU that measures compile cost; with
TRITON_CACHE_DIR set it also fills Triton's cache, which the JIT on an sm_90 GPU reads with the
same key (an idea for the device's 16 cores: `--jobs 16` before the timed parts).

Not part of CI: a planning tool. Run with TRITON_INTERPRET unset (it sets 0 itself).
"""

import argparse
import collections
import concurrent.futures
import json
import multiprocessing
import os
import sys
import time

os.environ["TRITON_INTERPRET"] = "0"  # the real JITFunction, not the interpreter's
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import torch  # noqa: E402
import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.runtime.autotuner import Autotuner  # noqa: E402
from triton.runtime.jit import JITFunction, create_function_from_signature  # noqa: E402

TARGET = GPUTarget("cuda", 90, 32)  # an H100/H200: what driver.active.get_current_target() returns there


class Recorder:
    """Replaces JITFunction.run / Autotuner.run while active; collects what would compile."""

    def __init__(self, on_new_spec=None):
        from triton.compiler.compiler import make_backend

        self.on_new_spec = on_new_spec  # called (index, key, entry) as each new specialisation appears
        self.backend = make_backend(TARGET)
        self.binders = {}
        self.specs = collections.OrderedDict()  # cache key -> (fn, bound_args, specialization, options, kwargs)
        self.tuning = collections.Counter()  # (kernel name, tuning key) -> launches
        self.launches = collections.Counter()  # kernel name -> launches
        self.part = None
        self.tuned_specs = set()  # keys of specialisations reached through an autotuner
        self.per_part = collections.defaultdict(lambda: {"specs": set(), "tuning": set()})

    def _jit_run(self, fn, args, kwargs, count=True):
        from triton import knobs

        kwargs = dict(kwargs)
        kwargs.pop("grid", None)
        kwargs.pop("warmup", None)
        kwargs["debug"] = kwargs.get("debug", fn.debug) or knobs.runtime.debug
        kwargs["instrumentation_mode"] = knobs.compilation.instrumentation_mode
        if fn not in self.binders:
            self.binders[fn] = create_function_from_signature(fn.signature, fn.params, self.backend)
        bound_args, specialization, options = self.binders[fn](*args, **kwargs)
        key = (fn.fn.__qualname__, str(specialization), str(options))
        if key not in self.specs:
            self.specs[key] = (fn, bound_args, specialization, options, kwargs)
            if self.on_new_spec is not None:
                self.on_new_spec(len(self.specs) - 1, key, self.specs[key])
        self.per_part[self.part]["specs"].add(key)
        if count:
            self.launches[fn.fn.__qualname__] += 1
        else:
            self.tuned_specs.add(key)

    def _tune_run(self, tuner, args, kwargs):
        nargs = dict(zip(tuner.arg_names, args))
        all_args = {**nargs, **kwargs}
        _args = {k: v for k, v in all_args.items() if k in tuner.arg_names}
        key = [_args[k] for k in tuner.keys if k in _args]
        key += [str(a.dtype) for a in _args.values() if hasattr(a, "dtype")]
        name = _base(tuner).fn.__qualname__
        tkey = (name, tuple(str(k) for k in key))
        self.tuning[tkey] += 1
        self.per_part[self.part]["tuning"].add(tkey)
        self.launches[name] += 1
        tuner.nargs = nargs
        configs = tuner.prune_configs(kwargs) if len(tuner.configs) > 1 else tuner.configs
        tuner.nargs = None
        for config in configs:
            _dispatch(self, tuner.fn, args, dict(kwargs, **config.all_kwargs()), count=False)

    def __enter__(self):
        self._saved = (JITFunction.run, Autotuner.run)
        rec = self

        def jit_run(fn, *args, **kwargs):
            rec._jit_run(fn, args, kwargs)

        def tune_run(tuner, *args, **kwargs):
            rec._tune_run(tuner, args, kwargs)

        JITFunction.run, Autotuner.run = jit_run, tune_run
        return self

    def __exit__(self, *exc):
        JITFunction.run, Autotuner.run = self._saved


def _base(fn):
    while not isinstance(fn, JITFunction):
        fn = fn.fn
    return fn


def _dispatch(rec, fn, args, kwargs, count=True):
    """Run `fn` (a JITFunction or a wrapper such as Heuristics) as the recorder sees it."""
    if isinstance(fn, JITFunction):
        rec._jit_run(fn, args, kwargs, count)
    else:
        fn.run(*args, **kwargs)


def compile_spec(entry):
    """Compile one recorded specialisation for sm_90 as JITFunction._do_compile does; seconds."""
    fn, bound_args, specialization, options, kwargs = entry
    from triton.compiler import ASTSource
    from triton.compiler.compiler import make_backend

    backend = make_backend(TARGET)
    options, signature, constexprs, attrs = fn._pack_args(backend, kwargs, bound_args, specialization, options)
    start = time.perf_counter()
    triton.compile(ASTSource(fn, signature, constexprs, attrs), target=TARGET, options=options.__dict__)
    return time.perf_counter() - start


def _force_kernel_path():
    """CPU/meta tensors take the kernel path (launches are recorded, never run)."""
    from fused_inception import blocks

    blocks.triton_available_for = lambda x: True
    # Autocast has no `meta` device type: asked about it, answer as for a device without autocast.
    for name in ("is_autocast_enabled", "get_autocast_dtype"):
        original = getattr(torch, name)

        def wrapper(*args, _original=original, _name=name):
            if args and args[0] == "meta":
                return False if _name == "is_autocast_enabled" else torch.float32
            return _original(*args)

        setattr(torch, name, wrapper)


def census(parts, rec, limit=None):
    """Drive the quick run's workloads on the meta device, part by part (the first `limit` of each)."""
    import itertools

    import quick

    _force_kernel_path()
    for part in parts:
        rec.part = part
        for what, run in itertools.islice(quick.workloads(part, device="meta"), limit):
            try:
                with torch.no_grad() if not what.startswith("train") else _nullcontext():
                    run()
            except Exception as e:  # noqa: BLE001 - a workload the meta device can't run is reported
                print(f"  {part}: {what}: not counted ({type(e).__name__}: {str(e)[:120]})", file=sys.stderr)


class _nullcontext:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def _compile_worker(args):
    """Process-pool worker: run the census and compile each specialisation with index % jobs ==
    rank as soon as it is recorded (the smoke's first, while the device run starts the smoke)."""
    parts, rank, jobs, limit = args
    os.environ.setdefault("TRITON_INTERPRET", "0")
    times = []

    def compile_mine(i, key, entry):
        if i % jobs != rank or (limit is not None and i >= limit):
            return
        try:
            times.append((key[0], compile_spec(entry)))
        except Exception as e:  # noqa: BLE001 - reported, the others go on
            times.append((key[0], f"failed: {type(e).__name__}: {str(e)[:200]}"))

    rec = Recorder(on_new_spec=compile_mine)
    with rec:
        census(parts, rec)
    return times


class _FakeDriver:
    """Enough of an sm_90 CUDA driver for JITFunction.run(..., warmup=True): compile, never launch."""

    def get_current_device(self):
        return 0

    def get_current_stream(self, device=None):
        return 0

    def get_current_target(self):
        return TARGET

    def is_active(self):
        return True


def check_cache_hit(part="smoke"):
    """Compile one recorded specialisation here, then ask Triton's own JIT (warmup=True, a fake
    sm_90 driver) for the same launch: it must find it in TRITON_CACHE_DIR instead of compiling.
    Returns (compile seconds, JIT seconds). This is what makes the device-side precompile count."""
    import triton.runtime as runtime

    rec = Recorder()
    with rec:
        census([part], rec, limit=3)
    # A plain (not autotuned) kernel if there is one: the training BatchNorm kernels compile fastest.
    plain = [k for k in rec.specs if k not in rec.tuned_specs] or list(rec.specs)
    fn, bound_args, specialization, options, kwargs = rec.specs[plain[0]]
    compile_s = compile_spec(rec.specs[plain[0]])
    saved = runtime.driver._active
    runtime.driver.set_active(_FakeDriver())
    try:
        fn.device_caches.clear()  # binders made before the fake driver
        names = {p.name for p in fn.params}
        start = time.perf_counter()
        kernel = JITFunction.run(fn, *bound_args.values(), grid=None, warmup=True,
                                 **{k: v for k, v in kwargs.items() if k not in names})
        jit_s = time.perf_counter() - start
    finally:
        runtime.driver._active = saved
    assert kernel is not None
    return compile_s, jit_s


def main(argv=None):
    import quick

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
        print(f"cache hit check: compiled in {compile_s:.1f} s; the JIT then took {jit_s:.3f} s "
              f"({'HIT' if jit_s < min(1.0, compile_s / 4) else 'MISS: it compiled again'})")
        return 0 if jit_s < min(1.0, compile_s / 4) else 1
    parts = args.parts.split(",")
    limit = None if args.compile in (None, "all") else int(args.compile)
    pool = futures = None
    compile_start = time.perf_counter()
    if args.compile and args.jobs > 1:
        # The workers first, so they compile while this process counts. spawn, not fork: forking a
        # process that holds torch's threads can hang the children.
        pool = concurrent.futures.ProcessPoolExecutor(args.jobs, mp_context=multiprocessing.get_context("spawn"))
        futures = [pool.submit(_compile_worker, (parts, r, args.jobs, limit)) for r in range(args.jobs)]
    rec = Recorder()
    start = time.perf_counter()
    with rec:
        census(parts, rec)
    print(f"census of {parts} in {time.perf_counter() - start:.1f} s (triton {triton.__version__}, "
          f"torch {torch.__version__})")
    seen = set()
    summary = {}
    for part in parts:
        specs, tuning = rec.per_part[part]["specs"], rec.per_part[part]["tuning"]
        new = specs - seen
        seen |= specs
        by_kernel = collections.Counter(k[0] for k in new)
        summary[part] = dict(specs=len(specs), new_specs=len(new), tuning_keys=len(tuning),
                             new_by_kernel=dict(by_kernel))
        print(f"  {part:10s} specialisations {len(specs):4d} (new {len(new):4d}: {dict(by_kernel)}), "
              f"autotune keys {len(tuning):4d}")
    print(f"  total distinct specialisations {len(rec.specs)}, autotune keys {len(rec.tuning)}, "
          f"launches recorded {dict(rec.launches)}")
    result = dict(parts=summary, total_specs=len(rec.specs), total_tuning_keys=len(rec.tuning),
                  triton=triton.__version__, torch=torch.__version__)
    if args.compile:
        start = compile_start
        if pool is not None:
            with pool:
                times = [t for f in futures for t in f.result()]
        else:
            times = []
            for i, (key, entry) in enumerate(rec.specs.items()):
                if limit is not None and i >= limit:
                    break
                t = compile_spec(entry)
                print(f"  compiled {key[0]} #{i}: {t:.1f} s", flush=True)
                times.append((key[0], t))
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
    main()
