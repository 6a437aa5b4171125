"""Sparse CGs on storage units at durability "process": a CG steps and
records only the B->C relationships whose B changed; the others' records
keep the number of their own last step while their C holds every later
CG's image. A unit killed at any step of such a CG, reopened (read-write or
read-only), gives every C the session's last committed CG, image and
sequence alike. At durability "power" every relationship is stepped.

A kill here is a copy of the unit directories taken while the units are
open and a CG is stopped at a step (``SimulatedCrash`` from a fault action):
every file as the page cache holds it, as SIGKILL leaves it
(tests/test_crash.py kills real processes)."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest

from fastfc import GlobalMirror, StorageUnit, faults
from helpers import image, rand

TS = 4096
N = 8        # tracks per volume
T = 4        # triplets


@pytest.fixture
def tmp_path(tmpfs_tmp_path):
    return tmpfs_tmp_path


@pytest.fixture(autouse=True)
def _no_faults():
    faults.clear()
    yield
    faults.clear()


class SimulatedCrash(BaseException):
    """Raised by a fault action: unwinds as a kill stops the world."""


def crash():
    raise SimulatedCrash()


def session(root: Path, durability: str = "process"):
    u1 = StorageUnit(root / "p", durability=durability)
    u2 = StorageUnit(root / "s", durability=durability)
    trips = []
    for i in range(T):
        a = u1.create_volume(f"A{i}", N, TS)
        a.write(0, rand(a.capacity, 10 + i))
        trips.append((a, u2.create_volume(f"B{i}", N, TS), u2.create_volume(f"C{i}", N, TS)))
    gm = GlobalMirror(trips, name="gm", max_coordination_time=1.0)
    return u1, u2, gm


def killed(root: Path, dest: Path) -> Path:
    """The unit directories as a kill leaves them now."""
    for d in ("p", "s"):
        shutil.copytree(root / d, dest / d, ignore=shutil.ignore_patterns("unit.lock"))
    return dest


def a_images(gm) -> list[np.ndarray]:
    return [image(t.a) for t in gm.triplets]


def check_reopened(root: Path, seq: int, images: list[np.ndarray]) -> list[str]:
    """Open the secondary unit (read-only first: it changes nothing, so the
    read-write open after it finds the same), then both: every C carries
    ``seq`` and holds ``images``; one more CG commits and mirrors A."""
    if not pending_cg(root):
        with StorageUnit(root / "s", readonly=True) as ro:
            assert sorted(fc.sequence for fc in ro.flashcopies) == [seq] * T
            for i in range(T):
                assert np.array_equal(image(ro.volume(f"C{i}")), images[i]), f"C{i}"
    with StorageUnit(root / "s") as u2:
        recovered = list(u2.recovered)
        fcs = sorted(u2.flashcopies, key=lambda fc: fc.target.name)
        assert not any(fc.revertible for fc in fcs)
        assert [fc.sequence for fc in fcs] == [seq] * T
        for i in range(T):
            assert np.array_equal(image(u2.volume(f"C{i}")), images[i]), f"C{i} differs"
    # what the read-write open recorded stands on its own (the next open
    # lifts nothing, resolves nothing)
    with StorageUnit(root / "p") as u1, StorageUnit(root / "s") as u2:
        assert u2.recovered == []
        gm = u2.session("gm")
        assert gm.c_sequences == [seq] * T
        assert gm.stats.sequence == seq
        res = gm.form_consistency_group()
        assert res.committed and res.sequence == seq + 1
        assert gm.c_sequences == [seq + 1] * T
        for i, t in enumerate(gm.triplets):
            assert np.array_equal(image(t.c), image(t.a)), f"C{i} after one more CG"
    return recovered


def pending_cg(root: Path) -> bool:
    """Whether opening the secondary must resolve a CG (a read-only open
    refuses then)."""
    try:
        with StorageUnit(root / "s", readonly=True):
            return False
    except Exception:
        return True


def test_idle_cgs_step_nothing_and_a_kill_leaves_every_c_on_the_last(tmp_path):
    """Triplets 2 and 3 stay unchanged over many CGs: their records keep
    CG 1, the others move on; killed between CGs, every C comes back on the
    newest CG (image and number), read-only and read-write."""
    u1, u2, gm = session(tmp_path / "run")
    try:
        assert gm.form_consistency_group().committed
        for k in range(6):
            gm.triplets[k % 2].a.write((k % N) * TS, rand(TS, k))
            assert gm.form_consistency_group().committed
        for k in range(3):       # nothing changed anywhere
            assert gm.form_consistency_group().committed
        assert gm.c_sequences == [10] * T
        want = a_images(gm)
        root = killed(tmp_path / "run", tmp_path / "kill")
    finally:
        gm.close(discard=True)
        u2.close()
        u1.close()
    # what the records say before the reopen lifts them: the unchanged
    # triplets' rows keep the CG of their last step
    assert check_reopened(root, 10, want) == []


def kill_before(u2: StorageUnit, statement: str, nth: int, root: Path, dest: Path):
    """Take the copy a kill leaves (:func:`killed`) just before the
    secondary unit's ``nth`` statement (from 0) that starts with
    ``statement`` (its SQL, or what it keeps for the CG journal, or the
    journal's append: ``JOURNAL COMMIT``), and let the CG go on. No fault
    is armed: the CG steps only what changed."""
    seen = [0]

    def on_statement(sql: str) -> None:
        if sql.startswith(statement):
            if seen[0] == nth:
                killed(root, dest)
            seen[0] += 1
    u2.store.set_trace_callback(on_statement)


@pytest.mark.parametrize("nth, committed", [(0, False), (1, True)])
def test_killed_inside_a_cg_that_skipped_triplets(tmp_path, nth, committed):
    """CG 3 steps only triplet 0. Killed before its first append (its
    prepare and decision: nothing of it recorded), every C comes back on
    CG 2; killed before its second (the commit: the decision "commit" is
    recorded), reopening commits triplet 0 and the skipped triplets carry
    CG 3 too (their C holds it: their B did not change)."""
    u1, u2, gm = session(tmp_path / "run")
    dest = tmp_path / "kill"
    try:
        assert gm.form_consistency_group().committed
        gm.triplets[1].a.write(0, rand(TS, 1))
        assert gm.form_consistency_group().committed
        before = a_images(gm)
        gm.triplets[0].a.write(TS, rand(TS, 2))
        after = a_images(gm)
        kill_before(u2, "JOURNAL COMMIT", nth, tmp_path / "run", dest)
        res = gm.form_consistency_group()
        u2.store.set_trace_callback(None)
        assert res.committed and res.sequence == 3
        assert (dest / "s").exists()
    finally:
        gm.close(discard=True)
        u2.close()
        u1.close()
    recovered = check_reopened(dest, 3 if committed else 2, after if committed else before)
    assert recovered == ([f"session gm: CG 3 committed on {T} of {T} volumes"] if committed
                         else [])


@pytest.mark.parametrize("nth", range(9))
def test_killed_before_any_statement_of_sparse_cgs(tmp_path, nth):
    """Killed before each of the secondary unit's statements in turn over
    three CGs that each step one triplet (a different one): every C comes
    back on one CG, the one in flight or the one before it."""
    u1, u2, gm = session(tmp_path / "run")
    dest = tmp_path / "kill"
    try:
        assert gm.form_consistency_group().committed
        images = {1: a_images(gm)}
        kill_before(u2, "", nth, tmp_path / "run", dest)
        for k in range(3):
            gm.triplets[k + 1].a.write(k * TS, rand(TS, 20 + k))
            res = gm.form_consistency_group()
            assert res.committed
            images[res.sequence] = a_images(gm)
        u2.store.set_trace_callback(None)
        assert (dest / "s").exists()
    finally:
        gm.close(discard=True)
        u2.close()
        u1.close()
    with StorageUnit(dest / "s") as probe:
        seqs = {fc.sequence for fc in probe.flashcopies}
    assert len(seqs) == 1
    seq = seqs.pop()
    check_reopened(dest, seq, images[seq])


def test_a_failed_prepare_with_a_fault_armed_steps_every_triplet(tmp_path):
    """While a fault is armed at a FlashCopy step, a CG steps every
    relationship (as without sparse steps): CG 3's prepare fails on
    triplet 1 (decision "revert"), killed at the revert of triplet 0: every
    C comes back on CG 2, and the reopen reverted the 3 prepared ones."""
    u1, u2, gm = session(tmp_path / "run")
    try:
        assert gm.form_consistency_group().committed
        gm.triplets[2].a.write(0, rand(TS, 1))
        assert gm.form_consistency_group().committed
        want = a_images(gm)
        gm.triplets[0].a.write(0, rand(TS, 2))
        faults.inject("prepare", gm.triplets[1].b)
        faults.inject("revert", gm.triplets[0].b, action=crash)
        with pytest.raises(SimulatedCrash):
            gm.form_consistency_group()
        root = killed(tmp_path / "run", tmp_path / "kill")
        faults.clear()
    finally:
        gm.close(discard=True)
        u2.close()
        u1.close()
    recovered = check_reopened(root, 2, want)
    assert recovered == [f"session gm: CG 3 reverted on {T - 1} of {T} volumes"]


def test_records_of_skipped_triplets_name_their_own_last_step(tmp_path, monkeypatch):
    """The CG records name only what they stepped: without the reopen's
    lift, the unchanged triplets' rows carry the CG of their last step
    (CG 1) and the changed one the newest (CG 4); with it, all carry 4."""
    u1, u2, gm = session(tmp_path / "run")
    try:
        assert gm.form_consistency_group().committed
        for k in range(3):
            gm.triplets[0].a.write(0, rand(TS, k))
            assert gm.form_consistency_group().committed
        root = killed(tmp_path / "run", tmp_path / "kill")
    finally:
        gm.close(discard=True)
        u2.close()
        u1.close()
    with monkeypatch.context() as m:
        m.setattr(StorageUnit, "_lift_unstepped", lambda self, *args: [])
        with StorageUnit(root / "s", readonly=True) as ro:
            got = {fc.target.name: fc.sequence for fc in ro.flashcopies}
        assert got == {"C0": 4, "C1": 1, "C2": 1, "C3": 1}
    with StorageUnit(root / "s", readonly=True) as ro:
        assert sorted(fc.sequence for fc in ro.flashcopies) == [4] * T


def test_at_power_every_relationship_is_stepped(tmp_path):
    """Durability "power" orders the drain of every pair: its CGs step (and
    record) every relationship, changed or not, as before sparse steps."""
    u1, u2, gm = session(tmp_path / "run", durability="power")
    try:
        assert not any(g.sparse for g in gm.groups)
        assert gm.form_consistency_group().committed
        statements: list[str] = []
        u2.store.set_trace_callback(statements.append)
        try:
            assert gm.form_consistency_group().committed    # nothing changed
        finally:
            u2.store.set_trace_callback(None)
        assert any("flash_log" in s for s in statements), statements
        assert gm.c_sequences == [2] * T
    finally:
        gm.close(discard=True)
        u2.close()
        u1.close()


def test_at_process_a_unit_session_is_sparse_and_gated(tmp_path):
    """At "process" a unit session takes the in-memory session's sparse
    steps and write gate (an idle CG costs O(1) of the protocol)."""
    from fastfc import _core
    u1, u2, gm = session(tmp_path / "run")
    try:
        assert all(g.sparse for g in gm.groups) and gm._gate is not None
        assert gm.form_consistency_group().committed     # the first looks at every pair
        assert gm.form_consistency_group().committed     # (those its CG ended, once more)
        locks = _core.coordination_locks()
        assert gm.form_consistency_group().committed
        assert _core.coordination_locks() == locks       # no primary changed
        gm.triplets[1].a.write(0, rand(TS, 5))
        res = gm.form_consistency_group()
        assert res.committed and res.bytes_drained == TS
        assert _core.coordination_locks() == locks + 1
        assert gm.c_sequences == [res.sequence] * T
    finally:
        gm.close(discard=True)
        u2.close()
        u1.close()
