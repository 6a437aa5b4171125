"""The NBD server's small requests carried out in the core, one C call per
run of them (``fastfc._core.nbd_batch``): what it takes and what it hands
back to the Python loop, the replies and counts it writes, and, over a
socket, that a server carrying out its batches in the core answers any
stream of requests with the same bytes, leaves the same volume bytes and
counts the same requests as one carrying out each request in Python
(``NBDServer.core_batches = False``)."""

from __future__ import annotations

import random
import socket
import struct
import threading
import time

import pytest

import fastfc
from fastfc import _core
from fastfc.errors import VolumeClosedError
from fastfc.storage.volume import Volume
from fastfc.tools import nbd, nbd_status

from test_serve_protocol import MIB, Client, served

_REQ = struct.Struct(">IHHQQI")
KEEP = nbd.KEEP


def _req(cmd: int, handle: int, offset: int = 0, length: int = 0, data: bytes = b"",
         flags: int = 0, magic: int = nbd.REQUEST_MAGIC) -> bytes:
    return _REQ.pack(magic, flags, cmd, handle, offset, length) + data


def _simple(err: int, handle: int) -> bytes:
    return struct.pack(">IIQ", nbd.SIMPLE_REPLY_MAGIC, err, handle)


def _batch(vol, rbuf, start=0, end=None, out=None, tally=None, *, structured=False,
           read_only=False, ask_turn=False, since=-1.0, keep=KEEP, limit=nbd.REPLY_LIMIT):
    out = bytearray() if out is None else out
    tally = _core.RequestTally() if tally is None else tally
    end = len(rbuf) if end is None else end
    start, why, failed = _core.nbd_batch(vol, rbuf, start, end, out, tally, structured,
                                         read_only, ask_turn, since, keep, limit)
    return start, why, failed, out, tally


# -- the core call alone ---------------------------------------------------------------

def test_the_core_takes_small_reads_and_writes_and_stops_at_anything_else():
    vol = Volume(16, 65536)
    data = bytes(range(256)) * 16
    reqs = [_req(nbd.CMD_WRITE, 1, 100, 4096, data),
            _req(nbd.CMD_READ, 2, 100, 4096),
            _req(nbd.CMD_READ, 3, 0, 0),
            _req(nbd.CMD_READ, 4, 100, 10, flags=nbd.CMD_FLAG_FUA),
            _req(nbd.CMD_WRITE, 5, 0, KEEP, b"\x07" * KEEP)]
    rbuf = bytearray(b"".join(reqs))
    start, why, failed, out, tally = _batch(vol, rbuf)
    assert (start, why, failed) == (len(rbuf), _core.NBD_DECLINED, None)
    assert bytes(out) == (_simple(0, 1) + _simple(0, 2) + data + _simple(0, 3)
                          + _simple(0, 4) + data[:10] + _simple(0, 5))
    assert bytes(vol.read(0, KEEP)) == b"\x07" * KEEP
    assert tally.pending == 5 and tally.requests == [0, 0, 0, 0]
    tally.settle(time.perf_counter())
    assert tally.pending == 0
    assert tally.requests == [3, 2, 0, 0] and tally.errors == [0, 0, 0, 0]
    assert tally.bytes == [4096 + 10, 4096 + KEEP, 0, 0]
    # latencies: from each one's start to the settle, on the clock of perf_counter
    assert 0 <= tally.seconds[0] < 5 and sum(tally.buckets[0]) == 3


