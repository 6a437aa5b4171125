"""Adversarial cases of the batched Global Mirror path and copy
threads: races that the batched kernels must survive.

A drain kernel (``pprc_drain`` / ``pprc_drain_many``) takes B's FlashCopy
relationships (their bitmaps, by address) once, at setup, and then moves
tracks without the GIL, a chunk at a time, re-taking B's lock for each
chunk. Anything that replaces a relationship's bitmaps meanwhile must make
the kernel stop and hand the pair to the per-update path, which reads them
afresh; else the copy-on-write to C and the change recording go to bitmaps
the relationship no longer has (C's point-in-time image changes; the next
resync misses tracks), or to freed memory.
"""

from __future__ import annotations

import numpy as np
import pytest

from fastfc import FlashCopy, Volume, _core, faults

TS = 4096
N = 8


def _vols(name: str, seed: int):
    a, b, c = (Volume(N, TS, name=f"{r}{name}") for r in "ABC")
    rng = np.random.default_rng(seed)
    for v in (a, b):
        v._raw_array()[:] = rng.integers(0, 256, v.capacity, np.uint8)
    return a, b, c


@pytest.mark.parametrize("how", ["resync", "revertible_commit", "revertible_revert"])
def test_drain_stops_when_a_relationship_of_b_changes_its_bitmaps(how):
    """Pair 0's drain runs while another thread re-establishes B1 -> C1 (here:
    the copy-on-write hook of pair 0 does it, deterministically, while pair
    1's job is already set up); pair 1's drain must then copy-on-write B1's
    tracks to C1 as of that resync: C1 keeps B1's image of that instant."""
    a0, b0, c0 = _vols("0", 1)
    a1, b1, c1 = _vols("1", 2)
    vols = (a0, b0, c0, a1, b1, c1)
    fc0 = FlashCopy(b0, c0, background_copy=False, record=True)
    fc1 = FlashCopy(b1, c1, background_copy=False, record=True)
    fc1.copy()                               # C1 holds B1; nothing left to copy
    b1.write(0, np.full(N * TS, 7, np.uint8))     # every track of B1 changed since
    before = c1.read(0, c1.capacity)         # C1's image (a revert goes back to it)
    owed = [_core.TrackBitmap(N, fill=True), _core.TrackBitmap(N, fill=True)]
    image: list[np.ndarray] = []
    keep: list = []

    def hook(volume):
        if volume is b0 and not image:
            keep.extend([fc1.to_copy, fc1.src_changed, fc1.tgt_changed])  # (no use-after-free)
            if how == "resync":
                fc1.resync()
            else:
                fc1.resync(revertible=True)
                fc1.commit() if how == "revertible_commit" else fc1.revert()
            image.append(b1.read(0, b1.capacity))

    _core.set_cow_hook(hook)
    try:
        k, status = _core.pprc_drain_many([a0, a1], [b0, b1], owed, 1 << 20)
    finally:
        _core.set_cow_hook(None)
    try:
        assert image, "the hook did not run"
        if status == 2:                       # the per-update path takes pair 1
            assert k == 1
            _core.pprc_copy_tracks(a1, b1, owed[1], 0, N)
        assert not owed[1].any()
        assert np.array_equal(b1.read(0, b1.capacity), a1.read(0, a1.capacity))
        want = before if how == "revertible_revert" else image[0]
        assert np.array_equal(c1.read(0, c1.capacity), want), \
            "C1 lost its point-in-time image: the drain used bitmaps B1 -> C1 no longer has"
        assert fc1.src_changed.all(), "the drain's writes to B1 were not recorded"
    finally:
        fc0.withdraw(force=True)
        fc1.withdraw(force=True)
        for v in vols:
            v.close()


# ---------------------------------------------------------------------------
# Stress: host writers while batched CGs form, the promise checked after each
# ---------------------------------------------------------------------------

import threading  # noqa: E402
import time  # noqa: E402

import fastfc  # noqa: E402
from fastfc.copyservices.globalmirror import GlobalMirror  # noqa: E402
from fastfc.tools.testing import PromiseChecker, RandomWriters  # noqa: E402
from helpers import KernelCalls  # noqa: E402


def _session(n_trip: int, n_tracks: int, track_size: int, **options):
    A, B, C = ([fastfc.Volume(n_tracks, track_size, name=f"{r}{i}") for i in range(n_trip)]
               for r in "ABC")
    checker = PromiseChecker()
    gm = GlobalMirror(list(zip(A, B, C)), on_coordinate=checker.on_coordinate, **options)
    checker.attach(gm)
    return gm, checker


