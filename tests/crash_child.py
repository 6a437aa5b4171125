"""Crash-test child: a Global Mirror session over file-backed units under a
host write workload, killed with SIGKILL (by itself, at a named step of the
protocol, or by the parent at a random moment).

Layout of ``--root``::

    primary/      the storage unit holding the A volumes
    secondary/    the storage unit holding the B and C volumes
    snaps/N.npy   the A images at the coordination instant of CG N (all A
                  stacked), written with fsync + atomic rename by
                  ``on_coordinate`` before the CG goes on; 0.npy holds the C
                  images before the first CG
    ready         present once the units and the session exist
    kill.json     written just before a fault hook kills the process: the
                  point and the sequence of the CG attempt in flight

The first run (no ``ready``) creates the units, the volumes (A with random
contents) and the session; later runs reopen the units and restore the
session. Then writer threads write to every A, the session forms CGs on its
loop thread, and the child prints ``READY``. With ``--point`` a fault is
armed whose action kills the process when that point is reached; without
one the child runs until the parent kills it. With ``--then recover`` or
``--then close`` the loop and the writers stop after ``--run-for`` seconds,
the point is armed then, and the child recovers the session at the remote
site or closes it (killing itself right after, if the point was not reached). A child still alive after
``--timeout`` seconds exits with status 3 (the point was never reached).

Only the C volumes are checked, against the recorded snapshots: the A
volumes' own contents after the last committed CG do not matter.

Run by tests/test_crash.py; ``python tests/crash_child.py --help``.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import sys
import time
from pathlib import Path

import numpy as np

from fastfc import GlobalMirror, GMState, StorageUnit, faults
from fastfc.tools.testing import RandomWriters


N_TRIPLETS = 3
N_TRACKS = 32
TRACK = 4096
SESSION = "gm"
POINTS = ("none", "prepare", "commit", "revert", "decision", "drain", "link", "cow",
          "coordinate", "resolve", "barrier", "copy", "statement")
# what the child does after --run-for seconds of the loop (writers stopped)
THEN = ("loop", "recover", "close")


# -- helpers shared with the parent --------------------------------------------
# the units' durability level (the kill-anywhere guarantee holds at both)
DURABILITY = os.environ.get("FASTFC_CRASH_DURABILITY", "process")


def configure() -> None:
    """What the environment asks of this child, read when it starts (by
    ``main``, not at import: tests/test_crash.py forks its children from a
    server that imported this module once, before their environments)."""
    global DURABILITY
    DURABILITY = os.environ.get("FASTFC_CRASH_DURABILITY", "process")
    if os.environ.get("FASTFC_TESTS_TMPFS_AS_DISK"):
        # the parent keeps the units on tmpfs for speed (conftest.tmpfs_tmp_path):
        # volumes take the disk's I/O path here too, as they do in the parent
        import fastfc.storage.volume as _volume
        _volume._in_memory_fs = lambda path: False

def unit_dirs(root: Path) -> tuple[Path, Path]:
    return root / "primary", root / "secondary"


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def save_snapshot(root: Path, sequence: int, images) -> None:
    """Record ``images`` as CG ``sequence``'s, durably and atomically."""
    snaps = root / "snaps"
    tmp = snaps / f".{sequence}.tmp"
    with open(tmp, "wb") as f:
        np.save(f, np.stack(images))
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, snaps / f"{sequence}.npy")
    _fsync_dir(snaps)


def load_snapshot(root: Path, sequence: int) -> np.ndarray:
    path = root / "snaps" / f"{sequence}.npy"
    if not path.exists():
        raise AssertionError(f"no snapshot recorded for CG {sequence} "
                             f"(have {sorted(snapshot_sequences(root))})")
    return np.load(path)


def snapshot_sequences(root: Path) -> list[int]:
    return sorted(int(p.stem) for p in (root / "snaps").glob("*.npy"))


def prune_snapshots(root: Path, committed: int) -> None:
    """Drop snapshots older than the newest committed CG: the C volumes can
    never go back to them."""
    for seq in snapshot_sequences(root):
        if seq < committed:
            (root / "snaps" / f"{seq}.npy").unlink(missing_ok=True)


def recorder(root: Path, session: GlobalMirror):
    """An ``on_coordinate`` callback recording the A images durably."""
    primaries = [t.a for t in session.triplets]

    def on_coordinate(sequence: int) -> None:
        # host writes to every A are held: the raw arrays are the images
        save_snapshot(root, sequence, [a.array.copy() for a in primaries])
        prune_snapshots(root, session.stats.sequence)
    return on_coordinate


def create(root: Path, seed: int) -> None:
    """Fresh units, volumes and session; ``ready`` marks the end."""
    for d in (*unit_dirs(root), root / "snaps"):
        shutil.rmtree(d, ignore_errors=True)
    (root / "ready").unlink(missing_ok=True)
    (root / "snaps").mkdir(parents=True)
    p, s = unit_dirs(root)
    rng = np.random.default_rng(seed)
    with StorageUnit(p, durability=DURABILITY) as u1, StorageUnit(s, durability=DURABILITY) as u2:
        A = [u1.create_volume(f"A{i}", N_TRACKS, TRACK) for i in range(N_TRIPLETS)]
        B = [u2.create_volume(f"B{i}", N_TRACKS, TRACK) for i in range(N_TRIPLETS)]
        C = [u2.create_volume(f"C{i}", N_TRACKS, TRACK) for i in range(N_TRIPLETS)]
        for a in A:
            a.write(0, rng.integers(0, 256, a.capacity, dtype=np.uint8))
        gm = GlobalMirror(list(zip(A, B, C)), name=SESSION, max_coordination_time=5.0)
        save_snapshot(root, 0, [c.read(0, c.capacity) for c in C])
        assert gm.c_sequences == [0] * N_TRIPLETS
    (root / "ready").write_text("1")
    _fsync_dir(root)


