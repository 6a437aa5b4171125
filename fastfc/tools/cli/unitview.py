"""showunit: one storage unit at a glance: where it is and how it is open,
whether a server holds it, its volumes, relationships and Global Mirror
sessions, and the space its files take on their filesystem.

It only looks (app.py's READ_ONLY_COMMANDS): it runs while a server holds
the unit (carried out by that server) and beside other commands that look.
"""

from __future__ import annotations

import collections
import os
from pathlib import Path

import click

from fastfc.copyservices.globalmirror import GMState
from fastfc.durable.sqlite import JOURNAL_FILE
from fastfc.durable.unit import StorageUnit

from .app import main
from .output import console, human, json_out, table
from .params import JSON
from .units import Units, pass_units

#: how showunit sorts a unit directory's files (the rest count as "other")
_KINDS = (("volumes", "volumes"), ("bitmaps", "bitmaps"))
_METADATA = ("unit.db", "unit.db-wal", "unit.db-shm", "unit.db-journal", JOURNAL_FILE)
_RESERVE = "unit.reserve"


@main.command()
@JSON
@pass_units
def showunit(units, as_json) -> None:
    """Show the --unit: its path and durability, the server holding it, its
    volumes (capacity, thin or fully allocated, bytes on disk), its FlashCopy
    relationships and PPRC pairs by state, its Global Mirror sessions, and
    space: the filesystem's free and total bytes, and what the unit's files
    (volumes, bitmaps, unit.db) take."""
    unit = units.local()
    view = unit_view(units, unit)
    if as_json:
        json_out(view)
        return
    _print(view)


def unit_view(units: Units, unit: StorageUnit) -> dict:
    """What showunit shows of ``unit`` (its --json)."""
    server = units.loops is not None       # carried out by the server holding it
    top = unit.path
    if top is None:
        raise ValueError("showunit shows a storage unit on disk; this one is in memory")
    return {"path": str(top),
            "durability": {"open_at": unit.durability, "created_with": None},
            "server": {"held": server, "pid": os.getpid() if server else None},
            "readonly": unit.readonly,
            "volumes": _volumes(unit, top),
            "flashcopies": _count(fc.state.value for fc in unit.flashcopies),
            "pairs": _count([p.state.value for p in unit.pairs]
                            + ["secondary unit away"] * len(unit.pair_records)),
            "secondary_of": sum(v.is_secondary for v in unit.volumes()),
            "sessions": _sessions(units, unit),
            "space": _space(top)}


def _count(states) -> dict:
    by = collections.Counter(states)
    return {"total": sum(by.values()), "by_state": dict(sorted(by.items()))}


def _volumes(unit: StorageUnit, top: Path) -> dict:
    """Count, capacity, thin or full (as unit.db records each), and the
    bytes each volume's file holds on the disk (its allocated blocks)."""
    thin = {r["name"]: bool(r["thin"]) for r in unit.volume_records()}
    rows = []
    for v in sorted(unit.volumes(), key=lambda v: v.name):
        st = os.stat(top / "volumes" / f"{v.name}.vol")
        rows.append({"name": v.name, "capacity": v.capacity,
                     "thin": thin.get(v.name, False),
                     "allocated": st.st_blocks * 512})
    return {"count": len(rows), "capacity": sum(r["capacity"] for r in rows),
            "thin": sum(r["thin"] for r in rows), "full": sum(not r["thin"] for r in rows),
            "allocated": sum(r["allocated"] for r in rows),
            "missing": sorted(unit.volume_problems), "each": rows}


def _sessions(units: Units, here: StorageUnit) -> list[dict]:
    """The sessions of the open units with a volume in ``here``: recorded
    here (its B and C volumes), or with an A here."""
    loops = units.loops
    out = []
    for u in units.all():
        for name in u.store.session_rows():
            rec = u.session_record(name)
            gm = u.sessions.get(name)
            a_here = gm is not None and any(t.a.unit is here for t in gm.triplets)
            if u is not here and not a_here:
                continue
            seqs = [t["c_sequence"] for t in rec["triplets"] if t["c_sequence"] is not None]
            if gm is None:
                state = "not restored" if name in u.session_problems else "primary unavailable"
            elif gm.state is GMState.FATAL:
                state = "fatal"
            elif loops is not None and loops.running(gm):
                state = "running"
            else:
                state = "paused"
            out.append({"session": name, "state": state,
                        "resumes_when_served": rec["running"] and state == "paused",
                        "role": ("primary and secondary" if u is here and a_here
                                 else "secondary" if u is here else "primary"),
                        "triplets": len(rec["triplets"]),
                        "cg_sequence": max(seqs, default=None),
                        "recorded_in": str(u.path)})
    return sorted(out, key=lambda s: s["session"])


