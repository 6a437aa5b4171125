"""The direct stream between a session and a unit (fastfc/remote/stream.py),
without Ray: messages against pickle's own round trip, arrays received
into a reused buffer, pipelined calls answered in order, a peer that dies
mid-message or never answers, a wrong token, a unit served in a child
process (the same server and stream code as in the Ray actor) killed
mid-apply, mid-prepare and mid-finish, and started again elsewhere."""

from __future__ import annotations

import gc
import multiprocessing
import os
import pathlib
import pickle
import random
import signal
import socket
import threading
import time

import numpy as np
import pytest

import fastfc
from fastfc.copyservices.globalmirror import Cause, GMState
from fastfc.remote import stream
from fastfc.remote.client import UnitHandle
from fastfc.remote.server import UnitServer
from fastfc.tools.testing import PromiseChecker

TS = 4096
N = 32


# -- messages ------------------------------------------------------------------------

def _same(a, b) -> bool:
    if isinstance(a, np.ndarray):
        return (isinstance(b, np.ndarray) and a.dtype == b.dtype and a.shape == b.shape
                and np.array_equal(a, b))
    if isinstance(a, (list, tuple)):
        return type(a) is type(b) and len(a) == len(b) and all(map(_same, a, b))
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, BaseException):
        return type(a) is type(b) and a.args == b.args
    return a == b


