"""A storage unit's metadata store: SQLite rows and memory-mapped bitmap files.

:class:`SQLiteStore` implements :class:`fastfc.storage.store.Store` for a
storage unit (only a unit makes one): metadata in SQLite (WAL mode,
``synchronous=FULL``), bitmaps in memory-mapped files, one per bitmap.
Records go in and out (see :mod:`fastfc.storage.store`); the unit reads
back what it restores through public methods (:meth:`SQLiteStore.volume_records`,
:meth:`~SQLiteStore.flash_record`, :meth:`~SQLiteStore.pair_record`,
:meth:`~SQLiteStore.session_rows`) and runs no SQL itself.

Why bitmaps in files: the I/O path flips bits in place (copy-on-write clears
``to_copy``, writes set change-recording and out-of-sync bits) and records
them *before* the data lands. With both in shared memory-mapped files, a
process killed at any instruction leaves every completed store in the page
cache, so after reopening, every FlashCopy target reads as its exact
point-in-time image. SQLite holds which bitmap plays which role, sequence
numbers, states and consistency-group decisions; swapping bitmaps on commit
or revert is one row update, still O(1).

A consistency group's FlashCopy step over many relationships (prepare,
commit or revert of a group, :meth:`SQLiteStore.save_flashes`) is one row of
the FlashCopy log, ``flash_log``: every relationship's sequence, flag and
bitmap file ids packed in one blob, replacing the group's previous row in
place. So a CG costs the unit a handful of statements whatever its size.
The log is folded into the ``flashcopies`` rows when a relationship it names
is saved or dropped alone, when it has many rows, and at open and close;
readers see the rows with the log applied (:meth:`SQLiteStore.flash_rows`).
"""

from __future__ import annotations

import errno
import json
import marshal
import mmap
import os
import struct
import sqlite3
import threading
import uuid
import zlib
from collections.abc import Callable
from contextlib import contextmanager
from pathlib import Path
from typing import cast

import numpy as np

from fastfc import _core, faults
from fastfc._core import TrackBitmap
from fastfc.errors import (CorruptUnitError, InjectedFault, NoSpaceError, ReadOnlyUnitError,
                           UnitClosedError)
from fastfc.storage.store import Store

_MISSING = object()    # an undo record's "the row had no bitmaps entry"

#: 2: FlashCopy batches in ``flash_log`` (a unit with a non-empty log must
#: not be read by a fastfc that reads only the ``flashcopies`` rows)
#: 3: volumes with a grain (``volumes.grain_size``; NULL: the track): the
#: bitmaps of a volume with a grain smaller than its track have a bit per
#: grain, which a fastfc reading a bit per track would misread
#: 4: the CG journal (``unit.journal``, durability "process"): a unit killed
#: with records in it must not be read by a fastfc that reads only unit.db
#: 5: durable recovery points (tables points, point_restores; files under
#: points/): a fastfc without them would let a point's volume be written
#: without copy-on-write
SCHEMA_VERSION = 5
READABLE_SCHEMAS = (1, 2, 3, 4, 5)   # an older unit is upgraded by its first read-write open

# the FlashCopy log's columns: one little-endian int64 each, per relationship
# (built by _core.log_rows, in this order)
_LOG_COLUMNS = ("id", "sequence", "revertible", "to_copy", "src_changed", "tgt_changed",
                "rv_to_copy", "rv_src_changed", "rv_tgt_changed", "rv_sequence")
_LOG_WIDTH = len(_LOG_COLUMNS)
_LOG_NULL = -1                 # None (no bitmap file, no revert sequence)
_LOG_ROWS_MAX = 64             # more log rows than this are folded into flashcopies


class FileBitmap(TrackBitmap):
    """A TrackBitmap whose words live in a memory-mapped file."""

    file_id: int
    path: Path
    _mm: mmap.mmap    # the mapping the words are a view of

    def flush(self) -> None:
        """Write the words to the file (``msync``)."""
        self._mm.flush()


def _words_of(fd: int, n_words: int, access: int) -> tuple[mmap.mmap, np.ndarray]:
    """Map ``n_words`` words of the file open as ``fd``: the mapping and its
    words (``np.memmap`` does the same in about four times the time: a
    unit's open maps every bitmap it has)."""
    mm = mmap.mmap(fd, n_words * 8, access=access)
    return mm, np.frombuffer(mm, dtype=np.uint64, count=n_words)


def _map_bitmap(path: Path, n_words: int, create: bool) -> tuple[mmap.mmap, np.ndarray]:
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
    try:
        return _words_of(fd, n_words, mmap.ACCESS_WRITE)
    finally:
        os.close(fd)


def _is_full(e: BaseException) -> bool:
    """Whether an SQLite error is SQLITE_FULL (database or disk is full)."""
    return isinstance(e, sqlite3.OperationalError) and (
        getattr(e, "sqlite_errorcode", None) == 13 or "full" in str(e))


# Room kept for the metadata of a unit on a filesystem that fills up. A unit
# opened read-write on a filesystem with room keeps RESERVE_FILE (real
# blocks, written); when the filesystem is full, the next read-write open
# (or a commit that finds no room) deletes it, so that SQLite has room for
# its -shm and -wal files and a commit: the unit opens and ``rmvol`` can
# free space. It is written again once there is room (4 times its size).
RESERVE_FILE = "unit.reserve"
RESERVE_BYTES = 1 << 20


def _free_bytes(directory: Path) -> int:
    try:
        st = os.statvfs(directory)
    except OSError:
        return 0
    return st.f_bavail * st.f_frsize


def release_reserve(directory: Path) -> bool:
    """Delete the unit's reserve file; whether there was one."""
    try:
        (directory / RESERVE_FILE).unlink()
    except FileNotFoundError:
        return False
    return True


def keep_reserve(directory: Path) -> None:
    """Write the unit's reserve file if it is missing and the filesystem has
    room for it (best effort: a failure leaves no partial file)."""
    path = directory / RESERVE_FILE
    if path.exists() or _free_bytes(directory) < 4 * RESERVE_BYTES:
        return
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    except OSError:
        return
    try:
        os.write(fd, bytes(RESERVE_BYTES))
    except OSError:
        os.close(fd)
        path.unlink(missing_ok=True)
        return
    os.close(fd)


