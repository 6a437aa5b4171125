"""Global Mirror against a bitmap-free model, on the production path.

A Hypothesis state machine drives a session of a few small triplets through
host writes to the A volumes, consistency groups with a fault armed (a
prepare, a commit, a revert, a coordination, a drain or a link failure),
host writes that land *during* a drain (a fault point's ``action``, so the
collision path runs deterministically), link failures between CGs, and the
operator's ``clear_fatal`` and ``resume``.

The session has no ``on_coordinate`` callback: coordination is the kernel's
one call, as in production. The model needs none either: nothing writes
between the call and its coordination, so the images a CG must carry are the
A images when ``form_consistency_group`` is called. After every step every C
volume must read exactly the images of the newest committed CG, all C carry
one sequence number, and every coordination that happened was the kernel's.
"""

from __future__ import annotations

import numpy as np
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, rule

from fastfc import GlobalMirror, Volume, _core, faults
from fastfc.copyservices.globalmirror import Cause, GMState

# (track, grain): a grain as large as the track, or 4 to 8 grains per track
# (the engine's bitmaps, drains and copy-on-write work per grain)
GEOMETRIES = [(512, 512), (2048, 512), (4096, 512)]

FAULTS = ("none", "prepare", "commit", "revert", "coordinate", "drain", "link",
          "write_in_drain")


class GlobalMirrorMachine(RuleBasedStateMachine):

    @initialize(n=st.integers(1, 4), n_tracks=st.integers(1, 12),
                geometry=st.sampled_from(GEOMETRIES),
                decide=st.sampled_from(["after_all", "after_each"]))
    def setup(self, n, n_tracks, geometry, decide):
        faults.clear()
        ts, grain = geometry
        self.n, self.cap = n, n_tracks * ts
        self.A, self.B, self.C = ([Volume(n_tracks, ts, name=f"{r}{i}", grain_size=grain)
                                   for i in range(n)] for r in "ABC")
        self.gm = GlobalMirror(list(zip(self.A, self.B, self.C)), decide=decide)
        assert self.gm.on_coordinate is None
        self.images = [np.zeros(self.cap, np.uint8) for _ in range(n)]   # the A's
        self.cg_images = [img.copy() for img in self.images]             # the C's
        self.sequence = 0
        self.rng = np.random.default_rng(n * 100 + n_tracks)

    def teardown(self):
        faults.clear()

    # -- host I/O --------------------------------------------------------------
    def _write(self, i, offset, length, seed):
        data = np.random.default_rng(seed).integers(0, 256, length, dtype=np.uint8)
        self.A[i].write(offset, data)
        self.images[i][offset:offset + length] = data

    @rule(data=st.data())
    def host_write(self, data):
        i = data.draw(st.integers(0, self.n - 1), label="volume")
        offset = data.draw(st.integers(0, self.cap), label="offset")
        length = data.draw(st.integers(0, self.cap - offset), label="length")
        self._write(i, offset, length, data.draw(st.integers(0, 2**32 - 1)))

    # -- consistency groups ----------------------------------------------------
    @rule(kind=st.sampled_from(FAULTS), pick=st.integers(0, 3), other=st.integers(0, 3),
          data=st.data())
    def form_cg(self, kind, pick, other, data):
        pick, other = pick % self.n, other % self.n
        late = []
        if kind == "prepare":
            faults.inject("prepare", self.B[pick])
        elif kind == "commit":
            faults.inject("commit", self.B[pick])
        elif kind == "revert":
            faults.inject("prepare", self.B[other])
            faults.inject("revert", self.B[pick])
        elif kind == "coordinate":
            faults.inject("coordinate")
        elif kind == "drain":
            faults.inject("drain", self.A[pick])
        elif kind == "link":
            faults.inject("link")
        elif kind == "write_in_drain":
            # a host write while the CG is being drained: not in this CG
            offset = data.draw(st.integers(0, self.cap), label="late offset")
            length = data.draw(st.integers(0, self.cap - offset), label="late length")
            seed = data.draw(st.integers(0, 2**32 - 1), label="late seed")
            late.append((other, offset, length, seed))
            # (at the first triplet's drain: every CG track is still owed)
            faults.inject("drain", self.A[0],
                          action=lambda: self._write(other, offset, length, seed))
        healthy = self.gm.link.up and all(t.pair.suspend_reason is None
                                          for t in self.gm.triplets)
        snapshot = [img.copy() for img in self.images]     # the coordination instant
        kernel = _core.coordinations()
        res = self.gm.form_consistency_group()
        faults.clear()
        if res.cause is Cause.FATAL:
            assert kernel == _core.coordinations()
            return
        coordinated = res.cause is not Cause.COORDINATION_TIMEOUT
        assert _core.coordinations() - kernel == int(coordinated)
        if kind == "none" and healthy:
            assert res.committed, res
        if kind in ("prepare", "revert", "coordinate", "drain"):   # (a link fault
            # fires only if the CG has tracks to send)
            assert not res.committed, res
        if kind == "write_in_drain" and res.committed:
            # the late write reached B after the CG version, and C kept the CG
            assert faults.fired_log()[-1][0] == "drain"
        if res.committed:
            self.cg_images = snapshot
            self.sequence = res.sequence

    # -- operator --------------------------------------------------------------
    @rule()
    def operator_clears_fatal(self):
        if self.gm.state is GMState.FATAL:
            self.gm.clear_fatal()
            assert self.gm.state is not GMState.FATAL

    @rule()
    def link_fails(self):
        self.gm.link.fail()

    @rule()
    def link_restored(self):
        self.gm.link.restore()

    @rule()
    def operator_resumes_pairs(self):
        for t in self.gm.triplets:
            if t.pair.suspend_reason is not None:
                t.pair.resume()

    # -- the promise -----------------------------------------------------------
    @invariant()
    def c_volumes_hold_one_committed_cg(self):
        if not hasattr(self, "gm"):
            return
        seqs = set(self.gm.c_sequences)
        assert len(seqs) == 1, self.gm.c_sequences
        assert self.gm.stats.sequence == self.sequence
        for c, img in zip(self.C, self.cg_images):
            assert np.array_equal(c.read(0, self.cap), img), c.name

    @invariant()
    def host_images_are_the_model(self):
        if not hasattr(self, "gm"):
            return
        for a, img in zip(self.A, self.images):
            assert np.array_equal(a.read(0, self.cap), img), a.name


TestGlobalMirrorModel = GlobalMirrorMachine.TestCase
# 300 runs of 100 steps under the ``ci`` profile, not its 600: the machine
# saturates well before (300 runs reach every line-to-line arc of the
# machine and of fastfc/copyservices, and every (cause, committed, triplets,
# state) outcome of a CG, that 600 runs reach)
TestGlobalMirrorModel.settings = settings(
    settings.default, max_examples=min(300, settings.default.max_examples))
