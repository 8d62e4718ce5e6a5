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

import copy  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402
from torch import nn  # noqa: E402
from torch.utils._python_dispatch import TorchDispatchMode  # noqa: E402

from fused_inception import interpreter  # noqa: E402
from fused_inception.kernels import conv as kconv  # noqa: E402
from fused_inception.report import informative_init_  # noqa: E402

if kconv.INTERPRETING:
    # Without the int32 overflow arithmetic whose result the interpreter drops (it asserts only
    # under interpreter.overflow_checks(): tests/test_stage_writes.py and a training test) and its
    # re-patching of triton.language at every helper call, kernel tests run about 2.5x faster;
    # and float32 -> bfloat16 rounds to nearest even, as on a GPU (the interpreter truncates).
    interpreter.configure()

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


def split_launches(*objects):
    """The reduction launches of the split-K stage launches (kconv.StageLaunch.finish: a stage of
    few programs at a small input) that the fused modules in `objects` (models, or plans with
    launches()) prepared so far: each makes one launch more per forward than its stage count.
    Which stages split is kconv.split_counts' rule, pinned by tests/test_split_k.py."""
    launches = []
    for obj in objects:
        if hasattr(obj, "launches") and callable(obj.launches):
            launches += obj.launches()
            continue
        for m in obj.modules():
            program = m.__dict__.get("_program")
            if program is None:
                continue
            for _, plan, _ in program._plans.values():
                launches += plan.launches()
            for plan in program._train_plans.values():
                launches += plan.all_launches()
    return sum(getattr(launch, "finish", None) is not None for launch in launches)


def _pool_gap(x, kernel, stride, padding, ceil_mode):
    """The smallest lead of a max-pool window's largest value over its next smaller one (equal
    values are one value: a pixel an earlier max pool copied routes the gradient the same way),
    relative to max |x|; inf if no window has two different values. Arguments as ATen takes them."""
    import torch.nn.functional as F

    def pair(v):
        return (v[0], v[0]) if len(v) == 1 else tuple(v)

    (kh, kw), (ph, pw) = pair(kernel), pair(padding)
    sh, sw = pair(stride) if len(stride) else (kh, kw)
    oh, ow = F.max_pool2d(x, (kh, kw), (sh, sw), (ph, pw), 1, ceil_mode).shape[2:]
    h, w = x.shape[2:]
    padded = F.pad(x, (pw, max((ow - 1) * sw + kw - w - pw, 0), ph, max((oh - 1) * sh + kh - h - ph, 0)),
                   value=float("-inf"))
    windows = padded.unfold(2, kh, sh).unfold(3, kw, sw)[:, :, :oh, :ow].reshape(*x.shape[:2], oh, ow, -1)
    top = windows.max(-1, keepdim=True).values
    runner_up = torch.where(windows < top, windows, float("-inf")).max(-1).values
    gaps = (top[..., 0] - runner_up)[runner_up > float("-inf")]
    largest = x.abs().max().item()
    return gaps.min().item() / largest if gaps.numel() and largest > 0 else float("inf")


class Decisions(TorchDispatchMode):
    """While active, watches the ReLUs and max pools of float64 computations (a reference), the
    places where the fp32 result takes a discrete decision that rounding could flip:

    - `relu_margin`: the least |input| of any ReLU relative to that input's largest |value|;
    - `pool_margin`: the least lead of a max-pool window's winner over its runner-up, relative to
      the pool input's largest |value|;
    - `pre_activation(t)`: for a result t made of ReLU outputs joined by torch.cat, the ReLU
      inputs laid out as t (NaN in what no ReLU produced: a pool-only branch, a conv without
      ReLU), or None.
    """

    _RELU = (torch.ops.aten.relu.default, torch.ops.aten.relu_.default)
    _MAX_POOL = (torch.ops.aten.max_pool2d.default, torch.ops.aten.max_pool2d_with_indices.default)

    def __init__(self):
        super().__init__()
        self.relu_margin = self.pool_margin = float("inf")
        self._pre = {}  # id(result) -> (result, its pre-activation); results kept alive

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        watched = isinstance(args[0], torch.Tensor) and args[0].dtype == torch.float64
        if func in self._RELU and watched:
            z = args[0].detach().clone()  # (before relu_ overwrites it)
            out = func(*args, **kwargs)
            largest = z.abs().max().item() if z.numel() else 0.0
            if largest > 0:
                self.relu_margin = min(self.relu_margin, z.abs().min().item() / largest)
            self._pre[id(out)] = (out, z)
            return out
        if func in self._MAX_POOL and watched:
            # (input, kernel_size, stride=[], padding=[0], dilation=[1], ceil_mode=False)
            kernel, stride, padding, _, ceil_mode = list(args[1:]) + [[], [0], [1], False][len(args) - 2:]
            self.pool_margin = min(self.pool_margin, _pool_gap(args[0].detach(), kernel, stride, padding, ceil_mode))
        out = func(*args, **kwargs)
        if func is torch.ops.aten.cat.default and args[0] and args[0][0].dtype == torch.float64:
            parts = [self._lookup(t) for t in args[0]]
            if any(p is not None for p in parts):
                parts = [torch.full_like(t, float("nan")) if p is None else p for t, p in zip(args[0], parts)]
                self._pre[id(out)] = (out, func(parts, *args[1:], **kwargs))
        return out

    def _lookup(self, t):
        entry = self._pre.get(id(t))
        return entry[1] if entry is not None and entry[0] is t else None

    def pre_activation(self, t):
        return self._lookup(t)


