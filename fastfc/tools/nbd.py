"""An NBD server over fastfc volumes: every volume an export named after it,
and every recovery point one named ``VOLUME#SEQ``, read-only
(:mod:`.nbd_points`).

The server speaks the fixed newstyle handshake of the NBD protocol
(https://github.com/NetworkBlockDevice/nbd/blob/master/doc/proto.md) with
simple replies, or structured replies and block status (metadata
contexts ``base:allocation`` and ``qemu:dirty-bitmap:NAME``:
:mod:`.nbd_status`) for a client that negotiates them, and translates
each request onto the volume's public I/O calls (:meth:`Volume.write`,
:meth:`Volume.readinto`, :meth:`Volume.flush`): copy-on-write, read
redirection, write inhibits and PPRC recording all happen there, once, as
for any other host.

Threads: one accepts on each listening socket; one per connection reads
requests, carries them out and replies, in order. The socket calls and copies
of 64 KiB or more run without the GIL. A write is replied to only once it
is in the volume (so a SIGKILL of the server loses no write a client saw
completed), and a volume's lock is never held across a socket call.

Memory: a connection keeps a receive buffer of :data:`RECV_BUFFER` bytes
(a write of up to :data:`KEEP` bytes lands from it), a 64 KiB buffer for
reads up to :data:`KEEP` and the replies of a batch (about
:data:`REPLY_LIMIT` bytes at most); a larger request borrows one from a pool shared
by all connections, with a byte budget (``buffer_budget``, 256 MiB by
default), and gives it back once answered. A request that finds the budget
spent waits for it (``buffer_wait`` seconds), then is answered ``ENOMEM``.
So the server's buffers take at most ``buffer_budget + max_connections *
(KEEP + RECV_BUFFER + REPLY_LIMIT + KEEP)`` bytes, however many
connections once sent large requests.

Requests are taken in batches: one ``recv`` takes whatever a client has
sent, the whole requests in it are carried out in order, and their replies
go out in one send before the connection waits for its client again. The
small READs and WRITEs of a batch (up to :data:`KEEP` bytes, in range, no
flag but a read's FUA) are carried out in the core, a run of them in one C
call (:func:`fastfc._core.nbd_batch`) through the same volume calls, with
their replies and counts; every other request, and a volume's refusal, is
this module's, as before (:attr:`NBDServer.core_batches`).

Exports are looked up by name at ``NBD_OPT_GO`` (or ``EXPORT_NAME``)
through the ``lookup`` callable under ``lock`` (or without it, when a
command has held it for long); a volume created later is
found then, and a volume removed (closed) while a client has it open
answers every request with ``ESHUTDOWN``/``EIO`` instead of touching its
memory.
"""

from __future__ import annotations

import collections
import contextlib
import errno
import logging
import mmap
import os
import socket
import tempfile
import ssl
import struct
import threading
import time
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Iterator, Protocol

from fastfc import _core
from fastfc.errors import (FastFCError, InvalidImageError, NoSpaceError, VolumeClosedError,
                           WriteInhibitedError)
from fastfc.durable.unit import StorageUnit
from fastfc.storage.volume import Volume
from fastfc.tools import nbd_status
from fastfc.tools.nbd_points import POINT_SEP, describe_point, find_point, point_names
from fastfc.tools.nbd_status import (CMD_BLOCK_STATUS, OPT_LIST_META_CONTEXT,
                                     OPT_SET_META_CONTEXT)

log = logging.getLogger("fastfc.nbd")

# -- protocol constants (proto.md) ---------------------------------------------------
NBDMAGIC = 0x4E42444D41474943          # "NBDMAGIC"
IHAVEOPT = 0x49484156454F5054          # "IHAVEOPT"
REPLY_MAGIC = 0x0003E889045565A9       # option reply
REQUEST_MAGIC = 0x25609513
SIMPLE_REPLY_MAGIC = 0x67446698

FLAG_FIXED_NEWSTYLE = 1 << 0
FLAG_NO_ZEROES = 1 << 1

OPT_EXPORT_NAME = 1
OPT_ABORT = 2
OPT_LIST = 3
OPT_STARTTLS = 5
OPT_INFO = 6
OPT_GO = 7
OPT_STRUCTURED_REPLY = 8

REP_ACK = 1
REP_SERVER = 2
REP_INFO = 3
REP_ERR_UNSUP = (1 << 31) + 1
REP_ERR_POLICY = (1 << 31) + 2
REP_ERR_INVALID = (1 << 31) + 3
REP_ERR_TLS_REQD = (1 << 31) + 5
REP_ERR_UNKNOWN = (1 << 31) + 6
REP_ERR_SHUTDOWN = (1 << 31) + 7

INFO_EXPORT = 0
INFO_NAME = 1
INFO_DESCRIPTION = 2
INFO_BLOCK_SIZE = 3

TF_HAS_FLAGS = 1 << 0
TF_READ_ONLY = 1 << 1
TF_SEND_FLUSH = 1 << 2
TF_SEND_FUA = 1 << 3
TF_SEND_TRIM = 1 << 5
TF_SEND_WRITE_ZEROES = 1 << 6
TF_CAN_MULTI_CONN = 1 << 8

CMD_READ = 0
CMD_WRITE = 1
CMD_DISC = 2
CMD_FLUSH = 3
CMD_TRIM = 4
CMD_WRITE_ZEROES = 6

CMD_FLAG_FUA = 1 << 0
CMD_FLAG_NO_HOLE = 1 << 1

# errors as NBD numbers them (Linux values)
E_PERM, E_IO, E_NOMEM, E_INVAL, E_NOSPC, E_OVERFLOW, E_NOTSUP, E_SHUTDOWN = \
    1, 5, 12, 22, 28, 75, 95, 108

MAX_REQUEST = 32 << 20                  # largest READ/WRITE payload accepted
#: a connection's own buffer: requests up to this size use it, larger ones
#: draw on the server's shared budget (:class:`BufferPool`)
KEEP = 64 << 10
#: a connection's receive buffer: one recv takes up to this much of what the
#: client sent (a batch of requests; at least one whole request of KEEP bytes)
RECV_BUFFER = KEEP + 4096
#: replies held back for one send at most (bytes): many reads in one batch
#: go out in sends of about this size
REPLY_LIMIT = 4 * KEEP
#: seconds a batch waits for the server's turn before it goes on without it
TURN_WAIT = 0.1
#: request batches carried out at once while a session takes turns (:class:`Turn`)
TURN_BATCHES = 2
#: default budget of the shared request buffers, all connections together
BUFFER_BUDGET = 256 << 20
PREFERRED_BLOCK = 4096
ZERO_CHUNK = MAX_REQUEST               # WRITE_ZEROES up to this size is one write

#: accept() errors that end one connection, not the server
_ACCEPT_TRANSIENT = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM,
                               errno.ECONNABORTED, errno.EPROTO, errno.EPERM})

_REQ = struct.Struct(">IHHQQI")
_REPLY = struct.Struct(">IIQ")
_OPT_HDR = struct.Struct(">QII")
_OPT_REPLY = struct.Struct(">QIII")


