"""The control socket: ``fastfc`` commands carried out by the process that
holds a unit (``fastfc serve``).

While a server holds a unit, no other process can open it. So the server
listens on ``UNIT/control.sock``, and every other ``fastfc -u UNIT ...``
command sends its command line there instead of opening the unit: the server
runs it, in its own process, against the units it already has open, and
sends back what the command printed and its exit status, which the client
reproduces byte for byte. With no server (no socket, or a stale one that
refuses connections: its server was killed), the client opens the unit
itself, as it always did.

The server side is :func:`hosting`; the client side is :func:`forward`,
called by the ``fastfc`` group before it opens a unit, over
:mod:`fastfc_client`'s (the ``fastfc`` console script forwards through that
before it imports click, NumPy or the engine).

What a forwarded command sees
-----------------------------
- Its own command line, parsed and checked by the server exactly as a direct
  run parses it (usage errors included), the client's working directory for
  relative unit paths, and the client's ``FASTFC_*`` and terminal
  environment variables (``COLUMNS``, ``TERM``, ``NO_COLOR``, ...): while
  a server hosts, ``os.environ`` is routed by thread (:class:`_EnvRouter`),
  so each command reads its own client's values however many run at once
  (and a rich console takes a copy of them when made, for its own threads).
- The units the server holds, not closed when it ends (but flushed, as a
  direct run's close flushes them). A unit the command needs that the
  server does not hold (a new ``--remote-unit``, a partner) is opened by the
  server read-write as a direct run would, and stays open with the server,
  served like the others, since pairs now span it: the server closes it
  when it stops.
- The server's command lock (:class:`CommandLock`, a readers-writer lock):
  a command that only looks (``READ_ONLY_COMMANDS``: ``lsvol``, ``showgmir``,
  ``lsflash``, ...) takes it shared, so such commands run together; any
  other takes it exclusive, so changing commands run one at a time, each
  seeing the units as the one before left them (a waiting changing command
  goes before newly arriving lookers, so lookers cannot starve it). A long
  command lets go of it (:func:`.units.unlocked`) while it waits or works
  on objects that keep their own locks: ``formcg --seconds`` while its
  loop forms CGs, ``waitflash`` and ``--wait`` while they copy or send
  step by step; so a looker answers while they run, as it does while a
  session's loop (``resumegmir``: :mod:`.loops`) or a background copy
  (:mod:`.copies`) runs, which never take the lock. What a looker reads
  while those run is read under the object's own lock, never the command
  lock: a unit's SQLite store under its store lock, bitmaps and counters
  as the engine publishes them; the units' table (``Units.open``) changes
  only under the exclusive lock, or, when a looker opens a unit the server
  does not hold yet, under the narrow ``Units`` opening lock. A changing
  command on a session whose ``formcg`` loop runs meets what it meets
  beside a ``resumegmir`` loop: the session's own lock (one attempt at a
  time), and its refusals (a second loop: "already running").
  ``--wait`` (for a busy unit) has nothing to wait for: a forwarded command
  queues for the lock instead of failing on a busy unit.
- ``--durability power`` on a unit the server opened at ``process`` is
  refused (the units keep the level they were opened with); ``process`` on
  a ``power`` server gets the stronger level.
- Its output is sent as it is written (progress lines arrive while the
  command runs). If the client takes no output for :data:`IO_TIMEOUT`
  seconds (suspended), the command still finishes: the rest of its output
  is dropped and the client says the outcome is unknown. If the client
  hangs up (killed; or is cut off so), or asks it to stop (Ctrl-C: the
  client sends a ``c`` frame), a command that runs for a while
  (``formcg --seconds``, ``waitflash``, ``--wait``) is told to end
  (:attr:`Served.stopping`, :func:`.units.interrupted`) and one still
  queued for the lock is not run; others finish. The exit frame says
  whether the command stopped early so (``stopped``), and the client prints
  one line saying so (or that the outcome is unknown, when no answer comes
  within :data:`CANCEL_WAIT`) and exits 130. No command reads stdin, so
  none is sent.
- ``serve``, ``demo`` and ``bench`` are never forwarded (:data:`LOCAL`).

Security: the socket is created in a private (0700) directory inside the
unit directory, given mode 0600 there and only then renamed to
``control.sock``, so at that path it is 0600 from the moment it exists; the
server also checks each peer's uid (``SO_PEERCRED``) and refuses any other
user, root included. The client checks the server the same way before it
sends anything: a socket another user owns or listens on (squatting a unit
directory it can write to) gets nothing (:class:`UntrustedServer`). A
request must be in within :data:`IO_TIMEOUT` of connecting (a deadline);
past :data:`MAX_CONNECTIONS` connections a new one is refused with a
message. A ``control.sock`` removed or replaced under a running server is
made again within :data:`REPUBLISH_INTERVAL`.

Each connection is logged (logger ``fastfc.control``, at info: the peer's
pid and uid, the command line, its exit status and seconds taken).

The wire format: the client sends a request frame, the server sends frames back
until an exit frame. A frame is a kind byte, a 4-byte big-endian length and
that many bytes: ``q`` the request (JSON), ``o`` stdout bytes, ``e`` stderr
bytes, ``x`` the exit status (JSON: ``status``, and ``stopped`` or
``not_run`` after a ``c``), and from the client after its request, ``c``:
stop the command (Ctrl-C). Output is bytes, encoded with the
client's stream encodings, so binary-safe and identical to a direct run.
"""

from __future__ import annotations

import codecs
import errno
import io
import json
import logging
import os
import select
import socket
import struct
import sys
import tempfile
import threading
import time
import traceback
import contextlib
from contextlib import contextmanager
from pathlib import Path
from collections.abc import MutableMapping
from typing import IO, Any, Iterator, cast

import click

import fastfc_client
from fastfc_client import (ENV_KEYS, LOCAL, SOCKET, _HEADER, _reachable, _recv,  # noqa: F401
                           _recv_exact, _replies, _request, _send, _isatty)
from fastfc_client import env_wanted as _env_wanted

from .units import Running, Units, running

log = logging.getLogger("fastfc.control")

MAX_REQUEST = 1 << 20        # a command line and its environment
#: Seconds a client may take to send its request, or to take a piece of
#: output: a client that stalls longer (suspended, say) loses the rest of
#: the output, not the server its other work (commands hold ``lock``).
IO_TIMEOUT = 10.0
#: Connections a server takes at once (commands running, queued for the lock,
#: or still sending their request); one more is refused with a message.
MAX_CONNECTIONS = 64
#: Seconds between the accepting thread's looks at its sockets' names: a
#: ``control.sock`` removed (or replaced) under a running server is made
#: again within this.
REPUBLISH_INTERVAL = 1.0
#: Seconds a client waits, after Ctrl-C, for the server to say it stopped
#: the command; then it says the outcome is unknown.
CANCEL_WAIT = fastfc_client.CANCEL_WAIT
#: Milliseconds between the watcher's looks at the connections of the
#: commands running (a command about to wait wakes it at once: :class:`_Watcher`).
WATCH_INTERVAL_MS = 100
#: Seconds the watcher goes on looking after the last command ended, before
#: it sleeps until a command comes (a busy server's commands never wake it).
WATCH_IDLE = 10.0


# -- the command lock ------------------------------------------------------------------
class CommandLock:
    """A readers-writer lock: taken exclusive (``with lock``,
    :meth:`acquire`, :meth:`release`: reentrant, as the ``threading.RLock``
    it replaces) by what changes the units, shared (:meth:`shared`,
    reentrant, also by the thread holding it exclusive) by what only looks.
    A thread waiting to take it exclusive goes before threads that come to
    take it shared after it (no starving the writers); a thread holding it
    shared cannot take it exclusive (RuntimeError: that would deadlock).
    :meth:`released` lets go of what this thread holds for a block."""

    def __init__(self) -> None:
        self._cond = threading.Condition(threading.Lock())
        self._writer: int | None = None
        self._depth = 0
        self._readers: dict[int, int] = {}
        self._writers_waiting = 0

    # exclusive
    def acquire(self, blocking: bool = True, timeout: float = -1) -> bool:
        me = threading.get_ident()
        with self._cond:
            if self._writer == me:
                self._depth += 1
                return True
            if me in self._readers:
                raise RuntimeError("this thread holds the command lock shared: it cannot "
                                   "take it exclusive")
            deadline = None if timeout < 0 else time.monotonic() + timeout
            self._writers_waiting += 1
            try:
                while self._writer is not None or self._readers:
                    if not blocking:
                        return False
                    left = None if deadline is None else deadline - time.monotonic()
                    if left is not None and left <= 0:
                        return False
                    self._cond.wait(left)
            finally:
                self._writers_waiting -= 1
                if self._writer is None:
                    self._cond.notify_all()     # readers held back by this waiter
            self._writer, self._depth = me, 1
            return True

    def release(self) -> None:
        with self._cond:
            if self._writer != threading.get_ident():
                raise RuntimeError("release of a command lock this thread does not hold")
            self._depth -= 1
            if not self._depth:
                self._writer = None
                self._cond.notify_all()

    def __enter__(self) -> "CommandLock":
        self.acquire()
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()

    # shared
    def acquire_shared(self, blocking: bool = True, timeout: float = -1) -> bool:
        me = threading.get_ident()
        with self._cond:
            if self._writer == me or me in self._readers:
                self._readers[me] = self._readers.get(me, 0) + 1
                return True
            deadline = None if timeout < 0 else time.monotonic() + timeout
            while self._writer is not None or self._writers_waiting:
                if not blocking:
                    return False
                left = None if deadline is None else deadline - time.monotonic()
                if left is not None and left <= 0:
                    return False
                self._cond.wait(left)
            self._readers[me] = 1
            return True

    def release_shared(self) -> None:
        me = threading.get_ident()
        with self._cond:
            n = self._readers.get(me)
            if not n:
                raise RuntimeError("release of a shared hold this thread does not have")
            if n > 1:
                self._readers[me] = n - 1
            else:
                del self._readers[me]
                self._cond.notify_all()

    @contextmanager
    def shared(self) -> Iterator["CommandLock"]:
        self.acquire_shared()
        try:
            yield self
        finally:
            self.release_shared()

    def reader(self) -> "_SharedView":
        """This lock as a lock taken shared (``acquire``/``release``,
        ``with``): for what only looks up (an NBD server's exports)."""
        return _SharedView(self)

    @contextmanager
    def released(self) -> Iterator[None]:
        """Let go of whatever this thread holds of the lock for the block;
        take the same back after (a long command's wait)."""
        me = threading.get_ident()
        with self._cond:
            depth = self._depth if self._writer == me else 0
            shared = self._readers.pop(me, 0)
            if depth:
                self._writer, self._depth = None, 0
            if depth or shared:
                self._cond.notify_all()
        try:
            yield
        finally:
            if depth:
                self.acquire()
                with self._cond:
                    self._depth = depth
                    if shared:
                        self._readers[me] = shared
            elif shared:
                self.acquire_shared()
                with self._cond:
                    self._readers[me] = shared


