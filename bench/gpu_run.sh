#!/usr/bin/env bash
# What a lent GPU runs, sized for its lease (15 minutes of device time in all, 10 minutes a
# command, 8 files back from $OUT). Run from anywhere; every part is its own process with its own
# timeout, every failure is logged and the run goes on, and every result file is written as its
# part goes (JSON lines, flushed), so a run cut off at its limit still returns what it finished.
#
#   bash bench/gpu_run.sh quick          # ~7 minutes from a cold machine: smoke, networks, stage profile
#   bash bench/gpu_run.sh full list      # the parts of the full run, one command (<= 10 min) each
#   bash bench/gpu_run.sh full tests-kernels
#
# Output: $OUT (the device tool's folder) or bench/results/<date>-<gpu>-<mode>/, at most 8 files:
# quick writes env.txt, log.txt, smoke.jsonl, networks.jsonl, stages.jsonl, firstcall.jsonl,
# report.md, speedup.png. `python3 bench/report.py DIR` rebuilds the table and plot from them.
#
# The device image is used as it is: `python3` with torch, triton, torchvision, pytest,
# pytest-benchmark; nothing is fetched. The package is installed in editable mode without
# network (or, if pip fails, made importable through PYTHONPATH). Compiled kernels, autotuning
# results and Inductor's cache go to .gpu_cache/ (ignored by git), which the device machine keeps
# between calls while it stays warm: a second call skips compilation.
set -uo pipefail
cd "$(dirname "$0")/.." || exit 1
REPO=$(pwd -P)  # physical: compared with the realpath Python reports
MODE=${1:-quick}
PART=${2:-}
T0=$(date +%s)

usage() { awk 'NR > 1 && /^#/ { sub(/^# ?/, ""); print; next } NR > 1 { exit }' "$0"; }
FULL_PARTS="tests-kernels tests-api tests-train blocks-bf16 blocks-fp16 blocks-fp32 blocks-compile-bf16 \
blocks-max-autotune-bf16 networks-bf16 networks-fp16 networks-fp32 networks-max-autotune reports train"
case "$MODE" in
  quick) ;;
  full)
    if [ -z "$PART" ] || [ "$PART" = list ]; then
      echo "parts of 'full' (bash bench/gpu_run.sh full PART, one device call each; see README):"
      for p in $FULL_PARTS; do echo "  $p"; done
      exit 0
    fi
    case " $FULL_PARTS " in *" $PART "*) ;; *) echo "unknown part '$PART'"; usage; exit 2 ;; esac ;;
  -h|--help|help) usage; exit 0 ;;
  *) echo "unknown mode '$MODE'"; usage; exit 2 ;;
esac

PY=python3
command -v "$PY" >/dev/null || PY=python
GPU=$(nvidia-smi --query-gpu=name --format=csv,noheader 2>/dev/null | head -1 | tr -c 'A-Za-z0-9_.\n-' '-')
GPU=${GPU:-no-gpu}
OUTDIR=${OUT:-bench/results/$(date +%Y%m%d-%H%M)-$GPU-$MODE${PART:+-$PART}}
mkdir -p "$OUTDIR"
OUTDIR=$(cd "$OUTDIR" && pwd)
LOG=$OUTDIR/log.txt
exec > >(tee -a "$LOG") 2>&1  # stdout (the device tool's output_tail) and log.txt
TEE_PID=$!

export PYTHONUNBUFFERED=1 TRITON_INTERPRET=0 FUSED_INCEPTION_DEVICE=cuda
export TRITON_CACHE_DIR=$REPO/.gpu_cache/triton TORCHINDUCTOR_CACHE_DIR=$REPO/.gpu_cache/inductor
export TRITON_CACHE_AUTOTUNING=1  # autotune results on disk: later parts and warm calls reuse them
mkdir -p "$TRITON_CACHE_DIR" "$TORCHINDUCTOR_CACHE_DIR"

SKIPPED=()
log() { echo "[gpu_run $(( $(date +%s) - T0 ))s] $*"; }

