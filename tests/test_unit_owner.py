"""Hardening of storage units: one owner per unit across
processes, read-only opens, refusals that change nothing, and units that
can be copied and moved.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import sqlite3
import sys

import numpy as np
import pytest
from click.testing import CliRunner

from fastfc import (FastFCError, FlashCopy, GlobalMirror, PPRCPair, ReadOnlyUnitError,
                    StorageUnit, UnitBusyError, UnitClosedError)
from fastfc.tools.cli import main
from helpers import held_unit, image, rand

pytestmark = pytest.mark.skipif(sys.platform == "win32", reason="no flock")

TS = 512
N = 8


@pytest.fixture
def tmp_path(tmpfs_tmp_path):
    """This module's units live on tmpfs (conftest.tmpfs_tmp_path): none of
    its tests is about the disk, and on a busy disk their fsyncs took most
    of their time."""
    return tmpfs_tmp_path


def snapshot(path) -> dict:
    """Every file of a unit directory: name -> (mtime_ns, sha256)."""
    out = {}
    for p in sorted(path.rglob("*")):
        if p.is_file():
            out[str(p.relative_to(path))] = (p.stat().st_mtime_ns,
                                             hashlib.sha256(p.read_bytes()).hexdigest())
    return out


def rows(path) -> dict:
    """Every row of every table of a unit's database."""
    db = sqlite3.connect(f"{(path / 'unit.db').as_uri()}?mode=ro&immutable=1", uri=True)
    try:
        tables = [r[0] for r in db.execute("SELECT name FROM sqlite_master WHERE type='table'")]
        return {t: sorted(db.execute(f"SELECT * FROM {t}").fetchall(), key=repr)
                for t in tables}
    finally:
        db.close()


def make_site(root):
    """Two units: a FlashCopy in u1, a pair u1 -> u2, and a session
    (A in u1; B, C in u2) with one committed CG."""
    p, s = root / "u1", root / "u2"
    with StorageUnit(p) as u1, StorageUnit(s) as u2:
        a, t = u1.create_volume("a", N, TS), u1.create_volume("t", N, TS)
        a.write(0, rand(a.capacity, 1))
        FlashCopy(a, t, background_copy=False, record=True)
        x = u1.create_volume("x", N, TS)
        x.write(0, rand(x.capacity, 2))
        PPRCPair(x, u2.create_volume("y", N, TS), background=False).drain()
        ga = u1.create_volume("ga", N, TS)
        ga.write(0, rand(ga.capacity, 3))
        gm = GlobalMirror([(ga, u2.create_volume("gb", N, TS), u2.create_volume("gc", N, TS))],
                          name="gm")
        assert gm.form_consistency_group().committed
    return p, s


# ---------------------------------------------------------------------------
# One owner per unit
# ---------------------------------------------------------------------------

def test_a_unit_held_by_another_process_is_refused_naming_it(tmp_path):
    StorageUnit(tmp_path / "u").close()
    with held_unit(tmp_path / "u") as child:
        with pytest.raises(UnitBusyError, match=f"open read-write by pid {child.pid}"):
            StorageUnit(tmp_path / "u")
        with pytest.raises(UnitBusyError, match=f"pid {child.pid}"):
            StorageUnit(tmp_path / "u", readonly=True)
        with pytest.raises(UnitBusyError):
            StorageUnit(tmp_path / "u", wait=0.2)
    StorageUnit(tmp_path / "u").close()


def test_wait_opens_once_the_holder_closes(tmp_path):
    StorageUnit(tmp_path / "u").close()
    with held_unit(tmp_path / "u", hold=0.5):
        with StorageUnit(tmp_path / "u", wait=60) as u:
            assert u.volumes() == []


def test_readers_share_and_keep_writers_out(tmp_path):
    with StorageUnit(tmp_path / "u") as u:
        u.create_volume("a", N, TS).write(0, b"shared")
    with held_unit(tmp_path / "u", readonly=True) as child:
        with StorageUnit(tmp_path / "u", readonly=True) as r:     # two readers
            assert r.volume("a").read(0, 6).tobytes() == b"shared"
        with pytest.raises(UnitBusyError, match=f"open read-only by pid {child.pid}"):
            StorageUnit(tmp_path / "u")
    StorageUnit(tmp_path / "u").close()


