"""The NBD server's protocol, byte by byte, with a minimal client of the
standard library: the handshake, every option, every command, the error
numbers, and what a client that breaks the protocol gets. No external
tools; the server runs in this process (the object ``fastfc serve`` runs)."""

from __future__ import annotations

import socket
import ssl
import struct
import subprocess
import threading
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest

import fastfc
from fastfc import StorageUnit
from fastfc.tools import nbd
from fastfc.tools.cli.serve import Server, _tls_context
from fastfc.tools.cli.units import Units

MIB = 1 << 20


@contextmanager
def served(tmp_path, *names, size=MIB, tls=None):
    unit = tmp_path / "u"
    with StorageUnit(unit) as u:
        for n in names:
            u.create_volume(n, size // 65536)
    units = Units(str(unit), None)
    try:
        server = Server(units, tls=tls)
        server.nbd.listen_unix(str(tmp_path / "s"))
        server.nbd.start()
        try:
            yield server, str(tmp_path / "s")
        finally:
            server.nbd.stop()
    finally:
        units.close()


class Client:
    def __init__(self, path: str, flags: int = nbd.FLAG_FIXED_NEWSTYLE | nbd.FLAG_NO_ZEROES):
        self.s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.s.settimeout(10)
        self.s.connect(path)
        magic, opt, hflags = struct.unpack(">QQH", self.recv(18))
        assert (magic, opt) == (nbd.NBDMAGIC, nbd.IHAVEOPT)
        assert hflags == nbd.FLAG_FIXED_NEWSTYLE | nbd.FLAG_NO_ZEROES
        self.s.sendall(struct.pack(">I", flags))

    def recv(self, n: int) -> bytes:
        out = b""
        while len(out) < n:
            chunk = self.s.recv(n - len(out))
            if not chunk:
                raise EOFError(f"closed after {len(out)} of {n} bytes")
            out += chunk
        return out

    def option(self, opt: int, data: bytes = b"") -> list[tuple[int, bytes]]:
        """Send an option; the replies up to the final one."""
        self.s.sendall(struct.pack(">QII", nbd.IHAVEOPT, opt, len(data)) + data)
        replies = []
        while True:
            magic, o, rtype, n = struct.unpack(">QIII", self.recv(20))
            assert magic == nbd.REPLY_MAGIC and o == opt
            replies.append((rtype, self.recv(n)))
            if rtype != nbd.REP_SERVER and rtype != nbd.REP_INFO:
                return replies

    def go(self, name: str, opt: int = nbd.OPT_GO, reqs=()) -> list[tuple[int, bytes]]:
        n = name.encode()
        data = struct.pack(">I", len(n)) + n + struct.pack(f">H{len(reqs)}H", len(reqs), *reqs)
        return self.option(opt, data)

    def request(self, cmd: int, offset: int = 0, length: int = 0, data: bytes = b"",
                flags: int = 0, handle: int = 7) -> tuple[int, bytes]:
        self.s.sendall(struct.pack(">IHHQQI", nbd.REQUEST_MAGIC, flags, cmd, handle, offset,
                                   length) + data)
        magic, err, h = struct.unpack(">IIQ", self.recv(16))
        assert magic == nbd.SIMPLE_REPLY_MAGIC and h == handle
        body = self.recv(length) if cmd == nbd.CMD_READ and err == 0 else b""
        return err, body

    def export_flags(self, replies) -> tuple[int, int]:
        for rtype, data in replies:
            if rtype == nbd.REP_INFO and struct.unpack_from(">H", data)[0] == nbd.INFO_EXPORT:
                _, size, flags = struct.unpack(">HQH", data)
                return size, flags
        raise AssertionError(f"no NBD_INFO_EXPORT in {replies}")


def test_handshake_list_info_go_and_io(tmp_path):
    with served(tmp_path, "A", "B") as (server, path):
        c = Client(path)
        replies = c.option(nbd.OPT_LIST)
        names = sorted(d[4:4 + struct.unpack(">I", d[:4])[0]].decode()
                       for t, d in replies if t == nbd.REP_SERVER)
        assert names == ["A", "B"] and replies[-1][0] == nbd.REP_ACK
        # structured replies are offered (tests/test_serve_block_status.py: their
        # replies); this connection goes on with simple ones
        assert c.option(nbd.OPT_STRUCTURED_REPLY, b"x")[-1][0] == nbd.REP_ERR_INVALID
        assert c.option(nbd.OPT_STARTTLS)[-1][0] == nbd.REP_ERR_UNSUP
        r = c.go("nope")
        assert r[-1][0] == nbd.REP_ERR_UNKNOWN and b"nope" in r[-1][1]
        r = c.go("A", nbd.OPT_INFO, reqs=(nbd.INFO_BLOCK_SIZE, nbd.INFO_NAME))
        assert r[-1][0] == nbd.REP_ACK
        size, flags = c.export_flags(r)
        assert size == MIB
        assert flags & nbd.TF_SEND_FLUSH and flags & nbd.TF_SEND_FUA
        assert flags & nbd.TF_CAN_MULTI_CONN and flags & nbd.TF_SEND_WRITE_ZEROES
        assert not flags & (nbd.TF_READ_ONLY | nbd.TF_SEND_TRIM)
        assert c.go("A")[-1][0] == nbd.REP_ACK
        payload = bytes(range(256)) * 20
        assert c.request(nbd.CMD_WRITE, 1000, len(payload), payload, flags=nbd.CMD_FLAG_FUA) \
            == (0, b"")
        assert c.request(nbd.CMD_READ, 1000, len(payload)) == (0, payload)
        assert c.request(nbd.CMD_WRITE_ZEROES, 1100, 100)[0] == 0
        assert c.request(nbd.CMD_READ, 1100, 100) == (0, bytes(100))
        assert c.request(nbd.CMD_FLUSH)[0] == 0
        assert c.request(nbd.CMD_READ, MIB - 10, 11)[0] == nbd.E_INVAL     # past the end
        assert c.request(nbd.CMD_WRITE, MIB - 1, 2, b"xy")[0] == nbd.E_NOSPC
        assert c.request(nbd.CMD_WRITE_ZEROES, MIB - 1, 2)[0] == nbd.E_NOSPC
        assert c.request(nbd.CMD_TRIM, 0, 4096)[0] == nbd.E_INVAL           # not offered
        assert c.request(5, 0, 4096)[0] == nbd.E_INVAL                      # CACHE
        with server.lock:
            v = server.units.local().volume("A")
            got = v.read(1000, len(payload))
        expect = np.frombuffer(payload, np.uint8).copy()
        expect[100:200] = 0
        assert np.array_equal(got, expect)
        c.s.sendall(struct.pack(">IHHQQI", nbd.REQUEST_MAGIC, 0, nbd.CMD_DISC, 1, 0, 0))
        assert c.s.recv(1) == b""


def test_export_name_and_abort_and_old_clients(tmp_path):
    with served(tmp_path, "A") as (server, path):
        c = Client(path, flags=nbd.FLAG_FIXED_NEWSTYLE)          # wants the 124 zeroes
        c.s.sendall(struct.pack(">QII", nbd.IHAVEOPT, nbd.OPT_EXPORT_NAME, 1) + b"A")
        size, flags = struct.unpack(">QH", c.recv(10))
        assert size == MIB and flags & nbd.TF_HAS_FLAGS
        assert c.recv(124) == bytes(124)
        assert c.request(nbd.CMD_READ, 0, 8) == (0, bytes(8))
        c = Client(path)
        c.s.sendall(struct.pack(">QII", nbd.IHAVEOPT, nbd.OPT_EXPORT_NAME, 1) + b"Z")
        assert c.s.recv(1) == b""                     # unknown: the connection closes
        c = Client(path)
        assert c.option(nbd.OPT_ABORT)[-1][0] == nbd.REP_ACK
        assert c.s.recv(1) == b""
        c = Client(path)
        c.s.sendall(b"garbage garbage garbage!")      # a broken client is dropped ...
        try:
            assert c.s.recv(100) == b""
        except ConnectionResetError:
            pass                                      # (closed with bytes unread)
        c = Client(path)                              # ... and the server goes on
        assert c.go("A")[-1][0] == nbd.REP_ACK


def test_error_numbers_follow_the_volume(tmp_path):
    with served(tmp_path, "S", "T", "U") as (server, path):
        with server.lock:
            u = server.units.local()
            S, T, U = u.volume("S"), u.volume("T"), u.volume("U")
            fc = fastfc.FlashCopy(S, T, record=True, background_copy=False)
        cs, ct = Client(path), Client(path)
        cs.go("S"), ct.go("T")
        assert cs.request(nbd.CMD_WRITE, 0, 4, b"abcd")[0] == 0
        with server.lock:
            fc.resync(revertible=True)                 # S write-inhibited now
        assert cs.request(nbd.CMD_WRITE, 0, 4, b"wxyz")[0] == nbd.E_PERM
        assert cs.request(nbd.CMD_WRITE_ZEROES, 0, 4)[0] == nbd.E_PERM
        assert ct.request(nbd.CMD_WRITE, 0, 4, b"wxyz")[0] == nbd.E_PERM
        assert cs.request(nbd.CMD_READ, 0, 4) == (0, b"abcd")         # nothing landed
        with server.lock:
            fc.revert()
            fc.withdraw(force=True)                    # T: no valid image
        assert ct.request(nbd.CMD_READ, 0, 4)[0] == nbd.E_IO
        # a write refused on a read-only export, even if the client sends it
        with server.lock:
            fastfc.FlashCopy(U, T, inhibit_target_write=True, background_copy=False)
        c = Client(path)
        size, flags = c.export_flags(c.go("T"))
        assert flags & nbd.TF_READ_ONLY and not flags & nbd.TF_SEND_WRITE_ZEROES
        assert c.request(nbd.CMD_WRITE, 0, 4, b"wxyz")[0] == nbd.E_PERM
        assert c.request(nbd.CMD_WRITE_ZEROES, 0, 4)[0] == nbd.E_PERM
        assert c.request(nbd.CMD_WRITE_ZEROES, 0, 4, flags=nbd.CMD_FLAG_FUA)[0] == nbd.E_PERM
        # a removed volume: its open connections get ESHUTDOWN
        cu = Client(path)
        cu.go("S")
        with server.lock:
            for fc in list(S.relationships):
                fc.withdraw(force=True)
            u.remove_volume("S")
        assert cu.request(nbd.CMD_READ, 0, 4)[0] == nbd.E_SHUTDOWN
        assert cu.request(nbd.CMD_WRITE, 0, 4, b"abcd")[0] == nbd.E_SHUTDOWN
        assert cu.request(nbd.CMD_FLUSH)[0] == nbd.E_SHUTDOWN
        assert Client(path).go("S")[-1][0] == nbd.REP_ERR_UNKNOWN


def test_many_connections_write_at_once(tmp_path):
    """Writers on several connections (as nbdcopy's multi-conn) each land
    whole; the volume's lock, not the server, orders them."""
    with served(tmp_path, "A", size=4 * MIB) as (server, path):
        errors = []

        def writer(k):
            try:
                c = Client(path)
                c.go("A")
                for i in range(64):
                    blk = bytes([k + 1]) * 16384
                    assert c.request(nbd.CMD_WRITE, (k * 64 + i) * 16384, 16384, blk,
                                     handle=i)[0] == 0
            except BaseException as e:
                errors.append(e)

        threads = [threading.Thread(target=writer, args=(k,)) for k in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert not errors, errors
        with server.lock:
            data = server.units.local().volume("A").read(0, 4 * MIB)
        assert np.array_equal(data, np.repeat(np.arange(1, 5, dtype=np.uint8), MIB))


def self_signed(where: Path) -> tuple[Path, Path]:
    """A certificate for localhost and its key, made by openssl in ``where``."""
    cert, key = where / "cert.pem", where / "key.pem"
    r = subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days",
                        "1", "-subj", "/CN=localhost", "-keyout", str(key), "-out", str(cert)],
                       capture_output=True)
    if r.returncode:
        pytest.fail(f"openssl could not make a certificate: {r.stderr!r}")
    return cert, key


def test_tls_with_certificates(tmp_path):
    cert, key = self_signed(tmp_path)
    with served(tmp_path, "A", tls=_tls_context(str(cert), str(key), None)) as (server, path):
        c = Client(path)
        assert c.go("A")[-1][0] == nbd.REP_ERR_TLS_REQD         # nothing before TLS
        assert c.option(nbd.OPT_STARTTLS)[-1][0] == nbd.REP_ACK
        ctx = ssl.create_default_context(cafile=str(cert))
        c.s = ctx.wrap_socket(c.s, server_hostname="localhost")
        assert c.go("A")[-1][0] == nbd.REP_ACK
        assert c.request(nbd.CMD_WRITE, 0, 5, b"hello")[0] == 0
        assert c.request(nbd.CMD_READ, 0, 5) == (0, b"hello")
