"""Storage units: a directory of volume files plus crash-safe metadata.

Layout of a unit directory::

    unit.db            SQLite (WAL): volumes, FlashCopy relationships, PPRC
                       pairs, Global Mirror sessions, CG decision records
    volumes/NAME.vol   each volume's bytes, memory-mapped
    bitmaps/ID.bm      each bitmap's words, memory-mapped
    unit.journal       at durability "process", while open: the CG journal,
                       consistency groups' records appended (memory-mapped)
                       and folded into unit.db (see fastfc.durable.sqlite.CGJournal)
    unit.lock          the owner's lock (see fastfc.durable.lock)
    unit.reserve       room kept for metadata on a filesystem that fills up
                       (see fastfc.durable.sqlite.RESERVE_FILE)

Durability (see docs/guide/durability.md for the whole story):

* every protocol step (establish, resync, revertible resync, commit, revert,
  withdraw, reverse restore, pair state change, CG decision) is committed to
  SQLite before its call returns (at durability "process" a consistency
  group's records are appended to the CG journal instead, which the next
  open folds into SQLite);
* host data and bitmaps live in shared memory mappings, so a process killed
  at any instant loses nothing it wrote; :meth:`StorageUnit.flush` makes them
  durable against power loss as well (FlashCopy targets and bitmaps first,
  then the other volumes);
* opening a unit resolves a Global Mirror consistency group that was in
  flight by its decision record: commit the rest if "commit" was recorded,
  otherwise revert all; then every relationship of the session that its
  newest CGs did not step (at "process" a CG steps and records only the
  triplets whose B changed) takes the session's committed CG
  (:func:`~fastfc.copyservices.resolution.group_sequence`), which its C
  already holds.

One owner: opening a unit takes ``unit.lock`` (see :mod:`fastfc.durable.lock`),
exclusive for a read-write open, shared for ``readonly=True``, until close.

Units can be copied and moved: each has a uuid (in its ``meta`` table), rows
name other units by uuid, and the ``partners`` table says where each partner
is, relative to this unit's directory. A partner is attached only when both
sides agree (each one's recorded path leads to the other), so a copy never
attaches to the original's partner; :meth:`StorageUnit.relink` re-links a
pair of units that moved apart.
"""

from __future__ import annotations

import mmap
import os
import sqlite3
import threading
import time
from pathlib import Path
from typing import Callable, cast

import numpy as np

from fastfc._core import PPRC, MirrorBase, TrackBitmap
from fastfc._numbers import check_real
from fastfc.errors import (AlreadyExistsError, CorruptUnitError, NoSpaceError, ReadOnlyUnitError,
                           StateError, UnitBusyError, UnitClosedError)
from fastfc.copyservices.flashcopy import FlashCopy
from fastfc.copyservices.globalmirror import GlobalMirror, Triplet, copy_to_c
from fastfc.copyservices.point_schedule import PointSchedule
from fastfc.copyservices.pprc import PPRCPair
from fastfc.copyservices.resolution import group_sequence, pending_sequence, resolve
from fastfc.durable.lock import LOCK_FILE, POLL, UnitLock
from fastfc.durable.points import UnitPoints
from fastfc.durable.siteloss import (ended_at_secondary, failover_alone, forget_failover,
                                     is_site_failover, recover_session, release_secondary,
                                     restore_merged)
from fastfc.durable.sqlite import SQLiteStore, read_identity
from fastfc.names import NAME, NAME_RULE
from fastfc.storage.store import Store
from fastfc.storage.volume import DEFAULT_TRACK, Volume, locked


_PAIR_MAPS = ("oos", "spare", "cg")   # a pair record's bitmaps

# Open units by resolved path: a pair or session spanning two units is
# rebuilt once both are open in this process.
_open_units: dict[str, "StorageUnit"] = {}
_opening: set[str] = set()      # paths being opened by a thread right now
_registry_lock = threading.RLock()


#: how messages name the way to remove a session that cannot be restored
_REMOVE_SESSION = "StorageUnit.remove_session({name!r})"
#: ... a FlashCopy relationship, a PPRC pair or a volume that cannot be restored
_REMOVE_FLASHCOPY = "StorageUnit.remove_flashcopy({source!r}, {target!r})"
_REMOVE_PAIR = "StorageUnit.remove_pair({primary!r}, {secondary!r})"
_REMOVE_VOLUME = "StorageUnit.remove_volume({name!r})"
#: ... the record of a session over secondary units that names an A volume
_FORGET_SITE_SESSION = "fastfc.remote.forget_session(unit, {name!r})"

#: The durability levels a unit can be opened with (``StorageUnit(durability=...)``).
DURABILITY = ("process", "power")


class ReadOnlyVolume(Volume):
    """A volume of a unit opened read-only: a shared, read-only mapping of
    its file, opened for reading only, and every host write refused with
    :class:`~fastfc.errors.ReadOnlyUnitError`. (Not a private copy-on-write
    mapping: the kernel charges one of those in full against its commit
    limit, so a volume larger than memory could not be opened.) Nothing
    stores into it: a read-only unit runs no copy, pair or session."""

    def __init__(self, n_tracks: int, track_size: int, *, path, name: str,
                 store: Store, grain_size: int | None = None) -> None:
        self.path = Path(path)
        self.name = name
        self.store = store
        with open(self.path, "rb") as f:
            mm = mmap.mmap(f.fileno(), n_tracks * track_size, access=mmap.ACCESS_READ)
        self._mm = mm      # close() unmaps it once no array of it is left
        self._attach(np.frombuffer(mm, dtype=np.uint8), track_size,
                     grain_size=grain_size or 0)
        self._file_backed = False
        self._reads_allocate = False

    def _refuse(self, *args, **kwargs):
        raise ReadOnlyUnitError(f"{self!r} is in a storage unit opened read-only")

    write = write_batch = _write_origin = _refuse


