"""FlashCopy: instant point-in-time copies of a source volume onto a target.

The invariant every operation keeps: the target's logical image (what
``target.read`` returns) is the source's image at the establish instant.
Establish only sets bits; a host write to a source track the target still
needs copies the old track first (copy-on-write); a read of such a target
track is answered from the source; background copy (COPY mode) hydrates the
rest on a worker thread.

Locking: a relationship's bitmaps and flags are guarded by its source
volume's lock; operations that change the relationship take the source and
target locks in volume-id order (:func:`locked`).
"""

from __future__ import annotations

import contextlib
import enum
import numbers
import threading
import time
from typing import Iterator, Sequence

from fastfc import _core, faults
from fastfc._core import TrackBitmap
from fastfc._numbers import check_real
from fastfc.errors import (IncompleteCopyError, InjectedFault, LimitError, NoSpaceError,
                           StateError, VolumeClosedError, WriteInhibitedError)
from fastfc.storage.store import Store
from fastfc.storage.volume import Volume, check_pairable, locked

MAX_TARGETS = 12
# Background copy holds the source lock for at most this many bytes at a time,
# so host writes never wait long behind it (4 MiB: about 0.3 ms at memory
# speed). The copy kernel streams whatever the chunk size, so 4 MiB copies
# within 1% of 8 MiB; 1 MiB loses ~20% to per-chunk overhead in the worker.
CHUNK_BYTES = 4 * 1024 * 1024
# Sequence numbers are stored as SQLite INTEGERs: 0 .. 2**63 - 1
MAX_SEQUENCE = (1 << 63) - 1


def check_sequence(sequence) -> int:
    """``sequence`` as an int: TypeError unless an integer (bool is not),
    ValueError unless 0 <= sequence <= MAX_SEQUENCE."""
    if isinstance(sequence, bool) or not isinstance(sequence, numbers.Integral):
        raise TypeError(f"sequence must be an integer, got {type(sequence).__name__} "
                        f"{sequence!r}")
    sequence = int(sequence)
    if not 0 <= sequence <= MAX_SEQUENCE:
        raise ValueError(f"sequence must be between 0 and {MAX_SEQUENCE}, got {sequence}")
    return sequence


class FlashCopyState(enum.Enum):
    """Where a relationship stands (derived from its bitmaps and flags)."""

    COPYING = "copying"          # COPY mode, tracks still to copy
    NOCOPY = "nocopy"            # NOCOPY mode, tracks still virtual
    COPIED = "copied"            # every track physically on the target
    REVERTIBLE = "revertible"    # a revertible resync awaits commit or revert
    WITHDRAWN = "withdrawn"      # ended


