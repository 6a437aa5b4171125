"""Copies that move on in ``fastfc serve`` with no other command: the
background copy of COPY-mode FlashCopy relationships, the initial copy of
Metro Mirror and Global Copy pairs and Global Copy's host writes, at the
rates set, continued by the next server after a stop; and, without a
server, commands that say what moves a copy on. A Global Mirror session's
pairs stay its loop's alone.

Each test starts real ``fastfc serve`` processes and drives them with the
command line (through the control socket), reading and writing the
exports with a minimal NBD client (tests/test_serve_protocol.py's). No
command copies in the foreground: no --wait, no waitflash.
"""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from fastfc import StorageUnit
from fastfc.tools import nbd
from test_serve import fastfc_cli, make_unit, serving, volume_bytes
from test_serve_protocol import Client

pytestmark = pytest.mark.slow

KIB, MIB = 1 << 10, 1 << 20
TRACK = 4 * KIB


def fill(unit: Path, name: str, seed: int) -> np.ndarray:
    """Random data over the whole of volume ``name`` (no server runs)."""
    with StorageUnit(unit) as u:
        v = u.volume(name)
        data = np.random.default_rng(seed).integers(0, 256, v.capacity, dtype=np.uint8)
        v.write(0, data)
    return data


def nbd_write(sock: Path, name: str, offset: int, data: bytes) -> None:
    c = Client(str(sock))
    try:
        assert c.go(name)[-1][0] == nbd.REP_ACK
        err, _ = c.request(nbd.CMD_WRITE, offset, len(data), data)
        assert err == 0, err
    finally:
        c.s.close()


def cli(unit: Path, *args, remote: Path | None = None, check=True):
    return fastfc_cli("-u", unit, *(["-r", remote] if remote else []), *args, check=check)


def lsflash(unit: Path) -> dict:
    return {r["id"]: r for r in json.loads(cli(unit, "lsflash", "--json").stdout)}


def lspprc(unit: Path) -> dict:
    return {r["id"]: r for r in json.loads(cli(unit, "lspprc", "--json").stdout)}


def until(what, test, timeout: float = 120):
    """Poll ``what()`` until ``test`` holds of it (no command copies meanwhile)."""
    deadline = time.monotonic() + timeout
    while True:
        got = what()
        if test(got):
            return got
        assert time.monotonic() < deadline, f"stuck at {got}"
        time.sleep(0.1)


# -- FlashCopy -------------------------------------------------------------------------
def test_flashcopy_copies_in_the_server_and_keeps_its_image(tmp_path):
    a, sock = tmp_path / "a", tmp_path / "s"
    make_unit(a, "S", "T", size=16 * MIB, track_size=TRACK)     # 4096 tracks
    image = fill(a, "S", 1)
    with serving(a, sock):
        out = cli(a, "mkflash", "--persist", "S:T").stdout
        # the words of a direct run (a forwarded command prints what it prints)
        assert ("S:T: the background copy continues while fastfc serve runs for this "
                "unit, or run waitflash S:T") in out
        # the source changes after the establish: the target keeps its image
        nbd_write(sock, "S", 0, b"\xee" * (64 * KIB))
        nbd_write(sock, "S", 8 * MIB, b"\xdd" * TRACK)
        row = until(lambda: lsflash(a)["S:T"], lambda r: r["tracks_to_copy"] == 0)
        assert row["state"] == "copied" and row["moved_on_by"] is None and row["note"] is None
    assert np.array_equal(volume_bytes(a, "T"), image)


def test_copy_rate_holds_and_the_next_server_finishes(tmp_path):
    a, sock = tmp_path / "a", tmp_path / "s"
    n = 1024
    make_unit(a, "S", "T", size=n * TRACK, track_size=TRACK)
    image = fill(a, "S", 2)
    rate = 512 * KIB     # 128 tracks a second: 8 s for the volume
    with serving(a, sock):
        start = time.monotonic()
        cli(a, "mkflash", "--persist", "--copy-rate", "512K", "S:T")
        row = until(lambda: lsflash(a)["S:T"], lambda r: r["tracks_to_copy"] < n, 30)
        seen = lsflash(a)["S:T"]
        spent = time.monotonic() - start
        copied = n - seen["tracks_to_copy"]
        # no faster than the rate allows (generous slack: one chunk, timing)
        assert copied <= (spent * rate / TRACK) * 1.5 + 64, (copied, spent)
        assert seen["moved_on_by"] == "server" and row["state"] == "copying"
    # stopped mid-copy: the progress is kept, and nothing moves without a server
    left = lsflash(a)["S:T"]
    assert 0 < left["tracks_to_copy"] <= seen["tracks_to_copy"]
    assert left["moved_on_by"] is None
    assert "fastfc serve" in left["note"] and "waitflash S:T" in left["note"]
    time.sleep(0.5)
    assert lsflash(a)["S:T"]["tracks_to_copy"] == left["tracks_to_copy"]
    with serving(a, sock):      # restored at open: the next server carries on
        until(lambda: lsflash(a)["S:T"], lambda r: r["tracks_to_copy"] < left["tracks_to_copy"])
        nbd_write(sock, "S", 0, b"\x01" * TRACK)      # copied on write; the rest in the background
        until(lambda: lsflash(a)["S:T"], lambda r: r["state"] == "copied")
    assert np.array_equal(volume_bytes(a, "T"), image)


