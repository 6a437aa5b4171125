"""Differential test: the engine against the bitmap-free reference model.

A Hypothesis state machine drives a few small volumes and the FlashCopy
relationships among them through random host I/O (unaligned, crossing grain
and track boundaries, zero length, out of range), with grains from the whole
track down to 1/128 of it, and every FlashCopy operation, all in
NOCOPY-driven mode (``background_copy=False``: only ``copy()`` and
copy-on-write move tracks, so every run is deterministic). Every read is
compared with the model, every error must be raised by both or by neither,
every refused call must leave the engine's volumes and bitmaps exactly as
they were, and after each step every volume's whole logical image must
equal the model's.
"""

from __future__ import annotations

import random

import numpy as np
import pytest
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import (RuleBasedStateMachine, initialize, invariant,
                                 precondition, rule)

import reference as ref
from fastfc import FlashCopy, Volume, establish_group, faults

N_VOLUMES = 6          # five share a geometry; the last has its own

# small tracks, a few of them; now and then bitmaps of several words, or a
# few 64 KiB tracks (the I/O path releases the GIL for copies of 64 KiB+)
geometry = st.one_of(
    st.tuples(st.integers(1, 20), st.sampled_from([512, 1024])),
    st.tuples(st.integers(60, 140), st.just(512)),
    st.tuples(st.integers(1, 2), st.just(65536)),
    st.tuples(st.integers(1, 8), st.just(4096)),
)
# grains per track (the engine's bitmaps have a bit per grain; the model has
# none): 1 is a grain as large as the track; the grain is never below 512 B
splits = st.sampled_from([1, 2, 8, 16, 128])


