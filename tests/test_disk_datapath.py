"""The data path of volumes on a disk: host writes store without
the GIL, PPRC updates reach B and C's files with pwrite (C's copy-on-write
first) instead of stores through the mapping. What the syscalls write must
read back through the mapping, survive close and reopen, and a failed
pwrite must leave the tracks it was for owed.
"""

from __future__ import annotations

import errno
import os
import shutil
import tempfile
from pathlib import Path

import numpy as np
import pytest

from fastfc import FlashCopy, GlobalMirror, StorageUnit, _core
from fastfc.storage.volume import _in_memory_fs
from helpers import image, rand


@pytest.fixture
def disk_dir(tmp_path):
    """A directory on a filesystem whose pages go to a disk."""
    if not _in_memory_fs(tmp_path):
        yield tmp_path
        return
    for base in ("/var/tmp", str(Path(__file__).resolve().parent.parent)):
        if not _in_memory_fs(Path(base)):
            d = Path(tempfile.mkdtemp(prefix="fastfc-disk-", dir=base))
            yield d
            shutil.rmtree(d, ignore_errors=True)
            return
    pytest.skip("no disk-backed filesystem to test on")


def syscw() -> int:
    with open("/proc/self/io") as f:
        return int(next(ln for ln in f if ln.startswith("syscw")).split()[1])


