"""Storage units: volumes, FlashCopy relationships, PPRC pairs and Global
Mirror sessions survive close and reopen; an in-memory unit has the same API;
refusals change nothing; damaged metadata or volume files give a clear
CorruptUnitError on open, never silent use of wrong data.

Killed processes are the business of tests/test_crash.py; here a "crash" is
simulated in-process where it is deterministic (an exception out of a fault
action, then closing the unit without resolving anything).
"""

from __future__ import annotations

import os
import shutil
import sqlite3

import numpy as np
import pytest

from fastfc import (CorruptUnitError, FlashCopy, FlashCopyState, GlobalMirror,
                    InvalidImageError, LimitError, PPRCPair, ReadOnlyUnitError, StateError,
                    StorageUnit, UnitClosedError, Volume, VolumeClosedError,
                    WriteInhibitedError, _core, faults)
from fastfc.copyservices.globalmirror import RETRIES
from helpers import image, rand

TS = 512
N = 8


@pytest.fixture
def tmp_path(tmpfs_tmp_path):
    """This module's units live on tmpfs (conftest.tmpfs_tmp_path): none of
    its tests is about the disk, and on a busy disk their fsyncs took most
    of their time."""
    return tmpfs_tmp_path


def track(v: Volume, t: int, seed: int) -> np.ndarray:
    """Overwrite track ``t`` of ``v`` with random bytes; return them."""
    data = rand(v.track_size, seed)
    v.write(t * v.track_size, data)
    return data


@pytest.fixture
def paths(tmp_path):
    return tmp_path / "u1", tmp_path / "u2"


class SimulatedCrash(BaseException):
    """Raised by a fault action: unwinds like a kill would stop the world
    (no FastFCError handler catches it)."""


def crash():
    raise SimulatedCrash()


# ---------------------------------------------------------------------------
# Volumes
# ---------------------------------------------------------------------------

def test_create_and_reopen_keeps_volumes_and_data(tmp_path):
    with StorageUnit(tmp_path / "u") as u:
        a = u.create_volume("a", N, TS)
        b = u.create_volume("big.vol-2", 3, 4096)
        a.write(100, rand(2000, 1))
        b.write(4000, rand(300, 2))
        want = {v.name: image(v) for v in (a, b)}
        assert u.volume("a") is a and "a" in u and "zz" not in u
    assert a.closed and b.closed
    with StorageUnit(tmp_path / "u") as u:
        assert sorted(v.name for v in u.volumes()) == ["a", "big.vol-2"]
        assert (u.volume("a").n_tracks, u.volume("a").track_size) == (N, TS)
        assert (u.volume("big.vol-2").n_tracks, u.volume("big.vol-2").track_size) == (3, 4096)
        for name, data in want.items():
            assert np.array_equal(image(u.volume(name)), data)
        assert u.volume("a").unit is u
        assert u.recovered == []


def test_data_written_without_close_is_in_the_files(tmp_path):
    """Host data lives in shared mappings: another reader of the file sees
    it before any flush or close."""
    u = StorageUnit(tmp_path / "u")
    a = u.create_volume("a", N, TS)
    data = rand(a.capacity, 3)
    a.write(0, data)
    assert np.array_equal(np.fromfile(tmp_path / "u" / "volumes" / "a.vol", np.uint8), data)
    u.close()


def test_in_memory_unit_has_the_same_api():
    with StorageUnit() as u:
        assert u.path is None and not u.store.durable
        s, t = u.create_volume("s", N, TS), u.create_volume("t", N, TS)
        assert isinstance(s, Volume) and s.path is None and s.unit is u
        s.write(0, rand(s.capacity, 1))
        before = image(s)
        fc = FlashCopy(s, t, background_copy=False, record=True)
        s.write(0, rand(TS, 2))
        assert np.array_equal(image(t), before)
        assert u.flashcopies == [fc] and u.pairs == [] and u.sessions == {}
        with pytest.raises(StateError):
            u.remove_volume("s")
        fc.withdraw(force=True)
        u.remove_volume("s")
        assert "s" not in u
        u.flush()
        with StorageUnit() as other:   # in-memory units do not clash
            other.create_volume("s", N, TS)
    assert t.closed
    with pytest.raises(StateError):
        u.create_volume("x", N, TS)
    with pytest.raises(StateError):
        u.volume("t")


@pytest.mark.parametrize("name", ["", "a/b", "../x", ".hidden", "-x", "a b", "a" * 65,
                                  "é", "a\0b", 7, None])
def test_bad_volume_names_are_refused(tmp_path, name):
    with StorageUnit(tmp_path / "u") as u:
        with pytest.raises(ValueError):
            u.create_volume(name, N, TS)
        assert u.volumes() == []
        assert list((tmp_path / "u" / "volumes").iterdir()) == []


def test_duplicate_name_and_bad_geometry_are_refused(tmp_path):
    with StorageUnit(tmp_path / "u") as u:
        a = u.create_volume("a", N, TS)
        a.write(0, rand(TS, 1))
        with pytest.raises(ValueError):
            u.create_volume("a", N, TS)
        with pytest.raises(ValueError):
            u.create_volume("b", N, 1000)          # not a power of two
        with pytest.raises(ValueError):
            u.create_volume("c", 0, TS)
        with pytest.raises(KeyError):
            u.volume("missing")
        assert [v.name for v in u.volumes()] == ["a"]
        assert np.array_equal(a.read(0, TS), rand(TS, 1))
    with StorageUnit(tmp_path / "u") as u:
        assert [v.name for v in u.volumes()] == ["a"]
        assert sorted(p.name for p in (tmp_path / "u" / "volumes").iterdir()) == ["a.vol"]


def test_remove_volume(tmp_path, paths):
    p1, p2 = paths
    with StorageUnit(p1) as u1, StorageUnit(p2) as u2:
        s, t, x = (u1.create_volume(n, N, TS) for n in "stx")
        fc = FlashCopy(s, t, background_copy=False)
        for name in "st":                          # FlashCopy source, target
            with pytest.raises(StateError):
                u1.remove_volume(name)
        b = u2.create_volume("b", N, TS)
        pair = PPRCPair(x, b, background=False)
        with pytest.raises(StateError):
            u1.remove_volume("x")                  # PPRC primary
        with pytest.raises(StateError):
            u2.remove_volume("b")                  # PPRC secondary
        assert {v.name for v in u1.volumes()} == set("stx") and "b" in u2
        with pytest.raises(KeyError):
            u1.remove_volume("nope")
        fc.withdraw(force=True)
        pair.remove()
        u1.remove_volume("s")
        u2.remove_volume("b")
        assert s.closed and not (p1 / "volumes" / "s.vol").exists()
        u1.create_volume("s", 2, TS)               # the name is free again
    with StorageUnit(p1) as u1:
        assert sorted(v.name for v in u1.volumes()) == ["s", "t", "x"]
        assert u1.volume("s").n_tracks == 2
        with pytest.raises(InvalidImageError):     # t was withdrawn uncopied
            image(u1.volume("t"))


# ---------------------------------------------------------------------------
# FlashCopy relationships
# ---------------------------------------------------------------------------