def test_in_process_second_open_is_busy_and_can_wait(tmp_path):
    import threading
    u = StorageUnit(tmp_path / "u")
    with pytest.raises(UnitBusyError, match="already open in this process"):
        StorageUnit(tmp_path / "u", readonly=True)
    threading.Timer(0.3, u.close).start()
    StorageUnit(tmp_path / "u", wait=30).close()


# ---------------------------------------------------------------------------
# Read-only opens
# ---------------------------------------------------------------------------

def test_read_only_open_changes_nothing_and_refuses_changes(tmp_path):
    p, s = make_site(tmp_path)
    before = {d: snapshot(d) for d in (p, s)}
    listing = {d: sorted(os.listdir(d)) for d in (p, s)}
    with StorageUnit(p, readonly=True) as u1, StorageUnit(s, readonly=True) as u2:
        a, t = u1.volume("a"), u1.volume("t")
        assert np.array_equal(image(t), rand(a.capacity, 1))
        fc = t._tgt_rel
        pair = u1.volume("x")._mirror
        assert isinstance(pair, PPRCPair) and pair.secondary is u2.volume("y")
        gm = u2.session("gm")
        assert gm.c_sequences == [1]
        assert image(u2.volume("gc")).tobytes() == rand(N * TS, 3).tobytes()
        calls = [lambda: u1.create_volume("n", N, TS), lambda: u1.remove_volume("a"),
                 lambda: a.write(0, b"x"), lambda: a.write_batch([0], [b"x"]),
                 lambda: FlashCopy(u1.volume("x"), u1.volume("ga")),
                 lambda: fc.withdraw(force=True), lambda: fc.resync(),
                 lambda: fc.resync(revertible=True), lambda: fc.copy(),
                 lambda: fc.reverse_restore(), lambda: pair.suspend(),
                 lambda: pair.failover(), lambda: pair.remove(), lambda: pair.drain(),
                 lambda: gm.form_consistency_group(), lambda: gm.start(),
                 lambda: gm.recover(), lambda: gm.close()]
        for call in calls:
            with pytest.raises(ReadOnlyUnitError):
                call()
        assert fc.active and pair.active and gm.triplets
    assert {d: snapshot(d) for d in (p, s)} == before
    assert {d: sorted(os.listdir(d)) for d in (p, s)} == listing


def test_read_only_open_of_a_directory_nobody_can_write(tmp_path):
    """chmod -w a copy: (run as root the OS would let us write anyway, so the
    check is that nothing was created or modified)."""
    p, s = make_site(tmp_path / "orig")
    shutil.copytree(tmp_path / "orig", tmp_path / "ro")
    ro = tmp_path / "ro" / "u1"
    before, listing = snapshot(ro), sorted(p.name for p in ro.rglob("*"))
    for d in [ro, *[x for x in ro.rglob("*") if x.is_dir()]]:
        d.chmod(0o555)
    try:
        with StorageUnit(ro, readonly=True) as u:
            assert np.array_equal(image(u.volume("t")), rand(N * TS, 1))
    finally:
        for d in [ro, *[x for x in ro.rglob("*") if x.is_dir()]]:
            d.chmod(0o755)
    assert snapshot(ro) == before
    assert sorted(p.name for p in ro.rglob("*")) == listing


def test_read_only_open_refuses_a_cg_that_needs_resolving(tmp_path):
    p, s = make_site(tmp_path)
    with StorageUnit(p) as u1, StorageUnit(s) as u2:
        u2.session("gm").triplets[0].fc._resync(revertible=True, sequence=2)  # its prepare
        u2.store.close()    # "crash": nothing resolves it
        u2._closed = True
        u2._release_files()
    with pytest.raises(ReadOnlyUnitError, match="open the unit read-write once"):
        StorageUnit(s, readonly=True)
    with StorageUnit(s) as u2:
        assert u2.recovered
    with StorageUnit(s, readonly=True) as u2:
        assert u2.volume("gc")._tgt_rel.sequence == 1


# ---------------------------------------------------------------------------
# Refusals change nothing
# ---------------------------------------------------------------------------

def _fc(u1, u2):
    return u1.volume("t")._tgt_rel


def _pair(u1, u2):
    return u1.volume("x")._mirror


def _gm(u1, u2):
    return u2.session("gm")


