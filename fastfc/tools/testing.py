"""Helpers to check fastfc's promise: workloads, fault plans and a checker.

Used by the test suite, the stress script and the demo. The checker is an
independent reference: at each coordination instant it copies the A volumes'
images (host writes are held then), and after every attempt it compares
every C volume's logical image with the images of the newest committed CG.
It shares no logic with the engine.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field

import numpy as np

from fastfc import faults
from fastfc.copyservices.globalmirror import GlobalMirror


class PromiseChecker:
    """Reference snapshots of the A volumes, one per coordination instant.

    Pass :meth:`on_coordinate` to the session; call :meth:`check` after each
    attempt. ``initial`` is the A images before the session's first CG
    (the C volumes' images until a CG commits).
    """

    def __init__(self, session=None, primaries=None) -> None:
        self.session = session
        self._primaries = primaries
        self.snapshots: dict[int, list[np.ndarray]] = {}
        self.checks = 0

    def attach(self, session) -> None:
        self.session = session
        self.snapshots[0] = [t.b.read(0, t.b.capacity) for t in session.triplets]

    def on_coordinate(self, sequence: int) -> None:
        prims = self._primaries if self.session is None else [t.a for t in self.session.triplets]
        # host writes to every A are held now: the raw arrays are the images
        self.snapshots[sequence] = [a.array.copy() for a in prims]

    def check(self) -> int:
        """Assert the promise; return the CG sequence the C volumes hold."""
        s = self.session
        seqs = set(s.c_sequences)
        if len(seqs) != 1:
            raise AssertionError(f"C volumes carry different CG sequences: {s.c_sequences}")
        seq = seqs.pop()
        if seq != s.stats.sequence:
            raise AssertionError(f"C volumes hold CG {seq}, newest committed is {s.stats.sequence}")
        images = self.snapshots[seq]
        for trip, image in zip(s.triplets, images):
            got = trip.c.read(0, trip.c.capacity)
            if not np.array_equal(got, image):
                bad = np.flatnonzero(got != image) // trip.c.track_size
                raise AssertionError(
                    f"{trip.c.name} differs from CG {seq} on tracks {sorted(set(bad.tolist()))[:10]}")
        for old in [k for k in self.snapshots if k < seq]:
            del self.snapshots[old]
        self.checks += 1
        return seq


BLOCK = 256   # writes drawn at once by a RandomWriters thread


class RandomWriters:
    """Host writer threads: random-length writes at random offsets of random
    volumes, until :meth:`stop`.

    ``pace`` caps the combined rate in bytes/s (None: as fast as they go);
    ``io_size`` fixes the write size (None: 1 byte .. 2 tracks, unaligned).
    """

    def __init__(self, volumes, *, threads: int = 2, seed: int = 0,
                 io_size: int | None = None, pace: float | None = None) -> None:
        self.volumes = list(volumes)
        self.io_size = io_size
        self.pace = pace
        self.threads = threads
        self.seed = seed
        self.writes = 0
        self.bytes = 0
        self.errors: list[BaseException] = []
        self._stop = threading.Event()
        self._workers: list[threading.Thread] = []

    def _run(self, seed: int) -> None:
        # The random choices are drawn in blocks of BLOCK writes (one NumPy
        # call per choice per block), so the loop costs the GIL little more
        # than the writes it issues: a write drawn per call costs about
        # 16 us of Python, which caps two writers near 260 MB/s of 4 KiB
        # and leaves a Global Mirror session next to them fighting for the
        # GIL with the harness rather than with the host's writes.
        rng = np.random.default_rng(seed)
        vols = self.volumes
        pool = rng.integers(0, 256, 1 << 20, dtype=np.uint8)
        share = self.pace / self.threads if self.pace else 0.0
        start = time.perf_counter()
        mine = 0
        try:
            while not self._stop.is_set():
                which = rng.integers(len(vols), size=BLOCK).tolist()
                if self.io_size:
                    sizes = [self.io_size] * BLOCK
                    slots = rng.random(BLOCK).tolist()
                    offs = [int(f * (vols[i].capacity // self.io_size)) * self.io_size
                            for f, i in zip(slots, which)]
                else:
                    sizes = [int(f * min(2 * vols[i].track_size, vols[i].capacity)) + 1
                             for f, i in zip(rng.random(BLOCK).tolist(), which)]
                    offs = [int(f * (vols[i].capacity - n + 1))
                            for f, i, n in zip(rng.random(BLOCK).tolist(), which, sizes)]
                ps = [int(f * (pool.size - n + 1))
                      for f, n in zip(rng.random(BLOCK).tolist(), sizes)]
                for i, off, n, p in zip(which, offs, sizes, ps):
                    if self._stop.is_set():
                        break
                    vols[i].write(off, pool[p:p + n])
                    self.writes += 1
                    self.bytes += n
                    mine += n
                    if share:
                        ahead = mine / share - (time.perf_counter() - start)
                        if ahead > 0.001:
                            time.sleep(ahead)
        except BaseException as e:  # surfaced by stop()
            self.errors.append(e)

    def start(self) -> "RandomWriters":
        self._stop.clear()
        self._workers = [threading.Thread(target=self._run, args=(self.seed * 1000 + i,),
                                          daemon=True, name=f"fastfc-writer-{i}")
                         for i in range(self.threads)]
        for w in self._workers:
            w.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        for w in self._workers:
            w.join()
        if self.errors:
            raise self.errors[0]

    def __enter__(self) -> "RandomWriters":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


def run_under_writers(session, volumes, seconds: float, **writers) -> tuple[RandomWriters, float]:
    """Run ``session`` (anything with ``start()`` and ``stop()``: a Global
    Mirror session, the benchmarks' NumPy engine) for ``seconds`` under
    :class:`RandomWriters` on ``volumes`` (``writers``: its keyword
    arguments). The writers start before the session and stop after it.

    Returns the stopped writers (``bytes``, ``writes``) and the seconds from
    the session's start to its stop.
    """
    w = RandomWriters(volumes, **writers).start()
    try:
        t0 = time.perf_counter()
        session.start()
        time.sleep(seconds)
        session.stop()
        elapsed = time.perf_counter() - t0
    finally:
        w.stop()
    return w, elapsed


FAULT_KINDS = ("none", "prepare", "commit", "revert", "coordinate", "drain", "link")


@dataclass
class FaultPlan:
    """Arms one random fault before a CG attempt and cleans up after it."""

    session: GlobalMirror
    rng: np.random.Generator
    kinds: tuple = FAULT_KINDS
    stall: float = 0.0          # delay for coordination/drain stalls (s)
    cycle: bool = False         # take the kinds in turn instead of at random
    armed: dict = field(default_factory=dict)
    _turn: int = 0

    def arm(self) -> str:
        s = self.session
        trips = s.triplets
        if self.cycle:
            kind = self.kinds[self._turn % len(self.kinds)]
            self._turn += 1
        else:
            kind = self.kinds[int(self.rng.integers(len(self.kinds)))]
        pick = trips[int(self.rng.integers(len(trips)))]
        if kind == "prepare":
            faults.inject("prepare", pick.b)
        elif kind == "commit":
            faults.inject("commit", pick.b)
        elif kind == "revert":
            # another volume's prepare fails, so the prepared ones (pick
            # among them) are reverted
            others = [t for t in trips if t is not pick] or trips
            other = others[int(self.rng.integers(len(others)))]
            faults.inject("prepare", other.b)
            faults.inject("revert", pick.b)
        elif kind == "coordinate":
            faults.inject("coordinate", delay=s.max_coordination_time * 1.5)
        elif kind == "drain":
            faults.inject("drain", pick.a, delay=self.stall or 0.02)
        elif kind == "link":
            faults.inject("link", after=int(self.rng.integers(0, 4)))
        return kind

    def disarm(self) -> None:
        """Clear what did not fire, bring the link back, and act as the
        operator on a FATAL session."""
        faults.clear()
        s = self.session
        s.link.restore()
        for t in s.triplets:
            if t.pair.suspend_reason is not None and not t.pair.failed_over:
                t.pair.suspend_reason = None
        if s.state.value == "fatal":
            s.clear_fatal()