def test_flashcopy_restored_with_bitmaps_sequence_and_virtual_tracks(tmp_path):
    path = tmp_path / "u"
    with StorageUnit(path) as u:
        s, t = u.create_volume("s", N, TS), u.create_volume("t", N, TS)
        s.write(0, rand(s.capacity, 1))
        pit = image(s)
        fc = FlashCopy(s, t, background_copy=False, record=True, sequence=7,
                       inhibit_target_write=False)
        track(s, 2, 10)                            # copy-on-write of track 2
        fc.copy(max_tracks=1)                      # track 0 copied
        track(t, 5, 11)                            # a target write (tgt_changed)
        t5 = t.read(5 * TS, TS)
        to_copy = fc.to_copy.set_indices().tolist()
        src_changed = fc.src_changed.set_indices().tolist()
        s_now = image(s)
    assert to_copy == [1, 3, 4, 6, 7] and src_changed == [2]
    with StorageUnit(path) as u:
        s, t = u.volume("s"), u.volume("t")
        [fc] = u.flashcopies
        assert (fc.source, fc.target) is not None and fc.source is s and fc.target is t
        assert fc.sequence == 7 and fc.record and fc.persistent and not fc.background_copy
        assert fc.state is FlashCopyState.NOCOPY and not fc.revertible
        assert fc.to_copy.set_indices().tolist() == to_copy
        assert fc.src_changed.set_indices().tolist() == src_changed
        assert fc.tgt_changed.set_indices().tolist() == [5]
        assert np.array_equal(image(s), s_now)
        want = pit.copy()
        want[5 * TS:6 * TS] = t5
        # tracks 1, 3, 4, 6, 7 are still virtual: read from the source
        assert np.array_equal(image(t), want)
        assert not t.array[3 * TS:4 * TS].any()
        track(s, 3, 12)                            # copy-on-write still works
        assert np.array_equal(image(t), want)
        assert t.array[3 * TS:4 * TS].any()
        fc.resync()                                # incremental: 2, 3 changed on S, 5 on T
        assert fc.sequence == 8
        assert fc.to_copy.set_indices().tolist() == [1, 2, 3, 4, 5, 6, 7]
        assert np.array_equal(image(t), image(s))


def test_copy_mode_relationship_resumes_background_copy(tmp_path):
    path = tmp_path / "u"
    rate = 2 * TS                                  # 2 tracks/s: most are left at close
    with StorageUnit(path) as u:
        s, t = u.create_volume("s", 64, TS), u.create_volume("t", 64, TS)
        s.write(0, rand(s.capacity, 1))
        pit = image(s)
        fc = FlashCopy(s, t, persistent=True, copy_rate=rate)
        s.write(0, rand(s.capacity, 2))            # every track copied on write
        assert fc.tracks_to_copy == 0
        s2, t2 = u.create_volume("s2", 64, TS), u.create_volume("t2", 64, TS)
        s2.write(0, rand(s2.capacity, 3))
        pit2 = image(s2)
        FlashCopy(s2, t2, persistent=True, copy_rate=rate)
    with StorageUnit(path) as u:
        by_target = {fc.target.name: fc for fc in u.flashcopies}
        assert np.array_equal(image(u.volume("t")), pit)
        assert by_target["t"].state is FlashCopyState.COPIED
        fc2 = by_target["t2"]
        assert fc2.background_copy and fc2.persistent and fc2.copy_rate == rate
        assert fc2.tracks_to_copy > 0
        assert np.array_equal(image(u.volume("t2")), pit2)
        fc2.copy_rate = None                       # the restored worker speeds up
        assert fc2.wait(timeout=30)
        assert fc2.state is FlashCopyState.COPIED
        assert np.array_equal(u.volume("t2").array, pit2)


def test_revertible_relationship_restored_and_resolvable(tmp_path):
    path = tmp_path / "u"
    with StorageUnit(path) as u:
        s, t = u.create_volume("s", N, TS), u.create_volume("t", N, TS)
        s.write(0, rand(s.capacity, 1))
        fc = FlashCopy(s, t, background_copy=False, record=True, sequence=3)
        old = image(t)
        track(s, 4, 2)
        fc.resync(revertible=True, sequence=4)
        new = image(t)
        assert not np.array_equal(old, new)
    for action, want, seq in (("revert", old, 3), ("commit", new, 4)):
        shutil.copytree(path, tmp_path / action)
        with StorageUnit(tmp_path / action) as u:
            [fc] = u.flashcopies
            s = u.volume("s")
            assert fc.revertible and fc.sequence == 4 and fc.state is FlashCopyState.REVERTIBLE
            assert s.write_inhibited
            with pytest.raises(WriteInhibitedError):
                s.write(0, b"x")
            with pytest.raises(StateError):
                fc.copy()
            assert np.array_equal(image(u.volume("t")), new)
            getattr(fc, action)()
            assert not fc.revertible and not s.write_inhibited and fc.sequence == seq
            assert np.array_equal(image(u.volume("t")), want)
        with StorageUnit(tmp_path / action) as u:     # and that stands too
            [fc] = u.flashcopies
            assert not fc.revertible and fc.sequence == seq
            assert np.array_equal(image(u.volume("t")), want)


def test_withdrawn_relationship_is_gone_and_invalid_target_stays_invalid(tmp_path):
    path = tmp_path / "u"
    with StorageUnit(path) as u:
        s, t, t2 = (u.create_volume(n, N, TS) for n in ("s", "t", "t2"))
        s.write(0, rand(s.capacity, 1))
        FlashCopy(s, t, background_copy=False).withdraw(force=True)
        fc2 = FlashCopy(s, t2, background_copy=False)
        fc2.copy()                                 # not persistent: ends by itself
        assert not fc2.active
    with StorageUnit(path) as u:
        assert u.flashcopies == []
        assert not u.volume("t").valid and u.volume("t2").valid
        with pytest.raises(InvalidImageError):
            image(u.volume("t"))
        assert np.array_equal(image(u.volume("t2")), image(u.volume("s")))
        FlashCopy(u.volume("s"), u.volume("t"), background_copy=False)
        assert u.volume("t").valid


def test_flashcopy_across_units_is_refused(paths):
    p1, p2 = paths
    with StorageUnit(p1) as u1, StorageUnit(p2) as u2, StorageUnit() as u3:
        s, t, m = u1.create_volume("s", N, TS), u2.create_volume("t", N, TS), \
            u3.create_volume("m", N, TS)
        for src, tgt in ((s, t), (t, s), (s, m), (m, s), (s, Volume(N, TS))):
            with pytest.raises(LimitError, match="storage unit"):
                FlashCopy(src, tgt)
            assert src.relationships == [] and tgt.relationships == []
        assert u1.flashcopies == [] and u2.flashcopies == []
    with StorageUnit(p1) as u1:
        assert u1.flashcopies == []


# ---------------------------------------------------------------------------
# PPRC pairs
# ---------------------------------------------------------------------------

@pytest.mark.parametrize("mode", ["gcp", "mmir"])
def test_pprc_pair_restored_with_its_out_of_sync_tracks(paths, mode):
    p1, p2 = paths
    with StorageUnit(p1) as u1, StorageUnit(p2) as u2:
        a, b = u1.create_volume("a", N, TS), u2.create_volume("b", N, TS)
        a.write(0, rand(a.capacity, 1))
        pair = PPRCPair(a, b, mode=mode, background=False, name="p")
        pair.drain()
        assert np.array_equal(image(b), image(a))
        pair.suspend("test")
        track(a, 1, 2)
        track(a, 6, 3)
        assert pair.oos.set_indices().tolist() == [1, 6]
        want = image(a)
    with StorageUnit(p2) as u2:                    # the secondary alone
        assert u2.pairs == []
        with pytest.raises(WriteInhibitedError):   # still a PPRC secondary
            u2.volume("b").write(0, b"x")
    with StorageUnit(p1) as u1, StorageUnit(p2) as u2:
        [pair] = u1.pairs
        a, b = u1.volume("a"), u2.volume("b")
        assert pair.primary is a and pair.secondary is b and pair.name == "p"
        assert pair.mode.value == mode and pair.suspend_reason == "test"
        assert pair.oos.set_indices().tolist() == [1, 6]
        with pytest.raises(WriteInhibitedError):
            b.write(0, b"x")
        pair.resume()
        pair.drain()
        assert np.array_equal(image(b), want)
        pair.remove()
    with StorageUnit(p1) as u1, StorageUnit(p2) as u2:
        assert u1.pairs == []
        u2.volume("b").write(0, b"x")              # no longer a secondary


