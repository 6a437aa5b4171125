"""Durable Global Mirror on disk (ext4) vs tmpfs: a measurement script.

16 triplets x 64 MiB, 4 KiB tracks, every volume written whole first; two
writers of 4 KiB random writes paced to --rate MB/s in all; GM forming CGs
continuously (gm.start()); primary unit holds A, secondary unit holds B and
C. Disk and tmpfs runs are interleaved (each repetition runs every variant
on both, in alternating order); medians and disk/tmpfs ratios are printed.

Variants (scratch monkeypatches, measurement only):
  base     the code as it is
  nosync   every store transaction with sync=False (no per-CG fsync)
  anonbm   SQLiteStore.new_bitmap hands out anonymous TrackBitmaps (no bitmap
           file pages; NOT crash-safe, measurement only)
  sfr      a background thread calls sync_file_range(SYNC_FILE_RANGE_WRITE)
           on the B and C volume files every 20 ms (smoothed writeback)
  sfrall   the same on A, B and C volume files
  pwA      host writes to disk-backed volumes with pwrite, not stores through
           the mapping, without the GIL (_core._set_host_mode(1); only builds
           from before the switch was removed have it: fastfc now always
           stores without the GIL, the old default mode 0, which measured best)
  pwAg     the same with pwrite, the GIL kept for writes below 64 KiB (mode 2)
  gil      stores, the GIL kept for writes below 64 KiB as in memory (mode 3)
  y1       the protocol thread gives the GIL up (time.sleep(0)) between CGs
           (globalmirror._GIL_YIELD = 1; builds that have it)
  y2       also between an attempt's phases and between triplets (level 2)
  gily2    mode 3 (host writes keep the GIL) with level-2 yields
  c64      pprc.DIRECT_CHUNK_BYTES = 64 KiB: the CG drain holds A's (and B's)
           lock for at most 64 KiB of tracks at a time (default 4 MiB)
  c256     the same with 256 KiB

Per run it records the GM thread's minor faults / context switches per CG
(getrusage(RUSAGE_THREAD) in on_result), time inside the protocol's steps
(wrapped: resync, commit, SQL COMMIT, new_bitmap, cg_drain, cg_end,
coordinate), /proc/vmstat deltas and nr_dirty/nr_writeback samples, and a
sampled kernel stack histogram (/proc/self/task/TID/stack every 2 ms, needs
root) of the GM thread and the writer threads.

Usage: PYTHONPATH=. python scripts/durable_datapath_measure.py [--reps 3] [--seconds 8]
       [--variants base,nosync,anonbm,sfr] [--json out.json]
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import ctypes
import json
import os
import resource
import shutil
import statistics
import sys
import threading
import time
from pathlib import Path

import numpy as np

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from fastfc import GlobalMirror, StorageUnit  # noqa: E402
from fastfc import _core  # noqa: E402
from fastfc._core import TrackBitmap  # noqa: E402
from fastfc.copyservices.flashcopy import FlashCopy  # noqa: E402
from fastfc.copyservices.pprc import PPRCPair  # noqa: E402
from fastfc.durable import sqlite as fsql  # noqa: E402
from fastfc.tools.testing import RandomWriters  # noqa: E402

LOCS = {"disk": Path("/work/durable-datapath-scratch"), "tmpfs": Path("/dev/shm/durable-datapath-scratch")}

# ---------------------------------------------------------------- instrumentation
TIMES: dict[str, list[float]] = collections.defaultdict(list)


def _wrap(cls, name, label=None):
    orig = getattr(cls, name)
    label = label or f"{cls.__name__}.{name}"

    def w(*a, **k):
        t = time.perf_counter()
        try:
            return orig(*a, **k)
        finally:
            TIMES[label].append(time.perf_counter() - t)
    setattr(cls, name, w)


for cls, name in ((FlashCopy, "resync"), (FlashCopy, "commit"), (PPRCPair, "cg_drain"),
                  (PPRCPair, "cg_end"), (GlobalMirror, "_coordinate"),
                  (GlobalMirror, "_flashcopy_phase"),
                  (fsql.SQLiteStore, "cg_decision"), (fsql.SQLiteStore, "save_session_stats"),
                  (fsql.SQLiteStore, "save_flash")):
    _wrap(cls, name)


class DBProxy:
    """Times COMMIT statements of a store's connection (the fsync is there)."""

    def __init__(self, db):
        self._db = db

    def execute(self, sql, *a):
        if sql == "COMMIT":
            t = time.perf_counter()
            try:
                return self._db.execute(sql, *a)
            finally:
                TIMES["sql COMMIT"].append(time.perf_counter() - t)
        return self._db.execute(sql, *a)

    def __getattr__(self, n):
        return getattr(self._db, n)


_orig_new_bitmap = fsql.SQLiteStore.new_bitmap
_orig_transaction = fsql.SQLiteStore.transaction
FLAGS = {"anonbm": False, "nosync": False}
NEW_FILES = [0]


def new_bitmap(self, n_bits, fill=False):
    t = time.perf_counter()
    try:
        if FLAGS["anonbm"]:
            return TrackBitmap(n_bits, fill=fill)
        before = self._next_bitmap
        bm = _orig_new_bitmap(self, n_bits, fill)
        NEW_FILES[0] += self._next_bitmap - before
        return bm
    finally:
        TIMES["SQLiteStore.new_bitmap"].append(time.perf_counter() - t)


def transaction(self, sync=True):
    return _orig_transaction(self, sync=False if FLAGS["nosync"] else sync)


fsql.SQLiteStore.new_bitmap = new_bitmap
fsql.SQLiteStore.transaction = transaction

# ---------------------------------------------------------------- samplers
VMSTAT_KEYS = ("nr_dirty", "nr_writeback", "pgpgout", "pgfault", "pgmajfault", "nr_dirtied",
               "nr_written", "nr_dirty_threshold", "nr_dirty_background_threshold")


def vmstat() -> dict[str, int]:
    out = {}
    with open("/proc/vmstat") as f:
        for line in f:
            k, v = line.split()
            if k in VMSTAT_KEYS:
                out[k] = int(v)
    return out


INTERESTING = ("balance_dirty_pages", "folio_wait_writeback", "wait_on_page_writeback",
               "folio_wait_stable", "wait_transaction_locked", "start_this_handle",
               "jbd2_log_wait_commit", "jbd2_journal_stop", "ext4_page_mkwrite",
               "file_write_and_wait_range", "ext4_sync_file", "do_fsync",
               "filemap_fault", "do_wp_page", "wp_page", "handle_mm_fault", "mmap_write",
               "rwsem_down", "futex", "do_nanosleep", "ext4_fallocate", "do_sys_openat",
               "vfs_fallocate", "unlink", "folio_lock", "__folio_lock", "io_schedule",
               "sync_file_range", "msync")


def proc_io() -> dict[str, int]:
    with open("/proc/self/io") as f:
        return {k: int(v) for k, v in (ln.split(": ") for ln in f)}


class StackSampler(threading.Thread):
    """Every ``period`` s, read each thread's state and kernel stack; count a
    signature (state + innermost interesting frames) per role."""

    def __init__(self, tids: dict[str, list[int]], period=0.002):
        super().__init__(daemon=True)
        self.tids, self.period = tids, period
        self.counts = {role: collections.Counter() for role in tids}
        self.samples = collections.Counter()
        self.stop_ev = threading.Event()

    def run(self):
        while not self.stop_ev.is_set():
            for role, tids in self.tids.items():
                for tid in tids:
                    base = f"/proc/self/task/{tid}"
                    try:
                        with open(f"{base}/stat") as f:
                            state = f.read().rsplit(")", 1)[1].split()[0]
                        with open(f"{base}/stack") as f:
                            frames = [ln.split()[1].split("+")[0] for ln in f if ln.strip()]
                    except (OSError, IndexError):
                        continue
                    hits = [fr for fr in frames if any(k in fr for k in INTERESTING)]
                    sig = state + ":" + ("<".join(hits[:3]) if hits else
                                         (frames[0] if frames else "user"))
                    self.counts[role][sig] += 1
                    self.samples[role] += 1
            time.sleep(self.period)


class VmSampler(threading.Thread):
    def __init__(self, period=0.1):
        super().__init__(daemon=True)
        self.period = period
        self.dirty, self.wb = [], []
        self.stop_ev = threading.Event()

    def run(self):
        while not self.stop_ev.is_set():
            v = vmstat()
            self.dirty.append(v["nr_dirty"] * 4096 / 2**20)
            self.wb.append(v["nr_writeback"] * 4096 / 2**20)
            time.sleep(self.period)


_libc = ctypes.CDLL(None, use_errno=True)
_libc.sync_file_range.argtypes = [ctypes.c_int, ctypes.c_longlong, ctypes.c_longlong,
                                  ctypes.c_uint]
SYNC_FILE_RANGE_WRITE = 2


class Flusher(threading.Thread):
    """sync_file_range(WRITE) of whole files every ``period`` s (start writeback
    of whatever is dirty, without waiting)."""

    def __init__(self, paths, period=0.02):
        super().__init__(daemon=True)
        self.fds = [os.open(p, os.O_RDWR) for p in paths]
        self.period = period
        self.stop_ev = threading.Event()
        self.calls = 0
        self.time = 0.0

    def run(self):
        while not self.stop_ev.is_set():
            t = time.perf_counter()
            for fd in self.fds:
                _libc.sync_file_range(fd, 0, 0, SYNC_FILE_RANGE_WRITE)
            self.time += time.perf_counter() - t
            self.calls += 1
            self.stop_ev.wait(self.period)

    def close(self):
        self.stop_ev.set()
        self.join()
        for fd in self.fds:
            os.close(fd)


# ---------------------------------------------------------------- setup and one run
def setup(loc: str, n: int, size_mib: int, track: int):
    root = LOCS[loc]
    shutil.rmtree(root, ignore_errors=True)
    root.mkdir(parents=True)
    prim, sec = StorageUnit(root / "prim"), StorageUnit(root / "sec")
    n_tracks = size_mib * 2**20 // track
    data = np.random.default_rng(7).integers(0, 256, size_mib * 2**20, dtype=np.uint8)
    trips = []
    for i in range(n):
        a = prim.create_volume(f"A{i:03d}", n_tracks, track)
        b = sec.create_volume(f"B{i:03d}", n_tracks, track)
        c = sec.create_volume(f"C{i:03d}", n_tracks, track)
        for v in (a, b, c):
            v._raw_array()[:] = data      # steady state: allocated and written
        trips.append((a, b, c))
    for u in (prim, sec):
        u.store.db = DBProxy(u.store.db)
    return root, prim, sec, trips


def pct(xs, q):
    if not xs:
        return float("nan")
    return float(np.percentile(np.asarray(xs), q))


