"""The grain under the track: Global Mirror sessions with 64 KiB tracks
under 4 KiB random writes, with the 4 KiB grain (the default) against a
grain as large as the track (the engine before grains: a 4 KiB write costs
its 64 KiB track, to B and again to C), interleaved in rounds.

Figures per configuration (16, 1,024 and 4,096 triplets in memory; 16 on
storage units on the disk): CGs per second, RPO p99, writers' pace, bytes
copied into B and C per host byte (the volumes' counters) and, on the disk,
bytes written to the disk per host byte (the block device's sectors written
from the run's start to the end of an ``os.sync()`` after it, and this
process's ``write_bytes``). And the bitmap summaries: finding the next set
bit of a TiB volume's bitmap of 4 KiB grains (2^28 bits), with the summary
against a scan of the words. And an idle CG (:func:`idle_cg`): the cost of
a CG attempt with nothing written, or a few triplets written, at 4,096
triplets against 16, as the session runs (only what changed is visited)
and with every triplet stepped.

``python -m benches grain`` runs it (``--quick``: smaller).
"""

from __future__ import annotations

import gc
import os
import shutil
import statistics
import tempfile
import time

import numpy as np
from pathlib import Path

from fastfc import GlobalMirror, StorageUnit, TrackBitmap, Volume
from fastfc.tools.testing import run_under_writers

from benches.durable_steady import block_device, proc_write_bytes, sectors_written
from benches.gm import close_triplets, copy_counts, make_triplets

TRACK = 65536
GRAINS = (4096, TRACK)     # the grain, and the baseline: a grain of the track


def _session(trips, seconds: float, rate: float) -> dict:
    """Figures of a session over ``trips`` (B equal to A at the start)."""
    gm = GlobalMirror(trips, cg_interval=0.0, initial_copy=False)
    try:
        before = copy_counts(gm)
        writers, elapsed = run_under_writers(gm, [t[0] for t in trips], seconds, threads=2,
                                             seed=5, io_size=4096, pace=rate)
        after = copy_counts(gm)
        st = gm.stats
        ph = st.phase_percentiles()
        host = writers.bytes
        return {"cgs_per_s": st.successes / elapsed, "rpo_p99_ms": ph["rpo"]["p99"] * 1e3,
                "pace": host / elapsed / rate, "host_bytes": host, "elapsed_s": elapsed,
                "copied_per_host_byte": ((after[1] - before[1]) / max(after[0] - before[0], 1)
                                         if before and after else None)}
    finally:
        gm.close(discard=True)


def memory(triplets: int, size_mib: int, seconds: float, rate_mbs: float, rounds: int,
           log=print) -> dict:
    """Both grains in memory, interleaved; the median of each figure."""
    runs: dict[int, list[dict]] = {g: [] for g in GRAINS}
    for r in range(rounds):
        for g in (GRAINS if r % 2 == 0 else GRAINS[::-1]):
            trips = make_triplets(triplets, size_mib, TRACK, g)
            for a, b, _ in trips:
                b._raw_array()[:] = a._raw_array()
            out = _session(trips, seconds, rate_mbs * 1e6)
            close_triplets(trips)
            del trips
            gc.collect()
            runs[g].append(out)
            log(f"    {triplets} x {size_mib} MiB, grain {g // 1024} KiB: "
                f"{out['cgs_per_s']:.0f} CG/s, RPO p99 {out['rpo_p99_ms']:.1f} ms, "
                f"{out['copied_per_host_byte']:.2f} bytes copied per host byte")
    return {"config": {"triplets": triplets, "size_mib": size_mib, "seconds": seconds,
                       "rate_mbs": rate_mbs, "rounds": rounds, "track": TRACK},
            "runs": {str(g): v for g, v in runs.items()},
            "median": {str(g): _medians(v) for g, v in runs.items()}}


def _medians(runs: list[dict]) -> dict:
    return {k: statistics.median(r[k] for r in runs) for k in runs[0]
            if all(r.get(k) is not None for r in runs)}


def disk(root: Path, triplets: int, size_mib: int, seconds: float, rate_mbs: float,
         rounds: int, log=print) -> dict:
    """Both grains on storage units in ``root`` (A in one unit, B and C in
    another, durability "process"), every volume written whole and synced
    first, interleaved; bytes to the disk per host byte."""
    root.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="fastfc-grain-", dir=root))
    dev = block_device(work)
    runs: dict[int, list[dict]] = {g: [] for g in GRAINS}
    n_tracks = size_mib * 2**20 // TRACK
    try:
        for g in GRAINS:
            with StorageUnit(work / f"a{g}") as a, StorageUnit(work / f"s{g}") as s:
                for i in range(triplets):
                    for unit, name in ((a, f"A{i}"), (s, f"B{i}"), (s, f"C{i}")):
                        unit.create_volume(name, n_tracks, TRACK, grain_size=g)._raw_array()[:] = 0
        for r in range(rounds):
            for g in (GRAINS if r % 2 == 0 else GRAINS[::-1]):
                os.sync()
                a = StorageUnit(work / f"a{g}", durability="process")
                s = StorageUnit(work / f"s{g}", durability="process")
                try:
                    trips = [(a.volume(f"A{i}"), s.volume(f"B{i}"), s.volume(f"C{i}"))
                             for i in range(triplets)]
                    s0, p0 = sectors_written(dev), proc_write_bytes()
                    out = _session(trips, seconds, rate_mbs * 1e6)
                    p1 = proc_write_bytes()
                    os.sync()
                    s1 = sectors_written(dev)
                finally:
                    a.close()
                    s.close()
                host = max(out["host_bytes"], 1)
                if s0 is not None and s1 is not None:
                    out["disk_per_host_byte"] = (s1 - s0) * 512 / host
                if p0 is not None and p1 is not None:
                    out["proc_per_host_byte"] = (p1 - p0) / host
                runs[g].append(out)
                log(f"    disk units {triplets} x {size_mib} MiB, grain {g // 1024} KiB: "
                    f"{out['cgs_per_s']:.0f} CG/s, RPO p99 {out['rpo_p99_ms']:.1f} ms, "
                    f"{out.get('disk_per_host_byte', float('nan')):.2f} bytes to the disk "
                    "per host byte")
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return {"config": {"triplets": triplets, "size_mib": size_mib, "seconds": seconds,
                       "rate_mbs": rate_mbs, "rounds": rounds, "track": TRACK,
                       "device": dev, "dir": str(work)},
            "runs": {str(g): v for g, v in runs.items()},
            "median": {str(g): _medians(v) for g, v in runs.items()}}