def test_pair_within_one_unit_is_restored_and_mirrors_after_reopen(tmp_path):
    """A pair with both volumes in one unit: the unit is its own partner.
    After close and reopen the pair is back, a Metro Mirror write reaches B,
    and removing the pair frees B."""
    p = tmp_path / "u"
    with StorageUnit(p) as u:
        a, b = u.create_volume("a", N, TS), u.create_volume("b", N, TS)
        a.write(0, rand(a.capacity, 1))
        PPRCPair(a, b, mode="mmir", background=False, name="p").drain()
        assert u.partner_units() == []
    with StorageUnit(p) as u:
        [pair] = u.pairs
        a, b = u.volume("a"), u.volume("b")
        assert pair.primary is a and pair.secondary is b and pair.name == "p"
        assert u.pair_records == [] and u.partner_units() == []
        track(a, 5, 2)                              # synchronous: on B at once
        assert np.array_equal(image(b), image(a))
        with pytest.raises(WriteInhibitedError):
            b.write(0, b"x")
        pair.remove()
    with StorageUnit(p) as u:
        assert u.pairs == [] and u.pair_records == []
        u.volume("b").write(0, b"x")                # no longer a secondary


def test_session_within_one_unit_is_restored_and_runs_after_reopen(tmp_path):
    p = tmp_path / "u"
    with StorageUnit(p) as u:
        a, b, c = (u.create_volume(n, N, TS) for n in "abc")
        a.write(0, rand(a.capacity, 1))
        gm = GlobalMirror([(a, b, c)], name="g", max_coordination_time=1.0)
        assert gm.form_consistency_group().committed
    with StorageUnit(p) as u:
        gm = u.session("g")
        a, c = u.volume("a"), u.volume("c")
        assert [t.a for t in gm.triplets] == [a] and gm.c_sequences == [1]
        track(a, 3, 7)
        res = gm.form_consistency_group()
        assert res.committed and res.sequence == 2
        assert np.array_equal(image(c), image(a))
    with StorageUnit(p) as u:
        gm = u.session("g")
        assert gm.c_sequences == [2]
        gm.close(discard=True)
        assert u.sessions == {} and u.pairs == []
    with StorageUnit(p) as u:
        assert u.sessions == {} and u.pairs == [] and u.flashcopies == []
        u.volume("b").write(0, b"x")


def test_primary_opened_alone_records_host_writes(paths):
    """Writes to a primary whose secondary unit is not open must reach the
    secondary once it is (as with a suspended pair), never be lost."""
    p1, p2 = paths
    with StorageUnit(p1) as u1, StorageUnit(p2) as u2:
        a, b = u1.create_volume("a", N, TS), u2.create_volume("b", N, TS)
        pair = PPRCPair(a, b, background=False)
        pair.drain()
    with StorageUnit(p1) as u1:
        assert u1.pairs == []
        track(u1.volume("a"), 3, 1)
        with pytest.raises(StateError):
            u1.remove_volume("a")                  # still a PPRC primary
        want = image(u1.volume("a"))
    with StorageUnit(p2) as u2, StorageUnit(p1) as u1:
        [pair] = u1.pairs
        assert pair.oos.set_indices().tolist() == [3]
        pair.drain()
        assert np.array_equal(image(u2.volume("b")), want)


# ---------------------------------------------------------------------------
# Global Mirror sessions
# ---------------------------------------------------------------------------

def make_session(p1, p2, n=3, **options):
    u1, u2 = StorageUnit(p1), StorageUnit(p2)
    A = [u1.create_volume(f"A{i}", N, TS) for i in range(n)]
    B = [u2.create_volume(f"B{i}", N, TS) for i in range(n)]
    C = [u2.create_volume(f"C{i}", N, TS) for i in range(n)]
    for i, a in enumerate(A):
        a.write(0, rand(a.capacity, 100 + i))
    options.setdefault("max_coordination_time", 1.0)
    gm = GlobalMirror(list(zip(A, B, C)), name="gm", **options)
    return u1, u2, gm


def a_images(gm):
    return [image(t.a) for t in gm.triplets]


def c_images_of(u2, n=3):
    return [image(u2.volume(f"C{i}")) for i in range(n)]


def assert_images(got, want):
    assert len(got) == len(want)
    for i, (g, w) in enumerate(zip(got, want)):
        assert np.array_equal(g, w), f"C{i} differs"


def test_session_restored_only_when_both_units_are_open(paths):
    p1, p2 = paths
    u1, u2, gm = make_session(p1, p2)
    assert u2.sessions == {"gm": gm} and u1.sessions == {}
    assert gm.form_consistency_group().committed
    track(gm.triplets[1].a, 2, 5)
    assert gm.form_consistency_group().committed
    cg2 = a_images(gm)
    track(gm.triplets[0].a, 0, 6)                  # after the last CG: not on C
    u1.close()
    u2.close()

    with StorageUnit(p2) as u2:                    # the secondary alone
        assert u2.sessions == {}
        with pytest.raises(StateError, match="primary"):
            u2.session("gm")
        with pytest.raises(KeyError):
            u2.session("other")
        assert sorted(fc.sequence for fc in u2.flashcopies) == [2, 2, 2]
        assert_images(c_images_of(u2), cg2)
    seq, images = 2, cg2
    for order in ((p1, p2), (p2, p1)):
        units = [StorageUnit(p) for p in order]
        u1, u2 = (units if order[0] == p1 else units[::-1])
        gm = u2.session("gm")
        assert gm.c_sequences == [seq] * 3 and gm.stats.sequence == seq
        assert [t.a.name for t in gm.triplets] == ["A0", "A1", "A2"]
        assert_images(c_images_of(u2), images)
        res = gm.form_consistency_group()
        seq += 1
        assert res.committed and res.sequence == seq
        images = a_images(gm)
        assert_images(c_images_of(u2), images)
        for u in units:
            u.close()


def test_session_loop_and_close_after_reopen(paths):
    p1, p2 = paths
    u1, u2, gm = make_session(p1, p2, cg_interval=0.001)
    gm.form_consistency_group()
    u1.close()
    u2.close()
    with StorageUnit(p1) as u1, StorageUnit(p2) as u2:
        gm = u2.session("gm")
        assert gm.cg_interval == 0.001 and gm.max_coordination_time == 1.0
        gm.start()
        track(gm.triplets[2].a, 7, 1)
        gm.stop()
        gm.close()                                 # rmgmir: gone for good
        assert u2.sessions == {} and u1.pairs == []
    with StorageUnit(p1) as u1, StorageUnit(p2) as u2:
        assert u2.sessions == {} and u1.pairs == [] and u2.flashcopies == []
        with pytest.raises(KeyError):
            u2.session("gm")


def test_a_session_flashcopy_is_withdrawn_only_by_ending_the_session(paths):
    p1, p2 = paths
    u1, u2, gm = make_session(p1, p2, n=2)
    assert gm.form_consistency_group().committed
    fc = gm.triplets[0].fc
    for force in (False, True):
        with pytest.raises(StateError, match=r"session 'gm'.*GlobalMirror\.close\(\)"):
            fc.withdraw(force=force)
    assert fc.active and u2.volume("C0").target_relationship is fc
    u1.close()
    u2.close()
    with StorageUnit(p1) as u1, StorageUnit(p2) as u2:   # both units open as before
        gm = u2.session("gm")
        assert gm.form_consistency_group().committed
        gm.close()
        assert u2.flashcopies == [] and u1.pairs == []


def _withdraw_behind_the_session(path, c_name):
    """Damaged metadata: the session's row stays, the FlashCopy onto
    ``c_name`` is gone (as a withdraw that bypassed the session left it)."""
    db = sqlite3.connect(path / "unit.db")
    assert db.execute("DELETE FROM flashcopies WHERE target=?", (c_name,)).rowcount == 1
    db.commit()
    db.close()


