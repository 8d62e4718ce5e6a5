"""Install layout: kernels/ is importable only as fused_inception.kernels, from any directory."""

import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def run_python(code, cwd):
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    return subprocess.run([sys.executable, "-c", code], cwd=cwd, env=env, capture_output=True, text=True)


def test_kernels_import_from_any_directory(tmp_path):
    for cwd in (REPO, tmp_path):
        r = run_python("import fused_inception.kernels.conv as k; print(k.__file__)", cwd)
        assert r.returncode == 0, r.stderr
        assert Path(r.stdout.strip()).resolve() == REPO / "kernels" / "conv.py"


def test_no_top_level_kernels_module(tmp_path):
    """Another PyPI package owns the name `kernels`: our install must not provide it."""
    r = run_python("import importlib.util as u; s = u.find_spec('kernels'); print(s.origin if s else None)", tmp_path)
    assert r.returncode == 0, r.stderr
    origin = r.stdout.strip()
    assert origin == "None" or not Path(origin).resolve().is_relative_to(REPO), origin


def test_the_library_does_not_import_timm(tmp_path):
    """timm is an optional extra (the report's --model timm/...): fuse() recognises its layers by
    structure, without importing it."""
    r = run_python("import sys, fused_inception, fused_inception.report; print('timm' in sys.modules)", tmp_path)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "False"
