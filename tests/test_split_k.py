"""Split K: a stage launch of few programs (batch 1) runs its long convolutions in K slices and a
second launch adds their partial sums in slice order, then the epilogue (kconv.split_counts,
KIND_REDUCE). Against float64, in every dtype and memory format, with a residual, with merged
columns split between `out` and `mid`, in training; bitwise the same run to run (no atomics)."""

import pytest
import torch
import torch.nn.functional as F
from torchvision.models.googlenet import Inception

from conftest import TOL, assert_close_rel, randomize_, split_launches
from fused_inception import FusedInception, count_launches
from fused_inception.kernels import conv as kconv
from test_training import check_training_parity


def spec_of(kind=kconv.KIND_GEMM, k=3, tn=128):
    return kconv.problem_spec(kind=kind, kh=k, kw=k, tn=tn)


def test_the_rule():
    """Split only where the launch has fewer than 66 programs under 128x128 tiles, and only the
    convolutions (KIND_GEMM) of more than 16 K iterations (64-deep chunks, 32 for fp32), into a
    power of two of slices of at most 8 iterations."""
    three, one = spec_of(), spec_of(k=1)
    # a 3x3 of 96 channels (18 iterations) and a 1x1 of 192 (3) on a 7x7 map: 1 + 1 programs
    assert kconv.split_counts((three, one), (49, 49), (128, 128), (96, 192)) == (4, 1)
    assert kconv.split_counts((three, one), (49, 49), (128, 128), (96, 192), fp32=True) == (4, 1)  # 27 iterations
    assert kconv.split_counts((three,), (49,), (128,), (64,)) == (1,)  # 9 iterations: short enough
    assert kconv.split_counts((one,), (49,), (128,), (1040,)) == (4,)  # a 1x1 of 17 chunks
    assert kconv.split_counts((three,), (49,), (128,), (320,)) == (8,)  # 45 iterations
    # 66 programs or more: nothing split, however long
    assert kconv.split_counts((three,), (128 * 66, ), (128,), (832,)) == (1,)
    assert kconv.split_counts((three,), (128 * 65, ), (128,), (832,)) == (16,)  # 117 iterations
    # N tiles count with the problem's own width (tn): 32-wide tiles of 256 columns are 8 programs
    # (and its K chunk, tk: 832 channels in chunks of 16 are 52 per tap)
    assert kconv.split_counts((kconv.problem_spec(tk=16),), (49,), (128,), (832,)) == (8,)
    assert kconv.split_counts((spec_of(tn=32),), (128 * 9,), (256,), (832,)) == (1,)
    # the padded stem and pools are never split
    taps = spec_of(kind=kconv.KIND_GEMM_TAPS, k=7)
    assert kconv.split_counts((taps, spec_of(kind=kconv.KIND_POOL)), (49, 49), (64, 64), (4096, 4096)) == (1, 1)


def direct_stage(dtype, memory_format, batch=1):
    """Two problems on x (72 channels, 6x5): a 3x3 to 40 columns with x's first 40 channels added
    and a ReLU (split: 18 iterations, 27 in fp32), and a 1x1 to 24 columns (not split), into
    out[:, 3:43] and out[:, 43:67] of a 70-channel output."""
    g = torch.Generator().manual_seed(3)
    x = torch.randn(batch, 72, 6, 5, generator=g).to(dtype).contiguous(memory_format=memory_format)
    w3 = torch.randn(40, 72, 3, 3, generator=g) / 25
    w1 = torch.randn(24, 72, 1, 1, generator=g) / 8
    shift = torch.randn(64, generator=g)
    # (dalign 1: the output slices start at channels 3 and 43)
    spec = (kconv.problem_spec(kh=3, kw=3, ph=1, pw=1, res=kconv.RES_X, act=kconv.ACT_RELU, align=8, walign=8,
                               dalign=1, tn=64),
            kconv.problem_spec(align=8, walign=8, dalign=1, tn=32))
    k3, k1 = 9 * 72, 72
    # cin, ncols, src_c, split, dst0_c, dst1_c, w_off, w_ld, ss_off, res_c (kconv.TABLE_FIELDS)
    table = torch.tensor([[72, 40, 0, 40, 3, 3, 0, k3, 0, 0], [72, 24, 0, 24, 43, 43, 40 * k3, k1, 40, 0]],
                         dtype=torch.int32)
    weight = torch.cat([w3.permute(0, 2, 3, 1).reshape(-1), w1.permute(0, 2, 3, 1).reshape(-1)]).to(dtype)
    out = torch.full((batch, 70, 6, 5), float("nan"), dtype=dtype).contiguous(memory_format=memory_format)
    xd, b = x.double(), shift.double().view(1, -1, 1, 1)
    w3d, w1d = weight[:40 * k3].double().view(40, 3, 3, 72).permute(0, 3, 1, 2), weight[40 * k3:].double().view(
        24, 72, 1, 1)
    expected = torch.cat([F.relu(F.conv2d(xd, w3d, padding=1) + b[:, :40] + xd[:, :40]), F.conv2d(xd, w1d) + b[:, 40:]], 1)
    launch = kconv.StageLaunch(spec, table, (40, 24), (k3, k1), x, out, out)
    return launch, (weight, None, shift, x, out, out), expected


