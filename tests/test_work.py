"""fused_inception.work: what each stage launch asks of the GPU (programs, K iterations, useful vs
issued MACs), counted by hand for GoogLeNet's inception3a."""

import torch

from fused_inception import FusedInception, codegen, work
from fused_inception.kernels import conv as kconv


def test_inception3a_stage_2_counted_by_hand():
    """Stage 2 of inception3a (28x28): a 3x3 96->128, a 3x3 16->32 and the pool branch's 1x1
    192->32 (its pool ran in stage 1). The 32-column problems take 32-wide N tiles (plan.n_tile:
    spec field tn), the 128-column one the config's. Under 64x64x64 tiles (bf16): batch 1 has
    M = 784 pixels, 13 row tiles; 2 + 1 + 1 column tiles: 52 programs; the 96-channel conv runs
    9 taps x 2 chunks = 18 K iterations (the longest). At batch 256 M divides by 64, so the
    padding is K's alone (864 of 1152, 144 of 576, none of 192): useful / issued =
    (128 x 864 + 32 x 144 + 32 x 192) / (128 x 1152 + 32 x 576 + 32 x 192) = 79/112. Under
    128x128 tiles the 32-column problems would have been 25 % useful without their own tile.

    Split K (kconv.split_counts): at batch 1 the stage has 7 x (1 + 1 + 1) = 21 programs under
    128x128 tiles, fewer than 66, so the 18-iteration conv runs in ceil(18 / 8) = 3 slices of 6:
    13 x 2 x 3 + 13 + 13 = 104 programs, the longest now the 16-channel conv's 9 iterations, and a
    third launch adds the partial sums. At batch 32 (3136 programs) nothing is split."""
    block = FusedInception(192, 64, 96, 128, 16, 32, 32).eval().to(torch.bfloat16)
    x = torch.empty(1, 192, 28, 28, dtype=torch.bfloat16).to(memory_format=torch.channels_last)
    launches = codegen.record_launches(block, x)
    assert len(launches) == 3  # stage 1; stage 2's K slices, then their reduction
    _, args, consts, _ = launches[1]
    assert [kconv.spec_field(p, "ks") for p in consts["SPEC"]] == [3, 1, 1]
    assert work.is_finish(launches[2][2]) and not work.is_finish(consts)
    problems = work.problems_of(args, consts)
    assert [(p[0], p[1], p[3], p[4], p[5], p[6]) for p in problems] == [(kconv.KIND_GEMM, 3, 96, 128, 784, 128),
                                                                         (kconv.KIND_GEMM, 3, 16, 32, 784, 32),
                                                                         (kconv.KIND_GEMM, 1, 192, 32, 784, 32)]
    config = kconv.CONFIGS[kconv.CONFIG_NAMES.index("m64n64k64w4s3")]
    programs, longest, useful, issued, split = work.tile_work(problems, config, 1)
    assert (programs, longest, split) == (104, 9, True)
    assert useful == 784 * (128 * 864 + 32 * 144 + 32 * 192)
    assert issued == 13 * 64 * (128 * 1152 + 32 * 576 + 32 * 192)
    programs, longest, useful, issued, split = work.tile_work(problems, config, 32)
    assert (programs, longest, split) == (392 * 4, 18, False)
    programs, longest, useful, issued, split = work.tile_work(problems, config, 256)
    assert programs == 3136 * 4 and useful / issued == 79 / 112 and not split
    wide = kconv.CONFIGS[kconv.CONFIG_NAMES.index("m128n128k64w8s3")]
    _, _, useful, issued, _ = work.tile_work(problems, wide, 256)
    assert useful / issued == 79 / 112  # (the same: each problem's N tile is its own)
    rows = work.work_table(launches)
    assert len(rows) == 2 + 2 * 4  # (two launches, the reduction counted with its stage; four configs each)
    assert any("3x3 96->128, 3x3 16->32, 1x1 192->32 | m64n64k64w4s3 | 104+r/1568/12544 | 9/18/18 | 71%" in r
               for r in rows), rows
