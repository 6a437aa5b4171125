"""The secondary unit's side of the remote calls: a durable
:class:`~fastfc.StorageUnit` and the calls a Global Mirror session makes on
it. Thin: every call maps onto the unit's public calls (volumes, the
sessions it serves, their CG records) and the FlashCopy phase is the shared
step (:class:`~fastfc.copyservices.groups.FlashCopyGroup`), as in a session
whose B and C live in its own process; the protocol lives in
:mod:`fastfc.copyservices.sitemirror`.

The same :class:`UnitServer` runs inside a Ray actor
(:mod:`fastfc.remote.rayunit`) and in-process (:mod:`fastfc.remote.local`).

**Fencing.** Opening takes the unit's OS lock (``unit.lock``) and then
increments the epoch in ``remote.epoch``, with a token of this server's own
(written and fsynced before the server answers any call). Every call first
checks that the file still holds this server's epoch and token: a worker
orphaned by a lost node, whose replacement opened the unit since, refuses
every call with :class:`FencedError` rather than write. (The check precedes
the call's work: a call already running when the replacement opens the
unit finishes.)

**Idempotence.** ``prepare``, ``finish`` are keyed by (session, CG
sequence). What a unit carried out for a sequence is recorded in unit.db
(:meth:`~fastfc.StorageUnit.record_cg_outcome`) in the same transaction
as the commits or reverts, so a call delivered twice, or after the unit
restarted, finds it and does nothing again; a prepare for a sequence
already settled is refused.

**Session membership** (each session's B->C pairs) lives in unit.db too
(:meth:`~fastfc.StorageUnit.serve_session`); a unit written when it was
kept in a file beside unit.db moves it into the table when opened.
"""

from __future__ import annotations

import os
import uuid
from contextlib import contextmanager
from functools import partial
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import numpy as np

from fastfc import faults
from fastfc.copyservices.flashcopy import FlashCopy
from fastfc.copyservices.groups import FlashCopyGroup
from fastfc.copyservices.resolution import COMMIT, NOTHING, REVERT, resolve
from fastfc.durable.unit import DURABILITY, StorageUnit
from fastfc.errors import FastFCError, FencedError, StateError
from fastfc.storage.volume import grain_digests

EPOCH_FILE = "remote.epoch"


def check_durability(durability: str) -> None:
    """ValueError naming the levels unless ``durability`` is one of
    :data:`~fastfc.durable.unit.DURABILITY` (checked before a unit starts)."""
    if durability not in DURABILITY:
        raise ValueError(f"durability must be one of {', '.join(DURABILITY)}, "
                         f"got {durability!r}")


class KilledHere(BaseException):
    """Raised by an in-process kill point: the server is gone (a crash);
    not an error a caller handles."""


def _read_owner(path: Path) -> str:
    """The epoch file's text: ``"<epoch> <token>"`` of the unit's owner."""
    try:
        return (path / EPOCH_FILE).read_text().strip()
    except FileNotFoundError:
        return ""


def _read_epoch(path: Path) -> int:
    return int(_read_owner(path).split(" ")[0] or 0)


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