@pytest.mark.parametrize("dtype,memory_format", [(torch.float32, torch.contiguous_format),
                                                 (torch.bfloat16, torch.channels_last),
                                                 (torch.float16, torch.channels_last)], ids=["fp32", "bf16_cl", "fp16_cl"])
def test_split_stage_matches_float64_and_repeats_bitwise(dtype, memory_format):
    launch, args, expected = direct_stage(dtype, memory_format)
    assert [kconv.spec_field(p, "ks") for p in launch.spec] == [4, 1]  # (18 or, in fp32, 27 iterations)
    assert launch.finish is not None
    assert [kconv.spec_field(p, "kind") for p in launch.finish.spec] == [kconv.KIND_REDUCE, kconv.KIND_SKIP]
    out = args[4]
    with count_launches() as n:
        launch(*args)
    assert n.value == 2
    assert_close_rel(out[:, 3:67], expected, TOL[dtype], str(dtype))
    assert out[:, :3].isnan().all() and out[:, 67:].isnan().all()  # (nothing outside its slices)
    first = out.clone()
    out.fill_(float("nan"))
    launch(*args)
    assert torch.equal(first[:, 3:67], out[:, 3:67])  # the same bits: the partial sums add in a fixed order


def test_not_split_at_a_larger_batch():
    """The same stage at batch 32 (960 pixels, 8 x (1 + 1) programs) is still below 66 programs and
    splits; at batch 300 (9000 pixels, 71 x 2 programs) it does not, and is one launch."""
    assert direct_stage(torch.bfloat16, torch.channels_last, batch=32)[0].finish is not None
    launch, args, expected = direct_stage(torch.bfloat16, torch.channels_last, batch=300)
    assert launch.finish is None and all(kconv.spec_field(p, "ks") == 1 for p in launch.spec)


def test_googlenet_block_at_batch_1_splits_and_matches_torchvision():
    """inception4e at 7x7 and batch 1 (its size in GoogLeNet at 224x224), bf16: stage 2's 3x3s
    (160 input channels in chunks of 32: 45 iterations; 32: 9) and the pool branch's 1x1 (528: 9)
    make 5 + 1 + 1 programs; the 160-channel one splits into 8 slices. Stage 1 (1x1s of 528
    channels) is not split."""
    args = (528, 256, 160, 320, 32, 128, 128)
    ref = randomize_(Inception(*args), 4).eval()
    fused = FusedInception(*args).eval()
    fused.load_state_dict(ref.state_dict())
    fused = fused.to(torch.bfloat16)
    x = torch.randn(1, 528, 7, 7)
    with torch.no_grad(), count_launches() as n:
        y = fused(x.to(torch.bfloat16))
        expected = ref.double()(x.double())
    assert split_launches(fused) == 1 and n.value == 3
    stage2 = next(launch for launch in fused.plan().launches() if launch.finish is not None)
    assert sorted(kconv.spec_field(p, "ks") for p in stage2.spec if kconv.spec_field(p, "kind") == kconv.KIND_GEMM) == [
        1, 1, 8]
    assert_close_rel(y, expected, TOL[torch.bfloat16], "inception4e at batch 1")


def test_training_through_split_stages():
    """A GoogLeNet-style block whose 3x3 reads 40 channels (fp32: 18 iterations) splits K in
    training too: the batch statistics come from the reduction's epilogue. Two steps of outputs,
    gradients and running statistics against torchvision in float64."""
    args = (64, 16, 40, 32, 8, 16, 12)
    ref = randomize_(Inception(*args), 2)
    fused = FusedInception(*args)
    fused.load_state_dict(ref.state_dict())
    check_training_parity(ref, fused, torch.randn(2, 64, 6, 5))
    assert split_launches(fused) == 1
