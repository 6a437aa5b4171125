"""Small helpers shared by the test modules."""

import numpy as np

from fastfc import Volume


def rand(n: int, seed: int) -> np.ndarray:
    """``n`` random bytes, the same for the same seed."""
    return np.random.default_rng(seed).integers(0, 256, n, dtype=np.uint8)


def image(v: Volume) -> np.ndarray:
    """A volume's whole logical image."""
    return v.read(0, v.capacity)
