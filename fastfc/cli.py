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

Expected errors (a refused operation, a missing volume, a damaged unit) print
one line to stderr and exit with status 1; usage errors exit with status 2.
Set ``FASTFC_DEBUG=1`` to get the traceback instead.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import sqlite3
import sys
import time
from contextlib import contextmanager
from pathlib import Path

import click

from fastfc.errors import FastFCError, ReadOnlyUnitError
from fastfc.flashcopy import CHUNK_BYTES, FlashCopy, establish_group
from fastfc.globalmirror import GlobalMirror
from fastfc.pprc import SEND_CHUNK_BYTES, PPRCPair
from fastfc.unit import StorageUnit

EXPECTED_ERRORS = (FastFCError, ValueError, KeyError, IndexError, OSError, sqlite3.Error)


# -- argument types ------------------------------------------------------------------
class Size(click.ParamType):
    """A byte count: ``4096``, ``64K``, ``16MiB``, ``1G`` (binary units)."""

    name = "size"
    _UNITS = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}

    def convert(self, value, param, ctx):
        if isinstance(value, int):
            return value
        m = re.fullmatch(r"\s*(\d+)\s*([KMGT]?)(?:I?B)?\s*", str(value), re.IGNORECASE)
        if not m:
            self.fail(f"{value!r} is not a size (e.g. 4096, 64K, 16M, 1G)", param, ctx)
        return int(m.group(1)) * self._UNITS[m.group(2).upper()]


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
        return names


SIZE = Size()
FLASH = Spec("SOURCE", "TARGET")
PAIR = Spec("PRIMARY", "SECONDARY")
TRIPLET = Spec("A", "B", "C")


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
        fc = unit.volume(target)._tgt_rel
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
        for row in local._pair_rows:
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
            msg = e.args[0] if isinstance(e, KeyError) and e.args else str(e)
            raise click.ClickException(_plain(msg) or type(e).__name__) from None


def _plain(message: str) -> str:
    """Library messages name objects by their repr; a command line user
    wants their names: ``<Volume A 8x4096B at '...'>`` becomes ``volume A``."""
    message = re.sub(r"<Volume (\S+) [^>]*>", r"volume \1", message)
    message = re.sub(r"<FlashCopy (\S+)->(\S+) [^>]*>", r"FlashCopy \1:\2", message)
    return re.sub(r"<PPRCPair (\S+)->(\S+) [^>]*>", r"pair \1:\2", message)


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


@contextmanager
def _progress():
    from rich.progress import (BarColumn, MofNCompleteColumn, Progress, TextColumn,
                               TimeElapsedColumn)
    console = _console(stderr=True)
    with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                  TextColumn("tracks"), TimeElapsedColumn(), console=console,
                  transient=True, disable=not console.is_terminal) as progress:
        yield progress


