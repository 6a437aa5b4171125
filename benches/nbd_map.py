"""Changed-block export over NBD: listing the changes of a large thin
volume, and an incremental backup against a full copy, in one run.

A unit on the disk holds S and T, thin volumes of ``size`` bytes (sparse
files: a large volume costs its bitmaps, not its size), and a FlashCopy
S -> T without background copy, with change recording. ``fastfc serve``
exports them over a unix socket. Then, in order:

1. full copy: every byte of T read over NBD into a backup file (the
   client below: structured replies, 4 MiB reads, 16 in flight; blocks
   of zeros are skipped in the file, not on the wire), after one untimed
   read of T whole (so that neither copy finds a colder page cache);
2. host writes to 1 % of S's tracks over NBD (64 KiB each, at random);
3. listing the changed extents: ``nbdinfo --map=qemu:dirty-bitmap:T``
   against reading T whole (``nbdcopy --no-extents ... null:``), what a
   client without block status must do to find them;
4. the incremental backup: the changed extents listed (BLOCK_STATUS on
   ``qemu:dirty-bitmap:T``), ``fastfc resyncflash S:T`` through the
   console script's front door (T takes the new image), those extents
   read from T into the backup (the same client as 1); bytes moved over
   NBD and time (all three steps) against the full copy;
5. a check: the backup's changed extents equal S's.

``python -m benches [--quick] nbd_map``; needs nbdinfo and nbdcopy
(libnbd-bin).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import statistics
import struct
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

PACKAGES = {"nbdinfo": "libnbd-bin", "nbdcopy": "libnbd-bin"}
ROOT = Path(__file__).resolve().parent.parent
TRACK = 65536

NBDMAGIC, IHAVEOPT = 0x4E42444D41474943, 0x49484156454F5054
OPT_GO, OPT_STRUCTURED_REPLY, OPT_SET_META_CONTEXT = 7, 8, 10
REP_ACK, REP_INFO, REP_META_CONTEXT = 1, 3, 4
REQUEST_MAGIC, SIMPLE_MAGIC, STRUCTURED_MAGIC = 0x25609513, 0x67446698, 0x668E33EF
CMD_READ, CMD_WRITE, CMD_BLOCK_STATUS = 0, 1, 7
READ_SIZE = 4 << 20
IN_FLIGHT = 16


def missing() -> str | None:
    gone = [t for t in PACKAGES if shutil.which(t) is None]
    if not gone:
        return None
    return f"{', '.join(gone)} not found on PATH: apt-get install libnbd-bin"


class Client:
    """A minimal NBD client: structured replies, one metadata context,
    pipelined reads and writes."""

    def __init__(self, path: str, export: str, context: str | None = None) -> None:
        self.s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.s.connect(path)
        magic, opt, _ = struct.unpack(">QQH", self._recv(18))
        assert (magic, opt) == (NBDMAGIC, IHAVEOPT)
        self.s.sendall(struct.pack(">I", 3))
        assert self._option(OPT_STRUCTURED_REPLY)[-1][0] == REP_ACK
        self.context_id = None
        name = export.encode()
        if context is not None:
            q = context.encode()
            r = self._option(OPT_SET_META_CONTEXT, struct.pack(">I", len(name)) + name +
                             struct.pack(">II", 1, len(q)) + q)
            ids = [struct.unpack(">I", d[:4])[0] for t, d in r if t == REP_META_CONTEXT]
            assert r[-1][0] == REP_ACK and ids, f"{context} not offered: {r}"
            self.context_id = ids[0]
        r = self._option(OPT_GO, struct.pack(">I", len(name)) + name + struct.pack(">H", 0))
        assert r[-1][0] == REP_ACK, r
        self.size = next(struct.unpack(">HQH", d)[1] for t, d in r
                         if t == REP_INFO and d[:2] == b"\0\0")
        self.moved = 0            # payload bytes read or written

    def _recv(self, n: int) -> bytes:
        buf = bytearray(n)
        self._recv_into(memoryview(buf))
        return bytes(buf)

    def _recv_into(self, view: memoryview) -> None:
        got = 0
        while got < len(view):
            k = self.s.recv_into(view[got:], len(view) - got, socket.MSG_WAITALL)
            if k == 0:
                raise EOFError("server closed the connection")
            got += k

    def _option(self, opt: int, data: bytes = b"") -> list[tuple[int, bytes]]:
        self.s.sendall(struct.pack(">QII", IHAVEOPT, opt, len(data)) + data)
        out = []
        while True:
            _, _, rtype, n = struct.unpack(">QIII", self._recv(20))
            out.append((rtype, self._recv(n)))
            if rtype not in (REP_INFO, REP_META_CONTEXT, 2):
                return out

    def _send(self, cmd: int, handle: int, offset: int, length: int, data=b"") -> None:
        self.s.sendall(struct.pack(">IHHQQI", REQUEST_MAGIC, 0, cmd, handle, offset, length)
                       + bytes(data))

    def extents(self) -> list[tuple[int, int, int]]:
        """(offset, length, status) of the whole export in the context."""
        out, pos, limit = [], 0, (1 << 32) - (1 << 20)
        while pos < self.size:
            self._send(CMD_BLOCK_STATUS, 1, pos, min(limit, self.size - pos))
            while True:
                magic, flags, rtype, _, n = struct.unpack(">IHHQI", self._recv(20))
                body = self._recv(n)
                assert magic == STRUCTURED_MAGIC and rtype == 5, (rtype, body)
                desc = np.frombuffer(body[4:], ">u4").reshape(-1, 2)
                for length, st in desc.tolist():
                    n_ = min(length, self.size - pos)
                    if out and out[-1][2] == st and out[-1][0] + out[-1][1] == pos:
                        out[-1] = (out[-1][0], out[-1][1] + n_, st)
                    else:
                        out.append((pos, n_, st))
                    pos += n_
                if flags & 1:
                    break
        return out

    def copy(self, ranges, fd: int) -> None:
        """Read ``ranges`` ((offset, length)) into the file ``fd`` at the
        same offsets, :data:`IN_FLIGHT` reads of at most
        :data:`READ_SIZE` in flight; blocks of zeros are not written."""
        pieces = [(o + k, min(READ_SIZE, n - k)) for o, n in ranges for k in range(0, n, READ_SIZE)]
        buf = bytearray(READ_SIZE)
        view = memoryview(buf)
        sent = done = 0
        while done < len(pieces):
            while sent < len(pieces) and sent - done < IN_FLIGHT:
                self._send(CMD_READ, sent, *pieces[sent])
                sent += 1
            magic, flags, rtype, h, n = struct.unpack(">IHHQI", self._recv(20))
            assert magic == STRUCTURED_MAGIC and rtype == 1 and flags & 1, (rtype, h)
            (off,) = struct.unpack(">Q", self._recv(8))
            data = view[:n - 8]
            self._recv_into(data)
            self.moved += n - 8
            if np.frombuffer(data, np.uint64).any():
                os.pwrite(fd, data, off)
            done += 1

    def write_tracks(self, tracks, seed: int) -> None:
        """One 64 KiB write of random bytes at each track, pipelined."""
        rng = np.random.default_rng(seed)
        block = rng.integers(0, 256, TRACK, dtype=np.uint8).tobytes()
        sent = done = 0
        tracks = list(tracks)
        while done < len(tracks):
            while sent < len(tracks) and sent - done < IN_FLIGHT:
                self._send(CMD_WRITE, sent, int(tracks[sent]) * TRACK, TRACK,
                           block[sent % 64:] + block[:sent % 64])
                sent += 1
            magic, err, _ = struct.unpack(">IIQ", self._recv(16))
            assert magic == SIMPLE_MAGIC and err == 0, err
            done += 1
            self.moved += TRACK

    def close(self) -> None:
        self._send(2, 0, 0, 0)
        self.s.close()


def _env() -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    return env


def _serve(unit: Path, sock: str) -> subprocess.Popen:
    """``fastfc -u UNIT serve --socket SOCK``, once it listens."""
    proc = subprocess.Popen([sys.executable, "-m", "fastfc", "-u", str(unit), "serve",
                             "--socket", sock], env=_env(), start_new_session=True,
                            stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 60
    while not os.path.exists(sock):
        assert proc.poll() is None and time.monotonic() < deadline, "serve did not start"
        time.sleep(0.05)
    return proc


def _stop(proc: subprocess.Popen) -> None:
    """SIGTERM, as an operator stops it (SIGKILL after two minutes)."""
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout=120)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


def _cli(unit: Path, *args: str) -> None:
    """A command to the serving process, as the ``fastfc`` console script
    sends it (``fastfc_client``: forwarded without importing the engine)."""
    subprocess.run([sys.executable, "-m", "fastfc_client", "-u", str(unit), *args],
                   check=True, env=_env(), capture_output=True, timeout=600)


def run(size: int, repeats: int = 3, log=print, where: str | None = None) -> dict:
    """The figures of one run over volumes of ``size`` bytes (see the module)."""
    from fastfc import FlashCopy, StorageUnit
    tmp = Path(tempfile.mkdtemp(prefix="fastfc-nbdmap-", dir=where or ROOT))
    unit, sock = tmp / "unit", str(tmp / "s")
    n_tracks = size // TRACK
    d: dict = {"size": size, "tracks": n_tracks}
    proc = None
    try:
        t0 = time.perf_counter()
        with StorageUnit(unit) as u:
            S = u.create_volume("S", n_tracks, TRACK, thin=True)
            T = u.create_volume("T", n_tracks, TRACK, thin=True)
            FlashCopy(S, T, background_copy=False, record=True)
        d["setup_s"] = time.perf_counter() - t0
        proc = _serve(unit, sock)
        uri = f"nbd+unix:///T?socket={sock}"
        backup = tmp / "backup.img"
        fd = os.open(backup, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            os.ftruncate(fd, size)
            subprocess.run(["nbdcopy", "--no-extents", uri, "null:"], check=True,
                           capture_output=True, timeout=3600)
            # 1. the full copy
            c = Client(sock, "T")
            t0 = time.perf_counter()
            c.copy([(0, size)], fd)
            d["full_s"] = time.perf_counter() - t0
            d["full_bytes"] = c.moved
            c.close()
            log(f"    full copy of {size >> 30} GiB: {d['full_s']:.2f} s")
            # 2. host writes to 1 % of S's tracks
            rng = np.random.default_rng(23)
            tracks = np.sort(rng.choice(n_tracks, max(1, n_tracks // 100), replace=False))
            c = Client(sock, "S")
            t0 = time.perf_counter()
            c.write_tracks(tracks, 5)
            d["write_s"] = time.perf_counter() - t0
            c.close()
            d["changed_bytes"] = len(tracks) * TRACK
            # 3. listing the changes against reading the volume whole
            lists = []
            for _ in range(repeats):
                t0 = time.perf_counter()
                r = subprocess.run(["nbdinfo", "--json", "--map=qemu:dirty-bitmap:T", uri],
                                   capture_output=True, text=True, check=True, timeout=600)
                lists.append(time.perf_counter() - t0)
            ext = json.loads(r.stdout)
            dirty = [(e["offset"], e["length"]) for e in ext if e["type"] & 1]
            d["list_s"] = lists
            d["listed_extents"] = len(dirty)
            d["listed_bytes"] = sum(n for _, n in dirty)
            reads = []
            for _ in range(max(1, repeats - 1)):
                t0 = time.perf_counter()
                subprocess.run(["nbdcopy", "--no-extents", uri, "null:"], check=True,
                               capture_output=True, timeout=3600)
                reads.append(time.perf_counter() - t0)
            d["read_whole_s"] = reads
            log(f"    listing {len(dirty)} extents: {min(lists):.3f} s; reading it whole: "
                f"{min(reads):.2f} s")
            # 4. the incremental backup
            t0 = time.perf_counter()
            c = Client(sock, "T", "qemu:dirty-bitmap:T")
            changes = [(o, n) for o, n, st in c.extents() if st & 1]
            d["incr_list_s"] = time.perf_counter() - t0
            t1 = time.perf_counter()
            _cli(unit, "resyncflash", "S:T")
            d["incr_resync_s"] = time.perf_counter() - t1
            c.copy(changes, fd)
            d["incr_s"] = time.perf_counter() - t0
            d["incr_bytes"] = c.moved
            c.close()
            log(f"    incremental backup: {d['incr_bytes'] >> 20} MiB in {d['incr_s']:.2f} s "
                f"(resync {d['incr_resync_s']:.2f} s)")
            # 5. the backup's changed extents are S's now
            c = Client(sock, "S")
            check = tmp / "check.img"
            cfd = os.open(check, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o600)
            try:
                os.ftruncate(cfd, size)
                c.copy(changes[:64], cfd)
                for o, n in changes[:64]:
                    assert os.pread(fd, n, o) == os.pread(cfd, n, o), f"backup differs at {o}"
            finally:
                os.close(cfd)
                c.close()
            d["checked_extents"] = min(64, len(changes))
        finally:
            os.close(fd)
    finally:
        if proc is not None:
            _stop(proc)
        shutil.rmtree(tmp, ignore_errors=True)
    d["list_ratio"] = statistics.median(d["read_whole_s"]) / statistics.median(d["list_s"])
    d["incr_speedup"] = d["full_s"] / d["incr_s"]
    d["incr_fraction"] = d["incr_bytes"] / d["full_bytes"]
    return d


def list_large(size: int = 1 << 40, changed: str = "track", repeats: int = 3, log=print,
               where: str | None = None) -> dict:
    """Listing the changes of a thin volume of ``size`` bytes (1 TiB by
    default) with 1 % changed, where a real run of 1 % of random writes
    would not fit this machine's disk (a thin volume on ext4 reserves 2
    MiB of blocks per first write: 1 % of 1 TiB's tracks would take 330
    GiB). The listing reads only the change bitmap, so the bits 1 % of
    writes would set are set directly on the FlashCopy's ``src_changed``
    (``changed``: ``"track"``, a 64 KiB write at 1 % of the tracks, or
    ``"grain"``, a 4 KiB write at 1 % of the grains), in the unit's bitmap
    file, before the server opens it. Times ``nbdinfo --map`` against
    the same bitmap walked in-process (the server's share: the contexts'
    status and descriptors for 4 GiB requests, no socket)."""
    from fastfc import FlashCopy, StorageUnit
    from fastfc.tools import nbd_status as ns
    tmp = Path(tempfile.mkdtemp(prefix="fastfc-nbdmap-large-", dir=where or ROOT))
    unit, sock = tmp / "unit", str(tmp / "s")
    n_tracks = size // TRACK
    d: dict = {"size": size, "changed": changed}
    proc = None
    try:
        rng = np.random.default_rng(29)
        with StorageUnit(unit) as u:
            S = u.create_volume("S", n_tracks, TRACK, thin=True)
            T = u.create_volume("T", n_tracks, TRACK, thin=True)
            fc = FlashCopy(S, T, background_copy=False, record=True)
            gpt, ng = S.grains_per_track, S.n_grains
            if changed == "track":
                for k in np.sort(rng.choice(n_tracks, n_tracks // 100, replace=False)).tolist():
                    fc.src_changed.set_range(k * gpt, (k + 1) * gpt)
            else:
                for g in np.sort(rng.choice(ng, ng // 100, replace=False)).tolist():
                    fc.src_changed.set(g)
            d["changed_bytes"] = fc.src_changed.count() * S.grain_size
            ctx = ns.contexts_of(T)[ns.DIRTY_BITMAP + "T"]
            step = (4 << 30) // S.grain_size
            walks = []
            for _ in range(repeats):
                t0 = time.perf_counter()
                for g0 in range(0, ng, step):
                    g1 = min(ng, g0 + step)
                    ns.descriptors(ctx.status(g0, g1), g0, S.grain_size, g0 * S.grain_size,
                                   g1 * S.grain_size, T.capacity, False)
                walks.append(time.perf_counter() - t0)
            d["server_s"] = walks
        proc = _serve(unit, sock)
        uri = f"nbd+unix:///T?socket={sock}"
        lists = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            r = subprocess.run(["nbdinfo", "--map=qemu:dirty-bitmap:T", uri],
                               capture_output=True, text=True, check=True, timeout=600)
            lists.append(time.perf_counter() - t0)
        rows = [line.split() for line in r.stdout.splitlines()]
        dirty = [(int(o), int(n)) for o, n, _, what in rows if what == "dirty"]
        d["list_s"] = lists
        d["listed_extents"] = len(dirty)
        d["listed_bytes"] = sum(n for _, n in dirty)
        log(f"    listing {len(dirty)} changed extents of {size >> 30} GiB ({changed}s): "
            f"{min(lists):.3f} s (server's share {min(d['server_s']):.3f} s)")
    finally:
        if proc is not None:
            _stop(proc)
        shutil.rmtree(tmp, ignore_errors=True)
    return d


if __name__ == "__main__":
    gib = float(os.environ.get("FASTFC_BENCH_MAP_GIB", "4"))
    print(json.dumps(run(int(gib * (1 << 30))), indent=1))
