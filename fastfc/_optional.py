"""Optional dependencies, imported when a feature needs them.

``pip install fastfc`` brings NumPy, click and rich only; drawing plots
(``demo --plot``, the benchmark report) needs the ``plot`` extra. A feature
calls :func:`require` before its work starts, so a missing package costs one
clear line, not a traceback halfway through a run.
"""

from __future__ import annotations

import importlib
from types import ModuleType

from fastfc.errors import FastFCError


class MissingDependencyError(FastFCError, ImportError):
    """An optional package a feature needs is not installed. The message
    names the extra that installs it, e.g. ``pip install 'fastfc[plot]'``."""


def require(module: str, extra: str, feature: str | None = None) -> ModuleType:
    """Import and return ``module``, or raise :class:`MissingDependencyError`.

    Parameters
    ----------
    module : str
        The module to import, e.g. ``"matplotlib"``.
    extra : str
        The fastfc extra that installs it, e.g. ``"plot"``.
    feature : str, optional
        What needs it, for the message (e.g. ``"--plot"``).
    """
    try:
        return importlib.import_module(module)
    except ImportError as e:
        top = module.partition(".")[0]
        if e.name is not None and e.name != top and not e.name.startswith(top + "."):
            raise   # the package is there but broken: show the real cause
        who = f"{feature} needs {top}" if feature else f"{top} is needed"
        raise MissingDependencyError(
            f"{who}, which is not installed: pip install 'fastfc[{extra}]'",
            name=top) from None