def test_a_session_whose_flashcopy_is_gone_opens_degraded_and_can_be_removed(paths):
    """A unit opens whatever its metadata says: the session that cannot be
    restored is left unloaded, its problem named with the way to remove it,
    and removing it takes away what is left (pairs, other FlashCopies)."""
    p1, p2 = paths
    u1, u2, gm = make_session(p1, p2, n=3)
    assert gm.form_consistency_group().committed
    u1.close()
    u2.close()
    _withdraw_behind_the_session(p2, "C1")
    for ro in (True, False):                  # the unit alone, read-only too
        with StorageUnit(p2, readonly=ro) as u2:
            assert "C1" in u2.session_problems["gm"]
            assert any("remove_session('gm')" in r for r in u2.recovered)
            assert sorted(v.name for v in u2.volumes()) == ["B0", "B1", "B2",
                                                           "C0", "C1", "C2"]
    with StorageUnit(p1) as u1, StorageUnit(p2) as u2:
        assert u2.sessions == {} and "C1" in u2.session_problems["gm"]
        with pytest.raises(StateError, match=r"cannot be restored: .*C1.*"
                                             r"remove_session\('gm'\)"):
            u2.session("gm")
        assert len(u1.pairs) == 3                 # the pairs are restored, as pairs
        with pytest.raises(KeyError):
            u2.remove_session("other")
        removed = u2.remove_session("gm")
        assert sorted(removed) == ["FlashCopy B0:C0", "FlashCopy B2:C2",
                                   "pair A0:B0", "pair A1:B1", "pair A2:B2"]
        assert u2.session_problems == {} and u1.pairs == [] and u2.flashcopies == []
    with StorageUnit(p1) as u1, StorageUnit(p2) as u2:
        assert u2.recovered == [] and u2.sessions == {} and u2.session_problems == {}
        with pytest.raises(KeyError):
            u2.session("gm")
        for i in range(3):
            u2.volume(f"B{i}").write(0, b"free")    # no longer secondaries


def test_a_session_flashcopy_with_a_missing_bitmap_is_removed_after_its_session(paths):
    """A session's B->C whose bitmap file is gone: the session and the
    FlashCopy are both named; the FlashCopy's row goes only once the session
    is removed, and its C (which read tracks from B) stays invalid."""
    p1, p2 = paths
    u1, u2, gm = make_session(p1, p2, n=2)
    assert gm.form_consistency_group().committed
    u1.close()
    u2.close()
    db = sqlite3.connect(p2 / "unit.db")
    (fid,), = db.execute("SELECT to_copy FROM flashcopies WHERE target='C1'").fetchall()
    db.close()
    (p2 / "bitmaps" / f"{fid}.bm").unlink()
    with StorageUnit(p1) as u1, StorageUnit(p2) as u2:
        assert "C1" in u2.session_problems["gm"]
        assert "bitmap file" in u2.relationship_problems["FlashCopy B1:C1"]
        assert not u2.volume("C1").valid and u2.volume("C0").valid
        with pytest.raises(StateError, match=r"session 'gm'.*remove_session\('gm'\)"):
            u2.remove_flashcopy("B1", "C1")
        u2.remove_session("gm")
        assert u2.remove_flashcopy("B1", "C1") is True
    with StorageUnit(p1) as u1, StorageUnit(p2) as u2:
        assert u2.recovered == [] and u2.relationship_problems == {}
        assert not u2.volume("C1").valid


def test_a_session_whose_pair_is_gone_opens_degraded_and_frees_its_b(paths):
    p1, p2 = paths
    u1, u2, gm = make_session(p1, p2, n=2)
    assert gm.form_consistency_group().committed
    u1.close()
    u2.close()
    db = sqlite3.connect(p1 / "unit.db")
    assert db.execute("DELETE FROM pairs WHERE primary_name='A1'").rowcount == 1
    db.commit()
    db.close()
    with StorageUnit(p2) as u2:                   # alone: it cannot tell yet
        assert u2.session_problems == {}
    with StorageUnit(p1) as u1, StorageUnit(p2) as u2:
        assert u2.session_problems == {"gm": "pair A1:B1 is gone"}
        with pytest.raises(WriteInhibitedError):
            u2.volume("B1").write(0, b"x")
        removed = u2.remove_session("gm")
        assert sorted(removed) == ["FlashCopy B0:C0", "FlashCopy B1:C1", "pair A0:B0",
                                   "the secondary role of B1"]
    with StorageUnit(p2) as u2:
        u2.volume("B1").write(0, b"free")


def test_session_name_is_unique_in_a_unit(paths):
    p1, p2 = paths
    u1, u2, gm = make_session(p1, p2, n=1)
    a, b, c = (u.create_volume(n, N, TS) for u, n in ((u1, "a"), (u2, "b"), (u2, "c")))
    with pytest.raises(ValueError):
        GlobalMirror([(a, b, c)], name="gm")
    assert a._mirror is None and not b._secondary and c.relationships == []
    u1.close()
    u2.close()


@pytest.mark.parametrize("crash_at, outcome", [
    ("before_decision", "revert"),     # prepares recorded, no decision
    ("decision_commit", "commit"),     # decision "commit" recorded, nothing committed
    ("decision_revert", "revert"),     # a prepare failed: decision "revert"
    ("mid_commit", "commit"),          # the first commit done in memory only
])
def test_interrupted_cg_is_resolved_on_open(paths, crash_at, outcome):
    p1, p2 = paths
    u1, u2, gm = make_session(p1, p2)
    assert gm.form_consistency_group().committed
    cg1 = a_images(gm)
    track(gm.triplets[0].a, 1, 1)
    track(gm.triplets[2].a, 5, 2)
    B = [t.b for t in gm.triplets]
    if crash_at == "before_decision":
        def no_decision(*args):
            raise SimulatedCrash()
        u2.store.cg_decision = no_decision
    elif crash_at == "decision_commit":
        faults.inject("decision", action=crash)
    elif crash_at == "decision_revert":
        faults.inject("prepare", B[1])
        faults.inject("decision", action=crash)
    else:
        faults.inject("commit", B[1], action=crash)
    with pytest.raises(SimulatedCrash):
        gm.form_consistency_group()
    cg2 = a_images(gm)
    faults.clear()
    u2.close()
    u1.close()
    with StorageUnit(p2) as u2:
        fcs = sorted(u2.flashcopies, key=lambda fc: fc.target.name)
        assert not any(fc.revertible for fc in fcs)
        want_seq = 2 if outcome == "commit" else 1
        assert [fc.sequence for fc in fcs] == [want_seq] * 3
        assert_images(c_images_of(u2), cg2 if outcome == "commit" else cg1)
        n = 2 if crash_at == "decision_revert" else 3
        verb = "committed" if outcome == "commit" else "reverted"
        if crash_at == "before_decision":
            # prepares and decision may share one commit: then nothing to do
            assert u2.recovered in ([], [f"session gm: CG 2 reverted on 3 of 3 volumes"])
        else:
            assert u2.recovered == [f"session gm: CG 2 {verb} on {n} of 3 volumes"]
        assert not any(u2.volume(f"B{i}").write_inhibited for i in range(3))
    with StorageUnit(p1) as u1, StorageUnit(p2) as u2:
        assert u2.recovered == []
        gm = u2.session("gm")
        # a CG recovery committed counts as the attempt the crash cut short
        assert gm.stats.attempts == gm.stats.successes == gm.stats.sequence == want_seq
        res = gm.form_consistency_group()
        assert res.committed and res.sequence == want_seq + 1
        assert_images(c_images_of(u2), a_images(gm))


