"""The benchmarks' one runner, ``python -m benches`` in a checkout, and the
installed package's distance from it: ``fastfc bench`` only says where the
benchmarks went and imports nothing from ``benches/``. The runner is run as
a subprocess on a tiny quick configuration; nothing here asserts on time."""

from __future__ import annotations

import functools
import json
import math
import os
import re
import shutil
import statistics
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

import fastfc
import fastfc.tools.cli.app as cli

ROOT = Path(fastfc.__file__).resolve().parent.parent
SUITES = ["physical", "core", "engine", "numba", "qemu", "scaling", "durable", "durable_steady",
          "gm", "grain", "scaleout", "serve", "nbd_map", "serve_gm", "recovery_points",
          "durable_large"]


def benches(*args: str, timeout: float = 600, env: dict | None = None):
    """``python -m benches ARGS`` in the checkout."""
    return subprocess.run([sys.executable, "-m", "benches", *args], capture_output=True,
                          text=True, cwd=ROOT, timeout=timeout, env=env)


def runner_main(capsys, *args: str) -> tuple[int | str | None, str, str]:
    """``python -m benches ARGS`` in this process: ``benches.runner.main``,
    which ``benches/__main__.py`` calls (the quick case below runs it as a
    process); its exit status, stdout and stderr. A child for each of these
    only spent a second importing the runner (matplotlib, numba)."""
    from benches import runner
    try:
        code = runner.main(list(args))
    except SystemExit as e:         # argparse: --help, a usage error
        code = e.code
    captured = capsys.readouterr()
    return code, captured.out, captured.err


# -- fastfc bench: a pointer, nothing more ----------------------------------------------------
def test_bench_says_where_the_benchmarks_went() -> None:
    for args in (["bench"], ["bench", "--quick", "--only", "gm"], ["bench", "--help"]):
        res = CliRunner().invoke(cli.main, args)
        assert res.exit_code == 2, (args, res.output)
        assert res.output == f"Error: {cli.BENCH_MOVED}\n", res.output
        assert "python -m benches" in res.output


def test_bench_is_not_listed() -> None:
    res = CliRunner().invoke(cli.main, ["--help"])
    assert res.exit_code == 0 and "mkvol" in res.output
    assert "bench" not in res.output


def test_the_package_never_names_the_benchmark_directory() -> None:
    """No module of the installed package loads, imports or finds ``benches``."""
    pkg = Path(fastfc.__file__).parent
    sources = [p for ext in ("py", "pyx", "pxi", "pxd") for p in pkg.rglob(f"*.{ext}")]
    assert sources
    for p in sources:
        text = p.read_text()
        for bad in ("import benches", "from benches", '"benches"', "'benches'"):
            assert bad not in text, f"{p} mentions {bad!r}"


def test_an_installed_layout_points_to_the_runner(tmp_path) -> None:
    """The package copied alone into a site directory and run from elsewhere,
    as from a wheel: ``fastfc bench`` says where the benchmarks went, on one
    line, with status 2, and no ``benches`` module was imported."""
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
    assert refused.returncode == 2
    assert refused.stdout == ""
    assert refused.stderr.strip().splitlines() == [f"Error: {cli.BENCH_MOVED}"]
    code = ("import sys\nfrom click.testing import CliRunner\nimport fastfc.tools.cli.app as a\n"
            "r = CliRunner().invoke(a.main, ['bench'])\nassert r.exit_code == 2, r.output\n"
            "print(sorted(m for m in sys.modules if m.split('.')[0] == 'benches'))\n")
    imported = run([sys.executable, "-c", code])
    assert imported.returncode == 0, imported.stderr
    assert imported.stdout.strip() == "[]"


# -- python -m benches -------------------------------------------------------------------------
def test_the_runner_lists_its_suites_and_cases(capsys) -> None:
    code, out, err = runner_main(capsys, "--list")
    assert code == 0, err
    listed = [m.group(1) for m in re.finditer(r"^([a-z_]+)  ", out, re.M)]
    assert listed == SUITES, out
    from benches.cases import CASES
    for c in CASES:
        assert f"  {c.name} " in out


def test_the_runner_refuses_an_unknown_suite(tmp_path, capsys) -> None:
    for args in (["nonsense"], ["core", "--skip", "nonsense"]):
        code, out, err = runner_main(capsys, *args, "--out", str(tmp_path / "out"))
        assert code == 2, err
        assert "unknown suite(s) nonsense" in err
    assert not (tmp_path / "out").exists()


