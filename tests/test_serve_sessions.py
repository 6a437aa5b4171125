"""Global Mirror sessions that run in ``fastfc serve``: ``resumegmir`` starts
a session's loop in the server, ``pausegmir`` stops it, ``lsgmir`` lists
sessions, ``chgmir`` changes a session's bounds; a running session survives
a server restart (and a SIGKILL), a paused one stays paused.

Each test starts real ``fastfc serve`` processes and drives them with the
command line (through the control socket), writing to the A exports with a
minimal NBD client (tests/test_serve_protocol.py's). Every write carries a
tag, its place in the order the writes were made (one at a time, each
answered before the next): the C volumes hold a consistency group when
their tags are those of one prefix of that order.
"""

from __future__ import annotations

import json
import re
import signal
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from fastfc.tools import nbd
from test_serve import fastfc_cli, make_unit, serving, volume_bytes
from test_serve_protocol import Client

MIB = 1 << 20
BLOCK = 4096
SIZE = MIB
BLOCKS = SIZE // BLOCK


# -- writes with tags ----------------------------------------------------------------
class Writer:
    """Writes to A0 and A1 in turn, one at a time, each 4 KiB block filled
    with the write's tag (1, 2, ...); ``log`` is (tag, volume, block) in the
    order made, each logged before it is sent (a write cut off by a kill
    may or may not have reached A)."""

    def __init__(self, sock: Path, log: list) -> None:
        self.log = log
        self.clients = []
        for name in ("A0", "A1"):
            c = Client(str(sock))
            assert c.go(name)[-1][0] == nbd.REP_ACK
            self.clients.append(c)
        self.stop = threading.Event()
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        try:
            while not self.stop.is_set():
                tag = len(self.log) + 1
                k, block = tag % 2, (tag // 2 * 7) % BLOCKS
                self.log.append((tag, k, block))
                data = np.full(BLOCK // 4, tag, np.uint32).tobytes()
                err, _ = self.clients[k].request(nbd.CMD_WRITE, block * BLOCK, BLOCK, data)
                assert err == 0, err
                time.sleep(0.002)
        except BaseException as e:     # the server killed under it: expected then
            self.error = e

    def __enter__(self) -> "Writer":
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop.set()
        self.thread.join(timeout=60)
        for c in self.clients:
            c.s.close()

    def wait_writes(self, n: int) -> None:
        start = len(self.log)
        deadline = time.monotonic() + 60
        while len(self.log) < start + n:
            assert self.error is None, self.error
            assert time.monotonic() < deadline, "the writes stalled"
            time.sleep(0.02)


def tags(image: np.ndarray) -> np.ndarray:
    """Each block's tag (0: never written), checking the block is one tag."""
    words = image.view(np.uint32).reshape(BLOCKS, BLOCK // 4)
    assert (words == words[:, :1]).all(), "a block holds parts of two writes"
    return words[:, 0]


def assert_one_prefix(log: list, c_images: list[np.ndarray]) -> int:
    """The C images hold the writes of one prefix of ``log`` (a consistency
    group: no write without every write made before it); returns its length."""
    got = [tags(img) for img in c_images]
    k = int(max(g.max() for g in got))
    expect = [np.zeros(BLOCKS, np.uint32) for _ in c_images]
    for tag, vol, block in log[:k]:
        expect[vol][block] = tag
    for i, (g, e) in enumerate(zip(got, expect)):
        assert np.array_equal(g, e), (f"C{i} is not the image after write {k}: blocks "
                                      f"{np.flatnonzero(g != e)[:10]}")
    return k


def read_export(sock: Path, name: str) -> np.ndarray:
    c = Client(str(sock))
    try:
        assert c.go(name)[-1][0] == nbd.REP_ACK
        err, data = c.request(nbd.CMD_READ, 0, SIZE)
        assert err == 0, err
        return np.frombuffer(data, np.uint8)
    finally:
        c.s.close()


# -- the command line ----------------------------------------------------------------
def cli(a: Path, *args, check=True):
    return fastfc_cli("-u", a, *args, check=check)


def show(a: Path, session: str = "S") -> dict:
    return json.loads(cli(a, "showgmir", session, "--json").stdout)


def sessions(a: Path) -> dict:
    return {r["session"]: r for r in json.loads(cli(a, "lsgmir", "--json").stdout)}


def rises(a: Path, by: int = 3, timeout: float = 60) -> None:
    """The CG sequence goes up by ``by`` with no command forming CGs."""
    start = show(a)["cg_sequence"]
    deadline = time.monotonic() + timeout
    while show(a)["cg_sequence"] < start + by:
        assert time.monotonic() < deadline, f"CG sequence stuck at {start}"
        time.sleep(0.1)


def stays(a: Path, seconds: float = 1.0) -> int:
    first = show(a)["cg_sequence"]
    time.sleep(seconds)
    assert show(a)["cg_sequence"] == first
    return first


@pytest.fixture
def units(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    make_unit(a, "A0", "A1", "A2", size=SIZE)
    make_unit(b, "B0", "B1", "B2", "C0", "C1", "C2", size=SIZE)
    fastfc_cli("-u", a, "-r", b, "mkgmir", "S", "A0:B0:C0", "A1:B1:C1",
               "--cg-interval", "0.05")
    fastfc_cli("-u", a, "-r", b, "mkgmir", "P", "A2:B2:C2")
    return a, b, tmp_path / "nbd.sock"


# -- the tests -----------------------------------------------------------------------
def test_help_lists_the_session_verbs():
    out = fastfc_cli("--help").stdout
    for cmd in ("lsgmir", "chgmir", "resumegmir", "pausegmir"):
        assert re.search(rf"^\s+{cmd}\s", out, re.MULTILINE), cmd


@pytest.mark.slow
def test_without_a_server(units):
    a, b, _ = units
    r = cli(a, "resumegmir", "S", check=False)
    assert r.returncode == 1
    assert "no server holds" in r.stderr and "serve" in r.stderr and "formcg S" in r.stderr
    r = cli(a, "resumegmir", "nope", check=False)
    assert r.returncode == 1 and "no Global Mirror session named 'nope'" in r.stderr
    assert "already paused" in cli(a, "pausegmir", "S").stdout
    rows = sessions(a)
    assert rows["S"]["state"] == rows["P"]["state"] == "paused"
    assert rows["S"]["triplets"] == 2 and rows["P"]["triplets"] == 1
    assert rows["S"]["cg_sequence"] == 0 and rows["S"]["rpo"] is None
    out = cli(a, "lsgmir").stdout
    assert re.search(r"^S\s+paused\s+2\s+0\s", out, re.MULTILINE), out
    # chgmir: recorded, shown, kept; bad values refused before anything changes
    out = cli(a, "chgmir", "S", "--cg-interval", "0.25", "--coord-time", "20",
              "--drain-time", "30").stdout
    assert "CG interval 0.25 s (was 0.05 s)" in out and "max drain time 30 s" in out
    s = show(a)
    assert (s["cg_interval"], s["max_coordination_time"], s["max_drain_time"]) == \
        (0.25, 0.02, 30.0)
    assert cli(a, "chgmir", "S", "--cg-interval", "-1", check=False).returncode == 2
    assert cli(a, "chgmir", "S", check=False).returncode == 2
    assert show(a)["cg_interval"] == 0.25
    assert sessions(a)["S"]["cg_interval"] == 0.25
    # a foreground formcg still works without a server
    cli(a, "formcg", "S", "--count", "2")
    assert show(a)["cg_sequence"] == 2
    # recorded as running (its server gone): pausegmir here clears the record
    from fastfc import StorageUnit
    with StorageUnit(a), StorageUnit(b) as u:    # the session needs both
        u.configure_session("S", running=True)
    assert sessions(a)["S"]["resumes_when_served"]
    assert "resumes when served" in cli(a, "lsgmir").stdout
    assert "resumes when fastfc serve holds the unit" in cli(a, "showgmir", "S").stdout
    out = cli(a, "pausegmir", "S").stdout
    assert "paused Global Mirror session S: every C volume at CG 2" in out
    assert "no server ran it" in out
    assert not sessions(a)["S"]["resumes_when_served"]
    assert "already paused" in cli(a, "pausegmir", "S").stdout
    # the primary unit away: lsgmir at the secondary says so
    a.rename(a.with_name("away"))
    rows = {r["session"]: r for r in json.loads(fastfc_cli("-u", b, "lsgmir", "--json").stdout)}
    assert rows["S"]["state"] == rows["P"]["state"] == "primary unavailable"
    assert rows["S"]["cg_sequence"] == 2 and rows["S"]["triplets"] == 2
    r = fastfc_cli("-u", b, "resumegmir", "S", check=False)
    assert r.returncode == 1 and "needs its primary" in r.stderr, r.stderr


@pytest.mark.slow
def test_sessions_run_in_the_server_and_survive_restarts(units):
    a, b, sock = units
    log: list = []
    with serving(a, sock, remote=b) as proc:
        out = cli(a, "resumegmir", "S").stdout
        assert "resumed Global Mirror session S" in out
        assert "already running" in cli(a, "resumegmir", "S").stdout
        with Writer(sock, log) as w:
            w.wait_writes(20)
            rises(a)                            # no foreground command forms them
            vols = {v["name"] for v in json.loads(cli(a, "lsvol", "--json").stdout)}
            assert vols == {"A0", "A1", "A2"}     # answered while the loop runs
            cli(a, "mkvol", "X", "--tracks", "4")   # commands that change the units too
            cli(a, "rmvol", "X")
            rows = sessions(a)
            assert rows["S"]["state"] == "running" and rows["P"]["state"] == "paused"
            assert rows["S"]["rpo"] is not None and rows["S"]["cg_per_second"] is not None
            s = show(a)
            assert s["state"] == "running" and s["loop"] == "running"
            # a running session is not removed, nor driven by formcg
            r = cli(a, "rmgmir", "S", check=False)
            assert r.returncode == 1 and "pausegmir S first" in r.stderr
            r = cli(a, "formcg", "S", check=False)
            assert r.returncode == 1 and "pausegmir S first" in r.stderr
            # chgmir on the running session: at once, and recorded
            assert "from its next CG" in cli(a, "chgmir", "S", "--cg-interval", "0.02").stdout
            assert show(a)["cg_interval"] == 0.02
            rises(a)
            # pausegmir while the writes go on: the sequence stops
            assert "paused Global Mirror session S" in cli(a, "pausegmir", "S").stdout
            assert "already paused" in cli(a, "pausegmir", "S").stdout
            w.wait_writes(20)
            n = stays(a)
        assert n >= 3
        s = show(a)
        assert s["loop"] == "paused" and len(set(s["c_sequences"])) == 1
        k = assert_one_prefix(log, [read_export(sock, "C0"), read_export(sock, "C1")])
        assert k > 0
        assert cli(a, "resumegmir", "S").returncode == 0
        rises(a)
    # a restart resumes S (recorded as running), not P
    assert sessions(a)["S"]["resumes_when_served"]      # no server: waits for one
    with serving(a, sock, remote=b, stop=signal.SIGKILL) as proc:
        rises(a)
        rows = sessions(a)
        assert rows["S"]["state"] == "running" and rows["P"]["state"] == "paused"
        assert show(a)["cg_interval"] == 0.02                # chgmir's change kept
        assert show(a, "P")["cg_sequence"] == 0
        with Writer(sock, log) as w:
            w.wait_writes(50)
            rises(a)
            w.wait_writes(20)
            proc.send_signal(signal.SIGKILL)    # mid-writes, mid-CGs
            proc.wait(timeout=60)
    assert "resumed Global Mirror session S" in proc.stderr.read()
    sock.unlink()       # the killed server's: the next one is up when it is there again
    s = show(a)                                 # resolves a CG left in doubt
    assert len(set(s["c_sequences"])) == 1
    assert assert_one_prefix(log, [volume_bytes(b, "C0"), volume_bytes(b, "C1")]) > k
    # resumes after the kill, then paused: it stays paused across a restart
    with serving(a, sock, remote=b):
        rises(a)
        cli(a, "pausegmir", "S")
    with serving(a, sock, remote=b) as proc:
        assert sessions(a)["S"]["state"] == "paused"
        stays(a)
        cli(a, "rmgmir", "S")                   # paused: removed, each C keeping its CG
        assert "S" not in sessions(a)
    assert "resumed" not in proc.stderr.read()


# -- the record: StorageUnit.configure_session ----------------------------------------
def test_configure_session_records_running_and_bounds(tmp_path):
    from fastfc import GlobalMirror, StorageUnit
    with StorageUnit(tmp_path / "u") as u:
        a, b, c = (u.create_volume(n, 4, 4096) for n in ("A", "B", "C"))
        gm = GlobalMirror([(a, b, c)], name="S", cg_interval=0.5)
        gm.form_consistency_group()
        assert u.session_record("S")["running"] is False
        rec = u.configure_session("S", running=True, max_drain_time=7)
        assert rec["running"] is True and rec["max_drain_time"] == 7.0
        assert (gm.cg_interval, gm.max_drain_time) == (0.5, 7.0)
        # bad values: refused, nothing changed
        for bad in ({"cg_interval": -1}, {"max_coordination_time": 0},
                    {"max_drain_time": float("nan")}, {"cg_interval": "1"}):
            with pytest.raises((ValueError, TypeError)):
                u.configure_session("S", running=False, **bad)
        assert u.session_record("S")["running"] is True and gm.cg_interval == 0.5
        with pytest.raises(KeyError):
            u.configure_session("nope", running=True)
        gm.form_consistency_group()
    with StorageUnit(tmp_path / "u") as u:       # kept, and the counters with it
        rec = u.session_record("S")
        assert rec["running"] is True and rec["max_drain_time"] == 7.0
        assert rec["cg_interval"] == 0.5 and rec["stats"]["successes"] == 2
        gm = u.session("S")
        assert gm.max_drain_time == 7.0 and gm.stats.successes == 2
        u.configure_session("S", running=False, cg_interval=0)
    with StorageUnit(tmp_path / "u", readonly=True) as u:
        rec = u.session_record("S")
        assert rec["running"] is False and rec["cg_interval"] == 0.0
        with pytest.raises(Exception, match="read-only"):
            u.configure_session("S", running=True)


def test_a_host_that_is_no_server_runs_no_loops(tmp_path):
    """control.hosting in another program (no fastfc serve, no loops):
    resumegmir says the process runs no session loops; pausegmir and
    lsgmir work as without a server."""
    import io
    from fastfc import GlobalMirror, StorageUnit
    from fastfc.tools.cli import control
    from fastfc.tools.cli.units import Units
    unit = tmp_path / "u"
    with StorageUnit(unit) as u:
        GlobalMirror([tuple(u.create_volume(n, 4, 4096) for n in ("A", "B", "C"))],
                     name="S")
    units = Units(str(unit), None)
    units.local()

    def fwd(*args: str) -> tuple[int | None, str]:
        out, err = io.BytesIO(), io.BytesIO()
        status = control.forward(unit, ["-u", str(unit), *args], "fastfc", stdout=out,
                                 stderr=err, stdout_text=io.StringIO(),
                                 stderr_text=io.StringIO())
        return status, (out.getvalue() + err.getvalue()).decode()

    try:
        with control.hosting(units, threading.RLock()):
            status, said = fwd("resumegmir", "S")
            assert status == 1 and "runs no session loops" in said, said
            assert fwd("pausegmir", "S") == (0, "Global Mirror session S is already paused\n")
            status, said = fwd("lsgmir", "--json")
            assert status == 0 and json.loads(said)[0]["state"] == "paused"
    finally:
        units.close()
