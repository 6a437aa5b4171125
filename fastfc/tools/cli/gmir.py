"""Global Mirror: mkgmir, lsgmir, showgmir, chgmir, resumegmir and
pausegmir (the session's loop in a server), formcg (CGs in the foreground),
rmgmir, recovergmir (site loss), restoregmir (back to a CG from the
recovery points of the C volumes), and the session log that counts a
session's CGs across invocations."""

from __future__ import annotations

import contextlib
import json
import os
import sys
import threading
import time

import click

from fastfc.copyservices.globalmirror import Cause, GlobalMirror, GMState
from fastfc.copyservices.point_schedule import PointSchedule, point_cg
from fastfc.copyservices.pprc import PPRCPair
from fastfc.durable.siteloss import SITE_FAILOVER

from .app import main
from .output import Progress, console, human, json_out, ms, pair_id, plural, table
from .params import JSON, SESSION, TRIPLET, Count, Real
from .pprc import drain_in_foreground
from .units import interrupted, pass_units, unlocked


class _Threshold(Real):
    """Seconds of RPO, or ``off`` (0): an RPO alert threshold."""

    name = "seconds"

    def convert(self, value, param, ctx):
        if isinstance(value, str) and value.strip().lower() == "off":
            return 0.0
        return super().convert(value, param, ctx)


RPO_ALERT = _Threshold(min=0, max=30 * 86400)


def _points_options(command):
    """The options of a session's schedule of recovery points of its C
    volumes (mkgmir, chgmir)."""
    for option in reversed((
            click.option("--points-every-cgs", type=Count(low=1), default=None, metavar="N",
                         help="Take a recovery point of every C volume (one instant) after "
                              "every N-th committed CG."),
            click.option("--points-every-seconds", type=Real(min=0, min_open=True,
                                                             max=365 * 86400),
                         default=None, metavar="SECONDS",
                         help="... or after the first CG committed SECONDS after the last "
                              "take."),
            click.option("--points-retain", type=Real(min=0, max=100 * 365 * 86400),
                         default=None, metavar="SECONDS",
                         help="Seconds each scheduled point is immutable (without "
                              "--points-keep: then it expires)."),
            click.option("--points-keep", type=Count(low=1), default=None, metavar="K",
                         help="Keep at most K scheduled points per C (the oldest expire "
                              "once retained long enough)."))):
        command = option(command)
    return command


def _schedule(current: PointSchedule | None, every_cgs, every_seconds, retain,
              keep) -> PointSchedule | None:
    """The schedule the options give (over ``current``: options not given
    keep its values), or None if no option is given."""
    if every_cgs is None and every_seconds is None and retain is None and keep is None:
        return None
    base = current.to_record() if current is not None else {}
    if every_cgs is not None or every_seconds is not None:
        base["every_cgs"], base["every_seconds"] = every_cgs, every_seconds
    if retain is not None:
        base["retain_seconds"] = retain
    if keep is not None:
        base["keep"] = keep
    try:
        return PointSchedule(every_cgs=base.get("every_cgs"),
                             every_seconds=base.get("every_seconds"),
                             retain_seconds=base.get("retain_seconds", 0.0),
                             keep=base.get("keep"))
    except (TypeError, ValueError) as e:
        raise click.UsageError(f"recovery point schedule: {e} (--points-every-cgs or "
                               "--points-every-seconds, and --points-keep or "
                               "--points-retain)") from None


@main.command()
@click.argument("session", type=SESSION)
@click.argument("specs", nargs=-1, required=True, type=TRIPLET)
@click.option("--cg-interval", type=Real(min=0, max=86400), default=0.0,
              show_default=True,
              help="Seconds between CGs in the session's loop (resumegmir, formcg --seconds).")
@click.option("--coord-time", type=Real(min=0, min_open=True, max=60000),
              default=50.0, show_default=True,
              help="Longest hold of host writes at coordination, ms.")
@click.option("--drain-time", type=Real(min=0, max=86400), default=0.0,
              show_default=True,
              help="Longest drain, seconds (0: the larger of 240 and twice the interval).")
@click.option("--decide", type=click.Choice(["after_all", "after_each"]), default="after_all",
              show_default=True, help="Decide after every prepare, or at the first failure.")
@click.option("--rpo-alert", type=RPO_ALERT, default=None, metavar="SECONDS",
              help="Alert when the RPO goes above SECONDS while a server runs the session "
                   "(a WARNING log line and a metric; 0 or off: none).")