@pytest.mark.slow     # a quick benchmark run: 7-16 s
def test_the_runner_quick_on_one_case(tmp_path) -> None:
    """``python -m benches --quick core --case count_2p20``: one figure, a
    ratio against its baseline from the same run, in report-quick.md and
    report-quick.json under --out; the README is left as it was."""
    readme = (ROOT / "README.md").read_bytes()
    out = tmp_path / "out"
    res = benches("--quick", "core", "--case", "count_2p20", "--out", str(out))
    assert res.returncode == 0, res.stderr[-3000:]
    doc = json.loads((out / "report-quick.json").read_text())
    assert doc["quick"] is True and doc["suites"] == ["core"] and doc["skipped"] == {}
    [row] = doc["rows"]
    assert row["name"] == "count_2p20" and row["suite"] == "core"
    assert row["ratio"] > 0 and math.isfinite(row["ratio"]), row
    case = doc["cases"]["count_2p20"]
    assert case["samples_s"]["fastfc"] and len(case["samples_s"]) >= 2, case   # and baselines
    md = (out / "report-quick.md").read_text()
    assert md.startswith("# fastfc benchmarks (quick)\n")
    assert "## core" in md and row["figure"] in md
    assert f"report: {out / 'report-quick.md'}" in res.stdout
    assert (ROOT / "README.md").read_bytes() == readme


def test_durable_large_is_opt_in(capsys) -> None:
    """The suite past memory runs only when named (it writes tens of GiB)."""
    from benches import runner
    assert runner.SUITES == SUITES and runner.OPT_IN == {"durable_large"}
    code, out, _ = runner_main(capsys, "--help")
    assert code == 0
    assert "durable_large" in out and "FASTFC_BENCH_LARGE_GIB" in out


# -- the serve suite ----------------------------------------------------------------------------
SERVE_ROWS = {f"serve_{w}_{p}" for w in ("nbdcopy", "randwrite_4k", "randread_4k", "seqwrite_1m")
              for p in ("nbdkit", "qemu_nbd")}
SERVE_GM_ROWS = {"serve_gm_iops", "serve_gm_rpo", "serve_gm_cgs", "serve_gm_readonly",
                 "serve_gm_readonly_full", "serve_gm_answer"}


def test_serve_suite_names_the_missing_packages(tmp_path, monkeypatch, capsys) -> None:
    """Without the client tools the suite is skipped, saying which apt
    packages install them, and the run goes on (exit 0)."""
    from benches import runner
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    assert runner.run(quick=True, out=tmp_path, only=["serve"], log=lambda m: None) == 0
    out = capsys.readouterr().out
    want = ("fio, nbdcopy, nbdkit, qemu-nbd not found on PATH: "
            "apt-get install fio libnbd-bin nbdkit qemu-utils")
    assert f"skipped serve: {want}" in out, out
    doc = json.loads((tmp_path / "report-quick.json").read_text())
    assert doc["skipped"] == {"serve": want} and doc["rows"] == []
    assert f"Skipped serve: {want}" in (tmp_path / "report-quick.md").read_text()


@pytest.mark.slow
def test_serve_suite_quick_end_to_end(tmp_path) -> None:
    """``python -m benches --quick serve``: every row with a measured figure
    (fastfc serve, nbdkit memory and qemu-nbd)."""
    missing = [t for t in ("fio", "nbdcopy", "nbdkit", "qemu-nbd") if shutil.which(t) is None]
    if missing:
        msg = f"{missing} not installed: apt-get install fio libnbd-bin nbdkit qemu-utils"
        if os.environ.get("CI"):
            pytest.fail(msg)
        pytest.skip(msg)
    res = benches("--quick", "serve", "--out", str(tmp_path))
    assert res.returncode == 0, res.stderr[-3000:]
    doc = json.loads((tmp_path / "report-quick.json").read_text())
    assert doc["skipped"] == {}
    rows = {r["name"]: r for r in doc["rows"]}
    assert set(rows) == SERVE_ROWS, sorted(rows)
    for name, r in rows.items():
        assert r["ratio"] > 0 and math.isfinite(r["ratio"]), r
        assert r["met"] is (r["ratio"] >= float(r["target"].split()[1])), r


def test_serve_gm_suite_names_the_missing_fio(tmp_path, monkeypatch, capsys) -> None:
    from benches import runner
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    assert runner.run(quick=True, out=tmp_path, only=["serve_gm"], log=lambda m: None) == 0
    want = "fio not found on PATH: apt-get install fio"
    assert f"skipped serve_gm: {want}" in capsys.readouterr().out
    doc = json.loads((tmp_path / "report-quick.json").read_text())
    assert doc["skipped"] == {"serve_gm": want} and doc["rows"] == []


