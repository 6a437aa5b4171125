"""Storage units: a directory of volume files plus crash-safe metadata.

Layout of a unit directory::

    unit.db            SQLite (WAL): volumes, FlashCopy relationships, PPRC
                       pairs, Global Mirror sessions, CG decision records
    volumes/NAME.vol   each volume's bytes, memory-mapped
    bitmaps/ID.bm      each bitmap's words, memory-mapped

Durability (see the README for the whole story):

* every protocol step (establish, resync, revertible resync, commit, revert,
  withdraw, reverse restore, pair state change, CG decision) is committed to
  SQLite before its call returns;
* host data and bitmaps live in shared memory mappings, so a process killed
  at any instant loses nothing it wrote; :meth:`StorageUnit.flush` makes them
  durable against power loss as well (FlashCopy targets and bitmaps first,
  then the other volumes);
* opening a unit resolves a Global Mirror consistency group that was in
  flight by its decision record: commit the rest if "commit" was recorded,
  otherwise revert all.
"""

from __future__ import annotations

import json
import os
import re
import threading
from pathlib import Path

from fastfc._core import MirrorBase
from fastfc.errors import CorruptUnitError, StateError
from fastfc.flashcopy import FlashCopy
from fastfc.globalmirror import GlobalMirror, Triplet
from fastfc.pprc import PPRCPair
from fastfc.store import Store, SQLiteStore
from fastfc.volume import DEFAULT_TRACK, Volume

_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")

