"""Whole networks: GoogLeNet at 224x224 and Inception v3 at 299x299 (tiny on CPU), inference."""

import pytest
import torch
import torchvision

from cases import BATCHES, DEVICE, DTYPES, IMPLS, NETWORK_SIZE, check_and_measure, prepare, skip_reason
from fused_inception import models
from fused_inception.report import informative_init_


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("dtype", list(DTYPES))
@pytest.mark.parametrize("batch", BATCHES)
@pytest.mark.parametrize("network", ["googlenet", "inception_v3"])
def test_network(benchmark, network, batch, dtype, impl):
    reason = skip_reason(impl, batch)
    if reason:
        pytest.skip(reason)
    torch.manual_seed(0)
    reference = informative_init_(getattr(torchvision.models, network)(weights=None, aux_logits=False,
                                                                        init_weights=True), 0).eval()
    fused = getattr(models, network)(aux_logits=False).eval()
    fused.load_state_dict(reference.state_dict())
    convert = dict(device=DEVICE, dtype=DTYPES[dtype], memory_format=torch.channels_last)
    reference, fused = reference.to(**convert), fused.to(**convert)
    size = NETWORK_SIZE[network]
    x = torch.randn(batch, 3, size, size).to(**convert)
    run = prepare(reference, fused, impl, x)
    with torch.no_grad():
        expected = reference(x)
    tolerance = {"fp32": 1e-2, "bf16": 1e-1, "fp16": 5e-2}[dtype]
    check_and_measure(benchmark, run, impl, expected, tolerance,
                      dict(network=network, batch=batch, dtype=dtype, layout="channels_last", input=list(x.shape)))
