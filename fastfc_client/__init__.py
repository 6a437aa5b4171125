"""The ``fastfc`` command's front door: a command for a unit that a server
holds goes to that server without importing the engine.

While ``fastfc serve`` holds a unit, every other ``fastfc -u UNIT ...``
command is carried out by the server (:mod:`fastfc.tools.cli.control`); the
client only copies the server's output and exit status. The full command
line (click, NumPy, the engine) costs a third of a second or more to import
before it gets there. So the ``fastfc`` console script starts here, with
the standard library alone: :func:`main` decides from the command line and
the environment whether the full command line would forward the command
(:func:`unit_to_forward`), and if so forwards it itself (:func:`forward`,
the client side of the control socket, which ``control.forward`` also
uses), with the same bytes, exit statuses, Ctrl-C handling and errors.
Anything else, and anything it is not sure of (a usage error to report,
``--help``, a variable the engine checks, no server holding the unit, a
socket it cannot use), it leaves to the full command line
(``fastfc.tools.cli.main``) before it has sent anything, so that reports it
as ever. Once a request is sent it never falls back: the command may have
run.

This package imports nothing of ``fastfc`` at the top: ``import fastfc``
imports the engine.
"""

from __future__ import annotations

import json
import os
import socket
import stat
import struct
import sys
import time
from typing import TYPE_CHECKING

if TYPE_CHECKING:   # typing and contextlib cost a start without them a tenth
    from typing import IO, Any, NoReturn

SOCKET = "control.sock"

#: Commands never forwarded: they open no unit, or are the server themselves.
LOCAL = frozenset({"serve", "demo", "bench", "applydiff"})

#: The commands a server carries out: every command of the full command
#: line but :data:`LOCAL` (tests/test_client.py holds the two to each other).
FORWARDED = frozenset({
    "chgmir", "commitflash", "diffflash", "failbackpprc", "failoverpprc", "formcg",
    "lsflash", "lsgmir", "lspoint", "lspprc", "lsvol", "mkflash", "mkgmir", "mkpoint",
    "mkpprc", "mkvol", "pausegmir", "pausepprc", "read", "recovergmir", "restoregmir",
    "restorepoint", "resumegmir", "resumepprc", "resyncflash", "reverseflash", "revertflash",
    "rmflash", "rmgmir", "rmpoint", "rmpprc", "rmvol", "showgmir", "showunit", "waitflash",
    "write"})

#: Environment variables a forwarded command takes from its client (besides
#: every ``FASTFC_*``): what decides how output looks.
ENV_KEYS = ("COLUMNS", "LINES", "TERM", "COLORTERM", "NO_COLOR", "FORCE_COLOR",
            "TTY_COMPATIBLE", "TTY_INTERACTIVE")

#: Seconds a client waits, after Ctrl-C, for the server to say it stopped
#: the command; then it says the outcome is unknown.
CANCEL_WAIT = 2.0

#: Variables the full command line looks at before it forwards (the
#: engine's kernels and copy threads, checked when it is imported; the
#: traceback of an error): with any of them set, it decides.
_FULL_ONLY = ("FASTFC_KERNELS", "FASTFC_COPY", "FASTFC_COPY_THREADS", "FASTFC_DEBUG")

#: commands whose --watch runs until Ctrl-C, which ends them with status 0
WATCHING = frozenset({"showgmir"})

_HEADER = struct.Struct(">cI")


class ServerGone(Exception):
    """The server closed the connection before the command's exit status
    (``control.ServerGone`` is what the full command line raises)."""


class UntrustedServer(Exception):
    """The control socket is not this user's (its file, or the process
    listening on it): nothing was sent to it."""


def env_wanted(key: str) -> bool:
    return key.startswith("FASTFC_") or key in ENV_KEYS


