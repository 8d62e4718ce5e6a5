"""fused_inception.work: what each stage launch asks of the GPU (programs, K iterations, useful vs
issued MACs), counted by hand for GoogLeNet's inception3a."""

import torch

from fused_inception import FusedInception, codegen, work
from fused_inception.kernels import conv as kconv


def test_inception3a_stage_2_counted_by_hand():
    """Stage 2 of inception3a (28x28): a 3x3 96->128, a 3x3 16->32 and the pool branch's 1x1
    192->32 (its pool ran in stage 1). Each problem takes its own N tile and K chunk cap
    (plan.gemm_tiles: spec fields tn, tk): 128 x 32 for the 96-channel conv (3 exact chunks per
    tap instead of 2 of 64), 32 x 32 for the 16-channel one (its channels are half a chunk:
    the least padding a 16-byte weight copy allows), 32 x 64 for the 1x1. Under 64x64x64 tiles
    (bf16): at batch 256 M divides by 64, so only the 16-channel conv pads:
    useful / issued = (128 x 864 + 32 x 144 + 32 x 192) / (128 x 864 + 32 x 288 + 32 x 192) = 79/82
    (it was 79/112 with one N tile and 64-deep chunks for all).

    Split K (kconv.split_counts): at batch 1 (M = 784, 13 row tiles) the stage has 7 x (1 + 1 + 1)
    = 21 programs under 128x128 tiles, fewer than 66, so the 27-iteration conv runs in 4 slices
    (ceil(27 / 8) = 4) of at most 7: 13 x 2 x 4 + 13 + 13 = 130 programs, the longest now the
    16-channel conv's 9 iterations, and a third launch adds the partial sums. At batch 32 (1568
    programs) nothing is split."""
    block = FusedInception(192, 64, 96, 128, 16, 32, 32).eval().to(torch.bfloat16)
    x = torch.empty(1, 192, 28, 28, dtype=torch.bfloat16).to(memory_format=torch.channels_last)
    launches = codegen.record_launches(block, x)
    assert len(launches) == 3  # stage 1; stage 2's K slices, then their reduction
    _, args, consts, _ = launches[1]
    assert [kconv.spec_field(p, "ks") for p in consts["SPEC"]] == [4, 1, 1]
    assert [kconv.spec_field(p, "tk") for p in consts["SPEC"]] == [32, 32, 0]
    assert work.is_finish(launches[2][2]) and not work.is_finish(consts)
    problems = work.problems_of(args, consts)
    assert [(p[0], p[1], p[3], p[4], p[5], p[6]) for p in problems] == [(kconv.KIND_GEMM, 3, 96, 128, 784, 128),
                                                                         (kconv.KIND_GEMM, 3, 16, 32, 784, 32),
                                                                         (kconv.KIND_GEMM, 1, 192, 32, 784, 32)]
    config = kconv.CONFIGS[kconv.CONFIG_NAMES.index("m64n64k64w4s3")]
    programs, longest, useful, issued, split = work.tile_work(problems, config, 1)
    assert (programs, longest, split) == (130, 9, True)
    assert useful == 784 * (128 * 864 + 32 * 144 + 32 * 192)
    assert issued == 13 * 64 * (128 * 864 + 32 * 288 + 32 * 192)
    programs, longest, useful, issued, split = work.tile_work(problems, config, 32)
    assert (programs, longest, split) == (392 * 4, 27, False)
    programs, longest, useful, issued, split = work.tile_work(problems, config, 256)
    assert programs == 3136 * 4 and useful / issued == 79 / 82 and not split
    wide = kconv.CONFIGS[kconv.CONFIG_NAMES.index("m128n128k64w8s3")]
    _, _, useful, issued, _ = work.tile_work(problems, wide, 256)
    assert useful / issued == 79 / 82  # (the same: each problem's tiles are its own)
    rows = work.work_table(launches)
    # (two launches, the reduction counted with its stage: stage 1 under the four configs, stage 2,
    # with a 32 x 32 weight tile, under the three of 4 warps: kconv.configs_for)
    assert len(rows) == 2 + 4 + 3
    assert any("3x3 96->128, 3x3 16->32, 1x1 192->32 | m64n64k64w4s3 | 130+r/1568/12544 | 9/27/27 | 96%" in r
               for r in rows), rows
