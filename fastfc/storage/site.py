"""Secondary sites: what a Global Mirror session needs from a storage unit
that it reaches only through calls (another process, another host).

A session with local A volumes and B and C volumes on such a unit sees the
B and C volumes as :class:`SiteVolume` proxies, and their unit as a
:class:`SecondarySite`. Nothing here knows how the calls travel: the
``fastfc.remote`` package implements both over Ray, and in-process for
tests, and hands them down through the volumes the caller passes in.

Every call that changes the unit carries the session's name and is keyed
by the CG sequence it belongs to, so a call retried (or delivered twice)
cannot act twice. Calls return :class:`Pending` results so a session can
have one call per unit in flight on every unit at once.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Any, Hashable, Sequence

import numpy as np

# one piece of an update batch: (B volume name, byte offsets in B (int64),
# rows of data, one per offset: a C-contiguous (k, track_size) uint8 array)
Update = tuple[str, np.ndarray, np.ndarray]


class Pending(ABC):
    """A call in flight. :meth:`result` waits (bounded by the transport's
    timeout) and returns its value or raises a
    :class:`~fastfc.errors.FastFCError` naming the cause (a unit down, a
    refusal), never hangs."""

    @abstractmethod
    def result(self) -> Any:
        """The call's value, or the error it ended with."""


class Done(Pending):
    """A call that has already ended (an in-process transport)."""

    def __init__(self, value: Any = None, error: BaseException | None = None) -> None:
        self._value, self._error = value, error

    def result(self) -> Any:
        if self._error is not None:
            raise self._error
        return self._value


class SecondarySite(ABC):
    """One secondary storage unit, reached through calls.

    ``key`` identifies the unit (triplets whose B and C share a key are sent
    one batch per call, and prepared/committed with one call). ``up`` tells
    whether the last call reached it.
    """

    key: Hashable
    name: str

    @property
    @abstractmethod
    def up(self) -> bool:
        """Whether the unit answered the last call."""

    @abstractmethod
    def probe(self) -> bool:
        """Ask the unit whether it answers now (one short call); updates
        :attr:`up` and returns it."""

    @abstractmethod
    def setup(self, session: str, pairs: Sequence[tuple[str, str]]) -> list[int]:
        """Make each ``(B, C)`` a PPRC secondary B FlashCopied to C (NOCOPY,
        change recording, target write-inhibited), or find them so already;
        return each C's CG sequence."""

    @abstractmethod
    def apply(self, updates: Sequence[Update], token: str | None = None) -> Pending:
        """Write each update's rows to its B volume as PPRC updates (B's
        write-inhibit and copy-on-write to C apply). ``token`` names the
        call for a ``prepare(after=token)`` sent right behind it."""

    @abstractmethod
    def prepare(self, session: str, sequence: int, after: str | None = None) -> Pending:
        """Revertible resync of every B->C of the session on this unit with
        ``sequence``. Idempotent; refused for a sequence already settled.
        ``after``: sent right behind ``apply(..., token=after)`` without
        waiting for its answer; the unit prepares only if that call wrote
        every update and was its last one."""

    @abstractmethod
    def finish(self, session: str, sequence: int, decision: str) -> Pending:
        """``decision`` "commit" or "revert" of ``sequence`` on this unit,
        recorded with it. Idempotent; the value is what the unit holds now
        ("commit" or "revert"), which differs from ``decision`` only when the
        unit had settled ``sequence`` the other way already."""

    @abstractmethod
    def record_decision(self, session: str, sequence: int, decision: str) -> None:
        """Record the session's decision for ``sequence`` durably (the
        coordinator's record, read back by recovery)."""

    @abstractmethod
    def status(self, session: str) -> dict[str, Any]:
        """What the unit holds: ``fcs``, a list of ``(C name, revertible,
        sequence)``; ``decisions``, ``{sequence: decision}`` recorded for
        the session by the coordinator; ``settled``, ``{sequence: outcome}``
        this unit carried out."""

    @abstractmethod
    def restore_b(self, session: str) -> None:
        """Site-loss recovery: fast-reverse-restore each B from its C (the
        C volumes must be on one settled CG) and let B take host writes.
        Idempotent: a B restored before keeps the host writes it took since."""

    def rejoin(self, session: str, pairs: Sequence[tuple[str, str]],
               min_sequence: int = 0) -> list[int]:
        """A new primary continues ``session``: check the unit serves it
        with exactly the ``(B, C)`` pairs, every C on CG ``min_sequence``
        (what the primary recorded as committed) or a newer one, then hold
        each B as a secondary again (after a site-loss recovery let it take
        host writes); return each C's CG sequence. Raises, changing
        nothing, if the unit's record disagrees."""
        raise NotImplementedError(f"{type(self).__name__} does not serve a resumed session")

    def digests(self, name: str, start: int, stop: int) -> Pending:
        """The digest of each grain ``start``..``stop`` of volume ``name``
        (:func:`~fastfc.storage.volume.grain_digests`): a uint8 array."""
        raise NotImplementedError(f"{type(self).__name__} does not digest its volumes")


class SiteVolume(ABC):
    """A volume of a :class:`SecondarySite` (a proxy): geometry, reads of
    its logical image, and the site it lives on."""

    name: str
    n_tracks: int
    track_size: int
    grain_size: int     # the unit of the bitmaps (see Volume)

    @property
    def n_grains(self) -> int:
        return self.capacity // self.grain_size

    @property
    def capacity(self) -> int:
        return self.n_tracks * self.track_size

    @abstractmethod
    def read(self, offset: int, length: int) -> np.ndarray:
        """The logical image's bytes (a copy)."""

    @abstractmethod
    def site(self) -> SecondarySite:
        """The unit that holds this volume, as a session talks to it."""