class _SharedView:
    def __init__(self, lock: CommandLock) -> None:
        self._lock = lock

    def acquire(self, blocking: bool = True, timeout: float = -1) -> bool:
        return self._lock.acquire_shared(blocking, timeout)

    def release(self) -> None:
        self._lock.release_shared()

    def __enter__(self) -> "_SharedView":
        self.acquire()
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


# -- the client ------------------------------------------------------------------------
class ServerGone(click.ClickException):
    """The server closed the connection before the command's exit status."""


class UntrustedServer(click.ClickException):
    """The control socket is not this user's (its file, or the process
    listening on it): nothing was sent to it."""


def forward(unit: str | os.PathLike, argv: list[str], prog_name: str, *,
            stdout: IO[bytes], stderr: IO[bytes], stdout_text: Any = None,
            stderr_text: Any = None) -> int | None:
    """Have the server holding ``unit`` run ``prog_name argv``: copy what it
    prints to ``stdout`` and ``stderr`` (binary streams) and return its exit
    status. None when no server holds the unit (no ``control.sock``, or one
    that refuses connections: then the caller opens the unit itself; a stale
    socket is left where it is, it is the next server's to replace).

    ``stdout_text`` and ``stderr_text`` are the text streams the command
    would have written to (their encoding and whether they are a terminal
    are sent along); default: ``sys.stdout`` and ``sys.stderr``.

    The client side is :mod:`fastfc_client`'s (the ``fastfc`` console
    script forwards through it without importing the engine); its errors
    are raised here as click's: :class:`ServerGone`, :class:`UntrustedServer`.
    """
    try:
        return fastfc_client.forward(unit, argv, prog_name, stdout=stdout, stderr=stderr,
                                     stdout_text=stdout_text, stderr_text=stderr_text,
                                     cancel_wait=CANCEL_WAIT)
    except fastfc_client.ServerGone as e:
        raise ServerGone(str(e)) from None
    except fastfc_client.UntrustedServer as e:
        raise UntrustedServer(str(e)) from None


def binary(text: Any) -> IO[bytes]:
    """The binary stream under a text stream (``sys.stdout.buffer``), or
    one that writes through the text stream when it has none."""
    buffer = getattr(text, "buffer", None)
    if buffer is not None:
        return cast(IO[bytes], buffer)
    return cast(IO[bytes], _ThroughText(text))


class _ThroughText(io.RawIOBase):
    def __init__(self, text: Any) -> None:
        self._text = text

    def writable(self) -> bool:
        return True

    def write(self, data: Any) -> int:
        self._text.write(bytes(data).decode(getattr(self._text, "encoding", None) or "utf-8",
                                            "surrogateescape"))
        return len(data)

    def flush(self) -> None:
        self._text.flush()


# -- the server: output routed by thread -----------------------------------------------
class _Router:
    """Stands in for ``sys.stdout`` (or ``sys.stderr``) while a server hosts:
    what a thread writes goes to the stream routed for that thread (the
    client whose command it runs), else to the original stream. ``routed``
    is that stream, for whoever must hand it to another thread (a progress
    bar's refresh thread)."""

    def __init__(self, original: Any) -> None:
        self.original = original
        self._local = threading.local()

    @property
    def routed(self) -> Any:
        return getattr(self._local, "stream", None) or self.original

    def route(self, stream: Any) -> None:
        self._local.stream = stream

    def write(self, s: Any) -> int:
        return int(self.routed.write(s))

    def flush(self) -> None:
        self.routed.flush()

    def isatty(self) -> bool:
        return _isatty(self.routed)

    def __getattr__(self, name: str) -> Any:    # encoding, errors, buffer, fileno, ...
        return getattr(self.routed, name)


class _EnvRouter(MutableMapping):
    """Stands in for ``os.environ`` while a server hosts: the variables a
    forwarded command takes from its client (``FASTFC_*``, ``COLUMNS``,
    ``TERM``, ...: :func:`_env_wanted`) are read from, and set in, that
    command's own copy in the thread that runs it; every other variable,
    and every variable in other threads, is the process's. Concurrent
    commands so never see each other's."""

    def __init__(self, original: Any) -> None:
        self.original = original
        self._local = threading.local()

    def _mine(self) -> dict | None:
        return cast("dict | None", getattr(self._local, "env", None))

    def route(self, env: dict | None) -> None:
        self._local.env = env

    def __getitem__(self, key: str) -> str:
        mine = self._mine()
        if mine is not None and _env_wanted(key):
            return cast(str, mine[key])
        return cast(str, self.original[key])

    def __setitem__(self, key: str, value: str) -> None:
        mine = self._mine()
        if mine is not None and _env_wanted(key):
            mine[key] = str(value)
        else:
            self.original[key] = value

    def __delitem__(self, key: str) -> None:
        mine = self._mine()
        if mine is not None and _env_wanted(key):
            del mine[key]
        else:
            del self.original[key]

    def __iter__(self) -> Iterator[str]:
        mine = self._mine()
        if mine is None:
            return iter(list(self.original))
        return iter([k for k in list(self.original) if not _env_wanted(k)] + list(mine))

    def __len__(self) -> int:
        return len(list(iter(self)))

    def copy(self) -> dict:
        return dict(self)

    def __getattr__(self, name: str) -> Any:    # encodekey, ... of os._Environ
        return getattr(self.original, name)


