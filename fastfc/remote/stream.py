"""A direct stream between a caller and a unit's server: the session's
calls travel over one TCP connection per unit, beside the transport that
finds and starts the unit (Ray: the control plane, :mod:`fastfc.remote.rayunit`).

**Messages.** Each message is a 16-byte header (``<IIQ``: the length of
its meta part, the number of out-of-band buffers, the length of its data
part), the meta part (each buffer's length, ``<Q``, then a pickle,
protocol 5) and the data part (the buffers, each padded to
:data:`ALIGN` bytes). NumPy arrays travel as their raw bytes: sent from
their own memory (``socket.sendmsg``), received straight into the
buffer they are rebuilt over (``recv_into``); on the server's side that
buffer is reused from call to call unless the call kept the arrays. A
request is ``(method, args)``; its answer ``(0, value)`` or ``(1,
exception)``.

**Pipelining.** A caller may send several requests before reading any
answer; the server runs them one by one, in order, and answers in that
order (the prepare sent right behind the drain's last batch is read by
the unit as soon as that batch is written). Whoever waits for an answer
reads every answer before it too (kept for their callers): no thread of
its own on the caller's side. A caller must not pipeline a large request
behind an unanswered large answer it does not read (both sides would
wait for each other until the call timeout).

**Authentication.** The server holds a random 32-byte token that the
caller learns over the control plane. Before anything is unpickled on
either side, each proves it knows the token (HMAC-SHA256 over both sides'
nonces; the token itself never crosses the stream): the server drops a
peer that fails, the caller refuses a server that fails. The stream is
not encrypted.

**Failures.** A peer that dies or closes mid-message, or an answer that
does not come within the caller's timeout, breaks the stream: every call
on it fails with :class:`~fastfc.errors.UnitDownError`, never hangs, and
the caller's ``on_break`` is told (the transport then finds the unit
again by name and connects anew). A request is run only once received
whole.

:class:`StreamServer` serves a dispatch function (the Ray actor's, or a
test's child process'); :class:`StreamClient` is the caller's side;
:class:`StreamTransport` is a transport of units reached by address
alone (tests; a unit served without Ray).
"""

from __future__ import annotations

import hashlib
import hmac
import os
import pickle
import queue
import secrets
import select
import shutil
import socket
import struct
import sys
import tempfile
import threading
import time
from typing import Any, Callable

import numpy as np

from fastfc.errors import FastFCError, UnitDownError
from fastfc.remote import client
from fastfc.storage.site import Pending

HEADER = struct.Struct("<IIQ")
ALIGN = 64                      # each buffer starts at a multiple of this in the data part
MAGIC = b"FFCSTRM1"
NONCE = 16
MAC = 32
MAX_META = 1 << 30              # a header asking for more is a broken peer
MAX_BUFFERS = 1 << 20
IOV_MAX = 512                   # buffers per sendmsg
HANDSHAKE_TIMEOUT = 10.0        # seconds a new peer may take to authenticate
SERVER_IO_TIMEOUT = 120.0       # seconds the server waits inside one message or answer
READ_AHEAD = 2                  # requests a server receives ahead of the one it runs
_ZEROS = bytes(ALIGN)

# what a unit raised that reaches the caller as itself (anything else as a
# FastFCError naming it), over the stream as over Ray
PASSED_THROUGH = (FastFCError, ValueError, TypeError, KeyError, IndexError)


class StreamBroken(ConnectionError):
    """The peer closed or reset the connection, or did not answer in time."""


class Unreadable(Exception):
    """A whole message arrived (the stream is still in step) but its pickle
    could not be loaded here (``cause``)."""

    def __init__(self, cause: BaseException) -> None:
        super().__init__(f"{type(cause).__name__}: {cause}")
        self.cause = cause


# -- framing -------------------------------------------------------------------------

