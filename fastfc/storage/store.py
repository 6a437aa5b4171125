"""Metadata stores: where every protocol step writes before its call returns.

:class:`Store` is the interface and the in-memory store (it keeps nothing:
volumes outside a storage unit live and die with the process).
:class:`SQLiteStore` keeps a storage unit's metadata in SQLite (WAL mode,
``synchronous=FULL``) and its bitmaps in memory-mapped files, one per bitmap.

Why bitmaps in files: the I/O path flips bits in place (copy-on-write clears
``to_copy``, writes set change-recording and out-of-sync bits) and records
them *before* the data lands. With both in shared memory-mapped files, a
process killed at any instruction leaves every completed store in the page
cache, so after reopening, every FlashCopy target reads as its exact
point-in-time image. SQLite holds which bitmap plays which role, sequence
numbers, states and consistency-group decisions; swapping bitmaps on commit
or revert is one row update, still O(1).
"""

from __future__ import annotations

import errno
import json
import os
import sqlite3
import threading
import uuid
from contextlib import contextmanager, nullcontext
from pathlib import Path

import numpy as np

from fastfc._core import TrackBitmap
from fastfc.errors import CorruptUnitError, NoSpaceError, ReadOnlyUnitError, UnitClosedError

SCHEMA_VERSION = 1


class Store:
    """The interface, and the in-memory store that keeps nothing.

    Bitmaps a relationship drops (a commit drops the revert image, a revert
    the new image) come back through :meth:`recycle` and serve the next
    :meth:`new_bitmap` of that size: freeing multi-MiB arrays makes the C
    allocator hand memory back to the kernel, which would make commit and
    revert cost O(bitmap) after all. The pool is bounded by
    ``POOL_BYTES``.
    """

    durable = False
    readonly = False
    POOL_BYTES = 64 << 20

    def __init__(self) -> None:
        self._free: dict[int, list[TrackBitmap]] = {}
        self._free_bytes = 0
        self._free_lock = threading.Lock()

    def new_bitmap(self, n_bits: int, fill: bool = False) -> TrackBitmap:
        with self._free_lock:
            free = self._free.get(n_bits)
            bm = free.pop() if free else None
            if bm is not None:
                self._free_bytes -= bm.nbytes
        if bm is None:
            return TrackBitmap(n_bits, fill=fill)
        bm.fill(fill)
        return bm

    def recycle(self, bitmaps) -> None:
        """Take back bitmaps that nothing references any more."""
        with self._free_lock:
            for bm in bitmaps:
                if bm is not None and self._free_bytes + bm.nbytes <= self.POOL_BYTES:
                    self._free.setdefault(bm.n_bits, []).append(bm)
                    self._free_bytes += bm.nbytes

    def transaction(self, sync: bool = True):
        """Group several saves into one durable commit (one fsync)."""
        return nullcontext()

    def check_writable(self) -> None:
        """Raise if a change cannot be recorded (a closed or read-only unit):
        called before a step changes anything, so that a refusal changes
        nothing."""

    def save_flash(self, fc) -> None:
        pass

    def drop_flash(self, fc) -> None:
        pass

    def save_pair(self, pair) -> None:
        pass

    def drop_pair(self, pair) -> None:
        pass

    def set_volume_flags(self, volume) -> None:
        pass

    def save_session(self, session) -> None:
        pass

    def drop_session(self, session) -> None:
        pass

    def cg_decision(self, session: str, sequence: int, decision: str) -> None:
        pass


MEMORY = Store()


def store_of(volume) -> Store:
    """The store that records relationships of ``volume``."""
    unit = getattr(volume, "unit", None)
    return MEMORY if unit is None else unit.store


class FileBitmap(TrackBitmap):
    """A TrackBitmap whose words live in a memory-mapped file."""

    file_id: int
    path: Path
    _mm: np.memmap    # the mapping (writable: private)

    def flush(self) -> None:
        """Write the words to the file (``msync``)."""
        self._mm.flush()


