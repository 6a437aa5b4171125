"""Secondary groups: the unit of work of a consistency group's drain and
FlashCopy phase, per store holding B and C volumes.

A Global Mirror session groups its triplets by the store of their B and C
volumes (:func:`secondary_groups`); each :class:`SecondaryGroup` drains its
pairs and runs the FlashCopy phase of its B->C relationships
(:class:`FlashCopyGroup`) as one step per group.
"""

from __future__ import annotations

from typing import Callable, Sequence

from fastfc import _core, faults
from fastfc.errors import DrainAborted, FastFCError, StateError
from fastfc.copyservices.flashcopy import FlashCopy, check_sequence
from fastfc.copyservices.pprc import DIRECT_CHUNK_BYTES, PPRCPair
from fastfc.storage.volume import Volume, locked


class Triplet:
    """One volume's chain: A (primary), B (secondary), C (journal)."""

    def __init__(self, a: Volume, b: Volume, c: Volume, pair: PPRCPair, fc: FlashCopy):
        self.a, self.b, self.c, self.pair, self.fc = a, b, c, pair, fc

    def __repr__(self) -> str:
        return f"<Triplet {self.a.name}->{self.b.name}->{self.c.name}>"


class FlashCopyGroup:
    """The B->C relationships of a secondary group (one store): the
    FlashCopy phase of a consistency group, as one step per group.

    :meth:`prepare_all` prepares every relationship revertibly with the
    CG's sequence number (write-inhibiting each B); once the decision is
    recorded, :meth:`commit_all` or :meth:`revert_all` ends what it
    prepared. A session's :class:`SecondaryGroup` runs it after the drain;
    a unit that serves a remote session runs it alone.
    """

    def __init__(self, store, fcs: Sequence[FlashCopy]) -> None:
        self.store = store
        self.ordered = False        # durability "power" at this store
        self.prepared: list[FlashCopy] = []   # of the CG in flight
        self.set_relationships(fcs)

    def set_relationships(self, fcs: Sequence[FlashCopy]) -> None:
        """The relationships, in order (the lists the batched kernels take)."""
        self._fcs = list(fcs)
        sizes = {fc.source.n_tracks for fc in self._fcs}
        self._one_size = sizes.pop() if len(sizes) == 1 else None
        # the in-memory steps run batched when the store records nothing (a
        # durable store records every step, per relationship, in its rows)
        self._batched = (not self.store.durable
                         and all(fc._store is self.store for fc in self._fcs))

    @property
    def relationships(self) -> list[FlashCopy]:
        return list(self._fcs)

    def __repr__(self) -> str:
        return f"<FlashCopyGroup {self.store.ref} {len(self._fcs)} relationships>"

    def prepare_all(self, sequence: int, stop_at_failure: bool) -> str | None:
        """Prepare every B->C relationship revertibly with CG ``sequence``
        (write-inhibiting each B), in order; at durability "power"
        the prepared bitmaps are synced before this returns. Returns None if
        every prepare succeeded, else the last failure (it stops at the first if
        ``stop_at_failure``). The prepared relationships are kept in
        :attr:`prepared` for :meth:`commit_all` / :meth:`revert_all`."""
        prepared: list[FlashCopy] = []
        self.prepared = prepared
        failure = None
        if self._batched and not faults.armed_at("prepare"):
            return self._prepare_batched(sequence, stop_at_failure)
        for fc in self._fcs:
            try:
                fc._resync(revertible=True, sequence=sequence)
                prepared.append(fc)
            except FastFCError as e:
                failure = f"prepare of {fc.source.name}: {type(e).__name__}: {e}"
                if stop_at_failure:
                    break
        if self.ordered:   # the prepared bitmaps before the decision
            self.store.sync(*(bm for fc in prepared
                              for bm in (fc.to_copy, fc.src_changed, fc.tgt_changed)))
        return failure

    def _fresh(self, count: int) -> list:
        """Three empty bitmaps per relationship, for ``count`` of them."""
        if self._one_size is not None:
            return self.store.new_bitmaps(self._one_size, 3 * count)
        out: list = []
        for fc in self._fcs[:count]:
            out += self.store.new_bitmaps(fc.source.n_tracks, 3)
        return out

    def _prepare_batched(self, sequence: int, stop_at_failure: bool) -> str | None:
        """:meth:`prepare_all` on a store that records nothing: the
        relationships in one kernel call
        (:func:`fastfc._core.prepare_revertible_many`); one whose state asks
        for it goes through ``FlashCopy.resync``, which raises as usual."""
        check_sequence(sequence)      # as resync does, before anything changes
        fcs = self._fcs
        n = len(fcs)
        fresh = self._fresh(n)
        unused = []
        prepared = self.prepared
        failure = None
        k = 0
        while k < n:
            start = k
            k = _core.prepare_revertible_many(fcs, k, sequence, fresh)
            prepared += fcs[start:k]
            if k == n:
                break
            fc = fcs[k]
            unused += fresh[3 * k:3 * k + 3]
            k += 1
            try:
                fc._resync(revertible=True, sequence=sequence)
                prepared.append(fc)
            except FastFCError as e:
                failure = f"prepare of {fc.source.name}: {type(e).__name__}: {e}"
                if stop_at_failure:
                    unused += fresh[3 * k:]
                    break
        self.store.recycle(unused)
        return failure

    def commit_all(self) -> list[str]:
        """Commit every relationship :meth:`prepare_all` prepared; returns
        what failed (each a message), having tried them all."""
        return self._finish("commit")

    def revert_all(self) -> list[str]:
        """Revert every relationship :meth:`prepare_all` prepared; returns
        what failed (each a message), having tried them all."""
        return self._finish("revert")

    def _finish(self, step: str) -> list[str]:
        errors = []
        if self._batched and not faults.armed_at(step):
            return self._finish_batched(step)
        for fc in self.prepared:
            try:
                fc._end_revertible("commit" if step == "commit" else "revert")
            except FastFCError as e:
                errors.append(f"{step} of {fc.source.name}: {type(e).__name__}: {e}")
        self.prepared = []
        return errors

    def _finish_batched(self, step: str) -> list[str]:
        """:meth:`commit_all` / :meth:`revert_all` on a store that records
        nothing: one kernel call (:func:`fastfc._core.end_revertible_many`);
        a relationship whose state asks for it goes through
        ``FlashCopy.commit`` / ``revert``, which raises as usual."""
        fcs = self.prepared
        n = len(fcs)
        dropped: list = []
        errors = []
        k = 0
        while k < n:
            k = _core.end_revertible_many(fcs, k, step == "commit", dropped)
            if k == n:
                break
            fc = fcs[k]
            k += 1
            try:
                fc._end_revertible("commit" if step == "commit" else "revert")
            except FastFCError as e:
                errors.append(f"{step} of {fc.source.name}: {type(e).__name__}: {e}")
        self.store.recycle(dropped)
        self.prepared = []
        return errors


