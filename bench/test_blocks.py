"""Per block: every GoogLeNet Inception block, the first Inception v3 block of each type and
Inception-ResNet-v2's Block35 (bench/cases.py BLOCKS; in the interpreter one block of each kind),
inference."""

import pytest

import cases


@pytest.mark.parametrize("impl", cases.IMPLS)
@pytest.mark.parametrize("dtype", list(cases.SUITE_DTYPES))
@pytest.mark.parametrize("batch", cases.BATCHES)
@pytest.mark.parametrize("name", cases.SUITE_BLOCKS)
def test_block(benchmark, name, batch, dtype, impl):
    cases.check_and_measure(benchmark, "block", name, batch, dtype, impl)