class _Sink:
    """Bytes to one client stream, each write sent as a frame at once. Once
    the client is gone, writes are dropped: the command still finishes."""

    def __init__(self, conn: socket.socket, kind: bytes, send_lock: threading.Lock) -> None:
        self._conn, self._kind, self._lock = conn, kind, send_lock
        self.gone = False

    def write(self, data: bytes | bytearray | memoryview) -> int:
        if not isinstance(data, (bytes, bytearray, memoryview)):
            raise TypeError(f"a bytes-like object is required, not {type(data).__name__}")
        if data and not self.gone:
            with self._lock:
                try:
                    _send_now(self._conn, self._kind, bytes(data))
                except OSError:     # gone or stalled: end its stream (a frame may be cut)
                    self.gone = True
                    try:
                        self._conn.shutdown(socket.SHUT_RDWR)
                    except OSError:
                        pass
        return len(data)

    def flush(self) -> None:
        pass

    def writable(self) -> bool:
        return True

    def isatty(self) -> bool:
        return False


class _ClientText:
    """A text stream to a client: encoded as the client's own stream would
    encode it, so the bytes are those of a direct run."""

    def __init__(self, sink: _Sink, encoding: str, errors: str, tty: bool) -> None:
        self.buffer = sink
        self.encoding, self.errors, self._tty = encoding, errors, bool(tty)
        self.closed = False

    def write(self, s: str) -> int:
        if not isinstance(s, str):
            raise TypeError(f"write() argument must be str, not {type(s).__name__}")
        self.buffer.write(s.encode(self.encoding, self.errors))
        return len(s)

    def flush(self) -> None:
        pass

    def isatty(self) -> bool:
        return self._tty

    def writable(self) -> bool:
        return True

    def readable(self) -> bool:
        return False

    def fileno(self) -> int:
        raise OSError("a forwarded command's output has no file descriptor")


# -- the server ------------------------------------------------------------------------
class Served:
    """What a server hands the ``fastfc`` group (as ``obj``) for a command it
    runs for a client: its units, and the client's working directory.
    :meth:`units` takes the server's command lock for the command (shared
    for one that only looks, else exclusive); the server lets go of it when
    the command ends (:meth:`done`)."""

    def __init__(self, units: Units, cwd: str, stopping: threading.Event | None = None,
                 lock: Any = None, asked: threading.Event | None = None,
                 hurry: Any = None) -> None:
        self.host, self.cwd = units, cwd
        #: called before the command waits (for the lock, or letting go of
        #: it): the watcher looks at its client at once, not at its next turn
        self._hurry = hurry
        #: set when the server stops or the client hangs up (Ctrl-C): a
        #: command that runs for a while (formcg --seconds) ends early instead
        #: of holding the server's shutdown
        self.stopping = stopping
        self._lock = lock
        self._asked = asked     # the client's Ctrl-C (or hang-up) alone
        self._held: str | None = None
        #: the command was not run: its client hung up while it waited
        self.not_run = False

    def units(self, local: str | None, remote: str | None, durability: str | None, *,
              looks_only: bool = False) -> Units:
        """The command's view of the served units (``durability``: the level
        the command asked for explicitly, None if it did not; ``looks_only``:
        a command that changes nothing, so nothing to flush after it)."""
        self._take(looks_only)
        if durability == "power" and self.host.durability != "power":
            raise click.ClickException(
                f"--durability power: the units are held by a server (pid {os.getpid()}) "
                f"that opened them at durability {self.host.durability!r}; restart it with "
                "--durability power")
        units = Units.borrowing(self.host, local, remote, cwd=self.cwd, looks_only=looks_only)
        units.stopping = self.stopping
        return units

    def _take(self, shared: bool) -> None:
        lock = self._lock
        if lock is None or self._held is not None:
            return
        if shared and hasattr(lock, "acquire_shared"):
            if not lock.acquire_shared(blocking=False):
                self._waits()
                lock.acquire_shared()
            self._held = "shared"
        else:
            if not lock.acquire(blocking=False):
                self._waits()
                lock.acquire()
            self._held = "exclusive"
        if self._asked is not None and self._asked.is_set():
            # its client hung up (or pressed Ctrl-C) while it waited for its
            # turn: nobody to run it for
            self.not_run = True
            raise click.exceptions.Exit(130)

    def _waits(self) -> None:
        if self._hurry is not None:
            self._hurry()

    def release(self) -> Any:
        """The :func:`.units.unlocked` hook: let go of the lock for a block
        (a long command's wait: its client's Ctrl-C is looked for at once)."""
        self._waits()
        lock = self._lock
        if self._held is None or not hasattr(lock, "released"):
            return contextlib.nullcontext()
        return lock.released()

    def done(self) -> None:
        """The command ended: let go of the lock it took."""
        held, self._held = self._held, None
        if held == "shared":
            self._lock.release_shared()
        elif held == "exclusive":
            self._lock.release()


class _Seen(threading.Event):
    """An event that remembers whether anyone saw it set (a command that
    polled it and so stopped early)."""

    seen = False

    def is_set(self) -> bool:
        got = super().is_set()
        if got:
            self.seen = True
        return got

    def wait(self, timeout: float | None = None) -> bool:
        got = super().wait(timeout)
        if got:
            self.seen = True
        return got


class _Watched:
    """A command's connection under watch: its client's Ctrl-C or hang-up
    sets ``asked`` and ``stopping``; the server's stop, ``stopping``."""

    __slots__ = ("conn", "fd", "stopping", "asked", "fired")

    def __init__(self, conn: socket.socket, stopping: threading.Event,
                 asked: threading.Event) -> None:
        self.conn, self.fd = conn, conn.fileno()
        self.stopping, self.asked = stopping, asked
        self.fired = False


