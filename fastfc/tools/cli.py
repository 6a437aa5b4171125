"""The ``fastfc`` command line (``python -m fastfc``), in the DS8000 DSCLI style.

Every invocation opens the storage unit(s) it is given, runs one command and
closes them again: all state lives in the unit directories and no daemon runs
in between. Copies therefore make progress only while a command runs:
``--wait`` (mkflash, resyncflash, mkpprc, resumepprc) and ``waitflash`` copy
in the foreground with a progress bar, and ``formcg`` forms Global Mirror
consistency groups.

``--unit`` names the local unit: the volumes of FlashCopy relationships, the
primaries of PPRC pairs, the A volumes of Global Mirror sessions.
``--remote-unit`` names the unit holding PPRC secondaries and the B and C
volumes of sessions (default: the local unit). Units that the open ones name
as partners of their pairs and sessions are opened too, so that a pair is
always whole and every host write to a primary is recorded.

Expected errors (a refused operation, a missing volume, a damaged unit, a
number too large, memory or disk space running out) print one line to stderr
and exit with status 1, having created nothing; usage errors exit with status
2. Set ``FASTFC_DEBUG=1`` to get the traceback instead. Progress goes to
stderr: a bar on a terminal, plain lines in a pipe. ``ls*`` and ``show*``
commands print JSON with ``--json``.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import re
import shutil
import sqlite3
import sys
import time
from pathlib import Path

import click
import numpy as np

from fastfc.errors import FastFCError, ReadOnlyUnitError
from fastfc.copyservices.flashcopy import CHUNK_BYTES, MAX_SEQUENCE, FlashCopy, establish_group
from fastfc.copyservices.globalmirror import Cause, GlobalMirror
from fastfc._optional import require
from fastfc.names import NAME, NAME_RULE
from fastfc.copyservices.pprc import SEND_CHUNK_BYTES, PPRCPair
from fastfc.durable.unit import StorageUnit

EXPECTED_ERRORS = (FastFCError, ValueError, KeyError, IndexError, OSError, sqlite3.Error,
                   OverflowError, MemoryError)

# The largest byte count or index a volume can hold (a C Py_ssize_t).
MAX_BYTES = sys.maxsize
# A --wait whose copy would take longer than this at its --copy-rate is refused.
MAX_WAIT_SECONDS = 24 * 3600

EXIT_CODES = """\b
Exit status:
  0  the command did what it says
  1  an expected error, on one line on stderr: a refused operation, a
     missing volume or session, a damaged unit, a number or size too large,
     memory or disk space running out; formcg: the last CG failed; demo:
     the C volumes did not match. Nothing is left half-created.
  2  a usage error: an unknown command or option, a malformed value"""


# -- argument types ------------------------------------------------------------------
class Size(click.ParamType):
    """A byte count: ``4096``, ``64K``, ``16MiB``, ``1G`` (binary units)."""

    name = "size"
    _UNITS = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}

    def convert(self, value, param, ctx):
        if isinstance(value, int):
            n = value
        else:
            m = re.fullmatch(r"\s*(\d+)\s*([KMGT]?)(?:I?B)?\s*", str(value), re.IGNORECASE)
            if not m:
                self.fail(f"{value!r} is not a size (e.g. 4096, 64K, 16M, 1G)", param, ctx)
            n = int(m.group(1)) * self._UNITS[m.group(2).upper()]
        return _at_most(n, MAX_BYTES, param, value)


class Count(click.ParamType):
    """A whole number from ``low`` to ``high``."""

    name = "integer"

    def __init__(self, low: int = 0, high: int = MAX_BYTES) -> None:
        self.low, self.high = low, high

    def convert(self, value, param, ctx):
        try:
            n = value if isinstance(value, int) and not isinstance(value, bool) \
                else int(str(value).strip())
        except ValueError:
            self.fail(f"{value!r} is not a whole number", param, ctx)
        if n < self.low:
            self.fail(f"{n} is below the minimum {self.low}", param, ctx)
        return _at_most(n, self.high, param, value)


def _at_most(n: int, high: int, param, value) -> int:
    """A number too large for what it counts is an expected error (status 1,
    one line), not a usage error: the command line was well formed."""
    if n > high:
        what = f"{param.get_error_hint(None)}" if param is not None else "value"
        raise click.ClickException(f"{what} {value} is too large (at most {high})")
    return n


class Name(click.ParamType):
    """A name: volume, session (:mod:`fastfc.names`)."""

    def __init__(self, what: str) -> None:
        self.what = what
        self.name = what.upper()

    def convert(self, value, param, ctx):
        return _check_name(self.what, value)


def _check_name(what: str, name: str) -> str:
    if not NAME.match(name):
        raise click.ClickException(f"{name!r} is not a valid {what} name: names are "
                                   f"{NAME_RULE}")
    return name


class Spec(click.ParamType):
    """Volume names joined by colons, DS8000 style: ``SOURCE:TARGET``."""

    def __init__(self, *parts: str) -> None:
        self.parts = parts
        self.name = ":".join(parts)

    def get_metavar(self, param, ctx=None) -> str:
        return self.name

    def convert(self, value, param, ctx):
        if isinstance(value, tuple):
            return value
        names = tuple(value.split(":"))
        if len(names) != len(self.parts) or not all(names):
            self.fail(f"{value!r} is not {self.name}", param, ctx)
        for n in names:
            _check_name("volume", n)
        return names


SIZE = Size()
FLASH = Spec("SOURCE", "TARGET")
PAIR = Spec("PRIMARY", "SECONDARY")
TRIPLET = Spec("A", "B", "C")
VOLUME = Name("volume")
SESSION = Name("session")


# -- the units of one invocation -------------------------------------------------------
# Commands that only look: their units are opened read-only (a shared lock,
# so they run alongside each other, and nothing in the unit changes).
READ_ONLY_COMMANDS = {"lsvol", "read", "lsflash", "lspprc", "showgmir"}


class Units:
    """The storage units one invocation works on, opened on first use and
    closed (with their locks released) when the command ends.

    Each unit is opened through :class:`StorageUnit`, whose lock gives it one
    owner across processes: a command that only looks opens its units
    read-only (many may run at once), any other opens them read-write (alone).
    ``wait`` is how long to wait for a busy unit (None: fail at once).
    Units are found by the paths given and by what the open units record as
    their partners (:meth:`StorageUnit.partner_units`); naming both units of
    a pair that moved apart with ``-u`` and ``-r`` re-links them.
    """

    def __init__(self, local: str | None, remote: str | None, *, readonly: bool = False,
                 wait: float | None = None) -> None:
        self.local_path = local
        self.remote_path = remote
        self.readonly = readonly
        self.wait = wait
        self.open: dict[Path, StorageUnit] = {}
        self._partners_opened = False

    def local(self, create: bool = False) -> StorageUnit:
        """The ``--unit`` (created if ``create`` and missing)."""
        if self.local_path is None:
            raise click.UsageError("no storage unit given: use --unit PATH (or set FASTFC_UNIT)")
        unit = self._get(self.local_path, create)
        if not self._partners_opened:
            self._partners_opened = True
            if self.remote_path is not None:
                remote = self._get(self.remote_path, False)
                if remote is not unit:
                    unit.relink(remote)     # units named together are partners
            self._open_partners()
        return unit

    def remote(self) -> StorageUnit:
        """The ``--remote-unit``, or the local unit when none is given."""
        self.local()
        return self._get(self.remote_path or self.local_path, False)

    def all(self) -> list[StorageUnit]:
        self.local()
        return list(self.open.values())

    def _get(self, path: str | Path, create: bool) -> StorageUnit:
        p = Path(path).resolve()
        if p in self.open:
            return self.open[p]
        exists = (p / "unit.db").exists()
        if not exists and not create:
            raise click.ClickException(f"no storage unit at {path} (mkvol creates one)")
        try:
            unit = StorageUnit(p, readonly=self.readonly and exists, wait=self.wait)
        except ReadOnlyUnitError:
            # a CG a crash interrupted must be resolved on disk first: a
            # command that only looks does it, as a writer, this once
            unit = StorageUnit(p, wait=self.wait)
        self.open[p] = unit
        return unit

    def _open_partners(self) -> None:
        """Open the units that pairs and sessions of the open units span."""
        while True:
            wanted = {p for u in list(self.open.values()) for p in u.partner_units()}
            new = [p for p in wanted - set(self.open) if (p / "unit.db").exists()]
            if not new:
                return
            for p in new:
                self._get(p, False)

    def close(self) -> None:
        errors = []
        for unit in reversed(list(self.open.values())):
            try:
                unit.close()
            except Exception as e:  # close every unit, report the first failure
                errors.append(e)
        self.open.clear()
        if errors:
            raise errors[0]

    # -- finding things by name ----------------------------------------------------
    def flashcopy(self, source: str, target: str) -> FlashCopy:
        unit = self.local()
        fc = unit.volume(target).target_relationship
        unit.volume(source)
        if fc is None or fc.source.name != source:
            raise KeyError(f"no FlashCopy relationship {source}:{target} in unit {unit.path}")
        return fc

    def pair(self, primary: str, secondary: str) -> PPRCPair:
        """The pair ``primary:secondary``: its primary in the local unit if
        such a pair is there, else in any open unit (after a failback)."""
        local = self.local()
        found = [p for u in self.all() for p in u.pairs
                 if p.primary.name == primary and p.secondary.name == secondary]
        here = [p for p in found if p.primary.unit is local]
        if len(here or found) == 1:
            return (here or found)[0]
        if found:
            raise click.ClickException(f"{primary}:{secondary} names several pairs; "
                                       "give the unit of its primary with --unit")
        for row in local.pair_records:
            if (row["primary_name"], row["secondary_name"]) == (primary, secondary):
                raise click.ClickException(
                    f"pair {primary}:{secondary} needs its secondary unit "
                    f"{local.describe_partner(row['secondary_uuid'])}, "
                    "which is not available")
        raise KeyError(f"no PPRC pair {primary}:{secondary} in the open units")

    def session(self, name: str) -> GlobalMirror:
        units = self.all()
        for u in units:
            if name in u.sessions:
                return u.sessions[name]
        for u in units:
            if name in u.store.session_rows():
                return u.session(name)   # raises: its primary units are missing
        raise KeyError(f"no Global Mirror session named {name!r} in the open units")

    def session_of(self, pair: PPRCPair) -> GlobalMirror | None:
        for u in self.open.values():
            for gm in u.sessions.values():
                if any(t.pair is pair for t in gm.triplets):
                    return gm
        return None


pass_units = click.make_pass_decorator(Units)


class FastFCGroup(click.Group):
    """Closes the units after the command; expected errors become one line.
    Commands are listed in the order they are defined (by subject)."""

    def list_commands(self, ctx):
        # bench runs the suite in a source checkout's benches/: not offered elsewhere
        return [name for name in self.commands
                if name != "bench" or _source_checkout() is not None]

    def invoke(self, ctx):
        try:
            try:
                return super().invoke(ctx)
            finally:
                if isinstance(ctx.obj, Units):
                    ctx.obj.close()
        except EXPECTED_ERRORS as e:
            if os.environ.get("FASTFC_DEBUG"):
                raise
            raise click.ClickException(_one_line(e)) from None


def _one_line(e: BaseException) -> str:
    if isinstance(e, MemoryError):
        return ("out of memory: the command needs more memory than this process may use"
                + (f" ({e})" if str(e) else ""))
    if isinstance(e, OSError) and e.errno == errno.ENOMEM:
        return f"out of memory (or address space) for this process: {e}"
    if isinstance(e, OverflowError):
        return f"a number is too large: {e}"
    msg = e.args[0] if isinstance(e, KeyError) and e.args else str(e)
    msg = " ".join(_plain(str(msg)).split())    # one line, whatever the library said
    return msg or type(e).__name__


# Library messages name library calls; the command line names its commands and flags.
_CLI_WORDS = [
    (r"copy\(\) or wait\(\) first, or withdraw\(force=True\) to invalidate the target",
     "waitflash first, or rmflash --force to invalidate the target"),
    (r"withdraw\(force=True\)", "rmflash --force"),
    (r"\(resync\(revertible=True\) first\)", "(resyncflash --revertible first)"),
    (r"established without record=True", "established without --record"),
    (r"needs record=True", "needs --record (mkflash --record)"),
    (r"with inhibit_target_write", "with --tgtinhibit (inhibit target write)"),
    (r"commit or revert (first|before withdrawing)", r"commitflash or revertflash \1"),
    (r"use failback\(\)", "use failbackpprc"),
    (r"withdraw or remove those first", "rmflash, rmpprc or rmgmir first"),
    (r"clear_fatal\(\) first, or close\(discard=True\)", "formcg first, or rmgmir --force"),
    (r"; call copy\(\) instead", ""),
]


def _plain(message: str) -> str:
    """Library messages name objects by their repr; a command line user
    wants their names: ``<Volume A 8x4096B at '...'>`` becomes ``volume A``.
    Library calls become the commands and flags that do the same."""
    message = re.sub(r"<Volume (\S+) [^>]*>", r"volume \1", message)
    message = re.sub(r"<FlashCopy (\S+)->(\S+) [^>]*>", r"FlashCopy \1:\2", message)
    message = re.sub(r"<PPRCPair (\S+)->(\S+) [^>]*>", r"pair \1:\2", message)
    for pattern, words in _CLI_WORDS:
        message = re.sub(pattern, words, message)
    return message


# -- output helpers ---------------------------------------------------------------------
def _console(stderr: bool = False):
    """A rich console on the current stdout (or stderr). Piped output is
    not wrapped at 80 columns: a table row stays one line for grep."""
    from rich.console import Console
    console = Console(stderr=stderr, highlight=False)
    if not console.is_terminal and "COLUMNS" not in os.environ:
        console.width = 200
    return console


def _table(*columns: str, **kw):
    from rich import box
    from rich.table import Table
    t = Table(box=box.SIMPLE_HEAD, show_edge=False, pad_edge=False, **kw)
    for c in columns:
        t.add_column(c)
    return t


def _human(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n:g} {unit}" if n == int(n) else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


def _ms(seconds: float) -> str:
    return f"{seconds * 1e3:.3f}"


def _n(count: int, noun: str) -> str:
    return f"{count} {noun}{'' if count == 1 else 's'}"


class _Progress:
    """Progress on stderr: rich bars on a terminal; in a pipe, plain lines
    (no live-display control codes), at most one a second per task, and
    only for work that takes more than a second. ``unit`` is what is
    counted; ``size`` its bytes, for the rate and the ETA."""

    EVERY = 1.0

    def __init__(self, unit: str = "tracks") -> None:
        self.unit = unit
        self.console = _console(stderr=True)
        self.live = self.console.is_terminal
        self._bar = None
        self._tasks: dict[int, dict] = {}

    def __enter__(self) -> "_Progress":
        if self.live:
            from rich.progress import (BarColumn, MofNCompleteColumn, Progress, TextColumn,
                                       TimeElapsedColumn, TimeRemainingColumn)
            self._bar = Progress(TextColumn("{task.description}"), BarColumn(),
                                 MofNCompleteColumn(), TextColumn(self.unit),
                                 TimeElapsedColumn(), TextColumn("ETA"), TimeRemainingColumn(),
                                 console=self.console, transient=True)
            self._bar.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        if self._bar is not None:
            self._bar.__exit__(*exc)

    def add(self, description: str, total: float, *, size: int = 0,
            rate: float | None = None) -> int:
        """A task of ``total`` units of ``size`` bytes; ``rate`` (bytes/s)
        caps it, so its ETA is known from the start and said at once."""
        task = self._bar.add_task(description, total=total) if self._bar is not None \
            else len(self._tasks)
        now = time.monotonic()
        self._tasks[task] = {"what": description, "total": total, "size": size,
                             "start": now, "said": now, "done": 0}
        if rate and self._bar is None and total:
            eta = total * size / rate
            if eta > self.EVERY:
                self._say(f"{description}: {_n(total, self.unit[:-1])} "
                          f"({_human(total * size)}) at {_human(rate)}/s, ETA {_eta(eta)}")
        return task

    def update(self, task: int, completed: float, description: str | None = None) -> None:
        t = self._tasks[task]
        t["done"] = completed
        if self._bar is not None:
            self._bar.update(task, completed=completed,
                             **({} if description is None else {"description": description}))
            return
        now = time.monotonic()
        if now - t["said"] >= self.EVERY:
            t["said"] = now
            self._say(self._line(t, description))

    def _line(self, t: dict, description: str | None) -> str:
        spent = time.monotonic() - t["start"]
        line = f"{description or t['what']}: {t['done']:g}/{t['total']:g} {self.unit}"
        if t["size"] and t["done"] and spent > 0:
            per_s = t["done"] / spent
            line += f", {_human(int(per_s * t['size']))}/s, " \
                    f"ETA {_eta((t['total'] - t['done']) / per_s)}"
        return line

    def _say(self, line: str) -> None:
        click.echo(line, err=True)


def _eta(seconds: float) -> str:
    if seconds < 120:
        return f"{seconds:.0f} s"
    if seconds < 2 * 3600:
        return f"{seconds / 60:.0f} min"
    if seconds < 2 * 86400:
        return f"{seconds / 3600:.1f} h"
    return f"{seconds / 86400:.1f} days"


def _check_wait(rels_tracks, flag: str = "--wait") -> None:
    """Refuse a rate-capped wait that would take absurdly long.
    ``rels_tracks``: (id, tracks, track_size, copy_rate) of each copy."""
    seconds = sum(n * ts / rate for _, n, ts, rate in rels_tracks if rate)
    if seconds > MAX_WAIT_SECONDS:
        size = sum(n * ts for _, n, ts, rate in rels_tracks if rate)
        rate = min(r for *_, r in rels_tracks if r)
        raise click.ClickException(
            f"{flag} would copy {_human(size)} at --copy-rate {_human(rate)}/s for "
            f"{_eta(seconds)} (more than {_eta(MAX_WAIT_SECONDS)}); raise --copy-rate, or "
            "leave out --wait (copies move only while a command runs: waitflash later)")


def _copy_in_foreground(rels: list[FlashCopy]) -> None:
    """Finish the background copy of ``rels`` in this process, with progress
    on stderr. A relationship's ``copy_rate`` holds: a track at a time, and
    no faster than the rate allows (its worker thread may copy alongside;
    progress counts what either copied, so together they keep to the rate)."""
    with _Progress() as progress:
        for fc in rels:
            total = fc.tracks_to_copy
            ts = fc.source.track_size
            rate = fc.copy_rate
            task = progress.add(_fc_id(fc), total, size=ts, rate=rate)
            step = max(1, CHUNK_BYTES // ts)
            if rate:
                step = max(1, min(step, int(rate * 0.05) // ts))
            start = time.perf_counter()
            while fc.active and fc.tracks_to_copy:
                if rate:
                    ahead = (total - fc.tracks_to_copy) * ts / rate \
                        - (time.perf_counter() - start)
                    if ahead > 0:
                        time.sleep(min(ahead, 0.25))
                        progress.update(task, total - fc.tracks_to_copy)
                        continue
                try:
                    fc.copy(step)
                except FastFCError:
                    if fc.active:
                        raise
                progress.update(task, total - fc.tracks_to_copy)
            try:
                fc.copy(0)   # a copied relationship that is not persistent ends now
            except FastFCError:
                if fc.active:
                    raise


def _resync_now(pairs) -> None:
    """--wait: send the pairs' out-of-sync tracks now and say how they stand."""
    _drain_in_foreground(pairs)
    click.echo("resync done: " + ", ".join(f"{_pair_id(p)} {p.state.value}" for p in pairs))