@pytest.mark.parametrize("request_bytes, why", [
    (_req(nbd.CMD_WRITE, 9, 0, 8, b"12345678", flags=nbd.CMD_FLAG_FUA), "FUA: a sync"),
    (_req(nbd.CMD_WRITE, 9, 0, 8, b"12345678", flags=4), "an unknown flag"),
    (_req(nbd.CMD_READ, 9, 0, 8, flags=2), "an unknown read flag"),
    (_req(nbd.CMD_WRITE, 9, 16 * 65536 - 4, 8, b"12345678"), "past the end"),
    (_req(nbd.CMD_READ, 9, 16 * 65536, 1), "past the end"),
    (_req(nbd.CMD_READ, 9, (1 << 64) - 1, 2), "an offset that wraps"),
    (_req(nbd.CMD_WRITE, 9, 0, KEEP + 1, b"x" * (KEEP + 1)), "large"),
    (_req(nbd.CMD_READ, 9, 0, KEEP + 1), "large"),
    (_req(nbd.CMD_WRITE, 9, 0, 4096, b"x" * 100), "its data still to come"),
    (_req(nbd.CMD_FLUSH, 9), "FLUSH"),
    (_req(nbd.CMD_WRITE_ZEROES, 9, 0, 4096), "zeroes"),
    (_req(nbd.CMD_TRIM, 9, 0, 4096), "TRIM"),
    (_req(nbd_status.CMD_BLOCK_STATUS, 9, 0, 4096), "BLOCK_STATUS"),
    (_req(nbd.CMD_DISC, 9), "DISC"),
    (_req(nbd.CMD_READ, 9, 0, 8, magic=0x12345678), "a bad magic"),
    (_req(nbd.CMD_READ, 9, 0, 8)[:27], "a part of a header"),
])
def test_the_core_hands_back_what_it_does_not_take(request_bytes, why):
    """Behind a small write: each request the core does not carry out is
    left, untouched and unanswered, at ``start`` for the Python loop."""
    vol = Volume(16, 65536)
    first = _req(nbd.CMD_WRITE, 1, 0, 4, b"abcd")
    behind = _req(nbd.CMD_WRITE, 2, 8, 4, b"efgh") if len(request_bytes) >= 28 else b""
    rbuf = bytearray(first + request_bytes + behind)
    before = bytes(rbuf)
    start, code, failed, out, tally = _batch(vol, rbuf)
    assert (start, code, failed) == (len(first), _core.NBD_DECLINED, None), why
    assert bytes(out) == _simple(0, 1) and tally.pending == 1
    assert bytes(vol.read(0, 12)) == b"abcd" + bytes(8)      # the one behind: not yet
    assert bytes(rbuf) == before


def test_the_core_takes_no_write_on_a_read_only_export_and_no_empty_structured_read():
    vol = Volume(16, 65536)
    rbuf = bytearray(_req(nbd.CMD_READ, 1, 0, 4) + _req(nbd.CMD_WRITE, 2, 0, 4, b"abcd"))
    start, why, _, out, _ = _batch(vol, rbuf, read_only=True)
    assert (start, why) == (28, _core.NBD_DECLINED) and bytes(out) == _simple(0, 1) + bytes(4)
    rbuf = bytearray(_req(nbd.CMD_READ, 1, 0, 4) + _req(nbd.CMD_READ, 2, 0, 0))
    start, why, _, out, _ = _batch(vol, rbuf, structured=True)
    assert (start, why) == (28, _core.NBD_DECLINED)
    assert bytes(out) == nbd_status.data_header(1, 0, 4) + bytes(4)


def test_the_core_stops_for_the_turn_before_the_first_request_it_takes():
    vol = Volume(16, 65536)
    rbuf = bytearray(_req(nbd.CMD_FLUSH, 1) + _req(nbd.CMD_WRITE, 2, 0, 4, b"abcd"))
    assert _batch(vol, rbuf, ask_turn=True)[:2] == (0, _core.NBD_DECLINED)   # (FLUSH first)
    start, why, _, out, tally = _batch(vol, rbuf, 28, ask_turn=True)
    assert (start, why, bytes(out)) == (28, _core.NBD_TURN, b"")
    assert bytes(vol.read(0, 4)) == bytes(4)
    # asked at ``since``: the first request's latency counts from then
    since = time.perf_counter() - 3.0
    start, why, _, out, tally = _batch(vol, rbuf, 28, since=since)
    assert (start, why, bytes(out)) == (len(rbuf), _core.NBD_DECLINED, _simple(0, 2))
    tally.settle(time.perf_counter())
    assert tally.seconds[1] >= 3.0 and tally.buckets[1][-1] == 1     # (over 2.5 s)


def test_the_core_stops_once_the_replies_reach_the_limit():
    vol = Volume(16, 65536)
    rbuf = bytearray(b"".join(_req(nbd.CMD_READ, h, 0, 4096) for h in range(10)))
    start, why, _, out, tally = _batch(vol, rbuf, limit=3 * 4096)
    assert (start, why) == (3 * 28, _core.NBD_FULL) and len(out) == 3 * (16 + 4096)
    start, why, _, out, tally = _batch(vol, rbuf, start, out=bytearray(), tally=tally,
                                       limit=3 * 4096)
    assert (start, why) == (6 * 28, _core.NBD_FULL) and tally.pending == 6


