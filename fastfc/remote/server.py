"""The secondary unit's side of the remote calls: a durable
:class:`~fastfc.StorageUnit` and the calls a Global Mirror session makes on
it. Thin: every call maps onto the unit's public objects (volumes,
FlashCopy relationships); the protocol lives in
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
sequence). What a unit carried out for a sequence is recorded in its
store's decision table (under ``<session>#unit``) in the same transaction
as the commits or reverts, so a call delivered twice, or after the unit
restarted, finds it and does nothing again; a prepare for a sequence
already settled is refused.
"""

from __future__ import annotations

import json
import os
import uuid
from pathlib import Path
from typing import Any, Callable, Sequence, cast

import numpy as np

from fastfc import _core
from fastfc.copyservices.flashcopy import FlashCopy
from fastfc.durable.sqlite import SQLiteStore
from fastfc.durable.unit import StorageUnit
from fastfc.errors import FastFCError, FencedError, StateError

EPOCH_FILE = "remote.epoch"
SESSIONS_FILE = "remote.sessions.json"
UNIT_KEY = "#unit"      # decision rows: what this unit carried out
COORD_KEY = "#coord"    # decision rows: the session's recorded decision


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
    kill_point : callable, optional
        ``kill_point(where, i)`` called inside ``apply``/``prepare``/``finish``
        before the i-th volume's step (crash tests stop the world there).

    One thread at a time (a Ray actor runs its calls one by one; the
    in-process transport calls it from the session's thread).
    """

    def __init__(self, path: str | os.PathLike, *,
                 kill_point: Callable[[str, int], None] | None = None) -> None:
        self.path = Path(path).resolve()
        self.unit = StorageUnit(self.path)      # the OS lock: one owner per directory
        try:
            self.epoch = _read_epoch(self.path) + 1
            # the epoch names the owner with a token of its own: two servers
            # that opened the unit at once (hosts that do not share the OS
            # lock) and read the same epoch still tell each other apart
            self._owner = f"{self.epoch} {uuid.uuid4().hex}"
            _write_atomic(self.path / EPOCH_FILE, self._owner)
            self._sessions: dict[str, list[list[str]]] = self._load_sessions()
        except BaseException:
            self.unit.close()
            raise
        self.kill_point = kill_point
        self.store = cast(SQLiteStore, self.unit.store)

    # -- plumbing ------------------------------------------------------------
    def _fence(self) -> None:
        owner = _read_owner(self.path)
        if owner != self._owner:
            now = owner.split(" ")[0]
            raise FencedError(f"unit {self.path} is owned by epoch {now}; this server "
                              f"(epoch {self.epoch}) was replaced and refuses every call")

    def _load_sessions(self) -> dict[str, list[list[str]]]:
        try:
            return dict(json.loads((self.path / SESSIONS_FILE).read_text()))
        except FileNotFoundError:
            return {}

    def _point(self, where: str, i: int) -> None:
        if self.kill_point is not None:
            self.kill_point(where, i)

    def _fcs(self, session: str) -> list[FlashCopy]:
        try:
            pairs = self._sessions[session]
        except KeyError:
            raise StateError(f"unit {self.path} holds no session {session!r}") from None
        out = []
        for b, c in pairs:
            rel = self.unit.volume(c)._tgt_rel
            if not isinstance(rel, FlashCopy) or rel.source is not self.unit.volume(b):
                raise StateError(f"unit {self.path}: {b}->{c} has no FlashCopy")
            out.append(rel)
        return out

    def _settled(self, session: str, sequence: int) -> str | None:
        return self.store.decision(session + UNIT_KEY, sequence)

    # -- calls: volumes --------------------------------------------------------
    def info(self) -> dict[str, Any]:
        self._fence()
        return {"epoch": self.epoch, "pid": os.getpid(), "path": str(self.path)}

    def create_volume(self, name: str, n_tracks: int, track_size: int) -> tuple[str, int, int]:
        self._fence()
        v = self.unit.create_volume(name, n_tracks, track_size)
        return v.name, v.n_tracks, v.track_size

    def volume(self, name: str) -> tuple[str, int, int]:
        self._fence()
        v = self.unit.volume(name)
        return v.name, v.n_tracks, v.track_size

    def read(self, name: str, offset: int, length: int) -> np.ndarray:
        self._fence()
        return self.unit.volume(name).read(offset, length)

    # -- calls: a session ------------------------------------------------------
    def setup(self, session: str, pairs: Sequence[tuple[str, str]]) -> list[int]:
        """Make (or find) each B->C of ``session``; return C's sequences."""
        self._fence()
        names = [[str(b), str(c)] for b, c in pairs]
        known = self._sessions.get(session)
        if known is not None and known != names:
            raise ValueError(f"unit {self.path} holds session {session!r} with other "
                             f"volumes ({known}); remove it first or use another name")
        vols = [(self.unit.volume(b), self.unit.volume(c)) for b, c in names]
        seqs = []
        for b, c in vols:
            rel = c._tgt_rel
            if known is not None and isinstance(rel, FlashCopy) and rel.source is b:
                seqs.append(rel.sequence)
                continue
            if b._mirror is not None or b._secondary or b._src_rels or b._tgt_rel \
                    or c._tgt_rel is not None or c._src_rels:
                raise ValueError(f"{b.name} and {c.name} of unit {self.path} must be free "
                                 "volumes (no pair, no FlashCopy) to join a session")
        if known is None:
            # the session's list first: a crash after the relationships
            # were made must find them the session's when set up again
            # (with the list written after, they were volumes in use)
            self._sessions[session] = names
            _write_atomic(self.path / SESSIONS_FILE, json.dumps(self._sessions))
        try:
            with self.unit.store.transaction():
                for b, c in vols:
                    if known is not None and isinstance(c._tgt_rel, FlashCopy):
                        continue
                    FlashCopy(b, c, background_copy=False, record=True,
                              inhibit_target_write=True, sequence=0)
                    b._secondary = True
                    self.unit.store.set_volume_flags(b.flags_record())
                    seqs.append(0)
        except Exception:
            if known is None:       # refused: the session is not this unit's
                del self._sessions[session]
                _write_atomic(self.path / SESSIONS_FILE, json.dumps(self._sessions))
            raise
        return seqs

    def apply(self, updates: Sequence[tuple[str, np.ndarray, np.ndarray]]) -> int:
        """PPRC updates: for each ``(name, offsets, rows)``, ``rows[i]`` to
        volume ``name`` at ``offsets[i]`` (one locked batch per piece).
        Returns bytes written."""
        self._fence()
        vols = self.unit._volumes
        n = 0
        for i, (name, offsets, rows) in enumerate(updates):
            self._point("apply", i)
            vols[name].write_batch(offsets, rows, _core.PPRC)
            n += rows.size
        return n

    def prepare(self, session: str, sequence: int) -> str:
        """Revertible resync of the session's B->C with ``sequence``, one
        durable commit. Refused (nothing left prepared) if a relationship
        refuses; "prepared" when done or already so."""
        self._fence()
        settled = self._settled(session, sequence)
        if settled is not None:
            raise StateError(f"CG {sequence} of {session!r} was settled ({settled}) "
                             f"on unit {self.path}: not prepared again")
        fcs = self._fcs(session)
        if all(fc.revertible and fc.sequence == sequence for fc in fcs):
            return "prepared"
        done: list[FlashCopy] = []
        try:
            with self.unit.store.transaction():
                for i, fc in enumerate(fcs):
                    self._point("prepare", i)
                    if fc.revertible and fc.sequence == sequence:
                        continue
                    fc._resync(revertible=True, sequence=sequence)
                    done.append(fc)
        except FastFCError:
            with self.unit.store.transaction(sync=False):
                for fc in done:
                    if fc.revertible:
                        fc._end_revertible("revert")
            raise
        return "prepared"

    def finish(self, session: str, sequence: int, decision: str) -> str:
        """Carry out ``decision`` for ``sequence`` and record it; returns what
        the unit holds for the sequence ("commit" or "revert")."""
        self._fence()
        if decision not in ("commit", "revert"):
            raise ValueError(f"decision must be 'commit' or 'revert', got {decision!r}")
        settled = self._settled(session, sequence)
        if settled is not None:
            return settled
        fcs = self._fcs(session)
        pending = [fc for fc in fcs if fc.revertible and fc.sequence == sequence]
        if not pending:
            # nothing prepared here: what the relationships carry says it
            outcome = "commit" if any(fc.sequence == sequence for fc in fcs) else "revert"
        else:
            outcome = decision
        with self.unit.store.transaction(sync=False):
            for i, fc in enumerate(pending):
                self._point("finish", i)
                fc._end_revertible("commit" if outcome == "commit" else "revert")
            self.unit.store.cg_decision(session + UNIT_KEY, sequence, outcome)
        return outcome

    def record_decision(self, session: str, sequence: int, decision: str) -> None:
        self._fence()
        self.unit.store.cg_decision(session + COORD_KEY, sequence, decision)

    def status(self, session: str) -> dict[str, Any]:
        self._fence()
        fcs = self._fcs(session)
        q = self.store.query
        return {"epoch": self.epoch,
                "fcs": [(fc.target.name, bool(fc.revertible), int(fc.sequence)) for fc in fcs],
                "decisions": dict(q("SELECT sequence, decision FROM decisions WHERE session=?",
                                    (session + COORD_KEY,))),
                "settled": dict(q("SELECT sequence, decision FROM decisions WHERE session=?",
                                  (session + UNIT_KEY,)))}

    def restore_b(self, session: str) -> None:
        """Fast-reverse-restore each B of ``session`` from its C and let B
        take host writes. Idempotent: a B restored before (which may hold
        host writes since) is left alone."""
        self._fence()
        fcs = self._fcs(session)
        if any(fc.revertible for fc in fcs) or len({fc.sequence for fc in fcs}) > 1:
            raise StateError(f"unit {self.path}: the C volumes of {session!r} are not on "
                             "one settled CG; recover the session first")
        for fc in fcs:
            b = fc.source
            if not b._secondary:
                continue        # restored already: B may hold host writes since
            # restore first, then let B take host writes: a crash between
            # the two restores again (B took no writes yet)
            fc._reverse_restore()
            b._secondary = False
            self.unit.store.set_volume_flags(b.flags_record())

    def close(self) -> None:
        self.unit.close()
