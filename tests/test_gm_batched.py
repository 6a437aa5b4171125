"""The batched steps of a consistency group against the same steps one at a time.

A secondary group (:class:`~fastfc.copyservices.groups.SecondaryGroup`)
drains its pairs in one kernel call (``_core.pprc_drain_many``), prepares,
commits and reverts its relationships in one call each
(``prepare_revertible_many``, ``end_revertible_many``) and closes the CG of
every pair in one more (``cg_end_many``), whatever its store and whatever
fault is armed; a pair's or a relationship's own method runs the same step
as a batch of one. Here two sessions over identical volumes run the same
random writes, CG attempts and relationship states, one as it runs and one
with its groups calling each pair's and relationship's own method in turn
(``helpers.one_at_a_time``); after every attempt each result, every bitmap,
sequence number, write-inhibit and every volume's bytes must be equal.
"""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, strategies as st

from fastfc import GlobalMirror, StorageUnit, Volume, _core, faults
from fastfc.copyservices.groups import SecondaryGroup
from helpers import KernelCalls, one_at_a_time

TS = 512


@pytest.fixture
def tmp_path(tmpfs_tmp_path):
    """This module's units live on tmpfs (conftest.tmpfs_tmp_path): none of
    its tests is about the disk, and on a busy disk their fsyncs took most
    of their time."""
    return tmpfs_tmp_path


def _session(n_trip: int, n_tracks: int, batched: bool, decide: str,
             sizes: list[int] | None = None) -> tuple[GlobalMirror, list]:
    trips = []
    for i in range(n_trip):
        n = sizes[i] if sizes else n_tracks
        a, b, c = (Volume(n, TS, name=f"{r}{i}") for r in "ABC")
        a._raw_array()[:] = np.random.default_rng(i).integers(0, 256, a.capacity, np.uint8)
        trips.append((a, b, c))
    gm = GlobalMirror(trips, decide=decide, max_coordination_time=1.0)
    if not batched:
        one_at_a_time(gm)
    return gm, trips


def _state(gm: GlobalMirror, trips) -> list:
    out = []
    for t, (a, b, c) in zip(gm.triplets, trips):
        fc, p = t.fc, t.pair
        bms = [fc.to_copy, fc.src_changed, fc.tgt_changed, p.oos]
        if fc._revert_image is not None:
            bms += [x for x in fc._revert_image[:3]]
        out.append(([None if x is None else x.set_indices().tolist() for x in bms],
                    fc.sequence, fc.revertible, b._inhibits, p.cg is None, dict(p.side),
                    a.array.tobytes(), b.array.tobytes(), c.array.tobytes(), p.bytes_sent,
                    None if fc._revert_image is None else fc._revert_image[3]))
    return out


def _result(r) -> tuple:
    return (r.sequence, r.committed, r.cause, r.detail, r.bytes_drained)


def _run(seed: int, n_trip: int, decide: str, steps: int, sizes=None) -> None:
    n_tracks = 8
    pair = [_session(n_trip, n_tracks, batched, decide, sizes) for batched in (True, False)]
    rng = np.random.default_rng(seed)
    try:
        for _ in range(steps):
            writes = [(i, int(rng.integers(0, 8)), int(rng.integers(1, 256)))
                      for i in rng.choice(n_trip, size=int(rng.integers(0, n_trip + 1)))]
            # some relationships in a state the kernels hand to the per-
            # relationship method: already revertible (its prepare fails), or
            # prepared by hand and committed/reverted by the session
            odd = int(rng.integers(-1, n_trip)) if rng.random() < 0.3 else -1
            for gm, trips in pair:
                for i, t, v in writes:
                    a = trips[i][0]
                    a.write(min(t, a.n_tracks - 1) * TS + 7, np.full(100, v, np.uint8))
                if odd >= 0:
                    # (a session's step: a user's is refused)
                    gm.triplets[odd].fc._resync(revertible=True, sequence=10 ** 6)
            res = [gm.form_consistency_group() for gm, _ in pair]
            assert _result(res[0]) == _result(res[1])
            if odd >= 0:
                for gm, _ in pair:     # the hand-made revertible one: put it back
                    fc = gm.triplets[odd].fc
                    if fc.revertible:
                        fc._end_revertible("revert")
            assert _state(*pair[0]) == _state(*pair[1])
            for gm, _ in pair:
                assert gm.state.value != "fatal"
    finally:
        for gm, trips in pair:
            gm.close(discard=True)
            for t in trips:
                for v in t:
                    v.close()


