"""FlashCopy: mkflash, lsflash, resyncflash, waitflash, commitflash,
revertflash, reverseflash, rmflash, and the copy in the foreground that
``--wait`` and ``waitflash`` run."""

from __future__ import annotations

import contextlib
import sys
import time

import click

from fastfc.copyservices.flashcopy import CHUNK_BYTES, MAX_SEQUENCE, FlashCopy, establish_group
from fastfc.errors import FastFCError
from fastfc.storage.volume import locked

from .app import main, warn_problems
from .copies import moved_on_by
from .output import Progress, console, each, eta, fc_id, human, json_out, plural, table
from .params import FLASH, FLASHES, JSON, SIZE, Count
from .units import interrupted, pass_units, unlocked

# A --wait whose copy would take longer than this at its --copy-rate is refused.
MAX_WAIT_SECONDS = 24 * 3600


@main.command()
@FLASHES
@click.option("--nocp", is_flag=True, help="NOCOPY: tracks move only by copy-on-write.")
@click.option("--record", is_flag=True,
              help="Change recording, for resyncflash and reverseflash (implies --persist).")
@click.option("--persist", is_flag=True, help="Keep the relationship once copied.")
@click.option("--inhibit-target-write", "--tgtinhibit", "inhibit", is_flag=True,
              help="Refuse host writes to the target.")
@click.option("--copy-rate", type=SIZE, help="Cap on background copy, bytes/s (e.g. 100M).")
@click.option("--seq", type=Count(0, MAX_SEQUENCE), default=0, show_default=True,
              help="Sequence number.")
@click.option("--wait", is_flag=True,
              help="Copy every track now (at --copy-rate, progress and ETA on stderr).")
@JSON
@pass_units
def mkflash(units, specs, nocp, record, persist, inhibit, copy_rate, seq, wait,
            as_json) -> None:
    """Establish FlashCopy SOURCE:TARGET relationships (several: at one instant).

    In COPY mode the background copy runs in fastfc serve (at --copy-rate),
    with no other command; without a server it moves on only while a
    command copies (--wait, waitflash), as the output says."""
    if wait and nocp:
        raise click.UsageError("--wait copies in COPY mode; it cannot go with --nocp")
    unit = units.local()
    vols = [(unit.volume(s), unit.volume(t)) for s, t in specs]
    if wait and copy_rate:
        _check_wait([(s.n_tracks, s.track_size, copy_rate) for s, t in vols])
    rels = establish_group(vols, background_copy=not nocp, record=record, persistent=persist,
                           inhibit_target_write=inhibit, copy_rate=copy_rate or None,
                           sequence=seq)
    for fc in rels:
        _say(as_json, f"established FlashCopy {fc_id(fc)}: sequence {fc.sequence}, "
                      f"{'NOCOPY' if nocp else 'COPY'}, "
                      f"{plural(fc.source.n_tracks, 'track')} to copy")
    if wait:
        _finish_copies(rels, as_json)
    _moving_on(units, rels, as_json, [0 if wait else fc.source.n_tracks for fc in rels])


@main.command()
@click.argument("specs", nargs=-1, type=FLASH)
@JSON
@pass_units
def lsflash(units, specs, as_json) -> None:
    """List FlashCopy relationships (all of the unit's, or SOURCE:TARGET ones)."""
    warn_problems(units, "FlashCopy")
    rels = [units.flashcopy(*s) for s in specs] if specs else units.local().flashcopies
    rels = sorted(rels, key=fc_id)
    if as_json:
        json_out([{"id": fc_id(fc), "source": fc.source.name, "target": fc.target.name,
                   "state": fc.state.value, "sequence": fc.sequence,
                   "tracks_to_copy": fc.tracks_to_copy, "tracks": fc.source.n_tracks,
                   "revertible": fc.revertible, "background_copy": fc.background_copy,
                   "record": fc.record, "persistent": fc.persistent,
                   "inhibit_target_write": fc.inhibit_target_write,
                   "copy_rate": fc.copy_rate, **_moved(units, fc)} for fc in rels])
        return
    t = table("ID", "State", "Seq", "To copy", "Revertible", "Options")
    for fc in rels:
        opts = ["COPY" if fc.background_copy else "NOCOPY"]
        opts += [o for o, on in (("record", fc.record), ("persist", fc.persistent),
                                 ("tgtinhibit", fc.inhibit_target_write)) if on]
        if fc.copy_rate:
            opts.append(f"rate {human(fc.copy_rate)}/s")
        t.add_row(fc_id(fc), fc.state.value, str(fc.sequence),
                  f"{fc.tracks_to_copy}/{fc.source.n_tracks}",
                  "yes" if fc.revertible else "no", " ".join(opts))
    console().print(t if t.rows else "no FlashCopy relationships")


