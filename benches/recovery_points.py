"""Recovery points: the issue's four figures, each as a ratio against a
baseline measured in the same run.

- :func:`write_steady`: a 4 KiB random host write to a volume holding 1,000
  points in a steady retention window (each interval takes a point and
  expires the oldest) against the same write to a volume with none.
- :func:`write_durable`: the same steady window with the points durable in
  a storage unit on tmpfs (the pool and log files mapped shared), against
  the same write to another volume of that unit with none.
- :func:`write_cost`: the worst case: 20,000 writes into one fresh interval
  (nearly every one the first to its grain, copied into memory the pool has
  not used before: provisioned ahead with ``PointChain.reserve``, or not).
- :func:`take_cost`: taking a point of N volumes at one instant against the
  FlashCopy phase of a Global Mirror CG over N triplets (the session's own
  phase times), N = 16 and 256.
- :func:`schedule_cost`: a CG's FlashCopy phase on a session whose
  schedule takes a point of every C after each CG (20 kept) against the
  same session without a schedule, 16 triplets.
- :func:`restore_1tib`: restoring a point of a 1 TiB thin volume (2^24
  tracks of 64 KiB, on the disk) onto a 1 TiB thin recovery volume (the call
  returns with the recovery volume readable), against establishing a
  FlashCopy between the same two volumes (both O(bitmap)).
- :func:`space`: 1,000 points, each interval writing a few hundred random
  grains: the points' bytes against the changed grains' bytes.

``python -m benches recovery_points`` runs it (``--quick``: smaller).
"""

from __future__ import annotations

import gc
import os
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np

from fastfc import FlashCopy, GlobalMirror, PointChain, Volume, take_points

from benches.gm import close_triplets, make_triplets

TRACK = 65536
GRAIN = 4096


