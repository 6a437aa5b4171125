"""Global Mirror sessions that run in a server: the loops ``resumegmir``
starts and ``pausegmir`` stops inside ``fastfc serve``.

A session's loop (:meth:`GlobalMirror.start`) runs on its own thread in the
serving process, not in the lifetime of the command that started it, and
takes none of the server's locks: forwarded commands (``showgmir``,
``lsgmir``, ``lsvol``, ...) answer while it forms CGs. Whether a session
runs is recorded in the unit that records the session
(:meth:`StorageUnit.configure_session`), so a server that opens the unit
again (after a stop, a kill or a power cut) resumes it.

Turns: in a server, a session whose B and C volumes are in the serving
process takes the server's turn (:class:`~fastfc.tools.nbd.Turn`, which
the NBD connections take around each batch of requests while such a
session runs) around each CG attempt: the attempt then runs without the
request threads competing with it for the GIL and the CPU, so that the
RPO does not wait behind them; the requests wait for at most one attempt.
Back-to-back attempts leave the turn to the waiting requests for a while
(:class:`SessionTurn`), so that they hold it for at most
:data:`TURN_SHARE` of the time.

RPO alerts: a session may carry a threshold (``mkgmir``/``chgmir
--rpo-alert``, recorded in its unit). While its loop runs here, a watcher
thread looks at its RPO every :data:`ALERT_EVERY` seconds: when the RPO goes
above the threshold, one WARNING line on the ``fastfc.gmir`` logger (and the
alert is on, counted); when it is back within it, one INFO line. Before
the session's first committed CG, its RPO for the alert is the time since
its loop started here (it is at least that far behind).
"""

from __future__ import annotations

import logging
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass, replace
from typing import Any, Iterator

from fastfc.copyservices.globalmirror import GlobalMirror
from fastfc.durable.unit import StorageUnit
from fastfc.storage.volume import Volume


log = logging.getLogger("fastfc.gmir")

#: seconds between the alert watcher's looks at the running sessions' RPO
ALERT_EVERY = 0.1
#: the part of the server's turn a session's back-to-back CG attempts hold
#: at most while request threads wait for it (:class:`SessionTurn`)
TURN_SHARE = 0.25
#: the longest rest (seconds) between two such attempts
MAX_REST = 0.01


class SessionTurn:
    """The server's turn (:class:`~fastfc.tools.nbd.Turn`) as a session's
    CG attempts take it: an attempt that found others waiting for the turn
    when it gave it back leaves it to them for a while before the next
    attempt asks again, so that back-to-back attempts (a CG interval of 0)
    hold it for at most :attr:`share` of the time the turn is wanted
    (resting at most :data:`MAX_REST` seconds between attempts)."""

    def __init__(self, turn: Any, share: float | None = None) -> None:
        self.turn = turn
        self.share = TURN_SHARE if share is None else share
        self._took = 0.0
        self._rest_until = 0.0

    def __repr__(self) -> str:
        return f"<SessionTurn of {self.turn!r}, share {self.share:g}>"

    def acquire(self, blocking: bool = True, timeout: float = -1) -> bool:
        rest = self._rest_until - time.monotonic()
        if rest > 0:
            time.sleep(rest)
        got = self.turn.acquire(blocking, timeout, alone=True)
        if got:
            self._took = time.monotonic()
        return got

    def release(self) -> bool:
        now = time.monotonic()
        held = now - self._took
        handed = self.turn.release(alone=True)
        self._rest_until = now + min(MAX_REST, held * (1 / self.share - 1)) if handed else 0.0
        return handed


@dataclass
class RPOAlert:
    """A session's RPO alert in this server: its ``threshold`` (seconds,
    None: none), whether it is ``alerting`` now (and ``since``, the
    ``time.time()`` it went on), and how many ``alerts`` it raised here."""

    threshold: float | None = None
    alerting: bool = False
    since: float | None = None
    alerts: int = 0


