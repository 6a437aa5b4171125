"""Global Mirror figures for the runner's ``gm`` and ``durable`` suites: the
session under host writes, against the pure-NumPy engine's session on the
same volumes, and durable storage units against memory.

``global_mirror``: ``triplets`` triplets of ``size_mib`` MiB, two writer threads of
4 KiB random writes paced at ``rate`` MB/s combined, CG interval 0. fastfc's
session is measured first (``benches/gm.py``: host write throughput alone,
then the paced session, then an unpaced one); then the same three runs of
:class:`~benches.engine_numpy.NpGlobalMirror` over the very same arrays, so
no more memory is needed.

``durable``: the same workload (fewer triplets: the volumes are files) with the
volumes in two :class:`fastfc.StorageUnit` directories on a real disk,
against the same volumes in memory; and the fsyncs per consistency group at
two volume sizes (``SQLiteStore.fsyncs``).
"""

from __future__ import annotations

import gc
import os
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np

from benches.engine_numpy import NpGlobalMirror, NpVolume
from benches.gm import close_triplets, make_triplets, session_figures, three_runs
from fastfc import GlobalMirror, StorageUnit


# --------------------------------------------------------------------------
# fastfc's session and the NumPy engine's, same volumes
# --------------------------------------------------------------------------

def _np_session(triplets, seconds: float, rate: float | None) -> dict:
    gm = NpGlobalMirror(triplets)
    out = session_figures(gm, [t[0] for t in triplets], seconds, rate, seed=1,
                          settle=gm.form_cg)       # B catches up with A
    gm.close()
    return out


def global_mirror(triplets: int, size_mib: int, seconds: float, rate_mbs: float,
                  log=print) -> dict:
    """The Global Mirror workload on fastfc, then on the NumPy engine (same arrays)."""
    trips = make_triplets(triplets, size_mib)
    try:
        ours = three_runs(trips, seconds, rate_mbs, log=log)
        # the NumPy engine over the same bytes (fastfc's pairs and
        # relationships are gone; the arrays stay)
        nps = [tuple(NpVolume(v.n_tracks, v.track_size, array=v._raw_array(), name=f"np-{v.name}")
                     for v in t) for t in trips]
        theirs = three_runs(nps, seconds, rate_mbs, _np_session, log, "NumPy engine")
        del nps
    finally:
        close_triplets(trips)
        del trips
        gc.collect()
    return {"config": {"triplets": triplets, "size_mib": size_mib, "seconds": seconds,
                       "rate_mbs": rate_mbs},
            "fastfc": ours, "numpy": theirs}


# --------------------------------------------------------------------------
# Durable storage units against memory
# --------------------------------------------------------------------------

def filesystem_of(path: Path) -> str:
    """``device on mountpoint type fstype`` for the mount holding ``path``."""
    path = path.resolve()
    best = None
    with open("/proc/mounts") as f:
        for line in f:
            dev, mnt, fstype = line.split()[:3]
            if (str(path) == mnt or str(path).startswith(mnt.rstrip("/") + "/")) and \
                    (best is None or len(mnt) > len(best[1])):
                best = (dev, mnt, fstype)
    return f"{best[0]} on {best[1]} ({best[2]})" if best else "unknown"


def _unit_triplets(root: Path, n: int, n_tracks: int, track: int, thin: bool = False,
                   durability: str = "process", grain: int | None = None):
    a_unit = StorageUnit(root / "site1", durability=durability)
    b_unit = StorageUnit(root / "site2", durability=durability)
    trips = []
    for i in range(n):
        trips.append((a_unit.create_volume(f"A{i:03d}", n_tracks, track, thin=thin,
                                           grain_size=grain),
                      b_unit.create_volume(f"B{i:03d}", n_tracks, track, thin=thin,
                                           grain_size=grain),
                      b_unit.create_volume(f"C{i:03d}", n_tracks, track, thin=thin,
                                           grain_size=grain)))
    return (a_unit, b_unit), trips


def _vmstat() -> dict[str, int]:
    """Pages dirtied and written back so far (the whole machine)."""
    out = {}
    try:
        with open("/proc/vmstat") as f:
            for line in f:
                k, v = line.split()
                if k in ("nr_dirtied", "nr_written"):
                    out[k] = int(v)
    except OSError:
        pass
    return out


def _session(trips, seconds: float, rate: float | None, units=()) -> dict:
    gm = GlobalMirror(trips, cg_interval=0.0, initial_copy=False)
    f0 = sum(u.store.fsyncs for u in units)
    v0 = _vmstat()
    out = session_figures(gm, [t[0] for t in trips], seconds, rate, seed=3)
    v1 = _vmstat()
    elapsed = out["elapsed_s"]
    if units:
        fsyncs = sum(u.store.fsyncs for u in units) - f0
        out["fsyncs"] = fsyncs
        out["fsyncs_per_attempt"] = fsyncs / max(1, out["attempts"])
    if v0 and v1:
        page = 4096
        dirtied = (v1["nr_dirtied"] - v0["nr_dirtied"]) * page
        out["pages_dirtied_mb_s"] = dirtied / elapsed / 1e6
        out["written_back_mb_s"] = (v1["nr_written"] - v0["nr_written"]) * page / elapsed / 1e6
        if units and out["write_mb_s"] > 0:   # (the whole machine's pages: a noisy upper bound)
            out["dirtied_per_host_byte"] = dirtied / (out["write_mb_s"] * 1e6 * elapsed)
    gm.close()
    return out


