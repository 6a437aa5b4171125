"""Threaded stress: host writers, target readers and background copy workers
all at once.

Each establish (and each resync) happens while writers are running. To know
the image of that instant, the test holds the volumes' locks itself (in
volume-id order, as the engine does), snapshots the raw source, and
establishes inside the hold: the snapshot is then exactly the point in
time. Writers own disjoint stripes of the volumes they write and keep their
own expected bytes, so every read they make, and every final image, can be
checked exactly.
"""

from __future__ import annotations

import random
import threading
import time

import numpy as np
import pytest

from fastfc import FlashCopy, Volume, WriteInhibitedError, establish_group
from fastfc.copyservices.flashcopy import locked

pytestmark = pytest.mark.filterwarnings("error::pytest.PytestUnhandledThreadExceptionWarning")

TS = 16384
N_TRACKS = 64
RUN_SECONDS = 1.5


class Failures:
    """Collects exceptions from worker threads (pytest sees none otherwise)."""

    def __init__(self):
        self.errors: list[BaseException] = []
        self.lock = threading.Lock()

    def run(self, fn, *args):
        def body():
            try:
                fn(*args)
            except BaseException as e:  # noqa: BLE001 - reported by check()
                with self.lock:
                    self.errors.append(e)
        th = threading.Thread(target=body, daemon=True)
        th.start()
        return th

    def check(self):
        if self.errors:
            raise self.errors[0]


def randbytes(rng: random.Random, n: int) -> bytes:
    return rng.randbytes(n)


class StripeWriter:
    """Writes random bytes into its own stripe [lo, hi) of a volume and
    remembers what it wrote; checks its own reads on the way."""

    def __init__(self, vol: Volume, lo: int, hi: int, seed: int, retry_inhibited=False):
        self.vol, self.lo, self.hi = vol, lo, hi
        self.rng = random.Random(seed)
        self.expect = bytearray(vol.array[lo:hi].tobytes())  # before any relationship
        self.retry_inhibited = retry_inhibited
        self.writes = 0
        self.refused = 0

    def one(self):
        rng = self.rng
        n = rng.choice([1, 7, 511, TS - 1, TS, TS + 1, 2 * TS + 3, rng.randint(1, 3 * TS)])
        n = min(n, self.hi - self.lo)
        off = rng.randint(self.lo, self.hi - n)
        data = randbytes(rng, n)
        try:
            if rng.random() < 0.2:
                self.vol.write_batch([off], np.frombuffer(data, dtype=np.uint8).reshape(1, -1))
            else:
                self.vol.write(off, data)
        except WriteInhibitedError:
            if not self.retry_inhibited:
                raise
            self.refused += 1
            time.sleep(0.0005)
            return
        self.expect[off - self.lo:off - self.lo + n] = data
        self.writes += 1
        if rng.random() < 0.1:                  # read back a piece of my stripe
            a = rng.randint(self.lo, self.hi - 1)
            b = rng.randint(a, min(self.hi, a + 2 * TS))
            got = self.vol.read(a, b - a).tobytes()
            assert got == bytes(self.expect[a - self.lo:b - self.lo]), "own read mismatch"

    def loop(self, stop: threading.Event):
        while not stop.is_set():
            self.one()


def stripes(vol: Volume, k: int, seed: int, upto: int | None = None,
            **kw) -> list[StripeWriter]:
    """k writers over [0, upto) of ``vol`` (default: all of it)."""
    upto = vol.capacity if upto is None else upto
    per = upto // k
    # stripe edges off the track grid, so writes near them straddle tracks
    edges = [0] + [i * per + 100 for i in range(1, k)] + [upto]
    return [StripeWriter(vol, edges[i], edges[i + 1], seed + i, **kw) for i in range(k)]


def overlay(base: bytes, writers: list[StripeWriter]) -> bytes:
    out = bytearray(base)
    for w in writers:
        out[w.lo:w.hi] = w.expect
    return bytes(out)


def until(cond, timeout: float = 10.0) -> bool:
    """Poll ``cond`` until it holds or ``timeout`` passes; its last value."""
    deadline = time.monotonic() + timeout
    while not cond() and time.monotonic() < deadline:
        time.sleep(0.001)
    return bool(cond())