#: the requests counted per export (:class:`RequestCounters`), by op index
OPS = ("read", "write", "flush", "write_zeroes")
#: upper bounds (seconds) of the request-latency histogram's buckets (+Inf after)
LATENCY_BUCKETS: tuple[float, ...] = _core.NBD_LATENCY_BUCKETS
_READ, _WRITE, _FLUSH, _ZEROES = range(4)


class RequestCounters(_core.RequestTally):
    """Requests of one connection (or, summed, of an export): per op
    (:data:`OPS`), how many were answered, how many with an error, the
    bytes of those answered without, and their latency (from the request's
    header in to its reply out) as a histogram over
    :data:`LATENCY_BUCKETS` and a sum (lists, read as ``requests``,
    ``errors``, ``bytes``, ``buckets``, ``seconds``).

    The counts live in C arrays (:class:`fastfc._core.RequestTally`), where
    the batches the core carries out (:func:`fastfc._core.nbd_batch`) note
    theirs too. A connection's counters are written by its thread alone
    (no lock, nothing allocated); a reader (a metrics scrape) sees values a
    moment old, never a torn one."""

    __slots__ = ()

    def __repr__(self) -> str:
        requests, nbytes = self.requests, self.bytes
        return "RequestCounters(" + ", ".join(
            f"{op}={requests[i]}/{nbytes[i]}B" for i, op in enumerate(OPS)) + ")"


def error_number(e: BaseException) -> int:
    """The NBD error a failed volume call is answered with."""
    if isinstance(e, WriteInhibitedError):
        return E_PERM
    if isinstance(e, VolumeClosedError):
        return E_SHUTDOWN
    if isinstance(e, NoSpaceError):
        return E_NOSPC
    if isinstance(e, IndexError):
        return E_INVAL
    if isinstance(e, MemoryError):
        return E_NOMEM
    return E_IO      # InvalidImageError and anything else the volume refuses


def sync_volume(vol: Volume) -> None:
    """Make what was written to ``vol`` durable, in the order the unit's own
    flush keeps (:meth:`StorageUnit.flush`): FlashCopy targets first (the
    old tracks copy-on-write saved), then the bitmaps of the relationships
    and pair the volume takes part in, then the volume itself if it is no
    target. Only this volume's neighbourhood, not the whole unit."""
    rels = list(vol.source_relationships)
    tgt = vol.target_relationship
    targets = [fc.target for fc in rels]
    if tgt is not None:
        targets.append(vol)
    for t in targets:
        t.flush()
    maps: list[Any] = []
    for fc in rels + ([tgt] if tgt is not None else []):
        maps += [fc.to_copy, fc.src_changed, fc.tgt_changed]
    pair = vol.mirror
    if pair is not None:
        maps += [getattr(pair, "oos", None), getattr(pair, "spare", None),
                 getattr(pair, "cg", None)]
    for bm in maps:
        flush = getattr(bm, "flush", None)
        if flush is not None:
            flush()
    if tgt is None:
        vol.flush()


@dataclass
class Export:
    """What a lookup gives the server for one export name."""
    volume: Volume
    read_only: bool
    description: str = ""


Lookup = Callable[[str], "Export | None"]


@dataclass
class Negotiated:
    """What a connection's client negotiated beside its export: structured
    replies, and the metadata contexts it selected (by id) for
    ``NBD_CMD_BLOCK_STATUS``; ``unselected`` names those it asked for that
    the export does not offer (for the error a BLOCK_STATUS then gets)."""
    structured: bool = False
    contexts: tuple[tuple[int, "nbd_status.Context"], ...] = ()
    unselected: tuple[str, ...] = ()


class ProtocolError(Exception):
    """The client broke the protocol: the connection is dropped."""


def _recv_exact(sock: socket.socket, view: memoryview) -> bool:
    """Fill ``view`` from ``sock``; False on a clean end of stream before
    the first byte, ProtocolError on one in the middle."""
    n = len(view)
    got = 0
    flags = 0 if isinstance(sock, ssl.SSLSocket) else socket.MSG_WAITALL
    while got < n:
        k = sock.recv_into(view[got:], n - got, flags)
        if k == 0:
            if got == 0:
                return False
            raise ProtocolError("the client closed the connection mid-message")
        got += k
    return True


def _recv_bytes(sock: socket.socket, n: int) -> bytes:
    buf = bytearray(n)
    if n and not _recv_exact(sock, memoryview(buf)):
        raise ProtocolError("the client closed the connection")
    return bytes(buf)


