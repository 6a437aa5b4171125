"""Simulated power cuts for storage units (a test harness, not library code).

A power cut loses what the page cache had not written back. Volume and
bitmap files are memory-mapped, so individual stores cannot be seen; the
disk is modelled per file instead:

* a volume or bitmap file is its content as of its last *sync* (an msync of
  its mapping: ``Volume.flush``, ``FileBitmap.flush``, ``np.memmap.flush``,
  a flush of the volume's ``mmap``, or an ``os.fsync``/``os.fdatasync`` of
  it), where each 4 KiB page that changed since holds **any of its versions**
  since that sync: the synced one, one the recorder observed since, or the
  current one (the kernel may have written any dirty page back at any time,
  in any order, and again later or not); versions are observed at every
  sync and every cut (:meth:`PowerCutRecorder.observe`);
* recovery points' files (``points/V.pool``, ``points/V.log``: mapped
  shared, fsynced) are modelled as the volume files are;
* ``unit.db`` and ``unit.db-wal`` are the files as they were after the last
  *synced* SQLite commit (a commit made with ``PRAGMA synchronous`` >= 2, i.e.
  FULL) or ``sync_point()`` (``wal_checkpoint(FULL)``): the unsynced commits
  since are lost (or, as the other extreme, every commit survived: ``db=
  "current"``). SQLite writes with write(), so reading the files right after
  a synced commit gives what that fsync made durable;
* a file created since it was last known durable (a new bitmap or volume
  file: its directory entry was never synced) is present with a page subset
  over zeros, or absent; one that the cut copy's database names is always
  present (the rows naming it were written after it was created and
  fallocated; filesystem metadata ordering is out of scope, see below).

:class:`PowerCutRecorder` records the synced content by monkeypatching those
sync points (start it right after ``unit.flush()`` of every unit, when disk
== memory); :meth:`PowerCutRecorder.cut` writes a copy of every unit directory
as one power cut could leave it, keeping the units' relative layout so the
copies find each other again (units name partners by uuid + relative path).

What this model does **not** cover (the test is only as strong as it):

* torn writes inside a 4 KiB page (a page is written back whole or not);
* the drive's volatile write cache and FUA: an fsync/msync is taken to mean
  "on stable media" (a drive that lies about flushes is out of scope);
* filesystem metadata (directory entries, file sizes, block allocation) and
  journal replay: files keep their sizes; only a new bitmap file's presence
  is varied;
* SQLite's own recovery of a torn WAL frame or a half-written checkpoint:
  the database is taken whole as of a synced commit (SQLite is trusted);
* real concurrency: cuts are taken at instants where the engine calls back
  (fault points, between CGs) from the thread changing B and C; host writers
  on other threads may run meanwhile (they change A only), but a page version
  that lived only between two observed instants is not among the choices;
* a sync the recorder does not see (a C-level msync/fsync, or an mmap flushed
  through an object other than ``Volume._mm``) would make the model *more*
  pessimistic than the truth, never less: it could report false violations,
  not hide real ones.
"""

from __future__ import annotations

import collections
import os
import shutil
import sqlite3
import tempfile
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from fastfc.durable.sqlite import FileBitmap, SQLiteStore
from fastfc.storage.volume import Volume

PAGE = 4096
DB_FILES = ("unit.db", "unit.db-wal")
# the CG journal (durability "process"): a memory-mapped file, modelled as
# the volume and bitmap files are (its pages as of its last msync, or any
# version since)
JOURNAL = "unit.journal"
IGNORED = ("unit.lock", "unit.db-shm")


def _read(path: Path) -> bytes | None:
    try:
        with open(path, "rb") as f:
            return f.read()
    except FileNotFoundError:
        return None


class _MMapProxy:
    """Stands in for a volume's ``mmap`` object so that a flush of it (also
    a ranged ``flush(offset, size)``) is seen. Everything else is forwarded."""

    def __init__(self, mm, on_flush) -> None:
        object.__setattr__(self, "_real", mm)
        object.__setattr__(self, "_on_flush", on_flush)

    def flush(self, *args):
        r = self._real.flush(*args)
        self._on_flush(*args)
        return r

    def __getattr__(self, name):
        return getattr(self._real, name)

    def __len__(self) -> int:
        return len(self._real)


