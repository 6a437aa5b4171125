"""The control socket: while a process holds a unit, ``fastfc -u UNIT ...``
commands are carried out by it, with the output and exit status of a direct
run; without one (or with a stale socket), commands open the unit
themselves.

The holder is ``fastfc serve`` (:func:`start_holder`); some tests host in
this process with ``control.hosting``, the call ``serve`` makes, to look
into the server's units or to stand in for a client of another user.
"""

from __future__ import annotations

import io
import json
import os
import re
import shutil
import signal
import socket
import stat
import struct
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import pytest
from click.testing import CliRunner

import fastfc_client

from fastfc.tools.cli import main
from fastfc.tools.cli import control
from fastfc.tools.cli.units import Units

TS = "4K"
ROOT = Path(__file__).resolve().parent.parent
FULL = [sys.executable, "-m", "fastfc"]


# -- a holder process ------------------------------------------------------------------
class Holder:
    """A ``fastfc serve`` process (its own process group)."""

    def __init__(self, proc: subprocess.Popen, scratch: Path) -> None:
        self.proc, self.scratch = proc, scratch

    def stop(self, sig: int = signal.SIGTERM) -> int:
        if self.proc.poll() is None:
            os.kill(self.proc.pid, sig)
        try:
            try:
                return self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                # where it hangs: SIGABRT makes faulthandler dump every thread
                os.kill(self.proc.pid, signal.SIGABRT)
                _, err = self.proc.communicate(timeout=30)
                raise AssertionError(f"fastfc serve did not stop within 30 s of "
                                     f"{signal.Signals(sig).name}; its threads:\n"
                                     f"{err[-20000:]}") from None
        finally:
            for stream in (self.proc.stdout, self.proc.stderr):
                if stream is not None:
                    stream.close()
            shutil.rmtree(self.scratch, ignore_errors=True)


def start_holder(unit: Path, remote: Path | None = None) -> Holder:
    """Start ``fastfc serve`` holding ``unit`` (and the units its pairs
    span); returns once it serves (its control sockets exist by then)."""
    nbd = Path(tempfile.mkdtemp(prefix="fastfc-nbd-")) / "nbd.sock"
    args = [sys.executable, "-m", "fastfc", "-u", str(unit),
            *(["-r", str(remote)] if remote else []), "serve", "--socket", str(nbd)]
    proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            start_new_session=True, text=True,
                            env={**os.environ, "PYTHONFAULTHANDLER": "1"})
    line = proc.stderr.readline()    # type: ignore[union-attr]
    if not line.startswith("serving "):
        proc.kill()
        out, err = proc.communicate(timeout=30)
        raise AssertionError(f"fastfc serve did not start: {line!r} {out} {err}")
    return Holder(proc, nbd.parent)


@pytest.fixture
def holders():
    started: list[Holder] = []

    def start(unit, remote=None):
        h = start_holder(unit, remote)
        started.append(h)
        return h

    yield start
    for h in started:
        if h.proc.poll() is None:
            os.killpg(h.proc.pid, signal.SIGKILL)
            h.proc.wait()
        shutil.rmtree(h.scratch, ignore_errors=True)


def run(*args, code=None):
    """One ``fastfc`` invocation in this process (CliRunner)."""
    result = CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)
    if code is not None:
        assert result.exit_code == code, (result.stdout, result.stderr)
    return result


def make_site(base: Path) -> None:
    """Two units under ``base``: u (a..e, ga) and r (s1, gb, gc)."""
    base.mkdir()
    run("-u", base / "u", "mkvol", "a", "b", "c", "ga", "--tracks", 8, "--track-size", TS,
        code=0)
    run("-u", base / "r", "mkvol", "s1", "gb", "gc", "--tracks", 8, "--track-size", TS,
        code=0)
    run("-u", base / "u", "write", "a", "base", code=0)


