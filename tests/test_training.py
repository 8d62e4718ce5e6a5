"""Fused training: batch-statistics BatchNorm in the stage kernels, the block's backward, launch
counts, fallbacks; and gradients through eval-mode fused blocks."""

import copy

import pytest
import torch
from torch import nn
import torch.nn.functional as F
from torchvision.models.googlenet import Inception

from conftest import (DEVICE, TOL, Decisions, SequentialNoBN, assert_close_rel, assert_relu_zero_pattern,
                      keep_relu_inputs_off_zero_, randomize_)
from fused_inception import (FusedBasicConv2d, FusedInception, FusedInceptionA, FusedInceptionB, FusedInceptionC,
                             FusedInceptionD, FusedInceptionE, count_launches, fuse)
from fused_inception.interpreter import overflow_checks
from fused_inception.launches import count_torch_kernels
from fused_inception.program import Route

ARGS = (64, 16, 24, 32, 8, 16, 12)  # a small GoogLeNet block (in, 1x1, 3x3red, 3x3, 5x5red, 5x5, pool)


def pair(seed=0, device="cpu"):
    ref = randomize_(Inception(*ARGS), seed).to(device)
    fused = FusedInception(*ARGS).to(device)
    fused.load_state_dict(ref.state_dict())
    return ref, fused


def grads(module):
    return {name: p.grad.clone() for name, p in module.named_parameters()}


def check_training_parity(ref, fused, x, steps=2, tol=TOL[torch.float32], zero_grads=()):
    """Run `steps` forward/backward passes in train mode of `fused` and of `ref` in float64 (the
    reference module, torchvision's or the block's own eager graph: a float64 fused block takes
    the eager path) on x, and compare the outputs, input and parameter gradients (accumulated over
    the steps) and buffers. The reference is float64 because fp32 against fp32 compares two
    roundings: an eager fp32 ReLU whose input rounds to the other side of zero makes one gradient
    element off by ~1e-3 of the maximum, now and then.

    zero_grads: parameters whose gradient is zero in exact arithmetic (a conv bias followed by
    BatchNorm): the fused one must be rounding noise, small against its layer's weight gradient.

    A ReLU input within rounding of zero would still be a coin toss between the fused fp32 kernels
    and float64 (and move a gradient element by ~1e-3 of the max): so the biases before the ReLUs
    are first shifted in both models (conftest.keep_relu_inputs_off_zero_) until every ReLU input
    of the reference is at least `tol` x its max from zero (asserted; the fused results are within
    4e-6 of the max). The max pools of a fused block read the block input, the same numbers in both."""
    ref = copy.deepcopy(ref).double().train()
    fused.train()
    xr, xf = x.double().requires_grad_(), x.clone().requires_grad_()
    keep_relu_inputs_off_zero_(ref, fused, lambda m: m(xr), tol)
    for step in range(steps):  # running stats and num_batches_tracked keep agreeing
        with Decisions() as decisions:
            yr = ref(xr)
        assert decisions.relu_margin >= 0.9 * tol, f"a ReLU input {decisions.relu_margin:.1e} x its max from zero"
        yf = fused(xf)
        g = torch.randn_like(yf)
        yr.backward(g.double())
        yf.backward(g)
        assert yf.dtype == x.dtype
        assert_close_rel(yf, yr, tol, f"output, step {step}")
        if decisions.pre_activation(yr) is not None:  # the exact zeros of the reference's ReLUs
            assert_relu_zero_pattern(yf, decisions.pre_activation(yr), tol, f"output, step {step}")
        assert yf.is_contiguous(memory_format=torch.channels_last) == yr.is_contiguous(
            memory_format=torch.channels_last) or yr.shape[1] == 1
    assert_close_rel(xf.grad, xr.grad, tol, "input grad")
    gr, gf = grads(ref), grads(fused)
    assert gr.keys() == gf.keys()
    for name in gr:
        if name in zero_grads:
            weight_grad = gr[name.rsplit(".", 1)[0] + ".weight"].abs().max()
            assert gf[name].abs().max() <= tol * weight_grad, name
        else:
            assert_close_rel(gf[name], gr[name], tol, name)
    buffers_r, buffers_f = dict(ref.named_buffers()), dict(fused.named_buffers())
    assert buffers_r.keys() == buffers_f.keys()
    for name, br in buffers_r.items():
        if name.endswith("num_batches_tracked"):
            assert torch.equal(buffers_f[name], br), name
        else:
            assert_close_rel(buffers_f[name], br, tol, name)  # running_mean / running_var


