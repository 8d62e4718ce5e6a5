"""bench/quick.py and bench/gpu_run.sh on CPU: every part through Triton's interpreter at tiny
shapes (`--device cpu`), its JSON lines, resuming, deadlines, and the shell script's flow when
no GPU answers. Times mean nothing here; that the pieces run and record is the point."""

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
QUICK = REPO / "bench" / "quick.py"


def run_quick(*args, timeout=600):
    env = {k: v for k, v in os.environ.items() if k not in ("FUSED_INCEPTION_DEVICE", "PART_DEADLINE")}
    return subprocess.run([sys.executable, str(QUICK), *args, "--device", "cpu"], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=timeout)


def records(path):
    return [json.loads(line) for line in Path(path).read_text().splitlines()]


def quick_module():
    """bench/quick.py, imported in this process. It puts bench/ first on sys.path; that is undone
    after the import, or bench/conftest.py would shadow tests/conftest.py in the processes that
    later tests spawn (tests/test_distributed.py's ranks unpickle their functions from it)."""
    saved = list(sys.path)
    try:
        spec = importlib.util.spec_from_file_location("bench_quick", QUICK)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
    finally:
        sys.path[:] = saved
    return module


def test_smoke_part_on_cpu(tmp_path):
    r = run_quick("smoke", "--out", str(tmp_path), "--blocks", "googlenet-3a")
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    recs = {rec["case"]: rec for rec in records(tmp_path / "smoke.jsonl")}
    for check in ("eval-fp32", "eval-bf16", "train-fp32"):
        assert recs[f"googlenet-3a {check}"]["status"] == "ok", recs
    assert "compile+autotune: " in r.stdout  # first calls reported apart
    # Resuming skips what is recorded: nothing new is written.
    r = run_quick("smoke", "--out", str(tmp_path), "--blocks", "googlenet-3a", "--resume")
    assert r.returncode == 0, r.stderr[-2000:]
    assert len(records(tmp_path / "smoke.jsonl")) == len(recs)


@pytest.fixture
def tf32_flags_restored():
    """The smoke sets torch's TF32 flags: put back by assignment afterwards (monkeypatch.setattr
    records them as absent, since torch serves them through a module __getattr__, and its undo
    would delattr them and fail)."""
    import torch

    flags = (torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32)
    yield
    torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = flags


def test_smoke_pins_tile_configs_by_name(tmp_path, monkeypatch, capsys, tf32_flags_restored):
    """The NaN check runs once per requested config, pinned by name, and unpins afterwards; eval
    fp32 and the training step run pinned to kernels.conv.SMALLEST, eval bf16 autotuned. Past
    its deadline every case is recorded as skipped; an unknown name is refused up front."""
    from fused_inception.kernels import conv as kconv

    quick = quick_module()
    calls, pin = [], kconv.pin_config
    monkeypatch.setattr(kconv, "pin_config", lambda name: (calls.append(name), pin(name)))
    first, last, smallest = kconv.CONFIG_NAMES[0], kconv.CONFIG_NAMES[-1], kconv.SMALLEST
    part = quick.Part("smoke", str(tmp_path))
    quick.run_smoke(part, ["irv2-block35"], "cpu", [first, last])
    recs = {rec["case"]: rec for rec in records(tmp_path / "smoke.jsonl")}
    assert {r["status"] for r in recs.values()} == {"ok"}, recs
    nan = recs[f"irv2-block35 nan-bf16 config {last}"]
    assert nan["config"] == last and nan["nans"] == 0 and 0 < nan["err"] <= nan["tol"] == 2e-2
    assert calls == [smallest, None, first, None, last, None, smallest, None], calls
    part = quick.Part("smoke2", str(tmp_path), deadline=0.0)  # past its deadline
    quick.run_smoke(part, ["irv2-block35"], "cpu", [first])
    recs = records(tmp_path / "smoke2.jsonl")
    assert len(recs) == 4 and {(r["status"], r["reason"]) for r in recs} == {("skipped", "deadline")}
    with pytest.raises(SystemExit) as e:
        quick.main(["smoke", "--out", str(tmp_path), "--device", "cpu", "--configs", f"{first},3"])
    assert e.value.code == 2 and "--configs: unknown ['3']" in capsys.readouterr().err


def test_nan_check_fails_on_a_stage_not_run(tmp_path, monkeypatch, tf32_flags_restored):
    """The NaN check can fail: without the last stage's launch the block output stays NaN."""
    import torch

    from fused_inception.plan import Plan

    quick = quick_module()
    stage_calls = Plan.stage_calls
    monkeypatch.setattr(Plan, "stage_calls", lambda self, x, memory_format=None: (
        lambda calls, out, mid: (calls[:-1], out, mid))(*stage_calls(self, x, memory_format)))
    checked = quick.eval_check("irv2-block35", "cpu", 1, torch.bfloat16, nan_filled=True)
    result = checked["result"]
    assert not result["ok"] and result["nans"] > 0 and result["err"] == float("inf"), result
    assert 0 < checked["eager_err"] < 2e-2


