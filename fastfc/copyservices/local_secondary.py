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
from fastfc.copyservices.pprc import PPRCMode, PPRCPair
from fastfc.copyservices.secondary import Deadline, Secondary, Status, TimeLeft
from fastfc.errors import AlreadyExistsError, FastFCError, StateError
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
        # the relationships the CG did not step follow it (a commit moves them on)
        self.group.flash.settled(sequence, action == "commit")
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
    """Remove each triplet's pair (an adopted one stays, a Global Copy pair
    of its own again) and (unless still revertible) withdraw its B->C
    relationship."""
    for t in triplets:
        t.fc.session = None         # the session itself ends it
        t.fc.sequence = t.fc.sequence     # its own number (no group's cell moves it)
        t.pair.on_sent = None
        try:
            if t.fc.active and not t.fc.revertible:
                t.fc.withdraw(force=True)
        finally:
            if t.adopted:
                t.pair.ordered_drain = False    # a pair of its own drains as it did
            else:
                t.pair.remove()


def connect(triplets: Sequence[tuple[Volume, Volume, Volume]], *, name: str,
            link: Link, initial_copy: bool, adopt: bool = False) -> list[Triplet]:
    """Make each triplet's A->B Global Copy pair over ``link`` and its B->C
    FlashCopy (NOCOPY, change recording, target write-inhibited), after
    checking every volume's unit takes changes and, on a storage unit, that
    every B and C is in one unit with no session ``name`` yet. A refusal
    leaves every volume as it was.

    ``adopt``: a triplet whose A is already the primary of a pair takes that
    pair over (:func:`adoptable` says which pairs qualify, and refuses the
    others): its out-of-sync bitmap carries on (no initial copy: tracks
    already sent are not sent again), its agent stops (the session drives
    it), it moves onto ``link``, and ending the session leaves it."""
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
    # every refusal before anything changes
    taken = [adoptable(a, b) if adopt else None for a, b, _ in triplets]
    was_invalid = {id(v): (not v.valid) for v in vols}
    made: list[Triplet] = []
    moved: list[tuple[PPRCPair, Link, bool]] = []    # adopted: (pair, its link, agent ran)
    try:
        for (a, b, c), old in zip(triplets, taken):
            if old is not None:
                moved.append((old, old.link, old.running))
                old.stop()          # its agent: the session drives it from now on
                old.link = link
                pair = old
            else:
                pair = PPRCPair(a, b, link, mode="gcp", background=False,
                                initial_copy=initial_copy)
            try:
                fc = FlashCopy(b, c, background_copy=False, record=True,
                               inhibit_target_write=True, sequence=0)
            except Exception:
                if old is None:
                    pair.remove()
                raise
            fc.session = name
            made.append(Triplet(a, b, c, pair, fc, adopted=old is not None))
    except Exception:
        teardown(made)
        for t in made:  # nothing was copied: a refused session leaves C as it was
            t.c.set_flags(valid=not was_invalid[id(t.c)])
        for pair, old_link, ran in moved:      # adopted pairs: as they were
            pair.link = old_link
            if ran:
                pair.start()
        raise
    return made


def adoptable(a: Volume, b: Volume) -> PPRCPair | None:
    """The pair A->B a new session over (A, B, C) takes over: None when A is
    the primary of no pair (the session makes one). Refused, naming the
    problem: a pair from A to another volume, a Metro Mirror (synchronous)
    pair, a suspended or failed-over pair (resume it first), a pair that
    already belongs to a Global Mirror session."""
    pair = a.mirror
    if not isinstance(pair, PPRCPair) or not pair.active:
        return None             # a new pair refuses what is wrong (a hook, a secondary)
    ident = f"{a.name}:{b.name}"
    if pair.secondary is not b:
        raise ValueError(f"{a.name} is the primary of pair {a.name}:{pair.secondary.name}, "
                         f"not of {ident}: a session adopts only the pair its triplet names "
                         f"(A:B), or makes one when A is in no pair")
    if pair.mode is not PPRCMode.GLOBAL_COPY:
        raise StateError(f"pair {ident} is Metro Mirror (synchronous): a Global Mirror "
                         "session adopts Global Copy (asynchronous) pairs only; end it and "
                         "make it Global Copy (mkpprc --type gcp), or let the session make "
                         "the pair")
    if pair.failed_over:
        raise StateError(f"pair {ident} is failed over: fail it back first (failbackpprc)")
    if pair.suspend_reason is not None:
        raise StateError(f"pair {ident} is suspended ({pair.suspend_reason}): resume it first "
                         "(resumepprc), then the session adopts it")
    owner = _session_of(pair)
    if owner is not None:
        raise StateError(f"pair {ident} already belongs to Global Mirror session {owner}")
    return pair


def _session_of(pair: PPRCPair) -> str | None:
    """The session ``pair`` belongs to, if any: one recorded by its
    secondary's store, or one whose B->C relationship runs from its B."""
    for sname, cfg in pair.secondary.store.session_rows().items():
        if any(list(t[:3]) == [pair.primary.store.ref, pair.primary.name,
                                pair.secondary.name] for t in cfg["triplets"]):
            return sname
    for fc in pair.secondary.relationships:
        if fc.source is pair.secondary and getattr(fc, "session", None) is not None:
            return fc.session
    return None


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