def _cg_loop(gm, checker, writers, cgs: int) -> int:
    committed = 0
    with writers:
        for _ in range(cgs):
            r = gm.form_consistency_group()
            committed += r.committed
            checker.check()
            assert gm.state.value != "fatal"
    checker.check()
    return committed


@pytest.mark.slow
def test_promise_under_writers_on_the_batched_path(monkeypatch):
    """Two writer threads (unaligned writes of 1 byte .. 2 tracks: copy-on-
    write, change recording, out-of-sync bits and collisions into the side
    file) while 150 CGs form with no fault armed; every C on the newest
    committed CG after each."""
    drains = KernelCalls(monkeypatch, "pprc_drain_many")
    prepares = KernelCalls(monkeypatch, "prepare_revertible_many")
    ends = KernelCalls(monkeypatch, "end_revertible_many")
    gm, checker = _session(6, 16, 4096, max_coordination_time=0.2)
    try:
        w = RandomWriters([t.a for t in gm.triplets], threads=2, seed=13)
        committed = _cg_loop(gm, checker, w, 400)
        assert committed >= 300, committed
        assert w.writes > 1000
        assert drains.calls >= committed and prepares.calls >= committed
        assert ends.calls >= committed
        assert sum(t.pair.bytes_sent for t in gm.triplets) > 0
    finally:
        gm.close(discard=True)


@pytest.mark.slow
def test_promise_under_writers_with_two_copy_threads(monkeypatch):
    """As above with ``set_copy_threads(2)`` and 256 KiB tracks, writes of up
    to 2 tracks: the drain's runs of 1 MiB and more are split across the
    copy threads while the writers wait on A's lock; no torn track in B or C."""
    drains = KernelCalls(monkeypatch, "pprc_drain_many")
    old = fastfc.copy_threads()
    fastfc.set_copy_threads(2)
    gm, checker = _session(3, 16, 256 * 1024, max_coordination_time=0.2)
    try:
        assert gm.form_consistency_group().committed    # (the initial copy's splits)
        checker.check()
        split = _core.pool_copies()
        w = RandomWriters([t.a for t in gm.triplets], threads=2, seed=5)
        committed = _cg_loop(gm, checker, w, 40)
        assert committed >= 25 and drains.calls >= committed
        assert _core.pool_copies() > split, "no drain run was split across the copy threads"
    finally:
        fastfc.set_copy_threads(old)
        gm.close(discard=True)


