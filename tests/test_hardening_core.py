"""Hardening of the core: memory safety after close, no writable public view, space
on a full filesystem (thick by default, thin with reservation), writes to an
invalid volume, and the message for an offset past the end.

The full-filesystem tests mount a tiny tmpfs of their own (CI runs as root);
a test that cannot mount fails, it does not skip.
"""

from __future__ import annotations

import errno
import gc
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

import fastfc
from fastfc import (FlashCopy, InvalidImageError, LocalLink, NoSpaceError, PPRCPair,
                    StorageUnit, Volume, VolumeClosedError)

TS = 4096
ROOT = Path(__file__).resolve().parent.parent


def run_child(code: str, cwd: Path, **env) -> subprocess.CompletedProcess:
    """Run ``code`` in a fresh interpreter that imports this checkout's fastfc."""
    environ = dict(os.environ, PYTHONPATH=str(ROOT), **env)
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], cwd=cwd,
                          env=environ, capture_output=True, text=True, timeout=120)


# ---------------------------------------------------------------------------
# 1. arrays outlive close, never the mapping under them
# ---------------------------------------------------------------------------

def test_arrays_kept_past_close_never_segfault(tmp_path):
    """On main each of these died with SIGSEGV: close() unmapped the file
    under arrays the caller still held."""
    r = run_child("""
        import numpy as np, fastfc
        u = fastfc.StorageUnit("u")
        a = u.create_volume("A", 8, 4096)
        b = u.create_volume("B", 8, 4096)
        a.write(0, b"unit")
        fc = fastfc.FlashCopy(a, b, background_copy=False, record=True)
        arr = a.array
        part = a.array[:4]
        words = fc.to_copy.words
        u.close()
        assert a.closed
        try:
            a.array
        except fastfc.VolumeClosedError:
            pass
        else:
            raise SystemExit("a closed volume handed out its array")
        print(bytes(arr[:4]), bytes(part), int(words[0]))
        v = fastfc.Volume(8, 4096, path="v.vol")
        v.write(0, b"file")
        s = v.array[:16]
        v.close()
        print(bytes(s[:4]))
        m = fastfc.Volume(2, 512)
        k = m.array[2:6]
        m.close()
        print(k.tolist())
    """, tmp_path)
    assert r.returncode == 0, (r.returncode, r.stderr)
    assert r.stdout.split("\n")[:3] == ["b'unit' b'unit' 255", "b'file'", "[0, 0, 0, 0]"]


def fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def mapped(path: Path) -> bool:
    return str(path) in Path("/proc/self/maps").read_text()


def test_close_releases_files_at_once_without_views(tmp_path):
    """With no array kept, close unmaps and closes at once: units open and
    close many times without leaking descriptors or mappings."""
    with StorageUnit(tmp_path / "u") as u:
        u.create_volume("A", 4, TS)
        u.create_volume("T", 4, TS, thin=True)
    # what earlier tests left to the cyclic collector (a relationship still
    # named keeps its bitmaps' mappings) is freed now, not inside the count
    gc.collect()
    before = fds()
    for _ in range(5):
        with StorageUnit(tmp_path / "u") as u:
            FlashCopy(u.volume("A"), u.volume("T"), background_copy=False).withdraw(force=True)
            u.volume("A").write(0, b"x")
            u.volume("A").array.sum()           # a temporary view, gone at once
    assert fds() == before
    assert not mapped(tmp_path / "u" / "volumes" / "A.vol")


def test_a_kept_view_holds_the_mapping_until_it_dies(tmp_path):
    v = Volume(4, TS, path=tmp_path / "v.vol")
    v.write(TS, b"kept")
    view = v.array[TS:TS + 4]
    v.close()
    with pytest.raises(VolumeClosedError):
        v.read(0, 1)
    with pytest.raises(VolumeClosedError):
        v.write(0, b"x")
    assert mapped(tmp_path / "v.vol") and bytes(view) == b"kept"
    del view
    assert not mapped(tmp_path / "v.vol")


