"""The type stub fastfc/_core.pyi matches the compiled extension (stubtest)."""

import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow     # mypy stubtest: about 6 s

DATA = Path(__file__).parent / "data"


def test_core_stub_matches_the_extension():
    pytest.importorskip("mypy")
    proc = subprocess.run(
        [sys.executable, "-m", "mypy.stubtest", "fastfc._core",
         "--mypy-config-file", str(DATA / "stubtest-mypy.ini"),
         "--allowlist", str(DATA / "stubtest-allowlist.txt")],
        capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr
