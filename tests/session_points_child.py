"""Kill-test child for a Global Mirror session's scheduled recovery points
in a storage unit: two triplets (A, B, C all in one unit) under host writes
to the A volumes, CGs formed one after another, a point of every C taken
after each CG (5 kept), until the parent kills it (SIGKILL at a random
moment). A reopened unit restores the session with its schedule; the
child then carries on with it.

Layout of ``--root``::

    unit/               the storage unit
    images/SEQ_I.npy    A_I's image at CG SEQ's coordination (the writes are
                        held then): written (fsync, atomic rename) before the
                        CG can commit, so before any point of it exists

Run by tests/test_points_crash.py.
"""

from __future__ import annotations

import argparse
import sys
import threading
from pathlib import Path

import numpy as np

from fastfc import GlobalMirror, PointSchedule, StorageUnit
from points_child import _atomic

N_TRACKS = 8
TRACK = 16384
GRAIN = 4096
SESSION = "s"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--root", required=True)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    root = Path(args.root)
    (root / "images").mkdir(parents=True, exist_ok=True)
    unit = StorageUnit(root / "unit")
    names = [(f"a{i}", f"b{i}", f"c{i}") for i in range(2)]
    for trip in names:
        for n in trip:
            if n not in unit:
                unit.create_volume(n, N_TRACKS, TRACK, grain_size=GRAIN)
    A = [unit.volume(a) for a, _, _ in names]
    if SESSION in unit.sessions:
        gm = unit.session(SESSION)
    else:
        gm = GlobalMirror([tuple(unit.volume(n) for n in trip) for trip in names],
                          name=SESSION, points=PointSchedule(every_cgs=1, keep=5))

    def coordinated(seq: int) -> None:
        for i, a in enumerate(A):
            _atomic(root / "images" / f"{seq}_{i}.npy",
                    lambda f, d=a._raw_array().copy(): np.save(f, d))

    gm.on_coordinate = coordinated

    def writer(seed: int) -> None:
        wr = np.random.default_rng(seed)
        cap = N_TRACKS * TRACK
        while True:
            a = A[int(wr.integers(len(A)))]
            off = int(wr.integers(0, cap // 512)) * 512
            n = min(int(wr.integers(1, 8)) * 512, cap - off)
            a.write(off, wr.integers(0, 256, n, dtype=np.uint8))

    for i in range(2):
        threading.Thread(target=writer, args=(args.seed * 10 + i,), daemon=True).start()
    print("READY", flush=True)
    while True:
        gm.form_consistency_group()
        if gm.state.value == "fatal":
            gm.clear_fatal()


if __name__ == "__main__":
    sys.exit(main())
