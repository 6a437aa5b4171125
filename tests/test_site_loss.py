"""Site loss of a durable Global Mirror session: the storage administrator's
procedure at the secondary unit alone (``recovergmir``, library
``StorageUnit.recover_session``), and the incremental resynchronisation, in
either direction, once the old primary unit is back.

Every step of the procedure runs from the command line (click's CliRunner,
one invocation per command, as in ``tests/test_cli.py``); the data is checked
byte for byte through read-only opens of the units between commands, against
the A images taken when each consistency group formed.
"""

from __future__ import annotations

import json
import shutil
import sqlite3

import numpy as np
import pytest
from click.testing import CliRunner

from fastfc import GlobalMirror, PPRCPair, StorageUnit
from fastfc.errors import StateError, WriteInhibitedError
from fastfc.tools.cli import main

TS = 4096
N = 64          # tracks per volume


@pytest.fixture
def tmp_path(tmpfs_tmp_path):
    """This module's units live on tmpfs (conftest.tmpfs_tmp_path): none of
    its tests is about the disk, and on a busy disk their fsyncs took most
    of their time."""
    return tmpfs_tmp_path


@pytest.fixture
def fastfc():
    """``fastfc(*args, unit, remote=None, code=0)``: one command, its exit
    status checked; returns the result."""
    runner = CliRunner()

    def run(*args, unit, remote=None, code=0):
        opts = ["--unit", str(unit)] + (["--remote-unit", str(remote)] if remote else [])
        result = runner.invoke(main, [*opts, *map(str, args)], catch_exceptions=False)
        assert result.exit_code == code, (result.stdout, result.stderr)
        return result

    return run


def image(path, name) -> np.ndarray:
    """The logical image of volume ``name`` of the unit at ``path``."""
    with StorageUnit(path, readonly=True) as u:
        v = u.volume(name)
        return v.read(0, v.capacity)


def changed_tracks(x: np.ndarray, y: np.ndarray) -> set[int]:
    return set(np.flatnonzero((x != y).reshape(N, TS).any(axis=1)).tolist())


def lspprc(fastfc, unit) -> dict[str, dict]:
    return {p["id"]: p for p in json.loads(fastfc("lspprc", "--json", unit=unit).stdout)}

@pytest.mark.slow