def encode(obj: Any) -> list[Any]:
    """The message carrying ``obj``: the pieces to send, in order (the
    arrays' memory itself, not copies)."""
    pbs: list[pickle.PickleBuffer] = []
    payload = pickle.dumps(obj, protocol=5, buffer_callback=pbs.append)
    views = [pb.raw() for pb in pbs]
    lens = struct.pack(f"<{len(views)}Q", *[v.nbytes for v in views])
    parts: list[Any] = [b"", lens, payload]
    data = 0
    for v in views:
        parts.append(v)
        pad = -v.nbytes % ALIGN
        if pad:
            parts.append(_ZEROS[:pad])
        data += v.nbytes + pad
    parts[0] = HEADER.pack(len(lens) + len(payload), len(views), data)
    return parts


def send_parts(sock: socket.socket, parts: list[Any], timeout: float | None) -> None:
    """Send every piece (``sendmsg``, :data:`IOV_MAX` at a time), within
    ``timeout`` seconds in all (None: no limit)."""
    views = [memoryview(p) for p in parts if len(p)]
    end = None if timeout is None else time.monotonic() + timeout
    i = 0
    while i < len(views):
        if end is not None:
            sock.settimeout(max(end - time.monotonic(), 1e-3))
        i = _sent(views, i, sock.sendmsg(views[i:i + IOV_MAX]))


def _sent(views: list[memoryview], i: int, n: int) -> int:
    """After ``sendmsg`` sent ``n`` bytes of ``views[i:]``: the index of
    the first piece not sent whole (a piece sent in part keeps its rest)."""
    while n and i < len(views):
        k = views[i].nbytes
        if n >= k:
            n -= k
            i += 1
        else:
            views[i] = views[i][n:]
            n = 0
    return i


def _recv_into(sock: socket.socket, view: memoryview, end: float | None) -> None:
    got, size = 0, view.nbytes
    while got < size:
        if end is not None:
            left = end - time.monotonic()
            if left <= 0:
                raise socket.timeout("timed out")
            sock.settimeout(left)
        n = sock.recv_into(view[got:], size - got)
        if not n:
            raise StreamBroken("the peer closed the stream" +
                               (" mid-message" if got or size > HEADER.size else ""))
        got += n


class _Buffers:
    """Where messages' data parts are received: with ``reuse``, arrays
    given back after their message was handled are taken again (up to
    ``keep`` of them), unless something received into one is still alive
    (an array the call kept); else a new array per message. ``_free`` is
    shared by a connection's reader and its executor: list appends and
    pops are atomic."""

    def __init__(self, reuse: bool, keep: int = 3) -> None:
        self.reuse, self.keep = reuse, keep
        self._free: list[np.ndarray] = []

    def take(self, n: int) -> np.ndarray:
        if self.reuse:
            for i, buf in enumerate(self._free):
                if buf.size >= n:
                    try:
                        return self._free.pop(i)
                    except IndexError:
                        break
        return np.empty(max(n, 1), np.uint8)

    def give_back(self, buf: np.ndarray) -> None:
        """``buf``'s message was handled and dropped by the caller (who holds
        ``buf`` alone): reuse it unless an array the call kept holds a view
        of it."""
        # the caller's name for it, this parameter, getrefcount's argument
        if self.reuse and len(self._free) < self.keep and sys.getrefcount(buf) <= 3:
            self._free.append(buf)


