"""Crash-test child: a PPRC pair between two file-backed units is failed over
live (both units open) and the process is killed with SIGKILL at the first
write the failover makes to one unit's store (``--victim primary`` or
``secondary``): the other unit's half of the failover is recorded, or
nothing is, whichever order the two units' writes come in.

Layout of ``--root``: ``primary/`` (volume A), ``secondary/`` (volume B). The
child creates both, writes A, establishes the pair A->B, copies it in full,
writes A again (tracks owed to B, in A's out-of-sync bitmap), then fails
over. A child that is not killed exits with status 3.

With ``--session`` the child instead runs a Global Mirror session A0,A1 ->
B0,B1 -> C0,C1 (primary/ holds A, secondary/ B and C), forms CG 2 (its A
images saved as ``cg.npy``), writes every A and drains it to B (B past the
CG), and recovers the session at the remote site, killed at the start of
the fast reverse restore of triplet ``--index``.

Run by tests/test_crash.py; ``python tests/failover_child.py --help``.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import numpy as np

from fastfc import GlobalMirror, PPRCPair, StorageUnit
from fastfc.copyservices.flashcopy import FlashCopy

def configure() -> None:
    """What the environment asks of this child, read when it starts (by
    ``main``, not at import: tests/test_crash.py forks its children from a
    server that imported this module once, before their environments)."""
    if os.environ.get("FASTFC_TESTS_TMPFS_AS_DISK"):
        # the parent keeps the units on tmpfs for speed (conftest.tmpfs_tmp_path):
        # volumes take the disk's I/O path here too, as they do in the parent
        import fastfc.storage.volume as _volume
        _volume._in_memory_fs = lambda path: False

N_TRACKS = 16
TRACK = 4096
OWED = (3, 7)          # tracks A writes after the full copy, never sent to B
KILLED_BY = ("transaction", "save_pair", "set_volume_flags", "save_secondary")


def data(seed: int, nbytes: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, nbytes, dtype=np.uint8)


def die(*_args, **_kwargs) -> None:
    os.kill(os.getpid(), 9)


def session(root: Path, index: int, dur: str) -> int:
    u1 = StorageUnit(root / "primary", durability=dur)
    u2 = StorageUnit(root / "secondary", durability=dur)
    A = [u1.create_volume(f"A{i}", N_TRACKS, TRACK) for i in range(2)]
    B = [u2.create_volume(f"B{i}", N_TRACKS, TRACK) for i in range(2)]
    C = [u2.create_volume(f"C{i}", N_TRACKS, TRACK) for i in range(2)]
    for i, a in enumerate(A):
        a.write(0, data(i, a.capacity))
    gm = GlobalMirror(list(zip(A, B, C)), name="g")
    for _ in range(2):
        assert gm.form_consistency_group().committed
    np.save(root / "cg.npy", np.stack([a.read(0, a.capacity) for a in A]))
    for i, a in enumerate(A):
        for t in OWED:
            a.write(t * TRACK, data(20 + 2 * t + i, TRACK))
    for t in gm.triplets:
        t.pair.drain()
    restore = FlashCopy._reverse_restore

    def restore_or_die(fc: FlashCopy) -> int:
        if fc.source is B[index]:
            die()
        return restore(fc)

    FlashCopy._reverse_restore = restore_or_die   # type: ignore[method-assign]
    gm.recover()
    print("recover finished without reaching the restore", file=sys.stderr)
    return 3


def main(argv=None) -> int:
    configure()
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--root", type=Path, required=True)
    ap.add_argument("--victim", choices=("primary", "secondary"), default="primary")
    ap.add_argument("--durability", default="process")
    ap.add_argument("--session", action="store_true")
    ap.add_argument("--index", type=int, default=0)
    args = ap.parse_args(argv)
    dur = args.durability
    if args.session:
        return session(args.root, args.index, dur)
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
    for method in KILLED_BY:
        setattr(store, method, die)
    pair.failover()
    print("failover finished without touching the victim's store", file=sys.stderr)
    return 3


if __name__ == "__main__":
    sys.exit(main())
