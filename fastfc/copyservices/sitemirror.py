"""The secondary side through calls: B and C volumes on secondary sites
(remote units) that a session reaches only through a
:class:`~fastfc.storage.site.SecondarySite`.

:class:`~fastfc.copyservices.globalmirror.GlobalMirror` connects here
(:func:`connect`) when its triplets' B and C volumes are
:class:`~fastfc.storage.site.SiteVolume` proxies (the ``fastfc.remote``
package hands those out); the A volumes stay local, with a
:class:`SitePair` each. Each unit's triplets are a :class:`SiteGroup`, the
session's :class:`~fastfc.copyservices.secondary.Secondary` for that unit:

* **Drain.** One :meth:`SecondarySite.apply` call per batch of at least
  ``BATCH_BYTES`` of gathered tracks, for all of the unit's triplets.
  Tracks are gathered under A's lock (a bounded run per hold) and sent
  outside it; a host write to a CG track not yet gathered saves the CG
  version in the pair's side file first (the collision rule), which the
  drain sends. The session interleaves the units' calls, with at most
  ``MAX_INFLIGHT_BYTES`` unanswered, so the units receive their batches in
  parallel.
* **FlashCopy**, a two-phase protocol across units: ``prepare`` on every
  unit at once (one call each), the decision recorded durably (by the
  session's ``journal``, by default the first unit), then ``finish``
  (commit all or revert all) on every unit at once. Every call is keyed by
  the CG sequence and idempotent on the unit.

Recovery spans units (:func:`reconcile_sites`): a unit that restarted never
settles an in-doubt CG alone; before the next CG the session reads every
unit and applies the seed's rule
(:func:`~fastfc.copyservices.secondary.resolve_groups`).
:func:`recover_sites` does it over the secondary units alone (the primary
site lost) and fast-reverse-restores every B from its C.
"""

from __future__ import annotations

from typing import Any, Callable, Iterator, Sequence

import numpy as np

from fastfc import faults
from fastfc._core import MirrorBase, TrackBitmap
from fastfc.copyservices.groups import Triplet
from fastfc.copyservices.secondary import (Deadline, Secondary, Status, TimeLeft,
                                           resolve_groups)
from fastfc.errors import DrainAborted, FastFCError, LimitError, StateError, VolumeClosedError
from fastfc.storage.site import Pending, SecondarySite, SiteVolume, Update
from fastfc.storage.store import Store
from fastfc.storage.volume import Volume

BATCH_BYTES = 16 << 20           # gathered tracks per apply call (>= 1 MiB)
MAX_INFLIGHT_BYTES = 64 << 20    # apply calls not yet answered, all units together
HOLD_BYTES = 1 << 20             # copied per hold of A's lock while gathering