# run_part NAME LIMIT_S CMD...: CMD under `timeout`, at most LIMIT_S and never past $DEADLINE;
# logs its exit status and time; a part with under 15 s left is skipped (and listed at the end).
# PART_DEADLINE (Unix time) is exported for the part to skip what it cannot finish.
run_part() {
  local name=$1 limit=$2; shift 2
  local now left start rc
  now=$(date +%s); left=$(( DEADLINE - now ))
  [ "$limit" -gt "$left" ] && limit=$left
  if [ "$limit" -lt 15 ]; then
    log "SKIPPED $name: no time left"; SKIPPED+=("$name"); return 0
  fi
  export PART_DEADLINE=$(( now + limit - 5 ))
  log "START $name (limit ${limit}s)"
  start=$(date +%s)
  timeout -k 10 "$limit" "$@"
  rc=$?
  case $rc in
    0) log "END $name: ok in $(( $(date +%s) - start ))s" ;;
    124|137) log "END $name: TIMED OUT after ${limit}s (what it wrote so far is kept)" ;;
    *) log "END $name: exit $rc in $(( $(date +%s) - start ))s" ;;
  esac
  return $rc
}

# A quick.py part, started again with --resume after a CUDA error (exit 3 poisons the process).
run_quick_part() {
  local name=$1 limit=$2; shift 2
  local tries=0 rc
  run_part "$name" "$limit" "$PY" bench/quick.py "$@" --out "$OUTDIR"
  rc=$?
  while [ $rc -eq 3 ] && [ $tries -lt 3 ]; do
    tries=$((tries + 1))
    run_part "$name (resumed $tries)" "$limit" "$PY" bench/quick.py "$@" --out "$OUTDIR" --resume
    rc=$?
  done
}

# The package, installed without network: editable install with the image's setuptools; else
# fused_inception.kernels made resolvable by a symlink (ignored by git) and the repo on PYTHONPATH.
install_package() {
  local check="import fused_inception.kernels.conv as k, os; print(os.path.realpath(k.__file__))"
  if (cd / && "$PY" -c "$check" 2>/dev/null) | grep -q "^$REPO/kernels/conv.py$"; then
    log "install: already importable from $REPO"; return 0
  fi
  if timeout 180 "$PY" -m pip install -q --no-deps --no-build-isolation --no-index --disable-pip-version-check \
      -e . 2>&1 | tail -5 && (cd / && "$PY" -c "$check" 2>/dev/null) | grep -q "^$REPO/kernels/conv.py$"; then
    log "install: pip install -e . (editable, no network) ok"; return 0
  fi
  log "install: pip failed; fallback: symlink fused_inception/kernels -> ../kernels and PYTHONPATH=$REPO"
  [ -e fused_inception/kernels ] || ln -s ../kernels fused_inception/kernels
  export PYTHONPATH=$REPO${PYTHONPATH:+:$PYTHONPATH}
  if (cd / && "$PY" -c "$check") | grep -q "^$REPO/kernels/conv.py$"; then
    log "install: fallback ok"; return 0
  fi
  log "install: FAILED: fused_inception.kernels cannot be imported"; return 1
}

write_env() {
  {
    echo "# $MODE ${PART} run, $(date -u +%Y-%m-%dT%H:%M:%SZ), git $(git rev-parse --short HEAD 2>/dev/null)" \
         "$(git status --porcelain 2>/dev/null | grep -qv '^??' && echo '(uncommitted changes)')"
    nvidia-smi 2>&1
    nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm,clocks.sm,power.limit --format=csv 2>&1
    "$PY" - <<'EOF' 2>&1
import platform, torch, triton, os
print("python", platform.python_version(), "torch", torch.__version__, "cuda", torch.version.cuda,
      "cudnn", torch.backends.cudnn.version(), "triton", triton.__version__)
try:
    import torchvision; print("torchvision", torchvision.__version__)
except Exception as e: print("torchvision:", e)
if torch.cuda.is_available():
    p = torch.cuda.get_device_properties(0)
    print("device", p.name, "capability", f"{p.major}.{p.minor}", "SMs", p.multi_processor_count,
          "memory GiB", round(p.total_memory / 2**30, 1))
else:
    print("torch sees no CUDA device")
print("cpus", os.cpu_count())
print("TRITON_CACHE_DIR", os.environ.get("TRITON_CACHE_DIR"), "entries",
      len(os.listdir(os.environ["TRITON_CACHE_DIR"])) if os.path.isdir(os.environ.get("TRITON_CACHE_DIR", "")) else 0)
EOF
  } > "$OUTDIR/env.txt"
  grep -E "^(python|device|torch sees|TRITON_CACHE_DIR)" "$OUTDIR/env.txt"
}

