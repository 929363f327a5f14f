"""The wheel works on its own (slow: builds it, installs it with its pinned dependencies in a fresh venv, then
runs condiff models, recipes, demo and sample from an empty directory; about 3-5 minutes)."""

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_the_built_wheel_runs_from_an_empty_directory(tmp_path):
    res = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "check_wheel.py"), "--outdir", str(tmp_path / "dist")],
        capture_output=True,
        text=True,
        timeout=3600,
    )
    assert res.returncode == 0, res.stdout[-4000:] + res.stderr[-4000:]
    lines = res.stdout.splitlines()
    assert lines[-1].startswith("PASS check_wheel") and not any(line.startswith("FAIL") for line in lines)
    for name in ("condiff models", "condiff recipes", "condiff demo", "condiff sample"):
        assert any(line.startswith(f"PASS {name}") for line in lines), name