def test_site_loss_procedure_from_the_cli_at_the_secondary_alone(fastfc, tmp_path):
    site1, site2, vault = tmp_path / "site1", tmp_path / "site2", tmp_path / "vault"
    fastfc("mkvol", "A0", "A1", "--tracks", N, "--track-size", TS, unit=site1)
    fastfc("mkvol", "B0", "B1", "C0", "C1", "--tracks", N, "--track-size", TS, unit=site2)
    fastfc("write", "A0", "zero", "--repeat", 3000, unit=site1)
    fastfc("write", "A1", "one", "--repeat", 3000, unit=site1)
    fastfc("mkgmir", "g", "A0:B0:C0", "A1:B1:C1", unit=site1, remote=site2)
    fastfc("formcg", "g", "--count", 2, unit=site1)
    # no host write between the last CG and these reads: A's image of CG 2
    cg2 = {a: image(site1, a) for a in ("A0", "A1")}

    # after CG 2: a CG whose drain sends A0's and A1's new tracks to B and
    # whose FlashCopy phase fails (C stays on CG 2), then a write A never sends
    fastfc("write", "A0", "sent to B, never in a CG", "--offset", 10 * TS, unit=site1)
    fastfc("write", "A1", "sent to B, never in a CG", "--offset", 11 * TS, unit=site1)
    fastfc("formcg", "g", "--inject", "prepare:B1", unit=site1, code=1)
    fastfc("write", "A0", "never sent", "--offset", 20 * TS, unit=site1)
    assert changed_tracks(image(site2, "B0"), cg2["A0"]) == {10}
    a_late = {"A0": image(site1, "A0"), "A1": image(site1, "A1")}

    # the primary site is lost: its unit's directory is gone
    shutil.copytree(site1, vault)
    shutil.rmtree(site1)

    # 1. at the secondary alone: the session and its pairs, the primary named missing
    show = json.loads(fastfc("showgmir", "g", "--json", unit=site2).stdout)
    assert show["state"] == "primary unavailable" and show["c_sequences"] == [2, 2]
    assert str(site1) in show["primary_units"][0]
    text = fastfc("showgmir", "g", unit=site2).stdout
    assert "primary unit(s) not available" in text and "recovergmir g" in text
    pairs = lspprc(fastfc, site2)
    assert pairs["A0:B0"]["reason"] == "primary unit not available"
    assert str(site1) in pairs["A1:B1"]["primary_unit"]
    r = fastfc("write", "B0", "refused", unit=site2, code=1)
    assert "secondary" in r.stderr
    r = fastfc("formcg", "g", unit=site2, code=1)
    assert "recovergmir g" in r.stderr
    r = fastfc("failoverpprc", "A0:B0", unit=site2, code=1)
    assert "session g" in r.stderr and "recovergmir g" in r.stderr
    for cmd in (["resyncflash"], ["revertflash"], ["reverseflash"]):
        r = fastfc(*cmd, "B0:C0", unit=site2, code=1)       # C0 holds the CG to recover
        assert "Global Mirror session 'g'" in r.stderr
    assert "session g" in fastfc("rmflash", "--force", "B0:C0", unit=site2, code=1).stderr

    # 2. recover: B holds the last committed CG, fails over, accepts host writes
    out = fastfc("recovergmir", "g", unit=site2).stdout
    assert "B volumes at CG 2, host-writable" in out
    assert "B0: restored from C0 (1 track changed since CG 2)" in out
    assert "failbackpprc A0:B0" in out
    for a, b, c in (("A0", "B0", "C0"), ("A1", "B1", "C1")):
        assert np.array_equal(image(site2, b), cg2[a])
        assert np.array_equal(image(site2, c), cg2[a])     # C keeps the CG
    with StorageUnit(site2, readonly=True) as u2:       # B0:C0 is the user's now
        assert u2.volume("C0").target_relationship.session is None
    assert "no Global Mirror session named 'g'" in fastfc("showgmir", "g", unit=site2,
                                                          code=1).stderr
    pairs = lspprc(fastfc, site2)
    assert pairs["B0:A0"]["state"] == "suspended" and pairs["B0:A0"]["out_of_sync"] == 1
    assert "site loss" in pairs["B1:A1"]["reason"]
    roles = {v["name"]: v["roles"] for v in
             json.loads(fastfc("lsvol", "--json", unit=site2).stdout)}
    assert "PPRC secondary" not in roles["B0"]
    # run again (a crash after it, an operator who is not sure): nothing changes
    fastfc("recovergmir", "g", unit=site2, code=1)

    # 3. host writes on B are accepted, recorded, and survive reopening
    fastfc("write", "B0", "written at site 2", "--offset", 30 * TS, unit=site2)
    fastfc("write", "B1", "written at site 2", "--offset", 31 * TS, unit=site2)
    assert lspprc(fastfc, site2)["B0:A0"]["out_of_sync"] == 2
    b_now = {b: image(site2, b) for b in ("B0", "B1")}
    assert changed_tracks(b_now["B0"], cg2["A0"]) == {30}

    # 4. the old primary unit comes back (restored from its copy)
    shutil.copytree(vault, site1)
    pairs = lspprc(fastfc, site2)      # read-only: both sides' changes, merged
    assert pairs["A0:B0"]["state"] == "suspended" and pairs["A0:B0"]["reason"] == "failover"
    # tracks changed on either side since CG 2: sent to B after it (restored
    # on B), never sent by A, written on B since the failover
    assert pairs["A0:B0"]["out_of_sync"] == 3      # 10, 20, 30
    assert pairs["A1:B1"]["out_of_sync"] == 2      # 11, 31

    # failback from B to A: only the changed tracks move; A's own writes
    # since CG 2 are overwritten, and the command says so
    out = fastfc("failbackpprc", "A0:B0", "A1:B1", unit=site2).stdout
    assert "failed back: pair B0:A0, 3 tracks to send" in out
    assert "writes made on A0 since the failover are overwritten" in out
    pairs = lspprc(fastfc, site2)
    assert pairs["B0:A0"]["out_of_sync"] == 3 and pairs["B1:A1"]["out_of_sync"] == 2
    assert pairs["B0:A0"]["primary_unit"] == str(site2)
    fastfc("resumepprc", "B0:A0", "B1:A1", "--wait", unit=site2)
    for a, b in (("A0", "B0"), ("A1", "B1")):
        assert np.array_equal(image(site1, a), b_now[b])
        assert np.array_equal(image(site2, b), b_now[b])
    assert changed_tracks(a_late["A0"], b_now["B0"]) == {10, 20, 30}
    assert lspprc(fastfc, site2)["B0:A0"]["out_of_sync"] == 0

    # back to the original direction later (planned: B's writes sent first),
    # fail over to A, write there, fail back A -> B: only the changed tracks
    fastfc("write", "B0", "mirrored to A", "--offset", 40 * TS, unit=site2)
    out = fastfc("resumepprc", "B0:A0", "--wait", unit=site2).stdout
    assert "1 track out of sync" in out
    fastfc("failoverpprc", "B0:A0", unit=site1)
    fastfc("write", "A0", "site 1 again", "--offset", 41 * TS, unit=site1)
    out = fastfc("failbackpprc", "B0:A0", "--wait", unit=site1).stdout
    assert "failed back: pair A0:B0, 1 track to send" in out
    a0 = image(site1, "A0")
    assert np.array_equal(image(site2, "B0"), a0)
    assert changed_tracks(a0, b_now["B0"]) == {40, 41}
    assert lspprc(fastfc, site1)["A0:B0"]["primary_unit"] == str(site1)

    # and protected by Global Mirror again
    fastfc("rmpprc", "A0:B0", unit=site1)
    fastfc("rmflash", "B0:C0", "--force", unit=site2)      # C0's old CG: not needed now
    fastfc("mkgmir", "g2", "A0:B0:C0", unit=site1, remote=site2)
    fastfc("formcg", "g2", unit=site1)
    assert np.array_equal(image(site2, "C0"), a0)


def test_failbackpprc_says_writes_on_the_old_primary_are_overwritten(fastfc, tmp_path):
    site1, site2 = tmp_path / "site1", tmp_path / "site2"
    fastfc("mkvol", "A", "--tracks", N, "--track-size", TS, unit=site1)
    fastfc("mkvol", "B", "--tracks", N, "--track-size", TS, unit=site2)
    fastfc("mkpprc", "A:B", "--type", "gcp", "--wait", unit=site1, remote=site2)
    fastfc("failoverpprc", "A:B", unit=site1)
    fastfc("write", "A", "lost on failback", unit=site1)
    fastfc("write", "B", "the new primary", "--offset", 5 * TS, unit=site2)
    out = fastfc("failbackpprc", "A:B", "--wait", unit=site1).stdout
    assert "failed back: pair B:A, 2 tracks to send" in out
    assert "writes made on A since the failover are overwritten" in out
    assert np.array_equal(image(site1, "A"), image(site2, "B"))
    assert not image(site1, "A")[:TS].any()


# -- the library: StorageUnit.recover_session ----------------------------------------
def _session_with_a_cg_in_flight(tmp_path, keep=False):
    """Units site1 (A) and site2 (B, C) of session "g": CG 1 committed, then
    CG 2 drained to B with its prepare refused (C stays on CG 1), then a
    write A never sends (track 5); the A images at each coordination
    instant. The primary's unit is then gone (with ``keep``, a copy of it
    stays in ``vault``)."""
    from fastfc import faults
    snaps: dict[int, np.ndarray] = {}
    with StorageUnit(tmp_path / "site1") as u1, StorageUnit(tmp_path / "site2") as u2:
        a = u1.create_volume("A", N, TS)
        b, c = u2.create_volume("B", N, TS), u2.create_volume("C", N, TS)
        gm = GlobalMirror([(a, b, c)], name="g",
                          on_coordinate=lambda q: snaps.__setitem__(q, a.read(0, a.capacity)))
        a.write(0, b"cg one" * 1000)
        assert gm.form_consistency_group().committed
        a.write(3 * TS, b"cg two")
        faults.inject("prepare", b)
        try:
            assert not gm.form_consistency_group().committed
        finally:
            faults.clear()
        a.write(5 * TS, b"after every CG")
    if keep:
        shutil.copytree(tmp_path / "site1", tmp_path / "vault")
    shutil.rmtree(tmp_path / "site1")
    return snaps


@pytest.mark.parametrize("decision", ["commit", None])
def test_recover_session_settles_a_cg_in_doubt_by_the_recorded_decision(tmp_path, decision):
    snaps = _session_with_a_cg_in_flight(tmp_path)
    with StorageUnit(tmp_path / "site2") as u2:
        with pytest.raises(StateError, match=r"recover_session\('g'\)"):
            u2.session("g")
        rec = u2.session_record("g")
        assert not rec["restored"] and "no unit at" in rec["triplets"][0]["a_unit"]
        # CG 2 prepared on the secondary, the session lost before it decided
        # (or after it recorded "commit"): in doubt
        fc = u2.volume("C").target_relationship
        fc._resync(revertible=True, sequence=2)       # the session's prepare (its step)
        if decision is not None:
            u2.store.cg_decision("g", 2, decision)
        seq = u2.recover_session("g")
        want = 2 if decision == "commit" else 1
        assert seq == want and fc.sequence == want and not fc.revertible
        b = u2.volume("B")
        assert np.array_equal(b.read(0, b.capacity), snaps[want])
        assert np.array_equal(u2.volume("C").read(0, b.capacity), snaps[want])
        assert "g" not in u2.store.session_rows() and not b.is_secondary
        [row] = u2.pair_records
        assert (row["primary_name"], row["secondary_name"]) == ("B", "A")
        b.write(9 * TS, b"host write at site 2")
    with StorageUnit(tmp_path / "site2") as u2:
        [row] = u2.pair_records       # B's changes survive reopening, recorded
        assert row["out_of_sync"] == (1 if want == 2 else 2)


def test_recover_session_refuses_a_session_whose_primary_is_open(tmp_path):
    with StorageUnit(tmp_path / "site1") as u1, StorageUnit(tmp_path / "site2") as u2:
        a = u1.create_volume("A", N, TS)
        b, c = u2.create_volume("B", N, TS), u2.create_volume("C", N, TS)
        GlobalMirror([(a, b, c)], name="g").form_consistency_group()
        with pytest.raises(StateError, match="primary unit"):
            u2.recover_session("g")
        with pytest.raises(KeyError):
            u2.recover_session("other")
        assert u2.session("g").c_sequences == [1] and b.is_secondary


def test_recover_session_cut_short_finishes_when_run_again(tmp_path, monkeypatch):
    snaps = _session_with_a_cg_in_flight(tmp_path)

    def crash(self):
        raise KeyboardInterrupt("the process dies before the restore")

    with StorageUnit(tmp_path / "site2") as u2:
        with monkeypatch.context() as m:
            m.setattr("fastfc.copyservices.flashcopy.FlashCopy._reverse_restore", crash)
            with pytest.raises(KeyboardInterrupt):
                u2.recover_session("g")
        assert u2.volume("B").is_secondary          # no host write before the restore
    with StorageUnit(tmp_path / "site2") as u2:
        assert [r["out_of_sync"] for r in u2.pair_records] == [1]   # recorded first
        assert u2.recover_session("g") == 1
        b = u2.volume("B")
        assert not b.is_secondary and np.array_equal(b.read(0, b.capacity), snaps[1])
        assert [r["out_of_sync"] for r in u2.pair_records] == [1]


def test_rmpprc_force_forgets_a_failover_when_the_old_primary_is_lost_for_good(fastfc,
                                                                              tmp_path):
    site1, site2, site3 = tmp_path / "site1", tmp_path / "site2", tmp_path / "site3"
    fastfc("mkvol", "A", "--tracks", N, "--track-size", TS, unit=site1)
    fastfc("mkvol", "B", "C", "--tracks", N, "--track-size", TS, unit=site2)
    fastfc("mkvol", "D", "--tracks", N, "--track-size", TS, unit=site3)
    fastfc("mkgmir", "g", "A:B:C", unit=site1, remote=site2)
    fastfc("write", "A", "protected", unit=site1)
    fastfc("formcg", "g", unit=site1)
    shutil.copytree(site1, tmp_path / "vault")
    shutil.rmtree(site1)
    fastfc("recovergmir", "g", unit=site2)
    fastfc("write", "B", "site 2", "--offset", 3 * TS, unit=site2)
    # B is still bound to the lost primary: no new pair until it is forgotten
    assert "already in a PPRC pair" in fastfc("mkpprc", "B:D", "--type", "gcp", unit=site2,
                                              remote=site3, code=1).stderr
    r = fastfc("rmpprc", "B:A", unit=site2, code=1)
    assert "1 track changed on B" in r.stderr and "rmpprc --force" in r.stderr
    assert "B:A" in lspprc(fastfc, site2)
    out = fastfc("rmpprc", "B:A", "--force", unit=site2).stdout
    assert "removed pair B:A" in out and "1 track forgotten" in out
    assert lspprc(fastfc, site2) == {}
    fastfc("mkpprc", "B:D", "--type", "gcp", "--wait", unit=site2, remote=site3)
    assert np.array_equal(image(site3, "D"), image(site2, "B"))
    # a copy of the lost unit that turns up does not take B back
    shutil.copytree(tmp_path / "vault", site1)
    fastfc("write", "B", "still the primary", "--offset", 4 * TS, unit=site2)
    with StorageUnit(site2) as u2, StorageUnit(site1) as u1:
        assert not u2.volume("B").is_secondary and u1.pairs == []


def test_recover_session_at_durability_power(tmp_path):
    snaps = _session_with_a_cg_in_flight(tmp_path)
    with StorageUnit(tmp_path / "site2", durability="power") as u2:
        syncs = u2.store.msyncs
        assert u2.recover_session("g") == 1
        assert u2.store.msyncs >= syncs + 2          # B and its record, before B's flag
        b = u2.volume("B")
        assert np.array_equal(b.read(0, b.capacity), snaps[1]) and not b.is_secondary


@pytest.mark.parametrize("primary_first", [True, False])
def test_the_old_primary_back_restores_the_pair_failed_over_with_both_sides_changes(
        tmp_path, primary_first):
    snaps = _session_with_a_cg_in_flight(tmp_path, keep=True)
    with StorageUnit(tmp_path / "site2") as u2:
        assert u2.recover_session("g") == 1       # track 3 restored from C
        u2.volume("B").write(7 * TS, b"site 2")
    shutil.copytree(tmp_path / "vault", tmp_path / "site1")
    order = ["site1", "site2"] if primary_first else ["site2", "site1"]
    with StorageUnit(tmp_path / order[0]) as first, StorageUnit(tmp_path / order[1]) as second:
        u1, u2 = (first, second) if primary_first else (second, first)
        [pair] = u1.pairs
        assert pair.failed_over and u2.pair_records == [] and u1.pair_records == []
        # sent after CG 1 (3), never sent by A (5), written on B since (7)
        assert pair.oos.set_indices().tolist() == [3, 5, 7]
        pair.failback()
        assert pair.drain() == 3 * TS
        a, b = u1.volume("A"), u2.volume("B")
        assert np.array_equal(a.read(0, a.capacity), b.read(0, b.capacity))
        assert changed_tracks(b.read(0, b.capacity), snaps[1]) == {7}
    with StorageUnit(tmp_path / "site2") as u2, StorageUnit(tmp_path / "site1") as u1:
        assert [p.name for p in u2.pairs] == ["B->A"] and u1.pairs == []



# -- a plain pair (in no session) whose primary's unit is lost -------------------------
@pytest.mark.parametrize("mode", ["mmir", "gcp"])
def test_plain_pair_site_loss_from_the_cli_at_the_secondary_alone(fastfc, tmp_path, mode):
    site1, site2, vault = tmp_path / "site1", tmp_path / "site2", tmp_path / "vault"
    fastfc("mkvol", "A", "--tracks", N, "--track-size", TS, unit=site1)
    fastfc("mkvol", "B", "--tracks", N, "--track-size", TS, unit=site2)
    fastfc("write", "A", "mirrored", "--repeat", 3000, unit=site1)
    fastfc("mkpprc", "A:B", "--type", mode, "--wait", unit=site1, remote=site2)
    # Metro Mirror sends it before the write completes; Global Copy never sends it
    fastfc("write", "A", "late", "--offset", 20 * TS, unit=site1)
    shutil.copytree(site1, vault)
    shutil.rmtree(site1)

    # at the secondary alone: the pair is listed, its primary's unit named missing
    pairs = lspprc(fastfc, site2)
    assert pairs["A:B"]["reason"] == "primary unit not available"
    assert pairs["A:B"]["mode"] == mode and str(site1) in pairs["A:B"]["primary_unit"]
    assert "primary unit not available" in fastfc("lspprc", unit=site2).stdout
    assert "secondary" in fastfc("write", "B", "refused", unit=site2, code=1).stderr
    r = fastfc("failbackpprc", "A:B", unit=site2, code=1)
    assert "not available" in r.stderr and "failoverpprc A:B" in r.stderr

    out = fastfc("failoverpprc", "A:B", unit=site2).stdout
    assert "B accepts host writes" in out and "failbackpprc A:B" in out
    fastfc("write", "B", "written at site 2", "--offset", 30 * TS, unit=site2)
    pairs = lspprc(fastfc, site2)       # another invocation: B's record was reopened
    assert pairs["B:A"]["state"] == "suspended" and pairs["B:A"]["out_of_sync"] == 1
    assert "site loss" in pairs["B:A"]["reason"] and "A:B" not in pairs
    roles = {v["name"]: v["roles"] for v in
             json.loads(fastfc("lsvol", "--json", unit=site2).stdout)}
    assert "PPRC secondary" not in roles["B"]
    b_now = image(site2, "B")
    assert bytes(b_now[30 * TS:30 * TS + 17]) == b"written at site 2"
    fastfc("failoverpprc", "B:A", unit=site2, code=1)      # once is enough

    # the old primary's unit is back: the pair is failed over, both sides' changes
    shutil.copytree(vault, site1)
    pairs = lspprc(fastfc, site2)
    assert pairs["A:B"]["state"] == "suspended" and pairs["A:B"]["reason"] == "failover"
    changed = 2 if mode == "gcp" else 1       # (20, never sent) and 30
    assert pairs["A:B"]["out_of_sync"] == changed
    out = fastfc("failbackpprc", "A:B", "--wait", unit=site2).stdout
    assert f"failed back: pair B:A, {plural(changed)} to send" in out
    assert np.array_equal(image(site1, "A"), b_now)
    assert np.array_equal(image(site2, "B"), b_now)
    assert lspprc(fastfc, site2)["B:A"]["out_of_sync"] == 0


def plural(n: int) -> str:
    return f"{n} track" + ("" if n == 1 else "s")