def test_decision_record_follows_a_commit_resolved_by_revert(paths):
    """Every commit fails: the session resolves the CG by reverting all, and
    its decision record must say so. A stale "commit" would make a crash
    during the resolution, or a crash of a later attempt reusing the sequence
    number after reopening, commit a CG that was not whole."""
    p1, p2 = paths
    u1, u2, gm = make_session(p1, p2)
    assert gm.form_consistency_group().committed
    cg1 = a_images(gm)
    track(gm.triplets[0].a, 1, 1)
    for t in gm.triplets:
        faults.inject("commit", t.b)
    res = gm.form_consistency_group()
    assert not res.committed and gm.state.value == "fatal"
    assert gm.c_sequences == [1, 1, 1]
    assert u2.store.decision("gm", 2) == "revert"
    assert_images(c_images_of(u2), cg1)
    u1.close()
    u2.close()
    # the sequence number is used again after reopening: an attempt whose
    # prepare fails on B2 crashes before its decision is recorded
    with StorageUnit(p1) as u1, StorageUnit(p2) as u2:
        gm = u2.session("gm")
        faults.inject("prepare", gm.triplets[2].b)

        def no_decision(*args):
            raise SimulatedCrash()
        u2.store.cg_decision = no_decision
        with pytest.raises(SimulatedCrash):
            gm.form_consistency_group()
        assert [t.fc.revertible for t in gm.triplets] == [True, True, False]
    with StorageUnit(p2) as u2:
        assert sorted(fc.sequence for fc in u2.flashcopies) == [1, 1, 1]
        assert_images(c_images_of(u2), cg1)


def test_failure_inside_resolution_crash(paths):
    """Every commit fails, and the resolution (revert all) crashes after the
    first revert: reopening must revert the rest, not commit them."""
    p1, p2 = paths
    u1, u2, gm = make_session(p1, p2)
    assert gm.form_consistency_group().committed
    cg1 = a_images(gm)
    track(gm.triplets[1].a, 1, 1)
    for t in gm.triplets:
        faults.inject("commit", t.b)
    faults.inject("revert", gm.triplets[1].b, action=crash)
    with pytest.raises(SimulatedCrash):
        gm.form_consistency_group()
    assert [t.fc.revertible for t in gm.triplets] == [False, True, True]
    faults.clear()
    u1.close()
    u2.close()
    with StorageUnit(p2) as u2:
        assert sorted(fc.sequence for fc in u2.flashcopies) == [1, 1, 1]
        assert u2.recovered == ["session gm: CG 2 reverted on 2 of 3 volumes"]
        assert_images(c_images_of(u2), cg1)


# ---------------------------------------------------------------------------
# Opening: already open, damaged units
# ---------------------------------------------------------------------------

def test_unit_already_open_in_the_process(tmp_path):
    u = StorageUnit(tmp_path / "u")
    with pytest.raises(StateError, match="already open"):
        StorageUnit(tmp_path / "u")
    with pytest.raises(StateError):
        StorageUnit(str(tmp_path / "u" / ".." / "u"))   # the same directory
    u.close()
    u.close()                                      # idempotent
    StorageUnit(tmp_path / "u").close()


def make_unit(path):
    """A unit with plain volumes, a FlashCopy and a PPRC pair to another unit."""
    other = path.parent / (path.name + "-sec")
    with StorageUnit(path) as u, StorageUnit(other) as o:
        a = u.create_volume("a", N, TS)
        t = u.create_volume("t", N, TS)
        a.write(0, rand(a.capacity, 1))
        FlashCopy(a, t, background_copy=False, record=True)
        PPRCPair(a, o.create_volume("b", N, TS), background=False).drain()
    return other


def bitmap_ids(path, table, cols):
    db = sqlite3.connect(path / "unit.db")
    try:
        rows = db.execute(f"SELECT {', '.join(cols)} FROM {table}").fetchall()
    finally:
        db.close()
    return [i for row in rows for i in row if i is not None]


def assert_corrupt(path, *words):
    with pytest.raises(CorruptUnitError) as info:
        StorageUnit(path)
    msg = str(info.value)
    for w in words:
        assert w in msg, msg
    # a refused open leaves nothing open: trying again refuses the same way
    with pytest.raises(CorruptUnitError):
        StorageUnit(path)
    return msg


def damage_truncate(path, size):
    with open(path / "unit.db", "r+b") as f:
        f.truncate(size)


@pytest.mark.parametrize("cut", [0, 100, 4096, 0.5])
def test_truncated_database(tmp_path, cut):
    path = tmp_path / "u"
    make_unit(path)
    size = os.path.getsize(path / "unit.db")
    damage_truncate(path, int(size * cut) if isinstance(cut, float) else cut)
    bitmaps = sorted(os.listdir(path / "bitmaps"))
    assert_corrupt(path, "unit.db")
    assert sorted(os.listdir(path / "bitmaps")) == bitmaps     # nothing deleted
    assert (path / "volumes" / "a.vol").exists()


@pytest.mark.parametrize("offset", [0, 100, 4096, 8192])
def test_garbage_in_database(tmp_path, offset):
    path = tmp_path / "u"
    make_unit(path)
    with open(path / "unit.db", "r+b") as f:
        f.seek(offset)
        f.write(rand(4096, offset).tobytes())
    assert_corrupt(path, "unit.db")


def test_database_not_a_database_and_wrong_schema(tmp_path):
    path = tmp_path / "u"
    make_unit(path)
    db = sqlite3.connect(path / "unit.db")
    db.execute("UPDATE meta SET value='99' WHERE key='schema'")
    db.commit()
    db.close()
    assert_corrupt(path, "schema")
    (path / "unit.db").write_bytes(b"hello, world\n" * 100)
    assert_corrupt(path, "unit.db")


def test_a_directory_that_is_no_unit_is_refused_and_left_as_it_was(tmp_path):
    """The user's files are never touched: a directory of other files, or
    one holding another program's SQLite database named unit.db, is refused
    (read-write or read-only) and every byte stays; no unit entry is added
    beside them but the lock."""
    d = tmp_path / "d"
    (d / "sub").mkdir(parents=True)
    (d / "important.txt").write_text("x\n")
    (d / "sub" / "deep.txt").write_text("deep\n")

    def tree():
        return {str(p.relative_to(d)): (None if p.is_dir() else p.read_bytes())
                for p in sorted(d.rglob("*")) if p.name != "unit.lock"}

    before = tree()
    for ro in (False, True):
        with pytest.raises(CorruptUnitError, match="unit.db"):
            StorageUnit(d, readonly=ro)
        assert tree() == before
    other = sqlite3.connect(d / "unit.db")                 # not a fastfc database
    other.execute("CREATE TABLE notes(body TEXT)")
    other.execute("INSERT INTO notes VALUES('keep me')")
    other.commit()
    other.close()
    before = tree()
    for ro in (False, True):
        with pytest.raises(CorruptUnitError, match="not a fastfc unit"):
            StorageUnit(d, readonly=ro)
        assert tree() == before
    db = sqlite3.connect(d / "unit.db")
    assert db.execute("PRAGMA journal_mode").fetchone()[0] == "delete"
    assert db.execute("SELECT name FROM sqlite_master").fetchall() == [("notes",)]
    db.close()


def test_missing_database_or_directory_is_a_file(tmp_path):
    path = tmp_path / "u"
    make_unit(path)
    (path / "unit.db").unlink()
    assert_corrupt(path, "unit.db")
    (tmp_path / "f").write_text("x")
    assert_corrupt(tmp_path / "f", "not a directory")


def live_bitmap_files(path):
    """The bitmap files of a closed unit, and the ids its rows name."""
    named = bitmap_ids(path, "flashcopies", ("to_copy", "src_changed", "tgt_changed",
                                             "rv_to_copy", "rv_src_changed", "rv_tgt_changed"))
    named += bitmap_ids(path, "pairs", ("oos", "spare", "cg"))
    return sorted(int(p.stem) for p in (path / "bitmaps").glob("*.bm")), sorted(named)


def assert_clean_reopen(path, other):
    """After the leftovers are removed: both units open with nothing to
    report, and every bitmap file is one a row names."""
    with StorageUnit(path) as u, StorageUnit(other):
        assert u.recovered == [] and u.volume_problems == {}
        assert u.relationship_problems == {} and u.session_problems == {}
    files, named = live_bitmap_files(path)
    assert files == named


