"""The seed's resolution rule: how an interrupted consistency group ends.

A CG whose FlashCopy phase did not finish (a commit or revert failed on
some volume, a process died between the decision and the last commit, a
unit was unreachable) leaves some B->C relationships revertible with the
new CG's sequence number, and others committed (carrying it, no longer
revertible) or reverted (carrying the previous one). Every C must end on
one CG. The rule, as IBM documents it for Global Mirror:

- nothing revertible: nothing to do;
- else, for the newest pending sequence ``n``: if any relationship carries
  ``n`` without being revertible, or a unit reports it carried out a commit
  of ``n``, some C already holds the new CG: **commit** the rest;
- else, if a unit reports it reverted ``n``: **revert** the rest;
- else follow the recorded decision for ``n`` ("commit" commits), and
  without one **revert** (no C holds the new CG yet, so reverting keeps
  every C on the prior CG).

One definition, used by the live session (``GlobalMirror``), by a unit
reopened after a crash, by cross-unit reconciliation and by the unit
server of a remote secondary.
"""

from __future__ import annotations

from typing import Iterable, Mapping

NOTHING, COMMIT, REVERT = "nothing", "commit", "revert"


def resolve(relationships: Iterable[tuple[bool, int]], *,
            settled: Iterable[Mapping[int, str]] = (),
            decision: str | None = None) -> tuple[str, int | None]:
    """Decide how an interrupted CG ends.

    ``relationships``: ``(revertible, sequence)`` of every B->C relationship
    of the session (over all units that answer). ``settled``: per unit, the
    outcome it already carried out by sequence (``{sequence: "commit" |
    "revert"}``). ``decision``: the session's recorded decision for the
    pending sequence, if any ("commit" or "revert").

    Returns ``(action, sequence)``: ``("nothing", None)`` when no
    relationship is revertible, else ``("commit" | "revert", n)`` for the
    newest pending sequence ``n``.
    """
    rels = [(bool(rev), int(seq)) for rev, seq in relationships]
    n = pending_sequence(rels)
    if n is None:
        return NOTHING, None
    outcomes = [s.get(n) for s in settled]
    if any(not rev and seq == n for rev, seq in rels) or COMMIT in outcomes:
        return COMMIT, n
    if REVERT in outcomes:
        return REVERT, n
    if decision not in (None, COMMIT, REVERT):
        raise ValueError(f"decision must be 'commit', 'revert' or None, got {decision!r}")
    return (COMMIT if decision == COMMIT else REVERT), n


def group_sequence(relationships: Iterable[tuple[bool, int]], *, recorded: int = 0,
                   decisions: Mapping[int, str] | None = None) -> int:
    """The CG that every settled relationship of a session holds, once
    :func:`resolve` has ended an interrupted one: what a unit reopened
    reads for a relationship that the session's newest CGs did not step.

    A CG steps only the relationships whose B changed (sparse steps); the
    others' records keep the number of their own last step, while their C
    already holds every later CG's image (their B did not change since).
    That number is the newest of: ``recorded``, the session's committed
    sequence recorded with a CG's commit (its counters); the newest CG
    whose recorded decision (``decisions``, by sequence) is "commit" (a
    decision is recorded before anything commits, and overwritten by the
    action a resolution takes); the number a relationship that is not
    revertible carries (it committed that CG).
    """
    top = int(recorded or 0)
    for rev, seq in relationships:
        if not rev and seq > top:
            top = int(seq)
    for seq, decision in (decisions or {}).items():
        if decision == COMMIT and seq > top:
            top = int(seq)
    return top


def pending_sequence(relationships: Iterable[tuple[bool, int]]) -> int | None:
    """The newest sequence a revertible relationship carries (the CG
    :func:`resolve` decides about), None when none is revertible: what a
    caller needs to look up the recorded decision it passes to
    :func:`resolve`."""
    pending = [int(seq) for rev, seq in relationships if rev]
    return max(pending) if pending else None
