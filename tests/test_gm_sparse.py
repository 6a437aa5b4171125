"""A consistency group in memory visits only what changed.

A session whose B and C volumes are in memory begins a CG only on the pairs
with tracks out of sync (``coordinate_pairs(begun=...)``), drains and ends
only those, and steps only the B->C relationships that changed
(``FlashCopyGroup.sparse``); the others follow the group's
:class:`~fastfc._core.SequenceCell`. Here:

* the kernels are handed only the written triplets (an idle CG hands them
  none), and an idle relationship keeps its bitmaps;
* differentially: a sparse session and one that steps every pair and
  relationship (the path storage units take), over identical volumes, run
  the same random writes to random subsets of triplets, Global Copy between
  CGs and faults; after every attempt results, every C image, sequence
  number, bitmap and write-inhibit are equal, and every C holds the A
  images of the newest committed CG's coordination instant;
* Global Copy between CGs (a pair's own drain) marks its relationship, so
  the next CG steps it even though its pair has nothing out of sync.
"""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, strategies as st

from fastfc import GlobalMirror, Volume, _core, faults
from fastfc.copyservices.globalmirror import Cause

TS = 512
N_TRACKS = 8


def _trips(n: int, seed: int = 0) -> list:
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        a, b, c = (Volume(N_TRACKS, TS, name=f"{r}{i}") for r in "ABC")
        a._raw_array()[:] = rng.integers(0, 256, a.capacity, np.uint8)
        b._raw_array()[:] = a._raw_array()      # (sessions here may skip the initial copy)
        out.append((a, b, c))
    return out


def _snapshots(trips: list) -> tuple[dict, "object"]:
    """``(snaps, on_coordinate)``: the callback records every A's image at
    each CG's instant in ``snaps`` (by sequence), what each C must hold."""
    snaps: dict = {}

    def on_coordinate(seq: int) -> None:
        snaps[seq] = [a.read(0, a.capacity) for a, _, _ in trips]
    return snaps, on_coordinate


def _linear(gm: GlobalMirror) -> None:
    """Make ``gm`` step every pair and relationship, as a session over a
    storage unit does (the path before sparse CGs)."""
    gm._sparse = False
    for g in gm.groups:
        g.flash.sparse = False
        for t in g.triplets:
            t.pair.on_sent = None


class Recorder:
    """Batch sizes handed to the CG kernels (the pairs drained and ended,
    the relationships stepped)."""

    def __init__(self, monkeypatch) -> None:
        self.sizes: dict[str, list[int]] = {}
        for name, arg in (("pprc_drain_many", 0), ("cg_end_many", 1),
                          ("prepare_revertible_many", 0), ("end_revertible_many", 0)):
            real = getattr(_core, name)

            def wrapped(*a, _real=real, _name=name, _arg=arg, **k):
                self.sizes.setdefault(_name, []).append(len(a[_arg]))
                return _real(*a, **k)

            monkeypatch.setattr(_core, name, wrapped)

    def take(self) -> dict[str, list[int]]:
        out, self.sizes = self.sizes, {}
        return out


def _write(a: Volume, rng, tag: int) -> None:
    off = int(rng.integers(0, a.capacity))
    n = int(rng.integers(1, min(3 * TS, a.capacity - off) + 1))
    a.write(off, np.full(n, tag % 251 + 1, np.uint8))


def test_an_idle_cg_steps_no_pair_and_no_relationship(monkeypatch):
    trips = _trips(64)
    gm = GlobalMirror(trips, initial_copy=False)
    try:
        assert gm.form_consistency_group().committed       # the first CG steps every one
        rec = Recorder(monkeypatch)
        rels = [t.fc for t in gm.triplets]
        before = [(fc.to_copy, fc.src_changed, fc.tgt_changed) for fc in rels]
        for k in range(3):
            res = gm.form_consistency_group()
            assert res.committed and res.bytes_drained == 0
            sizes = rec.take()
            # no pair drained or ended, no relationship prepared or committed
            assert sizes.get("pprc_drain_many", [0]) == [0]
            assert sizes.get("cg_end_many", [0]) == [0]
            assert sizes.get("prepare_revertible_many", [0]) == [0]
            assert sizes.get("end_revertible_many", [0]) == [0]
            assert gm.c_sequences == [res.sequence] * 64
            assert all(t.pair.cg is None for t in gm.triplets)
        # no relationship was stepped: each keeps its very bitmaps
        assert all(x is y for fc, b in zip(rels, before)
                   for x, y in zip((fc.to_copy, fc.src_changed, fc.tgt_changed), b))
        assert {id(fc.seq_cell) for fc in rels} == {id(rels[0].seq_cell)} != {id(None)}
    finally:
        gm.close(discard=True)


