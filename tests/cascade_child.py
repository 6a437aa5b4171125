"""Kill-test child for cascaded FlashCopy in a storage unit: the chain
S -> T1 -> T2 -> T3 under host writes to S and T1, resyncs (plain and
revertible, committed or reverted), background-copy steps on every level,
and the top relationship withdrawn with grains left (T1 invalid) and
established again, until the parent kills it (SIGKILL at a random moment).
T2 and T3 are never written and their relationships never resynced: their
images must stay the one T1 had when the parent built the chain.

Run by tests/test_cascade.py (``--root``: the directory holding ``unit/``).
"""

from __future__ import annotations

import argparse
import random
import sys
from pathlib import Path

import numpy as np

from fastfc import FlashCopy, StorageUnit

N_TRACKS = 64
TRACK = 4096
GRAIN = 1024


def build(root: Path, seed: int) -> bytes:
    """The unit and its chain; returns T2's (and T3's) image."""
    rng = np.random.default_rng(seed)
    with StorageUnit(root / "unit") as unit:
        s, t1, t2, t3 = (unit.create_volume(n, N_TRACKS, track_size=TRACK, grain_size=GRAIN,
                                            thin=(n == "t3"))
                         for n in ("s", "t1", "t2", "t3"))
        s.write(0, rng.integers(0, 256, s.capacity, dtype=np.uint8))
        FlashCopy(s, t1, background_copy=False, record=True)
        s.write(3000, rng.integers(0, 256, 20000, dtype=np.uint8))
        t1.write(50000, rng.integers(0, 256, 30000, dtype=np.uint8))
        FlashCopy(t1, t2, background_copy=False, record=True)
        FlashCopy(t2, t3, background_copy=False, record=True)
        return t1.read(0, t1.capacity).tobytes()


def main(argv=None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--root", type=Path, required=True)
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args(argv)
    rnd = random.Random(a.seed)
    unit = StorageUnit(a.root / "unit")
    s, t1, t2, t3 = (unit.volume(n) for n in ("s", "t1", "t2", "t3"))
    print("READY", flush=True)
    cap = s.capacity
    while True:
        top = t1.target_relationship
        op = rnd.random()
        if top is None:
            FlashCopy(s, t1, background_copy=False, record=True)
        elif top.revertible:                 # (a kill between resync and commit)
            top.commit() if rnd.random() < 0.5 else top.revert()
        elif op < 0.35:
            v = s if rnd.random() < 0.5 or not t1.valid else t1
            off = rnd.randrange(cap)
            v.write(off, rnd.randbytes(rnd.randint(1, min(cap - off, 3 * GRAIN))))
        elif op < 0.55 and t1.valid:
            top.resync(revertible=rnd.random() < 0.5)
            if top.revertible:
                top.commit() if rnd.random() < 0.5 else top.revert()
        elif op < 0.85:
            fc = rnd.choice([top, t2.target_relationship, t3.target_relationship])
            fc.copy(rnd.randint(1, 8))
        elif top.tracks_to_copy:
            top.withdraw(force=True)


if __name__ == "__main__":
    sys.exit(main())
