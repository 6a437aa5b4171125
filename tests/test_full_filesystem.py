"""Full filesystems on real disks: ext4 and xfs, each a loop-mounted image the
test makes (and unmounts) itself, not tmpfs.

A store through a volume's mapping write-faults a whole page-cache folio
(readahead makes them up to 2 MiB), and ext4 and xfs reserve blocks, inside
the fault, for every part of the folio that has none. A thin volume with
blocks per track had folios running on from a reserved track into a hole:
on a full filesystem the fault failed, which is SIGBUS (exit 135), though
``fallocate`` of the track had succeeded. These tests fill the filesystem
and check that the library, the command line and ``fastfc serve`` give
:class:`~fastfc.errors.NoSpaceError` (ENOSPC to an NBD client) instead, lose
nothing, and that a unit on a full filesystem still opens read-write so that
space can be freed, and closes with a clean error.

Mounting needs root (CI runs as root) and mkfs.ext4 / mkfs.xfs (e2fsprogs,
xfsprogs: ``.ci/run`` installs them). A missing tool skips on a developer
machine and fails under ``CI``; a mount that fails fails.
"""

from __future__ import annotations

import errno
import os
import shutil
import subprocess
import sys
import tempfile
import textwrap
from pathlib import Path

import numpy as np
import pytest

import fastfc
from fastfc import NoSpaceError, StorageUnit

ROOT = Path(__file__).resolve().parent.parent
# each test makes, loop-mounts and fills a filesystem of its own: seconds each
pytestmark = pytest.mark.slow
TRACK = 65536
# mkfs.xfs refuses a filesystem under 300 MiB
SIZES = {"ext4": 64 << 20, "xfs": 320 << 20}
MKFS = {"ext4": ["mkfs.ext4", "-q", "-F", "-m", "0"], "xfs": ["mkfs.xfs", "-q", "-f"]}
PACKAGES = {"ext4": "e2fsprogs", "xfs": "xfsprogs"}


@pytest.fixture(params=["ext4", "xfs"])
def disk_fs(request, tmp_path):
    """A small ext4 or xfs filesystem on a loop device, mounted at a
    directory of the test's own; unmounted (and its image removed) after."""
    kind = request.param
    tool = MKFS[kind][0]
    if shutil.which(tool) is None:
        msg = f"{tool} not installed: apt-get install {PACKAGES[kind]} (.ci/run does it)"
        if os.environ.get("CI"):
            pytest.fail(msg)
        pytest.skip(msg)
    # the image on tmpfs when there is one: the filesystem the tests see is
    # still a real ext4 or xfs (loop-mounted; block reservation, delayed
    # allocation, ENOSPC are the filesystem's own), only the loop device's
    # backing file is in memory, so its syncs do not wait for a busy disk
    shm = "/dev/shm" if os.path.isdir("/dev/shm") and os.access("/dev/shm", os.W_OK) else None
    img_dir = Path(tempfile.mkdtemp(prefix="fastfc-fs-", dir=shm)) if shm else tmp_path
    img, mnt = img_dir / f"{kind}.img", tmp_path / kind
    mnt.mkdir()
    with open(img, "wb") as f:
        f.truncate(SIZES[kind])
    r = subprocess.run([*MKFS[kind], str(img)], capture_output=True, text=True)
    assert r.returncode == 0, f"{tool} failed: {r.stderr}"
    r = subprocess.run(["mount", "-o", "loop", str(img), str(mnt)], capture_output=True,
                       text=True)
    assert r.returncode == 0, f"cannot loop-mount {kind} (tests run as root): {r.stderr}"
    try:
        yield mnt
    finally:
        subprocess.run(["umount", str(mnt)], capture_output=True)
        if os.path.ismount(mnt):
            subprocess.run(["umount", "-l", str(mnt)], check=True)
        img.unlink()
        if img_dir != tmp_path:
            img_dir.rmdir()


def fill_up(d: Path, leave: int = 0) -> None:
    """Take the free blocks of the filesystem holding ``d``, all of them or
    all but about ``leave`` bytes."""
    st = os.statvfs(d)
    free = st.f_bavail * st.f_frsize
    fd = os.open(d / "filler", os.O_WRONLY | os.O_CREAT | os.O_APPEND)
    try:
        if free - leave > (1 << 20):
            os.posix_fallocate(fd, 0, free - leave - (1 << 20))
        os.lseek(fd, 0, os.SEEK_END)
        chunk = b"\xff" * 4096
        while os.statvfs(d).f_bavail * st.f_frsize > leave:
            os.write(fd, chunk)
            os.fsync(fd)
    except OSError as e:
        assert e.errno == errno.ENOSPC
    finally:
        os.close(fd)


def free_up(d: Path) -> None:
    os.unlink(d / "filler")


