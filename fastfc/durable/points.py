"""Durable recovery points of a storage unit's volumes.

A volume's chain (:class:`~fastfc.copyservices.points.PointChain`) keeps its
grain pool in ``points/<volume>.pool`` (chunks mapped shared, as volumes
are) and logs every change to its tables, in order, to
``points/<volume>.log`` (mapped shared too, grown in chunks: a record is a
few stores, no system call; format in fastfc/_points_log.pxi): a point
taken, a grain saved into a slot, a point expired. Opening the unit replays
the log and rebuilds the chain exactly; a read-write open rewrites a log
much longer than its chain needs (:data:`COMPACT_MIN_RECORDS`; a new file
written and synced, then renamed over the old one), and a read-only open
loads the points too (the pool mapped privately, nothing written). The
points' metadata (seq, name, time taken, retention, group) is in unit.db
(table ``points``).

Ordering (durability "process": a process killed at any instant):
- a grain's old bytes are in the pool before its log record is written,
  and the record before the host write it protects lands (both by the write
  path, under the volume's lock), so a kill between leaves every point
  reading its image;
- a point's row is committed before it is taken; a row whose take never
  reached the log is dropped on opening (its take had not returned); a point
  in the log without a row (none is: the row comes first) would be expired;
- an expiry is checked against the row's retention (restored on opening, so
  a point retained before a reopen is retained after it), logged, then its
  row deleted; a row whose point the log expired is dropped on opening;
- a restore is recorded (``point_restores``) before it starts and forgotten
  once its copy completes; opening redoes a restore a kill interrupted.

Durability "power" (a power cut at any instant: the kernel may write any
dirty page back at any time, so order takes syncs; tests/test_points_powercut.py):
- a host write that saves grains syncs the pool (their old bytes), then
  writes their records and syncs the log, and only then lands;
- a take's row is committed with a sync, the volumes are synced (the
  point's image is what the disk holds), then the take is logged and the
  log synced, all under the volumes' locks; an expiry's record is synced
  before its lock is released (no slot it frees is reused before the disk
  says it is free), then its row deleted;
- a restore is recorded with a sync; its recovery volume (or the source) is
  synced before the record is forgotten.
At "process", :meth:`StorageUnit.flush` syncs the pool and the log before
the volumes (the copy-on-write data before the overwrite): a power cut is
covered at flush points, and a cut inside a flush leaves the points whole.
"""

from __future__ import annotations

import os
import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING, Sequence

import numpy as np

from fastfc import _core
from fastfc.copyservices.points import (PointChain, PointRestore, RecoveryPoint, expire_points,
                                        take_points)
from fastfc.errors import CorruptUnitError, ReadOnlyUnitError, StateError
from fastfc.storage.volume import Volume, locked

# a read-write open rewrites a log of more records than this that holds
# more than twice the records its chain needs
COMPACT_MIN_RECORDS = 4096

if TYPE_CHECKING:
    from fastfc.durable.unit import StorageUnit

