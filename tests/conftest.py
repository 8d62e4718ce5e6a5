"""Test setup: run the Triton kernels through Triton's CPU interpreter on this GPU-less machine.

TRITON_INTERPRET must be set before the kernels are decorated, i.e. before anything imports
fused_inception; pytest loads this file first. On a machine with a GPU, set FUSED_INCEPTION_DEVICE=cuda
(and TRITON_INTERPRET=0) to run the same tests on CUDA.
"""

import os

DEVICE = os.environ.get("FUSED_INCEPTION_DEVICE", "cpu")
if DEVICE == "cpu":
    os.environ["TRITON_INTERPRET"] = "1"
else:
    os.environ.setdefault("TRITON_INTERPRET", "0")

import pytest  # noqa: E402
import torch  # noqa: E402
from torch import nn  # noqa: E402

from fused_inception.kernels import conv as kconv  # noqa: E402
from fused_inception.report import informative_init_  # noqa: E402

# Tolerances, stated once: max |fused - reference| <= TOL[dtype] * max |reference|, with the
# reference computed in float64 where a test can (fp32 on the GPU uses TF32 unless disabled).
TOL = {torch.float32: 1e-4, torch.float16: 1e-2, torch.bfloat16: 2e-2}


def assert_close_rel(actual, expected, tol, what=""):
    """max |actual - expected| <= tol * max |expected| (and the same NaN pattern)."""
    assert actual.shape == expected.shape, f"{what}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    a, e = actual.detach().double().cpu(), expected.detach().double().cpu()
    assert torch.equal(a.isnan(), e.isnan()), f"{what}: NaN positions differ"
    a, e = a.nan_to_num(), e.nan_to_num()
    scale = e.abs().max().item()
    err = (a - e).abs().max().item() if a.numel() else 0.0
    assert err <= tol * max(scale, 1e-30), f"{what}: max abs error {err:.3e} > {tol:g} * max |ref| {scale:.3e}"
    return err


def randomize_(model, seed=0):
    """Weights and BN statistics that keep activations O(1) (see report.informative_init_)."""
    return informative_init_(model, seed)


class SequentialNoBN(nn.Module):
    """An Inception-style block of nn.Sequential branches of conv (bias on) + ReLU, no BatchNorm:
    29 output channels."""

    def __init__(self, cin):
        super().__init__()
        self.b1 = nn.Sequential(nn.Conv2d(cin, 8, 1), nn.ReLU(inplace=True))
        self.b2 = nn.Sequential(nn.Conv2d(cin, 6, 1), nn.ReLU(), nn.Conv2d(6, 10, 3, padding=1), nn.ReLU())
        self.b3 = nn.Sequential(nn.Conv2d(cin, 4, 1), nn.ReLU(), nn.Conv2d(4, 6, 5, padding=2), nn.ReLU())
        self.b4 = nn.Sequential(nn.MaxPool2d(3, 1, 1), nn.Conv2d(cin, 5, 1), nn.ReLU())

    def forward(self, x):
        return torch.cat([self.b1(x), self.b2(x), self.b3(x), self.b4(x)], dim=1)


if DEVICE != "cpu":
    # Compare fp32 against fp32, not TF32: the stage kernel follows cudnn.allow_tf32 like eager convs.
    torch.backends.cudnn.allow_tf32 = False


def pytest_collection_modifyitems(config, items):
    """On a GPU run, only the tests that take the `device` fixture apply; the rest check CPU paths."""
    if DEVICE == "cpu":
        return
    skip = pytest.mark.skip(reason=f"CPU-only test (eager fallback / interpreter); this run is on {DEVICE}")
    for item in items:
        if "device" not in getattr(item, "fixturenames", ()):
            item.add_marker(skip)


def pytest_addoption(parser):
    parser.addoption("--property-cases", type=int, default=50,
                     help="random block configurations checked by tests/test_hardening.py (default 50)")


def pytest_generate_tests(metafunc):
    if "property_case" in metafunc.fixturenames:
        metafunc.parametrize("property_case", range(metafunc.config.getoption("property_cases")))


@pytest.fixture(autouse=True)
def _seeded():
    """Every test draws its random inputs from the same seed, whatever ran before it."""
    torch.manual_seed(0)


@pytest.fixture
def device():
    return torch.device(DEVICE)


@pytest.fixture
def interpreter_launches(monkeypatch):
    """Launches counted independently of fused_inception's counter: Triton's interpreter calls
    InterpretedFunction.run once per launch; on CUDA the autotuner's run is called once per launch
    (its first call benchmarks the configs inside)."""
    if kconv.INTERPRETING:
        from triton.runtime.interpreter import InterpretedFunction as launcher
    else:
        from triton.runtime.autotuner import Autotuner as launcher

    calls = []
    original = launcher.run

    def run(self, *args, **kwargs):
        calls.append(self)
        return original(self, *args, **kwargs)

    monkeypatch.setattr(launcher, "run", run)
    return calls