def run_child(code: str, cwd: Path) -> subprocess.CompletedProcess:
    """Run ``code`` in a fresh interpreter that imports this checkout's fastfc
    (a SIGBUS kills the child, not the test run)."""
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=300)


def cli(unit: Path, *args) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    return subprocess.run([sys.executable, "-m", "fastfc", "-u", str(unit), *map(str, args)],
                          env=env, capture_output=True, text=True, timeout=300)


def pattern(track: int) -> np.ndarray:
    return np.full(TRACK, track % 251 + 1, np.uint8)


def test_thin_writes_until_the_filesystem_is_full_never_sigbus(disk_fs):
    """The tracks of a thin volume larger than the filesystem, written one
    by one until no room is left: the write that finds no room raises
    NoSpaceError (on main: SIGBUS, exit 135), and every track written before
    reads back after reopening."""
    r = run_child(f"""
        import numpy as np, fastfc
        u = fastfc.StorageUnit("u")
        v = u.create_volume("T", 16384, {TRACK}, thin=True)      # 1 GiB
        n = 0
        try:
            for t in range(0, v.n_tracks):
                v.write(t * {TRACK}, np.full({TRACK}, t % 251 + 1, np.uint8))
                n += 1
        except fastfc.NoSpaceError as e:
            assert not v.read(n * {TRACK}, {TRACK}).any()       # nothing half-written
            print(n)
        else:
            raise SystemExit("the filesystem never filled")
        try:
            u.close()
        except fastfc.NoSpaceError:
            pass       # no room to checkpoint the WAL: its rows stay there
    """, disk_fs)
    assert r.returncode == 0, (r.returncode, r.stderr[-2000:])
    n = int(r.stdout.split()[0])
    assert n > 100
    with StorageUnit(disk_fs / "u", readonly=True) as u:
        v = u.volume("T")
        for t in range(n):
            assert np.array_equal(v.read(t * TRACK, TRACK), pattern(t)), t
        assert not np.any(v.read(n * TRACK, TRACK))


def test_scattered_thin_writes_with_readers_until_full_never_sigbus(disk_fs):
    """Tracks far apart (holes between them), each written, read back over
    a wide range around it (readahead brings large folios in), and written
    again among the ones before, until the filesystem is full: a clean
    NoSpaceError, never SIGBUS, and every acknowledged write reads back."""
    r = run_child(f"""
        import os, numpy as np, fastfc
        u = fastfc.StorageUnit("u")
        v = u.create_volume("T", 65536, {TRACK}, thin=True)     # 4 GiB
        fd = os.open("u/volumes/T.vol", os.O_RDONLY)
        step = 3 * (2 << 20) // {TRACK} + 1     # chunks of holes between
        done = []
        try:
            for t in range(0, v.n_tracks, step):
                lo = max(0, t - 64) * {TRACK}
                os.pread(fd, 128 * {TRACK}, lo)               # readahead, another reader's
                v.read(lo, min(128 * {TRACK}, v.capacity - lo))
                v.write(t * {TRACK}, np.full({TRACK}, t % 251 + 1, np.uint8))
                done.append(t)
                for old in done[-8:]:
                    v.write(old * {TRACK} + 4096, np.full(4096, old % 251 + 1, np.uint8))
        except fastfc.NoSpaceError:
            print(len(done))
        else:
            raise SystemExit("the filesystem never filled")
        for t in done:
            assert (v.read(t * {TRACK}, {TRACK}) == t % 251 + 1).all(), t
        try:
            u.close()
        except fastfc.NoSpaceError:
            pass
    """, disk_fs)
    assert r.returncode == 0, (r.returncode, r.stderr[-2000:])
    assert int(r.stdout.split()[0]) > 4


def test_a_unit_on_a_full_filesystem_opens_read_write_to_free_space(disk_fs):
    """With every block taken, the unit still opens read-write (on main the
    holder's line in unit.lock and SQLite's files found no room), ``rmvol``
    frees space, and what was there is intact."""
    with StorageUnit(disk_fs / "u") as u:
        u.create_volume("Big", 128, TRACK)                # 8 MiB, thick
        k = u.create_volume("Keep", 16, TRACK)
        k.write(0, pattern(0))
        t = u.create_volume("T", 1024, TRACK, thin=True)
        t.write(TRACK, pattern(1))
    fill_up(disk_fs)
    r = cli(disk_fs / "u", "lsvol")
    assert r.returncode == 0 and "Big" in r.stdout, r.stderr
    r = cli(disk_fs / "u", "rmvol", "Big")
    assert r.returncode == 0, (r.returncode, r.stderr)
    with StorageUnit(disk_fs / "u") as u:
        assert sorted(v.name for v in u.volumes()) == ["Keep", "T"]
        assert np.array_equal(u.volume("Keep").read(0, TRACK), pattern(0))
        assert np.array_equal(u.volume("T").read(TRACK, TRACK), pattern(1))
    # full again: host writes that need new tracks end in a clean error
    fill_up(disk_fs)
    codes = []
    for i in range(40):
        r = cli(disk_fs / "u", "write", "T", "z", "--offset", (100 + 4 * i) * TRACK,
                "--repeat", 4 * TRACK)
        assert r.returncode in (0, 1) and "Traceback" not in r.stderr, (r.returncode, r.stderr)
        codes.append(r.returncode)
        if r.returncode == 1:
            assert "no room" in r.stderr, r.stderr
            break
    assert codes[-1] == 1, codes
    with StorageUnit(disk_fs / "u", readonly=True) as u:
        t = u.volume("T")
        for i, c in enumerate(codes):
            got = t.read((100 + 4 * i) * TRACK, 4 * TRACK).tobytes()
            assert got == (b"z" * 4 * TRACK if c == 0 else bytes(4 * TRACK)), i


