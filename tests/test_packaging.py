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


def test_the_benchmark_runner_says_so_before_measuring(monkeypatch, tmp_path) -> None:
    report = pytest.importorskip("benches.runner")
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    with pytest.raises(MissingDependencyError, match=r"fastfc\[plot\]"):
        report.run(quick=True, out=tmp_path / "out", only=["core"], log=lambda msg: None)
    assert not (tmp_path / "out").exists()


# -- the front door: what ``fastfc`` exports and shows ---------------------------------------------
def test_every_public_error_is_exported_from_fastfc() -> None:
    import fastfc
    import fastfc.errors
    for name in (*fastfc.errors.__all__, "MissingDependencyError"):
        assert name in fastfc.__all__ and issubclass(getattr(fastfc, name), FastFCError), name
    for name in ("DrainAborted", "UnitDownError", "FencedError", "MissingDependencyError",
                 "AlreadyExistsError"):
        assert getattr(fastfc, name).__module__ in ("fastfc.errors", "fastfc._optional")
    # the names the remote package gave them are the same classes
    from fastfc.remote import client, server      # the dev extra brings Ray
    assert client.UnitDownError is fastfc.UnitDownError
    assert server.FencedError is fastfc.FencedError


def test_already_exists_is_a_fastfc_error_and_still_a_value_error(tmp_path) -> None:
    import fastfc
    from fastfc import AlreadyExistsError, GlobalMirror, StorageUnit
    assert issubclass(AlreadyExistsError, FastFCError) and issubclass(AlreadyExistsError,
                                                                      ValueError)
    for path in (None, tmp_path / "u"):
        with StorageUnit(path) as u:
            a, b, c, a2, b2, c2 = (u.create_volume(n, 4, 4096) for n in
                                   ("A", "B", "C", "A2", "B2", "C2"))
            with pytest.raises(AlreadyExistsError, match="volume 'A' already exists"):
                u.create_volume("A", 4, 4096)
            GlobalMirror([(a, b, c)], name="g")
            if path is not None:    # a session name is the unit's to keep unique
                with pytest.raises(AlreadyExistsError, match="session named 'g' already"):
                    GlobalMirror([(a2, b2, c2)], name="g")
                assert a2._mirror is None
            with pytest.raises(ValueError):              # as callers caught it before
                u.create_volume("B", 4, 4096)
    assert fastfc.AlreadyExistsError is AlreadyExistsError


def test_global_mirror_shows_the_parameters_it_takes() -> None:
    import inspect
    from fastfc import GlobalMirror
    sig = inspect.signature(GlobalMirror)
    params = sig.parameters
    assert list(params)[:1] == ["triplets"]
    assert params["triplets"].default is inspect.Parameter.empty
    assert params["triplets"].kind is inspect.Parameter.POSITIONAL_OR_KEYWORD
    expected = {"cg_interval": 0.0, "max_coordination_time": 0.05, "max_drain_time": 0,
                "on_coordinate": None, "on_result": None, "link": None, "name": "gm",
                "decide": "after_all", "initial_copy": True, "journal": None,
                "adopt": False, "resume": False, "points": None}
    for name, default in expected.items():
        assert params[name].kind is inspect.Parameter.KEYWORD_ONLY, name
        assert params[name].default == default, name
    assert set(params) == {"triplets", *expected}       # nothing private, no *args
    import pydoc
    assert "GlobalMirror(triplets: " in pydoc.render_doc(GlobalMirror)


def test_volume_host_io_has_type_hints() -> None:
    import typing
    import numpy as np
    from fastfc import Volume
    assert typing.get_type_hints(Volume.read) == {"offset": int, "length": int,
                                                  "return": np.ndarray}
    hints = typing.get_type_hints(Volume.write)
    assert hints["offset"] is int and hints["return"] is type(None)
    assert set(typing.get_args(hints["data"])) == {bytes, bytearray, memoryview, np.ndarray}


def test_the_package_docstring_names_the_packages_there_are() -> None:
    import fastfc
    doc = fastfc.__doc__ or ""
    packages = sorted(p.name for p in (ROOT / "fastfc").iterdir()
                      if (p / "__init__.py").is_file())
    assert packages == ["copyservices", "durable", "remote", "storage", "tools"]
    for name in packages:                           # each package, by its name
        assert f"``{name}``" in doc, name
    modules = {".".join(p.relative_to(ROOT / "fastfc").with_suffix("").parts)
               .removesuffix(".__init__")
               for p in (ROOT / "fastfc").rglob("*.py*") if p.suffix in (".py", ".pyx")}
    known = modules | {m.rsplit(".", 1)[-1] for m in modules} | set(packages) | {"fastfc"}
    for named in re.findall(r"``([A-Za-z_][\w.]*)``", doc):     # and nothing that is not there
        assert named in known or named == "__all__", named


def test_every_file_core_includes_ships_and_rebuilds_it() -> None:
    """``_core.pyx`` is split into ``.pxi`` files by job: each one it includes
    exists, is package data (so an sdist builds) and is a dependency of the
    extension in setup.py (so a change to it rebuilds ``_core``)."""
    import fnmatch
    tomllib = pytest.importorskip("tomllib")
    core = (ROOT / "fastfc" / "_core.pyx").read_text()
    included = re.findall(r'^include "([^"]+)"$', core, flags=re.M)
    assert len(included) >= 6, included
    patterns = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"][
        "package-data"]["fastfc"]
    setup = (ROOT / "setup.py").read_text()
    assert 'Path("fastfc").glob("*.pxi")' in setup
    for name in included:
        assert (ROOT / "fastfc" / name).is_file(), name
        assert name.endswith(".pxi") and any(fnmatch.fnmatch(name, p) for p in patterns), name
    assert sorted(p.name for p in (ROOT / "fastfc").glob("*.pxi")) == sorted(included)
    for path in (ROOT / "fastfc").glob("*.pxi"):        # none has grown into a second _core
        assert len(path.read_text().splitlines()) <= 750, path.name