class SitePair(MirrorBase):
    """Global Copy from a local primary ``a`` to ``b`` on a secondary site.

    The bitmaps (``oos``, ``spare``, ``cg``), the side file and ``taken``
    (CG tracks gathered and not yet known to be on B) are guarded by A's
    lock. Not recorded anywhere: a session over sites starts with an
    initial copy.
    """

    oos: TrackBitmap

    def __init__(self, a: Volume, b: SiteVolume, site: SecondarySite, *,
                 initial_copy: bool = True) -> None:
        if a.n_tracks != b.n_tracks or a.track_size != b.track_size:
            raise ValueError(f"{a!r} and {b.name} differ in geometry "
                             f"({a.n_tracks}x{a.track_size} vs {b.n_tracks}x{b.track_size})")
        self.primary, self.remote, self.site = a, b, site
        self.name = f"{a.name}->{site.name}:{b.name}"
        self.sync = False
        self.side: dict[int, np.ndarray] = {}
        self.cg_bytes = 0
        self.bytes_sent = 0
        self.suspend_reason: str | None = None
        self.failed_over = False
        self._cursor = 0
        self.taken = TrackBitmap(a.n_tracks)
        self.spare = TrackBitmap(a.n_tracks)
        a._lock()
        try:
            if a._mirror is not None or a._secondary:
                raise LimitError(f"{a!r} is already in a PPRC pair")
            if a._tgt_rel is not None:
                raise LimitError(f"{a!r} is a FlashCopy target and cannot be a PPRC primary")
            self.oos = TrackBitmap(a.n_tracks, fill=initial_copy)
            self.cg = None
            a._mirror = self
        finally:
            a._unlock()

    def remove(self) -> None:
        a = self.primary
        a._lock()
        try:
            if a._mirror is self:
                a._mirror = None
        finally:
            a._unlock()

    @property
    def out_of_sync_tracks(self) -> int:
        n = self.oos.count()
        if self.cg is not None:
            n += self.cg.count() + len(self.side)
        return n

    def __repr__(self) -> str:
        return f"<SitePair {self.name} oos={self.out_of_sync_tracks}>"

    def _collide(self, t0: int, t1: int) -> None:
        """A host write is about to overwrite CG tracks not yet gathered:
        keep their CG version in the side file (A's lock held)."""
        A, ts, cg = self.primary, self.primary.track_size, self.cg
        assert cg is not None
        A._reserve_read(t0, t1)
        arr = A.array
        for t in range(t0, t1):
            if cg.test(t):
                self.side[t] = arr[t * ts:(t + 1) * ts].copy()
                cg.clear(t)

    def gather(self, bitmap: TrackBitmap, updates: list[Update], budget: int,
               taken: TrackBitmap | None, side: bool) -> tuple[int, bool]:
        """Read set tracks of ``bitmap`` (then, with ``side``, side-file
        versions) into ``updates`` as ``(B name, offsets, rows)``, up to
        ``budget`` bytes, clearing their bits (and setting the span in
        ``taken``); at most ``HOLD_BYTES`` per hold of A's lock. Returns the
        bytes gathered and whether nothing is left."""
        A, ts = self.primary, self.primary.track_size
        hold = max(1, HOLD_BYTES // ts)
        name = self.remote.name
        got = 0
        while got + ts <= budget:
            k = min(hold, (budget - got) // ts)
            A._lock()
            try:
                if A.closed:
                    raise VolumeClosedError(f"{A!r} is closed")
                idx = bitmap.set_indices()
                if len(idx):
                    # the first k set tracks: exactly the set bits of their span
                    idx = idx[:k]
                    t0, t1 = int(idx[0]), int(idx[-1]) + 1
                    offs = idx.astype(np.int64) * ts
                    A._reserve_read(t0, t1)
                    rows = A.read_batch(offs, ts)
                    bitmap.clear_range(t0, t1)
                    if taken is not None:
                        taken.set_range(t0, t1)
                    updates.append((name, offs, rows))
                    got += len(idx) * ts
                    continue
                if side and self.side:
                    items = [self.side.popitem() for _ in range(min(k, len(self.side)))]
                    offs = np.array([t for t, _ in items], dtype=np.int64) * ts
                    updates.append((name, offs, np.stack([d for _, d in items])))
                    got += len(items) * ts
                    continue
                return got, True
            finally:
                A._unlock()
        return got, False

    def drain(self, max_bytes: int | None = None) -> int:
        """Global Copy outside a CG: send out-of-sync tracks (up to
        ``max_bytes``) and wait for the unit; on a failure their bits are set
        again and the pair suspends. Returns bytes sent."""
        if self.suspend_reason is not None or self.failed_over:
            return 0
        taken = TrackBitmap(self.primary.n_tracks)
        updates: list[Update] = []
        got, _ = self.gather(self.oos, updates, min(max_bytes or BATCH_BYTES, BATCH_BYTES),
                             taken, side=False)
        if not updates:
            return 0
        try:
            self.site.apply(updates).result()
        except FastFCError as e:
            self._give_back(taken)
            self.suspend_reason = f"{type(e).__name__}: {e}"
            return 0
        self.bytes_sent += got
        return got

    def _begin_drain(self) -> None:
        """The CG's tracks, as the drain begins: what a failure gives back."""
        A = self.primary
        A._lock()
        try:
            assert self.cg is not None
            self.taken.copy_from(self.cg)
            for t in self.side:
                self.taken.set(t)
        finally:
            A._unlock()

    def _give_back(self, taken: TrackBitmap) -> None:
        A = self.primary
        A._lock()
        try:
            self.oos.or_(taken)
        finally:
            A._unlock()

    def _cg_end(self, ok: bool) -> None:
        """Close the CG; a failed one gives every CG track (gathered or not)
        back to the out-of-sync bitmap."""
        A = self.primary
        A._lock()
        try:
            cg = self.cg
            if cg is None:
                return
            if not ok:
                self.oos.or_(cg)
                self.oos.or_(self.taken)
                for t in self.side:
                    self.oos.set(t)
                cg.fill(False)
            self.taken.fill(False)
            self.side = {}
            self.spare, self.cg = cg, None
        finally:
            A._unlock()




class _Prepared(Pending):
    """A unit's answer to ``prepare``: None once prepared."""

    def __init__(self, call: Pending) -> None:
        self.call = call

    def result(self) -> None:
        self.call.result()
        return None


class _Outcome(Pending):
    """A unit's answer to ``finish``: no relationship failures once it holds
    ``decision``; raises when it holds the other outcome (or did not
    answer)."""

    def __init__(self, call: Pending, where: str, sequence: int, decision: str) -> None:
        self.call, self.where, self.sequence, self.decision = call, where, sequence, decision

    def result(self) -> list[str]:
        got = self.call.result()
        if got != self.decision:
            raise StateError(f"{self.where} holds {got} for CG {self.sequence}, "
                             f"expected {self.decision}")
        return []


class _UnitJournal:
    """A unit that records a session's decisions (``cg_decision``)."""

    def __init__(self, site: SecondarySite) -> None:
        self.site = site

    def cg_decision(self, session: str, sequence: int, decision: str) -> None:
        self.site.record_decision(session, sequence, decision)

    def __repr__(self) -> str:
        return f"<decisions recorded by {self.site.name}>"


class SiteGroup(Secondary):
    """The triplets whose B and C one secondary site holds: the session's
    :class:`~fastfc.copyservices.secondary.Secondary` for a unit reached
    by calls. Its pairs are :class:`SitePair` objects (each guarded by its
    A's lock); every other piece of state is on the unit."""

    inflight_bytes = property(lambda self: MAX_INFLIGHT_BYTES)   # read when the drain starts
    reconcile_first = True

    def __init__(self, site: SecondarySite, session: str, pairs: list[SitePair],
                 triplets: list[Triplet], store: Store | None = None) -> None:
        self.site, self.session, self.pairs, self.triplets = site, session, pairs, triplets
        self.name = site.name
        self.store = store if store is not None else Store()   # nothing recorded here
        self.journal = _UnitJournal(site)
        self.group = self

    def __repr__(self) -> str:
        return f"<SiteGroup {self.site.name} {len(self.pairs)} triplets>"

    # -- the drain -------------------------------------------------------------
    def drain(self, deadline: Deadline, time_left: TimeLeft) -> Iterator[tuple[Pending, int]]:
        """The fault points, and each pair's CG tracks noted (what a failure
        gives back), now; then, as the session iterates, one apply call per
        batch of about ``BATCH_BYTES``, gathered from the pairs in turn, the
        deadline checked after each call sent."""
        for p in self.pairs:
            faults.hit("drain", p.primary)
        for p in self.pairs:
            p._begin_drain()
        return self._batches(deadline)

    def _batches(self, deadline: Deadline) -> Iterator[tuple[Pending, int]]:
        pairs = list(self.pairs)
        while pairs:
            updates: list[Update] = []
            pos = 0
            while pairs:
                p = pairs[0]
                assert p.cg is not None
                n, done = p.gather(p.cg, updates,
                                   max(BATCH_BYTES - pos, p.primary.track_size if not pos else 0),
                                   None, side=True)
                pos += n
                if done:
                    pairs.pop(0)
                elif not n:
                    break       # this call is full
            if updates:
                yield self.site.apply(updates), pos
            if deadline is not None and deadline():
                raise DrainAborted("drain time limit passed")

    def end_drain(self, ok: bool) -> None:
        for p in self.pairs:
            p._cg_end(ok)

    # -- the FlashCopy phase -------------------------------------------------------
    def prepare(self, sequence: int, stop_at_failure: bool) -> Pending:
        return _Prepared(self.site.prepare(self.session, sequence))

    def finish(self, sequence: int, decision: str) -> Pending:
        return _Outcome(self.site.finish(self.session, sequence, decision),
                        self.site.name, sequence, decision)

    # -- resolution --------------------------------------------------------------
    def status(self) -> Status:
        st = self.site.status(self.session)
        return Status([(c, bool(rev), int(q)) for c, rev, q in st["fcs"]],
                      {int(q): d for q, d in st["settled"].items()},
                      {int(q): d for q, d in st["decisions"].items()})

    def settle(self, sequence: int, action: str) -> Pending:
        return self.finish(sequence, action)

    def c_sequences(self) -> list[int]:
        got = {c: q for c, _, q in self.status().relationships}
        return [got[t.c.name] for t in self.triplets]

    # -- between CGs ---------------------------------------------------------------
    def global_copy(self, max_bytes: int) -> int:
        """Global Copy of every pair's out-of-sync tracks (up to
        ``max_bytes`` per pair); returns the bytes sent."""
        return sum(p.drain(max_bytes) for p in self.pairs)

    def backlog(self) -> int:
        return sum(p.oos.count() for p in self.pairs)

    # -- recovery and the end -------------------------------------------------------
    def restore_b(self) -> None:
        self.site.restore_b(self.session)
        for p in self.pairs:
            p.failed_over = True

    def close(self, *, discard: bool, on_copy: Callable[[int, int], None] | None) -> None:
        """Drop the pairs from the A volumes. The unit keeps its B->C
        relationships (and the C volumes their last CG)."""
        for p in self.pairs:
            p.remove()
        self.pairs = []

    def tracks_c_needs(self) -> dict[str, int]:
        raise StateError("tracks_c_needs is not available over secondary sites")


class SitesLink:
    """What a session asks of its link: whether every unit is up."""

    def __init__(self, sites: Sequence[SecondarySite]) -> None:
        self.sites = list(sites)

    @property
    def up(self) -> bool:
        """Every unit answers (one that did not is asked again)."""
        return all(s.up or s.probe() for s in self.sites)

    def __repr__(self) -> str:
        return f"<sites {', '.join(s.name for s in self.sites)}>"


def connect(triplets: Sequence[tuple[Any, Any, Any]], *, name: str, link: Any,
            initial_copy: bool) -> tuple[list[Triplet], list[SiteGroup], SitesLink, int]:
    """Set a session ``name`` up on the units holding the triplets' B and C
    volumes (``SecondarySite.setup``) and pair each local A with its B.
    Returns the triplets, one :class:`SiteGroup` per unit (in the order
    their triplets first appear), the link (every unit) and the newest CG
    sequence a C carries. ``link`` must be None: each unit is its own link."""
    if link is not None:
        raise ValueError("a session over secondary sites picks its links itself: "
                         "pass link=None")
    for trip in triplets:
        if len(trip) != 3 or not isinstance(trip[0], Volume) \
                or not isinstance(trip[1], SiteVolume) or not isinstance(trip[2], SiteVolume):
            raise TypeError("with remote volumes every triplet must be (local Volume, "
                            "remote B, remote C)")
    if len({id(t[0]) for t in triplets}) != len(triplets) or \
            len({(t[1].site().key, v.name) for t in triplets for v in t[1:]}) != 2 * len(triplets):
        raise ValueError("every volume may appear in a session only once")
    sites: dict[Any, SecondarySite] = {}
    for _, b, c in triplets:
        s = b.site()
        if c.site().key != s.key:
            raise ValueError(f"{b.name} and {c.name} must be in one unit")
        sites.setdefault(s.key, s)
    for a, _, _ in triplets:
        a.store.check_writable()
    seqs: list[int] = []
    for s in sites.values():
        mine = [(b.name, c.name) for _, b, c in triplets if b.site().key == s.key]
        seqs += s.setup(name, mine)
    pairs: list[SitePair] = []
    try:
        for a, b, _ in triplets:
            pairs.append(SitePair(a, b, b.site(), initial_copy=initial_copy))
    except Exception:
        for p in pairs:
            p.remove()
        raise
    made = [Triplet(a, b, c, p, None)       # type: ignore[arg-type]  # (no FlashCopy here)
            for (a, b, c), p in zip(triplets, pairs)]
    store = Store()         # the session records nothing on the primary side
    groups = [SiteGroup(s, name, [p for p in pairs if p.site.key == key],
                        [t for t, p in zip(made, pairs) if p.site.key == key], store)
              for key, s in sites.items()]
    return made, groups, SitesLink(list(sites.values())), max(seqs)


def reconcile_sites(sites: Sequence[SecondarySite], session: str,
                    journal: Callable[[int, str], None] | None = None, *,
                    seen: list[int] | None = None) -> tuple[str, int]:
    """End every C of ``session`` on one CG across ``sites``, by the seed's
    rule (:func:`~fastfc.copyservices.secondary.resolve_groups`), from what
    the units hold (no unit settles an in-doubt CG alone).

    If some unit committed the pending sequence (a relationship carries it
    without being revertible, or the unit recorded a commit), commit the
    rest; if some unit reverted it, revert the rest; otherwise follow the
    session's recorded decision, and without one (every prepared
    relationship still revertible with one sequence) revert all. Returns
    ``(action, sequence)``: action "nothing" (with the newest sequence a C
    carries), "commit" or "revert". ``journal(sequence, action)`` records
    the action first. Raises the unit's error if one is unreachable
    (nothing is decided then), :class:`StateError` if one did not settle.
    ``seen``, if given, receives the highest sequence any unit carries,
    settled or recorded (a new CG must use a higher one).
    """
    groups = [SiteGroup(s, session, [], []) for s in sites]
    res = resolve_groups(groups, journal)
    if seen is not None:
        seen.append(res.top)
    if res.errors:
        raise StateError(f"CG {res.sequence} of {session!r} not resolved: "
                         + "; ".join(res.errors))
    return res.action, res.sequence


def recover_sites(sites: Sequence[SecondarySite], session: str) -> int:
    """Site-loss recovery over the secondary units alone: settle any
    in-doubt CG by :func:`reconcile_sites` (the decision recorded by the
    lost session is read from the units), check every C is on one CG, then
    fast-reverse-restore each B from its C and let B take host writes.
    Returns the CG sequence every B now holds."""
    sites = list(sites)
    journal = sites[0]
    reconcile_sites(sites, session,
                    lambda seq, d: journal.record_decision(session, seq, d))
    seqs = {seq for s in sites for (_, _, seq) in s.status(session)["fcs"]}
    if len(seqs) != 1:
        raise StateError(f"C volumes of {session!r} are on CGs {sorted(seqs)} after "
                         "reconciling; not restored")
    for s in sites:
        s.restore_b(session)
    return seqs.pop()