def test_library_open_on_a_full_filesystem_and_remove_a_volume(disk_fs):
    with StorageUnit(disk_fs / "u") as u:
        u.create_volume("Big", 128, TRACK)
        u.create_volume("Keep", 16, TRACK).write(0, pattern(7))
    fill_up(disk_fs)
    with StorageUnit(disk_fs / "u") as u:
        u.remove_volume("Big")
    with StorageUnit(disk_fs / "u") as u:
        assert [v.name for v in u.volumes()] == ["Keep"]
        assert np.array_equal(u.volume("Keep").read(0, TRACK), pattern(7))


def test_close_on_a_full_filesystem_is_a_clean_error_and_loses_nothing(disk_fs):
    """A thick unit's close() with no room to checkpoint its WAL: on main a
    raw sqlite3.OperationalError (and the unit left half-closed); now a
    NoSpaceError after everything is released, and every committed change
    is there at the next open, with room or without."""
    u = StorageUnit(disk_fs / "u")
    s = u.create_volume("S", 64, TRACK)
    t = u.create_volume("T", 64, TRACK)
    s.write(0, pattern(3))
    fastfc.FlashCopy(s, t, background_copy=False, record=True)
    for i in range(40):                       # rows in the WAL, not yet in unit.db
        u.create_volume(f"V{i}", 1, 4096)
    fill_up(disk_fs)
    try:
        u.close()
    except NoSpaceError as e:
        assert "unit.db-wal" in str(e)
    assert s.closed and t.closed
    for attempt in ("full", "room"):
        if attempt == "room":
            free_up(disk_fs)
        with StorageUnit(disk_fs / "u") as u:     # the lock was released
            assert len(u.volumes()) == 42 and len(u.flashcopies) == 1
            assert np.array_equal(u.volume("T").read(0, TRACK), pattern(3))
            assert u.flashcopies[0].record




def test_serve_thin_writes_until_the_filesystem_is_full(disk_fs):
    """``fastfc serve`` with a thin volume written track by track through
    NBD (qemu-io) until the filesystem is full: the server answers ENOSPC
    and lives on (on main it died with SIGBUS, exit 135), and every write
    it acknowledged is in the volume."""
    from test_serve import need, serving, uri
    need("qemu-io")
    unit, sock = disk_fs / "u", disk_fs.parent / f"{disk_fs.name}.sock"
    with StorageUnit(unit) as u:
        u.create_volume("T", 16384, TRACK, thin=True)         # 1 GiB
    # the writes through NBD fill the last 16 MiB (the filler takes the rest:
    # it is running out of room that is tested, not how much room there was)
    room = 16 << 20
    fill_up(disk_fs, leave=room)
    n = room // TRACK + 64                                    # more than the room
    cmds = "".join(f"write -P {t % 251 + 1} {t * TRACK} {TRACK}\n" for t in range(n))
    with serving(unit, sock) as proc:
        r = subprocess.run(["qemu-io", "-f", "raw", uri(sock, "T")], input=cmds,
                           capture_output=True, text=True, timeout=600)
        out = r.stdout + r.stderr
        assert proc.poll() is None, (proc.returncode, out[-2000:])
        assert "No space left on device" in out, out[-2000:]
        done = out.count(f"wrote {TRACK}/{TRACK} bytes")
        assert done > 100, out[-2000:]
    # acknowledged writes are in order until the first refusal (one client,
    # one request at a time); some after it may land once room reappears
    with StorageUnit(unit, readonly=True) as u:
        v = u.volume("T")
        written = [t for t in range(n) if v.read(t * TRACK, TRACK).any()]
        assert len(written) >= done
        for t in written:
            assert np.array_equal(v.read(t * TRACK, TRACK), pattern(t)), t
