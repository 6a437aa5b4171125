"""serve: export every volume of the open units over NBD until SIGTERM/SIGINT.

The seam for other services (the control socket that carries the other
``fastfc -u UNIT ...`` commands to a serving process) is :class:`Server`:
its ``units`` are the open units, its ``loops`` the Global Mirror loops
it runs (``resumegmir``), its ``copies`` the background copies it moves
on (:mod:`.copies`), its ``lock`` (a :class:`~.control.CommandLock`:
exclusive for whatever changes them, shared for commands that only look
and the NBD server's export lookups), and ``services`` (context
managers entered before the NBD server listens, so that a client that sees
its socket finds them running, and left, in reverse order, before it
stops) are where they run.
"""

from __future__ import annotations

import contextlib
import ipaddress
import logging
import os
import queue
import signal
import ssl
import sys
import threading
import time
from typing import Any, Callable, ContextManager

import click

from fastfc.tools.nbd import NBDServer, Turn, exports_of

from .app import main
from .control import CommandLock, hosting
from .copies import CopyDrivers
from . import metrics
from .loops import SessionLoops
from .units import Units, pass_units

log = logging.getLogger("fastfc.serve")

LOG_LEVELS = ("debug", "info", "warning", "error")


class Server:
    """One serving process: the open ``units``, the ``lock`` taken
    exclusive to change them and shared to look (the NBD server's lookups,
    commands that only look), the NBD server, and the other ``services``
    running beside it (context managers)."""

    def __init__(self, units: Units, *, tls: ssl.SSLContext | None = None) -> None:
        self.units = units
        self.lock = CommandLock()
        units.all()                     # open the local unit and its partners now
        lookup, names = exports_of(lambda: list(self.units.open.values()))
        # turns: the NBD connections carry out their requests one batch at a
        # time, and a Global Mirror session's CG attempt takes a turn too
        self.turn = Turn()
        self.nbd = NBDServer(lookup, names, self.lock.reader(), tls=tls, turn=self.turn)
        # the control socket: other fastfc commands naming these units run here
        # Global Mirror loops (resumegmir) run here, beside the commands
        self.loops = units.loops = SessionLoops(self.turn)
        # background copies (FlashCopy, PPRC initial copy, resync and Global
        # Copy) move on here, with no command running
        self.copies = units.copies = CopyDrivers()
        # the sessions recorded as running resume first; then the control
        # socket, through which other fastfc commands naming these units run here
        self.services: list[Callable[[], ContextManager[Any]]] = [
            lambda: self.loops.serving(self.units, self.lock),
            lambda: self.copies.serving(self.units, self.lock),
            lambda: hosting(self.units, self.lock)]

    def flush(self) -> None:
        with self.lock:
            for unit in list(self.units.open.values()):
                if not unit.readonly:
                    unit.flush()


def _tls_context(cert: str | None, key: str | None, psk: str | None,
                 client_ca: str | None = None) -> ssl.SSLContext | None:
    if psk is not None:
        raise click.ClickException(
            "--tls-psk: Python's ssl module (3.11) offers no TLS-PSK server, so fastfc "
            "serve cannot do PSK; use --tls-cert/--tls-key (X.509 certificates)")
    if cert is None and key is None:
        if client_ca is not None:
            raise click.UsageError("--tls-client-ca goes with --tls-cert/--tls-key")
        return None
    if cert is None or key is None:
        raise click.UsageError("--tls-cert and --tls-key go together")
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    try:
        ctx.load_cert_chain(cert, key)
    except (OSError, ssl.SSLError) as e:
        raise click.ClickException(f"--tls-cert {cert} --tls-key {key}: {e}") from None
    if client_ca is not None:
        # clients prove who they are: a certificate this CA signed
        ctx.verify_mode = ssl.CERT_REQUIRED
        try:
            ctx.load_verify_locations(cafile=client_ca)
        except (OSError, ssl.SSLError) as e:
            raise click.ClickException(f"--tls-client-ca {client_ca}: {e}") from None
    return ctx


@main.command()
@click.option("--socket", "socket_path", type=click.Path(dir_okay=False), metavar="PATH",
              help="Serve on this unix socket (mode 0600).")
@click.option("--port", type=click.IntRange(0, 65535), default=None,
              help="Serve on this TCP port too (0: any free port, printed).")
@click.option("--bind", default="127.0.0.1", show_default=True, metavar="ADDR",
              help="The address --port listens on.")
@click.option("--log-level", type=click.Choice(LOG_LEVELS), default="info", show_default=True,
              help="What the server logs to stderr: info logs each control and NBD "
                   "connection, the start and the stop; warning only what went wrong.")
@click.option("--allow-plain-tcp", is_flag=True,
              help="Serve --port without TLS: every local user (loopback is no trust "
                   "boundary on a shared host) can read and write every volume.")
@click.option("--allow-remote-plain", is_flag=True,
              help="With --allow-plain-tcp: allow it on a non-loopback --bind address "
                   "(anyone on the network can read and write every volume).")
@click.option("--tls-cert", type=click.Path(exists=True, dir_okay=False), default=None,
              help="TLS certificate (PEM): clients must use NBD_OPT_STARTTLS.")
@click.option("--tls-key", type=click.Path(exists=True, dir_okay=False), default=None,
              help="The certificate's private key (PEM).")
@click.option("--tls-client-ca", type=click.Path(exists=True, dir_okay=False), default=None,
              metavar="FILE",
              help="With --tls-cert: clients must present a certificate signed by this CA "
                   "(PEM); without it TLS encrypts but anyone may connect.")
@click.option("--allow-anonymous-tls", is_flag=True,
              help="Allow TLS without --tls-client-ca on a non-loopback --bind address.")
@click.option("--tls-psk", type=click.Path(dir_okay=False), default=None,
              help="TLS with a pre-shared key: not available (Python's ssl has no PSK).")
@click.option("--metrics-port", type=click.IntRange(0, 65535), default=None, metavar="PORT",
              help="Serve GET /metrics (Prometheus text format) on this TCP port (0: any "
                   "free port, printed).")
@click.option("--metrics-host", default="127.0.0.1", show_default=True, metavar="ADDR",
              help="The address --metrics-port listens on.")
