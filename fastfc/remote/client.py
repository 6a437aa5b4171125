"""The caller's side of a secondary unit: volume proxies and the site a
session talks to, over a transport (Ray, or in-process for tests).

A transport provides ``call(unit, method, *args) -> Pending`` to the
current server of the unit named ``unit`` and ``epoch(unit)``; everything
else (what the calls mean, re-resolving a unit after a restart, fencing)
is here once.
"""

from __future__ import annotations

import threading
from typing import Any, Sequence

import numpy as np

from fastfc.errors import FastFCError, UnitDownError
from fastfc.storage.site import Pending, SecondarySite, SiteVolume, Update


class Transport:
    """How calls reach a unit's server. ``kind`` names it in proxies."""

    kind = "?"

    def call(self, unit: str, method: str, *args: Any) -> Pending:
        raise NotImplementedError

    def site(self, unit: str) -> "UnitSite":
        """The one site object per unit in this process (the session groups
        triplets by it)."""
        with _sites_lock:
            key = (self.kind, unit)
            s = _sites.get(key)
            if s is None:
                s = _sites[key] = UnitSite(self, unit)
            return s


_sites: dict[tuple[str, str], "UnitSite"] = {}
_sites_lock = threading.Lock()
_transports: dict[str, Transport] = {}


def transport(kind: str) -> Transport:
    try:
        return _transports[kind]
    except KeyError:
        raise ValueError(f"no fastfc.remote transport {kind!r} in this process "
                         "(import fastfc.remote)") from None


class UnitSite(SecondarySite):
    """A secondary unit as a Global Mirror session sees it (see
    :class:`~fastfc.storage.site.SecondarySite`). ``epoch`` is the
    epoch of the server that answered last; ``restarts`` counts the times a
    new one answered."""

    def __init__(self, tr: Transport, unit: str) -> None:
        self.tr, self.name, self.key = tr, unit, (tr.kind, unit)
        self._up = True
        self.epoch: int | None = None
        self.restarts = 0

    @property
    def up(self) -> bool:
        return self._up

    def probe(self) -> bool:
        try:
            info = self._now("info")
        except FastFCError:
            return False
        self._saw_epoch(info["epoch"])
        return True

    def _call(self, method: str, *args: Any) -> Pending:
        return _Tracked(self, self.tr.call(self.name, method, *args), method)

    def _now(self, method: str, *args: Any) -> Any:
        return self._call(method, *args).result()

    def setup(self, session: str, pairs: Sequence[tuple[str, str]]) -> list[int]:
        return list(self._now("setup", session, [list(p) for p in pairs]))

    def apply(self, updates: Sequence[Update], token: str | None = None) -> Pending:
        if token is None:
            return self._call("apply", list(updates))
        return self._call("apply", list(updates), token)

    def prepare(self, session: str, sequence: int, after: str | None = None) -> Pending:
        if after is None:
            return self._call("prepare", session, sequence)
        return self._call("prepare", session, sequence, after)

    def finish(self, session: str, sequence: int, decision: str) -> Pending:
        return self._call("finish", session, sequence, decision)

    def record_decision(self, session: str, sequence: int, decision: str) -> None:
        self._now("record_decision", session, sequence, decision)

    def status(self, session: str) -> dict[str, Any]:
        st = dict(self._now("status", session))
        self._saw_epoch(st["epoch"])
        return st

    def restore_b(self, session: str) -> None:
        self._now("restore_b", session)

    def rejoin(self, session: str, pairs: Sequence[tuple[str, str]],
               min_sequence: int = 0) -> list[int]:
        return list(self._now("rejoin", session, [list(p) for p in pairs], int(min_sequence)))

    def digests(self, name: str, start: int, stop: int) -> Pending:
        return self._call("digests", name, int(start), int(stop))

    def _saw_epoch(self, epoch: int) -> None:
        if self.epoch is not None and epoch != self.epoch:
            self.restarts += 1
        self.epoch = epoch

    def __repr__(self) -> str:
        return f"<UnitSite {self.tr.kind}:{self.name} {'up' if self._up else 'DOWN'}>"


# a session's calls: whatever the unit raised reaches the session as a
# FastFCError (a CG attempt fails with a cause, it never raises)
_SESSION_CALLS = {"apply", "prepare", "finish", "record_decision", "status", "restore_b",
                  "setup", "rejoin", "digests"}


class _Tracked(Pending):
    """Marks the site down or up by how the call ended."""

    def __init__(self, site: UnitSite, inner: Pending, method: str) -> None:
        self.site, self.inner, self.method = site, inner, method

    def result(self) -> Any:
        try:
            v = self.inner.result()
        except UnitDownError:
            self.site._up = False
            raise
        except FastFCError:
            self.site._up = True
            raise
        except Exception as e:
            self.site._up = True
            if self.method in _SESSION_CALLS and self.method != "setup":
                raise FastFCError(f"unit {self.site.name}: {self.method} failed: "
                                  f"{type(e).__name__}: {e}") from e
            raise
        self.site._up = True
        return v


class RemoteVolume(SiteVolume):
    """A volume of a secondary unit: picklable (it holds names only), and it
    finds the unit's current server by name on every call, so a proxy made
    before a kill works again once the unit is started again. While the
    unit is down, calls raise :class:`UnitDownError` (a
    :class:`~fastfc.errors.FastFCError`), never hang."""

    def __init__(self, kind: str, unit: str, name: str, n_tracks: int, track_size: int,
                 grain_size: int) -> None:
        self.kind, self.unit = kind, unit
        self.name, self.n_tracks, self.track_size = name, int(n_tracks), int(track_size)
        self.grain_size = int(grain_size)

    def __reduce__(self) -> tuple[Any, ...]:
        return (RemoteVolume, (self.kind, self.unit, self.name, self.n_tracks, self.track_size,
                               self.grain_size))

    def site(self) -> UnitSite:
        return transport(self.kind).site(self.unit)

    def read(self, offset: int, length: int) -> np.ndarray:
        out = self.site()._now("read", self.name, int(offset), int(length))
        return out if out.flags.writeable else out.copy()

    def __repr__(self) -> str:
        return f"<RemoteVolume {self.unit}:{self.name} {self.n_tracks}x{self.track_size}B>"


class UnitHandle:
    """What ``start`` returns: make volumes, kill the unit. Shared by the
    transports; ``_kill`` is theirs."""

    kind = "?"

    def __init__(self, name: str) -> None:
        self.name = name

    def _site(self) -> UnitSite:
        return transport(self.kind).site(self.name)

    def create_volume(self, name: str, n_tracks: int, track_size: int = 65536,
                      grain_size: int | None = None) -> RemoteVolume:
        """Create a zero-filled volume in the unit; returns its proxy."""
        geometry = self._site()._now("create_volume", name, int(n_tracks), int(track_size),
                                     None if grain_size is None else int(grain_size))
        return RemoteVolume(self.kind, self.name, *geometry)

    def volume(self, name: str) -> RemoteVolume:
        """The proxy of an existing volume of the unit."""
        return RemoteVolume(self.kind, self.name, *self._site()._now("volume", name))

    def info(self) -> dict[str, Any]:
        """``epoch``, ``pid`` and ``path`` of the unit's server."""
        info = dict(self._site()._now("info"))
        self._site()._saw_epoch(info["epoch"])
        return info

    @property
    def site(self) -> UnitSite:
        return self._site()

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.name}>"
