"""bench/kernel_census.py: what the quick GPU run compiles, counted without a GPU, and the
precompile it feeds: a kernel compiled here must be found by Triton's own JIT (same cache key),
else precompiling on the device's spare cores would save nothing."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
CENSUS = REPO / "bench" / "kernel_census.py"


def run_census(tmp_path, *args):
    try:
        import triton.backends.nvidia  # noqa: F401
    except ImportError:
        pytest.skip("this Triton build has no NVIDIA backend to compile with")
    env = {k: v for k, v in os.environ.items() if k not in ("FUSED_INCEPTION_DEVICE", "TRITON_INTERPRET")}
    env["TRITON_CACHE_DIR"] = str(tmp_path / "triton-cache")
    return subprocess.run([sys.executable, str(CENSUS), *args], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=600)


def test_census_counts_the_stage_profile(tmp_path):
    out = tmp_path / "census.json"
    r = run_census(tmp_path, "--parts", "stages", "--json", str(out))
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    counts = json.loads(out.read_text())
    stages = counts["parts"]["stages"]
    # GoogLeNet's 21 stages at batch 256 in bf16: some kernels to compile, and at most one
    # tuning key per stage (one launch each).
    assert stages["specs"] > 0, counts
    assert 0 < stages["tuning_keys"] <= 21, counts
    assert "not counted" not in r.stderr, r.stderr[-2000:]


def test_precompiled_kernel_is_a_jit_cache_hit(tmp_path):
    r = run_census(tmp_path, "--check-cache-hit")
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert "(HIT)" in r.stdout, r.stdout
