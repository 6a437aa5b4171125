"""Recovery points served over NBD (export ``VOLUME#SEQ``, read-only), a
recovery volume served while its restore copies, and the point verbs run
by a ``fastfc serve`` that holds the unit.

The first tests drive the server in this process with a raw client of the
standard library (tests/test_serve_protocol.py's) while host writes change
the live volume, against images captured at each take; the later ones use
the real clients (nbdcopy, qemu-img, qemu-io, nbdinfo from apt: a missing
tool skips a test on a developer machine and fails it under ``CI``).
"""

from __future__ import annotations

import json
import re
import shutil
import struct
import tempfile
import threading
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, precondition, rule

from fastfc import StorageUnit
from fastfc.errors import ImmutablePointError
from fastfc.tools import nbd, nbd_status as ns
from fastfc.tools.cli.serve import Server
from fastfc.tools.cli.units import Units
from fastfc.tools.cli.volumes import _roles

from test_serve import fastfc_cli, need, qemu_io, run, serving, serving_here, uri
from test_serve_block_status import expand, raw_client, status
from test_serve_protocol import Client

MIB = 1 << 20
TRACK = 65536


def make_unit(path: Path, *names: str, n_tracks: int = 16) -> None:
    with StorageUnit(path) as u:
        for n in names:
            u.create_volume(n, n_tracks, TRACK, thin=True)