def _map_bitmap(path: Path, n_words: int, create: bool) -> np.memmap:
    """Map a bitmap file with every block allocated (a bit set by the I/O
    path must never need a block the filesystem cannot give: that would be
    SIGBUS). A new file that cannot get its blocks is removed."""
    flags = os.O_RDWR | (os.O_CREAT | os.O_EXCL if create else 0)
    fd = os.open(path, flags, 0o666)
    try:
        if create:
            os.ftruncate(fd, n_words * 8)
        os.posix_fallocate(fd, 0, n_words * 8)
    except OSError as e:
        os.close(fd)
        if create:
            path.unlink(missing_ok=True)
        if e.errno in (errno.ENOSPC, errno.EDQUOT):
            raise NoSpaceError(f"bitmap file {path}: the filesystem has no room for "
                               f"{n_words * 8} bytes ({e.strerror})") from None
        raise
    os.close(fd)
    return np.memmap(path, dtype=np.uint64, mode="r+", shape=(n_words,))


def _is_full(e: BaseException) -> bool:
    """Whether an SQLite error is SQLITE_FULL (database or disk is full)."""
    return isinstance(e, sqlite3.OperationalError) and (
        getattr(e, "sqlite_errorcode", None) == 13 or "full" in str(e))


_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta(key TEXT PRIMARY KEY, value TEXT);
CREATE TABLE IF NOT EXISTS volumes(
    name TEXT PRIMARY KEY, n_tracks INTEGER NOT NULL, track_size INTEGER NOT NULL,
    secondary INTEGER NOT NULL DEFAULT 0, invalid INTEGER NOT NULL DEFAULT 0,
    thin INTEGER NOT NULL DEFAULT 1);
CREATE TABLE IF NOT EXISTS flashcopies(
    id INTEGER PRIMARY KEY, source TEXT NOT NULL, target TEXT NOT NULL,
    options TEXT NOT NULL, sequence INTEGER NOT NULL, revertible INTEGER NOT NULL,
    to_copy INTEGER, src_changed INTEGER, tgt_changed INTEGER,
    rv_to_copy INTEGER, rv_src_changed INTEGER, rv_tgt_changed INTEGER, rv_sequence INTEGER);
CREATE TABLE IF NOT EXISTS pairs(
    id INTEGER PRIMARY KEY, primary_name TEXT NOT NULL, secondary_unit TEXT NOT NULL,
    secondary_name TEXT NOT NULL, mode TEXT NOT NULL, suspend_reason TEXT,
    failed_over INTEGER NOT NULL, oos INTEGER, spare INTEGER, cg INTEGER, name TEXT);
