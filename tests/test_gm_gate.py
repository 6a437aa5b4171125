"""A session in memory holds host writes with one gate, not every primary's lock.

The primaries of a Global Mirror session in memory pass the session's
:class:`~fastfc._core.WriteGate`; coordination closes it, waits for the
writes in flight, and looks at (and locks) only the pairs marked on it
since the last coordination. Here:

* an idle CG's coordination takes no primary's lock; a CG after writes to
  ``k`` triplets takes ``k`` (``_core.coordination_locks``);
* concurrent writers over many primaries never straddle a CG instant: the A
  images recorded at each instant hold, per writer, a prefix of its writes
  (dependent writes), each write whole, and every C holds the A images of
  its CG's instant;
* the timeouts are those of the per-lock hold: a primary's lock held by
  another thread fails the attempt with the same cause and message, as does
  a hold longer than the bound, in a gated session and in one that takes
  every lock; a writer held at the gate waits, then lands after the instant;
  ``_lock(timeout)`` during the hold times out as on a held lock; a thread
  that holds a primary's lock passes the gate (no false timeout).
"""

from __future__ import annotations

import threading
import time

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from fastfc import GlobalMirror, Volume, _core, faults
from fastfc.copyservices.globalmirror import Cause

TS = 512
N_TRACKS = 8


def _trips(n: int) -> list:
    out = []
    for i in range(n):
        a, b, c = (Volume(N_TRACKS, TS, name=f"{r}{i}") for r in "ABC")
        out.append((a, b, c))
    return out


def _linear(gm: GlobalMirror) -> None:
    """Step every pair and take every primary's lock (the per-lock path)."""
    gm._sparse = False
    for g in gm.groups:
        g.flash.sparse = False
        for t in g.triplets:
            t.pair.on_sent = None


def _close(gm: GlobalMirror, trips: list) -> None:
    gm.close(discard=True)
    for t in trips:
        for v in t:
            v.close()


def test_an_idle_cg_takes_no_primary_lock():
    trips = _trips(64)
    gm = GlobalMirror(trips, initial_copy=False)
    try:
        assert gm._gate is not None
        assert gm.form_consistency_group().committed     # the first looks at every pair
        assert gm.form_consistency_group().committed     # (those its CG ended, once more)
        for _ in range(3):
            before = _core.coordination_locks()
            assert gm.form_consistency_group().committed
            assert _core.coordination_locks() - before == 0
            assert gm._gate.n_dirty == 0
        for written in ([5], [0, 63, 17]):
            for i in written:
                trips[i][0].write(100, np.full(10, 3, np.uint8))
            assert gm._gate.marked_slots() == sorted(
                gm._primaries.index(trips[i][0]) for i in written)
            before = _core.coordination_locks()
            res = gm.form_consistency_group()
            assert res.committed and res.bytes_drained == TS * len(written)
            assert _core.coordination_locks() - before == len(written)
            # the CG's end took those primaries' locks: looked at once more
            before = _core.coordination_locks()
            assert gm.form_consistency_group().committed
            assert _core.coordination_locks() - before <= len(written)
            before = _core.coordination_locks()
            assert gm.form_consistency_group().committed
            assert _core.coordination_locks() - before == 0
        assert gm.c_sequences == [gm.stats.sequence] * 64
    finally:
        _close(gm, trips)


def test_a_session_that_takes_every_lock_counts_them_all():
    trips = _trips(8)
    gm = GlobalMirror(trips, initial_copy=False)
    _linear(gm)
    try:
        before = _core.coordination_locks()
        assert gm.form_consistency_group().committed
        assert _core.coordination_locks() - before == 8
    finally:
        _close(gm, trips)


def _writer(vols: list, w: int, seed: int, stop: threading.Event, log: list) -> None:
    """Writer ``w``: one after the other, each once the last completed, a
    write of tag ``t`` (1, 2, ...) to a random primary, in its own region
    (bytes [w*REG, (w+1)*REG) of every volume, which spans grains)."""
    rng = np.random.default_rng(seed)
    t = 0
    while not stop.is_set():
        t += 1
        i = int(rng.integers(len(vols)))
        vols[i].write(w * REG, np.full(REG, t % 250 + 1, np.uint8))
        log.append((i, t))
        if t % 16 == 0:
            time.sleep(0)


REG = 700      # (crosses a 512-byte grain boundary in most regions)


def _check_prefix(images: list, log: list, w: int) -> None:
    """The images hold a prefix of writer ``w``'s writes (``log``: each
    completed write's volume and tag, in order), each write whole."""
    seen = []
    for img in images:
        region = img[w * REG:(w + 1) * REG]
        assert (region == region[0]).all(), "a write straddles the instant"
        seen.append(int(region[0]))
    # some prefix of the log leaves exactly these images: walk the log,
    # counting the volumes that differ from the prefix's last writes
    bad = sum(1 for x in seen if x != 0)
    if bad == 0:
        return
    expect = [0] * len(images)
    for i, t in log:
        was = expect[i] != seen[i]
        expect[i] = t % 250 + 1
        bad += (expect[i] != seen[i]) - was
        if bad == 0:
            return
    raise AssertionError("the images hold no prefix of a writer's writes")