def test_missing_volume_file_opens_degraded_and_its_row_can_be_removed(tmp_path):
    """A volume file gone: the unit opens without that volume, naming it and
    the relationship that names it; every other volume and the pair work;
    the relationship's row, then the volume's, are removed."""
    path = tmp_path / "u"
    other = make_unit(path)
    (path / "volumes" / "t.vol").unlink()
    with StorageUnit(path, readonly=True) as r:     # a look opens it too, changing nothing
        assert list(r.volume_problems) == ["t"] and list(r.relationship_problems) == [
            "FlashCopy a:t"]
        with pytest.raises(ReadOnlyUnitError):
            r.remove_flashcopy("a", "t")
        with pytest.raises(ReadOnlyUnitError):
            r.remove_volume("t")
    with StorageUnit(path) as u, StorageUnit(other) as o:
        assert "t" not in u and "t.vol" in u.volume_problems["t"]
        assert "missing" in u.volume_problems["t"]
        assert "'t'" in u.relationship_problems["FlashCopy a:t"]
        assert any("remove_volume('t')" in r for r in u.recovered)
        assert any("remove_flashcopy('a', 't')" in r for r in u.recovered)
        assert u.flashcopies == [] and len(u.pairs) == 1
        a = u.volume("a")
        a.write(0, rand(TS, 7))
        u.pairs[0].drain()                          # the pair works: sent to b
        assert np.array_equal(o.volume("b").read(0, TS), rand(TS, 7))
        with pytest.raises(StateError, match="FlashCopy a:t"):
            u.remove_volume("t")                    # its relationship's row first
        assert u.remove_flashcopy("a", "t") is False
        u.remove_volume("t")
        assert u.volume_problems == {} and u.relationship_problems == {}
    assert_clean_reopen(path, other)


@pytest.mark.parametrize("size", [0, N * TS - 1, N * TS + 1, 2 * N * TS])
def test_volume_file_of_the_wrong_size(tmp_path, size):
    path = tmp_path / "u"
    make_unit(path)
    with open(path / "volumes" / "a.vol", "r+b") as f:
        f.truncate(size)
    assert_corrupt(path, "a.vol", str(size))


@pytest.mark.parametrize("table, cols", [
    ("flashcopies", ("to_copy",)),
    ("flashcopies", ("src_changed", "tgt_changed")),
    ("pairs", ("oos",)),
])
@pytest.mark.parametrize("damage", ["missing", "short", "long"])
def test_damaged_bitmap_file_opens_degraded_and_its_row_can_be_removed(tmp_path, table, cols,
                                                                        damage):
    """A relationship or pair whose bitmap file is missing or of the wrong
    size is left unloaded and named; the rest of the unit works; its row is
    removed (a FlashCopy target whose image was incomplete stays invalid,
    a pair's secondary takes host writes again) and the unit reopens clean."""
    path = tmp_path / "u"
    other = make_unit(path)
    for fid in bitmap_ids(path, table, cols):
        file = path / "bitmaps" / f"{fid}.bm"
        if damage == "missing":
            file.unlink()
        else:
            with open(file, "r+b") as f:
                f.truncate(0 if damage == "short" else 16)
    key = "FlashCopy a:t" if table == "flashcopies" else "pair a:b"
    with StorageUnit(other) as o, StorageUnit(path) as u:
        problem = u.relationship_problems[key]
        assert "bitmap file" in problem
        assert ("missing" if damage == "missing" else "bytes") in problem
        assert list(u.relationship_problems) == [key]
        assert any(r.startswith(key) and "remove_" in r for r in u.recovered)
        a, t, b = u.volume("a"), u.volume("t"), o.volume("b")
        if table == "flashcopies":
            assert u.flashcopies == [] and len(u.pairs) == 1
            assert not t.valid          # it read 8 tracks from a: its image is lost
            with pytest.raises(InvalidImageError):
                t.read(0, TS)
            assert u.remove_flashcopy("a", "t") is True
        else:
            assert u.pairs == [] and len(u.flashcopies) == 1
            assert b._secondary
            u.remove_pair("a", "b")
            assert not b._secondary
            b.write(0, rand(TS, 9))                 # b takes host writes again
        a.write(0, rand(TS, 8))                     # a takes host writes
        assert u.relationship_problems == {}
    assert_clean_reopen(path, other)
    if table == "flashcopies":
        with StorageUnit(path) as u:
            assert not u.volume("t").valid          # recorded invalid


def test_pair_with_a_missing_bitmap_opens_degraded_beside_its_partner(tmp_path):
    path = tmp_path / "u"
    other = make_unit(path)
    for fid in bitmap_ids(path, "pairs", ("oos",)):
        (path / "bitmaps" / f"{fid}.bm").unlink()
    with StorageUnit(other) as o:                   # the secondary opens fine
        with StorageUnit(path) as u:
            assert "bitmap file" in u.relationship_problems["pair a:b"]
            assert o.volume("b")._secondary and u.volume("a").mirror is None
            assert o.secondary_records == []        # u names the pair's damage
            with pytest.raises(KeyError):
                u.remove_pair("b", "a")             # no such damaged pair
            u.remove_pair("a", "b")
        assert not o.volume("b")._secondary
    assert_clean_reopen(path, other)


@pytest.mark.parametrize("table, column", [("flashcopies", "target"),
                                           ("flashcopies", "source"),
                                           ("pairs", "primary_name"),
                                           ("pairs", "secondary_name")])
def test_row_naming_a_missing_volume_opens_degraded(tmp_path, table, column):
    """A relationship or pair row naming a volume the unit (or the partner)
    does not hold is left unloaded and named; its row is removed."""
    path = tmp_path / "u"
    other = make_unit(path)
    db = sqlite3.connect(path / "unit.db")
    db.execute(f"UPDATE {table} SET {column}='ghost'")
    db.commit()
    db.close()
    names = {"target": ("a", "ghost"), "source": ("ghost", "t"),
             "primary_name": ("ghost", "b"), "secondary_name": ("a", "ghost")}[column]
    key = ("FlashCopy " if table == "flashcopies" else "pair ") + ":".join(names)
    with StorageUnit(path) as u, StorageUnit(other) as o:
        assert list(u.relationship_problems) == [key]
        assert "'ghost'" in u.relationship_problems[key]
        u.volume("a").write(0, rand(TS, 5))
        if table == "flashcopies":
            assert u.flashcopies == [] and len(u.pairs) == 1
            # a target that read tracks from a source that is gone is invalid
            assert u.volume("t").valid is (column == "target")
            assert u.remove_flashcopy(*names) is (column == "source")
        else:
            assert u.pairs == [] and len(u.flashcopies) == 1
            u.remove_pair(*names)
            if column == "primary_name":
                assert not o.volume("b")._secondary     # its pair's row is gone
    assert_clean_reopen(path, other)


def test_files_left_by_a_create_that_died(tmp_path):
    """A volume file without its row (create died before the row) or a
    bitmap file no row names (a step died before its commit) are leftovers,
    not damage."""
    path = tmp_path / "u"
    make_unit(path)
    (path / "volumes" / "late.vol").write_bytes(b"\0" * 100)
    (path / "bitmaps" / "999.bm").write_bytes(b"\0" * 8)
    with StorageUnit(path) as u:
        assert "late" not in u
        v = u.create_volume("late", N, TS)
        assert v.capacity == N * TS and not image(v).any()
        assert np.array_equal(image(u.volume("t")), rand(N * TS, 1))


# ---------------------------------------------------------------------------
# One unit of two closed and reopened while the other stays open
# ---------------------------------------------------------------------------

def test_primary_unit_closed_and_reopened_alone(paths):
    p1, p2 = paths
    u1, u2, gm = make_session(p1, p2)
    assert gm.form_consistency_group().committed
    u1.close()
    assert u2.sessions == {}                       # waits for its primary unit again
    with pytest.raises(StateError, match="primary"):
        u2.session("gm")
    u1 = StorageUnit(p1)
    track(u1.volume("A1"), 4, 1)
    gm2 = u2.session("gm")
    assert gm2 is not gm and all(t.a.unit is u1 for t in gm2.triplets)
    res = gm2.form_consistency_group()
    assert res.committed and res.sequence == 2
    assert_images(c_images_of(u2), a_images(gm2))
    u1.close()
    u2.close()


