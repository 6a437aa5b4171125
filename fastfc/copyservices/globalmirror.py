"""Global Mirror: consistency groups of many volumes on a third set of volumes.

A session holds triplets (A, B, C): A->B Global Copy, B->C FlashCopy with
NOCOPY, change recording and ``inhibit_target_write``. Each consistency
group (CG) is formed in three phases:

1. **Coordinate.** Take every A's lock in volume-id order (host writes to all
   A are held at one instant, for at most ``max_coordination_time``), swap
   each pair's out-of-sync bitmap for an empty one by reference (the old one
   is the CG's tracks, the new one records later writes), call
   ``on_coordinate(sequence)``, release.
2. **Drain.** Send every CG track to B. A host write to a CG track not yet
   sent first saves the CG version in the pair's side file (a collision).
3. **FlashCopy**, the two-phase protocol of the founding patent: *prepare*
   every B->C relationship with a revertible resync (which write-inhibits B,
   so no PPRC update lands mid-protocol); if every prepare succeeded,
   *commit* all (releasing the inhibits), else *revert* all, so the C
   volumes keep the prior CG whole.

The A volumes are in this process. The session drives the B and C volumes
through a small interface, one :class:`~fastfc.copyservices.secondary.
Secondary` per unit holding them: in this process (memory or a storage
unit, :mod:`fastfc.copyservices.local_secondary`) or through calls (a
remote unit, :mod:`fastfc.copyservices.sitemirror`), chosen by where the
B and C volumes are. Drain and FlashCopy calls go to every unit at once.

A failure inside commit or revert is resolved by the seed's rule
(:func:`fastfc.copyservices.resolution.resolve`, over every unit:
:func:`~fastfc.copyservices.secondary.resolve_groups`); the session then
turns FATAL until the operator calls :meth:`GlobalMirror.clear_fatal`. A
unit that did not answer is reconciled by the same rule before the next CG.

The promise: after every attempt, the logical images of all C volumes equal
the A images at one coordination instant (the newest committed), and all C
carry that CG's sequence number.
"""

from __future__ import annotations

import collections
import enum
import operator
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import numpy as np

from fastfc import _core, faults
from fastfc._numbers import check_real
from fastfc.copyservices import local_secondary, sitemirror
from fastfc.copyservices.groups import SecondaryGroup, Triplet, copy_to_c
from fastfc.copyservices.point_schedule import (MemoryKeeper, PointSchedule, ScheduledPoints,
                                                point_name, session_points)
from fastfc.copyservices.pprc import PPRCPair
from fastfc.copyservices.local_secondary import RETRIES
from fastfc.copyservices.secondary import Resolution, Secondary, resolve_groups
from fastfc.errors import DrainAborted, FastFCError, StateError, VolumeClosedError
from fastfc.names import check_name
from fastfc.storage.link import Link, LocalLink
from fastfc.storage.site import Pending, SiteVolume
from fastfc.storage.volume import Volume, locked

__all__ = ["Cause", "CGResult", "GlobalMirror", "GMState", "GMStats", "MAX_DRAIN_FAILURES",
           "RETRIES", "Triplet", "copy_to_c"]

_failed_over = operator.attrgetter("failed_over")

MAX_DRAIN_FAILURES = 5     # consecutive drain-time failures before the limit is set aside
#: seconds a CG attempt waits for its session's ``turn`` before it goes on without it
TURN_WAIT = 0.1


class GMState(enum.Enum):
    IDLE = "idle"          # no loop running (single attempts allowed)
    RUNNING = "running"    # the continuous loop forms CGs
    FATAL = "fatal"        # a commit/revert failed: no CG until clear_fatal()


class Cause(str, enum.Enum):
    """Why a CG attempt failed."""

    COORDINATION_TIMEOUT = "coordination_timeout"
    DRAIN_TIMEOUT = "drain_timeout"
    LINK_DOWN = "link_down"
    DRAIN_ERROR = "drain_error"
    PREPARE_FAILED = "prepare_failed"
    COMMIT_FAILED = "commit_failed"
    REVERT_FAILED = "revert_failed"
    FATAL = "fatal"


@dataclass
class CGResult:
    """The outcome of one consistency-group attempt."""

    sequence: int
    committed: bool
    cause: Cause | None = None
    detail: str = ""
    coordinated_at: float | None = None     # time.time() of the coordination instant
    coordination_time: float = 0.0          # seconds host writes were held
    drain_time: float = 0.0
    flash_time: float = 0.0
    bytes_drained: int = 0

    def __bool__(self) -> bool:
        return self.committed


def _percentiles(values) -> dict[str, float]:
    if not values:
        return {"p50": float("nan"), "p99": float("nan"), "max": float("nan")}
    a = np.asarray(values, dtype=float)
    return {"p50": float(np.percentile(a, 50)), "p99": float(np.percentile(a, 99)),
            "max": float(a.max())}