def span(data, capacity: int, track_size: int, allow_bad: bool = True) -> tuple[int, int]:
    """An (offset, length) pair: anywhere, near a track boundary, whole
    volume, empty, or (sometimes) reaching past the end."""
    edges = [t * track_size + d for t in range(capacity // track_size + 1)
             for d in (-1, 0, 1)]
    edges = [e for e in edges if 0 <= e <= capacity]
    offset = data.draw(st.one_of(st.integers(0, capacity), st.sampled_from(edges)),
                       label="offset")
    room = capacity - offset
    lengths = sorted({n for n in (0, 1, track_size - 1, track_size, track_size + 1, room)
                      if n <= room})
    length = data.draw(st.one_of(
        st.integers(0, room),
        st.sampled_from(lengths),
        *([st.integers(room + 1, room + track_size)] if allow_bad else []),
    ), label="length")
    return offset, length


def words(bm):
    return None if bm is None else bm.words.tobytes()


class FlashCopyModel(RuleBasedStateMachine):

    @initialize(g1=geometry, g2=geometry, split=splits, seed=st.integers(0, 2**32))
    def make_volumes(self, g1, g2, split, seed):
        faults.clear()
        shapes = [g1] * 5 + [g2]
        self.vols = [Volume(n, ts, name=f"v{i}", grain_size=max(512, ts // split))
                     for i, (n, ts) in enumerate(shapes)]
        self.refs = [ref.RefVolume(n, ts, name=f"v{i}") for i, (n, ts) in enumerate(shapes)]
        self.rels: list[tuple[FlashCopy, ref.RefFlashCopy]] = []
        # distinct random contents: a track taken from the wrong volume, or
        # left stale, cannot pass for the right one
        rng = random.Random(seed)
        for v, m in zip(self.vols, self.refs):
            content = rng.randbytes(v.capacity)
            v._raw_array()[:] = np.frombuffer(content, dtype=np.uint8)
            m.image[:] = content

    # -- helpers -----------------------------------------------------------------
    def snapshot(self):
        """Everything a refused call must not change."""
        vols = tuple((v.array.tobytes(), v._inhibits, v._invalid, id(v._tgt_rel),
                      tuple(id(r) for r in v._src_rels)) for v in self.vols)
        rels = []
        for r, _ in self.rels:
            image = r._revert_image
            rels.append((r.active, r.revertible, r.sequence, words(r.to_copy),
                         words(r.src_changed), words(r.tgt_changed),
                         None if image is None else
                         (words(image[0]), words(image[1]), words(image[2]), image[3])))
        return vols, tuple(rels)

    def both(self, engine_call, model_call):
        """Run one operation on both; same error or none; a refusal changes
        nothing in the engine. Returns the engine's result."""
        before = self.snapshot()
        result = e_exc = m_exc = None
        try:
            result = engine_call()
        except Exception as e:  # noqa: BLE001 - compared with the model below
            e_exc = e
        try:
            model_call()
        except Exception as e:  # noqa: BLE001
            m_exc = e
        assert type(e_exc) is type(m_exc), f"engine raised {e_exc!r}, model raised {m_exc!r}"
        if e_exc is not None:
            assert self.snapshot() == before, f"refused call ({e_exc!r}) changed state"
        self.settle()      # (a cascade's change of a middle volume touches its targets)
        return result, e_exc

    def settle(self):
        """Where the model cannot know copy progress, take the engine's word
        (the image checks then verify it)."""
        for r, m in self.rels:
            if m.active and m.remaining == ref.UNKNOWN:
                m.remaining = ref.NONE if r.tracks_to_copy == 0 else ref.SOME

    def pick_rel(self, data):
        """Mostly a live relationship; sometimes any (withdrawn ones refuse)."""
        live = [i for i, (_, m) in enumerate(self.rels) if m.active]
        choices = st.integers(0, len(self.rels) - 1)
        if live:
            choices = st.one_of(st.sampled_from(live), choices)
        return self.rels[data.draw(choices, label="relationship")]

    # -- host I/O ---------------------------------------------------------------
    def do_write(self, data, i, seed):
        v, m = self.vols[i], self.refs[i]
        offset, length = span(data, v.capacity, v.track_size)
        payload = random.Random(seed).randbytes(length)
        how = data.draw(st.sampled_from(["bytes", "array", "batch"]), label="how")
        if how == "bytes":
            call = lambda: v.write(offset, payload)  # noqa: E731
        elif how == "array":
            call = lambda: v.write(offset, np.frombuffer(payload, dtype=np.uint8))  # noqa: E731
        else:
            rows = np.frombuffer(payload, dtype=np.uint8).reshape(1, -1)
            call = lambda: v.write_batch([offset], rows)  # noqa: E731
        self.both(call, lambda: m.write(offset, payload))
        self.settle()

    @rule(data=st.data(), i=st.integers(0, N_VOLUMES - 1), seed=st.integers(0, 2**32))
    def write(self, data, i, seed):
        self.do_write(data, i, seed)

    def busy(self):
        """Volumes in an active relationship (where writes are interesting)."""
        return [i for i, m in enumerate(self.refs) if m.relationships()]

    @precondition(lambda self: self.busy())
    @rule(data=st.data(), seed=st.integers(0, 2**32))
    def write_busy_volume(self, data, seed):
        self.do_write(data, data.draw(st.sampled_from(self.busy()), label="volume"), seed)

    @rule(data=st.data(), i=st.integers(0, N_VOLUMES - 1))
    def read(self, data, i):
        v, m = self.vols[i], self.refs[i]
        offset, length = span(data, v.capacity, v.track_size)
        got, exc = self.both(lambda: v.read(offset, length), lambda: m.read(offset, length))
        if exc is None:
            assert got.tobytes() == m.read(offset, length)

    @rule(data=st.data(), i=st.integers(0, N_VOLUMES - 1))
    def read_batch(self, data, i):
        v, m = self.vols[i], self.refs[i]
        a = span(data, v.capacity, v.track_size, allow_bad=False)
        b_off = data.draw(st.integers(0, v.capacity - a[1]), label="second offset")
        got, exc = self.both(lambda: v.read_batch([a[0], b_off], a[1]),
                             lambda: (m.read(a[0], a[1]), m.read(b_off, a[1])))
        if exc is None:
            assert got[0].tobytes() == m.read(a[0], a[1])
            assert got[1].tobytes() == m.read(b_off, a[1])

    # -- establish ----------------------------------------------------------------
    options = st.fixed_dictionaries({
        "record": st.booleans(),
        "persistent": st.booleans(),
        "inhibit_target_write": st.booleans(),
        "sequence": st.integers(0, 5),
    })

    @rule(s=st.integers(0, N_VOLUMES - 1), t=st.integers(0, N_VOLUMES - 1), opts=options)
    def establish(self, s, t, opts):
        self.do_establish(s, t, opts)

    def do_establish(self, s, t, opts):
        if not self.refs[s].valid:
            return  # copying an invalid image: its content is undefined
        made = []
        rel, exc = self.both(
            lambda: FlashCopy(self.vols[s], self.vols[t], background_copy=False, **opts),
            lambda: made.append(ref.establish(self.refs[s], self.refs[t],
                                              background_copy=False, **opts)))
        if exc is None:
            self.rels.append((rel, made[0]))

    @rule(data=st.data(), opts=options)
    def establish_likely(self, data, opts):
        """Establish where the rules allow it (most of the time): a valid
        source that is not a target, onto a free volume of its geometry."""
        sources = [i for i, m in enumerate(self.refs) if m.valid and m.source_rel is None]
        if not sources:
            return
        s = data.draw(st.sampled_from(sources), label="source")
        shape = (self.refs[s].n_tracks, self.refs[s].track_size)
        free = [i for i, m in enumerate(self.refs) if i != s and not m.relationships()
                and (m.n_tracks, m.track_size) == shape]
        if free:
            self.do_establish(s, data.draw(st.sampled_from(free), label="target"), opts)

    @rule(pairs=st.lists(st.tuples(st.integers(0, N_VOLUMES - 1),
                                   st.integers(0, N_VOLUMES - 1)), min_size=1, max_size=3),
          opts=options)
    def establish_group(self, pairs, opts):
        if not all(self.refs[s].valid for s, _ in pairs):
            return
        made = []
        rels, exc = self.both(
            lambda: establish_group([(self.vols[s], self.vols[t]) for s, t in pairs],
                                    background_copy=False, **opts),
            lambda: made.extend(ref.establish_group(
                [(self.refs[s], self.refs[t]) for s, t in pairs],
                background_copy=False, **opts)))
        if exc is None:
            assert len(rels) == len(made) == len(pairs)
            self.rels.extend(zip(rels, made))

    # -- relationship operations --------------------------------------------------
    @precondition(lambda self: self.rels)
    @rule(data=st.data(), k=st.sampled_from([None, 0, 1, 2, 3, 7]))
    def copy(self, data, k):
        r, m = self.pick_rel(data)
        known_done = m.active and m.remaining == ref.NONE
        copied, exc = self.both(lambda: r.copy(k), lambda: m.copy(k))
        if exc is not None:
            return
        assert copied >= 0 and (k is None or copied <= k)
        if known_done:
            assert copied == 0
        if not r.active:
            # the engine ended a non-persistent relationship: only when done
            assert not m.persistent and m.remaining != ref.SOME
            m.remaining = ref.NONE
        self.settle()
        m.end_if_copied()
        assert r.active == m.active

    @precondition(lambda self: self.rels)
    @rule(data=st.data(), revertible=st.booleans(),
          sequence=st.one_of(st.none(), st.integers(0, 100)))
    def resync(self, data, revertible, sequence):
        r, m = self.pick_rel(data)
        self.both(lambda: r.resync(revertible=revertible, sequence=sequence),
                  lambda: m.resync(revertible=revertible, sequence=sequence))
        self.settle()

    @precondition(lambda self: self.rels)
    @rule(data=st.data())
    def commit(self, data):
        r, m = self.pick_rel(data)
        self.both(r.commit, m.commit)

    @precondition(lambda self: self.rels)
    @rule(data=st.data())
    def revert(self, data):
        r, m = self.pick_rel(data)
        self.both(r.revert, m.revert)

    @precondition(lambda self: self.rels)
    @rule(data=st.data())
    def reverse_restore(self, data):
        r, m = self.pick_rel(data)
        self.both(r.reverse_restore, m.reverse_restore)
        self.settle()

    @precondition(lambda self: self.rels)
    @rule(data=st.data(), force=st.booleans())
    def withdraw(self, data, force):
        r, m = self.pick_rel(data)
        self.both(lambda: r.withdraw(force=force), lambda: m.withdraw(force=force))

    @precondition(lambda self: self.rels)
    @rule(data=st.data(), point=st.sampled_from(["prepare", "commit", "revert"]),
          where=st.sampled_from(["source", "any", "elsewhere"]))
    def injected_fault(self, data, point, where):
        """A fault armed for the source (or any volume) fails the operation
        and changes nothing; one armed for another volume does not fire."""
        r, m = self.pick_rel(data)
        volume = {"source": r.source, "any": None,
                  "elsewhere": self.vols[0] if r.source is not self.vols[0] else self.vols[1]}[where]
        faults.inject(point, volume=volume)
        fires = where != "elsewhere"
        try:
            if point == "prepare":
                self.both(lambda: r.resync(revertible=True),
                          lambda: m.resync(revertible=True, fault=fires))
            elif point == "commit":
                self.both(r.commit, lambda: m.commit(fault=fires))
            else:
                self.both(r.revert, lambda: m.revert(fault=fires))
        finally:
            faults.clear()
        self.settle()

    # -- invariants -----------------------------------------------------------------
    @invariant()
    def images_match(self):
        if not hasattr(self, "vols"):
            return
        for v, m in zip(self.vols, self.refs):
            assert v.valid == m.valid, v
            assert v.write_inhibited == m.write_inhibited, v
            if m.valid:
                assert v.read(0, v.capacity).tobytes() == bytes(m.image), v
            else:
                with pytest.raises(ref.InvalidImageError):
                    v.read(0, v.capacity)

    @invariant()
    def relationships_match(self):
        if not hasattr(self, "vols"):
            return
        index = {id(r): m for r, m in self.rels}
        for v, m in zip(self.vols, self.refs):
            assert sorted(id(index[id(r)]) for r in v.relationships) == \
                sorted(id(x) for x in m.relationships())
        for r, m in self.rels:
            assert r.active == m.active
            assert r.revertible == m.revertible
            assert r.sequence == m.sequence
            assert r.state.value == m.state, (r, m.state)
            if m.active:
                assert (r.tracks_to_copy == 0) == (m.remaining == ref.NONE)
            else:
                assert r.tracks_to_copy == 0


TestFlashCopyModel = FlashCopyModel.TestCase
# 300 runs of 100 steps under the ``ci`` profile, not its 600: the machine
# saturates well before (300 runs reach every line-to-line arc of the
# machine, of the reference model and of fastfc/copyservices and
# fastfc/storage, and every (rule, error raised) outcome, that 600 runs reach)
TestFlashCopyModel.settings = settings(
    settings.default, max_examples=min(300, settings.default.max_examples))