class _Watcher:
    """One thread watching the connections of every command a server runs:
    a command's client sends nothing after its request but a ``c`` (Ctrl-C),
    so anything readable (or a hang-up) asks its command to stop. One thread
    for all, not one per command: starting and joining a thread for each
    command cost a command under load (two CPUs, NBD clients writing, a
    session forming CGs) several waits for the GIL of 5 to 50 ms each.

    :meth:`watch` registers a connection without waking the thread: it
    looks at its connections every :data:`WATCH_INTERVAL_MS` while it has
    any (and for :data:`WATCH_IDLE` seconds after the last), and a command
    that is about to wait (queued for the lock, or a long command letting
    go of it) wakes it at once (:meth:`hurry`), so a client that hangs up
    or presses Ctrl-C while its command waits is seen at once. A short
    command ends before it is looked at: Ctrl-C then finds it finished."""

    def __init__(self, server_stopping: threading.Event) -> None:
        self._server_stopping = server_stopping
        self._entries: dict[int, _Watched] = {}
        self._guard = threading.Lock()
        self._wake_r, self._wake_w = os.pipe()
        os.set_blocking(self._wake_w, False)
        self._asleep = True         # in a poll without a timeout (or not started)
        self._closed = False
        self._thread = threading.Thread(target=self._loop, name="fastfc-control-watch",
                                        daemon=True)
        self._thread.start()

    def watch(self, conn: socket.socket, stopping: threading.Event,
              asked: threading.Event) -> _Watched:
        entry = _Watched(conn, stopping, asked)
        with self._guard:
            self._entries[entry.fd] = entry
            wake = self._asleep
            self._asleep = False
        if self._server_stopping.is_set():
            stopping.set()
        if wake:
            self.hurry()
        return entry

    def forget(self, entry: _Watched) -> None:
        """The command ended (before its connection closes): no longer
        watched (the thread drops it at its next look)."""
        with self._guard:
            if self._entries.get(entry.fd) is entry:
                del self._entries[entry.fd]
            entry.fired = True

    def hurry(self) -> None:
        """Look at the connections now (a command is about to wait)."""
        try:
            os.write(self._wake_w, b"w")
        except BlockingIOError:
            pass            # a full pipe wakes it already

    def server_stops(self) -> None:
        """The server stops: every command watched is told to end early."""
        with self._guard:
            entries = list(self._entries.values())
        for e in entries:
            e.stopping.set()
        self.hurry()

    def close(self) -> None:
        with self._guard:
            self._closed = True
        self.hurry()
        self._thread.join()
        os.close(self._wake_r)
        os.close(self._wake_w)

    def _loop(self) -> None:
        idle_since: float | None = None
        while True:
            with self._guard:
                if self._closed:
                    return
                watched = {fd: e for fd, e in self._entries.items() if not e.fired}
                now = time.monotonic()
                if watched:
                    idle_since = None
                elif idle_since is None:
                    idle_since = now
                sleep = idle_since is not None and now - idle_since >= WATCH_IDLE
                self._asleep = sleep
            if self._server_stopping.is_set():
                for e in watched.values():
                    e.stopping.set()
            poller = select.poll()
            poller.register(self._wake_r, select.POLLIN)
            for fd in watched:
                poller.register(fd, select.POLLIN | select.POLLHUP | select.POLLERR
                                | getattr(select, "POLLRDHUP", 0))
            try:
                ready = poller.poll(None if sleep else WATCH_INTERVAL_MS)
            except InterruptedError:
                continue
            for fd, events in ready:
                if fd == self._wake_r:
                    os.read(self._wake_r, 4096)
                    continue
                if events & select.POLLNVAL:
                    continue
                hit = watched.get(fd)
                with self._guard:
                    # the command still runs, on this connection (not a new
                    # one that took a closed one's descriptor meanwhile)
                    if hit is None or self._entries.get(fd) is not hit or hit.fired:
                        continue
                    hit.fired = True
                hit.asked.set()
                hit.stopping.set()