# Every command, errors included; "-r" marks commands given --remote-unit r.
# A True in the third place: output with timings or free space (numbers masked).
SCENARIO: list[tuple[list, bool, bool]] = [
    (["lsvol"], False, False),
    (["lsvol", "--json"], False, False),
    (["mkvol", "d", "--tracks", 4, "--track-size", TS], False, False),
    (["mkvol", "d", "--tracks", 4], False, False),                   # exists: 1
    (["mkvol", "e"], False, False),                                   # usage: 2
    (["mkvol", "Bad/Name", "--tracks", 1], False, False),             # bad value: 2
    (["mkvol", "huge", "--size", "1000T", "--track-size", "16M"], False, True),  # no room
    (["write", "a", "hello, world", "--offset", 100], False, False),
    (["write", "a", "x" * 10, "--offset", 32 * 1024 - 4], False, False),  # past end: 1
    (["write", "nosuch", "x"], False, False),                         # unknown volume: 1
    (["read", "a", "--length", 160], False, False),
    (["read", "a", "--sha256"], False, False),
    (["read", "a", "--offset", 1 << 20], False, False),
    (["mkflash", "a:b", "--record"], False, False),
    (["mkflash", "a:zz"], False, False),
    (["lsflash"], False, False),
    (["lsflash", "--json"], False, False),
    (["write", "a", "after the flash", "--offset", 8192], False, False),
    (["read", "b", "--offset", 8192, "--length", 32], False, False),
    (["resyncflash", "a:b", "--revertible"], False, False),
    (["commitflash", "a:b"], False, False),
    (["resyncflash", "a:b", "--revertible"], False, False),
    (["revertflash", "a:b"], False, False),
    (["commitflash", "a:b"], False, False),                           # not revertible: 1
    (["waitflash", "a:b"], False, False),
    (["reverseflash", "a:b"], False, False),
    (["rmflash", "a:b"], False, False),
    (["rmflash", "a:b"], False, False),                               # gone: 1
    (["mkpprc", "c:s1", "--type", "mmir", "--wait"], True, False),
    (["lspprc"], True, False),
    (["lspprc", "--json"], True, False),
    (["write", "c", "mirrored"], True, False),
    (["pausepprc", "c:s1"], True, False),
    (["write", "c", "while suspended", "--offset", 4096], True, False),
    (["resumepprc", "c:s1", "--wait"], True, False),
    (["read", "s1", "--length", 32], True, False),
    (["failoverpprc", "c:s1"], True, False),
    (["rmpprc", "c:s1", "--force"], True, False),
    (["rmpprc", "c:s1"], True, False),                                # gone: 1
    (["mkgmir", "g1", "ga:gb:gc"], True, False),
    (["write", "ga", "into the session"], True, False),
    (["formcg", "g1", "--count", 2], True, True),
    (["showgmir", "g1"], True, True),
    (["showgmir", "g1", "--json"], True, True),
    (["showgmir", "nosuch"], True, False),
    (["rmgmir", "g1"], True, False),
    (["lsvol"], True, False),
    (["rmvol", "d"], False, False),
    (["rmvol", "a"], False, False),                                   # holds data: 1
    (["rmvol", "nosuch"], False, False),
    (["nosuchcommand"], False, False),                                # usage: 2
    (["lsvol", "--help"], False, False),
    (["--durability", "process", "lsvol"], False, False),
]


def _normal(text: bytes, base: Path, timed: bool) -> bytes:
    text = text.replace(str(base).encode(), b"BASE")
    if timed:   # times and rates differ from run to run, and so do the widths
        # of the table columns that hold them (9.8 ms against 10.1 ms): the
        # padding around them is not compared
        text = re.sub(rb"\d+(\.\d+)?( ?(ms|s|%))?", b"N", text)
        text = re.sub(rb" +", b" ", text)
    return text


def run_lean(*args) -> tuple[int, bytes, bytes, bool]:
    """One ``fastfc`` invocation as the console script's front door
    (:mod:`fastfc_client`) makes it, in this process: forwarded by it when
    it forwards, else the full command line (CliRunner, as :func:`run`).
    (status, stdout, stderr, whether it forwarded)."""
    argv = [str(a) for a in args]
    found = fastfc_client._parse(argv, os.environ, main.name)
    if found is not None:
        out, err = (io.TextIOWrapper(io.BytesIO(), encoding="utf-8", write_through=True)
                    for _ in range(2))
        status = fastfc_client.run_forwarded(found[0], argv, main.name, found[1],
                                             stdout=out, stderr=err)
        if status is not None:
            return status, out.buffer.getvalue(), err.buffer.getvalue(), True
    r = run(*argv)
    return r.exit_code, r.stdout_bytes, r.stderr_bytes, False


