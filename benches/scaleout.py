"""Scale-out: a Global Mirror session whose B and C volumes live
in secondary units served by Ray actors, against the same session in one
process, in one run.

Both sessions: ``triplets`` triplets of ``size_mib`` MiB with 4 KiB tracks;
A volumes in this process's memory; B and C in durable storage units in
tmpfs (``/dev/shm`` when there is one), durability "process". In one
process, one unit holds every B and C (a local session keeps them in one
unit). Scaled out, ``units`` units (Ray actors on this machine), the
triplets dealt round robin. The first CG (the initial copy, every track)
is timed alone: its drain gives the drain throughput, against
``np.copyto`` of the same bytes measured in the same run. Then two writer
threads of 4 KiB writes paced to ``rate_mbs`` MB/s in all while the session
forms CGs continuously (CG interval 0) for ``seconds``.

Run it as the ``scaleout`` suite: ``python -m benches [--quick] scaleout``.
"""

from __future__ import annotations

import gc
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np

import fastfc
from fastfc.tools.testing import run_under_writers

TRACK = 4096


def _tmp_root() -> Path:
    shm = Path("/dev/shm")
    return Path(tempfile.mkdtemp(prefix="fastfc-scaleout-",
                                 dir=str(shm) if shm.is_dir() else None))


@contextmanager
def _ray() -> Iterator[Any]:
    """Ray for a bench: the running one, or one started here (2 CPUs) and
    shut down after."""
    import ray
    started = not ray.is_initialized()
    if started:
        ray.init(num_cpus=2, include_dashboard=False, namespace="fastfc", log_to_driver=False)
    try:
        yield ray
    finally:
        if started:
            ray.shutdown()


@contextmanager
def _units(start: Callable[..., Any], root: Path, prefix: str, n: int) -> Iterator[list]:
    """``n`` units started by ``start`` (``SecondaryUnit.start`` or
    ``LocalUnit.start``) in ``root``, killed after."""
    hs = [start(root / f"u{i}", name=f"{prefix}-{root.name}-u{i}") for i in range(n)]
    try:
        yield hs
    finally:
        for h in hs:
            h.kill()


def _copyto_bps(nbytes: int) -> float:
    src = np.ones(nbytes, np.uint8)
    dst = np.empty_like(src)
    np.copyto(dst, src)
    best = float("inf")
    for _ in range(3):
        t = time.perf_counter()
        np.copyto(dst, src)
        best = min(best, time.perf_counter() - t)
    return nbytes / best


def _figures(gm: Any, w: Any, elapsed: float, first: Any, rate_mbs: float) -> dict[str, float]:
    st = gm.stats
    pp = st.phase_percentiles()
    return {"cgs_per_s": st.successes / elapsed if elapsed else 0.0,
            "failures": float(sum(st.failures.values())),
            "rpo_p99_ms": pp["rpo"]["p99"] * 1e3, "rpo_p50_ms": pp["rpo"]["p50"] * 1e3,
            "flash_p50_ms": pp["flashcopy"]["p50"] * 1e3,
            "flash_p99_ms": pp["flashcopy"]["p99"] * 1e3,
            "drain_p50_ms": pp["drain"]["p50"] * 1e3,
            "coord_p99_ms": pp["coordination"]["p99"] * 1e3,
            "initial_drain_s": first.drain_time,
            "initial_drain_bps": first.bytes_drained / first.drain_time,
            "write_mb_s": w.bytes / elapsed / 1e6,
            "pace_ratio": w.bytes / elapsed / (rate_mbs * 1e6)}


def _run(gm: Any, primaries: list, seconds: float, rate_mbs: float) -> dict[str, float]:
    first = gm.form_consistency_group()        # the initial copy
    if not first.committed:
        raise RuntimeError(f"the initial copy failed: {first.cause} {first.detail}")
    gm.stats.flash_times.clear()
    gm.stats.drain_times.clear()
    gm.stats.rpo_samples.clear()
    gm.stats.coordination_times.clear()
    gm.stats.successes = 0
    w, elapsed = run_under_writers(gm, primaries, seconds, threads=2, seed=1,
                                   io_size=4096, pace=rate_mbs * 1e6)
    return _figures(gm, w, elapsed, first, rate_mbs)