class UnitServer:
    """A storage unit serving a session's calls.

    Parameters
    ----------
    path : str or os.PathLike
        The unit's directory (created if missing).
    durability : {"process", "power"}
        The unit's (:class:`~fastfc.StorageUnit`'s ``durability``). At
        ``"power"`` every call that changes B or C runs the unit's ordered
        path: ``apply`` makes the tracks it overwrites overwritable first
        (:meth:`StorageUnit.apply_updates`: C's copies of the old tracks
        and the bitmaps, each synced in order) and syncs B before it
        answers; ``prepare`` syncs the prepared bitmaps, then commits with
        an fsync before it answers; ``record_decision`` and ``finish``
        are fsynced before they answer (a unit that lost an answered commit
        would hold a CG in doubt older than the one the others prepared
        since). So a power cut of the unit at any instant leaves
        every C on one CG once the units are reconciled.
    kill_point : callable, optional
        ``kill_point(where, i)`` called inside ``apply``/``prepare``/``finish``
        before the i-th step (crash tests stop the world there): the i-th
        update of ``apply``; in ``prepare`` and ``finish``, before the
        FlashCopy step of the session's i-th relationship (the engine's
        ``prepare``/``commit``/``revert`` fault point of its B, reached
        inside the shared step).
    kill_armed : callable, optional
        ``kill_armed(where)``: whether ``kill_point`` may act inside a
        ``where`` call now; ``prepare`` and ``finish`` arm their stop points
        (engine faults) only then. None: whenever there is a kill point.

    One thread at a time (a Ray actor runs its calls one by one; the
    in-process transport calls it from the session's thread).
    """

    def __init__(self, path: str | os.PathLike, *, durability: str = "process",
                 kill_point: Callable[[str, int], None] | None = None,
                 kill_armed: Callable[[str], bool] | None = None) -> None:
        self.path = Path(path).resolve()
        # the OS lock: one owner per directory
        self.unit = StorageUnit(self.path, durability=durability)
        self.durability = durability
        try:
            self.epoch = _read_epoch(self.path) + 1
            # the epoch names the owner with a token of its own: two servers
            # that opened the unit at once (hosts that do not share the OS
            # lock) and read the same epoch still tell each other apart
            self._owner = f"{self.epoch} {uuid.uuid4().hex}"
            _write_atomic(self.path / EPOCH_FILE, self._owner)
        except BaseException:
            self.unit.close()
            raise
        self.kill_point = kill_point
        self.kill_armed = kill_armed
        # per session: the token of its last apply, if that wrote every update
        self._applied: dict[str, str] = {}

    # -- plumbing ------------------------------------------------------------
    def _fence(self) -> None:
        owner = _read_owner(self.path)
        if owner != self._owner:
            now = owner.split(" ")[0]
            raise FencedError(f"unit {self.path} is owned by epoch {now}; this server "
                              f"(epoch {self.epoch}) was replaced and refuses every call")

    def _point(self, where: str, i: int) -> None:
        if self.kill_point is not None:
            self.kill_point(where, i)

    @contextmanager
    def _stop_points(self, where: str, point: str, fcs: Sequence[FlashCopy]) -> Iterator[None]:
        """While the shared FlashCopy step runs: ``kill_point(where, i)``
        just before the step of ``fcs[i]`` (at the engine's fault ``point``
        of its B, before anything of it changes). Nothing is armed without a
        kill point, or while ``kill_armed`` says it would not act."""
        if self.kill_point is None or (self.kill_armed is not None
                                       and not self.kill_armed(where)):
            yield
            return
        armed = [faults.inject(point, fc.source, action=partial(self._point, where, i))
                 for i, fc in enumerate(fcs)]
        try:
            yield
        finally:
            for f in armed:
                faults.disarm(f)

    # -- calls: volumes --------------------------------------------------------
    def info(self) -> dict[str, Any]:
        self._fence()
        return {"epoch": self.epoch, "pid": os.getpid(), "path": str(self.path),
                "durability": self.durability}

    def create_volume(self, name: str, n_tracks: int, track_size: int,
                      grain_size: int | None = None) -> tuple[str, int, int, int]:
        self._fence()
        v = self.unit.create_volume(name, n_tracks, track_size, grain_size=grain_size)
        return v.name, v.n_tracks, v.track_size, v.grain_size

    def volume(self, name: str) -> tuple[str, int, int, int]:
        self._fence()
        v = self.unit.volume(name)
        return v.name, v.n_tracks, v.track_size, v.grain_size

    def read(self, name: str, offset: int, length: int) -> np.ndarray:
        self._fence()
        return self.unit.volume(name).read(offset, length)

    # -- calls: a session ------------------------------------------------------
    def setup(self, session: str, pairs: Sequence[tuple[str, str]]) -> list[int]:
        """Make (or find) each B->C of ``session``; return C's sequences
        (:meth:`StorageUnit.serve_session`)."""
        self._fence()
        return self.unit.serve_session(session, [(str(b), str(c)) for b, c in pairs])

    def apply(self, updates: Sequence[tuple[str, np.ndarray, np.ndarray]],
              token: str | None = None) -> int:
        """PPRC updates: for each ``(name, offsets, rows)``, ``rows[i]`` to
        volume ``name`` at ``offsets[i]`` (one locked batch per piece).
        Returns bytes written. ``token`` (``"<session>/<sequence>/<nonce>"``)
        names the batch, for a ``prepare(..., after=token)`` sent right
        behind it (it prepares only if this call wrote every update). The
        last token is kept per session, so another session's batches in
        between do not matter; a call that fails forgets every one."""
        key = None if token is None else token.rsplit("/", 2)[0]
        if key is not None:
            self._applied.pop(key, None)
        try:
            self._fence()
            n = self.unit.apply_updates(updates, before=partial(self._point, "apply"))
        except BaseException:
            self._applied.clear()
            raise
        if key is not None and token is not None:
            self._applied[key] = token
        return n

    def prepare(self, session: str, sequence: int, after: str | None = None) -> str:
        """Revertible resync of the session's B->C with ``sequence`` (the
        shared step, :meth:`FlashCopyGroup.prepare_all`), one durable commit.
        Refused (nothing left prepared) if a relationship refuses;
        "prepared" when done or already so.

        ``after``: the token of the drain's last batch, sent just before
        this call without waiting for its answer (the prepare rides behind
        the drain). Refused, changing nothing, unless that ``apply`` is the
        session's last one this server carried out and it wrote every update
        (one that failed, a later batch of the session, or a server started
        since: refused). Ray runs one caller's calls in order; the token
        makes a prepare that overtook its batch refuse all the same."""
        self._fence()
        if after is not None and self._applied.get(after.rsplit("/", 2)[0]) != after:
            raise FastFCError(f"unit {self.path}: the drain's last batch ({after}) was not "
                              f"written whole here; CG {sequence} not prepared")
        settled = self.unit.cg_outcome(session, sequence)
        if settled is not None:
            raise StateError(f"CG {sequence} of {session!r} was settled ({settled}) "
                             f"on unit {self.path}: not prepared again")
        fcs = self.unit.served_flashcopies(session)
        todo = [fc for fc in fcs if not (fc.revertible and fc.sequence == sequence)]
        if not todo:
            return "prepared"
        group = FlashCopyGroup(self.unit.store, todo)
        # durability "power": the prepared bitmaps synced before the commit
        # (B's data was synced by each apply before it answered)
        group.ordered = self.durability == "power"
        with self._stop_points("prepare", "prepare", fcs):
            with self.unit.store.transaction():
                failure = group.prepare_all(sequence, stop_at_failure=True)
            if failure is not None:
                with self.unit.store.transaction(sync=False):
                    group.revert_all()
                raise FastFCError(f"unit {self.path}: {failure}")
        return "prepared"

    def finish(self, session: str, sequence: int, decision: str) -> str:
        """Carry out ``decision`` for ``sequence`` and record it; returns what
        the unit holds for the sequence ("commit" or "revert"). What a
        sequence ends as here follows the seed's rule
        (:func:`~fastfc.copyservices.resolution.resolve`) over this unit's
        relationships and the session's decision."""
        self._fence()
        if decision not in (COMMIT, REVERT):
            raise ValueError(f"decision must be 'commit' or 'revert', got {decision!r}")
        settled = self.unit.cg_outcome(session, sequence)
        if settled is not None:
            return settled
        fcs = self.unit.served_flashcopies(session)
        pending = [fc for fc in fcs if fc.revertible and fc.sequence == sequence]
        waiting = {id(fc) for fc in pending}
        action, _ = resolve([(id(fc) in waiting, fc.sequence) for fc in fcs], decision=decision)
        if action == NOTHING:
            # nothing prepared here: what the relationships carry says it
            outcome = COMMIT if any(fc.sequence == sequence for fc in fcs) else REVERT
        else:
            outcome = action
        group = FlashCopyGroup(self.unit.store, pending)
        group.prepared = list(pending)
        with self._stop_points("finish", outcome, pending):
            # fsynced at durability "power" (no fsync at "process"): once
            # answered, the session may prepare the next CG on the other
            # units, and a unit that lost this commit would hold a CG in
            # doubt older than theirs, which reconciling cannot settle
            with self.unit.store.transaction(sync=True):
                errors = group.commit_all() if outcome == COMMIT else group.revert_all()
                if not errors:
                    self.unit.record_cg_outcome(session, sequence, outcome)
        if errors:
            raise FastFCError(f"unit {self.path}: CG {sequence} of {session!r} not "
                              f"carried out on every volume: {'; '.join(errors)}")
        return outcome

    def record_decision(self, session: str, sequence: int, decision: str) -> None:
        self._fence()
        self.unit.record_cg_decision(session, sequence, decision)

    def status(self, session: str) -> dict[str, Any]:
        self._fence()
        fcs = self.unit.served_flashcopies(session)
        return {"epoch": self.epoch,
                "fcs": [(fc.target.name, bool(fc.revertible), int(fc.sequence)) for fc in fcs],
                "decisions": self.unit.cg_decisions(session),
                "settled": self.unit.cg_outcomes(session)}

    def rejoin(self, session: str, pairs: Sequence[tuple[str, str]],
               min_sequence: int = 0) -> list[int]:
        """A new primary continues ``session``: check the unit serves it
        with exactly ``pairs``, no C older than ``min_sequence``, and hold
        each B as a secondary again
        (:meth:`StorageUnit.rejoin_served_session`); C's sequences."""
        self._fence()
        return self.unit.rejoin_served_session(session, [(str(b), str(c)) for b, c in pairs],
                                               int(min_sequence))

    def digests(self, name: str, start: int, stop: int) -> np.ndarray:
        """The digest of each grain ``start``..``stop`` of volume ``name``
        (:func:`~fastfc.storage.volume.grain_digests`)."""
        self._fence()
        return grain_digests(self.unit.volume(name), int(start), int(stop))

    def restore_b(self, session: str) -> None:
        """Fast-reverse-restore each B of ``session`` from its C and let B
        take host writes (:meth:`StorageUnit.restore_served_secondaries`).
        Idempotent: a B restored before (which may hold host writes since)
        is left alone."""
        self._fence()
        self.unit.restore_served_secondaries(session)

    def close(self) -> None:
        self.unit.close()

    def abandon(self) -> None:
        """Drop the unit as a crash would (:meth:`StorageUnit.abandon`)."""
        self.unit.abandon()
