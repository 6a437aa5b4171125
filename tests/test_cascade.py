"""Cascaded FlashCopy: a target that is the source of another (S -> T1 -> T2).

T2 holds T1's logical image at T1 -> T2's establish, whatever happens to T1
afterwards: host writes to it, S -> T1's resync, revert or forced withdraw,
a new FlashCopy onto it, background copy on any level. The state machine
drives the engine and the bitmap-free reference model (tests/reference.py,
where every image is its own bytes) through chains built on purpose; the
other tests pin single cases, the copy counts, thin targets and threads.
"""

from __future__ import annotations

import os
import threading

import numpy as np
import pytest
from hypothesis import strategies as st
from hypothesis.stateful import precondition, rule

import reference as ref
from fastfc import (FlashCopy, LimitError, StateError, Volume, WriteInhibitedError,
                    establish_group)
from fastfc.errors import VolumeClosedError
from test_model import FlashCopyModel

GRAIN = 512
#: kills of the unit test's child (tests/cascade_child.py)
KILL_ROUNDS = int(os.environ.get("FASTFC_CASCADE_KILLS", "8"))


def vol(n=8, seed=None, **kw):
    v = Volume(n, 1024, grain_size=GRAIN, **kw)
    if seed is not None:
        v._raw_array()[:] = np.random.default_rng(seed).integers(0, 256, v.capacity,
                                                                 dtype=np.uint8)
    return v


def image(v):
    return v.read(0, v.capacity).tobytes()


def fill(v, offset, n, byte):
    v.write(offset, np.full(n, byte, dtype=np.uint8))


# -- the state machine ----------------------------------------------------------
class CascadeModel(FlashCopyModel):
    """The model test's machine with rules that build and use chains: extend
    a chain from a target, put a new FlashCopy onto a source, and write the
    middle volumes."""

    def chain_ends(self):
        return [i for i, m in enumerate(self.refs) if m.source_rel is not None and m.valid]

    @precondition(lambda self: self.chain_ends())
    @rule(data=st.data(), opts=FlashCopyModel.options)
    def extend_chain(self, data, opts):
        """A target becomes the source of another relationship."""
        s = data.draw(st.sampled_from(self.chain_ends()), label="source")
        shape = (self.refs[s].n_tracks, self.refs[s].track_size)
        free = [i for i, m in enumerate(self.refs) if i != s and m.source_rel is None
                and (m.n_tracks, m.track_size) == shape]
        if free:
            self.do_establish(s, data.draw(st.sampled_from(free), label="target"), opts)

    def sources(self):
        return [i for i, m in enumerate(self.refs) if m.targets and m.source_rel is None]

    @precondition(lambda self: self.sources())
    @rule(data=st.data(), opts=FlashCopyModel.options)
    def flash_onto_a_source(self, data, opts):
        """A source becomes a target (its image changes under its targets)."""
        t = data.draw(st.sampled_from(self.sources()), label="target")
        shape = (self.refs[t].n_tracks, self.refs[t].track_size)
        cands = [i for i, m in enumerate(self.refs) if i != t and m.valid
                 and (m.n_tracks, m.track_size) == shape]
        if cands:
            self.do_establish(data.draw(st.sampled_from(cands), label="source"), t, opts)

    def middles(self):
        return [i for i, m in enumerate(self.refs) if m.targets and m.source_rel is not None]

    @precondition(lambda self: self.middles())
    @rule(data=st.data(), seed=st.integers(0, 2**32))
    def write_middle(self, data, seed):
        self.do_write(data, data.draw(st.sampled_from(self.middles()), label="volume"), seed)

    @precondition(lambda self: self.middles())
    @rule(data=st.data(), revertible=st.booleans())
    def resync_above_a_middle(self, data, revertible):
        i = data.draw(st.sampled_from(self.middles()), label="middle")
        m = self.refs[i].source_rel
        r = next(r for r, x in self.rels if x is m)
        self.both(lambda: r.resync(revertible=revertible),
                  lambda: m.resync(revertible=revertible))


TestCascadeModel = CascadeModel.TestCase