@contextmanager
def writing(vol, seed: int = 1):
    """A host writing random 4 KiB..64 KiB pieces of ``vol`` until the block
    ends (``paused``: set to hold it between two writes)."""
    stop, paused, idle = threading.Event(), threading.Event(), threading.Event()
    rng = np.random.default_rng(seed)
    counts = [0]

    def run_writer():
        while not stop.is_set():
            if paused.is_set():
                idle.set()
                paused.wait(0.001)
                continue
            idle.clear()
            n = int(rng.integers(1, 17)) * 4096
            off = int(rng.integers(0, (vol.capacity - n) // 4096 + 1)) * 4096
            vol.write(off, rng.integers(0, 256, n, dtype=np.uint8))
            counts[0] += 1

    t = threading.Thread(target=run_writer, daemon=True)
    t.start()
    try:
        yield paused, idle, counts
    finally:
        stop.set()
        t.join(10)


def take_at_rest(server, paused, idle, vol_name: str, **kw):
    """A point of ``vol_name`` taken between two host writes, and the
    volume's bytes at that instant (the model)."""
    paused.set()
    assert idle.wait(10)
    try:
        with server.lock:
            u = server.units.local()
            image = u.volume(vol_name).read(0, u.volume(vol_name).capacity)
            (p,) = u.points.take([vol_name], **kw)
    finally:
        paused.clear()
    return p, image


def read_all(c: Client, size: int, piece: int) -> bytes:
    out = b""
    for off in range(0, size, piece):
        err, data = c.request(nbd.CMD_READ, off, min(piece, size - off), handle=off + 1)
        assert err == 0, (off, err)
        out += data
    return out


# -- the protocol, in this process --------------------------------------------------------
def test_a_point_export_reads_its_image_under_host_writes_and_refuses_writes(tmp_path):
    unit, sock = tmp_path / "u", tmp_path / "s"
    make_unit(unit, "A", "B")
    with serving_here(unit, sock) as server:
        A = server.units.local().volume("A")
        with writing(A) as (paused, idle, counts):
            points = [take_at_rest(server, paused, idle, "A", retain_for=3600)
                      for _ in range(3)]
            conns = []
            for p, image in points:
                c = Client(str(sock))
                size, flags = c.export_flags(c.go(f"A#{p.seq}"))
                assert size == A.capacity
                assert flags & nbd.TF_READ_ONLY and not flags & nbd.TF_SEND_WRITE_ZEROES
                conns.append(c)
            before = counts[0]
            for rounds in range(3):                    # the host writes all along
                for (p, image), c in zip(points, conns):
                    got = read_all(c, A.capacity, [4096, 65536, 200_000][rounds])
                    assert got == image.tobytes(), (p.seq, rounds)
            assert counts[0] > before                  # (writes landed between reads)
        c = conns[0]
        # writes are refused, whatever the client sends
        assert c.request(nbd.CMD_WRITE, 0, 4, b"evil")[0] == nbd.E_PERM
        assert c.request(nbd.CMD_WRITE, 0, 3 * TRACK, bytes(3 * TRACK))[0] == nbd.E_PERM
        assert c.request(nbd.CMD_WRITE_ZEROES, 0, 4096)[0] == nbd.E_PERM
        assert c.request(nbd.CMD_WRITE, 0, 4, b"evil", flags=nbd.CMD_FLAG_FUA)[0] == nbd.E_PERM
        assert c.request(nbd.CMD_FLUSH)[0] == 0
        assert c.request(nbd.CMD_READ, A.capacity - 1, 2)[0] == nbd.E_INVAL
        assert read_all(c, A.capacity, 65536) == points[0][1].tobytes()
        # listed beside the volumes; other names are no exports
        replies = Client(str(sock)).option(nbd.OPT_LIST)
        names = sorted(d[4:4 + struct.unpack(">I", d[:4])[0]].decode()
                       for t, d in replies if t == nbd.REP_SERVER)
        assert names == ["A", "A#0", "A#1", "A#2", "B"]
        for name in ("A#3", "B#0", "A#", "#0", "A#x", "A#-1", "A#0#0", "A#\u0662", "Z#0"):
            assert Client(str(sock)).go(name)[-1][0] == nbd.REP_ERR_UNKNOWN, name


def test_a_point_that_expires_while_served_ends_its_export(tmp_path):
    """Expiry is not held up by a reader (retention keeps a point, not a
    client): the open connection gets ESHUTDOWN for every request, never
    another image's bytes, and the name is gone."""
    unit, sock = tmp_path / "u", tmp_path / "s"
    make_unit(unit, "A")
    with serving_here(unit, sock) as server:
        with server.lock:
            u = server.units.local()
            A = u.volume("A")
            A.write(0, b"first")
            kept, gone = u.points.take(["A"], retain_for=3600)[0], u.points.take(["A"])[0]
            A.write(0, b"later")
        ck, cg = Client(str(sock)), Client(str(sock))
        ck.go(f"A#{kept.seq}"), cg.go(f"A#{gone.seq}")
        sc, ids = raw_client(sock, f"A#{gone.seq}", [ns.BASE_ALLOCATION])
        assert cg.request(nbd.CMD_READ, 0, 5) == (0, b"first")
        # the retained one refuses to expire, served or not
        with server.lock, pytest.raises(ImmutablePointError, match="retained"):
            u.points.expire("A", kept.seq)
        with server.lock:
            u.points.expire("A", gone.seq)
        assert cg.request(nbd.CMD_READ, 0, 5)[0] == nbd.E_SHUTDOWN
        assert cg.request(nbd.CMD_READ, 0, 3 * TRACK)[0] == nbd.E_SHUTDOWN
        assert cg.request(nbd.CMD_FLUSH)[0] == nbd.E_SHUTDOWN
        assert cg.request(nbd.CMD_WRITE, 0, 4, b"evil")[0] == nbd.E_PERM
        assert status(sc, 0, 4096)[0] == nbd.E_SHUTDOWN
        assert Client(str(sock)).go(f"A#{gone.seq}")[-1][0] == nbd.REP_ERR_UNKNOWN
        assert ck.request(nbd.CMD_READ, 0, 5) == (0, b"first")    # the other reads on
        with server.lock:
            assert A.read(0, 5).tobytes() == b"later"


def test_point_allocation_is_data_where_it_may_differ_from_zero(tmp_path):
    """``base:allocation`` of a point of a thin volume: a grain reported a
    hole reads as zeroes in the point, a grain a point holds is data, and
    the untouched half of the volume is a hole. (A live thin volume's file
    may report more data than was written: pages read near a write count.)"""
    unit, sock = tmp_path / "u", tmp_path / "s"
    make_unit(unit, "A", n_tracks=64)
    rng = np.random.default_rng(7)
    with serving_here(unit, sock) as server:
        with server.lock:
            u = server.units.local()
            A = u.volume("A")
            gs, n = A.grain_size, A.n_grains

            def scribble(k):            # (in the first half only)
                for g in rng.choice(n // 2, k, replace=False):
                    A.write(int(g) * gs, rng.integers(1, 256, gs, dtype=np.uint8))
            scribble(n // 32)
            p0 = u.points.take(["A"])[0]
            scribble(n // 32)
            p1 = u.points.take(["A"])[0]
            scribble(n // 32)
        for p in (p0, p1):
            c, ids = raw_client(sock, f"A#{p.seq}", [ns.BASE_ALLOCATION])
            got = status(c, 0, A.capacity)
            flags = expand(got[ids[ns.BASE_ALLOCATION]], 0, gs, n)
            hole = (flags & ns.STATE_HOLE) != 0
            assert np.array_equal(hole, (flags & ns.STATE_ZERO) != 0)
            image = p.image().reshape(n, gs)
            assert not image[hole].any()                     # a hole is zeroes
            assert not hole[p.saved()].any()                 # held grains are data
            assert hole[n // 2:].all()                       # never written: holes


def test_a_recovery_volume_is_served_read_only_until_its_copy_completes(tmp_path):
    unit, sock = tmp_path / "u", tmp_path / "s"
    make_unit(unit, "A", "R", n_tracks=64)
    with serving_here(unit, sock) as server:
        with server.lock:
            u = server.units.local()
            A, R = u.volume("A"), u.volume("R")
            A.write(0, np.full(8 * TRACK, 0x11, np.uint8))
            p = u.points.take(["A"])[0]
            image = A.read(0, A.capacity)
            A.write(0, np.full(2 * MIB, 0x99, np.uint8))     # garbage after the point
            restore = p.restore(R, background_copy=False)
        replies = Client(str(sock)).option(nbd.OPT_LIST)
        assert any(b"taking recovery point A#0" in d for t, d in replies)
        assert _roles(R, server.units) == [
            "restoring A#0 (64 tracks to copy; read-only until then)"]     # (lsvol's)
        c = Client(str(sock))
        size, flags = c.export_flags(c.go("R"))
        assert flags & nbd.TF_READ_ONLY
        sc, ids = raw_client(sock, "R", [ns.BASE_ALLOCATION])
        gs, n = R.grain_size, R.n_grains
        for step in range(3):
            assert read_all(c, R.capacity, 65536) == image.tobytes()
            assert c.request(nbd.CMD_WRITE, 0, 4, b"evil")[0] == nbd.E_PERM
            flags_ = expand(status(sc, 0, R.capacity)[ids[ns.BASE_ALLOCATION]], 0, gs, n)
            hole = (flags_ & ns.STATE_HOLE) != 0
            assert not image.reshape(n, gs)[hole].any()      # a hole is zeroes
            assert hole.sum() >= n // 2 if step == 0 else True
            restore.copy(max_tracks=16)                      # part of the copy, served
        restore.copy()
        assert not restore.active and _roles(R, server.units) == []
        assert read_all(c, R.capacity, 65536) == image.tobytes()
        c2 = Client(str(sock))
        size, flags = c2.export_flags(c2.go("R"))            # a volume as any other now
        assert not flags & nbd.TF_READ_ONLY
        assert c2.request(nbd.CMD_WRITE, 0, 4, b"mine")[0] == 0
        assert c2.request(nbd.CMD_READ, 0, 4) == (0, b"mine")


# -- real clients -------------------------------------------------------------------------
@pytest.mark.slow
def test_points_copied_by_nbdcopy_and_qemu_img_under_host_writes(tmp_path):
    need("nbdcopy", "qemu-img", "qemu-io", "nbdinfo")
    unit, sock = tmp_path / "u", tmp_path / "s"
    make_unit(unit, "A", n_tracks=64)
    with serving_here(unit, sock) as server:
        A = server.units.local().volume("A")
        with writing(A, seed=3) as (paused, idle, counts):
            taken = [take_at_rest(server, paused, idle, "A") for _ in range(3)]
            for k, (p, image) in enumerate(taken):
                out = tmp_path / f"p{k}.img"
                if k % 2:
                    run("qemu-img", "convert", "-f", "raw", "-O", "raw",
                        uri(sock, f"A%23{p.seq}"), out)
                else:
                    run("nbdcopy", uri(sock, f"A%23{p.seq}"), out)
                got = np.fromfile(out, dtype=np.uint8)
                assert got.size == A.capacity and np.array_equal(got, image), p.seq
            r = qemu_io(sock, "A%230", "write -P 1 0 4k", check=False)  # refused at open
            assert r.returncode != 0 and "Permission denied" in r.stderr, r.stderr
            qemu_io(sock, "A%230", "read 0 64k", read_only=True)
        listed = json.loads(run("nbdinfo", "--list", "--json", uri(sock, "")).stdout)
        ro = {e["export-name"]: e["is_read_only"] for e in listed["exports"]}
        assert ro == {"A": False, "A#0": True, "A#1": True, "A#2": True}


@pytest.mark.slow
def test_point_verbs_run_in_a_running_server(tmp_path):
    """mkpoint, lspoint, rmpoint and restorepoint forwarded to ``fastfc
    serve`` (which holds the unit): they act on the served volumes at once,
    between client writes, and what they make is served."""
    need("qemu-io", "nbdinfo", "qemu-img")
    unit, sock = tmp_path / "u", tmp_path / "s"
    make_unit(unit, "A", n_tracks=16)
    with serving(unit, sock):
        qemu_io(sock, "A", "write -P 0x11 0 1M")
        out = fastfc_cli("-u", unit, "mkpoint", "A", "--name", "good", "--retain", "3600").stdout
        assert out == "took recovery point A#0, retained 3600 s\n"
        qemu_io(sock, "A", "write -P 0x99 0 512k")
        assert fastfc_cli("-u", unit, "mkpoint", "A").stdout == "took recovery point A#1\n"
        qemu_io(sock, "A", "write -P 0x77 0 64k")
        rows = json.loads(fastfc_cli("-u", unit, "lspoint", "--json").stdout)
        assert [(r["point"], r["name"]) for r in rows] == [("A#0", "good"), ("A#1", None)]
        qemu_io(sock, "A%230", "read -P 0x11 0 1M", read_only=True)
        qemu_io(sock, "A%231", "read -P 0x99 0 512k", "read -P 0x11 512k 512k",
                read_only=True)
        r = fastfc_cli("-u", unit, "rmpoint", "A#0", "A#1", check=False)
        assert r.returncode == 1 and "A#0 is retained" in r.stderr
        assert "expired recovery point A#1" in fastfc_cli("-u", unit, "rmpoint", "A#1").stdout
        assert qemu_io(sock, "A%231", "read 0 4k", check=False, read_only=True).returncode
        out = fastfc_cli("-u", unit, "restorepoint", "A#0", "--to", "R").stdout
        assert re.fullmatch(r"restored A#0 onto new volume R(: \d+ tracks? to copy in the "
                            r"server; read-only until then)?\n", out), out
        qemu_io(sock, "R", "read -P 0x11 0 1M", read_only=True)
        fastfc_cli("-u", unit, "restorepoint", "A#0", "--to", "R2", "--wait")
        assert "is_read_only: false" in run("nbdinfo", uri(sock, "R2")).stdout
        qemu_io(sock, "R2", "write -P 0x22 0 4k")
        out = fastfc_cli("-u", unit, "restorepoint", "A#0", "--onto-source").stdout
        assert out.startswith("restored A#0 onto A (")
        qemu_io(sock, "A", "read -P 0x11 0 1M")
        r = run("qemu-img", "compare", "-f", "raw", "-F", "raw", uri(sock, "A"),
                uri(sock, "A%230"))
        assert "Images are identical" in r.stdout
    with StorageUnit(unit) as u:          # all of it in the unit after the server
        assert [p.seq for p in u.points.points("A")] == [0]
        assert u.volume("R").read(0, 4).tobytes() == b"\x11" * 4
        assert u.volume("R2").read(0, 4).tobytes() == b"\x22" * 4


# -- a model: points served while host writes, takes, expiries and restores run ---------------
class ServedPointsModel(RuleBasedStateMachine):
    """Host writes (through NBD and the library), takes, expiries and
    restores at random, with clients connected to points and recovery
    volumes: every read of a point's export is its image at its take (the
    model's copy), every write to it is refused, an expired point's open
    connection gets ESHUTDOWN and its name no GO, a retained point or one a
    restore reads through refuses to expire, and a recovery volume reads
    its point's image, read-only until its copy completes."""

    N_TRACKS = 8

    @initialize()
    def start(self):
        self.dir = Path(tempfile.mkdtemp(prefix="served-points-"))
        make_unit(self.dir / "u", "A", n_tracks=self.N_TRACKS)
        self.units = Units(str(self.dir / "u"), None)
        self.server = Server(self.units)
        self.sock = str(self.dir / "s")
        self.server.nbd.listen_unix(self.sock)
        self.server.nbd.start()
        self.unit = self.units.local()
        self.A = self.unit.volume("A")
        self.live = np.zeros(self.A.capacity, dtype=np.uint8)
        self.images: dict[int, np.ndarray] = {}
        self.retained: set[int] = set()
        self.expired: set[int] = set()
        self.conns: list[tuple[int, Client]] = []
        self.host = Client(self.sock)
        self.host.go("A")
        self.restores: list = []          # (seq, restore, volume name)

    def teardown(self):
        if not hasattr(self, "server"):
            return
        for _, c in self.conns:
            c.s.close()
        self.host.s.close()
        self.server.nbd.stop()
        self.units.close()
        shutil.rmtree(self.dir, ignore_errors=True)

    def _range(self, data, piece):
        cap = self.A.capacity
        off = data.draw(st.integers(0, cap - 1))
        return off, data.draw(st.integers(1, min(piece, cap - off)))

    @rule(data=st.data(), value=st.integers(0, 255), through_nbd=st.booleans())
    def host_write(self, data, value, through_nbd):
        off, n = self._range(data, 3 * TRACK)
        if through_nbd:
            assert self.host.request(nbd.CMD_WRITE, off, n, bytes([value]) * n)[0] == 0
        else:
            self.A.write(off, np.full(n, value, np.uint8))
        self.live[off:off + n] = value

    @rule(retain=st.booleans())
    def take(self, retain):
        with self.server.lock:
            (p,) = self.unit.points.take(["A"], retain_for=3600 if retain else 0)
        self.images[p.seq] = self.live.copy()
        if retain:
            self.retained.add(p.seq)

    @precondition(lambda self: self.images)
    @rule(data=st.data())
    def connect(self, data):
        seq = data.draw(st.sampled_from(sorted(self.images)))
        c = Client(self.sock)
        replies = c.go(f"A#{seq}")
        if seq in self.expired:
            assert replies[-1][0] == nbd.REP_ERR_UNKNOWN
            c.s.close()
            return
        size, flags = c.export_flags(replies)
        assert size == self.A.capacity and flags & nbd.TF_READ_ONLY
        self.conns.append((seq, c))

    @precondition(lambda self: self.conns)
    @rule(data=st.data(), write=st.booleans())
    def use_a_point(self, data, write):
        seq, c = data.draw(st.sampled_from(self.conns))
        off, n = self._range(data, 3 * TRACK)
        if write:
            assert c.request(nbd.CMD_WRITE, off, n, b"\x01" * n)[0] == nbd.E_PERM
            return
        err, got = c.request(nbd.CMD_READ, off, n)
        if seq in self.expired:
            assert err == nbd.E_SHUTDOWN
        else:
            assert err == 0 and got == self.images[seq][off:off + n].tobytes()

    @precondition(lambda self: set(self.images) - self.expired)
    @rule(data=st.data())
    def expire(self, data):
        seq = data.draw(st.sampled_from(sorted(set(self.images) - self.expired)))
        pinned = any(s == seq and r.active for s, r, _ in self.restores)
        with self.server.lock:
            if seq in self.retained or pinned:
                with pytest.raises(ImmutablePointError):
                    self.unit.points.expire("A", seq)
            else:
                self.unit.points.expire("A", seq)
                self.expired.add(seq)

    @precondition(lambda self: set(self.images) - self.expired and len(self.restores) < 3)
    @rule(data=st.data())
    def restore(self, data):
        seq = data.draw(st.sampled_from(sorted(set(self.images) - self.expired)))
        name = f"R{len(self.restores)}"
        with self.server.lock:
            R = self.unit.create_volume(name, self.N_TRACKS, TRACK, thin=True)
            r = self.unit.points.point("A", seq).restore(R, background_copy=False)
        self.restores.append((seq, r, name))

    @precondition(lambda self: self.restores)
    @rule(data=st.data(), tracks=st.integers(0, 8))
    def read_a_recovery_volume(self, data, tracks):
        seq, r, name = data.draw(st.sampled_from(self.restores))
        c = Client(self.sock)
        size, flags = c.export_flags(c.go(name))
        assert bool(flags & nbd.TF_READ_ONLY) == r.active
        off, n = self._range(data, 3 * TRACK)
        assert c.request(nbd.CMD_READ, off, n) == (0, self.images[seq][off:off + n].tobytes())
        if r.active:
            assert c.request(nbd.CMD_WRITE, off, 1, b"\x01")[0] == nbd.E_PERM
        c.s.close()
        with self.server.lock:
            r.copy(max_tracks=tracks)


# a server started and stopped per example (0.2 s): seconds, so slow, and
# bounded under the ci profile too
TestServedPointsModel = pytest.mark.slow(ServedPointsModel.TestCase)
TestServedPointsModel.settings = settings(
    settings.default, max_examples=min(30, settings.default.max_examples),
    stateful_step_count=min(30, settings.default.stateful_step_count))