def test_a_resync_copies_in_the_server(tmp_path):
    a, sock = tmp_path / "a", tmp_path / "s"
    make_unit(a, "S", "T", size=4 * MIB, track_size=TRACK)
    fill(a, "S", 3)
    cli(a, "mkflash", "--record", "--wait", "S:T")
    with serving(a, sock):
        nbd_write(sock, "S", 0, b"\x07" * MIB)
        out = cli(a, "resyncflash", "--revertible", "S:T").stdout
        assert "fastfc serve" not in out      # revertible: nothing copies
        time.sleep(0.3)
        assert lsflash(a)["S:T"]["state"] == "revertible"
        rows = json.loads(cli(a, "commitflash", "--json", "S:T").stdout)
        assert rows[0]["id"] == "S:T" and rows[0]["sequence"] == 1
        until(lambda: lsflash(a)["S:T"], lambda r: r["state"] == "copied")
        image = volume_bytes_served(sock, "S", 4 * MIB)
    assert np.array_equal(volume_bytes(a, "T"), image)


def volume_bytes_served(sock: Path, name: str, size: int) -> np.ndarray:
    c = Client(str(sock))
    try:
        assert c.go(name)[-1][0] == nbd.REP_ACK
        err, data = c.request(nbd.CMD_READ, 0, size)
        assert err == 0, err
        return np.frombuffer(data, np.uint8)
    finally:
        c.s.close()