@main.command()
@FLASHES
@click.option("--revertible", is_flag=True,
              help="Keep the prior image until commitflash or revertflash.")
@click.option("--seq", type=Count(0, MAX_SEQUENCE),
              help="New sequence number [default: the old one + 1].")
@click.option("--wait", is_flag=True, help="Copy the changed tracks now (COPY mode).")
@JSON
@pass_units
def resyncflash(units, specs, revertible, seq, wait, as_json) -> None:
    """Incremental re-establish: the targets take their sources' current image."""
    if wait and revertible:
        raise click.UsageError("nothing copies while revertible: --wait needs commitflash")
    rels = [units.flashcopy(*s) for s in specs]
    if wait:
        _check_wait([(_marked(fc), fc.source.track_size, fc.copy_rate)
                     for fc in rels if fc.background_copy])
    left = []
    for fc in rels:
        marked = _marked(fc)
        left.append(0 if wait else marked)
        fc.resync(revertible=revertible, sequence=seq)
        how = "revertible, " if revertible else ""
        _say(as_json, f"resynced {fc_id(fc)}: {how}sequence {fc.sequence}, "
                      f"{plural(marked, 'track')} to copy")
    if wait:
        _finish_copies([fc for fc in rels if fc.background_copy], as_json)
    _moving_on(units, rels, as_json, left)


def _marked(fc: FlashCopy) -> int:
    """The tracks a resync of ``fc`` copies (none without change recording)."""
    if not fc.record:
        return 0
    assert fc.src_changed is not None and fc.tgt_changed is not None   # record=True keeps both
    return (fc.to_copy | fc.src_changed | fc.tgt_changed).count_groups(
        fc.source.grains_per_track)


@main.command()
@FLASHES
@pass_units
def waitflash(units, specs) -> None:
    """Copy the remaining tracks of relationships now (at their copy rate,
    progress and ETA on stderr)."""
    rels = [units.flashcopy(*s) for s in specs]
    _check_wait([(fc.tracks_to_copy, fc.source.track_size, fc.copy_rate) for fc in rels],
                flag="waitflash")
    _finish_copies(rels)


@main.command()
@FLASHES
@JSON
@pass_units
def commitflash(units, specs, as_json) -> None:
    """Keep the new image of revertible relationships (the changed tracks
    then copy in the background: see mkflash)."""
    rels = [units.flashcopy(*s) for s in specs]
    left = [fc.tracks_to_copy for fc in rels]    # a revertible one copies nothing yet
    each(rels, lambda fc: fc.commit(),
         lambda fc, _: None if as_json else f"committed {fc_id(fc)}: sequence {fc.sequence}")
    _moving_on(units, rels, as_json, left)


@main.command()
@FLASHES
@pass_units
def revertflash(units, specs) -> None:
    """Return revertible relationships to their prior image."""
    each([units.flashcopy(*s) for s in specs], lambda fc: fc.revert(),
         lambda fc, _: f"reverted {fc_id(fc)}: sequence {fc.sequence}")


@main.command()
@FLASHES
@pass_units
def reverseflash(units, specs) -> None:
    """Fast reverse restore: each SOURCE takes its TARGET's image."""
    each([units.flashcopy(*s) for s in specs], lambda fc: fc.reverse_restore(),
         lambda fc, n: f"restored {fc.source.name} from {fc.target.name}: "
                       f"{plural(n, 'track')} copied")


@main.command()
@FLASHES
@click.option("--force", is_flag=True,
              help="Withdraw even with tracks left to copy (the target turns invalid).")