@pytest.mark.slow
def test_every_command_forwarded_gives_the_output_of_a_direct_run(tmp_path, holders,
                                                                 monkeypatch):
    """Each command, run on a unit a holder holds (through the full command
    line, and on another holder's through the console script's lean front
    door) and on an identical unit nobody holds: the same stdout, stderr
    (bytes) and exit status."""
    held, lean, direct = tmp_path / "held", tmp_path / "lean", tmp_path / "direct"
    for base in (held, lean, direct):
        make_site(base)
    holders(held / "u")
    holders(lean / "u")
    statuses = set()
    not_forwarded = []
    for args, remote, timed in SCENARIO:
        opts = ["-u", "u"] + (["-r", "r"] if remote else [])
        got = {}
        for base in (held, lean, direct):
            monkeypatch.chdir(base)     # relative unit paths: the client's cwd counts
            if base == lean:
                status, out, err, forwarded = run_lean(*opts, *args)
                if not forwarded:
                    not_forwarded.append(args)
            else:
                r = run(*opts, *args)
                status, out, err = r.exit_code, r.stdout_bytes, r.stderr_bytes
            got[base] = (status, _normal(out, base, timed), _normal(err, base, timed))
        assert got[held] == got[direct], args
        assert got[lean] == got[direct], args
        statuses.add(got[held][0])
    assert statuses == {0, 1, 2}
    assert not_forwarded == [["nosuchcommand"]]     # a usage error: the full command line's
    # the pair's partner unit r joined the holder: it is served too
    assert stat.S_ISSOCK(os.stat(held / "r" / control.SOCKET).st_mode)
    assert not (direct / "u" / control.SOCKET).exists()


@pytest.mark.slow
def test_the_fastfc_command_itself_forwards(tmp_path, holders):
    """Through ``python -m fastfc`` in another process: bytes (non-ASCII
    text included) and exit statuses as a direct run, FASTFC_UNIT honoured."""
    held, direct = tmp_path / "held", tmp_path / "direct"
    make_site(held)
    make_site(direct)
    h = holders(held / "u")
    commands = [["write", "a", "grüße ✓", "--offset", 300], ["read", "a", "--length", 320],
                ["lsvol"], ["mkflash", "a:nosuch"], ["lsvol", "--nope"]]
    lean = [sys.executable, "-m", "fastfc_client"]     # the console script's front door
    for args in commands:
        got = []
        # the held unit twice: the full command line, then the lean front
        # door (the write writes the same bytes again)
        for base, client in ((held, FULL), (held, lean), (direct, FULL)):
            env = dict(os.environ, FASTFC_UNIT="u", PYTHONPATH=str(ROOT))
            p = subprocess.run([*client, *map(str, args)], cwd=base,
                               env=env, capture_output=True, timeout=60)
            got.append((p.returncode, p.stdout.replace(str(base).encode(), b"BASE"),
                        p.stderr.replace(str(base).encode(), b"BASE")))
        assert got[0] == got[1] == got[2], args
    assert [g for g in got][0][0] == 2
    # on a terminal (colours, its width): the same bytes too
    for size in ((30, 100), (0, 0)):
        got = []
        for base, client in ((held, FULL), (held, lean), (direct, FULL)):
            got.append(_on_a_terminal([*client, "-u", "u", "lsvol"], base, size))
        assert got[0] == got[1] == got[2] and b"\x1b[" in got[0][1], got
    assert h.proc.poll() is None


def _on_a_terminal(args: list[str], cwd: Path, size: tuple[int, int]) -> tuple[int, bytes]:
    """Run ``args`` with a pseudo-terminal of ``size`` (rows, columns) as
    its stdin, stdout and stderr; return its exit status and what it wrote."""
    import fcntl
    import pty
    import struct
    import termios
    parent, child = pty.openpty()
    fcntl.ioctl(child, termios.TIOCSWINSZ, struct.pack("HHHH", size[0], size[1], 0, 0))
    env = {k: v for k, v in os.environ.items() if k not in ("COLUMNS", "LINES")}
    env["TERM"] = "xterm-256color"
    p = subprocess.Popen(args, cwd=cwd, env=env, stdin=child, stdout=child, stderr=child,
                         start_new_session=True)
    os.close(child)
    out = b""
    while True:
        try:
            data = os.read(parent, 65536)
        except OSError:     # EIO: the terminal's other side is closed
            break
        if not data:
            break
        out += data
    os.close(parent)
    return p.wait(timeout=60), out