def test_a_cg_steps_only_the_written_triplets(monkeypatch):
    trips = _trips(64)
    gm = GlobalMirror(trips, initial_copy=False)
    try:
        assert gm.form_consistency_group().committed
        rec = Recorder(monkeypatch)
        snaps, gm.on_coordinate = _snapshots(trips)
        for written in ([5], [0, 63], [7, 8, 9, 40], []):
            for i in written:
                trips[i][0].write(3 * TS + 1, np.full(100, 9 + i, np.uint8))
            res = gm.form_consistency_group()
            assert res.committed
            sizes = rec.take()
            n = len(written)
            assert sizes.get("pprc_drain_many", [0]) == [n]
            assert sizes.get("cg_end_many", [0]) == [n]
            assert sizes.get("prepare_revertible_many", [0]) == [n]
            assert sizes.get("end_revertible_many", [0]) == [n]
            assert gm.c_sequences == [res.sequence] * 64
            for (_, _, c), img in zip(trips, snaps[res.sequence]):
                assert np.array_equal(c.read(0, c.capacity), img)
    finally:
        gm.close(discard=True)


def test_global_copy_between_cgs_is_stepped_at_the_next_cg():
    """A pair that sent its tracks as Global Copy before the CG has nothing
    out of sync at coordination, yet its B changed: the CG steps its
    relationship (``PPRCPair.on_sent``), so C holds the new data."""
    trips = _trips(4)
    snaps, on_coordinate = _snapshots(trips)
    gm = GlobalMirror(trips, initial_copy=False, on_coordinate=on_coordinate)
    try:
        assert gm.form_consistency_group().committed
        trips[2][0].write(TS, np.full(TS, 77, np.uint8))
        assert gm.triplets[2].pair.drain() == TS           # Global Copy: B2 has it
        assert not gm.triplets[2].pair.oos.any()
        res = gm.form_consistency_group()
        assert res.committed and res.bytes_drained == 0
        assert np.array_equal(trips[2][2].read(TS, TS), np.full(TS, 77, np.uint8))
        for (_, _, c), img in zip(trips, snaps[res.sequence]):
            assert np.array_equal(c.read(0, c.capacity), img)
        # the loop's Global Copy between CGs, too
        trips[1][0].write(0, np.full(10, 5, np.uint8))
        assert sum(g.global_copy(1 << 20) for g in gm.groups) == TS
        res = gm.form_consistency_group()
        assert res.committed and np.array_equal(trips[1][2].read(0, 10),
                                                np.full(10, 5, np.uint8))
        assert gm.c_sequences == [res.sequence] * 4
    finally:
        gm.close(discard=True)


def test_a_fault_on_an_idle_triplet_fires_as_if_it_were_stepped():
    trips = _trips(4)
    gm = GlobalMirror(trips, initial_copy=False)
    try:
        assert gm.form_consistency_group().committed
        trips[0][0].write(0, np.full(10, 1, np.uint8))
        faults.inject("prepare", volume=trips[3][1])        # B3: not written
        res = gm.form_consistency_group()
        assert res.cause is Cause.PREPARE_FAILED and "B3" in res.detail
        assert gm.c_sequences == [1] * 4
        faults.inject("drain", volume=trips[2][0])           # A2: not written
        res = gm.form_consistency_group()
        assert res.cause is Cause.DRAIN_ERROR
        assert gm.c_sequences == [1] * 4
        # a commit failure of the one written triplet: the followers
        # committed with the rest, so the rule commits it (as stepped)
        faults.inject("commit", volume=trips[0][1])
        res = gm.form_consistency_group()
        assert res.committed and res.cause is Cause.COMMIT_FAILED
        assert "resolved by commit" in gm.fatal_reason
        assert gm.c_sequences == [res.sequence] * 4
        assert np.array_equal(trips[0][2].read(0, 10), np.full(10, 1, np.uint8))
        gm.clear_fatal()
        assert gm.form_consistency_group().committed
    finally:
        faults.clear()
        gm.close(discard=True)


def test_an_idle_b_is_write_inhibited_while_the_phase_is_in_flight():
    trips = _trips(3)
    gm = GlobalMirror(trips, initial_copy=False)
    seen = []
    try:
        assert gm.form_consistency_group().committed
        trips[1][0].write(0, np.full(10, 1, np.uint8))
        faults.inject("prepare", volume=trips[1][1],
                      action=lambda: seen.append([b.write_inhibited for _, b, _ in trips]))
        assert gm.form_consistency_group().committed
        # every B, B1 too (its own prepare, next, inhibits it in turn)
        assert seen == [[True, True, True]]
        assert not any(b.write_inhibited for _, b, _ in trips)
    finally:
        faults.clear()
        gm.close(discard=True)


_FAULTS = ["none", "none", "none", "prepare", "commit", "revert", "drain", "link",
           "link_down"]