def assert_relu_zero_pattern(actual, pre, margin, what=""):
    """`actual` (a fused result) against `pre`, the float64 reference's ReLU inputs for it (NaN
    where no ReLU made it; see Decisions): wherever a ReLU made it, actual >= 0 exactly, and
    exactly 0 where pre < -margin * max|pre| and > 0 where pre > margin * max|pre| (the reference's
    decision, wherever rounding, below the margin, cannot take the other one)."""
    a, p = actual.detach().double().cpu(), pre.detach().double().cpu()
    assert a.shape == p.shape, f"{what}: shape {tuple(a.shape)} != {tuple(p.shape)}"
    relu = ~p.isnan()
    assert relu.any(), f"{what}: no ReLU made this result"
    bound = margin * p[relu].abs().max().item()
    below = relu & (a < 0)
    assert not below.any(), f"{what}: {int(below.sum())} negative values after a ReLU (min {a[below].min():.3e})"
    wrong_zero, wrong_positive = relu & (p > bound) & (a <= 0), relu & (p < -bound) & (a != 0)
    assert not wrong_zero.any(), f"{what}: {int(wrong_zero.sum())} zeros where the reference is > {bound:.2e}"
    assert not wrong_positive.any(), (f"{what}: {int(wrong_positive.sum())} values not exactly 0 where the "
                                      f"reference is < -{bound:.2e}")


def least_shifts(z, margin):
    """Per channel (dim 1) of z, the smallest shift that keeps every value of the channel at least
    `margin` away from zero (0 for channels already so)."""
    per_channel = z.detach().transpose(0, 1).reshape(z.shape[1], -1)
    shifts = torch.zeros(z.shape[1], dtype=z.dtype, device=z.device)
    for c in torch.nonzero((per_channel.abs() < margin).any(1)).flatten().tolist():
        v = per_channel[c]
        candidates = torch.cat([-v - 2 * margin, -v + 2 * margin])
        ok = ((v[None, :] + candidates[:, None]).abs() >= margin).all(1)
        shifts[c] = candidates[ok][candidates[ok].abs().argmin()]
    return shifts


