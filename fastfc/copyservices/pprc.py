"""PPRC pairs: mirror a primary volume onto a secondary over a link.

* Metro Mirror (``mode="mmir"``, synchronous): a host write completes only
  after the secondary holds it. If the link fails, the pair suspends and the
  write is recorded in the out-of-sync (OOS) bitmap instead.
* Global Copy (``mode="gcp"``, asynchronous): a host write sets the track's
  OOS bit and completes; :meth:`PPRCPair.drain` sends OOS tracks with their
  current primary content.

The initial copy sends every track; suspend/resume resync only OOS tracks.

Locking: the pair's bitmaps and side file are guarded by the primary
volume's lock. Every send happens with the primary's lock held, so updates
of one track reach the secondary in the order the host wrote them; a drain
holds it for at most ``SEND_CHUNK_BYTES`` at a time. Lock order: primary,
then secondary (the secondary's lock is taken by its own I/O path).
"""

from __future__ import annotations

import enum
import threading
from contextlib import contextmanager
from typing import Any, Callable, Iterator, Protocol, cast

import numpy as np

from fastfc import _core
from fastfc._core import TrackBitmap
from fastfc._numbers import check_real
from fastfc.errors import DrainAborted, FastFCError, LimitError, StateError, VolumeClosedError
from fastfc.storage.link import Link, LocalLink
from fastfc.storage.store import Store
from fastfc.storage.volume import Volume, check_pairable, locked


#: ``suspend_reason`` of the record a failed-over secondary's store keeps of
#: its failover (:func:`record_failover`): a pair B->A, listed while A's
#: unit is away (its primary's unit lost, or only closed).
FAILOVER_RECORD = "failover (site loss)"


def record_failover(b: Volume, a_ref: str, a_name: str, mode: str,
                    oos: TrackBitmap) -> dict[str, Any]:
    """Record in B's store that B was failed over from A (A's unit named by
    its store's ``ref``): a suspended pair B->A whose out-of-sync bitmap
    ``oos`` (of B's store) holds the tracks B differs in from the image A's
    unit last knew of it, B's host writes since included. Kept by B's own
    unit, so it records B's writes whether or not A's unit is open; it is
    dropped when the pair fails back or is removed. Returns the record (as
    :meth:`PPRCPair.to_record`, its ``id`` set). The one record of a
    failover at B, made live (:meth:`PPRCPair.failover`) or at the
    secondary alone (``fastfc.durable.siteloss``)."""
    rec: dict[str, Any] = {"id": None, "primary_name": b.name, "secondary_unit": a_ref,
                           "secondary_name": a_name, "mode": mode,
                           "suspend_reason": FAILOVER_RECORD, "failed_over": False,
                           "name": f"{b.name}->{a_name}", "oos": oos, "spare": None, "cg": None}
    rec["id"] = b.store.save_pair(rec)
    return rec


@contextmanager
def pair_locked(primary: Volume, secondary: Volume) -> Iterator[None]:
    """Hold the primary's lock, then the secondary's: the order every PPRC
    update takes them (the drain kernels, a collision under a host write),
    whatever the volumes' ids. (``locked`` takes them in id order: with the
    secondary's id below the primary's, a pair step against a running drain
    would deadlock.)"""
    primary._lock()
    try:
        secondary._lock()
        try:
            yield
        finally:
            secondary._unlock()
    finally:
        primary._unlock()


class _Overwritable(Protocol):
    """What an ordered send needs of a secondary's FlashCopy relationships
    (``FlashCopy.make_overwritable``)."""

    def make_overwritable(self, mask: TrackBitmap) -> None: ...


SEND_CHUNK_BYTES = 1024 * 1024
# an idle pair's agent (Global Copy's background drain) looks for tracks to
# send after AGENT_IDLE_WAIT s, then less often, up to AGENT_IDLE_MAX s apart
AGENT_IDLE_WAIT = 0.01
AGENT_IDLE_MAX = 0.1
# The in-process fast path holds the primary's lock for at most this much.
DIRECT_CHUNK_BYTES = 4 * 1024 * 1024


