"""showunit: a unit at a glance. Its --json numbers are checked against
what the test created (volumes, one thin; a FlashCopy; a PPRC pair; a
Global Mirror session) and against os.stat and os.statvfs; it runs
directly, beside another command that has the unit open read-only, and
carried out by a running ``fastfc serve`` (which it names, with its pid).

The units live under the ordinary temporary directory, not tmpfs: the bytes
a thin volume takes on the disk are what is checked, and tmpfs may back a
file with huge pages (a 4 KiB write allocating 2 MiB).
"""

from __future__ import annotations

import pytest

import json
import os
from pathlib import Path

from click.testing import CliRunner

from fastfc.tools.cli import main
from fastfc.tools.cli.app import READ_ONLY_COMMANDS
from helpers import held_unit
from test_serve import fastfc_cli, serving

TS = 4096
N = 64          # tracks per volume: 256 KiB
THIN_TRACKS = 256


def cli(unit, *args, code=0):
    r = CliRunner().invoke(main, ["-u", str(unit), *map(str, args)], catch_exceptions=False)
    assert r.exit_code == code, (args, r.stdout, r.stderr)
    return r


def build(unit: Path) -> None:
    """Seven full volumes and a thin one (never written); a NOCOPY FlashCopy F:G; a Global
    Copy pair P:Q; a session S over A:B:C (its own pair and FlashCopy)."""
    cli(unit, "mkvol", "A", "B", "C", "F", "G", "P", "Q", "--tracks", N, "--track-size", TS)
    cli(unit, "mkvol", "T", "--tracks", THIN_TRACKS, "--track-size", TS, "--thin")
    cli(unit, "write", "A", "host data", "--repeat", 1000)
    cli(unit, "mkflash", "F:G", "--nocp")
    # copied now: a server holding the unit later has no copy to move on
    # (its writes to the unit's files would race the test's os.stat)
    cli(unit, "mkpprc", "P:Q", "--type", "gcp", "--wait")
    cli(unit, "mkgmir", "S", "A:B:C")


def on_disk(path: Path) -> int:
    return os.stat(path).st_blocks * 512


def free_bytes(unit: Path) -> int:
    fs = os.statvfs(unit)
    return fs.f_bavail * fs.f_frsize


def shown(run, unit: Path) -> tuple[dict, tuple[int, int]]:
    """showunit --json by ``run``, and the filesystem's free bytes just
    before and after it (the machine is shared: others write to the disk)."""
    before = free_bytes(unit)
    view = json.loads(run().stdout)
    return view, (before, free_bytes(unit))


def check(view: dict, unit: Path, free: tuple[int, int]) -> None:
    vols = view["volumes"]
    assert view["path"] == str(unit.resolve())
    assert vols["count"] == 8 and vols["thin"] == 1 and vols["full"] == 7
    assert vols["capacity"] == 7 * N * TS + THIN_TRACKS * TS
    each = {v["name"]: v for v in vols["each"]}
    for name, v in each.items():
        assert v["allocated"] == on_disk(unit / "volumes" / f"{name}.vol")
    assert each["T"]["thin"] and each["T"]["allocated"] == 0      # nothing written to it
    assert each["A"]["allocated"] == each["A"]["capacity"]         # a full volume
    assert vols["allocated"] == sum(v["allocated"] for v in each.values())
    # F:G, and the session's B->C (NOCOPY, change recording)
    assert view["flashcopies"] == {"total": 2, "by_state": {"nocopy": 2}}
    assert view["pairs"]["total"] == 2          # P:Q and the session's A:B
    assert view["pairs"]["by_state"] == {"copy pending": 2}
    assert view["secondary_of"] == 2            # Q and B
    (s,) = view["sessions"]
    assert s["session"] == "S" and s["triplets"] == 1 and s["role"] == "primary and secondary"
    space = view["space"]
    fs = os.statvfs(unit)
    assert space["filesystem_total"] == fs.f_blocks * fs.f_frsize
    slack = 16 << 20
    assert min(free) - slack <= space["filesystem_free"] <= max(free) + slack
    kinds = space["by_kind"]
    assert kinds["volumes"]["bytes"] == vols["allocated"]
    assert kinds["volumes"]["apparent"] == vols["capacity"]
    assert kinds["volumes"]["files"] == 8
    assert kinds["metadata"]["bytes"] >= on_disk(unit / "unit.db") > 0
    assert kinds["bitmaps"]["files"] == len(os.listdir(unit / "bitmaps")) > 0
    assert kinds["bitmaps"]["bytes"] == sum(on_disk(p) for p in (unit / "bitmaps").iterdir())
    assert space["unit_bytes"] == sum(k["bytes"] for k in kinds.values())


def test_showunit_is_a_command_that_only_looks():
    assert "showunit" in READ_ONLY_COMMANDS


def test_showunit_counts_what_was_made_and_what_the_disk_says(tmp_path):
    unit = tmp_path / "u"
    build(unit)
    view, free = shown(lambda: cli(unit, "showunit", "--json"), unit)
    check(view, unit, free)
    assert view["server"] == {"held": False, "pid": None}
    assert view["durability"] == {"open_at": "process", "created_with": None}
    assert view["readonly"] is True
    s = view["sessions"][0]
    assert (s["state"], s["cg_sequence"]) == ("paused", 0)
    cli(unit, "formcg", "S")
    s = json.loads(cli(unit, "showunit", "--json").stdout)["sessions"][0]
    assert s["cg_sequence"] == 1
    # the table says the same
    out = cli(unit, "showunit").stdout
    assert "8: 2.8 MiB (1 thin, 7 full)" in out
    assert "2 (2 copy pending); secondary of 2" in out
    assert "2 (2 nocopy)" in out and "paused" in out


def test_showunit_runs_beside_a_command_that_looks(tmp_path):
    unit = tmp_path / "u"
    build(unit)
    with held_unit(unit, readonly=True):
        view, free = shown(lambda: cli(unit, "showunit", "--json"), unit)
        check(view, unit, free)
        # a command that changes the unit waits its turn (it is refused)
        cli(unit, "mkvol", "Z", "--tracks", 1, code=1)


@pytest.mark.slow
def test_showunit_through_fastfc_serve(tmp_path):
    unit, sock = tmp_path / "u", tmp_path / "sock"
    build(unit)
    with serving(unit, sock) as proc:
        view, free = shown(lambda: fastfc_cli("-u", unit, "showunit", "--json"), unit)
        assert view["server"] == {"held": True, "pid": proc.pid}
        assert view["readonly"] is False          # the server's units, shared
        check(view, unit, free)
        fastfc_cli("-u", unit, "resumegmir", "S")
        s = json.loads(fastfc_cli("-u", unit, "showunit", "--json").stdout)["sessions"][0]
        assert s["state"] == "running"
        fastfc_cli("-u", unit, "pausegmir", "S")
        out = fastfc_cli("-u", unit, "showunit").stdout
        assert f"holds it (pid {proc.pid})" in out


def test_help_lists_showunit():
    r = CliRunner().invoke(main, ["--help"])
    assert "showunit" in r.stdout and "showunit" in r.stdout.split("Commands:")[1]
    assert "Usage: " in CliRunner().invoke(main, ["showunit", "--help"]).stdout
