"""The batched steps of a consistency group against the per-relationship path.

A secondary group (:class:`~fastfc.copyservices.groups.SecondaryGroup`)
whose store records nothing drains its pairs in one kernel call
(``_core.pprc_drain_many``), prepares, commits and reverts its relationships
in one call each (``prepare_revertible_many``, ``end_revertible_many``) and
closes the CG of every pair in one more (``cg_end_many``). The per-
relationship path is the one every durable store takes and every armed fault
point forces. Here two sessions over identical volumes run the same random
writes, CG attempts and relationship states, one batched and one with its
groups switched to the per-relationship path; after every attempt each
result, every bitmap, sequence number, write-inhibit and every volume's
bytes must be equal.
"""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, strategies as st

from fastfc import GlobalMirror, Volume, _core, faults
from fastfc.copyservices.groups import SecondaryGroup

TS = 512


def _session(n_trip: int, n_tracks: int, batched: bool, decide: str,
             sizes: list[int] | None = None) -> tuple[GlobalMirror, list]:
    trips = []
    for i in range(n_trip):
        n = sizes[i] if sizes else n_tracks
        a, b, c = (Volume(n, TS, name=f"{r}{i}") for r in "ABC")
        a._raw_array()[:] = np.random.default_rng(i).integers(0, 256, a.capacity, np.uint8)
        trips.append((a, b, c))
    gm = GlobalMirror(trips, decide=decide, max_coordination_time=1.0)
    for g in gm.groups:
        assert g._batched            # memory: the batched path
        g._batched = batched
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


def test_an_armed_fault_takes_the_per_relationship_path():
    """A fault at prepare fires for its volume in the batched group too (the
    group hands the step to the per-relationship path), and the CG reverts."""
    gm, trips = _session(4, 8, True, "after_all")
    try:
        faults.inject("prepare", volume=trips[2][1])
        r = gm.form_consistency_group()
        assert not r.committed and "prepare of B2: InjectedFault" in r.detail
        assert all(not t.fc.revertible for t in gm.triplets)
        assert gm.form_consistency_group().committed
    finally:
        faults.clear()
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
