"""The CG journal of a storage unit at durability "process" (``unit.journal``):
a consistency group's records as appends to a memory-mapped file, folded
into ``unit.db`` off the CG path. What a kill leaves is read back whole; a
torn append is not read; read-only opens change no file."""

from __future__ import annotations

import shutil
import struct
from pathlib import Path

import numpy as np
import pytest

from fastfc import GlobalMirror, StorageUnit
from fastfc.durable import sqlite as unitdb
from fastfc.durable.sqlite import JOURNAL_FILE, CGJournal, SQLiteStore, _compact

TS = 4096


def _session(u1: StorageUnit, u2: StorageUnit, n: int) -> tuple[GlobalMirror, list]:
    trips = [(u1.create_volume(f"A{i}", 8, TS), u2.create_volume(f"B{i}", 8, TS),
              u2.create_volume(f"C{i}", 8, TS)) for i in range(n)]
    return GlobalMirror(trips, name="gm", max_coordination_time=1.0), trips


def _killed(src: Path, dest: Path) -> Path:
    """A copy of a unit directory as a kill leaves it (every file as it is
    now: the page cache holds every store)."""
    shutil.copytree(src, dest, ignore=shutil.ignore_patterns("unit.lock"))
    return dest


@pytest.mark.parametrize("n", [2, 16])
def test_a_cg_at_process_runs_no_sql_statement_whatever_its_size(tmp_path, n):
    """At "process" a CG's records (the prepare and commit batches, the
    decision, the counters) cost the unit no SQL statement and two journal
    appends, at 2 and at 16 triplets (they were 8 statements in two SQLite
    commits)."""
    with StorageUnit(tmp_path / "p") as u1, StorageUnit(tmp_path / "s") as u2:
        gm, trips = _session(u1, u2, n)
        assert gm.form_consistency_group().committed
        sql: list[str] = []
        everything: list[str] = []
        conns = [u.store.db for u in (u1, u2)]
        for conn in conns:
            conn.set_trace_callback(sql.append)      # (SQLite's statements only)
        try:
            for k in range(4):
                trips[k % n][0].write(0, b"x" * TS)
                assert gm.form_consistency_group().committed
        finally:
            for conn in conns:
                conn.set_trace_callback(None)
        assert sql == []
        appends = u2.store._journal.pos
        for u in (u1, u2):
            u.store.set_trace_callback(everything.append)
        try:
            trips[n - 1][0].write(0, b"y" * TS)
            assert gm.form_consistency_group().committed
        finally:
            for u in (u1, u2):
                u.store.set_trace_callback(None)
        assert everything.count("JOURNAL COMMIT") == 2, everything
        assert len(everything) == 6, everything     # 2 log rows, decision, counters
        assert u2.store._journal.pos > appends
        gm.close(discard=True)


@pytest.mark.parametrize("n", [2, 16])
def test_a_cg_records_only_the_relationships_it_steps(tmp_path, n):
    """At "process" a CG steps (and records) only the B->C relationships
    whose B changed: a CG over one changed triplet records one log row per
    step naming that one relationship, and a CG over none records no log
    row (the decision and the counters only), whatever the size."""
    with StorageUnit(tmp_path / "p") as u1, StorageUnit(tmp_path / "s") as u2:
        gm, trips = _session(u1, u2, n)
        assert gm.form_consistency_group().committed
        assert gm.form_consistency_group().committed
        everything: list[str] = []
        u2.store.set_trace_callback(everything.append)
        try:
            assert gm.form_consistency_group().committed
        finally:
            u2.store.set_trace_callback(None)
        assert not any("flash" in s.lower() for s in everything), everything
        assert len(everything) == 4, everything     # decision, counters, 2 commits
        before = [t.fc.sequence for t in gm.triplets]
        trips[0][0].write(0, b"z" * TS)
        assert gm.form_consistency_group().committed
        assert gm.c_sequences == [before[0] + 1] * n
        gm.close(discard=True)


def test_a_killed_unit_reads_back_every_appended_cg(tmp_path):
    """Killed after some CGs (nothing folded): read-only (an in-memory copy
    of unit.db with the journal applied: no file changes) and read-write
    (folded into unit.db, the journal emptied) read the counters and every
    C on the last CG."""
    u1, u2 = StorageUnit(tmp_path / "p"), StorageUnit(tmp_path / "s")
    gm, trips = _session(u1, u2, 3)
    for k in range(5):
        trips[k % 3][0].write(TS * k, bytes([k + 1]) * TS)
        assert gm.form_consistency_group().committed
    attempts = gm.stats.attempts
    assert u2.store._journal.pending
    dead = tmp_path / "dead"
    dead.mkdir()
    _killed(tmp_path / "p", dead / "p")
    _killed(tmp_path / "s", dead / "s")
    gm.close(discard=True)
    u1.close()
    u2.close()
    kept = ("unit.db", "unit.db-wal", JOURNAL_FILE)   # (SQLite's -shm is its own business)
    before = {n: (dead / "s" / n).read_bytes() for n in kept}
    with StorageUnit(dead / "s", readonly=True) as ro:
        assert ro.session_record("gm")["stats"]["attempts"] == attempts
        assert {ro.volume(f"C{i}").target_relationship.sequence for i in range(3)} \
            == {attempts}
    assert {n: (dead / "s" / n).read_bytes() for n in kept} == before
    with StorageUnit(dead / "p") as p, StorageUnit(dead / "s") as s:
        assert s.store._journal is not None and not s.store._journal.pending
        gm = s.session("gm")
        assert gm.stats.attempts == attempts and gm.c_sequences == [attempts] * 3
        assert gm.form_consistency_group().committed
        gm.close(discard=True)
    assert not (dead / "s" / JOURNAL_FILE).exists()     # folded at close


