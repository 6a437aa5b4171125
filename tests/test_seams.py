"""The store handed down: volumes get their unit's store when they
are made, relationships and sessions take theirs from their volumes, a unit
learns of its sessions through its store, and a session's counters are kept
by the store, one row inside the CG's commit, across reopening."""

from __future__ import annotations

import pytest

from fastfc import faults
from fastfc.copyservices.flashcopy import FlashCopy
from fastfc.copyservices.globalmirror import GlobalMirror
from fastfc.durable.unit import StorageUnit
from fastfc.errors import LimitError
from fastfc.storage.store import MEMORY
from fastfc.storage.volume import Volume

TS = 4096


def make_session(u1, u2, n=3):
    trip = []
    for i in range(n):
        trip.append((u1.create_volume(f"a{i}", 16, TS), u2.create_volume(f"b{i}", 16, TS),
                     u2.create_volume(f"c{i}", 16, TS)))
    return GlobalMirror(trip, name="gm"), trip


def test_volumes_and_relationships_are_handed_their_store(tmp_path):
    assert Volume(4, TS).store is MEMORY
    with StorageUnit(tmp_path / "u") as u, StorageUnit() as m:
        s, t = u.create_volume("s", 4, TS), u.create_volume("t", 4, TS)
        assert s.store is u.store and t.store is u.store
        fc = FlashCopy(s, t, background_copy=False)
        assert fc.store is u.store and fc.to_record()["id"] is not None
        x, y = m.create_volume("x", 4, TS), m.create_volume("y", 4, TS)
        assert x.store is m.store is not MEMORY
        with pytest.raises(LimitError, match="one unit"):
            FlashCopy(x, Volume(4, TS))              # another store: another unit
        with pytest.raises(LimitError, match="one unit"):
            FlashCopy(u.create_volume("z", 4, TS), y)


def test_a_unit_learns_of_its_sessions_through_its_store():
    with StorageUnit() as u:
        gm, _ = make_session(u, u, 1)
        assert u.sessions == {"gm": gm}
        gm.close()
        assert u.sessions == {}


def test_session_counters_survive_reopening(tmp_path):
    p1, p2 = tmp_path / "a", tmp_path / "b"
    u1, u2 = StorageUnit(p1), StorageUnit(p2)
    gm, trip = make_session(u1, u2)
    assert gm.form_consistency_group()
    faults.inject("prepare", volume=trip[1][1])
    assert not gm.form_consistency_group()              # prepare_failed, reverted
    faults.inject("coordinate")
    assert not gm.form_consistency_group()              # no transaction of its own
    trip[0][0].write(0, b"x" * TS)
    assert gm.form_consistency_group()
    gm.count_global_copy(3 * TS)
    before = gm.stats.to_record()
    assert before["attempts"] == 4 and before["successes"] == 2
    assert before["failures"] == {"prepare_failed": 1, "coordination_timeout": 1}
    u2.close()
    u1.close()
    u1, u2 = StorageUnit(p1), StorageUnit(p2)
    try:
        gm2 = u2.session("gm")
        assert gm2 is not gm and gm2.stats.to_record() == before
        assert gm2.form_consistency_group()
        assert gm2.stats.attempts == 5 and gm2.stats.successes == 3
    finally:
        u2.close()
        u1.close()
    with StorageUnit(p2, readonly=True) as ro:
        assert ro.store.session_rows()["gm"]["stats"]["attempts"] == 5


@pytest.mark.parametrize("durability,fsyncs_per_cg,pragmas", [("power", 1, 2),
                                                               ("process", 0, 0)])
def test_a_cg_costs_one_fsync_and_one_row_for_its_counters(tmp_path, durability,
                                                           fsyncs_per_cg, pragmas):
    """At "power" a CG costs one fsync (the prepares and the decision share
    it); at "process" none. Either way one row for the session's counters.
    (At "process" the CG's two commits are appends to the CG journal, and
    no SQL statement runs.)"""
    with StorageUnit(tmp_path / "a", durability=durability) as u1, \
            StorageUnit(tmp_path / "b", durability=durability) as u2:
        gm, trip = make_session(u1, u2)
        assert gm.form_consistency_group()
        for a, _, _ in trip:
            a.write(0, b"y" * TS)
        statements = []
        for u in (u1, u2):
            u.store.set_trace_callback(statements.append)
        fsyncs = u1.store.fsyncs + u2.store.fsyncs
        try:
            assert gm.form_consistency_group()
        finally:
            for u in (u1, u2):
                u.store.set_trace_callback(None)
        assert u1.store.fsyncs + u2.store.fsyncs - fsyncs == fsyncs_per_cg
        if durability == "process":
            sql = [s for s in statements if not s.startswith("JOURNAL")]
            assert sql == [], sql
            statements = [s.removeprefix("JOURNAL ") for s in statements]
            assert statements.count("COMMIT") == 2       # the CG's two commits
        else:
            assert sum(s.startswith("BEGIN") for s in statements) == 2   # the CG's two commits
        assert sum("session_stats" in s for s in statements) == 1
        # the group's prepares (one FlashCopy-log row, whatever the number of
        # triplets), the decision, the group's commits (one row), the counters;
        # begin/commit (at "process" the commits alone: the journal's appends),
        # and at "power" the sync pragmas around the fsync'd commit
        begins = 2 if durability == "power" else 0
        assert len(statements) == 1 + 1 + 1 + 1 + begins + 2 + pragmas, statements
