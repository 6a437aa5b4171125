"""Secondary groups: the unit of work of a consistency group's drain and
FlashCopy phase, per store holding B and C volumes.

A Global Mirror session groups its triplets by the store of their B and C
volumes (:func:`secondary_groups`); each :class:`SecondaryGroup` drains its
pairs and runs the FlashCopy phase of its B->C relationships
(:class:`FlashCopyGroup`) as one step per group.
"""

from __future__ import annotations

from typing import Callable, Iterable, Sequence

from fastfc import _core, faults
from fastfc.errors import DrainAborted, FastFCError, StateError
from fastfc.copyservices.flashcopy import FlashCopy, check_sequence, record_steps
from fastfc.copyservices.pprc import DIRECT_CHUNK_BYTES, PPRCPair
from fastfc.storage.store import Store
from fastfc.storage.volume import Volume, locked


class Triplet:
    """One volume's chain: A (primary), B (secondary), C (journal).

    ``adopted``: the A->B pair existed before the session (a Global Copy
    pair the session took over): ending the session leaves it, a pair of
    its own."""

    def __init__(self, a: Volume, b: Volume, c: Volume, pair: PPRCPair, fc: FlashCopy,
                 adopted: bool = False):
        self.a, self.b, self.c, self.pair, self.fc = a, b, c, pair, fc
        self.adopted = adopted

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

    Each is one kernel loop over the relationships, whatever the store
    (:func:`fastfc._core.prepare_revertible_many`,
    :func:`~fastfc._core.end_revertible_many`: the steps that
    ``FlashCopy.resync``, ``commit`` and ``revert`` run as a batch of one),
    with the fault points as callbacks; a store that keeps records gets the
    changed relationships in one ``save_flashes`` call per step, or, if it
    refuses, the step is undone in memory (:func:`record_steps`).

    **Sparse steps** (``sparse``: relationships whose stores keep nothing
    and check nothing, i.e. in memory): a CG steps only the relationships
    that may have changed since their last step (:attr:`changed`: marked by
    :meth:`mark_changed` when their B is to take or took tracks, a step that
    did not commit, or a fault armed at their step), in order. The others
    did not change: their B is as it was at their last step, so their C
    already holds the CG's image, and they *follow* the group's
    :class:`~fastfc._core.SequenceCell` (``seq_cell``): their ``sequence``
    is the cell's, which a committed CG sets once. A relationship leaves the
    cell when it is stepped (a marked one follows it until then: its C still
    holds B's image of its last step, kept by copy-on-write), and joins it
    again once it is settled on the cell's number with nothing changed
    since (the cell's ``left`` names any that a step of its own took out,
    for the next CG to step). An idle CG then
    costs the group O(1), not O(relationships). Every promise holds as with
    every relationship stepped: each C on one CG, one sequence number; the
    seed's rule reads the followers as committed on the previous CG while a
    phase is in flight (what they hold), and a commit that settles the CG
    moves them on with the cell (:meth:`settled`).

    At a store that records (a storage unit at durability "process"), a
    follower's record keeps the number of its own last step, and the CG's
    records name only the relationships it stepped: what a reopen reads
    for the others is the session's committed sequence, recorded with the
    CG's commit (the session's counters, ``save_session_stats``) and by its
    decision record; the unit's reopen lifts each settled relationship of
    the session to it (``StorageUnit`` and
    :func:`fastfc.copyservices.resolution.group_sequence`). At durability
    "power" (``ordered``) every relationship is stepped.
    """

    def __init__(self, store, fcs: Sequence[FlashCopy]) -> None:
        self.store = store
        self.ordered = False        # durability "power" at this store
        self.prepared: list[FlashCopy] = []   # of the CG in flight
        self.set_relationships(fcs)

    def set_relationships(self, fcs: Sequence[FlashCopy]) -> None:
        """The relationships, in order (the lists the kernels take)."""
        self._fcs = list(fcs)
        sizes = {fc.source.n_grains for fc in self._fcs}
        stores = {id(fc.store): fc.store for fc in self._fcs}
        one_store = not stores or (len(stores) == 1 and self.store in stores.values())
        self._one_size = sizes.pop() if len(sizes) == 1 and one_store else None
        # the store's check and a record for the undo, before each step of a
        # relationship (none where the stores keep nothing and always can)
        self._checked = any(s.durable or type(s).check_writable is not Store.check_writable
                            for s in stores.values())
        self._durable = any(s.durable for s in stores.values())
        self._background = any(fc.background_copy for fc in self._fcs)
        # three fresh bitmaps per relationship for its next prepare; a
        # relationship that refused keeps its own for the next CG
        self._slots: list = [None] * (3 * len(self._fcs))
        self._kept = False
        # (a SecondaryGroup turns sparse steps on: it marks what changes)
        self.sparse = False
        # sparse: the cell the unchanged relationships follow, the indices
        # of those that do not follow it (stepped at the next CG), each
        # relationship's index by its source (faults name the source)
        self._cell = _core.SequenceCell(max([fc.sequence for fc in self._fcs], default=0))
        self.changed: set[int] = set(range(len(self._fcs)))
        self._by_source = {id(fc.source): k for k, fc in enumerate(self._fcs)}
        self._stepped: list[int] = []
        self._in_flight: int | None = None
        for fc in self._fcs:
            if fc.seq_cell is not None:
                fc.sequence = fc.sequence       # its own number (of a cell elsewhere)

    @property
    def relationships(self) -> list[FlashCopy]:
        return list(self._fcs)

    def __repr__(self) -> str:
        return f"<FlashCopyGroup {self.store.ref} {len(self._fcs)} relationships>"

    def _fresh(self) -> list:
        """The slots, every one that a prepare took filled again."""
        if not self._kept:
            if self._one_size is not None:
                return self.store.new_bitmaps(self._one_size, 3 * len(self._fcs))
            out: list = []
            for fc in self._fcs:
                out += fc.store.new_bitmaps(fc.source.n_grains, 3)
            return out
        slots = self._slots
        for i, fc in enumerate(self._fcs):
            if slots[3 * i] is None:
                slots[3 * i:3 * i + 3] = fc.store.new_bitmaps(fc.source.n_grains, 3)
        return slots

    # -- sparse steps ------------------------------------------------------------
    def mark_changed(self, k: int) -> None:
        """Relationship ``k``'s B takes (or took) tracks: it is stepped at
        the next CG. (Until then it may follow the cell still: its C holds
        B's image at its last step, which every CG up to that one found
        there, as copy-on-write keeps it while B moves on.)"""
        self.changed.add(k)

    def mark_all_changed(self, ks: Iterable[int]) -> None:
        """:meth:`mark_changed` of each of ``ks``."""
        self.changed.update(ks)

    def _to_step(self) -> list[int]:
        """The indices a sparse CG steps, in order: the changed ones (those
        marked, and any that left the cell by a step of its own), or every
        one while a fault is armed at a step of the FlashCopy phase (a
        prepare, the decision, a commit or a revert; for any volume): the phase then runs as it would with every
        relationship stepped, so a fault fires where it would, and what a
        failure leaves (which relationships are prepared, reverted or
        committed, what a unit's reopen reports) is what it leaves there."""
        cell = self._cell
        if cell.left:
            index = self._by_source
            for fc in cell.left:
                k = index.get(id(fc.source), -1)
                if k >= 0 and self._fcs[k] is fc:
                    self.changed.add(k)
            cell.left.clear()
        for f in faults.armed():
            if f.point in ("prepare", "decision", "commit", "revert"):
                self.mark_all_changed(range(len(self._fcs)))
                break
        return sorted(self.changed)

    def settled(self, sequence: int | None, commit: bool,
                committed: Sequence[FlashCopy] = ()) -> None:
        """After the group's relationships were committed (``commit``) on CG
        ``sequence``, or reverted: the followers take that number (a
        commit), and every relationship marked that is settled on the
        cell's number with nothing changed since joins the cell again.
        (``committed``: those this step committed, whose change bitmaps
        are the empty ones their prepare gave them: no need to look.)"""
        if not self.sparse:
            return
        cell = self._cell
        cell.inhibit = False
        if commit and sequence is not None and sequence > cell.value:
            cell.value = sequence
        value = cell.value
        changed = self.changed
        fcs = self._fcs
        stepped = self._stepped
        if committed:
            if len(committed) == len(stepped):   # (every one it stepped: their indices)
                ks = stepped
            else:
                index = self._by_source
                ks = [index[id(fc.source)] for fc in committed]
            left = _core.follow_cell(list(committed), cell)   # (in one C loop)
            if len(left) == 0 and len(ks) == len(changed):
                changed.clear()
            else:
                gone = set(left)
                changed.difference_update(k for j, k in enumerate(ks) if j not in gone)
        for k in sorted(changed):
            fc = fcs[k]
            if (fc.active and not fc.revertible and fc.sequence == value
                    and fc.src_changed is not None and fc.tgt_changed is not None
                    and not fc.src_changed.any() and not fc.tgt_changed.any()):
                fc.seq_cell = cell
                changed.discard(k)

    def _before(self) -> Callable | None:
        """The callback the kernels call before each relationship's step
        (under its locks): its store's check. (A store that keeps records
        also gets each one's state as it was, for an undo: the kernels'
        ``snapshots``.)"""
        if not self._checked:
            return None
        return lambda fc: fc.store.check_writable()

    def prepare_all(self, sequence: int, stop_at_failure: bool) -> str | None:
        """Prepare every B->C relationship revertibly with CG ``sequence``
        (write-inhibiting each B), in order; at durability "power"
        the prepared bitmaps are synced before this returns. Returns None if
        every prepare succeeded, else the last failure (it stops at the first if
        ``stop_at_failure``). The prepared relationships are kept in
        :attr:`prepared` for :meth:`commit_all` / :meth:`revert_all`."""
        sequence = check_sequence(sequence)     # as resync does, before anything changes
        if self.sparse:
            stepped = self._stepped = self._to_step()
            # the B of every relationship left on the cell is write-inhibited
            # until the phase ends, as a prepared one's is
            self._cell.inhibit = True
            fcs = (self._fcs if len(stepped) == len(self._fcs)
                   else [self._fcs[k] for k in stepped])
            if self._one_size is not None:
                slots = self.store.new_bitmaps(self._one_size, 3 * len(fcs))
            else:
                slots = [bm for fc in fcs for bm in fc.store.new_bitmaps(fc.source.n_grains, 3)]
        else:
            fcs = self._fcs
            slots = self._slots = self._fresh()
        self._in_flight = sequence
        n = len(fcs)
        prepared: list[FlashCopy] = []
        self.prepared = prepared
        snapshots: list | None = [] if self._durable else None
        before = self._before()
        self._kept = False
        failure = None
        error: BaseException | None = None
        k = 0
        while True:         # (one kernel call at least: a batch may be empty)
            start = k
            k, err = _core.prepare_revertible_many(fcs, k, sequence, slots, True, faults.hit,
                                                   before, None, snapshots)
            prepared += fcs[start:k]
            if err is None:
                break
            self._kept = True
            if not isinstance(err, FastFCError):
                error = err
                break
            failure = f"prepare of {fcs[k].source.name}: {type(err).__name__}: {err}"
            k += 1
            if stop_at_failure or k >= n:
                break
        if k < n:
            self._kept = True
        if self.sparse:       # the slots no prepare took
            unused = [bm for bm in slots if bm is not None]
            if unused:
                self.store.recycle(unused)
            self._cell.left.clear()      # (those it stepped: they are in changed)
            if error is not None:
                self._cell.inhibit = False
        if snapshots is not None and prepared:
            try:
                record_steps(prepared, snapshots)
            except FastFCError as e:
                failure = f"prepare of {prepared[0].source.name}: {type(e).__name__}: {e}"
                prepared.clear()
        if error is not None:
            raise error
        if self.ordered:   # the prepared bitmaps before the decision
            self.store.sync(*(bm for fc in prepared
                              for bm in (fc.to_copy, fc.src_changed, fc.tgt_changed)))
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
        fcs = self.prepared
        n = len(fcs)
        snapshots: list | None = [] if self._durable else None
        before = self._before()
        commit = step == "commit"
        dropped: list = []
        done: list[FlashCopy] = []
        errors = []
        error: BaseException | None = None
        k = 0
        while True:         # (one kernel call at least: a batch may be empty)
            start = k
            k, err = _core.end_revertible_many(fcs, k, commit, dropped, faults.hit, before,
                                               None, snapshots)
            done += fcs[start:k]
            if err is None:
                break
            if not isinstance(err, FastFCError):
                error = err
                break
            errors.append(f"{step} of {fcs[k].source.name}: {type(err).__name__}: {err}")
            k += 1
            if k >= n:
                break
        self.prepared = []
        if snapshots is not None and done:
            try:
                record_steps(done, snapshots)
            except FastFCError as e:
                # undone: every one of them is still revertible
                errors.insert(0, f"{step} of {done[0].source.name}: {type(e).__name__}: {e}")
                done, dropped = [], []
        self.store.recycle(dropped)
        if self._background:
            for fc in done:
                fc.start_background()
        if self.sparse:
            self._cell.inhibit = False          # the phase has ended
            if error is None:
                # the followers commit with the rest: they hold the CG (a
                # commit that failed on every relationship of the group, none
                # following, leaves it on the previous CG, as it would stepped)
                followers = len(self.changed) < len(self._fcs)
                self.settled(self._in_flight, commit and (not errors or followers),
                             done if commit else ())
        if error is not None:
            raise error
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
        # the pairs (indices) on which the CG in flight began (None: every one)
        self.begun: list[int] | None = None
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
        self._by_primary = {id(a): k for k, a in enumerate(self._as)}
        self._set_sparse()

    def _set_sparse(self) -> None:
        """Sparse steps on, unless at durability "power" (:attr:`sparse`)."""
        flash = self.flash
        flash.sparse = not self.ordered
        if not flash.sparse:
            for fc in flash.relationships:
                if fc.seq_cell is not None:
                    fc.sequence = fc.sequence     # its own number again
        for k, p in enumerate(self._pairs):
            # Global Copy to B outside a CG (the loop between CGs, a CLI's
            # backlog): its relationship is stepped at the next CG
            p.on_sent = (lambda k=k: flash.mark_changed(k)) if flash.sparse else None

    @property
    def sparse(self) -> bool:
        """Whether a CG may visit only the pairs and relationships that
        changed (:class:`FlashCopyGroup`'s sparse steps; not at durability
        "power", whose drain orders every pair's barriers)."""
        return self.flash.sparse and not self.ordered

    def begin(self, begun: list[int] | None) -> None:
        """The pairs on which coordination began the CG (indices, in order;
        None: every pair). Their relationships are marked changed (their B
        takes the CG's tracks). A pair that a drain fault names (any pair,
        for a fault armed for any volume), or every pair while the link is
        down, begins an empty CG too, so that the drain reaches it as it
        would if every pair had begun one."""
        if begun is None or not self.sparse:
            self.begun = None
            if self.flash.sparse:
                self.flash.mark_all_changed(range(len(self._pairs)))
            return
        extra: set[int] = set()
        link = self._link
        if link is None or not link.up:
            extra.update(range(len(self._pairs)))
        else:
            for f in faults.armed():
                if f.point == "drain":
                    if f.volume is None:
                        extra.update(range(len(self._pairs)))
                        break
                    k = self._by_primary.get(id(f.volume), -1)
                    if k >= 0:
                        extra.add(k)
        self._set_begun(begun)
        if extra:
            done = list(begun)
            try:
                for k in sorted(extra.difference(begun)):
                    p = self._pairs[k]      # an empty CG, as coordination begins on an idle pair
                    with locked((p.primary,)):
                        if p.cg is None and p.spare is not None:
                            p.cg, p.spare = p.spare, None
                            done.append(k)
            finally:        # (the CG's end ends what began, whatever raised)
                if len(done) > len(begun):
                    self._set_begun(sorted(done))
        self.flash.mark_all_changed(range(len(self._pairs)) if self.begun is None
                                    else self.begun)

    def _set_begun(self, begun: list[int]) -> None:
        if len(begun) == len(self._pairs):      # every pair: the group's own lists
            self.begun = None
            return
        ks = self.begun = list(begun)
        self._lists_begun = ([self._pairs[k] for k in ks], [self._as[k] for k in ks],
                             [self._bs[k] for k in ks], [self.triplets[k] for k in ks])

    def _begun_lists(self) -> tuple[list, list, list, list[Triplet]]:
        """(pairs, A volumes, B volumes, triplets) of the CG in flight."""
        if self.begun is None:
            return self._pairs, self._as, self._bs, self.triplets
        return self._lists_begun

    def __repr__(self) -> str:
        return f"<SecondaryGroup {self.store.ref} {len(self.triplets)} triplets>"

    def set_ordered(self, ordered: bool) -> None:
        """Durability "power": B is written by the ordered drain only, after
        its barriers, so collisions save CG versions in the side file."""
        self.ordered = ordered
        self.flash.ordered = ordered
        for trip in self.triplets:
            trip.pair.ordered_drain = ordered
        self._set_sparse()

    # -- drain -------------------------------------------------------------------
    def drain(self, deadline: Callable[[], bool] | None,
              time_left: Callable[[], float] | None) -> int:
        """Send every CG track of the group's pairs to their B volumes, in
        triplet order (at durability "power", each pair after the barriers
        of :meth:`_order_drain`, B images synced at the end). Returns the
        CG's bytes; raises :class:`DrainAborted` past the deadline, or what a
        link raises.

        One kernel loop over the pairs (:func:`fastfc._core.pprc_drain_many`,
        a pair's own CG drain being a batch of one), which calls the
        ``drain`` fault point (and the ordered drain's barriers) before each
        pair and moves the tracks without the GIL where the link is in this
        process. A pair the kernel hands back (CG versions in its side file,
        B's state, a link that moves no tracks itself or went down) is
        drained by its own method (``PPRCPair.cg_drain``, which sends them
        or raises why not) before the loop goes on with the next pair."""
        pairs, as_, bs, trips = self._begun_lists()
        n = len(pairs)
        link = self._link
        direct = link is not None and link.direct()
        owed = []
        for p in pairs:
            assert p.cg is not None      # coordination began the CG of every such pair
            owed.append(p.cg)
        ordered = self.ordered
        before = (lambda k: self._order_drain(trips[k])) if ordered else None
        run_hook = link.fault_point if link is not None else None
        down = link.down_flag() if link is not None else None
        sent = 0
        locks: list = [p.drain_lock for p in pairs]
        tracks: list[int] = []
        runs: list[int] = []
        k = 0
        try:
            for lk in locks:
                lk.acquire()
            while True:     # (one kernel call at least: a batch may be empty)
                left = -1.0 if time_left is None else max(0.0, time_left())
                k, st = _core.pprc_drain_many(as_, bs, owed, DIRECT_CHUNK_BYTES,
                                              left, k, tracks, down, faults.hit, before,
                                              run_hook, runs, pairs, direct)
                if st == 0:
                    break
                if st == 1:
                    raise DrainAborted("drain time limit passed")
                p = pairs[k]                 # the pair's own method drains it
                locks[k].release()
                locks[k] = None
                sent += p.cg_drain(deadline, time_left) - p.cg_bytes
                k += 1
                if k >= n:
                    break
        finally:
            for lk in locks:
                if lk is not None:
                    lk.release()
            moved = 0
            for p, t in zip(pairs, tracks):
                nbytes = t * p.primary.grain_size
                p.bytes_sent += nbytes
                moved += nbytes
            if link is not None and moved:
                link.account(moved, sum(runs))
        for p in pairs:
            sent += p.cg_bytes
            if p.side:       # collisions while the kernel ran that B refused
                sent += p.send_side_file()
        if ordered:   # the CG's B images on the disk before any prepare names them
            self.store.sync(*(trip.b for trip in self.triplets))
        return sent + moved

    def end_drain(self, ok: bool) -> None:
        """Close the CG of every pair, in one kernel call
        (:func:`fastfc._core.cg_end_many`; a pair's own ``cg_end`` is a
        batch of one): a failed drain gives its tracks back to the
        out-of-sync bitmaps. (Sparse: those on which it began.)"""
        pairs, as_, _, _ = self._begun_lists()
        _core.cg_end_many(as_, pairs, ok)

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
        ``max_bytes`` per pair); returns the bytes sent. (A pair that sends
        marks its relationship changed: ``PPRCPair.on_sent``.)"""
        return sum(t.pair.drain(max_bytes) for t in self.triplets)

    def backlog(self) -> int:
        """Out-of-sync grains of the group's pairs (a measure of the work left)."""
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


