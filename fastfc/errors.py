"""The fastfc exception hierarchy.

Bad arguments raise the builtin that fits (``ValueError``, ``TypeError``,
``IndexError``). Everything about *state* (a write that is inhibited, a
relationship that is not revertible, a limit reached, a closed volume) raises
a subclass of :class:`FastFCError`. Every refused call changes nothing.
"""

from __future__ import annotations


class FastFCError(Exception):
    """Root of every fastfc protocol error."""


class VolumeClosedError(FastFCError):
    """I/O or a copy service was asked of a volume that has been closed."""


class WriteInhibitedError(FastFCError):
    """A write was refused: PPRC secondary, revertible FlashCopy source,
    or a FlashCopy target with ``inhibit_target_write``."""


class StateError(FastFCError):
    """A relationship, pair or session is in the wrong state for the call."""


class IncompleteCopyError(StateError):
    """Withdraw of a relationship whose target is not fully copied yet."""


class LimitError(FastFCError):
    """A configuration limit was reached (targets per source, cascading...)."""


class InvalidImageError(FastFCError):
    """A read of a target whose relationship was withdrawn before its copy
    completed: the target no longer holds a valid point-in-time image."""


class InjectedFault(FastFCError):
    """A failure raised on purpose by the fault-injection API."""


class LinkDownError(FastFCError):
    """A PPRC link is failed; the update was not delivered."""


class CorruptUnitError(FastFCError):
    """A storage unit's metadata or volume files are missing or damaged."""


class UnitClosedError(StateError):
    """A call on a storage unit (or a relationship, pair or session recorded
    in one) after the unit was closed."""


class UnitBusyError(StateError):
    """A storage unit is open elsewhere: read-write by another process (or
    already in this one), or read-only by other processes when a writer asks.
    The message names the holder."""


class ReadOnlyUnitError(FastFCError):
    """A change was asked of a storage unit opened with ``readonly=True``."""


class DrainAborted(FastFCError):
    """A consistency-group drain stopped before every track was sent."""


class AlreadyExistsError(FastFCError, ValueError):
    """A volume or a session of that name already exists in the unit. Also a
    ``ValueError``, as this refusal was before it had a class of its own."""


class UnitDownError(FastFCError):
    """A secondary unit does not answer: its process died, was killed, or a
    call to it timed out. Start it again (``SecondaryUnit.start``)."""


class FencedError(FastFCError):
    """A unit's server was replaced by a newer owner (a higher epoch): the
    old one refuses every call."""


class NoSpaceError(FastFCError):
    """The filesystem holding a volume, a bitmap or a unit's database has no
    room for the blocks a call needs. The call changed nothing: a create
    leaves no file and no row behind, and a write to a thin volume is refused
    before any byte lands or any bitmap changes. Free space (or grow the
    filesystem) and retry."""


__all__ = [
    "FastFCError",
    "VolumeClosedError",
    "WriteInhibitedError",
    "StateError",
    "IncompleteCopyError",
    "LimitError",
    "InvalidImageError",
    "InjectedFault",
    "LinkDownError",
    "CorruptUnitError",
    "UnitClosedError",
    "UnitBusyError",
    "ReadOnlyUnitError",
    "NoSpaceError",
    "DrainAborted",
    "AlreadyExistsError",
    "UnitDownError",
    "FencedError",
]


class ImmutablePointError(FastFCError):
    """An attempt to change a recovery point before it expires: a write to
    it, a retention made shorter, or an expiry it is not due for (its
    retention runs, or a restore still reads through it)."""