def test_networks_and_stages_parts_on_cpu(tmp_path):
    r = run_quick("networks", "--out", str(tmp_path), "--network", "googlenet", "--impls", "eager,fused")
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    recs = {rec["impl"]: rec for rec in records(tmp_path / "networks.jsonl")}
    # (28: with the stem's pad; + 9 split K reductions at batch 1: kconv.split_counts)
    assert recs["eager"]["launches"] == 195 and recs["fused"]["launches"] == 28 + 9, recs
    # bf16 both, against fp32: within the case's tolerance (2e-2, or twice eager's error). Before
    # fused_inception.interpreter rounded the interpreter's bf16 to nearest even it was 0.044.
    assert recs["fused"]["status"] == "ok" and recs["fused"]["err"] <= recs["fused"]["tol"], recs
    assert recs["eager"]["status"] == "ok" and recs["fused"]["eager_err"] > 0, recs
    r = run_quick("stages", "--out", str(tmp_path), "--stage-blocks", "inception3a")
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    stages = records(tmp_path / "stages.jsonl")
    assert [s["stage"] for s in stages] == [1, 2]
    # inception3a at 32x32 input (4x4 maps), batch 1: stage 1 is the merged 1x1s (192 -> 64+96+16)
    # and the pool branch's pool alone (its 1x1 is in stage 2): 2 * 16 px * 192 * 176 FLOPs.
    assert stages[0]["gflop"] == pytest.approx(2 * 16 * 192 * 176 / 1e9)
    # Bytes (bf16): x read by both problems, the 64+96+16 result columns and the 192 pooled
    # channels written, the weights.
    assert stages[0]["mb"] == pytest.approx(2 * (2 * 192 * 16 + 16 * 176 + 16 * 192 + 192 * 176) / 1e6)
    assert "sum of stages" in r.stdout


def test_stage_traffic_of_a_residual_block():
    """The stage profile's FLOPs and bytes (fused_inception.report.stage_traffic, which the fusion
    report's `traffic` sums), counted by hand for Inception-ResNet-v2's Block35 at 7x7, batch 1,
    bf16: per problem its source read, result written and weights read; the head also reads the
    residual (x)."""
    import torch

    from fused_inception import fuse
    from fused_inception.models.inception_resnet_v2 import Block35
    from fused_inception.report import stage_traffic, traffic

    block, _ = fuse(Block35(lambda n: n, scale=0.17).eval())
    px = 49
    elems = [320 * px + 96 * px + 320 * 96,  # the three 1x1s merged: 320 -> 32+32+32
             (32 * px + 32 * px + 9 * 32 * 32) + (32 * px + 48 * px + 9 * 32 * 48),  # two 3x3s, separate sources
             48 * px + 64 * px + 9 * 48 * 64,  # 3x3 48 -> 64
             128 * px + 320 * px + 128 * 320 + 320 * px]  # head: 1x1 128 -> 320, plus the residual
    flops = [2 * px * 96 * 320, 2 * px * 32 * 288 + 2 * px * 48 * 288, 2 * px * 64 * 432, 2 * px * 320 * 128]
    work = stage_traffic(block.plan(torch.bfloat16).layout, (1, 320, 7, 7), 2)
    assert work == [(f, 2 * e) for f, e in zip(flops, elems)]
    assert traffic(block, (1, 320, 7, 7), 2)[1] == 2 * sum(elems)


def test_gpu_run_sh_without_a_gpu(tmp_path):
    """The quick run's flow on a machine where no GPU answers: every part records the error, the
    run goes on to the report and ends well inside its budget, with at most 8 files."""
    env = {k: v for k, v in os.environ.items() if k not in ("FUSED_INCEPTION_DEVICE", "TRITON_INTERPRET")}
    env.update(OUT=str(tmp_path / "out"), QUICK_PRECOMPILE="0", QUICK_BUDGET="200",
               PATH=f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}")
    r = subprocess.run(["bash", str(REPO / "bench" / "gpu_run.sh"), "quick"], env=env, capture_output=True,
                       text=True, timeout=400)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    files = sorted(p.name for p in (tmp_path / "out").iterdir())
    assert len(files) <= 8 and {"env.txt", "log.txt", "smoke.jsonl", "report.md"} <= set(files), files
    assert "no CUDA device visible to torch" in (tmp_path / "out" / "report.md").read_text()
    log = (tmp_path / "out" / "log.txt").read_text()
    for part in ("smoke", "networks-googlenet", "stages", "first-forward cold", "first-forward warm",
                 "networks-inception_v3", "report"):
        assert f"START {part}" in log, log
    r = subprocess.run(["bash", str(REPO / "bench" / "gpu_run.sh"), "full", "list"], capture_output=True, text=True)
    assert r.returncode == 0 and "tests-kernels" in r.stdout
    r = subprocess.run(["bash", str(REPO / "bench" / "gpu_run.sh"), "full", "nonsense"], capture_output=True,
                       text=True)
    assert r.returncode == 2
