"""Inception v3: drop-in blocks A..E against torchvision's, and the whole network."""

import pytest
import torch
import torchvision
from torchvision.models import inception as tv

from conftest import TOL, Decisions, assert_close_rel, assert_relu_zero_pattern, randomize_, split_launches
from fused_inception import (FusedInceptionA, FusedInceptionB, FusedInceptionC, FusedInceptionD,
                             FusedInceptionE, build_plans, count_launches)
from fused_inception.launches import count_torch_kernels
from fused_inception.models import InceptionOutputs, inception_v3

# (fused, torchvision, args as in Inception3, input size, launches = longest chain)
BLOCKS = [
    (FusedInceptionA, tv.InceptionA, (192, 32), 9, 3),  # 1x1 -> 3x3 -> 3x3
    (FusedInceptionB, tv.InceptionB, (288,), 9, 3),  # 1x1 -> 3x3 -> 3x3/s2; max pool/s2 in stage 1
    (FusedInceptionC, tv.InceptionC, (768, 128), 5, 5),  # 1x1 -> 7x1 -> 1x7 -> 7x1 -> 1x7
    (FusedInceptionD, tv.InceptionD, (768,), 9, 4),  # 1x1 -> 1x7 -> 7x1 -> 3x3/s2
    (FusedInceptionE, tv.InceptionE, (1280,), 5, 3),  # 1x1 -> 3x3 -> (1x3 | 3x1)
]


@pytest.mark.parametrize("fused_cls,tv_cls,args,size,launches", BLOCKS, ids=[b[1].__name__ for b in BLOCKS])
def test_block_matches_torchvision(fused_cls, tv_cls, args, size, launches, device, interpreter_launches):
    ref = randomize_(tv_cls(*args), 0).eval()
    fused = fused_cls(*args).eval()
    fused.load_state_dict(ref.state_dict())
    assert list(fused.state_dict()) == list(ref.state_dict())
    fused = fused.to(device)
    x = torch.randn(2, args[0], size, size)
    with torch.no_grad():
        with Decisions() as decisions:
            expected = ref.double()(x.double())
        with count_launches() as n:
            y = fused(x.to(device))
    assert n.value == launches + split_launches(fused) == fused.launches + split_launches(fused) == len(
        interpreter_launches)
    assert_close_rel(y, expected, TOL[torch.float32], tv_cls.__name__)
    # The exact zeros of the reference's ReLUs (not the channels of B's and D's pool-only branch).
    assert_relu_zero_pattern(y, decisions.pre_activation(expected), TOL[torch.float32], tv_cls.__name__)


@pytest.fixture(scope="module")
def v3_models():
    ref = randomize_(torchvision.models.inception_v3(weights=None, aux_logits=True, init_weights=True), 0)
    fused = inception_v3(aux_logits=True)
    fused.load_state_dict(ref.state_dict())
    return ref, fused


def test_state_dict_keys(v3_models):
    ref, fused = v3_models
    assert list(fused.state_dict()) == list(ref.state_dict())


def test_whole_network_at_75x75(v3_models, device):
    """The smallest legal input. Launches: 5 stem convs + 3x3 (A) + 3 (B) + 4x5 (C) + 4 (D) + 2x3 (E)
    = 47 Triton launches, plus the stem's input padded to 4 channels (a cat), 2 stem max pools, the
    global average pool and the fc = 5 torch kernels."""
    ref, fused = v3_models
    ref.eval()
    fused = fused.eval().to(device)
    x = torch.randn(1, 3, 75, 75)
    build_plans(fused, example=x.to(device))  # plans (and on a GPU the autotuning) before counting
    with torch.no_grad():
        expected = ref.double()(x.double())
        ref.float()
        with count_launches() as n, count_torch_kernels() as kernels:
            logits = fused(x.to(device))
    assert n.value == 47 + split_launches(fused)  # (split K's reductions at this small input)
    assert kernels.value == 5, kernels.names
    assert_close_rel(logits, expected, 5 * TOL[torch.float32], "logits")
    assert expected.std() > 0.1 * expected.abs().max()


def test_train_mode_outputs_are_torchvision_s(v3_models):
    """Train mode returns InceptionOutputs(logits, aux), transform_input included. Under
    torch.use_deterministic_algorithms the blocks take the eager path (the fused batch statistics
    use atomics): bit-identical to torchvision. (Fused training of every v3 block type is checked
    in test_training.py: the aux head needs 299x299 inputs, minutes through the interpreter.)"""
    ref, fused = v3_models
    ref_t = torchvision.models.inception_v3(weights=None, aux_logits=True, transform_input=True, init_weights=True)
    fused_t = inception_v3(aux_logits=True, transform_input=True)
    ref_t.load_state_dict(ref.state_dict())
    fused_t.load_state_dict(ref.state_dict())
    x = torch.randn(2, 3, 299, 299)  # the aux head's 5x5 conv after a 5x5/s3 pool needs 17x17 maps
    torch.manual_seed(3)
    out_ref = ref_t.train()(x)
    torch.manual_seed(3)
    torch.use_deterministic_algorithms(True)
    try:
        out = fused_t.train()(x)
    finally:
        torch.use_deterministic_algorithms(False)
    assert isinstance(out, InceptionOutputs)
    for a, b, what in zip(out, out_ref, out._fields):
        assert torch.equal(a, b), what