def recv_message(sock: socket.socket, timeout: float | None, buffers: _Buffers,
                 first_timeout: float | None = -1.0) -> tuple[Any, np.ndarray]:
    """Receive one message: its object and the array its data part went to
    (from ``buffers``: drop the object, then :meth:`_Buffers.give_back`
    the array). ``first_timeout`` bounds the wait for
    its first byte (-1: as ``timeout``); ``timeout`` the rest."""
    hdr = bytearray(HEADER.size)
    if first_timeout is None or first_timeout != -1.0:
        # (never a blocking socket: a connection's two socket objects share
        # its file's O_NONBLOCK, which the one with a timeout needs set)
        sock.settimeout(first_timeout or 60.0)
        while True:
            try:
                n = sock.recv_into(hdr, HEADER.size)
                break
            except socket.timeout:
                if first_timeout is not None:
                    raise
        if not n:
            raise StreamBroken("the peer closed the stream")
        end = None if timeout is None else time.monotonic() + timeout
        _recv_into(sock, memoryview(hdr)[n:], end)
    else:
        end = None if timeout is None else time.monotonic() + timeout
        _recv_into(sock, memoryview(hdr), end)
    meta_len, nbufs, data_len = HEADER.unpack(hdr)
    if meta_len > MAX_META or nbufs > MAX_BUFFERS or 8 * nbufs > meta_len:
        raise StreamBroken(f"a malformed message header ({meta_len}, {nbufs}, {data_len})")
    meta = bytearray(meta_len)
    _recv_into(sock, memoryview(meta), end)
    lens = struct.unpack_from(f"<{nbufs}Q", meta)
    data = buffers.take(data_len)
    whole = memoryview(data.data)
    if data_len:
        _recv_into(sock, whole[:data_len], end)
    views, off = [], 0
    for n in lens:
        if off + n > data_len:
            raise StreamBroken("a message's buffers overrun its data part")
        views.append(whole[off:off + n])
        off += n + (-n % ALIGN)
    whole.release()
    try:
        return pickle.loads(memoryview(meta)[8 * nbufs:], buffers=views), data
    except Exception as e:
        raise Unreadable(e) from None


# -- authentication ------------------------------------------------------------------

def _mac(token: bytes, who: bytes, *nonces: bytes) -> bytes:
    return hmac.new(token, who + b"".join(nonces), hashlib.sha256).digest()


def _recv_exact(sock: socket.socket, n: int, end: float) -> bytes:
    buf = bytearray(n)
    _recv_into(sock, memoryview(buf), end)
    return bytes(buf)


def _server_handshake(sock: socket.socket, token: bytes) -> bool:
    end = time.monotonic() + HANDSHAKE_TIMEOUT
    hello = _recv_exact(sock, len(MAGIC) + NONCE, end)
    if hello[:len(MAGIC)] != MAGIC:
        return False
    theirs, mine = hello[len(MAGIC):], secrets.token_bytes(NONCE)
    sock.settimeout(HANDSHAKE_TIMEOUT)
    sock.sendall(mine + _mac(token, b"server", theirs, mine))
    proof = _recv_exact(sock, MAC, end)
    if not hmac.compare_digest(proof, _mac(token, b"client", mine, theirs)):
        return False
    sock.sendall(b"\x01")
    return True


def _client_handshake(sock: socket.socket, token: bytes, timeout: float) -> None:
    end = time.monotonic() + timeout
    mine = secrets.token_bytes(NONCE)
    sock.settimeout(timeout)
    sock.sendall(MAGIC + mine)
    reply = _recv_exact(sock, NONCE + MAC, end)
    theirs, proof = reply[:NONCE], reply[NONCE:]
    if not hmac.compare_digest(proof, _mac(token, b"server", mine, theirs)):
        raise PermissionError("the server does not know the unit's token")
    sock.sendall(_mac(token, b"client", theirs, mine))
    if _recv_exact(sock, 1, end) != b"\x01":
        raise PermissionError("the server refused the token")


def _tune(sock: socket.socket) -> None:
    if sock.family in (socket.AF_INET, socket.AF_INET6):
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)


# -- the server ----------------------------------------------------------------------