class PowerCutRecorder:
    """Tracks, for every file of the unit directories ``unit_dirs``, the
    content a power cut could not lose (its last synced content).

    Use as a context manager, or :meth:`start` / :meth:`stop`. ``volumes``
    (optional): open file-backed volumes whose ``mmap`` should be watched for
    ranged flushes (``Volume.flush`` is watched either way).
    """

    def __init__(self, unit_dirs, volumes=()) -> None:
        self.dirs = [Path(d).resolve() for d in unit_dirs]
        parents = {d.parent for d in self.dirs}
        if len(parents) != 1:
            raise ValueError("the unit directories must share one parent (the cut copies "
                             "keep their relative layout)")
        self.parent = parents.pop()
        self.volumes = list(volumes)
        self.synced: dict[Path, bytes] = {}    # file -> content as of its last sync
        self.durable_names: set[Path] = set()  # files whose directory entry is durable
        self.syncs: collections.Counter = collections.Counter()   # what was synced, by kind
        self.log: list[tuple[str, str]] = []   # (kind, file name) of every sync, in order
        # file -> page -> the versions of that page seen since its last sync
        # (at each observed instant: every sync, every cut), oldest first
        self.versions: dict[Path, dict[int, list[bytes]]] = {}
        self.observations = 0
        self._observed: dict[Path, bytes] = {}   # file -> its content when last observed
        self._undo: list = []
        self._resolved: dict[str, Path] = {}
        self._units: dict[str, Path | None] = {}
        self._named: dict[tuple, set[str]] = {}   # database files -> _named_files of them
        self.active = False

    # -- which files -----------------------------------------------------------
    def _resolve(self, path) -> Path:
        """``Path(path).resolve()``, remembered (the units' files do not move
        while they are recorded; resolving walks every component each time)."""
        key = os.fspath(path)
        real = self._resolved.get(key)
        if real is None:
            real = self._resolved[key] = Path(path).resolve()
        return real

    def _unit_of(self, path: Path) -> Path | None:
        key = os.fspath(path)
        if key not in self._units:
            real = self._resolve(path)
            self._units[key] = next((d for d in self.dirs
                                     if real == d or d in real.parents), None)
        return self._units[key]

    def files(self, d: Path) -> list[Path]:
        """The files of unit directory ``d`` the model covers (on disk now)."""
        out = [d / n for n in DB_FILES if os.path.exists(os.path.join(d, n))]
        if os.path.exists(os.path.join(d, JOURNAL)):
            out.append(d / JOURNAL)
        for sub, ext in (("volumes", ".vol"), ("bitmaps", ".bm"), ("points", ".pool"),
                         ("points", ".log")):
            try:
                names = sorted(e.name for e in os.scandir(d / sub) if e.name.endswith(ext))
            except FileNotFoundError:
                continue
            out += [d / sub / n for n in names]
        return out

    # -- recording ---------------------------------------------------------------
    def refresh(self, path, kind: str, offset: int = 0, size: int = 0) -> None:
        """``path`` was synced (a range of it when ``size``): what it holds
        now is on the disk."""
        path = self._resolve(path)
        if self._unit_of(path) is None:
            return
        self.syncs[kind] += 1
        self.log.append((kind, str(path.relative_to(self.parent))))
        self.observe()          # what every other file held at this instant
        now = _read(path)
        if now is None:
            return
        self.durable_names.add(path)
        seen = self.versions.get(path, {})
        if size and path in self.synced:
            old = bytearray(self.synced[path])
            old[offset:offset + size] = now[offset:offset + size]
            self.synced[path] = bytes(old)
            for i in [i for i in seen if offset <= i * PAGE and (i + 1) * PAGE <= offset + size]:
                del seen[i]
        else:
            self.synced[path] = now
            seen.clear()

    def observe(self) -> None:
        """Record the version every changed page of every volume and bitmap
        file holds now: the kernel may write it back now, and a later version
        may or may not follow it to the disk before a cut. (Only instants the
        recorder sees are observed: syncs and cuts; the versions a page took
        between two of them are not.)"""
        self.observations += 1
        for d in self.dirs:            # (resolved: so are the paths under it)
            for p in self.files(d):
                if p.name in DB_FILES:
                    continue
                cur = _read(p)
                if cur is None or self._observed.get(p) == cur:
                    continue
                self._observed[p] = cur
                base = self.synced.get(p, b"")
                if cur == base:
                    continue
                seen = self.versions.setdefault(p, {})
                for i in _differing_pages(base, cur):
                    page = cur[i * PAGE:(i + 1) * PAGE]
                    vs = seen.setdefault(i, [])
                    if not vs or vs[-1] != page:
                        vs.append(page)

    def refresh_db(self, store: SQLiteStore, kind: str) -> None:
        d = self._resolve(store.dir)
        if d not in self.dirs:
            return
        self.syncs[kind] += 1
        self.log.append((kind, f"{d.name}/unit.db"))
        for n in DB_FILES:
            content = _read(d / n)
            if content is None:
                self.synced.pop(d / n, None)
            else:
                self.synced[d / n] = content
                self.durable_names.add(d / n)

    def _refresh_dir(self, d: Path) -> None:
        """A directory was fsynced: the names in it now are durable."""
        for p in d.iterdir():
            if p.is_file() and p.name not in IGNORED:
                self.durable_names.add(self._resolve(p))

    def start(self) -> "PowerCutRecorder":
        """Snapshot every file (call right after ``flush()`` of every unit)
        and watch the sync points."""
        for d in self.dirs:
            for p in self.files(d):
                self.synced[self._resolve(p)] = _read(p)
                self.durable_names.add(self._resolve(p))
        rec = self

        def patch(owner, name, new):
            old = getattr(owner, name)
            self._undo.append((owner, name, old))
            setattr(owner, name, new)
            return old

        vol_flush = Volume.flush

        def volume_flush(vol, *a, **k):
            r = vol_flush(vol, *a, **k)
            if vol.path is not None:
                rec.refresh(vol.path, "Volume.flush")
            return r
        patch(Volume, "flush", volume_flush)

        bm_flush = FileBitmap.flush

        def bitmap_flush(bm, *a, **k):
            r = bm_flush(bm, *a, **k)
            rec.refresh(bm.path, "FileBitmap.flush")
            return r
        patch(FileBitmap, "flush", bitmap_flush)

        memmap_flush = np.memmap.flush

        def np_memmap_flush(m, *a, **k):
            r = memmap_flush(m, *a, **k)
            if getattr(m, "filename", None):
                rec.refresh(m.filename, "memmap.flush")
            return r
        patch(np.memmap, "flush", np_memmap_flush)

        for name in ("fsync", "fdatasync"):
            real = getattr(os, name)

            def fsync(fd, _real=real, _name=name):
                r = _real(fd)
                try:
                    n = fd if isinstance(fd, int) else fd.fileno()
                    p = Path(os.readlink(f"/proc/self/fd/{n}"))
                except OSError:
                    return r
                if p.is_dir():
                    if rec._unit_of(p) is not None:
                        rec.syncs[f"os.{_name}(dir)"] += 1
                        rec._refresh_dir(p)
                else:
                    rec.refresh(p, f"os.{_name}")
                return r
            patch(os, name, fsync)

        txn = SQLiteStore._transaction

        @contextmanager
        def transaction(store, level, *args, **kwargs):
            with txn(store, level, *args, **kwargs):
                yield
            # (the connection itself: ``store.db`` would fold the CG journal)
            if level == 0 and store._conn.execute("PRAGMA synchronous").fetchone()[0] >= 2:
                rec.refresh_db(store, "sqlite commit (fsynced)")
        patch(SQLiteStore, "_transaction", transaction)

        sync_point = SQLiteStore.sync_point

        def sync_point_(store, *a, **k):
            r = sync_point(store, *a, **k)
            rec.refresh_db(store, "sqlite sync_point")
            return r
        patch(SQLiteStore, "sync_point", sync_point_)

        for vol in self.volumes:
            mm = vol._mm
            if mm is None or isinstance(mm, _MMapProxy):
                continue

            def on_flush(offset=0, size=0, _path=vol.path):
                rec.refresh(_path, "mmap.flush", offset, size)
            vol._mm = _MMapProxy(mm, on_flush)
            self._undo.append((vol, "_mm", mm))
        self.active = True
        return self

    def stop(self) -> None:
        """Put every patched sync point back."""
        while self._undo:
            owner, name, old = self._undo.pop()
            if isinstance(owner, Volume):
                if owner._mm is not None:      # not closed meanwhile
                    owner._mm = old
                continue
            setattr(owner, name, old)
        self.active = False

    def __enter__(self) -> "PowerCutRecorder":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    # -- cutting -----------------------------------------------------------------
    def dirty_pages(self) -> dict[Path, int]:
        """Per file, how many 4 KiB pages differ from the synced content."""
        out = {}
        for d in self.dirs:
            for p in self.files(d):
                p = self._resolve(p)
                if p.name in DB_FILES:
                    continue
                cur = _read(p) or b""
                base = self.synced.get(p, bytes(len(cur)))
                n = len(_differing_pages(base, cur))
                if n:
                    out[p] = n
        return out

    def cut(self, dest, rng: np.random.Generator, pages: str = "random",
            db: str = "synced") -> dict:
        """Write under ``dest`` a copy of every unit directory as a power cut
        now could leave it. ``pages``: what each changed page of each volume
        or bitmap file holds on the disk — "random" (any of its versions
        since its last sync, drawn uniformly from ``rng``: the synced one,
        each one observed since (:meth:`observe`), the current one: any
        write-back order), "none" (the synced one) or "all" (the current
        one). ``db``: "synced" (the last synced commit) or "current" (every
        commit reached the disk). Returns what was chosen: per file, the
        changed pages and how many of them hold a version newer than the
        synced one."""
        return self.cuts([(dest, pages, db)], rng)[0]

    def cuts(self, variants, rng: np.random.Generator) -> list[dict]:
        """Several cut copies of this one instant: ``variants`` is a list of
        ``(dest, pages, db)``, each written as :meth:`cut` would write it
        (the same draws from ``rng``, in the same order, as that many calls
        of :meth:`cut`); the files are read, and their changed pages found,
        once for all of them. Returns :meth:`cut`'s report for each.

        A variant may name, fourth, the unit directories that lose power
        (``(dest, pages, db, dirs)``): the others are copied as they are
        (every page and every commit: a unit whose power stayed on, stopped
        at this instant)."""
        for pages, db in (v[1:3] for v in variants):
            assert pages in ("random", "none", "all") and db in ("synced", "current")
        if any(v[1] == "random" for v in variants):
            self.observe()     # (once: a second observe at one instant adds nothing)
        units = []
        for d in self.dirs:    # what the instant holds, read once
            current = {self._resolve(p) for p in self.files(d)}
            known = {p for p in self.synced if self._unit_of(p) == d}
            files = []
            for p in sorted((current | known) - {d / n for n in DB_FILES}):
                cur = _read(p)
                base = self.synced.get(p)
                diff = None
                if cur is not None:
                    base = bytes(len(cur)) if base is None else base
                    diff = _differing_pages(base, cur)
                files.append((p, p.relative_to(d), cur, base, diff))
            units.append((d, [_read(d / n) for n in DB_FILES], files))
        return [self._write_cut(Path(dest), rng, pages, db, units,
                                None if not rest else {Path(x).resolve() for x in rest[0]})
                for dest, pages, db, *rest in variants]

    def _write_cut(self, dest: Path, rng: np.random.Generator, pages_cut: str, db_cut: str,
                   units, cut_dirs: set[Path] | None = None) -> dict:
        report: dict[str, tuple[int, int]] = {}
        for d, db_now, files in units:
            pages, db = pages_cut, db_cut
            on = cut_dirs is not None and d not in cut_dirs
            if on:                  # its power stayed on: memory as it is
                pages, db = "all", "current"
            out = dest / d.relative_to(self.parent)
            (out / "volumes").mkdir(parents=True)
            (out / "bitmaps").mkdir()
            (out / "points").mkdir()
            db_files = []
            for n, now in zip(DB_FILES, db_now):
                content = self.synced.get(d / n) if db == "synced" else now
                db_files.append(content)
                if content is not None:
                    (out / n).write_bytes(content)
            # the variants of one instant mostly share the database: read its names once
            named = self._named.get(tuple(db_files))
            if named is None:
                named = self._named[tuple(db_files)] = _named_files(out)
            for p, rel, cur, base, diff in files:
                if cur is None:            # deleted since it was synced: maybe not yet
                    content = base
                else:
                    seen = self.versions.get(p, {})
                    if pages == "random":   # also a page changed and changed back since
                        diff = sorted(set(diff) | {i for i in seen if (i + 1) * PAGE <= len(cur)})
                    buf = bytearray(base[:len(cur)].ljust(len(cur), b"\0"))
                    take = []
                    for i in diff:
                        page = cur[i * PAGE:(i + 1) * PAGE]
                        if pages == "none":
                            continue
                        if pages == "random":
                            old = bytes(buf[i * PAGE:(i + 1) * PAGE])
                            choices = [old] + [v for v in seen.get(i, ()) if v != page] + [page]
                            page = choices[int(rng.integers(len(choices)))]
                            if page == old:
                                continue
                        buf[i * PAGE:i * PAGE + len(page)] = page
                        take.append(i)
                    content = bytes(buf)
                    if diff:
                        report[f"{d.name}/{rel}"] = (len(diff), len(take))
                durable = p in self.durable_names or str(rel) in named
                if content is None or (not on and not durable and rng.random() < 0.5):
                    continue               # its directory entry never reached the disk
                (out / rel).write_bytes(content)
        return report


