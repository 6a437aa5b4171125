"""Global Mirror with B and C volumes on secondary sites reached by calls.

:class:`GlobalMirror` makes a :class:`SiteGlobalMirror` when its triplets'
B and C volumes are :class:`~fastfc.storage.site.SiteVolume` proxies (the
``fastfc.remote`` package hands those out); the A volumes stay local.
Coordination is the local one; the other two phases become:

* **Drain.** Per unit, one :meth:`SecondarySite.apply` call per batch of at
  least ``BATCH_BYTES`` of gathered tracks, for all of the unit's triplets.
  Tracks are gathered under A's lock (a bounded run per hold) and sent
  outside it; a host write to a CG track not yet gathered saves the CG
  version in the pair's side file first (the collision rule), which the
  drain sends. At most ``MAX_INFLIGHT_BYTES`` are in flight at once; the
  units receive their batches in parallel.
* **FlashCopy**, a two-phase protocol across units: ``prepare`` on every
  unit at once (one call each), the decision recorded durably (by the
  ``journal``, or the first unit), then ``finish`` (commit all or revert
  all) on every unit at once. Every call is keyed by the CG sequence and
  idempotent on the unit.

Recovery spans units (:func:`reconcile_sites`): a unit that restarted never
settles an in-doubt CG alone; before the next CG the session reads every
unit and applies the seed's rule. :func:`recover_sites` does it over the
secondary units alone (the primary site lost) and fast-reverse-restores
every B from its C.
"""

from __future__ import annotations

import collections
import threading
import time
from typing import Any, Callable, Sequence

import numpy as np

from fastfc import faults
from fastfc._core import MirrorBase, TrackBitmap
from fastfc._numbers import check_real
from fastfc.copyservices.globalmirror import (Cause, CGResult, GlobalMirror, GMState,
                                              GMStats, Triplet)
from fastfc.errors import DrainAborted, FastFCError, LimitError, StateError, VolumeClosedError
from fastfc.names import check_name
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


class SiteGroup:
    """The triplets whose B and C one secondary site holds: the session's
    seam (:class:`~fastfc.copyservices.groups.SecondaryGroup`) for a
    unit reached by calls. The session drives the CG phases of all groups at
    once (one call per unit in flight on every unit); between CGs the loop
    asks each group for Global Copy and its backlog."""

    def __init__(self, site: SecondarySite, pairs: list[SitePair],
                 triplets: list[Triplet]) -> None:
        self.site, self.pairs, self.triplets = site, pairs, triplets

    def __repr__(self) -> str:
        return f"<SiteGroup {self.site.name} {len(self.pairs)} triplets>"

    def global_copy(self, max_bytes: int) -> int:
        """Global Copy of every pair's out-of-sync tracks (up to
        ``max_bytes`` per pair); returns the bytes sent."""
        return sum(p.drain(max_bytes) for p in self.pairs)

    def backlog(self) -> int:
        return sum(p.oos.count() for p in self.pairs)


class _SitesLink:
    """What the session's loop asks of its link: whether every unit is up."""

    def __init__(self, sites: Sequence[SecondarySite]) -> None:
        self.sites = list(sites)

    @property
    def up(self) -> bool:
        """Every unit answers (one that did not is asked again)."""
        return all(s.up or s.probe() for s in self.sites)

    def __repr__(self) -> str:
        return f"<sites {', '.join(s.name for s in self.sites)}>"


def reconcile_sites(sites: Sequence[SecondarySite], session: str,
                    journal: Callable[[int, str], None] | None = None, *,
                    seen: list[int] | None = None) -> tuple[str, int]:
    """End every C of ``session`` on one CG across ``sites``, by the seed's
    rule, from what the units hold (no unit settles an in-doubt CG alone).

    If some unit committed the pending sequence (a relationship carries it
    without being revertible, or the unit recorded a commit), commit the
    rest; if some unit reverted it, revert the rest; otherwise follow the
    session's recorded decision, and without one (every prepared
    relationship still revertible with one sequence) revert all. Returns ``(action, sequence)``: action "nothing", "commit"
    or "revert". Raises the unit's error if one is unreachable (nothing is
    decided then). ``seen``, if given, receives the highest sequence any
    unit carries, settled or recorded (a new CG must use a higher one).
    """
    statuses = [s.status(session) for s in sites]
    if seen is not None:
        seen.append(max([0] + [int(q) for st in statuses for (_, _, q) in st["fcs"]]
                        + [int(q) for st in statuses for q in st["settled"]]
                        + [int(q) for st in statuses for q in st["decisions"]]))
    pending = {seq for st in statuses for (_, rev, seq) in st["fcs"] if rev}
    if not pending:
        return "nothing", max(seq for st in statuses for (_, _, seq) in st["fcs"])
    n = max(pending)
    committed = any((not rev and seq == n) for st in statuses for (_, rev, seq) in st["fcs"]) \
        or any(st["settled"].get(n) == "commit" for st in statuses)
    reverted = any(st["settled"].get(n) == "revert" for st in statuses)
    decided = any(st["decisions"].get(n) == "commit" for st in statuses)
    # a unit that carried out either outcome fixes it (the session sends one
    # decision per sequence); otherwise the recorded decision, else revert
    action = "commit" if committed or (decided and not reverted) else "revert"
    if journal is not None:
        journal(n, action)
    calls = [s.finish(session, n, action) for s in sites]
    errors = []
    for s, c in zip(sites, calls):
        try:
            got = c.result()
            if got != action:
                errors.append(f"{s.name} holds {got} for CG {n}, expected {action}")
        except FastFCError as e:
            errors.append(f"{s.name}: {type(e).__name__}: {e}")
    if errors:
        raise StateError(f"CG {n} of {session!r} not resolved: " + "; ".join(errors))
    return action, n


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


