"""Secondary storage units on other processes and hosts, through Ray.

Ray (``pip install 'fastfc[remote]'``) is imported only for what needs it:
:class:`SecondaryUnit` (and :mod:`fastfc.remote.rayunit`). ``import fastfc``,
``from fastfc import remote`` and the in-process double :class:`LocalUnit`
run without it.

* :meth:`SecondaryUnit.start` (path, name=...) starts a Ray actor holding a
  durable :class:`~fastfc.StorageUnit`, detached from the process that
  started it; ``create_volume`` gives :class:`RemoteVolume` proxies;
  :meth:`SecondaryUnit.attach` (name) finds a running one; ``stop()`` ends
  it (:func:`stop_units` by name), ``kill()`` crashes it.
* ``fastfc.GlobalMirror([(A, B, C), ...])`` with local A and remote B, C
  runs the session across units (:mod:`fastfc.copyservices.sitemirror`).
* :func:`recover` is site-loss recovery over the secondary units alone.
* :class:`LocalUnit` is the in-process double with the same calls.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Sequence

from fastfc.copyservices.sitemirror import reconcile_sites, recover_sites
from fastfc.remote.client import RemoteVolume, UnitDownError, UnitHandle
from fastfc.remote.local import LocalUnit
from fastfc.remote.server import FencedError, UnitServer

if TYPE_CHECKING:
    from fastfc.remote.rayunit import SecondaryUnit, stop_units


def __getattr__(name: str) -> Any:
    """``SecondaryUnit`` imports Ray on first use (a clear
    :class:`~fastfc.MissingDependencyError` without it)."""
    if name in ("SecondaryUnit", "stop_units"):
        from fastfc.remote import rayunit
        return getattr(rayunit, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def recover(units: Sequence[UnitHandle], session: str = "gm") -> int:
    """Site-loss recovery: with the primary process gone for good, settle
    any in-doubt consistency group across ``units`` by the seed's rule
    (reading the decision the session recorded on its first unit), so every
    C is on one CG; then fast-reverse-restore each B from its C and let the
    B volumes take host writes (ready for failover). Returns the CG
    sequence every B now holds. Pass the units in the session's order
    (the first one holds the decision record)."""
    return recover_sites([u.site for u in units], session)


__all__ = ["SecondaryUnit", "stop_units", "LocalUnit", "RemoteVolume", "UnitDownError", "FencedError",
           "UnitServer", "recover", "reconcile_sites", "recover_sites"]