# ---------------------------------------------------------------------------
# 2. no public writable view
# ---------------------------------------------------------------------------

@pytest.mark.parametrize("file_backed", [False, True])
def test_array_is_read_only_and_cannot_bypass_copy_on_write(tmp_path, file_backed):
    kw = {"path": tmp_path / "s.vol"} if file_backed else {}
    s, t = Volume(4, TS, **kw), Volume(4, TS)
    s.write(0, b"old")
    fc = FlashCopy(s, t, background_copy=False)
    before = t.read(0, t.capacity)
    for attempt in (lambda: s.array.__setitem__(0, 7),
                    lambda: s.array[:3].__setitem__(slice(None), 7),
                    lambda: np.copyto(s.array, 7),
                    lambda: setattr(s.array.flags, "writeable", True),
                    lambda: s.readinto(0, s.array)):
        with pytest.raises(ValueError):
            attempt()
    assert np.array_equal(t.read(0, t.capacity), before)
    assert bytes(s.array[:3]) == b"old" and fc.tracks_to_copy == 4
    # the private door for tests and benchmarks still opens
    s._raw_array()[:3] = 1
    assert bytes(s.array[:3]) == b"\1\1\1"


def test_bitmap_words_are_read_only(tmp_path):
    bm = fastfc.TrackBitmap(100)
    for attempt in (lambda: bm.words.__setitem__(0, 1),
                    lambda: setattr(bm.words.flags, "writeable", True)):
        with pytest.raises(ValueError):
            attempt()
    bm._raw_words()[0] = 5
    assert bm.test(0) and bm.test(2) and bm.count() == 2
    with StorageUnit(tmp_path / "u") as u:
        fc = FlashCopy(u.create_volume("S", 4, TS), u.create_volume("T", 4, TS),
                       background_copy=False)
        with pytest.raises(ValueError):
            fc.to_copy.words[0] = 0
        assert not hasattr(fc.to_copy, "mm")
        assert fc.tracks_to_copy == 4


# ---------------------------------------------------------------------------
# 4. space
# ---------------------------------------------------------------------------

@pytest.fixture
def tiny_fs(tmp_path):
    """A 4 MiB tmpfs of the test's own; unmounted afterwards."""
    d = tmp_path / "fs"
    d.mkdir()
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4M", "tmpfs", str(d)],
                       capture_output=True, text=True)
    assert r.returncode == 0, f"cannot mount a tmpfs (tests run as root): {r.stderr}"
    try:
        yield d
    finally:
        subprocess.run(["umount", "-l", str(d)], check=True)


def fill_up(d: Path) -> None:
    """Take every free block of the filesystem holding ``d``."""
    fd = os.open(d / "filler", os.O_WRONLY | os.O_CREAT | os.O_APPEND)
    page = b"\xff" * 4096
    try:
        while True:
            os.write(fd, page)
    except OSError as e:
        assert e.errno == errno.ENOSPC
    finally:
        os.close(fd)
    assert os.statvfs(d).f_bavail == 0


def free_up(d: Path) -> None:
    os.unlink(d / "filler")


def image(v: Volume) -> bytes:
    return v.read(0, v.capacity).tobytes()


def raw(v: Volume) -> bytes:
    return v.array.tobytes()


def on_file(v: Volume) -> bytes:
    """The file's bytes through read(2): unlike a fault on the mapping, this
    needs no page for a hole, even on a full tmpfs."""
    return v.path.read_bytes()


def words(bm) -> bytes | None:
    return None if bm is None else bm.words.tobytes()


