"""The secondary side in this process: B and C volumes in memory or in a
storage unit opened here.

:func:`connect` makes each triplet's Global Copy pair (A->B) and B->C
FlashCopy and groups the triplets by the store of their B and C
(:func:`~fastfc.copyservices.groups.secondary_groups`);
:class:`InProcessSecondary` lets a session drive each
:class:`~fastfc.copyservices.groups.SecondaryGroup` through the
:class:`~fastfc.copyservices.secondary.Secondary` interface. Every call
has ended when it returns (its result is a
:class:`~fastfc.storage.site.Done`).
"""

from __future__ import annotations

from typing import Callable, Iterable, Sequence

from fastfc.copyservices.flashcopy import FlashCopy
from fastfc.copyservices.groups import SecondaryGroup, Triplet, copy_to_c, secondary_groups
from fastfc.copyservices.pprc import PPRCPair
from fastfc.copyservices.secondary import Deadline, Secondary, Status, TimeLeft
from fastfc.errors import AlreadyExistsError, FastFCError
from fastfc.storage.link import Link
from fastfc.storage.site import Done, Pending
from fastfc.storage.volume import Volume

RETRIES = 3                # attempts at one commit/revert before a volume counts as failed

# ended calls, shared (their values never change): a CG step in this process
# makes no call object of its own
_ENDED = Done(None)
_NO_FAILURES = Done(())


class InProcessSecondary(Secondary):
    """A :class:`~fastfc.copyservices.groups.SecondaryGroup` (``group``)
    as a session's :class:`~fastfc.copyservices.secondary.Secondary`.

    The status it reports carries no recorded decisions: a session in this
    process knows what it decided and settles at once, and its rule
    (:func:`~fastfc.copyservices.secondary.plan` without the decisions) ends
    a CG that no relationship committed by reverting, even if "commit" was
    recorded (a commit that failed on every relationship): the tests of the
    session assert that, and the session records the action it takes, so a
    unit reopened later decides the same (``StorageUnit`` reads that
    record)."""

    group: SecondaryGroup

    def __init__(self, group: SecondaryGroup) -> None:
        self.group = group
        self.triplets = group.triplets
        self.store = group.store
        self.journal = group.store if group.store.durable else None
        self.name = group.store.ref or "memory"

    def __repr__(self) -> str:
        return f"<InProcessSecondary {self.group!r}>"

    # -- the drain -------------------------------------------------------------
    def drain(self, deadline: Deadline, time_left: TimeLeft) -> Iterable[tuple[Pending, int]]:
        """The whole drain, now: one call, ended."""
        n = self.group.drain(deadline, time_left)
        return ((_ENDED, n),)

    def end_drain(self, ok: bool) -> None:
        self.group.end_drain(ok)

    # -- the FlashCopy phase -------------------------------------------------------
    def prepare(self, sequence: int, stop_at_failure: bool) -> Pending:
        failure = self.group.prepare_all(sequence, stop_at_failure)
        return _ENDED if failure is None else Done(failure)

    def finish(self, sequence: int, decision: str) -> Pending:
        g = self.group
        failed = g.commit_all() if decision == "commit" else g.revert_all()
        return Done(failed) if failed else _NO_FAILURES

    # -- resolution --------------------------------------------------------------
    def status(self) -> Status:
        return Status([(t.c.name, bool(t.fc.revertible), int(t.fc.sequence))
                       for t in self.triplets])

    def settle(self, sequence: int, action: str) -> Pending:
        """End each relationship still revertible, ``RETRIES`` tries each;
        the value names those that still failed."""
        left = []
        for t in self.triplets:
            fc = t.fc
            if not fc.revertible:
                continue
            for _ in range(RETRIES):
                try:
                    # the step of the session this secondary serves (its name on fc)
                    (fc.commit if action == "commit" else fc.revert)(session=fc.session)
                    break
                except FastFCError:
                    continue
            if fc.revertible:
                left.append(f"{action} of {fc.source.name} failed {RETRIES} times")
        return Done(left)

    def c_sequences(self) -> list[int]:
        return [t.fc.sequence for t in self.triplets]

    # -- between CGs ---------------------------------------------------------------
    def global_copy(self, max_bytes: int) -> int:
        return self.group.global_copy(max_bytes)

    def backlog(self) -> int:
        return self.group.backlog()

    # -- recovery and the end -------------------------------------------------------
    def restore_b(self) -> None:
        for t in self.triplets:
            if t.pair.failed_over and not t.b.is_secondary:
                continue        # restored before: B may hold host writes since
            # B takes host writes only once restored (its flag last)
            t.pair.failover_to_restore()
            t.fc.reverse_restore(session=t.fc.session)
            t.pair.release_secondary()

    def stuck(self) -> list[str]:
        return [t.fc.target.name for t in self.triplets if t.fc.active and t.fc.revertible]

    def tracks_c_needs(self) -> dict[str, int]:
        return {t.c.name: t.fc.tracks_to_copy for t in self.triplets if t.fc.active}

    def close(self, *, discard: bool, on_copy: Callable[[int, int], None] | None) -> None:
        if not discard:
            copy_to_c([t.fc for t in self.triplets], on_copy)
        teardown(self.triplets)


