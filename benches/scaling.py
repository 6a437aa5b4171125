"""Scaling curves: how the cost of fastfc's operations grows with
volume size, track size, number of targets, number of Global Mirror
triplets and the fraction of changed tracks, next to the pure-NumPy engine
(and ``np.copyto`` where bytes move), each curve labelled with the expected
complexity.

Every point is the median of a few interleaved rounds of fastfc and its
baselines measured at that point (:func:`interleaved`). :func:`run` returns
the curves as plain data (for the JSON); :func:`summary` fits the log-log
slope of each fastfc curve over its upper points and compares it with the
expected one; :func:`plot` draws them.
"""

from __future__ import annotations

import gc
import math
import os
import statistics
import threading
import time
from typing import Callable

import numpy as np

from benches.cases import KiB, MiB, each_offset, fill_random, source_and_targets, touch
from benches.engine_numpy import NpFlashCopy, NpGlobalMirror, NpVolume
import fastfc
from fastfc import FlashCopy, FlashCopyState, GlobalMirror, StorageUnit, Volume
from fastfc._optional import require


def interleaved(fns: dict[str, Callable[[], object]], rounds: int,
                before: Callable[[str], None] | None = None, warmup: int = 1) -> dict[str, float]:
    """Median seconds per call of each function, rounds interleaved (ABBA)."""
    samples: dict[str, list[float]] = {k: [] for k in fns}
    names = list(fns)
    gc.collect()
    was = gc.isenabled()
    gc.disable()
    try:
        for i in range(warmup + rounds):
            for k in (names if i % 2 == 0 else names[::-1]):
                if before is not None:
                    before(k)
                t0 = time.perf_counter_ns()
                fns[k]()
                if i >= warmup:
                    samples[k].append((time.perf_counter_ns() - t0) * 1e-9)
    finally:
        if was:
            gc.enable()
    return {k: statistics.median(v) for k, v in samples.items()}


def _twin(v: Volume) -> NpVolume:
    return NpVolume(v.n_tracks, v.track_size, array=v._raw_array())


def _curve(title: str, xlabel: str, x: list, series: dict[str, list[float]],
           expected: dict[str, tuple], unit: str = "s", fit_from: int = -3) -> dict:
    """``expected``: series label -> (complexity text, expected log-log
    slope) or (text, lowest, highest slope) where a fixed cost hides part of
    the growth at these sizes."""
    return {"title": title, "xlabel": xlabel, "x": x, "series": series,
            "expected": expected, "unit": unit, "fit_from": fit_from}


# --------------------------------------------------------------------------
# The curves
# --------------------------------------------------------------------------

META_TRACK = 512   # volumes of up to 2^24 tracks, never touched: np.zeros is lazy


