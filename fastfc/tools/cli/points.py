"""Recovery points of a unit's volumes: mkpoint, lspoint, rmpoint,
restorepoint (DS8000 Safeguarded Copy: mksgc, lssgc, rmsgc, recoversgc).

A point is named ``VOLUME#SEQ`` (``lspoint`` lists them). Points are
durable in the unit (fastfc.durable.points): immutable until they expire,
and never expired before their retention ends."""

from __future__ import annotations

import time

import click

from fastfc.copyservices.point_schedule import point_cg

from .app import main
from .output import console, human, json_out, plural, table
from .params import JSON, VOLUME
from .units import pass_units, unlocked


def _point_ref(text: str) -> tuple[str, int]:
    vol, sep, seq = text.rpartition("#")
    if not sep or not vol or not seq.isdigit():
        raise click.BadParameter(f"a recovery point is named VOLUME#SEQ (as lspoint shows), "
                                 f"got {text!r}")
    return vol, int(seq)


def _find(unit, ref: str):
    vol, seq = _point_ref(ref)
    if vol not in unit:
        raise click.ClickException(f"no volume named {vol!r} in this unit")
    try:
        return unit.points.point(vol, seq)
    except KeyError:
        raise click.ClickException(f"volume {vol!r} holds no recovery point #{seq} "
                                   "(lspoint lists them)") from None


@main.command()
@click.argument("volumes", nargs=-1, required=True, type=VOLUME)
@click.option("--name", default=None, help="A label for the points.")
@click.option("--retain", type=click.FloatRange(min=0), default=0.0, show_default=True,
              help="Seconds before the points may expire.")
@pass_units
def mkpoint(units, volumes, name, retain) -> None:
    """Take a recovery point of each volume, all at one instant [mksgc]."""
    unit = units.local()
    for v in volumes:
        if v not in unit:
            raise click.ClickException(f"no volume named {v!r} in this unit")
    points = unit.points.take(list(volumes), retain_for=retain, name=name)
    for p in points:
        kept = f", retained {retain:g} s" if retain else ""
        click.echo(f"took recovery point {p.volume.name}#{p.seq}{kept}")


@main.command()
@click.argument("volume", required=False, type=VOLUME)
@JSON
@pass_units
def lspoint(units, volume, as_json) -> None:
    """List the recovery points (of VOLUME, or of every volume) [lssgc]:
    the CG column names the Global Mirror session CG a session's schedule
    (mkgmir/chgmir --points-*) took a point at."""
    unit = units.local()
    if volume is not None and volume not in unit:
        raise click.ClickException(f"no volume named {volume!r} in this unit")
    pts = unit.points.points(volume)
    now = time.time()
    rows = [{"point": f"{p.volume.name}#{p.seq}", "volume": p.volume.name, "seq": p.seq,
             "name": p.name, "taken_at": p.taken_at, "retain_until": p.retain_until,
             "saved_grains": p.saved_grains, "space_bytes": p.space_bytes,
             "session": (cg := point_cg(p.name)) and cg[0], "cg": cg and cg[1]}
            for p in pts]
    if as_json:
        json_out(rows)
        return
    t = table("Point", "Name", "CG", "Taken", "Retained", "Space")
    for r in rows:
        left = r["retain_until"] - now
        t.add_row(r["point"], r["name"] or "-",
                  "-" if r["cg"] is None else f"{r['cg']} of {r['session']}",
                  time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(r["taken_at"])),
                  f"{left:.0f} s more" if left > 0 else "-", human(r["space_bytes"]))
    console().print(t if t.rows else "no recovery points")


@main.command()
@click.argument("points", nargs=-1, required=True)
@pass_units
def rmpoint(units, points) -> None:
    """Expire recovery points (refused before their retention ends) [rmsgc].

    Every point is checked first: if one cannot expire, none does."""
    unit = units.local()
    found = [_find(unit, ref) for ref in points]
    if len({id(p) for p in found}) != len(found):
        raise click.ClickException("a recovery point is named twice")
    now = time.time()
    for p in found:
        if now < p.retain_until:
            raise click.ClickException(
                f"recovery point {p.volume.name}#{p.seq} is retained for "
                f"{p.retain_until - now:.0f} s more; it cannot expire before then")
    for p in found:
        unit.points.expire(p.volume.name, p.seq)
        click.echo(f"expired recovery point {p.volume.name}#{p.seq}")


@main.command()
@click.argument("point")
@click.option("--to", "to", type=VOLUME, default=None,
              help="A new volume to create with the point's image.")
@click.option("--onto-source", is_flag=True,
              help="Put the image back on the point's own volume (it must be quiesced: "
                   "no host writes, its session paused or ended).")
@click.option("--wait", "wait_copy", is_flag=True,
              help="With --to in a server: return once the copy completes.")
@pass_units
def restorepoint(units, point, to, onto_source, wait_copy) -> None:
    """Restore a recovery point onto a new volume or its own [recoversgc].

    --to: the new volume has the point's image at once, read-only until its
    copy completes. Under fastfc serve the copy runs in the server and the
    command returns at once (--wait: when it completes); without a server
    it completes before the command returns. A kill midway is redone when
    the unit next opens."""
    if (to is None) == (not onto_source):
        raise click.UsageError("give exactly one of --to NEWVOL and --onto-source")
    if wait_copy and onto_source:
        raise click.UsageError("--wait goes with --to (--onto-source always completes first)")
    unit = units.local()
    p = _find(unit, point)
    ref = f"{p.volume.name}#{p.seq}"
    if onto_source:
        n = unit.points.restore_onto_source(p.volume.name, p.seq)
        click.echo(f"restored {ref} onto {p.volume.name} ({plural(n, 'grain')} written)")
        return
    if to in unit:
        raise click.ClickException(f"volume {to!r} already exists in this unit")
    r = unit.points.restore(p.volume.name, p.seq, to)
    if units.borrowed and not wait_copy:
        # (in a server: the copy goes on there; the new volume is served read-only)
        left = r.tracks_to_copy
        if left:
            click.echo(f"restored {ref} onto new volume {to}: {plural(left, 'track')} to "
                       "copy in the server; read-only until then")
            return
    else:
        with unlocked():
            r.wait()
    click.echo(f"restored {ref} onto new volume {to}")