@settings(max_examples=6, deadline=None)
@given(seed=st.integers(0, 2 ** 16), n_trip=st.sampled_from([5, 24, 64]),
       writers=st.integers(2, 4), gated=st.booleans())
def test_concurrent_writers_never_straddle_a_cg_instant(seed, n_trip, writers, gated):
    trips = _trips(n_trip)
    snaps: dict[int, list] = {}
    logs: list[list] = [[] for _ in range(writers)]

    def on_coordinate(seq: int) -> None:
        snaps[seq] = [a.read(0, a.capacity) for a, _, _ in trips]
        time.sleep(0.002)       # (a longer hold: more writers meet it)

    gm = GlobalMirror(trips, initial_copy=False, on_coordinate=on_coordinate,
                      max_coordination_time=2.0)
    if not gated:
        _linear(gm)
    stop = threading.Event()
    vols = [a for a, _, _ in trips]
    threads = [threading.Thread(target=_writer, args=(vols, w, seed + w, stop, logs[w]))
               for w in range(writers)]
    for th in threads:
        th.start()
    try:
        committed = 0
        for _ in range(12):
            res = gm.form_consistency_group()
            assert res.committed, res
            committed += 1
            seq = res.sequence
            for w in range(writers):
                _check_prefix(snaps[seq], list(logs[w]), w)
            for (_, _, c), img in zip(trips, snaps[seq]):
                assert np.array_equal(c.read(0, c.capacity), img)
            time.sleep(0.002)
        assert committed == 12 and sum(len(lg) for lg in logs) > 0
    finally:
        stop.set()
        for th in threads:
            th.join()
        _close(gm, trips)


@pytest.mark.parametrize("gated", [True, False])
def test_a_held_primary_lock_fails_coordination_as_before(gated):
    trips = _trips(6)
    gm = GlobalMirror(trips, initial_copy=False, max_coordination_time=0.05)
    if not gated:
        _linear(gm)
    took, done = threading.Event(), threading.Event()

    def holder() -> None:
        trips[3][0]._lock()
        took.set()
        done.wait()
        trips[3][0]._unlock()

    assert gm.form_consistency_group().committed
    th = threading.Thread(target=holder)
    th.start()
    try:
        took.wait()
        res = gm.form_consistency_group()
        assert not res.committed and res.cause is Cause.COORDINATION_TIMEOUT
        assert res.detail == "could not hold writes on every primary within 50.0 ms"
        # nothing held: another primary takes writes at once
        trips[0][0].write(0, np.full(10, 1, np.uint8))
        if gated:
            assert not gm._gate.closed and gm._gate.inflight == 1
        done.set()
        th.join()
        res = gm.form_consistency_group()
        assert res.committed and gm.c_sequences == [res.sequence] * 6
        assert np.array_equal(trips[0][2].read(0, 10), np.full(10, 1, np.uint8))
    finally:
        done.set()
        th.join()
        _close(gm, trips)


@pytest.mark.parametrize("gated", [True, False])
def test_a_hold_past_the_bound_fails_as_before(gated):
    trips = _trips(4)
    gm = GlobalMirror(trips, initial_copy=False, max_coordination_time=0.02)
    if not gated:
        _linear(gm)
    try:
        assert gm.form_consistency_group().committed
        trips[1][0].write(0, np.full(10, 4, np.uint8))
        faults.inject("coordinate", action=lambda: time.sleep(0.05))
        res = gm.form_consistency_group()
        assert not res.committed and res.cause is Cause.COORDINATION_TIMEOUT
        assert res.detail.startswith("held writes ") and res.detail.endswith("> 20.0 ms")
        assert gm.triplets[1].pair.cg is None and gm.triplets[1].pair.oos.any()
        faults.clear()
        res = gm.form_consistency_group()
        assert res.committed
        assert np.array_equal(trips[1][2].read(0, 10), np.full(10, 4, np.uint8))
    finally:
        faults.clear()
        _close(gm, trips)