# -- single cases -----------------------------------------------------------------
def test_a_chain_keeps_every_image_through_every_change():
    s, t1, t2, t3 = vol(seed=1), vol(seed=2), vol(seed=3), vol(seed=4)
    a = FlashCopy(s, t1, background_copy=False, record=True)
    img_s0 = image(s)
    fill(s, 0, 700, 1)                       # S changes; T1 keeps S's old image
    b = FlashCopy(t1, t2, background_copy=False, record=True)
    c = FlashCopy(t2, t3, background_copy=False, record=True)
    assert image(t1) == image(t2) == image(t3) == img_s0
    fill(t1, 300, 1000, 2)                   # a middle written (partly, across grains)
    assert image(t2) == image(t3) == img_s0
    img_t1 = image(t1)
    a.resync()                               # T1 takes S's image: T2 keeps its own
    assert image(t1) == image(s) and image(t2) == image(t3) == img_s0
    a.resync(revertible=True)
    a.revert()
    assert image(t1) == image(s)
    b.resync()                               # T2 takes T1's image now; T3 keeps the old
    assert image(t2) == image(s) and image(t3) == img_s0
    fill(s, 2048, 100, 3)
    a.withdraw(force=True)                   # T1 invalid: T2 and T3 keep theirs
    assert not t1.valid and image(t2) != img_t1 and image(t3) == img_s0
    assert image(t2) == image(s)[:2048] + img_s0[2048:2048] + image(t2)[2048:]
    b.copy()
    c.copy()
    assert image(t3) == img_s0


def test_a_host_write_to_the_source_copies_to_the_first_target_only():
    s, t1, t2 = vol(seed=1), vol(seed=2), vol(seed=3)
    FlashCopy(s, t1, background_copy=False)
    FlashCopy(t1, t2, background_copy=False)
    before = (t1.copied_bytes, t2.copied_bytes)
    fill(s, 0, GRAIN, 9)
    # T1's logical image did not change: T2 still reads it through T1 (and S)
    assert (t1.copied_bytes - before[0], t2.copied_bytes - before[1]) == (GRAIN, 0)
    fill(t1, 0, GRAIN, 8)           # now T1's image changes there: T2 takes the old grain
    assert t2.copied_bytes - before[1] == GRAIN


def test_writes_to_a_middle_copy_its_logical_grains_from_above():
    s, t1, t2 = vol(seed=1), vol(seed=2), vol(seed=3)
    FlashCopy(s, t1, background_copy=False)
    FlashCopy(t1, t2, background_copy=False)
    img = image(s)
    fill(t1, 100, 50, 7)            # grain 0 of T1 is still on S: T2 takes S's
    fill(s, 0, 4 * GRAIN, 6)        # S's old grains go to T1 (T2 reads them there)
    assert image(t2) == img
    assert np.array_equal(t2.array[:GRAIN], np.frombuffer(img[:GRAIN], dtype=np.uint8))


def test_flash_onto_a_source_gives_its_targets_what_they_still_need():
    s, t1, t2 = vol(seed=1), vol(seed=2), vol(seed=3)
    b = FlashCopy(t1, t2, background_copy=False, record=True)
    img = image(t1)
    FlashCopy(s, t1, background_copy=False)
    assert image(t1) == image(s) and image(t2) == img
    assert b.tracks_to_copy == 0 and b.src_changed.all()


def test_background_copy_down_a_chain_with_writers():
    s, t1, t2, t3 = vol(64, seed=1), vol(64, seed=2), vol(64, seed=3), vol(64, seed=4)
    a = FlashCopy(s, t1, copy_rate=2e6)
    img = image(s)
    b = FlashCopy(t1, t2, copy_rate=4e6)
    c = FlashCopy(t2, t3)
    stop = threading.Event()
    errors = []

    def writer(v, byte):
        rng = np.random.default_rng(byte)
        try:
            while not stop.is_set():
                off = int(rng.integers(0, v.capacity - 3000))
                fill(v, off, int(rng.integers(1, 3000)), byte)
        except Exception as e:      # noqa: BLE001 - reported below
            errors.append(e)

    def reader(v):
        try:
            while not stop.is_set():
                off = int(np.random.default_rng().integers(0, v.capacity - 5000))
                assert v.read(off, 5000).tobytes() == img[off:off + 5000]
        except Exception as e:      # noqa: BLE001 - reported below
            errors.append(e)

    threads = [threading.Thread(target=writer, args=(v, k)) for k, v in
               ((11, s), (12, t1))] + [threading.Thread(target=reader, args=(t3,))]
    for th in threads:
        th.start()
    try:
        assert c.wait(20) and b.wait(20)
    finally:
        stop.set()
        for th in threads:
            th.join()
    assert not errors
    assert image(t2) == img and image(t3) == img
    assert a.wait(20)


