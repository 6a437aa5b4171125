"""Durable recovery points of a storage unit's volumes.

A volume's chain (:class:`~fastfc.copyservices.points.PointChain`) keeps its
grain pool in ``points/<volume>.pool`` (chunks mapped shared, as volumes
are) and logs every change to its tables, in order, to
``points/<volume>.log``: a point taken, a grain saved into a slot, a point
expired. Opening the unit replays the log and rebuilds the chain exactly.
The points' metadata (seq, name, time taken, retention, group) is in
unit.db (table ``points``).

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

Durability "power": a take's and an expiry's log records are synced before
the call returns (a take's row is committed with a sync before it), and
:meth:`StorageUnit.flush` syncs the pool and the log before the volumes
(the copy-on-write data before the overwrite). No power-cut test covers
points yet.
"""

from __future__ import annotations

import os
import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING, Sequence

import numpy as np

from fastfc.copyservices.points import (PointChain, PointRestore, RecoveryPoint, expire_points,
                                        take_points)
from fastfc.errors import CorruptUnitError, ReadOnlyUnitError, StateError
from fastfc.storage.volume import Volume

if TYPE_CHECKING:
    from fastfc.durable.unit import StorageUnit

class UnitPoints:
    """The durable recovery points of one storage unit (``unit.points``)."""

    def __init__(self, unit: "StorageUnit") -> None:
        self.unit = unit
        self._lock = threading.RLock()
        self._fds: dict[str, tuple[int, int]] = {}     # volume -> (pool fd, log fd)
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
            os.close(fds[0])
            os.close(fds[1])
        if self.unit.path is not None:
            for f in self._files(name):
                f.unlink(missing_ok=True)

    def _files(self, name: str) -> tuple[Path, Path]:
        return self._dir / f"{name}.pool", self._dir / f"{name}.log"

    def _open_files(self, name: str, fresh: bool) -> tuple[int, int]:
        self._dir.mkdir(exist_ok=True)
        pool, log = self._files(name)
        flags = os.O_RDWR | os.O_CREAT | (os.O_TRUNC if fresh else 0)
        pfd = os.open(pool, flags, 0o644)
        try:
            lfd = os.open(log, flags | os.O_APPEND, 0o644)
        except BaseException:
            os.close(pfd)
            raise
        self._fds[name] = (pfd, lfd)
        return pfd, lfd

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
        chain.make_durable(pfd, lfd)
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
                points = take_points(vols, retain_for=retain_for, name=name,
                                     clock=time.time)
            except BaseException:
                with st.transaction():
                    for n, s in zip(names, seqs):
                        st.db.execute("DELETE FROM points WHERE volume=? AND seq=?", (n, s))
                raise
            self._sync_logs(names)
            for p, s in zip(points, seqs):
                if p.seq != s:      # (only this object takes points of the unit's volumes)
                    raise StateError(f"{p!r} took seq {p.seq}, recorded as {s}")
                p.taken_at, p.retain_until = now, now + float(retain_for)
            return points

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
            p.expire()
            self._sync_logs([volume])
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
            expire_points(points)
            self._sync_logs([v for v, _ in refs])
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
        """Rebuild every chain from its log and rows (opening the unit)."""
        st = self.unit._sqlite
        if self.unit.readonly:
            # (a read-only open maps nothing for writing: points are not loaded)
            if st.db.execute("SELECT 1 FROM sqlite_master WHERE name='points'").fetchone() \
                    and st.db.execute("SELECT 1 FROM points LIMIT 1").fetchone():
                self.unit.recovered.append("recovery points: not loaded (a read-only open)")
            return
        rows: dict[str, dict[int, tuple]] = {}
        for vol, seq, name, taken, until, grp in st.db.execute(
                "SELECT volume, seq, name, taken_at, retain_until, grp FROM points"):
            rows.setdefault(vol, {})[int(seq)] = (name, taken, until, grp)
        names = set(rows)
        if self._dir.exists():
            names |= {p.stem for p in self._dir.glob("*.log")}
        stale: list[tuple[str, int]] = []
        for vname in sorted(names):
            mine = rows.get(vname, {})
            if vname not in self.unit:
                stale += [(vname, s) for s in mine]
                continue
            live = self._replay(self.unit.volume(vname), mine)
            stale += [(vname, s) for s in mine if s not in live]
        if stale:
            with st.transaction():
                for vname, s in stale:
                    st.db.execute("DELETE FROM points WHERE volume=? AND seq=?", (vname, s))
        for target, vname, seq in list(st.db.execute(
                "SELECT target, volume, seq FROM point_restores")):
            self._redo_restore(target, vname, int(seq))

    def _replay(self, vol: Volume, rows: dict[int, tuple]) -> set[int]:
        pool, log = self._files(vol.name)
        if not log.exists():
            return set()
        raw = np.fromfile(log, dtype=np.int64)
        recs = raw[: len(raw) // 3 * 3].reshape(-1, 3)   # a torn last record is dropped
        pfd, lfd = self._open_files(vol.name, fresh=False)
        os.ftruncate(lfd, len(recs) * 24)
        chain = PointChain(vol)
        chain.make_durable(pfd, -1)
        try:
            by_seq = chain.replay(recs, lfd)
        except ValueError as e:
            raise CorruptUnitError(f"{log}: {e}") from None
        for seq, p in list(by_seq.items()):
            row = rows.get(seq)
            if row is None:     # taken, never recorded: its take had not returned
                chain.drop(p)
                del by_seq[seq]
                continue
            p.name, p.taken_at, p.retain_until = row[0], row[1], row[2]
        return set(by_seq)

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
            self._forget_restore(target)
            return
        if target in self.unit:
            self.unit.remove_volume(target)
        src = p.volume
        vol = self.unit.create_volume(target, src.n_tracks, src.track_size, thin=True,
                                      grain_size=src.grain_size)
        self._start_restore(p, vol)

    def _sync_logs(self, names: Sequence[str]) -> None:
        """At durability "power": the logs of ``names`` on the disk now (a
        take or an expiry is then on the disk when its call returns)."""
        if self.unit.durability != "power":
            return
        for n in names:
            fds = self._fds.get(n)
            if fds is not None:
                os.fsync(fds[1])

    def flush(self) -> None:
        """The pool and log files to the disk (before the volumes)."""
        for pfd, lfd in self._fds.values():
            os.fsync(pfd)
            os.fsync(lfd)

    def close(self) -> None:
        self._closed = True
        for name in self._fds:
            v = self.unit._volumes.get(name)
            c = PointChain.chain_of(v) if v is not None else None
            if c is not None:
                c.stop_log()
        for pfd, lfd in self._fds.values():
            os.close(pfd)
            os.close(lfd)
        self._fds.clear()
