"""Recovery points of a FlashCopy target against a model of full images.

A Hypothesis state machine drives a source S and its target C (B and C of a
Global Mirror triplet): host writes to S and to C, plain and revertible
resyncs (then commit or revert), background copy a little at a time,
reverse restores, withdraws (forced too) and new establishes, takes of
points of C (alone, or with S at one instant), expiries, restores onto
recovery volumes and back onto C, all at random. The model keeps each
point's whole image, taken when the point is: a point of C must read C's
logical image at its take (its source's data where C still reads it there)
whatever the steps that changed C since, without a host write of C.
"""

from __future__ import annotations

import random

import pytest
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from fastfc import (FlashCopy, ImmutablePointError, IncompleteCopyError, InvalidImageError,
                    PointChain, Volume, WriteInhibitedError, take_points)
from fastfc.storage.volume import locked

geometry = st.one_of(
    st.tuples(st.integers(1, 12), st.sampled_from([512, 1024])),
    st.tuples(st.integers(60, 130), st.just(512)),
)
splits = st.sampled_from([1, 2, 8])


class Image(bytes):
    """A point's image in the model (shown short in a failing example)."""

    def __repr__(self) -> str:
        return f"<image of {len(self)} bytes #{hash(bytes(self)) & 0xffff:04x}>"


def span(data, capacity: int) -> tuple[int, int]:
    offset = data.draw(st.integers(0, capacity - 1), label="offset")
    length = data.draw(st.integers(1, capacity - offset), label="length")
    return offset, length


