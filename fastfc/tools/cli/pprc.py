"""PPRC: mkpprc, lspprc, pausepprc, resumepprc, failoverpprc,
failbackpprc, rmpprc, and the drain in the foreground that ``--wait`` and
``formcg`` run."""

from __future__ import annotations

import click

from fastfc.copyservices.pprc import SEND_CHUNK_BYTES, PPRCPair
from fastfc.durable.siteloss import SITE_FAILOVER

from .app import main, warn_problems
from .copies import moved_on_by
from .output import Progress, console, each, json_out, pair_id, plural, table
from .params import JSON, PAIR, PAIRS
from .units import interrupted, pass_units, unlocked


@main.command()
@PAIRS
@click.option("--type", "mode", type=click.Choice(["mmir", "gcp"]), required=True,
              help="Metro Mirror (synchronous) or Global Copy (asynchronous).")
@click.option("--nocp", is_flag=True, help="No initial copy: the volumes already match.")
@click.option("--wait", is_flag=True, help="Do the initial copy now, with a progress bar.")
@JSON
@pass_units
def mkpprc(units, specs, mode, nocp, wait, as_json) -> None:
    """Establish PPRC pairs PRIMARY:SECONDARY (secondaries in --remote-unit).

    The initial copy (and, for Global Copy, the host writes) are sent in
    the background while fastfc serve runs for the unit, with no other
    command; without a server only while a command sends (--wait,
    resumepprc --wait), as the output says."""
    local, remote = units.local(), units.remote()
    vols = [(local.volume(a), remote.volume(b)) for a, b in specs]
    pairs = []
    for a, b in vols:
        # a server's drivers start the pair's agent when the command ends
        # (.copies); a process that serves nothing has no thread to leave
        pairs.append(PPRCPair(a, b, mode=mode, initial_copy=not nocp, background=False))
        _say(as_json, f"established PPRC pair {pair_id(pairs[-1])} ({mode}): "
                      f"{plural(pairs[-1].out_of_sync_tracks, 'track')} to copy")
    if wait:
        _send_now(pairs, "initial copy done", as_json)
    _moving_on(units, pairs, as_json)


@main.command()
@click.argument("specs", nargs=-1, type=PAIR)
@JSON
@pass_units
def lspprc(units, specs, as_json) -> None:
    """List PPRC pairs of the open units (or the PRIMARY:SECONDARY ones)."""
    warn_problems(units, "pair")
    if specs:
        pairs = [units.pair(*s) for s in specs]
    else:
        pairs = [p for u in units.all() for p in u.pairs]
    # pairs a unit records whose secondary unit could not be opened
    away = [] if specs else [(u, row) for u in units.all() for row in u.pair_records]
    # pairs of sessions whose primary unit could not be opened (their rows
    # are in the primary's unit): what the session's secondary knows of them
    lost = [] if specs else [(u, t) for u in units.all() for name in u.store.session_rows()
                             if name not in u.sessions
                             for t in u.session_record(name)["triplets"]]
    # plain pairs whose primary unit could not be opened: what each
    # secondary's unit records of them
    alone = [] if specs else [(u, r) for u in units.all() for r in u.secondary_records]
    if as_json:
        json_out([{"id": pair_id(p), "primary": p.primary.name, "secondary": p.secondary.name,
                   "state": p.state.value, "mode": p.mode.value,
                   "out_of_sync": p.out_of_sync_tracks, "reason": p.suspend_reason,
                   "primary_unit": str(p.primary.unit.path),
                   "secondary_unit": str(p.secondary.unit.path), **_moved(units, p)}
                  for p in pairs]
                 + [{"id": f"{row['primary_name']}:{row['secondary_name']}",
                     "primary": row["primary_name"], "secondary": row["secondary_name"],
                     "state": _away_state(row), "mode": row["mode"],
                     "out_of_sync": _away_oos(row), "reason": _away_reason(row),
                     "primary_unit": str(u.path),
                     "secondary_unit": row["secondary_unit"]} for u, row in away]
                 + [{"id": f"{t['a']}:{t['b']}", "primary": t["a"], "secondary": t["b"],
                     "state": "unknown", "mode": "gcp", "out_of_sync": None,
                     "reason": "primary unit not available", "primary_unit": t["a_unit"],
                     "secondary_unit": str(u.path)} for u, t in lost]
                 + [{"id": _alone_id(r), "primary": r["primary_name"],
                     "secondary": r["secondary_name"], "state": "unknown", "mode": r["mode"],
                     "out_of_sync": None, "reason": _alone_reason(r),
                     "primary_unit": r["primary_unit"], "secondary_unit": str(u.path)}
                    for u, r in alone])
        return
    t = table("ID", "State", "Type", "Out of sync", "Reason", "Primary unit",
              "Secondary unit")
    for p in pairs:
        t.add_row(pair_id(p), p.state.value, p.mode.value, str(p.out_of_sync_tracks),
                  p.suspend_reason or "-", p.primary.unit.path.name,
                  p.secondary.unit.path.name)
    for u, row in away:
        oos = _away_oos(row)
        t.add_row(f"{row['primary_name']}:{row['secondary_name']}", _away_state(row),
                  row["mode"], "?" if oos is None else str(oos), _away_reason(row),
                  u.path.name, row["secondary_unit"])
    for u, tr in lost:
        t.add_row(f"{tr['a']}:{tr['b']}", "unknown", "gcp", "?",
                  "primary unit not available", tr["a_unit"], u.path.name)
    for u, r in alone:
        t.add_row(_alone_id(r), "unknown", r["mode"] or "?", "?", _alone_reason(r),
                  r["primary_unit"], u.path.name)
    console().print(t if t.rows else "no PPRC pairs")


