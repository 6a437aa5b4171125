"""Benchmark cases against the other engines a user could pick:
the pure-NumPy engine (``engine_numpy.py``), numba-jitted kernels
(``numba_copy.py``, ``numba_kernels.py``) and the physical limit
(``np.copyto`` / libc ``memcpy`` on one and two threads).

Same machinery as ``cases.py`` (:class:`~benches.cases.Case`,
:class:`~benches.cases.Bench`, :func:`~benches.cases.measure`: fastfc and its
baselines timed interleaved in one run, medians, ratios), but kept in their
own lists, apart from the ``core`` suite's;
``test_bench_engine.py`` runs these under pytest-benchmark and the runner's
``physical``, ``engine`` and ``numba`` suites interleaved. Every speed figure here is "higher is
better": ratio = baseline time / fastfc time.

``quick`` keeps every size (the figures depend on them) and runs fewer
rounds, except where a case says otherwise.
"""

from __future__ import annotations

import ctypes
import threading
from typing import Callable

import numpy as np

from benches.cases import (GiB, KiB, MiB, PAGE, Bench, Case, each_offset, fill_random,
                           source_and_targets, touch, wait_withdrawn)
from benches.engine_numpy import NpFlashCopy, NpGlobalMirror, NpVolume
from fastfc import FlashCopy, FlashCopyState, GlobalMirror, Volume

TRACK_4K = 4 * KiB


def _np_twin(v: Volume) -> NpVolume:
    """A pure-NumPy volume over the same bytes as a fastfc volume."""
    return NpVolume(v.n_tracks, v.track_size, array=v._raw_array(), name=f"np-{v.name}")


def _case(**kw) -> Case:
    kw.setdefault("higher_is_better", True)
    return Case(**kw)


# --------------------------------------------------------------------------
# fastfc against the pure-NumPy engine, 4 KiB tracks
# --------------------------------------------------------------------------

