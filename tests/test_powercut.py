"""Simulated power cuts: does durability="power" keep the Global Mirror promise?

A session of 4 triplets (two with 4 KiB tracks, two with 64 KiB tracks; A in
one storage unit, B and C in another) forms CGs while deterministic host
writes change A between them. :class:`powercut.PowerCutRecorder` watches
every sync point (msync of volumes and bitmaps, fsynced SQLite commits,
checkpoints, fsync) and, at chosen instants, writes copies of both unit
directories as a power cut could leave them: each volume and bitmap file is
its last synced content where each 4 KiB page that changed since holds any
of its versions since (the synced one, one observed at a sync or a cut since,
the current one; also all synced and all current); the database is the last synced
commit (also, once per instant, every commit). Instants (fault actions, run
synchronously on the thread forming the CG):

* ``drain``: mid-drain, before triplet i's pair drains (the earlier ones did);
* ``cow``: inside a PPRC write to B, after the copy-on-write of B's old track
  to C and before the new data lands;
* ``prepare``: inside the prepare transaction, before triplet i's revertible
  resync (the earlier ones changed their bitmaps, uncommitted);
* ``decision``: right after the decision's commit (fsynced at "power");
* ``commit``: inside the unsynced commit transaction, before triplet i's commit;
* ``between``: after a CG returned (i=0), or after the next host writes (i=1).

Each cut copy is opened (``StorageUnit(..., durability="power")``, both
units, which resolves an interrupted CG) and checked: it opens; no C is left
revertible; every C carries the same CG sequence S; S is at least the newest
CG whose decision was durable before the cut (at "power", every decision the
session made: its commit is fsynced; at "process", only what the last
``flush()`` covered) and at most the newest attempted; each C reads exactly
the A images recorded at CG S's coordination instant.

The harness must be able to fail: at durability "process" (no sync between
flushes) the same scenario must show violations, and so must "power" with one
kind of its ordering barriers (C data, B data, bitmaps) skipped. At "power"
as it is there must be none. A cut that keeps every page and every commit
(what a process kill leaves) must hold at any level: a check on the harness.

Beyond the CG itself (:func:`run_paths`): every path that changes B or C,
cut at a random share of the instants it calls back at (each copy into C,
each sync at "power", each decision, between steps), with a fixed seed:
Global Copy between CGs (``PPRCPair.drain``, as ``formcg`` before its first
CG, the loop with an interval and the catch-up after a failed drain run it)
with host writes between sends; the loop with ``cg_interval > 0`` and a
writer thread; recovery at the remote site (failover, fast reverse restore:
B must then hold the CG too) and failback; a session's close (C takes what
it still reads from B by FlashCopy's copy path); and recovery itself (a
unit a cut left mid-CG, cut again while it reopens).

Not covered (see tests/powercut.py): torn writes inside a 4 KiB page; the
drive's volatile cache and FUA (a sync is trusted to reach stable media);
filesystem metadata (directory entries, file sizes) and journal replay;
SQLite's own WAL recovery of a torn frame (SQLite is trusted: the database is
taken whole as of a synced commit); a page version that lived only between
two observed instants; instants inside a kernel call that makes no callback.
"""

from __future__ import annotations

import collections
import os
import shutil
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

from fastfc import GlobalMirror, StorageUnit, faults

import sys
sys.path.insert(0, str(Path(__file__).parent))
from powercut import Cut, PowerCutRecorder, check_cuts  # noqa: E402

SESSION = "gm"
# (track size, tracks) per triplet
GEOMETRY = [(4096, 16), (4096, 16), (65536, 4), (65536, 4)]
N = len(GEOMETRY)

# per CG formed while recording: the instants to cut at, (point, index)
PLAN = [
    [("drain", 1)],
    [("cow", 0)],
    [("prepare", 2)],
    [("decision", 0)],
    [("commit", 1)],
    [("between", 0), ("between", 1)],
    [("drain", 3), ("commit", 3)],
    [("cow", 2), ("prepare", 0)],
    [("cow", 3), ("between", 1)],
]
# per instant: (pages, db) of each cut copy
# ("all", "current") is memory as it is, what a process kill leaves: it must
# hold at every durability (a harness self-check: no false alarms there)
VARIANTS = [("none", "synced"), ("all", "synced"), ("random", "synced"),
            ("random", "synced"), ("random", "synced"), ("random", "current"),
            ("all", "current")]

# at "power" also right after single syncs of the ordered drain and the
# FlashCopy phase (k-th barrier of the CG: after C's data, after the cleared
# to_copy bits, after B, after the prepared bitmaps, ...)
POWER_PLAN = PLAN + [[("barrier", k)] for k in (0, 1, 2, 4, 6, 9, 12, 15, 18, 21)]

