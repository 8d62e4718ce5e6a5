"""Whole fused GoogLeNet against torchvision's, with torchvision's state_dict loaded."""

import pytest
import torch
import torchvision

from conftest import TOL, assert_close_rel, randomize_, split_launches
from fused_inception import build_plans, count_launches
from fused_inception.launches import count_torch_kernels
from fused_inception.models import GoogLeNetOutputs, googlenet

# Launches of one eval forward: Triton: conv1, conv2, conv3 (1 each) + 9 Inception blocks x 2 = 21;
# torch kernels: conv1's 3-channel input padded to 4 (one cat: plan.input_padding), 4 max pools,
# the adaptive avg pool and the fc's addmm = 7 (+2, mul and add, with transform_input).
# torchvision's eager model takes 195.
TRITON_LAUNCHES = 21
TORCH_KERNELS = 7


@pytest.fixture(scope="module")
def models():
    torch.manual_seed(0)
    ref = randomize_(torchvision.models.googlenet(weights=None, aux_logits=True, init_weights=True), 0).eval()
    fused = googlenet(aux_logits=True).eval()
    fused.load_state_dict(ref.state_dict())  # strict: every key matches
    return ref, fused


def test_state_dict_keys_match_torchvision(models):
    ref, fused = models
    assert list(fused.state_dict()) == list(ref.state_dict())
    no_aux = googlenet(aux_logits=False)
    tv_no_aux = torchvision.models.googlenet(weights=None, aux_logits=False, init_weights=True)
    assert list(no_aux.state_dict()) == list(tv_no_aux.state_dict())


def test_logits_match_torchvision_and_launch_count(models, device, interpreter_launches):
    ref, fused = models
    fused = fused.to(device)
    x = torch.randn(2, 3, 64, 64, device=device)
    with torch.no_grad():
        expected = ref.double()(x.double().cpu())
        ref.float()
        build_plans(fused, example=x)  # plans (and on a GPU the autotuning) before counting
        with count_launches() as n, count_torch_kernels() as kernels:
            logits = fused(x)
    splits = split_launches(fused)  # (split K's reductions at this small input)
    assert n.value == TRITON_LAUNCHES + splits == len(interpreter_launches)
    assert kernels.value == TORCH_KERNELS, kernels.names
    assert n.value - splits + kernels.value <= 30
    assert_close_rel(logits, expected, 5 * TOL[torch.float32], "logits")
    assert expected.std() > 0.1 * expected.abs().max()  # the logits depend on the input, not just the bias


def test_eager_reference_launches(models):
    """The number the report compares against: torchvision's eager GoogLeNet, counted the same way."""
    ref, _ = models
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad(), count_torch_kernels() as kernels:
        ref(x)
    assert kernels.value == 195


def test_transform_input_and_train_outputs(models):
    """transform_input matches torchvision's; train mode returns GoogLeNetOutputs with aux heads
    (under torch.use_deterministic_algorithms: the eager fallback, bit-identical; fused training
    of the network is test_training_network.py)."""
    ref, fused = models
    ref_t = torchvision.models.googlenet(weights=None, aux_logits=True, transform_input=True, init_weights=True)
    fused_t = googlenet(aux_logits=True, transform_input=True)
    ref_t.load_state_dict(ref.state_dict())
    fused_t.load_state_dict(ref.state_dict())
    x = torch.randn(2, 3, 40, 40)
    torch.manual_seed(1)
    out_ref = ref_t.train()(x)
    torch.manual_seed(1)
    torch.use_deterministic_algorithms(True)
    try:
        out = fused_t.train()(x)
    finally:
        torch.use_deterministic_algorithms(False)
    assert isinstance(out, GoogLeNetOutputs)
    for a, b, what in zip(out, out_ref, out._fields):
        assert torch.equal(a, b), what  # the eager graph: bit-identical
    with torch.no_grad():
        ref_t.eval()
        fused_t.eval()
        build_plans(fused_t, example=x)  # plans (and on a GPU the autotuning) before counting
        with count_torch_kernels() as kernels:
            y = fused_t(x)
        assert kernels.value == TORCH_KERNELS + 2
        assert_close_rel(y, ref_t(x), 5 * TOL[torch.float32], "transform_input logits")


def test_weights_argument_is_refused():
    with pytest.raises(ValueError, match="does not download"):
        googlenet(weights="IMAGENET1K_V1")