def test_the_socket_is_0600_from_the_moment_it_exists(tmp_path, holders):
    """Stat the socket's path in a tight loop while a holder starts, while a
    unit joins (a pair's secondary unit) and while the holder stops: it is
    absent or a 0600 socket, never anything else; nothing is left behind."""
    make_site(tmp_path / "s")
    unit, remote = tmp_path / "s" / "u", tmp_path / "s" / "r"
    seen: list[int] = []
    stop = threading.Event()

    def watch():
        paths = [unit / control.SOCKET, remote / control.SOCKET]
        while not stop.is_set():
            for p in paths:
                try:
                    seen.append(os.lstat(p).st_mode)
                except FileNotFoundError:
                    pass

    t = threading.Thread(target=watch)
    t.start()
    try:
        h = holders(unit)
        run("-u", unit, "-r", remote, "mkpprc", "a:s1", "--type", "gcp", code=0)
        assert (remote / control.SOCKET).exists()
        assert h.stop() == 0
    finally:
        stop.set()
        t.join()
    assert seen and set(seen) == {stat.S_IFSOCK | 0o600}, {oct(m) for m in seen}
    for d in (unit, remote):
        assert not (d / control.SOCKET).exists()
        assert not [p for p in d.iterdir() if p.name.startswith(".control-")]


def test_a_stale_socket_falls_back_to_opening_the_unit(tmp_path, holders):
    """A SIGKILLed holder leaves its socket: the next command finds no one
    answering and opens the unit itself (leaving the socket alone); the next
    holder replaces the socket."""
    make_site(tmp_path / "s")
    unit = tmp_path / "s" / "u"
    before = run("-u", unit, "lsvol", code=0).stdout
    h = holders(unit)
    run("-u", unit, "write", "b", "via the holder", code=0)
    assert h.stop(signal.SIGKILL) == -signal.SIGKILL
    sock = unit / control.SOCKET
    assert stat.S_ISSOCK(os.lstat(sock).st_mode)
    assert run("-u", unit, "lsvol", code=0).stdout == before
    assert "via the holder" in run("-u", unit, "read", "b", code=0).stdout
    assert os.lstat(sock)   # not the client's to remove
    h2 = holders(unit)
    assert run("-u", unit, "write", "b", "again", code=0).stdout == \
        "wrote 5 bytes to b at offset 0\n"
    assert h2.stop() == 0
    assert not sock.exists()


@pytest.mark.parametrize("lock_type", [threading.RLock, control.CommandLock])
def test_concurrent_commands_are_serialised(tmp_path, lock_type):
    """Changing commands sent at once run one at a time (under a plain
    lock, and under the server's readers-writer lock): of eight clients
    making the same volume exactly one does it, the others are told it
    exists; their writes at distinct offsets all land. A volume a command
    makes is in the server's own units at once (where an NBD server looks
    it up)."""
    make_site(tmp_path / "s")
    unit = tmp_path / "s" / "u"
    units = Units(str(unit), None)
    lock = lock_type()
    units.local()
    results: dict[int, tuple[int, bytes, bytes]] = {}

    def client(i: int) -> None:
        out, err = io.BytesIO(), io.BytesIO()
        args = ["-u", str(unit), "mkvol", "same", "--tracks", "2", "--track-size", TS]
        status = control.forward(unit, args, "fastfc", stdout=out, stderr=err,
                                 stdout_text=io.StringIO(), stderr_text=io.StringIO())
        w = control.forward(unit, ["-u", str(unit), "write", "same", f"#{i}",
                                   "--offset", str(16 * i)], "fastfc",
                            stdout=out, stderr=err, stdout_text=io.StringIO(),
                            stderr_text=io.StringIO())
        assert w == 0
        results[i] = (status, out.getvalue(), err.getvalue())  # type: ignore[assignment]

    try:
        with control.hosting(units, lock):
            threads = [threading.Thread(target=client, args=(i,)) for i in range(8)]
            for t in threads:
                t.start()
            for t in threads:
                t.join()
            with lock:
                vol = units.local().volume("same")
                data = bytes(vol.read(0, 16 * 8))
    finally:
        units.close()
    made = [i for i, r in results.items() if r[0] == 0]
    assert len(made) == 1 and len(results) == 8
    assert results[made[0]][1].startswith(b"created volume same: 2 tracks")
    for i, (status, out, err) in results.items():
        if i != made[0]:
            assert status == 1
            assert err == b"Error: volume 'same' already exists in this unit\n"
    for i in range(8):
        assert data[16 * i:16 * i + 2] == f"#{i}".encode()


def test_durability_power_is_refused_by_a_process_server(tmp_path, holders):
    make_site(tmp_path / "s")
    unit = tmp_path / "s" / "u"
    holders(unit)
    r = run("-u", unit, "--durability", "power", "write", "a", "x", code=1)
    assert "opened them at durability 'process'" in r.stderr
    assert r.stderr.count("\n") == 1
    r = run("-u", unit, "--durability", "process", "write", "a", "x", code=0)