class PPRCState(enum.Enum):
    COPY_PENDING = "copy pending"
    FULL_DUPLEX = "full duplex"
    SUSPENDED = "suspended"


class PPRCMode(enum.Enum):
    METRO_MIRROR = "mmir"
    GLOBAL_COPY = "gcp"


class PPRCPair(_core.MirrorBase):
    """A PPRC pair from ``primary`` to ``secondary`` [mkpprc].

    Parameters
    ----------
    primary, secondary : Volume
        Same geometry. The secondary refuses host writes while paired.
    link : Link, optional
        The transport (a new unlimited :class:`~fastfc.storage.link.LocalLink` if None).
    mode : {"gcp", "mmir"}
        Global Copy (async, default) or Metro Mirror (sync).
    initial_copy : bool
        Send every track (default). ``False`` [-mode nocp] asserts the two
        volumes already hold the same data.
    background : bool
        Run a worker thread that drains OOS tracks whenever there are some
        (initial copy, resync, Global Copy). Global Mirror sessions pass
        ``False`` and drive their pairs themselves.

    The pair is recorded by its primary's store (:attr:`store`), handed to
    the volume by its storage unit; after :meth:`failback`, by the new
    primary's.
    """

    # narrower than MirrorBase declares it: a pair always has its OOS bitmap
    # (annotation only; spare and cg stay optional: a CG in flight holds
    # the spare as cg)
    oos: TrackBitmap

    #: bumped whenever a pair (any) is failed over: a session that found
    #: none of its pairs failed over need not look again until it moves
    failovers = 0

    @property
    def failed_over(self) -> bool:
        """Whether the pair was failed over [failoverpprc]."""
        return self._failed_over

    @failed_over.setter
    def failed_over(self, value: bool) -> None:
        if value:
            PPRCPair.failovers += 1
        self._failed_over = bool(value)

    def __init__(self, primary: Volume, secondary: Volume, link: Link | None = None, *,
                 mode: str = "gcp", initial_copy: bool = True, background: bool = True,
                 name: str | None = None) -> None:
        if not isinstance(primary, Volume) or not isinstance(secondary, Volume):
            raise TypeError("primary and secondary must be fastfc.Volume objects")
        try:
            pprc_mode = PPRCMode(mode)
        except ValueError:
            raise ValueError(f"mode must be 'gcp' or 'mmir', got {mode!r}") from None
        if link is not None and not isinstance(link, Link):
            raise TypeError("link must be a fastfc.storage.link.Link")
        primary.store.check_writable()
        secondary.store.check_writable()
        self._setup(primary, secondary, link, pprc_mode, name)
        store = primary.store
        self.spare = store.new_bitmap(primary.n_grains)
        with pair_locked(primary, secondary):
            _check_can_pair(primary, secondary)
            self.oos = store.new_bitmap(primary.n_grains, fill=initial_copy)
            self.cg = None
            primary._mirror = self
            secondary._secondary = True
            self.active = True
            self._persist()
            with secondary.store.transaction():
                secondary.store.set_volume_flags(secondary.flags_record())
                self._record_secondary()
        if background:
            self.start()

    def _setup(self, primary: Volume, secondary: Volume, link: Link | None,
               mode: PPRCMode, name: str | None) -> None:
        """The state every pair starts with, made or restored."""
        self.mode = mode
        self.sync = mode is PPRCMode.METRO_MIRROR
        self.link = link if link is not None else LocalLink()
        self.name = name or f"{primary.name}->{secondary.name}"
        self.primary = primary
        self.secondary = secondary
        self.suspend_reason: str | None = None
        self.side: dict[int, np.ndarray] = {}   # CG versions saved on collision
        # durability "power" at the secondary: a collision saves the CG
        # version in the side file rather than sending it at once, so that B
        # is written only by the drain, after its ordering barriers
        self.ordered_drain = False
        self.bytes_sent = 0
        self.cg_bytes = 0       # bytes of the CG in flight that collisions sent
        # called once a Global Copy drain (:meth:`drain`) sent to B, or may
        # have (it failed part way): a session's group steps B's FlashCopy then
        self.on_sent: Callable[[], None] | None = None
        self.failed_over = False
        self._reverse_hook: _core.MirrorBase | None = None
        # B's record of the failover (record_failover), kept by B's store
        self._failover_record: dict[str, Any] | None = None
        self.drain_lock = threading.Lock()
        self._cursor = 0
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._store_id: int | None = None

    @property
    def store(self) -> Store:
        """The store that records the pair: its primary's."""
        return self.primary.store

    def to_record(self) -> dict[str, Any]:
        """What a store records of this pair: ``id`` (of its row, None until
        first saved), ``primary_name``, ``secondary_unit`` (how a row names
        the secondary's unit: its store's ``ref``), ``secondary_name``,
        ``mode``, ``suspend_reason``, ``failed_over``, ``name``, and the
        bitmaps ``oos``, ``spare`` and ``cg``."""
        return {"id": self._store_id, "primary_name": self.primary.name,
                "secondary_unit": self.secondary.store.ref,
                "secondary_name": self.secondary.name, "mode": self.mode.value,
                "suspend_reason": self.suspend_reason, "failed_over": self.failed_over,
                "name": self.name, "oos": self.oos, "spare": self.spare, "cg": self.cg}

    def _persist(self) -> None:
        """Record the pair in its primary's store (no-op in memory).

        Not called at coordination: a CG in flight swaps bitmaps by reference
        only, and recovery sends the union of every bitmap the row names."""
        self._store_id = self.primary.store.save_pair(self.to_record(), self.secondary.store)

    def _record_secondary(self) -> None:
        """Record in the secondary's store what it needs of this pair when
        the primary's unit is lost (the pair's row is the primary's): its
        primary's unit and name, and the mode."""
        self.secondary.store.save_secondary(self.secondary.name, {
            "primary_unit": self.primary.store.ref, "primary_name": self.primary.name,
            "mode": self.mode.value})

    def _suspended(self, reason: str) -> None:
        self.suspend_reason = reason
        self._persist()

    @classmethod
    def from_record(cls, primary: Volume, secondary: Volume, record: dict[str, Any],
                    link: Link | None = None, *,
                    failover_record: dict[str, Any] | None = None) -> "PPRCPair":
        """Rebuild a pair from a record (:meth:`to_record`, as a store gives
        it back). Tracks of a CG that was in flight go back to the
        out-of-sync bitmap (sending a track again is harmless; missing one
        is not). A failed-over pair's secondary records its host writes in
        ``failover_record`` (:func:`record_failover`, as its store gives it
        back), or in a new one."""
        pair = cls.__new__(cls)
        pair._setup(primary, secondary, link, PPRCMode(record["mode"]), record["name"])
        pair.suspend_reason = record["suspend_reason"]
        pair.failed_over = bool(record["failed_over"])
        pair._store_id = record["id"]
        oos, spare, cg = record["oos"], record["spare"], record["cg"]
        for extra in (spare, cg):
            if extra is not None:
                oos.or_(extra)
        if spare is None:
            spare = primary.store.new_bitmap(primary.n_grains)
        spare.fill(False)
        pair.oos, pair.spare, pair.cg = oos, spare, None
        primary._mirror = pair
        if not pair.failed_over:
            secondary._secondary = True
        elif secondary._secondary and failover_record is None and \
                not secondary.store.readonly:
            # a failover cut short between its two units' writes (:meth:`
            # failover` records A's row first): the primary's row wins, B's
            # half is made now (B took no host write as a secondary). (B
            # flagged a secondary beside its record of the failover waits
            # for its restore: :meth:`failover_to_restore`.)
            secondary._secondary = False
            with secondary.store.transaction():
                secondary.store.set_volume_flags(secondary.flags_record())
                if failover_record is not None or secondary._mirror is None:
                    pair._hook_reverse_writes(failover_record)
        elif failover_record is not None or secondary._mirror is None:
            pair._hook_reverse_writes(failover_record)
        pair.active = True
        if not primary.store.readonly:   # a read-only unit only looks
            pair._persist()
        if not secondary.store.readonly:
            # a pair from before secondaries recorded it (or a unit moved):
            # recorded now, once (nothing is written when it is so recorded)
            pair._record_secondary()
        return pair

    # -- state ---------------------------------------------------------------
    @property
    def state(self) -> PPRCState:
        if self.suspend_reason is not None:
            return PPRCState.SUSPENDED
        if self.mode is PPRCMode.GLOBAL_COPY or self.oos.any() or self.cg is not None:
            return PPRCState.COPY_PENDING
        return PPRCState.FULL_DUPLEX

    def __repr__(self) -> str:
        reason = f" ({self.suspend_reason})" if self.suspend_reason else ""
        return (f"<PPRCPair {self.name} {self.mode.value} {self.state.value}{reason} "
                f"oos={self.out_of_sync_tracks}>")

    # -- host write hooks (called by the primary's I/O path, its lock held) ----
    def _sync_write(self, offset: int, length: int, pending: bool) -> None:
        """Metro Mirror: send the just-written bytes before the write completes.
        The write path has already set the tracks' OOS bits; clear them once
        the secondary holds the data. If a track was out of sync before this
        write (resync in progress) or the pair is suspended, leave the bits
        for the drain, which sends whole tracks in order."""
        if self.suspend_reason is None and not pending:
            try:
                self.link.send(self.secondary, offset,
                               self.primary.array[offset:offset + length], key=self.primary)
            except (FastFCError, VolumeClosedError) as e:
                self._suspended(f"{type(e).__name__}: {e}")
            else:
                ts = self.primary.grain_size
                self.oos.clear_range(offset // ts, (offset + length - 1) // ts + 1)
                return
        self._wake.set()

    def _collide(self, t0: int, t1: int) -> None:
        """A host write is about to overwrite tracks still owed to the
        consistency group: send their CG version first (in-process link), or
        save it in the side file for the drain to send."""
        assert self.cg is not None   # the I/O path calls it for CG tracks only
        A, ts = self.primary, self.primary.grain_size
        if self.link.direct() and not self.ordered_drain:
            try:
                done, _ = _core.pprc_copy_tracks(A, self.secondary, self.cg, t0, t1 - t0, t1,
                                                 self.link.fault_point)
            except FastFCError:
                pass  # B refused it: keep the CG version instead
            else:
                self.link.account(done * ts, 1)
                self.bytes_sent += done * ts
                self.cg_bytes += done * ts
                return
        A._reserve_read(t0, t1)
        arr = A.array
        cg = self.cg
        for t in range(t0, t1):
            if cg.test(t):
                self.side[t] = arr[t * ts:(t + 1) * ts].copy()
                # the write about to land sets this bit too, but only after
                # this returns: a process killed in between (the side file is
                # memory) must still find the track owed, so the bit is set
                # before the CG's bit is cleared
                self.oos.set(t)
                cg.clear(t)

    # -- sending ---------------------------------------------------------------
    def _send_runs(self, bitmap: TrackBitmap, max_bytes: int,
                   deadline: Callable[[], bool] | None = None, ordered: bool = False) -> int:
        """Send set tracks of ``bitmap`` from the cursor on, clearing each bit
        once the secondary holds it, until ``max_bytes`` went or none remain.
        Returns bytes sent; raises what the link raises (bits stay set).

        ``ordered`` (Global Copy at durability "power"): before each send,
        the secondary's FlashCopy targets are made independent of the tracks
        it may overwrite, on the disk (:meth:`_order_send`)."""
        A, ts = self.primary, self.primary.grain_size
        n = A.n_grains
        sent = 0
        chunk = max(1, SEND_CHUNK_BYTES // ts)
        direct_chunk = max(1, DIRECT_CHUNK_BYTES // ts)
        while sent < max_bytes:
            A._lock()
            try:
                if bitmap is not self.cg and (self.suspend_reason is not None
                                               or self.primary is not A):
                    return sent  # suspended or failed over since the drain began
                a = bitmap.find_next_set(self._cursor)
                if a < 0 and self._cursor:
                    a = bitmap.find_next_set(0)
                if a < 0:
                    return sent
                if A.closed:
                    raise VolumeClosedError(f"{A!r} is closed")
                budget = max(1, (max_bytes - sent) // ts)
                if self.link.direct():
                    # in-process link, nothing to model: one kernel call moves
                    # up to DIRECT_CHUNK_BYTES of tracks A -> B
                    k = min(budget, direct_chunk)
                    stop = -1
                    if ordered and self.secondary._src_rels:
                        stop = min(n, a + k)     # the tracks this call may send
                        self._order_send(bitmap, a, stop)
                    done, resume = _core.pprc_copy_tracks(
                        A, self.secondary, bitmap, a, k, stop, self.link.fault_point)
                    self.link.account(done * ts, 1)
                    self._cursor = resume if resume < n else 0
                else:
                    b = bitmap.find_next_clear(a)
                    b = n if b < 0 else b
                    b = min(b, a + chunk, a + budget)
                    if ordered and self.secondary._src_rels:
                        self._order_send(bitmap, a, b)
                    A._reserve_read(a, b)
                    self.link.send(self.secondary, a * ts, A.array[a * ts:b * ts], key=A)
                    bitmap.clear_range(a, b)
                    self._cursor = b if b < n else 0
                    done = b - a
            finally:
                A._unlock()
            sent += done * ts
            self.bytes_sent += done * ts
            if deadline is not None and deadline():
                raise DrainAborted("drain time limit passed")
        return sent

    def _order_send(self, bitmap: TrackBitmap, start: int, stop: int) -> None:
        """Durability "power": the tracks of ``bitmap`` in ``start:stop``
        made overwritable on the secondary for each of its FlashCopy targets
        (``FlashCopy.make_overwritable``: change bits, the targets' copies of
        the old tracks, the cleared ``to_copy`` bits, each synced before the
        next), before any of them is sent. The caller holds the primary's
        lock (no bit of ``bitmap`` changes meanwhile)."""
        mask = bitmap.copy()
        mask.clear_range(0, start)
        mask.clear_range(stop, mask.n_bits)
        for rel in list(self.secondary._src_rels):
            cast(_Overwritable, rel).make_overwritable(mask)

    def drain(self, max_bytes: int | None = None) -> int:
        """Send out-of-sync tracks (Global Copy, initial copy, resync) in the
        calling thread; returns bytes sent. A link failure suspends the pair."""
        if not self.active:
            raise StateError(f"{self!r} has been removed")
        self.primary.store.check_writable()
        if self.suspend_reason is not None:
            return 0
        with self.drain_lock:
            sent = -1       # (-1: it may have sent some, then failed)
            try:
                sent = self._send_runs(self.oos, max_bytes or (1 << 62),
                                       ordered=self.ordered_drain)
                return sent
            except (FastFCError, VolumeClosedError) as e:
                if isinstance(e, DrainAborted):
                    raise
                self._suspended(f"{type(e).__name__}: {e}")
                return 0
            finally:
                if sent and self.on_sent is not None:
                    self.on_sent()

    # -- consistency groups (driven by a Global Mirror session) ----------------
    def cg_drain(self, deadline: Callable[[], bool] | None = None,
                  time_left: Callable[[], float] | None = None) -> int:
        """Send the CG: side-file versions first, then the CG bitmap's tracks.
        Raises on a link failure or when ``deadline()`` turns true. Returns
        the CG's bytes, those that collisions sent early included."""
        with self.drain_lock:
            sent = self.send_side_file()
            # a session drains a pair between coordination and cg_end: a CG is open
            assert self.cg is not None
            if self.link.direct():
                # in-process link: the whole CG in one kernel call, without the
                # GIL (a secondary group's drain of one pair)
                left = -1.0 if time_left is None else max(0.0, time_left())
                ts = self.primary.grain_size
                tracks: list[int] = []
                runs: list[int] = []
                try:
                    _, status = _core.pprc_drain_many(
                        [self.primary], [self.secondary], [self.cg], DIRECT_CHUNK_BYTES, left,
                        0, tracks, run_hook=self.link.fault_point, runs=runs)
                finally:
                    nbytes = sum(tracks) * ts
                    self.link.account(nbytes, sum(runs))
                    self.bytes_sent += nbytes
                    sent += nbytes
                if status == 1:
                    raise DrainAborted("drain time limit passed")
                # status 2: B changed state; the per-update path says why
            sent += self._send_runs(self.cg, 1 << 62, deadline)
            # collisions during the runs saved more CG versions; once the CG
            # bitmap is empty no new collision can happen
            sent += self.send_side_file()
        return sent + self.cg_bytes

    def send_side_file(self) -> int:
        A, ts = self.primary, self.primary.grain_size
        sent = 0
        while self.side:
            A._lock()
            try:
                t, data = next(iter(self.side.items()))
                self.link.send(self.secondary, t * ts, data, key=A)
                del self.side[t]
            finally:
                A._unlock()
            sent += ts
            self.bytes_sent += ts
        return sent

    def cg_end(self, ok: bool) -> None:
        """Close the CG. A failed drain gives its tracks back to OOS, to be
        sent with their current content later."""
        # (a secondary group's end of the CG of one pair)
        _core.cg_end_many([self.primary], [self], ok)

    # -- lifecycle [pausepprc, resumepprc, failoverpprc, failbackpprc, rmpprc] ----
    def suspend(self, reason: str = "host") -> None:
        """Stop sending; writes keep being recorded in the OOS bitmap."""
        with locked((self.primary,)):
            self._require_active()
            self._require_writable()
            before = self.suspend_reason
            try:
                self._suspended(reason)
            except BaseException:
                self.suspend_reason = before
                raise

    def resume(self) -> None:
        """Resync only the OOS tracks, then carry on mirroring."""
        with locked((self.primary,)):
            self._require_active()
            if self.failed_over:
                raise StateError(f"{self!r} is failed over; use failback()")
            self._require_writable()
            before = self.suspend_reason
            self.suspend_reason = None
            try:
                self._persist()
            except BaseException:
                self.suspend_reason = before
                raise
        self._wake.set()

    def failover(self) -> None:
        """At the secondary site: make the secondary a usable (suspended)
        primary. Writes to it are recorded so that :meth:`failback` resyncs
        only the tracks changed on either side.

        Recorded by both units, the primary's pair row first, then the
        secondary's flags and record of the failover (one transaction): a
        crash between the two leaves the primary's half alone, which the
        reopened units complete (:meth:`from_record`)."""
        with pair_locked(self.primary, self.secondary):
            self._require_active()
            self._require_writable(self.secondary)
            self._mark_failed_over()
            self.secondary._secondary = False
            with self.secondary.store.transaction():
                self.secondary.store.set_volume_flags(self.secondary.flags_record())
                if self.secondary._mirror is None:
                    self._hook_reverse_writes()

    def _mark_failed_over(self) -> None:
        """The pair's half of a failover: failed over and suspended (its row
        recorded), or, if recording it fails, as it was. Callers hold both
        volumes' locks."""
        before = (self.failed_over, self.suspend_reason)
        self.failed_over = True
        try:
            self._suspended("failover")
        except BaseException:
            self.failed_over, self.suspend_reason = before
            raise

    def failover_to_restore(self) -> None:
        """:meth:`failover` for a session's recovery, which restores B from
        its C before B takes host writes: B's record of the failover first
        (B still flagged a secondary), then the primary's pair row. B's
        flag is cleared by :meth:`release_secondary` once B is restored,
        so that a B still flagged a secondary under a failed-over pair is
        one whose restore has yet to run (or to run again, after a crash).
        Nothing changes when the pair is failed over and B hooked already."""
        A, B = self.primary, self.secondary
        with pair_locked(A, B):
            self._require_active()
            self._require_writable(B)
            hooked = B._mirror is not None and B._mirror is self._reverse_hook
            if self.failed_over and hooked:
                return
            if B._mirror is None:
                self._hook_reverse_writes()
            self._mark_failed_over()

    def release_secondary(self) -> None:
        """After :meth:`failover_to_restore` and B's restore: B takes host
        writes. (At durability "power" the restore synced B's restored data
        and its record of the failover, before this flag.)"""
        B = self.secondary
        with locked((B,)):
            B._secondary = False
            B.store.set_volume_flags(B.flags_record())

    def _hook_reverse_writes(self, record: dict[str, Any] | None = None) -> None:
        """Record host writes to the failed-over secondary in the bitmap of
        its failover record (``record``, or a new one, :func:`
        record_failover`), which the secondary's own store keeps:
        :meth:`failback` sends the union of both sides' changes, even after
        the units were closed and reopened, either of them alone in between,
        or the primary's unit restored from a copy. (A secondary in a unit
        open read-only takes no writes: the pair's bitmap serves.)"""
        A, B = self.primary, self.secondary
        if record is None and not B.store.readonly:
            record = record_failover(B, A.store.ref, A.name, self.mode.value,
                                     B.store.new_bitmap(B.n_grains))
        hook = _core.MirrorBase()
        hook.oos = record["oos"] if record is not None else self.oos
        self._failover_record = None if record is None else {
            k: record[k] for k in ("id", "primary_name", "secondary_name", "mode",
                                   "suspend_reason", "failed_over", "name", "oos", "spare",
                                   "cg")} | {"secondary_unit": A.store.ref}
        self._reverse_hook = hook
        B._mirror = hook

    @property
    def failover_record(self) -> dict[str, Any] | None:
        """B's record of this pair's failover (:func:`record_failover`),
        None unless failed over."""
        return self._failover_record

    def failback(self) -> None:
        """After :meth:`failover`: mirror the other way, from the former
        secondary to the former primary, sending the tracks changed on
        either side since the failover. On those tracks the former primary
        takes the former secondary's data: host writes made on the former
        primary since the failover are overwritten (the out-of-sync count
        before the resync says how many tracks are sent)."""
        A, B = self.primary, self.secondary
        with pair_locked(A, B):
            self._require_active()
            if not self.failed_over:
                raise StateError(f"{self!r} was not failed over")
            if A._tgt_rel is not None:
                raise LimitError(f"{A!r} is a FlashCopy target and cannot become a secondary")
            if A._chain is not None and A._chain.points:
                raise LimitError(f"{A!r} holds recovery points and cannot become a secondary")
            self._require_writable(B)
            # the pair is recorded with its new primary, B, from now on
            new_store = B.store
            oos = new_store.new_bitmap(A.n_grains)
            oos.copy_from(self.oos)
            if self.cg is not None:
                oos.or_(self.cg)
                self.cg = None
            if self._reverse_hook is not None:
                assert self._reverse_hook.oos is not None   # the hook is made with it
                oos.or_(self._reverse_hook.oos)
            failover_id = (self._failover_record or {}).get("id")
            A.store.drop_pair(self._store_id)
            self._store_id = None
            self.spare = new_store.new_bitmap(A.n_grains)
            B._mirror = self
            A._mirror = None
            A._secondary = True
            self.primary, self.secondary = B, A
            self.oos = oos
            self.side = {}
            self._reverse_hook = None
            self._failover_record = None
            self.failed_over = False
            self.suspend_reason = None
            self.name = f"{B.name}->{A.name}"
            with new_store.transaction():
                new_store.drop_pair(failover_id)    # the pair's row has it all now
                self._persist()
            with A.store.transaction():
                A.store.set_volume_flags(A.flags_record())
                self._record_secondary()
            B.store.save_secondary(B.name, None)
        self._wake.set()

    def remove(self) -> None:
        """End the pair [rmpprc]: the secondary accepts host writes again."""
        self._require_writable(self.secondary)
        self.stop()
        with pair_locked(self.primary, self.secondary):
            if not self.active:
                return
            if self.primary._mirror is self:
                self.primary._mirror = None
            if self.secondary._mirror is self._reverse_hook and self._reverse_hook is not None:
                self.secondary._mirror = None
            self.secondary._secondary = False
            self.active = False
            self.primary.store.drop_pair(self._store_id)
            with self.secondary.store.transaction():
                self.secondary.store.set_volume_flags(self.secondary.flags_record())
                self.secondary.store.save_secondary(self.secondary.name, None)
                if self._failover_record is not None:
                    self.secondary.store.drop_pair(self._failover_record["id"])
                    self._failover_record = None

    def _require_active(self) -> None:
        if not self.active:
            raise StateError(f"{self!r} has been removed")

    def _require_writable(self, *others: Volume) -> None:
        """Refuse, before anything changes, a step whose result could not be
        recorded: a closed or read-only unit, a closed volume."""
        for v in (self.primary, *others):
            v.store.check_writable()
        for v in (self.primary, *others):
            if v.closed:
                raise VolumeClosedError(f"{v!r} is closed")

    # -- background agent ------------------------------------------------------
    def start(self) -> None:
        """Drain OOS tracks on a worker thread whenever there are some."""
        if self._thread is not None and self._thread.is_alive():
            return
        self._stop.clear()
        self._thread = threading.Thread(target=self._agent, daemon=True,
                                        name=f"fastfc-pprc-{self.name}")
        self._thread.start()

    @property
    def running(self) -> bool:
        """Whether the pair's agent (:meth:`start`) runs."""
        return self._thread is not None and self._thread.is_alive()

    def stop(self) -> None:
        self._stop.set()
        self._wake.set()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join()
        self._thread = None

    def _agent(self) -> None:
        # Idle, the agent looks again after AGENT_IDLE_WAIT, doubled each
        # time it finds nothing up to AGENT_IDLE_MAX (a server holding many
        # pairs in full duplex would otherwise spend ~1 % of a CPU per pair
        # waking); a send, or a wake-up (wait_synced, resume), starts over.
        wait = AGENT_IDLE_WAIT
        while not self._stop.is_set():
            sent = 0
            if self.active and self.suspend_reason is None and self.cg is None:
                try:
                    sent = self.drain(SEND_CHUNK_BYTES * 4)
                except FastFCError:
                    sent = 0
            if sent:
                wait = AGENT_IDLE_WAIT
                continue
            if self._wake.wait(wait):
                wait = AGENT_IDLE_WAIT
            else:
                wait = min(2 * wait, AGENT_IDLE_MAX)
            self._wake.clear()

    def wait_synced(self, timeout: float | None = None) -> bool:
        """Wait until no track is out of sync (and the pair not suspended)."""
        import time
        end = None if timeout is None else \
            time.monotonic() + check_real("timeout", timeout, infinite=True)
        while self.out_of_sync_tracks or self.suspend_reason is not None:
            if end is not None and time.monotonic() > end:
                return False
            self._wake.set()
            time.sleep(0.002)
        return True


def _check_can_pair(primary: Volume, secondary: Volume) -> None:
    check_pairable(primary, secondary, "PPRC pair")
    for v in (primary, secondary):
        if v._mirror is not None or v._secondary:
            raise LimitError(f"{v!r} is already in a PPRC pair")
    if primary._tgt_rel is not None:
        raise LimitError(f"{primary!r} is a FlashCopy target and cannot be a PPRC primary")
    if secondary._tgt_rel is not None:
        raise LimitError(f"{secondary!r} is a FlashCopy target and cannot be a PPRC secondary")
    if secondary._chain is not None and secondary._chain.points:
        raise LimitError(f"{secondary!r} holds recovery points and cannot be a PPRC secondary")
    for v in (primary, secondary):
        if v._restoring is not None:
            raise StateError(f"{v!r} is taking a recovery point's image; wait for its "
                             "restore to complete")