def _alone_id(rec: dict) -> str:
    return f"{rec['primary_name'] or '?'}:{rec['secondary_name']}"


def _alone_reason(rec: dict) -> str:
    if rec["primary_name"] is None:
        return ("secondary of an unknown pair (made before secondaries recorded their pair); "
                "primary unit not available")
    return "primary unit not available"


def _alone(units, specs) -> tuple[list, dict]:
    """Split ``specs`` into those naming a live pair and those naming a
    pair the local unit knows only as its secondary, its primary's unit not
    available (:attr:`StorageUnit.secondary_records`), by secondary name.
    Such a pair is named A:B, or B:A (DS8000: at the secondary, the pair
    B->A that failover makes)."""
    recs = {r["secondary_name"]: r for r in units.local().secondary_records}
    live, alone = [], {}
    for a, b in specs:
        for x, y in ((a, b), (b, a)):
            r = recs.get(y)
            if r is not None and r["primary_name"] in (x, None):
                alone[y] = r
                break
        else:
            live.append((a, b))
    return live, alone


def _away_state(row: dict) -> str:
    return "suspended" if row["suspend_reason"] == SITE_FAILOVER else "unknown"


def _away_oos(row: dict) -> int | None:
    """A B failed over at the secondary alone counts its changed tracks."""
    return row["out_of_sync"] if row["suspend_reason"] == SITE_FAILOVER else None


def _away_reason(row: dict) -> str:
    if row["suspend_reason"] == SITE_FAILOVER:
        return f"{SITE_FAILOVER}; secondary unit away"
    return "secondary unit not available"


@main.command()
@PAIRS
@pass_units
def pausepprc(units, specs) -> None:
    """Suspend pairs: writes are recorded out of sync, nothing is sent."""
    each([units.pair(*s) for s in specs], lambda p: p.suspend("host"),
         lambda p, _: f"suspended {pair_id(p)}")


@main.command()
@PAIRS
@click.option("--wait", is_flag=True, help="Resync the out-of-sync tracks now.")
@JSON
@pass_units
def resumepprc(units, specs, wait, as_json) -> None:
    """Resume suspended pairs; --wait sends their out-of-sync tracks now
    (in fastfc serve they are sent in the background anyway)."""
    pairs = each([units.pair(*s) for s in specs], lambda p: p.resume(),
                 lambda p, _: None if as_json else f"resumed {pair_id(p)}: "
                 f"{plural(p.out_of_sync_tracks, 'track')} out of sync")
    if wait:
        _send_now(pairs, "resync done", as_json)
    _moving_on(units, pairs, as_json)


