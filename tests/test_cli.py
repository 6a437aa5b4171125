"""The command line: every command through click's CliRunner, sessions of
several invocations over two unit directories, and the error exits.

Each ``fastfc`` invocation opens its units, runs one command and closes
them, so a test that invokes several commands in a row checks that the
state each one leaves in the unit directories is what the next one finds.
"""

from __future__ import annotations

import hashlib
import os
import re
import subprocess
import sys

import pytest
from click.testing import CliRunner

from fastfc import StorageUnit
from fastfc.tools.cli import main
from helpers import held_unit

TS = 4096
N = 64          # tracks per volume: 256 KiB


@pytest.fixture
def tmp_path(tmpfs_tmp_path):
    """This module's units live on tmpfs (conftest.tmpfs_tmp_path): the
    commands run in this process, where volumes there take the disk's I/O
    path all the same; the only children (helpers.held_unit) hold a unit's
    lock. On a busy disk their fsyncs and msyncs took a good part of the
    module's time."""
    return tmpfs_tmp_path


@pytest.fixture
def site1(tmp_path):
    return tmp_path / "site1"


@pytest.fixture
def site2(tmp_path):
    return tmp_path / "site2"


@pytest.fixture
def fastfc(site1):
    """``fastfc(*args, unit=site1, remote=None, code=0)``: run one command,
    check its exit status, return the result."""
    runner = CliRunner()

    def run(*args, unit=site1, remote=None, code=0):
        opts = []
        if unit is not None:
            opts += ["--unit", str(unit)]
        if remote is not None:
            opts += ["--remote-unit", str(remote)]
        result = runner.invoke(main, [*opts, *map(str, args)], catch_exceptions=False)
        assert result.exit_code == code, (result.stdout, result.stderr)
        if code == 1:   # one clear line, no traceback
            assert result.stderr.startswith("Error: ")
            assert len(result.stderr.strip().splitlines()) == 1, result.stderr
        return result

    return run


def rows(result) -> dict[str, list[str]]:
    """A rich table printed by a list command: first cell -> the cells."""
    out = {}
    for line in result.stdout.splitlines()[2:]:
        cells = re.split(r"\s{2,}", line.strip())
        if cells and cells[0]:
            out[cells[0]] = cells
    return out


def props(result) -> dict[str, str]:
    """The property table of showgmir."""
    out = {}
    for line in result.stdout.splitlines():
        cells = re.split(r"\s{2,}", line.strip())
        if len(cells) == 2:
            out[cells[0]] = cells[1]
    return out


def digest(fastfc, volume, unit) -> str:
    return fastfc("read", volume, "--sha256", unit=unit).stdout.split()[0]


def make_volumes(fastfc, unit, *names):
    fastfc("mkvol", *names, "--tracks", N, "--track-size", TS, unit=unit)


# -- the program ---------------------------------------------------------------------
COMMANDS = ["demo", "mkvol", "lsvol", "rmvol", "write", "read", "mkflash", "lsflash",
            "resyncflash", "waitflash", "commitflash", "revertflash", "reverseflash",
            "rmflash", "mkpprc", "lspprc", "pausepprc", "resumepprc", "failoverpprc",
            "failbackpprc", "rmpprc", "mkgmir", "showgmir", "formcg", "rmgmir", "recovergmir"]


def test_help_lists_every_command(fastfc):
    out = fastfc("--help", unit=None).stdout
    for cmd in COMMANDS:
        assert re.search(rf"^\s+{cmd}\s", out, re.MULTILINE), cmd


@pytest.mark.parametrize("cmd", COMMANDS)
def test_every_command_has_help(fastfc, cmd):
    assert "Usage: " in fastfc(cmd, "--help", unit=None).stdout