class BufferPool:
    """Request buffers larger than :data:`KEEP`, shared by every connection
    within a budget of ``budget`` bytes (buffers lent plus buffers kept for
    reuse; at most a quarter of it is kept while no request runs). Each is
    an anonymous private mapping of a power-of-two size: a buffer dropped
    from the pool goes back to the system at once (munmap), whatever the
    allocator would keep. ``_cond`` guards everything.
    """

    def __init__(self, budget: int) -> None:
        if budget < MAX_REQUEST:
            raise ValueError(f"a buffer budget of {budget} bytes is less than one request "
                             f"of the largest size ({MAX_REQUEST} bytes)")
        self.budget = budget
        self._cond = threading.Condition()
        self._lent = 0
        self._kept: list[mmap.mmap] = []
        self._closed = False

    def __repr__(self) -> str:
        return (f"BufferPool(budget={self.budget}, lent={self._lent}, "
                f"kept={sum(len(b) for b in self._kept)})")

    @staticmethod
    def size_for(n: int) -> int:
        return max(KEEP * 2, 1 << (n - 1).bit_length())

    def take(self, n: int, timeout: float) -> "mmap.mmap | None":
        """A buffer of at least ``n`` bytes, or None when the budget stays
        spent for ``timeout`` seconds (or the pool is closed)."""
        size = self.size_for(n)
        deadline = time.monotonic() + timeout
        with self._cond:
            while self._lent + size > self.budget:
                left = deadline - time.monotonic()
                if self._closed or left <= 0:
                    return None
                self._cond.wait(left)
            if self._closed:
                return None
            self._lent += size
            for i, b in enumerate(self._kept):
                if len(b) == size:
                    return self._kept.pop(i)
            # make room: drop kept buffers of other sizes, largest first
            self._kept.sort(key=len)
            while self._kept and self._lent + sum(len(b) for b in self._kept) > self.budget:
                _unmap(self._kept.pop())
        try:
            return mmap.mmap(-1, size, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
        except BaseException:
            with self._cond:
                self._lent -= size
                self._cond.notify_all()
            raise

    def give(self, buf: "mmap.mmap") -> None:
        """Give back a buffer :meth:`take` lent (no view of it left)."""
        with self._cond:
            self._lent -= len(buf)
            if self._closed:
                _unmap(buf)
            else:
                self._kept.append(buf)
                # idle, the pool keeps at most a quarter of the budget
                while sum(len(b) for b in self._kept) > self.budget // 4:
                    self._kept.sort(key=len)
                    _unmap(self._kept.pop())
            self._cond.notify_all()

    def close(self) -> None:
        """Wake every waiter (it gets None) and free the kept buffers."""
        with self._cond:
            self._closed = True
            kept, self._kept = self._kept, []
            self._cond.notify_all()
        for b in kept:
            _unmap(b)


def _unmap(buf: "mmap.mmap") -> None:
    """Free a pool buffer now, or, if a view of it lives on (a traceback
    holding a frame), when the last view goes."""
    try:
        buf.close()
    except BufferError:
        pass


class Turn:
    """Whose turn it is to carry out work in the server: places handed
    over in the order they were asked for. While :attr:`active` (a Global
    Mirror session takes turns; the connections take none otherwise), the
    NBD connections each take a place around the small requests of a batch
    (:class:`NBDServer`, ``turn``), at most :attr:`batches` at once, and
    ``fastfc serve``'s session takes every place around each CG attempt
    (``alone``; :class:`~fastfc.tools.cli.loops.SessionTurn`).

    A couple of request threads work at a time then (they would serialise
    on the GIL anyway; the second wakes while the first works), and the
    others wait on the turn without the GIL instead of competing with the
    session's loop for the GIL and the CPU: an attempt waits for the
    batches asked for before it, one per connection at most, and a batch
    for at most one attempt. Without turns, a session loop spent 70% of its
    slowest attempts runnable, waiting for a CPU, behind 16 request
    threads. A plain lock would not do: its release wakes a waiter, and the
    request threads, many and quick to come back, take it again ahead of
    the woken one; :meth:`release` hands the places to the longest waiting
    instead, who has them without taking anything more.

    The runs of small requests the core carries out (:func:`fastfc._core.nbd_batch`)
    take it the same way: they hold the GIL while they run (the volume path
    they share with every host raises Python exceptions and calls Python
    hooks), so a connection working competes with the loop as before, only
    for less time per request."""

    def __init__(self, batches: int | None = None) -> None:
        #: how many batches may be carried out at once (a CG attempt takes
        #: every place): the next batch's thread wakes while one runs
        self.batches = TURN_BATCHES if batches is None else batches
        self._mutex = threading.Lock()
        self._free = self.batches
        self._waiting: collections.deque[list] = collections.deque()   # [lock, places], in order
        #: how many sessions take turns now: the connections take it only then
        self.active = 0

    def __repr__(self) -> str:
        return (f"<Turn {self.batches - self._free} of {self.batches} place(s) taken, "
                f"{len(self._waiting)} waiting, {self.active} session(s)>")

    def locked(self) -> bool:
        """Whether any place is taken."""
        return self._free < self.batches

    def acquire(self, blocking: bool = True, timeout: float = -1, *,
                alone: bool = False) -> bool:
        """Take a place (``alone``: every place, as a CG attempt does)
        after whoever asked before; False if not had within ``timeout``
        seconds (-1: no limit)."""
        places = self.batches if alone else 1
        with self._mutex:
            if not self._waiting and self._free >= places:
                self._free -= places
                return True
            if not blocking:
                return False
            mine = threading.Lock()
            mine.acquire()
            entry = [mine, places]
            self._waiting.append(entry)
        if mine.acquire(timeout=timeout):
            return True                  # handed over: taken for us
        with self._mutex:
            try:
                self._waiting.remove(entry)
            except ValueError:
                pass                     # handed over as we gave up: ours after all
            else:
                self._hand_over()        # (those behind may fit now)
                return False
        mine.acquire()
        return True

    def release(self, *, alone: bool = False) -> bool:
        """Give back a place (``alone``: every place) to the longest
        waiting; True if someone waited for it."""
        with self._mutex:
            places = self.batches if alone else 1
            if self._free + places > self.batches:
                raise RuntimeError("release of a turn not held")
            self._free += places
            waited = bool(self._waiting)
            self._hand_over()
            return waited

    def _hand_over(self) -> None:
        """Give the free places to the waiting, in order, while the first fits."""
        while self._waiting and self._waiting[0][1] <= self._free:
            lock, places = self._waiting.popleft()
            self._free -= places
            lock.release()

    def __enter__(self) -> "Turn":
        self.acquire()
        return self

    def __exit__(self, *exc) -> None:
        self.release()


def _listen_unix_at(path: str) -> socket.socket:
    """A socket listening at ``path``, mode 0600 from the moment it exists,
    that a client finds listening as soon as it sees the name: bound and
    listening in a private directory beside ``path``, then renamed there
    (bound at ``path`` itself only when the longer private name does not fit
    in a socket address). A client that connected between a bind and the
    listen at ``path`` was refused."""
    private = tempfile.mkdtemp(prefix=".nbd-", dir=os.path.dirname(path) or ".")
    tmp = os.path.join(private, "s")
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        old = os.umask(0o177)          # 0600 from the moment it exists
        try:
            try:
                s.bind(tmp)
                where = tmp
            except OSError:
                if len(os.fsencode(tmp)) < 108:
                    raise
                s.bind(path)           # (too long a name for the private one)
                where = path
        finally:
            os.umask(old)
        s.listen(64)
        if where != path:
            os.rename(tmp, path)
        return s
    except BaseException:
        s.close()
        raise
    finally:
        try:
            os.unlink(tmp)             # (gone once renamed)
        except OSError:
            pass
        os.rmdir(private)


class NBDServer:
    """Serve volumes over NBD on unix and TCP sockets.

    Parameters
    ----------
    lookup : callable
        ``lookup(name) -> Export | None``: the export of that name now
        (called under ``lock``).
    names : callable
        ``names() -> list of (name, description)`` for ``NBD_OPT_LIST``
        (called under ``lock``).
    lock : threading.RLock, or any lock with ``acquire(timeout=)`` and ``release()``
        Serialises the server's lookups against whatever else changes the
        units (the command line: ``fastfc serve`` hands the shared side of
        its readers-writer command lock); a lookup waits at most
        :attr:`lookup_wait` for it.
    tls : ssl.SSLContext, optional
        Offer ``NBD_OPT_STARTTLS`` and require it before any export.
    max_connections : int
        Connections open at once; one more is closed as soon as accepted
        (each holds a thread and a 64 KiB buffer).
    handshake_timeout : float
        Seconds from accept by which a connection must have finished the
        handshake (TLS included), however it trickles its bytes: a deadline,
        not an idle timeout. Past it the connection is dropped.
    buffer_budget : int
        Bytes of request buffers over 64 KiB, all connections together
        (:class:`BufferPool`); at least 32 MiB (one largest request).
    buffer_wait : float
        Seconds a request waits for the budget before it is answered
        ``ENOMEM``.
    turn : Turn, optional
        While its ``active`` count is not 0, a connection takes it around
        the small reads and writes of each batch (released before the
        replies go out, and around anything that may wait long: FLUSH, FUA,
        zeroes, requests over :data:`KEEP`), waiting for it at most
        :attr:`turn_wait` seconds (then going on without it). ``fastfc
        serve`` shares it with its Global Mirror sessions. None: no turns.
    """

    #: whether the small READs and WRITEs of a batch are carried out in the
    #: core, one C call for a run of them (:func:`fastfc._core.nbd_batch`);
    #: False (on a server, or on the class before a server starts): each in
    #: this module's loop (the same replies, bytes and counts: the tests and
    #: benchmarks compare the two)
    core_batches = True

    def __init__(self, lookup: Lookup, names: Callable[[], list[tuple[str, str]]],
                 lock: "LookupLock", *, tls: ssl.SSLContext | None = None,
                 max_connections: int = 1024, handshake_timeout: float = 30.0,
                 buffer_budget: int = BUFFER_BUDGET, buffer_wait: float = 10.0,
                 turn: Any = None) -> None:
        self.lookup = lookup
        self.names = names
        self.lock = lock
        self.tls = tls
        self._listeners: list[socket.socket] = []
        self._threads: list[threading.Thread] = []
        self._conns: dict[int, socket.socket] = {}
        self._conns_lock = threading.Lock()
        self._stopping = threading.Event()
        # given back to take (and close) a client when out of descriptors
        self._spare_fd = os.open(os.devnull, os.O_RDONLY | os.O_CLOEXEC)
        #: connections beyond this many are closed at once (each holds a thread)
        self.max_connections = max_connections
        #: seconds a client may take over the handshake (TLS included)
        self.handshake_timeout = handshake_timeout
        #: connection key -> the monotonic time its handshake must end by
        self._handshakes: dict[int, float] = {}
        #: the request buffers over KEEP bytes, shared by every connection
        self.buffers = BufferPool(buffer_budget)
        #: seconds a request waits for :attr:`buffers` before ENOMEM
        self.buffer_wait = buffer_wait
        #: seconds an export lookup waits for ``lock`` before looking without it
        self.lookup_wait = 1.0
        #: the lock a connection holds while it carries out a batch's small
        #: requests (None: none); see the ``turn`` parameter
        self.turn = turn
        #: seconds a batch waits for :attr:`turn` before it goes on without it
        self.turn_wait = TURN_WAIT
        # request counters (:meth:`counters`): each open connection's, with
        # its export's name, and those of closed connections summed by export
        # (both under _conns_lock)
        self._live_counters: dict[int, tuple[str, RequestCounters]] = {}
        self._done_counters: dict[str, RequestCounters] = {}

    # -- listening -------------------------------------------------------------
    def listen_unix(self, path: str) -> None:
        if os.path.exists(path):
            import stat
            if not stat.S_ISSOCK(os.lstat(path).st_mode):
                raise FileExistsError(f"{path} exists and is not a socket: not replacing it")
            probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                probe.connect(path)
            except OSError:
                os.unlink(path)      # a stale socket of a server that died
            else:
                raise OSError(errno.EADDRINUSE, f"{path}: another server is listening there")
            finally:
                probe.close()
        self._listeners.append(_listen_unix_at(path))
        self._unix_path = path

    def listen_tcp(self, bind: str, port: int) -> int:
        infos = socket.getaddrinfo(bind, port, type=socket.SOCK_STREAM)
        family, _, _, _, addr = infos[0]
        s = socket.socket(family, socket.SOCK_STREAM)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind(addr)
        s.listen(64)
        self._listeners.append(s)
        return int(s.getsockname()[1])

    def start(self) -> None:
        for s in self._listeners:
            s.settimeout(0.2)
            t = threading.Thread(target=self._accept_loop, args=(s,), daemon=True,
                                 name=f"nbd-accept-{s.fileno()}")
            t.start()
            self._threads.append(t)

    def stop(self, grace: float = 10.0) -> None:
        """Stop accepting, let every connection finish the request it is
        carrying out (its reply is sent), then close them all. A connection
        still sending after ``grace`` seconds (its client reads nothing) is
        cut off."""
        self._stopping.set()
        self.buffers.close()          # a request waiting for a buffer: ENOMEM now
        for t in list(self._threads):
            if t.name.startswith("nbd-accept"):
                t.join()
        for s in self._listeners:
            s.close()
        path = getattr(self, "_unix_path", None)
        if path is not None:
            try:
                os.unlink(path)
            except OSError:
                pass
        with self._conns_lock:
            conns = list(self._conns.values())
        for c in conns:
            try:
                # the next recv ends; a reply still goes out. The plain
                # socket's shutdown, not SSLSocket's: that one drops the TLS
                # state, and the replies after it went out in clear text
                socket.socket.shutdown(c, socket.SHUT_RD)
            except OSError:
                pass
        deadline = time.monotonic() + grace
        for t in list(self._threads):
            t.join(max(0.0, deadline - time.monotonic()))
        with self._conns_lock:
            stuck = list(self._conns.values())
        for c in stuck:       # a client that reads no replies: cut it off
            try:
                socket.socket.shutdown(c, socket.SHUT_RDWR)
            except OSError:
                pass
        for t in list(self._threads):
            t.join()
        with self._conns_lock:
            spare, self._spare_fd = self._spare_fd, -1
        if spare >= 0:
            os.close(spare)

    def _accept_loop(self, listener: socket.socket) -> None:
        while not self._stopping.is_set():
            self._end_late_handshakes()
            try:
                conn, _ = listener.accept()
            except socket.timeout:
                continue
            except OSError as e:
                if self._stopping.is_set():
                    return
                if e.errno in _ACCEPT_TRANSIENT:
                    # out of descriptors or memory, or a client that gave up
                    # while queued: refuse this one, keep serving the others
                    log.warning("accept failed, still listening: %s", e)
                    if e.errno in (errno.EMFILE, errno.ENFILE):
                        self._refuse_one(listener)
                    else:
                        self._stopping.wait(0.05)
                    continue
                raise
            with self._conns_lock:
                full = len(self._conns) >= self.max_connections
            if full:
                log.warning("%d connections open: refusing another", self.max_connections)
                conn.close()
                continue
            conn.settimeout(self.handshake_timeout)    # until the export is chosen
            if conn.family in (socket.AF_INET, socket.AF_INET6):
                conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            t = threading.Thread(target=self._connection, args=(conn,), daemon=True,
                                 name="nbd-conn")
            with self._conns_lock:
                if self._stopping.is_set():
                    conn.close()
                    return
                self._conns[id(conn)] = conn
                self._handshakes[id(conn)] = time.monotonic() + self.handshake_timeout
                self._threads = [x for x in self._threads if x.is_alive()]
                self._threads.append(t)
            t.start()

    def _end_late_handshakes(self) -> None:
        """Cut off every connection still in its handshake past its deadline
        (each accepting thread looks, at least every 0.2 s): its next recv
        ends, and the connection with it."""
        now = time.monotonic()
        with self._conns_lock:
            late = [k for k, t in self._handshakes.items() if t <= now]
            for k in late:
                del self._handshakes[k]
                c = self._conns.get(k)
                if c is None:
                    continue
                log.info("handshake not done in %g s: dropping the connection",
                         self.handshake_timeout)
                try:
                    socket.socket.shutdown(c, socket.SHUT_RDWR)
                except OSError:
                    pass

    def _refuse_one(self, listener: socket.socket) -> None:
        """Out of descriptors: the queued client would wait for ever (accept
        failing leaves it queued). Give back the spare descriptor kept for
        this, take the client and close it at once, keep a spare again."""
        with self._conns_lock:
            spare, self._spare_fd = self._spare_fd, -1
        if spare >= 0:
            os.close(spare)
            try:
                conn, _ = listener.accept()
                conn.close()
            except OSError:
                pass
            try:
                self._spare_fd = os.open(os.devnull, os.O_RDONLY | os.O_CLOEXEC)
            except OSError:
                pass
        self._stopping.wait(0.05)

    # -- one connection ---------------------------------------------------------
    def _connection(self, conn: socket.socket) -> None:
        key = id(conn)
        who = _peer(conn)
        started = time.monotonic()
        log.info("NBD connection from %s", who)
        try:
            sock, export, negotiated = self._negotiate(conn, key)
            with self._conns_lock:
                if self._handshakes.pop(key, None) is None:
                    # its deadline passed as the handshake ended: already cut off
                    raise ProtocolError("the handshake took longer than "
                                        f"{self.handshake_timeout} s")
            if export is not None and not self._stopping.is_set():
                log.info("NBD connection from %s: export %s", who,
                         getattr(getattr(export, "volume", None), "name", "?"))
                sock.settimeout(None)      # transmission: a client may idle
                counters = RequestCounters()
                with self._conns_lock:
                    self._live_counters[key] = (export.volume.name, counters)
                self._transmit(sock, export, counters, negotiated)
        except (ProtocolError, ConnectionError, ssl.SSLError) as e:
            log.info("NBD connection from %s dropped: %s", who, e)
        except OSError as e:
            log.info("NBD connection from %s ended: %s", who, e)
        except Exception:
            log.exception("NBD connection from %s dropped by a server error", who)
        finally:
            log.info("NBD connection from %s closed after %.3f s", who,
                     time.monotonic() - started)
            with self._conns_lock:
                current = self._conns.pop(key, conn)
                self._handshakes.pop(key, None)
                done = self._live_counters.pop(key, None)
                if done is not None:
                    self._done_counters.setdefault(done[0], RequestCounters()).merge(done[1])
            for s in {id(current): current, id(conn): conn}.values():
                try:
                    s.close()
                except OSError:
                    pass

    def _negotiate(self, sock: Any, key: int) -> tuple[Any, Export | None, Negotiated]:
        sock.sendall(struct.pack(">QQH", NBDMAGIC, IHAVEOPT,
                                 FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES))
        (cflags,) = struct.unpack(">I", _recv_bytes(sock, 4))
        if cflags & ~(FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES):
            raise ProtocolError(f"unknown client flags {cflags:#x}")
        no_zeroes = bool(cflags & FLAG_NO_ZEROES)
        tls_done = False
        structured = False
        # the last SET_META_CONTEXT's selection (nbd_status.meta_context_option)
        meta: nbd_status.Selection | None = None
        export_name = ""

        def negotiated(export: Export) -> Negotiated:
            """What the transmission phase keeps: the contexts selected for
            this very export (by name: a SET for another name selects none)."""
            if not structured:
                return Negotiated()
            if meta is None or meta[0] != export_name:
                return Negotiated(True)
            have = self._looked_up(lambda: nbd_status.contexts_of(export.volume))
            return Negotiated(True, tuple((i, have[n]) for i, n in meta[1] if n in have),
                              tuple(meta[2]))
        while True:
            magic, opt, length = _OPT_HDR.unpack(_recv_bytes(sock, 16))
            if magic != IHAVEOPT:
                raise ProtocolError(f"bad option magic {magic:#x}")
            if length > 65536 * 4:
                raise ProtocolError(f"option {opt} with {length} bytes of data")
            data = _recv_bytes(sock, length)

            def reply(rtype: int, payload: bytes = b"") -> None:
                sock.sendall(_OPT_REPLY.pack(REPLY_MAGIC, opt, rtype, len(payload)) + payload)

            if opt == OPT_STARTTLS:
                if self.tls is None or tls_done:
                    reply(REP_ERR_UNSUP if self.tls is None else REP_ERR_INVALID)
                    continue
                if length:
                    reply(REP_ERR_INVALID)
                    continue
                reply(REP_ACK)
                sock = self.tls.wrap_socket(sock, server_side=True)
                with self._conns_lock:       # stop() shuts the socket now in use
                    self._conns[key] = sock
                tls_done = True
                structured, meta = False, None   # (proto.md: nothing kept across it)
                continue
            if self.tls is not None and not tls_done and opt != OPT_ABORT:
                if opt == OPT_EXPORT_NAME:
                    raise ProtocolError("EXPORT_NAME before STARTTLS on a TLS server")
                reply(REP_ERR_TLS_REQD, b"this server requires TLS (NBD_OPT_STARTTLS)")
                continue
            if opt == OPT_ABORT:
                try:
                    reply(REP_ACK)
                except OSError:
                    pass
                return sock, None, Negotiated()
            if opt == OPT_LIST:
                if length:
                    reply(REP_ERR_INVALID)
                    continue
                names = self._looked_up(self.names)
                for name, desc in names:
                    n = name.encode()
                    reply(REP_SERVER, struct.pack(">I", len(n)) + n + desc.encode())
                reply(REP_ACK)
                continue
            if opt == OPT_STRUCTURED_REPLY:
                if length:
                    reply(REP_ERR_INVALID, b"NBD_OPT_STRUCTURED_REPLY takes no data")
                    continue
                structured = True
                reply(REP_ACK)
                continue
            if opt in (OPT_LIST_META_CONTEXT, OPT_SET_META_CONTEXT):
                replies, selection = nbd_status.meta_context_option(
                    opt, data, structured, self._find, self._looked_up)
                for rtype, payload in replies:
                    reply(rtype, payload)
                if opt == OPT_SET_META_CONTEXT:
                    meta = selection      # (proto.md: replaced, even when it fails)
                continue
            if opt == OPT_EXPORT_NAME:
                export_name = data.decode("utf-8", "replace")
                export = self._find(export_name)
                if export is None:
                    raise ProtocolError(f"unknown export {data!r} (EXPORT_NAME)")
                sock.sendall(struct.pack(">QH", export.volume.capacity, self._tflags(export))
                             + (b"" if no_zeroes else bytes(124)))
                return sock, export, negotiated(export)
            if opt in (OPT_INFO, OPT_GO):
                if length < 6:
                    reply(REP_ERR_INVALID)
                    continue
                (nlen,) = struct.unpack_from(">I", data, 0)
                if 4 + nlen + 2 > length:
                    reply(REP_ERR_INVALID)
                    continue
                name = data[4:4 + nlen].decode("utf-8", "replace")
                (nreq,) = struct.unpack_from(">H", data, 4 + nlen)
                if 4 + nlen + 2 + 2 * nreq != length:
                    reply(REP_ERR_INVALID)
                    continue
                export = self._find(name)
                if export is None:
                    reply(REP_ERR_UNKNOWN, f"no export (volume) named {name!r}".encode())
                    continue
                reqs = struct.unpack_from(f">{nreq}H", data, 4 + nlen + 2)
                if INFO_NAME in reqs:
                    reply(REP_INFO, struct.pack(">H", INFO_NAME) + name.encode())
                if INFO_DESCRIPTION in reqs and export.description:
                    reply(REP_INFO, struct.pack(">H", INFO_DESCRIPTION)
                          + export.description.encode())
                reply(REP_INFO, struct.pack(">HIII", INFO_BLOCK_SIZE, 1, PREFERRED_BLOCK,
                                            MAX_REQUEST))
                reply(REP_INFO, struct.pack(">HQH", INFO_EXPORT, export.volume.capacity,
                                            self._tflags(export)))
                reply(REP_ACK)
                if opt == OPT_GO:
                    export_name = name
                    return sock, export, negotiated(export)
                continue
            reply(REP_ERR_UNSUP)       # EXTENDED_HEADERS (nbd_status), ...

    def counters(self) -> dict[str, RequestCounters]:
        """Every export's requests since the server started, by export
        name: its closed connections' and its open ones' (a moment old)."""
        with self._conns_lock:
            out: dict[str, RequestCounters] = {}
            for name, c in list(self._done_counters.items()) + list(
                    self._live_counters.values()):
                out.setdefault(name, RequestCounters()).merge(c)
        return out

    def _find(self, name: str) -> Export | None:
        if self._stopping.is_set():
            return None
        return self._looked_up(lambda: self.lookup(name))

    def _looked_up(self, look: Callable[[], Any]) -> Any:
        """``look()`` under ``lock``, or, when a command has held it longer
        than :attr:`lookup_wait` (a long changing command), without it: a
        lookup only reads the units (retried if a dict changed under it),
        and what it finds is safe to use either way (a volume closed since
        answers ESHUTDOWN; write refusals are the volume's own)."""
        if self.lock.acquire(timeout=self.lookup_wait):
            try:
                return look()
            finally:
                self.lock.release()
        for attempt in range(100):
            try:
                return look()
            except RuntimeError:        # changed size during iteration
                if attempt == 99:
                    raise
                time.sleep(0.001)

    @staticmethod
    def _tflags(export: Export) -> int:
        f = TF_HAS_FLAGS | TF_SEND_FLUSH | TF_SEND_FUA | TF_CAN_MULTI_CONN
        if export.read_only:
            f |= TF_READ_ONLY
        else:
            f |= TF_SEND_WRITE_ZEROES
        return f

    def _transmit(self, sock: Any, export: Export, counters: RequestCounters,
                  negotiated: Negotiated | None = None) -> None:
        """Requests in, replies out, in order, each counted in ``counters``
        as it is answered (READ and BLOCK_STATUS in structured replies
        when ``negotiated`` says so; the others in simple replies, which
        proto.md allows for replies without data).

        In batches: one ``recv`` takes whatever the client has sent (up to
        :data:`RECV_BUFFER` bytes), every whole request in it is carried
        out, and their replies go out together in one send before the
        connection next waits for its client (a request cut short, a large
        request, or the end of the batch). A client with many requests in
        flight then costs the server a few socket calls (each a hand-over of
        the GIL) per batch rather than four per request.

        A run of small READs and WRITEs is carried out by one call of
        :func:`fastfc._core.nbd_batch` (unless :attr:`core_batches` is off
        or a volume's I/O methods are replaced): it stops at the first
        request it does not take, which this loop carries out as before,
        before the first one it takes while the turn is still to be asked
        for (asked here, the request's latency counting from then), once
        the replies reach :data:`REPLY_LIMIT`, and at a request the volume
        refused (answered here from the exception, as before)."""
        vol = export.volume
        note = counters.add
        clock = time.perf_counter
        read_only = export.read_only
        rbuf = bytearray(RECV_BUFFER)         # requests as they come in
        rview = memoryview(rbuf)
        room = len(rbuf)
        own = memoryview(bytearray(KEEP))     # this connection's: reads up to KEEP
        out = bytearray()                     # the replies of the batch so far
        answered: list[tuple[int, int, int, float]] = []   # theirs: op, bytes, error, t0
        unpack = _REQ.unpack_from
        pack = _REPLY.pack
        capacity = vol.capacity
        neg = negotiated if negotiated is not None else Negotiated()
        structured = neg.structured
        data_header = nbd_status.data_header
        error_chunk = nbd_status.error_chunk
        hsize = _REQ.size
        start = end = 0                       # rbuf[start:end]: received, not carried out
        turns = self.turn                     # taken while turns.active
        wait = self.turn_wait
        held = tried = False                  # the turn: held now; waited for in this batch

        def give_turn() -> None:
            nonlocal held, tried
            if held:
                held = tried = False
                turns.release()

        def send_replies() -> None:
            give_turn()
            sock.sendall(out)
            now = clock()
            for op, n, err, t in answered:
                note(op, n, err, now - t)
            counters.settle(now)               # (those the core carried out)
            out.clear()
            answered.clear()

        batch = _core.nbd_batch
        asked_at = -1.0                       # when the turn was asked for the core's next
        declined = False                      # the core handed back the request at start
        try:
            while True:
                # the core carries out the small requests unless a volume's
                # I/O methods are replaced (a test's or a fault's hook)
                fast = self.core_batches and isinstance(vol, _core.VolumeBase) and \
                    _plain_io(vol)
                while end - start >= hsize:
                    if fast and not declined:
                        start, why, failed = batch(
                            vol, rbuf, start, end, out, counters, structured, read_only,
                            not tried and turns is not None and turns.active, asked_at,
                            KEEP, REPLY_LIMIT)
                        asked_at = -1.0
                        if why == _core.NBD_DECLINED:
                            declined = True        # (the next one is this loop's)
                        elif why == _core.NBD_TURN:
                            asked_at = clock()
                            held = turns.acquire(timeout=wait)
                            tried = True
                        elif why == _core.NBD_FULL:
                            send_replies()         # (many reads in one batch)
                        elif failed is not None:   # NBD_FAILED: the volume refused it
                            e, op, handle, length, t0 = failed
                            err = error_number(e)
                            if op == _READ and structured:
                                out += error_chunk(handle, err, f"read: {e}")
                            else:
                                out += pack(SIMPLE_REPLY_MAGIC, err, handle)
                            answered.append((op, length, err, t0))
                        continue
                    declined = False
                    magic, flags, cmd, handle, offset, length = unpack(rbuf, start)
                    if magic != REQUEST_MAGIC:
                        raise ProtocolError(f"bad request magic {magic:#x}")
                    t0 = clock()
                    if cmd == CMD_WRITE:
                        if length > MAX_REQUEST:
                            raise ProtocolError(f"a write of {length} bytes (limit {MAX_REQUEST})")
                        if length > KEEP:          # its own buffer, from the shared budget
                            give_turn()
                            if out:
                                send_replies()
                            start = self._large_write(sock, export, rview, start + hsize, end,
                                                      flags, handle, offset, length, counters,
                                                      t0)
                            continue
                        if end - start < hsize + length:
                            break                  # the rest of its data is still to come
                        if flags & CMD_FLAG_FUA:
                            give_turn()            # (it syncs: no turn held meanwhile)
                        elif not tried and turns is not None and turns.active:
                            held = turns.acquire(timeout=wait)
                            tried = True
                        data = rview[start + hsize:start + hsize + length]
                        start += hsize + length
                        err = self._write(vol, data, flags, offset, read_only, capacity)
                        out += pack(SIMPLE_REPLY_MAGIC, err, handle)
                        answered.append((_WRITE, length, err, t0))
                        continue
                    start += hsize
                    if cmd == CMD_READ:
                        if length > MAX_REQUEST or offset + length > capacity or \
                                flags & ~CMD_FLAG_FUA:
                            if structured:
                                out += error_chunk(handle, E_INVAL, _bad_read(
                                    offset, length, flags, capacity))
                            else:
                                out += pack(SIMPLE_REPLY_MAGIC, E_INVAL, handle)
                            answered.append((_READ, length, E_INVAL, t0))
                        elif structured and length == 0:    # (a data chunk has >= 1 byte)
                            out += nbd_status.none_chunk(handle)
                            answered.append((_READ, 0, 0, t0))
                        elif length <= KEEP:
                            if not tried and turns is not None and turns.active:
                                held = turns.acquire(timeout=wait)
                                tried = True
                            data = own[:length]
                            try:
                                vol.readinto(offset, data)
                            except Exception as e:
                                err = error_number(e)
                                if structured:
                                    out += error_chunk(handle, err, f"read: {e}")
                                else:
                                    out += pack(SIMPLE_REPLY_MAGIC, err, handle)
                                answered.append((_READ, length, err, t0))
                            else:
                                if structured:
                                    out += data_header(handle, offset, length)
                                else:
                                    out += pack(SIMPLE_REPLY_MAGIC, 0, handle)
                                out += data
                                answered.append((_READ, length, 0, t0))
                                if len(out) >= REPLY_LIMIT:
                                    send_replies()     # (many reads in one batch)
                        else:
                            give_turn()
                            if out:
                                send_replies()
                            self._large_read(sock, vol, handle, offset, length, counters, t0,
                                             structured)
                    elif cmd == CMD_FLUSH:
                        give_turn()
                        err = E_INVAL if flags & ~CMD_FLAG_FUA else 0
                        if not err:
                            try:
                                sync_volume(vol)
                            except Exception as e:
                                err = error_number(e)
                        out += pack(SIMPLE_REPLY_MAGIC, err, handle)
                        answered.append((_FLUSH, 0, err, t0))
                    elif cmd == CMD_WRITE_ZEROES:
                        give_turn()
                        err = E_PERM if read_only else 0
                        if flags & ~(CMD_FLAG_FUA | CMD_FLAG_NO_HOLE):
                            err = E_INVAL
                        elif not err and offset + length > capacity:
                            err = E_NOSPC
                        if not err:
                            try:
                                self._write_zeroes(vol, offset, length)
                                if flags & CMD_FLAG_FUA:
                                    sync_volume(vol)
                            except Exception as e:
                                err = error_number(e)
                        out += pack(SIMPLE_REPLY_MAGIC, err, handle)
                        answered.append((_ZEROES, length, err, t0))
                    elif cmd == CMD_BLOCK_STATUS and structured:
                        give_turn()            # (it takes the volumes' locks)
                        out += nbd_status.block_status(handle, vol, neg.contexts, offset,
                                                       length, flags, error_number,
                                                       neg.unselected)
                        if len(out) >= REPLY_LIMIT:
                            send_replies()
                    elif cmd == CMD_DISC:
                        return
                    else:   # TRIM, CACHE (not offered), BLOCK_STATUS (no structured replies)
                        out += pack(SIMPLE_REPLY_MAGIC, E_INVAL, handle)
                # every whole request carried out: answer them, then wait for more
                give_turn()
                tried = False
                if out:
                    send_replies()
                if start == end:
                    start = end = 0
                elif room - start < hsize + KEEP:  # keep room for a whole request
                    rbuf[:end - start] = rbuf[start:end]
                    start, end = 0, end - start
                k = sock.recv_into(rview[end:], room - end)
                declined = False
                if k == 0:
                    if end - start >= hsize:     # a small write's header, not all its data
                        raise ProtocolError("the client closed the connection mid-write")
                    if end > start:
                        raise ProtocolError("the client closed the connection mid-message")
                    return
                end += k
        finally:
            give_turn()
            if out:               # carried out before a disconnect or a protocol error
                try:
                    send_replies()
                except OSError:
                    pass

    @staticmethod
    def _write(vol: Volume, data: memoryview, flags: int, offset: int, read_only: bool,
               capacity: int) -> int:
        """Carry out one WRITE whose data is all in ``data``: its NBD error (0: none)."""
        if flags & ~CMD_FLAG_FUA:
            return E_INVAL
        if read_only:
            return E_PERM
        if offset + len(data) > capacity:
            return E_NOSPC            # proto.md: a write past the end
        try:
            vol.write(offset, data)
            if flags & CMD_FLAG_FUA:
                sync_volume(vol)
        except Exception as e:
            return error_number(e)
        return 0

    def _large_write(self, sock: Any, export: Export, rview: memoryview, at: int, end: int,
                     flags: int, handle: int, offset: int, length: int,
                     counters: RequestCounters, t0: float) -> int:
        """A WRITE of more than KEEP bytes, whose data begins at ``rview[at:end]``
        (the rest still to come): in a buffer borrowed from the budget
        (ENOMEM, its data taken and dropped, if the budget stays spent),
        answered at once. Returns where the next request begins in ``rview``
        (``end`` if this one's data went past it)."""
        here = min(end - at, length)
        with self._buffer(None, length) as data:
            if data is None:      # the budget stayed spent: take the payload, ENOMEM
                # (all of rview from ``at`` on is this request's: a scratch now)
                self._discard(sock, rview, length - here)
                sock.sendall(_REPLY.pack(SIMPLE_REPLY_MAGIC, E_NOMEM, handle))
                counters.add(_WRITE, length, E_NOMEM, time.perf_counter() - t0)
                return at + here
            data[:here] = rview[at:at + here]
            if length > here and not _recv_exact(sock, data[here:]):
                raise ProtocolError("the client closed the connection mid-write")
            err = self._write(export.volume, data, flags, offset, export.read_only,
                              export.volume.capacity)
        sock.sendall(_REPLY.pack(SIMPLE_REPLY_MAGIC, err, handle))
        counters.add(_WRITE, length, err, time.perf_counter() - t0)
        return at + here

    def _large_read(self, sock: Any, vol: Volume, handle: int, offset: int, length: int,
                    counters: RequestCounters, t0: float, structured: bool = False) -> None:
        """A READ of more than KEEP bytes (in range), in a buffer borrowed
        from the budget (ENOMEM if it stays spent), answered at once (in
        one data chunk if ``structured``)."""
        pack = _REPLY.pack

        def failed(err: int, message: str) -> None:
            if structured:
                sock.sendall(nbd_status.error_chunk(handle, err, message))
            else:
                sock.sendall(pack(SIMPLE_REPLY_MAGIC, err, handle))
            counters.add(_READ, length, err, time.perf_counter() - t0)

        with self._buffer(None, length) as data:
            if data is None:
                failed(E_NOMEM, f"no buffer for a read of {length} bytes now (the server's "
                                f"budget of {self.buffers.budget} bytes is in use)")
                return
            try:
                vol.readinto(offset, data)
            except Exception as e:
                failed(error_number(e), f"read: {e}")
                return
            if structured:
                sock.sendall(nbd_status.data_header(handle, offset, length))
            else:
                sock.sendall(pack(SIMPLE_REPLY_MAGIC, 0, handle))
            sock.sendall(data)
        counters.add(_READ, length, 0, time.perf_counter() - t0)

    @contextlib.contextmanager
    def _buffer(self, own: memoryview | None, length: int) -> Iterator[memoryview | None]:
        """``length`` bytes to carry one request in: the connection's own
        buffer (if given and large enough), or one borrowed from
        :attr:`buffers` and given back when the request is done (None: the
        budget stayed spent for :attr:`buffer_wait` seconds)."""
        if own is not None and length <= len(own):
            yield own[:length]
            return
        buf = self.buffers.take(length, self.buffer_wait)
        if buf is None:
            log.warning("no buffer for a %d-byte request within %g s (budget %d bytes): "
                        "ENOMEM", length, self.buffer_wait, self.buffers.budget)
            yield None
            return
        whole = memoryview(buf)
        data = whole[:length]
        try:
            yield data
        finally:
            for view in (data, whole):
                try:
                    view.release()
                except BufferError:      # still lent out: freed when that ends
                    pass
            self.buffers.give(buf)

    @staticmethod
    def _discard(sock: Any, own: memoryview, length: int) -> None:
        """Take (and drop) a write's payload this server cannot hold."""
        while length:
            n = min(length, len(own))
            if not _recv_exact(sock, own[:n]):
                raise ProtocolError("the client closed the connection mid-write")
            length -= n

    @staticmethod
    def _write_zeroes(vol: Volume, offset: int, length: int) -> None:
        """Zeroes through the volume's write path (copy-on-write first),
        checked whole before the first byte lands; up to 32 MiB in one write
        (longer requests in writes of that size). The zero buffer is calloc'd:
        untouched zero pages, no memory to speak of."""
        if offset < 0 or length < 0 or offset + length > vol.capacity:
            raise IndexError(f"{length} bytes at {offset} past the end")
        vol.write(offset, b"")       # refusals (inhibit, closed) before any byte
        zeros = bytes(min(length, ZERO_CHUNK))
        pos, end = offset, offset + length
        while pos < end:
            n = min(ZERO_CHUNK, end - pos)
            vol.write(pos, zeros[:n] if n < len(zeros) else zeros)
            pos += n


_PLAIN_WRITE = _core.VolumeBase.write
_PLAIN_READINTO = _core.VolumeBase.readinto


def _plain_io(vol: Volume) -> bool:
    """Whether ``vol``'s host reads and writes are the core's own (no hook
    replaced :meth:`Volume.write` or :meth:`Volume.readinto`, on its class
    or on it): then :func:`fastfc._core.nbd_batch` may carry them out."""
    cls = type(vol)
    if cls.write is not _PLAIN_WRITE or cls.readinto is not _PLAIN_READINTO:
        return False
    d = getattr(vol, "__dict__", None)
    return not d or ("write" not in d and "readinto" not in d)


def _bad_read(offset: int, length: int, flags: int, capacity: int) -> str:
    """Why a READ is refused (EINVAL), for the error chunk's message."""
    if flags & ~CMD_FLAG_FUA:
        return f"read with unknown command flags {flags:#x}"
    if length > MAX_REQUEST:
        return f"a read of {length} bytes (at most {MAX_REQUEST})"
    return f"a read of {length} bytes at {offset}: the export has {capacity} bytes"


def exports_of(units: Callable[[], Iterable[StorageUnit]]
               ) -> tuple[Lookup, Callable[[], list[tuple[str, str]]]]:
    """``lookup`` and ``names`` over the storage units ``units()`` gives
    when called (the first unit holding a name wins): read-only are PPRC
    secondaries, targets with inhibit_target_write, the C volumes of
    Global Mirror sessions and recovery volumes whose restore still copies.
    A recovery point is the export ``VOLUME#SEQ``, read-only
    (:mod:`.nbd_points`)."""
    def current() -> list[StorageUnit]:
        return list(units())

    def find(name: str) -> Export | None:
        if POINT_SEP in name:                # VOLUME#SEQ: a recovery point, read-only
            image = find_point(current(), name)
            if image is None:
                return None
            return Export(image, read_only=True,  # type: ignore[arg-type]
                          description=describe_point(image.point))
        for u in current():
            if name in u:
                vol = u.volume(name)
                if vol.closed:
                    return None
                return Export(vol, read_only=is_read_only(vol, current()),
                              description=describe(vol))
        return None

    def names() -> list[tuple[str, str]]:
        seen: dict[str, str] = {}
        for u in current():
            for vol in u.volumes():
                if vol.name not in seen and not vol.closed:
                    seen[vol.name] = describe(vol)
            for name, text in point_names(u):
                seen.setdefault(name, text)
        return list(seen.items())

    return find, names


def is_read_only(vol: Volume, units: Iterable[StorageUnit]) -> bool:
    if vol.is_secondary or vol.restoring is not None:
        return True
    tgt = vol.target_relationship
    if tgt is not None and tgt.inhibit_target_write:
        return True
    for u in units:
        for gm in u.sessions.values():
            if any(t.c is vol for t in gm.triplets):
                return True
    return False


def describe(vol: Volume) -> str:
    rs = vol.restoring
    if rs is not None:
        return (f"{vol.n_tracks} tracks of {vol.track_size} B, taking recovery point "
                f"{rs.point.volume.name}#{rs.point.seq} (read-only until its copy completes)")
    return f"{vol.n_tracks} tracks of {vol.track_size} B"


class LookupLock(Protocol):
    """What :class:`NBDServer` takes around its lookups."""

    def acquire(self, blocking: bool = ..., timeout: float = ...) -> bool: ...

    def release(self) -> None: ...


def _peer(conn: socket.socket) -> str:
    """Who is at the other end of ``conn``, for the log: an address, or
    for a unix socket the peer's pid and uid."""
    try:
        if conn.family == socket.AF_UNIX:
            pid, uid, _ = struct.unpack("3i", conn.getsockopt(
                socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i")))
            return f"pid {pid} uid {uid}"
        host, port = conn.getpeername()[:2]
        return f"{host}:{port}"
    except (OSError, AttributeError, struct.error, ValueError):
        return "an unknown peer"
