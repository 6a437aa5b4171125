"""CG/s of one Global Mirror session in memory and on storage units in
tmpfs, in this interpreter's fastfc: the ratio a unit's CG path costs.

``python -m benches.memory_vs_unit CASE SECONDS`` prints one JSON line:
CGs per second and RPO p99 of a session forming CGs back to back under two
writers of 4 KiB random writes paced at 200 MB/s in all, and the run's
time series (``windows``: per 5 s, CGs per second, the writers' MB/s and
the machine's dirty page cache, which on a disk decides when writeback
starts). CASE is one of

- ``mem16``: 16 triplets x 64 MiB in memory, 4 KiB tracks, every volume
  written whole first;
- ``unit16``: the same on two storage units in /dev/shm (A in one, B and C
  in the other) at durability "process", every volume written whole first;
- ``unit16disk``: ``unit16`` with the units on the disk (``/var/tmp``), the
  files synced before the run (clean pages, as a unit in use has);
- ``mem64``: 64 triplets x 64 MiB in memory, 64 KiB tracks;
- ``mem16idle``, ``unit16idle``: what a CG costs the protocol thread
  without writers (16 triplets x 16 MiB, 4 KiB tracks, in memory or on
  units in /dev/shm at "process", one 4 KiB host write before each CG):
  its CPU time per CG in microseconds, the minimum (and median) of
  30 x 150 CGs (SECONDS is ignored).

Run it under two checkouts' interpreters, alternating, and compare ratios
measured in the same run (the machine is shared and noisy).
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from fastfc import GlobalMirror, StorageUnit, Volume
from fastfc.tools.testing import RandomWriters

from benches.gm import copy_counts

MIB = 1 << 20


WINDOW = 5.0     # seconds per window of the run's time series


def _dirty_mib() -> float | None:
    """Dirty page-cache MiB of the whole machine (``nr_dirty``), or None."""
    try:
        with open("/proc/vmstat") as f:
            for line in f:
                if line.startswith("nr_dirty "):
                    return int(line.split()[1]) * 4096 / MIB
    except OSError:
        pass
    return None


def _run_in_windows(gm, volumes, seconds: float) -> tuple[RandomWriters, float, list]:
    """``run_under_writers`` with a time series: per WINDOW seconds, the CGs
    per second, the writers' MB/s and the machine's dirty page cache at its
    end (on a disk, writeback starts once that passes the kernel's
    background threshold, and the figures change with it)."""
    w = RandomWriters(volumes, threads=2, seed=1, io_size=4096, pace=200e6).start()
    windows = []
    try:
        t0 = time.perf_counter()
        gm.start()
        last = (t0, gm.stats.successes, w.bytes)
        while (now := time.perf_counter()) < t0 + seconds:
            time.sleep(min(WINDOW, t0 + seconds - now))
            cur = (time.perf_counter(), gm.stats.successes, w.bytes)
            dt = cur[0] - last[0]
            dirty = _dirty_mib()
            windows.append([round(cur[0] - t0, 1), round((cur[1] - last[1]) / dt, 1),
                            round((cur[2] - last[2]) / dt / 1e6, 1),
                            None if dirty is None else round(dirty)])
            last = cur
        gm.stop()
        elapsed = time.perf_counter() - t0
    finally:
        w.stop()
    return w, elapsed, windows


def _figures(gm, trips, seconds: float) -> dict:
    before = copy_counts(gm)
    writers, elapsed, windows = _run_in_windows(gm, [t[0] for t in trips], seconds)
    after = copy_counts(gm)
    st = gm.stats
    ph = st.phase_percentiles()
    copied = None
    if before and after and after[0] > before[0]:
        copied = (after[1] - before[1]) / (after[0] - before[0])
    return {"cgs_per_s": st.successes / elapsed, "rpo_p99_ms": ph["rpo"]["p99"] * 1e3,
            "flash_p50_ms": ph["flashcopy"]["p50"] * 1e3,
            "drain_p50_ms": ph["drain"]["p50"] * 1e3,
            "write_mb_s": writers.bytes / elapsed / 1e6, "attempts": st.attempts,
            "copied_per_host_byte": copied,
            "windows": {"columns": ["t_s", "cgs_per_s", "write_mb_s", "dirty_mib"],
                        "rows": windows}}


def memory(n: int, track: int, seconds: float) -> dict:
    nt = 64 * MIB // track
    data = np.random.default_rng(7).integers(0, 256, 64 * MIB, dtype=np.uint8)
    trips = []
    for i in range(n):
        trip = tuple(Volume(nt, track, name=f"{r}{i}") for r in "ABC")
        for v in trip:      # every page in use, as in the units' case
            v._raw_array()[:] = data
        trips.append(trip)
    gm = GlobalMirror(trips, cg_interval=0.0, initial_copy=False)
    try:
        return _figures(gm, trips, seconds)
    finally:
        gm.close(discard=True)
        for t in trips:
            for v in t:
                v.close()


def units(n: int, seconds: float, where: str = "/dev/shm") -> dict:
    root = Path(tempfile.mkdtemp(prefix="fastfc-mvu-", dir=where))
    try:
        track = 4096
        nt = 64 * MIB // track
        data = np.random.default_rng(7).integers(0, 256, 64 * MIB, dtype=np.uint8)
        with StorageUnit(root / "prim") as p, StorageUnit(root / "sec") as s:
            for i in range(n):
                for unit, name in ((p, f"A{i}"), (s, f"B{i}"), (s, f"C{i}")):
                    unit.create_volume(name, nt, track)._raw_array()[:] = data
        os.sync()
        p = StorageUnit(root / "prim", durability="process")
        s = StorageUnit(root / "sec", durability="process")
        try:
            trips = [(p.volume(f"A{i}"), s.volume(f"B{i}"), s.volume(f"C{i}")) for i in range(n)]
            gm = GlobalMirror(trips, cg_interval=0.0, initial_copy=False)
            try:
                return _figures(gm, trips, seconds)
            finally:
                gm.close(discard=True)
        finally:
            p.close()
            s.close()
    finally:
        shutil.rmtree(root, ignore_errors=True)


def idle(kind: str, n: int = 16, reps: int = 30, cgs: int = 150) -> dict:
    """The protocol thread's CPU time per CG, no writers (see the module)."""
    import statistics
    nt = 4096
    root = Path(tempfile.mkdtemp(prefix="fastfc-mvu-", dir="/dev/shm"))
    units: tuple = ()
    try:
        if kind == "mem":
            trips = [tuple(Volume(nt, 4096) for _ in range(3)) for _ in range(n)]
        else:
            p = StorageUnit(root / "p", durability="process")
            s = StorageUnit(root / "s", durability="process")
            units = (p, s)
            trips = [(p.create_volume(f"A{i}", nt, 4096), s.create_volume(f"B{i}", nt, 4096),
                      s.create_volume(f"C{i}", nt, 4096)) for i in range(n)]
        gm = GlobalMirror(trips, cg_interval=0.0, initial_copy=False, max_coordination_time=1.0)
        for _ in range(5):
            gm.form_consistency_group()
        data = np.full(4096, 7, np.uint8)
        As = [t[0] for t in trips]
        per_cg = []
        for _ in range(reps):
            t = time.thread_time()
            for k in range(cgs):
                As[k % n].write((k * 4096) % (nt * 4096), data)
                assert gm.form_consistency_group().committed
            per_cg.append((time.thread_time() - t) / cgs * 1e6)
        gm.close(discard=True)
        return {"us_per_cg_min": min(per_cg), "us_per_cg_median": statistics.median(per_cg)}
    finally:
        for u in units:
            u.close()
        shutil.rmtree(root, ignore_errors=True)


def main(argv: list[str]) -> int:
    case, seconds = argv[0], float(argv[1])
    if case == "mem16":
        out = memory(16, 4096, seconds)
    elif case == "unit16":
        out = units(16, seconds)
    elif case == "unit16disk":
        out = units(16, seconds, "/var/tmp")
    elif case == "mem64":
        out = memory(64, 65536, seconds)
    elif case in ("mem16idle", "unit16idle"):
        out = idle(case[:-len("16idle")])
    else:
        raise SystemExit(f"unknown case {case!r}: mem16, unit16, unit16disk, mem64, "
                         "mem16idle or unit16idle")
    print(json.dumps({"case": case, **out}))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
