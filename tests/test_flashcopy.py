"""FlashCopy relationships: every operation and every refusal, rule by rule
(SPEC: FlashCopy relationship, Revertible establish).

Relationships are NOCOPY-driven (``background_copy=False``) unless a test is
about the background copy, so that only ``copy()`` and copy-on-write move
tracks. Expected images are plain ``bytes`` taken with ``.array`` (the raw
backing store) before the relationship exists. Every refused call is
checked to leave every volume's raw bytes and every relationship's bitmaps
exactly as they were.
"""

from __future__ import annotations

import time

import numpy as np
import pytest

from fastfc import (FlashCopy, FlashCopyState, IncompleteCopyError, InjectedFault,
                    InvalidImageError, LimitError, StateError, Volume, VolumeClosedError,
                    WriteInhibitedError, establish_group, faults)
from fastfc import TrackBitmap
from fastfc.copyservices.flashcopy import MAX_TARGETS

TS = 512


def rand(n: int, seed: int) -> bytes:
    return np.random.default_rng(seed).integers(0, 256, n, dtype=np.uint8).tobytes()


def vol(n_tracks: int = 8, seed: int | None = 0, track_size: int = TS, **kw) -> Volume:
    """A volume filled with random bytes (zeros when seed is None)."""
    v = Volume(n_tracks, track_size, **kw)
    if seed is not None:
        v._raw_array()[:] = np.frombuffer(rand(v.capacity, seed), dtype=np.uint8)
    return v


def image(v: Volume) -> bytes:
    return v.read(0, v.capacity).tobytes()


def raw(v: Volume) -> bytes:
    return v.array.tobytes()


def bits(bm) -> set[int]:
    return set(bm.set_indices().tolist())


def until(cond, timeout: float = 10.0) -> bool:
    """Poll ``cond`` until it holds or ``timeout`` passes; its last value."""
    deadline = time.monotonic() + timeout
    while not cond() and time.monotonic() < deadline:
        time.sleep(0.001)
    return bool(cond())


def nocopy(s: Volume, t: Volume, **kw) -> FlashCopy:
    return FlashCopy(s, t, background_copy=False, **kw)


def words(bm):
    return None if bm is None else bm.words.tobytes()


def state_of(volumes, rels):
    """Everything about these volumes and relationships that a refused call
    must leave alone."""
    vs = tuple((v.array.tobytes() if not v.closed else None, v._inhibits, v._invalid,
                id(v._tgt_rel), tuple(id(r) for r in v._src_rels)) for v in volumes)
    rs = []
    for r in rels:
        ri = r._revert_image
        rs.append((r.active, r.revertible, r.sequence, words(r.to_copy), words(r.src_changed),
                   words(r.tgt_changed), id(r.to_copy), r._cursor,
                   None if ri is None else (tuple(id(b) for b in ri[:3]), ri[3])))
    return vs, tuple(rs)


def refused(exc, call, volumes, rels):
    """``call`` raises ``exc`` and changes nothing."""
    before = state_of(volumes, rels)
    with pytest.raises(exc):
        call()
    assert state_of(volumes, rels) == before


# ---------------------------------------------------------------------------
# establish
# ---------------------------------------------------------------------------

def test_establish_marks_everything_and_copies_nothing():
    s, t = vol(seed=1), vol(seed=2)
    s_img, t_raw = raw(s), raw(t)
    r = nocopy(s, t)
    assert r.tracks_to_copy == s.n_tracks
    assert bits(r.to_copy) == set(range(s.n_tracks))
    assert raw(t) == t_raw                       # nothing moved
    assert image(t) == s_img                     # but T reads as S at establish
    assert image(s) == s_img
    assert r.state is FlashCopyState.NOCOPY
    assert r.sequence == 0 and not r.revertible and r.active
    assert r.src_changed is None and r.tgt_changed is None
    assert s.relationships == [r] and t.relationships == [r]
    assert r.source is s and r.target is t
    assert "nocopy" in repr(r)


def test_establish_options():
    s = vol()
    r = nocopy(s, vol(), record=True, sequence=41)
    assert r.record and r.persistent                 # record implies persistent
    assert r.sequence == 41
    assert len(r.src_changed) == len(r.tgt_changed) == s.n_tracks
    assert r.src_changed.count() == r.tgt_changed.count() == 0
    r2 = nocopy(s, vol(), persistent=True, inhibit_target_write=True)
    assert r2.persistent and not r2.record and r2.inhibit_target_write
    r3 = FlashCopy(s, vol(), copy_rate=1e9)
    assert r3.background_copy and r3.copy_rate == 1e9
    assert r3.wait(10)
    assert until(lambda: not r3.active)              # non-persistent: it ends itself
    assert s.relationships == [r, r2]


def test_default_options():
    s, t = vol(seed=3), vol(seed=None)
    expect = raw(s)
    r = FlashCopy(s, t)
    assert r.background_copy and not r.record and not r.persistent
    assert not r.inhibit_target_write and r.copy_rate is None
    assert r.wait(10)
    assert raw(t) == expect


