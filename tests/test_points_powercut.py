"""Simulated power cuts of durable recovery points (tests/powercut.py).

A unit at durability "power" takes points of two volumes (alone and at one
instant, retained or not), saves grains into the newest under host writes,
expires a middle point, the newest and the oldest (whose freed slots the
next saves reuse), restores a point onto a recovery volume and another onto
its own volume. :class:`powercut.PowerCutRecorder` models the
disk (each file as of its last sync, each page changed since holding any of
its versions; the database as of its last synced commit) and the test cuts
the power just before syncs it picks (every sync any of those steps makes,
sampled with a fixed seed) and after each step, in several variants (no
page written back, all, random ones; every commit kept). Each cut copy is
opened (which redoes an interrupted restore) and checked against a model:

- every point that survives reads exactly its image at its take;
- every point whose take returned survives unless its expiry began;
- no point whose expiry returned comes back;
- a recovery volume reads its point's image (a restore is complete, or
  redone at opening); the restored source reads the point's image, or what
  it held before the restore began.

The order is what passes it: with the chain's syncs left out, or only a save's
pool sync (its records can reach the disk before the grains they name), or
the take's volume sync, the same cuts find points that no longer read
their image. At
durability "process" a power cut is covered at ``flush()`` points: cut
inside a flush, the pool and log synced before the volumes keep every
point; with the volumes synced first they do not.
"""

from __future__ import annotations

import os
import shutil
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from fastfc import StorageUnit
from fastfc.durable import points as durable_points

sys.path.insert(0, str(Path(__file__).parent))
from powercut import PowerCutRecorder  # noqa: E402

GEOMETRY = (8, 16384, 4096)          # tracks, track size, grain: 32 grains a volume
VARIANTS = [("random", "synced"), ("random", "synced"), ("none", "synced"),
            ("all", "synced"), ("random", "current")]


@pytest.fixture
def work(tmp_path, monkeypatch):
    """tmpfs when there is one (the model needs no real disk: it records
    what a sync would have made durable)."""
    if not os.path.isdir("/dev/shm") or not os.access("/dev/shm", os.W_OK):
        yield tmp_path
        return
    import fastfc.storage.volume as volume
    monkeypatch.setattr(volume, "_in_memory_fs", lambda path: False)
    d = Path(tempfile.mkdtemp(prefix="fastfc-points-powercut-", dir="/dev/shm"))
    try:
        yield d
    finally:
        shutil.rmtree(d, ignore_errors=True)


class Model:
    """What the scenario did, as the checks need it at a cut."""

    def __init__(self) -> None:
        self.images: dict[tuple[str, int], np.ndarray] = {}  # (volume, seq) -> image at take
        self.taken: set[tuple[str, int]] = set()       # takes that returned
        self.expiring: set[tuple[str, int]] = set()    # expiries begun
        self.expired: set[tuple[str, int]] = set()     # expiries that returned
        self.restores: dict[str, tuple[str, int]] = {}  # recovery volume -> its point
        self.source_restore: tuple[str, int, np.ndarray] | None = None   # (v, seq, before)
        self.step = "setup"

    def snapshot(self) -> dict:
        return {"images": dict(self.images), "taken": set(self.taken),
                "expiring": set(self.expiring), "expired": set(self.expired),
                "restores": dict(self.restores), "source_restore": self.source_restore,
                "step": self.step}


def check_copy(dest: Path, m: dict) -> list[str]:
    """Open the cut copy and check it against the model's snapshot ``m``;
    the violations found."""
    bad: list[str] = []
    with StorageUnit(dest, durability="power") as u:
        live = {(p.volume.name, p.seq): p for p in u.points.points()}
        for key, p in live.items():
            img = m["images"].get(key)
            if img is None:
                bad.append(f"point {key} was never taken")
            elif not np.array_equal(p.image(), img):
                bad.append(f"point {key} does not read its image")
        for key in m["taken"] - m["expiring"]:
            if key not in live:
                bad.append(f"point {key} was lost")
        for key in m["expired"] & set(live):
            bad.append(f"expired point {key} came back")
        for target, key in m["restores"].items():
            if target not in u:
                continue        # cut before the restore was recorded
            r = u.points._restores.get(target)
            if r is not None:
                assert r.wait(30)
            vol = u.volume(target)
            if not np.array_equal(vol.read(0, vol.capacity), m["images"][key]):
                bad.append(f"recovery volume {target} does not read point {key}")
        if m["source_restore"] is not None:
            v, seq, before = m["source_restore"]
            vol = u.volume(v)
            got = vol.read(0, vol.capacity)
            if not (np.array_equal(got, m["images"][(v, seq)]) or np.array_equal(got, before)):
                bad.append(f"{v} restored from #{seq} is neither the point nor what it held")
    return bad