@pass_units
def rmflash(units, specs, force) -> None:
    """Withdraw FlashCopy relationships.

    A relationship with tracks left to copy is refused unless --force: its
    target would lose its point-in-time image (it turns invalid).

    A relationship the unit could not restore (its source, target or a
    bitmap file missing: lsflash names it) needs --force: its row goes,
    and a target whose image was incomplete stays invalid."""
    unit = units.local()
    damaged = [s for s in specs if f"FlashCopy {s[0]}:{s[1]}" in unit.relationship_problems]
    if damaged and not force:
        s, t = damaged[0]
        raise click.ClickException(
            f"FlashCopy {s}:{t} is not restored "
            f"({unit.relationship_problems[f'FlashCopy {s}:{t}']}); rmflash --force {s}:{t} "
            "removes its row")
    rels = [units.flashcopy(*s) for s in specs if s not in damaged]
    for fc in rels:       # refuse before withdrawing any
        if fc.session is not None:
            raise click.ClickException(f"FlashCopy {fc_id(fc)} belongs to Global Mirror "
                                       f"session {fc.session}; use rmgmir")
        if fc.revertible:
            raise click.ClickException(f"FlashCopy {fc_id(fc)} is revertible; "
                                       "commitflash or revertflash first")
        left = fc.tracks_to_copy
        if left and not force:
            raise click.ClickException(
                f"FlashCopy {fc_id(fc)} still has {left} tracks to copy: withdrawing it "
                f"loses {fc.target.name}'s point-in-time image ({fc.target.name} turns "
                f"invalid); waitflash {fc_id(fc)} first, or rmflash --force")
    for s, t in damaged:
        invalid = unit.remove_flashcopy(s, t)
        click.echo(f"removed FlashCopy {s}:{t}, which was not restored"
                   + (f"; {t} is invalid (its image was incomplete)" if invalid else ""))
    for fc in rels:
        left = fc.tracks_to_copy
        fc.withdraw(force=force)
        note = f"; {fc.target.name} is invalid ({plural(left, 'track')} not copied)" \
            if left else ""
        click.echo(f"withdrew {fc_id(fc)}{note}")


# -- copying in the foreground ---------------------------------------------------------
def _check_wait(copies, flag: str = "--wait") -> None:
    """Refuse a rate-capped wait that would take absurdly long.
    ``copies``: (tracks, track_size, copy_rate) of each copy."""
    seconds = sum(n * ts / rate for n, ts, rate in copies if rate)
    if seconds > MAX_WAIT_SECONDS:
        size = sum(n * ts for n, ts, rate in copies if rate)
        rate = min(r for *_, r in copies if r)
        raise click.ClickException(
            f"{flag} would copy {human(size)} at --copy-rate {human(rate)}/s for "
            f"{eta(seconds)} (more than {eta(MAX_WAIT_SECONDS)}); raise --copy-rate, or "
            "leave out --wait (the copy then runs in the background while fastfc serve "
            "runs for the unit, or waitflash later)")


def _finish_copies(rels: list[FlashCopy], as_json: bool = False) -> None:
    t = time.perf_counter()
    _copy_in_foreground(rels)
    took = time.perf_counter() - t
    for fc in rels:
        ended = "; relationship ended (not persistent)" if not fc.active else ""
        _say(as_json, f"copied {fc_id(fc)} in {took:.2f} s{ended}")


def _say(as_json: bool, line: str) -> None:
    """A line of a command's human output (none with --json)."""
    if not as_json:
        click.echo(line)


def _moved(units, fc: FlashCopy, left: int | None = None) -> dict:
    """What moves the copy of ``fc`` on, as --json says it: ``moved_on_by``
    ("server", "session" or null: nothing, until a command or a server
    copies) and ``note`` (that in words; null when nothing is left).
    ``left``: as :func:`~.copies.moved_on_by` takes it."""
    by, note = moved_on_by(fc, units.copies, left=left)
    return {"moved_on_by": by, "note": note}


def _row(units, fc: FlashCopy, left: int) -> dict:
    """What --json says of ``fc`` after a command that changed it."""
    return {"id": fc_id(fc), "state": fc.state.value, "tracks_to_copy": fc.tracks_to_copy,
            "sequence": fc.sequence, **_moved(units, fc, left)}