class SecondaryGroup:
    """The triplets whose B and C volumes one store (one storage unit) holds.

    The unit of work of a consistency group's drain and FlashCopy phase: a
    session asks each group, in turn, to :meth:`drain` its pairs, then to
    :meth:`prepare_all` its B->C relationships, and, once the decision is
    recorded, to :meth:`commit_all` or :meth:`revert_all` what it prepared.
    Each is one call per group, so a group whose B and C live in another
    process (a remote unit) can carry it out in one round trip; locally it
    runs the same per-relationship steps, with the same fault points, in
    triplet order.

    Locking: as the steps it runs (each pair's primary lock, each
    relationship's B and C locks); the session's attempt lock keeps two
    attempts apart.
    """

    def __init__(self, store, triplets: Sequence[Triplet]) -> None:
        self.store = store
        self.triplets: list[Triplet] = list(triplets)
        self.ordered = False        # durability "power" at this store (set_ordered)
        self.flash = FlashCopyGroup(store, [])
        self._lists()

    def _lists(self) -> None:
        """The lists the batched kernels take (the triplets do not change)."""
        trips = self.triplets
        self._pairs = [t.pair for t in trips]
        self._as = [t.a for t in trips]
        self._bs = [t.b for t in trips]
        self._fcs = [t.fc for t in trips]
        links = {id(p.link): p.link for p in self._pairs}
        self._link = links.popitem()[1] if len(links) == 1 else None
        self.flash.set_relationships(self._fcs)
        self._batched = self.flash._batched

    def __repr__(self) -> str:
        return f"<SecondaryGroup {self.store.ref} {len(self.triplets)} triplets>"

    def set_ordered(self, ordered: bool) -> None:
        """Durability "power": B is written by the ordered drain only, after
        its barriers, so collisions save CG versions in the side file."""
        self.ordered = ordered
        self.flash.ordered = ordered
        for trip in self.triplets:
            trip.pair.ordered_drain = ordered

    # -- drain -------------------------------------------------------------------
    def drain(self, deadline: Callable[[], bool] | None,
              time_left: Callable[[], float] | None) -> int:
        """Send every CG track of the group's pairs to their B volumes (at
        durability "power", in the barrier order of :meth:`_order_drain`, B
        images synced at the end). Returns the CG's bytes; raises
        :class:`DrainAborted` past the deadline, or what a link raises."""
        if (self._batched and not self.ordered and self._link is not None
                and self._link.direct() and not faults.armed_at("drain")):
            return self._drain_batched(deadline, time_left)
        sent = 0
        ordered = self.ordered
        for trip in self.triplets:
            faults.hit("drain", trip.a)
            if deadline is not None and deadline():
                raise DrainAborted("drain time limit passed")
            if ordered:
                self._order_drain(trip)
            sent += trip.pair._cg_drain(deadline, time_left)
        if ordered:   # the CG's B images on the disk before any prepare names them
            self.store.sync(*(trip.b for trip in self.triplets))
        return sent

    def _drain_batched(self, deadline: Callable[[], bool] | None,
                       time_left: Callable[[], float] | None) -> int:
        """The drain over an in-process link: the pairs' CGs in one kernel
        call (:func:`fastfc._core.pprc_drain_many`), without the GIL while
        tracks move, in triplet order. A pair with CG versions in its side
        file, or whose B stops the kernel, is drained by its own method
        (``PPRCPair._cg_drain``, which sends them or raises why not) before
        the kernel goes on with the next pair."""
        pairs = self._pairs
        n = len(pairs)
        link = self._link
        assert link is not None          # drain() checked it
        owed = []
        for p in pairs:
            assert p.cg is not None      # coordination began the CG of every pair
            owed.append(p.cg)
        sent = 0
        down = link.down_flag()          # the link failing stops it between pairs
        locks: list = [p._drain_lock for p in pairs]
        tracks: list[int] = []
        k = 0
        try:
            for lk in locks:
                lk.acquire()
            while k < n:
                if pairs[k].side:       # collisions B refused: the pair's own path
                    st = 2
                else:
                    left = -1.0 if time_left is None else max(0.0, time_left())
                    k, st = _core.pprc_drain_many(self._as, self._bs, owed, DIRECT_CHUNK_BYTES,
                                                  left, k, tracks, down)
                if st == 0:
                    break
                if st == 1:
                    raise DrainAborted("drain time limit passed")
                p = pairs[k]                 # B's state stopped the kernel
                locks[k].release()
                locks[k] = None
                sent += p._cg_drain(deadline, time_left) - p.cg_bytes
                if len(tracks) == k:         # (not tried by the kernel)
                    tracks.append(0)
                k += 1
        finally:
            for lk in locks:
                if lk is not None:
                    lk.release()
            moved = 0
            for p, t in zip(pairs, tracks):
                nbytes = t * p.primary.track_size
                p.bytes_sent += nbytes
                moved += nbytes
            link.account(moved, len(tracks))
        for p in pairs:
            sent += p.cg_bytes
            if p.side:       # collisions while the kernel ran that B refused
                sent += p._send_side_file()
        return sent + moved

    def end_drain(self, ok: bool) -> None:
        """Close the CG of every pair (a failed drain gives its tracks back
        to the out-of-sync bitmaps)."""
        if ok and self._batched:
            _core.cg_end_many(self._as, self._pairs)
            return
        for trip in self.triplets:
            trip.pair._cg_end(ok)

    def _order_drain(self, trip: Triplet) -> None:
        """Durability "power", before B takes its share of the CG: the CG's
        tracks (and those in the side file) made overwritable on B
        (:meth:`FlashCopy.make_overwritable`: change bits, then C's copies of
        the old tracks, then the cleared ``to_copy`` bits, each synced
        before the next), so a power cut anywhere in the drain leaves C on
        the prior CG. (The drain itself then needs no copy-on-write for
        these tracks.)"""
        pair, fc = trip.pair, trip.fc
        if not fc.active or fc.src_changed is None or pair.cg is None:
            return
        with locked((trip.a,)):          # collisions move CG tracks to the side file
            mask = pair.cg.copy()
            for t in pair.side:
                mask.set(t)
        fc.make_overwritable(mask)

    # -- FlashCopy phase (FlashCopyGroup) ---------------------------------------
    @property
    def prepared(self) -> list[FlashCopy]:
        """The relationships :meth:`prepare_all` prepared (of the CG in flight)."""
        return self.flash.prepared

    @prepared.setter
    def prepared(self, value: list[FlashCopy]) -> None:
        self.flash.prepared = value

    def prepare_all(self, sequence: int, stop_at_failure: bool) -> str | None:
        """:meth:`FlashCopyGroup.prepare_all` of the group's B->C relationships."""
        return self.flash.prepare_all(sequence, stop_at_failure)

    def commit_all(self) -> list[str]:
        """:meth:`FlashCopyGroup.commit_all`."""
        return self.flash.commit_all()

    def revert_all(self) -> list[str]:
        """:meth:`FlashCopyGroup.revert_all`."""
        return self.flash.revert_all()

    # -- Global Copy between CGs ---------------------------------------------------
    def global_copy(self, max_bytes: int) -> int:
        """Drain out-of-sync tracks of every pair as Global Copy (at most
        ``max_bytes`` per pair); returns the bytes sent."""
        return sum(t.pair.drain(max_bytes) for t in self.triplets)

    def backlog(self) -> int:
        """Out-of-sync tracks of the group's pairs."""
        return sum(t.pair.oos.count() for t in self.triplets)


