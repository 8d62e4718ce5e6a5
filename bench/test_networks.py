"""Whole networks: GoogLeNet at 224x224 and Inception v3 at 299x299 (tiny on CPU), inference."""

import pytest

import cases


@pytest.mark.parametrize("impl", cases.IMPLS)
@pytest.mark.parametrize("dtype", list(cases.SUITE_DTYPES))
@pytest.mark.parametrize("batch", cases.BATCHES)
@pytest.mark.parametrize("network", list(cases.NETWORKS))
def test_network(benchmark, network, batch, dtype, impl):
    cases.check_and_measure(benchmark, "network", network, batch, dtype, impl)
