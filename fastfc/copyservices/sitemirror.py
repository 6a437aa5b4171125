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
  ``sitepair.BATCH_BYTES`` of gathered tracks, for all of the unit's triplets.
  Tracks are gathered under A's lock (a bounded run per hold) and sent
  outside it; a host write to a CG track not yet gathered saves the CG
  version in the pair's side file first (the collision rule), which the
  drain sends. The session interleaves the units' calls, with at most
  ``MAX_INFLIGHT_BYTES`` unanswered, so the units receive their batches in
  parallel.
* **FlashCopy**, a two-phase protocol across units: ``prepare`` on every
  unit at once (one call each, sent right behind the unit's last drain
  batch without waiting for its answer, so it costs no round trip of its
  own; with ``decide="after_each"`` after the drain, one unit at a time),
  the decision recorded durably (by the session's ``journal``, by default
  the first unit), then ``finish`` (commit all or revert all) on every
  unit at once: two round trips after the drain, the least the protocol
  allows (a unit commits only once the decision is durable where recovery
  reads it, and whether to commit is known only when that record
  answered). Every call is keyed by the CG sequence and idempotent on the
  unit.

Recovery spans units (:func:`reconcile_sites`): a unit that restarted never
settles an in-doubt CG alone; before the next CG the session reads every
unit and applies the seed's rule
(:func:`~fastfc.copyservices.secondary.resolve_groups`).
:func:`recover_sites` does it over the secondary units alone (the primary
site lost) and fast-reverse-restores every B from its C.
"""

from __future__ import annotations

import uuid
from contextlib import contextmanager
from typing import Any, Callable, Iterator, Sequence

from fastfc import faults
from fastfc.copyservices.groups import Triplet
from fastfc.copyservices import sitepair
from fastfc.copyservices.sitepair import SitePair
from fastfc.copyservices.secondary import (Deadline, Secondary, Status, TimeLeft,
                                           resolve_groups)
from fastfc.copyservices.resolution import REVERT
from fastfc.errors import DrainAborted, FastFCError, StateError
from fastfc.storage.site import Pending, SecondarySite, SiteVolume, Update
from fastfc.storage.store import Store
from fastfc.storage.volume import Volume

MAX_INFLIGHT_BYTES = 64 << 20    # apply calls not yet answered, all units together


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
        self._ride: int | None = None       # the CG whose prepare rides behind the drain
        self._early: tuple[int, Pending] | None = None   # that prepare, once sent

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
            p.begin_drain()
        ride, self._ride = self._ride, None
        return self._batches(deadline, ride)

    def prepare_behind_drain(self, sequence: int) -> None:
        self._ride = sequence

    def _batches(self, deadline: Deadline, ride: int | None) -> Iterator[tuple[Pending, int]]:
        """The apply calls; with ``ride`` (a CG sequence), the prepare of
        that CG sent right behind the last one, without waiting for its
        answer (or alone, if there was nothing to send): it prepares only if
        that batch was written whole (``after``, the batch's token)."""
        pairs = list(self.pairs)
        while pairs:
            updates: list[Update] = []
            pos = 0
            while pairs:
                p = pairs[0]
                assert p.cg is not None
                n, done = p.gather(p.cg, updates,
                                   max(sitepair.BATCH_BYTES - pos, p.primary.grain_size if not pos else 0),
                                   None, side=True)
                pos += n
                if done:
                    pairs.pop(0)
                elif not n:
                    break       # this call is full
            if updates:
                if ride is not None and not pairs:      # the last batch
                    token = f"{self.session}/{ride}/{uuid.uuid4().hex[:12]}"
                    call = self.site.apply(updates, token)
                    self._early = (ride, self.site.prepare(self.session, ride, token))
                    ride = None
                    yield call, pos
                else:
                    yield self.site.apply(updates), pos
            if deadline is not None and deadline():
                raise DrainAborted("drain time limit passed")
        if ride is not None:        # nothing to send: the prepare alone, at once
            self._early = (ride, self.site.prepare(self.session, ride))

    def end_drain(self, ok: bool) -> None:
        """Close each pair's CG. A failed drain whose prepare was sent
        behind this unit's last batch reverts it here (no decision needed:
        without one every reader of the units reverts), so B takes Global
        Copy again; a unit that does not answer is read by the next
        attempt's reconciliation."""
        self._ride = None
        for p in self.pairs:
            p.cg_end(ok)
        if ok or self._early is None:
            return
        (sequence, call), self._early = self._early, None
        try:
            call.result()
            self.site.finish(self.session, sequence, REVERT).result()
        except FastFCError:
            pass

    # -- the FlashCopy phase -------------------------------------------------------
    def prepare(self, sequence: int, stop_at_failure: bool) -> Pending:
        """The prepare sent behind the drain, if it was for ``sequence``;
        else one sent now."""
        early, self._early = self._early, None
        if early is not None and early[0] == sequence:
            return _Prepared(early[1])
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


class SiteRecord(Store):
    """The primary side's durable record of a session over secondary sites,
    kept by the store (the storage unit) of its A volumes: the session's
    store. It records the session's triplets (``[A name, site key, B name,
    C name]``: the key is ``[transport, unit name]`` for a unit of
    :mod:`fastfc.remote`), settings and counters (after every attempt,
    without an fsync) in ``store`` (:meth:`Store.save_site_session`), so a
    new primary process can continue the session (``resume``). Nothing else
    of a CG is recorded on the primary side (the units record the CG
    protocol): its transactions are empty."""

    durable = True

    def __init__(self, store: Store, name: str, triplets: list[list[Any]]) -> None:
        super().__init__()
        self.inner, self.name, self.triplets = store, name, triplets

    def __repr__(self) -> str:
        return f"<SiteRecord {self.name} in {self.inner!r}>"

    @contextmanager
    def transaction(self, sync: bool = True) -> Iterator[None]:
        yield

    def add_session(self, record: dict, session: Any, partners: Any = ()) -> None:
        keep = ("cg_interval", "max_coordination_time", "max_drain_time", "decide")
        self.inner.save_site_session(self.name, {**{k: record[k] for k in keep},
                                                 "triplets": self.triplets,
                                                 "stats": record["stats"]})

    def save_session_stats(self, name: str, stats: dict) -> None:
        self.inner.save_site_stats(name, stats)

    def drop_session(self, name: str, session: Any = None) -> None:
        self.inner.drop_site_session(name)


def _site_key(site: SecondarySite) -> list[Any]:
    key = site.key
    return list(key) if isinstance(key, tuple) else [key]


def connect(triplets: Sequence[tuple[Any, Any, Any]], *, name: str, link: Any,
            initial_copy: bool, resume: bool = False
            ) -> tuple[list[Triplet], list[SiteGroup], SitesLink, int, dict | None]:
    """Set a session ``name`` up on the units holding the triplets' B and C
    volumes (``SecondarySite.setup``) and pair each local A with its B.
    Returns the triplets, one :class:`SiteGroup` per unit (in the order
    their triplets first appear), the link (every unit), the newest CG
    sequence a C carries, and the counters a resumed session recorded
    (else None). ``link`` must be None: each unit is its own link.

    When every A volume is in one storage unit, the session is recorded
    there (:class:`SiteRecord`); a session of that name recorded there
    already must be resumed (or forgotten). ``resume``: continue that
    recorded session: the triplets must be the recorded ones; each unit
    must serve the session with the recorded B->C pairs, its C volumes on a
    CG no older than the recorded one (``SecondarySite.rejoin``, which
    then holds each B as a secondary again); then, instead of an initial
    copy, each pair marks out of sync the grains where A and B differ
    (:func:`~fastfc.copyservices.sitepair.resync_by_digests`). A refusal
    changes nothing on the primary side, nor on the unit that refuses
    (units asked before it hold their B volumes as secondaries again: the
    safe state)."""
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
    a_stores = {id(a.store): a.store for a, _, _ in triplets}
    primary = next(iter(a_stores.values())) if len(a_stores) == 1 else None
    if primary is not None and not primary.durable:
        primary = None
    described = [[a.name, _site_key(b.site()), b.name, c.name] for a, b, c in triplets]
    recorded = primary.site_sessions().get(name) if primary is not None else None
    if resume:
        if primary is None:
            raise ValueError("resume continues a session recorded in the storage unit of its "
                             "A volumes: every A must be a volume of that one unit")
        if recorded is None:
            raise StateError(f"no session {name!r} over secondary units is recorded in "
                             f"{primary.ref or 'the A volumes unit'}: nothing to resume")
        if recorded["triplets"] != described:
            raise ValueError(f"session {name!r} was recorded with triplets "
                             f"{recorded['triplets']}, not {described}")
    elif recorded is not None:
        raise StateError(f"a session {name!r} over secondary units is recorded in the A "
                         "volumes' unit: resume it (fastfc.remote.attach, or "
                         "GlobalMirror(..., resume=True)), or end it first")
    stats = recorded.get("stats") if recorded is not None else None
    committed = int(stats["sequence"]) if stats else 0
    seqs: list[int] = []
    for s in sites.values():
        mine = [(b.name, c.name) for _, b, c in triplets if b.site().key == s.key]
        seqs += s.rejoin(name, mine, committed) if resume else s.setup(name, mine)
    pairs: list[SitePair] = []
    try:
        for a, b, _ in triplets:
            pairs.append(SitePair(a, b, b.site(), initial_copy=initial_copy and not resume))
        if resume:
            sitepair.resync_by_digests(pairs)
    except Exception:
        for p in pairs:
            p.remove()
        raise
    made = [Triplet(a, b, c, p, None)       # type: ignore[arg-type]  # (no FlashCopy here)
            for (a, b, c), p in zip(triplets, pairs)]
    # recorded by the A volumes' unit, if they are in one; else nowhere
    store = SiteRecord(primary, name, described) if primary is not None else Store()
    groups = [SiteGroup(s, name, [p for p in pairs if p.site.key == key],
                        [t for t, p in zip(made, pairs) if p.site.key == key], store)
              for key, s in sites.items()]
    return made, groups, SitesLink(list(sites.values())), max(seqs), stats


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