def one_run(loc, units, variant, seconds, rate, seed, run_idx):
    root, prim, sec, trips = units
    FLAGS["anonbm"] = variant == "anonbm"
    FLAGS["nosync"] = variant == "nosync"
    modes = {"pwA": 1, "pwAg": 2, "gil": 3, "gily2": 3}
    yields = {"y1": 1, "y2": 2, "gily2": 2}
    from fastfc.copyservices import pprc as pprcmod
    pprcmod.DIRECT_CHUNK_BYTES = {"c64": 64 << 10, "c256": 256 << 10}.get(variant, 4 << 20)
    from fastfc.copyservices import globalmirror as gmmod
    if hasattr(gmmod, "_GIL_YIELD"):
        gmmod._GIL_YIELD = yields.get(variant, 0)
    elif variant in yields:
        raise SystemExit(f"{variant} needs a build with globalmirror._GIL_YIELD")
    if hasattr(_core, "_set_host_mode"):
        _core._set_host_mode(modes.get(variant, 0))
    elif variant in modes:
        raise SystemExit(f"{variant} needs a build with _core._set_host_mode")
    TIMES.clear()
    NEW_FILES[0] = 0
    t = time.perf_counter()
    os.sync()                               # every run starts with clean page cache
    sync_s = time.perf_counter() - t
    per_cg = []
    last = [None]

    def on_result(res):
        ru = resource.getrusage(resource.RUSAGE_THREAD)
        now = (ru.ru_minflt, ru.ru_majflt, ru.ru_nvcsw, ru.ru_nivcsw, time.perf_counter())
        if last[0] is not None:
            per_cg.append(tuple(b - a for a, b in zip(last[0], now)))
        last[0] = now

    gm = GlobalMirror(trips, cg_interval=0.0, initial_copy=False, name=f"gm{run_idx}",
                      on_result=on_result)
    fsyncs0 = sec.store.fsyncs
    flusher = None
    if variant in ("sfr", "sfrall"):
        paths = [v.path for tr in trips for v in (tr[1:] if variant == "sfr" else tr)]
        flusher = Flusher(paths)
    writers = RandomWriters([t[0] for t in trips], threads=2, seed=seed, io_size=4096,
                            pace=rate).start()
    vm0 = vmstat()
    io0 = proc_io()
    vs = VmSampler()
    vs.start()
    if flusher:
        flusher.start()
    t0 = time.perf_counter()
    gm.start()
    tids = {"gm": [gm._thread.native_id], "writers": [w.native_id for w in writers._workers]}
    ss = StackSampler(tids)
    ss.start()
    time.sleep(seconds)
    gm.stop()
    elapsed = time.perf_counter() - t0
    wbytes0 = writers.bytes
    ss.stop_ev.set()
    ss.join()
    writers.stop()
    vs.stop_ev.set()
    vs.join()
    vm1 = vmstat()
    io1 = proc_io()
    if flusher:
        flusher.close()
    st = gm.stats
    p = st.phase_percentiles()
    times = {k: (len(v), sum(v), pct(v, 50), pct(v, 99)) for k, v in TIMES.items()}
    ncg = max(st.successes, 1)
    out = {
        "loc": loc, "variant": variant, "rep": run_idx, "elapsed": elapsed, "sync_before_s": sync_s,
        "cgs_per_s": st.successes / elapsed, "attempts": st.attempts,
        "failures": dict(st.failures),
        "rpo_p99_ms": p["rpo"]["p99"] * 1e3, "rpo_p50_ms": p["rpo"]["p50"] * 1e3,
        "coord_p50_ms": p["coordination"]["p50"] * 1e3, "coord_p99_ms": p["coordination"]["p99"] * 1e3,
        "drain_p50_ms": p["drain"]["p50"] * 1e3, "drain_p99_ms": p["drain"]["p99"] * 1e3,
        "flash_p50_ms": p["flashcopy"]["p50"] * 1e3, "flash_p99_ms": p["flashcopy"]["p99"] * 1e3,
        "write_rate_ratio": wbytes0 / elapsed / rate,
        "fsyncs_per_cg": (sec.store.fsyncs - fsyncs0) / ncg,
        "new_bitmap_files": NEW_FILES[0],
        "minflt_per_cg": statistics.median([c[0] for c in per_cg]) if per_cg else None,
        "majflt_per_cg": statistics.median([c[1] for c in per_cg]) if per_cg else None,
        "nvcsw_per_cg": statistics.median([c[2] for c in per_cg]) if per_cg else None,
        "steps_ms_per_cg": {k: v[1] / ncg * 1e3 for k, v in times.items()},
        "steps_p50_p99_ms": {k: (v[0], v[2] * 1e3, v[3] * 1e3) for k, v in times.items()},
        "vm_delta_mib": {k: (vm1[k] - vm0[k]) * 4096 / 2**20 for k in
                         ("nr_dirtied", "nr_written")},
        "proc_write_mib": (io1["write_bytes"] - io0["write_bytes"]) / 2**20,
        "proc_syscw": io1["syscw"] - io0["syscw"],
        "vm_pgpgout_mib": (vm1["pgpgout"] - vm0["pgpgout"]) / 1024,
        "vm_pgfault": vm1["pgfault"] - vm0["pgfault"],
        "dirty_mib_p50_max": (pct(vs.dirty, 50), max(vs.dirty or [0])),
        "writeback_mib_p50_max": (pct(vs.wb, 50), max(vs.wb or [0])),
        "dirty_thresh_mib": vm1["nr_dirty_threshold"] * 4096 / 2**20,
        "dirty_bg_thresh_mib": vm1["nr_dirty_background_threshold"] * 4096 / 2**20,
        "stacks": {role: {k: round(v / max(ss.samples[role], 1), 3)
                          for k, v in c.most_common(8)} for role, c in ss.counts.items()},
        "flusher": {"calls": flusher.calls, "time_s": flusher.time} if flusher else None,
    }
    t = time.perf_counter()
    gm.close(discard=True)        # leave the volumes free for the next session
    out["close_s"] = time.perf_counter() - t
    return out


SUMMARY = ("cgs_per_s", "rpo_p99_ms", "write_rate_ratio", "coord_p50_ms", "coord_p99_ms",
           "drain_p50_ms", "drain_p99_ms", "flash_p50_ms", "flash_p99_ms", "fsyncs_per_cg",
           "minflt_per_cg", "nvcsw_per_cg")