def keep_relu_inputs_off_zero_(reference, fused, run, margin):
    """Shift the bias of every BatchNorm (beta) and of every conv that has one, in `fused` and in
    `reference` (same module names; reference in float64, train mode), by the least amount that
    keeps each of their outputs in `run(reference)` at least margin * its max |value| away from
    zero, layer by layer in forward order. A ReLU after them then takes the same decision in the
    fused fp32 kernels as in float64 whatever the rounding, as long as the two are less than the
    margin apart (callers assert the margins with Decisions); the shift is a choice of parameters,
    the same in both models.

    timm's BatchNormAct2d (BN, drop, act in one module) is shifted at what its act reads. An
    nn.ReLU module whose input no bias feeds directly (a residual block's relu(x + s * conv(..)))
    still gets its input kept off zero: through the bias of the latest module before it that moves
    that input, by the shift over the input's per-channel slope in that bias (autograd)."""
    probe = copy.deepcopy(reference)
    shifted, handles, ran, claimed = {}, [], [], set()

    def shifted_(name, out):
        s = least_shifts(out, margin * out.abs().max().item())
        shifted[name] = s
        return out + s.view(1, -1, *[1] * (out.dim() - 2))

    def hook(name):
        def shift(module, args, out):
            ran.append((name, module))
            return shifted_(name, out)
        return shift

    def pre_hook(name, module):
        def shift(act, args):
            ran.append((name, module))
            return (shifted_(name, args[0]), *args[1:])
        return shift

    def relu_pre_hook(act, args):
        z = args[0]
        s = least_shifts(z, margin * z.abs().max().item())
        if not s.any():
            return None
        for name, module in reversed(ran):
            if module.bias.shape != s.shape:
                continue
            (slope,) = torch.autograd.grad(z.sum(), module.bias, retain_graph=True, allow_unused=True)
            slope = None if slope is None else slope / (z.numel() // z.shape[1])
            if slope is not None and bool((slope.abs() > 1e-6)[s != 0].all()):
                shifted[name] = shifted[name] + torch.where(s != 0, s / slope, 0)
                return (z + s.view(1, -1, *[1] * (z.dim() - 2)), *args[1:])
        return None

    for name, m in probe.named_modules():
        if isinstance(m, (nn.BatchNorm2d, nn.Conv2d)) and getattr(m, "bias", None) is not None:
            act = getattr(m, "act", None)
            if isinstance(m, nn.BatchNorm2d) and isinstance(act, nn.Module):
                # timm's BatchNormAct2d: its output is after the act, so shift what the act reads
                # (the BN output through the identity drop)
                handles.append(act.register_forward_pre_hook(pre_hook(name, m)))
                claimed.add(id(act))
            else:
                handles.append(m.register_forward_hook(hook(name)))
    for m in probe.modules():
        if isinstance(m, nn.ReLU) and id(m) not in claimed:
            handles.append(m.register_forward_pre_hook(relu_pre_hook))
    with torch.enable_grad():
        run(probe)
    for h in handles:
        h.remove()
    targets, sources = dict(reference.named_modules()), dict(fused.named_modules())
    with torch.no_grad():
        for name, s in shifted.items():
            if s.any():
                sources[name].bias += s.detach().to(sources[name].bias.dtype)
                targets[name].bias.copy_(sources[name].bias)  # the same (rounded) value in both


# Block graphs (fused_inception.plan) for the stage-kernel tests: nodes, and their float64 reference.

def conv_node(cin, cout, kernel, stride, padding, bn=True, bias=False, act="relu", pool=None, **kw):
    """A ConvNode: Conv2d (+ BatchNorm2d(eps=1e-3) if bn) (+ the activation: ReLU by default, an
    activations.Activation, or None), an optional nn pool module before it."""
    from fused_inception.activations import RELU
    from fused_inception.graph import ConvNode, PoolSpec

    conv = nn.Conv2d(cin, cout, kernel, stride=stride, padding=padding, bias=bias)
    pool = PoolSpec.from_module(pool) if pool is not None else None
    return ConvNode(conv, nn.BatchNorm2d(cout, eps=1e-3) if bn else None, RELU if act == "relu" else act, pool=pool,
                    **kw)


def pool_node(pool, **kw):
    """A pool-only ConvNode from an nn.MaxPool2d / nn.AvgPool2d."""
    from fused_inception.graph import ConvNode, PoolSpec

    return ConvNode(None, None, None, pool=PoolSpec.from_module(pool), **kw)


def modules_of(graph):
    """The graph's convs and BatchNorms (and the residual head's conv), as one module (for randomize_)."""
    head = [graph.head.conv] if graph.head is not None else []
    return nn.ModuleList([m for node in graph.nodes for m in (node.conv, node.bn) if m is not None] + head)


def _float64_copy(graph):
    g = copy.deepcopy(graph)
    for m in modules_of(g):
        m.double().eval()
    return g


def reference(graph, x):
    """The graph's eager math (BlockGraph.eager) in float64 on copies of its modules."""
    with torch.no_grad():
        return _float64_copy(graph).eager(x.double())


def assert_matches_reference(actual, graph, x, tol, what=""):
    """`actual` (a fused block output) against the graph's float64 reference: within tol (see
    assert_close_rel), and wherever a ReLU made it, the reference's exact zero pattern
    (assert_relu_zero_pattern, with margin tol). Returns the reference."""
    with Decisions() as decisions:
        expected = reference(graph, x)
    assert_close_rel(actual, expected, tol, what)
    pre = decisions.pre_activation(expected)
    if pre is not None:
        assert_relu_zero_pattern(actual, pre, tol, what)
    return expected


def node_results(graph, x):
    """Every node's result, in float64 on copies of the graph's modules: what its slice of the
    block output or of `mid` must hold."""
    with torch.no_grad():
        return _float64_copy(graph).node_results(x.double())


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
def _tuning_picks_kept_apart(tmp_path_factory, monkeypatch):
    """The autotuner's picks that a test's launches write (kernels.tuning: the GPU path, driven
    on CPU by stand-ins) go to a directory of the test's own, never the user's Triton cache, and
    no pick read by one test reaches another."""
    from fused_inception.kernels import tuning

    directory = []
    monkeypatch.setattr(tuning, "cache_dir", lambda: directory[0] if directory else
                        directory.append(str(tmp_path_factory.mktemp("tuning"))) or directory[0])
    tuning.forget()
    yield
    tuning.forget()


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
    InterpretedFunction.run once per launch; on CUDA Triton calls its launch-enter hook once
    per kernel launch (through the JIT or a compiled kernel's launcher alike)."""
    calls = []
    if kconv.INTERPRETING:
        from triton.runtime.interpreter import InterpretedFunction as launcher

        original = launcher.run

        def run(self, *args, **kwargs):
            calls.append(self)
            return original(self, *args, **kwargs)

        monkeypatch.setattr(launcher, "run", run)
    else:
        import triton

        monkeypatch.setattr(triton.knobs.runtime, "launch_enter_hook", lambda metadata: calls.append(metadata))
    return calls
