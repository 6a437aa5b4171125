"""The storage units one invocation opens, and finding things in them by
the names a command line gives."""

from __future__ import annotations

import sqlite3
import stat
import threading
from contextlib import contextmanager, nullcontext
from pathlib import Path
from typing import Callable, ContextManager, Iterator

import click

from fastfc.copyservices.flashcopy import FlashCopy
from fastfc.copyservices.globalmirror import GlobalMirror
from fastfc.copyservices.pprc import PPRCPair
from fastfc.durable.unit import StorageUnit
from fastfc.errors import FastFCError, ReadOnlyUnitError

from .copies import CopyDrivers
from .loops import SessionLoops


class Units:
    """The storage units one invocation works on, opened on first use and
    closed (with their locks released) when the command ends.

    Each unit is opened through :class:`StorageUnit`, whose lock gives it one
    owner across processes: a command that only looks opens its units
    read-only (many may run at once), any other opens them read-write (alone).
    ``wait`` is how long to wait for a busy unit (None: fail at once).
    Units are found by the paths given and by what the open units record as
    their partners (:meth:`StorageUnit.partner_units`); naming both units of
    a pair that moved apart with ``-u`` and ``-r`` re-links them.

    ``cwd`` is the directory relative paths start from (default: this
    process's). A command a server runs for a client (``control``) works on
    units it borrows from the server (:meth:`borrowing`): it does not close
    them.
    """

    def __init__(self, local: str | None, remote: str | None, *, readonly: bool = False,
                 wait: float | None = None, durability: str = "process",
                 cwd: str | None = None) -> None:
        self.local_path = local
        self.durability = durability
        self.remote_path = remote
        self.readonly = readonly
        self.wait = wait
        self.cwd = cwd
        self.open: dict[Path, StorageUnit] = {}
        self._partners_opened = False
        self.borrowed = False
        #: a server's command (borrowed units): set when the server stops
        self.stopping: threading.Event | None = None
        #: in a server: the Global Mirror loops it runs (resumegmir); None
        #: when this process serves nothing
        self.loops: SessionLoops | None = None
        #: in a server: the copies it moves on in the background (mkflash,
        #: mkpprc, ...: :mod:`.copies`); None when this process serves nothing
        self.copies: CopyDrivers | None = None
        self._flush_on_close = True
        #: taken to open a unit into ``open`` (shared with a server's
        #: commands' views: commands that only look run at once, and may
        #: each open a partner the server does not hold yet)
        self._opening = threading.RLock()
        for path, flag in ((local, "--unit"), (remote, "--remote-unit")):
            if path is not None and _not_a_directory(self.where(path)):
                raise click.UsageError(f"{flag} {path} is not a directory: a storage unit "
                                       "is a directory (mkvol creates one)")

    @classmethod
    def borrowing(cls, host: "Units", local: str | None, remote: str | None, *,
                  cwd: str | None = None, looks_only: bool = False) -> "Units":
        """A command's view of ``host``'s open units (a server's), naming
        its own ``--unit`` and ``--remote-unit``. The units are shared, not
        owned: :meth:`close` flushes them (unless the command ``looks_only``)
        and leaves them open, and a unit this view opens joins ``host``
        (read-write, at its durability), to be closed with it."""
        units = cls(local, remote, readonly=host.readonly, wait=host.wait,
                    durability=host.durability, cwd=cwd)
        units.open = host.open
        units._opening = host._opening
        units.loops = host.loops
        units.copies = host.copies
        units.borrowed = True
        units._flush_on_close = not looks_only
        return units

    def where(self, path: str) -> Path:
        """``path`` as given, or, for a view with its own ``cwd``, from there."""
        return Path(path) if self.cwd is None else Path(self.cwd, path)

    def local(self, create: bool = False) -> StorageUnit:
        """The ``--unit`` (created if ``create`` and missing)."""
        if self.local_path is None:
            raise click.UsageError("no storage unit given: use --unit PATH (or set FASTFC_UNIT)")
        with self._opening:
            return self._local(create)

    def _local(self, create: bool) -> StorageUnit:
        assert self.local_path is not None
        unit = self._get(self.local_path, create)
        if not self._partners_opened:
            self._partners_opened = True
            if self.remote_path is not None:
                remote = self._get(self.remote_path, False)
                if remote is not unit:
                    # units named together are partners
                    if unit.relink(remote) and not unit.records_link(remote):
                        unit = self._record_link(unit, remote)
            self._open_partners()
        return unit

    def _record_link(self, unit: StorageUnit, remote: StorageUnit) -> StorageUnit:
        """Partners re-linked by a command that opened them read-only:
        record the link as a writer, this once (as an interrupted CG is
        resolved), so the next command finds them without -u/-r. If another
        command has either unit open, the link holds for this command only,
        and a note says so. Returns the local unit (reopened)."""
        if self.borrowed or not (unit.readonly or remote.readonly):
            return unit
        paths = [p for p, u in self.open.items() if u is unit or u is remote]
        for p in reversed(paths):
            self.open.pop(p).close()
        opened: list[StorageUnit] = []
        try:
            for p in paths:
                opened.append(StorageUnit(p, wait=self.wait, durability=self.durability))
        except (FastFCError, OSError, sqlite3.Error) as e:
            for u in reversed(opened):
                u.close()
            opened = [self._get(p, False) for p in paths]
            click.echo(f"note: {paths[0]} and {paths[1]} are re-linked for this command "
                       f"only; the link could not be recorded ({e})", err=True)
        for p, u in zip(paths, opened):
            self.open[p] = u
        local, other = (opened if opened[0].path == unit.path else opened[::-1])
        local.relink(other)
        return local

    def remote(self) -> StorageUnit:
        """The ``--remote-unit``, or the local unit when none is given."""
        self.local()
        path = self.remote_path or self.local_path
        if path is None:
            raise click.UsageError("no storage unit given: use --unit PATH (or set FASTFC_UNIT)")
        return self._get(path, False)

    def all(self) -> list[StorageUnit]:
        self.local()
        return list(self.open.values())

    def _get(self, path: str | Path, create: bool) -> StorageUnit:
        with self._opening:
            return self._get_locked(path, create)

    def _get_locked(self, path: str | Path, create: bool) -> StorageUnit:
        p = self.where(str(path)).resolve()
        if p in self.open:
            return self.open[p]
        exists = (p / "unit.db").exists()
        if not exists and not create:
            raise click.ClickException(f"no storage unit at {path} (mkvol creates one)")
        try:
            unit = StorageUnit(p, readonly=self.readonly and exists, wait=self.wait,
                               durability=self.durability)
        except ReadOnlyUnitError:
            # a CG a crash interrupted must be resolved on disk first: a
            # command that only looks does it, as a writer, this once
            unit = StorageUnit(p, wait=self.wait, durability=self.durability)
        self.open[p] = unit
        return unit

    def _open_partners(self) -> None:
        """Open the units that pairs and sessions of the open units span."""
        while True:
            wanted = {p for u in list(self.open.values()) for p in u.partner_units()}
            new = [p for p in wanted - set(self.open) if (p / "unit.db").exists()]
            if not new:
                return
            for p in new:
                self._get(p, False)

    def close(self) -> None:
        if self.borrowed:       # the server's units: what a close would make durable
            if self._flush_on_close and self.copies is not None:
                # the copies the command made, resumed or restored (a unit it
                # opened) move on in the server from now on
                try:
                    self.copies.drive(list(self.open.values()))
                except (FastFCError, OSError, sqlite3.Error) as e:
                    # the command's work is done (and said); the copies wait
                    click.echo(f"warning: the server did not start the background "
                               f"copies: {e}; waitflash or --wait copies in the "
                               "foreground", err=True)
            if self._flush_on_close:
                for unit in list(self.open.values()):
                    if not unit.readonly:
                        unit.flush()
            return
        errors = []
        for unit in reversed(list(self.open.values())):
            try:
                unit.close()
            except Exception as e:  # close every unit, report the first failure
                errors.append(e)
        self.open.clear()
        if errors:
            raise errors[0]

    # -- finding things by name ----------------------------------------------------
    def flashcopy(self, source: str, target: str) -> FlashCopy:
        unit = self.local()
        fc = unit.volume(target).target_relationship
        unit.volume(source)
        if fc is None or fc.source.name != source:
            raise KeyError(f"no FlashCopy relationship {source}:{target} in unit {unit.path}")
        return fc

    def pair(self, primary: str, secondary: str) -> PPRCPair:
        """The pair ``primary:secondary``: its primary in the local unit if
        such a pair is there, else in any open unit (after a failback)."""
        local = self.local()
        found = [p for u in self.all() for p in u.pairs
                 if p.primary.name == primary and p.secondary.name == secondary]
        here = [p for p in found if p.primary.unit is local]
        if len(here or found) == 1:
            return (here or found)[0]
        if found:
            raise click.ClickException(f"{primary}:{secondary} names several pairs; "
                                       "give the unit of its primary with --unit")
        for row in local.pair_records:
            if (row["primary_name"], row["secondary_name"]) == (primary, secondary):
                raise click.ClickException(
                    f"pair {primary}:{secondary} needs its secondary unit "
                    f"{local.describe_partner(row['secondary_uuid'])}, "
                    "which is not available")
        for rec in local.secondary_records:
            if rec["secondary_name"] == secondary and rec["primary_name"] in (primary, None):
                raise click.ClickException(
                    f"pair {primary}:{secondary} needs its primary's unit "
                    f"{rec['primary_unit']}, which is not available; with it lost for good, "
                    f"failoverpprc {primary}:{secondary} here makes {secondary} "
                    "host-writable (or rmpprc --force frees it)")
        for name, cfg in local.store.session_rows().items():
            if name not in local.sessions and any(list(t[1:3]) == [primary, secondary]
                                                  for t in cfg["triplets"]):
                raise click.ClickException(
                    f"pair {primary}:{secondary} belongs to Global Mirror session {name}, "
                    "whose primary unit is not available; with it lost for good, "
                    f"recovergmir {name} here fails it over at the last consistency group")
        raise KeyError(f"no PPRC pair {primary}:{secondary} in the open units")

    def session(self, name: str) -> GlobalMirror:
        units = self.all()
        for u in units:
            if name in u.sessions:
                return u.sessions[name]
        for u in units:
            if name in u.store.session_rows():
                return u.session(name)   # raises: its primary units are missing
        for u in units:
            if name in u.store.site_sessions():
                raise click.ClickException(
                    f"session {name!r} runs over secondary units (fastfc.remote) from a primary "
                    f"process, which records it in {u.path}: lsgmir lists it; a new primary "
                    f"process resumes it with fastfc.remote.attach(unit, {name!r})")
        # a session is recorded with its B volumes: in the unit of a pair's
        # secondary, which may be the one that is away
        away: dict[str, list[str]] = {}
        for u in units:
            for row in u.pair_records:
                away.setdefault(u.describe_partner(row["secondary_uuid"]), []).append(
                    f"{row['primary_name']}:{row['secondary_name']}")
        if away:
            raise click.ClickException(
                f"no Global Mirror session named {name!r} in the open units; it may be "
                "recorded in a unit that is not available: " + "; ".join(
                    f"{where}, the secondary unit of {', '.join(ids)}"
                    for where, ids in sorted(away.items())))
        raise KeyError(f"no Global Mirror session named {name!r} in the open units")

    def session_unit(self, name: str) -> tuple[StorageUnit, GlobalMirror]:
        """Session ``name`` and the open unit recording it (:meth:`session`
        finds it, or says why not)."""
        gm = self.session(name)
        return next(u for u in self.all() if u.sessions.get(name) is gm), gm

    def damaged_session(self, name: str) -> StorageUnit | None:
        """The open unit recording session ``name`` as one it cannot restore
        (:attr:`StorageUnit.session_problems`), if any."""
        for u in self.all():
            if name in u.session_problems:
                return u
        return None

    def session_away(self, name: str) -> dict | None:
        """Session ``name`` as recorded by an open unit that cannot restore
        it (its primary units are not available):
        :meth:`StorageUnit.session_record`; None if it is restored or no
        open unit records it, or one that records it cannot restore it
        (:meth:`damaged_session`: :meth:`session` names the problem)."""
        units = self.all()
        if any(name in u.sessions or name in u.session_problems for u in units):
            return None
        for u in units:
            if name in u.store.session_rows():
                return u.session_record(name)
        return None

    def session_unit_away(self, name: str) -> StorageUnit | None:
        """The open unit recording session ``name`` whose primary units are
        not available (:meth:`session_away`), if any."""
        if self.session_away(name) is None:
            return None
        return next(u for u in self.all() if name in u.store.session_rows())

    def session_of(self, pair: PPRCPair) -> GlobalMirror | None:
        for u in self.open.values():
            for gm in u.sessions.values():
                if any(t.pair is pair for t in gm.triplets):
                    return gm
        return None


