"""Volumes: a byte array cut into fixed-size tracks, in memory or on a file."""

from __future__ import annotations

import errno
import hashlib
import mmap
import os
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterable, Iterator

import numpy as np

from fastfc import _core
from fastfc.errors import NoSpaceError, VolumeClosedError
from fastfc.storage.store import MEMORY, Store

MIN_TRACK = 512
MAX_TRACK = 16 * 1024 * 1024
DEFAULT_TRACK = 65536


class Volume(_core.VolumeBase):
    """A volume of ``n_tracks * track_size`` bytes.

    ``Volume.closes`` changes with every call of :meth:`close` (of any
    volume), as it begins and once the volume is closed: a caller that found
    none of its volumes closed need not look again while it stays the same.

    Parameters
    ----------
    n_tracks : int
        Number of tracks, at least 1.
    track_size : int
        Bytes per track: a power of two from 512 B to 16 MiB (default 64 KiB,
        a DS8000 fixed-block track).
    path : str or os.PathLike, optional
        Back the volume with this file, memory-mapped. An existing file of the
        right size is opened with its data; a missing one is created
        (zero-filled); a file of another size is refused.
    name : str, optional
        A label for ``repr`` and the command line.
    store : Store, optional
        The metadata store that records this volume and the relationships
        and pairs it takes part in: given by the storage unit that makes the
        volume; :data:`~fastfc.storage.store.MEMORY` (keeps nothing) if None.
    thin : bool
        File-backed volumes only. ``False`` (default, thick): a new file gets
        all its blocks at create (``posix_fallocate``), so a filesystem
        without room refuses the create with
        :class:`~fastfc.errors.NoSpaceError` and leaves no file. ``True``: the
        file stays sparse, and every path that lands data on the volume (host
        writes, copy-on-write, background copy, reverse restore, PPRC
        updates) first reserves the blocks of the tracks it touches for the
        first time (on a disk filesystem, of the aligned chunks of
        ``_core.THIN_CHUNK`` bytes, 2 MiB, that hold them, so that no
        page-cache folio spans blocks and a hole: a store into one would need
        blocks inside the page fault, SIGBUS when there are none); a full
        filesystem then refuses the call with
        ``NoSpaceError`` before any byte lands or any bitmap changes. On
        tmpfs, where reading a hole takes a page too, reads reserve as well
        (and :attr:`array` reserves the whole volume). When opening an
        existing file, say how it was made (a storage unit records it); its
        grains that hold data are found with ``SEEK_DATA``.
    grain_size : int, optional
        The unit in which the engine records changes and copies (its bitmaps
        have one bit per grain): a power of two from 512 B up to the track.
        Default: the track, or 4 KiB (``_core.GRAIN``) when the track is
        larger, so that a 4 KiB write into a 64 KiB track copies 4 KiB to a
        FlashCopy target or a PPRC secondary, not 64 KiB. The track stays the
        unit users see (sizes, ``tracks_to_copy``, the command line).

    Notes
    -----
    Host I/O (:meth:`read`, :meth:`write`, :meth:`read_batch`,
    :meth:`write_batch`, :meth:`readinto`) goes through the volume's I/O path,
    which consults every FlashCopy relationship and PPRC pair the volume is
    part of. :attr:`array` is a read-only view of the physical bytes; it, and
    every array taken from it, stays valid after :meth:`close` (the memory
    is freed when the last one dies).

    Locking: one re-entrant lock per volume guards its data, its flags and
    the bitmaps of the relationships in which it is the source.
    """

    #: The metadata store handed to this volume when it was made (see ``store``).
    store: Store = MEMORY
    closes = 0           # calls of close(), every volume's
    #: The storage unit holding this volume, if any: set by the unit, for the
    #: tools; nothing below the unit reads it (it reads :attr:`store`).
    # (a StorageUnit: a floor above this module, so typed Any, not named)
    unit: Any = None

    def __init__(self, n_tracks: int, track_size: int = DEFAULT_TRACK, *,
                 path: str | os.PathLike | None = None, name: str | None = None,
                 thin: bool = False, store: Store | None = None,
                 grain_size: int | None = None) -> None:
        n_tracks = _as_int(n_tracks, "n_tracks")
        track_size = _as_int(track_size, "track_size")
        if n_tracks < 1:
            raise ValueError(f"a volume needs at least one track, got n_tracks={n_tracks}")
        if not (MIN_TRACK <= track_size <= MAX_TRACK) or track_size & (track_size - 1):
            raise ValueError(
                f"track_size must be a power of two from {MIN_TRACK} to {MAX_TRACK}, "
                f"got {track_size}")
        if grain_size is None:
            grain_size = min(track_size, _core.GRAIN)
        grain_size = _as_int(grain_size, "grain_size")
        if not (MIN_TRACK <= grain_size <= track_size) or grain_size & (grain_size - 1):
            raise ValueError(
                f"grain_size must be a power of two from {MIN_TRACK} to the track size "
                f"({track_size}), got {grain_size}")
        capacity = n_tracks * track_size
        n_grains = capacity // grain_size
        if store is not None:
            self.store = store
        self.path = Path(path) if path is not None else None
        self.name = name or (self.path.stem if self.path else f"vol{self.vid}")
        self._mm: mmap.mmap | None = None
        if self.path is None:
            if thin:
                raise ValueError("thin applies to file-backed volumes (give a path)")
            self._attach(np.zeros(capacity, dtype=np.uint8), track_size,
                         grain_size=grain_size)
        else:
            on_disk = not _in_memory_fs(self.path)
            mm, fd = _map_file(self.path, n_tracks, track_size, bool(thin))
            try:
                # on a disk a thin file gets blocks in whole chunks (see
                # VolumeBase._reserve_runs): a chunk only partly allocated
                # (by an older fastfc) counts as one still to reserve
                unit = max(grain_size, _core.THIN_CHUNK) if on_disk else grain_size
                allocated = _allocated_grains(fd, n_grains, grain_size, unit) if thin else None
                # the array's base holds an export of the mapping: close()
                # unmaps it only once no array of it is left. A thin volume
                # keeps its descriptor (to reserve blocks), a volume on a disk
                # too (PPRC updates reach it with pwrite, not stores through
                # the mapping); close() closes it.
                self._attach(np.frombuffer(mm, dtype=np.uint8), track_size,
                             fd if thin or on_disk else -1, allocated, grain_size)
            except BaseException:
                os.close(fd)
                raise
            self._mm = mm
            if on_disk:
                _page_sized_cache(mm, fd)
                _map_cached_pages(mm, fd)
            elif not thin:
                _map_every_page(mm)
            if not (thin or on_disk):
                os.close(fd)   # the mapping holds its own reference to the file
        # PPRC updates then write only the 4 KiB pages that change (with
        # pwrite: no write fault on a page writeback cleaned), and host writes
        # store with the GIL released; on a file whose pages go to a disk, a
        # clean page costs no writeback. In memory (tmpfs included) a
        # whole-track copy is cheaper than comparing.
        self._file_backed = self.path is not None and on_disk
        # on tmpfs a read fault on a hole takes a page as a write does
        self._reads_allocate = bool(thin) and not self._file_backed

    # -- lifecycle ----------------------------------------------------------
    def flush(self) -> None:
        """Write a file-backed volume's dirty pages to its file (``msync``)."""
        self._lock()
        try:
            if self.closed:
                raise VolumeClosedError(f"{self!r} is closed")
            if self._mm is not None:
                self._mm.flush()
        finally:
            self._unlock()

    def close(self) -> None:
        """Flush (if file-backed) and release the backing store. Any later
        I/O raises :class:`~fastfc.errors.VolumeClosedError`. Idempotent.

        The mapping and its file are released at once unless an array of the
        volume's memory (from :attr:`array`) is still alive: then the mapping
        stays until the last such array is gone, so none ever points at
        unmapped memory."""
        Volume.closes += 1          # (before: a look that saw none closed may be stale)
        fd = self._detach()
        Volume.closes += 1          # (and after: so may one made while it waited for the lock)
        if fd is None:
            return
        mm, self._mm = self._mm, None
        if mm is not None:
            mm.flush()
            try:
                mm.close()
            except BufferError:
                pass  # an array still uses the mapping; it goes with the last one
        if fd >= 0:
            os.close(fd)

    def _valid_again(self) -> None:
        """A whole-volume host write gave an invalid volume a valid image:
        record it in the store (the volume's lock is held)."""
        self.store.set_volume_flags(self.flags_record())

    def flags_record(self) -> dict:
        """The flags a store records: ``name``, ``secondary``, ``invalid``."""
        return {"name": self.name, "secondary": bool(self._secondary),
                "invalid": bool(self._invalid)}

    def __enter__(self) -> "Volume":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # -- introspection ------------------------------------------------------
    @property
    def valid(self) -> bool:
        """False after a FlashCopy onto it was withdrawn before completing."""
        return not self._invalid

    @property
    def relationships(self) -> list:
        """FlashCopy relationships in which this volume is source or target."""
        rels = list(self._src_rels)
        if self._tgt_rel is not None:
            rels.append(self._tgt_rel)
        return rels

    @property
    def source_relationships(self) -> list:
        """FlashCopy relationships in which this volume is the source."""
        return list(self._src_rels)

    @property
    def target_relationship(self):
        """The FlashCopy relationship in which this volume is the target, or None."""
        return self._tgt_rel

    @property
    def mirror(self):
        """The PPRC pair in which this volume is the primary, or None."""
        return self._mirror

    @property
    def restoring(self):
        """The restore giving this volume a recovery point's image while
        its copy runs (a ``PointRestore``: the volume is read-only until it
        completes), or None."""
        return self._restoring

    @property
    def is_secondary(self) -> bool:
        """Whether this volume is a PPRC secondary (it refuses host writes)."""
        return bool(self._secondary)

    def set_flags(self, *, secondary: bool | None = None, valid: bool | None = None) -> None:
        """Set the flags a store records (:meth:`flags_record`): whether the
        volume is a PPRC secondary (it then refuses host writes) and whether
        it holds a valid image. For the steps that own them (a pair's
        failover and its recovery, a unit restoring its rows, a refused
        session putting a C back as it was); the caller records them."""
        if secondary is not None:
            self._secondary = bool(secondary)
        if valid is not None:
            self._invalid = not valid

    def set_mirror(self, hook) -> None:
        """Make ``hook`` (a PPRC pair's mirror hook, ``fastfc._core.MirrorBase``,
        or None) the one every host write of this volume consults: how a
        unit keeps recording a primary's writes while its pair waits for its
        secondary's unit. The caller holds the volume's lock (``locked``)."""
        self._mirror = hook

    @property
    def write_inhibited(self) -> bool:
        # (or a session's FlashCopy phase holds the B of a relationship it did not step)
        return bool(self._inhibits) or _core.source_gated(self._src_rels)

    def __repr__(self) -> str:
        state = "closed" if self.closed else f"{self.n_tracks}x{self.track_size}B"
        where = f" at {str(self.path)!r}" if self.path else ""
        return f"<Volume {self.name} {state}{where}>"


