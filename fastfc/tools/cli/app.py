"""The ``fastfc`` group: its global options, the units each invocation
opens, expected errors as one line and an exit status, and the commands
that open no unit (``demo``; ``bench`` only says where the benchmarks went)."""

from __future__ import annotations

import errno
import os
import re
import sqlite3
import sys
from pathlib import Path

import click
from fastfc_client import watch_ended, watching

from fastfc import _core
from fastfc._optional import require
from fastfc.errors import FastFCError

from . import control
from .output import human
from .params import Real
from .units import Units

EXPECTED_ERRORS = (FastFCError, ValueError, KeyError, IndexError, OSError, sqlite3.Error,
                   OverflowError, MemoryError)

EXIT_CODES = """\b
Exit status:
  0  the command did what it says
  1  an expected error, on one line on stderr: a refused operation, a
     missing volume or session, a damaged unit, a number or size too large,
     memory or disk space running out; formcg: the last CG failed; demo:
     the C volumes did not match. Nothing is left half-created.
  2  a usage error: an unknown command or option, a malformed value"""

# Commands that only look: their units are opened read-only (a shared lock,
# so they run alongside each other, and nothing in the unit changes).
READ_ONLY_COMMANDS = {"lsvol", "read", "lsflash", "lspprc", "showgmir", "lsgmir",
                      "showunit", "lspoint"}


class FastFCGroup(click.Group):
    """Closes the units after the command; expected errors become one line.
    Commands are listed in the order they are defined (by subject)."""

    def list_commands(self, ctx):
        return list(self.commands)

    def make_context(self, info_name, args, parent=None, **extra):
        problems = _core.environment_problems()   # a bad FASTFC_KERNELS or COPY_THREADS
        if problems:                                # refused before --help, too
            raise click.UsageError("; ".join(problems))
        argv = list(args)       # as given: what a server holding the unit is sent
        ctx = super().make_context(info_name, args, parent, **extra)
        ctx.meta["fastfc.argv"] = argv
        return ctx

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
    (r"end the session instead \(GlobalMirror\.close\(\)\)", "end the session instead: rmgmir"),
    (r"StorageUnit\.remove_session\('([^']*)', copy=True\)", r"rmgmir \1"),
    (r"StorageUnit\.remove_session\('([^']*)'\)", r"rmgmir --force \1"),
    (r"recover_session\('([^']+)'\)", r"recovergmir \1"),
    (r"StorageUnit\.remove_flashcopy\('([^']*)', '([^']*)'\)", r"rmflash --force \1:\2"),
    (r"StorageUnit\.remove_pair\('([^']*)', '([^']*)'\)", r"rmpprc --force \1:\2"),
    (r"StorageUnit\.remove_volume\('([^']*)'\)", r"rmvol \1"),
]


def warn_problems(units: Units, *kinds: str) -> None:
    """Name on stderr what the open units recorded but could not load, and
    the command that removes it: ``kinds`` among "volume", "FlashCopy",
    "pair" (see :attr:`StorageUnit.volume_problems` and
    :attr:`StorageUnit.relationship_problems`)."""
    remedy = {"FlashCopy": "rmflash --force", "pair": "rmpprc --force"}
    for u in units.all():
        found = [("volume", name, why) for name, why in u.volume_problems.items()]
        for what, why in u.relationship_problems.items():
            kind, ident = what.split(" ", 1)
            found.append((kind, ident, why))
        for kind, ident, why in sorted(found):
            if kind in kinds:
                cmd = f"{remedy[kind]} {ident}" if kind in remedy else f"rmvol {ident}"
                click.echo(f"warning: {kind} {ident} of unit {u.path} is not loaded: "
                           f"{_plain(why)}; {cmd} removes its row", err=True)


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


# -- the group ------------------------------------------------------------------------
@click.group(cls=FastFCGroup, context_settings={"help_option_names": ["-h", "--help"]},
             epilog=EXIT_CODES)
@click.version_option(package_name="fastfc")
@click.option("-u", "--unit", "unit", envvar="FASTFC_UNIT", metavar="PATH",
              help="The local storage unit (a directory). [env FASTFC_UNIT]")
@click.option("-r", "--remote-unit", "remote", envvar="FASTFC_REMOTE_UNIT", metavar="PATH",
              help="The unit holding PPRC secondaries and Global Mirror B and C volumes "
                   "(default: the local unit). [env FASTFC_REMOTE_UNIT]")