def test_thick_volume_never_sigbus_on_a_full_filesystem(tiny_fs):
    """On main a volume file was sparse: once the filesystem was full, a
    write that needed a block killed the process with SIGBUS (exit 135)."""
    r = run_child("""
        import os, errno, numpy as np, fastfc
        s = fastfc.Volume(64, 4096, path="s.vol")
        t = fastfc.Volume(64, 4096, path="t.vol")
        fc = fastfc.FlashCopy(s, t, background_copy=False)
        fd = os.open("filler", os.O_WRONLY | os.O_CREAT)
        try:
            while True:
                os.write(fd, b"x" * 4096)
        except OSError as e:
            assert e.errno == errno.ENOSPC
        data = np.full(s.capacity, 7, np.uint8)
        s.write(0, data)                 # copy-on-write of every track to t
        t.write(4096, b"target")
        print(fc.tracks_to_copy, int(s.read(0, s.capacity).sum()) // 7)
    """, tiny_fs)
    assert r.returncode == 0, (r.returncode, r.stderr)
    assert r.stdout.split() == ["0", str(64 * TS)]


def test_thick_create_without_room_leaves_nothing(tiny_fs):
    with pytest.raises(NoSpaceError, match="8388608 bytes"):
        Volume(128, 65536, path=tiny_fs / "big.vol")
    assert not (tiny_fs / "big.vol").exists()
    with StorageUnit(tiny_fs / "u") as u:
        with pytest.raises(NoSpaceError):
            u.create_volume("big", 1 << 24, 65536)        # 1 TiB on 4 MiB
        assert "big" not in u and not list((tiny_fs / "u" / "volumes").iterdir())
        u.create_volume("small", 4, TS)
        fill_up(tiny_fs)
        with pytest.raises(NoSpaceError):
            u.create_volume("late", 4, TS)
        assert "late" not in u and not (tiny_fs / "u" / "volumes" / "late.vol").exists()
        free_up(tiny_fs)
    with StorageUnit(tiny_fs / "u") as u:
        assert [v.name for v in u.volumes()] == ["small"]


def test_a_size_the_filesystem_cannot_hold_is_refused_with_nothing_left(tmp_path):
    """EFBIG from ftruncate (here through RLIMIT_FSIZE, as ext4 gives it for
    100 TiB): a clean error naming the size, no 0-byte file left."""
    r = run_child("""
        import resource, signal, fastfc
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (1 << 20, 1 << 20))
        for thin in (False, True):
            try:
                fastfc.Volume(64, 65536, path="big.vol", thin=thin)
            except (ValueError, fastfc.NoSpaceError) as e:
                assert "4194304 bytes" in str(e), e
                print(type(e).__name__)
            import os
            assert not os.path.exists("big.vol")
    """, tmp_path)
    assert r.returncode == 0, r.stderr
    assert r.stdout.split() == ["ValueError", "ValueError"]


def test_thin_volume_is_sparse_and_survives_reopen(tiny_fs):
    with StorageUnit(tiny_fs / "u") as u:
        v = u.create_volume("T", 1 << 14, 65536, thin=True)    # 1 GiB on 4 MiB
        assert v.thin and v.allocated_tracks == 0
        v.write(65536 + 5, b"abc")
        assert v.allocated_tracks == 1
        v.write(65536 + 100, b"again")                          # no new blocks
        assert v.allocated_tracks == 1
        assert not u.create_volume("K", 4, TS).thin
    with StorageUnit(tiny_fs / "u") as u:
        v = u.volume("T")
        assert v.thin and not u.volume("K").thin
        assert bytes(v.read(65536 + 5, 3)) == b"abc"
        fill_up(tiny_fs)
        v.write(65536 + 9, b"x")                  # its blocks are still there
        assert v.allocated_tracks == 1
        with pytest.raises(NoSpaceError):
            v.write(3 * 65536, b"x")
        free_up(tiny_fs)


