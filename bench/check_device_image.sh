#!/usr/bin/env bash
# Check the library against the GPU machine's image (Python 3.12, torch 2.11, triton 3.6,
# torchvision 0.26) on this CPU machine, before a lease is spent finding out. NOT part of CI:
# it needs a virtual environment of those versions (several GB; made once from PyPI if missing).
#
#   bash bench/check_device_image.sh [VENV]     # default VENV: /tmp/devimg
#
# In a copy of the working tree (tracked and untracked-not-ignored files), with that venv's
# python as `python3`: the no-network editable install gpu_run.sh makes (and its no-pip
# fallback), the fusion report through the interpreter, a few test files, the stage kernel
# compiled for sm_90 by that Triton and its marks checked, the quick run's parts on CPU, the census and its JIT cache
# hit, the report with its plot, and gpu_run.sh's quick flow without a GPU. Prints PASS/FAIL per step.
set -uo pipefail
REPO=$(cd "$(dirname "$0")/.." && pwd)
VENV=${1:-/tmp/devimg}
PY312=${PY312:-/root/.pyenv/versions/3.12.1/bin/python}

if [ ! -x "$VENV/bin/python" ]; then
  echo "creating $VENV (Python 3.12 + the device image's versions; the CUDA torch wheel is large)"
  "$PY312" -m venv "$VENV" || exit 1
  "$VENV/bin/python" -m pip install --progress-bar off "torch==2.11.*" "triton==3.6.*" "torchvision==0.26.*" \
    timm pytest pytest-benchmark numpy matplotlib setuptools wheel || exit 1
fi

WORK=$(mktemp -d /tmp/devimg-check.XXXXXX)
COPY=$WORK/repo
mkdir -p "$COPY"
(cd "$REPO" && git ls-files -co --exclude-standard -z | xargs -0 -I{} cp --parents {} "$COPY/")
export PATH=$VENV/bin:$PATH  # python3 and python are the venv's, as on the device
export PYTHONUNBUFFERED=1
export TRITON_CACHE_DIR=$WORK/triton-cache  # a fresh cache: every compile really happens
unset PYTHONPATH FUSED_INCEPTION_DEVICE TRITON_INTERPRET
cd "$COPY" || exit 1
echo "copy of $(git -C "$REPO" rev-parse --short HEAD) (+ uncommitted files) in $COPY; logs in $WORK"

RESULTS=()
step() {  # step NAME TIMEOUT CMD...: run, log to $WORK/NAME.log, record PASS/FAIL
  local name=$1 limit=$2; shift 2
  local start rc
  start=$(date +%s)
  timeout "$limit" "$@" > "$WORK/$name.log" 2>&1
  rc=$?
  local verdict=PASS
  [ $rc -ne 0 ] && verdict="FAIL (exit $rc)"
  RESULTS+=("$(printf '%-22s %-14s %4ss' "$name" "$verdict" $(( $(date +%s) - start )))")
  echo "${RESULTS[-1]}"
  [ $rc -ne 0 ] && tail -15 "$WORK/$name.log" | sed 's/^/    /'
  return 0
}

step versions 120 python3 -c "import sys, torch, triton, torchvision, pytest, pytest_benchmark, setuptools
print(sys.version.split()[0], 'torch', torch.__version__, 'triton', triton.__version__, 'torchvision',
      torchvision.__version__, 'setuptools', setuptools.__version__, 'pytest', pytest.__version__)"
cat "$WORK/versions.log"
# The no-pip fallback first, in a second copy (before the editable install makes it moot).
cp -r "$COPY" "$WORK/fallback"
step install-fallback 120 bash -c "cd '$WORK/fallback' && ln -s ../kernels fused_inception/kernels &&
  cd / && PYTHONPATH='$WORK/fallback' python3 -c 'import fused_inception.kernels.conv as k; print(k.__file__)'"
step install-editable 300 bash -c "python3 -m pip install -q --no-deps --no-build-isolation --no-index \
  --disable-pip-version-check -e . && cd / && python3 -c 'import fused_inception.kernels.conv as k, os
assert os.path.realpath(k.__file__) == \"$COPY/kernels/conv.py\", k.__file__; print(k.__file__)'"
# The interpreter with the venv's own NumPy. Triton 3.6's interpreter calls int() on a
# one-element array for `range(runtime scalar)`, which NumPy >= 2.4 refuses ("only 0-dimensional
# arrays can be converted to Python scalars"; Triton 3.8 squeezes first). The device image has
# NumPy 2.5, so `--device cpu` runs fail there; GPU runs don't use the interpreter.
step interp-own-numpy 900 python3 -m fused_inception
python3 -c "import numpy, triton; v = lambda s: tuple(int(p) for p in s.split('.')[:2])
exit(0 if v(numpy.__version__) >= (2, 4) and v(triton.__version__) < (3, 7) else 1)" \
  && RESULTS[-1]="${RESULTS[-1]}  (expected: NumPy >= 2.4 with Triton < 3.7)"
# The CPU-interpreter steps again with NumPy 2.3 in front (pip --target, outside the repo), to
# check everything else against torch 2.11 / triton 3.6.
NP23=${NP23:-$VENV-numpy23}
[ -d "$NP23/numpy" ] || python3 -m pip install -q --target "$NP23" "numpy==2.3.*"
step report-cli 900 env PYTHONPATH="$NP23" python3 -m fused_inception
step tests 1800 env PYTHONPATH="$NP23" python3 -m pytest -q -p no:cacheprovider -x tests/test_interpreter.py tests/test_inception_block.py \
  tests/test_packaging.py tests/test_stage_kernel.py tests/test_bench_report.py tests/test_bench_census.py \
  tests/test_compile.py tests/test_export.py tests/test_gpu_paths.py
step sm90-codegen 2400 python3 -m pytest -q -p no:cacheprovider tests/test_codegen.py
step quick-smoke-cpu 900 env PYTHONPATH="$NP23" python3 bench/quick.py smoke --device cpu --out "$WORK/quick" \
  --blocks googlenet-3a,v3-C,irv2-block35
step quick-stages-cpu 900 env PYTHONPATH="$NP23" python3 bench/quick.py stages --device cpu --out "$WORK/quick" \
  --stage-blocks inception3a,inception5b
step census 900 python3 bench/kernel_census.py --json "$WORK/census.json"
step census-cache-hit 600 env TRITON_CACHE_DIR="$WORK/triton-cache-hit" python3 bench/kernel_census.py --check-cache-hit
step report-plot 120 python3 bench/report.py tests/data/fake_quick_run --plot "$WORK/speedup.png"
step gpu_run-flow 600 env OUT="$WORK/gpu_run" QUICK_PRECOMPILE=0 QUICK_BUDGET=200 bash bench/gpu_run.sh quick

echo
echo "device image check ($VENV; logs in $WORK):"
printf '  %s\n' "${RESULTS[@]}"
grep -h "census of\|total distinct\|cache hit check" "$WORK/census.log" "$WORK/census-cache-hit.log" 2>/dev/null