@pytest.mark.parametrize("mode", ["mmir", "gcp"])
def test_failover_pair_at_the_secondary_alone_then_failback_sends_only_changed_tracks(
        tmp_path, mode):
    site1, site2, vault = tmp_path / "site1", tmp_path / "site2", tmp_path / "vault"
    with StorageUnit(site1) as u1, StorageUnit(site2) as u2:
        a, b = u1.create_volume("A", N, TS), u2.create_volume("B", N, TS)
        a.write(0, b"x" * (8 * TS))
        pair = PPRCPair(a, b, mode=mode, background=False)
        pair.drain()
        a.write(9 * TS, b"late")        # sent at once by Metro Mirror only
        a_late = a.read(0, a.capacity)
    shutil.copytree(site1, vault)
    shutil.rmtree(site1)
    with StorageUnit(site2) as u2:
        [rec] = u2.secondary_records
        assert (rec["primary_name"], rec["secondary_name"], rec["mode"]) == ("A", "B", mode)
        assert str(site1) in rec["primary_unit"]
        with pytest.raises(WriteInhibitedError):
            u2.volume("B").write(0, b"no")
        row = u2.failover_pair("B")
        assert row["name"] == "B->A" and row["out_of_sync"] == 0
        assert u2.secondary_records == [] and not u2.volume("B").is_secondary
        u2.volume("B").write(12 * TS, b"site 2")
        with pytest.raises(StateError, match="failed over"):
            u2.failover_pair("B")
    with StorageUnit(site2) as u2:           # B's writes and their record survive
        assert [r["out_of_sync"] for r in u2.pair_records] == [1]
        b = u2.volume("B")
        assert bytes(b.read(12 * TS, 6)) == b"site 2"
        b_now = b.read(0, b.capacity)
    shutil.copytree(vault, site1)
    with StorageUnit(site1) as u1, StorageUnit(site2) as u2:
        [pair] = u1.pairs
        assert pair.failed_over and u2.pair_records == []
        expected = [9, 12] if mode == "gcp" else [12]
        assert pair.oos.set_indices().tolist() == expected
        pair.failback()
        assert pair.drain() == len(expected) * TS
        a, b = u1.volume("A"), u2.volume("B")
        assert np.array_equal(a.read(0, a.capacity), b_now)
        assert np.array_equal(b.read(0, b.capacity), b_now)
        assert changed_tracks(a_late, b_now) == set(expected)
    with StorageUnit(site2) as u2, StorageUnit(site1) as u1:    # and B->A after reopening
        assert [p.name for p in u2.pairs] == ["B->A"] and u1.secondary_records == []


def test_rmpprc_force_at_the_secondary_alone_frees_b_for_good(fastfc, tmp_path):
    site1, site2, site3 = tmp_path / "site1", tmp_path / "site2", tmp_path / "site3"
    fastfc("mkvol", "A", "--tracks", N, "--track-size", TS, unit=site1)
    fastfc("mkvol", "B", "--tracks", N, "--track-size", TS, unit=site2)
    fastfc("mkvol", "D", "--tracks", N, "--track-size", TS, unit=site3)
    fastfc("write", "A", "mirrored", unit=site1)
    fastfc("mkpprc", "A:B", "--type", "gcp", "--wait", unit=site1, remote=site2)
    shutil.copytree(site1, tmp_path / "vault")
    shutil.rmtree(site1)
    r = fastfc("rmpprc", "A:B", unit=site2, code=1)
    assert "not available" in r.stderr and "rmpprc --force A:B" in r.stderr
    out = fastfc("rmpprc", "A:B", "--force", unit=site2).stdout
    assert "removed pair A:B" in out
    assert lspprc(fastfc, site2) == {}
    fastfc("write", "B", "site 2", "--offset", 3 * TS, unit=site2)
    fastfc("mkpprc", "B:D", "--type", "gcp", "--wait", unit=site2, remote=site3)
    assert np.array_equal(image(site3, "D"), image(site2, "B"))
    # a copy of the lost unit that turns up does not take B back
    shutil.copytree(tmp_path / "vault", site1)
    with StorageUnit(site2) as u2, StorageUnit(site1) as u1:
        assert not u2.volume("B").is_secondary and u1.pairs == []
        assert [r["name"] for r in u2.pair_records] == ["B->D"]   # site3 not open


def test_a_secondary_of_a_pair_made_before_secondaries_recorded_it(fastfc, tmp_path):
    site1, site2 = tmp_path / "site1", tmp_path / "site2"
    fastfc("mkvol", "A", "--tracks", N, "--track-size", TS, unit=site1)
    fastfc("mkvol", "B", "--tracks", N, "--track-size", TS, unit=site2)
    fastfc("mkpprc", "A:B", "--type", "mmir", "--wait", unit=site1, remote=site2)
    # B's unit as an older fastfc left it: no record of its pair
    db = sqlite3.connect(site2 / "unit.db")
    with db:
        db.execute("DROP TABLE secondaries")
    db.close()
    shutil.rmtree(site1)
    pairs = lspprc(fastfc, site2)
    assert "unknown pair" in pairs["?:B"]["reason"] and pairs["?:B"]["primary"] is None
    r = fastfc("failoverpprc", "A:B", unit=site2, code=1)
    assert "does not know its primary" in r.stderr and "rmpprc --force" in r.stderr
    fastfc("rmpprc", "A:B", "--force", unit=site2)
    fastfc("write", "B", "free", unit=site2)
    assert lspprc(fastfc, site2) == {}


def test_an_older_pair_is_recorded_at_its_secondary_when_both_units_open(tmp_path):
    site1, site2 = tmp_path / "site1", tmp_path / "site2"
    with StorageUnit(site1) as u1, StorageUnit(site2) as u2:
        PPRCPair(u1.create_volume("A", N, TS), u2.create_volume("B", N, TS), mode="gcp",
                 background=False)
    db = sqlite3.connect(site2 / "unit.db")
    with db:
        db.execute("DELETE FROM secondaries")
    db.close()
    with StorageUnit(site2) as u2, StorageUnit(site1) as u1:
        assert u1.pairs and u2.secondary_records == []
    shutil.rmtree(site1)
    with StorageUnit(site2) as u2:
        [rec] = u2.secondary_records
        assert (rec["primary_name"], rec["mode"]) == ("A", "gcp")
        assert u2.failover_pair("B")["name"] == "B->A"