@pytest.mark.parametrize("ts", [512, 4096, 16384])
def test_global_mirror_on_disk_units_reads_back_through_the_mapping(disk_dir, ts):
    n = 24
    snaps = {}
    prim, sec = StorageUnit(disk_dir / "p"), StorageUnit(disk_dir / "s")
    A = [prim.create_volume(f"A{i}", n, ts) for i in range(2)]
    B = [sec.create_volume(f"B{i}", n, ts) for i in range(2)]
    C = [sec.create_volume(f"C{i}", n, ts) for i in range(2)]
    assert all(v._file_backed for v in A + B + C)
    for i, a in enumerate(A):
        a.write(0, rand(a.capacity, i))

    def record(seq):
        snaps[seq] = [a.read(0, a.capacity) for a in A]

    gm = GlobalMirror(list(zip(A, B, C)), on_coordinate=record,
                      max_coordination_time=0.5)
    assert gm.form_consistency_group().committed
    seed = 100
    for rnd in range(4):
        for i, a in enumerate(A):
            for t in (1, 2, 3, 7 + rnd, n - 1):
                seed += 1
                # whole tracks, a few bytes inside one page, a page-crossing write
                kind = seed % 3
                if kind == 0:
                    a.write(t * ts, rand(ts, seed))
                elif kind == 1:
                    a.write(t * ts + 37, rand(5, seed))
                else:
                    off = t * ts + min(ts // 2, 4090)
                    a.write(off, rand(min(ts, 4096), seed)[: a.capacity - off])
        res = gm.form_consistency_group()
        assert res.committed
        seq = res.sequence
        for b, c, want in zip(B, C, snaps[seq]):
            assert np.array_equal(image(b), want)       # B: pwrite, read via the map
            assert np.array_equal(image(c), want)       # C: NOCOPY image, cow by pwrite
            assert np.array_equal(b.array, want)
    # the bytes are in the files: the files hold them, a reopened unit reads them
    final = snaps[seq]
    c_phys = [np.array(c.array) for c in C]
    b_paths = [b.path for b in B]
    gm.stop()
    prim.close()
    sec.close()
    for path, want in zip(b_paths, final):
        assert np.array_equal(np.fromfile(path, dtype=np.uint8), want)
    with StorageUnit(disk_dir / "s") as u:
        for i in range(2):
            assert np.array_equal(np.array(u.volume(f"B{i}").array), final[i])
            assert np.array_equal(np.array(u.volume(f"C{i}").array), c_phys[i])


def _pprc_setup(d, ts=4096, n=16):
    u = StorageUnit(d / "u")
    A, B, C = (u.create_volume(x, n, ts) for x in "ABC")
    A.write(0, rand(A.capacity, 1))
    B.write(0, rand(B.capacity, 2))
    old_b = image(B)
    FlashCopy(B, C, background_copy=False)
    return u, A, B, C, old_b


def test_pprc_updates_use_pwrite_c_first_and_read_back(disk_dir):
    u, A, B, C, old_b = _pprc_setup(disk_dir)
    ts, n = A.track_size, A.n_tracks
    # track 9 already equal on B: its page is not written, but C still needs
    # B's old track (its copy-on-write)
    B.write(9 * ts, A.read(9 * ts, ts))
    old_b = image(B)
    c_before = image(C)
    owed = _core.TrackBitmap(n)
    for t in (1, 3, 4, 9, 15):
        owed.set(t)
    a_img = image(A)
    cw = syscw()
    A._lock()
    try:
        done, resume = _core.pprc_copy_tracks(A, B, owed, 0, n)
    finally:
        A._unlock()
    writes = syscw() - cw
    assert done == 5 and resume == n and not owed.any()
    # B: runs [1], [3, 5), [15] changed, [9] unchanged -> 3 pwrites; C: one
    # pwrite per track whose old data it did not hold yet (those not already
    # copied by B's write of track 9)
    c_tracks = [1, 3, 4, 15]
    assert writes == 3 + len(c_tracks)
    b_img = image(B)
    for t in range(n):
        sl = slice(t * ts, (t + 1) * ts)
        want_b = a_img[sl] if t in (1, 3, 4, 9, 15) else old_b[sl]
        assert np.array_equal(b_img[sl], want_b)
        assert np.array_equal(np.asarray(B.array)[sl], want_b)
    assert np.array_equal(image(C), c_before)         # C keeps B's old image
    for t in c_tracks:                                # physically, by pwrite
        sl = slice(t * ts, (t + 1) * ts)
        assert np.array_equal(np.asarray(C.array)[sl], old_b[sl])
    u.close()


def _fd_of(path: Path) -> int:
    want = os.path.realpath(path)
    for name in os.listdir("/proc/self/fd"):
        try:
            if os.readlink(f"/proc/self/fd/{name}") == want:
                return int(name)
        except OSError:
            pass
    raise AssertionError(f"no descriptor open on {path}")


def test_a_failed_pwrite_leaves_the_tracks_owed(disk_dir):
    u, A, B, C, old_b = _pprc_setup(disk_dir)
    ts, n = A.track_size, A.n_tracks
    c_before = image(C)
    fd = _fd_of(B.path)
    saved = os.dup(fd)
    ro = os.open(B.path, os.O_RDONLY)
    os.dup2(ro, fd)                    # B's pwrites now fail (EBADF)
    owed = _core.TrackBitmap(n)
    owed.set_range(2, 6)
    A._lock()
    try:
        with pytest.raises(OSError) as ei:
            _core.pprc_copy_tracks(A, B, owed, 0, n)
        assert ei.value.errno == errno.EBADF
        assert owed.count() == 4                       # nothing counted as sent
        assert np.array_equal(image(B), old_b)         # B unchanged
        assert np.array_equal(image(C), c_before)      # C's image unchanged
        os.dup2(saved, fd)                             # the disk is back: retry
        done, _ = _core.pprc_copy_tracks(A, B, owed, 0, n)
    finally:
        A._unlock()
        os.close(saved)
        os.close(ro)
    assert done == 4 and not owed.any()
    assert np.array_equal(image(B)[2 * ts:6 * ts], image(A)[2 * ts:6 * ts])
    assert np.array_equal(image(C), c_before)
    u.close()


def test_host_writes_on_disk_release_the_gil_and_keep_cow_order(disk_dir):
    """Small host writes to a disk-backed source with a FlashCopy target on
    disk (stores through the mapping without the GIL): copy-on-write first,
    data second, both read back."""
    u = StorageUnit(disk_dir / "h")
    S, T = u.create_volume("S", 8, 4096), u.create_volume("T", 8, 4096)
    S.write(0, rand(S.capacity, 5))
    snap = image(S)
    fc = FlashCopy(S, T, background_copy=False, record=True)
    for k in range(8):
        S.write(k * 4096 + 100, rand(200, 10 + k))
    batch = np.stack([rand(512, 40 + k) for k in range(3)])
    S.write_batch([0, 4096 * 5 + 512, 4096 * 7], batch)
    assert np.array_equal(image(T), snap)
    assert np.array_equal(np.asarray(T.array), snap)   # all copied on write
    want = snap.copy()
    for k in range(8):
        want[k * 4096 + 100:k * 4096 + 300] = rand(200, 10 + k)
    for off, row in zip([0, 4096 * 5 + 512, 4096 * 7], batch):
        want[off:off + 512] = row
    assert np.array_equal(image(S), want)
    assert fc.src_changed.count() == 8
    u.close()


def _vm_flags(array: np.ndarray) -> list[str]:
    """The kernel's VmFlags of the mapping that holds ``array``'s first byte."""
    addr = array.__array_interface__["data"][0]
    with open("/proc/self/smaps") as f:
        inside = False
        for line in f:
            head = line.split()[0]
            if "-" in head and all(c in "0123456789abcdef-" for c in head):
                lo, hi = (int(x, 16) for x in head.split("-"))
                inside = lo <= addr < hi
            elif inside and line.startswith("VmFlags:"):
                return line.split()[1:]
    raise AssertionError("no mapping holds the volume")


def _dirtied_bytes() -> int:
    """Bytes this thread has dirtied in the page cache (task I/O accounting)."""
    with open("/proc/thread-self/io") as f:
        return int(next(ln for ln in f if ln.startswith("write_bytes")).split()[1])


def test_a_volume_on_a_disk_faults_without_read_ahead(disk_dir, tmp_path):
    """A disk volume's mapping is advised random (VmFlags ``rr``), so its
    faults build single-page folios; a volume in memory is not a mapping."""
    if not os.path.exists("/proc/self/smaps"):
        pytest.skip("no /proc/self/smaps")
    u = StorageUnit(disk_dir / "m")
    v = u.create_volume("V", 64, 4096)
    assert "rr" in _vm_flags(np.asarray(v.array))
    u.close()
    u = StorageUnit(disk_dir / "m")          # reopened: advised again
    assert "rr" in _vm_flags(np.asarray(u.volume("V").array))
    u.close()


def test_a_small_host_write_to_a_disk_volume_dirties_only_its_pages(disk_dir):
    """After a volume on a disk was written whole and flushed (its pages
    clean, as writeback leaves them), each 4 KiB host store into a clean page
    dirties about that page in the page cache, not the large folio a
    read-ahead fault would have built around it (up to 2 MiB on ext4, all
    of it written back)."""
    if not os.path.exists("/proc/thread-self/io"):
        pytest.skip("no per-task I/O accounting")
    u = StorageUnit(disk_dir / "d")
    v = u.create_volume("V", 16384, 4096)         # 64 MiB: read-ahead ramps up
    v.write(0, rand(v.capacity, 3))               # faults the whole file in
    v.flush()                                     # every page clean again
    pages = np.random.default_rng(4).choice(v.n_tracks, 64, replace=False)
    before = _dirtied_bytes()
    for k, t in enumerate(pages):
        v.write(int(t) * 4096, rand(4096, 100 + k))
    dirtied = _dirtied_bytes() - before
    assert dirtied <= 2 * 64 * 4096, f"{dirtied} bytes dirtied by 64 writes of 4 KiB"
    u.close()


def _rchar() -> int:
    """Bytes this thread has read with syscalls (reading this file adds its
    own few hundred)."""
    with open("/proc/thread-self/io") as f:
        return int(next(ln for ln in f if ln.startswith("rchar")).split()[1])


def test_large_reads_of_a_disk_volume_go_through_the_file(disk_dir):
    """The mapping of a disk volume reads no ahead, so a large host read
    takes the file's read path (batched I/O for uncached pages): what it
    returns is what stores through the mapping and pwrite landed, also when
    the pages were dropped from the cache; a small read stays a copy."""
    u = StorageUnit(disk_dir / "r")
    v = u.create_volume("V", 256, 4096)
    data = rand(v.capacity, 6)
    v.write(0, data)                               # stores through the mapping
    before = _rchar()
    assert np.array_equal(v.read(0, v.capacity), data)
    assert _rchar() - before >= v.capacity         # read from the file
    v.flush()
    fd = _fd_of(v.path)
    os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)      # cold cache
    assert np.array_equal(v.read(4096 * 3, 200 * 4096), data[4096 * 3:4096 * 203])
    small = rand(100, 7)
    v.write(5000, small)
    out = np.empty(65536, np.uint8)
    v.readinto(0, out)
    assert np.array_equal(out[5000:5100], small)
    before = _rchar()
    assert np.array_equal(v.read(5000, 100), small)
    assert _rchar() - before < 4096                # a small read copies
    got = v.read_batch([0, 65536 * 2], 65536)
    assert np.array_equal(got[1], data[65536 * 2:65536 * 3])
    u.close()


