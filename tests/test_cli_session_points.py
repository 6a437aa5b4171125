"""A Global Mirror session's schedule of recovery points through the
command line: mkgmir --points-*, formcg, lspoint (the CG column), showgmir
(the schedule), chgmir (change it, --no-points), each command a reopen of
the unit (the schedule lives in the session's record, the points in the
unit)."""

from __future__ import annotations

import json

import pytest
from click.testing import CliRunner

from fastfc.tools.cli import main
from test_cli import props


@pytest.fixture
def fastfc(tmp_path):
    runner = CliRunner()

    def run(*args, code=0):
        r = runner.invoke(main, ["--unit", str(tmp_path / "u"), *map(str, args)],
                          catch_exceptions=False)
        assert r.exit_code == code, (r.stdout, r.stderr)
        if code:
            assert r.stderr.startswith("Error: ") or "Usage" in r.stderr, r.stderr
        return r

    return run


def test_a_session_schedule_through_the_command_line(fastfc):
    fastfc("mkvol", "A", "B", "C", "--tracks", 8)
    fastfc("write", "A", "first", "--offset", 0)
    out = fastfc("mkgmir", "g", "A:B:C", "--points-every-cgs", 2, "--points-keep", 2).stdout
    assert "recovery points of its C volumes: every 2 CGs, at most 2 kept" in out
    fastfc("formcg", "g", "--count", 5)            # takes at CGs 1, 3, 5
    listed = json.loads(fastfc("lspoint", "C", "--json").stdout)
    assert [(p["name"], p["session"], p["cg"]) for p in listed] == [
        ("g@cg3", "g", 3), ("g@cg5", "g", 5)]
    assert "5 of g" in fastfc("lspoint").stdout
    show = props(fastfc("showgmir", "g"))
    # (showgmir opens the unit read-only: its points are not loaded)
    assert show["Recovery points"] == "every 2 CGs, at most 2 kept (lspoint lists the points)"
    out = fastfc("chgmir", "g", "--points-every-cgs", 1).stdout
    assert "recovery points every CG, at most 2 kept (was every 2 CGs, at most 2 kept)" in out
    fastfc("formcg", "g")
    assert [p["cg"] for p in json.loads(fastfc("lspoint", "C", "--json").stdout)] == [5, 6]
    fastfc("chgmir", "g", "--no-points")
    assert props(fastfc("showgmir", "g"))["Recovery points"].startswith("none")
    fastfc("formcg", "g")
    assert [p["cg"] for p in json.loads(fastfc("lspoint", "C", "--json").stdout)] == [5, 6]
    # a schedule that keeps nothing is refused, nothing changed
    err = fastfc("chgmir", "g", "--points-every-cgs", 1, code=2).stderr
    assert "needs retain_seconds > 0" in err
    assert props(fastfc("showgmir", "g"))["Recovery points"].startswith("none")


def test_restoregmir_puts_the_session_back_to_a_cg(fastfc, tmp_path):
    from fastfc import StorageUnit
    fastfc("mkvol", "A", "B", "C", "--tracks", 8)
    fastfc("write", "A", "good data", "--offset", 0)
    fastfc("mkgmir", "g", "A:B:C", "--points-every-cgs", 1, "--points-keep", 5)
    fastfc("formcg", "g")                              # CG 1: good
    fastfc("write", "A", "ENCRYPTED", "--offset", 0)
    fastfc("formcg", "g", "--count", 2)                # CGs 2, 3: garbage on B and C
    assert "--quiesced" in fastfc("restoregmir", "g", 1, code=2).stderr
    err = fastfc("restoregmir", "g", 9, "--quiesced", code=1).stderr
    assert "holds no recovery point of C at CG 9" in err
    out = fastfc("restoregmir", "g", 1, "--quiesced").stdout
    assert "restored Global Mirror session g to CG 1: 1 grain written onto its A volumes" in out
    fastfc("formcg", "g")
    with StorageUnit(tmp_path / "u") as unit:
        for v in "ABC":
            assert unit.volume(v).read(0, 9).tobytes() == b"good data", v
        assert [p.name for p in unit.points.points("C")] == [
            "g@cg1", "g@cg2", "g@cg3", "g@cg4"]
