"""The secondary side of a Global Mirror session, as the session drives it.

A session (:class:`~fastfc.copyservices.globalmirror.GlobalMirror`) groups
its triplets by the unit holding their B and C volumes; each group is a
:class:`Secondary`. The session runs every phase of a consistency group
over its groups through this small interface, whatever holds them:

* in this process (memory or a storage unit):
  :class:`~fastfc.copyservices.local_secondary.InProcessSecondary`, over a
  :class:`~fastfc.copyservices.groups.SecondaryGroup`;
* through calls (a remote unit):
  :class:`~fastfc.copyservices.sitemirror.SiteGroup`, over the calls of a
  :class:`~fastfc.storage.site.SecondarySite`.

Calls that may travel return :class:`~fastfc.storage.site.Pending`
results, so the session keeps one call in flight on every unit at once; in
this process they are :class:`~fastfc.storage.site.Done` already.

The resolution of an interrupted CG across groups (:func:`resolve_groups`)
reads every group's :class:`Status` and decides by the seed's rule
(:func:`fastfc.copyservices.resolution.resolve`).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Sequence

from fastfc.copyservices.resolution import COMMIT, NOTHING, REVERT, pending_sequence, resolve
from fastfc.errors import FastFCError
from fastfc.storage.site import Pending
from fastfc.storage.store import Store

#: ``deadline()``: whether the drain's time limit passed; ``time_left()``: seconds left
Deadline = Callable[[], bool] | None
TimeLeft = Callable[[], float] | None


@dataclass
class Status:
    """What a group's unit holds for the session.

    ``relationships``: ``(C name, revertible, sequence)`` of each B->C
    relationship; ``settled``: ``{sequence: outcome}`` the unit carried out;
    ``decisions``: ``{sequence: decision}`` the unit recorded for the
    session (the coordinator's record, read back by reconciliation)."""

    relationships: list[tuple[str, bool, int]]
    settled: dict[int, str] = field(default_factory=dict)
    decisions: dict[int, str] = field(default_factory=dict)


class Secondary(ABC):
    """The B and C volumes of a group of triplets on one unit.

    ``triplets`` are the group's triplets (``a``, ``b``, ``c``, ``pair``;
    ``fc`` in this process), in session order. ``store`` is the store a
    session of these groups records itself in and opens its transactions
    on; ``journal`` the default recorder of its decisions (None: none).
    ``inflight_bytes`` bounds the drain's unanswered calls, all groups
    together (the smallest of them counts). ``group`` is what the session
    shows of it (``GlobalMirror.groups``). ``reconcile_first``: the unit may
    hold a CG in doubt when a session starts (it restarts on its own), so
    the session reads every unit before its first CG.
    """

    name: str
    triplets: list
    store: Store
    group: Any
    journal: Any = None
    inflight_bytes: int = 1 << 62
    reconcile_first: bool = False

    # -- the drain -------------------------------------------------------------
    @abstractmethod
    def drain(self, deadline: Deadline, time_left: TimeLeft) -> Iterable[tuple[Pending, int]]:
        """Send the CG's tracks to B: ``(call, bytes)`` per call sent, as
        the session iterates (a unit reached by calls sends one batch per
        step, so the session interleaves the units; what the call itself
        does comes first, for every unit before any sends). Raises
        :class:`~fastfc.errors.DrainAborted` past the deadline, or what the
        transport raises."""

    def prepare_behind_drain(self, sequence: int) -> None:
        """Ask for the next drain to send the prepare of CG ``sequence``
        right behind its last batch (a unit reached by calls; nothing here
        by default): :meth:`prepare` then answers that call, and a failed
        drain (:meth:`end_drain`) reverts it."""

    @abstractmethod
    def end_drain(self, ok: bool) -> None:
        """Close the CG of every pair (a failed drain gives its tracks back)."""

    # -- the FlashCopy phase -------------------------------------------------------
    @abstractmethod
    def prepare(self, sequence: int, stop_at_failure: bool) -> Pending:
        """Prepare every B->C revertibly with ``sequence``; the value is
        None, or what failed (a message)."""

    @abstractmethod
    def finish(self, sequence: int, decision: str) -> Pending:
        """Commit or revert what :meth:`prepare` prepared. The value is the
        relationships' failures (messages; empty when all ended); the call
        raises when the unit did not carry it out (did not answer, or
        holds the other outcome): then the CG is in doubt there."""

    # -- resolution --------------------------------------------------------------
    @abstractmethod
    def status(self) -> Status:
        """What the unit holds (raises when it does not answer)."""

    @abstractmethod
    def settle(self, sequence: int, action: str) -> Pending:
        """The resolution's step: end every relationship still revertible
        with ``sequence`` by ``action``. The value is what still failed
        (messages); the call raises as :meth:`finish` does."""

    @abstractmethod
    def c_sequences(self) -> list[int]:
        """The CG sequence each C carries, in triplet order."""

    # -- between CGs ---------------------------------------------------------------
    @abstractmethod
    def global_copy(self, max_bytes: int) -> int:
        """Global Copy of out-of-sync tracks (up to ``max_bytes`` per pair); bytes sent."""

    @abstractmethod
    def backlog(self) -> int:
        """Out-of-sync tracks of the group's pairs."""

    # -- recovery and the end -------------------------------------------------------
    @abstractmethod
    def restore_b(self) -> None:
        """Site recovery: fail the pairs over and fast-reverse-restore each B
        from its C (the C volumes on one settled CG). Idempotent."""

    @abstractmethod
    def close(self, *, discard: bool, on_copy: Callable[[int, int], None] | None) -> None:
        """End the group's part of the session (the pairs, and what the unit
        ends with them)."""

    def stuck(self) -> list[str]:
        """C volumes whose relationship is still revertible (what ``close``
        without ``discard`` refuses), as far as this process knows."""
        return []

    def tracks_c_needs(self) -> dict[str, int]:
        """Per C (by name), the tracks it still reads from its B."""
        return {}


@dataclass
class Resolution:
    """What :func:`resolve_groups` did: ``action`` ("nothing", "commit" or
    "revert") for CG ``sequence``; ``top``, the highest sequence any unit
    carries, settled or recorded; ``errors``, what was not settled."""

    action: str
    sequence: int
    top: int
    errors: list[str]


def plan(statuses: Sequence[Status], *, consult_decisions: bool) -> tuple[str, int | None]:
    """The seed's rule over the statuses of every group
    (:func:`~fastfc.copyservices.resolution.resolve`). With
    ``consult_decisions`` the decision the units recorded for the pending
    sequence counts (a commit recorded and carried out nowhere yet is
    finished by committing); without it, a CG no relationship committed is
    reverted."""
    rels = [(rev, seq) for st in statuses for (_, rev, seq) in st.relationships]
    decision = None
    n = pending_sequence(rels)
    if consult_decisions and n is not None:
        recorded = {st.decisions.get(n) for st in statuses}
        decision = COMMIT if COMMIT in recorded else REVERT if REVERT in recorded else None
    return resolve(rels, settled=[st.settled for st in statuses], decision=decision)


def resolve_groups(groups: Sequence[Secondary], record: Callable[[int, str], None] | None,
                   *, consult_decisions: bool = True) -> Resolution:
    """End every C of a session on one CG: read every group's
    :class:`Status` (raises if one does not answer: nothing is decided
    then), decide by :func:`plan`, record the action (``record(sequence,
    action)``) and settle every group with it, all groups at once. The
    errors of groups that did not settle are returned, not raised."""
    statuses = [g.status() for g in groups]
    top = max([0] + [int(q) for st in statuses for (_, _, q) in st.relationships]
              + [int(q) for st in statuses for q in st.settled]
              + [int(q) for st in statuses for q in st.decisions])
    action, n = plan(statuses, consult_decisions=consult_decisions)
    if action == NOTHING or n is None:
        newest = max((q for st in statuses for (_, _, q) in st.relationships), default=0)
        return Resolution(NOTHING, newest, top, [])
    if record is not None:
        record(n, action)
    calls = [g.settle(n, action) for g in groups]
    errors: list[str] = []
    for g, call in zip(groups, calls):
        try:
            errors += call.result()
        except FastFCError as e:
            errors.append(f"{g.name}: {type(e).__name__}: {e}")
    return Resolution(action, n, top, errors)
