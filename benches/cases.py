"""fastfc's benchmark cases, shared by every harness.

Each :class:`Case` names a figure, the fastfc operation, the baseline(s) it
is judged against, the target ratio and which way is better. ``make(quick)``
builds a :class:`Bench`: the arrays and relationships, pre-faulted, and the
callables to time. :func:`measure` times fastfc and its baselines *in the
same run*, interleaved round by round (the machine is shared and noisy), and
reports medians and their ratio. The pytest-benchmark suite
(``test_bench_core.py``) and the runner's ``core`` suite
(``python -m benches core``) both use this registry.

Ratios
------
* higher is better (a speed figure): ``ratio = baseline time / fastfc time``,
  i.e. fastfc's speed as a multiple of the baseline's; met when
  ``ratio >= target``.
* lower is better (a cost figure): ``ratio = fastfc time / baseline time``;
  met when ``ratio <= target``.

With several baselines the fastest one (smallest median) is the reference.
"""

from __future__ import annotations

import gc
import statistics
import time
from dataclasses import dataclass, field
from typing import Callable

import numpy as np

from fastfc import FlashCopy, FlashCopyState, TrackBitmap, Volume

KiB = 1 << 10
MiB = 1 << 20
GiB = 1 << 30
PAGE = 4096


# --------------------------------------------------------------------------
# Helpers
# --------------------------------------------------------------------------

def fill_random(arr: np.ndarray, seed: int = 0) -> None:
    """Fill a uint8 array with pseudo-random bytes (a 1 MiB random block,
    tiled), which also faults in every page."""
    flat = arr.reshape(-1).view(np.uint8)
    block = np.random.default_rng(seed).integers(0, 256, min(MiB, flat.size), dtype=np.uint8)
    full = flat.size // block.size * block.size
    if full:
        np.copyto(flat[:full].reshape(-1, block.size), block)
    flat[full:] = block[:flat.size - full]


def touch(arr: np.ndarray, value: int = 0x5A) -> None:
    """Fault in every page of ``arr`` by writing one byte per page."""
    arr.reshape(-1).view(np.uint8)[::PAGE] = value


def source_and_targets(n_tracks: int, track: int, n_targets: int,
                       seed: int) -> tuple[Volume, list[Volume]]:
    """Volume ``S`` of random bytes and ``n_targets`` volumes ``T0..`` with
    their pages faulted in (the setup of the copy-on-write figures)."""
    S = Volume(n_tracks, track, name="S")
    fill_random(S._raw_array(), seed=seed)
    Ts = [Volume(n_tracks, track, name=f"T{i}") for i in range(n_targets)]
    for T in Ts:
        touch(T._raw_array())
    return S, Ts


def each_offset(f: Callable, offsets, arg) -> None:
    """``f(o, arg)`` for every offset: the timed loop of the figures that
    write (``f`` a volume's ``write``, ``arg`` the data) or read (``read``,
    the length) one I/O at a time."""
    for o in offsets:
        f(o, arg)


def wait_withdrawn(fc: FlashCopy, timeout: float = 60.0) -> None:
    """Wait (untimed) until a non-persistent COPY relationship has ended."""
    deadline = time.monotonic() + timeout
    fc.wait(timeout)
    while fc.state is not FlashCopyState.WITHDRAWN:
        if time.monotonic() > deadline:
            raise RuntimeError(f"{fc!r} did not end within {timeout} s")
        time.sleep(0.0005)


# --------------------------------------------------------------------------
# Registry
# --------------------------------------------------------------------------