@pytest.mark.parametrize("decide", ["after_all", "after_each"])
@given(seed=st.integers(0, 2 ** 32 - 1), n_trip=st.integers(1, 6))
def test_batched_cg_equals_the_per_relationship_path(decide, seed, n_trip):
    _run(seed, n_trip, decide, steps=6)


def test_batched_cg_with_volumes_of_several_sizes():
    _run(7, 4, "after_all", steps=8, sizes=[8, 3, 8, 1])


_KERNELS = ("pprc_drain_many", "prepare_revertible_many", "end_revertible_many",
            "cg_end_many")


@pytest.mark.parametrize("point", ["none", "prepare", "commit", "drain", "link"])
def test_an_armed_fault_runs_the_same_kernels(monkeypatch, point):
    """With a fault armed at any point the group runs the same kernel calls
    as with none (one per step, the drain resumed past the pair that failed
    only when the CG goes on): arming a fault never changes which code runs.
    The fault fires for its volume from inside the loop, and the CG fails
    (or, at a commit, is resolved)."""
    gm, trips = _session(4, 8, True, "after_all")
    try:
        assert gm.form_consistency_group().committed
        for a, _, _ in trips:
            a.write(0, np.full(3 * TS, 5, np.uint8))
        counts = {name: KernelCalls(monkeypatch, name) for name in _KERNELS}
        if point == "drain":
            faults.inject("drain", volume=trips[2][0])
        elif point == "link":
            faults.inject("link", after=2)
        elif point != "none":
            faults.inject(point, volume=trips[2][1])
        r = gm.form_consistency_group()
        calls = {name: c.calls for name, c in counts.items()}
        if point == "none":
            assert r.committed
            assert calls == dict.fromkeys(_KERNELS, 1)
        else:
            # (a commit that fails is resolved by committing the rest)
            assert r.committed == (point == "commit") and r.cause.value != "none", r
            assert faults.fired_log()[-1][0] == point
            assert calls["pprc_drain_many"] == 1 and calls["cg_end_many"] == 1
            if point in ("prepare", "commit"):
                # the loop skips B2 and goes on (a second call); a prepare
                # that failed reverts the CG; a commit that failed is retried
                # by the resolution through B2's own commit: the same kernel,
                # a batch of one
                assert calls["prepare_revertible_many"] == (2 if point == "prepare" else 1)
                assert calls["end_revertible_many"] == (1 if point == "prepare" else 3)
                want = "prepare of B2: InjectedFault" if point == "prepare" else \
                    "commit of B2: InjectedFault"
                assert want in r.detail, r.detail
            else:          # the drain failed: no FlashCopy phase
                assert calls["prepare_revertible_many"] == 0
        assert all(not t.fc.revertible for t in gm.triplets)
        faults.clear()
        gm.link.restore()
        for t in gm.triplets:
            t.pair.suspend_reason = None
        if gm.state.value == "fatal":
            gm.clear_fatal()
        assert gm.form_consistency_group().committed
    finally:
        faults.clear()
        gm.close(discard=True)


def test_no_module_chooses_a_path_by_an_armed_fault():
    """No path is chosen by a fault being armed: no module of the package
    but ``faults`` itself asks whether one is, and none keeps a switch
    between a batched and another path."""
    import importlib
    import inspect
    import pkgutil
    import fastfc
    for info in pkgutil.walk_packages(fastfc.__path__, "fastfc."):
        if info.name in ("fastfc.faults", "fastfc._core", "fastfc.remote.rayunit"):
            continue        # (the core: its kernels take callbacks; rayunit imports ray)
        mod = importlib.import_module(info.name)
        src = inspect.getsource(mod)
        assert "armed_at" not in src and "_batched" not in src, mod.__name__


def _unit_triplets(pu, su, n: int) -> list:
    """``n`` triplets of 8-track volumes: A in unit ``pu``, B and C in ``su``."""
    return [(pu.create_volume(f"A{i}", 8, TS), su.create_volume(f"B{i}", 8, TS),
             su.create_volume(f"C{i}", 8, TS)) for i in range(n)]


