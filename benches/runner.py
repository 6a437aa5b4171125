"""fastfc's benchmark runner: every suite, each figure a ratio against a
baseline measured in the same run (``python -m benches`` in a checkout).

Suites, in the order they run (name some to run only those; ``--list``):

physical  the physical limit: ``np.copyto`` / libc ``memcpy`` on one and two
          threads, and fastfc copying on two worker threads
core      the cases of ``cases.py`` (also a pytest-benchmark suite:
          ``pytest benches/test_bench_core.py --benchmark-only``); ``--case``
          picks some by name
engine    fastfc against the pure-NumPy engine (``engine_numpy.py``) on
          4 KiB-track workloads (``engine_cases.py``)
numba     fastfc against numba-jitted kernels (copy runs, copy-on-write,
          bitmap count and scan)
qemu      the real peer (``qemu_peer.py``): QEMU's ``blockdev-backup`` (full
          and incremental) between raw files in /dev/shm, default and tuned,
          against fastfc on file-backed volumes over the same files (skipped
          without QEMU)
scaling   cost against volume size, track size, targets, Global Mirror
          triplets and the fraction of changed tracks (``scaling.py``, plotted)
durable   Global Mirror on storage units on a disk and in tmpfs against memory,
          and fsyncs per consistency group at two volume sizes
          (``mirror_cases.durable``)
durable_steady  the steady state at both durability levels, units on the disk
          and in tmpfs interleaved (``durable_steady.py``)
gm        Global Mirror in memory against the same session on the NumPy
          engine (``gm.py``, ``mirror_cases.global_mirror``)
grain     64 KiB tracks under 4 KiB writes: the 4 KiB grain against a grain
          of the track, at 16, 1,024 and 4,096 triplets in memory and on disk
          units (bytes copied and bytes to the disk per host byte), the
          bitmap summaries, and the cost of an idle (or mostly idle) CG at
          4,096 triplets against 16, against every triplet stepped
          (``grain.py``)
scaleout  2 secondary units as Ray actors against the same session in one
          process (``scaleout.py``; skipped without Ray)
serve     ``fastfc serve`` (``serve.py``): fio and nbdcopy against it, nbdkit's
          memory plugin and qemu-nbd, interleaved, one export in /dev/shm
          each (skipped, naming the apt packages, without fio, nbdcopy,
          nbdkit, qemu-nbd)
nbd_map   changed-block export (``nbd_map.py``): listing the changed
          extents (``nbdinfo --map=qemu:dirty-bitmap:T``) of a thin volume
          on the disk with 1 % of its tracks written, against reading it
          whole (``nbdcopy --no-extents``); an incremental backup of it
          against a full copy, bytes moved and time; FASTFC_BENCH_MAP_GIB
          sets the volume's size [16; quick 1] (skipped without libnbd-bin)
serve_gm  a Global Mirror session in ``fastfc serve`` (``resumegmir``) under
          fio 4 KiB randwrite QD16 on its A exports (``serve.py``): client
          IOPS with it running / paused, CG/s, RPO p50/p99, and read-only
          commands (``lsvol``, ``showgmir``, ``lsflash``) as client processes
          under that load (the console script's lean front door and the full
          command line) against the idle server; 64 KiB and 4 KiB tracks
          (skipped without fio)
recovery_points  recovery points (``recovery_points.py``): a 4 KiB host
          write with 1,000 points held vs none (a steady retention window,
          in memory and durable in a unit on tmpfs; and the worst case, a
          fresh interval, pool provisioned or not);
          taking a point of 16 and 256 volumes vs a CG's FlashCopy phase;
          a CG's FlashCopy phase with a point schedule on the session vs none;
          restoring a point of a 1 TiB thin volume on the disk (vs a
          FlashCopy establish); the points' bytes vs their changed grains'
durable_large  opt-in (only when named; about 3-5 min): units whose volumes
          exceed the machine's memory, on the disk, under random writes,
          against the disk's own random-write speed; FASTFC_BENCH_LARGE_GIB
          sets their total size [1.5 x RAM, within 60 % of the free space],
          FASTFC_BENCH_LARGE_SECONDS the run [60]

Ratios: for a speed figure (target ``>=``) ratio = baseline time / fastfc
time (or fastfc rate / baseline rate); for a cost figure (target ``<=``)
ratio = fastfc time / baseline time. A target with a unit (``<= 1 ms``) is
absolute: ``met`` judges the fastfc value, and the ratio against the
baseline of the same run is shown beside it.

The report goes to ``OUT/report.md`` (the table) and ``OUT/report.json``
(every sample), the plots to ``OUT/*.png`` (``-quick`` in the names of a
quick run); OUT is ``bench-results/`` unless ``--out`` says otherwise. The
runner writes nothing else.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import gc
import json
import math
import os
import statistics
import platform
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

import fastfc
from fastfc import _core
from fastfc._optional import require
from benches.cases import CASES, Case, Result, get_case, measure, metadata_rows

REPO = Path(__file__).resolve().parent.parent
SUITES = ["physical", "core", "engine", "numba", "qemu", "scaling", "durable",
          "durable_steady", "gm", "grain", "scaleout", "serve", "nbd_map", "serve_gm",
          "recovery_points", "durable_large"]
OPT_IN = {"durable_large"}     # run only when named
# GiB each suite may hold at its peak (gm: its volumes, worked out there)
SUITE_MEMORY = {"physical": 2.5, "core": 3, "engine": 2, "numba": 2, "qemu": 3,
                "scaling": 3, "durable": 7, "durable_steady": 7, "gm": 0, "scaleout": 4,
                "durable_large": 2, "serve": 5, "nbd_map": 0.5, "serve_gm": 1, "grain": 0,
                "recovery_points": 2}


# --------------------------------------------------------------------------
# Rows
# --------------------------------------------------------------------------

@dataclass
class Row:
    """One line of the report."""

    suite: str
    name: str
    figure: str
    fastfc: str
    baseline: str
    ratio: float | None
    target: str = "-"
    met: bool | None = None
    note: str = ""
    headline: str = ""          # label in the headline table ("" = not a headline)
    check: bool = False         # a complexity check (scaling), not a target
    score: float | None = None  # >= 1: target met, by how much (absolute targets)
    data: dict = field(default_factory=dict)

    def target_score(self) -> float | None:
        """How far the figure is from its target: >= 1 met (log scale)."""
        if self.score is not None:
            return self.score
        if self.met is None or self.ratio is None or self.ratio != self.ratio:
            return None
        parts = self.target.split()
        if len(parts) != 2 or parts[0] not in (">=", "<="):
            return None
        t = float(parts[1])
        if parts[0] == ">=":
            return self.ratio / t if t else None
        return t / self.ratio if self.ratio else float("inf")

    @property
    def met_text(self) -> str:
        if self.met is None:
            return "-"
        if self.check:
            return "ok" if self.met else "off"
        return "met" if self.met else "NOT MET"


def fmt_time(s: float) -> str:
    if s != s:
        return "n/a"
    if s >= 1.0:
        return f"{s:.3f} s"
    if s >= 1e-3:
        return f"{s * 1e3:.2f} ms"
    if s >= 1e-6:
        return f"{s * 1e6:.2f} us"
    return f"{s * 1e9:.0f} ns"


def per_op(seconds: float, ops: int = 1, nbytes: int = 0) -> str:
    """Time per operation, and bandwidth when the figure moves bytes."""
    text = fmt_time(seconds / ops) + ("/op" if ops > 1 else "")
    if nbytes:
        text += f" ({nbytes / seconds / 1e9:.1f} GB/s)"
    return text


def _ratio_text(r: float | None) -> str:
    if r is None or r != r:
        return "-"
    return f"{r:.3g}" if r < 100 else f"{r:.0f}"


def row_from_result(suite: str, r: Result, headline: str = "", figure: str | None = None,
                    target: str | None = None) -> Row:
    c = r.case
    rr = sorted(r.round_ratios())
    return Row(suite, c.name, figure or c.figure,
               per_op(r.fastfc_s, r.ops, r.nbytes),
               f"{per_op(r.baseline_s, r.ops, r.nbytes)} {r.baseline_name}",
               r.ratio, target if target is not None else c.target_text,
               r.met if target is None or target != "-" else None,
               note=f"rounds {rr[0]:.3g}..{rr[-1]:.3g}", headline=headline,
               data=r.as_dict())


def role_row(suite: str, r: Result, role: str, name: str, figure: str, target: float,
             headline: str = "") -> Row:
    """fastfc against one named baseline role of a measured case (speed)."""
    ratio = r.median(role) / r.fastfc_s
    return Row(suite, name, figure, per_op(r.fastfc_s, r.ops, r.nbytes),
               f"{per_op(r.median(role), r.ops, r.nbytes)} {role}", ratio,
               f">= {target:g}", ratio >= target, headline=headline,
               data={"case": r.case.name, "role": role})


# --------------------------------------------------------------------------
# Suites
# --------------------------------------------------------------------------

class Report:
    def __init__(self, quick: bool, out: Path, log, unit_dir: Path,
                 cases: list[str] | None = None) -> None:
        self.quick = quick
        self.cases = cases or []    # core: only the cases whose name contains one of these
        self.out = out
        self.log = log
        self.unit_dir = unit_dir
        self.rows: list[Row] = []
        self.raw: dict = {}
        self.results: dict[str, Result] = {}
        self.plots: list[str] = []
        self.skipped: dict[str, str] = {}
        self.timings: dict[str, float] = {}

    def add(self, row: Row) -> None:
        self.rows.append(row)

    def _measure(self, c: Case) -> Result:
        t0 = time.perf_counter()
        self.log(f"  {c.name} ...")
        r = measure(c, quick=self.quick)
        self.results[c.name] = r
        self.log(f"    ratio {r.ratio:.3g} ({time.perf_counter() - t0:.1f} s)")
        gc.collect()
        return r

    def wait_for_memory(self, suite: str, need: int, timeout: float = 600.0) -> bool:
        """Wait until ``need`` bytes are available (the machine is shared);
        False, with the suite marked skipped, if they never are."""
        deadline = time.monotonic() + timeout
        said = False
        while True:
            have = available_memory()
            if have is None or have >= need:
                return True
            if time.monotonic() > deadline:
                msg = (f"needs {need / 2**30:.1f} GiB of memory, only {have / 2**30:.1f} GiB "
                       f"available after waiting {timeout:.0f} s")
                self.skipped[suite] = msg
                self.log(f"  skipped: {msg}")
                return False
            if not said:
                self.log(f"  waiting for memory: {need / 2**30:.1f} GiB needed, "
                         f"{have / 2**30:.1f} GiB available (other processes)")
                said = True
            time.sleep(5)

    # -- physical ---------------------------------------------------------
    def physical(self) -> None:
        from benches.engine_cases import PHYSICAL_CASES
        r = self._measure(PHYSICAL_CASES[0])
        t1, t2 = r.median("np.copyto, 1 thread"), r.median("np.copyto, 2 threads")
        m1 = r.median("memcpy, 1 thread")
        gb = r.nbytes / 1e9
        size = f"{r.nbytes >> 20} MiB" if r.nbytes < 1 << 30 else f"{r.nbytes >> 30} GiB"
        self.add(Row("physical", "copyto_2threads",
                     f"physical limit: np.copyto of {size} on two threads vs one",
                     f"{fmt_time(t2)} ({gb / t2:.1f} GB/s)",
                     f"{fmt_time(t1)} ({gb / t1:.1f} GB/s) np.copyto, 1 thread", t1 / t2,
                     note=f"libc memcpy, 1 thread: {gb / m1:.1f} GB/s", data=r.as_dict()))
        self.add(Row("physical", "fastfc_2workers",
                     f"fastfc background copy of {size} on two worker threads vs np.copyto "
                     "on two threads",
                     per_op(r.fastfc_s, 1, r.nbytes),
                     f"{per_op(t2, 1, r.nbytes)} np.copyto, 2 threads", t2 / r.fastfc_s,
                     note=f"vs np.copyto on one thread: {t1 / r.fastfc_s:.3g}"))

    # -- core -------------------------------------------------------------
    def core(self) -> None:
        heads = {"bg_copy_caller": "background copy, 1 GiB, vs np.copyto",
                 "incr_copy_10pct": "incremental copy of 10% of the tracks, vs np.copyto",
                 "write_4k_3tgt_copied": "4 KiB write, 3 targets (cost vs slice assignment)"}
        for c in CASES:
            if self.cases and not any(s in c.name for s in self.cases):
                continue
            r = self._measure(c)
            self.add(row_from_result("core", r, heads.get(c.name, "")))
        if self.cases and not any(s in "metadata_bytes" for s in self.cases):
            return
        meta = metadata_rows()
        worst = max(m["metadata_bytes"] / m["allowance_bytes"] for m in meta)
        big = [m for m in meta if m["tracks"] == max(x["tracks"] for x in meta)]
        self.add(Row("core", "metadata_bytes",
                     "FlashCopy metadata (2^10 and 2^24 tracks) vs 3 bits/track/relationship "
                     "(+3 while revertible)",
                     ", ".join(f"{m['bits_per_track']:.2f}" for m in big) + " bits/track",
                     "allowance 3, 3, 6 bits/track", worst, "<= 1", worst <= 1,
                     data={"rows": meta}))

    # -- engine -----------------------------------------------------------
    def engine(self) -> None:
        from benches.engine_cases import ENGINE_CASES
        for c in ENGINE_CASES:
            r = self._measure(c)
            row = row_from_result("engine", r)
            speed = self.copyto_speed()
            if r.nbytes and speed:
                # fastfc can be at most this fast: the bytes at np.copyto speed
                ceiling = r.baseline_s / (r.nbytes / speed)
                row.note += (f"; at np.copyto speed fastfc would be {ceiling:.3g} x the "
                             "NumPy engine here")
                row.data["ceiling"] = ceiling
            self.add(row)
        ratios = [row.ratio for row in self.rows if row.suite == "engine"]
        self.raw["engine_geomean"] = float(np.exp(np.mean(np.log(ratios))))

    def copyto_speed(self) -> float | None:
        """Bytes/s of a 1-thread np.copyto measured earlier in this run."""
        for name, role in (("bg_copy_caller", "np.copyto"),
                           ("physical_2threads", "np.copyto, 1 thread")):
            r = self.results.get(name)
            if r is not None and role in r.samples:
                return r.nbytes / r.median(role)
        return None

    # -- numba ------------------------------------------------------------
    def numba(self) -> None:
        try:
            import numba  # noqa: F401
        except ImportError:
            self.skipped["numba"] = "numba is not installed (pip install numba)"
            return
        from benches.engine_cases import NUMBA_CASES
        for c in NUMBA_CASES:
            r = self._measure(c)
            self.add(row_from_result("numba", r))
        scans = [("count_2p27", "numba popcount loop", "bitmap count, 2^27 bits (16 MiB)"),
                 ("count_2p20", "numba popcount loop", "bitmap count, 2^20 bits (in cache)"),
                 ("find_next_set_2p27", "numba scan", "bitmap find-next, 2^27 bits (16 MiB)"),
                 ("find_next_set_2p20", "numba scan", "bitmap find-next, 2^20 bits (in cache)")]
        for name, role, fig in scans:
            r = self.results.get(name) or self._measure(get_case(name))
            if role in r.samples:
                self.add(role_row("numba", r, role, f"numba_{name}", f"vs numba: {fig}", 1.0))

    # -- qemu -------------------------------------------------------------
    def qemu(self) -> None:
        from benches import qemu_peer
        if qemu_peer.available() is None:
            msg = (f"{qemu_peer.DAEMON} is not installed: the QEMU peer is skipped "
                   "(Debian/Ubuntu: apt-get install qemu-system-common)")
            self.skipped["qemu"] = msg
            self.log(f"  {msg}")
            return
        q = qemu_peer.compare(self.quick, log=self.log)
        self.raw["qemu"] = q
        m = q["medians"]
        size = f"{q['capacity'] >> 20} MiB"
        tuned = qemu_peer.perf_text(q["tuned"])
        for kind, nbytes in (("full", q["capacity"]), ("incremental", q["incremental_bytes"])):
            med = m[kind]
            c = med["np.copyto"]
            what = (f"full backup of {size}" if kind == "full"
                    else f"incremental backup, 10% of {size} changed")
            gbs = lambda s: f"{fmt_time(s)} ({nbytes / s / 1e9:.2f} GB/s)"  # noqa: E731
            target = 0.95 if kind == "full" else 0.8
            ratio = c / med["fastfc"]
            self.add(Row("qemu", f"fastfc_file_{kind}",
                         f"fastfc {'COPY-mode worker' if kind == 'full' else 'resync + copy()'}"
                         f" on file-backed volumes in /dev/shm, {what}",
                         gbs(med["fastfc"]), f"{gbs(c)} np.copyto", ratio,
                         f">= {target:g}", ratio >= target,
                         headline="fastfc full backup (files in /dev/shm), vs np.copyto"
                         if kind == "full" else "", data={"samples": q[kind]}))
            for mode, label in (("QEMU defaults", "defaults"), ("QEMU tuned", "tuned")):
                self.add(Row("qemu", f"qemu_{kind}_{label}",
                             f"QEMU blockdev-backup sync={'full' if kind == 'full' else 'incremental'}"
                             f" ({label}), {what}",
                             gbs(med[mode]), f"{gbs(c)} np.copyto", c / med[mode],
                             note=tuned if label == "tuned" else "x-perf defaults",
                             headline=f"QEMU blockdev-backup full ({label}) vs np.copyto"
                             if kind == "full" else ""))
            for mode, label in (("QEMU defaults", "defaults"), ("QEMU tuned", "tuned")):
                self.add(Row("qemu", f"fastfc_vs_qemu_{kind}_{label}",
                             f"fastfc vs QEMU ({label}), {what}",
                             gbs(med["fastfc"]), f"{gbs(med[mode])} QEMU {label}",
                             med[mode] / med["fastfc"],
                             headline=f"fastfc vs QEMU blockdev-backup {kind}, {label}"
                             if kind == "full" else ""))

    # -- scaling ----------------------------------------------------------
    def scaling(self) -> None:
        from benches import scaling
        curves = scaling.run(self.quick, log=self.log)
        self.raw["scaling"] = curves
        path = self.out / f"scaling{'-quick' if self.quick else ''}.png"
        scaling.plot(curves, path, title=f"fastfc scaling{' (quick: smaller sizes)' if self.quick else ''}"
                     f" - {machine()}")
        self.plots.append(str(path))
        for s in scaling.summary(curves):
            lo, hi = s["expected_range"]
            vs = s["vs_numpy_at_max"]
            judged = not self.quick        # two or three points judge no slope
            self.add(Row("scaling", f"scaling_{s['curve']}_{s['series']}",
                         f"{curves[s['curve']]['title'].split(':')[0].split(' (')[0]}: "
                         f"{s['series']}, {s['range']}",
                         f"slope {s['slope']:.2f}", f"{s['complexity']}", s["slope"],
                         f"{lo:g}..{hi:g}" if judged else f"({lo:g}..{hi:g})",
                         s["ok"] if judged else None, check=True,
                         note=(f"at {s['range'].split(' .. ')[1]}: {fmt_time(s['at_max'])}"
                               + (f", {vs:.3g} x the NumPy engine" if vs else "")),
                         data=s))

    # -- durable ----------------------------------------------------------
    def durable(self) -> None:
        from benches import mirror_cases
        if self.quick:
            cfg = dict(triplets=4, size_mib=16, seconds=1.5, rate_mbs=200.0,
                       sizes=(1 << 10, 1 << 16), fsync_cgs=10)
        else:
            cfg = dict(triplets=16, size_mib=64, seconds=5.0, rate_mbs=200.0,
                       sizes=(1 << 10, 1 << 20), fsync_cgs=30)
        d = mirror_cases.durable(self.unit_dir, log=self.log, **cfg)
        self.raw["durable"] = d
        mem, units, shm = d["memory"], d["units"], d["units_tmpfs"]
        where = f"{d['dir'].rsplit('/fastfc-units-', 1)[0]} on {d['filesystem']}"
        w = f"{cfg['triplets']} triplets x {cfg['size_mib']} MiB{', quick' if self.quick else ''}"
        ratio = units["cgs_per_s"] / mem["cgs_per_s"]
        fs = d["fsync_s"]
        per_cg = units["fsyncs_per_attempt"]
        self.add(Row("durable", "durable_cg_rate",
                     f"Global Mirror CG rate on storage units on disk vs in memory ({w})",
                     f"{units['cgs_per_s']:.1f} CG/s", f"{mem['cgs_per_s']:.1f} CG/s in memory",
                     ratio, ">= 0.5", ratio >= 0.5,
                     note=(f"units in {where}; fsync there: {fs * 1e3:.2f} ms, {per_cg:.2f} "
                           f"per CG attempt (durability process)"
                           + (f": at most {1 / (per_cg * fs):.0f} CG/s" if per_cg else
                              ": no fsync bounds the rate")
                           + ". The "
                           f"writers got {units['write_mb_s']:.0f} of "
                           f"{cfg['rate_mbs']:.0f} MB/s: pages dirtied at "
                           f"{units.get('pages_dirtied_mb_s', float('nan')):.0f} MB/s, written "
                           f"back at {units.get('written_back_mb_s', float('nan')):.0f} MB/s "
                           "(a 4 KiB write dirties a 64 KiB track on B and on C: the kernel "
                           "throttles the writers to the disk's writeback speed)"),
                     headline="Global Mirror CG rate, units on disk / memory", data=d))
        self.add(Row("durable", "durable_cg_rate_tmpfs",
                     f"Global Mirror CG rate on storage units in /dev/shm (tmpfs: no fsync "
                     f"cost) vs in memory ({w})",
                     f"{shm['cgs_per_s']:.1f} CG/s", f"{mem['cgs_per_s']:.1f} CG/s in memory",
                     shm["cgs_per_s"] / mem["cgs_per_s"],
                     headline="Global Mirror CG rate, units in /dev/shm (tmpfs) / memory",
                     note=(f"drain p50 {shm['drain_p50_ms']:.1f} ms on tmpfs units, "
                           f"{units['drain_p50_ms']:.1f} ms on disk units, "
                           f"{mem['drain_p50_ms']:.1f} ms in memory; FlashCopy phase p50 "
                           f"{shm['flash_p50_ms']:.2f} / {units['flash_p50_ms']:.2f} / "
                           f"{mem['flash_p50_ms']:.2f} ms")))
        self.add(Row("durable", "durable_fsync",
                     f"one fsync of a 4 KiB write on {d['filesystem']} vs a CG in memory",
                     fmt_time(fs), f"{fmt_time(1 / mem['cgs_per_s'])} per CG in memory",
                     fs * mem["cgs_per_s"], note="the floor under a durable CG: one of these"))
        small, big = (d["fsyncs"][n] for n in cfg["sizes"])
        ratio = big["per_cg"] / small["per_cg"] if small["per_cg"] else float("nan")
        self.add(Row("durable", "durable_fsyncs_per_cg",
                     f"fsyncs per CG at 2^{cfg['sizes'][1].bit_length() - 1} vs "
                     f"2^{cfg['sizes'][0].bit_length() - 1} tracks per volume (4 triplets, "
                     f"durability power)",
                     f"{big['per_cg']:.2f} per CG", f"{small['per_cg']:.2f} per CG", ratio,
                     "<= 1", ratio <= 1.0,
                     note=f"{big['ms_per_cg']:.1f} vs {small['ms_per_cg']:.1f} ms per CG",
                     headline="fsyncs per CG, 2^20 vs 2^10 tracks" if not self.quick else ""))

    def durable_steady(self) -> None:
        """The steady state at both durability levels, disk and tmpfs interleaved."""
        from benches import durable_steady as ds
        if self.quick:
            cfg = dict(triplets=16, size_mib=16, seconds=1.5, rate_mbs=200.0, reps=1)
        else:
            cfg = dict(triplets=16, size_mib=64, seconds=6.0, rate_mbs=200.0, reps=2)
        d = ds.steady(self.unit_dir, log=self.log, **cfg)
        self.raw["durable_steady"] = d
        sm, rt = d["summary"], d["ratios"]
        dp, tp, dw, tw = (sm[k] for k in ("disk/process", "tmpfs/process", "disk/power",
                                          "tmpfs/power"))
        w = (f"{cfg['triplets']} x {cfg['size_mib']} MiB, 4 KiB tracks, written whole; 2 writers "
             f"of 4 KiB at {cfg['rate_mbs']:.0f} MB/s; {cfg['reps']} x {cfg['seconds']:g} s per "
             f"case{', quick' if self.quick else ''}")

        def phases(x):
            return (f"coordination p50/p99 {x['coordination_p50_ms']:.3f}/"
                    f"{x['coordination_p99_ms']:.3f} ms, drain {x['drain_p50_ms']:.1f}/"
                    f"{x['drain_p99_ms']:.1f} ms, FlashCopy {x['flashcopy_p50_ms']:.1f}/"
                    f"{x['flashcopy_p99_ms']:.1f} ms")

        def bytes_(x):
            return (f"{x.get('dev_per_host_byte', float('nan')):.2f} bytes to the disk per host "
                    f"byte (device sectors, to the end of a sync), "
                    f"{x.get('proc_per_host_byte', float('nan')):.2f} (pages this process "
                    f"dirtied, /proc/self/io)")
        dev = d["device"] or "no block device"
        r = rt["disk_tmpfs_cg_rate_process"]
        self.add(Row("durable_steady", "durable_steady_cg_rate",
                     f"steady state, durability process: CG rate on the disk vs tmpfs ({w})",
                     f"{dp['cgs_per_s']:.1f} CG/s", f"{tp['cgs_per_s']:.1f} CG/s on tmpfs",
                     r, ">= 0.5", r >= 0.5,
                     note=(f"disk ({dev}): {phases(dp)}; tmpfs: {phases(tp)}; "
                           f"{dp['fsyncs_per_cg']:.2f} fsyncs and {dp['msyncs_per_cg']:.2f} "
                           f"msyncs per CG; disk: {bytes_(dp)}; tmpfs (the machine's other "
                           f"writes: the noise floor): {bytes_(tp)}"),
                     headline="steady state, durability process: CG rate, disk / tmpfs",
                     data={"disk": dp, "tmpfs": tp}))
        r = dp["pace_ratio"]
        self.add(Row("durable_steady", "durable_steady_writers",
                     "steady state, durability process, on the disk: writers' rate vs their pace",
                     f"{dp['write_mb_s']:.0f} MB/s", f"{cfg['rate_mbs']:.0f} MB/s pace", r,
                     ">= 0.95", r >= 0.95,
                     note=f"on tmpfs {tp['write_mb_s']:.0f} MB/s ({tp['pace_ratio']:.2f} x)",
                     headline="steady state, process: writers on disk / pace"))
        rpo = dp["rpo_p99_ms"]
        self.add(Row("durable_steady", "durable_steady_rpo",
                     "steady state, durability process, on the disk: RPO p99",
                     f"{rpo:.1f} ms", f"{tp['rpo_p99_ms']:.1f} ms on tmpfs",
                     rpo / tp["rpo_p99_ms"] if tp["rpo_p99_ms"] else None, "<= 100 ms",
                     rpo <= 100.0, score=100.0 / rpo if rpo else float("inf"),
                     note=f"RPO p50 {dp['rpo_p50_ms']:.1f} ms on the disk, "
                          f"{tp['rpo_p50_ms']:.1f} ms on tmpfs",
                     headline="steady state, process: RPO p99 on disk"))
        # durability power, reported against process (no target: it is bound
        # by the syncs, see the note)
        bound = (f"each CG msyncs what it drained and copied ({dw['msyncs_per_cg']:.1f} msyncs "
                 f"and {dw['fsyncs_per_cg']:.1f} fsync per CG, in order), so a CG costs the "
                 f"disk's time to write its dirty pages synchronously; more host writes per CG "
                 f"make each CG larger, not more frequent")
        self.add(Row("durable_steady", "durable_steady_power_cg_rate",
                     "steady state, durability power, on the disk: CG rate vs process",
                     f"{dw['cgs_per_s']:.1f} CG/s", f"{dp['cgs_per_s']:.1f} CG/s at process",
                     rt["power_process_cg_rate_disk"],
                     note=(f"on tmpfs {tw['cgs_per_s']:.1f} CG/s (disk / tmpfs "
                           f"{rt['disk_tmpfs_cg_rate_power']:.3g}); {phases(dw)}; writers "
                           f"{dw['pace_ratio']:.2f} x pace; {bound}")))
        self.add(Row("durable_steady", "durable_steady_power_rpo",
                     "steady state, durability power, on the disk: RPO p99 vs process",
                     f"{dw['rpo_p99_ms']:.1f} ms", f"{rpo:.1f} ms at process",
                     rt["power_process_rpo_disk"],
                     note=f"RPO p50 {dw['rpo_p50_ms']:.1f} ms; on tmpfs p99 "
                          f"{tw['rpo_p99_ms']:.1f} ms"))
        mib = 2**20
        self.add(Row("durable_steady", "durable_steady_power_bytes",
                     "steady state, durability power, on the disk: bytes written to the disk "
                     "per CG vs process",
                     f"{dw.get('dev_bytes_per_cg', float('nan')) / mib:.2f} MiB/CG",
                     f"{dp.get('dev_bytes_per_cg', float('nan')) / mib:.3f} MiB/CG at process",
                     rt["power_process_bytes_per_cg_disk"],
                     note=(f"device sectors written over the run and a sync after it, per CG; "
                           f"pages this process dirtied: "
                           f"{dw.get('proc_bytes_per_cg', float('nan')) / mib:.2f} vs "
                           f"{dp.get('proc_bytes_per_cg', float('nan')) / mib:.3f} MiB/CG; "
                           f"per host byte {bytes_(dw)} at power vs {bytes_(dp)} at process")))

    # -- durable_large ----------------------------------------------------
    def durable_large(self) -> None:
        """A unit past memory (opt-in)."""
        from benches import durable_steady as ds
        gib = os.environ.get("FASTFC_BENCH_LARGE_GIB")
        seconds = float(os.environ.get("FASTFC_BENCH_LARGE_SECONDS", "60"))
        d = ds.large(self.unit_dir, float(gib) if gib else None, seconds, log=self.log)
        self.raw["durable_large"] = d
        disk = d["disk_random"]["mb_s"]
        w = (f"{d['triplets']} triplets x 1 GiB = {d['total_bytes'] / 2**30:.0f} GiB, "
             f"RAM {d['ram_bytes'] / 2**30:.0f} GiB")
        r = d["write_mb_s_with_sync"] / disk if disk else None
        self.add(Row("durable_large", "durable_large_writes",
                     f"past memory ({w}): host writes under Global Mirror vs the disk's random "
                     f"4 KiB writes over the same files",
                     f"{d['write_mb_s_with_sync']:.1f} MB/s",
                     f"{disk:.1f} MB/s plain pwrite", r,
                     note=(f"both rates count the sync after the run; writers "
                           f"{d['write_mb_s']:.1f} MB/s before it, pwrite "
                           f"{d['disk_random']['loop_mb_s']:.1f}; volumes written whole at "
                           f"{d['fill_mb_s']:.0f} MB/s sequential; "
                           f"{d.get('dev_per_host_byte', float('nan')):.2f} disk bytes per "
                           f"host byte"), data=d))
        self.add(Row("durable_large", "durable_large_cg",
                     f"past memory ({w}): CG rate and RPO p99, durability process",
                     f"{d['cgs_per_s']:.2f} CG/s, RPO p99 {d['rpo_p99_ms']:.0f} ms",
                     "-", None,
                     note=(f"{d['cgs']} CGs of {d['attempts']} attempts in "
                           f"{d['elapsed_s']:.0f} s; failures {d['failures']}; drain p99 "
                           f"{d['drain_p99_ms']:.0f} ms, FlashCopy p99 "
                           f"{d['flashcopy_p99_ms']:.0f} ms")))

    # -- gm ---------------------------------------------------------------
    def gm(self) -> None:
        from benches import mirror_cases
        if self.quick:
            cfg = dict(triplets=16, size_mib=16, seconds=3.0, rate_mbs=200.0)
        else:
            cfg = dict(triplets=64, size_mib=64, seconds=10.0, rate_mbs=200.0)
        gc.collect()
        need = cfg["triplets"] * cfg["size_mib"] * 3 * 2**20 + 2**30
        if not self.wait_for_memory("gm", need):
            return
        g = mirror_cases.global_mirror(log=self.log, **cfg)
        self.raw["gm"] = g
        f, n = g["fastfc"], g["numpy"]
        fp, np_ = f["paced"], n["paced"]
        w = (f"{cfg['triplets']} triplets x {cfg['size_mib']} MiB, 2 writers of 4 KiB at "
             f"{cfg['rate_mbs']:.0f} MB/s, CG interval 0{' (quick: smaller)' if self.quick else ''}")
        base = "NumPy engine"
        for key, name, label, target, unit, lower in (
                ("coord_p99_ms", "gm_coordination_p99", "coordination hold p99", 1.0, "ms", True),
                ("flash_p99_ms", "gm_flashcopy_p99",
                 f"FlashCopy phase p99 ({cfg['triplets']} volumes)", 5.0, "ms", True),
                ("cgs_per_s", "gm_cgs_per_s", "consistency groups per second", 20.0, "CG/s",
                 False),
                ("rpo_p99_ms", "gm_rpo_p99", "RPO p99", 250.0, "ms", True)):
            v, b = fp[key], np_[key]
            ratio = v / b if b else float("nan")
            met = v <= target if lower else v >= target
            note = ""
            if key == "cgs_per_s":
                note = (f"drain p50 {fp['drain_p50_ms']:.1f} ms (NumPy engine "
                        f"{np_['drain_p50_ms']:.1f} ms): each 4 KiB write dirties a 64 KiB "
                        "track, sent to B and copied on write to C")
            self.add(Row("gm", name, f"Global Mirror {label}: {w}",
                         f"{v:.3g} {unit}", f"{b:.3g} {unit} {base} (wrote "
                         f"{np_['write_mb_s']:.0f} MB/s)", ratio,
                         f"{'<=' if lower else '>='} {target:g} {unit}", met,
                         headline=f"Global Mirror {label}" if not self.quick else "",
                         score=(target / v if lower else v / target) if v else float("inf"),
                         note=note, data={"fastfc": fp, "numpy": np_}))
        ratio = f["unpaced"]["write_mb_s"] / f["alone_mb_s"]
        nratio = n["unpaced"]["write_mb_s"] / n["alone_mb_s"]
        self.add(Row("gm", "gm_host_writes",
                     f"host write throughput under Global Mirror / alone (unpaced): {w}",
                     f"{f['unpaced']['write_mb_s']:.0f} / {f['alone_mb_s']:.0f} MB/s",
                     f"{n['unpaced']['write_mb_s']:.0f} / {n['alone_mb_s']:.0f} MB/s {base} "
                     f"({nratio:.2f})", ratio, ">= 0.5", ratio >= 0.5,
                     headline="host writes under Global Mirror / alone" if not self.quick else "",
                     data=g))


    # -- grain ----------------------------------------------------------------
    def grain(self) -> None:
        """The 4 KiB grain under 64 KiB tracks against a grain of the track."""
        from benches import grain as gr
        rate, secs = 200.0, (2.0 if self.quick else 4.0)
        rounds = 1 if self.quick else 2
        configs = ([(16, 16), (256, 1), (1024, 1)] if self.quick
                   else [(16, 64), (1024, 1), (4096, 1)])
        raw: dict = {"memory": {}, "summary": gr.find_next_set()}
        self.raw["grain"] = raw
        for n, mib in configs:
            need = n * mib * 3 * 2**20 + 2**30      # one session at a time
            if not self.wait_for_memory("grain", need):
                return
            d = gr.memory(n, mib, secs, rate, rounds, log=self.log)
            raw["memory"][f"{n}x{mib}"] = d
            g, t = d["median"][str(gr.GRAINS[0])], d["median"][str(gr.GRAINS[1])]
            w = (f"{n} triplets x {mib} MiB in memory, 64 KiB tracks, 2 writers of 4 KiB at "
                 f"{rate:.0f} MB/s, CG interval 0, median of {rounds}"
                 f"{' (quick)' if self.quick else ''}")
            base = "grain of the track"
            amp = g["copied_per_host_byte"]
            self.add(Row("grain", f"grain_copied_{n}", f"bytes copied into B and C per host "
                         f"byte: {w}", f"{amp:.2f}", f"{t['copied_per_host_byte']:.2f} {base}",
                         amp / t["copied_per_host_byte"], "<= 2.2 (bytes)", amp <= 2.2,
                         score=2.2 / amp if amp else float("inf"),
                         headline=("bytes copied into B and C per host byte (1,024 triplets)"
                                   if n == 1024 and not self.quick else ""),
                         data=d))
            cg_target = {1024: 150.0, 4096: 40.0}.get(n)
            met = None
            if cg_target is not None and not self.quick:
                met = (g["cgs_per_s"] >= cg_target and g["pace"] >= 0.95
                       and (n != 1024 or g["rpo_p99_ms"] <= 20.0))
            target = "-" if cg_target is None else (
                f">= {cg_target:g} CG/s" + (", RPO p99 <= 20 ms" if n == 1024 else "")
                + ", writers >= 0.95 x pace")
            self.add(Row("grain", f"grain_cgs_{n}", f"Global Mirror CGs per second: {w}",
                         f"{g['cgs_per_s']:.0f} CG/s, RPO p99 {g['rpo_p99_ms']:.1f} ms, "
                         f"writers {g['pace']:.2f} x pace",
                         f"{t['cgs_per_s']:.0f} CG/s, RPO p99 {t['rpo_p99_ms']:.1f} ms, "
                         f"writers {t['pace']:.2f} x pace ({base})",
                         g["cgs_per_s"] / t["cgs_per_s"] if t["cgs_per_s"] else float("nan"),
                         target, met,
                         score=(g["cgs_per_s"] / cg_target if cg_target and met is not None
                                else None),
                         headline=(f"Global Mirror CG/s, {n:,} triplets x 1 MiB, 64 KiB tracks"
                                   if cg_target and not self.quick else ""),
                         data=d))
        raw["disk"] = {}
        for n, mib in ([(4, 16)] if self.quick else [(16, 64), (1024, 1)]):
            d = gr.disk(self.unit_dir, n, mib, secs, rate, rounds, log=self.log)
            raw["disk"][f"{n}x{mib}"] = d
            g, t = d["median"][str(gr.GRAINS[0])], d["median"][str(gr.GRAINS[1])]
            b, tb = g.get("disk_per_host_byte"), t.get("disk_per_host_byte")
            w = (f"{n} triplets x {mib} MiB on storage units on the disk "
                 f"({d['config']['device']}), durability process, 64 KiB tracks, 2 writers of "
                 f"4 KiB at {rate:.0f} MB/s, to the end of a sync"
                 f"{' (quick)' if self.quick else ''}")
            if b is None or tb is None:
                continue
            self.add(Row("grain", f"grain_disk_bytes_{n}", f"bytes written to the disk per host "
                         f"byte: {w}", f"{b:.2f}", f"{tb:.2f} grain of the track",
                         b / tb if tb else float("nan"), "<= 4 (bytes)", b <= 4.0,
                         score=4.0 / b if b else float("inf"),
                         note=(f"{g['cgs_per_s']:.0f} CG/s, RPO p99 {g['rpo_p99_ms']:.1f} ms, "
                               f"writers {g['pace']:.2f} x pace (grain of the track: "
                               f"{t['cgs_per_s']:.0f} CG/s, {t['rpo_p99_ms']:.1f} ms, "
                               f"{t['pace']:.2f} x pace); bytes copied into B and C per host "
                               f"byte {g['copied_per_host_byte']:.2f} "
                               f"({t['copied_per_host_byte']:.2f}); pages this process "
                               f"dirtied per host byte {g.get('proc_per_host_byte', 0):.2f}"),
                         headline=(f"bytes to the disk per host byte, disk units, {n} triplets"
                                   if n == 16 and not self.quick else ""), data=d))
        counts = (16, 256, 1024) if self.quick else (16, 1024, 4096)
        ic = raw["idle_cg"] = gr.idle_cg(counts, cgs=50 if self.quick else 200,
                                         rounds=1 if self.quick else 3, log=self.log)
        lo, hi = counts[0], counts[-1]
        f = ic["figures"]
        for case, what in (("idle", "nothing written"),
                           ("few", f"{ic['config']['written']} triplets written (4 KiB each) "
                                   "before each CG")):
            mine, base = ic["ratios"][f"{case}/sparse"], ic["ratios"][f"{case}/stepped"]

            def ms(mode, n, q="min_s"):
                return f[f"{case}/{mode}/{n}"][q] * 1e3
            self.add(Row(
                "grain", f"grain_{case}_cg_{hi}_over_{lo}",
                f"a Global Mirror CG attempt in memory, {hi:,} triplets against {lo} "
                f"({what}; 1-track volumes of 64 KiB, 4 KiB grains; min over "
                f"{f[f'{case}/sparse/{hi}']['samples']} CGs)"
                f"{' (quick)' if self.quick else ''}",
                f"{mine['min_s']:.1f} x ({hi}: {ms('sparse', hi):.3f} ms, {lo}: "
                f"{ms('sparse', lo):.3f} ms)",
                f"{base['min_s']:.0f} x ({hi}: {ms('stepped', hi):.3f} ms, {lo}: "
                f"{ms('stepped', lo):.3f} ms) every triplet stepped",
                mine["min_s"] / base["min_s"], "-", None,
                note=(f"medians: {mine['median_s']:.1f} x against {base['median_s']:.0f} x; "
                      + ", ".join(f"{n}: {ms('sparse', n):.3f} ms ({ms('stepped', n):.3f})"
                                  for n in counts)),
                data=ic))
        s = raw["summary"]
        self.add(Row("grain", "grain_find_next_set",
                     "finding the next set bit of a TiB volume's bitmap (2^28 grains of "
                     "4 KiB), the one set bit the last", f"{s['summary_s'] * 1e3:.3f} ms",
                     f"{s['words_s'] * 1e3:.3f} ms scanning the words",
                     s["summary_s"] / s["words_s"], "<= 1 ms", s["summary_s"] <= 1e-3,
                     score=1e-3 / s["summary_s"] if s["summary_s"] else float("inf"),
                     data=s))

    # -- scaleout -----------------------------------------------------------
    def scaleout(self) -> None:
        """Secondary units as Ray actors against one process."""
        try:
            import ray  # noqa: F401
        except ImportError:
            self.skipped["scaleout"] = "ray is not installed (pip install 'fastfc[remote]')"
            self.log(f"  skipped: {self.skipped['scaleout']}")
            return
        from benches import scaleout as so
        cfg = (dict(triplets=16, size_mib=16, seconds=2.0) if self.quick
               else dict(triplets=32, size_mib=32, seconds=5.0))
        d = so.scaleout(log=self.log, **cfg)
        self.raw["scaleout"] = d
        di, lo, rt = d["scaled_out"], d["one_process"], d["ratios"]
        w = (f"2 Ray units x {cfg['triplets']} triplets x {cfg['size_mib']} MiB, 4 KiB tracks, "
             f"2 writers of 4 KiB at 200 MB/s{', quick' if self.quick else ''}")
        base = "in one process"
        r = d["drain_vs_copyto"]
        self.add(Row("scaleout", "scaleout_drain", f"scale-out: drain throughput (initial "
                     f"copy) vs np.copyto: {w}", f"{di['initial_drain_bps'] / 1e6:.0f} MB/s",
                     f"{d['copyto_bps'] / 1e6:.0f} MB/s np.copyto", r, ">= 0.25", r >= 0.25,
                     note=f"{base}: {lo['initial_drain_bps'] / 1e6:.0f} MB/s "
                          f"({d['drain_vs_copyto_one_process']:.3f} x np.copyto)"))
        for key, name, label, target, unit, lower in (
                ("flash_p99_ms", "scaleout_flashcopy_p99", "FlashCopy phase p99 (decision "
                 "recorded)", 15.0, "ms", True),
                ("cgs_per_s", "scaleout_cgs_per_s", "consistency groups per second", 50.0,
                 "CG/s", False),
                ("rpo_p99_ms", "scaleout_rpo_p99", "RPO p99", 100.0, "ms", True),
                ("pace_ratio", "scaleout_writers", "writers' rate / pace", 0.95, "x", False)):
            v, b = di[key], lo[key]
            met = v <= target if lower else v >= target
            self.add(Row("scaleout", name, f"scale-out: {label}: {w}", f"{v:.3g} {unit}",
                         f"{b:.3g} {unit} {base}", rt.get(key, v / b if b else float("nan")),
                         f"{'<=' if lower else '>='} {target:g} {unit}", met,
                         score=(target / v if lower else v / target) if v else float("inf"),
                         note=(f"FlashCopy p50 {di['flash_p50_ms']:.1f} ms ({base} "
                               f"{lo['flash_p50_ms']:.1f} ms); drain p50 "
                               f"{di['drain_p50_ms']:.1f} ms ({lo['drain_p50_ms']:.2f} ms)")
                         if key == "flash_p99_ms" else ""))

    # -- serve ------------------------------------------------------------
    # (workload, target vs nbdkit memory, short name); every workload: >= 1 x qemu-nbd
    SERVE_TARGETS = {"nbdcopy in (GB/s)": (1.0, "nbdcopy"),
                     "4K randwrite QD16 (kIOPS)": (0.8, "randwrite_4k"),
                     "4K randread QD16 (kIOPS)": (0.8, "randread_4k"),
                     "1M seq write QD8 (GB/s)": (1.0, "seqwrite_1m")}

    def serve(self) -> None:
        """fastfc serve against nbdkit memory and qemu-nbd."""
        from benches import serve as sv
        gone = sv.missing()
        if gone:
            self.skipped["serve"] = gone
            self.log(f"  skipped: {gone}")
            return
        if self.quick:
            cfg = dict(rounds=1, seconds=1.0, size=256 << 20)
            gcfg = dict(triplets=16, size_mib=8, seconds=1.0, rounds=2)
        else:
            cfg = dict(rounds=5, seconds=3.0, size=1 << 30)
            gcfg = dict(triplets=16, size_mib=64, seconds=4.0, rounds=4)
        self.log(f"  fastfc serve, nbdkit memory, qemu-nbd: {cfg['rounds']} round(s)")
        d = sv.run(log=self.log, **cfg)
        self.raw["serve"] = d
        size = f"{cfg['size'] >> 20} MiB" if cfg["size"] < 1 << 30 else \
            f"{cfg['size'] >> 30} GiB"
        where = (f"one {size} export in /dev/shm over a unix socket, {cfg['rounds']} "
                 f"interleaved round(s) of {cfg['seconds']:g} s"
                 f"{', quick' if self.quick else ''}")
        cpu = d["cpu_us_per_request"]
        for w, (nbdkit_target, key) in self.SERVE_TARGETS.items():
            med, rat = d["medians"][w], d["ratios"][w]
            label, unit = w.rsplit(" (", 1)
            unit = unit.rstrip(")")
            label = label.replace("4K", "4 KiB").replace("1M", "1 MiB")
            if label.startswith("nbdcopy"):
                label = f"nbdcopy {size} in"
            else:
                label += " (fio nbd engine)"
            rr = d["raw"][w]
            for peer, target in (("nbdkit memory", nbdkit_target), ("qemu-nbd", 1.0)):
                r = rat[peer]
                per = sorted(f / p for f, p in zip(rr["fastfc"], rr[peer]))
                note = (f"per-round ratios {per[0]:.2f}..{per[-1]:.2f}; {peer} rounds "
                        f"{min(rr[peer]):.3g}..{max(rr[peer]):.3g} {unit}, fastfc "
                        f"{min(rr['fastfc']):.3g}..{max(rr['fastfc']):.3g}; server CPU per "
                        f"request: fastfc {cpu[w]['fastfc']:.1f} us, nbdkit "
                        f"{cpu[w]['nbdkit memory']:.1f}, qemu-nbd {cpu[w]['qemu-nbd']:.1f}")
                self.add(Row("serve", f"serve_{key}_{peer.split()[0].replace('-', '_')}",
                             f"fastfc serve vs {peer}: {label}, {where}",
                             f"{med['fastfc']:.3g} {unit}", f"{med[peer]:.3g} {unit} {peer}",
                             r, f">= {target:g}", r >= target, note=note,
                             headline=f"fastfc serve / {peer}: {label}"
                             if not self.quick else "",
                             data={"samples": rr, "cpu_us_per_request": cpu[w]}))

    # -- nbd_map ----------------------------------------------------------
    def recovery_points(self) -> None:
        """Recovery points: a write with 1,000 points held vs none, a take vs
        a CG's FlashCopy phase, restoring a 1 TiB thin volume, space per
        point vs its changed grains (benches/recovery_points.py)."""
        from benches import recovery_points as rp
        self.unit_dir.mkdir(parents=True, exist_ok=True)
        d = rp.run(quick=self.quick, unit_dir=self.unit_dir, log=self.log)
        self.raw["recovery_points"] = d
        q = " (quick)" if self.quick else ""
        w = d["write_steady"]
        self.add(Row("recovery_points", "points_write_steady",
                     f"4 KiB random host write with {w['held']} recovery points held vs none, "
                     f"steady retention window (each interval of {w['per_interval']} writes "
                     f"takes a point and expires the oldest), {w['mib']} MiB in memory, 64 KiB "
                     f"tracks, 4 KiB grain; median of {w['intervals']} intervals' ratios, each "
                     f"timed beside its baseline{q}",
                     f"{w['points_median_us']:.2f} us", f"{w['none_median_us']:.2f} us none",
                     w["ratio"], "<= 2", w["ratio"] <= 2,
                     note=f"min/min ratio {w['ratio_min']:.2f}; {w['copied_per_write']:.2f} "
                          "grains copied (copy-on-write) per write",
                     headline="" if self.quick else "host write, 1,000 points held vs none",
                     data=w))
        w = d["write_durable"]
        where = "tmpfs" if w["tmpfs"] else "the disk"
        self.add(Row("recovery_points", "points_write_durable",
                     f"4 KiB random host write with {w['held']} durable recovery points held "
                     f"vs none, two volumes of one storage unit on {where} (durability "
                     f"{w['durability']}; the pool and log files mapped shared), steady "
                     f"retention window (each interval of {w['per_interval']} writes takes a "
                     f"point and expires the oldest through the unit), {w['mib']} MiB, 64 KiB "
                     f"tracks, 4 KiB grain; median of {w['intervals']} intervals' ratios{q}",
                     f"{w['points_median_us']:.2f} us", f"{w['none_median_us']:.2f} us none",
                     w["ratio"], "<= 2", w["ratio"] <= 2,
                     note=f"min/min ratio {w['ratio_min']:.2f}; {w['copied_per_write']:.2f} "
                          f"grains copied and logged per write; log {w['log_records']} records",
                     headline="" if self.quick else "host write, 1,000 durable points vs none",
                     data=w))
        for key, how in (("write", "pool provisioned (PointChain.reserve)"),
                         ("write_cold", "pool not provisioned: fresh pages fault in")):
            w = d[key]
            self.add(Row("recovery_points", f"points_{key}",
                         f"worst case: 4 KiB random host write with {w['held']} recovery points "
                         f"held vs none, {w['writes']} writes into one fresh interval, each the "
                         f"first to its grain (copy-on-write into memory the pool has not used "
                         f"before), {w['mib']} MiB in memory, {how}; median of "
                         f"{w['rounds']}{q}",
                         f"{w['points_median_us']:.2f} us", f"{w['none_median_us']:.2f} us none",
                         w["ratio"], note=f"min/min ratio {w['ratio_min']:.2f}; the new "
                         "interval's grain table grows into fresh pages too", data=w))
        for t in d["take"]:
            n = t["volumes"]
            self.add(Row("recovery_points", f"points_take_{n}",
                         f"taking a recovery point of {n} volumes at one instant vs the "
                         f"FlashCopy phase of a Global Mirror CG over {n} triplets (1 MiB, "
                         f"in memory), median of {t['cgs']}{q}",
                         f"{t['take_median_ms']:.3f} ms",
                         f"{t['flash_median_ms']:.3f} ms FlashCopy phase", t["ratio"], "<= 1",
                         t["ratio"] <= 1,
                         headline=("take a point vs a CG's FlashCopy phase (256 volumes)"
                                   if n == 256 and not self.quick else ""),
                         data=t))
        sc = d["schedule"]
        self.add(Row("recovery_points", "points_session_schedule",
                     f"the FlashCopy phase of a Global Mirror CG over {sc['triplets']} triplets "
                     f"(4 MiB, in memory, {4 * sc['triplets']} random 4 KiB writes a CG) whose "
                     f"schedule takes a point of every C after each CG ({sc['keep']} kept: each "
                     f"resync saves the grains it changes on C into the newest point, then the "
                     f"take and an expiry) vs the same session without one; median of the last "
                     f"{sc['cgs'] // 2} of {sc['cgs']} CGs each{q}",
                     f"{sc['scheduled_median_ms']:.3f} ms",
                     f"{sc['plain_median_ms']:.3f} ms no schedule", sc["ratio"],
                     note=f"the take and expiry {sc['take_expire_median_ms']:.3f} ms of it (the "
                          f"rest: the resyncs' saves of C's changed grains); "
                          f"{sc['points_held_per_c']} points held per C at the end", data=sc))
        r = d["restore"]
        self.add(Row("recovery_points", "points_restore_1tib",
                     f"restoring a recovery point of a 1 TiB thin volume (2^24 tracks of 64 KiB, "
                     f"on the disk) onto a 1 TiB thin recovery volume (readable on return) vs "
                     f"establishing a FlashCopy between them; median of {r['rounds']}{q}",
                     f"{r['restore_median_ms']:.1f} ms",
                     f"{r['establish_median_ms']:.1f} ms FlashCopy establish", r["ratio"],
                     "<= 100 ms", r["restore_median_ms"] <= 100,
                     score=100 / r["restore_median_ms"] if r["restore_median_ms"] else None,
                     headline="" if self.quick else "restore a point of a 1 TiB volume",
                     data=r))
        sp = d["space"]
        self.add(Row("recovery_points", "points_space",
                     f"bytes of {sp['points']} recovery points vs the bytes of the grains "
                     f"changed between them ({sp['changed_per_point']} random 4 KiB grains per "
                     f"point, {sp['mib']} MiB volume){q}",
                     f"{sp['points_bytes']} B", f"{sp['changed_bytes']} B changed", sp["ratio"],
                     "<= 1.05", sp["ratio"] <= 1.05,
                     note=f"worst point x{sp['worst_point_ratio']:.4f}; plus, once per volume, "
                          f"the chain's bitmap of held grains ({sp['bitmap_bytes']} B) and table "
                          f"of each grain's newest holder ({sp['links_bytes']} B): the whole "
                          f"chain x{sp['chain_ratio']:.4f}",
                     headline="" if self.quick else "space per point vs changed grains",
                     data=sp))

    def nbd_map(self) -> None:
        """Changed-block export: listing the changes of a thin volume with 1 %
        changed vs reading it whole; an incremental backup vs a full copy."""
        from benches import nbd_map as nm
        gone = nm.missing()
        if gone:
            self.skipped["nbd_map"] = gone
            self.log(f"  skipped: {gone}")
            return
        gib = float(os.environ.get("FASTFC_BENCH_MAP_GIB", "1" if self.quick else "16"))
        self.unit_dir.mkdir(parents=True, exist_ok=True)
        self.log(f"  changed blocks over NBD: a {gib:g} GiB thin volume on the disk")
        d = nm.run(int(gib * (1 << 30)), repeats=2 if self.quick else 3, log=self.log,
                   where=str(self.unit_dir))
        self.raw["nbd_map"] = d
        size = f"{gib:g} GiB thin volume on the disk, 1 % of its 64 KiB tracks written"
        lst, whole = statistics.median(d["list_s"]), statistics.median(d["read_whole_s"])
        self.add(Row("nbd_map", "nbd_map_list",
                     f"listing the changed extents (nbdinfo --map=qemu:dirty-bitmap:T) vs "
                     f"reading the volume whole (nbdcopy --no-extents), {size}",
                     f"{lst:.3f} s", f"{whole:.2f} s read whole", d["list_ratio"], ">= 20",
                     d["list_ratio"] >= 20,
                     note=f"{d['listed_extents']} extents, {d['listed_bytes']} bytes listed "
                          f"(= {d['changed_bytes']} written); list runs "
                          f"{', '.join(f'{x:.3f}' for x in d['list_s'])} s, read whole "
                          f"{', '.join(f'{x:.2f}' for x in d['read_whole_s'])} s",
                     headline="" if self.quick else "listing 1 % changed vs reading whole"))
        self.add(Row("nbd_map", "nbd_map_incremental_time",
                     f"incremental backup (list, resyncflash, copy the changed extents) vs a "
                     f"full copy of the same volume, {size}",
                     f"{d['incr_s']:.2f} s", f"{d['full_s']:.2f} s full copy",
                     d["incr_speedup"], ">= 20", d["incr_speedup"] >= 20,
                     note=f"list {d['incr_list_s']:.3f} s, resyncflash (front door) "
                          f"{d['incr_resync_s']:.2f} s; {d['checked_extents']} extents "
                          "checked against the source",
                     headline="" if self.quick else "incremental backup vs full copy: time"))
        frac = d["incr_fraction"]
        self.add(Row("nbd_map", "nbd_map_incremental_bytes",
                     f"bytes the incremental backup moves over NBD / a full copy's, {size}",
                     f"{d['incr_bytes']} B", f"{d['full_bytes']} B full copy", frac,
                     "<= 0.011", frac <= 0.011,
                     note=f"{100 * frac:.3f} % of the volume"))
        tib = float(os.environ.get("FASTFC_BENCH_MAP_LARGE_GIB", "64" if self.quick else "1024"))
        for changed, what in (("track", "64 KiB writes at 1 % of the tracks"),
                              ("grain", "4 KiB writes at 1 % of the grains")):
            self.log(f"  listing the changes of a {tib:g} GiB thin volume: {what}")
            big = nm.list_large(int(tib * (1 << 30)), changed, repeats=2 if self.quick else 3,
                                log=self.log, where=str(self.unit_dir))
            self.raw[f"nbd_map_large_{changed}"] = big
            lst = statistics.median(big["list_s"])
            srv = statistics.median(big["server_s"])
            self.add(Row("nbd_map", f"nbd_map_list_large_{changed}",
                         f"listing the changed extents of a {tib:g} GiB thin volume "
                         f"(nbdinfo --map=qemu:dirty-bitmap:T), {what} (the bits set "
                         "directly: a real run would not fit the disk), vs the server's "
                         "share (the bitmap walked in-process)",
                         f"{lst:.3f} s", f"{srv:.3f} s server's share", lst / srv,
                         "<= 1 s" if changed == "track" else "-",
                         lst <= 1.0 if changed == "track" else None,
                         note=f"{big['listed_extents']} extents, {big['listed_bytes']} bytes "
                              f"listed (= {big['changed_bytes']} marked); list runs "
                              f"{', '.join(f'{x:.3f}' for x in big['list_s'])} s"))

    # -- serve_gm ---------------------------------------------------------
    def serve_gm(self) -> None:
        """A Global Mirror session in fastfc serve (resumegmir) under fio:
        client IOPS with it running / paused, CG/s, RPO, and read-only
        commands' latency under that load / on the idle server."""
        from benches import serve as sv
        gone = sv.missing(sv.GM_TOOLS)
        if gone:
            self.skipped["serve_gm"] = gone
            self.log(f"  skipped: {gone}")
            return
        if self.quick:
            gcfg = dict(triplets=16, size_mib=8, seconds=1.0, rounds=2, idle_reps=1)
        else:
            gcfg = dict(triplets=16, size_mib=64, seconds=4.0, rounds=5, idle_reps=3)
        tracks = ["64K"] if self.quick else ["64K", "4K"]
        for track in tracks:
            self.log(f"  Global Mirror under fio in fastfc serve: {gcfg['triplets']} triplets, "
                     f"{track}B tracks, {gcfg['rounds']} round(s)")
            g = sv.gm_under_fio(log=self.log, track_size=track, **gcfg)
            self._serve_gm_rows(g, "" if track == "64K" else "_4k_tracks")

    def _serve_gm_rows(self, g: dict, tag: str) -> None:
        self.raw[f"serve_gm{tag}"] = g
        kib = g["track_size"][:-1]
        load = g["load_average"]
        w = (f"{g['triplets']} triplets x {g['size_mib']} MiB ({kib} KiB tracks), fastfc -u A "
             f"-r B serve, units in /dev/shm, session started by resumegmir; fio 4 KiB "
             f"randwrite QD{g['iodepth']}, one job per A export ({g['jobs']}); {g['rounds']} "
             f"interleaved round(s) of {g['seconds']:g} s{', quick' if self.quick else ''}")
        loads = (f"load average {load['min']:.1f}..{load['max']:.1f} (median "
                 f"{load['median']:.1f}) on {os.cpu_count()} CPUs")
        cores = (f"server CPU {g['server_cores_with']:.2f} cores with the session, "
                 f"{g['server_cores_without']:.2f} paused")
        r, rr = g["ratio"], g["round_ratios"]
        head = not self.quick and not tag
        self.add(Row("serve_gm", f"serve_gm_iops{tag}",
                     f"fastfc serve: client IOPS with the Global Mirror session running vs "
                     f"paused ({w})",
                     f"{g['iops_with'] / 1e3:.3g} kIOPS",
                     f"{g['iops_without'] / 1e3:.3g} kIOPS session paused", r, ">= 0.7",
                     r >= 0.7, note=f"per-round ratios {min(rr):.3g}..{max(rr):.3g}; {cores}; "
                                    f"{loads}",
                     headline="fastfc serve: client IOPS with a Global Mirror session / paused"
                     if head else "", data={k: v for k, v in g.items() if k != "raw"}))
        rpo = g["rpo_p99_ms"]
        cg = g["round_cgs_per_s"]
        self.add(Row("serve_gm", f"serve_gm_rpo{tag}",
                     f"fastfc serve with a Global Mirror session under fio: RPO p99, showgmir "
                     f"--json's rpo sampled every {g['sample_every_ms']:.0f} ms ({w})",
                     f"{rpo:.1f} ms", f"p50 {g['rpo_p50_ms']:.1f} ms", None, "<= 50 ms",
                     rpo <= 50.0, score=50.0 / rpo if rpo else float("inf"),
                     note=(f"{g['cgs_per_s']:.0f} CG/s (rounds {min(cg):.0f}..{max(cg):.0f}; "
                           f"{g['cgs']} of {g['attempts']} attempts"
                           f"{', failures ' + str(g['failures']) if g['failures'] else ''}); "
                           f"RPO max {g['rpo_max_ms']:.1f} ms over {g['rpo_samples']} samples; "
                           f"{g['drained_mb_s']:.0f} MB/s drained to B; {loads}"),
                     headline="fastfc serve with a Global Mirror session under fio: RPO p99"
                     if head else ""))
        self.add(Row("serve_gm", f"serve_gm_cgs{tag}",
                     f"fastfc serve with a Global Mirror session under fio: CGs per second "
                     f"({w})", f"{g['cgs_per_s']:.1f} CG/s", "-", None,
                     note=(f"CG interval 0 (back to back); {g['drained_mb_s']:.0f} MB/s drained "
                           f"to B (a 4 KiB write owes its 4 KiB grain); {cores}")))
        c = g["client_p99_ms"]
        by = g["client_by_command"]
        idle = g["idle_by_command"]
        per = "; ".join(f"{k} {by[k]['p50_ms']:.0f}/{by[k]['p99_ms']:.0f} ms (idle "
                        f"{idle[k]['p50_ms']:.0f}/{idle[k]['p99_ms']:.0f})" for k in by)
        lp = g["lean_p99_ms"]
        lby = g["lean_by_command"]
        lper = "; ".join(f"{k} {lby[k]['p50_ms']:.0f}/{lby[k]['p99_ms']:.0f} ms" for k in lby)
        answer = (f"the server's answer (showgmir --json through the control socket, no "
                  f"client process) p50/p99 {g['answer_with_p50_ms']:.1f}/"
                  f"{g['answer_with_p99_ms']:.1f} ms with the session and fio, "
                  f"{g['answer_without_p50_ms']:.1f}/{g['answer_without_p99_ms']:.1f} "
                  f"fio alone, {g['answer_idle_p50_ms']:.1f}/"
                  f"{g['answer_idle_p99_ms']:.1f} idle")
        self.add(Row("serve_gm", f"serve_gm_readonly{tag}",
                     f"a read-only command (fastfc -u A lsvol/showgmir/lsflash --json, a client "
                     f"process, as the fastfc console script runs it: fastfc_client forwards "
                     f"it without importing the engine) while the session runs and fio "
                     f"writes: p99, against the same commands through the full command line "
                     f"(python -m fastfc) in windows of its own, same run ({w})",
                     f"{lp:.0f} ms", f"{c:.0f} ms full command line", g["lean_ratio"],
                     "<= 100 ms", lp <= 100.0, score=100.0 / lp if lp else float("inf"),
                     note=(f"p50 {g['lean_p50_ms']:.0f} ms over {g['lean_samples']} commands "
                           f"(full command line p50 {g['client_p50_ms']:.0f} ms over "
                           f"{g['client_samples']}); p50/p99 by command: {lper}; idle server "
                           f"{g['lean_idle_p50_ms']:.0f}/{g['lean_idle_p99_ms']:.0f} ms p50/p99; "
                           f"the client's start alone (python -c 'import fastfc_client') "
                           f"{g['lean_start_p50_ms']:.0f} ms p50, the full command line's "
                           f"(fastfc --help) {g['help_p50_ms']:.0f} ms; {answer}; {loads}"),
                     headline="a read-only fastfc command under a session and fio: p99"
                     if head else "", data={k: g[k] for k in g if k.startswith("lean_")}))
        self.add(Row("serve_gm", f"serve_gm_readonly_full{tag}",
                     f"the same read-only commands through the full command line (python -m "
                     f"fastfc: click, NumPy and the engine imported before it forwards) under "
                     f"the same load: p99, against the same commands on the idle server",
                     f"{c:.0f} ms", f"{g['idle_p99_ms']:.0f} ms idle server",
                     g["client_ratio"],
                     note=(f"p50 {g['client_p50_ms']:.0f} ms over {g['client_samples']} "
                           f"commands; above the idle server's p50: "
                           f"{g['client_above_idle_p99_ms']:.0f} ms at p99; p50/p99 by "
                           f"command: {per}; {loads}")))
        a = g["answer_with_p99_ms"]
        self.add(Row("serve_gm", f"serve_gm_answer{tag}",
                     f"the server's answer to showgmir --json through the control socket (no "
                     f"client process) while the session runs and fio writes: p99, against "
                     f"the idle server ({w})",
                     f"{a:.1f} ms", f"{g['answer_idle_p99_ms']:.1f} ms idle server",
                     a / g["answer_idle_p99_ms"] if g["answer_idle_p99_ms"] else None,
                     note=f"p50 {g['answer_with_p50_ms']:.1f} ms; {loads}"))


