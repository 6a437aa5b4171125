"""What the command line accepts: sizes, counts, names, colon-joined specs,
and the arguments and options that several commands share."""

from __future__ import annotations

import math
import re
import sys
from fractions import Fraction

import click

from fastfc.names import NAME, NAME_RULE

# The largest byte count or index a volume can hold (a C Py_ssize_t).
MAX_BYTES = sys.maxsize


class Size(click.ParamType):
    """A byte count: ``4096``, ``64K``, ``16MiB``, ``1.5G``, ``1P`` (binary
    units, K to E; a fraction must come to whole bytes), at least ``low``;
    a ``power_of_two`` up to ``high`` when asked (a track size)."""

    name = "size"
    _UNITS = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40,
              "P": 1 << 50, "E": 1 << 60}

    def __init__(self, low: int = 0, high: int = MAX_BYTES, power_of_two: bool = False) -> None:
        self.low, self.high, self.power_of_two = low, high, power_of_two

    def convert(self, value, param, ctx):
        if isinstance(value, int):
            n = value
        else:
            m = re.fullmatch(r"\s*(\d+(?:\.\d*)?|\.\d+)\s*([KMGTPE]?)(?:I?B)?\s*", str(value),
                             re.IGNORECASE)
            if not m:
                self.fail(f"{value!r} is not a size (e.g. 4096, 64K, 1.5M, 1G)", param, ctx)
            exact = Fraction(m.group(1)) * self._UNITS[m.group(2).upper()]
            if exact.denominator != 1:
                self.fail(f"{value!r} is not a whole number of bytes", param, ctx)
            n = int(exact)
        if self.power_of_two and (n & (n - 1) or not self.low <= n <= self.high):
            self.fail(f"{value!r} is not a power of two from {_short(self.low)} to "
                      f"{_short(self.high)}", param, ctx)
        if n < self.low:
            self.fail(f"{value!r} is not a size of at least {self.low} bytes"
                      if self.low > 1 else f"{value!r}: the size must be positive", param, ctx)
        return _at_most(n, self.high, param, value)


def _short(n: int) -> str:
    """``n`` bytes as the shortest size this module reads, e.g. 16M."""
    for unit in "EPTGMK":
        if n % Size._UNITS[unit] == 0:
            return f"{n // Size._UNITS[unit]}{unit}"
    return str(n)


class Count(click.ParamType):
    """A whole number from ``low`` to ``high``."""

    name = "integer"

    def __init__(self, low: int = 0, high: int = MAX_BYTES) -> None:
        self.low, self.high = low, high

    def convert(self, value, param, ctx):
        try:
            n = value if isinstance(value, int) and not isinstance(value, bool) \
                else int(str(value).strip())
        except ValueError:
            self.fail(f"{value!r} is not a whole number", param, ctx)
        if n < self.low:
            self.fail(f"{n} is below the minimum {self.low}", param, ctx)
        return _at_most(n, self.high, param, value)


def _at_most(n: int, high: int, param, value) -> int:
    """A number too large for what it counts is an expected error (status 1,
    one line), not a usage error: the command line was well formed."""
    if n > high:
        what = f"{param.get_error_hint(None)}" if param is not None else "value"
        raise click.ClickException(f"{what} {value} is too large (at most {high})")
    return n


class Real(click.FloatRange):
    """A number in a range, as :class:`click.FloatRange`, that is a number:
    ``nan`` is refused (it passes every comparison of a range)."""

    def convert(self, value, param, ctx):
        n = super().convert(value, param, ctx)
        if math.isnan(n):
            self.fail(f"{value!r} is not a number", param, ctx)
        return n


class Name(click.ParamType):
    """A name: volume, session (:mod:`fastfc.names`)."""

    def __init__(self, what: str) -> None:
        self.what = what
        self.name = what.upper()

    def convert(self, value, param, ctx):
        return check_name(self.what, value)


def check_name(what: str, name: str) -> str:
    """``name`` if it is a valid name (:mod:`fastfc.names`), else one line."""
    if not NAME.match(name):
        raise click.ClickException(f"{name!r} is not a valid {what} name: names are "
                                   f"{NAME_RULE}")
    return name


class Spec(click.ParamType):
    """Volume names joined by colons, DS8000 style: ``SOURCE:TARGET``."""

    def __init__(self, *parts: str) -> None:
        self.parts = parts
        self.name = ":".join(parts)

    def get_metavar(self, param, ctx=None) -> str:
        return self.name

    def convert(self, value, param, ctx):
        if isinstance(value, tuple):
            return value
        names = tuple(value.split(":"))
        if len(names) != len(self.parts) or not all(names):
            self.fail(f"{value!r} is not {self.name}", param, ctx)
        for n in names:
            check_name("volume", n)
        return names


SIZE = Size()
POSITIVE_SIZE = Size(low=1)
TRACK_SIZE = Size(low=512, high=16 << 20, power_of_two=True)
FLASH = Spec("SOURCE", "TARGET")
PAIR = Spec("PRIMARY", "SECONDARY")
TRIPLET = Spec("A", "B", "C")
VOLUME = Name("volume")
SESSION = Name("session")

# Shared arguments and options (each use makes its own click parameter).
FLASHES = click.argument("specs", nargs=-1, required=True, type=FLASH)
PAIRS = click.argument("specs", nargs=-1, required=True, type=PAIR)
JSON = click.option("--json", "as_json", is_flag=True,
                    help="Print JSON instead of a table (its shape: the operator's guide, "
                         "docs/guide/cli.md, Scripting).")