class EngineCopy(Bench):
    """Background copy of every track (``fraction=None``) or an incremental
    copy after writes to ``fraction`` of the tracks, scattered: fastfc's
    ``copy()`` (after ``resync()`` when incremental) against the NumPy
    engine's, over the same arrays."""

    def __init__(self, quick: bool, capacity: int = 256 * MiB,
                 fraction: float | None = None, track: int = TRACK_4K) -> None:
        n = capacity // track
        self.S = Volume(n, track, name="S")
        self.T = Volume(n, track, name="T")
        fill_random(self.S._raw_array(), seed=11)
        touch(self.T._raw_array())
        self.nS, self.nT = _np_twin(self.S), _np_twin(self.T)
        self.fraction = fraction
        self.fc: FlashCopy | None = None
        self.nfc: NpFlashCopy | None = None
        if fraction is not None:
            rng = np.random.default_rng(12)
            self.tracks = np.sort(rng.choice(n, max(1, int(n * fraction)), replace=False))
            self.stamp = np.zeros((self.tracks.size, 64), np.uint8)
            self.fc = FlashCopy(self.S, self.T, background_copy=False, record=True)
            self.fc.copy()
            self.nfc = NpFlashCopy(self.nS, self.nT, record=True)
            self.nfc.copy()
            self.nbytes = self.tracks.size * track
        else:
            self.nbytes = capacity
        self.baselines = {"pure-NumPy engine": self._numpy}

    def _dirty(self, offsets_write: Callable) -> None:
        self.stamp += 1
        offsets_write(self.tracks * self.S.track_size, self.stamp)

    def before(self, role: str) -> None:
        if self.fraction is None:
            self.T._raw_array()[::self.S.track_size] ^= 0xFF
            if role == "fastfc":
                if self.fc is not None and self.fc.state is not FlashCopyState.WITHDRAWN:
                    self.fc.withdraw(force=True)
                self.fc = FlashCopy(self.S, self.T, background_copy=False)
            else:
                if self.nfc is not None:
                    self.nfc.withdraw()
                self.nfc = NpFlashCopy(self.nS, self.nT)
        elif role == "fastfc":
            self._dirty(self.S.write_batch)
        else:
            def np_batch(offsets, rows):
                for o, row in zip(offsets.tolist(), rows):
                    self.nS.write(o, row)
            self._dirty(np_batch)

    def fastfc(self) -> None:
        if self.fraction is not None:
            self.fc.resync()
        self.fc.copy()

    def _numpy(self) -> None:
        if self.fraction is not None:
            self.nfc.resync()
        self.nfc.copy()

    def check(self) -> None:
        assert self.fc.tracks_to_copy == 0
        assert np.array_equal(self.S._raw_array(), self.T._raw_array())

    def info(self) -> dict:
        return {"tracks": self.S.n_tracks, "track_size": self.S.track_size,
                "copied_tracks": self.nbytes // self.S.track_size}

    def close(self) -> None:
        if self.fc is not None and self.fc.state is not FlashCopyState.WITHDRAWN:
            self.fc.withdraw(force=True)
        self.S.close()
        self.T.close()


class EngineWrite(Bench):
    """4 KiB host writes at random tracks of a 64 MiB source with
    ``n_targets`` NOCOPY targets: each write first copies the old track to
    every target (``cow=True``, fresh tracks every call, relationships
    re-established before each call), or finds every track already copied
    (``cow=False``, persistent relationships): fastfc's ``Volume.write``
    against the NumPy engine's, one call per write."""

    io = 4 * KiB

    def __init__(self, quick: bool, cow: bool, n_targets: int = 3,
                 track: int = TRACK_4K, capacity: int = 64 * MiB) -> None:
        n = capacity // track
        self.cow = cow
        self.S, self.Ts = source_and_targets(n, track, n_targets, seed=13)
        self.nS = _np_twin(self.S)
        self.nTs = [_np_twin(T) for T in self.Ts]
        self.ops = 512 if quick else 1024
        rng = np.random.default_rng(14)
        self.pool = [[int(t) * track + int(w) for t, w in
                      zip(rng.permutation(n)[:self.ops],
                          rng.integers(0, max(1, track // self.io), self.ops) * self.io)]
                     for _ in range(4)]
        self.k = 0
        self.offs = self.pool[0]
        self.data = np.random.default_rng(15).integers(0, 256, self.io, np.uint8)
        self.fcs: list[FlashCopy] = []
        self.nfcs: list[NpFlashCopy] = []
        if not cow:
            self.fcs = [FlashCopy(self.S, T, background_copy=False, persistent=True)
                        for T in self.Ts]
            for fc in self.fcs:
                fc.copy()
            self.nfcs = [NpFlashCopy(self.nS, T) for T in self.nTs]
            for fc in self.nfcs:
                fc.copy()
        self.baselines = {"pure-NumPy engine": self._numpy}

    def before(self, role: str) -> None:
        self.k += 1
        self.offs = self.pool[self.k % len(self.pool)]
        if not self.cow:
            return
        if role == "fastfc":
            for fc in self.fcs:
                fc.withdraw(force=True)
            self.fcs = [FlashCopy(self.S, T, background_copy=False) for T in self.Ts]
        else:
            for fc in self.nfcs:
                fc.withdraw()
            self.nfcs = [NpFlashCopy(self.nS, T) for T in self.nTs]

    def fastfc(self) -> None:
        each_offset(self.S.write, self.offs, self.data)

    def _numpy(self) -> None:
        each_offset(self.nS.write, self.offs, self.data)

    def check(self) -> None:
        o = self.offs[-1]
        assert np.array_equal(self.S.read(o, self.io), self.data)
        left = self.S.n_tracks - len(self.offs) if self.cow else 0
        assert all(fc.tracks_to_copy == left for fc in self.fcs)

    def info(self) -> dict:
        return {"writes_per_call": self.ops, "targets": len(self.Ts),
                "track_size": self.S.track_size}

    def close(self) -> None:
        for fc in self.fcs:
            fc.withdraw(force=True)
        for v in (self.S, *self.Ts):
            v.close()


class EngineRead(Bench):
    """64 KiB reads (16 tracks of 4 KiB) of a NOCOPY target whose every
    other track is already copied, so each read takes half its tracks from
    the source: fastfc's ``Volume.read`` against the NumPy engine's."""

    io = 64 * KiB

    def __init__(self, quick: bool, capacity: int = 64 * MiB, track: int = TRACK_4K) -> None:
        n = capacity // track
        self.S = Volume(n, track, name="S")
        self.T = Volume(n, track, name="T")
        fill_random(self.S._raw_array(), seed=16)
        touch(self.T._raw_array())
        self.fc = FlashCopy(self.S, self.T, background_copy=False)
        self.nS, self.nT = _np_twin(self.S), _np_twin(self.T)
        self.nfc = NpFlashCopy(self.nS, self.nT)
        half = np.zeros(n, bool)
        half[::2] = True
        self.nfc.to_copy[:] = half
        self.fc.to_copy._raw_words()[:] = np.packbits(half, bitorder="little").view(np.uint64)
        self.T._raw_array().reshape(n, track)[1::2] = self.S._raw_array().reshape(n, track)[1::2]
        self.ops = 512 if quick else 1024
        rng = np.random.default_rng(17)
        self.offs = [int(o) * self.io for o in rng.integers(0, capacity // self.io, self.ops)]
        self.baselines = {"pure-NumPy engine": self._numpy}

    def fastfc(self) -> None:
        each_offset(self.T.read, self.offs, self.io)

    def _numpy(self) -> None:
        each_offset(self.nT.read, self.offs, self.io)

    def check(self) -> None:
        o = self.offs[0]
        assert np.array_equal(self.T.read(o, self.io), self.S._raw_array()[o:o + self.io])
        assert np.array_equal(self.nT.read(o, self.io), self.S._raw_array()[o:o + self.io])

    def info(self) -> dict:
        return {"reads_per_call": self.ops}

    def close(self) -> None:
        self.fc.withdraw(force=True)
        self.S.close()
        self.T.close()


class EngineCycle(Bench):
    """The metadata path of one FlashCopy cycle on ``n`` tracks of 4 KiB
    (volumes never touched): establish with change recording, revertible
    resync, commit, withdraw; fastfc against the NumPy engine."""

    def __init__(self, quick: bool, n: int = 1 << 20, track: int = TRACK_4K) -> None:
        self.S = Volume(n, track, name="S")
        self.T = Volume(n, track, name="T")
        self.nS, self.nT = _np_twin(self.S), _np_twin(self.T)
        self.baselines = {"pure-NumPy engine": self._numpy}
        self.last = None

    def fastfc(self) -> None:
        fc = FlashCopy(self.S, self.T, background_copy=False, record=True)
        fc.resync(revertible=True)
        fc.commit()
        fc.withdraw(force=True)
        self.last = fc

    def _numpy(self) -> None:
        fc = NpFlashCopy(self.nS, self.nT, record=True)
        fc.resync(revertible=True)
        fc.commit()
        fc.withdraw()

    def check(self) -> None:
        assert self.last.state is FlashCopyState.WITHDRAWN and not self.S.write_inhibited

    def info(self) -> dict:
        return {"tracks": self.S.n_tracks}

    def close(self) -> None:
        self.S.close()
        self.T.close()


class EngineCount(Bench):
    """``tracks_to_copy`` of a relationship on 2^20 tracks, half of them
    copied at random (100 calls per timed call): fastfc (popcount over bit
    words) against the NumPy engine (``np.count_nonzero`` over a bool array)."""

    def __init__(self, quick: bool, n: int = 1 << 20, track: int = TRACK_4K) -> None:
        self.S = Volume(n, track, name="S")
        self.T = Volume(n, track, name="T")
        self.fc = FlashCopy(self.S, self.T, background_copy=False)
        self.nS, self.nT = _np_twin(self.S), _np_twin(self.T)
        self.nfc = NpFlashCopy(self.nS, self.nT)
        bools = np.random.default_rng(18).integers(0, 2, n).astype(bool)
        self.nfc.to_copy[:] = bools
        self.fc.to_copy._raw_words()[:] = np.packbits(bools, bitorder="little").view(np.uint64)
        self.expected = int(bools.sum())
        self.ops = 100
        fc, nfc = self.fc, self.nfc
        self.fastfc = lambda: [fc.tracks_to_copy for _ in range(100)]
        self.baselines = {"pure-NumPy engine": lambda: [nfc.tracks_to_copy for _ in range(100)]}

    def check(self) -> None:
        assert self.fc.tracks_to_copy == self.nfc.tracks_to_copy == self.expected

    def close(self) -> None:
        self.fc.withdraw(force=True)
        self.S.close()
        self.T.close()


class EngineGM(Bench):
    """One Global Mirror consistency group (coordinate, drain, prepare and
    commit every B -> C) of ``triplets`` triplets of 16 MiB in 4 KiB tracks,
    after (untimed) 4 KiB writes to ``fraction`` of each A's tracks: fastfc's
    ``GlobalMirror.form_consistency_group`` against the NumPy engine's
    ``form_cg``, each on its own volumes."""

    def __init__(self, quick: bool, triplets: int = 16, capacity: int = 16 * MiB,
                 fraction: float = 0.01, track: int = TRACK_4K) -> None:
        n = capacity // track

        def vols(tag):
            out = []
            for i in range(triplets):
                v = Volume(n, track, name=f"{tag}{i}")
                touch(v._raw_array())
                out.append(v)
            return out
        self.A, self.B, self.C = vols("A"), vols("B"), vols("C")
        self.nA = [NpVolume(n, track, name=f"nA{i}") for i in range(triplets)]
        self.nB = [NpVolume(n, track, name=f"nB{i}") for i in range(triplets)]
        self.nC = [NpVolume(n, track, name=f"nC{i}") for i in range(triplets)]
        for v in (*self.nA, *self.nB, *self.nC):
            touch(v.array)
        self.gm = GlobalMirror(list(zip(self.A, self.B, self.C)), initial_copy=False)
        self.ngm = NpGlobalMirror(list(zip(self.nA, self.nB, self.nC)))
        rng = np.random.default_rng(19)
        k = max(1, int(n * fraction))
        self.offsets = [np.sort(rng.choice(n, k, replace=False)) * track for _ in range(triplets)]
        self.rows = np.random.default_rng(20).integers(0, 256, (k, 4096), np.uint8)
        self.result = None
        self.baselines = {"pure-NumPy engine": self.ngm.form_cg}

    def before(self, role: str) -> None:
        self.rows[:, :8] += 1
        if role == "fastfc":
            for a, offs in zip(self.A, self.offsets):
                a.write_batch(offs, self.rows)
        else:
            for a, offs in zip(self.nA, self.offsets):
                for o, row in zip(offs.tolist(), self.rows):
                    a.write(o, row)

    def fastfc(self) -> None:
        self.result = self.gm.form_consistency_group()

    def check(self) -> None:
        assert self.result.committed, self.result
        for a, b in zip(self.A, self.B):
            assert np.array_equal(a._raw_array(), b._raw_array())
        for a, b in zip(self.nA, self.nB):
            assert np.array_equal(a._raw_array(), b._raw_array())

    def info(self) -> dict:
        return {"triplets": len(self.A), "tracks_per_volume": self.A[0].n_tracks,
                "changed_tracks_per_volume": int(self.offsets[0].size)}

    def close(self) -> None:
        self.gm.close()
        self.ngm.close()
        for v in (*self.A, *self.B, *self.C):
            v.close()


ENGINE_TARGET = 20.0
_vs_numpy = "the pure-NumPy engine (benches/engine_numpy.py)"

ENGINE_CASES: list[Case] = [
    _case(name="engine_bg_copy_4k",
          figure="vs NumPy engine: background copy, 256 MiB of 4 KiB tracks",
          make=lambda quick: EngineCopy(quick), target=ENGINE_TARGET,
          baseline_desc=_vs_numpy, rounds=7, quick_rounds=3),
    _case(name="engine_incr_copy_4k",
          figure="vs NumPy engine: resync + incremental copy of 10% scattered 4 KiB tracks (256 MiB)",
          make=lambda quick: EngineCopy(quick, fraction=0.10), target=ENGINE_TARGET,
          baseline_desc=_vs_numpy, rounds=9, quick_rounds=3),
    _case(name="engine_write_cow_4k",
          figure="vs NumPy engine: 4 KiB write, copy-on-write of a 4 KiB track to 3 targets",
          make=lambda quick: EngineWrite(quick, cow=True), target=ENGINE_TARGET,
          baseline_desc=_vs_numpy, rounds=11, quick_rounds=3, warmup=1),
    _case(name="engine_write_copied_4k",
          figure="vs NumPy engine: 4 KiB write, 3 targets, tracks already copied",
          make=lambda quick: EngineWrite(quick, cow=False), target=ENGINE_TARGET,
          baseline_desc=_vs_numpy, rounds=11, quick_rounds=3, warmup=1),
    _case(name="engine_read_redirect_4k",
          figure="vs NumPy engine: 64 KiB read of a NOCOPY target, half from the source",
          make=lambda quick: EngineRead(quick), target=ENGINE_TARGET,
          baseline_desc=_vs_numpy, rounds=11, quick_rounds=3),
    _case(name="engine_cycle_2p20",
          figure="vs NumPy engine: establish + revertible resync + commit + withdraw, 2^20 tracks",
          make=lambda quick: EngineCycle(quick), target=ENGINE_TARGET,
          baseline_desc=_vs_numpy, rounds=15, quick_rounds=5, warmup=2),
    _case(name="engine_count_2p20",
          figure="vs NumPy engine: tracks_to_copy of 2^20 tracks, 100 calls",
          make=lambda quick: EngineCount(quick), target=ENGINE_TARGET,
          baseline_desc=_vs_numpy, rounds=15, quick_rounds=5, warmup=2),
    _case(name="engine_gm_cg_4k",
          figure="vs NumPy engine: one Global Mirror CG, 16 triplets x 16 MiB, 1% of 4 KiB tracks changed",
          make=lambda quick: EngineGM(quick), target=ENGINE_TARGET,
          baseline_desc=_vs_numpy, rounds=11, quick_rounds=3, warmup=1),
]


# --------------------------------------------------------------------------
# fastfc against numba kernels
# --------------------------------------------------------------------------

def _numba_copy():
    from benches import numba_copy
    numba_copy.warm_up()
    return numba_copy


class NumbaCopyRuns(Bench):
    """Copy the set tracks of a bitmap from S to T (256 MiB of 4 KiB tracks):
    every track (one run), or ``fraction`` of them at random (short runs).
    fastfc's ``FlashCopy.copy()`` (the bits set directly, untimed) against
    :func:`numba_copy.copy_set_runs` over the same arrays and a copy of the
    same bit pattern."""

    def __init__(self, quick: bool, fraction: float | None, capacity: int = 256 * MiB,
                 track: int = TRACK_4K) -> None:
        self.nc = _numba_copy()
        n = capacity // track
        self.S = Volume(n, track, name="S")
        self.T = Volume(n, track, name="T")
        fill_random(self.S._raw_array(), seed=21)
        touch(self.T._raw_array())
        self.fc = FlashCopy(self.S, self.T, background_copy=False, persistent=True)
        if fraction is None:
            bools = np.ones(n, bool)
        else:
            bools = np.zeros(n, bool)
            bools[np.random.default_rng(22).choice(n, int(n * fraction), replace=False)] = True
        self.pattern = np.packbits(bools, bitorder="little").view(np.uint64).copy()
        self.words = self.pattern.copy()
        self.n, self.shift = n, track.bit_length() - 1
        self.nbytes = int(bools.sum()) * track
        self.baselines = {"numba copy_set_runs": self._numba}

    def before(self, role: str) -> None:
        self.T._raw_array()[::self.S.track_size] ^= 0xFF
        if role == "fastfc":
            self.fc.to_copy._raw_words()[:] = self.pattern
        else:
            self.words[:] = self.pattern

    def fastfc(self) -> None:
        self.fc.copy()

    def _numba(self) -> None:
        self.nc.copy_set_runs(self.T._raw_array(), self.S._raw_array(), self.words, self.n, self.shift)

    def check(self) -> None:
        assert self.fc.tracks_to_copy == 0
        sel = np.unpackbits(self.pattern.view(np.uint8), bitorder="little")[:self.n].astype(bool)
        t = self.S.track_size
        S, T = self.S._raw_array().reshape(-1, t), self.T._raw_array().reshape(-1, t)
        idx = np.flatnonzero(sel)[::max(1, int(sel.sum()) // 256)]
        assert np.array_equal(S[idx], T[idx])

    def close(self) -> None:
        self.fc.withdraw(force=True)
        self.S.close()
        self.T.close()


class NumbaCow(Bench):
    """4 KiB host writes to fresh 64 KiB tracks of a 1 GiB source with 3
    NOCOPY targets, so every write copies its old 4 KiB grain to 3 targets
    first (numba's kernels are given the same grain as their unit):
    ``batch=True`` fastfc's ``Volume.write_batch`` against
    :func:`numba_copy.cow_write_batch` (kernel against kernel, one call per
    batch); ``batch=False`` one call per write on both sides."""

    def __init__(self, quick: bool, batch: bool, n_targets: int = 3,
                 capacity: int = GiB // 4, track: int = 64 * KiB) -> None:
        self.nc = _numba_copy()
        n = capacity // track
        self.batch = batch
        self.S, self.Ts = source_and_targets(n, track, n_targets, seed=23)
        self.fcs: list[FlashCopy] = []
        self.ops = 256
        rng = np.random.default_rng(24)
        perm = rng.permutation(n)
        within = rng.integers(0, track // 4096, n) * 4096
        self.batches = [np.ascontiguousarray(perm[i:i + self.ops] * track + within[i:i + self.ops])
                        for i in range(0, n - self.ops + 1, self.ops)]
        self.k = 0
        self.offs = self.batches[0]
        self.data = np.random.default_rng(25).integers(0, 256, (self.ops, 4096), np.uint8)
        self.targets = np.array([T._raw_array().ctypes.data for T in self.Ts], np.int64)
        grains = self.S.n_grains
        self.to_copy = np.zeros((n_targets, -(-grains // 64)), np.uint64)
        self.shift = self.S.grain_shift
        self.baselines = {"numba cow_write" + ("_batch" if batch else ""): self._numba}

    def before(self, role: str) -> None:
        self.k += 1
        self.offs = self.batches[self.k % len(self.batches)]
        if role == "fastfc":
            for fc in self.fcs:
                fc.withdraw(force=True)
            self.fcs = [FlashCopy(self.S, T, background_copy=False) for T in self.Ts]
        else:
            self.to_copy[:] = np.uint64(0xFFFFFFFFFFFFFFFF)

    def fastfc(self) -> None:
        if self.batch:
            self.S.write_batch(self.offs, self.data)
        else:
            w, data = self.S.write, self.data
            for i, o in enumerate(self.offs.tolist()):
                w(o, data[i])

    def _numba(self) -> None:
        nc, S, tg, tc, sh = self.nc, self.S._raw_array(), self.targets, self.to_copy, self.shift
        if self.batch:
            nc.cow_write_batch(S, tg, tc, self.offs, self.data, sh)
        else:
            cw, data = nc.cow_write, self.data
            for i, o in enumerate(self.offs.tolist()):
                cw(S, tg, tc, o, data[i], sh)

    def check(self) -> None:
        # one grain of each written track copied: every track still owed in part
        assert all(fc.to_copy.count() == self.S.n_grains - self.ops for fc in self.fcs)
        o = int(self.offs[-1])
        assert np.array_equal(self.S.read(o, 4096), self.data[-1])

    def info(self) -> dict:
        return {"writes_per_call": self.ops, "targets": len(self.Ts)}

    def close(self) -> None:
        for fc in self.fcs:
            fc.withdraw(force=True)
        for v in (self.S, *self.Ts):
            v.close()


NUMBA_TARGET = 1.0

NUMBA_CASES: list[Case] = [
    _case(name="numba_copy_runs_all",
          figure="vs numba: copy runs, every track of 256 MiB (4 KiB tracks)",
          make=lambda quick: NumbaCopyRuns(quick, None), target=NUMBA_TARGET,
          baseline_desc="numba copy_set_runs (libc memcpy per run)", rounds=11, quick_rounds=3),
    _case(name="numba_copy_runs_10pct",
          figure="vs numba: copy runs, 10% random 4 KiB tracks of 256 MiB",
          make=lambda quick: NumbaCopyRuns(quick, 0.10), target=NUMBA_TARGET,
          baseline_desc="numba copy_set_runs (libc memcpy per run)", rounds=15, quick_rounds=5),
    _case(name="numba_cow_batch",
          figure="vs numba: copy-on-write, batch of 256 4 KiB writes, 4 KiB grains of 64 KiB tracks to 3 targets",
          make=lambda quick: NumbaCow(quick, batch=True), target=NUMBA_TARGET,
          baseline_desc="numba cow_write_batch", rounds=21, quick_rounds=5, warmup=2),
    _case(name="numba_cow_per_call",
          figure="vs numba: copy-on-write, one call per 4 KiB write, 4 KiB grains of 64 KiB tracks to 3 targets",
          make=lambda quick: NumbaCow(quick, batch=False), target=NUMBA_TARGET,
          baseline_desc="numba cow_write", rounds=21, quick_rounds=5, warmup=2),
]


# --------------------------------------------------------------------------
# The physical limit: np.copyto / memcpy on one and two threads
# --------------------------------------------------------------------------

_libc = ctypes.CDLL(None)
_libc.memcpy.restype = ctypes.c_void_p
_libc.memcpy.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_size_t]


def _threads(fns: list[Callable[[], object]]) -> None:
    ts = [threading.Thread(target=f) for f in fns]
    for t in ts:
        t.start()
    for t in ts:
        t.join()


class TwoThreadCopy(Bench):
    """1 GiB copied on two threads: two COPY-mode FlashCopy relationships of
    512 MiB each (two worker threads) against ``np.copyto`` and libc
    ``memcpy`` of the same bytes on two threads and on one."""

    def __init__(self, quick: bool, capacity: int = GiB, track: int = 64 * KiB) -> None:
        half = capacity // 2 // track
        self.pairs = []
        for i in range(2):
            S, T = Volume(half, track, name=f"S{i}"), Volume(half, track, name=f"T{i}")
            fill_random(S._raw_array(), seed=30 + i)
            touch(T._raw_array())
            self.pairs.append((S, T))
        self.fcs: list[FlashCopy] = []
        self.nbytes = capacity
        (S0, T0), (S1, T1) = self.pairs
        a0, b0, a1, b1 = S0._raw_array(), T0._raw_array(), S1._raw_array(), T1._raw_array()

        def mc(dst, src):
            return lambda: _libc.memcpy(dst.ctypes.data, src.ctypes.data, dst.nbytes)
        self.baselines = {
            "np.copyto, 2 threads": lambda: _threads([lambda: np.copyto(b0, a0),
                                                      lambda: np.copyto(b1, a1)]),
            "memcpy, 2 threads": lambda: _threads([mc(b0, a0), mc(b1, a1)]),
            "np.copyto, 1 thread": lambda: (np.copyto(b0, a0), np.copyto(b1, a1)),
            "memcpy, 1 thread": lambda: (mc(b0, a0)(), mc(b1, a1)()),
        }

    def before(self, role: str) -> None:
        for fc in self.fcs:
            wait_withdrawn(fc)
        self.fcs = []
        for _, T in self.pairs:
            T._raw_array()[::PAGE * 16] ^= 0xFF

    def fastfc(self) -> None:
        self.fcs = [FlashCopy(S, T) for S, T in self.pairs]
        for fc in self.fcs:
            fc.wait()

    def check(self) -> None:
        for fc in self.fcs:
            wait_withdrawn(fc)
        for S, T in self.pairs:
            assert np.array_equal(S._raw_array(), T._raw_array())

    def close(self) -> None:
        for fc in self.fcs:
            if fc.state is not FlashCopyState.WITHDRAWN:
                fc.withdraw(force=True)
        for S, T in self.pairs:
            S.close()
            T.close()


PHYSICAL_CASES: list[Case] = [
    _case(name="physical_2threads",
          figure="background copy 1 GiB (quick: 256 MiB) on two worker threads (2 relationships)",
          make=lambda quick: TwoThreadCopy(quick, capacity=GiB // 4 if quick else GiB),
          target=0.0,
          baseline_desc="fastest of np.copyto / memcpy on two threads and on one",
          rounds=9, quick_rounds=3),
]