def progressed(writers: list[StripeWriter]) -> None:
    """Return once the writers wrote more since the call: what the test does
    next sees a source that moved, whatever the scheduler did."""
    n = sum(w.writes for w in writers)
    assert until(lambda: sum(w.writes for w in writers) > n), "the writers stalled"


def reader(vol: Volume, expect: bytes, seed: int, stop: threading.Event, counter: list):
    rng = random.Random(seed)
    cap = vol.capacity
    while not stop.is_set():
        a = rng.randint(0, cap - 1)
        b = rng.randint(a, min(cap, a + 3 * TS))
        if rng.random() < 0.2:
            got = vol.read_batch([a], b - a)[0].tobytes()
        else:
            got = vol.read(a, b - a).tobytes()
        assert got == expect[a:b], f"{vol.name} [{a}, {b}) is not the establish-time image"
        counter[0] += 1


def volume(seed: int, name: str) -> Volume:
    v = Volume(N_TRACKS, TS, name=name)
    v._raw_array()[:] = np.frombuffer(random.Random(seed).randbytes(v.capacity), dtype=np.uint8)
    return v


def test_writers_background_copy_and_readers():
    """Sources written by several threads while COPY-mode workers hydrate
    their targets and other threads read the targets: every target read,
    and every final target, is its source's image at the establish instant;
    a target written by its own host keeps those writes."""
    fails = Failures()
    stop = threading.Event()
    sources = [volume(1, "s0"), volume(2, "s1")]
    initial = [s.array.tobytes() for s in sources]
    targets = [Volume(N_TRACKS, TS, name=f"t{i}") for i in range(4)]
    # writers keep to the first half, so the second half reaches the
    # targets only through the (rate-capped) background copy
    half = N_TRACKS // 2 * TS
    writers = [w for i, s in enumerate(sources) for w in stripes(s, 3, seed=10 * i, upto=half)]
    threads = [fails.run(w.loop, stop) for w in writers]
    assert until(lambda: all(w.writes for w in writers))    # writers are running

    # s0 -> t0, t1 one by one; s1 -> t2, t3 as one consistency group
    expect = {}
    rels = []
    for t in targets[:2]:
        with locked([sources[0], t]):
            expect[t.name] = sources[0].array.tobytes()
            rels.append(FlashCopy(sources[0], t, persistent=True, copy_rate=256 << 10))
        progressed(writers)                             # t0 and t1: two instants
    with locked([sources[1], *targets[2:]]):
        snap = sources[1].array.tobytes()
        rels += establish_group([(sources[1], targets[2]), (sources[1], targets[3])],
                                persistent=True, copy_rate=256 << 10)
    expect["t2"] = expect["t3"] = snap
    assert any(r.tracks_to_copy for r in rels), "copy finished before the test began"

    counters = []
    for i, t in enumerate(targets[:3]):
        counters.append([0])
        threads.append(fails.run(reader, t, expect[t.name], 100 + i, stop, counters[-1]))
    # t3's own host writes a stripe of it (a target written during its copy)
    t3_writer = StripeWriter(targets[3], 5 * TS + 3, 20 * TS - 7, seed=7)
    t3_writer.expect[:] = snap[t3_writer.lo:t3_writer.hi]
    threads.append(fails.run(t3_writer.loop, stop))

    time.sleep(RUN_SECONDS)
    still_copying = sum(1 for r in rels if r.tracks_to_copy)
    stop.set()
    for th in threads:
        th.join(30)
    fails.check()
    assert all(c[0] > 10 for c in counters), counters
    assert all(w.writes > 10 for w in writers) and t3_writer.writes > 10

    assert still_copying, "the copy was over before the load ended: slow it down"
    rels[0].copy()                                      # a caller's copy beside the worker
    for r in rels:
        assert r.wait(timeout=30), r
    for t in targets[:3]:
        assert t.array.tobytes() == expect[t.name], t.name
    final_t3 = bytearray(snap)
    final_t3[t3_writer.lo:t3_writer.hi] = t3_writer.expect
    assert targets[3].read(0, targets[3].capacity).tobytes() == bytes(final_t3)
    assert targets[3].array.tobytes() == bytes(final_t3)
    for s, base, ws in ((sources[0], initial[0], writers[:3]),
                        (sources[1], initial[1], writers[3:])):
        assert s.array.tobytes() == overlay(base, ws)


