"""Volumes: construction, file backing, and the host I/O path on its own
(no relationships). Every refused call must leave the raw array untouched."""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

import numpy as np
import pytest

from fastfc import Volume, VolumeClosedError
from fastfc.storage.volume import DEFAULT_TRACK, MAX_TRACK, MIN_TRACK

GEOMETRIES = [(1, 512), (3, 512), (5, 1024), (2, 4096), (4, 65536)]


def rand_bytes(n: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, n, dtype=np.uint8)


def filled(n_tracks: int, track_size: int, seed: int = 0, **kw) -> tuple[Volume, bytearray]:
    """A volume holding random bytes, and a bytearray holding the same."""
    v = Volume(n_tracks, track_size, **kw)
    data = rand_bytes(v.capacity, seed)
    v._raw_array()[:] = data
    return v, bytearray(data.tobytes())


def io_spans(capacity: int, track_size: int) -> list[tuple[int, int]]:
    """(offset, length) pairs: aligned, unaligned, crossing track
    boundaries, zero length, the whole volume, the very last byte."""
    spans = {(0, 0), (0, 1), (0, capacity), (capacity, 0), (capacity - 1, 1),
             (1, capacity - 1), (0, track_size), (track_size - 1, 2)}
    if capacity > track_size:
        spans |= {(track_size, track_size), (track_size - 3, track_size + 7),
                  (track_size + 5, capacity - track_size - 5), (track_size, 0)}
    rng = np.random.default_rng(capacity)
    for _ in range(12):
        a = int(rng.integers(0, capacity + 1))
        spans.add((a, int(rng.integers(0, capacity - a + 1))))
    return sorted((a, n) for a, n in spans if 0 <= a and 0 <= n and a + n <= capacity)


# ---------------------------------------------------------------------------
# construction
# ---------------------------------------------------------------------------

@pytest.mark.parametrize("n_tracks, track_size", GEOMETRIES)
def test_in_memory_volume(n_tracks, track_size):
    v = Volume(n_tracks, track_size)
    assert v.n_tracks == n_tracks
    assert v.track_size == track_size
    assert v.capacity == n_tracks * track_size
    arr = v.array
    assert arr.dtype == np.uint8 and arr.shape == (v.capacity,)
    assert arr.flags.c_contiguous and not arr.any()
    assert not v.closed and v.valid and not v.write_inhibited
    assert v.relationships == []
    assert not v.read(0, v.capacity).any()


def test_default_track_size_is_64k():
    v = Volume(2)
    assert v.track_size == DEFAULT_TRACK == 65536
    assert v.capacity == 2 * 65536


@pytest.mark.parametrize("track_size", [MIN_TRACK, 1 << 10, 1 << 20, MAX_TRACK])
def test_track_size_range_edges_accepted(track_size):
    v = Volume(1, track_size)
    assert v.track_size == track_size and v.capacity == track_size


@pytest.mark.parametrize("track_size", [0, 1, 256, MIN_TRACK - 1, 513, 768, 3000, 65535,
                                        65537, MAX_TRACK * 2, MAX_TRACK + 512, -512])
def test_bad_track_size_is_refused(track_size):
    with pytest.raises(ValueError):
        Volume(1, track_size)


@pytest.mark.parametrize("n_tracks", [0, -1, -100])
def test_bad_track_count_is_refused(n_tracks):
    with pytest.raises(ValueError):
        Volume(n_tracks, 512)


@pytest.mark.parametrize("args", [(1.0, 512), ("4", 512), (None, 512), (True, 512),
                                  (4, 512.0), (4, "512"), (4, None), (4, False)])
def test_non_integer_geometry_is_refused(args):
    with pytest.raises(TypeError):
        Volume(*args)


def test_numpy_integers_are_accepted():
    v = Volume(np.int64(3), np.int32(1024))
    assert (v.n_tracks, v.track_size) == (3, 1024)
    assert type(v.n_tracks) is int


def test_names_and_repr():
    a = Volume(2, 512, name="alpha")
    b = Volume(2, 512)
    assert a.name == "alpha" and "alpha" in repr(a)
    assert b.name and b.name != a.name
    assert a.vid != b.vid
    a.close()
    assert "closed" in repr(a)