def _moving_on(units, rels: list[FlashCopy], as_json: bool, left: list[int]) -> None:
    """After a command that left ``left`` tracks to copy of each of
    ``rels``: what moves each on (a line per relationship with tracks
    left, or the JSON rows)."""
    if as_json:
        json_out([_row(units, fc, n) for fc, n in zip(rels, left)])
        return
    for fc, n in zip(rels, left):
        _, note = moved_on_by(fc, units.copies, left=n)
        if note is not None and fc.session is None:
            click.echo(f"{fc_id(fc)}: {note}")


def _copy_in_foreground(rels: list[FlashCopy]) -> None:
    """Finish the background copy of ``rels`` in this process, with progress
    on stderr. A relationship's ``copy_rate`` holds: a track at a time, and
    no faster than the rate allows (its worker thread may copy alongside;
    progress counts what either copied, so together they keep to the rate).
    In a server: other commands run meanwhile, and its client's Ctrl-C
    stops it between steps (what is left is said; the copy moves on in the
    background)."""
    with unlocked(), Progress() as progress:
        for fc in rels:
            total = fc.tracks_to_copy
            ts = fc.source.track_size
            rate = fc.copy_rate
            task = progress.add(fc_id(fc), total, size=ts, rate=rate)
            step = max(1, CHUNK_BYTES // ts)
            if rate:
                step = max(1, min(step, int(rate * 0.05) // ts))
            start = time.perf_counter()
            while fc.active and fc.tracks_to_copy:
                if interrupted():
                    raise click.ClickException(
                        f"stopped (Ctrl-C): {fc_id(fc)} has {plural(fc.tracks_to_copy, 'track')}"
                        " left to copy; " + (moved_on_by(fc, None)[1] or "nothing copies it"))
                if rate:
                    ahead = (total - fc.tracks_to_copy) * ts / rate \
                        - (time.perf_counter() - start)
                    if ahead > 0:
                        time.sleep(min(ahead, 0.25))
                        progress.update(task, total - fc.tracks_to_copy)
                        continue
                _copy(fc, step)
                progress.update(task, total - fc.tracks_to_copy)
            _copy(fc, 0)   # a copied relationship that is not persistent ends now


def _copy(fc: FlashCopy, tracks: int) -> None:
    """``fc.copy(tracks)``; a relationship that ended meanwhile is no error."""
    try:
        fc.copy(tracks)
    except FastFCError:
        if fc.active:
            raise


# -- the diff stream --------------------------------------------------------------------
@main.command()
@click.argument("spec", type=FLASH)
@click.option("--full", is_flag=True,
              help="Every byte of the target's image, with no resync (the first backup).")
@click.option("--resume", "resume", metavar="STATE",
              help="Send again what the state file applydiff left (IMAGE.fastfc-diff) "
                   "says is missing, from the same image.")
@click.option("-o", "--output", metavar="FILE", help="Write the stream here, not to stdout.")
@pass_units
def diffflash(units, spec, full, resume, output) -> None:
    """Write a diff stream of a FlashCopy target: resync SOURCE:TARGET
    incrementally and stream the grains the resync took in, from the
    target's new image; applydiff applies it to a copy elsewhere.

    The relationship needs change recording (mkflash --record). --full
    streams the whole image instead (no resync); --resume STATE finishes a
    stream applydiff got in part. Host writes to the source go on meanwhile
    (the target keeps its image); a host write to the target stops the
    stream."""
    from fastfc.tools import diffstream as ds
    if sum(map(bool, (full, resume))) > 1:
        raise click.UsageError("give at most one of --full and --resume")
    fc = units.flashcopy(*spec)
    if not fc.record:
        raise click.ClickException(f"{fc_id(fc)} has no change recording (mkflash --record): "
                                   "what changed is not known")
    S, T = fc.source, fc.target
    if resume:
        state = _resume_state(units, resume, fc)
        extents = ds.partial_extents(state)
        part = state["partial"]
        header = ds.Header(stream=part["stream"], source=S.name, target=T.name,
                           sequence=part["sequence"], base=part["base"], size=T.capacity,
                           grain=T.grain_size, kind=part["kind"], extents=extents)
        _unchanged_since(fc, header, "was resynced")
    elif full:
        header = ds.Header(stream=ds.new_id(), source=S.name, target=T.name,
                           sequence=fc.sequence, base=None, size=T.capacity,
                           grain=T.grain_size, kind="full", extents=ds.whole(T.capacity))
    else:
        base = fc.sequence
        fc.resync()
        seq, grains = fc.last_resync_changes
        header = ds.Header(stream=ds.new_id(), source=S.name, target=T.name, sequence=seq,
                           base=base, size=T.capacity, grain=T.grain_size,
                           kind="incremental",
                           extents=ds.extents_of(grains.runs(), T.grain_size, T.capacity))

    def read(off: int, n: int):
        data = T.read(off, n)
        _unchanged_since(fc, header, "was", (off, n))
        return data

    out = sys.stdout.buffer if output is None else None
    if out is not None and sys.stdout.isatty():
        raise click.UsageError("diffflash writes a binary stream: redirect stdout to a file "
                               "or a pipe, or give -o FILE")
    with contextlib.ExitStack() as stack:
        if out is None:
            out = stack.enter_context(open(units.where(output), "wb"))
        sent = ds.write_stream(out, header, read)
    frm = "" if header.base is None else f" from sequence {header.base}"
    click.echo(f"streamed {fc_id(fc)} ({header.kind}{', resumed' if resume else ''}): "
               f"sequence {header.sequence}{frm}, {plural(len(header.extents), 'extent')}, "
               f"{human(sent)}", err=True)


def _resume_state(units, path: str, fc: FlashCopy) -> dict:
    from fastfc.tools import diffstream as ds
    try:
        state = ds.read_state(units.where(path))
    except ds.StreamError as e:
        raise click.ClickException(str(e)) from None
    if not state.get("partial"):
        raise click.ClickException(f"{path} records no stream applied in part: "
                                   "nothing to resume")
    if (state.get("source"), state.get("target")) != (fc.source.name, fc.target.name):
        raise click.ClickException(f"{path} is a stream of {state.get('source')}:"
                                   f"{state.get('target')}, not {fc_id(fc)}")
    return state


def _unchanged_since(fc: FlashCopy, header, what: str, extent=None) -> None:
    """Refuse (before the bytes go out) a target whose image is no longer
    the stream's: resynced, withdrawn, or written by a host where the
    stream reads (``extent``, or anywhere the stream has left to send)."""
    T = fc.target
    gs = T.grain_size
    with locked((fc.source, T)):
        if not fc.active or fc.sequence != header.sequence:
            raise click.ClickException(
                f"{fc_id(fc)} {what} since the stream's resync (sequence {header.sequence}, "
                f"now {fc.sequence if fc.active else 'withdrawn'}): its image is not the "
                "stream's any more; send a full stream (diffflash --full)")
        spans = [extent] if extent is not None else header.extents
        assert fc.tgt_changed is not None      # record=True keeps it
        for off, n in spans:
            if fc.tgt_changed.any_range(off // gs, -(-(off + n) // gs)):
                raise click.ClickException(
                    f"{T.name} was written by a host at offset {off} or after, where the "
                    "stream reads: its image is not the stream's any more; send a full "
                    "stream (diffflash --full)")


@main.command()
@click.argument("image", type=click.Path(dir_okay=False))
@click.option("--create", is_flag=True, help="A full stream may make IMAGE (of its size).")
def applydiff(image, create) -> None:
    """Apply a diff stream (diffflash) from stdin to IMAGE, a copy elsewhere
    (a raw image file or a block device).

    IMAGE.fastfc-diff records what the image holds: the sequence of the
    target it is a copy of, and, while a stream is applied in part, what
    is left (diffflash --resume sends it). A stream that does not start
    from what the image holds is refused, with nothing written."""
    from pathlib import Path

    from fastfc.tools import diffstream as ds
    if sys.stdin.isatty():
        raise click.UsageError("applydiff reads a stream from stdin: pipe diffflash into it")
    try:
        with Progress(unit="bytes") as progress:
            task = None

            def show(done: int, total: int) -> None:
                nonlocal task
                if task is None:
                    task = progress.add(Path(image).name, total, size=1)
                progress.update(task, done)

            got = ds.apply_stream(sys.stdin.buffer, Path(image), create=create, progress=show)
    except ds.StreamError as e:
        raise click.ClickException(str(e)) from None
    h = got.header
    frm = "" if h.base is None else f" from sequence {h.base}"
    click.echo(f"applied {h.kind} stream of {h.source}:{h.target} to {image}: sequence "
               f"{h.sequence}{frm}, {plural(got.extents, 'extent')}, {human(got.bytes)}")
