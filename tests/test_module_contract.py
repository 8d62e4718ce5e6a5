"""A fused block keeps nn.Module's contract: whatever a user does to a module, the fused one gives
the unfused module's answer under the same action (or runs that module's eager graph), never a
stale or silently different one.

Each test does the same thing to a fused module and to the unfused reference it was made from
(torchvision's Inception, fuse()d or not), and compares. The kernels run through Triton's
interpreter; where a test only holds if the kernels ran (not the eager graph), it says so with
`route`.
"""

import copy
import importlib.util
import threading

import pytest
import torch
from torch import nn
from torch.nn.utils import parametrizations, parametrize, prune
from torchvision.models.googlenet import Inception

from conftest import DEVICE, TOL, assert_close_rel, randomize_
from fused_inception import FusedInception, fuse
from fused_inception.blocks import Route
from test_projection_shortcut import FunctionalProjectionBlock, ProjectionBlock

# The cases build CPU tensors and assert the kernels' route, which on CPU needs the interpreter.
pytestmark = pytest.mark.skipif(DEVICE != "cpu", reason="CPU tensors through Triton's interpreter; no CUDA "
                                "variant yet (a GPU run would need every case's tensors on the device)")

ARGS = (24, 8, 8, 16, 4, 8, 8)
ATOL = 1e-5  # fp32 kernels against fp32 eager, on O(1) activations (randomize_)


def pair(seed=0):
    """(reference, fused): torchvision's Inception and a fuse()d copy of it, in eval mode."""
    reference = randomize_(Inception(*ARGS), seed).eval()
    fused = fuse(nn.Sequential(copy.deepcopy(reference)))[0][0]
    assert type(fused).__name__ == "FusedGraphBlock"
    return reference, fused


def same(a, b, what=""):
    assert a.shape == b.shape and a.stride() == b.stride(), (what, a.shape, a.stride(), b.shape, b.stride())
    assert_close_rel(a, b, TOL[torch.float32], what)


@pytest.fixture
def x():
    return torch.randn(2, 24, 5, 5)


# Threads ---------------------------------------------------------------------------------------


@pytest.fixture
def serial_interpreter(monkeypatch):
    """Triton's interpreter is not thread-safe (it copies tensors to NumPy and back around each
    launch): launches are serialised, the rest of each forward runs concurrently."""
    from triton.runtime.interpreter import InterpretedFunction

    lock, run = threading.Lock(), InterpretedFunction.run

    def serial_run(self, *args, **kwargs):
        with lock:
            return run(self, *args, **kwargs)

    monkeypatch.setattr(InterpretedFunction, "run", serial_run)