# ---------------------------------------------------------------------------
# file-backed volumes
# ---------------------------------------------------------------------------

@pytest.mark.parametrize("n_tracks, track_size", [(1, 512), (3, 4096)])
def test_file_backed_volume_keeps_data_across_reopen(tmp_path, n_tracks, track_size):
    path = tmp_path / "vol.img"
    v = Volume(n_tracks, track_size, path=path)
    assert path.exists() and path.stat().st_size == v.capacity
    assert not v.array.flags.writeable
    assert not v.read(0, v.capacity).any()
    data = rand_bytes(v.capacity, 4)
    v.write(0, data)
    v.write(7, b"hello")
    data[7:12] = np.frombuffer(b"hello", dtype=np.uint8)
    v.close()
    assert v.closed
    assert path.read_bytes() == data.tobytes()
    w = Volume(n_tracks, track_size, path=str(path))
    assert w.name == "vol"
    assert np.array_equal(w.read(0, w.capacity), data)
    w.write(0, b"\x01\x02")
    w.flush()
    assert path.read_bytes()[:2] == b"\x01\x02"
    w.close()


def test_file_of_wrong_size_is_refused(tmp_path):
    path = tmp_path / "v.img"
    path.write_bytes(b"\x07" * 1000)
    with pytest.raises(ValueError):
        Volume(2, 512, path=path)
    assert path.read_bytes() == b"\x07" * 1000      # left as it was
    with pytest.raises(ValueError):
        Volume(1, 512, path=path)
    Volume(1000 // 8, 512, path=tmp_path / "new.img").close()  # a new file is fine


def test_flush_and_close_of_a_closed_volume(tmp_path):
    v = Volume(1, 512, path=tmp_path / "x.img")
    v.close()
    v.close()                                        # idempotent
    with pytest.raises(VolumeClosedError):
        v.flush()
    m = Volume(1, 512)
    m.flush()                                        # in memory: a no-op
    with m:
        pass
    assert m.closed


# ---------------------------------------------------------------------------
# host I/O
# ---------------------------------------------------------------------------

@pytest.mark.parametrize("n_tracks, track_size", GEOMETRIES[:4])
def test_read_write_at_any_alignment(n_tracks, track_size):
    v, ref = filled(n_tracks, track_size, seed=1)
    for k, (off, n) in enumerate(io_spans(v.capacity, track_size)):
        got = v.read(off, n)
        assert got.dtype == np.uint8 and got.shape == (n,)
        assert got.tobytes() == bytes(ref[off:off + n]), (off, n)
        data = rand_bytes(n, 100 + k)
        v.write(off, data if k % 3 else data.tobytes())
        ref[off:off + n] = data.tobytes()
        assert v.array.tobytes() == bytes(ref), (off, n)


def test_read_returns_a_copy():
    v, ref = filled(2, 512, seed=2)
    got = v.read(10, 20)
    got[:] = 0
    assert v.array.tobytes() == bytes(ref)


@pytest.mark.parametrize("make", [bytes, bytearray, memoryview,
                                  lambda b: np.frombuffer(b, dtype=np.uint8),
                                  lambda b: np.frombuffer(b, dtype=np.uint8).reshape(2, -1)])
def test_write_accepts_bytes_like(make):
    v = Volume(2, 512)
    payload = bytes(range(100, 140))
    v.write(500, make(payload))
    assert v.array[500:540].tobytes() == payload
    assert not v.array[:500].any() and not v.array[540:].any()


@pytest.mark.parametrize("n_tracks, track_size", GEOMETRIES[:4])
def test_readinto(n_tracks, track_size):
    v, ref = filled(n_tracks, track_size, seed=3)
    for off, n in io_spans(v.capacity, track_size):
        out = np.full(n, 0xAB, dtype=np.uint8)
        assert v.readinto(off, out) is None
        assert out.tobytes() == bytes(ref[off:off + n])
        buf = bytearray(n)
        v.readinto(off, buf)
        assert bytes(buf) == bytes(ref[off:off + n])
        v.readinto(off, memoryview(buf))


@pytest.mark.parametrize("n_tracks, track_size", GEOMETRIES[:4])
def test_batches(n_tracks, track_size):
    v, ref = filled(n_tracks, track_size, seed=5)
    cap = v.capacity
    rng = np.random.default_rng(6)
    for length in (0, 1, 7, track_size - 1, track_size + 3, cap):
        if length > cap:
            continue
        offsets = rng.integers(0, cap - length + 1, 6)
        offsets[0] = 0
        offsets[-1] = cap - length
        out = v.read_batch(offsets, length)
        assert out.shape == (6, length) and out.dtype == np.uint8
        for i, off in enumerate(offsets):
            assert out[i].tobytes() == bytes(ref[off:off + length])
        data = rng.integers(0, 256, (6, length), dtype=np.uint8)
        v.write_batch(offsets, data)
        for i, off in enumerate(offsets):      # in order: later rows win overlaps
            ref[off:off + length] = data[i].tobytes()
        assert v.array.tobytes() == bytes(ref)
    # offsets as a list, a tuple and other integer dtypes
    assert v.read_batch([0, 1], 2).tolist() == [list(ref[0:2]), list(ref[1:3])]
    assert v.read_batch(np.array([3], dtype=np.uint16), 1)[0, 0] == ref[3]
    v.write_batch((1,), np.array([[9, 8]], dtype=np.uint8))
    ref[1:3] = b"\x09\x08"
    assert v.array.tobytes() == bytes(ref)
    # empty batches
    assert v.read_batch([], 5).shape == (0, 5)
    v.write_batch([], np.zeros((0, 5), dtype=np.uint8))
    assert v.array.tobytes() == bytes(ref)


# ---------------------------------------------------------------------------
# bad input: the right exception, and nothing changes
# ---------------------------------------------------------------------------

def bad_calls(v: Volume):
    """(expected exception, call) pairs that must all be refused."""
    cap = v.capacity
    u8 = np.ones(8, dtype=np.uint8)
    rows = np.ones((2, 4), dtype=np.uint8)
    strided = np.ones(16, dtype=np.uint8)[::2]
    return [
        # out of range
        (IndexError, lambda: v.write(cap, b"x")),
        (IndexError, lambda: v.write(cap - 3, u8)),
        (IndexError, lambda: v.write(-1, b"x")),
        (IndexError, lambda: v.write(cap + 1, b"")),
        (IndexError, lambda: v.write(-(2 ** 40), b"x")),
        (IndexError, lambda: v.read(cap - 1, 2)),
        (IndexError, lambda: v.read(-1, 1)),
        (IndexError, lambda: v.read(0, -1)),
        (IndexError, lambda: v.read(cap + 1, 0)),
        (IndexError, lambda: v.readinto(cap - 4, np.zeros(8, dtype=np.uint8))),
        (IndexError, lambda: v.readinto(-4, np.zeros(8, dtype=np.uint8))),
        (IndexError, lambda: v.read_batch([0, cap - 1], 2)),
        (IndexError, lambda: v.read_batch([-1], 1)),
        (IndexError, lambda: v.read_batch([0], -1)),
        (IndexError, lambda: v.write_batch([0, cap - 3], rows)),   # second row out
        (IndexError, lambda: v.write_batch([-1, 0], rows)),
        # wrong dtype
        (TypeError, lambda: v.write(0, np.ones(4, dtype=np.float32))),
        (TypeError, lambda: v.write(0, np.ones(4, dtype=np.int8))),
        (TypeError, lambda: v.write(0, np.ones(4, dtype=np.uint16))),
        (TypeError, lambda: v.write(0, np.ones(4, dtype=bool))),
        (TypeError, lambda: v.write(0, "text")),
        (TypeError, lambda: v.write(0, [1, 2, 3])),
        (TypeError, lambda: v.write(0, 7)),
        (TypeError, lambda: v.write(0, None)),
        (TypeError, lambda: v.readinto(0, np.zeros(4, dtype=np.float32))),
        (TypeError, lambda: v.readinto(0, np.zeros(4, dtype=np.int8))),
        (TypeError, lambda: v.readinto(0, [0, 0])),
        (TypeError, lambda: v.write_batch([0, 8], rows.astype(np.float32))),
        (TypeError, lambda: v.write_batch([0, 8], rows.astype(np.int8))),
        (TypeError, lambda: v.write_batch([0.5, 8], rows)),           # float offset
        (TypeError, lambda: v.write_batch(np.array([0.0, 8.0]), rows)),
        (TypeError, lambda: v.read_batch([1.5], 2)),
        (TypeError, lambda: v.read(0.5, 2)),
        (TypeError, lambda: v.write(1.5, b"x")),
        # non-contiguous, read-only, wrong shape
        (ValueError, lambda: v.write(0, strided)),
        (ValueError, lambda: v.readinto(0, np.zeros(16, dtype=np.uint8)[::2])),
        (ValueError, lambda: v.readinto(0, b"read-only")),
        (ValueError, lambda: v.write_batch([0, 8], np.ones((2, 8), dtype=np.uint8)[:, ::2])),
        (ValueError, lambda: v.write_batch([0, 8], np.ones(8, dtype=np.uint8))),
        (ValueError, lambda: v.write_batch([0, 8, 16], rows)),
    ]


@pytest.mark.parametrize("n_tracks, track_size", [(1, 512), (3, 1024)])
def test_bad_input_raises_and_changes_nothing(n_tracks, track_size):
    v, ref = filled(n_tracks, track_size, seed=7)
    for k, (exc, call) in enumerate(bad_calls(v)):
        with pytest.raises(exc):
            call()
        assert v.array.tobytes() == bytes(ref), f"call #{k} changed the volume"
    # and the volume still works
    v.write(0, b"ok")
    assert v.read(0, 2).tobytes() == b"ok"


def test_readinto_refused_leaves_the_buffer_alone():
    v, _ = filled(1, 512, seed=8)
    out = np.full(8, 0x5A, dtype=np.uint8)
    with pytest.raises(IndexError):
        v.readinto(510, out)
    assert (out == 0x5A).all()


@pytest.mark.parametrize("file_backed", [False, True])
def test_closed_volume_refuses_io(tmp_path, file_backed):
    path = tmp_path / "c.img" if file_backed else None
    v, ref = filled(2, 512, seed=9, path=path)
    v.close()
    calls = [lambda: v.read(0, 1), lambda: v.read(0, 0), lambda: v.write(0, b"x"),
             lambda: v.write(0, b""), lambda: v.readinto(0, bytearray(4)),
             lambda: v.read_batch([0], 1), lambda: v.write_batch([0], np.ones((1, 1), np.uint8)),
             lambda: v.array]
    for call in calls:
        with pytest.raises(VolumeClosedError):
            call()
    # range errors still win over state: a bad offset is a bad offset
    with pytest.raises(IndexError):
        v.read(v.capacity, 1)
    if file_backed:
        assert path.read_bytes() == bytes(ref)


def _resident_bytes_of_mapping(path) -> int:
    """Rss of this process's mapping of ``path`` (from /proc/self/smaps)."""
    rss, inside = 0, False
    with open("/proc/self/smaps") as f:
        for line in f:
            head = line.split()
            if head and "-" in head[0] and len(head) >= 5:
                inside = line.rstrip().endswith(str(path))
            elif inside and head[0] == "Rss:":
                rss += int(head[1]) * 1024
    return rss


def test_a_full_volume_on_tmpfs_maps_every_page_when_it_opens(tmp_path_factory):
    """A full volume in memory (tmpfs) has every page in its mapping as soon
    as it opens, so that no host write takes a first-touch fault (with its
    lock held); a thin one maps none (a read fault on a tmpfs hole would
    take a page)."""
    d = Path(tempfile.mkdtemp(prefix="fastfc-test-", dir="/dev/shm"))
    try:
        full = Volume(256, 4096, path=d / "full.vol")
        thin = Volume(256, 4096, path=d / "thin.vol", thin=True)
        try:
            assert _resident_bytes_of_mapping(d / "full.vol") == full.capacity
            assert _resident_bytes_of_mapping(d / "thin.vol") == 0
        finally:
            full.close()
            thin.close()
        again = Volume(256, 4096, path=d / "full.vol")     # reopened
        try:
            assert _resident_bytes_of_mapping(d / "full.vol") == again.capacity
        finally:
            again.close()
    finally:
        shutil.rmtree(d)
