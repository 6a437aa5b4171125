"""The ``fastfc`` console script's front door (:mod:`fastfc_client`): a
command for a unit a server holds is forwarded without importing click,
NumPy or the engine, with the request, bytes, exit statuses, Ctrl-C and
server-gone behaviour of the full command line; everything else goes to
the full command line before anything is sent.

The lean client's output for every command of test_control's SCENARIO is
compared with a direct run there
(``test_every_command_forwarded_gives_the_output_of_a_direct_run``); here,
its decisions, its imports, and both clients against a stand-in server.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

import fastfc_client
from fastfc.tools.cli import control, main

ROOT = Path(__file__).resolve().parent.parent
LEAN = [sys.executable, "-m", "fastfc_client"]
FULL = [sys.executable, "-m", "fastfc"]


def test_it_knows_the_commands_a_server_carries_out():
    assert fastfc_client.FORWARDED == set(main.commands) - control.LOCAL
    assert fastfc_client.LOCAL == control.LOCAL
    assert fastfc_client.SOCKET == control.SOCKET
    assert control.forward is not fastfc_client.forward     # click's errors there


@pytest.mark.parametrize("args, env, unit", [
    (["-u", "U", "lsvol"], {}, "U"),
    (["-uU", "lsvol", "--json"], {}, "U"),
    (["--unit", "U", "-r", "R", "showgmir", "S"], {}, "U"),
    (["--unit=U", "--remote-unit=R", "--wait", "1.5", "lsflash"], {}, "U"),
    (["--durability", "power", "-u", "U", "mkvol", "x"], {}, "U"),
    (["lsvol"], {"FASTFC_UNIT": "U"}, "U"),
    (["-u", "V", "lsvol"], {"FASTFC_UNIT": "U"}, "V"),
    (["-u", "U", "lsvol", "--help"], {}, "U"),      # the server prints the command's help
    (["-u", "U", "lsvol", "-u", "X"], {}, "U"),      # the command's own options: the server's
    # the full command line decides (usage errors, help, no unit, run here)
    (["lsvol"], {}, None),
    (["-u", "U"], {}, None),
    (["-u", "U", "nosuch"], {}, None),
    (["-u", "U", "serve"], {}, None),
    (["-u", "U", "demo"], {}, None),
    (["-h", "-u", "U", "lsvol"], {}, None),
    (["--help"], {"FASTFC_UNIT": "U"}, None),
    (["--version"], {"FASTFC_UNIT": "U"}, None),
    (["--nope", "-u", "U", "lsvol"], {}, None),
    (["--", "lsvol"], {"FASTFC_UNIT": "U"}, None),
    (["-u"], {}, None),
    (["-u", "", "lsvol"], {}, None),
    (["lsvol"], {"FASTFC_UNIT": ""}, None),
    (["--durability", "Power", "-u", "U", "lsvol"], {}, None),
    (["-u", "U", "lsvol"], {"FASTFC_DURABILITY": "bogus"}, None),
    (["-u", "U", "--wait", "-1", "lsvol"], {}, None),
    (["-u", "U", "--wait", "nan", "lsvol"], {}, None),
    (["-u", "U", "--wait", "1e3", "lsvol"], {}, None),
    (["-u", "U", "lsvol"], {"FASTFC_KERNELS": "x"}, None),      # the engine checks these
    (["-u", "U", "lsvol"], {"FASTFC_COPY_THREADS": "2"}, None),
    (["-u", "U", "lsvol"], {"FASTFC_DEBUG": "1"}, None),        # tracebacks
    (["-u", "U", "lsvol"], {"_FASTFC_COMPLETE": "bash_complete"}, None),
])
def test_it_forwards_only_what_the_full_command_line_would(args, env, unit):
    assert fastfc_client.unit_to_forward(args, env) == unit


# -- both clients against a stand-in server --------------------------------------------
class StandIn:
    """A control socket in ``unit`` answering each connection with
    ``script(conn, request)`` (in a thread); the requests it got."""

    def __init__(self, unit: Path, script) -> None:
        unit.mkdir(exist_ok=True)
        self.listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.listener.bind(str(unit / control.SOCKET))
        self.listener.listen(4)
        self.script = script
        self.requests: list[dict] = []
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.listener.accept()
            except OSError:
                return
            with conn:
                frame = control._recv(conn)
                assert frame is not None and frame[0] == b"q"
                request = json.loads(frame[1])
                self.requests.append(request)
                try:
                    self.script(conn, request)
                except OSError:
                    pass

    def close(self) -> None:
        self.listener.shutdown(socket.SHUT_RDWR)
        self.listener.close()
        self.thread.join(10)


def _client_env(**extra: str) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith("FASTFC_")}
    env["PYTHONPATH"] = str(ROOT)
    env.update(extra)
    return env


def test_both_clients_send_the_same_request_and_copy_the_same_bytes(tmp_path):
    """The request (command line, working directory, FASTFC_* and terminal
    variables, stream encodings) and the output, byte for byte, exit
    status included."""
    def answer(conn, request):
        control._send(conn, b"o", "grüße ✓\n".encode())
        control._send(conn, b"e", b"\xff raw bytes\n")
        control._send(conn, b"o", b"more\n")
        control._send(conn, b"x", b'{"status": 3}')

    stand_in = StandIn(tmp_path / "u", answer)
    try:
        got = []
        for client in (FULL, LEAN):
            env = _client_env(FASTFC_UNIT="u", FASTFC_REMOTE_UNIT="r", COLUMNS="77",
                              NO_COLOR="1", UNRELATED="x")
            p = subprocess.run([*client, "-r", "r", "showgmir", "S", "--json"], cwd=tmp_path,
                               env=env, capture_output=True, timeout=60)
            got.append((p.returncode, p.stdout, p.stderr))
        assert got[0] == got[1] == (3, "grüße ✓\nmore\n".encode(), b"\xff raw bytes\n")
        full, lean = stand_in.requests
        assert full == lean
        assert lean["argv"] == ["-r", "r", "showgmir", "S", "--json"]
        assert lean["env"]["COLUMNS"] == "77" and "UNRELATED" not in lean["env"]
        assert lean["env"]["FASTFC_REMOTE_UNIT"] == "r" and lean["cwd"] == str(tmp_path)
    finally:
        stand_in.close()


@pytest.mark.slow
@pytest.mark.parametrize("answer", [{"status": 1, "stopped": True},
                                    {"status": 130, "not_run": True}, {"status": 0}, None])
def test_ctrl_c_through_either_client_says_the_same(tmp_path, answer):
    """Ctrl-C (SIGINT) while the server runs the command: the client asks
    the server to stop it and says in one line what became of it, exit
    130, the same bytes from either client (None: no answer in time)."""
    asked = threading.Event()

    def script(conn, request):
        control._send(conn, b"e", b"working\n")
        frame = control._recv(conn, deadline=time.monotonic() + 30)
        if frame is not None and frame[0] == b"c":
            asked.set()
            if answer is not None:
                control._send(conn, b"e", b"left: 3 tracks\n")
                control._send(conn, b"x", json.dumps(answer).encode())
            else:
                time.sleep(3)       # past CANCEL_WAIT

    stand_in = StandIn(tmp_path / "u", script)
    try:
        got = []
        for client in (FULL, LEAN):
            asked.clear()
            p = subprocess.Popen([*client, "-u", "u", "waitflash", "X:Y"], cwd=tmp_path,
                                 env=_client_env(), stdout=subprocess.PIPE,
                                 stderr=subprocess.PIPE)
            first = p.stderr.readline()     # type: ignore[union-attr]
            assert first == b"working\n"
            p.send_signal(signal.SIGINT)
            out, err = p.communicate(timeout=60)
            assert asked.is_set()
            got.append((p.returncode, out, first + err))
        assert got[0] == got[1], got
        status, _, err = got[1]
        assert status == 130
        assert err.decode().splitlines()[-1].startswith("fastfc: Ctrl-C: ")
    finally:
        stand_in.close()


@pytest.mark.slow
def test_a_server_gone_mid_command_reads_the_same_through_either_client(tmp_path):
    """The server closes the connection before the exit status: one
    error line, exit 1, after the output that came."""
    def script(conn, request):
        control._send(conn, b"o", b"established\n")

    stand_in = StandIn(tmp_path / "u", script)
    try:
        got = []
        for client in (FULL, LEAN):
            p = subprocess.run([*client, "-u", "u", "mkflash", "a:b"], cwd=tmp_path,
                               env=_client_env(), capture_output=True, timeout=60)
            got.append((p.returncode, p.stdout, p.stderr))
        assert got[0] == got[1]
        assert got[1] == (1, b"established\n", b"Error: the server holding u closed the "
                          b"connection before the command finished: what it did is unknown "
                          b"(look with the ls* and show* commands)\n")
    finally:
        stand_in.close()


def test_the_lean_client_imports_neither_click_nor_numpy_nor_the_engine(tmp_path):
    """Run as the console script runs it, against a stand-in server: what
    it imported, looked at when the process ends."""
    stand_in = StandIn(tmp_path / "u", lambda conn, request: (
        control._send(conn, b"o", b"[]\n"), control._send(conn, b"x", b'{"status": 0}')))
    record = tmp_path / "modules.json"
    code = ("import atexit, json, sys\n"
            f"atexit.register(lambda: open({str(record)!r}, 'w').write(json.dumps("
            "sorted(sys.modules))))\n"
            "sys.argv = ['fastfc', '-u', 'u', 'lsvol', '--json']\n"
            "from fastfc_client import main\n"
            "sys.exit(main())\n")
    try:
        p = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=_client_env(),
                           capture_output=True, timeout=60)
    finally:
        stand_in.close()
    assert (p.returncode, p.stdout, p.stderr) == (0, b"[]\n", b"")
    modules = json.loads(record.read_text())
    heavy = [m for m in modules if m.split(".")[0] in ("click", "numpy", "fastfc", "rich")]
    assert heavy == [] and "fastfc_client" in modules


@pytest.mark.slow
def test_without_a_server_it_is_the_full_command_line(tmp_path):
    """No control socket (and a stale one): the full command line opens
    the unit itself; usage errors are its own."""
    env = _client_env()
    for args in (["-u", "u", "mkvol", "a", "--tracks", "2", "--track-size", "4K"],
                 ["-u", "u", "lsvol", "--json"], ["-u", "u", "nosuch"]):
        got = [subprocess.run([*client, *args], cwd=tmp_path, env=env, capture_output=True,
                              timeout=120) for client in (FULL, LEAN)]
        if args[2] == "mkvol":      # made once; the second run says it exists
            assert got[0].returncode == 0 and got[1].returncode == 1
            continue
        assert [(g.returncode, g.stdout, g.stderr) for g in got][0] == \
            (got[1].returncode, got[1].stdout, got[1].stderr), args
    stale = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    stale.bind(str(tmp_path / "u" / control.SOCKET))
    stale.close()           # a socket file nobody listens on
    p = subprocess.run([*LEAN, "-u", "u", "lsvol", "--json"], cwd=tmp_path, env=env,
                       capture_output=True, timeout=120)
    assert p.returncode == 0 and [v["name"] for v in json.loads(p.stdout)] == ["a"]
