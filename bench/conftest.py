"""pytest-benchmark suites: fused vs eager PyTorch vs torch.compile, per block and per network.

On a GPU:  python -m pytest bench --benchmark-json=bench/results/<name>.json
On CPU:    python -m pytest bench --benchmark-disable   (tiny shapes, Triton's interpreter: checks
           that every case builds, runs and agrees, so the suites don't rot; times mean nothing)
"""

import json
import os

import torch

ON_GPU = torch.cuda.is_available()
if not ON_GPU:
    os.environ["TRITON_INTERPRET"] = "1"  # before fused_inception decorates its kernels

import pytest  # noqa: E402


def pytest_benchmark_update_machine_info(config, machine_info):
    import triton

    machine_info["torch"] = torch.__version__
    machine_info["triton"] = triton.__version__
    machine_info["cuda"] = torch.version.cuda
    machine_info["cudnn"] = torch.backends.cudnn.version()
    if ON_GPU:
        props = torch.cuda.get_device_properties(0)
        machine_info["gpu"] = props.name
        machine_info["capability"] = f"{props.major}.{props.minor}"
        machine_info["gpu_memory_gib"] = round(props.total_memory / 2**30, 1)
        try:
            import subprocess

            machine_info["driver"] = subprocess.run(
                ["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                capture_output=True, text=True).stdout.strip()
        except OSError:
            pass
    else:
        machine_info["gpu"] = None
        machine_info["note"] = "CPU run through Triton's interpreter: correctness only, no meaningful times"


def pytest_addoption(parser):
    parser.addoption("--bench-jsonl", default=None,
                     help="append each benchmark's result to this file as one JSON line when its test ends "
                          "(pytest-benchmark's own --benchmark-json is written only when the session ends)")


@pytest.fixture(autouse=True)
def _bench_jsonl(request):
    """With --bench-jsonl: one line per finished benchmark (name, extra_info, stats in seconds),
    flushed at once, so a run killed at its time limit keeps every case it finished."""
    yield
    path = request.config.getoption("--bench-jsonl")
    bench = request.node.funcargs.get("benchmark") if hasattr(request.node, "funcargs") else None
    if not path or bench is None or not bench.extra_info:
        return
    stats = getattr(getattr(bench, "stats", None), "stats", None)
    record = dict(name=request.node.nodeid, extra_info=dict(bench.extra_info),
                  stats=None if stats is None else {k: getattr(stats, k) for k in ("min", "max", "mean", "median",
                                                                                    "rounds")})
    with open(path, "a") as f:
        f.write(json.dumps(record, default=str) + "\n")
        f.flush()


@pytest.fixture(autouse=True)
def _cudnn_benchmark():
    # Eager PyTorch as a user would tune it; TF32 as PyTorch's defaults for convolutions (stated in the JSON).
    torch.backends.cudnn.benchmark = True
    yield