@pytest.mark.slow
def test_snapshots_of_b_taken_while_batched_cgs_drain():
    """A user keeps a second FlashCopy of each B (B -> D, nocopy, record) and
    resyncs it in a loop while writers run and the session forms CGs: each
    D must keep B's image of its resync instant (the drain's copy-on-write
    follows the bitmaps the resync gave the relationship), and the C
    volumes the promise."""
    gm, checker = _session(4, 16, 4096, max_coordination_time=0.2)
    ds = [fastfc.Volume(16, 4096, name=f"D{i}") for i in range(4)]
    fcs = [FlashCopy(t.b, d, background_copy=False, record=True)
           for t, d in zip(gm.triplets, ds)]
    stop = threading.Event()
    errors: list[BaseException] = []
    resyncs = [0]

    def snapshotter():
        from fastfc.storage.volume import locked
        rng = np.random.default_rng(3)
        try:
            while not stop.is_set():
                i = int(rng.integers(len(fcs)))
                b, d = fcs[i].source, ds[i]
                with locked((b, d)):
                    fcs[i].resync()
                    image = b.read(0, b.capacity)
                resyncs[0] += 1
                time.sleep(0.0005)
                got = d.read(0, d.capacity)
                if not np.array_equal(got, image):
                    bad = sorted(set((np.flatnonzero(got != image) // 4096).tolist()))
                    raise AssertionError(f"D{i} lost its image on tracks {bad}")
        except BaseException as e:
            errors.append(e)

    s = threading.Thread(target=snapshotter, daemon=True)
    try:
        with RandomWriters([t.a for t in gm.triplets], threads=2, seed=11):
            s.start()
            t0 = time.perf_counter()
            n = 0
            while time.perf_counter() - t0 < 2.0 and not errors:
                gm.form_consistency_group()
                checker.check()
                n += 1
            stop.set()
            s.join()
        if errors:
            raise errors[0]
        assert n >= 20 and resyncs[0] >= 20, (n, resyncs[0])
    finally:
        stop.set()
        for fc in fcs:
            fc.withdraw(force=True)
        gm.close(discard=True)
        for d in ds:
            d.close()


# ---------------------------------------------------------------------------
# Faults during a batched step: the same outcome as each pair's and
# relationship's own method in turn (helpers.one_at_a_time)
# ---------------------------------------------------------------------------

from helpers import one_at_a_time  # noqa: E402

def _pair_of_sessions(n_trip: int = 4, n_tracks: int = 8):
    out = []
    for batched in (True, False):
        trips = []
        for i in range(n_trip):
            a, b, c = (Volume(n_tracks, 512, name=f"{r}{i}") for r in "ABC")
            a._raw_array()[:] = np.random.default_rng(i).integers(0, 256, a.capacity, np.uint8)
            trips.append((a, b, c))
        gm = GlobalMirror(trips, max_coordination_time=1.0)
        assert gm.form_consistency_group().committed
        if not batched:
            one_at_a_time(gm)      # each pair's and relationship's own method in turn
        out.append((gm, trips))
    return out


def _state(gm) -> list:
    out = []
    for t in gm.triplets:
        fc, p = t.fc, t.pair
        out.append(([x.set_indices().tolist() for x in (fc.to_copy, fc.src_changed,
                                                         fc.tgt_changed, p.oos)],
                     fc.sequence, fc.revertible, t.b._inhibits, p.cg is None, dict(p.side),
                     p.suspend_reason, t.b.array.tobytes(), t.c.read(0, t.c.capacity).tobytes()))
    return out


def _close(pair) -> None:
    for gm, trips in pair:
        gm.link.restore()
        gm.close(discard=True)
        for t in trips:
            for v in t:
                v.close()


def test_link_down_during_a_batched_drain_as_the_per_pair_path():
    """The link goes down while the drain moves pair 1's tracks (another
    thread's ``link.fail()``; here the copy-on-write hook of B1 does it): the
    per-relationship path sends no pair after that one and the CG fails with
    LINK_DOWN; the batched drain must do the same, not deliver the rest."""
    pair = _pair_of_sessions()
    try:
        results = []
        for gm, trips in pair:
            for a, _, _ in trips:
                a.write(100, np.full(700, 9, np.uint8))
            b1 = trips[1][1]

            def hook(volume, gm=gm, b1=b1):
                if volume is b1:
                    gm.link.fail()

            _core.set_cow_hook(hook)
            try:
                results.append(gm.form_consistency_group())
            finally:
                _core.set_cow_hook(None)
        for r in results:
            assert not r.committed and r.cause.value == "link_down", (r.cause, r.detail)
        assert _state(pair[0][0]) == _state(pair[1][0])
        for gm, _ in pair:          # back up: the next CG carries everything
            gm.link.restore()
            for t in gm.triplets:
                t.pair.suspend_reason = None
        for gm, _ in pair:
            assert gm.form_consistency_group().committed
        assert _state(pair[0][0]) == _state(pair[1][0])
    finally:
        _close(pair)


def _state_open(gm) -> list:
    out = []
    for t in gm.triplets:
        fc, p = t.fc, t.pair
        bms = [fc.to_copy, fc.src_changed, fc.tgt_changed, p.oos]
        if fc._revert_image is not None:
            bms += list(fc._revert_image[:3])
        out.append(([None if x is None else x.set_indices().tolist() for x in bms],
                     fc.sequence, fc.revertible, fc.active, t.b._inhibits, p.cg is None,
                     dict(p.side), p.suspend_reason, p.bytes_sent,
                     *[None if v.closed else v.array.tobytes() for v in (t.a, t.b)],
                     None if t.c.closed or t.b.closed or not fc.active
                     else t.c.read(0, t.c.capacity).tobytes()))
    return out


def _act(what: str, gm, trips) -> None:
    b1, c1 = trips[1][1], trips[1][2]
    if what == "close_c":
        c1.close()
    elif what == "close_b":
        b1.close()
    elif what == "close_a2":
        trips[2][0].close()
    elif what == "withdraw":
        gm.triplets[1].fc.withdraw(force=True)
    elif what == "arm_prepare":
        faults.inject("prepare", trips[2][1])
    elif what == "arm_commit":
        faults.inject("commit", trips[3][1])
    elif what == "arm_drain":
        faults.inject("drain", trips[2][0])
    elif what == "arm_link":
        faults.inject("link", after=1)
    elif what == "revertible_by_hand":
        gm.triplets[2].fc._resync(revertible=True, sequence=10 ** 6)  # a session step


def _attempt(gm) -> tuple:
    try:
        r = gm.form_consistency_group()
    except Exception as e:          # (a closed volume: refused before anything)
        return (type(e).__name__, str(e))
    return (r.committed, r.cause, r.detail, r.bytes_drained)


# ("drain" and "link" armed mid-drain too: the kernel calls the fault points
# of the pairs after it, as each pair's own drain does)
@pytest.mark.parametrize("what", ["close_c", "close_b", "close_a2", "withdraw", "arm_prepare",
                                  "arm_commit", "arm_drain", "arm_link",
                                  "revertible_by_hand"])
def test_state_changes_during_a_batched_drain_as_the_per_pair_path(what):
    """Mid-drain (while pair 0 moves its tracks; the copy-on-write hook of B0
    stands in for another thread) a volume is closed, a relationship
    withdrawn or made revertible by hand, or a fault armed: the batched CG
    ends as the per-relationship one does (result, every bitmap, sequence,
    write-inhibit, side file, suspension and every open volume's bytes), and
    the next CG too."""
    pair = _pair_of_sessions()
    try:
        results = []
        for gm, trips in pair:
            for a, _, _ in trips:
                a.write(100, np.full(700, 9, np.uint8))
            b0 = trips[0][1]
            done = []

            def hook(volume, gm=gm, trips=trips, b0=b0, done=done):
                if volume is b0 and not done:
                    done.append(1)
                    _act(what, gm, trips)

            _core.set_cow_hook(hook)
            try:
                results.append(gm.form_consistency_group())
            finally:
                _core.set_cow_hook(None)
                faults.clear()
            assert done
        r0, r1 = results
        assert (r0.committed, r0.cause, r0.detail, r0.bytes_drained) == \
            (r1.committed, r1.cause, r1.detail, r1.bytes_drained)
        assert _state_open(pair[0][0]) == _state_open(pair[1][0])
        again = [_attempt(gm) for gm, _ in pair]
        assert again[0] == again[1]
        assert _state_open(pair[0][0]) == _state_open(pair[1][0])
    finally:
        faults.clear()
        for gm, trips in pair:
            gm.link.restore()
            fc = gm.triplets[2].fc
            if fc.active and fc.revertible:
                fc._end_revertible("revert")
            try:
                gm.close(discard=True)
            except Exception:
                pass
            for t in trips:
                for v in t:
                    v.close()


# ---------------------------------------------------------------------------
# Copy threads: fork and interpreter exit with the pool's threads alive
# ---------------------------------------------------------------------------

import os  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402


def test_fork_while_the_copy_pool_is_busy():
    """A thread keeps splitting copies across the pool while the main thread
    forks: each child (without the parent's workers, its pool possibly
    forked mid-copy) must split a copy of its own with fresh workers, right,
    and exit; none may hang."""
    old = fastfc.copy_threads()
    fastfc.set_copy_threads(2)
    src = np.random.default_rng(1).integers(0, 256, 4 << 20, np.uint8)
    stop = threading.Event()

    def busy():
        dst = np.zeros_like(src)
        while not stop.is_set():
            _core._pool_copy(dst, src)

    t = threading.Thread(target=busy, daemon=True)
    t.start()
    try:
        for _ in range(10):
            pid = os.fork()
            if pid == 0:       # the child: no pytest, no exceptions out of here
                code = 1
                try:
                    dst = np.zeros_like(src)
                    k = _core._pool_copy(dst, src)
                    code = 0 if (k == 2 and np.array_equal(dst, src)) else 3
                finally:
                    os._exit(code)
            deadline = time.monotonic() + 20
            while True:
                done, status = os.waitpid(pid, os.WNOHANG)
                if done:
                    break
                if time.monotonic() > deadline:
                    os.kill(pid, 9)
                    os.waitpid(pid, 0)
                    pytest.fail("a child forked while the pool was busy hung")
                time.sleep(0.005)
            assert os.WIFEXITED(status) and os.WEXITSTATUS(status) == 0, status
    finally:
        stop.set()
        t.join()
        fastfc.set_copy_threads(old)


def test_interpreter_exit_with_copy_threads_busy():
    """Daemon threads copy through the pool (a background copy of a large
    FlashCopy, split copies) when the interpreter exits: it exits 0, no
    hang, no crash."""
    code = """
import threading, numpy as np, fastfc
from fastfc import _core
fastfc.set_copy_threads(2)
src = np.ones(8 << 20, np.uint8)
def busy():
    dst = np.zeros_like(src)
    while True:
        _core._pool_copy(dst, src)
for _ in range(2):
    threading.Thread(target=busy, daemon=True).start()
s = fastfc.Volume(64, 1 << 20, name="S"); t = fastfc.Volume(64, 1 << 20, name="T")
fc = fastfc.FlashCopy(s, t)          # background copy on a daemon thread
import time
end = time.monotonic() + 20       # until the pool is copying (a loaded machine may take a while)
while _core.pool_copies() == 0 and time.monotonic() < end:
    time.sleep(0.01)
print("ok", _core.pool_copies() > 0)
"""
    env = dict(os.environ, PYTHONPATH=os.path.dirname(os.path.dirname(fastfc.__file__)))
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                       timeout=60, env=env)
    assert r.returncode == 0, (r.returncode, r.stderr[-2000:])
    assert r.stdout.strip() == "ok True"


# ---------------------------------------------------------------------------
# Lock order: a pair's lifecycle steps against a running drain
# ---------------------------------------------------------------------------

_LOCK_ORDER = """
import sys, threading, time
import fastfc
from fastfc import _core
B = fastfc.Volume(64, 4096, name="B")      # made first: B's volume id is below A's
A = fastfc.Volume(64, 4096, name="A")
stop = False
n = [0, 0]
def drainer():                  # a CG drain A -> B, one track per lock hold
    bm = _core.TrackBitmap(64)
    while not stop:
        bm.fill(True)
        _core.pprc_drain(A, B, bm, 1)
        n[0] += 1
def lifecycle():                # establish and remove the pair A -> B
    while not stop:
        p = fastfc.PPRCPair(A, B, initial_copy=False, background=False)
        p.suspend()
        p.remove()
        n[1] += 1
ts = [threading.Thread(target=f, daemon=True) for f in (drainer, lifecycle)]
for t in ts:
    t.start()
time.sleep(1.0)
stop = True
for t in ts:
    t.join(10)
    if t.is_alive():
        print("deadlock", n)
        sys.exit(2)
print("ok", n[0] > 10 and n[1] > 10)
"""


@pytest.mark.slow
def test_pair_steps_take_the_primary_lock_first():
    """A drain takes A's lock, then B's (as every PPRC update does); a pair's
    establish / failover / failback / remove took both in volume-id order,
    so with B's id below A's the two deadlocked (within 1 s here)."""
    env = dict(os.environ, PYTHONPATH=os.path.dirname(os.path.dirname(fastfc.__file__)))
    r = subprocess.run([sys.executable, "-c", _LOCK_ORDER], capture_output=True, text=True,
                       timeout=120, env=env)
    assert r.returncode == 0, (r.returncode, r.stdout, r.stderr[-2000:])
    assert r.stdout.strip() == "ok True"


# ---------------------------------------------------------------------------
# Copy threads under host writes: no torn track
# ---------------------------------------------------------------------------

MIB = 1 << 20


def _uniform_writers(vol, stop: threading.Event, errors: list, seed: int) -> threading.Thread:
    """Whole-track writes of one byte value each: a torn track (two values)
    can only come from a copy racing a write."""
    def run():
        rng = np.random.default_rng(seed)
        bufs = [np.full(vol.track_size, v, np.uint8) for v in range(200, 256)]
        try:
            while not stop.is_set():
                t = int(rng.integers(vol.n_tracks))
                vol.write(t * vol.track_size, bufs[int(rng.integers(len(bufs)))])
        except BaseException as e:
            errors.append(e)
    th = threading.Thread(target=run, daemon=True)
    th.start()
    return th


def _torn(vol) -> list[int]:
    img = vol.read(0, vol.capacity).reshape(vol.n_tracks, vol.track_size)
    return [t for t in range(vol.n_tracks) if (img[t] != img[t, 0]).any()]


@pytest.mark.slow
def test_split_background_copy_and_reverse_restore_under_writers():
    """Two copy threads, 1 MiB tracks (every background-copy chunk and
    restore run is split): writers rewrite whole tracks of S while T's
    background copy and then a reverse restore run; T keeps S's image of the
    establish, no track of S or T is torn, the split path ran."""
    old = fastfc.copy_threads()
    fastfc.set_copy_threads(2)
    S, T = Volume(24, MIB, name="S"), Volume(24, MIB, name="T")
    try:
        for t in range(S.n_tracks):
            S._raw_array()[t * MIB:(t + 1) * MIB] = t
        split = _core.pool_copies()
        for rnd in range(3):
            stop, errors = threading.Event(), []
            ths = [_uniform_writers(S, stop, errors, rnd * 10 + i) for i in range(2)]
            time.sleep(0.01)
            with fastfc.storage.volume.locked((S, T)):
                fc = FlashCopy(S, T, record=True, persistent=True)
                image = S.read(0, S.capacity)
            assert fc.wait(30)
            fc.reverse_restore()      # S takes T's image back, tracks the writers changed
            time.sleep(0.01)
            stop.set()
            for th in ths:
                th.join()
            if errors:
                raise errors[0]
            assert np.array_equal(T.read(0, T.capacity), image)
            assert _torn(S) == [] and _torn(T) == []
            fc.withdraw()
        assert _core.pool_copies() > split
    finally:
        fastfc.set_copy_threads(old)
        S.close()
        T.close()


def test_concurrent_split_copies_share_the_pool():
    """Three threads split copies at once: one gets the pool, the others
    copy on their own threads (no waiting on another copy); all right."""
    old = fastfc.copy_threads()
    fastfc.set_copy_threads(2)
    errors: list = []
    ks: set = set()

    def run(seed):
        rng = np.random.default_rng(seed)
        try:
            for _ in range(30):
                src = rng.integers(0, 256, int(rng.integers(1 * MIB, 3 * MIB)), np.uint8)
                dst = np.zeros(3 * MIB, np.uint8)
                ks.add(_core._pool_copy(dst, src))
                assert np.array_equal(dst[:src.size], src) and not dst[src.size:].any()
        except BaseException as e:
            errors.append(e)

    ths = [threading.Thread(target=run, args=(i,), daemon=True) for i in range(3)]
    try:
        for th in ths:
            th.start()
        for th in ths:
            th.join(60)
            assert not th.is_alive(), "a copy waited on the pool forever"
        if errors:
            raise errors[0]
        assert 2 in ks
    finally:
        fastfc.set_copy_threads(old)


@pytest.mark.slow
@pytest.mark.parametrize("which", ["a", "b", "c"])
def test_volume_closed_while_the_session_loop_drains(which):
    """The session's own loop forms CGs (batched) under writers with large
    tracks (long drain runs) while another thread closes one volume of
    triplet 2: no crash (its memory is freed), no hang; the attempts after
    it fail cleanly and every other C stays on the newest committed CG."""
    gm, checker = _session(4, 16, 128 * 1024, max_coordination_time=0.2)
    snap = checker.on_coordinate

    def on_coordinate(sequence):        # keep the committed CG's images and newer
        snap(sequence)
        for old in [k for k in checker.snapshots if k < gm.stats.sequence]:
            del checker.snapshots[old]

    gm.on_coordinate = on_coordinate
    vol = getattr(gm.triplets[2], which)
    others = [t for i, t in enumerate(gm.triplets) if i != 2]
    try:
        with RandomWriters([t.a for t in others], threads=2, seed=9, io_size=256 * 1024):
            gm.start()
            # a committed CG first (what the other Cs must stay on), then
            # the close lands among the CGs that follow
            deadline = time.monotonic() + 60
            while gm.stats.successes < 1 and time.monotonic() < deadline:
                time.sleep(0.01)
            time.sleep(0.1)
            vol.close()
            time.sleep(0.2)
            gm.stop()
        with pytest.raises(fastfc.VolumeClosedError):
            gm.form_consistency_group()
        seq = gm.stats.sequence
        assert gm.stats.successes > 0 and seq > 0
        images = checker.snapshots[seq]
        for i, t in enumerate(gm.triplets):
            if i == 2:
                continue
            assert t.fc.sequence == seq
            assert np.array_equal(t.c.read(0, t.c.capacity), images[i]), t.c.name
    finally:
        gm.stop()
        trips = list(gm.triplets)
        try:
            gm.close(discard=True)
        except fastfc.VolumeClosedError:
            pass                            # (refused: one of its volumes is closed)
        for t in trips:
            for v in (t.a, t.b, t.c):
                v.close()
