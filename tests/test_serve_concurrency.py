"""Commands a server runs at once: the command lock (shared for commands
that only look, exclusive for the others, let go of by long commands while
they wait), each command's own environment, Ctrl-C of a forwarded command
stopping it in the server, and the server's log.

The tests start real ``fastfc serve`` processes (tests/test_serve.py's
``serving``) and drive them with the command line, except where a test
hosts in this process to run a command of its own (:func:`probe`).
"""

from __future__ import annotations

import io
import json
import logging
import os
import queue
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import click
import pytest

from fastfc.tools import nbd
from fastfc.tools.cli import control, main
from fastfc.tools.cli.output import console
from fastfc.tools.cli.units import Units, pass_units, unlocked
from test_serve import ROOT, fastfc_cli, make_unit, serving
from test_serve_protocol import Client

MIB = 1 << 20


# -- the lock ------------------------------------------------------------------------
def test_the_command_lock_is_shared_for_lookers_exclusive_for_changers():
    """Lookers hold it together; a changer holds it alone, never beside
    another changer or a looker; a waiting changer goes before lookers
    that come after it; a looker cannot upgrade; ``released`` lets go for
    its block and takes the same back."""
    lock = control.CommandLock()
    inside = {"shared": 0, "exclusive": 0}
    worst = {"shared": 0, "overlap": 0}
    guard = threading.Lock()

    def hold(kind: str) -> None:
        ctx = lock.shared() if kind == "shared" else lock
        with ctx:
            with guard:
                inside[kind] += 1
                worst["shared"] = max(worst["shared"], inside["shared"])
                if inside["exclusive"] > 1 or (inside["exclusive"] and inside["shared"]):
                    worst["overlap"] += 1
            time.sleep(0.002)
            with guard:
                inside[kind] -= 1

    threads = [threading.Thread(target=lambda k=k: [hold(k) for _ in range(20)])
               for k in ["shared"] * 4 + ["exclusive"] * 4]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert worst["overlap"] == 0
    assert worst["shared"] > 1          # lookers did run together

    # a waiting changer holds back a looker that comes after it
    order: list[str] = []
    lock.acquire_shared()
    w = threading.Thread(target=lambda: (lock.acquire(), order.append("w"), lock.release()))
    w.start()
    while not lock._writers_waiting:
        time.sleep(0.001)
    r = threading.Thread(target=lambda: (lock.acquire_shared(), order.append("r"),
                                         lock.release_shared()))
    r.start()
    time.sleep(0.05)
    assert order == []
    with pytest.raises(RuntimeError, match="cannot take it exclusive"):
        lock.acquire()
    lock.release_shared()
    w.join(10)
    r.join(10)
    assert order == ["w", "r"]

    # reentrant, and released for a block
    with lock, lock, lock.shared():
        got = []
        with lock.released():
            t = threading.Thread(target=lambda: got.append(lock.acquire(timeout=5)) or
                                 lock.release())
            t.start()
            t.join(10)
        assert got == [True]
        assert lock.acquire(blocking=False)     # still ours, at the same depth
        lock.release()
    assert lock.acquire(timeout=1)
    lock.release()


# -- a command of the test's own, hosted here ----------------------------------------
def send(unit: Path, argv: list[str], env: dict, out: "Collected") -> dict:
    """``fastfc argv`` sent to the server holding ``unit`` with exactly the
    environment ``env``: its exit frame (its output into ``out``)."""
    import socket
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        s.connect(str(unit / control.SOCKET))
        stream = {"encoding": "utf-8", "errors": "strict", "tty": False}
        control._send(s, b"q", json.dumps({"argv": argv, "prog_name": "fastfc",
                                           "cwd": os.getcwd(), "env": env,
                                           "stdout": stream, "stderr": stream}).encode())
        return control._replies(s, unit, out, out)
    finally:
        s.close()