def summarize(results, variants):
    print("\nmedians over repetitions; ratio = disk / tmpfs (paired by repetition, median)")
    for var in variants:
        print(f"\n== {var}")
        print(f"  {'figure':<18}{'disk':>12}{'tmpfs':>12}{'ratio':>10}")
        for key in SUMMARY:
            d = [r[key] for r in results if r["variant"] == var and r["loc"] == "disk"]
            m = [r[key] for r in results if r["variant"] == var and r["loc"] == "tmpfs"]
            d = [x for x in d if x is not None]
            m = [x for x in m if x is not None]
            if not d or not m:
                continue
            ratios = [a / b for a, b in zip(d, m) if b]
            print(f"  {key:<18}{statistics.median(d):>12.3f}{statistics.median(m):>12.3f}"
                  f"{(statistics.median(ratios) if ratios else float('nan')):>10.3f}")
        for loc in ("disk", "tmpfs"):
            rs = [r for r in results if r["variant"] == var and r["loc"] == loc]
            steps = collections.defaultdict(list)
            for r in rs:
                for k, v in r["steps_ms_per_cg"].items():
                    steps[k].append(v)
            print(f"  {loc} ms per CG in steps: " + ", ".join(
                f"{k}={statistics.median(v):.2f}" for k, v in sorted(steps.items())))
            print(f"  {loc} dirty MiB p50/max " + str([tuple(round(x) for x in r["dirty_mib_p50_max"])
                                                      for r in rs])
                  + f" writeback MiB {[tuple(round(x) for x in r['writeback_mib_p50_max']) for r in rs]}"
                  + f" pgpgout MiB {[round(r['vm_pgpgout_mib']) for r in rs]}")


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--triplets", type=int, default=16)
    ap.add_argument("--size-mib", type=int, default=64)
    ap.add_argument("--track", type=int, default=4096)
    ap.add_argument("--seconds", type=float, default=8.0)
    ap.add_argument("--rate", type=float, default=200.0)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--variants", default="base,nosync,anonbm,sfr")
    ap.add_argument("--json", default=None)
    ap.add_argument("--locs", default="disk,tmpfs")
    a = ap.parse_args(argv)
    variants = a.variants.split(",")
    print("vm.dirty_ratio", open("/proc/sys/vm/dirty_ratio").read().strip(),
          "dirty_background_ratio", open("/proc/sys/vm/dirty_background_ratio").read().strip(),
          "dirty_expire_centisecs", open("/proc/sys/vm/dirty_expire_centisecs").read().strip(),
          "dirty_writeback_centisecs",
          open("/proc/sys/vm/dirty_writeback_centisecs").read().strip(), flush=True)
    units = {}
    for loc in a.locs.split(","):
        t = time.perf_counter()
        units[loc] = setup(loc, a.triplets, a.size_mib, a.track)
        print(f"setup {loc}: {time.perf_counter() - t:.1f} s", flush=True)
    results = []
    k = 0
    for rep in range(a.reps):
        for var in variants:
            order = ("disk", "tmpfs") if (rep + len(results) // 2) % 2 == 0 else ("tmpfs", "disk")
            for loc in [x for x in order if x in units]:
                r = one_run(loc, units[loc], var, a.seconds, a.rate * 1e6, seed=rep, run_idx=k)
                k += 1
                results.append(r)
                print(f"rep {rep} {var:<7} {loc:<5} CG/s {r['cgs_per_s']:7.1f} "
                      f"RPO p99 {r['rpo_p99_ms']:7.1f} ms  writes {r['write_rate_ratio']:.2f}x pace  "
                      f"coord p99 {r['coord_p99_ms']:.2f} drain p50/p99 {r['drain_p50_ms']:.1f}/"
                      f"{r['drain_p99_ms']:.1f} flash p50/p99 {r['flash_p50_ms']:.1f}/"
                      f"{r['flash_p99_ms']:.1f} ms  fsync/CG {r['fsyncs_per_cg']:.2f} "
                      f"newbm {r['new_bitmap_files']} minflt/CG {r['minflt_per_cg']} "
                      f"sync {r['sync_before_s']:.1f}s", flush=True)
                if a.json:
                    Path(a.json).write_text(json.dumps(results, indent=1, default=str))
    summarize(results, variants)
    for loc, (root, prim, sec, trips) in units.items():
        prim.close()
        sec.close()
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    raise SystemExit(main())
