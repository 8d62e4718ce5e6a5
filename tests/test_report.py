"""The main job, `python -m fused_inception`, on a small input through the interpreter."""

import subprocess
import sys

import pytest

from fused_inception.report import main


# Split K's reductions at these small fp32 inputs (kconv.split_counts: every stage has few
# programs): GoogLeNet's 3x3 stages of 64 to 192 input channels (chunks of 32 in fp32: 18 to 54
# K iterations) split, and from inception4e on the merged 1x1s of 528 channels and more too.
GOOGLENET_BLOCK_LAUNCHES = [3] * 6 + [4] * 3  # 3a-4d: 2 stages + 1 reduction; 4e-5b: + 2
V3_BLOCK_LAUNCHES = [5, 6, 10, 8, 6]  # Inception v3 at 75x75: A/B/C/D/E's 3/3/5/4/3 stages, most split


def test_report_rows(capsys):
    rows = main(["--batch", "1", "--size", "32", "--device", "cpu"])
    out = capsys.readouterr().out
    assert "| inception3a | 20 | 3 |" in out
    blocks = {r.name: r for r in rows}
    # (conv1's 3-channel input is padded to 4 first: one cat, see plan.input_padding; conv3's
    # 3x3 of 64 channels splits K: 18 iterations)
    for name, fused in (("conv1", 2), ("conv2", 1), ("conv3", 2)):
        assert (blocks[name].eager_launches, blocks[name].fused_launches) == (3, fused)
    for r, fused in zip(rows[3:-1], GOOGLENET_BLOCK_LAUNCHES, strict=True):
        assert (r.eager_launches, r.fused_launches) == (20, fused), r.name
        assert r.fused_mb < r.eager_mb, r.name
        assert r.max_abs_err <= 1e-4 * r.max_abs_ref, r.name
    whole = rows[-1]
    assert (whole.eager_launches, whole.fused_launches) == (195, 28 + 1 + 12)
    assert whole.max_abs_err <= 5e-4 * whole.max_abs_ref


def test_help_explains_the_options():
    r = subprocess.run([sys.executable, "-m", "fused_inception", "--help"], capture_output=True, text=True)
    assert r.returncode == 0
    for option in ("--batch", "--size", "--dtype", "--device"):
        assert option in r.stdout


def test_report_inception_v3():
    """`--model inception_v3` at the smallest legal input (75x75, fp32): A/B/C/D/E have 3/3/5/4/3
    stages, and at this size nearly every stage has few programs and splits K (one reduction
    launch more: kconv.split_counts): 5/6/10/8/6 launches, 312 -> 92 in all (52 without the
    reductions)."""
    rows = main(["--model", "inception_v3", "--device", "cpu"])
    launches = {r.name: r.fused_launches for r in rows}
    assert [launches[f"Mixed_{n}"] for n in ("5b", "6a", "6b", "7a", "7b")] == V3_BLOCK_LAUNCHES
    whole = rows[-1]
    assert (whole.eager_launches, whole.fused_launches) == (312, 92)
    for r in rows[:-1]:
        assert r.max_abs_err <= 1e-4 * r.max_abs_ref, r.name


def test_report_inception_resnet_v2():
    """`--model inception_resnet_v2` (1/8 width on CPU): every Mixed and residual block and the 6
    stem conv units listed."""
    rows = main(["--model", "inception_resnet_v2", "--device", "cpu"])
    launches = {r.name: (r.eager_launches, r.fused_launches) for r in rows}
    assert len(rows) == 43 + 6 + 1
    assert launches["conv2d_1a"] == (3, 2) and launches["conv2d_7b"] == (3, 1)  # (1a: its input padded)
    assert launches["mixed_5b"] == (23, 3) and launches["repeat.9"] == (23, 4)
    assert launches["repeat_1.19"] == (17, 4) and launches["block8"] == (16, 4)
    for r in rows[:-1]:
        assert r.max_abs_err <= 1e-4 * r.max_abs_ref, r.name


def test_report_timm_inception_v3(capsys):
    """`--model timm/inception_v3`: timm's network fused by fuse() at its smallest input; every block
    and stem unit is a row (A/B/C/D/E: 3/3/5/4/3 stages, with split K's reductions 5/6/10/8/6
    launches), each within 1e-4 of timm's block, and the whole network's logits within 5e-4 of
    timm's: 312 eager kernels -> 92."""
    pytest.importorskip("timm")
    rows = main(["--model", "timm/inception_v3", "--device", "cpu"])
    out = capsys.readouterr().out
    assert "fuse(): 11 block(s) and 5 conv unit(s) swapped, 0 candidate(s) left alone" in out
    launches = {r.name: (r.eager_launches, r.fused_launches) for r in rows}
    assert [launches[f"Mixed_{n}"][1] for n in ("5b", "6a", "6b", "7a", "7b")] == V3_BLOCK_LAUNCHES
    assert launches["Conv2d_1a_3x3"] == (3, 2) and len(rows) == 16 + 1  # (its input padded to 4 channels)
    for r in rows[:-1]:
        assert r.max_abs_err <= 1e-4 * r.max_abs_ref, r.name
    whole = rows[-1]
    assert (whole.eager_launches, whole.fused_launches) == (312, 92)
    assert whole.max_abs_err <= 5e-4 * whole.max_abs_ref


def test_report_timm_errors(monkeypatch):
    """A clear error naming the extra when timm is missing, and one for a name timm doesn't know."""
    pytest.importorskip("timm")
    with pytest.raises(SystemExit, match="timm has|Unknown model"):
        main(["--model", "timm/inception_v9", "--device", "cpu"])
    monkeypatch.setitem(sys.modules, "timm", None)  # import timm -> ImportError
    with pytest.raises(SystemExit, match=r'pip install "fused-inception\[timm\]"'):
        main(["--model", "timm/inception_v4", "--device", "cpu"])
    with pytest.raises(SystemExit):  # argparse: not a model, not timm/<name>
        main(["--model", "resnet50", "--device", "cpu"])