@pytest.mark.parametrize("failover_first", [False, True])
def test_a_pair_ended_at_the_secondary_alone_stays_ended_when_its_primary_is_back(
        tmp_path, failover_first):
    """Another pair still links the two units: the copy of the lost unit
    that turns up is attached, and must not take B0 back as its secondary
    (B0's host writes since were recorded nowhere: a resync would miss them)."""
    site1, site2, vault = tmp_path / "site1", tmp_path / "site2", tmp_path / "vault"
    with StorageUnit(site1) as u1, StorageUnit(site2) as u2:
        for i in range(2):
            PPRCPair(u1.create_volume(f"A{i}", N, TS), u2.create_volume(f"B{i}", N, TS),
                     mode="mmir", background=False).drain()
    shutil.copytree(site1, vault)
    shutil.rmtree(site1)
    with StorageUnit(site2) as u2:
        if failover_first:
            u2.failover_pair("B0")
            assert u2.forget_failover("B0") == 0
        else:
            assert u2.release_secondary("B0")["primary_name"] == "A0"
        assert [r["secondary_name"] for r in u2.secondary_records] == ["B1"]
        u2.volume("B0").write(0, b"site 2 only")
    shutil.copytree(vault, site1)
    with StorageUnit(site1) as u1, StorageUnit(site2) as u2:
        assert [p.name for p in u1.pairs] == ["A1->B1"] and u1.pair_records == []
        assert any("A0:B0: ended at the unit of B0" in r for r in u1.recovered)
        assert not u2.volume("B0").is_secondary
        u1.volume("A0").write(0, b"site 1 only")        # A0 is no longer mirrored
        assert bytes(u2.volume("B0").read(0, 11)) == b"site 2 only"
    with StorageUnit(site1) as u1, StorageUnit(site2) as u2:
        assert [p.name for p in u1.pairs] == ["A1->B1"] and u1.recovered == []


# -- a pair failed over live, its primary's unit closed or lost since --------------------
def _failed_over_live(site1, site2, mode="gcp"):
    """A->B mirrored (tracks 0-7), failed over with both units open, then a
    write on A after the failover (track 20): the failover of a live site."""
    with StorageUnit(site1) as u1, StorageUnit(site2) as u2:
        a, b = u1.create_volume("A", N, TS), u2.create_volume("B", N, TS)
        a.write(0, b"x" * (8 * TS))
        pair = PPRCPair(a, b, mode=mode, background=False)
        pair.drain()
        pair.failover()
        a.write(20 * TS, b"A after the failover")


def _failback_and_compare(site1, site2, expected):
    """Both units open: the pair A->B is failed over and sends exactly the
    tracks ``expected`` on failback; A and B are then equal byte for byte."""
    with StorageUnit(site1) as u1, StorageUnit(site2) as u2:
        [pair] = u1.pairs
        assert pair.failed_over and u1.pair_records == [] and u2.pair_records == []
        pair.failback()
        assert pair.out_of_sync_tracks == len(expected)
        assert pair.oos.set_indices().tolist() == sorted(expected)
        assert pair.drain() == len(expected) * TS
        a, b = u1.volume("A"), u2.volume("B")
        assert np.array_equal(a.read(0, a.capacity), b.read(0, b.capacity))
        b_now = b.read(0, b.capacity)
    with StorageUnit(site2) as u2, StorageUnit(site1) as u1:   # B->A, nothing else left
        assert [p.name for p in u2.pairs] == ["B->A"] and u2.pair_records == []
        assert u1.pair_records == [] and u1.pairs == []
        assert np.array_equal(u1.volume("A").read(0, N * TS), b_now)


@pytest.mark.parametrize("mode", ["mmir", "gcp"])
def test_a_live_failover_records_b_writes_made_with_its_primary_unit_closed(tmp_path, mode):
    site1, site2 = tmp_path / "site1", tmp_path / "site2"
    _failed_over_live(site1, site2, mode)
    with StorageUnit(site2) as u2:          # B's unit alone: B's writes are recorded here
        [row] = u2.pair_records
        assert row["name"] == "B->A" and row["out_of_sync"] == 0
        u2.volume("B").write(30 * TS, b"B with A's unit closed")
        assert [r["out_of_sync"] for r in u2.pair_records] == [1]
    with StorageUnit(site2) as u2:
        assert [r["out_of_sync"] for r in u2.pair_records] == [1]
    _failback_and_compare(site1, site2, {20, 30})


def test_b_writes_after_a_live_failover_survive_the_primary_unit_restored_from_a_copy(
        tmp_path):
    site1, site2, vault = tmp_path / "site1", tmp_path / "site2", tmp_path / "vault"
    _failed_over_live(site1, site2)
    shutil.copytree(site1, vault)       # A's unit as it was right after the failover
    with StorageUnit(site1) as u1, StorageUnit(site2) as u2:    # both open
        [pair] = u1.pairs
        assert pair.failed_over
        u2.volume("B").write(31 * TS, b"B with both units open")
        u1.volume("A").write(21 * TS, b"A, lost with its unit")
    shutil.rmtree(site1)                # the primary's unit is lost ...
    shutil.copytree(vault, site1)       # ... and restored from its copy
    _failback_and_compare(site1, site2, {20, 31})


def test_b_writes_after_a_live_failover_are_recorded_when_a_unit_closes_first(tmp_path):
    site1, site2 = tmp_path / "site1", tmp_path / "site2"
    _failed_over_live(site1, site2)
    u2 = StorageUnit(site2)
    try:
        u1 = StorageUnit(site1)
        [pair] = u1.pairs
        u2.volume("B").write(32 * TS, b"both open")
        u1.close()                      # A's unit goes away, B's stays open
        assert [(r["name"], r["out_of_sync"]) for r in u2.pair_records] == [("B->A", 1)]
        u2.volume("B").write(33 * TS, b"A's unit closed")
        assert [r["out_of_sync"] for r in u2.pair_records] == [2]
        u1 = StorageUnit(site1)         # back: the pair failed over, both sides' changes
        [pair] = u1.pairs
        assert pair.failed_over and u2.pair_records == []
        assert pair.oos.set_indices().tolist() == [20, 32, 33]
        u1.close()
    finally:
        u2.close()
    _failback_and_compare(site1, site2, {20, 32, 33})