SLOW_PLAN = PLAN + [
    [("drain", 2), ("cow", 1)],
    [("prepare", 1), ("commit", 0)],
    [("prepare", 3), ("commit", 2)],
    [("cow", 3), ("decision", 0)],
    [("between", 0), ("between", 1)],
]
SLOW_VARIANTS = VARIANTS + [("random", "synced")] * 6 + [("random", "current")] * 2


@pytest.fixture
def work(tmp_path, monkeypatch):
    """Where the units and cut copies live: tmpfs when there is one. The
    model does not need a real disk (it records what a sync *would* have
    made durable), and real msyncs and fsyncs on a busy disk make the test
    minutes instead of seconds. Volumes still take the disk's I/O path (they
    compare pages rather than copy whole tracks on tmpfs)."""
    if not os.path.isdir("/dev/shm") or not os.access("/dev/shm", os.W_OK):
        yield tmp_path
        return
    import fastfc.storage.volume as volume
    monkeypatch.setattr(volume, "_in_memory_fs", lambda path: False)
    d = Path(tempfile.mkdtemp(prefix="fastfc-powercut-", dir="/dev/shm"))
    try:
        yield d
    finally:
        shutil.rmtree(d, ignore_errors=True)




@dataclass
class Run:
    durability: str
    cuts: list
    snaps: dict             # CG sequence -> A images at its coordination instant
    recorder: PowerCutRecorder
    fired: collections.Counter


def _writes(rng: np.random.Generator, A) -> None:
    """Deterministic host writes: every A's first two tracks (so that the
    next drain overwrites B tracks C still reads from B: copy-on-writes) and a
    few random unaligned extents."""
    for a in A:
        ts = a.track_size
        a.write(0, rng.integers(0, 256, 2 * ts, dtype=np.uint8))
        for _ in range(3):
            n = int(rng.integers(1, 2 * ts))
            off = int(rng.integers(0, a.capacity - n + 1))
            a.write(off, rng.integers(0, 256, n, dtype=np.uint8))


def _session_at_cg2(u1: StorageUnit, u2: StorageUnit, rng: np.random.Generator,
                    snaps: dict[int, list[np.ndarray]]):
    """The volumes (GEOMETRY) and the session every power-cut run starts
    from: A random, two CGs committed (the initial copy, then one with
    copy-on-writes ahead), every unit flushed (disk == memory), the A images
    of each coordination instant in ``snaps`` (C's at 0)."""
    A = [u1.create_volume(f"A{i}", n, ts) for i, (ts, n) in enumerate(GEOMETRY)]
    B = [u2.create_volume(f"B{i}", n, ts) for i, (ts, n) in enumerate(GEOMETRY)]
    C = [u2.create_volume(f"C{i}", n, ts) for i, (ts, n) in enumerate(GEOMETRY)]
    for a in A:
        a.write(0, rng.integers(0, 256, a.capacity, dtype=np.uint8))

    def on_coordinate(seq: int) -> None:
        snaps[seq] = [a.array.copy() for a in A]

    gm = GlobalMirror(list(zip(A, B, C)), name=SESSION, max_coordination_time=5.0,
                      on_coordinate=on_coordinate)
    snaps[0] = [c.read(0, c.capacity) for c in C]
    for _ in range(2):
        _writes(rng, A)
        assert gm.form_consistency_group().committed
    u1.flush()
    u2.flush()
    return A, B, C, gm


def run_session(tmp: Path, durability: str, plan, variants, seed: int = 0) -> Run:
    """Form ``len(plan)`` CGs under the recorder, cutting at the planned
    instants; the cut copies are checked later (:func:`check_cut`)."""
    root = tmp / "units"
    p, s = root / "primary", root / "secondary"
    rng = np.random.default_rng(seed)
    cut_rng = np.random.default_rng(seed + 1)
    u1 = StorageUnit(p, durability=durability)
    u2 = StorageUnit(s, durability=durability)
    snaps: dict[int, list[np.ndarray]] = {}
    cuts: list[Cut] = []
    fired: collections.Counter = collections.Counter()
    try:
        A, B, C, gm = _session_at_cg2(u1, u2, rng, snaps)
        rec = PowerCutRecorder([p, s], volumes=A + B + C).start()
        state = {"floor": gm.stats.sequence}

        def take(point: str, index: int) -> None:
            seq = gm._next_sequence - 1
            label = f"{point}[{index}]@CG{seq}"
            fired[f"{point}[{index}]"] += 1
            dirty = {str(k.relative_to(root)): v for k, v in rec.dirty_pages().items()}
            dests = [tmp / "cuts" / f"{len(cuts) + k:03d}" for k in range(len(variants))]
            rec.cuts([(dest, *variant) for dest, variant in zip(dests, variants)], cut_rng)
            for dest, variant in zip(dests, variants):
                cuts.append(Cut(label, point, variant, dest, state["floor"],
                                gm._next_sequence - 1, dirty))

        for n_cg, instants in enumerate(plan):
            _writes(rng, A) if n_cg else None
            if any(pt == "between" and i == 1 for pt, i in instants):
                take("between", 1)
            planned_decision = ("decision", 0) in instants

            def on_decision(planned=planned_decision) -> None:
                if durability == "power":     # the decision's commit was fsynced
                    state["floor"] = gm._next_sequence - 1
                if planned:
                    take("decision", 0)
            faults.inject("decision", action=on_decision)
            for pt, i in instants:
                if pt in ("drain",):
                    faults.inject("drain", A[i], action=lambda pt=pt, i=i: take(pt, i))
                elif pt in ("prepare", "commit", "cow"):
                    faults.inject(pt, B[i], action=lambda pt=pt, i=i: take(pt, i))
                elif pt == "barrier":
                    faults.inject("barrier", after=i, action=lambda pt=pt, i=i: take(pt, i))
            try:
                res = gm.form_consistency_group()
            finally:
                faults.clear()
            assert res.committed, res
            if durability == "power":
                state["floor"] = res.sequence
            if ("between", 0) in instants:
                take("between", 0)
        rec.stop()
        planned = collections.Counter(f"{pt}[{i}]" for inst in plan for pt, i in inst)
        assert fired == planned, f"instants planned {dict(planned)}, reached {dict(fired)}"
        return Run(durability, cuts, snaps, rec, fired)
    finally:
        faults.clear()
        u2.close()
        u1.close()


