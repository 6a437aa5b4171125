"""``fastfc bench``: the thin command in front of benches/report.py. Nothing
here runs a benchmark (and nothing asserts on time)."""

from __future__ import annotations

import functools
import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

import fastfc
import fastfc.tools.cli.app as cli


def test_bench_help_lists_the_sections() -> None:
    res = CliRunner().invoke(cli.main, ["bench", "--help"])
    assert res.exit_code == 0, res.output
    assert "--quick" in res.output and "--update-readme" in res.output
    for section in cli.BENCH_SECTIONS:
        assert section in res.output


def _installed(monkeypatch, tmp_path) -> None:
    """Make cli.py look as if it were installed in site-packages."""
    monkeypatch.setattr(cli, "_package_dir", lambda: tmp_path / "site-packages" / "fastfc")


def test_bench_is_listed_in_a_source_checkout() -> None:
    res = CliRunner().invoke(cli.main, ["--help"])
    assert res.exit_code == 0 and "bench" in res.output


def test_bench_is_not_listed_when_installed(monkeypatch, tmp_path) -> None:
    _installed(monkeypatch, tmp_path)
    res = CliRunner().invoke(cli.main, ["--help"])
    assert res.exit_code == 0, res.output
    assert "mkvol" in res.output and "bench" not in res.output


def test_bench_says_when_the_suite_is_absent(monkeypatch, tmp_path) -> None:
    _installed(monkeypatch, tmp_path)
    res = CliRunner().invoke(cli.main, ["bench", "--quick"])
    assert res.exit_code == 1
    assert len(res.output.strip().splitlines()) == 1, res.output
    assert "needs a source checkout" in res.output and "benches/" in res.output


def test_a_checkout_needs_pyproject_too(monkeypatch, tmp_path) -> None:
    """A stray benches/ next to site-packages' fastfc is not a checkout."""
    (tmp_path / "benches").mkdir()
    (tmp_path / "benches" / "report.py").write_text("")
    monkeypatch.setattr(cli, "_package_dir", lambda: tmp_path / "fastfc")
    assert cli._source_checkout() is None
    (tmp_path / "pyproject.toml").write_text("")
    assert cli._source_checkout() == tmp_path


def test_an_installed_layout_hides_and_refuses_bench(tmp_path) -> None:
    """The real thing: the package copied alone into a site directory and run
    from elsewhere, as from a wheel."""
    site = tmp_path / "site"
    shutil.copytree(Path(fastfc.__file__).parent, site / "fastfc",
                    ignore=shutil.ignore_patterns("__pycache__", "*.c", "*.html"))
    env = {**os.environ, "PYTHONPATH": str(site)}
    run = functools.partial(subprocess.run, capture_output=True, text=True, cwd=tmp_path,
                            env=env, timeout=120)
    where = run([sys.executable, "-c", "import fastfc; print(fastfc.__file__)"])
    assert where.stdout.strip() == str(site / "fastfc" / "__init__.py"), where.stderr
    helped = run([sys.executable, "-m", "fastfc", "--help"])
    assert helped.returncode == 0, helped.stderr
    assert "mkvol" in helped.stdout and "bench" not in helped.stdout
    refused = run([sys.executable, "-m", "fastfc", "bench", "--quick"])
    assert refused.returncode == 1
    assert refused.stdout == ""
    assert len(refused.stderr.strip().splitlines()) == 1, refused.stderr
    assert "needs a source checkout" in refused.stderr


def test_bench_refuses_an_unknown_section() -> None:
    res = CliRunner().invoke(cli.main, ["bench", "--only", "nonsense"])
    assert res.exit_code == 2


def test_durable_large_is_opt_in() -> None:
    """The section past memory runs only when named (it writes tens of GiB)."""
    res = CliRunner().invoke(cli.main, ["bench", "--help"])
    assert "durable_large" in res.output and "FASTFC_BENCH_LARGE_GIB" in " ".join(res.output.split())
    root = cli._source_checkout()
    assert root is not None
    report = cli._load_benches(root)
    assert report.SECTIONS == cli.BENCH_SECTIONS
    assert report.OPT_IN == {"durable_large"}


# -- the serve section (issue 11) ---------------------------------------------------
SERVE_ROWS = {f"serve_{w}_{p}" for w in ("nbdcopy", "randwrite_4k", "randread_4k", "seqwrite_1m")
              for p in ("nbdkit", "qemu_nbd")} | {"serve_gm_iops", "serve_gm_rpo", "serve_gm_cgs"}


def test_serve_section_names_the_missing_packages(tmp_path, monkeypatch, capsys) -> None:
    """Without the client tools the section is skipped, saying which apt
    packages install them, and the bench goes on (exit 0)."""
    root = cli._source_checkout()
    assert root is not None
    report = cli._load_benches(root)
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    assert report.run(quick=True, out=tmp_path, only=["serve"], log=lambda m: None) == 0
    out = capsys.readouterr().out
    want = ("fio, nbdcopy, nbdkit, qemu-nbd not found on PATH: "
            "apt-get install fio libnbd-bin nbdkit qemu-utils")
    assert f"skipped serve: {want}" in out, out
    doc = json.loads((tmp_path / "report-quick.json").read_text())
    assert doc["skipped"] == {"serve": want} and doc["rows"] == []


@pytest.mark.slow
def test_serve_section_quick_end_to_end(tmp_path) -> None:
    """``fastfc bench --quick --only serve``: every row with a measured figure
    (fastfc serve, nbdkit memory and qemu-nbd; Global Mirror under fio)."""
    missing = [t for t in ("fio", "nbdcopy", "nbdkit", "qemu-nbd") if shutil.which(t) is None]
    if missing:
        msg = f"{missing} not installed: apt-get install fio libnbd-bin nbdkit qemu-utils"
        if os.environ.get("CI"):
            pytest.fail(msg)
        pytest.skip(msg)
    root = cli._source_checkout()
    env = {**os.environ, "PYTHONPATH": str(root)}
    res = subprocess.run([sys.executable, "-m", "fastfc", "bench", "--quick", "--only", "serve",
                          "--out", str(tmp_path)], capture_output=True, text=True, env=env,
                         cwd=root, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    doc = json.loads((tmp_path / "report-quick.json").read_text())
    assert doc["skipped"] == {}
    rows = {r["name"]: r for r in doc["rows"]}
    assert set(rows) == SERVE_ROWS, sorted(rows)
    for name, r in rows.items():
        if name in ("serve_gm_rpo", "serve_gm_cgs"):
            continue
        assert r["ratio"] > 0 and math.isfinite(r["ratio"]), r
        assert r["met"] is (r["ratio"] >= float(r["target"].split()[1])), r
    g = doc["raw"]["serve_gm"]
    assert g["cgs"] > 0 and g["failures"] == {} and g["iops_with"] > 0, g
    assert 0 < g["rpo_p99_ms"] < 60_000 and rows["serve_gm_rpo"]["met"] is (g["rpo_p99_ms"] <= 50)
    assert "serve_gm_iops" in res.stdout.split("notes:")[1]
