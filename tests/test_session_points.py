"""Recovery points of a Global Mirror session's C volumes, on a schedule.

Host writes run between CGs; after every committed CG the model records
each A's image (what every C then holds). A point the schedule took at CG
q must read, on every C, exactly its A's image at CG q, however many CGs
(resyncs of B->C, copy-on-write onto C, reverted CGs) came after. Expiry
follows ``keep`` and the retention; a storage unit keeps the schedule and
the points across a reopen.
"""

from __future__ import annotations

import random

import numpy as np
import pytest
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from fastfc import GlobalMirror, ImmutablePointError, PointChain, StateError, Volume, faults
from fastfc.copyservices.point_schedule import PointSchedule, point_cg

N, TS = 16, 1024


def session(n=2, schedule=None, name="gm"):
    A = [Volume(N, TS, name=f"a{i}") for i in range(n)]
    B = [Volume(N, TS, name=f"b{i}") for i in range(n)]
    C = [Volume(N, TS, name=f"c{i}") for i in range(n)]
    return A, C, GlobalMirror(list(zip(A, B, C)), name=name, points=schedule)


def scheduled(volume):
    chain = PointChain.chain_of(volume)
    return [p for p in (chain.points if chain is not None else []) if point_cg(p.name)]


class SessionPointsModel(RuleBasedStateMachine):

    @initialize(every=st.sampled_from([1, 2, 3]), keep=st.sampled_from([1, 2, 5]),
                seed=st.integers(0, 2**32))
    def make(self, every, keep, seed):
        self.keep = keep
        self.A, self.C, self.gm = session(2, PointSchedule(every_cgs=every, keep=keep))
        self.rng = random.Random(seed)
        self.at_cg: dict[int, list[bytes]] = {}

    @rule(i=st.integers(0, 1), data=st.data())
    def write(self, i, data):
        a = self.A[i]
        off = data.draw(st.integers(0, a.capacity - 1))
        n = data.draw(st.integers(1, min(3000, a.capacity - off)))
        a.write(off, self.rng.randbytes(n))

    @rule(fail=st.booleans())
    def cg(self, fail):
        if fail:
            faults.inject("prepare", self.gm.triplets[1].b)
            try:
                res = self.gm.form_consistency_group()
            finally:
                faults.clear()
            assert not res.committed       # reverted: the C volumes keep the last CG
            return
        res = self.gm.form_consistency_group()
        assert res.committed, res
        self.at_cg[res.sequence] = [a.read(0, a.capacity).tobytes() for a in self.A]

    @precondition(lambda self: self.at_cg)
    @rule()
    def on_demand(self):
        points = self.gm.take_points()
        seq = point_cg(points[0].name)[1]
        assert seq == max(self.at_cg)

    @precondition(lambda self: scheduled(self.C[0]))
    @rule(data=st.data())
    def restore_session(self, data):
        p = data.draw(st.sampled_from(scheduled(self.C[0])))
        seq = point_cg(p.name)[1]
        self.gm.restore_point(seq, quiesced=True)
        assert [a.read(0, a.capacity).tobytes() for a in self.A] == self.at_cg[seq]

    @invariant()
    def points_hold_their_cg(self):
        if not hasattr(self, "gm"):
            return
        for i, c in enumerate(self.C):
            mine = scheduled(c)
            assert len(mine) <= self.keep
            for p in mine:
                seq = point_cg(p.name)[1]
                assert p.image().tobytes() == self.at_cg[seq][i], p
        # one instant: the same CGs on every C
        assert [p.name for p in scheduled(self.C[0])] == [p.name for p in scheduled(self.C[1])]


TestSessionPointsModel = SessionPointsModel.TestCase
TestSessionPointsModel.settings = settings(
    settings.default, max_examples=min(60, settings.default.max_examples))


def test_every_n_cgs_and_keep():
    A, C, gm = session(2, PointSchedule(every_cgs=2, keep=2))
    seqs = []
    for k in range(7):
        A[0].write(0, bytes([k]) * 100)
        assert gm.form_consistency_group().committed
        seqs.append(gm.stats.sequence)
    # taken at CGs 1, 3, 5, 7; the two newest kept
    assert [point_cg(p.name)[1] for p in scheduled(C[0])] == [seqs[4], seqs[6]]
    assert gm.point_status["taken"] == 4 and gm.point_status["expired"] == 4
    assert scheduled(C[0])[0].image()[:100].tobytes() == bytes([4]) * 100


