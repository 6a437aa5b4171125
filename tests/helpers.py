"""Small helpers shared by the test modules."""

import os
import subprocess
import sys
from contextlib import contextmanager

import numpy as np

from fastfc import Volume


def rand(n: int, seed: int) -> np.ndarray:
    """``n`` random bytes, the same for the same seed."""
    return np.random.default_rng(seed).integers(0, 256, n, dtype=np.uint8)


def image(v: Volume) -> np.ndarray:
    """A volume's whole logical image."""
    return v.read(0, v.capacity)


@contextmanager
def held_unit(path, readonly: bool = False, hold: float | None = None):
    """A child process that opens the storage unit at ``path`` and holds it
    until the block ends (or ``hold`` seconds pass). Yields the child."""
    code = ("import sys, time; from fastfc import StorageUnit\n"
            "u = StorageUnit(sys.argv[1], readonly=sys.argv[2] == '1')\n"
            "print('ready', flush=True)\n"
            "time.sleep(float(sys.argv[3])) if sys.argv[3] != '-' else sys.stdin.read()\n"
            "u.close()\n")
    child = subprocess.Popen(
        [sys.executable, "-c", code, str(path), "1" if readonly else "0",
         "-" if hold is None else str(hold)],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
        env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)})
    try:
        line = child.stdout.readline()
        assert line.strip() == "ready", line
        yield child
    finally:
        child.stdin.close()
        child.wait(timeout=60)


def one_at_a_time(gm) -> None:
    """Make every secondary group of session ``gm`` run each pair's and
    relationship's own method, one after another in triplet order, as
    batches of one (``PPRCPair.cg_drain`` / ``cg_end``,
    ``FlashCopy._resync`` / ``_end_revertible``), with the fault points hit
    between them: the reference a group's one loop over them all must equal
    (results, bitmaps, sequence numbers, side files and every byte)."""
    from fastfc import faults
    from fastfc.errors import DrainAborted, FastFCError

    for group in gm.groups:
        flash = group.flash

        def drain(deadline, time_left, group=group):
            sent = 0
            for trip in group.triplets:
                faults.hit("drain", trip.a)
                if deadline is not None and deadline():
                    raise DrainAborted("drain time limit passed")
                if trip.pair.cg is None:    # no CG began on it: nothing out of sync
                    continue
                sent += trip.pair.cg_drain(deadline, time_left)
            return sent

        def end_drain(ok, group=group):
            for trip in group.triplets:
                trip.pair.cg_end(ok)

        def prepare_all(sequence, stop_at_failure, flash=flash):
            prepared = []
            flash.prepared = prepared
            failure = None
            for fc in flash.relationships:
                try:
                    fc._resync(revertible=True, sequence=sequence)
                    prepared.append(fc)
                except FastFCError as e:
                    failure = f"prepare of {fc.source.name}: {type(e).__name__}: {e}"
                    if stop_at_failure:
                        break
            return failure

        def finish(step, flash=flash):
            errors = []
            for fc in flash.prepared:
                try:
                    fc._end_revertible(step)
                except FastFCError as e:
                    errors.append(f"{step} of {fc.source.name}: {type(e).__name__}: {e}")
            flash.prepared = []
            return errors

        group.drain = drain
        group.end_drain = end_drain
        group.prepare_all = prepare_all
        group.commit_all = lambda finish=finish: finish("commit")
        group.revert_all = lambda finish=finish: finish("revert")


class KernelCalls:
    """Counts the calls of a kernel (``_core.<name>``) for the rest of a test
    (``monkeypatch`` undoes it): the session runs it, not a fallback."""

    def __init__(self, monkeypatch, name: str) -> None:
        from fastfc import _core
        self.calls = 0
        real = getattr(_core, name)

        def wrapped(*a, **k):
            self.calls += 1
            return real(*a, **k)

        monkeypatch.setattr(_core, name, wrapped)