def _state(gm: GlobalMirror) -> list:
    out = []
    for t in gm.triplets:
        fc, p = t.fc, t.pair
        out.append(([x.set_indices().tolist() for x in (fc.to_copy, fc.src_changed,
                                                         fc.tgt_changed, p.oos)],
                    fc.sequence, fc.revertible, t.b.write_inhibited, p.cg is None,
                    t.b.read(0, t.b.capacity).tobytes(), t.c.read(0, t.c.capacity).tobytes()))
    return out


@given(seed=st.integers(0, 2 ** 32 - 1), n_trip=st.integers(1, 9),
       decide=st.sampled_from(["after_all", "after_each"]))
def test_a_sparse_session_equals_one_that_steps_every_triplet(seed, n_trip, decide):
    rng = np.random.default_rng(seed)
    sides = []
    for sparse in (True, False):
        trips = _trips(n_trip, seed & 0xffff)
        snaps: dict[int, list] = {}
        gm = GlobalMirror(trips, decide=decide, max_coordination_time=1.0,
                          on_coordinate=lambda seq, trips=trips, snaps=snaps: snaps.__setitem__(
                              seq, [a.read(0, a.capacity) for a, _, _ in trips]))
        if not sparse:
            _linear(gm)
        sides.append((gm, trips, snaps))
    committed = 0
    try:
        for step in range(10):
            # a random subset of triplets written (often none, often one)
            k = int(rng.choice([0, 0, 1, 1, 2, n_trip]))
            written = rng.choice(n_trip, size=min(k, n_trip), replace=False).tolist()
            tags = [int(rng.integers(1 << 20)) for _ in written]
            copy_between = rng.random() < 0.3          # Global Copy before the CG
            fault = str(rng.choice(_FAULTS))
            pick, other = int(rng.integers(n_trip)), int(rng.integers(n_trip))
            results = []
            for gm, trips, snaps in sides:
                wr = np.random.default_rng(seed + step)
                for i, tag in zip(written, tags):
                    _write(trips[i][0], wr, tag)
                if copy_between:
                    for t in gm.triplets[:max(1, n_trip // 2)]:
                        t.pair.drain()
                if fault in ("prepare", "commit"):
                    faults.inject(fault, volume=trips[pick][1])
                elif fault == "revert":
                    faults.inject("prepare", volume=trips[other][1])
                    faults.inject("revert", volume=trips[pick][1])
                elif fault == "drain":
                    faults.inject("drain", volume=trips[pick][0])
                elif fault == "link":
                    faults.inject("link")
                elif fault == "link_down":
                    gm.link.fail()
                try:
                    r = gm.form_consistency_group()
                finally:
                    faults.clear()
                results.append((r.sequence, r.committed, r.cause, r.detail, r.bytes_drained))
                if r.committed:
                    committed = r.sequence
                gm.link.restore()
                for t in gm.triplets:
                    if t.pair.suspend_reason is not None:
                        t.pair.resume()
                if gm.state.value == "fatal":
                    gm.clear_fatal()
            assert results[0] == results[1], (step, fault)
            assert _state(sides[0][0]) == _state(sides[1][0]), (step, fault)
            # the promise: every C on the newest committed CG, one number
            for gm, trips, snaps in sides:
                seqs = set(gm.c_sequences)
                assert len(seqs) == 1, seqs
                if committed:
                    assert seqs == {committed}
                    for (_, _, c), img in zip(trips, snaps[committed]):
                        assert np.array_equal(c.read(0, c.capacity), img)
    finally:
        for gm, trips, _ in sides:
            gm.close(discard=True)
            for t in trips:
                for v in t:
                    v.close()


def test_recovery_after_idle_cgs_restores_every_b_to_the_last_cg():
    trips = _trips(6)
    snaps, on_coordinate = _snapshots(trips)
    gm = GlobalMirror(trips, initial_copy=False, on_coordinate=on_coordinate)
    try:
        assert gm.form_consistency_group().committed
        trips[4][0].write(0, np.full(TS, 3, np.uint8))
        assert gm.form_consistency_group().committed
        for _ in range(3):
            res = gm.form_consistency_group()           # idle
        trips[1][0].write(0, np.full(TS, 8, np.uint8))  # never in a CG
        assert gm.recover() == res.sequence
        for (_, b, _), img in zip(trips, snaps[res.sequence]):
            assert np.array_equal(b.read(0, b.capacity), img)
    finally:
        gm.close(discard=True)


@pytest.mark.parametrize("n", [1, 3])
def test_closing_leaves_each_relationship_its_own_number(n):
    trips = _trips(n)
    gm = GlobalMirror(trips, initial_copy=False)
    assert gm.form_consistency_group().committed
    assert gm.form_consistency_group().committed
    rels = [t.fc for t in gm.triplets]
    gm.close()
    for fc in rels:
        assert fc.seq_cell is None and fc.sequence == 2
