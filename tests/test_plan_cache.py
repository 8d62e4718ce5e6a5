"""A stale plan never produces an answer: every way the weights or the mode change is seen."""

import pytest
import torch

from conftest import TOL, assert_close_rel, randomize_
from fused_inception import FusedInception

ARGS = (24, 8, 8, 16, 4, 8, 8)


@pytest.fixture
def block():
    return randomize_(FusedInception(*ARGS), 0).eval()


def check(block, x):
    """Fused (plan) output equals the eager graph for the module's current state."""
    with torch.no_grad():
        assert block.uses_kernels(x)
        y = block(x)
        expected = block.graph().eager(x)
    assert_close_rel(y, expected, TOL[torch.float32])
    return y


@pytest.fixture
def x():
    return torch.randn(2, 24, 5, 5)


def test_plan_is_cached(block, x):
    check(block, x)
    plan = block.plan()
    check(block, x)
    assert block.plan() is plan


def test_load_state_dict(block, x):
    before = check(block, x)
    block.load_state_dict(randomize_(FusedInception(*ARGS), 1).state_dict())
    after = check(block, x)
    assert not torch.allclose(before, after)


def test_optimizer_step(block, x):
    before = check(block, x)
    opt = torch.optim.SGD(block.parameters(), lr=0.5)
    block(x.requires_grad_()).square().sum().backward()
    opt.step()
    after = check(block, x.detach())
    assert not torch.allclose(before, after)


def test_train_eval_flip_updates_running_stats(block, x):
    before = check(block, x)
    block.train()
    block(x)  # updates running stats (eager, batch statistics)
    block.eval()
    after = check(block, x)
    assert not torch.allclose(before, after)


def test_to_dtype_and_half(block, x):
    check(block, x)
    block.half()
    with torch.no_grad():
        y = block(x.half())
        expected = block.float().graph().eager(x)
    assert y.dtype == torch.float16
    assert_close_rel(y, expected, TOL[torch.float16])
    check(block, x)  # back to float32


def test_replaced_submodule(block, x):
    before = check(block, x)
    block.branch1.bn = randomize_(torch.nn.BatchNorm2d(8, eps=1e-3), 5).eval()
    after = check(block, x)
    assert not torch.allclose(before, after)


def test_write_through_data_needs_invalidate(block, x):
    """Writes through `.data` are invisible to autograd's version counter: the documented remedy."""
    check(block, x)
    block.branch1.conv.weight.data.mul_(2)
    block.invalidate_plan()
    check(block, x)


def test_assigned_parameter_and_buffer(block, x):
    before = check(block, x)
    block.branch1.conv.weight = torch.nn.Parameter(torch.randn_like(block.branch1.conv.weight))
    after = check(block, x)
    assert not torch.allclose(before, after)
    block.branch2[0].bn.running_mean = torch.randn_like(block.branch2[0].bn.running_mean)
    assert not torch.allclose(after, check(block, x))


def test_load_after_half_updates_the_replaced_buffers(block, x):
    """.half() replaces buffers in the module dicts (no registration hook fires); a following
    load_state_dict writes into the new ones, and the plan must see it."""
    block.half()
    with torch.no_grad():
        block(x.half())
    block.load_state_dict(randomize_(FusedInception(*ARGS), 9).half().state_dict())
    with torch.no_grad():
        y = block(x.half())
        expected = block.float().graph().eager(x)
    assert_close_rel(y, expected, TOL[torch.float16])


def test_plain_attribute_changes_are_seen(block, x):
    """The recipe is traced from Python attributes too: BN eps and a replaced pool are seen."""
    before = check(block, x)
    block.branch1.bn.eps = 0.5
    after = check(block, x)
    assert not torch.allclose(before, after)
    block.branch4[0] = torch.nn.AvgPool2d(3, stride=1, padding=1)
    assert block.graph().nodes[5].pool.kind == "avg"
    assert not torch.allclose(after, check(block, x))


def test_residual_scale_as_a_python_float_is_seen():
    from fused_inception import fuse
    from fused_inception.models.inception_resnet_v2 import Block35

    model, _ = fuse(torch.nn.Sequential(randomize_(Block35(lambda n: max(n // 16, 1), scale=0.17), 3).eval()))
    x = torch.randn(1, 20, 4, 4)
    with torch.no_grad():
        before = model(x)
        model[0]._original.scale = 0.5
        after = model(x)
        expected = model[0].eager_forward(x)
    assert not torch.allclose(before, after)
    assert_close_rel(after, expected, TOL[torch.float32])


def test_block_made_under_inference_mode():
    with torch.inference_mode():
        block = randomize_(FusedInception(*ARGS), 4).eval()
        x = torch.randn(1, 24, 5, 5)
        assert_close_rel(block(x), block.eager_forward(x), TOL[torch.float32])
