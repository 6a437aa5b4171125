"""The pure-NumPy engine (the benchmarks' baseline) gives fastfc's answers.

A baseline that cut corners would flatter fastfc, so the same random
operations run on both engines and every read is compared. Not a timing:
``pytest benches`` runs it (``--benchmark-only`` skips it)."""

from __future__ import annotations

import numpy as np
import pytest

from benches.engine_numpy import NpFlashCopy, NpGlobalMirror, NpVolume
from fastfc import FlashCopy, GlobalMirror, Volume


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("track", [512, 4096])
def test_flashcopy_matches_fastfc(seed: int, track: int) -> None:
    rng = np.random.default_rng(seed)
    n = 64
    S, T = Volume(n, track), Volume(n, track)
    nS, nT = NpVolume(n, track), NpVolume(n, track)
    init = rng.integers(0, 256, n * track, np.uint8)
    S._raw_array()[:] = init
    nS.array[:] = init
    fc = FlashCopy(S, T, background_copy=False, record=True)
    nfc = NpFlashCopy(nS, nT, record=True)
    cap = n * track
    for step in range(200):
        op = int(rng.integers(0, 6))
        if fc.revertible:                           # both volumes refuse writes now
            if op < 3:
                fc.commit()
                nfc.commit()
            else:
                fc.revert()
                nfc.revert()
        elif op <= 2:                               # write the source or the target
            v, nv = (S, nS) if op < 2 else (T, nT)
            off = int(rng.integers(0, cap - 1))
            k = int(rng.integers(1, min(3 * track, cap - off) + 1))
            data = rng.integers(0, 256, k, np.uint8)
            v.write(off, data)
            nv.write(off, data)
        elif op == 3:
            assert fc.copy() == nfc.copy()
        else:
            revertible = op == 5
            fc.resync(revertible=revertible)
            nfc.resync(revertible=revertible)
        assert fc.tracks_to_copy == nfc.tracks_to_copy, step
        assert np.array_equal(T.read(0, cap), nT.read(0, cap)), step
        assert np.array_equal(S.read(0, cap), nS.read(0, cap)), step


def test_global_mirror_matches_fastfc() -> None:
    rng = np.random.default_rng(1)
    n, track = 32, 4096
    trips = [tuple(Volume(n, track) for _ in range(3)) for _ in range(3)]
    ntrips = [tuple(NpVolume(n, track) for _ in range(3)) for _ in range(3)]
    gm = GlobalMirror(trips, initial_copy=False)
    ngm = NpGlobalMirror(ntrips)
    for _ in range(20):
        for (a, _, _), (na, _, _) in zip(trips, ntrips):
            for _ in range(int(rng.integers(0, 6))):
                off = int(rng.integers(0, n * track - 5000))
                data = rng.integers(0, 256, int(rng.integers(1, 5000)), np.uint8)
                a.write(off, data)
                na.write(off, data)
        assert gm.form_consistency_group().committed
        ngm.form_cg()
        for (a, b, c), (na, nb, nc) in zip(trips, ntrips):
            assert np.array_equal(b.read(0, n * track), nb.read(0, n * track))
            assert np.array_equal(c.read(0, n * track), nc.read(0, n * track))
            assert np.array_equal(a.read(0, n * track), b.read(0, n * track))
    gm.close()
    ngm.close()