class Cutter:
    """Cuts the power just before syncs (sampled) and at chosen instants,
    and checks each cut copy at once."""

    def __init__(self, work: Path, unit_dir: Path, model: Model, share: float, seed: int,
                 variants=VARIANTS, first_only: bool = False):
        self.work, self.model = work, model
        self.first_only = first_only        # no more cuts once one found a violation
        self.variants = variants
        self.rec = PowerCutRecorder([unit_dir])
        self.rng = np.random.default_rng(seed)
        self.share = share
        self.busy = False
        self.lock = threading.RLock()
        self.cuts = 0
        self.violations: list[str] = []

    def start(self) -> None:
        rec = self.rec
        rec.start()
        refresh, refresh_db = rec.refresh, rec.refresh_db

        def before_sync(path, *a, **k):
            if rec._unit_of(rec._resolve(path)) is not None:
                self.maybe_cut()
            return refresh(path, *a, **k)

        def before_commit(store, *a, **k):
            if rec._resolve(store.dir) in rec.dirs:
                self.maybe_cut()
            return refresh_db(store, *a, **k)
        rec.refresh, rec.refresh_db = before_sync, before_commit

    def maybe_cut(self) -> None:
        if not self.busy and self.rng.random() < self.share:
            self.cut()

    def cut(self) -> None:
        with self.lock:
            if not self.busy and not (self.violations and self.first_only):
                self._cut()

    def _cut(self) -> None:
        self.busy = True
        try:
            snap = self.model.snapshot()
            dests = [self.work / f"cut{self.cuts}-{i}" for i in range(len(self.variants))]
            self.rec.cuts([(d, pages, db) for d, (pages, db) in zip(dests, self.variants)],
                          self.rng)
            self.cuts += 1
            for d, variant in zip(dests, self.variants):
                for problem in check_copy(d / "unit", snap):
                    self.violations.append(f"{snap['step']} {variant}: {problem}")
                shutil.rmtree(d)
        finally:
            self.busy = False

    def stop(self) -> None:
        self.rec.stop()


