"""The engine's byte counters: ``Volume.host_bytes`` (what hosts wrote) and
``Volume.copied_bytes`` (what the engine copied in: copy-on-write from a
FlashCopy source, PPRC updates and drains, background copy, a virtual grain
fetched for a partial write). The benchmarks divide one by the other (bytes
copied into B and C per host byte), so they are checked here against a
plain model of which grains each operation must move."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fastfc import FlashCopy, GlobalMirror, LocalLink, PPRCPair, Volume
from fastfc.storage.volume import locked

TS = 65536
N = 8


def _ops():
    write = st.tuples(st.sampled_from(["A", "C"]), st.integers(0, N * TS - 1),
                      st.integers(1, 2 * TS))
    return st.lists(st.one_of(write, st.just(("drain",)), st.just(("resync",))),
                    max_size=25)


@pytest.mark.parametrize("grain", [4096, 512, TS])
@settings(max_examples=min(60, settings.default.max_examples), deadline=None)
@given(ops=_ops())
def test_the_counters_match_the_grains_each_step_must_move(grain, ops):
    """A -> B by Global Copy, B -> C by a NOCOPY FlashCopy with change
    recording: host writes to A and to C, drains, incremental resyncs. The
    model keeps A's out-of-sync grains and C's grains still virtual (a grain
    as large as the track: the engine moves whole tracks)."""
    a, b, c = (Volume(N, TS, name=x, grain_size=grain) for x in "ABC")
    pair = PPRCPair(a, b, LocalLink(), mode="gcp", initial_copy=False, background=False)
    fc = FlashCopy(b, c, background_copy=False, record=True)
    G = N * TS // grain
    oos: set[int] = set()
    virtual = set(range(G))          # C's grains to copy
    changed_b: set[int] = set()      # since the last resync (src_changed | tgt_changed)
    want = {"A": [0, 0], "B": [0, 0], "C": [0, 0]}   # host, copied
    for op in ops:
        if op[0] == "drain":
            pair.drain()
            for t in sorted(oos):
                want["B"][1] += grain
                if t in virtual:
                    want["C"][1] += grain
                    virtual.discard(t)
                changed_b.add(t)
            oos.clear()
        elif op[0] == "resync":
            fc.resync()
            virtual |= changed_b
            changed_b.clear()
        else:
            name, off, n = op
            n = min(n, N * TS - off)
            vol = a if name == "A" else c
            vol.write(off, np.full(n, 7, np.uint8))
            want[name][0] += n
            t0, t1 = off // grain, (off + n - 1) // grain + 1
            if name == "A":
                oos |= set(range(t0, t1))
            else:
                for t in range(t0, t1):
                    whole = off <= t * grain and off + n >= (t + 1) * grain
                    if t in virtual and not whole:
                        want["C"][1] += grain   # fetched from B first
                    virtual.discard(t)
                    changed_b.add(t)
        got = {v.name: [v.host_bytes, v.copied_bytes] for v in (a, b, c)}
        assert got == want, op


def test_a_background_copy_counts_every_track_it_copies():
    s, t = Volume(N, TS), Volume(N, TS)
    s.write(0, np.ones(100, np.uint8))
    fc = FlashCopy(s, t, background_copy=True)
    assert fc.wait(30)
    # the worker counts a chunk under both volumes' locks, just after its
    # bits cleared (which is what wait() sees): read the counters under them
    with locked((s, t)):
        assert (t.copied_bytes, t.host_bytes) == (N * TS, 0)
    assert (s.copied_bytes, s.host_bytes) == (0, 100)


@pytest.mark.parametrize("skew, per_byte", [(0, 2), (512, 4)])
def test_a_session_copies_the_grains_a_small_write_touches(skew, per_byte):
    """In memory, 64 KiB tracks, the 4 KiB grain: each CG's 4 KiB writes
    cost their grains into B (the drain) and into C (copy-on-write of B's
    old grains): 2 bytes copied per byte written when the writes are
    aligned to 4 KiB, 4 when each straddles two grains (with grains as
    large as the track it was 32)."""
    trips = [tuple(Volume(N, TS, name=f"{r}{i}") for r in "ABC") for i in range(3)]
    gm = GlobalMirror(trips, cg_interval=0.0, initial_copy=False)
    try:
        assert gm.form_consistency_group().committed
        for rnd in range(3):
            before = [(x.host_bytes, x.copied_bytes) for t in trips for x in t]
            for i, (va, _, _) in enumerate(trips):
                for k in range(2):
                    va.write(((rnd + 3 * k + i) % N) * TS + 4096 * k + skew,
                             np.full(4096, rnd, np.uint8))
            assert gm.form_consistency_group().committed
            after = [(x.host_bytes, x.copied_bytes) for t in trips for x in t]
            host = sum(x[0] - y[0] for x, y in zip(after[0::3], before[0::3]))
            to_b = sum(x[1] - y[1] for x, y in zip(after[1::3], before[1::3]))
            to_c = sum(x[1] - y[1] for x, y in zip(after[2::3], before[2::3]))
            assert host == 3 * 2 * 4096
            assert to_b == to_c == host * per_byte // 2
            assert (to_b + to_c) / host == per_byte
    finally:
        gm.close(discard=True)
