"""The in-process transport: a secondary unit served in this process, with
the behaviour of the Ray one (calls by unit name, a killed unit refuses
every call until started again, arrays handed over read-only as from Ray's
object store). Most tests run on it. It needs no Ray: ``from fastfc import
remote`` and :class:`LocalUnit` work without it installed.

``LocalUnit.kill()`` is a crash as far as the unit's files go: the server
is dropped without resolving anything (its volumes and SQLite file stay
as the last completed step left them), and its lock is released.
``arm_kill(where, i)`` crashes it inside a call (``apply``, ``prepare``,
``finish``) before the i-th step.
"""

from __future__ import annotations

import os
import threading
from typing import Any

import numpy as np

from fastfc.errors import FastFCError
from fastfc.remote import client
from fastfc.remote.client import UnitDownError, UnitHandle
from fastfc.remote.server import KilledHere, UnitServer, check_durability
from fastfc.storage.site import Done, Pending

_units: dict[str, "LocalUnit"] = {}
_lock = threading.Lock()


def _read_only(v: Any) -> Any:
    """As Ray's object store hands arrays over: read-only."""
    if isinstance(v, np.ndarray):
        v = v.view()
        v.flags.writeable = False
    elif isinstance(v, (list, tuple)):
        return type(v)(_read_only(x) for x in v)
    return v


class LocalTransport(client.Transport):
    kind = "local"

    def call(self, unit: str, method: str, *args: Any) -> Pending:
        with _lock:
            u = _units.get(unit)
        if u is None:
            return Done(error=UnitDownError(f"unit {unit} is down (not started, or killed)"))
        with u.calls:               # as an actor: one call at a time
            server = u.server
            if server is None:
                return Done(error=UnitDownError(f"unit {unit} is down (not started, or killed)"))
            try:
                value = getattr(server, method)(*[_read_only(a) for a in args])
            except KilledHere:
                u._crash()
                return Done(error=UnitDownError(f"unit {unit} died during {method}"))
            except Exception as e:      # as over Ray: the caller's result() raises it
                return Done(error=e)
        return Done(_read_only(value))


client._transports["local"] = LocalTransport()


class LocalUnit(UnitHandle):
    """A secondary unit served in this process (the test double of
    :class:`fastfc.remote.SecondaryUnit`, same calls)."""

    kind = "local"

    def __init__(self, name: str) -> None:
        super().__init__(name)
        self.server: UnitServer | None = None
        self.path: str | None = None
        self._armed: tuple[str, int] | None = None
        self.calls = threading.RLock()      # held while the server runs a call

    @classmethod
    def start(cls, path: str | os.PathLike, *, name: str,
              durability: str = "process") -> "LocalUnit":
        """Open (or create) the unit at ``path`` under ``name``; again after
        :meth:`kill`, reopen it. ``durability``: the unit's, "process" or
        "power" (see :class:`~fastfc.remote.server.UnitServer`)."""
        check_durability(durability)
        with _lock:
            u = _units.get(name)
            if u is None:
                u = _units[name] = cls(name)
            elif u.server is not None:
                raise FastFCError(f"unit {name} is running already")
        u.path = str(path)
        u.server = UnitServer(path, durability=durability, kill_point=u._kill_point,
                              kill_armed=u._kill_armed)
        u.info()
        return u

    @classmethod
    def attach(cls, name: str) -> "LocalUnit":
        """The unit running under ``name`` (as :meth:`SecondaryUnit.attach`);
        UnitDownError if none is."""
        with _lock:
            u = _units.get(name)
        if u is None or u.server is None:
            raise UnitDownError(f"unit {name} is not running")
        return u

    def stop(self) -> None:
        """Close the unit cleanly (nothing left to recover at the next
        open); calls fail until :meth:`start`."""
        with self.calls:
            s, self.server = self.server, None
            if s is not None:
                s.close()

    def _kill_point(self, where: str, i: int) -> None:
        if self._armed == (where, i):
            self._armed = None
            raise KilledHere(where)

    def _kill_armed(self, where: str) -> bool:
        return self._armed is not None and self._armed[0] == where

    def arm_kill(self, where: str, i: int) -> None:
        """Crash the unit inside its next ``where`` call, before step ``i``."""
        self._armed = (where, i)

    def _crash(self) -> None:
        s, self.server = self.server, None
        if s is not None:
            # a crash: nothing flushed, nothing resolved; the files and the
            # lock let go as a dead process's would
            s.abandon()

    def kill(self) -> None:
        """Crash the unit: every call fails until :meth:`start`."""
        self._crash()

    @property
    def up(self) -> bool:
        return self.server is not None


def stop_all() -> None:
    """Crash every in-process unit (tests' cleanup)."""
    with _lock:
        units = list(_units.values())
        _units.clear()
    for u in units:
        u._crash()
    with client._sites_lock:
        for k in [k for k in client._sites if k[0] == "local"]:
            del client._sites[k]
