"""mypy checks the package (pyproject.toml's [tool.mypy]: the files, and the
modules held to strict) and finds nothing."""

import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow     # mypy over the package: seconds (more with a cold cache)

ROOT = Path(__file__).resolve().parent.parent


def test_mypy_finds_no_errors_in_the_package():
    pytest.importorskip("mypy")
    proc = subprocess.run([sys.executable, "-m", "mypy"], cwd=ROOT,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr
