"""Hardening of the command line, the demo and library checks.

Each test here failed on the code before it: a traceback or a wrong exit
status where one line and status 1 are promised, a file or a session left by
a refused command, data lost without --force, a number the C core cannot hold.
"""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from fastfc import FlashCopy, GlobalMirror, StorageUnit, Volume, faults
from fastfc.tools.cli import main
from fastfc.errors import InvalidImageError, StateError

from test_cli import N, TS, digest, make_volumes, props, rows  # noqa: F401
from test_cli import fastfc, site1, site2  # noqa: F401  (fixtures)

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture
def tmp_path(request, tmp_path):
    """This module's units live on tmpfs (conftest.tmpfs_tmp_path): its
    commands run in this process, where volumes there take the disk's I/O
    path all the same, and on a busy disk their fsyncs and msyncs took about
    half of the module's time. Tests marked ``on_disk`` keep the disk's
    ``tmp_path``: their children open the units (a child sees tmpfs as
    memory) or their point is the disk's filesystem (its size limits)."""
    if request.node.get_closest_marker("on_disk"):
        return tmp_path
    return request.getfixturevalue("tmpfs_tmp_path")


def listing(path: Path) -> list[str]:
    """Every file under ``path`` (relative), for "nothing created" checks."""
    if not path.exists():
        return []
    return sorted(str(p.relative_to(path)) for p in path.rglob("*"))


def one_line_error(result) -> str:
    assert result.exit_code == 1, (result.stdout, result.stderr)
    assert "Traceback" not in result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: "), result.stderr
    return lines[0]


def run(*args, input=None):
    return CliRunner().invoke(main, list(map(str, args)), input=input)


@pytest.fixture
def session(fastfc, site1, site2):
    """Session gm over A0:B0:C0, A1:B1:C1, one CG committed over data."""
    make_volumes(fastfc, site1, "A0", "A1")
    make_volumes(fastfc, site2, "B0", "B1", "C0", "C1")
    fastfc("write", "A0", "zero", "--repeat", 300)
    fastfc("write", "A1", "one", "--repeat", 300)
    fastfc("mkgmir", "gm", "A0:B0:C0", "A1:B1:C1", remote=site2)
    fastfc("formcg", "gm")
    return site1, site2


# -- 5: removals keep data or refuse without --force ------------------------------------------
def test_rmgmir_keeps_every_c_volume_at_its_last_cg(fastfc, session):
    site1, site2 = session
    cg1 = {c: digest(fastfc, a, site1) for a, c in (("A0", "C0"), ("A1", "C1"))}
    fastfc("write", "A0", "after CG 1", "--offset", 3 * TS)
    fastfc("resumepprc", "A0:B0", "--wait")     # B0 moves past CG 1; C0 must not
    out = fastfc("rmgmir", "gm").stdout
    assert "removed Global Mirror session gm" in out
    assert "C0, C1 keep CG 1" in out and "copied from B" in out
    for c in ("C0", "C1"):
        assert digest(fastfc, c, site2) == cg1[c]
        assert "INVALID" not in rows(fastfc("lsvol", unit=site2))[c][4]
    assert fastfc("lsflash", unit=site2).stdout.strip() == "no FlashCopy relationships"


def test_rmgmir_force_discards_and_names_what_is_lost(fastfc, session):
    site1, site2 = session
    out = fastfc("rmgmir", "gm", "--force").stdout
    assert f"invalid now (their image of CG 1 was not copied from B): C0 ({N} tracks), " \
           f"C1 ({N} tracks)" in out
    assert "INVALID" in rows(fastfc("lsvol", unit=site2))["C0"][4]
    assert "valid image" in fastfc("read", "C0", unit=site2, code=1).stderr


def test_global_mirror_close_copies_to_c_unless_discard():
    def triplet(i):
        a, b, c = (Volume(8, 4096, name=f"{k}{i}") for k in "ABC")
        return a, b, c
    t = [triplet(0), triplet(1)]
    t[0][0].write(0, b"kept" * 4096)
    gm = GlobalMirror(t, name="keep")
    assert gm.form_consistency_group().committed
    image = t[0][0].read(0, 8 * 4096)
    t[0][0].write(0, b"later")
    assert gm.tracks_c_needs() == {"C0": 8, "C1": 8}
    progress = []
    gm.close(on_copy=lambda done, total: progress.append((done, total)))
    assert progress[-1] == (16, 16)
    assert np.array_equal(t[0][2].read(0, 8 * 4096), image) and t[1][2].valid
    t2 = [triplet(2)]
    gm = GlobalMirror(t2, name="drop")
    assert gm.form_consistency_group().committed
    gm.close(discard=True)
    with pytest.raises(InvalidImageError):
        t2[0][2].read(0, 1)


def test_rmvol_refuses_a_volume_with_data_unless_forced(fastfc, site1):
    make_volumes(fastfc, site1, "Z", "D")
    fastfc("write", "D", "precious", "--offset", 5000)
    r = fastfc("rmvol", "Z", "D", code=1)
    assert "volume D holds data (its first non-zero byte is at offset 5000" in r.stderr
    assert "rmvol --force" in r.stderr
    assert set(rows(fastfc("lsvol"))) == {"Z", "D"}       # refused before removing Z
    fastfc("rmvol", "Z")                                  # all zero: nothing to lose
    fastfc("rmvol", "D", "--force")
    assert fastfc("lsvol").stdout.strip() == "no volumes"


def test_rmflash_refusal_names_the_cli_way_out(fastfc, site1):
    make_volumes(fastfc, site1, "S", "T")
    fastfc("mkflash", "S:T", "--nocp")
    err = fastfc("rmflash", "S:T", code=1).stderr
    assert "waitflash S:T first, or rmflash --force" in err and "loses T's" in err
    assert "S:T" in rows(fastfc("lsflash"))


def test_rmflash_of_a_session_flashcopy_is_refused_naming_rmgmir(fastfc, session):
    site1, site2 = session
    for force in ([], ["--force"]):
        err = fastfc("rmflash", "B0:C0", *force, unit=site2, code=1).stderr
        assert "session gm" in err and "rmgmir" in err
    assert "B0:C0" in rows(fastfc("lsflash", unit=site2))
    fastfc("formcg", "gm")                                  # the session still works
    assert "GM gm" in rows(fastfc("lsvol", unit=site2))["C0"][4]


@pytest.mark.parametrize("cmd", [["resyncflash"], ["resyncflash", "--revertible"],
                                 ["reverseflash"], ["commitflash"], ["revertflash"]])
def test_flash_steps_on_a_session_flashcopy_are_refused_naming_rmgmir(fastfc, session, cmd):
    site1, site2 = session
    fastfc("write", "A0", "after the CG", "--offset", 2 * TS)
    fastfc("formcg", "gm")                  # C0 holds CG 2; B0 == A0
    before = {v: digest(fastfc, v, site2) for v in ("B0", "C0")}
    err = one_line_error(run("--unit", site2, *cmd, "B0:C0"))
    assert "session 'gm'" in err and "rmgmir" in err
    assert {v: digest(fastfc, v, site2) for v in ("B0", "C0")} == before
    fastfc("write", "A0", "later", "--offset", 3 * TS)
    fastfc("formcg", "gm")                                  # the session still works
    assert json.loads(fastfc("showgmir", "gm", "--json").stdout)["cg_sequence"] == 3


def test_a_session_that_cannot_be_restored_leaves_the_units_usable(fastfc, session):
    """Metadata naming a session whose C lost its FlashCopy: every command
    still works, showgmir and rmgmir name the problem and rmgmir --force,
    which removes what is left of the session."""
    site1, site2 = session
    db = sqlite3.connect(site2 / "unit.db")
    assert db.execute("DELETE FROM flashcopies WHERE target='C1'").rowcount == 1
    db.commit()
    db.close()
    assert "B0" in rows(fastfc("lsvol", unit=site2))
    assert "A0" in rows(fastfc("lsvol"))
    assert "B0:C0" in rows(fastfc("lsflash", unit=site2))
    for cmd in (["showgmir", "gm"], ["formcg", "gm"], ["rmgmir", "gm"]):
        err = one_line_error(run("-u", site1, *cmd))
        assert "session 'gm' cannot be restored" in err and "C1" in err, err
        assert "rmgmir --force gm" in err, err
    out = fastfc("rmgmir", "gm", "--force").stdout
    assert "removed Global Mirror session gm" in out
    assert "FlashCopy B0:C0" in out and "pair A1:B1" in out
    assert fastfc("lspprc").stdout.strip() == "no PPRC pairs"
    assert fastfc("lsflash", unit=site2).stdout.strip() == "no FlashCopy relationships"
    assert "no Global Mirror session named 'gm'" in one_line_error(run("-u", site1,
                                                                       "showgmir", "gm"))
    fastfc("write", "B1", "free again", unit=site2)


# -- 6: names -----------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["../../escaped", "", ".hidden", "a/b", "x" * 65, "sp ace"])
def test_mkgmir_refuses_a_bad_session_name_and_creates_nothing(fastfc, site1, site2, name):
    make_volumes(fastfc, site1, "A")
    make_volumes(fastfc, site2, "B", "C")
    before = listing(site1.parent)
    r = run("-u", site1, "-r", site2, "mkgmir", name, "A:B:C")
    assert "not a valid session name" in one_line_error(r)
    assert listing(site1.parent) == before
    assert fastfc("lspprc").stdout.strip() == "no PPRC pairs"
    with StorageUnit(site2) as u:
        assert u.store.session_rows() == {}


def test_volume_names_in_specs_are_checked(fastfc, site1):
    make_volumes(fastfc, site1, "S")
    assert "not a valid volume name" in one_line_error(run("-u", site1, "mkflash", "S:../T"))
    assert "not a valid volume name" in one_line_error(run("-u", site1, "read", "../S"))


@pytest.mark.parametrize("name,exc", [("../x", ValueError), ("", ValueError),
                                      ("a" * 65, ValueError), (7, TypeError)])
def test_global_mirror_checks_its_name_before_creating_anything(name, exc):
    a, b, c = (Volume(4, 4096, name=k) for k in "ABC")
    with pytest.raises(exc):
        GlobalMirror([(a, b, c)], name=name)
    assert a._mirror is None and c._tgt_rel is None


# -- 8: one line, status 1, nothing created -------------------------------------------------------
@pytest.mark.on_disk
def test_mkvol_numbers_too_large_create_nothing(fastfc, site1, tmp_path):
    make_volumes(fastfc, site1, "A")
    before = listing(site1)
    for args in (["H2", "--tracks", "99999999999999999999"],
                 ["H1", "--size", "100T"],
                 ["H3", "--tracks", 1 << 50, "--track-size", "16M"]):
        one_line_error(run("-u", site1, "mkvol", *args))
        assert listing(site1) == before
    assert "does not fit: the filesystem of" in one_line_error(
        run("-u", site1, "mkvol", "H1", "--size", "100T"))
    new = tmp_path / "new-unit"                  # a refused mkvol makes no unit either
    one_line_error(run("-u", new, "mkvol", "H1", "--size", "100T"))
    assert not new.exists()


def _tree(path: Path) -> dict[str, bytes | None]:
    """Every entry under ``path`` with a file's bytes (None: a directory)."""
    return {str(p.relative_to(path)): (None if p.is_dir() else p.read_bytes())
            for p in sorted(path.rglob("*"))}


@pytest.mark.on_disk
def test_a_failed_mkvol_in_a_directory_of_files_leaves_every_file(tmp_path, monkeypatch):
    """A directory holding the user's files is no unit: mkvol refuses it and
    removes nothing (its clean-up of a half-made unit once wiped the whole
    directory, so that ``-u .`` or ``-u ~`` would have)."""
    d = tmp_path / "d"
    (d / "sub").mkdir(parents=True)
    (d / "important.txt").write_text("x\n")
    (d / "sub" / "deep.txt").write_text("deep\n")
    before = _tree(d)
    assert "not empty and holds no unit.db" in one_line_error(
        run("-u", d, "mkvol", "v", "--size", "1M"))
    assert _tree(d) == before
    monkeypatch.chdir(d)                                   # -u .
    assert "not empty and holds no unit.db" in one_line_error(
        run("-u", ".", "mkvol", "v", "--size", "1M"))
    assert _tree(d) == before


@pytest.mark.on_disk
def test_a_failed_mkvol_removes_only_what_it_made(tmp_path):
    """A volume the system refuses after the unit was made: the unit's own
    entries go, by name; what was there before stays, and a directory the
    command made goes only if it is empty then."""
    huge = ["mkvol", "v", "--size", "100T", "--thin"]    # past the mmap limit
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "unit.lock").write_text("")                  # left by an earlier open
    one_line_error(run("-u", empty, *huge))
    assert listing(empty) == ["unit.lock"]
    nested = tmp_path / "a" / "b" / "c"                    # mkvol makes a, b and c
    one_line_error(run("-u", nested, *huge))
    assert not (tmp_path / "a").exists()


@pytest.mark.on_disk
def test_mkvol_thin_is_sparse_and_a_size_the_filesystem_refuses_creates_nothing(
        fastfc, site1):
    make_volumes(fastfc, site1, "A")
    before = listing(site1)
    one_line_error(run("-u", site1, "mkvol", "H1", "--size", "100T", "--thin"))   # > ext4's 16 TiB
    assert listing(site1) == before
    fastfc("mkvol", "T", "--size", "1G", "--thin")
    fastfc("mkvol", "K", "--size", "8M")
    files = {n: site1 / "volumes" / f"{n}.vol" for n in ("T", "K")}
    assert files["T"].stat().st_blocks * 512 < (1 << 20)              # sparse
    assert files["K"].stat().st_blocks * 512 >= 8 << 20              # thick: allocated now
    fastfc("write", "T", "thin data", "--offset", 5 << 20)
    assert "thin data" in fastfc("read", "T", "--offset", 5 << 20, "--length", 9).stdout


@pytest.mark.parametrize("args", [
    ["write", "A", "x", "--offset", "12345678901234567890123"],
    ["read", "A", "--offset", "12345678901234567890123"],
    ["read", "A", "--length", "12345678901234567890123"],
    ["write", "A", "x", "--repeat", "12345678901234567890123"],
    ["mkflash", "A:B", "--seq", "12345678901234567890123"],
])
def test_huge_numbers_are_one_line(fastfc, site1, args):
    make_volumes(fastfc, site1, "A", "B")
    assert "too large" in one_line_error(run("-u", site1, *args))


def test_io_past_the_end_names_the_capacity(fastfc, site1):
    make_volumes(fastfc, site1, "A")
    msg = one_line_error(run("-u", site1, "read", "A", "--offset", N * TS + 1000))
    assert f"offset {N * TS + 1000} is past the end of A, which holds {N * TS} bytes" in msg
    msg = one_line_error(run("-u", site1, "write", "A", "xy", "--offset", N * TS - 1))
    assert "2 bytes at offset" in msg and f"holds {N * TS} bytes" in msg
    assert fastfc("read", "A", "--offset", N * TS).stdout.strip() == f"{N * TS:08x}"


RLIMITED = """
import resource, sys
def vm():
    for line in open("/proc/self/status"):
        if line.startswith("VmSize"):
            return int(line.split()[1]) * 1024
import fastfc.tools.cli
resource.setrlimit(resource.RLIMIT_AS, (vm() + int(sys.argv[1]), resource.RLIM_INFINITY))
sys.argv = ["fastfc"] + sys.argv[2:]
fastfc.tools.cli.main()
"""


@pytest.mark.on_disk
@pytest.mark.slow
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="RLIMIT_AS and /proc")
def test_under_a_memory_limit_big_io_streams_and_the_rest_is_one_line(tmp_path):
    unit = tmp_path / "u"
    r = run("-u", unit, "mkvol", "V", "--size", "64M")
    assert r.exit_code == 0, r.stderr
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(
        [str(ROOT), os.environ.get("PYTHONPATH", "")])}

    def limited(extra, *args):
        return subprocess.run([sys.executable, "-c", RLIMITED, str(extra), "-u", str(unit),
                               *map(str, args)], capture_output=True, text=True, env=env, timeout=120)

    # the volume maps 64 MiB; 100 MiB more leaves no room for a 64 MiB copy
    for args in (["read", "V", "--length", "64M"], ["read", "V", "--sha256"],
                 ["write", "V", "x", "--repeat", 60_000_000]):
        p = limited(100 << 20, *args)
        assert p.returncode == 0 and not p.stderr, (args, p.stderr)
    # too little to map the volume at all: one line, status 1
    p = limited(20 << 20, "lsvol")
    assert p.returncode == 1 and "Traceback" not in p.stderr, p.stderr
    assert len(p.stderr.strip().splitlines()) == 1 and "memory" in p.stderr


def test_memory_and_overflow_errors_are_one_line(fastfc, site1, monkeypatch):
    make_volumes(fastfc, site1, "A")
    from fastfc.tools.cli import volumes as cli

    def boom(*a, **k):
        raise MemoryError()
    monkeypatch.setattr(cli, "_hexdump", boom)
    assert "out of memory" in one_line_error(run("-u", site1, "read", "A"))

    def over(*a, **k):
        raise OverflowError("Python int too large to convert to C ssize_t")
    monkeypatch.setattr(cli, "_hexdump", over)
    assert "too large" in one_line_error(run("-u", site1, "read", "A"))


# -- 13: smaller ones ---------------------------------------------------------------------------------
def test_mkflash_wait_keeps_to_the_copy_rate_with_an_eta_on_stderr(fastfc, site1):
    make_volumes(fastfc, site1, "S", "T")                 # 256 KiB
    t = time.monotonic()
    r = fastfc("mkflash", "S:T", "--copy-rate", "128K", "--wait")
    took = time.monotonic() - t
    assert took >= 1.5, took                              # 256 KiB at 128 KiB/s: 2 s
    assert "ETA" in r.stderr and "at 128 KiB/s" in r.stderr and "\x1b[" not in r.stderr
    assert digest(fastfc, "T", site1) == digest(fastfc, "S", site1)


def test_a_wait_that_would_take_days_is_refused_before_anything_is_made(fastfc, site1):
    make_volumes(fastfc, site1, "S", "T")
    msg = one_line_error(run("-u", site1, "mkflash", "S:T", "--copy-rate", "1", "--wait"))
    assert "--copy-rate" in msg and "days" in msg
    assert fastfc("lsflash").stdout.strip() == "no FlashCopy relationships"


def test_fault_volume_must_be_a_volume():
    b = Volume(4, 4096, name="B0")
    with pytest.raises(TypeError, match="not its name"):
        faults.inject("prepare", "B0")
    with pytest.raises(TypeError):
        faults.inject("coordinate", b)
    assert faults.armed() == []
    faults.inject("prepare", b)
    faults.clear()


@pytest.mark.parametrize("bad,exc", [(1.9, TypeError), ("7", TypeError), (True, TypeError),
                                     (None, TypeError), (-1, ValueError),
                                     (1 << 63, ValueError)])
def test_flashcopy_sequence_must_be_a_non_negative_integer(bad, exc):
    s, t = Volume(4, 4096), Volume(4, 4096)
    with pytest.raises(exc):
        FlashCopy(s, t, background_copy=False, record=True, sequence=bad)
    assert t._tgt_rel is None
    fc = FlashCopy(s, t, background_copy=False, record=True, sequence=np.int64(5))
    assert fc.sequence == 5 and type(fc.sequence) is int
    if bad is not None:
        with pytest.raises(exc):
            fc.resync(sequence=bad)
        assert fc.sequence == 5 and not fc.revertible


@pytest.mark.parametrize("args", [["--seconds", -1], ["--seconds", 0], ["--triplets", 0],
                                  ["--size-mib", 0], ["--rate", -5], ["--fault-every", -1],
                                  ["--seed", -1]])
def test_demo_knobs_are_checked(args):
    r = run("demo", *args)
    assert r.exit_code == 2 and "fastfc demo:" not in r.stdout, r.stdout


def test_demo_plot_is_checked_before_the_run(tmp_path, monkeypatch):
    t = time.monotonic()
    msg = one_line_error(run("demo", "--seconds", 30, "--plot", tmp_path / "missing" / "x.png"))
    assert "no directory" in msg and time.monotonic() - t < 10
    monkeypatch.setitem(sys.modules, "matplotlib", None)     # not installed
    msg = one_line_error(run("demo", "--seconds", 30, "--plot", tmp_path / "x.png"))
    assert "pip install 'fastfc[plot]'" in msg


def test_demo_output_in_a_pipe_has_one_table_with_its_title_on_its_own_line():
    r = run("demo", "--seconds", 0.3, "--triplets", 1, "--size-mib", 1, "--fault-every", 0)
    assert r.exit_code == 0, r.stderr
    titles = [line for line in r.stdout.splitlines() if "fastfc Global Mirror demo:" in line]
    assert len(titles) == 1 and titles[0].strip().startswith("fastfc Global Mirror demo:")
    assert "\x1b[" not in r.stdout
    assert "every C volume equals its A volume" in r.stdout


def test_cli_messages_name_commands_and_flags(fastfc, site1):
    make_volumes(fastfc, site1, "S", "T", "U")
    fastfc("mkflash", "S:T", "--nocp")
    assert "--record" in fastfc("resyncflash", "S:T", code=1).stderr
    assert "--record" in fastfc("reverseflash", "S:T", code=1).stderr
    err = fastfc("commitflash", "S:T", code=1).stderr
    assert "resyncflash --revertible" in err
    for err in (err, fastfc("rmflash", "S:T", code=1).stderr):
        assert "=True" not in err and "()" not in err


def test_a_commit_failure_resolved_by_commit_counts_as_a_success(fastfc, session):
    site1, site2 = session
    fastfc("write", "A1", "new", "--offset", TS)
    out = fastfc("formcg", "gm", "--inject", "commit:B1").stdout    # status 0: committed
    assert "committed (commit failure resolved)" in out
    show = props(fastfc("showgmir", "gm"))
    assert show["Successful CGs"] == "2" and show["CG attempts"] == "2"
    assert show["Failed CGs"] == "0" and show["Commit failures resolved"] == "1"
    assert digest(fastfc, "C1", site2) == digest(fastfc, "A1", site1)


def test_formcg_says_what_went_to_b_and_showgmir_agrees(fastfc, site1, site2):
    make_volumes(fastfc, site1, "A")
    make_volumes(fastfc, site2, "B", "C")
    fastfc("mkgmir", "gm", "A:B:C", remote=site2)
    out = fastfc("formcg", "gm").stdout
    assert f"sent {N * TS // 1024} KiB to B as Global Copy before the first CG" in out
    assert props(fastfc("showgmir", "gm"))["Sent to B"] == f"{N * TS // 1024} KiB"


@pytest.mark.on_disk
def test_showgmir_counts_the_cgs_of_a_killed_formcg(fastfc, site1, site2):
    make_volumes(fastfc, site1, "A")
    make_volumes(fastfc, site2, "B", "C")
    fastfc("mkgmir", "gm", "A:B:C", remote=site2)
    db = site2 / "unit.db"     # the session's counters, saved by the store per attempt
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(
        [str(ROOT), os.environ.get("PYTHONPATH", "")])}
    p = subprocess.Popen([sys.executable, "-m", "fastfc", "-u", str(site1), "formcg", "gm",
                          "--count", str(10**9)], env=env, stdout=subprocess.DEVNULL,
                         stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        deadline = time.monotonic() + 60
        seen = 0
        while seen < 3:      # watch the log the command keeps, then kill it midway
            assert p.poll() is None and time.monotonic() < deadline
            try:
                with sqlite3.connect(f"file:{db}?mode=ro", uri=True) as con:
                    row = con.execute("SELECT attempts FROM session_stats "
                                      "WHERE name='gm'").fetchone()
                seen = row[0] if row else 0
            except sqlite3.Error:
                pass
    finally:
        os.killpg(p.pid, signal.SIGKILL)
        p.wait()
    show = props(fastfc("showgmir", "gm"))
    assert int(show["CG attempts"]) >= seen >= 3
    assert show["CG attempts"] == show["Successful CGs"]


@pytest.mark.on_disk
def test_showgmir_counts_the_cg_recovery_committed_after_a_kill(fastfc, site1, site2):
    """A formcg killed in the commit of CG 2: recovery commits it, and
    showgmir counts it (attempts, successes and CG sequence agree)."""
    make_volumes(fastfc, site1, "A")
    make_volumes(fastfc, site2, "B", "C")
    fastfc("mkgmir", "gm", "A:B:C", remote=site2)
    fastfc("formcg", "gm")
    fastfc("write", "A", "CG 2")
    code = ("import os, sys\n"
            "from fastfc import faults\n"
            "from fastfc.tools.cli import main\n"
            "faults.inject('commit', action=lambda: os.kill(os.getpid(), 9))\n"
            "main(['-u', sys.argv[1], 'formcg', 'gm'])\n")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(
        [str(ROOT), os.environ.get("PYTHONPATH", "")])}
    p = subprocess.run([sys.executable, "-c", code, str(site1)], env=env,
                       capture_output=True, timeout=120)
    assert p.returncode == -signal.SIGKILL, p.stderr
    show = props(fastfc("showgmir", "gm"))
    assert show["CG sequence"] == "2" and show["C sequences"] == "2"
    assert show["CG attempts"] == "2" and show["Successful CGs"] == "2"
    assert digest(fastfc, "C", site2) == digest(fastfc, "A", site1)


def test_a_session_whose_unit_is_away_is_named_with_that_unit(fastfc, session, tmp_path):
    site1, site2 = session
    site2.rename(tmp_path / "away")
    for cmd in ("showgmir", "formcg", "rmgmir"):
        err = one_line_error(run("-u", site1, cmd, "gm"))
        assert f"not available: {site2}" in err and "secondary unit of A0:B0, A1:B1" in err
    (tmp_path / "away").rename(site2)
    assert props(fastfc("showgmir", "gm"))["CG attempts"] == "1"


# -- scripting ------------------------------------------------------------------------------------
def test_json_output_of_ls_and_show_commands(fastfc, session):
    site1, site2 = session
    vols = json.loads(fastfc("lsvol", "--json", unit=site2).stdout)
    c0 = next(v for v in vols if v["name"] == "C0")
    assert c0 == {"name": "C0", "tracks": N, "track_size": TS, "capacity": N * TS,
                  "valid": True, "roles": ["FC target of B0", "GM gm"]}
    fcs = json.loads(fastfc("lsflash", "--json", unit=site2).stdout)
    assert [f["id"] for f in fcs] == ["B0:C0", "B1:C1"]
    assert fcs[0]["sequence"] == 1 and fcs[0]["tracks"] == N and fcs[0]["record"] is True
    pairs = json.loads(fastfc("lspprc", "--json").stdout)
    assert {p["id"] for p in pairs} == {"A0:B0", "A1:B1"}
    assert pairs[0]["out_of_sync"] == 0 and pairs[0]["mode"] == "gcp"
    show = json.loads(fastfc("showgmir", "gm", "--json").stdout)
    assert show["session"] == "gm" and show["cg_sequence"] == 1 and show["c_sequences"] == [1, 1]
    assert show["attempts"] == 1 and show["successes"] == 1 and show["failures"] == {}
    assert show["commit_failures_resolved"] == 0 and isinstance(show["bytes_drained"], int)
    assert [t["c"] for t in show["triplets"]] == ["C0", "C1"]
    assert json.loads(fastfc("lsvol", "--json", unit=site1.parent / "empty-unit-x",
                             code=1).stdout or "[]") == []


def test_help_documents_exit_codes():
    out = run("--help").stdout
    assert "Exit status:" in out
    for code in ("0  ", "1  ", "2  "):
        assert code in out


# -- bad usage and a bad environment: one line, status 2 -------------------------------------------
def usage_error(result) -> str:
    assert result.exit_code == 2, (result.stdout, result.stderr)
    assert "Traceback" not in result.stderr
    lines = [line for line in result.stderr.strip().splitlines() if line.startswith("Error: ")]
    assert len(lines) == 1, result.stderr
    return lines[0]


@pytest.mark.parametrize("args", [["mkvol", "V", "--size", "1M"], ["lsvol"],
                                  ["write", "V", "x"]])
def test_a_unit_path_naming_a_file_is_a_usage_error(tmp_path, args):
    f = tmp_path / "notes.txt"
    f.write_text("keep me\n")
    assert "--unit" in usage_error(run("-u", f, *args)) and "not a directory" in \
        usage_error(run("-u", f, *args))
    assert "--remote-unit" in usage_error(run("-u", tmp_path / "u", "-r", f, *args))
    assert f.read_text() == "keep me\n" and sorted(p.name for p in tmp_path.iterdir()) == \
        ["notes.txt"]


@pytest.mark.on_disk
@pytest.mark.parametrize("var,value,allowed", [
    ("FASTFC_COPY_THREADS", "many", "a whole number >= 1"),
    ("FASTFC_COPY_THREADS", "0", "a whole number >= 1"),
    ("FASTFC_KERNELS", "avx", "one of scalar, avx2, avx512"),
])
@pytest.mark.parametrize("args", [["--help"], ["lsvol"], ["mkvol", "V", "--size", "1M"]])
def test_a_bad_environment_variable_is_one_line_and_status_2(tmp_path, var, value, allowed,
                                                             args):
    env = dict(os.environ, **{var: value})
    out = subprocess.run([sys.executable, "-m", "fastfc", "-u", str(tmp_path / "u"), *args],
                         env=env, capture_output=True, text=True, timeout=60)
    assert out.returncode == 2, out.stderr
    assert out.stderr.strip().splitlines() == [f"Error: {var} must be {allowed}, got {value!r}"]
    assert out.stdout == "" and not (tmp_path / "u").exists()


@pytest.mark.parametrize("size", ["0", "0K", "0.0M"])
def test_mkvol_size_zero_is_refused_as_usage(fastfc, site1, size):
    assert "must be positive" in usage_error(run("-u", site1, "mkvol", "V", "--size", size))
    assert not site1.exists()


@pytest.mark.parametrize("track_size", ["3000", "256", "32M", "0", "1.5K"])
def test_mkvol_a_track_size_not_a_power_of_two_in_range_is_a_usage_error(fastfc, site1,
                                                                           track_size):
    err = usage_error(run("-u", site1, "mkvol", "V", "--tracks", 4, "--track-size", track_size))
    assert "--track-size" in err
    assert "power of two from 512 to 16M" in err or "whole number of bytes" in err
    assert not site1.exists()


@pytest.mark.parametrize("size,track_size,tracks", [
    ("1.5M", "64K", 24), ("1.5m", "512", 3072), ("2.5KiB", "512", 5), (".5G", "16M", 32),
    ("1.25K", "1K", 2),          # whole bytes, rounded up to tracks as --size always is
])
def test_mkvol_takes_decimal_sizes_that_come_to_whole_bytes(fastfc, site1, size, track_size,
                                                            tracks):
    fastfc("mkvol", "V", "--size", size, "--track-size", track_size)
    assert json.loads(fastfc("lsvol", "--json").stdout)[0]["tracks"] == tracks


@pytest.mark.parametrize("size", ["1.5", "0.3K", "1.0000001M"])
def test_a_size_that_is_not_whole_bytes_is_a_usage_error(fastfc, site1, size):
    assert "whole number of bytes" in usage_error(run("-u", site1, "mkvol", "V", "--size", size))


@pytest.mark.on_disk
def test_sizes_in_petabytes_and_exabytes_are_read_up_to_the_largest_volume(fastfc, site1):
    from fastfc.tools.cli.params import SIZE
    assert SIZE.convert("1P", None, None) == 1 << 50
    assert SIZE.convert("1.5E", None, None) == 3 << 59
    assert SIZE.convert("7EiB", None, None) == 7 << 60
    # parsed, then refused for what it is (no filesystem holds it), not for its suffix
    err = one_line_error(run("-u", site1, "mkvol", "V", "--size", "1P", "--thin"))
    assert "is not a size" not in err and "nothing was created" in err
    assert "too large" in one_line_error(run("-u", site1, "mkvol", "V", "--size", "8E"))


@pytest.mark.parametrize("args", [
    ["mkgmir", "g", "A:B:C", "--cg-interval", "nan"],
    ["mkgmir", "g", "A:B:C", "--drain-time", "NaN"],
    ["mkgmir", "g", "A:B:C", "--coord-time", "nan"],
    ["formcg", "g", "--seconds", "nan"],
    ["--wait", "nan", "lsvol"],
    ["demo", "--seconds", "nan"], ["demo", "--rate", "nan"], ["demo", "--fault-every", "nan"],
])
def test_nan_is_not_a_number_of_seconds_or_a_rate(fastfc, site1, args):
    make_volumes(fastfc, site1, "A", "B", "C")
    before = listing(site1)
    assert "is not a number" in usage_error(run("-u", site1, *args))
    assert listing(site1) == before


# -- a unit opens whatever its rows name, degraded ----------------------------------------------
def test_a_missing_source_volume_file_opens_the_unit_naming_what_removes_it(fastfc, site1):
    """The .vol file of a FlashCopy source is gone: lsvol, lsflash and the
    other volumes work, the missing volume and the relationship are named
    with the commands that remove them; rmflash --force leaves the target
    (which still read tracks from that source) invalid; then rmvol removes
    the volume's row and the unit opens clean."""
    make_volumes(fastfc, site1, "S", "T", "X")
    fastfc("write", "S", "source", "--repeat", 100)
    fastfc("mkflash", "S:T", "--nocp")
    (site1 / "volumes" / "S.vol").unlink()
    r = fastfc("lsvol")
    assert sorted(rows(r)) == ["T", "X"] and "INVALID" in rows(r)["T"][4]
    assert "volume S of unit" in r.stderr and "S.vol is missing" in r.stderr
    assert "rmvol S removes" in r.stderr and "rmflash --force S:T removes" in r.stderr
    r = fastfc("lsflash")
    assert r.stdout.strip() == "no FlashCopy relationships"
    assert "FlashCopy S:T" in r.stderr and "rmflash --force S:T" in r.stderr
    fastfc("write", "X", "still works")
    assert "rmflash --force S:T" in fastfc("rmvol", "S", code=1).stderr
    assert "rmflash --force S:T" in fastfc("rmflash", "S:T", code=1).stderr
    out = fastfc("rmflash", "--force", "S:T").stdout
    assert "removed FlashCopy S:T" in out and "T is invalid" in out
    assert "removed volume S" in fastfc("rmvol", "S").stdout
    r = fastfc("lsvol")
    assert r.stderr == "" and sorted(rows(r)) == ["T", "X"]
    assert "INVALID" in rows(r)["T"][4]             # recorded: its image is lost
    assert fastfc("lsflash").stderr == ""


def test_a_pair_whose_bitmap_file_is_missing_is_named_and_rmpprc_force_removes_it(fastfc,
                                                                                   site1):
    make_volumes(fastfc, site1, "A", "B")
    fastfc("mkpprc", "A:B", "--type", "mmir")
    db = sqlite3.connect(site1 / "unit.db")
    (fid,), = db.execute("SELECT oos FROM pairs").fetchall()
    db.close()
    (site1 / "bitmaps" / f"{fid}.bm").unlink()
    r = fastfc("lspprc")
    assert r.stdout.strip() == "no PPRC pairs"
    assert "pair A:B" in r.stderr and f"{fid}.bm is missing" in r.stderr
    assert "rmpprc --force A:B removes" in r.stderr
    r = fastfc("lsvol")
    assert "pair A:B" in r.stderr and "PPRC secondary" in rows(r)["B"][4]
    fastfc("write", "A", "primary works")
    assert "rmpprc --force A:B" in fastfc("rmpprc", "A:B", code=1).stderr
    assert "removed pair A:B" in fastfc("rmpprc", "--force", "A:B").stdout
    r = fastfc("lspprc")
    assert r.stderr == "" and r.stdout.strip() == "no PPRC pairs"
    fastfc("write", "B", "a host write")            # B is nobody's secondary now
    assert fastfc("lsvol").stderr == ""
