"""Deterministic fault injection, as public API.

A fault is armed at a named *point* for a chosen volume (or for any volume)
and fires the next ``times`` times that point is reached::

    from fastfc import faults
    faults.inject("prepare", volume=b7)          # b7's next prepare fails
    faults.inject("commit", volume=b3, times=2)  # its next two commits fail
    faults.inject("coordinate", delay=0.2)       # next coordination stalls 200 ms

Points reached by the engine:

``prepare``, ``commit``, ``revert``
    FlashCopy revertible resync / commit / revert of a relationship whose
    *source* is ``volume``: raises :class:`~fastfc.errors.InjectedFault`
    before anything changes.
``coordinate``
    Global Mirror coordination, while host writes are held (use ``delay``).
``drain``
    Global Mirror drain of a pair whose primary is ``volume`` (``delay``
    stalls it; without a delay it raises).
``link``
    A link send (``after`` = let that many sends through first): the link
    goes down, as if the wire were cut mid-drain.
``decision``
    Right after a Global Mirror session recorded its commit/revert decision,
    before the first relationship is committed or reverted.
``cow``
    Inside a host write, after the copy-on-write of the old tracks to a
    target and before the new data lands (``volume`` is the source); at
    durability "power" also after an ordered copy to a target, before its
    ``to_copy`` bits clear (a CG's or Global Copy's drain, a copy to the
    target). Use it with ``action``; exceptions there are ignored.
``barrier``
    Right after each sync of a unit at durability "power" (a volume's or a
    bitmap's pages reached the disk), in order: ``after=k`` stops the world
    just after the (k+1)-th; power-cut tests cut there. Use it with
    ``action``; an exception there is not raised into the drain.

``action`` runs a callable instead (crash tests pass one that kills the
process), which makes every point a place to stop the world.

``delay`` turns a fault into a stall of that many seconds instead of an
exception. Faults are process-wide and thread-safe; :func:`clear` disarms all.
"""

from __future__ import annotations

import numbers
import threading
import time
from typing import Callable
from dataclasses import dataclass

from fastfc import _core
from fastfc._numbers import check_real
from fastfc.errors import InjectedFault

POINTS = ("prepare", "commit", "revert", "coordinate", "drain", "link", "decision", "cow",
          "barrier")


@dataclass
class Fault:
    point: str
    volume: object = None  # None: any volume
    times: int = 1
    delay: float | None = None
    after: int = 0
    action: Callable[[], object] | None = None
    fired: int = 0

    def matches(self, point: str, volume: object) -> bool:
        return self.point == point and (self.volume is None or self.volume is volume)


_lock = threading.Lock()
_armed: list[Fault] = []
_log: list[tuple[str, str]] = []


def inject(point: str, volume: object = None, *, times: int = 1, delay: float | None = None,
           after: int = 0, action: Callable[[], object] | None = None) -> Fault:
    """Arm a fault at ``point`` (see the module docstring); returns it."""
    if point not in POINTS:
        raise ValueError(f"unknown fault point {point!r}; choose one of {', '.join(POINTS)}")
    for what, n, low in (("times", times, 1), ("after", after, 0)):
        if isinstance(n, bool) or not isinstance(n, numbers.Integral):
            raise TypeError(f"{what} must be an int, got {type(n).__name__}")
        if n < low:
            raise ValueError(f"{what} must be >= {low}, got {n}")
    if delay is not None:
        delay = check_real("delay", delay)
    _check_volume(point, volume)
    fault = Fault(point, volume, times, delay, after, action)
    with _lock:
        _armed.append(fault)
        _core.set_cow_hook(_cow_hook if any(f.point == "cow" for f in _armed) else None)
        _core.set_faults_armed(True)
    return fault


# the points that name no volume: a fault there must not be given one
_NO_VOLUME = ("coordinate", "decision", "barrier")


def _check_volume(point: str, volume: object) -> None:
    """A fault matches by identity, so a volume given by anything but the
    object the engine passes (a name, say) would never fire: refuse it."""
    if volume is None:
        return
    if point in _NO_VOLUME:
        raise TypeError(f"the {point!r} fault point names no volume; got {volume!r}")
    from fastfc.storage.volume import Volume   # late: volume sits below this module's users
    if not isinstance(volume, Volume):
        raise TypeError(f"volume must be a fastfc.Volume (the object, not its name) or "
                        f"None, got {type(volume).__name__} {volume!r}")


def clear() -> None:
    """Disarm every fault."""
    with _lock:
        _armed.clear()
        _core.set_cow_hook(None)
        _core.set_faults_armed(False)


def disarm(fault: Fault) -> None:
    """Disarm one fault (as :func:`inject` returned it), if it is still armed."""
    with _lock:
        _armed[:] = [f for f in _armed if f is not fault]
        _core.set_cow_hook(_cow_hook if any(f.point == "cow" for f in _armed) else None)
        _core.set_faults_armed(bool(_armed))


def armed() -> list[Fault]:
    with _lock:
        return list(_armed)


def armed_at(point: str) -> bool:
    """Whether a fault is armed at ``point`` (cheap when none is armed). The
    engine never chooses its path by it: a step calls its fault points as
    callbacks (the kernels call them only while a fault is armed, which
    :func:`inject` and :func:`clear` tell them: ``_core.set_faults_armed``)."""
    if not _armed:
        return False
    with _lock:
        return any(f.point == point for f in _armed)


def fired_log() -> list[tuple[str, str]]:
    """(point, volume name) of every fault that fired, oldest first."""
    with _lock:
        return list(_log)


def hit(point: str, volume: object = None) -> None:
    """Called by the engine at ``point``: stalls or raises if a fault is armed."""
    if not _armed:  # fast path, no lock
        return
    with _lock:
        for fault in _armed:
            if fault.matches(point, volume):
                if fault.after > 0:
                    fault.after -= 1
                    return
                fault.fired += 1
                if fault.fired >= fault.times:
                    _armed.remove(fault)
                    _core.set_faults_armed(bool(_armed))
                _log.append((point, getattr(volume, "name", str(volume))))
                break
        else:
            return
    if fault.action is not None:
        fault.action()
        return
    if fault.delay is not None:
        time.sleep(fault.delay)
        return
    raise InjectedFault(f"injected {point} fault on {getattr(volume, 'name', volume)}")


def _cow_hook(volume: object) -> None:
    try:
        hit("cow", volume)
    except InjectedFault:
        pass