class Bench:
    """A prepared case: a fastfc callable and its baselines over shared data.

    Attributes
    ----------
    fastfc : callable
        The timed fastfc operation (no arguments).
    baselines : dict[str, callable]
        Timed baseline operations by name.
    ops : int
        Operations per timed call (the callable loops over ``ops`` small
        operations when one is too short to time alone).
    nbytes : int
        Bytes copied or scanned per timed call (0: not a bandwidth figure).
    """

    fastfc: Callable[[], object]
    baselines: dict[str, Callable[[], object]]
    ops: int = 1
    nbytes: int = 0

    def before(self, role: str) -> None:
        """Untimed preparation before each timed call of ``role``
        (``"fastfc"`` or a baseline name)."""

    def check(self) -> None:
        """Verify (untimed) that the fastfc operation did its job; raises
        AssertionError otherwise."""

    def info(self) -> dict:
        """Extra facts for the report."""
        return {}

    def close(self) -> None:
        """Release the volumes and relationships."""

    def callable(self, role: str) -> Callable[[], object]:
        return self.fastfc if role == "fastfc" else self.baselines[role]

    @property
    def roles(self) -> list[str]:
        return ["fastfc", *self.baselines]


@dataclass(frozen=True)
class Case:
    """One benchmark figure and its target."""

    name: str
    figure: str
    make: Callable[[bool], Bench]
    target: float
    higher_is_better: bool
    baseline_desc: str
    rounds: int = 15
    quick_rounds: int = 5
    warmup: int = 1
    block: int = 1   # consecutive timed calls of one role within a round

    def ratio(self, t_fastfc: float, t_baseline: float) -> float:
        if self.higher_is_better:
            return t_baseline / t_fastfc
        return t_fastfc / t_baseline

    def met(self, ratio: float) -> bool:
        return ratio >= self.target if self.higher_is_better else ratio <= self.target

    @property
    def target_text(self) -> str:
        return f"{'>=' if self.higher_is_better else '<='} {self.target:g}"


CASES: list[Case] = []


def case(**kw) -> Callable:
    def register(make):
        CASES.append(Case(make=make, **kw))
        return make
    return register


def get_case(name: str) -> Case:
    for c in CASES:
        if c.name == name:
            return c
    raise KeyError(f"no benchmark case {name!r}; cases: {', '.join(c.name for c in CASES)}")


# --------------------------------------------------------------------------
# Measurement
# --------------------------------------------------------------------------

@dataclass
class Result:
    case: Case
    samples: dict[str, list[float]]      # seconds per timed call, by role
    info: dict = field(default_factory=dict)
    nbytes: int = 0
    ops: int = 1

    def median(self, role: str) -> float:
        return statistics.median(self.samples[role])

    @property
    def fastfc_s(self) -> float:
        return self.median("fastfc")

    @property
    def baseline_name(self) -> str:
        names = [r for r in self.samples if r != "fastfc"]
        return min(names, key=self.median)

    @property
    def baseline_s(self) -> float:
        return self.median(self.baseline_name)

    @property
    def ratio(self) -> float:
        return self.case.ratio(self.fastfc_s, self.baseline_s)

    @property
    def met(self) -> bool:
        return self.case.met(self.ratio)

    def round_ratios(self) -> list[float]:
        """The ratio of each round (fastfc against the reference baseline of
        the same round), to show the spread."""
        b = self.samples[self.baseline_name]
        return [self.case.ratio(f, x) for f, x in zip(self.samples["fastfc"], b)]

    def as_dict(self) -> dict:
        return {
            "name": self.case.name, "figure": self.case.figure,
            "target": self.case.target, "higher_is_better": self.case.higher_is_better,
            "fastfc_s": self.fastfc_s, "baseline": self.baseline_name,
            "baseline_s": self.baseline_s, "ratio": self.ratio, "met": self.met,
            "medians_s": {r: self.median(r) for r in self.samples},
            "samples_s": self.samples, "nbytes": self.nbytes, "ops": self.ops,
            "info": self.info,
        }


def time_call(bench: Bench, role: str) -> float:
    """Prepare (untimed), then time one call of ``role``; seconds."""
    bench.before(role)
    fn = bench.callable(role)
    t0 = time.perf_counter_ns()
    fn()
    return (time.perf_counter_ns() - t0) * 1e-9