def test_resync_commit_revert_cycles_under_load():
    """A controller resyncs (plainly or revertibly, then commits or reverts)
    while writers hammer the source and background copy runs; readers check
    the target against the image of the current generation. At the end the
    copy completes and the target holds exactly the last generation."""
    fails = Failures()
    stop = threading.Event()
    s = volume(5, "src")
    initial = s.array.tobytes()
    t = Volume(N_TRACKS, TS, name="tgt")
    writers = stripes(s, 2, seed=50, retry_inhibited=True)
    threads = [fails.run(w.loop, stop) for w in writers]
    assert until(lambda: all(w.writes for w in writers))
    with locked([s, t]):
        current = [s.array.tobytes()]
        r = FlashCopy(s, t, record=True)

    def check_reads(seed):
        rng = random.Random(seed)
        while not stop.is_set():
            a = rng.randint(0, s.capacity - 1)
            b = rng.randint(a, min(s.capacity, a + 2 * TS))
            with locked([s, t]):                        # generation can't change meanwhile
                got = t.read(a, b - a).tobytes()
                assert got == current[0][a:b], "target is not its generation's image"

    def controller(seed):
        rng = random.Random(seed)
        cycles = {"plain": 0, "commit": 0, "revert": 0}
        while not stop.is_set():
            time.sleep(rng.uniform(0.005, 0.03))
            revertible = rng.random() < 0.6
            with locked([s, t]):
                previous = current[0]
                current[0] = s.array.tobytes()
                r.resync(revertible=revertible)
            if not revertible:
                cycles["plain"] += 1
                continue
            time.sleep(rng.uniform(0, 0.01))
            with locked([s, t]):
                assert s.array.tobytes() == current[0]   # inhibited: S did not move
                if rng.random() < 0.5:
                    r.commit()
                    cycles["commit"] += 1
                else:
                    r.revert()
                    current[0] = previous
                    cycles["revert"] += 1
        assert all(cycles.values()), cycles

    threads += [fails.run(check_reads, 1), fails.run(check_reads, 2), fails.run(controller, 3)]
    time.sleep(RUN_SECONDS)
    stop.set()
    for th in threads:
        th.join(30)
    fails.check()
    assert sum(w.refused for w in writers) > 0          # the inhibit did bite
    assert r.wait(timeout=20), f"background copy never finished: {r}"
    assert t.array.tobytes() == current[0]
    assert s.array.tobytes() == overlay(initial, writers)


def test_many_sources_copy_on_write_and_withdraw():
    """Writers on several sources, each with several targets; targets are
    withdrawn (forced) and re-established while the writes go on. Every
    target that stays valid holds its own establish instant."""
    fails = Failures()
    stop = threading.Event()
    srcs = [volume(20 + i, f"s{i}") for i in range(3)]
    writers = [w for i, s in enumerate(srcs) for w in stripes(s, 2, seed=200 + 10 * i)]
    threads = [fails.run(w.loop, stop) for w in writers]
    tgts = [Volume(N_TRACKS, TS, name=f"t{i}") for i in range(6)]
    live: dict[str, tuple[FlashCopy, bytes]] = {}
    rng = random.Random(9)
    for _ in range(20):
        t = rng.choice(tgts)
        if t.name in live:
            rel, snap = live.pop(t.name)
            assert t.read(0, t.capacity).tobytes() == snap
            rel.withdraw(force=True)
        s = rng.choice(srcs)
        with locked([s, t]):
            snap = s.array.tobytes()
            rel = FlashCopy(s, t, background_copy=rng.random() < 0.5, persistent=True,
                            copy_rate=rng.choice([None, 8 << 20]))
        live[t.name] = (rel, snap)
        if not rel.background_copy and rng.random() < 0.5:
            rel.copy(rng.randint(1, 8))
        time.sleep(0.01)                                # pacing: writes go on between
    stop.set()
    for th in threads:
        th.join(30)
    fails.check()
    assert all(w.writes > 10 for w in writers)
    for name, (rel, snap) in live.items():
        t = rel.target
        assert t.read(0, t.capacity).tobytes() == snap, name
        if rel.background_copy:
            assert rel.wait(20)
        else:
            rel.copy()
        assert t.array.tobytes() == snap, name