def test_a_long_unit_path_is_served(tmp_path, holders):
    """A unix socket address holds 108 bytes: a deeper unit still gets one."""
    deep = tmp_path / ("d" * 60) / ("e" * 60)
    deep.mkdir(parents=True)
    make_site(deep / "s")
    unit = deep / "s" / "u"
    assert len(str(unit / control.SOCKET)) > 108
    holders(unit)
    assert run("-u", unit, "write", "a", "deep", code=0).stdout == \
        "wrote 4 bytes to a at offset 0\n"
    assert (unit / control.SOCKET).exists()


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to run a client as another user")
def test_other_users_are_refused(request):
    """A client of another uid: refused by the socket's mode (0600), and, if
    the socket's owner were changed, by the server's SO_PEERCRED check (the
    fastfc client itself, seeing a server of another user, sends nothing)."""
    tmp_path = Path(tempfile.mkdtemp(prefix="fastfc-ctl-"))   # others may look in
    tmp_path.chmod(0o755)
    request.addfinalizer(lambda: shutil.rmtree(tmp_path, ignore_errors=True))
    make_site(tmp_path / "s")
    unit = tmp_path / "s" / "u"
    units = Units(str(unit), None)
    lock = threading.RLock()
    units.local()

    def as_nobody(raw: bool = False) -> dict:
        r, w = os.pipe()
        pid = os.fork()
        if pid == 0:    # the child: nobody, talking to the socket
            try:
                os.close(r)
                os.setgid(65534)
                os.setuid(65534)
                out, err = io.BytesIO(), io.BytesIO()
                argv = ["-u", str(unit), "write", "a", "x"]
                try:
                    if raw:     # not the fastfc client: straight to the socket
                        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                        s.connect(str(unit / control.SOCKET))
                        control._send(s, b"q", json.dumps(control._request(
                            argv, "fastfc", io.StringIO(), io.StringIO(), out, err)).encode())
                        frames = []
                        while (frame := control._recv(s)) is not None:
                            frames.append(frame)
                        res = {"status": json.loads(frames[-1][1])["status"],
                               "err": b"".join(b for k, b in frames if k == b"e").decode()}
                    else:
                        status = control.forward(unit, argv, "fastfc", stdout=out,
                                                 stderr=err, stdout_text=io.StringIO(),
                                                 stderr_text=io.StringIO())
                        res = {"status": status, "err": err.getvalue().decode()}
                except OSError as e:
                    res = {"oserror": str(e)}
                except control.UntrustedServer as e:
                    res = {"untrusted": e.message}
                os.write(w, json.dumps(res).encode())
            finally:
                os._exit(0)
        os.close(w)
        with os.fdopen(r, "rb") as f:
            data = f.read()
        os.waitpid(pid, 0)
        return json.loads(data)

    try:
        with control.hosting(units, lock):
            res = as_nobody()
            assert "not open to this user" in res["oserror"], res
            os.chown(unit / control.SOCKET, 65534, -1)
            res = as_nobody()
            assert "is listened on by pid" in res["untrusted"] and "uid 0" in res["untrusted"]
            res = as_nobody(raw=True)
            assert res.get("status") == 1, res
            assert "runs commands only for its own user, not uid 65534" in res["err"]
    finally:
        units.close()
    assert run("-u", unit, "read", "a", "--length", 16, code=0).stdout.count("base") == 1