class Collected(io.RawIOBase):
    """Output bytes from another thread, to wait on."""

    def __init__(self) -> None:
        self.data = b""
        self.cond = threading.Condition()

    def writable(self) -> bool:
        return True

    def write(self, b) -> int:
        with self.cond:
            self.data += bytes(b)
            self.cond.notify_all()
        return len(b)

    def wait_for(self, what: bytes, timeout: float = 30) -> None:
        with self.cond:
            assert self.cond.wait_for(lambda: what in self.data, timeout), self.data


GATE = threading.Event()


@pytest.fixture
def probe():
    """A command ``envprobe`` (changing: it takes the lock exclusive) that
    says the COLUMNS it sees and its console's width, lets go of the lock
    until GATE is set, and says them again."""
    @main.command("envprobe", hidden=True)
    @pass_units
    def envprobe(units) -> None:
        units.local()
        click.echo(f"before {os.environ.get('COLUMNS')} {console().width}")
        with unlocked():
            GATE.wait(30)
        click.echo(f"after {os.environ.get('COLUMNS')} {console().width}")
    @main.command("holdprobe", hidden=True)
    @pass_units
    def holdprobe(units) -> None:
        units.local()
        click.echo("holding")
        GATE.wait(30)           # the lock held: others queue
    GATE.clear()
    try:
        yield
    finally:
        main.commands.pop("envprobe", None)
        main.commands.pop("holdprobe", None)
        GATE.set()


def test_concurrent_commands_each_see_their_own_environment(tmp_path, probe):
    """Two commands running at once with different COLUMNS: each reads
    its own, before and after the other ran, and its console is as wide;
    a looker (lsvol) runs while both wait, with a third width."""
    unit = tmp_path / "u"
    make_unit(unit, "A0", size=MIB)
    units = Units(str(unit), None)
    units.local()
    outs = {40: Collected(), 150: Collected()}
    exits: dict[int, dict] = {}
    try:
        with control.hosting(units, control.CommandLock()):
            threads = []
            for cols, out in outs.items():
                t = threading.Thread(target=lambda c=cols, o=out: exits.__setitem__(
                    c, send(unit, ["-u", str(unit), "envprobe"], {"COLUMNS": str(c)}, o)))
                t.start()
                threads.append(t)
                out.wait_for(b"before")         # in its wait, the lock let go
            looked = Collected()
            got = send(unit, ["-u", str(unit), "lsvol"], {"COLUMNS": "90"}, looked)
            assert got["status"] == 0 and b"A0" in looked.data
            assert not exits                    # both still waiting
            GATE.set()
            for t in threads:
                t.join(30)
    finally:
        units.close()
    for cols, out in outs.items():
        assert exits[cols]["status"] == 0, out.data
        assert out.data == f"before {cols} {cols}\nafter {cols} {cols}\n".encode()
    assert control.os.environ is os.environ and not isinstance(os.environ,
                                                               control._EnvRouter)


@pytest.mark.slow
def test_a_command_whose_client_stops_it_while_queued_is_not_run(tmp_path, probe):
    """Ctrl-C of a changing command waiting for its turn: it is not run
    (the exit frame says ``not_run``, status 130) and changes nothing."""
    import socket
    unit = tmp_path / "u"
    make_unit(unit, "A0", size=MIB)
    units = Units(str(unit), None)
    units.local()
    held = Collected()
    exits: list = []
    try:
        with control.hosting(units, control.CommandLock()):
            t = threading.Thread(target=lambda: exits.append(
                send(unit, ["-u", str(unit), "holdprobe"], {}, held)))
            t.start()
            held.wait_for(b"holding")
            s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                s.connect(str(unit / control.SOCKET))
                stream = {"encoding": "utf-8", "errors": "strict", "tty": False}
                control._send(s, b"q", json.dumps({
                    "argv": ["-u", str(unit), "mkvol", "NEW", "--tracks", "2"],
                    "prog_name": "fastfc", "cwd": os.getcwd(), "env": {},
                    "stdout": stream, "stderr": stream}).encode())
                time.sleep(0.3)                 # queued behind holdprobe
                control._send(s, b"c", b"")     # Ctrl-C
                time.sleep(0.3)
                GATE.set()
                out = Collected()
                reply = control._replies(s, unit, out, out,
                                         deadline=time.monotonic() + 30)
            finally:
                s.close()
            t.join(30)
            assert "NEW" not in units.local()
    finally:
        units.close()
    assert reply == {"status": 130, "not_run": True}, out.data
    assert out.data == b""
    assert exits and exits[0]["status"] == 0