@_points_options
@pass_units
def mkgmir(units, session, specs, cg_interval, coord_time, drain_time, decide,
           rpo_alert, points_every_cgs, points_every_seconds, points_retain,
           points_keep) -> None:
    """Create Global Mirror session SESSION over A:B:C triplets (A in --unit;
    B and C in --remote-unit).

    A triplet whose A:B is already a Global Copy pair (mkpprc --type gcp,
    the DS8000 way: make the pairs, let them copy, then the session) takes
    that pair over: no new initial copy, the tracks it already sent are not
    sent again; the first CG sends what it had not sent yet. Refused, with
    nothing changed: a pair from A to another volume, a Metro Mirror
    (mmir) pair, a suspended pair (resumepprc it first), a pair in another
    session. Other triplets get a new pair (every track sent in the first
    CG). rmgmir leaves adopted pairs as Global Copy pairs.

    --points-*: a schedule of recovery points of the C volumes (lspoint
    lists them, named SESSION@cgSEQ; chgmir changes it)."""
    schedule = _schedule(None, points_every_cgs, points_every_seconds, points_retain,
                         points_keep)
    local, remote = units.local(), units.remote()
    triplets = [(local.volume(a), remote.volume(b), remote.volume(c)) for a, b, c in specs]
    backlog = _adopted_backlog(triplets)
    GlobalMirror(triplets, name=session, cg_interval=cg_interval,
                 max_coordination_time=coord_time / 1e3, max_drain_time=drain_time,
                 decide=decide, adopt=True, points=schedule)
    if rpo_alert:
        units.session_unit(session)[0].configure_session(session, rpo_alert=rpo_alert)
    for ident, tracks in backlog.items():
        click.echo(f"adopted Global Copy pair {ident}: {plural(tracks, 'track')} out of sync "
                   "(no initial copy)")
    click.echo(f"created Global Mirror session {session}: {plural(len(triplets), 'triplet')}; "
               "formcg forms its consistency groups (resumegmir, under fastfc serve)")
    if schedule is not None:
        click.echo(f"recovery points of its C volumes: {schedule.describe()}")


def _adopted_backlog(triplets) -> dict[str, int]:
    """The pairs a new session over ``triplets`` takes over (A the primary
    of a pair), by PRIMARY:SECONDARY, with the tracks each has yet to send."""
    return {pair_id(a.mirror): a.mirror.out_of_sync_tracks for a, _, _ in triplets
            if isinstance(a.mirror, PPRCPair) and a.mirror.active}


@main.command()
@click.argument("session", type=SESSION)
@JSON
@click.option("--watch", type=Real(min=0.05, max=86400), is_flag=False, flag_value=1.0,
              default=None, metavar="[SECONDS]",
              help="Show it again every SECONDS (default 1) until Ctrl-C: redrawn in place "
                   "on a terminal, else one table (with --json, one JSON line) each time.")
@pass_units
def showgmir(units, session, as_json, watch) -> None:
    """Show a Global Mirror session: CG sequence, C sequences, state, the
    loop (running in a server, paused), CGs per second (since its loop
    started in this server; with --watch also since the last redraw), RPO
    now and its p50/p99 (the RPO after each attempt, while its loop runs
    in this server), the
    last failed attempt and its cause, bytes sent to B, the RPO alert
    threshold (mkgmir/chgmir --rpo-alert) and whether it is alerting.

    At the secondary unit alone (the primary unit away), what the secondary
    records, with each A's unit named as missing.

    --watch ends on Ctrl-C (status 0), and when the server running it
    (a forwarded command) stops."""
    if watch is None:
        _show(units, session, as_json)
        return
    stopping = units.stopping
    out = console()
    last: tuple[float, int] | None = None
    try:
        with contextlib.ExitStack() as stack:
            live = None
            if out.is_terminal and not as_json:
                from rich.live import Live
                live = stack.enter_context(Live(console=out, auto_refresh=False))
            while True:
                info = _session_info(units, session)
                now = time.monotonic()
                if last is not None and info.get("successes") is not None and now > last[0]:
                    info["cg_per_second_recent"] = (info["successes"] - last[1]) / (now - last[0])
                    info["recent_seconds"] = now - last[0]
                if info.get("successes") is not None:
                    last = (now, info["successes"])
                if as_json:
                    click.echo(json.dumps(_public(info)))
                elif live is not None:
                    live.update(_render(info), refresh=True)
                else:
                    out.print(_render(info))
                    click.echo()
                sys.stdout.flush()
                if stopping is not None:
                    # between redraws the server's command lock is let go:
                    # a watch never holds other commands back
                    with unlocked():
                        ended = stopping.wait(watch)
                    if interrupted():       # the client's Ctrl-C: how a watch ends
                        return
                    if ended:
                        # the client hung up (this line goes nowhere), or the
                        # server stops
                        click.echo("showgmir --watch ends: the server holding the unit "
                                   "stops", err=True)
                        return
                else:
                    time.sleep(watch)
    except KeyboardInterrupt:       # Ctrl-C: how a watch ends
        return


def _show(units, session: str, as_json: bool) -> None:
    info = _session_info(units, session)
    if as_json:
        json_out(_public(info))
        return
    console().print(_render(info))
    if info["away"]:
        click.echo(f"with the primary lost for good: recovergmir {info['session']} makes the "
                   "B volumes host-writable at the last consistency group; or rmgmir "
                   f"{info['session']} [--force] ends the session here, each B staying the "
                   "secondary of its recorded pair")


#: what showgmir --json leaves out of what _session_info gathers
_PRIVATE = ("away", "away_rows", "loop_text", "recent_seconds", "rpo_samples_count")


def _public(info: dict) -> dict:
    return {k: v for k, v in info.items() if k not in _PRIVATE}