def _drain_in_foreground(pairs: list[PPRCPair]) -> int:
    """Send every out-of-sync track of ``pairs`` now, with progress on
    stderr. Returns the bytes sent."""
    sent = 0
    with _Progress() as progress:
        for pair in pairs:
            total = pair.out_of_sync_tracks
            task = progress.add(_pair_id(pair), total, size=pair.primary.track_size)
            while pair.out_of_sync_tracks and pair.suspend_reason is None:
                n = pair.drain(4 * SEND_CHUNK_BYTES)
                if not n:
                    break
                sent += n
                progress.update(task, total - pair.out_of_sync_tracks)
            if pair.suspend_reason is not None:
                raise click.ClickException(f"pair {_pair_id(pair)} suspended during the copy: "
                                           f"{pair.suspend_reason}")
    return sent


def _fc_id(fc: FlashCopy) -> str:
    return f"{fc.source.name}:{fc.target.name}"


def _pair_id(pair: PPRCPair) -> str:
    return f"{pair.primary.name}:{pair.secondary.name}"


# -- the group ------------------------------------------------------------------------
@click.group(cls=FastFCGroup, context_settings={"help_option_names": ["-h", "--help"]},
             epilog=EXIT_CODES)
@click.version_option(package_name="fastfc")
@click.option("-u", "--unit", "unit", envvar="FASTFC_UNIT", metavar="PATH",
              help="The local storage unit (a directory). [env FASTFC_UNIT]")