class SessionLoops:
    """The sessions whose loops this server runs: each with when it started
    and its committed CGs then (for CGs per second), and each session's
    RPO alert (:class:`RPOAlert`, kept while the server runs).

    ``_guard`` guards those tables only; starting and stopping a loop
    happen outside it (the server runs one command at a time, under its
    own lock, which the loops never take). The alert watcher thread runs
    while a loop does; it takes ``_guard`` only to read and change the
    alerts, and logs outside it."""

    def __init__(self, turn: Any = None) -> None:
        #: the server's turn (a lock its request threads take around their
        #: work, :class:`~fastfc.tools.nbd.NBDServer`): a session whose B and
        #: C volumes are in this process holds it around each CG attempt,
        #: so that its loop does not wait on the GIL and the CPU behind them
        self.turn = turn
        self._guard = threading.Lock()
        self._turns: dict[GlobalMirror, SessionTurn] = {}
        self._runs: dict[GlobalMirror, tuple[float, int]] = {}
        self._alerts: dict[GlobalMirror, RPOAlert] = {}
        self._watcher: threading.Thread | None = None
        self._done = threading.Event()
        #: what resuming the recorded sessions said (for the server's log)
        self.notes: list[str] = []

    def running(self, gm: GlobalMirror) -> bool:
        with self._guard:
            return gm in self._runs

    def start(self, gm: GlobalMirror, rpo_alert: float | None = None) -> bool:
        """Start the loop of ``gm``, with its RPO alert threshold
        (seconds; None or 0: none); False if it runs here already."""
        with self._guard:
            if gm in self._runs:
                return False
        turn = SessionTurn(self.turn) if self.turn is not None and self._local(gm) else None
        gm.turn = turn
        try:
            gm.start()
        except BaseException:
            gm.turn = None
            raise
        if turn is not None:
            with self._guard:
                self.turn.active += 1
                self._turns[gm] = turn
        with self._guard:
            self._runs[gm] = (time.monotonic(), gm.stats.successes)
            self._alerts.setdefault(gm, RPOAlert()).threshold = rpo_alert or None
            if self._watcher is None:
                self._done.clear()
                self._watcher = threading.Thread(target=self._watch, daemon=True,
                                                 name="fastfc-gm-alerts")
                self._watcher.start()
        return True

    def _drop_turn(self, gm: GlobalMirror) -> None:
        """``gm``'s loop stopped: it takes no more turns."""
        gm.turn = None
        with self._guard:
            if self._turns.pop(gm, None) is not None:
                self.turn.active -= 1

    @staticmethod
    def _local(gm: GlobalMirror) -> bool:
        """Whether every B and C of ``gm`` is a volume in this process (its
        attempts then wait on nothing but this process: a drain to another
        site could hold the turn, and the request threads with it, for as
        long as the link takes)."""
        return all(isinstance(v, Volume) for t in gm.triplets for v in (t.b, t.c))

    def stop(self, gm: GlobalMirror) -> bool:
        """Stop the loop of ``gm`` after its attempt in flight; False if it
        did not run here. An alert on ends (an INFO line says so)."""
        with self._guard:
            run = self._runs.pop(gm, None)
        if run is None:
            return False
        gm.stop()
        self._drop_turn(gm)
        self._alert_off(gm, "its loop stopped")
        return True

    # -- RPO alerts --------------------------------------------------------------------
    def set_rpo_alert(self, gm: GlobalMirror, threshold: float | None) -> None:
        """A new threshold for ``gm`` (None or 0: none), from the next look."""
        with self._guard:
            self._alerts.setdefault(gm, RPOAlert()).threshold = threshold or None
        if not threshold:
            self._alert_off(gm, "its threshold was removed")

    def alert(self, gm: GlobalMirror) -> RPOAlert | None:
        """A copy of ``gm``'s alert here (None: never started nor set here)."""
        with self._guard:
            a = self._alerts.get(gm)
            return None if a is None else replace(a)

    def alerts(self) -> dict[GlobalMirror, RPOAlert]:
        """A copy of every session's alert here."""
        with self._guard:
            return {gm: replace(a) for gm, a in self._alerts.items()}

    def _rpo(self, gm: GlobalMirror, started: float) -> float:
        rpo = gm.stats.rpo
        return time.monotonic() - started if rpo is None else rpo

    def check_alerts(self) -> None:
        """One look at every running session's RPO against its threshold
        (the watcher's; a test may call it)."""
        with self._guard:
            runs = [(gm, since, self._alerts[gm].threshold)
                    for gm, (since, _) in self._runs.items() if gm in self._alerts]
        for gm, started, threshold in runs:
            if threshold is None:
                continue
            rpo = self._rpo(gm, started)
            above = rpo > threshold
            with self._guard:
                a = self._alerts[gm]
                if a.alerting == above or a.threshold != threshold or gm not in self._runs:
                    continue
                a.alerting = above
                if above:
                    a.alerts += 1
                    a.since, was = time.time(), None
                else:
                    a.since, was = None, a.since
            if above:
                log.warning("Global Mirror session %s: RPO %.3f s is above its alert "
                            "threshold %g s", gm.name, rpo, threshold)
            else:
                log.info("Global Mirror session %s: RPO %.3f s is back within its alert "
                         "threshold %g s (above it for %.1f s)", gm.name, rpo, threshold,
                         time.time() - (was or time.time()))

    def _alert_off(self, gm: GlobalMirror, why: str) -> None:
        with self._guard:
            a = self._alerts.get(gm)
            if a is None or not a.alerting:
                return
            a.alerting, a.since = False, None
        log.info("Global Mirror session %s: RPO alert off: %s", gm.name, why)

    def _watch(self) -> None:
        while not self._done.wait(ALERT_EVERY):
            try:
                self.check_alerts()
            except Exception:       # a session closed under it: the next look
                log.exception("RPO alert watcher")

    def rate(self, gm: GlobalMirror) -> float | None:
        """Committed CGs per second since the loop started here (None if it
        does not run here)."""
        with self._guard:
            run = self._runs.get(gm)
        if run is None:
            return None
        since, successes = run
        spent = time.monotonic() - since
        return (gm.stats.successes - successes) / spent if spent > 0 else 0.0

    def __repr__(self) -> str:
        with self._guard:
            names = sorted(gm.name for gm in self._runs)
        return f"<SessionLoops running {', '.join(names) or 'none'}>"

    def stop_all(self) -> None:
        with self._guard:
            runs, self._runs = list(self._runs), {}
            watcher, self._watcher = self._watcher, None
        self._done.set()
        if watcher is not None:
            watcher.join()
        for gm in runs:
            gm.stop()
            self._drop_turn(gm)
            self._alert_off(gm, "the server stops")

    def resume_recorded(self, units: list[StorageUnit]) -> None:
        """Start every session the ``units`` record as running (notes say
        which, and which could not start: a session whose primary unit is
        not open, one that cannot be restored, one that is fatal)."""
        for unit in units:
            if unit.readonly or unit.path is None:
                continue
            for name, cfg in unit.store.session_rows().items():
                if not cfg.get("running"):
                    continue
                gm = unit.sessions.get(name)
                if gm is None:
                    self.notes.append(
                        f"Global Mirror session {name} is recorded as running but is not "
                        f"restored in {unit.path}: not resumed (showgmir {name} says why)")
                    continue
                try:
                    self.start(gm, cfg.get("rpo_alert"))
                except Exception as e:      # one session's trouble stops no other
                    self.notes.append(f"Global Mirror session {name} is recorded as running "
                                      f"but did not resume: {e}")
                    continue
                self.notes.append(f"resumed Global Mirror session {name} (recorded as "
                                  f"running), at CG {gm.stats.sequence}")

    @contextmanager
    def serving(self, units: Any, lock: Any) -> Iterator["SessionLoops"]:
        """A server's service: resume the recorded sessions of ``units``
        (a :class:`~fastfc.tools.cli.units.Units`) on entry, stop every
        loop on exit (their records stay: the next server resumes them)."""
        with lock:
            self.resume_recorded(units.all())
        try:
            yield self
        finally:
            self.stop_all()
