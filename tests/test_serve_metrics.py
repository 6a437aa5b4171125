"""An operator's view of ``fastfc serve``: ``serve --metrics-port`` (the
Prometheus text format, scraped with urllib and read by a small parser
here), RPO alerts (``mkgmir``/``chgmir --rpo-alert``: a WARNING line and a
metric), and ``showgmir``'s fields, ``--json`` and ``--watch``.

The server tests start real ``fastfc serve`` processes (tests/test_serve.py's
``serving``) and write to the A exports with the minimal NBD client of
tests/test_serve_protocol.py.
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from fastfc.tools import nbd
from test_serve import ROOT, fastfc_cli, make_unit, serving
from test_serve_protocol import Client

MIB = 1 << 20
BLOCK = 4096


# -- reading the exposition format ---------------------------------------------------
_SAMPLE = re.compile(r'^([a-zA-Z_:][a-zA-Z0-9_:]*)(\{(.*)\})? (\S+)$')
_LABEL = re.compile(r'([a-zA-Z_][a-zA-Z0-9_]*)="((?:[^"\\]|\\.)*)"')


def parse(text: str) -> tuple[dict, dict]:
    """``({(name, frozenset(labels)): value}, {family: type})`` of a
    scrape, checking each sample's family has HELP and TYPE lines first."""
    samples, types, helps = {}, {}, set()
    for line in text.splitlines():
        if line.startswith("# HELP "):
            helps.add(line.split()[2])
        elif line.startswith("# TYPE "):
            _, _, name, kind = line.split()
            types[name] = kind
        elif line and not line.startswith("#"):
            m = _SAMPLE.match(line)
            assert m, f"not a sample line: {line!r}"
            name, _, labels, value = m.groups()
            family = re.sub(r"_(bucket|sum|count)$", "", name) \
                if re.sub(r"_(bucket|sum|count)$", "", name) in types else name
            assert family in types and family in helps, f"{name}: no HELP/TYPE before it"
            key = (name, frozenset(_LABEL.findall(labels or "")))
            assert key not in samples, f"{line!r} twice"
            samples[key] = float(value)
    return samples, types


def value(samples: dict, name: str, **labels: str) -> float | None:
    want = set(labels.items())
    found = [v for (n, ls), v in samples.items() if n == name and want <= set(ls)]
    assert len(found) <= 1, (name, labels, found)
    return found[0] if found else None


def scrape(url: str) -> dict:
    with urllib.request.urlopen(url, timeout=30) as r:
        assert r.status == 200
        assert r.headers["Content-Type"].startswith("text/plain; version=0.0.4")
        return parse(r.read().decode())[0]


class StderrLines:
    """The server's stderr, line by line, read on a thread (so the pipe
    never fills); ``url`` is the metrics address it printed."""

    def __init__(self, proc: subprocess.Popen) -> None:
        self.lines: list[str] = []
        while True:
            line = proc.stderr.readline()
            assert line, "the server ended before saying where its metrics are"
            self.lines.append(line)
            m = re.search(r"metrics on (http://127\.0\.0\.1:\d+/metrics)", line)
            if m:
                self.url = m.group(1)
                break
        self._proc = proc
        self._thread = threading.Thread(target=self._read, daemon=True)
        self._thread.start()

    def _read(self) -> None:
        for line in self._proc.stderr:
            self.lines.append(line)

    def text(self) -> str:
        return "".join(self.lines)


def until(what, timeout: float = 60, every: float = 0.05):
    """``what()`` once it is truthy (no timed assert: a deadline against a hang)."""
    deadline = time.monotonic() + timeout
    while True:
        got = what()
        if got:
            return got
        assert time.monotonic() < deadline, "still not so after the deadline"
        time.sleep(every)