def test_a_durable_unit_runs_the_kernels_and_records_each_step_once(tmp_path, monkeypatch):
    """A session over a storage unit's volumes takes the same kernel calls as
    one in memory, and its store records each FlashCopy step of a group in
    one ``save_steps`` call (no ``save_flash`` per relationship)."""
    with StorageUnit(tmp_path / "p") as pu, StorageUnit(tmp_path / "s") as su:
        trips = _unit_triplets(pu, su, 4)
        gm = GlobalMirror(trips, name="gm", max_coordination_time=1.0)
        assert gm.form_consistency_group().committed
        for a, _, _ in trips:
            a.write(TS, np.full(TS, 3, np.uint8))
        counts = {name: KernelCalls(monkeypatch, name) for name in _KERNELS}
        store = trips[0][1].store
        batches, singles = [], []
        real_many, real_one = store.save_steps, store.save_flash
        monkeypatch.setattr(store, "save_steps", lambda rels, ids, options: batches.append(
            len(rels)) or real_many(rels, ids, options))
        monkeypatch.setattr(store, "save_flash",
                            lambda rec: singles.append(rec["id"]) or real_one(rec))
        assert gm.form_consistency_group().committed
        assert {n: c.calls for n, c in counts.items()} == dict.fromkeys(_KERNELS, 1)
        assert batches == [4, 4]      # the prepares, then the commits
        # (Store.save_steps loops save_flash unless the store's is faster)
        assert len(singles) in (0, 8)
        gm.close(discard=True)


def test_groups_follow_the_store_of_b():
    gm, trips = _session(3, 4, True, "after_all")
    try:
        assert len(gm.groups) == 1 and isinstance(gm.groups[0], SecondaryGroup)
        assert gm.groups[0].triplets == gm.triplets
    finally:
        gm.close(discard=True)


def test_kernels_refuse_bitmaps_of_another_size():
    gm, trips = _session(2, 4, True, "after_all")
    try:
        fcs = [t.fc for t in gm.triplets]
        fresh = [_core.TrackBitmap(5) for _ in range(6)]
        with pytest.raises(ValueError, match="different sizes"):
            _core.prepare_revertible_many(fcs, 0, 3, fresh)
        with pytest.raises(ValueError, match="three fresh bitmaps"):
            _core.prepare_revertible_many(fcs, 0, 3, fresh[:5])
        assert not any(fc.revertible for fc in fcs)       # nothing changed
        with pytest.raises(ValueError, match="as many secondaries"):
            _core.pprc_drain_many([trips[0][0]], [], [], 1 << 20)
    finally:
        gm.close(discard=True)


def _unit_or_memory_session(tmp_path, durable: bool, n_trip: int, sizes: list[int]):
    units = []
    if durable:
        pu, su = StorageUnit(tmp_path / "p"), StorageUnit(tmp_path / "s")
        units = [pu, su]

        def make(tag, i, n):
            u = pu if tag == "A" else su
            return u.create_volume(f"{tag}{i}", n, TS)
    else:
        def make(tag, i, n):
            return Volume(n, TS, name=f"{tag}{i}")
    trips = [tuple(make(tag, i, sizes[i]) for tag in "ABC") for i in range(n_trip)]
    gm = GlobalMirror(trips, name="gm", max_coordination_time=1.0)
    return gm, trips, units


