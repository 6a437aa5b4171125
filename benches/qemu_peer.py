"""The real peer: QEMU's block layer, driven over QMP.

``qemu-storage-daemon`` (Debian package ``qemu-system-common``) runs a
``blockdev-backup`` job between two raw files: ``sync=full`` copies every
cluster, ``sync=incremental`` copies the clusters a dirty bitmap names (the
writes that set its bits go through QEMU, over an NBD export of the source).
The job is timed from the QMP command to its ``BLOCK_JOB_COMPLETED`` event,
at QEMU's default settings and at its best ``x-perf`` tuning
(``use-copy-range``, ``max-workers``, ``max-chunk``), found by a small grid
search in the same run. The runner's ``qemu`` suite compares it with fastfc on
file-backed volumes over the very same files and with ``np.copyto`` of the
same bytes.

The clients use only the standard library: :class:`QMP` is a minimal QMP client over a unix
socket and :class:`NBDWriter` a minimal NBD client (fixed newstyle
handshake, ``NBD_OPT_EXPORT_NAME``, simple replies) that only writes.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import struct
import subprocess
import tempfile
import time
from pathlib import Path

DAEMON = "qemu-storage-daemon"


def available() -> str | None:
    """The daemon's version line, or None when QEMU is not installed."""
    exe = shutil.which(DAEMON)
    if exe is None:
        return None
    try:
        out = subprocess.run([exe, "--version"], capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.splitlines()[0] if out.returncode == 0 and out.stdout else None


class QMPError(RuntimeError):
    pass


class QMP:
    """A QMP client: one command at a time, events queued as they arrive."""

    def __init__(self, path: str, timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        while True:
            try:
                self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                self.sock.connect(path)
                break
            except OSError:
                self.sock.close()
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.02)
        self.file = self.sock.makefile("rwb")
        self.events: list[dict] = []
        greeting = self._recv()
        if "QMP" not in greeting:
            raise QMPError(f"not a QMP greeting: {greeting}")
        self.cmd("qmp_capabilities")

    def _recv(self) -> dict:
        line = self.file.readline()
        if not line:
            raise QMPError("QMP connection closed")
        return json.loads(line)

    def cmd(self, command: str, /, **arguments):
        msg = {"execute": command, **({"arguments": arguments} if arguments else {})}
        self.file.write(json.dumps(msg).encode() + b"\n")
        self.file.flush()
        while True:
            reply = self._recv()
            if "event" in reply:
                self.events.append(reply)
            elif "error" in reply:
                raise QMPError(f"{command}: {reply['error'].get('desc', reply['error'])}")
            elif "return" in reply:
                return reply["return"]

    def wait_event(self, name: str, timeout: float = 600.0, **data) -> dict:
        """The first queued or arriving event ``name`` whose data matches."""
        self.sock.settimeout(timeout)
        try:
            while True:
                for i, ev in enumerate(self.events):
                    if ev["event"] == name and all(ev.get("data", {}).get(k) == v
                                                   for k, v in data.items()):
                        return self.events.pop(i)
                self.events.append(self._recv())
        finally:
            self.sock.settimeout(None)

    def close(self) -> None:
        try:
            self.file.close()
        finally:
            self.sock.close()


class NBDWriter:
    """Write to an NBD export over a unix socket (what a guest would do)."""

    MAGIC_REQ, MAGIC_REPLY = 0x25609513, 0x67446698
    CMD_WRITE, CMD_DISC = 1, 2

    def __init__(self, path: str, name: str) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.connect(path)
        head = self._read(18)
        if head[:16] != b"NBDMAGICIHAVEOPT":
            raise QMPError(f"not a newstyle NBD server: {head!r}")
        (flags,) = struct.unpack(">H", head[16:])
        no_zeroes = flags & 2
        self.sock.sendall(struct.pack(">I", 1 | (no_zeroes and 2)))
        self.sock.sendall(b"IHAVEOPT" + struct.pack(">II", 1, len(name)) + name.encode())
        self.size, _ = struct.unpack(">QH", self._read(10))
        if not no_zeroes:
            self._read(124)
        self._cookie = 0

    def _read(self, n: int) -> bytes:
        buf = bytearray()
        while len(buf) < n:
            chunk = self.sock.recv(n - len(buf))
            if not chunk:
                raise QMPError("NBD connection closed")
            buf += chunk
        return bytes(buf)

    def write_many(self, offsets, data: bytes, window: int = 64) -> None:
        """Write ``data`` at every offset, ``window`` requests in flight."""
        offsets = list(offsets)
        for i in range(0, len(offsets), window):
            batch = offsets[i:i + window]
            for off in batch:
                self._cookie += 1
                self.sock.sendall(struct.pack(">IHHQQI", self.MAGIC_REQ, 0, self.CMD_WRITE,
                                              self._cookie, off, len(data)) + data)
            for _ in batch:
                magic, err, _ = struct.unpack(">IIQ", self._read(16))
                if magic != self.MAGIC_REPLY or err:
                    raise QMPError(f"NBD write failed: error {err}")

    def close(self) -> None:
        try:
            self.sock.sendall(struct.pack(">IHHQQI", self.MAGIC_REQ, 0, self.CMD_DISC, 0, 0, 0))
        finally:
            self.sock.close()


class StorageDaemon:
    """A ``qemu-storage-daemon`` with two raw files as nodes ``src`` and
    ``dst``, and the source exported over NBD (for the writes that dirty a
    bitmap)."""

    def __init__(self, src: str | os.PathLike, dst: str | os.PathLike) -> None:
        self.dir = Path(tempfile.mkdtemp(prefix="fastfc-qsd-"))
        qmp_path, self.nbd_path = str(self.dir / "qmp.sock"), str(self.dir / "nbd.sock")
        self.log = open(self.dir / "qsd.log", "wb")
        self.proc = subprocess.Popen(
            [DAEMON, "--chardev", f"socket,id=qmp,path={qmp_path},server=on,wait=off",
             "--monitor", "chardev=qmp,mode=control"],
            stdout=self.log, stderr=subprocess.STDOUT)
        try:
            self.qmp = QMP(qmp_path)
            for node, path in (("src", src), ("dst", dst)):
                self.qmp.cmd("blockdev-add", driver="raw", **{"node-name": node},
                             file={"driver": "file", "filename": str(path)})
            # SocketAddressLegacy (QEMU 7.2): the address sits under "data"
            self.qmp.cmd("nbd-server-start",
                         addr={"type": "unix", "data": {"path": self.nbd_path}})
            self.qmp.cmd("block-export-add", type="nbd", id="exp-src",
                         **{"node-name": "src"}, name="src", writable=True)
        except BaseException:
            self.close()
            raise
        self._jobs = 0

    def backup(self, sync: str = "full", perf: dict | None = None,
               bitmap: str | None = None) -> float:
        """Run one ``blockdev-backup`` src -> dst; seconds from the command
        to ``BLOCK_JOB_COMPLETED``."""
        self._jobs += 1
        job = f"job{self._jobs}"
        args = {"job-id": job, "device": "src", "target": "dst", "sync": sync}
        if bitmap is not None:
            args["bitmap"] = bitmap
        if perf:
            args["x-perf"] = perf
        t0 = time.perf_counter()
        self.qmp.cmd("blockdev-backup", **args)
        ev = self.qmp.wait_event("BLOCK_JOB_COMPLETED", device=job)
        elapsed = time.perf_counter() - t0
        if ev["data"].get("error"):
            raise QMPError(f"backup job failed: {ev['data']['error']}")
        if ev["data"].get("offset") != ev["data"].get("len"):
            raise QMPError(f"backup job ended early: {ev['data']}")
        return elapsed

    def add_bitmap(self, name: str, granularity: int) -> None:
        self.qmp.cmd("block-dirty-bitmap-add", node="src", name=name, granularity=granularity)

    def bitmap_count(self, name: str) -> int:
        """Dirty bytes in bitmap ``name`` of node ``src``."""
        for dev in self.qmp.cmd("query-named-block-nodes", flat=True):
            if dev.get("node-name") == "src":
                for bm in dev.get("dirty-bitmaps", []):
                    if bm.get("name") == name:
                        return bm["count"]
        raise QMPError(f"no dirty bitmap {name}")

    def writer(self) -> NBDWriter:
        return NBDWriter(self.nbd_path, "src")

    def close(self) -> None:
        try:
            if getattr(self, "qmp", None) is not None:
                try:
                    self.qmp.cmd("quit")
                except (QMPError, OSError):
                    pass
                self.qmp.close()
        finally:
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
            self.log.close()
            shutil.rmtree(self.dir, ignore_errors=True)

    def __enter__(self) -> "StorageDaemon":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def perf_grid(quick: bool) -> list[dict]:
    """``x-perf`` settings to search for QEMU's best (default first)."""
    if quick:
        # the best settings of full runs on this machine kind
        return [{}, {"use-copy-range": True, "max-workers": 8, "max-chunk": 0},
                {"use-copy-range": True, "max-workers": 64, "max-chunk": 1 << 20},
                {"use-copy-range": True, "max-workers": 1, "max-chunk": 16 << 20}]
    grid = [{}]
    for copy_range in (True, False):
        for workers in (1, 8, 64):
            for chunk in (0, 1 << 20, 16 << 20):
                grid.append({"use-copy-range": copy_range, "max-workers": workers,
                             "max-chunk": chunk})
    return grid


def perf_text(perf: dict) -> str:
    if not perf:
        return "defaults"
    return ", ".join(f"{k}={(str(v >> 20) + 'M') if k == 'max-chunk' and v else v}"
                     for k, v in perf.items())


# --------------------------------------------------------------------------
# The comparison: QEMU, fastfc and np.copyto over the same files
# --------------------------------------------------------------------------

def compare(quick: bool, log=print, shm: str = "/dev/shm") -> dict:
    """Full and incremental backup of one volume between raw files in
    ``shm``: QEMU at its defaults and at its best ``x-perf`` tuning, fastfc
    on file-backed volumes over the same two files, ``np.copyto`` of the
    same bytes; rounds interleaved. Raises RuntimeError when QEMU is absent."""
    import statistics

    import numpy as np

    from benches.cases import fill_random, touch, wait_withdrawn
    from fastfc import FlashCopy, FlashCopyState, Volume

    version = available()
    if version is None:
        raise RuntimeError(f"{DAEMON} not found: install QEMU's storage daemon (Debian/"
                           "Ubuntu: apt-get install qemu-system-common) to compare with it")
    capacity = (256 << 20) if quick else (1 << 30)
    track = 65536
    n = capacity // track
    rounds = 3 if quick else 7
    d = Path(tempfile.mkdtemp(prefix="fastfc-peer-", dir=shm))
    out: dict = {"version": version, "capacity": capacity, "track": track, "dir": str(d)}
    S = T = None
    fcs: list = []
    try:
        S = Volume(n, track, path=d / "S.vol", name="S")
        T = Volume(n, track, path=d / "T.vol", name="T")
        fill_random(S._raw_array(), seed=40)
        touch(T._raw_array())
        S.flush()
        T.flush()
        with StorageDaemon(d / "S.vol", d / "T.vol") as qsd:
            # 1. QEMU's best x-perf tuning: a grid, each setting twice
            grid = perf_grid(quick)
            log(f"    {version.split('(')[0].strip()}: searching {len(grid)} x-perf settings")
            tries = {i: [] for i in range(len(grid))}
            for _ in range(1 if quick else 2):
                for i, perf in enumerate(grid):
                    tries[i].append(qsd.backup("full", perf))
            best = min(range(1, len(grid)), key=lambda i: min(tries[i]))
            tuned = grid[best]
            out["grid"] = [{"perf": grid[i], "seconds": tries[i]} for i in tries]
            out["tuned"] = tuned

            # 2. full copy, interleaved
            def f_fastfc():
                fc = FlashCopy(S, T)          # COPY mode: the worker copies
                fc.wait()
                fcs.append(fc)

            full = {"np.copyto": lambda: np.copyto(T._raw_array(), S._raw_array()),
                    "fastfc": f_fastfc,
                    "QEMU defaults": lambda: qsd.backup("full"),
                    "QEMU tuned": lambda: qsd.backup("full", tuned)}
            log(f"    full backup of {capacity >> 20} MiB, {rounds} rounds")
            out["full"] = _rounds(full, rounds, before=lambda k: _perturb(T, fcs))
            for fc in fcs:
                wait_withdrawn(fc)
            assert np.array_equal(S._raw_array(), T._raw_array()), "fastfc's target differs from its source"

            # 3. incremental: 10% of the tracks changed, written through QEMU
            # (NBD) for its dirty bitmap and through fastfc for its own
            k = n // 10
            offs = (np.sort(np.random.default_rng(41).choice(n, k, replace=False))
                    * track).astype(np.int64)
            rows = np.zeros((k, 4096), np.uint8)
            fc = FlashCopy(S, T, background_copy=False, record=True)
            fc.copy()
            qsd.add_bitmap("bm0", track)
            nbd = qsd.writer()
            a, b = S._raw_array()[:k * track], T._raw_array()[:k * track]

            def before(role):
                rows[:, :8] += 1
                if role == "fastfc":
                    S.write_batch(offs, rows)
                elif role.startswith("QEMU"):
                    nbd.write_many(offs.tolist(), rows[0].tobytes())
                    dirty = qsd.bitmap_count("bm0")
                    assert dirty == k * track, (dirty, k * track)

            def f_incr():
                fc.resync()
                fc.copy()
            incr = {"np.copyto": lambda: np.copyto(b, a), "fastfc": f_incr,
                    "QEMU defaults": lambda: qsd.backup("incremental", bitmap="bm0"),
                    "QEMU tuned": lambda: qsd.backup("incremental", tuned, bitmap="bm0")}
            log(f"    incremental backup of 10% of the tracks, {rounds} rounds")
            out["incremental"] = _rounds(incr, rounds, before=before)
            out["incremental_bytes"] = k * track
            nbd.close()
            fc.withdraw()
            assert np.array_equal(S._raw_array(), T._raw_array()), "incremental copies left S and T different"
        out["medians"] = {kind: {r: statistics.median(v) for r, v in out[kind].items()}
                          for kind in ("full", "incremental")}
    finally:
        for fc in fcs:
            if fc.state is not FlashCopyState.WITHDRAWN:
                fc.withdraw(force=True)
        for v in (S, T):
            if v is not None:
                v.close()
        shutil.rmtree(d, ignore_errors=True)
    return out


def _perturb(T, fcs) -> None:
    """Before each full copy: the previous fastfc relationship has ended and
    the target differs from the source again (one byte per page)."""
    from benches.cases import wait_withdrawn
    for fc in fcs:
        wait_withdrawn(fc)
    T._raw_array()[::4096] ^= 0xFF


def _rounds(fns: dict, rounds: int, before) -> dict[str, list[float]]:
    """Time each role once per round, in alternating order, after one
    untimed warm-up round."""
    samples: dict[str, list[float]] = {k: [] for k in fns}
    names = list(fns)
    for i in range(rounds + 1):
        for k in (names if i % 2 == 0 else names[::-1]):
            before(k)
            t0 = time.perf_counter()
            fns[k]()
            if i:
                samples[k].append(time.perf_counter() - t0)
    return samples