def test_python_m_fastfc_help():
    r = subprocess.run([sys.executable, "-m", "fastfc", "--help"], capture_output=True,
                       text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith("Usage: fastfc ")
    assert "mkflash" in r.stdout and "showgmir" in r.stdout


# -- volumes ---------------------------------------------------------------------------
def test_mkvol_lsvol_rmvol(fastfc, site1):
    out = fastfc("mkvol", "A", "B", "--tracks", 16, "--track-size", "4K").stdout
    assert "created volume A: 16 tracks of 4 KiB (64 KiB)" in out
    assert "created volume B" in out
    fastfc("mkvol", "big", "--size", "1M")               # 64 KiB tracks by default
    fastfc("mkvol", "odd", "--size", 5000, "--track-size", 4096)  # rounded up
    table = rows(fastfc("lsvol"))
    assert table["A"] == ["A", "16", "4 KiB", "64 KiB", "-"]
    assert table["big"][1:4] == ["16", "64 KiB", "1 MiB"]
    assert table["odd"][1:4] == ["2", "4 KiB", "8 KiB"]
    assert "removed volume B" in fastfc("rmvol", "B").stdout
    assert set(rows(fastfc("lsvol"))) == {"A", "big", "odd"}
    fastfc("rmvol", "A", "big", "odd")
    assert fastfc("lsvol").stdout.strip() == "no volumes"


def test_mkvol_errors(fastfc, site1):
    fastfc("mkvol", "A", code=2)                                   # no size
    fastfc("mkvol", "A", "--tracks", 4, "--size", "1M", code=2)    # both
    fastfc("mkvol", "A", "--tracks", 4, "--track-size", "3K", code=2)
    fastfc("mkvol", "A", "--tracks", 4, "--track-size", "lots", code=2)
    fastfc("mkvol", "bad/name", "--tracks", 4, code=1)
    fastfc("mkvol", "A", "--tracks", 4)
    r = fastfc("mkvol", "A", "--tracks", 4, code=1)
    assert "already exists" in r.stderr
    assert "no volume named 'nope'" in fastfc("rmvol", "nope", code=1).stderr


def test_a_unit_is_needed_and_only_mkvol_creates_one(fastfc, tmp_path):
    assert "--unit" in fastfc("lsvol", unit=None, code=2).stderr
    r = fastfc("lsvol", unit=tmp_path / "nowhere", code=1)
    assert "no storage unit at" in r.stderr
    assert not (tmp_path / "nowhere").exists()


def test_unit_from_the_environment(site1):
    runner = CliRunner(env={"FASTFC_UNIT": str(site1)})
    assert runner.invoke(main, ["mkvol", "A", "--tracks", 2]).exit_code == 0
    assert "A" in runner.invoke(main, ["lsvol"]).stdout


def test_write_and_read(fastfc, site1):
    make_volumes(fastfc, site1, "A")
    assert fastfc("write", "A", "hello", "--offset", 16).stdout.startswith(
        "wrote 5 bytes to A at offset 16")
    fastfc("write", "A", "ab", "--offset", "8K", "--repeat", 3)
    dump = fastfc("read", "A", "--length", 64).stdout.splitlines()
    assert dump[0] == ("00000000  00 00 00 00 00 00 00 00  00 00 00 00 00 00 00 00  "
                       "|................|")
    assert dump[1].endswith("|hello...........|")
    assert dump[2].startswith("00000020  00 00") and dump[3:] == ["*", "00000040"]
    assert "|ababab" in fastfc("read", "A", "--offset", 8192, "--length", 16).stdout
    with StorageUnit(site1) as u:
        expected = hashlib.sha256(u.volume("A").read(0, N * TS)).hexdigest()
    assert digest(fastfc, "A", site1) == expected
    fastfc("write", "A", "x", "--offset", N * TS, code=1)          # past the end
    fastfc("read", "A", "--offset", N * TS - 4, "--length", 8, code=1)


# -- FlashCopy -------------------------------------------------------------------------
def test_nocopy_flashcopy_keeps_the_point_in_time_image(fastfc, site1):
    make_volumes(fastfc, site1, "S", "T")
    fastfc("write", "S", "before")
    before = digest(fastfc, "S", site1)
    out = fastfc("mkflash", "S:T", "--nocp", "--record").stdout
    assert f"established FlashCopy S:T: sequence 0, NOCOPY, {N} tracks to copy" in out
    fastfc("write", "S", "AFTER!")
    assert digest(fastfc, "T", site1) == before
    assert rows(fastfc("lsflash"))["S:T"] == [
        "S:T", "nocopy", "0", f"{N - 1}/{N}", "no", "NOCOPY record persist"]
    roles = rows(fastfc("lsvol"))
    assert roles["S"][4] == "FC source of T" and roles["T"][4] == "FC target of S"
    fastfc("write", "T", "target writes are allowed")
    fastfc("rmflash", "S:T", "--force")


def test_mkflash_wait_copies_every_track(fastfc, site1):
    make_volumes(fastfc, site1, "S", "T", "P")
    fastfc("write", "S", "data", "--repeat", 5000)
    out = fastfc("mkflash", "S:T", "--wait").stdout
    assert f"established FlashCopy S:T: sequence 0, COPY, {N} tracks to copy" in out
    assert re.search(r"copied S:T in [0-9.]+ s; relationship ended \(not persistent\)", out)
    assert fastfc("lsflash").stdout.strip() == "no FlashCopy relationships"
    assert digest(fastfc, "T", site1) == digest(fastfc, "S", site1)
    fastfc("mkflash", "S:P", "--persist", "--tgtinhibit", "--copy-rate", "64M", "--seq", 7,
           "--wait")
    assert rows(fastfc("lsflash"))["S:P"] == [
        "S:P", "copied", "7", f"0/{N}", "no", "COPY persist tgtinhibit rate 64 MiB/s"]
    assert "--tgtinhibit" in fastfc("write", "P", "no", code=1).stderr
    fastfc("mkflash", "S:T", "--nocp", "--wait", code=2)


def test_waitflash_finishes_a_copy_later(fastfc, site1):
    make_volumes(fastfc, site1, "S", "T")
    with StorageUnit(site1) as u:   # a copy left unfinished by an earlier command
        from fastfc import FlashCopy
        FlashCopy(u.volume("S"), u.volume("T"), background_copy=False, persistent=True)
    assert rows(fastfc("lsflash"))["S:T"][3] == f"{N}/{N}"
    assert "copied S:T in " in fastfc("waitflash", "S:T").stdout
    assert rows(fastfc("lsflash"))["S:T"][1:4] == ["copied", "0", f"0/{N}"]


def test_several_relationships_at_one_instant_or_none(fastfc, site1):
    make_volumes(fastfc, site1, "S", "T1", "T2", "U")
    fastfc("mkflash", "S:T1", "S:nope", "--nocp", code=1)
    fastfc("mkflash", "S:T1", "U:T1", "--nocp", code=1)             # T1 twice
    assert fastfc("lsflash").stdout.strip() == "no FlashCopy relationships"
    out = fastfc("mkflash", "S:T1", "S:T2", "--nocp").stdout
    assert out.count("established") == 2
    assert set(rows(fastfc("lsflash"))) == {"S:T1", "S:T2"}
    assert set(rows(fastfc("lsflash", "S:T2"))) == {"S:T2"}
    assert "no FlashCopy relationship T1:S" in fastfc("lsflash", "T1:S", code=1).stderr


def test_revertible_resync_then_revert_or_commit(fastfc, site1):
    make_volumes(fastfc, site1, "S", "T")
    fastfc("write", "S", "one")
    fastfc("mkflash", "S:T", "--nocp", "--record")
    image1 = digest(fastfc, "T", site1)
    fastfc("write", "S", "two")
    out = fastfc("resyncflash", "S:T", "--revertible").stdout
    assert "resynced S:T: revertible, sequence 1" in out
    assert rows(fastfc("lsflash"))["S:T"][1:5] == ["revertible", "1", f"{N}/{N}", "yes"]
    assert "write-inhibited" in fastfc("write", "S", "three", code=1).stderr
    assert "revertible" in fastfc("rmflash", "S:T", code=1).stderr
    assert "reverted S:T: sequence 0" in fastfc("revertflash", "S:T").stdout
    assert digest(fastfc, "T", site1) == image1
    assert "not revertible" in fastfc("commitflash", "S:T", code=1).stderr
    assert "not revertible" in fastfc("revertflash", "S:T", code=1).stderr
    fastfc("resyncflash", "S:T", "--revertible", "--seq", 9)
    assert "committed S:T: sequence 9" in fastfc("commitflash", "S:T").stdout
    assert digest(fastfc, "T", site1) == digest(fastfc, "S", site1)
    assert rows(fastfc("lsflash"))["S:T"][1:5] == ["nocopy", "9", f"{N}/{N}", "no"]
    fastfc("resyncflash", "S:T", "--revertible", "--wait", code=2)


def test_resyncflash_needs_record_and_wait_copies_changes(fastfc, site1):
    make_volumes(fastfc, site1, "S", "T", "U")
    fastfc("mkflash", "S:U", "--nocp")
    assert "record" in fastfc("resyncflash", "S:U", code=1).stderr
    fastfc("mkflash", "S:T", "--record", "--wait")
    fastfc("write", "S", "changed", "--offset", 5 * TS)
    out = fastfc("resyncflash", "S:T", "--wait").stdout
    assert "resynced S:T: sequence 1, 1 track to copy" in out and "copied S:T" in out
    assert digest(fastfc, "T", site1) == digest(fastfc, "S", site1)


def test_reverseflash_restores_the_source(fastfc, site1):
    make_volumes(fastfc, site1, "S", "T")
    fastfc("write", "S", "good data")
    fastfc("mkflash", "S:T", "--record", "--wait")
    good = digest(fastfc, "S", site1)
    fastfc("write", "S", "CORRUPTED", "--offset", 3 * TS)
    fastfc("write", "S", "CORRUPTED", "--offset", 9 * TS)
    out = fastfc("reverseflash", "S:T").stdout
    assert "restored S from T: 2 tracks copied" in out
    assert digest(fastfc, "S", site1) == good


def test_rmflash_refuses_an_incomplete_copy_unless_forced(fastfc, site1):
    make_volumes(fastfc, site1, "S", "T", "U")
    fastfc("mkflash", "S:T", "--nocp")
    r = fastfc("rmflash", "S:T", code=1)
    assert f"{N} tracks to copy" in r.stderr
    assert "<" not in r.stderr            # names, not reprs
    out = fastfc("rmflash", "S:T", "--force").stdout
    assert f"withdrew S:T; T is invalid ({N} tracks not copied)" in out
    assert "INVALID" in rows(fastfc("lsvol"))["T"][4]
    assert "valid image" in fastfc("read", "T", code=1).stderr
    fastfc("mkflash", "S:U", "--persist", "--wait")
    assert fastfc("rmflash", "S:U").stdout.strip() == "withdrew S:U"
    assert fastfc("lsflash").stdout.strip() == "no FlashCopy relationships"


# -- PPRC --------------------------------------------------------------------------------
@pytest.fixture
def two_sites(fastfc, site1, site2):
    make_volumes(fastfc, site1, "A", "A2")
    make_volumes(fastfc, site2, "B", "B2")
    fastfc("write", "A", "production data", "--repeat", 100)
    return site1, site2


def test_metro_mirror_pause_and_resume(fastfc, two_sites):
    site1, site2 = two_sites
    out = fastfc("mkpprc", "A:B", "--type", "mmir", "--wait", remote=site2).stdout
    assert f"established PPRC pair A:B (mmir): {N} tracks to copy" in out
    assert "initial copy done: A:B full duplex" in out
    assert rows(fastfc("lspprc"))["A:B"] == [
        "A:B", "full duplex", "mmir", "0", "-", "site1", "site2"]
    fastfc("write", "A", "synchronous", "--offset", 7 * TS)
    assert digest(fastfc, "B", site2) == digest(fastfc, "A", site1)
    assert "PPRC secondary" in rows(fastfc("lsvol", unit=site2))["B"][4]
    assert "PPRC secondary" in fastfc("write", "B", "no", unit=site2, code=1).stderr
    assert "suspended A:B" in fastfc("pausepprc", "A:B").stdout
    fastfc("write", "A", "while paused", "--offset", 3 * TS)
    fastfc("write", "A", "while paused", "--offset", 30 * TS)
    assert rows(fastfc("lspprc", "A:B"))["A:B"][1:5] == ["suspended", "mmir", "2", "host"]
    assert digest(fastfc, "B", site2) != digest(fastfc, "A", site1)
    out = fastfc("resumepprc", "A:B", "--wait").stdout
    assert "resumed A:B: 2 tracks out of sync" in out and "A:B full duplex" in out
    assert digest(fastfc, "B", site2) == digest(fastfc, "A", site1)


def test_global_copy_sends_only_when_a_command_drains(fastfc, two_sites):
    site1, site2 = two_sites
    fastfc("mkpprc", "A:B", "A2:B2", "--type", "gcp", remote=site2)
    table = rows(fastfc("lspprc"))
    assert table["A:B"][1:4] == ["copy pending", "gcp", str(N)]
    assert table["A2:B2"][1:4] == ["copy pending", "gcp", str(N)]
    fastfc("resumepprc", "A:B", "A2:B2", "--wait")
    assert rows(fastfc("lspprc"))["A:B"][3] == "0"
    assert digest(fastfc, "B", site2) == digest(fastfc, "A", site1)
    fastfc("write", "A", "async")
    assert rows(fastfc("lspprc"))["A:B"][3] == "1"
    fastfc("resumepprc", "A:B", "--wait")
    assert digest(fastfc, "B", site2) == digest(fastfc, "A", site1)


def test_partner_units_open_by_themselves(fastfc, two_sites, tmp_path):
    """Once paired, the secondary unit need not be named again. Without it a
    write to the primary is recorded out of sync, never lost."""
    site1, site2 = two_sites
    fastfc("mkpprc", "A:B", "--type", "gcp", "--nocp", remote=site2)
    fastfc("write", "A", "recorded", unit=site1)
    assert rows(fastfc("lspprc", unit=site1))["A:B"][3] == "1"
    site2.rename(tmp_path / "elsewhere")
    assert rows(fastfc("lspprc"))["A:B"][1:5] == [
        "unknown", "gcp", "?", "secondary unit not available"]
    assert "not available" in fastfc("pausepprc", "A:B", code=1).stderr
    r = CliRunner().invoke(main, ["-u", str(site1), "write", "A", "away", "--offset", 9 * TS])
    assert r.exit_code == 0, r.stderr
    assert "recorded out of sync" in r.stdout
    assert "(unit away)" in rows(fastfc("lsvol"))["A"][4]
    fastfc("write", "A2", "an unpaired volume takes writes")
    (tmp_path / "elsewhere").rename(site2)
    fastfc("resumepprc", "A:B", "--wait")
    assert digest(fastfc, "B", site2) == digest(fastfc, "A", site1)


def test_a_moved_pair_relinked_by_a_command_that_only_looks_stays_linked(
        fastfc, two_sites, tmp_path):
    """Naming both units of a pair that moved apart re-links them; a command
    that opens them read-only records the link too, so the next command
    finds the secondary without -r. While another command holds a unit the
    link holds for the one command, with a note."""
    site1, site2 = two_sites
    fastfc("mkpprc", "A:B", "--type", "gcp", remote=site2)
    moved = tmp_path / "moved" / "site2"
    moved.parent.mkdir()
    site2.rename(moved)
    assert rows(fastfc("lspprc"))["A:B"][1] == "unknown"
    r = fastfc("lspprc", remote=moved)
    assert rows(r)["A:B"][1] == "copy pending" and r.stderr == ""
    assert rows(fastfc("lspprc"))["A:B"][1] == "copy pending"    # found without -r
    again = tmp_path / "again"
    moved.rename(again)
    with held_unit(again, readonly=True):
        r = fastfc("lspprc", remote=again)
        assert rows(r)["A:B"][1] == "copy pending"
        assert "re-linked for this command only" in r.stderr
    assert rows(fastfc("lspprc"))["A:B"][1] == "unknown"
    fastfc("lsvol", remote=again)
    assert rows(fastfc("lspprc"))["A:B"][1] == "copy pending"
    fastfc("write", "A", "sent", "--offset", 2 * TS)
    fastfc("resumepprc", "A:B", "--wait")
    assert digest(fastfc, "B", again) == digest(fastfc, "A", site1)


def test_failover_and_failback(fastfc, two_sites):
    site1, site2 = two_sites
    fastfc("mkpprc", "A:B", "--type", "mmir", "--wait", remote=site2)
    out = fastfc("failoverpprc", "A:B").stdout
    assert "failed over A:B: B accepts host writes" in out
    fastfc("write", "B", "production moved", "--offset", 11 * TS, unit=site2)
    assert rows(fastfc("lspprc"))["A:B"][1:5] == ["suspended", "mmir", "1", "failover"]
    out = fastfc("failbackpprc", "A:B", "--wait").stdout
    assert "failed back: pair B:A, 1 track to send" in out
    assert rows(fastfc("lspprc"))["B:A"] == [
        "B:A", "full duplex", "mmir", "0", "-", "site2", "site1"]
    assert digest(fastfc, "A", site1) == digest(fastfc, "B", site2)
    assert "PPRC secondary" in fastfc("write", "A", "no", code=1).stderr


def test_writes_at_the_secondary_site_alone_are_recorded_for_failback(fastfc, two_sites):
    site1, site2 = two_sites
    fastfc("mkpprc", "A:B", "--type", "gcp", "--wait", remote=site2)
    fastfc("failoverpprc", "A:B", unit=site2)       # the pair is found from either side
    fastfc("write", "B", "at site 2", "--offset", 5 * TS, unit=site2)
    assert rows(fastfc("lspprc", unit=site1))["A:B"][3] == "1"
    fastfc("failbackpprc", "A:B", "--wait", unit=site2)
    assert digest(fastfc, "A", site1) == digest(fastfc, "B", site2)


def test_rmpprc(fastfc, two_sites):
    site1, site2 = two_sites
    fastfc("mkpprc", "A:B", "--type", "gcp", remote=site2)
    r = fastfc("rmpprc", "A:B", code=1)          # B lacks tracks: refused, names them
    assert f"{N} tracks out of sync" in r.stderr and "rmpprc --force" in r.stderr
    assert rows(fastfc("lspprc"))["A:B"][1] == "copy pending"
    assert "removed pair A:B" in fastfc("rmpprc", "A:B", "--force").stdout
    assert fastfc("lspprc").stdout.strip() == "no PPRC pairs"
    fastfc("mkpprc", "A:B", "--type", "mmir", "--wait", remote=site2)
    assert "removed pair A:B" in fastfc("rmpprc", "A:B").stdout   # in sync: no --force
    assert fastfc("lspprc").stdout.strip() == "no PPRC pairs"
    fastfc("write", "B", "free again", unit=site2)
    assert "no PPRC pair A:B" in fastfc("rmpprc", "A:B", code=1).stderr


def test_a_pair_within_one_unit_works_across_invocations(fastfc, site1):
    """Without --remote-unit the secondary is in the local unit: the pair is
    there in every later invocation, mirrors, and can be removed."""
    make_volumes(fastfc, site1, "A", "B")
    fastfc("mkpprc", "A:B", "--type", "mmir", "--wait")
    assert rows(fastfc("lspprc"))["A:B"][:4] == ["A:B", "full duplex", "mmir", "0"]
    fastfc("write", "A", "synchronous", "--offset", 7 * TS)
    assert digest(fastfc, "B", site1) == digest(fastfc, "A", site1)
    assert "PPRC secondary" in fastfc("write", "B", "no", code=1).stderr
    fastfc("pausepprc", "A:B")
    fastfc("write", "A", "paused", "--offset", 9 * TS)
    assert rows(fastfc("lspprc"))["A:B"][1:4] == ["suspended", "mmir", "1"]
    fastfc("resumepprc", "A:B", "--wait")
    assert digest(fastfc, "B", site1) == digest(fastfc, "A", site1)
    assert "removed pair A:B" in fastfc("rmpprc", "A:B", "--force").stdout
    assert fastfc("lspprc").stdout.strip() == "no PPRC pairs"
    fastfc("write", "B", "free again")


def test_pprc_errors(fastfc, two_sites):
    site1, site2 = two_sites
    fastfc("mkpprc", "A:B", remote=site2, code=2)                  # --type is required
    fastfc("mkpprc", "A:B", "--type", "xrc", remote=site2, code=2)
    fastfc("mkpprc", "A", "--type", "gcp", remote=site2, code=2)
    assert "no volume named 'A'" in fastfc(
        "mkpprc", "A:B", "--type", "gcp", unit=site2, remote=site1, code=1).stderr
    fastfc("mkvol", "small", "--tracks", 2, unit=site2)
    assert "geometry" in fastfc("mkpprc", "A:small", "--type", "gcp", remote=site2,
                                code=1).stderr
    fastfc("mkpprc", "A:B", "--type", "gcp", remote=site2)
    assert "already in a PPRC pair" in fastfc("mkpprc", "A:B2", "--type", "gcp",
                                              remote=site2, code=1).stderr
    r = fastfc("rmvol", "A", code=1)
    assert "in a FlashCopy relationship, PPRC pair" in r.stderr and "rmpprc" in r.stderr


# -- Global Mirror ------------------------------------------------------------------------
def test_global_mirror_session_across_invocations(fastfc, site1, site2):
    make_volumes(fastfc, site1, "A0", "A1")
    make_volumes(fastfc, site2, "B0", "B1", "C0", "C1")
    fastfc("write", "A0", "zero", "--repeat", 300)
    fastfc("write", "A1", "one", "--repeat", 300)
    out = fastfc("mkgmir", "gm1", "A0:B0:C0", "A1:B1:C1", "--coord-time", 80,
                 remote=site2).stdout
    assert "created Global Mirror session gm1: 2 triplets" in out
    show = props(fastfc("showgmir", "gm1"))
    assert show["CG sequence"] == "0" and show["CG attempts"] == "0"
    assert show["Max coordination time"] == "80 ms"
    assert show["Out of sync"] == f"{2 * N} tracks"

    out = fastfc("formcg", "gm1", "--count", 2).stdout
    assert "2 of 2 consistency groups committed; C volumes at CG 2" in out
    cg2 = {v: digest(fastfc, v, site1) for v in ("A0", "A1")}
    fastfc("write", "A0", "after CG 2", "--offset", 2 * TS)
    assert digest(fastfc, "C0", site2) == cg2["A0"]      # C holds CG 2
    assert digest(fastfc, "C1", site2) == cg2["A1"]
    show = props(fastfc("showgmir", "gm1", unit=site2))  # from the remote site alone
    assert show["CG sequence"] == "2" and show["C sequences"] == "2"
    assert show["CG attempts"] == "2" and show["Successful CGs"] == "2"
    assert show["Out of sync"] == "1 track"
    assert show["RPO"].endswith(" s")

    fastfc("formcg", "gm1")
    assert digest(fastfc, "C0", site2) == digest(fastfc, "A0", site1)
    out = fastfc("formcg", "gm1", "--seconds", 0.2).stdout
    assert "consistency groups committed" in out
    show = props(fastfc("showgmir", "gm1"))
    assert int(show["CG sequence"]) > 3 and show["Failed CGs"] == "0"
    assert show["CG attempts"] == show["Successful CGs"]
    triplets = rows(fastfc("showgmir", "gm1"))
    assert triplets["A0"][:3] == ["A0", "B0", "C0"]
    assert "GM gm1" in rows(fastfc("lsvol"))["A0"][4]
    assert "GM gm1" in rows(fastfc("lsvol", unit=site2))["C1"][4]

    assert "use rmgmir" in fastfc("rmpprc", "A0:B0", code=1).stderr
    assert "removed Global Mirror session gm1" in fastfc("rmgmir", "gm1").stdout
    assert "no Global Mirror session named 'gm1'" in fastfc("showgmir", "gm1",
                                                             code=1).stderr
    assert fastfc("lspprc").stdout.strip() == "no PPRC pairs"
    fastfc("write", "B0", "a plain volume again", unit=site2)


def test_a_session_within_one_unit_works_across_invocations(fastfc, site1):
    make_volumes(fastfc, site1, "A", "B", "C", "X", "Y")
    fastfc("write", "A", "data", "--repeat", 300)
    fastfc("mkgmir", "g", "A:B:C")
    assert "1 of 1 consistency groups committed; C volumes at CG 1" in \
        fastfc("formcg", "g").stdout
    assert digest(fastfc, "C", site1) == digest(fastfc, "A", site1)
    fastfc("write", "A", "later", "--offset", 3 * TS)
    fastfc("formcg", "g", "--count", 2)
    assert digest(fastfc, "C", site1) == digest(fastfc, "A", site1)
    show = props(fastfc("showgmir", "g"))
    assert show["CG sequence"] == "3" and show["Successful CGs"] == "3"
    assert "GM g" in rows(fastfc("lsvol"))["C"][4]
    assert "use rmgmir" in fastfc("rmpprc", "A:B", code=1).stderr
    assert "removed Global Mirror session g" in fastfc("rmgmir", "g").stdout
    assert fastfc("lspprc").stdout.strip() == "no PPRC pairs"
    fastfc("write", "B", "a plain volume again")
    fastfc("mkgmir", "h", "X:Y:C")                  # --force ends one too
    fastfc("formcg", "h")
    assert "removed Global Mirror session h" in fastfc("rmgmir", "h", "--force").stdout
    fastfc("mkpprc", "X:Y", "--type", "gcp")       # and rmpprc --force a Global Copy pair
    assert "removed pair X:Y" in fastfc("rmpprc", "X:Y", "--force").stdout
    fastfc("write", "Y", "free")


def test_formcg_with_injected_faults_exits_1_when_the_last_cg_fails(fastfc, site1, site2):
    make_volumes(fastfc, site1, "A")
    make_volumes(fastfc, site2, "B", "C")
    fastfc("mkgmir", "gm", "A:B:C", remote=site2)
    fastfc("formcg", "gm")
    cg1 = digest(fastfc, "C", site2)
    fastfc("write", "A", "new")
    r = fastfc("formcg", "gm", "--inject", "prepare:B", code=1)
    assert "failed: prepare_failed" in r.stdout
    assert "CG 2 failed: prepare_failed: prepare of B: InjectedFault" in r.stderr
    assert digest(fastfc, "C", site2) == cg1            # C stays on CG 1
    r = fastfc("formcg", "gm", "--count", 2, "--inject", "coordinate")
    assert "failed: coordination_timeout" in r.stdout and "1 of 2" in r.stdout
    show = props(fastfc("showgmir", "gm"))
    # a new invocation numbers from the C volumes' CG: the failed CG 2's
    # number is used again
    assert show["CG sequence"] == "3" and show["Successful CGs"] == "2"
    assert show["Failed CGs"] == "coordination_timeout 1, prepare_failed 1"
    assert digest(fastfc, "C", site2) == digest(fastfc, "A", site1)
    fastfc("formcg", "gm", "--inject", "nowhere", code=2)
    fastfc("formcg", "gm", "--inject", "prepare:Z", code=2)


def test_global_mirror_errors(fastfc, site1, site2):
    make_volumes(fastfc, site1, "A")
    make_volumes(fastfc, site2, "B", "C")
    fastfc("mkgmir", "gm", "A:B", remote=site2, code=2)
    fastfc("mkgmir", "gm", "A:B:C", "--coord-time", 0, remote=site2, code=2)
    fastfc("mkgmir", "gm", "A:B:B", remote=site2, code=1)
    assert fastfc("lspprc").stdout.strip() == "no PPRC pairs"     # nothing left behind
    fastfc("mkgmir", "gm", "A:B:C", remote=site2)
    fastfc("showgmir", "other", code=1)
    fastfc("formcg", "other", code=1)
    fastfc("rmgmir", "other", code=1)


# -- failures of the units themselves --------------------------------------------------------
def test_a_damaged_unit_is_one_line_and_status_1(fastfc, site1):
    make_volumes(fastfc, site1, "A")
    (site1 / "unit.db").write_bytes(b"this is not a database" * 100)
    for f in site1.glob("unit.db-*"):
        f.unlink()
    assert "not a readable fastfc unit database" in fastfc("lsvol", code=1).stderr


def test_a_missing_volume_file_is_reported(fastfc, site1):
    make_volumes(fastfc, site1, "A", "B")
    (site1 / "volumes" / "A.vol").unlink()
    r = fastfc("lsvol")                 # the unit opens without it, naming it
    assert list(rows(r)) == ["B"]
    assert "A.vol is missing" in r.stderr and "rmvol A" in r.stderr


@pytest.mark.skipif(sys.platform == "win32", reason="no flock")
def test_one_writer_per_unit_and_readers_together(fastfc, site1):
    """The CLI uses the unit's own lock: a command that changes a unit is
    refused (naming the holder) while another process holds the unit, and
    waits with --wait; commands that only look share it with readers."""
    make_volumes(fastfc, site1, "A")
    assert not (site1 / "cli" / "lock").exists()
    with held_unit(site1, readonly=True) as child:     # a reader: looking is fine
        assert "A" in fastfc("lsvol").stdout
        digest(fastfc, "A", site1)
        err = fastfc("write", "A", "no", code=1).stderr
        assert f"open read-only by pid {child.pid}" in err
    with held_unit(site1) as child:                    # a writer: nobody else
        err = fastfc("lsvol", code=1).stderr
        assert f"open read-write by pid {child.pid}" in err
        fastfc("--wait", "0.1", "write", "A", "no", code=1)
    with held_unit(site1, hold=0.5):
        fastfc("--wait", "30", "write", "A", "after the holder went")
    fastfc("write", "A", "now")


def test_fastfc_debug_shows_the_traceback(site1, monkeypatch):
    CliRunner().invoke(main, ["--unit", str(site1), "mkvol", "A", "--tracks", 1])
    monkeypatch.setenv("FASTFC_DEBUG", "1")
    r = CliRunner().invoke(main, ["--unit", str(site1), "rmvol", "nope"])
    assert isinstance(r.exception, KeyError)
