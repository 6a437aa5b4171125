"""The watcher beside each forwarded command (``control._watch``): the
command's exit status goes out as soon as the command ends, not when the
watcher next looks (every ``WATCH_INTERVAL_MS``), and a client that hangs up
still cancels its command at once. The interval is set to two minutes here:
a status that waited for it would hold each call for that long."""

from __future__ import annotations

import pytest

import io
import json
import socket
import threading
import time

from contextlib import contextmanager

from fastfc import StorageUnit
from fastfc.tools.cli import control
from fastfc.tools.cli.units import Units


@contextmanager
def hosted(tmp_path, monkeypatch):
    """A unit hosted in this process (within the test: pytest swaps
    ``sys.stdout`` between a fixture and the test, and hosting routes it)."""
    monkeypatch.setattr(control, "WATCH_INTERVAL_MS", 120_000)
    unit = tmp_path / "u"
    with StorageUnit(unit) as u:
        u.create_volume("V", 4, 4096)
    units = Units(str(unit), None)
    units.local()
    lock = threading.RLock()
    try:
        with control.hosting(units, lock):
            yield unit, units, lock
    finally:
        units.close()


def forwarded(unit, *args: str, timeout: float = 30) -> tuple[int | None, str]:
    """``fastfc -u UNIT ARGS`` forwarded from a thread; fails if no answer
    came within ``timeout`` seconds (a quarter of the watcher's interval)."""
    got: list = []
    out, err = io.BytesIO(), io.BytesIO()

    def call() -> None:
        got.append(control.forward(unit, ["-u", str(unit), *args], "fastfc", stdout=out,
                                   stderr=err, stdout_text=io.StringIO(),
                                   stderr_text=io.StringIO()))

    t = threading.Thread(target=call, daemon=True)
    t.start()
    t.join(timeout)
    assert not t.is_alive(), f"{args}: no exit status within {timeout} s"
    return got[0], (out.getvalue() + err.getvalue()).decode()


def test_the_exit_status_does_not_wait_for_the_watcher(tmp_path, monkeypatch):
    with hosted(tmp_path, monkeypatch) as (unit, _, _):
        for _ in range(3):
            status, said = forwarded(unit, "lsvol", "--json")
            assert status == 0 and [v["name"] for v in json.loads(said)] == ["V"]
        status, said = forwarded(unit, "rmvol", "nope")
        assert status == 1 and "nope" in said


@pytest.mark.slow
def test_a_client_that_hangs_up_still_cancels_its_command(tmp_path, monkeypatch):
    """Queued behind the server's lock, its client gone: the command is
    not run (the watcher saw the hang-up without waiting its interval)."""
    with hosted(tmp_path, monkeypatch) as (unit, units, lock):
        with lock:
            s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            s.connect(str(unit / control.SOCKET))
            request = control._request(["-u", str(unit), "mkvol", "X", "--tracks", "1"],
                                       "fastfc", io.StringIO(), io.StringIO(), io.BytesIO(),
                                       io.BytesIO())
            control._send(s, b"q", json.dumps(request).encode())
            s.close()
            time.sleep(1.0)     # the server reads the request and queues for the lock
        status, said = forwarded(unit, "lsvol", "--json")    # after the cancelled one
        assert status == 0 and [v["name"] for v in json.loads(said)] == ["V"]
        assert "X" not in units.local()