def test_a_pair_failed_over_live_then_removed_leaves_no_record_at_b(tmp_path):
    site1, site2 = tmp_path / "site1", tmp_path / "site2"
    _failed_over_live(site1, site2)
    with StorageUnit(site1) as u1, StorageUnit(site2) as u2:
        [pair] = u1.pairs
        pair.remove()
    with StorageUnit(site2) as u2:
        assert u2.pair_records == [] and u2.secondary_records == []
        u2.volume("B").write(0, b"free")


def test_failover_with_both_units_open_then_b_alone_from_the_cli(fastfc, tmp_path):
    site1, site2, away = tmp_path / "site1", tmp_path / "site2", tmp_path / "away"
    fastfc("mkvol", "A", "--tracks", N, "--track-size", TS, unit=site1)
    fastfc("mkvol", "B", "--tracks", N, "--track-size", TS, unit=site2)
    fastfc("write", "A", "mirrored", "--repeat", 3000, unit=site1)
    fastfc("mkpprc", "A:B", "--type", "gcp", "--wait", unit=site1, remote=site2)
    fastfc("failoverpprc", "A:B", unit=site1)               # both units open
    fastfc("write", "A", "A after the failover", "--offset", 20 * TS, unit=site1)
    fastfc("write", "B", "B, both open", "--offset", 30 * TS, unit=site2)
    site1.rename(away)                  # the primary's unit is away
    fastfc("write", "B", "B alone", "--offset", 31 * TS, unit=site2)
    pairs = lspprc(fastfc, site2)
    assert pairs["B:A"]["state"] == "suspended" and pairs["B:A"]["out_of_sync"] == 2
    away.rename(site1)                  # back
    pairs = lspprc(fastfc, site2)
    assert pairs["A:B"]["reason"] == "failover" and pairs["A:B"]["out_of_sync"] == 3
    assert "B:A" not in pairs
    out = fastfc("failbackpprc", "A:B", "--wait", unit=site2).stdout
    assert "failed back: pair B:A, 3 tracks to send" in out
    assert np.array_equal(image(site1, "A"), image(site2, "B"))
    assert lspprc(fastfc, site2) == {"B:A": lspprc(fastfc, site2)["B:A"]}
    assert lspprc(fastfc, site2)["B:A"]["out_of_sync"] == 0


# -- rmgmir at the secondary alone: the session ends there, B stays a secondary ----------
def _session_with_its_primary_lost(fastfc, tmp_path):
    """Session g (A0:B0:C0) with CG 1 committed, then a write on A (track
    10) never sent; then site1 is lost (a copy of it in ``vault``). Returns
    the three paths and A's image at CG 1."""
    site1, site2, vault = tmp_path / "site1", tmp_path / "site2", tmp_path / "vault"
    fastfc("mkvol", "A0", "--tracks", N, "--track-size", TS, unit=site1)
    fastfc("mkvol", "B0", "C0", "--tracks", N, "--track-size", TS, unit=site2)
    fastfc("write", "A0", "zero", "--repeat", 3000, unit=site1)
    fastfc("mkgmir", "g", "A0:B0:C0", unit=site1, remote=site2)
    fastfc("formcg", "g", unit=site1)
    cg1 = image(site1, "A0")
    fastfc("write", "A0", "after CG 1, never sent", "--offset", 10 * TS, unit=site1)
    shutil.copytree(site1, vault)
    shutil.rmtree(site1)
    return site1, site2, vault, cg1


def decisions(unit) -> int:
    with sqlite3.connect(unit / "unit.db") as db:
        return db.execute("SELECT count(*) FROM decisions").fetchone()[0]


def test_a_session_at_the_secondary_alone_names_both_ways_out(fastfc, tmp_path):
    site1, site2, vault, cg1 = _session_with_its_primary_lost(fastfc, tmp_path)
    with StorageUnit(site2) as u2:
        with pytest.raises(StateError) as e:
            u2.session("g")
        msg = str(e.value)
        assert str(site1) in msg and "recover_session('g')" in msg
        assert "StorageUnit.remove_session('g', copy=True)" in msg
        assert "StorageUnit.remove_session('g')" in msg
    err = fastfc("formcg", "g", unit=site2, code=1).stderr
    assert "recovergmir g" in err and "rmgmir g" in err and "rmgmir --force g" in err
    out = fastfc("showgmir", "g", unit=site2).stdout
    assert "recovergmir g" in out and "rmgmir g [--force]" in out


def test_rmgmir_at_the_secondary_alone_ends_the_session_there(fastfc, tmp_path):
    site1, site2, vault, cg1 = _session_with_its_primary_lost(fastfc, tmp_path)
    assert decisions(site2) > 0
    out = fastfc("rmgmir", "g", unit=site2).stdout
    assert "removed Global Mirror session g at site2" in out
    assert "C0 keep CG 1" in out and "copied from B" in out
    assert "failoverpprc or rmpprc --force" in out
    # the session, its decisions and its B->C are gone; C keeps CG 1
    assert "no Global Mirror session named 'g'" in fastfc("showgmir", "g", unit=site2,
                                                          code=1).stderr
    assert decisions(site2) == 0
    assert "no FlashCopy relationships" in fastfc("lsflash", unit=site2).stdout
    assert np.array_equal(image(site2, "C0"), cg1)
    assert np.array_equal(image(site2, "B0"), cg1)
    # B stays the secondary of its recorded pair: failed over at B alone
    pairs = lspprc(fastfc, site2)
    assert pairs["A0:B0"]["reason"] == "primary unit not available"
    assert "secondary" in fastfc("write", "B0", "refused", unit=site2, code=1).stderr
    fastfc("failoverpprc", "A0:B0", unit=site2)
    fastfc("write", "B0", "site 2", "--offset", 30 * TS, unit=site2)
    b_now = image(site2, "B0")
    # the old primary back: the pair failed over, failback sends both sides' changes
    shutil.copytree(vault, site1)
    pairs = lspprc(fastfc, site2)
    assert pairs["A0:B0"]["reason"] == "failover" and pairs["A0:B0"]["out_of_sync"] == 2
    out = fastfc("failbackpprc", "A0:B0", "--wait", unit=site2).stdout
    assert "failed back: pair B0:A0, 2 tracks to send" in out
    assert np.array_equal(image(site1, "A0"), b_now)
    assert np.array_equal(image(site2, "B0"), b_now)
    assert "no Global Mirror session named 'g'" in fastfc("showgmir", "g", unit=site1,
                                                          code=1).stderr