class StreamServer:
    """Serves ``dispatch(method, args) -> value`` to authenticated peers:
    a listening TCP socket on ``host`` (port ``port``, 0: any free one),
    with ``local`` also a Unix socket in a new private directory (callers
    on the same host: about 1.5 x the bytes per second of TCP over
    loopback here), and a thread per connection (plus its reader), each
    running its peer's requests in order. ``dispatch`` is called from
    those threads: it serialises what must not run at once (the Ray actor
    holds one lock around its server). ``token``: 32 random bytes unless
    given. :attr:`address` (TCP) and :attr:`local_path` (the Unix
    socket's path, or None) are what callers connect to."""

    def __init__(self, dispatch: Callable[[str, tuple], Any], host: str = "127.0.0.1",
                 port: int = 0, token: bytes | None = None, local: bool = True) -> None:
        self.dispatch = dispatch
        self.token = token if token is not None else secrets.token_bytes(32)
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        self._listeners = [socket.create_server((host, port), family=family, backlog=64)]
        self.address: tuple[str, int] = self._listeners[0].getsockname()[:2]
        self.local_path: str | None = None
        self._dir: str | None = None
        if local:
            self._dir = tempfile.mkdtemp(prefix="fastfc-stream-")     # mode 0700
            self.local_path = os.path.join(self._dir, "unit.sock")
            u = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            u.bind(self.local_path)
            u.listen(64)
            self._listeners.append(u)
        self._conns: set[socket.socket] = set()
        self._lock = threading.Lock()       # guards _conns and _closed
        self._closed = False
        self.served = 0                      # requests answered (tests, tools)
        for lst in self._listeners:
            threading.Thread(target=self._accept, args=(lst,), daemon=True,
                             name=f"fastfc-stream-{self.address[1]}").start()

    def __repr__(self) -> str:
        return f"<StreamServer {self.address[0]}:{self.address[1]} {len(self._conns)} peers>"

    def _accept(self, listener: socket.socket) -> None:
        while True:
            try:
                conn, _ = listener.accept()
            except OSError:
                return                      # closed
            with self._lock:
                if self._closed:
                    conn.close()
                    return
                self._conns.add(conn)
            threading.Thread(target=self._serve, args=(conn,), daemon=True,
                             name="fastfc-stream-peer").start()

    def _serve(self, conn: socket.socket) -> None:
        """A peer's requests, run one by one in order on this thread while
        :meth:`_read_ahead` receives the next ones (up to
        :data:`READ_AHEAD` waiting): a large batch arrives while the one
        before it is written. Answers go out on ``tx`` (the connection,
        its own timeout)."""
        tx = None
        waiting: queue.SimpleQueue = queue.SimpleQueue()
        room = threading.Semaphore(READ_AHEAD)
        try:
            _tune(conn)
            if not _server_handshake(conn, self.token):
                return                      # nothing of its unpickled
            tx = socket.socket(fileno=os.dup(conn.fileno()))
            tx.settimeout(SERVER_IO_TIMEOUT)
            buffers = _Buffers(reuse=True)
            threading.Thread(target=self._read_ahead, args=(conn, buffers, waiting, room),
                             daemon=True, name="fastfc-stream-read").start()
            while True:
                item = waiting.get()
                if item is None:
                    return                  # the peer left, or broke a message
                req, buf = item
                item = None
                room.release()
                method = "?"
                try:
                    if isinstance(req, Unreadable):
                        raise FastFCError(f"the unit could not read the request: {req}")
                    method, args = req
                    if not isinstance(method, str) or not isinstance(args, tuple):
                        raise TypeError("a request is (method, args)")
                    reply: tuple[int, Any] = (0, self.dispatch(method, args))
                except Exception as e:      # the caller's result() raises it
                    reply = (1, e)
                req = args = None
                try:
                    parts = encode(reply)
                except Exception as e:      # an unpicklable value or exception
                    parts = encode((1, FastFCError(f"{method}: could not send its "
                                                   f"{'error' if reply[0] else 'value'} "
                                                   f"({type(e).__name__}: {e}): {reply[1]!r}")))
                reply = None                # type: ignore[assignment]
                send_parts(tx, parts, SERVER_IO_TIMEOUT)
                parts = None                # type: ignore[assignment]
                self.served += 1
                if buf is not None:
                    buffers.give_back(buf)
                buf = None
        except (OSError, StreamBroken):
            return
        finally:
            with self._lock:
                self._conns.discard(conn)
            try:
                conn.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            conn.close()
            if tx is not None:
                tx.close()
            for _ in range(READ_AHEAD):     # a reader waiting for room ends
                room.release()

    @staticmethod
    def _read_ahead(conn: socket.socket, buffers: _Buffers, waiting: queue.SimpleQueue,
                    room: threading.Semaphore) -> None:
        try:
            while True:
                room.acquire()
                try:
                    waiting.put(recv_message(conn, SERVER_IO_TIMEOUT, buffers,
                                             first_timeout=None))
                except Unreadable as e:
                    waiting.put((e, None))
        except (OSError, StreamBroken, ValueError):
            waiting.put(None)

    def close(self) -> None:
        """Stop listening and drop every peer (their calls fail)."""
        with self._lock:
            self._closed = True
            conns, self._conns = list(self._conns), set()
        for lst in self._listeners:
            try:
                lst.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            lst.close()
        if self._dir is not None:
            shutil.rmtree(self._dir, ignore_errors=True)
        for c in conns:
            try:
                c.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass


# -- the caller's side ---------------------------------------------------------------

class StreamClient:
    """One authenticated connection to a unit's :class:`StreamServer`.

    :meth:`call` sends a request and returns its :class:`Pending` at once
    (requests pipeline); ``result()`` reads answers in order. ``timeout()``
    gives the seconds an answer may take (read on every wait: the
    transport's call timeout); ``on_break`` is called once when the
    stream breaks. Threads may share it: ``_send`` (one message at a
    time) and ``_recv`` (one reader at a time; answers read for others
    are kept in ``_answers``) are its locks."""

    def __init__(self, unit: str, address: tuple[str, int] | str, token: bytes,
                 timeout: Callable[[], float],
                 on_break: Callable[["StreamClient"], None] | None = None) -> None:
        self.unit, self.timeout, self.on_break = unit, timeout, on_break
        self.address = address if isinstance(address, str) else tuple(address)
        where = address if isinstance(address, str) else f"{address[0]}:{address[1]}"
        t = timeout()
        try:
            if isinstance(address, str):        # a Unix socket (the same host)
                sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                sock.settimeout(t)
                try:
                    sock.connect(address)
                except OSError:
                    sock.close()
                    raise
            else:
                sock = socket.create_connection((address[0], address[1]), timeout=t)
        except OSError as e:
            raise UnitDownError(f"unit {unit}: its stream at {where} refused the "
                                f"connection ({e})") from None
        try:
            _tune(sock)
            _client_handshake(sock, token, t)
        except PermissionError as e:
            sock.close()
            raise UnitDownError(f"unit {unit}: the stream at {where} failed "
                                f"authentication ({e})") from None
        except (OSError, StreamBroken) as e:
            sock.close()
            raise UnitDownError(f"unit {unit}: the stream at {where} closed during "
                                f"authentication (a wrong token, or the unit died: "
                                f"{e})") from None
        self.sock = sock
        # the sending side: the same connection, non-blocking (its own
        # timeout setting, apart from the reader's)
        self._tx = socket.socket(fileno=os.dup(sock.fileno()))
        self._tx.setblocking(False)
        self._send = threading.Lock()
        self._recv = threading.Lock()
        self._sent = 0              # requests sent
        self._read = 0              # answers read
        self._answers: dict[int, tuple[int, Any]] = {}
        # calls whose Pending was dropped unread: their answers are not kept
        self._abandoned: set[int] = set()
        self.broken: str | None = None
        self._buffers = _Buffers(reuse=False)

    def __repr__(self) -> str:
        state = f"broken: {self.broken}" if self.broken else f"{self._sent - self._read} unanswered"
        return f"<StreamClient {self.unit} {self.address} {state}>"

    def _break(self, why: str) -> None:
        if self.broken is None:
            self.broken = why
            try:
                self.sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            self.sock.close()
            self._tx.close()
            if self.on_break is not None:
                self.on_break(self)

    def close(self) -> None:
        self._break("closed by this process")

    def call(self, method: str, args: tuple) -> Pending:
        parts = encode((method, tuple(args)))
        with self._send:
            if self.broken is not None:
                return _Refused(UnitDownError(f"unit {self.unit} is down ({self.broken})"))
            seq = self._sent
            try:
                self._send_parts(parts, time.monotonic() + self.timeout())
            except (OSError, StreamBroken) as e:
                why = _why(e, "sending", method)
                self._break(why)
                return _Refused(UnitDownError(f"unit {self.unit} is down ({why})"))
            self._sent += 1
        return StreamPending(self, seq, method)

    def _send_parts(self, parts: list[Any], end: float) -> None:
        """Send a message without blocking on a full socket: while the
        server cannot take more (it is sending an answer nobody reads yet),
        read its answers (kept for their callers) unless another thread
        is reading them."""
        views = [memoryview(p) for p in parts if len(p)]
        i = 0
        while i < len(views):
            try:
                n = self._tx.sendmsg(views[i:i + IOV_MAX])
            except BlockingIOError:
                self._wait_room(end)
                continue
            i = _sent(views, i, n)

    def _wait_room(self, end: float) -> None:
        poll = select.poll()
        poll.register(self._tx.fileno(), select.POLLOUT | select.POLLIN)
        while True:
            left = end - time.monotonic()
            if left <= 0:
                raise socket.timeout("timed out")
            events = poll.poll(max(1, int(min(left, 0.05) * 1e3)))
            flags = events[0][1] if events else 0
            if flags & (select.POLLOUT | select.POLLERR | select.POLLHUP):
                return
            if flags & select.POLLIN:
                if not self._recv.acquire(blocking=False):
                    time.sleep(0.001)       # the reader is at it
                    continue
                try:
                    self._keep(_answer(self.sock, self.timeout(), self._buffers))
                finally:
                    self._recv.release()

    def _keep(self, got: tuple[int, Any]) -> None:
        """Keep the next answer for its caller (under ``_recv``), unless
        its Pending was dropped unread."""
        seq, self._read = self._read, self._read + 1
        if seq in self._abandoned:
            self._abandoned.discard(seq)
        else:
            self._answers[seq] = got

    def _forget_answer(self, seq: int) -> None:
        """Call ``seq``'s Pending was dropped unread: forget its answer, or
        drop it when it comes. Runs wherever the Pending is collected, so
        it takes no lock (each step one dict or set operation)."""
        if self._answers.pop(seq, None) is None and seq >= self._read:
            self._abandoned.add(seq)

    def _wait(self, seq: int, method: str) -> tuple[int, Any]:
        with self._recv:
            while seq not in self._answers:
                if self.broken is not None:
                    raise UnitDownError(f"unit {self.unit} is down ({self.broken}; "
                                        f"{method} unanswered)")
                t = self.timeout()
                try:
                    got = _answer(self.sock, t, self._buffers)
                except (OSError, StreamBroken) as e:
                    if isinstance(e, socket.timeout):
                        why = f"did not answer {method} within {t:.0f} s"
                    else:
                        why = _why(e, "waiting for the answer to", method)
                    self._break(why)
                    raise UnitDownError(f"unit {self.unit} {why}"
                                        if why.startswith("did not") else
                                        f"unit {self.unit} is down ({why})") from None
                self._keep(got)
            return self._answers.pop(seq)