def _volume(mib: int) -> Volume:
    v = Volume(mib * 2**20 // TRACK, TRACK, grain_size=GRAIN)
    v._raw_array().fill(1)        # fault the pages in before timing
    return v


def _hold_points(v: Volume, n_points: int, writes_between: int, rng) -> None:
    """Take ``n_points`` points of ``v``, with random 4 KiB writes between."""
    data = np.full(GRAIN, 7, dtype=np.uint8)
    for _ in range(n_points):
        take_points([v])
        for off in rng.integers(0, v.n_grains, writes_between) * GRAIN:
            v.write(int(off), data)


def _time_writes(v: Volume, offsets: np.ndarray) -> float:
    """Seconds per write of 4 KiB at each offset."""
    data = np.full(GRAIN, 9, dtype=np.uint8)
    write = v.write
    t0 = time.perf_counter()
    for off in offsets:
        write(off, data)
    return (time.perf_counter() - t0) / len(offsets)


def write_cost(points: int = 1000, mib: int = 256, writes: int = 20000, rounds: int = 5,
               reserve: bool = True, log=print) -> dict:
    """A 4 KiB write with ``points`` points held against none. ``reserve``:
    the chain's pool is provisioned first (:meth:`PointChain.reserve`), so
    copy-on-write lands in memory already touched; without it every new
    pool page is a fresh page fault (on this VM ~20 us a page)."""
    rng = np.random.default_rng(1)
    plain, held = _volume(mib), _volume(mib)
    if reserve:
        PointChain.of(held).reserve((points * 16 + 2 * writes) * GRAIN)
    _hold_points(held, points, 16, rng)
    chain = held._chain
    runs: dict[str, list[float]] = {"none": [], "points": []}
    for r in range(rounds):
        offsets = [int(o) for o in rng.integers(0, held.n_grains, writes) * GRAIN]
        take_points([held])     # a fresh interval: these writes copy their grains
        for name in (("none", "points") if r % 2 == 0 else ("points", "none")):
            runs[name].append(_time_writes(plain if name == "none" else held, offsets))
        chain.expire_oldest()   # keep `points` held
    out = {"points": points, "mib": mib, "writes": writes, "rounds": rounds,
           "reserved": reserve, "held": len(chain.points)}
    _write_figures(out, runs, paired=False)
    log(f"    4 KiB write{'' if reserve else ' (pool not reserved)'}: none "
        f"{out['none_median_us']:.2f} us, {points} points "
        f"{out['points_median_us']:.2f} us (x{out['ratio']:.2f})")
    plain.close()
    held.close()
    return out


def _write_figures(out: dict, times: dict, paired: bool) -> dict:
    """Add to ``out`` the figures of a write timed with points held and with
    none (``times``: seconds per write, keys "points" and "none"): each in
    us, their medians, the ratio (with ``paired``, the median of the ratios
    of runs timed side by side; else the ratio of the medians) and the
    min/min ratio."""
    out["none_us"] = [x * 1e6 for x in times["none"]]
    out["points_us"] = [x * 1e6 for x in times["points"]]
    out["none_median_us"] = statistics.median(out["none_us"])
    out["points_median_us"] = statistics.median(out["points_us"])
    if paired:
        out["ratios"] = [p / n for p, n in zip(times["points"], times["none"])]
        out["ratio"] = statistics.median(out["ratios"])
    else:
        out["ratio"] = out["points_median_us"] / out["none_median_us"]
    out["ratio_min"] = min(out["points_us"]) / min(out["none_us"])
    return out


def write_steady(points: int = 1000, mib: int = 256, per_interval: int = 200,
                 intervals: int = 200, log=print) -> dict:
    """A 4 KiB write with ``points`` points held in a steady state: each
    interval takes a point and expires the oldest (a retention window), with
    ``per_interval`` random writes in it (copy-on-write for the first to
    each grain). Each interval's writes are timed against the same writes to
    a volume with no points, one right after the other (in turn first), so
    that the machine's drift falls on both; the ratio is the median of the
    intervals' ratios."""
    rng = np.random.default_rng(5)
    plain, held = _volume(mib), _volume(mib)
    _hold_points(held, points, per_interval, rng)        # the window, full
    chain = held._chain
    data = np.full(GRAIN, 9, dtype=np.uint8)
    times: dict[str, list[float]] = {"none": [], "points": []}
    saved = 0           # grains the timed writes copied into the newest point
    for i in range(intervals):
        offsets = [int(o) for o in rng.integers(0, held.n_grains, per_interval) * GRAIN]
        take_points([held])
        chain.expire_oldest()
        for name in (("none", "points") if i % 2 == 0 else ("points", "none")):
            write = (plain if name == "none" else held).write
            t0 = time.perf_counter()
            for off in offsets:
                write(off, data)
            times[name].append((time.perf_counter() - t0) / per_interval)
        saved += chain.points[-1].saved_grains
    out = {"points": points, "mib": mib, "per_interval": per_interval,
           "intervals": intervals, "held": len(chain.points),
           "copied_per_write": saved / (intervals * per_interval)}
    _write_figures(out, times, paired=True)
    log(f"    4 KiB write, steady window of {points} points: none "
        f"{out['none_median_us']:.2f} us, points {out['points_median_us']:.2f} us "
        f"(x{out['ratio']:.2f}; {out['copied_per_write']:.2f} grains copied per write)")
    plain.close()
    held.close()
    return out


def write_durable(points: int = 1000, mib: int = 64, per_interval: int = 200,
                  intervals: int = 100, durability: str = "process", root: Path | None = None,
                  log=print) -> dict:
    """:func:`write_steady` with the points durable: two volumes of one
    storage unit on tmpfs (``/dev/shm`` when there is one, else ``root``),
    one holding ``points`` points (``unit.points``: the pool and log in files
    mapped shared, every saved grain logged), the other none. Each interval
    takes a point and expires the oldest through the unit, then times the
    same random 4 KiB writes on both, in turn first; the ratio is the median
    of the intervals' ratios."""
    from fastfc import StorageUnit
    shm = Path("/dev/shm")
    base = shm if shm.is_dir() and os.access(shm, os.W_OK) else (root or Path(tempfile.gettempdir()))
    work = Path(tempfile.mkdtemp(prefix="fastfc-points-unit-", dir=base))
    rng = np.random.default_rng(6)
    data = np.full(GRAIN, 9, dtype=np.uint8)
    try:
        with StorageUnit(work / "unit", durability=durability) as u:
            vols = {}
            for name in ("plain", "held"):
                v = vols[name] = u.create_volume(name, mib * 2**20 // TRACK, TRACK,
                                                 grain_size=GRAIN)
                v.write(0, np.ones(v.capacity, dtype=np.uint8))
            held = vols["held"]
            for _ in range(points):                      # the window, full
                u.points.take(["held"])
                for off in rng.integers(0, held.n_grains, per_interval) * GRAIN:
                    held.write(int(off), data)
            times: dict[str, list[float]] = {"none": [], "points": []}
            saved = 0
            for i in range(intervals):
                offsets = [int(o) for o in rng.integers(0, held.n_grains, per_interval) * GRAIN]
                u.points.take(["held"])
                u.points.expire("held", u.points.points("held")[0].seq)
                for name in (("none", "points") if i % 2 == 0 else ("points", "none")):
                    write = vols["plain" if name == "none" else "held"].write
                    t0 = time.perf_counter()
                    for off in offsets:
                        write(off, data)
                    times[name].append((time.perf_counter() - t0) / per_interval)
                saved += u.points.points("held")[-1].saved_grains
            chain = held._chain
            out = {"points": points, "mib": mib, "per_interval": per_interval,
                   "intervals": intervals, "durability": durability,
                   "held": len(chain.points), "tmpfs": base == shm,
                   "log_records": chain.log_records,
                   "copied_per_write": saved / (intervals * per_interval)}
    finally:
        shutil.rmtree(work, ignore_errors=True)
    _write_figures(out, times, paired=True)
    log(f"    4 KiB write, {points} durable points held in a unit ({durability}): none "
        f"{out['none_median_us']:.2f} us, points {out['points_median_us']:.2f} us "
        f"(x{out['ratio']:.2f}; {out['copied_per_write']:.2f} grains copied per write)")
    return out


def take_cost(n: int, mib: int = 1, cgs: int = 30, log=print) -> dict:
    """Taking a point of ``n`` volumes at one instant against a CG's
    FlashCopy phase over ``n`` triplets."""
    trips = make_triplets(n, mib, TRACK, GRAIN)
    try:
        gm = GlobalMirror(trips, cg_interval=0.0, initial_copy=False)
        try:
            rng = np.random.default_rng(2)
            data = np.full(GRAIN, 3, dtype=np.uint8)
            for _ in range(cgs):
                for a, _, _ in trips:      # a few writes, so each CG has work
                    a.write(int(rng.integers(0, a.n_grains)) * GRAIN, data)
                gm.form_consistency_group()
            flash = list(gm.stats.flash_times)[-cgs:]
        finally:
            gm.close(discard=True)
        vols = [t[0] for t in trips]
        takes = []
        for _ in range(cgs):
            for v in vols:
                v.write(int(rng.integers(0, v.n_grains)) * GRAIN, data)
            t0 = time.perf_counter()
            take_points(vols)
            takes.append(time.perf_counter() - t0)
    finally:
        close_triplets(trips)
    out = {"volumes": n, "cgs": cgs, "flash_ms": [x * 1e3 for x in flash],
           "take_ms": [x * 1e3 for x in takes]}
    out["flash_median_ms"] = statistics.median(out["flash_ms"])
    out["take_median_ms"] = statistics.median(out["take_ms"])
    out["ratio"] = out["take_median_ms"] / out["flash_median_ms"]
    log(f"    take of {n} volumes: {out['take_median_ms']:.3f} ms, CG FlashCopy phase "
        f"{out['flash_median_ms']:.3f} ms (x{out['ratio']:.3f})")
    return out


def schedule_cost(n: int = 16, mib: int = 4, cgs: int = 60, keep: int = 20,
                  log=print) -> dict:
    """A CG's FlashCopy phase with a point schedule on the session (a point
    of every C after each CG, ``keep`` kept: each resync then has the
    newest point take the grains it changes on C, and the take and an
    expiry run in the phase) against the same session without one. The two
    sessions form their CGs in turn, with the same writes."""
    from fastfc.copyservices.point_schedule import PointSchedule
    plain_trips = make_triplets(n, mib, TRACK, GRAIN)
    sched_trips = make_triplets(n, mib, TRACK, GRAIN)
    try:
        plain = GlobalMirror(plain_trips, cg_interval=0.0, initial_copy=False, name="plain")
        sched = GlobalMirror(sched_trips, cg_interval=0.0, initial_copy=False, name="sched",
                             points=PointSchedule(every_cgs=1, keep=keep))
        # the take and expiry's share of the phase (the rest: the resyncs'
        # saves of C's changed grains into the newest points)
        sp = sched._points
        assert sp is not None
        takes: list[float] = []
        after_commit = sp.after_commit

        def timed(*args):
            t0 = time.perf_counter()
            try:
                return after_commit(*args)
            finally:
                takes.append(time.perf_counter() - t0)

        sp.after_commit = timed         # type: ignore[method-assign]
        try:
            rng = np.random.default_rng(3)
            data = np.full(GRAIN, 5, dtype=np.uint8)
            for _ in range(cgs):
                offs = [int(rng.integers(0, plain_trips[0][0].n_grains)) * GRAIN
                        for _ in range(4 * n)]
                for k, off in enumerate(offs):    # the same writes on both
                    plain_trips[k % n][0].write(off, data)
                    sched_trips[k % n][0].write(off, data)
                assert plain.form_consistency_group().committed
                assert sched.form_consistency_group().committed
            f_plain = list(plain.stats.flash_times)[-cgs // 2:]
            f_sched = list(sched.stats.flash_times)[-cgs // 2:]
            held = len(sched.scheduled_points())
        finally:
            plain.close(discard=True)
            sched.close(discard=True)
    finally:
        close_triplets(plain_trips)
        close_triplets(sched_trips)
    out = {"triplets": n, "cgs": cgs, "keep": keep, "points_held_per_c": held,
           "plain_median_ms": statistics.median(f_plain) * 1e3,
           "scheduled_median_ms": statistics.median(f_sched) * 1e3,
           "take_expire_median_ms": statistics.median(takes[-(cgs // 2):]) * 1e3}
    out["ratio"] = out["scheduled_median_ms"] / out["plain_median_ms"]
    log(f"    CG FlashCopy phase over {n} triplets with a point of every C each CG "
        f"({keep} kept): {out['scheduled_median_ms']:.3f} ms vs {out['plain_median_ms']:.3f} "
        f"ms without (x{out['ratio']:.2f}; the take and expiry "
        f"{out['take_expire_median_ms']:.3f} ms)")
    return out


def restore_1tib(root: Path, tracks: int = 2**24, rounds: int = 5, log=print) -> dict:
    """Restore a point of a thin volume of ``tracks`` 64 KiB tracks (1 TiB)
    onto a thin recovery volume, against a FlashCopy establish of the same
    two volumes."""
    root.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="fastfc-points-", dir=root))
    try:
        src = Volume(tracks, TRACK, path=work / "src.vol", thin=True, grain_size=GRAIN)
        rec = Volume(tracks, TRACK, path=work / "rec.vol", thin=True, grain_size=GRAIN)
        try:
            data = np.full(GRAIN, 5, dtype=np.uint8)
            p = take_points([src])[0]
            for k in range(64):                  # a few changed grains
                src.write(k * 2**34, data)
            restore, establish = [], []
            for _ in range(rounds):
                t0 = time.perf_counter()
                rs = p.restore(rec, background_copy=False)
                restore.append(time.perf_counter() - t0)
                assert rec.read(0, GRAIN)[0] == 0           # read through the chain
                rs.withdraw(force=True)
                gc.collect()
                t0 = time.perf_counter()
                fc = FlashCopy(src, rec, background_copy=False)
                establish.append(time.perf_counter() - t0)
                fc.withdraw(force=True)
                gc.collect()
            p.expire()
        finally:
            src.close()
            rec.close()
    finally:
        shutil.rmtree(work, ignore_errors=True)
    out = {"tracks": tracks, "capacity_bytes": tracks * TRACK, "rounds": rounds,
           "restore_ms": [x * 1e3 for x in restore],
           "establish_ms": [x * 1e3 for x in establish]}
    out["restore_median_ms"] = statistics.median(out["restore_ms"])
    out["establish_median_ms"] = statistics.median(out["establish_ms"])
    out["ratio"] = out["restore_median_ms"] / out["establish_median_ms"]
    log(f"    restore of a {tracks * TRACK / 2**40:g} TiB thin volume: "
        f"{out['restore_median_ms']:.1f} ms (FlashCopy establish "
        f"{out['establish_median_ms']:.1f} ms)")
    return out


def space(points: int = 1000, mib: int = 256, changed: int = 256, log=print) -> dict:
    """``points`` points, ``changed`` distinct random grains written in
    each interval: the points' bytes against the changed grains' bytes."""
    rng = np.random.default_rng(4)
    v = _volume(mib)
    data = np.full(GRAIN, 8, dtype=np.uint8)
    held = []
    changed_grains = 0
    for _ in range(points):
        held.append(take_points([v])[0])
        grains = rng.choice(v.n_grains, changed, replace=False)
        changed_grains += changed
        for g in grains:
            v.write(int(g) * GRAIN, data)
    chain = v._chain
    per_point = [p.space_bytes for p in held]
    total = chain.space_bytes
    out = {"points": points, "mib": mib, "changed_per_point": changed,
           "changed_bytes": changed_grains * GRAIN, "points_bytes": sum(per_point),
           "chain_bytes": total, "bitmap_bytes": chain.held.nbytes,
           "links_bytes": chain.links_bytes, "chain_ratio": total / (changed_grains * GRAIN),
           "ratio": sum(per_point) / (changed_grains * GRAIN),
           "worst_point_ratio": max(b / (changed * GRAIN) for b in per_point)}
    log(f"    space: {points} points x {changed} changed grains: x{out['ratio']:.4f} of the "
        f"changed grains (worst point x{out['worst_point_ratio']:.4f}); the chain's bitmap "
        f"{out['bitmap_bytes'] / 2**20:.0f} MiB once per volume")
    v.close()
    return out


def run(quick: bool = False, unit_dir: Path | None = None, log=print) -> dict:
    """Every figure (``quick``: smaller volumes and fewer rounds; the 1 TiB
    restore is kept, it is a bitmap)."""
    root = Path(unit_dir) if unit_dir is not None else Path(tempfile.gettempdir())
    return {
        "write_steady": write_steady(points=1000, mib=64 if quick else 256,
                                     per_interval=100 if quick else 200,
                                     intervals=50 if quick else 200, log=log),
        "write_durable": write_durable(points=1000, mib=64,
                                       per_interval=100 if quick else 200,
                                       intervals=30 if quick else 100, root=root, log=log),
        "write": write_cost(points=1000, mib=64 if quick else 256,
                            writes=5000 if quick else 20000, rounds=3 if quick else 5, log=log),
        "write_cold": write_cost(points=1000, mib=64 if quick else 256,
                                 writes=5000 if quick else 20000, rounds=3, reserve=False,
                                 log=log),
        "take": [take_cost(n, cgs=10 if quick else 30, log=log) for n in (16, 256)],
        "schedule": schedule_cost(16, cgs=20 if quick else 60, log=log),
        "restore": restore_1tib(root, rounds=3 if quick else 5, log=log),
        "space": space(points=1000, mib=64 if quick else 256,
                       changed=64 if quick else 256, log=log),
    }


if __name__ == "__main__":
    import json
    import sys
    print(json.dumps(run(quick="--quick" in sys.argv), indent=1)[:4000])