# -- PPRC ------------------------------------------------------------------------------
@pytest.fixture
def two(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    make_unit(a, "A", "G", size=8 * MIB, track_size=TRACK)
    make_unit(b, "B", "GB", size=8 * MIB, track_size=TRACK)
    fill(a, "A", 4)
    fill(a, "G", 5)
    return a, b, tmp_path / "s"


def test_metro_mirror_reaches_full_duplex_and_mirrors_writes(two):
    a, b, sock = two
    with serving(a, sock, remote=b):
        out = cli(a, "mkpprc", "--type", "mmir", "A:B", remote=b).stdout
        assert ("A:B: the copy continues while fastfc serve runs for this unit, or run "
                "resumepprc --wait A:B") in out
        assert lspprc(a)["A:B"]["moved_on_by"] in ("server", None)     # None: in sync
        row = until(lambda: lspprc(a)["A:B"], lambda r: r["state"] == "full duplex")
        assert row["out_of_sync"] == 0 and row["note"] is None
        nbd_write(sock, "A", 4 * MIB, b"\x5a" * (2 * TRACK))
        image = volume_bytes_served(sock, "A", 8 * MIB)
        assert lspprc(a)["A:B"]["state"] == "full duplex"
    assert np.array_equal(volume_bytes(b, "B"), image)


def test_global_copy_drains_and_keeps_draining(two):
    a, b, sock = two
    with serving(a, sock, remote=b):
        rows = json.loads(cli(a, "mkpprc", "--type", "gcp", "--json", "G:GB",
                              remote=b).stdout)
        assert rows[0]["id"] == "G:GB" and rows[0]["moved_on_by"] == "server"
        until(lambda: lspprc(a)["G:GB"], lambda r: r["out_of_sync"] == 0)
        nbd_write(sock, "G", MIB, b"\x33" * (64 * KIB))
        until(lambda: lspprc(a)["G:GB"], lambda r: r["out_of_sync"] == 0)
        # suspended: nothing is sent; resumed: sent again, with no --wait
        cli(a, "pausepprc", "G:GB")
        nbd_write(sock, "G", 2 * MIB, b"\x44" * (64 * KIB))
        time.sleep(0.3)
        assert lspprc(a)["G:GB"]["out_of_sync"] == 16
        cli(a, "resumepprc", "G:GB")
        until(lambda: lspprc(a)["G:GB"], lambda r: r["out_of_sync"] == 0)
        image = volume_bytes_served(sock, "G", 8 * MIB)
    assert np.array_equal(volume_bytes(b, "GB"), image)


def test_a_pair_restored_by_the_server_drains(two):
    a, b, sock = two
    out = cli(a, "mkpprc", "--type", "mmir", "A:B", remote=b).stdout
    assert ("A:B: the copy continues while fastfc serve runs for this unit, or run "
            "resumepprc --wait A:B") in out
    row = lspprc(a)["A:B"]
    assert row["state"] == "copy pending" and row["moved_on_by"] is None
    assert "fastfc serve" in row["note"]
    with serving(a, sock, remote=b):
        until(lambda: lspprc(a)["A:B"], lambda r: r["state"] == "full duplex")
    assert np.array_equal(volume_bytes(b, "B"), volume_bytes(a, "A"))


def test_without_a_server_commands_say_what_moves_the_copy_on(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    make_unit(a, "S", "T", "N", "NT", "A", size=MIB, track_size=TRACK)
    make_unit(b, "B", size=MIB, track_size=TRACK)
    out = cli(a, "mkflash", "--persist", "--copy-rate", "1M", "S:T").stdout
    assert ("S:T: the background copy continues while fastfc serve runs for this unit, "
            "or run waitflash S:T") in out
    rows = json.loads(cli(a, "mkflash", "--nocp", "--json", "N:NT").stdout)
    assert rows[0]["moved_on_by"] is None and "NOCOPY" in rows[0]["note"]
    # copied now: nothing left to say
    cli(a, "waitflash", "S:T")
    assert lsflash(a)["S:T"]["note"] is None
    rows = json.loads(cli(a, "mkpprc", "--type", "gcp", "--json", "A:B", remote=b).stdout)
    assert rows[0]["moved_on_by"] is None
    assert rows[0]["note"] == ("the copy continues while fastfc serve runs for this unit, "
                               "or run resumepprc --wait A:B")
    cli(a, "resumepprc", "--wait", "A:B")
    # Global Copy in sync: the host writes still wait for a server
    assert "host writes are sent while fastfc serve runs" in lspprc(a)["A:B"]["note"]
    cli(a, "pausepprc", "A:B")
    assert lspprc(a)["A:B"]["note"] is None
    out = cli(a, "resumepprc", "A:B").stdout
    assert "A:B: host writes are sent while fastfc serve runs" in out


# -- Global Mirror ---------------------------------------------------------------------
def test_a_sessions_pairs_are_its_loops_alone(tmp_path):
    a, b, sock = tmp_path / "a", tmp_path / "b", tmp_path / "s"
    make_unit(a, "A0", size=MIB, track_size=TRACK)
    make_unit(b, "B0", "C0", size=MIB, track_size=TRACK)
    cli(a, "mkgmir", "S", "A0:B0:C0", "--cg-interval", "0.05", remote=b)
    with serving(a, sock, remote=b):
        first = lspprc(a)["A0:B0"]
        assert first["out_of_sync"] == 256 and first["moved_on_by"] == "session"
        # paused: nothing sends its tracks (no pair agent beside the loop)
        time.sleep(1.0)
        assert lspprc(a)["A0:B0"]["out_of_sync"] == 256
        cli(a, "mkvol", "X", "--size", "1M")          # a command: the drivers look again
        time.sleep(0.5)
        assert lspprc(a)["A0:B0"]["out_of_sync"] == 256
        cli(a, "resumegmir", "S")
        until(lambda: json.loads(cli(a, "showgmir", "S", "--json").stdout),
              lambda s: s["cg_sequence"] >= 3)
        nbd_write(sock, "A0", 0, b"\x11" * TRACK)
        seq = json.loads(cli(a, "showgmir", "S", "--json").stdout)["cg_sequence"]
        until(lambda: json.loads(cli(a, "showgmir", "S", "--json").stdout),
              lambda s: s["cg_sequence"] >= seq + 2)
        cli(a, "pausegmir", "S")
        image = volume_bytes_served(sock, "A0", MIB)
    # the C volume holds a CG: the write, made before the last CGs formed
    assert np.array_equal(volume_bytes(b, "C0"), image)


def _agents() -> set[str]:
    """The PPRC pairs whose agents (drain threads) run in this process."""
    return {t.name.removeprefix("fastfc-pprc-") for t in threading.enumerate()
            if t.name.startswith("fastfc-pprc-")}


def test_the_drivers_leave_session_pairs_alone(tmp_path):
    """In process: the server's drivers start the agent of a plain pair, not
    of a session's (paused or running: its loop alone sends its tracks), and
    stop what they started."""
    from fastfc.tools.cli.copies import CopyDrivers
    from fastfc.tools.cli.units import Units
    a, b = tmp_path / "a", tmp_path / "b"
    make_unit(a, "GA7", "P7", size=MIB, track_size=TRACK)
    make_unit(b, "GB7", "GC7", "Q7", size=MIB, track_size=TRACK)
    cli(a, "mkgmir", "S", "GA7:GB7:GC7", remote=b)
    cli(a, "mkpprc", "--type", "gcp", "P7:Q7", remote=b)
    units = Units(str(a), str(b))
    drivers = CopyDrivers()
    try:
        units.local()
        drivers.drive(units.all())
        assert "P7->Q7" in _agents() and "GA7->GB7" not in _agents()
        assert "P7->Q7" in repr(drivers)
        drivers.drive(units.all())          # again: nothing more
        assert [t.name for t in threading.enumerate()].count("fastfc-pprc-P7->Q7") == 1
        assert "GA7->GB7" not in _agents()
        pair = units.pair("P7", "Q7")
        until(lambda: pair.out_of_sync_tracks, lambda n: n == 0, 30)
        s = units.session("S")
        assert s.triplets[0].pair.out_of_sync_tracks == 256     # nothing sent it
        drivers.stop_all()
        assert "P7->Q7" not in _agents()
    finally:
        drivers.stop_all()
        units.close()
