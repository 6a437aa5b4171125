"""Durable units at disk speed: Global Mirror in steady state on
storage units on this machine's disk and in tmpfs, at both durability levels;
and (opt-in) a unit whose volumes together exceed the machine's memory.

Steady state (``steady``): ``triplets`` triplets of ``size_mib`` MiB, 4 KiB
tracks; the primary unit holds A, the secondary B and C. Every volume is
written whole first (then ``os.sync()``), so the runs see allocated blocks and
clean pages, as a unit that has been in use does. Two writers of 4 KiB random
writes paced to ``rate_mbs`` MB/s in all; Global Mirror forms CGs
continuously (``gm.start()``, CG interval 0). Each repetition runs every
durability level ("process", "power") on the disk and on tmpfs, the location
order alternating (interleaved: a drift of the machine hits both sides). The
units are reopened at the level of each run (the level is an open option).

Bytes to disk per host byte, two ways:

- ``dev``: sectors written on the disk's block device (``/sys/block/DEV/stat``,
  field 7) from the run's start to the end of an ``os.sync()`` after it, over
  the bytes the writers wrote. The device's truth, with everything the run
  made dirty counted (the final sync flushes what writeback had not reached),
  including the ext4 journal and SQLite's WAL; but it is the whole machine's
  (another process writing to that disk adds to it; tmpfs runs show that
  noise floor).
- ``proc``: ``write_bytes`` of ``/proc/self/io``, over the same host bytes.
  The kernel charges it to the task that dirties a page cache page of a
  file with writeback (clean -> dirty, 4 KiB each), at dirtying time: this
  process's pages only, no journal, and a page redirtied before writeback
  counts once. tmpfs pages have no writeback and count nothing.

Scale past memory (``large``, opt-in: ``--only durable_large``): units whose
volumes together exceed RAM (1 GiB volumes), written whole with 16 MiB
sequential ``pwrite`` first; the disk's own random-write speed is measured
over the same files (buffered 4 KiB ``os.pwrite`` at random offsets, two
threads, then ``os.sync()`` included in the time); then Global Mirror runs
under two unpaced writers of 4 KiB for a bounded time.
"""

from __future__ import annotations

import gc
import os
import shutil
import statistics
import threading
import time
from pathlib import Path

import numpy as np

from fastfc import GlobalMirror, StorageUnit
from fastfc.tools.testing import run_under_writers

LEVELS = ("process", "power")
TRACK = 4096


# --------------------------------------------------------------------------
# counters
# --------------------------------------------------------------------------

def block_device(path: Path) -> str | None:
    """The /sys/class/block name of the device holding ``path`` (None: no
    block device, e.g. tmpfs)."""
    try:
        st = os.stat(path)
    except OSError:
        return None
    major, minor = os.major(st.st_dev), os.minor(st.st_dev)
    link = Path(f"/sys/dev/block/{major}:{minor}")
    if not link.exists():
        return None
    return link.resolve().name


def sectors_written(dev: str | None) -> int | None:
    if dev is None:
        return None
    try:
        return int(Path(f"/sys/class/block/{dev}/stat").read_text().split()[6])
    except (OSError, IndexError, ValueError):
        return None