def test_retention_is_never_cut_short():
    A, C, gm = session(1, PointSchedule(every_cgs=1, keep=1, retain_seconds=3600))
    for _ in range(3):
        assert gm.form_consistency_group().committed
    held = scheduled(C[0])
    assert len(held) == 3             # retained: kept beyond keep, never expired
    with pytest.raises(ImmutablePointError):
        held[0].expire()


def test_every_seconds(monkeypatch):
    import fastfc.copyservices.point_schedule as ps
    now = [100.0]
    monkeypatch.setattr(ps.time, "monotonic", lambda: now[0])
    A, C, gm = session(1, PointSchedule(every_seconds=10, keep=10))
    for dt in (0, 3, 3, 5, 1, 20):
        now[0] += dt
        assert gm.form_consistency_group().committed
    # taken at the first CG, at +11 (>= 10 after), at +32
    assert len(scheduled(C[0])) == 3


def test_bad_schedules_are_refused():
    for bad, err in (({}, ValueError), ({"every_cgs": 0, "keep": 1}, ValueError),
                     ({"every_cgs": 1.5, "keep": 1}, TypeError),
                     ({"every_seconds": -1, "keep": 1}, ValueError),
                     ({"every_cgs": 1}, ValueError),
                     ({"every_cgs": 1, "keep": 0}, ValueError),
                     ({"every_cgs": 1, "keep": 1, "retain_seconds": float("nan")}, ValueError)):
        with pytest.raises(err):
            PointSchedule(**bad)
    with pytest.raises(TypeError):
        session(1, {"every_cgs": 1})


def test_a_schedule_set_and_cleared():
    A, C, gm = session(1)
    assert gm.form_consistency_group().committed
    assert scheduled(C[0]) == []
    gm.set_point_schedule(PointSchedule(every_cgs=1, keep=3))
    assert gm.form_consistency_group().committed
    assert len(scheduled(C[0])) == 1
    gm.set_point_schedule(None)
    assert gm.form_consistency_group().committed
    assert len(scheduled(C[0])) == 1


def test_a_unit_keeps_the_schedule_and_the_points(tmp_path):
    from fastfc import StorageUnit
    with StorageUnit(tmp_path / "p") as pu, StorageUnit(tmp_path / "s") as su:
        a = pu.create_volume("a", N, TS)
        b = su.create_volume("b", N, TS)
        c = su.create_volume("c", N, TS)
        gm = GlobalMirror([(a, b, c)], name="g", points=PointSchedule(every_cgs=1, keep=2))
        for k in range(3):
            a.write(0, bytes([k + 1]) * 10)
            assert gm.form_consistency_group().committed
        names = [p.name for p in su.points.points("c")]
        assert names == ["g@cg2", "g@cg3"]
        gm.stop()
    with StorageUnit(tmp_path / "p") as pu, StorageUnit(tmp_path / "s") as su:
        gm = su.session("g")
        assert gm.point_schedule == PointSchedule(every_cgs=1, keep=2)
        held = su.points.points("c")
        assert [p.name for p in held] == ["g@cg2", "g@cg3"]
        assert held[1].image()[:10].tobytes() == bytes([3]) * 10
        pu.volume("a").write(0, b"\x09" * 10)
        assert gm.form_consistency_group().committed
        assert [p.name for p in su.points.points("c")] == ["g@cg3", "g@cg4"]
        assert held[1].image()[:10].tobytes() == bytes([3]) * 10
        gm.stop()
    with StorageUnit(tmp_path / "p") as pu, StorageUnit(tmp_path / "s") as su:
        # the expiry of CG 2's point is durable too (its log record, its row)
        held = su.points.points("c")
        assert [p.name for p in held] == ["g@cg3", "g@cg4"]
        assert [p.image()[:10].tobytes() for p in held] == [bytes([3]) * 10, b"\x09" * 10]