CREATE TABLE IF NOT EXISTS sessions(name TEXT PRIMARY KEY, config TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS decisions(
    session TEXT NOT NULL, sequence INTEGER NOT NULL, decision TEXT NOT NULL,
    PRIMARY KEY(session, sequence));
CREATE TABLE IF NOT EXISTS partners(uuid TEXT PRIMARY KEY, path TEXT NOT NULL);
"""

POOL_PER_SIZE = 1024   # recycled bitmap files kept per bitmap size


class SQLiteStore(Store):
    """A storage unit's metadata: SQLite for rows, one file per bitmap.

    Thread-safe: one connection guarded by a lock. Each save is its own
    transaction unless made inside :meth:`transaction`.
    """

    durable = True

    def recycle(self, bitmaps) -> None:
        """File bitmaps go back to the pool when no row names them (see
        :meth:`_collect`), not when an object drops them."""

    def __init__(self, directory: Path, unit_path: str, readonly: bool = False) -> None:
        self.dir = directory
        self.unit_path = unit_path
        self.readonly = readonly
        self.closed = False
        self.bitmap_dir = directory / "bitmaps"
        db = directory / "unit.db"
        existed = db.exists()
        if readonly and not existed:
            raise CorruptUnitError(f"{directory} holds no unit.db (a read-only open "
                                   "creates nothing)")
        if not readonly:
            self.bitmap_dir.mkdir(exist_ok=True)
        self.db = None
        try:
            if readonly:
                self.db = _connect_readonly(db)
            else:
                self.db = sqlite3.connect(db, check_same_thread=False, isolation_level=None)
                self.db.execute("PRAGMA journal_mode=WAL")
                self.db.execute("PRAGMA synchronous=FULL")
            if existed:
                ok = self.db.execute("PRAGMA quick_check").fetchone()[0]
                if ok != "ok":
                    raise CorruptUnitError(f"{db} fails SQLite's integrity check: {ok}")
            if not readonly:
                self.db.executescript(_SCHEMA)
            row = self.db.execute("SELECT value FROM meta WHERE key='schema'").fetchone()
        except sqlite3.DatabaseError as e:
            if self.db is not None:
                self.db.close()
            raise CorruptUnitError(f"{db} is not a readable fastfc unit database: {e}") from None
        except BaseException:
            if self.db is not None:
                self.db.close()
            raise
        if row is None:
            if readonly:
                self.db.close()
                raise CorruptUnitError(f"{db} holds no unit metadata (empty or truncated)")
            if existed and self.db.execute("SELECT count(*) FROM volumes").fetchone()[0]:
                self.db.close()
                raise CorruptUnitError(f"{db} has volumes but no schema version")
            if any(directory.glob("volumes/*.vol")) or any(self.bitmap_dir.glob("*.bm")):
                # an empty (e.g. truncated to 0 bytes) database next to volume
                # files: opening it as a new unit would hide them, and delete
                # the bitmaps as orphans
                self.db.close()
                raise CorruptUnitError(f"{db} holds no unit metadata (empty or truncated), "
                                       f"but {directory} holds volume or bitmap files")
            self.db.execute("INSERT INTO meta VALUES('schema', ?)", (str(SCHEMA_VERSION),))
        elif int(row[0]) != SCHEMA_VERSION:
            self.db.close()
            raise CorruptUnitError(f"{db} has schema {row[0]}; this fastfc reads {SCHEMA_VERSION}")
        row = self.db.execute("SELECT value FROM meta WHERE key='uuid'").fetchone()
        if row is None and not readonly:
            # a unit made before units had an id gets one the first time it
            # is opened read-write
            row = (str(uuid.uuid4()),)
            self.db.execute("INSERT INTO meta VALUES('uuid', ?)", row)
        self.uuid: str | None = row[0] if row else None
        has_partners = self.db.execute(
            "SELECT 1 FROM sqlite_master WHERE type='table' AND name='partners'").fetchone()
        self._partners: dict[str, str] = dict(self.db.execute(
            "SELECT uuid, path FROM partners").fetchall()) if has_partners else {}
        if not readonly and "thin" not in {r[1] for r in self.db.execute("PRAGMA table_info(volumes)")}:
            # a unit made before thick volumes: its files are sparse, so its
            # volumes are thin (the default); older readers ignore the column
            self.db.execute("ALTER TABLE volumes ADD COLUMN thin INTEGER NOT NULL DEFAULT 1")
        self._lock = threading.RLock()
        self._depth = 0
        self._next_bitmap = 1 + max([int(p.stem) for p in self.bitmap_dir.glob("*.bm")
                                     if p.stem.isdigit()] or [0])
        self._row_bitmaps: dict[tuple[str, int], set[int]] = {}
        self._maps: dict[int, FileBitmap] = {}           # every mapped bitmap file
        self._pool: dict[int, list[FileBitmap]] = {}     # unreferenced, by n_bits
        self.fsyncs = 0   # commits, each one fsync of the WAL

    def check_writable(self) -> None:
        if self.closed:
            raise UnitClosedError(f"storage unit {self.unit_path} is closed")
        if self.readonly:
            raise ReadOnlyUnitError(f"storage unit {self.unit_path} is open read-only; "
                                    "open it read-write to change it")

    # -- partner units ---------------------------------------------------------
    @property
    def partners(self) -> dict[str, str]:
        """Partner units: uuid -> path relative to this unit's directory."""
        return dict(self._partners)

    def set_partner(self, partner_uuid: str, relative_path: str) -> None:
        """Record where a partner unit is (no write when it is so recorded)."""
        if self._partners.get(partner_uuid) == relative_path:
            return
        self._exec("INSERT OR REPLACE INTO partners VALUES(?, ?)",
                   (partner_uuid, relative_path))
        self._partners[partner_uuid] = relative_path

    def drop_partner(self, partner_uuid: str) -> None:
        if partner_uuid not in self._partners:
            return
        self._exec("DELETE FROM partners WHERE uuid=?", (partner_uuid,))
        del self._partners[partner_uuid]

    # -- transactions --------------------------------------------------------
    @contextmanager
    def transaction(self, sync: bool = True):
        """One durable commit for everything inside; nested blocks are
        savepoints. A block that raises is rolled back whole, database rows
        and the in-memory record of which bitmap files they use alike (so the
        bitmap pool never recycles a file a stored row still names).

        ``sync=False`` (outermost only) commits without an fsync: safe for a
        process crash, and for what recovery redoes from an earlier durable
        record (the commits of a CG whose decision is recorded)."""
        self.check_writable()
        with self._lock:
            level = self._depth
            if level == 0 and not sync:
                self.db.execute("PRAGMA synchronous=NORMAL")
            try:
                with self._transaction(level):
                    yield
            finally:
                if level == 0 and not sync:
                    self.db.execute("PRAGMA synchronous=FULL")

    @contextmanager
    def _transaction(self, level: int):
        with self._lock:
            self.db.execute("BEGIN IMMEDIATE" if level == 0 else f"SAVEPOINT sp{level}")
            saved = ({k: set(v) for k, v in self._row_bitmaps.items()},
                     set(getattr(self, "_garbage", set())))
            self._depth += 1
            try:
                yield
                if level == 0:
                    self.db.execute("COMMIT")
            except BaseException as e:
                self._depth -= 1
                if level == 0:
                    if self.db.in_transaction:
                        self.db.execute("ROLLBACK")
                else:
                    self.db.execute(f"ROLLBACK TO sp{level}")
                    self.db.execute(f"RELEASE sp{level}")
                self._row_bitmaps, self._garbage = saved
                if _is_full(e) and level == 0:
                    raise NoSpaceError(f"{self.dir / 'unit.db'}: {e}; the transaction was "
                                       "rolled back (free space and retry)") from e
                raise
            self._depth -= 1
            if level == 0:
                if self.db.execute("PRAGMA synchronous").fetchone()[0] >= 2:
                    self.fsyncs += 1
                self._collect()
            else:
                self.db.execute(f"RELEASE sp{level}")

    @contextmanager
    def _atomic(self):
        """For a save of one or two statements: its own transaction when none
        is open, else part of the open one without a savepoint (a statement
        is atomic by itself, and the enclosing transaction's rollback also
        undoes the bitmap bookkeeping)."""
        with self._lock:
            if self._depth:
                yield
            else:
                with self.transaction():
                    yield

    def _exec(self, sql: str, args=()):
        with self.transaction():
            return self.db.execute(sql, args)

    def query(self, sql: str, args=()) -> list:
        with self._lock:
            return self.db.execute(sql, args).fetchall()

    # -- bitmaps ---------------------------------------------------------------
    def new_bitmap(self, n_bits: int, fill: bool = False) -> FileBitmap:
        """A bitmap in its own file: a recycled one (no row references it)
        when the pool has one of this size, else a new file. A read-only
        unit gives an in-memory bitmap (nothing it holds is ever saved)."""
        if self.readonly:
            return TrackBitmap(n_bits, fill=fill)
        with self._lock:
            pool = self._pool.get(n_bits)
            if pool:
                bm = pool.pop()
                bm.fill(fill)
                return bm
            fid = self._next_bitmap
            self._next_bitmap += 1
        path = self.bitmap_dir / f"{fid}.bm"
        words = _map_bitmap(path, max((n_bits + 63) // 64, 1), create=True)
        bm = FileBitmap(n_bits, fill=fill, words=words)
        bm.file_id, bm.path, bm._mm = fid, path, words
        self._maps[fid] = bm
        return bm

    def load_bitmap(self, fid: int | None, n_bits: int) -> FileBitmap | None:
        if fid is None:
            return None
        path = self.bitmap_dir / f"{fid}.bm"
        n_words = max((n_bits + 63) // 64, 1)
        if not path.exists():
            raise CorruptUnitError(f"bitmap file {path} is missing")
        if path.stat().st_size != n_words * 8:
            raise CorruptUnitError(f"bitmap file {path} has {path.stat().st_size} bytes, "
                                   f"expected {n_words * 8}")
        if self.readonly:
            # a private mapping (the process may set bits, as a restore does;
            # the file never changes)
            words = np.memmap(path, dtype=np.uint64, mode="c", shape=(n_words,))
        else:
            words = _map_bitmap(path, n_words, create=False)
        bm = FileBitmap(n_bits, words=words)
        bm.file_id, bm.path, bm._mm = fid, path, words
        self._maps[fid] = bm
        return bm

    def _track(self, key: tuple[str, int], bitmaps) -> None:
        """Remember which bitmap files a row references now; the ones it no
        longer references are deleted after the transaction commits."""
        now = {b.file_id for b in bitmaps if isinstance(b, FileBitmap)}
        old = self._row_bitmaps.get(key, set())
        self._row_bitmaps[key] = now
        self._garbage = getattr(self, "_garbage", set()) | (old - now)

    def _collect(self) -> None:
        """After a commit: bitmaps no row references any more go back to the
        pool (a Global Mirror CG frees and needs the same sizes every time),
        or are deleted when the pool is full."""
        garbage = getattr(self, "_garbage", set())
        live = set().union(*self._row_bitmaps.values()) if self._row_bitmaps else set()
        for fid in garbage - live:
            bm = self._maps.pop(fid, None)
            pool = self._pool.setdefault(bm.n_bits, []) if bm is not None else None
            if pool is not None and len(pool) < POOL_PER_SIZE:
                self._maps[fid] = bm
                pool.append(bm)
                continue
            try:
                (self.bitmap_dir / f"{fid}.bm").unlink()
            except FileNotFoundError:
                pass
        self._garbage = set()

    def collect_orphans(self) -> None:
        """At open: delete bitmap files no row references (a step that died
        before its transaction committed). Not on a read-only unit."""
        if self.readonly:
            return
        live = set().union(*self._row_bitmaps.values()) if self._row_bitmaps else set()
        for p in self.bitmap_dir.glob("*.bm"):
            if p.stem.isdigit() and int(p.stem) not in live:
                p.unlink()

    # -- volumes -----------------------------------------------------------------
    def add_volume(self, name: str, n_tracks: int, track_size: int, thin: bool = False) -> None:
        self._exec("INSERT INTO volumes(name, n_tracks, track_size, thin) VALUES(?,?,?,?)",
                   (name, n_tracks, track_size, int(thin)))

    def remove_volume(self, name: str) -> None:
        self._exec("DELETE FROM volumes WHERE name=?", (name,))

    def set_volume_flags(self, volume) -> None:
        self._exec("UPDATE volumes SET secondary=?, invalid=? WHERE name=?",
                   (int(volume._secondary), int(volume._invalid), volume.name))

    # -- FlashCopy ---------------------------------------------------------------
    def save_flash(self, fc) -> None:
        rv = fc._revert_image or (None, None, None, None)
        maps = [fc.to_copy, fc.src_changed, fc.tgt_changed, *rv[:3]]
        ids = [getattr(m, "file_id", None) for m in maps]
        opts = (fc.background_copy, fc.record, fc.persistent, fc.inhibit_target_write,
                fc.copy_rate)
        if getattr(fc, "_options_json", (None,))[0] != opts:
            fc._options_json = (opts, json.dumps(dict(
                background_copy=fc.background_copy, record=fc.record,
                persistent=fc.persistent, inhibit_target_write=fc.inhibit_target_write,
                copy_rate=fc.copy_rate)))
        options = fc._options_json[1]
        with self._atomic():
            if getattr(fc, "_store_id", None) is None:
                cur = self.db.execute(
                    "INSERT INTO flashcopies(source, target, options, sequence, revertible)"
                    " VALUES(?,?,?,?,?)", (fc.source.name, fc.target.name, options,
                                           fc.sequence, int(fc.revertible)))
                fc._store_id = cur.lastrowid
            self.db.execute(
                "UPDATE flashcopies SET options=?, sequence=?, revertible=?, to_copy=?,"
                " src_changed=?, tgt_changed=?, rv_to_copy=?, rv_src_changed=?,"
                " rv_tgt_changed=?, rv_sequence=? WHERE id=?",
                (options, fc.sequence, int(fc.revertible), *ids, rv[3], fc._store_id))
            self._track(("fc", fc._store_id), maps)

    def drop_flash(self, fc) -> None:
        sid = getattr(fc, "_store_id", None)
        with self._atomic():
            if sid is not None:
                self.db.execute("DELETE FROM flashcopies WHERE id=?", (sid,))
                self._track(("fc", sid), [])
                self._row_bitmaps.pop(("fc", sid), None)
            self.db.execute("UPDATE volumes SET invalid=? WHERE name=?",
                            (int(fc.target._invalid), fc.target.name))

    def flash_rows(self) -> list[dict]:
        cols = [d[1] for d in self.db.execute("PRAGMA table_info(flashcopies)")]
        return [dict(zip(cols, r)) for r in self.query("SELECT * FROM flashcopies ORDER BY id")]

    # -- PPRC pairs ----------------------------------------------------------------
    def save_pair(self, pair) -> None:
        note_partners(pair.primary, pair.secondary)
        maps = [pair.oos, pair.spare, pair.cg]
        ids = [getattr(m, "file_id", None) for m in maps]
        with self._atomic():
            if getattr(pair, "_store_id", None) is None:
                cur = self.db.execute(
                    "INSERT INTO pairs(primary_name, secondary_unit, secondary_name, mode,"
                    " failed_over) VALUES(?,?,?,?,0)",
                    (pair.primary.name, unit_ref(pair.secondary), pair.secondary.name,
                     pair.mode.value))
                pair._store_id = cur.lastrowid
            self.db.execute(
                "UPDATE pairs SET primary_name=?, secondary_unit=?, secondary_name=?, mode=?,"
                " suspend_reason=?, failed_over=?, oos=?, spare=?, cg=?, name=? WHERE id=?",
                (pair.primary.name, unit_ref(pair.secondary), pair.secondary.name,
                 pair.mode.value, pair.suspend_reason, int(pair.failed_over), *ids,
                 pair.name, pair._store_id))
            self._track(("pair", pair._store_id), maps)

    def drop_pair(self, pair) -> None:
        sid = getattr(pair, "_store_id", None)
        if sid is None:
            return
        with self._atomic():
            self.db.execute("DELETE FROM pairs WHERE id=?", (sid,))
            self._track(("pair", sid), [])
            self._row_bitmaps.pop(("pair", sid), None)

    def pair_rows(self) -> list[dict]:
        cols = [d[1] for d in self.db.execute("PRAGMA table_info(pairs)")]
        return [dict(zip(cols, r)) for r in self.query("SELECT * FROM pairs ORDER BY id")]

    # -- Global Mirror sessions ------------------------------------------------------
    def save_session(self, session) -> None:
        config = dict(cg_interval=session.cg_interval,
                      max_coordination_time=session.max_coordination_time,
                      max_drain_time=session.max_drain_time, decide=session.decide,
                      triplets=[[unit_ref(t.a), t.a.name, t.b.name, t.c.name]
                                for t in session.triplets])
        for t in session.triplets:
            note_partners(t.a, t.b)
        self._exec("INSERT OR REPLACE INTO sessions VALUES(?, ?)",
                   (session.name, json.dumps(config)))

    def drop_session(self, session) -> None:
        with self.transaction():
            self.db.execute("DELETE FROM sessions WHERE name=?", (session.name,))
            self.db.execute("DELETE FROM decisions WHERE session=?", (session.name,))

    def session_rows(self) -> dict[str, dict]:
        return {n: json.loads(c) for n, c in self.query("SELECT name, config FROM sessions")}

    def cg_decision(self, session: str, sequence: int, decision: str) -> None:
        with self._atomic():
            self.db.execute("INSERT OR REPLACE INTO decisions VALUES(?,?,?)",
                            (session, sequence, decision))
            # keep the table small: only the newest decisions matter
            self.db.execute("DELETE FROM decisions WHERE session=? AND sequence < ?",
                            (session, sequence - 16))

    def decision(self, session: str, sequence: int) -> str | None:
        row = self.query("SELECT decision FROM decisions WHERE session=? AND sequence=?",
                         (session, sequence))
        return row[0][0] if row else None

    def close(self) -> None:
        with self._lock:
            if self.closed:
                return
            self.closed = True
            try:
                if not self.readonly:
                    self.db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
            finally:
                self.db.close()
                # let go of the bitmap files: one that nothing else holds (a
                # pooled or dropped bitmap) is unmapped and its file closed
                # now; one a relationship still holds stays mapped with it
                self._maps.clear()
                self._pool.clear()


def unit_ref(volume) -> str:
    """How a row names the unit of ``volume`` (another unit's): by its uuid,
    so that units can be copied and moved; where that unit is goes in the
    ``partners`` table, relative to the unit holding the row."""
    unit = getattr(volume, "unit", None)
    if unit is None or unit.path is None:
        return ""
    return unit.uuid or str(unit.path)


def note_partners(a, b) -> None:
    """Record in the units of volumes ``a`` and ``b`` (when they differ)
    where each finds the other, as a path relative to itself."""
    ua, ub = getattr(a, "unit", None), getattr(b, "unit", None)
    if ua is None or ub is None or ua is ub or ua.path is None or ub.path is None:
        return
    for x, y in ((ua, ub), (ub, ua)):
        if x.uuid and y.uuid and not x.store.readonly and not x.store.closed:
            x.store.set_partner(y.uuid, os.path.relpath(y.path, x.path))


def _connect_readonly(db: Path) -> sqlite3.Connection:
    """Open ``db`` without writing anything in its directory. With no WAL
    content (a unit closed cleanly) the database is opened immutable: SQLite
    then needs no -shm file and takes no locks (the unit lock keeps writers
    out). A WAL left by a killed writer must be read, so then it is opened
    ``mode=ro``, which uses the -shm file the writer left."""
    wal = db.with_name(db.name + "-wal")
    try:
        has_wal = wal.stat().st_size > 0
    except FileNotFoundError:
        has_wal = False
    uri = db.resolve().as_uri() + ("?mode=ro" if has_wal else "?mode=ro&immutable=1")
    return sqlite3.connect(uri, uri=True, check_same_thread=False, isolation_level=None)