def _session_info(units, session: str) -> dict:
    """Everything showgmir shows of ``session``, as --json gives it (plus
    what only the table uses: :data:`_PRIVATE`)."""
    away = units.session_away(session)
    if away is not None:
        return _away_info(away)
    unit, gm = units.session_unit(session)
    rec = unit.session_settings(gm.name)
    loop = _loop_state(units, unit, gm, rec)
    log = gm.stats.to_record()   # every attempt ever made: the store keeps them
    seqs = gm.c_sequences
    when = log["last_cg_time"]
    # the samples of this process: shown for the loop running here (a run
    # elsewhere, or a formcg ended, would make it differ from a direct run's)
    rpo = gm.stats.rpo_percentiles() if loop["here"] else None
    alert = units.loops.alert(gm) if loop["here"] and units.loops is not None else None
    return {
        "session": gm.name, "state": gm.state.value, "fatal_reason": gm.fatal_reason,
        "loop": loop["state"], "resumes_when_served": loop["resumes_when_served"],
        "cg_per_second": loop["cg_per_second"], "cg_per_second_recent": None,
        "cg_sequence": max(seqs), "c_sequences": seqs,
        "cg_interval": gm.cg_interval, "max_coordination_time": gm.max_coordination_time,
        "max_drain_time": gm.max_drain_time, "attempts": log["attempts"],
        "successes": log["successes"], "failures": log["failures"],
        "commit_failures_resolved": log["commit_failures_resolved"],
        "last_cg_time": when, "rpo": None if when is None else time.time() - when,
        "rpo_p50": None if rpo is None else rpo["p50"],
        "rpo_p99": None if rpo is None else rpo["p99"],
        "last_failure": log["last_failure"],
        "rpo_alert": rec["rpo_alert"],
        "rpo_alerting": None if alert is None or rec["rpo_alert"] is None else alert.alerting,
        "rpo_alerts": None if alert is None else alert.alerts,
        "bytes_drained": log["bytes_drained"],
        "out_of_sync": sum(tr.pair.out_of_sync_tracks for tr in gm.triplets),
        "triplets": [{"a": tr.a.name, "b": tr.b.name, "c": tr.c.name,
                      "pair_state": tr.pair.state.value,
                      "out_of_sync": tr.pair.out_of_sync_tracks,
                      "c_sequence": tr.fc.sequence} for tr in gm.triplets],
        "away": False, "loop_text": _loop_text(loop),
        "rpo_samples_count": len(gm.stats.rpo_samples),
        "points": _points_info(gm, unit)}


def _points_info(gm: GlobalMirror, unit) -> dict | None:
    """The session's schedule of recovery points of its C volumes, with what
    it holds (its points of the first C: every C holds the same CGs; None
    from a unit opened read-only, which does not load its points)."""
    status = gm.point_status
    if status is None:
        return None
    if unit.readonly:
        return {**status, "held": None, "oldest_cg": None, "newest_cg": None}
    held = [cg for cg in (point_cg(p.name) for p in gm.scheduled_points())
            if cg is not None]
    return {**status, "held": len(held), "oldest_cg": min((q for _, q in held), default=None),
            "newest_cg": max((q for _, q in held), default=None)}


def _points_text(info: dict) -> str:
    pts = info.get("points")
    if pts is None:
        return "none (mkgmir or chgmir --points-every-cgs N / --points-every-seconds T)"
    text = pts["describe"]
    if pts["held"] is None:
        text += " (lspoint lists the points)"
    else:
        text += f"; {plural(pts['held'], 'point')} per C"
    if pts["held"]:
        text += f" (CG {pts['oldest_cg']} .. {pts['newest_cg']})"
    if pts["error"]:
        text += f"; last failure: {pts['error']}"
    return text


def _when(t: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(t))


def _render(info: dict):
    """The property table and the triplets of a session (``_session_info``)."""
    from rich.console import Group
    seqs = info["c_sequences"]
    t = table("Property", "Value", show_header=False)
    t.add_row("Session", info["session"])
    if info["away"]:
        t.add_row("State", "primary unit(s) not available: " + "; ".join(info["primary_units"]))
    else:
        t.add_row("State", info["state"] + (f" ({info['fatal_reason']})"
                                            if info["fatal_reason"] else ""))
        t.add_row("Loop", info["loop_text"])
    t.add_row("Triplets", str(len(info["triplets"])))
    t.add_row("CG sequence", str(info["cg_sequence"]))
    t.add_row("C sequences", str(seqs[0]) if len(set(seqs)) == 1 else " ".join(map(str, seqs)))
    if info["away"]:
        if info["attempts"] is not None:
            t.add_row("CG attempts", str(info["attempts"]))
            t.add_row("Successful CGs", str(info["successes"]))
        if info["last_failure"]:
            t.add_row("Last failure", _failure_text(info["last_failure"]))
        rows = info["away_rows"]
    else:
        t.add_row("CG interval", f"{info['cg_interval']:g} s")
        t.add_row("Max coordination time", f"{info['max_coordination_time'] * 1e3:g} ms")
        t.add_row("Max drain time", f"{info['max_drain_time']:g} s"
                  if info["max_drain_time"] else "default")
        t.add_row("CG attempts", str(info["attempts"]))
        t.add_row("Successful CGs", str(info["successes"]))
        t.add_row("Failed CGs", ", ".join(f"{k} {v}" for k, v in sorted(info["failures"].items()))
                  or "0")
        t.add_row("Commit failures resolved", str(info["commit_failures_resolved"]))
        t.add_row("Last failure", _failure_text(info["last_failure"]))
        when = info["last_cg_time"]
        t.add_row("Last CG formed", "-" if when is None else _when(when))
        t.add_row("CG/s", _rate_text(info))
        t.add_row("RPO", "-" if info["rpo"] is None else f"{info['rpo']:.3f} s")
        t.add_row("RPO p50 / p99", "- (while the loop runs here)" if info["rpo_p50"] is None
                  else f"{_secs(info['rpo_p50'])} / {_secs(info['rpo_p99'])} (after each of "
                  f"the last {plural(info['rpo_samples_count'], 'attempt')} here)")
        t.add_row("RPO alert", _alert_text(info))
        t.add_row("Recovery points", _points_text(info))
        t.add_row("Sent to B", human(info["bytes_drained"]))
        t.add_row("Out of sync", plural(info["out_of_sync"], "track"))
        rows = [(tr["a"], tr["b"], tr["c"], tr["pair_state"], str(tr["out_of_sync"]),
                 str(tr["c_sequence"])) for tr in info["triplets"]]
    trips = table("A", "B", "C", "Pair state", "Out of sync", "C seq")
    for row in rows:
        trips.add_row(*row)
    return Group(t, "", trips)