# --------------------------------------------------------------------------
# Output
# --------------------------------------------------------------------------

def machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    mem = ""
    try:
        with open("/proc/meminfo") as f:
            kb = int(f.readline().split()[1])
        mem = f", {kb / 2**20:.0f} GiB"
    except (OSError, ValueError, IndexError):
        pass
    return (f"{cpu}, {os.cpu_count()} CPUs{mem}; Linux {platform.release()}; "
            f"Python {platform.python_version()}, NumPy {np.__version__}, "
            f"fastfc {fastfc.__version__} ({kernel_summary()})")


def kernel_summary() -> str:
    """Which kernel variants ran, e.g. ``kernels avx512, built for
    sse4.2+popcnt; copy memcpy (...)``."""
    picked = _core.kernels()
    levels = sorted(set(picked.values()), key=["scalar", "avx2", "avx512"].index)
    mixed = "" if len(levels) == 1 else " (" + ", ".join(
        f"{k} {v}" for k, v in picked.items()) + ")"
    base = "+".join(_core.build_baseline()) or "base ISA"
    return f"kernels {levels[-1]}{mixed}, built for {base}; {copy_summary()}"


def copy_summary() -> str:
    """Which copy kernel large runs use and why, e.g. ``copy stream1 (measured:
    0.55 x memcpy's time ...; ms/GiB memcpy 150, stream 420, stream1 85)``."""
    c = _core.copy_kernel()
    times = ", ".join(f"{k} {ms:.0f}" for k, ms in c["ms_per_gib"].items())
    return f"copy {c['kernel']} ({c['why']}{'; ms/GiB ' + times if times else ''})"