finish() {
  log "done in $(( $(date +%s) - T0 ))s; skipped parts: ${SKIPPED[*]:-none}; files in $OUTDIR:"
  ls -la "$OUTDIR" | tail -n +2
  exec 1>&- 2>&-  # let tee write its last lines to log.txt before the command returns
  wait "$TEE_PID" 2>/dev/null
}

# ------------------------------------------------------------------------------------------
if [ "$MODE" = quick ]; then
  # The whole command ends by QUICK_BUDGET seconds (default 410: ~7 minutes), the report included.
  DEADLINE=$(( T0 + ${QUICK_BUDGET:-410} - 25 ))
  log "quick run: $OUTDIR, deadline in $(( DEADLINE - T0 ))s (+25s for the report)"
  install_package || { write_env; finish; exit 1; }
  write_env
  # Compile every kernel the parts will need on the CPU cores (16 there) while the smoke uses
  # the GPU: bench/kernel_census.py records the launches on the meta device and fills Triton's
  # cache with exactly the JIT's keys. A miss costs nothing but this step's CPU time.
  if [ "${QUICK_PRECOMPILE:-1}" = 1 ]; then
    JOBS=$(( $(nproc) > 4 ? $(nproc) - 2 : 2 ))
    ( run_part precompile 120 "$PY" bench/kernel_census.py --compile all --jobs "$JOBS" 2>&1 \
        | sed -u 's/^/[precompile] /' ) &
    PRECOMPILE_PID=$!
  fi
  run_quick_part smoke 170 smoke
  [ -n "${PRECOMPILE_PID:-}" ] && wait "$PRECOMPILE_PID"
  run_quick_part networks-googlenet 150 networks --network googlenet
  run_quick_part stages 60 stages
  # Time to the first fused forward, GoogLeNet bf16 batch 32: fused_inception.warmup in a fresh
  # process with an empty Triton cache (cold: every variant compiled in parallel, then tuned),
  # then in a second process with that cache and the autotuner's picks on disk (warm).
  FIRST_CACHE=$REPO/.gpu_cache/first-forward-$$
  for run in cold warm; do
    run_part "first-forward $run" 90 env TRITON_CACHE_DIR="$FIRST_CACHE" "$PY" -m fused_inception.precompile \
      --model googlenet --dtype bf16 --batch 32 --json "$OUTDIR/firstcall.jsonl" --label "$run"
  done
  rm -rf "$FIRST_CACHE"
  run_quick_part networks-inception_v3 400 networks --network inception_v3
  DEADLINE=$(( DEADLINE + 25 ))
  run_part report 25 "$PY" bench/report.py "$OUTDIR" --plot "$OUTDIR/speedup.png" --out "$OUTDIR/report.md"
  finish
  exit 0
fi

# ------------------------------------------------------------------------------------------
# full: one part per call, each under 10 minutes (570 s here, leaving the start and transfers).
DEADLINE=$(( T0 + ${FULL_BUDGET:-570} ))
install_package || { write_env; finish; exit 1; }
write_env
JOBS=$(( $(nproc) > 4 ? $(nproc) - 4 : 1 ))