def _secs(v: float) -> str:
    return f"{v * 1e3:.2f} ms" if v < 1 else f"{v:.3f} s"


def _failure_text(f: dict | None) -> str:
    if not f:
        return "none"
    return (f"{_when(f['time'])}: CG {f['sequence']} {f['cause']}"
            + (f" ({f['detail']})" if f.get("detail") else ""))


def _rate_text(info: dict) -> str:
    if info["cg_per_second"] is None:
        return "- (the loop does not run here)"
    text = f"{info['cg_per_second']:.1f} since the loop started here"
    if info.get("cg_per_second_recent") is not None:
        text += (f"; {info['cg_per_second_recent']:.1f} in the last "
                 f"{info['recent_seconds']:.1f} s")
    return text


def _alert_text(info: dict) -> str:
    if info["rpo_alert"] is None:
        return "off (mkgmir or chgmir --rpo-alert SECONDS sets one)"
    text = f"above {info['rpo_alert']:g} s"
    if info["rpo_alerting"] is None:
        return text + " (watched while a server runs the loop)"
    return text + (": ALERTING" if info["rpo_alerting"] else ": ok") + \
        f" ({plural(info['rpo_alerts'], 'alert')} in this server)"


def _loop_state(units, unit, gm: GlobalMirror, record: dict | None = None) -> dict:
    """Whether the session's loop runs in this process (a server's:
    resumegmir), what the unit records (``record``: its
    ``session_record`` or ``session_settings``, when the caller has read
    it), and its CGs per second here."""
    loops = units.loops
    here = loops is not None and loops.running(gm)
    if record is None:
        record = unit.session_record(gm.name)
    recorded = bool(record["running"])
    if gm.state is GMState.FATAL:
        state = "fatal"
    else:
        state = "running" if here else "paused"
    return {"state": state, "here": here, "recorded": recorded,
            "resumes_when_served": recorded and not here,
            "cg_per_second": loops.rate(gm) if here and loops is not None else None}


def _loop_text(loop: dict) -> str:
    if loop["here"]:
        return f"{loop['state']} in this server (pid {os.getpid()})"
    if loop["resumes_when_served"]:
        return f"{loop['state']}; recorded as running: resumes when fastfc serve holds the unit"
    return loop["state"] + ("" if loop["state"] == "fatal" else " (resumegmir starts it)")


@main.command()
@JSON
@pass_units
def lsgmir(units, as_json) -> None:
    """List the Global Mirror sessions of the unit(s): state (running in a
    server, paused, fatal), triplets, the last CG, RPO now and CGs per
    second while running.

    A session recorded as running whose unit no server holds is paused
    until fastfc serve opens the unit (then it resumes). A session over
    secondary units (fastfc.remote), recorded in the unit of its A
    volumes, is listed as "over secondary units": its primary process runs
    it, and a new one resumes it (fastfc.remote.attach)."""
    rows = []
    for u in units.all():
        for name in u.store.session_rows():
            rec = u.session_record(name)
            seqs = [t["c_sequence"] for t in rec["triplets"]]
            gm = u.sessions.get(name)
            row = {"session": name, "unit": str(u.path), "state": None,
                   "triplets": len(rec["triplets"]),
                   "cg_sequence": max((q for q in seqs if q is not None), default=None),
                   "rpo": None, "cg_per_second": None, "cg_interval": rec["cg_interval"],
                   "resumes_when_served": False}
            if gm is None:
                row["state"] = ("not restored" if name in u.session_problems
                                else "primary unavailable")
            else:
                loop = _loop_state(units, u, gm)
                row.update(state=loop["state"], cg_per_second=loop["cg_per_second"],
                           resumes_when_served=loop["resumes_when_served"])
                if loop["here"]:
                    row["rpo"] = gm.stats.rpo
            rows.append(row)
        for name, rec in u.store.site_sessions().items():
            stats = rec.get("stats") or {}
            rows.append({"session": name, "unit": str(u.path), "state": "over secondary units",
                         "triplets": len(rec["triplets"]),
                         "cg_sequence": stats.get("sequence"), "rpo": None,
                         "cg_per_second": None, "cg_interval": rec["cg_interval"],
                         "resumes_when_served": False})
    if as_json:
        json_out(rows)
        return
    t = table("Session", "State", "Triplets", "CG", "RPO", "CG/s", "Unit")
    for r in rows:
        state = r["state"] + (" (resumes when served)" if r["resumes_when_served"] else "")
        t.add_row(r["session"], state, str(r["triplets"]),
                  "-" if r["cg_sequence"] is None else str(r["cg_sequence"]),
                  "-" if r["rpo"] is None else f"{r['rpo']:.3f} s",
                  "-" if r["cg_per_second"] is None else f"{r['cg_per_second']:.1f}",
                  r["unit"])
    console().print(t)


