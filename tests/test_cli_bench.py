"""``fastfc bench``: the thin command in front of benches/report.py. Nothing
here runs a benchmark (and nothing asserts on time)."""

from __future__ import annotations

from click.testing import CliRunner

import fastfc.cli as cli


def test_bench_help_lists_the_sections() -> None:
    res = CliRunner().invoke(cli.main, ["bench", "--help"])
    assert res.exit_code == 0, res.output
    assert "--quick" in res.output and "--update-readme" in res.output
    for section in cli.BENCH_SECTIONS:
        assert section in res.output


def test_bench_says_when_the_suite_is_absent(monkeypatch, tmp_path) -> None:
    monkeypatch.setattr(cli, "__file__", str(tmp_path / "site-packages" / "fastfc" / "cli.py"))
    res = CliRunner().invoke(cli.main, ["bench", "--quick"])
    assert res.exit_code == 1
    assert "no benches/report.py next to the fastfc package" in res.output
    assert "source checkout" in res.output


def test_bench_refuses_an_unknown_section() -> None:
    res = CliRunner().invoke(cli.main, ["bench", "--only", "nonsense"])
    assert res.exit_code == 2