@pytest.mark.slow
def test_serve_gm_suite_quick_end_to_end(tmp_path) -> None:
    """``python -m benches --quick serve_gm``: the session run by fastfc serve
    (resumegmir) formed CGs under fio with no failure, and every figure of
    the report is there and consistent with its samples (nothing on time)."""
    if shutil.which("fio") is None:
        if os.environ.get("CI"):
            pytest.fail("fio not installed: apt-get install fio")
        pytest.skip("fio not installed: apt-get install fio")
    res = benches("--quick", "serve_gm", "--out", str(tmp_path))
    assert res.returncode == 0, res.stderr[-3000:]
    doc = json.loads((tmp_path / "report-quick.json").read_text())
    assert doc["skipped"] == {}
    rows = {r["name"]: r for r in doc["rows"]}
    assert set(rows) == SERVE_GM_ROWS, sorted(rows)
    g = doc["raw"]["serve_gm"]
    assert g["track_size"] == "64K" and g["rounds"] == 2 and g["triplets"] == 16
    raw = g["raw"]
    # every window ran: running, paused, and running with each client's commands
    assert [w["mode"] for w in raw["windows"]].count("with") == 2
    assert {w["mode"] for w in raw["windows"]} == {"with", "without", "clients", "lean"}
    assert g["cgs"] > 0 and g["failures"] == {} and g["iops_with"] > 0, g
    assert all(w["cgs"] == 0 for w in raw["windows"] if w["mode"] == "without")
    assert all(w["cgs"] > 0 for w in raw["windows"] if w["mode"] != "without")
    assert len(g["round_ratios"]) == 2 and g["ratio"] == statistics.median(g["round_ratios"])
    assert rows["serve_gm_iops"]["met"] is (g["ratio"] >= 0.7)
    # RPO: showgmir --json's rpo, sampled while the session ran
    assert g["rpo_samples"] == len(raw["rpo"]) > 0
    assert 0 <= g["rpo_p50_ms"] <= g["rpo_p99_ms"] <= g["rpo_max_ms"] < 60_000
    assert rows["serve_gm_rpo"]["met"] is (g["rpo_p99_ms"] <= 50)
    # the read-only commands through the console script (the target) and the
    # full command line, under load and on the idle server
    for kind in ("clients", "lean", "lean_idle"):
        assert {"lsvol", "showgmir", "lsflash"} <= set(raw[kind]), kind
    assert g["client_samples"] == sum(map(len, raw["clients"].values())) > 0
    assert g["lean_samples"] == sum(map(len, raw["lean"].values())) > 0
    assert all(len(raw["idle"][k]) == 2 for k in ("lsvol", "showgmir", "lsflash", "--help"))
    assert all(len(raw["lean_idle"][k]) == 2 for k in ("lsvol", "showgmir", "lsflash", "start"))
    assert rows["serve_gm_readonly"]["met"] is (g["lean_p99_ms"] <= 100)
    assert math.isclose(rows["serve_gm_readonly"]["ratio"], g["lean_ratio"])
    assert math.isclose(rows["serve_gm_readonly_full"]["ratio"],
                        g["client_p99_ms"] / g["idle_p99_ms"])
    assert all(len(raw["answer"][m]) > 0 for m in ("with", "without", "idle"))
    assert "serve_gm_readonly" in res.stdout.split("notes:")[1]


def test_the_gm_suite_runs_its_sessions_one_after_another_on_the_same_volumes() -> None:
    """``benches.gm.three_runs`` runs a paced and an unpaced session on one
    set of triplets: each session ends so that the next can begin (a session
    that left its B->C relationships behind made the second one fail)."""
    sys.path.insert(0, str(ROOT))
    try:
        from benches import gm
    finally:
        sys.path.remove(str(ROOT))
    trips = gm.make_triplets(2, 1, track_size=4096)
    # a coordination bound no descheduled writer on a busy test machine
    # reaches (a writer holding A's lock past 50 ms fails that CG with
    # coordination_timeout, as it should, but that is not what this checks)
    patient = functools.partial(gm.run_session, max_coordination_time=2.0)
    try:
        out = gm.three_runs(trips, 0.2, 50.0, session=patient)
    finally:
        gm.close_triplets(trips)
    for run in ("paced", "unpaced"):
        assert out[run]["attempts"] > 0 and not out[run]["failures"], out[run]
    assert out["alone_mb_s"] > 0