@dataclass
class GMStats:
    """What ``showgmir`` shows: CG sequence, counts, phase times, RPO.

    The counters (:meth:`to_record`: ``sequence``, ``attempts``,
    ``successes``, ``failures``, ``commit_failures_resolved``,
    ``last_cg_time``, ``bytes_drained``, ``last_failure``) of a session in a
    storage unit are recorded after every attempt and restored when the
    unit reopens the session: they count every attempt ever made. Phase
    times and RPO samples are this process's only.

    ``last_failure``: the newest attempt that failed, or whose commit step
    failed (resolved by commit): ``{"time": time.time() when it was
    counted, "sequence", "cause": a Cause value, "detail"}``; None if none
    has."""

    sequence: int = 0                        # CG sequence number of the newest committed CG
    attempts: int = 0
    successes: int = 0                       # committed CGs (commit failures resolved by commit too)
    failures: collections.Counter = field(default_factory=collections.Counter)
    # committed CGs whose commit step failed on some volume and that the
    # resolution completed by committing the rest: successes, not failures
    commit_failures_resolved: int = 0
    last_cg_time: float | None = None        # time.time() of that CG's coordination instant
    bytes_drained: int = 0
    last_failure: dict | None = None
    coordination_times: collections.deque = field(default_factory=lambda: collections.deque(maxlen=10000))
    drain_times: collections.deque = field(default_factory=lambda: collections.deque(maxlen=10000))
    flash_times: collections.deque = field(default_factory=lambda: collections.deque(maxlen=10000))
    rpo_samples: collections.deque = field(default_factory=lambda: collections.deque(maxlen=10000))
    started_at: float = field(default_factory=time.time)

    @property
    def rpo(self) -> float | None:
        """Seconds between now and the coordination instant of the newest
        committed CG (None before the first)."""
        if self.last_cg_time is None:
            return None
        return time.time() - self.last_cg_time

    def phase_percentiles(self) -> dict[str, dict[str, float]]:
        return {"coordination": _percentiles(self.coordination_times),
                "drain": _percentiles(self.drain_times),
                "flashcopy": _percentiles(self.flash_times),
                "rpo": _percentiles(self.rpo_samples)}

    def to_record(self) -> dict:
        """The counters, as a store records them."""
        return {"sequence": self.sequence, "attempts": self.attempts,
                "successes": self.successes, "failures": dict(self.failures),
                "commit_failures_resolved": self.commit_failures_resolved,
                "last_cg_time": self.last_cg_time, "bytes_drained": self.bytes_drained,
                "last_failure": self.last_failure}

    def restore(self, record: dict) -> None:
        """Take the counters of ``record`` (:meth:`to_record`; one from
        before ``last_failure`` was kept has none)."""
        self.sequence = record["sequence"]
        self.attempts = record["attempts"]
        self.successes = record["successes"]
        self.failures = collections.Counter(record["failures"])
        self.commit_failures_resolved = record["commit_failures_resolved"]
        self.last_cg_time = record["last_cg_time"]
        self.bytes_drained = record["bytes_drained"]
        failure = record.get("last_failure")
        self.last_failure = dict(failure) if failure else None

    def count(self, res: "CGResult") -> None:
        """Count one attempt's result in the counters."""
        self.attempts += 1
        self.bytes_drained += res.bytes_drained
        if res.committed:
            self.successes += 1
            self.sequence = res.sequence
            self.last_cg_time = res.coordinated_at
        if res.committed and res.cause is Cause.COMMIT_FAILED:
            self.commit_failures_resolved += 1     # a committed CG: not a failure
        elif res.cause is not None:
            self.failures[res.cause.value] += 1
        if res.cause is not None:
            self.last_failure = {"time": time.time(), "sequence": res.sequence,
                                 "cause": res.cause.value, "detail": res.detail}

    def rpo_percentiles(self) -> dict[str, float] | None:
        """p50, p99 and max of this process's RPO samples (one after each
        attempt: seconds from the newest committed CG's coordination to the
        attempt's end); None before the first sample."""
        samples = list(self.rpo_samples)     # (the loop's thread appends meanwhile)
        return _percentiles(samples) if samples else None

    def as_dict(self) -> dict:
        """The counters, the RPO and the phase-time percentiles."""
        return {**self.to_record(), "rpo": self.rpo, **{
            f"{k}_{q}": v for k, d in self.phase_percentiles().items() for q, v in d.items()}}