@main.command()
@click.argument("session", type=SESSION)
@pass_units
def resumegmir(units, session) -> None:
    """Start forming consistency groups of SESSION in the server holding
    its units, until pausegmir: the session's loop runs in the server, not
    in this command, and keeps running when the server restarts (the unit
    records it). Needs fastfc serve; formcg forms CGs in the foreground."""
    unit, gm = units.session_unit(session)
    loops = units.loops
    if loops is None and units.borrowed:     # hosted by a program that is no server
        raise click.ClickException(
            f"resumegmir runs session {session}'s loop in fastfc serve; the process holding "
            f"{units.local_path} (pid {os.getpid()}) runs no session loops")
    if loops is None:
        raise click.ClickException(
            f"resumegmir runs session {session}'s loop in a server, and no server holds "
            f"{units.local_path}: start one (fastfc -u {units.local_path} serve --socket "
            f"PATH), then resumegmir {session}; or form CGs in the foreground with formcg "
            f"{session} --seconds SECONDS")
    if gm.state is GMState.FATAL and gm.clear_fatal() == GMState.FATAL.value:
        raise click.ClickException(
            f"Global Mirror session {session} is fatal ({gm.fatal_reason}) and its last "
            "consistency group could not be settled: not resumed (rmgmir --force ends it)")
    if loops.running(gm):
        if not unit.session_record(session)["running"]:
            unit.configure_session(session, running=True)
        click.echo(f"Global Mirror session {session} is already running in this server "
                   f"(CG {gm.stats.sequence}); pausegmir {session} stops it")
        return
    loops.start(gm, unit.session_record(session)["rpo_alert"])
    try:
        unit.configure_session(session, running=True)
    except BaseException:
        loops.stop(gm)
        raise
    click.echo(f"resumed Global Mirror session {session}: the server (pid {os.getpid()}) "
               f"forms its consistency groups from CG {gm.stats.sequence + 1}, and resumes "
               f"them when it restarts; pausegmir {session} stops it")


@main.command()
@click.argument("session", type=SESSION)
@pass_units
def pausegmir(units, session) -> None:
    """Stop forming consistency groups of SESSION (after the CG in flight):
    the session stays defined, every C volume on its last committed CG, and
    does not resume when a server opens the unit. resumegmir starts it
    again."""
    unit, gm = units.session_unit(session)
    loops = units.loops
    here = loops is not None and loops.running(gm)
    recorded = unit.session_record(session)["running"]
    if not here and not recorded:
        click.echo(f"Global Mirror session {session} is already paused")
        return
    if here:
        assert loops is not None
        loops.stop(gm)
    if recorded:
        unit.configure_session(session, running=False)
    seqs = gm.c_sequences
    at = (f"every C volume at CG {seqs[0]}" if len(set(seqs)) == 1
          else f"C sequences {' '.join(map(str, seqs))}")
    click.echo(f"paused Global Mirror session {session}: {at}"
               + ("" if here else " (no server ran it: it no longer resumes when served)"))


@main.command()
@click.argument("session", type=SESSION)
@click.argument("cg", type=Count(low=1))
@click.option("--quiesced", is_flag=True,
              help="Say that no host writes reach the A volumes (required).")
@pass_units
def restoregmir(units, session, cg, quiesced) -> None:
    """Put SESSION back to consistency group CG from the recovery points it
    holds of every C volume at that CG (lspoint lists them, named
    SESSION@cgCG): each A volume is written where it may differ from its
    C's point, and the next CG (formcg, resumegmir) carries the image on to
    every B and C. The session must be paused (pausegmir) and the A
    volumes quiesced. Every point keeps its image."""
    if not quiesced:
        raise click.UsageError("restoregmir writes the A volumes: stop their host writes and "
                               "say so with --quiesced")
    unit, gm = units.session_unit(session)
    if (units.loops is not None and units.loops.running(gm)) or \
            unit.session_record(session)["running"]:
        raise click.ClickException(f"session {session} is running: pausegmir {session} first")
    written = gm.restore_point(cg, quiesced=True)
    click.echo(f"restored Global Mirror session {session} to CG {cg}: "
               f"{plural(written, 'grain')} written onto its A volumes; the next CG carries "
               "them to B and C")