def _objects(rng: np.random.Generator) -> list:
    big = rng.integers(0, 256, (5 << 20) // TS * TS, dtype=np.uint8).reshape(-1, TS)
    return [
        ("apply", ([("b0", np.arange(3, dtype=np.int64) * TS,
                     rng.integers(0, 256, (3, TS), dtype=np.uint8))], "gm/4/ab12")),
        ("apply", ([("b1", np.array([7 * TS], np.int64), big[:1]),
                    ("b2", np.arange(len(big), dtype=np.int64) * TS, big)],)),
        (0, {"epoch": 3, "fcs": [("c0", True, 4)], "decisions": {4: "commit"}}),
        (1, fastfc.FencedError("unit u is owned by epoch 5")),
        np.zeros(0, np.uint8), np.float32(2.5) * np.ones((3, 5), np.float32, order="F"),
        rng.integers(0, 9, (8, 6)).astype(np.int16)[::2, 1::3],     # not contiguous
        np.array(7, np.int64), b"\x00" * 100, "x" * 1000, None, (),
    ]


def test_messages_round_trip_as_pickle_does():
    """Every object comes back equal to itself (arrays with their dtype and
    shape), over one socket, each message read into the reused buffer."""
    rng = np.random.default_rng(3)
    objs = _objects(rng)
    a, b = socket.socketpair()
    try:
        sender = threading.Thread(target=lambda: [stream.send_parts(a, stream.encode(o), 10)
                                                  for o in objs])
        sender.start()
        bufs = stream._Buffers(reuse=True)
        for o in objs:
            got, buf = stream.recv_message(b, 10, bufs)
            assert _same(o, got), (o, got)
            assert _same(pickle.loads(pickle.dumps(o, protocol=5)), got)
            del got
            bufs.give_back(buf)
        sender.join()
    finally:
        a.close()
        b.close()


def test_a_kept_array_is_never_overwritten_by_the_next_message():
    """The server receives each message's arrays into one buffer, reused
    while nothing received into it is alive: an array a call kept is left
    as it was (the next message goes elsewhere); once dropped, the buffer
    is reused."""
    a, b = socket.socketpair()
    try:
        bufs = stream._Buffers(reuse=True)
        first = np.full(1 << 16, 1, np.uint8)
        stream.send_parts(a, stream.encode(("m", (first,))), 10)
        (_, (kept,)), buf = stream.recv_message(b, 10, bufs)
        assert np.shares_memory(kept, buf)
        bufs.give_back(buf)                         # the call kept `kept`
        stream.send_parts(a, stream.encode(("m", (np.full(1 << 16, 2, np.uint8),)),), 10)
        (_, (second,)), buf = stream.recv_message(b, 10, bufs)
        assert (kept == 1).all() and (second == 2).all()
        assert not np.shares_memory(second, kept)
        del second, kept
        bufs.give_back(buf)                         # dropped: reused
        stream.send_parts(a, stream.encode(("m", (np.full(1 << 16, 3, np.uint8),)),), 10)
        (_, (third,)), again = stream.recv_message(b, 10, bufs)
        assert again is buf and np.shares_memory(third, buf) and (third == 3).all()
    finally:
        a.close()
        b.close()


# -- a unit served in a child process ------------------------------------------------------

def _child(path: str, durability: str, pipe) -> None:
    """A unit's server and its stream, as the Ray actor runs them: one
    lock around the server; ``arm_kill`` (SIGKILL inside a call), ``echo``
    and ``sleep`` for the tests."""
    armed: list[tuple[str, int]] = []

    def kill_point(where, i):
        if armed and armed[0] == (where, i):
            os.kill(os.getpid(), signal.SIGKILL)

    server = UnitServer(path, durability=durability, kill_point=kill_point,
                        kill_armed=lambda where: bool(armed) and armed[0][0] == where)
    lock = threading.Lock()

    def dispatch(method, args):
        if method == "arm_kill":
            armed[:] = [tuple(args)]
            return None
        if method == "echo":
            return args
        if method == "sleep":
            time.sleep(args[0])
            return args[0]
        with lock:
            return getattr(server, method)(*args)

    s = stream.StreamServer(dispatch)
    pipe.send((s.address, s.local_path, s.token, os.getpid()))
    threading.Event().wait()


class ChildUnit(UnitHandle):
    """A unit served by a forked child process, reached by its stream."""

    kind = "stream"

    @classmethod
    def start(cls, path, name: str, durability: str = "process",
              local: bool = False) -> "ChildUnit":
        ctx = multiprocessing.get_context("fork")
        ours, theirs = ctx.Pipe()
        proc = ctx.Process(target=_child, args=(str(path), durability, theirs), daemon=True)
        proc.start()
        if not ours.poll(30):
            proc.kill()
            raise RuntimeError("the unit's child process did not start")
        address, path, token, pid = ours.recv()
        stream.stream_transport().connect(name, path if local else address, token)
        u = cls(name)
        u.proc, u.address, u.token, u.pid = proc, address, token, pid
        return u

    def arm_kill(self, where: str, i: int) -> None:
        self._site()._now("arm_kill", where, i)

    def kill(self) -> None:
        self.proc.kill()
        self.proc.join(10)

    @property
    def up(self) -> bool:
        return self.proc.is_alive()


@pytest.fixture
def child_units(tmp_path):
    made: list[ChildUnit] = []

    def start(i: int, durability: str = "process", local: bool = False) -> ChildUnit:
        u = ChildUnit.start(tmp_path / f"u{i}", f"{tmp_path.name}-u{i}", durability, local)
        made.append(u)
        return u
    yield start
    for u in made:
        u.kill()
        stream.stream_transport().forget(u.name)


def test_pipelined_calls_are_answered_in_order_across_threads(child_units):
    """Two threads each send 60 calls before reading any answer (some with
    1 MiB arrays, one that takes 0.2 s in the unit), then read them in a
    random order: every answer is its own call's. (Over the unit's Unix
    socket.)"""
    u = child_units(0, local=True)
    c = stream.stream_transport().client(u.name)
    assert isinstance(c.address, str) and c.address.endswith(".sock")
    out: dict[int, list] = {}

    def caller(k: int) -> None:
        rng = np.random.default_rng(k)
        sent = []
        for j in range(60):
            arg = (k, j, rng.integers(0, 256, (1 << 20) if j % 7 == 0 else j, dtype=np.uint8))
            sent.append((arg, c.call("sleep" if j == 30 else "echo",
                                     (0.2,) if j == 30 else arg)))
        order = list(range(len(sent)))
        random.Random(k).shuffle(order)
        out[k] = [(sent[j][0], sent[j][1].result(), j) for j in order]

    ts = [threading.Thread(target=caller, args=(k,)) for k in range(2)]
    for t in ts:
        t.start()
    for t in ts:
        t.join()
    for k in range(2):
        assert len(out[k]) == 60
        for arg, got, j in out[k]:
            assert got == 0.2 if j == 30 else _same(arg, got), (k, j)


def test_a_peer_idle_between_calls_is_served(child_units):
    """The server waits as long as its peer likes for the next request."""
    u = child_units(0)
    c = stream.stream_transport().client(u.name)
    for k in range(3):
        assert c.call("echo", (k,)).result() == (k,)
        time.sleep(0.15)
    assert c.broken is None


def test_an_answer_nobody_reads_is_not_kept(child_units):
    """A call whose Pending is dropped unread (a session that gave up on
    it) leaves nothing behind in the client, whether its answer came
    before the Pending went or after."""
    u = child_units(0)
    c = stream.stream_transport().client(u.name)
    c.call("echo", (1,))                    # dropped at once: its answer still to come
    assert c.call("echo", (2,)).result() == (2,)
    early, last = c.call("echo", (3,)), c.call("echo", (4,))
    assert last.result() == (4,)            # read (3,)'s answer on the way: kept for it
    assert list(c._answers) == [early.seq]
    del early                               # dropped after its answer came
    gc.collect()
    assert c._answers == {} and c._abandoned == set()
    assert c.call("echo", (5,)).result() == (5,)


def _fake_server(token: bytes, behave) -> tuple[tuple[str, int], threading.Thread]:
    """A peer that authenticates with ``token``, reads one request, then
    does ``behave(conn)``."""
    lst = socket.create_server(("127.0.0.1", 0))

    def run():
        conn, _ = lst.accept()
        lst.close()
        try:
            if stream._server_handshake(conn, token):
                stream.recv_message(conn, 10, stream._Buffers(False))
                behave(conn)
        except (OSError, stream.StreamBroken):
            pass                # the client gave up on it
        finally:
            conn.close()
    t = threading.Thread(target=run, daemon=True)
    t.start()
    return lst.getsockname()[:2], t


def test_a_peer_dying_mid_answer_is_a_unit_down_not_a_hang():
    token = os.urandom(32)

    def half_answer(conn):     # says 1 MiB of data follows, sends 100 bytes, dies
        conn.sendall(stream.encode((0, np.zeros(1 << 20, np.uint8)))[0] + b"\x00" * 100)

    address, t = _fake_server(token, half_answer)
    broke = []
    c = stream.StreamClient("fake", address, token, lambda: 20.0, broke.append)
    start = time.monotonic()
    p = c.call("read", ("v", 0, 1 << 20))
    with pytest.raises(fastfc.UnitDownError, match="fake is down"):
        p.result()
    assert time.monotonic() - start < 5 and broke == [c]
    with pytest.raises(fastfc.UnitDownError):      # the stream is done: refused at once
        c.call("info", ()).result()
    t.join()


def test_a_peer_that_never_answers_times_out():
    token = os.urandom(32)
    gone = threading.Event()
    address, t = _fake_server(token, lambda conn: gone.wait(10))
    c = stream.StreamClient("mute", address, token, lambda: 0.3)
    start = time.monotonic()
    with pytest.raises(fastfc.UnitDownError, match="did not answer info within"):
        c.call("info", ()).result()
    assert time.monotonic() - start < 3
    gone.set()
    t.join()


def test_a_wrong_token_is_refused_and_nothing_of_its_peer_unpickled(child_units, tmp_path):
    u = child_units(0)
    with pytest.raises(fastfc.UnitDownError, match="authentication"):
        stream.StreamClient(u.name, u.address, os.urandom(32), lambda: 5.0)

    marker = tmp_path / "unpickled"

    class Touch:
        def __reduce__(self):
            return (pathlib.Path.touch, (marker,))

    evil = stream.encode(("echo", (Touch(),)))

    def push(proof: bytes) -> bytes:
        """Say hello, answer with ``proof``, then send the pickle anyway."""
        with socket.create_connection(u.address, timeout=5) as s:
            mine = os.urandom(stream.NONCE)
            s.sendall(stream.MAGIC + mine)
            theirs = stream._recv_exact(s, stream.NONCE + stream.MAC, time.monotonic() + 5)
            s.sendall(proof(theirs[:stream.NONCE], mine))
            try:
                s.sendall(b"".join(bytes(p) for p in evil))
                if s.recv(1) != b"\x01":
                    return None
                return stream.recv_message(s, 5, stream._Buffers(False))[0]
            except OSError:
                return None

    assert push(lambda theirs, mine: os.urandom(stream.MAC)) is None   # dropped
    time.sleep(0.2)
    assert not marker.exists()
    # the same bytes from a peer that knows the token are unpickled (the test
    # can tell): the server answers and the marker appears
    got = push(lambda theirs, mine: stream._mac(u.token, b"client", theirs, mine))
    assert got[0] == 0 and marker.exists()
    # and the unit serves its callers all along
    assert stream.stream_transport().site(u.name)._now("info")["pid"] == u.pid


def test_a_server_that_does_not_know_the_token_is_refused():
    """A listener that takes any peer (it cannot prove the token: another
    process on the port a dead unit held) is refused before anything of
    it is unpickled."""
    lst = socket.create_server(("127.0.0.1", 0))

    def impostor():
        conn, _ = lst.accept()
        with conn:
            stream._recv_exact(conn, len(stream.MAGIC) + stream.NONCE, time.monotonic() + 5)
            conn.sendall(os.urandom(stream.NONCE + stream.MAC))
            try:
                stream._recv_exact(conn, stream.MAC, time.monotonic() + 5)
                conn.sendall(b"\x01")
                conn.sendall(b"".join(bytes(p) for p in stream.encode((0, "served"))))
            except (OSError, stream.StreamBroken):
                pass
    t = threading.Thread(target=impostor, daemon=True)
    t.start()
    with pytest.raises(fastfc.UnitDownError, match="failed authentication"):
        stream.StreamClient("impostor", lst.getsockname()[:2], os.urandom(32), lambda: 5.0)
    t.join(5)
    lst.close()


def test_kills_over_the_stream_keep_the_promise_and_restarts_reconnect(child_units):
    """A session over two units in child processes: each killed mid-apply,
    mid-prepare (the prepare rides behind the last batch) and mid-finish
    gives the cause the Ray tests expect, here exactly (the answers come in
    order: the batch answered before its prepare ran); each is started
    again (a new process, port and token), the proxies made before work,
    and the session goes on keeping the promise."""
    units = [child_units(i) for i in range(2)]
    trips = []
    for i in range(4):
        u = units[i % 2]
        trips.append((fastfc.Volume(N, TS, name=f"a{i}"), u.create_volume(f"b{i}", N, TS),
                      u.create_volume(f"c{i}", N, TS)))
    chk = PromiseChecker()
    gm = fastfc.GlobalMirror(trips, on_coordinate=chk.on_coordinate)
    chk.attach(gm)
    rng = np.random.default_rng(5)

    def cgs(n):
        for _ in range(n):
            for a, _, _ in trips:
                a.write(int(rng.integers(0, N)) * TS, rng.integers(0, 256, 100, dtype=np.uint8))
            res = gm.form_consistency_group()
            assert res.committed, res
            chk.check()

    cgs(2)
    for unit, where, i, cause in [(0, "apply", 1, Cause.LINK_DOWN),
                                  (0, "prepare", 0, Cause.PREPARE_FAILED),
                                  (1, "prepare", 1, Cause.PREPARE_FAILED),
                                  (1, "finish", 0, Cause.COMMIT_FAILED)]:
        for a, _, _ in trips:
            a.write(0, b"x")
            a.write(N // 2 * TS, b"y")
        old = units[unit].address
        units[unit].arm_kill(where, i)
        res = gm.form_consistency_group()
        assert res.cause is cause, (where, res)
        units[unit].proc.join(10)        # (its stream closes just before it is reapable)
        assert units[unit].proc.exitcode == -signal.SIGKILL, where
        units[unit] = child_units(unit)
        assert units[unit].address != old
        gm.clear_fatal()
        assert gm.state is GMState.IDLE
        assert chk.check() == gm.stats.sequence
        cgs(2)
    gm.close()
