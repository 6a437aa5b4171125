"""Recovery points against a model that keeps every point's whole image.

A Hypothesis state machine writes to two volumes (unaligned spans, grains
from the whole track down to 1/8 of it), takes points of one or both at one
instant, expires them (the oldest, any, those due), extends or tries to
shorten retentions, restores points onto fresh recovery volumes (copying a
little at a time) and back onto their volume, all at random. The model is a
dict of full images, one per point, taken when the point is: it shares no
structure with the chain. Every read of a point, of a volume and of a
recovery volume must equal the model; every attempt to change a point (a
write, a shorter retention, an expiry before its retention ends or while a
restore reads through it) is refused with ImmutablePointError and changes
nothing. A threaded test takes and expires points while writers run.
"""

from __future__ import annotations

import random
import threading

import numpy as np
import pytest
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from fastfc import (FlashCopy, ImmutablePointError, IncompleteCopyError, LimitError, PointChain,
                    StateError, Volume, WriteInhibitedError, take_points)
from fastfc.storage.volume import locked

geometry = st.one_of(
    st.tuples(st.integers(1, 12), st.sampled_from([512, 1024])),
    st.tuples(st.integers(60, 130), st.just(512)),
    st.tuples(st.integers(1, 4), st.just(4096)),
)
splits = st.sampled_from([1, 2, 8])


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def span(data, capacity: int, track: int) -> tuple[int, int]:
    edges = sorted({min(capacity, max(0, t * track + d))
                    for t in range(capacity // track + 1) for d in (-1, 0, 1)})
    offset = data.draw(st.one_of(st.integers(0, capacity), st.sampled_from(edges)),
                       label="offset")
    room = capacity - offset
    length = data.draw(st.one_of(st.integers(0, room),
                                 st.sampled_from(sorted({0, 1, track, room} & set(range(room + 1))))),
                       label="length")
    return offset, length


class RecoveryPointsModel(RuleBasedStateMachine):

    @initialize(g=geometry, split=splits, seed=st.integers(0, 2**32))
    def make(self, g, split, seed):
        n, ts = g
        self.geom = (n, ts, max(512, ts // split))
        self.clock = Clock()
        self.vols = [Volume(n, ts, grain_size=self.geom[2], name=f"v{i}") for i in range(2)]
        self.images = []
        rng = random.Random(seed)
        for v in self.vols:
            content = rng.randbytes(v.capacity)
            v.write(0, content)
            self.images.append(bytearray(content))
        for v in self.vols:
            PointChain.of(v, clock=self.clock)
        # live points: (engine point, volume index, image, retain_until)
        self.points: list[list] = []
        # restores: (engine restore, model point entry, target volume)
        self.restores: list[tuple] = []

    # -- helpers -----------------------------------------------------------
    def live(self, data, label="point"):
        return self.points[data.draw(st.integers(0, len(self.points) - 1), label=label)]

    def pinned(self, entry) -> bool:
        return any(r.active and e is entry for r, e, _ in self.restores)

    def state(self):
        """What a refused call must not change."""
        return (tuple(v.read(0, v.capacity).tobytes() for v in self.vols),
                tuple((p.expired, p.retain_until, p.saved_grains) for p, *_ in self.points),
                tuple((r.active, r.copied.count()) for r, _, _ in self.restores))

    def refused(self, call, exc_type):
        before = self.state()
        with pytest.raises(exc_type):
            call()
        assert self.state() == before

    # -- host writes ---------------------------------------------------------------
    @rule(data=st.data(), i=st.integers(0, 1), seed=st.integers(0, 2**32))
    def write(self, data, i, seed):
        v = self.vols[i]
        offset, length = span(data, v.capacity, v.track_size)
        payload = random.Random(seed).randbytes(length)
        v.write(offset, payload)
        self.images[i][offset:offset + length] = payload

    @rule(data=st.data(), seed=st.integers(0, 2**32))
    def write_batch(self, data, seed):
        v = self.vols[0]
        a = data.draw(st.integers(0, v.capacity - 1), label="a")
        b = data.draw(st.integers(0, v.capacity - 1), label="b")
        length = data.draw(st.integers(1, v.capacity - max(a, b)), label="length")
        rows = np.frombuffer(random.Random(seed).randbytes(2 * length),
                             dtype=np.uint8).reshape(2, length)
        v.write_batch([a, b], rows)
        self.images[0][a:a + length] = rows[0].tobytes()
        self.images[0][b:b + length] = rows[1].tobytes()

    # -- taking ------------------------------------------------------------------
    @rule(which=st.sampled_from([(0,), (1,), (0, 1)]), retain=st.sampled_from([0.0, 10.0]))
    def take(self, which, retain):
        points = take_points([self.vols[i] for i in which], retain_for=retain)
        assert len(points) == len(which)
        for p, i in zip(points, which):
            assert p.group == tuple(points)
            self.points.append([p, i, bytes(self.images[i]), self.clock.now + retain])

    @rule(dt=st.sampled_from([1.0, 5.0, 20.0]))
    def advance(self, dt):
        self.clock.now += dt

    # -- immutability -------------------------------------------------------------
    @precondition(lambda self: self.points)
    @rule(data=st.data())
    def write_point(self, data):
        p = self.live(data)[0]
        self.refused(lambda: p.write(0, b"x"), ImmutablePointError)

    @precondition(lambda self: self.points)
    @rule(data=st.data(), delta=st.sampled_from([-5.0, -0.5, 0.0, 3.0, 30.0]))
    def retain(self, data, delta):
        entry = self.live(data)
        p = entry[0]
        until = p.retain_until + delta
        if delta < 0:
            self.refused(lambda: p.retain(until), ImmutablePointError)
        else:
            p.retain(until)
            entry[3] = until
        assert p.retain_until == entry[3]

    # -- expiring -----------------------------------------------------------------
    def expected_refusal(self, entry):
        if self.clock.now < entry[3] or self.pinned(entry):
            return ImmutablePointError
        return None

    @precondition(lambda self: self.points)
    @rule(data=st.data())
    def expire(self, data):
        entry = self.live(data)
        err = self.expected_refusal(entry)
        if err is not None:
            self.refused(entry[0].expire, err)
            return
        entry[0].expire()
        self.points.remove(entry)
        self.refused(entry[0].expire, StateError)          # once only

    @rule(i=st.integers(0, 1), count=st.integers(1, 3))
    def expire_oldest(self, i, count):
        mine = [e for e in self.points if e[1] == i]
        expect = 0
        for e in mine:
            if expect == count or self.expected_refusal(e) is not None:
                break
            expect += 1
        chain = self.vols[i]._chain
        got = chain.expire_oldest(count) if chain is not None else 0
        assert got == expect
        for e in mine[:expect]:
            assert e[0].expired
            self.points.remove(e)

    @rule(i=st.integers(0, 1))
    def expire_due(self, i):
        due = [e for e in self.points if e[1] == i and self.expected_refusal(e) is None]
        chain = self.vols[i]._chain
        assert (chain.expire_due() if chain is not None else 0) == len(due)
        for e in due:
            self.points.remove(e)

    # -- restoring ----------------------------------------------------------------
    @precondition(lambda self: self.points)
    @rule(data=st.data())
    def restore(self, data):
        entry = self.live(data)
        n, ts, g = self.geom
        target = Volume(n, ts, grain_size=g, name="recovery")
        r = entry[0].restore(target, background_copy=False)
        self.restores.append((r, entry, target))
        self.refused(lambda: target.write(0, b"x"), WriteInhibitedError)
        assert target.read(0, target.capacity).tobytes() == entry[2]

    @precondition(lambda self: any(r.active for r, _, _ in self.restores))
    @rule(data=st.data(), k=st.sampled_from([0, 1, 2, None]))
    def restore_copy(self, data, k):
        r = data.draw(st.sampled_from([x for x in self.restores if x[0].active]))[0]
        r.copy(k)

    @precondition(lambda self: any(r.active for r, _, _ in self.restores))
    @rule(data=st.data(), force=st.booleans())
    def restore_withdraw(self, data, force):
        r, entry, target = data.draw(st.sampled_from([x for x in self.restores if x[0].active]))
        if r.grains_to_copy and not force:
            self.refused(r.withdraw, IncompleteCopyError)
            return
        left = r.grains_to_copy
        r.withdraw(force=force)
        self.restores.remove((r, entry, target))
        assert not r.active
        assert target.valid == (not force or not left)

    @precondition(lambda self: self.points)
    @rule(data=st.data(), quiesced=st.booleans())
    def restore_onto_source(self, data, quiesced):
        entry = self.live(data)
        p, i = entry[0], entry[1]
        if not quiesced:
            self.refused(lambda: p.restore_onto_source(), StateError)
            return
        p.restore_onto_source(quiesced=True)
        self.images[i][:] = entry[2]

    # -- bad input ----------------------------------------------------------------
    @rule(data=st.data())
    def bad_input(self, data):
        n, ts, g = self.geom
        case = data.draw(st.sampled_from(["empty", "twice", "negative", "nan", "geometry",
                                          "itself", "type"]))
        if case == "empty":
            self.refused(lambda: take_points([]), ValueError)
        elif case == "twice":
            self.refused(lambda: take_points([self.vols[0], self.vols[0]]), ValueError)
        elif case == "negative":
            self.refused(lambda: take_points([self.vols[0]], retain_for=-1), ValueError)
        elif case == "nan":
            self.refused(lambda: take_points([self.vols[0]], retain_for=float("nan")),
                         ValueError)
        elif case == "type":
            self.refused(lambda: take_points([b"not a volume"]), TypeError)
        elif self.points:
            p = self.points[0][0]
            if case == "geometry":
                other = Volume(n + 1, ts, grain_size=g)
                self.refused(lambda: p.restore(other), ValueError)
            else:
                self.refused(lambda: p.restore(p.volume), ValueError)

    # -- invariants ---------------------------------------------------------------
    @invariant()
    def images_match(self):
        if not hasattr(self, "vols"):
            return
        for v, img in zip(self.vols, self.images):
            assert v.read(0, v.capacity).tobytes() == bytes(img)
        for p, i, img, until in self.points:
            assert not p.expired
            assert p.retain_until == until
            assert p.image().tobytes() == img, p
        for r, entry, target in self.restores:
            if target.valid:
                assert target.read(0, target.capacity).tobytes() == entry[2]
        for i, v in enumerate(self.vols):
            mine = [e[0] for e in self.points if e[1] == i]
            chain = v._chain
            assert (chain.points if chain is not None else []) == mine
            if chain is not None:
                # the links between a grain's holders find what a look at
                # every point finds
                with locked([v]):
                    assert chain._check_links()

    @invariant()
    def space_is_changed_grains(self):
        """Each point holds exactly the grains that changed between it and
        the next point (at most; an expiry merges its neighbour's in)."""
        if not hasattr(self, "vols"):
            return
        for v in self.vols:
            if v._chain is not None:
                for p in v._chain.points:
                    assert p.saved_grains <= v.n_grains


TestRecoveryPointsModel = RecoveryPointsModel.TestCase
TestRecoveryPointsModel.settings = settings(
    settings.default, max_examples=min(200, settings.default.max_examples))


# ---------------------------------------------------------------------------
# Plain cases
# ---------------------------------------------------------------------------

def test_a_write_copies_one_grain_once_however_many_points():
    v = Volume(16, 4096, grain_size=1024)
    for _ in range(50):
        take_points([v])
    chain = v._chain
    v.write(5000, b"a" * 100)       # one grain
    assert chain.pool_bytes == 1024
    v.write(5000, b"b" * 100)       # the newest point holds it already
    assert chain.pool_bytes == 1024
    assert [p.saved_grains for p in chain.points] == [0] * 49 + [1]


def test_space_is_the_changed_grains():
    v = Volume(64, 4096)
    points = []
    for k in range(5):
        points.append(take_points([v])[0])
        v.write(k * 8192, b"x" * 8192)          # two grains per interval
    assert [p.saved_grains for p in points] == [2] * 5
    assert all(p.space_bytes <= 2 * 4096 * 1.05 + 512 for p in points)


def test_expiring_a_middle_point_keeps_the_others():
    v = Volume(8, 512)
    images, points = [], []
    for k in range(4):
        points.append(take_points([v])[0])
        images.append(v.read(0, v.capacity).tobytes())
        v.write(k * 300, bytes([k + 1]) * 700)
    points[2].expire()
    points[1].expire()
    for k in (0, 3):
        assert points[k].image().tobytes() == images[k]
    with pytest.raises(StateError):
        points[1].read(0, 1)


def test_a_retained_point_cannot_expire_or_shorten():
    clock = Clock()
    v = Volume(2, 512)
    PointChain.of(v, clock=clock)
    p = take_points([v], retain_for=60)[0]
    with pytest.raises(ImmutablePointError, match="retained"):
        p.expire()
    with pytest.raises(ImmutablePointError, match="cannot be shortened"):
        p.retain(clock.now + 1)
    assert v._chain.expire_oldest() == 0 and v._chain.expire_due() == 0
    clock.now += 61
    p.expire()
    assert v._chain.points == []


def test_a_restore_pins_its_point_and_reads_through():
    v = Volume(4, 4096)
    v.write(0, b"a" * v.capacity)
    p = take_points([v])[0]
    v.write(0, b"b" * 5000)
    r = Volume(4, 4096)
    rs = p.restore(r, background_copy=False)
    with pytest.raises(ImmutablePointError, match="restored"):
        p.expire()
    assert r.read(0, r.capacity).tobytes() == b"a" * r.capacity
    assert rs.tracks_to_copy == 4
    rs.copy(1)
    assert rs.tracks_to_copy == 3
    rs.copy()
    assert not rs.active and r._restoring is None
    r.write(0, b"c")                   # a plain volume again
    p.expire()


def test_restore_refuses_a_busy_recovery_volume():
    v, t, other = Volume(2, 512), Volume(2, 512), Volume(2, 512)
    p = take_points([v])[0]
    FlashCopy(other, t, background_copy=False)
    with pytest.raises(LimitError):
        p.restore(t)
    with pytest.raises(StateError, match="quiesced"):
        p.restore_onto_source()


def test_a_target_holds_points_and_a_volume_with_points_becomes_a_target():
    # (the model of a target's points is tests/test_target_points.py)
    s, t = Volume(2, 512), Volume(2, 512)
    s.write(0, b"s" * s.capacity)
    FlashCopy(s, t, background_copy=False)
    assert take_points([t])[0].image().tobytes() == b"s" * s.capacity
    u = Volume(2, 512)
    u.write(0, b"u" * u.capacity)
    p = take_points([u])[0]
    FlashCopy(s, u, background_copy=False)
    assert u.read(0, u.capacity).tobytes() == b"s" * s.capacity
    assert p.image().tobytes() == b"u" * u.capacity


def test_reverse_restore_onto_a_source_keeps_its_points():
    s, t = Volume(4, 512), Volume(4, 512)
    s.write(0, b"s" * s.capacity)
    fc = FlashCopy(s, t, background_copy=False, record=True)
    t.write(0, b"t" * 700)
    p = take_points([s])[0]
    before = s.read(0, s.capacity).tobytes()
    fc.reverse_restore()
    assert s.read(0, 700).tobytes() == b"t" * 700
    assert p.image().tobytes() == before


def test_points_under_writers():
    """Writers run on two threads while points are taken (the image of each
    captured under the same hold of the lock), expired, and restored with
    the background copy; every point and recovery volume ends equal to its
    image."""
    v = Volume(64, 4096)
    stop = threading.Event()
    errors = []

    def writer(seed):
        rng = random.Random(seed)
        try:
            while not stop.is_set():
                off = rng.randrange(0, v.capacity - 6000)
                v.write(off, rng.randbytes(rng.randrange(1, 6000)))
        except BaseException as e:  # noqa: BLE001 - reported below
            errors.append(e)

    threads = [threading.Thread(target=writer, args=(s,)) for s in (1, 2)]
    for th in threads:
        th.start()
    kept, restores = [], []
    rng = random.Random(3)
    try:
        for k in range(60):
            with locked([v]):
                p = take_points([v])[0]
                image = v.read(0, v.capacity).tobytes()
            kept.append((p, image))
            if len(kept) > 20 and rng.random() < 0.5:
                q, _ = kept.pop(rng.randrange(len(kept) - 1))
                if not q.pins:
                    q.expire()
                else:
                    kept.append((q, _))
            if k % 15 == 7:
                p2, img2 = kept[rng.randrange(len(kept))]
                t = Volume(64, 4096)
                restores.append((p2.restore(t), t, img2))
    finally:
        stop.set()
        for th in threads:
            th.join()
    assert not errors
    for p, image in kept:
        assert p.image().tobytes() == image
    for rs, t, image in restores:
        assert rs.wait(30)
        assert t.read(0, t.capacity).tobytes() == image


def test_the_guides_ransomware_drill_runs(capsys):
    """docs/guide/recovery-points.md's drill runs as written and prints
    what its comments say."""
    from pathlib import Path
    page = (Path(__file__).resolve().parent.parent / "docs" / "guide"
            / "recovery-points.md").read_text()
    code = page.split("```python\n", 1)[1].split("```", 1)[0]
    exec(compile(code, "recovery-points.md", "exec"), {})
    assert capsys.readouterr().out.split("\n") == ["ImmutablePointError"] * 3 + ["hour 3", ""]