@main.command()
@click.argument("session", type=SESSION)
@click.option("--cg-interval", type=Real(min=0, max=86400), default=None,
              help="Seconds between CGs in the session's loop.")
@click.option("--coord-time", type=Real(min=0, min_open=True, max=60000), default=None,
              help="Longest hold of host writes at coordination, ms.")
@click.option("--drain-time", type=Real(min=0, max=86400), default=None,
              help="Longest drain, seconds (0: the larger of 240 and twice the interval).")
@click.option("--rpo-alert", type=RPO_ALERT, default=None, metavar="SECONDS",
              help="Alert when the RPO goes above SECONDS while a server runs the session "
                   "(0 or off: no alert).")
@_points_options
@click.option("--no-points", is_flag=True,
              help="Stop taking recovery points of the C volumes (those held stay).")
@pass_units
def chgmir(units, session, cg_interval, coord_time, drain_time, rpo_alert, points_every_cgs,
           points_every_seconds, points_retain, points_keep, no_points) -> None:
    """Change the intervals and bounds of SESSION (as mkgmir sets them),
    its RPO alert threshold and its schedule of recovery points (the
    --points-* options not given keep their values), recorded in its unit.
    A running session uses them from its next CG (the alert from the
    server's next look)."""
    given_points = any(v is not None for v in (points_every_cgs, points_every_seconds,
                                                points_retain, points_keep))
    if (cg_interval is None and coord_time is None and drain_time is None and rpo_alert is None
            and not given_points and not no_points):
        raise click.UsageError("give at least one of --cg-interval, --coord-time, "
                               "--drain-time, --rpo-alert, --points-*, --no-points")
    if no_points and given_points:
        raise click.UsageError("--no-points and --points-* contradict each other")
    unit, gm = units.session_unit(session)
    old_points = gm.point_schedule
    new_points = _schedule(old_points, points_every_cgs, points_every_seconds, points_retain,
                           points_keep)
    before = (gm.cg_interval, gm.max_coordination_time, gm.max_drain_time,
              unit.session_record(session)["rpo_alert"])
    rec = unit.configure_session(session, cg_interval=cg_interval,
                                 max_coordination_time=None if coord_time is None
                                 else coord_time / 1e3, max_drain_time=drain_time,
                                 rpo_alert=rpo_alert,
                                 points=False if no_points else new_points)
    if units.loops is not None and rpo_alert is not None:
        units.loops.set_rpo_alert(gm, rec["rpo_alert"])
    said = []
    for what, old, new, show in (
            ("CG interval", before[0], gm.cg_interval, lambda v: f"{v:g} s"),
            ("max coordination time", before[1], gm.max_coordination_time,
             lambda v: f"{v * 1e3:g} ms"),
            ("max drain time", before[2], gm.max_drain_time,
             lambda v: f"{v:g} s" if v else "default"),
            ("RPO alert", before[3], rec["rpo_alert"],
             lambda v: f"above {v:g} s" if v else "off"),
            ("recovery points", old_points, gm.point_schedule,
             lambda v: v.describe() if v is not None else "none")):
        if old != new:
            said.append(f"{what} {show(new)} (was {show(old)})")
    running = units.loops is not None and units.loops.running(gm)
    click.echo(f"changed Global Mirror session {session}: "
               + ("; ".join(said) or "nothing (the values are the same)")
               + ("; the running loop uses them from its next CG" if running and said else ""))


@main.command()
@click.argument("session", type=SESSION)
@click.option("--count", type=Count(low=1), default=1, show_default=True,
              help="Consistency groups to attempt, one after another.")
@click.option("--seconds", type=Real(min=0, min_open=True, max=7 * 86400),
              help="Instead of --count: run the session's continuous loop this long.")
@click.option("--inject", "injects", multiple=True, metavar="POINT[:VOLUME]",
              help="Arm a fault for these attempts (fastfc.faults): prepare, commit or "
                   "revert of a B volume; coordinate; drain of an A volume. Repeatable.")
@pass_units
def formcg(units, session, count, seconds, injects) -> None:
    """Form consistency groups: first send the out-of-sync backlog as Global
    Copy (progress on stderr), then attempt CGs. Each attempt is counted for
    showgmir as soon as it ends. Exits with status 1 when the last attempt
    failed."""
    from fastfc import faults
    gm = units.session(session)
    if units.loops is not None and units.loops.running(gm):
        raise click.ClickException(
            f"Global Mirror session {session} runs in this server (resumegmir): its loop "
            f"forms the consistency groups; pausegmir {session} first to form them with "
            "formcg (showgmir watches the loop)")
    cut_short: float | None = None
    sent = drain_in_foreground([t.pair for t in gm.triplets if t.pair.suspend_reason is None])
    gm.count_global_copy(sent)
    results: list = []
    gm.on_result = results.append   # each attempt is counted in the store as it ends
    try:
        _arm_faults(gm, injects)
        if seconds is None:
            for _ in range(count):
                gm.form_consistency_group()
        else:
            with unlocked():    # the loop runs on its own: other commands meanwhile
                cut_short = _run_loop(gm, seconds, units.stopping)
    finally:
        gm.on_result = None
        if injects:
            faults.clear()
    t = table("CG", "Result", "Coord ms", "Drain ms", "FlashCopy ms", "Drained")
    for r in results[-20:]:
        t.add_row(str(r.sequence), _result_text(r), ms(r.coordination_time),
                  ms(r.drain_time), ms(r.flash_time), human(r.bytes_drained))
    if sent:
        click.echo(f"sent {human(sent)} to B as Global Copy before the first CG")
    if len(results) > 20:
        click.echo(f"{len(results)} attempts; the last 20:")
    console().print(t)
    ok = sum(r.committed for r in results)
    click.echo(f"{ok} of {len(results)} consistency groups committed; "
               f"C volumes at CG {max(gm.c_sequences)}")
    if cut_short is not None:
        why = "stopped (Ctrl-C)" if interrupted() else \
            "the server holding the unit is stopping"
        raise click.ClickException(
            f"{why}: the loop ended after {cut_short:.1f} of {seconds:g} seconds, "
            "no CG in flight")
    last = results[-1] if results else None
    if last is not None and not last.committed:
        raise click.ClickException(f"CG {last.sequence} failed: {last.cause.value}: "
                                   f"{last.detail}")