def test_a_torn_append_is_not_read(tmp_path):
    """A process killed inside an append leaves an entry whose check fails:
    the reopened unit reads the entries before it, and nothing after it."""
    d = tmp_path / "u"
    d.mkdir()
    store = SQLiteStore(d, str(d))
    for q in (1, 2, 3):
        with store.transaction():
            store.cg_decision("s", q, "commit")
    ends = []
    pos = 0
    data = (d / JOURNAL_FILE).read_bytes()
    for _ in range(3):
        n = struct.unpack_from("<I", data, pos)[0]
        pos = (pos + 16 + n + 7) & ~7
        ends.append(pos)
    for cut, want in ((ends[1] + 16 + 3, {1: "commit", 2: "commit"}),   # payload torn
                      (ends[1] + 4, {1: "commit", 2: "commit"}),        # header torn
                      (ends[0] + 20, {1: "commit"})):
        copy = tmp_path / f"cut{cut}"
        _killed(d, copy)
        torn = bytearray((copy / JOURNAL_FILE).read_bytes())
        torn[cut] ^= 0xFF
        (copy / JOURNAL_FILE).write_bytes(bytes(torn))
        again = SQLiteStore(copy, str(copy))
        try:
            assert again.decisions_of("s") == want, cut
        finally:
            again.close()
    store.close()


def test_folds_when_full_and_never_reads_an_older_generation(tmp_path, monkeypatch):
    """A small journal fills every few CGs: each fold writes its entries into
    unit.db and the journal starts again (a new generation), over entries
    of the older ones that no reader takes. A kill at any CG reads back the
    counters of every attempt."""
    monkeypatch.setattr(unitdb, "JOURNAL_BYTES", 8192)
    u1, u2 = StorageUnit(tmp_path / "p"), StorageUnit(tmp_path / "s")
    gm, trips = _session(u1, u2, 4)
    folds = 0
    gen = u2.store._journal.generation
    rng = np.random.default_rng(3)
    for k in range(40):
        trips[int(rng.integers(4))][0].write(int(rng.integers(8)) * TS, b"y" * TS)
        assert gm.form_consistency_group().committed
        if u2.store._journal.generation != gen:
            folds += 1
            gen = u2.store._journal.generation
        if k % 7 == 3:
            dead = tmp_path / f"dead{k}"
            dead.mkdir()
            _killed(tmp_path / "s", dead / "s")
            with StorageUnit(dead / "s", readonly=True) as ro:
                st = ro.session_record("gm")["stats"]
                assert st["attempts"] == gm.stats.attempts == st["sequence"], (k, st)
    assert folds >= 5, folds
    gm.close(discard=True)
    u1.close()
    u2.close()


def test_opened_at_power_a_unit_killed_at_process_folds_its_journal(tmp_path):
    """The journal is for "process": a unit it holds records for, opened at
    "power", folds them and keeps no journal."""
    u1, u2 = StorageUnit(tmp_path / "p"), StorageUnit(tmp_path / "s")
    gm, _ = _session(u1, u2, 2)
    for _ in range(3):
        assert gm.form_consistency_group().committed
    dead = tmp_path / "dead"
    dead.mkdir()
    _killed(tmp_path / "s", dead / "s")
    gm.close(discard=True)
    u1.close()
    u2.close()
    with StorageUnit(dead / "s", durability="power") as s:
        assert not (dead / "s" / JOURNAL_FILE).exists()
        assert s.session_record("gm")["stats"]["attempts"] == 3


def test_compaction_keeps_the_last_replace_of_each_row_and_the_order_of_the_rest():
    """What a fold runs: a replace of a row that a later replace of the same
    row follows (nothing else on its table between) is dropped; any other
    statement on the table keeps what came before it."""
    ups = [(0, (b"a", 1)), (0, (b"b", 2)), (0, (b"c", 1)), (5, ("gm", 1)), (5, ("gm", 2))]
    assert _compact(ups) == [(0, (b"b", 2)), (0, (b"c", 1)), (5, ("gm", 2))]
    with_insert = [(0, (b"a", 1)), (1, (3, b"n")), (0, (b"c", 1))]
    assert _compact(with_insert) == with_insert
    decisions = [(3, ("gm", 1, "commit")), (4, ("gm", -15)), (3, ("gm", 1, "revert"))]
    assert _compact(decisions) == decisions


def test_journal_entries_of_a_generation_are_read_from_the_start(tmp_path):
    """:meth:`CGJournal.read` takes the entries of the generation after the
    folded one, from the start, up to the first that is not one."""
    j = CGJournal(tmp_path / "j", size=4096)
    j.restart(5)
    assert j.append([(3, ("gm", 1, "commit"))])
    assert j.append([(3, ("gm", 2, "commit"))])
    j.restart(6)                           # folded 5: an older generation lies behind
    assert j.append([(3, ("gm", 3, "commit"))])
    assert not j.append([(3, ("gm", 4, "x" * 5000))])     # too big: nothing written
    j.close(remove=False)
    assert CGJournal.read(tmp_path / "j", 5) == (6, [(3, ("gm", 3, "commit"))])
    assert CGJournal.read(tmp_path / "j", 6) == (7, [])
    assert CGJournal.read(tmp_path / "missing", 2) == (3, [])