def _copy_in_foreground(rels: list[FlashCopy]) -> None:
    """Finish the background copy of ``rels`` in this process, with a
    progress bar of tracks copied (a relationship's worker thread may copy
    alongside; both take the source lock)."""
    with _progress() as progress:
        for fc in rels:
            total = fc.tracks_to_copy
            task = progress.add_task(f"{fc.source.name}:{fc.target.name}", total=total)
            chunk = max(1, CHUNK_BYTES // fc.source.track_size)
            start, copied = time.perf_counter(), 0
            while fc.active and fc.tracks_to_copy:
                try:
                    copied += fc.copy(chunk)
                except FastFCError:
                    if fc.active:
                        raise
                if fc.copy_rate:  # keep to the relationship's rate cap
                    ahead = copied * fc.source.track_size / fc.copy_rate
                    time.sleep(max(0.0, ahead - (time.perf_counter() - start)))
                progress.update(task, completed=total - fc.tracks_to_copy)
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
    """Send every out-of-sync track of ``pairs`` now, with a progress bar.
    Returns the bytes sent."""
    sent = 0
    with _progress() as progress:
        for pair in pairs:
            total = pair.out_of_sync_tracks
            task = progress.add_task(pair.name.replace("->", ":"), total=total)
            while pair.out_of_sync_tracks and pair.suspend_reason is None:
                n = pair.drain(4 * SEND_CHUNK_BYTES)
                if not n:
                    break
                sent += n
                progress.update(task, completed=total - pair.out_of_sync_tracks)
            if pair.suspend_reason is not None:
                raise click.ClickException(f"pair {_pair_id(pair)} suspended during the copy: "
                                           f"{pair.suspend_reason}")
    return sent


def _fc_id(fc: FlashCopy) -> str:
    return f"{fc.source.name}:{fc.target.name}"


def _pair_id(pair: PPRCPair) -> str:
    return f"{pair.primary.name}:{pair.secondary.name}"


# -- the group ------------------------------------------------------------------------
@click.group(cls=FastFCGroup, context_settings={"help_option_names": ["-h", "--help"]})
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
    """
    ctx.obj = Units(unit, remote, readonly=ctx.invoked_subcommand in READ_ONLY_COMMANDS,
                    wait=wait)


@main.command()
@click.option("--seconds", default=20.0, show_default=True, help="How long the workload runs.")
@click.option("--triplets", default=16, show_default=True, help="(A, B, C) volume triplets.")
@click.option("--size-mib", default=32, show_default=True, help="Size of each volume.")
@click.option("--rate", "rate_mbs", default=100.0, show_default=True,
              help="Combined host write rate in MB/s (0: as fast as possible).")
@click.option("--fault-every", default=1.0, show_default=True,
              help="Seconds between injected faults (0: none).")
@click.option("--seed", default=0, show_default=True)
@click.option("--plot", type=click.Path(dir_okay=False), default=None,
              help="Draw RPO and phase times over time to this PNG file.")
def demo(seconds, triplets, size_mib, rate_mbs, fault_every, seed, plot) -> None:
    """Run a Global Mirror session under random writes with faults injected."""
    from fastfc.demo import DemoConfig, run_demo
    cfg = DemoConfig(seconds=seconds, triplets=triplets, size_mib=size_mib,
                     rate_mbs=rate_mbs, fault_every=fault_every, seed=seed)
    result = run_demo(cfg, plot=plot)
    sys.exit(0 if result["promise_ok"] else 1)


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
            f"{Path(__file__).resolve().parent}; run it from a clone (pip install -e '.[dev]')")
    run = _load_benches(root).run
    sys.exit(run(quick=quick, out=out, only=list(only), skip=list(skip),
                 update=update_readme, unit_dir=unit_dir, strict=strict))


def _source_checkout() -> Path | None:
    """The source checkout this fastfc runs from: the directory above the
    package, when it holds pyproject.toml and benches/report.py. None for an
    installed package."""
    root = Path(__file__).resolve().parent.parent
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
@main.command()
@click.argument("names", nargs=-1, required=True)
@click.option("--tracks", type=click.IntRange(min=1), help="Number of tracks.")
@click.option("--size", type=SIZE, help="Capacity instead of --tracks (rounded up to tracks).")
@click.option("--track-size", type=SIZE, default="64K", show_default=True,
              help="Bytes per track: a power of two, 512 to 16M.")
@pass_units
def mkvol(units, names, tracks, size, track_size) -> None:
    """Create zero-filled volumes (the unit too, if new) [mkfbvol]."""
    if (tracks is None) == (size is None):
        raise click.UsageError("give exactly one of --tracks and --size")
    unit = units.local(create=True)
    n = tracks if tracks is not None else max(1, -(-size // track_size))
    for name in names:
        vol = unit.create_volume(name, n, track_size)
        click.echo(f"created volume {name}: {_n(vol.n_tracks, 'track')} of "
                   f"{_human(vol.track_size)} ({_human(vol.capacity)})")


@main.command()
@pass_units
def lsvol(units) -> None:
    """List the unit's volumes [lsfbvol]."""
    unit = units.local()
    t = _table("Name", "Tracks", "Track size", "Capacity", "Roles")
    for v in sorted(unit.volumes(), key=lambda v: v.name):
        t.add_row(v.name, str(v.n_tracks), _human(v.track_size), _human(v.capacity),
                  _roles(v, units))
    _console().print(t if t.rows else "no volumes")


def _roles(v, units: Units) -> str:
    roles = [f"FC source of {r.target.name}" for r in v._src_rels]
    if v._tgt_rel is not None:
        roles.append(f"FC target of {v._tgt_rel.source.name}")
    if isinstance(v._mirror, PPRCPair):
        roles.append(f"PPRC primary of {v._mirror.secondary.name}")
    elif _pending_pair(v):
        roles.append(f"PPRC primary of {_pending_pair(v)['secondary_name']} (unit away)")
    if v._secondary:
        roles.append("PPRC secondary")
    roles += [f"GM {gm.name}" for u in units.open.values() for gm in u.sessions.values()
              if any(v in (t.a, t.b, t.c) for t in gm.triplets)]
    if v.write_inhibited:
        roles.append("write-inhibited")
    if not v.valid:
        roles.append("INVALID")
    return ", ".join(roles) or "-"


@main.command()
@click.argument("names", nargs=-1, required=True)
@pass_units
def rmvol(units, names) -> None:
    """Delete volumes that are in no relationship or pair [rmfbvol]."""
    unit = units.local()
    for name in names:
        unit.remove_volume(name)
        click.echo(f"removed volume {name}")


@main.command()
@click.argument("volume")
@click.argument("data")
@click.option("--offset", type=SIZE, default=0, show_default=True, help="Byte offset.")
@click.option("--repeat", type=click.IntRange(min=1), default=1, show_default=True,
              help="Write DATA this many times back to back.")
@pass_units
def write(units, volume, data, offset, repeat) -> None:
    """Host write: DATA (UTF-8 text) to VOLUME at --offset."""
    unit = units.local()
    vol = unit.volume(volume)
    pending = _pending_pair(vol)
    if pending and vol._mirror is None:   # the library would not record it
        raise click.ClickException(
            f"{volume} is a PPRC primary whose secondary unit {pending['secondary_unit']} "
            "is not available; its writes could not be recorded")
    payload = data.encode() * repeat
    vol.write(offset, payload)
    note = "; recorded out of sync (the secondary unit is not available)" if pending else ""
    click.echo(f"wrote {len(payload)} bytes to {volume} at offset {offset}{note}")


def _pending_pair(vol) -> dict | None:
    """The stored row of a pair whose primary is ``vol`` and whose secondary
    unit could not be opened (so the pair is not restored)."""
    rows = [r for r in vol.unit._pair_rows if r["primary_name"] == vol.name]
    return rows[0] if rows else None


@main.command()
@click.argument("volume")
@click.option("--offset", type=SIZE, default=0, show_default=True, help="Byte offset.")
@click.option("--length", type=SIZE, help="Bytes to read [default: 256, or to the end "
                                          "with --sha256].")
@click.option("--sha256", is_flag=True, help="Print the SHA-256 of the bytes instead.")
@pass_units
def read(units, volume, offset, length, sha256) -> None:
    """Host read: a hex dump of VOLUME's logical image (as hexdump -C)."""
    vol = units.local().volume(volume)
    if length is None:
        length = vol.capacity - offset if sha256 else min(256, vol.capacity - offset)
    if sha256:
        h = hashlib.sha256()
        for at in range(offset, offset + length, CHUNK_BYTES):
            h.update(vol.read(at, min(CHUNK_BYTES, offset + length - at)))
        click.echo(f"{h.hexdigest()}  {volume}[{offset}:{offset + length}]")
        return
    for line in _hexdump(bytes(vol.read(offset, length)), offset):
        click.echo(line)


def _hexdump(data: bytes, base: int):
    """Lines as ``hexdump -C`` prints them, repeated lines squeezed to '*'."""
    previous, squeezed = None, False
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
        yield f"{base + i:08x}  {hexes[:23]}  {hexes[24:]}  |{text}|"
    yield f"{base + len(data):08x}"


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
@click.option("--seq", type=int, default=0, show_default=True, help="Sequence number.")
@click.option("--wait", is_flag=True, help="Copy every track now, with a progress bar.")
@pass_units
def mkflash(units, specs, nocp, record, persist, inhibit, copy_rate, seq, wait) -> None:
    """Establish FlashCopy SOURCE:TARGET relationships (several: at one instant)."""
    if wait and nocp:
        raise click.UsageError("--wait copies in COPY mode; it cannot go with --nocp")
    unit = units.local()
    vols = [(unit.volume(s), unit.volume(t)) for s, t in specs]
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
@pass_units
def lsflash(units, specs) -> None:
    """List FlashCopy relationships (all of the unit's, or SOURCE:TARGET ones)."""
    rels = [units.flashcopy(*s) for s in specs] if specs else units.local().flashcopies
    t = _table("ID", "State", "Seq", "To copy", "Revertible", "Options")
    for fc in sorted(rels, key=_fc_id):
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
@click.option("--seq", type=int, help="New sequence number [default: the old one + 1].")
@click.option("--wait", is_flag=True, help="Copy the changed tracks now (COPY mode).")
@pass_units
def resyncflash(units, specs, revertible, seq, wait) -> None:
    """Incremental re-establish: the targets take their sources' current image."""
    if wait and revertible:
        raise click.UsageError("nothing copies while revertible: --wait needs commitflash")
    rels = [units.flashcopy(*s) for s in specs]
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
    """Copy the remaining tracks of relationships now, with a progress bar."""
    _finish_copies([units.flashcopy(*s) for s in specs])


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
    """Withdraw FlashCopy relationships."""
    for fc in [units.flashcopy(*s) for s in specs]:
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
@pass_units
def lspprc(units, specs) -> None:
    """List PPRC pairs of the open units (or the PRIMARY:SECONDARY ones)."""
    if specs:
        pairs = [units.pair(*s) for s in specs]
    else:
        pairs = [p for u in units.all() for p in u.pairs]
    t = _table("ID", "State", "Type", "Out of sync", "Reason", "Primary unit",
               "Secondary unit")
    for p in pairs:
        t.add_row(_pair_id(p), p.state.value, p.mode.value, str(p.out_of_sync_tracks),
                  p.suspend_reason or "-", p.primary.unit.path.name,
                  p.secondary.unit.path.name)
    if not specs:
        for u in units.all():
            for row in u._pair_rows:
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
@pass_units
def rmpprc(units, specs) -> None:
    """End pairs: the secondaries accept host writes again."""
    pairs = [units.pair(*s) for s in specs]
    for p in pairs:
        gm = units.session_of(p)
        if gm is not None:
            raise click.ClickException(f"pair {_pair_id(p)} belongs to Global Mirror session "
                                       f"{gm.name}; use rmgmir")
    for p in pairs:
        p.remove()
        click.echo(f"removed pair {_pair_id(p)}")


# -- Global Mirror ------------------------------------------------------------------------
@main.command()
@click.argument("session")
@click.argument("specs", nargs=-1, required=True, type=TRIPLET)
@click.option("--cg-interval", type=click.FloatRange(min=0), default=0.0, show_default=True,
              help="Seconds between CGs when formcg runs for --seconds.")
@click.option("--coord-time", type=click.FloatRange(min=0, min_open=True), default=50.0,
              show_default=True, help="Longest hold of host writes at coordination, ms.")
@click.option("--drain-time", type=click.FloatRange(min=0), default=0.0, show_default=True,
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
    _GMLog(gm).reset()
    click.echo(f"created Global Mirror session {session}: {_n(len(triplets), 'triplet')}; "
               "formcg forms its consistency groups")


@main.command()
@click.argument("session")
@pass_units
def showgmir(units, session) -> None:
    """Show a Global Mirror session: CG sequence, C sequences, stats, state."""
    gm = units.session(session)
    log = _GMLog(gm).load()
    seqs = gm.c_sequences
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
    when = log["last_cg_time"]
    t.add_row("Last CG formed", "-" if when is None else
              time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(when)))
    t.add_row("RPO", "-" if when is None else f"{time.time() - when:.1f} s")
    t.add_row("Sent to B", _human(log["bytes_drained"]))
    t.add_row("Out of sync", _n(sum(tr.pair.out_of_sync_tracks for tr in gm.triplets), "track"))
    _console().print(t)
    t = _table("A", "B", "C", "Pair state", "Out of sync", "C seq")
    for tr in gm.triplets:
        t.add_row(tr.a.name, tr.b.name, tr.c.name, tr.pair.state.value,
                  str(tr.pair.out_of_sync_tracks), str(tr.fc.sequence))
    _console().print(t)


@main.command()
@click.argument("session")
@click.option("--count", type=click.IntRange(min=1), default=1, show_default=True,
              help="Consistency groups to attempt, one after another.")
@click.option("--seconds", type=click.FloatRange(min=0, min_open=True),
              help="Instead of --count: run the session's continuous loop this long.")
@click.option("--inject", "injects", multiple=True, metavar="POINT[:VOLUME]",
              help="Arm a fault for these attempts (fastfc.faults): prepare, commit or "
                   "revert of a B volume; coordinate; drain of an A volume. Repeatable.")
@pass_units
def formcg(units, session, count, seconds, injects) -> None:
    """Form consistency groups: first send the out-of-sync backlog as Global
    Copy (with a progress bar), then attempt CGs. Exits with status 1 when
    the last attempt failed."""
    from fastfc import faults
    gm = units.session(session)
    sent = _drain_in_foreground([t.pair for t in gm.triplets if t.pair.suspend_reason is None])
    try:
        _arm_faults(gm, injects)
        if seconds is None:
            results = [gm.form_consistency_group() for _ in range(count)]
        else:
            results = _run_loop(gm, seconds)
    finally:
        if injects:
            faults.clear()
    _GMLog(gm).add(results, sent)
    t = _table("CG", "Result", "Coord ms", "Drain ms", "FlashCopy ms", "Drained")
    for r in results[-20:]:
        t.add_row(str(r.sequence), "committed" if r.committed else f"failed: {r.cause.value}",
                  _ms(r.coordination_time), _ms(r.drain_time), _ms(r.flash_time),
                  _human(r.bytes_drained))
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
        except ValueError as e:
            raise click.BadParameter(str(e), param_hint="--inject") from None


def _run_loop(gm: GlobalMirror, seconds: float) -> list:
    from rich.progress import BarColumn, Progress, TextColumn
    before = len(gm.history)
    gm.start()
    try:
        console = _console(stderr=True)
        with Progress(TextColumn("{task.description}"), BarColumn(), console=console,
                      transient=True, disable=not console.is_terminal) as progress:
            task = progress.add_task("forming CGs", total=seconds)
            end = time.monotonic() + seconds
            while (left := end - time.monotonic()) > 0:
                time.sleep(min(0.1, left))
                st = gm.stats
                progress.update(task, completed=seconds - max(0.0, end - time.monotonic()),
                                description=f"CG {st.sequence}: {st.successes} committed")
    finally:
        gm.stop()
    return list(gm.history)[before:]


@main.command()
@click.argument("session")
@pass_units
def rmgmir(units, session) -> None:
    """End a Global Mirror session: remove its pairs and FlashCopies."""
    gm = units.session(session)
    log = _GMLog(gm)
    gm.close()
    log.remove()
    click.echo(f"removed Global Mirror session {session}")


class _GMLog:
    """A session's CG counts across invocations, in the B unit's ``cli``
    directory (the library keeps its stats in memory only)."""

    def __init__(self, gm: GlobalMirror) -> None:
        unit = gm.triplets[0].b.unit
        self.path = unit.path / "cli" / f"gmir-{gm.name}.json" if unit and unit.path else None

    def load(self) -> dict:
        log = {"attempts": 0, "successes": 0, "failures": {}, "last_cg_time": None,
               "bytes_drained": 0}
        if self.path is not None and self.path.exists():
            log.update(json.loads(self.path.read_text()))
        return log

    def add(self, results, sent: int = 0) -> None:
        """Count ``results``; ``sent`` bytes went as Global Copy before them."""
        log = self.load()
        log["bytes_drained"] += sent
        for r in results:
            log["attempts"] += 1
            log["bytes_drained"] += r.bytes_drained
            if r.committed:
                log["successes"] += 1
                log["last_cg_time"] = r.coordinated_at
            if r.cause is not None:
                log["failures"][r.cause.value] = log["failures"].get(r.cause.value, 0) + 1
        self._save(log)

    def reset(self) -> None:
        self.remove()
        self._save(self.load())

    def remove(self) -> None:
        if self.path is not None:
            self.path.unlink(missing_ok=True)

    def _save(self, log: dict) -> None:
        if self.path is None:
            return
        self.path.parent.mkdir(exist_ok=True)
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps(log))
        tmp.replace(self.path)