def _answer(sock: socket.socket, timeout: float, buffers: _Buffers) -> tuple[int, Any]:
    """The next answer; one that arrived whole but cannot be loaded here is
    that call's error (the stream goes on)."""
    try:
        got, _ = recv_message(sock, timeout, buffers)
    except Unreadable as e:
        return (1, FastFCError(f"its answer could not be read here: {e}"))
    if not (isinstance(got, tuple) and len(got) == 2 and got[0] in (0, 1)):
        raise StreamBroken(f"a malformed answer: {type(got).__name__}")
    return got


def _why(e: BaseException, doing: str, method: str) -> str:
    if isinstance(e, socket.timeout):
        return f"timed out {doing} {method}"
    return f"stream lost {doing} {method}: {type(e).__name__}: {e}"


class StreamPending(Pending):
    def __init__(self, client_: StreamClient, seq: int, method: str) -> None:
        self.client, self.seq, self.method = client_, seq, method
        self._got: tuple[int, Any] | None = None

    def result(self) -> Any:
        if self._got is None:
            self._got = self.client._wait(self.seq, self.method)
        ok, value = self._got
        if ok == 0:
            return value
        raise unwrap_error(value, self.client.unit, self.method)

    def __del__(self) -> None:
        if self._got is None:       # never read (a session that gave up on it)
            self.client._forget_answer(self.seq)