def test_secondary_unit_closed_and_reopened_alone(paths):
    p1, p2 = paths
    u1, u2, gm = make_session(p1, p2)
    assert gm.form_consistency_group().committed
    u2.close()
    assert u1.pairs == []
    track(u1.volume("A0"), 2, 1)                   # recorded while B is away
    u2 = StorageUnit(p2)
    assert [p.secondary.unit for p in u1.pairs] == [u2] * 3
    gm2 = u2.session("gm")
    res = gm2.form_consistency_group()
    assert res.committed and res.sequence == 2
    assert_images(c_images_of(u2), a_images(gm2))
    u1.close()
    u2.close()


def test_pair_secondary_unit_closed_and_reopened_alone(paths):
    p1, p2 = paths
    u1, u2 = StorageUnit(p1), StorageUnit(p2)
    a, b = u1.create_volume("a", N, TS), u2.create_volume("b", N, TS)
    old = PPRCPair(a, b, background=False)
    old.drain()
    u2.close()
    track(a, 6, 1)
    u2 = StorageUnit(p2)
    [pair] = u1.pairs
    assert pair is not old and pair.secondary is u2.volume("b")
    assert pair.oos.set_indices().tolist() == [6]
    pair.drain()
    assert np.array_equal(image(u2.volume("b")), image(a))
    u1.close()
    u2.close()


def test_a_failed_transaction_rolls_back_rows_and_bitmap_bookkeeping(tmp_path):
    """A block that raises inside a store transaction leaves neither rows nor
    the record of which bitmap files rows use changed, so the bitmap pool
    cannot recycle a file that a stored row still names."""
    unit = StorageUnit(tmp_path / "u")
    s, t = unit.create_volume("S", 8, 512), unit.create_volume("T", 8, 512)
    fc = FlashCopy(s, t, record=True, background_copy=False)
    store = unit.store
    rows_before = store.flash_rows()
    used_before = {k: set(v) for k, v in store._row_bitmaps.items()}
    with pytest.raises(RuntimeError):
        with store.transaction():
            fc.resync()                      # a nested save: its own savepoint
            raise RuntimeError("the enclosing step fails")
    assert store.flash_rows() == rows_before
    assert store._row_bitmaps == used_before
    assert not any(store._pool.values())     # nothing was freed for reuse
    unit.close()


def _counted(store) -> dict[int, int]:
    refs: dict[int, int] = {}
    for fids in store._row_bitmaps.values():
        for f in fids:
            refs[f] = refs.get(f, 0) + 1
    return refs


def test_bitmap_reference_counts_follow_rows_through_commits_and_rollbacks(tmp_path):
    """The store counts the rows referencing each bitmap file (a commit then
    frees unreferenced files in O(changed rows), not O(rows)): the counts
    always equal the rows' sets, after commits, a nested savepoint that is
    released, a rollback of an enclosing transaction and a drop."""
    unit = StorageUnit(tmp_path / "u")
    vols = [unit.create_volume(f"v{i}", 8, 512) for i in range(6)]
    store = unit.store
    fcs = [FlashCopy(vols[2 * i], vols[2 * i + 1], record=True, background_copy=False)
           for i in range(3)]
    assert store._refs == _counted(store)
    with store.transaction():
        fcs[0].resync(revertible=True)
        fcs[0].commit()
    assert store._refs == _counted(store)
    used = {k: set(v) for k, v in store._row_bitmaps.items()}
    with pytest.raises(RuntimeError):
        with store.transaction():
            fcs[1].resync(revertible=True)
            with store.transaction():
                fcs[1].revert()
            fcs[2].withdraw(force=True)
            raise RuntimeError("the enclosing step fails")
    assert store._row_bitmaps == used and store._refs == _counted(store)
    fcs[1].resync()
    fcs[0].withdraw(force=True)
    assert store._refs == _counted(store)
    live = set(store._refs)
    assert all((store.bitmap_dir / f"{f}.bm").exists() for f in live)
    unit.close()


def test_nonsense_values_in_a_row_are_corruption(tmp_path):
    path = tmp_path / "u"
    with StorageUnit(path) as unit:
        s, t = unit.create_volume("S", 8, 512), unit.create_volume("T", 8, 512)
        FlashCopy(s, t, record=True, background_copy=False)
    db = sqlite3.connect(path / "unit.db")
    db.execute("UPDATE flashcopies SET options='{not json'")
    db.commit()
    db.close()
    with pytest.raises(CorruptUnitError, match="damaged unit metadata"):
        StorageUnit(path)
    # the failed open left nothing registered: once repaired, the unit opens
    db = sqlite3.connect(path / "unit.db")
    db.execute("""UPDATE flashcopies SET options='{"background_copy": false, "record": true,
                  "persistent": true, "inhibit_target_write": false, "copy_rate": null}'""")
    db.commit()
    db.close()
    with StorageUnit(path) as unit:
        assert len(unit.flashcopies) == 1


def test_an_in_memory_unit_has_no_partner_units():
    with StorageUnit() as u:
        u.create_volume("A", 4, 512)
        assert u.partner_units() == []


def test_a_new_flashcopy_onto_an_invalid_target_keeps_it_valid_after_reopening(tmp_path):
    # rmflash --force left C invalid; a new relationship gives it a valid
    # image again, and the unit must record that (it used to reopen invalid)
    with StorageUnit(tmp_path / "u") as u:
        b, c = u.create_volume("B", 8, 4096), u.create_volume("C", 8, 4096)
        b.write(0, b"image")
        FlashCopy(b, c, background_copy=False).withdraw(force=True)
        assert not c.valid
        FlashCopy(b, c, background_copy=False, record=True)
        assert c.valid
    with StorageUnit(tmp_path / "u") as u:
        c = u.volume("C")
        assert c.valid and c.read(0, 5).tobytes() == b"image"


# -- sessions served to a primary in another process (fastfc.remote) -----------
def _served(path, pairs=(("B0", "C0"), ("B1", "C1"))):
    u = StorageUnit(path)
    for b, c in pairs:
        for name in (b, c):
            if name not in u:
                u.create_volume(name, N, TS)
    return u


def test_serve_session_records_membership_makes_the_journal_and_holds_b(tmp_path):
    with _served(tmp_path / "u") as u:
        assert u.served_sessions() == {}
        assert u.serve_session("gm", [("B0", "C0"), ("B1", "C1")]) == [0, 0]
        assert u.served_sessions() == {"gm": [("B0", "C0"), ("B1", "C1")]}
        fcs = u.served_flashcopies("gm")
        assert [(fc.source.name, fc.target.name, fc.sequence) for fc in fcs] == \
            [("B0", "C0", 0), ("B1", "C1", 0)]
        assert all(fc.record and not fc.background_copy for fc in fcs)
        with pytest.raises(WriteInhibitedError):
            u.volume("B0").write(0, b"host")          # a secondary: PPRC updates only
        # again with the same pairs: found, nothing new
        assert u.serve_session("gm", [("B0", "C0"), ("B1", "C1")]) == [0, 0]
        assert u.served_flashcopies("gm") == fcs
        # the same name with other pairs, volumes in use, missing ones: refused
        u.create_volume("B2", N, TS)
        u.create_volume("C2", N, TS)
        with pytest.raises(ValueError, match="other volumes"):
            u.serve_session("gm", [("B2", "C2")])
        with pytest.raises(ValueError, match="free volumes"):
            u.serve_session("gm2", [("B2", "C2"), ("B0", "C0")])
        with pytest.raises(KeyError, match="nope"):
            u.serve_session("gm2", [("B2", "nope")])
        with pytest.raises(ValueError, match="twice"):
            u.serve_session("gm2", [("B2", "C2"), ("C2", "B2")])
        with pytest.raises(StateError, match="no session"):
            u.served_flashcopies("gm2")
        assert not u.volume("B2").relationships and not u.volume("B2").is_secondary
        assert set(u.served_sessions()) == {"gm"}
    with StorageUnit(tmp_path / "u") as u:       # all of it in unit.db
        assert u.served_sessions() == {"gm": [("B0", "C0"), ("B1", "C1")]}
        assert u.volume("B1").is_secondary
        assert [fc.sequence for fc in u.served_flashcopies("gm")] == [0, 0]
        assert not u.recovered
    with StorageUnit() as m:
        m.create_volume("B", N, TS)
        m.create_volume("C", N, TS)
        with pytest.raises(StateError, match="memory unit"):
            m.serve_session("gm", [("B", "C")])
        assert m.served_sessions() == {}