class GlobalMirror:
    """A Global Mirror session over ``(A, B, C)`` triplets [mkgmir].

    Parameters
    ----------
    triplets : sequence of (Volume, Volume, Volume)
        Each A is mirrored to its B by Global Copy, each B FlashCopied to its
        C. All nine roles are distinct volumes. The A volumes are in this
        process; B and C are too (memory or a storage unit), or all on
        secondary sites (:class:`~fastfc.storage.site.SiteVolume` proxies of
        remote units, each B with its C on one unit).
    link : Link, optional
        The transport for every pair (one new unlimited LocalLink if None).
        Must be None over secondary sites (each unit is its own link).
    cg_interval : float
        Seconds between CGs in the continuous loop (0: form continuously).
        Between CGs the pairs drain as Global Copy.
    max_coordination_time : float
        Bound on the hold of host writes at coordination (default 50 ms).
    max_drain_time : float
        Bound on one drain; 0 means the larger of 4 minutes and twice
        ``cg_interval``. The first CG ignores it, and after 5 consecutive
        drain-time failures it is set aside for one CG.
    decide : {"after_all", "after_each"}
        Decide after every prepare was tried (claim 8) or at the first
        failed prepare (claim 7).
    initial_copy : bool
        Send every track in the first CG (default). ``False`` asserts that
        each B already holds its A's data.
    adopt : bool
        Take over the Global Copy pair A->B of each triplet whose A is
        already a primary (the DS8000 way: pairs made and synced first,
        then the session), instead of refusing it: its out-of-sync bitmap
        carries on, so the first CG sends only what the pair had not sent
        yet. Refused, before anything changes: a pair from A to another
        volume, a Metro Mirror pair, a suspended or failed-over pair, a
        pair in another session
        (:func:`~fastfc.copyservices.local_secondary.adoptable`). Closing
        the session leaves an adopted pair (a Global Copy pair again).
        Volumes in this process only (not over secondary sites).
    resume : bool
        Over secondary sites, with every A volume in one storage unit (where
        the session is recorded): continue the session recorded there under
        ``name`` (a new primary process after the old one died; the
        triplets must be the recorded ones, the units must serve it with
        the same pairs). Its counters and CG sequence go on, and instead of
        an initial copy the first CG sends only the grains where A and B
        differ (found by digests, each side reading its own). Without it, a
        session of that name recorded there is refused.
        :func:`fastfc.remote.attach` builds the triplets from the record.
    on_coordinate : callable, optional
        ``on_coordinate(sequence)``, called while host writes are held on
        every A (its run time is not counted in the coordination bound).
    on_result : callable, optional
        ``on_result(result)``, called with each attempt's :class:`CGResult`
        once it is counted in :attr:`stats` (from the thread that made the
        attempt). In a storage unit the counters are recorded already.
    name : str
        The session's name (default "gm"): 1-64 letters, digits, '_', '.',
        '-', starting with a letter or digit (:mod:`fastfc.names`); it
        names the session in its storage unit and in files.
    journal : object, optional
        Receives ``cg_decision(session_name, sequence, decision)`` before any
        relationship is committed or reverted. Defaults to the metadata store
        of the unit holding the B and C volumes, when they are on one in this
        process, or to the first secondary site.
    points : PointSchedule, optional
        Take recovery points of every C volume at one instant after a CG
        commits, on this schedule (every N CGs or T seconds), and expire
        them as it says (:mod:`fastfc.copyservices.point_schedule`); None:
        none. :meth:`set_point_schedule` changes it, :meth:`take_points`
        takes points at once. C volumes in this process only.

    The session is recorded by the store of its B volumes (handed to them by
    their storage unit), which tells the unit of it; so are its counters
    (:attr:`stats`), after every attempt.

    Locking: ``_lock`` keeps two attempts (and operator actions) apart; the
    pairs' state is guarded by each A's lock, the relationships' by their
    volumes' locks.
    """

    link: Link      # over secondary sites: whether every unit answers (``up``)

    def __init__(self, triplets: Sequence[tuple[Volume, Volume, Volume]], *,
                 link: Link | None = None, cg_interval: float = 0.0,
                 max_coordination_time: float = 0.05, max_drain_time: float = 0,
                 decide: str = "after_all",
                 on_coordinate: Callable[[int], None] | None = None,
                 on_result: Callable[[CGResult], None] | None = None,
                 journal=None, name: str = "gm", initial_copy: bool = True,
                 adopt: bool = False, resume: bool = False,
                 points: PointSchedule | None = None) -> None:
        check_name("session", name)
        if not triplets:
            raise ValueError("a Global Mirror session needs at least one (A, B, C) triplet")
        if points is not None:
            if not isinstance(points, PointSchedule):
                raise TypeError(f"points must be a PointSchedule, not {type(points).__name__}")
            if any(len(t) == 3 and isinstance(t[2], SiteVolume) for t in triplets):
                raise ValueError("a point schedule takes points of C volumes in this process; "
                                 "over secondary sites take them at the units")
        self._configure(name, cg_interval, max_coordination_time, max_drain_time, decide,
                        on_coordinate, on_result)
        secs: Sequence[Secondary]
        stats = None
        if any(len(t) == 3 and isinstance(t[1], SiteVolume) for t in triplets):
            trips, secs, sites, top, stats = sitemirror.connect(
                triplets, name=name, link=link, initial_copy=initial_copy, resume=resume)
            self.link = sites       # type: ignore[assignment]  # (the loop asks it .up)
        else:
            if resume:
                raise ValueError("resume continues a session over secondary sites (remote "
                                 "B and C volumes); a session in storage units is restored "
                                 "when its unit opens")
            self.link = link if link is not None else LocalLink(name=f"{name}-link")
            trips = local_secondary.connect(triplets, name=name, link=self.link,
                                            initial_copy=initial_copy, adopt=adopt)
            secs, top = local_secondary.secondaries(trips), 0
        self._adopt(trips, secs, journal, top)
        self._set_schedule(points)
        if stats:
            self._restore_stats(stats)
        self._store.add_session(self.to_record(), self,
                                partners=[t.a.store for t in self.triplets])

    def _configure(self, name, cg_interval, max_coordination_time, max_drain_time, decide,
                   on_coordinate, on_result) -> None:
        """Check and take the parameters; the session's empty state."""
        if decide not in ("after_all", "after_each"):
            raise ValueError(f"decide must be 'after_all' or 'after_each', got {decide!r}")
        cg_interval = check_real("cg_interval", cg_interval)
        max_drain_time = check_real("max_drain_time", max_drain_time)
        max_coordination_time = check_real("max_coordination_time", max_coordination_time,
                                           positive=True)
        self.name = name
        self.cg_interval = float(cg_interval)
        self.max_coordination_time = float(max_coordination_time)
        self.max_drain_time = float(max_drain_time)
        self.decide = decide
        self.on_coordinate = on_coordinate
        self.on_result = on_result
        self.stats = GMStats()
        self.state = GMState.IDLE
        self.fatal_reason: str | None = None
        self.history: collections.deque[CGResult] = collections.deque(maxlen=100000)
        self._next_sequence = 1
        self._drain_failures = 0
        self._committed_once = False
        self._lock = threading.Lock()     # one attempt at a time
        #: a lock each CG attempt holds, shared with whatever should not
        #: compete with the attempts for the CPU and the GIL (a server's
        #: request threads take it around their work); None: none
        self.turn: Any = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        # (triplets, their local volumes, their stores): what _require_writable checks
        self._volumes_cache: tuple | None = None
        # Volume.closes when _require_writable last found none of them closed
        self._closes_seen = -1
        self._volumes_cache_seen: tuple | None = None
        # coordination instants of recent CGs (a CG a reconciliation commits)
        self._coordinated: dict[int, float | None] = {}
        #: who keeps the scheduled points (take, expire): a storage unit
        #: holding the C volumes sets its durable one; None: in memory
        self.point_keeper: Any = None
        self._points: ScheduledPoints | None = None
        self._memory_keeper: MemoryKeeper | None = None

    def _adopt(self, triplets: list[Triplet], secondaries: Sequence[Secondary], journal,
               top: int) -> None:
        """Take the triplets and their secondaries; the CG sequence goes on
        from ``top``, the newest one a C carries."""
        self.triplets: list[Triplet] = list(triplets)
        self._secondaries = list(secondaries)
        self._pairs = [t.pair for t in self.triplets]
        self._primaries = sorted((t.a for t in self.triplets), key=lambda v: v.vid)
        self._store = self._secondaries[0].store
        self.journal = journal if journal is not None else self._secondaries[0].journal
        self._next_sequence = top + 1
        self.stats.sequence = top
        self._committed_once = top > 0
        # a unit reached by calls may hold a CG in doubt: read every unit first
        self._need_reconcile = any(g.reconcile_first for g in secondaries)
        self._sparse_groups()

    def _sparse_groups(self) -> None:
        """Whether a CG visits only the pairs with tracks out of sync (and
        the relationships that changed): every group in this process, in
        memory (:attr:`SecondaryGroup.sparse`). Then ``_where[k]`` is the
        group of the session's triplet ``k`` and its index there."""
        groups = [g.group for g in self._secondaries if isinstance(g.group, SecondaryGroup)]
        self._sparse = (bool(groups) and len(groups) == len(self._secondaries)
                        and all(g.sparse for g in groups))
        self._begun: list[int] = []
        self._where: list[tuple[SecondaryGroup, int]] = []
        self._failovers_seen: int | None = None
        self._gate: _core.WriteGate | None = None
        if self._sparse:
            at = {id(t): (g, k) for g in groups for k, t in enumerate(g.triplets)}
            self._where = [at[id(t)] for t in self.triplets]
            # the primaries pass one gate, which coordination closes in place
            # of taking every primary's lock (and which knows the pairs that
            # may have tracks out of sync): an idle CG is O(1)
            pair_of = {id(t.a): k for k, t in enumerate(self.triplets)}
            gate = _core.WriteGate(self._primaries, [pair_of[id(a)] for a in self._primaries])
            gate.attach()
            self._gate = gate

    @property
    def groups(self) -> list:
        """The triplets by the unit holding their B and C: the
        :class:`~fastfc.copyservices.groups.SecondaryGroup` of each store in
        this process, the :class:`~fastfc.copyservices.sitemirror.SiteGroup`
        of each secondary site."""
        return [g.group for g in self._secondaries]

    # -- records -----------------------------------------------------------------
    def to_record(self) -> dict:
        """What a store records of this session: ``name``, ``cg_interval``,
        ``max_coordination_time``, ``max_drain_time``, ``decide``,
        ``triplets`` (``[a_unit, a, b, c]``: how a row names the A volume's
        unit, its store's ``ref``, and the three volume names), ``stats``
        (:meth:`GMStats.to_record`) and, when the session adopted pairs,
        ``adopted`` (the B volumes of those pairs, which closing it leaves)."""
        record = {"name": self.name, "cg_interval": self.cg_interval,
                  "max_coordination_time": self.max_coordination_time,
                  "max_drain_time": self.max_drain_time, "decide": self.decide,
                  "triplets": [[t.a.store.ref, t.a.name, t.b.name, t.c.name]
                               for t in self.triplets],
                  "stats": self.stats.to_record()}
        adopted = [t.b.name for t in self.triplets if t.adopted]
        if adopted:
            record["adopted"] = adopted
        if self._points is not None:
            record["points"] = self._points.schedule.to_record()
        return record

    @classmethod
    def from_record(cls, record: dict, triplets: Sequence[Triplet], *,
                    link: Link | None = None) -> "GlobalMirror":
        """Rebuild a session from a record (:meth:`to_record`, as a store
        gives it back; ``stats`` may be None) over its restored
        ``triplets`` (pairs and relationships in place, in this process).
        The CG sequence is the newest one every C carries. The session
        keeps the name it was stored under."""
        gm = cls.__new__(cls)
        gm._configure(record["name"], record["cg_interval"], record["max_coordination_time"],
                      record["max_drain_time"], record["decide"], None, None)
        trips = list(triplets)
        gm.link = link if link is not None else LocalLink(name=f"{gm.name}-link")
        adopted = set(record.get("adopted") or ())
        for t in trips:
            t.fc.session = gm.name
            t.adopted = t.b.name in adopted
        gm._adopt(trips, local_secondary.secondaries(trips), None,
                  max(t.fc.sequence for t in trips))
        gm._set_schedule(PointSchedule.from_record(record.get("points")))
        if record.get("stats"):
            gm._restore_stats(record["stats"], max(gm.c_sequences))
        gm.stats.sequence = max(gm.c_sequences)
        return gm

    def _restore_stats(self, stats: dict, top: int | None = None) -> None:
        """Take recorded counters; ``top`` (default: the CG sequence the
        session goes on from) is the newest CG a C carries."""
        top = self.stats.sequence if top is None else top
        self.stats.restore(stats)
        # CGs the C volumes carry beyond the counters were committed by an
        # attempt that a killed process never counted (recovery finished it)
        missed = top - self.stats.sequence
        if missed > 0:
            self.stats.attempts += missed
            self.stats.successes += missed
        self.stats.sequence = max(top, self.stats.sequence)

    # -- one consistency group ---------------------------------------------------
    def form_consistency_group(self) -> CGResult:
        """Make one CG attempt synchronously and return its result.

        With :attr:`turn` set, the attempt holds it (waiting for it at most
        :data:`TURN_WAIT` seconds, then going on without it)."""
        self._require_writable()
        with self._lock:
            turn = self.turn
            took = turn is not None and turn.acquire(timeout=TURN_WAIT)
            try:
                result = self._attempt()
            finally:
                if took:
                    turn.release()
        self._account(result)
        return result

    def _attempt(self) -> CGResult:
        """One attempt; every way out counts it once (:meth:`_count`)."""
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

        # 1. coordinate
        if not self._coordinate(res):
            return self._count(res)
        self._coordinated[seq] = res.coordinated_at
        self._coordinated.pop(seq - 64, None)

        # 2. drain, every unit at once
        t = time.perf_counter()
        limit = self._drain_limit()
        deadline = None if limit is None else (lambda: time.perf_counter() - t > limit)
        time_left = None if limit is None else (lambda: limit - (time.perf_counter() - t))
        ok = False
        try:
            self._hand_begun(self._begun if self._sparse else None)
            if self.decide == "after_all":      # every unit prepares: behind its drain
                for g in self._secondaries:
                    g.prepare_behind_drain(seq)
            res.bytes_drained = self._drain(deadline, time_left)
            ok = True
        except DrainAborted as e:
            res.cause, res.detail = Cause.DRAIN_TIMEOUT, str(e)
        except FastFCError as e:
            res.cause = Cause.LINK_DOWN if not self.link.up else Cause.DRAIN_ERROR
            res.detail = f"{type(e).__name__}: {e}"
        finally:
            res.drain_time = time.perf_counter() - t
            for g in self._secondaries:
                g.end_drain(ok)
        if not ok:
            if res.cause is Cause.DRAIN_TIMEOUT:
                self._drain_failures += 1
            # a unit that refused (or restarted) may hold a CG in doubt that
            # it lost the outcome of: read every unit before the next CG
            self._need_reconcile = True
            return self._count(res)
        self._drain_failures = 0

        # 3. FlashCopy: prepare all, decide, commit all or revert all (counted
        # there); then the scheduled recovery points of the C volumes, if due
        t = time.perf_counter()
        self._flashcopy_phase(res)
        if res.committed and self._points is not None and self.state is not GMState.FATAL:
            self._points.after_commit(seq, [t.c for t in self.triplets], self._keeper())
        res.flash_time = time.perf_counter() - t
        return res

    def _coordinate(self, res: CGResult) -> bool:
        """Coordination: one C call (:func:`fastfc._core.coordinate_pairs`).
        The ``coordinate`` fault point and ``on_coordinate`` are hooks it
        calls while the writes are held, not a second implementation."""
        pairs = self._pairs
        # (each pair's side file and cg_bytes were emptied when its last CG
        # ended: PPRCPair.cg_end, _core.cg_end_many)
        injected: list[FastFCError] = []

        def fault_point() -> None:
            try:
                faults.hit("coordinate")
            except FastFCError as e:
                injected.append(e)
                raise

        after = None
        if self.on_coordinate is not None:
            on_coordinate, seq = self.on_coordinate, res.sequence
            after = lambda: on_coordinate(seq)
        begun = self._begun if self._sparse else None
        try:
            status, seconds = _core.coordinate_pairs(self._primaries, pairs,
                                                     self.max_coordination_time,
                                                     fault_point, after, begun,
                                                     self._gate if self._sparse else None)
        except FastFCError as e:
            if not injected or e is not injected[0]:
                raise
            res.cause, res.detail = Cause.COORDINATION_TIMEOUT, str(e)   # injected
            return False
        res.coordination_time = seconds
        if status != 1:          # the writes were held (too long, if 2)
            res.coordinated_at = time.time()
        if status == 0:
            return True
        res.cause = Cause.COORDINATION_TIMEOUT
        if status == 1:
            res.detail = (f"could not hold writes on every primary within "
                          f"{self.max_coordination_time * 1e3:.1f} ms")
        else:
            res.detail = (f"held writes {seconds * 1e3:.1f} ms > "
                          f"{self.max_coordination_time * 1e3:.1f} ms")
        return False

    def _hand_begun(self, begun: list[int] | None) -> None:
        """Tell each group the pairs on which the CG began (sparse)."""
        if begun is None:
            return
        groups = [g.group for g in self._secondaries]
        if len(groups) == 1:            # (its triplets are the session's, in order)
            groups[0].begin(begun)
            return
        per: dict[int, list[int]] = {id(g): [] for g in groups}
        where = self._where
        for k in begun:
            g, j = where[k]
            per[id(g)].append(j)
        for g in groups:
            g.begin(per[id(g)])

    def _drain_limit(self) -> float | None:
        if not self._committed_once or self._drain_failures >= MAX_DRAIN_FAILURES:
            return None
        if self.max_drain_time == 0:
            return max(240.0, 2 * self.cg_interval)
        return self.max_drain_time

    def _drain(self, deadline, time_left) -> int:
        """Send every CG track: the units' calls interleaved (one batch of
        each unit in turn), at most ``inflight_bytes`` unanswered, every
        call answered before this returns or raises. Returns the bytes;
        raises the first failure (DrainAborted past the deadline)."""
        secs = self._secondaries
        window = min([g.inflight_bytes for g in secs])
        inflight: collections.deque[tuple[Pending, int]] = collections.deque()
        in_bytes = total = 0
        try:
            sending = [iter(g.drain(deadline, time_left)) for g in secs]
            while sending:
                going = []
                for calls in sending:       # one call of each unit in turn
                    for got in calls:
                        inflight.append(got)
                        in_bytes += got[1]
                        total += got[1]
                        while in_bytes > window:
                            call, n = inflight.popleft()
                            call.result()
                            in_bytes -= n
                        going.append(calls)
                        break
                sending = going
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

    def _flashcopy_phase(self, res: CGResult) -> None:
        seq = res.sequence
        secs = self._secondaries
        failure = None
        after_each = self.decide == "after_each"
        # On a storage unit in this process the prepares and the decision
        # record share one durable commit, and the commits (or reverts)
        # another that needs no fsync: a crash before the first leaves
        # nothing prepared; after it, recovery carries out the recorded
        # decision, whether or not the second reached the disk. One fsync
        # per CG, whatever its size. The session's counters are one more row
        # of the second commit. (Over secondary sites the store records
        # nothing: each unit keeps its own, keyed by the sequence.)
        asked: list[Secondary] = []
        with self._store.transaction():
            calls = []
            for g in secs:      # after_each: one unit at a time, up to the first failure
                asked.append(g)
                calls.append(g.prepare(seq, after_each))
                if after_each:
                    failure = self._prepare_failed(asked[-1:], calls)
                    if failure is not None:
                        break
            failure = self._prepare_failed(asked, calls) or failure
            decision = "commit" if failure is None else "revert"
            try:
                self._record(seq, decision)
            except FastFCError as e:
                # nothing commits without a recorded decision; a revert
                # needs none (without one, every reader of the units reverts)
                if decision == "commit":
                    failure = f"recording the decision: {type(e).__name__}: {e}"
                    decision = "revert"
        try:
            faults.hit("decision")   # crash tests stop the world here
        except FastFCError:
            pass                     # the decision stands; carry it out
        failed: list[str] = []       # relationships that refused their step
        unanswered: list[str] = []   # units that did not carry it out
        with self._store.transaction(sync=False):
            calls = [g.finish(seq, decision) for g in asked]
            for g, call in zip(asked, calls):
                try:
                    failed += call.result()
                except FastFCError as e:
                    unanswered.append(f"{decision} on {g.name}: {type(e).__name__}: {e}")
            if not failed and not unanswered:
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
        if unanswered:
            # in doubt on a unit that did not answer: the recorded decision
            # stands, and the unit carries it out when every unit answers again
            # (the next attempt's reconciliation, or clear_fatal)
            detail = "; ".join(failed + unanswered)
            if decision == "commit":
                self.state = GMState.FATAL
                self.fatal_reason = detail + " -> to be resolved by commit"
                res.cause, res.committed = Cause.COMMIT_FAILED, True
            else:
                res.cause = Cause.PREPARE_FAILED if failure else Cause.REVERT_FAILED
            res.detail = (failure + "; " if failure else "") + detail
        else:
            # relationships here refused their step: resolve at once (with
            # retries); FATAL until the operator clears it
            outcome = self._resolve().action
            self.state = GMState.FATAL
            self.fatal_reason = "; ".join(failed) + f" -> resolved by {outcome}"
            res.cause = Cause.COMMIT_FAILED if decision == "commit" else Cause.REVERT_FAILED
            res.detail = self.fatal_reason
            res.committed = outcome == "commit"
        self._count(res)

    @staticmethod
    def _prepare_failed(asked: list[Secondary], calls: list[Pending]) -> str | None:
        """What the prepare calls say failed (the last failure; None: every
        one prepared). The calls are answered and dropped."""
        failure = None
        for g, call in zip(asked, calls):
            try:
                failure = call.result() or failure
            except FastFCError as e:
                failure = f"prepare on {g.name}: {type(e).__name__}: {e}"
        calls.clear()
        return failure

    def _record(self, seq: int, decision: str) -> None:
        if self.journal is not None:
            self.journal.cg_decision(self.name, seq, decision)

    # -- resolution --------------------------------------------------------------
    def _resolve(self) -> Resolution:
        """End every C on one CG after a failure inside commit or revert, by
        the seed's rule over every unit
        (:func:`~fastfc.copyservices.secondary.resolve_groups`), the action
        recorded before anything is settled. Raises if a unit does not
        answer (nothing is decided then); what did not settle is in the
        result's ``errors`` (the session stays FATAL).

        Groups in this process report no recorded decision, so the rule
        runs with ``decision=None`` there: a commit that failed on every
        relationship (no C holds the new CG) is resolved by reverting, as
        the session always did and its tests assert; the action is recorded
        first, so a unit reopened later finds it and agrees. Units reached
        by calls report the decision the coordinator recorded, and a CG in
        doubt there follows it (some of them may have committed already
        without being able to say so)."""
        return resolve_groups(self._secondaries, self._record)

    def reconcile(self) -> str:
        """Settle a CG a failure left in doubt (every unit must answer), by
        the seed's rule; returns the action taken. Raises
        :class:`~fastfc.errors.StateError` if a unit did not settle."""
        res = self._resolve()
        if res.errors:
            raise StateError(f"CG {res.sequence} of {self.name!r} not resolved: "
                             + "; ".join(res.errors))
        if res.action == "commit" and res.sequence > self.stats.sequence:
            self.stats.sequence = res.sequence
            self.stats.last_cg_time = self._coordinated.get(res.sequence,
                                                            self.stats.last_cg_time)
        # past every sequence a unit settled or recorded: a unit refuses to
        # prepare one it settled (a session restarted after a revert)
        self._next_sequence = max(self._next_sequence, res.sequence + 1, res.top + 1)
        self._need_reconcile = False
        return res.action

    def _count(self, res: CGResult) -> CGResult:
        """Count an attempt in the counters and record them in the store:
        inside the CG's commit transaction when one is open (one statement
        of it), else in a commit of their own that needs no fsync. The
        counters are left as they were if the store refuses."""
        st = self.stats
        store = self._store
        if not store.durable:          # keeps nothing: no record to build
            st.count(res)
        else:
            before = st.to_record()
            st.count(res)
            try:
                store.save_session_stats(self.name, st.to_record())
            except BaseException:
                st.restore(before)
                raise
        if res.committed:
            self._committed_once = True
        return res

    def count_global_copy(self, nbytes: int) -> None:
        """Count ``nbytes`` sent to B as Global Copy outside a CG (a backlog
        the caller drained through the pairs before forming CGs) in
        ``stats.bytes_drained``, and record the counters."""
        if nbytes <= 0:
            return
        self._require_writable()
        with self._lock:
            st = self.stats
            st.bytes_drained += nbytes
            try:
                self._store.save_session_stats(self.name, st.to_record())
            except BaseException:
                st.bytes_drained -= nbytes
                raise

    def _account(self, res: CGResult) -> None:
        """After an attempt (counted already): its phase times, RPO sample
        and history, then ``on_result``."""
        st = self.stats
        if res.coordinated_at is not None:
            st.coordination_times.append(res.coordination_time)
        if res.drain_time:
            st.drain_times.append(res.drain_time)
        if res.flash_time:
            st.flash_times.append(res.flash_time)
        if st.last_cg_time is not None:
            st.rpo_samples.append(time.time() - st.last_cg_time)
        self.history.append(res)
        if self.on_result is not None:
            self.on_result(res)

    # -- operator actions ------------------------------------------------------
    # -- recovery points of the C volumes -------------------------------------------
    @property
    def point_schedule(self) -> PointSchedule | None:
        """The session's :class:`PointSchedule`, or None."""
        return None if self._points is None else self._points.schedule

    @property
    def point_status(self) -> dict | None:
        """The schedule at work: ``schedule``, ``last_cg`` (the CG of the
        last take), ``taken`` and ``expired`` (since this object was made),
        ``error`` (the last failure to take or expire, None after a take
        succeeds); None without a schedule."""
        return None if self._points is None else self._points.status()

    def set_point_schedule(self, schedule: PointSchedule | None) -> None:
        """Take points of the C volumes on ``schedule`` from the next CG on
        (None: stop; the points held stay until they are expired by hand).
        A storage unit's session records it with
        ``StorageUnit.configure_session(points=)`` (chgmir), which calls this."""
        if schedule is not None and not isinstance(schedule, PointSchedule):
            raise TypeError(f"schedule must be a PointSchedule, not {type(schedule).__name__}")
        if schedule is not None and any(isinstance(t.c, SiteVolume) for t in self.triplets):
            raise ValueError("a point schedule takes points of C volumes in this process")
        with self._lock:
            self._set_schedule(schedule)

    def _set_schedule(self, schedule: PointSchedule | None) -> None:
        if schedule is None:
            self._points = None
            return
        if self._points is not None:
            self._points.schedule = schedule
            return
        # (it finds the points the session holds: a reopened unit's)
        self._points = ScheduledPoints(self.name, schedule, [t.c for t in self.triplets])

    def restore_point(self, sequence: int, *, quiesced: bool = False) -> int:
        """Put the session back to CG ``sequence``, from the recovery points
        it holds of every C at that CG: each A is written (through its
        write path) with its C's point image where the two may differ (the
        grains C changed since the point, those B changed since C's last
        CG and those A has out of sync), so the next CG carries that image
        on to every B and C, consistently. The session must be paused (its loop stopped: :meth:`stop`) and the
        caller must say no host writes reach the A volumes
        (``quiesced=True``). Returns the grains written. Every point,
        older or newer, keeps its image (the writes reach C by the session's
        own FlashCopy steps). For an ended session restore each point
        itself (``RecoveryPoint.restore_onto_source`` for C, ``restore``
        onto a free volume)."""
        if quiesced is not True:
            raise StateError(
                f"restoring session {self.name} to CG {sequence} needs its A volumes "
                "quiesced (no host writes): pass quiesced=True to say they are")
        self._require_writable()
        if any(isinstance(t.c, SiteVolume) for t in self.triplets):
            raise ValueError("restore_point restores from C volumes in this process")
        if self._thread is not None:
            raise StateError(f"session {self.name} is running; pause it (stop()) first")
        with self._lock:
            name = point_name(self.name, sequence)
            points = []
            for t in self.triplets:
                found = [p for p in session_points(self.name, t.c) if p.name == name]
                if not found:
                    raise StateError(f"session {self.name} holds no recovery point of "
                                     f"{t.c.name} at CG {sequence}")
                points.append(found[-1])
            written = 0
            for t, p in zip(self.triplets, points):
                written += _restore_onto_primary(p, t)
            return written

    def scheduled_points(self, k: int = 0) -> list:
        """The recovery points the session took (on its schedule or by
        :meth:`take_points`) of triplet ``k``'s C, oldest first."""
        if not self.triplets or isinstance(self.triplets[k].c, SiteVolume):
            return []
        return session_points(self.name, self.triplets[k].c)

    def _keeper(self) -> Any:
        if self.point_keeper is not None:
            return self.point_keeper
        cs = [t.c for t in self.triplets]
        if self._memory_keeper is None or self._memory_keeper.volumes != cs:
            self._memory_keeper = MemoryKeeper(cs)
        return self._memory_keeper

    def take_points(self, *, retain_for: float | None = None) -> list:
        """Take a recovery point of every C volume now, at one instant (on
        demand), named for the CG they hold (``SESSION@cgSEQ``): between
        attempts every C holds the last committed CG. Refused while the C
        volumes are not on one CG. ``retain_for``: seconds (default: the
        schedule's retention, or 0). Returns the points, in triplet order;
        a schedule expires its own points after."""
        self._require_writable()
        if any(isinstance(t.c, SiteVolume) for t in self.triplets):
            raise ValueError("take_points takes points of C volumes in this process")
        with self._lock:
            seqs = set(self.c_sequences)
            if len(seqs) != 1 or any(t.fc.revertible for t in self.triplets):
                raise StateError(f"session {self.name}: the C volumes are not on one CG "
                                 f"(sequences {sorted(seqs)}); resolve the session first")
            seq = seqs.pop()
            if retain_for is None:
                retain_for = 0.0 if self._points is None else self._points.schedule.retain_seconds
            cs = [t.c for t in self.triplets]
            if self._points is not None and retain_for == self._points.schedule.retain_seconds:
                points = self._points.take(seq, cs, self._keeper())    # (one of its groups)
                if not points:
                    raise StateError(f"session {self.name}: {self._points.error}")
                return points
            return self._keeper().take([c.name for c in cs], retain_for=retain_for,
                                       name=point_name(self.name, seq))

    def clear_fatal(self) -> str:
        """Operator action after a FATAL state: finish the resolution (every
        unit must answer; relationships here are retried) and, if every
        relationship is settled, allow CGs again. Returns the state."""
        with self._lock:
            try:
                self.reconcile()
            except FastFCError:
                return self.state.value
            self.fatal_reason = None
            self.state = GMState.RUNNING if self._thread is not None else GMState.IDLE
            return self.state.value

    @property
    def primaries(self) -> list[Volume]:
        """The A volumes, in volume-id order (the order coordination locks them)."""
        return list(self._primaries)

    @property
    def c_sequences(self) -> list[int]:
        """The CG sequence number each C volume carries, in triplet order
        (one call per secondary site; raises if a unit does not answer)."""
        secs = self._secondaries
        if len(secs) == 1:
            return secs[0].c_sequences()
        at = {id(t): i for i, t in enumerate(self.triplets)}
        out = [0] * len(self.triplets)
        for g in secs:
            for t, q in zip(g.triplets, g.c_sequences()):
                out[at[id(t)]] = q
        return out

    # -- the continuous loop -----------------------------------------------------
    def start(self) -> None:
        """Form CGs continuously on a thread until :meth:`stop`."""
        if self._thread is not None:
            raise StateError(f"session {self.name} is already running")
        self._require_writable()
        self._require_not_recovered()
        self._stop.clear()
        if self.state is not GMState.FATAL:
            self.state = GMState.RUNNING
        self._thread = threading.Thread(target=self._loop, daemon=True,
                                        name=f"fastfc-gm-{self.name}")
        self._thread.start()

    def stop(self) -> None:
        """Stop the loop after the attempt in flight."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        self._thread = None
        if self.state is GMState.RUNNING:
            self.state = GMState.IDLE

    def _loop(self) -> None:
        while not self._stop.is_set():
            if self.state is GMState.FATAL:
                self._stop.wait(0.05)
                continue
            try:
                res = self.form_consistency_group()
            except Exception as e:
                # the loop must not die quietly while the session says RUNNING:
                # report it as fatal until the operator acts (clear_fatal)
                self.fatal_reason = f"a CG attempt raised {type(e).__name__}: {e}"
                self.state = GMState.FATAL
                continue
            try:
                if res.cause in (Cause.DRAIN_TIMEOUT, Cause.LINK_DOWN, Cause.DRAIN_ERROR):
                    self._catch_up()
                elif self.cg_interval:
                    self._global_copy_for(self.cg_interval)
                elif not res.committed:
                    self._stop.wait(0.001)
            except FastFCError:
                # Global Copy between CGs failed (a link or a unit went down):
                # the next attempt reports it, with its cause, and counts it
                self._stop.wait(0.01)
            except Exception as e:
                self.fatal_reason = f"Global Copy between CGs raised {type(e).__name__}: {e}"
                self.state = GMState.FATAL

    def _global_copy_for(self, seconds: float) -> None:
        """Between CGs: drain OOS tracks as Global Copy until ``seconds`` pass."""
        end = time.perf_counter() + seconds
        while not self._stop.is_set() and time.perf_counter() < end:
            sent = sum(g.global_copy(4 << 20) for g in self._secondaries)
            if not sent:
                self._stop.wait(min(0.005, max(0.0, end - time.perf_counter())))

    def _catch_up(self) -> None:
        """After a failed drain: stay in Global Copy until the backlog is down
        to a quarter of what it was (or a pass finds nothing to send, or the
        drain limit passes), then let the loop try again."""
        start = time.perf_counter()
        budget = self._drain_limit() or 1.0
        backlog = None
        while not self._stop.is_set() and time.perf_counter() - start < budget:
            if not self.link.up:
                self._stop.wait(0.01)
                continue
            for t in self.triplets:
                if t.pair.suspend_reason is not None and not t.pair.failed_over:
                    t.pair.suspend_reason = None
            left = sum(g.backlog() for g in self._secondaries)
            if backlog is None:
                backlog = left
            if left <= backlog // 4:
                return
            if not sum(g.global_copy(4 << 20) for g in self._secondaries):
                return

    # -- recovery --------------------------------------------------------------
    def _require_writable(self) -> None:
        """Refuse, before anything changes, when the units of the session's
        volumes in this process are closed or read-only, or one of those
        volumes is closed."""
        trips = self.triplets
        cached = self._volumes_cache
        if cached is None or cached[0] is not trips:
            vols = [v for t in trips for v in (t.a, t.b, t.c) if isinstance(v, Volume)]
            stores = list({id(v.store): v.store for v in vols}.values())
            cached = self._volumes_cache = (trips, vols, stores)
        _, vols, stores = cached
        for store in stores:         # in the order of their first volume
            store.check_writable()
        closes = Volume.closes       # (no volume closed since the last look: none is)
        if closes == self._closes_seen and cached is self._volumes_cache_seen:
            return
        k = _core.first_closed(vols)
        if k >= 0:
            raise VolumeClosedError(f"{vols[k]!r} is closed")
        self._closes_seen, self._volumes_cache_seen = closes, cached

    def _require_not_recovered(self) -> None:
        # a CG drain would overwrite host writes at the recovered B volumes
        # (pairs in this process: none failed over since the last look, no look)
        mark = PPRCPair.failovers if self._sparse else None
        if mark is not None and mark == self._failovers_seen:
            return
        if any(map(_failed_over, self._pairs)):
            raise StateError(f"session {self.name} was recovered (its pairs are failed "
                             "over): no consistency group can form")
        self._failovers_seen = mark

    def recover(self) -> int:
        """At the remote site: fail each pair over and fast-reverse-restore
        each C onto its B, so the B volumes hold the newest committed CG,
        ready to become primaries. Returns that CG's sequence number.

        Safe to run again (a retry, after a crash part way): a B restored
        before, which may hold host writes since, is left alone; a B whose
        pair failed over but whose restore did not finish is restored."""
        self._require_writable()
        self.stop()
        with self._lock:
            self._resolve()
            secs = self._secondaries
            statuses = [g.status() for g in secs]
            seqs = {q for st in statuses for (_, _, q) in st.relationships}
            if len(seqs) != 1 or any(rev for st in statuses for (_, rev, _) in st.relationships):
                raise StateError(f"C volumes are not on one CG (sequences {sorted(seqs)}); "
                                 "resolve the session first")
            for g in secs:
                g.restore_b()
            return seqs.pop()

    def close(self, *, discard: bool = False,
              on_copy: Callable[[int, int], None] | None = None) -> None:
        """End the session [rmgmir]: stop, remove the pairs and FlashCopies.

        Every C volume keeps its image of the last committed CG: the tracks
        that it still reads from its B are copied B -> C first (``on_copy(
        copied, total)`` reports the progress in tracks), then each B->C
        relationship is withdrawn without force. That copy is O(data); with
        ``discard=True`` the relationships are withdrawn at once and every C
        that still needed tracks turns invalid (its reads raise
        :class:`~fastfc.errors.InvalidImageError`). Over secondary sites the
        units keep their B->C relationships (and each C its last CG).

        Refused (nothing changes) while a relationship is still revertible
        after the resolution of a failed commit or revert, unless ``discard``.
        """
        if self.triplets:
            self._require_writable()
        self.stop()
        with self._lock:
            secs = self._secondaries
            if any(g.stuck() for g in secs):
                self._resolve()
            if not discard:
                stuck = [c for g in secs for c in g.stuck()]
                if stuck:
                    raise StateError(
                        f"session {self.name}: {', '.join(stuck)} "
                        "still revertible (the C volumes are not on one CG); clear_fatal() "
                        "first, or close(discard=True) to withdraw and invalidate them")
            for g in secs:
                g.close(discard=discard, on_copy=on_copy)
            if self._gate is not None:
                self._gate.detach()
                self._gate = None
            self.triplets = []
            self._secondaries = []
            self._pairs = []
            self._store.drop_session(self.name, self)

    def tracks_c_needs(self) -> dict[str, int]:
        """Per C volume (by name), the tracks it still reads from its B: what
        :meth:`close` copies first, or what ``close(discard=True)`` loses."""
        out: dict[str, int] = {}
        for g in self._secondaries:
            out.update(g.tracks_c_needs())
        return out

    def __enter__(self) -> "GlobalMirror":
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    def __repr__(self) -> str:
        return (f"<GlobalMirror {self.name} {self.state.value} {len(self.triplets)} triplets "
                f"cg={self.stats.sequence} ok={self.stats.successes} "
                f"failed={sum(self.stats.failures.values())}>")


def _restore_onto_primary(point, t: Triplet) -> int:
    """Write ``point``'s image (of ``t``'s C) onto ``t``'s A where they may
    differ: the grains any point from ``point`` on holds (C changed since
    it), those B changed since C's last CG (a CG drained but reverted, say)
    and those A has out of sync (changed since the last drain). Returns the
    grains written."""
    a, fc, pair = t.a, t.fc, t.pair
    chain = point.chain
    with locked([fc.source, fc.target]):
        changed = np.zeros(a.n_grains, dtype=bool)
        for p in chain.points[point.index:]:
            changed[p.saved()] = True
        for bm in (fc.src_changed, fc.tgt_changed):
            if bm is not None:
                changed |= bm.to_bools()
    with locked([a]):
        if pair.oos is not None:
            changed |= pair.oos.to_bools()
    g = a.grain_size
    for start, stop in _core.TrackBitmap.from_bools(changed).runs():
        a.write(start * g, point.read(start * g, (stop - start) * g))
    return int(changed.sum())
