"""Secondary units as real Ray actors (the real transport; every other
remote behaviour is tested on the in-process one, tests/test_remote*.py):
one ``ray.init`` per test session; actor processes SIGKILLed mid-drain,
mid-prepare, between commits and at a random instant; the promise checked after every attempt,
after reconciling, and after site-loss recovery. Slow (Ray's start-up)."""

from __future__ import annotations

import importlib.util
import os
import pickle
import random
import threading
import time

import numpy as np
import pytest

import fastfc
from fastfc.copyservices.globalmirror import Cause, GMState
from fastfc.tools.testing import PromiseChecker, RandomWriters

pytestmark = pytest.mark.slow

# Ray is imported by the first test that uses it (``ray_session``), not when
# the module is collected: the import costs each xdist worker most of a
# second, and the quick loop collects this module too (then deselects it).
if not os.environ.get("CI") and importlib.util.find_spec("ray") is None:
    pytest.skip("could not import 'ray': No module named 'ray'", allow_module_level=True)


def _ray():
    if os.environ.get("CI"):
        import ray    # CI installs the remote extra: fail loudly without it
        return ray
    return pytest.importorskip("ray")

TS = 4096
N = 64


@pytest.fixture(scope="session")
def ray_session():
    ray = _ray()
    ray.init(num_cpus=2, include_dashboard=False, namespace="fastfc", log_to_driver=False)
    from fastfc import remote
    yield remote
    ray.shutdown()


def start(remote, tmp_path, i):
    return remote.SecondaryUnit.start(tmp_path / f"u{i}", name=f"{tmp_path.name}-u{i}")


def checked_session(units, n):
    """A session over ``n`` triplets (A in memory, B and C on ``units`` in
    turn) and its PromiseChecker, attached."""
    trips = []
    for i in range(n):
        u = units[i % len(units)]
        trips.append((fastfc.Volume(N, TS, name=f"a{i}"), u.create_volume(f"b{i}", N, TS),
                      u.create_volume(f"c{i}", N, TS)))
    chk = PromiseChecker()
    gm = fastfc.GlobalMirror(trips, on_coordinate=chk.on_coordinate)
    chk.attach(gm)
    return trips, gm, chk


def test_a_unit_started_on_a_busy_path_says_it_is_busy(ray_session, tmp_path):
    """A second actor on a path a unit holds reported ``UnitDownError
    (ActorDiedError during start)``, hiding the ``UnitBusyError`` naming
    the holder; so did a path this process holds. Now the error is the
    unit's own; the name is free again and the holder serves on."""
    remote = ray_session
    u = start(remote, tmp_path, 0)
    u.create_volume("v", 8, TS)
    other = f"{tmp_path.name}-other"
    with pytest.raises(fastfc.UnitBusyError):
        remote.SecondaryUnit.start(tmp_path / "u0", name=other)
    with fastfc.StorageUnit(tmp_path / "here"):
        with pytest.raises(fastfc.UnitBusyError):
            remote.SecondaryUnit.start(tmp_path / "here", name=other)
    u2 = remote.SecondaryUnit.start(tmp_path / "u2", name=other)   # the name is free
    assert u.volume("v").n_tracks == 8
    u2.kill()
    u.kill()


def test_ray_unit_contract(ray_session, tmp_path):
    remote = ray_session
    u = start(remote, tmp_path, 0)
    v = u.create_volume("v", 8, TS)
    w = pickle.loads(pickle.dumps(v))
    assert (w.name, w.n_tracks, w.track_size) == ("v", 8, TS)
    assert not w.read(0, 100).any()
    with pytest.raises(fastfc.FastFCError, match="running already"):
        start(remote, tmp_path, 0)
    pid = u.info()["pid"]
    u.kill()
    with pytest.raises(OSError):
        os.kill(pid, 0)                      # the process is gone
    t = time.monotonic()
    with pytest.raises(remote.UnitDownError):
        w.read(0, 10)
    assert time.monotonic() - t < 5          # refused, not hung
    u = start(remote, tmp_path, 0)
    assert u.info()["pid"] != pid
    assert w.read(0, 10).shape == (10,)      # the proxy made before the kill
    u.kill()