def one_process(root: Path, triplets: int, size_mib: int, seconds: float,
                rate_mbs: float, durability: str = "process") -> dict[str, float]:
    n = size_mib * 2**20 // TRACK
    unit = fastfc.StorageUnit(root / "local", durability=durability)
    try:
        trips = [(fastfc.Volume(n, TRACK, name=f"a{i}"),
                  unit.create_volume(f"b{i}", n, TRACK), unit.create_volume(f"c{i}", n, TRACK))
                 for i in range(triplets)]
        gm = fastfc.GlobalMirror(trips)
        return _run(gm, [t[0] for t in trips], seconds, rate_mbs)
    finally:
        unit.close()


def scaled_out(root: Path, triplets: int, size_mib: int, seconds: float, rate_mbs: float,
               units: int) -> dict[str, float]:
    from fastfc import remote
    n = size_mib * 2**20 // TRACK
    with _ray(), _units(remote.SecondaryUnit.start, root, "bench", units) as hs:
        trips = []
        for i in range(triplets):
            h = hs[i % units]
            trips.append((fastfc.Volume(n, TRACK, name=f"a{i}"),
                          h.create_volume(f"b{i}", n, TRACK), h.create_volume(f"c{i}", n, TRACK)))
        gm = fastfc.GlobalMirror(trips)
        out = _run(gm, [t[0] for t in trips], seconds, rate_mbs)
        gm.close()
        return out


def scaleout(*, triplets: int = 32, size_mib: int = 32, units: int = 2, seconds: float = 5.0,
             rate_mbs: float = 200.0, log=print) -> dict[str, Any]:
    root = _tmp_root()
    try:
        nbytes = triplets * size_mib * 2**20
        log(f"  scaleout: np.copyto of {nbytes >> 20} MiB")
        copyto = _copyto_bps(min(nbytes, 1 << 30))
        gc.collect()
        log(f"  scaleout: one process, {triplets} x {size_mib} MiB, {seconds:g} s")
        local = one_process(root, triplets, size_mib, seconds, rate_mbs)
        gc.collect()
        log(f"  scaleout: {units} Ray units")
        dist = scaled_out(root, triplets, size_mib, seconds, rate_mbs, units)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    return {"config": {"triplets": triplets, "size_mib": size_mib, "units": units,
                       "seconds": seconds, "rate_mbs": rate_mbs, "track": TRACK},
            "copyto_bps": copyto, "one_process": local, "scaled_out": dist,
            "ratios": {k: (dist[k] / local[k] if local[k] else float("nan"))
                       for k in ("cgs_per_s", "rpo_p99_ms", "flash_p50_ms", "flash_p99_ms",
                                 "initial_drain_bps", "pace_ratio")},
            "drain_vs_copyto": dist["initial_drain_bps"] / copyto,
            "drain_vs_copyto_one_process": local["initial_drain_bps"] / copyto}