@pytest.mark.parametrize("gated", [True, False])
def test_a_writer_held_during_the_hold_lands_after_the_instant(gated):
    trips = _trips(4)
    seen: dict = {}
    writer: list[threading.Thread] = []

    def on_coordinate(seq: int) -> None:
        if seq != 2:
            return
        th = threading.Thread(target=trips[2][0].write, args=(0, np.full(10, 9, np.uint8)))
        th.start()
        th.join(0.1)
        seen["held"] = th.is_alive()
        # the primary is readable here, held or not, and takes no write yet
        seen["a"] = trips[2][0].read(0, 10)
        # a lock with a time limit times out as on a held lock
        got: list = []
        t2 = threading.Thread(target=lambda: got.append(trips[1][0]._lock(0.03)))
        t2.start()
        t2.join()
        seen["lock"] = got
        writer.append(th)

    gm = GlobalMirror(trips, initial_copy=False, on_coordinate=on_coordinate,
                      max_coordination_time=5.0)
    if not gated:
        _linear(gm)
    try:
        assert gm.form_consistency_group().committed
        res = gm.form_consistency_group()
        assert res.committed and res.sequence == 2
        writer[0].join()
        assert seen["held"] is True and seen["lock"] == [False]
        assert np.array_equal(seen["a"], np.zeros(10, np.uint8))
        assert np.array_equal(trips[2][2].read(0, 10), np.zeros(10, np.uint8))
        assert np.array_equal(trips[2][0].read(0, 10), np.full(10, 9, np.uint8))
        assert gm.form_consistency_group().committed
        assert np.array_equal(trips[2][2].read(0, 10), np.full(10, 9, np.uint8))
    finally:
        _close(gm, trips)


def test_a_thread_holding_a_primary_lock_passes_the_closed_gate():
    """A thread holding one primary's lock and taking another's while the
    gate closes is in flight: the gate lets it through, coordination waits
    for it, and the CG forms (as it does with every lock taken)."""
    trips = _trips(4)
    gm = GlobalMirror(trips, initial_copy=False, max_coordination_time=2.0)
    a1, a2 = trips[1][0], trips[2][0]
    took, go = threading.Event(), threading.Event()
    gate = gm._gate

    def nested() -> None:
        a1._lock()
        try:
            took.set()
            end = time.monotonic() + 2
            while not gate.closed and time.monotonic() < end:
                time.sleep(0.001)
            if a2._lock(1.0):
                try:
                    a2.write(0, np.full(5, 6, np.uint8))
                finally:
                    a2._unlock()
                go.set()
        finally:
            a1._unlock()

    try:
        assert gm.form_consistency_group().committed
        th = threading.Thread(target=nested)
        th.start()
        took.wait()
        t = time.perf_counter()
        res = gm.form_consistency_group()
        th.join()
        assert go.is_set() and res.committed and time.perf_counter() - t < 1.5
        assert np.array_equal(trips[2][2].read(0, 5), np.full(5, 6, np.uint8))
    finally:
        _close(gm, trips)


def test_a_closed_session_lets_its_primaries_go():
    trips = _trips(3)
    gm = GlobalMirror(trips, initial_copy=False)
    gate = gm._gate
    assert gate is not None and gate.size == 3
    gm.close(discard=True)
    for a, _, _ in trips:
        a.write(0, np.full(3, 1, np.uint8))
    assert gate.inflight == 0 and not gate.closed
    with pytest.raises(ValueError, match="volume-id order"):
        _core.WriteGate([trips[1][0], trips[0][0]], [0, 1])
    for t in trips:
        for v in t:
            v.close()


@pytest.mark.parametrize("gated", [True, False])
def test_coordinating_with_a_primary_lock_held_is_refused(gated):
    trips = _trips(3)
    gm = GlobalMirror(trips, initial_copy=False, max_coordination_time=0.05)
    if not gated:
        _linear(gm)
    try:
        assert gm.form_consistency_group().committed
        trips[1][0]._lock()
        try:
            with pytest.raises(RuntimeError, match="with a primary's lock held"):
                gm.form_consistency_group()
        finally:
            trips[1][0]._unlock()
        if gated:
            assert not gm._gate.closed and gm._gate.inflight == 0
        assert gm.form_consistency_group().committed
    finally:
        _close(gm, trips)


def test_the_checks_catch_writes_that_pass_no_gate():
    """The checks above are not vacuous: with the primaries let go of the
    gate (coordination closes a gate that holds nothing, and looks at no
    pair), writers land during the hold, and a C or an image breaks."""
    trips = _trips(24)
    snaps: dict[int, list] = {}
    logs: list[list] = [[] for _ in range(3)]

    def on_coordinate(seq: int) -> None:
        snaps[seq] = [a.read(0, a.capacity) for a, _, _ in trips]
        time.sleep(0.003)

    gm = GlobalMirror(trips, initial_copy=False, on_coordinate=on_coordinate,
                      max_coordination_time=2.0)
    assert gm.form_consistency_group().committed
    gm._gate.detach()
    stop = threading.Event()
    vols = [a for a, _, _ in trips]
    threads = [threading.Thread(target=_writer, args=(vols, w, w, stop, logs[w]))
               for w in range(3)]
    for th in threads:
        th.start()
    caught = False
    try:
        for _ in range(60):
            res = gm.form_consistency_group()
            try:
                for w in range(3):
                    _check_prefix(snaps[res.sequence], list(logs[w]), w)
                for (_, _, c), img in zip(trips, snaps[res.sequence]):
                    assert np.array_equal(c.read(0, c.capacity), img)
            except AssertionError:
                caught = True
                break
    finally:
        stop.set()
        for th in threads:
            th.join()
        _close(gm, trips)
    assert caught