@main.command()
@PAIRS
@pass_units
def failoverpprc(units, specs) -> None:
    """Make secondaries usable primaries (their writes are recorded).

    At a secondary's unit alone (-u), its primary's unit lost, A:B (or B:A)
    makes B a suspended primary of B:A recording every track it changes;
    when A's unit is back, failbackpprc A:B resyncs only the changed
    tracks."""
    live, alone = _alone(units, specs)
    pairs = [units.pair(*s) for s in live]
    local = units.local()
    for b, r in alone.items():
        row = local.failover_pair(b)
        click.echo(f"failed over {r['primary_name']}:{b} at {local.path.name} alone (the "
                   f"primary's unit {r['primary_unit']} is not available): {b} accepts host "
                   f"writes, recorded as pair {b}:{row['secondary_name']} for failbackpprc "
                   f"{r['primary_name']}:{b} when that unit is back")
    each(pairs, lambda p: p.failover(),
         lambda p, _: f"failed over {pair_id(p)}: {p.secondary.name} accepts host writes")


@main.command()
@PAIRS
@click.option("--wait", is_flag=True, help="Send the changed tracks now.")
@JSON
@pass_units
def failbackpprc(units, specs, wait, as_json) -> None:
    """After failoverpprc: mirror the other way (SECONDARY to PRIMARY).

    The tracks changed on either side since the failover are sent from the
    former secondary: writes made on the former primary since then (and,
    after recovergmir, since the session's last consistency group) are
    overwritten by the former secondary's data."""
    pairs = each([units.pair(*s) for s in specs], lambda p: p.failback(),
                 lambda p, _: None if as_json else f"failed back: pair {pair_id(p)}, "
                              f"{plural(p.out_of_sync_tracks, 'track')} to send; "
                              f"on them {p.secondary.name} takes {p.primary.name}'s data: "
                              f"writes made on {p.secondary.name} since the failover "
                              "are overwritten")
    if wait:
        _send_now(pairs, "resync done", as_json)
    _moving_on(units, pairs, as_json)


@main.command()
@PAIRS
@click.option("--force", is_flag=True,
              help="End pairs with tracks out of sync too (that record is lost).")
@pass_units
def rmpprc(units, specs, force) -> None:
    """End pairs: the secondaries accept host writes again.

    A pair with tracks out of sync is refused unless --force: its secondary
    lacks the latest writes to them (it holds no one image of the primary)
    and the record of which tracks those are would be lost.

    B:A of a B failed over by recovergmir, its old primary's unit away,
    needs --force: it forgets the tracks B changed (the old primary lost for
    good; failbackpprc is then impossible) and frees B.

    A:B at the unit of B alone, A's unit lost for good (not failed over),
    needs --force too: B holds what A last sent (a Global Copy pair's
    latest writes may never have come) and takes host writes again. A
    secondary of a pair made before secondaries recorded their pair (lspprc
    shows ?:B) is named with any primary name.

    A pair the unit could not restore (a volume or bitmap file missing:
    lspprc names it) needs --force: its row goes, and its secondary, if
    its unit is open, takes host writes again."""
    local = units.local()
    damaged = [tuple(s) for s in specs if f"pair {s[0]}:{s[1]}" in local.relationship_problems]
    if damaged and not force:
        a, b = damaged[0]
        raise click.ClickException(
            f"pair {a}:{b} is not restored ({local.relationship_problems[f'pair {a}:{b}']}); "
            f"rmpprc --force {a}:{b} removes its row")
    for a, b in damaged:
        local.remove_pair(a, b)
        click.echo(f"removed pair {a}:{b}, which was not restored")
    specs = [s for s in specs if tuple(s) not in damaged]
    live, alone = _alone(units, specs)
    for b, r in alone.items():
        if not force:
            raise click.ClickException(
                f"pair {_alone_id(r)}: the unit of its primary ({r['primary_unit']}) is not "
                f"available, and {b} may lack writes it never sent; rmpprc --force "
                f"{_alone_id(r).replace('?', 'A')} frees {b} for good (or failoverpprc, "
                "to resync incrementally when that unit is back)")
    specs = live
    local = units.local()
    failed = {(r["primary_name"], r["secondary_name"]): r for r in local.pair_records
              if r["suspend_reason"] == SITE_FAILOVER}
    lost = [s for s in specs if tuple(s) in failed]
    for b, a in lost:
        if not force:
            raise click.ClickException(
                f"pair {b}:{a} records {plural(failed[(b, a)]['out_of_sync'], 'track')} "
                f"changed on {b} since its site-loss recovery, for failbackpprc when the "
                f"unit of {a} is back; rmpprc --force forgets them (that unit lost for good)")
    pairs = [units.pair(*s) for s in specs if tuple(s) not in failed]
    for p in pairs:
        gm = units.session_of(p)
        if gm is not None:
            raise click.ClickException(f"pair {pair_id(p)} belongs to Global Mirror session "
                                       f"{gm.name}; use rmgmir")
        oos = p.out_of_sync_tracks
        if oos and not force:
            raise click.ClickException(
                f"pair {pair_id(p)} has {oos} tracks out of sync: {p.secondary.name} lacks "
                f"the latest writes to them, and removing the pair loses the record of "
                f"which; resumepprc --wait {pair_id(p)} first, or rmpprc --force")
    for b, a in lost:
        n = local.forget_failover(b)
        click.echo(f"removed pair {b}:{a}: {b} no longer records its changes for {a}, whose "
                   f"unit is not available ({plural(n, 'track')} forgotten)")
    for b, r in alone.items():
        local.release_secondary(b)
        click.echo(f"removed pair {_alone_id(r)} at {local.path.name} alone: {b} accepts "
                   f"host writes (the primary's unit {r['primary_unit']} is not available)")
    each(pairs, lambda p: p.remove(), lambda p, _: f"removed pair {pair_id(p)}")