def available_memory() -> int | None:
    """MemAvailable from /proc/meminfo, in bytes (None if unknown)."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError):
        pass
    return None


def _git_commit() -> str:
    try:
        return subprocess.run(["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"],
                              capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return ""


def print_table(rows: list[Row], console=None) -> None:
    header = ["figure", "fastfc", "baseline", "ratio", "target", "met?"]
    try:
        from rich.console import Console
        from rich.table import Table
    except ImportError:
        Console = None
    if Console is not None:
        console = console or Console(highlight=False)
        if not console.is_terminal and "COLUMNS" not in os.environ:
            console.width = 250
        t = Table(*header, show_lines=False, header_style="bold")
        last = None
        for r in rows:
            if r.suite != last:
                t.add_row(f"[bold]{r.suite}[/]", "", "", "", "", "")
                last = r.suite
            style = {True: "green", False: "yellow" if r.check else "bold red",
                     None: "dim"}[r.met]
            t.add_row(r.figure, r.fastfc, r.baseline, _ratio_text(r.ratio), r.target,
                      f"[{style}]{r.met_text}[/]")
        console.print(t)
        return
    widths = [max(len(h), *(len(str(x)) for x in col)) for h, col in zip(header, zip(*[
        (r.figure, r.fastfc, r.baseline, _ratio_text(r.ratio), r.target, r.met_text)
        for r in rows]))]
    print("  ".join(h.ljust(w) for h, w in zip(header, widths)))
    for r in rows:
        vals = (r.figure, r.fastfc, r.baseline, _ratio_text(r.ratio), r.target, r.met_text)
        print("  ".join(str(v).ljust(w) for v, w in zip(vals, widths)))


def markdown(rep: Report, when: str, seconds: float, load: tuple[float, float],
             suites: list[str]) -> str:
    """The report as Markdown: the headline figures, then every row by suite,
    the notes and what was skipped."""
    heads = [r for r in rep.rows if r.headline]
    engine = [r for r in rep.rows if r.suite == "engine"]
    nb = [r for r in rep.rows if r.suite == "numba"]
    lines = [f"# fastfc benchmarks{' (quick)' if rep.quick else ''}", "",
             f"Measured by `python -m benches{' --quick' if rep.quick else ''} "
             f"{' '.join(suites)}` on {when} "
             f"(commit {_git_commit() or 'unknown'}; {seconds / 60:.0f} min"
             f"{', quick: fewer rounds and smaller sizes' if rep.quick else ''}), on "
             f"{machine()} (load average {load[0]:.1f} .. {load[1]:.1f}: a shared machine). "
             "Each ratio is against a baseline timed in the same run; "
             f"`report{'-quick' if rep.quick else ''}.json` beside this file keeps every sample.",
             "", "| figure | fastfc | baseline | ratio | target | met? |",
             "|---|---|---|---|---|---|"]

    def line(label, r):
        lines.append(f"| {label} | {r.fastfc} | {r.baseline} | {_ratio_text(r.ratio)} | "
                     f"{r.target} | {r.met_text} |")
    def span(label, rows, target, after_range=""):
        lo = min(r.ratio for r in rows)
        hi = max(r.ratio for r in rows)
        met = sum(bool(r.met) for r in rows)
        lines.append(f"| {label} | | | {lo:.3g} .. {hi:.3g}{after_range} | {target} "
                     f"| {met} of {len(rows)} |")
    order = ["core", "physical", "engine", "numba", "qemu", "durable", "durable_steady", "gm",
             "scaleout", "durable_large",
             "serve", "serve_gm"]
    for sec in order:
        for r in heads:
            if r.suite == sec:
                line(r.headline, r)
        if sec == "engine" and engine:
            span(f"vs the pure-NumPy engine, {len(engine)} workloads on 4 KiB tracks", engine,
                 ">= 20", f" (geomean {rep.raw['engine_geomean']:.3g})")
        if sec == "numba" and nb:
            span(f"vs numba kernels: copy runs, copy-on-write, count, find-next "
                 f"({len(nb)} figures)", nb, ">= 1")
    if lines[-1] == "|---|---|---|---|---|---|":      # no headline figure in this run
        del lines[-3:]
    targets = [r for r in rep.rows if r.met is not None and not r.check]
    lines += ["", f"{sum(bool(r.met) for r in targets)} of {len(targets)} targets met in that "
              "run; every figure follows, by suite."]
    why = []
    ceilings = [r.data["ceiling"] for r in engine if "ceiling" in r.data]
    if engine and ceilings:
        why.append("vs the NumPy engine: where bytes move, memory speed caps the ratio (at "
                   "`np.copyto` speed fastfc would be " + " and ".join(
                       f"{c:.2g}" for c in ceilings) + " x the NumPy engine on the two copy "
                   "workloads, and measured " + " and ".join(
                       f"{r.ratio:.2g}" for r in engine if "ceiling" in r.data) + " x); "
                   "elsewhere fastfc measured " + ", ".join(
                       f"{r.ratio:.2g}" for r in engine if "ceiling" not in r.data)
                   + " x: the NumPy engine's per-track Python costs 1-3 us, fastfc's call "
                   "0.3-1 us, so only work fastfc does per 64-track word (counting) "
                   "clears 20 x.")
    for r in heads:
        if r.met is False and r.note:
            why.append(f"{r.headline}: {r.note}.")
    if why:
        lines += [""] + [f"- {w}" for w in why]
    last = None
    for r in rep.rows:
        if r.suite != last:
            lines += ["", f"## {r.suite}", "", "| figure | fastfc | baseline | ratio | target "
                      "| met? | note |", "|---|---|---|---|---|---|---|"]
            last = r.suite
        cells = (r.figure, r.fastfc, r.baseline, _ratio_text(r.ratio), r.target, r.met_text,
                 r.note)
        lines.append("| " + " | ".join(str(c).replace("|", "/") for c in cells) + " |")
    for s, msg in rep.skipped.items():
        lines += ["", f"Skipped {s}: {msg}"]
    return "\n".join(lines) + "\n"


def plot_summary(rows: list[Row], path: Path, title: str) -> None:
    """Each figure with a ratio target: its ratio over its target (log)."""
    matplotlib = require("matplotlib", extra="plot", feature="the benchmark plots")
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    sel = []
    for r in rows:
        score = r.target_score()
        if score is None or r.check:
            continue
        label = r.figure if len(r.figure) <= 80 else r.figure[:77] + "..."
        sel.append((f"[{r.suite}] {label}", score, r.met))
    if not sel:
        return
    import textwrap
    fig, ax = plt.subplots(figsize=(15, 0.3 * len(sel) + 1.6))
    y = np.arange(len(sel))[::-1]
    ax.barh(y, [s for _, s, _ in sel], color=["#3a7" if m else "#d44" for _, _, m in sel])
    ax.axvline(1.0, color="k", lw=1)
    ax.set_xscale("log")
    ax.set_yticks(y)
    ax.set_yticklabels([lbl for lbl, _, _ in sel], fontsize=7)
    ax.set_xlabel("how far from the target: ratio / target (absolute targets: value / target),"
                  " >= 1 met")
    ax.set_title("\n".join(textwrap.wrap(title, 110)), fontsize=8)
    fig.subplots_adjust(left=0.4, right=0.98, top=1 - 0.8 / (0.3 * len(sel) + 1.6),
                        bottom=0.6 / (0.3 * len(sel) + 1.6))
    fig.savefig(path, dpi=90)
    plt.close(fig)


def plot_peer(q: dict, phys: Result | None, path: Path, title: str) -> None:
    """Throughput of one full copy and one incremental copy: the physical
    limit, fastfc and QEMU."""
    matplotlib = require("matplotlib", extra="plot", feature="the benchmark plots")
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, 2, figsize=(13, 4.2))
    for ax, kind, nbytes in ((axes[0], "full", q["capacity"]),
                             (axes[1], "incremental", q["incremental_bytes"])):
        med = dict(q["medians"][kind])
        if kind == "full" and phys is not None:
            for role in ("np.copyto, 2 threads", "memcpy, 1 thread"):
                med[f"{role} (1 GiB, anon.)"] = phys.median(role) * nbytes / phys.nbytes
        names = list(med)
        gbs = [nbytes / med[k] / 1e9 for k in names]
        ax.barh(names[::-1], gbs[::-1], color=["#3a7" if k == "fastfc" else
                                              "#d84" if k.startswith("QEMU") else "#789"
                                              for k in names[::-1]])
        for i, v in enumerate(gbs[::-1]):
            ax.text(v, i, f" {v:.2f}", va="center", fontsize=8)
        ax.set_xlabel("GB/s (median)")
        ax.set_title(f"{kind} backup, {q['capacity'] >> 20} MiB, /dev/shm files"
                     + (", 10% of tracks" if kind == "incremental" else ""), fontsize=9)
    fig.suptitle(title + f"\nQEMU tuned: {q['tuned']}", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


# --------------------------------------------------------------------------
# Entry point
# --------------------------------------------------------------------------

def run(quick: bool = False, out: Path | None = None, only: list[str] | None = None,
        skip: list[str] | None = None, unit_dir: Path | None = None, strict: bool = False,
        cases: list[str] | None = None, log=None) -> int:
    """Run the suites named in ``only`` (every suite but the opt-in ones when
    empty) except those in ``skip``, and write the report to ``out``; returns
    the exit status (1 with ``strict`` when a target is missed). ``cases``
    narrows the core suite to the cases whose name contains one of them."""
    def _log(msg: str) -> None:
        print(msg, file=sys.stderr, flush=True)
    log = log or _log
    bad = [s for s in (only or []) + (skip or []) if s not in SUITES]
    if bad:
        raise ValueError(f"unknown suite(s) {', '.join(bad)}; suites: {', '.join(SUITES)}")
    # the report ends with plots: say now, not after minutes of measuring
    require("matplotlib", extra="plot", feature="the benchmark report (its plots)")
    out = Path(out) if out is not None else REPO / "bench-results"
    out.mkdir(parents=True, exist_ok=True)
    unit_dir = Path(unit_dir) if unit_dir is not None else REPO / "bench-results" / "units"
    suites = [s for s in SUITES if (s in only if only else s not in OPT_IN)
              and s not in (skip or [])]
    rep = Report(quick, out, log, unit_dir, cases)
    load0 = os.getloadavg()
    started = time.perf_counter()
    when = _dt.datetime.now().strftime("%Y-%m-%d %H:%M")
    log(f"python -m benches{' --quick' if quick else ''}: {', '.join(suites)}")
    log(machine())
    for s in suites:
        log(f"[{s}]")
        t0 = time.perf_counter()
        if s != "gm" and not rep.wait_for_memory(s, SUITE_MEMORY[s] * 2**30):
            continue          # (gm works out its own need)
        getattr(rep, s)()
        rep.timings[s] = time.perf_counter() - t0
        gc.collect()
    seconds = time.perf_counter() - started
    load = (load0[0], os.getloadavg()[0])
    suffix = "-quick" if quick else ""
    title = f"python -m benches{' --quick' if quick else ''}, {when} - {machine()}"
    if rep.rows:
        p = out / f"summary{suffix}.png"
        plot_summary(rep.rows, p, title)
        rep.plots.append(str(p))
    if "qemu" in rep.raw:
        p = out / f"peer{suffix}.png"
        plot_peer(rep.raw["qemu"], rep.results.get("physical_2threads"), p, title)
        rep.plots.append(str(p))
    doc = {"machine": machine(), "date": when, "commit": _git_commit(), "quick": quick,
           "suites": suites, "seconds": seconds, "suite_seconds": rep.timings,
           "load_average": {"start": load[0], "end": load[1]},
           "skipped": rep.skipped, "plots": rep.plots,
           "rows": [asdict(r) for r in rep.rows],
           "cases": {k: r.as_dict() for k, r in rep.results.items()},
           "raw": rep.raw}
    path = out / f"report{suffix}.json"
    path.write_text(json.dumps(doc, indent=1, default=_json_default))

    print(f"fastfc benchmarks{' --quick (fewer rounds, smaller sizes where noted)' if quick else ''}"
          f" - {when}")
    print(f"{machine()}; load average {load[0]:.1f} at the start, {load[1]:.1f} at the end")
    print("ratio: speed figures (>=) = baseline time / fastfc time; cost figures (<=) = "
          "fastfc time / baseline time; targets with a unit are absolute\n")
    print_table(rep.rows)
    notes = [r for r in rep.rows if r.note and r.suite != "scaling"]
    if notes:
        print("\nnotes:")
        for r in notes:
            print(f"  {r.name}: {r.note}")
    targets = [r for r in rep.rows if r.met is not None and not r.check]
    missed = [r for r in targets if not r.met]
    print(f"\n{len(targets) - len(missed)} of {len(targets)} targets met"
          + (f"; missed: {', '.join(r.name for r in missed)}" if missed else ""))
    checks = [r for r in rep.rows if r.met is not None and r.check]
    if checks:
        off = [r for r in checks if not r.met]
        print(f"scaling: {len(checks) - len(off)} of {len(checks)} fitted slopes within the "
              "expected band" + (f"; off: {', '.join(r.name[8:] for r in off)}" if off else ""))
    for s, why in rep.skipped.items():
        print(f"skipped {s}: {why}")
    print(f"results: {path}")
    for p in rep.plots:
        print(f"plot: {p}")
    print(f"run time: {seconds:.0f} s (" + ", ".join(
        f"{k} {v:.0f} s" for k, v in rep.timings.items()) + ")")
    md = out / f"report{suffix}.md"
    md.write_text(markdown(rep, when, seconds, load, suites))
    print(f"report: {md}")
    return 1 if strict and missed else 0  # (scaling checks never fail the run)


def _json_default(o):
    if isinstance(o, (np.integer,)):
        return int(o)
    if isinstance(o, (np.floating,)):
        return float(o)
    if isinstance(o, np.ndarray):
        return o.tolist()
    if isinstance(o, Path):
        return str(o)
    if isinstance(o, float) and math.isnan(o):
        return None
    return str(o)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benches",
                                 description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter,
                                 epilog=__doc__.split("\n\n", 1)[1])
    ap.add_argument("suites", nargs="*", metavar="SUITE",
                    help="run only these suites (durable_large runs only when named) "
                         "[default: every other suite]")
    ap.add_argument("--list", action="store_true", help="list the suites and the core cases")
    ap.add_argument("--quick", action="store_true",
                    help="fewer rounds, smaller sizes where noted")
    ap.add_argument("--skip", action="append", default=[], metavar="SUITE",
                    help="skip this suite (repeatable)")
    ap.add_argument("--case", action="append", default=[], metavar="NAME",
                    help="core: only the cases whose name contains NAME (repeatable)")
    ap.add_argument("--out", type=Path, help="directory for report.md, report.json and the "
                    "plots [default: bench-results/ in the checkout]")
    ap.add_argument("--unit-dir", type=Path, help="where the durable suites put their storage "
                    "units: a directory on a real disk [default: bench-results/units in the checkout]")
    ap.add_argument("--strict", action="store_true", help="exit 1 if a target is missed")
    a = ap.parse_args(argv)
    bad = [s for s in a.suites + a.skip if s not in SUITES]
    if bad:
        ap.error(f"unknown suite(s) {', '.join(bad)}; suites: {', '.join(SUITES)}")
    if a.list:
        print("suites (in the order they run):")
        print(next(p for p in __doc__.split("\n\n") if p.startswith("physical ")))
        print("\ncore cases (--case):")
        for c in CASES:
            print(f"  {c.name:24} {c.target_text:6} {c.figure}  [vs {c.baseline_desc}]")
        return 0
    return run(a.quick, a.out, a.suites, a.skip, a.unit_dir, a.strict, a.case)