@click.option("-r", "--remote-unit", "remote", envvar="FASTFC_REMOTE_UNIT", metavar="PATH",
              help="The unit holding PPRC secondaries and Global Mirror B and C volumes "
                   "(default: the local unit). [env FASTFC_REMOTE_UNIT]")
@click.option("--wait", "wait", type=click.FloatRange(min=0), metavar="SECONDS",
              help="Wait up to SECONDS for a unit that another command has open "
                   "(default: fail at once).")
@click.pass_context
def main(ctx, unit, remote, wait) -> None:
    """fastfc: FlashCopy, PPRC and Global Mirror for NumPy-backed volumes.

    Each command opens the storage unit(s), does its work and closes them:
    state persists in the unit directories between commands. Commands that
    only look (lsvol, read, lsflash, lspprc, showgmir) open units read-only
    and may run together; the others hold their units alone.

    Names of volumes and sessions are 1-64 letters, digits, '_', '.', '-',
    starting with a letter or digit. ls* and show* commands take --json.
    Progress goes to stderr (plain lines when it is not a terminal).
    """
    ctx.obj = Units(unit, remote, readonly=ctx.invoked_subcommand in READ_ONLY_COMMANDS,
                    wait=wait)


@main.command()
@click.option("--seconds", type=click.FloatRange(min=0, min_open=True, max=7 * 86400),
              default=20.0, show_default=True, help="How long the workload runs (up to a week).")
@click.option("--triplets", type=click.IntRange(1, 1024), default=16, show_default=True,
              help="(A, B, C) volume triplets, 1 to 1024.")
@click.option("--size-mib", type=click.IntRange(1, 1 << 20), default=32, show_default=True,
              help="Size of each volume in MiB (all 3 x triplets live in memory).")
@click.option("--rate", "rate_mbs", type=click.FloatRange(min=0, max=1e6), default=100.0,
              show_default=True, help="Combined host write rate in MB/s (0: as fast as possible).")
@click.option("--fault-every", type=click.FloatRange(min=0, max=86400), default=1.0,
              show_default=True, help="Seconds between injected faults (0: none).")
@click.option("--seed", type=click.IntRange(min=0), default=0, show_default=True,
              help="Seed of the random workload and faults.")
@click.option("--plot", type=click.Path(dir_okay=False), default=None,
              help="Draw RPO and phase times over time to this PNG file "
                   "(needs matplotlib: pip install 'fastfc[plot]').")