def _every_triplet_stepped(gm: GlobalMirror) -> None:
    """Make ``gm`` begin a CG on every pair and step every relationship (the
    path of storage units, and of every session before sparse CGs): the
    baseline of :func:`idle_cg`."""
    gm._sparse = False
    for g in gm.groups:
        g.flash.sparse = False
        for t in g.triplets:
            t.pair.on_sent = None


def idle_cg(counts=(16, 1024, 4096), written: int = 4, cgs: int = 200, rounds: int = 3,
            log=print) -> dict:
    """Seconds per CG attempt of a session in memory (1-track volumes of 64
    KiB, 4 KiB grains) at each triplet count: idle (nothing written), and
    "few written" (``written`` triplets get a 4 KiB write before each CG;
    only the CG is timed), each as it runs (a CG visits the pairs with
    tracks out of sync and the relationships that changed) and with every
    triplet stepped (the baseline), interleaved in ``rounds``. Per figure
    the min and median over every CG of every round."""
    times: dict = {}
    for r in range(rounds):
        for n in counts:
            for mode in (("sparse", "stepped") if r % 2 == 0 else ("stepped", "sparse")):
                trips = [tuple(_volume(tag, i) for tag in "ABC") for i in range(n)]
                # (a loaded machine may hold 4,096 locks longer than 50 ms)
                gm = GlobalMirror(trips, initial_copy=False, max_coordination_time=1.0)
                if mode == "stepped":
                    _every_triplet_stepped(gm)
                try:
                    for _ in range(3):
                        assert gm.form_consistency_group().committed
                    rng = np.random.default_rng(r)
                    data = np.full(4096, 7, np.uint8)
                    for case in ("idle", "few"):
                        got = times.setdefault(f"{case}/{mode}/{n}", [])
                        for _ in range(cgs if n <= 1024 else max(cgs // 4, 20)):
                            if case == "few":
                                for i in rng.choice(n, size=min(written, n), replace=False):
                                    trips[i][0].write(int(rng.integers(16)) * 4096, data)
                            t = time.perf_counter()
                            res = gm.form_consistency_group()
                            got.append(time.perf_counter() - t)
                            assert res.committed, res
                finally:
                    gm.close(discard=True)
                    close_triplets(trips)
                    del trips, gm
                    gc.collect()
            log(f"    idle CG, {n} triplets, round {r + 1}: "
                + ", ".join(f"{k.split('/')[0]} {k.split('/')[1]} "
                            f"{min(v) * 1e3:.3f} ms" for k, v in times.items()
                            if k.endswith(f"/{n}")))
    out: dict = {"config": {"counts": list(counts), "written": written, "cgs": cgs,
                            "rounds": rounds, "track": TRACK, "grain": 4096,
                            "tracks_per_volume": 1},
                 "figures": {k: {"min_s": min(v), "median_s": statistics.median(v),
                                 "samples": len(v)} for k, v in times.items()}}
    f = out["figures"]
    lo, hi = min(counts), max(counts)
    out["ratios"] = {f"{case}/{mode}": {
        q: f[f"{case}/{mode}/{hi}"][q] / f[f"{case}/{mode}/{lo}"][q] for q in ("min_s", "median_s")}
        for case in ("idle", "few") for mode in ("sparse", "stepped")}
    return out


def _volume(tag: str, i: int) -> Volume:
    v = Volume(1, TRACK, name=f"{tag}{i:04d}", grain_size=4096)
    v._raw_array().fill(0)
    return v


def find_next_set(bits: int = 1 << 28, repeats: int = 7) -> dict:
    """Seconds to find the one set bit (the last) of ``bits`` bits: with the
    summary, and by a scan of the words (the same bitmap, its summary made
    stale: every word marked, as a kernel that clears bits leaves it)."""
    bm = TrackBitmap(bits)
    bm.set(bits - 1)
    bm.find_next_set(0)                  # the pages in
    with_summary = []
    for _ in range(repeats):
        t = time.perf_counter()
        assert bm.find_next_set(0) == bits - 1
        with_summary.append(time.perf_counter() - t)
    bm._raw_words()                      # marks every word: scans read the words
    words = []
    for _ in range(repeats):
        t = time.perf_counter()
        assert bm.find_next_set(0) == bits - 1
        words.append(time.perf_counter() - t)
    return {"bits": bits, "summary_s": statistics.median(with_summary),
            "words_s": statistics.median(words)}