def test_restoring_the_session_to_a_points_cg():
    A, C, gm = session(2, PointSchedule(every_cgs=1, keep=10))
    rng = random.Random(5)
    for a in A:
        a.write(0, rng.randbytes(a.capacity))
    assert gm.form_consistency_group().committed
    good_seq = gm.stats.sequence
    good = [a.read(0, a.capacity).tobytes() for a in A]
    for _ in range(3):                 # garbage, mirrored through CGs onto B and C
        for a in A:
            off = rng.randrange(0, a.capacity - 5000)
            a.write(off, b"\x66" * 5000)
        assert gm.form_consistency_group().committed
    A[0].write(100, b"\x77" * 300)     # and some not yet in a CG
    with pytest.raises(StateError, match="quiesced"):
        gm.restore_point(good_seq)
    with pytest.raises(StateError, match="no recovery point"):
        gm.restore_point(999, quiesced=True)
    before = [[p.image().tobytes() for p in scheduled(c)] for c in C]
    assert gm.restore_point(good_seq, quiesced=True) > 0
    assert [a.read(0, a.capacity).tobytes() for a in A] == good
    assert gm.form_consistency_group().committed
    for i, t in enumerate(gm.triplets):
        assert t.b.read(0, t.b.capacity).tobytes() == good[i]
        assert t.c.read(0, t.c.capacity).tobytes() == good[i]
    # every point held before keeps its image
    assert [[p.image().tobytes() for p in scheduled(c)][:len(b)]
            for c, b in zip(C, before)] == before


def test_points_of_a_running_session_under_writers_and_readers():
    """The session's loop runs (a point of every C after each CG, 4 kept)
    while writers write the A volumes and a reader reads and restores the
    points: each point read equals its A's image at the CG's coordination
    (captured while the writes are held), and nothing deadlocks."""
    import threading
    at_cg: dict[int, list[bytes]] = {}
    A = [Volume(N, TS, name=f"a{i}") for i in range(2)]
    B = [Volume(N, TS, name=f"b{i}") for i in range(2)]
    C = [Volume(N, TS, name=f"c{i}") for i in range(2)]
    gm = GlobalMirror(list(zip(A, B, C)), name="run",
                      points=PointSchedule(every_cgs=1, keep=4),
                      on_coordinate=lambda seq: at_cg.__setitem__(
                          seq, [a._raw_array().tobytes() for a in A]))
    stop = threading.Event()
    errors: list[BaseException] = []
    checked = [0]

    def writer(i):
        rng = random.Random(i)
        try:
            while not stop.is_set():
                off = rng.randrange(0, A[i].capacity - 600)
                A[i].write(off, rng.randbytes(rng.randrange(1, 600)))
        except BaseException as e:      # pragma: no cover - reported below
            errors.append(e)

    def reader():
        try:
            while not stop.is_set():
                for i, c in enumerate(C):
                    for p in scheduled(c):
                        try:
                            img = p.image().tobytes()
                        except Exception:
                            if p.expired:
                                continue
                            raise
                        assert img == at_cg[point_cg(p.name)[1]][i], p
                        checked[0] += 1
                ps = scheduled(C[0])
                if ps:
                    try:
                        r = ps[-1].restore(Volume(N, TS), background_copy=False)
                    except Exception:
                        if ps[-1].expired:
                            continue
                        raise
                    r.copy()
                    assert r.target.read(0, N * TS).tobytes() == \
                        at_cg[point_cg(ps[-1].name)[1]][0]
        except BaseException as e:
            errors.append(e)

    threads = [threading.Thread(target=writer, args=(i,)) for i in range(2)]
    threads.append(threading.Thread(target=reader))
    gm.start()
    for t in threads:
        t.start()
    import time
    time.sleep(1.0)
    stop.set()
    for t in threads:
        t.join(10)
    gm.stop()
    assert not errors, errors
    assert gm.stats.successes > 2 and checked[0] > 0
    assert gm.point_status["error"] is None


def test_the_guides_session_points_run(capsys):
    """docs/guide/recovery-points.md's session block runs as written and
    prints what its comments say."""
    from pathlib import Path
    page = (Path(__file__).resolve().parent.parent / "docs" / "guide"
            / "recovery-points.md").read_text()
    blocks = [b.split("```", 1)[0] for b in page.split("```python\n")[1:]]
    code = next(b for b in blocks if "PointSchedule" in b)
    exec(compile(code, "recovery-points.md", "exec"), {})
    assert capsys.readouterr().out.split("\n") == [
        "['prod@cg3', 'prod@cg5', 'prod@cg7']", "every 2 CGs, at most 3 kept",
        "b'CG 5' b'\\x00'", ""]