def test_a_refused_request_comes_back_with_its_exception_and_no_reply():
    """The volume refuses (closed): the request is consumed, not answered;
    the Python loop answers it from the exception, as it would have."""
    vol = Volume(16, 65536)
    vol.write(0, b"kept")
    rbuf = bytearray(_req(nbd.CMD_READ, 1, 0, 4) + _req(nbd.CMD_READ, 2, 0, 4)
                     + _req(nbd.CMD_WRITE, 3, 0, 4, b"lost"))
    out = bytearray()
    start, why, failed, out, tally = _batch(vol, rbuf, 0, 28, out=out)
    assert (start, why, bytes(out)) == (28, _core.NBD_DECLINED, _simple(0, 1) + b"kept")
    vol.close()
    start, why, failed, out, tally = _batch(vol, rbuf, 28, out=out, tally=tally)
    assert (start, why) == (56, _core.NBD_FAILED)
    e, op, handle, length, t0 = failed
    assert isinstance(e, VolumeClosedError) and (op, handle, length) == (0, 2, 4)
    assert bytes(out) == _simple(0, 1) + b"kept"                 # nothing of it
    start, why, failed, out, tally = _batch(vol, rbuf, 56, out=out, tally=tally)
    assert (start, why) == (len(rbuf), _core.NBD_FAILED)
    assert isinstance(failed[0], VolumeClosedError) and failed[1:4] == (1, 3, 4)
    assert nbd.error_number(failed[0]) == nbd.E_SHUTDOWN
    assert tally.pending == 1


def test_the_core_refuses_buffers_it_cannot_use():
    vol = Volume(16, 65536)
    rbuf = bytearray(_req(nbd.CMD_READ, 1, 0, 4))
    with pytest.raises(ValueError, match="no requests at"):
        _batch(vol, rbuf, 0, len(rbuf) + 1)
    with pytest.raises(ValueError, match="no requests at"):
        _batch(vol, rbuf, 20, 10)
    with pytest.raises(TypeError):
        _core.nbd_batch(vol, bytes(rbuf), 0, 28, bytearray(), _core.RequestTally(), False,
                        False, False, -1.0, KEEP, nbd.REPLY_LIMIT)
    with pytest.raises(TypeError):
        _core.nbd_batch(None, rbuf, 0, 28, bytearray(), _core.RequestTally(), False,
                        False, False, -1.0, KEEP, nbd.REPLY_LIMIT)
    with pytest.raises(ValueError, match="no request op"):
        _core.RequestTally().add(4, 1, 0, 0.1)


def test_request_counters_add_merge_and_read_as_lists():
    a, b = nbd.RequestCounters(), nbd.RequestCounters()
    a.add(nbd.OPS.index("write"), 4096, 0, 0.0002)
    a.add(nbd.OPS.index("write"), 4096, nbd.E_IO, 0.0001)
    b.add(nbd.OPS.index("flush"), 0, 0, 3.0)
    b.merge(a)
    assert b.requests == [0, 2, 1, 0] and b.errors == [0, 1, 0, 0]
    assert b.bytes == [0, 4096, 0, 0]
    assert b.buckets[1][:3] == [1, 1, 0] and b.buckets[2][-1] == 1
    assert b.seconds[1] == pytest.approx(0.0003)
    assert nbd.LATENCY_BUCKETS == _core.NBD_LATENCY_BUCKETS and len(b.buckets[0]) == 15
    assert "write=2/4096B" in repr(b)


# -- over a socket -----------------------------------------------------------------------

def _read_all(s: socket.socket) -> bytes:
    got = bytearray()
    while True:
        chunk = s.recv(1 << 20)
        if not chunk:
            return bytes(got)
        got += chunk


def _client(path: str, name: str, structured: bool) -> Client:
    c = Client(path)
    c.s.settimeout(60)
    if structured:
        assert c.option(nbd.OPT_STRUCTURED_REPLY)[-1][0] == nbd.REP_ACK
    assert c.go(name)[-1][0] == nbd.REP_ACK
    return c


