"""Crash-test child: a PPRC pair between two file-backed units is failed over
live (both units open) and the process is killed with SIGKILL at the first
write the failover makes to one unit's store (``--victim primary`` or
``secondary``): the other unit's half of the failover is recorded, or
nothing is, whichever order the two units' writes come in.

Layout of ``--root``: ``primary/`` (volume A), ``secondary/`` (volume B). The
child creates both, writes A, establishes the pair A->B, copies it in full,
writes A again (tracks owed to B, in A's out-of-sync bitmap), then fails
over. A child that is not killed exits with status 3.

Run by tests/test_crash.py; ``python tests/failover_child.py --help``.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import numpy as np

from fastfc import PPRCPair, StorageUnit

N_TRACKS = 16
TRACK = 4096
OWED = (3, 7)          # tracks A writes after the full copy, never sent to B
KILLED_BY = ("transaction", "save_pair", "set_volume_flags", "save_secondary")


def data(seed: int, nbytes: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, nbytes, dtype=np.uint8)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--root", type=Path, required=True)
    ap.add_argument("--victim", choices=("primary", "secondary"), required=True)
    ap.add_argument("--durability", default="process")
    args = ap.parse_args(argv)
    dur = args.durability
    u1 = StorageUnit(args.root / "primary", durability=dur)
    u2 = StorageUnit(args.root / "secondary", durability=dur)
    a = u1.create_volume("A", N_TRACKS, TRACK)
    b = u2.create_volume("B", N_TRACKS, TRACK)
    a.write(0, data(1, a.capacity))
    pair = PPRCPair(a, b, background=False)
    pair.drain()
    for t in OWED:
        a.write(t * TRACK, data(10 + t, TRACK))
    store = (u1 if args.victim == "primary" else u2).store

    def die(*_args, **_kwargs):
        os.kill(os.getpid(), 9)

    for method in KILLED_BY:
        setattr(store, method, die)
    pair.failover()
    print("failover finished without touching the victim's store", file=sys.stderr)
    return 3


if __name__ == "__main__":
    sys.exit(main())