class SiteGlobalMirror(GlobalMirror):
    """A :class:`GlobalMirror` whose B and C volumes are on secondary sites
    (made by ``GlobalMirror(...)`` when the B volumes are
    :class:`~fastfc.storage.site.SiteVolume` proxies). Same parameters,
    results and states; ``link`` must be None (each unit is its own link).
    ``journal``, if given, receives ``cg_decision(name, sequence,
    decision)``; by default the first unit records the decision.
    """

    def __init__(self, triplets: Sequence[tuple[Any, Any, Any]], *,
                 link: Any = None, cg_interval: float = 0.0,
                 max_coordination_time: float = 0.05, max_drain_time: float = 0,
                 decide: str = "after_all",
                 on_coordinate: Callable[[int], None] | None = None,
                 on_result: Callable[[CGResult], None] | None = None,
                 journal: Any = None, name: str = "gm", initial_copy: bool = True,
                 _parts: list | None = None) -> None:
        check_name("session", name)
        if link is not None:
            raise ValueError("a session over secondary sites picks its links itself: "
                             "pass link=None")
        if decide not in ("after_all", "after_each"):
            raise ValueError(f"decide must be 'after_all' or 'after_each', got {decide!r}")
        cg_interval = check_real("cg_interval", cg_interval)
        max_drain_time = check_real("max_drain_time", max_drain_time)
        max_coordination_time = check_real("max_coordination_time", max_coordination_time,
                                           positive=True)
        for t in triplets:
            if len(t) != 3 or not isinstance(t[0], Volume) or not isinstance(t[1], SiteVolume) \
                    or not isinstance(t[2], SiteVolume):
                raise TypeError("with remote volumes every triplet must be (local Volume, "
                                "remote B, remote C)")
        if len({id(t[0]) for t in triplets}) != len(triplets) or \
                len({(t[1].site().key, v.name) for t in triplets for v in t[1:]}) != 2 * len(triplets):
            raise ValueError("every volume may appear in a session only once")
        self.name = name
        self.cg_interval = float(cg_interval)
        self.max_coordination_time = float(max_coordination_time)
        self.max_drain_time = float(max_drain_time)
        self.decide = decide
        self.on_coordinate = on_coordinate
        self.on_result = on_result
        self.journal = journal
        self.stats = GMStats()
        self.state = GMState.IDLE
        self.fatal_reason: str | None = None
        self.history: collections.deque[CGResult] = collections.deque(maxlen=100000)
        self._drain_failures = 0
        self._committed_once = False
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._store = Store()           # nothing recorded on the primary side
        self._ordered = False
        self._need_reconcile = False
        self._coordinated: dict[int, float | None] = {}
        # the units, in the order their triplets first appear
        sites: dict[Any, SecondarySite] = {}
        for _, b, c in triplets:
            s = b.site()
            if c.site().key != s.key:
                raise ValueError(f"{b.name} and {c.name} must be in one unit")
            sites.setdefault(s.key, s)
        self.sites = list(sites.values())
        self.link = _SitesLink(self.sites)   # type: ignore[assignment]
        for a, _, _ in triplets:
            a.store.check_writable()
        seqs: dict[tuple[Any, str], int] = {}
        for s in self.sites:
            mine = [(b.name, c.name) for _, b, c in triplets if b.site().key == s.key]
            for (b, c), q in zip(mine, s.setup(name, mine)):
                seqs[(s.key, c)] = q
        self.triplets = []
        self._site_pairs: list[SitePair] = []   # the triplets' pairs, typed as what they are
        self._pairs = self._site_pairs          # type: ignore[assignment]  # (the base's name)
        try:
            for a, b, c in triplets:
                pair = SitePair(a, b, b.site(), initial_copy=initial_copy)
                self._site_pairs.append(pair)
                self.triplets.append(Triplet(a, b, c, pair, None))   # type: ignore[arg-type]
        except Exception:
            self._teardown()
            raise
        self.groups = [SiteGroup(s, [p for p in self._site_pairs if p.site.key == s.key],   # type: ignore[misc]
                                 [t for t, p in zip(self.triplets, self._site_pairs)
                                  if p.site.key == s.key])
                       for s in self.sites]
        self._primaries = sorted((t.a for t in self.triplets), key=lambda v: v.vid)
        top = max(seqs.values())
        self._next_sequence = top + 1
        self.stats.sequence = top
        self._committed_once = top > 0
        self._need_reconcile = True     # a unit may hold an in-doubt CG

    # -- what differs from a local session ---------------------------------------
    def _record(self, seq: int, decision: str) -> None:
        if self.journal is not None:
            self.journal.cg_decision(self.name, seq, decision)
        else:
            self.sites[0].record_decision(self.name, seq, decision)

    def reconcile(self) -> str:
        """Settle a CG a failure left in doubt on some unit (every unit
        must answer), by the seed's rule; returns the action taken."""
        seen: list[int] = []
        action, n = reconcile_sites(self.sites, self.name, self._record, seen=seen)
        if action == "commit" and n > self.stats.sequence:
            self.stats.sequence = n
            self.stats.last_cg_time = self._coordinated.get(n, self.stats.last_cg_time)
        # past every sequence a unit settled or recorded: a unit refuses to
        # prepare one it settled (a session restarted after a revert)
        self._next_sequence = max(self._next_sequence, n + 1, seen[0] + 1)
        self._need_reconcile = False
        return action

    def _attempt(self) -> CGResult:
        seq = self._next_sequence
        self._require_not_recovered()
        if self.state is GMState.FATAL:
            return self._count(CGResult(seq, False, Cause.FATAL, self.fatal_reason or ""))
        if self._need_reconcile:
            try:
                self.reconcile()
            except FastFCError as e:
                return self._count(CGResult(seq, False, Cause.LINK_DOWN,
                                            f"reconciling the units: {type(e).__name__}: {e}"))
            seq = self._next_sequence
        self._next_sequence += 1
        res = CGResult(seq, False)
        if not self._coordinate(res):
            return self._count(res)
        self._coordinated[seq] = res.coordinated_at
        if len(self._coordinated) > 64:
            self._coordinated.pop(min(self._coordinated))
        t = time.perf_counter()
        limit = self._drain_limit()
        ok = False
        try:
            res.bytes_drained = self._drain_sites(limit)
            ok = True
        except DrainAborted as e:
            res.cause, res.detail = Cause.DRAIN_TIMEOUT, str(e)
        except (FastFCError, VolumeClosedError) as e:
            res.cause = Cause.LINK_DOWN if not self.link.up else Cause.DRAIN_ERROR
            res.detail = f"{type(e).__name__}: {e}"
        finally:
            res.drain_time = time.perf_counter() - t
            for pair in self._site_pairs:
                pair._cg_end(ok)
        if not ok:
            if res.cause is Cause.DRAIN_TIMEOUT:
                self._drain_failures += 1
            # a unit that refused (or restarted) may hold a CG in doubt that
            # it lost the outcome of: read every unit before the next CG
            self._need_reconcile = True
            return self._count(res)
        self._drain_failures = 0
        t = time.perf_counter()
        self._flash_sites(res)
        res.flash_time = time.perf_counter() - t
        return res

    def _drain_sites(self, limit: float | None) -> int:
        """Send every CG track, one batch per unit per call, the units in
        parallel, at most MAX_INFLIGHT_BYTES unanswered. Raises the first
        failure (DrainAborted past ``limit``)."""
        start = time.perf_counter()
        inflight: collections.deque[tuple[Pending, int]] = collections.deque()
        in_bytes = 0
        total = 0
        groups: list[SiteGroup] = self.groups   # type: ignore[assignment]
        left = {g.site.key: list(g.pairs) for g in groups}
        for g in groups:
            for p in g.pairs:
                faults.hit("drain", p.primary)
        try:
            for g in groups:
                for p in g.pairs:
                    p._begin_drain()
            while any(left.values()):
                for g in groups:
                    s = g.site
                    pairs = left[s.key]
                    if not pairs:
                        continue
                    updates: list[Update] = []
                    pos = 0
                    while pairs:
                        p = pairs[0]
                        assert p.cg is not None
                        n, done = p.gather(p.cg, updates, max(BATCH_BYTES - pos,
                                                              p.primary.track_size if not pos else 0),
                                           None, side=True)
                        pos += n
                        if done:
                            pairs.pop(0)
                        elif not n:
                            break       # this call is full
                    if updates:
                        inflight.append((s.apply(updates), pos))
                        in_bytes += pos
                        total += pos
                    while in_bytes > MAX_INFLIGHT_BYTES:
                        call, n = inflight.popleft()
                        call.result()
                        in_bytes -= n
                    if limit is not None and time.perf_counter() - start > limit:
                        raise DrainAborted("drain time limit passed")
            while inflight:
                call, n = inflight.popleft()
                call.result()
        finally:
            for call, _ in inflight:    # answered or failed: nothing left running
                try:
                    call.result()
                except FastFCError:
                    pass
        return total

    def _flash_sites(self, res: CGResult) -> None:
        seq, name = res.sequence, self.name
        calls = [(s, s.prepare(name, seq)) for s in self.sites]
        failure = None
        for s, c in calls:
            try:
                c.result()
            except FastFCError as e:
                failure = failure or f"prepare on {s.name}: {type(e).__name__}: {e}"
        decision = "commit" if failure is None else "revert"
        try:
            self._record(seq, decision)
        except FastFCError as e:
            if decision == "commit":
                failure = f"recording the decision: {type(e).__name__}: {e}"
                decision = "revert"     # nothing commits without a recorded decision
        try:
            faults.hit("decision")
        except FastFCError:
            pass
        finals = [(s, s.finish(name, seq, decision)) for s in self.sites]
        errors = []
        for s, c in finals:
            try:
                got = c.result()
                if got != decision:
                    errors.append(f"{s.name} holds {got} for CG {seq}")
            except FastFCError as e:
                errors.append(f"{decision} on {s.name}: {type(e).__name__}: {e}")
        if not errors:
            if failure is not None:
                # a refused prepare may be a unit in doubt about an earlier
                # CG (one that lost a commit's transaction): reconcile first
                self._need_reconcile = True
                res.cause, res.detail = Cause.PREPARE_FAILED, failure
            else:
                res.committed = True
            self._count(res)
            return
        self._need_reconcile = True
        detail = "; ".join(errors)
        if decision == "commit":
            # committed as decided; the unreachable units commit when they
            # answer again (clear_fatal, or the next attempt's reconcile)
            self.state = GMState.FATAL
            self.fatal_reason = detail + " -> to be resolved by commit"
            res.cause, res.committed = Cause.COMMIT_FAILED, True
        else:
            res.cause = Cause.PREPARE_FAILED if failure else Cause.REVERT_FAILED
        res.detail = (failure + "; " if failure else "") + detail
        self._count(res)

    # -- operator actions, reads --------------------------------------------------
    def clear_fatal(self) -> str:
        """Reconcile every unit (they must all answer) and allow CGs again."""
        with self._lock:
            try:
                self.reconcile()
            except FastFCError:
                return self.state.value
            self.fatal_reason = None
            self.state = GMState.RUNNING if self._thread is not None else GMState.IDLE
            return self.state.value

    @property
    def c_sequences(self) -> list[int]:
        """The CG sequence each C volume carries (one call per unit; raises
        if a unit does not answer)."""
        got: dict[tuple[Any, str], int] = {}
        for s in self.sites:
            for c, _, seq in s.status(self.name)["fcs"]:
                got[(s.key, c)] = seq
        return [got[(p.site.key, t.c.name)] for p, t in zip(self._site_pairs, self.triplets)]

    def _resolve(self) -> str:
        action, _ = reconcile_sites(self.sites, self.name, self._record)
        return action

    def _require_writable(self) -> None:
        for t in self.triplets:
            t.a.store.check_writable()
            if t.a.closed:
                raise VolumeClosedError(f"{t.a!r} is closed")

    def recover(self) -> int:
        """At the remote site: stop, settle every unit, and fast-reverse-
        restore each B from its C (B then takes host writes). Returns the CG
        sequence the B volumes hold."""
        self.stop()
        with self._lock:
            seq = recover_sites(self.sites, self.name)
            for t in self.triplets:
                t.pair.failed_over = True
            return seq

    def _teardown(self) -> None:
        for p in self._site_pairs:
            p.remove()
        self.triplets = []
        self._site_pairs = []
        self._pairs = self._site_pairs          # type: ignore[assignment]

    def close(self, *, discard: bool = False,
              on_copy: Callable[[int, int], None] | None = None) -> None:
        """Stop and drop the pairs from the A volumes. The units keep their
        B->C relationships (and the C volumes their last CG)."""
        self.stop()
        with self._lock:
            self._teardown()

    def tracks_c_needs(self) -> dict[str, int]:
        raise StateError("tracks_c_needs is not available over secondary sites")