def demo(seconds, triplets, size_mib, rate_mbs, fault_every, seed, plot) -> None:
    """Run a Global Mirror session under random writes with faults injected.

    Exits with status 1 if, after the workload stops, the C volumes do not
    all equal their A volumes at one CG sequence number."""
    from fastfc.tools.demo import DemoConfig, run_demo
    need = 3 * triplets * size_mib << 20
    try:
        memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        memory = None
    if memory and need > memory:
        raise click.ClickException(
            f"--triplets {triplets} x --size-mib {size_mib} needs {_human(need)} of memory "
            f"for the A, B and C volumes; this machine has {_human(memory)}")
    if plot is not None:
        _check_plot(plot)
    cfg = DemoConfig(seconds=seconds, triplets=triplets, size_mib=size_mib,
                     rate_mbs=rate_mbs, fault_every=fault_every, seed=seed)
    result = run_demo(cfg, plot=plot)
    sys.exit(0 if result["promise_ok"] else 1)


def _check_plot(plot: str) -> None:
    """Before the run, not after it: matplotlib importable, the file writable."""
    require("matplotlib", extra="plot", feature="--plot")
    folder = Path(plot).parent
    if not folder.is_dir():
        raise click.ClickException(f"--plot {plot}: no directory {folder}")
    if Path(plot).is_dir() or not os.access(folder, os.W_OK | os.X_OK) or \
            (Path(plot).exists() and not os.access(plot, os.W_OK)):
        raise click.ClickException(f"--plot {plot}: cannot write that file")


BENCH_SECTIONS = ["physical", "core", "engine", "numba", "qemu", "scaling", "durable", "gm"]


@main.command()
@click.option("--quick", is_flag=True, help="About a minute: fewer rounds, smaller sizes.")
@click.option("--out", type=click.Path(file_okay=False), default=None,
              help="Directory for report.json and the plots [default: bench-results/].")
@click.option("--only", multiple=True, type=click.Choice(BENCH_SECTIONS),
              help="Run only this section (repeatable).")
@click.option("--skip", multiple=True, type=click.Choice(BENCH_SECTIONS),
              help="Skip this section (repeatable).")
@click.option("--unit-dir", type=click.Path(file_okay=False), default=None,
              help="Where the durable section puts storage units (a real disk) "
                   "[default: bench-results/units].")
@click.option("--update-readme", is_flag=True, help="Rewrite the README's benchmark table.")
@click.option("--strict", is_flag=True, help="Exit with status 1 if a target is missed.")
def bench(quick, out, only, skip, unit_dir, update_readme, strict) -> None:
    """Run every benchmark against same-run baselines and print the table.

    Needs a source checkout: the suite lives in the repository's benches/
    directory, next to the fastfc package (an installed fastfc does not list
    this command).
    """
    root = _source_checkout()
    if root is None:
        raise click.ClickException(
            "fastfc bench needs a source checkout: the benchmark suite (benches/) ships "
            f"with the repository, not with the installed package in "
            f"{_package_dir()}; run it from a clone (pip install -e '.[dev]')")
    run = _load_benches(root).run
    sys.exit(run(quick=quick, out=out, only=list(only), skip=list(skip),
                 update=update_readme, unit_dir=unit_dir, strict=strict))


def _package_dir() -> Path:
    """The directory of the fastfc package this runs from."""
    import fastfc
    return Path(fastfc.__file__).resolve().parent


def _source_checkout() -> Path | None:
    """The source checkout this fastfc runs from: the directory above the
    package, when it holds pyproject.toml and benches/report.py. None for an
    installed package."""
    root = _package_dir().parent
    if (root / "pyproject.toml").is_file() and (root / "benches" / "report.py").is_file():
        return root
    return None


def _load_benches(root: Path):
    """``benches.report`` of the checkout at ``root``, imported as the package
    ``benches`` without putting the checkout on sys.path."""
    import importlib
    import importlib.util
    pkg = sys.modules.get("benches")
    if pkg is None:
        spec = importlib.util.spec_from_file_location(
            "benches", root / "benches" / "__init__.py",
            submodule_search_locations=[str(root / "benches")])
        pkg = importlib.util.module_from_spec(spec)
        sys.modules["benches"] = pkg
        spec.loader.exec_module(pkg)
    elif Path(pkg.__path__[0]).resolve() != (root / "benches").resolve():
        raise click.ClickException(
            f"another benches package is already imported (from {pkg.__path__[0]}), "
            f"not the one of this checkout ({root / 'benches'})")
    return importlib.import_module("benches.report")


# -- volumes ---------------------------------------------------------------------------
def _json_out(obj) -> None:
    click.echo(json.dumps(obj, indent=2))


JSON = click.option("--json", "as_json", is_flag=True,
                    help="Print JSON instead of a table (see the README for the shape).")


@main.command()
@click.argument("names", nargs=-1, required=True, type=VOLUME)
@click.option("--tracks", type=Count(low=1), help="Number of tracks.")
@click.option("--size", type=SIZE, help="Capacity instead of --tracks (rounded up to tracks).")
@click.option("--track-size", type=SIZE, default="64K", show_default=True,
              help="Bytes per track: a power of two, 512 to 16M.")
@click.option("--thin", is_flag=True,
              help="Allocate blocks on first write instead of now (a full filesystem "
                   "then refuses that write, with nothing half-written).")