def _scribble(vol, rng, n=3) -> None:
    for _ in range(n):
        off = int(rng.integers(0, vol.capacity // 512)) * 512
        vol.write(off, rng.integers(0, 256, min(int(rng.integers(512, 12000)),
                                                vol.capacity - off), dtype=np.uint8))


def _take(u, m: Model, names, retain_for=0.0):
    for n in names:
        v = u.volume(n)
        m.images[(n, v._chain.next_point_seq if v._chain is not None else 0)] = \
            v.read(0, v.capacity)
    m.step = f"take {names}"
    points = u.points.take(names, retain_for=retain_for)
    m.taken |= {(p.volume.name, p.seq) for p in points}


def _expire(u, m: Model, v: str, seq: int) -> None:
    m.step = f"expire {v}#{seq}"
    m.expiring.add((v, seq))
    u.points.expire(v, seq)
    m.expired.add((v, seq))


def run_scenario(work: Path, durability: str = "power", share: float = 0.25,
                 seed: int = 0, first_only: bool = False, after_start=None) -> Cutter:
    """The scenario of the module docstring under a :class:`Cutter`."""
    rng = np.random.default_rng(seed)
    unit_dir = work / "unit"
    u = StorageUnit(unit_dir, durability=durability)
    for n in ("a", "b"):
        v = u.create_volume(n, *GEOMETRY[:2], grain_size=GEOMETRY[2])
        v.write(0, rng.integers(0, 256, v.capacity, dtype=np.uint8))
    u.flush()
    m = Model()
    cutter = Cutter(work, unit_dir, m, share, seed + 1, first_only=first_only)
    cutter.start()
    if after_start is not None:
        after_start()
    try:
        _take(u, m, ["a"], retain_for=3600)             # a#0, retained
        _take(u, m, ["b"])                               # b#0
        m.step = "writes"
        _scribble(u.volume("a"), rng)
        _scribble(u.volume("b"), rng)
        cutter.cut()
        _take(u, m, ["a"])                               # a#1
        m.step = "writes"
        _scribble(u.volume("a"), rng)
        _take(u, m, ["a", "b"])                          # a#2 b#1
        m.step = "writes"
        _scribble(u.volume("a"), rng)
        _scribble(u.volume("b"), rng)
        cutter.cut()
        _expire(u, m, "a", 1)                            # a middle point: merged into a#0
        cutter.cut()
        m.step = "restore a#0 onto rec"
        m.restores["rec"] = ("a", 0)
        r = u.points.restore("a", 0, "rec")
        assert r.wait(30)
        # (its record is forgotten by a thread, whose syncs cut too: the
        # harness's instants are of one writer at a time)
        deadline = time.monotonic() + 30
        while u._sqlite.db.execute("SELECT 1 FROM point_restores").fetchone():
            assert time.monotonic() < deadline
            time.sleep(0.01)
        cutter.cut()
        m.step = "writes"
        _scribble(u.volume("a"), rng)
        _expire(u, m, "a", 2)                            # the newest
        cutter.cut()
        u.flush()
        b = u.volume("b")
        m.step = "restore b#0 onto b"
        m.source_restore = ("b", 0, b.read(0, b.capacity))
        u.points.restore_onto_source("b", 0)
        cutter.cut()
        m.source_restore = None
        m.step = "writes"
        _scribble(b, rng)
        _take(u, m, ["b"])                               # b#2
        m.step = "writes"
        _scribble(b, rng)
        _expire(u, m, "b", 0)                            # the oldest: its slots freed
        m.step = "writes"
        _scribble(b, rng, 6)                             # (into slots it freed)
        cutter.cut()
    finally:
        cutter.stop()
        for t in list(u.points._restores.values()):
            t.wait(30)
        u.close()
    return cutter


def test_durable_points_survive_a_power_cut_at_any_sync(work):
    cutter = run_scenario(work, share=0.1)
    assert cutter.cuts >= 10, cutter.cuts
    assert cutter.violations == []


@pytest.mark.slow
@pytest.mark.parametrize("seed", [1, 2])
def test_durable_points_survive_a_power_cut_before_every_sync(work, seed):
    cutter = run_scenario(work, share=1.0, seed=seed)
    assert cutter.cuts >= 40, cutter.cuts
    assert cutter.violations == []


def _unordered_saves(monkeypatch) -> None:
    """A save's records may reach the disk before its grains: the pool is
    not synced before the records are written (the chain's own order)."""
    from fastfc.copyservices import points as cs_points
    real = cs_points.PointChain.open_log

    def open_log(self, log_fd, valid=0, *, ordered=False):
        real(self, log_fd, valid, ordered=False)
    monkeypatch.setattr(cs_points.PointChain, "open_log", open_log)


def test_the_order_is_what_passes_it_no_ordered_syncs(work, monkeypatch):
    """With the chain's syncs left out (a save's, a take's, an expiry's:
    the chain logged as at "process"), the same cuts find a point lost
    after its take returned, or one that does not read its image."""
    _unordered_saves(monkeypatch)
    cutter = run_scenario(work, share=0.3, first_only=True)
    assert any("was lost" in v or "does not read its image" in v
               for v in cutter.violations), cutter.violations


def test_the_order_is_what_passes_it_records_before_grains(work, monkeypatch):
    """With only the pool's sync of a save left out (its records synced,
    the grains they name maybe not on the disk), a cut finds a point that
    reads a slot the pool never received."""
    def skip_pool_syncs():
        watched = os.fdatasync        # (the recorder's: it records what it syncs)

        def fdatasync(fd):
            if not os.readlink(f"/proc/self/fd/{fd}").endswith(".pool"):
                watched(fd)
        monkeypatch.setattr(os, "fdatasync", fdatasync)
    cutter = run_scenario(work, share=0.3, first_only=True, after_start=skip_pool_syncs)
    assert any("does not read its image" in v for v in cutter.violations), cutter.violations


def test_the_order_is_what_passes_it_take_without_the_volume_sync(work, monkeypatch):
    """With the take logged before its volumes are synced, a cut can leave
    a point reading pages older than its take."""
    monkeypatch.setattr(durable_points.UnitPoints, "_sync_images", lambda self, vols: None)
    cutter = run_scenario(work, share=0.3, first_only=True)
    assert any("does not read its image" in v for v in cutter.violations), cutter.violations


def _flush_scenario(work: Path, volumes_first: bool, seed: int = 3) -> list[str]:
    """Durability "process": a point whose image is on the disk, host
    writes that save grains into it, then ``flush()``, cut just before each
    of its syncs as the disk holds it then (no page written back since its
    last sync, the last synced commit). ``volumes_first``: the volume
    synced before the pool and log (the order broken)."""
    rng = np.random.default_rng(seed)
    unit_dir = work / "unit"
    u = StorageUnit(unit_dir, durability="process")
    a = u.create_volume("a", *GEOMETRY[:2], grain_size=GEOMETRY[2])
    a.write(0, rng.integers(0, 256, a.capacity, dtype=np.uint8))
    m = Model()
    m.images[("a", 0)] = a.read(0, a.capacity)
    u.points.take(["a"])
    m.taken.add(("a", 0))
    u.flush()                       # the take and its image on the disk
    cutter = Cutter(work, unit_dir, m, share=0.0, seed=seed,
                    variants=[("none", "synced")])
    cutter.start()                  # (disk == memory now)
    _scribble(a, rng, 6)            # grains saved into a#0
    if volumes_first:
        flush_points = u.points.flush

        def flush():        # the broken order: the volume, then the pool and log
            a.flush()
            flush_points()
        u.points.flush = flush      # type: ignore[method-assign]
    m.step = "flush"
    cutter.share = 1.0              # cut before each of the flush's syncs
    try:
        u.flush()
    finally:
        cutter.stop()
        u.close()
    assert cutter.cuts >= 3
    return cutter.violations


def test_flush_order_at_process(work):
    """At "process", cut inside ``flush()``: the pool and log are synced
    before the volumes, so the point reads its image at every cut; with the
    volume synced first, a cut between leaves it reading the new data."""
    assert _flush_scenario(work / "ordered", volumes_first=False) == []
    bad = _flush_scenario(work / "broken", volumes_first=True)
    assert any("does not read its image" in v for v in bad), bad