def test_thin_targets_in_a_chain_take_blocks_only_for_what_they_copy(tmp_path):
    from fastfc._core import THIN_CHUNK
    chunk = max(THIN_CHUNK, GRAIN)        # (blocks come in whole chunks on a disk)
    n = 8 * chunk // 1024
    s = vol(n, seed=1)
    t1 = vol(n, path=tmp_path / "t1", thin=True)
    t2 = vol(n, path=tmp_path / "t2", thin=True)
    FlashCopy(s, t1, background_copy=False)
    FlashCopy(t1, t2, background_copy=False)
    img = image(s)
    fill(t1, 10, 10, 1)                 # one grain: T2 takes S's copy through T1
    fill(s, 5 * chunk, GRAIN, 2)        # one grain: T1 takes it, T2 nothing
    assert t2.allocated_bytes <= chunk and t1.allocated_bytes <= 2 * chunk
    assert image(t2) == img


def test_refused_cascades_change_nothing(tmp_path):
    from fastfc import StorageUnit
    s, t1, t2 = vol(seed=1), vol(seed=2), vol(seed=3)
    a = FlashCopy(s, t1, background_copy=False, record=True)
    with pytest.raises(LimitError, match="cycle"):
        FlashCopy(t1, s, background_copy=False)
    b = FlashCopy(t1, t2, background_copy=False, record=True)
    b.resync(revertible=True)                # T1 is write-inhibited: its image is held
    fill(s, 0, 10, 5)
    before = (image(t1), image(t2), a.to_copy.words.tobytes(), b.to_copy.words.tobytes())
    for step in (a.resync, lambda: a.withdraw(force=True)):
        with pytest.raises(WriteInhibitedError):
            step()
        assert (image(t1), image(t2), a.to_copy.words.tobytes(),
                b.to_copy.words.tobytes()) == before
    u, w = vol(seed=5), vol(seed=6)
    c = FlashCopy(u, w, background_copy=False, record=True)
    c.resync(revertible=True)
    with pytest.raises(WriteInhibitedError):
        FlashCopy(vol(seed=4), u)               # onto a source whose image is held
    assert u.target_relationship is None and c.to_copy.all()
    b.commit()
    a.resync()
    assert image(t1) == image(s) and image(t2) == before[1]
    # a unit at durability "power" does not take cascades
    unit = StorageUnit(tmp_path / "unit", durability="power")
    try:
        x, y, z = (unit.create_volume(n, 8, track_size=1024) for n in "xyz")
        FlashCopy(x, y, background_copy=False)
        with pytest.raises(LimitError, match="power"):
            FlashCopy(y, z, background_copy=False)
        assert z.target_relationship is None and y.source_relationships == []
    finally:
        unit.close()


def test_a_cascade_in_a_unit_survives_close_and_reopen(tmp_path):
    """In a unit the chain is recorded as its relationships; reopened, every
    image is as it was, and the background copies (started once the whole
    chain is back) complete with the right bytes."""
    from fastfc import StorageUnit
    unit = StorageUnit(tmp_path / "unit")
    s, t1, t2, t3 = (unit.create_volume(n, 64, track_size=1024) for n in
                     ("s", "t1", "t2", "t3"))
    fill(s, 0, s.capacity, 1)
    a = FlashCopy(s, t1, background_copy=False, record=True)
    fill(s, 0, 5000, 2)
    FlashCopy(t1, t2, background_copy=False, record=True)
    FlashCopy(t2, t3, background_copy=False)
    fill(t1, 4000, 3000, 3)
    a.resync()
    images = [image(v) for v in (s, t1, t2, t3)]
    assert images[2] == images[3] == bytes([1]) * s.capacity
    unit.close()
    unit = StorageUnit(tmp_path / "unit")
    try:
        vols = [unit.volume(n) for n in ("s", "t1", "t2", "t3")]
        assert [image(v) for v in vols] == images
        for v in vols[1:]:
            fc = v.target_relationship
            fc.background_copy = True
            fc.start_background()
            assert fc.wait(20)
        assert [image(v) for v in vols] == images
        assert vols[3].array.tobytes() == images[3]
    finally:
        unit.close()


def test_a_reopened_unit_starts_a_chain_copying_only_once_it_is_whole(tmp_path):
    """The chain's lowest relationship is the unit's first row (established
    first, the cascade built upwards) and still has grains to copy through
    the volumes above: rebuilt first, its background copy must not start
    before the relationships above it are back."""
    from fastfc import StorageUnit
    unit = StorageUnit(tmp_path / "unit")
    s, t1, t2, t3 = (unit.create_volume(n, 256, track_size=1024) for n in
                     ("s", "t1", "t2", "t3"))
    fill(s, 0, s.capacity, 1)
    low = FlashCopy(t2, t3, record=True)         # COPY, recorded as such
    assert low.wait(20)
    mid = FlashCopy(t1, t2, background_copy=False, record=True)
    FlashCopy(s, t1, background_copy=False, record=True)
    low.background_copy = False                  # (no copy in this process)
    mid.resync()                                 # T2 reads through T1, S
    low.resync()                                 # T3 through T2, T1, S
    assert low.to_copy.all()
    expected = image(s)
    assert image(t3) == expected and t3.array.tobytes() != expected
    unit.close()
    unit = StorageUnit(tmp_path / "unit")
    try:
        t3 = unit.volume("t3")
        assert t3.target_relationship.wait(20)
        assert t3.array.tobytes() == expected and image(t3) == expected
    finally:
        unit.close()