class FlashCopy(_core.RelationshipBase):
    """A FlashCopy relationship from ``source`` to ``target`` [mkflash].

    Establishing is O(bitmap): every track is marked to copy, nothing moves.

    Parameters
    ----------
    source, target : Volume
        Same geometry. A source has at most 12 targets; a volume is the target
        of at most one relationship. A target may be the source of another
        relationship (a cascade, S -> T1 -> T2; not in a unit at durability
        "power"): T2 holds T1's
        logical image at its establish, whatever later happens to T1 (host
        writes, resync, revert, withdraw of S -> T1 or a new FlashCopy onto
        it: T2 takes the grains it still needs first).
    background_copy : bool
        COPY mode (default): a worker thread copies every track. NOCOPY
        (``False``): tracks move only by copy-on-write or :meth:`copy`.
    record : bool
        Change recording (``src_changed``/``tgt_changed``); needed by
        :meth:`resync`, revertible resync and :meth:`reverse_restore`.
        Implies ``persistent``.
    persistent : bool
        Keep the relationship when every track is copied; otherwise it ends.
    inhibit_target_write : bool
        Refuse host writes to the target.
    copy_rate : float, optional
        Cap on background copy, bytes per second (None: unlimited).
    sequence : int
        The relationship's sequence number (Global Mirror uses the CG number).
    store : Store, optional
        Where the relationship is recorded: the source's store (handed to
        the volume by its storage unit) if None. Source and target must
        have the same store (a FlashCopy stays within one unit).
    """

    # narrower than RelationshipBase declares them (annotations only)
    source: Volume
    target: Volume

    def __init__(self, source: Volume, target: Volume, *, background_copy: bool = True,
                 record: bool = False, persistent: bool = False,
                 inhibit_target_write: bool = False, copy_rate: float | None = None,
                 sequence: int = 0, store: Store | None = None) -> None:
        self._configure(source, target, background_copy=background_copy, record=record,
                        persistent=persistent, inhibit_target_write=inhibit_target_write,
                        copy_rate=copy_rate, sequence=sequence, store=store)
        with _locked_with_chains([source], [target]):
            _check_can_establish([self])
            self._install()
        self.start_background()

    # -- establish ----------------------------------------------------------
    def _configure(self, source, target, *, background_copy, record, persistent,
                   inhibit_target_write, copy_rate, sequence, store=None) -> None:
        if not isinstance(source, Volume) or not isinstance(target, Volume):
            raise TypeError("source and target must be fastfc.Volume objects")
        if copy_rate is not None:
            copy_rate = check_real("copy_rate (bytes/s)", copy_rate, positive=True)
        sequence = check_sequence(sequence)
        self.source = source
        self.target = target
        self.background_copy = bool(background_copy)
        self.record = bool(record)
        self.persistent = bool(persistent) or self.record
        self.inhibit_target_write = bool(inhibit_target_write)
        self.copy_rate = copy_rate
        self._options = dict(background_copy=self.background_copy, record=self.record,
                             persistent=self.persistent,
                             inhibit_target_write=self.inhibit_target_write,
                             copy_rate=copy_rate)
        self._store = store if store is not None else source.store
        self._store_id: int | None = None
        self.sequence = sequence
        self.revertible = False
        self.active = False
        #: the Global Mirror session whose B->C relationship this is (set by
        #: the session): only ending the session withdraws it
        self.session: str | None = None
        # (to_copy, src_changed, tgt_changed, sequence) before a revertible
        # resync: RelationshipBase._revert_image, where the steps keep it
        self._revert_image = None
        #: (sequence, grains) of the last incremental resync: see last_resync_changes
        self._last_resync: tuple[int, TrackBitmap] | None = None
        self._cursor = 0
        self._thread: threading.Thread | None = None
        self._done = threading.Event()
        #: the NoSpaceError that stopped the background copy (thin target), if any
        self.copy_error: Exception | None = None
        # _bg_lock guards _running (a worker is on duty) and _kick (a resync
        # or commit came in while it ran: look at to_copy again before
        # stopping), so that no new work is left with no worker
        self._bg_lock = threading.Lock()
        self._running = False
        self._kick = False

    def _install(self) -> None:
        """Create the bitmaps, link into both volumes and record the
        relationship in the source's storage unit. Locks held."""
        n = self.source.n_grains
        store = self._store
        if self.target._src_rels:
            # a cascade formed onto a source: its targets take every grain
            # they still read through it before its image becomes the source's
            _core.save_before_change(self.target, None)
        if self.target._chain is not None:
            # the target's recovery points keep its image (all of it changes)
            _core.save_point_grains(self.target, TrackBitmap(n, fill=True))
        self.to_copy = store.new_bitmap(n, fill=True)
        if self.record:
            self.src_changed = store.new_bitmap(n)
            self.tgt_changed = store.new_bitmap(n)
        # recorded first: a store that refuses (a full disk) leaves no link
        if self.target._invalid:
            # the new image is valid: recorded with the relationship, or a
            # reopened unit finds the target invalid again
            with store.transaction():
                self._save()
                store.set_volume_flags({**self.target.flags_record(), "invalid": False})
        else:
            self._save()
        self.active = True
        self.source._src_rels.append(self)
        self.source._rels_version += 1
        self.target._tgt_rel = self
        self.target._invalid = False

    # -- records ------------------------------------------------------------
    def to_record(self) -> dict:
        """What a store records of this relationship: ``id`` (of its row,
        None until first saved), ``source`` and ``target`` (volume names),
        ``options`` (the constructor's), ``sequence``, ``revertible``, the
        bitmaps ``to_copy``, ``src_changed``, ``tgt_changed`` and those of
        the revert image, ``rv_to_copy``, ``rv_src_changed``,
        ``rv_tgt_changed``, with its ``rv_sequence`` (None when not revertible)."""
        rv = self._revert_image or (None, None, None, None)
        return {"id": self._store_id, "source": self.source.name, "target": self.target.name,
                "options": self._options, "sequence": self.sequence,
                "revertible": self.revertible, "to_copy": self.to_copy,
                "src_changed": self.src_changed, "tgt_changed": self.tgt_changed,
                "rv_to_copy": rv[0], "rv_src_changed": rv[1], "rv_tgt_changed": rv[2],
                "rv_sequence": rv[3]}

    @classmethod
    def from_record(cls, source: Volume, target: Volume, record: dict, *,
                    store: Store | None = None, start: bool = True) -> "FlashCopy":
        """Rebuild a relationship from a record (:meth:`to_record`, as a
        store gives it back) between ``source`` and ``target``. ``start``
        false: no background copy yet (a unit rebuilding a cascade starts
        them once every relationship of the chain is in place)."""
        fc = cls.__new__(cls)
        fc._configure(source, target, sequence=record["sequence"], store=store,
                      **record["options"])
        fc.to_copy = record["to_copy"]
        fc.src_changed = record["src_changed"]
        fc.tgt_changed = record["tgt_changed"]
        if record["revertible"]:
            fc._revert_image = (record["rv_to_copy"], record["rv_src_changed"],
                                record["rv_tgt_changed"], record["rv_sequence"])
            fc.revertible = True
            source._inhibits += 1
        fc._store_id = record["id"]
        fc.active = True
        source._src_rels.append(fc)
        source._rels_version += 1
        target._tgt_rel = fc
        if start and not fc._store.readonly:   # a read-only unit only looks
            fc.start_background()
        return fc

    @property
    def store(self) -> Store:
        """The store that records this relationship."""
        return self._store

    # -- properties ---------------------------------------------------------
    @property
    def tracks_to_copy(self) -> int:
        """Tracks whose target content still lives on the source, in whole
        or in part (a track with any grain still to copy)."""
        if not self.active:
            return 0
        return self.to_copy.count_groups(self.source.grains_per_track)

    @property
    def state(self) -> FlashCopyState:
        if not self.active:
            return FlashCopyState.WITHDRAWN
        if self.revertible:
            return FlashCopyState.REVERTIBLE
        if self.to_copy.any():
            return FlashCopyState.COPYING if self.background_copy else FlashCopyState.NOCOPY
        return FlashCopyState.COPIED

    @property
    def last_resync_changes(self) -> "tuple[int, TrackBitmap] | None":
        """What the last incremental resync (:meth:`resync`, not
        revertible) took in: ``(sequence, grains)``, the sequence number it
        gave the target and the grains written on the source or the target
        between the target's previous image and that one (the change
        recording it consumed, a copy taken under the locks at the resync's
        instant). Exactly the grains where those two images may differ, so
        an incremental backup of the target copies them and nothing else.
        None until such a resync in this process (it is not recorded in a
        unit: a reopened unit, or a new server, knows it again after the
        next resync)."""
        return self._last_resync

    @property
    def metadata_bytes(self) -> int:
        """Bytes of bitmap this relationship holds (revert image included)."""
        maps = [self.to_copy, self.src_changed, self.tgt_changed]
        if self._revert_image is not None:
            maps += list(self._revert_image[:3])
        return sum(m.nbytes for m in maps if m is not None)

    def __repr__(self) -> str:
        return (f"<FlashCopy {self.source.name}->{self.target.name} "
                f"{self.state.value} seq={self.sequence} "
                f"to_copy={self.tracks_to_copy}/{self.source.n_tracks}>")

    # -- background copy ----------------------------------------------------
    def copy(self, max_tracks: int | None = None) -> int:
        """Do background-copy work in the calling thread: copy up to
        ``max_tracks`` tracks (all, if None) that the target still needs.

        Returns the work done in tracks: the grains copied over the grains
        per track, rounded up (a track that copy-on-write had partly copied
        already takes less). The source lock is held for at most
        ``CHUNK_BYTES`` at a time, with the GIL released during the copy.
        """
        if max_tracks is not None and max_tracks < 0:
            raise ValueError(f"max_tracks must be >= 0, got {max_tracks}")
        per = self.source.grains_per_track
        grains = self._copy_grains(None if max_tracks is None else max_tracks * per)
        return -(-grains // per)

    def _copy_grains(self, max_grains: int | None) -> int:
        """:meth:`copy` in grains: copy up to ``max_grains`` grains (all, if
        None) that the target still needs; returns the grains copied."""
        self._require_active()
        self._require_writable()
        if self.revertible:
            raise StateError(f"{self!r} is revertible: no copying until commit or revert")
        n = self.source.n_grains
        chunk = max(1, CHUNK_BYTES // self.source.grain_size)
        total = 0
        wraps = 0
        # (a source that is a target too reads through its chain: the
        # kernel's copy; a cascade is established only below "power")
        ordered = self._store.durability == "power" and self.source._tgt_rel is None
        while max_grains is None or total < max_grains:
            budget = chunk if max_grains is None else min(chunk, max_grains - total)
            if ordered:     # each chunk's data on the disk before its cleared bits
                done, resume = self._copy_chunk_ordered(self._cursor, budget)
            else:
                done, resume = self._copy_chunk(self._cursor, budget)
            total += done
            if resume >= n:
                self._cursor = 0
                wraps += 1
                if wraps >= 2 or (done == 0 and not self.to_copy.any()):
                    break
            else:
                self._cursor = resume
                if done == 0:  # withdrawn or made revertible meanwhile
                    break
        self._end_if_complete()
        return total

    def _copy_chunk_ordered(self, start: int, max_grains: int) -> tuple[int, int]:
        """As ``_copy_chunk`` at durability "power" (:meth:`_copy_ordered`):
        the grains still to copy in ``start:start + max_grains``; returns
        ``(grains copied, resume position)``."""
        S, T = self.source, self.target
        n = S.n_grains
        while True:
            with locked((S, T)):
                if not self.active or self.revertible:
                    return 0, start
                if S.closed or T.closed:
                    raise VolumeClosedError("background copy needs both volumes open")
                mask = self.to_copy.copy()
            start = mask.find_next_set(start)     # from the next track still to copy
            if start < 0:
                return 0, n
            stop = min(n, start + max_grains)
            mask.clear_range(0, start)
            mask.clear_range(stop, n)
            done = self._copy_ordered(mask)
            if done or stop >= n:      # (none: copies on write took them meanwhile)
                return done, stop
            start = stop

    def _end_if_complete(self) -> None:
        if self.persistent or not self.active:
            return
        with locked((self.source, self.target)):
            if self.active and not self.revertible and not self.to_copy.any():
                self._unlink()
                self._done.set()

    @property
    def background_worker(self) -> threading.Thread | None:
        """The thread of the background copy, if one was started (a unit
        closing waits for it to stop)."""
        return self._thread

    def start_background(self) -> None:
        if not (self.background_copy and self.active and not self.revertible):
            return
        with self._bg_lock:
            if self._running:
                self._kick = True
                return
            self._running = True
            self._kick = False
            self._done.clear()
            self._thread = threading.Thread(
                target=self._background, daemon=True,
                name=f"fastfc-copy-{self.source.name}-{self.target.name}")
            self._thread.start()

    def _background(self) -> None:
        stopped = False
        try:
            while not stopped:
                self._background_pass()
                with self._bg_lock:
                    stopped = not self._kick
                    self._kick = False
                    if stopped:
                        self._running = False
        finally:
            if not stopped:  # a pass raised: let the next call start a worker
                with self._bg_lock:
                    self._running = False
            if not self.active or not self.to_copy.any():
                self._done.set()

    def _background_pass(self) -> None:
        ts = self.source.grain_size
        step = max(1, CHUNK_BYTES // ts)
        if self.copy_rate:
            step = max(1, min(step, int(self.copy_rate * 0.02) // ts))
        start = time.perf_counter()
        copied = 0
        try:
            while self.active and not self.revertible:
                if self.source.closed or self.target.closed:
                    return
                done = self._copy_grains(step)
                copied += done
                if not self.active or not self.to_copy.any():
                    break
                if self.copy_rate:
                    ahead = copied * ts / self.copy_rate - (time.perf_counter() - start)
                    if ahead > 0:
                        time.sleep(ahead)
        except (VolumeClosedError, StateError):
            return  # closed, withdrawn or made revertible meanwhile
        except NoSpaceError as e:
            # a thin target's filesystem is full: nothing of the chunk landed;
            # the tracks stay to copy (copy() or a resync starts over)
            self.copy_error = e
            self._done.set()    # wait() returns False instead of hanging

    def wait(self, timeout: float | None = None) -> bool:
        """Wait until every track is on the target (COPY mode). Returns
        whether it is; False when ``timeout`` passed first."""
        if not self.background_copy:
            raise StateError(f"{self!r} is NOCOPY: nothing copies in the background; "
                             "call copy() instead")
        if timeout is not None:
            timeout = check_real("timeout", timeout, infinite=True)
        if not self.to_copy.any():
            return True
        # nothing copies in a closed or read-only unit: waiting would never end
        self._require_writable()
        self._done.wait(None if timeout == float("inf") else timeout)
        # a relationship withdrawn with tracks left (force) never completes
        return not self.to_copy.any()

    # -- durability "power": ordered writes --------------------------------------
    def make_overwritable(self, mask: TrackBitmap) -> None:
        """Durability "power", before the source's tracks in ``mask`` are
        overwritten (by PPRC updates, the only writer of a Global Mirror B):
        make their change bits durable (so the next resync copies them), then
        copy to the target the old tracks it still reads from the source and
        make them durable, and only then clear their ``to_copy`` bits and
        make that durable. Each step is on the disk before the next begins,
        so a power cut anywhere leaves the target on its image: a cleared
        bit on the disk always has its target data there, and a source track
        on the disk newer than the image always has its change bit. The
        write that follows then needs no copy-on-write for these tracks.

        Takes the source and target locks (in volume-id order) for each step;
        the caller may hold the lock of a PPRC primary writing the source."""
        S, T = self.source, self.target
        if not self.active or self.src_changed is None:
            return
        with locked((S, T)):
            self.src_changed.or_(mask)
        self._store.sync(self.src_changed)
        self._copy_ordered(mask)

    def _copy_ordered(self, mask: TrackBitmap) -> int:
        """Durability "power": copy to the target the tracks of ``mask`` it
        still needs, make them durable, and only then clear their
        ``to_copy`` bits and make that durable (a cleared bit on the disk
        always has its target data there). Returns the tracks copied."""
        S, T = self.source, self.target
        ts = S.grain_size
        with locked((S, T)):
            need = mask & self.to_copy    # (a copy-on-write may have taken some)
            if not need.any():
                return 0
            T._reserve_tracks(need)       # a thin target gets its blocks first
            raw, src = T._raw_array(), S.array
            for t0, t1 in need.runs():
                raw[t0 * ts:t1 * ts] = src[t0 * ts:t1 * ts]
        try:
            faults.hit("cow", S)          # crash and power-cut tests stop here
        except InjectedFault:
            pass
        store = self._store
        store.sync(T)
        with locked((S, T)):
            self.to_copy.andnot(need)
        store.sync(self.to_copy)
        return need.count()

    # -- incremental and revertible resync -----------------------------------
    def resync(self, *, revertible: bool = False, sequence: int | None = None) -> None:
        """Incremental re-establish [resyncflash]: the target takes the source's
        current image; only tracks changed since the last establish will be
        copied again. Needs ``record``.

        With ``revertible=True`` [-revertible] the previous bitmaps are kept as
        a revert image, the source is write-inhibited (host and PPRC updates
        refused), target writes are refused and no background copy runs,
        until :meth:`commit` or :meth:`revert`.
        """
        self._refuse_in_session("resyncflash")
        self._resync(revertible=revertible, sequence=sequence)

    def _refuse_in_session(self, step: str, session: str | None = None) -> None:
        """A user's step on a Global Mirror session's B->C relationship is
        refused (as :meth:`withdraw` is): resyncing, reversing, committing or
        reverting C alone would disturb the session's consistency groups.
        The session itself (and its recovery, or the unit that resolves its
        interrupted CG) names itself (``session=``) and is not refused."""
        if self.session is not None and session != self.session:
            raise StateError(
                f"{self!r} is the B->C relationship of Global Mirror session "
                f"{self.session!r}: {step} of it alone would disturb the session's "
                "consistency groups; the session runs its FlashCopy steps (end the session "
                "first: GlobalMirror.close(), rmgmir)")

    def _resync(self, *, revertible: bool = False, sequence: int | None = None) -> None:
        """The body of :meth:`resync`, which a session calls: the step a
        consistency group runs for its relationships
        (:func:`fastfc._core.prepare_revertible_many`), as a batch of one.
        Its checks, fault point (``prepare``) and change run under the
        source's and target's locks; so does the save, undone if the store
        refuses."""
        new_sequence = self.sequence
        if self.record:      # (without change recording the step refuses first)
            if sequence is not None:
                sequence = check_sequence(sequence)
            elif self.sequence >= MAX_SEQUENCE:
                raise ValueError(f"{self!r} is at the largest sequence number; give sequence=")
            new_sequence = self.sequence + 1 if sequence is None else sequence
        store = self._store
        # fresh bitmaps only for a step that looks able to run: a refused one
        # must leave a unit as it was (a durable store's bitmaps are files)
        fresh: list = [None, None, None]
        if (self.record and self.active and not self.revertible and not self.source.closed
                and not self.target.closed and not store.readonly and not store.closed):
            fresh = store.new_bitmaps(self.source.n_grains, 3)
        before, after = self._step_hooks()
        snaps: list[tuple] | None = None
        if self.record and not revertible:
            # the grains it consumes, copied at its instant (locks held), before
            # a durable store takes the old bitmaps back into its pool
            snaps = []
            saved = after

            def after(rel: "FlashCopy") -> None:
                previous = rel._last_resync
                state = snaps[-1]
                rel._last_resync = (new_sequence, state[1] | state[2])
                if saved is not None:
                    try:
                        saved(rel)
                    except BaseException:
                        rel._last_resync = previous
                        raise
        while True:
            k, err = _core.prepare_revertible_many([self], 0, new_sequence, fresh, revertible,
                                                   faults.hit, before, after, snaps)
            if err is not None:
                store.recycle([b for b in fresh if b is not None])
                raise err
            if k == 1:
                break
            fresh = store.new_bitmaps(self.source.n_grains, 3)   # (it became able meanwhile)
        self.start_background()

    def _step_hooks(self) -> tuple:
        """The callbacks of a step of this relationship alone: before it
        (locks held), the store's check; after it (locks still held), the
        relationship recorded, or the step undone if the store refuses."""
        store = self._store
        if not store.durable:
            return (lambda rel: store.check_writable()), None
        snap: list[tuple] = []

        def before(rel: "FlashCopy") -> None:
            store.check_writable()
            snap.append(rel.step_state())

        def after(rel: "FlashCopy") -> None:
            rel._save_or_undo(snap[-1])

        return before, after

    def commit(self, *, session: str | None = None) -> None:
        """Keep the revertible image [commitflash / Withdraw-FlashCopy-commit]:
        drop the revert image and release the source write-inhibit. O(1).
        ``session``: the Global Mirror session whose relationship this is,
        when that session (or what resolves its CG) takes the step."""
        self._refuse_in_session("commitflash", session)
        self._end_revertible("commit")

    def revert(self, *, session: str | None = None) -> None:
        """Return to the image before the revertible resync [revertflash /
        Withdraw-FlashCopy-revert]: restore the previous bitmaps and sequence
        number and release the source write-inhibit. O(1). ``session``: as
        for :meth:`commit`."""
        self._refuse_in_session("revertflash", session)
        self._end_revertible("revert")

    def _end_revertible(self, step: str) -> None:
        """Commit or revert (``step``): the bitmaps that drop out are the
        revert image's (commit) or the current ones (revert); swapped by
        reference, recorded, recycled. The step a consistency group runs
        for its relationships (:func:`fastfc._core.end_revertible_many`),
        as a batch of one."""
        dropped: list[TrackBitmap] = []
        before, after = self._step_hooks()
        _, err = _core.end_revertible_many([self], 0, step == "commit", dropped, faults.hit,
                                           before, after)
        if err is not None:
            raise err
        self._store.recycle(dropped)
        self.start_background()

    # -- reverse restore and withdraw ---------------------------------------
    def reverse_restore(self, *, session: str | None = None) -> int:
        """Make the source take the target's image [reverseflash, fast
        reverse restore]: copy target -> source only the tracks that are on
        the target and changed on either side since the last establish.

        Afterwards both volumes hold the same image, the change bitmaps are
        clear and the relationship stands. Returns the tracks copied (in
        whole or in part: those with a grain copied). Other
        targets of the source receive copy-on-write first, as for a host write.
        ``session``: as for :meth:`commit` (a session's recovery restores B).
        """
        self._refuse_in_session("reverseflash", session)
        return self._reverse_restore()

    def _reverse_restore(self) -> int:
        """The body of :meth:`reverse_restore`, which a session calls."""
        if not self.record:
            raise StateError(f"{self!r} needs record=True for reverse restore")
        S = self.source
        # (a source that is a target too: the volumes above it, whose
        # grains its other targets may take and whose bitmaps change)
        with _locked_with_chains([S], [self.target] + [r.target for r in S._src_rels]):
            self._require_active()
            if self.revertible:
                raise StateError(f"{self!r} is revertible; commit or revert first")
            if S._tgt_rel is not None and S._tgt_rel.revertible:
                raise WriteInhibitedError(
                    f"{S!r} is the target of a revertible FlashCopy; commit or revert "
                    "it first")
            if S._invalid:
                raise StateError(f"{S!r} holds no valid image (a FlashCopy onto it was "
                                 "withdrawn before completing); a restore of some tracks "
                                 "cannot make it whole")
            if S._inhibits:
                # the restore writes S: it must not land while another
                # relationship of S is revertible (its images read from S)
                raise WriteInhibitedError(
                    f"{S!r} is write-inhibited: it is the source of a revertible "
                    "FlashCopy; commit or revert it first")
            self._require_writable()
            # record=True (checked above): both change bitmaps exist
            assert self.src_changed is not None and self.tgt_changed is not None
            mask = (self.src_changed | self.tgt_changed).andnot(self.to_copy)
            changed = mask.copy()
            for other in S._src_rels:
                if other is not self:
                    if other.target.closed and (changed & other.to_copy).any():
                        raise VolumeClosedError(f"target {other.target!r} is closed")
            # thin volumes: every block the restore writes, before it starts
            S._reserve_tracks(mask)
            self.target._reserve_tracks(mask, read=True)
            for other in S._src_rels:
                if other is not self:
                    other.target._reserve_tracks(changed & other.to_copy)
            others = [r for r in S._src_rels if r is not self]
            # durability "power": each step on the disk before the next (the
            # other targets' copies before their cleared bits, the restored
            # source tracks before the change bits that name them clear)
            store = self._store
            ordered = store.durability == "power"
            for other in others:
                cow = changed & other.to_copy
                other._copy_tracks_where(cow, False)
            if ordered and others:
                store.sync(*(r.target for r in others))
            for other in others:
                other.to_copy.andnot(changed)
                if other.src_changed is not None:
                    other.src_changed.or_(changed)
            if ordered and others:
                store.sync(*(bm for r in others for bm in (r.to_copy, r.src_changed)))
            copied = mask.count_groups(S.grains_per_track)
            self._copy_tracks_where(mask, True)
            if S._mirror is not None and S._mirror.oos is not None:
                S._mirror.oos.or_(changed)
            if ordered:
                store.sync(S, S._mirror.oos if S._mirror is not None else None)
            self.src_changed.fill(False)
            self.tgt_changed.fill(False)
            if ordered:
                store.sync(self.src_changed, self.tgt_changed)
            self._save()
        return copied

    def withdraw(self, force: bool = False) -> None:
        """End the relationship [rmflash]. If tracks remain to copy the target
        holds no valid image: refused unless ``force``, which marks the target
        invalid (its reads then raise :class:`~fastfc.errors.InvalidImageError`)."""
        # (the chain above the target: a cascade's forced withdraw copies
        # grains from the volumes above it to the target's own targets)
        with _locked_with_chains([self.target], [self.source]):
            self._require_active()
            if self.session is not None:
                raise StateError(
                    f"{self!r} is the B->C relationship of Global Mirror session "
                    f"{self.session!r}: withdrawing it alone would leave the session without "
                    f"its C; end the session instead (GlobalMirror.close())")
            if self.revertible:
                raise StateError(f"{self!r} is revertible; commit or revert before withdrawing")
            self._require_writable()
            remaining = self.tracks_to_copy
            if remaining and not force:
                raise IncompleteCopyError(
                    f"{self!r} still has {remaining} tracks to copy; copy() or wait() "
                    "first, or withdraw(force=True) to invalidate the target")
            if remaining and self.target._src_rels:
                # the target's own targets take what they still read through
                # it from the source before its image becomes invalid
                _core.check_image_change(self.target, self.to_copy)
                _core.save_before_change(self.target, self.to_copy)
            self._unlink(invalidate=bool(remaining))
        self._done.set()

    def _unlink(self, invalidate: bool = False) -> None:
        """End the relationship: the store first, so that a store that
        refuses leaves the relationship as it was."""
        if self.target._chain is not None and self.to_copy.any():
            # the grains the target still read from the source: its recovery
            # points keep them (the target reads its own, or nothing, after)
            _core.save_point_grains(self.target, self.to_copy)
        was_invalid = self.target._invalid
        self.target._invalid = was_invalid or invalidate
        try:
            self._store.drop_flash(self._store_id, self.target.flags_record())
        except BaseException:
            self.target._invalid = was_invalid
            raise
        self.source._src_rels.remove(self)
        self.source._rels_version += 1
        self.target._tgt_rel = None
        self.active = False

    def _save(self) -> None:
        """Record the relationship; keep the id the store gives its row.
        A store that keeps nothing (not ``durable``: memory) is not handed a
        record: building one would only slow the CG path down."""
        store = self._store
        if store.durable:
            self._store_id = store.save_flash(self.to_record())

    def undo_step(self, before: tuple) -> None:
        """Put back the state ``before`` (from :meth:`step_state`): a step
        undone. The source's write-inhibit follows. Locks held."""
        revertible = self.revertible
        if self.target._chain is not None:
            # the grains whose to_copy bit the undo flips change image
            _core.save_point_grains(self.target, (self.to_copy - before[0])
                                     | (before[0] - self.to_copy))
        (self.to_copy, self.src_changed, self.tgt_changed, self.sequence,
         self._revert_image, self.revertible, self._cursor) = before
        self.source._inhibits += int(self.revertible) - int(revertible)
        self.source._rels_version += 1        # (other bitmaps again)

    def _save_or_undo(self, before: tuple) -> None:
        """Save the relationship; if the store fails, put back the state
        ``before`` (from :meth:`step_state`), so that memory never holds what
        the store does not."""
        try:
            self._save()
        except BaseException:
            self.undo_step(before)
            raise

    # -- checks ---------------------------------------------------------------
    def _require_active(self) -> None:
        if not self.active:
            raise StateError(f"{self!r} has been withdrawn")

    def _require_open(self) -> None:
        for v in (self.source, self.target):
            if v.closed:
                raise VolumeClosedError(f"{v!r} is closed")

    def _require_writable(self) -> None:
        """Refuse, before anything changes, a step whose result could not be
        recorded: a closed volume, a closed or read-only unit."""
        self._store.check_writable()
        self._require_open()


def record_steps(fcs: Sequence[FlashCopy], snapshots: Sequence[tuple]) -> None:
    """Record the relationships ``fcs`` that one batched step changed (a
    consistency group's prepares, commits or reverts at one store): one
    ``save_steps`` call per store. If a store refuses, every one of them
    is put back as it was before the step (``snapshots``: each one's
    :meth:`FlashCopy.step_state`, taken under its locks by the step) and the
    store's exception propagates: memory never holds what the store does
    not. A store that keeps nothing is not called."""
    by_store: dict[int, list[int]] = {}
    for i, fc in enumerate(fcs):
        if fc._store.durable:
            by_store.setdefault(id(fc._store), []).append(i)
    saved: list[int] = []
    try:
        for idx in by_store.values():
            store = fcs[idx[0]]._store
            step = [fcs[i] for i in idx]
            ids = store.save_steps(step, [fc._store_id for fc in step],
                                   [fc._options for fc in step])
            for fc, rid in zip(step, ids):
                fc._store_id = rid
            saved += idx
    except BaseException:
        done = set(saved)   # (other stores' saves stand: their rows are the state)
        for i, fc in enumerate(fcs):
            if i not in done:
                with locked((fc.source, fc.target)):
                    fc.undo_step(snapshots[i])
        raise


def _check_can_establish(rels: Sequence[FlashCopy]) -> None:
    """Refuse a group of new relationships that breaks a rule. Locks held."""
    new_targets: set[int] = set()
    new_sources: dict[int, int] = {}
    for r in rels:
        new_sources[id(r.source)] = new_sources.get(id(r.source), 0) + 1
    for r in rels:
        s, t = r.source, r.target
        check_pairable(s, t, "FlashCopy")
        r._store.check_writable()
        if t._tgt_rel is not None or id(t) in new_targets:
            raise LimitError(f"{t!r} is already the target of a FlashCopy")
        _check_cascade(r, new_sources, new_targets)
        if t._mirror is not None or t._secondary:
            raise LimitError(f"{t!r} is in a PPRC pair and cannot be a FlashCopy target")
        for v in (s, t):
            if v._restoring is not None:
                raise StateError(f"{v!r} is taking a recovery point's image; wait for "
                                 "its restore to complete")
        if len(s._src_rels) + new_sources[id(s)] > MAX_TARGETS:
            raise LimitError(f"{s!r} would have more than {MAX_TARGETS} FlashCopy targets")
        if s._inhibits:
            raise StateError(f"{s!r} is write-inhibited by a revertible FlashCopy")
        if s._invalid:
            raise StateError(f"{s!r} holds no valid image (a FlashCopy onto it was withdrawn "
                             "before completing); write it whole or FlashCopy onto it first")
        if s.store is not t.store:
            raise LimitError(f"{s!r} and {t!r} are in different storage units; a FlashCopy "
                             "stays within one unit")
        new_targets.add(id(t))
    _check_group_chains(rels)


def _check_group_chains(rels: Sequence[FlashCopy]) -> None:
    """Refuse a cycle (or a chain over MAX_CHAIN volumes) that several
    relationships of one group close together, each one refused by nothing
    above, as it was checked against the relationships that exist: 3 -> 1
    exists and a group makes 1 -> 0 and 2 -> 3 while 0 -> 2 exists. Locks held."""
    up = {id(r.target): r.source for r in rels}
    if len(rels) < 2:
        return
    for r in rels:
        v: _core.VolumeBase | None = r.source
        steps, seen = 1, set()
        while v is not None and id(v) not in seen:   # (a cycle r is not on: found at its own)
            seen.add(id(v))
            if v is r.target:
                raise LimitError(f"{r.source!r} -> {r.target!r} would make a cycle of FlashCopy "
                                 "relationships with the others of its group")
            steps += 1
            if steps > _core.MAX_CHAIN:
                raise LimitError(f"a FlashCopy chain holds at most {_core.MAX_CHAIN} volumes")
            above = up.get(id(v))
            v = above if above is not None else (v._tgt_rel.source if v._tgt_rel is not None
                                                 else None)


@contextlib.contextmanager
def _locked_with_chains(tops: Sequence[_core.VolumeBase],
                        extra: Sequence[_core.VolumeBase] = ()) -> Iterator[None]:
    """Hold the locks of the volumes of ``extra`` and of every volume of
    ``tops``' chains (each one and the volumes above it), as the chains are
    under the locks. (An establish holds its source's: two establishes that
    would close one cycle between them each lock a volume of the other's
    chain, so one sees the other's relationship.)"""
    while True:
        chains = [_core.volume_chain(v) for v in tops]
        with locked([v for c in chains for v in c] + list(extra)):
            now = [_core.volume_chain(v) for v in tops]
            if all(len(a) == len(b) and all(x is y for x, y in zip(a, b))
                   for a, b in zip(now, chains)):
                yield
                return


def _check_cascade(r: FlashCopy, new_sources: dict[int, int], new_targets: set[int]) -> None:
    """Refuse a new relationship that would make a cascade the engine does
    not keep: one formed within a group (its instant would be ambiguous), a
    cycle, a chain of more than MAX_CHAIN volumes, one in a storage unit at
    durability "power" (its ordered writes do not cover a cascade's
    copies), or one onto a source
    whose image cannot change now. Locks held."""
    s, t = r.source, r.target
    if id(t) in new_sources or id(s) in new_targets:
        raise LimitError(f"{t if id(t) in new_sources else s!r} is both a source and a "
                         "target of this group; establish a cascade's levels one at a time")
    if not (t._src_rels or s._tgt_rel is not None):
        return
    # a point of a target reads its uncopied grains one level up only
    # (copyservices/points.py): no cascade may form above a volume holding points
    held = [v for v in [t] + [q.target for q in t._src_rels]
            if v._chain is not None and v._chain.points and (v is not t or s._tgt_rel is not None)]
    if held:
        raise LimitError(f"{s!r} -> {t!r} would make a cascade above {held[0]!r}, which holds "
                         "recovery points: points of a volume with a cascade above it are "
                         "not supported")
    if r._store.durability == "power":
        raise LimitError(f"{s!r} -> {t!r} would be a cascaded FlashCopy (a target that is "
                         "also a source): not at durability \"power\", whose ordered "
                         "writes do not cover a cascade's copies (open the unit at "
                         "\"process\")")
    above = _core.volume_chain(s)
    if any(v is t for v in above):
        raise LimitError(f"{s!r} -> {t!r} would make a cycle of FlashCopy relationships")
    if len(above) + 1 > _core.MAX_CHAIN:
        raise LimitError(f"a FlashCopy chain holds at most {_core.MAX_CHAIN} volumes")
    if t._src_rels:
        _core.check_image_change(t, None)


def establish_group(pairs: Sequence[tuple[Volume, Volume]], **options) -> list[FlashCopy]:
    """Establish several relationships at one instant [mkflash -freeze].

    Host writes to every source are held (their locks are taken) while the
    whole group is checked and established, then released: all targets hold
    their sources' images at the same instant. Either every relationship is
    established or none is. ``options`` are those of :class:`FlashCopy`.
    """
    pairs = list(pairs)      # read twice below: a generator would be empty the second time
    rels = []
    for source, target in pairs:
        r = FlashCopy.__new__(FlashCopy)
        r._configure(source, target, **{**_DEFAULTS, **options})
        rels.append(r)
    with _locked_with_chains([s for s, _ in pairs], [t for _, t in pairs]):
        _check_can_establish(rels)
        for r in rels:
            r._install()
    for r in rels:
        r.start_background()
    return rels


_DEFAULTS = dict(background_copy=True, record=False, persistent=False,
                 inhibit_target_write=False, copy_rate=None, sequence=0)
