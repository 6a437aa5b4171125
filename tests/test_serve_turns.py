"""The NBD server's batches and turns: pipelined requests on many
connections all answered, in order, with the right data; the turn a
Global Mirror session shares with the connections (``nbd.Turn``) handed
over in order, never deadlocking a FLUSH, a large request or a disconnect;
and a session in a server taking it around each CG attempt."""

from __future__ import annotations

import random
import struct
import threading
import time

import numpy as np
import pytest

from fastfc import StorageUnit
from fastfc.tools import nbd
from fastfc.tools.cli.loops import SessionLoops, SessionTurn

from test_serve_protocol import MIB, Client, served

_REQ = struct.Struct(">IHHQQI")


def _req(cmd: int, handle: int, offset: int = 0, length: int = 0, data: bytes = b"",
         flags: int = 0) -> bytes:
    return _REQ.pack(nbd.REQUEST_MAGIC, flags, cmd, handle, offset, length) + data


def _replies(c: Client, expect: list[tuple[int, int]]) -> list[tuple[int, int, bytes]]:
    """Read one simple reply per (handle, read length) in ``expect``."""
    out = []
    for handle, n in expect:
        magic, err, h = struct.unpack(">IIQ", c.recv(16))
        assert magic == nbd.SIMPLE_REPLY_MAGIC
        out.append((h, err, c.recv(n) if n and not err else b""))
    return out


def test_pipelined_requests_of_every_kind_are_answered_in_order(tmp_path):
    """One send of many requests (small and large writes, reads of written
    data, FLUSH, WRITE_ZEROES, an unknown command, a write past the end),
    some cut across sends: every reply comes back in the order sent, each
    with its handle, error and data."""
    rng = random.Random(5)
    with served(tmp_path, "A", size=4 * MIB) as (server, path):
        c = Client(path)
        c.go("A")
        model = bytearray(4 * MIB)
        stream, expect, want = bytearray(), [], []
        for h in range(400):
            kind = rng.choice(["w", "w", "r", "W", "R", "f", "z", "x", "bad"])
            if kind in "wW":
                n = rng.choice([512, 4096, 65536]) if kind == "w" else rng.choice(
                    [65537, 200000])
                off = rng.randrange(0, 4 * MIB - n)
                data = bytes([h % 251 + 1]) * n
                model[off:off + n] = data
                stream += _req(nbd.CMD_WRITE, h, off, n, data)
                expect.append((h, 0))
                want.append((h, 0, b""))
            elif kind in "rR":
                n = rng.choice([4096, 65536]) if kind == "r" else 300000
                off = rng.randrange(0, 4 * MIB - n)
                stream += _req(nbd.CMD_READ, h, off, n)
                expect.append((h, n))
                want.append((h, 0, bytes(model[off:off + n])))
            elif kind == "f":
                stream += _req(nbd.CMD_FLUSH, h)
                expect.append((h, 0))
                want.append((h, 0, b""))
            elif kind == "z":
                off, n = rng.randrange(0, 4 * MIB - 8192), 8192
                model[off:off + n] = bytes(n)
                stream += _req(nbd.CMD_WRITE_ZEROES, h, off, n)
                expect.append((h, 0))
                want.append((h, 0, b""))
            elif kind == "x":
                stream += _req(nbd.CMD_TRIM, h, 0, 4096)
                expect.append((h, 0))
                want.append((h, nbd.E_INVAL, b""))
            else:
                stream += _req(nbd.CMD_WRITE, h, 4 * MIB - 10, 20, b"z" * 20)
                expect.append((h, 0))
                want.append((h, nbd.E_NOSPC, b""))
        got: list = []
        reader = threading.Thread(target=lambda: got.extend(_replies(c, expect)))
        reader.start()
        k = 0
        while k < len(stream):          # in pieces that cut requests anywhere
            n = rng.randrange(1, 100000)
            c.s.sendall(stream[k:k + n])
            k += n
        reader.join(60)
        assert not reader.is_alive()
        assert got == want
        with server.lock:
            assert bytes(server.units.local().volume("A").read(0, 4 * MIB)) == model