def test_a_closed_target_below_refuses_the_change_above():
    s, t1, t2 = vol(seed=1), vol(seed=2), vol(seed=3)
    a = FlashCopy(s, t1, background_copy=False, record=True)
    FlashCopy(t1, t2, background_copy=False)
    fill(s, 0, 10, 1)     # S's grain 0 changed: a resync changes T1's, which T2 needs
    t2.close()
    with pytest.raises(VolumeClosedError):
        a.resync()
    assert a.src_changed.count() == 1 and a.tgt_changed.count() == 0
    assert a.to_copy.count() == s.n_grains - 1


def test_an_invalid_middle_refuses_resync_of_its_targets():
    s, t1, t2 = vol(seed=1), vol(seed=2), vol(seed=3)
    a = FlashCopy(s, t1, background_copy=False)
    b = FlashCopy(t1, t2, background_copy=False, record=True)
    img = image(t1)
    a.withdraw(force=True)
    assert not t1.valid and image(t2) == img
    with pytest.raises(StateError, match="no valid image"):
        b.resync()
    assert image(t2) == img
    b.copy()
    assert image(t2) == img and b.tracks_to_copy == 0


def test_a_global_mirror_c_as_a_flashcopy_source():
    """C of a Global Mirror session may be the source of a FlashCopy: D keeps
    C's image (a consistency group's) while later CGs change C, and the
    session keeps its promise."""
    from test_globalmirror import Session, check_promise
    s = Session(2)
    assert s.cg().committed
    c = s.C[0]
    d = Volume(c.n_tracks, c.track_size)
    fc = FlashCopy(c, d, background_copy=False, record=True)
    held = image(c)
    for k in range(4):
        s.write(0, k, seed=k)
        s.write(1, k + 1, seed=10 + k)
        assert s.cg().committed
        assert image(d) == held
        check_promise(s)
    assert image(c) != held
    fc.resync()                         # D takes C's image of the last CG
    assert image(d) == image(c)
    s.gm.close()
    assert image(d) == image(c)


@pytest.mark.slow
def test_a_cascade_in_a_unit_survives_kills(tmp_path):
    """SIGKILL at random moments of a child working the top of a chain
    (tests/cascade_child.py): reopened, T2 and T3 still hold the image T1
    had when the chain was built, and the chain is whole."""
    import random

    import cascade_child
    from fastfc import StorageUnit
    from test_points_crash import run_points_child

    held = cascade_child.build(tmp_path, seed=7)
    rnd = random.Random(7)
    for round_ in range(KILL_ROUNDS):
        run_points_child(tmp_path, round_, rnd.uniform(0.0, 0.25), child="cascade_child")
        with StorageUnit(tmp_path / "unit") as unit:
            t2, t3 = unit.volume("t2"), unit.volume("t3")
            assert t2.target_relationship.source is unit.volume("t1")
            assert t3.target_relationship.source is t2
            assert image(t2) == held and image(t3) == held, f"round {round_}"


def test_revertible_resync_and_revert_above_a_middle():
    s, t1, t2 = vol(seed=1), vol(seed=2), vol(seed=3)
    a = FlashCopy(s, t1, background_copy=False, record=True)
    b = FlashCopy(t1, t2, background_copy=False, record=True)
    held = image(t1)
    fill(s, 1000, 3000, 4)                   # S changes: T1 (and T2) keep the old image
    a.resync(revertible=True)                # T1 takes S's image, revertibly
    assert image(t1) == image(s) and image(t2) == held
    with pytest.raises(WriteInhibitedError):
        b.reverse_restore()                  # T1 is the target of a revertible one
    a.revert()                               # T1 back to its image; T2 unchanged
    assert image(t1) == held == image(t2)
    a.resync(revertible=True)
    a.commit()
    assert image(t1) == image(s) and image(t2) == held
    b.resync()                               # T2 takes T1's image now
    assert image(t2) == image(s)


