"""Recovery points: many immutable, space-efficient images of a volume,
each restorable at once.

A volume's points form a chain (:class:`PointChain`), oldest first. Each is a
thin, cascaded NOCOPY copy: only the newest point receives copy-on-write, so
a host write copies at most one grain once however many points are held, and
a point keeps only the grains that changed between it and the next point
(plus a grain table of a few bytes per grain). Point *i*'s image of a grain
is the first of points *i* .. newest that holds it, else the live volume.

- :func:`take_points` takes points of several volumes at one instant (their
  locks held together, as a consistency-group FlashCopy does);
  :meth:`PointChain.take` takes one.
- A point is immutable until it expires: it has no write path
  (:meth:`RecoveryPoint.write` refuses), its retention can be extended but
  never shortened, and it cannot expire before its retention ends or while a
  restore reads through it (:class:`~fastfc.errors.ImmutablePointError`).
  Expiring the oldest point drops its grains; expiring another gives its
  older neighbour the grains that neighbour lacks (whose values are the
  neighbour's own), so every other point reads exactly as before.
- :meth:`RecoveryPoint.restore` gives a recovery volume the point's image at
  once (a bitmap is set; reads go through the chain until the background
  copy completes; the volume is read-only until then).
  :meth:`RecoveryPoint.restore_onto_source` puts the image back on the
  volume itself, when the caller says it is quiesced; it copies the grains
  changed since the point (through the write path, so newer points keep
  their images).

Points live in memory; a storage unit makes its volumes' chains durable
(:mod:`fastfc.durable.points`: the pool in a file, every change logged).
A volume with points can be a FlashCopy target (the C of a Global Mirror
session): a point reads the target's logical image (through to its source
where a grain is still to copy), and a step that changes that image without
a host write (a resync or establish, a revert, a withdraw) first has the
newest point take the grains it changes (fastfc/_points_target.pxi). A
volume with points cannot be a PPRC secondary (its image changes by PPRC
updates that the session's FlashCopy, not a point, is for). A
chain stays on its volume when its last point expires (with its clock); it
costs a write nothing then but a test, and refuses nothing.

Locking: a chain and its points are guarded by the volume's lock; a restore
holds the volume's and the recovery volume's locks in volume-id order.
"""

from __future__ import annotations

import contextlib
import math
import operator
import threading
import time
from typing import Callable, Iterator, Sequence

import numpy as np

from fastfc import _core
from fastfc._core import TrackBitmap
from fastfc._numbers import check_real
from fastfc.errors import (ImmutablePointError, IncompleteCopyError, LimitError, StateError,
                           VolumeClosedError)
from fastfc.storage.volume import Volume, locked

# background copy of a restore: grains' bytes per hold of the locks
CHUNK_BYTES = 4 * 1024 * 1024


def _check_can_hold_points(volume: Volume) -> None:
    """Refuse points on a volume whose image changes outside the write path."""
    if not isinstance(volume, Volume):
        raise TypeError(f"recovery points are taken of a fastfc.Volume, not "
                        f"{type(volume).__name__}")
    if volume.closed:
        raise VolumeClosedError(f"{volume!r} is closed")
    if volume._secondary:
        raise LimitError(f"{volume!r} is a PPRC secondary; recovery points of a secondary "
                         "are not supported")
    if volume._restoring is not None:
        raise StateError(f"{volume!r} is taking a recovery point's image; wait for its "
                         "restore to complete")
    if volume._invalid:
        raise StateError(f"{volume!r} holds no valid image")
    _check_not_below_a_cascade(volume)


def _check_not_below_a_cascade(volume: Volume) -> None:
    """A point of a FlashCopy target reads the grains the target has not
    copied yet on its source; where that source is itself a target (a
    cascade above the volume) they would be one level further up, which
    points do not follow: refused."""
    r = volume._tgt_rel
    if r is not None and r.source._tgt_rel is not None:
        raise LimitError(f"{volume!r} is the target of {r.source!r}, itself a FlashCopy "
                         "target: recovery points of a volume with a cascade above it are "
                         "not supported")