def _map_file(path: Path, n_tracks: int, track_size: int, thin: bool) -> tuple[mmap.mmap, int]:
    """Map ``path`` read-write; returns the mapping and an open descriptor.

    A missing file is created at full size: thick, with every block allocated
    now; thin, sparse. Whatever goes wrong (no room, a size the filesystem
    cannot hold, no address space), no file is left behind."""
    capacity = n_tracks * track_size
    what = f"a volume of {n_tracks} tracks of {track_size} bytes ({capacity} bytes)"
    if path.exists():
        size = path.stat().st_size
        if size != capacity:
            raise ValueError(f"{path} holds {size} bytes, but {n_tracks} tracks of "
                             f"{track_size} bytes need {capacity}")
        fd = os.open(path, os.O_RDWR | getattr(os, "O_CLOEXEC", 0))
        try:
            return mmap.mmap(fd, capacity), fd
        except BaseException:
            os.close(fd)
            raise
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0), 0o666)
    try:
        try:
            if not thin:
                st = os.statvfs(fd)
                free = st.f_bavail * st.f_frsize
                if capacity > free:
                    raise NoSpaceError(
                        f"{what} needs {capacity} bytes, but the filesystem of {path} has "
                        f"{free} bytes free; create it thin=True to allocate on first "
                        "write, or free space")
            os.ftruncate(fd, capacity)
            if not thin:
                os.posix_fallocate(fd, 0, capacity)
            mm = mmap.mmap(fd, capacity)
        except OSError as e:
            if e.errno in (errno.ENOSPC, errno.EDQUOT):
                raise NoSpaceError(f"{what} at {path}: the filesystem has no room for "
                                   f"it ({e.strerror}); nothing was created") from None
            if e.errno in (errno.EFBIG, errno.EINVAL, errno.ENOMEM, errno.EOVERFLOW):
                raise ValueError(f"{what} at {path} is larger than this system allows "
                                 f"for one memory-mapped file ({e.strerror}); nothing was "
                                 "created") from None
            raise
    except BaseException:
        os.close(fd)
        path.unlink(missing_ok=True)
        raise
    return mm, fd