def test_many_connections_pipelining_all_land_and_are_answered(tmp_path):
    """16 connections, each with 300 writes and reads in flight in one
    send, while a session-like holder takes the turn again and again:
    every reply, in order per connection, and every write in the volume."""
    n, per = 16, 300
    with served(tmp_path, "A", size=16 * MIB) as (server, path):
        turn = server.turn
        turn.active += 1                # as while a session runs
        stop = threading.Event()

        def session() -> None:          # takes the turn as CG attempts do
            while not stop.is_set():
                if turn.acquire(timeout=1.0, alone=True):
                    time.sleep(0.0005)
                    turn.release(alone=True)

        errors: list = []

        def client(k: int) -> None:
            try:
                c = Client(path)
                c.s.settimeout(60)
                c.go("A")
                stream, expect = bytearray(), []
                base = k * MIB
                for i in range(per):
                    off = base + (i % 128) * 8192
                    if i % 3 == 2:
                        stream += _req(nbd.CMD_READ, i, off, 4096)
                        expect.append((i, 4096))
                    else:
                        stream += _req(nbd.CMD_WRITE, i, off, 4096, bytes([k + 1]) * 4096)
                        expect.append((i, 0))
                got: list = []
                r = threading.Thread(target=lambda: got.extend(_replies(c, expect)))
                r.start()
                c.s.sendall(stream)
                r.join(120)
                assert [h for h, _, _ in got] == list(range(per))
                assert all(err == 0 for _, err, _ in got)
                for h, _, data in got:
                    if h % 3 == 2:
                        assert data in (bytes(4096), bytes([k + 1]) * 4096)
                c.s.sendall(_req(nbd.CMD_DISC, 0))
            except BaseException as e:      # noqa: BLE001 - reported below
                errors.append(e)

        holder = threading.Thread(target=session)
        holder.start()
        threads = [threading.Thread(target=client, args=(k,)) for k in range(n)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(180)
        stop.set()
        holder.join(10)
        turn.active -= 1
        assert not errors, errors
        assert not turn.locked()
        with server.lock:
            data = server.units.local().volume("A").read(0, 16 * MIB)
        for k in range(n):
            blk = data[k * MIB:k * MIB + 128 * 8192].reshape(128, 8192)
            assert np.all(blk[:, :4096] == k + 1)


def test_while_the_turn_is_held_small_requests_wait_and_the_rest_is_answered(tmp_path):
    """A session holding the turn: a connection's small write waits for it
    (it lands once the turn is given back); a FLUSH, a large read and a
    disconnect on other connections are answered meanwhile: nothing that
    may wait long is done holding the turn, and nothing deadlocks."""
    with served(tmp_path, "A", size=4 * MIB) as (server, path):
        turn = server.turn
        server.nbd.turn_wait = 600.0         # no going on without it here
        turn.active += 1
        try:
            assert turn.acquire(alone=True)
            w = Client(path)
            w.go("A")
            w.s.sendall(_req(nbd.CMD_WRITE, 1, 0, 4096, b"\x55" * 4096))
            others = Client(path)
            others.go("A")
            assert others.request(nbd.CMD_FLUSH) == (0, b"")
            err, body = others.request(nbd.CMD_READ, 0, 2 * nbd.KEEP)
            assert err == 0 and body == bytes(2 * nbd.KEEP)    # the write waits
            assert others.request(nbd.CMD_WRITE, MIB, 2 * nbd.KEEP,
                                  b"\x66" * (2 * nbd.KEEP))[0] == 0
            gone = Client(path)
            gone.go("A")
            gone.s.sendall(_req(nbd.CMD_DISC, 0))
            assert gone.s.recv(1) == b""                       # closed by the server
            with server.lock:
                assert not server.units.local().volume("A").read(0, 4096).any()
            turn.release(alone=True)
            magic, err, h = struct.unpack(">IIQ", w.recv(16))
            assert (magic, err, h) == (nbd.SIMPLE_REPLY_MAGIC, 0, 1)
            with server.lock:
                assert bytes(server.units.local().volume("A").read(0, 4096)) == b"\x55" * 4096
            assert not turn.locked()                            # given back after the batch
        finally:
            turn.active -= 1


def test_a_batch_goes_on_without_a_turn_held_too_long(tmp_path):
    """A turn held past ``turn_wait`` (a session stuck in a long attempt):
    the requests are carried out anyway, without it."""
    with served(tmp_path, "A") as (server, path):
        server.nbd.turn_wait = 0.01
        server.turn.active += 1
        try:
            assert server.turn.acquire(alone=True)
            c = Client(path)
            c.go("A")
            assert c.request(nbd.CMD_WRITE, 0, 4096, b"\x77" * 4096)[0] == 0
            assert c.request(nbd.CMD_READ, 0, 4096) == (0, b"\x77" * 4096)
            server.turn.release(alone=True)
        finally:
            server.turn.active -= 1


def test_without_a_session_the_connections_take_no_turn(tmp_path):
    """No session takes turns: a held turn holds no request up."""
    with served(tmp_path, "A") as (server, path):
        server.nbd.turn_wait = 600.0
        assert server.turn.active == 0
        assert server.turn.acquire(alone=True)
        try:
            c = Client(path)
            c.go("A")
            assert c.request(nbd.CMD_WRITE, 0, 4096, b"\x01" * 4096)[0] == 0
        finally:
            server.turn.release(alone=True)


def test_the_turn_is_handed_over_in_the_order_asked():
    """release() hands the places to the longest waiting, who has them at
    once, in order: batches take one place each (two at once), an attempt
    (``alone``) every place, and one waiting alone holds up the batches
    asked after it; a waiter that gives up leaves the queue; release of a
    turn not held is refused."""
    turn = nbd.Turn(batches=2)
    assert turn.acquire(alone=True)
    order: list[str] = []
    inside = threading.Semaphore(0)
    let_go = threading.Event()

    def waiter(name: str, alone: bool) -> None:
        assert turn.acquire(alone=alone)
        order.append(name)
        inside.release()
        let_go.wait(10)
        turn.release(alone=alone)

    threads = []
    for k, (name, alone) in enumerate([("b1", False), ("s1", True), ("b2", False),
                                       ("b3", False)]):
        t = threading.Thread(target=waiter, args=(name, alone))
        t.start()
        threads.append(t)
        while len(turn._waiting) < k + 1:       # queued in this order
            time.sleep(0.001)
    assert turn.acquire(timeout=0.01) is False   # gave up: not left queued
    assert len(turn._waiting) == 4
    assert turn.acquire(blocking=False) is False
    assert turn.release(alone=True) is True      # handed over: b1 only (s1 needs both)
    assert inside.acquire(timeout=10)
    assert order == ["b1"] and len(turn._waiting) == 3
    let_go.set()                                 # b1 done: s1, then b2 and b3 together
    for t in threads:
        t.join(10)
    assert order[:2] == ["b1", "s1"] and sorted(order[2:]) == ["b2", "b3"]
    assert not turn.locked()
    with pytest.raises(RuntimeError):
        turn.release()


def test_session_turn_rests_only_when_requests_wait():
    """A session's attempts take the turn; given back to nobody, the next
    attempt asks at once; handed over to a waiting request, the next waits
    a rest of at most MAX_REST first."""
    from fastfc.tools.cli import loops
    turn = nbd.Turn(batches=2)
    st = SessionTurn(turn, share=0.25)
    assert st.acquire(timeout=1)
    assert st.release() is False
    assert st._rest_until == 0.0
    assert st.acquire(timeout=1)
    got = threading.Event()

    def request() -> None:
        assert turn.acquire(timeout=10)
        got.set()
        turn.release()

    t = threading.Thread(target=request)
    t.start()
    while not turn._waiting:
        time.sleep(0.001)
    before = time.monotonic()
    assert st.release() is True
    assert before < st._rest_until <= time.monotonic() + loops.MAX_REST
    t.join(10)
    assert got.is_set()


def test_a_session_running_in_a_server_takes_turns_and_stops_taking_them(tmp_path):
    """SessionLoops gives a session whose B and C are here the server's
    turn (an attempt holds it: seen from on_coordinate), counts it active
    while the loop runs, and takes it back when the loop stops."""
    from fastfc.copyservices.globalmirror import GlobalMirror
    with StorageUnit(tmp_path / "a") as ua, StorageUnit(tmp_path / "b") as ub:
        a = ua.create_volume("A", 4)
        b = ub.create_volume("B", 4)
        c = ub.create_volume("C", 4)
        gm = GlobalMirror([(a, b, c)], name="S")
        turn = nbd.Turn()
        held: list[bool] = []
        gm.on_coordinate = lambda seq: held.append(turn.locked())
        loops = SessionLoops(turn)
        assert loops.start(gm)
        assert isinstance(gm.turn, SessionTurn) and turn.active == 1
        deadline = time.monotonic() + 60
        while gm.stats.successes < 3 and time.monotonic() < deadline:
            time.sleep(0.01)
        assert loops.stop(gm)
        assert gm.stats.successes >= 3
        assert held and all(held)
        assert gm.turn is None and turn.active == 0 and not turn.locked()
        res = gm.form_consistency_group()        # (no turn: a foreground attempt)
        assert res.committed
        gm.close()


def test_many_reads_in_one_batch_go_out_in_bounded_sends(tmp_path):
    """2,000 pipelined 64 KiB reads (28 bytes each: thousands fit in one
    recv) are all answered, in order, without the server holding the
    replies of the whole batch (125 MiB) at once."""
    import tracemalloc
    n = 2000
    with served(tmp_path, "A", size=4 * MIB) as (server, path):
        with server.lock:
            server.units.local().volume("A").write(0, b"\x42" * nbd.KEEP)
        c = Client(path)
        c.s.settimeout(60)
        c.go("A")
        stream = b"".join(_req(nbd.CMD_READ, h, 0, nbd.KEEP) for h in range(n))
        seen: list[int] = []

        def read() -> None:
            for h, err, data in (_replies(c, [(h, nbd.KEEP)])[0] for h in range(n)):
                assert err == 0 and data == b"\x42" * nbd.KEEP
                seen.append(h)

        tracemalloc.start()
        try:
            r = threading.Thread(target=read)
            r.start()
            c.s.sendall(stream)
            r.join(120)
            _, peak = tracemalloc.get_traced_memory()
        finally:
            tracemalloc.stop()
        assert seen == list(range(n))
        assert peak < 32 * MIB, peak / MIB