@pytest.mark.parametrize("seed", range(4))
def test_a_durable_session_gives_the_c_images_of_one_in_memory(tmp_path, seed):
    """The same writes, CG attempts and faults (a prepare, a commit, a drain,
    a link cut) on a session over storage units and on one in memory: after
    every attempt the results, every C's image, every sequence number, every
    write-inhibit and every B's bytes are equal (one path, whatever the
    store)."""
    rng = np.random.default_rng(seed)
    n_trip = 4
    sizes = [int(rng.integers(1, 12)) for _ in range(n_trip)]
    sides = [_unit_or_memory_session(tmp_path / str(d), d, n_trip, sizes) for d in (True, False)]
    outcomes = set()
    try:
        for step in range(12):
            writes = [(int(rng.integers(n_trip)), int(rng.integers(0, 12 * TS)),
                       int(rng.integers(1, 3 * TS)), int(rng.integers(1 << 30)))
                      for _ in range(int(rng.integers(0, 6)))]
            fault = str(rng.choice(["none", "none", "prepare", "commit", "drain", "link"]))
            pick = int(rng.integers(n_trip))
            results = []
            for gm, trips, _ in sides:
                for i, off, length, s in writes:
                    a = trips[i][0]
                    off = off % a.capacity
                    a.write(off, np.random.default_rng(s).integers(
                        0, 256, min(length, a.capacity - off), np.uint8))
                if fault in ("prepare", "commit"):
                    faults.inject(fault, volume=trips[pick][1])
                elif fault == "drain":
                    faults.inject("drain", volume=trips[pick][0])
                elif fault == "link":
                    faults.inject("link", after=pick)
                try:
                    r = gm.form_consistency_group()
                finally:
                    faults.clear()
                results.append((r.sequence, r.committed, r.cause, r.detail, r.bytes_drained))
                gm.link.restore()
                for t in gm.triplets:
                    if t.pair.suspend_reason is not None:
                        t.pair.resume()
                if gm.state.value == "fatal":
                    gm.clear_fatal()
            assert results[0] == results[1], (step, fault)
            outcomes.add(results[0][1])
            (g0, t0, _), (g1, t1, _) = sides
            assert g0.c_sequences == g1.c_sequences
            for (a0, b0, c0), (a1, b1, c1), x0, x1 in zip(t0, t1, g0.triplets, g1.triplets):
                assert np.array_equal(c0.read(0, c0.capacity), c1.read(0, c1.capacity)), c0.name
                assert np.array_equal(b0.array, b1.array), b0.name
                assert (x0.fc.revertible, b0._inhibits, x0.fc.sequence) == \
                    (x1.fc.revertible, b1._inhibits, x1.fc.sequence)
        assert outcomes == {True, False}      # (CGs committed and CGs failed)
    finally:
        faults.clear()
        for gm, trips, units in sides:
            gm.close(discard=True)
            for u in units:
                u.close()


@pytest.mark.parametrize("step", ["prepare", "commit"])
def test_a_store_that_refuses_a_step_leaves_memory_as_it_was(tmp_path, monkeypatch, step):
    """The unit's store refuses the batch of a group's prepares (or commits):
    the whole batch is undone in memory (bitmaps, sequence numbers, revert
    images, write-inhibits as they were before the step), the attempt says
    why, and the next CG commits."""
    from fastfc import NoSpaceError
    with StorageUnit(tmp_path / "p") as pu, StorageUnit(tmp_path / "s") as su:
        trips = _unit_triplets(pu, su, 3)
        gm = GlobalMirror(trips, name="gm", max_coordination_time=1.0)
        assert gm.form_consistency_group().committed
        for a, _, _ in trips:
            a.write(2 * TS, np.full(TS, 9, np.uint8))
        store = trips[0][1].store
        real = store.save_steps
        calls = []

        def refuse(rels, ids, options):
            calls.append(len(rels))
            if len(calls) == (1 if step == "prepare" else 2):
                raise NoSpaceError("injected: the unit's disk is full")
            return real(rels, ids, options)

        monkeypatch.setattr(store, "save_steps", refuse)
        fcs = [t.fc for t in gm.triplets]

        def state():
            return [(fc.sequence, fc.revertible, id(fc.to_copy), id(fc.src_changed),
                     id(fc.tgt_changed), fc._revert_image and tuple(map(id, fc._revert_image[:3])),
                     fc.source._inhibits, fc._cursor) for fc in fcs]

        before = state()
        r = gm.form_consistency_group()
        if step == "prepare":
            assert not r.committed and r.cause.value == "prepare_failed", r
            assert "prepare of B0: NoSpaceError: injected" in r.detail
            assert state() == before                 # every prepare undone
            assert calls == [3]                      # (nothing prepared: nothing reverted)
        else:
            # undone in memory: every one still revertible with the new
            # number, none committed, so the session resolves the CG by
            # reverting each relationship alone (its own step and save)
            assert "commit of B0: NoSpaceError: injected" in r.detail, r
            assert "resolved by revert" in r.detail
            assert not r.committed and gm.state.value == "fatal"
            assert not any(fc.revertible for fc in fcs)
            assert {fc.sequence for fc in fcs} == {before[0][0]}
            assert [x[2:5] for x in state()] == [x[2:5] for x in before]
            gm.clear_fatal()
        for fc in fcs:
            assert fc.source._inhibits == 0
        monkeypatch.setattr(store, "save_steps", real)
        assert gm.form_consistency_group().committed
        gm.close(discard=True)