CALLS = {
    "fc.withdraw": (_fc, lambda o: o.withdraw()),
    "fc.withdraw_force": (_fc, lambda o: o.withdraw(force=True)),
    "fc.resync": (_fc, lambda o: o.resync()),
    "fc.resync_revertible": (_fc, lambda o: o.resync(revertible=True)),
    "fc.commit": (_fc, lambda o: o.commit()),
    "fc.revert": (_fc, lambda o: o.revert()),
    "fc.reverse_restore": (_fc, lambda o: o.reverse_restore()),
    "fc.copy": (_fc, lambda o: o.copy()),
    "fc.wait": (_fc, lambda o: o.wait(1)),
    "pair.suspend": (_pair, lambda o: o.suspend()),
    "pair.resume": (_pair, lambda o: o.resume()),
    "pair.failover": (_pair, lambda o: o.failover()),
    "pair.failback": (_pair, lambda o: o.failback()),
    "pair.remove": (_pair, lambda o: o.remove()),
    "pair.drain": (_pair, lambda o: o.drain()),
    "gm.form_consistency_group": (_gm, lambda o: o.form_consistency_group()),
    "gm.start": (_gm, lambda o: o.start()),
    "gm.recover": (_gm, lambda o: o.recover()),
    "gm.close": (_gm, lambda o: o.close()),
    "unit.create_volume": (lambda u1, u2: u1, lambda o: o.create_volume("new", N, TS)),
    "unit.remove_volume": (lambda u1, u2: u1, lambda o: o.remove_volume("ga")),
    "unit.volume": (lambda u1, u2: u1, lambda o: o.volume("a")),
    "unit.flush": (lambda u1, u2: u1, lambda o: o.flush()),
    "unit.partner_units": (lambda u1, u2: u1, lambda o: o.partner_units()),
    "volume.write": (lambda u1, u2: u1.volume("a"), lambda o: o.write(0, b"x")),
}


def state(obj) -> tuple:
    """What a call could change in memory."""
    if isinstance(obj, FlashCopy):
        maps = [obj.to_copy, obj.src_changed, obj.tgt_changed]
        return (obj.active, obj.revertible, obj.sequence, obj.target._invalid,
                obj.source._inhibits, [id(m) for m in maps], repr(obj.to_copy))
    if isinstance(obj, PPRCPair):
        return (obj.active, obj.suspend_reason, obj.failed_over, obj.primary.name,
                obj.secondary.name, obj.secondary._secondary, id(obj.oos))
    if isinstance(obj, GlobalMirror):
        return (obj.state, obj._next_sequence, obj.stats.attempts, len(obj.triplets),
                obj.c_sequences)
    if isinstance(obj, StorageUnit):
        return (sorted(obj._volumes), obj._closed)
    return (obj.closed,)


@pytest.mark.parametrize("name", CALLS)
def test_a_call_after_close_is_refused_and_changes_nothing(tmp_path, name):
    get, call = CALLS[name]
    p, s = make_site(tmp_path)
    with StorageUnit(p) as u1, StorageUnit(s) as u2:
        if name in ("fc.commit", "fc.revert"):
            _fc(u1, u2).resync(revertible=True)
        if name == "pair.failback":
            _pair(u1, u2).failover()
        obj = get(u1, u2)
    want = state(obj)
    disk = {d: (rows(d), snapshot(d)) for d in (p, s)}
    with pytest.raises(FastFCError):
        call(obj)
    assert state(obj) == want
    assert {d: (rows(d), snapshot(d)) for d in (p, s)} == disk
    StorageUnit(p).close()      # and the units open as before
    StorageUnit(s).close()


def test_withdraw_refused_by_the_store_leaves_the_relationship(tmp_path, monkeypatch):
    """A store that fails mid-step: memory keeps what the store holds."""
    with StorageUnit(tmp_path / "u") as u:
        s, t = u.create_volume("s", N, TS), u.create_volume("t", N, TS)
        fc = FlashCopy(s, t, background_copy=False, record=True)

        def fail(*a):
            raise sqlite3.OperationalError("disk I/O error")

        monkeypatch.setattr(u.store, "drop_flash", fail)
        with pytest.raises(sqlite3.OperationalError):
            fc.withdraw(force=True)
        assert fc.active and t._tgt_rel is fc and fc in s._src_rels and t.valid
        monkeypatch.setattr(u.store, "save_flash", fail)
        seq = fc.sequence
        with pytest.raises(sqlite3.OperationalError):
            fc.resync(revertible=True)
        assert (fc.revertible, fc.sequence, s._inhibits) == (False, seq, 0)
        monkeypatch.undo()
    with StorageUnit(tmp_path / "u") as u:
        assert u.volume("t")._tgt_rel.sequence == seq