def forwards_from_threads(model, inputs):
    start, results = threading.Barrier(len(inputs)), [None] * len(inputs)

    def work(i):
        start.wait()  # the first calls at once
        try:
            with torch.no_grad():
                results[i] = model(inputs[i])
        except BaseException as e:  # noqa: BLE001 - reported by the test
            results[i] = e

    threads = [threading.Thread(target=work, args=(i,)) for i in range(len(inputs))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return results


@pytest.mark.parametrize("state", ["fresh", "just-switched-to-eval"])
def test_first_calls_from_threads(state, serial_interpreter, monkeypatch):
    """4 threads make a model's first calls at once: every result is eager's, no forward traces
    with torch.fx (which patches nn.Module.__call__ for the whole process), and nn.Module.__call__
    is intact afterwards."""
    reference = nn.Sequential(randomize_(Inception(*ARGS), 1), randomize_(Inception(40, *ARGS[1:]), 2)).eval()
    model = copy.deepcopy(reference)
    if state == "just-switched-to-eval":
        fuse(model)
        model.train()
        model(torch.randn(2, 24, 5, 5))  # a training step's forward (batch statistics)
        reference.load_state_dict(model.state_dict())  # (its running statistics)
    else:
        model = FusedSequential(reference)  # built (recognised) here, first called from the threads
    call = nn.Module.__call__
    traces = []
    monkeypatch.setattr(torch.fx.Tracer, "trace", lambda *a, **k: traces.append(1) or pytest.fail("traced"))
    model.eval()
    inputs = [torch.randn(2, 24, 5, 5) for _ in range(4)]
    results = forwards_from_threads(model, inputs)
    assert nn.Module.__call__ is call and not traces
    for x, y in zip(inputs, results):
        assert isinstance(y, torch.Tensor), y
        with torch.no_grad():
            same(y, reference(x))
    with torch.no_grad():
        assert model[0].route(inputs[0]) is Route.EVAL  # (the kernels ran, not the eager graph)


def FusedSequential(reference):
    """The reference's blocks as FusedInception modules (built, not fuse()d), fresh."""
    blocks = []
    for block in reference:
        fused = FusedInception(block.branch1.conv.in_channels, *ARGS[1:])
        fused.load_state_dict(block.state_dict())
        blocks.append(fused)
    return nn.Sequential(*blocks)


def test_train_eval_never_traces(x, monkeypatch):
    reference, fused = pair(3)
    monkeypatch.setattr(torch.fx.Tracer, "trace", lambda *a, **k: pytest.fail("traced on the forward path"))
    for _ in range(2):
        fused.train()
        reference.train()
        same(fused(x), reference(x), "train")
        fused.eval()
        reference.eval()
        with torch.no_grad():
            same(fused(x), reference(x), "eval")


# torch.func --------------------------------------------------------------------------------------


def test_functional_call_uses_the_tensors_given(x):
    """Parameters and buffers replaced for one call: the fused forward uses them (kernels), and
    the block's own afterwards; gradients of the given tensors and of x are eager's."""
    reference, fused = pair(4)
    given = {"branch1.conv.weight": torch.randn(8, 24, 1, 1) * 0.3,
             "branch2.1.bn.running_mean": torch.randn(16),
             "branch4.1.conv.weight": torch.randn(8, 24, 1, 1) * 0.3}
    with torch.no_grad():
        assert fused.route(x) is Route.EVAL
        same(torch.func.functional_call(fused, given, (x,)), torch.func.functional_call(reference, given, (x,)))
        same(fused(x), reference(x), "own tensors after the call")
    grads = []
    for model in (fused, reference):
        w = given["branch1.conv.weight"].clone().requires_grad_()
        xg = x.clone().requires_grad_()
        y = torch.func.functional_call(model, dict(given, **{"branch1.conv.weight": w}), (xg,))
        grads.append(torch.autograd.grad((y * torch.linspace(-1, 1, y.numel()).view_as(y)).sum(), [w, xg]))
    for a, b in zip(*grads):
        same(a, b, "gradient")


def test_torch_func_grad_and_vmap(x):
    reference, fused = pair(5)
    params = {k: v.detach() for k, v in reference.named_parameters()}

    def loss(model):
        return lambda p, x: torch.func.functional_call(model, p, (x,)).square().sum()

    g_fused, g_ref = torch.func.grad(loss(fused))(params, x), torch.func.grad(loss(reference))(params, x)
    for name in params:
        same(g_fused[name], g_ref[name], name)
    xs = torch.randn(3, 2, 24, 5, 5)
    with torch.no_grad():
        same(torch.func.vmap(fused)(xs), torch.func.vmap(reference)(xs), "vmap")


# Parametrizations, pruning, swap_tensors ----------------------------------------------------------


class _Double(nn.Module):
    def forward(self, w):
        return 2 * w


@pytest.mark.parametrize("kind", ["weight_norm", "spectral_norm", "register_parametrization"])
def test_parametrized_after_fuse_runs_eager(kind, x):
    reference, fused = pair(6)
    for model in (reference, fused):
        conv = model.branch2[1].conv
        if kind == "weight_norm":
            parametrizations.weight_norm(conv)
        elif kind == "spectral_norm":
            parametrizations.spectral_norm(conv)
        else:
            parametrize.register_parametrization(conv, "weight", _Double())
    with torch.no_grad():
        assert "parametrized" in fused.eager_reason(x)
        same(fused(x), reference(x))
        if kind == "weight_norm":
            for model in (reference, fused):
                model.branch2[1].conv.parametrizations.weight.original0.mul_(3)  # g *= 3
        else:
            for model in (reference, fused):
                model.branch2[1].conv.parametrizations.weight.original.mul_(3)
        same(fused(x), reference(x), "after the parametrization's tensor changed")
        for model in (reference, fused):
            parametrize.remove_parametrizations(model.branch2[1].conv, "weight")
        assert fused.route(x) is Route.EVAL  # the kernels again, with the weight it left
        same(fused(x), reference(x), "parametrization removed")


def test_fuse_leaves_parametrized_and_pruned_blocks_alone():
    reference = nn.Sequential(randomize_(Inception(*ARGS), 7), randomize_(Inception(40, *ARGS[1:]), 8)).eval()
    model = copy.deepcopy(reference)  # (before: a parametrized module can't be deep-copied)
    for m in (reference, model):
        parametrizations.weight_norm(m[0].branch3[1].conv)
        prune.l1_unstructured(m[1].branch1.conv, "weight", amount=0.3)
    model, report = fuse(model)
    assert [type(m) for m in model] == [type(m) for m in reference]  # (their conv units are searched)
    swapped = {name for name, *_ in report.swapped}
    assert "1.branch1" not in swapped and "0.branch3" not in swapped and "0.branch3.1" not in swapped, swapped
    reasons = {name: reason for name, _, reason in report.left_alone}
    assert "parametrized" in reasons["0"] and "branch3.1.conv" in reasons["0"], reasons
    assert "forward pre-hook" in reasons["1"] and "L1Unstructured" in reasons["1"], reasons
    x = torch.randn(2, 24, 5, 5)
    with torch.no_grad():
        same(model(x), reference(x))


def test_pruned_after_fuse(x):
    reference, fused = pair(9)
    for model in (reference, fused):
        prune.l1_unstructured(model.branch3[1].conv, "weight", amount=0.5)
    with torch.no_grad():
        same(fused(x), reference(x), "pruned")
        for model in (reference, fused):
            model.branch3[1].conv.weight_orig.mul_(-2)
        same(fused(x), reference(x), "weight_orig changed")
    for model in (reference, fused):  # training: two steps (the pruning hook recomputes the weight)
        model.train()
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        for _ in range(2):
            opt.zero_grad()
            model(x).square().mean().backward()
            opt.step()
        model.eval()
    with torch.no_grad():
        same(fused(x), reference(x), "after two training steps")


def test_swap_tensors_and_replaced_parameters(x):
    reference, fused = pair(10)
    with torch.no_grad():
        same(fused(x), reference(x))
        for model in (reference, fused):
            torch.utils.swap_tensors(model.branch2[1].conv.weight, nn.Parameter(torch.full((16, 8, 3, 3), 0.05)))
            torch.utils.swap_tensors(model.branch1.bn.running_var, torch.full((8,), 4.0))
        assert fused.route(x) is Route.EVAL
        same(fused(x), reference(x), "swap_tensors")
        for model in (reference, fused):  # a slot written without registration (as functional_call does)
            model.branch3[0].conv._parameters["weight"] = nn.Parameter(torch.full((4, 24, 1, 1), -0.1))
        same(fused(x), reference(x), "slot replaced")


# Hooks ------------------------------------------------------------------------------------------


def test_hooks_on_inner_modules_are_honoured(x):
    reference, fused = pair(11)
    calls = {"fused": [], "reference": []}
    handles = []
    for name, model in (("fused", fused), ("reference", reference)):
        handles += [model.branch2[0].conv.register_forward_pre_hook(lambda m, a: (a[0] * 0,)),
                    model.branch3[1].register_forward_hook(lambda m, a, y, name=name: calls[name].append(y.sum()) or y + 1)]
    with torch.no_grad():
        assert "forward pre-hook" in fused.eager_reason(x) and fused.route(x) is Route.EAGER
        same(fused(x), reference(x), "hooks")
    assert len(calls["fused"]) == len(calls["reference"]) == 1
    for h in handles:
        h.remove()
    with torch.no_grad():
        assert fused.route(x) is Route.EVAL
        same(fused(x), reference(x), "hooks removed")
    grads = {}
    for name, model in (("fused", fused), ("reference", reference)):
        model.branch1.conv.register_full_backward_hook(lambda m, gi, go, name=name: grads.update({name: go[0]}))
        model(x.clone().requires_grad_()).sum().backward()
    same(grads["fused"], grads["reference"], "backward hook")


def test_fuse_names_the_hook_and_carries_block_hooks_over():
    reference = nn.Sequential(randomize_(Inception(*ARGS), 12), randomize_(Inception(40, *ARGS[1:]), 13)).eval()
    model = copy.deepcopy(reference)
    model[0].branch4[1].conv.register_forward_hook(lambda m, a, y: y * 0)
    calls = []
    handle = model[1].register_forward_hook(lambda m, a, y: calls.append(type(m).__name__) or y * 2)
    model, report = fuse(model)
    reasons = {name: reason for name, _, reason in report.left_alone}
    assert "branch4.1.conv has a forward hook" in reasons["0"], reasons
    assert type(model[1]).__name__ == "FusedGraphBlock"
    x = torch.randn(2, 24, 5, 5)
    with torch.no_grad():
        y = model(x)
    # The unfused modules with the same hooks:
    reference[0].branch4[1].conv.register_forward_hook(lambda m, a, y: y * 0)
    reference[1].register_forward_hook(lambda m, a, y: y * 2)
    with torch.no_grad():
        same(y, reference(x))
    assert calls == ["FusedGraphBlock"]
    handle.remove()  # the original's handle removes it from the fused block
    with torch.no_grad():
        model(x)
    assert calls == ["FusedGraphBlock"]


# BatchNorm reconfigured after fusing ------------------------------------------------------------


@pytest.mark.parametrize("change", ["no-running-stats", "bn-in-train-mode", "eps-and-momentum"])
def test_batchnorm_changed_after_fuse(change, x):
    reference, fused = pair(14)
    with torch.no_grad():
        fused(x)
        for model in (reference, fused):
            bn = model.branch2[0].bn
            if change == "no-running-stats":  # test-time adaptation: batch statistics in eval
                bn.track_running_stats, bn.running_mean, bn.running_var = False, None, None
            elif change == "bn-in-train-mode":
                bn.train()
            else:
                bn.eps, bn.momentum = 0.5, 0.5
        for _ in range(2):  # no error on any call, eager's result each time
            same(fused(x), reference(x), change)
        if change == "eps-and-momentum":
            assert fused.route(x) is Route.EVAL
    if change == "eps-and-momentum":  # the training kernels with the new eps and momentum
        for model in (reference, fused):
            model.train()
        same(fused(x), reference(x), "train")
        assert torch.allclose(fused.branch2[0].bn.running_mean, reference.branch2[0].bn.running_mean, atol=ATOL)


# Deployment ---------------------------------------------------------------------------------------


def test_jit_trace_records_the_eager_graph(x):
    reference, fused = pair(15)
    with torch.no_grad():
        traced = torch.jit.trace(fused, (x,), check_trace=False)
        kinds = {n.kind() for n in traced.inlined_graph.nodes()}
        assert "aten::_convolution" in kinds or "aten::conv2d" in kinds, kinds
        same(traced(x), reference(x))


def test_fx_symbolic_trace_and_feature_extractor():
    from torchvision.models.feature_extraction import create_feature_extractor

    reference = nn.Sequential(randomize_(Inception(*ARGS), 16), randomize_(Inception(40, *ARGS[1:]), 17)).eval()
    model = fuse(copy.deepcopy(reference))[0]
    x = torch.randn(2, 24, 5, 5)
    traced = torch.fx.symbolic_trace(model)
    extractor = create_feature_extractor(model, {"0": "first", "1": "second"})
    with torch.no_grad():
        same(traced(x), reference(x), "symbolic_trace")
        features = extractor(x)
        same(features["first"], reference[0](x), "feature extractor")
        same(features["second"], reference(x), "feature extractor")


_ONNX = [name for name in ("onnx", "onnxruntime", "onnxscript") if importlib.util.find_spec(name) is None]


@pytest.mark.skipif(bool(_ONNX), reason=f"not installed: {', '.join(_ONNX)} (pip install -e '.[onnx]')")
@pytest.mark.parametrize("dynamo", [False, True], ids=["torchscript-exporter", "dynamo-exporter"])
def test_onnx_export_of_fused_googlenet_runs_in_onnxruntime(dynamo, tmp_path):
    """The exported graph is the standard one (eager's, while exporting): onnxruntime gives
    eager's logits."""
    import onnx
    import onnxruntime

    from fused_inception.models import googlenet

    model = randomize_(googlenet(), 18).eval()
    x = torch.randn(1, 3, 64, 64)
    path = tmp_path / "googlenet.onnx"
    torch.onnx.export(model, (x,), str(path), dynamo=dynamo)
    ops = {n.op_type for n in onnx.load(str(path)).graph.node}
    assert "Conv" in ops and not any("fused" in op for op in ops), ops
    session = onnxruntime.InferenceSession(str(path))
    (logits,) = session.run(None, {session.get_inputs()[0].name: x.numpy()})
    with torch.no_grad():
        expected = copy.deepcopy(model).double()(x.double())
    assert_close_rel(torch.from_numpy(logits), expected, TOL[torch.float32], "onnxruntime")


# What the plan folds, each alone, in place, in eval ------------------------------------------------


@pytest.mark.parametrize("what", ["running_var", "head_conv", "shortcut", "post_add_bn_mean", "post_add_bn_weight",
                                  "scale_buffer"])
def test_every_folded_tensor_is_watched(what):
    block_class = FunctionalProjectionBlock if what == "scale_buffer" else ProjectionBlock
    reference = randomize_(block_class(), 19).eval()
    model = fuse(nn.Sequential(copy.deepcopy(reference)))[0]
    x = torch.randn(2, 24, 5, 5)
    with torch.no_grad():
        same(model(x), reference(x))
        for m in (reference, model[0]):
            tensor = {"running_var": lambda: m.b1[1].bn.running_var, "head_conv": lambda: m.up.weight,
                      "shortcut": lambda: m.shortcut.weight, "post_add_bn_mean": lambda: m.bn.running_mean,
                      "post_add_bn_weight": lambda: m.bn.weight, "scale_buffer": lambda: m.scale}[what]()
            tensor.mul_(1.7).add_(0.1)
        assert model[0].route(x) is Route.EVAL
        same(model(x), reference(x), what)


# The minor ones -----------------------------------------------------------------------------------


def test_non_reentrant_checkpoint_updates_running_stats_as_eager(x):
    from torch.utils.checkpoint import checkpoint

    reference, fused = pair(20)
    for model in (reference, fused):
        model.train()
        checkpoint(model, x, use_reentrant=False).square().mean().backward()
    assert fused.branch1.bn.num_batches_tracked.item() == reference.branch1.bn.num_batches_tracked.item() == 2
    for name, buf in reference.named_buffers():
        assert torch.allclose(dict(fused.named_buffers())[name], buf, atol=ATOL, rtol=1e-5), name


def test_channel_slice_of_a_channels_last_input_keeps_eager_strides():
    reference, fused = pair(21)
    wide = torch.randn(2, 31, 5, 5).to(memory_format=torch.channels_last)
    with torch.no_grad():
        for start in (0, 3):
            x = wide[:, start:start + 24]
            same(fused(x), reference(x), f"channels {start}..")


def test_a_block_under_two_names_is_fused_once_under_both():
    block = randomize_(Inception(*ARGS), 22)
    holder = nn.Module()
    holder.a = block
    holder.b = block
    fuse(holder)
    assert holder.a is holder.b and type(holder.a).__name__ == "FusedGraphBlock"


# Found by review: changes seen whoever looks first, deletions, copies, odd holders ------------------


def test_a_change_probed_before_the_next_forward(x):
    """route()/graph() catching up with a change must not leave the forward's fast path on the
    old program (a conv given dilation 2: unfusable, eager from then on)."""
    reference, fused = pair(23)
    with torch.no_grad():
        fused(x)
        fused(x)  # (the fast path is armed)
        for model in (reference, fused):
            model.branch2[1].conv.dilation, model.branch2[1].conv.padding = (2, 2), (2, 2)
        assert "dilation" in fused.eager_reason(x)
        same(fused(x), reference(x), "after the probe")
        copied = copy.deepcopy(fused)  # a copy of a block a change made unfusable: eager as well
        assert copied.route(x) is Route.EAGER
        same(copied(x), reference(x), "deep copy")


def test_deleted_submodule_and_build_plans_in_train(x):
    reference, fused = pair(24)
    with torch.no_grad():
        fused(x)
        fused(x)
        for model in (reference, fused):
            model.branch4.pop(0)  # (no registration hook fires for a deletion)
        same(fused(x), reference(x), "pool deleted")
    from fused_inception import build_plans

    assert build_plans(fused.train()) == 1


def test_residual_scale_as_a_plain_tensor_attribute():
    block = randomize_(FunctionalProjectionBlock(), 25).eval()
    scale = block.scale
    del block.scale
    block.scale = scale  # a plain attribute now, not a buffer
    reference = copy.deepcopy(block)
    model = fuse(nn.Sequential(block))[0]
    x = torch.randn(2, 24, 5, 5)
    with torch.no_grad():
        same(model(x), reference(x))
        for m in (reference, model[0]._original):
            m.scale.fill_(-0.5)
        same(model(x), reference(x), "scale changed in place")


def test_parameters_made_and_loaded_under_inference_mode():
    with torch.inference_mode():
        reference = randomize_(Inception(*ARGS), 26).eval()
        fused = fuse(nn.Sequential(copy.deepcopy(reference)))[0][0]
        x = torch.randn(2, 24, 5, 5)
        same(fused(x), reference(x))
        state = randomize_(Inception(*ARGS), 27).state_dict()
        for model in (reference, fused):
            model.load_state_dict(state)  # in place, on tensors without a version counter
        same(fused(x), reference(x), "loaded")