@pytest.mark.parametrize("track_size, n_tracks", [(512, 1), (1024, 3), (4096, 70), (65536, 2)])
def test_geometries(track_size, n_tracks):
    s, t = vol(n_tracks, seed=4, track_size=track_size), vol(n_tracks, seed=5, track_size=track_size)
    expect = raw(s)
    r = nocopy(s, t)
    n = min(track_size, s.capacity - track_size // 2)
    s.write(track_size // 2, rand(n, 6))             # crosses a boundary when it can
    assert image(t) == expect
    assert r.copy() >= 0
    assert raw(t) == expect


# ---------------------------------------------------------------------------
# copy-on-write, redirected reads, target writes
# ---------------------------------------------------------------------------

def test_source_write_copies_old_tracks_first():
    s, t = vol(seed=1), vol(seed=2)
    s0, t0 = raw(s), raw(t)
    r = nocopy(s, t, record=True)
    # an unaligned write over tracks 2..4
    off, data = 2 * TS + 100, rand(2 * TS, 9)
    s.write(off, data)
    assert r.tracks_to_copy == s.n_tracks - 3
    assert bits(r.to_copy) == set(range(8)) - {2, 3, 4}
    assert bits(r.src_changed) == {2, 3, 4} and r.tgt_changed.count() == 0
    # T physically holds S's old tracks 2..4, and nothing else changed on T
    tr = raw(t)
    assert tr[2 * TS:5 * TS] == s0[2 * TS:5 * TS]
    assert tr[:2 * TS] == t0[:2 * TS] and tr[5 * TS:] == t0[5 * TS:]
    # S took the write, T still reads as S at establish
    assert image(s) == s0[:off] + data + s0[off + len(data):]
    assert image(t) == s0
    # a second write to the same track copies nothing more
    s.write(2 * TS, rand(10, 10))
    assert raw(t)[2 * TS:5 * TS] == s0[2 * TS:5 * TS]
    assert image(t) == s0


def test_copy_on_write_to_every_target():
    s = vol(seed=1)
    s0 = raw(s)
    targets = [vol(seed=10 + i) for i in range(3)]
    rels = [nocopy(s, t) for t in targets]
    rels[1].copy(max_tracks=3)
    s.write(0, rand(s.capacity, 11))
    for r, t in zip(rels, targets):
        assert r.tracks_to_copy == 0
        assert raw(t) == s0 and image(t) == s0


def test_target_reads_are_redirected_per_track():
    s, t = vol(seed=1), vol(seed=2)
    s0 = raw(s)
    r = nocopy(s, t)
    t.write(3 * TS, rand(TS, 5))                      # track 3 now T's own
    expect = bytearray(s0)
    expect[3 * TS:4 * TS] = rand(TS, 5)
    for off, n in [(0, s.capacity), (3 * TS - 7, 20), (3 * TS + 1, 2 * TS), (TS - 1, 1),
                   (s.capacity - 1, 1), (5, 0)]:
        assert t.read(off, n).tobytes() == bytes(expect[off:off + n])
        out = np.empty(n, dtype=np.uint8)
        t.readinto(off, out)
        assert out.tobytes() == bytes(expect[off:off + n])
    got = t.read_batch([0, 3 * TS - 1, 6 * TS], TS + 2)
    for row, off in zip(got, [0, 3 * TS - 1, 6 * TS]):
        assert row.tobytes() == bytes(expect[off:off + TS + 2])
    assert r.tracks_to_copy == 7


def test_partial_target_write_fetches_the_track_first():
    s, t = vol(seed=1), vol(seed=2)
    s0 = raw(s)
    r = nocopy(s, t, record=True)
    t.write(4 * TS + 10, b"xyz")
    assert bits(r.to_copy) == set(range(8)) - {4}
    assert bits(r.tgt_changed) == {4} and r.src_changed.count() == 0
    expect = bytearray(s0)
    expect[4 * TS + 10:4 * TS + 13] = b"xyz"
    assert image(t) == bytes(expect)
    assert raw(t)[4 * TS:5 * TS] == bytes(expect[4 * TS:5 * TS])   # fetched, then written
    assert raw(s) == s0                                               # S untouched


def test_whole_track_target_write_just_clears_the_bit():
    s, t = vol(seed=1), vol(seed=2)
    s0 = raw(s)
    r = nocopy(s, t, record=True)
    data = rand(2 * TS, 3)
    t.write(5 * TS, data)                             # covers tracks 5 and 6 exactly
    assert bits(r.to_copy) == set(range(8)) - {5, 6}
    assert bits(r.tgt_changed) == {5, 6}
    assert image(t) == s0[:5 * TS] + data + s0[7 * TS:]
    # an unaligned write covering track 1 whole and parts of 0 and 2
    t.write(TS - 1, rand(TS + 2, 4))
    assert bits(r.to_copy) == set(range(8)) - {0, 1, 2, 5, 6}
    exp = bytearray(s0[:5 * TS] + data + s0[7 * TS:])
    exp[TS - 1:2 * TS + 1] = rand(TS + 2, 4)
    assert image(t) == bytes(exp)


def test_target_write_batch_and_zero_length():
    s, t = vol(seed=1), vol(seed=2)
    s0 = raw(s)
    r = nocopy(s, t)
    t.write(TS, b"")                                  # zero length: nothing moves
    assert r.tracks_to_copy == 8 and image(t) == s0
    t.write_batch([1, 2 * TS - 1], np.array([[1, 2], [3, 4]], dtype=np.uint8))
    exp = bytearray(s0)
    exp[1:3] = b"\x01\x02"
    exp[2 * TS - 1:2 * TS + 1] = b"\x03\x04"
    assert image(t) == bytes(exp)
    assert bits(r.to_copy) == set(range(8)) - {0, 1, 2}


def test_inhibit_target_write():
    s, t = vol(seed=1), vol(seed=2)
    s0 = raw(s)
    r = nocopy(s, t, inhibit_target_write=True, persistent=True)
    everything = ([s, t], [r])
    refused(WriteInhibitedError, lambda: t.write(0, b"x"), *everything)
    refused(WriteInhibitedError, lambda: t.write(TS, rand(TS, 1)), *everything)
    refused(WriteInhibitedError, lambda: t.write(0, b""), *everything)
    refused(WriteInhibitedError,
            lambda: t.write_batch([0], np.ones((1, 4), dtype=np.uint8)), *everything)
    assert image(t) == s0
    s.write(0, b"source writes are fine")
    assert image(t) == s0
    r.copy()
    refused(WriteInhibitedError, lambda: t.write(0, b"x"), *everything)
    r.withdraw()
    t.write(0, b"free again")
    assert t.read(0, 10).tobytes() == b"free again"


# ---------------------------------------------------------------------------
# copy(), background copy, wait(), ending by itself
# ---------------------------------------------------------------------------

def test_copy_max_tracks():
    s, t = vol(seed=1), vol(seed=2)
    s0 = raw(s)
    r = nocopy(s, t, persistent=True)
    assert r.copy(0) == 0 and r.tracks_to_copy == 8
    assert r.copy(3) == 3 and r.tracks_to_copy == 5
    s.write(7 * TS, b"cow")                          # COW takes one more
    assert r.tracks_to_copy == 4
    assert r.copy(1) == 1 and r.tracks_to_copy == 3
    assert r.copy() == 3 and r.tracks_to_copy == 0
    assert r.copy() == 0 and r.copy(5) == 0
    assert raw(t) == s0 and image(t) == s0
    assert r.state is FlashCopyState.COPIED and r.active
    with pytest.raises(ValueError):
        r.copy(-1)


def test_copy_skips_tracks_moved_by_host_writes():
    s, t = vol(20, seed=1), vol(20, seed=2)
    s0 = raw(s)
    r = nocopy(s, t, persistent=True)
    assert r.copy(12) == 12
    t.write(16 * TS, rand(4 * TS, 3))                # 16..19 taken by the host
    s.write(15 * TS, b"z")                           # 15 by copy-on-write
    assert r.tracks_to_copy == 3
    assert r.copy() == 3                             # 12, 13, 14
    assert r.tracks_to_copy == 0
    assert image(t) == s0[:16 * TS] + rand(4 * TS, 3)


def test_nocopy_non_persistent_ends_when_copied():
    s, t = vol(seed=1), vol(seed=2)
    s0 = raw(s)
    r = nocopy(s, t)
    assert r.copy(4) == 4 and r.active
    assert r.copy() == 4
    assert not r.active and r.state is FlashCopyState.WITHDRAWN
    assert r.tracks_to_copy == 0
    assert s.relationships == [] and t.relationships == []
    assert t.valid and image(t) == s0
    s.write(0, rand(s.capacity, 2))                  # no copy-on-write any more
    assert raw(t) == s0
    with pytest.raises(StateError):
        r.copy()
    nocopy(t, vol())                                 # T is a plain volume again


def test_persistent_stays_when_copied():
    s, t = vol(seed=1), vol(seed=2)
    r = nocopy(s, t, persistent=True)
    assert r.copy() == 8
    assert r.active and r.state is FlashCopyState.COPIED
    r.withdraw()
    assert not r.active and t.valid


def test_background_copy_and_wait():
    s, t = vol(256, seed=1, track_size=65536), vol(256, seed=None, track_size=65536)
    s0 = raw(s)
    r = FlashCopy(s, t, persistent=True)
    assert r.wait(timeout=30)
    assert r.tracks_to_copy == 0 and r.state is FlashCopyState.COPIED
    assert raw(t) == s0
    assert r.wait(0)


def test_background_copy_non_persistent_ends():
    s, t = vol(64, seed=1, track_size=65536), vol(64, seed=None, track_size=65536)
    s0 = raw(s)
    r = FlashCopy(s, t)
    assert r.wait(timeout=30)
    assert until(lambda: not r.active)               # ends just after the last track
    assert r.state is FlashCopyState.WITHDRAWN
    assert raw(t) == s0 and t.valid and t.relationships == []


def test_background_copy_with_host_writes_keeps_the_image():
    s, t = vol(128, seed=1, track_size=65536), vol(128, seed=2, track_size=65536)
    s0 = raw(s)
    r = FlashCopy(s, t, copy_rate=64 << 20, persistent=True)
    rng = np.random.default_rng(3)
    for _ in range(200):
        off = int(rng.integers(0, s.capacity - 70000))
        s.write(off, rand(int(rng.integers(1, 70000)), int(off)))
    assert image(t) == s0
    assert r.wait(30)
    assert raw(t) == s0


def test_wait_needs_copy_mode():
    r = nocopy(vol(), vol())
    refused(StateError, lambda: r.wait(0), [r.source, r.target], [r])


def test_copy_rate_is_honoured():
    ts = 65536
    s, t = vol(64, seed=1, track_size=ts), vol(64, seed=None, track_size=ts)
    s0 = raw(s)
    r = FlashCopy(s, t, copy_rate=1 << 20, persistent=True)   # 4 MiB at 1 MiB/s
    assert not r.wait(timeout=0.3)                    # did not finish instantly...
    left = r.tracks_to_copy
    assert 0 < left < 64                              # ...but is under way
    assert until(lambda: r.tracks_to_copy < left)     # and keeps going
    assert image(t) == s0
    r.copy()                                          # the caller may hurry it up
    assert r.wait(10) and raw(t) == s0


def test_bad_copy_rate():
    s = vol()
    for rate in (0, -1, float("nan")):
        with pytest.raises(ValueError):
            FlashCopy(s, vol(), copy_rate=rate)
    assert s.relationships == []


# ---------------------------------------------------------------------------
# establish refusals
# ---------------------------------------------------------------------------

def test_at_most_twelve_targets():
    s = vol()
    targets = [vol(seed=None) for _ in range(MAX_TARGETS + 1)]
    rels = [nocopy(s, t) for t in targets[:MAX_TARGETS]]
    assert MAX_TARGETS == 12 and len(s.relationships) == 12
    refused(LimitError, lambda: nocopy(s, targets[-1]), [s, *targets], rels)
    rels[0].withdraw(force=True)
    nocopy(s, targets[-1])                           # room again


def test_target_of_two_refused():
    a, b, t = vol(seed=1), vol(seed=2), vol(seed=3)
    r = nocopy(a, t)
    refused(LimitError, lambda: nocopy(b, t), [a, b, t], [r])
    refused(LimitError, lambda: nocopy(a, t), [a, b, t], [r])


def test_cascade_cycle_refused():
    a, b, c = vol(seed=1), vol(seed=2), vol(seed=3)
    r1 = nocopy(a, b)
    r2 = nocopy(b, c)                                              # a cascade
    refused(LimitError, lambda: nocopy(c, a), [a, b, c], [r1, r2])  # a cycle
    refused(LimitError, lambda: nocopy(b, a), [a, b, c], [r1, r2])


def test_geometry_and_argument_errors():
    s = vol(8)
    others = [vol(7), vol(9), vol(8, track_size=1024), vol(4, track_size=1024)]
    for t in others:
        refused(ValueError, lambda: nocopy(s, t), [s, t], [])
    refused(ValueError, lambda: nocopy(s, s), [s], [])
    with pytest.raises(TypeError):
        FlashCopy(s, np.zeros(s.capacity, dtype=np.uint8))
    with pytest.raises(TypeError):
        FlashCopy("s", s)
    assert s.relationships == []


def test_establish_with_a_closed_volume_refused():
    s, t = vol(), vol()
    t.close()
    refused(VolumeClosedError, lambda: nocopy(s, t), [s, t], [])
    refused(VolumeClosedError, lambda: nocopy(t, s), [s, t], [])


def test_establish_on_inhibited_source_refused():
    s, t1, t2 = vol(seed=1), vol(seed=2), vol(seed=3)
    r = nocopy(s, t1, record=True)
    r.resync(revertible=True)
    refused(StateError, lambda: nocopy(s, t2), [s, t1, t2], [r])


# ---------------------------------------------------------------------------
# incremental resync
# ---------------------------------------------------------------------------

def test_resync_needs_record():
    s, t = vol(seed=1), vol(seed=2)
    r = nocopy(s, t, persistent=True)
    s.write(0, b"x")
    for kw in ({}, {"revertible": True}, {"sequence": 5}):
        refused(StateError, lambda: r.resync(**kw), [s, t], [r])


def test_incremental_resync_copies_only_changed_tracks():
    s, t = vol(16, seed=1), vol(16, seed=2)
    r = nocopy(s, t, record=True, sequence=7)
    assert r.copy() == 16 and r.tracks_to_copy == 0
    s.write(3 * TS + 5, b"abc")                      # track 3
    s.write(9 * TS - 1, b"de")                       # tracks 8 and 9
    t.write(12 * TS, rand(TS, 1))                    # track 12 on the target
    s1 = raw(s)
    assert r.tracks_to_copy == 0
    r.resync()
    assert r.sequence == 8 and not r.revertible
    assert r.tracks_to_copy == 4
    assert bits(r.to_copy) == {3, 8, 9, 12}
    assert r.src_changed.count() == 0 and r.tgt_changed.count() == 0
    assert image(t) == s1
    s.write(0, rand(s.capacity, 2))                  # COW of just those four
    assert image(t) == s1
    assert raw(t) == s1
    assert r.tracks_to_copy == 0
    r.resync(sequence=100)
    assert r.sequence == 100 and r.tracks_to_copy == 16
    assert r.copy() == 16 and raw(t) == raw(s)


def test_resync_with_tracks_still_to_copy_keeps_them():
    s, t = vol(8, seed=1), vol(8, seed=2)
    r = nocopy(s, t, record=True)
    assert r.copy(2) == 2                            # 0, 1 copied; 2..7 still owed
    s.write(0, b"q")                                 # track 0 changed
    r.resync()
    assert bits(r.to_copy) == {0, 2, 3, 4, 5, 6, 7}
    assert image(t) == raw(s)


def test_resync_of_withdrawn_relationship_refused():
    s, t = vol(), vol()
    r = nocopy(s, t, record=True)
    r.copy()
    r.withdraw()
    refused(StateError, r.resync, [s, t], [r])


# ---------------------------------------------------------------------------
# revertible resync, commit, revert
# ---------------------------------------------------------------------------

def revertible_setup(n: int = 8):
    """S -> T with a prior image P on T and a newer image N on S; then
    a revertible resync (T shows N, revert would bring back P)."""
    s, t = vol(n, seed=1), vol(n, seed=2)
    r = nocopy(s, t, record=True, sequence=3)
    r.copy(3)                                        # some tracks physical, some not
    s.write(TS + 7, rand(2 * TS, 3))                 # changes tracks 1..3
    t.write(6 * TS, rand(10, 4))                     # target change on track 6
    prior = image(t)
    r.resync(revertible=True)
    newer = raw(s)
    return s, t, r, prior, newer


def test_revertible_resync_inhibits_and_freezes():
    s, t = vol(8, seed=1), vol(8, seed=2)
    r = nocopy(s, t, record=True, sequence=3)
    r.copy(3)
    s.write(TS + 7, rand(2 * TS, 3))
    t.write(6 * TS, rand(10, 4))
    t_raw = raw(t)
    old_maps = (r.to_copy, r.src_changed, r.tgt_changed)
    r.resync(revertible=True)
    assert r.revertible and r.state is FlashCopyState.REVERTIBLE
    assert r.sequence == 4
    assert s.write_inhibited and not t.write_inhibited
    assert raw(t) == t_raw                           # T not physically touched
    assert image(t) == raw(s)
    assert r._revert_image[:3] == old_maps            # kept by reference
    everything = ([s, t], [r])
    refused(WriteInhibitedError, lambda: s.write(0, b"x"), *everything)
    refused(WriteInhibitedError, lambda: s.write(0, b""), *everything)
    refused(WriteInhibitedError,
            lambda: s.write_batch([0, 100], np.ones((2, 3), dtype=np.uint8)), *everything)
    refused(WriteInhibitedError, lambda: t.write(0, b"x"), *everything)
    refused(WriteInhibitedError, lambda: t.write(5 * TS, rand(TS, 1)), *everything)
    refused(StateError, r.copy, *everything)
    refused(StateError, lambda: r.copy(1), *everything)
    refused(StateError, r.withdraw, *everything)
    refused(StateError, lambda: r.withdraw(force=True), *everything)
    refused(StateError, r.resync, *everything)
    refused(StateError, lambda: r.resync(revertible=True), *everything)
    refused(StateError, r.reverse_restore, *everything)
    # reads go on as normal
    assert s.read(0, 5).tobytes() == raw(s)[:5]


def test_commit_keeps_the_new_image():
    s, t, r, prior, newer = revertible_setup()
    new_maps = (r.to_copy, r.src_changed, r.tgt_changed)
    r.commit()
    assert not r.revertible and r._revert_image is None
    assert (r.to_copy, r.src_changed, r.tgt_changed) == new_maps
    assert r.sequence == 4
    assert not s.write_inhibited
    assert image(t) == newer
    s.write(0, b"after commit")                      # writes flow again, COW too
    t.write(TS * 7, b"t")
    assert image(t)[:TS * 7] == newer[:TS * 7]
    r.copy()
    r.withdraw()
    assert image(t)[:TS * 7] == newer[:TS * 7]


def test_revert_restores_exactly():
    s, t, r, prior, newer = revertible_setup()
    old = r._revert_image
    old_words = tuple(words(b) for b in old[:3])
    r.revert()
    assert not r.revertible and r._revert_image is None
    assert r.sequence == 3
    assert (r.to_copy, r.src_changed, r.tgt_changed) == old[:3]
    assert tuple(words(b) for b in (r.to_copy, r.src_changed, r.tgt_changed)) == old_words
    assert not s.write_inhibited
    assert image(t) == prior
    assert image(s) == newer
    # the old image survives further source writes and a full copy
    s.write(0, rand(s.capacity, 9))
    assert image(t) == prior
    r.copy()
    assert raw(t) == prior


def test_commit_or_revert_when_not_revertible_changes_nothing():
    s, t = vol(seed=1), vol(seed=2)
    r = nocopy(s, t, record=True)
    s.write(0, b"x")
    r2 = nocopy(s, vol(seed=3))
    for rel in (r, r2):
        refused(StateError, rel.commit, [s, t, r2.target], [r, r2])
        refused(StateError, rel.revert, [s, t, r2.target], [r, r2])
    r.resync(revertible=True)
    r.commit()
    refused(StateError, r.commit, [s, t], [r])
    refused(StateError, r.revert, [s, t], [r])
    r.copy()
    r.withdraw()
    refused(StateError, r.commit, [s, t], [r])
    refused(StateError, r.revert, [s, t], [r])


def test_two_revertible_relationships_share_the_inhibit():
    s, t1, t2 = vol(seed=1), vol(seed=2), vol(seed=3)
    r1, r2 = nocopy(s, t1, record=True), nocopy(s, t2, record=True)
    r1.resync(revertible=True)
    r2.resync(revertible=True)
    r1.commit()
    assert s.write_inhibited
    with pytest.raises(WriteInhibitedError):
        s.write(0, b"x")
    r2.revert()
    assert not s.write_inhibited
    s.write(0, b"x")


def test_reads_of_revertible_target_and_source_during_the_window():
    s, t, r, prior, newer = revertible_setup()
    assert image(t) == newer and image(s) == newer
    got = t.read_batch([0, TS - 1, 5 * TS], TS)
    for row, off in zip(got, [0, TS - 1, 5 * TS]):
        assert row.tobytes() == newer[off:off + TS]
    r.revert()
    assert image(t) == prior


# ---------------------------------------------------------------------------
# reverse restore
# ---------------------------------------------------------------------------

def test_reverse_restore_gives_the_source_the_target_image():
    s, t = vol(8, seed=1), vol(8, seed=2)
    r = nocopy(s, t, record=True)
    s0 = raw(s)
    r.copy(4)
    s.write(6 * TS, b"src")                          # track 6 changed on S (COW)
    s.write(TS, b"src")                              # track 1 (already on T)
    t.write(2 * TS + 3, b"tgt")                      # track 2 changed on T
    expect = image(t)
    assert expect == s0[:2 * TS + 3] + b"tgt" + s0[2 * TS + 6:]
    copied = r.reverse_restore()
    assert copied == 3                               # tracks 1, 2, 6 only
    assert image(s) == expect and image(t) == expect
    assert r.src_changed.count() == 0 and r.tgt_changed.count() == 0
    assert r.active and r.tracks_to_copy == 3        # 4, 5, 7 still virtual
    assert r.reverse_restore() == 0                  # nothing changed since


def test_reverse_restore_copies_on_write_to_other_targets():
    s = vol(8, seed=1)
    t, other = vol(8, seed=2), vol(8, seed=3)
    r = nocopy(s, t, record=True)
    s0 = raw(s)
    t.write(0, rand(3 * TS, 4))
    r_other = nocopy(s, other, record=True)          # other's image: S now = s0
    r.reverse_restore()
    assert image(s) == image(t)
    assert image(other) == s0                        # kept its point in time
    assert bits(r_other.src_changed) == {0, 1, 2}    # restore counts as a write
    assert r_other.tracks_to_copy == 5


def test_reverse_restore_refusals():
    s, t = vol(seed=1), vol(seed=2)
    plain = nocopy(s, t, persistent=True)
    t.write(0, b"x")
    refused(StateError, plain.reverse_restore, [s, t], [plain])
    plain.copy()
    plain.withdraw()
    s2, t2 = vol(seed=3), vol(seed=4)
    r = nocopy(s2, t2, record=True)
    r.copy()
    r.withdraw()
    refused(StateError, r.reverse_restore, [s2, t2], [r])


def test_reverse_restore_refused_while_the_source_is_inhibited():
    # Another relationship of the same source is revertible: S must not
    # change, or both its images (new and revert) would change with it.
    s, t1, t2 = vol(2, seed=1), vol(2, seed=2), vol(2, seed=3)
    s.write(0, b"A" * 2 * TS)
    r1 = nocopy(s, t1, record=True)
    s.write(0, b"B" * TS)
    r2 = nocopy(s, t2, record=True)
    r1.resync(revertible=True)
    prior = b"A" * 2 * TS
    newer = image(s)
    t2.write(TS, b"C" * TS)
    refused(WriteInhibitedError, r2.reverse_restore, [s, t1, t2], [r1, r2])
    assert image(t1) == newer
    r1.revert()
    assert image(t1) == prior


# ---------------------------------------------------------------------------
# withdraw
# ---------------------------------------------------------------------------

def test_withdraw_with_tracks_left_needs_force():
    s, t = vol(seed=1), vol(seed=2)
    r = nocopy(s, t, persistent=True)
    r.copy(5)
    refused(IncompleteCopyError, r.withdraw, [s, t], [r])
    refused(IncompleteCopyError, lambda: r.withdraw(force=False), [s, t], [r])
    assert issubclass(IncompleteCopyError, StateError)
    r.withdraw(force=True)
    assert not r.active and r.state is FlashCopyState.WITHDRAWN
    assert not t.valid and s.valid
    for call in (lambda: t.read(0, 1), lambda: t.read(0, 0), lambda: t.read(0, t.capacity),
                 lambda: t.readinto(0, bytearray(4)), lambda: t.read_batch([0], 1)):
        with pytest.raises(InvalidImageError):
            call()
    refused(StateError, r.withdraw, [s, t], [r])
    refused(StateError, lambda: r.withdraw(force=True), [s, t], [r])
    # a new establish onto it gives it a valid image again
    r2 = nocopy(s, t)
    assert t.valid and image(t) == raw(s)
    r2.copy()


def test_withdraw_when_copied():
    s, t = vol(seed=1), vol(seed=2)
    s0 = raw(s)
    r = nocopy(s, t, record=True)
    r.copy()
    r.withdraw()
    assert t.valid and image(t) == s0
    s.write(0, rand(s.capacity, 3))                  # no COW any more
    t.write(0, b"own")
    assert raw(t)[3:] == s0[3:]
    assert s.relationships == [] and t.relationships == []


def test_withdraw_force_when_copied_keeps_target_valid():
    s, t = vol(seed=1), vol(seed=2)
    s0 = raw(s)
    r = nocopy(s, t, persistent=True)
    r.copy()
    r.withdraw(force=True)
    assert t.valid and image(t) == s0


def test_withdraw_in_copy_mode_stops_the_worker():
    s, t = vol(64, seed=1, track_size=65536), vol(64, seed=None, track_size=65536)
    r = FlashCopy(s, t, copy_rate=1 << 20)            # 4 MiB at 1 MiB/s
    assert until(lambda: r.tracks_to_copy < 64)       # the worker is copying
    worker = r._thread
    with pytest.raises(IncompleteCopyError):
        r.withdraw()
    r.withdraw(force=True)
    began = time.monotonic()
    assert r.wait(5) is False                         # it will never complete...
    assert time.monotonic() - began < 1               # ...and wait() says so at once
    left = raw(t)
    worker.join(10)
    assert not worker.is_alive()                      # the worker stopped
    assert raw(t) == left                             # without copying more
    assert not t.valid


# ---------------------------------------------------------------------------
# consistency groups
# ---------------------------------------------------------------------------

def test_establish_group_all_at_one_instant():
    srcs = [vol(seed=i) for i in range(3)]
    tgts = [vol(seed=10 + i) for i in range(3)]
    images = [raw(s) for s in srcs]
    rels = establish_group(list(zip(srcs, tgts)), background_copy=False, record=True,
                           sequence=9)
    assert [r.sequence for r in rels] == [9, 9, 9]
    assert all(r.record and not r.background_copy for r in rels)
    for s in srcs:
        s.write(0, rand(s.capacity, 99))
    for t, img in zip(tgts, images):
        assert image(t) == img
    assert establish_group([]) == []


def test_establish_group_in_copy_mode():
    srcs = [vol(32, seed=i, track_size=4096) for i in range(2)]
    tgts = [vol(32, seed=None, track_size=4096) for _ in range(2)]
    images = [raw(s) for s in srcs]
    rels = establish_group(list(zip(srcs, tgts)), persistent=True)
    for r, t, img in zip(rels, tgts, images):
        assert r.wait(10) and raw(t) == img


@pytest.mark.parametrize("bad", ["geometry", "self", "taken", "twice", "cascade",
                                 "cascade_in_group", "closed", "inhibited", "option"])
def test_establish_group_is_all_or_nothing(bad):
    a, b, c, d = (vol(seed=i) for i in range(4))
    x = vol(seed=5)
    pairs = [(a, b), (c, d)]
    rels = []
    exc = {"geometry": ValueError, "self": ValueError, "taken": LimitError,
           "twice": LimitError, "cascade": LimitError, "cascade_in_group": LimitError,
           "closed": VolumeClosedError, "inhibited": StateError, "option": ValueError}[bad]
    if bad == "geometry":
        pairs.append((x, vol(9)))
    elif bad == "self":
        pairs.append((x, x))
    elif bad == "taken":
        rels.append(nocopy(vol(seed=6), x))
        pairs.append((vol(seed=7), x))
    elif bad == "twice":
        pairs.append((x, b))
    elif bad == "cascade":       # a cycle through a cascade made before
        y = vol(seed=8)
        rels.append(nocopy(x, y))
        pairs.append((y, x))
    elif bad == "cascade_in_group":
        pairs.append((b, x))
    elif bad == "closed":
        y = vol(seed=10)
        y.close()
        pairs.append((x, y))
    elif bad == "inhibited":
        rels.append(nocopy(x, vol(seed=11), record=True))
        rels[-1].resync(revertible=True)
        pairs.append((x, vol(seed=12)))
    volumes = list({id(v): v for p in pairs for v in p}.values())
    kw = {"copy_rate": -5} if bad == "option" else {}
    refused(exc, lambda: establish_group(pairs, background_copy=False, **kw), volumes, rels)
    assert a.relationships == [] and b.relationships == [] and c.relationships == []


def test_establish_group_respects_the_target_limit():
    s = vol()
    existing = [nocopy(s, vol(seed=None)) for _ in range(MAX_TARGETS - 1)]
    t1, t2 = vol(seed=None), vol(seed=None)
    refused(LimitError, lambda: establish_group([(s, t1), (s, t2)], background_copy=False),
            [s, t1, t2], existing)
    establish_group([(s, t1)], background_copy=False)


# ---------------------------------------------------------------------------
# fault injection
# ---------------------------------------------------------------------------

def test_prepare_fault_fails_the_revertible_resync_only():
    s, t = vol(seed=1), vol(seed=2)
    r = nocopy(s, t, record=True)
    s.write(0, b"x")
    faults.inject("prepare", volume=s)
    refused(InjectedFault, lambda: r.resync(revertible=True), [s, t], [r])
    assert not s.write_inhibited and not r.revertible
    assert faults.armed() == []                      # fired once, then disarmed
    faults.inject("prepare", volume=s)
    r.resync()                                       # a plain resync is no prepare
    assert r.sequence == 1 and len(faults.armed()) == 1
    with pytest.raises(InjectedFault):
        r.resync(revertible=True)
    assert r.sequence == 1


def test_commit_and_revert_faults_change_nothing():
    s, t, r, prior, newer = revertible_setup()
    faults.inject("commit", volume=s, times=2)
    refused(InjectedFault, r.commit, [s, t], [r])
    refused(InjectedFault, r.commit, [s, t], [r])
    assert r.revertible and s.write_inhibited and image(t) == newer
    faults.inject("revert", volume=s)
    refused(InjectedFault, r.revert, [s, t], [r])
    assert r.revertible and image(t) == newer
    r.revert()
    assert image(t) == prior and not s.write_inhibited


def test_faults_for_another_volume_do_not_fire():
    s, t, r, prior, newer = revertible_setup()
    other = vol(seed=9)
    faults.inject("commit", volume=other)
    faults.inject("revert", volume=t)                 # the target is not the point
    r.commit()
    assert len(faults.armed()) == 2
    faults.inject("commit")                           # any volume
    r.resync(revertible=True)
    with pytest.raises(InjectedFault):
        r.commit()
    r.commit()


def test_fault_after_a_state_error_is_not_consumed():
    s, t = vol(seed=1), vol(seed=2)
    r = nocopy(s, t, record=True)
    faults.inject("commit", volume=s)
    refused(StateError, r.commit, [s, t], [r])       # not revertible: the check wins
    assert len(faults.armed()) == 1


def test_unknown_fault_point():
    with pytest.raises(ValueError):
        faults.inject("nowhere")
    with pytest.raises(ValueError):
        faults.inject("commit", times=0)


# ---------------------------------------------------------------------------
# closed volumes inside relationships
# ---------------------------------------------------------------------------

def test_source_write_refused_when_a_cow_target_is_closed():
    s, t = vol(seed=1), vol(seed=2)
    r = nocopy(s, t, persistent=True)
    r.copy(2)                                        # tracks 0, 1 on T
    t.close()
    refused(VolumeClosedError, lambda: s.write(2 * TS, b"x"), [s], [r])
    s.write(0, rand(2 * TS, 1))                      # needs no COW: fine


def test_target_read_refused_when_its_source_is_closed():
    s, t = vol(seed=1), vol(seed=2)
    s0 = raw(s)
    r = nocopy(s, t, persistent=True)
    r.copy(2)
    s.close()
    assert t.read(0, 2 * TS).tobytes() == s0[:2 * TS]  # physical tracks still read
    with pytest.raises(VolumeClosedError):
        t.read(0, 3 * TS)
    refused(VolumeClosedError, lambda: t.write(3 * TS + 1, b"x"), [t], [r])
    refused(VolumeClosedError, r.copy, [t], [r])


def test_follow_up_argument_checks():
    """An invalidated target cannot be a source; establish_group takes a
    generator; runs() checks its range at once; batch data must be an array;
    from_bools refuses a scalar."""
    s, t, u = Volume(4, 512), Volume(4, 512), Volume(4, 512)
    FlashCopy(s, t, background_copy=False).withdraw(force=True)
    assert not t.valid
    with pytest.raises(StateError, match="no valid image"):
        FlashCopy(t, u)
    rels = establish_group(((s, v) for v in (u,)), background_copy=False)
    assert len(rels) == 1 and u._tgt_rel is rels[0]
    bm = TrackBitmap(8)
    with pytest.raises(IndexError):
        bm.runs(0, 9)
    with pytest.raises(TypeError):
        s.write_batch([0], [[1, 2]])
    with pytest.raises(ValueError):
        TrackBitmap.from_bools(True)
