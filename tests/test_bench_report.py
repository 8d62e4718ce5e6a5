"""bench/report.py on JSON that the bench suite itself writes on this machine (CPU: one tiny case)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def test_report_table_from_a_real_bench_run(tmp_path):
    out = tmp_path / "run.json"
    env = {k: v for k, v in os.environ.items() if k != "FUSED_INCEPTION_DEVICE"}
    r = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(REPO / "bench"),
                        "-k", "googlenet-3a", f"--benchmark-json={out}"], cwd=REPO, env=env,
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    r = subprocess.run([sys.executable, str(REPO / "bench" / "report.py"), str(out)], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    row = [line for line in r.stdout.splitlines() if line.startswith("| googlenet-3a")]
    assert len(row) == 1, r.stdout
    cells = [c.strip() for c in row[0].strip("|").split("|")]
    assert cells[1:3] == ["1", "fp32"]
    # fused: 2 stage launches and, at batch 1 on this small map, stage 2's split K reduction (its
    # 96-channel 3x3 runs 27 K iterations in fp32 chunks of 32: kconv.split_counts), counted in
    # the bench run
    assert cells[4].endswith("(3)")
    assert cells[3].endswith("(20)")  # eager torchvision block: 20 kernels
    assert cells[5].endswith("x")  # speedup column filled from the two measured times
    assert "CPU (interpreter" in r.stdout


FAKE_RUN = REPO / "tests" / "data" / "fake_quick_run"  # hand-written, clearly fake: see its README.md


def _report_module():
    import importlib.util

    spec = importlib.util.spec_from_file_location("bench_report", REPO / "bench" / "report.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _row(text, prefix):
    rows = [line for line in text.splitlines() if line.startswith(prefix)]
    assert len(rows) == 1, (prefix, text)
    return [c.strip() for c in rows[0].strip("|").split("|")]


def test_report_on_a_partial_quick_run(tmp_path):
    """A quick run cut off part-way (Inception v3 never ran, networks.jsonl ends mid-line): the
    table holds what finished, marks the failed check, and lists errors, skips and the cut line."""
    report = _report_module()
    out = tmp_path / "report.md"
    report.main([str(FAKE_RUN), "--out", str(out)])
    text = out.read_text()
    assert "FAKE-GPU (test fixture)" in text and "torch 0.0.0-fake" in text and "driver 000.00.00-fake" in text
    head = _row(text, "| case |")
    assert head[:3] == ["case", "batch", "dtype"]
    assert "fused-cudagraph vs eager" not in head  # no fused-cudagraph case in the input
    b1 = dict(zip(head, _row(text, "| googlenet | 1 |")))
    assert b1["eager ms (launches)"] == "2.000 (195)" and b1["fused ms (launches)"] == "0.500 (27)"
    assert b1["fused vs eager"] == "4.00x" and b1["fused vs torch.compile"] == ""
    b32 = dict(zip(head, _row(text, "| googlenet | 32 |")))
    assert b32["fused ms (launches)"].endswith("FAIL") and b32["fused vs eager"] == ""  # no speedup for a FAIL
    b256 = dict(zip(head, _row(text, "| googlenet | 256 |")))
    assert b256["fused vs eager"] == "2.00x" and b256["fused vs torch.compile"] == "1.25x"
    assert "inception_v3" not in text
    assert "1 unreadable line(s)" in text  # the cut-off last line of networks.jsonl
    assert "googlenet b32 bf16 compile-default (deadline)" in text
    assert "RuntimeError: FAKE error for the test" in text
    smoke = dict(zip(_row(text, "| block | eval"), _row(text, "| googlenet-3a |")))
    assert smoke["eval-fp32"] == "ok 1.0e-07" and smoke["eval-bf16"] == "FAIL 5.0e-01"
    assert smoke["nan-bf16 m64n64k64w4s3"] == "ok 1.0e-02"  # a NaN check's column: the tile config's name
    assert _row(text, "| sum |")[3] == "1.500"  # the two stages that finished
    assert "googlenet b1 bf16 fused 40.0" in text  # first-call (compile+autotune) seconds, apart


def test_report_plot_of_a_partial_run(tmp_path):
    pytest.importorskip("matplotlib")
    report = _report_module()
    report.main([str(FAKE_RUN), "--plot", str(tmp_path / "speedup.png")])
    assert (tmp_path / "speedup.png").stat().st_size > 1000


def test_report_reads_bench_jsonl_lines_and_skips_a_cut_one(tmp_path):
    """--bench-jsonl lines (one per finished pytest-benchmark case) make the same table."""
    line = {"name": "bench/test_blocks.py::test_block[x]", "stats": {"median": 0.010},
            "extra_info": {"block": "v3-A", "batch": 32, "dtype": "bf16", "impl": "eager", "launches": 23,
                           "forwards_per_round": 10}}
    fused = dict(line, extra_info=dict(line["extra_info"], impl="fused", launches=3), stats={"median": 0.005})
    path = tmp_path / "bench.jsonl"
    path.write_text(json.dumps(line) + "\n" + json.dumps(fused) + "\n" + json.dumps(line)[:40])
    report = _report_module()
    res = report.load([str(path)])
    text = report.markdown(res)
    cells = _row(text, "| v3-A |")
    assert cells[3:6] == ["1.000 (23)", "0.500 (3)", "2.00x"]
    assert res.bad_lines == 1
