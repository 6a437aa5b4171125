"""What ``pip install fastfc`` brings: NumPy, click and rich, and nothing
that only draws plots; the plot extra (and dev, for the tests) brings
matplotlib, and a missing one costs one clear line."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

from fastfc._optional import MissingDependencyError, require
from fastfc.errors import FastFCError

ROOT = Path(__file__).resolve().parent.parent


def _name(requirement: str) -> str:
    return re.split(r"[\s<>=!~;\[]", requirement, maxsplit=1)[0].lower()


@pytest.fixture(scope="module")
def project() -> dict:
    tomllib = pytest.importorskip("tomllib")
    return tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]


def test_hard_dependencies_are_lean(project) -> None:
    assert sorted(map(_name, project["dependencies"])) == ["click", "numpy", "rich"]


def test_matplotlib_only_in_the_plot_and_dev_extras(project) -> None:
    extras = project["optional-dependencies"]
    assert [_name(r) for r in extras["plot"]] == ["matplotlib"]
    with_mpl = {e for e, reqs in extras.items() if "matplotlib" in map(_name, reqs)}
    assert with_mpl == {"plot", "dev"}    # dev: the tests run `demo --plot`


def test_built_metadata_requires_matplotlib_only_with_an_extra(tmp_path) -> None:
    """Requires-Dist as setuptools writes it into a wheel, from this
    pyproject.toml alone (a copy: nothing is compiled)."""
    for name in ("pyproject.toml", "README.md"):
        (tmp_path / name).write_text((ROOT / name).read_text())
    (tmp_path / "fastfc").mkdir()
    (tmp_path / "fastfc" / "__init__.py").write_text("")
    (tmp_path / "meta").mkdir()
    proc = subprocess.run(
        [sys.executable, "-c", "from setuptools.build_meta import prepare_metadata_for_build_wheel"
         " as p; print(p('meta'))"],
        cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, f"setuptools (the dev extra brings >= 77) cannot read " \
        f"pyproject.toml: {proc.stderr[-300:]}"
    meta = (tmp_path / "meta" / proc.stdout.split()[-1] / "METADATA").read_text()
    requires = [line.split(":", 1)[1].strip() for line in meta.splitlines()
                if line.startswith("Requires-Dist:")]
    assert sorted(_name(r) for r in requires if "extra ==" not in r) == ["click", "numpy", "rich"]
    mpl = [r for r in requires if _name(r) == "matplotlib"]
    assert mpl and all(re.search(r'extra == "(plot|dev)"', r) for r in mpl), mpl


def test_fastfc_imports_and_its_command_runs_without_matplotlib() -> None:
    code = ("import sys; sys.modules['matplotlib'] = None\n"
            "import fastfc, fastfc.tools.cli, fastfc.tools.demo, fastfc.tools.testing, fastfc.durable.unit\n"
            "from click.testing import CliRunner\n"
            "r = CliRunner().invoke(fastfc.tools.cli.main, ['--help'])\n"
            "assert r.exit_code == 0 and 'demo' in r.output, r.output\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr


def test_require_names_the_extra(monkeypatch) -> None:
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    with pytest.raises(MissingDependencyError) as e:
        require("matplotlib", extra="plot", feature="--plot")
    assert str(e.value) == ("--plot needs matplotlib, which is not installed: "
                            "pip install 'fastfc[plot]'")
    assert isinstance(e.value, ImportError) and isinstance(e.value, FastFCError)
    assert require("json", extra="none").__name__ == "json"


def test_the_bench_report_says_so_before_measuring(monkeypatch, tmp_path) -> None:
    report = pytest.importorskip("benches.report")
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    with pytest.raises(MissingDependencyError, match=r"fastfc\[plot\]"):
        report.run(quick=True, out=tmp_path / "out", only=["core"], log=lambda msg: None)
    assert not (tmp_path / "out").exists()