class StorageUnit:
    """A storage unit: volumes and the copy services between them.

    Parameters
    ----------
    path : str or os.PathLike, optional
        The unit's directory, created if missing. ``None`` keeps everything
        in memory with the same API.

    Opening an existing unit restores its volumes, FlashCopy relationships,
    PPRC pairs and Global Mirror sessions (pairs and sessions that span two
    units come back once both are open), after resolving any consistency
    group a crash interrupted. A damaged database (not SQLite, failing its
    check, another schema, rows whose values make no sense) raises
    :class:`~fastfc.errors.CorruptUnitError` and is not used. Rows that no
    longer fit what the unit holds (a volume file gone, a relationship or
    pair naming a missing volume or bitmap file, a session that cannot run)
    do not stop it from opening: each is left unloaded, named in
    :attr:`recovered` and :attr:`volume_problems`,
    :attr:`relationship_problems` or :attr:`session_problems` with the call
    that removes it.
    """

    def __init__(self, path: str | os.PathLike | None = None, *, readonly: bool = False,
                 wait: float | None = None, durability: str = "process") -> None:
        """
        Parameters
        ----------
        durability : {"process", "power"}
            What a protocol step survives once its call returns (see
            docs/guide/durability.md). ``"process"`` (default): a process
            killed at any instant loses nothing and leaves every C volume on
            one consistency group; power loss is covered at :meth:`flush`
            points; no step waits for the disk (no fsync per step or per CG).
            ``"power"``: every protocol step is on the disk when its call
            returns, and every committed consistency group survives a power
            cut: before a CG's decision is made durable, the B and C data and
            the bitmaps that describe them are written to the disk in an order
            recovery can trust (a few syncs per CG; see the benchmark).
        readonly : bool
            Open an existing unit for looking only: a shared lock (other
            read-only opens, in any process, may hold it too; no read-write
            open can), SQLite opened read-only, volumes and bitmaps mapped
            privately from files opened for reading. Nothing in the
            directory is created or modified, so it works on a directory the
            process cannot write. Every change (creating or removing a
            volume, a host write, establishing or changing a relationship,
            pair or session) raises :class:`~fastfc.errors.ReadOnlyUnitError`.
            A unit with a consistency group that a crash interrupted is
            refused read-only (the CG must be resolved on disk: open it
            read-write once). Pairs and sessions restored in a read-only unit
            do not run.
        wait : float, optional
            When the unit is open elsewhere (read-write by another process
            or thread, or read-only by other processes when this open is a
            writer), keep trying this many seconds before giving up. None
            (default): give up at once. Either way the refusal is
            :class:`~fastfc.errors.UnitBusyError`, naming the holder.
        """
        if durability not in DURABILITY:
            raise ValueError(f"durability must be one of {', '.join(DURABILITY)}, "
                             f"got {durability!r}")
        if wait is not None:
            wait = check_real("wait", wait, infinite=True)
        self.path = Path(path).resolve() if path is not None else None
        self.readonly = bool(readonly)
        self.durability = durability
        self._volumes: dict[str, Volume] = {}
        self._pair_rows: list[dict] = []
        self._links: dict[str, StorageUnit] = {}   # partners attached by relink()
        self.sessions: dict[str, GlobalMirror] = {}
        self.recovered: list[str] = []     # what opening had to resolve
        # sessions whose rows cannot be restored (name -> what is wrong)
        self._session_problems: dict[str, str] = {}
        # volume rows whose files are missing (name -> what is wrong)
        self._volume_problems: dict[str, str] = {}
        # FlashCopy and pair rows that cannot be restored, by (source, target)
        # and (primary, secondary): the row (bitmap file ids) and what is wrong
        self._flash_damage: dict[tuple[str, str], tuple[dict, str]] = {}
        self._pair_damage: dict[tuple[str, str], tuple[dict, str]] = {}
        self._closed = False
        # the sessions served to a primary elsewhere, as unit.db says (None: read again)
        self._served: dict[str, list[tuple[str, str]]] | None = None
        self.uuid: str | None = None
        self.points = UnitPoints(self)     # durable recovery points
        if self.path is None:
            if self.readonly:
                raise ValueError("an in-memory unit cannot be opened read-only")
            self.store: Store = Store(on_session_added=self._session_added,
                                      on_session_dropped=self._session_dropped)
            return
        key = str(self.path)
        deadline = None if wait is None else time.monotonic() + max(0.0, float(wait))
        while True:     # one open per unit in this process
            with _registry_lock:
                if key not in _open_units and key not in _opening:
                    _opening.add(key)
                    break
            if deadline is None or time.monotonic() >= deadline:
                raise UnitBusyError(f"storage unit {self.path} is already open in this process")
            time.sleep(POLL)
        try:
            self._open(deadline)
        finally:
            with _registry_lock:
                _opening.discard(key)

    def _open(self, deadline: float | None) -> None:
        assert self.path is not None   # only a unit on disk is opened
        if self.path.exists() and not self.path.is_dir():
            raise CorruptUnitError(f"{self.path} is not a directory")
        has_db = (self.path / "unit.db").exists()
        if self.readonly and not has_db:
            raise CorruptUnitError(f"{self.path} holds no storage unit (no unit.db); "
                                   "a read-only open creates nothing")
        if self.path.exists() and not has_db and \
                any(p.name != LOCK_FILE for p in self.path.iterdir()):
            raise CorruptUnitError(f"{self.path} is not empty and holds no unit.db")
        if not self.readonly:
            self.path.mkdir(parents=True, exist_ok=True)
        wait = None if deadline is None else max(0.0, deadline - time.monotonic())
        self._unit_lock = UnitLock(self.path, shared=self.readonly, wait=wait)
        try:
            self.store = SQLiteStore(self.path, str(self.path), readonly=self.readonly,
                                     durability=self.durability,
                                     on_session_added=self._session_added,
                                     on_session_dropped=self._session_dropped)
            if not self.readonly:
                (self.path / "volumes").mkdir(exist_ok=True)
        except BaseException:
            self._unit_lock.release()
            raise
        self.uuid = self.store.uuid
        try:
            self._restore_local()
            self.points.reopen()
        except (ValueError, TypeError, KeyError) as e:
            # a row whose values make no sense (bad JSON, NULLs, a mode
            # that does not exist): damaged metadata, not a caller's error
            self._release_files()
            raise CorruptUnitError(f"{self.path}: damaged unit metadata: "
                                   f"{type(e).__name__}: {e}") from e
        except BaseException:
            self._release_files()
            raise
        with _registry_lock:
            _open_units[str(self.path)] = self
            units = list(_open_units.values())
            for unit in units:
                unit._restore_pairs()
            for unit in units:
                unit._restore_sessions()

    # -- volumes -----------------------------------------------------------------
    def create_volume(self, name: str, n_tracks: int, track_size: int = DEFAULT_TRACK, *,
                      thin: bool = False, grain_size: int | None = None) -> Volume:
        """Create a zero-filled volume named ``name`` in this unit.

        Thick by default: its file gets every block now, and a filesystem
        without room raises :class:`~fastfc.errors.NoSpaceError` leaving no
        file and no row. ``thin=True`` keeps the file sparse and reserves
        blocks on first write (see :class:`~fastfc.storage.volume.Volume`); the choice
        is recorded and holds after reopening. In a memory unit ``thin`` has
        no effect. ``grain_size``: see :class:`~fastfc.storage.volume.Volume`
        (recorded with the volume)."""
        self._require_writable()
        if not isinstance(name, str) or not NAME.match(name):
            raise ValueError(f"volume names are {NAME_RULE}, got {name!r}")
        if name in self._volumes:
            raise AlreadyExistsError(f"volume {name!r} already exists in this unit")
        if self.path is None:
            vol = Volume(n_tracks, track_size, name=name, store=self.store,
                         grain_size=grain_size)
        else:
            file = self._volume_file(name)
            if file.exists():
                file.unlink()   # left by a create that died before its row
            vol = Volume(n_tracks, track_size, path=file, name=name, thin=thin,
                         store=self.store, grain_size=grain_size)
            try:
                self._sqlite.add_volume(name, n_tracks, track_size, thin, vol.grain_size)
            except BaseException:
                vol.close()
                file.unlink()
                raise
        vol.unit = self
        self._volumes[name] = vol
        return vol

    def volume(self, name: str) -> Volume:
        """The volume named ``name``."""
        self._require_open()
        try:
            return self._volumes[name]
        except KeyError:
            raise KeyError(f"no volume named {name!r} in this unit") from None

    def volumes(self) -> list[Volume]:
        return list(self._volumes.values())

    def volume_records(self) -> list[dict]:
        """What the unit records of each volume (its open volumes in memory):
        ``name``, ``n_tracks``, ``track_size``, ``thin``, ``grain_size``
        (:meth:`SQLiteStore.volume_records`). A unit opened read-only maps
        every volume alike: ``thin`` is the record's word."""
        self._require_open()
        if self.path is None:
            return [{"name": v.name, "n_tracks": v.n_tracks, "track_size": v.track_size,
                     "thin": bool(v.thin), "grain_size": v.grain_size}
                    for v in self._volumes.values()]
        return self._sqlite.volume_records()

    def __contains__(self, name: str) -> bool:
        return name in self._volumes

    def remove_volume(self, name: str) -> None:
        """Delete a volume that takes part in no relationship or pair. A
        volume whose file is missing (see :attr:`volume_problems`) loses its
        row, once no relationship, pair or session row names it."""
        self._require_writable()
        if name in self._volume_problems:
            self._remove_missing_volume(name)
            return
        vol = self.volume(name)
        if vol.relationships or vol.mirror is not None or vol.is_secondary:
            raise StateError(f"{vol!r} is in a FlashCopy relationship or PPRC pair; "
                             "withdraw or remove those first")
        held = self.points.points(name)
        if held:
            raise StateError(f"{vol!r} holds {len(held)} recovery points; expire them first")
        recorded = self._site_sessions_of(name)
        if recorded:
            raise StateError(
                f"{vol!r} is the A volume of session{'s' if len(recorded) > 1 else ''} "
                f"{', '.join(map(repr, recorded))} over secondary units, which a new primary "
                "process resumes from this unit; forget "
                + ("it" if len(recorded) == 1 else "them") + " first: "
                + ", ".join(_FORGET_SITE_SESSION.format(name=n) for n in recorded))
        vol.close()
        self.points.drop_files(name)
        del self._volumes[name]
        if self.path is not None:
            self._sqlite.remove_volume(name)
            self._volume_file(name).unlink(missing_ok=True)

    def _site_sessions_of(self, name: str) -> list[str]:
        """The recorded sessions over secondary units whose A volumes
        include ``name``."""
        return sorted(n for n, rec in self.store.site_sessions().items()
                      if any(t[0] == name for t in rec["triplets"]))

    def _remove_missing_volume(self, name: str) -> None:
        users = [(f"FlashCopy {s}:{t}", _REMOVE_FLASHCOPY.format(source=s, target=t))
                 for s, t in self._flash_damage if name in (s, t)]
        users += [(f"pair {p}:{s}", _REMOVE_PAIR.format(primary=p, secondary=s))
                  for (p, s), (row, _) in self._pair_damage.items()
                  if p == name or (s == name and row["secondary_unit"] == self.uuid)]
        users += [(f"session {n}", _REMOVE_SESSION.format(name=n))
                  for n, cfg in self.store.session_rows().items()
                  if any(name in (b, c) or (name == a and u == self.uuid)
                         for u, a, b, c in cfg["triplets"])]
        users += [(f"session {n} over secondary units", _FORGET_SITE_SESSION.format(name=n))
                  for n in self._site_sessions_of(name)]
        if users:
            raise StateError(f"volume {name!r} (its file missing) is still named by "
                             + ", ".join(what for what, _ in users) + "; remove "
                             + ("it" if len(users) == 1 else "them") + " first: "
                             + ", ".join(call for _, call in users))
        with self.store.transaction():
            self._sqlite.remove_volume(name)
            self.store.save_secondary(name, None)
        del self._volume_problems[name]

    @property
    def volume_problems(self) -> dict[str, str]:
        """Volumes recorded in this unit that could not be opened (their
        file is missing), by name: what is wrong. The unit opens without
        them; :meth:`remove_volume` removes the row."""
        return dict(self._volume_problems)

    @property
    def relationship_problems(self) -> dict[str, str]:
        """FlashCopy relationships and PPRC pairs recorded in this unit that
        could not be restored (a volume or bitmap file missing), keyed
        ``"FlashCopy SOURCE:TARGET"`` and ``"pair PRIMARY:SECONDARY"``: what
        is wrong. The unit opens without them (a FlashCopy target whose image
        was incomplete reads as invalid); :meth:`remove_flashcopy` and
        :meth:`remove_pair` remove their rows."""
        out = {f"FlashCopy {s}:{t}": why for (s, t), (_, why) in self._flash_damage.items()}
        out.update({f"pair {p}:{s}": why for (p, s), (_, why) in self._pair_damage.items()})
        return out

    def remove_flashcopy(self, source: str, target: str) -> bool:
        """Remove the row of FlashCopy ``source:target``, which could not be
        restored (see :attr:`relationship_problems`; ``rmflash --force``). A
        target whose image was incomplete (tracks it still read from the
        source, or a revertible one) stays invalid. Returns whether the
        target is invalid (False when it is missing too)."""
        self._require_writable()
        key = (source, target)
        if key not in self._flash_damage:
            raise KeyError(f"no FlashCopy {source}:{target} in this unit that it cannot "
                           "restore")
        for n, cfg in self.store.session_rows().items():
            if any((b, c) == key for _, _, b, c in cfg["triplets"]):
                raise StateError(f"FlashCopy {source}:{target} belongs to Global Mirror "
                                 f"session {n!r}; {_REMOVE_SESSION.format(name=n)} first")
        row, _ = self._flash_damage[key]
        tgt = self._volumes.get(target)
        invalid = tgt is not None and not tgt.valid
        self._sqlite.drop_flash(row["id"], {"name": target, "invalid": invalid})
        del self._flash_damage[key]
        return invalid

    def remove_pair(self, primary: str, secondary: str) -> None:
        """Remove the row of PPRC pair ``primary:secondary``, which could not
        be restored (see :attr:`relationship_problems`; ``rmpprc --force``).
        Its primary, if here, takes part in no pair; its secondary, if its
        unit is open read-write beside this one, takes host writes again."""
        self._require_writable()
        key = (primary, secondary)
        if key not in self._pair_damage:
            raise KeyError(f"no PPRC pair {primary}:{secondary} in this unit that it cannot "
                           "restore")
        row, _ = self._pair_damage[key]
        sec_unit = self._partner(row["secondary_unit"])
        b = sec_unit._volumes.get(secondary) if sec_unit is not None else None
        if sec_unit is not None and b is not None and b.is_secondary and b.mirror is None \
                and not sec_unit.readonly \
                and not any(secondary in t[2:] for cfg in sec_unit.store.session_rows().values()
                            for t in cfg["triplets"]):
            b.set_flags(secondary=False)
            with sec_unit.store.transaction():
                sec_unit.store.set_volume_flags(b.flags_record())
                sec_unit.store.save_secondary(secondary, None)
        self._sqlite.drop_pair(row["id"])
        del self._pair_damage[key]

    def _volume_file(self, name: str) -> Path:
        assert self.path is not None   # a unit on disk (callers check)
        return self.path / "volumes" / f"{name}.vol"

    # -- relationships -------------------------------------------------------------
    @property
    def pairs(self) -> list[PPRCPair]:
        """PPRC pairs whose primary is in this unit."""
        return [v.mirror for v in self._volumes.values() if isinstance(v.mirror, PPRCPair)]

    @property
    def pair_records(self) -> list[dict]:
        """The PPRC pairs recorded with their primary in this unit whose
        secondary unit is away (recorded, not restored), as records (dicts,
        copies, without the bitmaps): ``id``, ``primary_name``,
        ``secondary_name``, ``mode``, ``suspend_reason``, ``failed_over``,
        ``name``, ``secondary_uuid`` (how the row names the secondary's
        unit), ``secondary_unit`` (where that unit is expected) and
        ``out_of_sync`` (tracks its bitmaps record). A B failed over at
        the secondary alone (``recover_session``) is such a pair, B->A,
        its ``suspend_reason`` :data:`~fastfc.durable.siteloss.SITE_FAILOVER`."""
        return [{**{k: v for k, v in r.items() if k not in _PAIR_MAPS},
                 "out_of_sync": self._tracks_owed(r)} for r in self._pair_rows]

    def _tracks_owed(self, row: dict) -> int:
        """The tracks a pair row's bitmaps record (in whole or in part)."""
        v = self._volumes.get(row["primary_name"])
        per = v.grains_per_track if v is not None else 1
        return sum(row[k].count_groups(per) for k in _PAIR_MAPS if row[k] is not None)

    @property
    def secondary_records(self) -> list[dict]:
        """The PPRC pairs (in no Global Mirror session) whose secondary
        volume is in this unit and whose primary's unit is not attached (lost,
        or away): what this unit knows of each from the record it keeps of
        its secondaries (a pair's row is its primary's), as dicts:
        ``primary_name``, ``secondary_name``, ``mode``, ``primary_uuid`` (how
        the record names the primary's unit) and ``primary_unit`` (where
        that unit is expected, and why it is not attached). A secondary of a
        pair made before secondaries kept this record has them None but
        ``secondary_name``: the secondary of an unknown pair. With the
        primary lost, :meth:`failover_pair` or :meth:`release_secondary`. A
        pair whose primary's unit is open but cannot restore it is not
        listed here: that unit names it (:attr:`relationship_problems`)."""
        self._require_open()
        if self.path is None:
            return []           # a memory unit is never apart from its pairs
        recs = self.store.secondary_records()
        with _registry_lock:
            units = [u for u in _open_units.values() if not u._closed]
        live = {id(p.secondary) for u in units for p in u.pairs}
        in_sessions = {t[2] for cfg in self.store.session_rows().values()
                       for t in cfg["triplets"]}
        out = []
        for name, v in self._volumes.items():
            if not v.is_secondary or id(v) in live or name in in_sessions:
                continue
            rec = recs.get(name)
            ref = rec["primary_unit"] if rec is not None else None
            owner = self._partner(ref) if ref is not None else None
            if rec is not None and owner is not None and \
                    (rec["primary_name"], name) in owner._pair_damage:
                continue    # its primary's unit is here and names the pair's damage
            out.append({"primary_name": rec["primary_name"] if rec is not None else None,
                        "secondary_name": name, "mode": rec["mode"] if rec is not None else None,
                        "primary_uuid": ref,
                        "primary_unit": self.describe_partner(ref) if ref is not None
                        else "unknown (a pair made before secondaries recorded it)"})
        return out

    def failover_pair(self, volume: str) -> dict:
        """``failoverpprc`` at this unit alone, the primary's unit of the
        pair whose secondary is ``volume`` lost (see
        :attr:`secondary_records`): ``volume`` becomes a suspended primary of
        a pair back to the old primary, recorded here, recording every track
        it changes, and takes host writes. When the old primary's unit is
        opened beside this one, the pair is restored failed over and
        ``failback()`` resyncs only the tracks changed on either side.
        Returns the new pair's record (as :attr:`pair_records`). See
        :func:`fastfc.durable.siteloss.failover_alone`."""
        return failover_alone(self, volume)

    def release_secondary(self, volume: str) -> dict:
        """``rmpprc --force`` at this unit alone, the primary's unit of the
        pair whose secondary is ``volume`` lost for good: ``volume`` is
        nobody's secondary any more and takes host writes (holding what the
        primary last sent). Returns what was known of the pair (as
        :attr:`secondary_records`). See
        :func:`fastfc.durable.siteloss.release_secondary`."""
        return release_secondary(self, volume)

    def _session_added(self, session: GlobalMirror) -> None:
        """The store's listener: a new session whose B volumes live here."""
        self.sessions[session.name] = session
        self._keep_session_points(session)

    def _keep_session_points(self, session: GlobalMirror) -> None:
        """The recovery points a session's schedule takes of its C volumes
        (which live here with its B volumes) are this unit's: durable."""
        if all(self._volumes.get(t.c.name) is t.c for t in session.triplets):
            session.point_keeper = self.points

    def _session_dropped(self, session: GlobalMirror) -> None:
        """The store's listener: a session whose B volumes live here ended."""
        if self.sessions.get(session.name) is session:
            del self.sessions[session.name]

    @property
    def flashcopies(self) -> list[FlashCopy]:
        """FlashCopy relationships among this unit's volumes."""
        # a volume's source relationships are FlashCopies (the base class says RelationshipBase)
        return cast("list[FlashCopy]", [r for v in self._volumes.values()
                                        for r in v.source_relationships])

    def session(self, name: str) -> GlobalMirror:
        """The Global Mirror session ``name`` recorded in this unit."""
        try:
            return self.sessions[name]
        except KeyError:
            problem = self._session_problems.get(name)
            if problem is not None:
                raise StateError(f"session {name!r} cannot be restored: {problem}; "
                                 f"{_REMOVE_SESSION.format(name=name)} removes what is "
                                 "left of it") from None
            pending = self.store.session_rows() if self.path is not None else {}
            if name in pending:
                raise StateError(
                    f"session {name!r} needs its primary unit(s) open in this process: "
                    + "; ".join(sorted({self.describe_partner(t[0])
                                        for t in pending[name]['triplets']}))
                    + f". With the primary lost, recover_session({name!r}) at this unit "
                    "makes its B volumes host-writable at the last consistency group; or "
                    f"StorageUnit.remove_session({name!r}, copy=True) ends the session here "
                    "(each C keeps its image, the tracks it reads from B copied first; "
                    f"{_REMOVE_SESSION.format(name=name)} withdraws at once), each B "
                    "staying the secondary of its recorded pair") from None
            raise KeyError(f"no Global Mirror session named {name!r} in this unit") from None

    @property
    def session_problems(self) -> dict[str, str]:
        """Sessions recorded in this unit that could not be restored, by
        name: what is wrong with them (a C volume whose FlashCopy was
        withdrawn, a pair that was removed, a volume that is gone). The unit
        opens regardless; :meth:`remove_session` removes what is left."""
        return dict(self._session_problems)

    def remove_session(self, name: str, *, copy: bool = False,
                       on_copy: Callable[[int, int], None] | None = None) -> list[str]:
        """End a session this unit cannot run, and remove what is left of
        it: one that cannot be restored (see :meth:`session_problems`), or,
        at its secondary unit alone, one whose primary unit(s) are not
        available (lost for good: ``rmgmir`` there). Its row and CG
        decisions go, and so do the FlashCopy B->C of each of its triplets
        that still has one, and each of its pairs A->B that is restored.
        ``copy=False`` withdraws each B->C at once (a C still reading tracks
        from its B turns invalid: ``rmgmir --force``); ``copy=True`` first
        copies those tracks B -> C (``on_copy(copied, total)`` reports the
        progress), so every C keeps its image of the last committed CG, as
        :meth:`GlobalMirror.close` does (``rmgmir``). Returns what was
        removed, for messages.

        A pair whose primary's unit is away stays recorded there and here:
        B stays its secondary (it comes back as a plain pair when that unit
        is opened beside this one), and with the primary lost,
        :meth:`failover_pair` or :meth:`release_secondary` at this unit
        alone fail it over or free it. A session that works is ended with
        :meth:`GlobalMirror.close` instead."""
        self._require_writable()
        if name not in self._session_problems:
            if name in self.sessions:
                raise StateError(f"session {name!r} works: end it with GlobalMirror.close()")
            if self.path is None or name not in self.store.session_rows():
                raise KeyError(f"no Global Mirror session named {name!r} in this unit "
                               "that it cannot restore")
        cfg = self.store.session_rows().get(name)
        removed: list[str] = []
        trips = cfg["triplets"] if cfg else []
        fcs: list[FlashCopy | None] = []
        for _, _, b_name, c_name in trips:
            b, c = self._volumes.get(b_name), self._volumes.get(c_name)
            fc = c.target_relationship if c is not None else None
            fcs.append(fc if isinstance(fc, FlashCopy) and b is not None and fc.source is b
                       else None)
        if copy:
            if any(fc is not None and fc.revertible for fc in fcs):
                raise StateError(f"session {name!r}: a C volume is still revertible (the C "
                                 "volumes are not on one CG); nothing copied. "
                                 f"{_REMOVE_SESSION.format(name=name)} withdraws at once")
            copy_to_c([fc for fc in fcs if fc is not None], on_copy)
        for (a_unit, a_name, b_name, c_name), fc in zip(trips, fcs):
            b = self._volumes.get(b_name)
            if fc is not None:
                fc.session = None
                if fc.revertible:
                    fc.revert()
                fc.withdraw(force=True)
                removed.append(f"FlashCopy {b_name}:{c_name}")
            unit_a = self._partner(a_unit)
            a = unit_a._volumes.get(a_name) if unit_a is not None else None
            pair = a.mirror if a is not None else None
            if isinstance(pair, PPRCPair) and pair.secondary is b:
                pair.remove()
                removed.append(f"pair {a_name}:{b_name}")
            elif unit_a is not None and b is not None and b.is_secondary and \
                    type(pair) is not MirrorBase:
                # its pair is gone (its primary's unit is open and holds
                # none): B is nobody's secondary and takes host writes again
                b.set_flags(secondary=False)
                with self.store.transaction():
                    self.store.set_volume_flags(b.flags_record())
                    self.store.save_secondary(b_name, None)
                removed.append(f"the secondary role of {b_name}")
        self.store.drop_session(name)
        self._session_problems.pop(name, None)
        return removed

    def session_record(self, name: str) -> dict:
        """Session ``name`` as this unit records it, whether or not it is
        restored (its primary units may be away): ``name``, ``cg_interval``,
        ``max_coordination_time``, ``max_drain_time``, ``decide``, ``stats``
        (the counters, or None), ``running`` (whether a server is to run its
        loop: :meth:`configure_session`), ``restored`` (whether
        :meth:`session` gives it), and ``triplets``, one dict per triplet: ``a``, ``b``, ``c``
        (names), ``a_unit`` (where A's unit is expected, and why it is not
        attached when it is not), ``c_sequence`` and ``revertible`` (of its
        B->C FlashCopy)."""
        self._require_open()
        rows = self.store.session_rows() if self.path is not None else {}
        if name not in rows:
            raise KeyError(f"no Global Mirror session named {name!r} in this unit")
        cfg = rows[name]
        trips = []
        described: dict[str, str] = {}      # a session's A volumes share a unit or two
        for a_unit, a, b, c in cfg["triplets"]:
            fc = self._row_volume(c).target_relationship
            if a_unit not in described:
                described[a_unit] = self.describe_partner(a_unit)
            trips.append({"a": a, "b": b, "c": c, "a_unit": described[a_unit],
                          "c_sequence": None if fc is None else fc.sequence,
                          "revertible": None if fc is None else bool(fc.revertible)})
        return {**{k: v for k, v in cfg.items() if k != "triplets"}, "name": name,
                "running": bool(cfg.get("running", False)),
                "rpo_alert": cfg.get("rpo_alert") or None,
                "restored": name in self.sessions, "triplets": trips}

    def session_settings(self, name: str) -> dict:
        """Session ``name``'s settings as this unit records them: the
        :meth:`session_record` of it without its counters and triplets
        (``name``, ``cg_interval``, ``max_coordination_time``,
        ``max_drain_time``, ``decide``, ``running``, ``rpo_alert``, ...),
        read from memory between writes of them (a server's ``showgmir``
        does not wait for the store lock its session's loop holds while it
        commits)."""
        self._require_open()
        rows = self.store.session_configs() if self.path is not None else {}
        if name not in rows:
            raise KeyError(f"no Global Mirror session named {name!r} in this unit")
        cfg = rows[name]
        return {**{k: v for k, v in cfg.items() if k not in ("triplets", "stats")},
                "name": name, "running": bool(cfg.get("running", False)),
                "rpo_alert": cfg.get("rpo_alert") or None}

    def configure_session(self, name: str, *, running: bool | None = None,
                          cg_interval: float | None = None,
                          max_coordination_time: float | None = None,
                          max_drain_time: float | None = None,
                          rpo_alert: float | None = None,
                          points: "PointSchedule | bool | None" = None) -> dict:
        """Change what this unit records of session ``name`` (restored
        here), durably, and return its record (:meth:`session_record`).

        ``running``: whether a server runs the session's loop; a server
        opening the unit starts the loop of each session recorded so (the
        caller starts or stops the loop itself). ``cg_interval``,
        ``max_coordination_time``, ``max_drain_time``: the session's
        bounds, as :class:`GlobalMirror` takes them; a running loop uses
        them from its next CG. ``rpo_alert``: seconds of RPO above which a
        server running the session's loop raises an alert (0 clears it; the
        server is told by its caller). ``points``: the session's
        :class:`~fastfc.copyservices.point_schedule.PointSchedule` of
        recovery points of its C volumes (False: none). None leaves a
        setting as it is. Bad values raise before anything changes."""
        self._require_writable()
        gm = self.session(name)
        bounds = {k: check_real(k, v, positive=k == "max_coordination_time")
                  for k, v in (("cg_interval", cg_interval),
                               ("max_coordination_time", max_coordination_time),
                               ("max_drain_time", max_drain_time)) if v is not None}
        alert = None if rpo_alert is None else check_real("rpo_alert", rpo_alert)
        if points is True or not (points is None or points is False
                                  or isinstance(points, PointSchedule)):
            raise TypeError(f"points must be a PointSchedule, False (none) or None (as it "
                            f"is), not {points!r}")
        if isinstance(points, PointSchedule) and not all(
                self._volumes.get(t.c.name) is t.c for t in gm.triplets):
            raise ValueError(f"session {name!r}: a point schedule needs its C volumes here")
        with self.store.transaction():      # its lock: no counters saved in between
            cfg = self.store.session_rows()[name]
            stats = cfg.pop("stats") or gm.stats.to_record()
            cfg.update(bounds)
            if alert is not None:
                cfg["rpo_alert"] = float(alert) or None
            if running is not None:
                cfg["running"] = bool(running)
            if points is False:
                cfg.pop("points", None)
            elif points is not None:
                cfg["points"] = points.to_record()
            self.store.add_session({**cfg, "name": name, "stats": stats}, gm)
        for k, v in bounds.items():
            setattr(gm, k, v)
        if points is not None:
            gm.set_point_schedule(points or None)
        return self.session_record(name)

    def recover_session(self, name: str) -> int:
        """Site-loss recovery of session ``name`` at this unit (its
        secondary) alone, its primary unit(s) lost: settle a consistency
        group left in doubt by the seed's rule, fail each B over (a
        suspended primary of a pair B->A recorded here, recording every
        track B changes), fast-reverse-restore each C onto its B, let B take
        host writes, and end the session (each B->C FlashCopy stays). When
        the primary's unit is opened beside this one again, the pair A->B is
        restored failed over (``failback()`` resyncs from B to A, sending
        the tracks changed on either side). Returns the CG sequence every B
        holds. See :mod:`fastfc.durable.siteloss`."""
        return recover_session(self, name)

    def forget_failover(self, volume: str) -> int:
        """After :meth:`recover_session`, the old primary lost for good:
        forget the record of B's failover (the pair B->A and the tracks it
        recorded, returned as a count); B stays host-writable, free to join
        a new pair or session. See :func:`fastfc.durable.siteloss.forget_failover`."""
        return forget_failover(self, volume)

    # -- restore ---------------------------------------------------------------------
    def _restore_local(self) -> None:
        st = self._sqlite
        for rec in st.volume_records():
            name, n_tracks, track_size = rec["name"], rec["n_tracks"], rec["track_size"]
            file = self._volume_file(name)
            if not file.exists():
                why = f"volume file {file} is missing"
                self._volume_problems[name] = why
                self.recovered.append(f"volume {name}: not opened: {why}; "
                                      f"{_REMOVE_VOLUME.format(name=name)} removes its row")
                continue
            size = file.stat().st_size
            if size != n_tracks * track_size:
                raise CorruptUnitError(f"volume file {file} holds {size} bytes; the unit "
                                       f"records {n_tracks} tracks of {track_size} bytes")
            vol: Volume
            if self.readonly:
                vol = ReadOnlyVolume(n_tracks, track_size, path=file, name=name, store=st,
                                     grain_size=rec["grain_size"])
            else:
                vol = Volume(n_tracks, track_size, path=file, name=name,
                             thin=bool(rec["thin"]), store=st, grain_size=rec["grain_size"])
            vol.unit = self
            vol.set_flags(secondary=bool(rec["secondary"]), valid=not rec["invalid"])
            self._volumes[name] = vol
        rebuilt: list[FlashCopy] = []
        incomplete: set[int] = set()      # (ids of targets made invalid here)
        for row in st.flash_rows():
            key = (row["source"], row["target"])
            complete = st.flash_image_complete(row)
            problem: str | None = self._missing_volumes(key)
            if problem is None:
                try:
                    rec = st.flash_record(dict(row), self._volumes[key[0]].n_grains)
                except CorruptUnitError as e:
                    problem = str(e)
                else:
                    rebuilt.append(FlashCopy.from_record(
                        self._volumes[key[0]], self._volumes[key[1]], rec, start=False))
                    continue
            st.keep_bitmaps("fc", row)
            self._flash_damage.setdefault(key, (row, problem))
            tgt = self._volumes.get(key[1])
            if tgt is not None and not complete:
                tgt.set_flags(valid=False)     # it read tracks from its source
                incomplete.add(id(tgt))
            self.recovered.append(
                f"FlashCopy {key[0]}:{key[1]}: not restored: {problem}"
                + (f"; {key[1]} is invalid (its image was incomplete)"
                   if tgt is not None and not complete else "")
                + f"; {_REMOVE_FLASHCOPY.format(source=key[0], target=key[1])} "
                "removes its row")
        self._invalid_below_damage(rebuilt, incomplete)
        # a cascade's background copies start once every relationship of its
        # chain is in place (a copy out of a middle volume reads through it)
        if not self.readonly:
            for rel in rebuilt:
                rel.start_background()
        # their bitmaps stay alive (the store keeps them as the rows') until restored
        self._pair_rows = []
        for row in st.pair_rows():
            key = (row["primary_name"], row["secondary_name"])
            problem = self._missing_volumes(key[:1])
            if problem is None:
                try:
                    rec = st.pair_record(dict(row), self._volumes[key[0]].n_grains)
                except CorruptUnitError as e:
                    problem = str(e)
                else:
                    self._pair_rows.append(self._pending(rec))
                    continue
            st.keep_bitmaps("pair", row)
            self._pair_damaged(key, row, problem)
        for rec in self._pair_rows:
            # until the secondary unit is open too, host writes to the primary
            # are recorded in the pair's out-of-sync bitmap, as when suspended
            hook = MirrorBase()
            hook.oos = rec["oos"]
            self._row_volume(rec["primary_name"]).set_mirror(hook)
        st.collect_orphans()
        self._resolve_interrupted_cgs()
        # a session's B->C relationships are its own while it is recorded,
        # restored or not (its primary's unit away): a user's step on one is
        # refused (FlashCopy.withdraw, resync, ...), recover_session lets go
        for name, cfg in st.session_rows().items():
            for _, _, b_name, c_name in cfg["triplets"]:
                c = self._volumes.get(c_name)
                fc = c.target_relationship if c is not None else None
                if isinstance(fc, FlashCopy) and fc.source.name == b_name:
                    fc.session = name

    def _invalid_below_damage(self, rebuilt: list, bad: set[int]) -> None:
        """A cascade below a FlashCopy that could not be restored: a target
        that still reads grains through a volume made invalid here (``bad``,
        ids: its image was incomplete) is invalid too, and so on down the
        chain."""
        grew = True
        while grew:
            grew = False
            for fc in rebuilt:
                t = fc.target
                if id(fc.source) in bad and id(t) not in bad and fc.to_copy.any():
                    t.set_flags(valid=False)
                    bad.add(id(t))
                    grew = True
                    self.recovered.append(
                        f"FlashCopy {fc.source.name}:{t.name}: {t.name} is invalid (it "
                        f"still read grains through {fc.source.name}, whose image was "
                        "incomplete)")

    def _missing_volumes(self, names) -> str | None:
        """What is wrong when volumes a row names are not in this unit."""
        gone = [n for n in names if n not in self._volumes]
        if not gone:
            return None
        return ", ".join(f"volume {n!r} is not in this unit"
                         + (" (its file is missing)" if n in self._volume_problems else "")
                         for n in gone)

    def _pair_damaged(self, key: tuple[str, str], row: dict, problem: str) -> None:
        """Pair ``key`` cannot be restored: say so (in :attr:`recovered` and
        :attr:`relationship_problems`) and leave it unloaded."""
        if key in self._pair_damage:
            return
        self._pair_damage[key] = (row, problem)
        self.recovered.append(f"pair {key[0]}:{key[1]}: not restored: {problem}; "
                              f"{_REMOVE_PAIR.format(primary=key[0], secondary=key[1])} "
                              "removes its row")

    def _row_volume(self, name: str) -> Volume:
        try:
            return self._volumes[name]
        except KeyError:
            raise CorruptUnitError(f"the unit database names volume {name!r}, "
                                   "which it does not hold") from None

    def _resolve_interrupted_cgs(self) -> None:
        """A CG whose FlashCopy phase a crash interrupted: ended by the seed's
        rule (:func:`~fastfc.copyservices.resolution.resolve`) with the
        decision recorded for it: commit the rest if its record says commit
        (or a relationship committed it), otherwise revert all."""
        by_target = {fc.target.name: fc for fc in self.flashcopies}
        for name, cfg in self.store.session_rows().items():
            fcs = [by_target.get(c) for (_, _, _, c) in cfg["triplets"]]
            for (_, _, b, c), fc in zip(cfg["triplets"], fcs):
                if fc is None or fc.source.name != b:
                    self._damaged(name, f"C volume {c!r} has no FlashCopy from {b!r}")
                    break
            rels = [(fc.revertible, fc.sequence) for fc in fcs if fc is not None]
            seq = pending_sequence(rels)
            if seq is None:
                self._lift_unstepped(name, cfg, fcs)
                continue
            pending = [fc for fc in fcs if fc is not None and fc.revertible]
            if self.readonly:
                raise ReadOnlyUnitError(
                    f"storage unit {self.path}: consistency group {seq} of session {name!r} "
                    "was interrupted and must be resolved on disk; open the unit "
                    "read-write once, then read-only opens work again")
            action, _ = resolve(rels, decision=self._sqlite.decision(name, seq))
            with self.store.transaction():
                for fc in pending:
                    (fc.commit if action == "commit" else fc.revert)(session=name)
            on = len(pending)
            if action == "commit":      # (those the CG did not step hold it too)
                on += sum(1 for q in self._lift_unstepped(name, cfg, fcs) if q == seq)
            else:
                self._lift_unstepped(name, cfg, fcs)
            self.recovered.append(f"session {name}: CG {seq} "
                                  f"{'committed' if action == 'commit' else 'reverted'} "
                                  f"on {on} of {len(fcs)} volumes")

    def _lift_unstepped(self, name: str, cfg: dict,
                        fcs: list[FlashCopy | None]) -> list[int]:
        """The relationships of session ``name`` that its newest CGs did not
        step (their B did not change: sparse steps) carry the session's
        committed CG (:func:`~fastfc.copyservices.resolution.group_sequence`),
        which their records do not name: give it to them, and record it
        (a unit opened read-only gives it in memory only). Returns the
        number each one lifted carries now."""
        live = [fc for fc in fcs if fc is not None]
        rels = [(fc.revertible, fc.sequence) for fc in live]
        stats = cfg.get("stats") or {}
        top = group_sequence(rels, recorded=stats.get("sequence") or 0,
                             decisions=self._sqlite.decisions_of(name))
        lifted = [fc for fc in live if fc.active and not fc.revertible and fc.sequence < top]
        if not lifted:
            return []
        for fc in lifted:
            fc.sequence = top
        if not self.readonly:
            with self.store.transaction(sync=False):
                self.store.save_flashes([fc.to_record() for fc in lifted])
        return [top] * len(lifted)

    def _restore_pairs(self) -> None:
        """Rebuild the pairs whose secondary unit is open now."""
        if self._closed or self.path is None:
            return
        for row in list(self._pair_rows):
            if not any(r is row for r in self._pair_rows):
                continue    # a failover record merged into its pair (in this unit)
            sec_unit = self._partner(row["secondary_uuid"])
            if sec_unit is None or is_site_failover(row):
                # a B failed over keeps its record until its primary's unit
                # restores the pair (restore_merged)
                continue
            primary = self._row_volume(row["primary_name"])
            if row["secondary_name"] not in sec_unit._volumes:
                problem = (f"volume {row['secondary_name']!r} is not in unit {sec_unit.path}"
                           + (" (its file is missing)" if row["secondary_name"] in
                              sec_unit._volume_problems else ""))
                if type(primary.mirror) is MirrorBase:
                    primary.set_mirror(None)      # it records for no pair
                self._pair_rows = [r for r in self._pair_rows if r is not row]
                ids = {k: (v.file_id if v is not None else None)
                       for k, v in row.items() if k in _PAIR_MAPS}
                self._pair_damaged((row["primary_name"], row["secondary_name"]),
                                   dict(row, secondary_unit=row["secondary_uuid"], **ids),
                                   problem)
                continue
            secondary = sec_unit._row_volume(row["secondary_name"])
            if restore_merged(self, sec_unit, row, primary, secondary) is None:
                if ended_at_secondary(self, sec_unit, row, primary, secondary):
                    if self.readonly:
                        continue
                else:
                    PPRCPair.from_record(primary, secondary, row)
            self._pair_rows = [r for r in self._pair_rows if r is not row]

    def _damaged(self, name: str, problem: str) -> None:
        """Session ``name`` cannot be restored: say so (in :attr:`recovered`
        and :attr:`session_problems`) and leave it unloaded."""
        if name in self._session_problems:
            return
        self._session_problems[name] = problem
        self.recovered.append(f"session {name}: not restored: {problem}; "
                              f"{_REMOVE_SESSION.format(name=name)} removes what is left of it")

    def _restore_sessions(self) -> None:
        """Rebuild the sessions whose primary units (and pairs) are back.
        A session whose rows do not fit what the units hold is left
        unloaded, its problem named (:meth:`_damaged`)."""
        if self._closed or self.path is None:
            return
        for name, cfg in self.store.session_rows().items():
            if name in self.sessions or name in self._session_problems:
                continue
            parts = []
            for a_unit, a_name, b_name, c_name in cfg["triplets"]:
                unit_a = self._partner(a_unit)
                if unit_a is None:
                    break
                missing = [(u, v) for u, v in ((unit_a, a_name), (self, b_name),
                                               (self, c_name)) if v not in u._volumes]
                if missing:
                    self._damaged(name, ", ".join(f"volume {v!r} is not in unit {u.path}"
                                                  for u, v in missing))
                    break
                a, b = unit_a._volumes[a_name], self._volumes[b_name]
                c = self._volumes[c_name]
                if type(a.mirror) is MirrorBase:
                    break       # its pair waits for this unit to agree: not yet
                # a restored pair and a FlashCopy (the only relationship there is)
                pair = a.mirror if isinstance(a.mirror, PPRCPair) else None
                fc = cast("FlashCopy | None", c.target_relationship)
                if pair is None or pair.secondary is not b:
                    back = b.mirror
                    self._damaged(name, f"pair {a_name}:{b_name} runs the other way "
                                  f"({b_name}:{a_name})" if isinstance(back, PPRCPair)
                                  and back.secondary is a else f"pair {a_name}:{b_name} is gone")
                    break
                if fc is None or fc.source is not b:
                    self._damaged(name, f"C volume {c_name!r} has no FlashCopy from {b_name!r}")
                    break
                parts.append(Triplet(a, b, c, pair, fc))
            else:
                link = parts[0].pair.link
                for t in parts:
                    t.pair.link = link
                self.sessions[name] = GlobalMirror.from_record(dict(cfg, name=name), parts,
                                                               link=link)
                self._keep_session_points(self.sessions[name])

    # == sessions served to a primary in another process ===============================
    # What fastfc.remote's UnitServer needs of the unit, as public calls: the
    # unit is the secondary of a Global Mirror session whose primary (and
    # whose session object) live in another process. The unit records the
    # session's membership (its B->C pairs), the session's CG decisions and
    # what this unit carried out per CG, in unit.db. Opening the unit does not
    # settle such a session's CG: the session (or recovery over all its units)
    # does, by the seed's rule.
    _DECISION_KEY = "#coord"   # decision rows: the session's recorded decision
    _OUTCOME_KEY = "#unit"     # decision rows: what this unit carried out

    def served_sessions(self) -> dict[str, list[tuple[str, str]]]:
        """The sessions this unit serves as a secondary to a primary in
        another process: each one's B->C pairs (volume names), in the
        session's order."""
        self._require_open()
        if self.path is None:
            return {}
        if self._served is None:
            self._served = self._sqlite.served_sessions()
        return {k: list(v) for k, v in self._served.items()}

    def serve_session(self, name: str, pairs) -> list[int]:
        """Join session ``name`` as its secondary for the B->C ``pairs``
        (volume names): in one transaction, record the membership, establish
        each B->C FlashCopy (change recording, no background copy, C
        refusing writes, sequence 0) and hold each B as a secondary (it
        refuses host writes; PPRC updates land). Called again with the same
        pairs (a retry, a restarted primary), it finds them and changes
        nothing. Returns each C's CG sequence.

        Raises ValueError if the unit serves ``name`` with other pairs, or a
        volume is not free (in a pair, a FlashCopy or another session),
        KeyError naming a missing volume; nothing is changed then."""
        self._require_writable()
        if self.path is None:
            raise StateError("a memory unit serves no session to another process "
                             "(open the unit on a directory)")
        if not isinstance(name, str) or not name:
            raise ValueError(f"a session name is a non-empty string, got {name!r}")
        names = [(str(b), str(c)) for b, c in pairs]
        if not names:
            raise ValueError(f"session {name!r} needs at least one B->C pair")
        flat = [v for p in names for v in p]
        if len(set(flat)) != len(flat):
            raise ValueError(f"session {name!r}: a volume appears twice in {names}")
        known = self.served_sessions().get(name)
        if known is not None and known != names:
            raise ValueError(f"unit {self.path} holds session {name!r} with other "
                             f"volumes ({[list(p) for p in known]}); remove it first "
                             "(StorageUnit.remove_served_session) or use another name")
        vols = [(self.volume(b), self.volume(c)) for b, c in names]
        seqs, todo = [], []
        for b, c in vols:
            fc = c.target_relationship
            if known is not None and isinstance(fc, FlashCopy) and fc.source is b:
                seqs.append(fc.sequence)
                continue
            if b.mirror is not None or b.is_secondary or b.relationships or c.relationships:
                raise ValueError(f"{b.name} and {c.name} of unit {self.path} must be free "
                                 "volumes (no pair, no FlashCopy) to join a session")
            if (b.n_tracks, b.track_size, b.grain_size) != (c.n_tracks, c.track_size,
                                                            c.grain_size):
                raise ValueError(f"{b.name} and {c.name} of unit {self.path} differ in "
                                 "geometry (tracks, track size, grain)")
            todo.append((b, c))
            seqs.append(0)
        if known is not None and not todo:
            return seqs
        try:
            with self.store.transaction():
                if known is None:
                    self._sqlite.add_served_session(name, names)
                for b, c in todo:
                    FlashCopy(b, c, background_copy=False, record=True,
                              inhibit_target_write=True, sequence=0)
                    b.set_flags(secondary=True)
                    self.store.set_volume_flags(b.flags_record())
        finally:
            self._served = None
        return seqs

    def served_flashcopies(self, name: str) -> list[FlashCopy]:
        """The B->C FlashCopy relationships of served session ``name``, in
        its order. StateError if the unit serves no such session, or one of
        them is gone."""
        self._require_open()
        pairs = self.served_sessions().get(name)
        if pairs is None:
            raise StateError(f"unit {self.path} holds no session {name!r}")
        out = []
        for b, c in pairs:
            fc = self.volume(c).target_relationship
            if not isinstance(fc, FlashCopy) or fc.source is not self.volume(b):
                raise StateError(f"unit {self.path}: {b}->{c} has no FlashCopy")
            out.append(fc)
        return out

    def apply_updates(self, updates, before: Callable[[int], None] | None = None) -> int:
        """PPRC updates to served secondaries (a remote primary's drain and
        Global Copy): for each ``(name, offsets, rows)``, ``rows[i]`` to
        volume ``name`` at byte ``offsets[i]``, one locked batch per piece
        (``Volume.write_batch`` as PPRC updates: B's write-inhibit and its
        copy-on-write to C apply). ``before(i)``, if given, is called before
        the i-th piece is written (crash tests stop there). Returns the
        bytes written.

        At durability "power" this is the ordered drain of a unit in one
        process, on the unit's side: first, for each volume the call writes
        and each FlashCopy whose source it is (a served B->C), the tracks it
        will overwrite are made overwritable
        (:meth:`FlashCopy.make_overwritable`: change bits, then C's copies
        of the old tracks, then the cleared ``to_copy`` bits, each synced
        before the next); then the pieces are written; then the volumes
        written are synced before the call returns. So a power cut anywhere
        leaves each C on its image, and an update the caller saw answered
        (and stopped owing) is on the disk."""
        self._require_writable()
        vols = [self.volume(name) for name, _, _ in updates]
        ordered = self.durability == "power"
        if ordered:
            self._order_updates(vols, updates)
        n = 0
        for i, (vol, (_, offsets, rows)) in enumerate(zip(vols, updates)):
            if before is not None:
                before(i)
            vol.write_batch(offsets, rows, PPRC)
            n += rows.size
        if ordered:     # what the caller stops owing once answered, on the disk first
            self.store.sync(*{id(v): v for v in vols}.values())
        return n

    def _order_updates(self, vols: list[Volume], updates) -> None:
        """Durability "power", before :meth:`apply_updates` writes: every
        track it will overwrite made overwritable for each FlashCopy whose
        source is written (:meth:`FlashCopy.make_overwritable`, per volume
        and relationship, as the ordered drain of a session in one process
        does per pair). A write the volume would refuse (a source a
        revertible CG holds write-inhibited) is left for ``write_batch`` to
        refuse, nothing changed."""
        touched: dict[int, tuple[Volume, np.ndarray]] = {}
        for vol, (_, offsets, rows) in zip(vols, updates):
            rels = vol.source_relationships
            if not rels or any(r.revertible for r in rels):
                continue
            if id(vol) not in touched:
                touched[id(vol)] = (vol, np.zeros(vol.n_grains, dtype=bool))
            grains = touched[id(vol)][1]
            offs = np.asarray(offsets, dtype=np.int64)
            length = int(rows.shape[1]) if rows.ndim == 2 else 0
            if not length or not len(offs):
                continue
            gs = vol.grain_size
            start = np.clip(offs // gs, 0, vol.n_grains)
            stop = np.clip((offs + length - 1) // gs + 1, 0, vol.n_grains)
            if int((stop - start).max()) == 1:
                grains[start] = True
            else:
                for t0, t1 in zip(start.tolist(), stop.tolist()):
                    grains[t0:t1] = True
        for vol, grains in touched.values():
            if not grains.any():
                continue
            mask = TrackBitmap.from_bools(grains)
            for rel in vol.source_relationships:
                cast(FlashCopy, rel).make_overwritable(mask)

    def record_cg_decision(self, name: str, sequence: int, decision: str) -> None:
        """Record the decision ("commit" or "revert") served session
        ``name`` made for CG ``sequence`` (the session keeps it on its first
        unit, before any unit carries it out)."""
        self._served_record(name + self._DECISION_KEY, sequence, decision)

    def cg_decisions(self, name: str) -> dict[int, str]:
        """The decisions recorded by :meth:`record_cg_decision`, by sequence
        (the newest few)."""
        return self._served_rows(name + self._DECISION_KEY)

    def record_cg_outcome(self, name: str, sequence: int, outcome: str) -> None:
        """Record what this unit carried out ("commit" or "revert") for CG
        ``sequence`` of served session ``name``. Inside the transaction that
        carries it out, it is durable with it."""
        self._served_record(name + self._OUTCOME_KEY, sequence, outcome)

    def cg_outcome(self, name: str, sequence: int) -> str | None:
        """What this unit carried out for CG ``sequence`` of served session
        ``name`` ("commit", "revert"), or None."""
        self._require_open()
        return self._sqlite.decision(name + self._OUTCOME_KEY, int(sequence)) \
            if self.path is not None else None

    def cg_outcomes(self, name: str) -> dict[int, str]:
        """What this unit carried out for served session ``name``, by sequence
        (the newest few)."""
        return self._served_rows(name + self._OUTCOME_KEY)

    def restore_served_secondaries(self, name: str) -> list[str]:
        """Site-loss failover of served session ``name`` at this unit: fast-
        reverse-restore each B from its C, then let B take host writes
        (restore first: a crash between the two restores again). A B that
        takes host writes already (restored before, it may hold host writes
        since) is left alone. Refused (StateError, nothing changed) unless
        every C is on one settled CG. Returns the B volumes restored."""
        self._require_writable()
        fcs = self.served_flashcopies(name)
        if any(fc.revertible for fc in fcs) or len({fc.sequence for fc in fcs}) > 1:
            raise StateError(f"unit {self.path}: the C volumes of {name!r} are not on "
                             "one settled CG; recover the session first")
        done = []
        for fc in fcs:
            b = fc.source
            if not b.is_secondary:
                continue
            fc.reverse_restore()
            b.set_flags(secondary=False)
            self.store.set_volume_flags(b.flags_record())
            done.append(b.name)
        return done

    def rejoin_served_session(self, name: str, pairs, min_sequence: int = 0) -> list[int]:
        """A primary continues served session ``name`` (a new primary
        process attached to it): check the unit serves it with exactly the
        B->C ``pairs`` (volume names, in order), each C on CG
        ``min_sequence`` or a newer one (what the primary recorded as
        committed), and hold each B as a secondary again (one a site-loss
        recovery let take host writes refuses them from now on; the primary
        sends what B differs in). Returns each C's CG sequence. StateError
        (nothing changed) if the unit serves no such session, serves it
        with other pairs, or holds an older CG."""
        self._require_writable()
        names = [(str(b), str(c)) for b, c in pairs]
        known = self.served_sessions().get(name)
        if known is None:
            raise StateError(f"unit {self.path} serves no session {name!r}: the primary's "
                             "record names a session this unit does not hold")
        if known != names:
            raise StateError(f"unit {self.path} serves session {name!r} with "
                             f"{[list(p) for p in known]}, the primary's record names "
                             f"{[list(p) for p in names]}: the records disagree")
        fcs = self.served_flashcopies(name)
        old = [fc.target.name for fc in fcs if fc.sequence < min_sequence]
        if old:
            raise StateError(f"unit {self.path}: {', '.join(old)} of session {name!r} hold a CG "
                             f"older than CG {min_sequence}, which the primary's record says "
                             "committed (a unit restored from an older copy?): the records "
                             "disagree")
        back = [fc.source for fc in fcs if not fc.source.is_secondary]
        if back:
            with self.store.transaction():
                for b in back:
                    b.set_flags(secondary=True)
                    self.store.set_volume_flags(b.flags_record())
        return [int(fc.sequence) for fc in fcs]

    def remove_served_session(self, name: str, *, copy: bool = False,
                              on_copy: Callable[[int, int], None] | None = None) -> list[str]:
        """End served session ``name`` at this unit (its primary is done with
        it, or lost for good): withdraw each B->C FlashCopy (a revertible one
        is reverted first), let each B take host writes, and forget the
        session's membership and CG records. ``copy=False`` withdraws at
        once (a C still reading tracks from its B turns invalid);
        ``copy=True`` first copies those tracks B -> C (``on_copy(copied,
        total)`` reports the progress; refused while a C is revertible), so
        every C keeps its image. Returns what was removed, for messages.
        KeyError if the unit serves no such session."""
        self._require_writable()
        pairs = self.served_sessions().get(name)
        if pairs is None:
            raise KeyError(f"unit {self.path} serves no session named {name!r}")
        fcs: list[FlashCopy] = []
        bs: list[Volume] = []
        for b_name, c_name in pairs:
            b = self._volumes.get(b_name)
            c = self._volumes.get(c_name)
            fc = c.target_relationship if c is not None else None
            if b is not None:
                bs.append(b)
            if isinstance(fc, FlashCopy) and fc.source is b:
                fcs.append(fc)
        if copy:
            if any(fc.revertible for fc in fcs):
                raise StateError(f"served session {name!r}: a C volume is still revertible "
                                 "(the C volumes are not on one CG); nothing copied")
            copy_to_c(fcs, on_copy)
        removed = []
        for fc in fcs:
            if fc.revertible:
                fc.revert()
            fc.withdraw(force=True)
            removed.append(f"FlashCopy {fc.source.name}:{fc.target.name}")
        for b in bs:
            if b.is_secondary and b.mirror is None:
                b.set_flags(secondary=False)
                self.store.set_volume_flags(b.flags_record())
                removed.append(f"the secondary role of {b.name}")
        try:
            self._sqlite.drop_served_session(name)
        finally:
            self._served = None
        return removed

    def abandon(self) -> None:
        """Let go of the unit as a process killed now would: nothing is
        stopped, flushed or resolved (volumes and unit.db stay as the last
        completed step left them); the files and the lock are released and
        the object is closed. For in-process doubles of a crash (the next
        open recovers as after a real one)."""
        if self._closed:
            return
        self._closed = True
        self._release_files()

    def _served_record(self, key: str, sequence: int, value: str) -> None:
        self._require_writable()
        if value not in ("commit", "revert"):
            raise ValueError(f"a CG ends as 'commit' or 'revert', got {value!r}")
        if self.path is None:
            raise StateError("a memory unit serves no session to another process")
        self._sqlite.cg_decision(key, int(sequence), value)

    def _served_rows(self, key: str) -> dict[int, str]:
        self._require_open()
        return self._sqlite.decisions_of(key) if self.path is not None else {}

    # == (end of sessions served to a primary in another process) ====================

    # -- lifecycle ---------------------------------------------------------------------
    def flush(self) -> None:
        """Make host data and bitmaps durable against power loss: FlashCopy
        targets and bitmaps first, then the other volumes, so that a target's
        copy-on-write data reaches the disk before the source overwrite it
        protects."""
        self._require_open()
        vols = list(self._volumes.values())
        targets = [v for v in vols if v.target_relationship is not None]
        for v in targets:
            v.flush()
        if self.path is not None:
            self.points.flush()     # copy-on-write grains before the overwrites
        maps = [bm for fc in self.flashcopies for bm in (fc.to_copy, fc.src_changed,
                                                         fc.tgt_changed)]
        maps += [bm for pair in self.pairs for bm in (pair.oos, pair.spare, pair.cg)]
        # what a pair waiting for its partner, or a failed-over B, records in
        maps += [v.mirror.oos for v in vols if type(v.mirror) is MirrorBase]
        for bm in maps:
            if bm is not None and hasattr(bm, "flush"):
                bm.flush()
        for v in vols:
            if v.target_relationship is None:
                v.flush()
        if self.path is not None and not self.readonly:
            self._sqlite.sync_point()   # metadata last: it never names data not on disk

    def close(self) -> None:
        """Stop sessions and pairs, flush, and release every file. Idempotent."""
        if self._closed:
            return
        for s in self.sessions.values():
            s.stop()
        for p in self.pairs:
            p.stop()
        if self.path is not None:
            try:
                self._prune_partners()
            except (sqlite3.Error, OSError, ReadOnlyUnitError):
                pass    # a stale partner entry is harmless; closing matters
            self._detach_partners()
        workers = [w for w in (r.background_worker for r in self.flashcopies) if w is not None]
        full: NoSpaceError | None = None
        if self.path is not None:
            try:
                self.flush()
            except NoSpaceError as e:
                full = e    # no room to checkpoint: the WAL keeps every row
        self._closed = True
        self._release_files(workers)
        if full is not None:
            raise full      # closed all the same (files and lock released)

    def _detach_partners(self) -> None:
        """Other open units let go of the sessions and pairs that span this
        unit, so that they are restored when it opens again: a session whose
        A volumes are here is stopped and forgotten; a pair whose secondary
        is here goes back to waiting for it, its primary recording host
        writes in the out-of-sync bitmap meanwhile."""
        with _registry_lock:
            others = [u for u in _open_units.values() if u is not self]
        for pair in self.pairs:
            # a failed-over B in another unit keeps recording its host writes
            # in its record there, listed (and merged again) until this unit is back
            rec = pair.failover_record
            other_b = pair.secondary.unit
            if rec is not None and other_b is not self and other_b in others:
                other_b._pair_rows.append(other_b._pending(dict(rec)))
        for other in others:
            for name, s in list(other.sessions.items()):
                if any(t.a.store is self.store for t in s.triplets):
                    s.stop()
                    del other.sessions[name]
            for pair in other.pairs:
                if pair.secondary.store is not self.store:
                    continue
                pair.stop()
                with locked((pair.primary,)):
                    if pair.cg is not None:     # no session runs: not mid-drain
                        pair.cg_end(False)
                    row = other._pending(pair.to_record())
                    hook = MirrorBase()
                    hook.oos = pair.oos
                    pair.primary.set_mirror(hook)
                    pair.active = False
                other._pair_rows.append(row)

    def _release_files(self, workers=()) -> None:
        for v in self._volumes.values():
            v.close()
        self.points.close()
        # background-copy workers stop at their next chunk once the volumes are
        # closed, but one may be ending its relationship (a row to delete): the
        # store closes after them
        for t in workers:
            t.join()
        if self.path is not None:
            try:
                self._sqlite.close()
            finally:
                with _registry_lock:
                    if _open_units.get(str(self.path)) is self:
                        del _open_units[str(self.path)]
                    for other in _open_units.values():
                        if self.uuid is not None and other._links.get(self.uuid) is self:
                            del other._links[self.uuid]
                self._unit_lock.release()

    @property
    def _sqlite(self) -> SQLiteStore:
        """The store of a unit on disk (``path`` set): its SQLiteStore."""
        return cast(SQLiteStore, self.store)

    def _require_open(self) -> None:
        if self._closed:
            raise UnitClosedError(f"storage unit {self.path or '(memory)'} is closed")

    def _require_writable(self) -> None:
        self._require_open()
        if self.readonly:
            raise ReadOnlyUnitError(f"storage unit {self.path} is open read-only; "
                                    "open it read-write to change it")

    def __enter__(self) -> "StorageUnit":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # -- partner units -------------------------------------------------------------------
    def _pending(self, record: dict) -> dict:
        """A pair's record (``PPRCPair.to_record()``) while its secondary
        unit is away, with ``secondary_uuid`` (how the record names the
        secondary's unit) and ``secondary_unit`` (where that unit is
        expected; :meth:`describe_partner` says why it is not attached)."""
        ref = record["secondary_unit"]
        where = self._partner_path(ref)
        return dict(record, secondary_uuid=ref,
                    secondary_unit=str(where) if where is not None else ref)

    def _partner_path(self, ref: str) -> Path | None:
        """Where the partner ``ref`` (a uuid; an absolute path in rows
        written before units had ids) is expected."""
        if not ref or self.path is None:
            return None
        if ref == self.uuid:            # a pair or session within this unit
            return self.path
        rel = self._sqlite.partners.get(ref)
        if rel is not None:
            return (self.path / rel).resolve()
        if os.path.isabs(ref):
            return Path(ref)
        return None

    def _partner(self, ref: str) -> "StorageUnit | None":
        """The open unit that is this unit's partner ``ref``, or None. A unit
        counts only if it has that uuid, sits where this unit records it, and
        records this unit where this unit is (or the two were linked by
        :meth:`relink`): a copy of a unit never attaches to the original's
        partner, nor a partner to a copy."""
        if not ref:
            return None
        if ref == self.uuid:            # a pair or session within this unit
            return self
        linked = self._links.get(ref)
        if linked is not None and not linked._closed:
            return linked
        where = self._partner_path(ref)
        if where is None:
            return None
        unit = _open_units.get(str(where))
        if unit is None or unit._closed:
            return None
        if os.path.isabs(ref):          # a row from before units had ids
            return unit
        if unit.uuid != ref or self.uuid is None:
            return None
        if unit._links.get(self.uuid) is self or unit._partner_path(self.uuid) == self.path:
            return unit
        return None

    def _agrees(self, ref: str, where: Path) -> str | None:
        """Why the unit at ``where`` is not partner ``ref`` (None if it is),
        from its metadata, read without opening it."""
        if not (where / "unit.db").exists():
            return f"no unit at {where}"
        if os.path.isabs(ref):
            return None
        open_unit = _open_units.get(str(where))
        if open_unit is not None:
            uid = open_unit.uuid
            back = open_unit._sqlite.partners.get(self.uuid) if self.uuid is not None else None
        else:
            try:
                uid, back = read_identity(where, self.uuid)
            except sqlite3.Error as e:
                return f"the unit at {where} cannot be read ({e})"
        if uid != ref:
            return (f"the unit at {where} is another unit (id {uid}, not {ref}): "
                    "this unit or its partner was copied or replaced")
        if back is None or (where / back).resolve() != self.path:
            return (f"the unit at {where} pairs with a unit at "
                    f"{(where / back).resolve() if back else '(none)'}, not this one at "
                    f"{self.path}: a copy, or units moved apart; name both (-u/-r, "
                    "StorageUnit.relink) to re-link them")
        return None

    def describe_partner(self, ref: str) -> str:
        """A partner for messages: where it is expected, and why it is not
        attached when it is not."""
        where = self._partner_path(ref)
        if where is None:
            return f"unit {ref} (no path recorded)"
        if self._partner(ref) is not None:
            return str(where)
        why = self._agrees(ref, where)
        return str(where) if why is None else f"{where} ({why})"

    def partner_units(self) -> list[Path]:
        """Directories of the units that this unit's pairs and sessions span
        (both ways: the units of its secondaries and session A volumes, and
        the units whose pairs have secondaries here). Only units that agree
        to be the partner are listed (see :meth:`_partner`); a missing or
        disagreeing one is left out, and :meth:`describe_partner` says why."""
        self._require_open()
        if self.path is None:
            return []          # an in-memory unit has no partners on disk
        refs = set(self._sqlite.partners)
        refs.update(r["secondary_uuid"] for r in self._pair_rows if r["secondary_uuid"])
        for cfg in self.store.session_configs().values():
            refs.update(t[0] for t in cfg["triplets"] if t[0])
        refs.discard(self.uuid)         # pairs and sessions within this unit
        found: list[Path] = []
        for ref in sorted(refs):
            unit = self._partner(ref)
            if unit is not None:
                assert unit.path is not None   # an open partner is a unit on disk
                found.append(unit.path)
                continue
            where = self._partner_path(ref)
            if where is not None and self._agrees(ref, where) is None:
                found.append(where)
        return sorted(set(found))

    def relink(self, other: "StorageUnit") -> bool:
        """Re-link a pair of units that moved apart (or a copy to a chosen
        partner): if ``other`` has the id of one of this unit's partners (or
        this unit is one of its), attach the two and record, on each side
        that is open read-write, where the other now is. Pairs and sessions
        between them are restored. Returns whether they are partners; False
        (and nothing changes) for an unrelated unit."""
        self._require_open()
        other._require_open()
        if other is self or self.path is None or other.path is None or \
                self.uuid is None or other.uuid is None:
            return False
        if other.uuid not in self._sqlite.partners and self.uuid not in other._sqlite.partners:
            return False
        with _registry_lock:
            self._links[other.uuid] = other
            other._links[self.uuid] = self
            for a, b in ((self, other), (other, self)):
                if not a.readonly:
                    # both on disk, with ids (checked above)
                    assert a.path is not None and b.path is not None and b.uuid is not None
                    a._sqlite.set_partner(b.uuid, os.path.relpath(b.path, a.path))
            units = list(_open_units.values())
            for unit in units:
                unit._restore_pairs()
            for unit in units:
                unit._restore_sessions()
        return True

    def records_link(self, other: "StorageUnit") -> bool:
        """Whether this unit and ``other`` (partners) each record where the
        other is now, so that they find each other next time without
        :meth:`relink` (read from the open units, nothing written)."""
        self._require_open()
        other._require_open()
        if self.path is None or other.path is None or self.uuid is None or \
                other.uuid is None:
            return False
        return (self._sqlite.partners.get(other.uuid) == os.path.relpath(other.path, self.path)
                and other._sqlite.partners.get(self.uuid) == os.path.relpath(self.path,
                                                                             other.path))

    def _references(self, other: "StorageUnit") -> bool:
        """Whether a pair or session of this unit involves ``other``."""
        if any(p.secondary.store is other.store for p in self.pairs):
            return True
        if any(r["secondary_uuid"] == other.uuid for r in self._pair_rows):
            return True
        if any(t.a.store is other.store for s in self.sessions.values() for t in s.triplets):
            return True
        return any(t[0] == other.uuid for cfg in self.store.session_rows().values()
                   for t in cfg["triplets"])

    def _prune_partners(self) -> None:
        """At close: forget partners (on both sides) that are open and share
        no pair or session with this unit any more."""
        if self.readonly:
            return
        assert self.uuid is not None   # a unit opened read-write has one
        for ref in list(self._sqlite.partners):
            other = self._partner(ref)
            if other is None or self._references(other) or other._references(self):
                continue
            self._sqlite.drop_partner(ref)
            if not other.readonly:
                other._sqlite.drop_partner(self.uuid)


    def __repr__(self) -> str:
        where = str(self.path) if self.path else "memory"
        return (f"<StorageUnit {where} volumes={len(self._volumes)} "
                f"flashcopies={len(self.flashcopies)} sessions={len(self.sessions)}>")