def test_a_batch_mixing_reads_writes_refusals_and_a_large_write_then_a_close_mid_request(
        tmp_path):
    """One send: small writes and reads, bad requests of every kind, a large
    write in the middle, then the header and part of the data of one more
    write, and the client goes. Every whole request is answered in order, the
    data of each landed; the cut write lands nothing and the server drops the
    connection."""
    with served(tmp_path, "A", size=4 * MIB) as (server, path):
        assert server.nbd.core_batches
        c = _client(path, "A", structured=False)
        big = bytes([3]) * 200000
        stream = (_req(nbd.CMD_WRITE, 1, 0, 4096, b"\x01" * 4096)
                  + _req(nbd.CMD_READ, 2, 0, 8)
                  + _req(nbd.CMD_WRITE, 3, 4 * MIB - 4, 8, b"x" * 8)          # past the end
                  + _req(nbd.CMD_READ, 4, 0, 8, flags=4)                      # bad flags
                  + _req(nbd.CMD_TRIM, 5, 0, 4096)                            # not offered
                  + _req(nbd.CMD_WRITE, 6, 65536, len(big), big)              # large
                  + _req(nbd.CMD_READ, 7, 65536 + 199996, 8)
                  + _req(nbd.CMD_WRITE, 8, 8192, 4, b"\x02" * 4, flags=nbd.CMD_FLAG_FUA)
                  + _req(nbd.CMD_READ, 9, 8190, 8))
        c.s.sendall(stream + _req(nbd.CMD_WRITE, 10, 1 << 20, 4096, b"\x09" * 1000))
        want = (_simple(0, 1) + _simple(0, 2) + b"\x01" * 8 + _simple(nbd.E_NOSPC, 3)
                + _simple(nbd.E_INVAL, 4) + _simple(nbd.E_INVAL, 5) + _simple(0, 6)
                + _simple(0, 7) + b"\x03\x03\x03\x03" + bytes(4) + _simple(0, 8)
                + _simple(0, 9) + bytes(2) + b"\x02" * 4 + bytes(2))
        assert c.recv(len(want)) == want
        c.s.shutdown(socket.SHUT_WR)                  # mid-request: 1000 of 4096 bytes
        assert _read_all(c.s) == b""                  # dropped, nothing more said
        c.s.close()
        with server.lock:
            vol = server.units.local().volume("A")
            assert bytes(vol.read(0, 4096)) == b"\x01" * 4096
            assert bytes(vol.read(65536, len(big))) == big
            assert bytes(vol.read(1 << 20, 4096)) == bytes(4096)          # nothing landed
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and server.nbd.counters()["A"].requests[0] < 4:
            time.sleep(0.01)
        counts = server.nbd.counters()["A"]
        assert counts.requests == [4, 4, 0, 0] and counts.errors == [1, 1, 0, 0]


def test_a_replaced_volume_write_sees_every_write(tmp_path, monkeypatch):
    """A hook on ``Volume.write`` (a test's, a fault's): the server's small
    writes go through it, not around it in the core."""
    with served(tmp_path, "A") as (server, path):
        c = _client(path, "A", structured=False)
        assert c.request(nbd.CMD_WRITE, 0, 4, b"core")[0] == 0
        seen = []
        write = Volume.write

        def hooked(self, offset, data):
            seen.append((offset, bytes(data)))
            return write(self, offset, data)

        monkeypatch.setattr(Volume, "write", hooked)
        assert c.request(nbd.CMD_WRITE, 8, 4, b"hook")[0] == 0
        assert seen == [(8, b"hook")]
        monkeypatch.undo()
        assert c.request(nbd.CMD_WRITE, 16, 4, b"back")[0] == 0
        assert seen == [(8, b"hook")]
        assert c.request(nbd.CMD_READ, 0, 20)[1] == b"core\0\0\0\0hook\0\0\0\0back"


def _random_stream(rng: random.Random, size: int, structured: bool, n: int) -> bytes:
    """``n`` requests of every kind, mostly small reads and writes."""
    out = bytearray()
    for h in range(n):
        kind = rng.choices(["w", "r", "W", "R", "fua", "rfua", "badw", "badr", "pastw",
                            "pastr", "flush", "zero", "trim", "status", "empty"],
                           [30, 30, 2, 2, 3, 3, 2, 2, 2, 2, 2, 2, 1, 1, 2])[0]
        if kind == "w":
            k = rng.choice([1, 512, 4096, 4096, 65536, rng.randrange(1, KEEP)])
            off = rng.randrange(0, size - k + 1)
            out += _req(nbd.CMD_WRITE, h, off, k, rng.randbytes(k))
        elif kind == "r":
            k = rng.choice([1, 512, 4096, 4096, 65536, rng.randrange(1, KEEP)])
            out += _req(nbd.CMD_READ, h, rng.randrange(0, size - k + 1), k)
        elif kind == "W":
            k = rng.randrange(KEEP + 1, 3 * KEEP)
            out += _req(nbd.CMD_WRITE, h, rng.randrange(0, size - k + 1), k, rng.randbytes(k))
        elif kind == "R":
            k = rng.randrange(KEEP + 1, 3 * KEEP)
            out += _req(nbd.CMD_READ, h, rng.randrange(0, size - k + 1), k)
        elif kind == "fua":
            k = rng.choice([16, 4096])
            out += _req(nbd.CMD_WRITE, h, rng.randrange(0, size - k), k, rng.randbytes(k),
                        flags=nbd.CMD_FLAG_FUA)
        elif kind == "rfua":
            out += _req(nbd.CMD_READ, h, rng.randrange(0, size - 64), 64,
                        flags=nbd.CMD_FLAG_FUA)
        elif kind == "badw":
            out += _req(nbd.CMD_WRITE, h, 0, 8, b"badflags", flags=8)
        elif kind == "badr":
            out += _req(nbd.CMD_READ, h, 0, 8, flags=rng.choice([2, 8]))
        elif kind == "pastw":
            out += _req(nbd.CMD_WRITE, h, size - 4, 8, b"pastend!")
        elif kind == "pastr":
            out += _req(nbd.CMD_READ, h, rng.choice([size - 4, size, 1 << 63]), 8)
        elif kind == "flush":
            out += _req(nbd.CMD_FLUSH, h)
        elif kind == "zero":
            out += _req(nbd.CMD_WRITE_ZEROES, h, rng.randrange(0, size - 8192), 8192)
        elif kind == "trim":
            out += _req(nbd.CMD_TRIM, h, 0, 4096)
        elif kind == "status":
            out += _req(nbd_status.CMD_BLOCK_STATUS, h, 0, 65536)
        else:
            out += _req(nbd.CMD_READ if rng.random() < 0.5 else nbd.CMD_WRITE, h,
                        rng.randrange(0, size), 0)
    return bytes(out + _req(nbd.CMD_DISC, n))