class TargetPointsModel(RuleBasedStateMachine):

    @initialize(g=geometry, split=splits, seed=st.integers(0, 2**32),
                point_first=st.booleans())
    def make(self, g, split, seed, point_first):
        n, ts = g
        self.geom = (n, ts, max(512, ts // split))
        rng = random.Random(seed)
        self.S = Volume(n, ts, grain_size=self.geom[2], name="S")
        self.C = Volume(n, ts, grain_size=self.geom[2], name="C")
        self.img = {}
        for v in (self.S, self.C):
            content = rng.randbytes(v.capacity)
            v.write(0, content)
            self.img[v.name] = bytearray(content)
        # live points: [point, volume name, image]
        self.points: list[list] = []
        self.restores: list[tuple] = []
        self.c_valid = True
        self.rv_image: bytes | None = None
        if point_first:
            # a target that holds points before its establish
            self.take_c_alone()
        self.fc: FlashCopy | None = None
        self.establish()

    # -- helpers -------------------------------------------------------------
    def take_c_alone(self):
        p = take_points([self.C])[0]
        self.points.append([p, "C", Image(self.img["C"])])

    def revertible(self) -> bool:
        return self.fc is not None and self.fc.revertible

    def pinned(self, entry) -> bool:
        return any(r.active and e is entry for r, e, _ in self.restores)

    # -- host writes -----------------------------------------------------------------
    @rule(data=st.data(), seed=st.integers(0, 2**32))
    def write_source(self, data, seed):
        self._host_write("S", self.S, data, seed)

    @precondition(lambda self: self.c_valid)
    @rule(data=st.data(), seed=st.integers(0, 2**32))
    def write_target(self, data, seed):
        self._host_write("C", self.C, data, seed)

    def _host_write(self, name, vol, data, seed):
        """A host write to ``vol`` (refused while a revertible one holds it)."""
        offset, length = span(data, vol.capacity)
        payload = random.Random(seed).randbytes(length)
        if self.revertible():
            with pytest.raises(WriteInhibitedError):
                vol.write(offset, payload)
            return
        vol.write(offset, payload)
        self.img[name][offset:offset + length] = payload

    # -- FlashCopy steps ----------------------------------------------------------------
    @precondition(lambda self: self.fc is None)
    @rule()
    def establish(self):
        self.fc = FlashCopy(self.S, self.C, background_copy=False, record=True)
        self.img["C"][:] = self.img["S"]
        self.c_valid = True

    @precondition(lambda self: self.fc is not None and not self.fc.revertible)
    @rule(revertible=st.booleans())
    def resync(self, revertible):
        before = bytes(self.img["C"])
        self.fc.resync(revertible=revertible)
        self.img["C"][:] = self.img["S"]
        self.rv_image = before if revertible else None

    @precondition(lambda self: self.fc is not None and self.fc.revertible)
    @rule(commit=st.booleans())
    def end_revertible(self, commit):
        if commit:
            self.fc.commit()
        else:
            self.fc.revert()
            self.img["C"][:] = self.rv_image
        self.rv_image = None

    @precondition(lambda self: self.fc is not None and not self.fc.revertible)
    @rule(k=st.sampled_from([0, 1, 3, None]))
    def background_copy(self, k):
        self.fc.copy(k)

    @precondition(lambda self: self.fc is not None and not self.fc.revertible)
    @rule()
    def reverse_restore(self):
        self.fc.reverse_restore()
        self.img["S"][:] = self.img["C"]

    @precondition(lambda self: self.fc is not None and not self.fc.revertible)
    @rule(force=st.booleans())
    def withdraw(self, force):
        left = self.fc.tracks_to_copy
        if left and not force:
            with pytest.raises(IncompleteCopyError):
                self.fc.withdraw()
            return
        self.fc.withdraw(force=force)
        self.fc = None
        self.c_valid = not left

    # -- points ---------------------------------------------------------------------------
    @precondition(lambda self: self.c_valid)
    @rule(with_source=st.booleans())
    def take(self, with_source):
        if not with_source:
            self.take_c_alone()
            return
        ps, pc = take_points([self.S, self.C])
        self.points.append([ps, "S", Image(self.img["S"])])
        self.points.append([pc, "C", Image(self.img["C"])])

    @precondition(lambda self: self.points)
    @rule(data=st.data())
    def expire(self, data):
        entry = data.draw(st.sampled_from(self.points))
        if self.pinned(entry):
            with pytest.raises(ImmutablePointError):
                entry[0].expire()
            return
        entry[0].expire()
        self.points.remove(entry)

    @rule(count=st.integers(1, 3))
    def expire_oldest(self, count):
        chain = PointChain.chain_of(self.C)
        mine = [e for e in self.points if e[1] == "C"]
        expect = 0
        for e in mine:
            if expect == count or self.pinned(e):
                break
            expect += 1
        assert (chain.expire_oldest(count) if chain is not None else 0) == expect
        for e in mine[:expect]:
            self.points.remove(e)

    @precondition(lambda self: any(e[1] == "C" for e in self.points))
    @rule(data=st.data())
    def restore(self, data):
        entry = data.draw(st.sampled_from([e for e in self.points if e[1] == "C"]))
        n, ts, g = self.geom
        target = Volume(n, ts, grain_size=g, name="recovery")
        r = entry[0].restore(target, background_copy=False)
        self.restores.append((r, entry, target))
        assert target.read(0, target.capacity).tobytes() == entry[2]

    @precondition(lambda self: any(r.active for r, _, _ in self.restores))
    @rule(data=st.data(), k=st.sampled_from([0, 1, None]))
    def restore_copy(self, data, k):
        r = data.draw(st.sampled_from([x for x in self.restores if x[0].active]))[0]
        r.copy(k)
        if not r.active:
            self.restores = [x for x in self.restores if x[0] is not r]

    @precondition(lambda self: self.c_valid and not (self.fc is not None and self.fc.revertible)
                  and any(e[1] == "C" for e in self.points))
    @rule(data=st.data())
    def restore_onto_target(self, data):
        entry = data.draw(st.sampled_from([e for e in self.points if e[1] == "C"]))
        entry[0].restore_onto_source(quiesced=True)
        self.img["C"][:] = entry[2]

    # -- invariants ------------------------------------------------------------------------
    @invariant()
    def images_match(self):
        if not hasattr(self, "S"):
            return
        assert self.S.read(0, self.S.capacity).tobytes() == bytes(self.img["S"])
        if self.c_valid:
            assert self.C.read(0, self.C.capacity).tobytes() == bytes(self.img["C"])
        else:
            with pytest.raises(InvalidImageError):
                self.C.read(0, 1)
        for p, _, img in self.points:
            assert p.image().tobytes() == img, p
        for r, entry, target in self.restores:
            assert target.read(0, target.capacity).tobytes() == entry[2]
        for v in (self.S, self.C):
            chain = PointChain.chain_of(v)
            mine = [e[0] for e in self.points if e[1] == v.name]
            assert (chain.points if chain is not None else []) == mine
            if chain is not None:
                with locked([self.S, self.C]):
                    assert chain._check_links()


TestTargetPointsModel = TargetPointsModel.TestCase
TestTargetPointsModel.settings = settings(
    settings.default, max_examples=min(150, settings.default.max_examples))


# ---------------------------------------------------------------------------
# Plain cases
# ---------------------------------------------------------------------------

def test_a_resync_saves_only_the_grains_it_redirects():
    s, c = Volume(8, 512), Volume(8, 512)
    s.write(0, b"a" * s.capacity)
    fc = FlashCopy(s, c, background_copy=False, record=True)
    p = take_points([c])[0]
    s.write(0, b"b" * 512)            # one grain changes on the source
    assert p.saved_grains == 0        # (copy-on-write moved it onto C, unchanged image)
    fc.resync()
    assert p.saved_grains == 1        # C's image there changes: the point takes it
    fc.resync()
    assert p.saved_grains == 1        # nothing changed since: nothing saved
    assert p.image().tobytes() == b"a" * s.capacity


def test_a_revertible_resync_and_its_revert_keep_every_image():
    s, c = Volume(4, 512), Volume(4, 512)
    s.write(0, b"a" * s.capacity)
    fc = FlashCopy(s, c, background_copy=False, record=True)
    before = take_points([c])[0]
    s.write(100, b"b" * 900)
    fc.resync(revertible=True)
    during = take_points([c])[0]
    new = c.read(0, c.capacity).tobytes()
    fc.revert()
    assert c.read(0, c.capacity).tobytes() == b"a" * c.capacity
    assert before.image().tobytes() == b"a" * c.capacity
    assert during.image().tobytes() == new


def test_a_forced_withdraw_keeps_the_targets_points():
    s, c = Volume(4, 512), Volume(4, 512)
    s.write(0, b"a" * s.capacity)
    fc = FlashCopy(s, c, background_copy=False, record=True)
    p = take_points([c])[0]
    fc.withdraw(force=True)
    assert not c.valid
    assert p.image().tobytes() == b"a" * c.capacity


def test_no_point_of_a_volume_with_a_cascade_above_it():
    """A point of a target reads the grains the target has not copied one
    level up only, so points of a volume with a cascade above it are
    refused, and so is a cascade that would form above a volume holding
    points, each with nothing changed; one level (a target whose source is
    no target) is allowed."""
    from fastfc import LimitError

    def vol(name, fill=0):
        v = Volume(8, 4096, name=name)
        v.write(0, bytes([fill]) * v.capacity)
        return v

    # S -> T1 -> T2: no point of T2
    S, T1, T2 = vol("S", 1), vol("T1"), vol("T2")
    FlashCopy(S, T1, background_copy=False)
    FlashCopy(T1, T2, background_copy=False)
    for group in ([T2], [S, T2]):
        with pytest.raises(LimitError, match="cascade above it"):
            take_points(group)
    assert S._chain is None or not S._chain.points
    # T1 holds points (its source S is no target): S may not become a target
    S, T1 = vol("S", 2), vol("T1")
    FlashCopy(S, T1, background_copy=False)
    p = take_points([T1])[0]
    with pytest.raises(LimitError, match=r"cascade above <.*T1"):
        FlashCopy(vol("X"), S, background_copy=False)
    assert S._tgt_rel is None
    # V holds points: a target may not become its source; a plain volume may
    V, Y, Z = vol("V", 3), vol("Y"), vol("Z", 4)
    FlashCopy(Z, Y, background_copy=False)
    q = take_points([V])[0]
    with pytest.raises(LimitError, match=r"cascade above <.*V"):
        FlashCopy(Y, V, background_copy=False)
    assert V._tgt_rel is None
    FlashCopy(vol("W", 5), V, background_copy=False)
    assert p.read(0, 4096).tobytes() == bytes([2]) * 4096
    assert q.read(0, 4096).tobytes() == bytes([3]) * 4096