def test_rmgmir_force_at_the_secondary_alone_withdraws_at_once(fastfc, tmp_path):
    site1, site2, vault, cg1 = _session_with_its_primary_lost(fastfc, tmp_path)
    with StorageUnit(site2, readonly=True) as u2:
        need = u2.volume("C0").target_relationship.tracks_to_copy
    assert need > 0
    out = fastfc("rmgmir", "g", "--force", unit=site2).stdout
    assert "removed Global Mirror session g at site2" in out
    assert f"invalid now (their image of CG 1 was not copied from B): C0 ({plural(need)})" \
        in out
    fastfc("read", "C0", unit=site2, code=1)
    assert "no FlashCopy relationships" in fastfc("lsflash", unit=site2).stdout
    assert decisions(site2) == 0
    # B is the secondary of its recorded pair: rmpprc --force at B alone frees it
    assert "A0:B0" in lspprc(fastfc, site2)
    assert "removed pair A0:B0" in fastfc("rmpprc", "A0:B0", "--force", unit=site2).stdout
    fastfc("write", "B0", "free", unit=site2)
    assert lspprc(fastfc, site2) == {}


def test_remove_session_at_the_secondary_alone_keeps_b_a_recorded_secondary(tmp_path):
    snaps = _session_with_a_cg_in_flight(tmp_path)
    with StorageUnit(tmp_path / "site2") as u2:
        assert u2.secondary_records == []           # B0 is the session's
        assert u2.remove_session("g", copy=True) == ["FlashCopy B:C"]
        c = u2.volume("C")
        assert c.target_relationship is None
        assert np.array_equal(c.read(0, c.capacity), snaps[1])     # C keeps CG 1
        assert u2.store.session_rows() == {} and u2.session_problems == {}
        [rec] = u2.secondary_records
        assert (rec["primary_name"], rec["secondary_name"]) == ("A", "B")
        with pytest.raises(KeyError):
            u2.remove_session("g")
        u2.failover_pair("B")
        u2.volume("B").write(0, b"site 2")


@pytest.mark.parametrize("between", ["nothing", "reopen", "secondary alone"])
def test_failback_after_a_live_recover_sends_the_tracks_the_restore_changed_on_b(
        tmp_path, between):
    """A live ``GlobalMirror.recover()`` (both units open) restores CG 2 onto
    B over tracks A had sent to B since (a drained CG whose FlashCopy phase
    failed). Failback, at once, after both units were reopened, or after
    B's unit took host writes alone, sends those tracks with B's writes and
    A's unsent ones: A and B end identical, byte for byte."""
    from fastfc import faults
    p, s = tmp_path / "site1", tmp_path / "site2"
    rng = np.random.default_rng(7)

    def data(n):
        return rng.integers(0, 256, n, dtype=np.uint8)

    with StorageUnit(p, durability="power") as u1, StorageUnit(s, durability="power") as u2:
        A = [u1.create_volume(f"A{i}", N, TS) for i in range(2)]
        B = [u2.create_volume(f"B{i}", N, TS) for i in range(2)]
        C = [u2.create_volume(f"C{i}", N, TS) for i in range(2)]
        for a in A:
            a.write(0, data(a.capacity))
        gm = GlobalMirror(list(zip(A, B, C)), name="g")
        assert gm.form_consistency_group().committed
        for a in A:
            a.write(3 * TS, data(TS))
        assert gm.form_consistency_group().committed             # CG 2
        cg2 = [a.read(0, a.capacity) for a in A]
        for a in A:
            for t in (5, 9):
                a.write(t * TS, data(TS))                        # drained to B, in no CG
        faults.inject("prepare", volume=B[1])
        try:
            assert not gm.form_consistency_group().committed
        finally:
            faults.clear()
        A[0].write(20 * TS, data(TS))                            # never sent to B
        assert gm.recover() == 2
        assert all(np.array_equal(b.read(0, b.capacity), want) for b, want in zip(B, cg2))
        if between == "nothing":
            for b in B:
                b.write(7 * TS, data(TS))
            for t in gm.triplets:
                t.pair.failback()
                t.pair.drain()
            for a, b in zip(A, B):
                assert np.array_equal(a.read(0, a.capacity), b.read(0, b.capacity))
            return
    if between == "secondary alone":
        with StorageUnit(s, durability="power") as u2:
            for i in range(2):
                u2.volume(f"B{i}").write(7 * TS, data(TS))
    with StorageUnit(p, durability="power") as u1, StorageUnit(s, durability="power") as u2:
        if between == "reopen":
            for i in range(2):
                u2.volume(f"B{i}").write(7 * TS, data(TS))
        pairs = sorted(u1.pairs, key=lambda pr: pr.name)
        assert [pr.failed_over for pr in pairs] == [True, True]
        for i, pair in enumerate(pairs):
            pair.failback()
            assert set(pair.oos.set_indices().tolist()) == {5, 7, 9} | ({20} if i == 0 else set())
            pair.drain()
        for i in range(2):
            a, b = u1.volume(f"A{i}"), u2.volume(f"B{i}")
            assert np.array_equal(a.read(0, a.capacity), b.read(0, b.capacity))