def _page_sized_cache(mm: mmap.mmap, fd: int) -> None:
    """Keep the page cache of a volume file on a disk in 4 KiB folios.

    The kernel builds large folios (up to 2 MiB) for a file that is read
    ahead, and a mapping's faults read ahead. On ext4 a store into a clean
    page of a large folio then write-faults the whole folio
    (``page_mkwrite`` walks and dirties every block of it), and writeback
    writes all of it: a 4 KiB host write costs the disk up to 2 MiB, and a
    4 KiB ``pwrite`` into such a folio walks its 512 block heads twice.
    Faults without read-ahead (``MADV_RANDOM``) and reads without it
    (``POSIX_FADV_RANDOM``) create single pages, so a write costs what it
    writes. Best effort: a system without the advice keeps its default."""
    try:
        mm.madvise(mmap.MADV_RANDOM)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_RANDOM)
    except (AttributeError, OSError):
        pass


MADV_POPULATE_READ = getattr(mmap, "MADV_POPULATE_READ", 22)   # Linux 5.14


def _map_cached_pages(mm: mmap.mmap, fd: int) -> None:
    """Map the pages of a volume file on a disk that the page cache holds.

    A fresh mapping has none of its pages in the page table, and the first
    access to each takes a fault. A read fault maps a run of neighbours as
    well (fault-around, 16 pages, whatever ``MADV_RANDOM`` says), so the
    drain, which compares B's and C's current pages with what it is about to
    write, paid about 4 us per 4 KiB grain in read faults (40 % of its cost
    per grain; ``docs/measurements/deployments.md``) until it had looked at
    every 64 KiB of B and C once: a few seconds after a unit opened under
    200 MB/s of random writes over 3 GiB, hours for a TiB under less. The pages already cached are
    mapped now (about 5 ms per 64 MiB cached), read-only as a fault would
    map them, so a store still marks its page dirty; none is read from the
    disk, and the spans with nothing cached are skipped whole (a cold 64 GiB
    volume opens in about a millisecond). Best effort: a kernel without
    ``cachestat`` (before 6.5) keeps the faults."""
    try:
        _core.map_resident_pages(mm, fd)
    except (OSError, ValueError, BufferError):
        pass


