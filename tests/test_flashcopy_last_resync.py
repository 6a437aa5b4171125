"""``FlashCopy.last_resync_changes``: the grains an incremental resync took
in, against a model (the grains written on the source or the target since
the previous image), in memory and in a unit (whose old bitmaps go back to
its pool and are reused); the images before and after differ only there."""

from __future__ import annotations

import numpy as np
import pytest

import fastfc
from fastfc import StorageUnit

TRACK = 65536


def volumes(where, tmp_path, n_tracks=32):
    if where == "memory":
        return None, fastfc.Volume(n_tracks, TRACK), fastfc.Volume(n_tracks, TRACK)
    unit = StorageUnit(tmp_path / "u")
    return unit, unit.create_volume("S", n_tracks, TRACK), unit.create_volume("T", n_tracks, TRACK)


@pytest.mark.parametrize("where", ["memory", "unit"])
def test_the_grains_a_resync_took_in(where, tmp_path):
    unit, S, T = volumes(where, tmp_path)
    try:
        rng = np.random.default_rng(5)
        fc = fastfc.FlashCopy(S, T, background_copy=False, record=True)
        assert fc.last_resync_changes is None
        gs, n = S.grain_size, S.n_grains
        kept = []
        for round_ in range(6):
            model = np.zeros(n, dtype=bool)
            for _ in range(int(rng.integers(0, 25))):
                vol = S if rng.random() < 0.7 else T
                off = int(rng.integers(0, S.capacity - 1))
                length = int(min(rng.integers(1, 3 * gs), S.capacity - off))
                vol.write(off, rng.integers(0, 256, length, dtype=np.uint8))
                model[off // gs:(off + length - 1) // gs + 1] = True
            before = T.read(0, T.capacity).copy()
            fc.resync()
            seq, grains = fc.last_resync_changes
            assert seq == fc.sequence == round_ + 1
            assert np.array_equal(grains.to_bools(), model)
            after = T.read(0, T.capacity)
            differs = (before != after).reshape(n, gs).any(axis=1)
            assert not (differs & ~model).any()      # only inside the grains listed
            kept.append((grains, model))
            # an earlier round's bitmap stays as it was, whatever the unit's
            # pool has done with the old bitmaps since
            for bm, m in kept:
                assert np.array_equal(bm.to_bools(), m)
        # a revertible resync (and its commit) leaves it as it was
        S.write(0, b"x")
        fc.resync(revertible=True)
        fc.commit()
        assert fc.last_resync_changes[0] == 6
    finally:
        if unit is not None:
            unit.close()


def test_a_new_relationship_knows_no_last_resync(tmp_path):
    S, T = fastfc.Volume(8, TRACK), fastfc.Volume(8, TRACK)
    fc = fastfc.FlashCopy(S, T, background_copy=False, record=True)
    fc.resync()
    assert fc.last_resync_changes is not None
    fc.withdraw(force=True)
    fc = fastfc.FlashCopy(S, T, background_copy=False, record=True)
    assert fc.last_resync_changes is None