def measure(c: Case, quick: bool = False, rounds: int | None = None,
            check: bool = True) -> Result:
    """Build ``c``'s bench and time fastfc and every baseline, interleaved:
    each round runs every role ``c.block`` times in a row, roles in
    alternating order (ABBA), so slow drift on a shared machine hits all of
    them alike. GC is off while timing."""
    n = rounds or (c.quick_rounds if quick else c.rounds)
    bench = c.make(quick)
    try:
        roles = bench.roles
        samples: dict[str, list[float]] = {r: [] for r in roles}
        gc.collect()
        gc_was_on = gc.isenabled()
        gc.disable()
        try:
            for i in range(c.warmup + n):
                for role in (roles if i % 2 == 0 else roles[::-1]):
                    for _ in range(c.block):
                        t = time_call(bench, role)
                        if i >= c.warmup:
                            samples[role].append(t)
        finally:
            if gc_was_on:
                gc.enable()
        if check:
            bench.before("fastfc")
            bench.fastfc()
            bench.check()
        return Result(c, samples, bench.info(), bench.nbytes, bench.ops)
    finally:
        bench.close()


# --------------------------------------------------------------------------
# Background and incremental copy
# --------------------------------------------------------------------------

class _CopyPair(Bench):
    """A source of random bytes and a pre-faulted target, 64 KiB tracks."""

    track = 64 * KiB

    def __init__(self, capacity: int, track: int | None = None) -> None:
        self.track = track or self.track
        n = capacity // self.track
        self.S = Volume(n, self.track, name="S")
        self.T = Volume(n, self.track, name="T")
        fill_random(self.S._raw_array(), seed=1)
        touch(self.T._raw_array())
        self.fc: FlashCopy | None = None

    def _drop_fc(self) -> None:
        if self.fc is not None and self.fc.state is not FlashCopyState.WITHDRAWN:
            self.fc.withdraw(force=True)
        self.fc = None

    def close(self) -> None:
        self._drop_fc()
        self.S.close()
        self.T.close()


class BackgroundCopy(_CopyPair):
    """Copy every track of a 1 GiB NOCOPY relationship with ``copy()`` in
    the calling thread, or (``worker=True``) establish in COPY mode and wait
    for the worker thread; against ``np.copyto`` of the same bytes."""

    def __init__(self, quick: bool, worker: bool, track: int = 64 * KiB) -> None:
        super().__init__(GiB, track)
        self.worker = worker
        self.nbytes = self.S.capacity
        a, b = self.S._raw_array(), self.T._raw_array()
        self.baselines = {"np.copyto": lambda: np.copyto(b, a)}

    def before(self, role: str) -> None:
        if self.fc is not None and self.worker:
            wait_withdrawn(self.fc)
        self._drop_fc()
        self.T._raw_array()[::max(self.track, PAGE)] ^= 0xFF   # the target differs again
        if role == "fastfc" and not self.worker:
            self.fc = FlashCopy(self.S, self.T, background_copy=False)

    def fastfc(self) -> None:
        if self.worker:
            self.fc = FlashCopy(self.S, self.T)   # COPY mode: a worker thread copies
            self.fc.wait()
        else:
            self.fc.copy()

    def check(self) -> None:
        if self.worker:
            wait_withdrawn(self.fc)
        assert self.fc.state is FlashCopyState.WITHDRAWN, self.fc  # ended by itself: all copied
        assert np.array_equal(self.S._raw_array(), self.T._raw_array()), "target differs from source"

    def info(self) -> dict:
        import fastfc.copyservices.flashcopy as fcm
        return {"CHUNK_BYTES": fcm.CHUNK_BYTES, "tracks": self.S.n_tracks}


case(name="bg_copy_caller",
     figure="background copy 1 GiB, 64 KiB tracks, copy() in the calling thread",
     baseline_desc="np.copyto of the same 1 GiB",
     target=0.95, higher_is_better=True, rounds=9, quick_rounds=3,
     )(lambda quick: BackgroundCopy(quick, worker=False))