def test_thin_host_writes_on_a_full_filesystem(tiny_fs):
    v = Volume(256, TS, path=tiny_fs / "v.vol", thin=True)     # 1 MiB
    v.write(0, b"first")
    v.write_batch([TS, 2 * TS], np.ones((2, 10), np.uint8))
    fill_up(tiny_fs)
    v.write(TS + 20, b"same track: no new block needed")
    assert bytes(v.read(TS + 20, 4)) == b"same"
    before = on_file(v)
    for call in (lambda: v.write(10 * TS, b"x"),
                 lambda: v.write(2 * TS + 10, np.ones(2 * TS, np.uint8)),
                 lambda: v.write_batch([0, 50 * TS], np.ones((2, 8), np.uint8))):
        with pytest.raises(NoSpaceError, match="no room"):
            call()
        assert on_file(v) == before                  # nothing half-written
    assert issubclass(NoSpaceError, fastfc.FastFCError)
    free_up(tiny_fs)
    v.write(10 * TS, b"x")
    assert bytes(v.read(10 * TS, 1)) == b"x"
    v.close()


def test_thin_targets_copy_on_write_background_copy_and_restore(tiny_fs):
    s = Volume(64, TS, path=tiny_fs / "s.vol")                  # thick source
    t = Volume(64, TS, path=tiny_fs / "t.vol", thin=True)
    s.write(0, np.arange(s.capacity, dtype=np.uint64).astype(np.uint8))
    fc = FlashCopy(s, t, background_copy=False, record=True)
    fc.copy(2)
    fill_up(tiny_fs)

    def state():
        return (image(s), image(t), on_file(t), words(fc.to_copy), words(fc.src_changed),
                words(fc.tgt_changed))

    before = state()
    # a host write to S needs copy-on-write onto the thin target: refused whole
    with pytest.raises(NoSpaceError):
        s.write(5 * TS, b"new")
    assert state() == before
    # a write to T of a track it lacks needs a block too
    with pytest.raises(NoSpaceError):
        t.write(6 * TS, b"tgt")
    assert state() == before
    # background copy: nothing of the chunk lands, no bit changes
    with pytest.raises(NoSpaceError):
        fc.copy()
    assert state() == before
    # tracks T has blocks for still take writes
    t.write(0, b"T0")
    s.write(TS, b"S1")
    # reverse restore onto a thin source
    free_up(tiny_fs)
    s2 = Volume(64, TS, path=tiny_fs / "s2.vol", thin=True)
    t2 = Volume(64, TS, path=tiny_fs / "t2.vol")
    fc2 = FlashCopy(s2, t2, background_copy=False, record=True)
    t2.write(3 * TS, np.full(2 * TS, 9, np.uint8))    # whole tracks: S2 untouched
    fill_up(tiny_fs)

    def state2():
        return (on_file(s2), on_file(t2), words(fc2.to_copy), words(fc2.src_changed),
                words(fc2.tgt_changed))

    before2 = state2()
    with pytest.raises(NoSpaceError):
        fc2.reverse_restore()
    assert state2() == before2
    # on tmpfs reading a hole takes a page: a read of S2's holes is refused
    # cleanly too, never SIGBUS
    with pytest.raises(NoSpaceError):
        s2.read(0, s2.capacity)
    with pytest.raises(NoSpaceError):
        s2.array
    free_up(tiny_fs)
    assert fc2.reverse_restore() == 2 and image(s2) == image(t2)
    for x in (s, t, s2, t2):
        x.close()


def test_background_copy_worker_stops_cleanly_on_a_full_filesystem(tiny_fs):
    s = Volume(64, TS)
    s.write(0, np.full(s.capacity, 3, np.uint8))
    t = Volume(64, TS, path=tiny_fs / "t.vol", thin=True)
    fill_up(tiny_fs)
    fc = FlashCopy(s, t)                     # COPY mode: a worker thread
    assert fc.wait(30) is False              # it stopped, it did not hang
    assert isinstance(fc.copy_error, NoSpaceError) and fc.tracks_to_copy == 64
    assert image(t) == image(s)
    free_up(tiny_fs)
    fc.copy()
    assert fc.tracks_to_copy == 0 or not fc.active
    t.close()