@click.option("--wait", "wait", type=Real(min=0), metavar="SECONDS",
              help="Wait up to SECONDS for a unit that another command has open "
                   "(default: fail at once).")
@click.option("--durability", type=click.Choice(["process", "power"]), default="process",
              envvar="FASTFC_DURABILITY", show_default=True,
              help="What the command's steps survive once it returns: a killed process "
                   "(power loss at flush points), or a power cut. [env FASTFC_DURABILITY]")
@click.pass_context
def main(ctx, unit, remote, wait, durability) -> None:
    """fastfc: FlashCopy, PPRC and Global Mirror for NumPy-backed volumes.

    Each command opens the storage unit(s), does its work and closes them:
    state persists in the unit directories between commands. Commands that
    only look (lsvol, read, lsflash, lspprc, showgmir, lsgmir, showunit) open units read-only
    and may run together; the others hold their units alone.

    While a server (fastfc serve) holds the unit, a command is carried out
    by that server, through UNIT/control.sock, with the same output and exit
    status (serve itself, and commands that open no unit, run here).

    Names of volumes and sessions are 1-64 letters, digits, '_', '.', '-',
    starting with a letter or digit. ls* and show* commands take --json.
    Progress goes to stderr (plain lines when it is not a terminal).
    """
    if isinstance(ctx.obj, control.Served):     # a server runs this for a client
        if ctx.invoked_subcommand in control.LOCAL:
            raise click.ClickException(f"{ctx.invoked_subcommand} is not carried out by "
                                       "a server: run it where you are")
        asked = ctx.get_parameter_source("durability") not in (
            click.core.ParameterSource.DEFAULT, None)
        ctx.obj = ctx.obj.units(unit, remote, durability if asked else None,
                                looks_only=ctx.invoked_subcommand in READ_ONLY_COMMANDS)
        return
    if unit is not None and ctx.invoked_subcommand not in control.LOCAL:
        status = _forward(ctx, unit)
        if status is not None:
            ctx.exit(status)
    ctx.obj = Units(unit, remote, readonly=ctx.invoked_subcommand in READ_ONLY_COMMANDS,
                    wait=wait, durability=durability)


def _forward(ctx: click.Context, unit: str) -> int | None:
    """The exit status of this command carried out by the server holding
    ``unit``, its output copied here; None when no server holds it."""
    root = ctx.find_root()
    out, err = sys.stdout, sys.stderr
    for stream in (out, err):
        stream.flush()
    argv = root.meta["fastfc.argv"]
    try:
        return control.forward(unit, argv, root.info_name or "fastfc",
                               stdout=control.binary(out), stderr=control.binary(err),
                               stdout_text=out, stderr_text=err)
    except KeyboardInterrupt:
        if not watching(ctx.invoked_subcommand, argv):
            raise
        return watch_ended(out)     # Ctrl-C is how a watch ends


# -- commands that open no unit --------------------------------------------------------
@main.command()
@click.option("--seconds", type=Real(min=0, min_open=True, max=7 * 86400),
              default=20.0, show_default=True, help="How long the workload runs (up to a week).")
@click.option("--triplets", type=click.IntRange(1, 1024), default=16, show_default=True,
              help="(A, B, C) volume triplets, 1 to 1024.")
@click.option("--size-mib", type=click.IntRange(1, 1 << 20), default=32, show_default=True,
              help="Size of each volume in MiB (all 3 x triplets live in memory).")
@click.option("--rate", "rate_mbs", type=Real(min=0, max=1e6), default=100.0,
              show_default=True, help="Combined host write rate in MB/s (0: as fast as possible).")
@click.option("--fault-every", type=Real(min=0, max=86400), default=1.0,
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
            f"--triplets {triplets} x --size-mib {size_mib} needs {human(need)} of memory "
            f"for the A, B and C volumes; this machine has {human(memory)}")
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


BENCH_MOVED = ("fastfc bench is gone: the benchmarks run from a source checkout, "
               "with `python -m benches` (`python -m benches --help` lists the suites)")


@main.command(hidden=True, add_help_option=False,
              context_settings={"ignore_unknown_options": True, "allow_extra_args": True})
def bench() -> None:
    """Where the benchmarks went: one line pointing to ``python -m benches``.

    The installed package knows nothing of a checkout's benchmarks: this
    command imports nothing from it and runs nothing.
    """
    click.echo(f"Error: {BENCH_MOVED}", err=True)
    sys.exit(2)