# -- sending in the foreground ---------------------------------------------------------
def _send_now(pairs: list[PPRCPair], done: str, as_json: bool = False) -> None:
    """--wait: send the pairs' out-of-sync tracks now and say how they stand."""
    drain_in_foreground(pairs)
    _say(as_json, f"{done}: " + ", ".join(f"{pair_id(p)} {p.state.value}" for p in pairs))


def _say(as_json: bool, line: str) -> None:
    """A line of a command's human output (none with --json)."""
    if not as_json:
        click.echo(line)


def _moved(units, pair: PPRCPair) -> dict:
    """What moves ``pair``'s copy on, as --json says it: ``moved_on_by``
    ("server", "session" or null: nothing, until a command or a server
    sends) and ``note`` (that in words; null when nothing is to send)."""
    by, note = moved_on_by(pair, units.copies, units.open.values())
    return {"moved_on_by": by, "note": note}


def _moving_on(units, pairs: list[PPRCPair], as_json: bool) -> None:
    """After a command that leaves tracks to send: what sends them (a line
    per pair, or the JSON rows)."""
    if as_json:
        json_out([{"id": pair_id(p), "state": p.state.value, "mode": p.mode.value,
                   "out_of_sync": p.out_of_sync_tracks, "reason": p.suspend_reason,
                   **_moved(units, p)} for p in pairs])
        return
    for p in pairs:
        by, note = moved_on_by(p, units.copies, units.open.values())
        if note is not None and by != "session":
            click.echo(f"{pair_id(p)}: {note}")


def drain_in_foreground(pairs: list[PPRCPair]) -> int:
    """Send every out-of-sync track of ``pairs`` now, with progress on
    stderr. Returns the bytes sent. In a server: other commands run
    meanwhile, and its client's Ctrl-C stops it between steps."""
    sent = 0
    with unlocked(), Progress() as progress:
        for pair in pairs:
            total = pair.out_of_sync_tracks
            task = progress.add(pair_id(pair), total, size=pair.primary.track_size)
            while pair.out_of_sync_tracks and pair.suspend_reason is None:
                if interrupted():
                    raise click.ClickException(
                        f"stopped (Ctrl-C): pair {pair_id(pair)} has "
                        f"{plural(pair.out_of_sync_tracks, 'track')} left to send")
                n = pair.drain(4 * SEND_CHUNK_BYTES)
                if not n:
                    break
                sent += n
                progress.update(task, total - pair.out_of_sync_tracks)
            if pair.suspend_reason is not None:
                raise click.ClickException(f"pair {pair_id(pair)} suspended during the copy: "
                                           f"{pair.suspend_reason}")
    return sent