def _differing_pages(base: bytes, cur: bytes) -> list[int]:
    n = max(len(base), len(cur))
    if n == 0:
        return []
    npages = (n + PAGE - 1) // PAGE
    a = np.zeros(npages * PAGE, np.uint8)
    b = np.zeros(npages * PAGE, np.uint8)
    a[:len(base)] = np.frombuffer(base, np.uint8)
    b[:len(cur)] = np.frombuffer(cur, np.uint8)
    ne = (a.reshape(npages, PAGE) != b.reshape(npages, PAGE)).any(axis=1)
    return np.flatnonzero(ne).tolist()


def _named_files(unit_dir: Path) -> set[str]:
    """The volume and bitmap files (relative paths) the rows of ``unit_dir``'s
    database name (read from a scratch copy, so SQLite does not touch the
    copy itself)."""
    if not (unit_dir / "unit.db").exists():
        return set()
    with tempfile.TemporaryDirectory() as tmp:
        for n in DB_FILES:
            if (unit_dir / n).exists():
                shutil.copyfile(unit_dir / n, Path(tmp) / n)
        db = sqlite3.connect(Path(tmp) / "unit.db")
        try:
            ids: set[int] = set()
            names: set[str] = set()
            for table, cols in (("flashcopies", SQLiteStore._FLASH_MAPS),
                                ("pairs", ("oos", "spare", "cg"))):
                try:
                    rows = db.execute(f"SELECT {', '.join(cols)} FROM {table}").fetchall()
                except sqlite3.Error:
                    continue
                ids.update(v for r in rows for v in r if v is not None)
            try:
                names = {f"volumes/{r[0]}.vol" for r in db.execute("SELECT name FROM volumes")}
            except sqlite3.Error:
                pass
            try:        # a volume's recovery points: its pool and log exist before its rows
                names |= {f"points/{r[0]}{ext}" for r in
                          db.execute("SELECT DISTINCT volume FROM points") for ext in (".pool", ".log")}
            except sqlite3.Error:
                pass
            return names | {f"bitmaps/{i}.bm" for i in ids}
        finally:
            db.close()