# -- the front door -------------------------------------------------------------------
def main(prog_name: str | None = None) -> NoReturn:
    """``fastfc``: forward the command here when the full command line
    would forward it, else run the full command line."""
    args = sys.argv[1:]
    prog = prog_name if prog_name is not None else _program_name()
    found = _parse(args, os.environ, prog) if prog is not None else None
    if found is not None and prog is not None:
        status = run_forwarded(found[0], args, prog, found[1])
        if status is not None:
            sys.exit(status)
    from fastfc.tools.cli import main as full
    if prog_name is None:
        full()
    else:
        full(prog_name=prog_name)
    sys.exit(0)         # not reached: click exits


def _program_name() -> str | None:
    """The name click gives the program run as a file (an entry point: the
    base name of ``argv[0]``); None run as ``python -m`` (click names it
    otherwise: the full command line says it)."""
    main_module = sys.modules.get("__main__")
    if getattr(main_module, "__package__", None) in (None, ""):
        return os.path.basename(sys.argv[0])
    return None


def unit_to_forward(args: list[str], env: Any, prog_name: str = "fastfc") -> str | None:
    """The unit whose server ``fastfc ARGS`` goes to when the full command
    line would forward it (the group's options well formed, a command a
    server carries out, a unit named); None when the full command line
    must decide (it may still forward: this only leaves it the cases it
    reports or treats otherwise)."""
    found = _parse(args, env, prog_name)
    return None if found is None else found[0]


def _parse(args: list[str], env: Any, prog_name: str) -> tuple[str, str] | None:
    """(unit, command) of :func:`unit_to_forward`, or None."""
    if any(k in env for k in _FULL_ONLY):
        return None
    complete = f"_{prog_name}_COMPLETE".replace("-", "_").replace(".", "_").upper()
    if complete in env:     # click's shell completion
        return None
    for key in ("FASTFC_UNIT", "FASTFC_DURABILITY"):
        if env.get(key) == "":
            return None     # click versions differ on an empty variable
    unit: str | None = env.get("FASTFC_UNIT")
    durability: str = env.get("FASTFC_DURABILITY") or "process"
    takes_value = {"-u": "unit", "--unit": "unit", "-r": "remote", "--remote-unit": "remote",
                   "--wait": "wait", "--durability": "durability"}
    i = 0
    while i < len(args):
        arg = args[i]
        if not arg.startswith("-") or arg == "-":
            break                               # the command
        if arg.startswith("--"):
            name, eq, value = arg.partition("=")
            if name not in takes_value:
                return None     # --help, --version, --, an unknown option: usage
            if not eq:
                if i + 1 >= len(args):
                    return None
                i += 1
                value = args[i]
        else:
            name, value = arg[:2], arg[2:]
            if name not in takes_value:
                return None                     # -h, an unknown option
            if not value:
                if i + 1 >= len(args):
                    return None
                i += 1
                value = args[i]
        if not value or value.startswith("-"):
            return None
        what = takes_value[name]
        if what == "unit":
            unit = value
        elif what == "durability":
            durability = value
        elif what == "wait" and not _plain_number(value):
            return None
        i += 1
    if i >= len(args) or args[i] not in FORWARDED:
        return None             # no command (help), an unknown one, or one run here
    if unit is None or durability not in ("process", "power"):
        return None
    return unit, args[i]


def _plain_number(value: str) -> bool:
    whole, _, part = value.partition(".")
    return whole.isdigit() and whole.isascii() and (not part or (part.isdigit()
                                                                  and part.isascii()))


def run_forwarded(unit: str, args: list[str], prog_name: str, command: str, *,
                  stdout: Any = None, stderr: Any = None) -> int | None:
    """The exit status of ``prog_name ARGS`` (``command`` and the rest)
    carried out by the server holding ``unit``, its output written to
    ``stdout`` and ``stderr`` (text streams with a binary ``buffer``;
    default ``sys.stdout`` and ``sys.stderr``); None when nothing was sent
    (no server, or a socket this client leaves to the full command line)."""
    out = sys.stdout if stdout is None else stdout
    err = sys.stderr if stderr is None else stderr
    out_bin, err_bin = getattr(out, "buffer", None), getattr(err, "buffer", None)
    if out_bin is None or err_bin is None:
        return None     # no standard stream (or not a file's): the full command line
    for stream in (out, err):
        stream.flush()
    try:
        try:
            sock = connect(unit)
        except (OSError, UntrustedServer):
            return None     # the full command line says what is wrong
        if sock is None:
            return None
        try:
            return exchange(sock, unit, args, prog_name, stdout=out_bin, stderr=err_bin,
                            stdout_text=out, stderr_text=err)
        finally:
            sock.close()
    except KeyboardInterrupt:       # outside the exchange's own (connecting, say)
        if not watching(command, args):
            _aborted(err)
            return 1
        return watch_ended(out)
    except ServerGone as e:
        _click_error(str(e), err)
        return 1
    except Exception as e:      # what the full command line reports in one line
        from fastfc.tools.cli.app import EXPECTED_ERRORS, _one_line
        if not isinstance(e, EXPECTED_ERRORS):
            raise
        _click_error(_one_line(e), err)
        return 1


def watching(command: str | None, args: list[str]) -> bool:
    """Whether ``command`` (of ``args``) is a --watch that Ctrl-C ends
    (with status 0)."""
    return command in WATCHING and any(a == "--watch" or a.startswith("--watch=")
                                       for a in args)


def watch_ended(out: Any) -> int:
    """A --watch ended by Ctrl-C (the server ends its side: the client hung
    up): the cursor a live display hid on this terminal is shown again;
    the exit status, 0."""
    try:
        if out.isatty():
            out.write("\x1b[?25h\n")
            out.flush()
    except (AttributeError, ValueError, OSError):
        pass
    return 0


def _click_error(message: str, err: Any) -> None:
    """``Error: message`` on ``err``, as click shows an error (imported
    only on this path)."""
    import click
    click.ClickException(message).show(file=err)


def _aborted(err: Any) -> None:
    """What click's standalone mode says of a Ctrl-C it catches: a blank
    line (closing the terminal's ``^C``), then ``Aborted!``."""
    import click
    click.echo(file=err)
    click.echo("Aborted!", file=err)


# -- the client side of the control socket ---------------------------------------------
def _send(sock: socket.socket, kind: bytes, payload: bytes) -> None:
    sock.sendall(_HEADER.pack(kind, len(payload)) + payload)


def _recv_exact(sock: socket.socket, n: int, deadline: float | None = None) -> bytes | None:
    parts, left = [], n
    while left:
        if deadline is not None:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise socket.timeout("the request did not arrive in time")
            sock.settimeout(remaining)
        got = sock.recv(min(left, 1 << 20))
        if not got:
            return None
        parts.append(got)
        left -= len(got)
    return b"".join(parts)


def _recv(sock: socket.socket, limit: int | None = None, deadline: float | None = None
          ) -> tuple[bytes, bytes] | None:
    """One frame, or None at a clean end of stream; ``socket.timeout`` if
    it is not all in by ``deadline`` (``time.monotonic()``)."""
    head = _recv_exact(sock, _HEADER.size, deadline)
    if head is None:
        return None
    kind, n = _HEADER.unpack(head)
    if limit is not None and n > limit:
        raise ValueError(f"a {n}-byte control frame is larger than {limit} bytes")
    body = _recv_exact(sock, n, deadline)
    if body is None:
        return None
    return kind, body


class _reachable:
    """``with _reachable(path) as address``: a name for ``path`` that fits
    in a unix socket address (108 bytes): the path itself, or for a long
    one ``/proc/self/fd/N/NAME`` through a descriptor of its directory
    (Linux), closed at the end of the block."""

    def __init__(self, path: str | os.PathLike) -> None:
        self._path = os.fspath(path)
        self._fd: int | None = None

    def __enter__(self) -> str:
        if len(os.fsencode(self._path)) < 100:
            return self._path
        directory, base = os.path.split(self._path)
        self._fd = os.open(directory or ".", os.O_PATH | os.O_DIRECTORY)
        return f"/proc/self/fd/{self._fd}/{base}"

    def __exit__(self, *exc: object) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None