def proc_write_bytes() -> int | None:
    try:
        with open("/proc/self/io") as f:
            for line in f:
                if line.startswith("write_bytes:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return None


def _pct(xs, q):
    return float(np.percentile(np.asarray(xs), q)) if len(xs) else float("nan")


# --------------------------------------------------------------------------
# steady state
# --------------------------------------------------------------------------

def _names(n: int):
    return [(f"A{i:03d}", f"B{i:03d}", f"C{i:03d}") for i in range(n)]


def _setup(root: Path, n: int, size_mib: int) -> None:
    """Create the units in ``root`` and write every volume whole."""
    shutil.rmtree(root, ignore_errors=True)
    root.mkdir(parents=True)
    prim, sec = StorageUnit(root / "prim"), StorageUnit(root / "sec")
    n_tracks = size_mib * 2**20 // TRACK
    data = np.random.default_rng(7).integers(0, 256, size_mib * 2**20, dtype=np.uint8)
    try:
        for a, b, c in _names(n):
            for unit, name in ((prim, a), (sec, b), (sec, c)):
                unit.create_volume(name, n_tracks, TRACK)._raw_array()[:] = data
    finally:
        prim.close()
        sec.close()


def _open(root: Path, n: int, level: str):
    prim = StorageUnit(root / "prim", durability=level)
    sec = StorageUnit(root / "sec", durability=level)
    trips = [(prim.volume(a), sec.volume(b), sec.volume(c)) for a, b, c in _names(n)]
    return (prim, sec), trips


def one_run(root: Path, n: int, level: str, seconds: float, rate: float | None, seed: int,
            dev: str | None, loc: str) -> dict:
    units, trips = _open(root, n, level)
    try:
        t = time.perf_counter()
        os.sync()                              # every run starts from clean pages
        sync_before = time.perf_counter() - t
        gm = GlobalMirror(trips, cg_interval=0.0, initial_copy=False)
        f0 = sum(u.store.fsyncs for u in units)
        m0 = sum(u.store.msyncs for u in units)
        s0, p0 = sectors_written(dev), proc_write_bytes()
        writers, elapsed = run_under_writers(gm, [t[0] for t in trips], seconds, threads=2,
                                             seed=seed, io_size=4096, pace=rate)
        host = writers.bytes
        fsyncs = sum(u.store.fsyncs for u in units) - f0
        msyncs = sum(u.store.msyncs for u in units) - m0
        p1 = proc_write_bytes()
        t = time.perf_counter()
        os.sync()                              # what the run left dirty goes to the disk too
        sync_after = time.perf_counter() - t
        s1 = sectors_written(dev)
        st = gm.stats
        ph = st.phase_percentiles()
        cgs = max(st.successes, 1)
        out = {"loc": loc, "level": level, "seed": seed, "elapsed_s": elapsed,
               "cgs": st.successes, "attempts": st.attempts, "failures": dict(st.failures),
               "cgs_per_s": st.successes / elapsed,
               "rpo_p50_ms": ph["rpo"]["p50"] * 1e3, "rpo_p99_ms": ph["rpo"]["p99"] * 1e3,
               "write_mb_s": host / elapsed / 1e6,
               "pace_ratio": host / elapsed / rate if rate else None,
               "fsyncs_per_cg": fsyncs / cgs, "msyncs_per_cg": msyncs / cgs,
               "host_bytes": host, "sync_before_s": sync_before, "sync_after_s": sync_after}
        for k in ("coordination", "drain", "flashcopy"):
            out[f"{k}_p50_ms"] = ph[k]["p50"] * 1e3
            out[f"{k}_p99_ms"] = ph[k]["p99"] * 1e3
        if s0 is not None and s1 is not None:
            out["dev_bytes"] = (s1 - s0) * 512
            out["dev_per_host_byte"] = out["dev_bytes"] / max(host, 1)
            out["dev_bytes_per_cg"] = out["dev_bytes"] / cgs
        if p0 is not None and p1 is not None:
            out["proc_bytes"] = p1 - p0
            out["proc_per_host_byte"] = out["proc_bytes"] / max(host, 1)
            out["proc_bytes_per_cg"] = out["proc_bytes"] / cgs
        gm.close(discard=True)
        return out
    finally:
        for u in units:
            u.close()


STEADY_KEYS = ("cgs_per_s", "rpo_p50_ms", "rpo_p99_ms", "write_mb_s", "pace_ratio",
               "coordination_p50_ms", "coordination_p99_ms", "drain_p50_ms", "drain_p99_ms",
               "flashcopy_p50_ms", "flashcopy_p99_ms", "fsyncs_per_cg", "msyncs_per_cg",
               "dev_per_host_byte", "proc_per_host_byte", "dev_bytes_per_cg",
               "proc_bytes_per_cg")


def steady(disk_root: Path, triplets: int, size_mib: int, seconds: float, rate_mbs: float,
           reps: int, log=print, shm: str = "/dev/shm") -> dict:
    """The steady-state runs; medians per (location, level) in ``summary``."""
    import tempfile
    disk_root.mkdir(parents=True, exist_ok=True)
    roots = {"disk": Path(tempfile.mkdtemp(prefix="fastfc-steady-", dir=disk_root)),
             "tmpfs": Path(tempfile.mkdtemp(prefix="fastfc-steady-", dir=shm))}
    dev = block_device(roots["disk"])
    out: dict = {"config": {"triplets": triplets, "size_mib": size_mib, "seconds": seconds,
                            "rate_mbs": rate_mbs, "reps": reps, "track": TRACK},
                 "dirs": {k: str(v) for k, v in roots.items()}, "device": dev, "runs": []}
    try:
        for loc, root in roots.items():
            t = time.perf_counter()
            _setup(root / "u", triplets, size_mib)
            log(f"    steady state: {triplets} triplets x {size_mib} MiB written whole in "
                f"{loc} ({time.perf_counter() - t:.1f} s)")
        os.sync()
        k = 0
        for rep in range(reps):
            for level in LEVELS:
                order = ("disk", "tmpfs") if k % 2 == 0 else ("tmpfs", "disk")
                k += 1
                for loc in order:
                    r = one_run(roots[loc] / "u", triplets, level, seconds, rate_mbs * 1e6,
                                seed=rep, dev=dev, loc=loc)
                    r["rep"] = rep
                    out["runs"].append(r)
                    log(f"    {level:<7} {loc:<5} {r['cgs_per_s']:7.1f} CG/s  RPO p99 "
                        f"{r['rpo_p99_ms']:7.1f} ms  writes {r['pace_ratio']:.2f} x pace  "
                        f"fsync/msync per CG {r['fsyncs_per_cg']:.1f}/{r['msyncs_per_cg']:.1f}  "
                        f"disk bytes/host byte {r.get('dev_per_host_byte', float('nan')):.2f}")
                    gc.collect()
    finally:
        for root in roots.values():
            shutil.rmtree(root, ignore_errors=True)
    summary: dict = {}
    for loc in roots:
        for level in LEVELS:
            rs = [r for r in out["runs"] if r["loc"] == loc and r["level"] == level]
            summary[f"{loc}/{level}"] = {
                key: statistics.median([r[key] for r in rs]) for key in STEADY_KEYS
                if rs and all(r.get(key) is not None for r in rs)}
    # paired ratios (same repetition)
    def paired(a_loc, a_lvl, b_loc, b_lvl, key):
        xs = []
        for rep in range(reps):
            a = [r for r in out["runs"] if (r["loc"], r["level"], r["rep"]) == (a_loc, a_lvl, rep)]
            b = [r for r in out["runs"] if (r["loc"], r["level"], r["rep"]) == (b_loc, b_lvl, rep)]
            if a and b and b[0][key]:
                xs.append(a[0][key] / b[0][key])
        return statistics.median(xs) if xs else float("nan")
    out["summary"] = summary
    out["ratios"] = {
        "disk_tmpfs_cg_rate_process": paired("disk", "process", "tmpfs", "process", "cgs_per_s"),
        "disk_tmpfs_cg_rate_power": paired("disk", "power", "tmpfs", "power", "cgs_per_s"),
        "power_process_cg_rate_disk": paired("disk", "power", "disk", "process", "cgs_per_s"),
        "power_process_rpo_disk": paired("disk", "power", "disk", "process", "rpo_p99_ms"),
        "power_process_bytes_per_cg_disk": paired("disk", "power", "disk", "process",
                                                  "dev_bytes_per_cg"),
    }
    return out


# --------------------------------------------------------------------------
# scale past memory
# --------------------------------------------------------------------------

def memory_bytes() -> int:
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def _random_pwrite(paths, size: int, seconds: float, threads: int = 2) -> dict:
    """Buffered 4 KiB pwrite at random 4 KiB-aligned offsets over ``paths``
    (``size`` bytes each) on ``threads`` threads for ``seconds``; then
    ``os.sync()``, counted in the time."""
    fds = [os.open(p, os.O_RDWR) for p in paths]
    done = [0] * threads
    stop = threading.Event()

    def run(i):
        rng = np.random.default_rng(100 + i)
        block = rng.integers(0, 256, 4096, dtype=np.uint8).tobytes()
        n = 0
        while not stop.is_set():
            fds_i = rng.integers(len(fds), size=256)
            offs = rng.integers(size // 4096, size=256) * 4096
            for f, o in zip(fds_i, offs):
                os.pwrite(fds[int(f)], block, int(o))
            n += 256
        done[i] = n

    ths = [threading.Thread(target=run, args=(i,), daemon=True) for i in range(threads)]
    t0 = time.perf_counter()
    for t in ths:
        t.start()
    time.sleep(seconds)
    stop.set()
    for t in ths:
        t.join()
    loop = time.perf_counter() - t0
    os.sync()
    total = time.perf_counter() - t0
    for fd in fds:
        os.close(fd)
    nbytes = sum(done) * 4096
    return {"bytes": nbytes, "loop_s": loop, "with_sync_s": total,
            "mb_s": nbytes / total / 1e6, "loop_mb_s": nbytes / loop / 1e6}


def large(disk_root: Path, total_gib: float | None, seconds: float, log=print) -> dict:
    """A unit past memory: volumes of 1 GiB, ``total_gib`` in all (default
    1.5 x RAM, within 60 % of the free disk space), random 4 KiB writes."""
    import tempfile
    disk_root.mkdir(parents=True, exist_ok=True)
    ram = memory_bytes()
    free = shutil.disk_usage(disk_root).free
    want = total_gib * 2**30 if total_gib else 1.5 * ram
    fit = 0.6 * free
    total = min(want, fit)
    triplets = max(1, int(total // (3 * 2**30)))
    size = 2**30
    out: dict = {"ram_bytes": ram, "disk_free_bytes": free, "triplets": triplets,
                 "volume_bytes": size, "total_bytes": 3 * triplets * size,
                 "seconds": seconds, "past_memory": 3 * triplets * size > ram}
    work = Path(tempfile.mkdtemp(prefix="fastfc-large-", dir=disk_root))
    out["dir"] = str(work)
    log(f"    past memory: {triplets} triplets x 1 GiB = {3 * triplets} GiB on the disk "
        f"(RAM {ram / 2**30:.1f} GiB, free {free / 2**30:.0f} GiB)")
    try:
        root = work / "u"
        root.mkdir()
        prim, sec = StorageUnit(root / "prim"), StorageUnit(root / "sec")
        n_tracks = size // TRACK
        chunk = np.random.default_rng(9).integers(0, 256, 16 << 20, dtype=np.uint8).tobytes()
        t = time.perf_counter()
        paths = []
        for a, b, c in _names(triplets):
            for unit, name in ((prim, a), (sec, b), (sec, c)):
                v = unit.create_volume(name, n_tracks, TRACK)
                paths.append(v.path)
        prim.close()
        sec.close()
        for p in paths:                         # large sequential writes
            fd = os.open(p, os.O_WRONLY)
            try:
                for off in range(0, size, len(chunk)):
                    os.pwrite(fd, chunk, off)
                os.fdatasync(fd)
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            finally:
                os.close(fd)
        out["fill_s"] = time.perf_counter() - t
        out["fill_mb_s"] = out["total_bytes"] / out["fill_s"] / 1e6
        log(f"    written whole in {out['fill_s']:.0f} s ({out['fill_mb_s']:.0f} MB/s); "
            f"the disk's random 4 KiB writes over them ({seconds / 2:g} s + sync)")
        out["disk_random"] = _random_pwrite(paths, size, seconds / 2)
        log(f"    disk random writes: {out['disk_random']['mb_s']:.1f} MB/s with the sync; "
            f"Global Mirror under unpaced writers ({seconds:g} s)")
        dev = block_device(work)
        units, trips = _open(root, triplets, "process")
        try:
            gm = GlobalMirror(trips, cg_interval=0.0, initial_copy=False)
            s0 = sectors_written(dev)
            writers, elapsed = run_under_writers(gm, [t[0] for t in trips], seconds, threads=2,
                                                 seed=5, io_size=4096)
            host = writers.bytes
            t = time.perf_counter()
            os.sync()
            out["sync_after_s"] = time.perf_counter() - t
            s1 = sectors_written(dev)
            st = gm.stats
            ph = st.phase_percentiles()
            out.update({"cgs": st.successes, "attempts": st.attempts,
                        "failures": dict(st.failures), "elapsed_s": elapsed,
                        "cgs_per_s": st.successes / elapsed,
                        "rpo_p50_ms": ph["rpo"]["p50"] * 1e3,
                        "rpo_p99_ms": ph["rpo"]["p99"] * 1e3,
                        "drain_p99_ms": ph["drain"]["p99"] * 1e3,
                        "flashcopy_p99_ms": ph["flashcopy"]["p99"] * 1e3,
                        "write_mb_s": host / elapsed / 1e6,
                        "write_mb_s_with_sync": host / (elapsed + out["sync_after_s"]) / 1e6})
            if s0 is not None and s1 is not None:
                out["dev_per_host_byte"] = (s1 - s0) * 512 / max(host, 1)
            gm.close(discard=True)
        finally:
            for u in units:
                u.close()
        log(f"    {out['cgs_per_s']:.1f} CG/s, RPO p99 {out['rpo_p99_ms']:.0f} ms, writers "
            f"{out['write_mb_s']:.1f} MB/s ({out['write_mb_s_with_sync']:.1f} with the sync)")
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return out