def teardown(triplets: Sequence[Triplet]) -> None:
    """Remove each triplet's pair and (unless still revertible) withdraw its
    B->C relationship."""
    for t in triplets:
        t.fc.session = None         # the session itself ends it
        try:
            if t.fc.active and not t.fc.revertible:
                t.fc.withdraw(force=True)
        finally:
            t.pair.remove()


def connect(triplets: Sequence[tuple[Volume, Volume, Volume]], *, name: str,
            link: Link, initial_copy: bool) -> list[Triplet]:
    """Make each triplet's A->B Global Copy pair over ``link`` and its B->C
    FlashCopy (NOCOPY, change recording, target write-inhibited), after
    checking every volume's unit takes changes and, on a storage unit, that
    every B and C is in one unit with no session ``name`` yet. A refusal
    leaves every volume as it was."""
    vols = [v for t in triplets for v in t]
    if any(not isinstance(v, Volume) for v in vols):
        raise TypeError("every triplet must hold three fastfc.Volume objects")
    if len({id(v) for v in vols}) != len(vols):
        raise ValueError("every volume may appear in a session only once")
    store = triplets[0][1].store
    for v in vols:
        v.store.check_writable()
    if store.durable:
        if any(b.store is not store for _, b, _ in triplets):
            raise ValueError("every B (and C) volume of a session must be in one storage unit")
        if name in store.session_rows():
            raise AlreadyExistsError(f"a session named {name!r} already exists in that unit")
    was_invalid = {id(v): (not v.valid) for v in vols}
    made: list[Triplet] = []
    try:
        for a, b, c in triplets:
            pair = PPRCPair(a, b, link, mode="gcp", background=False,
                            initial_copy=initial_copy)
            try:
                fc = FlashCopy(b, c, background_copy=False, record=True,
                               inhibit_target_write=True, sequence=0)
            except Exception:
                pair.remove()
                raise
            fc.session = name
            made.append(Triplet(a, b, c, pair, fc))
    except Exception:
        teardown(made)
        for t in made:  # nothing was copied: a refused session leaves C as it was
            t.c.set_flags(valid=not was_invalid[id(t.c)])
        raise
    return made


def secondaries(triplets: Sequence[Triplet]) -> list[InProcessSecondary]:
    """The triplets' groups (by the store of B and C), each fixed in its
    durability "power" ordering (fixed when the unit holding B was opened):
    B is written by the ordered drain only, after its barriers, so
    collisions save CG versions in the side file instead of sending them
    at once."""
    groups = secondary_groups(triplets)
    for g in groups:
        g.set_ordered(g.store.durability == "power")
    return [InProcessSecondary(g) for g in groups]