# ---------------------------------------------------------------------------
# Worker races, replayed deterministically: the worker thread is paused at a
# chosen instant (any instant is possible under preemption) while the test
# thread acts.
# ---------------------------------------------------------------------------

def test_resync_while_the_worker_is_stopping_is_not_lost():
    """The worker has found nothing left and is on its way out when a resync
    brings new tracks: someone must still copy them."""
    at_exit, go = threading.Event(), threading.Event()

    def tracer(frame, event, arg):
        if frame.f_code.co_name != "_background":
            return None

        def local(frame, event, arg):
            if event == "return" and not at_exit.is_set():
                at_exit.set()                    # the worker's last instant
                go.wait(10)
            return local
        return local

    s, t = volume(30, "s"), Volume(N_TRACKS, TS, name="t")
    threading.settrace(tracer)
    try:
        r = FlashCopy(s, t, record=True)
    finally:
        threading.settrace(None)
    assert at_exit.wait(10)
    assert r.tracks_to_copy == 0
    s.write(3 * TS, b"new")
    r.resync()
    expect = s.array.tobytes()
    go.set()
    assert r.wait(timeout=10), f"resync's tracks were never copied: {r}"
    assert t.array.tobytes() == expect


def test_revertible_resync_while_the_worker_starts_a_chunk():
    """The worker checked 'not revertible' and is about to copy when a
    revertible resync lands: it must stop quietly, copy nothing, and resume
    after commit."""
    s, t = volume(31, "s"), Volume(N_TRACKS, TS, name="t")
    about_to_copy, go = threading.Event(), threading.Event()
    worker_errors = []
    real_copy = FlashCopy._copy_grains      # what the worker calls, per chunk
    worker = []

    def paused_copy(self, max_grains=None):
        if threading.current_thread() is not threading.main_thread() \
                and not about_to_copy.is_set():
            worker.append(threading.current_thread())
            about_to_copy.set()
            go.wait(10)
        return real_copy(self, max_grains)

    old_hook = threading.excepthook
    threading.excepthook = lambda a: worker_errors.append(a.exc_value)
    try:
        FlashCopy._copy_grains = paused_copy
        r = FlashCopy(s, t, record=True)
        assert about_to_copy.wait(10)
        t_raw = t.array.tobytes()
        r.resync(revertible=True)
        newer = s.array.tobytes()
        go.set()
        worker[0].join(10)                          # it stopped, and quietly
        assert not worker[0].is_alive()
        assert worker_errors == []
        assert t.array.tobytes() == t_raw            # nothing copied while revertible
        assert r.revertible and r.tracks_to_copy == N_TRACKS
    finally:
        FlashCopy._copy_grains = real_copy
        threading.excepthook = old_hook
    r.commit()
    assert r.wait(10)
    assert t.array.tobytes() == newer


def test_establish_group_is_one_instant_for_dependent_writes():
    """A host writes A then B, over and over, each write stamped with a
    counter (B's write depends on A's). A group established meanwhile must
    show a pair of stamps some single instant could show: B's is A's or one
    less, never older nor newer."""
    fails = Failures()
    stop = threading.Event()
    a, b = Volume(8, 512, name="a"), Volume(8, 512, name="b")

    written = [0]

    def host():
        i = 0
        while not stop.is_set():
            i += 1
            written[0] = i
            stamp = i.to_bytes(8, "little") * 64
            a.write(512, stamp)              # one track, then the other volume
            b.write(512, stamp)

    threads = [fails.run(host)]
    assert until(lambda: written[0] > 1)
    seen = []
    for _ in range(40):
        ta, tb = Volume(8, 512), Volume(8, 512)
        rels = establish_group([(a, ta), (b, tb)], background_copy=False)
        sa = int.from_bytes(ta.read(512, 8).tobytes(), "little")
        sb = int.from_bytes(tb.read(512, 8).tobytes(), "little")
        seen.append((sa, sb))
        for r in rels:
            r.withdraw(force=True)
        n = written[0]
        assert until(lambda: written[0] > n)            # the host wrote meanwhile
    stop.set()
    for th in threads:
        th.join(10)
    fails.check()
    assert all(sb in (sa, sa - 1) for sa, sb in seen), seen
    assert len({sa for sa, _ in seen}) > 5           # the host really was writing