def _away_info(rec: dict) -> dict:
    """showgmir of a session whose primary unit(s) are not available: what
    its secondary unit records."""
    log = rec["stats"] or {}
    seqs = [t["c_sequence"] for t in rec["triplets"]]   # None: a C without its FlashCopy
    missing = sorted({t["a_unit"] for t in rec["triplets"]})
    return {
        "session": rec["name"], "state": "primary unavailable", "fatal_reason": None,
        "primary_units": missing,
        "cg_sequence": max((q for q in seqs if q is not None), default=None),
        "c_sequences": seqs, "cg_interval": rec["cg_interval"],
        "max_coordination_time": rec["max_coordination_time"],
        "max_drain_time": rec["max_drain_time"], "attempts": log.get("attempts"),
        "successes": log.get("successes"), "failures": log.get("failures"),
        "commit_failures_resolved": log.get("commit_failures_resolved"),
        "last_cg_time": log.get("last_cg_time"), "rpo": None,
        "last_failure": log.get("last_failure"), "rpo_alert": rec.get("rpo_alert"),
        "bytes_drained": log.get("bytes_drained"), "out_of_sync": None,
        "triplets": [{"a": t["a"], "b": t["b"], "c": t["c"], "pair_state": "unknown",
                      "out_of_sync": None, "c_sequence": t["c_sequence"]}
                     for t in rec["triplets"]],
        "away": True, "away_rows": [
            (t["a"], t["b"], t["c"], "unknown (primary unit away)", "?",
             str(t["c_sequence"]) + (" (revertible)" if t["revertible"] else ""))
            for t in rec["triplets"]]}


@main.command()
@click.argument("session", type=SESSION)
@pass_units
def recovergmir(units, session) -> None:
    """Site loss: recover SESSION at its secondary unit alone (-u names it).

    For a primary unit lost for good. Settles a consistency group left in
    doubt (by its recorded decision), fails each B over (a suspended
    primary of B:A, recording every track it changes), fast-reverse-restores
    each C onto its B, so that B holds the last committed CG and accepts
    host writes, and ends the session (each B:C FlashCopy stays: C keeps the
    CG). When the old primary unit is back, failbackpprc A:B resyncs only
    the changed tracks from B to A."""
    unit = units.local()
    if session in unit.sessions:
        raise click.ClickException(
            f"session {session} runs with its primary unit(s) open: recovergmir is for a "
            "primary unit lost for good (use failoverpprc, or rmgmir, at a live site)")
    rec = unit.session_record(session)
    seq = unit.recover_session(session)
    failed = {r["primary_name"]: r for r in unit.pair_records
              if r["suspend_reason"] == SITE_FAILOVER}
    click.echo(f"recovered Global Mirror session {session} at {unit.path.name}: "
               f"B volumes at CG {seq}, host-writable; the session is ended")
    for t in rec["triplets"]:
        row = failed.get(t["b"])
        n = row["out_of_sync"] if row is not None else 0
        click.echo(f"  {t['b']}: restored from {t['c']} ({plural(n, 'track')} changed since "
                   f"CG {seq}); failed over from {t['a']}, recording changes for "
                   f"failbackpprc {t['a']}:{t['b']}")


def _remove_alone(unit, session: str, force: bool) -> None:
    """rmgmir at the secondary unit alone: StorageUnit.remove_session."""
    rec = unit.session_record(session)
    fcs = {t["c"]: unit.volume(t["c"]).target_relationship for t in rec["triplets"]}
    need = {c: fc.tracks_to_copy if fc is not None and fc.active else 0
            for c, fc in fcs.items()}
    cg = max((t["c_sequence"] or 0) for t in rec["triplets"]) if rec["triplets"] else 0
    cs = ", ".join(need)
    if force:
        unit.remove_session(session)
    else:
        ts = unit.volume(rec["triplets"][0]["b"]).track_size
        with Progress() as progress:
            task = progress.add(f"copying to {cs}", sum(need.values()), size=ts)
            unit.remove_session(session, copy=True,
                                on_copy=lambda done, total: progress.update(task, done))
    click.echo(f"removed Global Mirror session {session} at {unit.path.name} "
               "(its primary unit(s) not available)")
    lost = {c: n for c, n in need.items() if n}
    if force and lost:
        click.echo("invalid now (their image of CG {} was not copied from B): {}".format(
            cg, ", ".join(f"{c} ({plural(n, 'track')})" for c, n in lost.items())))
    else:
        copied = sum(need.values())
        click.echo(f"{cs} keep CG {cg}" + (f" ({plural(copied, 'track')} copied from B)"
                                           if copied else ""))
    pairs = ", ".join(f"{t['a']}:{t['b']}" for t in rec["triplets"])
    click.echo(f"the B volumes stay secondaries of their pairs ({pairs}), their primary unit "
               "away: failoverpprc or rmpprc --force at this unit fails them over or frees them")


