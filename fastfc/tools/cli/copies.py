"""Copies that run in a server: the background copy of COPY-mode FlashCopy
relationships and the drain of PPRC pairs (initial copy, resync, Global
Copy), moving on inside ``fastfc serve`` with no foreground command.

Outside a server nothing copies between commands (a command's process
ends, and its worker threads with it): a relationship or pair left with
work to do waits for the next server, or for a command that copies in the
foreground (``waitflash``, ``--wait``). :func:`moved_on_by` says which, for
the commands to print.

In a server, :class:`CopyDrivers` starts the work of every such copy of the
units it holds: when the server opens them (those the units restore) and
after each forwarded command that may have changed them (``mkflash``,
``mkpprc``, ``resumepprc``, ``failbackpprc``, ``resyncflash``,
``commitflash``, a unit a command opened), through
:meth:`~fastfc.tools.cli.units.Units.close`. A FlashCopy copies on its own
worker (:meth:`FlashCopy.start_background`, at its ``copy_rate``); a pair
drains on its agent (:meth:`PPRCPair.start`). The pairs and relationships
of Global Mirror sessions are left alone: a session's loop drives them
(its pairs' tracks are sent only as consistency groups), whether it runs
or not. Stopping the server stops the agents; the FlashCopy workers end
when the units close. Progress is in the units' bitmaps, so the next server
carries on where this one stopped.
"""

from __future__ import annotations

import threading
from contextlib import contextmanager
from typing import Any, Iterable, Iterator

from fastfc.copyservices.flashcopy import FlashCopy
from fastfc.copyservices.pprc import PPRCMode, PPRCPair
from fastfc.durable.unit import StorageUnit

from .output import fc_id, pair_id

#: what ``--json`` output calls whatever moves a copy on
SERVER, SESSION = "server", "session"


def session_pair(pair: PPRCPair, units: Iterable[StorageUnit] = ()) -> bool:
    """Whether ``pair`` is one of a Global Mirror session's: a session the
    open ``units`` restored holds it, or the unit of its secondary records
    a session over its secondary (a session not restored: paused, its
    primary unit away, or damaged). Only the session drives such a pair."""
    for u in units:
        for gm in u.sessions.values():
            if any(t.pair is pair for t in gm.triplets):
                return True
    rows = pair.secondary.store.session_rows()
    return any(t[2] == pair.secondary.name and t[1] == pair.primary.name
               for cfg in rows.values() for t in cfg["triplets"])


def _copies(fc: FlashCopy) -> bool:
    """Whether ``fc`` has background copy to do, and no session drives it."""
    return (fc.background_copy and fc.active and not fc.revertible and fc.session is None
            and fc.tracks_to_copy > 0)


def _drains(pair: PPRCPair) -> bool:
    """Whether ``pair`` may have tracks to send (a Global Copy pair always
    may); a suspended one waits for resumepprc, after which it is driven."""
    return pair.active and not pair.failed_over and pair.suspend_reason is None


class CopyDrivers:
    """The copies a server moves on: the PPRC pairs whose agents it
    started (it stops them when it stops). FlashCopy workers are the
    relationships' own; this only starts the ones not running."""

    def __init__(self) -> None:
        self._guard = threading.Lock()
        self._pairs: set[PPRCPair] = set()

    def driving(self, pair: PPRCPair) -> bool:
        with self._guard:
            return pair in self._pairs

    def drive(self, units: Iterable[StorageUnit]) -> None:
        """Start the work of every copy of ``units`` that has work and no
        worker: COPY-mode FlashCopy relationships with tracks to copy, and
        PPRC pairs (not a session's). A pair this drove that a session has
        taken over since is left to the session."""
        units = [u for u in units if not u.readonly and u.path is not None]
        for unit in units:
            for fc in unit.flashcopies:
                worker = fc.background_worker
                if _copies(fc) and (worker is None or not worker.is_alive()):
                    fc.start_background()
            for pair in unit.pairs:
                owned = session_pair(pair, units)
                with self._guard:
                    mine = pair in self._pairs
                if owned and mine:
                    self._forget(pair)
                elif not owned and not mine and _drains(pair):
                    pair.start()
                    with self._guard:
                        self._pairs.add(pair)
        with self._guard:
            gone = [p for p in self._pairs if not p.active]
        for pair in gone:
            self._forget(pair)

    def _forget(self, pair: PPRCPair) -> None:
        with self._guard:
            self._pairs.discard(pair)
        pair.stop()

    def stop_all(self) -> None:
        """Stop every agent this started (after its drain in flight)."""
        with self._guard:
            pairs, self._pairs = list(self._pairs), set()
        for pair in pairs:
            pair.stop()

    def __repr__(self) -> str:
        with self._guard:
            names = sorted(p.name for p in self._pairs)
        return f"<CopyDrivers draining {', '.join(names) or 'no pair'}>"

    @contextmanager
    def serving(self, units: Any, lock: Any) -> Iterator["CopyDrivers"]:
        """A server's service: start the copies of ``units`` (a
        :class:`~fastfc.tools.cli.units.Units`) on entry; on exit stop the
        pairs' agents (the FlashCopy workers end as the units close)."""
        with lock:
            self.drive(units.all())
        try:
            yield self
        finally:
            self.stop_all()


def moved_on_by(thing: FlashCopy | PPRCPair, copies: CopyDrivers | None,
                units: Iterable[StorageUnit] = (), left: int | None = None
                ) -> tuple[str | None, str | None]:
    """What moves the copy of ``thing`` on: ``(driver, note)``. ``driver``
    is ``"server"`` (this server's background work), ``"session"`` (a
    Global Mirror session's loop) or None (nothing: it waits for a
    command or a server); ``note`` says what moves it on in words, None when
    nothing is left to copy and no write is to be mirrored later. The note
    is the same in a server and outside one (a command a server carries out
    prints what a direct run prints): the copy moves on while ``fastfc
    serve`` runs for the unit, or when a command copies in the foreground.
    ``copies``: the server's drivers, None outside a server. ``left``: a FlashCopy's tracks
    to copy as the command that made them said (its worker may have copied
    some or all of them since: what the command prints does not depend on
    how far it got); None: as it stands now."""
    if isinstance(thing, FlashCopy):
        if thing.session is not None:
            return SESSION, f"Global Mirror session {thing.session} copies it in its CGs"
        pending = thing.tracks_to_copy if left is None else left
        if thing.revertible or not pending or (left is None and not thing.active):
            return None, None
        if not thing.background_copy:
            return None, (f"NOCOPY: tracks move only by copy-on-write; waitflash "
                          f"{fc_id(thing)} copies the rest")
        return (SERVER if copies is not None else None), (
            f"the background copy continues while fastfc serve runs for this unit, or "
            f"run waitflash {fc_id(thing)}")
    pair = thing
    if session_pair(pair, units):
        return SESSION, "its Global Mirror session's loop sends its tracks (resumegmir)"
    if not pair.active or pair.failed_over or pair.suspend_reason is not None:
        return None, None
    gcp = pair.mode is PPRCMode.GLOBAL_COPY
    if not pair.out_of_sync_tracks and not gcp:
        return None, None
    what = "host writes are sent" if gcp and not pair.out_of_sync_tracks else \
        "the copy continues"
    return (SERVER if copies is not None else None), (
        f"{what} while fastfc serve runs for this unit, or run resumepprc --wait "
        f"{pair_id(pair)}")