class UnitPoints:
    """The durable recovery points of one storage unit (``unit.points``)."""

    def __init__(self, unit: "StorageUnit") -> None:
        self.unit = unit
        self._lock = threading.RLock()
        self._fds: dict[str, tuple[int, int]] = {}     # volume -> (pool fd, log fd or -1)
        self._restores: dict[str, PointRestore] = {}
        self._closed = False

    def _writable(self) -> None:
        if self.unit.readonly:
            raise ReadOnlyUnitError(f"storage unit {self.unit.path} is open read-only; "
                                    "open it read-write to change its recovery points")

    # -- files ----------------------------------------------------------------
    @property
    def _dir(self) -> Path:
        assert self.unit.path is not None
        return self.unit.path / "points"

    def drop_files(self, name: str) -> None:
        """Forget a removed volume's (empty) chain files."""
        fds = self._fds.pop(name, None)
        if fds is not None:
            self._close_fds(fds)
        if self.unit.path is not None:
            for f in self._files(name):
                f.unlink(missing_ok=True)

    def _files(self, name: str) -> tuple[Path, Path]:
        return self._dir / f"{name}.pool", self._dir / f"{name}.log"

    @staticmethod
    def _close_fds(fds: tuple[int, int]) -> None:
        for fd in fds:
            if fd >= 0:
                os.close(fd)

    def _open_files(self, name: str, fresh: bool) -> tuple[int, int]:
        """The pool's and the log's descriptors (read-only unit: the pool
        read-only, no log)."""
        pool, log = self._files(name)
        if self.unit.readonly:
            pfd = os.open(pool, os.O_RDONLY) if pool.exists() else -1
            self._fds[name] = (pfd, -1)
            return pfd, -1
        self._dir.mkdir(exist_ok=True)
        flags = os.O_RDWR | os.O_CREAT | (os.O_TRUNC if fresh else 0)
        pfd = os.open(pool, flags, 0o644)
        try:
            lfd = os.open(log, flags, 0o644)
        except BaseException:
            os.close(pfd)
            raise
        self._fds[name] = (pfd, lfd)
        return pfd, lfd

    @property
    def _ordered(self) -> bool:
        return self.unit.durability == "power"

    def chain(self, volume: Volume) -> PointChain:
        """``volume``'s chain, made durable (files created) if it has none."""
        if volume.name in self._fds:
            chain = PointChain.chain_of(volume)
            assert chain is not None    # (files are opened for a chain only)
            return chain
        if self.unit.path is None:
            return PointChain.of(volume)
        chain = PointChain(volume)
        pfd, lfd = self._open_files(volume.name, fresh=True)
        chain.make_durable(pfd)
        chain.open_log(lfd, 0, ordered=self._ordered)
        return chain

    # -- the API ------------------------------------------------------------------
    def take(self, names: Sequence[str], *, retain_for: float = 0.0,
             name: str | None = None) -> list[RecoveryPoint]:
        """Take a point of each volume of ``names`` at one instant (their
        locks held together); each row is committed before its point is taken."""
        self._writable()
        names = list(names)
        if not names:
            raise ValueError("recovery points need at least one volume")
        if len(set(names)) != len(names):
            raise ValueError(f"a volume is named twice in {names}")
        vols = [self.unit.volume(n) for n in names]
        with self._lock:
            chains = [self.chain(v) for v in vols]
            if self.unit.path is None:
                return take_points(vols, retain_for=retain_for, name=name)
            now = time.time()
            seqs = [c.next_point_seq for c in chains]
            group = ",".join(f"{n}#{s}" for n, s in zip(names, seqs))
            st = self.unit._sqlite
            with st.transaction():
                for n, s in zip(names, seqs):
                    st.db.execute("INSERT INTO points VALUES(?,?,?,?,?,?)",
                                  (n, s, name, now, now + float(retain_for), group))
            try:
                with locked(vols):
                    if self._ordered:
                        self._sync_images(vols)
                    points = take_points(vols, retain_for=retain_for, name=name,
                                         clock=time.time)
            except BaseException:
                with st.transaction():
                    for n, s in zip(names, seqs):
                        st.db.execute("DELETE FROM points WHERE volume=? AND seq=?", (n, s))
                raise
            for p, s in zip(points, seqs):
                if p.seq != s:      # (only this object takes points of the unit's volumes)
                    raise StateError(f"{p!r} took seq {p.seq}, recorded as {s}")
                p.taken_at, p.retain_until = now, now + float(retain_for)
            return points

    @staticmethod
    def _sync_images(vols: Sequence[Volume]) -> None:
        """Durability "power", before a take is logged (the volumes' locks
        held): their images on the disk, which its unheld grains read."""
        for v in vols:
            v.flush()

    def points(self, volume: str | None = None) -> list[RecoveryPoint]:
        """The live points of ``volume`` (every volume's if None), oldest first."""
        vols = [self.unit.volume(volume)] if volume is not None else self.unit.volumes()
        out: list[RecoveryPoint] = []
        for v in vols:
            c = PointChain.chain_of(v)
            if c is not None:
                out.extend(c.points)
        return out

    def point(self, volume: str, seq: int) -> RecoveryPoint:
        for p in self.points(volume):
            if p.seq == seq:
                return p
        raise KeyError(f"volume {volume!r} holds no recovery point #{seq}")

    def expire(self, volume: str, seq: int) -> None:
        """Expire a point: refused before its retention ends (the check is
        :meth:`RecoveryPoint.expire`'s); logged, then its row deleted."""
        self._writable()
        with self._lock:
            p = self.point(volume, seq)
            p.expire()      # (logged; at "power" synced before it returns)
            if self.unit.path is not None:
                st = self.unit._sqlite
                with st.transaction():
                    st.db.execute("DELETE FROM points WHERE volume=? AND seq=?", (volume, seq))

    def expire_group(self, points: Sequence[RecoveryPoint]) -> None:
        """Expire ``points`` (of distinct volumes of this unit: a Global
        Mirror session's points of its C volumes at one CG) all at once, or
        none if one is retained or read by a restore; logged, then their
        rows deleted in one transaction."""
        self._writable()
        with self._lock:
            refs = [(p.volume.name, p.seq) for p in points]
            for v, s in refs:
                self.point(v, s)        # (each one of this unit's, live)
            expire_points(points)     # (each expiry logged; at "power" synced)
            if self.unit.path is not None:
                st = self.unit._sqlite
                with st.transaction():
                    st.db.executemany("DELETE FROM points WHERE volume=? AND seq=?", refs)

    def retain(self, volume: str, seq: int, until: float) -> None:
        """Keep a point until ``until`` (seconds since the epoch) at least."""
        self._writable()
        with self._lock:
            p = self.point(volume, seq)
            p.retain(until)
            if self.unit.path is not None:
                st = self.unit._sqlite
                with st.transaction():
                    st.db.execute("UPDATE points SET retain_until=? WHERE volume=? AND seq=?",
                                  (p.retain_until, volume, seq))

    def restore(self, volume: str, seq: int, to: str) -> PointRestore:
        """Make volume ``to`` (created, thin, same geometry) take the point's
        image now; the copy runs in the background. A kill before it
        completes is redone on opening."""
        self._writable()
        with self._lock:
            p = self.point(volume, seq)
            src = p.volume
            self._record_restore(to, volume, seq)
            try:
                target = self.unit.create_volume(to, src.n_tracks, src.track_size, thin=True,
                                                 grain_size=src.grain_size)
            except BaseException:
                self._forget_restore(to)
                raise
            return self._start_restore(p, target)

    def _start_restore(self, p: RecoveryPoint, target: Volume) -> PointRestore:
        r = p.restore(target)
        self._restores[target.name] = r

        def forget() -> None:
            while not r.wait(0.1):
                if self._closed:
                    return      # the unit closed under the copy: opening redoes it
            if not r.active and not self._closed:
                try:
                    if self._ordered:
                        target.flush()      # its image on the disk first
                    self._forget_restore(target.name)
                except Exception:
                    pass    # the unit closed under it: opening redoes the restore
        threading.Thread(target=forget, daemon=True, name=f"forget restore {target.name}").start()
        return r

    def restore_onto_source(self, volume: str, seq: int) -> int:
        """Put the point's image back on its own volume (the caller says it
        is quiesced). Recorded first; a kill midway is redone on opening."""
        self._writable()
        with self._lock:
            p = self.point(volume, seq)
            self._record_restore(volume, volume, seq)
            n = p.restore_onto_source(quiesced=True)
            if self._ordered:
                p.volume.flush()        # the image on the disk first
            self._forget_restore(volume)
            return n

    def _record_restore(self, target: str, volume: str, seq: int) -> None:
        if self.unit.path is not None:
            st = self.unit._sqlite
            with st.transaction():
                st.db.execute("INSERT INTO point_restores VALUES(?,?,?)", (target, volume, seq))

    def _forget_restore(self, target: str) -> None:
        if self.unit.path is not None:
            st = self.unit._sqlite
            with st.transaction():
                st.db.execute("DELETE FROM point_restores WHERE target=?", (target,))

    # -- opening, flushing, closing -----------------------------------------------
    def reopen(self) -> None:
        """Rebuild every chain from its log and rows (opening the unit). A
        read-only open loads them too (nothing is written: a point whose
        take never returned is dropped in memory only, an interrupted
        restore is named in ``recovered``, not redone)."""
        st = self.unit._sqlite
        ro = self.unit.readonly
        if ro and not st.db.execute("SELECT 1 FROM sqlite_master WHERE name='points'").fetchone():
            return
        rows: dict[str, dict[int, tuple]] = {}
        for vol, seq, name, taken, until, grp in st.db.execute(
                "SELECT volume, seq, name, taken_at, retain_until, grp FROM points"):
            rows.setdefault(vol, {})[int(seq)] = (name, taken, until, grp)
        names = set(rows)
        if self._dir.exists():
            names |= {p.stem for p in self._dir.glob("*.log")}
            if not ro:
                for left in self._dir.glob("*.log.new"):
                    left.unlink()       # (a compaction a kill cut short)
        stale: list[tuple[str, int]] = []
        for vname in sorted(names):
            mine = rows.get(vname, {})
            if vname not in self.unit:
                stale += [(vname, s) for s in mine]
                continue
            live = self._replay(self.unit.volume(vname), mine)
            stale += [(vname, s) for s in mine if s not in live]
        if stale and not ro:
            with st.transaction():
                for vname, s in stale:
                    st.db.execute("DELETE FROM points WHERE volume=? AND seq=?", (vname, s))
        for target, vname, seq in list(st.db.execute(
                "SELECT target, volume, seq FROM point_restores")):
            if ro:
                self.unit.recovered.append(
                    f"recovery point {vname}#{seq}: its restore onto {target} was "
                    "interrupted; open the unit read-write to redo it")
                continue
            self._redo_restore(target, vname, int(seq))

    @staticmethod
    def _read_log(log: Path) -> tuple[np.ndarray, bool]:
        """A log file's records ((n, 3) int64) and whether it is of the first
        format (24-byte records, no header: rewritten on opening)."""
        raw = log.read_bytes()
        words = np.frombuffer(raw[: len(raw) // 8 * 8], dtype=np.int64)
        if len(words) and words[0] not in (0, _core.LOG_MAGIC):
            recs = words[: len(words) // 3 * 3].reshape(-1, 3)    # a torn last one dropped
            return np.ascontiguousarray(recs), True
        # (all zeros at its start: a new log whose header never reached the disk)
        return _core.point_log_records(np.ascontiguousarray(words)), False

    def _replay(self, vol: Volume, rows: dict[int, tuple]) -> set[int]:
        pool, log = self._files(vol.name)
        if not log.exists():
            return set()
        try:
            recs, first_format = self._read_log(log)
        except ValueError as e:
            raise CorruptUnitError(f"{log}: {e}") from None
        pfd, lfd = self._open_files(vol.name, fresh=False)
        chain = PointChain(vol)
        if pfd >= 0:
            chain.make_durable(pfd, private=self.unit.readonly)
        try:
            by_seq = chain.replay(recs)
        except ValueError as e:
            raise CorruptUnitError(f"{log}: {e}") from None
        if lfd >= 0 and not first_format:
            chain.open_log(lfd, len(recs), ordered=self._ordered)
            if self._ordered:
                # what followed the last valid record was zeroed: on the disk
                # before a record is appended (a record a cut tore, and any
                # after it, must not read as valid behind the next one)
                os.fdatasync(lfd)
        for seq, p in list(by_seq.items()):
            row = rows.get(seq)
            if row is None:     # taken, never recorded: its take had not returned
                chain.drop(p)
                del by_seq[seq]
                continue
            p.name, p.taken_at, p.retain_until = row[0], row[1], row[2]
        if lfd >= 0 and (first_format or len(recs) > COMPACT_MIN_RECORDS):
            self._compact(chain, len(recs), force=first_format)
        return set(by_seq)

    def _compact(self, chain: PointChain, records: int, force: bool = False) -> bool:
        """Rewrite the chain's log from its tables if it holds more than
        twice the records they need (or ``force``): the new log is written
        to ``VOLUME.log.new`` and synced, then renamed over the log (and the
        directory synced). A kill anywhere leaves the old log or the new one
        whole. Whether it was rewritten."""
        recs = chain.compacted_log()
        if not force and records <= 2 * len(recs):
            return False
        name = chain.volume.name
        _, log = self._files(name)
        new = log.with_name(log.name + ".new")
        try:
            fd = os.open(new, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o644)
            try:
                data = memoryview(_core.point_log_bytes(recs))
                while data:
                    data = data[os.write(fd, data):]
                os.fsync(fd)
            finally:
                os.close(fd)
            lfd = os.open(new, os.O_RDWR)
        except OSError as e:
            new.unlink(missing_ok=True)
            if force:
                raise
            # (the old log stays, whole and open: the next open tries again)
            self.unit.recovered.append(f"recovery points of {name}: the log was not "
                                       f"compacted ({e})")
            return False
        pfd, old = self._fds[name]
        chain.stop_log()
        os.close(old)
        self._fds[name] = (pfd, lfd)
        chain.open_log(lfd, len(recs), ordered=self._ordered)
        os.replace(new, log)
        dfd = os.open(self._dir, os.O_RDONLY)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)
        os.fsync(lfd)       # (the log, as its name now names it, is on the disk)
        return True

    def _redo_restore(self, target: str, vname: str, seq: int) -> None:
        try:
            p = self.point(vname, seq)
        except KeyError:
            self._forget_restore(target)
            return
        self.unit.recovered.append(f"recovery point {vname}#{seq}: restore onto {target} "
                                   "redone (a kill interrupted it)")
        if target == vname:
            p.restore_onto_source(quiesced=True)
            if self._ordered:
                p.volume.flush()
            self._forget_restore(target)
            return
        if target in self.unit:
            self.unit.remove_volume(target)
        src = p.volume
        vol = self.unit.create_volume(target, src.n_tracks, src.track_size, thin=True,
                                      grain_size=src.grain_size)
        self._start_restore(p, vol)

    def flush(self) -> None:
        """The pool and log files to the disk (before the volumes)."""
        for pfd, lfd in self._fds.values():
            if lfd >= 0:
                os.fsync(pfd)
                os.fsync(lfd)

    def close(self) -> None:
        self._closed = True
        for name in self._fds:
            v = self.unit._volumes.get(name)
            c = PointChain.chain_of(v) if v is not None else None
            if c is not None:
                c.stop_log()
        for fds in self._fds.values():
            self._close_fds(fds)
        self._fds.clear()