def test_ray_units_serve_the_session_over_their_stream(ray_session, tmp_path, monkeypatch):
    """The session's calls go over each unit's direct stream (on the node's
    IP as Ray reports it), which serves the session's calls only and only
    to a caller that knows the token Ray handed over; a unit started again
    listens anew and the same proxy reconnects; with the stream off the
    same calls go through Ray's actor calls."""
    remote = ray_session
    ray = _ray()
    from fastfc.remote import rayunit
    from fastfc.remote.stream import StreamClient
    u = start(remote, tmp_path, 0)
    v = u.create_volume("v", 8, TS)
    first = rayunit._transport.stream(u.name)
    where = ray.get(rayunit._transport.handle(u.name).stream.remote())
    assert where["address"][0] == ray.util.get_node_ip_address()
    assert first.address == where["local"] and first.broken is None   # the same node
    monkeypatch.setattr(rayunit, "STREAM_LOCAL", False)
    rayunit._transport.forget(u.name)
    assert v.read(0, 10).shape == (10,)
    assert rayunit._transport.stream(u.name).address == tuple(where["address"])   # TCP
    monkeypatch.setattr(rayunit, "STREAM_LOCAL", True)
    rayunit._transport.forget(u.name)
    first = rayunit._transport.stream(u.name)
    v_data = np.arange(TS, dtype=np.uint8)
    assert v.site()._now("apply", [("v", np.array([TS], np.int64), v_data[None])]) == TS
    assert np.array_equal(v.read(TS, TS), v_data)
    with pytest.raises(ValueError, match="does not serve 'close'"):
        first.call("close", ()).result()
    with pytest.raises(remote.UnitDownError, match="authentication"):
        StreamClient(u.name, first.address, os.urandom(32), lambda: 5.0)
    assert u.info()["epoch"] >= 1                   # served on, after both
    u.kill()
    assert first.broken is not None
    u = start(remote, tmp_path, 0)
    assert np.array_equal(v.read(TS, TS), v_data)   # the proxy made before
    again = rayunit._transport.stream(u.name)
    assert again is not first and again.address != first.address
    monkeypatch.setattr(rayunit, "STREAM", False)
    rayunit._transport.forget(u.name)
    assert np.array_equal(v.read(TS, TS), v_data)   # through Ray's calls
    assert u.name not in rayunit._transport._streams
    u.kill()