def unwrap_error(e: BaseException, unit: str, method: str) -> BaseException:
    """What a unit's exception raises at the caller: as itself if one of
    :data:`PASSED_THROUGH`, else a FastFCError naming it."""
    if isinstance(e, PASSED_THROUGH):
        return e
    return FastFCError(f"unit {unit}: {method} failed: {type(e).__name__}: {e}")


class _Refused(Pending):
    def __init__(self, error: BaseException) -> None:
        self.error = error

    def result(self) -> Any:
        raise self.error


class StreamTransport(client.Transport):
    """Units reached by address alone (no control plane): :meth:`connect`
    names a unit's stream (its address and token); calls go over one
    connection per unit, opened again after it broke. Proxies of its
    units have kind ``"stream"``. Used by tests (a unit served in a child
    process) and by tools that serve a unit without Ray."""

    kind = "stream"

    def __init__(self, timeout: float = 30.0) -> None:
        self.call_timeout = timeout
        self._where: dict[str, tuple[tuple[str, int] | str, bytes]] = {}
        self._clients: dict[str, StreamClient] = {}
        self._lock = threading.Lock()       # guards _where and _clients

    def connect(self, unit: str, address: tuple[str, int] | str, token: bytes) -> None:
        """Where unit ``unit``'s stream is now (again, after a restart): its
        TCP address, or its Unix socket's path."""
        with self._lock:
            self._where[unit] = (address if isinstance(address, str) else
                                 (str(address[0]), int(address[1])), bytes(token))
            old = self._clients.pop(unit, None)
        if old is not None:
            old.close()

    def forget(self, unit: str) -> None:
        with self._lock:
            self._where.pop(unit, None)
            old = self._clients.pop(unit, None)
        if old is not None:
            old.close()

    def _dropped(self, c: StreamClient) -> None:
        with self._lock:
            if self._clients.get(c.unit) is c:
                del self._clients[c.unit]

    def client(self, unit: str) -> StreamClient:
        with self._lock:
            c = self._clients.get(unit)
            if c is not None:
                return c
            where = self._where.get(unit)
        if where is None:
            raise UnitDownError(f"unit {unit} is not known to this process "
                                "(StreamTransport.connect)")
        c = StreamClient(unit, where[0], where[1], lambda: self.call_timeout, self._dropped)
        with self._lock:
            if unit in self._clients:       # another thread connected first
                other = self._clients[unit]
            else:
                self._clients[unit] = other = c
        if other is not c:
            c.close()
        return other

    def call(self, unit: str, method: str, *args: Any) -> Pending:
        try:
            c = self.client(unit)
        except UnitDownError as e:
            return _Refused(e)
        return c.call(method, args)


client._transports["stream"] = StreamTransport()


def stream_transport() -> StreamTransport:
    """This process' :class:`StreamTransport`."""
    tr = client._transports["stream"]
    assert isinstance(tr, StreamTransport)
    return tr


__all__ = ["StreamServer", "StreamClient", "StreamTransport", "StreamBroken", "encode",
           "send_parts", "recv_message", "unwrap_error", "stream_transport", "PASSED_THROUGH"]
