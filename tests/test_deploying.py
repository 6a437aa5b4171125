"""The systemd service of the operator's guide (docs/guide/deploying.md) runs:
its ``ExecStart`` line, with directories of the test's own, serves the units,
takes commands through the control socket, and stops on its ``KillSignal``
within ``TimeoutStopSec`` with exit status 0, as systemd would stop it."""

from __future__ import annotations

import re
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PAGE = ROOT / "docs" / "guide" / "deploying.md"


def service() -> dict[str, str]:
    """The ``[Service]`` settings of the page's ``ini`` block."""
    block = re.search(r"```ini\n(.*?)```", PAGE.read_text(), re.S)
    assert block, "deploying.md has no ini block (the service unit)"
    settings, section = {}, ""
    for line in block.group(1).splitlines():
        if line.startswith("["):
            section = line.strip("[]")
        elif "=" in line and section == "Service":
            key, value = line.split("=", 1)
            settings[key] = value
    return settings


def test_the_service_unit_serves_and_stops_as_systemd_would(tmp_path):
    s = service()
    assert s["Type"] == "simple" and s["Restart"] == "on-failure"
    argv = shlex.split(s["ExecStart"])
    assert argv[0].endswith("/fastfc")
    fastfc = str(Path(sys.executable).with_name("fastfc"))
    run = tmp_path / "run"      # the RuntimeDirectory
    run.mkdir()
    paths = {"/srv/fastfc/site1": str(tmp_path / "site1"),
             "/srv/fastfc/site2": str(tmp_path / "site2"),
             f"/run/{s['RuntimeDirectory']}/": f"{run}/"}
    args = []
    for a in argv[1:]:
        for old, new in paths.items():
            a = a.replace(old, new)
        args.append(a)
    args[args.index("--metrics-port") + 1] = "0"      # any free port: tests run side by side
    for unit in ("site1", "site2"):
        subprocess.run([fastfc, "-u", str(tmp_path / unit), "mkvol", "V", "--size", "1M"],
                       check=True, capture_output=True)
    server = subprocess.Popen([fastfc, *args], stderr=subprocess.PIPE, text=True)
    try:
        sock = run / "nbd.sock"
        deadline = time.monotonic() + 60
        while not sock.exists():
            assert server.poll() is None, server.communicate()[1]
            assert time.monotonic() < deadline, "the server did not listen within 60 s"
            time.sleep(0.05)
        shown = subprocess.run([fastfc, "-u", str(tmp_path / "site1"), "showunit", "--json"],
                               capture_output=True, text=True, timeout=60)
        assert shown.returncode == 0, shown.stderr
        assert f'"pid": {server.pid}' in shown.stdout       # the server carried it out
        server.send_signal(getattr(signal, s["KillSignal"]))
        code = server.wait(timeout=float(s["TimeoutStopSec"]))
        log = server.stderr.read()
    finally:
        if server.poll() is None:
            server.kill()
            server.wait()
    assert code == 0, log
    assert "INFO fastfc.serve: stopped (SIGTERM)" in log, log
    assert "the units are flushed and closed" in log