@pass_units
def serve(units, socket_path, port, bind, log_level, allow_plain_tcp, allow_remote_plain,
          tls_cert, tls_key, tls_client_ca, allow_anonymous_tls, tls_psk, metrics_port,
          metrics_host) -> None:
    """Export every volume over NBD, until SIGTERM or SIGINT.

    Each volume of the unit(s) is an export named after it
    (nbd+unix:///NAME?socket=PATH); volumes created while serving appear,
    removed ones disappear. Plain TCP (--port without TLS) is open to every
    local user, so it needs --allow-plain-tcp; to share volumes, use TLS with
    client certificates (--tls-client-ca). PPRC secondaries, targets with --tgtinhibit and
    the C volumes of Global Mirror sessions are read-only. A write to a
    write-inhibited volume fails with EPERM, a read of a volume with no
    valid image with EIO. FLUSH syncs the volume, its FlashCopy targets and
    bitmaps; a write is answered only once it is in the volume.

    Block status, to clients that negotiate structured replies (nbdinfo
    --map, qemu-img map, nbdcopy): base:allocation (the holes of thin
    volumes), qemu:dirty-bitmap:T (the grains a FlashCopy with --record
    onto T has recorded, on its source and target) and qemu:dirty-bitmap:B
    (a PPRC pair's out-of-sync grains, on its primary; B its secondary).

    Global Mirror sessions the units record as running (resumegmir) resume
    before the server listens, a line on stderr naming each.

    Background copies move on in the server with no other command: COPY-mode
    FlashCopy relationships (at their --copy-rate), PPRC initial copy, resync
    and Global Copy, for those the units restore and those commands make.

    SIGTERM or SIGINT: stop accepting, finish the requests in flight, stop
    the sessions' loops (they resume with the next server) and the
    background copies (the next server carries on), flush, close the units,
    exit 0.

    --metrics-port: per session RPO, CGs by outcome and cause, bytes
    drained and RPO alerts, per export requests, bytes and latency, at
    http://ADDR:PORT/metrics (:mod:`fastfc.tools.cli.metrics`)."""
    if socket_path is None and port is None:
        raise click.UsageError("give --socket PATH, or --port N (or both)")
    tls = _tls_context(tls_cert, tls_key, tls_psk, tls_client_ca)
    if port is not None and tls is None and not allow_plain_tcp:
        raise click.ClickException(
            f"--port {port} without TLS: plain NBD lets every user of this host (loopback "
            "is no trust boundary) read and write every volume. Share volumes with TLS and "
            "client certificates (--tls-cert/--tls-key with --tls-client-ca), keep to the "
            "0600 --socket, or say --allow-plain-tcp")
    if port is not None and tls is None and not allow_remote_plain and not _loopback(bind):
        raise click.ClickException(
            f"--bind {bind} is not a loopback address: plain NBD there lets anyone on the "
            "network read and write every volume; use --tls-cert/--tls-key with "
            "--tls-client-ca, or say "
            "--allow-remote-plain")
    if (port is not None and tls is not None and tls_client_ca is None
            and not allow_anonymous_tls and not _loopback(bind)):
        raise click.ClickException(
            f"--bind {bind} is not a loopback address: TLS without client certificates "
            "encrypts, but lets anyone who reaches the port read and write every volume; "
            "give --tls-client-ca FILE (clients present a certificate it signed), or say "
            "--allow-anonymous-tls")
    handler = _log_to_stderr(log_level)
    stop = threading.Event()
    why: list[str] = []
    started = time.monotonic()

    def on_signal(signum, frame) -> None:
        why.append(signal.Signals(signum).name)
        stop.set()

    old = {s: signal.signal(s, on_signal) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        server = Server(units, tls=tls)
        nbd = server.nbd
        if metrics_port is not None:
            server.services.append(lambda: metrics.serving(
                server.units, server.loops, server.nbd, metrics_host, metrics_port))
        with contextlib.ExitStack() as services:
            # other services (the control socket) first: once the NBD socket
            # exists, other fastfc commands naming these units reach this server
            for service in server.services:
                services.enter_context(service())
            if socket_path is not None:
                nbd.listen_unix(socket_path)
            bound = nbd.listen_tcp(bind, port) if port is not None else None
            nbd.start()
            try:
                where = [f"unix socket {socket_path}"] if socket_path else []
                if bound is not None:
                    where.append(f"tcp {bind}:{bound}" + (" (TLS)" if tls else ""))
                with server.lock.shared():  # commands may be changing the units already
                    names = [n for n, _ in nbd.names()]
                    held = [str(u.path) for u in server.units.open.values()]
                click.echo(f"serving {len(names)} volume(s) over NBD on {' and '.join(where)}"
                           f" (pid {os.getpid()})", err=True)
                for note in server.loops.notes:
                    click.echo(note, err=True)
                sys.stderr.flush()
                log.info("started (pid %d): units %s; %d export(s): %s; NBD on %s; a "
                         "control socket in each unit directory", os.getpid(),
                         ", ".join(held), len(names), ", ".join(names) or "none",
                         " and ".join(where))
                for note in server.loops.notes:
                    log.info("%s", note)
                while not stop.wait(0.5):
                    pass
                log.info("stopping (%s): no new commands or NBD connections; finishing "
                         "those in flight", why[0] if why else "asked")
                services.close()       # other services first: no command after this
            finally:
                nbd.stop()              # in-flight requests are answered first
        server.flush()
        log.info("stopped (%s) after %.1f s: the units are flushed and closed",
                 why[0] if why else "asked", time.monotonic() - started)
    finally:
        for s, h in old.items():
            signal.signal(s, h)
        if handler is not None:
            handler.close()


def _log_to_stderr(level: str) -> "_LogLines | None":
    """The ``fastfc`` loggers (``fastfc.serve``, ``fastfc.control``,
    ``fastfc.nbd``) to stderr at ``level``, one line a record: time, level,
    logger. The handler added, to be closed when the server stops (None if
    the process configured logging already: a test, an embedding)."""
    logger = logging.getLogger("fastfc")
    logger.setLevel(getattr(logging, level.upper()))
    if logger.handlers:
        return None
    handler = _LogLines()
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    logger.addHandler(handler)
    return handler


class _LogLines(logging.Handler):
    """Log lines written to the server's own stderr by a thread of their
    own (even while forwarded commands' output is routed by thread: a line
    from a command's thread is the server's, not its client's). A stderr
    nobody reads (a full pipe) never stalls the server: past
    :attr:`LIMIT` lines waiting, lines are dropped, and a line says how
    many once stderr takes them again."""

    LIMIT = 10000

    def __init__(self) -> None:
        super().__init__()
        self._lines: queue.Queue[str | None] = queue.Queue(self.LIMIT)
        self._dropped = 0
        self._thread = threading.Thread(target=self._write, name="fastfc-log", daemon=True)
        self._thread.start()

    def emit(self, record: logging.LogRecord) -> None:
        try:
            line = self.format(record)
        except Exception:
            self.handleError(record)
            return
        try:
            self._lines.put_nowait(line)
        except queue.Full:
            self._dropped += 1

    def _write(self) -> None:
        while (line := self._lines.get()) is not None:
            stream = getattr(sys.stderr, "original", sys.stderr)
            try:
                dropped, self._dropped = self._dropped, 0
                if dropped:
                    stream.write(f"({dropped} log lines dropped: stderr did not take them)\n")
                stream.write(line + "\n")
                stream.flush()
            except (OSError, ValueError):
                pass

    def close(self, wait: float = 2.0) -> None:
        """Write what is queued (for up to ``wait`` seconds), then stop."""
        logging.getLogger("fastfc").removeHandler(self)
        try:
            self._lines.put(None, timeout=wait)
        except queue.Full:
            pass
        self._thread.join(wait)
        super().close()


def _loopback(bind: str) -> bool:
    if bind == "localhost":
        return True
    try:
        return ipaddress.ip_address(bind).is_loopback
    except ValueError:
        return False