def volume_size_metadata(quick: bool, log=print) -> dict:
    """Establish, revertible resync, commit, tracks_to_copy and a 4 KiB
    copy-on-write write against the number of tracks (512 B tracks, volumes
    untouched)."""
    exps = [10, 14, 18, 22, 24] if quick else [10, 12, 14, 16, 18, 20, 22, 24]
    rounds = 5 if quick else 11
    keys = ["fastfc establish", "NumPy establish", "fastfc revertible resync",
            "NumPy revertible resync", "fastfc commit", "fastfc tracks_to_copy",
            "NumPy tracks_to_copy", "fastfc 4 KiB write, copy-on-write"]
    series: dict[str, list[float]] = {k: [] for k in keys}
    data = np.ones(4096, np.uint8)
    scratch = np.ones(16 * MiB // 8, np.uint64)
    for e in exps:
        n = 1 << e
        log(f"    volume size: 2^{e} tracks")
        S, T = Volume(n, META_TRACK, name="S"), Volume(n, META_TRACK, name="T")
        nS, nT = _twin(S), _twin(T)
        st: dict = {}
        rng = np.random.default_rng(e)
        offs = (rng.permutation(n // 8)[:16] * 4096).tolist()

        def f_establish():
            st["fc"] = FlashCopy(S, T, background_copy=False, record=True)

        def n_establish():
            st["nfc"] = NpFlashCopy(nS, nT, record=True)

        def before(k):
            if k == "fastfc establish" and "fc" in st:
                st.pop("fc").withdraw(force=True)
            if k == "NumPy establish" and "nfc" in st:
                st.pop("nfc").withdraw()
        m = interleaved({"fastfc establish": f_establish, "NumPy establish": n_establish},
                        rounds, before)
        fc, nfc = st["fc"], st["nfc"]

        def before2(k):
            if k == "fastfc revertible resync" and fc.revertible:
                fc.revert()
            if k == "NumPy revertible resync" and nfc.revertible:
                nfc.revert()
            if k == "fastfc commit" and not fc.revertible:
                fc.resync(revertible=True)
            # every call starts with equally cold caches, whatever the size
            # (a resync at 2^24 tracks sweeps 8 MiB of bitmaps out of them)
            scratch.sum()
        m.update(interleaved({
            "fastfc revertible resync": lambda: fc.resync(revertible=True),
            "NumPy revertible resync": lambda: nfc.resync(revertible=True),
            "fastfc commit": fc.commit}, rounds, before2))
        if fc.revertible:
            fc.revert()
        if nfc.revertible:
            nfc.revert()
        m.update(interleaved({"fastfc tracks_to_copy": lambda: fc.tracks_to_copy,
                              "NumPy tracks_to_copy": lambda: nfc.tracks_to_copy}, rounds))
        fc.withdraw(force=True)
        nfc.withdraw()

        def before3(k):
            if "w" in st:
                st.pop("w").withdraw(force=True)
            st["w"] = FlashCopy(S, T, background_copy=False)

        t = interleaved({"w": lambda: each_offset(S.write, offs, data)}, rounds,
                        before3)["w"] / len(offs)
        st.pop("w").withdraw(force=True)
        m["fastfc 4 KiB write, copy-on-write"] = t
        for k in keys:
            series[k].append(m[k])
        S.close()
        T.close()
    return _curve("Volume size: metadata operations (512 B tracks)", "tracks",
                  [1 << e for e in exps], series, fit_from=-2 if quick else -3, expected={
                      "fastfc establish": ("O(n/64) words", 1.0),
                      "NumPy establish": ("O(n) bools", 1.0),
                      "fastfc revertible resync": ("O(n/64) words", 1.0),
                      "NumPy revertible resync": ("O(n) bools", 1.0),
                      "fastfc commit": ("O(1)", 0.0),
                      "fastfc tracks_to_copy": ("O(n/64) words", 1.0),
                      "NumPy tracks_to_copy": ("O(n) bools", 1.0),
                      "fastfc 4 KiB write, copy-on-write": ("O(1)", 0.0)})


def volume_size_copy(quick: bool, log=print) -> dict:
    """Background copy of every track against the number of 4 KiB tracks."""
    exps = [10, 13, 16] if quick else [10, 12, 14, 16, 18]
    rounds = 3 if quick else 5
    series: dict[str, list[float]] = {"fastfc copy()": [], "NumPy engine copy()": [],
                                      "np.copyto": []}
    for e in exps:
        n = 1 << e
        log(f"    copy: 2^{e} tracks of 4 KiB")
        S, T = Volume(n, 4096, name="S"), Volume(n, 4096, name="T")
        fill_random(S._raw_array(), seed=e)
        touch(T._raw_array())
        nS, nT = _twin(S), _twin(T)
        st: dict = {}

        def before(k):
            T._raw_array()[::4096] ^= 0xFF
            if k == "fastfc copy()":
                if "fc" in st and st["fc"].state is not FlashCopyState.WITHDRAWN:
                    st["fc"].withdraw(force=True)
                st["fc"] = FlashCopy(S, T, background_copy=False)
            elif k == "NumPy engine copy()":
                if "nfc" in st:
                    st["nfc"].withdraw()
                st["nfc"] = NpFlashCopy(nS, nT)
        m = interleaved({"fastfc copy()": lambda: st["fc"].copy(),
                         "NumPy engine copy()": lambda: st["nfc"].copy(),
                         "np.copyto": lambda: np.copyto(T._raw_array(), S._raw_array())}, rounds, before)
        for k in series:
            series[k].append(m[k])
        S.close()
        T.close()
    return _curve("Volume size: background copy (4 KiB tracks)", "tracks",
                  [1 << e for e in exps], series, {
                      "fastfc copy()": ("O(n x track)", 1.0),
                      "NumPy engine copy()": ("O(n x track)", 1.0),
                      "np.copyto": ("O(bytes)", 1.0)})


def track_size(quick: bool, log=print) -> dict:
    """Background copy of a fixed capacity, and one 4 KiB write that copies
    one track on write, against the track size (4 KiB .. 1 MiB)."""
    capacity = 64 * MiB if quick else 256 * MiB
    sizes = [4 * KiB, 64 * KiB, 1024 * KiB] if quick else \
        [4 * KiB, 16 * KiB, 64 * KiB, 256 * KiB, 1024 * KiB]
    rounds = 3 if quick else 5
    keys = ["fastfc copy()", "NumPy engine copy()", "np.copyto",
            "fastfc 4 KiB write, copy-on-write", "NumPy 4 KiB write, copy-on-write"]
    series: dict[str, list[float]] = {k: [] for k in keys}
    data = np.ones(4096, np.uint8)
    for ts in sizes:
        log(f"    track size {ts // KiB} KiB")
        n = capacity // ts
        S, T = Volume(n, ts, name="S"), Volume(n, ts, name="T")
        fill_random(S._raw_array(), seed=ts)
        touch(T._raw_array())
        nS, nT = _twin(S), _twin(T)
        st: dict = {}

        def drop():
            if "fc" in st and st["fc"].state is not FlashCopyState.WITHDRAWN:
                st["fc"].withdraw(force=True)
            if "nfc" in st:
                st.pop("nfc").withdraw()

        def before(k):
            T._raw_array()[::4096] ^= 0xFF
            drop()
            if k.startswith("fastfc"):
                st["fc"] = FlashCopy(S, T, background_copy=False)
            elif k.startswith("NumPy"):
                st["nfc"] = NpFlashCopy(nS, nT)
        m = interleaved({"fastfc copy()": lambda: st["fc"].copy(),
                         "NumPy engine copy()": lambda: st["nfc"].copy(),
                         "np.copyto": lambda: np.copyto(T._raw_array(), S._raw_array())}, rounds, before)
        k_w = min(64, n)
        offs = (np.random.default_rng(ts).permutation(n)[:k_w] * ts).tolist()

        def fw():
            each_offset(S.write, offs, data)

        def nw():
            each_offset(nS.write, offs, data)
        w = interleaved({"fastfc 4 KiB write, copy-on-write": fw,
                         "NumPy 4 KiB write, copy-on-write": nw}, rounds * 2, before)
        m.update({k: v / k_w for k, v in w.items()})
        drop()
        for k in keys:
            series[k].append(m[k])
        S.close()
        T.close()
    return _curve(f"Track size ({capacity // MiB} MiB volume)", "track size (bytes)", sizes,
                  series, {
                      "fastfc copy()": ("O(capacity): flat", 0.0),
                      "NumPy engine copy()": ("O(tracks) overhead + O(capacity)", -1.0, 0.0),
                      "np.copyto": ("O(capacity): flat", 0.0),
                      "fastfc 4 KiB write, copy-on-write": ("O(track)", 1.0),
                      "NumPy 4 KiB write, copy-on-write": ("O(track)", 1.0)}, fit_from=-2)


def targets(quick: bool, log=print) -> dict:
    """A 4 KiB write that copies its 64 KiB track to k targets on write, and
    one that finds every target already copied, against k = 1..12."""
    ks = [1, 4, 12] if quick else [1, 2, 4, 8, 12]
    rounds = 5 if quick else 11
    n, ts = 1024, 64 * KiB         # 64 MiB volumes
    S, Ts = source_and_targets(n, ts, max(ks), seed=5)
    nS, nTs = _twin(S), [_twin(T) for T in Ts]
    data = np.ones(4096, np.uint8)
    offs = (np.random.default_rng(1).permutation(n)[:128] * ts).tolist()
    keys = ["fastfc write, copy-on-write", "NumPy write, copy-on-write",
            "fastfc write, targets copied", "NumPy write, targets copied"]
    series: dict[str, list[float]] = {k: [] for k in keys}
    for k in ks:
        log(f"    {k} targets")
        st: dict = {"fc": [], "nfc": []}

        def drop():
            for fc in st["fc"]:
                fc.withdraw(force=True)
            for fc in st["nfc"]:
                fc.withdraw()
            st["fc"], st["nfc"] = [], []

        def before(name):
            drop()
            if name.startswith("fastfc"):
                st["fc"] = [FlashCopy(S, T, background_copy=False, persistent=True)
                            for T in Ts[:k]]
                if "copied" in name:
                    for fc in st["fc"]:
                        fc.copy()
            else:
                st["nfc"] = [NpFlashCopy(nS, T) for T in nTs[:k]]
                if "copied" in name:
                    for fc in st["nfc"]:
                        fc.copy()

        def fw():
            each_offset(S.write, offs, data)

        def nw():
            each_offset(nS.write, offs, data)
        m = interleaved({keys[0]: fw, keys[1]: nw, keys[2]: fw, keys[3]: nw}, rounds, before)
        drop()
        for key in keys:
            series[key].append(m[key] / len(offs))
    for v in (S, *Ts):
        v.close()
    return _curve("Number of FlashCopy targets (4 KiB writes, 64 KiB tracks)", "targets", ks,
                  series, {"fastfc write, copy-on-write": ("O(k x track)", 1.0),
                           "NumPy write, copy-on-write": ("O(k x track)", 1.0),
                           "fastfc write, targets copied": ("O(1) call + O(k) bit tests", 0.0, 1.0),
                           "NumPy write, targets copied": ("O(k) bool tests", 1.0)},
                  fit_from=-2)


def gm_triplets(quick: bool, log=print) -> dict:
    """One consistency group (and its coordination hold and FlashCopy
    phase) against the number of triplets (1 MiB volumes, 4 KiB tracks,
    4 tracks of each A changed before each CG, among its first 16, whose
    pages in A, B and C are touched before timing: the curve measures the
    CG, not the kernel giving fresh pages to 12 x 4,096 volumes)."""
    counts = [1, 16, 256, 1024] if quick else [1, 4, 16, 64, 256, 1024, 4096]
    rounds = 5 if quick else 9
    n, ts = 256, 4096
    hot = 16
    keys = ["fastfc CG", "fastfc coordination hold", "fastfc FlashCopy phase",
            "NumPy CG", "NumPy coordination hold", "NumPy FlashCopy phase"]
    series: dict[str, list[float]] = {k: [] for k in keys}
    rows = np.ones((4, 4096), np.uint8)
    for c in counts:
        log(f"    {c} Global Mirror triplets")
        vols = [[Volume(n, ts, name=f"{r}{i}") for r in "ABC"] for i in range(c)]
        gm = GlobalMirror([tuple(t) for t in vols], initial_copy=False)
        nvols = [tuple(NpVolume(n, ts) for _ in range(3)) for _ in range(c)]
        ngm = NpGlobalMirror(nvols)
        for t in vols:
            for v in t:
                touch(v._raw_array()[:hot * ts])
        for t in nvols:
            for v in t:
                touch(v.array[:hot * ts])
        rng = np.random.default_rng(c)

        def before(k):
            rows[:, 0] += 1
            if k == "fastfc":
                for a, _, _ in vols:
                    a.write_batch(rng.choice(hot, 4, replace=False) * ts, rows)
            else:
                for a, _, _ in nvols:
                    for o, r in zip((rng.choice(hot, 4, replace=False) * ts).tolist(), rows):
                        a.write(o, r)
        m = interleaved({"fastfc": gm.form_consistency_group, "NumPy": ngm.form_cg},
                        rounds, before)
        p = gm.stats.phase_percentiles()
        q = ngm.percentiles()
        vals = {"fastfc CG": m["fastfc"], "NumPy CG": m["NumPy"],
                "fastfc coordination hold": p["coordination"]["p50"],
                "fastfc FlashCopy phase": p["flashcopy"]["p50"],
                "NumPy coordination hold": q["coordination"]["p50"],
                "NumPy FlashCopy phase": q["flashcopy"]["p50"]}
        for k in keys:
            series[k].append(vals[k])
        gm.close()
        ngm.close()
        for t in vols:
            for v in t:
                v.close()
    return _curve(f"Global Mirror triplets (1 MiB volumes, 4 of 16 hot tracks changed per CG, "
                  f"{fastfc.copy_threads()} copy threads)",
                  "triplets", counts, series, {
                      "fastfc CG": ("O(triplets)", 1.0),
                      "fastfc coordination hold": ("O(triplets)", 1.0),
                      "fastfc FlashCopy phase": ("O(triplets)", 1.0),
                      "NumPy CG": ("O(triplets)", 1.0),
                      "NumPy coordination hold": ("O(triplets)", 1.0),
                      "NumPy FlashCopy phase": ("O(triplets)", 1.0)})


def changed_fraction(quick: bool, log=print) -> dict:
    """Resync + incremental copy against the fraction of changed tracks
    (4 KiB tracks), with ``np.copyto`` of as many contiguous bytes."""
    capacity = 64 * MiB if quick else 256 * MiB
    fracs = [0.001, 0.01, 0.1, 1.0] if quick else [0.001, 0.003, 0.01, 0.03, 0.1, 0.3, 1.0]
    rounds = 3 if quick else 7
    ts = 4096
    n = capacity // ts
    S, T = Volume(n, ts, name="S"), Volume(n, ts, name="T")
    fill_random(S._raw_array(), seed=3)
    touch(T._raw_array())
    nS, nT = _twin(S), _twin(T)
    fc = FlashCopy(S, T, background_copy=False, record=True)
    fc.copy()
    nfc = NpFlashCopy(nS, nT, record=True)
    nfc.copy()
    keys = ["fastfc resync + copy()", "NumPy engine resync + copy()", "np.copyto (changed bytes)"]
    series: dict[str, list[float]] = {k: [] for k in keys}
    rng = np.random.default_rng(4)
    for f in fracs:
        log(f"    {f:.1%} of the tracks changed")
        k = max(1, int(n * f))
        offs = np.sort(rng.choice(n, k, replace=False)) * ts
        rows = np.zeros((k, 64), np.uint8)

        def before(name):
            rows[:, 0] += 1
            if name.startswith("fastfc"):
                S.write_batch(offs, rows)
            elif name.startswith("NumPy"):
                for o, r in zip(offs.tolist(), rows):
                    nS.write(o, r)
        a, b = S._raw_array()[:k * ts], T._raw_array()[:k * ts]

        def fcopy():
            fc.resync()
            fc.copy()

        def ncopy():
            nfc.resync()
            nfc.copy()
        m = interleaved({keys[0]: fcopy, keys[1]: ncopy, keys[2]: lambda: np.copyto(b, a)},
                        rounds, before)
        for key in keys:
            series[key].append(m[key])
    fc.withdraw()
    S.close()
    T.close()
    return _curve(f"Fraction of changed tracks ({capacity // MiB} MiB, 4 KiB tracks)",
                  "fraction of tracks changed", fracs, series, {
                      "fastfc resync + copy()": ("O(n/64 + changed x track)", 1.0),
                      "NumPy engine resync + copy()": ("O(n + changed x track)", 1.0),
                      "np.copyto (changed bytes)": ("O(changed x track)", 1.0)})


def copy_threads(quick: bool, log=print) -> dict:
    """Background copy of a whole relationship (64 KiB tracks) against its
    size, with 1 and 2 copy threads, next to ``np.copyto`` on one thread and
    on two (each copying half)."""
    sizes = [16 * MiB, 64 * MiB, 256 * MiB] if quick else [64 * MiB, 256 * MiB, 1024 * MiB]
    rounds = 3 if quick else 5
    ts = 64 * KiB
    keys = ["fastfc copy(), 1 copy thread", "fastfc copy(), 2 copy threads",
            "np.copyto", "np.copyto, 2 threads"]
    series: dict[str, list[float]] = {k: [] for k in keys}
    was = fastfc.copy_threads()
    try:
        for size in sizes:
            log(f"    copy threads: {size // MiB} MiB")
            S, T = Volume(size // ts, ts, name="S"), Volume(size // ts, ts, name="T")
            fill_random(S._raw_array(), seed=3)
            touch(T._raw_array())
            src, dst = S._raw_array(), T._raw_array()
            st: dict = {}

            def before(k):
                dst[::4096] ^= 0xFF
                if k.startswith("fastfc"):
                    fastfc.set_copy_threads(1 if "1 copy" in k else 2)
                    if "fc" in st and st["fc"].state is not FlashCopyState.WITHDRAWN:
                        st["fc"].withdraw(force=True)
                    st["fc"] = FlashCopy(S, T, background_copy=False)

            def two():
                h = src.size // 2
                t = threading.Thread(target=np.copyto, args=(dst[:h], src[:h]))
                t.start()
                np.copyto(dst[h:], src[h:])
                t.join()

            fc_copy = lambda: st["fc"].copy()     # noqa: E731
            m = interleaved({keys[0]: fc_copy, keys[1]: fc_copy,
                             "np.copyto": lambda: np.copyto(dst, src),
                             "np.copyto, 2 threads": two}, rounds, before)
            for k in keys:
                series[k].append(m[k])
            S.close()
            T.close()
    finally:
        fastfc.set_copy_threads(was)
    return _curve("Copy threads: background copy of one relationship (64 KiB tracks)", "bytes",
                  sizes, series, {k: ("O(bytes)", 1.0) for k in keys})


def _median_of(fn: Callable[[], float], rounds: int) -> float:
    return statistics.median(_no_gc(fn) for _ in range(rounds))


def _no_gc(fn: Callable[[], float]) -> float:
    """``fn()`` with the cyclic garbage collector off (a collection of the
    objects a previous point left would land in this one's time)."""
    gc.collect()
    was = gc.isenabled()
    gc.disable()
    try:
        return fn()
    finally:
        if was:
            gc.enable()


def unit_open(quick: bool, log=print) -> dict:
    """Opening a storage unit (tmpfs when there is one) against its rows:
    ``10/3 x`` volumes of 4 tracks and ``x`` FlashCopy relationships (up to
    10,000 volumes and 3,000 relationships)."""
    import tempfile
    rels = [100, 300, 1000] if quick else [300, 1000, 3000]
    series: dict[str, list[float]] = {"fastfc open unit": [], "fastfc create relationships": []}
    base = "/dev/shm" if os.path.isdir("/dev/shm") else None
    for r in rels:
        nv = r * 10 // 3
        log(f"    unit with {nv} volumes and {r} relationships")
        with tempfile.TemporaryDirectory(dir=base) as d:
            with StorageUnit(os.path.join(d, "u")) as u:
                vols = [u.create_volume(f"v{i}", 4, 4096) for i in range(nv)]

                def make() -> float:
                    t0 = time.perf_counter()
                    for i in range(r):
                        FlashCopy(vols[2 * i], vols[2 * i + 1], background_copy=False)
                    return time.perf_counter() - t0
                series["fastfc create relationships"].append(_no_gc(make))
                del vols

            def once() -> float:
                t = time.perf_counter()
                StorageUnit(os.path.join(d, "u")).close()
                return time.perf_counter() - t
            series["fastfc open unit"].append(_median_of(once, 3))
    return _curve("Metadata: a unit of 10/3 x volumes and x relationships", "relationships",
                  rels, series, {k: ("O(rows)", 1.0) for k in series})


def session_create(quick: bool, log=print) -> dict:
    """Creating a Global Mirror session against its triplets: over in-memory
    volumes (up to 3,000 triplets), and over the volumes of a storage unit
    (up to 1,000: a unit keeps a file open for every volume and bitmap, and
    a session over 3,000 triplets would need 24,000)."""
    import tempfile
    counts = [100, 300, 1000] if quick else [300, 1000, 3000]
    series: dict[str, list[float]] = {"fastfc session over memory volumes": [],
                                      "fastfc session over unit volumes": []}
    base = "/dev/shm" if os.path.isdir("/dev/shm") else None
    for c in counts:
        log(f"    session over {c} triplets")
        trips = [tuple(Volume(4, 4096) for _ in range(3)) for _ in range(c)]

        def memory() -> float:
            t0 = time.perf_counter()
            gm = GlobalMirror(trips, initial_copy=False)
            dt = time.perf_counter() - t0
            gm.close(discard=True)
            return dt
        series["fastfc session over memory volumes"].append(_median_of(memory, 3))
        cu = c // 3
        with tempfile.TemporaryDirectory(dir=base) as d:
            with StorageUnit(os.path.join(d, "u")) as u:
                vols = [u.create_volume(f"v{i}", 4, 4096) for i in range(3 * cu)]

                def unit() -> float:
                    t0 = time.perf_counter()
                    GlobalMirror([tuple(vols[3 * i:3 * i + 3]) for i in range(cu)],
                                 initial_copy=False)
                    return time.perf_counter() - t0
                series["fastfc session over unit volumes"].append(_no_gc(unit))
    return _curve("Metadata: creating a Global Mirror session (unit volumes: x/3 triplets)",
                  "triplets", counts, series, {k: ("O(triplets)", 1.0) for k in series})


CURVES = {
    "volume_size": volume_size_metadata,
    "volume_size_copy": volume_size_copy,
    "track_size": track_size,
    "targets": targets,
    "gm_triplets": gm_triplets,
    "changed_fraction": changed_fraction,
    "copy_threads": copy_threads,
    "unit_open": unit_open,
    "session_create": session_create,
}


def run(quick: bool, log=print) -> dict[str, dict]:
    out = {}
    for name, fn in CURVES.items():
        t0 = time.perf_counter()
        out[name] = fn(quick, log=log)
        out[name]["seconds"] = time.perf_counter() - t0
        gc.collect()
    return out


def slope(x: list[float], y: list[float]) -> float:
    lx, ly = np.log(np.asarray(x, float)), np.log(np.asarray(y, float))
    return float(np.polyfit(lx, ly, 1)[0])


def summary(curves: dict[str, dict]) -> list[dict]:
    """For every fastfc series: the fitted log-log slope over its upper
    points against the expected one, and fastfc's speed against the NumPy
    engine at the largest point."""
    rows = []
    for cname, c in curves.items():
        x = c["x"]
        for label, ys in c["series"].items():
            if not label.startswith("fastfc"):
                continue
            text, *expect = c["expected"][label]
            rng = _slope_range(*expect)
            lo = c["fit_from"]
            s = slope(x[lo:], ys[lo:])
            twin = next((k for k in c["series"] if k.startswith("NumPy") and
                         _operation(k) == _operation(label)), None)
            vs = c["series"][twin][-1] / ys[-1] if twin else None
            rows.append({"curve": cname, "series": label, "complexity": text,
                         "expected_range": rng, "slope": s,
                         "range": f"{_fmt_x(x[lo])} .. {_fmt_x(x[-1])}",
                         "at_max": ys[-1], "vs_numpy_at_max": vs,
                         "ok": rng[0] <= s <= rng[1]})
    return rows


def _slope_range(lo: float, hi: float | None = None) -> tuple[float, float]:
    """An expected slope with its tolerance: O(1) is -0.2..0.2, O(n) 0.75..1.25."""
    if hi is not None:
        return (lo, hi)
    return (lo - 0.2, lo + 0.2) if lo == 0 else (lo - 0.25, lo + 0.25)


def _fmt_x(v) -> str:
    if isinstance(v, float) and v < 1:
        return f"{v:.1%}"
    v = int(v)
    if v >= 1024 and v & (v - 1) == 0:
        e = v.bit_length() - 1
        return f"2^{e}"
    return str(v)


def _operation(label: str) -> str:
    """The operation a series measures, without the engine's name."""
    return label.split(" ", 1)[1].replace("engine ", "") if " " in label else label


def plot(curves: dict[str, dict], path, title: str = "") -> None:
    """One panel per curve, log-log, expected complexity in each label."""
    matplotlib = require("matplotlib", extra="plot", feature="the scaling plots")
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(curves)
    cols = 2
    rows = math.ceil(len(names) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(15, 5.2 * rows))
    for ax, name in zip(axes.flat, names):
        c = curves[name]
        ops = []
        for label in c["series"]:
            op = _operation(label)
            if op not in ops:
                ops.append(op)
        for label, ys in c["series"].items():
            text = c["expected"][label][0]
            style = "-o" if label.startswith("fastfc") else ("--s" if label.startswith("NumPy")
                                                           else ":^")
            color = f"C{ops.index(_operation(label)) % 10}"
            lo = c["fit_from"]
            fitted = slope(c["x"][lo:], ys[lo:])
            ax.plot(c["x"], ys, style, color=color,
                    label=f"{label}  [{text}; slope {fitted:.2f}]", markersize=4)
        ax.set_xscale("log", base=2 if name != "changed_fraction" else 10)
        if name in ("targets", "gm_triplets", "unit_open", "session_create"):
            ax.set_xticks(c["x"])
            ax.set_xticklabels([str(v) for v in c["x"]])
        ax.set_yscale("log")
        ax.set_title(c["title"], fontsize=10)
        ax.set_xlabel(c["xlabel"])
        ax.set_ylabel("seconds per operation (median)")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=7, loc="best")
    for ax in list(axes.flat)[len(names):]:
        ax.axis("off")
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout(rect=(0, 0, 1, 0.975))
    fig.savefig(path, dpi=90)
    plt.close(fig)
