"""Volumes: a byte array cut into fixed-size tracks, in memory or on a file."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from fastfc import _core
from fastfc.errors import VolumeClosedError

MIN_TRACK = 512
MAX_TRACK = 16 * 1024 * 1024
DEFAULT_TRACK = 65536


class Volume(_core.VolumeBase):
    """A volume of ``n_tracks * track_size`` bytes.

    Parameters
    ----------
    n_tracks : int
        Number of tracks, at least 1.
    track_size : int
        Bytes per track: a power of two from 512 B to 16 MiB (default 64 KiB,
        a DS8000 fixed-block track).
    path : str or os.PathLike, optional
        Back the volume with this file through ``numpy.memmap``. An existing
        file of the right size is opened with its data; a missing one is
        created (zero-filled); a file of another size is refused.
    name : str, optional
        A label for ``repr`` and the command line.

    Notes
    -----
    Host I/O (:meth:`read`, :meth:`write`, :meth:`read_batch`,
    :meth:`write_batch`, :meth:`readinto`) goes through the volume's I/O path,
    which consults every FlashCopy relationship and PPRC pair the volume is
    part of. :attr:`array` is the raw backing store, for tests and benchmarks.

    Locking: one re-entrant lock per volume guards its data, its flags and
    the bitmaps of the relationships in which it is the source.
    """

    #: The :class:`~fastfc.unit.StorageUnit` holding this volume, if any.
    unit = None

    def __init__(self, n_tracks: int, track_size: int = DEFAULT_TRACK, *,
                 path: str | os.PathLike | None = None, name: str | None = None) -> None:
        n_tracks = _as_int(n_tracks, "n_tracks")
        track_size = _as_int(track_size, "track_size")
        if n_tracks < 1:
            raise ValueError(f"a volume needs at least one track, got n_tracks={n_tracks}")
        if not (MIN_TRACK <= track_size <= MAX_TRACK) or track_size & (track_size - 1):
            raise ValueError(
                f"track_size must be a power of two from {MIN_TRACK} to {MAX_TRACK}, "
                f"got {track_size}")
        capacity = n_tracks * track_size
        self.path = Path(path) if path is not None else None
        self.name = name or (self.path.stem if self.path else f"vol{self.vid}")
        if self.path is None:
            array = np.zeros(capacity, dtype=np.uint8)
        else:
            if self.path.exists():
                size = self.path.stat().st_size
                if size != capacity:
                    raise ValueError(
                        f"{self.path} holds {size} bytes, but {n_tracks} tracks of "
                        f"{track_size} bytes need {capacity}")
                array = np.memmap(self.path, dtype=np.uint8, mode="r+", shape=(capacity,))
            else:
                array = np.memmap(self.path, dtype=np.uint8, mode="w+", shape=(capacity,))
        self._attach(array, track_size)
        # PPRC updates then write only the 4 KiB pages that change: on a file
        # whose pages go to a disk, a clean page costs no writeback. In memory
        # (tmpfs included) a whole-track copy is cheaper than comparing.
        self._file_backed = self.path is not None and not _in_memory_fs(self.path)

    # -- lifecycle ----------------------------------------------------------
    def flush(self) -> None:
        """Write a file-backed volume's dirty pages to its file (``msync``)."""
        self._lock()
        try:
            if self.closed:
                raise VolumeClosedError(f"{self!r} is closed")
            if isinstance(self.array, np.memmap):
                self.array.flush()
        finally:
            self._unlock()

    def close(self) -> None:
        """Flush (if file-backed) and release the backing store. Any later
        I/O raises :class:`~fastfc.errors.VolumeClosedError`. Idempotent."""
        self._lock()
        try:
            if self.closed:
                return
            array = self._detach()
            if isinstance(array, np.memmap):
                array.flush()
                mm = getattr(array, "_mmap", None)
                del array
                if mm is not None:
                    try:
                        mm.close()
                    except BufferError:
                        pass  # a view is still alive; the mapping goes with it
        finally:
            self._unlock()

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
    def write_inhibited(self) -> bool:
        return bool(self._inhibits)

    def __repr__(self) -> str:
        state = "closed" if self.closed else f"{self.n_tracks}x{self.track_size}B"
        where = f" at {str(self.path)!r}" if self.path else ""
        return f"<Volume {self.name} {state}{where}>"


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