def _result_text(r) -> str:
    if r.committed and r.cause is Cause.COMMIT_FAILED:
        return "committed (commit failure resolved)"
    return "committed" if r.committed else f"failed: {r.cause.value}"


def _arm_faults(gm: GlobalMirror, injects) -> None:
    from fastfc import faults
    vols = {v.name: v for t in gm.triplets for v in (t.a, t.b, t.c)}
    for spec in injects:
        point, _, name = spec.partition(":")
        if name and name not in vols:
            raise click.BadParameter(f"no volume {name!r} in session {gm.name}",
                                     param_hint="--inject")
        try:
            faults.inject(point, vols.get(name))
        except (ValueError, TypeError) as e:
            raise click.BadParameter(str(e), param_hint="--inject") from None


def _run_loop(gm: GlobalMirror, seconds: float, stopping: threading.Event | None
              ) -> float | None:
    """The session's loop for ``seconds``; ended early when ``stopping`` (a
    server's command, its server stopping) is set: then the seconds it ran."""
    gm.start()
    try:
        with Progress(unit="s") as progress:
            task = progress.add("forming CGs", round(seconds, 1))
            end = time.monotonic() + seconds
            while (left := end - time.monotonic()) > 0:
                if stopping is not None:
                    if stopping.wait(min(0.1, left)):
                        return seconds - max(0.0, end - time.monotonic())
                else:
                    time.sleep(min(0.1, left))
                st = gm.stats
                progress.update(task, round(seconds - max(0.0, end - time.monotonic()), 1),
                                description=f"CG {st.sequence}: {st.successes} committed")
        return None
    finally:
        gm.stop()


@main.command()
@click.argument("session", type=SESSION)
@click.option("--force", is_flag=True,
              help="Withdraw at once: C volumes that still read tracks from B turn invalid.")
@pass_units
def rmgmir(units, session, force) -> None:
    """End a Global Mirror session: remove its FlashCopies and the pairs it made.

    Every C volume keeps its image of the last committed CG: the tracks it
    still reads from its B are copied B -> C first (progress on stderr).
    --force skips that copy and leaves those C volumes invalid. Pairs the
    session adopted (mkgmir over existing Global Copy pairs) stay, Global
    Copy pairs again (rmpprc ends them); the pairs it made go. A session
    that cannot be restored (its metadata names a FlashCopy or pair that is
    gone) is removed with --force: what is left of it goes.

    At the secondary unit alone (the primary unit lost for good), the
    session ends there the same way: its record and CG decisions go, each
    B->C FlashCopy is withdrawn (C copied first, unless --force). Each B
    stays the secondary of its pair, recorded here: failoverpprc or rmpprc
    --force at this unit then fail it over or free it. (recovergmir instead
    brings the last CG back onto B.)"""
    damaged = units.damaged_session(session)
    if damaged is not None:
        if not force:
            units.session(session)      # refuses, naming the problem and rmgmir --force
        removed = damaged.remove_session(session)
        click.echo(f"removed Global Mirror session {session} (it could not be restored)"
                   + (f": {', '.join(removed)}" if removed else ""))
        return
    alone = units.session_unit_away(session)
    if alone is not None:
        _remove_alone(alone, session, force)
        return
    gm = units.session(session)
    if units.loops is not None and units.loops.running(gm):
        raise click.ClickException(
            f"Global Mirror session {session} is running (resumegmir): pausegmir {session} "
            "first, then rmgmir")
    need = gm.tracks_c_needs()
    cg = max(gm.c_sequences)
    cs = ", ".join(need)
    kept = [pair_id(t.pair) for t in gm.triplets if t.adopted]
    if force:
        gm.close(discard=True)
    else:
        ts = gm.triplets[0].b.track_size
        with Progress() as progress:
            task = progress.add(f"copying to {cs}", sum(need.values()), size=ts)
            gm.close(on_copy=lambda done, total: progress.update(task, done))
    click.echo(f"removed Global Mirror session {session}"
               + (f"; its adopted pairs stay Global Copy pairs: {', '.join(kept)}"
                  if kept else ""))
    lost = {c: n for c, n in need.items() if n}
    if force and lost:
        click.echo("invalid now (their image of CG {} was not copied from B): {}".format(
            cg, ", ".join(f"{c} ({plural(n, 'track')})" for c, n in lost.items())))
    elif need:
        copied = sum(need.values())
        click.echo(f"{cs} keep CG {cg}" + (f" ({plural(copied, 'track')} copied from B)"
                                           if copied else ""))
