"""bench/report.py on JSON that the bench suite itself writes on this machine (CPU: one tiny case)."""

import os
import subprocess
import sys
from pathlib import Path

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
    assert cells[4].endswith("(2)")  # fused: 2 launches, counted in the bench run
    assert cells[3].endswith("(20)")  # eager torchvision block: 20 kernels
    assert cells[5].endswith("x")  # speedup column filled from the two measured times
    assert "CPU (interpreter" in r.stdout