class PointChain(_core.PointChainBase):
    """The recovery points of one volume (see the module docstring).

    Use :meth:`of` to get a volume's chain. ``clock`` (seconds, like
    ``time.time``) is what retention is measured by; tests hand down their own.
    """

    volume: Volume

    def __init__(self, volume: Volume, *, clock: Callable[[], float] = time.time) -> None:
        self.clock = clock
        with locked([volume]):
            _check_can_hold_points(volume)
            self._attach(volume)

    @classmethod
    def of(cls, volume: Volume, *, clock: Callable[[], float] | None = None) -> "PointChain":
        """``volume``'s chain, made (with ``clock``, default ``time.time``)
        if it has none."""
        with locked([volume]):
            chain = volume._chain
            if chain is None:
                return cls(volume, clock=clock or time.time)
            if clock is not None:
                chain.clock = clock
            return chain

    @staticmethod
    def chain_of(volume: Volume) -> "PointChain | None":
        """``volume``'s chain, or None."""
        return volume._chain

    # -- durable chains (storage units: fastfc.durable.points) ------------------
    def make_durable(self, pool_fd: int, *, private: bool = False) -> None:
        """Keep the grain pool in ``pool_fd``'s file (mapped shared; privately
        if ``private``: a read-only unit). While empty. The log is opened by
        :meth:`open_log`."""
        with locked([self.volume]):
            self._durable(pool_fd, private)

    def open_log(self, log_fd: int, valid: int = 0, *, ordered: bool = False) -> None:
        """Log every change of the chain to the file ``log_fd`` from now on
        (mapped shared, grown in chunks: see fastfc/_points_log.pxi), after
        its first ``valid`` records (0: a new log). ``ordered`` (durability
        "power"): each save syncs the pool, then its records, before the
        host write lands; a take or an expiry syncs its record."""
        with locked([self.volume]):
            self._open_log(log_fd, valid, ordered)

    def stop_log(self) -> None:
        """Log nothing more (its file is being closed)."""
        with locked([self.volume]):
            self._stop_log()

    def compacted_log(self) -> np.ndarray:
        """The shortest log that rebuilds this chain as it is: an (n, 3)
        int64 array of records (:meth:`replay` takes it)."""
        with locked([self.volume]):
            return _core.point_log_compacted(self)

    def replay(self, records: np.ndarray) -> dict[int, "RecoveryPoint"]:
        """Rebuild a fresh chain (its pool made durable, no log open) from
        its log's ``records`` (an (n, 3) int64 array). Returns the live
        points by seq. A record that does not fit raises ValueError."""
        by_seq: dict[int, RecoveryPoint] = {}
        with locked([self.volume]):
            if self.points or self.next_point_seq:
                raise StateError(f"{self!r} is not fresh; only a fresh chain replays a log")
            for kind, a, b in records.tolist():
                if kind == 1:
                    self._replay_save(a, b)
                elif kind == 2:
                    p = RecoveryPoint()
                    self._take(p)
                    if p.seq != a:
                        raise ValueError(f"point #{a} of the log was taken as #{p.seq}")
                    by_seq[a] = p
                elif kind == 3:
                    gone = by_seq.pop(a, None)
                    if gone is None:
                        raise ValueError(f"point #{a} of the log expired but is not held")
                    self._expire(gone)
                elif kind == 4:
                    self._replay_next_seq(a)
                else:
                    raise ValueError(f"unknown record kind {kind} in the log")
            for p in self.points:
                p.group = (p,)
        return by_seq

    def drop(self, point: "RecoveryPoint") -> None:
        """Expire ``point`` whatever its retention: a point whose take never
        returned (a durable unit found it in the log without its record)."""
        with locked([self.volume]):
            self._remove(point)

    # -- taking ----------------------------------------------------------------
    def take(self, *, retain_for: float = 0.0, name: str | None = None) -> "RecoveryPoint":
        """Take a point of the volume now: O(1), nothing is copied.
        ``retain_for``: seconds before it may expire (0: at any time)."""
        return take_points([self.volume], retain_for=retain_for, name=name)[0]

    # -- expiring -----------------------------------------------------------------
    def expire(self, point: "RecoveryPoint") -> None:
        """Expire ``point`` (see :meth:`RecoveryPoint.expire`)."""
        point.expire()

    def expire_oldest(self, count: int = 1) -> int:
        """Expire up to ``count`` of the oldest points, stopping at the first
        still retained or read by a restore; returns how many expired."""
        done = 0
        with locked([self.volume]):
            while done < count and self.points:
                p = self.points[0]
                if p._refusal(self.clock()) is not None:
                    break
                self._remove(p)
                done += 1
        return done

    def expire_due(self) -> int:
        """Expire, oldest first, every point whose retention has ended and
        which no restore reads through; returns how many expired."""
        done = 0
        with locked([self.volume]):
            now = self.clock()
            for p in list(self.points):
                if p._refusal(now) is None:
                    self._remove(p)
                    done += 1
        return done

    def _remove(self, point: "RecoveryPoint") -> None:
        """Expire ``point`` (checked by the caller; the lock held)."""
        self._expire(point)

    def reserve(self, nbytes: int) -> int:
        """Provision room for ``nbytes`` of saved grains now (as a DS8000
        provisions Safeguarded capacity): the pool's memory is allocated and
        touched here, so copy-on-write into it never waits for fresh pages,
        and it is kept when points expire. Returns the bytes of room free."""
        if isinstance(nbytes, bool) or not isinstance(nbytes, (int, np.integer)):
            raise TypeError(f"nbytes must be an integer, got {type(nbytes).__name__}")
        with locked([self.volume]):
            return self._reserve_pool(int(nbytes))

    # -- what tools show ------------------------------------------------------------
    @property
    def space_bytes(self) -> int:
        """Bytes the points use: grains held, grain tables, and the chain's
        bitmap of held grains and table of each grain's newest holder."""
        return (self.pool_bytes + sum(p.table_bytes for p in self.points)
                + self.held.nbytes + self.links_bytes)

    def __repr__(self) -> str:
        return (f"<PointChain of {self.volume!r}: {len(self.points)} points, "
                f"{self.pool_bytes} bytes of grains>")