case(name="bg_copy_worker",
     figure="background copy 1 GiB, 64 KiB tracks, COPY-mode worker thread (establish + wait)",
     baseline_desc="np.copyto of the same 1 GiB",
     target=0.95, higher_is_better=True, rounds=9, quick_rounds=3,
     )(lambda quick: BackgroundCopy(quick, worker=True))

case(name="bg_copy_512b_tracks",
     figure="background copy 1 GiB of 512 B tracks (2^21), copy() in the calling thread",
     baseline_desc="np.copyto of the same 1 GiB",
     target=0.95, higher_is_better=True, rounds=9, quick_rounds=3,
     )(lambda quick: BackgroundCopy(quick, worker=False, track=512))


class IncrementalCopy(_CopyPair):
    """Incremental resync after writes to 10% of the tracks, scattered at
    random; time ``copy()`` of just those tracks against ``np.copyto`` of as
    many contiguous bytes."""

    def __init__(self, quick: bool, fraction: float = 0.10) -> None:
        super().__init__(GiB)
        n = self.S.n_tracks
        rng = np.random.default_rng(7)
        self.tracks = np.sort(rng.choice(n, int(n * fraction), replace=False))
        self.offsets = self.tracks * self.track
        self.stamp = np.zeros((self.tracks.size, 64), dtype=np.uint8)
        self.fc = FlashCopy(self.S, self.T, background_copy=False, record=True)
        self.fc.copy()
        k = self.tracks.size * self.track
        self.nbytes = k
        a, b = self.S._raw_array()[:k], self.T._raw_array()[:k]
        self.baselines = {"np.copyto": lambda: np.copyto(b, a)}

    def before(self, role: str) -> None:
        if role == "fastfc":
            self.stamp += 1
            self.S.write_batch(self.offsets, self.stamp)   # the changed 10%
            self.fc.resync()

    def fastfc(self) -> None:
        self.fc.copy()

    def check(self) -> None:
        assert self.fc.tracks_to_copy == 0
        ts = self.track
        for t in self.tracks[:: max(1, self.tracks.size // 64)]:
            assert np.array_equal(self.S._raw_array()[t * ts:(t + 1) * ts],
                                  self.T._raw_array()[t * ts:(t + 1) * ts]), f"track {t}"

    def info(self) -> dict:
        return {"tracks": int(self.tracks.size), "of": int(self.S.n_tracks)}


case(name="incr_copy_10pct",
     figure="incremental copy of 10% random scattered 64 KiB tracks (1 GiB volume)",
     baseline_desc="np.copyto of as many contiguous bytes",
     target=0.8, higher_is_better=True, rounds=15, quick_rounds=5,
     )(lambda quick: IncrementalCopy(quick))


# --------------------------------------------------------------------------
# The host write path
# --------------------------------------------------------------------------

class WriteCopied(Bench):
    """4 KiB ``Volume.write`` at random aligned offsets to a source with 3
    targets whose tracks are all copied (persistent relationships), against
    the plain NumPy slice assignment of the same bytes at the same offsets."""

    track = 64 * KiB
    io = 4 * KiB

    def __init__(self, quick: bool, n_targets: int = 3, record: bool = False) -> None:
        n = 64 * MiB // self.track
        self.S, self.Ts = source_and_targets(n, self.track, n_targets, seed=2)
        self.fcs = [FlashCopy(self.S, T, background_copy=False, persistent=True, record=record)
                    for T in self.Ts]
        for fc in self.fcs:
            fc.copy()
        self.ops = 1024 if quick else 4096
        rng = np.random.default_rng(3)
        slots = self.S.capacity // self.io
        self.pool = [[int(o) * self.io for o in rng.integers(0, slots, self.ops)]
                     for _ in range(8)]
        self.k = 0
        self.offs = self.pool[0]
        self.data = np.random.default_rng(4).integers(0, 256, self.io, dtype=np.uint8)
        self.baselines = {"slice assignment": self._numpy}

    def before(self, role: str) -> None:
        self.k += 1
        self.offs = self.pool[self.k % len(self.pool)]

    def fastfc(self) -> None:
        each_offset(self.S.write, self.offs, self.data)

    def _numpy(self) -> None:
        a, data, L = self.S._raw_array(), self.data, self.io
        for o in self.offs:
            a[o:o + L] = data

    def check(self) -> None:
        o = self.offs[-1]
        assert np.array_equal(self.S.read(o, self.io), self.data)
        assert all(fc.tracks_to_copy == 0 for fc in self.fcs)
        assert all(fc.state is FlashCopyState.COPIED for fc in self.fcs)

    def info(self) -> dict:
        return {"writes_per_call": self.ops}

    def close(self) -> None:
        for fc in self.fcs:
            fc.withdraw()
        for v in (self.S, *self.Ts):
            v.close()


case(name="write_4k_3tgt_copied",
     figure="4 KiB Volume.write, source with 3 targets, tracks already copied",
     baseline_desc="arr[o:o+4096] = data",
     target=1.0, higher_is_better=False, rounds=21, quick_rounds=7, warmup=2,
     )(lambda quick: WriteCopied(quick))


class WriteCow(_CopyPair):
    """4 KiB ``Volume.write`` into a 64 KiB track that copies-on-write its
    4 KiB grain to a NOCOPY target first, against a slice assignment plus
    ``np.copyto`` of the same 4 KiB (the least work the step needs). Every
    timed call writes to fresh tracks drawn from a permutation of a 1 GiB
    volume, so neither side finds them in cache."""

    def __init__(self, quick: bool) -> None:
        super().__init__(GiB)
        n = self.S.n_tracks
        self.ops = 128 if quick else 256
        rng = np.random.default_rng(5)
        perm = rng.permutation(n)
        within = rng.integers(0, self.track // 4096, n) * 4096
        self.batches = [[(int(t), int(t) * self.track + int(w)) for t, w in
                         zip(perm[i:i + self.ops], within[i:i + self.ops])]
                        for i in range(0, n - self.ops + 1, self.ops)]
        self.k = 0
        self.batch = self.batches[0]
        self.views: list = []
        self.data = np.random.default_rng(6).integers(0, 256, 4096, dtype=np.uint8)
        self.baselines = {"slice assignment + np.copyto(grain)": self._numpy}
        self.Sv = self.S._raw_array().reshape(n, self.track)
        self.Tv = self.T._raw_array().reshape(n, self.track)

    def before(self, role: str) -> None:
        self.k += 1
        self.batch = self.batches[self.k % len(self.batches)]
        if role == "fastfc":
            self._drop_fc()
            self.fc = FlashCopy(self.S, self.T, background_copy=False)
        else:
            a, b = self.T._raw_array(), self.S._raw_array()
            self.views = [(o, a[o:o + 4096], b[o:o + 4096]) for t, o in self.batch]

    def fastfc(self) -> None:
        w, data = self.S.write, self.data
        for _, o in self.batch:
            w(o, data)

    def _numpy(self) -> None:
        a, data, copyto = self.S._raw_array(), self.data, np.copyto
        for o, dst, src in self.views:
            copyto(dst, src)
            a[o:o + 4096] = data

    def check(self) -> None:
        # each write copied its one grain; its track is still owed in part
        assert self.fc.to_copy.count() == self.S.n_grains - len(self.batch)
        assert self.T.copied_bytes >= 4096 * len(self.batch)
        t, o = self.batch[0]
        assert np.array_equal(self.S.read(o, 4096), self.data)

    def info(self) -> dict:
        return {"writes_per_call": self.ops}


case(name="write_4k_cow",
     figure="4 KiB Volume.write into a 64 KiB track, with copy-on-write of its 4 KiB grain",
     baseline_desc="slice assignment + np.copyto of the same 4 KiB",
     target=1.3, higher_is_better=False, rounds=21, quick_rounds=7, warmup=2,
     )(lambda quick: WriteCow(quick))


# --------------------------------------------------------------------------
# Establish, revertible resync, commit, revert (2^24 tracks)
# --------------------------------------------------------------------------

BIG_TRACKS = 1 << 24
SMALL_TRACKS = 1 << 10
META_TRACK = 512   # 2^24 tracks of 512 B: 8 GiB per volume, never touched (np.zeros is lazy)


def _lazy_pair(n_tracks: int) -> tuple[Volume, Volume]:
    return (Volume(n_tracks, META_TRACK, name=f"S{n_tracks}"),
            Volume(n_tracks, META_TRACK, name=f"T{n_tracks}"))


class _Relationship(Bench):
    def __init__(self) -> None:
        self.S, self.T = _lazy_pair(BIG_TRACKS)
        self.fc = FlashCopy(self.S, self.T, background_copy=False, record=True)
        self.meta = self.fc.metadata_bytes   # to_copy + src_changed + tgt_changed
        self.src = np.empty(self.meta, dtype=np.uint8)
        self.dst = np.empty(self.meta, dtype=np.uint8)
        fill_random(self.src, seed=8)
        touch(self.dst)
        np.copyto(self.dst, self.src)
        self.nbytes = self.meta
        src, dst = self.src, self.dst
        self.baselines = {"np.copyto(bitmap bytes)": lambda: np.copyto(dst, src)}

    def info(self) -> dict:
        return {"tracks": BIG_TRACKS, "bitmap_bytes": self.meta}

    def close(self) -> None:
        if self.fc is not None and self.fc.revertible:
            self.fc.revert()
        if self.fc is not None and self.fc.active:
            self.fc.withdraw(force=True)
        self.S.close()
        self.T.close()


class Establish(_Relationship):
    """Establish (record=True, NOCOPY) on 2^24 tracks against ``np.copyto``
    of the relationship's bitmap bytes (3 bitmaps of 2 MiB)."""

    def __init__(self, quick: bool) -> None:
        super().__init__()
        self.fc.withdraw(force=True)

    def before(self, role: str) -> None:
        if role == "fastfc" and self.fc is not None:
            if self.fc.active:
                self.fc.withdraw(force=True)
            self.fc = None   # its bitmaps are freed here, untimed

    def fastfc(self) -> None:
        self.fc = FlashCopy(self.S, self.T, background_copy=False, record=True)

    def check(self) -> None:
        assert self.fc.tracks_to_copy == BIG_TRACKS


class ResyncRevertible(_Relationship):
    """``resync(revertible=True)`` on 2^24 tracks against ``np.copyto`` of
    the relationship's bitmap bytes. Each timed call is undone (revert)
    untimed before the next."""

    def __init__(self, quick: bool) -> None:
        super().__init__()

    def before(self, role: str) -> None:
        if role == "fastfc" and self.fc.revertible:
            self.fc.revert()

    def fastfc(self) -> None:
        self.fc.resync(revertible=True)

    def check(self) -> None:
        assert self.fc.revertible and self.S.write_inhibited


case(name="establish_2p24",
     figure="establish (record, NOCOPY), 2^24 tracks",
     baseline_desc="np.copyto of the relationship's bitmap bytes (6 MiB)",
     target=2.0, higher_is_better=False, rounds=21, quick_rounds=7, warmup=2,
     )(Establish)

case(name="resync_revertible_2p24",
     figure="revertible resync, 2^24 tracks",
     baseline_desc="np.copyto of the relationship's bitmap bytes (6 MiB)",
     target=2.0, higher_is_better=False, rounds=21, quick_rounds=7, warmup=2,
     )(ResyncRevertible)


class CommitOrRevert(Bench):
    """``commit()`` (or ``revert()``) of a revertible relationship of 2^24
    tracks against the same call at 2^10 tracks: O(1) means the two match.

    Before each timed call (untimed): the revertible resync, then a read of
    a 16 MiB scratch buffer, so that both sizes start with the same cold
    caches (a resync at 2^24 tracks sweeps 8 MiB of bitmaps out of L2, one
    at 2^10 does not; without this the comparison measures cache misses in
    the Python code rather than the call)."""

    def __init__(self, quick: bool, op: str) -> None:
        self.op = op
        self.big = FlashCopy(*_lazy_pair(BIG_TRACKS), background_copy=False, record=True)
        self.small = FlashCopy(*_lazy_pair(SMALL_TRACKS), background_copy=False, record=True)
        self.scratch = np.ones(16 * MiB // 8, dtype=np.uint64)
        self.fastfc = getattr(self.big, op)
        self.baselines = {f"{op}() at 2^10 tracks": getattr(self.small, op)}

    def before(self, role: str) -> None:
        fc = self.big if role == "fastfc" else self.small
        if not fc.revertible:
            fc.resync(revertible=True)
        self.scratch.sum()

    def check(self) -> None:
        assert not self.big.revertible and not self.big.source.write_inhibited

    def close(self) -> None:
        for fc in (self.big, self.small):
            if fc.revertible:
                fc.revert()
            fc.withdraw(force=True)
            fc.source.close()
            fc.target.close()


case(name="commit_2p24",
     figure="commit of a revertible relationship, 2^24 tracks",
     baseline_desc="commit() of the same at 2^10 tracks",
     target=1.5, higher_is_better=False, rounds=4, quick_rounds=2, warmup=1, block=16,
     )(lambda quick: CommitOrRevert(quick, "commit"))

case(name="revert_2p24",
     figure="revert of a revertible relationship, 2^24 tracks",
     baseline_desc="revert() of the same at 2^10 tracks",
     target=1.5, higher_is_better=False, rounds=4, quick_rounds=2, warmup=1, block=16,
     )(lambda quick: CommitOrRevert(quick, "revert"))


# --------------------------------------------------------------------------
# Bitmap count and scan (2^27 bits)
# --------------------------------------------------------------------------

BITMAP_BITS = 1 << 27


def _numba():
    """The numba reference kernels, compiled; None when numba is missing."""
    try:
        from benches import numba_kernels
    except ImportError:
        try:
            import numba_kernels  # run from inside benches/
        except ImportError:
            return None
    numba_kernels.warm_up()
    return numba_kernels


def _repeat(f: Callable[[], object], n: int) -> Callable[[], object]:
    if n == 1:
        return f

    def loop():
        for _ in range(n):
            f()
    return loop


class Count(Bench):
    """``TrackBitmap.count`` over ``bits`` random bits against
    ``np.bitwise_count(words).sum()`` and a numba popcount loop (``ops``
    calls of each per timed call)."""

    def __init__(self, quick: bool, bits: int = BITMAP_BITS, ops: int = 1) -> None:
        self.bits = bits
        self.bm = TrackBitmap(bits)
        w = self.bm._raw_words()
        w[:] = np.random.default_rng(9).integers(0, 2**63, w.size, dtype=np.uint64) * 3
        self.expected = int(np.bitwise_count(w).sum())
        self.ops = ops
        self.nbytes = w.nbytes * ops
        self.fastfc = _repeat(self.bm.count, ops)
        self.baselines = {"np.bitwise_count().sum()":
                          _repeat(lambda: np.bitwise_count(w).sum(), ops)}
        nk = _numba()
        if nk is not None:
            self.baselines["numba popcount loop"] = _repeat(lambda: nk.popcount_words(w), ops)
        self._check = {"fastfc": self.bm.count,
                       "numpy": lambda: np.bitwise_count(w).sum(),
                       "numba": (lambda: nk.popcount_words(w)) if nk else self.bm.count}

    def check(self) -> None:
        for name, f in self._check.items():
            assert int(f()) == self.expected, name


def _np_find_first(words: np.ndarray) -> int:
    """First set bit through NumPy: ``argmax`` finds the first largest word,
    which is the first non-zero one when the scan meets a single set word."""
    k = int(words.argmax())
    v = int(words[k])
    return k * 64 + (v & -v).bit_length() - 1 if v else -1


class FindNextSet(Bench):
    """``TrackBitmap.find_next_set(0)`` over ``bits`` bits whose only set bit
    is the last, against NumPy ``argmax`` over the words and a numba scan
    (``ops`` calls of each per timed call)."""

    def __init__(self, quick: bool, bits: int = BITMAP_BITS, ops: int = 1) -> None:
        self.bits = bits
        self.bm = TrackBitmap(bits)
        w = self.bm._raw_words()
        touch(w)
        w[:] = 0
        self.bm.set(bits - 1)
        self.ops = ops
        self.nbytes = w.nbytes * ops
        bm = self.bm
        self.fastfc = _repeat(lambda: bm.find_next_set(0), ops)
        self.baselines = {"np.argmax(words)": _repeat(lambda: _np_find_first(w), ops)}
        nk = _numba()
        if nk is not None:
            self.baselines["numba scan"] = _repeat(
                lambda: nk.find_next_set_words(w, bits, 0), ops)
        self._check = {"fastfc": lambda: bm.find_next_set(0),
                       "numpy": lambda: _np_find_first(w),
                       "numba": (lambda: nk.find_next_set_words(w, bits, 0)) if nk
                       else (lambda: bm.find_next_set(0))}

    def check(self) -> None:
        for name, f in self._check.items():
            assert int(f()) == self.bits - 1, name


case(name="count_2p27",
     figure="TrackBitmap.count, 2^27 bits (16 MiB)",
     baseline_desc="fastest of np.bitwise_count().sum() and a numba loop",
     target=1.0, higher_is_better=True, rounds=41, quick_rounds=11, warmup=3,
     )(Count)

case(name="find_next_set_2p27",
     figure="TrackBitmap.find_next_set, 2^27 bits (16 MiB), set bit at the end",
     baseline_desc="fastest of np.argmax over the words and a numba loop",
     target=1.0, higher_is_better=True, rounds=41, quick_rounds=11, warmup=3,
     )(FindNextSet)

# The same at 2^20 bits (128 KiB, in L2): the kernels rather than memory.
case(name="count_2p20",
     figure="TrackBitmap.count, 2^20 bits (128 KiB, in cache), 100 calls",
     baseline_desc="fastest of np.bitwise_count().sum() and a numba loop",
     target=1.0, higher_is_better=True, rounds=41, quick_rounds=11, warmup=3,
     )(lambda quick: Count(quick, bits=1 << 20, ops=100))

case(name="find_next_set_2p20",
     figure="TrackBitmap.find_next_set, 2^20 bits (128 KiB, in cache), 100 calls",
     baseline_desc="fastest of np.argmax over the words and a numba loop",
     target=1.0, higher_is_better=True, rounds=41, quick_rounds=11, warmup=3,
     )(lambda quick: FindNextSet(quick, bits=1 << 20, ops=100))


# --------------------------------------------------------------------------
# Metadata
# --------------------------------------------------------------------------

def metadata_rows() -> list[dict]:
    """``FlashCopy.metadata_bytes`` against the allowance: 3 bits per track
    per relationship (one ``uint64`` word rounds up each bitmap), plus the
    revert image (3 more) while revertible."""
    rows = []
    for n in (SMALL_TRACKS, BIG_TRACKS):
        S, T = _lazy_pair(n)
        try:
            per_map = -(-n // 64) * 8
            for label, record in (("NOCOPY", False), ("record", True)):
                fc = FlashCopy(S, T, background_copy=False, record=record)
                rows.append(_meta_row(n, label, fc.metadata_bytes, 3 * per_map))
                if record:
                    fc.resync(revertible=True)
                    rows.append(_meta_row(n, "record, revertible", fc.metadata_bytes,
                                          6 * per_map))
                    fc.revert()
                fc.withdraw(force=True)
        finally:
            S.close()
            T.close()
    return rows


def _meta_row(n: int, label: str, nbytes: int, allowance: int) -> dict:
    return {"tracks": n, "relationship": label, "metadata_bytes": nbytes,
            "bits_per_track": nbytes * 8 / n, "allowance_bytes": allowance,
            "ok": nbytes <= allowance}