def attach_cost(*, triplets: int = 8, size_mib: int = 32, units: int = 2,
                changed: float = 0.01, repeats: int = 3, log=print) -> dict[str, Any]:
    """What a new primary's attach costs against the initial copy it
    replaces, in one run: a session over ``units`` Ray units (A volumes in a
    primary storage unit in tmpfs, random data) forms its first CG (the
    initial copy, timed); the primary process is then "lost" (its unit let
    go as a crash would), ``changed`` of the grains are written, and a new
    primary attaches (``remote.attach``: both sides digest their volumes)
    and forms its first CG. Per repeat (fresh units each): the initial
    copy's seconds, attach's, the first CG's after it, and the bytes each
    sent. Not part of the ``scaleout`` suite: run it as
    ``python -c 'from benches.scaleout import attach_cost; print(attach_cost())'``."""
    from fastfc import remote
    n = size_mib * 2**20 // TRACK
    rng = np.random.default_rng(1)
    runs = []
    with _ray():
        for r in range(repeats):
            root = _tmp_root()
            try:
                with _units(remote.SecondaryUnit.start, root, "attach", units) as hs:
                    p = fastfc.StorageUnit(root / "primary")
                    trips = []
                    for i in range(triplets):
                        h = hs[i % units]
                        a = p.create_volume(f"a{i}", n, TRACK)
                        a.write(0, rng.integers(0, 256, n * TRACK, dtype=np.uint8))
                        trips.append((a, h.create_volume(f"b{i}", n, TRACK),
                                      h.create_volume(f"c{i}", n, TRACK)))
                    gm = fastfc.GlobalMirror(trips)
                    first = gm.form_consistency_group()
                    assert first.committed, first
                    init_s = first.drain_time + first.flash_time + first.coordination_time
                    p.abandon()                   # the primary is lost
                    del gm, trips
                    p = fastfc.StorageUnit(root / "primary")
                    k = max(1, int(n * changed))
                    for i in range(triplets):
                        v = p.volume(f"a{i}")
                        for t in rng.choice(n, k, replace=False):
                            v.write(int(t) * TRACK, rng.integers(0, 256, TRACK, dtype=np.uint8))
                    t = time.perf_counter()
                    gm = remote.attach(p, "gm")
                    attach_s = time.perf_counter() - t
                    res = gm.form_consistency_group()
                    assert res.committed, res
                    cg_s = res.drain_time + res.flash_time + res.coordination_time
                    runs.append({"initial_copy_s": init_s, "initial_bytes": first.bytes_drained,
                                 "attach_s": attach_s, "first_cg_s": cg_s,
                                 "first_cg_bytes": res.bytes_drained})
                    log(f"  attach_cost {r}: {runs[-1]}")
                    gm.close()
                    p.close()
            finally:
                shutil.rmtree(root, ignore_errors=True)
    ratio = sorted((x["attach_s"] + x["first_cg_s"]) / x["initial_copy_s"] for x in runs)
    return {"runs": runs, "attach_and_first_cg_vs_initial_copy": {
                "min": ratio[0], "median": ratio[len(ratio) // 2]},
            "bytes_vs_initial_copy": runs[0]["first_cg_bytes"] / runs[0]["initial_bytes"]}


def data_path(*, mib: int = 16, repeats: int = 10, log=print) -> dict[str, Any]:
    """The ways bulk data could reach a unit, one message of ``mib`` MiB at a
    time, in one run (best of ``repeats``, MiB/s): ``np.copyto`` (the
    baseline); a Ray actor call carrying the drain's shape (pieces of 1 MiB
    of 4 KiB rows, as ``SiteGroup`` sends them) and one contiguous array,
    each sent and answered; a Unix socket stream into a reused buffer in
    another process (what a direct stream beside Ray would cost at best:
    no framing, no fencing). Not part of the ``scaleout`` suite: run it as
    ``python -c 'from benches.scaleout import data_path; print(data_path())'``."""
    import os
    import socket

    nbytes = mib << 20

    def best(fn) -> float:
        t_best = float("inf")
        for _ in range(repeats):
            t = time.perf_counter()
            fn()
            t_best = min(t_best, time.perf_counter() - t)
        return nbytes / t_best / 2**20

    out: dict[str, float] = {}
    with _ray() as ray:
        src = np.ones(nbytes, np.uint8)
        dst = np.empty_like(src)
        out["np_copyto"] = best(lambda: np.copyto(dst, src))

        @ray.remote(num_cpus=0)
        class Sink:
            def take(self, updates) -> int:
                return sum(int(rows.size) for _, _, rows in updates)

        sink = Sink.remote()
        per = 1 << 20
        pieces = [("b", np.arange(per // TRACK, dtype=np.int64) * TRACK,
                   src[i:i + per].reshape(-1, TRACK)) for i in range(0, nbytes, per)]
        one = [("b", np.arange(nbytes // TRACK, dtype=np.int64) * TRACK,
                src.reshape(-1, TRACK))]
        ray.get(sink.take.remote(pieces))
        out["ray_call_1mib_pieces"] = best(lambda: ray.get(sink.take.remote(pieces)))
        out["ray_call_contiguous"] = best(lambda: ray.get(sink.take.remote(one)))
        ray.kill(sink)

        a, b = socket.socketpair()
        pid = os.fork()
        if pid == 0:                        # the receiving side: into one reused buffer
            try:
                a.close()
                buf = memoryview(np.empty(nbytes, np.uint8))
                for _ in range(repeats + 1):
                    got = 0
                    while got < nbytes:
                        got += b.recv_into(buf[got:], nbytes - got)
                    b.sendall(b"k")
            finally:
                os._exit(0)
        b.close()
        view = memoryview(src)

        def stream() -> None:
            a.sendall(view)
            a.recv(1)
        stream()
        out["unix_socket_stream"] = best(stream)
        a.close()
        os.waitpid(pid, 0)
    log(f"  data_path ({mib} MiB messages, MiB/s): {out}")
    return {"mib_per_s": out,
            "vs_copyto": {k: v / out["np_copyto"] for k, v in out.items()}}


def small_cgs(*, triplets: int = 8, units: int = 2, cgs: int = 300, log=print) -> dict[str, Any]:
    """Where a small CG's time goes over Ray units: ``triplets`` triplets of
    1 MiB over ``units`` units, one 64-byte write per triplet before each
    of ``cgs`` CGs, no writer threads (the round trips and the units' work,
    not the data): each CG's time and its FlashCopy phase's, p50/p99 (ms),
    and CG/s. The same CGs with the units in this process
    (:class:`~fastfc.remote.LocalUnit`, no Ray) are the baseline. Not part
    of the ``scaleout`` suite: run it as ``python -c 'from benches.scaleout
    import small_cgs; print(small_cgs())'``."""
    from fastfc import remote
    n = 256
    out: dict[str, Any] = {}
    with _ray():
        for kind in ("ray", "in_process"):
            root = _tmp_root()
            start = remote.SecondaryUnit.start if kind == "ray" else remote.LocalUnit.start
            try:
                with _units(start, root, "small", units) as hs:
                    trips = [(fastfc.Volume(n, TRACK, name=f"a{i}"),
                              hs[i % units].create_volume(f"b{i}", n, TRACK),
                              hs[i % units].create_volume(f"c{i}", n, TRACK))
                             for i in range(triplets)]
                    gm = fastfc.GlobalMirror(trips)
                    assert gm.form_consistency_group().committed
                    total, flash = [], []
                    t0 = time.perf_counter()
                    for k in range(cgs):
                        for a, _, _ in trips:
                            a.write((k % n) * TRACK, b"x" * 64)
                        t = time.perf_counter()
                        res = gm.form_consistency_group()
                        if not res.committed:
                            raise RuntimeError(f"CG failed: {res.cause} {res.detail}")
                        total.append(time.perf_counter() - t)
                        flash.append(res.flash_time)
                    elapsed = time.perf_counter() - t0
                    gm.close()
                    q = lambda v, p: float(np.percentile(v, p)) * 1e3     # noqa: E731
                    out[kind] = {"cg_p50_ms": q(total, 50), "cg_p99_ms": q(total, 99),
                                 "flash_p50_ms": q(flash, 50), "flash_p99_ms": q(flash, 99),
                                 "cgs_per_s": cgs / elapsed}
            finally:
                shutil.rmtree(root, ignore_errors=True)
    log(f"  small_cgs: {out}")
    return out


def _fixed_cgs(gm: Any, primaries: list, cgs: int, sizes: tuple[int, ...],
               seed: int) -> dict[str, Any]:
    """The initial copy, then ``cgs`` CGs for each of ``sizes`` (interleaved):
    before each, that many 4 KiB writes at random tracks of every A, made
    in this thread (no writer threads: on a loaded machine their share of
    the GIL, not the session, decided how much each CG carried). Per size:
    CG/s over the CGs' own time, each CG's time and its FlashCopy phase's
    (p50/p99, ms)."""
    first = gm.form_consistency_group()
    if not first.committed:
        raise RuntimeError(f"the initial copy failed: {first.cause} {first.detail}")
    rng = np.random.default_rng(seed)
    block = np.full(TRACK, 7, np.uint8)
    times: dict[int, list[float]] = {w: [] for w in sizes}
    flash: dict[int, list[float]] = {w: [] for w in sizes}
    for k in range(cgs * len(sizes)):
        w = sizes[k % len(sizes)]
        for a in primaries:
            for t in rng.integers(0, a.n_tracks, w).tolist():
                a.write(t * TRACK, block)
        t0 = time.perf_counter()
        res = gm.form_consistency_group()
        times[w].append(time.perf_counter() - t0)
        if not res.committed:
            raise RuntimeError(f"CG failed: {res.cause} {res.detail}")
        flash[w].append(res.flash_time)
    q = lambda v, p: float(np.percentile(v, p)) * 1e3     # noqa: E731
    out: dict[str, Any] = {"initial_drain_bps": first.bytes_drained / first.drain_time}
    for w in sizes:
        out[f"{w}_writes"] = {"cgs_per_s": len(times[w]) / sum(times[w]),
                              "cg_p50_ms": q(times[w], 50), "cg_p99_ms": q(times[w], 99),
                              "flash_p50_ms": q(flash[w], 50),
                              "flash_p99_ms": q(flash[w], 99)}
    return out


def power_vs_process(*, triplets: int = 32, size_mib: int = 32, units: int = 2,
                     cgs: int = 30, sizes: tuple[int, ...] = (1, 50), disk: bool = False,
                     pairs: int = 2, log=print) -> dict[str, Any]:
    """What durability "power" costs secondary units: the scaled-out
    session over in-process units (:class:`~fastfc.remote.LocalUnit`, no
    Ray, so the transport's noise is not in it) with its units at
    "process" and at "power", alternating, ``pairs`` times each, in one
    run; after each, the same session in one process (one unit holding
    every B and C, at the same level) as the reference. Each session:
    the initial copy, then ``cgs`` CGs per entry of ``sizes``, each after
    that many 4 KiB writes at random tracks of every A (50: about what a
    CG took at 200 MB/s and 30 CG/s; 1: the CG's fixed cost).
    Returns every session's figures and the ratios power / process of
    the medians (``ratios``; ``one_process_ratios`` for the reference).
    ``disk``: the units in a temporary directory of the disk
    (``/var/tmp``) rather than tmpfs, where the syncs cost what they
    cost. Not part of the ``scaleout`` suite: run it as ``python -c 'from
    benches.scaleout import power_vs_process; power_vs_process()'``."""
    from functools import partial
    from fastfc import remote
    n = size_mib * 2**20 // TRACK
    out: dict[str, Any] = {"config": {"triplets": triplets, "size_mib": size_mib,
                                      "units": units, "cgs": cgs, "sizes": sizes,
                                      "disk": disk, "pairs": pairs}}
    runs: dict[tuple[str, str], list[dict]] = {}

    def show(what: str, figures: dict) -> None:
        log(f"    {what}: initial drain {figures['initial_drain_bps'] / 1e6:.0f} MB/s; "
            + "; ".join(f"{w} writes: " + ", ".join(f"{k} {v:.3g}"
                                                   for k, v in figures[f"{w}_writes"].items())
                        for w in sizes))
    for k, durability in enumerate(("process", "power") * pairs):
        root = (Path(tempfile.mkdtemp(prefix="fastfc-scaleout-", dir="/var/tmp")) if disk
                else _tmp_root())
        log(f"  power_vs_process: {units} in-process units at {durability!r}, "
            f"{triplets} x {size_mib} MiB")
        try:
            gc.collect()
            start = partial(remote.LocalUnit.start, durability=durability)
            with _units(start, root, f"durability-{durability}", units) as hs:
                trips = [(fastfc.Volume(n, TRACK, name=f"a{i}"),
                          hs[i % units].create_volume(f"b{i}", n, TRACK),
                          hs[i % units].create_volume(f"c{i}", n, TRACK))
                         for i in range(triplets)]
                gm = fastfc.GlobalMirror(trips)
                figures = _fixed_cgs(gm, [t[0] for t in trips], cgs, sizes, seed=k)
                gm.close()
            runs.setdefault(("units", durability), []).append(figures)
            show(f"units, {durability}", figures)
            gc.collect()
            unit = fastfc.StorageUnit(root / "local", durability=durability)
            try:
                trips = [(fastfc.Volume(n, TRACK, name=f"a{i}"),
                          unit.create_volume(f"b{i}", n, TRACK),
                          unit.create_volume(f"c{i}", n, TRACK)) for i in range(triplets)]
                gm = fastfc.GlobalMirror(trips)
                figures = _fixed_cgs(gm, [t[0] for t in trips], cgs, sizes, seed=k)
                gm.close()
            finally:
                unit.close()
            runs.setdefault(("one_process", durability), []).append(figures)
            show(f"one process, {durability}", figures)
        finally:
            shutil.rmtree(root, ignore_errors=True)

    def median(where: str, durability: str, key: str, w: int | None) -> float:
        vals = [f[key] if w is None else f[f"{w}_writes"][key] for f in runs[where, durability]]
        return float(np.median(vals))
    keys = ("cgs_per_s", "cg_p50_ms", "cg_p99_ms", "flash_p50_ms", "flash_p99_ms")
    for where in ("units", "one_process"):
        med = {d: {"initial_drain_bps": median(where, d, "initial_drain_bps", None),
                   **{f"{w}_writes": {k: median(where, d, k, w) for k in keys} for w in sizes}}
               for d in ("process", "power")}
        out[where] = {"runs": {d: runs[where, d] for d in ("process", "power")},
                      "medians": med}
        out["ratios" if where == "units" else "one_process_ratios"] = {
            "initial_drain_bps": med["power"]["initial_drain_bps"]
            / med["process"]["initial_drain_bps"],
            **{f"{w}_writes": {k: med["power"][f"{w}_writes"][k]
                               / med["process"][f"{w}_writes"][k] for k in keys}
               for w in sizes}}
    log(f"  power_vs_process: ratios power / process, units: {out['ratios']}; "
        f"one process: {out['one_process_ratios']}")
    return out


def stream_vs_ray_calls(*, pairs: int = 2, log=print, **cfg: Any) -> dict[str, Any]:
    """The ``scaleout`` suite with the units' calls over Ray's actor calls
    (``rayunit.STREAM = False``, the path before the direct stream) and
    over each unit's direct stream (the default), alternating, ``pairs``
    times each, in one run on one Ray cluster; each run with its own
    one-process session as the reference. ``cfg`` goes to :func:`scaleout`.
    Not part of the suite: run it as ``python -c 'from benches.scaleout
    import stream_vs_ray_calls; print(stream_vs_ray_calls())'``."""
    from fastfc.remote import rayunit
    runs: dict[str, list] = {"ray_calls": [], "stream": []}
    with _ray():
        try:
            for k in range(pairs):
                for kind in ("ray_calls", "stream"):
                    rayunit.STREAM = kind == "stream"
                    log(f"  stream_vs_ray_calls: pair {k}, {kind}")
                    d = scaleout(log=log, **cfg)
                    runs[kind].append(d)
                    log(f"    {kind}: scaled out {_row(d['scaled_out'], d['copyto_bps'])}; "
                        f"one process {_row(d['one_process'], d['copyto_bps'])}")
        finally:
            rayunit.STREAM = True
    return runs


def _row(f: dict[str, float], copyto: float) -> str:
    return (f"{f['cgs_per_s']:.1f} CG/s, RPO p99 {f['rpo_p99_ms']:.1f} ms, FlashCopy p50/p99 "
            f"{f['flash_p50_ms']:.1f}/{f['flash_p99_ms']:.1f} ms, initial drain "
            f"{f['initial_drain_bps'] / copyto:.3f} x np.copyto, pace {f['pace_ratio']:.2f}")