class RecoveryPoint(_core.PointBase):
    """One immutable image of a volume (see the module docstring).

    ``taken_at`` and ``retain_until`` are on the chain's clock; ``name`` is a
    label; ``group`` the points taken with it at the same instant. Made by
    :func:`take_points` (or :meth:`PointChain.take`), never directly.
    """

    __slots__ = ()
    chain: PointChain

    @property
    def volume(self) -> Volume:
        if self.chain is None:
            raise StateError("this recovery point was never taken")
        return self.chain.volume

    def __repr__(self) -> str:
        where = "expired" if self.expired else f"#{self.seq} of {self.chain.volume!r}"
        label = f" {self.name!r}" if self.name else ""
        return f"<RecoveryPoint{label} {where}, {self.saved_grains} grains>"

    # -- reading ---------------------------------------------------------------
    def read(self, offset: int, length: int) -> np.ndarray:
        """The point's bytes ``[offset, offset + length)`` as a new array."""
        if self.chain is None:
            raise StateError("this recovery point was never taken")
        return self.chain._read(self, offset, length)

    def image(self) -> np.ndarray:
        """The point's whole image."""
        return self.read(0, self.volume.capacity)

    @property
    def space_bytes(self) -> int:
        """Bytes it uses: its grains and its grain table."""
        return self.saved_grains * self.chain.grain_size + self.table_bytes

    # -- immutability ---------------------------------------------------------------
    def write(self, offset: int, data) -> None:
        """Refused, always: a recovery point is immutable. Restore it onto a
        recovery volume (:meth:`restore`) and write there."""
        raise ImmutablePointError(
            f"{self!r} is immutable; restore it onto a recovery volume to change a copy")

    def retain(self, until: float) -> None:
        """Keep the point until ``until`` (the chain's clock) at least: the
        retention can only grow; a shorter one is refused."""
        until = check_real("until", until)
        if math.isnan(until):
            raise ValueError("until must be a number, not NaN")
        with locked([self.volume]):
            self._require_live()
            if until < self.retain_until:
                raise ImmutablePointError(
                    f"{self!r} is retained until {self.retain_until}; a retention cannot be "
                    f"shortened (to {until})")
            self.retain_until = until

    def _refusal(self, now: float) -> Exception | None:
        """Why the point cannot expire now, or None. Lock held."""
        if self.expired:
            return StateError(f"{self!r} has expired already")
        if now < self.retain_until:
            return ImmutablePointError(
                f"{self!r} is retained for {self.retain_until - now:.3f} s more; it cannot "
                "expire before its retention ends")
        if self.pins:
            return ImmutablePointError(
                f"{self!r} is being restored onto a recovery volume ({self.pins} restore(s) "
                "read through it); wait for them or withdraw them first")
        return None

    def _require_live(self) -> None:
        if self.expired:
            raise StateError(f"{self!r} has expired")

    def expire(self) -> None:
        """Remove the point. Refused while its retention runs or a restore
        reads through it. The oldest point's grains are dropped; another's
        go to its older neighbour where that one lacks them."""
        if self.chain is None:
            raise StateError("this recovery point was never taken")
        chain = self.chain
        with locked([chain.volume]):
            err = self._refusal(chain.clock())
            if err is not None:
                raise err
            chain._remove(self)

    # -- restoring ------------------------------------------------------------------------
    def restore(self, target: Volume, *, background_copy: bool = True) -> "PointRestore":
        """Give ``target`` (a volume of the same geometry, in no copy
        relationship) this point's image now: O(bitmap), nothing is copied
        before it returns. Its reads go through the chain until the copy
        completes (in the background, or by :meth:`PointRestore.copy`);
        ``target`` refuses writes until then."""
        return PointRestore(self, target, background_copy=background_copy)

    def restore_onto_source(self, *, quiesced: bool = False) -> int:
        """Put this point's image back onto its own volume. The caller must
        say the volume is quiesced (``quiesced=True``: no host writes, its
        Global Mirror session paused or ended). Copies the grains changed
        since the point, through the volume's write path: newer points keep
        their images (the newest takes the grains it overwrites), FlashCopy
        targets and mirrors see the writes. Returns the grains written."""
        if quiesced is not True:
            raise StateError(
                f"restoring {self!r} onto its volume needs the volume quiesced (no host "
                "writes, its session paused or ended): pass quiesced=True to say it is")
        V = self.volume
        with _locked_through(None, V):
            self._require_live()
            if V.closed:
                raise VolumeClosedError(f"{V!r} is closed")
            if V.write_inhibited or V._secondary:
                raise StateError(f"{V!r} refuses writes now; the restore would not land")
            chain = self.chain
            changed = np.zeros(V.n_grains, dtype=bool)
            for p in chain.points[self.index:]:
                changed[p.saved()] = True
            mask = TrackBitmap.from_bools(changed)
            g = V.grain_size
            V._reserve_tracks(mask)
            # the image first (the writes below change the chain)
            runs = [(a, b, self.read(a * g, (b - a) * g)) for a, b in mask.runs()]
            for a, _, data in runs:
                V.write(a * g, data)
            return int(changed.sum())


