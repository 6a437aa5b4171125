"""The grain: the unit in which the engine records changes and copies, a
power of two from 512 B up to the track (4 KiB by default under larger
tracks). Images are checked against plain byte arrays; the track-level
figures users see (``tracks_to_copy``, ``out_of_sync_tracks``) against the
grains set in the bitmaps."""

from __future__ import annotations

import sqlite3

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fastfc import FlashCopy, LocalLink, PPRCPair, StorageUnit, TrackBitmap, Volume, _core
from fastfc.durable.sqlite import SCHEMA_VERSION

TS = 65536


def test_the_default_grain_is_4_kib_under_larger_tracks_and_the_track_otherwise():
    assert _core.GRAIN == 4096
    for ts, grain in ((512, 512), (4096, 4096), (65536, 4096), (1 << 24, 4096)):
        v = Volume(2, ts)
        assert (v.grain_size, v.n_grains, v.n_tracks) == (grain, 2 * ts // grain, 2)
    v = Volume(3, TS, grain_size=512)
    assert (v.grain_size, v.grain_shift, v.n_grains) == (512, 9, 3 * 128)


@pytest.mark.parametrize("grain, why", [
    (TS * 2, "grain_size must be a power of two from 512 to the track size"),
    (256, "grain_size must be a power of two from 512"),
    (3000, "grain_size must be a power of two"),
])
def test_a_grain_that_does_not_divide_the_track_is_refused(grain, why):
    with pytest.raises(ValueError, match=why):
        Volume(2, TS, grain_size=grain)
    with pytest.raises(TypeError, match="grain_size must be an integer"):
        Volume(2, TS, grain_size=4096.0)


def test_volumes_of_different_grains_do_not_pair():
    a, b = Volume(4, TS, grain_size=4096), Volume(4, TS, grain_size=8192)
    with pytest.raises(ValueError, match="differ in grain"):
        FlashCopy(a, b)
    with pytest.raises(ValueError, match="differ in grain"):
        PPRCPair(a, b, LocalLink())
    assert a.relationships == [] and b.mirror is None and not b.is_secondary


def test_a_small_write_copies_its_grain_and_the_track_stays_owed():
    """Copy-on-write moves the grains a write touches; the track they are
    in still counts as to copy until its last grain is on the target."""
    s, t = Volume(4, TS, name="s"), Volume(4, TS, name="t")
    before = np.random.default_rng(1).integers(0, 256, s.capacity, dtype=np.uint8)
    s._raw_array()[:] = before
    fc = FlashCopy(s, t, background_copy=False)
    s.write(TS + 4096 + 10, np.full(4096, 7, np.uint8))      # grains 17 and 18
    assert t.copied_bytes == 2 * 4096
    assert fc.tracks_to_copy == 4 and fc.to_copy.count() == 4 * 16 - 2
    assert np.array_equal(t.read(0, t.capacity), before)     # the image of the establish
    t.write(2 * TS + 100, b"x")                              # a partial target write
    assert t.copied_bytes == 3 * 4096                        # fetched one grain only
    assert fc.copy(1) == 1 and fc.tracks_to_copy == 3        # track 0, whole
    assert fc.copy() == 3                                    # 14 + 15 + 16 grains, rounded up
    want = before.copy()
    want[2 * TS + 100] = ord("x")
    assert np.array_equal(t.array, want) and t.copied_bytes == t.capacity


def test_out_of_sync_counts_tracks_with_any_grain_owed():
    a, b = Volume(4, TS, name="a"), Volume(4, TS, name="b")
    pair = PPRCPair(a, b, LocalLink(), mode="gcp", initial_copy=False, background=False)
    a.write(0, b"1")
    a.write(TS - 1, b"22")            # the last grain of track 0, the first of 1
    a.write(3 * TS + 8192, b"3")
    assert pair.oos.count() == 4 and pair.out_of_sync_tracks == 3
    assert pair.drain() == 4 * 4096   # the grains, not the tracks
    assert pair.out_of_sync_tracks == 0
    assert np.array_equal(b.array, a.array)


def _groups_model(bits: list[bool], group: int) -> list[bool]:
    return [any(bits[i:i + group]) for i in range(0, len(bits), group)]


def _bits(n: int) -> st.SearchStrategy[list[bool]]:
    """``n`` bits, sparse, dense or random: a few draws each (a list of
    ``n`` booleans drawn one by one costs thousands of draws at n = 3,072)."""
    def at(positions: set[int], value: bool) -> list[bool]:
        return [(i in positions) == value for i in range(n)]
    positions = st.sets(st.integers(0, n - 1), max_size=min(n, 40))
    return st.one_of(
        positions.map(lambda p: at(p, True)),          # a few bits set
        positions.map(lambda p: at(p, False)),         # all but a few
        st.binary(min_size=(n + 7) // 8, max_size=(n + 7) // 8).map(
            lambda b: np.unpackbits(np.frombuffer(b, np.uint8))[:n].astype(bool).tolist()))


@settings(max_examples=min(200, settings.default.max_examples), deadline=None)
@given(group=st.sampled_from([1, 2, 4, 16, 32, 64, 128, 256]), data=st.data())
def test_group_counts_and_conversions_match_a_list_of_bools(group, data):
    n = group * data.draw(st.integers(1, 12), label="groups")
    bits = data.draw(_bits(n), label="bits")
    bm = TrackBitmap.from_bools(np.array(bits))
    groups = _groups_model(bits, group)
    assert bm.count_groups(group) == sum(groups)
    assert bm.any_groups(group).to_bools().tolist() == groups
    spread = bm.any_groups(group).spread(group)
    assert spread.to_bools().tolist() == [g for g in groups for _ in range(group)]
    assert TrackBitmap.from_bools(np.array(groups)).spread(group) == spread


def test_group_sizes_that_are_not_powers_of_two_are_refused():
    bm = TrackBitmap(64)
    for call in (bm.count_groups, bm.any_groups, bm.spread):
        with pytest.raises(ValueError, match="group must be a power of two"):
            call(3)


def test_a_unit_records_the_grain_and_reopens_with_it(tmp_path):
    with StorageUnit(tmp_path / "u") as u:
        s = u.create_volume("S", 4, TS)
        t = u.create_volume("T", 4, TS, grain_size=TS)
        w = u.create_volume("W", 4, TS)
        assert (s.grain_size, t.grain_size) == (4096, TS)
        fc = FlashCopy(s, w, background_copy=False, record=True)
        s.write(100, b"abc")
        assert fc.to_copy.count() == 4 * 16 - 1
    with StorageUnit(tmp_path / "u") as u:
        assert (u.volume("S").grain_size, u.volume("T").grain_size) == (4096, TS)
        fc = u.flashcopies[0]
        assert fc.to_copy.count() == 4 * 16 - 1 and fc.tracks_to_copy == 4
        assert u.volume("W").read(0, 8).tobytes() == bytes(8)


def test_a_unit_from_before_grains_keeps_a_grain_of_the_track(tmp_path):
    """A unit made before grains (schema 2, no grain column, bitmap files of
    a bit per track) opens with each volume's grain equal to its track, its
    relationships and pairs as they were; the first read-write open records
    the current schema and leaves the grains unrecorded (the track)."""
    path = tmp_path / "u"
    with StorageUnit(path) as u:
        vols = {n: u.create_volume(n, 8, TS, grain_size=TS) for n in ("S", "T", "P")}
        vols["S"].write(0, np.full(TS, 5, np.uint8))
        FlashCopy(vols["S"], vols["T"], background_copy=False, record=True)
        vols["S"].write(3 * TS + 1, b"new")          # copy-on-write of track 3
    db = sqlite3.connect(path / "unit.db")
    db.execute("ALTER TABLE volumes DROP COLUMN grain_size")
    db.execute("UPDATE meta SET value='2' WHERE key='schema'")
    db.commit()
    db.close()
    with StorageUnit(path, readonly=True) as u:
        assert u.volume("S").grain_size == TS and u.flashcopies[0].tracks_to_copy == 7
    with StorageUnit(path) as u:
        s, t = u.volume("S"), u.volume("T")
        assert (s.grain_size, t.grain_size, s.n_grains) == (TS, TS, 8)
        fc = u.flashcopies[0]
        assert fc.tracks_to_copy == 7 and fc.to_copy.count() == 7
        assert t.read(0, TS).tobytes() == bytes([5]) * TS
        assert t.read(3 * TS, 8).tobytes() == bytes(8)
        s.write(5 * TS + 7, b"x")                     # a whole track, as before
        assert t.copied_bytes == TS
    db = sqlite3.connect(path / "unit.db")
    assert db.execute("SELECT value FROM meta WHERE key='schema'").fetchone() == (
        str(SCHEMA_VERSION),)
    assert db.execute("SELECT grain_size FROM volumes").fetchall() == [(None,)] * 3
    db.close()


def test_a_thin_volume_reserves_the_grains_it_takes(tmp_path):
    """On tmpfs a thin volume's blocks are reserved per grain: a 4 KiB write
    into a 64 KiB track takes 4 KiB of the filesystem, not 64 KiB."""
    import tempfile
    with tempfile.TemporaryDirectory(dir="/dev/shm") as d:
        v = Volume(8, TS, path=f"{d}/v", thin=True)
        assert (v.allocated_tracks, v.allocated_bytes) == (0, 0)
        v.write(TS + 4096, np.full(4096, 1, np.uint8))
        assert (v.allocated_tracks, v.allocated_bytes) == (1, 4096)
        v.close()
        import os
        assert os.stat(f"{d}/v").st_blocks * 512 == 4096
