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
against a scan of the words.

``python -m benches grain`` runs it (``--quick``: smaller).
"""

from __future__ import annotations

import gc
import os
import shutil
import statistics
import tempfile
import time
from pathlib import Path

from fastfc import GlobalMirror, StorageUnit, TrackBitmap
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
