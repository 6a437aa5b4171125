"""Recovery points of a Global Mirror session's C volumes, on a schedule.

A :class:`PointSchedule` on a session (``GlobalMirror(..., points=...)``,
:meth:`GlobalMirror.set_point_schedule`) takes a point of every C volume at
one instant after a consistency group commits, when the schedule is due
(every N CGs, or once T seconds have passed since the last take): each C
then holds that CG, so the points are one consistent image of the whole
session at that CG. They are named ``SESSION@cgSEQ`` (:func:`point_cg`
reads the CG back). A point of a C is a point of a FlashCopy target: it
reads C's logical image (through to B where C still reads it there), and
the session's resyncs and reverts keep it (fastfc/_points_target.pxi).

Expiry: with ``keep`` the session holds at most that many of its points per
C (the oldest beyond expire once their retention allows); without it each
expires when its ``retain_seconds`` end. A point is never expired before its
retention ends (it is immutable until then), nor while a restore reads it.

The points are kept by a *keeper*: in memory by default; a storage unit
holding the C volumes hands the session its durable one
(:attr:`GlobalMirror.point_keeper`: ``take(names, retain_for=, name=)``
and ``expire_group(points)``, all or none at once), so the schedule's
points are durable there.

A take that fails (a C closed, invalid, a unit read-only) does not fail the
CG: the error is kept (:attr:`ScheduledPoints.error`) and the next due CG
tries again.
"""

from __future__ import annotations

import collections
import math
import re
import time
from dataclasses import dataclass
from typing import Any, Sequence

from fastfc._numbers import check_real
from fastfc.copyservices.points import (PointChain, RecoveryPoint, expire_points,
                                        take_points)
from fastfc.errors import FastFCError
from fastfc.storage.volume import Volume

_CG_NAME = re.compile(r"^(?P<session>.+)@cg(?P<seq>\d+)$")


def point_name(session: str, sequence: int) -> str:
    """The name of the points a session takes at CG ``sequence``."""
    return f"{session}@cg{sequence}"


def point_cg(name: object) -> tuple[str, int] | None:
    """``(session, CG sequence)`` of a point named by a session's schedule,
    or None."""
    if not isinstance(name, str):
        return None
    m = _CG_NAME.match(name)
    return None if m is None else (m["session"], int(m["seq"]))


def session_points(session: str, volume: Volume) -> list[RecoveryPoint]:
    """The points of ``volume`` that session ``session`` took (named for a
    CG of it), oldest first."""
    chain = PointChain.chain_of(volume)
    if chain is None:
        return []
    out = []
    for p in chain.points:
        cg = point_cg(p.name)
        if cg is not None and cg[0] == session:
            out.append(p)
    return out


@dataclass(frozen=True)
class PointSchedule:
    """When a Global Mirror session takes points of its C volumes and how
    long it keeps them.

    every_cgs : int, optional
        Take after every ``every_cgs``-th committed CG (1: after each).
    every_seconds : float, optional
        Take after the first CG that commits ``every_seconds`` or more
        after the last take. With both, whichever is due first.
    retain_seconds : float
        Each point is immutable (cannot expire) this long.
    keep : int, optional
        Hold at most this many of the session's points per C: the oldest
        beyond expire once their retention ends. None: each expires when
        its retention ends (``retain_seconds`` must then be > 0).
    """

    every_cgs: int | None = None
    every_seconds: float | None = None
    retain_seconds: float = 0.0
    keep: int | None = None

    def __post_init__(self) -> None:
        if self.every_cgs is None and self.every_seconds is None:
            raise ValueError("a point schedule needs every_cgs or every_seconds")
        if self.every_cgs is not None:
            if isinstance(self.every_cgs, bool) or not isinstance(self.every_cgs, int):
                raise TypeError(f"every_cgs must be an integer, got {self.every_cgs!r}")
            if self.every_cgs < 1:
                raise ValueError(f"every_cgs must be >= 1, got {self.every_cgs}")
        if self.every_seconds is not None:
            secs = check_real("every_seconds", self.every_seconds, positive=True)
            if math.isinf(secs):
                raise ValueError("every_seconds must be finite")
            object.__setattr__(self, "every_seconds", float(secs))
        keep_for = check_real("retain_seconds", self.retain_seconds)
        if not 0 <= keep_for < math.inf:
            raise ValueError(f"retain_seconds must be >= 0 and finite, got {keep_for}")
        object.__setattr__(self, "retain_seconds", float(keep_for))
        if self.keep is not None:
            if isinstance(self.keep, bool) or not isinstance(self.keep, int):
                raise TypeError(f"keep must be an integer, got {self.keep!r}")
            if self.keep < 1:
                raise ValueError(f"keep must be >= 1, got {self.keep}")
        elif not self.retain_seconds:
            raise ValueError("a point schedule without keep needs retain_seconds > 0 "
                             "(its points expire when their retention ends)")

    def to_record(self) -> dict:
        return {"every_cgs": self.every_cgs, "every_seconds": self.every_seconds,
                "retain_seconds": self.retain_seconds, "keep": self.keep}

    @classmethod
    def from_record(cls, record: dict | None) -> "PointSchedule | None":
        if not record:
            return None
        return cls(every_cgs=record.get("every_cgs"), every_seconds=record.get("every_seconds"),
                   retain_seconds=record.get("retain_seconds", 0.0), keep=record.get("keep"))

    def describe(self) -> str:
        when = []
        if self.every_cgs is not None:
            when.append("every CG" if self.every_cgs == 1 else f"every {self.every_cgs} CGs")
        if self.every_seconds is not None:
            when.append(f"every {self.every_seconds:g} s")
        kept = []
        if self.retain_seconds:
            kept.append(f"retained {self.retain_seconds:g} s")
        if self.keep is not None:
            kept.append(f"at most {self.keep} kept")
        return " or ".join(when) + (", " + ", ".join(kept) if kept else "")