def fsync_latency(directory: Path, n: int = 20) -> float:
    """Median seconds of a 4 KiB write + ``fsync`` of a file in ``directory``
    (what each durable commit of SQLite costs there, at least)."""
    fd, name = tempfile.mkstemp(dir=directory, prefix="fsync-")
    try:
        times = []
        block = os.urandom(4096)
        for _ in range(n):
            os.pwrite(fd, block, 0)
            t0 = time.perf_counter()
            os.fsync(fd)
            times.append(time.perf_counter() - t0)
        return float(np.median(times))
    finally:
        os.close(fd)
        os.unlink(name)


def _units_session(root: Path, triplets: int, n_tracks: int, track: int, seconds: float,
                   rate: float | None, grain: int | None = None) -> dict:
    units, trips = _unit_triplets(root, triplets, n_tracks, track, grain=grain)
    try:
        for t in trips:
            for v in t:
                v._raw_array().fill(0)         # allocate the file's blocks, fault the pages in
        for u in units:
            u.flush()
        os.sync()
        return _session(trips, seconds, rate, units)
    finally:
        for u in units:
            u.close()
        shutil.rmtree(root, ignore_errors=True)


def durable(root: Path, triplets: int, size_mib: int, seconds: float, rate_mbs: float,
            sizes: tuple[int, int], fsync_cgs: int, log=print, shm: str = "/dev/shm") -> dict:
    """CG rate on storage units in ``root`` (a real disk) against memory,
    and on units in ``shm`` (tmpfs: fsync costs nothing) to tell the fsync
    from the rest (units at the default durability, "process"); fsyncs per CG
    at two volume sizes (``sizes``: tracks of 4 KiB; the files are sparse),
    at durability "power"."""
    root.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="fastfc-units-", dir=root))
    out: dict = {"dir": str(work), "filesystem": filesystem_of(work),
                 "fsync_s": fsync_latency(work),
                 "config": {"triplets": triplets, "size_mib": size_mib, "seconds": seconds,
                            "rate_mbs": rate_mbs}}
    track = 65536
    n_tracks = size_mib * 2**20 // track
    try:
        # the same workload, in memory and on units (memory first)
        trips = make_triplets(triplets, size_mib)
        for a, b, _ in trips:
            b._raw_array()[:] = a._raw_array()
        log(f"    in memory: {triplets} triplets x {size_mib} MiB ({seconds:g} s)")
        out["memory"] = _session(trips, seconds, rate_mbs * 1e6)
        close_triplets(trips)
        del trips
        gc.collect()
        log(f"    on storage units in {work} ({out['filesystem']}; fsync "
            f"{out['fsync_s'] * 1e3:.2f} ms): same ({seconds:g} s)")
        out["units"] = _units_session(work / "cg-rate", triplets, n_tracks, track, seconds,
                                      rate_mbs * 1e6)
        tmp = Path(tempfile.mkdtemp(prefix="fastfc-units-", dir=shm))
        try:
            log(f"    on storage units in {tmp} (tmpfs): same ({seconds:g} s)")
            out["units_tmpfs"] = _units_session(tmp / "cg-rate", triplets, n_tracks, track,
                                                seconds, rate_mbs * 1e6)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)

        # fsyncs per CG at two volume sizes
        out["fsyncs"] = {}
        for n in sizes:
            # durability "power": the level whose CG syncs its commit ("process"
            # fsyncs nothing per CG)
            units, trips = _unit_triplets(work / f"fsync-{n}", 4, n, 4096, thin=True,
                                          durability="power")
            try:
                # the files are sparse (thin volumes): the CGs write to 64
                # tracks of each volume whose blocks exist already (a first
                # write reserves them), so that the time per CG is not ext4
                # allocating blocks (~ms per 4 KiB hole)
                rng = np.random.default_rng(n)
                hot = [rng.choice(n, 64, replace=False) * 4096 for _ in trips]
                zero = np.zeros(4096, np.uint8)
                for t, offs in zip(trips, hot):
                    for v in t:
                        for off in offs:
                            v.write(int(off), zero)
                for u in units:
                    u.flush()
                os.sync()
                gm = GlobalMirror(trips, cg_interval=0.0, initial_copy=False)
                data = np.ones(4096, np.uint8)
                gm.form_consistency_group()
                f0 = sum(u.store.fsyncs for u in units)
                t0 = time.perf_counter()
                ok = 0
                for _ in range(fsync_cgs):
                    for (a, _, _), offs in zip(trips, hot):
                        for o in rng.choice(offs, 8, replace=False):
                            a.write(int(o), data)
                    ok += gm.form_consistency_group().committed
                elapsed = time.perf_counter() - t0
                fs = sum(u.store.fsyncs for u in units) - f0
                out["fsyncs"][n] = {"cgs": fsync_cgs, "committed": ok, "fsyncs": fs,
                                    "per_cg": fs / fsync_cgs, "ms_per_cg": elapsed / fsync_cgs * 1e3}
                log(f"    fsyncs per CG at {n} tracks: {fs / fsync_cgs:g}")
                gm.close()
            finally:
                for u in units:
                    u.close()
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return out