def _space(top: Path) -> dict:
    """The filesystem's free and total bytes (statvfs of the unit
    directory) and the bytes the unit's files take on it (their allocated
    blocks), by kind, with their apparent sizes."""
    fs = os.statvfs(top)
    kinds = {k: {"files": 0, "bytes": 0, "apparent": 0}
             for k in ("volumes", "bitmaps", "metadata", "reserve", "other")}
    for folder, files in _walk(top):
        for f in files:
            try:
                st = os.lstat(folder / f)
            except FileNotFoundError:       # gone since the listing (a WAL file)
                continue
            k = _kind(top, folder, f)
            kinds[k]["files"] += 1
            kinds[k]["bytes"] += st.st_blocks * 512
            kinds[k]["apparent"] += st.st_size
    return {"filesystem_free": fs.f_bavail * fs.f_frsize,
            "filesystem_total": fs.f_blocks * fs.f_frsize,
            "unit_bytes": sum(k["bytes"] for k in kinds.values()), "by_kind": kinds}


def _walk(top: Path):
    for folder, _, files in os.walk(top):
        yield Path(folder), files


def _kind(top: Path, folder: Path, name: str) -> str:
    for sub, kind in _KINDS:
        if folder == top / sub:
            return kind
    if folder == top and name in _METADATA:
        return "metadata"
    if folder == top and name == _RESERVE:
        return "reserve"
    return "other"


def _print(view: dict) -> None:
    vols, space = view["volumes"], view["space"]
    t = table("Property", "Value", show_header=False)
    t.add_row("Unit", view["path"])
    d = view["durability"]
    t.add_row("Durability", f"{d['open_at']} (open at; created with: "
              f"{d['created_with'] or 'not recorded'})")
    s = view["server"]
    t.add_row("Server", f"holds it (pid {s['pid']})" if s["held"] else "none")
    t.add_row("Volumes", f"{vols['count']}: {human(vols['capacity'])} "
              f"({vols['thin']} thin, {vols['full']} full)"
              + (f"; missing: {', '.join(vols['missing'])}" if vols["missing"] else ""))
    t.add_row("Allocated", f"{human(vols['allocated'])} of {human(vols['capacity'])}")
    t.add_row("FlashCopies", _states(view["flashcopies"]))
    t.add_row("PPRC pairs", _states(view["pairs"])
              + (f"; secondary of {view['secondary_of']}" if view["secondary_of"] else ""))
    t.add_row("GM sessions", str(len(view["sessions"])))
    t.add_row("Filesystem", f"{human(space['filesystem_free'])} free of "
              f"{human(space['filesystem_total'])}")
    t.add_row("Unit files", human(space["unit_bytes"]) + " (" + ", ".join(
        f"{k} {human(v['bytes'])}" for k, v in space["by_kind"].items() if v["files"]) + ")")
    console().print(t)
    if vols["each"]:
        click.echo()
        t = table("Volume", "Capacity", "Thin", "On disk")
        for v in vols["each"]:
            t.add_row(v["name"], human(v["capacity"]), "yes" if v["thin"] else "no",
                      human(v["allocated"]))
        console().print(t)
    if view["sessions"]:
        click.echo()
        t = table("Session", "State", "Role", "Triplets", "CG")
        for r in view["sessions"]:
            t.add_row(r["session"], r["state"] + (" (resumes when served)"
                                                  if r["resumes_when_served"] else ""),
                      r["role"], str(r["triplets"]),
                      "-" if r["cg_sequence"] is None else str(r["cg_sequence"]))
        console().print(t)


def _states(counts: dict) -> str:
    if not counts["total"]:
        return "none"
    return f"{counts['total']} (" + ", ".join(
        f"{n} {state}" for state, n in counts["by_state"].items()) + ")"


__all__ = ["showunit", "unit_view"]
