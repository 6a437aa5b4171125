"""Secondary storage units on other processes and hosts, through Ray.

Ray (``pip install 'fastfc[remote]'``) is imported only for what needs it:
:class:`SecondaryUnit` (and :mod:`fastfc.remote.rayunit`). ``import fastfc``,
``from fastfc import remote`` and the in-process double :class:`LocalUnit`
run without it.

* :meth:`SecondaryUnit.start` (path, name=...) starts a Ray actor holding a
  durable :class:`~fastfc.StorageUnit`, detached from the process that
  started it; ``create_volume`` gives :class:`RemoteVolume` proxies;
  :meth:`SecondaryUnit.attach` (name) finds a running one; ``stop()`` ends
  it (:func:`stop_units` by name), ``kill()`` crashes it. ``durability=
  "power"`` makes the unit keep every C on one CG through a power cut of
  its host too (:class:`UnitServer`; "process" by default).
* ``fastfc.GlobalMirror([(A, B, C), ...])`` with local A and remote B, C
  runs the session across units (:mod:`fastfc.copyservices.sitemirror`).
* :func:`recover` is site-loss recovery over the secondary units alone.
* :func:`attach` continues a session from a new primary process, from its
  record in the A volumes' storage unit (no initial copy).
* :class:`LocalUnit` is the in-process double with the same calls.
* The session's calls reach a Ray unit over its direct stream
  (:mod:`fastfc.remote.stream`), Ray being the control plane.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Sequence

from fastfc.copyservices.sitemirror import reconcile_sites, recover_sites
from fastfc.remote import client
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


def _transport(kind: str) -> Any:
    if kind == "ray":
        from fastfc.remote import rayunit  # noqa: F401  (registers the transport)
    return client.transport(kind)


def attach(primary: Any, session: str = "gm", **options: Any) -> Any:
    """Continue session ``session`` over running units from a new primary
    process: the session recorded in ``primary`` (the
    :class:`~fastfc.StorageUnit` holding its A volumes, opened by this
    process) is rebuilt over the units it names, found by name
    (:meth:`SecondaryUnit.attach`: they must be running), and resumed
    (``GlobalMirror(..., resume=True)``): each unit's record is checked
    against the primary's, the counters and CG sequence go on, and the
    first CG sends only the grains where A and B differ, no initial copy.
    ``options`` override the recorded settings (``cg_interval``, ...) and
    take ``GlobalMirror``'s others (``on_coordinate``, ``journal``, ...).
    Returns the :class:`~fastfc.GlobalMirror`."""
    from fastfc.copyservices.globalmirror import GlobalMirror
    records = primary.store.site_sessions()
    if session not in records:
        raise KeyError(f"unit {primary.path} records no session {session!r} over secondary "
                       f"units (it records {sorted(records) or 'none'})")
    rec = records[session]
    trips: list[Any] = []
    for a, key, b, c in rec["triplets"]:
        if len(key) != 2:
            raise ValueError(f"session {session!r}: {b} and {c} are on a site {key!r} that "
                             "fastfc.remote does not reach")
        kind, unit = key
        site = _transport(kind).site(unit)
        trips.append((primary.volume(a),
                      RemoteVolume(kind, unit, *site._now("volume", b)),
                      RemoteVolume(kind, unit, *site._now("volume", c))))
    settings = {k: rec[k] for k in ("cg_interval", "max_coordination_time",
                                    "max_drain_time", "decide")}
    settings.update(options)
    return GlobalMirror(trips, name=session, resume=True, **settings)


def forget_session(primary: Any, session: str) -> bool:
    """Forget the record of session ``session`` over secondary units in
    ``primary`` (the storage unit of its A volumes), for a session that
    will never be resumed (its units are gone for good, or it was
    recovered and the B volumes took over). Returns whether it was
    recorded. (``GlobalMirror.close()`` forgets it too.)"""
    known = session in primary.store.site_sessions()
    primary.store.drop_site_session(session)
    return known


__all__ = ["attach", "forget_session", "SecondaryUnit", "stop_units", "LocalUnit",
           "RemoteVolume", "UnitDownError", "FencedError", "UnitServer", "recover",
           "reconcile_sites", "recover_sites"]