# -- a real server under a long command ----------------------------------------------
class Lines:
    """A pipe's lines as they come (a thread reads them)."""

    def __init__(self, stream) -> None:
        self.q: queue.Queue = queue.Queue()
        self.all: list[str] = []
        threading.Thread(target=self._read, args=(stream,), daemon=True).start()

    def _read(self, stream) -> None:
        for line in stream:
            self.q.put(line)
        self.q.put(None)

    def first(self, starts: str, timeout: float = 60) -> str:
        deadline = time.monotonic() + timeout
        while True:
            line = self.q.get(timeout=max(0.01, deadline - time.monotonic()))
            assert line is not None, f"ended before a line starting {starts!r}: {self.all}"
            self.all.append(line)
            if line.startswith(starts):
                return line

    def rest(self) -> str:
        while (line := self.q.get(timeout=60)) is not None:
            self.all.append(line)
        return "".join(self.all)


def popen(*args) -> subprocess.Popen:
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    return subprocess.Popen([sys.executable, "-m", "fastfc", *map(str, args)], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


@pytest.fixture
def site(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    make_unit(a, "A0", "X", "Y", size=MIB)
    make_unit(b, "B0", "C0", size=MIB)
    fastfc_cli("-u", a, "-r", b, "mkgmir", "S", "A0:B0:C0", "--cg-interval", "0.05")
    fastfc_cli("-u", a, "mkflash", "X:Y", "--nocp")
    return a, b, tmp_path / "nbd.sock"


@pytest.mark.slow
def test_lookers_and_changers_run_while_formcg_runs_and_ctrl_c_stops_it(site):
    """While a forwarded ``formcg --seconds 60`` forms CGs and an NBD client
    writes to A0: lsvol, showgmir and lsflash answer (correctly) and a
    changing command (mkvol) runs, all before formcg ends. Ctrl-C of formcg
    then stops its loop in the server: the client says so in one line and
    exits 130, and the session forms no more CGs (no attempt in flight)."""
    a, b, sock = site
    with serving(a, sock, remote=b):
        writer = Client(str(sock))
        assert writer.go("A0")[-1][0] == nbd.REP_ACK
        stop = threading.Event()
        errors: list = []

        def write() -> None:
            k = 0
            while not stop.is_set():
                err, _ = writer.request(nbd.CMD_WRITE, (k % 16) * 65536, 4096,
                                        bytes([k % 251 + 1]) * 4096)
                if err:
                    errors.append(err)
                k += 1
                time.sleep(0.002)

        wt = threading.Thread(target=write, daemon=True)
        wt.start()
        formcg = popen("-u", a, "-r", b, "formcg", "S", "--seconds", "60")
        try:
            err_lines = Lines(formcg.stderr)
            err_lines.first("CG ")      # its loop runs in the server: a progress line
            vols = json.loads(fastfc_cli("-u", a, "lsvol", "--json").stdout)
            assert {"A0", "X", "Y"} <= {v["name"] for v in vols}
            show = json.loads(fastfc_cli("-u", a, "-r", b, "showgmir", "S",
                                         "--json").stdout)
            assert show["state"] == "running" and show["session"] == "S"
            flash = fastfc_cli("-u", a, "lsflash").stdout
            assert "X" in flash and "Y" in flash
            made = fastfc_cli("-u", a, "mkvol", "NEW", "--tracks", "2", "--track-size", "4K")
            assert made.stdout.startswith("created volume NEW")
            assert "NEW" in {v["name"] for v in json.loads(
                fastfc_cli("-u", a, "lsvol", "--json").stdout)}
            assert formcg.poll() is None        # all of that before formcg ended
            formcg.send_signal(signal.SIGINT)
            assert formcg.wait(timeout=30) == 130
            err = err_lines.rest()
            out = formcg.stdout.read()
        finally:
            if formcg.poll() is None:
                formcg.kill()
                formcg.wait()
            stop.set()
            wt.join(30)
            writer.s.close()
        assert not errors
        assert "stopped (Ctrl-C): the loop ended after" in err, err
        assert err.rstrip().splitlines()[-1].startswith(
            "fastfc: Ctrl-C: the command was stopped in the server holding"), err
        assert "consistency groups committed" in out, out
        first = json.loads(fastfc_cli("-u", a, "-r", b, "showgmir", "S", "--json").stdout)
        assert first["state"] == "idle", first
        time.sleep(0.5)
        again = json.loads(fastfc_cli("-u", a, "-r", b, "showgmir", "S", "--json").stdout)
        assert again["cg_sequence"] == first["cg_sequence"]
        assert again["attempts"] == first["attempts"]


@pytest.mark.slow
def test_ctrl_c_of_a_forwarded_waitflash_stops_it_in_the_server(site):
    """Ctrl-C of ``waitflash`` (a copy at 64 KiB/s of 1 MiB): the copy in
    the foreground stops between steps, saying what it left; the client
    says it was stopped in the server, exit 130; the relationship is still
    there, its copy moving on in the server's background."""
    a, b, sock = site
    with serving(a, sock, remote=b):
        fastfc_cli("-u", a, "rmflash", "--force", "X:Y")
        fastfc_cli("-u", a, "mkflash", "X:Y", "--copy-rate", "64K")
        wait = popen("-u", a, "waitflash", "X:Y")
        try:
            lines = Lines(wait.stderr)
            lines.first("X:Y")                  # the ETA line: it copies
            lsflash = json.loads(fastfc_cli("-u", a, "lsflash", "--json").stdout)
            assert wait.poll() is None and lsflash
            wait.send_signal(signal.SIGINT)
            assert wait.wait(timeout=30) == 130
            err = lines.rest()
        finally:
            if wait.poll() is None:
                wait.kill()
                wait.wait()
        assert "stopped (Ctrl-C): X:Y has" in err, err
        assert err.rstrip().splitlines()[-1].startswith(
            "fastfc: Ctrl-C: the command was stopped in the server holding"), err
        rels = json.loads(fastfc_cli("-u", a, "lsflash", "--json").stdout)
        assert [r for r in rels if r["source"] == "X" and r["target"] == "Y"], rels


# -- the log -------------------------------------------------------------------------
@pytest.mark.slow
@pytest.mark.parametrize("level", ["info", "warning"])
def test_the_server_logs_connections_and_its_stop(tmp_path, level):
    """--log-level info: a line for each control connection (who, the
    command line, its exit status and time) and NBD connection, and one
    when the server stops (the signal, how long it ran). --log-level
    warning: none of those."""
    unit, sock = tmp_path / "u", tmp_path / "nbd.sock"
    make_unit(unit, "A0", size=MIB)
    with serving(unit, sock, "--log-level", level) as server:
        fastfc_cli("-u", unit, "lsvol")
        c = Client(str(sock))
        assert c.go("A0")[-1][0] == nbd.REP_ACK
        c.s.close()
        time.sleep(0.2)
    log = server.stderr.read()
    assert log.startswith("serving 1 volume(s) over NBD"), log
    said = [
        " INFO fastfc.control: control connection from pid ",
        f"-u {unit} lsvol: exit status 0 in ",
        " INFO fastfc.nbd: NBD connection from pid ",
        ": export A0",
        " INFO fastfc.serve: stopped (SIGTERM) after ",
    ]
    for what in said:
        assert (what in log) == (level == "info"), (what, log)


# -- the client's Ctrl-C, against a stand-in server ------------------------------------
@pytest.mark.parametrize("answer, says", [
    ({"status": 1, "stopped": True}, "the command was stopped in the server holding"),
    ({"status": 130, "not_run": True}, "did not run the command (it was waiting for its turn)"),
    ({"status": 0}, "had finished the command before it could stop it (exit status 0"),
    (None, "did not say whether it stopped the command: its outcome is unknown"),
])
@pytest.mark.slow
def test_ctrl_c_of_a_client_asks_the_server_and_says_what_became_of_it(
        tmp_path, monkeypatch, answer, says):
    """Ctrl-C while a forwarded command runs: the client sends ``c``, waits
    up to CANCEL_WAIT for the exit frame (output meanwhile still copied),
    says in one line what the server did with the command (or that nobody
    knows), and returns 130."""
    import socket
    main_thread = threading.main_thread().ident
    assert main_thread == threading.get_ident()
    monkeypatch.setattr(control, "CANCEL_WAIT", 0.5)
    unit = tmp_path / "u"
    unit.mkdir()
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(str(unit / control.SOCKET))
    listener.listen(1)
    got: list = []

    def stand_in() -> None:
        conn, _ = listener.accept()
        with conn:
            got.append(control._recv(conn)[0])
            control._send(conn, b"e", b"working\n")
            time.sleep(0.2)
            signal.pthread_kill(main_thread, signal.SIGINT)    # the user's Ctrl-C
            frame = control._recv(conn, deadline=time.monotonic() + 10)
            got.append(frame[0] if frame else None)
            if answer is not None:
                control._send(conn, b"e", b"left: 3 tracks\n")
                control._send(conn, b"x", json.dumps(answer).encode())
            else:
                time.sleep(1.5)                 # no answer in time

    t = threading.Thread(target=stand_in, daemon=True)
    t.start()
    out, err = io.BytesIO(), io.BytesIO()
    try:
        status = control.forward(unit, ["-u", str(unit), "waitflash", "X:Y"], "fastfc",
                                 stdout=out, stderr=err, stdout_text=io.StringIO(),
                                 stderr_text=io.StringIO())
    finally:
        t.join(10)
        listener.close()
    assert status == 130
    assert got == [b"q", b"c"]
    lines = err.getvalue().decode().splitlines()
    assert lines[0] == "working"
    assert lines[-1].startswith("fastfc: Ctrl-C: ") and says in lines[-1], lines
    assert ("left: 3 tracks" in lines) == (answer is not None)
    assert len(lines) == (3 if answer is not None else 2)


def test_a_stderr_nobody_reads_never_stalls_the_server(monkeypatch):
    """The server's log lines go out on a thread of their own: with stderr
    stalled (a full pipe), logging still returns at once; lines past the
    queue's limit are dropped and a line says how many once it flows."""
    from fastfc.tools.cli import serve
    flowing = threading.Event()
    written: list[str] = []

    class Stalled:
        def write(self, s: str) -> int:
            flowing.wait(30)
            written.append(s)
            return len(s)

        def flush(self) -> None:
            pass

    monkeypatch.setattr(sys, "stderr", Stalled())
    monkeypatch.setattr(serve._LogLines, "LIMIT", 5)
    handler = serve._LogLines()
    logger = logging.getLogger("fastfc.test-stalled")
    logger.addHandler(handler)
    logger.propagate = False
    try:
        def log() -> None:          # 1 taken by the writer, 5 queued, the rest dropped
            for i in range(20):
                logger.warning("line %d", i)

        t = threading.Thread(target=log)
        t.start()
        t.join(20)
        assert not t.is_alive() and not flowing.is_set()    # done, stderr still stalled
        flowing.set()
        handler.close(wait=10)
    finally:
        logger.removeHandler(handler)
        logger.propagate = True
    text = "".join(written)
    kept = [ln for ln in text.splitlines() if ln.startswith("line ")]
    assert kept == [f"line {i}" for i in range(len(kept))] and len(kept) in (5, 6), text
    assert f"({20 - len(kept)} log lines dropped: stderr did not take them)" in text, text