pass_units = click.make_pass_decorator(Units)


# -- the command a server runs in this thread ------------------------------------------
def _not_a_directory(path: Path) -> bool:
    """``path.exists() and not path.is_dir()`` with one ``stat`` where it
    succeeds (in a server under load, each system call of a command waits
    for the GIL again); its errors as those two give them."""
    try:
        st = path.stat()
    except (OSError, ValueError):
        return path.exists() and not path.is_dir()
    return not stat.S_ISDIR(st.st_mode)


class Running:
    """What a server (:mod:`.control`) tells the command it runs in a
    thread: ``cancel``, set when its client asks it to stop (Ctrl-C, or a
    hang-up), and ``release``, a context manager that lets go of the
    server's command lock for its block (taking it back after)."""

    def __init__(self, cancel: threading.Event,
                 release: Callable[[], ContextManager[object]]) -> None:
        self.cancel, self.release = cancel, release
        #: whether the command stopped early because ``cancel`` was set
        #: (:func:`interrupted` said so): what the server tells its client
        self.heeded = False


_running = threading.local()


@contextmanager
def running(hooks: Running) -> Iterator[Running]:
    """``hooks`` for the command this thread runs, during the block."""
    _running.hooks = hooks
    try:
        yield hooks
    finally:
        _running.hooks = None


def interrupted() -> bool:
    """Whether the client of the command this thread runs for a server
    asked it to stop (Ctrl-C): a long command (waitflash, ``--wait``) polls
    this between steps and stops, saying what it left. Always False outside
    a server (there Ctrl-C is a KeyboardInterrupt)."""
    hooks = getattr(_running, "hooks", None)
    if hooks is None or not hooks.cancel.is_set():
        return False
    hooks.heeded = True
    return True


def unlocked() -> ContextManager[object]:
    """For a long command, around a stretch that waits or copies step by
    step on objects that manage their own locks (a relationship's copy, a
    pair's drain, a session's loop: what a server's background threads
    do without its command lock): the server's command lock is let go,
    so other commands run meanwhile. Outside a server: nothing."""
    hooks = getattr(_running, "hooks", None)
    return nullcontext() if hooks is None else hooks.release()