def test_ray_kills_keep_the_promise(ray_session, tmp_path):
    remote = ray_session
    units = [start(remote, tmp_path, i) for i in range(2)]
    trips, gm, chk = checked_session(units, 6)

    def cgs(n):
        for _ in range(n):
            res = gm.form_consistency_group()
            assert res.committed, res
            chk.check()

    def back(i):
        units[i] = start(remote, tmp_path, i)
        gm.clear_fatal()
        assert gm.state is GMState.IDLE
        assert chk.check() == gm.stats.sequence

    writers = RandomWriters([t[0] for t in trips], threads=2, seed=11).start()
    try:
        cgs(3)
        # (the prepare is sent right behind the last batch: "prepare", 0
        # kills the unit at the first step of the call after it)
        for unit, where, i, cause in [(0, "apply", 1, Cause.LINK_DOWN),
                                      (0, "prepare", 0, Cause.PREPARE_FAILED),
                                      (1, "prepare", 1, Cause.PREPARE_FAILED),
                                      (1, "finish", 0, Cause.COMMIT_FAILED),
                                      (0, "finish", 1, Cause.COMMIT_FAILED)]:
            for a, _, _ in trips:      # two runs per pair: a batch of several updates
                a.write(0, b'x')
                a.write(N // 2 * TS, b'y')
            units[unit].arm_kill(where, i)
            res = gm.form_consistency_group()        # never raises
            # A prepare rides right behind the unit's last drain batch: a unit
            # killed in it may die before Ray has delivered that batch's
            # answer, and the session then sees the batch lost (link_down)
            # rather than the prepare failed; either way nothing committed,
            # and the promise is checked just after (back). (A unit killed in
            # its finish leaves a committed CG that its reopen completes.)
            if where == "prepare":
                assert res.cause in (cause, Cause.LINK_DOWN), (where, res)
                assert not res.committed, (where, res)
            else:
                assert res.cause is cause, (where, res)
            back(unit)
            cgs(2)
        # at a random instant, while CGs form back to back
        rng = random.Random(5)
        for k in range(3):
            victim = units[k % 2]
            killer = threading.Timer(rng.uniform(0.0, 0.3), victim.kill)
            killer.start()
            end = time.monotonic() + 0.6
            while time.monotonic() < end:
                res = gm.form_consistency_group()
                if res.committed and res.cause is None:
                    try:
                        chk.check()
                    except remote.UnitDownError:
                        pass     # killed since the attempt: checked once back
            killer.join()
            back(k % 2)
            cgs(1)
    finally:
        writers.stop()
    # site loss: the primary process is gone for good (its session and A
    # volumes are not used again); the units are killed and started elsewhere
    cgs(1)
    units[1].arm_kill("finish", 0)
    last = gm.form_consistency_group()
    assert last.committed and last.cause is Cause.COMMIT_FAILED
    images = chk.snapshots[last.sequence]
    units[0].kill()
    units = [start(remote, tmp_path, i) for i in range(2)]
    assert remote.recover(units, "gm") == last.sequence
    for i in range(6):
        u = units[i % 2]
        for name in (f"b{i}", f"c{i}"):
            v = u.volume(name)
            assert np.array_equal(v.read(0, v.capacity), images[i]), name
    for u in units:
        u.kill()


def test_a_unit_ends_once_its_cluster_gcs_has_been_gone_for_the_timeout():
    """A unit's own watch of its cluster (``watch_cluster``): it runs on
    while the GCS's port answers, and ends the process once it has not for
    the timeout, not before (so a new cluster can open the unit's
    directory: Ray alone left an idle unit running after its head was lost)."""
    _ray()
    import socket

    from fastfc.remote.rayunit import watch_cluster
    gcs = socket.create_server(("127.0.0.1", 0))
    ended = threading.Event()
    t = threading.Thread(target=watch_cluster, args=(gcs.getsockname(), 0.6),
                         kwargs={"every": 0.1, "end": ended.set}, daemon=True)
    t.start()
    assert not ended.wait(1.5)          # the GCS answers: the unit runs on
    gcs.close()
    lost = time.monotonic()
    assert ended.wait(20)
    assert time.monotonic() - lost >= 0.6 - 0.1     # not before the timeout (one check's slack)
    t.join(5)
    assert not t.is_alive()


def _all_threads_stopped(pid: int) -> bool:
    for tid in os.listdir(f"/proc/{pid}/task"):
        try:
            with open(f"/proc/{pid}/task/{tid}/stat") as f:
                if f.read().rsplit(")", 1)[1].split()[0] not in ("T", "t"):
                    return False
        except FileNotFoundError:       # a thread that ended
            pass
    return True


def test_ray_a_hung_unit_times_out_and_answers_again(ray_session, tmp_path, monkeypatch):
    """A unit whose process stops answering (SIGSTOP: a hung host) makes
    proxy calls and CG attempts fail within the call timeout, never hang;
    once it runs again (Ray may have reaped it: then started again) the same
    proxy and session work."""
    import signal
    from fastfc.remote import rayunit
    remote = ray_session
    monkeypatch.setattr(rayunit, "CALL_TIMEOUT", 1.5)
    u = start(remote, tmp_path, 0)
    a = fastfc.Volume(8, TS, name="a")
    b, c = u.create_volume("b", 8, TS), u.create_volume("c", 8, TS)
    gm = fastfc.GlobalMirror([(a, b, c)])
    assert gm.form_consistency_group().committed
    pid = u.info()["pid"]
    os.kill(pid, signal.SIGSTOP)
    try:
        # a stop takes each thread in turn: until all have stopped, one may
        # still answer (the stream's threads did once, in CI)
        deadline = time.monotonic() + 10
        while not _all_threads_stopped(pid):
            assert time.monotonic() < deadline, "SIGSTOP did not stop the unit"
            time.sleep(0.01)
        t = time.monotonic()
        with pytest.raises(fastfc.FastFCError):
            c.read(0, 10)
        a.write(0, b"x" * 10)
        res = gm.form_consistency_group()          # never raises, never hangs
        assert not res.committed and res.cause is not None
        assert time.monotonic() - t < 15
    finally:
        os.kill(pid, signal.SIGCONT)
    # Ray may reap the worker that stopped answering, even after it answered
    # again once: then (its process gone) start the unit again
    deadline = time.monotonic() + 30
    while not (res := gm.form_consistency_group()).committed:
        assert time.monotonic() < deadline, res
        try:
            os.kill(pid, 0)
        except OSError:
            if not u.up:
                u = start(remote, tmp_path, 0)
        time.sleep(0.5)
    assert bytes(c.read(0, 10)) == b"x" * 10
    assert gm.c_sequences == [res.sequence]
    gm.close()
    u.kill()


# -- units that live on their own ------------------------------------------------------

def _child(code: str, address: str, **kw):
    """Run ``code`` in a new Python process connected to this test's Ray
    cluster (``ray.init(address=...)``: a second driver, as a primary
    process on another host would be)."""
    import subprocess
    import sys
    head = (f"import ray; ray.init(address={address!r}, namespace='fastfc', "
            "log_to_driver=False)\n")
    return subprocess.Popen([sys.executable, "-c", head + code], **kw)


def test_units_outlive_the_process_that_started_them(ray_session, tmp_path):
    """A unit started (detached, the default) by a process that then dies
    (SIGKILL) keeps running: another process finds it by name, reads its
    volumes and stops it; ``stop`` ends its process and frees its name.
    One started with ``detached=False`` dies with its process (the old
    behaviour, so the check can fail)."""
    import signal
    import subprocess
    ray = _ray()
    remote = ray_session
    address = ray.get_runtime_context().gcs_address
    names = [f"{tmp_path.name}-free", f"{tmp_path.name}-owned"]
    code = f"""
import sys, time
import numpy as np
from fastfc import remote
for name, path, detached in [({names[0]!r}, {str(tmp_path / 'u0')!r}, True),
                             ({names[1]!r}, {str(tmp_path / 'u1')!r}, False)]:
    u = remote.SecondaryUnit.start(path, name=name, detached=detached)
    u.create_volume("v", 8, {TS})
    u.site.apply([("v", np.array([0]), np.full((1, {TS}), 7, np.uint8))]).result()
print("ready", flush=True)
time.sleep(600)
"""
    p = _child(code, address, stdout=subprocess.PIPE, text=True)
    try:
        assert p.stdout.readline().strip() == "ready"
        u = remote.SecondaryUnit.attach(names[0])
        pid = u.info()["pid"]
        owned_pid = remote.SecondaryUnit.attach(names[1]).info()["pid"]
        os.kill(p.pid, signal.SIGKILL)
        p.wait(timeout=30)
        end = time.monotonic() + 30         # the owned unit goes with its owner
        while time.monotonic() < end:
            try:
                os.kill(owned_pid, 0)
            except OSError:
                break
            time.sleep(0.1)
        else:
            raise AssertionError("the unit owned by the dead process still runs")
        with pytest.raises(remote.UnitDownError):
            remote.SecondaryUnit.attach(names[1])
        # the detached one serves on, in the same process
        u = remote.SecondaryUnit.attach(names[0])
        assert u.info()["pid"] == pid
        assert bytes(u.volume("v").read(0, 4)) == b"\x07" * 4
        assert remote.stop_units(names[0], names[1]) == [names[0]]
        with pytest.raises(OSError):
            os.kill(pid, 0)
        with pytest.raises(remote.UnitDownError):
            remote.SecondaryUnit.attach(names[0])
        # stopped cleanly: it opens again with nothing to recover, same data
        u = remote.SecondaryUnit.start(tmp_path / "u0", name=names[0])
        assert bytes(u.volume("v").read(0, 4)) == b"\x07" * 4
        u.stop()
    finally:
        if p.poll() is None:
            p.kill()
            p.wait()


PRIMARY = """
import json, os, sys
import numpy as np
import fastfc
from fastfc import remote
from fastfc.tools.testing import RandomWriters
base, pre, n, ts = {base!r}, {pre!r}, {n}, {ts}
units = [remote.SecondaryUnit.start(f"{{base}}/u{{i}}", name=f"{{pre}}-u{{i}}") for i in range(2)]
p = fastfc.StorageUnit(f"{{base}}/primary")
trips = []
for i in range(4):
    u = units[i % 2]
    trips.append((p.create_volume(f"a{{i}}", n, ts), u.create_volume(f"b{{i}}", n, ts),
                  u.create_volume(f"c{{i}}", n, ts)))

def snapshot(seq):
    # host writes to every A are held: the raw arrays are the CG's images
    tmp = f"{{base}}/snap-{{seq}}.tmp"
    with open(tmp, "wb") as f:
        np.save(f, np.stack([a.array for a, _, _ in trips]))
    os.replace(tmp, f"{{base}}/snap-{{seq}}.npy")

gm = fastfc.GlobalMirror(trips, on_coordinate=snapshot)
print(json.dumps([u.info()["pid"] for u in units]), flush=True)
writers = RandomWriters([a for a, _, _ in trips], threads=2, seed=5, pace=2e6).start()
done = 0
while True:
    if gm.form_consistency_group().committed:
        done += 1
        if done == 3:
            print("forming", flush=True)
"""

ATTACH = """
import json
import fastfc
from fastfc import remote
p = fastfc.StorageUnit({base!r} + "/primary")
gm = remote.attach(p, "gm")
marked = sum(t.pair.oos.count() for t in gm.triplets)
res = gm.form_consistency_group()
print(json.dumps({{"committed": res.committed, "sequence": res.sequence, "marked": marked,
                  "bytes": res.bytes_drained, "c": gm.c_sequences}}), flush=True)
p.close()
"""


def test_the_primary_killed_mid_formation_then_recovered_and_attached(ray_session, tmp_path):
    """The done-when test: a primary process (a second Ray driver) forms
    CGs against units it started, with host writes, and is SIGKILLed at a
    random instant; the units stay up (same processes); ``remote.recover``
    runs against them and every B and C holds one whole CG (the A images
    that primary saved at that CG's coordination instant); then a new
    primary process attaches and forms the next CG, sending only the
    grains where A and B differ (no initial copy), after which every C
    equals its A."""
    import json
    import signal
    import subprocess
    ray = _ray()
    remote = ray_session
    address = ray.get_runtime_context().gcs_address
    n = 1024                      # 4 MiB per volume
    pre = tmp_path.name
    names = [f"{pre}-u{i}" for i in range(2)]
    p = _child(PRIMARY.format(base=str(tmp_path), pre=pre, n=n, ts=TS), address,
               stdout=subprocess.PIPE, text=True)
    try:
        pids = json.loads(p.stdout.readline())
        assert p.stdout.readline().strip() == "forming"
        time.sleep(random.Random(7).uniform(0.0, 0.4))
        os.kill(p.pid, signal.SIGKILL)
        p.wait(timeout=30)
        # the units stay up, in the same processes
        units = [remote.SecondaryUnit.attach(name) for name in names]
        assert [u.info()["pid"] for u in units] == pids
        seq = remote.recover(units, "gm")
        assert seq >= 3
        images = np.load(tmp_path / f"snap-{seq}.npy")
        for i in range(4):
            u = units[i % 2]
            for v in (u.volume(f"b{i}"), u.volume(f"c{i}")):
                assert np.array_equal(v.read(0, v.capacity), images[i]), v
        # what the new primary must send: where A (as the killed primary
        # left it) differs from B (restored to the CG)
        with fastfc.StorageUnit(tmp_path / "primary") as prim:
            now = np.stack([prim.volume(f"a{i}").read(0, n * TS) for i in range(4)])
        differ = int((now.reshape(4, n, TS) != images.reshape(4, n, TS)).any(axis=2).sum())
        assert 0 < differ < 4 * n // 4, differ          # a fraction of the grains
        q = _child(ATTACH.format(base=str(tmp_path)), address, stdout=subprocess.PIPE,
                   text=True)
        out = json.loads(q.stdout.readline())
        assert q.wait(timeout=120) == 0
        # (past every sequence a unit settled or recorded: the killed
        # primary's CG in flight, reverted by the recovery, may hold seq + 1)
        assert out["committed"] and out["sequence"] > seq, out
        assert out["c"] == [out["sequence"]] * 4
        assert out["marked"] == differ
        assert out["bytes"] == differ * TS             # no initial copy
        for i in range(4):
            c = units[i % 2].volume(f"c{i}")
            assert np.array_equal(c.read(0, c.capacity), now[i])
    finally:
        if p.poll() is None:
            p.kill()
            p.wait()
        remote.stop_units(*names)


def test_ray_units_at_power(ray_session, tmp_path):
    """Units started at durability "power" in their actors (the ordered
    path runs there: its syncs are counted by the unit's store) keep the
    promise when killed mid-apply and mid-finish and started again at
    "power"; ``info()`` reports the level. (Power cuts themselves are
    simulated over in-process units: tests/test_remote_powercut.py.)"""
    remote = ray_session

    def up(i):
        return remote.SecondaryUnit.start(tmp_path / f"u{i}", name=f"{tmp_path.name}-u{i}",
                                          durability="power")
    with pytest.raises(ValueError, match="durability"):
        remote.SecondaryUnit.start(tmp_path / "x", name=f"{tmp_path.name}-x",
                                   durability="disk")
    units = [up(i) for i in range(2)]
    assert all(u.info()["durability"] == "power" for u in units)
    trips, gm, chk = checked_session(units, 4)
    for k, (unit, where, i) in enumerate([(None, None, 0), (0, "apply", 1), (1, "finish", 0)]):
        for a, _, _ in trips:
            a.write(k * TS, b"x" * 100)
            a.write(N // 2 * TS, bytes([k]) * 50)
        if unit is not None:
            units[unit].arm_kill(where, i)
        gm.form_consistency_group()
        if unit is not None:
            units[unit] = up(unit)
            gm.clear_fatal()
        res = gm.form_consistency_group()
        assert res.committed, res
        chk.check()
    assert all(u.info()["durability"] == "power" for u in units)
    for u in units:
        u.kill()