def _run_stream(tmp_path, core: bool, structured: bool, stream: bytes, seed: int,
                target: bool, monkeypatch) -> tuple[bytes, bytes, list]:
    """Send ``stream`` (in pieces cut anywhere) to a server carrying out its
    batches in the core or not; its replies, the export's bytes, counts."""
    rng = random.Random(seed)
    calls = []
    batch = _core.nbd_batch

    def counted(*args):
        got = batch(*args)
        calls.append(got[1])
        return got

    monkeypatch.setattr(_core, "nbd_batch", counted)
    with served(tmp_path / ("core" if core else "python"), "S", "T", size=2 * MIB) as (
            server, path):
        server.nbd.core_batches = core
        with server.lock:
            u = server.units.local()
            u.volume("S").write(0, random.Random(seed).randbytes(2 * MIB))
            if target:      # reads redirected to S, copy-on-write from S's writes
                fastfc.FlashCopy(u.volume("S"), u.volume("T"), background_copy=False)
        name = "T" if target else "S"
        c = _client(path, name, structured)
        got: list[bytes] = []
        reader = threading.Thread(target=lambda: got.append(_read_all(c.s)))
        reader.start()
        k = 0
        while k < len(stream):
            n = rng.choice([28, 100, 4096, 70000, 300000])
            c.s.sendall(stream[k:k + n])
            k += n
        reader.join(120)
        assert not reader.is_alive()
        c.s.close()
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and server.nbd._live_counters:
            time.sleep(0.01)
        counts = server.nbd.counters()[name]
        # the core carried out runs of requests, or (the Python loop) none
        assert (calls.count(_core.NBD_DECLINED) > 10) if core else not calls
        with server.lock:
            u = server.units.local()
            data = bytes(u.volume(name).read(0, 2 * MIB)) + bytes(u.volume("S").read(0, 2 * MIB))
        return got[0], data, [counts.requests, counts.errors, counts.bytes,
                              [sum(b) for b in counts.buckets]]


@pytest.mark.parametrize("structured", [False, True])
@pytest.mark.parametrize("target", [False, True])
def test_random_streams_get_the_same_replies_bytes_and_counts_either_way(
        tmp_path, monkeypatch, structured, target):
    """Model: random streams of requests of every kind, sent in pieces cut
    anywhere, to a server carrying out its small requests in the core and
    to one carrying out each in Python: byte for byte the same replies, the
    same volume bytes (a FlashCopy target's reads redirected, its source's
    copy-on-write), the same counts."""
    for seed in range(3):
        rng = random.Random(seed * 7 + structured * 2 + target)
        stream = _random_stream(rng, 2 * MIB, structured, 300)
        tag = f"{seed}{structured}{target}"
        core = _run_stream(tmp_path / f"c{tag}", True, structured, stream, seed, target,
                           monkeypatch)
        python = _run_stream(tmp_path / f"p{tag}", False, structured, stream, seed, target,
                             monkeypatch)
        assert len(core[0]) > 300 * 16
        assert core[0] == python[0]
        assert core[1] == python[1]
        assert core[2] == python[2]
