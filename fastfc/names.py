"""Names of the things a user names: volumes, Global Mirror sessions.

One small character set for all of them, because names become parts of
file paths (a volume's file, a session's CLI log): 1 to 64 characters,
letters, digits, ``_``, ``.`` and ``-``, the first a letter or digit. No
name can hold a path separator, start with a dot, or be empty.
"""

from __future__ import annotations

import re

NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
NAME_RULE = "1-64 letters, digits, '_', '.', '-' (starting with a letter or digit)"


def check_name(what: str, name: object) -> str:
    """Return ``name`` if it is a valid name for a ``what`` (e.g. "session");
    else raise ``TypeError`` (not a str) or ``ValueError``."""
    if not isinstance(name, str):
        raise TypeError(f"a {what} name must be a str, got {type(name).__name__}")
    if not NAME.match(name):
        raise ValueError(f"{what} names are {NAME_RULE}, got {name!r}")
    return name