def take_points(volumes: Sequence[Volume], *, retain_for: float = 0.0,
                name: str | None = None,
                clock: Callable[[], float] | None = None) -> list[RecoveryPoint]:
    """Take a point of every volume of ``volumes`` at one instant: their
    locks are held together (in volume-id order) while the points are taken,
    so no write lands between two of them. O(volumes). Either every point
    is taken or none. ``retain_for``: seconds each is kept at least.
    ``clock``: for volumes without a chain yet (default ``time.time``)."""
    volumes = list(volumes)
    if not volumes:
        raise ValueError("take_points needs at least one volume")
    retain_for = check_real("retain_for (seconds)", retain_for)
    if not retain_for >= 0:
        raise ValueError(f"retain_for must be >= 0 seconds, got {retain_for}")
    for v in volumes:
        if not isinstance(v, Volume):
            raise TypeError(f"recovery points are taken of fastfc.Volume objects, not "
                            f"{type(v).__name__}")
        if v._chain is None:
            PointChain.of(v, clock=clock)     # (checks it can hold points)
        else:
            _check_not_below_a_cascade(v)
    ordered = sorted(volumes, key=_by_vid)
    # one instant, one time: the first volume's chain's clock
    now = volumes[0]._chain.clock()
    # (checks that no volume appears twice: they would be neighbours here)
    points = _core.take_many(ordered, RecoveryPoint, now, retain_for, name)
    if ordered != volumes:          # (element by element: volumes compare by identity)
        at = {id(v): p for v, p in zip(ordered, points)}
        points = [at[id(v)] for v in volumes]
    return points


def expire_points(points: Sequence[RecoveryPoint]) -> None:
    """Expire every point of ``points`` (of distinct volumes: a group taken
    at one instant, say) under their volumes' locks held together: all, or
    none if one cannot expire (its retention runs, a restore reads it)."""
    points = list(points)
    for p in points:
        if not isinstance(p, RecoveryPoint) or p.chain is None:
            raise TypeError(f"expire_points takes points that were taken, not {p!r}")
    with locked([p.chain.volume for p in points]):
        for p in points:
            err = p._refusal(p.chain.clock())
            if err is not None:
                raise err
        for p in points:
            p.chain._remove(p)


_by_vid = operator.attrgetter("vid")


@contextlib.contextmanager
def _locked_through(other: Volume | None, volume: Volume) -> Iterator[None]:
    """Hold ``volume``'s lock, ``other``'s (None: none) and, while
    ``volume`` is a FlashCopy target, its source's (a point of a target
    reads through to it), in volume-id order."""
    source = _core.locked_through(other, volume)
    try:
        yield
    finally:
        _core.unlocked_through(other, volume, source)


