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