# The CUDA test suite in parallel processes (compiles dominate: each worker compiles on its own
# core); pytest-timeout keeps one stuck test from eating the part.
run_tests() {
  local name=$1; shift
  # Parallel workers time their autotuning against each other: keep those picks off the disk
  # cache that the timed parts read.
  TRITON_CACHE_AUTOTUNING=0 run_part "$name" 560 "$PY" -m pytest -p no:cacheprovider -q -rs -n "$JOBS" --timeout 300 \
    --junitxml="$OUTDIR/junit.xml" "$@" 2>&1 | tee "$OUTDIR/pytest.txt" | tail -40
}
# A pytest-benchmark suite, every result appended to bench.jsonl as it finishes (the JSON file
# pytest-benchmark writes comes only at the end); FI_BENCH_* select the cases (bench/cases.py).
run_bench() {
  local name=$1; shift
  run_part "$name" 560 "$PY" -m pytest -p no:cacheprovider -q -rs bench --bench-jsonl="$OUTDIR/bench.jsonl" \
    --benchmark-json="$OUTDIR/bench.json" "$@" 2>&1 | tee "$OUTDIR/bench.txt" | tail -40
}

case "$PART" in
  tests-kernels) run_tests "$PART" tests/test_stage_kernel.py tests/test_inception_block.py tests/test_googlenet.py \
                   tests/test_inception_v3.py tests/test_inception_resnet_v4.py tests/test_hardening.py ;;
  tests-api) run_tests "$PART" tests/test_autocast.py tests/test_bad_input.py tests/test_plan_cache.py \
               tests/test_compile.py tests/test_fuse.py tests/test_report.py ;;
  tests-train) run_tests "$PART" tests/test_training.py tests/test_training_network.py tests/test_distributed.py ;;
  blocks-bf16|blocks-fp16|blocks-fp32)
    FI_BENCH_DTYPES=${PART#blocks-} FI_BENCH_IMPLS=eager,fused,fused-cudagraph run_bench "$PART" -k test_block ;;
  blocks-compile-bf16)
    FI_BENCH_DTYPES=bf16 FI_BENCH_IMPLS=compile-default,compile-reduce-overhead run_bench "$PART" -k test_block ;;
  blocks-max-autotune-bf16)
    FI_BENCH_DTYPES=bf16 FI_BENCH_IMPLS=compile-max-autotune run_bench "$PART" -k test_block ;;
  networks-bf16|networks-fp16|networks-fp32)
    FI_BENCH_DTYPES=${PART#networks-} FI_BENCH_IMPLS=eager,fused,fused-cudagraph,compile-default,compile-reduce-overhead \
      run_bench "$PART" -k test_network ;;
  networks-max-autotune)
    FI_BENCH_DTYPES=bf16 FI_BENCH_IMPLS=compile-max-autotune run_bench "$PART" -k test_network ;;
  reports)
    # The fusion reports, GoogLeNet 224 and Inception v3 299: fp32 NCHW and bf16 channels_last, batch 1/32/256.
    for model in googlenet inception_v3; do
      for batch in 1 32 256; do
        for variant in "--dtype float32" "--dtype bfloat16 --channels-last"; do
          echo "## $model batch $batch $variant" >> "$OUTDIR/reports.md"
          # shellcheck disable=SC2086
          run_part "report $model b$batch $variant" 120 "$PY" -m fused_inception --model "$model" --device cuda \
            --batch "$batch" $variant >> "$OUTDIR/reports.md" 2>&1
        done
      done
    done
    tail -40 "$OUTDIR/reports.md" ;;
  train)
    # The timed training step (eager, torch.compile, fused), then the example run (loss must go down).
    run_bench "train-bench" -k test_googlenet_training_step
    for impl in fused eager; do
      run_part "train_step $impl" 120 "$PY" bench/train_step.py --impl "$impl" --device cuda --batch 64 --size 224 \
        --amp bf16 --channels-last --steps 10 2>&1 | tee -a "$OUTDIR/train-step.txt"
    done ;;
esac
if [ -s "$OUTDIR/bench.jsonl" ] && [ "$(( DEADLINE - $(date +%s) ))" -gt 20 ]; then
  "$PY" bench/report.py "$OUTDIR" --out "$OUTDIR/report.md" && tail -30 "$OUTDIR/report.md"
fi
finish
