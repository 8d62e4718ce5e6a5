"""Time to the first fused forward: kernels compiled ahead in parallel (fused_inception.warmup),
the autotuner's picks remembered across processes (kernels.tuning).

The picks are driven through a StageLaunch on CPU tensors with Triton's autotuner replaced by a
stand-in (as tests/test_gpu_paths.py does): the GPU path of a first launch, without a GPU.
The compile-ahead test compiles for sm_90 in a subprocess without the interpreter."""

import json
import os
import subprocess
import sys

import pytest
import torch

from fused_inception import FusedInception, count_launches, warmup
from fused_inception.kernels import conv as kconv
from fused_inception.kernels import tuning
from test_gpu_paths import _Jit, _Kernel, _Tuner, _launch


@pytest.fixture
def picks_dir(tmp_path, monkeypatch):
    """Picks kept under a fresh Triton cache directory, nothing remembered from before."""
    monkeypatch.setattr(tuning, "cache_dir", lambda: str(tmp_path))
    monkeypatch.setenv("FUSED_INCEPTION_TUNING", "1")
    tuning.forget()
    yield tmp_path
    tuning.forget()


def _gpu_path(monkeypatch, best):
    """A fresh launch whose first call goes through the GPU path: (call, tuner, jit)."""
    kernel = _Kernel()
    tuner, jit = _Tuner(kernel, best), _Jit(kernel)
    monkeypatch.setattr(kconv, "INTERPRETING", False)
    monkeypatch.setattr(kconv, "_eval_tuner", tuner)
    monkeypatch.setattr(kconv.StageLaunch, "kernel", jit)
    _, x, call = _launch()
    return lambda: call(x), tuner, jit


def _config(name):
    return kconv.CONFIGS[kconv.CONFIG_NAMES.index(name)]


def test_a_pick_is_remembered_across_processes(picks_dir, monkeypatch):
    """The first process tunes (the benchmark runs) and writes its pick; a second one (nothing
    in memory) reads it and launches under it without benchmarking."""
    first, tuner, _ = _gpu_path(monkeypatch, _config("m64n128k64w4s4"))
    first()
    assert tuner.runs == 1
    (path,) = (picks_dir / "fused_inception").glob("tuning-*.json")
    data = json.loads(path.read_text())
    assert data["gpu"] == "cpu" and data["triton"] and list(data["picks"].values()) == ["m64n128k64w4s4"]
    tuning.forget()  # (a new process)
    second, tuner, jit = _gpu_path(monkeypatch, _config("m64n64k64w4s3"))
    second()
    assert tuner.runs == 0 and jit.configs == [(64, 128, 4)]


def test_a_pick_for_another_gpu_or_triton_is_not_used(picks_dir, monkeypatch):
    first, tuner, _ = _gpu_path(monkeypatch, _config("m64n128k64w4s4"))
    first()
    for what, patch in (("gpu", lambda: monkeypatch.setattr(tuning, "device_name", lambda d: "NVIDIA H200")),
                        ("triton", lambda: monkeypatch.setattr(tuning.triton, "__version__", "9.9.9"))):
        patch()
        tuning.forget()
        again, tuner, jit = _gpu_path(monkeypatch, _config("m64n64k64w4s3"))
        again()
        assert tuner.runs == 1 and jit.configs == [], what  # tuned again


def test_a_corrupt_or_foreign_file_is_ignored_and_rewritten(picks_dir, monkeypatch):
    first, _, _ = _gpu_path(monkeypatch, _config("m64n128k64w4s4"))
    first()
    (path,) = (picks_dir / "fused_inception").glob("tuning-*.json")
    good = json.loads(path.read_text())
    for bad in ('{"format": 1, "gpu": "cpu", "picks": {', json.dumps(dict(good, gpu="other")),
                json.dumps(dict(good, picks={"k": 3}))):
        path.write_text(bad)
        tuning.forget()
        again, tuner, _ = _gpu_path(monkeypatch, _config("m128n64k64w4s4"))
        with pytest.warns(UserWarning, match="ignoring the autotuning picks"):
            again()
        assert tuner.runs == 1
        assert list(json.loads(path.read_text())["picks"].values()) == ["m128n64k64w4s4"]  # rewritten, valid


def test_pinned_and_disabled_launches_leave_the_picks_alone(picks_dir, monkeypatch):
    call, tuner, jit = _gpu_path(monkeypatch, _config("m64n128k64w4s4"))
    try:
        kconv.pin_config("m128n128k64w8s3")
        call()
    finally:
        kconv.pin_config(None)
    assert tuner.runs == 0 and jit.configs == [(128, 128, 8)]
    assert not (picks_dir / "fused_inception").exists()
    monkeypatch.setenv("FUSED_INCEPTION_TUNING", "0")
    call, tuner, _ = _gpu_path(monkeypatch, _config("m64n128k64w4s4"))
    call()
    assert tuner.runs == 1 and not (picks_dir / "fused_inception").exists()


def test_warmup_under_the_interpreter_builds_the_plans_and_compiles_nothing(device):
    """Under the interpreter there is nothing to compile: warmup builds the plans, so the first
    forward finds them, and its outputs are the same."""
    block = FusedInception(24, 8, 8, 16, 4, 8, 8).eval().to(device)
    x = torch.randn(2, 24, 6, 6, device=device)
    report = warmup(block, x)
    assert report.compiled == 0 and block._program._plans, report
    with torch.no_grad(), count_launches() as n:
        y = block(x)
    assert n.value == 2 and torch.allclose(y, block.eager_forward(x), atol=1e-4)


SCRIPT = r"""
import json, os, sys, time
import torch
from fused_inception import FusedInception, codegen, warmup
torch.manual_seed(0)
block = FusedInception(32, 16, 16, 32, 8, 16, 16).eval().to(torch.bfloat16)
x = torch.randn(4, 32, 12, 12, dtype=torch.bfloat16).to(memory_format=torch.channels_last)
cache = os.environ["TRITON_CACHE_DIR"]
def files():
    return sorted(os.path.join(d, f) for d, _, fs in os.walk(cache) for f in fs)
report = warmup(block, x, workers=2, target=(90, 32))
after = files()
kernels = codegen.compile_kernels(block, x)  # what a forward launches, compiled as the JIT would
print(json.dumps(dict(compiled=report.compiled, recorded=len(kernels), new_files=len(set(files()) - set(after)))))
"""


def test_warmup_compiles_exactly_what_a_forward_launches(tmp_path):
    """warmup on a machine without a GPU (target sm_90): every variant a forward launches is
    compiled into Triton's cache, so compiling them again (what the JIT does on the first
    forward) writes nothing new: all cache hits."""
    pytest.importorskip("triton.backends.nvidia")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_CACHE_DIR"] = str(tmp_path / "cache")
    r = subprocess.run([sys.executable, "-c", SCRIPT], env=env, capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stderr[-3000:]
    out = json.loads(r.stdout.strip().splitlines()[-1])
    assert out["compiled"] == out["recorded"] > 0 and out["new_files"] == 0, out