@pytest.mark.parametrize("shape,memory_format", [
    ((3, 64, 7, 7), torch.contiguous_format),  # odd map, batch 3
    ((2, 64, 9, 5), torch.channels_last),  # non-square, NHWC
    ((1, 64, 6, 6), torch.contiguous_format),  # batch 1
], ids=["b3_7x7", "b2_9x5_cl", "b1_6x6"])
def test_block_training_matches_torchvision(shape, memory_format, device):
    """Outputs, input/weight/BN gradients and running stats of a fused GoogLeNet block in train
    mode equal torchvision's (float64) to <= 1e-4 relative, over two steps."""
    ref, fused = pair(0, device)
    x = torch.randn(shape, device=device).to(memory_format=memory_format)
    with overflow_checks():  # (under the interpreter: the training kernels' int32 arithmetic checked)
        check_training_parity(ref, fused, x)
    assert int(fused.branch1.bn.num_batches_tracked) == 2


@pytest.mark.parametrize("weights", ["contiguous", "channels_last"])
def test_train_launches_per_googlenet_block(interpreter_launches, weights):
    """A GoogLeNet block in train mode: forward = 4 launches of our kernels (per stage: the
    convolutions with the BN statistics, then normalise + ReLU into the output slices) + 3 torch
    kernels (one cat packs the parameters and zeroes the statistics; _foreach_add_ and
    _foreach_lerp_ update num_batches_tracked and the running stats) against torchvision's 26,
    plus one copy per 3x3 conv whose weight is not channels_last (the kernel reads weights in
    [cout, kh, kw, cin] order). Backward: 5 launches of ours (recompute the intermediate results;
    per stage the BN+ReLU reduction and gradient) + 18 torch kernels (4 convolution backwards,
    the pool recomputed into `mid`, where the pool branch's 1x1 reads it (layout._pool_first),
    and its backward; the rest small copies and adds) against eager's 23."""
    ref, fused = pair(1)
    ref.train()
    fused.train()
    if weights == "channels_last":
        fused.to(memory_format=torch.channels_last)
    x = torch.randn(2, ARGS[0], 5, 5, requires_grad=True)
    fused(x).sum().backward()  # first step: builds the training plan
    fused.zero_grad()
    del interpreter_launches[:]
    with count_launches() as n, count_torch_kernels() as k:
        y = fused(x)
    assert n.value == 4 and len(interpreter_launches) == 4
    copies = ["clone", "clone"] if weights == "contiguous" else []  # the two 3x3 convs' weights
    assert sorted(k.names) == ["_foreach_add_", "_foreach_lerp_", "cat"] + copies
    with count_torch_kernels() as eager:
        yr = ref(x)
    assert eager.value == 26  # 6 conv, 6 batch norm, 6 ReLU, 6 num_batches_tracked += 1, pool, cat

    if weights == "channels_last":
        return  # (backward: autograd copies the gradients into the parameters' layout)
    g = torch.randn_like(y)
    with count_launches() as nb, count_torch_kernels() as kb:
        y.backward(g)
    with count_torch_kernels() as eager_b:
        yr.backward(g)
    assert nb.value == 5
    assert kb.names.count("convolution_backward") == 4  # the merged 1x1s are one call
    assert (kb.value, eager_b.value) == (18, 23), (kb.names, eager_b.names)  # as the README's table says


def test_block_without_batchnorm_needs_one_launch_per_stage():
    """conv bias + ReLU branches (no BN): each stage's epilogue writes the results, no second launch."""
    ref = randomize_(SequentialNoBN(12), 2)
    fused, report = fuse(copy.deepcopy(ref))
    assert len(report.swapped) == 1
    x = torch.randn(2, 12, 6, 6)
    fused.train()(x)  # plan
    with count_launches() as n, count_torch_kernels() as k:
        fused(x)
    assert n.value == 2 and k.names == ["clone", "clone", "cat"]  # (the 3x3 and 5x5 weights, repacked)
    check_training_parity(ref, fused, x)