@pass_units
def mkvol(units, names, tracks, size, track_size, thin) -> None:
    """Create zero-filled volumes (the unit too, if new) [mkfbvol].

    Everything is checked first: a volume that cannot be made (a size past
    what the filesystem has free, a name taken) creates nothing at all.
    Volumes are thick (every block allocated now) unless --thin."""
    if (tracks is None) == (size is None):
        raise click.UsageError("give exactly one of --tracks and --size")
    if not (512 <= track_size <= 16 << 20 and track_size & (track_size - 1) == 0):
        raise click.ClickException(f"--track-size {track_size} is not a power of two "
                                   "from 512 to 16M")
    if len(set(names)) != len(names):
        raise click.ClickException("a volume name is given twice")
    n = tracks if tracks is not None else max(1, -(-size // track_size))
    capacity = n * track_size
    if capacity > MAX_BYTES:
        raise click.ClickException(f"{n} tracks of {_human(track_size)} is {capacity} bytes: "
                                   f"more than a volume can hold ({MAX_BYTES} bytes)")
    where = Path(units.local_path) if units.local_path else None
    if where is None:
        raise click.UsageError("no storage unit given: use --unit PATH (or set FASTFC_UNIT)")
    existing = where
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    free = shutil.disk_usage(existing).free
    if not thin and capacity * len(names) > free:
        what = f"{len(names)} volumes of {_human(capacity)}" if len(names) > 1 \
            else f"a volume of {_human(capacity)}"
        raise click.ClickException(f"{what} does not fit: the filesystem of {existing} has "
                                   f"{_human(free)} free")
    new_unit = not (where / "unit.db").exists()
    new_dir = not where.exists()
    try:
        unit = units.local(create=True)
        for name in names:
            if name in unit:
                raise click.ClickException(f"volume {name!r} already exists in this unit")
        made = []
        try:
            for name in names:
                vol = unit.create_volume(name, n, track_size, thin=thin)
                made.append(vol)
        except BaseException:
            for vol in made:
                unit.remove_volume(vol.name)
            for name in names[len(made):len(made) + 1]:   # the one that failed
                if name not in unit:
                    unit._volume_file(name).unlink(missing_ok=True)
            raise
    except BaseException:
        if new_unit:   # once the units are closed, take away the unit this made
            click.get_current_context().find_root().call_on_close(
                lambda: _remove_new_unit(where, new_dir))
        raise
    for vol in made:
        click.echo(f"created volume {vol.name}: {_n(vol.n_tracks, 'track')} of "
                   f"{_human(vol.track_size)} ({_human(vol.capacity)})")


def _remove_new_unit(path: Path, new_dir: bool) -> None:
    """Undo the unit a failed mkvol created (it holds no volume)."""
    if (path / "volumes").is_dir() and any((path / "volumes").iterdir()):
        return
    if new_dir:
        shutil.rmtree(path, ignore_errors=True)
        return
    for child in path.iterdir():
        shutil.rmtree(child, ignore_errors=True) if child.is_dir() else child.unlink()


@main.command()
@JSON
@pass_units
def lsvol(units, as_json) -> None:
    """List the unit's volumes [lsfbvol]."""
    unit = units.local()
    vols = sorted(unit.volumes(), key=lambda v: v.name)
    if as_json:
        _json_out([{"name": v.name, "tracks": v.n_tracks, "track_size": v.track_size,
                    "capacity": v.capacity, "valid": bool(v.valid),
                    "roles": _roles(v, units)} for v in vols])
        return
    t = _table("Name", "Tracks", "Track size", "Capacity", "Roles")
    for v in vols:
        t.add_row(v.name, str(v.n_tracks), _human(v.track_size), _human(v.capacity),
                  ", ".join(_roles(v, units)) or "-")
    _console().print(t if t.rows else "no volumes")


def _roles(v, units: Units) -> str:
    roles = [f"FC source of {r.target.name}" for r in v.source_relationships]
    if v.target_relationship is not None:
        roles.append(f"FC target of {v.target_relationship.source.name}")
    if isinstance(v.mirror, PPRCPair):
        roles.append(f"PPRC primary of {v.mirror.secondary.name}")
    elif _pending_pair(v):
        roles.append(f"PPRC primary of {_pending_pair(v)['secondary_name']} (unit away)")
    if v.is_secondary:
        roles.append("PPRC secondary")
    roles += [f"GM {gm.name}" for u in units.open.values() for gm in u.sessions.values()
              if any(v in (t.a, t.b, t.c) for t in gm.triplets)]
    if v.write_inhibited:
        roles.append("write-inhibited")
    if not v.valid:
        roles.append("INVALID")
    return roles


@main.command()
@click.argument("names", nargs=-1, required=True, type=VOLUME)
@click.option("--force", is_flag=True, help="Delete volumes that hold data too.")
@pass_units
def rmvol(units, names, force) -> None:
    """Delete volumes that are in no relationship, pair or session [rmfbvol].

    A volume that holds data (any byte not zero) is refused unless --force."""
    unit = units.local()
    vols = [unit.volume(name) for name in names]
    for v in vols:
        if v.relationships or v.mirror is not None or v.is_secondary or _pending_pair(v):
            raise click.ClickException(
                f"volume {v.name} is in a FlashCopy relationship, PPRC pair or Global Mirror "
                f"session ({', '.join(_roles(v, units))}); rmflash, rmpprc or rmgmir first")
        if not force:
            at = _first_data(v)
            if at is not None:
                raise click.ClickException(
                    f"volume {v.name} holds data (its first non-zero byte is at offset {at} "
                    f"of {v.capacity}): rmvol --force deletes it")
    for name in names:
        unit.remove_volume(name)
        click.echo(f"removed volume {name}")


def _first_data(vol) -> int | None:
    """Offset of the first non-zero byte of ``vol``'s image, None if all zero
    (or if it holds no valid image: nothing to lose then)."""
    if not vol.valid:
        return None
    for at in range(0, vol.capacity, CHUNK_BYTES):
        chunk = vol.read(at, min(CHUNK_BYTES, vol.capacity - at))
        nz = np.flatnonzero(chunk)
        if nz.size:
            return at + int(nz[0])
    return None


@main.command()
@click.argument("volume", type=VOLUME)
@click.argument("data")
@click.option("--offset", type=SIZE, default=0, show_default=True, help="Byte offset.")
@click.option("--repeat", type=Count(low=1), default=1, show_default=True,
              help="Write DATA this many times back to back.")
@pass_units
def write(units, volume, data, offset, repeat) -> None:
    """Host write: DATA (UTF-8 text) to VOLUME at --offset."""
    unit = units.local()
    vol = unit.volume(volume)
    pending = _pending_pair(vol)
    if pending and vol.mirror is None:   # the library would not record it
        raise click.ClickException(
            f"{volume} is a PPRC primary whose secondary unit {pending['secondary_unit']} "
            "is not available; its writes could not be recorded")
    piece = data.encode()
    total = len(piece) * repeat
    _check_range(vol, offset, total)
    _write_repeated(vol, offset, piece, repeat)
    note = "; recorded out of sync (the secondary unit is not available)" if pending else ""
    click.echo(f"wrote {total} bytes to {volume} at offset {offset}{note}")


def _check_range(vol, offset: int, length: int) -> None:
    """One clear line for I/O that does not fit, naming the capacity."""
    if offset > vol.capacity:
        raise click.ClickException(f"offset {offset} is past the end of {vol.name}, which "
                                   f"holds {vol.capacity} bytes ({_human(vol.capacity)})")
    if length > vol.capacity - offset:
        raise click.ClickException(
            f"{length} bytes at offset {offset} do not fit in {vol.name}: it holds "
            f"{vol.capacity} bytes ({_human(vol.capacity)}), {vol.capacity - offset} "
            "from that offset")


def _write_repeated(vol, offset: int, piece: bytes, repeat: int) -> None:
    """``piece`` ``repeat`` times from ``offset``, in writes of at most about
    CHUNK_BYTES: memory stays small whatever --repeat is."""
    if not piece:
        vol.write(offset, b"")
        return
    per = max(1, min(repeat, CHUNK_BYTES // len(piece)))
    block = piece * per
    left = repeat
    while left:
        k = min(per, left)
        vol.write(offset, block if k == per else piece * k)
        offset += k * len(piece)
        left -= k


def _pending_pair(vol) -> dict | None:
    """The stored row of a pair whose primary is ``vol`` and whose secondary
    unit could not be opened (so the pair is not restored)."""
    rows = [r for r in vol.unit.pair_records if r["primary_name"] == vol.name]
    return rows[0] if rows else None


@main.command()
@click.argument("volume", type=VOLUME)
@click.option("--offset", type=SIZE, default=0, show_default=True, help="Byte offset.")
@click.option("--length", type=SIZE, help="Bytes to read [default: 256, or to the end "
                                          "with --sha256].")
@click.option("--sha256", is_flag=True, help="Print the SHA-256 of the bytes instead.")
@pass_units
def read(units, volume, offset, length, sha256) -> None:
    """Host read: a hex dump of VOLUME's logical image (as hexdump -C)."""
    vol = units.local().volume(volume)
    _check_range(vol, offset, 0)
    if length is None:
        length = vol.capacity - offset if sha256 else min(256, vol.capacity - offset)
    _check_range(vol, offset, length)
    chunks = (vol.read(at, min(CHUNK_BYTES, offset + length - at))
              for at in range(offset, offset + length, CHUNK_BYTES))
    if sha256:
        h = hashlib.sha256()
        for chunk in chunks:
            h.update(chunk)
        click.echo(f"{h.hexdigest()}  {volume}[{offset}:{offset + length}]")
        return
    for line in _hexdump(chunks, offset):
        click.echo(line)


def _hexdump(chunks, base: int):
    """Lines as ``hexdump -C`` prints them, repeated lines squeezed to '*'.
    ``chunks``: the bytes in pieces (each a multiple of 16 but the last)."""
    previous, squeezed, at = None, False, base
    for chunk in chunks:
        data = bytes(chunk)
        for i in range(0, len(data), 16):
            row = data[i:i + 16]
            if row == previous:
                if not squeezed:
                    yield "*"
                squeezed = True
                continue
            previous, squeezed = row, False
            hexes = " ".join(f"{b:02x}" for b in row).ljust(47)
            text = "".join(chr(b) if 32 <= b < 127 else "." for b in row)
            yield f"{at + i:08x}  {hexes[:23]}  {hexes[24:]}  |{text}|"
        at += len(data)
    yield f"{at:08x}"


# -- FlashCopy ---------------------------------------------------------------------------
@main.command()
@click.argument("specs", nargs=-1, required=True, type=FLASH)
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
@pass_units
def mkflash(units, specs, nocp, record, persist, inhibit, copy_rate, seq, wait) -> None:
    """Establish FlashCopy SOURCE:TARGET relationships (several: at one instant)."""
    if wait and nocp:
        raise click.UsageError("--wait copies in COPY mode; it cannot go with --nocp")
    unit = units.local()
    vols = [(unit.volume(s), unit.volume(t)) for s, t in specs]
    if wait and copy_rate:
        _check_wait([(f"{s.name}:{t.name}", s.n_tracks, s.track_size, copy_rate)
                     for s, t in vols])
    rels = establish_group(vols, background_copy=not nocp, record=record, persistent=persist,
                           inhibit_target_write=inhibit, copy_rate=copy_rate or None,
                           sequence=seq)
    for fc in rels:
        click.echo(f"established FlashCopy {_fc_id(fc)}: sequence {fc.sequence}, "
                   f"{'NOCOPY' if nocp else 'COPY'}, {_n(fc.source.n_tracks, 'track')} to copy")
    if wait:
        _finish_copies(rels)


def _finish_copies(rels: list[FlashCopy]) -> None:
    t = time.perf_counter()
    _copy_in_foreground(rels)
    took = time.perf_counter() - t
    for fc in rels:
        ended = "; relationship ended (not persistent)" if not fc.active else ""
        click.echo(f"copied {_fc_id(fc)} in {took:.2f} s{ended}")


@main.command()
@click.argument("specs", nargs=-1, type=FLASH)
@JSON
@pass_units
def lsflash(units, specs, as_json) -> None:
    """List FlashCopy relationships (all of the unit's, or SOURCE:TARGET ones)."""
    rels = [units.flashcopy(*s) for s in specs] if specs else units.local().flashcopies
    rels = sorted(rels, key=_fc_id)
    if as_json:
        _json_out([{"id": _fc_id(fc), "source": fc.source.name, "target": fc.target.name,
                    "state": fc.state.value, "sequence": fc.sequence,
                    "tracks_to_copy": fc.tracks_to_copy, "tracks": fc.source.n_tracks,
                    "revertible": fc.revertible, "background_copy": fc.background_copy,
                    "record": fc.record, "persistent": fc.persistent,
                    "inhibit_target_write": fc.inhibit_target_write,
                    "copy_rate": fc.copy_rate} for fc in rels])
        return
    t = _table("ID", "State", "Seq", "To copy", "Revertible", "Options")
    for fc in rels:
        opts = ["COPY" if fc.background_copy else "NOCOPY"]
        opts += [o for o, on in (("record", fc.record), ("persist", fc.persistent),
                                 ("tgtinhibit", fc.inhibit_target_write)) if on]
        if fc.copy_rate:
            opts.append(f"rate {_human(fc.copy_rate)}/s")
        t.add_row(_fc_id(fc), fc.state.value, str(fc.sequence),
                  f"{fc.tracks_to_copy}/{fc.source.n_tracks}",
                  "yes" if fc.revertible else "no", " ".join(opts))
    _console().print(t if t.rows else "no FlashCopy relationships")


@main.command()
@click.argument("specs", nargs=-1, required=True, type=FLASH)
@click.option("--revertible", is_flag=True,
              help="Keep the prior image until commitflash or revertflash.")
@click.option("--seq", type=Count(0, MAX_SEQUENCE),
              help="New sequence number [default: the old one + 1].")
@click.option("--wait", is_flag=True, help="Copy the changed tracks now (COPY mode).")
@pass_units
def resyncflash(units, specs, revertible, seq, wait) -> None:
    """Incremental re-establish: the targets take their sources' current image."""
    if wait and revertible:
        raise click.UsageError("nothing copies while revertible: --wait needs commitflash")
    rels = [units.flashcopy(*s) for s in specs]
    if wait:
        _check_wait([(_fc_id(fc), (fc.to_copy | fc.src_changed | fc.tgt_changed).count()
                      if fc.record else 0, fc.source.track_size, fc.copy_rate)
                     for fc in rels if fc.background_copy])
    for fc in rels:
        marked = (fc.to_copy | fc.src_changed | fc.tgt_changed).count() if fc.record else 0
        fc.resync(revertible=revertible, sequence=seq)
        how = "revertible, " if revertible else ""
        click.echo(f"resynced {_fc_id(fc)}: {how}sequence {fc.sequence}, "
                   f"{_n(marked, 'track')} to copy")
    if wait:
        _finish_copies([fc for fc in rels if fc.background_copy])


@main.command()
@click.argument("specs", nargs=-1, required=True, type=FLASH)
@pass_units
def waitflash(units, specs) -> None:
    """Copy the remaining tracks of relationships now (at their copy rate,
    progress and ETA on stderr)."""
    rels = [units.flashcopy(*s) for s in specs]
    _check_wait([(_fc_id(fc), fc.tracks_to_copy, fc.source.track_size, fc.copy_rate)
                 for fc in rels], flag="waitflash")
    _finish_copies(rels)


@main.command()
@click.argument("specs", nargs=-1, required=True, type=FLASH)
@pass_units
def commitflash(units, specs) -> None:
    """Keep the new image of revertible relationships."""
    for fc in [units.flashcopy(*s) for s in specs]:
        fc.commit()
        click.echo(f"committed {_fc_id(fc)}: sequence {fc.sequence}")


@main.command()
@click.argument("specs", nargs=-1, required=True, type=FLASH)
@pass_units
def revertflash(units, specs) -> None:
    """Return revertible relationships to their prior image."""
    for fc in [units.flashcopy(*s) for s in specs]:
        fc.revert()
        click.echo(f"reverted {_fc_id(fc)}: sequence {fc.sequence}")


@main.command()
@click.argument("specs", nargs=-1, required=True, type=FLASH)
@pass_units
def reverseflash(units, specs) -> None:
    """Fast reverse restore: each SOURCE takes its TARGET's image."""
    for fc in [units.flashcopy(*s) for s in specs]:
        n = fc.reverse_restore()
        click.echo(f"restored {fc.source.name} from {fc.target.name}: {_n(n, 'track')} copied")


@main.command()
@click.argument("specs", nargs=-1, required=True, type=FLASH)
@click.option("--force", is_flag=True,
              help="Withdraw even with tracks left to copy (the target turns invalid).")
@pass_units
def rmflash(units, specs, force) -> None:
    """Withdraw FlashCopy relationships.

    A relationship with tracks left to copy is refused unless --force: its
    target would lose its point-in-time image (it turns invalid)."""
    rels = [units.flashcopy(*s) for s in specs]
    for fc in rels:       # refuse before withdrawing any
        if fc.revertible:
            raise click.ClickException(f"FlashCopy {_fc_id(fc)} is revertible; "
                                       "commitflash or revertflash first")
        left = fc.tracks_to_copy
        if left and not force:
            raise click.ClickException(
                f"FlashCopy {_fc_id(fc)} still has {left} tracks to copy: withdrawing it "
                f"loses {fc.target.name}'s point-in-time image ({fc.target.name} turns "
                f"invalid); waitflash {_fc_id(fc)} first, or rmflash --force")
    for fc in rels:
        left = fc.tracks_to_copy
        fc.withdraw(force=force)
        note = f"; {fc.target.name} is invalid ({_n(left, 'track')} not copied)" if left else ""
        click.echo(f"withdrew {_fc_id(fc)}{note}")


# -- PPRC -----------------------------------------------------------------------------------
@main.command()
@click.argument("specs", nargs=-1, required=True, type=PAIR)
@click.option("--type", "mode", type=click.Choice(["mmir", "gcp"]), required=True,
              help="Metro Mirror (synchronous) or Global Copy (asynchronous).")
@click.option("--nocp", is_flag=True, help="No initial copy: the volumes already match.")
@click.option("--wait", is_flag=True, help="Do the initial copy now, with a progress bar.")
@pass_units
def mkpprc(units, specs, mode, nocp, wait) -> None:
    """Establish PPRC pairs PRIMARY:SECONDARY (secondaries in --remote-unit)."""
    local, remote = units.local(), units.remote()
    vols = [(local.volume(a), remote.volume(b)) for a, b in specs]
    pairs = []
    for a, b in vols:
        pairs.append(PPRCPair(a, b, mode=mode, initial_copy=not nocp, background=False))
        click.echo(f"established PPRC pair {_pair_id(pairs[-1])} ({mode}): "
                   f"{_n(pairs[-1].out_of_sync_tracks, 'track')} to copy")
    if wait:
        _drain_in_foreground(pairs)
        click.echo("initial copy done: " + ", ".join(
            f"{_pair_id(p)} {p.state.value}" for p in pairs))


@main.command()
@click.argument("specs", nargs=-1, type=PAIR)
@JSON
@pass_units
def lspprc(units, specs, as_json) -> None:
    """List PPRC pairs of the open units (or the PRIMARY:SECONDARY ones)."""
    if specs:
        pairs = [units.pair(*s) for s in specs]
    else:
        pairs = [p for u in units.all() for p in u.pairs]
    if as_json:
        out = [{"id": _pair_id(p), "primary": p.primary.name, "secondary": p.secondary.name,
                "state": p.state.value, "mode": p.mode.value,
                "out_of_sync": p.out_of_sync_tracks, "reason": p.suspend_reason,
                "primary_unit": str(p.primary.unit.path),
                "secondary_unit": str(p.secondary.unit.path)} for p in pairs]
        if not specs:
            out += [{"id": f"{row['primary_name']}:{row['secondary_name']}",
                     "primary": row["primary_name"], "secondary": row["secondary_name"],
                     "state": "unknown", "mode": row["mode"], "out_of_sync": None,
                     "reason": "secondary unit not available", "primary_unit": str(u.path),
                     "secondary_unit": row["secondary_unit"]}
                    for u in units.all() for row in u.pair_records]
        _json_out(out)
        return
    t = _table("ID", "State", "Type", "Out of sync", "Reason", "Primary unit",
               "Secondary unit")
    for p in pairs:
        t.add_row(_pair_id(p), p.state.value, p.mode.value, str(p.out_of_sync_tracks),
                  p.suspend_reason or "-", p.primary.unit.path.name,
                  p.secondary.unit.path.name)
    if not specs:
        for u in units.all():
            for row in u.pair_records:
                t.add_row(f"{row['primary_name']}:{row['secondary_name']}", "unknown",
                          row["mode"], "?", "secondary unit not available", u.path.name,
                          row["secondary_unit"])
    _console().print(t if t.rows else "no PPRC pairs")


@main.command()
@click.argument("specs", nargs=-1, required=True, type=PAIR)
@pass_units
def pausepprc(units, specs) -> None:
    """Suspend pairs: writes are recorded out of sync, nothing is sent."""
    for p in [units.pair(*s) for s in specs]:
        p.suspend("host")
        click.echo(f"suspended {_pair_id(p)}")


@main.command()
@click.argument("specs", nargs=-1, required=True, type=PAIR)
@click.option("--wait", is_flag=True, help="Resync the out-of-sync tracks now.")
@pass_units
def resumepprc(units, specs, wait) -> None:
    """Resume suspended pairs; --wait sends their out-of-sync tracks now."""
    pairs = [units.pair(*s) for s in specs]
    for p in pairs:
        p.resume()
        click.echo(f"resumed {_pair_id(p)}: {_n(p.out_of_sync_tracks, 'track')} out of sync")
    if wait:
        _resync_now(pairs)


@main.command()
@click.argument("specs", nargs=-1, required=True, type=PAIR)
@pass_units
def failoverpprc(units, specs) -> None:
    """Make secondaries usable primaries (their writes are recorded)."""
    for p in [units.pair(*s) for s in specs]:
        p.failover()
        click.echo(f"failed over {_pair_id(p)}: {p.secondary.name} accepts host writes")


@main.command()
@click.argument("specs", nargs=-1, required=True, type=PAIR)
@click.option("--wait", is_flag=True, help="Send the changed tracks now.")
@pass_units
def failbackpprc(units, specs, wait) -> None:
    """After failoverpprc: mirror the other way (SECONDARY to PRIMARY)."""
    pairs = [units.pair(*s) for s in specs]
    for p in pairs:
        p.failback()
        click.echo(f"failed back: pair {_pair_id(p)}, {_n(p.out_of_sync_tracks, 'track')} to send")
    if wait:
        _resync_now(pairs)


@main.command()
@click.argument("specs", nargs=-1, required=True, type=PAIR)
@click.option("--force", is_flag=True,
              help="End pairs with tracks out of sync too (that record is lost).")
@pass_units
def rmpprc(units, specs, force) -> None:
    """End pairs: the secondaries accept host writes again.

    A pair with tracks out of sync is refused unless --force: its secondary
    lacks the latest writes to them (it holds no one image of the primary)
    and the record of which tracks those are would be lost."""
    pairs = [units.pair(*s) for s in specs]
    for p in pairs:
        gm = units.session_of(p)
        if gm is not None:
            raise click.ClickException(f"pair {_pair_id(p)} belongs to Global Mirror session "
                                       f"{gm.name}; use rmgmir")
        oos = p.out_of_sync_tracks
        if oos and not force:
            raise click.ClickException(
                f"pair {_pair_id(p)} has {oos} tracks out of sync: {p.secondary.name} lacks "
                f"the latest writes to them, and removing the pair loses the record of "
                f"which; resumepprc --wait {_pair_id(p)} first, or rmpprc --force")
    for p in pairs:
        p.remove()
        click.echo(f"removed pair {_pair_id(p)}")


# -- Global Mirror ------------------------------------------------------------------------
@main.command()
@click.argument("session", type=SESSION)
@click.argument("specs", nargs=-1, required=True, type=TRIPLET)
@click.option("--cg-interval", type=click.FloatRange(min=0, max=86400), default=0.0,
              show_default=True, help="Seconds between CGs when formcg runs for --seconds.")
@click.option("--coord-time", type=click.FloatRange(min=0, min_open=True, max=60000),
              default=50.0, show_default=True,
              help="Longest hold of host writes at coordination, ms.")
@click.option("--drain-time", type=click.FloatRange(min=0, max=86400), default=0.0,
              show_default=True,
              help="Longest drain, seconds (0: the larger of 240 and twice the interval).")
@click.option("--decide", type=click.Choice(["after_all", "after_each"]), default="after_all",
              show_default=True, help="Decide after every prepare, or at the first failure.")
@pass_units
def mkgmir(units, session, specs, cg_interval, coord_time, drain_time, decide) -> None:
    """Create Global Mirror session SESSION over A:B:C triplets (A in --unit;
    B and C in --remote-unit)."""
    local, remote = units.local(), units.remote()
    triplets = [(local.volume(a), remote.volume(b), remote.volume(c)) for a, b, c in specs]
    gm = GlobalMirror(triplets, name=session, cg_interval=cg_interval,
                      max_coordination_time=coord_time / 1e3, max_drain_time=drain_time,
                      decide=decide)
    try:
        _GMLog(gm).reset()
    except BaseException:
        gm.close(discard=True)    # nothing copied yet: leave no session behind
        raise
    click.echo(f"created Global Mirror session {session}: {_n(len(triplets), 'triplet')}; "
               "formcg forms its consistency groups")


@main.command()
@click.argument("session", type=SESSION)
@JSON
@pass_units
def showgmir(units, session, as_json) -> None:
    """Show a Global Mirror session: CG sequence, C sequences, stats, state."""
    gm = units.session(session)
    log = _GMLog(gm).log
    seqs = gm.c_sequences
    when = log["last_cg_time"]
    if as_json:
        _json_out({
            "session": gm.name, "state": gm.state.value, "fatal_reason": gm.fatal_reason,
            "cg_sequence": max(seqs), "c_sequences": seqs,
            "cg_interval": gm.cg_interval, "max_coordination_time": gm.max_coordination_time,
            "max_drain_time": gm.max_drain_time, "attempts": log["attempts"],
            "successes": log["successes"], "failures": log["failures"],
            "commit_failures_resolved": log["commit_failures_resolved"],
            "last_cg_time": when, "rpo": None if when is None else time.time() - when,
            "bytes_drained": log["bytes_drained"],
            "out_of_sync": sum(tr.pair.out_of_sync_tracks for tr in gm.triplets),
            "triplets": [{"a": tr.a.name, "b": tr.b.name, "c": tr.c.name,
                          "pair_state": tr.pair.state.value,
                          "out_of_sync": tr.pair.out_of_sync_tracks,
                          "c_sequence": tr.fc.sequence} for tr in gm.triplets]})
        return
    t = _table("Property", "Value", show_header=False)
    t.add_row("Session", gm.name)
    t.add_row("State", gm.state.value + (f" ({gm.fatal_reason})" if gm.fatal_reason else ""))
    t.add_row("Triplets", str(len(gm.triplets)))
    t.add_row("CG sequence", str(max(seqs)))
    t.add_row("C sequences", str(seqs[0]) if len(set(seqs)) == 1 else " ".join(map(str, seqs)))
    t.add_row("CG interval", f"{gm.cg_interval:g} s")
    t.add_row("Max coordination time", f"{gm.max_coordination_time * 1e3:g} ms")
    t.add_row("Max drain time", f"{gm.max_drain_time:g} s" if gm.max_drain_time else "default")
    t.add_row("CG attempts", str(log["attempts"]))
    t.add_row("Successful CGs", str(log["successes"]))
    t.add_row("Failed CGs", ", ".join(f"{k} {v}" for k, v in sorted(log["failures"].items()))
              or "0")
    t.add_row("Commit failures resolved", str(log["commit_failures_resolved"]))
    t.add_row("Last CG formed", "-" if when is None else
              time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(when)))
    t.add_row("RPO", "-" if when is None else f"{time.time() - when:.1f} s")
    t.add_row("Sent to B", _human(log["bytes_drained"]))
    t.add_row("Out of sync", _n(sum(tr.pair.out_of_sync_tracks for tr in gm.triplets), "track"))
    _console().print(t)
    click.echo()
    t = _table("A", "B", "C", "Pair state", "Out of sync", "C seq")
    for tr in gm.triplets:
        t.add_row(tr.a.name, tr.b.name, tr.c.name, tr.pair.state.value,
                  str(tr.pair.out_of_sync_tracks), str(tr.fc.sequence))
    _console().print(t)


@main.command()
@click.argument("session", type=SESSION)
@click.option("--count", type=Count(low=1), default=1, show_default=True,
              help="Consistency groups to attempt, one after another.")
@click.option("--seconds", type=click.FloatRange(min=0, min_open=True, max=7 * 86400),
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
    log = _GMLog(gm)
    sent = _drain_in_foreground([t.pair for t in gm.triplets if t.pair.suspend_reason is None])
    log.add_sent(sent)
    results = []

    def counted(r) -> None:     # called as each attempt ends, from the thread making it
        results.append(r)
        log.add(r)

    gm.on_result = counted
    try:
        _arm_faults(gm, injects)
        if seconds is None:
            for _ in range(count):
                gm.form_consistency_group()
        else:
            _run_loop(gm, seconds)
    finally:
        gm.on_result = None
        if injects:
            faults.clear()
    t = _table("CG", "Result", "Coord ms", "Drain ms", "FlashCopy ms", "Drained")
    for r in results[-20:]:
        t.add_row(str(r.sequence), _result_text(r), _ms(r.coordination_time),
                  _ms(r.drain_time), _ms(r.flash_time), _human(r.bytes_drained))
    if sent:
        click.echo(f"sent {_human(sent)} to B as Global Copy before the first CG")
    if len(results) > 20:
        click.echo(f"{len(results)} attempts; the last 20:")
    _console().print(t)
    ok = sum(r.committed for r in results)
    click.echo(f"{ok} of {len(results)} consistency groups committed; "
               f"C volumes at CG {max(gm.c_sequences)}")
    last = results[-1] if results else None
    if last is not None and not last.committed:
        raise click.ClickException(f"CG {last.sequence} failed: {last.cause.value}: "
                                   f"{last.detail}")


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


def _run_loop(gm: GlobalMirror, seconds: float) -> None:
    gm.start()
    try:
        with _Progress(unit="s") as progress:
            task = progress.add("forming CGs", round(seconds, 1))
            end = time.monotonic() + seconds
            while (left := end - time.monotonic()) > 0:
                time.sleep(min(0.1, left))
                st = gm.stats
                progress.update(task, round(seconds - max(0.0, end - time.monotonic()), 1),
                                description=f"CG {st.sequence}: {st.successes} committed")
    finally:
        gm.stop()


@main.command()
@click.argument("session", type=SESSION)
@click.option("--force", is_flag=True,
              help="Withdraw at once: C volumes that still read tracks from B turn invalid.")
@pass_units
def rmgmir(units, session, force) -> None:
    """End a Global Mirror session: remove its pairs and FlashCopies.

    Every C volume keeps its image of the last committed CG: the tracks it
    still reads from its B are copied B -> C first (progress on stderr).
    --force skips that copy and leaves those C volumes invalid."""
    gm = units.session(session)
    log = _GMLog(gm)
    need = gm.tracks_c_needs()
    cg = max(gm.c_sequences)
    cs = ", ".join(need)
    if force:
        gm.close(discard=True)
    else:
        ts = gm.triplets[0].b.track_size
        with _Progress() as progress:
            task = progress.add(f"copying to {cs}", sum(need.values()), size=ts)
            gm.close(on_copy=lambda done, total: progress.update(task, done))
    log.remove()
    click.echo(f"removed Global Mirror session {session}")
    lost = {c: n for c, n in need.items() if n}
    if force and lost:
        click.echo("invalid now (their image of CG {} was not copied from B): {}".format(
            cg, ", ".join(f"{c} ({_n(n, 'track')})" for c, n in lost.items())))
    elif need:
        copied = sum(need.values())
        click.echo(f"{cs} keep CG {cg}" + (f" ({_n(copied, 'track')} copied from B)"
                                           if copied else ""))


class _GMLog:
    """A session's CG counts across invocations, in the B unit's ``cli``
    directory (the library keeps its stats in memory only). Saved after
    every change, so a command killed midway keeps what it counted."""

    def __init__(self, gm: GlobalMirror) -> None:
        unit = gm.triplets[0].b.unit
        # the name is a checked one (fastfc.names): no separator, no leading dot
        ok = unit is not None and unit.path is not None and NAME.match(gm.name)
        self.path = unit.path / "cli" / f"gmir-{gm.name}.json" if ok else None
        self.log = {"attempts": 0, "successes": 0, "failures": {},
                    "commit_failures_resolved": 0, "last_cg_time": None, "bytes_drained": 0}
        if self.path is not None and self.path.exists():
            self.log.update(json.loads(self.path.read_text()))

    def add_sent(self, sent: int) -> None:
        """``sent`` bytes went to B as Global Copy."""
        if sent:
            self.log["bytes_drained"] += sent
            self._save()

    def add(self, r) -> None:
        """Count one CG attempt's result."""
        log = self.log
        log["attempts"] += 1
        log["bytes_drained"] += r.bytes_drained
        if r.committed:
            log["successes"] += 1
            log["last_cg_time"] = r.coordinated_at
        if r.committed and r.cause is Cause.COMMIT_FAILED:
            log["commit_failures_resolved"] += 1
        elif r.cause is not None:
            log["failures"][r.cause.value] = log["failures"].get(r.cause.value, 0) + 1
        self._save()

    def reset(self) -> None:
        self.remove()
        self.log = {"attempts": 0, "successes": 0, "failures": {},
                    "commit_failures_resolved": 0, "last_cg_time": None, "bytes_drained": 0}
        self._save()

    def remove(self) -> None:
        if self.path is not None:
            self.path.unlink(missing_ok=True)

    def _save(self) -> None:
        if self.path is None:
            return
        self.path.parent.mkdir(exist_ok=True)
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.log))
        tmp.replace(self.path)