def _map_every_page(mm: mmap.mmap) -> None:
    """Map every page of a full volume in memory (tmpfs) now.

    Its pages exist already (the file is allocated whole), but a fresh
    mapping has none of them in its page table: the first store into each
    4 KiB page takes a fault, and a host write that faults holds the GIL
    through it. A reopened unit then starts with a fault storm that stalls
    its Global Mirror session for seconds. One ``MADV_POPULATE_READ`` maps
    them all in a few ms per 64 MiB (a read fault on tmpfs maps the page
    writable: no dirty tracking there). Best effort: an older kernel keeps
    the faults."""
    try:
        mm.madvise(MADV_POPULATE_READ)
    except (AttributeError, OSError, ValueError):
        pass


def _allocated_grains(fd: int, n_grains: int, grain_size: int,
                      unit: int) -> "_core.TrackBitmap":
    """The grains of a thin volume's file that hold blocks already (from
    ``SEEK_DATA``/``SEEK_HOLE``), counted in whole aligned ``unit`` bytes
    (a grain, or a chunk on a disk); others are reserved on first touch."""
    bm = _core.TrackBitmap(n_grains)
    capacity = n_grains * grain_size
    pos = 0
    try:
        while pos < capacity:
            try:
                data = os.lseek(fd, pos, os.SEEK_DATA)
            except OSError as e:
                if e.errno == errno.ENXIO:
                    break   # only holes from pos on
                raise
            hole = min(os.lseek(fd, data, os.SEEK_HOLE), capacity)
            first = -(-data // unit) * unit // grain_size
            last = n_grains if hole == capacity else hole // unit * unit // grain_size
            if last > first:
                bm.set_range(first, last)
            pos = hole
    except OSError:
        bm.fill(False)   # no SEEK_DATA here: reserve every grain on first touch
    return bm


def _in_memory_fs(path: Path) -> bool:
    """Whether ``path`` lives on tmpfs or ramfs (its pages never go to a disk)."""
    try:
        target = os.path.realpath(path)
        best, fstype = "", ""
        with open("/proc/mounts") as f:
            for line in f:
                fields = line.split()
                if len(fields) < 3:
                    continue
                mount = fields[1].replace("\\040", " ")
                if (target == mount or target.startswith(mount.rstrip("/") + "/")) \
                        and len(mount) > len(best):
                    best, fstype = mount, fields[2]
        return fstype in ("tmpfs", "ramfs")
    except OSError:
        return False


def _as_int(value, what: str) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise TypeError(f"{what} must be an integer, got {type(value).__name__}")
    return int(value)


#: bytes of a grain's digest (:func:`grain_digests`)
DIGEST_BYTES = 16
_DIGEST_CHUNK = 4 << 20      # bytes read per call while digesting


def grain_digests(volume: Any, start: int = 0, stop: int | None = None) -> np.ndarray:
    """A digest (BLAKE2b, :data:`DIGEST_BYTES` bytes) of each grain
    ``start``..``stop`` of ``volume``'s logical image (anything with
    ``read(offset, length)``, ``grain_size`` and ``n_grains``), as a
    ``(stop - start, DIGEST_BYTES)`` uint8 array. Two grains with equal
    digests hold equal data (short of a BLAKE2b collision): how the two
    sides of a pair find the grains they differ in without sending them.
    Reads ``_DIGEST_CHUNK`` bytes at a time through the I/O path."""
    g = int(volume.grain_size)
    n = int(volume.n_grains)
    stop = n if stop is None else int(stop)
    if not 0 <= start <= stop <= n:
        raise IndexError(f"grains {start}..{stop} outside 0..{n} of {volume!r}")
    per = max(1, _DIGEST_CHUNK // g)
    blake = hashlib.blake2b
    parts = []
    for k0 in range(start, stop, per):
        k1 = min(stop, k0 + per)
        view = np.ascontiguousarray(volume.read(k0 * g, (k1 - k0) * g)).data.cast("B")
        parts.append(b"".join([blake(view[j:j + g], digest_size=DIGEST_BYTES).digest()
                               for j in range(0, (k1 - k0) * g, g)]))
    return np.frombuffer(b"".join(parts), np.uint8).reshape(stop - start, DIGEST_BYTES)


@contextmanager
def locked(volumes: Iterable[_core.VolumeBase]) -> Iterator[None]:
    """Hold the locks of ``volumes`` (deduplicated) in volume-id order."""
    ordered = sorted({id(v): v for v in volumes}.values(), key=lambda v: v.vid)
    taken = []
    try:
        for v in ordered:
            v._lock()
            taken.append(v)
        yield
    finally:
        for v in reversed(taken):
            v._unlock()


def check_pairable(a: Volume, b: Volume, what: str) -> None:
    """Refuse a copy relationship between ``a`` and ``b`` (a FlashCopy or a
    PPRC pair, named by ``what``) when either is closed, they are the same
    volume, or they differ in geometry."""
    for v in (a, b):
        if v.closed:
            raise VolumeClosedError(f"{v!r} is closed")
    if a is b:
        raise ValueError(f"{a!r} cannot be a {what} of itself")
    if (a.n_tracks, a.track_size) != (b.n_tracks, b.track_size):
        raise ValueError(
            f"{a!r} and {b!r} differ in geometry; a {what} needs the same number "
            "and size of tracks")
    if a.grain_size != b.grain_size:
        raise ValueError(
            f"{a!r} and {b!r} differ in grain ({a.grain_size} and {b.grain_size} "
            f"bytes); a {what} needs the same grain on both")