def copy_to_c(fcs: Sequence[FlashCopy],
              on_copy: Callable[[int, int], None] | None = None) -> None:
    """Copy B -> C the tracks each C of a session's B->C relationships
    ``fcs`` still reads from its B, so that it keeps its image when the
    relationship is withdrawn (ending a session, :meth:`GlobalMirror.close`,
    or at its secondary alone, ``StorageUnit.remove_session(copy=True)``).
    ``on_copy(copied, total)`` reports the progress in tracks."""
    fcs = [fc for fc in fcs if fc.active]
    total = sum(fc.tracks_to_copy for fc in fcs)
    done = 0
    for fc in fcs:
        chunk = max(1, (4 << 20) // fc.source.track_size)
        while fc.active and fc.to_copy.any():
            n = fc.copy(chunk)
            done += n
            if on_copy is not None:
                on_copy(done, total)
            if not n and fc.to_copy.any():
                raise StateError(f"could not copy {fc.source.name} -> {fc.target.name}")


def secondary_groups(triplets: Sequence[Triplet]) -> list[SecondaryGroup]:
    """The triplets grouped by the store holding their B (and C) volumes,
    groups in the order of their first triplet, triplets in session order."""
    groups: dict[int, SecondaryGroup] = {}
    for t in triplets:
        g = groups.get(id(t.b.store))
        if g is None:
            g = groups[id(t.b.store)] = SecondaryGroup(t.b.store, [])
        g.triplets.append(t)
    for g in groups.values():
        g._lists()
    return list(groups.values())