def check_cut(cut: Cut, snaps: dict) -> list[str]:
    """Open a cut copy and check the promise; returns the violations
    (invariant: detail), empty when it holds."""
    p, s = cut.dest / "primary", cut.dest / "secondary"
    try:
        u1 = StorageUnit(p, durability="power")
    except Exception as e:
        return [f"open: primary unit: {type(e).__name__}: {e}"]
    try:
        try:
            u2 = StorageUnit(s, durability="power")
        except Exception as e:
            return [f"open: secondary unit: {type(e).__name__}: {e}"]
        try:
            return _check_open(u2, cut, snaps)
        finally:
            u2.close()
    finally:
        u1.close()


def _check_open(u2: StorageUnit, cut: Cut, snaps: dict) -> list[str]:
    out = []
    if SESSION not in u2.sessions:
        out.append("session: not restored")
    by_target = {fc.target.name: fc for fc in u2.flashcopies}
    fcs = [by_target.get(f"C{i}") for i in range(N)]
    if any(fc is None for fc in fcs):
        return out + [f"relationships: missing for {[f'C{i}' for i in range(N) if fcs[i] is None]}"]
    if any(fc.revertible for fc in fcs):
        out.append(f"revertible: {[fc.target.name for fc in fcs if fc.revertible]}")
    seqs = [fc.sequence for fc in fcs]
    if len(set(seqs)) != 1:
        return out + [f"sequences: C volumes carry different CGs {seqs}"]
    seq = seqs[0]
    if seq < cut.floor:
        out.append(f"lost CG: C holds CG {seq}, CG {cut.floor}'s decision was durable")
    if seq > cut.attempted or seq not in snaps:
        return out + [f"unknown CG: C holds CG {seq} (newest attempted {cut.attempted})"]
    for i in range(N):
        c = u2.volume(f"C{i}")
        got = c.read(0, c.capacity)
        want = snaps[seq][i]
        if not np.array_equal(got, want):
            bad = sorted(set((np.flatnonzero(got != want) // c.track_size).tolist()))
            out.append(f"image: C{i} differs from CG {seq} on tracks {bad}")
    return out


def check_run(run: Run, until=None) -> tuple[list[tuple[Cut, list[str]]], collections.Counter]:
    """Check every cut of a CG run (:func:`check_cut`); see
    :func:`_check_cuts` for ``until``."""
    return _check_cuts(run.cuts, run.snaps, check_cut, until)


def _check_cuts(cuts, snaps, check, until=None
                ) -> tuple[list[tuple[Cut, list[str]]], collections.Counter]:
    """Check every cut with ``check`` (each cut copy removed once checked);
    returns the violating cuts and a tally of violations by (instant,
    invariant). ``until(bad, tally)``, for a test that asserts that some
    cuts break the promise (the harness has teeth): the kill-like cuts
    (every page and every commit kept, what a process kill leaves: each must
    hold at any durability) are checked first, all of them; then the others
    until ``until`` holds, and the ones left are not checked (what the test
    asserts is shown, and more violations cannot undo it)."""
    return check_cuts(cuts, lambda cut, n: check(cut, snaps), until)


def _describe(bad, tally, total: int, limit: int = 12) -> str:
    lines = [f"{len(bad)} of {total} cuts break the promise; by (instant, invariant): "
             + ", ".join(f"{p}/{k} x{n}" for (p, k), n in sorted(tally.items()))]
    for cut, v in bad[:limit]:
        lines.append(f"  {cut.label} pages={cut.variant[0]} db={cut.variant[1]} "
                     f"floor={cut.floor}: {'; '.join(v)}")
    return "\n".join(lines)


# -- the harness itself ---------------------------------------------------------------
def test_recorder_follows_syncs(tmp_path):
    """The model: unsynced volume pages are lost with pages="none" and kept
    with "all"; a flush makes them part of every cut; an unsynced commit is
    lost with db="synced", a synced one is kept."""
    d = tmp_path / "u"
    rng = np.random.default_rng(0)
    with StorageUnit(d, durability="process") as u:
        v = u.create_volume("V", 4, 4096)
        u.flush()
        with PowerCutRecorder([d], volumes=[v]) as rec:
            v.write(4096, np.full(4096, 7, np.uint8))
            u.create_volume("W", 1, 4096)          # an unsynced commit at "process"
            assert set(rec.dirty_pages()) == {v.path.resolve()}
            rec.cut(tmp_path / "none", rng, pages="none")
            rec.cut(tmp_path / "all", rng, pages="all", db="current")
            v.flush()
            rec.cut(tmp_path / "flushed", rng, pages="none")
            u.flush()                               # sync_point: the commit is durable
            rec.cut(tmp_path / "synced", rng, pages="none")
            assert rec.syncs["Volume.flush"] >= 2 and rec.syncs["sqlite sync_point"] == 1
    for name, data, has_w in (("none", 0, False), ("all", 7, True),
                              ("flushed", 7, False), ("synced", 7, True)):
        with StorageUnit(tmp_path / name / "u") as u:
            assert int(u.volume("V").read(4096, 1)[0]) == data, name
            assert ("W" in u) == has_w, name


def test_power_fsyncs_every_commit(tmp_path):
    """At "power" a step's commit refreshes the recorded database."""
    d = tmp_path / "u"
    with StorageUnit(d, durability="power") as u:
        u.flush()
        with PowerCutRecorder([d]) as rec:
            u.create_volume("W", 1, 4096)
            assert rec.syncs["sqlite commit (fsynced)"] >= 1
            rec.cut(tmp_path / "cut", np.random.default_rng(0), pages="none")
    with StorageUnit(tmp_path / "cut" / "u") as u:
        assert "W" in u


# -- the promise under power cuts ---------------------------------------------------
# The first two are seconds each and the slow ones below cover more of the
# same (more instants, more variants, other seeds): all run in CI; the quick
# loop keeps the cheaper checks on every path, with their teeth.
@pytest.mark.slow
def test_process_durability_is_caught(work):
    """The harness has teeth: at durability "process" nothing is synced
    between flushes, and some cut must break the promise."""
    t = time.perf_counter()
    run = run_session(work, "process", PLAN, VARIANTS)
    bad, tally = check_run(run, until=lambda bad, tally: any(k == "image" for _, k in tally))
    print(f"\nprocess: {len(run.cuts)} cuts, {time.perf_counter() - t:.1f} s\n"
          + _describe(bad, tally, len(run.cuts)))
    assert bad, f"no violation in {len(run.cuts)} cuts at durability 'process': the harness cannot fail"
    kill_like = [(c, v) for c, v in bad if c.variant == ("all", "current")]
    assert not kill_like, "a cut that keeps every page (a process kill) breaks the promise:\n" + \
        _describe(kill_like, collections.Counter(), len(run.cuts))
    assert any(k == "image" for _, k in tally), tally


def _power(tmp_path, plan, variants, seed=0):
    t = time.perf_counter()
    run = run_session(tmp_path, "power", plan, variants, seed=seed)
    bad, tally = check_run(run)
    syncs = ", ".join(f"{k} x{n}" for k, n in sorted(run.recorder.syncs.items()))
    print(f"\npower: {len(run.cuts)} cuts, {time.perf_counter() - t:.1f} s; syncs seen: {syncs}")
    assert not bad, _describe(bad, tally, len(run.cuts))


@pytest.mark.slow
def test_power_durability_survives_cuts(work):
    _power(work, POWER_PLAN, VARIANTS)


@pytest.mark.slow
@pytest.mark.parametrize("seed", [
    1, pytest.param(2, marks=pytest.mark.soak), pytest.param(3, marks=pytest.mark.soak)])
def test_power_durability_survives_more_cuts(work, seed):
    """Every instant of SLOW_PLAN, each seed (other host writes, other page
    versions drawn); the single-sync barriers (each one cut by
    test_power_durability_survives_cuts already) cut once more, with
    SLOW_VARIANTS: all by seed 1 (the one CI runs), and again shared among
    the three seeds under --run-soak."""
    barriers = POWER_PLAN[len(PLAN):]
    mine = barriers if seed == 1 else barriers[seed - 1::3]
    _power(work, SLOW_PLAN + mine, SLOW_VARIANTS, seed=seed)


@pytest.mark.slow
@pytest.mark.soak     # more cuts than the test before it makes
def test_process_durability_is_caught_often(work):
    """More cuts at "process": the violations show at several instants."""
    run = run_session(work, "process", SLOW_PLAN, SLOW_VARIANTS, seed=7)
    bad, tally = check_run(run, until=lambda bad, tally: len({p for p, _ in tally}) >= 3)
    print("\n" + _describe(bad, tally, len(run.cuts)))
    assert len({p for p, _ in tally}) >= 3, tally


# -- teeth at "power": drop one of the ordering barriers, the cuts must notice ----------
def _drop(kind: str):
    """A ``SQLiteStore.sync`` that skips one kind of barrier."""
    from fastfc.durable.sqlite import FileBitmap, SQLiteStore
    real = SQLiteStore.sync

    def sync(store, *things):
        keep = [t for t in things
                if not (kind == "C data" and getattr(t, "name", "").startswith("C"))
                and not (kind == "B data" and getattr(t, "name", "").startswith("B"))
                and not (kind == "bitmaps" and isinstance(t, FileBitmap))]
        return real(store, *keep)
    return sync


@pytest.mark.parametrize("barrier", [pytest.param("C data", marks=pytest.mark.slow),
                                     pytest.param("B data", marks=pytest.mark.slow),
                                     pytest.param("bitmaps", marks=pytest.mark.slow)])
def test_power_without_a_barrier_is_caught(work, monkeypatch, barrier):
    """At "power" with one kind of the ordered drain's syncs skipped, some
    cut breaks the promise: each barrier is needed, and the cuts can tell."""
    from fastfc.durable.sqlite import SQLiteStore
    if not hasattr(SQLiteStore, "sync"):
        pytest.skip("this fastfc has no power ordering (SQLiteStore.sync)")
    monkeypatch.setattr(SQLiteStore, "sync", _drop(barrier))
    run = run_session(work, "power", PLAN, VARIANTS[:4])
    bad, tally = check_run(run, until=lambda bad, tally: bool(bad))
    print(f"\npower without {barrier} syncs: " + _describe(bad, tally, len(run.cuts), limit=3))
    assert bad, f"no cut noticed the missing {barrier} barrier"


# -- every path that changes B or C, not only the CG ------------------------------------
# Global Copy between CGs (``PPRCPair.drain``: what ``formcg`` sends before its
# first CG, the loop with ``cg_interval > 0`` and the catch-up after a failed
# drain run), the loop with an interval and host writers on another thread,
# closing the session (C takes the tracks it still reads from B), recovery at
# the remote site (failover, fast reverse restore C -> B), failback, and
# reopening a unit that a cut left with a CG in flight (recovery itself).
# Cut instants: every callback the engine makes on these paths (a
# copy-on-write into C, each sync at "power", the decision, between steps),
# each taken with probability ``rate`` (a fixed seed picks which).

@dataclass
class Paths:
    cuts: list
    snaps: dict
    recorder: PowerCutRecorder
    fired: collections.Counter
    results: list


def _loop(gm, A, arm, results: list, loop_cgs: int, seed: int) -> None:
    """The session's continuous loop with an interval (Global Copy between
    its CGs) until ``loop_cgs`` CGs formed, a host writer on its own thread.
    The second attempt's drain fails (an injected fault at A1, after triplet
    0 drained its share): the loop catches up in Global Copy and goes on."""
    gm.cg_interval = 0.02
    gm.on_result = results.append
    stop = threading.Event()
    wrng = np.random.default_rng(seed + 3)

    def writer() -> None:
        while not stop.is_set():
            a = A[int(wrng.integers(N))]
            n = int(wrng.integers(1, 2 * a.track_size))
            a.write(int(wrng.integers(0, a.capacity - n + 1)),
                    wrng.integers(0, 256, n, dtype=np.uint8))
            time.sleep(0.001)
    w = threading.Thread(target=writer, daemon=True)
    arm()
    faults.inject("drain", A[1], after=1)
    w.start()
    gm.start()
    give_up = time.monotonic() + 600     # a bound for a hang only: cuts make a loaded machine slow
    try:
        while time.monotonic() < give_up:     # loop_cgs CGs, one after the catch-up
            ok = [r.committed for r in results]
            if False in ok and ok[ok.index(False):].count(True) and sum(ok) >= loop_cgs:
                break
            time.sleep(0.005)
    finally:
        gm.stop()
        stop.set()
        w.join()
        faults.clear()
        gm.on_result = None
    failed = [r for r in results if not r.committed]
    assert len(failed) == 1 and failed[0].cause.name == "DRAIN_ERROR", results
    assert sum(r.committed for r in results) >= loop_cgs, results


def run_paths(tmp: Path, durability: str, variants, seed: int = 0, rate: float = 0.5,
              rounds: int = 2, loop_cgs: int = 3, send_tracks: int = 2,
              end: str = "recover") -> Paths:
    """Take the session through every path that changes B or C, cutting at a
    random share (``rate``) of the instants the engine calls back at. ``end``:
    "recover" (recovery at the remote site, then failback) or "close" (the
    session ends; each C first takes the tracks it still reads from B)."""
    root = tmp / "units"
    p, s = root / "primary", root / "secondary"
    rng = np.random.default_rng(seed)
    cut_rng = np.random.default_rng(seed + 1)
    pick = np.random.default_rng(seed + 2)
    u1 = StorageUnit(p, durability=durability)
    u2 = StorageUnit(s, durability=durability)
    snaps: dict[int, list[np.ndarray]] = {}
    cuts: list[Cut] = []
    fired: collections.Counter = collections.Counter()
    results: list = []
    rec = None
    try:
        A, B, C, gm = _session_at_cg2(u1, u2, rng, snaps)
        rec = PowerCutRecorder([p, s], volumes=A + B + C).start()
        state = {"floor": gm.stats.sequence, "phase": ""}
        cut_lock = threading.Lock()

        def take(point: str, always: bool = False) -> None:
            with cut_lock:
                label = f"{state['phase']}/{point}"
                fired[label] += 1
                if not always and pick.random() >= rate:
                    return
                seq = gm._next_sequence - 1
                dests = [tmp / "cuts" / f"{len(cuts) + k:04d}" for k in range(len(variants))]
                rec.cuts([(dest, *variant) for dest, variant in zip(dests, variants)], cut_rng)
                for dest, variant in zip(dests, variants):
                    cuts.append(Cut(f"{label}@CG{seq}", label, variant, dest,
                                    state["floor"], seq,
                                    {"c_seq": state.get("c_seq"),
                                     "recovered": state["phase"] in ("recover", "failback")}))

        def on_decision() -> None:
            if durability == "power":
                state["floor"] = gm._next_sequence - 1
            take("decision")

        def arm() -> None:
            faults.clear()
            for b in B:
                faults.inject("cow", b, times=1 << 30, action=lambda: take("cow"))
            faults.inject("barrier", times=1 << 30, action=lambda: take("barrier"))
            faults.inject("decision", times=1 << 30, action=on_decision)

        def form() -> None:
            res = gm.form_consistency_group()
            assert res.committed, res
            if durability == "power":
                state["floor"] = res.sequence

        # Global Copy between CGs, in small sends, host writes between them
        for r in range(rounds):
            state["phase"] = "global copy"
            _writes(rng, A)
            arm()
            for k in range(64):
                sent = sum(t.pair.drain(send_tracks * t.a.track_size) for t in gm.triplets)
                take("between sends")
                if not sent:
                    break
                if k % 3 == 0:
                    _writes(rng, A)
            state["phase"] = "cg"
            form()
            take("after CG")

        # the continuous loop with an interval, host writers on their own thread
        state["phase"] = "loop"
        if loop_cgs:
            _loop(gm, A, arm, results, loop_cgs, seed)
            if durability == "power":
                state["floor"] = gm.stats.sequence
            take("after loop", always=True)
        state["phase"] = end
        faults.clear()
        if end == "close":        # C still reads from B the tracks of the last CG
            _writes(rng, A)
            form()
            state["c_seq"] = gm.stats.sequence
            assert any(fc.tracks_to_copy for fc in (t.fc for t in gm.triplets))
            arm()
            gm.close(on_copy=lambda done, total: take("between copies"))
            faults.clear()
            take("after close", always=True)
            rec.stop()
            return Paths(cuts, snaps, rec, fired, results)
        state["c_seq"] = gm.stats.sequence
        # recovery at the remote site, after Global Copy wrote B past the
        # last CG (the restore has tracks to copy back), then failback
        _writes(rng, A)
        for t in gm.triplets:
            t.pair.drain()
        take(f"before {end}", always=True)
        arm()
        assert gm.recover() == state["c_seq"]
        for _ in range(3):
            take("after recover", always=True)
        state["phase"] = "failback"
        for t in gm.triplets:
            t.pair.failback()
            take("after failback")
        for t in gm.triplets:
            while t.pair.drain(send_tracks * t.a.track_size):
                take("between sends")
        faults.clear()
        rec.stop()
        return Paths(cuts, snaps, rec, fired, results)
    finally:
        faults.clear()
        if rec is not None and rec.active:
            rec.stop()
        u2.close()
        u1.close()


def check_paths_cut(cut: Cut, snaps: dict) -> list[str]:
    """As :func:`check_cut`; a cut taken during or after recovery (the pairs
    failed over, C restored onto B) must also give, after the reopened
    session recovers (again), every B equal to its C."""
    if cut.point.startswith(("failback/", "close/")):
        return _check_c_only(cut, snaps)
    out = check_cut(cut, snaps)
    if out or not cut.dirty.get("recovered"):
        return out
    with StorageUnit(cut.dest / "primary", durability="power"), \
            StorageUnit(cut.dest / "secondary", durability="power") as u2:
        gm = u2.sessions[SESSION]
        by_target = {fc.target.name: fc for fc in u2.flashcopies}
        seq = by_target["C0"].sequence
        if not all(t.pair.failed_over for t in gm.triplets):
            gm.recover()
        for i in range(N):
            b = u2.volume(f"B{i}")
            if not np.array_equal(b.read(0, b.capacity), snaps[seq][i]):
                out.append(f"recovered B: B{i} does not hold CG {seq}")
    return out


def _check_c_only(cut: Cut, snaps: dict) -> list[str]:
    """After failback (B the primary, A its secondary), or while the session
    ends, only C is the promise's: each still reads the CG it held (no CG
    forms meanwhile)."""
    out = []
    with StorageUnit(cut.dest / "primary", durability="power"), \
            StorageUnit(cut.dest / "secondary", durability="power") as u2:
        for i in range(N):
            c = u2.volume(f"C{i}")
            seq = cut.dirty["c_seq"]
            if not np.array_equal(c.read(0, c.capacity), snaps[seq][i]):
                out.append(f"image: C{i} does not hold CG {seq}")
    return out


def check_paths(run: Paths, until=None):
    """Check every cut of a run over every path (:func:`check_paths_cut`);
    see :func:`_check_cuts` for ``until``."""
    return _check_cuts(run.cuts, run.snaps, check_paths_cut, until)


PATH_VARIANTS = [("random", "synced"), ("random", "synced"), ("all", "current")]


def _paths(work, durability, variants, until=None, **kw):
    t = time.perf_counter()
    run = run_paths(work, durability, variants, **kw)
    t1 = time.perf_counter()
    bad, tally = check_paths(run, until)
    print(f"\n{durability}, every path: {len(run.cuts)} cuts, {t1 - t:.1f} + "
          f"{time.perf_counter() - t1:.1f} s; instants reached: {dict(run.fired)}\n"
          + _describe(bad, tally, len(run.cuts), limit=4))
    return run, bad, tally


PATH_INSTANTS = ("global copy/cow", "global copy/barrier", "global copy/between sends",
                 "cg/barrier", "loop/cow", "loop/barrier", "loop/decision",
                 "recover/barrier", "recover/after recover", "failback/between sends")


@pytest.mark.slow
def test_power_survives_cuts_on_every_path(work):
    """At "power" a cut anywhere on the paths that change B or C (Global
    Copy between CGs with host writes between sends, the CG after it, the
    loop with an interval and a writer thread, recovery at the remote site,
    failback) leaves every C on one committed CG, at least the newest whose
    decision was durable; after recovery, every B on it too."""
    run, bad, tally = _paths(work, "power", PATH_VARIANTS, rate=0.1, rounds=1,
                             loop_cgs=1, send_tracks=4)
    assert not bad, _describe(bad, tally, len(run.cuts))
    missing = [w for w in PATH_INSTANTS if not run.fired[w]]
    assert not missing, f"instants never reached: {missing}; reached: {dict(run.fired)}"


@pytest.mark.slow
def test_power_survives_cuts_while_a_session_ends(work):
    """At "power" a cut while a session ends (each C takes, by FlashCopy's
    background-copy path, the tracks it still reads from B, then the
    relationships and pairs go) leaves every C on the last CG."""
    run, bad, tally = _paths(work, "power", PATH_VARIANTS, rate=0.5, rounds=0,
                             loop_cgs=0, end="close")
    assert not bad, _describe(bad, tally, len(run.cuts))
    missing = [w for w in ("close/barrier", "close/cow", "close/between copies",
                           "close/after close")
               if not run.fired[w]]
    assert not missing, f"instants never reached: {missing}; reached: {dict(run.fired)}"


@pytest.mark.slow
@pytest.mark.soak     # more cuts than the test before it makes
def test_power_survives_more_cuts_on_every_path(work):
    run, bad, tally = _paths(work, "power", PATH_VARIANTS, seed=5, rate=0.15, send_tracks=3)
    assert not bad, _describe(bad, tally, len(run.cuts))


def test_process_is_caught_on_every_path(work):
    """The same paths at "process" (nothing synced between flushes): some cut
    breaks the promise (the harness has teeth there), and none that keeps
    every page and every commit (what a process kill leaves)."""
    run, bad, tally = _paths(work, "process", PATH_VARIANTS, rate=0.1, rounds=1,
                             loop_cgs=2, send_tracks=4, until=lambda bad, tally: bool(bad))
    assert bad, f"no violation in {len(run.cuts)} cuts at 'process': the harness cannot fail"
    kill_like = [(c, v) for c, v in bad if c.variant == ("all", "current")]
    assert not kill_like, "a cut that keeps every page (a process kill) breaks the promise:\n" + \
        _describe(kill_like, collections.Counter(), len(run.cuts))


def test_power_without_ordered_global_copy_is_caught(work, monkeypatch):
    """At "power" with the ordering of Global Copy's sends skipped (PPRC
    updates copy on write into C with no sync between them, as before the
    ordering existed), cuts between CGs break the promise."""
    from fastfc.copyservices.pprc import PPRCPair
    monkeypatch.setattr(PPRCPair, "_order_send", lambda self, bitmap, start, stop: None)
    run, bad, tally = _paths(work, "power", PATH_VARIANTS, rate=0.2, rounds=1,
                             loop_cgs=0, send_tracks=8, end="close",
                             until=lambda bad, tally: any(p.startswith("global copy/")
                                                          for p, _ in tally))
    assert any(p.startswith("global copy/") for p, _ in tally), tally


# -- recovery itself: a cut while a unit that a cut left with a CG in flight reopens ----
def test_power_survives_cuts_during_recovery(work):
    """Cut a session at durability "power" inside the FlashCopy phase of a
    CG (right after its decision, and inside its commits: relationships
    committed in memory, not in the database), power the copies on (reopen:
    recovery carries out the recorded decision) and cut again at every
    instant of that recovery (its commits, each sync, after the open, after
    the close that follows): each second cut still holds the CG whose
    decision was durable."""
    rng = np.random.default_rng(11)
    cut_rng = np.random.default_rng(12)
    root = work / "units"
    p, s = root / "primary", root / "secondary"
    snaps: dict[int, list[np.ndarray]] = {}
    first: list[Cut] = []
    with StorageUnit(p, durability="power") as u1, StorageUnit(s, durability="power") as u2:
        A, B, C, gm = _session_at_cg2(u1, u2, rng, snaps)

        def take(point: str) -> None:
            seq = gm._next_sequence - 1
            variants = (("random", "synced"), ("all", "synced"))
            dests = [work / "first" / f"{len(first) + k:03d}" for k in range(len(variants))]
            rec.cuts([(dest, *variant) for dest, variant in zip(dests, variants)], cut_rng)
            for dest, variant in zip(dests, variants):
                first.append(Cut(f"{point}@CG{seq}", point, variant, dest, seq, seq))

        with PowerCutRecorder([p, s], volumes=A + B + C) as rec:
            _writes(rng, A)
            faults.inject("decision", action=lambda: take("decision"))
            faults.inject("commit", B[2], action=lambda: take("commit[2]"))
            try:
                assert gm.form_consistency_group().committed
            finally:
                faults.clear()
    assert len(first) == 4
    second: list[Cut] = []
    pick = np.random.default_rng(13)
    for k, cut in enumerate(first):
        cp, cs = cut.dest / "primary", cut.dest / "secondary"

        def take2(point: str, cut=cut) -> None:
            if point == "commit" and pick.random() >= 0.3:
                return
            dests = [work / "second" / f"{len(second) + k:03d}"
                     for k in range(len(PATH_VARIANTS))]
            rec2.cuts([(dest, *variant) for dest, variant in zip(dests, PATH_VARIANTS)],
                      cut_rng)
            for dest, variant in zip(dests, PATH_VARIANTS):
                second.append(Cut(f"recovery/{point} of {cut.label}", f"recovery/{point}",
                                  variant, dest, cut.floor, cut.attempted))

        with PowerCutRecorder([cp, cs]) as rec2:
            faults.inject("commit", times=1 << 30, action=lambda: take2("commit"))
            faults.inject("revert", times=1 << 30, action=lambda: take2("revert"))
            faults.inject("barrier", times=1 << 30, action=lambda: take2("barrier"))
            try:
                u1 = StorageUnit(cp, durability="power")
                u2 = StorageUnit(cs, durability="power")
                recovered = list(u2.recovered)
                take2("opened")
                u2.close()
                u1.close()
                take2("closed")
            finally:
                faults.clear()
        assert recovered, f"{cut.label}: nothing in flight to recover"
    points = collections.Counter(c.point for c in second)
    assert points["recovery/commit"], points
    bad, tally = [], collections.Counter()
    for cut in first + second:
        v = check_cut(cut, snaps)
        if v:
            bad.append((cut, v))
            for x in v:
                tally[(cut.point, x.split(":")[0])] += 1
    print(f"\nrecovery: {len(first)} first cuts, {len(second)} cuts during their recovery; "
          f"{dict(points)}")
    assert not bad, _describe(bad, tally, len(first) + len(second))