def _socket_path(unit: str | os.PathLike) -> str:
    """``UNIT/control.sock`` as the messages name it (a ``pathlib`` path)."""
    from pathlib import Path
    return str(Path(unit) / SOCKET)


def _check_server(sock: socket.socket, path: str, unit: str | os.PathLike) -> None:
    """Refuse a control socket that another user made or listens on: it
    would get this user's command line, working directory, environment and
    payloads, and could answer anything. A server of this user is what
    ``fastfc serve`` run by this user makes (and it serves only its user)."""
    me = os.geteuid()
    pid, uid, _ = struct.unpack("3i", sock.getsockopt(
        socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i")))
    try:
        owner = os.stat(path).st_uid
    except OSError:
        owner = uid
    for what, who in (("is owned by", owner), (f"is listened on by pid {pid} of", uid)):
        if who != me:
            raise UntrustedServer(
                f"the control socket {_socket_path(unit)} of unit {unit} {what} uid {who} "
                f"({_user(who)}), not this user (uid {me}): sent it nothing. A server of "
                "yours makes that socket; if none holds the unit, remove the socket (and "
                "look into who can write to the unit directory)")


def _user(uid: int) -> str:
    try:
        import pwd
        return pwd.getpwuid(uid).pw_name
    except (KeyError, ImportError):
        return "no such user"


def connect(unit: str | os.PathLike) -> socket.socket | None:
    """A connection to the server holding ``unit``, checked to be this
    user's (:class:`UntrustedServer` if not); None when no server holds it
    (no ``control.sock``, or one that refuses connections: a stale socket
    is left where it is, it is the next server's to replace).
    PermissionError when the unit or its socket is not open to this user."""
    path = os.path.join(os.fspath(unit), SOCKET)
    try:
        if not stat.S_ISSOCK(os.stat(path).st_mode):
            return None
    except (FileNotFoundError, NotADirectoryError):
        return None
    except PermissionError as e:
        raise PermissionError(e.errno, f"cannot reach the unit {unit}: {e.strerror}") \
            from None
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        try:
            with _reachable(path) as address:
                sock.connect(address)
        except (ConnectionRefusedError, FileNotFoundError):
            sock.close()
            return None         # stale: its server is gone
        except PermissionError as e:
            raise PermissionError(
                e.errno, f"cannot reach the server holding {unit}: its control socket "
                f"{_socket_path(unit)} is not open to this user ({e.strerror})") from None
        _check_server(sock, path, unit)
    except BaseException:
        sock.close()
        raise
    return sock


def exchange(sock: socket.socket, unit: str | os.PathLike, argv: list[str], prog_name: str,
             *, stdout: IO[bytes], stderr: IO[bytes], stdout_text: Any = None,
             stderr_text: Any = None, cancel_wait: float | None = None) -> int:
    """Send ``prog_name argv`` to the server on ``sock``, copy what it
    prints to ``stdout`` and ``stderr`` (binary streams) and return its exit
    status; on Ctrl-C, ask the server to stop the command
    (:func:`_stop_in_server`: 130). ``stdout_text`` and ``stderr_text`` are
    the text streams the command would have written to (their encoding and
    whether they are a terminal are sent along); default: ``sys.stdout``
    and ``sys.stderr``."""
    try:
        _send(sock, b"q", json.dumps(_request(argv, prog_name, stdout_text, stderr_text,
                                              stdout, stderr)).encode())
    except (BrokenPipeError, ConnectionResetError):
        pass    # refused before reading it: what the server said is still there
    try:
        return int(_replies(sock, unit, stdout, stderr)["status"])
    except KeyboardInterrupt:
        return _stop_in_server(sock, unit, stdout, stderr,
                               CANCEL_WAIT if cancel_wait is None else cancel_wait)


def forward(unit: str | os.PathLike, argv: list[str], prog_name: str, *,
            stdout: IO[bytes], stderr: IO[bytes], stdout_text: Any = None,
            stderr_text: Any = None, cancel_wait: float | None = None) -> int | None:
    """:func:`connect`, then :func:`exchange`: the exit status of the
    command carried out by the server holding ``unit``, or None when no
    server holds it."""
    sock = connect(unit)
    if sock is None:
        return None
    try:
        return exchange(sock, unit, argv, prog_name, stdout=stdout, stderr=stderr,
                        stdout_text=stdout_text, stderr_text=stderr_text,
                        cancel_wait=cancel_wait)
    finally:
        sock.close()


def _replies(sock: socket.socket, unit: str | os.PathLike, stdout: IO[bytes],
             stderr: IO[bytes], deadline: float | None = None) -> dict:
    """Copy the server's output frames until its exit frame: that (JSON)."""
    while True:
        frame = _recv(sock, deadline=deadline)
        if frame is None:
            raise ServerGone(
                f"the server holding {unit} closed the connection before the command "
                "finished: what it did is unknown (look with the ls* and show* "
                "commands)")
        kind, body = frame
        if kind == b"o":
            stdout.write(body)
            stdout.flush()
        elif kind == b"e":
            stderr.write(body)
            stderr.flush()
        elif kind == b"x":
            reply: dict = json.loads(body)
            return reply
        else:
            raise ServerGone(f"the server holding {unit} sent a frame of unknown kind "
                             f"{kind!r}")


def _stop_in_server(sock: socket.socket, unit: str | os.PathLike, stdout: IO[bytes],
                    stderr: IO[bytes], cancel_wait: float = CANCEL_WAIT) -> int:
    """Ctrl-C of a forwarded command: ask the server to stop it, wait up to
    ``cancel_wait`` seconds for its answer (its output still copied), say in
    one line what became of it; exit status 130."""
    line = (f"fastfc: Ctrl-C: the server holding {unit} did not say whether it stopped "
            "the command: its outcome is unknown (look with the ls* and show* commands)")
    try:
        try:
            _send(sock, b"c", b"")
        except OSError:
            pass        # gone already: its answer may still be there to read
        reply = _replies(sock, unit, stdout, stderr, time.monotonic() + cancel_wait)
        status = reply.get("status")
        if reply.get("not_run"):
            line = (f"fastfc: Ctrl-C: the server holding {unit} did not run the command "
                    "(it was waiting for its turn): nothing changed")
        elif reply.get("stopped"):
            line = (f"fastfc: Ctrl-C: the command was stopped in the server holding {unit} "
                    f"(exit status {status} there; what it left is said above)")
        else:
            line = (f"fastfc: Ctrl-C: the server holding {unit} had finished the command "
                    f"before it could stop it (exit status {status} there)")
    except (KeyboardInterrupt, OSError, ValueError, ServerGone):
        pass            # a second Ctrl-C, no answer in time, or the server gone
    try:
        stderr.write((line + "\n").encode("utf-8", "replace"))
        stderr.flush()
    except (OSError, ValueError):
        pass
    return 130


def _request(argv: list[str], prog_name: str, out: Any, err: Any,
             out_bin: IO[bytes], err_bin: IO[bytes]) -> dict:
    out = sys.stdout if out is None else out
    err = sys.stderr if err is None else err
    env = {k: v for k, v in os.environ.items() if env_wanted(k)}
    streams = {}
    for name, text in (("stdout", out), ("stderr", err)):
        tty = _isatty(text)
        streams[name] = {"encoding": getattr(text, "encoding", None) or "utf-8",
                         "errors": getattr(text, "errors", None) or "strict",
                         "tty": tty}
        if tty and "COLUMNS" not in env:   # the server has no terminal to measure
            try:
                size = os.get_terminal_size(text.fileno())
                if size.columns > 0 and size.lines > 0:     # 0 x 0: a terminal not sized
                    env["COLUMNS"], env["LINES"] = str(size.columns), str(size.lines)
            except (OSError, ValueError, AttributeError):
                pass
    return {"argv": list(argv), "prog_name": prog_name, "cwd": os.getcwd(), "env": env,
            **streams}


def _isatty(stream: Any) -> bool:
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError, OSError):
        return False