@pytest.mark.parametrize("make,shape", [
    (lambda: FusedInceptionA(16, 8), (2, 16, 5, 5)),  # 5x5 and double 3x3 chains, avg pool fused into a 1x1
    (lambda: FusedInceptionB(16), (2, 16, 9, 9)),  # stride 2, a pool-only branch
    (lambda: FusedInceptionC(16, 8), (2, 16, 7, 5)),  # 1x7 / 7x1 chains, 5 stages
    (lambda: FusedInceptionD(16), (2, 16, 9, 9)),  # stride 2 after 1x7 / 7x1
    (lambda: FusedInceptionE(16), (2, 16, 4, 3)),  # a tree: two convs read one intermediate slice
], ids=["v3_A", "v3_B", "v3_C", "v3_D", "v3_E"])
def test_inception_v3_blocks_train_like_eager(make, shape, device):
    fused = randomize_(make(), 3).to(device)
    check_training_parity(fused, fused, torch.randn(shape, device=device))  # the reference: its eager graph


def test_residual_block_trains_like_eager(device):
    """Inception-ResNet: relu(x + scale * (conv(cat) + bias)) as a fused stage in training too."""
    from fused_inception.models.inception_resnet_v2 import Block35

    original = randomize_(Block35(lambda n: max(n // 16, 1), scale=0.17), 4).to(device)
    ref = copy.deepcopy(original)
    fused, report = fuse(nn.Sequential(original))
    assert len(report.swapped) == 1
    check_training_parity(ref, fused[0], torch.randn(2, 20, 5, 5, device=device))


class PoolResidual(nn.Module):
    """A residual block whose concatenation holds a pool-only branch: the up-projection's weight
    gradient reads the pooled channels, which backward must recompute."""

    def __init__(self, c=6, pool=nn.MaxPool2d(3, 1, 1)):
        super().__init__()
        self.branch = nn.Sequential(nn.Conv2d(c, 4, 3, padding=1, bias=False), nn.BatchNorm2d(4), nn.ReLU())
        self.pool = pool
        self.up = nn.Conv2d(4 + c, c, 1)

    def forward(self, x):
        return F.relu(x + 0.2 * self.up(torch.cat([self.branch(x), self.pool(x)], 1)))


@pytest.mark.parametrize("pool", [nn.MaxPool2d(3, 1, 1), nn.AvgPool2d(3, 1, 1)], ids=["max", "avg"])
def test_residual_block_with_a_pool_only_branch(pool):
    original = randomize_(PoolResidual(pool=pool), 5)
    ref = copy.deepcopy(original)
    fused, report = fuse(nn.Sequential(original))
    assert len(report.swapped) == 1
    check_training_parity(ref, fused[0], torch.randn(2, 6, 5, 5))


def test_parameter_added_or_removed_after_construction():
    """A conv bias set (or removed) after the block was built is packed (or no longer) by the
    next training forward, as eager uses it."""
    ref, fused = pair(13)
    for model in (ref, fused):
        model.branch1.conv.bias = nn.Parameter(torch.full((ARGS[1],), 0.5))
    check_training_parity(ref, fused, torch.randn(2, ARGS[0], 5, 5), steps=1,
                          zero_grads=("branch1.conv.bias",))
    ref.load_state_dict(fused.state_dict())  # the running statistics the first step updated
    fused.zero_grad()
    for model in (ref, fused):
        model.branch1.conv.bias = None
    check_training_parity(ref, fused, torch.randn(2, ARGS[0], 5, 5), steps=1)


def test_training_plan_survives_eval_and_train():
    """train()/eval() rebuild the inference plan only: the training plan's device tensors (which
    a captured CUDA graph points to) stay."""
    _, fused = pair(14)
    plan = fused.train().train_plan(torch.float32, torch.device(DEVICE))
    fused.eval()
    fused.train()
    assert fused.train_plan(torch.float32, torch.device(DEVICE)) is plan


def test_momentum_none_no_affine_and_conv_bias():
    """Cumulative running averages (momentum=None), BN without affine parameters and a conv bias
    before BN, over three steps."""

    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.Sequential(nn.Conv2d(10, 6, 1), nn.BatchNorm2d(6, momentum=None), nn.ReLU())
            self.b = nn.Sequential(nn.Conv2d(10, 4, 1, bias=False), nn.BatchNorm2d(4, affine=False), nn.ReLU(),
                                   nn.Conv2d(4, 5, 3, padding=1, bias=False), nn.BatchNorm2d(5, eps=1e-2), nn.ReLU())

        def forward(self, x):
            return torch.cat([self.a(x), self.b(x)], 1)

    ref = randomize_(Block(), 5)
    fused, _ = fuse(copy.deepcopy(ref))
    check_training_parity(ref, fused, torch.randn(2, 10, 5, 6), steps=3, zero_grads=("a.0.bias",))
    assert int(fused.a[1].num_batches_tracked) == 3


def test_statistics_are_centred_on_the_running_mean():
    """A channel whose mean is 1000x its spread: summing x and x^2 in fp32 would lose the variance
    to cancellation; the kernels sum (x - running_mean), so once the running mean is near the
    batch mean the output is as accurate as eager (two-pass) BatchNorm."""
    ref, fused = pair(6)
    with torch.no_grad():
        ref.branch1.conv.weight.fill_(0.0)
        ref.branch1.conv.weight[:, 0].fill_(1e-3)
        ref.branch1.bn.running_mean.fill_(1000.0)  # as after training on such data
        ref.branch1.bn.running_var.fill_(1.0)
    fused.load_state_dict(ref.state_dict())
    x = torch.randn(2, ARGS[0], 6, 6)
    x[:, 0] = 1e6 + 1e3 * x[:, 0]  # branch1's pre-activations: 1000 + N(0, 1)
    ref64 = copy.deepcopy(ref).double().train()
    with torch.no_grad():
        expected = ref64(x.double())
        y = fused.train()(x)
        y_eager = ref.train()(x)
    err_fused = assert_close_rel(y[:, :ARGS[1]], expected[:, :ARGS[1]], 1e-2, "fused")
    err_eager = assert_close_rel(y_eager[:, :ARGS[1]], expected[:, :ARGS[1]], 1e-2, "eager")
    assert err_fused <= 2 * err_eager + 1e-4  # uncentred sums (running mean 0): 0.53 off of a max 3.5


def test_training_relu_is_exactly_zero_near_zero():
    """BatchNorm weights and biases of order 1e-3 put hundreds of pre-activations within 1e-4 of
    zero (asserted): the training epilogue (normalise, affine, ReLU) must leave no negative value
    and give the float64 reference's exact zeros (which a tolerance of 1e-4 of the max cannot see)."""
    ref, fused = pair(15)
    with torch.no_grad():
        for bn in (m for m in ref.modules() if isinstance(m, nn.BatchNorm2d)):
            bn.weight.mul_(1e-3)
            bn.bias.mul_(1e-3)
    fused.load_state_dict(ref.state_dict())
    x = torch.randn(2, ARGS[0], 5, 5)
    with torch.no_grad():
        with Decisions() as decisions:
            expected = copy.deepcopy(ref).double().train()(x.double())
        y = fused.train()(x)
    pre = decisions.pre_activation(expected)
    assert int(((pre < 0) & (pre > -1e-4)).sum()) > 100 and int(((pre > 0) & (pre < 1e-4)).sum()) > 100
    assert_relu_zero_pattern(y, pre, TOL[torch.float32], "output")
    assert_close_rel(y, expected, TOL[torch.float32], "output")


def test_non_finite_running_mean_does_not_spoil_the_batch_statistics():
    """One bad batch makes eager's running mean NaN or Inf too, and eager training goes on (its
    batch statistics don't read it); so must the fused statistics, which are centred on it."""
    ref, fused = pair(12)
    for model in (ref, fused):
        model.branch1.bn.running_mean[0] = float("nan")
        model.branch2[0].bn.running_mean[1:3] = float("inf")
    x = torch.randn(2, ARGS[0], 5, 5)
    ref64 = copy.deepcopy(ref).double().train()
    xr, xf = x.double().requires_grad_(), x.clone().requires_grad_()
    keep_relu_inputs_off_zero_(ref64, fused, lambda m: m(xr), TOL[torch.float32])  # (see check_training_parity)
    yr, yf = ref64(xr), fused.train()(xf)
    assert torch.isfinite(yf).all()
    assert_close_rel(yf, yr, TOL[torch.float32], "output")
    g = torch.randn_like(yf)
    yr.backward(g.double())
    yf.backward(g)
    assert_close_rel(xf.grad, xr.grad, TOL[torch.float32], "input grad")
    assert_close_rel(fused.branch2[0].bn.weight.grad, ref64.branch2[0].bn.weight.grad, TOL[torch.float32])


def test_gradcheck_float64():
    """torch.autograd.gradcheck of the fused training forward and backward in float64 (the
    Triton kernels run in float64 under the interpreter): input, conv weights, BN weights and
    biases, through merged GEMMs, the fused max pool and the intermediate results."""
    block = randomize_(FusedInception(4, 2, 2, 3, 2, 3, 2), 7).double().train()
    params = list(block.parameters())
    x = torch.randn(2, 4, 3, 3, dtype=torch.float64, requires_grad=True)

    def f(x, *_):
        return block._program.forward(Route.TRAIN, x)  # (forward() would take float64 eager)

    assert torch.autograd.gradcheck(f, (x, *params), eps=1e-6, atol=1e-6, rtol=1e-4, fast_mode=True)


def test_fallbacks_to_eager():
    """Eager (exactly torchvision's math) where fusing would differ: a BatchNorm frozen in eval
    inside a training block, and torch.use_deterministic_algorithms (the statistics use atomics)."""
    ref, fused = pair(8)
    x = torch.randn(2, ARGS[0], 5, 5)
    ref.train()
    fused.train()
    ref.branch2[0].bn.eval()
    fused.branch2[0].bn.eval()
    assert not fused.uses_kernels(x)
    with count_launches() as n:
        assert torch.equal(fused(x), ref(x))
    assert n.value == 0
    ref.branch2[0].bn.train()
    fused.branch2[0].bn.train()
    torch.use_deterministic_algorithms(True)
    try:
        assert not fused.uses_kernels(x)
    finally:
        torch.use_deterministic_algorithms(False)
    assert fused.uses_kernels(x)


@pytest.mark.parametrize("memory_format", [torch.contiguous_format, torch.channels_last])
def test_padded_stem_training_matches_torchvision(memory_format, device):
    """A GoogLeNet conv1 (3 input channels, 7x7/s2): the training forward runs the padded-input
    kernel (the input padded to 4 channels, the weights packed padded each step) and its backward
    the parameters' own layout; outputs, input and parameter gradients and running statistics
    against torchvision's BasicConv2d in float64, over two steps."""
    from torchvision.models.googlenet import BasicConv2d

    ref = randomize_(BasicConv2d(3, 24, kernel_size=7, stride=2, padding=3), 4).to(device)
    fused = FusedBasicConv2d(3, 24, kernel_size=7, stride=2, padding=3).to(device)
    fused.load_state_dict(ref.state_dict())
    x = torch.randn(2, 3, 13, 11, device=device).to(memory_format=memory_format)
    check_training_parity(ref, fused, x)
    assert fused.uses_kernels(x)


def test_one_value_per_channel_is_refused_like_batchnorm():
    conv = FusedBasicConv2d(3, 4, kernel_size=1).train()
    ref = nn.Sequential(nn.Conv2d(3, 4, 1, bias=False), nn.BatchNorm2d(4)).train()
    x = torch.randn(1, 3, 1, 1)
    with pytest.raises(ValueError, match="Expected more than 1 value per channel when training"):
        ref(x)
    with pytest.raises(ValueError, match="Expected more than 1 value per channel when training"):
        conv(x)


def test_double_backward_is_refused():
    """The backward's kernels are not differentiable: a second derivative raises instead of
    silently treating their results as constants."""
    conv = FusedBasicConv2d(3, 4, kernel_size=3, padding=1).train()
    x = torch.randn(2, 3, 4, 4, requires_grad=True)
    (dx,) = torch.autograd.grad(conv(x).square().sum(), x, create_graph=True)
    with pytest.raises(RuntimeError, match="once_differentiable"):
        dx.sum().backward()


def rel_l2(actual, exact):
    return ((actual.double() - exact).norm() / exact.norm()).item()


@pytest.mark.parametrize("amp", [torch.bfloat16, torch.float16])
def test_autocast_training(device, amp):
    """Under torch.autocast (bf16, fp16) a training step runs the kernels in the autocast dtype
    with fp32 accumulation and fp32 BN statistics. The output is within the dtype's tolerance of
    float64; the input gradient and the parameter gradients (all together) are as close to
    float64 as eager autocast's: relative L2 error at most twice eager's + 0.01 (through
    BatchNorm's backward, bf16 gradients are 1-7% off float64, in eager and fused alike)."""
    ref, fused = pair(9, device)
    ref64 = copy.deepcopy(ref).double().train()
    ref.train()
    fused.train()
    x = torch.randn(2, ARGS[0], 6, 6, device=device)
    g = torch.randn(2, 76, 6, 6, device=device)  # 16 + 32 + 16 + 12 output channels
    x64 = x.double().requires_grad_()
    y64 = ref64(x64)
    y64.backward(g.double())
    exact_grads = torch.cat([p.grad.flatten() for p in ref64.parameters()])
    errors = {}
    for name, module in (("fused", fused), ("eager", ref)):
        xi = x.clone().requires_grad_()
        with torch.autocast(device.type, dtype=amp):
            with count_launches() as n:
                y = module(xi)
        assert y.dtype == amp
        assert n.value == (4 if name == "fused" else 0)
        y.float().backward(g)
        assert_close_rel(y, y64, TOL[amp], f"{name} output")
        assert all(p.grad.dtype == torch.float32 for p in module.parameters())  # fp32 parameters, fp32 grads
        errors[name] = (rel_l2(xi.grad, x64.grad),
                        rel_l2(torch.cat([p.grad.flatten() for p in module.parameters()]), exact_grads))
    for i, what in enumerate(("input gradient", "parameter gradients")):
        assert errors["fused"][i] <= 2 * errors["eager"][i] + 0.01, (what, errors)


def test_eval_backward_through_fused_forward():
    """eval() without no_grad: the forward is the fused kernels (2 launches), the backward
    recomputes the eager graph; gradients equal torchvision's."""
    ref, fused = pair(1)
    ref.eval()
    fused.eval()
    x = torch.randn(2, ARGS[0], 6, 6)
    xr, xf = x.clone().requires_grad_(), x.clone().requires_grad_()
    yr = ref(xr)
    with count_launches() as n:
        yf = fused(xf)
    assert n.value == 2
    assert yf.grad_fn is not None
    g = torch.randn_like(yr)
    yr.backward(g)
    yf.backward(g)
    assert_close_rel(yf, yr, TOL[torch.float32], "output")
    assert_close_rel(xf.grad, xr.grad, TOL[torch.float32], "input grad")
    gr, gf = grads(ref), grads(fused)
    for name in gr:
        assert_close_rel(gf[name], gr[name], TOL[torch.float32], name)


def test_backward_refuses_after_in_place_update():
    """A parameter changed between the fused forward and its backward would give wrong gradients:
    autograd's saved-tensor check refuses instead (eval and train)."""
    for mode in ("eval", "train"):
        _, fused = pair(2)
        getattr(fused, mode)()
        y = fused(torch.randn(2, ARGS[0], 5, 5))
        with torch.no_grad():
            fused.branch1.conv.weight.add_(1.0)
        with pytest.raises(RuntimeError, match="modified by an inplace operation"):
            y.sum().backward()


@pytest.mark.skipif(DEVICE != "cuda", reason="CUDA graphs need a GPU")
def test_training_step_captured_in_a_cuda_graph(device):
    """Forward and backward of a fused block captured in one CUDA graph and replayed: no host
    synchronisation in the training path; the replay equals an eager step."""
    ref, fused = pair(10, device)
    fused.train()
    static_x = torch.randn(4, ARGS[0], 14, 14, device=device, requires_grad=True)
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):  # warm-up: plans, autotuning
        for _ in range(3):
            fused(static_x).sum().backward()
    torch.cuda.current_stream().wait_stream(stream)
    fused.zero_grad(set_to_none=False)
    static_x.grad = None
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static_y = fused(static_x)
        static_y.sum().backward()
    x = torch.randn_like(static_x)
    with torch.no_grad():
        static_x.copy_(x)
    fused.zero_grad(set_to_none=False)
    graph.replay()
    torch.cuda.synchronize()
    ref.train()
    xr = x.detach().clone().requires_grad_()
    yr = ref(xr)
    yr.sum().backward()
    assert_close_rel(static_y, yr, TOL[torch.float32], "output")
    assert_close_rel(fused.branch2[1].conv.weight.grad, ref.branch2[1].conv.weight.grad, TOL[torch.float32])
