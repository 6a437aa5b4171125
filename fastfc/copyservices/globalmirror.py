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

A failure inside commit or revert is resolved by the rule IBM documents
(:meth:`GlobalMirror._resolve`); the session then turns FATAL until the
operator calls :meth:`GlobalMirror.clear_fatal`.

The promise: after every attempt, the logical images of all C volumes equal
the A images at one coordination instant (the newest committed), and all C
carry that CG's sequence number.
"""

from __future__ import annotations

import collections
import enum
import inspect
import operator
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import numpy as np

from fastfc import _core, faults
from fastfc._numbers import check_real
from fastfc.errors import (AlreadyExistsError, DrainAborted, FastFCError,
                           StateError, VolumeClosedError)
from fastfc.copyservices.flashcopy import FlashCopy
from fastfc.copyservices.groups import Triplet, copy_to_c, secondary_groups
from fastfc.copyservices.pprc import PPRCPair
from fastfc.names import check_name
from fastfc.storage.link import Link, LocalLink
from fastfc.storage.site import SiteVolume
from fastfc.storage.volume import Volume

_failed_over = operator.attrgetter("failed_over")

MAX_DRAIN_FAILURES = 5     # consecutive drain-time failures before the limit is set aside
RETRIES = 3                # attempts at one commit/revert before a volume counts as failed


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
    ``last_cg_time``, ``bytes_drained``) of a session in a storage unit are
    recorded after every attempt and restored when the unit reopens the
    session: they count every attempt ever made. Phase times and RPO samples
    are this process's only."""

    sequence: int = 0                        # CG sequence number of the newest committed CG
    attempts: int = 0
    successes: int = 0                       # committed CGs (commit failures resolved by commit too)
    failures: collections.Counter = field(default_factory=collections.Counter)
    # committed CGs whose commit step failed on some volume and that the
    # resolution completed by committing the rest: successes, not failures
    commit_failures_resolved: int = 0
    last_cg_time: float | None = None        # time.time() of that CG's coordination instant
    bytes_drained: int = 0
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
                "last_cg_time": self.last_cg_time, "bytes_drained": self.bytes_drained}

    def restore(self, record: dict) -> None:
        """Take the counters of ``record`` (:meth:`to_record`)."""
        self.sequence = record["sequence"]
        self.attempts = record["attempts"]
        self.successes = record["successes"]
        self.failures = collections.Counter(record["failures"])
        self.commit_failures_resolved = record["commit_failures_resolved"]
        self.last_cg_time = record["last_cg_time"]
        self.bytes_drained = record["bytes_drained"]

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

    def as_dict(self) -> dict:
        """The counters, the RPO and the phase-time percentiles."""
        return {**self.to_record(), "rpo": self.rpo, **{
            f"{k}_{q}": v for k, d in self.phase_percentiles().items() for q, v in d.items()}}


class _SignatureOfInit:
    """What ``inspect.signature`` shows of a class whose ``__new__`` takes
    ``*args, **kwargs`` (to pick a subclass): the public parameters of its
    ``__init__``, not those of ``__new__``."""

    def __get__(self, obj: object, cls: Any = None) -> inspect.Signature:
        if obj is not None or cls is None:
            raise AttributeError("__signature__")      # an instance is not called
        sig = inspect.signature(cls.__init__)
        return sig.replace(parameters=[p for name, p in sig.parameters.items()
                                       if name != "self" and not name.startswith("_")],
                           return_annotation=inspect.Signature.empty)