def test_served_cg_decisions_and_outcomes_are_kept_apart_and_survive_reopening(tmp_path):
    with _served(tmp_path / "u") as u:
        u.serve_session("gm", [("B0", "C0")])
        u.record_cg_decision("gm", 3, "commit")
        u.record_cg_outcome("gm", 2, "revert")
        u.record_cg_outcome("gm", 3, "commit")
        with pytest.raises(ValueError, match="commit' or 'revert"):
            u.record_cg_outcome("gm", 4, "maybe")
        assert u.cg_decisions("gm") == {3: "commit"}
        assert u.cg_outcomes("gm") == {2: "revert", 3: "commit"}
        assert u.cg_outcome("gm", 3) == "commit" and u.cg_outcome("gm", 4) is None
        assert u.cg_decisions("other") == {} and u.cg_outcomes("other") == {}
    with StorageUnit(tmp_path / "u", readonly=True) as u:
        assert u.cg_decisions("gm") == {3: "commit"}
        assert u.cg_outcomes("gm") == {2: "revert", 3: "commit"}
        assert u.served_sessions() == {"gm": [("B0", "C0")]}


def test_restore_served_secondaries_gives_b_its_c_image_and_host_writes(tmp_path):
    with _served(tmp_path / "u") as u:
        u.serve_session("gm", [("B0", "C0"), ("B1", "C1")])
        fcs = u.served_flashcopies("gm")
        b0 = u.volume("B0")
        b0.write_batch(np.array([0], np.int64), np.full((1, TS), 7, np.uint8), _core.PPRC)
        for fc in fcs:                          # CG 1: C holds the 7s
            fc.resync(revertible=True, sequence=1)
            fc.commit()
        b0.write_batch(np.array([0], np.int64), np.full((1, TS), 9, np.uint8), _core.PPRC)
        fcs[0].resync(revertible=True, sequence=2)          # CG 2 in doubt: refused
        with pytest.raises(StateError, match="one settled CG"):
            u.restore_served_secondaries("gm")
        assert b0.is_secondary
        fcs[0].revert()
        assert u.restore_served_secondaries("gm") == ["B0", "B1"]
        assert (b0.read(0, TS) == 7).all() and (u.volume("C0").read(0, TS) == 7).all()
        b0.write(0, b"host")                    # takes host writes now
        assert u.restore_served_secondaries("gm") == []     # again: B left alone
        assert b0.read(0, 4).tobytes() == b"host"
    with StorageUnit(tmp_path / "u") as u:
        assert not u.volume("B0").is_secondary


def test_abandon_lets_go_as_a_crash_would(tmp_path):
    u = _served(tmp_path / "u")
    u.serve_session("gm", [("B0", "C0")])
    fc = u.served_flashcopies("gm")[0]
    fc.resync(revertible=True, sequence=1)      # in doubt, as a crash leaves it
    u.abandon()
    u.abandon()                                 # idempotent
    with pytest.raises(UnitClosedError):
        u.volume("B0")
    with StorageUnit(tmp_path / "u") as again:  # the lock is free; nothing resolved
        fc = again.served_flashcopies("gm")[0]
        assert fc.revertible and fc.sequence == 1


def _write_as_an_earlier_fastfc(path, sessions):
    """The layout an earlier fastfc left: no ``served_sessions`` table, the
    membership in a JSON file beside unit.db."""
    import json
    db = sqlite3.connect(path / "unit.db")
    db.execute("DROP TABLE served_sessions")
    db.commit()
    db.close()
    (path / "remote.sessions.json").write_text(json.dumps(sessions))


def test_a_unit_whose_served_sessions_were_kept_in_a_file_keeps_them(tmp_path):
    path = tmp_path / "u"
    with _served(path) as u:
        u.serve_session("gm", [("B0", "C0"), ("B1", "C1")])
        u.record_cg_outcome("gm", 1, "commit")
    _write_as_an_earlier_fastfc(path, {"gm": [["B0", "C0"], ["B1", "C1"]]})
    # read-only: read from the file, nothing changed
    with StorageUnit(path, readonly=True) as u:
        assert u.served_sessions() == {"gm": [("B0", "C0"), ("B1", "C1")]}
    assert (path / "remote.sessions.json").exists()
    with StorageUnit(path) as u:                 # read-write: moved into unit.db
        assert u.served_sessions() == {"gm": [("B0", "C0"), ("B1", "C1")]}
        assert [fc.target.name for fc in u.served_flashcopies("gm")] == ["C0", "C1"]
        assert u.cg_outcome("gm", 1) == "commit"
        assert u.serve_session("gm", [("B0", "C0"), ("B1", "C1")]) == [0, 0]
    assert not (path / "remote.sessions.json").exists()
    with StorageUnit(path) as u:
        assert u.served_sessions() == {"gm": [("B0", "C0"), ("B1", "C1")]}


def test_a_damaged_served_sessions_file_is_refused_clearly(tmp_path):
    path = tmp_path / "u"
    with _served(path) as u:
        u.serve_session("gm", [("B0", "C0")])
    _write_as_an_earlier_fastfc(path, {})
    (path / "remote.sessions.json").write_text("{not json")
    with pytest.raises(CorruptUnitError, match="remote.sessions.json"):
        StorageUnit(path)
    assert (path / "remote.sessions.json").read_text() == "{not json"
    (path / "remote.sessions.json").write_text('{"gm": [["B0", 5]]}')
    with pytest.raises(CorruptUnitError, match="other than text"):
        StorageUnit(path)


@pytest.mark.parametrize("copy", [False, True])
def test_remove_served_session_frees_its_volumes(tmp_path, copy):
    with _served(tmp_path / "u") as u:
        u.serve_session("gm", [("B0", "C0"), ("B1", "C1")])
        u.record_cg_outcome("gm", 1, "commit")
        u.record_cg_decision("gm", 1, "commit")
        u.volume("B0").write_batch(np.array([0], np.int64), np.full((1, TS), 7, np.uint8),
                                   _core.PPRC)
        fcs = u.served_flashcopies("gm")
        fcs[0].resync(revertible=True, sequence=1)       # CG 1: C0 reads the 7s from B0
        fcs[0].commit()
        fcs[1].resync(revertible=True, sequence=2)
        with pytest.raises(KeyError, match="no session named 'other'"):
            u.remove_served_session("other")
        if copy:
            with pytest.raises(StateError, match="revertible"):
                u.remove_served_session("gm", copy=True)
            assert u.served_sessions() and fcs[1].revertible        # nothing changed
            fcs[1].revert()
        removed = u.remove_served_session("gm", copy=copy)
        assert removed == ["FlashCopy B0:C0", "FlashCopy B1:C1", "the secondary role of B0",
                           "the secondary role of B1"]
        assert u.served_sessions() == {} and u.cg_outcomes("gm") == {}
        assert u.cg_decisions("gm") == {}
        for v in ("B0", "C0", "B1", "C1"):
            assert not u.volume(v).relationships and not u.volume(v).is_secondary
        u.volume("B0").write(0, b"host")
        if copy:
            assert (u.volume("C0").read(0, TS) == 7).all()
        else:
            assert not u.volume("C0").valid
        # free again: the session can be served anew
        assert u.serve_session("gm", [("B0", "C0"), ("B1", "C1")]) == [0, 0]
    with StorageUnit(tmp_path / "u") as u:
        assert u.served_sessions() == {"gm": [("B0", "C0"), ("B1", "C1")]}