@pytest.fixture
def units(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    make_unit(a, "A0", "A1", size=MIB)
    make_unit(b, "B0", "B1", "C0", "C1", size=MIB)
    fastfc_cli("-u", a, "-r", b, "mkgmir", "S", "A0:B0:C0", "A1:B1:C1",
               "--cg-interval", "0.02")
    return a, b, tmp_path / "nbd.sock"


def cli(a: Path, *args, check=True) -> subprocess.CompletedProcess:
    """``fastfc -u a ARGS`` run in this process (no interpreter to start):
    sent to the server holding ``a`` when one does, as the fastfc client
    sends it (:func:`control.forward`), else run as a direct command."""
    import io
    from click.testing import CliRunner
    from fastfc.tools.cli import control, main
    argv = ["-u", str(a), *map(str, args)]
    out, err = io.BytesIO(), io.BytesIO()
    status = control.forward(a, argv, "fastfc", stdout=out, stderr=err,
                             stdout_text=io.StringIO(), stderr_text=io.StringIO())
    if status is None:
        r = CliRunner().invoke(main, argv)
        status, out_text, err_text = r.exit_code, r.stdout, r.stderr
    else:
        out_text, err_text = out.getvalue().decode(), err.getvalue().decode()
    result = subprocess.CompletedProcess(argv, status, out_text, err_text)
    if check:
        assert status == 0, (args, out_text, err_text)
    return result


def show(a: Path) -> dict:
    return json.loads(cli(a, "showgmir", "S", "--json").stdout)


# -- the metrics endpoint ------------------------------------------------------------
@pytest.mark.slow
def test_metrics_of_a_running_session_and_its_exports(units):
    a, b, sock = units
    with serving(a, sock, "--metrics-port", "0", remote=b) as proc:
        err = StderrLines(proc)
        url = err.url
        first = scrape(url)
        assert value(first, "fastfc_gm_running", session="S") == 0
        assert value(first, "fastfc_gm_rpo_seconds", session="S") is None   # no CG yet
        assert value(first, "fastfc_nbd_writes_total", export="A0") is None
        cli(a, "chgmir", "S", "--rpo-alert", "0.000001")
        cli(a, "resumegmir", "S")
        # writes through the A0 export: counted exactly, with their bytes
        c = Client(str(sock))
        try:
            assert c.go("A0")[-1][0] == nbd.REP_ACK
            for i in range(25):
                assert c.request(nbd.CMD_WRITE, i * BLOCK, BLOCK, bytes([i]) * BLOCK)[0] == 0
            assert c.request(nbd.CMD_READ, 0, 2 * BLOCK)[0] == 0
            assert c.request(nbd.CMD_WRITE, MIB, BLOCK, bytes(BLOCK))[0] == nbd.E_NOSPC
        finally:
            c.s.close()
        one = until(lambda: (s := scrape(url)) and
                    value(s, "fastfc_gm_cg_total", session="S", outcome="committed",
                          cause="none") and s)
        cgs = value(one, "fastfc_gm_cg_total", session="S", outcome="committed", cause="none")
        two = until(lambda: (s := scrape(url)) and
                    value(s, "fastfc_gm_cg_total", session="S", outcome="committed",
                          cause="none") > cgs and s)
        assert value(two, "fastfc_gm_cg_sequence", session="S") >= cgs + 1
        rpo = value(two, "fastfc_gm_rpo_seconds", session="S", unit=str(b))
        assert rpo is not None and math.isfinite(rpo) and 0 <= rpo < 60
        assert value(two, "fastfc_gm_running", session="S") == 1
        assert value(two, "fastfc_gm_bytes_drained_total", session="S") >= 25 * BLOCK
        assert value(two, "fastfc_nbd_writes_total", export="A0") == 26
        assert value(two, "fastfc_nbd_write_bytes_total", export="A0") == 25 * BLOCK
        assert value(two, "fastfc_nbd_errors_total", export="A0", op="write") == 1
        assert value(two, "fastfc_nbd_reads_total", export="A0") == 1
        assert value(two, "fastfc_nbd_read_bytes_total", export="A0") == 2 * BLOCK
        assert value(two, "fastfc_nbd_request_seconds_count", export="A0", op="write") == 26
        assert value(two, "fastfc_nbd_request_seconds_bucket", export="A0", op="write",
                     le="+Inf") == 26
        assert value(two, "fastfc_nbd_request_seconds_sum", export="A0", op="write") > 0
        # the alert: the RPO is above 1 us from the first look on
        two = until(lambda: (s := scrape(url)) and
                    value(s, "fastfc_gm_rpo_alert", session="S") == 1 and s)
        assert value(two, "fastfc_gm_rpo_alerts_total", session="S") == 1
        assert value(two, "fastfc_gm_rpo_alert_threshold_seconds", session="S") == 1e-6
        line = until(lambda: [x for x in err.lines if "above its alert threshold" in x])
        assert len(line) == 1 and "session S" in line[0] and "1e-06 s" in line[0], line
        s = show(a)
        assert s["rpo_alert"] == 1e-6 and s["rpo_alerting"] is True and s["rpo_alerts"] == 1
        assert 0 <= s["rpo_p50"] <= s["rpo_p99"] < 60 and s["cg_per_second"] > 0
        assert s["bytes_drained"] >= 25 * BLOCK and s["last_failure"] is None
        assert "ALERTING" in cli(a, "showgmir", "S").stdout
        # a threshold it stays within: the alert goes off (the count stays)
        cli(a, "chgmir", "S", "--rpo-alert", "3600")
        two = until(lambda: (s := scrape(url)) and
                    value(s, "fastfc_gm_rpo_alert", session="S") == 0 and s)
        assert value(two, "fastfc_gm_rpo_alerts_total", session="S") == 1
        assert show(a)["rpo_alerting"] is False
        # any other path: 404
        with pytest.raises(urllib.error.HTTPError) as e:
            urllib.request.urlopen(url.replace("/metrics", "/other"), timeout=30)
        assert e.value.code == 404
        cli(a, "pausegmir", "S")
        assert value(scrape(url), "fastfc_gm_running", session="S") == 0


@pytest.mark.slow
def test_a_metrics_port_in_use_is_refused(units):
    """--metrics-port N on a port in use: the server says so and exits 1."""
    import socket
    a, b, sock = units
    taken = socket.socket()
    taken.bind(("127.0.0.1", 0))
    taken.listen(1)
    try:
        port = taken.getsockname()[1]
        r = subprocess.run([sys.executable, "-m", "fastfc", "-u", str(a), "-r", str(b),
                            "serve", "--socket", str(sock), "--metrics-port", str(port)],
                           env=dict(os.environ, PYTHONPATH=str(ROOT)), capture_output=True,
                           text=True, timeout=60)
        assert r.returncode == 1 and "Address already in use" in r.stderr, r.stderr
        assert not sock.exists()
    finally:
        taken.close()


# -- the RPO alert in the loops, in this process -------------------------------------
def test_rpo_alert_logs_one_warning_and_one_info_line(caplog):
    from fastfc import GlobalMirror, Volume
    from fastfc.tools.cli.loops import SessionLoops
    gm = GlobalMirror([tuple(Volume(4, 4096) for _ in range(3))], name="S", cg_interval=0.01)
    loops = SessionLoops()
    caplog.set_level(logging.INFO, logger="fastfc.gmir")
    try:
        loops.start(gm, rpo_alert=1e-6)
        until(lambda: loops.alert(gm).alerting)
        loops.check_alerts()
        loops.check_alerts()
        loops.set_rpo_alert(gm, 3600)
        until(lambda: not loops.alert(gm).alerting)
        loops.check_alerts()
        loops.set_rpo_alert(gm, 1e-6)
        until(lambda: loops.alert(gm).alerting)
        loops.stop(gm)
        assert loops.alert(gm).alerting is False and loops.alert(gm).alerts == 2
    finally:
        loops.stop_all()
    said = [(r.levelname, r.getMessage()) for r in caplog.records if r.name == "fastfc.gmir"]
    assert [lv for lv, _ in said] == ["WARNING", "INFO", "WARNING", "INFO"], said
    assert re.match(r"Global Mirror session S: RPO \d+\.\d{3} s is above its alert threshold "
                    r"1e-06 s$", said[0][1]), said
    assert "is back within its alert threshold 3600 s" in said[1][1]
    assert said[3][1] == "Global Mirror session S: RPO alert off: its loop stopped"


# -- showgmir ------------------------------------------------------------------------
def test_showgmir_json_gives_the_last_failure_and_the_threshold(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    make_unit(a, "A0", size=MIB)
    make_unit(b, "B0", "C0", size=MIB)
    cli(a, "-r", b, "mkgmir", "S", "A0:B0:C0", "--rpo-alert", "2.5")
    s = show(a)
    assert s["last_failure"] is None and s["rpo_alert"] == 2.5
    assert s["rpo_p50"] is None and s["rpo_p99"] is None and s["rpo"] is None
    assert s["rpo_alerting"] is None and s["cg_per_second"] is None
    cli(a, "formcg", "S", "--count", "2")
    t0 = time.time()
    r = cli(a, "formcg", "S", "--inject", "prepare:B0", check=False)
    assert r.returncode == 1
    s = show(a)                           # a new process: the failure was recorded
    f = s["last_failure"]
    assert f["cause"] == "prepare_failed" and f["sequence"] == 3
    assert "InjectedFault" in f["detail"] and t0 - 1 <= f["time"] <= time.time()
    assert s["failures"] == {"prepare_failed": 1} and s["successes"] == 2
    assert s["bytes_drained"] >= MIB and math.isfinite(s["rpo"])
    text = cli(a, "showgmir", "S").stdout
    assert re.search(r"Last failure\s+\d{4}-\d\d-\d\d \d\d:\d\d:\d\d: CG 3 prepare_failed "
                     r"\(prepare of B0: InjectedFault", text), text
    assert re.search(r"RPO alert\s+above 2\.5 s \(watched while a server runs", text), text
    cli(a, "formcg", "S")                 # a success keeps the last failure
    assert show(a)["last_failure"] == f
    assert "RPO alert off (was above 2.5 s)" in cli(a, "chgmir", "S", "--rpo-alert",
                                                    "off").stdout
    assert show(a)["rpo_alert"] is None
    assert cli(a, "chgmir", "S", "--rpo-alert", "-1", check=False).returncode == 2
    assert cli(a, "chgmir", "S", "--rpo-alert", "soon", check=False).returncode == 2


def test_counters_from_before_the_last_failure_was_kept(tmp_path):
    """A record without ``last_failure`` (an older fastfc's) restores with
    none; a unit without its table (opened read-only) reads as before."""
    import sqlite3
    from fastfc import GlobalMirror, StorageUnit, faults
    from fastfc.copyservices.globalmirror import GMStats
    st = GMStats()
    st.restore({"sequence": 4, "attempts": 5, "successes": 4, "failures": {"link_down": 1},
                "commit_failures_resolved": 0, "last_cg_time": 1.0, "bytes_drained": 9})
    assert st.last_failure is None and st.attempts == 5
    with StorageUnit(tmp_path / "u") as u:
        trip = tuple(u.create_volume(n, 4, 4096) for n in ("A", "B", "C"))
        gm = GlobalMirror([trip], name="S")
        faults.inject("prepare", trip[1])
        try:
            gm.form_consistency_group()
        finally:
            faults.clear()
    db = sqlite3.connect(tmp_path / "u" / "unit.db")
    db.execute("DROP TABLE session_failures")
    db.commit()
    db.close()
    with StorageUnit(tmp_path / "u", readonly=True) as u:
        rec = u.session_record("S")["stats"]
        assert rec["attempts"] == 1 and rec["last_failure"] is None
    with StorageUnit(tmp_path / "u") as u:      # read-write: the table is back
        gm = u.session("S")
        faults.inject("coordinate")
        try:
            gm.form_consistency_group()
        finally:
            faults.clear()
    with StorageUnit(tmp_path / "u", readonly=True) as u:
        assert u.session("S").stats.last_failure["cause"] == "coordination_timeout"


# -- showgmir --watch ----------------------------------------------------------------
class Lines:
    def __init__(self, proc: subprocess.Popen) -> None:
        self.lines: list[str] = []
        self._proc = proc
        self._t = threading.Thread(target=self._read, daemon=True)
        self._t.start()

    def _read(self) -> None:
        for line in self._proc.stdout:
            self.lines.append(line)

    def join(self) -> None:
        self._t.join(timeout=60)


def _watch(a: Path, *args: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "fastfc", "-u", str(a), "showgmir", "S",
                             "--watch", *args], env=dict(os.environ, PYTHONPATH=str(ROOT)),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _interrupted(proc: subprocess.Popen) -> str:
    proc.send_signal(signal.SIGINT)
    try:
        _, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    return err


def test_watch_without_a_server_redraws_until_ctrl_c(units):
    a, _, _ = units
    proc = _watch(a, "0.1")
    out = Lines(proc)
    until(lambda: sum(line.startswith("Session ") for line in out.lines) >= 2)
    err = _interrupted(proc)
    out.join()
    assert proc.returncode == 0, err
    blocks = "".join(out.lines).split("Session ")[1:]
    assert len(blocks) >= 2 and all("CG sequence" in b and "RPO alert" in b for b in blocks)
    assert "\x1b" not in "".join(out.lines)         # no terminal codes in a pipe
    assert "Traceback" not in err and "Aborted" not in err, err


@pytest.mark.slow
def test_watch_forwarded_to_the_server_ends_there_on_ctrl_c(units):
    a, b, sock = units
    with serving(a, sock, remote=b):
        cli(a, "resumegmir", "S")
        proc = _watch(a, "0.1", "--json")
        out = Lines(proc)
        until(lambda: len(out.lines) >= 3)
        err = _interrupted(proc)
        out.join()
        # a forwarded command's Ctrl-C: stopped in the server, and the client
        # says so and exits 130 (as every forwarded command does)
        assert proc.returncode == 130 and "stopped in the server" in err, err
        frames = [json.loads(line) for line in out.lines if line.strip()]
        assert len(frames) >= 3 and all(f["loop"] == "running" for f in frames)
        assert frames[0]["cg_per_second_recent"] is None
        assert frames[-1]["cg_sequence"] >= frames[0]["cg_sequence"]
        assert all(f["cg_per_second_recent"] is not None for f in frames[1:])
        # the server ended it: the next command runs
        r = cli(a, "lsgmir", "--json")
        assert json.loads(r.stdout)[0]["state"] == "running"
        # a watch the server runs ends when the server stops, and says so
        proc = _watch(a, "0.1", "--json")
        out = Lines(proc)
        until(lambda: len(out.lines) >= 2)
    try:
        proc.wait(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    err = proc.stderr.read()
    assert proc.returncode == 0 and "the server holding the unit stops" in err, err