def test_closed_unit_refusals_are_unit_closed_errors(tmp_path):
    p, s = make_site(tmp_path)
    with StorageUnit(p) as u1, StorageUnit(s) as u2:
        fc = _fc(u1, u2)
    with pytest.raises(UnitClosedError):
        fc.withdraw(force=True)
    assert fc.state.value == "nocopy"
    with pytest.raises(UnitClosedError):
        u1.create_volume("n", N, TS)


# ---------------------------------------------------------------------------
# Copied and moved units
# ---------------------------------------------------------------------------

def test_a_copied_pair_of_units_links_to_each_other_not_the_originals(tmp_path):
    p, s = make_site(tmp_path / "orig")
    before = {d: snapshot(d) for d in (p, s)}
    shutil.copytree(tmp_path / "orig", tmp_path / "copy")
    cp, cs = tmp_path / "copy" / "u1", tmp_path / "copy" / "u2"
    with StorageUnit(cp) as u1:
        assert u1.partner_units() == [cs]
        with StorageUnit(cs) as u2:
            assert u1.volume("x")._mirror.secondary is u2.volume("y")
            gm = u2.session("gm")
            assert gm.triplets[0].a is u1.volume("ga")
            assert gm.form_consistency_group().committed
            u1.volume("x").write(0, b"copy")
    assert {d: snapshot(d) for d in (p, s)} == before


def test_a_copy_of_one_unit_never_attaches_to_the_original_partner(tmp_path):
    p, s = make_site(tmp_path / "orig")
    before = snapshot(s)
    shutil.copytree(p, tmp_path / "elsewhere" / "u1")
    cp = tmp_path / "elsewhere" / "u1"
    with StorageUnit(s) as orig2, StorageUnit(cp) as u1:   # the original is open too
        assert u1.partner_units() == []
        assert u1.pairs == [] and orig2.sessions == {}
        assert "no unit at" in u1.describe_partner(u1._pair_rows[0]["secondary_uuid"])
        assert u1.volume("x")._mirror is not None      # writes recorded out of sync
        u1.volume("x").write(0, b"still recorded")
    # the copy next to the original partner: the partner does not agree
    shutil.copytree(p, tmp_path / "orig" / "u1-copy")
    with StorageUnit(tmp_path / "orig" / "u1-copy") as u1:
        assert u1.partner_units() == []
        assert "pairs with a unit at" in u1.describe_partner(
            u1._pair_rows[0]["secondary_uuid"])
        with StorageUnit(s) as orig2:
            assert u1.pairs == [] and orig2.sessions == {}
    assert snapshot(s)["unit.db"] == before["unit.db"]


def test_a_moved_pair_is_relinked_by_naming_both_units(tmp_path):
    p, s = make_site(tmp_path / "orig")
    (tmp_path / "a" / "b").mkdir(parents=True)
    np1, ns2 = tmp_path / "a" / "b" / "site1", tmp_path / "site2"
    p.rename(np1)
    s.rename(ns2)

    def cli(*args):
        r = CliRunner().invoke(main, list(map(str, args)))
        return r

    r = cli("-u", np1, "lspprc")            # moved apart: the partner is not found
    assert "secondary unit not available" in r.stdout
    r = cli("-u", ns2, "showgmir", "gm")     # shown, the primary named as missing
    assert r.exit_code == 0 and "primary unit(s) not available" in r.stdout, r.stderr
    r = cli("-u", ns2, "formcg", "gm")
    assert r.exit_code == 1 and "needs its primary unit" in r.stderr, r.stderr
    r = cli("-u", np1, "-r", ns2, "formcg", "gm")
    assert r.exit_code == 0, r.stderr
    assert "1 of 1 consistency groups committed" in r.stdout
    # re-linked for good: either unit alone finds the other now
    r = cli("-u", ns2, "showgmir", "gm")
    assert r.exit_code == 0, r.stderr
    r = cli("-u", np1, "lspprc")
    assert "x:y     copy pending" in r.stdout and "not available" not in r.stdout