@dataclass
class Cut:
    """One power cut: a copy of the unit directories as the cut leaves them."""
    label: str              # where it fell: "instant@CG seq"
    point: str
    variant: tuple          # what survived (pages, commits, ...)
    dest: Path              # the copy
    floor: int              # the newest CG whose decision was durable
    attempted: int          # the newest CG sequence attempted
    dirty: dict = field(default_factory=dict)   # what the check needs beside it


#: what a process kill leaves (every page and every commit kept): a cut of
#: this kind must keep the promise at any durability
KILL_LIKE = ("all", "current")


def check_cuts(cuts, check, until=None, kind=lambda cut: cut.variant):
    """Check every cut with ``check(cut, n)`` (its list of violations; each
    cut's copy removed once checked); returns the violating cuts and a
    tally of violations by (instant, invariant). ``until(bad, tally)``, for
    a test that asserts that some cuts break the promise (the harness has
    teeth): the kill-like cuts (``kind(cut) == KILL_LIKE``) are checked
    first, all of them; then the others until ``until`` holds, and the ones
    left are not checked (more violations cannot undo what it asserts)."""
    bad = []
    tally: collections.Counter = collections.Counter()
    if until is not None:
        cuts = sorted(cuts, key=lambda c: kind(c) != KILL_LIKE)
    done = False
    for n, cut in enumerate(cuts):
        if not done:
            v = check(cut, n)
            if v:
                bad.append((cut, v))
                for x in v:
                    tally[(cut.point, x.split(":")[0])] += 1
            done = until is not None and kind(cut) != KILL_LIKE and until(bad, tally)
        shutil.rmtree(cut.dest)
    return bad, tally