class _Host:
    def __init__(self, units: Units, lock: Any) -> None:
        if units.readonly:
            raise ValueError("a server hosts units it holds read-write, not read-only ones")
        if not hasattr(socket, "SO_PEERCRED"):
            raise OSError("a control socket needs SO_PEERCRED (Linux) to check its callers")
        self.units, self.lock = units, lock
        self._listeners: dict[Path, tuple[socket.socket, int]] = {}
        self._threads: list[threading.Thread] = []
        self._stopping = False
        self.stopping = threading.Event()   # for the commands running (Served.stopping)
        self._wake_r, self._wake_w = os.pipe()
        os.set_blocking(self._wake_w, False)    # a full pipe already wakes the loop
        self._accepting: threading.Thread | None = None
        self._routers: tuple[_Router, _Router] | None = None
        self._guard = threading.Lock()      # _listeners, _threads
        self._publishing = threading.Lock()     # one publish at a time
        self._env: _EnvRouter | None = None
        self._watcher: _Watcher | None = None
        #: connections taken at once; one more is refused (each holds a thread)
        self.max_connections = MAX_CONNECTIONS

    # -- lifetime ----------------------------------------------------------------------
    def __enter__(self) -> "_Host":
        out, err = _Router(sys.stdout), _Router(sys.stderr)
        sys.stdout, sys.stderr = out, err
        self._routers = (out, err)
        self._env = _EnvRouter(os.environ)
        setattr(os, "environ", self._env)
        try:
            self._watcher = _Watcher(self.stopping)
            with self.lock:
                self.publish()
            self._accepting = threading.Thread(target=self._accept_loop,
                                               name="fastfc-control", daemon=True)
            self._accepting.start()
        except BaseException:
            self._stop()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop()

    def _stop(self) -> None:
        """No new connections; the commands already received finish (one
        that runs for a while is told to end early: :attr:`Served.stopping`)."""
        self._stopping = True
        self.stopping.set()
        if self._watcher is not None:
            self._watcher.server_stops()
        self._wake()
        if self._accepting is not None:
            self._accepting.join()
        with self._guard:
            listeners, self._listeners = self._listeners, {}
        for directory, (sock, ino) in listeners.items():
            sock.close()
            _unlink_if(directory / SOCKET, ino)
        while True:
            with self._guard:
                threads = [t for t in self._threads if t.is_alive()]
            if not threads:
                break
            for t in threads:
                t.join()
        if self._watcher is not None:
            self._watcher.close()
        os.close(self._wake_r)
        os.close(self._wake_w)
        if self._routers is not None:
            out, err = self._routers
            if sys.stdout is out:
                sys.stdout = out.original
            if sys.stderr is err:
                sys.stderr = err.original
        if self._env is not None and os.environ is self._env:
            setattr(os, "environ", self._env.original)

    # -- sockets -----------------------------------------------------------------------
    def publish(self) -> None:
        """A control socket in each unit directory the server holds that has
        none yet (units a command opened join)."""
        with self._publishing:
            self._publish()

    def _publish(self) -> None:
        added = False
        for unit in list(self.units.open.values()):
            if unit.path is None or unit.readonly:
                continue
            with self._guard:
                if self._stopping or unit.path in self._listeners:
                    continue
            sock, ino = _listen(unit.path)
            with self._guard:
                self._listeners[unit.path] = (sock, ino)
            added = True
        if added:       # the accepting thread polls the new socket too
            self._wake()

    def _wake(self) -> None:
        try:
            os.write(self._wake_w, b"w")
        except BlockingIOError:
            pass

    def _accept_loop(self) -> None:
        next_look = time.monotonic() + REPUBLISH_INTERVAL
        while True:
            if time.monotonic() >= next_look:
                self._republish()
                next_look = time.monotonic() + REPUBLISH_INTERVAL
            with self._guard:
                listeners = {s.fileno(): s for s, _ in self._listeners.values()}
            # poll, not select: a server holding many volumes has descriptors
            # past select's 1024, where select.select refuses to watch them
            poller = select.poll()
            poller.register(self._wake_r, select.POLLIN)
            for fd in listeners:
                poller.register(fd, select.POLLIN)
            try:
                wait = max(0.0, next_look - time.monotonic())
                ready = [fd for fd, _ in poller.poll(wait * 1000)]
            except InterruptedError:
                ready = []
            if self._wake_r in ready:
                os.read(self._wake_r, 4096)
            if self._stopping:
                return
            for fd in ready:
                s = listeners.get(fd)
                if s is None:
                    continue
                try:
                    conn, _ = s.accept()
                except OSError as e:
                    if e.errno in (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM):
                        # out of descriptors: the client stays queued and select
                        # says ready at once again; back off instead of spinning
                        time.sleep(0.1)
                    continue
                with self._guard:
                    self._threads = [x for x in self._threads if x.is_alive()]
                    full = len(self._threads) >= self.max_connections
                if full:
                    self._turn_away(conn)
                    continue
                t = threading.Thread(target=self._serve_one, args=(conn,),
                                     name="fastfc-control-command", daemon=True)
                with self._guard:
                    self._threads.append(t)
                t.start()

    def _turn_away(self, conn: socket.socket) -> None:
        """One connection past :attr:`max_connections`: told so (if its
        socket takes the message at once) and closed, no thread spent."""
        try:
            conn.setblocking(False)
            _refuse(conn, f"Error: this server (pid {os.getpid()}) has "
                          f"{self.max_connections} commands running or queued: not "
                          "taking another now; try again\n")
        except OSError:
            pass
        finally:
            conn.close()

    def _republish(self) -> None:
        """Make ``control.sock`` again where it was removed or replaced
        under this server (the CLI would open the unit itself and find it
        busy, until the server restarted)."""
        with self._guard:
            listeners = dict(self._listeners)
        for directory, (old, ino) in listeners.items():
            try:
                if os.lstat(directory / SOCKET).st_ino == ino:
                    continue
            except FileNotFoundError:
                pass
            except OSError:
                continue
            try:
                sock, new_ino = _listen(directory)
            except OSError as e:
                print(f"fastfc serve: cannot make {directory / SOCKET} again: {e}",
                      file=sys.stderr)
                continue
            with self._guard:
                if self._stopping or self._listeners.get(directory) != (old, ino):
                    sock.close()
                    _unlink_if(directory / SOCKET, new_ino)
                    continue
                self._listeners[directory] = (sock, new_ino)
            old.close()

    # -- one command -------------------------------------------------------------------
    def _serve_one(self, conn: socket.socket) -> None:
        send_lock = threading.Lock()
        started = time.monotonic()
        who = "a client"
        try:
            with conn:
                pid, uid, _ = struct.unpack("3i", conn.getsockopt(
                    socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i")))
                who = f"pid {pid} uid {uid}"
                conn.settimeout(IO_TIMEOUT)
                try:
                    # all of it within IO_TIMEOUT, however it trickles in
                    frame = _read_frame(conn, MAX_REQUEST, time.monotonic() + IO_TIMEOUT)
                except ValueError as e:        # too large: say so, run nothing
                    log.warning("control connection from %s: refused: %s", who, e)
                    _refuse(conn, f"Error: this server runs no request: {e}\n")
                    return
                if frame is None or frame[0] != b"q":
                    log.info("control connection from %s: closed without a request", who)
                    return
                if uid != os.geteuid():
                    log.warning("control connection from %s: refused: another user", who)
                    _refuse(conn, f"Error: this server (pid {os.getpid()}, uid "
                                  f"{os.geteuid()}) runs commands only for its own "
                                  f"user, not uid {uid}\n")
                    return
                try:
                    request = _checked_request(frame[1])
                except ValueError as e:
                    log.warning("control connection from %s: a malformed request: %s", who, e)
                    _refuse(conn, f"Error: a malformed request, not run: {e}\n")
                    return
                line = " ".join([str(request.get("prog_name") or "fastfc"),
                                 *request["argv"]])
                log.info("control connection from %s: %s", who, line)
                status, how = self._run(conn, request, send_lock)
                log.info("control connection from %s: %s: exit status %d%s in %.3f s",
                         who, line, status, {"stopped": ", stopped early (Ctrl-C)",
                                             "not_run": ", not run (Ctrl-C while queued)"
                                             }.get(how or "", ""),
                         time.monotonic() - started)
                with send_lock:
                    _send_now(conn, b"x", json.dumps({"status": status, **(
                        {how: True} if how else {})}).encode())
        except (OSError, ValueError) as e:
            # the client went away, or sent garbage: nothing to answer
            log.info("control connection from %s: ended: %s", who, e or type(e).__name__)

    def _run(self, conn: socket.socket, request: dict, send_lock: threading.Lock
             ) -> tuple[int, str | None]:
        """The command's exit status, and whether it stopped early at its
        client's asking (``"stopped"``) or was not run (``"not_run"``).
        Meanwhile the server's watcher (:class:`_Watcher`) sets ``asked``
        and ``stopping`` once the client asks to stop the command (a ``c``
        frame: Ctrl-C) or hangs up (killed), ``stopping`` alone once the
        server stops: a command that runs for a while (``formcg
        --seconds``, ``waitflash``) then ends early."""
        stopping, asked = _Seen(), threading.Event()
        assert self._watcher is not None
        watched = self._watcher.watch(conn, stopping, asked)
        try:
            return self._run_one(conn, request, send_lock, stopping, asked)
        finally:
            self._watcher.forget(watched)

    def _run_one(self, conn: socket.socket, request: dict, send_lock: threading.Lock,
                 stopping: "_Seen", asked: threading.Event) -> tuple[int, str | None]:
        argv = [str(a) for a in request["argv"]]
        out = _ClientText(_Sink(conn, b"o", send_lock), **_stream_args(request["stdout"]))
        err = _ClientText(_Sink(conn, b"e", send_lock), **_stream_args(request["stderr"]))
        env = {str(k): str(v) for k, v in dict(request.get("env") or {}).items()
               if _env_wanted(str(k))}
        assert self._routers is not None and self._env is not None
        r_out, r_err = self._routers
        assert self._watcher is not None
        served = Served(self.units, str(request["cwd"]), stopping, self.lock, asked,
                        self._watcher.hurry)
        hooks = Running(asked, served.release)
        r_out.route(out)
        r_err.route(err)
        self._env.route(env)
        try:
            with running(hooks):
                status = _invoke(argv, str(request.get("prog_name") or "fastfc"), served, err)
            if served.not_run:
                return status, "not_run"
            try:
                self.publish()
            except OSError as e:
                err.write(f"warning: no control socket for a unit the command "
                          f"opened: {e}\n")
            stopped = asked.is_set() and (hooks.heeded or stopping.seen)
            return status, ("stopped" if stopped else None)
        finally:
            served.done()
            r_out.route(None)
            r_err.route(None)
            self._env.route(None)


# -- a command's connection, at the server: few system calls --------------------------
# Under load (NBD clients writing, a session forming CGs) each system call a
# command's thread makes lets go of the GIL and then waits for it again,
# often for milliseconds: the connection has a timeout, so the socket is
# non-blocking underneath, and these try the call once, directly, where
# socket.recv and sendall would first poll (two waits, and a third to set a
# timeout before each read).
def _read_exact(conn: socket.socket, n: int, deadline: float) -> bytes | None:
    """``n`` bytes of ``conn`` (non-blocking: it has a timeout), waiting
    while none are there, all by ``deadline``; None at the end of stream."""
    fd = conn.fileno()
    parts, left = [], n
    while left:
        try:
            got = os.read(fd, min(left, 1 << 20))
        except BlockingIOError:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise socket.timeout("the request did not arrive in time") from None
            poller = select.poll()
            poller.register(fd, select.POLLIN)
            poller.poll(remaining * 1000)
            continue
        if not got:
            return None
        parts.append(got)
        left -= len(got)
    return b"".join(parts)


def _read_frame(conn: socket.socket, limit: int, deadline: float
                ) -> tuple[bytes, bytes] | None:
    """One frame (no byte past it: a ``c`` may follow), or None at a clean
    end of stream; ``socket.timeout`` if it is not all in by ``deadline``,
    ValueError if it is larger than ``limit``."""
    head = _read_exact(conn, _HEADER.size, deadline)
    if head is None:
        return None
    kind, n = _HEADER.unpack(head)
    if n > limit:
        raise ValueError(f"a {n}-byte control frame is larger than {limit} bytes")
    body = _read_exact(conn, n, deadline) if n else b""
    if body is None:
        return None
    return kind, body


def _send_now(conn: socket.socket, kind: bytes, payload: bytes) -> None:
    """A frame to ``conn`` (non-blocking: it has a timeout): written at once
    when the socket takes it, the rest sent as :func:`_send` would (within
    the timeout)."""
    data = _HEADER.pack(kind, len(payload)) + payload
    try:
        done = os.write(conn.fileno(), data)
    except BlockingIOError:
        done = 0
    if done < len(data):
        conn.sendall(memoryview(data)[done:])


def _refuse(conn: socket.socket, message: str) -> None:
    """Answer a request that is not run: the message and exit status 1."""
    _send(conn, b"e", message.encode("utf-8", "replace"))
    _send(conn, b"x", b'{"status": 1}')


def _checked_request(body: bytes) -> dict:
    """The request a client sent, checked whole before anything runs (the
    ``fastfc`` client never sends a bad one; anything else may): ValueError
    naming what is wrong."""
    try:
        request = json.loads(body)
    except (ValueError, UnicodeDecodeError) as e:
        raise ValueError(f"not JSON ({e})") from None
    if not isinstance(request, dict):
        raise ValueError("not a JSON object")
    argv = request.get("argv")
    if not isinstance(argv, list) or not all(isinstance(a, str) for a in argv):
        raise ValueError("argv is not a list of strings")
    if not isinstance(request.get("cwd"), str):
        raise ValueError("no working directory (cwd)")
    env = request.get("env") or {}
    if not isinstance(env, dict):
        raise ValueError("env is not an object")
    for k, v in env.items():
        if not isinstance(v, str) or "\0" in k + v or "=" in k or not k:
            raise ValueError(f"environment variable {k!r} cannot be set")
    for name in ("stdout", "stderr"):
        stream = request.get(name)
        if not isinstance(stream, dict):
            raise ValueError(f"no {name} description")
        args = _stream_args(stream)
        try:
            codecs.lookup(args["encoding"])
            codecs.lookup_error(args["errors"])
        except LookupError as e:
            raise ValueError(f"{name}: {e}") from None
    return request


def _stream_args(d: dict) -> dict:
    return {"encoding": str(d.get("encoding") or "utf-8"),
            "errors": str(d.get("errors") or "strict"), "tty": bool(d.get("tty"))}


def long_group_options(argv: list[str], group: click.Group) -> list[str]:
    """``argv`` with the group's short options that take a value (``-u
    PATH``, ``-r PATH``) spelled long, up to the command's name: the same
    command to click, parsed without the ``NoSuchOption`` (a difflib search
    and gettext's look for four catalogue files) that click builds for each
    short option it first tries as a long one. A short option without its
    value, or joined to it (``-uPATH``), is left as typed, so every usage
    error reads as a direct run's."""
    takes_value: dict[str, str | None] = {}
    for p in group.params:
        if isinstance(p, click.Option) and not p.is_flag and not p.count:
            longs = [o for o in p.opts if o.startswith("--")]
            for o in p.opts:
                takes_value[o] = longs[0] if longs and not o.startswith("--") else None
    out = list(argv)
    i = 0
    while i < len(out) and out[i].startswith("-") and out[i] != "--":
        opt = out[i]
        if opt in takes_value and i + 1 < len(out):
            if takes_value[opt] is not None:
                out[i] = takes_value[opt]
            i += 2
        else:
            i += 1
    return out


def _invoke(argv: list[str], prog_name: str, served: Served, err: _ClientText) -> int:
    """Run the command as ``fastfc`` run directly would (click's standalone
    mode: usage errors, expected errors and exits as there), returning its
    exit status."""
    from . import main     # the group with every command registered
    try:
        main.main(args=long_group_options(argv, main), prog_name=prog_name,
                  standalone_mode=True, obj=served)
    except SystemExit as e:
        if e.code is None:
            return 0
        if isinstance(e.code, int):
            return e.code
        err.write(f"{e.code}\n")
        return 1
    except BaseException:       # a bug: the traceback a direct run would print
        err.write(traceback.format_exc())
        return 1
    return 0


def _listen(directory: Path) -> tuple[socket.socket, int]:
    """A listening socket at ``directory/control.sock``, mode 0600 from the
    moment that name exists: bound in a private 0700 directory, made 0600
    there, then renamed over whatever was there (a stale socket: this
    process holds the unit, so no one else serves it)."""
    private = Path(tempfile.mkdtemp(prefix=".control-", dir=directory))
    tmp = private / "s"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        with _reachable(tmp) as address:
            sock.bind(address)
        os.chmod(tmp, 0o600)
        sock.listen(64)
        ino = os.stat(tmp).st_ino
        os.rename(tmp, directory / SOCKET)
    except BaseException:
        sock.close()
        try:
            tmp.unlink()
        except FileNotFoundError:
            pass
        raise
    finally:
        private.rmdir()
    return sock, ino


def _unlink_if(path: Path, ino: int) -> None:
    """Remove ``path`` if it is still the socket this process made."""
    try:
        if os.stat(path).st_ino == ino:
            path.unlink()
    except FileNotFoundError:
        pass


def hosting(units: Units, lock: Any) -> _Host:
    """Carry out ``fastfc`` commands of other processes on ``units`` while
    the ``with`` block runs.

    ``units`` are the serving process's open units (read-write); ``lock``
    (a :class:`CommandLock`; a ``threading.RLock`` also does, every command
    then taking it alone) orders the commands against each other and the
    server's other work on them: take it exclusive to change units, shared
    to look units or volumes up. Each unit
    directory held gets a ``control.sock`` (0600; removed on exit); a unit
    a command opens joins. On exit no new command is accepted and those
    received finish. While hosting, ``sys.stdout`` and ``sys.stderr`` are
    routers that send each command's output to its client; replace them
    and forwarded output is lost.
    """
    return _Host(units, lock)
