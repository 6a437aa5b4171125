"""Checks of the numbers a user gives: seconds, rates, bounds.

A float argument is compared with its bounds, and ``nan`` passes every
comparison that refuses (``nan < 0`` is false): each check here refuses it by
name, and ``inf`` too unless the argument means "no bound" with it (a
timeout).
"""

from __future__ import annotations

import math
from numbers import Real


def check_real(what: str, value: object, *, positive: bool = False,
               infinite: bool = False) -> float:
    """``value`` as a float if it is a real number ``>= 0`` (``> 0`` if
    ``positive``), finite unless ``infinite``; else ``TypeError`` (not a
    number) or ``ValueError`` naming ``what``."""
    if isinstance(value, bool) or not isinstance(value, Real):
        raise TypeError(f"{what} must be a number, got {type(value).__name__}")
    v = float(value)
    if math.isnan(v) or (math.isinf(v) and not infinite) or v < 0 or (positive and v == 0):
        kind = "a positive" if positive else "a"
        finite = "" if infinite else " finite"
        bound = "" if positive else " >= 0"
        raise ValueError(f"{what} must be {kind}{finite} number{bound}, got {value!r}")
    return v