class GlobalMirror:
    """A Global Mirror session over ``(A, B, C)`` triplets [mkgmir].

    Parameters
    ----------
    triplets : sequence of (Volume, Volume, Volume)
        Each A is mirrored to its B by Global Copy, each B FlashCopied to its
        C. All nine roles are distinct volumes.
    link : Link, optional
        The transport for every pair (one new unlimited LocalLink if None).
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
        of the unit holding the B and C volumes, when they are on one.

    The session is recorded by the store of its B volumes (handed to them by
    their storage unit), which tells the unit of it; so are its counters
    (:attr:`stats`), after every attempt.
    """

    __signature__ = _SignatureOfInit()

    def __new__(cls, triplets: Sequence = (), *args, **kwargs) -> "GlobalMirror":
        # B and C volumes on secondary sites (remote units): the session that
        # talks to them (fastfc.copyservices.sitemirror), same API
        if cls is GlobalMirror and any(
                len(t) == 3 and isinstance(t[1], SiteVolume) for t in triplets):
            from fastfc.copyservices.sitemirror import SiteGlobalMirror
            return super().__new__(SiteGlobalMirror)
        return super().__new__(cls)

    def __init__(self, triplets: Sequence[tuple[Volume, Volume, Volume]], *,
                 link: Link | None = None, cg_interval: float = 0.0,
                 max_coordination_time: float = 0.05, max_drain_time: float = 0,
                 decide: str = "after_all",
                 on_coordinate: Callable[[int], None] | None = None,
                 on_result: Callable[[CGResult], None] | None = None,
                 journal=None, name: str = "gm", initial_copy: bool = True,
                 _parts: list | None = None) -> None:
        if _parts is None:   # a restored session keeps the name it was stored under
            check_name("session", name)
        if not triplets:
            raise ValueError("a Global Mirror session needs at least one (A, B, C) triplet")
        if decide not in ("after_all", "after_each"):
            raise ValueError(f"decide must be 'after_all' or 'after_each', got {decide!r}")
        cg_interval = check_real("cg_interval", cg_interval)
        max_drain_time = check_real("max_drain_time", max_drain_time)
        max_coordination_time = check_real("max_coordination_time", max_coordination_time,
                                           positive=True)
        vols = [v for t in triplets for v in t]
        if any(not isinstance(v, Volume) for v in vols):
            raise TypeError("every triplet must hold three fastfc.Volume objects")
        if len({id(v) for v in vols}) != len(vols):
            raise ValueError("every volume may appear in a session only once")
        self.name = name
        self.link = link if link is not None else LocalLink(name=f"{name}-link")
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
        self._next_sequence = 1
        self._drain_failures = 0
        self._committed_once = False
        self._lock = threading.Lock()     # one attempt at a time
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.triplets: list[Triplet] = []
        # (triplets, their volumes, their stores): what _require_writable checks
        self._volumes_cache: tuple | None = None
        if _parts is not None:  # restored from a storage unit
            self.triplets = list(_parts)
            for t in self.triplets:
                t.fc.session = name
            self._primaries = sorted((t.a for t in self.triplets), key=lambda v: v.vid)
            self._store = self.triplets[0].b.store
            self._order_drains()
            self.journal = journal if journal is not None else self._store
            top = max(self.c_sequences)
            self._next_sequence = top + 1
            self.stats.sequence = top
            self._committed_once = top > 0
            return
        self._store = triplets[0][1].store
        for v in vols:
            v.store.check_writable()
        if self._store.durable:
            if any(b.store is not self._store for _, b, _ in triplets):
                raise ValueError("every B (and C) volume of a session must be in one storage unit")
            if name in self._store.session_rows():
                raise AlreadyExistsError(f"a session named {name!r} already exists in that unit")
            if journal is None:
                self.journal = self._store
        was_invalid = {id(v): v._invalid for v in vols}
        try:
            for a, b, c in triplets:
                pair = PPRCPair(a, b, self.link, mode="gcp", background=False,
                                initial_copy=initial_copy)
                try:
                    fc = FlashCopy(b, c, background_copy=False, record=True,
                                   inhibit_target_write=True, sequence=0)
                except Exception:
                    pair.remove()
                    raise
                fc.session = name
                self.triplets.append(Triplet(a, b, c, pair, fc))
        except Exception:
            made = [t.c for t in self.triplets]
            self._teardown()
            for c in made:  # nothing was copied: a refused session leaves C as it was
                c._invalid = was_invalid[id(c)]
            raise
        self._primaries = sorted((t.a for t in self.triplets), key=lambda v: v.vid)
        self._order_drains()
        self._store.add_session(self.to_record(), self,
                                partners=[t.a.store for t in self.triplets])

    def _order_drains(self) -> None:
        """Group the triplets by the store of their B and C
        (:class:`SecondaryGroup`, the unit of the drain and the FlashCopy
        phase) and fix each group's durability "power" ordering (fixed when
        the unit holding B was opened): B is written by the ordered drain
        only, after its barriers, so collisions save CG versions in the side
        file instead of sending them at once."""
        self._ordered = self._store.durability == "power"
        self.groups = secondary_groups(self.triplets)
        self._pairs = [t.pair for t in self.triplets]
        for g in self.groups:
            g.set_ordered(g.store.durability == "power")

    # -- records -----------------------------------------------------------------
    def to_record(self) -> dict:
        """What a store records of this session: ``name``, ``cg_interval``,
        ``max_coordination_time``, ``max_drain_time``, ``decide``,
        ``triplets`` (``[a_unit, a, b, c]``: how a row names the A volume's
        unit, its store's ``ref``, and the three volume names) and ``stats``
        (:meth:`GMStats.to_record`)."""
        return {"name": self.name, "cg_interval": self.cg_interval,
                "max_coordination_time": self.max_coordination_time,
                "max_drain_time": self.max_drain_time, "decide": self.decide,
                "triplets": [[t.a.store.ref, t.a.name, t.b.name, t.c.name]
                             for t in self.triplets],
                "stats": self.stats.to_record()}

    @classmethod
    def from_record(cls, record: dict, triplets: Sequence[Triplet], *,
                    link: Link | None = None) -> "GlobalMirror":
        """Rebuild a session from a record (:meth:`to_record`, as a store
        gives it back; ``stats`` may be None) over its restored
        ``triplets`` (pairs and relationships in place). The CG sequence is
        the newest one every C carries."""
        gm = cls([(t.a, t.b, t.c) for t in triplets], name=record["name"], link=link,
                 cg_interval=record["cg_interval"],
                 max_coordination_time=record["max_coordination_time"],
                 max_drain_time=record["max_drain_time"], decide=record["decide"],
                 _parts=list(triplets))
        if record.get("stats"):
            gm.stats.restore(record["stats"])
            # CGs the C volumes carry beyond the counters were committed by an
            # attempt that a killed process never counted (recovery finished it)
            missed = max(gm.c_sequences) - gm.stats.sequence
            if missed > 0:
                gm.stats.attempts += missed
                gm.stats.successes += missed
        gm.stats.sequence = max(gm.c_sequences)
        return gm

    # -- one consistency group ---------------------------------------------------
    def form_consistency_group(self) -> CGResult:
        """Make one CG attempt synchronously and return its result."""
        self._require_writable()
        with self._lock:
            result = self._attempt()
        self._account(result)
        return result

    def _attempt(self) -> CGResult:
        """One attempt; every way out counts it once (:meth:`_count`)."""
        seq = self._next_sequence
        self._require_not_recovered()
        if self.state is GMState.FATAL:
            return self._count(CGResult(seq, False, Cause.FATAL, self.fatal_reason or ""))
        self._next_sequence += 1
        res = CGResult(seq, False)

        # 1. coordinate
        if not self._coordinate(res):
            return self._count(res)

        # 2. drain, one call per secondary group
        t = time.perf_counter()
        limit = self._drain_limit()
        deadline = None if limit is None else (lambda: time.perf_counter() - t > limit)
        time_left = None if limit is None else (lambda: limit - (time.perf_counter() - t))
        ok = False
        try:
            for group in self.groups:
                res.bytes_drained += group.drain(deadline, time_left)
            ok = True
        except DrainAborted as e:
            res.cause, res.detail = Cause.DRAIN_TIMEOUT, str(e)
        except FastFCError as e:
            res.cause = Cause.LINK_DOWN if not self.link.up else Cause.DRAIN_ERROR
            res.detail = f"{type(e).__name__}: {e}"
        finally:
            res.drain_time = time.perf_counter() - t
            for group in self.groups:
                group.end_drain(ok)
        if not ok:
            if res.cause is Cause.DRAIN_TIMEOUT:
                self._drain_failures += 1
            return self._count(res)
        self._drain_failures = 0

        # 3. FlashCopy: prepare all, decide, commit all or revert all (counted there)
        t = time.perf_counter()
        self._flashcopy_phase(res)
        res.flash_time = time.perf_counter() - t
        return res

    def _coordinate(self, res: CGResult) -> bool:
        """Coordination: one C call (:func:`fastfc._core.coordinate_pairs`).
        The ``coordinate`` fault point and ``on_coordinate`` are hooks it
        calls while the writes are held, not a second implementation."""
        pairs = self._pairs
        # (each pair's side file and cg_bytes were emptied when its last CG
        # ended: PPRCPair._cg_end, _core.cg_end_many)
        injected: list[FastFCError] = []

        def fault_point() -> None:
            try:
                faults.hit("coordinate")
            except FastFCError as e:
                injected.append(e)
                raise

        before = fault_point if faults.armed_at("coordinate") else None
        after = None
        if self.on_coordinate is not None:
            on_coordinate, seq = self.on_coordinate, res.sequence
            after = lambda: on_coordinate(seq)
        try:
            status, seconds = _core.coordinate_pairs(self._primaries, pairs,
                                                     self.max_coordination_time,
                                                     before, after)
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

    def _drain_limit(self) -> float | None:
        if not self._committed_once or self._drain_failures >= MAX_DRAIN_FAILURES:
            return None
        if self.max_drain_time == 0:
            return max(240.0, 2 * self.cg_interval)
        return self.max_drain_time

    def _flashcopy_phase(self, res: CGResult) -> None:
        seq = res.sequence
        failure = None
        stop_at_failure = self.decide == "after_each"
        # On a storage unit the prepares and the decision record share one
        # durable commit, and the commits (or reverts) another that needs no
        # fsync: a crash before the first leaves nothing prepared; after it,
        # recovery carries out the recorded decision, whether or not the
        # second reached the disk. One fsync per CG, whatever its size. The
        # session's counters are one more row of the second commit.
        for group in self.groups:
            group.prepared = []
        with self._store.transaction():
            for group in self.groups:
                failed = group.prepare_all(seq, stop_at_failure)
                if failed is not None:
                    failure = failed
                if failure is not None and stop_at_failure:
                    break
            decision = "commit" if failure is None else "revert"
            if self.journal is not None:
                self.journal.cg_decision(self.name, seq, decision)
        try:
            faults.hit("decision")   # crash tests stop the world here
        except FastFCError:
            pass                     # the decision stands; carry it out
        errors: list[str] = []
        with self._store.transaction(sync=False):
            for group in self.groups:
                errors += group.commit_all() if decision == "commit" else group.revert_all()
            if not errors:
                if failure is not None:
                    res.cause, res.detail = Cause.PREPARE_FAILED, failure
                else:
                    res.committed = True
                self._count(res)
        if errors:
            outcome = self._resolve()
            self.state = GMState.FATAL
            self.fatal_reason = "; ".join(errors) + f" -> resolved by {outcome}"
            res.cause = Cause.COMMIT_FAILED if decision == "commit" else Cause.REVERT_FAILED
            res.detail = self.fatal_reason
            res.committed = outcome == "commit"
            self._count(res)

    def _resolve(self) -> str:
        """End every C on one CG after a failure inside commit or revert.

        IBM's rule: if every relationship is still revertible with the same
        sequence number, none has committed: revert all. If some have already
        committed (sequence numbers differ, or only some are revertible, and
        the non-revertible ones carry the new number), commit the rest. A
        relationship that was reverted carries the old number again, so when
        none carries the new one outside the revertible ones, revert the rest.
        Each step is retried; what still fails leaves the session FATAL.
        """
        fcs = [t.fc for t in self.triplets]
        pending = [fc for fc in fcs if fc.revertible]
        if not pending:
            return "nothing"
        new_seq = pending[0].sequence
        committed = any(not fc.revertible and fc.sequence == new_seq for fc in fcs)
        action = "commit" if committed else "revert"
        if self.journal is not None:
            # the recorded decision may say the opposite (a commit that failed
            # everywhere is resolved by reverting): a crash from here on must be
            # resolved the same way, and a later attempt with this sequence
            # number must not find a stale "commit"
            self.journal.cg_decision(self.name, new_seq, action)
        for fc in pending:
            for _ in range(RETRIES):
                try:
                    fc._end_revertible("commit" if action == "commit" else "revert")
                    break
                except FastFCError:
                    continue
        return action

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
    def clear_fatal(self) -> str:
        """Operator action after a FATAL state: finish the resolution (retrying
        commit or revert) and, if every relationship is settled, allow CGs
        again. Returns the state."""
        with self._lock:
            self._resolve()
            if any(t.fc.revertible for t in self.triplets):
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
        """The CG sequence number each C volume carries."""
        return [t.fc.sequence for t in self.triplets]

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
            sent = sum(g.global_copy(4 << 20) for g in self.groups)
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
            left = sum(g.backlog() for g in self.groups)
            if backlog is None:
                backlog = left
            if left <= backlog // 4:
                return
            if not sum(g.global_copy(4 << 20) for g in self.groups):
                return

    # -- recovery --------------------------------------------------------------
    def _require_writable(self) -> None:
        """Refuse, before anything changes, when the session's units are
        closed or read-only, or one of its volumes is closed."""
        trips = self.triplets
        cached = self._volumes_cache
        if cached is None or cached[0] is not trips:
            vols = [v for t in trips for v in (t.a, t.b, t.c)]
            stores = list({id(v.store): v.store for v in vols}.values())
            cached = self._volumes_cache = (trips, vols, stores)
        _, vols, stores = cached
        for store in stores:         # in the order of their first volume
            store.check_writable()
        k = _core.first_closed(vols)
        if k >= 0:
            raise VolumeClosedError(f"{vols[k]!r} is closed")

    def _require_not_recovered(self) -> None:
        # a CG drain would overwrite host writes at the recovered B volumes
        if any(map(_failed_over, self._pairs)):
            raise StateError(f"session {self.name} was recovered (its pairs are failed "
                             "over): no consistency group can form")

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
            seqs = set(self.c_sequences)
            if len(seqs) != 1 or any(t.fc.revertible for t in self.triplets):
                raise StateError(f"C volumes are not on one CG (sequences {sorted(seqs)}); "
                                 "resolve the session first")
            for t in self.triplets:
                if t.pair.failed_over and not t.b._secondary:
                    continue        # restored before: B may hold host writes since
                # B takes host writes only once restored (its flag last)
                t.pair._failover_to_restore()
                t.fc._reverse_restore()
                t.pair._release_secondary()
            return seqs.pop()

    def _teardown(self) -> None:
        for t in self.triplets:
            t.fc.session = None         # the session itself ends it
            try:
                if t.fc.active and not t.fc.revertible:
                    t.fc.withdraw(force=True)
            finally:
                t.pair.remove()
        self.triplets = []
        self.groups = []
        self._pairs = []

    def close(self, *, discard: bool = False,
              on_copy: Callable[[int, int], None] | None = None) -> None:
        """End the session [rmgmir]: stop, remove the pairs and FlashCopies.

        Every C volume keeps its image of the last committed CG: the tracks
        that it still reads from its B are copied B -> C first (``on_copy(
        copied, total)`` reports the progress in tracks), then each B->C
        relationship is withdrawn without force. That copy is O(data); with
        ``discard=True`` the relationships are withdrawn at once and every C
        that still needed tracks turns invalid (its reads raise
        :class:`~fastfc.errors.InvalidImageError`).

        Refused (nothing changes) while a relationship is still revertible
        after the resolution of a failed commit or revert, unless ``discard``.
        """
        if self.triplets:
            self._require_writable()
        self.stop()
        with self._lock:
            self._resolve()
            if not discard:
                stuck = [t.fc for t in self.triplets if t.fc.active and t.fc.revertible]
                if stuck:
                    raise StateError(
                        f"session {self.name}: {', '.join(fc.target.name for fc in stuck)} "
                        "still revertible (the C volumes are not on one CG); clear_fatal() "
                        "first, or close(discard=True) to withdraw and invalidate them")
                self._copy_to_c(on_copy)
            self._teardown()
            self._store.drop_session(self.name, self)

    def tracks_c_needs(self) -> dict[str, int]:
        """Per C volume (by name), the tracks it still reads from its B: what
        :meth:`close` copies first, or what ``close(discard=True)`` loses."""
        return {t.c.name: t.fc.tracks_to_copy for t in self.triplets if t.fc.active}

    def _copy_to_c(self, on_copy) -> None:
        copy_to_c([t.fc for t in self.triplets], on_copy)

    def __enter__(self) -> "GlobalMirror":
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    def __repr__(self) -> str:
        return (f"<GlobalMirror {self.name} {self.state.value} {len(self.triplets)} triplets "
                f"cg={self.stats.sequence} ok={self.stats.successes} "
                f"failed={sum(self.stats.failures.values())}>")