class MemoryKeeper:
    """Points of volumes in memory (the default keeper): by volume name."""

    def __init__(self, volumes: Sequence[Volume]) -> None:
        self.volumes = list(volumes)
        self._by_name = {v.name: v for v in volumes}

    def take(self, names: Sequence[str], *, retain_for: float = 0.0,
             name: str | None = None) -> list[RecoveryPoint]:
        return take_points([self._by_name[n] for n in names], retain_for=retain_for,
                           name=name, clock=time.time)

    def expire_group(self, points: Sequence[RecoveryPoint]) -> None:
        expire_points(points)


class ScheduledPoints:
    """A session's schedule at work: when it last took, the groups of
    points it holds (oldest first: the points of every C taken at one CG),
    what went wrong. Its caller (the session) keeps attempts apart."""

    def __init__(self, session: str, schedule: PointSchedule,
                 volumes: Sequence[Volume] = ()) -> None:
        self.session = session
        self.schedule = schedule
        self.last_time: float | None = None
        self.taken = 0
        self.expired = 0
        #: the last take's or expiry's failure (None once one succeeds)
        self.error: str | None = None
        # the points the session holds (a reopened unit's too), by CG
        by_cg: dict[int, list[RecoveryPoint]] = {}
        for v in volumes:
            for p in session_points(session, v):
                cg = point_cg(p.name)
                assert cg is not None
                by_cg.setdefault(cg[1], []).append(p)
        self.groups: collections.deque[list[RecoveryPoint]] = collections.deque(
            by_cg[q] for q in sorted(by_cg))
        self.last_cg: int | None = max(by_cg) if by_cg else None

    def due(self, sequence: int, now: float) -> bool:
        s = self.schedule
        if self.last_cg is None:
            return True
        if s.every_cgs is not None and sequence - self.last_cg >= s.every_cgs:
            return True
        return (s.every_seconds is not None and self.last_time is not None
                and now - self.last_time >= s.every_seconds)

    def after_commit(self, sequence: int, volumes: Sequence[Volume], keeper: Any) -> bool:
        """CG ``sequence`` committed (every C of ``volumes`` holds it): take
        points if due, then expire what the schedule no longer keeps.
        Whether points were taken; failures are kept in :attr:`error`."""
        now = time.monotonic()
        if not self.due(sequence, now):
            return False
        took = bool(self.take(sequence, volumes, keeper))
        if took:
            self.last_time = now
        return took

    def take(self, sequence: int, volumes: Sequence[Volume], keeper: Any) -> list:
        """Take the points of CG ``sequence`` now (the caller says every C
        holds it), then expire; the points ([] if the take failed)."""
        try:
            points = keeper.take([v.name for v in volumes],
                                 retain_for=self.schedule.retain_seconds,
                                 name=point_name(self.session, sequence))
        except (FastFCError, OSError, ValueError) as e:
            self.error = f"taking the points of CG {sequence}: {type(e).__name__}: {e}"
            return []
        self.groups.append(list(points))
        self.last_cg = sequence
        self.taken += 1
        self.error = None
        self.expire(keeper)
        return points

    def mine(self, volume: Volume) -> list[RecoveryPoint]:
        """The schedule's points of ``volume``, oldest first."""
        return session_points(self.session, volume)

    def expire(self, keeper: Any) -> int:
        """Expire the groups the schedule no longer keeps, oldest first
        (beyond ``keep``, or past their retention without it), stopping at
        the first group still retained or read by a restore (retentions
        only grow along the groups); how many points expired."""
        keep = self.schedule.keep
        now = time.time()
        done = 0
        groups = self.groups
        while groups:
            group = [p for p in groups[0] if not p.expired]   # (some expired by hand)
            if not group:
                groups.popleft()
                continue
            if keep is not None and len(groups) <= keep:
                break
            if any(p.retain_until > now or p.pins for p in group):
                break
            try:
                keeper.expire_group(group)      # (one lock hold, one record)
            except (FastFCError, OSError, KeyError) as e:
                self.error = f"expiring CG points {group!r}: {type(e).__name__}: {e}"
                groups[0] = [q for q in group if not q.expired]
                done += len(group) - len(groups[0])
                break
            done += len(group)
            groups.popleft()
        self.expired += done
        return done

    def status(self) -> dict:
        return {"schedule": self.schedule.to_record(), "describe": self.schedule.describe(),
                "last_cg": self.last_cg, "taken": self.taken, "expired": self.expired,
                "error": self.error}