class PointRestore(_core.PointRestoreBase):
    """A recovery volume taking a recovery point's image (made by
    :meth:`RecoveryPoint.restore`). ``tracks_to_copy`` counts the tracks
    still read through the chain; :meth:`copy` and :meth:`wait` as for a
    FlashCopy; :meth:`withdraw` ends it early (``force``: the recovery
    volume is then marked invalid)."""

    target: Volume

    def __init__(self, point: RecoveryPoint, target: Volume, *,
                 background_copy: bool = True) -> None:
        if not isinstance(point, RecoveryPoint):
            raise TypeError("point must be a RecoveryPoint")
        if not isinstance(target, Volume):
            raise TypeError(f"the recovery volume must be a fastfc.Volume, not "
                            f"{type(target).__name__}")
        V = point.volume
        self._done = threading.Event()
        self._worker: threading.Thread | None = None
        with locked([V, target]):
            point._require_live()
            for v in (V, target):
                if v.closed:
                    raise VolumeClosedError(f"{v!r} is closed")
            if target is V:
                raise ValueError(f"{V!r} cannot be its own recovery volume; use "
                                 "restore_onto_source()")
            if (target.n_tracks, target.track_size, target.grain_size) != (
                    V.n_tracks, V.track_size, V.grain_size):
                raise ValueError(f"{target!r} differs from {V!r} in geometry; a recovery "
                                 "volume needs the same tracks and grain")
            if (target._src_rels or target._tgt_rel is not None or target._mirror is not None
                    or target._secondary or target._chain is not None
                    or target._restoring is not None):
                raise LimitError(f"{target!r} takes part in a copy relationship, a mirror, "
                                 "holds recovery points or is being restored; a recovery "
                                 "volume must be free")
            target._invalid = False
            self._start(point, target, TrackBitmap(target.n_grains))
        if background_copy:
            self._worker = threading.Thread(target=self._background, daemon=True,
                                            name=f"restore {point!r} -> {target.name}")
            self._worker.start()

    @property
    def source(self) -> Volume:
        return self.chain.volume

    @property
    def tracks_to_copy(self) -> int:
        """Tracks with a grain not yet on the recovery volume (O(bitmap))."""
        if not self.active:
            return 0
        left = TrackBitmap(self.copied.n_bits, fill=True).andnot(self.copied)
        return left.count_groups(self.target.grains_per_track)

    @property
    def state(self) -> str:
        return "copying" if self.active else "done"

    def __repr__(self) -> str:
        return (f"<PointRestore {self.point!r} -> {self.target!r}: "
                f"{self.tracks_to_copy if self.active else 0} tracks to copy>")

    def copy(self, max_tracks: int | None = None) -> int:
        """Copy up to ``max_tracks`` tracks' grains (all if None) in the
        calling thread; returns the grains copied."""
        per = self.target.grains_per_track
        budget = None if max_tracks is None else int(max_tracks) * per
        if budget is not None and budget < 0:
            raise ValueError(f"max_tracks must be >= 0, got {max_tracks}")
        chunk = max(1, CHUNK_BYTES // self.target.grain_size)
        done = 0
        while budget is None or done < budget:
            step = chunk if budget is None else min(chunk, budget - done)
            if step <= 0:
                break
            with _locked_through(self.target, self.source):
                if not self.active:
                    break
                n, resume = self._copy_chunk(self._cursor, step)
                self._cursor = resume if resume < self.target.n_grains else 0
                ended = self._finish()
            done += n
            if ended:
                self._done.set()
                break
        return done

    def _background(self) -> None:
        try:
            self.copy()
        except (VolumeClosedError, StateError):
            pass        # a volume closed under it: the restore stays as it is
        finally:
            if not self.active:
                self._done.set()

    def wait(self, timeout: float | None = None) -> bool:
        """Wait for the copy to complete; whether it did."""
        if not self.active:
            return True
        return self._done.wait(timeout)

    def withdraw(self, force: bool = False) -> None:
        """End the restore. With grains still to copy it is refused unless
        ``force``, which marks the recovery volume invalid."""
        with locked([self.source, self.target]):
            if not self.active:
                return
            if self.grains_to_copy:
                if not force:
                    raise IncompleteCopyError(
                        f"{self!r} still has tracks to copy; copy() or wait() first, or "
                        "withdraw(force=True) to leave the recovery volume invalid")
                self.target._invalid = True
            self._abandon()
        self._done.set()