# Open units by resolved path: a pair or session spanning two units is
# rebuilt once both are open in this process.
_open_units: dict[str, "StorageUnit"] = {}
_registry_lock = threading.RLock()


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
    group a crash interrupted. A damaged unit raises
    :class:`~fastfc.errors.CorruptUnitError` and is not used.
    """

    def __init__(self, path: str | os.PathLike | None = None) -> None:
        self.path = Path(path).resolve() if path is not None else None
        self._volumes: dict[str, Volume] = {}
        self._pair_rows: list[dict] = []
        self.sessions: dict[str, GlobalMirror] = {}
        self.recovered: list[str] = []     # what opening had to resolve
        self._closed = False
        if self.path is None:
            self.store: Store = Store()
            return
        with _registry_lock:
            if str(self.path) in _open_units:
                raise StateError(f"storage unit {self.path} is already open in this process")
            if self.path.exists() and not self.path.is_dir():
                raise CorruptUnitError(f"{self.path} is not a directory")
            if self.path.exists() and any(self.path.iterdir()) and \
                    not (self.path / "unit.db").exists():
                raise CorruptUnitError(f"{self.path} is not empty and holds no unit.db")
            (self.path / "volumes").mkdir(parents=True, exist_ok=True)
            self.store = SQLiteStore(self.path, str(self.path))
            try:
                self._restore_local()
            except (ValueError, TypeError, KeyError) as e:
                # a row whose values make no sense (bad JSON, NULLs, a mode
                # that does not exist): damaged metadata, not a caller's error
                self._release_files()
                raise CorruptUnitError(f"{self.path}: damaged unit metadata: "
                                       f"{type(e).__name__}: {e}") from e
            except BaseException:
                self._release_files()
                raise
            _open_units[str(self.path)] = self
            units = list(_open_units.values())
            for unit in units:
                unit._restore_pairs()
            for unit in units:
                unit._restore_sessions()

    # -- volumes -----------------------------------------------------------------
    def create_volume(self, name: str, n_tracks: int, track_size: int = DEFAULT_TRACK, *,
                      thin: bool = False) -> Volume:
        """Create a zero-filled volume named ``name`` in this unit.

        Thick by default: its file gets every block now, and a filesystem
        without room raises :class:`~fastfc.errors.NoSpaceError` leaving no
        file and no row. ``thin=True`` keeps the file sparse and reserves
        blocks on first write (see :class:`~fastfc.volume.Volume`); the choice
        is recorded and holds after reopening. In a memory unit ``thin`` has
        no effect."""
        self._require_open()
        if not isinstance(name, str) or not _NAME.match(name):
            raise ValueError(f"volume names are 1-64 letters, digits, '_', '.', '-' "
                             f"(starting with a letter or digit), got {name!r}")
        if name in self._volumes:
            raise ValueError(f"volume {name!r} already exists in this unit")
        if self.path is None:
            vol = Volume(n_tracks, track_size, name=name)
        else:
            file = self._volume_file(name)
            if file.exists():
                file.unlink()   # left by a create that died before its row
            vol = Volume(n_tracks, track_size, path=file, name=name, thin=thin)
            try:
                self.store.add_volume(name, n_tracks, track_size, thin)
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

    def __contains__(self, name: str) -> bool:
        return name in self._volumes

    def remove_volume(self, name: str) -> None:
        """Delete a volume that takes part in no relationship or pair."""
        vol = self.volume(name)
        if vol.relationships or vol._mirror is not None or vol._secondary:
            raise StateError(f"{vol!r} is in a FlashCopy relationship or PPRC pair; "
                             "withdraw or remove those first")
        vol.close()
        del self._volumes[name]
        if self.path is not None:
            self.store.remove_volume(name)
            self._volume_file(name).unlink(missing_ok=True)

    def _volume_file(self, name: str) -> Path:
        return self.path / "volumes" / f"{name}.vol"

    # -- relationships -------------------------------------------------------------
    @property
    def pairs(self) -> list[PPRCPair]:
        """PPRC pairs whose primary is in this unit."""
        return [v._mirror for v in self._volumes.values() if isinstance(v._mirror, PPRCPair)]

    def _register_session(self, session: GlobalMirror) -> None:
        """Called by a new session whose B volumes live here."""
        self.sessions[session.name] = session

    def _forget_session(self, session: GlobalMirror) -> None:
        if self.sessions.get(session.name) is session:
            del self.sessions[session.name]

    @property
    def flashcopies(self) -> list[FlashCopy]:
        """FlashCopy relationships among this unit's volumes."""
        return [r for v in self._volumes.values() for r in v._src_rels]

    def session(self, name: str) -> GlobalMirror:
        """The Global Mirror session ``name`` recorded in this unit."""
        try:
            return self.sessions[name]
        except KeyError:
            pending = self.store.session_rows() if self.path is not None else {}
            if name in pending:
                raise StateError(
                    f"session {name!r} needs its primary unit(s) open in this process: "
                    f"{sorted({t[0] for t in pending[name]['triplets']})}") from None
            raise KeyError(f"no Global Mirror session named {name!r} in this unit") from None

    # -- restore ---------------------------------------------------------------------
    def _restore_local(self) -> None:
        st = self.store
        for name, n_tracks, track_size, secondary, invalid, thin in st.query(
                "SELECT name, n_tracks, track_size, secondary, invalid, thin FROM volumes"):
            file = self._volume_file(name)
            if not file.exists():
                raise CorruptUnitError(f"volume file {file} is missing")
            size = file.stat().st_size
            if size != n_tracks * track_size:
                raise CorruptUnitError(f"volume file {file} holds {size} bytes; the unit "
                                       f"records {n_tracks} tracks of {track_size} bytes")
            vol = Volume(n_tracks, track_size, path=file, name=name, thin=bool(thin))
            vol.unit = self
            vol._secondary = bool(secondary)
            vol._invalid = bool(invalid)
            self._volumes[name] = vol
        for row in st.flash_rows():
            source, target = self._row_volume(row["source"]), self._row_volume(row["target"])
            n = source.n_tracks
            maps = {k: st.load_bitmap(row[k], n) for k in (
                "to_copy", "src_changed", "tgt_changed",
                "rv_to_copy", "rv_src_changed", "rv_tgt_changed")}
            if maps["to_copy"] is None:
                raise CorruptUnitError(f"FlashCopy {row['id']} has no to_copy bitmap")
            fc = FlashCopy._restore(source, target, row, maps, json.loads(row["options"]))
            st._track(("fc", row["id"]), list(maps.values()))
            del fc
        self._pair_rows = st.pair_rows()
        for row in self._pair_rows:  # keep their bitmap files alive until restored
            st._row_bitmaps[("pair", row["id"])] = {row[k] for k in ("oos", "spare", "cg")
                                                    if row[k] is not None}
            primary = self._row_volume(row["primary_name"])
            row["_maps"] = maps = {k: st.load_bitmap(row[k], primary.n_tracks)
                                   for k in ("oos", "spare", "cg")}
            if maps["oos"] is None:
                raise CorruptUnitError(f"PPRC pair {row['id']} has no out-of-sync bitmap")
            # until the secondary unit is open too, host writes to the primary
            # are recorded in the pair's out-of-sync bitmap, as when suspended
            hook = MirrorBase()
            hook.oos = maps["oos"]
            primary._mirror = hook
        st.collect_orphans()
        self._resolve_interrupted_cgs()

    def _row_volume(self, name: str) -> Volume:
        try:
            return self._volumes[name]
        except KeyError:
            raise CorruptUnitError(f"the unit database names volume {name!r}, "
                                   "which it does not hold") from None

    def _resolve_interrupted_cgs(self) -> None:
        """A CG whose FlashCopy phase a crash interrupted: commit the rest if
        its decision record says commit, otherwise revert all."""
        by_target = {fc.target.name: fc for fc in self.flashcopies}
        for name, cfg in self.store.session_rows().items():
            fcs = [by_target.get(c) for (_, _, _, c) in cfg["triplets"]]
            if any(fc is None for fc in fcs):
                raise CorruptUnitError(f"session {name!r} names a C volume without its FlashCopy")
            pending = [fc for fc in fcs if fc.revertible]
            if not pending:
                continue
            seq = pending[0].sequence
            decision = self.store.decision(name, seq)
            with self.store.transaction():
                for fc in pending:
                    fc.commit() if decision == "commit" else fc.revert()
            self.recovered.append(f"session {name}: CG {seq} "
                                  f"{'committed' if decision == 'commit' else 'reverted'} "
                                  f"on {len(pending)} of {len(fcs)} volumes")

    def _restore_pairs(self) -> None:
        """Rebuild the pairs whose secondary unit is open now."""
        if self._closed or self.path is None:
            return
        left = []
        for row in self._pair_rows:
            sec_unit = _open_units.get(row["secondary_unit"]) if row["secondary_unit"] else None
            if sec_unit is None:
                left.append(row)
                continue
            primary = self._row_volume(row["primary_name"])
            secondary = sec_unit._row_volume(row["secondary_name"])
            PPRCPair._restore(primary, secondary, row, row["_maps"])
        self._pair_rows = left

    def _restore_sessions(self) -> None:
        """Rebuild the sessions whose primary units (and pairs) are back."""
        if self._closed or self.path is None:
            return
        for name, cfg in self.store.session_rows().items():
            if name in self.sessions:
                continue
            parts = []
            for a_unit, a_name, b_name, c_name in cfg["triplets"]:
                unit_a = _open_units.get(a_unit)
                if unit_a is None:
                    break
                a, b = unit_a._row_volume(a_name), self._row_volume(b_name)
                c = self._row_volume(c_name)
                pair, fc = a._mirror, c._tgt_rel
                if pair is None or fc is None or pair.secondary is not b:
                    break
                parts.append(Triplet(a, b, c, pair, fc))
            else:
                link = parts[0].pair.link
                for t in parts:
                    t.pair.link = link
                self.sessions[name] = GlobalMirror(
                    [(t.a, t.b, t.c) for t in parts], name=name, link=link,
                    cg_interval=cfg["cg_interval"],
                    max_coordination_time=cfg["max_coordination_time"],
                    max_drain_time=cfg["max_drain_time"], decide=cfg["decide"], _parts=parts)

    # -- lifecycle ---------------------------------------------------------------------
    def flush(self) -> None:
        """Make host data and bitmaps durable against power loss: FlashCopy
        targets and bitmaps first, then the other volumes, so that a target's
        copy-on-write data reaches the disk before the source overwrite it
        protects."""
        self._require_open()
        vols = list(self._volumes.values())
        targets = [v for v in vols if v._tgt_rel is not None]
        for v in targets:
            v.flush()
        maps = [bm for fc in self.flashcopies for bm in (fc.to_copy, fc.src_changed,
                                                         fc.tgt_changed)]
        maps += [bm for pair in self.pairs for bm in (pair.oos, pair.spare, pair.cg)]
        for bm in maps:
            if bm is not None and hasattr(bm, "flush"):
                bm.flush()
        for v in vols:
            if v._tgt_rel is None:
                v.flush()

    def close(self) -> None:
        """Stop sessions and pairs, flush, and release every file. Idempotent."""
        if self._closed:
            return
        for s in self.sessions.values():
            s.stop()
        for p in self.pairs:
            p.stop()
        if self.path is not None:
            self._detach_partners()
        workers = [r._thread for v in self._volumes.values() for r in v._src_rels
                   if r._thread is not None]
        if self.path is not None:
            self.flush()
        self._closed = True
        self._release_files(workers)

    def _detach_partners(self) -> None:
        """Other open units let go of the sessions and pairs that span this
        unit, so that they are restored when it opens again: a session whose
        A volumes are here is stopped and forgotten; a pair whose secondary
        is here goes back to waiting for it, its primary recording host
        writes in the out-of-sync bitmap meanwhile."""
        with _registry_lock:
            others = [u for u in _open_units.values() if u is not self]
        for other in others:
            for name, s in list(other.sessions.items()):
                if any(t.a.unit is self for t in s.triplets):
                    s.stop()
                    del other.sessions[name]
            rows = None
            for pair in other.pairs:
                if pair.secondary.unit is not self:
                    continue
                pair.stop()
                rows = rows if rows is not None else {r["id"]: r for r in other.store.pair_rows()}
                row = rows[pair._store_id]
                A = pair.primary
                A._lock()
                try:
                    if pair.cg is not None:     # no session runs: not mid-drain
                        pair._cg_end(False)
                    row["_maps"] = {"oos": pair.oos, "spare": pair.spare, "cg": None}
                    hook = MirrorBase()
                    hook.oos = pair.oos
                    A._mirror = hook
                    pair.active = False
                finally:
                    A._unlock()
                other._pair_rows.append(row)

    def _release_files(self, workers=()) -> None:
        for v in self._volumes.values():
            v.close()
        # background-copy workers stop at their next chunk once the volumes are
        # closed, but one may be ending its relationship (a row to delete): the
        # store closes after them
        for t in workers:
            t.join()
        if self.path is not None:
            self.store.close()
            with _registry_lock:
                if _open_units.get(str(self.path)) is self:
                    del _open_units[str(self.path)]

    def _require_open(self) -> None:
        if self._closed:
            raise StateError(f"storage unit {self.path or '(memory)'} is closed")

    def __enter__(self) -> "StorageUnit":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __repr__(self) -> str:
        where = str(self.path) if self.path else "memory"
        return (f"<StorageUnit {where} volumes={len(self._volumes)} "
                f"flashcopies={len(self.flashcopies)} sessions={len(self.sessions)}>")