def test_a_socket_another_user_squats_gets_nothing(tmp_path):
    """Another user who can write a unit directory puts a socket at
    ``control.sock``: the client used to send it root's command line,
    working directory and FASTFC_* variables, and print whatever it
    answered. Now it checks who owns and listens on the socket first: the
    squatter receives not one byte, its fake reply is not shown, and the
    client says why (exit 1)."""
    make_site(tmp_path / "s")
    unit = tmp_path / "s" / "u"
    path = unit / control.SOCKET
    got_r, got_w = os.pipe()
    ready_r, ready_w = os.pipe()
    pid = os.fork()
    if pid == 0:        # the squatter: nobody, listening at the unit's control.sock
        try:
            os.close(got_r)
            os.close(ready_r)
            s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            s.bind(str(path))
            os.chown(path, 65534, 65534)
            os.setgid(65534)
            os.setuid(65534)
            s.listen(8)         # SO_PEERCRED: the credentials at listen()
            os.write(ready_w, b"r")
            s.settimeout(30)
            got = 0
            try:
                conn, _ = s.accept()
                conn.settimeout(10)
                fake = json.dumps({"status": 0}).encode()
                conn.sendall(b"o" + struct.pack(">I", 9) + b"all good\n"
                             + b"x" + struct.pack(">I", len(fake)) + fake)
                while data := conn.recv(65536):
                    got += len(data)
            except OSError:
                pass
            os.write(got_w, str(got).encode())
        finally:
            os._exit(0)
    os.close(got_w)
    os.close(ready_w)
    try:
        assert os.read(ready_r, 1) == b"r"
        r = subprocess.run([sys.executable, "-m", "fastfc", "-u", str(unit), "write", "a",
                            "a secret payload"], capture_output=True, text=True, timeout=60,
                           env=dict(os.environ, FASTFC_SECRET="hush"))
        with os.fdopen(got_r, "rb") as f:
            got = int(f.read() or b"-1")
    finally:
        os.waitpid(pid, 0)
        os.close(ready_r)
    assert got == 0, f"the squatter received {got} bytes"
    assert r.returncode == 1, (r.stdout, r.stderr)
    assert "all good" not in r.stdout
    assert f"control socket {path}" in r.stderr and "uid 65534" in r.stderr, r.stderr
    assert "sent it nothing" in r.stderr, r.stderr
    path.unlink()
    assert "a secret" not in run("-u", unit, "read", "a", "--length", 16, code=0).stdout


def test_a_removed_control_socket_is_made_again(tmp_path, holders):
    """``control.sock`` deleted under a running server used to lock the
    command line out until the server restarted (commands opened the unit
    themselves and found it held). The server makes it again."""
    make_site(tmp_path / "s")
    unit = tmp_path / "s" / "u"
    holders(unit)
    sock = unit / control.SOCKET
    for _ in range(2):
        sock.unlink()
        deadline = time.monotonic() + 15
        while not sock.exists():
            assert time.monotonic() < deadline, "control.sock was not made again"
            time.sleep(0.1)
        assert stat.S_IMODE(os.lstat(sock).st_mode) == 0o600
        assert run("-u", unit, "write", "b", "again", code=0).stdout == \
            "wrote 5 bytes to b at offset 0\n"


def test_control_connections_are_capped_and_requests_have_a_deadline(tmp_path, monkeypatch):
    """Connections were unbounded (each a thread), and a request could
    trickle in a byte every IO_TIMEOUT for ever. Past ``max_connections`` a
    new one is refused with a message; a request not in within IO_TIMEOUT
    of connecting is dropped, however it trickles; then commands run."""
    monkeypatch.setattr(control, "IO_TIMEOUT", 1.5)
    make_site(tmp_path / "s")
    unit = tmp_path / "s" / "u"
    units = Units(str(unit), None)
    units.local()

    def fwd(*args: str) -> tuple[int | None, bytes]:
        out, err = io.BytesIO(), io.BytesIO()
        status = control.forward(unit, ["-u", str(unit), *args], "fastfc", stdout=out,
                                 stderr=err, stdout_text=io.StringIO(),
                                 stderr_text=io.StringIO())
        return status, out.getvalue() + err.getvalue()

    try:
        with control.hosting(units, threading.RLock()) as host:
            host.max_connections = 3
            silent = []
            for _ in range(3):
                c = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                c.connect(str(unit / control.SOCKET))
                c.settimeout(10)
                silent.append(c)
            time.sleep(0.3)
            status, said = fwd("lsvol")
            assert status == 1 and b"3 commands running or queued" in said, said
            t0 = time.monotonic()
            trickle = b"q" + struct.pack(">I", 100) + b"{" * 100
            for i in range(12):          # a byte every 0.25 s of a request
                try:
                    silent[0].sendall(trickle[i:i + 1])
                except OSError:
                    break
                time.sleep(0.25)
            for c in silent:
                assert c.recv(1) == b""          # dropped at the deadline
            assert time.monotonic() - t0 < 3 * 1.5, time.monotonic() - t0
            status, said = fwd("lsvol")
            assert status == 0 and b"ga" in said, said
            for c in silent:
                c.close()
    finally:
        units.close()