def _present_pages(array: np.ndarray, n_pages: int) -> np.ndarray:
    """Which of the first ``n_pages`` 4 KiB pages of ``array``'s memory are
    in this process's page table (bit 63 of /proc/self/pagemap)."""
    addr = array.__array_interface__["data"][0]
    with open("/proc/self/pagemap", "rb") as f:
        f.seek(addr // 4096 * 8)
        words = np.frombuffer(f.read(n_pages * 8), np.uint64)
    return (words >> np.uint64(63)).astype(bool)


def _read_bytes() -> int:
    """Bytes this thread had read from the storage layer (task I/O accounting)."""
    with open("/proc/thread-self/io") as f:
        return int(next(ln for ln in f if ln.startswith("read_bytes")).split()[1])


def test_a_disk_volume_opens_with_its_cached_pages_mapped(disk_dir):
    """Opening a volume on a disk maps the pages of its file that the page
    cache holds (so the drain's reads of B and C, and the first store into
    a page, take no read fault), and reads none that it does not hold: an
    evicted range stays unmapped and unread, and what the mapping shows is
    the file's data."""
    if not os.path.exists("/proc/self/pagemap") or not os.path.exists("/proc/thread-self/io"):
        pytest.skip("no /proc/self/pagemap or per-task I/O accounting")
    u = StorageUnit(disk_dir / "c")
    v = u.create_volume("V", 512, 4096)
    data = rand(v.capacity, 8)
    v.write(0, data)
    u.close()                                   # flushed: the pages are clean
    fd = os.open(disk_dir / "c" / "volumes" / "V.vol", os.O_RDONLY)
    try:
        os.pread(fd, 512 * 4096, 0)             # every page in the cache
        os.posix_fadvise(fd, 256 * 4096, 256 * 4096, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)
    before = _read_bytes()
    u = StorageUnit(disk_dir / "c")
    v = u.volume("V")
    present = _present_pages(np.asarray(v.array), 512)
    assert _read_bytes() - before < 256 * 4096 // 4, "the open read evicted pages"
    assert present[:256].all(), f"{256 - present[:256].sum()} cached pages unmapped"
    assert not present[256:].any(), "the open mapped (read) pages the cache did not hold"
    assert np.array_equal(image(v), data)
    u.close()