_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta(key TEXT PRIMARY KEY, value TEXT);
CREATE TABLE IF NOT EXISTS volumes(
    name TEXT PRIMARY KEY, n_tracks INTEGER NOT NULL, track_size INTEGER NOT NULL,
    secondary INTEGER NOT NULL DEFAULT 0, invalid INTEGER NOT NULL DEFAULT 0,
    thin INTEGER NOT NULL DEFAULT 1, grain_size INTEGER);
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
CREATE TABLE IF NOT EXISTS secondaries(
    name TEXT PRIMARY KEY, primary_unit TEXT NOT NULL, primary_name TEXT NOT NULL,
    mode TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS flash_log(step INTEGER PRIMARY KEY, body BLOB NOT NULL);
CREATE TABLE IF NOT EXISTS session_stats(
    name TEXT PRIMARY KEY, attempts INTEGER NOT NULL, successes INTEGER NOT NULL,
    failures TEXT NOT NULL, commit_failures_resolved INTEGER NOT NULL,
    bytes_drained INTEGER NOT NULL, last_cg_time REAL, sequence INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS session_failures(name TEXT PRIMARY KEY, failure TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS site_sessions(
    name TEXT PRIMARY KEY, record TEXT NOT NULL, stats TEXT);
CREATE TABLE IF NOT EXISTS points(
    volume TEXT NOT NULL, seq INTEGER NOT NULL, name TEXT, taken_at REAL NOT NULL,
    retain_until REAL NOT NULL, grp TEXT NOT NULL, PRIMARY KEY(volume, seq));
CREATE TABLE IF NOT EXISTS point_restores(
    target TEXT PRIMARY KEY, volume TEXT NOT NULL, seq INTEGER NOT NULL);
"""

#: The sessions a unit serves to a primary in another process
#: (:mod:`fastfc.remote`): each one's B->C pairs, in the session's order.
#: A table of its own, made (and filled from the file an earlier fastfc kept
#: beside ``unit.db``) by :func:`_migrate_served_sessions`.
_SERVED_SCHEMA = """
CREATE TABLE IF NOT EXISTS served_sessions(
    session TEXT NOT NULL, position INTEGER NOT NULL, b TEXT NOT NULL, c TEXT NOT NULL,
    PRIMARY KEY(session, position));
"""
#: where a unit written by an earlier fastfc kept its served sessions:
#: JSON, ``{session: [[b, c], ...]}``, beside ``unit.db``
LEGACY_SESSIONS_FILE = "remote.sessions.json"


def _read_legacy_sessions(directory: Path) -> dict[str, list[tuple[str, str]]]:
    """The served sessions in an earlier fastfc's file (none if it is absent)."""
    path = directory / LEGACY_SESSIONS_FILE
    try:
        text = path.read_text()
    except FileNotFoundError:
        return {}
    try:
        raw = json.loads(text)
        out = {str(name): [(str(b), str(c)) for b, c in pairs] for name, pairs in raw.items()}
    except (ValueError, TypeError, AttributeError) as e:
        raise CorruptUnitError(f"{path} (the sessions this unit serves, as an earlier "
                               f"fastfc kept them) is damaged: {type(e).__name__}: {e}") from None
    for name, pairs in out.items():
        if not all(isinstance(x, str) for p in raw[name] for x in p):
            raise CorruptUnitError(f"{path}: session {name!r} names volumes by something "
                                   "other than text")
    return out


def _migrate_served_sessions(db: sqlite3.Connection, directory: Path) -> None:
    """Schema step of a read-write open: make the ``served_sessions`` table,
    and move the sessions an earlier fastfc kept in
    :data:`LEGACY_SESSIONS_FILE` into it (one transaction; the file goes
    once they are committed; a row already in the table wins, so a crash
    between the two repeats nothing wrongly)."""
    db.executescript(_SERVED_SCHEMA)
    legacy = _read_legacy_sessions(directory)
    if legacy:
        db.execute("BEGIN IMMEDIATE")
        try:
            known = {r[0] for r in db.execute("SELECT DISTINCT session FROM served_sessions")}
            for name, pairs in legacy.items():
                if name not in known:
                    db.executemany("INSERT INTO served_sessions VALUES(?,?,?,?)",
                                   [(name, i, b, c) for i, (b, c) in enumerate(pairs)])
            db.execute("COMMIT")
        except BaseException:
            db.execute("ROLLBACK")
            raise
    (directory / LEGACY_SESSIONS_FILE).unlink(missing_ok=True)


# -- the CG journal (durability "process") ---------------------------------------
#: The statements a transaction may leave in the CG journal instead of SQLite
#: (a consistency group's records): the journal holds each one's index here
#: and its arguments. Per statement: its SQL, the table it writes, and which
#: arguments key a row it replaces whole (None: not a whole-row replace), so
#: that a fold runs only the last replace of each row (:func:`_compact`).
_DEFERRED = (
    ("UPDATE flash_log SET body=? WHERE step=?", "flash_log", (1,)),
    ("INSERT INTO flash_log(step, body) VALUES(?,?)", "flash_log", None),
    ("DELETE FROM flash_log WHERE step=?", "flash_log", None),
    ("INSERT OR REPLACE INTO decisions VALUES(?,?,?)", "decisions", (0, 1)),
    ("DELETE FROM decisions WHERE session=? AND sequence < ?", "decisions", None),
    ("INSERT OR REPLACE INTO session_stats VALUES(?,?,?,?,?,?,?,?)", "session_stats", (0,)),
    ("INSERT OR REPLACE INTO session_failures VALUES(?,?)", "session_failures", None),
    ("DELETE FROM session_failures WHERE name=?", "session_failures", None),
)
_SQL_INDEX = {sql: i for i, (sql, _, _) in enumerate(_DEFERRED)}
_J_LOG_UPDATE, _J_LOG_INSERT, _J_LOG_DELETE, _J_DECISION, _J_TRIM, _J_STATS, \
    _J_FAILURE, _J_NO_FAILURE = range(len(_DEFERRED))

JOURNAL_FILE = "unit.journal"
JOURNAL_BYTES = 1 << 20
_J_HEAD = struct.Struct("<IIQ")     # payload bytes, CRC-32, generation


def _compact(statements: list) -> list:
    """The journal's statements (``(index, args)``, in order) with each
    whole-row replace dropped that a later replace of the same row follows
    with no other statement on its table between: what a fold runs."""
    keep = [True] * len(statements)
    last: dict[tuple, int] = {}          # (index, key) -> position of its newest replace
    for k, (i, args) in enumerate(statements):
        _, table, key = _DEFERRED[i]
        if key is None:                  # anything else on the table orders its rows
            for rk in [rk for rk in last if _DEFERRED[rk[0]][1] == table]:
                del last[rk]
            continue
        rk = (i, *(args[j] for j in key))
        prev = last.get(rk)
        if prev is not None:
            keep[prev] = False
        last[rk] = k
    return [st for st, kept in zip(statements, keep) if kept]


class CGJournal:
    """An append-only, memory-mapped record of a unit's transactions at
    durability "process" (``unit.journal``): a transaction made only of a
    consistency group's records (:data:`_DEFERRED`: FlashCopy-log rows, the
    decision, the counters) is one entry here instead of an SQLite commit.
    An entry is its statements (``marshal``), checked by a CRC-32 over its
    length, generation and payload, so that a process killed inside an
    append leaves an entry no reader takes. The store runs the entries'
    statements into ``unit.db`` (a *fold*: one SQLite transaction, which
    also records the folded generation in ``meta``) when the journal is
    full, before any other SQL, at :meth:`SQLiteStore.sync_point`, at
    close and at the next open; the entries of a generation up to the one
    ``meta`` names are folded already and skipped.

    A kill leaves every completed append in the page cache (a shared
    mapping), as SQLite's WAL at ``synchronous=NORMAL`` does: what the
    durability promises. Not used at "power", which fsyncs each decision."""

    def __init__(self, path: Path, size: int | None = None) -> None:
        self.path = path
        size = JOURNAL_BYTES if size is None else size
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
        try:
            if os.fstat(fd).st_size != size:
                os.ftruncate(fd, size)
            os.posix_fallocate(fd, 0, size)     # (no SIGBUS on a full filesystem)
            self.mm: mmap.mmap | None = mmap.mmap(fd, size)
        except OSError as e:
            os.close(fd)
            if e.errno in (errno.ENOSPC, errno.EDQUOT):
                raise NoSpaceError(f"{path}: the filesystem has no room for the CG "
                                   f"journal's {size} bytes ({e.strerror})") from None
            raise
        os.close(fd)
        self.size = size
        self.generation = 0     # of the entries appended now
        self.pos = 0
        #: the statements of the entries not folded yet, in order
        self.pending: list = []

    @staticmethod
    def read(path: Path, folded: int) -> tuple[int, list]:
        """The entries of ``path`` not folded (generation ``folded`` + 1, from
        the start, up to the first that is not one): ``(generation, their
        statements)``; ``(folded + 1, [])`` without a file."""
        gen = folded + 1
        try:
            data = path.read_bytes()
        except FileNotFoundError:
            return gen, []
        out: list = []
        pos = 0
        while pos + _J_HEAD.size <= len(data):
            n, crc, g = _J_HEAD.unpack_from(data, pos)
            end = pos + _J_HEAD.size + n
            if g != gen or n == 0 or end > len(data):
                break
            payload = data[pos + _J_HEAD.size:end]
            if zlib.crc32(payload, zlib.crc32(struct.pack("<IQ", n, g))) != crc:
                break                   # a torn append (or what an older one left)
            try:
                statements = marshal.loads(payload)
            except (ValueError, EOFError, TypeError) as e:
                raise CorruptUnitError(f"{path}: an entry passes its check but does not "
                                       f"read: {e}") from None
            for i, args in statements:
                if not 0 <= i < len(_DEFERRED):
                    raise CorruptUnitError(f"{path}: an entry names statement {i}")
            out += statements
            pos = (end + 7) & ~7
        return gen, out

    def append(self, statements: list) -> bool:
        """Append one entry (a transaction's statements); False, writing
        nothing, if it does not fit (fold, then append again)."""
        payload = marshal.dumps(statements)
        n = len(payload)
        start = self.pos
        end = start + _J_HEAD.size + n
        if end > self.size:
            return False
        mm = self.mm
        assert mm is not None
        gen = self.generation
        mm[start + _J_HEAD.size:end] = payload      # the payload, then its header
        mm[start:start + _J_HEAD.size] = _J_HEAD.pack(
            n, zlib.crc32(payload, zlib.crc32(struct.pack("<IQ", n, gen))), gen)
        self.pos = (end + 7) & ~7
        self.pending += statements
        return True

    def restart(self, generation: int) -> None:
        """After a fold of every entry: append from the start, generation
        ``generation`` (the folded one + 1)."""
        self.generation = generation
        self.pos = 0
        self.pending = []

    def close(self, remove: bool) -> None:
        if self.mm is not None:
            self.mm.close()
            self.mm = None
        if remove:
            self.path.unlink(missing_ok=True)


class _Inside:
    """:meth:`SQLiteStore._atomic` inside the open transaction: nothing to do."""

    def __enter__(self) -> None:
        return None

    def __exit__(self, *exc) -> None:
        return None


_INSIDE = _Inside()

POOL_PER_SIZE = 1024   # recycled bitmap files kept per bitmap size


class SQLiteStore(Store):
    """A storage unit's metadata: SQLite for rows, one file per bitmap.

    Thread-safe: one connection guarded by a lock. Each save is its own
    transaction unless made inside :meth:`transaction`.
    """

    durable = True
    _conn: sqlite3.Connection
    # (class defaults: __init__ reads the database before it sets them)
    _journal: CGJournal | None = None
    _jtx: list | None = None        # a deferred transaction's statements
    _jfolding = False               # the open SQL transaction folds the journal
    _trace: Callable[[str], None] | None = None
    _owner: int | None = None       # the thread of the open transaction
    _failures_json: tuple[dict, str] | None = None   # counters' failures, as last dumped

    @property
    def db(self) -> sqlite3.Connection:
        """The unit's SQLite connection, with every record in it: a
        transaction that so far went to the CG journal (:class:`CGJournal`)
        becomes an SQLite one first (its statements and the journal's run
        in it), and outside a transaction the journal is folded first. (The
        CG path writes through :meth:`_put` and does not come here.)"""
        j = self._journal
        if j is not None and (self._jtx is not None or (j.pending and not self._jfolding)):
            self._materialize()
        return self._conn

    @db.setter
    def db(self, conn: sqlite3.Connection) -> None:
        self._conn = conn

    def recycle(self, bitmaps) -> None:
        """File bitmaps go back to the pool when no row names them (see
        :meth:`_collect`), not when an object drops them."""

    def __init__(self, directory: Path, unit_path: str, readonly: bool = False, *,
                 durability: str = "process",
                 on_session_added=None, on_session_dropped=None) -> None:
        super().__init__(on_session_added=on_session_added,
                         on_session_dropped=on_session_dropped)
        self.dir = directory
        self.unit_path = unit_path
        self.readonly = readonly
        # "process": commits reach the WAL file (the page cache keeps them
        # across a process kill) without an fsync; "power": each commit that
        # asks for it is fsynced (see transaction())
        self.durability = durability
        self.closed = False
        self.bitmap_dir = directory / "bitmaps"
        db = directory / "unit.db"
        existed = db.exists()
        if readonly and not existed:
            raise CorruptUnitError(f"{directory} holds no unit.db (a read-only open "
                                   "creates nothing)")
        #: whether this open deleted the unit's reserve file to make room
        self.released_reserve = False
        if not readonly and _free_bytes(directory) < RESERVE_BYTES:
            self.released_reserve = release_reserve(directory)
        conn: sqlite3.Connection | None = None   # to close if the open fails
        try:
            if readonly:
                self.db = conn = _connect_readonly(db)
            else:
                self.db = conn = sqlite3.connect(db, check_same_thread=False,
                                                 isolation_level=None)
            if existed:
                # someone else's database named unit.db: refused before
                # anything (the journal mode, the tables) changes it
                tables = {r[0] for r in self.db.execute(
                    "SELECT name FROM sqlite_master WHERE type='table'")}
                if tables and "meta" not in tables:
                    raise CorruptUnitError(
                        f"{db} is an SQLite database but not a fastfc unit's (it has no "
                        f"meta table; tables: {', '.join(sorted(tables)[:5])}); "
                        "nothing was changed")
            if not readonly:
                self.bitmap_dir.mkdir(exist_ok=True)
                self.db.execute("PRAGMA journal_mode=WAL")
                self.db.execute("PRAGMA synchronous=" +
                                ("FULL" if durability == "power" else "NORMAL"))
            if existed:
                ok = self.db.execute("PRAGMA quick_check").fetchone()[0]
                if ok != "ok":
                    raise CorruptUnitError(f"{db} fails SQLite's integrity check: {ok}")
            if not readonly:
                self.db.executescript(_SCHEMA)
            row = self.db.execute("SELECT value FROM meta WHERE key='schema'").fetchone()
        except sqlite3.DatabaseError as e:
            if conn is not None:
                conn.close()
            raise CorruptUnitError(f"{db} is not a readable fastfc unit database: {e}") from None
        except BaseException:
            if conn is not None:
                conn.close()
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
        elif int(row[0]) not in READABLE_SCHEMAS:
            self.db.close()
            raise CorruptUnitError(f"{db} has schema {row[0]}; this fastfc reads "
                                   f"{', '.join(map(str, READABLE_SCHEMAS))}")
        elif int(row[0]) != SCHEMA_VERSION and not readonly:
            # a unit from before the FlashCopy log: its table exists now
            # (_SCHEMA), and a fastfc that would not read it must refuse
            # the unit from here on
            self.db.execute("UPDATE meta SET value=? WHERE key='schema'", (str(SCHEMA_VERSION),))
        row = self.db.execute("SELECT value FROM meta WHERE key='uuid'").fetchone()
        if row is None and not readonly:
            # a unit made before units had an id gets one the first time it
            # is opened read-write
            row = (str(uuid.uuid4()),)
            self.db.execute("INSERT INTO meta VALUES('uuid', ?)", row)
        self.uuid: str | None = row[0] if row else None
        # tables a unit made by an older fastfc lacks until opened read-write
        self._tables = {r[0] for r in self.db.execute(
            "SELECT name FROM sqlite_master WHERE type='table'")}
        has_partners = "partners" in self._tables
        self._partners: dict[str, str] = dict(self.db.execute(
            "SELECT uuid, path FROM partners").fetchall()) if has_partners else {}
        if not readonly and "thin" not in {r[1] for r in self.db.execute("PRAGMA table_info(volumes)")}:
            # a unit made before thick volumes: its files are sparse, so its
            # volumes are thin (the default); older readers ignore the column
            self.db.execute("ALTER TABLE volumes ADD COLUMN thin INTEGER NOT NULL DEFAULT 1")
        if not readonly and "grain_size" not in {
                r[1] for r in self.db.execute("PRAGMA table_info(volumes)")}:
            # a unit made before grains: its volumes keep a bit per track
            # (NULL), their bitmap files as they are
            self.db.execute("ALTER TABLE volumes ADD COLUMN grain_size INTEGER")
        if not readonly:
            try:
                _migrate_served_sessions(self.db, directory)
            except BaseException:
                self.db.close()
                raise
            self._tables.add("served_sessions")
        self._lock = threading.RLock()
        # what each PPRC secondary here knows of its pair (the pair's row is
        # with its primary): a unit made before this record has none
        self._secondaries: dict[str, dict] = {
            r["name"]: {k: v for k, v in r.items() if k != "name"}
            for r in self._rows("secondaries")} if "secondaries" in self._tables else {}
        #: whether this unit records its secondaries' pairs (one made by an
        #: older fastfc, opened read-only, does not)
        self.records_secondaries = "secondaries" in self._tables
        self._depth = 0
        self._next_bitmap = 1 + max([int(p.stem) for p in self.bitmap_dir.glob("*.bm")
                                     if p.stem.isdigit()] or [0])
        self._row_bitmaps: dict[tuple[str, int], set[int]] = {}
        # how many rows reference each bitmap file (what _row_bitmaps says,
        # counted, so a commit finds a file unreferenced in O(1), not O(rows))
        self._refs: dict[int, int] = {}
        # per open transaction level: each row's bitmap set before the level
        # first changed it (_MISSING: the row had none), to undo a rollback
        # in O(rows it changed) rather than copying every row at each begin
        self._undo: list[dict[tuple[str, int], object]] = []
        self._maps: dict[int, FileBitmap] = {}           # every mapped bitmap file
        self._pool: dict[int, list[FileBitmap]] = {}     # unreferenced, by n_bits
        self._garbage: set[int] = set()
        self._options_json: dict[tuple, str] = {}   # FlashCopy options -> their JSON
        # the FlashCopy log (save_flashes): the log row holding each logged
        # relationship's newest state, each row's relationship ids, and for
        # how many of them each row is still the newest (a row that is so
        # for none is deleted)
        self._log_latest: dict[int, int] = {}
        self._log_ids: dict[int, list[int]] = {}
        self._log_live: dict[int, int] = {}
        #: each flashcopies row's options as last written (a batch that
        #: changes them is saved row by row)
        self._fc_options: dict[int, dict] = {}
        self._trimmed: dict[str, int] = {}   # session -> the decision that last trimmed
        #: session -> the last failure its row in session_failures holds (absent:
        #: not known, written at the next save)
        self._failures_saved: dict[str, dict | None] = {}
        #: the sessions table (name -> config JSON) as last committed, or
        #: None: read once, forgotten by each write of it and each rollback
        self._configs: dict[str, str] | None = None
        self._next_step = 1      # the FlashCopy log's next row (numbered here)
        self._recover_journal(directory)
        self._has_log = "flash_log" in self._tables
        if self._has_log:
            self._load_log_index()
        self.fsyncs = 0   # commits, each one fsync of the WAL
        self.msyncs = 0   # volume and bitmap syncs (sync(): durability "power")
        if not readonly:
            keep_reserve(directory)

    @property
    def ref(self) -> str:
        """How rows of other units name this unit: its uuid (its path for a
        unit from before units had ids, opened read-only)."""
        return self.uuid or self.unit_path

    def link_partner(self, other: Store) -> None:
        """Record in this unit and ``other`` (when it is another unit's
        store) where each finds the other, as a path relative to itself."""
        if other is self or not other.durable:
            return
        other = cast(SQLiteStore, other)   # the durable store
        for x, y in ((self, other), (other, self)):
            if x.uuid and y.uuid and not x.readonly and not x.closed:
                x.set_partner(y.uuid, os.path.relpath(y.dir, x.dir))

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
        record (the commits of a CG whose decision is recorded). At
        durability "process" no commit is fsynced (:meth:`sync_point` is)."""
        self.check_writable()
        sync = sync and self.durability == "power"
        with self._lock:
            level = self._depth
            if level == 0 and not sync and self.durability == "power":
                self.db.execute("PRAGMA synchronous=NORMAL")
            try:
                with self._transaction(level, fsync=sync):
                    yield
            finally:
                if level == 0 and not sync and self.durability == "power":
                    self.db.execute("PRAGMA synchronous=FULL")

    def sync(self, *things) -> None:
        """Write the dirty pages of ``things`` (volumes, file bitmaps; None
        skipped) to the disk, one after another, each msync returning once
        its pages are on the disk: the ordering barrier of durability "power"."""
        for thing in things:
            flush = getattr(thing, "flush", None)
            if flush is not None:
                flush()
                self.msyncs += 1
                try:
                    faults.hit("barrier")   # power-cut tests stop the world here
                except InjectedFault:
                    pass

    def sync_point(self) -> None:
        """Make every committed row durable against power loss: checkpoint the
        WAL into the database with both files synced (SQLite syncs the WAL
        before a checkpoint and the database after it)."""
        self.check_writable()
        with self._lock:
            try:
                self.db.execute("PRAGMA wal_checkpoint(FULL)")
            except sqlite3.OperationalError as e:
                if not _is_full(e):
                    raise
                raise self._wal_kept(e) from e
            self.fsyncs += 1

    def _wal_kept(self, e: BaseException) -> NoSpaceError:
        """A checkpoint found no room to move the WAL into ``unit.db``: make
        sure the committed rows are on the disk in the WAL (fsync), and say
        so. Nothing is lost: the next open reads the WAL."""
        wal = self.dir / "unit.db-wal"
        try:
            fd = os.open(wal, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        except OSError:
            pass
        return NoSpaceError(
            f"{self.dir / 'unit.db'}: no room to checkpoint ({e}); every committed "
            f"change is safe in {wal.name} and goes into unit.db at the next open "
            "with room (free space, e.g. remove a volume)")

    @contextmanager
    def _transaction(self, level: int, fsync: bool = False):
        """A transaction (``level`` 0) or a savepoint in one. At durability
        "process" a transaction starts *deferred*: the CG path's statements
        (:meth:`_put`) are kept, and its commit is one append to the CG
        journal; anything else that needs SQLite in it (:attr:`db`, a
        savepoint) makes it an SQLite transaction first (:meth:`_materialize`)."""
        with self._lock:
            conn = self._conn
            journal = self._journal
            deferred = level == 0 and journal is not None
            log_before = None
            if deferred:
                self._jtx = []
                log_before = (dict(self._log_latest), dict(self._log_ids),
                              dict(self._log_live))
            else:
                if self._jtx is not None:
                    self._materialize()       # a savepoint needs the SQL transaction
                conn.execute("BEGIN IMMEDIATE" if level == 0 else f"SAVEPOINT sp{level}")
            saved_garbage = set(self._garbage)
            self._undo.append({})
            self._depth += 1
            owner = self._owner
            self._owner = threading.get_ident()     # (the lock's holder)
            try:
                yield
                if level == 0:
                    if self._jtx is not None:
                        self._journal_commit()
                    else:
                        conn.execute("COMMIT")
                        if self._jfolding:
                            self._jfolding = False
                            cast(CGJournal, journal).restart(
                                cast(CGJournal, journal).generation + 1)
            except BaseException as e:
                self._depth -= 1
                self._owner = owner
                if level == 0:
                    self._jtx = None
                    self._jfolding = False
                    if conn.in_transaction:
                        conn.execute("ROLLBACK")
                else:
                    conn.execute(f"ROLLBACK TO sp{level}")
                    conn.execute(f"RELEASE sp{level}")
                self._rollback_rows(self._undo.pop())
                self._garbage = saved_garbage
                self._configs = None
                self._failures_saved.clear()     # not known now: written at the next save
                self._fc_options.clear()         # (read again as rows are saved)
                if log_before is not None:       # the log's bookkeeping as committed
                    self._log_latest, self._log_ids, self._log_live = log_before
                else:
                    self._rollback_log()
                if _is_full(e) and level == 0:
                    freed = release_reserve(self.dir)
                    raise NoSpaceError(
                        f"{self.dir / 'unit.db'}: {e}; the transaction was rolled back "
                        + ("(the unit's reserve was released so that freeing space "
                           "works: remove a volume, then retry)" if freed else
                           "(free space and retry)")) from e
                raise
            self._depth -= 1
            self._owner = owner
            undo = self._undo.pop()
            if self._undo:           # a savepoint released: its changes are the parent's
                parent = self._undo[-1]
                for k, v in undo.items():
                    parent.setdefault(k, v)
            if level == 0:
                if fsync:        # synchronous=FULL: the commit fsynced the WAL
                    self.fsyncs += 1
                self._collect()
            else:
                conn.execute(f"RELEASE sp{level}")

    # -- the CG journal (durability "process") -----------------------------------
    def set_trace_callback(self, callback: Callable[[str], None] | None) -> None:
        """Call ``callback`` with each statement this unit records: SQLite's
        (``sqlite3``'s trace callback) and, before it is kept, each one
        going to the CG journal (``"JOURNAL <sql>"``), and ``"JOURNAL
        COMMIT"`` before each append (None: stop)."""
        self._trace = callback
        self._conn.set_trace_callback(callback)

    def _put(self, i: int, args: tuple) -> None:
        """Run CG-path statement ``i`` (:data:`_DEFERRED`) with ``args`` in
        the open transaction: kept for the journal while it is deferred."""
        jtx = self._jtx
        if jtx is not None:
            if self._trace is not None:
                self._trace("JOURNAL " + _DEFERRED[i][0])
            jtx.append((i, args))
        else:
            self._conn.execute(_DEFERRED[i][0], args)

    def _run(self, statements: list) -> None:
        """Run journaled statements (compacted: :func:`_compact`) on the connection."""
        conn = self._conn
        for i, args in _compact(statements):
            conn.execute(_DEFERRED[i][0], args)

    def _mark_folded(self, generation: int) -> None:
        self._conn.execute("INSERT OR REPLACE INTO meta VALUES('journal', ?)", (str(generation),))

    def _journal_commit(self) -> None:
        """Commit the deferred transaction: one journal append; when it does
        not fit, the journal's entries and it in one SQLite commit."""
        stmts = cast(list, self._jtx)
        journal = cast(CGJournal, self._journal)
        if not stmts:
            self._jtx = None
            return
        if self._trace is not None:
            self._trace("JOURNAL COMMIT")
        try:
            appended = journal.append(stmts)
        except ValueError:      # (marshal: a value it does not take; SQLite may)
            appended = False
        if appended:
            self._jtx = None
            return
        self._materialize()
        self._conn.execute("COMMIT")
        self._jfolding = False
        journal.restart(journal.generation + 1)

    def _materialize(self) -> None:
        """Make the records SQLite's: in a deferred transaction, begin the
        SQLite one with the journal's statements and the transaction's so
        far (its commit then empties the journal); outside one, fold the
        journal in a transaction of its own."""
        with self._lock:
            journal = self._journal
            if journal is None:
                return
            conn = self._conn
            if self._jtx is not None:
                stmts, self._jtx = self._jtx, None
                conn.execute("BEGIN IMMEDIATE")
                self._jfolding = True
                self._run(journal.pending + stmts)
                self._mark_folded(journal.generation)
            elif journal.pending and not self._jfolding:
                conn.execute("BEGIN IMMEDIATE")
                try:
                    self._run(journal.pending)
                    self._mark_folded(journal.generation)
                    conn.execute("COMMIT")
                except BaseException as e:
                    if conn.in_transaction:
                        conn.execute("ROLLBACK")
                    if _is_full(e):
                        raise self._wal_kept(e) from e
                    raise
                journal.restart(journal.generation + 1)

    def _recover_journal(self, directory: Path) -> None:
        """At open: the CG journal's entries not folded yet go into unit.db
        (read-write), or into an in-memory copy of it that this store reads
        (read-only: nothing on the disk changes). Read-write at durability
        "process", the journal is then kept for the CGs to come, when the
        filesystem has room for it (a unit that released its reserve, or
        cannot have the journal's blocks, records CGs in SQLite); otherwise
        its file goes."""
        path = directory / JOURNAL_FILE
        conn = self._conn
        row = conn.execute("SELECT value FROM meta WHERE key='journal'").fetchone()
        folded = int(row[0]) if row else 0
        gen, statements = CGJournal.read(path, folded)
        if self.readonly:
            if statements:
                mem = sqlite3.connect(":memory:", check_same_thread=False, isolation_level=None)
                conn.backup(mem)
                conn.close()
                self._conn = mem
                mem.execute("BEGIN")
                self._run(statements)
                mem.execute("COMMIT")
            return
        if statements:
            conn.execute("BEGIN IMMEDIATE")
            try:
                self._run(statements)
                self._mark_folded(gen)
                conn.execute("COMMIT")
            except BaseException:
                if conn.in_transaction:
                    conn.execute("ROLLBACK")
                raise
            folded = gen
        if self.durability == "process" and not self.released_reserve and (
                path.exists() or _free_bytes(directory) >= JOURNAL_BYTES + 4 * RESERVE_BYTES):
            try:
                self._journal = CGJournal(path)
            except NoSpaceError:
                pass          # (a filesystem with no room: the CGs' records go to SQLite)
            else:
                self._journal.restart(folded + 1)
                return
        path.unlink(missing_ok=True)

    def _atomic(self, sync: bool = True):
        """For a save of one or two statements: its own transaction when none
        is open (``sync`` as for :meth:`transaction`), else part of the open
        one without a savepoint (a statement is atomic by itself, and the
        enclosing transaction's rollback also undoes the bitmap bookkeeping).
        Inside a transaction of this thread (the CG path) no context manager
        is made."""
        if self._depth and self._owner == threading.get_ident():
            return _INSIDE
        return self._atomic_cm(sync)

    @contextmanager
    def _atomic_cm(self, sync: bool):
        with self._lock:
            if self._depth:
                yield
            else:
                with self.transaction(sync):
                    yield

    def _exec(self, sql: str, args=()):
        with self.transaction():
            return self.db.execute(sql, args)

    def query(self, sql: str, args=()) -> list:
        with self._lock:
            return self.db.execute(sql, args).fetchall()

    def _rows(self, table: str) -> list[dict]:
        with self._lock:
            cur = self.db.execute(f"SELECT * FROM {table} ORDER BY rowid")
            cols = [d[0] for d in cur.description]
            return [dict(zip(cols, r)) for r in cur.fetchall()]

    # -- bitmaps ---------------------------------------------------------------
    def new_bitmap(self, n_bits: int, fill: bool = False) -> TrackBitmap:
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
        mm, words = _map_bitmap(path, max((n_bits + 63) // 64, 1), create=True)
        bm = FileBitmap(n_bits, fill=fill, words=words)
        bm.file_id, bm.path, bm._mm = fid, path, mm
        self._maps[fid] = bm
        return bm

    def new_bitmaps(self, n_bits: int, count: int) -> list[TrackBitmap]:
        """``count`` empty bitmaps of ``n_bits`` (:meth:`new_bitmap` each):
        recycled ones from the pool under one lock, cleared in one call,
        then new files for the rest."""
        if count <= 0:
            return []
        if self.readonly:
            return [TrackBitmap(n_bits) for _ in range(count)]
        got: list[TrackBitmap] = []
        with self._lock:
            pool = self._pool.get(n_bits)
            if pool:
                got = list(pool[-count:])
                del pool[-count:]
        _core.zero_bitmaps(got)
        got += [self.new_bitmap(n_bits) for _ in range(count - len(got))]
        return got

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
            fd = os.open(path, os.O_RDONLY)
            try:
                mm, words = _words_of(fd, n_words, mmap.ACCESS_COPY)
            finally:
                os.close(fd)
        else:
            mm, words = _map_bitmap(path, n_words, create=False)
        bm = FileBitmap(n_bits, words=words)
        bm.file_id, bm.path, bm._mm = fid, path, mm
        self._maps[fid] = bm
        return bm

    def _set_row(self, key: tuple[str, int], now: set[int] | None) -> set[int]:
        """Set (None: drop) the bitmap files row ``key`` references (see
        :meth:`_set_rows`); returns those it no longer references."""
        return self._set_rows(((key, now),))

    def _set_rows(self, items) -> set[int]:
        """Set (None: drop) the bitmap files each row references (``items``:
        ``(key, set of file ids or None)``), keeping the reference counts
        and the open transaction's undo record; returns the files the rows
        no longer reference."""
        rows = self._row_bitmaps
        undo = self._undo[-1] if self._undo else None
        refs = self._refs
        gone: set[int] = set()
        for key, now in items:
            old = rows.get(key)
            if undo is not None and key not in undo:
                undo[key] = _MISSING if old is None else old
            if now is None:
                rows.pop(key, None)
            else:
                rows[key] = now
            if old == now:
                continue
            before = old or set()
            after = now or set()
            for fid in after - before:
                refs[fid] = refs.get(fid, 0) + 1
            for fid in before - after:
                gone.add(fid)
                n = refs.get(fid, 0) - 1
                if n > 0:
                    refs[fid] = n
                else:
                    refs.pop(fid, None)
        return gone

    def _rollback_rows(self, undo: dict) -> None:
        """Put back the rows a rolled-back transaction level changed, and
        count the references again (a rollback is rare: O(rows) is fine)."""
        rows = self._row_bitmaps
        for key, old in undo.items():
            if old is _MISSING:
                rows.pop(key, None)
            else:
                rows[key] = cast(set, old)
        refs: dict[int, int] = {}
        for fids in rows.values():
            for fid in fids:
                refs[fid] = refs.get(fid, 0) + 1
        self._refs = refs

    def _track(self, key: tuple[str, int], bitmaps) -> None:
        """Remember which bitmap files a row references now; the ones it no
        longer references are deleted after the transaction commits."""
        self._track_files(key, {b.file_id for b in bitmaps if isinstance(b, FileBitmap)})

    def _track_files(self, key: tuple[str, int], now: set[int]) -> None:
        """:meth:`_track` with the row's bitmap file ids."""
        gone = self._set_row(key, now)
        if gone:
            self._garbage |= gone

    def _collect(self) -> None:
        """After a commit: bitmaps no row references any more go back to the
        pool (a Global Mirror CG frees and needs the same sizes every time),
        or are deleted when the pool is full. The pool keeps at least as many
        per size as rows reference files in all (a CG of many triplets drops
        three per relationship at its commit and takes as many at the next
        prepare: fewer would make it delete and create files every CG)."""
        garbage = self._garbage
        if not garbage:
            return
        refs = self._refs
        maps = self._maps
        pools = self._pool
        cap = max(POOL_PER_SIZE, len(refs))
        for fid in garbage:
            if fid in refs:
                continue
            bm = maps.get(fid)
            if bm is not None:
                pool = pools.get(bm.n_bits)
                if pool is None:
                    pool = pools[bm.n_bits] = []
                if len(pool) < cap:
                    pool.append(bm)
                    continue
                del maps[fid]
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
        live = self._refs
        for p in self.bitmap_dir.glob("*.bm"):
            if p.stem.isdigit() and int(p.stem) not in live:
                p.unlink()

    # -- volumes -----------------------------------------------------------------
    def add_volume(self, name: str, n_tracks: int, track_size: int, thin: bool = False,
                   grain_size: int | None = None) -> None:
        self._exec("INSERT INTO volumes(name, n_tracks, track_size, thin, grain_size) "
                   "VALUES(?,?,?,?,?)", (name, n_tracks, track_size, int(thin), grain_size))

    def remove_volume(self, name: str) -> None:
        self._exec("DELETE FROM volumes WHERE name=?", (name,))

    def set_volume_flags(self, flags: dict) -> None:
        self._exec("UPDATE volumes SET secondary=?, invalid=? WHERE name=?",
                   (int(flags["secondary"]), int(flags["invalid"]), flags["name"]))

    def save_secondary(self, name: str, record: dict | None) -> None:
        if self._secondaries.get(name) == record:
            return      # so recorded: restoring a pair writes nothing
        if record is None:
            self._exec("DELETE FROM secondaries WHERE name=?", (name,))
            self._secondaries.pop(name, None)
            return
        rec = {"primary_unit": record["primary_unit"], "primary_name": record["primary_name"],
               "mode": record["mode"]}
        self._exec("INSERT OR REPLACE INTO secondaries VALUES(?,?,?,?)",
                   (name, rec["primary_unit"], rec["primary_name"], rec["mode"]))
        self._secondaries[name] = rec

    def secondary_records(self) -> dict[str, dict]:
        return {k: dict(v) for k, v in self._secondaries.items()}

    def volume_records(self) -> list[dict]:
        """Every stored volume: name, n_tracks, track_size, secondary,
        invalid, thin (a unit made before thick volumes has thin ones),
        grain_size (a unit made before grains has a bit per track)."""
        rows = self._rows("volumes")
        for r in rows:
            r.setdefault("thin", 1)
            if r.get("grain_size") is None:
                r["grain_size"] = r["track_size"]
        return rows

    def _load_bitmaps(self, kind: str, row: dict, keys, n_bits: int) -> None:
        """Map the bitmap files ``row`` names (in place: ids become bitmaps)
        and keep them alive as the row's until it changes."""
        self._set_row((kind, row["id"]), {row[k] for k in keys if row[k] is not None})
        for k in keys:
            row[k] = self.load_bitmap(row[k], n_bits)

    # -- FlashCopy ---------------------------------------------------------------
    _FLASH_MAPS = ("to_copy", "src_changed", "tgt_changed",
                   "rv_to_copy", "rv_src_changed", "rv_tgt_changed")

    def save_flash(self, record: dict) -> int:
        """Record one relationship in its ``flashcopies`` row (a relationship
        the FlashCopy log names has the log folded into the rows first, so
        that the row is its newest state)."""
        maps = [record[k] for k in self._FLASH_MAPS]
        ids = [getattr(m, "file_id", None) for m in maps]
        opts = record["options"]
        key = tuple(opts.items())
        options = self._options_json.get(key)
        if options is None:
            options = json.dumps(opts)
            if len(self._options_json) < 64:
                self._options_json[key] = options
        rid = record["id"]
        with self._atomic():
            if rid is not None and rid in self._log_latest:
                self._fold_log()
            if rid is None:
                rid = self.db.execute(
                    "INSERT INTO flashcopies(source, target, options, sequence, revertible)"
                    " VALUES(?,?,?,?,?)", (record["source"], record["target"], options,
                                           record["sequence"], int(record["revertible"]))
                ).lastrowid
            self.db.execute(
                "UPDATE flashcopies SET options=?, sequence=?, revertible=?, to_copy=?,"
                " src_changed=?, tgt_changed=?, rv_to_copy=?, rv_src_changed=?,"
                " rv_tgt_changed=?, rv_sequence=? WHERE id=?",
                (options, record["sequence"], int(record["revertible"]), *ids,
                 record["rv_sequence"], rid))
            self._track(("fc", rid), maps)
            self._fc_options[rid] = dict(opts)
        return rid

    def save_flashes(self, records: list[dict]) -> list[int | None]:
        """Record a batch of relationships (one consistency group's step on
        this unit) as one row of the FlashCopy log, whatever their number:
        each relationship's id, sequence, revertible flag, bitmap file ids
        and revert sequence, packed (``_LOG_COLUMNS``). The log is folded
        into the ``flashcopies`` rows when a relationship it names is saved
        or dropped alone, when it grows past ``_LOG_ROWS_MAX`` rows, when
        the unit is opened and when it is closed; until then
        :meth:`flash_rows` reads the rows with the log applied.

        The batch's newest log row replaces the previous one in place when
        that one names the same relationships and nothing newer does (a
        session's groups: one statement per step); else it is a new row,
        and a row that no longer holds any relationship's newest state is
        deleted. A record with no row yet (id None), or whose options differ
        from its row's, is saved by :meth:`save_flash`, in the same commit.
        """
        if not records:
            return []
        named = [r["id"] for r in records if r["id"] is not None]
        if len(set(named)) != len(named):
            twice = sorted({i for i in named if named.count(i) > 1})
            raise ValueError(f"a batch of FlashCopy records names row(s) {twice} more than "
                             "once; give each relationship's record once")
        with self._atomic():
            out: list[int | None] = []
            logged = []
            fc_options = self._fc_options
            for r in records:
                rid = r["id"]
                if rid is None or fc_options.get(rid) != r["options"]:
                    rid = self.save_flash(r)
                else:
                    logged.append(r)
                out.append(rid)
            if logged:
                self._log_batch(logged, [r["id"] for r in logged])
        return out

    def save_steps(self, rels: list, ids: list[int | None],
                   options: list[dict]) -> list[int | None]:
        """:meth:`save_flashes` for relationships after a batched step, read
        in one core call (no record built) when every one has a row whose
        options are these; else their records go to :meth:`save_flashes`."""
        fc_options = self._fc_options
        for rid, opts in zip(ids, options):
            if rid is None or fc_options.get(rid) != opts:
                return self.save_flashes([r.to_record() for r in rels])
        if rels:
            with self._atomic():
                self._log_batch(rels, cast(list[int], ids))   # (none is None: checked above)
        return ids

    def _log_batch(self, rels: list, ids: list[int]) -> None:
        """The FlashCopy log row of relationships ``rels`` or their records
        (each with a row already, ``ids``, its options as stored). Inside a
        transaction."""
        body, gone = _core.log_rows(rels, ids, self._row_bitmaps, self._refs,
                                    self._undo[-1] if self._undo else None, _MISSING,
                                    _LOG_NULL)
        if gone:
            self._garbage |= gone
        latest = self._log_latest
        prev = latest.get(ids[0])
        if (prev is not None and len(self._log_ids[prev]) == len(ids)
                and all(latest.get(i) == prev for i in ids)):
            # the same relationships as the newest row naming any of them
            self._put(_J_LOG_UPDATE, (body, prev))
            return
        step = self._next_step
        self._next_step += 1
        self._put(_J_LOG_INSERT, (step, body))
        live = self._log_live
        for i in ids:
            p = latest.get(i)
            if p is not None:
                live[p] -= 1
                if not live[p]:
                    self._put(_J_LOG_DELETE, (p,))
                    del live[p], self._log_ids[p]
            latest[i] = step
        live[step] = len(ids)
        self._log_ids[step] = ids
        if len(live) > _LOG_ROWS_MAX:
            self._fold_log()

    @staticmethod
    def _log_entries(bodies) -> dict[int, tuple]:
        """The newest logged state of each relationship in log row bodies
        (oldest first): id -> the values of ``_LOG_COLUMNS[1:]``, None for
        ``_LOG_NULL`` where a column may be None."""
        newest: dict[int, tuple] = {}
        for body in bodies:
            if len(body) % (8 * _LOG_WIDTH):
                raise CorruptUnitError(f"a FlashCopy log row holds {len(body)} bytes, "
                                       f"not a multiple of {8 * _LOG_WIDTH}")
            for v in np.frombuffer(body, dtype="<i8").reshape(-1, _LOG_WIDTH).tolist():
                newest[v[0]] = (v[1], v[2], *[None if x == _LOG_NULL else x for x in v[3:]])
        return newest

    def _fold_log(self) -> None:
        """Write the log's newest state of each relationship it names into
        the ``flashcopies`` rows and empty the log. Inside a transaction."""
        bodies = [b for (b,) in self.db.execute("SELECT body FROM flash_log ORDER BY step")]
        newest = self._log_entries(bodies)
        self.db.executemany(
            "UPDATE flashcopies SET sequence=?, revertible=?, to_copy=?, src_changed=?,"
            " tgt_changed=?, rv_to_copy=?, rv_src_changed=?, rv_tgt_changed=?, rv_sequence=?"
            " WHERE id=?", [(*v, rid) for rid, v in newest.items()])
        self.db.execute("DELETE FROM flash_log")
        self._log_latest.clear()
        self._log_ids.clear()
        self._log_live.clear()

    def _load_log_index(self) -> None:
        """The log's bookkeeping (:attr:`_log_latest` and the rest) from the
        database: at open, and after a rollback."""
        latest: dict[int, int] = {}
        ids_of: dict[int, list[int]] = {}
        live: dict[int, int] = {}
        for step, body in self.db.execute("SELECT step, body FROM flash_log ORDER BY step"):
            ids = np.frombuffer(body, dtype="<i8")[::_LOG_WIDTH].tolist()
            ids_of[step] = ids
            live[step] = 0
            for i in ids:
                p = latest.get(i)
                if p is not None:
                    live[p] -= 1
                latest[i] = step
                live[step] += 1
        self._log_latest, self._log_ids, self._log_live = latest, ids_of, live
        if ids_of:
            self._next_step = max(self._next_step, max(ids_of) + 1)

    def _rollback_log(self) -> None:
        """After a rollback: the log's bookkeeping as the database has it,
        and no options known (they are read again as rows are saved)."""
        self._fc_options.clear()
        if self._has_log:
            self._load_log_index()

    def drop_flash(self, record_id: int | None, target_flags: dict) -> None:
        with self._atomic():
            if record_id is not None:
                if record_id in self._log_latest:
                    self._fold_log()   # (a later row could take its id)
                self._fc_options.pop(record_id, None)
                self.db.execute("DELETE FROM flashcopies WHERE id=?", (record_id,))
                self._track(("fc", record_id), [])
                self._set_row(("fc", record_id), None)
            self.db.execute("UPDATE volumes SET invalid=? WHERE name=?",
                            (int(target_flags["invalid"]), target_flags["name"]))

    def flash_rows(self) -> list[dict]:
        """The stored relationships as rows (bitmap file ids, options as JSON),
        each at its newest state: the FlashCopy log is folded into the rows
        first (read-write), or applied to what is read (read-only, or a
        filesystem with no room for the fold)."""
        if self._has_log and not self.readonly:
            with self._lock:
                if self._log_live:
                    try:
                        with self.transaction(sync=False):
                            self._fold_log()
                    except NoSpaceError:
                        pass             # applied below; the log stays, intact
        rows = self._rows("flashcopies")
        if self._has_log:
            newest = self._log_entries(
                b for (b,) in self.query("SELECT body FROM flash_log ORDER BY step"))
            cols = _LOG_COLUMNS[1:]
            for row in rows:
                v = newest.get(row["id"])
                if v is not None:
                    row.update(zip(cols, v))
        for row in rows:
            try:
                self._fc_options[row["id"]] = json.loads(row["options"])
            except (TypeError, ValueError):
                pass                     # (flash_record says what is wrong)
        return rows

    def flash_record(self, row: dict, n_bits: int) -> dict:
        """A stored relationship's row (:meth:`flash_rows`) as a record
        (``FlashCopy.from_record``), in place: its bitmaps mapped
        (``n_bits``: its source's track count). A missing or damaged bitmap
        file raises :class:`~fastfc.errors.CorruptUnitError`; the row's
        files are kept all the same (:meth:`keep_bitmaps`)."""
        self._load_bitmaps("fc", row, self._FLASH_MAPS, n_bits)
        if row["to_copy"] is None:
            raise CorruptUnitError(f"FlashCopy {row['id']} has no to_copy bitmap")
        row["options"] = json.loads(row["options"])
        return row

    def flash_image_complete(self, row: dict) -> bool:
        """Whether the relationship of ``row`` (a row of :meth:`flash_rows`,
        bitmap file ids) had given its target the whole image: not
        revertible, and its to_copy bitmap file there and empty. Read from
        the file, without mapping it (its source may be gone)."""
        if row["revertible"] or row["to_copy"] is None:
            return False
        path = self.bitmap_dir / f"{row['to_copy']}.bm"
        try:
            words = np.fromfile(path, dtype=np.uint64)
        except OSError:
            return False
        return words.size > 0 and not words.any()

    def keep_bitmaps(self, kind: str, row: dict) -> None:
        """Keep the bitmap files a row that is not restored names (``kind``
        "fc" or "pair"), unmapped: they are not orphans, and go when the row
        is dropped (:meth:`drop_flash`, :meth:`drop_pair`)."""
        keys = self._FLASH_MAPS if kind == "fc" else self._PAIR_MAPS
        self._set_row((kind, row["id"]), {row[k] for k in keys
                                          if isinstance(row[k], int)})

    # -- PPRC pairs ----------------------------------------------------------------
    _PAIR_MAPS = ("oos", "spare", "cg")

    def save_pair(self, record: dict, partner: Store | None = None) -> int:
        if partner is not None:
            self.link_partner(partner)
        maps = [record[k] for k in self._PAIR_MAPS]
        ids = [getattr(m, "file_id", None) for m in maps]
        rid = record["id"]
        with self._atomic():
            if rid is None:
                rid = self.db.execute(
                    "INSERT INTO pairs(primary_name, secondary_unit, secondary_name, mode,"
                    " failed_over) VALUES(?,?,?,?,0)",
                    (record["primary_name"], record["secondary_unit"],
                     record["secondary_name"], record["mode"])).lastrowid
            self.db.execute(
                "UPDATE pairs SET primary_name=?, secondary_unit=?, secondary_name=?, mode=?,"
                " suspend_reason=?, failed_over=?, oos=?, spare=?, cg=?, name=? WHERE id=?",
                (record["primary_name"], record["secondary_unit"], record["secondary_name"],
                 record["mode"], record["suspend_reason"], int(record["failed_over"]), *ids,
                 record["name"], rid))
            self._track(("pair", rid), maps)
        return rid

    def drop_pair(self, record_id: int | None) -> None:
        if record_id is None:
            return
        with self._atomic():
            self.db.execute("DELETE FROM pairs WHERE id=?", (record_id,))
            self._track(("pair", record_id), [])
            self._set_row(("pair", record_id), None)

    def pair_rows(self) -> list[dict]:
        """The stored pairs as rows (bitmap file ids)."""
        return self._rows("pairs")

    def pair_record(self, row: dict, n_bits: int) -> dict:
        """A stored pair's row (:meth:`pair_rows`) as a record
        (``PPRCPair.from_record``), in place: its bitmaps mapped (and kept
        until the pair is restored, or forever if it never is; ``n_bits``:
        its primary's track count). A missing or damaged bitmap file raises
        :class:`~fastfc.errors.CorruptUnitError`."""
        self._load_bitmaps("pair", row, self._PAIR_MAPS, n_bits)
        if row["oos"] is None:
            raise CorruptUnitError(f"PPRC pair {row['id']} has no out-of-sync bitmap")
        return row

    # -- Global Mirror sessions ------------------------------------------------------
    def add_session(self, record: dict, session, partners=()) -> None:
        for p in partners:
            self.link_partner(p)
        config = {k: v for k, v in record.items() if k not in ("name", "stats")}
        with self.transaction():
            self._configs = None
            self.db.execute("INSERT OR REPLACE INTO sessions VALUES(?, ?)",
                            (record["name"], json.dumps(config)))
            self.save_session_stats(record["name"], record["stats"])
        super().add_session(record, session, partners)

    def save_session_stats(self, name: str, stats: dict) -> None:
        # the last failure in a table of its own (a fastfc that does not know
        # it writes session_stats as before), written only when it changes
        failure = stats.get("last_failure")
        with self._atomic(sync=False):
            failures = stats["failures"]
            cached = self._failures_json
            if cached is None or cached[0] != failures:
                cached = self._failures_json = (dict(failures), json.dumps(failures))
            self._put(_J_STATS,
                      (name, stats["attempts"], stats["successes"], cached[1],
                       stats["commit_failures_resolved"], stats["bytes_drained"],
                       stats["last_cg_time"], stats["sequence"]))
            if failure != self._failures_saved.get(name, _MISSING) \
                    and "session_failures" in self._tables:
                if failure:
                    self._put(_J_FAILURE, (name, json.dumps(failure)))
                else:
                    self._put(_J_NO_FAILURE, (name,))
                self._failures_saved[name] = dict(failure) if failure else None

    def drop_session(self, name: str, session=None) -> None:
        with self.transaction():
            self._configs = None
            self.db.execute("DELETE FROM sessions WHERE name=?", (name,))
            self.db.execute("DELETE FROM decisions WHERE session=?", (name,))
            self.db.execute("DELETE FROM session_stats WHERE name=?", (name,))
            if "session_failures" in self._tables:
                self.db.execute("DELETE FROM session_failures WHERE name=?", (name,))
            self._failures_saved.pop(name, None)
        super().drop_session(name, session)

    def session_configs(self) -> dict[str, dict]:
        """Kept between writes of the sessions table (in this store, the
        unit's one writer): a command that only looks reads it without
        waiting for the store lock, which a session's loop holds while it
        commits each CG."""
        rows = self._configs
        if rows is None:
            with self._lock:
                rows = self._configs
                if rows is None:
                    rows = dict(self.db.execute("SELECT name, config FROM sessions").fetchall())
                    if not self._depth:      # committed: a transaction's own rows are not
                        self._configs = rows
        return {n: json.loads(c) for n, c in rows.items()}

    def session_rows(self) -> dict[str, dict]:
        """Recorded sessions by name: their configuration, and ``stats``
        (``GMStats.to_record()``, None for a session from before sessions
        kept their counters)."""
        rows = {n: json.loads(c) for n, c in self.query("SELECT name, config FROM sessions")}
        stats = {r["name"]: r for r in self._rows("session_stats")} \
            if "session_stats" in self._tables else {}
        failures = dict(self.query("SELECT name, failure FROM session_failures")) \
            if "session_failures" in self._tables else {}
        for name, cfg in rows.items():
            st = stats.get(name)
            if st is not None:
                st = {k: v for k, v in st.items() if k != "name"}
                st["failures"] = json.loads(st["failures"])
                failure = failures.get(name)
                st["last_failure"] = json.loads(failure) if failure else None
            cfg["stats"] = st
        return rows

    def cg_decision(self, session: str, sequence: int, decision: str) -> None:
        with self._atomic():
            self._put(_J_DECISION, (session, sequence, decision))
            # keep the table small: only the newest decisions matter (the
            # 16 newest and at most 16 before them: trimmed every 16 CGs)
            trimmed = self._trimmed.get(session)
            if trimmed is None or not 0 <= sequence - trimmed < 16:
                self._put(_J_TRIM, (session, sequence - 16))
                self._trimmed[session] = sequence

    def decision(self, session: str, sequence: int) -> str | None:
        row = self.query("SELECT decision FROM decisions WHERE session=? AND sequence=?",
                         (session, sequence))
        return row[0][0] if row else None

    # -- sessions served to a primary in another process (fastfc.remote) --------
    def served_sessions(self) -> dict[str, list[tuple[str, str]]]:
        """Each served session's B->C pairs (volume names), in order. A unit
        opened read-only that an earlier fastfc wrote reads its file."""
        out: dict[str, list[tuple[str, str]]] = {}
        if "served_sessions" in self._tables:
            for name, b, c in self.query("SELECT session, b, c FROM served_sessions "
                                         "ORDER BY session, position"):
                out.setdefault(name, []).append((b, c))
        if self.readonly:
            for name, pairs in _read_legacy_sessions(self.dir).items():
                out.setdefault(name, pairs)
        return out

    def add_served_session(self, name: str, pairs: list[tuple[str, str]]) -> None:
        """Record served session ``name`` with its B->C ``pairs`` (part of
        an open transaction, else its own)."""
        with self._atomic():
            self.db.executemany("INSERT INTO served_sessions VALUES(?,?,?,?)",
                                [(name, i, b, c) for i, (b, c) in enumerate(pairs)])

    def drop_served_session(self, name: str) -> None:
        """Forget served session ``name``: its pairs and its CG records
        (``name`` followed by ``#``)."""
        with self.transaction():
            self.db.execute("DELETE FROM served_sessions WHERE session=?", (name,))
            self.db.execute("DELETE FROM decisions WHERE session >= ? AND session < ?",
                            (name + "#", name + "$"))

    # -- sessions over secondary sites whose A volumes this unit holds ------------
    def save_site_session(self, name: str, record: dict) -> None:
        record = dict(record)
        stats = record.pop("stats", None)
        with self.transaction():
            self.db.execute("INSERT OR REPLACE INTO site_sessions VALUES(?,?,?)",
                            (name, json.dumps(record),
                             None if stats is None else json.dumps(stats)))

    def save_site_stats(self, name: str, stats: dict) -> None:
        with self._atomic(sync=False):
            self.db.execute("UPDATE site_sessions SET stats=? WHERE name=?",
                            (json.dumps(stats), name))

    def site_sessions(self) -> dict[str, dict]:
        """A unit written before site sessions were recorded has none."""
        if "site_sessions" not in self._tables:
            return {}
        out = {}
        for name, record, stats in self.query("SELECT name, record, stats FROM site_sessions"):
            try:
                rec = json.loads(record)
                rec["stats"] = None if stats is None else json.loads(stats)
            except ValueError as e:
                raise CorruptUnitError(f"unit {self.dir}: the record of session {name!r} "
                                       f"over secondary units is damaged: {e}") from None
            out[name] = rec
        return out

    def drop_site_session(self, name: str) -> None:
        if "site_sessions" not in self._tables:
            return
        with self.transaction():
            self.db.execute("DELETE FROM site_sessions WHERE name=?", (name,))

    def decisions_of(self, session: str) -> dict[int, str]:
        """Every CG decision recorded under ``session``, by sequence."""
        return {int(q): d for q, d in self.query(
            "SELECT sequence, decision FROM decisions WHERE session=?", (session,))}

    def close(self) -> None:
        with self._lock:
            if self.closed:
                return
            self.closed = True
            full: NoSpaceError | None = None
            try:
                if not self.readonly:
                    if self._log_live and not self._depth:
                        # a closed unit's flashcopies rows are its whole record
                        # (a fold that finds no room leaves the log, as correct)
                        try:
                            with self._transaction(0, fsync=self.durability == "power"):
                                self._fold_log()
                        except (NoSpaceError, sqlite3.OperationalError):
                            pass
                    if not self._depth:
                        try:
                            self._materialize()     # the CG journal into unit.db
                        except NoSpaceError as e:
                            full = e                # (kept: the next open folds it)
                    try:
                        self._conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
                    except sqlite3.OperationalError as e:
                        if not _is_full(e):
                            raise
                        full = self._wal_kept(e)
                    else:
                        if full is None:
                            keep_reserve(self.dir)
            finally:
                self._conn.close()
                if self._journal is not None:
                    self._journal.close(remove=not self._journal.pending)
                # let go of the bitmap files: one that nothing else holds (a
                # pooled or dropped bitmap) is unmapped and its file closed
                # now; one a relationship still holds stays mapped with it
                self._maps.clear()
                self._pool.clear()
            if full is not None:
                raise full


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


def read_identity(directory: Path, partner_uuid: str | None) -> tuple[str | None, str | None]:
    """Without opening it as a unit: the uuid of the unit in ``directory``
    and where it records its partner ``partner_uuid`` (relative to itself),
    each None if it records none. Raises :class:`sqlite3.Error` when its
    database cannot be read."""
    db = _connect_readonly(directory / "unit.db")
    try:
        row = db.execute("SELECT value FROM meta WHERE key='uuid'").fetchone()
        uid = row[0] if row else None
        row = db.execute("SELECT path FROM partners WHERE uuid=?", (partner_uuid,)).fetchone()
        return uid, (row[0] if row else None)
    finally:
        db.close()