def test_commands_run_by_the_server_leave_its_units_open(tmp_path):
    """A forwarded command does not close the served units; a removed
    volume is gone from them, a new one there, at once."""
    make_site(tmp_path / "s")
    unit = tmp_path / "s" / "u"
    units = Units(str(unit), None)
    lock = threading.RLock()
    held = units.local()

    def fwd(*args: str) -> tuple[int | None, bytes]:
        out, err = io.BytesIO(), io.BytesIO()
        status = control.forward(unit, ["-u", str(unit), *args], "fastfc", stdout=out,
                                 stderr=err, stdout_text=io.StringIO(),
                                 stderr_text=io.StringIO())
        return status, out.getvalue() + err.getvalue()

    try:
        with control.hosting(units, lock):
            assert fwd("mkvol", "n", "--tracks", "1", "--track-size", TS)[0] == 0
            assert "n" in held
            assert fwd("rmvol", "d0")[0] == 1
            assert fwd("rmvol", "b") == (0, b"removed volume b\n")
            assert "b" not in held
            assert units.open[unit.resolve()] is held
            held.volume("a").read(0, 4)     # still open
    finally:
        units.close()
    assert control.forward(unit, ["lsvol"], "fastfc", stdout=io.BytesIO(),
                           stderr=io.BytesIO()) is None
    shutil.rmtree(tmp_path / "s")


@pytest.mark.slow
def test_a_stalled_client_does_not_stall_the_server(tmp_path, monkeypatch):
    """A client that stops taking output (suspended) loses the rest of it
    after IO_TIMEOUT; the command finishes and the next client is served."""
    monkeypatch.setattr(control, "IO_TIMEOUT", 0.5)
    cut = threading.Event()         # the server gave up a send (the stalled client's)
    send_now = control._send_now

    def noting_send_now(conn, kind, payload):
        try:
            send_now(conn, kind, payload)
        except OSError:
            cut.set()
            raise
    monkeypatch.setattr(control, "_send_now", noting_send_now)
    make_site(tmp_path / "s")
    unit = tmp_path / "s" / "u"
    run("-u", unit, "mkvol", "big", "--tracks", 16, "--track-size", "64K", code=0)
    run("-u", unit, "write", "big", "0123456789abcdefg", "--repeat", 60000, code=0)
    units = Units(str(unit), None)
    lock = threading.RLock()
    units.local()
    try:
        with control.hosting(units, lock):
            stalled = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            stalled.connect(str(unit / control.SOCKET))
            request = control._request(["-u", str(unit), "read", "big", "--length", "1000000"],
                                       "fastfc", io.StringIO(), io.StringIO(),
                                       io.BytesIO(), io.BytesIO())
            control._send(stalled, b"q", json.dumps(request).encode())
            time.sleep(0.2)     # the read runs, its output fills the socket, unread
            out, err = io.BytesIO(), io.BytesIO()
            status: list = []
            t = threading.Thread(target=lambda: status.append(control.forward(
                unit, ["-u", str(unit), "lsvol"], "fastfc", stdout=out, stderr=err,
                stdout_text=io.StringIO(), stderr_text=io.StringIO())))
            t.start()
            t.join(30)
            if t.is_alive():    # the server waits on the stalled client: free it, fail
                stalled.close()
                t.join()
                pytest.fail("a stalled client held the server up")
            assert status == [0] and b"big" in out.getvalue()
            # drained only once the server has given the stalled client up
            # (drained sooner, on a loaded machine, the read's output goes on)
            assert cut.wait(30), "the server never gave up sending to the stalled client"
            kinds = []
            while (frame := control._recv(stalled)) is not None:
                kinds.append(frame[0])
            assert b"x" not in kinds     # cut short: no exit status
            stalled.close()
    finally:
        units.close()


def test_volumes_made_by_forwarded_commands_are_exported(tmp_path):
    """Through ``fastfc serve``: a volume a forwarded mkvol makes is an NBD
    export at once, and a forwarded rmvol takes it away."""
    if shutil.which("nbdinfo") is None:
        msg = "nbdinfo not installed: apt-get install libnbd-bin (.ci/run does it)"
        pytest.fail(msg) if os.environ.get("CI") else pytest.skip(msg)
    make_site(tmp_path / "s")
    unit = tmp_path / "s" / "u"
    nbd = tmp_path / "nbd.sock"
    proc = subprocess.Popen([sys.executable, "-m", "fastfc", "-u", str(unit), "serve",
                             "--socket", str(nbd)], stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    try:
        assert proc.stderr.readline().startswith("serving ")   # type: ignore[union-attr]

        def exports() -> list[str]:
            r = subprocess.run(["nbdinfo", "--list", "--json", f"nbd+unix:///?socket={nbd}"],
                               capture_output=True, text=True, timeout=60)
            assert r.returncode == 0, r.stderr
            return sorted(e["export-name"] for e in json.loads(r.stdout)["exports"])

        assert exports() == ["a", "b", "c", "ga"]
        run("-u", unit, "mkvol", "fresh", "--tracks", 4, "--track-size", TS, code=0)
        assert exports() == ["a", "b", "c", "fresh", "ga"]
        run("-u", unit, "rmvol", "fresh", code=0)
        assert exports() == ["a", "b", "c", "ga"]
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=60) == 0
        assert not (unit / control.SOCKET).exists()
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        proc.stderr.close()     # type: ignore[union-attr]