@pytest.mark.parametrize("link", ["direct", "send"])
def test_pprc_updates_to_a_thin_secondary(tiny_fs, link):
    a = Volume(64, TS)
    a.write(0, np.full(a.capacity, 5, np.uint8))
    b = Volume(64, TS, path=tiny_fs / "b.vol", thin=True)
    c = Volume(64, TS, path=tiny_fs / "c.vol", thin=True)
    lk = LocalLink() if link == "direct" else LocalLink(bandwidth=1e12)
    pair = PPRCPair(a, b, lk, background=False)
    fc = FlashCopy(b, c, background_copy=False, record=True)
    fill_up(tiny_fs)
    before = (on_file(b), on_file(c), words(pair.oos), words(fc.to_copy),
              words(fc.src_changed))
    pair.drain()
    assert pair.suspend_reason and "NoSpaceError" in pair.suspend_reason
    assert (on_file(b), on_file(c), words(pair.oos), words(fc.to_copy),
            words(fc.src_changed)) == before
    free_up(tiny_fs)
    pair.resume()
    pair.drain()
    assert pair.out_of_sync_tracks == 0 and image(b) == image(a)
    assert not np.any(c.read(0, c.capacity))         # C kept B's old image
    b.close()
    c.close()


def test_full_database_is_a_clean_error_rolled_back(tiny_fs):
    with StorageUnit(tiny_fs / "u") as u:
        s = u.create_volume("S", 4, TS)
        t = u.create_volume("T", 4, TS)
        fill_up(tiny_fs)
        with pytest.raises(NoSpaceError):
            u.create_volume("V", 4, TS, thin=True)     # no block needed but a row
        assert "V" not in u and not (tiny_fs / "u" / "volumes" / "V.vol").exists()
        with pytest.raises(NoSpaceError):
            FlashCopy(s, t, background_copy=False, record=True)
        assert s.relationships == [] and t.relationships == []
        free_up(tiny_fs)
        FlashCopy(s, t, background_copy=False)
    with StorageUnit(tiny_fs / "u") as u:
        assert sorted(v.name for v in u.volumes()) == ["S", "T"]
        assert len(u.flashcopies) == 1


# ---------------------------------------------------------------------------
# 13. invalid volumes; offsets past the end
# ---------------------------------------------------------------------------

def test_invalid_volume_refuses_partial_writes_and_a_whole_rewrite_revalidates(tmp_path):
    with StorageUnit(tmp_path / "u") as u:
        s, t = u.create_volume("S", 4, TS), u.create_volume("T", 4, TS)
        s.write(0, b"src")
        FlashCopy(s, t, background_copy=False).withdraw(force=True)
        assert not t.valid
        before = raw(t)
        for call in (lambda: t.write(0, b"x"), lambda: t.write(0, b""),
                     lambda: t.write(TS, np.ones(3 * TS, np.uint8)),
                     lambda: t.write_batch([0, TS], np.ones((2, 4), np.uint8))):
            with pytest.raises(InvalidImageError, match="whole volume"):
                call()
        assert raw(t) == before and not t.valid
    with StorageUnit(tmp_path / "u") as u:
        t = u.volume("T")
        assert not t.valid
        t.write(0, np.full(t.capacity, 4, np.uint8))      # a full rewrite
        assert t.valid and image(t) == bytes([4]) * t.capacity
    with StorageUnit(tmp_path / "u") as u:
        assert u.volume("T").valid


def test_offset_past_the_end_names_the_problem():
    v = Volume(2, 512)
    for call in (lambda: v.read(1024 + 951424, -951424), lambda: v.read(2000, 1),
                 lambda: v.write(5000, b"x"), lambda: v.read_batch([3000], 1)):
        with pytest.raises(IndexError, match=r"offset \d+ is past the end of the volume "
                                             r"\(capacity 1024 bytes\)"):
            call()
    with pytest.raises(IndexError, match=r"runs 2 bytes past the end"):
        v.read(1020, 6)
    with pytest.raises(IndexError, match="offset -1 is negative"):
        v.read(-1, 1)
    with pytest.raises(IndexError, match="length -1 is negative"):
        v.read(5, -1)
