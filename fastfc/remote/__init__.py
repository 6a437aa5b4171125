"""Secondary storage units on other processes and hosts, through Ray.

``from fastfc import remote`` imports Ray (``pip install 'fastfc[remote]'``);
``import fastfc`` does not.

* :meth:`SecondaryUnit.start` (path, name=...) starts a Ray actor holding a
  durable :class:`~fastfc.StorageUnit`; ``create_volume`` gives
  :class:`RemoteVolume` proxies; ``kill()`` crashes it.
* ``fastfc.GlobalMirror([(A, B, C), ...])`` with local A and remote B, C
  runs the session across units (:mod:`fastfc.copyservices.sitemirror`).
* :func:`recover` is site-loss recovery over the secondary units alone.
* :class:`LocalUnit` is the in-process double with the same calls.
"""

from __future__ import annotations

from typing import Sequence

from fastfc._optional import require

require("ray", "remote", "fastfc.remote")

from fastfc.copyservices.sitemirror import reconcile_sites, recover_sites  # noqa: E402
from fastfc.remote.client import RemoteVolume, UnitDownError, UnitHandle  # noqa: E402
from fastfc.remote.local import LocalUnit  # noqa: E402
from fastfc.remote.rayunit import SecondaryUnit  # noqa: E402
from fastfc.remote.server import FencedError, UnitServer  # noqa: E402


def recover(units: Sequence[UnitHandle], session: str = "gm") -> int:
    """Site-loss recovery: with the primary process gone for good, settle
    any in-doubt consistency group across ``units`` by the seed's rule
    (reading the decision the session recorded on its first unit), so every
    C is on one CG; then fast-reverse-restore each B from its C and let the
    B volumes take host writes (ready for failover). Returns the CG
    sequence every B now holds. Pass the units in the session's order
    (the first one holds the decision record)."""
    return recover_sites([u.site for u in units], session)


__all__ = ["SecondaryUnit", "LocalUnit", "RemoteVolume", "UnitDownError", "FencedError",
           "UnitServer", "recover", "reconcile_sites", "recover_sites"]