# -- the child ------------------------------------------------------------------
def main(argv=None) -> int:
    configure()
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--root", type=Path, required=True)
    ap.add_argument("--point", choices=POINTS, default="none")
    ap.add_argument("--index", type=int, default=0, help="triplet whose volume the point is on")
    ap.add_argument("--after", type=int, default=0, help="let the point pass this many times")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--cg-interval", type=float, default=0.0)
    ap.add_argument("--pace", type=float, default=4e6, help="host write bytes/s (all writers)")
    ap.add_argument("--timeout", type=float, default=30.0)
    ap.add_argument("--then", choices=THEN, default="loop",
                    help="after --run-for seconds, stop the loop and the writers and "
                         "recover the session at the remote site (failover, reverse "
                         "restore) or close it (each C first takes what it reads from B); "
                         "the point is armed only then")
    ap.add_argument("--run-for", type=float, default=0.3)
    args = ap.parse_args(argv)
    root = args.root

    if not (root / "ready").exists():
        create(root, args.seed)
    (root / "kill.json").unlink(missing_ok=True)

    p, s = unit_dirs(root)
    u1, u2 = StorageUnit(p, durability=DURABILITY), StorageUnit(s, durability=DURABILITY)
    gm = u2.session(SESSION)
    gm.cg_interval = args.cg_interval
    gm.on_coordinate = recorder(root, gm)
    A = [t.a for t in gm.triplets]
    B = [t.b for t in gm.triplets]
    i = args.index % len(A)

    def kill(point: str, **more):
        def action() -> None:
            # the CG attempt in flight (the loop thread holds the session lock)
            info = {"point": point, "sequence": gm._next_sequence - 1,
                    "committed": gm.stats.sequence, **more}
            (root / "kill.json").write_text(json.dumps(info))
            os.kill(os.getpid(), signal.SIGKILL)
        return action

    pt, k = args.point, args.after
    on_copy = None
    if args.then != "loop":
        pass      # armed after the loop (below)
    elif pt in ("prepare", "commit"):
        faults.inject(pt, B[i], after=k, action=kill(pt))
    elif pt == "revert":
        # another volume's prepare fails (attempt k+1), so this one is reverted
        faults.inject("prepare", B[(i + 1) % len(B)], after=k)
        faults.inject("revert", B[i], action=kill(pt))
    elif pt == "decision":
        faults.inject("decision", after=k, action=kill(pt))
    elif pt == "drain":
        faults.inject("drain", A[i], after=k, action=kill(pt))
    elif pt == "link":
        faults.inject("link", after=k, action=kill(pt))
    elif pt == "cow":
        faults.inject("cow", B[i], after=k, action=kill(pt))
    elif pt == "coordinate":
        faults.inject("coordinate", after=k, action=kill(pt))
    elif pt == "barrier":
        faults.inject("barrier", after=k, action=kill(pt))
    elif pt == "statement":
        # before the secondary unit's statement number k (from 0, once the
        # loop starts; SQL, or one kept for the CG journal, or the journal's
        # append): between any two statements of its transactions
        left = [k]

        def on_statement(sql: str) -> None:
            if left[0] == 0:
                kill(pt, sql=sql[:40])()
            left[0] -= 1
        u2.store.set_trace_callback(on_statement)   # (SQL and the CG journal's)
    elif pt == "resolve":
        # every commit of attempt k+1 fails, so the session resolves the CG by
        # reverting all (none committed); killed at this volume's revert
        for b in B:
            faults.inject("commit", b, after=k)
        faults.inject("revert", B[i], action=kill(pt))

    writers = RandomWriters(A, threads=2, seed=args.seed, pace=args.pace).start()
    gm.start()
    print("READY", gm.c_sequences, flush=True)
    if args.then != "loop":
        time.sleep(args.run_for)
        writers.stop()
        gm.stop()
        if pt == "cow":
            faults.inject("cow", B[i], after=k, action=kill(pt))
        elif pt == "barrier":
            faults.inject("barrier", after=k, action=kill(pt))
        elif pt == "copy":
            left = [k]

            def on_copy(done: int, total: int) -> None:
                if left[0] == 0:
                    kill(pt)()
                left[0] -= 1
        if args.then == "recover":
            gm.recover()
        else:
            gm.close(on_copy=on_copy)
        kill(f"after {args.then}")()
    end = time.monotonic() + args.timeout
    while time.monotonic() < end:
        time.sleep(0.02)
        if gm.state is GMState.FATAL:
            print(f"session turned fatal: {gm.fatal_reason}", file=sys.stderr, flush=True)
            os._exit(4)
        if writers.errors:
            print(f"a writer failed: {writers.errors[0]!r}", file=sys.stderr, flush=True)
            os._exit(5)
    print(f"not killed within {args.timeout} s: {gm!r} armed={faults.armed()}",
          file=sys.stderr, flush=True)
    os._exit(3)


def forked_main(module: str, argv: list, env: dict, out: str, err: str) -> None:
    """``python tests/<module>.py ARGV`` in a child forked from a server that
    imported the module (tests/test_crash.py): the parent's environment
    ``env``, stdout and stderr to the files ``out`` and ``err``."""
    import importlib
    os.environ.clear()
    os.environ.update(env)
    for fd, path in ((1, out), (2, err)):
        f = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        os.dup2(f, fd)
        os.close(f)
    sys.exit(importlib.import_module(module).main(argv))


if __name__ == "__main__":
    sys.exit(main())
