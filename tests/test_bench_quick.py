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
    spec = importlib.util.spec_from_file_location("bench_quick", QUICK)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
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


def test_nan_check_runs_each_pinned_config(tmp_path, monkeypatch, tf32_flags_restored):
    """With kernels.conv.pin_config present, the NaN check runs once per requested config, pinned,
    and unpins afterwards (fp32 eval and the training step run pinned to the last config);
    without it, the record says so."""
    from fused_inception.kernels import conv as kconv

    quick = quick_module()
    calls = []
    monkeypatch.setattr(kconv, "pin_config", calls.append, raising=False)
    part = quick.Part("smoke", str(tmp_path), device="cpu")
    quick.run_smoke(part, ["irv2-block35"], "cpu", "0,2")
    recs = {rec["case"]: rec for rec in records(tmp_path / "smoke.jsonl")}
    assert recs["irv2-block35 nan-bf16 config 2"]["status"] == "ok", recs
    assert recs["irv2-block35 nan-bf16 config 0"]["config_desc"].startswith("{'BLOCK_M'")
    last = len(kconv.CONFIGS) - 1  # eval-fp32, eval-bf16 (autotuned), bf16 NaN per config, train
    assert calls == [last, None, 0, None, 2, None, last, None], calls
    monkeypatch.delattr(kconv, "pin_config")
    part = quick.Part("smoke2", str(tmp_path), device="cpu", deadline=0.0)  # past its deadline
    quick.run_smoke(part, ["irv2-block35"], "cpu", "all")
    recs = records(tmp_path / "smoke2.jsonl")
    assert recs[0]["reason"].startswith("pin_config unavailable")
    assert {r["status"] for r in recs[1:]} == {"skipped"} and recs[1]["reason"] == "deadline"


def test_networks_and_stages_parts_on_cpu(tmp_path):
    r = run_quick("networks", "--out", str(tmp_path), "--network", "googlenet", "--impls", "eager,fused")
    assert r.returncode in (0, 1), r.stdout[-3000:] + r.stderr[-3000:]
    recs = {rec["impl"]: rec for rec in records(tmp_path / "networks.jsonl")}
    assert recs["eager"]["launches"] == 195 and recs["fused"]["launches"] == 27, recs
    assert recs["fused"]["err"] < 0.1 and recs["fused"]["eager_err"] > 0  # bf16 both, against fp32
    r = run_quick("stages", "--out", str(tmp_path), "--stage-blocks", "inception3a")
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    stages = records(tmp_path / "stages.jsonl")
    assert [s["stage"] for s in stages] == [1, 2]
    # inception3a at 32x32 input (4x4 maps), batch 1: stage 1 is the merged 1x1s (192 -> 64+96+16)
    # plus the pool branch's 1x1 (192 -> 32): 2 * 16 px * 192 * 208 FLOPs.
    assert stages[0]["gflop"] == pytest.approx(2 * 16 * 192 * 208 / 1e9)
    assert "sum of stages" in r.stdout


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
    for part in ("smoke", "networks-googlenet", "stages", "networks-inception_v3", "report"):
        assert f"START {part}" in log, log
    r = subprocess.run(["bash", str(REPO / "bench" / "gpu_run.sh"), "full", "list"], capture_output=True, text=True)
    assert r.returncode == 0 and "tests-kernels" in r.stdout
    r = subprocess.run(["bash", str(REPO / "bench" / "gpu_run.sh"), "full", "nonsense"], capture_output=True,
                       text=True)
    assert r.returncode == 2