def test_a_server_refuses_to_run_serve_demo_or_bench(tmp_path):
    """Those are never forwarded; a client that sends one anyway is refused."""
    make_site(tmp_path / "s")
    unit = tmp_path / "s" / "u"
    units = Units(str(unit), None)
    units.local()
    try:
        with control.hosting(units, threading.RLock()):
            for args in (["serve", "--socket", str(tmp_path / "x")], ["demo"], ["bench"]):
                err = io.BytesIO()
                status = control.forward(unit, ["-u", str(unit), *args], "fastfc",
                                         stdout=io.BytesIO(), stderr=err,
                                         stdout_text=io.StringIO(), stderr_text=io.StringIO())
                assert (status, err.getvalue()) == (
                    1, f"Error: {args[0]} is not carried out by a server: run it where you "
                       "are\n".encode()), args
    finally:
        units.close()


@pytest.mark.slow
def test_a_server_stopped_mid_command(tmp_path, holders):
    """SIGTERM: the command in flight finishes and its client gets all of
    it. SIGKILL: the client says the outcome is unknown (exit 1)."""
    make_site(tmp_path / "s")
    unit = tmp_path / "s" / "u"
    args = ["-u", str(unit), "mkflash", "a:b", "--copy-rate", "24K", "--wait"]
    for sig in (signal.SIGTERM, signal.SIGKILL):
        h = holders(unit)
        got: list = []
        out, err = io.BytesIO(), io.BytesIO()

        def client() -> None:
            try:
                got.append(control.forward(unit, args, "fastfc", stdout=out, stderr=err,
                                           stdout_text=io.StringIO(),
                                           stderr_text=io.StringIO()))
            except control.ServerGone as e:
                got.append(e)

        t = threading.Thread(target=client)
        t.start()
        deadline = time.monotonic() + 30
        while not out.getvalue() and time.monotonic() < deadline:
            time.sleep(0.01)    # the server took the command: it said established
        assert out.getvalue().startswith(b"established FlashCopy a:b"), err.getvalue()
        time.sleep(0.3)     # the copy runs (32 KiB at 24 KiB/s)
        h.stop(sig)
        t.join(60)
        if sig == signal.SIGTERM:
            assert got == [0], err.getvalue()
            assert out.getvalue().endswith(b"relationship ended (not persistent)\n")
        else:
            assert len(got) == 1 and isinstance(got[0], control.ServerGone), got
            assert got[0].exit_code == 1
            assert "closed the connection before the command finished" in str(got[0])
            assert out.getvalue().startswith(b"established FlashCopy a:b")


def test_the_server_spells_short_group_options_long_up_to_the_command(monkeypatch):
    """The server parses ``-u PATH -r PATH`` as ``--unit --remote-unit``
    (click tries a short option as a long one first and builds a
    ``NoSuchOption`` for each: a difflib search and gettext's file lookups);
    anything click would report differently is left as typed."""
    from fastfc.tools.cli.control import long_group_options as spelled
    assert spelled(["-u", "a", "-r", "b", "--wait", "3", "lsvol", "-u", "x"], main) == \
        ["--unit", "a", "--remote-unit", "b", "--wait", "3", "lsvol", "-u", "x"]
    assert spelled(["--durability", "power", "-r", "b", "showgmir", "-r"], main) == \
        ["--durability", "power", "--remote-unit", "b", "showgmir", "-r"]
    for kept in (["-u"], ["-uPATH", "lsvol"], ["-h"], ["--", "-u", "a"], ["-x", "a"]):
        assert spelled(kept, main) == kept
    built = []
    import click.exceptions
    init = click.exceptions.NoSuchOption.__init__
    monkeypatch.setattr(click.exceptions.NoSuchOption, "__init__",
                        lambda self, *a, **k: (built.append(a), init(self, *a, **k))[1])
    main.make_context("fastfc", spelled(["-u", "a", "-r", "b", "lsvol"], main),
                      resilient_parsing=True)
    assert built == []
    main.make_context("fastfc", ["-u", "a", "-r", "b", "lsvol"], resilient_parsing=True)
    assert len(built) == 2          # what the spelling saves: one per short option