def test_reverse_restore_onto_a_middle_volume():
    """R -> S -> T and S -> X: T's image restored onto S (the middle) is S's
    change: R -> S counts it as written on its target, X keeps S's old
    image, R is untouched."""
    r, s, t, x = vol(seed=1), vol(seed=2), vol(seed=3), vol(seed=4)
    above = FlashCopy(r, s, background_copy=False, record=True)
    fc = FlashCopy(s, t, background_copy=False, record=True)
    other = FlashCopy(s, x, background_copy=False)
    old_s, old_r = image(s), image(r)
    fill(t, 2000, 1500, 9)                   # T's image changes (grains copied from R)
    restored = image(t)
    assert fc.reverse_restore() > 0
    assert image(s) == restored and image(x) == old_s and image(r) == old_r
    assert above.tgt_changed.any_range(2000 // GRAIN, (3500 - 1) // GRAIN + 1)
    above.resync()                           # S takes R's image again
    assert image(s) == old_r and image(t) == restored and image(x) == old_s


def test_a_global_mirror_c_on_units_as_a_flashcopy_source(tmpfs_tmp_path):
    """The same on storage units at durability "process": D, in C's unit,
    keeps C's image of one CG through later CGs and a close and reopen of
    both units."""
    from fastfc import GlobalMirror, StorageUnit
    root = tmpfs_tmp_path
    u1, u2 = StorageUnit(root / "a"), StorageUnit(root / "b")
    rng = np.random.default_rng(3)
    try:
        A = [u1.create_volume(f"A{i}", 8, 4096) for i in range(2)]
        B = [u2.create_volume(f"B{i}", 8, 4096) for i in range(2)]
        C = [u2.create_volume(f"C{i}", 8, 4096) for i in range(2)]
        D = u2.create_volume("D", 8, 4096)
        gm = GlobalMirror(list(zip(A, B, C)), name="gm")
        for a in A:
            a.write(0, rng.integers(0, 256, a.capacity, dtype=np.uint8))
        assert gm.form_consistency_group().committed
        FlashCopy(C[0], D, background_copy=False, record=True)
        held = image(C[0])
        for _ in range(4):
            for a in A:
                a.write(int(rng.integers(0, 8)) * 4096, rng.integers(0, 256, 4096,
                                                                    dtype=np.uint8))
            assert gm.form_consistency_group().committed
            assert image(D) == held
        last = [image(a) for a in A]
        assert [image(c) for c in C] == last
    finally:
        u1.close()
        u2.close()
    with StorageUnit(root / "a"), StorageUnit(root / "b") as u2:
        assert image(u2.volume("D")) == held
        assert [image(u2.volume(f"C{i}")) for i in range(2)] == last


def test_a_unit_reopened_without_the_top_of_a_chain_invalidates_what_read_through_it(tmp_path):
    """S's file lost: S -> T1 is not restored and T1, whose grains were on
    S, is invalid; T2 still read through T1 and is invalid too; T3 had
    copied everything and keeps its image."""
    from fastfc import StorageUnit
    unit = StorageUnit(tmp_path / "unit")
    s, t1, t2, t3 = (unit.create_volume(n, 8, track_size=1024) for n in ("s", "t1", "t2", "t3"))
    fill(s, 0, s.capacity, 1)
    FlashCopy(s, t1, background_copy=False)
    FlashCopy(t1, t2, background_copy=False)
    FlashCopy(t1, t3, background_copy=False).copy()
    unit.close()
    (tmp_path / "unit" / "volumes" / "s.vol").unlink()
    with StorageUnit(tmp_path / "unit") as unit:
        assert [unit.volume(n).valid for n in ("t1", "t2", "t3")] == [False, False, True]
        assert image(unit.volume("t3")) == bytes([1]) * s.capacity
        assert any("t2 is invalid" in line for line in unit.recovered)


def test_a_cycle_that_a_group_closes_is_refused():
    """Each relationship of the group is no cycle with those that exist,
    but together they close one (found by the CI profile's model run:
    3 -> 1 and 0 -> 2 exist; a group makes 1 -> 0 and 2 -> 3): refused,
    nothing changed, and the chain stays walkable."""
    v = [Volume(8, 4096, name=f"V{i}") for i in range(5)]
    FlashCopy(v[3], v[1], background_copy=False)
    FlashCopy(v[0], v[2], background_copy=False)
    with pytest.raises(LimitError, match="cycle of FlashCopy relationships with the others"):
        establish_group([(v[1], v[0]), (v[2], v[3])], background_copy=False)
    assert v[0]._tgt_rel is None and v[3]._tgt_rel is None
    assert not v[1]._src_rels and not v[2]._src_rels
    FlashCopy(v[0], v[4], background_copy=False)      # (looped before: a cycle above 0)
    assert v[4].read(0, 10).tobytes() == bytes(10)
