"""Links: the transport that carries PPRC track updates to a secondary.

:class:`Link` is the interface a pair talks to; :class:`LocalLink` is the
in-process implementation, with an optional bandwidth cap and latency, that
can be failed and restored (fault injection). A transport between processes
or hosts would implement the same three calls.
"""

from __future__ import annotations

import threading
import time
from abc import ABC, abstractmethod
from typing import Any

from fastfc import _core, faults
from fastfc._numbers import check_real
from fastfc.errors import LinkDownError


class Link(ABC):
    """Carries updates from a primary storage unit to a secondary one."""

    @abstractmethod
    def send(self, secondary: _core.VolumeBase, offset: int, data: Any, *,
             key: object = None) -> None:
        """Apply ``data`` at byte ``offset`` of the ``secondary`` volume, as a
        PPRC update, and return once the secondary holds it.

        Raises :class:`~fastfc.errors.LinkDownError` when the link is down,
        and passes on the secondary's refusal (e.g. a write-inhibit). An
        update is applied whole or not at all. ``key`` (the primary volume)
        only selects injected faults.
        """

    @abstractmethod
    def fail(self) -> None:
        """Take the link down: every send fails until :meth:`restore`."""

    @abstractmethod
    def restore(self) -> None:
        """Bring the link back up."""

    @property
    @abstractmethod
    def up(self) -> bool:
        """Whether sends can go through."""

    def direct(self) -> bool:
        """Whether a pair may move tracks straight from primary to secondary
        memory (an in-process link with nothing to model). Then the pair
        applies them itself and reports them through :meth:`account`."""
        return False

    def account(self, nbytes: int, sends: int) -> None:
        """Count bytes a pair moved directly (see :meth:`direct`)."""

    def fault_point(self, key: object = None) -> None:
        """The link's fault point, reached before every send and, where the
        pair moves tracks directly (:meth:`direct`), by the kernel before
        each run it moves, as a send: an injected fault there takes the link
        down and raises :class:`~fastfc.errors.LinkDownError`. ``key`` (the
        primary volume) selects the fault. Nothing by default."""

    def down_flag(self) -> _core.TrackBitmap | None:
        """A one-bit bitmap whose bit is set while the link is down, for a
        kernel that moves tracks of many pairs directly without the GIL to
        look at between pairs (:func:`fastfc._core.pprc_drain_many`); None
        when the link keeps none (the kernel then never stops for it)."""
        return None


class LocalLink(Link):
    """An in-process link.

    Parameters
    ----------
    bandwidth : float, optional
        Bytes per second the link carries (None: unlimited).
    latency : float
        Seconds added to every send (one way).
    name : str
        A label for reprs and stats.

    Thread-safe; ``bytes_sent`` and ``sends`` count what went through.
    """

    def __init__(self, *, bandwidth: float | None = None, latency: float = 0.0,
                 name: str = "link") -> None:
        if bandwidth is not None:
            bandwidth = check_real("bandwidth (bytes/s)", bandwidth, positive=True)
        latency = check_real("latency", latency)
        self.bandwidth = bandwidth
        self.latency = latency
        self.name = name
        self._up = True
        self._down = _core.TrackBitmap(1)     # bit 0: down (see down_flag)
        self._lock = threading.Lock()
        self._next_free = 0.0  # when the wire is free again (bandwidth model)
        self.bytes_sent = 0
        self.sends = 0

    @property
    def up(self) -> bool:
        return self._up

    def direct(self) -> bool:
        # a subclass that overrides send() wants every update to go through it
        # (an injected link fault does not change this: the kernels that move
        # tracks directly reach the link's fault point before each run)
        return (self._up and not self.bandwidth and not self.latency
                and type(self).send is LocalLink.send)

    def account(self, nbytes: int, sends: int) -> None:
        with self._lock:
            self.bytes_sent += nbytes
            self.sends += sends

    def down_flag(self) -> _core.TrackBitmap:
        return self._down

    def fail(self) -> None:
        self._up = False
        self._down.set(0)

    def restore(self) -> None:
        self._up = True
        self._down.clear(0)

    def fault_point(self, key: object = None) -> None:
        try:
            faults.hit("link", key)
        except Exception:
            self.fail()
            raise LinkDownError(f"{self.name} failed (injected) during a send") from None

    def send(self, secondary: _core.VolumeBase, offset: int, data: Any, *,
             key: object = None) -> None:
        self.fault_point(key)
        if not self._up:
            raise LinkDownError(f"{self.name} is down")
        nbytes = len(data)
        if self.bandwidth or self.latency:
            with self._lock:
                now = time.perf_counter()
                start = max(now, self._next_free)
                self._next_free = start + (nbytes / self.bandwidth if self.bandwidth else 0.0)
                arrive = self._next_free + self.latency
            delay = arrive - time.perf_counter()
            if delay > 0:
                time.sleep(delay)
            if not self._up:
                raise LinkDownError(f"{self.name} went down during a send")
        secondary._write_origin(offset, data, _core.PPRC)
        with self._lock:
            self.bytes_sent += nbytes
            self.sends += 1

    def __repr__(self) -> str:
        bw = f"{self.bandwidth / 1e6:.0f} MB/s" if self.bandwidth else "unlimited"
        return f"<LocalLink {self.name} {'up' if self._up else 'DOWN'} {bw}>"
