"""Global Mirror sessions that run in a server: the loops ``resumegmir``
starts and ``pausegmir`` stops inside ``fastfc serve``.

A session's loop (:meth:`GlobalMirror.start`) runs on its own thread in the
serving process, not in the lifetime of the command that started it, and
takes none of the server's locks: forwarded commands (``showgmir``,
``lsgmir``, ``lsvol``, ...) answer while it forms CGs. Whether a session
runs is recorded in the unit that records the session
(:meth:`StorageUnit.configure_session`), so a server that opens the unit
again (after a stop, a kill or a power cut) resumes it.
"""

from __future__ import annotations

import threading
import time
from contextlib import contextmanager
from typing import Any, Iterator

from fastfc.copyservices.globalmirror import GlobalMirror
from fastfc.durable.unit import StorageUnit


class SessionLoops:
    """The sessions whose loops this server runs: each with when it started
    and its committed CGs then (for CGs per second).

    ``_guard`` guards that table only; starting and stopping a loop
    happen outside it (the server runs one command at a time, under its
    own lock, which the loops never take)."""

    def __init__(self) -> None:
        self._guard = threading.Lock()
        self._runs: dict[GlobalMirror, tuple[float, int]] = {}
        #: what resuming the recorded sessions said (for the server's log)
        self.notes: list[str] = []

    def running(self, gm: GlobalMirror) -> bool:
        with self._guard:
            return gm in self._runs

    def start(self, gm: GlobalMirror) -> bool:
        """Start the loop of ``gm``; False if it runs here already."""
        with self._guard:
            if gm in self._runs:
                return False
        gm.start()
        with self._guard:
            self._runs[gm] = (time.monotonic(), gm.stats.successes)
        return True

    def stop(self, gm: GlobalMirror) -> bool:
        """Stop the loop of ``gm`` after its attempt in flight; False if it
        did not run here."""
        with self._guard:
            run = self._runs.pop(gm, None)
        if run is None:
            return False
        gm.stop()
        return True

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
        for gm in runs:
            gm.stop()

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
                    self.start(gm)
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
